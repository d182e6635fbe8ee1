//! `demo`: the real incident log that ships with eventlog, imported into a fresh store,
//! replayed, delivered to a subscription, counted and verified, in a few lines.

use crate::error::{open_error, publish_error, read_error, CliError, Code};
use crate::import::{import_from, maybe_gunzip, ImportOptions, BATCH_EVENTS_DEFAULT};
use crate::output::{bytes, count, rate, time_text, Out};
use crate::Context;
use eventlog::publisher::{HandlerError, Publisher, SubscriptionOptions};
use eventlog::store::{Direction, EventRef, Options, Store};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first 500 incidents of the UCI incident management log (3,411 events), as JSON
/// lines, gzip'ed; see `examples/data/README.md` for its source and licence.
const DATA: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/data/uci_incidents_first500.jsonl.gz"
));
const SUBSCRIPTION: &str = "demo-type-counter";
/// How long the demo waits for its subscription to catch up.
const SUBSCRIPTION_WAIT: Duration = Duration::from_secs(60);

/// A fresh directory for the store: `--dir` if given (new or empty), else a new folder
/// under the system's temporary directory.
fn store_dir(ctx: &Context) -> Result<PathBuf, CliError> {
    let io = |dir: &Path, e: std::io::Error| {
        CliError::new(
            Code::NotFound,
            format!("cannot create {}: {e}", dir.display()),
        )
    };
    if ctx.dir_given {
        let dir = ctx.dir.clone();
        if dir.exists() {
            let empty = std::fs::read_dir(&dir)
                .map(|mut entries| entries.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(CliError::new(
                    Code::Usage,
                    format!("{} is not an empty directory; the demo imports into a fresh store: give a new or empty --dir, or none for a temporary folder", dir.display()),
                ));
            }
        } else {
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        }
        return Ok(dir);
    }
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let dir = std::env::temp_dir().join(format!("eventlog-demo-{}-{unique}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| io(&dir, e))?;
    Ok(dir)
}

/// What a replay of the whole log finds per aggregate.
#[derive(Default)]
struct AggregateFacts {
    events: u64,
    last_ts: i64,
    /// The first version whose time is earlier than the one before it.
    goes_back_at: Option<u64>,
}

/// `2016-02-29 01:23:00` (the data has minute precision and no zone).
fn short_time(timestamp_us: i64) -> String {
    let t = time_text(timestamp_us);
    t.get(..19).map_or(t.clone(), |s| s.replace('T', " "))
}

pub fn demo(ctx: &Context) -> Result<(), CliError> {
    let started = Instant::now();
    let dir = store_dir(ctx)?;
    let d = dir.display();
    let mut out = Out::new();
    out.line(&format!(
        "eventlog demo: a real IT incident log (UCI, CC BY 4.0; Amaral, Fantinato, Peres 2018) into a new store at {d}"
    ))?;
    out.flush()?;
    let store = Store::open(&dir, Options::default()).map_err(|e| open_error(&dir, e))?;

    // Import, through the same code as `eventlog import`.
    let options = ImportOptions {
        source: "the demo data".into(),
        skip_invalid: false,
        batch_events: BATCH_EVENTS_DEFAULT as usize,
    };
    let s = import_from(
        &store,
        maybe_gunzip(DATA, "the demo data")?,
        &options,
        &mut |_| {},
    )?;
    out.line(&format!(
        "imported {} events of {} incidents in {:.2} s ({} events/s), as {} atomic appends, each fsync'ed before it returned",
        count(s.events),
        count(s.aggregates),
        s.seconds,
        rate(s.events, s.seconds),
        count(s.appends)
    ))?;

    // Replay the whole log: what each aggregate looks like.
    let replay_started = Instant::now();
    let mut facts: HashMap<String, AggregateFacts> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut types: BTreeMap<String, u64> = BTreeMap::new();
    let mut replayed = 0u64;
    for item in store.read_all(0, usize::MAX) {
        let stored = item.map_err(read_error)?;
        let e = stored.event().map_err(read_error)?;
        replayed += 1;
        *types.entry(e.event_type.to_string()).or_default() += 1;
        let f = match facts.get_mut(e.aggregate_id) {
            Some(f) => f,
            None => {
                order.push(e.aggregate_id.to_string());
                facts.entry(e.aggregate_id.to_string()).or_default()
            }
        };
        if f.events > 0 && e.timestamp_us < f.last_ts && f.goes_back_at.is_none() {
            f.goes_back_at = Some(e.version);
        }
        f.events += 1;
        f.last_ts = e.timestamp_us;
    }
    let replay_seconds = replay_started.elapsed().as_secs_f64();
    out.line(&format!(
        "replayed all {} events from the log in {:.1} ms ({} events/s)",
        count(replayed),
        replay_seconds * 1e3,
        rate(replayed, replay_seconds)
    ))?;

    // Three histories: the first incident, one whose clock goes back, the longest.
    let mut shown: Vec<(String, String)> = Vec::new();
    if let Some(first) = order.first() {
        shown.push((first.clone(), "the first incident".into()));
    }
    if let Some(back) = order.iter().find(|a| facts[*a].goes_back_at.is_some()) {
        let at = facts[back].goes_back_at.unwrap_or(0);
        shown.push((
            back.clone(),
            format!("its time goes backwards at version {at}, as in the source"),
        ));
    }
    if let Some(longest) = order
        .iter()
        .max_by_key(|a| (facts[*a].events, std::cmp::Reverse(*a)))
    {
        shown.push((longest.clone(), "the longest history".into()));
    }
    shown.dedup_by(|a, b| a.0 == b.0);
    for (aggregate, why) in &shown {
        out.line(&format!(
            "history of {aggregate} ({why}, {} events):",
            facts[aggregate].events
        ))?;
        let mut previous: Option<i64> = None;
        for item in store
            .read_aggregate(aggregate, 1, Direction::Forward, usize::MAX)
            .map_err(read_error)?
        {
            let stored = item.map_err(read_error)?;
            let e = stored.event().map_err(read_error)?;
            let back = previous.is_some_and(|p| e.timestamp_us < p);
            out.line(&format!(
                "  v{:<3} {}  {}{}",
                e.version,
                short_time(e.timestamp_us),
                e.event_type,
                if back {
                    "   <- earlier than the event before"
                } else {
                    ""
                }
            ))?;
            previous = Some(e.timestamp_us);
        }
    }
    out.flush()?;

    // A durable subscription, run to completion: events per type.
    let publisher = Publisher::open(&store).map_err(publish_error)?;
    let counts: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let sink = Arc::clone(&counts);
    let sub_started = Instant::now();
    let sub = publisher
        .subscribe(
            SUBSCRIPTION,
            SubscriptionOptions::default(),
            move |e: &EventRef<'_>, _attempt: u32| {
                *sink.lock().entry(e.event_type.to_string()).or_default() += 1;
                Ok::<(), HandlerError>(())
            },
        )
        .map_err(publish_error)?;
    if let Some(last) = store.next_seq().checked_sub(1) {
        if !sub.wait_until_handled(last, SUBSCRIPTION_WAIT) {
            return Err(CliError::new(
                Code::Internal,
                format!(
                    "the demo subscription did not catch up within {} s",
                    SUBSCRIPTION_WAIT.as_secs()
                ),
            ));
        }
    }
    let sub_seconds = sub_started.elapsed().as_secs_f64();
    sub.stop(SUBSCRIPTION_WAIT).map_err(publish_error)?;
    let delivered = sub.stats().delivered;
    let by_count = most_first(counts.lock().clone());
    out.line(&format!(
        "subscription {SUBSCRIPTION} handled {} events in {:.2} s, by type: {}",
        count(delivered),
        sub_seconds,
        by_count
            .iter()
            .map(|(t, n)| format!("{t} {}", count(*n)))
            .collect::<Vec<_>>()
            .join(", ")
    ))?;
    if by_count != most_first(types) {
        return Err(CliError::new(
            Code::Internal,
            "the subscription's counts differ from the replay's",
        ));
    }

    // Stats and verification.
    let st = store.stats().map_err(read_error)?;
    let ss = sub.stats();
    let sub_text = format!(
        "; subscription {SUBSCRIPTION}: checkpoint {}, lag {}, {} dead letters",
        ss.checkpoint, ss.lag_events, ss.dead_letters
    );
    out.line(&format!(
        "stats: head seq {}, {} events, {} aggregates, {} types, {} {}, {} of log, index lag {} (indexed in memory, written to sled in the background){sub_text}",
        st.head_seq.map_or("-".into(), |h| h.to_string()),
        count(st.event_count),
        count(st.aggregate_count),
        count(st.type_count),
        st.segment_count,
        if st.segment_count == 1 { "segment" } else { "segments" },
        bytes(st.log_bytes),
        count(st.index_lag_events)
    ))?;
    let verify_started = Instant::now();
    let report = store.verify(|_, _| {}).map_err(read_error)?;
    if !report.is_clean() {
        return Err(CliError::new(
            Code::Corrupt,
            format!(
                "verify found {} problems, the first: {}",
                report.problem_count,
                report.problems.first().map_or("", String::as_str)
            ),
        ));
    }
    out.line(&format!(
        "verify: every checksum, seq, version chain and index entry of {} events checked in {:.1} ms: clean",
        count(report.events_checked),
        verify_started.elapsed().as_secs_f64() * 1e3
    ))?;
    drop(publisher);
    drop(store);
    out.line(&format!(
        "done in {:.2} s. The store stays in {d}: try `eventlog --dir {d} read --aggregate INC0000137 --pretty`",
        started.elapsed().as_secs_f64()
    ))?;
    out.flush()
}

/// Counts, largest first (ties by name).
fn most_first(counts: BTreeMap<String, u64>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}
