//! Git LFS pass-through: `…/info/lfs/…` requests go to the upstream as they are (method,
//! headers, body, status), streamed both ways, so that `git lfs` keeps working behind
//! `insteadOf`. Nothing is cached.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, Method, Uri};
use axum::response::Response;
use futures_util::TryStreamExt;

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

/// Forward a request to `url` (the upstream's LFS URL, query included).
pub async fn forward(
    client: &reqwest::Client,
    url: &str,
    method: Method,
    headers: &HeaderMap,
    authorization: Option<&str>,
    body: Body,
) -> Result<Response, String> {
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
        .map_err(|e| format!("LFS request to the upstream failed: {e}"))?;
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
        .map_err(|e| format!("LFS response: {e}"))
}

/// The largest batch request body inspected for [`is_download`].
const MAX_BATCH_BODY: u64 = 1024 * 1024;

/// Whether a request only reads: a `GET`, or a batch request for the `download` operation.
/// The body is read (it is small JSON) and handed back for forwarding.
pub async fn is_download(
    method: &Method,
    lfs_path: &str,
    body: Body,
) -> Result<(Body, bool), String> {
    if method == Method::GET {
        return Ok((body, true));
    }
    if method != Method::POST || lfs_path != "/info/lfs/objects/batch" {
        return Ok((body, false));
    }
    let bytes = super::body::read_limited(body, MAX_BATCH_BODY)
        .await
        .map_err(|e| format!("Git LFS batch request: {e}"))?;
    let compact: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let needle: &[u8] = br#""operation":"download""#;
    let download = compact.windows(needle.len()).any(|w| w == needle);
    Ok((Body::from(bytes), download))
}

/// The upstream URL for an LFS request: the repository URL, the LFS path, the query.
pub fn upstream_url(repo_url: &str, lfs_path: &str, uri: &Uri) -> String {
    match uri.query() {
        Some(q) => format!("{repo_url}{lfs_path}?{q}"),
        None => format!("{repo_url}{lfs_path}"),
    }
}
