//! The publisher: named, durable subscriptions that deliver events to handlers at least
//! once, in seq order, from stored checkpoints, with bounded retry and dead letters.
//!
//! # Delivery guarantees
//! - Each subscription runs on its own thread, following the store from its checkpoint:
//!   stored events first, then new ones as they commit (woken by commits, not polling).
//! - An event is *handled* when the handler returned `Ok`, or when it was parked in the
//!   dead letters. The checkpoint (kept in `<dir>/subscriptions`, a sled database, as the
//!   next seq to deliver) only ever moves past handled events, so nothing is skipped, even
//!   across a crash.
//! - The checkpoint is written every `checkpoint_every_events` handled events or every
//!   `checkpoint_interval_ms`, whichever comes first, and when the subscription stops. A
//!   crash therefore re-delivers at most the events handled since the last checkpoint:
//!   at most `checkpoint_every_events` events or `checkpoint_interval_ms` of them (and
//!   the one being handled when the interval ran out; up to 8 when a handler turns slow
//!   in the middle of a run of fast events).
//! - An event parked after the last checkpoint is met again after a crash: it stays one
//!   dead letter and is not delivered again (a redrive does that). After
//!   [`Subscription::reset_to`] every event is delivered again, parked ones too: one that
//!   is handled then leaves the dead letters, one that fails again updates its dead
//!   letter. A dead letter is matched to its event by seq, aggregate and version, so an
//!   event that took the seq of a lost one (the log lost its unsynced tail in a power
//!   loss, or a repair cut it) is delivered as any other.
//! - A handler that panics has failed that attempt; the panic is caught and the
//!   subscription goes on.
//!
//! The publisher's sled database is not the index's: the index can be deleted and
//! rebuilt, checkpoints cannot.

mod checkpoint;
pub mod deadletter;
pub mod retry;

use checkpoint::StoredCheckpoint;

pub use deadletter::{DeadLetter, DeadLetterOptions, DeadLetters};
pub use retry::RetryPolicy;

use crate::store::{EventRef, Filter, Follower, ReadError, Store, StoredEvent};
use parking_lot::{Condvar, Mutex, MutexGuard};
use retry::Jitter;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Name of the publisher's sled database inside a store directory.
pub const SUBSCRIPTIONS_DIR_NAME: &str = "subscriptions";
/// Name of the directory holding each subscription's dead letters.
pub const DEAD_LETTER_DIR_NAME: &str = "deadletter";
/// Longest subscription name, in bytes.
pub const SUBSCRIPTION_NAME_LEN_MAX: usize = 64;
/// How long a worker waits for new events before it looks at its controls again.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// A run of ready events delivered under one handler lock ends after this many.
const RUN_EVENTS_MAX: u64 = 64;
/// While busy with a fast handler, a worker looks at the clock (for the checkpoint
/// interval) every this many events (reading the clock costs more than delivering an
/// event); a handler that turns slow in the middle of a run delays the checkpoint by at
/// most this many of its events.
const CLOCK_EVERY_EVENTS: u64 = 8;
/// A handler taking at least this long an event gets the clock read after every event
/// (next to its own time, a clock read is noise).
const SLOW_EVENT: Duration = Duration::from_micros(50);
/// Longest wait before a worker reads the store again after a read failed.
const READ_RETRY_WAIT_MAX: Duration = Duration::from_secs(5);
/// `wait_until_handled` re-checks the position at least this often.
const WAIT_SLICE: Duration = Duration::from_millis(5);

/// Errors of the publisher.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// A subscription name must be 1..=64 characters of `A-Z a-z 0-9 _ - .`, not `.` or `..`.
    #[error("invalid subscription name {name:?}: use 1..=64 of A-Z a-z 0-9 _ - .")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// A subscription of this name is already running in this publisher.
    #[error("subscription {name} is already running")]
    AlreadyRunning {
        /// The name.
        name: String,
    },
    /// The options are inconsistent.
    #[error("invalid subscription options: {0}")]
    InvalidOptions(String),
    /// The checkpoint database failed.
    #[error("subscription checkpoints in {dir}: {source}")]
    Checkpoints {
        /// The database directory.
        dir: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// The dead-letter log failed.
    #[error("dead letters in {dir}: {message}")]
    DeadLetters {
        /// The dead-letter directory.
        dir: PathBuf,
        /// What failed.
        message: String,
    },
    /// The worker did not finish its in-flight event within the timeout. It stops after
    /// that event; nothing is lost (the event is delivered again at the next start if it
    /// was not handled).
    #[error("subscription {name} did not stop within {timeout_ms} ms")]
    StopTimeout {
        /// The name.
        name: String,
        /// The timeout.
        timeout_ms: u64,
    },
    /// The subscription was stopped: its handle no longer holds its dead letters.
    #[error("subscription {name} is stopped and its dead letters are released; open them with Publisher::open_dead_letters, or subscribe again")]
    Stopped {
        /// The name.
        name: String,
    },
    /// The subscription's thread could not be started (the process is out of threads or
    /// memory).
    #[error("subscription {name}: cannot start its thread: {source}")]
    Thread {
        /// The name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// No dead letter with this id.
    #[error("subscription {name} has no dead letter {id}")]
    NoSuchDeadLetter {
        /// The subscription.
        name: String,
        /// The id asked for.
        id: u64,
    },
    /// Reading the store failed.
    #[error(transparent)]
    Read(#[from] crate::store::ReadError),
}

/// What a handler says about one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Try again later (up to the retry policy's attempts).
    Retryable(String),
    /// Retrying will not help: park the event now.
    Permanent(String),
}

/// Receives a subscription's events.
///
/// # Examples
/// ```
/// use eventlog::publisher::{Handler, HandlerError};
/// use eventlog::store::EventRef;
/// struct Counter(u64);
/// impl Handler for Counter {
///     fn handle(&mut self, event: &EventRef<'_>, attempt: u32) -> Result<(), HandlerError> {
///         self.0 += 1;
///         Ok(())
///     }
/// }
/// ```
pub trait Handler: Send {
    /// Handles one event; `attempt` is 1 for the first delivery.
    ///
    /// # Errors
    /// [`HandlerError::Retryable`] to be called again after a backoff,
    /// [`HandlerError::Permanent`] to park the event in the dead letters at once.
    fn handle(&mut self, event: &EventRef<'_>, attempt: u32) -> Result<(), HandlerError>;
}

impl<F> Handler for F
where
    F: FnMut(&EventRef<'_>, u32) -> Result<(), HandlerError> + Send,
{
    fn handle(&mut self, event: &EventRef<'_>, attempt: u32) -> Result<(), HandlerError> {
        self(event, attempt)
    }
}

/// What to do with an event whose attempts are used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnExhausted {
    /// Park it in the dead letters and go on (default).
    #[default]
    DeadLetter,
    /// Stop the subscription at that event and report it ([`Status::Failed`]).
    Stop,
}

/// A subscription's settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscriptionOptions {
    /// Which events to deliver. Default: all.
    pub filter: Filter,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// What to do when attempts are used up.
    pub on_exhausted: OnExhausted,
    /// Bounds of the dead letters.
    pub dead_letters: DeadLetterOptions,
    /// Write the checkpoint after this many handled events. Default 100,000: each write
    /// is a sled flush (an fsync, about a millisecond), so catching up at millions of
    /// events a second wants it rare; the interval below bounds it in time.
    pub checkpoint_every_events: u64,
    /// ... or after this much time with unsaved progress. Default 1,000 ms.
    pub checkpoint_interval_ms: u64,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            filter: Filter::all(),
            retry: RetryPolicy::default(),
            on_exhausted: OnExhausted::DeadLetter,
            dead_letters: DeadLetterOptions::default(),
            checkpoint_every_events: 100_000,
            checkpoint_interval_ms: 1_000,
        }
    }
}

