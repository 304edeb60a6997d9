//! Git LFS: `…/info/lfs/…` requests. With the object cache on, `download` batch requests go
//! to [`crate::lfs::Cache::batch`] and the proxy's object links to
//! [`crate::lfs::Cache::object`]; everything else (uploads, `verify`, the locks API, other
//! transfers) is passed through to the upstream as it is (method, headers, body, status),
//! streamed both ways, so that `git lfs` keeps working behind `insteadOf`.

use std::borrow::Cow;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use tracing::{field, Span};

use super::error::Error;
use super::git::Mirrored;
use super::AppState;
use crate::mirror;

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those the client
/// library sets itself.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::HOST,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Answer the LFS request `lfs_path` (from `/info/lfs` on) for `mirrored`.
pub(super) async fn proxy(
    state: &AppState,
    parts: &axum::http::request::Parts,
    mirrored: &Mirrored,
    lfs_path: &str,
    body: Body,
) -> Result<Response, Error> {
    let method = &parts.method;
    let cache = state.lfs.as_deref();
    if let (Some(cache), Some(oid)) = (cache, lfs_path.strip_prefix(crate::lfs::LINK_PATH)) {
        if method != Method::GET {
            return Err(Error::Method(method.clone()));
        }
        return Ok(object(cache, parts, mirrored, oid).await);
    }
    let url = upstream_url(&mirrored.url, lfs_path, &parts.uri);
    // The client's own credentials go through as they are. The proxy's static token is only
    // lent for downloads: it must not let anonymous clients write upstream. Bodies go
    // upstream as they came, gzip included, except a batch request read to decide on lending
    // the token or on the cache, which goes decoded.
    let lends = mirrored.client_authorization.is_none()
        && matches!(mirrored.credentials, mirror::Credentials::Proxy(_));
    let mut headers = Cow::Borrowed(&parts.headers);
    let (body, download) = if lends || cache.is_some() {
        is_download(
            method,
            lfs_path,
            state.incoming(parts, body),
            &state.body_budget,
            *state.config.body_read_timeout,
        )
        .await
        .map_err(|e| Error::from_read(e, bytesize::ByteSize::mib(1)))?
    } else {
        (Checked::Untouched(body), false)
    };
    if let Checked::Decoded(_) = body {
        headers.to_mut().remove(header::CONTENT_ENCODING);
    }
    let authorization = match (&mirrored.client_authorization, &mirrored.credentials) {
        (Some(client), _) => Some(client.clone()),
        (None, mirror::Credentials::Proxy(token)) if download => Some(token.expose().to_owned()),
        (None, _) => None,
    };
    if let (Some(cache), Checked::Decoded(bytes)) = (cache, &body) {
        let base = base_url(state, parts);
        if let Some(base) = base.filter(|_| crate::lfs::batch::is_cacheable_download(bytes)) {
            // The answer is read as JSON: in the encoding reqwest reads.
            headers.to_mut().remove(header::ACCEPT_ENCODING);
            let request =
                upstream_request(&state.http_client, &url, method, &headers, authorization)
                    .body(bytes.clone());
            return batch(cache, mirrored, &base, request).await;
        }
    }
    let request = upstream_request(&state.http_client, &url, method, &headers, authorization).body(
        reqwest::Body::wrap_stream(body.into_body().into_data_stream()),
    );
    let response = request
        .send()
        .await
        .map_err(|e| crate::upstream::Error::from_request(&e))
        .and_then(relay)
        .map_err(|e| Error::upstream("LFS request to the upstream failed".into(), &e))?;
    Span::current().record("outcome", field::display(response.status().as_u16()));
    Ok(response)
}

