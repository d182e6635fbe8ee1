//! [`SimDisk`]: an in-memory, deterministic, fault-injecting [`Storage`].
//!
//! # Model
//! - **Inodes and names.** Files are inodes holding bytes; directory entries map absolute
//!   paths to inodes (or to directories). A handle keeps its inode across renames and
//!   removals, as on POSIX.
//! - **Two images per file.** Every inode has a *current* image (what reads and maps see)
//!   and a *durable* image (what survives a power loss). `write_at`, `set_len` and
//!   `allocate` change the current image and append an unsynced operation to one global,
//!   ordered list. `sync_data` replays that file's unsynced operations onto its durable
//!   image and removes them from the list.
//! - **Two namespaces.** Creating, renaming and removing a file, and creating a directory,
//!   change the current namespace at once and append an unsynced directory operation.
//!   `sync_dir(d)` makes every unsynced directory operation that touches `d` durable (a
//!   rename touches both parents; syncing either makes it durable whole).
//! - **Crash.** [`SimDisk::crash`] rebuilds the disk from the durable images and
//!   namespace, then replays the unsynced operations that the chosen [`CrashFault`] lets
//!   survive, in order. Entries whose parent directory did not survive disappear; inodes
//!   no name reaches are freed. The result becomes both current and durable. Synced bytes
//!   never change: faults only decide the fate of unsynced operations.
//! - **Generations.** A crash is a reboot: the handle it was called on, every
//!   [`SimDisk`] clone of it, and every file, map and lock obtained before are dead. Their
//!   operations fail with [`io::ErrorKind::Other`] ("from before a crash"), so a `Log`
//!   left over from before the crash can do no harm when dropped. `crash` returns the
//!   handle of the rebooted disk.
//! - **Determinism.** Every random choice comes from one [`SimRng`] seeded by
//!   [`SimDisk::new`], drawn only while holding the disk's lock, and every collection is
//!   ordered. The same seed and the same sequence of operations give the same state and
//!   the same [`fault_log`](SimDisk::fault_log). (Operations from several threads at once
//!   are serialized in whatever order the threads arrive.)
//!
//! # Maps
//! A map is a private buffer of the mapped length, allocated once and never moved, filled
//! from the current image and then kept in step with it: every later write, truncation or
//! extension of the file is copied into every live map of the file (while holding the
//! disk's lock). Bytes past the file's end read as zeros. A bit flipped into a map (by
//! [`SimDisk::flip_bit_on_next_read`] or [`SimDisk::flip_bit_in_maps`]) changes only the
//! map, never the stored data; a later write of that byte overwrites the flip.
//!
//! Soundness: [`MappedRegion::bytes`] hands out a `&[u8]` of the whole buffer while the
//! disk may later copy new bytes into it through a raw pointer. This is the contract of a
//! real shared memory map too (see `FsStorage::map`): it is sound as long as no thread
//! reads a byte while it is being written. The log keeps that discipline (readers read
//! only below a segment's published end; the writer writes only at or past it; files are
//! truncated only before readers exist), and the test controls that flip bits in maps
//! must be called while no thread reads the affected maps. The buffer is never freed or
//! moved while a `&[u8]` from it can exist: the map owns it through an `Arc`, and the disk
//! keeps only `Weak` references.

use super::SimRng;
use crate::storage::{LockGuard, MappedRegion, Storage, StorageFile};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Weak};

/// Largest file (and map) the simulated disk holds: 1 GiB. Larger sizes fail with
/// `EFBIG`; the simulator keeps everything in memory, so tests should use small segments.
pub const SIM_FILE_SIZE_BYTES_MAX: u64 = 1 << 30;
/// The page size of [`CrashFault::ScatterPages`]: 4 KiB.
pub const SIM_PAGE_SIZE_BYTES: u64 = 4096;
/// How many entries the fault log keeps; older ones are dropped (and counted).
pub const SIM_FAULT_LOG_LEN_MAX: usize = 10_000;

/// What a crash does to the operations that were not yet synced. Synced data and synced
/// directory entries always survive, whatever the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CrashFault {
    /// Every unsynced operation survives: a process crash, where the OS had it all.
    KeepAll,
    /// No unsynced operation survives, neither data nor directory entries.
    DropUnsynced,
    /// A random prefix of the unsynced operations (data and directory operations of all
    /// files, in the order they were made) survives; the rest is lost.
    KeepRandomPrefix,
    /// Everything survives except that the last unsynced write is torn: only a random
    /// strict prefix of its bytes (possibly none) lands.
    TearLastWrite,
    /// Everything survives, but in every file with unsynced writes, the bytes those writes
    /// covered read as zeros from a random point on (data blocks never written while the
    /// file size was).
    ZeroFillTail,
    /// Unsynced writes of different files land independently: for each file (and each
    /// directory's entries) all, none, or a random prefix of its unsynced operations
    /// survive, the write at a prefix's edge possibly torn.
    ReorderAcrossFiles,
    /// Every data write survives, but every creation, rename and removal whose directory
    /// was not synced is undone.
    ForgetUnsyncedDirOps,
    /// Unsynced writes land page by page ([`SIM_PAGE_SIZE_BYTES`]) in no particular
    /// order: each page they touched independently has its new or its old contents. A
    /// write spanning pages can thus leave a hole followed by new bytes.
    ScatterPages,
}

impl CrashFault {
    /// Every fault, the set [`SimDisk::crash_random`] picks from.
    pub const ALL: [CrashFault; 8] = [
        CrashFault::KeepAll,
        CrashFault::DropUnsynced,
        CrashFault::KeepRandomPrefix,
        CrashFault::TearLastWrite,
        CrashFault::ZeroFillTail,
        CrashFault::ReorderAcrossFiles,
        CrashFault::ForgetUnsyncedDirOps,
        CrashFault::ScatterPages,
    ];
}

/// An in-memory [`Storage`] that tracks what was synced, can crash with a chosen fault,
/// and injects I/O faults while running. See the module docs for the model.
///
/// # Examples
/// ```
/// use eventlog::storage::Storage;
/// use eventlog::testing::{CrashFault, SimDisk};
/// use std::path::Path;
///
/// let disk = SimDisk::new(1);
/// disk.create_dir_all(Path::new("/d"))?;
/// disk.sync_dir(Path::new("/"))?;
/// let file = disk.open_file(Path::new("/d/f"), true)?;
/// disk.sync_dir(Path::new("/d"))?;
/// file.write_at(b"synced", 0)?;
/// file.sync_data()?;
/// file.write_at(b" and not", 6)?;
/// let disk = disk.crash(CrashFault::DropUnsynced);
/// assert!(file.len_bytes().is_err(), "handles from before the crash are dead");
/// assert_eq!(disk.files()[Path::new("/d/f")], b"synced");
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct SimDisk {
    state: Arc<Mutex<State>>,
    generation: u64,
}

impl fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("SimDisk");
        d.field("generation", &self.generation);
        // try_lock: Debug must never deadlock, e.g. when printed from inside a callback.
        match self.state.try_lock() {
            Some(st) => d
                .field("seed", &st.seed)
                .field("current_generation", &st.generation)
                .field(
                    "files",
                    &st.ns.values().filter(|n| **n != Node::Dir).count(),
                )
                .field("unsynced_ops", &st.pending.len())
                .field("halted", &st.halted),
            None => d.field("state", &"<locked>"),
        };
        d.finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Dir,
    File(u64),
}

struct Inode {
    /// What reads and maps see.
    data: Vec<u8>,
    /// What survives a crash (plus whichever unsynced operations the fault keeps).
    durable: Vec<u8>,
    /// Live maps of this file, kept in step with `data`.
    maps: Vec<Weak<MapBuf>>,
}

impl Inode {
    fn new(data: Vec<u8>) -> Self {
        Inode {
            durable: data.clone(),
            data,
            maps: Vec::new(),
        }
    }

    fn live_maps(&mut self) -> Vec<Arc<MapBuf>> {
        self.maps.retain(|m| m.strong_count() > 0);
        self.maps.iter().filter_map(Weak::upgrade).collect()
    }
}

#[derive(Debug, Clone)]
enum DataOp {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
    Allocate(u64),
}

#[derive(Debug, Clone)]
enum DirOp {
    Mkdir(PathBuf),
    Create(PathBuf, u64),
    Remove(PathBuf),
    Rename {
        from: PathBuf,
        to: PathBuf,
        ino: u64,
    },
}

impl DirOp {
    /// Whether syncing directory `dir` makes this operation durable.
    fn touches(&self, dir: &Path) -> bool {
        match self {
            DirOp::Mkdir(p) | DirOp::Create(p, _) | DirOp::Remove(p) => p.parent() == Some(dir),
            DirOp::Rename { from, to, .. } => {
                from.parent() == Some(dir) || to.parent() == Some(dir)
            }
        }
    }

