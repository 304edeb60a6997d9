//! The `smart-git-proxy` binary: parse the configuration, bind, serve until SIGTERM or Ctrl-C.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use smart_git_proxy::config::{Config, LogFormat};
use smart_git_proxy::http::{self, AppState};
use smart_git_proxy::mirror::maintain;
use tracing_subscriber::EnvFilter;

/// `EX_USAGE` from sysexits.h: the configuration is invalid.
const EX_USAGE: u8 = 64;

/// jemalloc, not glibc's malloc: glibc keeps the memory a burst of requests freed in its
/// per-thread arenas (the runtime's, the blocking pool's and the pack threads'), so the
/// resident size stays near its peak; jemalloc's background thread returns freed pages to the
/// system after its decay time (10 s), also while the server idles.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// smart-git-proxy: serves Git repositories under MIRROR_DIR over smart HTTP, in-process.
#[derive(Debug, Parser)]
#[command(version, about)]
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
    Maintain {
        /// One mirror, `host/path`.
        #[arg(long, required_unless_present = "all", conflicts_with = "all")]
        repo: Option<String>,
        /// Every mirror under MIRROR_DIR.
        #[arg(long)]
        all: bool,
    },
    /// Print the mirrors under MIRROR_DIR as a table (size, packs, last sync and serve,
    /// privacy, pack-cache bytes), read from disk; safe while a server runs.
    Mirrors,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout with status 0; a bad setting is a usage error, whose
        // message names the variable (`<SYNC_STALE_AFTER>`) and the value.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
    };
    let config = cli.config;
    if let Err(e) = config.validate() {
        eprintln!("smart-git-proxy: {e}");
        return ExitCode::from(EX_USAGE);
    }
    let filter = match EnvFilter::try_new(&config.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("smart-git-proxy: LOG_LEVEL '{}': {e}", config.log_level);
            return ExitCode::from(EX_USAGE);
        }
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
        None => run(config),
        Some(Command::Maintain { repo, .. }) => maintain(config, repo),
        Some(Command::Mirrors) => mirrors(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        std::fs::create_dir_all(&config.mirror_dir)
            .with_context(|| format!("creating MIRROR_DIR {}", config.mirror_dir.display()))?;
        let _lock = smart_git_proxy::mirror::lock_root(&config.mirror_dir)?;
        let shutdown = shutdown_signal()?;
        let addr = config.listen_socket_addr()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local_addr = listener.local_addr()?;
        let mirror_dir = config.mirror_dir.clone();
        let limit = config.mirror_max_size;
        let state = AppState::new(config);
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
        tracing::info!(addr = %local_addr, mirror_dir = %mirror_dir.display(), "listening");
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
        "{} mirrors, {} with their pack-cache entries",
        list.len(),
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
        Some(n) => format!("{n} commits in the commit-graph"),
        None => "no commit-graph".into(),
    };
    match o.work {
        maintain::Work::Nothing => format!(
            "{} pack(s), bitmap and commit-graph up to date: nothing to do",
            o.packs_before
        ),
        maintain::Work::Graph => format!("{} pack(s) kept, {graph}", o.packs_before),
        maintain::Work::Bitmap => format!(
            "1 pack kept ({}), {} bitmapped commits, {graph}",
            bytesize::ByteSize::b(o.bytes),
            o.bitmap_commits
        ),
        maintain::Work::Consolidate => format!(
            "{} packs -> 1, {} objects (heads and tags {}, other refs {}, unreachable {}), {} dropped, {}, {} bitmapped commits, {graph}",
            o.packs_before,
            o.regions.iter().sum::<usize>(),
            o.regions[0],
            o.regions[1],
            o.regions[2],
            o.dropped,
            bytesize::ByteSize::b(o.bytes),
            o.bitmap_commits
        ),
    }
}

/// `maintain`: bring one mirror or all of them, one after the other, to one pack with a
/// bitmap and commit-graph that cover their refs (consolidating only where needed).
fn maintain(config: Config, repo: Option<String>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let root = config.mirror_dir.clone();
        let state = AppState::new(config);
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
                    eprintln!("{name}: {e}");
                }
            }
        }
        anyhow::ensure!(failed == 0, "maintenance failed for {failed} mirror(s)");
        Ok(())
    })
}
