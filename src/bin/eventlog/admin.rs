//! `stats`, `verify`, `repair`, `reindex`, `subscriptions` and `deadletters`.

use crate::error::{open_error, publish_error, read_error, CliError, Code};
use crate::output::{self, clip, count, note, time_text, Out, Table};
use crate::{Context, DeadlettersCommand};
use eventlog::log::segment::{parse_file_name, INDEX_SUFFIX};
use eventlog::log::{LOCK_FILE, LOG_DIR_NAME, RECOVERY_POINT_FILE};
use eventlog::publisher::{
    check_subscription_name, DeadLetter, DeadLetterOptions, Publisher, DEAD_LETTER_DIR_NAME,
    SUBSCRIPTIONS_DIR_NAME,
};
use eventlog::storage::{FsStorage, Storage};
use eventlog::store::{Options, Store};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

/// What is known of one subscription without running it.
pub struct SubscriptionRow {
    pub name: String,
    /// The next seq it will deliver; `None` if it never saved one.
    pub checkpoint: Option<u64>,
    pub lag_events: u64,
    /// Live dead letters, or why they could not be counted.
    pub dead_letters: Result<u64, String>,
    pub dead_letters_evicted: u64,
}

/// A subscription as JSON.
#[derive(Serialize)]
struct SubscriptionJson<'a> {
    name: &'a str,
    checkpoint: Option<u64>,
    lag_events: u64,
    dead_letters: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letters_error: Option<&'a str>,
    dead_letters_evicted: u64,
}

impl SubscriptionRow {
    fn to_json(&self) -> SubscriptionJson<'_> {
        SubscriptionJson {
            name: &self.name,
            checkpoint: self.checkpoint,
            lag_events: self.lag_events,
            dead_letters: self.dead_letters.as_ref().ok().copied(),
            dead_letters_error: self.dead_letters.as_ref().err().map(String::as_str),
            dead_letters_evicted: self.dead_letters_evicted,
        }
    }

    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.checkpoint.map_or("-".into(), |c| c.to_string()),
            self.lag_events.to_string(),
            match &self.dead_letters {
                Ok(n) => n.to_string(),
                Err(e) => format!("? ({})", clip(e, 40)),
            },
            self.dead_letters_evicted.to_string(),
        ]
    }
}

const SUBSCRIPTION_COLUMNS: [&str; 5] = [
    "subscription",
    "checkpoint",
    "lag",
    "dead letters",
    "evicted",
];

/// Subscriptions with a stored checkpoint or dead letters. Creates nothing: a store no
/// subscription ever ran on has no publisher database, and none is made.
pub fn subscription_rows(store: &Store) -> Result<Vec<SubscriptionRow>, CliError> {
    let dir = store.dir();
    let dead_letter_dir = dir.join(DEAD_LETTER_DIR_NAME);
    let mut with_dead_letters = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(&dead_letter_dir) {
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str() {
                if check_subscription_name(name).is_ok() {
                    with_dead_letters.insert(name.to_string());
                }
            }
        }
    }
    let has_db = dir.join(SUBSCRIPTIONS_DIR_NAME).is_dir();
    if !has_db && with_dead_letters.is_empty() {
        return Ok(Vec::new());
    }
    let publisher = Publisher::open(store).map_err(publish_error)?;
    let stored = publisher.stored_subscriptions().map_err(publish_error)?;
    let next_seq = store.next_seq();
    let mut rows = Vec::new();
    let mut names: BTreeSet<String> = with_dead_letters.clone();
    names.extend(stored.iter().map(|s| s.name.clone()));
    for name in names {
        let stored = stored.iter().find(|s| s.name == name);
        let dead_letters = if with_dead_letters.contains(&name) {
            publisher
                .open_dead_letters(&name, DeadLetterOptions::default())
                .map(|dl| dl.len())
                .map_err(|e| e.to_string())
        } else {
            Ok(0)
        };
        let checkpoint = stored.map(|s| s.checkpoint);
        rows.push(SubscriptionRow {
            lag_events: next_seq.saturating_sub(checkpoint.unwrap_or(0)),
            checkpoint,
            dead_letters,
            dead_letters_evicted: stored.map_or(0, |s| s.dead_letters_evicted),
            name,
        });
    }
    Ok(rows)
}

