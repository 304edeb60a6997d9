//! The Git smart-HTTP endpoints of a mirrored repository: `GET …/info/refs` and
//! `POST …/git-upload-pack` (and `…/info/lfs/…`, passed to [`super::lfs`]).
//!
//! A request is resolved to its mirror and upstream, the mirror is ensured through the mirror
//! store (created, synced, or its client authorized), and the answer comes from
//! [`upload_pack`]: a ref listing at once, a pack through [`super::answer`]. A want-miss —
//! `upload_pack` reports wants the mirror lacks — syncs the mirror first. A mirror whose
//! creation takes long is answered from the upstream's listing meanwhile, and its fetch shows
//! the creation's progress ([`first_request`]).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tracing::{field, Instrument, Span};

use super::answer::{self, Slots};
use super::auth::{fetch_source, upstream_credentials};
use super::error::Error;
use super::{body, lfs, streamed, AppState, Refused};
use crate::mirror::{self, Freshness, Status};
use crate::protocol::pktline;
use crate::repo::{self, Service, Snapshot, Target};
use crate::upload_pack::{self, Version};

/// A resolved request for a mirrored repository.
pub(super) struct Mirrored {
    pub(super) target: Target,
    /// The upstream repository URL.
    pub(super) url: String,
    /// What may reach the upstream, and who is served.
    pub(super) credentials: mirror::Credentials,
    /// The client's own `Authorization` header.
    pub(super) client_authorization: Option<String>,
    /// The client asked for a listing checked against the upstream (`Cache-Control:
    /// no-cache`, as a child proxy does for a want-miss or a push).
    revalidate: bool,
    /// Keeps the mirror from eviction until the answer has been sent.
    pub(super) lease: mirror::Lease,
}

impl Mirrored {
    pub(super) fn request(&self) -> mirror::Request {
        mirror::Request {
            name: self.target.name.clone(),
            dir: self.target.dir.clone(),
            url: self.url.clone(),
            credentials: self.credentials.clone(),
        }
    }
}

/// Every request that is not one of the proxy's own endpoints: a Git (or LFS) request for
/// `/{host}/{path}/…`. Its outcome is counted here; upload-pack answers, which stream, count
/// theirs when they end.
pub(super) async fn git(State(state): State<AppState>, req: Request) -> Result<Response, Error> {
    let (parts, body) = req.into_parts();
    let mirrored = resolve(&state, &parts).await?;
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

/// The mirror, upstream and credentials of a request.
async fn resolve(state: &AppState, parts: &axum::http::request::Parts) -> Result<Mirrored, Error> {
    let target = repo::resolve(&state.config.mirror_dir, parts.uri.path())?;
    Span::current().record("repo", field::display(&target.name));
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
    let source = fetch_source(state.parent_proxy.as_deref(), upstream);
    let credentials = upstream_credentials(state, &source, client_authorization.as_deref())
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
    Ok(Mirrored {
        lease: state.mirrors.lease(&target.dir),
        url: format!("{}/{path}.git", source.base_url),
        target,
        credentials,
        client_authorization,
        revalidate,
    })
}

async fn route(
    state: &AppState,
    parts: &axum::http::request::Parts,
    mirrored: Mirrored,
    version: Version,
    body: Body,
) -> Result<Response, Error> {
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
        (_, Service::Lfs(lfs_path)) => {
            Span::current().record("command", "lfs");
            let lfs_path = lfs_path.clone();
            lfs::proxy(state, parts, &mirrored, &lfs_path, body).await
        }
        (method, _) => Err(Error::Method(method.clone())),
    }
}

/// The header that tells how a request was served ([`Status`]).
pub(super) const PROXY_STATUS: &str = "x-git-proxy-status";

/// `response` with `X-Git-Proxy-Status: status`, counted.
pub(super) fn with_status(mut response: Response, status: Status) -> Response {
    crate::metrics::served(status.as_str());
    response
        .headers_mut()
        .insert(PROXY_STATUS, HeaderValue::from_static(status.as_str()));
    response
}

