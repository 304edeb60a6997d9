//! The HTTP front: the axum router, request bodies (gzip, size limit), and the mapping of
//! errors to responses. It resolves the repository, parses the request and runs
//! [`upload_pack`](crate::upload_pack) on a blocking thread whose output streams back through
//! a bounded channel.

mod admin;
mod auth;
mod body;
pub mod forwarded;
mod inventory;
pub mod lfs;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::trace::TraceLayer;
use tracing::{field, Instrument, Span};

use crate::config::{AuthMode, Config};
use crate::mirror::{self, Freshness, Mirrors, Status, Upstream, Upstreams};
use crate::pack::cache::PackCache;
use crate::protocol::{pktline, v0, v2, ParseError};
use crate::repo::{self, ResolveError, Service, Snapshot, Target};
use crate::upload_pack::{self, Version};

use body::{ChannelWriter, ResponseStream};

/// Shared state of the server.
#[derive(Clone)]
pub struct AppState {
    config: Arc<Config>,
    pack_slots: Arc<Semaphore>,
    stream_slots: Arc<Semaphore>,
    compression: gix::zlib::Compression,
    upstreams: Arc<Upstreams>,
    mirrors: Arc<Mirrors>,
    lfs_client: reqwest::Client,
    /// With a GitHub App, the static token's source.
    app_tokens: Option<Arc<crate::credentials::AppTokens>>,
    pack_cache: Option<PackCache>,
    /// Request-body memory (`MAX_BUFFERED_BODIES`, `MAX_BUFFERED_BODIES_PER_CLIENT`).
    body_budget: Arc<body::Budget>,
    /// Set once shutdown began: `/readyz` answers 503.
    draining: Arc<AtomicBool>,
    /// Whose `X-Forwarded-For` names the client in the request log and for the body budget.
    trusted_proxies: Arc<forwarded::TrustedProxies>,
    /// Webhook deliveries acted on lately, by sender and id.
    deliveries: Arc<crate::ttl::TtlMap<[u8; 32], ()>>,
}

impl AppState {
    /// State for serving with `config`, which must have passed [`Config::validate`].
    pub fn new(config: Config) -> Self {
        crate::metrics::handle();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let slots = config.max_concurrent_packs.unwrap_or(cores * 2);
        let upstream = upstream_options(&config);
        let upstream_client = upstream
            .tls
            .client(reqwest::Client::builder())
            .connect_timeout(*config.upstream_connect_timeout)
            .read_timeout(*config.upstream_stall_timeout)
            .user_agent(crate::protocol::AGENT)
            .build()
            .unwrap_or_default();
        // Ref listings follow redirects only within the allowed upstreams (and the parent).
        let origins: Vec<String> = config
            .upstreams()
            .unwrap_or_default()
            .base_urls()
            .map(str::to_owned)
            .chain(config.parent_proxy().map(|p| p.to_string()))
            .collect();
        // Fails only when the TLS backend cannot start, as every HTTP client would.
        let listing_client = crate::upstream::ListingClient::new(&upstream, &origins)
            .expect("the TLS backend initialises");
        let mirrors = Mirrors::new(mirror::Settings {
            root: config.mirror_dir.clone(),
            stale_after: *config.sync_stale_after,
            max_syncs: config.max_concurrent_syncs,
            max_syncs_per_host: config.syncs_per_host(),
            sync_wait: *config.sync_wait,
            want_miss_interval: *config.want_miss_sync_interval,
            failure_ttl: *config.failure_cache_ttl,
            maintenance_packs: config.maintenance_pack_threshold,
            maintenance_grace: *config.maintenance_grace,
            snapshot_memory: config.snapshot_memory.as_u64(),
            upstream,
            client: listing_client,
            access_ttl: *config.auth_cache_ttl,
            via_parent: config.parent_proxy().is_some(),
        });
        let pack_cache = open_pack_cache(&config);
        let pack_slots = Arc::new(Semaphore::new(slots));
        let compression = config.compression().unwrap_or_default();
        let prewarmer = crate::prewarm::Prewarmer::new(crate::prewarm::Settings {
            refs: config.prewarm_refs().unwrap_or_default(),
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
            trusted_proxies: Arc::new(config.trusted_proxies().unwrap_or_default()),
            draining: Arc::new(AtomicBool::new(false)),
            body_budget,
            pack_cache,
            compression,
            upstreams: Arc::new(config.upstreams().unwrap_or_default()),
            mirrors: Arc::new(mirrors),
            app_tokens: config
                .github_app()
                .unwrap_or_else(|e| {
                    // Config::validate read the key: one that became unreadable since leaves
                    // the proxy without a token, which the upstream refuses.
                    tracing::error!(error = %e, "GitHub App: no installation tokens");
                    None
                })
                .map(|app| {
                    Arc::new(crate::credentials::AppTokens::new(
                        app,
                        upstream_client.clone(),
                    ))
                }),
            lfs_client: upstream_client,
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

fn upstream_options(config: &Config) -> crate::upstream::Options {
    crate::upstream::Options {
        connect_timeout: *config.upstream_connect_timeout,
        stall_timeout: *config.upstream_stall_timeout,
        // Config::validate read UPSTREAM_CA_FILE: one deleted since leaves the system's roots,
        // which refuse the private CA rather than trusting anything more.
        tls: config.upstream_tls().unwrap_or_else(|e| {
            tracing::error!(error = %e, "upstream TLS: using the system's roots only");
            crate::tls::ClientTls::system()
        }),
    }
}

/// The application: Git smart HTTP on every path, plus `/healthz`.
pub fn router(state: AppState) -> Router {
    let trusted = Arc::clone(&state.trusted_proxies);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .merge(admin::routes())
        .route("/api/v1/mirrors", get(inventory::mirrors))
        .fallback(git)
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
                        outcome = field::Empty,
                    )
                })
                // One line per request when its answer starts; upload-pack answers log
                // another when they end ("served", with objects and bytes).
                .on_response(
                    |res: &Response, latency: std::time::Duration, _span: &Span| {
                        tracing::info!(
                            status = res.status().as_u16(),
                            latency_ms = latency.as_millis() as u64,
                            "answered"
                        )
                    },
                ),
        )
        .with_state(state)
}

