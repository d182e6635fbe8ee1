//! Byte layouts of the index trees' keys and values. See `docs/FORMAT.md`, "Index".
//!
//! Keys are big endian so that sled's byte order is numeric order.

/// Versions per aggregate postings chunk: one sled value holds the seqs of this many
/// consecutive versions of one aggregate.
pub const AGG_CHUNK_VERSIONS: u64 = 64;
/// Seqs per type postings bucket, as a power of two: one sled value holds the seqs of one
/// type within `1 << TYPE_BUCKET_BITS` consecutive seqs.
pub const TYPE_BUCKET_BITS: u32 = 12;

/// Key in `aggregates` / `types` that holds the next id to hand out. Names never start
/// with a control character, so it cannot clash with a name.
pub const NEXT_ID_KEY: &[u8] = b"\0next_id";

/// `agg_events` key: aggregate id, then the chunk number (`(version - 1) / AGG_CHUNK_VERSIONS`).
pub fn agg_key(agg_id: u64, chunk: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&agg_id.to_be_bytes());
    k[8..].copy_from_slice(&chunk.to_be_bytes());
    k
}

/// Decodes an `agg_events` key into (aggregate id, chunk).
pub fn decode_agg_key(k: &[u8]) -> Option<(u64, u64)> {
    let k: &[u8; 16] = k.try_into().ok()?;
    let (a, c) = k.split_at(8);
    Some((u64::from_be_bytes(a.try_into().ok()?), u64::from_be_bytes(c.try_into().ok()?)))
}

/// The chunk holding `version` (1-based) and the position in it.
pub fn agg_chunk_of(version: u64) -> (u64, usize) {
    debug_assert!(version >= 1, "versions are 1-based");
    let v = version - 1;
    (v / AGG_CHUNK_VERSIONS, (v % AGG_CHUNK_VERSIONS) as usize)
}

/// `type_events` key: type id, then the bucket (`seq >> TYPE_BUCKET_BITS`).
pub fn type_key(type_id: u64, bucket: u64) -> [u8; 16] {
    agg_key(type_id, bucket)
}

/// Decodes a `type_events` key into (type id, bucket).
pub fn decode_type_key(k: &[u8]) -> Option<(u64, u64)> {
    decode_agg_key(k)
}

/// `aggregates` / `types` value: the interned id, then the latest version (0 for types).
pub fn name_value(id: u64, latest_version: u64) -> [u8; 16] {
    agg_key(id, latest_version)
}

/// Decodes a `name_value`.
pub fn decode_name_value(v: &[u8]) -> Option<(u64, u64)> {
    decode_agg_key(v)
}

/// Aggregate chunk value: the seqs of consecutive versions, u64 little endian each.
pub fn decode_seqs_fixed(v: &[u8]) -> Option<Vec<u64>> {
    if v.len() % 8 != 0 {
        return None;
    }
    Some(v.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
}

/// Encodes aggregate chunk seqs.
pub fn encode_seqs_fixed(seqs: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(seqs.len() * 8);
    for s in seqs {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out
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
    fn agg_keys_sort_by_id_then_chunk() {
        assert!(agg_key(1, 5) < agg_key(2, 0));
        assert!(agg_key(1, 5) < agg_key(1, 6));
        assert_eq!(decode_agg_key(&agg_key(7, 9)), Some((7, 9)));
        assert_eq!(decode_agg_key(&[1, 2, 3]), None);
        assert_eq!(agg_chunk_of(1), (0, 0));
        assert_eq!(agg_chunk_of(64), (0, 63));
        assert_eq!(agg_chunk_of(65), (1, 0));
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
    }
}
