//! Reading the log's segment files without the store's lock, for `follow`.
//!
//! The store's lock is exclusive, so a command that opened the store would keep the
//! application (or `eventlog append`) from writing while it follows. Instead this reads the
//! segment files as `docs/FORMAT.md` describes them, with the log's own record decoder:
//! - it returns a record only once its checksum is right and the append it belongs to is
//!   complete (a record with `BATCH_END` follows), so it never shows half an append;
//! - an incomplete or not yet written record is simply not there yet: it looks again later;
//! - a segment is finished once the next one (named by the next seq) exists, because an
//!   append never spans two segments and a segment is complete before the next is created.
//!
//! Under `Durability::Sync` the writer makes records visible to its own readers only after
//! `fdatasync`; this reader may see them a moment earlier (after the write, before the
//! sync). Only a power loss in that moment could take back an event it printed.

use crate::error::{CliError, Code};
use eventlog::log::record::{
    self, Decoded, RECORD_HEADER_SIZE_BYTES, RECORD_PAYLOAD_SIZE_BYTES_LIMIT,
};
use eventlog::log::segment::{
    decode_segment_header, parse_file_name, segment_file_name, SEGMENT_HEADER_SIZE_BYTES,
    SEGMENT_SUFFIX,
};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Most records one poll returns (whole appends may exceed it).
const POLL_RECORDS_MAX: usize = 4_096;

/// A segment being read.
struct Open {
    base: u64,
    file: File,
    path: PathBuf,
    /// Byte offset of the next record to read (after the last complete append).
    pos: u64,
}

/// A reader of the log's files from some seq on.
pub struct Tail {
    log_dir: PathBuf,
    segment: Option<Open>,
    /// The seq of the next record to read.
    next_seq: u64,
    /// Records read while skipping to the start that are at or past it (the rest of the
    /// append the start falls in): returned by the first poll.
    carry: Vec<(u64, Vec<u8>)>,
    /// The first seq to return (a start past the end of the log is waited for).
    start: u64,
}

fn io_error(path: &Path, e: &std::io::Error) -> CliError {
    CliError::new(
        Code::NotFound,
        format!("cannot read {}: {e}", path.display()),
    )
}