    /// The directory whose entries this operation is grouped with for
    /// [`CrashFault::ReorderAcrossFiles`] (a rename goes with its destination).
    fn group_dir(&self) -> PathBuf {
        let p = match self {
            DirOp::Mkdir(p) | DirOp::Create(p, _) | DirOp::Remove(p) => p,
            DirOp::Rename { to, .. } => to,
        };
        p.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    fn apply(&self, ns: &mut BTreeMap<PathBuf, Node>) {
        match self {
            DirOp::Mkdir(p) => {
                ns.insert(p.clone(), Node::Dir);
            }
            DirOp::Create(p, ino) => {
                ns.insert(p.clone(), Node::File(*ino));
            }
            DirOp::Remove(p) => {
                ns.remove(p);
            }
            DirOp::Rename { from, to, ino } => {
                if ns.get(from) == Some(&Node::File(*ino)) {
                    ns.remove(from);
                }
                ns.insert(to.clone(), Node::File(*ino));
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            DirOp::Mkdir(p) => format!("mkdir {}", p.display()),
            DirOp::Create(p, _) => format!("create {}", p.display()),
            DirOp::Remove(p) => format!("remove {}", p.display()),
            DirOp::Rename { from, to, .. } => {
                format!("rename {} -> {}", from.display(), to.display())
            }
        }
    }
}

/// An operation made since the last sync that covers it, in global order.
#[derive(Debug, Clone)]
enum Pending {
    Data {
        ino: u64,
        /// The file's name when the operation was made, for messages.
        path: PathBuf,
        op: DataOp,
        /// Set by a failed fsync that dropped the dirty data: never becomes durable.
        lost: bool,
    },
    Dir(DirOp),
}

/// What a crash keeps of one unsynced operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    All,
    Nothing,
    /// The first this-many bytes of a write.
    Prefix(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FsyncFailure {
    KeepDirty,
    DropDirty,
}

#[derive(Debug, Default, Clone, Copy)]
struct Injected {
    fsync_fail_next: Option<FsyncFailure>,
    dir_sync_fail_next: bool,
    enospc: bool,
    /// Reads (returning file bytes) to let pass before one returns a flipped bit.
    flip_read_after: Option<u64>,
    short_write_next: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    file_syncs: u64,
    dir_syncs: u64,
    writes: u64,
    mutating_ops: u64,
    crashes: u64,
}

struct State {
    seed: u64,
    rng: SimRng,
    generation: u64,
    /// Mutating operations that may still run before the machine halts.
    halt_after: Option<u64>,
    halted: bool,
    next_ino: u64,
    ns: BTreeMap<PathBuf, Node>,
    durable_ns: BTreeMap<PathBuf, Node>,
    inodes: BTreeMap<u64, Inode>,
    pending: Vec<Pending>,
    locks: BTreeMap<PathBuf, u64>,
    next_lock_id: u64,
    injected: Injected,
    counters: Counters,
    fault_log: Vec<String>,
    fault_log_dropped: u64,
    /// Files whose `sync_data` failed by injection, in order (since this disk's crash).
    failed_fsyncs: Vec<PathBuf>,
}

fn err_dead() -> io::Error {
    io::Error::other("simulated disk: this handle is from before a crash")
}

fn err_halted() -> io::Error {
    io::Error::other("simulated disk: halted (the process or machine is going down)")
}

fn err_not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("simulated disk: {} does not exist", path.display()),
    )
}

fn err_too_big(what: &str, bytes: u64) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(libc::EFBIG).kind(),
        format!(
            "simulated disk: {what} of {bytes} bytes exceeds the {SIM_FILE_SIZE_BYTES_MAX}-byte limit"
        ),
    )
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// Checks that `path` is absolute and has no `..`; drops `.` and trailing slashes.
fn normalize(path: &Path) -> io::Result<PathBuf> {
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("simulated disk: path {} {why}", path.display()),
        )
    };
    if !path.is_absolute() {
        return Err(invalid("is not absolute"));
    }
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => out.push("/"),
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(invalid("contains `..`")),
        }
    }
    Ok(out)
}

fn is_root(path: &Path) -> bool {
    path.parent().is_none()
}

/// The size an image reaches when `bytes` are written at `offset`, checked.
fn end_of(offset: u64, len: usize) -> io::Result<u64> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= SIM_FILE_SIZE_BYTES_MAX => Ok(end),
        _ => Err(err_too_big(
            "a write ending",
            offset.saturating_add(len as u64),
        )),
    }
}

fn write_into(image: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    if bytes.is_empty() {
        return; // a zero-length pwrite does not extend the file
    }
    let start = offset as usize;
    let end = start + bytes.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[start..end].copy_from_slice(bytes);
}

fn apply_data_op(image: &mut Vec<u8>, op: &DataOp, keep: Keep) {
    match (op, keep) {
        (_, Keep::Nothing) => {}
        (DataOp::Write { offset, bytes }, Keep::Prefix(n)) => {
            write_into(image, *offset, &bytes[..n.min(bytes.len())]);
        }
        (DataOp::Write { offset, bytes }, _) => write_into(image, *offset, bytes),
        (DataOp::SetLen(len), _) => image.resize(*len as usize, 0),
        (DataOp::Allocate(len), _) => {
            if (image.len() as u64) < *len {
                image.resize(*len as usize, 0);
            }
        }
    }
}

/// Removes entries whose parent directory is missing (a directory creation that did not
/// survive takes its whole subtree with it).
fn prune(ns: &mut BTreeMap<PathBuf, Node>) -> Vec<PathBuf> {
    // Paths order component by component, so a parent comes before its children.
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut orphans = Vec::new();
    for (path, node) in ns.iter() {
        let parent_ok = path
            .parent()
            .is_some_and(|p| is_root(p) || dirs.contains(p));
        if !parent_ok {
            orphans.push(path.clone());
        } else if *node == Node::Dir {
            dirs.insert(path.clone());
        }
    }
    for p in &orphans {
        ns.remove(p);
    }
    orphans
}

impl State {
    fn check(&self, generation: u64) -> io::Result<()> {
        if generation != self.generation {
            Err(err_dead())
        } else if self.halted {
            Err(err_halted())
        } else {
            Ok(())
        }
    }

    /// Counts one mutating operation, or halts if its time has come.
    fn tick(&mut self) -> io::Result<()> {
        match self.halt_after {
            Some(0) => {
                self.halt_after = None;
                self.halted = true;
                let n = self.counters.mutating_ops;
                self.note(format!(
                    "halted before mutating operation #{n}: everything fails until a crash"
                ));
                Err(err_halted())
            }
            left => {
                self.halt_after = left.map(|n| n - 1);
                self.counters.mutating_ops += 1;
                Ok(())
            }
        }
    }

    /// Whether this read (one returning file bytes) is the one to flip a bit in.
    fn take_read_flip(&mut self) -> bool {
        match self.injected.flip_read_after {
            Some(0) => {
                self.injected.flip_read_after = None;
                true
            }
            Some(n) => {
                self.injected.flip_read_after = Some(n - 1);
                false
            }
            None => false,
        }
    }

    fn note(&mut self, message: String) {
        if self.fault_log.len() >= SIM_FAULT_LOG_LEN_MAX {
            self.fault_log.remove(0);
            self.fault_log_dropped += 1;
        }
        let at = self.counters.mutating_ops;
        self.fault_log
            .push(format!("[gen {} op {at}] {message}", self.generation));
    }

    fn node(&self, path: &Path) -> Option<Node> {
        if is_root(path) {
            Some(Node::Dir)
        } else {
            self.ns.get(path).copied()
        }
    }

