//! Push-driven freshness: the upstreams' push webhooks (`POST /webhooks/github`, signed with
//! HMAC-SHA256; `POST /webhooks/gitlab`, with a shared token) and the authenticated warm-up
//! API (`POST /api/v1/mirrors/{host}/{path}/sync`). Both sync a mirror at once through the
//! mirror store's usual path (one sync per repository, per-host slots); `SYNC_STALE_AFTER`
//! stays the fallback for pushes that send no notice.
//!
//! With `BALANCER_URL` (a sharded fleet behind a balancer that routes by repository), a
//! webhook is not acted on where it lands but re-sent through the balancer as a warm-up of its
//! repository, marked so that the node that holds the mirror syncs it and does not forward
//! again.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::Router;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::auth::{fetch_source, upstream_credentials};
use super::{body, AppState};
use crate::config::Secret;
use crate::mirror::{self, Freshness, Status};
use crate::repo;

/// The header that marks a warm-up as a webhook forwarded by another node: only an existing
/// mirror is synced, in the background, and nothing is forwarded again.
const FORWARDED_HEADER: &str = "x-smart-git-proxy-forwarded";

/// The largest webhook body read: GitHub caps its payloads at 25 MB (`MAX_REQUEST_BODY`
/// applies when smaller).
const MAX_WEBHOOK_BODY: u64 = 25 << 20;

/// How long a delivery id (`X-GitHub-Delivery`, `X-Gitlab-Event-UUID`) is remembered: a
/// delivery that comes again within it is acknowledged and ignored.
pub(super) const DELIVERY_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

/// Delivery ids remembered at most (32 bytes each); beyond it, new ones are not, until old
/// ones expire.
pub(super) const MAX_DELIVERIES: usize = 10_000;

/// The answer a node gives a forwarded notice for a mirror it does not have (`404`), marked
/// with [`FORWARDED_HEADER`] so that the forwarding node tells it from a `404` of a balancer
/// or a node without this API.
const NO_MIRROR: &str = "no-mirror";

/// The answer to every `/api/v1/…` request while `ADMIN_TOKEN` is unset: `404`, saying how to
/// turn the API on.
pub(super) fn off() -> Response {
    answer(
        StatusCode::NOT_FOUND,
        "the admin API is off: set ADMIN_TOKEN (or ADMIN_TOKEN_FILE) to turn it on",
    )
}

/// The routes of this module.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/webhooks/github", post(github))
        .route("/webhooks/gitlab", post(gitlab))
        .route("/api/v1/mirrors/{*rest}", post(mirror_action))
        .route("/api/v1/{*rest}", any(unknown))
}

