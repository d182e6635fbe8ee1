//! The server's own metrics, rendered after the store's on `GET /metrics`.

use crate::metrics::{render_value, Counter, Histogram, LATENCY_US_BOUNDS};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Request kinds with their own latency histogram.
pub(crate) const OPS: [&str; 4] = ["append", "read", "subscribe", "unsubscribe"];

/// Counters and gauges of the server.
#[derive(Debug)]
pub(crate) struct ServerMetrics {
    pub connections_open: AtomicU64,
    pub connections_total: Counter,
    pub connections_refused_limit: Counter,
    pub auth_failures: Counter,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub request_errors: Counter,
    pub slow_consumer_disconnects: Counter,
    pub silent_peer_disconnects: Counter,
    pub oversized_messages: Counter,
    pub subscriptions_open: AtomicU64,
    pub subscriptions_total: Counter,
    /// Bytes of messages in every connection's send queue (and in its writer's hands).
    pub send_queue_bytes: AtomicU64,
    /// Per op (index in [`OPS`]): request latency in microseconds.
    pub request_us: [Histogram; 4],
    /// Each live subscription's next seq, to compute lag.
    pub positions: Mutex<HashMap<(u64, u64), Arc<AtomicU64>>>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            connections_open: AtomicU64::new(0),
            connections_total: Counter::default(),
            connections_refused_limit: Counter::default(),
            auth_failures: Counter::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            request_errors: Counter::default(),
            slow_consumer_disconnects: Counter::default(),
            silent_peer_disconnects: Counter::default(),
            oversized_messages: Counter::default(),
            subscriptions_open: AtomicU64::new(0),
            subscriptions_total: Counter::default(),
            send_queue_bytes: AtomicU64::new(0),
            request_us: std::array::from_fn(|_| Histogram::new(LATENCY_US_BOUNDS)),
            positions: Mutex::new(HashMap::new()),
        }
    }
}

impl ServerMetrics {
    /// Renders the server's metrics; `next_seq` is the store's next seq (for lag).
    pub fn render(&self, out: &mut String, next_seq: u64) {
        render_value(
            out,
            "eventlog_server_connections",
            "gauge",
            "Open WebSocket connections.",
            self.connections_open.load(Ordering::Relaxed),
        );
        let counters: [(&str, &str, &Counter); 12] = [
            (
                "eventlog_server_connections_total",
                "WebSocket connections accepted.",
                &self.connections_total,
            ),
            (
                "eventlog_server_connections_refused_total",
                "WebSocket upgrades refused because connections_max was reached.",
                &self.connections_refused_limit,
            ),
            (
                "eventlog_server_auth_failures_total",
                "Requests refused with 401 (no, unknown or expired token).",
                &self.auth_failures,
            ),
            (
                "eventlog_server_messages_in_total",
                "WebSocket messages received.",
                &self.messages_in,
            ),
            (
                "eventlog_server_messages_out_total",
                "WebSocket messages sent (answers and subscription events).",
                &self.messages_out,
            ),
            (
                "eventlog_server_bytes_in_total",
                "Bytes of WebSocket messages received.",
                &self.bytes_in,
            ),
            (
                "eventlog_server_bytes_out_total",
                "Bytes of WebSocket messages sent.",
                &self.bytes_out,
            ),
            (
                "eventlog_server_request_errors_total",
                "Requests answered with an error.",
                &self.request_errors,
            ),
            (
                "eventlog_server_slow_consumer_disconnects_total",
                "Connections closed as slow consumers: their send queue stayed full, or their socket took nothing, for send_queue_wait_ms.",
                &self.slow_consumer_disconnects,
            ),
            (
                "eventlog_server_silent_peer_disconnects_total",
                "Connections closed because nothing arrived from the client, not even a pong, for two ping intervals.",
                &self.silent_peer_disconnects,
            ),
            (
                "eventlog_server_oversized_messages_total",
                "Messages refused for exceeding message_size_bytes_max.",
                &self.oversized_messages,
            ),
            (
                "eventlog_server_subscriptions_total",
                "Subscriptions started.",
                &self.subscriptions_total,
            ),
        ];
        for (name, help, c) in counters {
            render_value(out, name, "counter", help, c.get());
        }
        render_value(
            out,
            "eventlog_server_subscriptions",
            "gauge",
            "Active subscriptions.",
            self.subscriptions_open.load(Ordering::Relaxed),
        );
        render_value(
            out,
            "eventlog_server_send_queue_bytes",
            "gauge",
            "Bytes of answers and events waiting in the connections' send queues.",
            self.send_queue_bytes.load(Ordering::Relaxed),
        );
        let lag_max = self
            .positions
            .lock()
            .values()
            .map(|p| next_seq.saturating_sub(p.load(Ordering::Relaxed)))
            .max()
            .unwrap_or(0);
        render_value(
            out,
            "eventlog_server_subscription_lag_events_max",
            "gauge",
            "Largest lag of an active subscription: seqs committed but not yet looked at.",
            lag_max,
        );
        for (i, (op, h)) in OPS.iter().zip(&self.request_us).enumerate() {
            let mut text = String::new();
            h.render(
                &mut text,
                "eventlog_server_request_latency_us",
                "Time from a request's arrival to its answer being queued, microseconds.",
                &format!("op=\"{op}\""),
            );
            if i > 0 {
                // HELP and TYPE once per family.
                text = text.lines().filter(|l| !l.starts_with('#')).fold(
                    String::new(),
                    |mut acc, l| {
                        let _ = writeln!(acc, "{l}");
                        acc
                    },
                );
            }
            out.push_str(&text);
        }
    }
}
