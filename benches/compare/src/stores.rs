//! The four stores behind one small interface, each set up to give the same durability
//! promise (see `durability_text` in main.rs for the exact settings).

use crate::common::Item;
use eventlog::log::record::{self, Decoded, FLAG_BATCH_END};
use eventlog::log::Durability as ElDurability;
use eventlog::store::{AppendRequest, Direction, ExpectedVersion, Options, Store};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Milliseconds between background syncs in the `Interval` configuration (sled's default
/// `flush_every_ms`, so sled runs with its defaults there).
pub const INTERVAL_MS: u64 = 500;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Durability {
    /// Acknowledged appends survive a power loss.
    Sync,
    /// Acknowledged appends survive a process crash; a power loss may lose the last
    /// interval (SQLite NORMAL: since the last checkpoint).
    Interval,
}

impl Durability {
    pub fn parse(s: &str) -> Durability {
        match s {
            "sync" => Durability::Sync,
            "interval" => Durability::Interval,
            _ => panic!("durability {s}?"),
        }
    }
}

/// One writer: a handle that a thread owns.
pub trait Appender: Send {
    /// Appends `items` atomically (all or nothing, across aggregates) and durably (as the
    /// configured durability promises); each event gets the next version of its aggregate
    /// (ExpectedVersion::Any).
    fn append(&mut self, items: &[Item]);
}

/// A store under test.
pub trait Db {
    fn appender(&self) -> Box<dyn Appender + '_>;
    /// Reads one aggregate's whole history, decoding every event; returns the count.
    fn read_aggregate(&mut self, aggregate: &str) -> u64;
    /// Reads every event of one type from the start, decoding each; returns the count.
    fn read_type(&mut self, event_type: &str) -> u64;
    /// Reads every event from the first, decoding each; returns the count.
    fn replay(&mut self) -> u64;
    /// Events stored.
    fn stored(&mut self) -> u64;
    /// Finishes the background work opening the store started, so that the timed reads
    /// measure reads, not reads sharing the 2 cores with it: eventlog's index moving the
    /// events it caught up from the log into sled, sled's own flush. SQLite has none.
    fn settle(&mut self) {}
}

pub fn open(store: &str, dir: &Path, durability: Durability) -> Box<dyn Db> {
    match store {
        "eventlog" => Box::new(El::open(dir, durability)),
        "sqlite" => Box::new(Sqlite::open(dir, durability)),
        "sled" => Box::new(SledStore::open(dir, durability)),
        _ => panic!("no such store {store} (raw has its own paths)"),
    }
}

// ---------------------------------------------------------------------------------------
// eventlog: the store API with default options (Durability::Sync by default).

pub struct El {
    store: Store,
}

impl El {
    pub fn open(dir: &Path, durability: Durability) -> El {
        let mut options = Options::default();
        options.log.durability = match durability {
            Durability::Sync => ElDurability::Sync,
            Durability::Interval => ElDurability::Interval {
                sync_interval_ms: INTERVAL_MS,
            },
        };
        El {
            store: Store::open(dir, options).expect("opening eventlog"),
        }
    }
}

struct ElAppender {
    store: Store,
}

impl Appender for ElAppender {
    fn append(&mut self, items: &[Item]) {
        let requests: Vec<AppendRequest<'_>> = items
            .iter()
            .map(|it| AppendRequest {
                aggregate_id: &it.aggregate,
                expected: ExpectedVersion::Any,
                events: std::slice::from_ref(&it.event),
            })
            .collect();
        self.store.append_batch(&requests).expect("eventlog append");
    }
}

impl Db for El {
    fn settle(&mut self) {
        self.store.flush_index().expect("flush_index");
    }

    fn appender(&self) -> Box<dyn Appender + '_> {
        Box::new(ElAppender {
            store: self.store.clone(),
        })
    }

    fn read_aggregate(&mut self, aggregate: &str) -> u64 {
        let mut n = 0;
        let mut acc = 0usize;
        for e in self
            .store
            .read_aggregate(aggregate, 1, Direction::Forward, usize::MAX)
            .expect("read_aggregate")
        {
            let e = e.expect("read_aggregate item");
            let ev = e.event().expect("decode");
            acc += ev.payload.len() + ev.event_type.len();
            n += 1;
        }
        black_box(acc);
        n
    }

    fn read_type(&mut self, event_type: &str) -> u64 {
        let mut n = 0;
        let mut acc = 0usize;
        for e in self
            .store
            .read_type(event_type, 0, usize::MAX)
            .expect("read_type")
        {
            let e = e.expect("read_type item");
            let ev = e.event().expect("decode");
            acc += ev.payload.len() + ev.aggregate_id.len();
            n += 1;
        }
        black_box(acc);
        n
    }

    fn replay(&mut self) -> u64 {
        let mut n = 0;
        let mut acc = 0usize;
        for e in self.store.read_all(0, usize::MAX) {
            let e = e.expect("read_all item");
            let ev = e.event().expect("decode");
            acc += ev.payload.len() + ev.aggregate_id.len();
            n += 1;
        }
        black_box(acc);
        n
    }

    fn stored(&mut self) -> u64 {
        self.store.next_seq()
    }
}

