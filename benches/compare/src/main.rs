//! eventlog against SQLite, sled and the raw write+fdatasync limit, on the same workloads.
//!
//! ```sh
//! cargo run --release --manifest-path benches/compare/Cargo.toml -- \
//!     [--events N] [--reps N] [--secs S] [--json FILE] [--md FILE] [--scaling]
//! ```
//!
//! Run `-- --help` for every option. Each workload of each store runs in a child process
//! of its own (this binary re-executed with a hidden `__child` subcommand), so peak RSS is
//! per store and no store's caches or threads disturb another's figures.

mod child;
mod common;
mod stores;

use common::{dir_bytes, load_now, machine, median, thousands, Machine, Rng};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const STORES: [&str; 4] = ["eventlog", "sqlite", "sled", "raw"];

struct Cfg {
    events: u64,
    aggregates: u64,
    types: u64,
    payload: usize,
    batch: usize,
    reps: usize,
    secs: f64,
    threads: Vec<usize>,
    samples: usize,
    interval_events: u64,
    batch_threads: Vec<usize>,
    threads_events: u64,
    hot_aggregates: u64,
    stores: Vec<String>,
    workloads: Vec<String>,
    real: PathBuf,
    dir: PathBuf,
    json: Option<PathBuf>,
    md: Option<PathBuf>,
    scaling: bool,
    scaling_only: bool,
    scaling_sizes: Vec<u64>,
    scaling_reps: usize,
    args: Vec<String>,
}

const HELP: &str = "eventlog-compare: eventlog vs SQLite vs sled vs the raw limit

  --events N          events in the batched append (and the store the reads and the crash
                      use); default 1,000,000
  --aggregates N      default 100,000
  --types N           default 20
  --payload BYTES     default 200
  --batch N           events per batched append; default 1,000
  --reps N            repetitions (medians are shown); default 3
  --secs S            seconds per single-event configuration; default 5
  --threads LIST      single-event appender threads; default 1,4,16
  --samples N         aggregate histories timed; default 10,000
  --interval-events N events in the Interval-durability batched append (a secondary
                      figure, not in the JSON); default --events / 5
  --batch-threads LIST
                      appender threads of the batched append from several threads at
                      once (a secondary figure, not in the JSON); default 1,4
  --threads-events N  events in that append, generated beforehand; default --events / 5
  --hot-aggregates N  aggregates of the hot workload: single-event appends from the
                      largest --threads count to only these (a secondary figure, not in
                      the JSON); default 1
  --stores LIST       default eventlog,sqlite,sled,raw
  --workloads LIST    of append (append, crash+reopen, reads, disk, memory), single,
                      import, interval, threads, hot; default all
  --real FILE         the real data set; default ../shared/data/uci_incidents.jsonl.gz
  --dir DIR           where stores are written (default $EVENTLOG_BENCH_DIR, else
                      benches/compare/target/bench; never a tmpfs)
  --json FILE         every figure as a JSON list of {workload, store, metric, value, unit}
  --md FILE           the markdown report (also printed to stdout)
  --scaling           also run eventlog's append, reopen-after-crash and replay at
                      --scaling-sizes (default 100000,1000000,10000000), --scaling-reps
                      times each (default 3)
  --scaling-only      only that
";

fn die(msg: &str) -> ! {
    eprintln!("eventlog-compare: {msg}");
    std::process::exit(2)
}

impl Cfg {
    fn parse() -> Cfg {
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut c = Cfg {
            events: 1_000_000,
            aggregates: 100_000,
            types: 20,
            payload: 200,
            batch: 1_000,
            reps: 3,
            secs: 5.0,
            threads: vec![1, 4, 16],
            samples: 10_000,
            interval_events: 0,
            batch_threads: vec![1, 4],
            threads_events: 0,
            hot_aggregates: 1,
            stores: STORES.iter().map(|s| s.to_string()).collect(),
            workloads: ["append", "single", "import", "interval", "threads", "hot"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            real: manifest.join("../../../shared/data/uci_incidents.jsonl.gz"),
            dir: std::env::var_os("EVENTLOG_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| manifest.join("target/bench")),
            json: None,
            md: None,
            scaling: false,
            scaling_only: false,
            scaling_sizes: vec![100_000, 1_000_000, 10_000_000],
            scaling_reps: 3,
            args: args.clone(),
        };
        let mut i = 0;
        while i < args.len() {
            let (flag, inline) = match args[i].split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (args[i].clone(), None),
            };
            match flag.as_str() {
                "--help" | "-h" => {
                    print!("{HELP}");
                    std::process::exit(0);
                }
                "--scaling" => {
                    c.scaling = true;
                    i += 1;
                    continue;
                }
                "--scaling-only" => {
                    c.scaling = true;
                    c.scaling_only = true;
                    i += 1;
                    continue;
                }
                "--bench" => {
                    i += 1;
                    continue;
                }
                _ => {}
            }
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .unwrap_or_else(|| die(&format!("{flag} needs a value")))
                }
            };
            let num = |v: &str| -> u64 {
                v.replace(['_', ','], "")
                    .parse()
                    .unwrap_or_else(|_| die(&format!("{flag}: not a number: {v}")))
            };
            let list = |v: &str| -> Vec<String> { v.split(',').map(String::from).collect() };
            match flag.as_str() {
                "--events" => c.events = num(&value).max(1),
                "--aggregates" => c.aggregates = num(&value).max(1),
                "--types" => c.types = num(&value).clamp(8, 99),
                "--payload" => c.payload = num(&value) as usize,
                "--batch" => c.batch = num(&value).max(1) as usize,
                "--reps" => c.reps = num(&value).max(1) as usize,
                "--secs" => {
                    c.secs = value
                        .parse()
                        .unwrap_or_else(|_| die(&format!("--secs: not a number: {value}")))
                }
                "--threads" => {
                    c.threads = value.split(',').map(|t| num(t).max(1) as usize).collect()
                }
                "--samples" => c.samples = num(&value).max(1) as usize,
                "--interval-events" => c.interval_events = num(&value).max(1),
                "--threads-events" => c.threads_events = num(&value).max(1),
                "--hot-aggregates" => c.hot_aggregates = num(&value).max(1),
                "--batch-threads" => {
                    c.batch_threads = value.split(',').map(|t| num(t).max(1) as usize).collect()
                }
                "--stores" => {
                    c.stores = list(&value);
                    for s in &c.stores {
                        if !STORES.contains(&s.as_str()) {
                            die(&format!("unknown store {s}"));
                        }
                    }
                }
                "--workloads" => c.workloads = list(&value),
                "--real" => c.real = PathBuf::from(value),
                "--dir" => c.dir = PathBuf::from(value),
                "--json" => c.json = Some(PathBuf::from(value)),
                "--md" => c.md = Some(PathBuf::from(value)),
                "--scaling-sizes" => {
                    c.scaling_sizes = value.split(',').map(num).collect();
                }
                "--scaling-reps" => c.scaling_reps = num(&value).max(1) as usize,
                _ => die(&format!("unknown option {flag} (see --help)")),
            }
            i += 1;
        }
        if c.interval_events == 0 {
            c.interval_events = (c.events / 5).max(c.batch as u64);
        }
        c.interval_events = c.interval_events.min(c.events);
        if c.threads_events == 0 {
            c.threads_events = (c.events / 5).max(c.batch as u64);
        }
        c
    }

    fn runs(&self, w: &str) -> bool {
        !self.scaling_only && self.workloads.iter().any(|x| x == w)
    }

    fn has(&self, store: &str) -> bool {
        self.stores.iter().any(|s| s == store)
    }

    fn command(&self) -> String {
        let mut s = String::from("cargo run --release --manifest-path benches/compare/Cargo.toml");
        if !self.args.is_empty() {
            s.push_str(" -- ");
            s.push_str(&self.args.join(" "));
        }
        s
    }

    /// Appender threads of the hot workload: the largest single-event count.
    fn hot_threads(&self) -> usize {
        self.threads.iter().copied().max().unwrap_or(16)
    }

    /// Arguments of the single-event child: `threads` appending for `--secs` seconds.
    fn single_args(
        &self,
        seed: u64,
        store: &str,
        dir: &std::path::Path,
        threads: usize,
        stage: &std::path::Path,
    ) -> Vec<String> {
        let mut a = self.gen_args(seed);
        a.push(format!("store={store}"));
        a.push(format!("dir={}", dir.display()));
        a.push(format!("threads={threads}"));
        a.push(format!("secs={}", self.secs));
        a.push(format!("stage={}", stage.display()));
        a
    }

    fn gen_args(&self, seed: u64) -> Vec<String> {
        vec![
            format!("seed={seed}"),
            format!("aggregates={}", self.aggregates),
            format!("types={}", self.types),
            format!("payload={}", self.payload),
            format!("batch={}", self.batch),
        ]
    }
}

