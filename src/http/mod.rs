//! The HTTP front: the router and the state every handler shares. Each job has its file:
//! - `serve`: the accept loop (connection limits, drain on shutdown);
//! - `git`: the Git endpoints (`info/refs`, `git-upload-pack`), which resolve the
//!   repository, ensure its mirror and hand the request to [`crate::upload_pack`];
//! - `answer`: an upload-pack answer in flight (slots, time limits, its blocking thread);
//! - `error`: errors before upload-pack runs, and their answers;
//! - `auth`: which credentials travel upstream; `body`: request and response bodies;
//! - [`lfs`], `admin` (webhooks, warm-up), `inventory`, `health` (`/readyz`), [`forwarded`].
//!
//! Logging and metrics of error answers happen in one place, the request layer of
//! [`router`].

mod admin;
mod answer;
mod auth;
mod body;
mod error;
pub mod forwarded;
mod git;
mod health;
mod inventory;
pub mod lfs;
mod serve;

pub use admin::{github_notice, gitlab_notice, Notice};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::trace::TraceLayer;
use tracing::{field, Span};

use crate::config::{Config, Resolved};
use crate::mirror::{self, Mirrors};
use crate::pack::cache::PackCache;
use crate::upload_pack;
use crate::upstream::Upstreams;

pub use serve::serve;

/// Shared state of the server.
#[derive(Clone)]
pub struct AppState {
    config: Arc<Config>,
    pack_slots: Arc<Semaphore>,
    stream_slots: Arc<Semaphore>,
    compression: gix::zlib::Compression,
    upstreams: Arc<Upstreams>,
    /// `PARENT_PROXY`: where mirrors are fetched from instead of their upstreams.
    parent_proxy: Option<Arc<str>>,
    /// `BALANCER_URL`: where webhooks are forwarded to.
    balancer_url: Option<Arc<str>>,
    mirrors: Arc<Mirrors>,
    /// The client of LFS requests and forwarded webhooks.
    http_client: reqwest::Client,
    /// With a GitHub App, the static token's source.
    app_tokens: Option<Arc<crate::upstream::credentials::AppTokens>>,
    pack_cache: Option<PackCache>,
    /// The Git LFS object cache, unless `LFS_CACHE_MAX_SIZE=0`.
    lfs: Option<Arc<crate::lfs::Cache>>,
    /// Request-body memory (`MAX_BUFFERED_BODIES`, `MAX_BUFFERED_BODIES_PER_CLIENT`).
    body_budget: Arc<body::Budget>,
    /// Set once shutdown began: `/readyz` answers 503.
    draining: Arc<AtomicBool>,
    /// Set once `SHUTDOWN_GRACE` passed: answers that end now were cut off by the server.
    cut_off: Arc<AtomicBool>,
    /// Requests whose answer has not ended, for the shutdown log.
    requests: Arc<AtomicUsize>,
    /// Whose `X-Forwarded-For` names the client in the request log and for the body budget.
    trusted_proxies: Arc<forwarded::TrustedProxies>,
    /// Webhook deliveries acted on lately, by sender and id.
    deliveries: Arc<crate::ttl::TtlMap<[u8; 32], ()>>,
}