/// Where a subscription is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Delivering (or waiting for events).
    Running,
    /// Paused by [`Subscription::pause`].
    Paused,
    /// Stopped by [`Subscription::stop`].
    Stopped,
    /// Stopped at an event whose attempts ran out (with [`OnExhausted::Stop`]), or on an
    /// error it cannot get past.
    Failed {
        /// The event it stopped at.
        seq: u64,
        /// Why.
        error: String,
    },
}

/// Counters of a subscription, from [`Subscription::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionStats {
    /// The subscription's name.
    pub name: String,
    /// Its status.
    pub status: Status,
    /// The next seq it will deliver (everything below is handled).
    pub position: u64,
    /// The last durably stored checkpoint (next seq to deliver after a restart).
    pub checkpoint: u64,
    /// Events stored but not yet handled: the store's next seq minus `position`.
    pub lag_events: u64,
    /// Events handed to the handler successfully since start.
    pub delivered: u64,
    /// Failed attempts that were retried since start.
    pub retried: u64,
    /// Events parked in the dead letters since start.
    pub dead_lettered: u64,
    /// Live dead letters.
    pub dead_letters: u64,
    /// Dead letters lost to the bounds, ever.
    pub dead_letters_evicted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    position: AtomicU64,
    checkpoint: AtomicU64,
    /// The lowest seq a `wait_until_handled` caller waits for (`u64::MAX`: none). The
    /// worker wakes waiters when its position passes it, and only then.
    wanted: AtomicU64,
}

#[derive(Debug)]
struct Control {
    status: Status,
    stop: bool,
    pause: bool,
    reset_to: Option<u64>,
    finished: bool,
}

struct Shared {
    name: String,
    store: Store,
    db: Arc<Db>,
    options: SubscriptionOptions,
    control: Mutex<Control>,
    control_cv: Condvar,
    /// Set whenever a control (stop, pause, reset) is requested; the worker then looks.
    control_pending: std::sync::atomic::AtomicBool,
    counters: Counters,
    handler: Mutex<Box<dyn Handler>>,
    /// `None` once the subscription is stopped: the dead-letter log (and its lock) is
    /// released, so the subscription can be started again or its dead letters opened.
    dead_letters: Mutex<Option<DeadLetters>>,
    /// Live and evicted dead letters when they were released (for `stats`).
    released_counts: Mutex<(u64, u64)>,
    /// Whether any dead letter was ever live: until then delivery skips the dead-letter
    /// lookup on the hot path.
    parked_any: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The publisher's sled database: checkpoints and evicted counts, per subscription.
#[derive(Debug)]
struct Db {
    dir: PathBuf,
    db: sled::Db,
    checkpoints: sled::Tree,
    evicted: sled::Tree,
}

impl Db {
    fn err(&self) -> impl FnOnce(sled::Error) -> PublishError + '_ {
        move |source| PublishError::Checkpoints {
            dir: self.dir.clone(),
            source,
        }
    }

    fn get(&self, tree: &sled::Tree, name: &str) -> Result<Option<u64>, PublishError> {
        Ok(tree
            .get(name.as_bytes())
            .map_err(self.err())?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
    }

    /// Stores and makes durable.
    fn put(&self, tree: &sled::Tree, name: &str, value: u64) -> Result<(), PublishError> {
        self.put_bytes(tree, name, &value.to_be_bytes())
    }

    fn put_bytes(&self, tree: &sled::Tree, name: &str, value: &[u8]) -> Result<(), PublishError> {
        tree.insert(name.as_bytes(), value).map_err(self.err())?;
        self.db.flush().map_err(self.err())?;
        Ok(())
    }

    /// A subscription's stored checkpoint (a malformed one reads as none: delivery
    /// starts over, at least once).
    fn checkpoint(&self, name: &str) -> Result<Option<StoredCheckpoint>, PublishError> {
        let Some(value) = self.checkpoints.get(name.as_bytes()).map_err(self.err())? else {
            return Ok(None);
        };
        let decoded = StoredCheckpoint::decode(&value);
        if decoded.is_none() {
            tracing::warn!(
                subscription = name,
                bytes = value.len(),
                "malformed checkpoint; delivering from seq 0"
            );
        }
        Ok(decoded)
    }

    /// Stores (durably) the checkpoint at `next_seq`, fingerprinting `store`'s events.
    fn put_checkpoint(
        &self,
        store: &Store,
        name: &str,
        next_seq: u64,
        dead_letters_next: u64,
    ) -> Result<(), PublishError> {
        let value = StoredCheckpoint::of(store, next_seq, dead_letters_next).encode();
        self.put_bytes(&self.checkpoints, name, &value)
    }
}

/// Runs subscriptions on a store.
///
/// # Examples
/// ```
/// use eventlog::publisher::{HandlerError, Publisher, SubscriptionOptions};
/// use eventlog::store::{EventRef, ExpectedVersion, NewEvent, Options, Store};
/// use std::sync::{Arc, Mutex};
/// use std::time::Duration;
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path(), Options::default())?;
/// store.append("order-1", ExpectedVersion::Any, &[NewEvent::json_text("Placed", "{}")])?;
/// let publisher = Publisher::open(&store)?;
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let sink = seen.clone();
/// let sub = publisher.subscribe("mailer", SubscriptionOptions::default(), move |e: &EventRef<'_>, _attempt: u32| {
///     sink.lock().unwrap().push(e.seq);
///     Ok::<(), HandlerError>(())
/// })?;
/// assert!(sub.wait_until_handled(0, Duration::from_secs(10)));
/// sub.stop(Duration::from_secs(10))?;
/// assert_eq!(*seen.lock().unwrap(), vec![0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Publisher {
    store: Store,
    db: Arc<Db>,
    running: Arc<Mutex<HashMap<String, Arc<Shared>>>>,
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Checks a subscription name (it names a directory).
pub fn check_subscription_name(name: &str) -> Result<(), PublishError> {
    let ok = !name.is_empty()
        && name.len() <= SUBSCRIPTION_NAME_LEN_MAX
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(PublishError::InvalidName {
            name: name.to_string(),
        })
    }
}