// ---------------------------------------------------------------------------------------
// SQLite: bundled SQLite, WAL, synchronous FULL (Sync) or NORMAL (Interval); otherwise
// SQLite's defaults (4 KiB pages, 2 MB page cache, autocheckpoint every 1,000 pages).

pub const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY,   -- the rowid: global order
    aggregate    TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    type         TEXT    NOT NULL,
    event_id     BLOB    NOT NULL,      -- 16 bytes
    ts           INTEGER NOT NULL,      -- microseconds since the epoch
    content_type INTEGER NOT NULL,
    payload      BLOB    NOT NULL,
    UNIQUE (aggregate, version)
);
CREATE INDEX IF NOT EXISTS events_by_type ON events (type, seq);
";

/// The next version is computed by SQLite inside the transaction, from the
/// UNIQUE(aggregate, version) index (ExpectedVersion::Any).
pub const SQLITE_INSERT: &str = "INSERT INTO events (aggregate, version, type, event_id, ts, content_type, payload) \
     VALUES (?1, COALESCE((SELECT MAX(version) FROM events WHERE aggregate = ?1), 0) + 1, ?2, ?3, ?4, ?5, ?6)";

const SQLITE_COLUMNS: &str = "seq, aggregate, version, type, event_id, ts, content_type, payload";

pub struct Sqlite {
    path: PathBuf,
    durability: Durability,
    conn: rusqlite::Connection,
}

fn sqlite_connect(path: &Path, durability: Durability) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).expect("opening sqlite");
    let mode: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode.to_lowercase(), "wal");
    c.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Sync => "FULL",
            Durability::Interval => "NORMAL",
        },
    )
    .expect("synchronous");
    c.busy_timeout(Duration::from_secs(120))
        .expect("busy_timeout");
    c
}

impl Sqlite {
    pub fn open(dir: &Path, durability: Durability) -> Sqlite {
        std::fs::create_dir_all(dir).expect("sqlite dir");
        let path = dir.join("events.db");
        let conn = sqlite_connect(&path, durability);
        conn.execute_batch(SQLITE_SCHEMA).expect("schema");
        Sqlite {
            path,
            durability,
            conn,
        }
    }

    fn rows(&mut self, sql: &str, param: Option<&str>) -> u64 {
        let mut st = self.conn.prepare_cached(sql).expect("prepare");
        let mut rows = match param {
            Some(p) => st.query([p]),
            None => st.query([]),
        }
        .expect("query");
        let mut n = 0;
        let mut acc = 0usize;
        while let Some(r) = rows.next().expect("row") {
            let seq: i64 = r.get(0).expect("seq");
            let agg = r.get_ref(1).expect("aggregate").as_str().expect("text");
            let version: i64 = r.get(2).expect("version");
            let ty = r.get_ref(3).expect("type").as_str().expect("text");
            let id = r.get_ref(4).expect("id").as_blob().expect("blob");
            let ts: i64 = r.get(5).expect("ts");
            let ct: i64 = r.get(6).expect("content_type");
            let payload = r.get_ref(7).expect("payload").as_blob().expect("blob");
            acc += payload.len() + agg.len() + ty.len() + id.len();
            black_box((seq, version, ts, ct));
            n += 1;
        }
        black_box(acc);
        n
    }
}

struct SqliteAppender {
    conn: rusqlite::Connection,
}

