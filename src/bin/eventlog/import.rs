//! `import` and `export`: events as JSON lines, in and out.
//!
//! Import appends the lines in file order, so each aggregate's versions follow the order
//! of its lines. Lines are grouped into atomic appends of `--batch-events` events
//! (`append_batch`, one `fdatasync` each); consecutive lines of one aggregate become one
//! request of the batch. A bad line is found before its batch is written, so everything
//! before it is stored and nothing after it.

use crate::error::{append_error, read_error, CliError, Code};
use crate::output::{self, count, note, rate, Out};
use crate::{Context, ExportArgs, ImportArgs};
use eventlog::store::{
    AppendError, AppendRequest, ExpectedVersion, NewEvent, Store, EVENTS_PER_APPEND_MAX_DEFAULT,
    METADATA_SIZE_BYTES_MAX, PAYLOAD_SIZE_BYTES_MAX_DEFAULT,
};
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Events per atomic append by default: large enough that the `fdatasync` per append
/// costs little per event, small enough that a bad line is found quickly.
pub const BATCH_EVENTS_DEFAULT: u64 = 1_000;
/// Most events per append: the store's limit.
pub const BATCH_EVENTS_MAX: usize = EVENTS_PER_APPEND_MAX_DEFAULT;
/// Longest import line. A longer one cannot hold an event within the store's payload
/// limit (1 MiB, 1.4 MiB as base64) and is refused without being read into memory whole.
const LINE_BYTES_MAX: usize = 16 << 20;
/// How often (in lines) the progress bar is updated.
const PROGRESS_EVERY_LINES: u64 = 1_024;

/// How an import runs.
pub struct ImportOptions {
    /// Names the input in messages ("events.jsonl", "stdin").
    pub source: String,
    pub skip_invalid: bool,
    pub batch_events: usize,
}

/// What an import did.
#[derive(Debug, Clone, Default)]
pub struct ImportSummary {
    /// Events accepted from the input.
    pub events: u64,
    /// Events newly stored (fewer than `events` when some were retries of stored ones).
    pub stored: u64,
    /// Distinct aggregates among the events.
    pub aggregates: u64,
    /// Bad lines skipped (with `skip_invalid`).
    pub skipped: u64,
    /// Atomic appends made.
    pub appends: u64,
    pub seconds: f64,
}

/// Counts the bytes read through it (the compressed bytes, for a gzip file).
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The UTF-8 byte order mark.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Wraps a reader, decompressing it if it starts with the gzip magic bytes.
pub fn maybe_gunzip<'a, R: Read + 'a>(
    reader: R,
    source: &str,
) -> Result<Box<dyn BufRead + 'a>, CliError> {
    // Two bytes, however the input hands them over (a pipe may give one at a time).
    let mut reader = reader;
    let mut magic = [0u8; 2];
    let mut have = 0;
    while have < magic.len() {
        match reader.read(&mut magic[have..]) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(source, &e, "reading")),
        }
    }
    let is_gzip = magic == [0x1f, 0x8b];
    let head = std::io::Cursor::new(magic).take(have as u64);
    let buffered = BufReader::with_capacity(256 << 10, head.chain(reader));
    if is_gzip {
        Ok(Box::new(BufReader::with_capacity(
            256 << 10,
            flate2::bufread::MultiGzDecoder::new(buffered),
        )))
    } else {
        Ok(Box::new(buffered))
    }
}

fn io_error(source: &str, e: &std::io::Error, doing: &str) -> CliError {
    CliError::new(
        Code::NotFound,
        format!("cannot read import file {source} ({doing}): {e}; check the path and that it is a readable file"),
    )
}

