//! Through the WebSocket server on loopback: append throughput with 16 clients (single
//! events, `Durability::Sync`), and the fan-out of a stream of appends to 100
//! subscribers. Prints events/s and latency percentiles.
//!
//! `cargo bench --bench server`; `EVENTLOG_BENCH_SECS=N` sets each phase's length
//! (default 15 s). The server runs on its own 2-worker runtime, the clients on another.

use eventlog::log::Durability;
use eventlog::server::tokens::{self, NewToken, Permissions};
use eventlog::server::{Server, ServerConfig};
use eventlog::store::{Options, Store};
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const APPEND_CLIENTS: usize = 16;
const SUBSCRIBERS: usize = 100;
const FANOUT_APPENDERS: usize = 4;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: SocketAddr, token: &str) -> Ws {
    let mut req = format!("ws://{addr}/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    tokio_tungstenite::connect_async(req)
        .await
        .expect("connect")
        .0
}

/// The number after `"key":` in `text` (cheaper than parsing the whole message).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

async fn next_text(ws: &mut Ws) -> Option<String> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return Some(t.as_str().to_string()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// Appends single events until `stop`; returns each append's latency in microseconds.
async fn appender(
    addr: SocketAddr,
    token: String,
    aggregate: String,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<u32> {
    let mut ws = connect(addr, &token).await;
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        id += 1;
        let sent = Instant::now();
        let t = epoch.elapsed().as_micros();
        let request = format!(
            r#"{{"id":{id},"op":"append","aggregate":"{aggregate}","type":"Measured","data":{{"t":{t},"pad":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}}}}"#
        );
        ws.send(Message::text(request)).await.expect("send");
        let answer = next_text(&mut ws).await.expect("answer");
        assert!(answer.contains("\"ok\":true"), "{answer}");
        latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
    }
    let _ = ws.close(None).await;
    latencies
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1_000.0
}

fn report(label: &str, mut latencies: Vec<u32>) -> String {
    latencies.sort_unstable();
    format!(
        "{label} latency ms: p50 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        percentile(&latencies, 1.0),
    )
}

fn main() {
    let secs: u64 = std::env::var("EVENTLOG_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let phase = Duration::from_secs(secs);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("store");
    let tokens_path = dir.join(tokens::TOKENS_FILE_NAME);
    let (_, token) = tokens::add_token(
        &tokens_path,
        &NewToken {
            name: "bench".into(),
            permissions: Permissions {
                read: true,
                append: true,
                admin: true,
            },
            scope: None,
            expires_in: None,
        },
    )
    .expect("token");
    let mut options = Options::default();
    options.log.durability = Durability::Sync;
    let store = Store::open(&dir, options).expect("store");

    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    config.tokens_path = Some(tokens_path);
    let server_rt = eventlog::server::runtime(&config).expect("server runtime");
    let server = server_rt
        .block_on(Server::bind(store.clone(), config))
        .expect("bind");
    let addr = server.local_addr();
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = server_rt.spawn(server.serve(async move {
        let _ = stopped.await;
    }));
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    let epoch = Instant::now();

    // Phase 1: 16 clients append single events, each waiting for its answer.
    let stop = Arc::new(AtomicBool::new(false));
    let seq_before = store.next_seq();
    let started = Instant::now();
    let tasks: Vec<_> = (0..APPEND_CLIENTS)
        .map(|i| {
            clients.spawn(appender(
                addr,
                token.clone(),
                format!("bench-{i}"),
                epoch,
                Arc::clone(&stop),
            ))
        })
        .collect();
    std::thread::sleep(phase);
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(clients.block_on(t).expect("appender"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let appended = store.next_seq() - seq_before;
    println!(
        "append: {APPEND_CLIENTS} clients, single events, Durability::Sync, {elapsed:.1} s: {:.0} events/s",
        appended as f64 / elapsed
    );
    println!("  {}", report("append", latencies));

    // Phase 2: 100 subscribers receive what 4 clients append.
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| {
            let token = token.clone();
            clients.spawn(async move {
                let mut ws = connect(addr, &token).await;
                ws.send(Message::text(
                    r#"{"id":1,"op":"subscribe","types":["Measured"]}"#,
                ))
                .await
                .expect("subscribe");
                let answer = next_text(&mut ws).await.expect("answer");
                assert!(answer.contains("\"ok\":true"), "{answer}");
                ws
            })
        })
        .collect();
    let subscribers: Vec<Ws> = subscribers
        .into_iter()
        .map(|t| clients.block_on(t).expect("subscriber"))
        .collect();
    let stop_receiving = Arc::new(AtomicBool::new(false));
    let receivers: Vec<_> = subscribers
        .into_iter()
        .map(|mut ws| {
            let stop = Arc::clone(&stop_receiving);
            clients.spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut last_seq = None;
                let mut disconnected = false;
                while !stop.load(Ordering::Relaxed) {
                    let next =
                        tokio::time::timeout(Duration::from_millis(200), next_text(&mut ws)).await;
                    let text = match next {
                        Err(_) => continue,
                        Ok(None) => {
                            disconnected = true;
                            break;
                        }
                        Ok(Some(t)) => t,
                    };
                    let now = epoch.elapsed().as_micros() as u64;
                    if let (Some(t), Some(seq)) = (
                        number_after(&text, "\"t\":"),
                        number_after(&text, "\"seq\":"),
                    ) {
                        if let Some(last) = last_seq {
                            assert!(seq > last, "out of order: {seq} after {last}");
                        }
                        last_seq = Some(seq);
                        latencies.push(u32::try_from(now.saturating_sub(t)).unwrap_or(u32::MAX));
                    }
                }
                (latencies, disconnected)
            })
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let seq_before = store.next_seq();
    let started = Instant::now();
    let tasks: Vec<_> = (0..FANOUT_APPENDERS)
        .map(|i| {
            clients.spawn(appender(
                addr,
                token.clone(),
                format!("fan-{i}"),
                epoch,
                Arc::clone(&stop),
            ))
        })
        .collect();
    std::thread::sleep(phase);
    stop.store(true, Ordering::Relaxed);
    let mut append_latencies = Vec::new();
    for t in tasks {
        append_latencies.extend(clients.block_on(t).expect("appender"));
    }
    let appended = store.next_seq() - seq_before;
    // Let the subscribers drain what was appended last.
    std::thread::sleep(Duration::from_secs(2));
    stop_receiving.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64() - 2.0;
    let mut delivery = Vec::new();
    let mut disconnected = 0;
    for r in receivers {
        let (l, d) = clients.block_on(r).expect("receiver");
        delivery.extend(l);
        disconnected += usize::from(d);
    }
    let delivered = delivery.len();
    println!(
        "fan-out: {FANOUT_APPENDERS} appenders, {SUBSCRIBERS} subscribers, {elapsed:.1} s: {:.0} events/s appended, {:.0} events/s delivered ({delivered} of {} expected; {disconnected} subscribers disconnected)",
        appended as f64 / elapsed,
        delivered as f64 / elapsed,
        appended as usize * SUBSCRIBERS,
    );
    println!("  {}", report("append", append_latencies));
    println!("  {}", report("append-to-delivery", delivery));

    let _ = stop_server.send(());
    server_rt
        .block_on(serving)
        .expect("serve task")
        .expect("serve");
}
