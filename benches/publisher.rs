//! The publisher: catching up over stored events with a no-op handler, and live delivery
//! latency from an append returning to the handler starting.
//!
//! `cargo bench --bench publisher -- [--events N] [--reps N]`
//!
//! For quick A/B runs of two builds: `--store DIR` keeps the stored events in `DIR` and
//! reuses them on the next run (skipping the appends; `--events` is then what `DIR` holds),
//! and `--live-samples 0` skips the latency part.

use eventlog::publisher::{HandlerError, Publisher, SubscriptionOptions};
use eventlog::store::{AppendRequest, EventRef, ExpectedVersion, NewEvent, Options, Store};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the latency part appends an event (the subscription is idle in between).
const LIVE_PERIOD: Duration = Duration::from_millis(5);

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
    let live_samples = arg("--live-samples", 2000) as usize;
    let kept: Option<std::path::PathBuf> = std::env::args()
        .skip_while(|a| a != "--store")
        .nth(1)
        .map(Into::into);
    let base = std::env::var("EVENTLOG_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::current_dir().unwrap().join("target"));
    std::fs::create_dir_all(&base).unwrap();
    let temp = tempfile::tempdir_in(&base).unwrap();
    let dir = kept.clone().unwrap_or_else(|| temp.path().to_path_buf());
    let store = Store::open(&dir, Options::default()).unwrap();
    let reused = kept.is_some() && store.next_seq() > 0;
    let events = if reused { store.next_seq() } else { events };
    let payload = vec![b'x'; 200];
    let aggs: Vec<String> = (0..100_000).map(|i| format!("agg-{i:06}")).collect();
    let mut x = 88172645463325252u64;
    let mut done = if reused { events } else { 0 };
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
    let mut cpu_ns_per_event = Vec::new();
    let mut runnable_ms = Vec::new();
    for rep in 0..reps {
        let name = format!("catchup{rep}");
        if reused {
            publisher.set_checkpoint(&name, 0).unwrap();
        }
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
        if let Some((on_cpu_ns, waiting_ns)) = worker_schedstat(&name) {
            cpu_ns_per_event.push(on_cpu_ns as f64 / events as f64);
            runnable_ms.push(waiting_ns as f64 / 1e6);
        }
        sub.stop(Duration::from_secs(60)).unwrap();
        assert_eq!(sub.stats().checkpoint, events);
        rates.push(events as f64 / (done - returned).as_secs_f64());
        rates_with_start.push(events as f64 / (done - called).as_secs_f64());
        start_ms.push((returned - called).as_secs_f64() * 1e3);
    }

    // 2. Live delivery latency, idle subscription, one durable append at a time.
    let mut latencies_us = if live_samples > 0 {
        live_latencies_us(&store, &publisher, events, live_samples)
    } else {
        Vec::new()
    };
    latencies_us.sort_by(|a, b| a.total_cmp(b));
    println!("| publisher workload ({events} stored events, 200 B payloads) | result |");
    println!("|---|---:|");
    println!("| catch-up with a no-op handler (median of {reps}, checkpoints included) | {:.0} events/s |", median(rates.clone()));
    println!("| the same, counting `subscribe` itself (opens the dead-letter log, starts the thread) | {:.0} events/s |", median(rates_with_start.clone()));
    println!("| `subscribe` call | {:.1} ms |", median(start_ms));
    let each = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{:.2}", r / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| each rep, counting `subscribe` (millions of events/s) | {} |",
        each(&rates_with_start)
    );
    println!(
        "| each rep, from its return (millions of events/s) | {} |",
        each(&rates)
    );
    if !cpu_ns_per_event.is_empty() {
        // Less noisy than the rates on a shared machine: preemption does not count.
        println!(
            "| catch-up worker thread on-CPU time per event (median) | {:.0} ns |",
            median(cpu_ns_per_event)
        );
        println!(
            "| ... and time it was runnable but waiting for a CPU (median) | {:.1} ms |",
            median(runnable_ms)
        );
    }
    if let (Some(p50), Some(p99)) = (
        latencies_us.get(live_samples / 2),
        latencies_us.get(live_samples * 99 / 100),
    ) {
        println!("| live delivery latency p50 (append returned -> handler start) | {p50:.0} us |");
        println!("| live delivery latency p99 | {p99:.0} us |");
    }
}

/// Append-returned to handler-start latencies of `samples` single durable appends to an
/// idle subscription, in microseconds.
fn live_latencies_us(
    store: &Store,
    publisher: &Publisher,
    events: u64,
    samples: usize,
) -> Vec<f64> {
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
    // Appends on a fixed schedule, one every LIVE_PERIOD, and the check that the previous
    // one was handled comes at the next slot (by then it long was): neither how often
    // appends come nor when this thread runs depends on how `wait_until_handled` wakes
    // its caller, only the delivery path is measured.
    let mut appended: Vec<(u64, Instant)> = Vec::with_capacity(samples);
    let first_slot = Instant::now();
    for i in 0..samples {
        let slot = first_slot + LIVE_PERIOD * (i as u32 + 1);
        std::thread::sleep(slot.saturating_duration_since(Instant::now()));
        if let Some(&(seq, _)) = appended.last() {
            assert!(sub.wait_until_handled(seq, Duration::from_secs(10)));
        }
        let a = store
            .append(
                "live-agg",
                ExpectedVersion::Any,
                &[NewEvent::binary("Live", vec![1u8; 64])],
            )
            .unwrap();
        appended.push((a.last_seq, Instant::now()));
    }
    let last = appended.last().map_or(0, |a| a.0);
    assert!(sub.wait_until_handled(last, Duration::from_secs(10)));
    let started_at = started_at.lock().unwrap();
    assert_eq!(started_at.len(), samples, "one delivery per append");
    // The handler may start before `append` returns (it is woken by the commit); that
    // counts as zero latency.
    started_at
        .iter()
        .zip(&appended)
        .map(|(start, (_, returned))| {
            start.saturating_duration_since(*returned).as_secs_f64() * 1e6
        })
        .collect()
}

/// The on-CPU and runnable-but-waiting nanoseconds of subscription `name`'s worker thread
/// (Linux `/proc/self/task/*/schedstat`), if it can be found.
fn worker_schedstat(name: &str) -> Option<(u64, u64)> {
    // Thread names are cut to 15 bytes.
    let comm: String = format!("eventlog-sub-{name}").chars().take(15).collect();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let path = task.path();
        if std::fs::read_to_string(path.join("comm")).ok()?.trim_end() != comm {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("schedstat")).ok()?;
        let mut fields = stat.split_whitespace().map(|f| f.parse::<u64>().ok());
        return Some((fields.next()??, fields.next()??));
    }
    None
}
