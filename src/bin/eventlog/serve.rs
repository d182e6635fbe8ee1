//! `serve` and `token add|list|remove`.

use crate::error::{CliError, Code};
use crate::output::{Out, Table};
use crate::{Context, ServeArgs, TokenCommand, TokensFileArg};
use eventlog::server::tokens::{self, NewToken, Permissions, TokenError, TokenFile};
use eventlog::server::{Server, ServerConfig, ServerError, TlsFiles};
use serde_json::json;
use std::path::PathBuf;

impl Context {
    /// The token file: `--tokens`, or `tokens.json` in the store directory.
    fn tokens_path(&self, arg: &TokensFileArg) -> PathBuf {
        arg.tokens
            .clone()
            .unwrap_or_else(|| self.dir.join(tokens::TOKENS_FILE_NAME))
    }
}

fn token_error(e: TokenError) -> CliError {
    let code = match &e {
        TokenError::NameTaken { .. } => Code::Conflict,
        TokenError::NoSuchToken { .. } | TokenError::Io { .. } | TokenError::Random(_) => {
            Code::NotFound
        }
        _ => Code::Usage,
    };
    let hint = match &e {
        TokenError::NameTaken { .. } => {
            "; `eventlog token remove NAME` first, or pick another name"
        }
        TokenError::NoSuchToken { .. } => "; `eventlog token list` shows the names",
        TokenError::BadFile { .. } => "; fix it by hand, or remove it and add the tokens again",
        _ => "",
    };
    CliError::new(code, format!("{e}{hint}"))
}

fn server_error(e: ServerError) -> CliError {
    match e {
        ServerError::Tokens(e) => token_error(e),
        e @ (ServerError::Config(_) | ServerError::NoTokens { .. }) => {
            CliError::new(Code::Usage, e.to_string())
        }
        ServerError::Tls { path, reason } => CliError::new(
            if path.exists() { Code::Usage } else { Code::NotFound },
            format!(
                "TLS: {}: {reason}; give PEM files with --tls-cert (certificate chain) and --tls-key (private key)",
                path.display()
            ),
        ),
        e @ ServerError::Bind { .. } => CliError::new(
            Code::NotFound,
            format!("{e}; pick another --listen address or stop the process using it"),
        ),
        other => CliError::new(Code::NotFound, other.to_string()),
    }
}

pub fn serve(ctx: &Context, a: ServeArgs) -> Result<(), CliError> {
    let mut config = ServerConfig::default();
    config.listen = a.listen;
    config.tokens_path = Some(ctx.tokens_path(&a.tokens));
    config.tls = match (a.tls_cert, a.tls_key) {
        (Some(cert_path), Some(key_path)) => Some(TlsFiles {
            cert_path,
            key_path,
        }),
        _ => None,
    };
    config.message_size_bytes_max = a.max_message_bytes;
    config.connections_max = a.max_connections;
    config.subscriptions_per_connection_max = a.max_subscriptions;
    config.send_queue_len_max = a.send_queue;
    config.send_queue_bytes_max = a.send_queue_bytes;
    config.send_queue_wait_ms = a.send_queue_wait_ms;
    config.worker_threads = a.workers;
    config
        .validate()
        .map_err(|e| CliError::new(Code::Usage, e.to_string()))?;
    let store = ctx.open_or_create()?;
    let runtime = eventlog::server::runtime(&config).map_err(|e| {
        CliError::new(
            Code::NotFound,
            format!("cannot start the server's threads: {e}"),
        )
    })?;
    let tls = config.tls.is_some();
    runtime.block_on(async move {
        let server = Server::bind(store, config).await.map_err(server_error)?;
        let addr = server.local_addr();
        let scheme = if tls { "wss" } else { "ws" };
        let mut out = Out::new();
        out.json(&json!({
            "listening": addr.to_string(),
            "url": format!("{scheme}://{addr}/ws"),
            "tls": tls,
            "auth": if server.requires_token() { "token" } else { "none" },
        }))?;
        out.flush()?;
        server
            .serve(eventlog::server::shutdown_signal())
            .await
            .map_err(server_error)
    })
}

pub fn token(ctx: &Context, command: TokenCommand) -> Result<(), CliError> {
    match command {
        TokenCommand::Add {
            name,
            read,
            append,
            admin,
            scope,
            expires_in,
            file,
        } => {
            let path = ctx.tokens_path(&file);
            let permissions = Permissions {
                read,
                append,
                admin,
            };
            if permissions == Permissions::default() {
                return Err(CliError::new(
                    Code::Usage,
                    "a token needs at least one permission: give --read, --append and/or --admin",
                ));
            }
            let (record, token) = tokens::add_token(
                &path,
                &NewToken {
                    name,
                    permissions,
                    scope,
                    expires_in: expires_in.map(tokens::days),
                },
            )
            .map_err(token_error)?;
            let mut out = Out::new();
            out.line(&format!(
                "added token {} ({}; scope {}; expires {}) to {}",
                record.name,
                record.permissions,
                record
                    .scope
                    .as_deref()
                    .map_or("all aggregates".to_string(), |s| format!("{s:?}")),
                record.expires_us.map_or("never".to_string(), time_text),
                path.display()
            ))?;
            out.line("it is shown only now (the file keeps its SHA-256); pass it as `Authorization: Bearer <token>`:")?;
            out.line(&token)?;
            out.flush()
        }
        TokenCommand::List { file } => {
            let path = ctx.tokens_path(&file);
            let file = TokenFile::load(&path).map_err(token_error)?;
            let now = now_us();
            let mut out = Out::new();
            if ctx.pretty {
                let mut t = Table::new(
                    &["name", "permissions", "scope", "created", "expires"],
                    usize::MAX,
                );
                for r in &file.tokens {
                    let expires = match r.expires_us {
                        None => "never".to_string(),
                        Some(e) if r.is_expired(now) => format!("{} (expired)", time_text(e)),
                        Some(e) => time_text(e),
                    };
                    t.row(
                        &mut out,
                        vec![
                            r.name.clone(),
                            r.permissions.to_string(),
                            r.scope.clone().unwrap_or_else(|| "-".into()),
                            time_text(r.created_us),
                            expires,
                        ],
                    )?;
                }
                t.flush(&mut out)?;
            } else {
                for r in &file.tokens {
                    out.json(&json!({
                        "name": r.name,
                        "permissions": r.permissions.names(),
                        "scope": r.scope,
                        "created": time_text(r.created_us),
                        "expires": r.expires_us.map(time_text),
                        "expired": r.is_expired(now),
                    }))?;
                }
            }
            out.flush()
        }
        TokenCommand::Remove { name, file } => {
            let path = ctx.tokens_path(&file);
            let record = tokens::remove_token(&path, &name).map_err(token_error)?;
            let mut out = Out::new();
            if ctx.pretty {
                out.line(&format!(
                    "removed token {}; a running server refuses it from its next connection",
                    record.name
                ))?;
            } else {
                out.json(&json!({ "removed": record.name }))?;
            }
            out.flush()
        }
    }
}

fn time_text(us: i64) -> String {
    eventlog::json::format_rfc3339_us(us).unwrap_or_else(|| us.to_string())
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
