//! End-to-end tests of the `eventlog` command line: every command's happy path and error
//! paths, run as a real process, with the exit codes and the one-line errors checked; and
//! real-data checks on the incident log committed in `examples/data/`.

use eventlog::publisher::{HandlerError, Publisher, SubscriptionOptions};
use eventlog::store::{Direction, EventRef, ExpectedVersion, NewEvent, Options, Store};
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/data/uci_incidents_first500.jsonl.gz"
);

fn cmd(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_eventlog"));
    c.env_remove("EVENTLOG_DIR").arg("--dir").arg(dir);
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    cmd(dir).args(args).output().expect("run eventlog")
}

fn run_with_stdin(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = cmd(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn eventlog");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("wait")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_no_rust_noise(out: &Output) {
    let err = text(&out.stderr);
    for noise in [
        "panicked",
        "RUST_BACKTRACE",
        "stack backtrace",
        "Os {",
        "Error {",
    ] {
        assert!(!err.contains(noise), "stderr shows {noise:?}: {err}");
    }
}

/// Asserts success; returns stdout.
fn ok(out: &Output) -> String {
    assert_no_rust_noise(out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts failure with `code` and exactly one line on stderr; returns that line.
fn fails(out: &Output, code: i32) -> String {
    assert_no_rust_noise(out);
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {err}",
        text(&out.stdout)
    );
    assert_eq!(err.lines().count(), 1, "stderr is not one line: {err:?}");
    assert!(err.starts_with("error: "), "{err}");
    err.trim_end().to_string()
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn json(stdout: &str) -> Value {
    let lines = json_lines(stdout);
    assert_eq!(lines.len(), 1, "{stdout}");
    lines.into_iter().next().unwrap()
}

/// The committed fixture's lines, decompressed.
fn fixture_text() -> String {
    let mut s = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(FIXTURE).unwrap())
        .read_to_string(&mut s)
        .unwrap();
    s
}

/// A store directory (not yet created) inside a temporary directory.
fn new_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    (tmp, dir)
}

/// A store holding the fixture.
fn imported() -> (tempfile::TempDir, PathBuf) {
    let (tmp, dir) = new_dir();
    let out = run(&dir, &["import", FIXTURE]);
    ok(&out);
    (tmp, dir)
}

fn micros(ts: &str) -> i64 {
    eventlog::json::parse_rfc3339_us(ts).unwrap()
}

/// The raw text of a line's `data` field.
fn raw_data(line: &str) -> String {
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(line).unwrap();
    fields["data"].get().to_string()
}

#[test]
fn help_explains_every_command_and_the_exit_codes() {
    let (_tmp, dir) = new_dir();
    let help = ok(&run(&dir, &["--help"]));
    for command in [
        "append",
        "import",
        "export",
        "read",
        "follow",
        "stats",
        "verify",
        "repair",
        "reindex",
        "subscriptions",
        "deadletters",
        "demo",
        "Exit codes",
        "EVENTLOG_DIR",
        "--pretty",
    ] {
        assert!(help.contains(command), "--help lacks {command}: {help}");
    }
    for command in [
        "append",
        "import",
        "export",
        "read",
        "follow",
        "stats",
        "verify",
        "repair",
        "reindex",
        "subscriptions",
        "demo",
    ] {
        let h = ok(&run(&dir, &[command, "--help"]));
        assert!(h.contains("Usage: eventlog"), "{command}: {h}");
    }
    assert!(ok(&run(&dir, &["deadletters", "redrive", "--help"])).contains("idle"));
    assert!(ok(&run(&dir, &["--version"])).starts_with("eventlog "));
    assert!(!dir.exists(), "help must not create a store");
}

#[test]
fn usage_errors_exit_1_with_one_line() {
    let (_tmp, dir) = new_dir();
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["read"],
        &["read", "--aggregate", "a", "--type", "t"],
        &["read", "--type", "t", "--backward"],
        &["append", "--type", "T"],
        &[
            "append",
            "--aggregate",
            "a",
            "--type",
            "T",
            "--expected-version",
            "banana",
        ],
        &[
            "append",
            "--aggregate",
            "a",
            "--type",
            "T",
            "--id",
            "not-a-uuid",
        ],
        &["import", "x.jsonl", "--batch-events", "0"],
        &["export", "--from", "x"],
        &["deadletters"],
    ];
    for args in cases {
        let line = fails(&run(&dir, args), 1);
        assert!(line.len() > 20, "{args:?}: {line}");
    }
    let line = fails(
        &run(
            &dir,
            &[
                "append",
                "--aggregate",
                "a",
                "--type",
                "T",
                "--data",
                "{oops",
            ],
        ),
        1,
    );
    assert!(line.contains("--data is not valid JSON"), "{line}");
    assert!(!dir.exists(), "a usage error must not create a store");
}

