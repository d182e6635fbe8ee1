//! The hidden `__child` subcommand: every measured workload runs in a process of its own,
//! so that one store's memory, threads and caches never touch another's figures.
//! Arguments are `key=value`; the result is one `RESULT key=value ...` line on stdout.

use crate::common::{
    dir_bytes, peak_rss_bytes, quantile, read_real, AnonPeak, Gen, Item, READ_TYPE,
};
use crate::stores::{self, Durability};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Barrier;
use std::time::{Duration, Instant};

pub struct Args(HashMap<String, String>);

impl Args {
    pub fn parse(args: &[String]) -> Args {
        Args(
            args.iter()
                .filter_map(|a| a.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn s(&self, k: &str) -> &str {
        self.0
            .get(k)
            .unwrap_or_else(|| panic!("child: missing {k}"))
    }

    fn u(&self, k: &str) -> u64 {
        self.s(k)
            .parse()
            .unwrap_or_else(|_| panic!("child: {k} not a number"))
    }

    fn f(&self, k: &str) -> f64 {
        self.s(k)
            .parse()
            .unwrap_or_else(|_| panic!("child: {k} not a number"))
    }

    fn path(&self, k: &str) -> PathBuf {
        PathBuf::from(self.s(k))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn gen(&self) -> Gen {
        Gen::new(
            self.u("seed"),
            self.u("aggregates"),
            self.u("types"),
            self.u("payload") as usize,
        )
    }
}

fn result(pairs: &[(&str, String)]) {
    let line: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut out = std::io::stdout().lock();
    writeln!(out, "RESULT {}", line.join(" ")).expect("stdout");
    out.flush().expect("stdout");
}

pub fn main(kind: &str, args: &[String]) {
    // Die with the parent: no orphan keeps appending if the bench is stopped.
    // SAFETY: prctl with an integer argument; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    let a = Args::parse(args);
    match kind {
        "stage" => stage(&a),
        "append" => append(&a),
        "append_threads" => append_threads(&a),
        "reopen" => reopen(&a),
        "reads" => reads(&a),
        "single" => single(&a),
        "import" => import(&a),
        _ => panic!("unknown child kind {kind}"),
    }
}

/// Frames the eventlog encoding of a workload into `out`, for the raw store: the events
/// go through a scratch eventlog store (Durability::None) and its records' payloads are
/// framed again exactly as the log frames them, in appends of `batch`.
fn stage(a: &Args) {
    let out = a.path("out");
    let scratch = out.join("scratch");
    let _ = std::fs::remove_dir_all(&scratch);
    let mut options = eventlog::store::Options::default();
    options.log.durability = eventlog::log::Durability::None;
    let store = eventlog::store::Store::open(&scratch, options).expect("scratch store");
    let batch = a.u("batch") as usize;
    let push = |items: &[Item]| {
        let requests: Vec<_> = items
            .iter()
            .map(|it| eventlog::store::AppendRequest {
                aggregate_id: &it.aggregate,
                expected: eventlog::store::ExpectedVersion::Any,
                events: std::slice::from_ref(&it.event),
            })
            .collect();
        store.append_batch(&requests).expect("scratch append");
    };
    match a.s("kind") {
        "synthetic" => {
            let mut g = a.gen();
            let n = a.u("events");
            let mut done = 0;
            while done < n {
                let k = (batch as u64).min(n - done) as usize;
                push(&g.batch(k));
                done += k as u64;
            }
        }
        "real" => {
            for chunk in read_real(&a.path("file")).chunks(batch) {
                push(chunk);
            }
        }
        k => panic!("stage kind {k}"),
    }
    let records = stores::write_staged(
        &out,
        store
            .read_all(0, usize::MAX)
            .map(|e| e.expect("scratch read").raw().to_vec()),
        batch,
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&scratch);
    result(&[("records", records.to_string())]);
}

/// Batched append of `events`; prints `DONE` with the time spent in append calls and the
/// peak RSS; then, with `continue=1`, keeps appending until killed.
fn append(a: &Args) {
    let store = a.s("store");
    let dir = a.path("dir");
    let durability = Durability::parse(a.s("durability"));
    let n = a.u("events");
    let anon = AnonPeak::start();
    if store == "raw" {
        let staged = stores::read_staged(&a.path("stage"));
        assert!(staged.records >= n, "staged records");
        let (secs, records) = stores::raw_append(&dir, &staged, durability, n);
        result(&[
            ("secs", secs.to_string()),
            ("events", records.to_string()),
            ("vmhwm", peak_rss_bytes().to_string()),
            ("anon_peak", anon.peak().to_string()),
            ("cpu_secs", crate::common::cpu_secs().to_string()),
            ("last_agg", "-".into()),
        ]);
        return;
    }
    let batch = a.u("batch") as usize;
    let mut g = a.gen();
    let db = stores::open(store, &dir, durability);
    let mut w = db.appender();
    let cpu0 = crate::common::cpu_secs();
    let mut secs = 0.0;
    let mut done = 0u64;
    let mut last_agg = String::new();
    while done < n {
        let k = (batch as u64).min(n - done) as usize;
        let items = g.batch(k);
        let t = Instant::now();
        w.append(&items);
        secs += t.elapsed().as_secs_f64();
        done += k as u64;
        last_agg = items
            .last()
            .map(|i| i.aggregate.clone())
            .unwrap_or_default();
    }
    let vmhwm = peak_rss_bytes();
    let anon_peak = anon.peak();
    result(&[
        ("secs", secs.to_string()),
        ("events", done.to_string()),
        ("vmhwm", vmhwm.to_string()),
        ("anon_peak", anon_peak.to_string()),
        ("cpu_secs", (crate::common::cpu_secs() - cpu0).to_string()),
        ("last_agg", last_agg),
    ]);
    if a.get("continue") == Some("1") {
        // Mid-append until the parent's SIGKILL (bounded in case it never comes).
        let until = Instant::now() + Duration::from_secs(600);
        while Instant::now() < until {
            let items = g.batch(batch);
            w.append(&items);
        }
        eprintln!("append child: never killed; exiting");
    }
    drop(w);
    drop(db);
}

/// Opens the store (recovering after the crash) and reads one aggregate's history: the
/// time until that first read answered.
fn reopen(a: &Args) {
    let store = a.s("store");
    let dir = a.path("dir");
    let agg = a.s("agg").to_string();
    let t = Instant::now();
    let mut db = stores::open(store, &dir, Durability::Sync);
    let read = db.read_aggregate(&agg);
    let secs = t.elapsed().as_secs_f64();
    let stored = db.stored();
    drop(db);
    result(&[
        ("secs", secs.to_string()),
        ("read", read.to_string()),
        ("stored", stored.to_string()),
    ]);
}

/// Warm reads: one untimed replay (page cache and the store's caches warm), then a timed
/// replay, a timed read of one type, and `samples` timed aggregate histories (after
/// 1,000 untimed ones).
fn reads(a: &Args) {
    let store = a.s("store");
    let dir = a.path("dir");
    let only_replay = a.get("only") == Some("replay");
    let anon = AnonPeak::start();
    if store == "raw" {
        let warm = stores::raw_replay(&dir);
        let t = Instant::now();
        let n = stores::raw_replay(&dir);
        let replay_secs = t.elapsed().as_secs_f64();
        assert_eq!(warm, n);
        result(&[
            ("replay_secs", replay_secs.to_string()),
            ("replay_events", n.to_string()),
            ("vmhwm", peak_rss_bytes().to_string()),
            ("anon_peak", anon.peak().to_string()),
            ("disk_bytes", dir_bytes(&dir).to_string()),
        ]);
        return;
    }
    let mut db = stores::open(store, &dir, Durability::Sync);
    db.settle();
    let stored = db.stored();
    let warm = db.replay();
    let t = Instant::now();
    let n = db.replay();
    let replay_secs = t.elapsed().as_secs_f64();
    assert_eq!(warm, n, "replays agree");
    assert_eq!(n, stored, "replay sees every stored event");
    let mut out = vec![
        ("replay_secs", replay_secs.to_string()),
        ("replay_events", n.to_string()),
    ];
    if !only_replay {
        let t = Instant::now();
        let k = db.read_type(READ_TYPE);
        out.push(("type_secs", t.elapsed().as_secs_f64().to_string()));
        out.push(("type_events", k.to_string()));
        let mut g = a.gen();
        let samples = a.u("samples") as usize;
        let mut total = 0u64;
        for _ in 0..1_000 {
            let agg = g.random_aggregate().to_string();
            db.read_aggregate(&agg);
        }
        let mut lat = Vec::with_capacity(samples);
        for _ in 0..samples {
            let agg = g.random_aggregate().to_string();
            let t = Instant::now();
            total += db.read_aggregate(&agg);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        lat.sort_by(f64::total_cmp);
        out.push(("p50_us", quantile(&lat, 0.5).to_string()));
        out.push(("p99_us", quantile(&lat, 0.99).to_string()));
        out.push((
            "agg_events_mean",
            (total as f64 / samples as f64).to_string(),
        ));
    }
    out.push(("vmhwm", peak_rss_bytes().to_string()));
    out.push(("anon_peak", anon.peak().to_string()));
    out.push(("stored", stored.to_string()));
    drop(db);
    out.push(("disk_bytes", dir_bytes(&dir).to_string()));
    result(&out);
}

/// Batched appends of `events` in all from `threads` threads at once, each appending its
/// share in appends of `batch` to random aggregates. The batches are generated before the
/// clock starts (unlike `append`, whose generation runs between its appends, untimed), so
/// the figure is the store's alone: events / the wall time from the threads' start to the
/// last one's end.
fn append_threads(a: &Args) {
    let store = a.s("store");
    let dir = a.path("dir");
    let threads = a.u("threads").max(1) as usize;
    let batch = a.u("batch").max(1) as usize;
    let per_thread = a.u("events") as usize / threads;
    let g = a.gen();
    let work: Vec<Vec<Vec<Item>>> = (0..threads)
        .map(|i| {
            let mut g = g.fork(2000 + i as u64);
            (0..per_thread.div_ceil(batch))
                .map(|b| g.batch(batch.min(per_thread - b * batch)))
                .collect()
        })
        .collect();
    let db = stores::open(store, &dir, Durability::Sync);
    let barrier = Barrier::new(threads + 1);
    let cpu0 = crate::common::cpu_secs();
    let elapsed = std::thread::scope(|s| {
        let handles: Vec<_> = work
            .iter()
            .map(|batches| {
                let mut w = db.appender();
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    for items in batches {
                        w.append(items);
                    }
                })
            })
            .collect();
        barrier.wait();
        let t = Instant::now();
        for h in handles {
            h.join().expect("appender thread");
        }
        t.elapsed().as_secs_f64()
    });
    result(&[
        ("secs", elapsed.to_string()),
        ("events", (per_thread * threads).to_string()),
        ("cpu_secs", (crate::common::cpu_secs() - cpu0).to_string()),
    ]);
}

/// Single-event durable appends from `threads` threads for `secs` seconds, to random
/// aggregates; every append's latency is recorded.
fn single(a: &Args) {
    let store = a.s("store");
    let dir = a.path("dir");
    let threads = a.u("threads") as usize;
    let dur = Duration::from_secs_f64(a.f("secs"));
    let barrier = Barrier::new(threads + 1);
    let g = a.gen();
    let (lat, elapsed, events) = if store == "raw" {
        let staged = stores::read_staged(&a.path("stage"));
        let mut first = vec![0u8; staged.ends[0] as usize];
        use std::os::unix::fs::FileExt;
        staged
            .bin
            .read_exact_at(&mut first, 0)
            .expect("read staged");
        let h = match eventlog::log::record::decode(&first, u32::MAX) {
            eventlog::log::record::Decoded::Record(h) => h,
            other => panic!("staged: {other:?}"),
        };
        let start = eventlog::log::record::RECORD_HEADER_SIZE_BYTES;
        let template = first[start..start + h.payload_len as usize].to_vec();
        let gc = stores::RawGroupCommit::create(&dir, template);
        let (lat, elapsed) = run_threads(threads, dur, &barrier, |_| || gc.append_one());
        let events = gc.records();
        (lat, elapsed, events)
    } else {
        let db = stores::open(store, &dir, Durability::Sync);
        let (lat, elapsed) = run_threads(threads, dur, &barrier, |i| {
            let mut w = db.appender();
            let mut g = g.fork(1000 + i as u64);
            move || {
                let item = g.item(crate::common::now_us());
                w.append(std::slice::from_ref(&item));
            }
        });
        let events = lat.len() as u64;
        drop(db);
        (lat, elapsed, events)
    };
    assert_eq!(events, lat.len() as u64);
    result(&[
        ("events", events.to_string()),
        ("secs", elapsed.to_string()),
        ("p50_us", quantile(&lat, 0.5).to_string()),
        ("p99_us", quantile(&lat, 0.99).to_string()),
        (
            "max_us",
            lat.last().copied().unwrap_or(f64::NAN).to_string(),
        ),
    ]);
}

/// Runs `threads` workers, each calling its `op` in a loop until `dur` has passed since
/// they all started; returns the sorted latencies in µs and the elapsed seconds.
fn run_threads<'a, M, F>(
    threads: usize,
    dur: Duration,
    barrier: &'a Barrier,
    make: M,
) -> (Vec<f64>, f64)
where
    M: Fn(usize) -> F,
    F: FnMut() + Send + 'a,
{
    std::thread::scope(|s| {
        let ops: Vec<F> = (0..threads).map(&make).collect();
        let handles: Vec<_> = ops
            .into_iter()
            .map(|mut op| {
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(1 << 16);
                    barrier.wait();
                    let deadline = Instant::now() + dur;
                    loop {
                        let t = Instant::now();
                        if t >= deadline {
                            break;
                        }
                        op();
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                    lat
                })
            })
            .collect();
        barrier.wait();
        let t = Instant::now();
        let mut lat: Vec<f64> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("appender thread"))
            .collect();
        let elapsed = t.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        (lat, elapsed)
    })
}

/// Imports the real data set in batches of `batch` (ExpectedVersion::Any): the time
/// spent in append calls (parsing is done first, untimed).
fn import(a: &Args) {
    let store = a.s("store");
    let dir = a.path("dir");
    if store == "raw" {
        let staged = stores::read_staged(&a.path("stage"));
        let (secs, records) = stores::raw_append(&dir, &staged, Durability::Sync, staged.records);
        result(&[("secs", secs.to_string()), ("events", records.to_string())]);
        return;
    }
    let items = read_real(&a.path("file"));
    let batch = a.u("batch") as usize;
    let db = stores::open(store, &dir, Durability::Sync);
    let mut w = db.appender();
    let mut secs = 0.0;
    for chunk in items.chunks(batch) {
        let t = Instant::now();
        w.append(chunk);
        secs += t.elapsed().as_secs_f64();
    }
    drop(w);
    let mut db = db;
    let stored = db.stored();
    assert_eq!(stored, items.len() as u64, "every event imported");
    drop(db);
    result(&[
        ("secs", secs.to_string()),
        ("events", items.len().to_string()),
        ("disk_bytes", dir_bytes(&dir).to_string()),
    ]);
}