/// What is stored about a subscription, running or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    /// The name.
    pub name: String,
    /// The next seq it will deliver.
    pub checkpoint: u64,
    /// Dead letters lost to the bounds, ever.
    pub dead_letters_evicted: u64,
}

impl Publisher {
    /// Opens the publisher's checkpoint database in the store's directory.
    ///
    /// # Errors
    /// [`PublishError::Checkpoints`] if sled cannot open it.
    pub fn open(store: &Store) -> Result<Publisher, PublishError> {
        let dir = store.sled_dir().join(SUBSCRIPTIONS_DIR_NAME);
        let err = |source| PublishError::Checkpoints {
            dir: dir.clone(),
            source,
        };
        let db = crate::index::open_sled(&sled::Config::new().path(&dir).cache_capacity(1 << 20))
            .map_err(err)?;
        let checkpoints = db.open_tree("checkpoints").map_err(err)?;
        let evicted = db.open_tree("dead_letters_evicted").map_err(err)?;
        Ok(Publisher {
            store: store.clone(),
            db: Arc::new(Db {
                dir: dir.clone(),
                db,
                checkpoints,
                evicted,
            }),
            running: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// Starts subscription `name` (resuming from its checkpoint, or from seq 0 if it is
    /// new) with `handler`.
    ///
    /// # Errors
    /// [`PublishError::InvalidName`], [`PublishError::AlreadyRunning`],
    /// [`PublishError::InvalidOptions`], or failures opening its checkpoint or dead letters.
    pub fn subscribe<H: Handler + 'static>(
        &self,
        name: &str,
        options: SubscriptionOptions,
        handler: H,
    ) -> Result<Subscription, PublishError> {
        check_subscription_name(name)?;
        if options.retry.attempts_max == 0 {
            return Err(PublishError::InvalidOptions(
                "retry.attempts_max must be at least 1".into(),
            ));
        }
        if options.checkpoint_every_events == 0 {
            return Err(PublishError::InvalidOptions(
                "checkpoint_every_events must be at least 1".into(),
            ));
        }
        let mut running = self.running.lock();
        release_if_finished(&running, name)?;
        let stored = self.db.checkpoint(name)?;
        let mut checkpoint = stored.as_ref().map_or(0, |c| c.next_seq);
        let resume = stored.as_ref().map_or(0, |c| c.resume_at(&self.store));
        if resume != checkpoint {
            // The log lost events below the checkpoint since it was saved (a power loss
            // took unsynced appends, or a repair cut it), and new events may have taken
            // their seqs: resume where the log is still what was handled.
            tracing::warn!(
                subscription = name,
                checkpoint,
                resume,
                head = self.store.next_seq(),
                "the log lost events below the checkpoint; resuming where it still holds what was handled"
            );
            checkpoint = resume;
            let mark = stored
                .as_ref()
                .and_then(|c| c.dead_letters_next)
                .unwrap_or(0);
            self.db
                .put_checkpoint(&self.store, name, checkpoint, mark)?;
        }
        // Which dead letters a restart meets again without having delivered them since:
        // those parked after the checkpoint was saved.
        let skip = match &stored {
            None => SkipParked::IdsFrom(0),
            Some(c) => match c.dead_letters_next {
                Some(mark) => SkipParked::IdsFrom(mark),
                // An older build's checkpoint: its crash window is from it on.
                None => SkipParked::SeqsFrom(c.next_seq),
            },
        };
        let dead_letters = self.dead_letters_of(name, options.dead_letters.clone())?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            store: self.store.clone(),
            db: Arc::clone(&self.db),
            options,
            control: Mutex::new(Control {
                status: Status::Running,
                stop: false,
                pause: false,
                reset_to: None,
                finished: false,
            }),
            control_cv: Condvar::new(),
            control_pending: std::sync::atomic::AtomicBool::new(false),
            counters: Counters::default(),
            handler: Mutex::new(Box::new(handler)),
            parked_any: std::sync::atomic::AtomicBool::new(!dead_letters.is_empty()),
            dead_letters: Mutex::new(Some(dead_letters)),
            released_counts: Mutex::new((0, 0)),
        });
        shared
            .counters
            .position
            .store(checkpoint, Ordering::Relaxed);
        shared
            .counters
            .checkpoint
            .store(checkpoint, Ordering::Relaxed);
        shared.counters.wanted.store(u64::MAX, Ordering::Relaxed);
        let worker = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("eventlog-sub-{name}"))
                .spawn(move || shared.run(checkpoint, skip))
                .map_err(|source| PublishError::Thread {
                    name: name.to_string(),
                    source,
                })?
        };
        running.insert(name.to_string(), Arc::clone(&shared));
        tracing::info!(
            subscription = name,
            from_seq = checkpoint,
            "subscription started"
        );
        Ok(Subscription {
            shared,
            worker: Mutex::new(Some(worker)),
            running: Arc::clone(&self.running),
        })
    }

    /// The running subscriptions' metrics in the Prometheus text format, labelled by
    /// subscription: lag, deliveries, retries, dead letters parked, live and evicted.
    pub fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let subs: Vec<Arc<Shared>> = {
            let running = self.running.lock();
            let mut v: Vec<Arc<Shared>> = running.values().cloned().collect();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        };
        let head = self.store.next_seq();
        let rows: Vec<(String, [u64; 6])> = subs
            .iter()
            .map(|s| {
                let c = &s.counters;
                let (live, evicted) = s.dead_letter_counts();
                let label = crate::metrics::escape_label(&s.name);
                (
                    label,
                    [
                        head.saturating_sub(c.position.load(Ordering::Acquire)),
                        c.delivered.load(Ordering::Relaxed),
                        c.retried.load(Ordering::Relaxed),
                        c.dead_lettered.load(Ordering::Relaxed),
                        live,
                        evicted,
                    ],
                )
            })
            .collect();
        let families = [
            (
                "eventlog_subscription_lag_events",
                "gauge",
                "Events stored but not yet handled by the subscription.",
            ),
            (
                "eventlog_subscription_delivered_total",
                "counter",
                "Events the handler accepted since the subscription started.",
            ),
            (
                "eventlog_subscription_retries_total",
                "counter",
                "Failed delivery attempts that were retried.",
            ),
            (
                "eventlog_subscription_dead_lettered_total",
                "counter",
                "Events parked in the dead letters since start.",
            ),
            (
                "eventlog_subscription_dead_letters",
                "gauge",
                "Live dead letters.",
            ),
            (
                "eventlog_subscription_dead_letters_evicted_total",
                "counter",
                "Dead letters lost to the bounds, ever.",
            ),
        ];
        let mut out = String::new();
        for (i, (name, kind, help)) in families.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (label, values) in &rows {
                let _ = writeln!(out, "{name}{{subscription=\"{label}\"}} {}", values[i]);
            }
        }
        out
    }

    /// Every subscription with a stored checkpoint, running or not.
    ///
    /// # Errors
    /// [`PublishError::Checkpoints`].
    pub fn stored_subscriptions(&self) -> Result<Vec<StoredSubscription>, PublishError> {
        let mut out = Vec::new();
        for kv in self.db.checkpoints.iter() {
            let (k, v) = kv.map_err(self.db.err())?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let checkpoint = StoredCheckpoint::decode(&v).map_or(0, |c| c.next_seq);
            let evicted = self.db.get(&self.db.evicted, &name)?.unwrap_or(0);
            out.push(StoredSubscription {
                name,
                checkpoint,
                dead_letters_evicted: evicted,
            });
        }
        Ok(out)
    }

    /// Opens a subscription's dead letters when it is not running (to inspect, purge).
    /// A subscription of this publisher that has stopped by itself (a poison event)
    /// releases them to the caller.
    ///
    /// # Errors
    /// [`PublishError::AlreadyRunning`] if it runs in this publisher;
    /// [`PublishError::DeadLetters`] if they cannot be opened (for instance locked by
    /// another process).
    pub fn open_dead_letters(
        &self,
        name: &str,
        options: DeadLetterOptions,
    ) -> Result<DeadLetters, PublishError> {
        check_subscription_name(name)?;
        release_if_finished(&self.running.lock(), name)?;
        self.dead_letters_of(name, options)
    }

    /// Opens a subscription's dead letters with its stored evicted count. Their log keeps
    /// the count too (an eviction is written there before the count is stored here): if
    /// a crash came between the two, the stored count catches up now.
    fn dead_letters_of(
        &self,
        name: &str,
        options: DeadLetterOptions,
    ) -> Result<DeadLetters, PublishError> {
        let stored = self.db.get(&self.db.evicted, name)?.unwrap_or(0);
        let dead_letters = DeadLetters::open(
            Arc::clone(self.store.storage()),
            &self.store.dir().join(DEAD_LETTER_DIR_NAME).join(name),
            options,
            stored,
        )?;
        if dead_letters.evicted() > stored {
            self.db
                .put(&self.db.evicted, name, dead_letters.evicted())?;
        }
        Ok(dead_letters)
    }

    /// Sets a stopped subscription's checkpoint (the next seq it will deliver). Like
    /// [`Subscription::reset_to`], events from there on are delivered again, parked ones
    /// too.
    ///
    /// # Errors
    /// [`PublishError::AlreadyRunning`] if it runs (use [`Subscription::reset_to`]);
    /// [`PublishError::DeadLetters`] if its dead letters cannot be opened (to read their
    /// next id).
    pub fn set_checkpoint(&self, name: &str, next_seq: u64) -> Result<(), PublishError> {
        check_subscription_name(name)?;
        let dead_letters_next = {
            let running = self.running.lock();
            release_if_finished(&running, name)?;
            // Compaction only, with whatever bounds: opening never evicts.
            self.dead_letters_of(name, DeadLetterOptions::default())?
                .next_id()
        };
        self.db
            .put_checkpoint(&self.store, name, next_seq, dead_letters_next)
    }
}

