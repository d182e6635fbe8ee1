//! The publisher: delivery, retry, dead letters, controls.

mod dead_letters;
mod lost_tail;

use crate::common::open_store;
use eventlog::publisher::{
    DeadLetterOptions, HandlerError, OnExhausted, Publisher, Redrive, RetryPolicy, Status,
    SubscriptionOptions,
};
use eventlog::store::{EventRef, ExpectedVersion, Filter, NewEvent, Store};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);

fn fill(store: &Store, n: u64) {
    for i in 0..n {
        let agg = format!("{}-{}", if i % 2 == 0 { "order" } else { "user" }, i % 7);
        store
            .append(
                &agg,
                ExpectedVersion::Any,
                &[NewEvent::json_text(
                    if i % 3 == 0 { "A" } else { "B" },
                    format!("{i}"),
                )],
            )
            .unwrap();
    }
}

fn fast_retry(attempts: u32) -> SubscriptionOptions {
    let mut o = SubscriptionOptions::default();
    o.retry = RetryPolicy {
        attempts_max: attempts,
        retry_delay_ms_min: 1,
        retry_delay_ms_max: 4,
        jitter: true,
    };
    o
}

type Seen = Arc<Mutex<Vec<(u64, u32)>>>;

fn seqs(seen: &Seen) -> Vec<u64> {
    seen.lock().unwrap().iter().map(|s| s.0).collect()
}

fn recorder(
    seen: &Seen,
) -> impl FnMut(&EventRef<'_>, u32) -> Result<(), HandlerError> + Send + 'static {
    let seen = seen.clone();
    move |e: &EventRef<'_>, attempt: u32| {
        seen.lock().unwrap().push((e.seq, attempt));
        Ok(())
    }
}

#[test]
fn delivers_stored_then_live_events_in_order_and_resumes_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 50);
    let publisher = Publisher::open(&store).unwrap();
    let seen: Seen = Arc::default();
    let sub = publisher
        .subscribe("all", SubscriptionOptions::default(), recorder(&seen))
        .unwrap();
    assert!(sub.wait_until_handled(49, WAIT));
    fill(&store, 10);
    assert!(
        sub.wait_until_handled(59, WAIT),
        "live events arrive without polling"
    );
    sub.stop(WAIT).unwrap();
    let got: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.0).collect();
    assert_eq!(got, (0..60).collect::<Vec<_>>());
    assert_eq!(sub.stats().status, Status::Stopped);
    assert_eq!(sub.stats().checkpoint, 60);
    drop(sub);

    fill(&store, 5);
    let seen2: Seen = Arc::default();
    let sub = publisher
        .subscribe("all", SubscriptionOptions::default(), recorder(&seen2))
        .unwrap();
    assert!(sub.wait_until_handled(64, WAIT));
    let got: Vec<u64> = seen2.lock().unwrap().iter().map(|s| s.0).collect();
    assert_eq!(
        got,
        (60..65).collect::<Vec<_>>(),
        "a clean stop re-delivers nothing"
    );
    let stats = sub.stats();
    assert_eq!((stats.delivered, stats.lag_events), (5, 0));
}

#[test]
fn filters_by_type_and_aggregate_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 30);
    let publisher = Publisher::open(&store).unwrap();
    let seen: Seen = Arc::default();
    let mut o = SubscriptionOptions::default();
    o.filter = Filter::types(["A"]).with_aggregate_prefix("order-");
    let sub = publisher.subscribe("orders-a", o, recorder(&seen)).unwrap();
    assert!(sub.wait_until_handled(29, WAIT));
    let got: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.0).collect();
    let want: Vec<u64> = (0..30).filter(|i| i % 2 == 0 && i % 3 == 0).collect();
    assert_eq!(got, want);
}