/// Readiness: 200 when the server takes work and `MIRROR_DIR` is writable (a probe file is
/// created and removed) with room to spare (the pack cache's floor: 256 MiB free, or a tenth
/// of a smaller filesystem), 503 with the reason otherwise.
async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    if state.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
    }
    let dir = state.config.mirror_dir.clone();
    if let Ok(true) =
        tokio::task::spawn_blocking(move || crate::pack::cache::low_on_space(&dir)).await
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "MIRROR_DIR is nearly full (under 256 MiB, or a tenth of its filesystem, free)\n"
                .into(),
        );
    }
    // One file per probe: overlapping probes (a kubelet's and a balancer's) must not remove
    // each other's.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let probe = state.config.mirror_dir.join(format!(
        ".readyz-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    ));
    let written = tokio::task::spawn_blocking(move || {
        std::fs::write(&probe, b"").and_then(|()| std::fs::remove_file(&probe))
    })
    .await;
    match written {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("MIRROR_DIR is not writable: {e}\n"),
        ),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    }
}

/// Serve `router(state)` on `listener` until `shutdown` completes, then let the open
/// connections finish, for at most `SHUTDOWN_GRACE`.
///
/// HTTP/1 connections are served by hyper directly, not `axum::serve`, for the limits a
/// hostile client must meet: `HEADER_READ_TIMEOUT` (which also closes idle keep-alive
/// connections), `CLIENT_STALL_TIMEOUT` (a connection that takes no byte of its answer that
/// long is closed) and `MAX_CONNECTIONS`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = Arc::clone(&state.config);
    let draining = Arc::clone(&state.draining);
    let app = router(state);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(*config.header_read_timeout);
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: let connections close before the next try.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            // Shed: a short answer, not a wait, so that the client retries elsewhere or later.
            crate::metrics::refusal("connections");
            let _ = stream.try_write(SHED_RESPONSE);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // Requests carry their client's address, for the request log line.
        let peer = stream.peer_addr().ok();
        let service = hyper_util::service::TowerToHyperService::new(
            tower::ServiceExt::map_request(app.clone(), move |mut req: Request<_>| {
                if let Some(peer) = peer {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                }
                req
            }),
        );
        // Progress resets the timer: a slow reader is served, a client that reads nothing is
        // cut off, whatever it holds (a stream slot, the connection).
        let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
        stream.set_write_timeout(Some(*config.client_stall_timeout));
        let io = hyper_util::rt::TokioIo::new(Box::pin(stream));
        let connection = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    draining.store(true, Ordering::Relaxed);
    drop(listener);
    if tokio::time::timeout(*config.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after SHUTDOWN_GRACE are cut off");
    }
    Ok(())
}

/// The answer to a connection over `MAX_CONNECTIONS`.
const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
Content-Type: text/plain\r\nContent-Length: 42\r\nConnection: close\r\n\r\n\
server busy (too many connections); retry\n";