pub fn import(ctx: &Context, args: ImportArgs) -> Result<(), CliError> {
    let counter = Arc::new(AtomicU64::new(0));
    // Open the input before the store, so that a wrong path creates nothing.
    let (source, raw, total): (String, Box<dyn Read>, Option<u64>) = if args.file == "-" {
        ("stdin".into(), Box::new(std::io::stdin().lock()), None)
    } else {
        let file = File::open(&args.file).map_err(|e| io_error(&args.file, &e, "opening"))?;
        let meta = file
            .metadata()
            .map_err(|e| io_error(&args.file, &e, "opening"))?;
        if meta.is_dir() {
            return Err(CliError::new(
                Code::NotFound,
                format!("cannot read import file {}: it is a directory; give a JSON-lines file, or - for stdin", args.file),
            ));
        }
        (args.file.clone(), Box::new(file), Some(meta.len()))
    };
    let input = maybe_gunzip(
        Counting {
            inner: raw,
            count: Arc::clone(&counter),
        },
        &source,
    )?;
    let store = ctx.open_or_create()?;
    let bar = output::progress(total, "importing", "bytes");
    let options = ImportOptions {
        source: source.clone(),
        skip_invalid: args.skip_invalid,
        batch_events: usize::try_from(args.batch_events).unwrap_or(BATCH_EVENTS_MAX),
    };
    let result = import_from(&store, input, &options, &mut |events| {
        bar.set_position(if total.is_some() {
            counter.load(Ordering::Relaxed)
        } else {
            events
        });
    });
    bar.finish_and_clear();
    let s = result?;
    let mut line = format!(
        "imported {} events of {} aggregates from {source} in {:.2} s ({} events/s)",
        count(s.events),
        count(s.aggregates),
        s.seconds,
        rate(s.events, s.seconds)
    );
    if s.skipped > 0 {
        line.push_str(&format!("; skipped {} invalid lines", count(s.skipped)));
    }
    if s.stored < s.events {
        line.push_str(&format!(
            "; {} of them were already stored (same event ids) and were not stored again",
            count(s.events - s.stored)
        ));
    }
    note(&line);
    Ok(())
}

/// Events waiting to be appended, with the line each came from.
#[derive(Default)]
struct Batch {
    lines: Vec<u64>,
    aggregates: Vec<String>,
    events: Vec<NewEvent>,
}

impl Batch {
    fn len(&self) -> usize {
        self.events.len()
    }

    fn drain_front(&mut self, n: usize) {
        self.lines.drain(..n);
        self.aggregates.drain(..n);
        self.events.drain(..n);
    }
}

struct Importer<'a> {
    store: &'a Store,
    options: &'a ImportOptions,
    batch: Batch,
    aggregates: HashSet<String>,
    summary: ImportSummary,
}