#[test]
fn a_handler_failing_k_times_gets_k_plus_one_attempts_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 2);
    let publisher = Publisher::open(&store).unwrap();
    let attempts: Seen = Arc::default();
    let log = attempts.clone();
    let mut o = SubscriptionOptions::default();
    o.retry = RetryPolicy {
        attempts_max: 5,
        retry_delay_ms_min: 10,
        retry_delay_ms_max: 1000,
        jitter: true,
    };
    let started = Instant::now();
    let sub = publisher
        .subscribe("flaky", o, move |e: &EventRef<'_>, attempt: u32| {
            log.lock().unwrap().push((e.seq, attempt));
            if e.seq == 0 && attempt <= 3 {
                Err(HandlerError::Retryable(format!("try {attempt}")))
            } else {
                Ok(())
            }
        })
        .unwrap();
    assert!(sub.wait_until_handled(1, WAIT));
    // Three backoffs of at least 5, 10 and 20 ms (the lower halves of 10, 20, 40).
    assert!(started.elapsed() >= Duration::from_millis(35));
    assert_eq!(
        *attempts.lock().unwrap(),
        vec![(0, 1), (0, 2), (0, 3), (0, 4), (1, 1)]
    );
    let stats = sub.stats();
    assert_eq!(
        (stats.delivered, stats.retried, stats.dead_lettered),
        (2, 3, 0)
    );
}

#[test]
fn exhausted_and_permanent_failures_are_parked_and_delivery_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 6);
    let publisher = Publisher::open(&store).unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let sub = publisher
        .subscribe(
            "picky",
            fast_retry(4),
            move |e: &EventRef<'_>, attempt: u32| {
                log.lock().unwrap().push((e.seq, attempt));
                match e.seq {
                    1 => Err(HandlerError::Retryable("always down".into())),
                    3 => Err(HandlerError::Permanent("bad data".into())),
                    4 => panic!("handler bug on 4"),
                    _ => Ok(()),
                }
            },
        )
        .unwrap();
    assert!(sub.wait_until_handled(5, WAIT));
    let attempts_for = |seq: u64| seen.lock().unwrap().iter().filter(|s| s.0 == seq).count();
    assert_eq!(attempts_for(1), 4, "exactly attempts_max attempts");
    assert_eq!(attempts_for(3), 1, "a permanent error is not retried");
    assert_eq!(
        attempts_for(4),
        4,
        "a panic is a failed attempt, and the worker lives on"
    );
    assert_eq!(attempts_for(5), 1);
    let dl = sub.dead_letters().unwrap();
    assert_eq!(
        dl.iter().map(|d| (d.seq, d.attempts)).collect::<Vec<_>>(),
        vec![(1, 4), (3, 1), (4, 4)]
    );
    assert_eq!(dl[0].last_error, "always down");
    assert!(
        dl[2].last_error.contains("handler bug on 4"),
        "{}",
        dl[2].last_error
    );
    assert!(dl[0].first_failure_us <= dl[0].last_failure_us);
    let stats = sub.stats();
    assert_eq!(
        (
            stats.delivered,
            stats.dead_lettered,
            stats.dead_letters,
            stats.status
        ),
        (3, 3, 3, Status::Running)
    );
}

#[test]
fn stop_on_exhaustion_reports_the_poison_event_and_restarts_at_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 5);
    let publisher = Publisher::open(&store).unwrap();
    let mut o = fast_retry(2);
    o.on_exhausted = OnExhausted::Stop;
    let sub = publisher
        .subscribe("strict", o.clone(), |e: &EventRef<'_>, _a: u32| {
            if e.seq == 2 {
                Err(HandlerError::Retryable("no".into()))
            } else {
                Ok(())
            }
        })
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !matches!(sub.stats().status, Status::Failed { .. }) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    match sub.stats().status {
        Status::Failed { seq, error } => {
            assert_eq!(seq, 2);
            assert!(error.contains("no"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        sub.stats().checkpoint,
        2,
        "the checkpoint stays at the poison event"
    );
    sub.stop(WAIT).unwrap();
    drop(sub);
    let seen: Seen = Arc::default();
    let sub = publisher.subscribe("strict", o, recorder(&seen)).unwrap();
    assert!(sub.wait_until_handled(4, WAIT));
    assert_eq!(seen.lock().unwrap().first(), Some(&(2, 1)));
}

#[test]
fn redrive_after_restart_delivers_parked_events_and_keeps_failures() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 4);
    {
        let publisher = Publisher::open(&store).unwrap();
        let sub = publisher
            .subscribe("mailer", fast_retry(2), |e: &EventRef<'_>, _a: u32| {
                if e.seq % 2 == 1 {
                    Err(HandlerError::Retryable("smtp down".into()))
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert!(sub.wait_until_handled(3, WAIT));
        assert_eq!(sub.dead_letters().unwrap().len(), 2);
        sub.stop(WAIT).unwrap();
    }
    drop(store);
    let store = open_store(dir.path());
    let publisher = Publisher::open(&store).unwrap();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let sub = publisher
        .subscribe(
            "mailer",
            fast_retry(2),
            move |e: &EventRef<'_>, attempt: u32| {
                log.lock().unwrap().push((e.seq, attempt));
                if e.seq == 3 {
                    Err(HandlerError::Retryable("still down".into()))
                } else {
                    Ok(())
                }
            },
        )
        .unwrap();
    let parked = sub.dead_letters().unwrap();
    assert_eq!(
        parked.iter().map(|d| d.seq).collect::<Vec<_>>(),
        vec![1, 3],
        "dead letters survive a restart"
    );
    let report = sub.redrive(Redrive::All).unwrap();
    assert_eq!(report.delivered, vec![parked[0].id]);
    assert_eq!(report.failed, vec![parked[1].id]);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(1, 3), (3, 3)],
        "redrive continues the attempt count"
    );
    let left = sub.dead_letters().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(
        (left[0].seq, left[0].attempts, left[0].last_error.as_str()),
        (3, 3, "still down")
    );
    assert!(matches!(
        sub.redrive(Redrive::Ids(vec![999])),
        Err(eventlog::publisher::PublishError::NoSuchDeadLetter { id: 999, .. })
    ));
    assert_eq!(sub.purge_dead_letters().unwrap(), 1);
    assert!(sub.dead_letters().unwrap().is_empty());
}

