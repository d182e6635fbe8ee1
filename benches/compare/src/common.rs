//! Shared pieces: the workload generator, measurement helpers, the machine description.

use eventlog::store::NewEvent;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// xorshift64: fast, deterministic.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }
}

/// One event to append, as every store receives it.
pub struct Item {
    pub aggregate: String,
    /// Type, payload, content type and timestamp. eventlog takes it as is (it generates
    /// its own event id, a UUID v4); the peers store the same fields plus `id`.
    pub event: NewEvent,
    /// A random 16-byte event id for the peers (eventlog makes its own).
    pub id: [u8; 16],
}

impl Item {
    pub fn timestamp_us(&self) -> i64 {
        self.event.timestamp_us.unwrap_or(0)
    }

    pub fn is_json(&self) -> bool {
        self.event.content_type == eventlog::store::ContentType::Json
    }
}

/// The synthetic workload: events with `payload_bytes` of incompressible payload, to a
/// random one of `aggregates` aggregates, of a random one of `types` types.
pub struct Gen {
    rng: Rng,
    aggregates: Arc<Vec<String>>,
    types: Vec<String>,
    payload_bytes: usize,
}

pub fn aggregate_name(i: u64) -> String {
    format!("agg-{i:07}")
}

pub fn type_name(i: u64) -> String {
    format!("Type{i:02}")
}

/// The type the "read one type" workload reads.
pub const READ_TYPE: &str = "Type07";

impl Gen {
    pub fn new(seed: u64, aggregates: u64, types: u64, payload_bytes: usize) -> Gen {
        Gen {
            rng: Rng::new(seed),
            aggregates: Arc::new((0..aggregates).map(aggregate_name).collect()),
            types: (0..types).map(type_name).collect(),
            payload_bytes,
        }
    }

    /// Another generator over the same names with another seed (one per thread).
    pub fn fork(&self, seed: u64) -> Gen {
        Gen {
            rng: Rng::new(seed),
            aggregates: Arc::clone(&self.aggregates),
            types: self.types.clone(),
            payload_bytes: self.payload_bytes,
        }
    }

    pub fn item(&mut self, now_us: i64) -> Item {
        let a = self.rng.below(self.aggregates.len() as u64) as usize;
        let t = self.rng.below(self.types.len() as u64) as usize;
        let mut payload = vec![0u8; self.payload_bytes];
        self.rng.fill(&mut payload);
        let mut id = [0u8; 16];
        self.rng.fill(&mut id);
        Item {
            aggregate: self.aggregates[a].clone(),
            event: NewEvent::binary(self.types[t].clone(), payload).with_timestamp_us(now_us),
            id,
        }
    }

    pub fn batch(&mut self, n: usize) -> Vec<Item> {
        let now = now_us();
        (0..n).map(|_| self.item(now)).collect()
    }

    pub fn random_aggregate(&mut self) -> &str {
        let a = self.rng.below(self.aggregates.len() as u64) as usize;
        &self.aggregates[a]
    }
}

pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Reads the real data set: (aggregate, event) per line, in file order.
pub fn read_real(path: &Path) -> Vec<Item> {
    use std::io::BufRead;
    let file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(file));
    let mut rng = Rng::new(0xDA7A);
    let mut out = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.expect("reading the real data set");
        if line.trim().is_empty() {
            continue;
        }
        let (aggregate, event) = eventlog::json::new_event_from_json_str(&line)
            .unwrap_or_else(|e| panic!("line {}: {e}", n + 1));
        let mut id = [0u8; 16];
        rng.fill(&mut id);
        out.push(Item {
            aggregate,
            event,
            id,
        });
    }
    out
}

// ---------------------------------------------------------------------------------------
// Measurement.

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Peak resident set size of this process so far (VmHWM), bytes.
pub fn peak_rss_bytes() -> u64 {
    status_kb("VmHWM:") * 1024
}

/// Samples RssAnon (heap, not file pages) every 10 ms and keeps the highest: the peak of
/// the memory the process allocated, apart from mapped file pages that VmHWM also counts.
pub struct AnonPeak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl AnonPeak {
    pub fn start() -> AnonPeak {
        let peak = Arc::new(AtomicU64::new(status_kb("RssAnon:") * 1024));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_kb("RssAnon:") * 1024, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        AnonPeak {
            peak,
            stop,
            handle: Some(handle),
        }
    }

