//! The WebSocket server (feature `server`): a store on the network.
//!
//! One [`Server`](crate::server::Server) serves one [`Store`](crate::store::Store) over HTTP/1.1 on tokio:
//!
//! - `GET /ws` upgrades to a WebSocket carrying one JSON object per text message:
//!   `append`, `read`, `subscribe` and `unsubscribe` requests, their answers, and the
//!   events of subscriptions (`docs/PROTOCOL.md` has every message);
//! - `GET /metrics` gives the store's and the server's metrics in the Prometheus text
//!   format (with an `admin` token when tokens are configured);
//! - `GET /health` answers `{"status":"ok"}` (no token needed).
//!
//! Authentication: a bearer token in the upgrade request's `Authorization` header,
//! checked against the token file ([`tokens`](crate::server::tokens)), which is reread when it changes. A
//! missing or wrong token gets HTTP 401 and nothing else. Without any token configured
//! the server accepts everyone, which it allows only on a loopback address; and since a
//! web page the user opens could then use it too, it refuses, while open, requests
//! carrying an `Origin` header (browsers always send one) and requests whose `Host` is
//! not a loopback name (DNS rebinding).
//!
//! How the safety properties are kept:
//!
//! - *Every limit is bounded* ([`ServerConfig`](crate::server::ServerConfig)): message size, connections,
//!   subscriptions per connection and in total, send queue per connection (in messages
//!   and in bytes).
//! - *A slow consumer slows nobody else.* Answers and subscription events go through a
//!   bounded queue per connection, written by that connection's writer task. Each
//!   subscription follows the store on its own thread ([`Store::follow`](crate::store::Store::follow)), so the
//!   appending clients never wait for a reader; when a connection's queue stays full for
//!   `send_queue_wait_ms`, or its socket takes nothing for that long while there is
//!   something to write, the connection is closed with code 1008, reason "slow
//!   consumer". Idle connections cost two small tasks, no thread.
//! - *A vanished peer is noticed*: the writer pings every `ping_interval_ms` and the
//!   reader closes a connection from which nothing arrived for two intervals (accepted
//!   sockets also have TCP keepalive on, as a backstop).
//! - *Subscriptions have no gap and no duplicate* between stored and live events: one
//!   follower reads the log from the requested seq and then waits for commits, so the
//!   switch is just the follower reaching the head.
//! - *Graceful shutdown loses no acknowledged append*: the server stops accepting, lets
//!   each connection finish the request in hand (an append is acknowledged only after
//!   the store made it durable), ends subscriptions with a reason, flushes each queue,
//!   closes with code 1001, then syncs the log and the index.
//!
//! Tracing: every connection has a span (`conn`, `peer`, `token`), every request a
//! child span (`id`, `op`, `correlation_id`: the first event's correlation id, or
//! `<conn>.<id>` when it has none); the store's `append` span, and the plugins it runs,
//! are children of the request's span.

mod config;
mod connection;
mod error;
mod metrics;
mod protocol;
mod subscription;
mod tls;
pub mod tokens;

pub use config::{
    ConfigError, ServerConfig, TlsFiles, CONNECTIONS_MAX_DEFAULT, HANDSHAKE_TIMEOUT_MS_DEFAULT,
    LISTEN_DEFAULT, MESSAGE_SIZE_BYTES_MAX_DEFAULT, PING_INTERVAL_MS_DEFAULT, READ_EVENTS_DEFAULT,
    READ_EVENTS_MAX_DEFAULT, READ_RESPONSE_BYTES_MAX_DEFAULT, SEND_QUEUE_BYTES_MAX_DEFAULT,
    SEND_QUEUE_LEN_MAX_DEFAULT, SEND_QUEUE_WAIT_MS_DEFAULT, SHUTDOWN_TIMEOUT_MS_DEFAULT,
    SUBSCRIPTIONS_MAX_DEFAULT, SUBSCRIPTIONS_PER_CONNECTION_MAX_DEFAULT, WORKER_THREADS_DEFAULT,
};
pub use error::ServerError;
pub use protocol::ErrorCode;

use crate::store::Store;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics::ServerMetrics;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokens::{Authenticator, Grant, Refusal};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::Instrument;

