//! Bearer tokens: the token file, and checking a presented token against it.
//!
//! A token is 32 random bytes from the operating system's CSPRNG, written as 64 hex
//! digits. It is shown once, when made; the file keeps only its SHA-256 digest, with a
//! name, permissions, an optional aggregate-id prefix it is confined to, its creation
//! time and an optional expiry:
//!
//! ```json
//! {"version":1,"tokens":[{"name":"billing","sha256":"9f86d0…","permissions":["read","append"],
//!   "scope":"billing-","created":"2025-01-31T10:00:00.000000Z","expires":null}]}
//! ```
//!
//! Checking a token hashes it and compares the digest with every stored digest in
//! constant time (no early exit, neither within a digest nor across tokens), so the time
//! taken says nothing about how close a guess was. Edits take an exclusive lock on a
//! `.lock` file beside the token file and replace the file atomically (write, fsync,
//! rename), so a running server reading it never sees half a file.

use crate::json::{format_rfc3339_us, parse_rfc3339_us};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// The token file's name inside a store directory.
pub const TOKENS_FILE_NAME: &str = "tokens.json";
/// Random bytes in a token (it is written as twice as many hex digits).
pub const TOKEN_BYTES: usize = 32;
/// Longest token name, in bytes.
pub const TOKEN_NAME_BYTES_MAX: usize = 64;
/// Longest token presented in an `Authorization` header that is even hashed.
const PRESENTED_TOKEN_BYTES_MAX: usize = 1_024;
/// The token file's format version.
const FILE_VERSION: u32 = 1;
/// Microseconds in a day.
const MICROS_PER_DAY: i64 = 86_400 * 1_000_000;

/// What a token allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions {
    /// `read` and `subscribe`.
    pub read: bool,
    /// `append`.
    pub append: bool,
    /// Everything, and `GET /metrics`.
    pub admin: bool,
}

impl Permissions {
    /// Every permission (what clients get when the server runs without tokens).
    pub const ALL: Permissions = Permissions {
        read: true,
        append: true,
        admin: true,
    };

    /// Whether reads and subscriptions are allowed.
    pub fn can_read(self) -> bool {
        self.read || self.admin
    }

    /// Whether appends are allowed.
    pub fn can_append(self) -> bool {
        self.append || self.admin
    }

    /// The names of the permissions held, in the file's order.
    pub fn names(self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.read {
            names.push("read");
        }
        if self.append {
            names.push("append");
        }
        if self.admin {
            names.push("admin");
        }
        names
    }

    fn from_names(names: &[String]) -> Result<Permissions, String> {
        let mut p = Permissions::default();
        for n in names {
            match n.as_str() {
                "read" => p.read = true,
                "append" => p.append = true,
                "admin" => p.admin = true,
                other => return Err(format!("unknown permission {other:?}")),
            }
        }
        Ok(p)
    }
}

impl fmt::Display for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

/// One token as stored (without the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Its name, unique in the file.
    pub name: String,
    /// SHA-256 of the token text.
    pub sha256: [u8; 32],
    /// What it allows.
    pub permissions: Permissions,
    /// Only aggregates whose id starts with this (for reads, appends and subscriptions);
    /// `None`: all.
    pub scope: Option<String>,
    /// When it was made, microseconds since the Unix epoch.
    pub created_us: i64,
    /// When it stops working, microseconds since the Unix epoch; `None`: never.
    pub expires_us: Option<i64>,
}

impl TokenRecord {
    /// Whether it has expired at `now_us`.
    pub fn is_expired(&self, now_us: i64) -> bool {
        self.expires_us.is_some_and(|e| now_us >= e)
    }
}

