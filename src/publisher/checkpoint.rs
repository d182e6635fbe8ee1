//! A subscription's stored checkpoint: the next seq to deliver, and fingerprints of the
//! events below it, so that a log that lost its tail and took new events at those seqs
//! since is noticed.
//!
//! Under `Durability::Interval` or `None` a power loss can take events the subscription
//! already handled (and checkpointed past); a repair can cut damaged records too. New
//! events then reuse those seqs. If they were appended before the subscription starts
//! again, "checkpoint past the log's end" no longer shows the loss, and the new events
//! would be skipped as if handled. The fingerprints are the event ids at `next_seq - 1`,
//! `next_seq - 2`, `next_seq - 4`, ... (powers of two back): the subscription resumes just
//! after the newest one that still holds, so it re-delivers at most about twice as many
//! old events as the log lost, and skips none of the new ones.
//!
//! It also holds the dead letters' next id when it was saved: the dead letters parked
//! after that (ids from there on) are the ones a restart meets again without having
//! delivered them since, and are not delivered again; older ones are, when a reset (or a
//! checkpoint set by hand) moves delivery back over them.

use crate::store::Store;

/// Fingerprints kept with a checkpoint, at most (seqs up to 2^63 back).
const FINGERPRINTS_MAX: usize = 64;
/// Bytes of one fingerprint: the seq (u64 BE) and the event id.
const FINGERPRINT_BYTES: usize = 8 + 16;

/// A checkpoint as stored in the `checkpoints` tree (`docs/FORMAT.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredCheckpoint {
    /// The next seq to deliver: every seq below is handled.
    pub(crate) next_seq: u64,
    /// The dead letters' next id when it was saved (`None`: an older build's checkpoint).
    pub(crate) dead_letters_next: Option<u64>,
    /// (seq, event id) of events below `next_seq`, newest first.
    fingerprints: Vec<(u64, [u8; 16])>,
}

impl StoredCheckpoint {
    /// The checkpoint at `next_seq`, with the fingerprints of the events `store` holds
    /// below it (an event that cannot be read or decoded is left out).
    pub(crate) fn of(store: &Store, next_seq: u64, dead_letters_next: u64) -> StoredCheckpoint {
        let mut fingerprints = Vec::new();
        let mut back = 1u64;
        while back <= next_seq && fingerprints.len() < FINGERPRINTS_MAX {
            let seq = next_seq - back;
            if let Some(id) = event_id_at(store, seq) {
                fingerprints.push((seq, id));
            }
            back = back.saturating_mul(2);
        }
        StoredCheckpoint {
            next_seq,
            dead_letters_next: Some(dead_letters_next),
            fingerprints,
        }
    }

    /// The bytes stored: `next_seq` (u64 BE), the dead letters' next id (u64 BE), then a
    /// fingerprint count (u8) and each fingerprint's seq (u64 BE) and event id (16 bytes).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.fingerprints.len() * FINGERPRINT_BYTES);
        out.extend_from_slice(&self.next_seq.to_be_bytes());
        out.extend_from_slice(&self.dead_letters_next.unwrap_or(0).to_be_bytes());
        out.push(self.fingerprints.len() as u8);
        for (seq, id) in &self.fingerprints {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(id);
        }
        out
    }

    /// Reads stored bytes; 8 bytes alone (an older build's checkpoint) have no
    /// dead-letter mark and no fingerprints. `None` if malformed.
    pub(crate) fn decode(bytes: &[u8]) -> Option<StoredCheckpoint> {
        let (head, rest) = bytes.split_first_chunk::<8>()?;
        let next_seq = u64::from_be_bytes(*head);
        let mut fingerprints = Vec::new();
        let mut dead_letters_next = None;
        if !rest.is_empty() {
            let (mark, rest) = rest.split_first_chunk::<8>()?;
            dead_letters_next = Some(u64::from_be_bytes(*mark));
            let (&count, mut rest) = rest.split_first()?;
            if rest.len() != usize::from(count) * FINGERPRINT_BYTES {
                return None;
            }
            while let Some((seq, tail)) = rest.split_first_chunk::<8>() {
                let (id, tail) = tail.split_first_chunk::<16>()?;
                fingerprints.push((u64::from_be_bytes(*seq), *id));
                rest = tail;
            }
        }
        Some(StoredCheckpoint {
            next_seq,
            dead_letters_next,
            fingerprints,
        })
    }

    /// Where to resume delivery in `store`: `next_seq` if the newest fingerprint still
    /// holds; else just after the newest that does (0 if none). Without fingerprints,
    /// `next_seq` clamped to the log's end.
    pub(crate) fn resume_at(&self, store: &Store) -> u64 {
        if self.fingerprints.is_empty() {
            return self.next_seq.min(store.next_seq());
        }
        self.fingerprints
            .iter()
            .find(|(seq, id)| event_id_at(store, *seq).as_ref() == Some(id))
            .map_or(0, |(seq, _)| seq + 1)
    }
}

fn event_id_at(store: &Store, seq: u64) -> Option<[u8; 16]> {
    let stored = store.read_seq(seq).ok()?;
    let event = stored.event().ok()?;
    Some(*event.event_id.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_older_checkpoints_read_without_fingerprints() {
        let c = StoredCheckpoint {
            next_seq: 70,
            dead_letters_next: Some(12),
            fingerprints: vec![(69, [1; 16]), (68, [2; 16]), (6, [3; 16])],
        };
        assert_eq!(StoredCheckpoint::decode(&c.encode()), Some(c));
        let old = StoredCheckpoint::decode(&9u64.to_be_bytes()).unwrap();
        assert_eq!(
            (old.next_seq, old.dead_letters_next, old.fingerprints.len()),
            (9, None, 0)
        );
        assert_eq!(StoredCheckpoint::decode(&[0; 7]), None);
        assert_eq!(StoredCheckpoint::decode(&[0; 12]), None);
        let mut short = StoredCheckpoint {
            next_seq: 9,
            dead_letters_next: Some(0),
            fingerprints: Vec::new(),
        }
        .encode();
        short[16] = 1; // claims a fingerprint it does not hold
        assert_eq!(StoredCheckpoint::decode(&short), None);
    }
}