// ---------------------------------------------------------------------------------------
// Children.

type Kv = BTreeMap<String, String>;

fn parse_result(line: &str) -> Kv {
    line.trim_start_matches("RESULT")
        .split_whitespace()
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn child_cmd(kind: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.arg("__child").arg(kind).args(args);
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd
}

/// Runs a child to the end; returns its RESULT.
fn run_child(kind: &str, args: &[String]) -> Kv {
    let out = child_cmd(kind, args)
        .output()
        .unwrap_or_else(|e| die(&format!("spawning child {kind}: {e}")));
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        die(&format!("child {kind} {args:?} failed: {}", out.status));
    }
    match text.lines().rev().find(|l| l.starts_with("RESULT")) {
        Some(l) => parse_result(l),
        None => die(&format!("child {kind} {args:?} printed no result")),
    }
}

/// Runs an appending child until it reports that its `events` are stored, lets it go on
/// appending for a random 20..120 ms, then SIGKILLs it. Returns its RESULT.
fn run_append_then_kill(args: &[String], rng: &mut Rng) -> Kv {
    let mut child = child_cmd("append", args)
        .spawn()
        .unwrap_or_else(|e| die(&format!("spawning append child: {e}")));
    let stdout = child.stdout.take().expect("piped");
    let mut result = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        if line.starts_with("RESULT") {
            result = Some(parse_result(&line));
            break;
        }
    }
    let Some(result) = result else {
        let _ = child.kill();
        let status = child.wait();
        die(&format!("append child ended without a result: {status:?}"));
    };
    std::thread::sleep(std::time::Duration::from_millis(20 + rng.below(100)));
    // SAFETY: kill(2) on the pid of our own child, which has not been waited for yet.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill failed");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the append child was killed mid-append");
    result
}

fn f(kv: &Kv, k: &str) -> f64 {
    kv.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| die(&format!("result has no {k}: {kv:?}")))
}

// ---------------------------------------------------------------------------------------
// Results.

/// (workload, store, metric) -> (values per rep, unit)
#[derive(Default)]
struct Results {
    figures: BTreeMap<(String, String, String), (Vec<f64>, String)>,
    /// Extra per-rep figures for the report only (not in the JSON).
    extra: BTreeMap<(String, String), Vec<f64>>,
    /// The load when each repetition started.
    loads: Vec<String>,
}

impl Results {
    fn add(&mut self, workload: &str, store: &str, metric: &str, value: f64, unit: &str) {
        self.figures
            .entry((workload.into(), store.into(), metric.into()))
            .or_insert_with(|| (Vec::new(), unit.into()))
            .0
            .push(value);
    }

    fn extra(&mut self, key: &str, store: &str, value: f64) {
        self.extra
            .entry((key.into(), store.into()))
            .or_default()
            .push(value);
    }

    fn get(&self, workload: &str, store: &str, metric: &str) -> Option<f64> {
        self.figures
            .get(&(workload.into(), store.into(), metric.into()))
            .map(|(v, _)| median(v))
    }

    fn get_extra(&self, key: &str, store: &str) -> Option<f64> {
        self.extra
            .get(&(key.into(), store.into()))
            .map(|v| median(v))
    }

    fn json(&self) -> String {
        let rows: Vec<serde_json::Value> = self
            .figures
            .iter()
            .map(|((w, s, m), (v, u))| {
                serde_json::json!({
                    "workload": w,
                    "store": s,
                    "metric": m,
                    "value": median(v),
                    "unit": u,
                })
            })
            .collect();
        serde_json::to_string_pretty(&rows).expect("json") + "\n"
    }
}

fn progress(started: &Instant, msg: &str) {
    eprintln!("[{:7.1} s] {msg}", started.elapsed().as_secs_f64());
}

fn fresh_dir(base: &Path, name: &str) -> PathBuf {
    let d = base.join(name);
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn free_bytes(p: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return 0;
        }
        s.f_bavail as u64 * s.f_frsize as u64
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("__child") {
        let kind = argv.get(2).cloned().unwrap_or_default();
        child::main(&kind, &argv[3..]);
        return;
    }
    let cfg = Cfg::parse();
    std::fs::create_dir_all(&cfg.dir)
        .unwrap_or_else(|e| die(&format!("creating {}: {e}", cfg.dir.display())));
    let base = tempfile::Builder::new()
        .prefix("compare-")
        .tempdir_in(&cfg.dir)
        .expect("bench dir");
    let started = Instant::now();
    let load_start = load_now();
    progress(&started, "measuring the machine (fdatasync latency) ...");
    let m = machine(base.path());
    if m.fs_type == "tmpfs" || m.fs_type == "ramfs" {
        eprintln!(
            "WARNING: {} is on {}: fdatasync is free there. Use --dir on a real disk.",
            m.dir.display(),
            m.fs_type
        );
    }
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut res = Results::default();
    let mut notes: Vec<String> = Vec::new();
    if !cfg.scaling_only {
        run_main(&cfg, base.path(), &started, &mut res, &mut notes);
    }
    let scaling_md = if cfg.scaling {
        run_scaling(&cfg, base.path(), &started)
    } else {
        String::new()
    };
    let load_end = load_now();
    let fsync_end = common::fsync_probe(base.path());
    let md = report(
        &cfg,
        &m,
        &res,
        &notes,
        &scaling_md,
        &date,
        &load_start,
        &load_end,
        fsync_end,
        started.elapsed().as_secs_f64(),
    );
    print!("{md}");
    if let Some(p) = &cfg.md {
        std::fs::write(p, &md).unwrap_or_else(|e| die(&format!("writing {}: {e}", p.display())));
        progress(&started, &format!("wrote {}", p.display()));
    }
    if let Some(p) = &cfg.json {
        std::fs::write(p, res.json())
            .unwrap_or_else(|e| die(&format!("writing {}: {e}", p.display())));
        progress(&started, &format!("wrote {}", p.display()));
    }
}

