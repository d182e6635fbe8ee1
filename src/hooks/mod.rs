//! Plugin hooks around append.
//!
//! A [`Plugin`] registered when the store opens sees every append before it is written
//! ([`Plugin::before_append`]: enrich metadata, transform, or reject) and every event after
//! it is committed ([`Plugin::after_commit`]). Plugins run in registration order.
//!
//! A plugin cannot take the store down: a panic in `before_append` fails that append with
//! `AppendError::PluginFailed` (nothing stored); a panic in `after_commit` is logged and
//! counted. Neither poisons a lock (the store's locks are parking_lot's, and no store lock
//! is held while a plugin runs) nor stops later appends. Time spent in each plugin is
//! measured.
//!
//! A plugin may change, add or remove the events of a request, never which aggregate a
//! request appends to or the version it expects: the slice it gets can be reordered or
//! overwritten, so the store checks after each plugin that every request still names its
//! aggregate and expected version, and fails the append with `PluginFailed` (nothing
//! stored) if one does not.
//!
//! Plugins run on the appending thread, without a timeout: a plugin that blocks holds up
//! its own caller (no lock of the store is held meanwhile). `after_commit` runs once the
//! append is durable, so an append whose `after_commit` blocks is stored but does not
//! return until it finishes.

use crate::metrics::{self, Counter, Histogram, LATENCY_US_BOUNDS};
use crate::store::{EventRef, ExpectedVersion, NewEvent};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

/// One aggregate's part of an append, as a plugin sees it before it is written.
#[derive(Debug, Clone)]
pub struct PendingAppend {
    aggregate_id: String,
    expected: ExpectedVersion,
    /// The events; a plugin may change them (metadata, payload, type) or add/remove some.
    /// The store checks them again after all plugins ran.
    pub events: Vec<NewEvent>,
}

impl PendingAppend {
    pub(crate) fn new(aggregate_id: &str, expected: ExpectedVersion, events: &[NewEvent]) -> Self {
        PendingAppend {
            aggregate_id: aggregate_id.to_string(),
            expected,
            events: events.to_vec(),
        }
    }

    /// The aggregate appended to.
    pub fn aggregate_id(&self) -> &str {
        &self.aggregate_id
    }

    /// The caller's expected version.
    pub fn expected(&self) -> ExpectedVersion {
        self.expected
    }
}

/// A plugin refusing an append: the reason is returned to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

/// Code that runs around appends. Both hooks have empty defaults.
///
/// # Examples
/// ```
/// use eventlog::hooks::{PendingAppend, Plugin, Rejection};
/// struct NoEmptyPayloads;
/// impl Plugin for NoEmptyPayloads {
///     fn name(&self) -> &str { "no-empty-payloads" }
///     fn before_append(&self, batch: &mut [PendingAppend]) -> Result<(), Rejection> {
///         match batch.iter().flat_map(|a| &a.events).find(|e| e.payload.is_empty()) {
///             Some(e) => Err(Rejection(format!("{} has an empty payload", e.event_type))),
///             None => Ok(()),
///         }
///     }
/// }
/// ```
pub trait Plugin: Send + Sync {
    /// A short name, used in errors, logs and metrics.
    fn name(&self) -> &str;

    /// Sees an append (all its aggregates) before it is written; may change the events.
    ///
    /// # Errors
    /// A [`Rejection`] refuses the whole append: nothing is stored and the caller gets
    /// `AppendError::Rejected` with the reason.
    fn before_append(&self, batch: &mut [PendingAppend]) -> Result<(), Rejection> {
        let _ = batch;
        Ok(())
    }

    /// Sees the events of an append once they are committed (durable per the log's
    /// durability), on the appending thread, after the store's locks are released.
    fn after_commit(&self, events: &[EventRef<'_>]) {
        let _ = events;
    }
}

/// Why the plugins stopped an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HookError {
    Rejected { plugin: String, reason: String },
    Failed { plugin: String, message: String },
}

struct Slot {
    plugin: Arc<dyn Plugin>,
    name: String,
    before_us: Histogram,
    after_us: Histogram,
    rejections: Counter,
    failures: Counter,
    after_panics: Counter,
}

/// The plugins of a store, with their timings and failure counts.
#[derive(Default)]
pub struct Plugins {
    slots: Vec<Slot>,
}

impl fmt::Debug for Plugins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.slots.iter().map(|s| &s.name))
            .finish()
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

impl Plugins {
    /// Wraps plugins, in the order they will run.
    pub fn new(plugins: Vec<Arc<dyn Plugin>>) -> Self {
        Plugins {
            slots: plugins
                .into_iter()
                .map(|plugin| Slot {
                    name: plugin.name().to_string(),
                    plugin,
                    before_us: Histogram::new(LATENCY_US_BOUNDS),
                    after_us: Histogram::new(LATENCY_US_BOUNDS),
                    rejections: Counter::default(),
                    failures: Counter::default(),
                    after_panics: Counter::default(),
                })
                .collect(),
        }
    }