/// Why the token file could not be read, written or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Reading or writing the file failed. Check the path and its permissions.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("read", "write", "lock").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a token file. Fix it by hand or remove it (every token is lost).
    #[error("{} is not a valid token file: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A token of this name already exists. Remove it first, or pick another name.
    #[error("a token named {name:?} already exists")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// No token has this name. `eventlog token list` shows the names.
    #[error("no token named {name:?}")]
    NoSuchToken {
        /// The name.
        name: String,
    },
    /// The name is empty, too long, or has characters other than ASCII letters, digits,
    /// `.`, `_` and `-`.
    #[error("invalid token name {name:?}: use 1..={TOKEN_NAME_BYTES_MAX} ASCII letters, digits, '.', '_' or '-'")]
    InvalidName {
        /// The name.
        name: String,
    },
    /// A token must allow something.
    #[error("a token needs at least one permission (read, append or admin)")]
    NoPermission,
    /// The operating system's random generator failed.
    #[error("cannot get random bytes for a token: {0}")]
    Random(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJson {
    version: u32,
    tokens: Vec<RecordJson>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordJson {
    name: String,
    sha256: String,
    permissions: Vec<String>,
    scope: Option<String>,
    created: String,
    expires: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

fn time_text(us: i64) -> String {
    format_rfc3339_us(us).unwrap_or_else(|| us.to_string())
}

fn time_parse(text: &str) -> Result<i64, String> {
    parse_rfc3339_us(text).or_else(|e| text.parse::<i64>().map_err(|_| e))
}

pub(crate) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// SHA-256 of a token's text.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new token: 32 bytes from the operating system's CSPRNG, as 64 hex digits.
///
/// # Errors
/// [`TokenError::Random`] if the operating system has no randomness to give.
pub fn generate_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(hex(&bytes))
}

/// Checks a token name: 1..=64 ASCII letters, digits, `.`, `_`, `-`.
///
/// # Errors
/// [`TokenError::InvalidName`].
pub fn check_token_name(name: &str) -> Result<(), TokenError> {
    let ok = !name.is_empty()
        && name.len() <= TOKEN_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(TokenError::InvalidName { name: name.into() })
    }
}

/// The tokens of a token file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFile {
    /// The tokens, in the order they were added.
    pub tokens: Vec<TokenRecord>,
}

impl TokenFile {
    /// Reads the file at `path`; a missing file has no tokens.
    ///
    /// # Errors
    /// [`TokenError::Io`], [`TokenError::BadFile`].
    pub fn load(path: &Path) -> Result<TokenFile, TokenError> {
        let text = match fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(TokenFile::default()),
            Err(source) => {
                return Err(TokenError::Io {
                    action: "read",
                    path: path.into(),
                    source,
                })
            }
        };
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<TokenFile, TokenError> {
        let bad = |reason: String| TokenError::BadFile {
            path: path.into(),
            reason,
        };
        let file: FileJson = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        if file.version != FILE_VERSION {
            return Err(bad(format!(
                "version {} is not the supported {FILE_VERSION}",
                file.version
            )));
        }
        let mut tokens = Vec::with_capacity(file.tokens.len());
        for r in file.tokens {
            check_token_name(&r.name).map_err(|e| bad(e.to_string()))?;
            if tokens.iter().any(|t: &TokenRecord| t.name == r.name) {
                return Err(bad(format!("the name {:?} is used twice", r.name)));
            }
            let sha256 = unhex32(&r.sha256)
                .ok_or_else(|| bad(format!("token {:?}: sha256 is not 64 hex digits", r.name)))?;
            let permissions = Permissions::from_names(&r.permissions)
                .map_err(|e| bad(format!("token {:?}: {e}", r.name)))?;
            let created_us = time_parse(&r.created)
                .map_err(|e| bad(format!("token {:?}: created: {e}", r.name)))?;
            let expires_us = match &r.expires {
                None => None,
                Some(t) => Some(
                    time_parse(t).map_err(|e| bad(format!("token {:?}: expires: {e}", r.name)))?,
                ),
            };
            tokens.push(TokenRecord {
                name: r.name,
                sha256,
                permissions,
                scope: r.scope,
                created_us,
                expires_us,
            });
        }
        Ok(TokenFile { tokens })
    }

    fn to_json(&self) -> String {
        let file = FileJson {
            version: FILE_VERSION,
            tokens: self
                .tokens
                .iter()
                .map(|t| RecordJson {
                    name: t.name.clone(),
                    sha256: hex(&t.sha256),
                    permissions: t
                        .permissions
                        .names()
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                    scope: t.scope.clone(),
                    created: time_text(t.created_us),
                    expires: t.expires_us.map(time_text),
                })
                .collect(),
        };
        // Serializing plain strings and vectors cannot fail.
        serde_json::to_string_pretty(&file).unwrap_or_default() + "\n"
    }

    /// Writes the file atomically: a temporary file beside it, fsync, rename, fsync of
    /// the directory. The file is readable by its owner only.
    ///
    /// # Errors
    /// [`TokenError::Io`].
    pub fn save(&self, path: &Path) -> Result<(), TokenError> {
        let io_err = |source| TokenError::Io {
            action: "write",
            path: path.into(),
            source,
        };
        let tmp = sibling(path, ".tmp");
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&tmp).map_err(io_err)?;
        f.write_all(self.to_json().as_bytes()).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        }
        Ok(())
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Holds the exclusive lock of a token file's `.lock` file while alive.
struct EditLock(#[expect(dead_code, reason = "held for its lock only")] File);

fn lock_for_edit(path: &Path) -> Result<EditLock, TokenError> {
    let lock_path = sibling(path, ".lock");
    let io_err = |source| TokenError::Io {
        action: "lock",
        path: lock_path.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io_err)?;
    }
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(io_err)?;
    f.lock().map_err(io_err)?;
    Ok(EditLock(f))
}