/// The WebSocket endpoint's path.
pub const WS_PATH: &str = "/ws";
/// Open TCP connections (including those not yet upgraded) allowed per allowed
/// WebSocket connection; past it new sockets are closed at once.
const TCP_CONNECTIONS_PER_WS_MAX: usize = 2;
/// Pause after `accept` fails (out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Messages up to this multiple of `message_size_bytes_max` are read and answered with
/// an error; larger ones end the connection.
const MESSAGE_SIZE_READ_FACTOR: usize = 2;
/// WebSocket read buffer per connection: small, so idle connections are cheap.
const WS_READ_BUFFER_BYTES: usize = 8 << 10;
/// WebSocket write buffer target per connection.
const WS_WRITE_BUFFER_BYTES: usize = 64 << 10;

/// Counts live tasks or threads; lets shutdown wait for them all, and a connection for
/// one of its subscription threads to end.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    live: AtomicUsize,
    /// Notified each time one ends.
    ended: Notify,
}

/// Counts as live in a [`Tracker`] until dropped.
#[derive(Debug)]
pub(crate) struct TrackerGuard(Arc<Tracker>);

impl Tracker {
    pub(crate) fn enter(self: &Arc<Self>) -> TrackerGuard {
        self.live.fetch_add(1, Ordering::AcqRel);
        TrackerGuard(Arc::clone(self))
    }

    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Waits until nothing is live, or `timeout` passes; returns whether nothing is.
    async fn wait_idle(&self, timeout: Duration) -> bool {
        self.wait_below(1, timeout).await
    }

    /// Waits until fewer than `limit` are live, or `timeout` passes; returns whether
    /// fewer are.
    pub(crate) async fn wait_below(&self, limit: usize, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.ended.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.live() < limit {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}

/// What every task of a server shares.
pub(crate) struct Shared {
    pub store: Store,
    pub config: ServerConfig,
    pub auth: Authenticator,
    pub metrics: ServerMetrics,
    pub shutdown: watch::Sender<bool>,
    /// Connection tasks (HTTP and WebSocket).
    pub tasks: Arc<Tracker>,
    /// Subscription threads.
    pub threads: Arc<Tracker>,
    pub tcp_open: AtomicUsize,
    pub next_conn_id: AtomicU64,
}

impl Shared {
    pub(crate) fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn ws_config(&self) -> WebSocketConfig {
        let read_max = self
            .config
            .message_size_bytes_max
            .saturating_mul(MESSAGE_SIZE_READ_FACTOR);
        WebSocketConfig::default()
            .read_buffer_size(WS_READ_BUFFER_BYTES)
            .write_buffer_size(WS_WRITE_BUFFER_BYTES)
            .max_message_size(Some(read_max))
            .max_frame_size(Some(read_max))
    }
}

/// A bound server, not yet serving. See [`Server::bind`].
pub struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    local_addr: SocketAddr,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("tls", &self.tls.is_some())
            .field("anonymous", &self.shared.auth.is_anonymous())
            .finish()
    }
}

impl Server {
    /// Checks the configuration, loads the token file and the TLS files, and binds the
    /// listening socket. Call it inside a tokio runtime (see [`runtime`]); the server
    /// serves on that runtime.
    ///
    /// # Errors
    /// [`ServerError::Config`], [`ServerError::Tokens`], [`ServerError::NoTokens`] (a
    /// non-loopback address without tokens), [`ServerError::Tls`], [`ServerError::Bind`].
    ///
    /// # Examples
    /// ```no_run
    /// # async fn example(store: eventlog::store::Store) -> Result<(), eventlog::server::ServerError> {
    /// use eventlog::server::{Server, ServerConfig};
    /// let mut config = ServerConfig::default();
    /// config.listen = "127.0.0.1:0".parse().unwrap();
    /// let server = Server::bind(store, config).await?;
    /// println!("listening on ws://{}/ws", server.local_addr());
    /// server.serve(eventlog::server::shutdown_signal()).await
    /// # }
    /// ```
    pub async fn bind(store: Store, config: ServerConfig) -> Result<Server, ServerError> {
        config.validate()?;
        let loopback = config.listen.ip().is_loopback();
        let auth = Authenticator::open(config.tokens_path.clone(), loopback)?;
        if auth.token_count() == 0 && !loopback {
            return Err(ServerError::NoTokens {
                addr: config.listen,
            });
        }
        let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
        if auth.is_anonymous() {
            tracing::warn!(%local_addr, "no token configured: every client may read and append (allowed on loopback only); add one with `eventlog token add`");
        }
        let (shutdown, _) = watch::channel(false);
        Ok(Server {
            shared: Arc::new(Shared {
                store,
                config,
                auth,
                metrics: ServerMetrics::default(),
                shutdown,
                tasks: Arc::new(Tracker::default()),
                threads: Arc::new(Tracker::default()),
                tcp_open: AtomicUsize::new(0),
                next_conn_id: AtomicU64::new(1),
            }),
            listener,
            tls,
            local_addr,
        })
    }

