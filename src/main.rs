//! The `smart-git-proxy` binary: parse the configuration, bind, serve until SIGTERM or Ctrl-C.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use smart_git_proxy::config::{Config, LogFormat, Resolved};
use smart_git_proxy::http::{self, AppState};
use smart_git_proxy::mirror::maintain;
use tracing_subscriber::EnvFilter;

/// `EX_USAGE` from sysexits.h: the command line or a setting cannot be used; nothing was done.
const EX_USAGE: u8 = 64;

/// jemalloc, not glibc's malloc: glibc keeps the memory a burst of requests freed in its
/// per-thread arenas (the runtime's, the blocking pool's and the pack threads'), so the
/// resident size stays near its peak; jemalloc's background thread returns freed pages to the
/// system after its decay time (10 s), also while the server idles.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The exit statuses of the server and its commands, for `--help`.
const EXIT_STATUS: &str = "Exit status: 0 on success; 64 when the command line or a setting \
    cannot be used (nothing was done); 1 when the work failed.";

/// smart-git-proxy: serves Git repositories under MIRROR_DIR over smart HTTP, in-process.
#[derive(Debug, Parser)]
#[command(version, about, after_help = EXIT_STATUS)]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Consolidate mirrors' packs into one each, now, and exit (safe while a server runs on
    /// the same MIRROR_DIR).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["repo", "all"])))]
    Maintain {
        /// One mirror, `host/path`.
        #[arg(long)]
        repo: Option<String>,
        /// Every mirror under MIRROR_DIR.
        #[arg(long)]
        all: bool,
    },
    /// Print the mirrors under MIRROR_DIR as a table (size, packs, last sync and serve,
    /// privacy, pack-cache bytes), read from disk; safe while a server runs.
    Mirrors,
}

/// A command line or a setting that cannot be used: `error: …` on stderr, as clap prints its
/// own, and status 64.
fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EX_USAGE)
}

