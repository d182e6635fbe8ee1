//! One WebSocket connection: a reader (this task) that answers requests in order, and a
//! writer task that drains the connection's bounded send queue to the socket.
//!
//! Everything sent goes through the queue ([`Outbox`]): answers from the reader,
//! events from the subscription threads. The queue is bounded twice: in messages
//! (`send_queue_len_max`) and in bytes (`send_queue_bytes_max`; one message larger than
//! that is let in alone), since one message can be over 1 MiB. A producer that finds
//! the queue full waits up to `send_queue_wait_ms`; if it is still full the connection
//! is aborted as a slow consumer: the queue is dropped and the socket gets a close
//! frame (1008, "slow consumer") if it takes one in time. The writer is held to the same
//! limit: if the socket takes no byte for `send_queue_wait_ms` while the writer has
//! something to write, the connection is aborted the same way, so a client that stopped
//! reading holds at most the queue's bytes and the socket's buffers, and only for that
//! long. Nothing else waits on this connection.

use super::metrics::ServerMetrics;
use super::protocol::{
    self, error_answer, ok_answer, AppendOp, ErrorCode, Op, ReadOp, ReadSource, SubscribeOp,
    WireError,
};
use super::subscription::{self, SubHandle};
use super::tokens::Grant;
use super::{Shared, Tracker};
use crate::store::{AppendError, Direction, Filter, ReadError, StoredEvent};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use parking_lot::{Condvar, Mutex};
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

/// Messages the writer takes from the queue per socket flush.
const WRITE_BATCH_MESSAGES: usize = 64;
/// How long the writer tries to deliver the close frame.
const CLOSE_FRAME_WAIT: Duration = Duration::from_secs(5);
/// How long the server waits for the client's close frame after sending its own.
const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(1);
/// Most events a `read` with a scoped token looks at per matching event asked for.
const SCOPED_SCAN_FACTOR: usize = 16;
/// The close reason of a connection aborted for not reading.
pub(crate) const SLOW_CONSUMER_REASON: &str = "slow consumer";
/// The close reason of a connection whose client stopped answering pings.
pub(crate) const SILENT_PEER_REASON: &str = "no answer to pings";
/// Ping intervals (`ping_interval_ms`) without any frame from the client (a pong, a
/// ping, a message) after which it is taken for gone: the first ping goes out one
/// interval after the last frame, so the client has a whole interval to answer it.
const PEER_SILENT_PINGS_MAX: u32 = 2;
/// How many times per `send_queue_wait_ms` the writer looks whether the socket took
/// bytes, while it has something to write.
const WRITE_PROGRESS_CHECKS_PER_WAIT: u32 = 4;
/// The shortest interval between two of those looks.
const WRITE_PROGRESS_CHECK_MIN: Duration = Duration::from_millis(10);

/// An item of a connection's send queue.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// An answer.
    Text(String),
    /// An event of a subscription; dropped if the subscription was closed before it.
    SubEvent { sub: u64, text: String },
    /// The subscription is over: nothing more of it is sent; `text` (its `end` message),
    /// if any, is sent first.
    SubClosed { sub: u64, text: Option<String> },
}

impl Outgoing {
    /// What it counts against the queue's byte budget: the text it carries.
    fn len_bytes(&self) -> usize {
        match self {
            Outgoing::Text(t) | Outgoing::SubEvent { text: t, .. } => t.len(),
            Outgoing::SubClosed { text, .. } => text.as_ref().map_or(0, String::len),
        }
    }
}

/// How the connection ends, shared by the reader, the writer and the producers.
#[derive(Debug, Default)]
pub(crate) struct Ending {
    /// Set when the connection must stop at once (slow consumer, broken socket).
    aborted: AtomicBool,
    wake: Notify,
    /// The close frame to send.
    frame: Mutex<Option<(CloseCode, String)>>,
    /// Subscription threads waiting for room in the queue wait here (a plain condition
    /// variable: they are not on the runtime, and must not depend on its timers, which
    /// are gone once the runtime shuts down).
    room: Mutex<()>,
    room_made: Condvar,
    /// The reader, when it waits for room, waits here.
    room_async: Notify,
    /// Bytes of the items in the queue and in the writer's hands not yet given to the
    /// socket writer; bounded by `send_queue_bytes_max` (see [`Ending::reserve`]).
    queued_bytes: AtomicUsize,
}

