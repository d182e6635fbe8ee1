//! Byte layouts of the index trees' keys and values. See `docs/FORMAT.md`, "Index".
//!
//! Keys are a name (aggregate id or event type: UTF-8 without control characters, so never
//! containing a zero byte), a zero byte, and a big-endian number, so that sled's byte order
//! groups by name and then orders numerically.

/// An aggregate's history is walked through the events' back pointers; every this many
/// versions a checkpoint (version -> seq) in `agg_events` bounds the walk.
pub const AGG_CHECKPOINT_VERSIONS: u64 = 64;
/// Seqs per type postings bucket, as a power of two: one sled value holds the seqs of one
/// type within `1 << TYPE_BUCKET_BITS` consecutive seqs.
pub const TYPE_BUCKET_BITS: u32 = 12;

/// Whether `version` gets a checkpoint: 65, 129, 193... (version 1 needs none: walks end there).
pub fn is_checkpoint_version(version: u64) -> bool {
    version > 1 && (version - 1) % AGG_CHECKPOINT_VERSIONS == 0
}

/// The checkpoint version at or below which `version`'s walk can start: the first version
/// of its 64-version chunk.
pub fn chunk_start(version: u64) -> u64 {
    debug_assert!(version >= 1, "versions are 1-based");
    (version - 1) / AGG_CHECKPOINT_VERSIONS * AGG_CHECKPOINT_VERSIONS + 1
}

/// `name \0 n` with `n` big endian.
pub fn name_key(name: &str, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 9);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Decodes a `name_key`; `None` if it is not one.
pub fn decode_name_key(k: &[u8]) -> Option<(&str, u64)> {
    if k.len() < 9 {
        return None;
    }
    let (name, rest) = k.split_at(k.len() - 9);
    if rest[0] != 0 || name.contains(&0) {
        return None;
    }
    let n = u64::from_be_bytes(rest[1..].try_into().ok()?);
    Some((std::str::from_utf8(name).ok()?, n))
}

/// `aggregates` value: the aggregate's latest version and its seq, big endian.
pub fn latest_value(version: u64, seq: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&version.to_be_bytes());
    v[8..].copy_from_slice(&seq.to_be_bytes());
    v
}

/// Decodes a `latest_value`.
pub fn decode_latest_value(v: &[u8]) -> Option<(u64, u64)> {
    let v: &[u8; 16] = v.try_into().ok()?;
    Some((u64::from_be_bytes(v[..8].try_into().ok()?), u64::from_be_bytes(v[8..].try_into().ok()?)))
}

/// A seq as a sled value (`agg_events` checkpoints, `types` first seq), big endian.
pub fn decode_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

/// Type bucket value: strictly increasing seqs as LEB128 varints of their differences (the
/// first relative to 0).
pub fn encode_seqs_delta(seqs: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(seqs.len() * 2);
    let mut prev = 0u64;
    for (i, &s) in seqs.iter().enumerate() {
        debug_assert!(i == 0 || s > prev, "type postings must be strictly increasing");
        let mut d = s - if i == 0 { 0 } else { prev };
        loop {
            let byte = (d & 0x7f) as u8;
            d >>= 7;
            if d == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        prev = s;
    }
    out
}

/// Decodes a type bucket value; `None` if malformed (overlong varint, not increasing).
pub fn decode_seqs_delta(v: &[u8]) -> Option<Vec<u64>> {
    let mut out = Vec::with_capacity(v.len());
    let mut prev: Option<u64> = None;
    let mut d = 0u64;
    let mut shift = 0u32;
    for &b in v {
        if shift >= 64 {
            return None;
        }
        d |= u64::from(b & 0x7f).checked_shl(shift)?;
        if shift == 63 && b & 0x7e != 0 {
            return None;
        }
        if b & 0x80 != 0 {
            shift += 7;
            continue;
        }
        let s = match prev {
            None => d,
            Some(p) => {
                if d == 0 {
                    return None;
                }
                p.checked_add(d)?
            }
        };
        out.push(s);
        prev = Some(s);
        d = 0;
        shift = 0;
    }
    if shift != 0 {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn name_keys_group_by_name_then_order_by_number() {
        assert!(name_key("a", u64::MAX) < name_key("ab", 0));
        assert!(name_key("a", 5) < name_key("a", 6));
        assert!(name_key("a", 255) < name_key("a", 256));
        assert_eq!(decode_name_key(&name_key("order-1", 9)), Some(("order-1", 9)));
        assert_eq!(decode_name_key(&[1, 2, 3]), None);
        assert_eq!(decode_name_key(b"a\0b\0\0\0\0\0\0\0\0\x01"), None, "a zero byte in the name");
    }

    #[test]
    fn checkpoints_fall_every_64_versions_after_the_first() {
        assert!(!is_checkpoint_version(1));
        assert!(!is_checkpoint_version(64));
        assert!(is_checkpoint_version(65));
        assert!(is_checkpoint_version(129));
        assert_eq!(chunk_start(1), 1);
        assert_eq!(chunk_start(64), 1);
        assert_eq!(chunk_start(65), 65);
        assert_eq!(chunk_start(200), 193);
    }

    #[test]
    fn latest_value_round_trips() {
        assert_eq!(decode_latest_value(&latest_value(7, 99)), Some((7, 99)));
        assert_eq!(decode_latest_value(&[0; 15]), None);
    }

    proptest! {
        #[test]
        fn delta_postings_round_trip(mut seqs in proptest::collection::vec(0u64..u64::MAX / 2, 0..200)) {
            seqs.sort_unstable();
            seqs.dedup();
            let bytes = encode_seqs_delta(&seqs);
            prop_assert_eq!(decode_seqs_delta(&bytes), Some(seqs));
        }

        #[test]
        fn delta_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_seqs_delta(&bytes);
        }

        #[test]
        fn name_key_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode_name_key(&bytes);
        }
    }
}