/// What [`add_token`] needs besides the file.
#[derive(Debug, Clone, Default)]
pub struct NewToken {
    /// Its name (1..=64 ASCII letters, digits, `.`, `_`, `-`), unique in the file.
    pub name: String,
    /// What it allows; at least one.
    pub permissions: Permissions,
    /// Confine it to aggregates whose id starts with this.
    pub scope: Option<String>,
    /// It stops working this long after now; `None`: never.
    pub expires_in: Option<Duration>,
}

/// Makes a token, stores its hash in the file at `path` (created with its directory if
/// needed), and returns its record and the token itself, which is never stored.
///
/// # Errors
/// [`TokenError::InvalidName`], [`TokenError::NoPermission`], [`TokenError::NameTaken`],
/// [`TokenError::Io`], [`TokenError::BadFile`], [`TokenError::Random`].
pub fn add_token(path: &Path, new: &NewToken) -> Result<(TokenRecord, String), TokenError> {
    check_token_name(&new.name)?;
    if new.permissions == Permissions::default() {
        return Err(TokenError::NoPermission);
    }
    let _lock = lock_for_edit(path)?;
    let mut file = TokenFile::load(path)?;
    if file.tokens.iter().any(|t| t.name == new.name) {
        return Err(TokenError::NameTaken {
            name: new.name.clone(),
        });
    }
    let token = generate_token()?;
    let created_us = now_us();
    let record = TokenRecord {
        name: new.name.clone(),
        sha256: hash_token(&token),
        permissions: new.permissions,
        scope: new.scope.clone(),
        created_us,
        expires_us: new
            .expires_in
            .map(|d| created_us.saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))),
    };
    file.tokens.push(record.clone());
    file.save(path)?;
    Ok((record, token))
}

/// Removes the token named `name` from the file at `path`; returns its record.
///
/// # Errors
/// [`TokenError::NoSuchToken`], [`TokenError::Io`], [`TokenError::BadFile`].
pub fn remove_token(path: &Path, name: &str) -> Result<TokenRecord, TokenError> {
    let _lock = lock_for_edit(path)?;
    let mut file = TokenFile::load(path)?;
    let Some(i) = file.tokens.iter().position(|t| t.name == name) else {
        return Err(TokenError::NoSuchToken { name: name.into() });
    };
    let record = file.tokens.remove(i);
    file.save(path)?;
    Ok(record)
}

/// Days as a duration, for `--expires-in DAYS`.
pub fn days(n: u32) -> Duration {
    Duration::from_micros(u64::from(n) * MICROS_PER_DAY as u64)
}

/// What a connection may do: the permissions and scope of its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The token's name; `None` when the server runs without tokens.
    pub token_name: Option<String>,
    /// What it allows.
    pub permissions: Permissions,
    /// The aggregate-id prefix it is confined to; `None`: all aggregates.
    pub scope: Option<String>,
}

impl Grant {
    /// Everything, for servers without tokens.
    pub fn anonymous() -> Grant {
        Grant {
            token_name: None,
            permissions: Permissions::ALL,
            scope: None,
        }
    }

    /// Whether `aggregate_id` is inside the scope.
    pub fn covers(&self, aggregate_id: &str) -> bool {
        self.scope
            .as_deref()
            .is_none_or(|s| aggregate_id.starts_with(s))
    }
}

/// Why a token was refused (logged by the server, never told to the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// No stored digest matches.
    Unknown,
    /// It matched a token that has expired.
    Expired(String),
    /// The token file cannot be read.
    FileError(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Missing => f.write_str("no bearer token"),
            Refusal::Unknown => f.write_str("unknown token"),
            Refusal::Expired(name) => write!(f, "token {name:?} has expired"),
            Refusal::FileError(e) => write!(f, "token file unusable: {e}"),
        }
    }
}

/// The token from an `Authorization` header value: `Bearer <token>` (scheme in any case).
pub(crate) fn bearer(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim();
    (!token.is_empty() && token.len() <= PRESENTED_TOKEN_BYTES_MAX).then_some(token)
}