/// Everything that ends a request before upload-pack runs.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error("repository '{0}' not found")]
    NotFound(String),
    #[error("smart-git-proxy is a read-only mirror: push to the upstream repository directly")]
    ReceivePack,
    #[error(
        "only the smart HTTP protocol is supported: request info/refs?service=git-upload-pack"
    )]
    DumbHttp,
    #[error("method {0} is not allowed here")]
    Method(Method),
    #[error("request body larger than {0}")]
    TooLarge(bytesize::ByteSize),
    #[error("{0}")]
    Expands(body::ReadError),
    #[error("{0}")]
    Encoding(body::ReadError),
    #[error("cannot read request body: {0}")]
    Body(String),
    #[error("malformed request: {0}")]
    Malformed(ParseError),
    #[error("server is shutting down")]
    Unavailable,
    #[error("server busy ({0}); retry later")]
    Busy(&'static str),
    #[error("too many request bodies in memory from this client; retry later")]
    ClientBusy,
    #[error("request body not received within BODY_READ_TIMEOUT")]
    BodyTimeout,
    #[error("upstream host '{host}' is not allowed; allowed: {allowed}")]
    HostNotAllowed { host: String, allowed: String },
    #[error("authentication required: the upstream did not accept the credentials for {0}")]
    AuthRequired(String),
    /// The upstream failed (or the disk, while mirroring): the client is told `message`, in
    /// a few words; the log gets `detail`, with the URLs, paths and cause chain.
    #[error("{message}")]
    BadGateway {
        status: StatusCode,
        message: String,
        detail: String,
    },
    #[error("internal server error (see the proxy's log)")]
    Internal(String),
}

impl Error {
    /// Whether the client is at fault (a 4xx), as opposed to us or the upstream.
    fn is_client_error(&self) -> bool {
        !matches!(
            self,
            Error::Unavailable | Error::Busy(_) | Error::BadGateway { .. } | Error::Internal(_)
        )
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = match &self {
            Error::Resolve(ResolveError::UnknownEndpoint(_)) | Error::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Error::Resolve(ResolveError::InvalidPath { .. })
            | Error::Body(_)
            | Error::Malformed(_) => StatusCode::BAD_REQUEST,
            Error::ReceivePack | Error::DumbHttp => StatusCode::FORBIDDEN,
            Error::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::TooLarge(_) | Error::Expands(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Encoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unavailable | Error::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::ClientBusy => StatusCode::TOO_MANY_REQUESTS,
            Error::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::HostNotAllowed { .. } => StatusCode::FORBIDDEN,
            Error::AuthRequired(_) => StatusCode::UNAUTHORIZED,
            Error::BadGateway { status, .. } => *status,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        self.log();
        Span::current().record("outcome", field::display(status.as_u16()));
        crate::metrics::refusal(self.reason());
        // git shows a text/plain body of a failed request as `remote: <line>`.
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{self}\n"),
        )
            .into_response();
        if let Error::Busy(_) | Error::ClientBusy = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            // Without a challenge git does not ask for credentials.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"smart-git-proxy\""),
            );
        }
        response
    }
}

impl Error {
    /// The metrics label of the refusal.
    fn reason(&self) -> &'static str {
        match self {
            Error::Resolve(ResolveError::UnknownEndpoint(_)) => "unknown-endpoint",
            Error::Resolve(ResolveError::InvalidPath { .. }) => "invalid-path",
            Error::NotFound(_) => "not-found",
            Error::ReceivePack => "push",
            Error::DumbHttp => "dumb-http",
            Error::Method(_) => "method",
            Error::TooLarge(_) | Error::Expands(_) => "body-too-large",
            Error::Encoding(_) => "body-encoding",
            Error::Body(_) => "body-unreadable",
            Error::Malformed(_) => "malformed",
            Error::Unavailable => "shutting-down",
            Error::Busy(_) | Error::ClientBusy => "busy",
            Error::BodyTimeout => "body-timeout",
            Error::HostNotAllowed { .. } => "host-not-allowed",
            Error::AuthRequired(_) => "auth-required",
            Error::BadGateway { .. } => "upstream",
            Error::Internal(_) => "internal",
        }
    }

    /// The error for a body that could not be read under `limit`.
    fn from_read(e: body::ReadError, limit: bytesize::ByteSize) -> Self {
        match e {
            body::ReadError::TooLarge => Error::TooLarge(limit),
            e @ body::ReadError::Expands => Error::Expands(e),
            e @ body::ReadError::Encoding(_) => Error::Encoding(e),
            body::ReadError::Body(msg) => Error::Body(msg),
            body::ReadError::Busy => Error::Busy("request bodies use their whole memory budget"),
            body::ReadError::ClientShare => Error::ClientBusy,
            body::ReadError::TimedOut => Error::BodyTimeout,
        }
    }

    /// Log what the client is not told: the details of a 5xx.
    fn log(&self) {
        match self {
            Error::BadGateway { detail, .. } => tracing::warn!(error = %detail, "upstream failed"),
            Error::Internal(detail) => tracing::error!(error = %detail, "internal error"),
            _ => {}
        }
    }

    /// An upstream failure: `what` failed because of `source`.
    fn upstream(what: String, source: &crate::upstream::Error) -> Self {
        Error::BadGateway {
            status: match source {
                crate::upstream::Error::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
                _ => StatusCode::BAD_GATEWAY,
            },
            message: format!("{what}: {}", source.cause()),
            detail: format!("{what}: {source}"),
        }
    }
}

