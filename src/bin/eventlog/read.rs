//! `append`, `read` and `follow`.

use crate::error::{append_error, read_error, CliError, Code};
use crate::output::{self, event_row, Out, Table, EVENT_COLUMNS, TABLE_ROWS_BUFFERED};
use crate::tail::Tail;
use crate::{AppendArgs, Context, FollowArgs, ReadArgs};
use eventlog::store::{Direction, EventRef, Filter, NewEvent, StoredEvent};
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How long `follow` sleeps when there is nothing new.
const FOLLOW_IDLE_WAIT: Duration = Duration::from_millis(200);
/// Largest `--data` accepted from a file or stdin (the store's payload limit is 1 MiB;
/// whitespace is removed before it applies).
const DATA_FILE_BYTES_MAX: u64 = 64 << 20;

/// Where events go: JSON lines, or a table.
pub struct EventSink {
    out: Out,
    table: Option<Table>,
    flush_each: bool,
}

impl EventSink {
    /// `flush_each` for live output: every event is written out at once.
    pub fn new(pretty: bool, flush_each: bool) -> EventSink {
        EventSink {
            out: Out::new(),
            table: pretty.then(|| {
                Table::new(
                    &EVENT_COLUMNS,
                    if flush_each { 1 } else { TABLE_ROWS_BUFFERED },
                )
            }),
            flush_each,
        }
    }

    pub fn event(&mut self, e: &EventRef<'_>) -> Result<(), CliError> {
        match &mut self.table {
            Some(t) => t.row(&mut self.out, event_row(e))?,
            None => self.out.event(e)?,
        }
        if self.flush_each {
            self.out.flush()?;
        }
        Ok(())
    }

    pub fn stored(
        &mut self,
        item: Result<StoredEvent, eventlog::store::ReadError>,
    ) -> Result<(), CliError> {
        let stored = item.map_err(read_error)?;
        let e = stored.event().map_err(read_error)?;
        self.event(&e)
    }

    pub fn finish(mut self) -> Result<(), CliError> {
        if let Some(t) = &mut self.table {
            t.flush(&mut self.out)?;
        }
        self.out.flush()
    }
}

/// The `--data` text: inline, `@FILE`, or `@-` for stdin.
fn load_data(arg: &str) -> Result<String, CliError> {
    let Some(path) = arg.strip_prefix('@') else {
        return Ok(arg.to_string());
    };
    let mut bytes = Vec::new();
    let read = if path == "-" {
        std::io::stdin()
            .lock()
            .take(DATA_FILE_BYTES_MAX)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(DATA_FILE_BYTES_MAX).read_to_end(&mut bytes))
    };
    read.map_err(|e| {
        CliError::new(
            Code::NotFound,
            format!("cannot read --data file {path}: {e}; check the path"),
        )
    })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        CliError::new(
            Code::Usage,
            format!("--data file {path} is not UTF-8 text; the payload must be JSON"),
        )
    })?;
    // A byte order mark (Windows tools write one) is not part of the JSON.
    Ok(match text.strip_prefix('\u{FEFF}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

pub fn append(ctx: &Context, a: AppendArgs) -> Result<(), CliError> {
    let text = load_data(&a.data)?;
    let payload = eventlog::json::compact_json(&text).map_err(|e| {
        CliError::new(
            Code::Usage,
            format!("--data is not valid JSON ({e}); give a JSON value such as '{{\"total\":12}}', or @FILE"),
        )
    })?;
    let mut event = NewEvent::json_text(a.event_type, payload);
    event.event_id = a.id;
    let store = ctx.open_or_create()?;
    let appended = store
        .append(&a.aggregate, a.expected_version, &[event])
        .map_err(append_error)?;
    let mut out = Out::new();
    if ctx.pretty {
        out.line(&format!(
            "appended seq {}: aggregate {} is at version {}",
            appended.last_seq, a.aggregate, appended.last_version
        ))?;
    } else {
        out.json(&serde_json::json!({
            "seq": appended.last_seq,
            "version": appended.last_version,
        }))?;
    }
    out.flush()
}

pub fn read(ctx: &Context, a: ReadArgs) -> Result<(), CliError> {
    let store = ctx.open_existing()?;
    let limit = a.limit.unwrap_or(usize::MAX);
    let mut sink = EventSink::new(ctx.pretty, false);
    if let Some(aggregate) = &a.aggregate {
        if store.aggregate_version(aggregate).map_err(read_error)? == 0 {
            return Err(CliError::new(
                Code::NotFound,
                format!("aggregate {aggregate} has no events in {}; check the id (`eventlog read --all` lists events)", ctx.dir.display()),
            ));
        }
        let (from, direction) = if a.backward {
            (a.from_version.unwrap_or(u64::MAX), Direction::Backward)
        } else {
            (a.from_version.unwrap_or(1), Direction::Forward)
        };
        for item in store
            .read_aggregate(aggregate, from, direction, limit)
            .map_err(read_error)?
        {
            sink.stored(item)?;
        }
    } else if let Some(event_type) = &a.event_type {
        let exists = store
            .read_type(event_type, 0, 1)
            .map_err(read_error)?
            .next()
            .is_some();
        if !exists {
            return Err(CliError::new(
                Code::NotFound,
                format!("no events of type {event_type} in {}; check the type (`eventlog stats` counts the types)", ctx.dir.display()),
            ));
        }
        for item in store
            .read_type(event_type, a.from.unwrap_or(0), limit)
            .map_err(read_error)?
        {
            sink.stored(item)?;
        }
    } else {
        for item in store.read_all(a.from.unwrap_or(0), limit) {
            sink.stored(item)?;
        }
    }
    sink.finish()
}

/// Set by SIGINT and SIGTERM: `follow` stops and exits 0.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_interrupt_handler() {
    let handler: extern "C" fn(libc::c_int) = on_interrupt;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and
        // `signal` is called before any other thread could race with it on these signals.
        unsafe {
            libc::signal(signal, handler as libc::sighandler_t);
        }
    }
}

pub fn follow(ctx: &Context, a: FollowArgs) -> Result<(), CliError> {
    ctx.require_store()?;
    install_interrupt_handler();
    let filter = Filter {
        event_types: (!a.types.is_empty()).then_some(a.types),
        aggregate_prefix: a.aggregate_prefix,
    };
    let mut tail = Tail::open(&ctx.dir.join(eventlog::log::LOG_DIR_NAME), a.from)?;
    if output::stderr_is_terminal() {
        output::note(&format!("following {} (Ctrl-C to stop)", ctx.dir.display()));
    }
    let mut sink = EventSink::new(ctx.pretty, true);
    let mut records = Vec::new();
    while !INTERRUPTED.load(Ordering::SeqCst) {
        records.clear();
        tail.poll(&mut records)?;
        if records.is_empty() {
            std::thread::sleep(FOLLOW_IDLE_WAIT);
            continue;
        }
        for (seq, payload) in &records {
            let e = eventlog::store::event::decode(*seq, payload).map_err(|e| {
                CliError::new(
                    Code::Corrupt,
                    format!("record {seq} is not a valid event: {e}; run `eventlog verify`"),
                )
            })?;
            if filter.matches(e.aggregate_id, e.event_type) {
                sink.event(&e)?;
            }
        }
    }
    sink.finish()
}