fn run_main(cfg: &Cfg, base: &Path, started: &Instant, res: &mut Results, notes: &mut Vec<String>) {
    let mut rng = Rng::new(0xC0FFEE);
    // The raw store writes eventlog's own framed bytes: stage them once.
    let stage_syn = base.join("stage-synthetic");
    let stage_real = base.join("stage-real");
    let real_present = cfg.real.exists();
    if !real_present && cfg.runs("import") {
        notes.push(format!(
            "The real data set {} is absent: the import_real row is SKIPPED.",
            cfg.real.display()
        ));
        eprintln!("{}", notes.last().unwrap());
    }
    if cfg.has("raw") {
        if cfg.runs("append") || cfg.runs("single") || cfg.runs("interval") {
            progress(
                started,
                "staging eventlog's framed bytes for raw (synthetic) ...",
            );
            let mut a = cfg.gen_args(999);
            a.push("kind=synthetic".into());
            a.push(format!("events={}", cfg.events));
            a.push(format!("out={}", stage_syn.display()));
            run_child("stage", &a);
        }
        if cfg.runs("import") && real_present {
            progress(
                started,
                "staging eventlog's framed bytes for raw (real data) ...",
            );
            run_child(
                "stage",
                &[
                    "kind=real".into(),
                    format!("file={}", cfg.real.display()),
                    format!("batch={}", cfg.batch),
                    format!("out={}", stage_real.display()),
                ],
            );
        }
    }
    for rep in 0..cfg.reps {
        let seed = 1 + rep as u64;
        let tag = format!("rep {}/{}", rep + 1, cfg.reps);
        res.loads.push(format!("{tag}: {}", load_now()));
        if cfg.runs("append") {
            for store in &cfg.stores {
                let dir = fresh_dir(base, &format!("{store}-append"));
                let mut a = cfg.gen_args(seed);
                a.push(format!("store={store}"));
                a.push(format!("dir={}", dir.display()));
                a.push(format!("events={}", cfg.events));
                a.push("durability=sync".into());
                progress(
                    started,
                    &format!(
                        "{tag}: {store}: batched durable append of {} ...",
                        thousands(cfg.events as f64)
                    ),
                );
                let r = if store == "raw" {
                    a.push(format!("stage={}", stage_syn.display()));
                    run_child("append", &a)
                } else {
                    a.push("continue=1".into());
                    run_append_then_kill(&a, &mut rng)
                };
                let n = f(&r, "events");
                res.add(
                    "append_batched",
                    store,
                    "events_per_s",
                    n / f(&r, "secs"),
                    "events/s",
                );
                res.add("memory", store, "peak_rss_bytes", f(&r, "vmhwm"), "bytes");
                res.extra("anon_peak", store, f(&r, "anon_peak"));
                res.extra("append_cpu_s", store, f(&r, "cpu_secs"));
                progress(
                    started,
                    &format!(
                        "  {:.0} events/s, peak RSS {:.0} MB",
                        n / f(&r, "secs"),
                        f(&r, "vmhwm") / 1e6
                    ),
                );
                if store != "raw" {
                    progress(
                        started,
                        &format!("{tag}: {store}: reopen after SIGKILL ..."),
                    );
                    let agg = r.get("last_agg").cloned().unwrap_or_default();
                    let o = run_child(
                        "reopen",
                        &[
                            format!("store={store}"),
                            format!("dir={}", dir.display()),
                            format!("agg={agg}"),
                        ],
                    );
                    let stored = f(&o, "stored");
                    assert!(
                        stored >= n,
                        "{store}: {stored} events after the crash, {n} were acknowledged"
                    );
                    assert!(
                        f(&o, "read") >= 1.0,
                        "{store}: the last aggregate read back"
                    );
                    res.add("reopen_after_crash", store, "seconds", f(&o, "secs"), "s");
                    res.extra("stored_after_crash", store, stored);
                    progress(
                        started,
                        &format!("  {:.3} s ({} events stored)", f(&o, "secs"), stored),
                    );
                }
                progress(
                    started,
                    &format!("{tag}: {store}: reads (replay, one type, aggregate histories) ..."),
                );
                let mut a = cfg.gen_args(seed + 100);
                a.push(format!("store={store}"));
                a.push(format!("dir={}", dir.display()));
                a.push(format!("samples={}", cfg.samples));
                let r = run_child("reads", &a);
                let stored = f(&r, "replay_events");
                res.add(
                    "replay",
                    store,
                    "events_per_s",
                    stored / f(&r, "replay_secs"),
                    "events/s",
                );
                if store != "raw" {
                    res.add(
                        "read_type",
                        store,
                        "events_per_s",
                        f(&r, "type_events") / f(&r, "type_secs"),
                        "events/s",
                    );
                    res.add("read_aggregate", store, "p50_us", f(&r, "p50_us"), "us");
                    res.add("read_aggregate", store, "p99_us", f(&r, "p99_us"), "us");
                    res.extra("agg_events_mean", store, f(&r, "agg_events_mean"));
                    res.extra("type_events", store, f(&r, "type_events"));
                }
                res.add(
                    "disk",
                    store,
                    "bytes_per_event",
                    f(&r, "disk_bytes") / stored,
                    "bytes/event",
                );
                if store == "eventlog" {
                    res.extra(
                        "eventlog_log_bytes_per_event",
                        store,
                        dir_bytes(&dir.join("log")) as f64 / stored,
                    );
                    res.extra(
                        "eventlog_index_bytes_per_event",
                        store,
                        dir_bytes(&dir.join("index")) as f64 / stored,
                    );
                }
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        if cfg.runs("single") {
            for &t in &cfg.threads {
                for store in &cfg.stores {
                    let dir = fresh_dir(base, &format!("{store}-single"));
                    progress(
                        started,
                        &format!(
                            "{tag}: {store}: single-event durable appends, {t} threads, {} s ...",
                            cfg.secs
                        ),
                    );
                    let a = cfg.single_args(seed + 200, store, &dir, t, &stage_syn);
                    let r = run_child("single", &a);
                    let w = format!("append_single_{t}t");
                    let eps = f(&r, "events") / f(&r, "secs");
                    res.add(&w, store, "events_per_s", eps, "events/s");
                    res.add(&w, store, "p50_us", f(&r, "p50_us"), "us");
                    res.add(&w, store, "p99_us", f(&r, "p99_us"), "us");
                    res.extra(&format!("{w}_max_us"), store, f(&r, "max_us"));
                    progress(
                        started,
                        &format!(
                            "  {eps:.0} events/s, p99 {:.0} us, max {:.0} us",
                            f(&r, "p99_us"),
                            f(&r, "max_us")
                        ),
                    );
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        if cfg.runs("import") && real_present {
            for store in &cfg.stores {
                let dir = fresh_dir(base, &format!("{store}-import"));
                progress(
                    started,
                    &format!("{tag}: {store}: import of the real data set ..."),
                );
                let r = run_child(
                    "import",
                    &[
                        format!("store={store}"),
                        format!("dir={}", dir.display()),
                        format!("file={}", cfg.real.display()),
                        format!("batch={}", cfg.batch),
                        format!("stage={}", stage_real.display()),
                    ],
                );
                let eps = f(&r, "events") / f(&r, "secs");
                res.add("import_real", store, "events_per_s", eps, "events/s");
                res.extra("import_real_events", store, f(&r, "events"));
                if let Some(d) = r.get("disk_bytes").and_then(|v| v.parse::<f64>().ok()) {
                    res.extra("import_real_bytes_per_event", store, d / f(&r, "events"));
                }
                progress(started, &format!("  {eps:.0} events/s"));
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        if cfg.runs("threads") {
            for store in cfg.stores.iter().filter(|s| *s != "raw") {
                for &t in &cfg.batch_threads {
                    let dir = fresh_dir(base, &format!("{store}-threads"));
                    progress(
                        started,
                        &format!(
                            "{tag}: {store}: batched append from {t} thread{} at once ...",
                            plural(t as u64)
                        ),
                    );
                    let mut a = cfg.gen_args(seed + 400);
                    a.push(format!("store={store}"));
                    a.push(format!("dir={}", dir.display()));
                    a.push(format!("events={}", cfg.threads_events));
                    a.push(format!("threads={t}"));
                    let r = run_child("append_threads", &a);
                    let eps = f(&r, "events") / f(&r, "secs");
                    res.extra(&format!("threads_append_batched_{t}t"), store, eps);
                    res.extra(
                        &format!("threads_cpu_per_million_{t}t"),
                        store,
                        f(&r, "cpu_secs") / f(&r, "events") * 1e6,
                    );
                    progress(started, &format!("  {eps:.0} events/s"));
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        if cfg.runs("hot") {
            let t = cfg.hot_threads();
            for store in cfg.stores.iter().filter(|s| *s != "raw") {
                let dir = fresh_dir(base, &format!("{store}-hot"));
                progress(
                    started,
                    &format!(
                        "{tag}: {store}: single-event durable appends, {t} threads, {} aggregate{}, {} s ...",
                        cfg.hot_aggregates,
                        plural(cfg.hot_aggregates),
                        cfg.secs
                    ),
                );
                let mut a = cfg.single_args(seed + 500, store, &dir, t, &stage_syn);
                // Later arguments win: the same single-event child, on few aggregates.
                a.push(format!("aggregates={}", cfg.hot_aggregates));
                let r = run_child("single", &a);
                let eps = f(&r, "events") / f(&r, "secs");
                res.extra("hot_append_single", store, eps);
                res.extra("hot_append_single_p99_us", store, f(&r, "p99_us"));
                progress(
                    started,
                    &format!("  {eps:.0} events/s, p99 {:.0} us", f(&r, "p99_us")),
                );
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        if cfg.runs("interval") {
            for store in &cfg.stores {
                let dir = fresh_dir(base, &format!("{store}-interval"));
                progress(
                    started,
                    &format!("{tag}: {store}: batched append, Interval durability ..."),
                );
                let mut a = cfg.gen_args(seed + 300);
                a.push(format!("store={store}"));
                a.push(format!("dir={}", dir.display()));
                a.push(format!("events={}", cfg.interval_events));
                a.push("durability=interval".into());
                a.push(format!("stage={}", stage_syn.display()));
                let r = run_child("append", &a);
                let eps = f(&r, "events") / f(&r, "secs");
                res.extra("interval_append_batched", store, eps);
                progress(started, &format!("  {eps:.0} events/s"));
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scaling.

struct ScalePoint {
    n: u64,
    append_secs: f64,
    append_vmhwm: f64,
    append_anon: f64,
    reopen_secs: f64,
    replay_secs: f64,
    replay_vmhwm: f64,
    replay_anon: f64,
    bytes_per_event: f64,
}

fn run_scaling(cfg: &Cfg, base: &Path, started: &Instant) -> String {
    let mut rng = Rng::new(0x5CA1E);
    let mut points: Vec<ScalePoint> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for &n in &cfg.scaling_sizes {
        // About 330 bytes per event on disk, plus headroom.
        let need = n * 330 * 2 + (2 << 30);
        let free = free_bytes(base);
        if free < need {
            let msg = format!(
                "{} events SKIPPED: {:.1} GB free on the bench disk, {:.1} GB wanted",
                thousands(n as f64),
                free as f64 / 1e9,
                need as f64 / 1e9
            );
            eprintln!("{msg}");
            skipped.push(msg);
            continue;
        }
        let mut reps: Vec<ScalePoint> = Vec::new();
        for rep in 0..cfg.scaling_reps {
            let tag = format!(
                "scaling {} rep {}/{}",
                thousands(n as f64),
                rep + 1,
                cfg.scaling_reps
            );
            let dir = fresh_dir(base, "scaling");
            let mut a = cfg.gen_args(7000 + rep as u64);
            a.push("store=eventlog".into());
            a.push(format!("dir={}", dir.display()));
            a.push(format!("events={n}"));
            a.push("durability=sync".into());
            a.push("continue=1".into());
            progress(started, &format!("{tag}: append ..."));
            let r = run_append_then_kill(&a, &mut rng);
            progress(
                started,
                &format!(
                    "{tag}: {:.0} events/s, VmHWM {:.0} MB; reopen after SIGKILL ...",
                    n as f64 / f(&r, "secs"),
                    f(&r, "vmhwm") / 1e6
                ),
            );
            let o = run_child(
                "reopen",
                &[
                    "store=eventlog".into(),
                    format!("dir={}", dir.display()),
                    format!("agg={}", r.get("last_agg").cloned().unwrap_or_default()),
                ],
            );
            assert!(f(&o, "stored") >= n as f64);
            progress(
                started,
                &format!("{tag}: reopen {:.3} s; replay ...", f(&o, "secs")),
            );
            let mut a = cfg.gen_args(1);
            a.push("store=eventlog".into());
            a.push(format!("dir={}", dir.display()));
            a.push("samples=1".into());
            a.push("only=replay".into());
            let p = run_child("reads", &a);
            let stored = f(&p, "replay_events");
            reps.push(ScalePoint {
                n,
                append_secs: f(&r, "secs"),
                append_vmhwm: f(&r, "vmhwm"),
                append_anon: f(&r, "anon_peak"),
                reopen_secs: f(&o, "secs"),
                replay_secs: f(&p, "replay_secs") * n as f64 / stored,
                replay_vmhwm: f(&p, "vmhwm"),
                replay_anon: f(&p, "anon_peak"),
                bytes_per_event: f(&p, "disk_bytes") / stored,
            });
            let _ = std::fs::remove_dir_all(&dir);
        }
        let med = |g: fn(&ScalePoint) -> f64| median(&reps.iter().map(g).collect::<Vec<_>>());
        points.push(ScalePoint {
            n,
            append_secs: med(|p| p.append_secs),
            append_vmhwm: med(|p| p.append_vmhwm),
            append_anon: med(|p| p.append_anon),
            reopen_secs: med(|p| p.reopen_secs),
            replay_secs: med(|p| p.replay_secs),
            replay_vmhwm: med(|p| p.replay_vmhwm),
            replay_anon: med(|p| p.replay_anon),
            bytes_per_event: med(|p| p.bytes_per_event),
        });
    }
    scaling_report(cfg, &points, &skipped)
}

/// Least-squares slope of log(y) against log(x): 1 means linear, below 1 sublinear.
fn loglog_slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return f64::NAN;
    }
    let lx: Vec<f64> = xs.iter().map(|x| x.ln()).collect();
    let ly: Vec<f64> = ys.iter().map(|y| y.ln()).collect();
    let mx = lx.iter().sum::<f64>() / n;
    let my = ly.iter().sum::<f64>() / n;
    let cov: f64 = lx.iter().zip(&ly).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = lx.iter().map(|x| (x - mx) * (x - mx)).sum();
    cov / var
}

fn scaling_report(cfg: &Cfg, pts: &[ScalePoint], skipped: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Scaling: eventlog append, reopen and replay against the number of events\n"
    );
    let _ = writeln!(
        s,
        "Same workload ({} aggregates, {} types, {} B payload, appends of {}, `Durability::Sync`), \
         median of {} run(s) per size; each size in fresh child processes (append → SIGKILL \
         mid-append → reopen → replay). VmHWM counts mapped file pages too (replay reads the \
         log through memory maps); \"heap\" is the peak of RssAnon sampled every 10 ms.\n",
        thousands(cfg.aggregates as f64),
        cfg.types,
        cfg.payload,
        thousands(cfg.batch as f64),
        cfg.scaling_reps
    );
    let _ = writeln!(s, "| events | append s | append events/s | µs/event | append VmHWM MB | append heap MB | reopen after crash s | replay s | replay events/s | replay VmHWM MB | replay heap MB | disk B/event |");
    let _ = writeln!(
        s,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for p in pts {
        let _ = writeln!(
            s,
            "| {} | {:.2} | {} | {:.2} | {:.0} | {:.0} | {:.3} | {:.3} | {} | {:.0} | {:.0} | {:.0} |",
            thousands(p.n as f64),
            p.append_secs,
            thousands(p.n as f64 / p.append_secs),
            p.append_secs * 1e6 / p.n as f64,
            p.append_vmhwm / 1e6,
            p.append_anon / 1e6,
            p.reopen_secs,
            p.replay_secs,
            thousands(p.n as f64 / p.replay_secs),
            p.replay_vmhwm / 1e6,
            p.replay_anon / 1e6,
            p.bytes_per_event
        );
    }
    for m in skipped {
        let _ = writeln!(s, "\n{m}");
    }
    if pts.len() >= 2 {
        let xs: Vec<f64> = pts.iter().map(|p| p.n as f64).collect();
        let slope =
            |g: fn(&ScalePoint) -> f64| loglog_slope(&xs, &pts.iter().map(g).collect::<Vec<_>>());
        let verdict = |k: f64| {
            if k <= 1.1 {
                "linear or better"
            } else {
                "FASTER THAN LINEAR"
            }
        };
        let (sa, sr, sm, sh, so) = (
            slope(|p| p.append_secs),
            slope(|p| p.replay_secs),
            slope(|p| p.append_vmhwm),
            slope(|p| p.append_anon),
            slope(|p| p.reopen_secs),
        );
        let _ = writeln!(s, "\nFit: least-squares slope of log(y) on log(events) (1.0 = linear, < 1 sublinear, > 1 superlinear):\n");
        let _ = writeln!(s, "- append time: **{sa:.2}** ({})", verdict(sa));
        let _ = writeln!(s, "- replay time: **{sr:.2}** ({})", verdict(sr));
        let _ = writeln!(
            s,
            "- peak RSS during the append (VmHWM): **{sm:.2}** ({})",
            verdict(sm)
        );
        let _ = writeln!(
            s,
            "- peak heap during the append: **{sh:.2}** ({})",
            verdict(sh)
        );
        let _ = writeln!(s, "- reopen after a crash: {so:.2}");
        if let Some(p) = pts.iter().find(|p| p.n == 10_000_000) {
            let _ =
                writeln!(
                s,
                "\nGoal: reopen after a crash with 10,000,000 events under 0.5 s: **{:.3} s, {}**.",
                p.reopen_secs,
                if p.reopen_secs < 0.5 { "met" } else { "NOT met" }
            );
        }
    }
    s.push('\n');
    s
}

// ---------------------------------------------------------------------------------------
// The report.

fn fmt_value(metric: &str, v: Option<f64>) -> String {
    match v {
        None => "—".into(),
        Some(v) if !v.is_finite() => "—".into(),
        Some(v) => match metric {
            "events_per_s" | "bytes_per_event" => thousands(v),
            "p50_us" | "p99_us" => format!("{v:.1} µs"),
            "seconds" => format!("{v:.3} s"),
            "peak_rss_bytes" => format!("{:.0} MB", v / 1e6),
            _ => format!("{v}"),
        },
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() && b != 0.0 => {
            let r = a / b;
            if r >= 100.0 {
                format!("{r:.0}×")
            } else if r >= 10.0 {
                format!("{r:.1}×")
            } else {
                format!("{r:.2}×")
            }
        }
        _ => "—".into(),
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    cfg: &Cfg,
    m: &Machine,
    res: &Results,
    notes: &[String],
    scaling_md: &str,
    date: &str,
    load_start: &str,
    load_end: &str,
    fsync_end: (f64, f64),
    total_secs: f64,
) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "# eventlog against SQLite, sled and the raw limit\n");
    let _ = writeln!(w, "Made by `{}` (run from the repository root) on {date}, in {:.0} s. The comparison crate is `benches/compare/`, a workspace of its own, so SQLite and the rest stay out of the library's build; `-- --help` lists its options.\n", cfg.command(), total_secs);
    let _ = writeln!(w, "## Machine\n");
    let _ = writeln!(w, "- CPUs: {} ({})", m.cpus, m.cpu_model);
    let _ = writeln!(
        w,
        "- memory: {:.1} GiB",
        m.mem_total_bytes as f64 / (1u64 << 30) as f64
    );
    let _ = writeln!(w, "- kernel: {}", m.kernel);
    let _ = writeln!(
        w,
        "- filesystem: **{}** on {} (mounted at {}, {}); bench files under {}",
        m.fs_type,
        m.device,
        m.mount_point,
        m.mount_options,
        m.dir.display()
    );
    let _ = writeln!(
        w,
        "- fdatasync latency measured at start: **{:.3} ms** after a 4 KiB overwrite (p90 {:.3} ms), **{:.3} ms** after a 4 KiB append that grows the file (p90 {:.3} ms); 50 each",
        m.fsync_overwrite_p50_ms, m.fsync_overwrite_p90_ms, m.fsync_append_p50_ms, m.fsync_append_p90_ms
    );
    let _ = writeln!(
        w,
        "- fdatasync latency measured again at the end: {:.3} ms after a 4 KiB overwrite (p90 {:.3} ms). On this virtual disk it varies with the other processes' I/O (from about 0.07 ms to 4+ ms), which moves every durable-append figure.",
        fsync_end.0, fsync_end.1
    );
    let _ = writeln!(w, "- at start: {load_start}");
    let _ = writeln!(w, "- at end: {load_end}");
    let _ = writeln!(
        w,
        "- other processes (tests, fuzzers) may share the 2 cores and the disk: the load figures above say how busy the machine was.\n"
    );
    if !cfg.scaling_only {
        let _ = writeln!(w, "## Results\n");
        let _ = writeln!(
            w,
            "{} events of {} B payload, {} aggregates, {} types; batched appends of {}; single-event appends {} s per configuration; {} aggregate histories timed. \
             Each figure is the **median of {} repetitions**; ratio = eventlog ÷ peer (for µs, s, bytes and RSS lower is better, for events/s higher is better).\n",
            thousands(cfg.events as f64),
            cfg.payload,
            thousands(cfg.aggregates as f64),
            cfg.types,
            thousands(cfg.batch as f64),
            cfg.secs,
            thousands(cfg.samples as f64),
            cfg.reps
        );
        let _ = writeln!(w, "| workload | metric | eventlog | SQLite | sled | raw | eventlog ÷ SQLite | eventlog ÷ sled | eventlog ÷ raw |");
        let _ = writeln!(w, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        let mut rows: Vec<(&str, &str, &str)> = vec![(
            "append_batched",
            "events_per_s",
            "batched durable append (1,000 per append)",
        )];
        let single: Vec<(String, String)> = cfg
            .threads
            .iter()
            .map(|t| {
                (
                    format!("append_single_{t}t"),
                    format!(
                        "single-event durable append, {t} thread{}",
                        plural(*t as u64)
                    ),
                )
            })
            .collect();
        for (wk, label) in &single {
            rows.push((wk.as_str(), "events_per_s", label.as_str()));
        }
        rows.extend([
            (
                "read_aggregate",
                "p50_us",
                "aggregate history read (warm) p50",
            ),
            (
                "read_aggregate",
                "p99_us",
                "aggregate history read (warm) p99",
            ),
            ("read_type", "events_per_s", "read one type from the start"),
            ("replay", "events_per_s", "full replay from seq 0"),
            (
                "reopen_after_crash",
                "seconds",
                "reopen after SIGKILL mid-append, until the first read answers",
            ),
            (
                "disk",
                "bytes_per_event",
                "disk bytes per event (log + indexes, allocated blocks)",
            ),
            (
                "memory",
                "peak_rss_bytes",
                "peak RSS during the batched append (VmHWM of its process)",
            ),
            (
                "import_real",
                "events_per_s",
                "import of the real data set (batches of 1,000)",
            ),
        ]);
        for (wk, metric, label) in rows {
            let v = |store: &str| res.get(wk, store, metric);
            if STORES.iter().all(|s| v(s).is_none()) {
                if wk == "import_real" && notes.iter().any(|n| n.contains("SKIPPED")) {
                    let _ = writeln!(w, "| {label} | — | SKIPPED: data set absent | | | | | | |");
                }
                continue;
            }
            let _ = writeln!(
                w,
                "| {label} | `{wk}` `{metric}` | {} | {} | {} | {} | {} | {} | {} |",
                fmt_value(metric, v("eventlog")),
                fmt_value(metric, v("sqlite")),
                fmt_value(metric, v("sled")),
                fmt_value(metric, v("raw")),
                ratio(v("eventlog"), v("sqlite")),
                ratio(v("eventlog"), v("sled")),
                ratio(v("eventlog"), v("raw")),
            );
        }
        let _ = writeln!(w);
        for n in notes {
            let _ = writeln!(w, "**Note:** {n}\n");
        }
        goals(w, cfg, res);
        details(w, cfg, res);
    }
    durability_text(w);
    w.push_str(scaling_md);
    s
}

fn goals(w: &mut String, cfg: &Cfg, res: &Results) {
    let g = |wk: &str, st: &str, m: &str| res.get(wk, st, m);
    let _ = writeln!(w, "## Goals\n");
    if cfg.events != 1_000_000 {
        let _ = writeln!(
            w,
            "_This run used {} events; the goals are stated for 1,000,000._\n",
            thousands(cfg.events as f64)
        );
    }
    let _ = writeln!(w, "| goal | bar | measured | verdict |");
    let _ = writeln!(w, "|---|---|---|---|");
    let mut line = |goal: &str,
                    bar: &str,
                    measured: Option<f64>,
                    ok: &dyn Fn(f64) -> bool,
                    shown: &dyn Fn(f64) -> String| {
        let (m, v) = match measured {
            Some(x) if x.is_finite() => (shown(x), if ok(x) { "met" } else { "**NOT met**" }),
            _ => ("not measured".to_string(), "—"),
        };
        let _ = writeln!(w, "| {goal} | {bar} | {m} | {v} |");
    };
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(a / b),
        _ => None,
    };
    line(
        "batched durable append",
        "eventlog ≥ 0.80 × raw",
        div(
            g("append_batched", "eventlog", "events_per_s"),
            g("append_batched", "raw", "events_per_s"),
        ),
        &|r| r >= 0.8,
        &|r| format!("{r:.2} × raw"),
    );
    line(
        "16-thread single-event durable append",
        "eventlog ≥ 8 × SQLite",
        div(
            g("append_single_16t", "eventlog", "events_per_s"),
            g("append_single_16t", "sqlite", "events_per_s"),
        ),
        &|r| r >= 8.0,
        &|r| format!("{r:.1} × SQLite"),
    );
    line(
        "aggregate history read p99",
        "eventlog ≤ 0.3 × SQLite",
        div(
            g("read_aggregate", "eventlog", "p99_us"),
            g("read_aggregate", "sqlite", "p99_us"),
        ),
        &|r| r <= 0.3,
        &|r| format!("{r:.2} × SQLite"),
    );
    line(
        "full replay",
        "eventlog ≥ 3 × SQLite",
        div(
            g("replay", "eventlog", "events_per_s"),
            g("replay", "sqlite", "events_per_s"),
        ),
        &|r| r >= 3.0,
        &|r| format!("{r:.1} × SQLite"),
    );
    line(
        "read by type",
        "eventlog ≥ 4 × SQLite",
        div(
            g("read_type", "eventlog", "events_per_s"),
            g("read_type", "sqlite", "events_per_s"),
        ),
        &|r| r >= 4.0,
        &|r| format!("{r:.1} × SQLite"),
    );
    line(
        "reopen after a crash, 1,000,000 events",
        "< 0.2 s",
        g("reopen_after_crash", "eventlog", "seconds"),
        &|s| s < 0.2,
        &|s| format!("{s:.3} s"),
    );
    line(
        "disk bytes per event, log + indexes",
        "eventlog ≤ SQLite",
        div(
            g("disk", "eventlog", "bytes_per_event"),
            g("disk", "sqlite", "bytes_per_event"),
        ),
        &|r| r <= 1.0,
        &|r| {
            format!(
                "{:.0} vs {:.0} B ({r:.2} × SQLite)",
                g("disk", "eventlog", "bytes_per_event").unwrap_or(f64::NAN),
                g("disk", "sqlite", "bytes_per_event").unwrap_or(f64::NAN)
            )
        },
    );
    line(
        "peak RSS during the 1,000,000-event append",
        "< 150 MB",
        g("memory", "eventlog", "peak_rss_bytes"),
        &|b| b < 150e6,
        &|b| format!("{:.0} MB", b / 1e6),
    );
    let _ = writeln!(
        w,
        "\nThe 10,000,000-event reopen goal is checked in the scaling section (when run).\n"
    );
}

fn details(w: &mut String, cfg: &Cfg, res: &Results) {
    let _ = writeln!(w, "## Details\n");
    if !cfg.threads.is_empty() && cfg.runs("single") {
        let _ = writeln!(w, "Single-event durable appends: latency of each append (medians over the repetitions of each run's p50/p99/max):\n");
        let _ = writeln!(w, "| threads | store | events/s | p50 | p99 | max |");
        let _ = writeln!(w, "|---:|---|---:|---:|---:|---:|");
        for t in &cfg.threads {
            let wk = format!("append_single_{t}t");
            for st in STORES {
                let Some(eps) = res.get(&wk, st, "events_per_s") else {
                    continue;
                };
                let _ = writeln!(
                    w,
                    "| {t} | {st} | {} | {:.0} µs | {:.0} µs | {:.0} µs |",
                    thousands(eps),
                    res.get(&wk, st, "p50_us").unwrap_or(f64::NAN),
                    res.get(&wk, st, "p99_us").unwrap_or(f64::NAN),
                    res.get_extra(&format!("{wk}_max_us"), st)
                        .unwrap_or(f64::NAN),
                );
            }
        }
        let _ = writeln!(w);
    }
    if cfg.runs("append") {
        if let (Some(l), Some(i)) = (
            res.get_extra("eventlog_log_bytes_per_event", "eventlog"),
            res.get_extra("eventlog_index_bytes_per_event", "eventlog"),
        ) {
            let _ = writeln!(
                w,
                "- eventlog's disk bytes per event split: log {l:.0}, index (sled) {i:.0}."
            );
        }
        let mut anon = Vec::new();
        for st in STORES {
            if let Some(a) = res.get_extra("anon_peak", st) {
                anon.push(format!("{st} {:.0} MB", a / 1e6));
            }
        }
        let mut cpu = Vec::new();
        for st in STORES {
            if let Some(c) = res.get_extra("append_cpu_s", st) {
                cpu.push(format!("{st} {c:.1} s"));
            }
        }
        if !cpu.is_empty() {
            let _ = writeln!(w, "- CPU time (user + system, all threads of the process) of the batched append of {} events (including generating the events, alike for every store): {}. With 2 cores shared with other processes, CPU-bound stores lose the most to the load.", thousands(cfg.events as f64), cpu.join(", "));
        }
        if !anon.is_empty() {
            let _ = writeln!(
                w,
                "- peak heap (RssAnon sampled every 10 ms) during the batched append: {}.",
                anon.join(", ")
            );
        }
        let mut agg = Vec::new();
        for st in STORES {
            if let Some(a) = res.get_extra("agg_events_mean", st) {
                agg.push(format!("{st} {a:.1}"));
            }
        }
        if !agg.is_empty() {
            let _ = writeln!(
                w,
                "- events per aggregate history read (mean): {}; events of the type read: {}.",
                agg.join(", "),
                thousands(res.get_extra("type_events", "eventlog").unwrap_or(f64::NAN))
            );
        }
        let mut st_after = Vec::new();
        for st in STORES {
            if let Some(a) = res.get_extra("stored_after_crash", st) {
                st_after.push(format!("{st} {}", thousands(a)));
            }
        }
        if !st_after.is_empty() {
            let _ = writeln!(w, "- events stored after the SIGKILL (all {} acknowledged ones were there, checked): {}; the reads, replay and disk rows use these stores.", thousands(cfg.events as f64), st_after.join(", "));
        }
    }
    if cfg.runs("import") {
        let mut b = Vec::new();
        for st in STORES {
            if let Some(a) = res.get_extra("import_real_bytes_per_event", st) {
                b.push(format!("{st} {a:.0}"));
            }
        }
        if !b.is_empty() {
            let _ = writeln!(w, "- real data set ({} events, about 880 B of JSON each): disk bytes per event after the import: {}.", thousands(res.get_extra("import_real_events", "eventlog").unwrap_or(f64::NAN)), b.join(", "));
        }
    }
    if cfg.runs("interval") {
        let mut b = Vec::new();
        for st in STORES {
            if let Some(a) = res.get_extra("interval_append_batched", st) {
                b.push(format!("{st} {}", thousands(a)));
            }
        }
        if !b.is_empty() {
            let _ = writeln!(w, "- batched append of {} events under `Interval` durability (a power loss may lose the last {} ms; SQLite NORMAL: since the last checkpoint), events/s: {}. Not in the JSON.", thousands(cfg.interval_events as f64), stores::INTERVAL_MS, b.join(", "));
        }
    }
    if cfg.runs("threads") {
        let mut b = Vec::new();
        for st in STORES {
            let per: Vec<String> = cfg
                .batch_threads
                .iter()
                .filter_map(|t| {
                    let eps = res.get_extra(&format!("threads_append_batched_{t}t"), st)?;
                    let cpu = res.get_extra(&format!("threads_cpu_per_million_{t}t"), st)?;
                    Some(format!(
                        "{t} thread{}: {} ({cpu:.2} s of CPU per million)",
                        plural(*t as u64),
                        thousands(eps)
                    ))
                })
                .collect();
            if !per.is_empty() {
                b.push(format!("{st} {}", per.join(", ")));
            }
        }
        if !b.is_empty() {
            let _ = writeln!(w, "- batched append of {} events from several threads at once, each appending its share in appends of {} to random aggregates (the batches generated before the clock starts; events/s over the wall time of all threads): {}. Not in the JSON.", thousands(cfg.threads_events as f64), thousands(cfg.batch as f64), b.join("; "));
        }
    }
    if cfg.runs("hot") {
        let per: Vec<String> = STORES
            .iter()
            .filter_map(|st| {
                let eps = res.get_extra("hot_append_single", st)?;
                let p99 = res.get_extra("hot_append_single_p99_us", st)?;
                Some(format!("{st} {} (p99 {p99:.0} µs)", thousands(eps)))
            })
            .collect();
        if !per.is_empty() {
            let _ = writeln!(w, "- single-event durable appends from {} threads to only {} aggregate{} (a hot stream: appends to one aggregate must be ordered), events/s: {}. Not in the JSON.", cfg.hot_threads(), thousands(cfg.hot_aggregates as f64), plural(cfg.hot_aggregates), per.join("; "));
        }
    }
    if !res.loads.is_empty() {
        let _ = writeln!(w, "\nLoad when each repetition started:\n");
        for l in &res.loads {
            let _ = writeln!(w, "- {l}");
        }
    }
    let _ = writeln!(w, "\nPer-repetition values (JSON figures):\n");
    let _ = writeln!(w, "| workload | store | metric | values |");
    let _ = writeln!(w, "|---|---|---|---|");
    for ((wk, st, m), (v, _)) in &res.figures {
        // Seconds to the millisecond: reopen times are tenths of a second.
        let vals: Vec<String> = v
            .iter()
            .map(|x| match m.as_str() {
                "seconds" => format!("{x:.3}"),
                _ => format!("{x:.1}"),
            })
            .collect();
        let _ = writeln!(w, "| {wk} | {st} | {m} | {} |", vals.join(", "));
    }
    let _ = writeln!(w);
}

fn durability_text(w: &mut String) {
    let _ = writeln!(w, "## How each store is set up to give the same promise\n");
    let _ = writeln!(
        w,
        "Every durable append below returns only after its bytes are on stable storage (survive a power loss), \
         and a multi-event append is atomic across aggregates. Every store assigns each event the next version \
         of its aggregate (ExpectedVersion::Any) and a global order, and keeps the indexes for the reads by \
         aggregate and by type. Each workload of each store runs in its own process.\n"
    );
    let _ = writeln!(w, "- **eventlog**: `Store::open` with `Options::default()` (`Durability::Sync`: each append is `fdatasync`ed before it returns; concurrent appenders share one `fdatasync`). Batched: one `append_batch` of 1,000 single-event `AppendRequest`s to random aggregates, `ExpectedVersion::Any`. Single-event: `append` from each thread. Reads: `read_aggregate`, `read_type`, `read_all`, decoding every event with `StoredEvent::event()` (zero-copy). The index (sled) is derived from the log and caught up at open, so it is not synced per append: the log is the durable truth.");
    let _ = writeln!(w, "- **SQLite** (rusqlite 0.37, bundled SQLite {}): WAL journal, `synchronous=FULL` (the WAL is fsynced at every commit), other settings SQLite's defaults (4 KiB pages, 2 MB page cache, autocheckpoint at 1,000 pages). One table `events(seq INTEGER PRIMARY KEY, aggregate TEXT, version INTEGER, type TEXT, event_id BLOB(16), ts INTEGER, content_type INTEGER, payload BLOB, UNIQUE(aggregate, version))` and an index on `(type, seq)`. The version is computed in the INSERT (`COALESCE(MAX(version),0)+1` from the unique index). Batched: one `BEGIN IMMEDIATE` transaction per 1,000 events. Single-event: one transaction per event, one connection per thread, `busy_timeout` 120 s. Reads: prepared statements, every column read (text as &str, blobs borrowed).", rusqlite::version());
    let _ = writeln!(w, "- **sled 0.34** with its default configuration, used directly as an event store: trees `events` (seq → event bytes), `by_agg` ((aggregate, version) → seq), `by_type` ((type, seq) → ()), `latest` (aggregate → version, and the next seq). One append is one multi-tree transaction (atomic across trees and aggregates), taken under a process mutex (the next-seq key would make concurrent optimistic transactions conflict and retry), then `Db::flush()` (writes and fsyncs sled's log) before returning; concurrent appenders flush outside the mutex and share flushes. Reads: prefix scans of `by_agg` / `by_type`, a `get` per event, decoding each.");
    let _ = writeln!(w, "- **raw**: the limit. eventlog's own bytes (its event encoding in its record framing, produced by a scratch eventlog store) written with one `write(2)` per append to a fresh file and one `fdatasync` per append. Batched: one write + fdatasync per 1,000 records (only the write and fdatasync are timed). Single-event: a naive group commit over one file (appenders frame into a shared buffer; whoever finds no write in progress writes the whole buffer with one write(2) + one fdatasync). Replay: read(2) of the file in 4 MiB chunks, crc32 of every record checked and its event decoded. Raw has no indexes, so no aggregate or type reads, and no reopen.");
    let _ = writeln!(w, "- **Interval** (extra line in Details): eventlog `Durability::Interval {{ sync_interval_ms: {0} }}`, SQLite `synchronous=NORMAL` (WAL synced only at checkpoints), sled without `flush()` (its default background flush every {0} ms), raw without fdatasync and a background fdatasync every {0} ms. A process crash loses nothing in any of them; a power loss may lose the last interval.", stores::INTERVAL_MS);
    let _ = writeln!(w, "- **Timing**: batched and import figures count the time spent in the store's append calls (the workload's events are generated, or the real file parsed, outside them); single-event figures count every append completed in the fixed window by all threads. Reads are warm and settled: the store was just written (page cache warm), the background work its opening started is finished first (eventlog: the index moves the events it caught up from the log into sled; sled: `flush()`; SQLite has none), and one untimed replay and 1,000 untimed aggregate reads go first. The reopen is timed in a fresh process from before `open` to the end of reading the history of the aggregate appended last before the kill (page cache warm either way). Disk bytes are allocated blocks (st_blocks) of the whole store directory after a clean close, divided by the events stored. Peak RSS is VmHWM of the appending process when the last of its events was acknowledged.\n");
}

/// The plural ending of a count's noun: "s" unless `n` is 1.
fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
