//! Record framing: how one log record is laid out in a segment. See `docs/FORMAT.md`.
//!
//! ```text
//! offset  size  field
//! 0       4     crc32 (IEEE, crc32fast) of bytes 4 .. 20 + payload_len, little endian
//! 4       4     payload_len, u32 little endian
//! 8       8     seq, u64 little endian: the record's global sequence number
//! 16      1     flags: bit 0 = BATCH_END (last record of one atomic append); others zero
//! 17      3     sync_offset, u24 little endian: how many records before this one were not
//!               yet durable when it was written; 0xFFFFFF for that many or more
//! 20      n     payload
//! ```
//!
//! The checksum covers everything but itself, length included, so a torn or flipped
//! length is caught like a flipped payload byte.
//!
//! `seq - sync_offset`, the record's *sync mark*, lets recovery tell a torn write from
//! damage: the pages of unsynced writes can land in any order, leaving a hole followed by
//! valid records, and a hole below those records' sync marks was in synced bytes, while
//! one at or above them may be what the crash did (see `segment::scan_records`). Segments
//! of format version 1 have zeros there: every earlier record durable, the careful reading.

/// Size of the fixed record header in bytes.
pub const RECORD_HEADER_SIZE_BYTES: usize = 4 /*crc*/ + 4 /*len*/ + 8 /*seq*/ + 1 /*flags*/ + 3 /*sync_offset*/;
/// The hard upper bound on a record's payload, whatever the configuration says (1 GiB).
pub const RECORD_PAYLOAD_SIZE_BYTES_LIMIT: u32 = 1 << 30;

const CRC_OFFSET: usize = 0;
const LEN_OFFSET: usize = CRC_OFFSET + 4;
const SEQ_OFFSET: usize = LEN_OFFSET + 4;
const FLAGS_OFFSET: usize = SEQ_OFFSET + 8;
const SYNC_OFFSET_OFFSET: usize = FLAGS_OFFSET + 1;
const _: () = assert!(SYNC_OFFSET_OFFSET + 3 == RECORD_HEADER_SIZE_BYTES);

/// The `sync_offset` of a record written that many records or more past the log's durable
/// end: its sync mark is not known, and recovery reads it as 0 (the careful reading).
pub const SYNC_OFFSET_UNKNOWN: u32 = 0xFF_FFFF;

/// Flag bit: this record is the last of an atomic append. Recovery keeps records only up
/// to the last record carrying it, so a multi-record append survives a crash whole or not at all.
pub const FLAG_BATCH_END: u8 = 0b0000_0001;
const FLAGS_KNOWN: u8 = FLAG_BATCH_END;

/// The size on disk of a record with a payload of `payload_len` bytes.
#[inline]
pub fn framed_len(payload_len: usize) -> usize {
    RECORD_HEADER_SIZE_BYTES + payload_len
}

/// Appends one framed record to `out`. `sync_offset` is how many records before this one
/// are not known to be durable by the time it is written: 0 if all of them are. Larger
/// values than [`SYNC_OFFSET_UNKNOWN`] are stored as it.
///
/// # Panics
/// If `payload` is longer than [`RECORD_PAYLOAD_SIZE_BYTES_LIMIT`]; callers check limits first.
pub fn encode_into(out: &mut Vec<u8>, seq: u64, flags: u8, sync_offset: u64, payload: &[u8]) {
    assert!(
        payload.len() <= RECORD_PAYLOAD_SIZE_BYTES_LIMIT as usize,
        "payload of {} bytes passed the size check",
        payload.len()
    );
    assert_eq!(flags & !FLAGS_KNOWN, 0, "unknown record flags {flags:#x}");
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(flags);
    let sync_offset = sync_offset.min(u64::from(SYNC_OFFSET_UNKNOWN)) as u32;
    out.extend_from_slice(&sync_offset.to_le_bytes()[..3]);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[start + LEN_OFFSET..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    debug_assert!(
        matches!(decode(&out[start..], u32::MAX), Decoded::Record(r) if r.seq == seq),
        "a freshly encoded record must decode"
    );
}

/// A record found in a buffer. Offsets are relative to the buffer passed to [`decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// The record's global sequence number.
    pub seq: u64,
    /// The record's flags ([`FLAG_BATCH_END`]).
    pub flags: u8,
    /// Payload length in bytes; the payload starts at [`RECORD_HEADER_SIZE_BYTES`].
    pub payload_len: u32,
    /// Records before this one not yet durable when it was written (see the module docs).
    pub sync_offset: u32,
}

impl RecordHeader {
    /// The whole record's size on disk.
    pub fn framed_len(&self) -> usize {
        framed_len(self.payload_len as usize)
    }

    /// Whether this record ends an atomic append.
    pub fn is_batch_end(&self) -> bool {
        self.flags & FLAG_BATCH_END != 0
    }