impl Ending {
    /// Stops the connection now with this close frame (the first reason wins). Returns
    /// whether this call stopped it (false: it was already stopped).
    pub(crate) fn abort(&self, code: CloseCode, reason: &str) -> bool {
        self.set_frame(code, reason);
        if self.aborted.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.wake.notify_waiters();
        // A permit for a writer that is not waiting right now.
        self.wake.notify_one();
        self.room_changed();
        true
    }

    /// Wakes the producers waiting for room: the writer took messages or wrote bytes,
    /// or the queue closed.
    fn room_changed(&self) {
        {
            // Taking the lock orders this after a waiter's failed attempt (made under it).
            let _room = self.room.lock();
            self.room_made.notify_all();
        }
        self.room_async.notify_waiters();
    }

    /// Takes `len` bytes of the byte budget `max`; false if they do not fit. An item
    /// larger than the whole budget is let in when nothing else is queued, so that no
    /// message is unsendable.
    fn reserve(&self, len: usize, max: usize, metrics: &ServerMetrics) -> bool {
        let mut queued = self.queued_bytes.load(Ordering::Acquire);
        loop {
            if queued != 0 && queued.saturating_add(len) > max {
                return false;
            }
            match self.queued_bytes.compare_exchange_weak(
                queued,
                queued.saturating_add(len),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    metrics
                        .send_queue_bytes
                        .fetch_add(len as u64, Ordering::Relaxed);
                    return true;
                }
                Err(now) => queued = now,
            }
        }
    }

    /// Gives back `len` bytes taken by [`Ending::reserve`] (the item was written,
    /// dropped, or not queued after all) and wakes the producers waiting for room.
    fn release(&self, len: usize, metrics: &ServerMetrics) {
        if len == 0 {
            return;
        }
        let before = self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        debug_assert!(before >= len, "released {len} bytes of {before} queued");
        metrics
            .send_queue_bytes
            .fetch_sub(len as u64, Ordering::Relaxed);
        self.room_changed();
    }

    fn set_frame(&self, code: CloseCode, reason: &str) {
        let mut frame = self.frame.lock();
        if frame.is_none() {
            *frame = Some((code, reason.to_string()));
        }
    }

    pub(crate) fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::Acquire)
    }

    async fn aborted(&self) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_aborted() {
                return;
            }
            notified.await;
        }
    }
}

/// Why a message could not be queued: the connection is ending.
#[derive(Debug)]
pub(crate) struct Closed;

/// The sending side of a connection's queue.
#[derive(Clone)]
pub(crate) struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    ending: Arc<Ending>,
    shared: Arc<Shared>,
}

impl Outbox {
    fn slow(&self) -> Closed {
        if self.ending.abort(CloseCode::Policy, SLOW_CONSUMER_REASON) {
            self.shared.metrics.slow_consumer_disconnects.add(1);
            tracing::warn!(
                queue = self.shared.config.send_queue_len_max,
                queue_bytes = self.shared.config.send_queue_bytes_max,
                wait_ms = self.shared.config.send_queue_wait_ms,
                "slow consumer: its send queue stayed full; disconnecting"
            );
        }
        Closed
    }

    fn wait(&self) -> Duration {
        Duration::from_millis(self.shared.config.send_queue_wait_ms)
    }

    /// Queues `item` if the queue has a free slot and its bytes fit the byte budget;
    /// gives it back otherwise. Takes no lock (a blocking producer holds the room lock).
    fn try_push(&self, item: Outgoing) -> Result<Result<(), Outgoing>, Closed> {
        // The slot first: once the bytes are taken the item cannot fail to go in, so
        // they never need giving back here.
        let slot = match self.tx.try_reserve() {
            Ok(slot) => slot,
            Err(mpsc::error::TrySendError::Closed(())) => return Err(Closed),
            Err(mpsc::error::TrySendError::Full(())) => return Ok(Err(item)),
        };
        let fits = self.ending.reserve(
            item.len_bytes(),
            self.shared.config.send_queue_bytes_max,
            &self.shared.metrics,
        );
        if !fits {
            return Ok(Err(item));
        }
        slot.send(item);
        Ok(Ok(()))
    }

    /// Queues `item`, waiting for room at most `send_queue_wait_ms` (then the consumer
    /// is disconnected as slow).
    pub(crate) async fn push(&self, item: Outgoing) -> Result<(), Closed> {
        let deadline = tokio::time::Instant::from_std(crate::deadline::deadline_after(
            std::time::Instant::now(),
            self.wait(),
        ));
        let mut item = item;
        loop {
            if self.ending.is_aborted() {
                return Err(Closed);
            }
            // Registered before the attempt, so room made after it wakes this wait.
            let room = self.ending.room_async.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_push(item)? {
                Ok(()) => return Ok(()),
                Err(back) => item = back,
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return match self.try_push(item)? {
                    Ok(()) => Ok(()),
                    Err(_) => Err(self.slow()),
                };
            }
        }
    }