    fn require_dir(&self, path: &Path) -> io::Result<()> {
        match self.node(path) {
            Some(Node::Dir) => Ok(()),
            Some(Node::File(_)) => Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("simulated disk: {} is a file", path.display()),
            )),
            None => Err(err_not_found(path)),
        }
    }

    fn require_parent_dir(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(parent) => self.require_dir(parent),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "simulated disk: the root is a directory",
            )),
        }
    }

    fn inode(&mut self, ino: u64) -> &mut Inode {
        self.inodes
            .get_mut(&ino)
            .expect("a live handle's inode exists until the next crash")
    }

    fn write_data(&mut self, ino: u64, path: &Path, offset: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let inode = self.inode(ino);
        write_into(&mut inode.data, offset, bytes);
        for map in inode.live_maps() {
            map.store(offset, bytes);
        }
        self.pending.push(Pending::Data {
            ino,
            path: path.to_path_buf(),
            op: DataOp::Write {
                offset,
                bytes: bytes.to_vec(),
            },
            lost: false,
        });
    }

    fn set_len_data(&mut self, ino: u64, path: &Path, len: u64) {
        let inode = self.inode(ino);
        let old = inode.data.len() as u64;
        if old == len {
            return;
        }
        inode.data.resize(len as usize, 0);
        if len < old {
            for map in inode.live_maps() {
                map.zero(len, old);
            }
        }
        self.pending.push(Pending::Data {
            ino,
            path: path.to_path_buf(),
            op: DataOp::SetLen(len),
            lost: false,
        });
    }

    fn sync_file(&mut self, ino: u64, path: &Path) -> io::Result<()> {
        self.counters.file_syncs += 1;
        if let Some(mode) = self.injected.fsync_fail_next.take() {
            let mut dirty = 0;
            for p in &mut self.pending {
                if let Pending::Data { ino: i, lost, .. } = p {
                    if *i == ino && !*lost {
                        dirty += 1;
                        *lost |= mode == FsyncFailure::DropDirty;
                    }
                }
            }
            let fate = match mode {
                FsyncFailure::KeepDirty => "stay dirty (a crash may keep or lose them)",
                FsyncFailure::DropDirty => {
                    "are lost: still visible to reads, but they never reach the disk"
                }
            };
            self.failed_fsyncs.push(path.to_path_buf());
            let name = self.name_of(ino, path);
            self.note(format!(
                "injected: fdatasync of {name} failed with EIO; its {dirty} unsynced operations {fate}"
            ));
            return Err(eio());
        }
        let mut durable = std::mem::take(&mut self.inode(ino).durable);
        // `retain` visits in order, so operations are replayed in the order they were made.
        self.pending.retain(|p| match p {
            Pending::Data {
                ino: i, op, lost, ..
            } if *i == ino => {
                if !*lost {
                    apply_data_op(&mut durable, op, Keep::All);
                }
                false
            }
            _ => true,
        });
        self.inode(ino).durable = durable;
        Ok(())
    }

    fn sync_dir(&mut self, dir: &Path) -> io::Result<()> {
        self.counters.dir_syncs += 1;
        if std::mem::take(&mut self.injected.dir_sync_fail_next) {
            self.note(format!(
                "injected: fsync of directory {} failed with EIO; its entries stay unsynced",
                dir.display()
            ));
            return Err(eio());
        }
        let mut durable_ns = std::mem::take(&mut self.durable_ns);
        self.pending.retain(|p| match p {
            Pending::Dir(op) if op.touches(dir) => {
                op.apply(&mut durable_ns);
                false
            }
            _ => true,
        });
        self.durable_ns = durable_ns;
        Ok(())
    }

    fn add_dir_op(&mut self, op: DirOp) {
        op.apply(&mut self.ns);
        self.pending.push(Pending::Dir(op));
    }

    fn create_file(&mut self, path: &Path) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::new(Vec::new()));
        self.add_dir_op(DirOp::Create(path.to_path_buf(), ino));
        ino
    }

    /// Starts a new generation: old handles die, locks are released, maps stop following
    /// their files, a halt is lifted.
    fn reboot(&mut self) {
        for inode in self.inodes.values_mut() {
            inode.maps.clear();
        }
        self.locks.clear();
        self.generation += 1;
        self.halt_after = None;
        self.halted = false;
    }

    /// The current name of inode `ino`, for messages (`fallback` if it has none).
    fn name_of(&self, ino: u64, fallback: &Path) -> String {
        self.ns
            .iter()
            .find(|(_, n)| **n == Node::File(ino))
            .map_or(fallback, |(p, _)| p.as_path())
            .display()
            .to_string()
    }

    /// Decides the fate of every unsynced operation, rebuilds the disk, and reboots it.
    fn crash(&mut self, fault: CrashFault) {
        let pending = std::mem::take(&mut self.pending);
        let total = pending.len();
        let live: Vec<Pending> = pending
            .into_iter()
            .filter(|p| !matches!(p, Pending::Data { lost: true, .. }))
            .collect();
        let lost = total - live.len();
        let n = live.len();
        let mut keep = vec![Keep::All; n];
        let mut details: Vec<String> = Vec::new();
        let write_len = |p: &Pending| match p {
            Pending::Data {
                op: DataOp::Write { bytes, .. },
                ..
            } => bytes.len(),
            _ => 0,
        };
        match fault {
            CrashFault::KeepAll | CrashFault::ZeroFillTail | CrashFault::ScatterPages => {}
            CrashFault::DropUnsynced => keep.fill(Keep::Nothing),
            CrashFault::KeepRandomPrefix => {
                let k = self.rng.below(n as u64 + 1) as usize;
                keep[k..].fill(Keep::Nothing);
                details.push(format!("the first {k} survive"));
            }
            CrashFault::TearLastWrite => {
                if let Some(i) = live.iter().rposition(|p| write_len(p) > 0) {
                    let len = write_len(&live[i]);
                    let cut = self.rng.below(len as u64) as usize;
                    keep[i] = Keep::Prefix(cut);
                    if let Pending::Data {
                        ino,
                        path,
                        op: DataOp::Write { offset, .. },
                        ..
                    } = &live[i]
                    {
                        details.push(format!(
                            "the {len}-byte write at {offset} of {} landed only {cut} bytes",
                            self.name_of(*ino, path)
                        ));
                    }
                }
            }
            CrashFault::ReorderAcrossFiles => {
                #[derive(PartialEq, Eq, PartialOrd, Ord)]
                enum Group {
                    File(u64),
                    Dir(PathBuf),
                }
                let mut groups: Vec<(Group, String, Vec<usize>)> = Vec::new();
                for (i, p) in live.iter().enumerate() {
                    let (g, name) = match p {
                        Pending::Data { ino, path, .. } => {
                            (Group::File(*ino), self.name_of(*ino, path))
                        }
                        Pending::Dir(op) => {
                            let d = op.group_dir();
                            let name = format!("entries of {}", d.display());
                            (Group::Dir(d), name)
                        }
                    };
                    match groups.iter_mut().find(|(h, ..)| *h == g) {
                        Some((_, _, members)) => members.push(i),
                        None => groups.push((g, name, vec![i])),
                    }
                }
                for (_, name, members) in &groups {
                    let m = members.len();
                    match self.rng.below(3) {
                        0 => details.push(format!("{name}: all {m} survive")),
                        1 => {
                            for &i in members {
                                keep[i] = Keep::Nothing;
                            }
                            details.push(format!("{name}: none of {m} survive"));
                        }
                        _ => {
                            let k = self.rng.below(m as u64 + 1) as usize;
                            for &i in &members[k..] {
                                keep[i] = Keep::Nothing;
                            }
                            let mut torn = String::new();
                            if let Some(&edge) = members.get(k) {
                                let len = write_len(&live[edge]);
                                if len > 0 && self.rng.chance(1, 2) {
                                    let cut = self.rng.below(len as u64) as usize;
                                    keep[edge] = Keep::Prefix(cut);
                                    torn = format!(", then {cut} of the next write's {len} bytes");
                                }
                            }
                            details.push(format!("{name}: the first {k} of {m} survive{torn}"));
                        }
                    }
                }
            }
            CrashFault::ForgetUnsyncedDirOps => {
                for (p, k) in live.iter().zip(keep.iter_mut()) {
                    if let Pending::Dir(op) = p {
                        *k = Keep::Nothing;
                        details.push(format!("forgot {}", op.describe()));
                    }
                }
            }
        }

        // The namespace: durable entries, then the surviving directory operations.
        let mut ns = self.durable_ns.clone();
        for (p, k) in live.iter().zip(&keep) {
            if let (Pending::Dir(op), Keep::All) = (p, k) {
                op.apply(&mut ns);
            }
        }
        for orphan in prune(&mut ns) {
            details.push(format!("{} vanished with its directory", orphan.display()));
        }

        // The data: durable images, then the surviving data operations.
        let reachable: BTreeSet<u64> = ns
            .values()
            .filter_map(|n| match n {
                Node::File(ino) => Some(*ino),
                Node::Dir => None,
            })
            .collect();
        let mut images: BTreeMap<u64, Vec<u8>> = reachable
            .iter()
            .map(|ino| (*ino, self.inodes[ino].durable.clone()))
            .collect();
        // Byte ranges each file's surviving unsynced writes covered.
        let mut written: BTreeMap<u64, (PathBuf, Vec<(u64, u64)>)> = BTreeMap::new();
        for (p, &k) in live.iter().zip(&keep) {
            if let Pending::Data { ino, path, op, .. } = p {
                let Some(image) = images.get_mut(ino) else {
                    continue;
                };
                apply_data_op(image, op, k);
                if let DataOp::Write { offset, bytes } = op {
                    let len = match k {
                        Keep::All => bytes.len(),
                        Keep::Prefix(c) => c,
                        Keep::Nothing => 0,
                    } as u64;
                    if len > 0 {
                        written
                            .entry(*ino)
                            .or_insert_with(|| {
                                (PathBuf::from(self.name_of(*ino, path)), Vec::new())
                            })
                            .1
                            .push((*offset, *offset + len));
                    }
                }
            }
        }
        match fault {
            CrashFault::ZeroFillTail => {
                for (ino, (path, ranges)) in &written {
                    let image = images.get_mut(ino).expect("written files are reachable");
                    let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
                    let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
                    let cut = lo + self.rng.below(hi - lo);
                    let mut zeroed = 0;
                    for &(start, end) in ranges {
                        let start = start.max(cut) as usize;
                        let end = (end as usize).min(image.len());
                        if start < end {
                            image[start..end].fill(0);
                            zeroed += end - start;
                        }
                    }
                    details.push(format!(
                        "{}: unsynced bytes from {cut} read as zeros ({zeroed} bytes)",
                        path.display()
                    ));
                }
            }
            CrashFault::ScatterPages => {
                for (ino, (path, ranges)) in &written {
                    let base = &self.inodes[ino].durable;
                    let image = images.get_mut(ino).expect("written files are reachable");
                    let pages: BTreeSet<u64> = ranges
                        .iter()
                        .flat_map(|&(s, e)| {
                            s / SIM_PAGE_SIZE_BYTES..e.div_ceil(SIM_PAGE_SIZE_BYTES)
                        })
                        .collect();
                    let mut reverted = Vec::new();
                    for page in pages {
                        if self.rng.chance(1, 2) {
                            let start = (page * SIM_PAGE_SIZE_BYTES) as usize;
                            let end = (start + SIM_PAGE_SIZE_BYTES as usize).min(image.len());
                            for (i, b) in image.iter_mut().enumerate().take(end).skip(start) {
                                *b = base.get(i).copied().unwrap_or(0);
                            }
                            reverted.push(page);
                        }
                    }
                    details.push(format!(
                        "{}: pages {reverted:?} kept their old contents",
                        path.display()
                    ));
                }
            }
            _ => {}
        }

        self.inodes = images
            .into_iter()
            .map(|(ino, image)| (ino, Inode::new(image)))
            .collect();
        self.durable_ns = ns.clone();
        self.ns = ns;
        self.reboot();
        self.counters.crashes += 1;
        let lost_note = if lost > 0 {
            format!(", {lost} more lost by a failed fsync")
        } else {
            String::new()
        };
        let detail = if details.is_empty() {
            String::new()
        } else {
            format!(": {}", details.join("; "))
        };
        self.note(format!(
            "crash #{} with {fault:?}: {n} unsynced operations{lost_note}{detail}",
            self.counters.crashes
        ));
    }
}