pub fn stats(ctx: &Context) -> Result<(), CliError> {
    let store = ctx.open_existing()?;
    let s = store.stats().map_err(read_error)?;
    let subs = subscription_rows(&store)?;
    let mut out = Out::new();
    if ctx.pretty {
        let head = s.head_seq.map_or("- (empty)".into(), |h| h.to_string());
        let lines = [
            ("store", ctx.dir.display().to_string()),
            ("head seq", head),
            ("events", count(s.event_count)),
            ("aggregates", count(s.aggregate_count)),
            ("types", count(s.type_count)),
            ("segments", count(s.segment_count)),
            ("log", output::bytes(s.log_bytes)),
            ("index on disk", output::bytes(s.index_disk_bytes)),
            ("index lag", format!("{} events", count(s.index_lag_events))),
        ];
        for (k, v) in lines {
            out.line(&format!("{k:<14} {v}"))?;
        }
        if !subs.is_empty() {
            out.line("")?;
            let mut t = Table::new(&SUBSCRIPTION_COLUMNS, usize::MAX);
            for r in &subs {
                t.row(&mut out, r.cells())?;
            }
            t.flush(&mut out)?;
        }
    } else {
        #[derive(Serialize)]
        struct StatsJson<'a> {
            dir: String,
            head_seq: Option<u64>,
            events: u64,
            aggregates: u64,
            types: u64,
            segments: u64,
            log_bytes: u64,
            index_disk_bytes: u64,
            index_lag_events: u64,
            subscriptions: Vec<SubscriptionJson<'a>>,
        }
        out.json(&StatsJson {
            dir: ctx.dir.display().to_string(),
            head_seq: s.head_seq,
            events: s.event_count,
            aggregates: s.aggregate_count,
            types: s.type_count,
            segments: s.segment_count,
            log_bytes: s.log_bytes,
            index_disk_bytes: s.index_disk_bytes,
            index_lag_events: s.index_lag_events,
            subscriptions: subs.iter().map(SubscriptionRow::to_json).collect(),
        })?;
    }
    out.flush()
}

pub fn verify(ctx: &Context) -> Result<(), CliError> {
    let store = ctx.open_existing()?;
    let started = Instant::now();
    let bar = output::progress(Some(store.next_seq()), "verifying", "events");
    let report = store
        .verify(|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .map_err(read_error)?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let mut out = Out::new();
    if ctx.pretty {
        out.line(&format!(
            "checked {} events of {} aggregates and {} types in {seconds:.2} s: {}",
            count(report.events_checked),
            count(report.aggregates),
            count(report.types),
            if report.is_clean() {
                "clean".to_string()
            } else {
                format!("{} problems", count(report.problem_count))
            }
        ))?;
        for p in &report.problems {
            out.line(&format!("  {p}"))?;
        }
        let unlisted = report.problem_count - report.problems.len() as u64;
        if unlisted > 0 {
            out.line(&format!("  ... and {} more", count(unlisted)))?;
        }
    } else {
        #[derive(Serialize)]
        struct VerifyJson<'a> {
            clean: bool,
            events_checked: u64,
            aggregates: u64,
            types: u64,
            problem_count: u64,
            problems: &'a [String],
            seconds: f64,
        }
        out.json(&VerifyJson {
            clean: report.is_clean(),
            events_checked: report.events_checked,
            aggregates: report.aggregates,
            types: report.types,
            problem_count: report.problem_count,
            problems: &report.problems,
            seconds: millis(seconds),
        })?;
    }
    out.flush()?;
    if report.is_clean() {
        return Ok(());
    }
    let only_index = report.problems.iter().all(|p| p.starts_with("index:"));
    let fix = if only_index {
        format!(
            "`eventlog --dir {} reindex` rebuilds the index",
            ctx.dir.display()
        )
    } else {
        format!(
            "`eventlog --dir {} repair` quarantines the damaged part of the log (the records from there on are lost), or restore a backup",
            ctx.dir.display()
        )
    };
    Err(CliError::new(
        Code::Corrupt,
        format!(
            "verify found {} problems in {} (the report on stdout names each), the first: {}; {fix}",
            count(report.problem_count),
            ctx.dir.display(),
            report.problems.first().map_or("", String::as_str)
        ),
    ))
}

