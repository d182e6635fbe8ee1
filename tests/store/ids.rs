//! Property test of idempotent retries: appends with event ids from a small pool (so that
//! ids are retried, reused and shared between aggregates), resent appends, stored events
//! copied with their ids (generated ones too) to any aggregate, index flushes, reopens,
//! crashes and rebuilt indexes, checked against a model that finds ids by reading whole
//! histories, as the store did before it indexed them.

use crate::common::store_options;
use eventlog::store::{AppendError, Appended, ExpectedVersion, NewEvent, Store};
use proptest::prelude::*;
use uuid::Uuid;

#[derive(Debug, Clone)]
enum Op {
    /// A new append: `ids` per event (`None`: generated), payloads from `content`.
    Append {
        agg: u8,
        expected: u8,
        ids: Vec<Option<u8>>,
        content: u8,
    },
    /// The `nth` (modulo) successful append sent again as it was.
    Resend {
        nth: usize,
    },
    /// The `nth` (modulo) stored event appended to `agg` with its id, as an import would.
    Copy {
        nth: usize,
        agg: u8,
    },
    Flush,
    Reopen,
    Crash,
    DeleteIndex,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..3, 0u8..4, proptest::collection::vec(proptest::option::weighted(0.8, 0u8..12), 1..4), 0u8..2)
            .prop_map(|(agg, expected, ids, content)| Op::Append { agg, expected, ids, content }),
        4 => any::<usize>().prop_map(|nth| Op::Resend { nth }),
        3 => (any::<usize>(), 0u8..3).prop_map(|(nth, agg)| Op::Copy { nth, agg }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => Just(Op::DeleteIndex),
    ]
}

/// A stored event as the model keeps it.
#[derive(Debug, Clone)]
struct Ev {
    agg: String,
    version: u64,
    id: Uuid,
    ty: String,
    payload: Vec<u8>,
}

/// What an append must do.
#[derive(Debug, PartialEq)]
enum Outcome {
    Stored { first_version: u64 },
    Retry(Appended),
    DuplicateId { version: u64 },
    WrongVersion,
}