impl From<mirror::Error> for Error {
    fn from(e: mirror::Error) -> Self {
        match e {
            mirror::Error::AuthRequired(name) => Error::AuthRequired(name),
            mirror::Error::NotFound(name) => Error::NotFound(name),
            mirror::Error::Upstream { name, source } => {
                Error::upstream(format!("cannot mirror {name}"), &source)
            }
            e @ mirror::Error::Local { .. } => Error::Internal(e.to_string()),
        }
    }
}

/// Where the mirrors of `upstream` are fetched from: the upstream itself, or with
/// `PARENT_PROXY` the parent proxy, which serves them under the same `{host}/{path}` names.
fn fetch_source(config: &Config, upstream: &Upstream) -> Upstream {
    match config.parent_proxy() {
        Some(parent) => Upstream {
            segment: upstream.segment.clone(),
            base_url: format!("{parent}/{}", upstream.segment),
        },
        None => upstream.clone(),
    }
}

/// What may reach `source` when fetching a mirror: nothing, the static token (`STATIC_TOKEN`
/// or the GitHub App's; only where it may go: judged on the URL it would travel to, a parent
/// proxy's included), or the client's own credentials (pass-through, which a parent proxy
/// passes on in turn). Fails only when the GitHub App has no valid token.
async fn upstream_credentials(
    state: &AppState,
    source: &Upstream,
    client_authorization: Option<&str>,
) -> Result<mirror::Credentials, crate::credentials::Error> {
    let config = &state.config;
    Ok(match config.auth_mode {
        AuthMode::None => mirror::Credentials::None,
        AuthMode::Static if !config.lends_static_token_to(source) => mirror::Credentials::None,
        AuthMode::Static => {
            let token = match &state.app_tokens {
                Some(app) => Some(app.token().await?),
                None => config.static_token.clone(),
            };
            token.map_or(mirror::Credentials::None, |t| {
                mirror::Credentials::Proxy(auth::static_token_header(t.expose()).as_str().into())
            })
        }
        AuthMode::PassThrough => {
            mirror::Credentials::Client(client_authorization.map(crate::config::Secret::from))
        }
    })
}

/// A resolved request for a mirrored repository.
struct Mirrored {
    target: Target,
    /// The upstream repository URL.
    url: String,
    /// What may reach the upstream, and who is served.
    credentials: mirror::Credentials,
    /// The client's own `Authorization` header.
    client_authorization: Option<String>,
    /// The client asked for a listing checked against the upstream (`Cache-Control:
    /// no-cache`, as a child proxy does for a want-miss or a push).
    revalidate: bool,
    /// Keeps the mirror from eviction until the answer has been sent.
    lease: mirror::Lease,
}

impl Mirrored {
    fn request(&self) -> mirror::Request {
        mirror::Request {
            name: self.target.name.clone(),
            dir: self.target.dir.clone(),
            url: self.url.clone(),
            credentials: self.credentials.clone(),
        }
    }
}

async fn git(State(state): State<AppState>, req: Request) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();
    let target = repo::resolve(&state.config.mirror_dir, parts.uri.path())?;
    let span = Span::current();
    span.record("repo", field::display(&target.name));
    let (host, path) = target.name.split_once('/').unwrap_or((&target.name, ""));
    let upstream = state
        .upstreams
        .get(host)
        .ok_or_else(|| Error::HostNotAllowed {
            host: host.to_owned(),
            allowed: state.upstreams.names(),
        })?;
    let client_authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let source = fetch_source(&state.config, upstream);
    let credentials = upstream_credentials(&state, &source, client_authorization.as_deref())
        .await
        .map_err(|e| Error::BadGateway {
            status: StatusCode::BAD_GATEWAY,
            message: "the proxy has no upstream token (see its log)".into(),
            detail: e.to_string(),
        })?;
    // A child proxy's want-miss or push-driven sync: check our upstream too (`ls-refs`).
    let revalidate = parts
        .headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
        });
    let mirrored = Mirrored {
        lease: state.mirrors.lease(&target.dir),
        url: format!("{}/{path}.git", source.base_url),
        target,
        credentials,
        client_authorization,
        revalidate,
    };
    let version = Version::from_header(
        parts
            .headers
            .get("git-protocol")
            .and_then(|v| v.to_str().ok()),
    );
    let command = match &mirrored.target.service {
        Service::InfoRefs => "info-refs",
        Service::UploadPack | Service::ReceivePack => "upload-pack",
        Service::Lfs(_) => "lfs",
    };
    let started = std::time::Instant::now();
    crate::metrics::in_flight(1.0);
    let result = route(&state, &parts, mirrored, version, body).await;
    crate::metrics::in_flight(-1.0);
    crate::metrics::answered(command, started.elapsed());
    match &result {
        Ok(_) if command != "upload-pack" => crate::metrics::request(command, "ok"),
        // Upload-pack outcomes are counted when the streamed answer ends.
        Ok(_) => {}
        Err(e) if e.is_client_error() => crate::metrics::request(command, "refused"),
        Err(_) => crate::metrics::request(command, "error"),
    }
    result
}

