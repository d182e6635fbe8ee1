//! The publisher: catching up over stored events with a no-op handler, and live delivery
//! latency from an append returning to the handler starting.
//!
//! `cargo bench --bench publisher -- [--events N] [--reps N]`

use eventlog::publisher::{HandlerError, Publisher, SubscriptionOptions};
use eventlog::store::{AppendRequest, EventRef, ExpectedVersion, NewEvent, Options, Store};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn arg(name: &str, default: u64) -> u64 {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let events = arg("--events", 1_000_000);
    let reps = arg("--reps", 3) as usize;
    let base = std::env::var("EVENTLOG_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::current_dir().unwrap().join("target"));
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let store = Store::open(dir.path(), Options::default()).unwrap();
    let payload = vec![b'x'; 200];
    let aggs: Vec<String> = (0..100_000).map(|i| format!("agg-{i:06}")).collect();
    let mut x = 88172645463325252u64;
    let mut done = 0;
    while done < events {
        let n = 1000.min(events - done);
        let evs: Vec<(usize, NewEvent)> = (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (
                    (x % 100_000) as usize,
                    NewEvent::binary(format!("Type{:02}", (done + i) % 20), payload.clone()),
                )
            })
            .collect();
        let reqs: Vec<AppendRequest<'_>> = evs
            .iter()
            .map(|(a, e)| AppendRequest {
                aggregate_id: &aggs[*a],
                expected: ExpectedVersion::Any,
                events: std::slice::from_ref(e),
            })
            .collect();
        store.append_batch(&reqs).unwrap();
        done += n;
    }
    let publisher = Publisher::open(&store).unwrap();

    // 1. Catch-up from seq 0 with a no-op handler, checkpoints included.
    // Two clocks: from the `subscribe` call (opening the subscription's dead-letter log
    // and checkpoint, starting its thread: a one-time cost) and from its return.
    let mut rates = Vec::new();
    let mut rates_with_start = Vec::new();
    let mut start_ms = Vec::new();
    for rep in 0..reps {
        let name = format!("catchup{rep}");
        let called = Instant::now();
        let sub = publisher
            .subscribe(
                &name,
                SubscriptionOptions::default(),
                |_: &EventRef<'_>, _: u32| Ok::<(), HandlerError>(()),
            )
            .unwrap();
        let returned = Instant::now();
        assert!(sub.wait_until_handled(events - 1, Duration::from_secs(600)));
        let done = Instant::now();
        sub.stop(Duration::from_secs(60)).unwrap();
        assert_eq!(sub.stats().checkpoint, events);
        rates.push(events as f64 / (done - returned).as_secs_f64());
        rates_with_start.push(events as f64 / (done - called).as_secs_f64());
        start_ms.push((returned - called).as_secs_f64() * 1e3);
    }

    // 2. Live delivery latency, idle subscription, one durable append at a time.
    let started_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let sink = started_at.clone();
    let sub = publisher
        .subscribe(
            "live",
            SubscriptionOptions::default(),
            move |_: &EventRef<'_>, _: u32| {
                sink.lock().unwrap().push(Instant::now());
                Ok::<(), HandlerError>(())
            },
        )
        .unwrap();
    assert!(sub.wait_until_handled(events - 1, Duration::from_secs(600)));
    started_at.lock().unwrap().clear();
    let samples = 2000;
    let mut latencies_us = Vec::with_capacity(samples);
    for i in 0..samples {
        std::thread::sleep(Duration::from_micros(500));
        let a = store
            .append(
                "live-agg",
                ExpectedVersion::Any,
                &[NewEvent::binary("Live", vec![1u8; 64])],
            )
            .unwrap();
        let returned = Instant::now();
        assert!(sub.wait_until_handled(a.last_seq, Duration::from_secs(10)));
        let handler_start = started_at.lock().unwrap()[i];
        // The handler may start before `append` returns (it is woken by the commit);
        // that counts as zero latency.
        latencies_us.push(
            handler_start
                .saturating_duration_since(returned)
                .as_secs_f64()
                * 1e6,
        );
    }
    latencies_us.sort_by(|a, b| a.total_cmp(b));
    println!("| publisher workload ({events} stored events, 200 B payloads) | result |");
    println!("|---|---:|");
    println!("| catch-up with a no-op handler (median of {reps}, checkpoints included) | {:.0} events/s |", median(rates));
    println!("| the same, counting `subscribe` itself (opens the dead-letter log, starts the thread) | {:.0} events/s |", median(rates_with_start));
    println!("| `subscribe` call | {:.1} ms |", median(start_ms));
    println!(
        "| live delivery latency p50 (append returned -> handler start) | {:.0} us |",
        latencies_us[samples / 2]
    );
    println!(
        "| live delivery latency p99 | {:.0} us |",
        latencies_us[samples * 99 / 100]
    );
}
