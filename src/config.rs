//! Settings, in two stages: [`Config`] holds them as given, from command-line flags or the
//! environment (the seed README's names); [`Config::resolve`] checks them and builds what the
//! program uses ([`Resolved`]: the allowlist, trusted proxies, zlib level, HTTP clients), once,
//! before anything binds or opens. Every error names its variable.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use clap::{Parser, ValueEnum};
use ipnet::IpNet;

use crate::upstream::allowlist::{self, Upstream, Upstreams};

// `--help` groups the settings under these headings; the ones everyone sets come first.
const MAIN: &str = "Main settings";
const SERVICES: &str = "Admin API, webhooks and fleets";
const SYNCS: &str = "Mirrors and syncs";
const PACKS: &str = "Packs and memory";
const CLIENTS: &str = "Client limits and timeouts";

/// smart-git-proxy: serves Git repositories under MIRROR_DIR over smart HTTP, in-process.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// Comma-separated upstream hosts the proxy may mirror from; an entry may carry a scheme and
    /// port (`http://127.0.0.1:9001`), its URL segment is then `host:port`.
    #[arg(long, env = "ALLOWED_UPSTREAMS", default_value = "github.com", help_heading = MAIN)]
    pub allowed_upstreams: String,
    /// Directory holding the bare repositories, as `{host}/{path}.git`; created if missing.
    /// Also an option of `maintain` and `mirrors`.
    #[arg(long, env = "MIRROR_DIR", default_value = "/var/tmp/smart-git-proxy", global = true, help_heading = MAIN)]
    pub mirror_dir: PathBuf,
    /// Address to listen on, `host:port` or `:port` (all interfaces).
    #[arg(long, env = "LISTEN_ADDR", default_value = ":8080", help_heading = MAIN)]
    pub listen_addr: String,
    /// Where upstream credentials come from.
    #[arg(long, env = "AUTH_MODE", value_enum, default_value_t = AuthMode::None, help_heading = MAIN)]
    pub auth_mode: AuthMode,
    /// The token sent upstream with `AUTH_MODE=static`.
    #[arg(long, env = "STATIC_TOKEN", hide_env_values = true, help_heading = MAIN)]
    pub static_token: Option<Secret>,
    /// A file holding `STATIC_TOKEN` (systemd's `LoadCredential=`, a Kubernetes secret); a
    /// trailing newline is ignored.
    #[arg(long, env = "STATIC_TOKEN_FILE", help_heading = MAIN)]
    pub static_token_file: Option<PathBuf>,
    /// Upstream hosts the static token is sent to, comma-separated (`host[:port]`). The token
    /// only travels over HTTPS unless an entry is written `http://host[:port]`.
    #[arg(long, env = "STATIC_TOKEN_HOSTS", default_value = "github.com", help_heading = MAIN)]
    pub static_token_hosts: String,
    /// A GitHub App's id (or client id): with `AUTH_MODE=static`, the App's installation tokens
    /// are the static token, instead of `STATIC_TOKEN`, renewed before they expire.
    #[arg(long, env = "GITHUB_APP_ID", help_heading = MAIN)]
    pub github_app_id: Option<String>,
    /// The GitHub App's private key (PEM), which signs its JWTs.
    #[arg(long, env = "GITHUB_APP_PRIVATE_KEY_FILE", help_heading = MAIN)]
    pub github_app_private_key_file: Option<PathBuf>,
    /// The GitHub App's installation whose tokens are used.
    #[arg(long, env = "GITHUB_APP_INSTALLATION_ID", help_heading = MAIN)]
    pub github_app_installation_id: Option<u64>,
    /// The API where the GitHub App's tokens are minted; a GitHub Enterprise Server's is
    /// `https://HOST/api/v3`.
    #[arg(long, env = "GITHUB_API_URL", default_value = "https://api.github.com", help_heading = MAIN)]
    pub github_api_url: String,
    /// Disk space for mirrors and the pack cache together, as a size (`200GiB`) or a share of
    /// `MIRROR_DIR`'s filesystem (`80%`); beyond it the least recently used mirrors are deleted
    /// (with their pack-cache entries) down to 90 % of it. Unset: no limit.
    #[arg(long, env = "MIRROR_MAX_SIZE", help_heading = MAIN)]
    pub mirror_max_size: Option<crate::mirror::evict::Limit>,
    /// Log filter: `debug`, `info`, `warn`, `error`, or a tracing directive.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", help_heading = MAIN)]
    pub log_level: String,
    /// Log lines as `text` or `json` (one object per line, for log shippers).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, help_heading = MAIN)]
    pub log_format: LogFormat,

    /// Bearer token for the admin API (`/api/v1/...`); the API is off while it is unset.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true, help_heading = SERVICES)]
    pub admin_token: Option<Secret>,
    /// A file holding `ADMIN_TOKEN`; a trailing newline is ignored.
    #[arg(long, env = "ADMIN_TOKEN_FILE", help_heading = SERVICES)]
    pub admin_token_file: Option<PathBuf>,
    /// Secret of push webhooks (`POST /webhooks/github`, signed with HMAC-SHA256;
    /// `POST /webhooks/gitlab`, sent as `X-Gitlab-Token`); the endpoints are off while it is
    /// unset.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true, help_heading = SERVICES)]
    pub webhook_secret: Option<Secret>,
    /// A file holding `WEBHOOK_SECRET`; a trailing newline is ignored.
    #[arg(long, env = "WEBHOOK_SECRET_FILE", help_heading = SERVICES)]
    pub webhook_secret_file: Option<PathBuf>,
    /// Comma-separated addresses and CIDR ranges of load balancers whose `X-Forwarded-For`
    /// names the client in logs; empty: the header is ignored.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "", help_heading = SERVICES)]
    pub trusted_proxies: String,
    /// Another smart-git-proxy (`http(s)://host:port`) to fetch every mirror from, as
    /// `{PARENT_PROXY}/{host}/{path}`, instead of the upstream itself: edge tiers share one
    /// regional fetch.
    #[arg(long, env = "PARENT_PROXY", help_heading = SERVICES)]
    pub parent_proxy: Option<String>,
    /// The load balancer in front of a sharded fleet (`http(s)://host:port`): a webhook is
    /// re-sent there as a warm-up of its repository (with `ADMIN_TOKEN`), so that it reaches
    /// the node that holds the mirror.
    #[arg(long, env = "BALANCER_URL", help_heading = SERVICES)]
    pub balancer_url: Option<String>,

    /// Sync a mirror when its last successful sync is older than this (e.g. `2s`, `5m`).
    #[arg(long, env = "SYNC_STALE_AFTER", default_value = "2s", help_heading = SYNCS)]
    pub sync_stale_after: humantime::Duration,
    /// Mirror creations and syncs running at the same time (different repositories).
    #[arg(long, env = "MAX_CONCURRENT_SYNCS", default_value_t = 4, help_heading = SYNCS)]
    pub max_concurrent_syncs: usize,
    /// Of those, how many may run against one upstream host, so that a hanging host cannot
    /// take every slot. Defaults to `MAX_CONCURRENT_SYNCS` − 1 (at least 1).
    #[arg(long, env = "MAX_CONCURRENT_SYNCS_PER_HOST", help_heading = SYNCS)]
    pub max_concurrent_syncs_per_host: Option<usize>,
    /// How long a request for an existing mirror waits for its sync to start (a free slot, or
    /// another request's sync to finish) before the mirror is served as it is (`stale`).
    #[arg(long, env = "SYNC_WAIT", default_value = "5s", help_heading = SYNCS)]
    pub sync_wait: humantime::Duration,
    /// At most one want-miss sync (a client asking for an object the mirror lacks) per
    /// repository per this interval; later want-misses wait for it and share it.
    #[arg(long, env = "WANT_MISS_SYNC_INTERVAL", default_value = "2s", help_heading = SYNCS)]
    pub want_miss_sync_interval: humantime::Duration,
    /// How long a failed mirror creation (an unknown repository, refused credentials, an
    /// upstream error) is remembered and answered without asking the upstream again.
    #[arg(long, env = "FAILURE_CACHE_TTL", default_value = "30s", help_heading = SYNCS)]
    pub failure_cache_ttl: humantime::Duration,
    /// How long the upstream's acceptance or refusal of a client's credentials for a private
    /// mirror is remembered.
    #[arg(long, env = "AUTH_CACHE_TTL", default_value = "60s", help_heading = SYNCS)]
    pub auth_cache_ttl: humantime::Duration,
    /// How long connecting to an upstream may take.
    #[arg(long, env = "UPSTREAM_CONNECT_TIMEOUT", default_value = "10s", help_heading = SYNCS)]
    pub upstream_connect_timeout: humantime::Duration,
    /// An upstream transfer that stalls (under 1 byte/s) this long is aborted.
    #[arg(long, env = "UPSTREAM_STALL_TIMEOUT", default_value = "60s", help_heading = SYNCS)]
    pub upstream_stall_timeout: humantime::Duration,
    /// PEM file of CA certificates trusted for HTTPS upstreams besides the system's (which
    /// SSL_CERT_FILE and SSL_CERT_DIR replace, as for git and curl): for a private CA.
    #[arg(long, env = "UPSTREAM_CA_FILE", help_heading = SYNCS)]
    pub upstream_ca_file: Option<PathBuf>,
    /// Consolidate a mirror's packs into one (in the background, after a sync) once it has more
    /// than this many; `0` turns background maintenance off, also the bitmap of a new mirror and
    /// its refreshes (`smart-git-proxy maintain` still runs it).
    #[arg(long, env = "MAINTENANCE_PACK_THRESHOLD", default_value_t = 16, help_heading = SYNCS)]
    pub maintenance_pack_threshold: usize,
    /// Refresh a mirror's reachability bitmap and commit-graph (in the background, after a
    /// sync) once its refs reach more than this many commits the bitmap does not cover:
    /// requests walk those on top of it.
    #[arg(long, env = "MAINTENANCE_BITMAP_LAG", default_value_t = DEFAULT_BITMAP_LAG, help_heading = SYNCS)]
    pub maintenance_bitmap_lag: usize,
    /// Unreachable objects (refs deleted or force-pushed upstream) are kept by maintenance
    /// while the pack or file holding them is younger than this.
    #[arg(long, env = "MAINTENANCE_GRACE", default_value = "14days", help_heading = SYNCS)]
    pub maintenance_grace: humantime::Duration,

    /// Disk space for finished packs in the pack cache (`{MIRROR_DIR}/.pack-cache`), e.g.
    /// `10GiB`; least recently used packs are evicted beyond it. `0` turns the cache off.
    #[arg(long, env = "PACK_CACHE_MAX_SIZE", value_parser = parse_size, default_value = "10GiB", help_heading = PACKS)]
    pub pack_cache_max_size: ByteSize,
    /// Where the Git LFS object cache keeps objects; default `{MIRROR_DIR}/.lfs-cache`.
    #[arg(long, env = "LFS_CACHE_DIR", help_heading = PACKS)]
    pub lfs_cache_dir: Option<PathBuf>,
    /// Disk space for Git LFS objects, e.g. `50GiB`; least recently used objects are evicted
    /// beyond it. `0` turns the cache off: Git LFS is then passed through.
    #[arg(long, env = "LFS_CACHE_MAX_SIZE", value_parser = parse_size, default_value = "20GiB", help_heading = PACKS)]
    pub lfs_cache_max_size: ByteSize,
    /// Key of the proxy's Git LFS object links (HMAC-SHA256); nodes behind one balancer share
    /// it. Unset: a random key per process (links die with it).
    #[arg(long, env = "LFS_URL_KEY", hide_env_values = true, help_heading = PACKS)]
    pub lfs_url_key: Option<Secret>,
    /// Refs whose moves by a sync prewarm the pack cache with the `--depth=1` fetch
    /// `actions/checkout` makes: comma-separated, `HEAD` for the branch `HEAD` points to, or
    /// globs of ref names (`release/*` is `refs/heads/release/*`; `refs/tags/v*`); empty: off.
    #[arg(long, env = "PREWARM_REFS", default_value = "HEAD", help_heading = PACKS)]
    pub prewarm_refs: String,
    /// Upload-pack requests generating packs at the same time; more wait their turn.
    /// Defaults to twice the number of cores.
    #[arg(long, env = "MAX_CONCURRENT_PACKS", help_heading = PACKS)]
    pub max_concurrent_packs: Option<usize>,
    /// Upload-pack answers streamed at once, packs read from the pack cache included: each holds
    /// a thread while its client reads. More wait their turn.
    #[arg(long, env = "MAX_CONCURRENT_STREAMS", default_value_t = 256, help_heading = PACKS)]
    pub max_concurrent_streams: usize,
    /// Threads compressing one pack; defaults to all cores.
    #[arg(long, env = "PACK_THREADS", help_heading = PACKS)]
    pub pack_threads: Option<usize>,
    /// Compression level (0–9, zlib's scale) for objects a pack cannot copy from disk and
    /// compresses anew (for example the full objects of a `--depth=1` pack). Lower is faster,
    /// higher is smaller; git's default is 6, about 2% smaller than 1 and 10–25% slower.
    #[arg(long, env = "PACK_COMPRESSION_LEVEL", default_value_t = DEFAULT_COMPRESSION_LEVEL, help_heading = PACKS)]
    pub pack_compression_level: u32,
    /// Memory that the delta-base caches of all pack generations share (each thread of pack
    /// work takes up to 32 MiB of it; beyond it, work runs uncached: slower, never larger).
    #[arg(long, env = "PACK_MEMORY_BUDGET", value_parser = parse_size, default_value = "256MiB", help_heading = PACKS)]
    pub pack_memory_budget: ByteSize,
    /// Memory for the mirrors' snapshots (their refs and prebuilt advertisements); beyond it,
    /// those of the mirrors requested least recently are dropped and built again on their next
    /// request
    #[arg(long, env = "SNAPSHOT_MEMORY", value_parser = parse_size, default_value = "256MiB", help_heading = PACKS)]
    pub snapshot_memory: ByteSize,

    /// Open client connections; beyond it, new connections get 503 and are closed.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096, help_heading = CLIENTS)]
    pub max_connections: usize,
    /// Largest accepted request body after gzip decoding, e.g. `64MiB`.
    #[arg(long, env = "MAX_REQUEST_BODY", value_parser = parse_size, default_value = "64MiB", help_heading = CLIENTS)]
    pub max_request_body: ByteSize,
    /// Request-body bytes that all requests together may hold in memory (after gzip decoding)
    /// while they are read and parsed; a request that would exceed it gets 503.
    #[arg(long, env = "MAX_BUFFERED_BODIES", value_parser = parse_size, default_value = "256MiB", help_heading = CLIENTS)]
    pub max_buffered_bodies: ByteSize,
    /// Of `MAX_BUFFERED_BODIES`, what the bodies of one client address (an IPv6 /64; behind
    /// `TRUSTED_PROXIES`, the address they name) may hold together; beyond it, 429. Defaults
    /// to `MAX_REQUEST_BODY`.
    #[arg(long, env = "MAX_BUFFERED_BODIES_PER_CLIENT", value_parser = parse_size, help_heading = CLIENTS)]
    pub max_buffered_bodies_per_client: Option<ByteSize>,
    /// How long a client may take to send a request's headers; also how long an idle
    /// keep-alive connection stays open.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "30s", help_heading = CLIENTS)]
    pub header_read_timeout: humantime::Duration,
    /// How long a client may take to send a whole request body.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "60s", help_heading = CLIENTS)]
    pub body_read_timeout: humantime::Duration,
    /// A client that takes none of its answer for this long (its connection accepts no byte)
    /// is disconnected, and the work for it stops.
    #[arg(long, env = "CLIENT_STALL_TIMEOUT", default_value = "60s", help_heading = CLIENTS)]
    pub client_stall_timeout: humantime::Duration,
    /// How long an upload-pack request may wait for a pack slot before it gets 503.
    #[arg(long, env = "QUEUE_TIMEOUT", default_value = "60s", help_heading = CLIENTS)]
    pub queue_timeout: humantime::Duration,
    /// How long an upload-pack answer may compute (negotiation, shallow boundary, object
    /// selection) before its pack starts streaming; then it ends with an error.
    #[arg(long, env = "COMPUTE_TIMEOUT", default_value = "5m", help_heading = CLIENTS)]
    pub compute_timeout: humantime::Duration,
    /// How long a whole upload-pack answer may take, streaming included.
    #[arg(long, env = "REQUEST_TIMEOUT", default_value = "1h", help_heading = CLIENTS)]
    pub request_timeout: humantime::Duration,
    /// On SIGTERM, how long requests in flight may take to finish before the process exits.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "30s", help_heading = CLIENTS)]
    pub shutdown_grace: humantime::Duration,
}

