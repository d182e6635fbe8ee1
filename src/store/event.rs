//! Events: what an application appends ([`NewEvent`]) and what it reads back
//! ([`RecordedEvent`], or the zero-copy [`EventRef`]), and their encoding in log records.
//!
//! A log record's payload is one byte of event format version ([`EVENT_FORMAT_VERSION`])
//! followed by the bincode encoding (varint integers) of the event. See `docs/FORMAT.md`.

use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;
use std::fmt;
use uuid::Uuid;

/// The event encoding version written as the first byte of every event record.
pub const EVENT_FORMAT_VERSION: u8 = 1;
/// Longest aggregate id or event type, in bytes of UTF-8.
pub const NAME_LEN_BYTES_MAX: usize = 255;
/// The first two bytes of every event id the store generates (see [`GeneratedIds`]).
const GENERATED_ID_MARK: [u8; 2] = [0xE7, 0x1D];
/// In place of the version in a generated id, for versions that do not fit its 32 bits.
const GENERATED_ID_NO_VERSION: u32 = u32::MAX;

/// Makes the ids of the events of one append that come without one: UUIDs of version 8
/// (RFC 9562's vendor-specific layout) whose first two bytes are [`GENERATED_ID_MARK`],
/// then the event's version (32 bits big endian), then 74 random bits.
///
/// The version is what lets the index leave generated ids out (they are unique by
/// construction, so they need no entry to catch reuse): an appender's id of this shape, a
/// copy of a generated one, can only be stored at the version it names or, copied
/// elsewhere, under an index entry, so finding it takes one read either way. See
/// `docs/FORMAT.md`.
///
/// The random bits come from one random seed per generator (a `Uuid::new_v4`): 10 bits
/// of the seed, and 64 bits that a bijective mix (SplitMix64) makes of the seed and a
/// counter, so no two ids of one generator share them. A fresh random UUID per event cost
/// about 70 ns, a tenth of the append path's own work per event in batches of 1,000.
#[derive(Debug)]
pub(crate) struct GeneratedIds {
    seed: u128,
    made: u64,
}

impl GeneratedIds {
    /// A generator with a fresh random seed.
    pub(crate) fn new() -> Self {
        GeneratedIds {
            seed: Uuid::new_v4().as_u128(),
            made: 0,
        }
    }

    /// The id of the next event, stored at `version`.
    pub(crate) fn next(&mut self, version: u64) -> Uuid {
        // SplitMix64: the counter times an odd constant is a bijection of the counter, and
        // so is the finalizer, so the 64 bits differ for every id of this generator.
        let mut z = (self.seed as u64).wrapping_add(self.made.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.made += 1;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // 10 more bits from the seed's other half: 74 in all.
        let high = (self.seed >> 64) as u16 & 0x3FF;
        let named = u32::try_from(version)
            .ok()
            .filter(|&v| v != GENERATED_ID_NO_VERSION)
            .unwrap_or(GENERATED_ID_NO_VERSION);
        let mut bytes = [0u8; 16];
        bytes[..2].copy_from_slice(&GENERATED_ID_MARK);
        bytes[2..6].copy_from_slice(&named.to_be_bytes());
        // Version 8 in the high nibble of byte 6, then 4 bits of `high`.
        bytes[6] = 0x80 | (high >> 6) as u8;
        // 6 more bits of `high` and the top 2 bits of `z`.
        bytes[7] = ((high & 0x3F) as u8) << 2 | (z >> 62) as u8;
        // The variant bits (10), then 6 bits of `z`.
        bytes[8] = 0x80 | ((z >> 56) as u8 & 0x3F);
        bytes[9..16].copy_from_slice(&z.to_be_bytes()[1..]);
        Uuid::from_bytes(bytes)
    }
}

/// The version an id with the layout of [`GeneratedIds`] names; `None` for any
/// other id (or one generated for a version beyond 32 bits).
pub(crate) fn generated_id_version(id: &Uuid) -> Option<u64> {
    let b = id.as_bytes();
    if b[..2] != GENERATED_ID_MARK || b[6] >> 4 != 8 || b[8] >> 6 != 0b10 {
        return None;
    }
    let version = u32::from_be_bytes([b[2], b[3], b[4], b[5]]);
    (version != 0 && version != GENERATED_ID_NO_VERSION).then_some(u64::from(version))
}

/// Whether the index leaves out `id`, stored at `version`: it names that very version (it
/// was generated for the event, or copied to the same version). Every other id is indexed.
pub(crate) fn id_names_its_version(id: &Uuid, version: u64) -> bool {
    generated_id_version(id) == Some(version)
}

/// How the payload bytes are to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ContentType {
    /// UTF-8 JSON.
    Json,
    /// Opaque bytes (bincode, protobuf, anything).
    Binary,
}

impl ContentType {
    fn to_byte(self) -> u8 {
        match self {
            ContentType::Json => 1,
            ContentType::Binary => 2,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(ContentType::Json),
            2 => Some(ContentType::Binary),
            _ => None,
        }
    }
}