    /// [`Outbox::push`] from a thread outside the runtime (a subscription's). Gives up
    /// (without disconnecting anyone) once `stop` is set and [`Outbox::wake_producers`]
    /// was called: a stopped subscription's events would be dropped by the writer anyway.
    pub(crate) fn push_blocking(&self, item: Outgoing, stop: &AtomicBool) -> Result<(), Closed> {
        let deadline = crate::deadline::deadline_after(std::time::Instant::now(), self.wait());
        let mut item = item;
        let mut room = self.ending.room.lock();
        loop {
            if self.ending.is_aborted() || stop.load(Ordering::Acquire) {
                return Err(Closed);
            }
            // Tried under the lock, so the writer's wake-up cannot fall between this
            // attempt and the wait.
            match self.try_push(item)? {
                Ok(()) => return Ok(()),
                Err(back) => item = back,
            }
            if self
                .ending
                .room_made
                .wait_until(&mut room, deadline)
                .timed_out()
            {
                drop(room);
                return match self.try_push(item)? {
                    Ok(()) => Ok(()),
                    Err(_) => Err(self.slow()),
                };
            }
        }
    }

    /// Wakes the threads waiting in [`Outbox::push_blocking`] so they look at their stop
    /// flags.
    pub(crate) fn wake_producers(&self) {
        self.ending.room_changed();
    }

    /// Whether the connection is ending (the writer is gone or aborted).
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.ending.is_aborted()
    }
}

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;
type Stream<S> = SplitStream<WebSocketStream<S>>;

/// Writes queued messages until every producer is gone or the connection is aborted,
/// then sends the close frame. `written` counts the bytes the socket took: while the
/// writer has something to write and it stays still for `send_queue_wait_ms`, the
/// client is not reading, and the connection is aborted as a slow consumer.
async fn write_loop<S>(
    mut sink: Sink<S>,
    mut rx: mpsc::Receiver<Outgoing>,
    ending: Arc<Ending>,
    shared: Arc<Shared>,
    written: Arc<AtomicU64>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let metrics = &shared.metrics;
    let guard = WriteGuard {
        ending: &ending,
        shared: &shared,
        written: &written,
    };
    let mut closed_subs: HashSet<u64> = HashSet::new();
    let mut batch: Vec<Outgoing> = Vec::with_capacity(WRITE_BATCH_MESSAGES);
    // Pings go out between batches, so a busy connection is pinged too (after at most
    // one batch, whose writing is bounded by the progress limit).
    let ping_interval = Duration::from_millis(shared.config.ping_interval_ms);
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let n = tokio::select! {
            biased;
            () = ending.aborted() => break,
            n = rx.recv_many(&mut batch, WRITE_BATCH_MESSAGES) => n,
            _ = ping.tick() => {
                match guard.run(sink.send(Message::Ping(Default::default()))).await {
                    None => break,
                    Some(Ok(())) => continue,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "writing to the socket failed");
                        ending.abort(CloseCode::Away, "");
                        break;
                    }
                }
            }
        };
        if n == 0 {
            break;
        }
        ending.room_changed();
        let batch_bytes: usize = batch.iter().map(Outgoing::len_bytes).sum();
        // Bytes of this batch given back so far; the rest is given back below when the
        // batch is cut short.
        let mut released = 0;
        let send = async {
            for item in batch.drain(..) {
                let len = item.len_bytes();
                let text = match item {
                    Outgoing::Text(t) => Some(t),
                    Outgoing::SubEvent { sub, text } => {
                        (!closed_subs.contains(&sub)).then_some(text)
                    }
                    Outgoing::SubClosed { sub, text } => {
                        closed_subs.insert(sub);
                        text
                    }
                };
                let fed = match text {
                    Some(text) => {
                        metrics.messages_out.add(1);
                        metrics.bytes_out.add(text.len() as u64);
                        // The socket writer holds the text now: it takes the next one
                        // only once its buffer is down to `WS_WRITE_BUFFER_BYTES`.
                        sink.feed(Message::text(text)).await
                    }
                    None => Ok(()),
                };
                ending.release(len, metrics);
                released += len;
                fed?;
            }
            sink.flush().await
        };
        let sent = guard.run(send).await;
        ending.release(batch_bytes - released, metrics);
        match sent {
            None => break,
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "writing to the socket failed");
                ending.abort(CloseCode::Away, "");
                break;
            }
        }
    }
    rx.close();
    // What is still queued is dropped; producers that try now find the queue closed.
    while let Ok(item) = rx.try_recv() {
        ending.release(item.len_bytes(), metrics);
    }
    drop(rx);
    ending.room_changed();
    let (code, reason) = ending
        .frame
        .lock()
        .clone()
        .unwrap_or((CloseCode::Normal, String::new()));
    let frame = CloseFrame {
        code,
        reason: reason.clone().into(),
    };
    let closed = tokio::time::timeout(CLOSE_FRAME_WAIT, async {
        sink.send(Message::Close(Some(frame))).await?;
        sink.close().await
    })
    .await;
    tracing::debug!(code = u16::from(code), %reason, delivered = matches!(closed, Ok(Ok(()))), "connection closed");
}