impl AppState {
    /// State for serving with `settings`.
    pub fn new(settings: Resolved) -> Self {
        crate::metrics::handle();
        let Resolved {
            config,
            upstreams,
            trusted_proxies,
            compression,
            prewarm_refs,
            parent_proxy,
            balancer_url,
            upstream,
            http_client,
            listing_client,
            listen_addr: _,
        } = settings;
        let slots = config.concurrent_packs();
        let lfs = open_lfs_cache(&config, upstream.tls.clone());
        let mirrors = Mirrors::new(mirror::Settings {
            root: config.mirror_dir.clone(),
            stale_after: *config.sync_stale_after,
            max_syncs: config.max_concurrent_syncs,
            max_syncs_per_host: config.syncs_per_host(),
            sync_wait: *config.sync_wait,
            want_miss_interval: *config.want_miss_sync_interval,
            failure_ttl: *config.failure_cache_ttl,
            maintenance_packs: config.maintenance_pack_threshold,
            maintenance_bitmap_lag: config.maintenance_bitmap_lag,
            maintenance_grace: *config.maintenance_grace,
            snapshot_memory: config.snapshot_memory.as_u64(),
            upstream,
            client: listing_client,
            access_ttl: *config.auth_cache_ttl,
            via_parent: parent_proxy.is_some(),
        });
        let pack_cache = open_pack_cache(&config);
        let pack_slots = Arc::new(Semaphore::new(slots));
        let prewarmer = crate::prewarm::Prewarmer::new(crate::prewarm::Settings {
            refs: prewarm_refs,
            cache: pack_cache.clone(),
            options: upload_pack::Options {
                pack_threads: config.pack_threads,
                compression,
            },
            pack_slots: Arc::clone(&pack_slots),
        });
        mirrors.on_sync(Arc::new(move |synced| prewarmer.synced(synced)));
        let streams = config.max_concurrent_streams;
        crate::pack::set_memory_budget(
            usize::try_from(config.pack_memory_budget.as_u64()).unwrap_or(usize::MAX),
        );
        let body_budget = body::Budget::new(
            config.max_buffered_bodies.as_u64(),
            config.body_share().as_u64(),
        );
        AppState {
            deliveries: Arc::new(crate::ttl::TtlMap::new(
                admin::DELIVERY_WINDOW,
                admin::MAX_DELIVERIES,
            )),
            trusted_proxies: Arc::new(forwarded::TrustedProxies::new(trusted_proxies)),
            draining: Arc::new(AtomicBool::new(false)),
            cut_off: Arc::new(AtomicBool::new(false)),
            requests: Arc::new(AtomicUsize::new(0)),
            body_budget,
            pack_cache,
            compression,
            upstreams: Arc::new(upstreams),
            parent_proxy: parent_proxy.map(Arc::from),
            balancer_url: balancer_url.map(Arc::from),
            mirrors: Arc::new(mirrors),
            app_tokens: config
                .github_app()
                .unwrap_or_else(|e| {
                    // Config::resolve read the key: one that became unreadable since leaves
                    // the proxy without a token, which the upstream refuses.
                    tracing::error!(error = %e, "GitHub App: no installation tokens");
                    None
                })
                .map(|app| {
                    Arc::new(crate::upstream::credentials::AppTokens::new(
                        app,
                        http_client.clone(),
                    ))
                }),
            http_client,
            lfs,
            config: Arc::new(config),
            pack_slots,
            stream_slots: Arc::new(Semaphore::new(streams)),
        }
    }

    /// The pack cache, when it is on.
    pub fn pack_cache(&self) -> Option<&PackCache> {
        self.pack_cache.as_ref()
    }

    /// The mirror store, e.g. to remove temporaries at start.
    pub fn mirrors(&self) -> &Arc<Mirrors> {
        &self.mirrors
    }

    /// Request-body memory in use, of `MAX_BUFFERED_BODIES`.
    pub fn buffered_body_bytes(&self) -> u64 {
        self.body_budget.used()
    }

    /// The body of the request with `parts`, to be charged to its client: the connection's
    /// address, or behind a trusted proxy the address it names.
    fn incoming(&self, parts: &axum::http::request::Parts, body: Body) -> body::Incoming {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.0.ip());
        let client = self.trusted_proxies.client(peer, &parts.headers);
        body::Incoming::new(body, &parts.headers, client.into())
    }
}

/// The pack cache, unless `PACK_CACHE_MAX_SIZE=0`. A cache that cannot be opened is logged
/// and left off: packs are then generated for every request.
fn open_pack_cache(config: &Config) -> Option<PackCache> {
    let max = config.pack_cache_max_size.as_u64();
    if max == 0 {
        return None;
    }
    let dir = config.pack_cache_dir();
    match PackCache::open(&dir, max) {
        Ok(cache) => Some(cache),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "pack cache off: cannot open it");
            None
        }
    }
}

/// The Git LFS object cache, unless `LFS_CACHE_MAX_SIZE=0`. A cache that cannot be opened is
/// logged and left off: Git LFS is then passed through.
fn open_lfs_cache(
    config: &Config,
    tls: crate::upstream::tls::ClientTls,
) -> Option<Arc<crate::lfs::Cache>> {
    let max = config.lfs_cache_max_size.as_u64();
    if max == 0 {
        return None;
    }
    let dir = config.lfs_cache_dir();
    let settings = crate::lfs::Settings {
        dir: dir.clone(),
        max_size: max,
        url_key: config
            .lfs_url_key
            .as_ref()
            .map(|k| k.expose().as_bytes().to_vec()),
        link_ttl: crate::lfs::LINK_TTL,
        connect_timeout: *config.upstream_connect_timeout,
        stall_timeout: *config.upstream_stall_timeout,
        tls,
    };
    match crate::lfs::Cache::open(settings) {
        Ok(cache) => Some(Arc::new(cache)),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "Git LFS cache off: cannot open it");
            None
        }
    }
}

