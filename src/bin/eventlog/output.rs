//! Printing: buffered stdout that ends quietly when its reader goes away, aligned tables,
//! progress bars on a terminal only, and numbers for people.

use crate::error::{stdout_error, CliError};
use eventlog::store::{ContentType, EventRef};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{BufWriter, IsTerminal, StdoutLock, Write};

/// Longest data preview in a table, in characters.
const DATA_PREVIEW_CHARS_MAX: usize = 60;
/// Rows a table buffers to size its columns before printing them.
pub const TABLE_ROWS_BUFFERED: usize = 1_000;

/// Buffered stdout.
pub struct Out {
    w: BufWriter<StdoutLock<'static>>,
}

impl Out {
    pub fn new() -> Out {
        Out {
            w: BufWriter::with_capacity(64 << 10, std::io::stdout().lock()),
        }
    }

    /// Writes `text` and a newline.
    pub fn line(&mut self, text: &str) -> Result<(), CliError> {
        self.w
            .write_all(text.as_bytes())
            .and_then(|()| self.w.write_all(b"\n"))
            .map_err(|e| stdout_error(&e))
    }

    /// Writes one JSON value as a line.
    pub fn json(&mut self, value: &impl serde::Serialize) -> Result<(), CliError> {
        serde_json::to_writer(&mut self.w, value)
            .map_err(std::io::Error::from)
            .and_then(|()| self.w.write_all(b"\n"))
            .map_err(|e| stdout_error(&e))
    }

    /// Writes one event as a JSON line, its payload embedded byte for byte.
    pub fn event(&mut self, e: &EventRef<'_>) -> Result<(), CliError> {
        eventlog::json::write_event_json(&mut self.w, e)
            .and_then(|()| self.w.write_all(b"\n"))
            .map_err(|e| stdout_error(&e))
    }

    pub fn flush(&mut self) -> Result<(), CliError> {
        self.w.flush().map_err(|e| stdout_error(&e))
    }
}

/// A table whose columns are sized from the rows buffered so far; widths only grow.
pub struct Table {
    headers: Vec<&'static str>,
    widths: Vec<usize>,
    rows: Vec<Vec<String>>,
    header_printed: bool,
    rows_buffered_max: usize,
}

impl Table {
    /// A table that prints every `rows_buffered_max` rows (1 for live output).
    pub fn new(headers: &[&'static str], rows_buffered_max: usize) -> Table {
        Table {
            headers: headers.to_vec(),
            widths: headers.iter().map(|h| h.chars().count()).collect(),
            rows: Vec::new(),
            header_printed: false,
            rows_buffered_max: rows_buffered_max.max(1),
        }
    }

    pub fn row(&mut self, out: &mut Out, row: Vec<String>) -> Result<(), CliError> {
        self.rows.push(row);
        if self.rows.len() >= self.rows_buffered_max {
            self.flush(out)?;
        }
        Ok(())
    }

    pub fn flush(&mut self, out: &mut Out) -> Result<(), CliError> {
        for row in &self.rows {
            for (w, cell) in self.widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        if self.rows.is_empty() {
            return Ok(());
        }
        if !self.header_printed {
            self.header_printed = true;
            let header: Vec<String> = self.headers.iter().map(|h| h.to_uppercase()).collect();
            out.line(&self.format(&header))?;
        }
        for row in std::mem::take(&mut self.rows) {
            out.line(&self.format(&row))?;
        }
        Ok(())
    }

    fn format(&self, row: &[String]) -> String {
        let mut s = String::new();
        let last = row.len().saturating_sub(1);
        for (i, (cell, w)) in row.iter().zip(&self.widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(cell);
                for _ in cell.chars().count()..*w + 2 {
                    s.push(' ');
                }
            }
        }
        s.trim_end().to_string()
    }
}

/// The columns of an event table.
pub const EVENT_COLUMNS: [&str; 6] = ["seq", "aggregate", "version", "type", "ts", "data"];

/// An event as a table row.
pub fn event_row(e: &EventRef<'_>) -> Vec<String> {
    vec![
        e.seq.to_string(),
        e.aggregate_id.to_string(),
        e.version.to_string(),
        e.event_type.to_string(),
        time_text(e.timestamp_us),
        data_preview(e.content_type, e.payload),
    ]
}

/// A timestamp as RFC 3339, or as microseconds when it has no RFC 3339 form.
pub fn time_text(timestamp_us: i64) -> String {
    eventlog::json::format_rfc3339_us(timestamp_us).unwrap_or_else(|| timestamp_us.to_string())
}

/// A payload cut to one short line.
pub fn data_preview(content_type: ContentType, payload: &[u8]) -> String {
    let text = match (content_type, std::str::from_utf8(payload)) {
        (ContentType::Json, Ok(t)) => t.to_string(),
        _ => format!(
            "({} bytes) {}",
            payload.len(),
            eventlog::json::base64_encode(&payload[..payload.len().min(48)])
        ),
    };
    clip(&text, DATA_PREVIEW_CHARS_MAX)
}

/// `text` on one line, cut to `chars_max` characters with an ellipsis.
pub fn clip(text: &str, chars_max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= chars_max {
        return one_line;
    }
    let mut s: String = one_line.chars().take(chars_max.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// A progress bar on stderr when it is a terminal, hidden otherwise. `total` in `unit`s;
/// `None` gives a spinner with a count.
pub fn progress(total: Option<u64>, message: &str, unit: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) => {
            let template = if unit == "bytes" {
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})"
            } else {
                "{msg} [{bar:40}] {human_pos}/{human_len} ({eta})"
            };
            let b = ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b
        }
        None => {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template("{spinner} {msg} {human_pos} events")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b
        }
    };
    bar.set_message(message.to_string());
    bar
}

/// A count with thousands separators: 141,712.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Events per second, rounded for people.
pub fn rate(events: u64, seconds: f64) -> String {
    if seconds <= 0.0 {
        return "-".into();
    }
    count((events as f64 / seconds).round() as u64)
}

/// Bytes for people: 3.1 MB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Whether stderr is a terminal (progress and hints go there only then).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// One line on stderr (summaries, skipped lines); failures to write it are ignored.
pub fn note(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}