/// What bounds each write of the writer.
struct WriteGuard<'a> {
    ending: &'a Ending,
    shared: &'a Shared,
    written: &'a AtomicU64,
}

impl WriteGuard<'_> {
    /// Runs `write` until it completes (`Some`), the connection is aborted (`None`), or
    /// the socket takes no byte for `send_queue_wait_ms` (`None`: the connection is
    /// aborted as a slow consumer).
    async fn run<F>(&self, write: F) -> Option<Result<(), WsError>>
    where
        F: std::future::Future<Output = Result<(), WsError>>,
    {
        let limit = Duration::from_millis(self.shared.config.send_queue_wait_ms);
        tokio::select! {
            biased;
            () = self.ending.aborted() => None,
            done = write => Some(done),
            () = stalled(self.written, limit) => {
                if self.ending.abort(CloseCode::Policy, SLOW_CONSUMER_REASON) {
                    self.shared.metrics.slow_consumer_disconnects.add(1);
                    tracing::warn!(
                        wait_ms = limit.as_millis() as u64,
                        "slow consumer: the socket took nothing for the wait limit; disconnecting"
                    );
                }
                None
            }
        }
    }
}

/// Completes once `written` has not moved for `limit`.
async fn stalled(written: &AtomicU64, limit: Duration) {
    let check = (limit / WRITE_PROGRESS_CHECKS_PER_WAIT).max(WRITE_PROGRESS_CHECK_MIN);
    let mut seen = written.load(Ordering::Relaxed);
    let mut moved_at = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(check).await;
        let now = written.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            moved_at = tokio::time::Instant::now();
        } else if moved_at.elapsed() >= limit {
            return;
        }
    }
}

/// The upgraded socket, counting the bytes it takes for writing, so that the writer
/// can tell a client that reads slowly from one that stopped reading.
pub(crate) struct CountingIo<S> {
    inner: S,
    written: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for CountingIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountingIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why the reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The client closed or the socket failed.
    Client,
    /// The server is shutting down.
    Shutdown,
    /// The connection was aborted (slow consumer, broken socket).
    Aborted,
    /// A message too large to skip.
    Oversized,
    /// Nothing arrived from the client for `PEER_SILENT_PINGS_MAX` ping intervals.
    Silent,
}

/// The reader's state.
struct Session {
    shared: Arc<Shared>,
    grant: Grant,
    conn_id: u64,
    outbox: Outbox,
    subs: HashMap<u64, SubHandle>,
    /// The threads of this connection's subscriptions, including unsubscribed ones still
    /// stopping: they count against the connection's limit until they have ended, so
    /// subscribing and unsubscribing in a loop cannot pile up threads reading the store.
    sub_threads: Arc<Tracker>,
    next_sub: u64,
}