async fn route(
    state: &AppState,
    parts: &axum::http::request::Parts,
    mirrored: Mirrored,
    version: Version,
    body: Body,
) -> Result<Response, Error> {
    let span = Span::current();
    match (&parts.method, &mirrored.target.service) {
        (&Method::GET, Service::InfoRefs) => {
            let service = parts
                .uri
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|kv| kv.strip_prefix("service="));
            match service {
                Some("git-upload-pack") => info_refs(state, mirrored, version).await,
                Some("git-receive-pack") => Err(Error::ReceivePack),
                _ => Err(Error::DumbHttp),
            }
        }
        (&Method::POST, Service::UploadPack) => {
            let incoming = state.incoming(parts, body);
            upload_pack(state.clone(), mirrored, version, incoming).await
        }
        (&Method::POST, Service::ReceivePack) => Err(Error::ReceivePack),
        (method, Service::Lfs(lfs_path)) => {
            span.record("command", "lfs");
            let url = lfs::upstream_url(&mirrored.url, lfs_path, &parts.uri);
            // The client's own credentials go through as they are. The proxy's static token is
            // only lent for downloads: it must not let anonymous clients write upstream.
            // Bodies go upstream as they came, gzip included, except a batch request read to
            // decide on lending the token, which goes decoded.
            let mut headers = std::borrow::Cow::Borrowed(&parts.headers);
            let (body, authorization) = match mirrored.client_authorization.as_deref() {
                Some(client) => (body, Some(client.to_owned())),
                None if matches!(mirrored.credentials, mirror::Credentials::Proxy(_)) => {
                    let (body, download) = lfs::is_download(
                        method,
                        lfs_path,
                        state.incoming(parts, body),
                        &state.body_budget,
                        *state.config.body_read_timeout,
                    )
                    .await
                    .map_err(|e| Error::from_read(e, bytesize::ByteSize::mib(1)))?;
                    if let lfs::Checked::Decoded(_) = body {
                        headers.to_mut().remove(header::CONTENT_ENCODING);
                    }
                    let token = match &mirrored.credentials {
                        mirror::Credentials::Proxy(token) if download => {
                            Some(token.expose().to_owned())
                        }
                        _ => None,
                    };
                    (body.into_body(), token)
                }
                None => (body, None),
            };
            let response = lfs::forward(
                &state.lfs_client,
                &url,
                method.clone(),
                &headers,
                authorization.as_deref(),
                body,
            )
            .await
            .map_err(|e| Error::upstream("LFS request to the upstream failed".into(), &e))?;
            span.record("outcome", field::display(response.status().as_u16()));
            Ok(response)
        }
        (method, _) => Err(Error::Method(method.clone())),
    }
}

fn with_status(mut response: Response, status: Status) -> Response {
    crate::metrics::served(status.as_str());
    response.headers_mut().insert(
        "x-git-proxy-status",
        HeaderValue::from_static(status.as_str()),
    );
    response
}

async fn info_refs(state: &AppState, m: Mirrored, version: Version) -> Result<Response, Error> {
    Span::current().record("command", "info/refs");
    let status = state
        .mirrors
        .ensure(&m.request(), Freshness::IfStale)
        .await?;
    let snapshot = snapshot(state, &m).await?;
    state.mirrors.served(&m.target.dir);
    let (chunks, outcome) = upload_pack::advertise(&snapshot, version);
    Span::current().record("outcome", field::debug(outcome));
    let body = Body::from_stream(futures_util::stream::iter(
        chunks.into_iter().map(Ok::<_, std::convert::Infallible>),
    ));
    Ok(with_status(
        (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-git-upload-pack-advertisement"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            body,
        )
            .into_response(),
        status,
    ))
}

/// The mirror's current snapshot; 404 when there is no mirror.
async fn snapshot(state: &AppState, m: &Mirrored) -> Result<Arc<Snapshot>, Error> {
    state
        .mirrors
        .snapshot(&m.target.dir)
        .await?
        .ok_or_else(|| Error::NotFound(m.target.name.clone()))
}

/// Either protocol's parsed request.
enum Parsed {
    V0(v0::Request),
    V2(v2::Request),
}

