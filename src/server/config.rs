//! The server's settings, each with a documented default and checked by
//! [`ServerConfig::validate`].

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// Default address: loopback, port 7070.
pub const LISTEN_DEFAULT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 7070);
/// Default largest request message: 1 MiB.
pub const MESSAGE_SIZE_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Default most open WebSocket connections: 1,024.
pub const CONNECTIONS_MAX_DEFAULT: usize = 1_024;
/// Default most subscriptions on one connection: 16.
pub const SUBSCRIPTIONS_PER_CONNECTION_MAX_DEFAULT: usize = 16;
/// Default most subscriptions on the whole server: 4,096 (each is a thread).
pub const SUBSCRIPTIONS_MAX_DEFAULT: usize = 4_096;
/// Default messages waiting to be written to one connection: 1,024.
pub const SEND_QUEUE_LEN_MAX_DEFAULT: usize = 1_024;
/// Default bytes of messages waiting to be written to one connection: 16 MiB.
pub const SEND_QUEUE_BYTES_MAX_DEFAULT: usize = 16 << 20;
/// Default time a full send queue may stay full, or a socket take nothing while the
/// server has something to write, before its consumer is disconnected: 2 s.
pub const SEND_QUEUE_WAIT_MS_DEFAULT: u64 = 2_000;
/// Default time between two WebSocket pings to a client: 30 s. A client from which
/// nothing (not even a pong) arrives for two intervals is disconnected.
pub const PING_INTERVAL_MS_DEFAULT: u64 = 30_000;
/// Default most events in one `read` answer: 1,000.
pub const READ_EVENTS_MAX_DEFAULT: usize = 1_000;
/// Default `limit` of a `read` that gives none: 100.
pub const READ_EVENTS_DEFAULT: usize = 100;
/// Default bytes of events after which a `read` answer stops early: 1 MiB.
pub const READ_RESPONSE_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Default time from a socket's accept to its upgrade (TLS handshake, HTTP request): 10 s.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default time graceful shutdown waits for connections to finish: 10 s.
pub const SHUTDOWN_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default tokio worker threads of [`super::runtime`]: 2.
pub const WORKER_THREADS_DEFAULT: usize = 2;

/// PEM files of the certificate chain and private key for TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain (PEM, leaf first).
    pub cert_path: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
}

/// Settings of [`Server::bind`](super::Server::bind). Start from `ServerConfig::default()`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Where to listen. Default `127.0.0.1:7070`; port 0 picks a free port (see
    /// [`Server::local_addr`](super::Server::local_addr)).
    pub listen: SocketAddr,
    /// The token file (see [`super::tokens`]). `None`, or a file without tokens, runs
    /// without authentication, which is allowed only on a loopback address. Default `None`.
    pub tokens_path: Option<PathBuf>,
    /// Serve TLS (`wss://`, `https://`) with these files. Default `None`: plain TCP.
    pub tls: Option<TlsFiles>,
    /// Largest request message. A message up to twice this is read and answered with a
    /// `message_too_large` error (the connection stays open); a larger one is answered
    /// and the connection closed (code 1009), since the rest of it cannot be skipped.
    /// Default 1 MiB.
    pub message_size_bytes_max: usize,
    /// Most open WebSocket connections; more are refused with HTTP 503. Default 1,024.
    pub connections_max: usize,
    /// Most subscriptions on one connection. Default 16.
    pub subscriptions_per_connection_max: usize,
    /// Most subscriptions on the server (each runs on its own thread). Default 4,096.
    pub subscriptions_max: usize,
    /// Messages (answers and subscription events) waiting to be written to one
    /// connection. Default 1,024. Larger absorbs bursts; smaller bounds memory.
    pub send_queue_len_max: usize,
    /// Bytes of the messages waiting to be written to one connection: the queue is full
    /// when either this or `send_queue_len_max` is reached (a single message larger
    /// than this is let in when the queue is empty). One `read` answer or event can be
    /// over 1 MiB, so this, not the message count, bounds a connection's memory.
    /// Default 16 MiB.
    pub send_queue_bytes_max: usize,
    /// How long a producer waits for room in a full send queue, and how long the socket
    /// may take no byte while the server has something to write to it, before the
    /// consumer is disconnected as slow (close code 1008, reason "slow consumer").
    /// Default 2 s.
    pub send_queue_wait_ms: u64,
    /// Time between two WebSocket pings the server sends each client. A connection from
    /// which nothing arrives (no pong, no message) for two intervals is closed (code
    /// 1001, reason "no answer to pings"): that is how a peer that vanished without
    /// closing (a machine gone, a network cut) is noticed. Default 30 s.
    pub ping_interval_ms: u64,
    /// Most events in one `read` answer; larger `limit`s are lowered to it. Default 1,000.
    pub read_events_max: usize,
    /// A `read` answer stops adding events once it holds this many bytes of them (it
    /// always holds at least one). Default 1 MiB.
    pub read_response_bytes_max: usize,
    /// Time a socket may stay open before its upgrade to a WebSocket: the TLS
    /// handshake, the HTTP request and its answer. Sockets that do not upgrade are
    /// closed after one answer. Default 10 s.
    pub handshake_timeout_ms: u64,
    /// How long graceful shutdown waits for connections to finish their in-flight
    /// requests and flush their queues before dropping them. Default 10 s.
    pub shutdown_timeout_ms: u64,
    /// Worker threads of the runtime made by [`super::runtime`]. Default 2.
    pub worker_threads: usize,
    /// An embedding application's publisher: its running subscriptions' lag, deliveries,
    /// retries and dead letters are added to `/metrics`. Default `None`.
    pub publisher: Option<crate::publisher::Publisher>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: LISTEN_DEFAULT,
            tokens_path: None,
            tls: None,
            message_size_bytes_max: MESSAGE_SIZE_BYTES_MAX_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            subscriptions_per_connection_max: SUBSCRIPTIONS_PER_CONNECTION_MAX_DEFAULT,
            subscriptions_max: SUBSCRIPTIONS_MAX_DEFAULT,
            send_queue_len_max: SEND_QUEUE_LEN_MAX_DEFAULT,
            send_queue_bytes_max: SEND_QUEUE_BYTES_MAX_DEFAULT,
            send_queue_wait_ms: SEND_QUEUE_WAIT_MS_DEFAULT,
            ping_interval_ms: PING_INTERVAL_MS_DEFAULT,
            read_events_max: READ_EVENTS_MAX_DEFAULT,
            read_response_bytes_max: READ_RESPONSE_BYTES_MAX_DEFAULT,
            handshake_timeout_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            shutdown_timeout_ms: SHUTDOWN_TIMEOUT_MS_DEFAULT,
            worker_threads: WORKER_THREADS_DEFAULT,
            publisher: None,
        }
    }
}