/// A map's buffer: allocated once at the mapped length, never moved or resized, freed
/// when the last [`SimMap`] holding it is dropped. The disk writes into it through
/// `ptr` (under its lock) to keep it in step with the file; maps read it as `&[u8]`.
struct MapBuf {
    /// Start of a `Box<[u8]>` of `len` bytes, owned by this struct.
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain bytes owned by `MapBuf`. Writes go through `ptr` only while
// the disk's lock is held, so writers never race each other; readers race writers only if
// they read bytes being written, which the map contract (module docs, "Maps") excludes,
// as for a real shared memory map.
unsafe impl Send for MapBuf {}
// SAFETY: as for `Send`.
unsafe impl Sync for MapBuf {}

impl MapBuf {
    fn new(contents: &[u8], len: usize) -> Self {
        let mut bytes = vec![0u8; len].into_boxed_slice();
        let n = contents.len().min(len);
        bytes[..n].copy_from_slice(&contents[..n]);
        let raw: *mut [u8] = Box::into_raw(bytes);
        MapBuf {
            ptr: NonNull::new(raw.cast::<u8>()).expect("Box::into_raw is never null"),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialized bytes that live as long as `self`
        // (freed only in `Drop`). Concurrent writes touch only bytes no reader reads (see
        // the `Send` impl).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Copies `src` to `offset..`, clipped to the buffer. Caller holds the disk's lock.
    fn store(&self, offset: u64, src: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= self.len {
            return;
        }
        let n = src.len().min(self.len - start);
        // SAFETY: `start + n <= len`, so the destination is inside the buffer; `src` is a
        // different allocation (a caller's buffer), so the ranges do not overlap. No `&mut`
        // to the buffer exists anywhere; see the `Send` impl for readers.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(start), n) }
    }

    /// Zeros `[from, to)`, clipped to the buffer. Caller holds the disk's lock.
    fn zero(&self, from: u64, to: u64) {
        let start = usize::try_from(from).unwrap_or(usize::MAX).min(self.len);
        let end = usize::try_from(to).unwrap_or(usize::MAX).min(self.len);
        if start < end {
            // SAFETY: `start < end <= len`: inside the buffer. As in `store`.
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(start), 0, end - start) }
        }
    }

    /// Flips bit `bit` (0..8) of byte `offset` (< len). Caller holds the disk's lock.
    fn flip(&self, offset: usize, bit: u32) {
        assert!(
            offset < self.len && bit < 8,
            "flip at {offset}.{bit} of {}",
            self.len
        );
        // SAFETY: `offset < len`: inside the buffer. As in `store`.
        unsafe {
            let p = self.ptr.as_ptr().add(offset);
            p.write(p.read() ^ (1u8 << bit));
        }
    }
}

impl Drop for MapBuf {
    fn drop(&mut self) {
        let raw = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
        // SAFETY: `ptr`/`len` came from `Box::into_raw` of a `Box<[u8]>` of this length in
        // `new`, and are freed only here, once.
        drop(unsafe { Box::from_raw(raw) });
    }
}

/// A [`MappedRegion`] of a [`SimDisk`] file.
struct SimMap {
    buf: Arc<MapBuf>,
}

impl fmt::Debug for SimMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimMap")
            .field("len", &self.buf.len)
            .finish()
    }
}

impl MappedRegion for SimMap {
    fn bytes(&self) -> &[u8] {
        self.buf.bytes()
    }
}

/// A [`StorageFile`] of a [`SimDisk`]; dead after a crash.
struct SimFile {
    state: Arc<Mutex<State>>,
    generation: u64,
    ino: u64,
    /// The name it was opened by, for messages.
    path: PathBuf,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFile")
            .field("path", &self.path)
            .field("ino", &self.ino)
            .field("generation", &self.generation)
            .finish()
    }
}

/// A lock taken on a [`SimDisk`]; released when dropped, unless a crash released it first.
struct SimLock {
    state: Arc<Mutex<State>>,
    generation: u64,
    path: PathBuf,
    id: u64,
}

impl fmt::Debug for SimLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimLock")
            .field("path", &self.path)
            .field("generation", &self.generation)
            .finish()
    }
}

impl LockGuard for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut st = self.state.lock();
        // A crash released every lock; a guard from before it must not free a newer one.
        if st.generation == self.generation && st.locks.get(&self.path) == Some(&self.id) {
            st.locks.remove(&self.path);
        }
    }
}

impl SimDisk {
    /// An empty disk (only the root directory `/`) whose every random choice follows
    /// from `seed`. Returned in an `Arc`, the form the log takes a [`Storage`] in.
    pub fn new(seed: u64) -> Arc<SimDisk> {
        let state = State {
            seed,
            rng: SimRng::new(seed),
            generation: 0,
            halt_after: None,
            halted: false,
            next_ino: 1,
            ns: BTreeMap::new(),
            durable_ns: BTreeMap::new(),
            inodes: BTreeMap::new(),
            pending: Vec::new(),
            locks: BTreeMap::new(),
            next_lock_id: 1,
            injected: Injected::default(),
            counters: Counters::default(),
            failed_fsyncs: Vec::new(),
            fault_log: Vec::new(),
            fault_log_dropped: 0,
        };
        Arc::new(SimDisk {
            state: Arc::new(Mutex::new(state)),
            generation: 0,
        })
    }

    /// The seed the disk was created with.
    pub fn seed(&self) -> u64 {
        self.state.lock().seed
    }

    /// Cuts the power and reboots: keeps what was synced, applies `fault` to what was not
    /// (see [`CrashFault`]), releases every lock, and makes every handle from before the
    /// crash dead, this one included. Returns the handle of the rebooted disk.
    ///
    /// Works on a dead handle too (it crashes the disk as it is now). Injected faults set
    /// with the `fail_*`, `flip_*` and `short_*` methods stay set; a
    /// [`halt_after_ops`](Self::halt_after_ops) is lifted or cancelled.
    pub fn crash(&self, fault: CrashFault) -> Arc<SimDisk> {
        let mut st = self.state.lock();
        st.crash(fault);
        Arc::new(SimDisk {
            state: Arc::clone(&self.state),
            generation: st.generation,
        })
    }

    /// The process dies but the machine does not: like [`crash`](Self::crash) (every
    /// handle, map and lock from before is dead; a halt is lifted) but nothing is lost and
    /// nothing becomes durable. Everything written stays visible, and what was unsynced
    /// stays unsynced: a later `crash` still applies its fault to it.
    pub fn crash_process(&self) -> Arc<SimDisk> {
        let mut st = self.state.lock();
        st.reboot();
        let unsynced = st.pending.len();
        st.note(format!(
            "process crash: {unsynced} unsynced operations stay unsynced"
        ));
        Arc::new(SimDisk {
            state: Arc::clone(&self.state),
            generation: st.generation,
        })
    }

    /// Like [`crash`](Self::crash) with a fault drawn from [`CrashFault::ALL`] by the
    /// disk's generator. Returns the rebooted disk and the fault.
    pub fn crash_random(&self) -> (Arc<SimDisk>, CrashFault) {
        let fault = *self.state.lock().rng.pick(&CrashFault::ALL);
        (self.crash(fault), fault)
    }

    /// Draws one of `faults` with the disk's generator (for tests that exclude some).
    ///
    /// # Panics
    /// If `faults` is empty.
    pub fn pick_fault(&self, faults: &[CrashFault]) -> CrashFault {
        *self.state.lock().rng.pick(faults)
    }