impl Parsed {
    /// The command, for spans and metrics.
    fn command(&self) -> &'static str {
        match self {
            Parsed::V0(_) => "upload-pack",
            Parsed::V2(r) => match r.command {
                v2::Command::LsRefs(_) => "ls-refs",
                v2::Command::Fetch(_) => "fetch",
            },
        }
    }
}

async fn upload_pack(
    state: AppState,
    m: Mirrored,
    version: Version,
    body: body::Incoming,
) -> Result<Response, Error> {
    let span = Span::current();
    let arrived = std::time::Instant::now();
    let limit = state.config.max_request_body;
    let (bytes, budget) = body::read_limited(
        body,
        limit.as_u64(),
        &state.body_budget,
        *state.config.body_read_timeout,
    )
    .await
    .map_err(|e| Error::from_read(e, limit))?;
    let parsed = match version {
        Version::V2 => v2::parse(&bytes).map(|r| r.map(Parsed::V2)),
        Version::V0 | Version::V1 => v0::parse(&bytes).map(|r| r.map(Parsed::V0)),
    };
    // The parsed request is what stays; the body's memory goes back to the budget.
    drop((bytes, budget));
    let parsed = match parsed {
        Ok(Some(p)) => p,
        Ok(None) => {
            span.record("outcome", "empty");
            return Ok(pack_response(Body::empty()));
        }
        Err(e) if e.is_malformed() => return Err(Error::Malformed(e)),
        Err(e) => {
            span.record("outcome", field::display(&e));
            let mut out = Vec::new();
            pktline::err(&mut out, &e.to_string());
            return Ok(pack_response(Body::from(out)));
        }
    };
    span.record("command", parsed.command());
    let is_ls_refs = matches!(
        &parsed,
        Parsed::V2(v2::Request {
            command: v2::Command::LsRefs(_),
            ..
        })
    );
    // The mirror is ensured (or, existing, its client authorized) before anything else this
    // request can trigger: a client refused on a private mirror costs no sync and no want-miss,
    // and learns nothing from its wants, whatever the protocol.
    let mut status = if is_ls_refs {
        // A listing is checked for freshness as info/refs is: a child proxy (PARENT_PROXY)
        // lists refs with this request alone.
        let freshness = if m.revalidate {
            Freshness::SyncedAfter(arrived)
        } else {
            Freshness::IfStale
        };
        state.mirrors.ensure(&m.request(), freshness).await?
    } else if repo::exists(&m.target.dir) {
        state.mirrors.authorize(&m.request()).await?;
        Status::Hit
    } else {
        state
            .mirrors
            .ensure(&m.request(), Freshness::IfStale)
            .await?
    };
    let mut snapshot = snapshot(&state, &m).await?;
    if let Parsed::V2(v2::Request {
        command: v2::Command::LsRefs(args),
        ..
    }) = &parsed
    {
        state.mirrors.served(&m.target.dir);
        let (answer, outcome) = upload_pack::ls_refs(&snapshot, args);
        span.record("outcome", field::debug(outcome));
        crate::metrics::request("ls-refs", "ok");
        return Ok(with_status(pack_response(Body::from(answer)), status));
    }
    // A want-miss: the client knows objects the mirror does not have yet (a push after our last
    // sync, or a SHA it was given out of band). Sync, then serve what we have; the sync checks
    // the client again afterwards, as it may have found the upstream private.
    if want_miss(&snapshot, &parsed).await? {
        if let Some(preamble) = progress_preamble(&parsed) {
            // The client may wait a while: answer now and show progress during the sync.
            return Ok(sync_with_progress(
                state, m, parsed, preamble, arrived, span,
            ));
        }
        status = state
            .mirrors
            .ensure(&m.request(), Freshness::SyncedAfter(arrived))
            .await?;
        snapshot = self::snapshot(&state, &m).await?;
    }
    let slots = Slots::acquire(&state).await?;
    state.mirrors.served(&m.target.dir);
    let interrupt = Arc::new(AtomicBool::new(false));
    let (stream, tx) = ResponseStream::new(Arc::clone(&interrupt));
    let name = m.target.name.clone();
    let held = Held {
        slots,
        _lease: m.lease,
    };
    start_pack(
        &state, snapshot, name, parsed, tx, interrupt, held, false, span,
    );
    Ok(with_status(
        pack_response(Body::from_stream(stream)),
        status,
    ))
}

/// Whether the request wants objects or refs the mirror does not have.
async fn want_miss(snapshot: &Arc<Snapshot>, parsed: &Parsed) -> Result<bool, Error> {
    let (wants, want_refs): (&[gix::ObjectId], &[gix::bstr::BString]) = match parsed {
        Parsed::V0(r) => (&r.wants, &[]),
        Parsed::V2(r) => match &r.command {
            v2::Command::Fetch(f) => (&f.wants, &f.want_refs),
            v2::Command::LsRefs(_) => (&[], &[]),
        },
    };
    if want_refs
        .iter()
        .any(|name| snapshot.find_ref(name).is_none())
    {
        return Ok(true);
    }
    let unknown: Vec<gix::ObjectId> = wants
        .iter()
        .filter(|w| !snapshot.is_tip(w))
        .copied()
        .collect();
    if unknown.is_empty() {
        return Ok(false);
    }
    let snapshot = Arc::clone(snapshot);
    tokio::task::spawn_blocking(move || {
        let repo = snapshot.repo();
        unknown.iter().any(|w| !repo.has_object(w))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))
}