/// A setting out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting is below its minimum or above its maximum. Change it.
    #[error("{setting} is {value}, must be in {min}..={max}")]
    OutOfRange {
        /// The setting's name (the field of [`ServerConfig`]).
        setting: &'static str,
        /// Its value.
        value: u64,
        /// The smallest allowed.
        min: u64,
        /// The largest allowed.
        max: u64,
    },
}

impl ServerConfig {
    /// Checks every setting's range.
    ///
    /// # Errors
    /// [`ConfigError::OutOfRange`] naming the first setting out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks: [(&'static str, u64, u64, u64); 13] = [
            (
                "message_size_bytes_max",
                self.message_size_bytes_max as u64,
                256,
                1 << 30,
            ),
            ("connections_max", self.connections_max as u64, 1, 1 << 20),
            (
                "subscriptions_per_connection_max",
                self.subscriptions_per_connection_max as u64,
                0,
                1_024,
            ),
            (
                "subscriptions_max",
                self.subscriptions_max as u64,
                0,
                1 << 16,
            ),
            (
                "send_queue_len_max",
                self.send_queue_len_max as u64,
                1,
                1 << 20,
            ),
            (
                "send_queue_bytes_max",
                self.send_queue_bytes_max as u64,
                1 << 10,
                1 << 32,
            ),
            ("send_queue_wait_ms", self.send_queue_wait_ms, 1, 600_000),
            ("ping_interval_ms", self.ping_interval_ms, 10, 3_600_000),
            ("read_events_max", self.read_events_max as u64, 1, 100_000),
            (
                "read_response_bytes_max",
                self.read_response_bytes_max as u64,
                1,
                1 << 30,
            ),
            (
                "handshake_timeout_ms",
                self.handshake_timeout_ms,
                1,
                600_000,
            ),
            (
                "shutdown_timeout_ms",
                self.shutdown_timeout_ms,
                0,
                3_600_000,
            ),
            ("worker_threads", self.worker_threads as u64, 1, 1_024),
        ];
        for (setting, value, min, max) in checks {
            if value < min || value > max {
                return Err(ConfigError::OutOfRange {
                    setting,
                    value,
                    min,
                    max,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(ServerConfig::default().validate(), Ok(()));
    }

    #[test]
    fn a_zero_queue_is_rejected_with_its_name() {
        let config = ServerConfig {
            send_queue_len_max: 0,
            ..ServerConfig::default()
        };
        let e = config.validate().unwrap_err();
        assert!(e.to_string().contains("send_queue_len_max"), "{e}");
    }

    #[test]
    fn a_byte_bound_below_a_kibibyte_is_rejected_with_its_name() {
        let config = ServerConfig {
            send_queue_bytes_max: 1_000,
            ..ServerConfig::default()
        };
        let e = config.validate().unwrap_err();
        assert!(e.to_string().contains("send_queue_bytes_max"), "{e}");
    }
}