    /// Whether this handle is of the current boot (no crash happened since it was made).
    pub fn is_current(&self) -> bool {
        self.state.lock().generation == self.generation
    }

    /// Lets `ops` more mutating operations (writes, truncations, allocations, syncs,
    /// creations, renames, removals) run, then halts: that operation and every later one,
    /// read or write, fails with [`io::ErrorKind::Other`] until [`crash`](Self::crash)
    /// (the power went out at that point) or [`crash_process`](Self::crash_process) (the
    /// process died there). The way to crash in the middle of what the log is doing.
    /// `halt_after_ops(0)` fails the very next mutating operation.
    pub fn halt_after_ops(&self, ops: u64) {
        self.state.lock().halt_after = Some(ops);
    }

    /// Cancels a [`halt_after_ops`](Self::halt_after_ops) that has not happened yet.
    pub fn cancel_halt(&self) {
        self.state.lock().halt_after = None;
    }

    /// Whether a [`halt_after_ops`](Self::halt_after_ops) has halted the disk (and no crash
    /// has happened since).
    pub fn is_halted(&self) -> bool {
        self.state.lock().halted
    }

    /// The next `sync_data` fails with EIO. The file's unsynced writes stay dirty: a crash
    /// may keep or lose them, and a later successful sync makes them durable.
    pub fn fail_next_fsync(&self) {
        self.state.lock().injected.fsync_fail_next = Some(FsyncFailure::KeepDirty);
    }

    /// The next `sync_data` fails with EIO and the file's unsynced writes are lost the way
    /// Linux loses them after a writeback error: reads still see them (the pages stay
    /// cached, marked clean), but no later sync makes them durable, and a crash drops them.
    pub fn fail_next_fsync_dropping_data(&self) {
        self.state.lock().injected.fsync_fail_next = Some(FsyncFailure::DropDirty);
    }

    /// The next `sync_dir` fails with EIO; the directory's entries stay unsynced.
    pub fn fail_next_dir_sync(&self) {
        self.state.lock().injected.dir_sync_fail_next = true;
    }

    /// While `full` is true the disk is full: `allocate` past a file's length fails with
    /// ENOSPC, and a `write_at` past it lands only its part inside the current length,
    /// then fails with ENOSPC. Writes inside a file (preallocated space) still work.
    pub fn fail_writes_with_enospc(&self, full: bool) {
        self.state.lock().injected.enospc = full;
    }

    /// The next `read_at`, or `map` of a non-empty file, returns one flipped bit (at a
    /// random position among the file bytes it returns). A map keeps its flip; the stored
    /// data is unchanged.
    pub fn flip_bit_on_next_read(&self) {
        self.flip_bit_on_read_after(0);
    }

    /// Like [`flip_bit_on_next_read`](Self::flip_bit_on_next_read), but `skip` reads
    /// (`read_at`s and `map`s returning file bytes) pass intact first.
    pub fn flip_bit_on_read_after(&self, skip: u64) {
        self.state.lock().injected.flip_read_after = Some(skip);
    }

    /// The next non-empty `write_at` lands only a random strict prefix of its bytes
    /// (possibly none), then fails with an error.
    pub fn short_write_next(&self) {
        self.state.lock().injected.short_write_next = true;
    }

    /// Flips one random bit, below the file's length, in every live map of the file at
    /// `path` (a page-cache corruption as mapped readers see it); the stored data is
    /// unchanged. Returns the byte offset, or `None` if the file is missing, empty, or not
    /// mapped. Call it only while no thread reads those maps (see the module docs).
    pub fn flip_bit_in_maps(&self, path: &Path) -> Option<u64> {
        let path = normalize(path).ok()?;
        let mut st = self.state.lock();
        let Some(Node::File(ino)) = st.node(&path) else {
            return None;
        };
        let file_len = st.inodes[&ino].data.len();
        let maps = st.inode(ino).live_maps();
        let mapped = maps.iter().map(|m| m.len.min(file_len)).max().unwrap_or(0);
        if mapped == 0 {
            return None;
        }
        let bit = st.rng.below(mapped as u64 * 8);
        let (offset, bit_in_byte) = ((bit / 8) as usize, (bit % 8) as u32);
        for map in &maps {
            if offset < map.len {
                map.flip(offset, bit_in_byte);
            }
        }
        st.note(format!(
            "injected: bit {bit_in_byte} of byte {offset} flipped in {} maps of {}",
            maps.len(),
            path.display()
        ));
        Some(offset as u64)
    }

    /// Clears every injected fault: failing syncs, a full disk, pending flips and short
    /// writes, and a halt that has not happened yet.
    pub fn clear_injected_faults(&self) {
        let mut st = self.state.lock();
        st.injected = Injected::default();
        st.halt_after = None;
    }

    /// Makes every unsynced directory operation durable, as a journaling file system's
    /// next commit would. Not a [`Storage`] operation: a test control.
    pub fn sync_all_dirs(&self) {
        let mut st = self.state.lock();
        let mut durable_ns = std::mem::take(&mut st.durable_ns);
        st.pending.retain(|p| match p {
            Pending::Dir(op) => {
                op.apply(&mut durable_ns);
                false
            }
            Pending::Data { .. } => true,
        });
        st.durable_ns = durable_ns;
    }

    /// The files whose `sync_data` failed by injection ([`fail_next_fsync`](Self::fail_next_fsync)
    /// and friends) since this disk came up, in order: which component took the fault.
    pub fn injected_fsync_failures(&self) -> Vec<PathBuf> {
        self.state.lock().failed_fsyncs.clone()
    }

    /// Number of `sync_data` calls (including failed ones).
    pub fn syncs(&self) -> u64 {
        self.state.lock().counters.file_syncs
    }

    /// Number of `sync_dir` calls (including failed ones).
    pub fn dir_syncs(&self) -> u64 {
        self.state.lock().counters.dir_syncs
    }

    /// Number of `write_at` calls (including failed ones).
    pub fn writes(&self) -> u64 {
        self.state.lock().counters.writes
    }

    /// Number of mutating operations run (the clock of
    /// [`halt_after_ops`](Self::halt_after_ops)).
    pub fn mutating_ops(&self) -> u64 {
        self.state.lock().counters.mutating_ops
    }

    /// Number of crashes so far.
    pub fn crashes(&self) -> u64 {
        self.state.lock().counters.crashes
    }

    /// Number of operations not yet synced (data and directory operations).
    pub fn unsynced_ops(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// Every fault injected and every crash, in order, with what it did: for failure
    /// messages. Keeps the last [`SIM_FAULT_LOG_LEN_MAX`] entries.
    pub fn fault_log(&self) -> Vec<String> {
        let st = self.state.lock();
        let mut out = Vec::with_capacity(st.fault_log.len() + 1);
        if st.fault_log_dropped > 0 {
            out.push(format!("({} older entries dropped)", st.fault_log_dropped));
        }
        out.extend(st.fault_log.iter().cloned());
        out
    }

    /// The current contents of every file, by path (what reads see now).
    pub fn files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let st = self.state.lock();
        st.ns
            .iter()
            .filter_map(|(p, n)| match n {
                Node::File(ino) => Some((p.clone(), st.inodes[ino].data.clone())),
                Node::Dir => None,
            })
            .collect()
    }

    /// The durable contents of every durable file, by path: what
    /// [`CrashFault::DropUnsynced`] would leave.
    pub fn durable_files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let st = self.state.lock();
        let mut ns = st.durable_ns.clone();
        prune(&mut ns);
        ns.iter()
            .filter_map(|(p, n)| match n {
                Node::File(ino) => Some((p.clone(), st.inodes[ino].durable.clone())),
                Node::Dir => None,
            })
            .collect()
    }

    /// Every directory (but the root), in order.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let st = self.state.lock();
        st.ns
            .iter()
            .filter(|(_, n)| **n == Node::Dir)
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.state.lock();
        st.check(self.generation)?;
        f(&mut st)
    }
}

