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

/// Aggregates' latest versions are grouped into this many sled values (buckets), so that
/// writing the latest versions of a flush costs at most this many sled writes however many
/// aggregates it touched.
pub const AGG_BUCKETS: u32 = 8192;

/// The bucket of an aggregate: FNV-1a (64 bit) of its id, modulo [`AGG_BUCKETS`]. Stored
/// on disk, so it must never change.
pub fn agg_bucket(aggregate: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in aggregate.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(AGG_BUCKETS)) as u32
}

/// `aggregates` value: entries sorted by aggregate id, each `[id length u8][id][latest
/// version varint][its seq varint]`.
pub fn encode_latest_bucket<'a, I: IntoIterator<Item = (&'a str, u64, u64)>>(
    entries: I,
) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, version, seq) in entries {
        debug_assert!(name.len() <= 255, "aggregate ids are at most 255 bytes");
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        put_varint(&mut out, version);
        put_varint(&mut out, seq);
    }
    out
}

/// Decodes an `aggregates` bucket value; `None` if malformed.
pub fn decode_latest_bucket(mut v: &[u8]) -> Option<Vec<(&str, u64, u64)>> {
    let mut out = Vec::new();
    while let Some((&len, rest)) = v.split_first() {
        let name = std::str::from_utf8(rest.get(..len as usize)?).ok()?;
        let (version, rest) = get_varint(&rest[len as usize..])?;
        let (seq, rest) = get_varint(rest)?;
        out.push((name, version, seq));
        v = rest;
    }
    Some(out)
}

/// Finds one aggregate in an `aggregates` bucket value without decoding the rest.
pub fn find_in_latest_bucket(mut v: &[u8], aggregate: &str) -> Option<Option<(u64, u64)>> {
    while let Some((&len, rest)) = v.split_first() {
        let name = rest.get(..len as usize)?;
        let (version, rest) = get_varint(&rest[len as usize..])?;
        let (seq, rest) = get_varint(rest)?;
        if name == aggregate.as_bytes() {
            return Some(Some((version, seq)));
        }
        v = rest;
    }
    Some(None)
}

fn put_varint(out: &mut Vec<u8>, mut x: u64) {
    loop {
        let byte = (x & 0x7f) as u8;
        x >>= 7;
        if x == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn get_varint(v: &[u8]) -> Option<(u64, &[u8])> {
    let mut x = 0u64;
    for (i, &b) in v.iter().enumerate().take(10) {
        let bits = u64::from(b & 0x7f);
        // The tenth byte holds bit 63 only: more does not fit in a u64 (a shift would
        // silently drop it and decode a wrong value).
        if i == 9 && bits > 1 {
            return None;
        }
        x |= bits << (7 * i);
        if b & 0x80 == 0 {
            return Some((x, &v[i + 1..]));
        }
    }
    None
}

/// Whether `version` gets a checkpoint: 65, 129, 193... (version 1 needs none: walks end there).
pub fn is_checkpoint_version(version: u64) -> bool {
    version > 1 && (version - 1).is_multiple_of(AGG_CHECKPOINT_VERSIONS)
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

/// `aggregate \0 event id` (the id's 16 bytes): the key of the `event_ids` tree.
pub fn event_id_key(aggregate: &str, event_id: &uuid::Uuid) -> Vec<u8> {
    let mut k = Vec::with_capacity(aggregate.len() + 17);
    k.extend_from_slice(aggregate.as_bytes());
    k.push(0);
    k.extend_from_slice(event_id.as_bytes());
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
        debug_assert!(
            i == 0 || s > prev,
            "type postings must be strictly increasing"
        );
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
        assert_eq!(
            decode_name_key(&name_key("order-1", 9)),
            Some(("order-1", 9))
        );
        assert_eq!(decode_name_key(&[1, 2, 3]), None);
        assert_eq!(
            decode_name_key(b"a\0b\0\0\0\0\0\0\0\0\x01"),
            None,
            "a zero byte in the name"
        );
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
    fn latest_buckets_round_trip_and_find() {
        let v = encode_latest_bucket([("a", 1, 0), ("order-7", 300, 1 << 40)]);
        assert_eq!(
            decode_latest_bucket(&v),
            Some(vec![("a", 1, 0), ("order-7", 300, 1 << 40)])
        );
        assert_eq!(
            find_in_latest_bucket(&v, "order-7"),
            Some(Some((300, 1 << 40)))
        );
        assert_eq!(find_in_latest_bucket(&v, "b"), Some(None));
        assert_eq!(decode_latest_bucket(&v[..v.len() - 1]), None);
        assert_eq!(agg_bucket("order-1"), agg_bucket("order-1"));
        assert!(agg_bucket("x") < AGG_BUCKETS);
    }

    #[test]
    fn latest_bucket_varints_past_u64_are_malformed() {
        // Found by the `index_key_decode` fuzz target: a tenth varint byte above 1 was
        // shifted out of range and the value decoded silently truncated.
        let max = [&[1, b'a'][..], &[0xff; 9], &[0x01], &[0]].concat();
        assert_eq!(decode_latest_bucket(&max), Some(vec![("a", u64::MAX, 0)]));
        assert_eq!(max, encode_latest_bucket([("a", u64::MAX, 0)]));
        let past = [&[1, b'a'][..], &[0xff; 9], &[0x02], &[0]].concat();
        assert_eq!(decode_latest_bucket(&past), None);
        assert_eq!(find_in_latest_bucket(&past, "a"), None);
        assert_eq!(find_in_latest_bucket(&past, "b"), None);
        let seq_past = [&[1, b'a', 0][..], &[0x80; 9], &[0x7f]].concat();
        assert_eq!(decode_latest_bucket(&seq_past), None);
    }

    proptest! {
        #[test]
        fn latest_bucket_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_latest_bucket(&bytes);
            let _ = find_in_latest_bucket(&bytes, "a");
        }
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