/// Any other `/api/v1/…` path: `404`, saying whether the API is off.
async fn unknown(State(state): State<AppState>) -> Response {
    match state.config.admin_token {
        None => off(),
        Some(_) => answer(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

/// A short plain-text answer.
fn answer(status: StatusCode, text: impl Into<String>) -> Response {
    let mut text = text.into();
    text.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

/// A refused credential: counted, and answered without saying what was expected.
fn unauthorized(challenge: &'static str) -> Response {
    crate::metrics::webhook_sync("unauthorized");
    let mut r = answer(StatusCode::UNAUTHORIZED, "unauthorized");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    r
}

/// Whether `given` equals `secret`, in time independent of where they differ and of the
/// secret's length: `ct_eq` on slices of different lengths returns at once, so the digests
/// are compared.
fn same(given: &[u8], secret: &Secret) -> bool {
    Sha256::digest(given)
        .ct_eq(&Sha256::digest(secret.expose().as_bytes()))
        .into()
}

/// Whether `headers` carry `Authorization: Bearer <token>` (the admin API's credential). The
/// scheme is case-insensitive (RFC 9110, 11.1), and one or more spaces separate it from the
/// token.
pub(super) fn bearer(headers: &HeaderMap, token: &Secret) -> bool {
    let given = header(headers, "authorization")
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, credentials)| credentials);
    same(given.trim().as_bytes(), token)
}

/// The MAC an `X-Hub-Signature-256: sha256=<hex>` header carries, if it is well-formed.
fn signature_mac(signature: Option<&str>) -> Option<[u8; 32]> {
    let hex_mac = signature?.trim().strip_prefix("sha256=")?;
    let mut mac = [0; 32];
    hex::decode_to_slice(hex_mac, &mut mac).ok()?;
    Some(mac)
}

/// Whether `signature` (`X-Hub-Signature-256: sha256=<hex>`) is the HMAC-SHA256 of `body`
/// under `secret`; the MAC is compared in constant time.
fn signed(secret: &Secret, signature: Option<&str>, body: &[u8]) -> bool {
    let Some(given) = signature_mac(signature) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// The webhook body, within its limits and the shared body budget (held until the returned
/// charge drops).
async fn read_body(
    state: &AppState,
    incoming: body::Incoming,
) -> Result<(bytes::Bytes, body::Charge), Response> {
    let limit = state.config.max_request_body.as_u64().min(MAX_WEBHOOK_BODY);
    body::read_limited(
        incoming,
        limit,
        &state.body_budget,
        *state.config.body_read_timeout,
    )
    .await
    .map_err(|e| {
        let status = match e {
            body::Error::TooLarge | body::Error::Expands => StatusCode::PAYLOAD_TOO_LARGE,
            body::Error::Encoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            body::Error::Body(_) => StatusCode::BAD_REQUEST,
            body::Error::Busy => StatusCode::SERVICE_UNAVAILABLE,
            body::Error::ClientShare => StatusCode::TOO_MANY_REQUESTS,
            body::Error::TimedOut => StatusCode::REQUEST_TIMEOUT,
        };
        answer(status, e.to_string())
    })
}

/// A task that failed to finish (it panicked): logged, and answered without its message.
fn internal(e: tokio::task::JoinError) -> Response {
    tracing::error!(error = %e, "webhook task failed");
    answer(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal server error (see the proxy's log)",
    )
}

/// The key under which a delivery is remembered: its sender and id, hashed (fixed size,
/// whatever the header holds). `None` without an id.
fn delivery_key(sender: &str, id: Option<&str>) -> Option<[u8; 32]> {
    let id = id.map(str::trim).filter(|id| !id.is_empty())?;
    let mut hash = Sha256::new();
    hash.update(sender.as_bytes());
    hash.update([0]);
    hash.update(id.as_bytes());
    Some(hash.finalize().into())
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// What an authentic notice asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Notice {
    /// A push to the repository at this URL.
    Push(String),
    /// GitHub's check that the hook is set up.
    Ping,
    /// Another event, named.
    Other(String),
    /// A push whose payload does not parse.
    Malformed(String),
}

/// What a GitHub push payload says of its repository.
#[derive(Deserialize)]
struct GithubPush {
    repository: GithubRepository,
}

#[derive(Deserialize)]
struct GithubRepository {
    clone_url: String,
}

/// The notice in a GitHub delivery (its `X-Hub-Signature-256` and `X-GitHub-Event` headers
/// and its body), or `None` when its signature is not the body's under `secret`.
pub fn github_notice(
    secret: &Secret,
    signature: Option<&str>,
    event: Option<&str>,
    body: &[u8],
) -> Option<Notice> {
    if !signed(secret, signature, body) {
        return None;
    }
    Some(match event {
        Some("ping") => Notice::Ping,
        Some("push") => match serde_json::from_slice::<GithubPush>(body) {
            Ok(push) => Notice::Push(push.repository.clone_url),
            Err(e) => Notice::Malformed(e.to_string()),
        },
        other => Notice::Other(other.unwrap_or("(none)").to_owned()),
    })
}

/// `POST /webhooks/github`: a `push` event syncs the pushed repository's mirror.
async fn github(State(state): State<AppState>, req: Request) -> Response {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let Some(secret) = state.config.webhook_secret.clone() else {
        return answer(StatusCode::NOT_FOUND, "webhooks are off (WEBHOOK_SECRET)");
    };
    let signature = header(headers, "x-hub-signature-256").map(str::to_owned);
    // Without a signature nothing can be authentic: a stranger's body is not read.
    if signature_mac(signature.as_deref()).is_none() {
        tracing::info!("webhook refused: bad or missing X-Hub-Signature-256");
        return unauthorized("HMAC-SHA256");
    }
    let (body, budget) = match read_body(&state, state.incoming(&parts, body)).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let event = header(headers, "x-github-event").map(str::to_owned);
    // Hashing and parsing up to 25 MiB is CPU work.
    let notice = tokio::task::spawn_blocking(move || {
        let _budget = budget;
        github_notice(&secret, signature.as_deref(), event.as_deref(), &body)
    })
    .await;
    let delivery = delivery_key("github", header(headers, "x-github-delivery"));
    match notice {
        Ok(Some(notice)) => act(state, notice, delivery, arrived).await,
        Ok(None) => {
            tracing::info!("webhook refused: bad or missing X-Hub-Signature-256");
            unauthorized("HMAC-SHA256")
        }
        Err(e) => internal(e),
    }
}

/// What a GitLab push payload says of its project.
#[derive(Deserialize)]
struct GitlabPush {
    project: GitlabProject,
}

#[derive(Deserialize)]
struct GitlabProject {
    git_http_url: String,
}

/// The notice in a GitLab delivery whose token was accepted (its `X-Gitlab-Event` header and
/// its body).
pub fn gitlab_notice(event: Option<&str>, body: &[u8]) -> Notice {
    match event {
        Some("Push Hook" | "Tag Push Hook") => match serde_json::from_slice::<GitlabPush>(body) {
            Ok(push) => Notice::Push(push.project.git_http_url),
            Err(e) => Notice::Malformed(e.to_string()),
        },
        other => Notice::Other(other.unwrap_or("(none)").to_owned()),
    }
}

/// `POST /webhooks/gitlab`: a push or tag push syncs the project's mirror. GitLab sends the
/// secret itself as `X-Gitlab-Token` (no signature), so it is checked before the body is read.
async fn gitlab(State(state): State<AppState>, req: Request) -> Response {
    let arrived = Instant::now();
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let Some(secret) = state.config.webhook_secret.as_ref() else {
        return answer(StatusCode::NOT_FOUND, "webhooks are off (WEBHOOK_SECRET)");
    };
    let token = header(headers, "x-gitlab-token").unwrap_or_default();
    if !same(token.as_bytes(), secret) {
        tracing::info!("webhook refused: bad or missing X-Gitlab-Token");
        return unauthorized("X-Gitlab-Token");
    }
    let (body, budget) = match read_body(&state, state.incoming(&parts, body)).await {
        Ok(read) => read,
        Err(response) => return response,
    };
    let event = header(headers, "x-gitlab-event").map(str::to_owned);
    let notice = tokio::task::spawn_blocking(move || {
        let _budget = budget;
        gitlab_notice(event.as_deref(), &body)
    })
    .await;
    let delivery = delivery_key("gitlab", header(headers, "x-gitlab-event-uuid"));
    match notice {
        Ok(notice) => act(state, notice, delivery, arrived).await,
        Err(e) => internal(e),
    }
}

/// Answer an authentic notice, `delivery` naming it when its sender did.
async fn act(
    state: AppState,
    notice: Notice,
    delivery: Option<[u8; 32]>,
    arrived: Instant,
) -> Response {
    match notice {
        Notice::Push(url) => {
            // A delivery seen within the window (a redelivery, or a replay of a captured one)
            // costs nothing; one that failed is forgotten, so that its redelivery is acted on.
            if let Some(key) = delivery {
                if !state.deliveries.insert_new(key, ()) && state.deliveries.get(&key).is_some() {
                    tracing::info!("push ignored: a delivery already received");
                    crate::metrics::webhook_sync("duplicate");
                    return answer(StatusCode::ACCEPTED, "ignored: delivery already received");
                }
            }
            let response = pushed(state.clone(), &url, arrived).await;
            if let Some(key) = delivery.filter(|_| !response.status().is_success()) {
                state.deliveries.remove(&key);
            }
            response
        }
        Notice::Ping => answer(StatusCode::OK, "pong"),
        Notice::Other(event) => {
            crate::metrics::webhook_sync("ignored");
            answer(StatusCode::ACCEPTED, format!("ignored: event {event}"))
        }
        Notice::Malformed(e) => answer(StatusCode::BAD_REQUEST, format!("not a push payload: {e}")),
    }
}

/// A push notice for `clone_url`: sync its mirror in the background (or forward it), and
/// answer `202` at once. A repository that is not mirrored or not allowed is acknowledged and
/// ignored.
async fn pushed(state: AppState, clone_url: &str, arrived: Instant) -> Response {
    let Some(name) = state.upstreams.mirror_name(clone_url) else {
        tracing::info!(url = clone_url, "push ignored: not an allowed upstream");
        crate::metrics::webhook_sync("ignored");
        return answer(StatusCode::ACCEPTED, "ignored: not an allowed upstream");
    };
    let request = match mirror_request(&state, &name).await {
        Ok(request) => request,
        Err((StatusCode::BAD_GATEWAY, text)) => {
            crate::metrics::webhook_sync("failed");
            return answer(StatusCode::BAD_GATEWAY, text);
        }
        Err(_) => {
            crate::metrics::webhook_sync("ignored");
            tracing::info!(repo = %name, "push ignored: not a valid mirror name");
            return answer(StatusCode::ACCEPTED, "ignored: not a valid repository path");
        }
    };
    if let Some(balancer) = state.balancer_url.as_deref() {
        return forward(&state, balancer, &name).await;
    }
    // Held from the check to the end of the sync: an evicted mirror is not created anew.
    let lease = state.mirrors.lease(&request.dir);
    if !repo::exists(&request.dir) {
        tracing::info!(repo = %name, "push ignored: no mirror");
        crate::metrics::webhook_sync("ignored");
        return answer(
            StatusCode::ACCEPTED,
            format!("ignored: no mirror of {name}"),
        );
    }
    sync_in_background(state, request, lease, arrived, "webhook");
    answer(StatusCode::ACCEPTED, format!("syncing {name}"))
}

/// Sync an existing mirror in a task of its own, so that the notice is answered at once and
/// the sync finishes even if its sender goes away.
fn sync_in_background(
    state: AppState,
    request: mirror::Request,
    lease: mirror::Lease,
    since: Instant,
    reason: &'static str,
) {
    tokio::spawn(async move {
        let _lease = lease;
        let freshness = Freshness::Pushed { since, reason };
        match state.mirrors.ensure(&request, freshness).await {
            Ok(status) => crate::metrics::webhook_sync(status.as_str()),
            Err(e) => {
                crate::metrics::webhook_sync("failed");
                tracing::warn!(repo = %request.name, reason, error = %e, "push-driven sync failed");
            }
        }
    });
}

/// Re-send a push notice for `name` through the balancer, to the node that holds it.
async fn forward(state: &AppState, balancer: &str, name: &str) -> Response {
    let Some(token) = state.config.admin_token.as_ref() else {
        // Config::validate refuses BALANCER_URL without ADMIN_TOKEN.
        return answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "BALANCER_URL needs ADMIN_TOKEN",
        );
    };
    let url = format!("{balancer}/api/v1/mirrors/{name}/sync");
    let timeout = *state.config.upstream_connect_timeout + *state.config.upstream_stall_timeout;
    let sent = state
        .http_client
        .post(&url)
        .bearer_auth(token.expose())
        .header(FORWARDED_HEADER, "webhook")
        .timeout(timeout)
        .send()
        .await;
    // A node without the mirror answers 404 and says so; any other 404 (a balancer without the
    // route, a node without the admin API) did not deliver the notice.
    let delivered = |r: &reqwest::Response| {
        r.status().is_success()
            || (r.status() == StatusCode::NOT_FOUND
                && r.headers()
                    .get(FORWARDED_HEADER)
                    .is_some_and(|v| v == NO_MIRROR))
    };
    match sent {
        Ok(r) if delivered(&r) => {
            crate::metrics::webhook_forward("ok");
            crate::metrics::webhook_sync("forwarded");
            tracing::info!(repo = %name, status = r.status().as_u16(), "push forwarded");
            answer(StatusCode::ACCEPTED, format!("forwarded {name}"))
        }
        Ok(r) => {
            crate::metrics::webhook_forward("failed");
            tracing::warn!(repo = %name, status = r.status().as_u16(), "forwarding a push failed");
            answer(
                StatusCode::BAD_GATEWAY,
                format!("forwarding to BALANCER_URL failed: HTTP {}", r.status()),
            )
        }
        Err(e) => {
            crate::metrics::webhook_forward("failed");
            let cause = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "unreachable"
            } else {
                "failed"
            };
            let e = crate::error_chain(&e);
            tracing::warn!(repo = %name, error = %e, "forwarding a push failed");
            // The balancer's address is the operator's business, not the sender's.
            answer(
                StatusCode::BAD_GATEWAY,
                format!("forwarding to BALANCER_URL failed: {cause}"),
            )
        }
    }
}

/// The mirror request for `name` (`{host}/{path}`), with the proxy's own upstream
/// credentials: a notice carries no client's, so in pass-through mode a private mirror is not
/// synced this way (it is refused before any upstream request and stays as it is).
async fn mirror_request(
    state: &AppState,
    name: &str,
) -> Result<mirror::Request, (StatusCode, String)> {
    let target = repo::resolve(&state.config.mirror_dir, &format!("/{name}/info/refs"))
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let (host, path) = target.name.split_once('/').unwrap_or((&target.name, ""));
    let Some(upstream) = state.upstreams.get(host) else {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "upstream host '{host}' is not allowed; allowed: {}",
                state.upstreams.names()
            ),
        ));
    };
    let source = fetch_source(state.parent_proxy.as_deref(), upstream);
    Ok(mirror::Request {
        url: format!("{}/{path}.git", source.base_url),
        credentials: upstream_credentials(state, &source, None)
            .await
            .map_err(|e| {
                tracing::warn!(repo = %target.name, error = %e, "no upstream token");
                (
                    StatusCode::BAD_GATEWAY,
                    "the proxy has no upstream token (see its log)".to_owned(),
                )
            })?,
        name: target.name,
        dir: target.dir,
    })
}