    /// The record's sync mark, if known: every record below this seq was durable before
    /// this one was written.
    pub fn sync_mark(&self) -> Option<u64> {
        if self.sync_offset == SYNC_OFFSET_UNKNOWN {
            return None;
        }
        self.seq.checked_sub(u64::from(self.sync_offset))
    }
}

/// What [`decode`] found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// A whole record with a good checksum.
    Record(RecordHeader),
    /// An all-zero header (or fewer header bytes than a header, all zero): the end of the
    /// written log, such as preallocated space.
    End,
    /// The buffer ends inside the header or payload of a record that is not all zeros.
    Truncated,
    /// The bytes do not form a valid record.
    Invalid(InvalidReason),
}

/// Why [`decode`] rejected a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    /// The stored checksum does not match the bytes.
    Checksum {
        /// The checksum stored in the header.
        stored: u32,
        /// The checksum computed over the bytes.
        computed: u32,
    },
    /// The length field is larger than the allowed maximum.
    TooLong {
        /// The length field.
        payload_len: u32,
    },
    /// Unknown flag bits.
    UnknownFlags,
}

impl std::fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvalidReason::Checksum { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
            InvalidReason::TooLong { payload_len } => {
                write!(
                    f,
                    "length field {payload_len} exceeds the record size limit"
                )
            }
            InvalidReason::UnknownFlags => write!(f, "unknown flag bits"),
        }
    }
}

/// Reads the record at the start of `buf`, verifying its checksum.
///
/// `payload_len_max` bounds the length field (a larger one is [`Decoded::Invalid`]), so a
/// flipped length cannot make the reader look gigabytes ahead. Never panics.
///
/// # Examples
/// ```
/// use eventlog::log::record::{decode, encode_into, Decoded, FLAG_BATCH_END};
/// let mut buf = Vec::new();
/// encode_into(&mut buf, 7, FLAG_BATCH_END, 0, b"payload");
/// match decode(&buf, 1024) {
///     Decoded::Record(h) => assert_eq!((h.seq, h.payload_len), (7, 7)),
///     other => panic!("{other:?}"),
/// }
/// buf[25] ^= 1;
/// assert!(matches!(decode(&buf, 1024), Decoded::Invalid(_)));
/// ```
#[inline]
pub fn decode(buf: &[u8], payload_len_max: u32) -> Decoded {
    // The common case first: a whole, valid record. Anything else takes the careful path
    // below, which says exactly what is wrong (and tells the end of the log from damage).
    // A header of zeros never gets here: its checksum is not zero.
    if let Some(header) = buf.get(..RECORD_HEADER_SIZE_BYTES) {
        let payload_len = read_u32(header, LEN_OFFSET);
        if payload_len <= payload_len_max.min(RECORD_PAYLOAD_SIZE_BYTES_LIMIT) {
            if let Some(record) = buf.get(..framed_len(payload_len as usize)) {
                if header[FLAGS_OFFSET] & !FLAGS_KNOWN == 0
                    && crc32fast::hash(&record[LEN_OFFSET..]) == read_u32(header, CRC_OFFSET)
                {
                    return Decoded::Record(header_fields(header, payload_len));
                }
            }
        }
    }
    decode_slow(buf, payload_len_max)
}

/// [`decode`] for whatever is not a valid record (and, harmlessly, for valid ones too).
#[cold]
#[inline(never)]
fn decode_slow(buf: &[u8], payload_len_max: u32) -> Decoded {
    let Some(header) = buf.get(..RECORD_HEADER_SIZE_BYTES) else {
        return if buf.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Truncated
        };
    };
    if header.iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    let stored = read_u32(header, CRC_OFFSET);
    let payload_len = read_u32(header, LEN_OFFSET);
    if payload_len > payload_len_max.min(RECORD_PAYLOAD_SIZE_BYTES_LIMIT) {
        return Decoded::Invalid(InvalidReason::TooLong { payload_len });
    }
    let total = framed_len(payload_len as usize);
    let Some(record) = buf.get(..total) else {
        return Decoded::Truncated;
    };
    let computed = crc32fast::hash(&record[LEN_OFFSET..]);
    if computed != stored {
        return Decoded::Invalid(InvalidReason::Checksum { stored, computed });
    }
    if header[FLAGS_OFFSET] & !FLAGS_KNOWN != 0 {
        return Decoded::Invalid(InvalidReason::UnknownFlags);
    }
    Decoded::Record(header_fields(header, payload_len))
}

/// The fields of a whole header whose length field is `payload_len`.
#[inline]
fn header_fields(header: &[u8], payload_len: u32) -> RecordHeader {
    RecordHeader {
        seq: read_u64(header, SEQ_OFFSET),
        flags: header[FLAGS_OFFSET],
        payload_len,
        // The three bytes at SYNC_OFFSET_OFFSET, read with the flags byte below them.
        sync_offset: read_u32(header, FLAGS_OFFSET) >> 8,
    }
}