    /// Whether there are none (then appends skip the hooks entirely).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub(crate) fn run_before(&self, batch: &mut [PendingAppend]) -> Result<(), HookError> {
        // What a plugin must not change: the slice can be reordered or overwritten.
        let targets: Vec<(String, ExpectedVersion)> = batch
            .iter()
            .map(|p| (p.aggregate_id.clone(), p.expected))
            .collect();
        for slot in &self.slots {
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| slot.plugin.before_append(batch)));
            slot.before_us.observe(started.elapsed().as_micros() as u64);
            match outcome {
                Ok(Ok(())) => {
                    let moved = batch.iter().zip(&targets).position(|(p, (id, expected))| {
                        p.aggregate_id != *id || p.expected != *expected
                    });
                    if let Some(i) = moved {
                        slot.failures.add(1);
                        let (id, expected) = &targets[i];
                        let message = format!(
                            "it changed request {i} from aggregate {id:?} expecting {expected:?} to aggregate {:?} expecting {:?}; a plugin may change only the events",
                            batch[i].aggregate_id, batch[i].expected
                        );
                        tracing::error!(plugin = %slot.name, %message, "plugin changed an append's target; the append fails");
                        return Err(HookError::Failed {
                            plugin: slot.name.clone(),
                            message,
                        });
                    }
                }
                Ok(Err(Rejection(reason))) => {
                    slot.rejections.add(1);
                    tracing::info!(plugin = %slot.name, %reason, "plugin rejected an append");
                    return Err(HookError::Rejected {
                        plugin: slot.name.clone(),
                        reason,
                    });
                }
                Err(panic) => {
                    slot.failures.add(1);
                    let message = panic_text(panic.as_ref());
                    tracing::error!(plugin = %slot.name, %message, "plugin panicked in before_append; the append fails");
                    return Err(HookError::Failed {
                        plugin: slot.name.clone(),
                        message,
                    });
                }
            }
        }
        Ok(())
    }

    pub(crate) fn run_after(&self, events: &[EventRef<'_>]) {
        for slot in &self.slots {
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| slot.plugin.after_commit(events)));
            slot.after_us.observe(started.elapsed().as_micros() as u64);
            if let Err(panic) = outcome {
                slot.after_panics.add(1);
                tracing::error!(plugin = %slot.name, message = %panic_text(panic.as_ref()), "plugin panicked in after_commit; counted and ignored");
            }
        }
    }

    /// Per plugin: (name, before_append calls, rejections, failures, after_commit panics).
    pub fn counts(&self) -> Vec<(String, u64, u64, u64, u64)> {
        self.slots
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.before_us.count(),
                    s.rejections.get(),
                    s.failures.get(),
                    s.after_panics.get(),
                )
            })
            .collect()
    }

    /// Renders the plugin metrics in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        if self.slots.is_empty() {
            return;
        }
        for (i, s) in self.slots.iter().enumerate() {
            let label = format!("plugin=\"{}\"", metrics::escape_label(&s.name));
            // HELP/TYPE once per family: render the first slot with them, the rest without.
            let mut text = String::new();
            s.before_us.render(
                &mut text,
                "eventlog_plugin_before_append_us",
                "Time in before_append per call, microseconds.",
                &label,
            );
            s.after_us.render(
                &mut text,
                "eventlog_plugin_after_commit_us",
                "Time in after_commit per call, microseconds.",
                &label,
            );
            if i > 0 {
                text = text
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| format!("{l}\n"))
                    .collect();
            }
            out.push_str(&text);
        }
        for (family, help, get) in [
            (
                "eventlog_plugin_rejections_total",
                "Appends a plugin rejected.",
                (|s: &Slot| s.rejections.get()) as fn(&Slot) -> u64,
            ),
            (
                "eventlog_plugin_failures_total",
                "Appends failed by a plugin panic in before_append.",
                |s: &Slot| s.failures.get(),
            ),
            (
                "eventlog_plugin_after_commit_panics_total",
                "Panics in after_commit, logged and ignored.",
                |s: &Slot| s.after_panics.get(),
            ),
        ] {
            out.push_str(&format!(
                "# HELP {family} {help}\n# TYPE {family} counter\n"
            ));
            for s in &self.slots {
                out.push_str(&format!(
                    "{family}{{plugin=\"{}\"}} {}\n",
                    metrics::escape_label(&s.name),
                    get(s)
                ));
            }
        }
    }
}