/// Removes the files that let an open skip checksums: the offset index of each sealed
/// segment and the recovery point. Both are derived data (`docs/FORMAT.md`): without them
/// the next open verifies every record's checksum, which is what a repair needs to find
/// damage in records that were verified once and rotted since. Holds the log's lock while
/// it works, so an open log is never touched.
fn force_full_scan(log_dir: &Path) -> Result<(), CliError> {
    let lock_path = log_dir.join(LOCK_FILE);
    let io = |e: std::io::Error| {
        CliError::new(
            Code::NotFound,
            format!("cannot prepare the repair of {}: {e}", log_dir.display()),
        )
    };
    let guard = FsStorage::new().try_lock(&lock_path).map_err(io)?;
    let Some(_guard) = guard else {
        return Err(CliError::new(
            Code::Locked,
            format!(
                "store {} is locked: another process has it open; stop it before repairing",
                log_dir.parent().unwrap_or(log_dir).display()
            ),
        ));
    };
    for entry in std::fs::read_dir(log_dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if parse_file_name(name, INDEX_SUFFIX).is_some() || name == RECOVERY_POINT_FILE {
            std::fs::remove_file(entry.path()).map_err(io)?;
        }
    }
    Ok(())
}

pub fn repair(ctx: &Context) -> Result<(), CliError> {
    ctx.require_store()?;
    let started = Instant::now();
    force_full_scan(&ctx.dir.join(LOG_DIR_NAME))?;
    let mut options = Options::default();
    options.log.repair = true;
    let store =
        Store::open_rebuilding_index(&ctx.dir, options).map_err(|e| open_error(&ctx.dir, e))?;
    let report = store.open_report().log.clone();
    let events = store.next_seq();
    let records_lost: u64 = report.quarantined.iter().map(|q| q.records_lost).sum();
    let seconds = started.elapsed().as_secs_f64();
    let mut out = Out::new();
    #[derive(Serialize)]
    struct QuarantinedJson {
        first_lost_seq: u64,
        records_lost: u64,
        segment: String,
        offset_bytes: u64,
        reason: String,
        moved_to: Vec<String>,
    }
    let quarantined: Vec<QuarantinedJson> = report
        .quarantined
        .iter()
        .map(|q| QuarantinedJson {
            first_lost_seq: q.first_lost_seq,
            records_lost: q.records_lost,
            segment: q.site.segment.display().to_string(),
            offset_bytes: q.site.offset_bytes,
            reason: q.site.reason.clone(),
            moved_to: q.moved_to.iter().map(|p| p.display().to_string()).collect(),
        })
        .collect();
    let mut summary = if report.quarantined.is_empty() {
        format!(
            "repair checked every record of {}: no damage found",
            ctx.dir.display()
        )
    } else {
        let first = report
            .quarantined
            .iter()
            .map(|q| q.first_lost_seq)
            .min()
            .unwrap_or(0);
        let places: Vec<String> = report
            .quarantined
            .iter()
            .map(|q| {
                format!(
                    "{} (moved to {})",
                    q.site,
                    q.moved_to
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .collect();
        format!(
            "repair lost {} records, seq {first} on, damaged at {}",
            count(records_lost),
            places.join("; ")
        )
    };
    if report.truncated_tail_bytes > 0 {
        summary.push_str(&format!(
            "; cut {} bytes of an unfinished append at the end ({})",
            count(report.truncated_tail_bytes),
            report
                .truncated_tail_reason
                .as_deref()
                .unwrap_or("torn write")
        ));
    }
    summary.push_str(&format!(
        "; {} events remain; the index was rebuilt from the log ({seconds:.2} s)",
        count(events)
    ));
    if ctx.pretty {
        out.line(&summary)?;
    } else {
        #[derive(Serialize)]
        struct RepairJson<'a> {
            damaged: bool,
            records_lost: u64,
            quarantined: Vec<QuarantinedJson>,
            truncated_tail_bytes: u64,
            truncated_tail_reason: Option<&'a str>,
            events: u64,
            index_rebuilt: bool,
            seconds: f64,
        }
        out.json(&RepairJson {
            damaged: !report.quarantined.is_empty(),
            records_lost,
            quarantined,
            truncated_tail_bytes: report.truncated_tail_bytes,
            truncated_tail_reason: report.truncated_tail_reason.as_deref(),
            events,
            index_rebuilt: true,
            seconds: millis(seconds),
        })?;
        note(&summary);
    }
    out.flush()
}

pub fn reindex(ctx: &Context) -> Result<(), CliError> {
    ctx.require_store()?;
    let started = Instant::now();
    let store = Store::open_rebuilding_index(&ctx.dir, Options::default())
        .map_err(|e| open_error(&ctx.dir, e))?;
    store.flush_index().map_err(read_error)?;
    let s = store.stats().map_err(read_error)?;
    let seconds = started.elapsed().as_secs_f64();
    let mut out = Out::new();
    if ctx.pretty {
        out.line(&format!(
            "rebuilt the index of {} from the log: {} events, {} aggregates, {} types in {seconds:.2} s",
            ctx.dir.display(),
            count(s.event_count),
            count(s.aggregate_count),
            count(s.type_count)
        ))?;
    } else {
        #[derive(Serialize)]
        struct ReindexJson {
            events_indexed: u64,
            aggregates: u64,
            types: u64,
            seconds: f64,
        }
        out.json(&ReindexJson {
            events_indexed: s.event_count,
            aggregates: s.aggregate_count,
            types: s.type_count,
            seconds: millis(seconds),
        })?;
    }
    out.flush()
}

pub fn subscriptions(ctx: &Context) -> Result<(), CliError> {
    let store = ctx.open_existing()?;
    let rows = subscription_rows(&store)?;
    let mut out = Out::new();
    if ctx.pretty {
        let mut t = Table::new(&SUBSCRIPTION_COLUMNS, usize::MAX);
        for r in &rows {
            t.row(&mut out, r.cells())?;
        }
        t.flush(&mut out)?;
    } else {
        for r in &rows {
            out.json(&r.to_json())?;
        }
    }
    out.flush()
}

/// A dead letter as JSON; `show` adds its event.
#[derive(Serialize)]
struct DeadLetterJson<'a> {
    id: u64,
    seq: u64,
    aggregate: &'a str,
    version: u64,
    #[serde(rename = "type")]
    event_type: &'a str,
    attempts: u32,
    last_error: &'a str,
    first_failure: String,
    last_failure: String,
    redrive_requested: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_error: Option<String>,
}

fn dead_letter_json(d: &DeadLetter) -> DeadLetterJson<'_> {
    DeadLetterJson {
        id: d.id,
        seq: d.seq,
        aggregate: &d.aggregate_id,
        version: d.version,
        event_type: &d.event_type,
        attempts: d.attempts,
        last_error: &d.last_error,
        first_failure: time_text(d.first_failure_us),
        last_failure: time_text(d.last_failure_us),
        redrive_requested: d.redrive_requested,
        event: None,
        event_error: None,
    }
}