/// Whether `value` is a level or a `tracing` filter directive: a bare word that is no level
/// (`verbose`) would be read as a target name and silence every other log line.
fn is_log_filter(value: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    value.split(',').all(|directive| {
        let directive = directive.trim();
        match directive.split_once('=') {
            Some((target, level)) => {
                !target.is_empty() && LEVELS.contains(&level.to_ascii_lowercase().as_str())
            }
            None => LEVELS.contains(&directive.to_ascii_lowercase().as_str()),
        }
    })
}

/// A size setting without a usable value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// A number without a unit: `80` meant as `80%` or `80GiB` would be 80 bytes.
    #[error("size unit needed, for example {0}MiB or {0}GiB ({0}B for bytes)")]
    NoUnit(String),
    /// Not a size at all.
    #[error("not a size such as 64MiB or 10GiB: {0}")]
    Invalid(String),
}

/// A size setting (`64MiB`, `10GiB`, `512KB`, `100B`). The unit is required, as
/// `SYNC_STALE_AFTER` requires one: `MIRROR_MAX_SIZE=80`, meant as `80%`, once evicted a
/// mirror while it was created. Zero needs none.
pub fn parse_size(value: &str) -> Result<ByteSize, SizeError> {
    let value = value.trim();
    if value.ends_with(|c: char| c.is_ascii_digit() || c == '.') {
        return match value.parse::<f64>() {
            Ok(0.0) => Ok(ByteSize::b(0)),
            Ok(_) => Err(SizeError::NoUnit(value.to_owned())),
            Err(_) => Err(SizeError::Invalid(format!("'{value}'"))),
        };
    }
    value.parse().map_err(SizeError::Invalid)
}