/// Serves one upgraded connection until it closes.
pub(crate) async fn run<S>(shared: Arc<Shared>, io: S, grant: Grant, conn_id: u64)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!("connection open");
    let written = Arc::new(AtomicU64::new(0));
    let io = CountingIo {
        inner: io,
        written: Arc::clone(&written),
    };
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(shared.ws_config())).await;
    let (sink, stream) = ws.split();
    let (tx, rx) = mpsc::channel(shared.config.send_queue_len_max);
    let ending = Arc::new(Ending::default());
    let writer = tokio::spawn(
        write_loop(sink, rx, Arc::clone(&ending), Arc::clone(&shared), written).in_current_span(),
    );
    let mut session = Session {
        outbox: Outbox {
            tx,
            ending: Arc::clone(&ending),
            shared: Arc::clone(&shared),
        },
        shared: Arc::clone(&shared),
        grant,
        conn_id,
        subs: HashMap::new(),
        sub_threads: Arc::new(Tracker::default()),
        next_sub: 1,
    };
    let mut stream = stream;
    let stop = session.read_loop(&mut stream).await;
    let (code, reason) = match stop {
        Stop::Client => (CloseCode::Normal, ""),
        Stop::Shutdown => (CloseCode::Away, "server shutting down"),
        Stop::Aborted => (CloseCode::Away, ""),
        Stop::Oversized => (CloseCode::Size, "message too large"),
        Stop::Silent => (CloseCode::Away, SILENT_PEER_REASON),
    };
    ending.set_frame(code, reason);
    for (id, sub) in std::mem::take(&mut session.subs) {
        sub.stop();
        let text = (stop == Stop::Shutdown)
            .then(|| protocol::sub_end(id, "shutting_down", "the server is shutting down"));
        let _ = session
            .outbox
            .push(Outgoing::SubClosed { sub: id, text })
            .await;
    }
    // The writer ends once every producer (this one and the subscription threads) is
    // gone and the queue is empty.
    drop(session);
    if let Err(e) = writer.await {
        tracing::error!(error = %e, "the writer task failed");
    }
    if stop != Stop::Client {
        // Complete the closing handshake: read (and drop) what the client still sends
        // until its close frame, so the socket is not reset with unread data in it.
        let _ = tokio::time::timeout(CLOSE_REPLY_WAIT, async {
            while let Some(Ok(m)) = stream.next().await {
                if let Message::Close(_) = m {
                    break;
                }
            }
        })
        .await;
    }
}