    pub fn peak(&self) -> u64 {
        self.peak
            .fetch_max(status_kb("RssAnon:") * 1024, Ordering::Relaxed);
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for AnonPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Allocated bytes (st_blocks × 512) of everything under `p`.
pub fn dir_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                total += dir_bytes(&e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p` quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[i.saturating_sub(1).min(sorted.len() - 1)]
}

pub fn thousands(n: f64) -> String {
    if !n.is_finite() {
        return "n/a".into();
    }
    let s = format!("{:.0}", n);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{sign}{out}")
}

// ---------------------------------------------------------------------------------------
// The machine.

pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_bytes: u64,
    pub kernel: String,
    pub dir: std::path::PathBuf,
    pub fs_type: String,
    pub device: String,
    pub mount_point: String,
    pub mount_options: String,
    pub fsync_overwrite_p50_ms: f64,
    pub fsync_overwrite_p90_ms: f64,
    pub fsync_append_p50_ms: f64,
    pub fsync_append_p90_ms: f64,
}

/// Load average and pressure stall figures.
pub fn load_now() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let load: Vec<String> = read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .map(String::from)
        .collect();
    let psi = |kind: &str| {
        read(&format!("/proc/pressure/{kind}"))
            .lines()
            .find(|l| l.starts_with("some"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|f| f.strip_prefix("avg10="))
            .map_or_else(|| "n/a".to_string(), |v| format!("{v}%"))
    };
    format!(
        "load average {} (1, 5, 15 min); pressure stall (some, avg10): cpu {}, io {}",
        load.join(" "),
        psi("cpu"),
        psi("io")
    )
}

pub fn machine(dir: &Path) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_total_bytes = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut best: Option<(usize, [String; 4])> = None;
    for l in read("/proc/mounts").lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let mp = f[1].replace("\\040", " ");
        if dir.starts_with(&mp) && best.as_ref().is_none_or(|(len, _)| mp.len() >= *len) {
            best = Some((
                mp.len(),
                [f[0].into(), mp.clone(), f[2].into(), f[3].into()],
            ));
        }
    }
    let [device, mount_point, fs_type, mount_options] = best
        .map(|(_, m)| m)
        .unwrap_or_else(|| ["?".into(), "?".into(), "unknown".into(), String::new()]);
    let (o50, o90) = fsync_latency(&dir, 50, false);
    let (a50, a90) = fsync_latency(&dir, 50, true);
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        mem_total_bytes,
        kernel,
        dir,
        fs_type,
        device,
        mount_point,
        mount_options,
        fsync_overwrite_p50_ms: o50,
        fsync_overwrite_p90_ms: o90,
        fsync_append_p50_ms: a50,
        fsync_append_p90_ms: a90,
    }
}

/// fdatasync after a 4 KiB overwrite: (p50, p90) ms of 50.
pub fn fsync_probe(dir: &Path) -> (f64, f64) {
    fsync_latency(dir, 50, false)
}

/// CPU seconds (user + system) this process has used so far.
pub fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(u.ru_utime) + t(u.ru_stime)
    }
}

/// Median and p90 in ms of `n` fdatasyncs, each after a 4 KiB write: overwriting block 0,
/// or extending the file.
fn fsync_latency(dir: &Path, n: usize, append: bool) -> (f64, f64) {
    let path = dir.join(if append {
        "fsync-probe-append"
    } else {
        "fsync-probe-overwrite"
    });
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("creating the fsync probe");
    let mut block = vec![0u8; 4096];
    Rng::new(7).fill(&mut block);
    file.write_all_at(&block, 0).expect("write");
    file.sync_all().expect("fsync");
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let off = if append { 4096 * (i as u64 + 1) } else { 0 };
        file.write_all_at(&block, off).expect("write");
        let t = Instant::now();
        file.sync_data().expect("fdatasync");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    lat.sort_by(f64::total_cmp);
    (quantile(&lat, 0.5), quantile(&lat, 0.9))
}
