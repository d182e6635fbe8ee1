//! The typed layer: applications append and read their own event types (usually an enum),
//! encoded by a [`Codec`], never `Any`.

use super::{AppendError, ContentType};
use super::{Appended, Direction, ExpectedVersion, Metadata, NewEvent, ReadError, Store};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;

/// Why a typed payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{codec} codec: {message}")]
pub struct CodecError {
    /// Which codec.
    pub codec: &'static str,
    /// What went wrong.
    pub message: String,
}

/// How typed events become payload bytes and back.
pub trait Codec {
    /// The content type recorded with the payload.
    const CONTENT_TYPE: ContentType;
    /// Encodes a value.
    ///
    /// # Errors
    /// If the value cannot be represented.
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError>;
    /// Decodes a value.
    ///
    /// # Errors
    /// If the bytes are not a `T`.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError>;
}

/// JSON via serde_json: readable, what the CLI and server show.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    const CONTENT_TYPE: ContentType = ContentType::Json;
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError {
            codec: "json",
            message: e.to_string(),
        })
    }
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError {
            codec: "json",
            message: e.to_string(),
        })
    }
}

/// bincode: compact and fast, binary.
#[derive(Debug, Clone, Copy, Default)]
pub struct BincodeCodec;

impl Codec for BincodeCodec {
    const CONTENT_TYPE: ContentType = ContentType::Binary;
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
        bincode::serialize(value).map_err(|e| CodecError {
            codec: "bincode",
            message: e.to_string(),
        })
    }
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        bincode::deserialize(bytes).map_err(|e| CodecError {
            codec: "bincode",
            message: e.to_string(),
        })
    }
}

/// An application event type: serializable, and able to name its event type.
///
/// # Examples
/// ```
/// use eventlog::store::{DomainEvent, ExpectedVersion, JsonCodec, Options, Store};
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
/// enum Order { Placed { total: u32 }, Shipped }
/// impl DomainEvent for Order {
///     fn event_type(&self) -> &str {
///         match self { Order::Placed { .. } => "OrderPlaced", Order::Shipped => "OrderShipped" }
///     }
/// }
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path(), Options::default())?;
/// store.append_typed::<JsonCodec, _>("order-1", ExpectedVersion::NoStream, &[Order::Placed { total: 3 }, Order::Shipped])?;
/// let events = store.read_typed::<JsonCodec, Order>("order-1")?;
/// assert_eq!(events[1].data, Order::Shipped);
/// assert_eq!(events[1].version, 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait DomainEvent: Serialize + DeserializeOwned {
    /// The event type recorded (and indexed) for this value.
    fn event_type(&self) -> &str;
}

/// A typed event as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct TypedEvent<T> {
    /// Global seq.
    pub seq: u64,
    /// Version within the aggregate.
    pub version: u64,
    /// The event type recorded.
    pub event_type: String,
    /// The event id.
    pub event_id: uuid::Uuid,
    /// Event time, microseconds since the epoch.
    pub timestamp_us: i64,
    /// Metadata.
    pub metadata: Metadata,
    /// The decoded value.
    pub data: T,
}

/// Errors from [`Store::append_typed`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TypedAppendError {
    /// An event could not be encoded; nothing was stored.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The append failed.
    #[error(transparent)]
    Append(#[from] AppendError),
}

/// Errors from [`Store::read_typed`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TypedReadError {
    /// A stored payload is not a `T` for this codec.
    #[error("event {seq}: {source}")]
    Codec {
        /// The event.
        seq: u64,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// The read failed.
    #[error(transparent)]
    Read(#[from] ReadError),
}

struct TypedMarker<C>(PhantomData<C>);

impl Store {
    /// Appends typed events, encoded with codec `C`. See [`DomainEvent`].
    ///
    /// # Errors
    /// [`TypedAppendError::Codec`] if an event does not encode; otherwise as [`Store::append`].
    pub fn append_typed<C: Codec, T: DomainEvent>(
        &self,
        aggregate_id: &str,
        expected: ExpectedVersion,
        events: &[T],
    ) -> Result<Appended, TypedAppendError> {
        let _ = TypedMarker::<C>(PhantomData);
        let events = events
            .iter()
            .map(|e| {
                Ok(NewEvent {
                    event_type: e.event_type().to_string(),
                    payload: C::encode(e)?,
                    content_type: C::CONTENT_TYPE,
                    event_id: None,
                    timestamp_us: None,
                    metadata: Metadata::default(),
                })
            })
            .collect::<Result<Vec<_>, CodecError>>()?;
        Ok(self.append(aggregate_id, expected, &events)?)
    }

    /// Reads an aggregate's whole history as typed events decoded with codec `C`.
    ///
    /// # Errors
    /// [`TypedReadError::Codec`] if a payload is not a `T`; otherwise as [`Store::read_aggregate`].
    pub fn read_typed<C: Codec, T: DeserializeOwned>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<TypedEvent<T>>, TypedReadError> {
        let mut out = Vec::new();
        for stored in self.read_aggregate(aggregate_id, 1, Direction::Forward, usize::MAX)? {
            let stored = stored?;
            let e = stored.event()?;
            let data = C::decode(e.payload)
                .map_err(|source| TypedReadError::Codec { seq: e.seq, source })?;
            let owned = e.to_owned_event();
            out.push(TypedEvent {
                seq: owned.seq,
                version: owned.version,
                event_type: owned.event_type,
                event_id: owned.event_id,
                timestamp_us: owned.timestamp_us,
                metadata: owned.metadata,
                data,
            });
        }
        Ok(out)
    }
}