/// Whether the `STATIC_TOKEN_HOSTS` entry `entry` lends the token to `upstream`: the same host,
/// reached over HTTPS, or over plain HTTP when the entry is written `http://host[:port]`.
fn entry_lends_to(entry: &str, upstream: &Upstream) -> bool {
    match entry.strip_prefix("http://") {
        Some(host) => host.eq_ignore_ascii_case(&upstream.segment),
        None => {
            let host = entry.strip_prefix("https://").unwrap_or(entry);
            upstream.base_url.starts_with("https://")
                && host.eq_ignore_ascii_case(&upstream.segment)
        }
    }
}

/// `value` without trailing slashes, if it is an `http://` or `https://` URL with a host.
fn base_url(value: &str) -> Option<&str> {
    let value = value.trim().trim_end_matches('/');
    let rest = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))?;
    let valid = !rest.is_empty() && !rest.contains(['?', '#', ' ', '@']);
    valid.then_some(value)
}

/// `TRUSTED_PROXIES`: comma-separated addresses (`10.0.0.5`, `::1`) and ranges (`10.0.0.0/8`,
/// whose host bits are dropped).
pub(crate) fn parse_trusted_proxies(list: &str) -> Result<Vec<IpNet>, Error> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|entry| {
            entry
                .parse::<IpNet>()
                .map(|net| net.trunc())
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| Error::TrustedProxy {
                    entry: entry.to_owned(),
                })
        })
        .collect()
}

/// The settings as the program uses them, built once at start by [`Config::resolve`]: nothing
/// is parsed again, and nothing falls back to a default when a value is bad.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The settings as given: durations, sizes and counts are used as they are.
    pub config: Config,
    /// `LISTEN_ADDR`, a name resolved to its first address.
    pub listen_addr: SocketAddr,
    /// `ALLOWED_UPSTREAMS`
    pub upstreams: Upstreams,
    /// `TRUSTED_PROXIES`
    pub trusted_proxies: Vec<IpNet>,
    /// `PACK_COMPRESSION_LEVEL`
    pub compression: gix::zlib::Compression,
    /// `PREWARM_REFS`
    pub prewarm_refs: crate::prewarm::Refs,
    /// `PARENT_PROXY`, without its trailing slash.
    pub parent_proxy: Option<String>,
    /// `BALANCER_URL`, without its trailing slash.
    pub balancer_url: Option<String>,
    /// `UPSTREAM_CONNECT_TIMEOUT` and `UPSTREAM_STALL_TIMEOUT`.
    pub upstream: crate::upstream::Options,
    /// The client of LFS requests and of webhooks forwarded to `BALANCER_URL`, with the
    /// upstream timeouts.
    pub http_client: reqwest::Client,
    /// The client of ref listings, whose redirects stay within the allowed upstreams and the
    /// parent proxy.
    pub listing_client: crate::upstream::ListingClient,
}

/// See `PACK_COMPRESSION_LEVEL`; `docs/performance.md` gives the measurements behind it.
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 1;

/// See `MAINTENANCE_BITMAP_LAG`; `docs/performance.md` gives the measurements behind it.
pub const DEFAULT_BITMAP_LAG: usize = 300;