    /// The address the server listens on (with the port picked when port 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether clients need a token (false: no token is configured, loopback only).
    pub fn requires_token(&self) -> bool {
        !self.shared.auth.is_anonymous()
    }

    /// Serves until `shutdown` completes, then shuts down gracefully: stops accepting,
    /// lets every connection finish its in-flight request, ends subscriptions with a
    /// reason, flushes the send queues, closes the connections (code 1001), and syncs
    /// the store's log and index. Connections still busy after
    /// `ServerConfig::shutdown_timeout_ms` are dropped.
    ///
    /// # Errors
    /// [`ServerError::Flush`] if the final sync fails.
    pub async fn serve<F>(self, shutdown: F) -> Result<(), ServerError>
    where
        F: Future<Output = ()> + Send,
    {
        let Server {
            shared,
            listener,
            tls,
            local_addr,
        } = self;
        tracing::info!(%local_addr, tls = tls.is_some(), "serving");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => accept(&shared, tls.clone(), tcp, peer),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    }
                },
            }
        }
        drop(listener);
        tracing::info!(
            connections = shared.metrics.connections_open.load(Ordering::Relaxed),
            "shutting down: no new connections; finishing in-flight requests"
        );
        shared.shutdown.send_replace(true);
        let timeout = Duration::from_millis(shared.config.shutdown_timeout_ms);
        if !shared.tasks.wait_idle(timeout).await {
            tracing::warn!(
                still_open = shared.tasks.live(),
                "connections did not finish within the shutdown timeout; dropping them"
            );
        }
        // Subscription threads notice their stop flag within one follow slice.
        if !shared
            .threads
            .wait_idle(subscription::FOLLOW_SLICE * 8)
            .await
        {
            tracing::warn!(
                still_running = shared.threads.live(),
                "subscription threads did not stop in time"
            );
        }
        let store = shared.store.clone();
        let flushed = tokio::task::spawn_blocking(move || {
            store.log().sync().map_err(|e| e.to_string())?;
            store.flush_index().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| ServerError::Flush(e.to_string()))?;
        flushed.map_err(ServerError::Flush)?;
        tracing::info!("shut down: store synced");
        Ok(())
    }
}

/// Binds and serves until `shutdown` completes: [`Server::bind`] then [`Server::serve`].
/// Use those two to learn the address of a server bound to port 0.
///
/// # Errors
/// As [`Server::bind`] and [`Server::serve`].
pub async fn run<F>(store: Store, config: ServerConfig, shutdown: F) -> Result<(), ServerError>
where
    F: Future<Output = ()> + Send,
{
    Server::bind(store, config).await?.serve(shutdown).await
}

/// A multi-threaded tokio runtime with `config.worker_threads` workers.
///
/// # Errors
/// The operating system refused the threads.
pub fn runtime(config: &ServerConfig) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .max_blocking_threads(128)
        .thread_name("eventlog-server")
        .enable_all()
        .build()
}

/// Completes on SIGINT or SIGTERM (Ctrl-C elsewhere).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => tracing::info!("SIGINT received"),
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Holds one open TCP connection's place in `Shared::tcp_open`.
struct TcpSlot(Arc<Shared>);

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.0.tcp_open.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept(
    shared: &Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let tcp_max = shared
        .config
        .connections_max
        .saturating_mul(TCP_CONNECTIONS_PER_WS_MAX)
        .saturating_add(16);
    if shared.tcp_open.fetch_add(1, Ordering::AcqRel) >= tcp_max {
        shared.tcp_open.fetch_sub(1, Ordering::AcqRel);
        tracing::debug!(%peer, "too many open sockets: closed at once");
        return;
    }
    let slot = TcpSlot(Arc::clone(shared));
    let _ = tcp.set_nodelay(true);
    if let Err(e) = set_keepalive(&tcp) {
        tracing::debug!(%peer, error = %e, "cannot turn on TCP keepalive");
    }
    let guard = shared.tasks.enter();
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let _guard = guard;
        let _slot = slot;
        // The whole time before the upgrade (TLS handshake, the request, its answer) is
        // bounded, so that sockets without a token cannot hold the socket budget
        // (`tcp_max`) for long. Once upgraded, the WebSocket runs in a task of its own.
        let handshake = Duration::from_millis(shared.config.handshake_timeout_ms);
        let served = tokio::time::timeout(handshake, async {
            match tls {
                None => serve_http(shared, tcp, peer).await,
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => serve_http(shared, stream, peer).await,
                    Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                },
            }
        })
        .await;
        if served.is_err() {
            tracing::debug!(%peer, timeout_ms = handshake.as_millis() as u64, "not upgraded in time: socket closed");
        }
    });
}