/// A `download` batch request, through the cache.
async fn batch(
    cache: &crate::lfs::Cache,
    mirrored: &Mirrored,
    base: &str,
    request: reqwest::RequestBuilder,
) -> Result<Response, Error> {
    let span = Span::current();
    let answer = match cache.batch(&mirrored.target.name, base, request).await {
        Ok(answer) => answer,
        Err(e) => return Ok(failure(e)),
    };
    let response = match answer {
        crate::lfs::Batch::Rewritten { body, linked } => {
            tracing::debug!(linked, "Git LFS batch answer rewritten");
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/vnd.git-lfs+json"),
                )],
                body,
            )
                .into_response()
        }
        crate::lfs::Batch::Upstream(response) => relay(response)
            .map_err(|e| Error::upstream("LFS request to the upstream failed".into(), &e))?,
        crate::lfs::Batch::Unchanged {
            status,
            headers,
            body,
        } => {
            let mut out = Response::new(Body::from(body));
            *out.status_mut() = status;
            copy_headers(&headers, out.headers_mut());
            out
        }
    };
    span.record("outcome", field::display(response.status().as_u16()));
    Ok(response)
}

/// A proxy object link: the object, or why not.
async fn object(
    cache: &crate::lfs::Cache,
    parts: &axum::http::request::Parts,
    mirrored: &Mirrored,
    oid: &str,
) -> Response {
    let span = Span::current();
    let range = parts
        .headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let query = parts.uri.query().unwrap_or_default();
    let object = match cache.object(&mirrored.target.name, oid, query, range).await {
        Ok(object) => object,
        Err(e) => {
            tracing::info!(oid, error = %e, "Git LFS object refused");
            return failure(e);
        }
    };
    span.record("outcome", object.source.as_str());
    let (status, length) = match object.range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, end - start),
        None => (StatusCode::OK, object.size),
    };
    tracing::info!(
        oid,
        size = object.size,
        source = object.source.as_str(),
        range = ?object.range,
        "Git LFS object"
    );
    let mut response = Response::new(Body::from_stream(object.body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some((start, end)) = object.range {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{}", end - 1, object.size))
        {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    h.insert(
        "x-git-proxy-status",
        HeaderValue::from_static(object.source.as_str()),
    );
    response
}

/// The answer to a failed cache request: the status, and a line git-lfs shows.
fn failure(e: crate::lfs::Error) -> Response {
    use crate::lfs::Error as E;
    let status = match &e {
        E::Link(_) => StatusCode::FORBIDDEN,
        E::NotAnObject(_) | E::Gone(_) => StatusCode::NOT_FOUND,
        E::Range(_) => StatusCode::RANGE_NOT_SATISFIABLE,
        E::Batch(_) | E::BatchTooLarge { .. } | E::Download(_) => StatusCode::BAD_GATEWAY,
        E::Local(io) if crate::is_no_space(io) => StatusCode::INSUFFICIENT_STORAGE,
        E::Local(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Span::current().record("outcome", field::display(status.as_u16()));
    let message = match &e {
        E::Local(_) => {
            tracing::error!(error = %e, "Git LFS cache failed");
            "internal server error (see the proxy's log)".to_owned()
        }
        E::Batch(_) | E::BatchTooLarge { .. } | E::Download(_) => {
            let message = crate::error_chain(&e);
            tracing::warn!(error = %message, "Git LFS upstream failed");
            message
        }
        _ => e.to_string(),
    };
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{message}\n"),
    )
        .into_response();
    if let E::Range(size) = e {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    response
}

/// The proxy's own URL as the client reached it, for the links in batch answers: the `Host`
/// header, over `https` when a trusted proxy says so in `X-Forwarded-Proto`. `None` for a
/// missing or odd `Host` (the batch is then passed through, uncached).
fn base_url(state: &AppState, parts: &axum::http::request::Parts) -> Option<String> {
    let host = parts.headers.get(header::HOST)?.to_str().ok()?;
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
    if !valid {
        return None;
    }
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let https = peer.is_some_and(|ip| state.trusted_proxies.contains(ip))
        && parts
            .headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    let scheme = if https { "https" } else { "http" };
    Some(format!("{scheme}://{host}"))
}

/// A request to `url` (the upstream's LFS URL, query included) with the client's headers,
/// but those of one hop, and `authorization`.
fn upstream_request(
    client: &reqwest::Client,
    url: &str,
    method: &Method,
    headers: &HeaderMap,
    authorization: Option<String>,
) -> reqwest::RequestBuilder {
    let mut upstream_headers = reqwest::header::HeaderMap::new();
    copy_headers(headers, &mut upstream_headers);
    if let Some(v) = authorization.and_then(|a| a.parse().ok()) {
        upstream_headers.insert(header::AUTHORIZATION, v);
    }
    client
        .request(method.clone(), url)
        .headers(upstream_headers)
}

/// The upstream's answer as it came, streamed.
fn relay(response: reqwest::Response) -> Result<Response, crate::upstream::Error> {
    let mut out = Response::builder().status(response.status());
    if let Some(h) = out.headers_mut() {
        copy_headers(response.headers(), h);
    }
    let stream = response.bytes_stream().map_err(std::io::Error::other);
    out.body(Body::from_stream(stream))
        .map_err(|e| crate::upstream::Error::Failed(format!("LFS response: {e}")))
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !HOP_BY_HOP.contains(name) && name != "keep-alive" {
            to.append(name.clone(), value.clone());
        }
    }
}

/// The largest batch request body inspected for [`is_download`].
const MAX_BATCH_BODY: u64 = 1024 * 1024;

/// A request body after [`is_download`].
enum Checked {
    /// Not read: it goes upstream as it came.
    Untouched(Body),
    /// Read (and decoded from gzip): it goes upstream as these bytes, without
    /// `Content-Encoding`.
    Decoded(bytes::Bytes),
}

impl Checked {
    /// The body to forward.
    fn into_body(self) -> Body {
        match self {
            Checked::Untouched(body) => body,
            Checked::Decoded(bytes) => Body::from(bytes),
        }
    }
}

/// Whether a request only reads: a `GET`, or a batch request for the `download` operation.
/// A batch body is read (it is small JSON) and handed back for forwarding.
async fn is_download(
    method: &Method,
    lfs_path: &str,
    incoming: super::body::Incoming,
    budget: &std::sync::Arc<super::body::Budget>,
    timeout: std::time::Duration,
) -> Result<(Checked, bool), super::body::Error> {
    if method == Method::GET {
        // Object downloads, not the locks API (`/info/lfs/locks`).
        let download = lfs_path.starts_with("/info/lfs/objects/");
        return Ok((Checked::Untouched(incoming.into_body()), download));
    }
    if method != Method::POST || lfs_path != "/info/lfs/objects/batch" {
        return Ok((Checked::Untouched(incoming.into_body()), false));
    }
    let (bytes, _charge) =
        super::body::read_limited(incoming, MAX_BATCH_BODY, budget, timeout).await?;
    let download = batch_operation(&bytes).as_deref() == Some("download");
    Ok((Checked::Decoded(bytes), download))
}

pub use crate::lfs::batch::operation as batch_operation;

/// The upstream URL for an LFS request: the repository URL, the LFS path, the query.
pub fn upstream_url(repo_url: &str, lfs_path: &str, uri: &Uri) -> String {
    match uri.query() {
        Some(q) => format!("{repo_url}{lfs_path}?{q}"),
        None => format!("{repo_url}{lfs_path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_top_level_download_is_a_download() {
        let op = |body: &str| batch_operation(body.as_bytes());
        assert_eq!(
            op(r#"{"operation": "download", "objects": []}"#).as_deref(),
            Some("download")
        );
        assert_eq!(
            op(r#"{"operation":"\u0064ownload"}"#).as_deref(),
            Some("download")
        );
        for not_download in [
            r#"{"operation":"upload","objects":[{"operation":"download"}]}"#,
            r#"{"operation":"upload","ref":{"name":"\"operation\":\"download\""}}"#,
            r#"{"operation":"upload","operation":"download"}"#,
            r#"{"operation":"download","operation":"upload"}"#,
            r#"{"objects":[],"x":{"operation":"download"}}"#,
            r#"["operation","download"]"#,
            r#"["download"]"#,
            r#"{"operation":"download","x":"\u12"}"#,
            r#"{"operation":"download","x":"\udc07"}"#,
            r#"{"operation":"download","x":1e999}"#,
            r#"{"operation":"download""#,
            "",
        ] {
            assert_ne!(
                op(not_download).as_deref(),
                Some("download"),
                "{not_download}"
            );
        }
        assert_eq!(
            batch_operation(b"{\"operation\":\"download\",\"x\":\"\xff\"}"),
            None,
            "not UTF-8"
        );
    }
}