/// Refuses a subscription of this name that is running; makes one that has finished
/// (stopped at a poison event) release its dead letters.
fn release_if_finished(
    running: &HashMap<String, Arc<Shared>>,
    name: &str,
) -> Result<(), PublishError> {
    if let Some(s) = running.get(name) {
        if !s.control.lock().finished {
            return Err(PublishError::AlreadyRunning {
                name: name.to_string(),
            });
        }
        s.release_dead_letters();
    }
    Ok(())
}

/// A running subscription. Dropping the handle stops it (waiting up to 30 s).
#[derive(Debug)]
pub struct Subscription {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
    running: Arc<Mutex<HashMap<String, Arc<Shared>>>>,
}

/// Which dead letters to redrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// All of them, oldest first.
    All,
    /// These ids.
    Ids(Vec<u64>),
}

/// The outcome of a redrive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveReport {
    /// Delivered and removed from the dead letters.
    pub delivered: Vec<u64>,
    /// Failed again and kept, with their attempt count raised.
    pub failed: Vec<u64>,
}

impl Subscription {
    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Counters and status.
    pub fn stats(&self) -> SubscriptionStats {
        let c = &self.shared.counters;
        let position = c.position.load(Ordering::Acquire);
        let (dead_letters, dead_letters_evicted) = self.shared.dead_letter_counts();
        SubscriptionStats {
            name: self.shared.name.clone(),
            status: self.shared.control.lock().status.clone(),
            position,
            checkpoint: c.checkpoint.load(Ordering::Acquire),
            lag_events: self.shared.store.next_seq().saturating_sub(position),
            delivered: c.delivered.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            dead_letters,
            dead_letters_evicted,
        }
    }

    /// Pauses delivery after the in-flight event.
    pub fn pause(&self) {
        let mut c = self.shared.control.lock();
        c.pause = true;
        self.shared.control_changed();
        if c.status == Status::Running {
            c.status = Status::Paused;
        }
        self.shared.control_cv.notify_all();
    }

    /// Resumes after [`Subscription::pause`].
    pub fn resume(&self) {
        let mut c = self.shared.control.lock();
        c.pause = false;
        self.shared.control_changed();
        if c.status == Status::Paused {
            c.status = Status::Running;
        }
        self.shared.control_cv.notify_all();
    }

    /// Moves the subscription to deliver from `seq` next (durably, before delivering).
    pub fn reset_to(&self, seq: u64) {
        let mut c = self.shared.control.lock();
        c.reset_to = Some(seq);
        self.shared.control_changed();
        self.shared.control_cv.notify_all();
    }

