//! [`FsStorage`]: the real file system, through `std::fs`, `libc` and memmap2.

use super::{LockGuard, MappedRegion, Storage, StorageFile};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// The real file system. Cheap to create; holds no state.
///
/// # Examples
/// ```
/// use eventlog::storage::{FsStorage, Storage};
/// let dir = tempfile::tempdir()?;
/// let storage = FsStorage::new();
/// let file = storage.open_file(&dir.path().join("a"), true)?;
/// file.write_at(b"hello", 0)?;
/// file.sync_data()?;
/// assert_eq!(file.len_bytes()?, 5);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct FsStorage;

impl FsStorage {
    /// The real file system.
    pub fn new() -> Self {
        FsStorage
    }
}

#[derive(Debug)]
struct FsFile {
    file: File,
}

#[derive(Debug)]
struct FsLock {
    _file: File,
}

impl LockGuard for FsLock {}

#[derive(Debug)]
struct FsMap {
    map: memmap2::Mmap,
}

impl MappedRegion for FsMap {
    fn bytes(&self) -> &[u8] {
        &self.map
    }
}

impl Storage for FsStorage {
    fn is_real_file_system(&self) -> bool {
        true
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn open_file(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Arc::new(FsFile { file }))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // flock locks belong to the open file description, so a second open in the same
        // process conflicts too, unlike fcntl locks.
        match file.try_lock() {
            Ok(()) => Ok(Some(Box::new(FsLock { _file: file }))),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }
}

impl FsFile {
    /// Writes the dirty pages of `[offset, offset + len_bytes)` to the device and waits,
    /// without a cache flush or any metadata. Called on preallocated zeros: otherwise the
    /// next `fdatasync`, the one an appender waits for, would have to write megabytes of
    /// them along with its records.
    ///
    /// Goes through an open file description of its own. `sync_file_range` reports a
    /// write-back error of *any* page of the file, and marks it seen, per open file
    /// description: through the log's own descriptor it could take an error that belongs
    /// to the log's records, and the log's next `fdatasync` would then succeed without
    /// them (the "fsyncgate" problem). A second description leaves every error for the
    /// log's `fdatasync` to report; errors seen here only end the write-back early.
    #[cfg(target_os = "linux")]
    fn write_back(&self, offset: u64, len_bytes: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (
            libc::off64_t::try_from(offset),
            libc::off64_t::try_from(len_bytes),
        ) else {
            return Ok(());
        };
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let Ok(own) = OpenOptions::new().write(true).open(proc_path) else {
            // Without /proc the zeros go with the next fdatasync: slower, as safe.
            return Ok(());
        };
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: sync_file_range(2) on `own`, open for the whole call; it reads no
        // memory of ours.
        let rc = unsafe { libc::sync_file_range(own.as_raw_fd(), offset, len, flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Elsewhere the zeros simply go with the next `fdatasync`.
    #[cfg(not(target_os = "linux"))]
    fn write_back(&self, _offset: u64, _len_bytes: u64) -> io::Result<()> {
        Ok(())
    }
}

impl StorageFile for FsFile {
    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.file.set_len(len_bytes)
    }

    fn allocate(&self, len_bytes: u64) -> io::Result<()> {
        // Zeros are written rather than fallocate'd: on ext4 fallocate leaves "unwritten"
        // extents, and every fdatasync after writing into them must also commit the
        // extent conversion, which measured slower than writing the zeros up front (see
        // benches/log_vs_raw.rs). Written zeros make later syncs pure data overwrites, and
        // a full disk still shows up here, before any record is written.
        static ZEROS: [u8; 64 << 10] = [0u8; 64 << 10];
        let start = self.len_bytes()?;
        let mut at = start;
        while at < len_bytes {
            let n = (len_bytes - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        if at > start {
            self.write_back(start, at - start)?;
        }
        Ok(())
    }

    fn map(&self, len_bytes: u64) -> io::Result<Arc<dyn MappedRegion>> {
        let len = usize::try_from(len_bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mapping too large"))?;
        // SAFETY: the mapping is read-only. The log only reads bytes below the length it
        // has written and never truncates a file below a byte a reader may still read
        // (see the log's module docs), so no access faults.
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(&self.file)? };
        #[cfg(unix)]
        {
            let _ = map.advise(memmap2::Advice::Sequential);
        }
        Ok(Arc::new(FsMap { map }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_same_path_is_refused_until_first_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("LOCK");
        let storage = FsStorage::new();
        let first = storage
            .try_lock(&path)
            .expect("lock")
            .expect("first lock is free");
        assert!(storage.try_lock(&path).expect("lock").is_none());
        drop(first);
        assert!(storage.try_lock(&path).expect("lock").is_some());
    }

    #[test]
    fn map_sees_writes_made_after_mapping() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = FsStorage::new();
        let file = storage
            .open_file(&dir.path().join("f"), true)
            .expect("open");
        file.allocate(8192).expect("allocate");
        let map = file.map(1 << 20).expect("map");
        file.write_at(b"abc", 4096).expect("write");
        assert_eq!(&map.bytes()[4096..4099], b"abc");
    }
}