fn main() -> ExitCode {
    // Help and version go to stdout with status 0; a bad flag or value is a usage error, whose
    // message names the variable (`<SYNC_STALE_AFTER>`) and the value.
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Ok((Cli::from_arg_matches(&matches)?, matches)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
    };
    // Given on the command line or in the environment, not empty: an empty variable in the
    // env file is as good as a commented-out one.
    let given = |id: &str| {
        matches
            .value_source(id)
            .is_some_and(|source| source != ValueSource::DefaultValue)
            && matches
                .get_raw(id)
                .is_some_and(|mut values| values.any(|v| !v.is_empty()))
    };
    let mut config = cli.config;
    if let Err(e) = config
        .read_secret_files()
        .and_then(|()| config.validate())
        .and_then(|()| config.check_ignored(given))
    {
        return usage_error(e);
    }
    if cli.command.is_some() && !config.mirror_dir.is_dir() {
        return usage_error(format_args!(
            "MIRROR_DIR {} is not a directory (the server creates it; maintain and mirrors read \
             it)",
            config.mirror_dir.display()
        ));
    }
    let settings = match config.resolve() {
        Ok(settings) => settings,
        Err(e) if e.is_usage() => return usage_error(format_args!("{:#}", anyhow::Error::new(e))),
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::new(e));
            return ExitCode::FAILURE;
        }
    };
    let config = &settings.config;
    let filter = match EnvFilter::try_new(&config.log_level) {
        Ok(f) => f,
        Err(e) => return usage_error(format_args!("LOG_LEVEL '{}': {e}", config.log_level)),
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    // Without it, jemalloc purges freed pages only when it allocates again.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "jemalloc's background thread is off: idle memory is returned late");
    }
    let result = match cli.command {
        None => match run(settings) {
            Ok(()) => return ExitCode::SUCCESS,
            // The server's stderr is its log: its last line says why it stopped.
            Err(e) => {
                tracing::error!("{e:#}");
                return ExitCode::FAILURE;
            }
        },
        Some(Command::Maintain { repo, .. }) => maintain(settings, repo),
        Some(Command::Mirrors) => mirrors(&settings.config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(settings: Resolved) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let config = &settings.config;
        std::fs::create_dir_all(&config.mirror_dir)
            .with_context(|| format!("creating MIRROR_DIR {}", config.mirror_dir.display()))?;
        let _lock = smart_git_proxy::mirror::lock_root(&config.mirror_dir)?;
        let shutdown = shutdown_signal()?;
        let addr = settings.listen_addr;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local_addr = listener.local_addr()?;
        let effective = Effective::of(config);
        let limit = config.mirror_max_size;
        let state = AppState::new(settings);
        let removed = state
            .mirrors()
            .remove_temporaries()
            .context("removing what a previous run left unfinished")?;
        if removed > 0 {
            tracing::info!(
                removed,
                "removed unfinished mirrors and sync leftovers of a previous run"
            );
        }
        // Connections queue on the bound socket meanwhile; "listening" means answered from now.
        // The line gives the configuration in effect, secrets aside.
        tracing::info!(
            addr = %local_addr,
            mirror_dir = %effective.mirror_dir,
            upstreams = %effective.upstreams,
            auth_mode = %effective.auth_mode,
            static_token_to = %effective.static_token_to,
            parent_proxy = %effective.parent_proxy,
            admin_api = effective.admin_api,
            webhooks = effective.webhooks,
            mirror_max_size = %effective.mirror_max_size,
            pack_cache_max_size = %effective.pack_cache_max_size,
            max_connections = effective.max_connections,
            max_concurrent_packs = effective.max_concurrent_packs,
            max_concurrent_syncs = effective.max_concurrent_syncs,
            sync_stale_after = %effective.sync_stale_after,
            "listening"
        );
        // Mirrors found on disk get their snapshots in the background; a request that comes
        // first builds its own. Eviction starts once they are known.
        let mirrors = std::sync::Arc::clone(state.mirrors());
        let weak = std::sync::Arc::downgrade(&mirrors);
        let cache = state.pack_cache().cloned();
        tokio::spawn(async move {
            let loaded = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let loaded = mirrors.load_all();
                tracing::info!(loaded, duration = ?started.elapsed(), "mirrors loaded");
            })
            .await;
            if loaded.is_ok() {
                smart_git_proxy::mirror::evict::run(weak, cache, limit).await;
            }
        });
        let mirrors = std::sync::Arc::clone(state.mirrors());
        // systemd (`Type=notify`): ready now; watchdog pings while the runtime runs tasks.
        // Without NOTIFY_SOCKET these do nothing.
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let mut watchdog_usec = 0;
        if sd_notify::watchdog_enabled(false, &mut watchdog_usec) {
            let every = std::time::Duration::from_micros(watchdog_usec / 2);
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(every);
                loop {
                    ticks.tick().await;
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                }
            });
        }
        http::serve(listener, state, shutdown)
            .await
            .context("serving")?;
        // The serves not written yet: the eviction order survives the restart.
        let written = tokio::task::spawn_blocking(move || mirrors.flush_records())
            .await
            .context("writing mirror records")?;
        tracing::info!(written, "mirror records written");
        Ok(())
    })
}

/// The configuration in effect, as the start-up line gives it: defaults resolved, no secret
/// (only whether the admin API and the webhooks are on).
struct Effective {
    mirror_dir: String,
    /// The allowed upstreams as fetched, `scheme://host[:port]`, comma-separated.
    upstreams: String,
    auth_mode: smart_git_proxy::config::AuthMode,
    /// With `AUTH_MODE=static`, the upstreams the token goes to; else `none`.
    static_token_to: String,
    parent_proxy: String,
    admin_api: bool,
    webhooks: bool,
    mirror_max_size: String,
    pack_cache_max_size: String,
    max_connections: usize,
    max_concurrent_packs: usize,
    max_concurrent_syncs: usize,
    sync_stale_after: humantime::Duration,
}

impl Effective {
    fn of(config: &Config) -> Self {
        use smart_git_proxy::config::AuthMode;
        let upstreams = config.upstreams().unwrap_or_default();
        let static_token_to = match config.auth_mode {
            AuthMode::Static => upstreams
                .iter()
                .filter(|u| config.lends_static_token_to(u))
                .map(|u| u.segment.as_str())
                .collect::<Vec<_>>()
                .join(","),
            _ => "none".into(),
        };
        // Values without spaces, so that text logs stay `key=value` pairs.
        let size = |s: String| s.replace(' ', "");
        Effective {
            mirror_dir: config.mirror_dir.display().to_string(),
            upstreams: upstreams.base_urls().collect::<Vec<_>>().join(","),
            auth_mode: config.auth_mode,
            static_token_to,
            parent_proxy: config.parent_proxy().unwrap_or("none").to_owned(),
            admin_api: config.admin_token.is_some(),
            webhooks: config.webhook_secret.is_some(),
            mirror_max_size: config
                .mirror_max_size
                .map_or_else(|| "none".to_owned(), |l| size(l.to_string())),
            pack_cache_max_size: size(config.pack_cache_max_size.to_string()),
            max_connections: config.max_connections,
            max_concurrent_packs: config.concurrent_packs(),
            max_concurrent_syncs: config.max_concurrent_syncs,
            sync_stale_after: config.sync_stale_after,
        }
    }
}