    /// Waits until every event up to `seq` is handled (or `timeout` passes). Returns
    /// whether it was.
    pub fn wait_until_handled(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = crate::deadline::deadline_after(Instant::now(), timeout);
        let mut c = self.shared.control.lock();
        loop {
            if self.shared.counters.position.load(Ordering::Acquire) > seq {
                return true;
            }
            let now = Instant::now();
            if c.finished || now >= deadline {
                return self.shared.counters.position.load(Ordering::Acquire) > seq;
            }
            // Ask to be woken when the worker passes `seq` (it clears the request when it
            // wakes us, so ask again each time); look again in case it just did. A wake
            // lost to a race costs at most a slice.
            self.shared.counters.wanted.fetch_min(seq, Ordering::AcqRel);
            if self.shared.counters.position.load(Ordering::Acquire) > seq {
                return true;
            }
            self.shared
                .control_cv
                .wait_for(&mut c, (deadline - now).min(WAIT_SLICE));
        }
    }

    /// Stops after the in-flight event, saves the checkpoint, and waits up to `timeout`.
    /// Then releases the dead letters: the subscription can be started again, or its dead
    /// letters opened with [`Publisher::open_dead_letters`].
    ///
    /// # Errors
    /// [`PublishError::StopTimeout`] if the worker is still busy after `timeout`.
    pub fn stop(&self, timeout: Duration) -> Result<(), PublishError> {
        let deadline = crate::deadline::deadline_after(Instant::now(), timeout);
        {
            let mut c = self.shared.control.lock();
            c.stop = true;
            self.shared.control_changed();
            self.shared.control_cv.notify_all();
            while !c.finished {
                if self
                    .shared
                    .control_cv
                    .wait_until(&mut c, deadline)
                    .timed_out()
                    && !c.finished
                {
                    return Err(PublishError::StopTimeout {
                        name: self.shared.name.clone(),
                        timeout_ms: timeout.as_millis() as u64,
                    });
                }
            }
        }
        if let Some(worker) = self.worker.lock().take() {
            let _ = worker.join();
        }
        self.shared.release_dead_letters();
        let mut running = self.running.lock();
        if running
            .get(&self.shared.name)
            .is_some_and(|s| Arc::ptr_eq(s, &self.shared))
        {
            running.remove(&self.shared.name);
        }
        Ok(())
    }

    /// The live dead letters, oldest first.
    ///
    /// # Errors
    /// [`PublishError::Stopped`] once the subscription is stopped.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, PublishError> {
        self.shared.with_dead_letters(|dl| Ok(dl.list()))
    }

    /// Delivers dead letters to the handler again (one attempt each, now). Delivered ones
    /// are removed; failed ones stay with their attempt count raised.
    ///
    /// An entry whose event cannot be read, or whose seq now holds another event (the log
    /// lost the parked one since), fails with that as its error.
    ///
    /// # Errors
    /// [`PublishError::NoSuchDeadLetter`] for an unknown id (nothing is redriven then);
    /// [`PublishError::Stopped`] once stopped; [`PublishError::DeadLetters`] on I/O
    /// failures.
    pub fn redrive(&self, which: Redrive) -> Result<RedriveReport, PublishError> {
        let name = &self.shared.name;
        let entries = self.shared.with_dead_letters(|dl| match which {
            Redrive::All => Ok(dl.list()),
            Redrive::Ids(ids) => ids
                .into_iter()
                .map(|id| {
                    dl.get(id).cloned().ok_or(PublishError::NoSuchDeadLetter {
                        name: name.clone(),
                        id,
                    })
                })
                .collect(),
        })?;
        let mut report = RedriveReport::default();
        for entry in entries {
            if self.shared.redrive_one(&entry)? {
                report.delivered.push(entry.id);
            } else {
                report.failed.push(entry.id);
            }
        }
        Ok(report)
    }

    /// Removes every dead letter.
    ///
    /// # Errors
    /// [`PublishError::DeadLetters`] if the write fails; [`PublishError::Stopped`] once
    /// stopped.
    pub fn purge_dead_letters(&self) -> Result<u64, PublishError> {
        self.shared.with_dead_letters(|dl| {
            let ids: Vec<u64> = dl.list().iter().map(|d| d.id).collect();
            dl.resolve_all(&ids)
        })
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.worker.lock().is_some() {
            let _ = self.stop(Duration::from_secs(30));
        }
    }
}

enum Outcome {
    Handled,
    Parked,
    /// Stopped during a backoff: the event is not handled.
    Interrupted,
    /// A reset was asked for during a backoff: the event is not handled; delivery goes on
    /// from the reset's seq.
    Reset,
    Poison(String),
}

/// How a run of ready events ended.
enum Step {
    /// Handled (or parked) what was ready; go on.
    Continue,
    /// Stopped during a backoff: that event is not handled.
    Interrupted,
    /// Stopped at a poison event.
    Poison { seq: u64, error: String },
}

/// How a run of ready events is delivered.
#[derive(Clone, Copy)]
struct Run {
    /// Look at the clock every this many events.
    clock_every: u64,
    /// When the checkpoint interval runs out: the run ends then.
    save_due_at: Instant,
    /// Which events that already have a dead letter are not delivered again.
    skip_parked: SkipParked,
}

/// Which parked events a run does not deliver again: those parked after the checkpoint
/// it started from was saved (a crash lost the checkpoint that would have passed them),
/// not those a reset moves delivery back over.
#[derive(Clone, Copy, Debug)]
enum SkipParked {
    /// Dead letters with ids from this one on (the checkpoint's dead-letter mark).
    IdsFrom(u64),
    /// Dead letters of events from this seq on (a checkpoint without the mark).
    SeqsFrom(u64),
    /// None (after a reset).
    Nothing,
}

impl SkipParked {
    fn skips(self, seq: u64, id: u64) -> bool {
        match self {
            SkipParked::IdsFrom(from) => id >= from,
            SkipParked::SeqsFrom(from) => seq >= from,
            SkipParked::Nothing => false,
        }
    }
}

/// What a dead letter records of its event to tell it from another at the same seq: its
/// aggregate and version, or `""` and 0 for an event that does not decode.
fn parked_identity<'a>(event: &'a Result<EventRef<'a>, ReadError>) -> (&'a str, u64) {
    match event {
        Ok(e) => (e.aggregate_id, e.version),
        Err(_) => ("", 0),
    }
}

/// Whether `stored` is the event `entry` parked (see [`parked_identity`]).
fn is_parked_event(entry: &DeadLetter, stored: &StoredEvent) -> bool {
    let event = stored.event();
    parked_identity(&event) == (entry.aggregate_id.as_str(), entry.version)
}

impl Shared {
    /// Tells the worker its controls changed: it looks at them before its next event, and
    /// a wait of its follower for new events ends now rather than at its timeout.
    fn control_changed(&self) {
        self.control_pending.store(true, Ordering::Release);
        self.store.log().wake_waiters();
    }