/// Turns on TCP keepalive (`SO_KEEPALIVE`), so that the kernel too probes a connection
/// that stays idle and drops it if the peer is gone. With the kernel's default timers
/// (two hours on Linux) this is a backstop: the WebSocket pings (`ping_interval_ms`)
/// are what notice a dead peer in time.
#[cfg(unix)]
fn set_keepalive(tcp: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is `tcp`'s open socket, borrowed for the call; the option
    // value is a live `c_int` and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(unix))]
fn set_keepalive(_tcp: &TcpStream) -> std::io::Result<()> {
    Ok(())
}

async fn serve_http<I>(shared: Arc<Shared>, io: I, peer: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut shutdown = shared.shutdown.subscribe();
    let service_shared = Arc::clone(&shared);
    let service = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&service_shared);
        async move {
            let mut r = route(shared, req, peer);
            // One request per socket: `/health`, `/metrics` and refused requests close it
            // after their answer, so a client cannot keep a socket (and its place in the
            // socket budget) with a request now and then, each restarting the header
            // timer. (Not `keep_alive(false)` on the builder: hyper would then put
            // `Connection: close` on the upgrade's answer too.)
            if r.status() != StatusCode::SWITCHING_PROTOCOLS {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(r)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(shared.config.handshake_timeout_ms))
        .max_buf_size(64 << 10);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        }
        () = shutting_down(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Completes once the server is shutting down.
pub(crate) async fn shutting_down(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if !content_type.is_empty() {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    r
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = response(StatusCode::UNAUTHORIZED, "", Bytes::new());
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn authenticate(
    shared: &Shared,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<Grant, Refusal> {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let outcome = shared.auth.authenticate(header);
    if let Err(refusal) = &outcome {
        shared.metrics.auth_failures.add(1);
        tracing::info!(%peer, path = req.uri().path(), reason = %refusal, "refused: 401");
    }
    outcome
}

/// Authenticates `req` ([`authenticate`]; 401 when refused) and, when no token is
/// configured, refuses what a web page could send: an `Origin` header (403) or a `Host`
/// that is not a loopback name (421).
fn admit(
    shared: &Shared,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<Grant, Box<Response<Full<Bytes>>>> {
    let grant = authenticate(shared, req, peer).map_err(|_| Box::new(unauthorized()))?;
    if grant.token_name.is_some() {
        return Ok(grant);
    }
    let text = "text/plain; charset=utf-8";
    let path = req.uri().path();
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        tracing::warn!(%peer, path, %origin, "refused: 403, a request from a web page while no token is configured (any page the user opens could read and append); to serve browsers, add a token with `eventlog token add NAME --read`");
        return Err(Box::new(response(
            StatusCode::FORBIDDEN,
            text,
            format!("refused: no token is configured, so requests from web pages (Origin: {origin}) are not served; add a token (`eventlog token add`) and send it as `Authorization: Bearer <token>`\n"),
        )));
    }
    if let Some(host) = req.headers().get(header::HOST) {
        let host = String::from_utf8_lossy(host.as_bytes());
        if !is_loopback_host(&host) {
            tracing::warn!(%peer, path, %host, "refused: 421, Host is not a loopback name while no token is configured (a web page could reach the server through DNS rebinding); connect to localhost or 127.0.0.1, or add a token with `eventlog token add NAME --read`");
            return Err(Box::new(response(
                StatusCode::MISDIRECTED_REQUEST,
                text,
                format!("refused: no token is configured, so only requests to localhost or a loopback address are served, not to Host {host}; connect to 127.0.0.1, or add a token (`eventlog token add`)\n"),
            )));
        }
    }
    Ok(grant)
}

/// Whether a `Host` header value names this machine, with or without a port:
/// `localhost`, a name under `.localhost` (loopback by RFC 6761; browsers never resolve
/// it through DNS), or a loopback IP address (`127.0.0.0/8`, `[::1]`).
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal: "[::1]" or "[::1]:7070".
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => ip,
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return false,
            None => host,
        }
    };
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return ip.to_canonical().is_loopback();
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

fn route(shared: Arc<Shared>, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/health") => {
            if shared.is_shutting_down() {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    &b"{\"status\":\"shutting_down\"}"[..],
                )
            } else {
                response(
                    StatusCode::OK,
                    "application/json",
                    &b"{\"status\":\"ok\"}"[..],
                )
            }
        }
        (&Method::GET, "/metrics") => match admit(&shared, &req, peer) {
            Err(refused) => *refused,
            Ok(grant) if !grant.permissions.admin => response(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                "the token needs the admin permission\n",
            ),
            Ok(_) => {
                let mut text = shared.store.metrics_text();
                if let Some(publisher) = &shared.config.publisher {
                    text.push_str(&publisher.metrics_text());
                }
                shared.metrics.render(&mut text, shared.store.next_seq());
                response(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    text,
                )
            }
        },
        (_, WS_PATH) => upgrade(shared, req, peer),
        _ => response(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the endpoints are /ws, /metrics and /health\n",
        ),
    }
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Holds one WebSocket connection's place in `connections_open`.
struct ConnectionSlot(Arc<Shared>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0
            .metrics
            .connections_open
            .fetch_sub(1, Ordering::AcqRel);
    }
}