/// Metadata carried with an event: correlation and causation ids, and free key/values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Ties together everything done for one request or workflow.
    pub correlation_id: Option<String>,
    /// The id of the event or command that caused this event.
    pub causation_id: Option<String>,
    /// Anything else, as string keys and values.
    pub extra: BTreeMap<String, String>,
}

impl Metadata {
    /// Bytes of its strings (ids, keys and values): what
    /// [`METADATA_SIZE_BYTES_MAX`](crate::store::METADATA_SIZE_BYTES_MAX) limits.
    ///
    /// # Examples
    /// ```
    /// use eventlog::store::Metadata;
    /// let mut m = Metadata::default();
    /// m.correlation_id = Some("req-1".into());
    /// m.extra.insert("user".into(), "ada".into());
    /// assert_eq!(m.len_bytes(), 5 + 4 + 3);
    /// ```
    pub fn len_bytes(&self) -> usize {
        self.correlation_id.as_ref().map_or(0, String::len)
            + self.causation_id.as_ref().map_or(0, String::len)
            + self
                .extra
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// An event to append.
///
/// # Examples
/// ```
/// use eventlog::store::NewEvent;
/// let e = NewEvent::json("OrderPlaced", &serde_json::json!({"total": 12}))?
///     .with_correlation_id("req-17");
/// assert_eq!(e.event_type, "OrderPlaced");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The event type, 1..=255 bytes of UTF-8 without control characters.
    pub event_type: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// How to read the payload.
    pub content_type: ContentType,
    /// A unique id; generated when `None` (a UUID of version 8 holding the event's version
    /// and 74 random bits, laid out as `docs/FORMAT.md` describes). Retrying an append
    /// with the same ids is idempotent; the index keeps the ids given here, so recognizing
    /// a retry costs a lookup per id, not a read of the aggregate's history.
    pub event_id: Option<Uuid>,
    /// Event time in microseconds since the Unix epoch; the append time when `None`.
    pub timestamp_us: Option<i64>,
    /// Metadata.
    pub metadata: Metadata,
}

impl NewEvent {
    /// An event with a JSON payload serialized from `data`.
    ///
    /// # Errors
    /// If `data` cannot be serialized to JSON.
    pub fn json<T: Serialize + ?Sized>(
        event_type: impl Into<String>,
        data: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::with_payload(
            event_type,
            serde_json::to_vec(data)?,
            ContentType::Json,
        ))
    }

    /// An event with a JSON payload given as text (not checked to be JSON).
    pub fn json_text(event_type: impl Into<String>, json: impl Into<Vec<u8>>) -> Self {
        Self::with_payload(event_type, json.into(), ContentType::Json)
    }

    /// An event with an opaque binary payload.
    pub fn binary(event_type: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self::with_payload(event_type, payload.into(), ContentType::Binary)
    }

    fn with_payload(
        event_type: impl Into<String>,
        payload: Vec<u8>,
        content_type: ContentType,
    ) -> Self {
        NewEvent {
            event_type: event_type.into(),
            payload,
            content_type,
            event_id: None,
            timestamp_us: None,
            metadata: Metadata::default(),
        }
    }

    /// Sets the event id (for idempotent retries).
    pub fn with_id(mut self, id: Uuid) -> Self {
        self.event_id = Some(id);
        self
    }

    /// Sets the event time.
    pub fn with_timestamp_us(mut self, timestamp_us: i64) -> Self {
        self.timestamp_us = Some(timestamp_us);
        self
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Self {
        self.metadata.correlation_id = Some(id.into());
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: impl Into<String>) -> Self {
        self.metadata.causation_id = Some(id.into());
        self
    }

    /// Adds a free metadata key/value.
    pub fn with_meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.extra.insert(key.into(), value.into());
        self
    }
}

/// A stored event, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// Global sequence number, 0-based.
    pub seq: u64,
    /// The aggregate (stream) it belongs to.
    pub aggregate_id: String,
    /// Position within its aggregate, 1-based.
    pub version: u64,
    /// The event type.
    pub event_type: String,
    /// The event's unique id.
    pub event_id: Uuid,
    /// Event time, microseconds since the Unix epoch.
    pub timestamp_us: i64,
    /// Metadata.
    pub metadata: Metadata,
    /// How to read the payload.
    pub content_type: ContentType,
    /// The payload.
    pub payload: Vec<u8>,
}

/// A stored event borrowed from the log's memory map: nothing is copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef<'a> {
    /// Global sequence number, 0-based.
    pub seq: u64,
    /// The aggregate (stream) it belongs to.
    pub aggregate_id: &'a str,
    /// Position within its aggregate, 1-based.
    pub version: u64,
    /// The event type.
    pub event_type: &'a str,
    /// The event's unique id.
    pub event_id: Uuid,
    /// Event time, microseconds since the Unix epoch.
    pub timestamp_us: i64,
    /// The correlation id, if any.
    pub correlation_id: Option<&'a str>,
    /// The causation id, if any.
    pub causation_id: Option<&'a str>,
    /// Free metadata key/values.
    pub extra: Vec<(&'a str, &'a str)>,
    /// How to read the payload.
    pub content_type: ContentType,
    /// The payload.
    pub payload: &'a [u8],
}