    /// Runs `f` on the dead letters while they are held (not yet released by a stop).
    fn with_dead_letters<R>(
        &self,
        f: impl FnOnce(&mut DeadLetters) -> Result<R, PublishError>,
    ) -> Result<R, PublishError> {
        match self.dead_letters.lock().as_mut() {
            Some(dl) => f(dl),
            None => Err(PublishError::Stopped {
                name: self.name.clone(),
            }),
        }
    }

    /// Closes the dead-letter log (once the worker is done with it), keeping its counts
    /// for `stats`.
    fn release_dead_letters(&self) {
        let mut dl = self.dead_letters.lock();
        if let Some(released) = dl.take() {
            *self.released_counts.lock() = (released.len(), released.evicted());
        }
    }

    /// Live and evicted dead letters.
    fn dead_letter_counts(&self) -> (u64, u64) {
        match self.dead_letters.lock().as_ref() {
            Some(dl) => (dl.len(), dl.evicted()),
            None => *self.released_counts.lock(),
        }
    }

    /// The id of the live dead letter that parked this very event, if any.
    fn parked_entry(&self, stored: &StoredEvent) -> Option<u64> {
        if !self.parked_any.load(Ordering::Acquire) {
            return None;
        }
        let dl = self.dead_letters.lock();
        let dl = dl.as_ref()?;
        if !dl.contains_seq(stored.seq()) {
            return None;
        }
        let event = stored.event();
        let (aggregate_id, version) = parked_identity(&event);
        dl.find_event(stored.seq(), aggregate_id, version)
    }

    /// An event parked earlier was handled now (a replay after a reset): its dead letter
    /// goes. If that cannot be written, the dead letter stays (a redrive delivers the
    /// event again: at least once).
    fn resolve_handled(&self, id: u64) {
        if let Err(e) = self.with_dead_letters(|dl| dl.resolve(id)) {
            tracing::error!(subscription = %self.name, id, error = %e, "removing the dead letter of a handled event failed");
        }
    }

    /// One redrive attempt of a dead letter; records the outcome. Returns whether the
    /// event was delivered (and the dead letter removed).
    fn redrive_one(&self, entry: &DeadLetter) -> Result<bool, PublishError> {
        let attempt = entry.attempts + 1;
        let outcome = match self.store.read_seq(entry.seq) {
            Ok(stored) if is_parked_event(entry, &stored) => self.attempt(&stored, attempt),
            Ok(_) => Err(HandlerError::Permanent(format!(
                "seq {} now holds another event: the log lost {} version {} since it was \
                 parked (a power loss took its unsynced tail, or a repair cut it); purge this \
                 dead letter",
                entry.seq, entry.aggregate_id, entry.version
            ))),
            Err(e) => Err(HandlerError::Permanent(format!(
                "event cannot be read: {e}"
            ))),
        };
        self.with_dead_letters(|dl| match outcome {
            Ok(()) => {
                dl.resolve(entry.id)?;
                Ok(true)
            }
            Err(HandlerError::Retryable(t) | HandlerError::Permanent(t)) => {
                dl.update(entry.id, attempt, &t, now_us())?;
                Ok(false)
            }
        })
    }

    fn run(&self, from: u64, skip: SkipParked) {
        let mut follower = self.store.follow(from, self.options.filter.clone());
        let mut jitter = Jitter::new(now_us() as u64 ^ (self as *const Shared as u64));
        let mut unsaved = 0u64;
        let mut last_save = Instant::now();
        let interval = Duration::from_millis(self.options.checkpoint_interval_ms);
        // Events parked by an earlier run after its last checkpoint are met again from
        // here on: they stay parked. After a reset, everything is delivered again.
        let mut skip_parked = skip;
        // The clock after every event until a run has measured the handler.
        let mut clock_every = 1;
        let mut read_failures = 0u32;
        let mut last_clock = Instant::now();
        loop {
            // Controls: stop, pause, reset. Flagged by an atomic so that the hot path does
            // not take the control lock for every event.
            if self.control_pending.load(Ordering::Acquire) {
                let mut c = self.control.lock();
                if let Some(seq) = c.reset_to.take() {
                    skip_parked = SkipParked::Nothing;
                    follower.seek(seq);
                    self.counters.position.store(seq, Ordering::Release);
                    drop(c);
                    if let Err(e) = self.save_checkpoint(seq) {
                        self.fail(seq, e.to_string());
                        return;
                    }
                    unsaved = 0;
                    continue;
                }
                while c.pause && !c.stop && c.reset_to.is_none() {
                    self.control_cv.wait_for(&mut c, IDLE_WAIT);
                }
                if c.stop {
                    break;
                }
                if c.reset_to.is_none() && !c.pause {
                    self.control_pending.store(false, Ordering::Release);
                }
            }
            let next = match follower.next_or_interrupt(IDLE_WAIT, Some(&self.control_pending)) {
                Ok(n) => {
                    read_failures = 0;
                    n
                }
                Err(e) => {
                    // Retried (the error may pass: an I/O error, a full disk), backing off
                    // so that one that does not pass is not logged ten times a second.
                    let wait = IDLE_WAIT
                        .saturating_mul(1 << read_failures.min(6))
                        .min(READ_RETRY_WAIT_MAX);
                    read_failures += 1;
                    tracing::error!(subscription = %self.name, error = %e, failures = read_failures, retry_in_ms = wait.as_millis() as u64, "reading the store failed; retrying");
                    let mut c = self.control.lock();
                    if !c.stop {
                        self.control_cv.wait_for(&mut c, wait);
                    }
                    continue;
                }
            };
            let unsaved_before = unsaved;
            match next {
                Some(stored) => {
                    let run = Run {
                        clock_every,
                        save_due_at: crate::deadline::deadline_after(last_save, interval),
                        skip_parked,
                    };
                    match self.deliver_ready(stored, &mut follower, &mut jitter, &mut unsaved, run)
                    {
                        Step::Continue => {}
                        Step::Interrupted => {
                            // Stopped during a backoff: the event is not handled; the
                            // checkpoint stays before it.
                            break;
                        }
                        Step::Poison { seq, error } => {
                            let _ = self.save_checkpoint(seq);
                            self.fail(seq, error);
                            return;
                        }
                    }
                }
                None => {
                    self.redrive_requested();
                    // Caught up: events skipped by the filter are handled too.
                    let position = follower.position();
                    if position != self.counters.position.load(Ordering::Acquire) {
                        self.counters.position.store(position, Ordering::Release);
                        unsaved += 1;
                    }
                    self.notify();
                }
            }
            // Once a run (it ended when the checkpoint was due, among others), and how
            // often the next run looks: every CLOCK_EVERY_EVENTS events for a fast
            // handler, every event for a slow one.
            let now = Instant::now();
            let handled = unsaved.saturating_sub(unsaved_before);
            if handled > 0 {
                let per_event = now.saturating_duration_since(last_clock) / handled as u32;
                clock_every = if per_event >= SLOW_EVENT {
                    1
                } else {
                    CLOCK_EVERY_EVENTS
                };
            }
            last_clock = now;
            let due = unsaved >= self.options.checkpoint_every_events
                || (unsaved > 0 && now.saturating_duration_since(last_save) >= interval);
            if due {
                let position = self.counters.position.load(Ordering::Acquire);
                if let Err(e) = self.save_checkpoint(position) {
                    self.fail(position, e.to_string());
                    return;
                }
                unsaved = 0;
                last_save = Instant::now();
            }
        }
        let position = self.counters.position.load(Ordering::Acquire);
        let saved = self.save_checkpoint(position);
        let mut c = self.control.lock();
        c.status = match saved {
            Ok(()) => Status::Stopped,
            Err(e) => Status::Failed {
                seq: position,
                error: e.to_string(),
            },
        };
        c.finished = true;
        self.control_cv.notify_all();
        tracing::info!(subscription = %self.name, position, "subscription stopped");
    }

