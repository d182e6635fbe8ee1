//! Checking a whole store: every record's checksum, seq continuity, each aggregate's
//! version chain, and agreement of the index with the log.

use super::{event, ReadError, Store};
use crate::index::keys::is_checkpoint_version;
use rustc_hash::FxHashMap as HashMap;

/// Most problems a report lists; past this only the count grows.
pub const VERIFY_PROBLEMS_LISTED_MAX: usize = 1_000;

/// What [`Store::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records read.
    pub events_checked: u64,
    /// Aggregates seen.
    pub aggregates: u64,
    /// Event types seen.
    pub types: u64,
    /// Problems found, each naming where (at most [`VERIFY_PROBLEMS_LISTED_MAX`]).
    pub problems: Vec<String>,
    /// All problems found, listed or not.
    pub problem_count: u64,
}

impl VerifyReport {
    /// Whether nothing was wrong.
    pub fn is_clean(&self) -> bool {
        self.problem_count == 0
    }

    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < VERIFY_PROBLEMS_LISTED_MAX {
            self.problems.push(p);
        }
    }
}

impl Store {
    /// Reads every event and checks it: the record's checksum and seq, that it decodes,
    /// that its aggregate's versions are contiguous and its back pointer right, and that
    /// the index agrees (latest versions, checkpoints, type postings, the event ids given
    /// by appenders). `progress` is
    /// called with (events done, events total) every 65,536 events and at the end.
    ///
    /// # Errors
    /// [`ReadError::Index`] if the index cannot be read at all; everything else is a
    /// problem in the report.
    pub fn verify(&self, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport, ReadError> {
        let log = self.log();
        let first = log.first_seq();
        let next = log.next_seq();
        let total = next - first;
        let mut report = VerifyReport::default();
        let mut chains: HashMap<String, (u64, u64)> = HashMap::default();
        let mut types: HashMap<String, Vec<u64>> = HashMap::default();
        let index = &self.inner.index;
        for seq in first..next {
            if (seq - first).is_multiple_of(65_536) {
                progress(seq - first, total);
            }
            report.events_checked += 1;
            let record = match log.read(seq) {
                Ok(r) => r,
                Err(e) => {
                    report.problem(format!("seq {seq}: {e}"));
                    continue;
                }
            };
            let e = match event::decode(seq, record.payload()) {
                Ok(e) => e,
                Err(e) => {
                    report.problem(format!("seq {seq}: not a valid event: {e}"));
                    continue;
                }
            };
            let head = match event::decode_head(record.payload()) {
                Ok(h) => h,
                Err(e) => {
                    report.problem(format!("seq {seq}: not a valid event: {e}"));
                    continue;
                }
            };
            let (last_version, last_seq) = chains.get(e.aggregate_id).copied().unwrap_or((0, 0));
            if e.version != last_version + 1 {
                report.problem(format!(
                    "seq {seq}: aggregate {} jumps from version {last_version} to {}",
                    e.aggregate_id, e.version
                ));
            }
            let expected_prev = (last_version > 0).then_some(last_seq);
            if head.prev.resolve(seq) != expected_prev {
                report.problem(format!(
                    "seq {seq}: aggregate {} version {} points back to {:?}, expected {:?}",
                    e.aggregate_id,
                    e.version,
                    head.prev.resolve(seq),
                    expected_prev
                ));
            }
            if is_checkpoint_version(e.version) {
                match index.checkpoint(e.aggregate_id, e.version)? {
                    Some(s) if s == seq => {}
                    other => report.problem(format!("index: aggregate {} version {} checkpoint is {other:?}, the log has seq {seq}", e.aggregate_id, e.version)),
                }
            }
            if !event::id_names_its_version(&e.event_id, e.version) {
                match index.event_seq(e.aggregate_id, &e.event_id)? {
                    Some(s) if s == seq => {}
                    Some(s) if s < seq => report.problem(format!("aggregate {} has event id {} twice: at seq {s} and {seq}", e.aggregate_id, e.event_id)),
                    other => report.problem(format!("index: aggregate {} event id {} is at {other:?}, the log has it at seq {seq}", e.aggregate_id, e.event_id)),
                }
            }
            match chains.get_mut(e.aggregate_id) {
                Some(c) => *c = (e.version, seq),
                None => {
                    chains.insert(e.aggregate_id.to_string(), (e.version, seq));
                }
            }
            match types.get_mut(e.event_type) {
                Some(v) => v.push(seq),
                None => {
                    types.insert(e.event_type.to_string(), vec![seq]);
                }
            }
        }
        progress(total, total);
        report.aggregates = chains.len() as u64;
        report.types = types.len() as u64;
        let mut aggregates: Vec<_> = chains.into_iter().collect();
        aggregates.sort_unstable();
        for (agg, (version, seq)) in aggregates {
            match index.latest(&agg)? {
                Some(l) if l == (version, seq) => {}
                other => report.problem(format!("index: aggregate {agg} latest is {other:?}, the log has version {version} at seq {seq}")),
            }
        }
        let mut types: Vec<_> = types.into_iter().collect();
        types.sort_unstable();
        for (t, seqs) in types {
            let indexed: Result<Vec<u64>, _> = index.type_seqs(&t, first)?.collect();
            match indexed {
                Ok(indexed) if indexed == seqs => {}
                Ok(indexed) => {
                    let missing = seqs
                        .iter()
                        .filter(|s| indexed.binary_search(s).is_err())
                        .count();
                    let extra = indexed
                        .iter()
                        .filter(|s| seqs.binary_search(s).is_err())
                        .count();
                    report.problem(format!("index: type {t} lists {} events, the log has {} ({missing} missing, {extra} extra)", indexed.len(), seqs.len()));
                }
                Err(e) => report.problem(format!("index: type {t}: {e}")),
            }
        }
        Ok(report)
    }
}