impl Storage for SimDisk {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path)?;
        self.with_state(|st| {
            let mut ancestors: Vec<&Path> = path.ancestors().collect();
            ancestors.reverse();
            for dir in ancestors.into_iter().filter(|d| !is_root(d)) {
                match st.node(dir) {
                    Some(Node::Dir) => {}
                    Some(Node::File(_)) => {
                        return Err(io::Error::new(
                            io::ErrorKind::NotADirectory,
                            format!("simulated disk: {} is a file", dir.display()),
                        ))
                    }
                    None => {
                        st.tick()?;
                        st.add_dir_op(DirOp::Mkdir(dir.to_path_buf()));
                    }
                }
            }
            Ok(())
        })
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let path = normalize(path)?;
        self.with_state(|st| {
            st.require_dir(&path)?;
            Ok(st
                .ns
                .keys()
                .filter(|p| p.parent() == Some(path.as_path()))
                .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
                .collect())
        })
    }

    fn open_file(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        let path = normalize(path)?;
        let ino = self.with_state(|st| match st.node(&path) {
            Some(Node::File(ino)) => Ok(ino),
            Some(Node::Dir) => Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("simulated disk: {} is a directory", path.display()),
            )),
            None if !create => Err(err_not_found(&path)),
            None => {
                st.require_parent_dir(&path)?;
                st.tick()?;
                Ok(st.create_file(&path))
            }
        })?;
        Ok(Arc::new(SimFile {
            state: Arc::clone(&self.state),
            generation: self.generation,
            ino,
            path,
        }))
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let path = normalize(path)?;
        self.with_state(|st| Ok(st.node(&path).is_some()))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path)?;
        self.with_state(|st| match st.node(&path) {
            Some(Node::File(_)) => {
                st.tick()?;
                st.add_dir_op(DirOp::Remove(path.clone()));
                Ok(())
            }
            Some(Node::Dir) => Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("simulated disk: {} is a directory", path.display()),
            )),
            None => Err(err_not_found(&path)),
        })
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (normalize(from)?, normalize(to)?);
        self.with_state(|st| {
            let ino = match st.node(&from) {
                Some(Node::File(ino)) => ino,
                Some(Node::Dir) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "simulated disk: renaming directories is not modelled",
                    ))
                }
                None => return Err(err_not_found(&from)),
            };
            st.require_parent_dir(&to)?;
            if st.node(&to) == Some(Node::Dir) {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    format!("simulated disk: {} is a directory", to.display()),
                ));
            }
            if from == to {
                return Ok(());
            }
            st.tick()?;
            st.add_dir_op(DirOp::Rename {
                from: from.clone(),
                to: to.clone(),
                ino,
            });
            Ok(())
        })
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path)?;
        self.with_state(|st| {
            st.require_dir(&path)?;
            st.tick()?;
            st.sync_dir(&path)
        })
    }

    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        let path = normalize(path)?;
        let id = self.with_state(|st| {
            // Like flock on a lock file: the file is created if missing.
            match st.node(&path) {
                Some(Node::File(_)) => {}
                Some(Node::Dir) => {
                    return Err(io::Error::new(
                        io::ErrorKind::IsADirectory,
                        format!("simulated disk: {} is a directory", path.display()),
                    ))
                }
                None => {
                    st.require_parent_dir(&path)?;
                    st.tick()?;
                    st.create_file(&path);
                }
            }
            if st.locks.contains_key(&path) {
                return Ok(None);
            }
            let id = st.next_lock_id;
            st.next_lock_id += 1;
            st.locks.insert(path.clone(), id);
            Ok(Some(id))
        })?;
        Ok(id.map(|id| {
            Box::new(SimLock {
                state: Arc::clone(&self.state),
                generation: self.generation,
                path,
                id,
            }) as Box<dyn LockGuard>
        }))
    }
}

impl SimFile {
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> io::Result<T>) -> io::Result<T> {
        let mut st = self.state.lock();
        st.check(self.generation)?;
        f(&mut st)
    }
}

