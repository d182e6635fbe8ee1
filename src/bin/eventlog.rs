//! `eventlog`: the command line of the event store, a thin shell over the library.
//!
//! Results go to stdout (JSON lines, or tables with `--pretty`); progress bars, summaries
//! and errors go to stderr. Every failure is one line on stderr and an exit code from the
//! table in `eventlog --help`. Nothing panics on bad input: a panic is a bug, reported in
//! one line with exit code 70.

#[path = "eventlog/admin.rs"]
mod admin;
#[path = "eventlog/demo.rs"]
mod demo;
#[path = "eventlog/error.rs"]
mod error;
#[path = "eventlog/import.rs"]
mod import;
#[path = "eventlog/logging.rs"]
mod logging;
#[path = "eventlog/output.rs"]
mod output;
#[path = "eventlog/read.rs"]
mod read;
#[cfg(feature = "server")]
#[path = "eventlog/serve.rs"]
mod serve;
#[path = "eventlog/tail.rs"]
mod tail;

use clap::{Args, Parser, Subcommand};
use error::{CliError, Code};
use eventlog::store::{ExpectedVersion, Options, Store};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Where the store is when neither `--dir` nor `EVENTLOG_DIR` says.
const DIR_DEFAULT: &str = "./eventlog-data";

const AFTER_HELP: &str = "\
Output: one JSON object per line on stdout; --pretty prints tables for people. Progress
bars (on a terminal only), summaries and errors go to stderr.

Exit codes:
   0  success
   1  usage: bad arguments, or invalid input (a bad --data value, a bad import line)
   2  not found or I/O: no store at --dir, a missing file, aggregate, type, subscription
      or dead letter, or a failed read or write
   3  concurrency conflict: the aggregate is not at --expected-version, or the event id
      is already used by another event
   4  corruption: the log or its index is damaged (see `eventlog verify`, `eventlog repair`)
   5  locked: another process has the store open; stop it or wait (`follow` never locks)
  70  internal error: a bug in eventlog; please report it

Environment:
  EVENTLOG_DIR  the store directory when --dir is not given
  RUST_LOG      which logs to print on stderr, e.g. info or eventlog=debug (default: info
                for `serve`, none for the other commands, whose errors are one line)

Start with `eventlog demo`: it imports a real incident log into a fresh store and shows
what the store does with it.";

#[derive(Debug, Parser)]
#[command(
    name = "eventlog",
    version,
    about = "An embedded, durable event store: append, import, read, follow and check it",
    after_help = AFTER_HELP,
    disable_help_subcommand = true
)]
struct Cli {
    /// The store directory [default: ./eventlog-data]
    #[arg(
        long,
        global = true,
        env = "EVENTLOG_DIR",
        value_name = "DIR",
        display_order = 100
    )]
    dir: Option<PathBuf>,

    /// Print tables for people instead of JSON lines
    #[arg(long, global = true, display_order = 101)]
    pretty: bool,

    /// How logs look on stderr: text for people, or one JSON object per line
    #[arg(
        long,
        global = true,
        value_enum,
        value_name = "FORMAT",
        default_value = "text",
        display_order = 102
    )]
    log_format: logging::LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Append one event to an aggregate, checking its version; prints {"seq":..,"version":..}
    #[command(after_help = "\
A version conflict exits with status 3 and names the expected and the actual version.
Creates the store if it does not exist.

Examples:
  eventlog append --aggregate order-1 --type OrderPlaced --expected-version none --data '{\"total\":12}'
  eventlog append --aggregate order-1 --type OrderPaid --expected-version 1 --data @payment.json")]
    Append(AppendArgs),

    /// Import events from a JSON-lines file (optionally gzip'ed), in order, in batches
    #[command(after_help = "\