/// Finds the record whose digest matches `token`, comparing against every record in
/// constant time.
pub(crate) fn find_in_constant_time<'a>(
    records: &'a [TokenRecord],
    token: &str,
) -> Option<&'a TokenRecord> {
    let digest = hash_token(token);
    let mut found: Option<&TokenRecord> = None;
    for r in records {
        // Every digest is compared whole, and the loop never exits early.
        let equal: bool = digest.ct_eq(&r.sha256).into();
        if equal && found.is_none() {
            found = Some(r);
        }
    }
    found
}

/// Identity of a version of the file: a rewrite (by rename) changes the inode, an edit in
/// place the modification time or length.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

fn stamp(path: &Path) -> io::Result<Option<FileStamp>> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(FileStamp {
            modified: m.modified().ok(),
            len: m.len(),
            #[cfg(unix)]
            inode: std::os::unix::fs::MetadataExt::ino(&m),
        })),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

struct AuthState {
    /// The file version the tokens were loaded from (`None`: the file did not exist).
    stamp: Option<FileStamp>,
    tokens: Vec<TokenRecord>,
    /// Why the file could not be used at the last check; then every token is refused.
    error: Option<String>,
    /// Whether clients without a token get every permission: only while no token was
    /// ever configured since the server started.
    anonymous: bool,
}

/// The server's view of the token file: reloaded whenever it changes, checked on every
/// WebSocket upgrade and `/metrics` request.
pub(crate) struct Authenticator {
    path: Option<PathBuf>,
    state: parking_lot::Mutex<AuthState>,
}

impl Authenticator {
    /// Loads the file. `anonymous_allowed`: whether a server without tokens lets
    /// everyone in (only on loopback addresses).
    pub(crate) fn open(
        path: Option<PathBuf>,
        anonymous_allowed: bool,
    ) -> Result<Authenticator, TokenError> {
        let (stamp, tokens) = match &path {
            None => (None, Vec::new()),
            Some(p) => {
                let st = stamp(p).map_err(|source| TokenError::Io {
                    action: "read",
                    path: p.clone(),
                    source,
                })?;
                (st, TokenFile::load(p)?.tokens)
            }
        };
        let anonymous = anonymous_allowed && tokens.is_empty();
        Ok(Authenticator {
            path,
            state: parking_lot::Mutex::new(AuthState {
                stamp,
                tokens,
                error: None,
                anonymous,
            }),
        })
    }

    /// Whether clients need no token (no token configured, loopback only).
    pub(crate) fn is_anonymous(&self) -> bool {
        self.state.lock().anonymous
    }

    /// Tokens currently configured.
    pub(crate) fn token_count(&self) -> usize {
        self.state.lock().tokens.len()
    }