impl StorageFile for SimFile {
    fn len_bytes(&self) -> io::Result<u64> {
        self.with_state(|st| Ok(st.inode(self.ino).data.len() as u64))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with_state(|st| {
            let data = &st.inodes[&self.ino].data;
            let end = offset.checked_add(buf.len() as u64);
            match end {
                Some(end) if end <= data.len() as u64 => {
                    buf.copy_from_slice(&data[offset as usize..end as usize]);
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "simulated disk: read of {} bytes at {offset} past the end of {} ({} bytes)",
                            buf.len(),
                            self.path.display(),
                            data.len()
                        ),
                    ))
                }
            }
            if !buf.is_empty() && st.take_read_flip() {
                let bit = st.rng.below(buf.len() as u64 * 8);
                buf[(bit / 8) as usize] ^= 1 << (bit % 8);
                let name = st.name_of(self.ino, &self.path);
                st.note(format!(
                    "injected: read of {} bytes at {offset} of {} returned bit {} of byte {} flipped",
                    buf.len(),
                    name,
                    bit % 8,
                    offset + bit / 8
                ));
            }
            Ok(())
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with_state(|st| {
            end_of(offset, buf.len())?;
            st.tick()?;
            st.counters.writes += 1;
            if st.injected.short_write_next && !buf.is_empty() {
                st.injected.short_write_next = false;
                let landed = st.rng.below(buf.len() as u64) as usize;
                st.write_data(self.ino, &self.path, offset, &buf[..landed]);
                let name = st.name_of(self.ino, &self.path);
                st.note(format!(
                    "injected: short write at {offset} of {}: {landed} of {} bytes landed",
                    name,
                    buf.len()
                ));
                return Err(io::Error::other(format!(
                    "simulated short write: {landed} of {} bytes landed",
                    buf.len()
                )));
            }
            let file_len = st.inodes[&self.ino].data.len() as u64;
            if st.injected.enospc && offset + buf.len() as u64 > file_len {
                let landed = file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
                st.write_data(self.ino, &self.path, offset, &buf[..landed]);
                let name = st.name_of(self.ino, &self.path);
                st.note(format!(
                    "injected: disk full: write of {} bytes at {offset} of {} landed {landed}, then ENOSPC",
                    buf.len(),
                    name
                ));
                return Err(enospc());
            }
            st.write_data(self.ino, &self.path, offset, buf);
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with_state(|st| {
            st.tick()?;
            st.sync_file(self.ino, &self.path)
        })
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        if len_bytes > SIM_FILE_SIZE_BYTES_MAX {
            return Err(err_too_big("a length", len_bytes));
        }
        self.with_state(|st| {
            st.tick()?;
            st.set_len_data(self.ino, &self.path, len_bytes);
            Ok(())
        })
    }

    fn allocate(&self, len_bytes: u64) -> io::Result<()> {
        if len_bytes > SIM_FILE_SIZE_BYTES_MAX {
            return Err(err_too_big("an allocation", len_bytes));
        }
        self.with_state(|st| {
            st.tick()?;
            let file_len = st.inodes[&self.ino].data.len() as u64;
            if len_bytes <= file_len {
                return Ok(());
            }
            if st.injected.enospc {
                let name = st.name_of(self.ino, &self.path);
                st.note(format!(
                    "injected: disk full: allocating {} to {len_bytes} bytes failed with ENOSPC",
                    name
                ));
                return Err(enospc());
            }
            st.inode(self.ino).data.resize(len_bytes as usize, 0);
            st.pending.push(Pending::Data {
                ino: self.ino,
                path: self.path.clone(),
                op: DataOp::Allocate(len_bytes),
                lost: false,
            });
            Ok(())
        })
    }

    fn map(&self, len_bytes: u64) -> io::Result<Arc<dyn MappedRegion>> {
        if len_bytes > SIM_FILE_SIZE_BYTES_MAX {
            return Err(err_too_big("a map", len_bytes));
        }
        self.with_state(|st| {
            let len = len_bytes as usize;
            let inode = st.inode(self.ino);
            let buf = Arc::new(MapBuf::new(&inode.data, len));
            inode.maps.retain(|m| m.strong_count() > 0);
            inode.maps.push(Arc::downgrade(&buf));
            let file_part = inode.data.len().min(len);
            if file_part > 0 && st.take_read_flip() {
                let bit = st.rng.below(file_part as u64 * 8);
                buf.flip((bit / 8) as usize, (bit % 8) as u32);
                let name = st.name_of(self.ino, &self.path);
                st.note(format!(
                    "injected: new map of {} has bit {} of byte {} flipped",
                    name,
                    bit % 8,
                    bit / 8
                ));
            }
            Ok(Arc::new(SimMap { buf }) as Arc<dyn MappedRegion>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    /// A disk with a durable directory `/d` and a durable, empty file `/d/f`.
    fn disk_with_file(seed: u64) -> (Arc<SimDisk>, Arc<dyn StorageFile>) {
        let disk = SimDisk::new(seed);
        disk.create_dir_all(p("/d")).unwrap();
        disk.sync_dir(p("/")).unwrap();
        let file = disk.open_file(p("/d/f"), true).unwrap();
        disk.sync_dir(p("/d")).unwrap();
        (disk, file)
    }

    fn contents(disk: &SimDisk, path: &str) -> Option<Vec<u8>> {
        disk.files().get(p(path)).cloned()
    }

    #[test]
    fn unsynced_data_is_dropped_and_synced_data_survives_every_fault() {
        for fault in CrashFault::ALL {
            for seed in 0..20 {
                let (disk, file) = disk_with_file(seed);
                file.write_at(b"durable!", 0).unwrap();
                file.sync_data().unwrap();
                file.write_at(b"volatile", 8).unwrap();
                file.write_at(b"XY", 2).unwrap();
                let disk = disk.crash(fault);
                let got = contents(&disk, "/d/f").expect("a synced file survives");
                assert!(got.len() >= 8, "{fault:?}: {got:?}");
                let overwritten = (2..4).any(|i| got[i] != b"durable!"[i]);
                // Bytes 2..4 were overwritten unsynced; all other synced bytes are intact.
                for i in (0..8).filter(|i| !(2..4).contains(i)) {
                    assert_eq!(got[i], b"durable!"[i], "{fault:?} seed {seed}: {got:?}");
                }
                if fault == CrashFault::DropUnsynced {
                    assert_eq!(got, b"durable!", "{fault:?}");
                }
                if fault == CrashFault::KeepAll {
                    assert_eq!(got, b"duXYble!volatile", "{fault:?}");
                }
                let _ = overwritten;
            }
        }
    }

    #[test]
    fn sync_makes_the_current_contents_durable() {
        let (disk, file) = disk_with_file(1);
        file.write_at(b"abc", 0).unwrap();
        file.set_len(2).unwrap();
        file.allocate(4).unwrap();
        assert_eq!(disk.unsynced_ops(), 3);
        file.sync_data().unwrap();
        assert_eq!(disk.unsynced_ops(), 0);
        assert_eq!(disk.durable_files()[p("/d/f")], b"ab\0\0");
        let disk = disk.crash(CrashFault::DropUnsynced);
        assert_eq!(contents(&disk, "/d/f").unwrap(), b"ab\0\0");
    }

    #[test]
    fn an_unsynced_rename_is_forgotten_and_a_synced_one_survives() {
        let (disk, file) = disk_with_file(2);
        file.write_at(b"x", 0).unwrap();
        file.sync_data().unwrap();
        disk.rename(p("/d/f"), p("/d/g")).unwrap();
        assert!(!disk.exists(p("/d/f")).unwrap());
        let disk = disk.crash(CrashFault::ForgetUnsyncedDirOps);
        assert_eq!(contents(&disk, "/d/f").unwrap(), b"x", "rename undone");
        assert!(!disk.exists(p("/d/g")).unwrap());

        disk.rename(p("/d/f"), p("/d/g")).unwrap();
        disk.sync_dir(p("/d")).unwrap();
        let disk = disk.crash(CrashFault::ForgetUnsyncedDirOps);
        assert_eq!(contents(&disk, "/d/g").unwrap(), b"x", "synced rename kept");
        assert!(!disk.exists(p("/d/f")).unwrap());
    }

    #[test]
    fn creations_and_removals_need_their_directory_synced() {
        let (disk, _) = disk_with_file(3);
        let new = disk.open_file(p("/d/new"), true).unwrap();
        new.write_at(b"data", 0).unwrap();
        new.sync_data().unwrap(); // the data is durable, the name is not
        disk.remove_file(p("/d/f")).unwrap();
        disk.create_dir_all(p("/d/sub/deeper")).unwrap();
        let sub = disk.open_file(p("/d/sub/deeper/x"), true).unwrap();
        sub.sync_data().unwrap();
        disk.sync_dir(p("/d/sub/deeper")).unwrap(); // its parents were never synced
        let after = disk.crash(CrashFault::ForgetUnsyncedDirOps);
        assert!(!after.exists(p("/d/new")).unwrap(), "creation forgotten");
        assert!(after.exists(p("/d/f")).unwrap(), "removal forgotten");
        assert!(
            !after.exists(p("/d/sub/deeper/x")).unwrap(),
            "a file in a directory whose creation was forgotten is gone"
        );
        assert!(after
            .fault_log()
            .iter()
            .any(|l| l.contains("vanished with its directory")));

        let new = after.open_file(p("/d/new"), true).unwrap();
        new.write_at(b"data", 0).unwrap();
        new.sync_data().unwrap();
        after.remove_file(p("/d/f")).unwrap();
        after.sync_dir(p("/d")).unwrap();
        let after = after.crash(CrashFault::DropUnsynced);
        assert_eq!(contents(&after, "/d/new").unwrap(), b"data");
        assert!(!after.exists(p("/d/f")).unwrap());
        let mut names = after.list_dir(p("/d")).unwrap();
        names.sort();
        assert_eq!(names, ["new"]);
    }

    #[test]
    fn locks_are_exclusive_until_dropped_and_a_crash_releases_them() {
        let (disk, _) = disk_with_file(4);
        let lock = p("/d/LOCK");
        let first = disk.try_lock(lock).unwrap().expect("free");
        assert!(disk.exists(lock).unwrap(), "the lock file is created");
        assert!(disk.try_lock(lock).unwrap().is_none());
        drop(first);
        let again = disk.try_lock(lock).unwrap().expect("free after drop");
        disk.sync_dir(p("/d")).unwrap();
        let disk = disk.crash(CrashFault::KeepAll);
        let fresh = disk
            .try_lock(lock)
            .unwrap()
            .expect("a crash releases locks");
        drop(again); // a guard from before the crash must not release the new holder
        assert!(disk.try_lock(lock).unwrap().is_none());
        drop(fresh);
        assert!(disk.try_lock(lock).unwrap().is_some());
    }

    #[test]
    fn maps_reflect_later_writes_truncation_and_extension() {
        let (disk, file) = disk_with_file(5);
        file.write_at(b"head", 0).unwrap();
        let map = file.map(64).unwrap();
        assert_eq!(&map.bytes()[..4], b"head");
        assert_eq!(map.bytes().len(), 64);
        file.write_at(b"tail", 30).unwrap();
        assert_eq!(&map.bytes()[30..34], b"tail");
        file.write_at(b"beyond the map", 60).unwrap(); // clipped, not an error
        assert_eq!(&map.bytes()[60..64], b"beyo");
        file.set_len(2).unwrap();
        file.allocate(40).unwrap();
        assert_eq!(
            &map.bytes()[..4],
            b"he\0\0",
            "truncated bytes read as zeros"
        );
        assert!(map.bytes()[30..34].iter().all(|&b| b == 0));
        let _ = disk;
    }

    #[test]
    fn handles_maps_and_disks_from_before_a_crash_are_dead() {
        let (disk, file) = disk_with_file(6);
        file.write_at(b"abc", 0).unwrap();
        file.sync_data().unwrap();
        let map = file.map(8).unwrap();
        let new = disk.crash(CrashFault::KeepAll);
        assert!(!disk.is_current());
        assert!(new.is_current());
        for result in [
            file.write_at(b"x", 0),
            file.sync_data(),
            file.set_len(0),
            file.read_at(&mut [0u8; 1], 0),
            disk.create_dir_all(p("/e")),
            disk.sync_dir(p("/d")),
            disk.open_file(p("/d/f"), false).map(|_| ()),
        ] {
            let e = result.expect_err("dead");
            assert_eq!(e.kind(), io::ErrorKind::Other);
            assert!(e.to_string().contains("before a crash"), "{e}");
        }
        assert!(file.map(8).is_err());
        assert_eq!(&map.bytes()[..3], b"abc", "an old map stays readable");
        let reopened = new.open_file(p("/d/f"), false).unwrap();
        reopened.write_at(b"X", 0).unwrap();
        assert_eq!(&map.bytes()[..3], b"abc", "but no longer follows the file");
    }

    #[test]
    fn a_halt_fails_everything_until_the_crash() {
        let (disk, file) = disk_with_file(7);
        disk.halt_after_ops(2);
        file.write_at(b"one", 0).unwrap();
        file.write_at(b"two", 3).unwrap();
        assert!(!disk.is_halted());
        assert!(
            file.sync_data().is_err(),
            "the third mutating operation fails"
        );
        assert!(disk.is_halted());
        assert!(file.len_bytes().is_err(), "reads fail too");
        assert!(disk.list_dir(p("/d")).is_err());
        let disk = disk.crash(CrashFault::KeepAll);
        assert!(!disk.is_halted());
        assert_eq!(contents(&disk, "/d/f").unwrap(), b"onetwo");
    }

    #[test]
    fn a_process_crash_keeps_everything_visible_and_nothing_more_durable() {
        let (disk, file) = disk_with_file(12);
        file.write_at(b"synced", 0).unwrap();
        file.sync_data().unwrap();
        file.write_at(b"+cached", 6).unwrap();
        let lock = disk.try_lock(p("/d/LOCK")).unwrap().expect("free");
        disk.halt_after_ops(0);
        assert!(file.write_at(b"never", 13).is_err());
        let restarted = disk.crash_process();
        assert!(
            file.len_bytes().is_err(),
            "the dead process's handles are dead"
        );
        assert!(
            restarted.try_lock(p("/d/LOCK")).unwrap().is_some(),
            "locks released"
        );
        drop(lock);
        assert_eq!(contents(&restarted, "/d/f").unwrap(), b"synced+cached");
        assert_eq!(restarted.durable_files()[p("/d/f")], b"synced");
        let rebooted = restarted.crash(CrashFault::DropUnsynced);
        assert_eq!(contents(&rebooted, "/d/f").unwrap(), b"synced");
    }

    #[test]
    fn tear_keeps_a_strict_prefix_of_the_last_write_and_everything_before() {
        for seed in 0..50 {
            let (disk, file) = disk_with_file(seed);
            file.write_at(b"first-", 0).unwrap();
            file.write_at(b"0123456789", 6).unwrap();
            let disk = disk.crash(CrashFault::TearLastWrite);
            let got = contents(&disk, "/d/f").unwrap();
            assert!(got.starts_with(b"first-"), "{got:?}");
            assert!(got.len() < 16, "torn: {got:?}");
            assert!(b"first-0123456789".starts_with(&got), "{got:?}");
        }
    }

    #[test]
    fn a_random_prefix_is_a_prefix_across_files() {
        let mut lengths = BTreeSet::new();
        for seed in 0..50 {
            let (disk, f) = disk_with_file(seed);
            let g = disk.open_file(p("/d/g"), true).unwrap();
            disk.sync_dir(p("/d")).unwrap();
            f.write_at(b"a", 0).unwrap();
            g.write_at(b"b", 0).unwrap();
            f.write_at(b"c", 1).unwrap();
            let disk = disk.crash(CrashFault::KeepRandomPrefix);
            let (f, g) = (
                contents(&disk, "/d/f").unwrap(),
                contents(&disk, "/d/g").unwrap(),
            );
            let kept = f.len() + g.len();
            let expect: (&[u8], &[u8]) = match kept {
                0 => (b"", b""),
                1 => (b"a", b""),
                2 => (b"a", b"b"),
                _ => (b"ac", b"b"),
            };
            assert_eq!((f.as_slice(), g.as_slice()), expect);
            lengths.insert(kept);
        }
        assert_eq!(lengths.len(), 4, "every prefix length happens: {lengths:?}");
    }

    #[test]
    fn reorder_lets_files_land_independently() {
        let mut outcomes = BTreeSet::new();
        for seed in 0..100 {
            let (disk, f) = disk_with_file(seed);
            let g = disk.open_file(p("/d/g"), true).unwrap();
            disk.sync_dir(p("/d")).unwrap();
            f.write_at(b"ff", 0).unwrap();
            g.write_at(b"gg", 0).unwrap();
            let disk = disk.crash(CrashFault::ReorderAcrossFiles);
            let f = contents(&disk, "/d/f").unwrap();
            let g = contents(&disk, "/d/g").unwrap();
            assert!(b"ff".starts_with(&f) && b"gg".starts_with(&g));
            outcomes.insert((f.len(), g.len()));
        }
        assert!(
            outcomes.contains(&(0, 2)),
            "a later file's write without an earlier one"
        );
        assert!(outcomes.contains(&(2, 0)));
    }

    #[test]
    fn zero_fill_tail_zeros_only_unsynced_bytes_from_some_point() {
        let mut zeroed_some = false;
        for seed in 0..50 {
            let (disk, file) = disk_with_file(seed);
            file.write_at(&[7u8; 10], 0).unwrap();
            file.sync_data().unwrap();
            file.write_at(&[9u8; 10], 10).unwrap();
            let disk = disk.crash(CrashFault::ZeroFillTail);
            let got = contents(&disk, "/d/f").unwrap();
            assert_eq!(got.len(), 20);
            assert_eq!(&got[..10], &[7u8; 10]);
            let first_zero = got[10..].iter().position(|&b| b == 0).unwrap_or(10);
            assert!(got[10..10 + first_zero].iter().all(|&b| b == 9));
            assert!(got[10 + first_zero..].iter().all(|&b| b == 0), "{got:?}");
            zeroed_some |= first_zero < 10;
        }
        assert!(zeroed_some);
    }

    #[test]
    fn scatter_pages_can_keep_a_later_page_without_an_earlier_one() {
        let mut hole_then_data = false;
        for seed in 0..50 {
            let (disk, file) = disk_with_file(seed);
            let len = 3 * SIM_PAGE_SIZE_BYTES as usize;
            file.write_at(&vec![5u8; len], 0).unwrap();
            let disk = disk.crash(CrashFault::ScatterPages);
            let got = contents(&disk, "/d/f").unwrap();
            assert_eq!(got.len(), len);
            let pages: Vec<bool> = got
                .chunks(SIM_PAGE_SIZE_BYTES as usize)
                .map(|c| {
                    assert!(c.iter().all(|&b| b == c[0]), "pages land whole");
                    c[0] == 5
                })
                .collect();
            hole_then_data |= pages.windows(2).any(|w| !w[0] && w[1]);
        }
        assert!(hole_then_data);
    }

    #[test]
    fn a_failed_fsync_keeps_data_dirty_or_drops_it_as_told() {
        let (disk, file) = disk_with_file(8);
        file.write_at(b"kept", 0).unwrap();
        disk.fail_next_fsync();
        assert_eq!(
            file.sync_data().unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        file.sync_data().unwrap();
        let disk = disk.crash(CrashFault::DropUnsynced);
        assert_eq!(
            contents(&disk, "/d/f").unwrap(),
            b"kept",
            "a retry synced it"
        );

        let file = disk.open_file(p("/d/f"), false).unwrap();
        file.write_at(b"LOST", 0).unwrap();
        disk.fail_next_fsync_dropping_data();
        assert!(file.sync_data().is_err());
        let mut buf = [0u8; 4];
        file.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"LOST", "reads still see the dropped write");
        file.write_at(b"!", 4).unwrap();
        file.sync_data().unwrap();
        assert_eq!(disk.durable_files()[p("/d/f")], b"kept!");
        let disk = disk.crash(CrashFault::KeepAll);
        assert_eq!(contents(&disk, "/d/f").unwrap(), b"kept!");
        assert!(disk.fault_log().iter().any(|l| l.contains("never reach")));
    }

    #[test]
    fn a_full_disk_fails_growth_but_not_writes_inside_the_file() {
        let (disk, file) = disk_with_file(9);
        file.allocate(8).unwrap();
        disk.fail_writes_with_enospc(true);
        file.write_at(b"inside", 0).unwrap();
        let e = file.write_at(b"across", 5).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            contents(&disk, "/d/f").unwrap(),
            b"insidacr",
            "only the part inside"
        );
        assert!(file.allocate(100).is_err());
        disk.fail_writes_with_enospc(false);
        file.allocate(100).unwrap();
        assert_eq!(file.len_bytes().unwrap(), 100);
    }

    #[test]
    fn a_short_write_lands_a_strict_prefix_then_fails() {
        for seed in 0..20 {
            let (disk, file) = disk_with_file(seed);
            disk.short_write_next();
            assert!(file.write_at(b"0123456789", 0).is_err());
            let got = contents(&disk, "/d/f").unwrap();
            assert!(got.len() < 10 && b"0123456789".starts_with(&got), "{got:?}");
            file.write_at(b"ok", 0).unwrap();
        }
    }

    #[test]
    fn flipped_reads_change_what_is_returned_not_what_is_stored() {
        let (disk, file) = disk_with_file(10);
        file.write_at(&[0u8; 32], 0).unwrap();
        disk.flip_bit_on_next_read();
        let mut buf = [0u8; 32];
        file.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf.iter().map(|b| b.count_ones()).sum::<u32>(), 1);
        file.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 32], "one read only; the data is intact");

        disk.flip_bit_on_next_read();
        let flipped = file.map(64).unwrap();
        let clean = file.map(64).unwrap();
        let ones =
            |m: &Arc<dyn MappedRegion>| m.bytes().iter().map(|b| b.count_ones()).sum::<u32>();
        assert_eq!(ones(&flipped), 1);
        assert_eq!(ones(&clean), 0);
        assert!(
            flipped.bytes()[32..].iter().all(|&b| b == 0),
            "flips stay below the end"
        );

        let at = disk.flip_bit_in_maps(p("/d/f")).expect("mapped");
        assert!(at < 32);
        assert_eq!(ones(&clean), 1);
        assert_eq!(contents(&disk, "/d/f").unwrap(), vec![0u8; 32]);
        file.write_at(&[0u8; 32], 0).unwrap();
        assert_eq!(ones(&clean), 0, "a write of the byte overwrites the flip");
    }

    #[test]
    fn same_seed_and_operations_give_the_same_state() {
        let run = |seed: u64| {
            let mut disk = SimDisk::new(seed);
            let mut rng = SimRng::new(99);
            disk.create_dir_all(p("/a")).unwrap();
            disk.sync_dir(p("/")).unwrap();
            for round in 0..30u64 {
                let name = format!("/a/{}", rng.below(4));
                let file = disk.open_file(p(&name), true).unwrap();
                let mut bytes = vec![0u8; rng.range(1, 300) as usize];
                rng.fill(&mut bytes);
                file.write_at(&bytes, rng.below(500)).unwrap();
                if rng.chance(1, 3) {
                    file.sync_data().unwrap();
                }
                if rng.chance(1, 4) {
                    disk.sync_dir(p("/a")).unwrap();
                }
                if round % 7 == 6 {
                    disk = disk.crash_random().0;
                }
            }
            (disk.files(), disk.durable_files(), disk.fault_log())
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5).2, run(6).2);
    }

    #[test]
    fn paths_must_be_absolute_and_parents_must_exist() {
        let disk = SimDisk::new(11);
        assert_eq!(
            disk.open_file(p("rel"), true).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            disk.open_file(p("/no/such"), true).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        disk.create_dir_all(p("/x/./y/")).unwrap();
        assert_eq!(disk.dirs(), [PathBuf::from("/x"), PathBuf::from("/x/y")]);
        assert!(disk.exists(p("/x/y")).unwrap());
        assert!(format!("{disk:?}").contains("SimDisk"));
    }
}