impl Appender for SqliteAppender {
    fn append(&mut self, items: &[Item]) {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .expect("begin");
        {
            let mut st = tx.prepare_cached(SQLITE_INSERT).expect("prepare insert");
            for it in items {
                st.execute(rusqlite::params![
                    it.aggregate,
                    it.event.event_type,
                    &it.id[..],
                    it.timestamp_us(),
                    if it.is_json() { 1 } else { 2 },
                    it.event.payload,
                ])
                .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
}

impl Db for Sqlite {
    fn appender(&self) -> Box<dyn Appender + '_> {
        Box::new(SqliteAppender {
            conn: sqlite_connect(&self.path, self.durability),
        })
    }

    fn read_aggregate(&mut self, aggregate: &str) -> u64 {
        self.rows(
            &format!("SELECT {SQLITE_COLUMNS} FROM events WHERE aggregate = ?1 ORDER BY version"),
            Some(aggregate),
        )
    }

    fn read_type(&mut self, event_type: &str) -> u64 {
        self.rows(
            &format!(
                "SELECT {SQLITE_COLUMNS} FROM events WHERE type = ?1 AND seq >= 0 ORDER BY seq"
            ),
            Some(event_type),
        )
    }

    fn replay(&mut self) -> u64 {
        self.rows(
            &format!("SELECT {SQLITE_COLUMNS} FROM events WHERE seq >= 0 ORDER BY seq"),
            None,
        )
    }

    fn stored(&mut self) -> u64 {
        self.conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get::<_, i64>(0))
            .expect("count") as u64
    }
}

// ---------------------------------------------------------------------------------------
// sled 0.34 used directly as an event store, with its default configuration (1 GB page
// cache, background flush every 500 ms). Trees:
//   events:  seq (u64 BE)                      -> encoded event
//   by_agg:  len(agg) agg version (u64 BE)      -> seq (u64 BE)
//   by_type: len(type) type seq (u64 BE)        -> ()
//   latest:  agg                                -> latest version (u64 BE); "\0seq" -> next seq
// One append is one multi-tree transaction (atomic across trees and aggregates), made
// under a process mutex (the next-seq key is hot; sled's optimistic transactions would
// otherwise conflict and retry), then `Db::flush()` (fsync) under Sync, outside the mutex
// so concurrent appenders share flushes.

const SLED_NEXT_SEQ: &[u8] = b"\0seq";

pub struct SledStore {
    db: sled::Db,
    /// sled's data file, to fdatasync after `flush()` (see below).
    data_file: Arc<File>,
    events: sled::Tree,
    by_agg: sled::Tree,
    by_type: sled::Tree,
    latest: sled::Tree,
    lock: Arc<Mutex<()>>,
    durability: Durability,
}

fn sled_name_key(name: &str, n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len() + 8);
    k.push(name.len() as u8);
    k.extend_from_slice(name.as_bytes());
    k.extend_from_slice(&n.to_be_bytes());
    k
}

fn sled_prefix(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(name.len() as u8);
    k.extend_from_slice(name.as_bytes());
    k
}

fn sled_encode(it: &Item, version: u64) -> Vec<u8> {
    let e = &it.event;
    let mut v = Vec::with_capacity(40 + it.aggregate.len() + e.event_type.len() + e.payload.len());
    v.push(it.aggregate.len() as u8);
    v.extend_from_slice(it.aggregate.as_bytes());
    v.push(e.event_type.len() as u8);
    v.extend_from_slice(e.event_type.as_bytes());
    v.extend_from_slice(&version.to_be_bytes());
    v.extend_from_slice(&it.id);
    v.extend_from_slice(&it.timestamp_us().to_be_bytes());
    v.push(if it.is_json() { 1 } else { 2 });
    v.extend_from_slice(&e.payload);
    v
}

/// Decodes an event value, borrowing; returns (aggregate, type, version, payload).
fn sled_decode(v: &[u8]) -> (&str, &str, u64, &[u8]) {
    let al = v[0] as usize;
    let agg = std::str::from_utf8(&v[1..1 + al]).expect("utf8");
    let mut p = 1 + al;
    let tl = v[p] as usize;
    let ty = std::str::from_utf8(&v[p + 1..p + 1 + tl]).expect("utf8");
    p += 1 + tl;
    let version = u64::from_be_bytes(v[p..p + 8].try_into().unwrap());
    p += 8 + 16 + 8 + 1;
    (agg, ty, version, &v[p..])
}

fn be_u64(v: &[u8]) -> u64 {
    u64::from_be_bytes(v.try_into().expect("8 bytes"))
}