/// A setting that is never printed: its `Debug` form is `<redacted>`, so a logged or printed
/// configuration does not carry the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_owned())
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the credentials for upstream traffic come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// No credentials: public repositories only.
    None,
    /// `STATIC_TOKEN` for every upstream request.
    Static,
    /// The client's own `Authorization` header, never stored.
    PassThrough,
}

impl std::fmt::Display for AuthMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.to_possible_value() {
            Some(value) => f.write_str(value.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `LISTEN_ADDR` is not an address.
    #[error("LISTEN_ADDR '{value}' is not `host:port` or `:port`")]
    ListenAddr {
        /// The value given.
        value: String,
    },
    /// `ALLOWED_UPSTREAMS` has an unusable entry.
    #[error(transparent)]
    Upstreams(#[from] allowlist::Error),
    /// `AUTH_MODE=static` without a token.
    #[error(
        "AUTH_MODE=static needs STATIC_TOKEN (or STATIC_TOKEN_FILE), or a GitHub App \
         (GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY_FILE, GITHUB_APP_INSTALLATION_ID)"
    )]
    MissingToken,
    /// A static token and a GitHub App, whose tokens would replace it.
    #[error(
        "{token} and GITHUB_APP_ID are both set: the GitHub App's installation tokens are the \
         static token; keep one"
    )]
    TokenAndApp {
        /// `STATIC_TOKEN` or `STATIC_TOKEN_FILE`.
        token: &'static str,
    },
    /// Some of the GitHub App's settings, not all.
    #[error("a GitHub App needs {missing} too")]
    AppIncomplete {
        /// The settings missing.
        missing: String,
    },
    /// The GitHub App's key cannot be used.
    #[error(transparent)]
    App(#[from] crate::upstream::credentials::Error),
    /// The zlib level is out of range.
    #[error("PACK_COMPRESSION_LEVEL must be 0 to 9, not {0}")]
    CompressionLevel(u32),
    /// A count that must be positive is zero.
    #[error("{key} must be at least 1")]
    Zero {
        /// The setting.
        key: &'static str,
    },
    /// A time limit of zero, which would refuse everything.
    #[error("{key} must be longer than 0s")]
    ZeroTime {
        /// The setting.
        key: &'static str,
    },
    /// The shared body budget, or one client's share, cannot hold one largest body.
    #[error("{key} must be at least MAX_REQUEST_BODY")]
    BodyBudget {
        /// The setting.
        key: &'static str,
    },
    /// No upstream is allowed.
    #[error("ALLOWED_UPSTREAMS is empty: name at least one upstream host")]
    NoUpstreams,
    /// `LOG_LEVEL` is neither a level nor a filter directive.
    #[error(
        "LOG_LEVEL '{0}' is not trace, debug, info, warn, error, off or a directive such as \
         'info,smart_git_proxy=debug'"
    )]
    LogLevel(String),
    /// `PARENT_PROXY` or `BALANCER_URL` is not an `http(s)://host[:port]` URL.
    #[error("{key} '{value}' is not an http:// or https:// URL")]
    Url {
        /// The setting.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// `ADMIN_TOKEN` or `WEBHOOK_SECRET` set but empty: every request without credentials
    /// would present it.
    #[error("{key} is empty: set a secret, or unset it to turn its endpoints off")]
    EmptySecret {
        /// The setting.
        key: &'static str,
    },
    /// `BALANCER_URL` without the token its forwarded requests carry.
    #[error("BALANCER_URL needs ADMIN_TOKEN (the nodes' shared admin token)")]
    BalancerWithoutToken,
    /// `TRUSTED_PROXIES` has an entry that is neither an address nor a CIDR range.
    #[error("TRUSTED_PROXIES entry '{entry}' is not an IP address or a CIDR range (10.0.0.0/8)")]
    TrustedProxy {
        /// The entry.
        entry: String,
    },
    /// `PREWARM_REFS` has an unusable entry.
    #[error(transparent)]
    PrewarmRefs(#[from] crate::prewarm::Error),
    /// A setting that was given but does nothing with the others, named in the message.
    #[error("{setting} does nothing {reason}")]
    Ignored {
        /// The setting, with its value when that helps.
        setting: String,
        /// Which other setting makes it useless, and what to do.
        reason: String,
    },
    /// A secret given both in its variable and in a file.
    #[error("{key} and {key}_FILE are both set: keep one")]
    SecretTwice {
        /// The secret's variable.
        key: &'static str,
    },
    /// A `*_FILE` secret that cannot be read.
    #[error("{key}_FILE '{path}': {reason}")]
    SecretFile {
        /// The secret's variable.
        key: &'static str,
        /// The file.
        path: String,
        /// Why it cannot be read.
        reason: String,
    },
    /// `UPSTREAM_CA_FILE` cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::upstream::tls::Error),
    /// `MIRROR_DIR` exists and is not a directory, or cannot be created.
    #[error("MIRROR_DIR '{path}': {reason}")]
    MirrorDir {
        /// The setting's value.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An HTTP client cannot be built (its TLS backend does not start): not a usage error.
    #[error("cannot set up the HTTP clients")]
    HttpClient(#[source] reqwest::Error),
}

impl Error {
    /// Whether a setting is at fault (exit 64, `EX_USAGE`), rather than the machine.
    pub fn is_usage(&self) -> bool {
        !matches!(self, Error::HttpClient(_))
    }
}

impl Config {
    /// The socket address to bind.
    pub fn listen_socket_addr(&self) -> Result<SocketAddr, Error> {
        let value = self.listen_addr.trim();
        let parsed = match value.strip_prefix(':') {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p)),
            // `host:port` with a name (`localhost:8080`) resolves to its first address.
            None => value.parse().ok().or_else(|| {
                std::net::ToSocketAddrs::to_socket_addrs(value)
                    .ok()
                    .and_then(|mut addrs| addrs.next())
            }),
        };
        parsed.ok_or_else(|| Error::ListenAddr {
            value: self.listen_addr.clone(),
        })
    }

    /// The zlib level for re-compressed objects.
    pub fn compression(&self) -> Result<gix::zlib::Compression, Error> {
        i32::try_from(self.pack_compression_level)
            .ok()
            .and_then(gix::zlib::Compression::new)
            .ok_or(Error::CompressionLevel(self.pack_compression_level))
    }

    /// Where the pack cache lives.
    pub fn pack_cache_dir(&self) -> PathBuf {
        self.mirror_dir.join(".pack-cache")
    }

    /// `LFS_CACHE_DIR`, or its default under `MIRROR_DIR`.
    pub fn lfs_cache_dir(&self) -> PathBuf {
        self.lfs_cache_dir
            .clone()
            .unwrap_or_else(|| self.mirror_dir.join(".lfs-cache"))
    }

    /// Whether `STATIC_TOKEN` may be sent to `upstream`: its host is listed in
    /// `STATIC_TOKEN_HOSTS`, and it is reached over HTTPS or the entry opts into plain HTTP.
    pub fn lends_static_token_to(&self, upstream: &Upstream) -> bool {
        self.static_token_entries()
            .any(|entry| entry_lends_to(entry, upstream))
    }

    /// The entries of `STATIC_TOKEN_HOSTS`.
    fn static_token_entries(&self) -> impl Iterator<Item = &str> {
        self.static_token_hosts
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
    }

    /// `MAX_CONCURRENT_SYNCS_PER_HOST`, or its default.
    pub fn syncs_per_host(&self) -> usize {
        self.max_concurrent_syncs_per_host
            .unwrap_or(self.max_concurrent_syncs.saturating_sub(1))
            .clamp(1, self.max_concurrent_syncs.max(1))
    }

    /// `MAX_BUFFERED_BODIES_PER_CLIENT`, or its default.
    pub fn body_share(&self) -> ByteSize {
        self.max_buffered_bodies_per_client
            .unwrap_or(self.max_request_body)
    }

    /// The parsed `ALLOWED_UPSTREAMS`.
    pub fn upstreams(&self) -> Result<Upstreams, Error> {
        Ok(Upstreams::parse(&self.allowed_upstreams)?)
    }

    /// The parsed `TRUSTED_PROXIES`.
    pub fn trusted_proxies(&self) -> Result<Vec<IpNet>, Error> {
        parse_trusted_proxies(&self.trusted_proxies)
    }

    /// The parsed `PREWARM_REFS`.
    pub fn prewarm_refs(&self) -> Result<crate::prewarm::Refs, Error> {
        Ok(crate::prewarm::Refs::parse(&self.prewarm_refs)?)
    }

    /// Read the secrets given as files (`STATIC_TOKEN_FILE`, `ADMIN_TOKEN_FILE`,
    /// `WEBHOOK_SECRET_FILE`) into their settings; call before [`Config::validate`]. A secret
    /// given both ways is refused, naming both.
    pub fn read_secret_files(&mut self) -> Result<(), Error> {
        for (key, file, secret) in [
            (
                "STATIC_TOKEN",
                &self.static_token_file,
                &mut self.static_token,
            ),
            ("ADMIN_TOKEN", &self.admin_token_file, &mut self.admin_token),
            (
                "WEBHOOK_SECRET",
                &self.webhook_secret_file,
                &mut self.webhook_secret,
            ),
        ] {
            let Some(path) = file else { continue };
            if secret.is_some() {
                return Err(Error::SecretTwice { key });
            }
            let text = std::fs::read_to_string(path).map_err(|e| Error::SecretFile {
                key,
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            // `echo token > file` and editors end the file with a newline; the secret has none.
            *secret = Some(Secret(text.trim_end_matches(['\n', '\r']).to_owned()));
        }
        Ok(())
    }

    /// The GitHub App's settings, when `GITHUB_APP_ID`, `GITHUB_APP_PRIVATE_KEY_FILE` and
    /// `GITHUB_APP_INSTALLATION_ID` are set (its key read and checked).
    pub fn github_app(&self) -> Result<Option<crate::upstream::credentials::AppSettings>, Error> {
        let id = self.github_app_id.as_deref().filter(|id| !id.is_empty());
        let key = self.github_app_private_key_file.as_deref();
        let installation = self.github_app_installation_id;
        let (Some(id), Some(key), Some(installation)) = (id, key, installation) else {
            let missing: Vec<&str> = [
                ("GITHUB_APP_ID", id.is_none()),
                ("GITHUB_APP_PRIVATE_KEY_FILE", key.is_none()),
                ("GITHUB_APP_INSTALLATION_ID", installation.is_none()),
            ]
            .into_iter()
            .filter_map(|(name, missing)| missing.then_some(name))
            .collect();
            return match missing.len() {
                3 => Ok(None),
                _ => Err(Error::AppIncomplete {
                    missing: missing.join(" and "),
                }),
            };
        };
        let api = base_url(&self.github_api_url).ok_or_else(|| Error::Url {
            key: "GITHUB_API_URL",
            value: self.github_api_url.clone(),
        })?;
        Ok(Some(crate::upstream::credentials::AppSettings::load(
            id,
            key,
            installation,
            api,
        )?))
    }

    /// The TLS settings of upstream connections: the system's roots and `UPSTREAM_CA_FILE`.
    pub fn upstream_tls(&self) -> Result<crate::upstream::tls::ClientTls, Error> {
        Ok(crate::upstream::tls::ClientTls::load(
            self.upstream_ca_file.as_deref(),
        )?)
    }

    /// Check every setting; call before binding.
    pub fn validate(&self) -> Result<(), Error> {
        self.listen_socket_addr()?;
        if self.upstream_ca_file.is_some() {
            self.upstream_tls()?;
        }
        self.trusted_proxies()?;
        self.prewarm_refs()?;
        if self.max_concurrent_packs == Some(0) {
            return Err(Error::Zero {
                key: "MAX_CONCURRENT_PACKS",
            });
        }
        if self.max_concurrent_streams == 0 {
            return Err(Error::Zero {
                key: "MAX_CONCURRENT_STREAMS",
            });
        }
        if self.pack_threads == Some(0) {
            return Err(Error::Zero {
                key: "PACK_THREADS",
            });
        }
        self.compression()?;
        if self.upstreams()? == Upstreams::default() {
            return Err(Error::NoUpstreams);
        }
        if !is_log_filter(&self.log_level) {
            return Err(Error::LogLevel(self.log_level.clone()));
        }
        if self.mirror_dir.exists() && !self.mirror_dir.is_dir() {
            return Err(Error::MirrorDir {
                path: self.mirror_dir.display().to_string(),
                reason: "not a directory".into(),
            });
        }
        let app = self.github_app()?.is_some();
        let token = self
            .static_token
            .as_ref()
            .is_some_and(|t| !t.expose().is_empty());
        if app && token {
            return Err(Error::TokenAndApp {
                token: match self.static_token_file {
                    Some(_) => "STATIC_TOKEN_FILE",
                    None => "STATIC_TOKEN",
                },
            });
        }
        if self.auth_mode == AuthMode::Static && !token && !app {
            return Err(Error::MissingToken);
        }
        for (key, value) in [
            ("MAX_CONCURRENT_SYNCS", Some(self.max_concurrent_syncs)),
            (
                "MAX_CONCURRENT_SYNCS_PER_HOST",
                self.max_concurrent_syncs_per_host,
            ),
            ("MAX_CONNECTIONS", Some(self.max_connections)),
        ] {
            if value == Some(0) {
                return Err(Error::Zero { key });
            }
        }
        if self.max_buffered_bodies < self.max_request_body {
            return Err(Error::BodyBudget {
                key: "MAX_BUFFERED_BODIES",
            });
        }
        if self.body_share() < self.max_request_body {
            return Err(Error::BodyBudget {
                key: "MAX_BUFFERED_BODIES_PER_CLIENT",
            });
        }
        if self.client_stall_timeout.is_zero() {
            return Err(Error::ZeroTime {
                key: "CLIENT_STALL_TIMEOUT",
            });
        }
        for (key, value) in [
            ("PARENT_PROXY", &self.parent_proxy),
            ("BALANCER_URL", &self.balancer_url),
        ] {
            if let Some(value) = value {
                base_url(value).ok_or_else(|| Error::Url {
                    key,
                    value: value.clone(),
                })?;
            }
        }
        for (key, secret) in [
            ("ADMIN_TOKEN", &self.admin_token),
            ("WEBHOOK_SECRET", &self.webhook_secret),
            ("LFS_URL_KEY", &self.lfs_url_key),
        ] {
            if secret
                .as_ref()
                .is_some_and(|s| s.expose().trim().is_empty())
            {
                return Err(Error::EmptySecret { key });
            }
        }
        if self.balancer_url.is_some() && self.admin_token.is_none() {
            return Err(Error::BalancerWithoutToken);
        }
        Ok(())
    }

    /// Refuse settings that were given (`given(id)`: on the command line or in the
    /// environment, `id` being the field's name) but do nothing with the others, so that an
    /// operator does not believe them in effect. Call after [`Config::validate`].
    pub fn check_ignored(&self, given: impl Fn(&str) -> bool) -> Result<(), Error> {
        let ignored = |setting: &str, reason: String| {
            Err(Error::Ignored {
                setting: setting.to_owned(),
                reason,
            })
        };
        let mode = self.auth_mode;
        if mode != AuthMode::Static {
            for (id, key) in [
                ("static_token", "STATIC_TOKEN"),
                ("static_token_file", "STATIC_TOKEN_FILE"),
                ("static_token_hosts", "STATIC_TOKEN_HOSTS"),
                ("github_app_id", "GITHUB_APP_ID"),
                ("github_app_private_key_file", "GITHUB_APP_PRIVATE_KEY_FILE"),
                ("github_app_installation_id", "GITHUB_APP_INSTALLATION_ID"),
                ("github_api_url", "GITHUB_API_URL"),
            ] {
                if given(id) {
                    return ignored(
                        key,
                        format!(
                            "with AUTH_MODE={mode}: the token is sent with AUTH_MODE=static \
                             only; set that, or unset {key}"
                        ),
                    );
                }
            }
        }
        if given("github_api_url") && self.github_app_id.is_none() {
            return ignored(
                "GITHUB_API_URL",
                "without GITHUB_APP_ID: it is where a GitHub App's tokens are minted".into(),
            );
        }
        if mode != AuthMode::PassThrough && given("auth_cache_ttl") {
            return ignored(
                "AUTH_CACHE_TTL",
                format!(
                    "with AUTH_MODE={mode}: it times the checks of clients' credentials, which \
                     AUTH_MODE=pass-through makes"
                ),
            );
        }
        if mode == AuthMode::Static {
            self.check_static_token_hosts(given("static_token_hosts"))?;
        }
        if self.pack_cache_max_size.as_u64() == 0
            && given("prewarm_refs")
            && !self.prewarm_refs.trim().is_empty()
        {
            return ignored(
                "PREWARM_REFS",
                "with PACK_CACHE_MAX_SIZE=0: prewarming fills the pack cache, which is off".into(),
            );
        }
        if self.balancer_url.is_some() && self.webhook_secret.is_none() {
            return ignored(
                "BALANCER_URL",
                "without WEBHOOK_SECRET: only webhooks are forwarded to the balancer".into(),
            );
        }
        if let Some(per_host) = self
            .max_concurrent_syncs_per_host
            .filter(|n| *n > self.max_concurrent_syncs)
        {
            return ignored(
                &format!("MAX_CONCURRENT_SYNCS_PER_HOST={per_host}"),
                format!(
                    "beyond MAX_CONCURRENT_SYNCS={}, which bounds it",
                    self.max_concurrent_syncs
                ),
            );
        }
        Ok(())
    }

    /// With `AUTH_MODE=static`, every `STATIC_TOKEN_HOSTS` entry must lend the token to an
    /// allowed upstream: a host missing from `ALLOWED_UPSTREAMS`, or a plain-HTTP upstream
    /// named without `http://`, would leave the upstream without the token.
    fn check_static_token_hosts(&self, given: bool) -> Result<(), Error> {
        let upstreams = self.upstreams()?;
        let source = if given { "" } else { " (the default)" };
        let mut entries = self.static_token_entries().peekable();
        if entries.peek().is_none() {
            return Err(Error::Ignored {
                setting: "AUTH_MODE=static".into(),
                reason: "with an empty STATIC_TOKEN_HOSTS: the token goes to no upstream".into(),
            });
        }
        for entry in entries {
            if upstreams.iter().any(|u| entry_lends_to(entry, u)) {
                continue;
            }
            let host = entry
                .strip_prefix("https://")
                .or_else(|| entry.strip_prefix("http://"))
                .unwrap_or(entry);
            let hint = match upstreams.get(host) {
                Some(u) if u.base_url.starts_with("http://") => format!(
                    "ALLOWED_UPSTREAMS fetches {host} over plain HTTP, and the token goes there \
                     only if the entry is written http://{host}"
                ),
                _ => format!("{host} is not in ALLOWED_UPSTREAMS ({})", upstreams.names()),
            };
            return Err(Error::Ignored {
                setting: format!("STATIC_TOKEN_HOSTS entry '{entry}'{source}"),
                reason: format!("with AUTH_MODE=static: {hint}"),
            });
        }
        Ok(())
    }

    /// Upload-pack requests generating packs at once: `MAX_CONCURRENT_PACKS`, or twice the
    /// number of cores.
    pub fn concurrent_packs(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        self.max_concurrent_packs.unwrap_or(cores * 2)
    }

    /// Check every setting, then build what the program uses from them; call before binding.
    pub fn resolve(self) -> Result<Resolved, Error> {
        self.validate()?;
        let upstream = crate::upstream::Options {
            connect_timeout: *self.upstream_connect_timeout,
            stall_timeout: *self.upstream_stall_timeout,
            tls: self.upstream_tls()?,
        };
        let upstreams = self.upstreams()?;
        let parent_proxy = self.parent_proxy().map(str::to_owned);
        // Ref listings follow redirects only within the allowed upstreams (and the parent).
        let origins: Vec<String> = upstreams
            .base_urls()
            .map(str::to_owned)
            .chain(parent_proxy.clone())
            .collect();
        let listing_client =
            crate::upstream::ListingClient::new(&upstream, &origins).map_err(Error::HttpClient)?;
        let http_client = upstream
            .tls
            .client(reqwest::Client::builder())
            .connect_timeout(upstream.connect_timeout)
            .read_timeout(upstream.stall_timeout)
            .user_agent(crate::protocol::AGENT)
            .build()
            .map_err(Error::HttpClient)?;
        Ok(Resolved {
            listen_addr: self.listen_socket_addr()?,
            trusted_proxies: self.trusted_proxies()?,
            compression: self.compression()?,
            prewarm_refs: self.prewarm_refs()?,
            balancer_url: self.balancer_url().map(str::to_owned),
            parent_proxy,
            upstreams,
            upstream,
            http_client,
            listing_client,
            config: self,
        })
    }

    /// `PARENT_PROXY` without its trailing slash, when set and valid.
    pub fn parent_proxy(&self) -> Option<&str> {
        self.parent_proxy.as_deref().and_then(base_url)
    }

    /// `BALANCER_URL` without its trailing slash, when set and valid.
    pub fn balancer_url(&self) -> Option<&str> {
        self.balancer_url.as_deref().and_then(base_url)
    }

    /// A configuration with defaults for everything but the mirror directory, as tests and
    /// embedders need it.
    pub fn new(mirror_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen_addr: "127.0.0.1:0".into(),
            mirror_dir: mirror_dir.into(),
            log_level: "info".into(),
            log_format: LogFormat::Text,
            trusted_proxies: String::new(),
            max_request_body: ByteSize::mib(64),
            max_buffered_bodies: ByteSize::mib(256),
            max_buffered_bodies_per_client: None,
            client_stall_timeout: Duration::from_secs(60).into(),
            header_read_timeout: Duration::from_secs(30).into(),
            body_read_timeout: Duration::from_secs(60).into(),
            max_connections: 4096,
            queue_timeout: Duration::from_secs(60).into(),
            compute_timeout: Duration::from_secs(300).into(),
            request_timeout: Duration::from_secs(3600).into(),
            shutdown_grace: Duration::from_secs(30).into(),
            max_concurrent_packs: None,
            max_concurrent_streams: 256,
            pack_threads: None,
            pack_compression_level: DEFAULT_COMPRESSION_LEVEL,
            pack_cache_max_size: ByteSize::gib(10),
            lfs_cache_dir: None,
            lfs_cache_max_size: ByteSize::gib(20),
            lfs_url_key: None,
            mirror_max_size: None,
            pack_memory_budget: ByteSize::mib(256),
            snapshot_memory: ByteSize::mib(256),
            maintenance_pack_threshold: 16,
            maintenance_bitmap_lag: DEFAULT_BITMAP_LAG,
            maintenance_grace: Duration::from_secs(14 * 24 * 3600).into(),
            prewarm_refs: "HEAD".into(),
            allowed_upstreams: "github.com".into(),
            sync_stale_after: Duration::from_secs(2).into(),
            auth_mode: AuthMode::None,
            static_token: None,
            static_token_file: None,
            static_token_hosts: "github.com".into(),
            github_app_id: None,
            github_app_private_key_file: None,
            github_app_installation_id: None,
            github_api_url: "https://api.github.com".into(),
            admin_token: None,
            admin_token_file: None,
            webhook_secret: None,
            webhook_secret_file: None,
            parent_proxy: None,
            balancer_url: None,
            max_concurrent_syncs: 4,
            max_concurrent_syncs_per_host: None,
            sync_wait: Duration::from_secs(5).into(),
            want_miss_sync_interval: Duration::from_secs(2).into(),
            failure_cache_ttl: Duration::from_secs(30).into(),
            upstream_connect_timeout: Duration::from_secs(10).into(),
            upstream_stall_timeout: Duration::from_secs(60).into(),
            upstream_ca_file: None,
            auth_cache_ttl: Duration::from_secs(60).into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_from_files_lose_their_newline_and_are_not_in_debug() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cr3t-from-file\r\n").unwrap();
        let mut c = Config::new("/m");
        c.static_token_file = Some(path.clone());
        c.admin_token_file = Some(path.clone());
        c.webhook_secret_file = Some(path);
        c.read_secret_files().unwrap();
        for secret in [&c.static_token, &c.admin_token, &c.webhook_secret] {
            assert_eq!(
                secret.as_ref().map(Secret::expose),
                Some("s3cr3t-from-file")
            );
        }
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn the_static_token_goes_to_its_hosts_over_https_only() {
        let upstreams = Upstreams::parse(
            "github.com,gitlab.example.org,http://127.0.0.1:9001,http://10.0.0.1:80",
        )
        .unwrap();
        let mut c = Config::new("/m");
        let lends = |c: &Config, segment| c.lends_static_token_to(upstreams.get(segment).unwrap());
        assert!(lends(&c, "github.com"));
        assert!(!lends(&c, "gitlab.example.org"), "not listed");
        c.static_token_hosts = "github.com, 127.0.0.1:9001, http://10.0.0.1:80".into();
        assert!(
            !lends(&c, "127.0.0.1:9001"),
            "plain http needs an http:// entry"
        );
        assert!(lends(&c, "10.0.0.1:80"));
        assert!(lends(&c, "github.com"));
    }

    #[test]
    fn the_static_token_is_never_printed() {
        let c =
            Config::try_parse_from(["x", "--auth-mode", "static", "--static-token", "ghp_s3cret"])
                .unwrap();
        assert_eq!(c.static_token.as_ref().unwrap().expose(), "ghp_s3cret");
        let printed = format!("{c:?} {c:#?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }

    #[test]
    fn chaining_and_forwarding_urls_are_checked() {
        let mut c = Config::new("/m");
        c.parent_proxy = Some("http://regional:8080/".into());
        assert!(c.validate().is_ok());
        assert_eq!(c.parent_proxy(), Some("http://regional:8080"));
        for bad in ["regional:8080", "ftp://x", "http://", "http://u:p@x"] {
            c.parent_proxy = Some(bad.into());
            assert_eq!(
                c.validate().unwrap_err().to_string(),
                format!("PARENT_PROXY '{bad}' is not an http:// or https:// URL")
            );
        }
        let mut c = Config::new("/m");
        c.balancer_url = Some("http://lb".into());
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "BALANCER_URL needs ADMIN_TOKEN (the nodes' shared admin token)"
        );
        c.admin_token = Some("t".into());
        assert!(c.validate().is_ok());
        let c = Config::try_parse_from(["x", "--webhook-secret", "hook-s3cret"]).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn resolving_builds_what_the_program_uses_once() {
        let mut c = Config::new("/m");
        c.allowed_upstreams = "github.com, http://127.0.0.1:9001".into();
        c.parent_proxy = Some("http://regional:8080/".into());
        c.trusted_proxies = "10.1.2.3/8".into();
        c.pack_compression_level = 9;
        let r = c.resolve().unwrap();
        assert_eq!(r.upstreams.names(), "github.com, 127.0.0.1:9001");
        assert_eq!(r.parent_proxy.as_deref(), Some("http://regional:8080"));
        assert_eq!(r.balancer_url, None);
        assert_eq!(
            r.trusted_proxies,
            vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert_eq!(r.compression.level(), 9);
        assert_eq!(r.listen_addr, "127.0.0.1:0".parse().unwrap());
        // A bad value is an error naming its variable, never a default.
        for (adjust, key) in [
            (
                (|c: &mut Config| c.pack_compression_level = 10) as fn(&mut Config),
                "PACK_COMPRESSION_LEVEL",
            ),
            (
                |c| c.allowed_upstreams = "ftp://x".into(),
                "ALLOWED_UPSTREAMS",
            ),
            (|c| c.trusted_proxies = "lb".into(), "TRUSTED_PROXIES"),
            (|c| c.prewarm_refs = "a b".into(), "PREWARM_REFS"),
        ] {
            let mut c = Config::new("/m");
            adjust(&mut c);
            let e = c.resolve().unwrap_err();
            assert!(e.is_usage());
            assert!(e.to_string().starts_with(key), "{e}");
        }
    }

    #[test]
    fn empty_secrets_are_refused() {
        for (key, value) in [("ADMIN_TOKEN", ""), ("WEBHOOK_SECRET", " ")] {
            let mut c = Config::new("/m");
            let secret = Some(Secret::from(value));
            match key {
                "ADMIN_TOKEN" => c.admin_token = secret,
                _ => c.webhook_secret = secret,
            }
            assert_eq!(
                c.validate().unwrap_err().to_string(),
                format!("{key} is empty: set a secret, or unset it to turn its endpoints off")
            );
        }
    }

    #[test]
    fn listen_addr_forms() {
        let mut c = Config::new("/m");
        c.listen_addr = ":8080".into();
        assert_eq!(
            c.listen_socket_addr().unwrap(),
            "0.0.0.0:8080".parse().unwrap()
        );
        c.listen_addr = "127.0.0.1:9000".into();
        assert_eq!(
            c.listen_socket_addr().unwrap(),
            "127.0.0.1:9000".parse().unwrap()
        );
        c.listen_addr = "[::1]:9000".into();
        assert!(c.listen_socket_addr().is_ok());
        c.listen_addr = "localhost".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn parses_flags_and_sizes() {
        let c =
            Config::try_parse_from(["x", "--mirror-dir", "/srv", "--max-request-body", "64MiB"])
                .unwrap();
        assert_eq!(c.max_request_body, ByteSize::mib(64));
        assert_eq!(c.mirror_dir, PathBuf::from("/srv"));
        let mut c = Config::new("/m");
        c.pack_threads = Some(0);
        assert!(c.validate().is_err());
        let mut c = Config::new("/m");
        c.auth_mode = AuthMode::Static;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "AUTH_MODE=static needs STATIC_TOKEN (or STATIC_TOKEN_FILE), or a GitHub App \
             (GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY_FILE, GITHUB_APP_INSTALLATION_ID)"
        );
        let c = Config::try_parse_from([
            "x",
            "--auth-mode",
            "pass-through",
            "--sync-stale-after",
            "5m",
        ])
        .unwrap();
        assert_eq!(c.auth_mode, AuthMode::PassThrough);
        assert_eq!(*c.sync_stale_after, Duration::from_secs(300));
        let mut c = Config::new("/m");
        c.pack_compression_level = 10;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "PACK_COMPRESSION_LEVEL must be 0 to 9, not 10"
        );
        let mut c = Config::new("/m");
        c.max_buffered_bodies = ByteSize::mib(1);
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "MAX_BUFFERED_BODIES must be at least MAX_REQUEST_BODY"
        );
        let mut c = Config::new("/m");
        c.max_buffered_bodies_per_client = Some(ByteSize::mib(1));
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "MAX_BUFFERED_BODIES_PER_CLIENT must be at least MAX_REQUEST_BODY"
        );
        c.max_buffered_bodies_per_client = Some(ByteSize::mib(64));
        c.client_stall_timeout = Duration::ZERO.into();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "CLIENT_STALL_TIMEOUT must be longer than 0s"
        );
    }

    #[test]
    fn sizes_need_a_unit() {
        assert_eq!(parse_size("64MiB"), Ok(ByteSize::mib(64)));
        assert_eq!(parse_size(" 10 GiB "), Ok(ByteSize::gib(10)));
        assert_eq!(parse_size("100B"), Ok(ByteSize::b(100)));
        assert_eq!(parse_size("0"), Ok(ByteSize::b(0)), "zero needs no unit");
        assert_eq!(parse_size("80"), Err(SizeError::NoUnit("80".into())));
        assert_eq!(parse_size("1.5"), Err(SizeError::NoUnit("1.5".into())));
        assert!(matches!(parse_size("lots"), Err(SizeError::Invalid(_))));
        let e = Config::try_parse_from(["x", "--snapshot-memory", "80"]).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("<SNAPSHOT_MEMORY>") && e.contains("size unit needed, for example 80MiB"),
            "{e}"
        );
    }

    #[test]
    fn settings_that_would_silently_misbehave_are_refused() {
        let mut c = Config::new("/m");
        c.allowed_upstreams = " ".into();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "ALLOWED_UPSTREAMS is empty: name at least one upstream host"
        );
        let mut c = Config::new("/m");
        for good in [
            "info",
            "DEBUG",
            "warn,smart_git_proxy=debug",
            "tower_http=off",
        ] {
            c.log_level = good.into();
            assert!(c.validate().is_ok(), "{good}");
        }
        for bad in ["verbose", "info,loud", "=debug", ""] {
            c.log_level = bad.into();
            assert!(
                c.validate()
                    .unwrap_err()
                    .to_string()
                    .starts_with("LOG_LEVEL"),
                "{bad}"
            );
        }
        let file = tempfile::NamedTempFile::new().unwrap();
        let c = Config::new(file.path());
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .ends_with("not a directory"));
        let mut c = Config::new("/m");
        c.listen_addr = "localhost:8080".into();
        assert_eq!(c.listen_socket_addr().unwrap().port(), 8080);
        let mut c = Config::new("/m");
        c.trusted_proxies = "10.0.0.0/8, lb.internal".into();
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "TRUSTED_PROXIES entry 'lb.internal' is not an IP address or a CIDR range (10.0.0.0/8)"
        );
        for bad in ["10.0.0.0/33", "proxy.internal", "10.0.0.1:80", "*"] {
            let e = parse_trusted_proxies(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    /// The defaults `docs/configuration.md` documents, as the command line gives them and as
    /// `Config::new` does.
    #[test]
    fn limits_have_the_documented_defaults() {
        let defaults = Config::try_parse_from(["x"]).unwrap();
        assert_eq!(
            defaults.mirror_dir,
            PathBuf::from("/var/tmp/smart-git-proxy"),
            "a directory any user can create"
        );
        let parsed = Config::try_parse_from(["x", "--mirror-dir", "/m"]).unwrap();
        for c in [parsed, Config::new("/m")] {
            assert_eq!(c.max_request_body, ByteSize::mib(64));
            assert_eq!(c.max_buffered_bodies, ByteSize::mib(256));
            assert_eq!(c.body_share(), ByteSize::mib(64), "MAX_REQUEST_BODY");
            assert_eq!(*c.client_stall_timeout, Duration::from_secs(60));
            assert_eq!(*c.header_read_timeout, Duration::from_secs(30));
            assert_eq!(*c.body_read_timeout, Duration::from_secs(60));
            assert_eq!(c.max_connections, 4096);
            assert_eq!(*c.queue_timeout, Duration::from_secs(60));
            assert_eq!(*c.compute_timeout, Duration::from_secs(300));
            assert_eq!(*c.request_timeout, Duration::from_secs(3600));
            assert_eq!(*c.shutdown_grace, Duration::from_secs(30));
            assert_eq!(*c.sync_wait, Duration::from_secs(5));
            assert_eq!(*c.want_miss_sync_interval, Duration::from_secs(2));
            assert_eq!(*c.failure_cache_ttl, Duration::from_secs(30));
            assert_eq!(c.syncs_per_host(), 3, "MAX_CONCURRENT_SYNCS - 1");
            assert_eq!(c.maintenance_pack_threshold, 16);
            assert_eq!(c.maintenance_bitmap_lag, DEFAULT_BITMAP_LAG);
            assert_eq!(*c.maintenance_grace, Duration::from_secs(14 * 24 * 3600));
            assert_eq!(c.snapshot_memory, ByteSize::mib(256));
        }
        let mut c = Config::new("/m");
        c.max_concurrent_syncs = 1;
        assert_eq!(c.syncs_per_host(), 1);
        c.max_concurrent_syncs_per_host = Some(9);
        assert_eq!(
            c.syncs_per_host(),
            1,
            "never more than MAX_CONCURRENT_SYNCS"
        );
    }
}