One event per line: {\"aggregate\":..,\"type\":..,\"data\":..} with optional \"ts\" (RFC 3339),
\"id\" (UUID), \"metadata\" (object of strings); \"data_base64\" instead of \"data\" for a binary
payload. Each aggregate's versions follow the order of its lines. An export is a valid
import file. gzip input is recognized by its first bytes.

A bad line stops the import with its line number and reason (exit 1); every event before
it is stored. --skip-invalid reports bad lines and goes on. Creates the store if needed.")]
    Import(ImportArgs),

    /// Write events as JSON lines (the import format) to stdout
    #[command(after_help = "\
Importing an export into an empty store reproduces the same aggregates, versions, types,
ids, metadata, timestamps and payload bytes.

Example:
  eventlog export --from 0 > events.jsonl")]
    Export(ExportArgs),

    /// Read one aggregate, one event type, or the whole log
    #[command(after_help = "\
Examples:
  eventlog read --aggregate INC0000045
  eventlog read --aggregate INC0000045 --backward --limit 1     (the latest event)
  eventlog read --type Resolved --from 1000 --limit 10
  eventlog read --all --pretty")]
    Read(ReadArgs),

    /// Print events as they are committed, like `tail -f`, until interrupted
    #[command(after_help = "\
follow reads the log's files without taking the store's lock, so it works next to the
application (or the `eventlog append`/`import` commands) that writes the store. It shows
an append once it is complete in the log. Ctrl-C stops it (exit 0).")]
    Follow(FollowArgs),

    /// Counts and sizes: head seq, events, aggregates, types, segments, log bytes, index
    /// lag, and per subscription its checkpoint, lag and dead letters
    Stats,

    /// Check every record's checksum, seq continuity, version chains and index agreement
    #[command(after_help = "\
Exit 0 when clean; exit 4 with a report naming each problem when not. A problem in the
index is fixed by `eventlog reindex`; a damaged log by `eventlog repair`.")]
    Verify,

    /// Quarantine damaged parts of the log and rebuild the index; says what was lost
    #[command(after_help = "\
Every record is checked (a full scan). From the first damaged record on, the log's bytes
are moved to log/quarantine/ (nothing is deleted) and the records there are no longer in
the store; seqs stay dense. Then the index is rebuilt from the log. Prints what it lost.")]
    Repair,

    /// Rebuild the index (aggregates, types) from the log
    Reindex,

    /// List the publisher's subscriptions: checkpoint, lag and dead letters of each
    Subscriptions,

    /// Inspect and manage a subscription's dead letters
    #[command(subcommand)]
    Deadletters(DeadlettersCommand),

    /// Import the real incident log shipped with eventlog into a fresh store and show
    /// what the store does with it
    #[command(after_help = "\
The data: 3,411 events of 500 incidents from the UCI \"Incident management process
enriched event log\" (Amaral, Fantinato, Peres 2018; CC BY 4.0), normalized to JSON lines.

The store goes to a new temporary folder (named in the output and kept afterwards), or to
--dir, which must be new or empty.")]
    Demo,

    /// Serve the store over WebSocket (/ws), with /metrics and /health, until SIGINT or
    /// SIGTERM
    #[cfg(feature = "server")]
    #[command(after_help = "\
Prints {\"listening\":ADDR,\"url\":..} on stdout once it listens; logs go to stderr.
Clients send the bearer token in the upgrade request's Authorization header; the tokens
are in the token file (see `eventlog token`), reread when it changes. Without any token
the server lets everyone in, which it allows only on a loopback address, and then it
refuses requests from web pages (an Origin header) and to a Host that is not loopback.
docs/PROTOCOL.md describes the messages.

SIGINT or SIGTERM stops it gracefully: no new connections, in-flight requests finish,
subscriptions end with a reason, queues are flushed, the store is synced.

Examples:
  eventlog token add app --read --append
  eventlog serve --listen 127.0.0.1:7070
  eventlog serve --listen 0.0.0.0:7443 --tls-cert cert.pem --tls-key key.pem")]
    Serve(ServeArgs),

    /// Manage the server's bearer tokens (add, list, remove)
    #[cfg(feature = "server")]
    #[command(subcommand)]
    Token(TokenCommand),
}

#[cfg(feature = "server")]
#[derive(Debug, Args)]
struct TokensFileArg {
    /// The token file [default: DIR/tokens.json]
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
}

#[cfg(feature = "server")]
#[derive(Debug, Args)]
struct ServeArgs {
    /// The address to listen on; port 0 picks a free port
    #[arg(long, value_name = "ADDR", default_value_t = eventlog::server::LISTEN_DEFAULT)]
    listen: std::net::SocketAddr,
    #[command(flatten)]
    tokens: TokensFileArg,
    /// Serve TLS with this PEM certificate chain (needs --tls-key)
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Largest request message, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = eventlog::server::MESSAGE_SIZE_BYTES_MAX_DEFAULT)]
    max_message_bytes: usize,
    /// Most open WebSocket connections
    #[arg(long, value_name = "N", default_value_t = eventlog::server::CONNECTIONS_MAX_DEFAULT)]
    max_connections: usize,
    /// Most subscriptions per connection
    #[arg(long, value_name = "N", default_value_t = eventlog::server::SUBSCRIPTIONS_PER_CONNECTION_MAX_DEFAULT)]
    max_subscriptions: usize,
    /// Messages waiting to be sent to one connection
    #[arg(long, value_name = "N", default_value_t = eventlog::server::SEND_QUEUE_LEN_MAX_DEFAULT)]
    send_queue: usize,
    /// Bytes of the messages waiting to be sent to one connection
    #[arg(long, value_name = "BYTES", default_value_t = eventlog::server::SEND_QUEUE_BYTES_MAX_DEFAULT)]
    send_queue_bytes: usize,
    /// How long a full send queue may stay full, or the socket take nothing while there
    /// is something to send, before its client is disconnected as a slow consumer, in
    /// milliseconds
    #[arg(long, value_name = "MS", default_value_t = eventlog::server::SEND_QUEUE_WAIT_MS_DEFAULT)]
    send_queue_wait_ms: u64,
    /// Worker threads of the server's runtime
    #[arg(long, value_name = "N", default_value_t = eventlog::server::WORKER_THREADS_DEFAULT)]
    workers: usize,
}