/// Reads only the header fields at the start of `buf`, without verifying the checksum.
///
/// Used to walk records already verified (below the recovery point); returns `None` if the
/// header is cut short or its length field exceeds `payload_len_max`.
pub fn peek_header(buf: &[u8], payload_len_max: u32) -> Option<RecordHeader> {
    let header = buf.get(..RECORD_HEADER_SIZE_BYTES)?;
    let payload_len = read_u32(header, LEN_OFFSET);
    if payload_len > payload_len_max.min(RECORD_PAYLOAD_SIZE_BYTES_LIMIT) {
        return None;
    }
    Some(header_fields(header, payload_len))
}

#[inline]
fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

#[inline]
fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode_into(&mut buf, seq, FLAG_BATCH_END, 0, payload);
        buf
    }

    #[test]
    fn encoded_record_decodes_to_same_fields() {
        let buf = one(42, b"hello world");
        assert_eq!(buf.len(), framed_len(11));
        assert_eq!(
            decode(&buf, 1 << 20),
            Decoded::Record(RecordHeader {
                seq: 42,
                flags: FLAG_BATCH_END,
                payload_len: 11,
                sync_offset: 0,
            })
        );
        assert_eq!(&buf[RECORD_HEADER_SIZE_BYTES..], b"hello world");
    }

    #[test]
    fn sync_offsets_round_trip_and_saturate() {
        for (offset, stored, first) in [
            (0, 0, Some(100_000_000)),
            (999, 999, Some(99_999_001)),
            (0xFF_FFFE, 0xFF_FFFE, Some(100_000_000 - 0xFF_FFFE)),
            (0xFF_FFFF, SYNC_OFFSET_UNKNOWN, None),
            (u64::MAX, SYNC_OFFSET_UNKNOWN, None),
        ] {
            let mut buf = Vec::new();
            encode_into(&mut buf, 100_000_000, 0, offset, b"x");
            let Decoded::Record(h) = decode(&buf, 16) else {
                panic!("offset {offset} did not decode");
            };
            assert_eq!((h.sync_offset, h.sync_mark()), (stored, first));
            assert_eq!(peek_header(&buf, 16), Some(h));
        }
        // An offset past the record's own seq names no mark (only damage could write it).
        let mut buf = Vec::new();
        encode_into(&mut buf, 3, 0, 4, b"x");
        assert!(matches!(decode(&buf, 16), Decoded::Record(h) if h.sync_mark().is_none()));
    }

    #[test]
    fn unknown_flags_are_invalid() {
        let mut buf = Vec::new();
        encode_into(&mut buf, 5, FLAG_BATCH_END, 0, b"abc");
        buf[FLAGS_OFFSET] |= 0b10;
        let crc = crc32fast::hash(&buf[LEN_OFFSET..]);
        buf[..4].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode(&buf, 16),
            Decoded::Invalid(InvalidReason::UnknownFlags)
        );
    }

    #[test]
    fn empty_payload_is_a_valid_record_not_the_end() {
        let buf = one(0, b"");
        assert!(matches!(decode(&buf, 16), Decoded::Record(h) if h.payload_len == 0));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let buf = one(9, b"some payload bytes");
        for byte in 0..buf.len() {
            for bit in 0..8 {
                let mut bad = buf.clone();
                bad[byte] ^= 1 << bit;
                match decode(&bad, 1 << 20) {
                    Decoded::Record(h) => panic!("flip at {byte}:{bit} decoded as {h:?}"),
                    Decoded::End => panic!("flip at {byte}:{bit} read as end"),
                    Decoded::Truncated | Decoded::Invalid(_) => {}
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_reported_truncated() {
        let buf = one(3, b"0123456789");
        for cut in 1..buf.len() {
            assert_eq!(
                decode(&buf[..cut], 1 << 20),
                Decoded::Truncated,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_zero_header_cannot_pass_the_checksum() {
        // `decode`'s fast path relies on it: it never looks for the all-zero end marker.
        assert_ne!(crc32fast::hash(&[0u8; RECORD_HEADER_SIZE_BYTES - 4]), 0);
    }

    #[test]
    fn zero_header_is_end_of_log() {
        assert_eq!(decode(&[0u8; 64], 1 << 20), Decoded::End);
        assert_eq!(decode(&[0u8; 5], 1 << 20), Decoded::End);
        assert_eq!(decode(&[], 1 << 20), Decoded::End);
    }

    #[test]
    fn length_past_the_limit_is_invalid_without_reading_ahead() {
        let buf = one(1, &[7u8; 100]);
        assert_eq!(
            decode(&buf, 99),
            Decoded::Invalid(InvalidReason::TooLong { payload_len: 100 })
        );
    }

    #[test]
    fn peek_header_reads_fields_without_checksum() {
        let mut buf = one(77, b"abc");
        buf[RECORD_HEADER_SIZE_BYTES] ^= 0xff;
        let h = peek_header(&buf, 1024).expect("header");
        assert_eq!((h.seq, h.payload_len), (77, 3));
    }
}
