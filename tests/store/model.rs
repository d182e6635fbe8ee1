//! Model-based property test: random appends, reads, follows, reopens and crashes against
//! a simple in-memory model.

use crate::common::store_options;
use eventlog::store::{AppendError, Direction, ExpectedVersion, Filter, NewEvent, Store};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    Append {
        agg: u8,
        expected: u8,
        count: u8,
        ty: u8,
    },
    ReadAggregate {
        agg: u8,
        from: u8,
        backward: bool,
    },
    ReadType {
        ty: u8,
        from: u16,
    },
    Follow {
        from: u16,
    },
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..6, 0u8..6, 1u8..5, 0u8..3).prop_map(|(agg, expected, count, ty)| Op::Append { agg, expected, count, ty }),
        2 => (0u8..6, 0u8..8, any::<bool>()).prop_map(|(agg, from, backward)| Op::ReadAggregate { agg, from, backward }),
        1 => (0u8..3, 0u16..60).prop_map(|(ty, from)| Op::ReadType { ty, from }),
        1 => (0u16..60).prop_map(|from| Op::Follow { from }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct Ev {
    agg: String,
    version: u64,
    ty: String,
    payload: Vec<u8>,
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn store_matches_a_simple_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Some(Store::open(dir.path(), store_options()).unwrap());
        let mut model: Vec<Ev> = Vec::new();
        let mut versions: BTreeMap<String, u64> = BTreeMap::new();
        for op in ops {
            let s = store.as_ref().unwrap();
            match op {
                Op::Append { agg, expected, count, ty } => {
                    let agg = format!("agg-{agg}");
                    let current = versions.get(&agg).copied().unwrap_or(0);
                    let expected = match expected {
                        0 => ExpectedVersion::Any,
                        1 => ExpectedVersion::NoStream,
                        2 => ExpectedVersion::Exists,
                        3 => ExpectedVersion::Exact(current),
                        n => ExpectedVersion::Exact(current + u64::from(n) - 3),
                    };
                    let ok = match expected {
                        ExpectedVersion::Any => true,
                        ExpectedVersion::NoStream => current == 0,
                        ExpectedVersion::Exists => current > 0,
                        ExpectedVersion::Exact(v) => v == current,
                    };
                    let events: Vec<NewEvent> = (0..count).map(|i| NewEvent::binary(format!("T{ty}"), format!("{}-{i}", model.len()))).collect();
                    match s.append(&agg, expected, &events) {
                        Ok(a) => {
                            prop_assert!(ok, "append should have conflicted");
                            prop_assert_eq!(a.first_seq, model.len() as u64);
                            prop_assert_eq!(a.last_version, current + u64::from(count));
                            for (i, e) in events.iter().enumerate() {
                                model.push(Ev { agg: agg.clone(), version: current + 1 + i as u64, ty: e.event_type.clone(), payload: e.payload.clone() });
                            }
                            versions.insert(agg, current + u64::from(count));
                        }
                        Err(AppendError::WrongExpectedVersion { actual, .. }) => {
                            prop_assert!(!ok, "append should have succeeded");
                            prop_assert_eq!(actual, current);
                        }
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Op::ReadAggregate { agg, from, backward } => {
                    let agg = format!("agg-{agg}");
                    let from = u64::from(from);
                    let dir_ = if backward { Direction::Backward } else { Direction::Forward };
                    let got: Vec<(u64, u64)> = s.read_aggregate(&agg, from, dir_, usize::MAX).unwrap().map(|e| { let e = e.unwrap(); (e.event().unwrap().version, e.seq()) }).collect();
                    let mut want: Vec<(u64, u64)> = model.iter().enumerate().filter(|(_, e)| e.agg == agg && if backward { e.version <= from } else { e.version >= from }).map(|(i, e)| (e.version, i as u64)).collect();
                    if backward { want.reverse(); }
                    prop_assert_eq!(got, want);
                }
                Op::ReadType { ty, from } => {
                    let ty = format!("T{ty}");
                    let got: Vec<u64> = s.read_type(&ty, u64::from(from), usize::MAX).unwrap().map(|e| e.unwrap().seq()).collect();
                    let want: Vec<u64> = model.iter().enumerate().filter(|(i, e)| e.ty == ty && *i as u64 >= u64::from(from)).map(|(i, _)| i as u64).collect();
                    prop_assert_eq!(got, want);
                }
                Op::Follow { from } => {
                    let mut f = s.follow(u64::from(from), Filter::all());
                    let mut got = Vec::new();
                    while let Some(e) = f.next_timeout(Duration::from_millis(1)).unwrap() {
                        let r = e.to_recorded().unwrap();
                        got.push(Ev { agg: r.aggregate_id, version: r.version, ty: r.event_type, payload: r.payload });
                    }
                    let from = (from as usize).min(model.len());
                    prop_assert_eq!(&got[..], &model[from..]);
                }
                Op::Reopen => {
                    drop(store.take());
                    store = Some(Store::open(dir.path(), store_options()).unwrap());
                }
                Op::Crash => {
                    store.take().unwrap().crash();
                    store = Some(Store::open(dir.path(), store_options()).unwrap());
                }
            }
        }
        let s = store.as_ref().unwrap();
        prop_assert_eq!(s.next_seq(), model.len() as u64);
        for (agg, v) in &versions {
            prop_assert_eq!(s.aggregate_version(agg).unwrap(), *v);
        }
    }
}