/// The answer's start, when it may be sent before the mirror is synced (see
/// [`upload_pack::early_preamble_v2`]).
fn progress_preamble(parsed: &Parsed) -> Option<Vec<u8>> {
    match parsed {
        Parsed::V2(r) => match &r.command {
            v2::Command::Fetch(f) => upload_pack::early_preamble_v2(f),
            v2::Command::LsRefs(_) => None,
        },
        Parsed::V0(r) => upload_pack::early_preamble_v0(r),
    }
}

/// Answer a want-miss request at once: its `preamble`, progress on band 2 while the mirror
/// syncs, then the pack. A failed sync ends the answer with a band-3 message.
fn sync_with_progress(
    state: AppState,
    m: Mirrored,
    parsed: Parsed,
    preamble: Vec<u8>,
    arrived: std::time::Instant,
    span: Span,
) -> Response {
    let interrupt = Arc::new(AtomicBool::new(false));
    let (stream, tx) = ResponseStream::new(Arc::clone(&interrupt));
    let task = async move {
        let send = |bytes: Vec<u8>| tx.send(Ok(bytes.into()));
        if send(preamble).await.is_err() {
            return;
        }
        let started = std::time::Instant::now();
        let name = m.target.name.clone();
        let request = m.request();
        let sync = state
            .mirrors
            .ensure(&request, Freshness::SyncedAfter(arrived));
        tokio::pin!(sync);
        let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
        let result = loop {
            tokio::select! {
                result = &mut sync => break result,
                _ = ticks.tick() => {
                    let line = format!("mirroring {name}: fetching from upstream ({}s)\r", started.elapsed().as_secs());
                    if send(band(2, &line)).await.is_err() {
                        return;
                    }
                }
            }
        };
        // Any failure from here on ends the answer with a band-3 message git prints.
        let ready = async {
            let status = result?;
            let line = match status {
                Status::Stale => {
                    format!("mirroring {name}: upstream unavailable, serving the mirror as it is\n")
                }
                _ => format!(
                    "mirroring {name}: done in {}s.\n",
                    started.elapsed().as_secs()
                ),
            };
            Ok::<_, Error>((line, snapshot(&state, &m).await?))
        };
        let snapshot = match ready.await {
            Ok((line, snapshot)) => {
                if send(band(2, &line)).await.is_err() {
                    return;
                }
                snapshot
            }
            Err(e) => {
                e.log();
                let mut end = band(3, &format!("{e}\n"));
                pktline::flush(&mut end);
                let _ = send(end).await;
                return;
            }
        };
        let slots = match Slots::acquire(&state).await {
            Ok(slots) => slots,
            Err(e) => {
                // The preamble went out: say why the pack does not follow.
                let mut end = band(3, &format!("{e}\n"));
                pktline::flush(&mut end);
                let _ = send(end).await;
                return;
            }
        };
        state.mirrors.served(&m.target.dir);
        let name = m.target.name.clone();
        let held = Held {
            slots,
            _lease: m.lease,
        };
        start_pack(
            &state, snapshot, name, parsed, tx, interrupt, held, true, span,
        );
    };
    tokio::spawn(task.in_current_span());
    with_status(pack_response(Body::from_stream(stream)), Status::Sync)
}

/// How often progress is reported while a client waits for a sync.
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

fn band(band: u8, text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in text.as_bytes().chunks(crate::protocol::SMALL_BAND_PAYLOAD) {
        pktline::band(&mut out, band, chunk);
    }
    out
}

/// What an upload-pack answer holds while it runs: a stream slot for its thread, for as long as
/// it streams (`MAX_CONCURRENT_STREAMS`), and a pack slot while it generates a pack
/// (`MAX_CONCURRENT_PACKS`), which an answer read from the pack cache gives back early.
struct Slots {
    stream: tokio::sync::OwnedSemaphorePermit,
    pack: tokio::sync::OwnedSemaphorePermit,
}

impl Slots {
    /// Both slots, waiting at most `QUEUE_TIMEOUT` for them.
    async fn acquire(state: &AppState) -> Result<Slots, Error> {
        let wait = async {
            let stream = Arc::clone(&state.stream_slots).acquire_owned().await;
            let pack = Arc::clone(&state.pack_slots).acquire_owned().await;
            match (stream, pack) {
                (Ok(stream), Ok(pack)) => Ok(Slots { stream, pack }),
                _ => Err(Error::Unavailable),
            }
        };
        tokio::time::timeout(*state.config.queue_timeout, wait)
            .await
            .map_err(|_| Error::Busy("every pack slot is taken"))?
    }
}