async fn info_refs(state: &AppState, m: Mirrored, version: Version) -> Result<Response, Error> {
    Span::current().record("command", "info/refs");
    let (chunks, outcome, status) = match first_request(state, &m).await? {
        Some(First::Creating(listing, _)) => {
            let (answer, outcome) = upload_pack::advertise_refs(&listing, version);
            (vec![answer.into()], outcome, Status::Clone)
        }
        created => {
            let status = match created {
                Some(First::Created(status)) => status,
                _ => {
                    state
                        .mirrors
                        .ensure(&m.request(), Freshness::IfStale)
                        .await?
                }
            };
            let snapshot = snapshot(state, &m).await?;
            state.mirrors.served(&m.target.dir);
            let (chunks, outcome) = upload_pack::advertise(&snapshot, version);
            (chunks, outcome, status)
        }
    };
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
            axum::Extension(outcome),
            body,
        )
            .into_response(),
        status,
    ))
}

/// The mirror's current snapshot; 404 when there is no mirror.
pub(super) async fn snapshot(state: &AppState, m: &Mirrored) -> Result<Arc<Snapshot>, Error> {
    state
        .mirrors
        .snapshot(&m.target.dir)
        .await?
        .ok_or_else(|| Error::NotFound(m.target.name.clone()))
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
    let parsed = upload_pack::Request::parse(version, &bytes);
    // The parsed request is what stays; the body's memory goes back to the budget.
    drop((bytes, budget));
    let request = match parsed {
        Ok(Some(request)) => request,
        Ok(None) => {
            let mut response = pack_response(Body::empty());
            response
                .extensions_mut()
                .insert(upload_pack::Outcome::Empty);
            return Ok(response);
        }
        Err(e) if e.is_malformed() => return Err(Error::Malformed(e)),
        Err(e) => {
            let mut out = Vec::new();
            pktline::err(&mut out, &e.to_string());
            let mut response = pack_response(Body::from(out));
            response.extensions_mut().insert(Refused(e.to_string()));
            return Ok(response);
        }
    };
    span.record("command", request.command());
    // A mirror not created yet: a listing, or a fetch that can be shown progress, does not
    // wait for the creation (see `first_request`). A child proxy's listing that asks for the
    // upstream's latest refs (`revalidate`) waits.
    let early = (request.ls_refs().is_some() && !m.revalidate)
        || (!repo::exists(&m.target.dir) && request.may_answer_early());
    let first = if early {
        first_request(&state, &m).await?
    } else {
        None
    };
    let mut status = if let Some(First::Creating(listing, creation)) = first {
        if let Some(args) = request.ls_refs() {
            let (answer, outcome) = upload_pack::ls_refs_of(&listing, args);
            crate::metrics::request("ls-refs", "ok");
            let mut response = pack_response(Body::from(answer));
            response.extensions_mut().insert(outcome);
            return Ok(with_status(response, Status::Clone));
        }
        if let Some(acks) = request.nothing_in_common() {
            let mut response = pack_response(Body::from(acks));
            response
                .extensions_mut()
                .insert(upload_pack::Outcome::Acks { common: 0 });
            return Ok(with_status(response, Status::Clone));
        }
        if let Some((preamble, resolved)) = request.early_answer(&listing) {
            let job = answer::Job {
                mirrored: m,
                request: resolved.unwrap_or(request),
                preamble_sent: true,
                status: Status::Clone,
                arrived,
            };
            let wait = answer::Wait::Creation(creation);
            let stream = answer::wait_then_pack(state, job, preamble, wait, span);
            return Ok(streamed(with_status(pack_response(stream), Status::Clone)));
        }
        state
            .mirrors
            .ensure(&m.request(), Freshness::IfStale)
            .await?
    } else if let Some(First::Created(status)) = first {
        status
    } else if request.ls_refs().is_some() {
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
    if let Some(args) = request.ls_refs() {
        state.mirrors.served(&m.target.dir);
        let (answer, outcome) = upload_pack::ls_refs(&snapshot, args);
        crate::metrics::request("ls-refs", "ok");
        let mut response = pack_response(Body::from(answer));
        response.extensions_mut().insert(outcome);
        return Ok(with_status(response, status));
    }
    // A want-miss: the client knows objects the mirror does not have yet. Sync, then serve
    // what we have; the sync checks the client again afterwards, as it may have found the
    // upstream private.
    let missing = want_miss(&snapshot, &request).await?;
    if !missing.is_empty() {
        tracing::debug!(
            refs = missing.refs.len(),
            objects = missing.objects.len(),
            "want-miss"
        );
        if let Some(preamble) = request.early_preamble() {
            // The client may wait a while: answer now and show progress during the sync.
            let job = answer::Job {
                mirrored: m,
                request,
                preamble_sent: true,
                status: Status::Sync,
                arrived,
            };
            let stream = answer::wait_then_pack(state, job, preamble, answer::Wait::Sync, span);
            return Ok(streamed(with_status(pack_response(stream), Status::Sync)));
        }
        status = state
            .mirrors
            .ensure(&m.request(), Freshness::SyncedAfter(arrived))
            .await?;
        snapshot = self::snapshot(&state, &m).await?;
    }
    let slots = Slots::acquire(&state).await?;
    let job = answer::Job {
        mirrored: m,
        request,
        preamble_sent: false,
        status,
        arrived,
    };
    let stream = answer::start(&state, job, snapshot, slots, span);
    Ok(streamed(with_status(pack_response(stream), status)))
}

/// What `request` wants that the mirror lacks ([`upload_pack::Missing`]); its object lookups,
/// when there are any, run on a blocking thread.
pub(super) async fn want_miss(
    snapshot: &Arc<Snapshot>,
    request: &upload_pack::Request,
) -> Result<upload_pack::Missing, Error> {
    let wants = request.wants(snapshot);
    if !wants.needs_lookup() {
        return Ok(wants.missing(snapshot));
    }
    let snapshot = Arc::clone(snapshot);
    tokio::task::spawn_blocking(move || wants.missing(&snapshot))
        .await
        .map_err(|e| Error::Internal(e.to_string()))
}

/// An upload-pack answer: `body` with its content type.
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

/// How long a request for a mirror that does not exist yet waits for its creation before it
/// is answered from the upstream's listing instead: a quick creation is served as any other
/// mirror, a slow one is not a silent wait (the fetch that follows shows its progress).
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// A request's view of a mirror that did not exist when it arrived.
enum First {
    /// The mirror was created (or another request's creation ended) within [`PATIENCE`].
    Created(Status),
    /// It is still being created: the upstream's refs as the client may see them
    /// ([`mirror::Mirrors::preview`]), and the creation.
    Creating(
        Arc<crate::protocol::advert::Refs>,
        tokio::task::JoinHandle<Result<Status, mirror::Error>>,
    ),
}

/// For a mirror that does not exist: start creating it (or join the creation under way), and
/// wait up to [`PATIENCE`] for it, unless this client has been answered from the upstream's
/// listing already (its clone is under way). `None` when the mirror exists.
///
/// The client is checked as a creation checks it before it is answered from the listing: a
/// client the upstream refuses gets the same refusal, and triggers no work it could not
/// trigger before (the creation is the one its request always started).
async fn first_request(state: &AppState, m: &Mirrored) -> Result<Option<First>, Error> {
    if repo::exists(&m.target.dir) {
        return Ok(None);
    }
    let request = m.request();
    let previewed = state.mirrors.previewed(&request);
    let mirrors = Arc::clone(&state.mirrors);
    let creating = request.clone();
    let mut creation = tokio::spawn(
        async move {
            let result = mirrors.ensure(&creating, Freshness::IfStale).await;
            if let Err(e) = &result {
                tracing::info!(error = %e, "mirror creation failed");
            }
            result
        }
        .in_current_span(),
    );
    if !previewed {
        if let Ok(joined) = tokio::time::timeout(PATIENCE, &mut creation).await {
            let status = joined.map_err(|e| Error::Internal(e.to_string()))??;
            return Ok(Some(First::Created(status)));
        }
    }
    // The creation may end while the upstream is listed for the preview: then its outcome
    // answers (a failure, or shutdown, is not hidden behind a listing).
    let preview = state.mirrors.preview(&request);
    tokio::pin!(preview);
    tokio::select! {
        listing = &mut preview => match listing {
            Ok(listing) => Ok(Some(First::Creating(listing, creation))),
            Err(e) => {
                // Refused: its wait for the creation ends here (a creation it started goes on).
                creation.abort();
                Err(e.into())
            }
        },
        joined = &mut creation => {
            let status = joined.map_err(|e| Error::Internal(e.to_string()))??;
            Ok(Some(First::Created(status)))
        }
    }
}
