//! The errors that end a Git request before upload-pack runs, and their answers: a status, a
//! short `text/plain` cause (git shows it as `remote: …`) and the headers a client needs to
//! retry or authenticate.
//!
//! Building an answer has no side effects: what the log and the metrics need travels in the
//! response's extensions as a [`Failure`], which the request layer records ([`super::router`]).

use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{body, Line};
use crate::mirror;
use crate::repo::path;

/// Everything that ends a request before upload-pack runs.
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    #[error(transparent)]
    Resolve(#[from] path::Error),
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
    Expands(body::Error),
    #[error("{0}")]
    Encoding(body::Error),
    #[error("cannot read request body: {0}")]
    Body(String),
    #[error("malformed request: {0}")]
    Malformed(crate::protocol::Error),
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
    pub(super) fn is_client_error(&self) -> bool {
        !matches!(
            self,
            Error::Unavailable | Error::Busy(_) | Error::BadGateway { .. } | Error::Internal(_)
        )
    }

    fn status(&self) -> StatusCode {
        match self {
            Error::Resolve(path::Error::UnknownEndpoint(_)) | Error::NotFound(_) => {
                StatusCode::NOT_FOUND
            }
            Error::Resolve(path::Error::InvalidPath { .. })
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
        }
    }

    /// The metrics label of the refusal.
    fn reason(&self) -> &'static str {
        match self {
            Error::Resolve(path::Error::UnknownEndpoint(_)) => "unknown-endpoint",
            Error::Resolve(path::Error::InvalidPath { .. }) => "invalid-path",
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
    pub(super) fn from_read(e: body::Error, limit: bytesize::ByteSize) -> Self {
        match e {
            body::Error::TooLarge => Error::TooLarge(limit),
            e @ body::Error::Expands => Error::Expands(e),
            e @ body::Error::Encoding(_) => Error::Encoding(e),
            body::Error::Body(msg) => Error::Body(msg),
            body::Error::Busy => Error::Busy("request bodies use their whole memory budget"),
            body::Error::ClientShare => Error::ClientBusy,
            body::Error::TimedOut => Error::BodyTimeout,
        }
    }

    /// An upstream failure: `what` failed because of `source`.
    pub(super) fn upstream(what: String, source: &crate::upstream::Error) -> Self {
        Error::BadGateway {
            status: match source {
                crate::upstream::Error::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
                _ => StatusCode::BAD_GATEWAY,
            },
            message: format!("{what}: {}", source.cause()),
            detail: format!("{what}: {source}"),
        }
    }

    /// What the log and the metrics record of this error.
    pub(super) fn failure(&self) -> Failure {
        let log = match self {
            Error::BadGateway { detail, .. } => Some(Log::Upstream(detail.clone())),
            Error::Internal(detail) => Some(Log::Internal(detail.clone())),
            _ => None,
        };
        Failure {
            reason: self.reason(),
            message: self.to_string(),
            log,
        }
    }
}

impl From<mirror::Error> for Error {
    fn from(e: mirror::Error) -> Self {
        match e {
            mirror::Error::AuthRequired(name) => Error::AuthRequired(name),
            mirror::Error::NotFound(name) => Error::NotFound(name),
            // A creation stopped at shutdown.
            mirror::Error::Upstream {
                source: crate::upstream::Error::Interrupted,
                ..
            } => Error::Unavailable,
            mirror::Error::Upstream { name, source } => {
                Error::upstream(format!("cannot mirror {name}"), &source)
            }
            mirror::Error::ShuttingDown { .. } => Error::Unavailable,
            e @ mirror::Error::Local { .. } => Error::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
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
        response.extensions_mut().insert(self.failure());
        response
    }
}

/// What the client is not told about a 5xx, for the log.
#[derive(Debug, Clone)]
enum Log {
    /// The upstream (or the disk, while mirroring) failed: the cause chain.
    Upstream(String),
    /// Our own fault.
    Internal(String),
}

/// An error answer as the log and the metrics see it, left in the response's extensions by
/// [`Error::into_response`] and recorded once by the request layer.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    /// The refusal's metrics label.
    reason: &'static str,
    /// What the client was told.
    message: String,
    log: Option<Log>,
}

impl Failure {
    /// The request line of an answer with `status` that carried this failure: its outcome is
    /// the refusal's label, its cause what the log needs (for a 5xx, more than the client was
    /// told).
    pub(super) fn line(
        &self,
        status: u16,
        proxy_status: Option<&str>,
        duration: std::time::Duration,
    ) -> Line {
        let (cause, level) = match &self.log {
            Some(Log::Upstream(detail)) => (detail.clone(), tracing::Level::WARN),
            Some(Log::Internal(detail)) => (detail.clone(), tracing::Level::ERROR),
            None => (self.message.clone(), tracing::Level::INFO),
        };
        Line::new(status, proxy_status, duration).failed(self.reason, cause, level)
    }

    /// Record an answer with `status` that carried this failure: log its request line and
    /// count the refusal.
    pub(super) fn record(
        &self,
        status: u16,
        proxy_status: Option<&str>,
        duration: std::time::Duration,
    ) {
        self.line(status, proxy_status, duration).log();
        crate::metrics::refusal(self.reason);
    }
}