impl SledStore {
    pub fn open(dir: &Path, durability: Durability) -> SledStore {
        // Defaults: sled::Config::default() flushes every 500 ms in the background.
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .open()
            .expect("opening sled");
        let data_file = Arc::new(File::open(dir.join("sled").join("db")).expect("sled's db file"));
        SledStore {
            data_file,
            events: db.open_tree("events").expect("tree"),
            by_agg: db.open_tree("by_agg").expect("tree"),
            by_type: db.open_tree("by_type").expect("tree"),
            latest: db.open_tree("latest").expect("tree"),
            db,
            lock: Arc::new(Mutex::new(())),
            durability,
        }
    }

    fn get_event(&self, seq: &[u8], acc: &mut usize) {
        let v = self.events.get(seq).expect("get").expect("event present");
        let (agg, ty, version, payload) = sled_decode(&v);
        *acc += agg.len() + ty.len() + payload.len() + version as usize;
    }
}

struct SledAppender {
    db: sled::Db,
    data_file: Arc<File>,
    trees: [sled::Tree; 4],
    lock: Arc<Mutex<()>>,
    durability: Durability,
}

impl Appender for SledAppender {
    fn append(&mut self, items: &[Item]) {
        use sled::transaction::ConflictableTransactionError;
        use sled::Transactional;
        {
            let _g = self.lock.lock().unwrap();
            let [events, by_agg, by_type, latest] = &self.trees;
            (events, by_agg, by_type, latest)
                .transaction(|(ev, ba, bt, la)| {
                    let mut next = la.get(SLED_NEXT_SEQ)?.map_or(0, |v| be_u64(&v));
                    let mut versions: HashMap<&str, u64> = HashMap::new();
                    for it in items {
                        let current = match versions.get(it.aggregate.as_str()) {
                            Some(&v) => v,
                            None => la.get(it.aggregate.as_bytes())?.map_or(0, |v| be_u64(&v)),
                        };
                        let version = current + 1;
                        versions.insert(&it.aggregate, version);
                        let seq = next.to_be_bytes();
                        ev.insert(&seq[..], sled_encode(it, version))?;
                        ba.insert(sled_name_key(&it.aggregate, version), &seq[..])?;
                        bt.insert(sled_name_key(&it.event.event_type, next), &[][..])?;
                        next += 1;
                    }
                    for (agg, v) in versions {
                        la.insert(agg.as_bytes(), &v.to_be_bytes()[..])?;
                    }
                    la.insert(SLED_NEXT_SEQ, &next.to_be_bytes()[..])?;
                    Ok::<(), ConflictableTransactionError<()>>(())
                })
                .expect("sled transaction");
        }
        if self.durability == Durability::Sync {
            // flush() writes sled's log and waits with sync_file_range(2), which neither
            // flushes the drive's volatile write cache nor commits the file's metadata, so
            // on its own it does not survive a power loss. The fdatasync makes it so.
            self.db.flush().expect("sled flush");
            self.data_file
                .sync_data()
                .expect("fdatasync of sled's file");
        }
    }
}

impl Db for SledStore {
    fn settle(&mut self) {
        self.db.flush().expect("sled flush");
    }

    fn appender(&self) -> Box<dyn Appender + '_> {
        Box::new(SledAppender {
            db: self.db.clone(),
            data_file: Arc::clone(&self.data_file),
            trees: [
                self.events.clone(),
                self.by_agg.clone(),
                self.by_type.clone(),
                self.latest.clone(),
            ],
            lock: Arc::clone(&self.lock),
            durability: self.durability,
        })
    }

    fn read_aggregate(&mut self, aggregate: &str) -> u64 {
        let mut n = 0;
        let mut acc = 0usize;
        for kv in self.by_agg.scan_prefix(sled_prefix(aggregate)) {
            let (_, seq) = kv.expect("scan");
            self.get_event(&seq, &mut acc);
            n += 1;
        }
        black_box(acc);
        n
    }

    fn read_type(&mut self, event_type: &str) -> u64 {
        let prefix = sled_prefix(event_type);
        let mut n = 0;
        let mut acc = 0usize;
        for kv in self.by_type.scan_prefix(&prefix) {
            let (k, _) = kv.expect("scan");
            self.get_event(&k[prefix.len()..], &mut acc);
            n += 1;
        }
        black_box(acc);
        n
    }

    fn replay(&mut self) -> u64 {
        let mut n = 0;
        let mut acc = 0usize;
        for kv in self.events.iter() {
            let (_, v) = kv.expect("iter");
            let (agg, ty, version, payload) = sled_decode(&v);
            acc += agg.len() + ty.len() + payload.len() + version as usize;
            n += 1;
        }
        black_box(acc);
        n
    }

    fn stored(&mut self) -> u64 {
        self.latest
            .get(SLED_NEXT_SEQ)
            .expect("get")
            .map_or(0, |v| be_u64(&v))
    }
}