#[test]
fn pause_resume_and_reset_to_a_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 10);
    let publisher = Publisher::open(&store).unwrap();
    let seen: Seen = Arc::default();
    let sub = publisher
        .subscribe("ctl", SubscriptionOptions::default(), recorder(&seen))
        .unwrap();
    assert!(sub.wait_until_handled(9, WAIT));
    sub.pause();
    assert_eq!(sub.stats().status, Status::Paused);
    fill(&store, 3);
    assert!(
        !sub.wait_until_handled(12, Duration::from_millis(150)),
        "nothing is delivered while paused"
    );
    sub.resume();
    assert!(sub.wait_until_handled(12, WAIT));
    sub.reset_to(5);
    let deadline = Instant::now() + WAIT;
    while seen.lock().unwrap().len() < 13 + 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let got: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.0).collect();
    assert_eq!(
        &got[13..],
        &(5..13).collect::<Vec<_>>()[..],
        "replayed from the reset point"
    );
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn subscriptions_coming_and_going_leak_no_threads_or_handles() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 20);
    let publisher = Publisher::open(&store).unwrap();
    let handles_before = store.handle_count();
    let threads_before = thread_count();
    for i in 0..100 {
        let seen: Seen = Arc::default();
        let sub = publisher
            .subscribe(
                &format!("s{}", i % 5),
                SubscriptionOptions::default(),
                recorder(&seen),
            )
            .unwrap();
        assert!(sub.wait_until_handled(19, WAIT));
        sub.stop(WAIT).unwrap();
    }
    assert_eq!(
        store.handle_count(),
        handles_before,
        "every subscription released the store"
    );
    // Other tests run threads in this process too; 100 leaked workers would show.
    assert!(
        thread_count() < threads_before + 50,
        "threads grew from {threads_before} to {}",
        thread_count()
    );
    assert_eq!(publisher.stored_subscriptions().unwrap().len(), 5);
}

#[test]
fn invalid_names_and_double_subscribe_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let publisher = Publisher::open(&store).unwrap();
    for bad in ["", "..", "a/b", &"x".repeat(65)] {
        assert!(
            publisher
                .subscribe(
                    bad,
                    SubscriptionOptions::default(),
                    |_: &EventRef<'_>, _: u32| Ok(())
                )
                .is_err(),
            "{bad:?}"
        );
    }
    let _a = publisher
        .subscribe(
            "one",
            SubscriptionOptions::default(),
            |_: &EventRef<'_>, _: u32| Ok(()),
        )
        .unwrap();
    assert!(matches!(
        publisher.subscribe(
            "one",
            SubscriptionOptions::default(),
            |_: &EventRef<'_>, _: u32| Ok(())
        ),
        Err(eventlog::publisher::PublishError::AlreadyRunning { .. })
    ));
}