impl Session {
    async fn read_loop<S>(&mut self, stream: &mut Stream<S>) -> Stop
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut shutdown = self.shared.shutdown.subscribe();
        let ending = Arc::clone(&self.outbox.ending);
        // A dead peer (a cable pulled, a machine gone) sends no FIN: only the silence
        // after the writer's pings tells. Looked at once an interval, not per message.
        let ping_interval = Duration::from_millis(self.shared.config.ping_interval_ms);
        let silence_max = ping_interval.saturating_mul(PEER_SILENT_PINGS_MAX);
        let mut check =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        loop {
            if *shutdown.borrow_and_update() {
                return Stop::Shutdown;
            }
            let message = tokio::select! {
                biased;
                _ = shutdown.changed() => return Stop::Shutdown,
                () = ending.aborted() => return Stop::Aborted,
                m = stream.next() => m,
                _ = check.tick() => {
                    if heard.elapsed() >= silence_max {
                        self.shared.metrics.silent_peer_disconnects.add(1);
                        tracing::info!(
                            silent_ms = heard.elapsed().as_millis() as u64,
                            "the client answered no ping: closing"
                        );
                        return Stop::Silent;
                    }
                    continue;
                }
            };
            heard = Instant::now();
            let message = match message {
                None => return Stop::Client,
                Some(Ok(m)) => m,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, .. }))) => {
                    self.shared.metrics.oversized_messages.add(1);
                    self.send_error(None, &self.too_large(size)).await;
                    return Stop::Oversized;
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "reading from the socket failed");
                    return Stop::Client;
                }
            };
            let text = match message {
                Message::Text(t) => t,
                Message::Binary(b) => {
                    self.shared.metrics.messages_in.add(1);
                    self.shared.metrics.bytes_in.add(b.len() as u64);
                    let e = WireError::new(
                        ErrorCode::InvalidJson,
                        "binary messages are not supported: send each request as a text message of JSON",
                    );
                    self.send_error(None, &e).await;
                    continue;
                }
                Message::Close(_) => return Stop::Client,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            };
            self.shared.metrics.messages_in.add(1);
            self.shared.metrics.bytes_in.add(text.len() as u64);
            if text.len() > self.shared.config.message_size_bytes_max {
                self.shared.metrics.oversized_messages.add(1);
                self.send_error(None, &self.too_large(text.len())).await;
                continue;
            }
            self.handle(text.as_str()).await;
            if ending.is_aborted() {
                return Stop::Aborted;
            }
        }
    }

    fn too_large(&self, size: usize) -> WireError {
        WireError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "the message is {size} bytes, the limit is {} bytes",
                self.shared.config.message_size_bytes_max
            ),
        )
    }

    async fn send_error(&self, id: Option<u64>, e: &WireError) {
        self.shared.metrics.request_errors.add(1);
        let _ = self.outbox.push(Outgoing::Text(error_answer(id, e))).await;
    }

    /// Answers one request.
    async fn handle(&mut self, text: &str) {
        let started = Instant::now();
        let (id, op) = match protocol::parse_request(text) {
            Ok(parsed) => parsed,
            Err((id, e)) => {
                tracing::debug!(id, code = e.code.as_str(), message = %e.message, "bad request");
                self.send_error(id, &e).await;
                return;
            }
        };
        let correlation_id = match &op {
            Op::Append(a) => a
                .events
                .first()
                .and_then(|e| e.metadata.correlation_id.clone()),
            _ => None,
        }
        .unwrap_or_else(|| format!("{}.{id}", self.conn_id));
        let op_name = op.name();
        let span = tracing::info_span!("request", id, op = op_name, %correlation_id);
        let outcome = self
            .dispatch(id, op, span.clone())
            .instrument(span.clone())
            .await;
        let _entered = span.enter();
        let latency_us = started.elapsed().as_micros() as u64;
        if let Some(i) = super::metrics::OPS.iter().position(|o| *o == op_name) {
            self.shared.metrics.request_us[i].observe(latency_us);
        }
        match outcome {
            Ok(answer) => {
                tracing::debug!(latency_us, "answered");
                if let Some(answer) = answer {
                    let _ = self.outbox.push(Outgoing::Text(answer)).await;
                }
            }
            Err(e) => {
                tracing::debug!(latency_us, code = e.code.as_str(), message = %e.message, "answered with an error");
                self.send_error(Some(id), &e).await;
            }
        }
    }

    /// Runs one request; `Ok(None)` when the answer was already queued.
    async fn dispatch(
        &mut self,
        id: u64,
        op: Op,
        span: tracing::Span,
    ) -> Result<Option<String>, WireError> {
        match op {
            Op::Append(a) => self.append(id, a, span).await.map(Some),
            Op::Read(r) => self.read(id, r, span).await.map(Some),
            Op::Subscribe(s) => self.subscribe(id, s, span).await.map(|()| None),
            Op::Unsubscribe { sub } => self.unsubscribe(id, sub).await.map(Some),
        }
    }

    fn forbidden(&self, what: &str) -> WireError {
        WireError::new(
            ErrorCode::Forbidden,
            format!(
                "the token {} does not allow {what}",
                self.grant.token_name.as_deref().unwrap_or("-")
            ),
        )
    }

    fn check_scope(&self, aggregate: &str) -> Result<(), WireError> {
        if self.grant.covers(aggregate) {
            return Ok(());
        }
        Err(WireError::new(
            ErrorCode::Forbidden,
            format!(
                "aggregate {aggregate:?} is outside the token's scope {:?}",
                self.grant.scope.as_deref().unwrap_or("")
            ),
        ))
    }

    async fn append(&self, id: u64, a: AppendOp, span: tracing::Span) -> Result<String, WireError> {
        if !self.grant.permissions.can_append() {
            return Err(self.forbidden("append"));
        }
        self.check_scope(&a.aggregate)?;
        let store = self.shared.store.clone();
        let count = a.events.len();
        let result = tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            store.append(&a.aggregate, a.expected, &a.events)
        })
        .await
        .map_err(|e| {
            WireError::new(
                ErrorCode::StorageFailed,
                format!("the append task failed: {e}"),
            )
        })?;
        match result {
            Ok(appended) => {
                let first = if count > 1 {
                    format!(",\"first_seq\":{}", appended.first_seq)
                } else {
                    String::new()
                };
                Ok(ok_answer(
                    id,
                    &format!(
                        ",\"seq\":{},\"version\":{}{first}",
                        appended.last_seq, appended.last_version
                    ),
                ))
            }
            Err(e) => Err(append_error(e)),
        }
    }

    async fn read(&self, id: u64, r: ReadOp, span: tracing::Span) -> Result<String, WireError> {
        if !self.grant.permissions.can_read() {
            return Err(self.forbidden("read"));
        }
        if let ReadSource::Aggregate(a) = &r.source {
            self.check_scope(a)?;
        }
        let store = self.shared.store.clone();
        let config = &self.shared.config;
        let limits = ReadLimits {
            events_max: r.limit.map_or(
                super::READ_EVENTS_DEFAULT.min(config.read_events_max),
                |l| {
                    usize::try_from(l)
                        .unwrap_or(usize::MAX)
                        .min(config.read_events_max)
                },
            ),
            bytes_max: config.read_response_bytes_max,
        };
        let scope = self.grant.scope.clone();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            read_page(&store, &r, scope.as_deref(), limits, id)
        })
        .await
        .map_err(|e| WireError::new(ErrorCode::ReadFailed, format!("the read task failed: {e}")))?
    }

    async fn subscribe(
        &mut self,
        id: u64,
        s: SubscribeOp,
        span: tracing::Span,
    ) -> Result<(), WireError> {
        if !self.grant.permissions.can_read() {
            return Err(self.forbidden("subscribe"));
        }
        let prefix = match (&self.grant.scope, s.aggregate_prefix) {
            (None, p) => p,
            (Some(scope), None) => Some(scope.clone()),
            (Some(scope), Some(p)) if p.starts_with(scope.as_str()) => Some(p),
            // A wider prefix is narrowed to the scope.
            (Some(scope), Some(p)) if scope.starts_with(p.as_str()) => Some(scope.clone()),
            (Some(scope), Some(p)) => {
                return Err(WireError::new(
                    ErrorCode::Forbidden,
                    format!("aggregate_prefix {p:?} is outside the token's scope {scope:?}"),
                ))
            }
        };
        let config = &self.shared.config;
        let per_connection_max = config.subscriptions_per_connection_max;
        if self.sub_threads.live() >= per_connection_max && self.subs.len() < per_connection_max {
            // Some of them are unsubscribed and still stopping: they end within a follow
            // slice, so a client that unsubscribes and subscribes again is not refused.
            self.sub_threads
                .wait_below(per_connection_max, subscription::SUBSCRIPTION_END_WAIT)
                .await;
        }
        let live = self.sub_threads.live();
        if live >= per_connection_max {
            let stopping = live.saturating_sub(self.subs.len());
            let message = if stopping == 0 {
                format!(
                    "this connection has {live} subscriptions, its limit; unsubscribe one first"
                )
            } else {
                format!(
                    "this connection has {live} subscriptions, its limit, {stopping} of them unsubscribed but still stopping; retry shortly"
                )
            };
            return Err(WireError::new(ErrorCode::TooManySubscriptions, message));
        }
        if self.shared.threads.live() >= config.subscriptions_max {
            return Err(WireError::new(
                ErrorCode::TooManySubscriptions,
                format!(
                    "the server has {} subscriptions, its limit; retry later",
                    config.subscriptions_max
                ),
            ));
        }
        let from = s.from.unwrap_or_else(|| self.shared.store.next_seq());
        let filter = Filter {
            event_types: s.types,
            aggregate_prefix: prefix,
        };
        let sub = self.next_sub;
        self.next_sub += 1;
        // The answer is queued before the thread starts, so it precedes every event.
        let answer = ok_answer(id, &format!(",\"sub\":{sub},\"from\":{from}"));
        if self.outbox.push(Outgoing::Text(answer)).await.is_err() {
            return Ok(());
        }
        let start = subscription::Start {
            conn_id: self.conn_id,
            connection_threads: Arc::clone(&self.sub_threads),
            sub,
            from,
            filter,
        };
        match subscription::spawn(Arc::clone(&self.shared), self.outbox.clone(), start, span) {
            Ok(h) => {
                self.subs.insert(sub, h);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start a subscription thread");
                let end = protocol::sub_end(
                    sub,
                    "unavailable",
                    "the server cannot start the subscription now; retry later",
                );
                let _ = self.outbox.push(Outgoing::Text(end)).await;
            }
        }
        Ok(())
    }

    async fn unsubscribe(&mut self, id: u64, sub: u64) -> Result<String, WireError> {
        let Some(handle) = self.subs.remove(&sub) else {
            return Err(WireError::new(
                ErrorCode::UnknownSubscription,
                format!("no active subscription {sub} on this connection"),
            ));
        };
        handle.stop();
        let _ = self
            .outbox
            .push(Outgoing::SubClosed { sub, text: None })
            .await;
        Ok(ok_answer(id, ""))
    }
}