    /// Rereads the file if it changed since it was last read.
    fn refresh(&self, state: &mut AuthState) {
        let Some(path) = &self.path else { return };
        let current = match stamp(path) {
            Ok(s) => s,
            Err(e) => {
                state.error = Some(e.to_string());
                return;
            }
        };
        if current == state.stamp && state.error.is_none() {
            return;
        }
        match TokenFile::load(path) {
            Ok(file) => {
                tracing::info!(path = %path.display(), tokens = file.tokens.len(), "token file reloaded");
                state.tokens = file.tokens;
                state.stamp = current;
                state.error = None;
                if !state.tokens.is_empty() {
                    // Once a token exists, authentication stays on even if all are removed.
                    state.anonymous = false;
                }
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "token file unusable: every token is refused until it is fixed");
                state.error = Some(e.to_string());
                state.stamp = current;
            }
        }
    }

    /// The grant of the token in an `Authorization` header value.
    pub(crate) fn authenticate(&self, authorization: Option<&str>) -> Result<Grant, Refusal> {
        let mut state = self.state.lock();
        self.refresh(&mut state);
        if state.anonymous {
            return Ok(Grant::anonymous());
        }
        if let Some(e) = &state.error {
            return Err(Refusal::FileError(e.clone()));
        }
        let Some(token) = authorization.and_then(bearer) else {
            return Err(Refusal::Missing);
        };
        let Some(record) = find_in_constant_time(&state.tokens, token) else {
            return Err(Refusal::Unknown);
        };
        if record.is_expired(now_us()) {
            return Err(Refusal::Expired(record.name.clone()));
        }
        Ok(Grant {
            token_name: Some(record.name.clone()),
            permissions: record.permissions,
            scope: record.scope.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_token(name: &str) -> NewToken {
        NewToken {
            name: name.into(),
            permissions: Permissions {
                read: true,
                ..Permissions::default()
            },
            scope: None,
            expires_in: None,
        }
    }

    #[test]
    fn tokens_are_64_hex_digits_and_differ() {
        let a = generate_token().unwrap();
        let b = generate_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn the_file_keeps_only_the_hash_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TOKENS_FILE_NAME);
        let (record, token) = add_token(
            &path,
            &NewToken {
                scope: Some("billing-".into()),
                expires_in: Some(days(3)),
                ..new_token("billing")
            },
        )
        .unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&token), "the token itself is stored: {text}");
        assert!(text.contains(&hex(&hash_token(&token))));
        let file = TokenFile::load(&path).unwrap();
        assert_eq!(file.tokens, vec![record.clone()]);
        assert_eq!(
            record.expires_us.unwrap() - record.created_us,
            3 * MICROS_PER_DAY
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the token file is readable by others");
        }
    }

    #[test]
    fn names_are_unique_and_removal_needs_an_existing_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        add_token(&path, &new_token("a")).unwrap();
        assert!(matches!(
            add_token(&path, &new_token("a")),
            Err(TokenError::NameTaken { .. })
        ));
        assert!(matches!(
            add_token(&path, &new_token("bad name")),
            Err(TokenError::InvalidName { .. })
        ));
        assert!(matches!(
            add_token(
                &path,
                &NewToken {
                    permissions: Permissions::default(),
                    ..new_token("b")
                }
            ),
            Err(TokenError::NoPermission)
        ));
        assert!(matches!(
            remove_token(&path, "zz"),
            Err(TokenError::NoSuchToken { .. })
        ));
        assert_eq!(remove_token(&path, "a").unwrap().name, "a");
        assert!(TokenFile::load(&path).unwrap().tokens.is_empty());
    }

    #[test]
    fn the_authenticator_sees_removals_and_expiry_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let (_, a) = add_token(&path, &new_token("a")).unwrap();
        let (_, b) = add_token(&path, &new_token("b")).unwrap();
        let auth = Authenticator::open(Some(path.clone()), true).unwrap();
        assert!(!auth.is_anonymous());
        let header = |t: &str| format!("Bearer {t}");
        assert_eq!(
            auth.authenticate(Some(&header(&a)))
                .unwrap()
                .token_name
                .as_deref(),
            Some("a")
        );
        assert_eq!(auth.authenticate(None), Err(Refusal::Missing));
        assert_eq!(
            auth.authenticate(Some(&header(&"0".repeat(64)))),
            Err(Refusal::Unknown)
        );
        assert_eq!(auth.authenticate(Some(&a)), Err(Refusal::Missing));
        remove_token(&path, "a").unwrap();
        assert_eq!(auth.authenticate(Some(&header(&a))), Err(Refusal::Unknown));
        assert!(auth.authenticate(Some(&format!("bearer  {b} "))).is_ok());
        // An expired token: rewrite the file with an expiry in the past.
        let mut file = TokenFile::load(&path).unwrap();
        file.tokens[0].expires_us = Some(now_us() - 1);
        file.save(&path).unwrap();
        assert_eq!(
            auth.authenticate(Some(&header(&b))),
            Err(Refusal::Expired("b".into()))
        );
        // Removing every token does not open the server.
        remove_token(&path, "b").unwrap();
        assert_eq!(auth.authenticate(None), Err(Refusal::Missing));
    }

    #[test]
    fn a_server_without_tokens_is_open_until_one_is_added() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let auth = Authenticator::open(Some(path.clone()), true).unwrap();
        assert!(auth.is_anonymous());
        assert_eq!(auth.authenticate(None), Ok(Grant::anonymous()));
        let (_, t) = add_token(&path, &new_token("a")).unwrap();
        assert_eq!(auth.authenticate(None), Err(Refusal::Missing));
        assert!(auth.authenticate(Some(&format!("Bearer {t}"))).is_ok());
    }

    #[test]
    fn a_damaged_file_refuses_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let (_, t) = add_token(&path, &new_token("a")).unwrap();
        let auth = Authenticator::open(Some(path.clone()), false).unwrap();
        fs::write(&path, "{not json").unwrap();
        assert!(matches!(
            auth.authenticate(Some(&format!("Bearer {t}"))),
            Err(Refusal::FileError(_))
        ));
    }

    #[test]
    fn scopes_cover_prefixes() {
        let g = Grant {
            token_name: None,
            permissions: Permissions::default(),
            scope: Some("acme-".into()),
        };
        assert!(g.covers("acme-1"));
        assert!(!g.covers("other-1"));
        assert!(Grant::anonymous().covers("anything"));
    }
}