/// Seconds rounded to the millisecond, for JSON.
fn millis(seconds: f64) -> f64 {
    (seconds * 1e3).round() / 1e3
}

const DEAD_LETTER_COLUMNS: [&str; 9] = [
    "id",
    "seq",
    "aggregate",
    "version",
    "type",
    "attempts",
    "last failure",
    "redrive",
    "last error",
];

fn dead_letter_cells(d: &DeadLetter) -> Vec<String> {
    vec![
        d.id.to_string(),
        d.seq.to_string(),
        d.aggregate_id.clone(),
        d.version.to_string(),
        d.event_type.clone(),
        d.attempts.to_string(),
        time_text(d.last_failure_us),
        if d.redrive_requested {
            "requested"
        } else {
            "-"
        }
        .into(),
        clip(&d.last_error, 60),
    ]
}

pub fn deadletters(ctx: &Context, command: DeadlettersCommand) -> Result<(), CliError> {
    let name = match &command {
        DeadlettersCommand::List { subscription }
        | DeadlettersCommand::Show { subscription, .. }
        | DeadlettersCommand::Redrive { subscription, .. }
        | DeadlettersCommand::Purge { subscription } => subscription.clone(),
    };
    check_subscription_name(&name).map_err(publish_error)?;
    let store = ctx.open_existing()?;
    let rows = subscription_rows(&store)?;
    if !rows.iter().any(|r| r.name == name) {
        let known: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        return Err(CliError::new(
            Code::NotFound,
            format!(
                "no subscription named {name} in {} (known: {}); `eventlog subscriptions` lists them",
                ctx.dir.display(),
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ),
        ));
    }
    let has_dead_letters = store.dir().join(DEAD_LETTER_DIR_NAME).join(&name).is_dir();
    let mut dl = if has_dead_letters {
        let publisher = Publisher::open(&store).map_err(publish_error)?;
        Some(
            publisher
                .open_dead_letters(&name, DeadLetterOptions::default())
                .map_err(publish_error)?,
        )
    } else {
        None
    };
    let entries = dl.as_ref().map(|d| d.list()).unwrap_or_default();
    let mut out = Out::new();
    match command {
        DeadlettersCommand::List { .. } => {
            if ctx.pretty {
                let mut t = Table::new(&DEAD_LETTER_COLUMNS, usize::MAX);
                for d in &entries {
                    t.row(&mut out, dead_letter_cells(d))?;
                }
                t.flush(&mut out)?;
            } else {
                for d in &entries {
                    out.json(&dead_letter_json(d))?;
                }
            }
        }
        DeadlettersCommand::Show { id, .. } => {
            let Some(d) = entries.iter().find(|d| d.id == id) else {
                return Err(CliError::new(
                    Code::NotFound,
                    format!("subscription {name} has no dead letter {id}; `eventlog deadletters list {name}` shows the ids"),
                ));
            };
            let mut v = dead_letter_json(d);
            let event = store
                .read_seq(d.seq)
                .and_then(|stored| Ok(eventlog::json::event_to_json_string(&stored.event()?)));
            match event.map(RawValue::from_string) {
                Ok(Ok(raw)) => v.event = Some(raw),
                Ok(Err(e)) => v.event_error = Some(e.to_string()),
                Err(e) => v.event_error = Some(e.to_string()),
            }
            if ctx.pretty {
                let text = serde_json::to_string(&v)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|value| serde_json::to_string_pretty(&value).ok())
                    .unwrap_or_default();
                out.line(&text)?;
            } else {
                out.json(&v)?;
            }
        }
        DeadlettersCommand::Redrive { ids, .. } => {
            let wanted: Vec<u64> = if ids.is_empty() {
                entries.iter().map(|d| d.id).collect()
            } else {
                ids
            };
            let unknown: Vec<String> = wanted
                .iter()
                .filter(|id| !entries.iter().any(|d| d.id == **id))
                .map(u64::to_string)
                .collect();
            if !unknown.is_empty() {
                return Err(CliError::new(
                    Code::NotFound,
                    format!("subscription {name} has no dead letter {}; nothing was marked; `eventlog deadletters list {name}` shows the ids", unknown.join(", ")),
                ));
            }
            let marked = match dl.as_mut() {
                Some(d) => d.request_redrive(&wanted).map_err(publish_error)?,
                None => Vec::new(),
            };
            let already: Vec<u64> = wanted
                .iter()
                .copied()
                .filter(|id| !marked.contains(id))
                .collect();
            if ctx.pretty {
                out.line(&format!(
                    "marked {} dead letters of {name} for redelivery ({} were already marked)",
                    marked.len(),
                    already.len()
                ))?;
            } else {
                out.json(&json!({ "marked": marked, "already_marked": already }))?;
            }
            note(&format!(
                "the running subscription {name} redelivers marked dead letters the next time it is idle, and removes each one it then handles"
            ));
        }
        DeadlettersCommand::Purge { .. } => {
            let mut purged = 0u64;
            if let Some(d) = dl.as_mut() {
                let ids: Vec<u64> = entries.iter().map(|e| e.id).collect();
                purged = d.resolve_all(&ids).map_err(publish_error)?;
            }
            if ctx.pretty {
                out.line(&format!("purged {purged} dead letters of {name}"))?;
            } else {
                out.json(&json!({ "purged": purged }))?;
            }
        }
    }
    out.flush()
}