/// The application: Git smart HTTP on every path, plus `/healthz`.
pub fn router(state: AppState) -> Router {
    let trusted = Arc::clone(&state.trusted_proxies);
    let requests = Arc::clone(&state.requests);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .merge(admin::routes())
        .route("/api/v1/mirrors", get(inventory::mirrors))
        .fallback(git::git)
        .layer(axum::middleware::from_fn(
            move |req: Request, next: axum::middleware::Next| {
                let counted = Counted::new(Arc::clone(&requests));
                async move {
                    let response = next.run(req).await;
                    response.map(|body| {
                        Body::new(CountedBody {
                            body,
                            _counted: counted,
                        })
                    })
                }
            },
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |req: &Request| {
                    // Behind a trusted load balancer, the address it says it served.
                    let client = req
                        .extensions()
                        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                        .map(|c| trusted.client(c.0.ip(), req.headers()).to_string())
                        .unwrap_or_default();
                    let agent = req
                        .headers()
                        .get(header::USER_AGENT)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        client = %client,
                        // Recorded as text: the log quotes and escapes it (the client's).
                        agent = agent,
                        repo = field::Empty,
                        command = field::Empty,
                    )
                })
                // Streamed answers log their line when they end (`answer`); every other answer
                // logs it here, errors included. 5xx are not logged again by tower_http.
                .on_response(
                    |res: &Response, latency: std::time::Duration, _span: &Span| {
                        if res.extensions().get::<Streamed>().is_some() {
                            return;
                        }
                        let proxy_status = res
                            .headers()
                            .get(git::PROXY_STATUS)
                            .and_then(|v| v.to_str().ok());
                        if let Some(failure) = res.extensions().get::<error::Failure>() {
                            return failure.record(res.status().as_u16(), proxy_status, latency);
                        }
                        let mut line = Line::new(res.status().as_u16(), proxy_status, latency);
                        if let Some(outcome) = res.extensions().get::<upload_pack::Outcome>() {
                            line = line.outcome(outcome);
                        }
                        if let Some(Refused(cause)) = res.extensions().get::<Refused>() {
                            line.outcome = Some("refused".into());
                            line.cause = Some(cause.clone());
                        }
                        line.log();
                    },
                )
                .on_failure(()),
        )
        .with_state(state)
}

/// Marks a response whose answer streams: its request line is logged when it ends.
#[derive(Clone, Copy)]
struct Streamed;

/// Mark `response` as streamed ([`Streamed`]).
fn streamed(mut response: Response) -> Response {
    response.extensions_mut().insert(Streamed);
    response
}

/// An answer that refused the request in the protocol (an `ERR` packet), with its cause.
#[derive(Clone)]
struct Refused(String);

/// The one log line of a request (the span adds method, path, client, agent, repo).
struct Line {
    status: u16,
    /// `X-Git-Proxy-Status`: clone, sync, hit or stale.
    proxy_status: Option<String>,
    /// What happened, e.g. `hit/refs`, `clone/pack`, `client-gone`, `upstream`.
    outcome: Option<String>,
    objects: Option<u64>,
    bytes: Option<u64>,
    refs: Option<u64>,
    duration: std::time::Duration,
    cause: Option<String>,
    level: tracing::Level,
}

impl Line {
    fn new(status: u16, proxy_status: Option<&str>, duration: std::time::Duration) -> Self {
        Line {
            status,
            proxy_status: proxy_status.map(str::to_owned),
            outcome: None,
            objects: None,
            bytes: None,
            refs: None,
            duration,
            cause: None,
            level: tracing::Level::INFO,
        }
    }

    /// The line of an answer that produced `outcome`: `<proxy status>/<kind>` and its figures.
    fn outcome(mut self, outcome: &upload_pack::Outcome) -> Self {
        self.outcome = Some(match &self.proxy_status {
            Some(status) => format!("{status}/{}", outcome.kind()),
            None => outcome.kind().to_owned(),
        });
        match *outcome {
            upload_pack::Outcome::Pack { objects, bytes } => {
                self.objects = Some(objects as u64);
                self.bytes = Some(bytes);
            }
            upload_pack::Outcome::Refs(refs) => self.refs = Some(refs as u64),
            upload_pack::Outcome::Empty
            | upload_pack::Outcome::Capabilities
            | upload_pack::Outcome::Acks { .. } => {}
        }
        self
    }

    /// The line of a request that ended as `outcome` because of `cause`, at `level`.
    fn failed(mut self, outcome: &str, cause: String, level: tracing::Level) -> Self {
        self.outcome = Some(outcome.to_owned());
        self.cause = Some(cause);
        self.level = level;
        self
    }

    fn log(&self) {
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    status = self.status,
                    proxy_status = self.proxy_status.as_deref(),
                    outcome = self.outcome.as_deref(),
                    objects = self.objects,
                    bytes = self.bytes,
                    refs = self.refs,
                    duration_ms = self.duration.as_millis() as u64,
                    cause = self.cause.as_deref(),
                    "answered"
                )
            };
        }
        match self.level {
            tracing::Level::ERROR => line!(tracing::Level::ERROR),
            tracing::Level::WARN => line!(tracing::Level::WARN),
            _ => line!(tracing::Level::INFO),
        }
    }
}

/// A request counted in [`AppState::requests`] until its answer ends or is dropped.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(requests: Arc<AtomicUsize>) -> Self {
        requests.fetch_add(1, Ordering::Relaxed);
        Counted(requests)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An answer's body that keeps its request counted while it streams.
struct CountedBody {
    body: Body,
    _counted: Counted,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