/// `mirrors`: the inventory as a table, from `MIRROR_DIR` alone.
fn mirrors(config: &Config) -> anyhow::Result<()> {
    let list =
        smart_git_proxy::mirror::inventory_on_disk(&config.mirror_dir, &config.pack_cache_dir())
            .with_context(|| format!("reading {}", config.mirror_dir.display()))?;
    let size = |b: u64| bytesize::ByteSize::b(b).to_string();
    let or_dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
    let mut rows = vec![[
        "REPOSITORY".to_owned(),
        "SIZE".into(),
        "PACKS".into(),
        "LAST SYNC".into(),
        "OUTCOME".into(),
        "LAST SERVE".into(),
        "PRIVATE".into(),
        "PACK CACHE".into(),
    ]];
    for m in &list {
        rows.push([
            m.repo.clone(),
            size(m.bytes),
            m.packs.to_string(),
            or_dash(&m.last_sync),
            m.last_sync_outcome.map_or("-", |o| o.as_str()).into(),
            or_dash(&m.last_serve),
            if m.private { "yes" } else { "no" }.into(),
            size(m.pack_cache_bytes),
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    let total: u64 = list.iter().map(|m| m.bytes + m.pack_cache_bytes).sum();
    println!(
        "{}, {} with their pack-cache entries",
        count(list.len(), "mirror"),
        size(total)
    );
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed before the listener is
/// bound: from the moment a client can connect, a stop request drains instead of killing.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        tracing::info!("shutting down");
    })
}

/// What a maintenance did, in one line.
fn describe(o: &maintain::Outcome) -> String {
    let graph = match o.commit_graph {
        Some(n) => format!("{} in the commit-graph", count(n, "commit")),
        None => "no commit-graph".into(),
    };
    match o.work {
        maintain::Work::Nothing => format!(
            "{}, bitmap and commit-graph up to date: nothing to do",
            count(o.packs_before, "pack")
        ),
        maintain::Work::Graph => format!("{} kept, {graph}", count(o.packs_before, "pack")),
        maintain::Work::Bitmap => format!(
            "1 pack kept ({}), {}, {graph}",
            bytesize::ByteSize::b(o.bytes),
            count(o.bitmap_commits, "bitmapped commit")
        ),
        maintain::Work::Consolidate => format!(
            "{} -> 1, {} (heads and tags {}, other refs {}, unreachable {}), {} dropped, {}, {}, {graph}",
            count(o.packs_before, "pack"),
            count(o.regions.iter().sum::<usize>(), "object"),
            o.regions[0],
            o.regions[1],
            o.regions[2],
            o.dropped,
            bytesize::ByteSize::b(o.bytes),
            count(o.bitmap_commits, "bitmapped commit")
        ),
    }
}

/// `maintain`: bring one mirror or all of them, one after the other, to one pack with a
/// bitmap and commit-graph that cover their refs (consolidating only where needed).
fn maintain(settings: Resolved, repo: Option<String>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let root = settings.config.mirror_dir.clone();
        let state = AppState::new(settings);
        let mirrors = state.mirrors();
        let dirs = match repo {
            Some(name) => {
                let target = smart_git_proxy::repo::resolve(&root, &format!("/{name}/info/refs"))?;
                anyhow::ensure!(
                    smart_git_proxy::repo::exists(&target.dir),
                    "no mirror of {name} in {}",
                    root.display()
                );
                vec![target.dir]
            }
            None => mirrors.list().context("listing mirrors")?,
        };
        let mut failed = 0;
        for dir in dirs {
            let name = dir
                .strip_prefix(&root)
                .unwrap_or(&dir)
                .display()
                .to_string();
            match mirrors.maintain(&dir).await {
                Ok(o) => println!("{name}: {}", describe(&o)),
                Err(e) => {
                    failed += 1;
                    eprintln!("error: {name}: {e}");
                }
            }
        }
        anyhow::ensure!(
            failed == 0,
            "maintenance failed for {}",
            count(failed, "mirror")
        );
        Ok(())
    })
}

/// `1 mirror`, `2 mirrors`: `n` and `noun`, plural unless `n` is 1.
fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}