impl EventRef<'_> {
    /// Copies into an owned [`RecordedEvent`].
    pub fn to_owned_event(&self) -> RecordedEvent {
        RecordedEvent {
            seq: self.seq,
            aggregate_id: self.aggregate_id.to_owned(),
            version: self.version,
            event_type: self.event_type.to_owned(),
            event_id: self.event_id,
            timestamp_us: self.timestamp_us,
            metadata: Metadata {
                correlation_id: self.correlation_id.map(str::to_owned),
                causation_id: self.causation_id.map(str::to_owned),
                extra: self
                    .extra
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            },
            content_type: self.content_type,
            payload: self.payload.to_vec(),
        }
    }
}

/// Where the previous event of the same aggregate is: the back pointer that lets an
/// aggregate's history be walked through the log without an index entry per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prev {
    /// This is the aggregate's first event (version 1).
    First,
    /// The previous event has this seq.
    Seq(u64),
    /// The previous event is this many records before this one (same append).
    Back(u32),
}

impl Prev {
    /// The previous event's seq, for an event stored at `seq`.
    pub fn resolve(self, seq: u64) -> Option<u64> {
        match self {
            Prev::First => None,
            Prev::Seq(s) => Some(s),
            Prev::Back(k) => seq.checked_sub(u64::from(k)),
        }
    }
}

/// Why stored bytes are not a valid event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EventDecodeError(pub String);

/// The fields of a [`NewEvent`] once id and time are settled, ready to encode.
pub(crate) struct ResolvedEvent<'a> {
    pub aggregate_id: &'a str,
    pub version: u64,
    pub prev: Prev,
    pub event_id: Uuid,
    pub timestamp_us: i64,
    pub event: &'a NewEvent,
}

// The encoding is bincode 1.x with varint integers, written and read by hand: serde's
// generic path cost several hundred nanoseconds an event, and replay decodes every event.
// The tests check byte equality with bincode itself.
const VARINT_U16: u8 = 251;
const VARINT_U32: u8 = 252;
const VARINT_U64: u8 = 253;
const VARINT_SINGLE_MAX: u64 = 250;
const PREV_FIRST: u64 = 0;
const PREV_SEQ: u64 = 1;
const PREV_BACK: u64 = 2;

fn put_varint(out: &mut Vec<u8>, n: u64) {
    if n <= VARINT_SINGLE_MAX {
        out.push(n as u8);
    } else if n <= u64::from(u16::MAX) {
        out.push(VARINT_U16);
        out.extend_from_slice(&(n as u16).to_le_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(VARINT_U32);
        out.extend_from_slice(&(n as u32).to_le_bytes());
    } else {
        out.push(VARINT_U64);
        out.extend_from_slice(&n.to_le_bytes());
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
    }
}

/// Encodes an event into a log record payload.
pub(crate) fn encode(e: &ResolvedEvent<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len_estimate(e.aggregate_id, e.event));
    encode_into(&mut out, e);
    out
}

/// Bytes an event's encoding adds to its names, metadata and payload, about (format
/// byte, length and integer varints, back pointer, id, timestamp, content type, option
/// tags).
const ENCODING_OVERHEAD_BYTES: usize = 64;

/// About how many bytes [`encode_into`] appends for `event` of `aggregate_id` (exact up
/// to the varints' widths): lets a caller size one buffer for many events.
pub(crate) fn encoded_len_estimate(aggregate_id: &str, event: &NewEvent) -> usize {
    ENCODING_OVERHEAD_BYTES
        + aggregate_id.len()
        + event.event_type.len()
        + event.metadata.len_bytes()
        + event.payload.len()
}