#[cfg(feature = "server")]
#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a token; prints it once, alone on the last line (only its hash is kept)
    #[command(after_help = "\
Example:
  eventlog token add billing --read --append --scope billing- --expires-in 90
  TOKEN=$(eventlog token add ci --read | tail -n 1)")]
    Add {
        /// The token's name (letters, digits, '.', '_', '-')
        name: String,
        /// Allow read and subscribe
        #[arg(long)]
        read: bool,
        /// Allow append
        #[arg(long)]
        append: bool,
        /// Allow everything, and GET /metrics
        #[arg(long)]
        admin: bool,
        /// Only aggregates whose id starts with this
        #[arg(long, value_name = "PREFIX")]
        scope: Option<String>,
        /// The token stops working after this many days
        #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=36_500))]
        expires_in: Option<u32>,
        #[command(flatten)]
        file: TokensFileArg,
    },
    /// List the tokens (names, permissions, scopes, expiry; never the tokens)
    List {
        #[command(flatten)]
        file: TokensFileArg,
    },
    /// Remove a token; a running server refuses it from its next connection on
    Remove {
        /// The token's name
        name: String,
        #[command(flatten)]
        file: TokensFileArg,
    },
}

#[derive(Debug, Args)]
struct AppendArgs {
    /// The aggregate (stream) id
    #[arg(long, value_name = "ID")]
    aggregate: String,
    /// The event type
    #[arg(long = "type", value_name = "TYPE")]
    event_type: String,
    /// Append only if the aggregate is at this version: a number (0 = no events), `any`,
    /// `none` (no events yet) or `exists` (at least one event)
    #[arg(long, value_name = "N|any|none|exists", default_value = "any", value_parser = parse_expected)]
    expected_version: ExpectedVersion,
    /// The payload: JSON text, `@FILE` to read it from a file, or `@-` from stdin
    #[arg(long, value_name = "JSON|@FILE", default_value = "{}")]
    data: String,
    /// The event id (for idempotent retries); a random UUID when not given
    #[arg(long, value_name = "UUID")]
    id: Option<uuid::Uuid>,
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// The JSON-lines file, gzip'ed or not; `-` reads stdin
    #[arg(value_name = "FILE|-")]
    file: String,
    /// Report bad lines on stderr and go on, instead of stopping at the first one
    #[arg(long)]
    skip_invalid: bool,
    /// Events per atomic append
    #[arg(long, value_name = "N", default_value_t = import::BATCH_EVENTS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=import::BATCH_EVENTS_MAX as u64))]
    batch_events: u64,
}

#[derive(Debug, Args)]
struct ExportArgs {
    /// First seq to export
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    from: u64,
    /// Last seq to export (inclusive) [default: the end of the log]
    #[arg(long, value_name = "SEQ")]
    to: Option<u64>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["aggregate", "event_type", "all"])))]