/// Imports JSON lines from `input` into `store`; `tick` is called with the number of
/// events read so far, now and then.
pub fn import_from(
    store: &Store,
    mut input: impl BufRead,
    options: &ImportOptions,
    tick: &mut dyn FnMut(u64),
) -> Result<ImportSummary, CliError> {
    let started = Instant::now();
    let next_seq_before = store.next_seq();
    let mut importer = Importer {
        store,
        options,
        batch: Batch::default(),
        aggregates: HashSet::new(),
        summary: ImportSummary::default(),
    };
    let mut buf = Vec::with_capacity(4096);
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = (&mut input)
            .take(LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut buf);
        let n = match n {
            Ok(n) => n,
            Err(e) => {
                importer.flush()?;
                return Err(CliError::new(
                    Code::NotFound,
                    format!(
                        "cannot read {} after line {line_no}: {e}; the {} events before it are stored",
                        options.source,
                        count(importer.summary.events)
                    ),
                ));
            }
        };
        if n == 0 {
            break;
        }
        line_no += 1;
        if line_no.is_multiple_of(PROGRESS_EVERY_LINES) {
            tick(importer.summary.events + importer.batch.len() as u64);
        }
        if buf.len() > LINE_BYTES_MAX {
            // Skip the rest of the line, so that --skip-invalid can go on after it.
            while !buf.ends_with(b"\n") {
                buf.clear();
                match (&mut input)
                    .take(LINE_BYTES_MAX as u64)
                    .read_until(b'\n', &mut buf)
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            importer.bad_line(
                line_no,
                &format!("line is longer than {} bytes", count(LINE_BYTES_MAX as u64)),
            )?;
            continue;
        }
        while buf.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
            buf.pop();
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // A byte order mark (Windows tools write one) is not part of the first event.
        let text = if line_no == 1 {
            buf.strip_prefix(UTF8_BOM).unwrap_or(&buf)
        } else {
            &buf
        };
        let parsed = std::str::from_utf8(text)
            .map_err(|e| format!("not UTF-8 text: {e}"))
            .and_then(|text| {
                eventlog::json::new_event_from_json_str(text).map_err(|e| e.to_string())
            })
            .and_then(|(aggregate, event)| check_sizes(&event).map(|()| (aggregate, event)));
        match parsed {
            Ok((aggregate, event)) => {
                importer.batch.lines.push(line_no);
                importer.batch.aggregates.push(aggregate);
                importer.batch.events.push(event);
                if importer.batch.len() >= options.batch_events {
                    importer.flush()?;
                }
            }
            Err(reason) => importer.bad_line(line_no, &reason)?,
        }
    }
    importer.flush()?;
    tick(importer.summary.events);
    let mut summary = importer.summary;
    summary.stored = store.next_seq() - next_seq_before;
    summary.aggregates = importer.aggregates.len() as u64;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The store's limits, checked per line so that a too large event is reported as its line.
fn check_sizes(e: &NewEvent) -> Result<(), String> {
    if e.payload.len() > PAYLOAD_SIZE_BYTES_MAX_DEFAULT {
        return Err(format!(
            "data is {} bytes, the limit is {} bytes",
            count(e.payload.len() as u64),
            count(PAYLOAD_SIZE_BYTES_MAX_DEFAULT as u64)
        ));
    }
    let metadata_bytes = e.metadata.len_bytes();
    if metadata_bytes > METADATA_SIZE_BYTES_MAX {
        return Err(format!(
            "metadata is {} bytes, the limit is {} bytes",
            count(metadata_bytes as u64),
            count(METADATA_SIZE_BYTES_MAX as u64)
        ));
    }
    Ok(())
}

impl Importer<'_> {
    /// A line that is not an event: skip it, or store what came before and stop.
    fn bad_line(&mut self, line_no: u64, reason: &str) -> Result<(), CliError> {
        if self.options.skip_invalid {
            self.summary.skipped += 1;
            note(&format!(
                "{} line {line_no}: skipped: {reason}",
                self.options.source
            ));
            return Ok(());
        }
        self.flush()?;
        Err(CliError::new(
            Code::Usage,
            format!(
                "{} line {line_no}: {reason}; the {} events before it are stored. {}",
                self.options.source,
                count(self.summary.events),
                rerun_hint(line_no)
            ),
        ))
    }

    /// Appends the first `n` events of the batch atomically.
    fn append(&self, n: usize) -> Result<(), AppendError> {
        let b = &self.batch;
        let mut requests = Vec::new();
        let mut start = 0;
        for i in 1..=n {
            if i == n || b.aggregates[i] != b.aggregates[start] {
                requests.push(AppendRequest {
                    aggregate_id: &b.aggregates[start],
                    expected: ExpectedVersion::Any,
                    events: &b.events[start..i],
                });
                start = i;
            }
        }
        self.store.append_batch(&requests).map(|_| ())
    }

    /// Stores the first `n` events of the batch, counting them.
    fn commit(&mut self, n: usize) -> Result<(), AppendError> {
        if n == 0 {
            return Ok(());
        }
        self.append(n)?;
        self.summary.appends += 1;
        let mut last: Option<&str> = None;
        for a in &self.batch.aggregates[..n] {
            if last != Some(a.as_str()) && !self.aggregates.contains(a) {
                self.aggregates.insert(a.clone());
            }
            last = Some(a);
        }
        self.summary.events += n as u64;
        self.batch.drain_front(n);
        Ok(())
    }

    /// Appends the batch. An event the store refuses is reported as its line; the events
    /// before it are stored first.
    fn flush(&mut self) -> Result<(), CliError> {
        while self.batch.len() > 0 {
            let n = self.batch.len();
            let err = match self.commit(n) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let Some(bad) = culprit(&err, &self.batch) else {
                let (first, last) = (self.batch.lines[0], self.batch.lines[n - 1]);
                let mut e = append_error(err);
                e.message = format!(
                    "{} lines {first}..={last} were not stored: {}; the {} events before them are stored",
                    self.options.source,
                    e.message,
                    count(self.summary.events)
                );
                return Err(e);
            };
            let line_no = self.batch.lines[bad];
            self.commit(bad).map_err(append_error)?;
            // The culprit is now first in the batch.
            if matches!(err, AppendError::DuplicateEventId { .. }) && self.stored_copy(0)? {
                // Stored by an earlier import that stopped part way (its appends ended
                // elsewhere than this run's batches): this event and the stored ones right
                // after it are counted as already stored, and the rest goes on.
                let mut n = 1;
                while n < self.batch.len() && self.stored_copy(n)? {
                    n += 1;
                }
                self.summary.events += n as u64;
                self.batch.drain_front(n);
                continue;
            }
            let reason = err.to_string();
            self.batch.drain_front(1);
            if self.options.skip_invalid {
                self.summary.skipped += 1;
                note(&format!(
                    "{} line {line_no}: skipped: {reason}",
                    self.options.source
                ));
            } else {
                let code = append_error(err).code;
                return Err(CliError::new(
                    code,
                    format!(
                        "{} line {line_no}: {reason}; the {} events before it are stored. {}",
                        self.options.source,
                        count(self.summary.events),
                        rerun_hint(line_no)
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Importer<'_> {
    /// Whether batch event `i` carries an id and is stored already under it, the same
    /// event (type, content type, payload: what makes an append a retry).
    fn stored_copy(&self, i: usize) -> Result<bool, CliError> {
        let asked = &self.batch.events[i];
        let Some(id) = asked.event_id else {
            return Ok(false);
        };
        let Some(stored) = self
            .store
            .read_event_id(&self.batch.aggregates[i], &id)
            .map_err(read_error)?
        else {
            return Ok(false);
        };
        let e = stored.event().map_err(read_error)?;
        Ok(e.event_type == asked.event_type
            && e.content_type == asked.content_type
            && e.payload == asked.payload.as_slice())
    }
}

/// What to do after a bad line: go on from the next one. (`--skip-invalid` from the start
/// would store again the events before it that carry no ids.)
fn rerun_hint(line_no: u64) -> String {
    format!(
        "Fix the line and import again from it on, or skip it and import the rest: `tail -n +{} FILE | eventlog import -` (`zcat FILE | tail ...` if it is gzipped). Lines with ids that are already stored are recognized; lines without ids would be stored twice",
        line_no + 1
    )
}

/// The index in `batch` of the event an append error is about, when it names one.
fn culprit(e: &AppendError, batch: &Batch) -> Option<usize> {
    match e {
        AppendError::PayloadTooLarge { index, .. }
        | AppendError::MetadataTooLarge { index, .. } => Some(*index).filter(|&i| i < batch.len()),
        AppendError::InvalidName { value, .. } => (0..batch.len()).find(|&i| {
            batch.aggregates[i].starts_with(value.as_str())
                || batch.events[i].event_type.starts_with(value.as_str())
        }),
        AppendError::DuplicateEventId {
            aggregate_id,
            event_id,
            ..
        } => {
            let same: Vec<usize> = (0..batch.len())
                .filter(|&i| {
                    &batch.aggregates[i] == aggregate_id
                        && batch.events[i].event_id == Some(*event_id)
                })
                .collect();
            // Twice in this batch: the second is the duplicate; once: it clashes with a
            // stored event.
            same.get(1).or(same.first()).copied()
        }
        _ => None,
    }
}

pub fn export(ctx: &Context, args: ExportArgs) -> Result<(), CliError> {
    if ctx.pretty {
        return Err(CliError::new(
            Code::Usage,
            "export writes JSON lines for `eventlog import`, not tables; use `eventlog read --all --pretty` to look at events",
        ));
    }
    if args.to.is_some_and(|to| to < args.from) {
        return Err(CliError::new(
            Code::Usage,
            "--to is before --from; give --to at or after --from (both are inclusive)",
        ));
    }
    let store = ctx.open_existing()?;
    let end = store
        .next_seq()
        .min(args.to.map_or(u64::MAX, |t| t.saturating_add(1)));
    let total = end.saturating_sub(args.from);
    let limit = usize::try_from(total).unwrap_or(usize::MAX);
    let bar = output::progress(Some(total), "exporting", "events");
    let mut out = Out::new();
    for (i, item) in store.read_all(args.from, limit).enumerate() {
        let stored = item.map_err(read_error)?;
        let e = stored.event().map_err(read_error)?;
        out.event(&e)?;
        if i % 4096 == 0 {
            bar.set_position(i as u64);
        }
    }
    bar.finish_and_clear();
    out.flush()
}
