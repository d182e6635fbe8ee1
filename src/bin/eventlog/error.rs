//! Exit codes, and library errors turned into one line that says what is wrong and what
//! to do.

use eventlog::log;
use eventlog::publisher::PublishError;
use eventlog::store::{AppendError, OpenError, ReadError};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// The exit codes; `eventlog --help` documents them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// Not an error: stdout was closed by its reader (`eventlog export | head`).
    Quiet = 0,
    /// Bad arguments or invalid input.
    Usage = 1,
    /// No store, file, aggregate...; or an I/O failure.
    NotFound = 2,
    /// Expected version or event id conflict.
    Conflict = 3,
    /// Damaged log or index.
    Corrupt = 4,
    /// Another process has the store open.
    Locked = 5,
    /// A panic: a bug.
    Internal = 70,
}

/// A failure of a command: its exit code and its one line.
#[derive(Debug)]
pub struct CliError {
    pub code: Code,
    pub message: String,
}

impl CliError {
    pub fn new(code: Code, message: impl Into<String>) -> CliError {
        CliError {
            code,
            message: message.into(),
        }
    }

    /// Ends the program without a message (the reader of stdout went away).
    pub fn quiet() -> CliError {
        CliError::new(Code::Quiet, "")
    }

    /// Prints the line (if any) and gives the exit code.
    pub fn report(self) -> ExitCode {
        if self.code != Code::Quiet {
            print_error_line(&self.message);
        }
        ExitCode::from(self.code as u8)
    }
}

/// Prints `error: <message>` as exactly one line on stderr.
pub fn print_error_line(message: &str) {
    let one_line: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let _ = writeln!(std::io::stderr().lock(), "error: {}", one_line.trim());
}

/// A panic is a bug: say so in one line instead of Rust's report.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        print_error_line(&format!(
            "internal error{at}: {what}; this is a bug in eventlog, please report it"
        ));
    }));
}

/// clap's errors: help and version go to stdout with status 0; usage errors become one
/// line with status 1 (clap's own default would be 2, which here means "not found").
pub fn clap_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = write!(std::io::stdout().lock(), "{}", e.render());
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let rendered = e.render().to_string();
            let usage = rendered
                .lines()
                .find_map(|l| l.trim().strip_prefix("Usage: "))
                .unwrap_or("eventlog --help");
            CliError::new(
                Code::Usage,
                format!("the command is incomplete; usage: {usage} (see --help)"),
            )
            .report()
        }
        _ => {
            let rendered = e.render().to_string();
            let mut parts = Vec::new();
            for line in rendered.lines() {
                let line = line.trim();
                if line.starts_with("Usage:") || line.starts_with("For more information") {
                    break;
                }
                if !line.is_empty() {
                    parts.push(line.strip_prefix("error: ").unwrap_or(line).to_string());
                }
            }
            let mut message = parts.join(" ");
            if message.is_empty() {
                message = e.kind().to_string();
            }
            CliError::new(Code::Usage, format!("{message} (see --help)")).report()
        }
    }
}

/// A failure to open the store in `dir`.
pub fn open_error(dir: &Path, e: OpenError) -> CliError {
    let d = dir.display();
    match e {
        OpenError::Log(log::OpenError::Locked { .. }) => CliError::new(
            Code::Locked,
            format!("store {d} is locked: another process has it open; stop that process or wait for it to finish, then retry"),
        ),
        OpenError::Log(log::OpenError::Corrupt { site }) => CliError::new(
            Code::Corrupt,
            format!("store {d} is corrupt: {site}; run `eventlog --dir {d} repair` to quarantine the damaged part (the records from there on are lost), or restore a backup"),
        ),
        OpenError::Log(e @ (log::OpenError::BadSegmentFile { .. } | log::OpenError::MissingSegment { .. })) => {
            CliError::new(
                Code::Corrupt,
                format!("store {d} is damaged: {e}; restore the missing or damaged files from a backup"),
            )
        }
        OpenError::Log(e @ log::OpenError::UnstableRead { .. }) => CliError::new(
            Code::NotFound,
            format!("cannot open store {d}: {e}; nothing was changed, so retrying is safe; do not run `repair` while reads disagree"),
        ),
        OpenError::Log(e @ log::OpenError::Io { .. }) => CliError::new(
            Code::NotFound,
            format!("cannot open store {d}: {e}; check the directory's permissions and free space"),
        ),
        OpenError::Index(e) => CliError::new(
            Code::NotFound,
            format!("cannot open the index of store {d}: {e}; `eventlog --dir {d} reindex` rebuilds it from the log"),
        ),
        other => CliError::new(Code::NotFound, format!("cannot open store {d}: {other}")),
    }
}