/// Appends the encoding of `e` to `out` (what [`encode`] returns), so that the events of
/// one append share one buffer instead of an allocation each.
pub(crate) fn encode_into(out: &mut Vec<u8>, e: &ResolvedEvent<'_>) {
    let m = &e.event.metadata;
    out.push(EVENT_FORMAT_VERSION);
    put_bytes(out, e.aggregate_id.as_bytes());
    put_bytes(out, e.event.event_type.as_bytes());
    put_varint(out, e.version);
    match e.prev {
        Prev::First => put_varint(out, PREV_FIRST),
        Prev::Seq(s) => {
            put_varint(out, PREV_SEQ);
            put_varint(out, s);
        }
        Prev::Back(k) => {
            put_varint(out, PREV_BACK);
            put_varint(out, u64::from(k));
        }
    }
    out.extend_from_slice(e.event_id.as_bytes());
    let t = e.timestamp_us;
    put_varint(out, ((t << 1) ^ (t >> 63)) as u64);
    out.push(e.event.content_type.to_byte());
    put_opt_str(out, m.correlation_id.as_deref());
    put_opt_str(out, m.causation_id.as_deref());
    put_varint(out, m.extra.len() as u64);
    for (k, v) in &m.extra {
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
    put_bytes(out, &e.event.payload);
}

/// Reads the bincode varint encoding from a slice; every method returns `None` past the
/// end or on a malformed value.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    #[inline(always)]
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.buf.split_at_checked(n)?;
        self.buf = rest;
        Some(head)
    }

    #[inline(always)]
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.buf.split_first_chunk::<N>()?;
        self.buf = rest;
        Some(*head)
    }

    #[inline(always)]
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    #[inline(always)]
    fn varint(&mut self) -> Option<u64> {
        Some(match self.u8()? {
            b if u64::from(b) <= VARINT_SINGLE_MAX => u64::from(b),
            VARINT_U16 => u64::from(u16::from_le_bytes(self.array()?)),
            VARINT_U32 => u64::from(u32::from_le_bytes(self.array()?)),
            VARINT_U64 => u64::from_le_bytes(self.array()?),
            _ => return None,
        })
    }

    #[inline(always)]
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        self.take(len)
    }

    #[inline(always)]
    fn str(&mut self) -> Option<&'a str> {
        utf8(self.bytes()?)
    }

    #[inline]
    fn opt_str(&mut self) -> Option<Option<&'a str>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.str()?)),
            _ => None,
        }
    }

    #[inline(always)]
    fn head(&mut self) -> Option<EventHead<'a>> {
        let aggregate_id = self.str()?;
        let event_type = self.str()?;
        match self.version_prev_id_fixed() {
            Some((version, prev, event_id)) => Some(EventHead {
                aggregate_id,
                event_type,
                version,
                prev,
                event_id,
            }),
            None => self.head_rest(aggregate_id, event_type),
        }
    }

    /// The version, back pointer and id in their most common forms (a one-byte version; a
    /// back pointer that is first, one byte, or a seq of one byte or a `u32`), read at
    /// fixed offsets instead of field by field, which makes one chain of dependent loads
    /// instead of five. `None` (and nothing consumed) for any other form, which
    /// [`Reader::head_rest`] then reads: both accept the same bytes as the same values.
    #[inline(always)]
    fn version_prev_id_fixed(&mut self) -> Option<(u64, Prev, Uuid)> {
        let w = self.buf.first_chunk::<23>()?;
        let single = |b: u8| (u64::from(b) <= VARINT_SINGLE_MAX).then_some(b);
        let version = u64::from(single(w[0])?);
        let (prev, at) = match u64::from(w[1]) {
            PREV_FIRST => (Prev::First, 2),
            PREV_SEQ if w[2] == VARINT_U32 => {
                let seq = u32::from_le_bytes([w[3], w[4], w[5], w[6]]);
                (Prev::Seq(u64::from(seq)), 7)
            }
            PREV_SEQ if w[2] == VARINT_U16 => {
                let seq = u16::from_le_bytes([w[3], w[4]]);
                (Prev::Seq(u64::from(seq)), 5)
            }
            PREV_SEQ => (Prev::Seq(u64::from(single(w[2])?)), 3),
            PREV_BACK => (Prev::Back(u32::from(single(w[2])?)), 3),
            _ => return None,
        };
        let (id, _) = w[at..].split_first_chunk::<16>()?;
        let event_id = Uuid::from_bytes(*id);
        self.buf = &self.buf[at + 16..];
        Some((version, prev, event_id))
    }

    /// The head after the names, field by field.
    #[inline(never)]
    fn head_rest(&mut self, aggregate_id: &'a str, event_type: &'a str) -> Option<EventHead<'a>> {
        let version = self.varint()?;
        let prev = match self.varint()? {
            PREV_FIRST => Prev::First,
            PREV_SEQ => Prev::Seq(self.varint()?),
            PREV_BACK => Prev::Back(u32::try_from(self.varint()?).ok()?),
            _ => return None,
        };
        let event_id = Uuid::from_bytes(self.array()?);
        Some(EventHead {
            aggregate_id,
            event_type,
            version,
            prev,
            event_id,
        })
    }

    #[inline(always)]
    fn rest(&mut self, seq: u64, head: EventHead<'a>) -> Option<EventRef<'a>> {
        let tail = match self.tail_fixed() {
            Some(t) => t,
            None => self.tail_fields()?,
        };
        Some(tail.into_event(seq, head))
    }

    /// The fields after the head in the most common form, read at fixed offsets: after the
    /// timestamp (a full `u64` varint) and the content type, three zero bytes (no
    /// correlation id, no causation id, no extra pairs). `None` for any other form (or
    /// bytes that are no event), which [`Reader::tail_fields`] then reads: both accept
    /// the same bytes as the same values.
    #[inline(always)]
    fn tail_fixed(&mut self) -> Option<Tail<'a>> {
        let (w, after) = self.buf.split_first_chunk::<13>()?;
        if w[0] != VARINT_U64 || w[10] != 0 || w[11] != 0 || w[12] != 0 {
            return None;
        }
        let content_type = ContentType::from_byte(w[9])?;
        let zigzag = u64::from_le_bytes([w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8]]);
        let mut r = Reader { buf: after };
        let payload = r.bytes()?;
        if !r.buf.is_empty() {
            return None;
        }
        self.buf = r.buf;
        Some(Tail {
            timestamp_us: unzigzag(zigzag),
            content_type,
            correlation_id: None,
            causation_id: None,
            extra: Vec::new(),
            payload,
        })
    }

    /// The fields after the head, one by one.
    #[inline(never)]
    fn tail_fields(&mut self) -> Option<Tail<'a>> {
        let timestamp_us = unzigzag(self.varint()?);
        let content_type = ContentType::from_byte(self.u8()?)?;
        let correlation_id = self.opt_str()?;
        let causation_id = self.opt_str()?;
        let n = usize::try_from(self.varint()?).ok()?;
        let extra = if n == 0 { Vec::new() } else { self.extra(n)? };
        let payload = self.bytes()?;
        if !self.buf.is_empty() {
            return None;
        }
        Some(Tail {
            timestamp_us,
            content_type,
            correlation_id,
            causation_id,
            extra,
            payload,
        })
    }
}