    /// Delivers dead letters marked for redrive (one attempt each), when idle.
    fn redrive_requested(&self) {
        let wanted = self
            .dead_letters
            .lock()
            .as_ref()
            .map(DeadLetters::redrive_requested)
            .unwrap_or_default();
        for entry in wanted {
            if self.control.lock().stop {
                return;
            }
            if let Err(e) = self.redrive_one(&entry) {
                tracing::error!(subscription = %self.name, error = %e, "recording a redrive failed");
                return;
            }
        }
    }

    /// Wakes `wait_until_handled` callers (those still waiting ask again).
    fn notify(&self) {
        let _c = self.control.lock();
        self.counters.wanted.store(u64::MAX, Ordering::Release);
        self.control_cv.notify_all();
    }

    fn fail(&self, seq: u64, error: String) {
        tracing::error!(subscription = %self.name, seq, %error, "subscription stopped at a poison event");
        let mut c = self.control.lock();
        c.status = Status::Failed { seq, error };
        c.finished = true;
        self.control_cv.notify_all();
    }

    fn save_checkpoint(&self, next_seq: u64) -> Result<(), PublishError> {
        // Every dead letter so far was parked before this checkpoint (see `SkipParked`).
        let dead_letters_next = self
            .dead_letters
            .lock()
            .as_ref()
            .map_or(0, DeadLetters::next_id);
        self.db
            .put_checkpoint(&self.store, &self.name, next_seq, dead_letters_next)?;
        self.counters.checkpoint.store(next_seq, Ordering::Release);
        Ok(())
    }

    /// One attempt, with panics turned into a retryable failure.
    fn attempt(&self, stored: &StoredEvent, attempt: u32) -> Result<(), HandlerError> {
        self.attempt_with(&mut **self.handler.lock(), stored, attempt)
    }

    /// One attempt with the handler already locked.
    #[inline]
    fn attempt_with(
        &self,
        handler: &mut dyn Handler,
        stored: &StoredEvent,
        attempt: u32,
    ) -> Result<(), HandlerError> {
        let decoded = stored.event();
        // Borrowed where `event` returned it: moving it out would cost about as much as
        // a no-op handler.
        let event = match &decoded {
            Ok(event) => event,
            Err(e) => {
                return Err(HandlerError::Permanent(format!(
                    "event cannot be decoded: {e}"
                )))
            }
        };
        let span = tracing::debug_span!(
            "deliver",
            subscription = %self.name,
            seq = event.seq,
            attempt,
            correlation_id = event.correlation_id.unwrap_or("")
        );
        let _entered = span.enter();
        match catch_unwind(AssertUnwindSafe(|| handler.handle(event, attempt))) {
            Ok(r) => r,
            Err(panic) => Err(self.panicked(stored.seq(), attempt, panic)),
        }
    }

    /// A handler's panic as the failed attempt it is.
    #[cold]
    fn panicked(
        &self,
        seq: u64,
        attempt: u32,
        panic: Box<dyn std::any::Any + Send>,
    ) -> HandlerError {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic".into());
        tracing::warn!(subscription = %self.name, seq, attempt, panic = %msg, "handler panicked");
        HandlerError::Retryable(format!("handler panicked: {msg}"))
    }

    /// Delivers `first` and then the events ready after it, in order, under one lock of the
    /// handler, until none is ready, a control is pending, `RUN_EVENTS_MAX` were
    /// delivered, or a checkpoint is due (by count, or by the clock it looks at every
    /// `run.clock_every` events). Each handled event
    /// moves the published position (and `unsaved`) on at once, as delivering them one
    /// by one did.
    ///
    /// An event whose first attempt fails (an error, a panic, or bytes that do not decode)
    /// leaves the fast path: the handler is unlocked and [`Shared::deliver_failed`]
    /// retries it by the policy, backing off, parking or stopping as it says.
    fn deliver_ready(
        &self,
        first: StoredEvent,
        follower: &mut Follower,
        jitter: &mut Jitter,
        unsaved: &mut u64,
        run: Run,
    ) -> Step {
        let counters = &self.counters;
        let mut stored = first;
        let mut handler = self.handler.lock();
        let mut run_len = 0u64;
        loop {
            // Parked by an earlier run after its last checkpoint (met again after a
            // crash): it stays a single dead letter; redrive is how it is delivered again.
            // Only the worker parks, so `parked_any` cannot turn on during a run.
            let parked = self.parked_entry(&stored);
            let skip = parked.is_some_and(|id| run.skip_parked.skips(stored.seq(), id));
            if !skip {
                match self.attempt_with(&mut **handler, &stored, 1) {
                    // Only this thread writes the counters: a load and a store, not a
                    // locked read-modify-write.
                    Ok(()) => {
                        counters.delivered.store(
                            counters.delivered.load(Ordering::Relaxed) + 1,
                            Ordering::Relaxed,
                        );
                        if let Some(id) = parked {
                            self.resolve_handled(id);
                        }
                    }
                    Err(error) => {
                        drop(handler);
                        match self.deliver_failed(&stored, jitter, error, parked) {
                            Outcome::Handled | Outcome::Parked => {}
                            Outcome::Reset => return Step::Continue,
                            Outcome::Interrupted => return Step::Interrupted,
                            Outcome::Poison(error) => {
                                return Step::Poison {
                                    seq: stored.seq(),
                                    error,
                                }
                            }
                        }
                        handler = self.handler.lock();
                    }
                }
            }
            *unsaved += 1;
            run_len += 1;
            let position = follower.position();
            counters.position.store(position, Ordering::Release);
            if position > counters.wanted.load(Ordering::Acquire) {
                self.notify();
            }
            if run_len >= RUN_EVENTS_MAX
                || (run_len.is_multiple_of(run.clock_every) && Instant::now() >= run.save_due_at)
                || *unsaved >= self.options.checkpoint_every_events
                || self.control_pending.load(Ordering::Acquire)
            {
                return Step::Continue;
            }
            // Let a `redrive` waiting for the handler have it between two events.
            MutexGuard::bump(&mut handler);
            // A read error is met again (and handled) by the caller's next read.
            match follower.next_timeout(Duration::ZERO) {
                Ok(Some(next)) => stored = next,
                Ok(None) => {
                    // Caught up: tell `wait_until_handled` callers now, not a slice later.
                    drop(handler);
                    self.notify();
                    return Step::Continue;
                }
                Err(_) => return Step::Continue,
            }
        }
    }

