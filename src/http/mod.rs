//! The HTTP front: the axum router, request bodies (gzip, size limit), and the mapping of
//! errors to responses. It resolves the repository, parses the request and runs
//! [`upload_pack`](crate::upload_pack) on a blocking thread whose output streams back through
//! a bounded channel.

mod body;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::Semaphore;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::trace::TraceLayer;
use tracing::{field, Span};

use crate::config::Config;
use crate::protocol::{pktline, v0, v2, ParseError};
use crate::repo::{self, ResolveError, Service, Target};
use crate::upload_pack::{self, Version};

use body::{ChannelWriter, ResponseStream};

/// Shared state of the server.
#[derive(Clone)]
pub struct AppState {
    config: Arc<Config>,
    pack_slots: Arc<Semaphore>,
    compression: gix::zlib::Compression,
}

impl AppState {
    /// State for serving with `config`, which must have passed [`Config::validate`].
    pub fn new(config: Config) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let slots = config.max_concurrent_packs.unwrap_or(cores * 2);
        AppState {
            compression: config.compression().unwrap_or_default(),
            config: Arc::new(config),
            pack_slots: Arc::new(Semaphore::new(slots)),
        }
    }
}

/// The application: Git smart HTTP on every path, plus `/healthz`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(git)
        .layer(RequestDecompressionLayer::new().gzip(true))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
                repo = field::Empty,
                command = field::Empty,
                outcome = field::Empty,
            )
        }))
        .with_state(state)
}

/// Serve `router(state)` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

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
    #[error("cannot read request body: {0}")]
    Body(String),
    #[error("malformed request: {0}")]
    Malformed(ParseError),
    #[error("server is shutting down")]
    Unavailable,
    #[error("internal server error")]
    Internal(String),
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
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Span::current().record("outcome", field::display(status.as_u16()));
        // git shows a text/plain body of a failed request as `remote: <line>`.
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{self}\n"),
        )
            .into_response()
    }
}

async fn git(State(state): State<AppState>, req: Request) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();
    let target = repo::resolve(&state.config.mirror_dir, parts.uri.path())?;
    let span = Span::current();
    span.record("repo", field::display(&target.name));
    let version = Version::from_header(
        parts
            .headers
            .get("git-protocol")
            .and_then(|v| v.to_str().ok()),
    );
    match (&parts.method, target.service) {
        (&Method::GET, Service::InfoRefs) => {
            let service = parts
                .uri
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|kv| kv.strip_prefix("service="));
            match service {
                Some("git-upload-pack") => info_refs(target, version).await,
                Some("git-receive-pack") => Err(Error::ReceivePack),
                _ => Err(Error::DumbHttp),
            }
        }
        (&Method::POST, Service::UploadPack) => upload_pack(state, target, version, body).await,
        (&Method::POST, Service::ReceivePack) => Err(Error::ReceivePack),
        (method, _) => Err(Error::Method(method.clone())),
    }
}

async fn info_refs(target: Target, version: Version) -> Result<Response, Error> {
    Span::current().record("command", "info/refs");
    let name = target.name.clone();
    let (advert, outcome) = tokio::task::spawn_blocking(move || {
        let repo = repo::open(&target.dir)?;
        upload_pack::advertise(&repo, version)
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
    .map_err(|e| match e {
        upload_pack::Error::Repo(repo::Error::NotFound) => Error::NotFound(name),
        other => Error::Internal(other.to_string()),
    })?;
    Span::current().record("outcome", field::debug(outcome));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-git-upload-pack-advertisement"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        advert,
    )
        .into_response())
}

/// Either protocol's parsed request.
enum Parsed {
    V0(v0::Request),
    V2(v2::Request),
}

async fn upload_pack(
    state: AppState,
    target: Target,
    version: Version,
    body: Body,
) -> Result<Response, Error> {
    let span = Span::current();
    let limit = state.config.max_request_body;
    let bytes = body::read_limited(body, limit.as_u64())
        .await
        .map_err(|e| match e {
            body::ReadError::TooLarge => Error::TooLarge(limit),
            body::ReadError::Body(msg) => Error::Body(msg),
        })?;
    let parsed = match version {
        Version::V2 => v2::parse(&bytes).map(|r| r.map(Parsed::V2)),
        Version::V0 | Version::V1 => v0::parse(&bytes).map(|r| r.map(Parsed::V0)),
    };
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
    span.record(
        "command",
        match &parsed {
            Parsed::V0(_) => "upload-pack",
            Parsed::V2(r) => match r.command {
                v2::Command::LsRefs(_) => "ls-refs",
                v2::Command::Fetch(_) => "fetch",
            },
        },
    );
    if !repo::exists(&target.dir) {
        return Err(Error::NotFound(target.name));
    }
    let permit = state
        .pack_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| Error::Unavailable)?;
    let interrupt = Arc::new(AtomicBool::new(false));
    let (stream, tx) = ResponseStream::new(Arc::clone(&interrupt));
    let options = upload_pack::Options {
        pack_threads: state.config.pack_threads,
        compression: state.compression,
    };
    let task_span = span.clone();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let _entered = task_span.enter();
        let out = ChannelWriter::new(tx);
        let result = repo::open(&target.dir)
            .map_err(upload_pack::Error::from)
            .and_then(|repo| {
                let ctx = upload_pack::Context {
                    repo: &repo,
                    interrupt: &interrupt,
                    options,
                };
                match &parsed {
                    Parsed::V0(req) => upload_pack::serve_v0(&ctx, req, out),
                    Parsed::V2(req) => upload_pack::serve_v2(&ctx, req, out),
                }
            });
        match result {
            Ok(outcome) => {
                task_span.record("outcome", field::debug(outcome));
                tracing::info!(?outcome, "served");
            }
            Err(upload_pack::Error::Io(e)) => tracing::info!(error = %e, "client went away"),
            Err(upload_pack::Error::Pack(crate::pack::Error::Interrupted)) => {
                tracing::info!("client went away")
            }
            Err(
                e @ (upload_pack::Error::NotOurRef(_)
                | upload_pack::Error::Pack(crate::pack::Error::Missing(_))),
            ) => {
                task_span.record("outcome", field::display(&e));
                tracing::info!(error = %e, "refused");
            }
            Err(e) => {
                task_span.record("outcome", "error");
                tracing::error!(error = %e, "upload-pack failed");
            }
        }
    });
    Ok(pack_response(Body::from_stream(stream)))
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