/// The fields of an event after its head.
struct Tail<'a> {
    timestamp_us: i64,
    content_type: ContentType,
    correlation_id: Option<&'a str>,
    causation_id: Option<&'a str>,
    extra: Vec<(&'a str, &'a str)>,
    payload: &'a [u8],
}

impl<'a> Tail<'a> {
    /// The whole event: `head` and this tail, at `seq`.
    #[inline(always)]
    fn into_event(self, seq: u64, head: EventHead<'a>) -> EventRef<'a> {
        EventRef {
            seq,
            aggregate_id: head.aggregate_id,
            version: head.version,
            event_type: head.event_type,
            event_id: head.event_id,
            timestamp_us: self.timestamp_us,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            extra: self.extra,
            content_type: self.content_type,
            payload: self.payload,
        }
    }
}

#[inline(always)]
fn unzigzag(zigzag: u64) -> i64 {
    ((zigzag >> 1) as i64) ^ -((zigzag & 1) as i64)
}

impl<'a> Reader<'a> {
    /// The `n` free metadata pairs.
    #[inline(never)]
    fn extra(&mut self, n: usize) -> Option<Vec<(&'a str, &'a str)>> {
        // Each pair takes at least two bytes, which bounds the allocation by the input.
        let mut extra = Vec::with_capacity(n.min(self.buf.len() / 2));
        for _ in 0..n {
            extra.push((self.str()?, self.str()?));
        }
        Some(extra)
    }
}

/// `bytes` as UTF-8 text, if they are. Names are nearly always ASCII, which is checked a
/// word at a time; anything else goes through the full validation.
#[inline]
fn utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    } else {
        std::str::from_utf8(bytes).ok()
    }
}

fn body(bytes: &[u8]) -> Result<Reader<'_>, EventDecodeError> {
    match bytes.split_first() {
        Some((&EVENT_FORMAT_VERSION, rest)) => Ok(Reader { buf: rest }),
        Some((v, _)) => Err(EventDecodeError(format!(
            "event format version {v}, this build reads {EVENT_FORMAT_VERSION}"
        ))),
        None => Err(EventDecodeError("empty event record".into())),
    }
}

fn malformed() -> EventDecodeError {
    EventDecodeError("malformed event encoding".into())
}

/// Decodes a whole event from a log record payload, borrowing from it. Never panics.
///
/// # Errors
/// If the bytes are not an event of a known format version.
pub fn decode(seq: u64, bytes: &[u8]) -> Result<EventRef<'_>, EventDecodeError> {
    let mut r = body(bytes)?;
    let head = r.head().ok_or_else(malformed)?;
    r.rest(seq, head).ok_or_else(malformed)
}

/// [`decode`] without the reason on failure: what readers call, so that the event is built
/// in place. `None` exactly when `decode` fails.
#[inline(always)]
pub(crate) fn decode_fast(seq: u64, bytes: &[u8]) -> Option<EventRef<'_>> {
    let (&EVENT_FORMAT_VERSION, rest) = bytes.split_first()? else {
        return None;
    };
    let mut r = Reader { buf: rest };
    let head = r.head()?;
    r.rest(seq, head)
}

/// The indexed fields of an event: aggregate, type, version and id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EventHead<'a> {
    pub aggregate_id: &'a str,
    pub event_type: &'a str,
    pub version: u64,
    pub prev: Prev,
    pub event_id: Uuid,
}