/// `POST /api/v1/mirrors/{host}/{path}/sync` with `Authorization: Bearer <ADMIN_TOKEN>`:
/// create or sync the mirror now and answer `200` with its status when done. Marked as a
/// forwarded webhook ([`FORWARDED_HEADER`]): sync only an existing mirror, in the background
/// (`202`; `404` without one).
async fn mirror_action(State(state): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    let arrived = Instant::now();
    let Some(token) = state.config.admin_token.as_ref() else {
        return off();
    };
    if !bearer(&headers, token) {
        tracing::info!("admin request refused: bad or missing bearer token");
        return unauthorized("Bearer");
    }
    // The raw path, as Git URLs are resolved: percent-encoding is refused, not decoded.
    let Some(name) = uri
        .path()
        .strip_prefix("/api/v1/mirrors/")
        .and_then(|rest| rest.strip_suffix("/sync"))
    else {
        return answer(StatusCode::NOT_FOUND, "no such admin endpoint");
    };
    let request = match mirror_request(&state, name).await {
        Ok(request) => request,
        Err((status, text)) => return answer(status, text),
    };
    if headers.contains_key(FORWARDED_HEADER) {
        let lease = state.mirrors.lease(&request.dir);
        if !repo::exists(&request.dir) {
            crate::metrics::webhook_sync("ignored");
            let mut r = answer(
                StatusCode::NOT_FOUND,
                format!("no mirror of {}", request.name),
            );
            r.headers_mut()
                .insert(FORWARDED_HEADER, HeaderValue::from_static(NO_MIRROR));
            return r;
        }
        let name = request.name.clone();
        sync_in_background(state, request, lease, arrived, "webhook");
        return answer(StatusCode::ACCEPTED, format!("syncing {name}"));
    }
    let freshness = Freshness::Pushed {
        since: arrived,
        reason: "warm-up",
    };
    match state.mirrors.ensure(&request, freshness).await {
        Ok(status) => {
            crate::metrics::webhook_sync(status.as_str());
            let code = match status {
                Status::Clone => StatusCode::CREATED,
                _ => StatusCode::OK,
            };
            let body = serde_json::json!({ "repo": request.name, "status": status.as_str() });
            (
                code,
                [(header::CONTENT_TYPE, "application/json")],
                format!("{body}\n"),
            )
                .into_response()
        }
        Err(e) => {
            crate::metrics::webhook_sync("failed");
            let code = match &e {
                mirror::Error::NotFound(_) => StatusCode::NOT_FOUND,
                mirror::Error::Upstream {
                    source: crate::upstream::Error::NoSpace(_),
                    ..
                } => StatusCode::INSUFFICIENT_STORAGE,
                mirror::Error::AuthRequired(_) | mirror::Error::Upstream { .. } => {
                    StatusCode::BAD_GATEWAY
                }
                mirror::Error::Local { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                mirror::Error::ShuttingDown { .. } => StatusCode::SERVICE_UNAVAILABLE,
            };
            if code.is_server_error() {
                tracing::warn!(repo = %request.name, error = %e, "warm-up failed");
            }
            answer(code, e.client_message())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_body() {
        let secret = Secret::from("It's a Secret to Everybody");
        // GitHub's documented example (docs: "Validating webhook deliveries").
        let good = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(signed(&secret, Some(good), b"Hello, World!"));
        assert!(!signed(&secret, Some(good), b"Hello, World?"));
        assert!(!signed(&secret, Some(&good[7..]), b"Hello, World!"));
        assert!(!signed(&secret, Some("sha256=zz"), b"Hello, World!"));
        assert!(!signed(&secret, None, b"Hello, World!"));
        assert!(!signed(
            &Secret::from("other"),
            Some(good),
            b"Hello, World!"
        ));
    }

    #[test]
    fn tokens_compare_whole() {
        let secret = Secret::from("t0ken");
        assert!(same(b"t0ken", &secret));
        assert!(!same(b"t0ke", &secret));
        assert!(!same(b"t0kenx", &secret));
        assert!(!same(b"", &secret));
    }
}