/// Maps a failed append to its wire error.
fn append_error(e: AppendError) -> WireError {
    match e {
        AppendError::WrongExpectedVersion {
            expected, actual, ..
        } => {
            let mut w = WireError::new(ErrorCode::WrongExpectedVersion, e.to_string());
            w.conflict = Some((expected, actual));
            w
        }
        e @ AppendError::DuplicateEventId { .. } => {
            WireError::new(ErrorCode::DuplicateEventId, e.to_string())
        }
        e @ (AppendError::InvalidName { .. }
        | AppendError::PayloadTooLarge { .. }
        | AppendError::MetadataTooLarge { .. }
        | AppendError::BadEventCount { .. }) => {
            WireError::new(ErrorCode::InvalidEvent, e.to_string())
        }
        e @ (AppendError::Rejected { .. } | AppendError::PluginFailed { .. }) => {
            WireError::new(ErrorCode::Rejected, e.to_string())
        }
        e @ (AppendError::IndexBehind { .. } | AppendError::EarlierAppendPending { .. }) => {
            WireError::new(ErrorCode::Unavailable, e.to_string())
        }
        AppendError::Read(e) => WireError::new(ErrorCode::ReadFailed, e.to_string()),
        e => {
            tracing::error!(error = %e, "append failed in the store");
            WireError::new(ErrorCode::StorageFailed, format!("{e}; nothing was stored"))
        }
    }
}