#[test]
fn real_data_import_has_the_documented_counts() {
    let (tmp, dir) = new_dir();
    let out = run(&dir, &["import", FIXTURE]);
    ok(&out);
    let summary = text(&out.stderr);
    assert!(
        summary.contains("imported 3,411 events of 500 aggregates"),
        "{summary}"
    );
    assert!(summary.contains("events/s"), "{summary}");
    let stats = json(&ok(&run(&dir, &["stats"])));
    assert_eq!(stats["events"], 3411);
    assert_eq!(stats["head_seq"], 3410);
    assert_eq!(stats["aggregates"], 500);
    assert_eq!(stats["types"], 6);
    assert_eq!(stats["segments"], 1);
    assert!(stats["log_bytes"].as_u64().unwrap() > 2_500_000);
    assert_eq!(stats["subscriptions"], serde_json::json!([]));
    let pretty = ok(&run(&dir, &["stats", "--pretty"]));
    assert!(pretty.contains("events         3,411"), "{pretty}");
    // The count per type, as the data's README gives them; the `-100` placeholder state
    // occurs only later in the full log, not in the first 500 incidents.
    let mut types = BTreeMap::new();
    for e in json_lines(&ok(&run(&dir, &["export"]))) {
        *types
            .entry(e["type"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    let expected: BTreeMap<String, i32> = [
        ("New", 984),
        ("Active", 853),
        ("Resolved", 529),
        ("Awaiting User Info", 508),
        ("Closed", 503),
        ("Awaiting Problem", 34),
    ]
    .into_iter()
    .map(|(t, n)| (t.to_string(), n))
    .collect();
    assert_eq!(types, expected);
    drop(tmp);
}

#[test]
fn real_data_histories_follow_the_file_order() {
    let (_tmp, dir) = imported();
    let source = fixture_text();
    let mut by_aggregate: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for line in source.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        by_aggregate
            .entry(v["aggregate"].as_str().unwrap().to_string())
            .or_default()
            .push(line);
    }
    assert_eq!(by_aggregate.len(), 500);

    // Three histories through the command line, byte for byte against the file.
    for aggregate in ["INC0000045", "INC0000137", "INC0000197"] {
        let events = ok(&run(&dir, &["read", "--aggregate", aggregate]));
        let lines: Vec<&str> = events.lines().collect();
        let want = &by_aggregate[aggregate];
        assert_eq!(lines.len(), want.len(), "{aggregate}");
        for (i, (got, want)) in lines.iter().zip(want).enumerate() {
            let g: Value = serde_json::from_str(got).unwrap();
            let w: Value = serde_json::from_str(want).unwrap();
            assert_eq!(g["aggregate"], aggregate);
            assert_eq!(g["version"], i as u64 + 1);
            assert_eq!(g["type"], w["type"]);
            assert_eq!(
                micros(g["ts"].as_str().unwrap()),
                micros(w["ts"].as_str().unwrap())
            );
            assert_eq!(raw_data(got), raw_data(want), "{aggregate} v{}", i + 1);
        }
    }
    assert_eq!(by_aggregate["INC0000197"].len(), 26, "the longest history");

    // Every aggregate through the library, against the file's lines for it, in order.
    let store = Store::open(&dir, Options::default()).unwrap();
    for (aggregate, lines) in &by_aggregate {
        let history: Vec<_> = store
            .read_aggregate(aggregate, 1, Direction::Forward, usize::MAX)
            .unwrap()
            .map(|e| e.unwrap().to_recorded().unwrap())
            .collect();
        assert_eq!(history.len(), lines.len(), "{aggregate}");
        for (i, (e, line)) in history.iter().zip(lines).enumerate() {
            let w: Value = serde_json::from_str(line).unwrap();
            assert_eq!(e.version, i as u64 + 1);
            assert_eq!(e.event_type, w["type"].as_str().unwrap());
            assert_eq!(e.timestamp_us, micros(w["ts"].as_str().unwrap()));
            assert_eq!(
                e.payload,
                raw_data(line).as_bytes(),
                "{aggregate} v{}",
                i + 1
            );
        }
    }
    // The data's quirks survive: INC0000137 goes back in time (11:10, then 09:52) ...
    let h137: Vec<_> = store
        .read_aggregate("INC0000137", 1, Direction::Forward, 2)
        .unwrap()
        .map(|e| e.unwrap().to_recorded().unwrap().timestamp_us)
        .collect();
    assert_eq!(
        h137,
        vec![
            micros("2016-02-29T11:10:00Z"),
            micros("2016-02-29T09:52:00Z")
        ]
    );
    // ... and four incidents' sys_mod_count decreases once.
    let mut decreasing = Vec::new();
    for aggregate in by_aggregate.keys() {
        let counts: Vec<i64> = store
            .read_aggregate(aggregate, 1, Direction::Forward, usize::MAX)
            .unwrap()
            .map(|e| {
                let v: Value =
                    serde_json::from_slice(&e.unwrap().to_recorded().unwrap().payload).unwrap();
                v["sys_mod_count"].as_str().unwrap().parse().unwrap()
            })
            .collect();
        if counts.windows(2).any(|w| w[1] < w[0]) {
            decreasing.push(aggregate.as_str());
        }
    }
    assert_eq!(
        decreasing,
        ["INC0000130", "INC0000134", "INC0000135", "INC0000164"]
    );
}

#[test]
fn export_then_import_reproduces_the_store_byte_for_byte() {
    let (tmp, a) = imported();
    let export_a = ok(&run(&a, &["export"]));
    assert_eq!(export_a.lines().count(), 3411);
    // The payloads are the source's bytes and the times its times.
    for (exported, source) in export_a.lines().zip(fixture_text().lines()) {
        assert_eq!(raw_data(exported), raw_data(source));
        let (e, s): (Value, Value) = (
            serde_json::from_str(exported).unwrap(),
            serde_json::from_str(source).unwrap(),
        );
        assert_eq!(e["aggregate"], s["aggregate"]);
        assert_eq!(e["type"], s["type"]);
        assert_eq!(
            micros(e["ts"].as_str().unwrap()),
            micros(s["ts"].as_str().unwrap())
        );
    }
    let file = tmp.path().join("export.jsonl");
    std::fs::write(&file, &export_a).unwrap();
    let b = tmp.path().join("b");
    ok(&run(&b, &["import", file.to_str().unwrap()]));
    let export_b = ok(&run(&b, &["export"]));
    assert!(export_a == export_b, "the exports of the two stores differ");

    // Ranges: --from and --to (inclusive).
    let part = ok(&run(&a, &["export", "--from", "10", "--to", "12"]));
    let seqs: Vec<u64> = json_lines(&part)
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [10, 11, 12]);
    assert_eq!(ok(&run(&a, &["export", "--from", "5000"])), "");
    fails(&run(&a, &["export", "--from", "5", "--to", "4"]), 1);
    fails(&run(&a, &["export", "--pretty"]), 1);

    // An export is gzip-able, and import reads gzip from stdin too.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(export_a.as_bytes()).unwrap();
    let c = tmp.path().join("c");
    ok(&run_with_stdin(&c, &["import", "-"], &gz.finish().unwrap()));
    assert!(ok(&run(&c, &["export"])) == export_a);
}

#[test]
fn ids_metadata_binary_payloads_and_odd_json_round_trip_exactly() {
    let (tmp, a) = new_dir();
    let lines = [
        r#"{"aggregate":"acct-1","type":"Opened","ts":"2024-05-06T07:08:09.123456+02:00","id":"11111111-2222-3333-4444-555555555555","metadata":{"correlation_id":"req-9","causation_id":"cmd-1","tenant":"t1"},"data":{"z": 1.50, "a": [true, null]}}"#,
        r#"{"aggregate":"acct-1","type":"Blob","data_base64":"AAEC/w=="}"#,
        r#"{"aggregate":"acct-2","type":"Spaced","data_base64":"IHsgfSA=","content_type":"json"}"#,
        r#"{"aggregate":"acct-1","type":"Null","data":null,"ts":-1}"#,
        "",
    ];
    let file = tmp.path().join("in.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    ok(&run(&a, &["import", file.to_str().unwrap()]));
    let export_a = ok(&run(&a, &["export"]));
    let events = json_lines(&export_a);
    assert_eq!(events.len(), 4);
    assert_eq!(events[0]["ts"], "2024-05-06T05:08:09.123456Z");
    assert_eq!(events[0]["id"], "11111111-2222-3333-4444-555555555555");
    assert_eq!(
        events[0]["metadata"],
        serde_json::json!({"correlation_id":"req-9","causation_id":"cmd-1","tenant":"t1"})
    );
    assert_eq!(
        raw_data(export_a.lines().next().unwrap()),
        r#"{"z": 1.50, "a": [true, null]}"#
    );
    assert_eq!(events[1]["data_base64"], "AAEC/w==");
    assert_eq!(events[1]["version"], 2);
    assert_eq!(events[2]["data_base64"], "IHsgfSA=");
    assert_eq!(events[2]["content_type"], "json");
    assert_eq!(events[3]["data"], Value::Null);
    assert_eq!(events[3]["ts"], "1969-12-31T23:59:59.999999Z");
    let copy = tmp.path().join("copy.jsonl");
    std::fs::write(&copy, &export_a).unwrap();
    let b = tmp.path().join("b");
    ok(&run(&b, &["import", copy.to_str().unwrap()]));
    assert!(ok(&run(&b, &["export"])) == export_a);
    // Importing the same export again stores nothing new: the ids make it a retry.
    let again = run(&b, &["import", copy.to_str().unwrap()]);
    ok(&again);
    assert!(
        text(&again.stderr).contains("already stored"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(json(&ok(&run(&b, &["stats"])))["events"], 4);
}

#[test]
fn append_prints_seq_and_version_and_a_conflict_exits_3() {
    let (tmp, dir) = new_dir();
    let first = json(&ok(&run(
        &dir,
        &[
            "append",
            "--aggregate",
            "order-1",
            "--type",
            "Placed",
            "--expected-version",
            "none",
            "--data",
            r#"{ "total" : 12 }"#,
        ],
    )));
    assert_eq!(first, serde_json::json!({"seq": 0, "version": 1}));
    let payload = tmp.path().join("paid.json");
    std::fs::write(&payload, "{\n  \"amount\": 12\n}\n").unwrap();
    let second = json(&ok(&run(
        &dir,
        &[
            "append",
            "--aggregate",
            "order-1",
            "--type",
            "Paid",
            "--expected-version",
            "1",
            "--data",
            &format!("@{}", payload.display()),
        ],
    )));
    assert_eq!(second, serde_json::json!({"seq": 1, "version": 2}));
    let third = json(&ok(&run(
        &dir,
        &[
            "append",
            "--aggregate",
            "order-1",
            "--type",
            "Shipped",
            "--expected-version",
            "exists",
        ],
    )));
    assert_eq!(third["version"], 3);
    let piped = run_with_stdin(
        &dir,
        &[
            "append",
            "--aggregate",
            "order-2",
            "--type",
            "Placed",
            "--data",
            "@-",
        ],
        b"[1, 2]",
    );
    assert_eq!(json(&ok(&piped))["seq"], 3);

    let line = fails(
        &run(
            &dir,
            &[
                "append",
                "--aggregate",
                "order-1",
                "--type",
                "Placed",
                "--expected-version",
                "1",
            ],
        ),
        3,
    );
    assert!(
        line.contains("expected version 1, actual version 3"),
        "{line}"
    );
    let line = fails(
        &run(
            &dir,
            &[
                "append",
                "--aggregate",
                "order-1",
                "--type",
                "Placed",
                "--expected-version",
                "none",
            ],
        ),
        3,
    );
    assert!(line.contains("actual version 3"), "{line}");
    fails(
        &run(
            &dir,
            &[
                "append",
                "--aggregate",
                "order-9",
                "--type",
                "Placed",
                "--expected-version",
                "exists",
            ],
        ),
        3,
    );
    let line = fails(
        &run(
            &dir,
            &[
                "append",
                "--aggregate",
                "order-1",
                "--type",
                "X",
                "--data",
                "@/no/such/file.json",
            ],
        ),
        2,
    );
    assert!(line.contains("/no/such/file.json"), "{line}");
    fails(
        &run(
            &dir,
            &["append", "--aggregate", "bad\u{1}id", "--type", "X"],
        ),
        1,
    );

    // The stored payload is the compact JSON, key order kept.
    let read = json_lines(&ok(&run(&dir, &["read", "--aggregate", "order-1"])));
    assert_eq!(read.len(), 3);
    let raw = ok(&run(
        &dir,
        &["read", "--aggregate", "order-1", "--limit", "1"],
    ));
    assert_eq!(raw_data(raw.trim()), r#"{"total":12}"#);
    assert_eq!(read[1]["data"], serde_json::json!({"amount": 12}));

    // An id makes a retry idempotent: the same event is not stored twice.
    let id = "6f9619ff-8b86-d011-b42d-00c04fc964ff";
    let args = [
        "append",
        "--aggregate",
        "order-3",
        "--type",
        "Placed",
        "--expected-version",
        "none",
        "--id",
        id,
    ];
    let once = json(&ok(&run(&dir, &args)));
    let twice = json(&ok(&run(&dir, &args)));
    assert_eq!(once, twice);
    let stored = json_lines(&ok(&run(&dir, &["read", "--aggregate", "order-3"])));
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["id"], id);
    let line = fails(
        &run(
            &dir,
            &[
                "append",
                "--aggregate",
                "order-3",
                "--type",
                "Other",
                "--id",
                id,
            ],
        ),
        3,
    );
    assert!(line.contains(id), "{line}");

    let pretty = ok(&run(
        &dir,
        &[
            "append",
            "--aggregate",
            "order-4",
            "--type",
            "Placed",
            "--pretty",
        ],
    ));
    assert!(
        pretty.contains("aggregate order-4 is at version 1"),
        "{pretty}"
    );

    // EVENTLOG_DIR names the store when --dir is not given.
    let via_env = Command::new(env!("CARGO_BIN_EXE_eventlog"))
        .env("EVENTLOG_DIR", &dir)
        .args(["read", "--aggregate", "order-4"])
        .output()
        .unwrap();
    assert_eq!(json_lines(&ok(&via_env)).len(), 1);
}

#[test]
fn read_by_aggregate_type_and_all_with_ranges_and_tables() {
    let (_tmp, dir) = imported();
    let all = json_lines(&ok(&run(
        &dir,
        &["read", "--all", "--from", "3400", "--limit", "5"],
    )));
    assert_eq!(
        all.iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3400, 3401, 3402, 3403, 3404]
    );
    let event = &all[0];
    for field in [
        "seq",
        "aggregate",
        "version",
        "type",
        "ts",
        "id",
        "metadata",
        "data",
    ] {
        assert!(event.get(field).is_some(), "no {field} in {event}");
    }
    let back = json_lines(&ok(&run(
        &dir,
        &[
            "read",
            "--aggregate",
            "INC0000197",
            "--backward",
            "--limit",
            "3",
        ],
    )));
    assert_eq!(
        back.iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [26, 25, 24]
    );
    assert_eq!(back[0]["type"], "Closed");
    let from = json_lines(&ok(&run(
        &dir,
        &[
            "read",
            "--aggregate",
            "INC0000197",
            "--from-version",
            "20",
            "--limit",
            "2",
        ],
    )));
    assert_eq!(
        from.iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [20, 21]
    );
    let from_back = json_lines(&ok(&run(
        &dir,
        &[
            "read",
            "--aggregate",
            "INC0000197",
            "--from-version",
            "2",
            "--backward",
        ],
    )));
    assert_eq!(from_back.len(), 2);
    let problems = json_lines(&ok(&run(&dir, &["read", "--type", "Awaiting Problem"])));
    assert_eq!(problems.len(), 34);
    assert!(problems
        .windows(2)
        .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
    let later = json_lines(&ok(&run(
        &dir,
        &[
            "read",
            "--type",
            "Awaiting Problem",
            "--from",
            "1000",
            "--limit",
            "3",
        ],
    )));
    assert_eq!(later.len(), 3);
    assert!(later
        .iter()
        .all(|e| e["seq"].as_u64().unwrap() >= 1000 && e["type"] == "Awaiting Problem"));

    let table = ok(&run(
        &dir,
        &["read", "--aggregate", "INC0000137", "--pretty"],
    ));
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 5, "{table}");
    assert!(
        rows[0].starts_with("SEQ") && rows[0].contains("AGGREGATE") && rows[0].contains("DATA")
    );
    let ts_column = rows[0].find("TS").unwrap();
    assert!(
        rows[1..]
            .iter()
            .all(|r| r[ts_column..].starts_with("2016-")),
        "{table}"
    );
    assert!(rows[1].ends_with('…'), "long data is cut: {}", rows[1]);

    let line = fails(&run(&dir, &["read", "--aggregate", "INC9999999"]), 2);
    assert!(line.contains("INC9999999"), "{line}");
    let line = fails(&run(&dir, &["read", "--type", "Reopened"]), 2);
    assert!(line.contains("Reopened"), "{line}");
    assert_eq!(ok(&run(&dir, &["read", "--all", "--from", "99999"])), "");
}

#[test]
fn import_stops_at_a_bad_line_and_keeps_everything_before_it() {
    let (tmp, dir) = new_dir();
    let source = fixture_text();
    let mut lines: Vec<String> = source.lines().take(2_600).map(String::from).collect();
    lines.insert(
        2_500,
        r#"{"aggregate":"INC1","type":"New","ts":"yesterday","data":{}}"#.into(),
    );
    lines.insert(2_550, "{not json".into());
    let file = tmp.path().join("bad.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();

    let line = fails(&run(&dir, &["import", file.to_str().unwrap()]), 1);
    assert!(line.contains("line 2501"), "{line}");
    assert!(line.contains("invalid ts"), "{line}");
    assert!(line.contains("2,500 events before it are stored"), "{line}");
    assert_eq!(json(&ok(&run(&dir, &["stats"])))["events"], 2500);

    let skipping = tmp.path().join("skipping");
    let out = run(
        &skipping,
        &["import", "--skip-invalid", file.to_str().unwrap()],
    );
    ok(&out);
    let err = text(&out.stderr);
    assert!(err.contains("line 2501: skipped: invalid ts"), "{err}");
    assert!(err.contains("line 2551: skipped: not valid JSON"), "{err}");
    assert!(err.contains("skipped 2 invalid lines"), "{err}");
    assert_eq!(json(&ok(&run(&skipping, &["stats"])))["events"], 2600);

    for (bad, why) in [
        (r#"{"type":"New","data":{}}"#, "missing field \"aggregate\""),
        (
            r#"{"aggregate":"a","type":"New"}"#,
            "missing field \"data\"",
        ),
        (r#"[1,2]"#, "not a JSON object"),
        (
            r#"{"aggregate":"a","type":"New","data":1,"id":"xyz"}"#,
            "invalid id",
        ),
        ("\u{fffd}\u{0}", "not valid JSON"),
    ] {
        let (_t, d) = new_dir();
        let line = fails(
            &run_with_stdin(
                &d,
                &["import", "-"],
                format!("{}\n{bad}\n", lines[0]).as_bytes(),
            ),
            1,
        );
        assert!(
            line.contains("stdin line 2") && line.contains(why),
            "{line}"
        );
    }
    let (_t, d) = new_dir();
    let line = fails(&run_with_stdin(&d, &["import", "-"], b"\xff\xfe\n"), 1);
    assert!(line.contains("line 1: not UTF-8"), "{line}");
}

#[test]
fn an_unreadable_import_file_exits_2_and_creates_no_store() {
    let (tmp, dir) = new_dir();
    let line = fails(&run(&dir, &["import", "/no/such/events.jsonl"]), 2);
    assert!(line.contains("/no/such/events.jsonl"), "{line}");
    let line = fails(&run(&dir, &["import", tmp.path().to_str().unwrap()]), 2);
    assert!(line.contains("directory"), "{line}");
    assert!(!dir.exists());
    // A gzip file cut short: what was read is stored, the rest is reported.
    let gz = std::fs::read(FIXTURE).unwrap();
    let cut = tmp.path().join("cut.jsonl.gz");
    std::fs::write(&cut, &gz[..gz.len() / 2]).unwrap();
    let line = fails(&run(&dir, &["import", cut.to_str().unwrap()]), 2);
    assert!(
        line.contains("cannot read") && line.contains("are stored"),
        "{line}"
    );
}

#[test]
fn read_only_commands_need_an_existing_store_and_create_none() {
    let (_tmp, dir) = new_dir();
    let commands: &[&[&str]] = &[
        &["read", "--all"],
        &["read", "--aggregate", "a"],
        &["export"],
        &["follow"],
        &["stats"],
        &["verify"],
        &["repair"],
        &["reindex"],
        &["subscriptions"],
        &["deadletters", "list", "sub"],
    ];
    for args in commands {
        let line = fails(&run(&dir, args), 2);
        assert!(line.contains("no store at"), "{args:?}: {line}");
        assert!(!dir.exists(), "{args:?} created the store");
    }
    std::fs::create_dir_all(&dir).unwrap();
    let line = fails(&run(&dir, &["stats"]), 2);
    assert!(line.contains("not an eventlog store"), "{line}");
}

#[test]
fn a_store_locked_by_another_process_exits_5_but_can_be_followed() {
    let (_tmp, dir) = new_dir();
    let store = Store::open(&dir, Options::default()).unwrap();
    store
        .append(
            "a",
            ExpectedVersion::Any,
            &[NewEvent::json_text("Started", "{}")],
        )
        .unwrap();
    let commands: &[&[&str]] = &[
        &["stats"],
        &["read", "--all"],
        &["export"],
        &["append", "--aggregate", "a", "--type", "T"],
        &["import", FIXTURE],
        &["verify"],
        &["repair"],
        &["reindex"],
        &["subscriptions"],
    ];
    for args in commands {
        let line = fails(&run(&dir, args), 5);
        assert!(line.contains("locked"), "{args:?}: {line}");
    }
    // follow takes no lock: it shows what the running application appends.
    let mut child = spawn_follow(&dir, &["--from", "0"]);
    let lines = line_reader(&mut child);
    let first: Value = serde_json::from_str(&next_line(&lines)).unwrap();
    assert_eq!(
        (first["seq"].as_u64(), first["type"].as_str()),
        (Some(0), Some("Started"))
    );
    store
        .append(
            "a",
            ExpectedVersion::Exact(1),
            &[NewEvent::json_text("Running", "{}")],
        )
        .unwrap();
    let second: Value = serde_json::from_str(&next_line(&lines)).unwrap();
    assert_eq!(
        (second["version"].as_u64(), second["type"].as_str()),
        (Some(2), Some("Running"))
    );
    interrupt_and_expect_0(child);
}

fn spawn_follow(dir: &Path, args: &[&str]) -> Child {
    cmd(dir)
        .arg("follow")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn follow")
}

fn line_reader(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(lines: &mpsc::Receiver<String>) -> String {
    lines
        .recv_timeout(Duration::from_secs(20))
        .expect("follow printed nothing within 20 s")
}

fn interrupt_and_expect_0(mut child: Child) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: sends SIGINT to the child this test spawned.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    assert_eq!(
        status.code(),
        Some(0),
        "follow after SIGINT: {status:?} {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn follow_prints_events_as_they_are_committed_with_filters() {
    let (_tmp, dir) = new_dir();
    ok(&run(
        &dir,
        &["append", "--aggregate", "order-1", "--type", "Placed"],
    ));
    // From the end: only new events; --type filters.
    let mut child = spawn_follow(
        &dir,
        &["--from", "1", "--type", "Paid", "--type", "Shipped"],
    );
    let lines = line_reader(&mut child);
    ok(&run(
        &dir,
        &["append", "--aggregate", "order-1", "--type", "Noise"],
    ));
    ok(&run(
        &dir,
        &[
            "append",
            "--aggregate",
            "order-1",
            "--type",
            "Paid",
            "--data",
            r#"{"amount":12}"#,
        ],
    ));
    let paid: Value = serde_json::from_str(&next_line(&lines)).unwrap();
    assert_eq!(paid["seq"], 2);
    assert_eq!(paid["type"], "Paid");
    assert_eq!(paid["data"], serde_json::json!({"amount": 12}));
    // A batch of events (an import) arrives whole and in order.
    let batch = "{\"aggregate\":\"order-2\",\"type\":\"Shipped\",\"data\":1}\n".repeat(3);
    ok(&run_with_stdin(&dir, &["import", "-"], batch.as_bytes()));
    for seq in 3..6 {
        let e: Value = serde_json::from_str(&next_line(&lines)).unwrap();
        assert_eq!(
            (e["seq"].as_u64(), e["type"].as_str()),
            (Some(seq), Some("Shipped"))
        );
    }
    interrupt_and_expect_0(child);

    // --aggregate-prefix, from the start, as a table.
    let mut child = spawn_follow(
        &dir,
        &["--from", "0", "--aggregate-prefix", "order-2", "--pretty"],
    );
    let lines = line_reader(&mut child);
    assert!(next_line(&lines).starts_with("SEQ"));
    for seq in 3..6 {
        let row = next_line(&lines);
        assert!(
            row.starts_with(&format!("{seq} ")) && row.contains("order-2"),
            "{row}"
        );
    }
    interrupt_and_expect_0(child);

    // Without --from it starts at the end.
    let mut child = spawn_follow(&dir, &[]);
    let lines = line_reader(&mut child);
    std::thread::sleep(Duration::from_millis(500));
    ok(&run(
        &dir,
        &["append", "--aggregate", "order-9", "--type", "Late"],
    ));
    let late: Value = serde_json::from_str(&next_line(&lines)).unwrap();
    assert_eq!(late["seq"], 6);
    interrupt_and_expect_0(child);

    // A start past the end waits for that seq.
    let mut child = spawn_follow(&dir, &["--from", "8"]);
    let lines = line_reader(&mut child);
    std::thread::sleep(Duration::from_millis(300));
    ok(&run(
        &dir,
        &["append", "--aggregate", "order-9", "--type", "Seven"],
    ));
    ok(&run(
        &dir,
        &["append", "--aggregate", "order-9", "--type", "Eight"],
    ));
    let eight: Value = serde_json::from_str(&next_line(&lines)).unwrap();
    assert_eq!(
        (eight["seq"].as_u64(), eight["type"].as_str()),
        (Some(8), Some("Eight"))
    );
    interrupt_and_expect_0(child);
}

/// Byte offsets of the records of a segment file, by walking the record headers.
fn record_offsets(segment: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut pos = 32;
    while pos + 20 <= segment.len() {
        let len = u32::from_le_bytes(segment[pos + 4..pos + 8].try_into().unwrap()) as usize;
        if segment[pos..pos + 20].iter().all(|&b| b == 0) {
            break;
        }
        offsets.push(pos);
        pos += 20 + len;
    }
    offsets
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

fn write_events(dir: &Path, options: Options, count: u64) {
    let store = Store::open(dir, options).unwrap();
    for i in 0..count {
        let e = NewEvent::json_text(
            "Tick",
            format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(200)),
        );
        store
            .append(&format!("agg-{}", i % 7), ExpectedVersion::Any, &[e])
            .unwrap();
    }
}

#[test]
fn a_corrupt_segment_exits_4_until_repair_quarantines_it() {
    let (_tmp, dir) = new_dir();
    write_events(&dir, Options::default(), 200);
    // Damage a record header in the middle of the (last) segment: valid records follow.
    let segment = segment_files(&dir).pop().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let offsets = record_offsets(&bytes);
    assert_eq!(offsets.len(), 200);
    bytes[offsets[120] + 8] ^= 0x40; // the seq field
    std::fs::write(&segment, &bytes).unwrap();

    for args in [
        &["stats"][..],
        &["read", "--all"],
        &["export"],
        &["verify"],
        &["reindex"],
        &["append", "--aggregate", "x", "--type", "T"],
    ] {
        let line = fails(&run(&dir, args), 4);
        assert!(
            line.contains("corrupt") && line.contains("repair"),
            "{args:?}: {line}"
        );
    }
    let out = run(&dir, &["repair"]);
    let report = json(&ok(&out));
    assert_eq!(report["damaged"], true);
    assert_eq!(report["records_lost"], 80);
    assert_eq!(report["quarantined"][0]["first_lost_seq"], 120);
    assert_eq!(report["events"], 120);
    let summary = text(&out.stderr);
    assert!(summary.contains("lost 80 records, seq 120 on"), "{summary}");
    assert!(summary.contains("quarantine"), "{summary}");
    ok(&run(&dir, &["verify"]));
    assert_eq!(json(&ok(&run(&dir, &["stats"])))["events"], 120);
    // The store takes appends again, at the next seq.
    assert_eq!(
        json(&ok(&run(
            &dir,
            &["append", "--aggregate", "x", "--type", "T"]
        )))["seq"],
        120
    );
    let clean = run(&dir, &["repair"]);
    assert_eq!(json(&ok(&clean))["damaged"], false);
    assert!(text(&clean.stderr).contains("no damage found"));
}

#[test]
fn verify_finds_a_rotten_record_in_a_sealed_segment_and_repair_removes_it() {
    let (_tmp, dir) = new_dir();
    // Small segments, so that the log has sealed ones; the command line opens the store
    // with its default options afterwards.
    let mut options = Options::default();
    options.payload_size_bytes_max = 4 << 10;
    options.log.segment_size_bytes = 128 << 10;
    options.log.preallocate_chunk_bytes = 0;
    write_events(&dir, options, 1_000);
    let segments = segment_files(&dir);
    assert!(segments.len() >= 3, "{segments:?}");
    // Flip a payload byte of a record in the middle of the second segment: bit rot in a
    // sealed segment, which its offset index lets open() pass over.
    let sealed = &segments[1];
    let base: u64 = sealed
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut bytes = std::fs::read(sealed).unwrap();
    let offsets = record_offsets(&bytes);
    let k = offsets.len() / 2;
    bytes[offsets[k] + 20 + 10] ^= 0x01;
    std::fs::write(sealed, &bytes).unwrap();
    let bad_seq = base + k as u64;

    ok(&run(&dir, &["stats"]));
    let out = run(&dir, &["verify"]);
    let line = fails(&out, 4);
    assert!(
        line.contains(&format!("seq {bad_seq}")) && line.contains("repair"),
        "{line}"
    );
    let report = json(&text(&out.stdout));
    assert_eq!(report["clean"], false);
    // The bad record, then its aggregate's broken version chain.
    assert!(report["problem_count"].as_u64().unwrap() >= 1);
    let first = report["problems"][0].as_str().unwrap();
    assert!(
        first.contains(&format!("seq {bad_seq}")) && first.contains("checksum"),
        "{report}"
    );
    let line = fails(&run(&dir, &["export"]), 4);
    assert!(line.contains(&format!("seq {bad_seq}")), "{line}");
    let pretty = run(&dir, &["verify", "--pretty"]);
    assert!(
        text(&pretty.stdout).contains(" problems"),
        "{}",
        text(&pretty.stdout)
    );
    assert!(
        text(&pretty.stdout).contains("checksum"),
        "{}",
        text(&pretty.stdout)
    );

    let report = json(&ok(&run(&dir, &["repair"])));
    assert_eq!(report["damaged"], true);
    assert_eq!(report["quarantined"][0]["first_lost_seq"], bad_seq);
    assert_eq!(report["events"], bad_seq);
    assert_eq!(report["records_lost"], 1_000 - bad_seq);
    let verified = json(&ok(&run(&dir, &["verify"])));
    assert_eq!(verified["events_checked"], bad_seq);
}

#[test]
fn reindex_rebuilds_the_index_from_the_log() {
    let (_tmp, dir) = imported();
    std::fs::remove_dir_all(dir.join("index")).unwrap();
    let report = json(&ok(&run(&dir, &["reindex"])));
    assert_eq!(report["events_indexed"], 3411);
    assert_eq!(report["aggregates"], 500);
    assert_eq!(report["types"], 6);
    assert_eq!(
        json_lines(&ok(&run(&dir, &["read", "--aggregate", "INC0000197"]))).len(),
        26
    );
    ok(&run(&dir, &["verify"]));
    let pretty = ok(&run(&dir, &["reindex", "--pretty"]));
    assert!(
        pretty.contains("3,411 events, 500 aggregates, 6 types"),
        "{pretty}"
    );
}

#[test]
fn subscriptions_and_dead_letters_are_inspected_and_managed() {
    let (_tmp, dir) = imported();
    assert_eq!(ok(&run(&dir, &["subscriptions"])), "");
    assert!(
        !dir.join("subscriptions").exists(),
        "inspecting created the publisher's database"
    );
    // An application's subscription that refuses Closed incidents.
    {
        let store = Store::open(&dir, Options::default()).unwrap();
        let publisher = Publisher::open(&store).unwrap();
        let sub = publisher
            .subscribe(
                "mailer",
                SubscriptionOptions::default(),
                |e: &EventRef<'_>, _: u32| {
                    if e.event_type == "Closed" {
                        Err(HandlerError::Permanent(
                            "no mail for closed incidents".into(),
                        ))
                    } else {
                        Ok(())
                    }
                },
            )
            .unwrap();
        assert!(sub.wait_until_handled(3410, Duration::from_secs(30)));
        sub.stop(Duration::from_secs(30)).unwrap();
    }
    let subs = json_lines(&ok(&run(&dir, &["subscriptions"])));
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0]["name"], "mailer");
    assert_eq!(subs[0]["checkpoint"], 3411);
    assert_eq!(subs[0]["lag_events"], 0);
    assert_eq!(subs[0]["dead_letters"], 503);
    let stats = json(&ok(&run(&dir, &["stats"])));
    assert_eq!(stats["subscriptions"], serde_json::json!(subs));
    assert!(ok(&run(&dir, &["subscriptions", "--pretty"])).contains("mailer"));
    ok(&run(&dir, &["append", "--aggregate", "x", "--type", "T"]));
    assert_eq!(
        json_lines(&ok(&run(&dir, &["subscriptions"])))[0]["lag_events"],
        1
    );

    let list = json_lines(&ok(&run(&dir, &["deadletters", "list", "mailer"])));
    assert_eq!(list.len(), 503);
    assert!(list
        .iter()
        .all(|d| d["type"] == "Closed" && d["redrive_requested"] == false));
    assert_eq!(list[0]["last_error"], "no mail for closed incidents");
    let first_id = list[0]["id"].as_u64().unwrap();
    let shown = json(&ok(&run(
        &dir,
        &["deadletters", "show", "mailer", &first_id.to_string()],
    )));
    assert_eq!(shown["seq"], list[0]["seq"]);
    assert_eq!(shown["event"]["type"], "Closed");
    assert_eq!(shown["event"]["seq"], list[0]["seq"]);
    assert!(
        ok(&run(&dir, &["deadletters", "list", "mailer", "--pretty"]))
            .contains("no mail for closed")
    );

    let line = fails(&run(&dir, &["deadletters", "show", "mailer", "999999"]), 2);
    assert!(line.contains("999999"), "{line}");
    let line = fails(
        &run(&dir, &["deadletters", "redrive", "mailer", "999999"]),
        2,
    );
    assert!(line.contains("nothing was marked"), "{line}");
    let line = fails(&run(&dir, &["deadletters", "list", "nobody"]), 2);
    assert!(line.contains("mailer"), "{line}");
    fails(&run(&dir, &["deadletters", "list", "bad/name"]), 1);

    let ids: Vec<String> = list[..2].iter().map(|d| d["id"].to_string()).collect();
    let out = run(
        &dir,
        &["deadletters", "redrive", "mailer", &ids[0], &ids[1]],
    );
    let marked = json(&ok(&out));
    assert_eq!(marked["marked"].as_array().unwrap().len(), 2);
    assert!(text(&out.stderr).contains("next time it is idle"));
    let list = json_lines(&ok(&run(&dir, &["deadletters", "list", "mailer"])));
    assert_eq!(
        list.iter()
            .filter(|d| d["redrive_requested"] == true)
            .count(),
        2
    );

    // The application's subscription, now accepting everything, redelivers the two.
    {
        let store = Store::open(&dir, Options::default()).unwrap();
        let publisher = Publisher::open(&store).unwrap();
        let sub = publisher
            .subscribe(
                "mailer",
                SubscriptionOptions::default(),
                |_: &EventRef<'_>, _: u32| Ok(()),
            )
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while sub.dead_letters().unwrap().len() != 501 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(sub.dead_letters().unwrap().len(), 501);
        sub.stop(Duration::from_secs(30)).unwrap();
    }
    let purged = json(&ok(&run(&dir, &["deadletters", "purge", "mailer"])));
    assert_eq!(purged["purged"], 501);
    assert_eq!(ok(&run(&dir, &["deadletters", "list", "mailer"])), "");
    assert_eq!(
        json_lines(&ok(&run(&dir, &["subscriptions"])))[0]["dead_letters"],
        0
    );
}

#[test]
fn the_demo_imports_replays_subscribes_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = run(&dir, &["demo"]);
    let stdout = ok(&out);
    for expected in [
        "imported 3,411 events of 500 incidents",
        "history of INC0000045",
        "history of INC0000137",
        "<- earlier than the event before",
        "history of INC0000197 (the longest history, 26 events)",
        "handled 3,411 events",
        "New 984",
        "3,411 events, 500 aggregates, 6 types",
        "clean",
        "done in",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
    assert_eq!(json(&ok(&run(&dir, &["stats"])))["events"], 3411);
    let line = fails(&run(&dir, &["demo"]), 1);
    assert!(line.contains("not an empty directory"), "{line}");
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let (_tmp, dir) = imported();
    let mut child = cmd(&dir)
        .arg("export")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("{\"seq\":0,"), "{first}");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stderr), "");
}

/// An import that stopped part way (a gzip cut short, a bad line) is finished by importing
/// the same file again, fixed: the events it stored are recognized by their ids as already
/// stored, even where its appends ended elsewhere than this run's batches, and the store
/// ends up as the source, byte for byte.
#[test]
fn an_import_stopped_part_way_is_finished_by_importing_the_same_file_again() {
    let (tmp, source) = imported();
    let exported = ok(&run(&source, &["export"]));
    let lines: Vec<&str> = exported.lines().collect();
    assert_eq!(lines.len(), 3_411);

    // Cut short: a gzip of the export, half of it.
    let gz_path = tmp.path().join("all.jsonl.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(exported.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    std::fs::write(&gz_path, &gz).unwrap();
    let cut = tmp.path().join("cut.jsonl.gz");
    std::fs::write(&cut, &gz[..gz.len() / 2]).unwrap();
    let target = tmp.path().join("target");
    fails(&run(&target, &["import", cut.to_str().unwrap()]), 2);
    let stored_first = json(&ok(&run(&target, &["stats"])))["events"]
        .as_u64()
        .unwrap();
    assert!(stored_first > 0 && stored_first < 3_411, "{stored_first}");
    let out = run(&target, &["import", gz_path.to_str().unwrap()]);
    ok(&out);
    let err = text(&out.stderr);
    // The summary counts with thousands separators.
    let digits = stored_first.to_string();
    let grouped: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    assert!(
        err.contains(&format!(
            "{} of them were already stored",
            grouped.join(",")
        )),
        "{err}"
    );
    assert_eq!(ok(&run(&target, &["export"])), exported);

    // A bad line: the error says how to go on; the fixed file imported again completes it.
    let mut broken: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    broken[1_000] = "{not json".into();
    let broken_path = tmp.path().join("broken.jsonl");
    std::fs::write(&broken_path, broken.join("\n")).unwrap();
    let target = tmp.path().join("target-2");
    let line = fails(&run(&target, &["import", broken_path.to_str().unwrap()]), 1);
    assert!(
        line.contains("line 1001") && line.contains("tail -n +1002"),
        "{line}"
    );
    broken[1_000] = lines[1_000].to_string();
    std::fs::write(&broken_path, broken.join("\n")).unwrap();
    ok(&run(&target, &["import", broken_path.to_str().unwrap()]));
    assert_eq!(ok(&run(&target, &["export"])), exported);
}

/// Input as other tools write it: a byte order mark before line 1 (and before `--data`
/// files), and gzip arriving through a pipe one byte first.
#[test]
fn imports_take_a_byte_order_mark_and_gzip_that_trickles_in() {
    let (tmp, dir) = new_dir();
    let bom = tmp.path().join("bom.jsonl");
    std::fs::write(
        &bom,
        b"\xEF\xBB\xBF{\"aggregate\":\"a\",\"type\":\"T\",\"data\":{}}\n",
    )
    .unwrap();
    ok(&run(&dir, &["import", bom.to_str().unwrap()]));
    let data = tmp.path().join("data.json");
    std::fs::write(&data, b"\xEF\xBB\xBF{\"n\":1}").unwrap();
    let at_data = format!("@{}", data.display());
    ok(&run(
        &dir,
        &[
            "append",
            "--aggregate",
            "a",
            "--type",
            "T",
            "--data",
            &at_data,
        ],
    ));
    assert_eq!(json(&ok(&run(&dir, &["stats"])))["events"], 2);

    let gz = std::fs::read(FIXTURE).unwrap();
    let (_t, piped) = new_dir();
    let mut child = cmd(&piped)
        .args(["import", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn eventlog");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(&gz[..1]).unwrap();
    input.flush().unwrap();
    // Long enough that the importer's first read gets the one byte alone.
    std::thread::sleep(Duration::from_millis(300));
    input.write_all(&gz[1..]).unwrap();
    drop(input);
    ok(&child.wait_with_output().expect("wait"));
    assert_eq!(json(&ok(&run(&piped, &["stats"])))["events"], 3_411);
}