// ---------------------------------------------------------------------------------------
// raw: the same framed bytes eventlog's log holds (its event encoding inside its record
// framing), written with write(2) to a fresh file and fdatasync'd per append.

pub const RAW_FILE: &str = "raw.log";

/// Staged bytes: `staged.bin` holds framed records, `staged.idx` the end offset (u64 LE)
/// of each append (batch).
pub struct Staged {
    pub bin: File,
    pub ends: Vec<u64>,
    pub records: u64,
}

pub fn staged_paths(stage_dir: &Path) -> (PathBuf, PathBuf) {
    (stage_dir.join("staged.bin"), stage_dir.join("staged.idx"))
}

pub fn read_staged(stage_dir: &Path) -> Staged {
    let (bin, idx) = staged_paths(stage_dir);
    let mut raw = Vec::new();
    File::open(&idx)
        .expect("staged.idx")
        .read_to_end(&mut raw)
        .expect("read idx");
    let mut ends: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let records = ends.pop().expect("record count at the end");
    Staged {
        bin: File::open(&bin).expect("staged.bin"),
        ends,
        records,
    }
}

/// Writes staged records: frames `payloads` (eventlog-encoded events) in appends of
/// `batch`, the last record of each flagged as the end of its append, as the log does.
pub fn write_staged(
    stage_dir: &Path,
    payloads: impl Iterator<Item = Vec<u8>>,
    batch: usize,
) -> u64 {
    std::fs::create_dir_all(stage_dir).expect("stage dir");
    let (bin, idx) = staged_paths(stage_dir);
    let mut out = std::io::BufWriter::new(File::create(&bin).expect("staged.bin"));
    let mut ends: Vec<u64> = Vec::new();
    let mut pos = 0u64;
    let mut buf = Vec::new();
    let mut pending: Vec<Vec<u8>> = Vec::with_capacity(batch);
    let mut seq = 0u64;
    let mut flush = |pending: &mut Vec<Vec<u8>>,
                     out: &mut std::io::BufWriter<File>,
                     seq: &mut u64,
                     pos: &mut u64,
                     ends: &mut Vec<u64>| {
        for (i, p) in pending.iter().enumerate() {
            buf.clear();
            let flags = if i + 1 == pending.len() {
                FLAG_BATCH_END
            } else {
                0
            };
            record::encode_into(&mut buf, *seq, flags, i as u64, p);
            out.write_all(&buf).expect("write staged");
            *pos += buf.len() as u64;
            *seq += 1;
        }
        if !pending.is_empty() {
            ends.push(*pos);
        }
        pending.clear();
    };
    for p in payloads {
        pending.push(p);
        if pending.len() == batch {
            flush(&mut pending, &mut out, &mut seq, &mut pos, &mut ends);
        }
    }
    flush(&mut pending, &mut out, &mut seq, &mut pos, &mut ends);
    out.flush().expect("flush staged");
    ends.push(seq);
    let bytes: Vec<u8> = ends.iter().flat_map(|e| e.to_le_bytes()).collect();
    std::fs::write(&idx, bytes).expect("staged.idx");
    seq
}