fn upgrade(
    shared: Arc<Shared>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    // Authentication comes first: a client without a valid token learns nothing else.
    let grant = match admit(&shared, &req, peer) {
        Ok(g) => g,
        Err(refused) => return *refused,
    };
    let text = "text/plain; charset=utf-8";
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let is_upgrade = req.method() == Method::GET
        && header_has_token(&req, header::CONNECTION, "upgrade")
        && header_has_token(&req, header::UPGRADE, "websocket")
        && req
            .headers()
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v.as_bytes() == b"13");
    let Some(key) = key.filter(|_| is_upgrade) else {
        return response(
            StatusCode::BAD_REQUEST,
            text,
            "expected a WebSocket upgrade (GET with Upgrade: websocket, version 13)\n",
        );
    };
    if shared.is_shutting_down() {
        return response(StatusCode::SERVICE_UNAVAILABLE, text, "shutting down\n");
    }
    let open = shared
        .metrics
        .connections_open
        .fetch_add(1, Ordering::AcqRel);
    let slot = ConnectionSlot(Arc::clone(&shared));
    if open as usize >= shared.config.connections_max {
        drop(slot);
        shared.metrics.connections_refused_limit.add(1);
        tracing::warn!(%peer, limit = shared.config.connections_max, "refused: too many connections");
        return response(
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            "too many connections\n",
        );
    }
    let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
        return response(StatusCode::INTERNAL_SERVER_ERROR, text, "");
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    shared.metrics.connections_total.add(1);
    let guard = shared.tasks.enter();
    let span = tracing::info_span!(
        "connection",
        conn = conn_id,
        %peer,
        token = grant.token_name.as_deref().unwrap_or("-")
    );
    tokio::spawn(
        async move {
            let _guard = guard;
            let _slot = slot;
            match on_upgrade.await {
                Ok(upgraded) => {
                    connection::run(shared, TokioIo::new(upgraded), grant, conn_id).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        }
        .instrument(span),
    );
    let mut r = response(StatusCode::SWITCHING_PROTOCOLS, "", Bytes::new());
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `tcp` has `SO_KEEPALIVE`, read through a duplicate of its descriptor.
    fn keepalive_of(tcp: TcpStream) -> (bool, TcpStream) {
        let std = tcp.into_std().unwrap();
        let probe = tokio::net::TcpSocket::from_std_stream(std.try_clone().unwrap());
        let on = probe.keepalive().unwrap();
        drop(probe);
        (on, TcpStream::from_std(std).unwrap())
    }

    #[tokio::test]
    async fn accepted_sockets_get_tcp_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let (on, tcp) = keepalive_of(tcp);
        assert!(!on, "off by default");
        set_keepalive(&tcp).unwrap();
        assert!(keepalive_of(tcp).0);
    }

    #[test]
    fn loopback_hosts_are_told_from_others_with_or_without_a_port() {
        for host in [
            "localhost",
            "LOCALHOST:7070",
            "localhost.",
            "app.localhost:80",
            "127.0.0.1",
            "127.0.0.1:7070",
            "127.1.2.3:1",
            "[::1]",
            "[::1]:7070",
            "[::ffff:127.0.0.1]:7070",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:7070",
            "localhost.attacker.example",
            "127.0.0.1.nip.io:7070",
            "10.0.0.1:7070",
            "0.0.0.0:7070",
            "[::]:7070",
            "::1",
            "[::1]x",
            "localhost:http",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