/// What a pack answer holds until it has been sent: its slots, and its mirror's lease.
struct Held {
    slots: Slots,
    _lease: mirror::Lease,
}

/// Enforce an answer's time limits: once `COMPUTE_TIMEOUT` has passed before its pack
/// streams, or `REQUEST_TIMEOUT` in all, it is interrupted as if its client had gone.
fn watchdog(
    config: &Config,
    interrupt: Arc<AtomicBool>,
    limits: Arc<upload_pack::Limits>,
) -> tokio::task::AbortHandle {
    let (compute, total) = (*config.compute_timeout, *config.request_timeout);
    let stop = move |limits: &upload_pack::Limits| {
        limits.timed_out.store(true, Ordering::Relaxed);
        interrupt.store(true, Ordering::Relaxed);
    };
    tokio::spawn(async move {
        tokio::time::sleep(compute.min(total)).await;
        if !limits.streaming.load(Ordering::Relaxed) {
            return stop(&limits);
        }
        tokio::time::sleep(total.saturating_sub(compute)).await;
        stop(&limits)
    })
    .abort_handle()
}

/// Generate the answer to `parsed` on a blocking thread, streaming it into `tx`.
#[allow(clippy::too_many_arguments)]
fn start_pack(
    state: &AppState,
    snapshot: Arc<Snapshot>,
    name: String,
    parsed: Parsed,
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    interrupt: Arc<AtomicBool>,
    held: Held,
    preamble_sent: bool,
    span: Span,
) {
    let options = upload_pack::Options {
        pack_threads: state.config.pack_threads,
        compression: state.compression,
    };
    let task_span = span;
    let runtime = tokio::runtime::Handle::current();
    let pack_cache = state.pack_cache.clone();
    let limits = Arc::new(upload_pack::Limits::default());
    let watchdog = watchdog(&state.config, Arc::clone(&interrupt), Arc::clone(&limits));
    let stall = *state.config.client_stall_timeout;
    tokio::task::spawn_blocking(move || {
        let _entered = task_span.enter();
        let _watchdog = AbortOnDrop(watchdog);
        let Held { slots, _lease } = held;
        let _stream = slots.stream;
        let out = ChannelWriter::new(tx, runtime, Arc::clone(&interrupt), stall);
        let repo = snapshot.repo();
        let db = crate::pack::db(&repo);
        let ctx = upload_pack::Context {
            snapshot: &snapshot,
            repo: &repo,
            db: &db,
            interrupt: &interrupt,
            limits: &limits,
            options,
            cache: pack_cache.as_ref().map(|c| (c, name.as_str())),
            pack_slot: std::cell::Cell::new(Some(Box::new(slots.pack))),
            preamble_sent,
        };
        let result = match &parsed {
            Parsed::V0(req) => upload_pack::serve_v0(&ctx, req, out),
            Parsed::V2(req) => upload_pack::serve_v2(&ctx, req, out),
        };
        let command = parsed.command();
        match result {
            Ok(outcome) => {
                task_span.record("outcome", field::debug(outcome));
                tracing::info!(?outcome, "served");
                crate::metrics::request(command, "ok");
                if let upload_pack::Outcome::Pack { objects, bytes } = outcome {
                    crate::metrics::pack(objects, bytes);
                }
            }
            Err(_) if limits.timed_out.load(Ordering::Relaxed) => {
                crate::metrics::request(command, "timeout");
                task_span.record("outcome", "timeout");
                tracing::warn!("stopped: COMPUTE_TIMEOUT or REQUEST_TIMEOUT passed");
            }
            Err(upload_pack::Error::Io(e)) => {
                crate::metrics::request(command, "client-gone");
                tracing::info!(error = %e, "client went away")
            }
            Err(upload_pack::Error::Pack(crate::pack::Error::Interrupted)) => {
                crate::metrics::request(command, "client-gone");
                tracing::info!("client went away")
            }
            Err(
                e @ (upload_pack::Error::NotOurRef(_)
                | upload_pack::Error::Protocol(_)
                | upload_pack::Error::Pack(crate::pack::Error::Missing(_))),
            ) => {
                crate::metrics::request(command, "refused");
                task_span.record("outcome", field::display(&e));
                tracing::info!(error = %e, "refused");
            }
            Err(e) => {
                crate::metrics::request(command, "error");
                task_span.record("outcome", "error");
                tracing::error!(error = %e, "upload-pack failed");
            }
        }
    });
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn pack_response(body: Body) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-git-upload-pack-result"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}