/// The rules of `Store::append` for ids, on a plain list of events.
fn model_append(log: &[Ev], agg: &str, expected: ExpectedVersion, events: &[NewEvent]) -> Outcome {
    let current = log.iter().filter(|e| e.agg == agg).count() as u64;
    let admits = |v: u64| match expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => v == 0,
        ExpectedVersion::Exists => v > 0,
        ExpectedVersion::Exact(x) => x == v,
    };
    // (event index, version, seq) of stored events of `agg` with the request's ids.
    let mut found: Vec<(usize, u64, u64)> = Vec::new();
    let mut same_content = true;
    for (seq, stored) in log.iter().enumerate() {
        if stored.agg != agg {
            continue;
        }
        if let Some(i) = events.iter().position(|e| e.event_id == Some(stored.id)) {
            same_content &=
                stored.ty == events[i].event_type && stored.payload == events[i].payload;
            found.push((i, stored.version, seq as u64));
        }
    }
    if let Some(&(first_index, first_version, first_seq)) = found.first() {
        let n = events.len();
        let is_retry = found.len() == n
            && same_content
            && events.iter().all(|e| e.event_id.is_some())
            && found
                .iter()
                .enumerate()
                .all(|(k, &(i, v, _))| i == k && v == first_version + k as u64)
            && first_index == 0
            && admits(first_version - 1)
            && first_version + n as u64 - 1 <= current;
        return if is_retry {
            let (_, last_version, last_seq) = found[n - 1];
            Outcome::Retry(Appended {
                first_seq,
                last_seq,
                last_version,
            })
        } else {
            Outcome::DuplicateId {
                version: first_version,
            }
        };
    }
    if !admits(current) {
        return Outcome::WrongVersion;
    }
    for (i, e) in events.iter().enumerate() {
        if e.event_id.is_some() && events[..i].iter().any(|o| o.event_id == e.event_id) {
            return Outcome::DuplicateId {
                version: current + 1 + i as u64,
            };
        }
    }
    Outcome::Stored {
        first_version: current + 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn retries_and_reused_ids_match_a_model_that_reads_whole_histories(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Some(Store::open(dir.path(), store_options()).unwrap());
        let mut log: Vec<Ev> = Vec::new();
        // Successful appends, to resend.
        let mut sent: Vec<(String, ExpectedVersion, Vec<NewEvent>)> = Vec::new();
        for op in ops {
            let (agg, expected, events) = match op {
                Op::Append { agg, expected, ids, content } => {
                    let agg = format!("agg-{agg}");
                    let current = log.iter().filter(|e| e.agg == agg).count() as u64;
                    let expected = match expected {
                        0 => ExpectedVersion::Any,
                        1 => ExpectedVersion::NoStream,
                        2 => ExpectedVersion::Exact(current),
                        _ => ExpectedVersion::Exact(current.saturating_sub(2)),
                    };
                    let events: Vec<NewEvent> = ids
                        .iter()
                        .map(|id| {
                            let e = NewEvent::binary(format!("T{content}"), id.map_or(vec![9], |id| vec![id, content]));
                            match id {
                                Some(id) => e.with_id(Uuid::from_u128(u128::from(*id) + 1)),
                                None => e,
                            }
                        })
                        .collect();
                    (agg, expected, events)
                }
                Op::Resend { nth } => {
                    if sent.is_empty() {
                        continue;
                    }
                    sent[nth % sent.len()].clone()
                }
                Op::Copy { nth, agg } => {
                    if log.is_empty() {
                        continue;
                    }
                    let e = &log[nth % log.len()];
                    let copy = NewEvent::binary(e.ty.clone(), e.payload.clone()).with_id(e.id);
                    (format!("agg-{agg}"), ExpectedVersion::Any, vec![copy])
                }
                Op::Flush => {
                    store.as_ref().unwrap().flush_index().unwrap();
                    continue;
                }
                Op::Reopen => {
                    drop(store.take());
                    store = Some(Store::open(dir.path(), store_options()).unwrap());
                    continue;
                }
                Op::Crash => {
                    store.take().unwrap().crash();
                    store = Some(Store::open(dir.path(), store_options()).unwrap());
                    continue;
                }
                Op::DeleteIndex => {
                    drop(store.take());
                    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
                    store = Some(Store::open(dir.path(), store_options()).unwrap());
                    continue;
                }
            };
            let s = store.as_ref().unwrap();
            let wanted = model_append(&log, &agg, expected, &events);
            let got = match s.append(&agg, expected, &events) {
                Ok(a) if a.first_seq == log.len() as u64 => Outcome::Stored { first_version: a.last_version + 1 - events.len() as u64 },
                Ok(a) => Outcome::Retry(a),
                Err(AppendError::DuplicateEventId { version, .. }) => Outcome::DuplicateId { version },
                Err(AppendError::WrongExpectedVersion { .. }) => Outcome::WrongVersion,
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            };
            prop_assert_eq!(&got, &wanted, "append to {} expecting {:?} of {:?}", agg, expected, events.iter().map(|e| e.event_id).collect::<Vec<_>>());
            if let Outcome::Stored { first_version } = got {
                let seq = log.len() as u64;
                for (i, e) in events.iter().enumerate() {
                    // The stored id, generated ones included, as the store reports it.
                    let id = s.read_seq(seq + i as u64).unwrap().event().unwrap().event_id;
                    if let Some(given) = e.event_id {
                        prop_assert_eq!(id, given);
                    }
                    log.push(Ev { agg: agg.clone(), version: first_version + i as u64, id, ty: e.event_type.clone(), payload: e.payload.clone() });
                }
                sent.push((agg, expected, events));
            }
        }
        prop_assert_eq!(store.as_ref().unwrap().next_seq(), log.len() as u64);
    }
}