    /// Goes on with an event whose first attempt failed with `first`: retries it by the
    /// policy, then parks it (or updates its dead letter `parked`, when a replay met an
    /// event parked before) or stops.
    fn deliver_failed(
        &self,
        stored: &StoredEvent,
        jitter: &mut Jitter,
        first: HandlerError,
        parked: Option<u64>,
    ) -> Outcome {
        let policy = &self.options.retry;
        let first_failure = now_us();
        let mut attempt = 1;
        let mut outcome = Err(first);
        let error = loop {
            match outcome {
                Ok(()) => {
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    if let Some(id) = parked {
                        self.resolve_handled(id);
                    }
                    return Outcome::Handled;
                }
                Err(HandlerError::Permanent(e)) => break e,
                Err(HandlerError::Retryable(e)) if attempt >= policy.attempts_max => break e,
                Err(HandlerError::Retryable(e)) => {
                    self.counters.retried.fetch_add(1, Ordering::Relaxed);
                    let delay = policy.delay_after(attempt, jitter.next());
                    tracing::debug!(subscription = %self.name, seq = stored.seq(), attempt, delay_ms = delay.as_millis() as u64, error = %e, "delivery failed; retrying");
                    // Back off without blocking other subscriptions (each has its own
                    // thread), waking early to stop or reset.
                    let deadline = crate::deadline::deadline_after(Instant::now(), delay);
                    let mut c = self.control.lock();
                    while !c.stop && c.reset_to.is_none() {
                        if self.control_cv.wait_until(&mut c, deadline).timed_out() {
                            break;
                        }
                    }
                    if c.stop {
                        return Outcome::Interrupted;
                    }
                    if c.reset_to.is_some() {
                        return Outcome::Reset;
                    }
                    drop(c);
                    attempt += 1;
                    outcome = self.attempt(stored, attempt);
                }
            }
        };
        if self.options.on_exhausted == OnExhausted::Stop {
            return Outcome::Poison(format!("attempt {attempt}: {error}"));
        }
        if let Some(id) = parked {
            let updated = self.with_dead_letters(|dl| {
                let before = dl.get(id).map_or(0, |d| d.attempts);
                dl.update(id, before + attempt, &error, now_us())
            });
            return match updated {
                Ok(()) => {
                    self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    Outcome::Parked
                }
                Err(e) => Outcome::Poison(format!("updating its dead letter failed: {e}")),
            };
        }
        let event = stored.event();
        let (aggregate_id, version) = parked_identity(&event);
        let head = (
            aggregate_id.to_string(),
            version,
            match &event {
                Ok(e) => e.event_type.to_string(),
                Err(e) => format!("undecodable: {e}"),
            },
        );
        let entry = DeadLetter {
            id: 0,
            seq: stored.seq(),
            aggregate_id: head.0,
            version: head.1,
            event_type: head.2,
            attempts: attempt,
            last_error: error,
            first_failure_us: first_failure,
            last_failure_us: now_us(),
            redrive_requested: false,
        };
        self.parked_any.store(true, Ordering::Release);
        let parked = self.with_dead_letters(|dl| {
            let (_, evicted) = dl.park(entry)?;
            Ok((evicted, dl.evicted()))
        });
        match parked {
            Ok((evicted, total)) => {
                if evicted > 0 {
                    if let Err(e) = self.db.put(&self.db.evicted, &self.name, total) {
                        tracing::error!(subscription = %self.name, error = %e, "saving the evicted count failed");
                    }
                }
                self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                Outcome::Parked
            }
            Err(e) => Outcome::Poison(format!("parking the event failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ExpectedVersion, NewEvent, Options};

    /// Runs of ready events are delivered under one handler lock: failures and panics in
    /// the middle of a run still cost exactly the event that failed one attempt, in seq
    /// order, with exact counters and checkpoint.
    #[test]
    fn failures_inside_a_run_of_ready_events_cost_exactly_that_event_an_attempt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let n = 3_000u64;
        let events: Vec<NewEvent> = (0..n)
            .map(|i| NewEvent::json_text("T", format!("{i}")))
            .collect();
        for chunk in events.chunks(500) {
            store.append("a-1", ExpectedVersion::Any, chunk).unwrap();
        }
        let fails = |seq: u64| seq % 97 == 5 || seq % 101 == 7;
        let seen: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
        let log = Arc::clone(&seen);
        let mut options = SubscriptionOptions::default();
        options.retry.retry_delay_ms_min = 1;
        options.retry.retry_delay_ms_max = 2;
        let publisher = Publisher::open(&store).unwrap();
        let sub = publisher
            .subscribe("runs", options, move |e: &EventRef<'_>, attempt: u32| {
                log.lock().push((e.seq, attempt));
                if attempt == 1 && e.seq % 97 == 5 {
                    panic!("first attempt at {}", e.seq);
                }
                if attempt == 1 && e.seq % 101 == 7 {
                    return Err(HandlerError::Retryable("not yet".into()));
                }
                Ok(())
            })
            .unwrap();
        assert!(sub.wait_until_handled(n - 1, Duration::from_secs(60)));
        let want: Vec<(u64, u32)> = (0..n)
            .flat_map(|seq| {
                if fails(seq) {
                    vec![(seq, 1), (seq, 2)]
                } else {
                    vec![(seq, 1)]
                }
            })
            .collect();
        assert_eq!(*seen.lock(), want);
        let stats = sub.stats();
        let failing = (0..n).filter(|s| fails(*s)).count() as u64;
        assert_eq!(
            (
                stats.delivered,
                stats.retried,
                stats.dead_lettered,
                stats.position
            ),
            (n, failing, 0, n)
        );
        sub.stop(Duration::from_secs(30)).unwrap();
        assert_eq!(sub.stats().checkpoint, n);
    }
}