struct ReadArgs {
    /// Read this aggregate's events, in version order
    #[arg(long, value_name = "ID")]
    aggregate: Option<String>,
    /// Read the events of this type, in seq order
    #[arg(long = "type", value_name = "TYPE")]
    event_type: Option<String>,
    /// Read every event, in seq order
    #[arg(long)]
    all: bool,
    /// With --aggregate: the first version to read (with --backward: the newest)
    #[arg(long, value_name = "N", conflicts_with_all = ["event_type", "all"])]
    from_version: Option<u64>,
    /// With --aggregate: newest first
    #[arg(long, conflicts_with_all = ["event_type", "all"])]
    backward: bool,
    /// With --type or --all: the first seq to read
    #[arg(long, value_name = "SEQ", conflicts_with = "aggregate")]
    from: Option<u64>,
    /// Read at most this many events
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

#[derive(Debug, Args)]
struct FollowArgs {
    /// The first seq to print [default: the end of the log: only new events]
    #[arg(long, value_name = "SEQ")]
    from: Option<u64>,
    /// Only events of this type (repeat for several)
    #[arg(long = "type", value_name = "TYPE")]
    types: Vec<String>,
    /// Only aggregates whose id starts with this
    #[arg(long, value_name = "PREFIX")]
    aggregate_prefix: Option<String>,
}

#[derive(Debug, Subcommand)]
enum DeadlettersCommand {
    /// List a subscription's dead letters, oldest first
    List {
        /// The subscription
        subscription: String,
    },
    /// Show one dead letter with its event
    Show {
        /// The subscription
        subscription: String,
        /// The dead letter's id (from `list`)
        id: u64,
    },
    /// Mark dead letters (all, or these ids) for redelivery by the running subscription
    #[command(after_help = "\
The command line has no handler: the application's subscription redelivers the marked
entries the next time it is idle, and removes each one it then handles.")]
    Redrive {
        /// The subscription
        subscription: String,
        /// Dead-letter ids [default: all]
        ids: Vec<u64>,
    },
    /// Remove every dead letter of a subscription (they are not delivered)
    Purge {
        /// The subscription
        subscription: String,
    },
}

fn parse_expected(s: &str) -> Result<ExpectedVersion, String> {
    match s {
        "any" => Ok(ExpectedVersion::Any),
        "none" => Ok(ExpectedVersion::NoStream),
        "exists" => Ok(ExpectedVersion::Exists),
        _ => s
            .parse()
            .map(ExpectedVersion::Exact)
            .map_err(|_| "use a version number, any, none or exists".to_string()),
    }
}

/// What every command gets: where the store is and how to print.
#[derive(Debug)]
struct Context {
    dir: PathBuf,
    /// Whether the directory was asked for (`--dir` or `EVENTLOG_DIR`).
    dir_given: bool,
    pretty: bool,
}

impl Context {
    /// Opens the store, which must exist: read-only commands never create one.
    fn open_existing(&self) -> Result<Store, CliError> {
        self.require_store()?;
        Store::open(&self.dir, Options::default()).map_err(|e| error::open_error(&self.dir, e))
    }

    /// Checks that the directory holds a store (a `log/` directory).
    fn require_store(&self) -> Result<(), CliError> {
        require_store(&self.dir)
    }

    /// Opens the store, creating it if needed.
    fn open_or_create(&self) -> Result<Store, CliError> {
        Store::open(&self.dir, Options::default()).map_err(|e| error::open_error(&self.dir, e))
    }
}

fn require_store(dir: &Path) -> Result<(), CliError> {
    let log_dir = dir.join(eventlog::log::LOG_DIR_NAME);
    if log_dir.is_dir() {
        return Ok(());
    }
    let what = if dir.exists() {
        format!(
            "{} is not an eventlog store (it has no log/ directory)",
            dir.display()
        )
    } else {
        format!(
            "no store at {}: the directory does not exist",
            dir.display()
        )
    };
    Err(CliError::new(
        Code::NotFound,
        format!("{what}; pass --dir (or set EVENTLOG_DIR) to a store, or create one with `eventlog append` or `eventlog import`"),
    ))
}

fn run(cli: Cli) -> Result<(), CliError> {
    #[cfg(feature = "server")]
    let serving = matches!(cli.command, Some(Command::Serve(_)));
    #[cfg(not(feature = "server"))]
    let serving = false;
    logging::init(cli.log_format, if serving { "info" } else { "off" })?;
    let ctx = Context {
        dir_given: cli.dir.is_some(),
        dir: cli.dir.unwrap_or_else(|| PathBuf::from(DIR_DEFAULT)),
        pretty: cli.pretty,
    };
    let Some(command) = cli.command else {
        return Err(CliError::new(
            Code::Usage,
            "no command given; run `eventlog --help` to list the commands, or `eventlog demo` to try one",
        ));
    };
    match command {
        Command::Append(a) => read::append(&ctx, a),
        Command::Import(a) => import::import(&ctx, a),
        Command::Export(a) => import::export(&ctx, a),
        Command::Read(a) => read::read(&ctx, a),
        Command::Follow(a) => read::follow(&ctx, a),
        Command::Stats => admin::stats(&ctx),
        Command::Verify => admin::verify(&ctx),
        Command::Repair => admin::repair(&ctx),
        Command::Reindex => admin::reindex(&ctx),
        Command::Subscriptions => admin::subscriptions(&ctx),
        Command::Deadletters(c) => admin::deadletters(&ctx, c),
        Command::Demo => demo::demo(&ctx),
        #[cfg(feature = "server")]
        Command::Serve(a) => serve::serve(&ctx, a),
        #[cfg(feature = "server")]
        Command::Token(c) => serve::token(&ctx, c),
    }
}

fn main() -> ExitCode {
    error::install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return error::clap_error(&e),
    };
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => e.report(),
        // The panic hook already printed the one line.
        Err(_) => ExitCode::from(Code::Internal as u8),
    }
}