fn segment_bases(log_dir: &Path) -> Result<Vec<u64>, CliError> {
    let mut bases = Vec::new();
    let entries = std::fs::read_dir(log_dir).map_err(|e| io_error(log_dir, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error(log_dir, &e))?;
        if let Some(base) = entry
            .file_name()
            .to_str()
            .and_then(|n| parse_file_name(n, SEGMENT_SUFFIX))
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

impl Tail {
    /// Starts at `from`, or at the end of the log (only new events) when `None`.
    pub fn open(log_dir: &Path, from: Option<u64>) -> Result<Tail, CliError> {
        let bases = segment_bases(log_dir)?;
        let mut tail = Tail {
            log_dir: log_dir.to_path_buf(),
            segment: None,
            next_seq: 0,
            carry: Vec::new(),
            start: from.unwrap_or(0),
        };
        let start = match from {
            Some(seq) => bases.iter().rev().find(|&&b| b <= seq).or(bases.first()),
            None => bases.last(),
        };
        if let Some(&base) = start {
            tail.open_segment(base)?;
        }
        // Skip to the starting seq (or to the end), keeping what is at or past it.
        let target = from.unwrap_or(u64::MAX);
        let mut read = Vec::new();
        while tail.next_seq < target {
            read.clear();
            tail.poll_until(&mut read, target)?;
            if read.is_empty() {
                break;
            }
        }
        read.retain(|(seq, _)| *seq >= target);
        tail.carry = read;
        Ok(tail)
    }

    fn open_segment(&mut self, base: u64) -> Result<(), CliError> {
        let path = self.log_dir.join(segment_file_name(base));
        let file = File::open(&path).map_err(|e| io_error(&path, &e))?;
        let mut header = [0u8; SEGMENT_HEADER_SIZE_BYTES];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| io_error(&path, &e))?;
        match decode_segment_header(&header) {
            Ok(h) if h.base_seq == base => {}
            Ok(h) => {
                let b = h.base_seq;
                return Err(CliError::new(
                    Code::Corrupt,
                    format!("{} says it starts at seq {b}; its name says {base}: the log is damaged, run `eventlog verify`", path.display()),
                ))
            }
            Err(reason) => {
                return Err(CliError::new(
                    Code::Corrupt,
                    format!("{} is not a valid segment: {reason}; the log is damaged, run `eventlog verify`", path.display()),
                ))
            }
        }
        self.segment = Some(Open {
            base,
            file,
            path,
            pos: SEGMENT_HEADER_SIZE_BYTES as u64,
        });
        self.next_seq = base;
        Ok(())
    }

    /// Appends to `out` the (seq, payload) of complete appends past the position, up to
    /// about [`POLL_RECORDS_MAX`] records; appends nothing when there is nothing new.
    pub fn poll(&mut self, out: &mut Vec<(u64, Vec<u8>)>) -> Result<(), CliError> {
        if !self.carry.is_empty() {
            out.append(&mut self.carry);
            return Ok(());
        }
        let before = out.len();
        self.poll_until(out, u64::MAX)?;
        if self.start > 0 {
            let start = self.start;
            let mut kept = out.split_off(before);
            kept.retain(|(seq, _)| *seq >= start);
            out.append(&mut kept);
        }
        Ok(())
    }

    /// As [`Tail::poll`], but stops early once the position reaches `stop_at`.
    fn poll_until(&mut self, out: &mut Vec<(u64, Vec<u8>)>, stop_at: u64) -> Result<(), CliError> {
        loop {
            if self.segment.is_none() {
                // No segment yet: wait for the log's first one.
                match segment_bases(&self.log_dir)?.first() {
                    Some(&base) => self.open_segment(base)?,
                    None => return Ok(()),
                }
            }
            let before = out.len();
            self.read_appends(out, stop_at)?;
            if out.len() > before || self.next_seq >= stop_at {
                return Ok(());
            }
            // Nothing new here: if the next segment exists, this one is finished.
            let next = self.log_dir.join(segment_file_name(self.next_seq));
            let current_base = self.segment.as_ref().map_or(0, |s| s.base);
            if self.next_seq > current_base && next.exists() {
                self.open_segment(self.next_seq)?;
                continue;
            }
            return Ok(());
        }
    }

    /// Reads complete appends of the current segment.
    fn read_appends(
        &mut self,
        out: &mut Vec<(u64, Vec<u8>)>,
        stop_at: u64,
    ) -> Result<(), CliError> {
        let Some(seg) = self.segment.as_mut() else {
            return Ok(());
        };
        let file_len = seg
            .file
            .metadata()
            .map_err(|e| io_error(&seg.path, &e))?
            .len();
        let mut pos = seg.pos;
        let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut header = [0u8; RECORD_HEADER_SIZE_BYTES];
        let start_len = out.len();
        while pos + RECORD_HEADER_SIZE_BYTES as u64 <= file_len {
            if seg.file.read_exact_at(&mut header, pos).is_err() {
                break;
            }
            let Some(h) = record::peek_header(&header, RECORD_PAYLOAD_SIZE_BYTES_LIMIT) else {
                break;
            };
            let framed = h.framed_len() as u64;
            if pos + framed > file_len {
                break;
            }
            let mut bytes = vec![0u8; h.framed_len()];
            if seg.file.read_exact_at(&mut bytes, pos).is_err() {
                break;
            }
            let Decoded::Record(h) = record::decode(&bytes, RECORD_PAYLOAD_SIZE_BYTES_LIMIT) else {
                // Not (yet) a whole record: an append being written, or the end.
                break;
            };
            let expected = self.next_seq + pending.len() as u64;
            if h.seq != expected {
                return Err(CliError::new(
                    Code::Corrupt,
                    format!("{} holds seq {} where seq {expected} belongs: the log was rewritten (by a repair?) while following; start follow again", seg.path.display(), h.seq),
                ));
            }
            bytes.drain(..RECORD_HEADER_SIZE_BYTES);
            pending.push((h.seq, bytes));
            pos += framed;
            if h.is_batch_end() {
                self.next_seq += pending.len() as u64;
                out.append(&mut pending);
                seg.pos = pos;
                if out.len() - start_len >= POLL_RECORDS_MAX || self.next_seq >= stop_at {
                    break;
                }
            }
        }
        Ok(())
    }
}