/// Bounds of one `read` answer.
#[derive(Debug, Clone, Copy)]
struct ReadLimits {
    events_max: usize,
    bytes_max: usize,
}

fn read_failed(e: &ReadError) -> WireError {
    tracing::error!(error = %e, "read failed");
    WireError::new(ErrorCode::ReadFailed, e.to_string())
}

/// A `read` answer being built.
struct Page {
    body: Vec<u8>,
    start: usize,
    count: usize,
    limits: ReadLimits,
}

impl Page {
    fn new(id: u64, limits: ReadLimits) -> Page {
        let mut body = Vec::with_capacity(256);
        body.extend_from_slice(format!("{{\"id\":{id},\"ok\":true,\"events\":[").as_bytes());
        Page {
            start: body.len(),
            body,
            count: 0,
            limits,
        }
    }

    fn push(&mut self, stored: &StoredEvent) -> Result<(), WireError> {
        let e = stored.event().map_err(|e| read_failed(&e))?;
        if self.count > 0 {
            self.body.push(b',');
        }
        crate::json::write_event_json(&mut self.body, &e).map_err(|e| {
            WireError::new(ErrorCode::ReadFailed, format!("cannot write an event: {e}"))
        })?;
        self.count += 1;
        Ok(())
    }

    fn is_full(&self) -> bool {
        self.count >= self.limits.events_max
            || self.body.len() - self.start >= self.limits.bytes_max
    }

    fn finish(mut self, next: u64) -> Result<String, WireError> {
        self.body
            .extend_from_slice(format!("],\"next\":{next}}}").as_bytes());
        String::from_utf8(self.body)
            .map_err(|_| WireError::new(ErrorCode::ReadFailed, "an event is not UTF-8 JSON"))
    }
}

/// One page of a `read`: `{"id":N,"ok":true,"events":[...],"next":K}`, where `next` is
/// the `from` of the following page.
fn read_page(
    store: &crate::store::Store,
    r: &ReadOp,
    scope: Option<&str>,
    limits: ReadLimits,
    id: u64,
) -> Result<String, WireError> {
    let mut page = Page::new(id, limits);
    if limits.events_max == 0 {
        let from = match r.source {
            ReadSource::Aggregate(_) => r.from.unwrap_or(1).max(1),
            _ => r.from.unwrap_or(0),
        };
        return page.finish(from);
    }
    let next = match &r.source {
        ReadSource::Aggregate(aggregate) => {
            let from = r.from.unwrap_or(1).max(1);
            let mut next = from;
            let events = store
                .read_aggregate(aggregate, from, Direction::Forward, limits.events_max)
                .map_err(|e| read_failed(&e))?;
            for item in events {
                let stored = item.map_err(|e| read_failed(&e))?;
                page.push(&stored)?;
                next += 1;
                if page.is_full() {
                    break;
                }
            }
            next
        }
        ReadSource::Type(_) | ReadSource::All => {
            let from = r.from.unwrap_or(0);
            let scan_max = match scope {
                None => limits.events_max,
                Some(_) => limits.events_max.saturating_mul(SCOPED_SCAN_FACTOR),
            };
            let items: Box<dyn Iterator<Item = Result<StoredEvent, ReadError>>> = match &r.source {
                ReadSource::Type(t) => Box::new(
                    store
                        .read_type(t, from, scan_max)
                        .map_err(|e| read_failed(&e))?,
                ),
                _ => Box::new(store.read_all(from, scan_max)),
            };
            let mut next = from;
            for item in items {
                let stored = item.map_err(|e| read_failed(&e))?;
                next = stored.seq() + 1;
                if let Some(prefix) = scope {
                    let e = stored.event().map_err(|e| read_failed(&e))?;
                    if !e.aggregate_id.starts_with(prefix) {
                        continue;
                    }
                }
                page.push(&stored)?;
                if page.is_full() {
                    break;
                }
            }
            next
        }
    };
    page.finish(next)
}