/// Decodes only the indexed fields (the rest is not read).
pub(crate) fn decode_head(bytes: &[u8]) -> Result<EventHead<'_>, EventDecodeError> {
    body(bytes)?.head().ok_or_else(malformed)
}

/// [`decode_head`] without the reason on failure. `None` exactly when `decode_head` fails.
#[inline]
pub(crate) fn decode_head_fast(bytes: &[u8]) -> Option<EventHead<'_>> {
    let (&EVENT_FORMAT_VERSION, rest) = bytes.split_first()? else {
        return None;
    };
    Reader { buf: rest }.head()
}

/// The aggregate id of an encoded event, without the rest of its head: what a prefetch
/// of its index entry needs. `None` if the bytes do not start like an event.
#[inline]
pub(crate) fn peek_aggregate_id(bytes: &[u8]) -> Option<&str> {
    let (&EVENT_FORMAT_VERSION, rest) = bytes.split_first()? else {
        return None;
    };
    Reader { buf: rest }.str()
}

/// Checks an aggregate id or event type: 1..=255 bytes, no control characters.
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_LEN_BYTES_MAX {
        return Err(format!(
            "is {} bytes, must be 1..={NAME_LEN_BYTES_MAX}",
            name.len()
        ));
    }
    // Most names are ASCII: check bytes, and decode characters only when there is more.
    let ascii_control = |b: &u8| *b < 0x20 || *b == 0x7f;
    if name.is_ascii() {
        if let Some(b) = name.bytes().find(ascii_control) {
            return Err(format!(
                "contains the control character {:?}",
                char::from(b)
            ));
        }
        return Ok(());
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(format!("contains the control character {:?}", c));
    }
    Ok(())
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContentType::Json => "json",
            ContentType::Binary => "binary",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An id from a generator of its own.
    fn generated_event_id(version: u64) -> Uuid {
        GeneratedIds::new().next(version)
    }

    #[test]
    fn generated_ids_are_version_8_distinct_and_name_their_version() {
        let ids: std::collections::HashSet<Uuid> = (1..=10_000).map(generated_event_id).collect();
        assert_eq!(ids.len(), 10_000, "generated ids repeat");
        // One generator, as one append uses it: distinct ids even at the same version.
        let mut one = GeneratedIds::new();
        let same_version: std::collections::HashSet<Uuid> =
            (0..100_000).map(|_| one.next(1)).collect();
        assert_eq!(same_version.len(), 100_000, "one generator repeated an id");
        // All 74 random bits vary (none is stuck at 0 or 1) across generators and within one.
        let random_mask: u128 = !(0xFFFF_FFFF_FFFF_F000_C000_0000_0000_0000u128);
        assert_eq!(random_mask.count_ones(), 74);
        let (mut ones, mut zeros) = (0u128, 0u128);
        for id in ids.iter().chain(&same_version) {
            ones |= id.as_u128();
            zeros |= !id.as_u128();
        }
        assert_eq!(
            ones & zeros & random_mask,
            random_mask,
            "a random bit never changed"
        );
        for id in &ids {
            assert_eq!(id.get_version_num(), 8, "{id}");
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122, "{id}");
            let version = generated_id_version(id).expect("names a version");
            assert!(id_names_its_version(id, version));
            assert!(!id_names_its_version(id, version + 1));
        }
        assert_eq!(generated_id_version(&generated_event_id(7)), Some(7));
        let big = u64::from(u32::MAX) - 1;
        assert_eq!(generated_id_version(&generated_event_id(big)), Some(big));
        // Versions past 32 bits are not named: such ids are indexed like any other.
        for beyond in [u64::from(u32::MAX), u64::from(u32::MAX) + 1, u64::MAX] {
            let id = generated_event_id(beyond);
            assert_eq!(generated_id_version(&id), None);
            assert!(!id_names_its_version(&id, beyond));
        }
        // Ids callers typically use name no version.
        for id in [Uuid::nil(), Uuid::from_u128(1), Uuid::new_v4(), Uuid::max()] {
            assert_eq!(generated_id_version(&id), None, "{id}");
        }
        // Nor a version-8 id without the mark.
        let mut other = *generated_event_id(3).as_bytes();
        other[1] ^= 1;
        assert_eq!(generated_id_version(&Uuid::from_bytes(other)), None);
    }

    /// The encoded form. Aggregate id, type, version and back pointer come first so indexing
    /// can read just them.
    #[derive(Serialize, Deserialize)]
    struct Wire<'a> {
        #[serde(borrow)]
        aggregate_id: &'a str,
        #[serde(borrow)]
        event_type: &'a str,
        version: u64,
        prev: Prev,
        event_id: [u8; 16],
        timestamp_us: i64,
        content_type: u8,
        #[serde(borrow)]
        correlation_id: Option<&'a str>,
        #[serde(borrow)]
        causation_id: Option<&'a str>,
        #[serde(borrow)]
        extra: Vec<(&'a str, &'a str)>,
        #[serde(with = "serde_bytes", borrow)]
        payload: &'a [u8],
    }

    fn bincode_options() -> impl bincode::Options + Copy {
        use bincode::Options;
        bincode::DefaultOptions::new()
            .with_varint_encoding()
            .with_little_endian()
            .reject_trailing_bytes()
    }

    fn arb_event() -> impl Strategy<Value = (String, u64, Prev, u128, i64, NewEvent)> {
        let prev = prop_oneof![
            Just(Prev::First),
            any::<u64>().prop_map(Prev::Seq),
            any::<u32>().prop_map(Prev::Back)
        ];
        (
            "[a-z0-9-]{1,40}",
            "[A-Za-z]{1,20}",
            any::<u64>(),
            prev,
            any::<u128>(),
            any::<i64>(),
            proptest::collection::vec(any::<u8>(), 0..600),
            proptest::option::of("[ -~]{0,30}"),
            proptest::option::of("[ -~]{0,300}"),
            proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,20}", 0..4),
            any::<bool>(),
        )
            .prop_map(
                |(agg, ty, version, prev, id, ts, payload, corr, cause, extra, json)| {
                    let mut e = if json {
                        NewEvent::json_text(ty, payload)
                    } else {
                        NewEvent::binary(ty, payload)
                    };
                    e.metadata = Metadata {
                        correlation_id: corr,
                        causation_id: cause,
                        extra,
                    };
                    (agg, version, prev, id, ts, e)
                },
            )
    }

    proptest! {
        #[test]
        fn hand_encoding_is_byte_identical_to_bincode((agg, version, prev, id, ts, e) in arb_event()) {
            use bincode::Options;
            let resolved = ResolvedEvent { aggregate_id: &agg, version, prev, event_id: Uuid::from_u128(id), timestamp_us: ts, event: &e };
            let ours = encode(&resolved);
            let wire = Wire {
                aggregate_id: &agg,
                event_type: &e.event_type,
                version,
                prev,
                event_id: *Uuid::from_u128(id).as_bytes(),
                timestamp_us: ts,
                content_type: e.content_type.to_byte(),
                correlation_id: e.metadata.correlation_id.as_deref(),
                causation_id: e.metadata.causation_id.as_deref(),
                extra: e.metadata.extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
                payload: &e.payload,
            };
            let mut theirs = vec![EVENT_FORMAT_VERSION];
            bincode_options().serialize_into(&mut theirs, &wire).unwrap();
            prop_assert_eq!(&ours, &theirs);
            // Appending to a buffer shared with earlier events gives the same bytes.
            let mut shared = b"an earlier event".to_vec();
            encode_into(&mut shared, &resolved);
            prop_assert_eq!(&shared[b"an earlier event".len()..], &ours[..]);
            let back = decode(1, &ours).unwrap().to_owned_event();
            prop_assert_eq!(back.aggregate_id, agg);
            prop_assert_eq!(back.version, version);
            prop_assert_eq!(back.timestamp_us, ts);
            prop_assert_eq!(back.metadata, e.metadata.clone());
            prop_assert_eq!(back.payload, e.payload.clone());
            let via_bincode: Wire<'_> = bincode_options().deserialize(&ours[1..]).unwrap();
            prop_assert_eq!(via_bincode.prev, prev);
        }

        #[test]
        fn fixed_offset_reads_agree_with_field_by_field_reads(
            (agg, version, prev, id, ts, e) in arb_event(),
            small in any::<bool>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..3),
            cut in any::<prop::sample::Index>(),
        ) {
            // Small versions, seqs and plain events often, so the fixed-offset forms are hit.
            let (version, prev, mut e) = if small {
                let prev = match prev {
                    Prev::Seq(s) => Prev::Seq(s % (1 << 33)),
                    Prev::Back(k) => Prev::Back(k % 300),
                    Prev::First => Prev::First,
                };
                (version % 300, prev, e)
            } else {
                (version, prev, e)
            };
            if small {
                e.metadata = Metadata::default();
            }
            let ts = if small { ts | (1 << 62) } else { ts };
            let resolved = ResolvedEvent { aggregate_id: &agg, version, prev, event_id: Uuid::from_u128(id), timestamp_us: ts, event: &e };
            let good = encode(&resolved);
            prop_assert_eq!(decode_fast(3, &good), decode_general(3, &good));
            prop_assert!(decode_fast(3, &good).is_some());
            let mut bad = good.clone();
            for (at, x) in &flips {
                let i = at.index(bad.len());
                bad[i] ^= x;
            }
            prop_assert_eq!(decode_fast(3, &bad), decode_general(3, &bad));
            prop_assert_eq!(decode_head_fast(&bad), head_general(&bad));
            let short = &good[..cut.index(good.len())];
            prop_assert_eq!(decode_fast(3, short), decode_general(3, short));
            prop_assert_eq!(decode_head_fast(short), head_general(short));
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(0, &bytes);
            let _ = decode_head(&bytes);
        }
    }

    /// What `decode_fast` must return, read field by field only.
    fn decode_general(seq: u64, bytes: &[u8]) -> Option<EventRef<'_>> {
        let (&EVENT_FORMAT_VERSION, rest) = bytes.split_first()? else {
            return None;
        };
        let mut r = Reader { buf: rest };
        let head = general_head(&mut r)?;
        let tail = r.tail_fields()?;
        Some(tail.into_event(seq, head))
    }

    fn head_general(bytes: &[u8]) -> Option<EventHead<'_>> {
        let (&EVENT_FORMAT_VERSION, rest) = bytes.split_first()? else {
            return None;
        };
        general_head(&mut Reader { buf: rest })
    }

    fn general_head<'a>(r: &mut Reader<'a>) -> Option<EventHead<'a>> {
        let aggregate_id = r.str()?;
        let event_type = r.str()?;
        r.head_rest(aggregate_id, event_type)
    }

    #[test]
    fn fixed_offset_forms_are_taken_and_agree_on_edges() {
        let e = NewEvent::binary("T", vec![7u8; 300]);
        for prev in [
            Prev::First,
            Prev::Seq(0),
            Prev::Seq(250),
            Prev::Seq(251),
            Prev::Seq(65_535),
            Prev::Seq(70_000),
            Prev::Seq(u64::from(u32::MAX)),
            Prev::Seq(1 << 40),
            Prev::Back(1),
            Prev::Back(251),
        ] {
            for version in [1, 250, 251, 1 << 20] {
                for ts in [0, 1, -1, 1_700_000_000_000_000, i64::MIN, i64::MAX] {
                    let bytes = encode(&ResolvedEvent {
                        aggregate_id: "a-1",
                        version,
                        prev,
                        event_id: Uuid::from_u128(9),
                        timestamp_us: ts,
                        event: &e,
                    });
                    let fast = decode_fast(5, &bytes).unwrap();
                    assert_eq!(Some(fast.clone()), decode_general(5, &bytes));
                    assert_eq!(
                        (fast.version, fast.timestamp_us, fast.payload.len()),
                        (version, ts, 300)
                    );
                    assert_eq!(decode_head_fast(&bytes).unwrap().prev, prev);
                    for cut in 0..bytes.len() {
                        assert_eq!(decode_fast(5, &bytes[..cut]), None);
                        assert_eq!(decode_head_fast(&bytes[..cut]), head_general(&bytes[..cut]));
                    }
                }
            }
        }
    }

    fn sample() -> NewEvent {
        NewEvent::json_text("OrderPlaced", r#"{"a":1}"#)
            .with_correlation_id("c-1")
            .with_meta("k", "v")
            .with_meta("z", "")
    }

    #[test]
    fn event_round_trips_through_encoding() {
        let e = sample();
        let id = Uuid::from_u128(7);
        let bytes = encode(&ResolvedEvent {
            aggregate_id: "order-1",
            version: 3,
            prev: Prev::Seq(5),
            event_id: id,
            timestamp_us: 1_700_000_000_000_000,
            event: &e,
        });
        assert_eq!(bytes[0], EVENT_FORMAT_VERSION);
        let r = decode(9, &bytes).unwrap().to_owned_event();
        assert_eq!(r.seq, 9);
        assert_eq!(r.aggregate_id, "order-1");
        assert_eq!(r.version, 3);
        assert_eq!(r.event_type, "OrderPlaced");
        assert_eq!(r.event_id, id);
        assert_eq!(r.timestamp_us, 1_700_000_000_000_000);
        assert_eq!(r.metadata, e.metadata);
        assert_eq!(r.content_type, ContentType::Json);
        assert_eq!(r.payload, e.payload);
        let head = decode_head(&bytes).unwrap();
        assert_eq!(
            (
                head.aggregate_id,
                head.event_type,
                head.version,
                head.event_id
            ),
            ("order-1", "OrderPlaced", 3, id)
        );
        assert_eq!(head.prev.resolve(9), Some(5));
        assert_eq!(Prev::Back(2).resolve(9), Some(7));
        assert_eq!(Prev::First.resolve(9), None);
    }

    #[test]
    fn unknown_format_version_and_garbage_are_errors_not_panics() {
        assert!(decode(0, &[]).is_err());
        assert!(decode(0, &[2, 0, 0]).unwrap_err().0.contains("version 2"));
        assert!(decode(0, &[1, 0xff, 0xff, 0xff]).is_err());
        let mut bytes = encode(&ResolvedEvent {
            aggregate_id: "a",
            version: 1,
            prev: Prev::First,
            event_id: Uuid::nil(),
            timestamp_us: 0,
            event: &sample(),
        });
        bytes.push(0);
        assert!(decode(0, &bytes).is_err(), "trailing bytes are rejected");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("order-1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name(&"x".repeat(256)).is_err());
        assert!(check_name(&"é".repeat(127)).is_ok());
        assert!(check_name("a\nb").is_err());
    }
}
