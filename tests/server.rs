//! End-to-end tests of the WebSocket server: a real client (tokio-tungstenite) against a
//! server on an ephemeral loopback port, with real tokens, limits, TLS and shutdown.

use eventlog::log::Durability;
use eventlog::server::tokens::{self, NewToken, Permissions, TokenFile};
use eventlog::server::{Server, ServerConfig, ServerError};
use eventlog::store::{Options, Store};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single wait in these tests may take before it is a failure.
const WAIT: Duration = Duration::from_secs(20);

/// Logs of the server on stderr when `RUST_LOG` is set (for debugging a failure).
fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

fn options(durability: Durability) -> Options {
    let mut o = Options::default();
    o.log.durability = durability;
    o
}

/// A server on 127.0.0.1:0 over a fresh store, with a token file.
struct TestServer {
    addr: SocketAddr,
    store: Store,
    tokens_path: PathBuf,
    dir: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    _tmp: tempfile::TempDir,
}

/// Tokens made for a test: name -> token.
fn add_token(
    path: &Path,
    name: &str,
    read: bool,
    append: bool,
    admin: bool,
    scope: Option<&str>,
) -> String {
    tokens::add_token(
        path,
        &NewToken {
            name: name.into(),
            permissions: Permissions {
                read,
                append,
                admin,
            },
            scope: scope.map(Into::into),
            expires_in: None,
        },
    )
    .expect("add token")
    .1
}

impl TestServer {
    /// `tokens`: whether to configure the token file (with an admin token, returned).
    async fn start(
        durability: Durability,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> (TestServer, String) {
        init_logs();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let tokens_path = dir.join(tokens::TOKENS_FILE_NAME);
        let admin = add_token(&tokens_path, "admin", false, false, true, None);
        let store = Store::open(&dir, options(durability)).unwrap();
        let mut config = ServerConfig::default();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.tokens_path = Some(tokens_path.clone());
        configure(&mut config);
        let server = Server::bind(store.clone(), config).await.unwrap();
        let addr = server.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(async move {
            let _ = rx.await;
        }));
        (
            TestServer {
                addr,
                store,
                tokens_path,
                dir,
                shutdown: Some(tx),
                task: Some(task),
                _tmp: tmp,
            },
            admin,
        )
    }

    fn token(&self, name: &str, read: bool, append: bool, scope: Option<&str>) -> String {
        add_token(&self.tokens_path, name, read, append, false, scope)
    }