#[test]
fn redrive_requested_offline_is_delivered_when_the_subscription_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 3);
    let publisher = Publisher::open(&store).unwrap();
    {
        let sub = publisher
            .subscribe("s", fast_retry(1), |e: &EventRef<'_>, _a: u32| {
                if e.seq == 1 {
                    Err(HandlerError::Permanent("later".into()))
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert!(sub.wait_until_handled(2, WAIT));
        sub.stop(WAIT).unwrap();
    }
    // As the CLI does while the subscription is not running.
    let ids = {
        let mut dl = publisher
            .open_dead_letters("s", DeadLetterOptions::default())
            .unwrap();
        let ids: Vec<u64> = dl.list().iter().map(|d| d.id).collect();
        assert_eq!(dl.request_redrive(&ids).unwrap(), ids);
        assert_eq!(
            dl.request_redrive(&ids).unwrap(),
            Vec::<u64>::new(),
            "marking twice is a no-op"
        );
        ids
    };
    assert_eq!(ids.len(), 1);
    let seen: Seen = Arc::default();
    let sub = publisher
        .subscribe("s", fast_retry(1), recorder(&seen))
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !sub.dead_letters().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(sub.dead_letters().unwrap().is_empty());
    assert_eq!(*seen.lock().unwrap(), vec![(1, 2)]);
}

#[test]
fn publisher_metrics_and_delivery_spans_carry_what_an_operator_needs() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    store
        .append(
            "order-1",
            ExpectedVersion::Any,
            &[
                NewEvent::json_text("A", "1").with_correlation_id("corr-9"),
                NewEvent::json_text("B", "2"),
            ],
        )
        .unwrap();
    let publisher = Publisher::open(&store).unwrap();
    let sub = publisher
        .subscribe("ops", fast_retry(2), |e: &EventRef<'_>, _a: u32| {
            tracing::info!(seq = e.seq, "handling");
            if e.seq == 0 {
                Err(HandlerError::Retryable("down".into()))
            } else {
                Ok(())
            }
        })
        .unwrap();
    assert!(sub.wait_until_handled(1, WAIT));
    let text = publisher.metrics_text();
    assert!(
        text.contains("eventlog_subscription_lag_events{subscription=\"ops\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("eventlog_subscription_delivered_total{subscription=\"ops\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("eventlog_subscription_retries_total{subscription=\"ops\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("eventlog_subscription_dead_lettered_total{subscription=\"ops\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("eventlog_subscription_dead_letters{subscription=\"ops\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("eventlog_subscription_dead_letters_evicted_total{subscription=\"ops\"} 0\n"),
        "{text}"
    );

    // A redrive runs the handler on this thread, inside the delivery span: its log lines
    // carry the subscription, seq, attempt and the event's correlation id.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        sub.redrive(Redrive::All).unwrap();
    });
    let logged = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let line = logged
        .lines()
        .find(|l| l.contains("handling"))
        .unwrap_or_else(|| panic!("no handler line in {logged}"));
    for field in [
        "deliver{",
        "subscription=ops",
        "seq=0",
        "attempt=3",
        "correlation_id=\"corr-9\"",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}

/// A slow handler's checkpoint follows `checkpoint_interval_ms`, not only every 64 events:
/// after about a second of 20 ms events with a 50 ms interval, one is stored.
#[test]
fn a_slow_handler_gets_its_checkpoint_within_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 60);
    let publisher = Publisher::open(&store).unwrap();
    let mut o = SubscriptionOptions::default();
    o.checkpoint_interval_ms = 50;
    let sub = publisher
        .subscribe("slow", o, |_e: &EventRef<'_>, _a: u32| {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        })
        .unwrap();
    assert!(sub.wait_until_handled(50, WAIT));
    let stats = sub.stats();
    assert!(
        stats.checkpoint > 0,
        "51 events of 20 ms handled, checkpoint still {} (interval 50 ms)",
        stats.checkpoint
    );
}

/// "Wait as long as it takes" is `Duration::MAX`: no overflow panic in the library.
#[test]
fn waits_given_duration_max_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 1);
    let publisher = Publisher::open(&store).unwrap();
    let seen: Seen = Arc::default();
    let sub = publisher
        .subscribe("m", SubscriptionOptions::default(), recorder(&seen))
        .unwrap();
    assert!(sub.wait_until_handled(0, Duration::MAX));
    sub.stop(Duration::MAX).unwrap();
    let mut follower = store.follow(0, Filter::all());
    assert!(follower.next_timeout(Duration::MAX).unwrap().is_some());
}
