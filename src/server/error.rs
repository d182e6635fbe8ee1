//! Why the server could not start or stop cleanly.

use super::config::ConfigError;
use super::tokens::TokenError;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors from [`Server::bind`](super::Server::bind) and
/// [`Server::serve`](super::Server::serve).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A setting is out of range. Fix the configuration.
    #[error("invalid server configuration: {0}")]
    Config(#[from] ConfigError),
    /// The token file cannot be read. Fix or remove it (`eventlog token list` reads it).
    #[error(transparent)]
    Tokens(#[from] TokenError),
    /// The address is not loopback and no token is configured: the server would be open
    /// to the network. Add a token (`eventlog token add NAME --read`) or listen on
    /// 127.0.0.1.
    #[error("refusing to listen on {addr} without a token: it is not a loopback address; add one with `eventlog token add NAME --read` or listen on 127.0.0.1")]
    NoTokens {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The address cannot be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key cannot be used.
    #[error("TLS: {}: {reason}", path.display())]
    Tls {
        /// The certificate or key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Making everything durable at shutdown failed; acknowledged appends were synced
    /// when acknowledged (under `Durability::Sync`), but check the disk.
    #[error("flushing the store at shutdown failed: {0}")]
    Flush(String),
}
