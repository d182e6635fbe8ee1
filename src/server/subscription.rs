//! A subscription: a thread that follows the store from a seq and queues each matching
//! event on its connection.
//!
//! One [`Follower`](crate::store::Follower) does the whole job: it reads the stored
//! events from the log from the requested seq, and once it reaches the head it waits for
//! commits, so events arrive in seq order with no gap and no duplicate at the switch
//! from stored to live. The thread blocks only itself: when the connection's queue is
//! full it waits (bounded) for room, and a consumer that does not make room in time is
//! disconnected by the queue (see [`super::connection::Outbox`]).

use super::connection::{Outbox, Outgoing};
use super::protocol;
use super::{Shared, Tracker, TrackerGuard};
use crate::store::Filter;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long the follower waits for a commit before checking whether to stop. A stopped
/// subscription's thread ends within about this long: its follower also looks at the
/// stop flag every 1,024 stored events its filter skips, and a wait for room in the send
/// queue is woken by the stop.
pub(crate) const FOLLOW_SLICE: Duration = Duration::from_millis(200);
/// How long a `subscribe` at the connection's limit waits for an unsubscribed
/// subscription's thread to end (it counts against the limit until it has, since it
/// still reads the store).
pub(crate) const SUBSCRIPTION_END_WAIT: Duration = Duration::from_millis(500);
const _: () = assert!(SUBSCRIPTION_END_WAIT.as_millis() > FOLLOW_SLICE.as_millis());
/// Stack of a subscription thread: it only decodes and serializes events.
const THREAD_STACK_BYTES: usize = 256 << 10;

/// The connection's handle on a running subscription.
pub(crate) struct SubHandle {
    stop: Arc<AtomicBool>,
    outbox: Outbox,
}

impl SubHandle {
    /// Asks the thread to stop; it does within about one [`FOLLOW_SLICE`].
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        // A thread waiting for room in the queue looks at its flag now.
        self.outbox.wake_producers();
    }
}

impl Drop for SubHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes the subscription from the gauges when its thread ends. The gauges change
/// before the guards are dropped, so the gauge never shows more subscriptions than the
/// limits (checked against the trackers) let in.
struct Registration {
    shared: Arc<Shared>,
    key: (u64, u64),
    _thread: TrackerGuard,
    _connection_thread: TrackerGuard,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared
            .metrics
            .subscriptions_open
            .fetch_sub(1, Ordering::Relaxed);
        self.shared.metrics.positions.lock().remove(&self.key);
    }
}

/// A new subscription: which, from where, and whose.
pub(crate) struct Start {
    pub conn_id: u64,
    /// The connection's subscription threads, running or stopping.
    pub connection_threads: Arc<Tracker>,
    pub sub: u64,
    pub from: u64,
    pub filter: Filter,
}

/// Starts subscription `start.sub` of connection `start.conn_id`, from seq `start.from`.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    outbox: Outbox,
    start: Start,
    request_span: tracing::Span,
) -> std::io::Result<SubHandle> {
    let Start {
        conn_id,
        connection_threads,
        sub,
        from,
        filter,
    } = start;
    let stop = Arc::new(AtomicBool::new(false));
    let position = Arc::new(AtomicU64::new(from));
    let registration = Registration {
        shared: Arc::clone(&shared),
        key: (conn_id, sub),
        _thread: shared.threads.enter(),
        _connection_thread: connection_threads.enter(),
    };
    shared
        .metrics
        .subscriptions_open
        .fetch_add(1, Ordering::Relaxed);
    shared.metrics.subscriptions_total.add(1);
    shared
        .metrics
        .positions
        .lock()
        .insert((conn_id, sub), Arc::clone(&position));
    let thread_stop = Arc::clone(&stop);
    let handle = SubHandle {
        stop,
        outbox: outbox.clone(),
    };
    std::thread::Builder::new()
        .name(format!("eventlog-sub-{conn_id}.{sub}"))
        .stack_size(THREAD_STACK_BYTES)
        .spawn(move || {
            let span = tracing::info_span!(parent: &request_span, "subscription", sub, from);
            let _entered = span.enter();
            let _registration = registration;
            follow(&shared, &outbox, sub, from, filter, &thread_stop, &position);
        })?;
    Ok(handle)
}

fn follow(
    shared: &Shared,
    outbox: &Outbox,
    sub: u64,
    from: u64,
    filter: Filter,
    stop: &AtomicBool,
    position: &AtomicU64,
) {
    tracing::debug!("subscription started");
    let mut follower = shared.store.follow(from, filter);
    let prefix = protocol::sub_event_prefix(sub);
    let mut sent: u64 = 0;
    loop {
        if stop.load(Ordering::Acquire) || outbox.is_closed() {
            break;
        }
        // The stop flag also ends a long skip over stored events the filter refuses.
        match follower.next_or_interrupt(FOLLOW_SLICE, Some(stop)) {
            Ok(Some(stored)) => {
                position.store(follower.position(), Ordering::Relaxed);
                let event = match stored.event() {
                    Ok(e) => e,
                    Err(e) => {
                        end(outbox, sub, &e.to_string(), stop);
                        break;
                    }
                };
                let mut text = Vec::with_capacity(prefix.len() + 320 + event.payload.len());
                text.extend_from_slice(prefix.as_bytes());
                if let Err(e) = crate::json::write_event_json(&mut text, &event) {
                    end(
                        outbox,
                        sub,
                        &format!("cannot write event {}: {e}", stored.seq()),
                        stop,
                    );
                    break;
                }
                text.push(b'}');
                let Ok(text) = String::from_utf8(text) else {
                    end(outbox, sub, "an event is not UTF-8 JSON", stop);
                    break;
                };
                tracing::trace!(
                    seq = stored.seq(),
                    correlation_id = event.correlation_id,
                    "event queued"
                );
                if outbox
                    .push_blocking(Outgoing::SubEvent { sub, text }, stop)
                    .is_err()
                {
                    break;
                }
                sent += 1;
            }
            Ok(None) => position.store(follower.position(), Ordering::Relaxed),
            Err(e) => {
                tracing::error!(error = %e, seq = follower.position(), "subscription cannot read the store");
                end(outbox, sub, &e.to_string(), stop);
                break;
            }
        }
    }
    tracing::debug!(sent, position = follower.position(), "subscription stopped");
}

/// Ends the subscription with a `read_failed` message.
fn end(outbox: &Outbox, sub: u64, message: &str, stop: &AtomicBool) {
    let text = protocol::sub_end(sub, "read_failed", message);
    let _ = outbox.push_blocking(
        Outgoing::SubClosed {
            sub,
            text: Some(text),
        },
        stop,
    );
}