/// Writes the staged appends to a fresh file in `dir`: each append is one write(2) and,
/// under Sync, one fdatasync; under Interval a background thread fdatasyncs every
/// INTERVAL_MS. Returns (seconds spent in write+fdatasync, records). The staged bytes are
/// read back (pread from the page cache) outside the timed part.
pub fn raw_append(dir: &Path, staged: &Staged, durability: Durability, records: u64) -> (f64, u64) {
    // The first appends holding at least `records` records (all of them when it is
    // `staged.records`).
    let per_append = staged
        .records
        .div_ceil(staged.ends.len().max(1) as u64)
        .max(1);
    let batches = (records.div_ceil(per_append) as usize).min(staged.ends.len());
    std::fs::create_dir_all(dir).expect("raw dir");
    let file = Arc::new(
        OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(dir.join(RAW_FILE))
            .expect("create raw"),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let syncer = (durability == Durability::Interval).then(|| {
        let (f, s) = (Arc::clone(&file), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(INTERVAL_MS));
                f.sync_data().expect("fdatasync");
            }
        })
    });
    let mut buf = Vec::new();
    let mut start = 0u64;
    let mut secs = 0.0;
    for &end in &staged.ends[..batches] {
        buf.resize((end - start) as usize, 0);
        staged
            .bin
            .read_exact_at(&mut buf, start)
            .expect("read staged");
        let t = Instant::now();
        (&*file).write_all(&buf).expect("write");
        if durability == Durability::Sync {
            file.sync_data().expect("fdatasync");
        }
        secs += t.elapsed().as_secs_f64();
        start = end;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(h) = syncer {
        h.join().expect("syncer");
    }
    file.sync_data().expect("fdatasync");
    (secs, (batches as u64 * per_append).min(staged.records))
}

/// A naive group commit over one raw file: appenders frame their record into a shared
/// buffer; whoever finds no write in progress takes the whole buffer, writes it with one
/// write(2) and one fdatasync, and wakes everyone whose record it carried.
pub struct RawGroupCommit {
    file: File,
    state: Mutex<GcState>,
    cv: Condvar,
    template: Vec<u8>,
}

struct GcState {
    buf: Vec<u8>,
    next_seq: u64,
    /// Records framed so far.
    queued: u64,
    /// Records durable so far.
    durable: u64,
    writing: bool,
}

impl RawGroupCommit {
    pub fn create(dir: &Path, template: Vec<u8>) -> RawGroupCommit {
        std::fs::create_dir_all(dir).expect("raw dir");
        RawGroupCommit {
            file: OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(dir.join(RAW_FILE))
                .expect("create raw"),
            state: Mutex::new(GcState {
                buf: Vec::new(),
                next_seq: 0,
                queued: 0,
                durable: 0,
                writing: false,
            }),
            cv: Condvar::new(),
            template,
        }
    }

    /// Appends one record (the template event) durably.
    pub fn append_one(&self) {
        let mut st = self.state.lock().unwrap();
        let seq = st.next_seq;
        st.next_seq += 1;
        record::encode_into(&mut st.buf, seq, FLAG_BATCH_END, 0, &self.template);
        st.queued += 1;
        let mine = st.queued;
        loop {
            if st.durable >= mine {
                return;
            }
            if !st.writing {
                st.writing = true;
                let buf = std::mem::take(&mut st.buf);
                let upto = st.queued;
                drop(st);
                (&self.file).write_all(&buf).expect("write");
                self.file.sync_data().expect("fdatasync");
                st = self.state.lock().unwrap();
                st.durable = upto;
                st.writing = false;
                if st.buf.capacity() == 0 {
                    let mut buf = buf;
                    buf.clear();
                    st.buf = buf;
                }
                self.cv.notify_all();
            } else {
                st = self.cv.wait(st).unwrap();
            }
        }
    }

    pub fn records(&self) -> u64 {
        self.state.lock().unwrap().durable
    }
}

/// Reads the raw file front to back with read(2), verifying each record (crc32) and
/// decoding its event, as eventlog's replay does; returns the count.
pub fn raw_replay(dir: &Path) -> u64 {
    let mut file = File::open(dir.join(RAW_FILE)).expect("open raw");
    let mut buf = vec![0u8; 4 << 20];
    let mut filled = 0usize;
    let mut n = 0u64;
    let mut acc = 0usize;
    loop {
        let got = file.read(&mut buf[filled..]).expect("read");
        filled += got;
        let mut pos = 0usize;
        loop {
            match record::decode(&buf[pos..filled], u32::MAX) {
                Decoded::Record(h) => {
                    let start = pos + record::framed_len(0);
                    let payload = &buf[start..start + h.payload_len as usize];
                    let ev = eventlog::store::event::decode(h.seq, payload).expect("event");
                    acc += ev.payload.len() + ev.aggregate_id.len();
                    n += 1;
                    pos += h.framed_len();
                }
                Decoded::Truncated | Decoded::End => break,
                other => panic!("raw record at {pos}: {other:?}"),
            }
        }
        buf.copy_within(pos..filled, 0);
        filled -= pos;
        if got == 0 {
            break;
        }
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
    }
    black_box(acc);
    n
}
