//! The storage seam: every byte the log reads or writes goes through [`Storage`].
//!
//! The log never touches `std::fs` directly. [`FsStorage`] is the real implementation
//! (files, `pwrite`, `fdatasync`, memmap2); a simulated, fault-injecting
//! implementation can stand in for it in tests without the log changing.
//!
//! The trait is deliberately small and synchronous. Its contract is POSIX-like:
//! - data written with [`StorageFile::write_at`] is visible to [`StorageFile::read_at`] and
//!   to every [`MappedRegion`] of the file at once, but survives a power loss only after
//!   [`StorageFile::sync_data`];
//! - a created, renamed or removed directory entry survives a power loss only after
//!   [`Storage::sync_dir`] on its parent directory.

mod fs;

pub use fs::FsStorage;

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// A file system as the log sees it. See the module docs for the durability contract.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Creates `path` and any missing parents. Succeeds if it already exists.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names (not paths) of the entries of directory `path`, in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Opens `path` for reading and writing; creates it when `create` is true and it is missing.
    fn open_file(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Removes the file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Atomically renames `from` to `to`, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory entries of `path` (creations, renames, removals) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Takes an exclusive lock named by `path`, held until the returned guard is dropped.
    ///
    /// Returns `Ok(None)` when another holder (another process, or another open in this
    /// process) has it.
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>>;
    /// Whether paths name real files of the operating system (so that other code, such
    /// as sled, may open them directly). False for simulated storage.
    fn is_real_file_system(&self) -> bool {
        false
    }
}

/// Held while a lock taken with [`Storage::try_lock`] is held; dropping it releases the lock.
pub trait LockGuard: Send + Sync + fmt::Debug {}

/// An open file. All offsets and lengths are in bytes.
pub trait StorageFile: Send + Sync + fmt::Debug {
    /// The current length of the file.
    fn len_bytes(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; fails with `UnexpectedEof` if the file is shorter.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data (and the metadata needed to read it back) durable.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends (with zeros) the file to `len_bytes`.
    fn set_len(&self, len_bytes: u64) -> io::Result<()>;
    /// Reserves disk space so that the file is at least `len_bytes` long and writes below
    /// that length cannot fail for lack of space. New bytes read as zeros. The log calls
    /// it ahead of the writer (from a background thread on a real file system, while the
    /// writer writes below the old length), so that `sync_data` rarely has to grow the
    /// file. [`FsStorage`] also writes the zeros back to the device before returning, so
    /// that they do not ride along with the next `sync_data`.
    fn allocate(&self, len_bytes: u64) -> io::Result<()>;
    /// Maps `[0, len_bytes)` of the file read-only. `len_bytes` may exceed the current file
    /// length: the caller promises never to read mapped bytes past the file's end.
    fn map(&self, len_bytes: u64) -> io::Result<Arc<dyn MappedRegion>>;
}

/// A read-only view of a file's bytes that reflects later writes to the file.
pub trait MappedRegion: Send + Sync + fmt::Debug {
    /// The mapped bytes. Only the part below the file's current length may be read.
    fn bytes(&self) -> &[u8];
}