    /// Shuts down gracefully and waits for `serve` to return.
    async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("shutdown in time")
                .expect("serve task")
                .expect("serve result");
        }
    }

    async fn metrics(&self, token: &str) -> String {
        let (status, body) = http_get(self.addr, "/metrics", Some(token)).await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// A minimal HTTP/1.1 GET; returns the status and the body.
async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A WebSocket client that matches answers to requests by id and keeps the other
/// messages (subscription events) in order.
struct Client<S = MaybeTlsStream<TcpStream>> {
    ws: WebSocketStream<S>,
    next_id: u64,
    pushed: VecDeque<Value>,
}

fn ws_request(
    addr: SocketAddr,
    token: Option<&str>,
    scheme: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = format!("{scheme}://{addr}/ws")
        .into_client_request()
        .unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

async fn connect(addr: SocketAddr, token: Option<&str>) -> Result<Client, WsError> {
    let (ws, _) = tokio_tungstenite::connect_async(ws_request(addr, token, "ws")).await?;
    Ok(Client::new(ws))
}

/// The HTTP status of a refused upgrade, and its body.
async fn refused(addr: SocketAddr, token: Option<&str>) -> (u16, Vec<u8>) {
    match tokio_tungstenite::connect_async(ws_request(addr, token, "ws")).await {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(WsError::Http(r)) => (r.status().as_u16(), r.body().clone().unwrap_or_default()),
        Err(e) => panic!("unexpected error {e}"),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(ws: WebSocketStream<S>) -> Self {
        Client {
            ws,
            next_id: 1,
            pushed: VecDeque::new(),
        }
    }

    async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// The next message, parsed; `None` at a close frame or the end of the stream.
    async fn next_raw(&mut self) -> Option<Result<Value, Option<CloseFrame>>> {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a message in time");
            match m {
                None | Some(Err(_)) => return Some(Err(None)),
                Some(Ok(Message::Text(t))) => {
                    return Some(Ok(
                        serde_json::from_str(t.as_str()).expect("the server sends JSON")
                    ))
                }
                Some(Ok(Message::Close(f))) => return Some(Err(f)),
                Some(Ok(_)) => continue,
            }
        }
    }

    async fn next_json(&mut self) -> Value {
        match self.next_raw().await {
            Some(Ok(v)) => v,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Sends `request` with a fresh id; returns its answer.
    async fn request(&mut self, mut request: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        self.send_text(&request.to_string()).await;
        self.answer(id).await
    }

    async fn answer(&mut self, id: u64) -> Value {
        loop {
            let m = self.next_json().await;
            if m.get("id") == Some(&json!(id)) {
                return m;
            }
            assert!(m.get("sub").is_some(), "unexpected message {m}");
            self.pushed.push_back(m);
        }
    }

    /// The next pushed (subscription) message.
    async fn pushed(&mut self) -> Value {
        match self.pushed.pop_front() {
            Some(m) => m,
            None => self.next_json().await,
        }
    }

    /// Reads until the close frame; returns it (`None`: the stream ended without one).
    async fn close_frame(&mut self) -> Option<CloseFrame> {
        loop {
            match self.next_raw().await {
                Some(Ok(m)) => self.pushed.push_back(m),
                Some(Err(f)) => return f,
                None => return None,
            }
        }
    }
}

fn assert_ok(answer: &Value) {
    assert_eq!(answer["ok"], json!(true), "{answer}");
}

fn assert_error(answer: &Value, code: &str) {
    assert_eq!(answer["ok"], json!(false), "{answer}");
    assert_eq!(answer["error"]["code"], json!(code), "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{answer}"
    );
}

fn append(aggregate: &str, data: Value) -> Value {
    json!({"op": "append", "aggregate": aggregate, "type": "T", "data": data})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_wrong_removed_and_expired_tokens_get_401_and_nothing_else() {
    let (mut server, admin) = TestServer::start(Durability::None, |_| {}).await;
    let reader = server.token("reader", true, false, None);
    let doomed = server.token("doomed", true, false, None);
    let expiring = server.token("expiring", true, false, None);

    for token in [None, Some("0".repeat(64).as_str()), Some("short"), Some("")] {
        let (status, body) = refused(server.addr, token).await;
        assert_eq!(status, 401, "{token:?}");
        assert!(body.is_empty(), "a refusal says nothing: {body:?}");
    }
    // A token in the wrong scheme is no token.
    let mut req = format!("ws://{}/ws", server.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Basic {reader}").parse().unwrap());
    assert!(matches!(
        tokio_tungstenite::connect_async(req).await,
        Err(WsError::Http(r)) if r.status() == 401
    ));

    let mut c = connect(server.addr, Some(&reader)).await.unwrap();
    assert_ok(&c.request(json!({"op": "read", "all": true})).await);
    assert!(connect(server.addr, Some(&doomed)).await.is_ok());

    // Removed while the server runs: refused from the next connection on.
    tokens::remove_token(&server.tokens_path, "doomed").unwrap();
    assert_eq!(refused(server.addr, Some(&doomed)).await.0, 401);
    // Expired: the file says so, and the server rereads it.
    let mut file = TokenFile::load(&server.tokens_path).unwrap();
    for t in &mut file.tokens {
        if t.name == "expiring" {
            t.expires_us = Some(t.created_us);
        }
    }
    file.save(&server.tokens_path).unwrap();
    assert_eq!(refused(server.addr, Some(&expiring)).await.0, 401);
    // The others still work, including the open connection.
    assert!(connect(server.addr, Some(&reader)).await.is_ok());
    assert_ok(&c.request(json!({"op": "read", "all": true})).await);

    // /metrics needs a token with admin; /health needs none.
    assert_eq!(http_get(server.addr, "/metrics", None).await.0, 401);
    assert_eq!(
        http_get(server.addr, "/metrics", Some(&reader)).await.0,
        403
    );
    let metrics = server.metrics(&admin).await;
    let failures = sample(&metrics, "eventlog_server_auth_failures_total");
    assert!(failures >= 8.0, "{failures}");
    let (status, body) = http_get(server.addr, "/health", None).await;
    assert_eq!((status, body.as_str()), (200, "{\"status\":\"ok\"}"));
    assert_eq!(http_get(server.addr, "/nope", None).await.0, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_and_scope_are_enforced_on_read_append_and_subscribe() {
    let (mut server, admin) = TestServer::start(Durability::None, |_| {}).await;
    let mut root = connect(server.addr, Some(&admin)).await.unwrap();
    for agg in ["acme-1", "acme-2", "other-1"] {
        assert_ok(&root.request(append(agg, json!({"agg": agg}))).await);
    }
    let scoped = server.token("acme", true, true, Some("acme-"));
    let read_only = server.token("ro", true, false, None);
    let append_only = server.token("wo", false, true, None);

    let mut ro = connect(server.addr, Some(&read_only)).await.unwrap();
    assert_error(&ro.request(append("acme-1", json!(1))).await, "forbidden");
    assert_ok(
        &ro.request(json!({"op": "read", "aggregate": "other-1"}))
            .await,
    );
    let mut wo = connect(server.addr, Some(&append_only)).await.unwrap();
    assert_error(
        &wo.request(json!({"op": "read", "all": true})).await,
        "forbidden",
    );
    assert_error(
        &wo.request(json!({"op": "subscribe", "from": 0})).await,
        "forbidden",
    );
    assert_ok(&wo.request(append("other-2", json!(1))).await);

    let mut c = connect(server.addr, Some(&scoped)).await.unwrap();
    // Append: inside the scope only; nothing is stored outside it.
    assert_ok(&c.request(append("acme-3", json!(3))).await);
    let before = server.store.next_seq();
    let a = c.request(append("other-3", json!(3))).await;
    assert_error(&a, "forbidden");
    assert!(
        a["error"]["message"].as_str().unwrap().contains("scope"),
        "{a}"
    );
    assert_eq!(
        server.store.next_seq(),
        before,
        "a refused append stored something"
    );
    // Read: an aggregate outside is refused; type and all reads see only the scope.
    assert_error(
        &c.request(json!({"op": "read", "aggregate": "other-1"}))
            .await,
        "forbidden",
    );
    let all = c.request(json!({"op": "read", "all": true})).await;
    let aggs: Vec<&str> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["aggregate"].as_str().unwrap())
        .collect();
    assert_eq!(aggs, ["acme-1", "acme-2", "acme-3"]);
    assert_eq!(all["next"], json!(server.store.next_seq()));
    let typed = c.request(json!({"op": "read", "type": "T"})).await;
    assert_eq!(typed["events"].as_array().unwrap().len(), 3, "{typed}");
    // Subscribe: a prefix outside is refused; no prefix (or a wider one) is narrowed.
    assert_error(
        &c.request(json!({"op": "subscribe", "from": 0, "aggregate_prefix": "other"}))
            .await,
        "forbidden",
    );
    let s = c.request(json!({"op": "subscribe", "from": 0})).await;
    assert_ok(&s);
    let s2 = c
        .request(json!({"op": "subscribe", "from": 0, "aggregate_prefix": "ac"}))
        .await;
    assert_ok(&s2);
    let mut seen: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for _ in 0..6 {
        let m = c.pushed().await;
        seen.entry(m["sub"].as_u64().unwrap())
            .or_default()
            .push(m["event"]["aggregate"].as_str().unwrap().to_string());
    }
    for (_, aggs) in seen {
        assert_eq!(aggs, ["acme-1", "acme-2", "acme-3"]);
    }
    // Nothing outside the scope arrives later either.
    assert_ok(&root.request(append("other-4", json!(4))).await);
    assert_ok(&root.request(append("acme-9", json!(9))).await);
    for _ in 0..2 {
        let m = c.pushed().await;
        assert_eq!(m["event"]["aggregate"], json!("acme-9"), "{m}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_and_read_answer_in_the_cli_event_shape_with_paging_and_conflicts() {
    let (mut server, admin) = TestServer::start(Durability::Sync, |_| {}).await;
    let mut c = connect(server.addr, Some(&admin)).await.unwrap();
    let id = "6f1c3a52-9a7c-4d2b-8c51-0c7d8b1e2f3a";
    let a = c
        .request(
            json!({"op": "append", "aggregate": "order-1", "type": "Placed",
            "data": {"total": 12}, "expected_version": "none", "event_id": id,
            "metadata": {"correlation_id": "req-9", "user": "ann"}}),
        )
        .await;
    assert_eq!(
        (a["seq"].clone(), a["version"].clone()),
        (json!(0), json!(1)),
        "{a}"
    );
    // The same event id again is a retry: the original answer, nothing stored.
    let retry = c
        .request(
            json!({"op": "append", "aggregate": "order-1", "type": "Placed",
            "data": {"total": 12}, "expected_version": "none", "event_id": id,
            "metadata": {"correlation_id": "req-9", "user": "ann"}}),
        )
        .await;
    assert_eq!(retry["seq"], json!(0), "{retry}");
    let conflict = c
        .request(json!({"op": "append", "aggregate": "order-1", "type": "Paid", "data": {}, "expected_version": 5}))
        .await;
    assert_error(&conflict, "wrong_expected_version");
    assert_eq!(conflict["error"]["expected"], json!(5));
    assert_eq!(conflict["error"]["actual"], json!(1));
    let none = c
        .request(json!({"op": "append", "aggregate": "order-1", "type": "Paid", "data": {}, "expected_version": "none"}))
        .await;
    assert_eq!(none["error"]["expected"], json!("none"), "{none}");
    let several = c
        .request(
            json!({"op": "append", "aggregate": "order-1", "expected_version": 1, "events": [
                {"type": "Paid", "data": {"amount": 12}},
                {"type": "Shipped", "data_base64": "AAEC"},
                {"type": "Noted", "data": "a note", "ts": "2020-01-02T03:04:05.000006Z"}
            ]}),
        )
        .await;
    assert_eq!(several["seq"], json!(3), "{several}");
    assert_eq!(several["first_seq"], json!(1));
    assert_eq!(several["version"], json!(4));
    assert_error(
        &c.request(json!({"op": "append", "aggregate": "order-1", "type": "Bad\u{1}", "data": 1}))
            .await,
        "invalid_event",
    );

    // The events are in the JSON shape of the command line.
    let r = c
        .request(json!({"op": "read", "aggregate": "order-1"}))
        .await;
    let events = r["events"].as_array().unwrap();
    assert_eq!(events.len(), 4);
    assert_eq!(r["next"], json!(5));
    for (i, e) in events.iter().enumerate() {
        let stored = server.store.read_seq(i as u64).unwrap();
        assert_eq!(
            e,
            &eventlog::json::event_to_json(&stored.event().unwrap()),
            "{e}"
        );
    }
    assert_eq!(
        events[0]["metadata"],
        json!({"correlation_id": "req-9", "user": "ann"})
    );
    assert_eq!(events[0]["id"], json!(id));
    assert_eq!(events[2]["data_base64"], json!("AAEC"));
    assert_eq!(events[3]["ts"], json!("2020-01-02T03:04:05.000006Z"));
    let keys: Vec<&String> = events[0].as_object().unwrap().keys().collect();
    for k in [
        "seq",
        "aggregate",
        "version",
        "type",
        "ts",
        "id",
        "metadata",
        "data",
    ] {
        assert!(keys.iter().any(|x| *x == k), "{k} missing from {keys:?}");
    }

    // Paging: by version for an aggregate, by seq for a type or everything.
    let p1 = c
        .request(json!({"op": "read", "aggregate": "order-1", "from": 2, "limit": 2}))
        .await;
    let versions: Vec<u64> = p1["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [2, 3]);
    assert_eq!(p1["next"], json!(4));
    let mut seqs = Vec::new();
    let mut from = 0;
    loop {
        let p = c
            .request(json!({"op": "read", "all": true, "from": from, "limit": 3}))
            .await;
        let page = p["events"].as_array().unwrap();
        if page.is_empty() {
            break;
        }
        seqs.extend(page.iter().map(|e| e["seq"].as_u64().unwrap()));
        from = p["next"].as_u64().unwrap();
    }
    assert_eq!(seqs, [0, 1, 2, 3]);
    let paid = c
        .request(json!({"op": "read", "type": "Paid", "from": 0}))
        .await;
    assert_eq!(paid["events"].as_array().unwrap().len(), 1, "{paid}");
    let empty = c
        .request(json!({"op": "read", "aggregate": "nobody"}))
        .await;
    assert_eq!(empty["events"], json!([]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_from_zero_gets_every_event_once_in_order_across_the_switch_to_live() {
    let (mut server, admin) = TestServer::start(Durability::Sync, |_| {}).await;
    // Stored events, appended straight to the store.
    const STORED: u64 = 3_000;
    const LIVE: u64 = 400;
    let batch: Vec<_> = (0..100)
        .map(|i| eventlog::store::NewEvent::json_text("T", format!("{{\"i\":{i}}}")))
        .collect();
    for b in 0..STORED / 100 {
        server
            .store
            .append(
                &format!("stored-{b}"),
                eventlog::store::ExpectedVersion::Any,
                &batch,
            )
            .unwrap();
    }
    let mut sub = connect(server.addr, Some(&admin)).await.unwrap();
    let mut writer = connect(server.addr, Some(&admin)).await.unwrap();
    // The writer appends while the subscriber catches up.
    let appends = tokio::spawn(async move {
        for i in 0..LIVE {
            let a = writer
                .request(append(&format!("live-{}", i % 7), json!({"i": i})))
                .await;
            assert_ok(&a);
        }
        writer
    });
    let s = sub.request(json!({"op": "subscribe", "from": 0})).await;
    assert_ok(&s);
    assert_eq!(s["from"], json!(0));
    let sub_id = s["sub"].clone();
    let mut live_seen = 0;
    for expected in 0..STORED + LIVE {
        let m = sub.pushed().await;
        assert_eq!(m["sub"], sub_id);
        assert_eq!(m["event"]["seq"], json!(expected), "gap or duplicate: {m}");
        if m["event"]["aggregate"]
            .as_str()
            .unwrap()
            .starts_with("live-")
        {
            live_seen += 1;
        }
    }
    assert_eq!(live_seen, LIVE);
    let _writer = appends.await.unwrap();
    // Nothing more: a read answered now is the next message.
    let r = sub
        .request(json!({"op": "read", "all": true, "from": 0, "limit": 1}))
        .await;
    assert_ok(&r);
    assert!(sub.pushed.is_empty(), "extra events: {:?}", sub.pushed);

    // Filters, and unsubscribe stops the events.
    let t = sub
        .request(json!({"op": "subscribe", "types": ["U"], "aggregate_prefix": "f-"}))
        .await;
    let t_id = t["sub"].clone();
    let mut admin_client = connect(server.addr, Some(&admin)).await.unwrap();
    for (agg, ty) in [("f-1", "T"), ("g-1", "U"), ("f-2", "U")] {
        assert_ok(
            &admin_client
                .request(json!({"op": "append", "aggregate": agg, "type": ty, "data": 0}))
                .await,
        );
    }
    // The first subscription sees all three; the filtered one only f-2.
    let mut filtered = Vec::new();
    for _ in 0..4 {
        let m = sub.pushed().await;
        if m["sub"] == t_id {
            filtered.push(m["event"]["aggregate"].clone());
        }
    }
    assert_eq!(filtered, [json!("f-2")]);
    assert_ok(&sub.request(json!({"op": "unsubscribe", "sub": t_id})).await);
    assert_error(
        &sub.request(json!({"op": "unsubscribe", "sub": t_id})).await,
        "unknown_subscription",
    );
    assert_ok(
        &admin_client
            .request(json!({"op": "append", "aggregate": "f-3", "type": "U", "data": 0}))
            .await,
    );
    // The first subscription (everything) still runs and sees it; the second does not.
    let m = sub.pushed().await;
    assert_eq!(m["sub"], sub_id);
    let r = sub
        .request(json!({"op": "read", "all": true, "limit": 0}))
        .await;
    assert_ok(&r);
    let mut rest = sub.pushed.drain(..).collect::<Vec<_>>();
    rest.retain(|m| m["sub"] == t_id);
    assert!(rest.is_empty(), "events after unsubscribe: {rest:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_disconnected_while_a_fast_one_keeps_up() {
    let (mut server, admin) = TestServer::start(Durability::None, |c| {
        c.send_queue_len_max = 64;
        c.send_queue_wait_ms = 300;
    })
    .await;
    // The slow client's socket takes little before it stops accepting data.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(
        ws_request(server.addr, Some(&admin), "ws"),
        MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();
    let mut slow = Client::new(ws);
    assert_ok(&slow.request(json!({"op": "subscribe", "from": 0})).await);
    let mut fast = connect(server.addr, Some(&admin)).await.unwrap();
    assert_ok(&fast.request(json!({"op": "subscribe", "from": 0})).await);

    // Append until the slow consumer is cut off: the kernel's socket buffers take several
    // MiB before the server's queue fills at all.
    const BATCHES_MAX: u64 = 400;
    const PER_BATCH: u64 = 50;
    let payload = "x".repeat(4_000);
    let mut writer = connect(server.addr, Some(&admin)).await.unwrap();
    let (total_tx, total_rx) = oneshot::channel::<u64>();
    let reader = tokio::spawn(async move {
        let mut expected = 0;
        let mut total_rx = total_rx;
        let mut total = None;
        while total.is_none_or(|t| expected < t) {
            tokio::select! {
                // Stream::next is cancel-safe: no message is lost when the total arrives.
                m = fast.pushed() => {
                    assert_eq!(m["event"]["seq"], json!(expected));
                    expected += 1;
                }
                t = &mut total_rx, if total.is_none() => total = Some(t.unwrap()),
            }
        }
        fast
    });
    let started = Instant::now();
    let mut batches = 0;
    loop {
        let events: Vec<Value> = (0..PER_BATCH)
            .map(|_| json!({"type": "T", "data": payload}))
            .collect();
        let a = writer
            .request(json!({"op": "append", "aggregate": format!("a-{batches}"), "events": events}))
            .await;
        assert_ok(&a);
        batches += 1;
        if batches % 10 == 0 {
            let metrics = server.metrics(&admin).await;
            if sample(&metrics, "eventlog_server_slow_consumer_disconnects_total") > 0.0 {
                break;
            }
            assert!(
                batches < BATCHES_MAX,
                "the slow consumer was never disconnected"
            );
        }
    }
    let total = batches * PER_BATCH;
    total_tx.send(total).unwrap();
    let append_time = started.elapsed();
    let mut fast = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the fast consumer keeps up")
        .unwrap();
    // The slow consumer was cut off; reading now, it finds the reason at the end.
    let frame = slow.close_frame().await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "slow consumer");
    let got = slow.pushed.len() as u64;
    assert!(got < total, "the slow consumer got everything ({got})");
    eprintln!("slow consumer cut off after {got} of {total} events");
    // The writer never waited for the slow consumer.
    assert!(
        append_time < Duration::from_secs(10),
        "appends took {append_time:?}"
    );
    let metrics = server.metrics(&admin).await;
    assert_eq!(
        sample(&metrics, "eventlog_server_slow_consumer_disconnects_total"),
        1.0
    );
    // The fast one is still served.
    assert_ok(
        &fast
            .request(json!({"op": "read", "all": true, "limit": 1}))
            .await,
    );
    server.stop().await;
}

fn raise_fd_limit(wanted: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < wanted {
            lim.rlim_cur = wanted.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections_are_held_and_the_limit_refuses_more() {
    const CONNECTIONS: usize = 1_000;
    raise_fd_limit(4 * CONNECTIONS as u64 + 256);
    let (mut server, admin) = TestServer::start(Durability::None, |c| {
        c.connections_max = CONNECTIONS + 1;
    })
    .await;
    let started = Instant::now();
    let mut clients = Vec::with_capacity(CONNECTIONS);
    let mut pending = Vec::new();
    for _ in 0..CONNECTIONS {
        let token = admin.clone();
        let addr = server.addr;
        pending.push(tokio::spawn(
            async move { connect(addr, Some(&token)).await },
        ));
        if pending.len() == 100 {
            for p in pending.drain(..) {
                clients.push(p.await.unwrap().expect("connection accepted"));
            }
        }
    }
    for p in pending.drain(..) {
        clients.push(p.await.unwrap().expect("connection accepted"));
    }
    let connected = started.elapsed();
    let metrics = server.metrics(&admin).await;
    assert_eq!(
        sample(&metrics, "eventlog_server_connections"),
        CONNECTIONS as f64
    );
    // Every connection is live: each answers a request.
    let mut answers = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        answers.push(tokio::spawn(async move {
            let a = c.request(append(&format!("c-{}", i % 10), json!(i))).await;
            assert_ok(&a);
            c
        }));
    }
    let mut clients = Vec::new();
    for a in answers {
        clients.push(a.await.unwrap());
    }
    assert_eq!(server.store.next_seq(), CONNECTIONS as u64);
    // One more fits (the limit is CONNECTIONS + 1); the next is refused with 503.
    let extra = connect(server.addr, Some(&admin)).await.unwrap();
    assert_eq!(refused(server.addr, Some(&admin)).await.0, 503);
    let metrics = server.metrics(&admin).await;
    assert_eq!(
        sample(&metrics, "eventlog_server_connections_refused_total"),
        1.0
    );
    drop(extra);
    drop(clients);
    eprintln!("{CONNECTIONS} connections in {connected:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_unknown_and_oversized_messages_get_errors_and_the_connection_lives_on() {
    let (mut server, admin) = TestServer::start(Durability::None, |c| {
        c.message_size_bytes_max = 4_096;
        c.subscriptions_per_connection_max = 2;
    })
    .await;
    let mut c = connect(server.addr, Some(&admin)).await.unwrap();
    let cases: &[(&str, &str, Value)] = &[
        ("{not json", "invalid_json", Value::Null),
        ("[1,2,3]", "invalid_json", Value::Null),
        ("\"a string\"", "invalid_json", Value::Null),
        (r#"{"op":"read","all":true}"#, "bad_request", Value::Null),
        (
            r#"{"id":"seven","op":"read","all":true}"#,
            "bad_request",
            Value::Null,
        ),
        (r#"{"id":1,"op":"launch"}"#, "unknown_op", json!(1)),
        (r#"{"id":2}"#, "bad_request", json!(2)),
        (r#"{"id":3,"op":"read"}"#, "bad_request", json!(3)),
        (
            r#"{"id":4,"op":"read","all":true,"limit":-1}"#,
            "bad_request",
            json!(4),
        ),
        (
            r#"{"id":5,"op":"append","aggregate":"a","type":"T","data":1,"expected_versoin":1}"#,
            "bad_request",
            json!(5),
        ),
        (
            r#"{"id":6,"op":"append","aggregate":"a","events":[]}"#,
            "bad_request",
            json!(6),
        ),
        (
            r#"{"id":7,"op":"append","aggregate":"a","type":"T","data":1,"data_base64":"AA=="}"#,
            "bad_request",
            json!(7),
        ),
        (
            r#"{"id":8,"op":"unsubscribe","sub":99}"#,
            "unknown_subscription",
            json!(8),
        ),
    ];
    for (text, code, id) in cases {
        c.send_text(text).await;
        let m = c.next_json().await;
        assert_error(&m, code);
        assert_eq!(&m["id"], id, "{text}: {m}");
    }
    // Binary messages are refused the same way.
    c.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_error(&c.next_json().await, "invalid_json");
    // Over the limit (but within what the server still reads): an error, no effect.
    let big = append("a", json!("x".repeat(5_000))).to_string();
    c.send_text(&big).await;
    let m = c.next_json().await;
    assert_error(&m, "message_too_large");
    assert_eq!(m["id"], Value::Null);
    assert_eq!(server.store.next_seq(), 0);
    // Too many subscriptions.
    assert_ok(&c.request(json!({"op": "subscribe"})).await);
    assert_ok(&c.request(json!({"op": "subscribe"})).await);
    assert_error(
        &c.request(json!({"op": "subscribe"})).await,
        "too_many_subscriptions",
    );
    // The connection still works.
    assert_ok(&c.request(append("a", json!(1))).await);

    // Far over the limit: answered, then the connection is closed (1009), since the rest
    // of the message cannot be skipped. The server lives on.
    let huge = "x".repeat(64 << 10);
    c.send_text(&huge).await;
    let m = loop {
        let m = c.next_json().await;
        if m.get("sub").is_none() {
            break m;
        }
    };
    assert_error(&m, "message_too_large");
    let frame = c.close_frame().await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Size);
    let mut again = connect(server.addr, Some(&admin)).await.unwrap();
    assert_ok(&again.request(json!({"op": "read", "all": true})).await);
    let metrics = server.metrics(&admin).await;
    assert_eq!(
        sample(&metrics, "eventlog_server_oversized_messages_total"),
        2.0
    );
    server.stop().await;
}

/// The value of the sample `name` (without labels) in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name}"))
}

/// Checks the Prometheus text exposition format line by line; returns the samples.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().unwrap();
            assert!(valid_name(name), "{line}");
            match kind {
                "HELP" => assert!(parts.next().is_some_and(|h| !h.is_empty()), "{line}"),
                "TYPE" => {
                    let t = parts.next().unwrap();
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "{line}"
                    );
                    assert!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "TYPE twice: {line}"
                    );
                }
                _ => panic!("unknown comment {line}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = match series.split_once('{') {
            Some((n, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("{line}"));
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    assert!(valid_name(k), "{line}");
                    let _ = v;
                }
                n
            }
            None => series,
        };
        assert!(valid_name(name), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample before its TYPE: {line}");
        samples.insert(series.to_string(), value);
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_their_counters_move() {
    let (mut server, admin) = TestServer::start(Durability::Sync, |_| {}).await;
    let before = parse_prometheus(&server.metrics(&admin).await);
    for name in [
        "eventlog_appends_total",
        "eventlog_events_appended_total",
        "eventlog_bytes_appended_total",
        "eventlog_fsync_latency_us_count",
        "eventlog_group_commit_records_count",
        "eventlog_index_lag_events",
        "eventlog_server_connections",
        "eventlog_server_messages_in_total",
        "eventlog_server_messages_out_total",
        "eventlog_server_slow_consumer_disconnects_total",
        "eventlog_server_subscription_lag_events_max",
    ] {
        assert!(before.contains_key(name), "{name} missing");
    }
    let mut c = connect(server.addr, Some(&admin)).await.unwrap();
    assert_ok(&c.request(append("m-1", json!({"a": 1}))).await);
    assert_ok(
        &c.request(json!({"op": "append", "aggregate": "m-2", "events": [
            {"type": "T", "data": 1}, {"type": "T", "data": 22}]}))
            .await,
    );
    assert_ok(&c.request(json!({"op": "subscribe", "from": 0})).await);
    for _ in 0..3 {
        c.pushed().await;
    }
    c.send_text("nonsense").await;
    assert_error(&c.next_json().await, "invalid_json");
    let after = parse_prometheus(&server.metrics(&admin).await);
    let delta = |k: &str| after[k] - before.get(k).copied().unwrap_or(0.0);
    assert_eq!(delta("eventlog_appends_total"), 2.0);
    assert_eq!(delta("eventlog_events_appended_total"), 3.0);
    assert_eq!(delta("eventlog_bytes_appended_total"), 10.0); // {"a":1} 1 22
    assert!(delta("eventlog_fsync_latency_us_count") >= 1.0);
    assert_eq!(after["eventlog_server_connections"], 1.0);
    assert_eq!(delta("eventlog_server_connections_total"), 1.0);
    assert_eq!(delta("eventlog_server_messages_in_total"), 4.0);
    // Three answers, three events, one error.
    assert_eq!(delta("eventlog_server_messages_out_total"), 7.0);
    assert_eq!(delta("eventlog_server_request_errors_total"), 1.0);
    assert_eq!(after["eventlog_server_subscriptions"], 1.0);
    assert_eq!(
        delta("eventlog_server_request_latency_us_count{op=\"append\"}"),
        2.0
    );
    drop(c);
    server.stop().await;
}

/// Appends in a loop until the connection closes; returns what was acknowledged:
/// (seq, aggregate, version).
async fn append_until_closed(
    mut c: Client,
    aggregate: String,
) -> (Vec<(u64, String, u64)>, Option<CloseFrame>) {
    let mut acked = Vec::new();
    for version in 1.. {
        let request = json!({"id": version, "op": "append", "aggregate": aggregate, "type": "T",
            "data": {"v": version}, "expected_version": version - 1});
        if c.ws.send(Message::text(request.to_string())).await.is_err() {
            return (acked, None);
        }
        match c.next_raw().await {
            Some(Ok(a)) => {
                assert_ok(&a);
                assert_eq!(a["version"], json!(version));
                acked.push((a["seq"].as_u64().unwrap(), aggregate.clone(), version));
            }
            Some(Err(frame)) => return (acked, frame),
            None => return (acked, None),
        }
    }
    unreachable!()
}

fn check_acknowledged(dir: &Path, acked: &[(u64, String, u64)]) {
    let store = Store::open(dir, Options::default()).unwrap();
    for (seq, aggregate, version) in acked {
        let e = store.read_seq(*seq).unwrap().to_recorded().unwrap();
        assert_eq!(
            (&e.aggregate_id, e.version),
            (aggregate, *version),
            "seq {seq}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_no_acknowledged_append_and_ends_subscriptions_with_a_reason() {
    let (mut server, admin) = TestServer::start(Durability::Sync, |_| {}).await;
    let mut watcher = connect(server.addr, Some(&admin)).await.unwrap();
    assert_ok(&watcher.request(json!({"op": "subscribe", "from": 0})).await);
    let mut appenders = Vec::new();
    for i in 0..4 {
        let c = connect(server.addr, Some(&admin)).await.unwrap();
        appenders.push(tokio::spawn(append_until_closed(c, format!("g-{i}"))));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let Some(tx) = server.shutdown.take() else {
        unreachable!()
    };
    let _ = tx.send(());
    let mut acked = Vec::new();
    for a in appenders {
        let (mut got, frame) = a.await.unwrap();
        let frame = frame.expect("a close frame");
        assert_eq!(frame.code, CloseCode::Away);
        assert_eq!(frame.reason.as_str(), "server shutting down");
        acked.append(&mut got);
    }
    assert!(
        acked.len() > 4,
        "too few appends to be a test: {}",
        acked.len()
    );
    // The subscription got every acknowledged event, then its end, then the close.
    let frame = watcher.close_frame().await.expect("a close frame");
    assert_eq!(frame.code, CloseCode::Away);
    let end = watcher.pushed.pop_back().unwrap();
    assert_eq!(end["end"]["code"], json!("shutting_down"), "{end}");
    let seen: Vec<u64> = watcher
        .pushed
        .iter()
        .map(|m| m["event"]["seq"].as_u64().unwrap())
        .collect();
    // What it saw is a gap-free prefix (it may stop before the last appends).
    assert_eq!(seen, (0..seen.len() as u64).collect::<Vec<_>>());
    let task = server.task.take().unwrap();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Nothing holds the store but the test; reopen it from disk and check.
    let TestServer {
        store,
        dir,
        addr,
        _tmp,
        ..
    } = server;
    assert_eq!(store.handle_count(), 1, "the server still holds the store");
    drop(store);
    check_acknowledged(&dir, &acked);
    // New connections are refused once stopped.
    assert!(connect(addr, Some(&admin)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_websocket_and_metrics_with_a_self_signed_certificate() {
    use tokio_rustls::rustls;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cert_path = tmp.path().join("cert.pem");
    let key_path = tmp.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let (cp, kp) = (cert_path.clone(), key_path.clone());
    let (mut server, admin) = TestServer::start(Durability::None, move |c| {
        c.tls = Some(eventlog::server::TlsFiles {
            cert_path: cp,
            key_path: kp,
        });
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let mut req = format!("wss://localhost:{}/ws", server.addr.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {admin}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let mut c = Client::new(ws);
    assert_ok(&c.request(append("tls-1", json!({"secure": true}))).await);
    let r = c.request(json!({"op": "read", "aggregate": "tls-1"})).await;
    assert_eq!(r["events"][0]["data"], json!({"secure": true}));
    // Plain WebSocket against the TLS port fails.
    assert!(connect(server.addr, Some(&admin)).await.is_err());
    // A missing key file is a clear error at bind.
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.tls = Some(eventlog::server::TlsFiles {
        cert_path,
        key_path: tmp.path().join("missing.pem"),
    });
    let other = tempfile::tempdir().unwrap();
    let store = Store::open(other.path(), Options::default()).unwrap();
    match Server::bind(store, config).await {
        Err(ServerError::Tls { path, .. }) => assert!(path.ends_with("missing.pem")),
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_address_needs_a_token_and_loopback_without_tokens_is_open() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), options(Durability::None)).unwrap();
    let mut config = ServerConfig::default();
    config.listen = "0.0.0.0:0".parse().unwrap();
    config.tokens_path = Some(tmp.path().join("tokens.json"));
    match Server::bind(store.clone(), config.clone()).await {
        Err(e @ ServerError::NoTokens { .. }) => {
            assert!(e.to_string().contains("token add"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server = Server::bind(store, config).await.unwrap();
    assert!(!server.requires_token());
    let addr = server.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = rx.await;
    }));
    let mut c = connect(addr, None).await.unwrap();
    assert_ok(&c.request(append("open-1", json!(1))).await);
    // The first token turns authentication on for good.
    let token = add_token(
        &tmp.path().join("tokens.json"),
        "t",
        true,
        false,
        false,
        None,
    );
    assert_eq!(refused(addr, None).await.0, 401);
    assert!(connect(addr, Some(&token)).await.is_ok());
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

/// The `eventlog` binary, when this test build has it.
fn eventlog_bin() -> Option<&'static str> {
    option_env!("CARGO_BIN_EXE_eventlog")
}

#[test]
fn token_commands_print_the_token_once_and_manage_the_file() {
    let Some(bin) = eventlog_bin() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let run = |args: &[&str]| {
        std::process::Command::new(bin)
            .env_remove("EVENTLOG_DIR")
            .env_remove("RUST_LOG")
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&[
        "token",
        "add",
        "ci",
        "--read",
        "--append",
        "--scope",
        "ci-",
        "--expires-in",
        "30",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.lines().last().unwrap();
    assert_eq!(token.len(), 64, "{stdout}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    let file = std::fs::read_to_string(dir.join("tokens.json")).unwrap();
    assert!(!file.contains(token));
    let list = String::from_utf8(run(&["token", "list"]).stdout).unwrap();
    let row: Value = serde_json::from_str(list.lines().next().unwrap()).unwrap();
    assert_eq!(row["name"], json!("ci"));
    assert_eq!(row["permissions"], json!(["read", "append"]));
    assert_eq!(row["scope"], json!("ci-"));
    assert!(row["expires"].is_string());
    assert!(!list.contains(token));
    // Errors: a taken name (3), no permission (1), an unknown name (2), one line each.
    for (args, code) in [
        (&["token", "add", "ci", "--read"][..], 3),
        (&["token", "add", "x"][..], 1),
        (&["token", "add", "bad name", "--read"][..], 1),
        (&["token", "remove", "nobody"][..], 2),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {out:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let out = run(&["token", "remove", "ci"]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        r#"{"removed":"ci"}"#
    );
    assert!(String::from_utf8(run(&["token", "list"]).stdout)
        .unwrap()
        .is_empty());
    // serve refuses a non-loopback address without tokens, with exit 1.
    let out = run(&["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    // A bad RUST_LOG is a usage error.
    let out = std::process::Command::new(bin)
        .env("RUST_LOG", "eventlog=loud")
        .args(["--dir"])
        .arg(&dir)
        .args(["token", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serve_command_stops_gracefully_on_sigterm_with_json_logs() {
    let Some(bin) = eventlog_bin() else { return };
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let token = add_token(&dir.join("tokens.json"), "app", true, true, false, None);
    let mut child = std::process::Command::new(bin)
        .env("RUST_LOG", "info,eventlog::store=debug")
        .arg("--dir")
        .arg(&dir)
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let started: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let addr: SocketAddr = started["listening"].as_str().unwrap().parse().unwrap();
    assert_eq!(started["auth"], json!("token"));
    let mut appenders = Vec::new();
    for i in 0..3 {
        let c = connect(addr, Some(&token)).await.unwrap();
        appenders.push(tokio::spawn(append_until_closed(c, format!("p-{i}"))));
    }
    // A failing append logs inside the store's span, under the request's span, both
    // carrying the correlation id from the event's metadata.
    let mut tracer = connect(addr, Some(&token)).await.unwrap();
    let conflict = tracer
        .request(
            json!({"op": "append", "aggregate": "traced", "type": "T", "data": 1,
            "expected_version": 9, "metadata": {"correlation_id": "trace-me"}}),
        )
        .await;
    assert_error(&conflict, "wrong_expected_version");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill sends a signal to our own child process.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let mut acked = Vec::new();
    for a in appenders {
        let (mut got, frame) = a.await.unwrap();
        assert_eq!(frame.map(|f| f.code), Some(CloseCode::Away));
        acked.append(&mut got);
    }
    let status = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    let logs = String::from_utf8(status.stderr).unwrap();
    for l in logs.lines() {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    assert!(logs.contains("SIGTERM"), "{logs}");
    assert!(logs.contains("store synced"), "{logs}");
    let traced: Value = logs
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["fields"]["message"] == json!("append failed"))
        .unwrap_or_else(|| panic!("no append log: {logs}"));
    let spans: Vec<(&str, Option<&str>)> = traced["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["correlation_id"].as_str()))
        .collect();
    assert_eq!(
        spans,
        [
            ("connection", None),
            ("request", Some("trace-me")),
            ("append", Some("trace-me"))
        ],
        "{traced}"
    );
    assert!(!acked.is_empty());
    check_acknowledged(&dir, &acked);
}

// ------------------------------------------------- regressions from the server review

/// The number of live subscriptions on the server (their threads, stopping ones
/// included).
async fn subscriptions_live(server: &TestServer, admin: &str) -> f64 {
    sample(
        &server.metrics(admin).await,
        "eventlog_server_subscriptions",
    )
}

/// Unsubscribing stops a filtered subscription while it is still skipping stored events,
/// and a connection's subscriptions count against its limit until their threads have
/// ended. Before, a subscription whose filter matched nothing scanned the whole log
/// before it noticed it was unsubscribed, and the limit counted only the handles, so a
/// subscribe/unsubscribe loop on a connection limited to 2 left up to 20 threads
/// scanning (server review, finding 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribed_filtered_subscriptions_stop_scanning_and_count_until_they_end() {
    const LIMIT: usize = 2;
    let (mut server, admin) = TestServer::start(Durability::None, |c| {
        c.subscriptions_per_connection_max = LIMIT;
    })
    .await;
    // Enough stored events that scanning them all takes much longer than a round trip.
    const STORED: u64 = 300_000;
    let batch: Vec<_> = (0..1_000)
        .map(|i| eventlog::store::NewEvent::json_text("T", format!("{{\"i\":{i}}}")))
        .collect();
    for b in 0..STORED / 1_000 {
        server
            .store
            .append(
                &format!("s-{}", b % 50),
                eventlog::store::ExpectedVersion::Any,
                &batch,
            )
            .unwrap();
    }
    let mut c = connect(server.addr, Some(&admin)).await.unwrap();
    let mut refused = 0;
    for _ in 0..20 {
        let s = c
            .request(json!({"op": "subscribe", "from": 0, "types": ["Nope"]}))
            .await;
        if s["ok"] == json!(true) {
            assert_ok(
                &c.request(json!({"op": "unsubscribe", "sub": s["sub"]}))
                    .await,
            );
        } else {
            // Only if a stopped thread took longer than the server's wait to end.
            assert_error(&s, "too_many_subscriptions");
            refused += 1;
        }
        let live = subscriptions_live(&server, &admin).await;
        assert!(
            live <= LIMIT as f64,
            "{live} subscription threads on a connection limited to {LIMIT}"
        );
    }
    // Every thread ends, though each was stopped in the middle of its scan.
    let started = Instant::now();
    while subscriptions_live(&server, &admin).await > 0.0 {
        assert!(
            started.elapsed() < WAIT,
            "unsubscribed threads still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{refused} of 20 subscribes refused while a stopped one was ending");
    server.stop().await;
}

/// A WebSocket client whose socket takes little (16 KiB receive buffer) and that reads
/// nothing until told to.
async fn non_reading_client(
    addr: SocketAddr,
    token: &str,
) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(
        ws_request(addr, Some(token), "ws"),
        MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();
    ws
}

/// Stores two events of 700 KB in `big-1`, so that each `read` of it is answered with
/// about 1.4 MB.
fn store_big_aggregate(store: &Store) {
    let big = format!("\"{}\"", "x".repeat(700_000));
    for _ in 0..2 {
        store
            .append(
                "big-1",
                eventlog::store::ExpectedVersion::Any,
                &[eventlog::store::NewEvent::json_text("T", big.clone())],
            )
            .unwrap();
    }
}

/// Waits (up to `WAIT`) until the server has cut off one slow consumer; with
/// `closed`, also until that connection is gone. Returns the metrics.
async fn wait_for_slow_consumer_cut_off(server: &TestServer, admin: &str, closed: bool) -> String {
    let started = Instant::now();
    loop {
        let m = server.metrics(admin).await;
        let cut_off = sample(&m, "eventlog_server_slow_consumer_disconnects_total");
        let connections = sample(&m, "eventlog_server_connections");
        if cut_off == 1.0 && (!closed || connections == 0.0) {
            return m;
        }
        assert!(
            started.elapsed() < WAIT,
            "the client that reads nothing is still served: {cut_off} slow-consumer disconnects, {connections} connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The send queue is bounded in bytes, not only in messages: a client that sends many
/// `read`s of a large aggregate and never reads its socket fills the queue's bytes long
/// before its message count, so the server stops reading its requests and cuts it off
/// as a slow consumer. Before, 1,000 answers of 1.4 MB each fitted in a queue of 1,024
/// messages: the server held them all (about 1.4 GB) for as long as the client stayed
/// (server review, finding 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_queue_full_of_bytes_cuts_off_a_client_that_never_reads() {
    const QUEUE_BYTES: usize = 2 << 20;
    let (mut server, admin) = TestServer::start(Durability::None, |c| {
        c.send_queue_bytes_max = QUEUE_BYTES;
        c.send_queue_wait_ms = 2_000;
    })
    .await;
    store_big_aggregate(&server.store);
    let ws = non_reading_client(server.addr, &admin).await;
    let (mut tx, _rx) = ws.split();
    const READS: u64 = 200;
    for i in 0..READS {
        tx.send(Message::text(
            json!({"id": i, "op": "read", "aggregate": "big-1"}).to_string(),
        ))
        .await
        .unwrap();
    }
    // Until the cut-off, the queue never holds more than its byte bound (the bound,
    // not the message count, is what fills).
    let mut queued_max = 0.0f64;
    let started = Instant::now();
    loop {
        let m = server.metrics(&admin).await;
        let queued = sample(&m, "eventlog_server_send_queue_bytes");
        queued_max = queued_max.max(queued);
        assert!(
            queued <= QUEUE_BYTES as f64,
            "{queued} bytes queued, the bound is {QUEUE_BYTES}"
        );
        if sample(&m, "eventlog_server_slow_consumer_disconnects_total") == 1.0 {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the client that reads nothing is still served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("at most {queued_max} bytes seen queued");
    let m = wait_for_slow_consumer_cut_off(&server, &admin, true).await;
    // The reader stopped taking requests once the answers' bytes filled the queue (and
    // the socket's buffers): it waited for room instead of queueing 280 MB.
    let requests = sample(&m, "eventlog_server_messages_in_total");
    assert!(
        requests < READS as f64 / 2.0,
        "{requests} of {READS} reads were taken with a queue of {QUEUE_BYTES} bytes"
    );
    assert_eq!(
        sample(&m, "eventlog_server_send_queue_bytes"),
        0.0,
        "the dropped queue's bytes are given back"
    );
    server.stop().await;
}

/// A client that stops reading while its queue still has room is cut off too: the
/// writer gives up once the socket took nothing for `send_queue_wait_ms`, with close
/// code 1008 as when the queue stays full. Before, the writer waited for the socket
/// forever, holding what it had queued, and graceful shutdown waited out its whole
/// timeout for it (server review, finding 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_takes_nothing_for_the_wait_limit_is_closed_as_a_slow_consumer() {
    let (mut server, admin) = TestServer::start(Durability::None, |c| {
        // A queue that never fills: only the writer's progress limit can act.
        c.send_queue_bytes_max = 1 << 30;
        c.send_queue_wait_ms = 500;
    })
    .await;
    store_big_aggregate(&server.store);
    let mut ws = non_reading_client(server.addr, &admin).await;
    // 28 MB of answers: far more than the sockets' buffers (a few MiB) hold.
    const READS: u64 = 20;
    for i in 0..READS {
        ws.send(Message::text(
            json!({"id": i, "op": "read", "aggregate": "big-1"}).to_string(),
        ))
        .await
        .unwrap();
    }
    wait_for_slow_consumer_cut_off(&server, &admin, false).await;
    // Reading now, the client finds the answers that were in the sockets' buffers, then
    // the close frame (which the server tries to deliver for 5 s).
    let frame = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("the stream ended without a close frame: {other:?}"),
        }
    };
    let frame = frame.expect("a close code");
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "slow consumer");
    let m = wait_for_slow_consumer_cut_off(&server, &admin, true).await;
    assert_eq!(sample(&m, "eventlog_server_send_queue_bytes"), 0.0);
    server.stop().await;
}

/// Sockets that never upgrade cannot hold the server's socket budget: `/health` (and
/// every other answer but an upgrade) closes its socket, so a second request on it gets
/// no answer, and a token holder gets in while the client still holds those sockets.
/// Before, HTTP keep-alive let 24 unauthenticated sockets, each sending a `/health` now
/// and then (every request restarted the header timer), keep out every client of a
/// server with `connections_max` 4 (server review, finding 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_upgrade_cannot_hold_the_socket_budget() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut server, admin) = TestServer::start(Durability::None, |c| {
        c.connections_max = 4; // socket budget: 4 * 2 + 16 = 24
        c.handshake_timeout_ms = 5_000;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..24 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    for s in &mut held {
        s.write_all(HEALTH).await.unwrap();
        let mut answer = Vec::new();
        // The whole answer, then the end of the stream: the server closed the socket.
        tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
            .await
            .expect("the socket closed after its answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
    }
    // A second request on a held socket is not answered.
    for s in &mut held {
        let _ = s.write_all(HEALTH).await;
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("no wait on a closed socket");
        assert!(matches!(n, Ok(0) | Err(_)), "answered again: {n:?}");
    }
    // The token holder gets in while the 24 sockets are still held by the client.
    let mut c = connect(server.addr, Some(&admin))
        .await
        .expect("a token holder gets in");
    assert_ok(
        &c.request(json!({"op": "read", "all": true, "limit": 1}))
            .await,
    );
    drop(held);
    server.stop().await;
}

/// A socket that opens a request and never finishes it is closed by the handshake
/// limit, however it trickles its bytes (a guard: hyper's own timers closed this one
/// before the limit covered the whole time before the upgrade too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_never_completes_is_closed_at_the_handshake_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut server, _admin) = TestServer::start(Durability::None, |c| {
        c.handshake_timeout_ms = 500;
    })
    .await;
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    // A request with a body that never comes: the header timer is done with it.
    s.write_all(b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    let trickle = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if s.write_all(b"x").await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(WAIT, trickle).await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the socket is still open after {WAIT:?}");
    server.stop().await;
}

/// A server without tokens (loopback only) refuses what a web page could send it: an
/// upgrade with an `Origin` header (403) and one whose `Host` is not a loopback name
/// (421, DNS rebinding); `/metrics` the same. Native clients, which send neither, still
/// get in. Before, any page the user opened could append and read (server review,
/// finding 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_server_refuses_web_pages_and_foreign_hosts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path(), options(Durability::None)).unwrap();
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.tokens_path = Some(tmp.path().join("tokens.json"));
    let server = Server::bind(store.clone(), config).await.unwrap();
    assert!(!server.requires_token());
    let addr = server.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(async move {
        let _ = rx.await;
    }));
    let upgrade = |headers: &[(&'static str, String)]| {
        let mut req = ws_request(addr, None, "ws");
        for (name, value) in headers {
            req.headers_mut().insert(*name, value.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
    };
    let status = |r: Result<_, WsError>| match r {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(WsError::Http(r)) => (
            r.status().as_u16(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("unexpected error {e}"),
    };
    // A web page: the browser adds its Origin, whatever the Host.
    let (code, body) = status(upgrade(&[("origin", "https://evil.example".into())]).await);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("token add"), "{body}");
    // DNS rebinding: the page's own origin, resolved to 127.0.0.1.
    let (code, body) = status(
        upgrade(&[
            ("origin", "http://attacker.example:7070".into()),
            ("host", "attacker.example:7070".into()),
        ])
        .await,
    );
    assert_eq!(code, 403, "{body}");
    let (code, body) = status(upgrade(&[("host", "attacker.example:7070".into())]).await);
    assert_eq!(code, 421, "{body}");
    assert!(body.contains("token add"), "{body}");
    // /metrics too.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 403"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(store.next_seq(), 0);
    // Native clients: no Origin, a loopback Host (by address or by name).
    let mut c = connect(addr, None).await.unwrap();
    assert_ok(&c.request(append("local-1", json!(1))).await);
    let (ws, _) = upgrade(&[("host", format!("localhost:{}", addr.port()))])
        .await
        .unwrap();
    let mut c = Client::new(ws);
    assert_ok(&c.request(json!({"op": "read", "all": true})).await);
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

/// The server pings every client each `ping_interval_ms`: a client that reads (and so
/// answers the pings) but sends nothing stays connected, while one that answers nothing
/// (a peer that vanished without closing) is closed after two intervals of silence.
/// Before, there were no pings and no idle limit: a dead peer held its connection, its
/// subscriptions and their threads for ever (server review, finding 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_pinged_and_a_silent_one_is_closed() {
    let (mut server, admin) = TestServer::start(Durability::None, |c| {
        c.ping_interval_ms = 500;
    })
    .await;
    // A client that only reads: it sees pings, and its pongs keep it connected.
    let mut quiet = connect(server.addr, Some(&admin)).await.unwrap();
    assert_ok(&quiet.request(json!({"op": "subscribe"})).await);
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(m) = tokio::time::timeout_at(until, quiet.ws.next()).await {
        match m {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 1, "no ping in 3 s with a ping interval of 0.5 s");
    assert_ok(
        &quiet
            .request(json!({"op": "read", "all": true, "limit": 1}))
            .await,
    );
    let m = server.metrics(&admin).await;
    assert_eq!(
        sample(&m, "eventlog_server_silent_peer_disconnects_total"),
        0.0
    );
    drop(quiet);
    // A client that answers nothing: it never polls its socket, so it sends no pong.
    let (silent, _) = tokio_tungstenite::connect_async(ws_request(server.addr, Some(&admin), "ws"))
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let m = server.metrics(&admin).await;
        if sample(&m, "eventlog_server_silent_peer_disconnects_total") == 1.0
            && sample(&m, "eventlog_server_connections") == 0.0
        {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the silent client is still connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(silent);
    eprintln!("{pings} pings seen in 3 s");
    server.stop().await;
}
