//! Git LFS pass-through: `…/info/lfs/…` requests go to the upstream as they are (method,
//! headers, body, status), streamed both ways, so that `git lfs` keeps working behind
//! `insteadOf`. Nothing is cached.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, Method, Uri};
use axum::response::Response;
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

/// Pass the LFS request (`parts`, `body`; `lfs_path`: the path from `/info/lfs` on) for the
/// repository `m` to its upstream, and its answer back.
pub(super) async fn proxy(
    state: &AppState,
    parts: &axum::http::request::Parts,
    m: &Mirrored,
    lfs_path: &str,
    body: Body,
) -> Result<Response, Error> {
    let method = &parts.method;
    let url = upstream_url(&m.url, lfs_path, &parts.uri);
    // The client's own credentials go through as they are. The proxy's static token is only
    // lent for downloads: it must not let anonymous clients write upstream. Bodies go upstream
    // as they came, gzip included, except a batch request read to decide on lending the
    // token, which goes decoded.
    let mut headers = std::borrow::Cow::Borrowed(&parts.headers);
    let (body, authorization) = match m.client_authorization.as_deref() {
        Some(client) => (body, Some(client.to_owned())),
        None if matches!(m.credentials, mirror::Credentials::Proxy(_)) => {
            let (body, download) = is_download(
                method,
                lfs_path,
                state.incoming(parts, body),
                &state.body_budget,
                *state.config.body_read_timeout,
            )
            .await
            .map_err(|e| Error::from_read(e, bytesize::ByteSize::mib(1)))?;
            if let Checked::Decoded(_) = body {
                headers.to_mut().remove(header::CONTENT_ENCODING);
            }
            let token = match &m.credentials {
                mirror::Credentials::Proxy(token) if download => Some(token.expose().to_owned()),
                _ => None,
            };
            (body.into_body(), token)
        }
        None => (body, None),
    };
    let response = forward(
        &state.http_client,
        &url,
        method.clone(),
        &headers,
        authorization.as_deref(),
        body,
    )
    .await
    .map_err(|e| Error::upstream("LFS request to the upstream failed".into(), &e))?;
    Span::current().record("outcome", field::display(response.status().as_u16()));
    Ok(response)
}

/// Forward a request to `url` (the upstream's LFS URL, query included).
pub async fn forward(
    client: &reqwest::Client,
    url: &str,
    method: Method,
    headers: &HeaderMap,
    authorization: Option<&str>,
    body: Body,
) -> Result<Response, crate::upstream::Error> {
    let mut upstream_headers = reqwest::header::HeaderMap::new();
    for (name, value) in headers {
        if !HOP_BY_HOP.contains(name) && name != "keep-alive" {
            upstream_headers.append(name.clone(), value.clone());
        }
    }
    if let Some(a) = authorization {
        if let Ok(v) = a.parse() {
            upstream_headers.insert(header::AUTHORIZATION, v);
        }
    }
    let response = client
        .request(method, url)
        .headers(upstream_headers)
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await
        .map_err(|e| crate::upstream::Error::from_request(&e))?;
    let mut out = Response::builder().status(response.status());
    if let Some(h) = out.headers_mut() {
        for (name, value) in response.headers() {
            if !HOP_BY_HOP.contains(name) && name != "keep-alive" {
                h.append(name.clone(), value.clone());
            }
        }
    }
    let stream = response.bytes_stream().map_err(std::io::Error::other);
    out.body(Body::from_stream(stream))
        .map_err(|e| crate::upstream::Error::Failed(format!("LFS response: {e}")))
}

/// The largest batch request body inspected for [`is_download`].
const MAX_BATCH_BODY: u64 = 1024 * 1024;

/// A request body after [`is_download`].
pub enum Checked {
    /// Not read: it goes upstream as it came.
    Untouched(Body),
    /// Read (and decoded from gzip): it goes upstream as these bytes, without
    /// `Content-Encoding`.
    Decoded(bytes::Bytes),
}

impl Checked {
    /// The body to forward.
    pub fn into_body(self) -> Body {
        match self {
            Checked::Untouched(body) => body,
            Checked::Decoded(bytes) => Body::from(bytes),
        }
    }
}

/// Whether a request only reads: a `GET`, or a batch request for the `download` operation.
/// A batch body is read (it is small JSON) and handed back for forwarding.
pub async fn is_download(
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

/// The top-level `operation` of a batch request, read as the upstream reads it: JSON, so
/// escapes and white space mean what they mean there. A body that is not a JSON object with
/// exactly one string `operation` (a duplicate could be read either way) has none.
pub fn batch_operation(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Batch {
        operation: String,
    }
    // The typed parse alone skips the other fields loosely (invalid escapes, bad UTF-8,
    // numbers out of range) and takes an array for the struct: the whole body must first be a
    // valid JSON object. The typed parse then refuses a duplicated `operation`.
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if !value.is_object() {
        return None;
    }
    serde_json::from_slice::<Batch>(body)
        .ok()
        .map(|b| b.operation)
}

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
