//! The store on the workload: batched durable appends of events with 200-byte
//! payloads over 100,000 aggregates and 20 types, then reads. Prints a table of medians.
//!
//! Then single-event appends that carry their own event ids (so each is checked for being a
//! retry) to one aggregate with a long history, against the same appends without ids.
//!
//! `cargo bench --bench store -- [--events N] [--reps N] [--aggregates N] [--id-history N]`

use eventlog::store::{AppendRequest, Direction, ExpectedVersion, NewEvent, Options, Store};
use std::time::Instant;
use uuid::Uuid;

struct Args {
    events: u64,
    reps: usize,
    aggregates: u64,
    id_history: u64,
}

fn args() -> Args {
    let mut a = Args {
        events: 1_000_000,
        reps: 3,
        aggregates: 100_000,
        id_history: 100_000,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let next = argv
            .get(i + 1)
            .and_then(|v| v.replace('_', "").parse::<u64>().ok());
        match (argv[i].as_str(), next) {
            ("--events", Some(n)) => a.events = n,
            ("--reps", Some(n)) => a.reps = n as usize,
            ("--aggregates", Some(n)) => a.aggregates = n,
            ("--id-history", Some(n)) => a.id_history = n,
            _ => {}
        }
        i += 1;
    }
    a
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let m = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            if m.is_dir() {
                total += dir_bytes(&e.path());
            } else {
                use std::os::unix::fs::MetadataExt;
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// What a projection reads of an event: its position, names and payload.
fn touch(ev: &eventlog::store::EventRef<'_>) -> u64 {
    ev.seq + ev.version + (ev.aggregate_id.len() + ev.event_type.len() + ev.payload.len()) as u64
}

/// Reads every event through `read_all` and decodes it; returns the count and a checksum of
/// what was touched. Checks the seqs are dense, so nothing is skipped.
fn replay(store: &Store) -> (u64, u64) {
    let mut n = 0u64;
    let mut sum = 0u64;
    for e in store.read_all(0, usize::MAX) {
        let e = e.unwrap();
        let ev = e.event().unwrap();
        assert_eq!(ev.seq, n);
        sum += touch(&ev);
        n += 1;
    }
    (n, sum)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Median latency (microseconds) of single-event durable appends to an aggregate that
/// already has `history` events, with their own ids (`with_ids`) or without: with ids,
/// every append is first checked for being a retry.
fn long_aggregate_append_us(base: &std::path::Path, history: u64, with_ids: bool) -> f64 {
    const APPENDS: u64 = 2_000;
    let dir = tempfile::tempdir_in(base).unwrap();
    let store = Store::open(dir.path(), Options::default()).unwrap();
    let mut next_id = 0u128;
    let mut event = |payload: &[u8]| {
        next_id += 1;
        let e = NewEvent::binary("Deposited", payload.to_vec());
        if with_ids {
            e.with_id(Uuid::from_u128(next_id))
        } else {
            e
        }
    };
    let payload = [b'x'; 200];
    let mut version = 0;
    while version < history {
        let n = 1000.min(history - version);
        let events: Vec<NewEvent> = (0..n).map(|_| event(&payload)).collect();
        store
            .append("account", ExpectedVersion::Exact(version), &events)
            .unwrap();
        version += n;
    }
    store.flush_index().unwrap();
    let mut lat = Vec::with_capacity(APPENDS as usize);
    for _ in 0..APPENDS {
        let e = [event(&payload)];
        let t = Instant::now();
        store
            .append("account", ExpectedVersion::Exact(version), &e)
            .unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        version += 1;
    }
    median(lat)
}

fn main() {
    let a = args();
    let base = std::env::var("EVENTLOG_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::current_dir().unwrap().join("target"));
    std::fs::create_dir_all(&base).unwrap();
    let payload = vec![b'x'; 200];
    let types: Vec<String> = (0..20).map(|t| format!("Type{t:02}")).collect();
    let mut append_rates = Vec::new();
    let mut replay_rates = Vec::new();
    let mut type_rates = Vec::new();
    let mut warm_replay_rates = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut bytes_per_event = Vec::new();
    let mut reopen_s = Vec::new();
    for rep in 0..a.reps {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let mut options = Options::default();
        if let Some(n) = std::env::var("EVENTLOG_BENCH_FLUSH_EVENTS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            options.index.flush_events = n;
            options.index.flush_interval_ms = 1_000_000;
        }
        let store = Store::open(dir.path(), options).unwrap();
        let mut rng = Rng(0x1234_5678 + rep as u64);
        let aggs: Vec<String> = (0..a.aggregates).map(|i| format!("agg-{i:07}")).collect();
        let started = Instant::now();
        let mut done = 0u64;
        while done < a.events {
            let n = 1000.min(a.events - done);
            let events: Vec<(usize, NewEvent)> = (0..n)
                .map(|_| {
                    let agg = (rng.next() % a.aggregates) as usize;
                    let ty = &types[(rng.next() % 20) as usize];
                    (agg, NewEvent::binary(ty.clone(), payload.clone()))
                })
                .collect();
            let requests: Vec<AppendRequest<'_>> = events
                .iter()
                .map(|(agg, e)| AppendRequest {
                    aggregate_id: &aggs[*agg],
                    expected: ExpectedVersion::Any,
                    events: std::slice::from_ref(e),
                })
                .collect();
            store.append_batch(&requests).unwrap();
            done += n;
        }
        let secs = started.elapsed().as_secs_f64();
        append_rates.push(a.events as f64 / secs);
        let rss_after_append = peak_rss_bytes();
        let lag = store.stats().unwrap().index_lag_events;

        // Replay everything, zero-copy: each event decoded (borrowed from the log's maps)
        // and its fields touched, as an application's projection would.
        let started = Instant::now();
        let (n, sum) = replay(&store);
        replay_rates.push(n as f64 / started.elapsed().as_secs_f64());
        assert_eq!(n, a.events);
        assert!(sum > 0);

        // One type from the start, the same way.
        let started = Instant::now();
        let mut n = 0u64;
        let mut sum = 0u64;
        for e in store.read_type("Type07", 0, usize::MAX).unwrap() {
            let e = e.unwrap();
            let ev = e.event().unwrap();
            assert_eq!(ev.event_type, "Type07");
            sum += touch(&ev);
            n += 1;
        }
        type_rates.push(n as f64 / started.elapsed().as_secs_f64());
        assert!(
            n > a.events / 40 && sum > 0,
            "about a twentieth of the events"
        );

        // The replay again, now that the maps are warm (no page faults).
        let started = Instant::now();
        let (n, _) = replay(&store);
        warm_replay_rates.push(n as f64 / started.elapsed().as_secs_f64());

        // Aggregate histories: 10,000 random aggregates, warm.
        let mut lat = Vec::with_capacity(10_000);
        for _ in 0..10_000 {
            let agg = &aggs[(rng.next() % a.aggregates) as usize];
            let t = Instant::now();
            let mut k = 0;
            for e in store
                .read_aggregate(agg, 1, Direction::Forward, usize::MAX)
                .unwrap()
            {
                let e = e.unwrap();
                k += e.event().unwrap().payload.len();
            }
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(
                k > 0 || a.events < 20 * a.aggregates,
                "an aggregate with no events at this density"
            );
        }
        lat.sort_by(|x, y| x.partial_cmp(y).unwrap());
        p50s.push(lat[lat.len() / 2]);
        p99s.push(lat[lat.len() * 99 / 100]);
        store.flush_index().unwrap();
        drop(store);
        bytes_per_event.push(dir_bytes(dir.path()) as f64 / a.events as f64);
        let t = Instant::now();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let _ = store.read_seq(a.events - 1).unwrap();
        reopen_s.push(t.elapsed().as_secs_f64());
        eprintln!("rep {rep}: append {:.0} ev/s, replay {:.0} ev/s, by type {:.0} ev/s, warm replay {:.0} ev/s (load average {}; index lag at end {lag}, peak RSS after append {} MB, {:?})", append_rates[rep], replay_rates[rep], type_rates[rep], warm_replay_rates[rep], load_average(), rss_after_append / 1_000_000, store.index_counters());
    }
    println!(
        "| workload ({} events, {} aggregates, 20 types, 200 B payload) | median of {} |",
        a.events, a.aggregates, a.reps
    );
    println!("|---|---:|");
    println!(
        "| batched durable append (1,000 per append_batch) | {:.0} events/s |",
        median(append_rates)
    );
    println!(
        "| full replay (read_all + zero-copy decode, first read after the appends) | {:.0} events/s |",
        median(replay_rates)
    );
    println!(
        "| full replay again, maps warm | {:.0} events/s |",
        median(warm_replay_rates)
    );
    println!(
        "| read one type from the start (read_type + zero-copy decode) | {:.0} events/s |",
        median(type_rates)
    );
    println!("| aggregate history read p50 | {:.1} us |", median(p50s));
    println!("| aggregate history read p99 | {:.1} us |", median(p99s));
    println!(
        "| disk bytes per event (log + index, allocated blocks) | {:.0} |",
        median(bytes_per_event)
    );
    println!(
        "| reopen after clean close until first read | {:.3} s |",
        median(reopen_s)
    );
    println!(
        "| peak RSS of the whole run | {:.0} MB |",
        peak_rss_bytes() as f64 / 1e6
    );
    // Alternated, so that both see the same disk.
    let (mut with_ids, mut without) = (Vec::new(), Vec::new());
    for _ in 0..a.reps {
        with_ids.push(long_aggregate_append_us(&base, a.id_history, true));
        without.push(long_aggregate_append_us(&base, a.id_history, false));
    }
    let (with_ids, without) = (median(with_ids), median(without));
    println!(
        "| single-event append to an aggregate of {} events, own event id (retry check) p50 | {:.1} us ({:.2}x the same without ids: {:.1} us) |",
        a.id_history,
        with_ids,
        with_ids / without,
        without
    );
    println!(
        "| load average at the end (1, 5, 15 min) | {} |",
        load_average()
    );
}