/// A failed append.
pub fn append_error(e: AppendError) -> CliError {
    match e {
        AppendError::WrongExpectedVersion {
            aggregate_id,
            expected,
            actual,
        } => CliError::new(
            Code::Conflict,
            format!("version conflict on aggregate {aggregate_id}: expected version {expected}, actual version {actual}; read the aggregate and retry with --expected-version {actual} if the event still applies"),
        ),
        e @ AppendError::DuplicateEventId { .. } => CliError::new(
            Code::Conflict,
            format!("{e}; use another --id, or none to get a fresh one"),
        ),
        e @ (AppendError::InvalidName { .. }
        | AppendError::PayloadTooLarge { .. }
        | AppendError::MetadataTooLarge { .. }
        | AppendError::BadEventCount { .. }) => {
            CliError::new(Code::Usage, format!("{e}; fix the event and retry"))
        }
        AppendError::Log(log::AppendError::DiskFull { path }) => CliError::new(
            Code::NotFound,
            format!("disk full while writing {}; nothing of this append was stored: free space and retry", path.display()),
        ),
        AppendError::Read(e) => read_error(*e),
        other => CliError::new(
            Code::NotFound,
            format!("append failed: {other}; nothing of it was stored: retry, and check the disk if it fails again"),
        ),
    }
}

/// A failed read.
pub fn read_error(e: ReadError) -> CliError {
    match e {
        e @ ReadError::Log(log::ReadError::Corrupt { .. }) => CliError::new(
            Code::Corrupt,
            format!("{e}; run `eventlog verify` to list the damage and `eventlog repair` to quarantine it"),
        ),
        e @ ReadError::BadEvent { .. } => CliError::new(
            Code::Corrupt,
            format!("{e}; run `eventlog verify` to list the damage"),
        ),
        ReadError::IndexMismatch { seq, expected, found } => CliError::new(
            Code::Corrupt,
            format!("the index points at seq {seq} for {expected}, but the event there is {found}; run `eventlog reindex` to rebuild the index"),
        ),
        e @ ReadError::Index(_) => CliError::new(
            Code::NotFound,
            format!("{e}; `eventlog reindex` rebuilds the index from the log"),
        ),
        other => CliError::new(Code::NotFound, format!("read failed: {other}")),
    }
}

/// A failure of the publisher's state (checkpoints, dead letters).
pub fn publish_error(e: PublishError) -> CliError {
    match e {
        e @ PublishError::InvalidName { .. } => CliError::new(Code::Usage, e.to_string()),
        e @ PublishError::NoSuchDeadLetter { .. } => CliError::new(
            Code::NotFound,
            format!("{e}; `eventlog deadletters list` shows the ids"),
        ),
        PublishError::Read(e) => read_error(e),
        e @ PublishError::DeadLetters { .. } if e.to_string().contains("locked") => {
            CliError::new(
                Code::Locked,
                format!("{e}; the subscription is running: manage its dead letters from the application, or stop it first"),
            )
        }
        other => CliError::new(Code::NotFound, other.to_string()),
    }
}

/// A failed write to stdout: a closed pipe ends the program quietly.
pub fn stdout_error(e: &std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        CliError::quiet()
    } else {
        CliError::new(Code::NotFound, format!("cannot write to stdout: {e}"))
    }
}
