//! The upstream side: fetching from the real repository with gitoxide into a local bare
//! repository, and checking whether credentials are accepted.
//!
//! Everything here is blocking (gix's HTTP transport is) and runs on blocking threads. No
//! `git` process is started: credentials come from the caller as an `Authorization` header,
//! never from credential helpers, and nothing is written to the repository's configuration.

pub mod allowlist;
pub mod credentials;
pub mod progress;
pub mod tls;

pub use allowlist::{Upstream, Upstreams};
pub use progress::Progress;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gix::bstr::BString;
use gix::protocol::handshake::Ref as RemoteRef;
use gix::protocol::transport::client::blocking_io::http;
use gix::remote::Direction;
use gix::ObjectId;

/// Timeouts and identity for upstream traffic.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// A transfer slower than 1 byte/s for this long is aborted.
    pub stall_timeout: Duration,
    /// The trust roots of HTTPS upstreams.
    pub tls: crate::upstream::tls::ClientTls,
}

/// Why talking to the upstream failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The upstream wants credentials we do not have, or rejected the ones we sent.
    #[error("the upstream requires authentication, or rejected the credentials")]
    AuthRequired,
    /// The upstream has no such repository (or hides it: HTTP 404).
    #[error("the upstream has no such repository")]
    NotFound,
    /// The upstream could not be reached (name resolution, connection refused, TLS).
    #[error("the upstream is unreachable: {0}")]
    Unreachable(String),
    /// An `https://` upstream answered in plain HTTP: an `ALLOWED_UPSTREAMS` entry without a
    /// scheme (`host:port`) is fetched over HTTPS, and this server needs `http://`.
    #[error(
        "{origin} answers in plain HTTP, not HTTPS: write it as http://{host} in \
         ALLOWED_UPSTREAMS (or PARENT_PROXY): {detail}"
    )]
    PlainHttp {
        /// `https://host[:port]`, as it was tried.
        origin: String,
        /// `host[:port]`.
        host: String,
        /// The TLS error chain.
        detail: String,
    },
    /// The upstream did not answer in time.
    #[error("the upstream timed out: {0}")]
    TimedOut(String),
    /// The upstream answered with an error, or the transfer failed.
    #[error("{0}")]
    Failed(String),
    /// The local repository could not be prepared or updated.
    #[error("local repository: {0}")]
    Local(String),
    /// The local disk is full (or the quota spent) while writing what was fetched.
    #[error("no space left on the disk: {0}")]
    NoSpace(String),
    /// The work was stopped.
    #[error("interrupted")]
    Interrupted,
}

/// The upstream's refs, from one ref listing.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Every ref the upstream advertised (except `HEAD`), with the object it points to.
    pub refs: Vec<(BString, ObjectId)>,
    /// The branch the upstream's `HEAD` points to, if it said.
    pub head: Option<BString>,
    /// For the annotated tags among `refs`, the object each finally points to, as far as the
    /// upstream said.
    pub peeled: std::collections::HashMap<BString, ObjectId>,
    /// The repository URL the listing was redirected to (within the allowed upstreams, see
    /// [`ListingClient`]), which fetches use: they follow no redirect themselves.
    pub url: Option<String>,
}

impl Listing {
    /// The refs as a mirror made from this listing would advertise them: `HEAD` first (or
    /// unborn), then every ref sorted by name, annotated tags peeled as far as the upstream
    /// said.
    pub fn advertised(&self) -> crate::protocol::advert::Refs {
        use crate::protocol::Ref;
        let mut out = crate::protocol::advert::Refs::default();
        let mut refs: Vec<Ref> = self
            .refs
            .iter()
            .filter(|(name, _)| name.len() <= crate::repo::MAX_REF_NAME_LEN)
            .map(|(name, id)| Ref {
                name: name.clone(),
                target: *id,
                peeled: self.peeled.get(name).copied(),
                symref_target: None,
            })
            .collect();
        refs.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(head) = &self.head {
            match refs.binary_search_by(|r| r.name.cmp(head)) {
                Ok(i) => out.refs.push(Ref {
                    name: "HEAD".into(),
                    symref_target: Some(head.clone()),
                    ..refs[i].clone()
                }),
                Err(_) => out.unborn_head = Some(head.clone()),
            }
        }
        out.refs.extend(refs);
        out
    }
}

/// Which refs a fetch updates.
#[derive(Debug, Clone)]
pub enum Refs {
    /// `+refs/*:refs/*`: every ref, for a new mirror.
    All,
    /// Only these refs (full names), each mapped onto itself: gix locks every ref it maps, so
    /// unchanged refs are left out.
    Only(Vec<BString>),
}

/// List the upstream's refs (one handshake and ref listing, no objects). `dir` is any local
/// repository; nothing is written to it. `authorization` is the value of an `Authorization`
/// header to send, if any.
pub fn list(
    dir: &Path,
    url: &str,
    authorization: Option<&str>,
    opts: &Options,
) -> Result<Listing, Error> {
    let repo = open(dir)?;
    let remote =
        remote(&repo, url, ["+refs/*:refs/*"])?.with_fetch_tags(gix::remote::fetch::Tags::None);
    let auth_asked = Arc::new(AtomicBool::new(false));
    let connection = connect(&remote, authorization, opts, &auth_asked)?;
    let (map, _handshake) = connection
        .ref_map(
            gix::progress::Discard,
            gix::remote::ref_map::Options {
                prefix_from_spec_as_filter_on_remote: false,
                ..Default::default()
            },
        )
        .map_err(|e| classify(e, url, &auth_asked, &AtomicBool::new(false)))?;
    Ok(listing(map.remote_refs))
}

fn listing(remote_refs: Vec<RemoteRef>) -> Listing {
    let mut out = Listing::default();
    for r in remote_refs {
        let (name, id, head_target) = match r {
            RemoteRef::Direct {
                full_ref_name,
                object,
            } => (full_ref_name, Some(object), None),
            RemoteRef::Peeled {
                full_ref_name,
                tag,
                object,
            } => {
                out.peeled.insert(full_ref_name.clone(), object);
                (full_ref_name, Some(tag), None)
            }
            RemoteRef::Symbolic {
                full_ref_name,
                target,
                tag,
                object,
            } => (full_ref_name, Some(tag.unwrap_or(object)), Some(target)),
            RemoteRef::Unborn {
                full_ref_name,
                target,
            } => (full_ref_name, None, Some(target)),
        };
        if name == "HEAD" {
            out.head = head_target;
        } else if let Some(id) = id {
            out.refs.push((name, id));
        }
    }
    out
}

impl Error {
    /// What a client may be told: the kind of failure, without the URLs, local paths and
    /// messages of the cause chain (the log has those).
    pub fn cause(&self) -> &'static str {
        match self {
            Error::AuthRequired => "the upstream requires authentication",
            Error::NotFound => "the upstream has no such repository",
            Error::Unreachable(_) => "the upstream is unreachable",
            Error::PlainHttp { .. } => {
                "the upstream answers in plain HTTP, not HTTPS: its ALLOWED_UPSTREAMS entry needs \
                 http://"
            }
            Error::TimedOut(_) => "the upstream timed out",
            Error::Failed(_) => "the upstream failed",
            Error::Local(_) => "internal error (see the proxy's log)",
            Error::NoSpace(_) => "no space left on the proxy's disk",
            Error::Interrupted => "interrupted",
        }
    }

    /// A local failure: [`Error::NoSpace`] when the disk is full, else [`Error::Local`].
    pub(crate) fn local(e: &(dyn std::error::Error + 'static), message: String) -> Error {
        if crate::is_no_space(e) {
            Error::NoSpace(message)
        } else {
            Error::Local(message)
        }
    }

    /// A failed HTTP request, told apart as the client needs it: unreachable, timed out, or
    /// otherwise failed, with the whole cause chain (reqwest's own message names only the URL).
    pub(crate) fn from_request(e: &reqwest::Error) -> Error {
        let message = crate::error_chain(e);
        if let Some(plain) = e.url().and_then(|url| plain_http(url, &message)) {
            plain
        } else if e.is_timeout() {
            Error::TimedOut(message)
        } else if e.is_connect() {
            Error::Unreachable(message)
        } else {
            Error::Failed(message)
        }
    }
}

/// [`Error::PlainHttp`] when the request to `url` failed because the server answered a TLS
/// handshake in plain HTTP: rustls reads its `HTTP/1.1 400` as a record of an unknown type
/// ("received corrupt message of type InvalidContentType").
fn plain_http(url: &reqwest::Url, message: &str) -> Option<Error> {
    if url.scheme() != "https" || !message.contains("corrupt message of type InvalidContentType") {
        return None;
    }
    let host = url.host_str()?;
    let host = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    Some(Error::PlainHttp {
        origin: format!("https://{host}"),
        host,
        detail: message.to_owned(),
    })
}

fn classify(e: gix::Error, url: &str, auth_asked: &AtomicBool, interrupt: &AtomicBool) -> Error {
    let plain = reqwest::Url::parse(url)
        .ok()
        .and_then(|url| plain_http(&url, &format!("{e:#}")));
    if interrupt.load(Ordering::Relaxed) {
        Error::Interrupted
    } else if auth_asked.load(Ordering::Relaxed) {
        Error::AuthRequired
    } else if let Some(plain) = plain {
        plain
    } else if crate::is_no_space(&e) {
        Error::NoSpace(format!("{e:#}"))
    } else {
        // The whole cause chain: "Failed to consume the pack" alone hides a full disk.
        Error::Failed(format!("{e:#}"))
    }
}

/// What a fetch did.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// The refs the upstream listed for this fetch (only the asked ones with [`Refs::Only`]).
    pub listing: Listing,
    /// Bytes the fetch added to the repository's packs (0 when nothing was new).
    pub pack_bytes: u64,
}

/// Fetch `refs` from `url` into the bare repository at `dir` and update them, counting what
/// arrives into `progress`.
pub fn fetch(
    dir: &Path,
    url: &str,
    refs: &Refs,
    authorization: Option<&str>,
    opts: &Options,
    progress: &Arc<Progress>,
    interrupt: &AtomicBool,
) -> Result<Fetched, Error> {
    let repo = open(dir)?;
    let specs: Vec<String> = match refs {
        Refs::All => vec!["+refs/*:refs/*".into()],
        Refs::Only(names) => names.iter().map(|n| format!("+{n}:{n}")).collect(),
    };
    if specs.is_empty() {
        return Ok(Fetched::default());
    }
    let remote = remote(&repo, url, specs.iter().map(String::as_str))?
        .with_fetch_tags(gix::remote::fetch::Tags::None);
    let auth_asked = Arc::new(AtomicBool::new(false));
    let connection = connect(&remote, authorization, opts, &auth_asked)?;
    let prepared = connection
        .prepare_fetch(
            gix::progress::Discard,
            gix::remote::ref_map::Options {
                // Exact names: the upstream lists only those. `+refs/*` must list everything,
                // `HEAD` included.
                prefix_from_spec_as_filter_on_remote: matches!(refs, Refs::Only(_)),
                ..Default::default()
            },
        )
        .map_err(|e| classify(e, url, &auth_asked, interrupt))?;
    let remote_refs = prepared.ref_map().remote_refs.clone();
    let has_refs = remote_refs
        .iter()
        .any(|r| !matches!(r, RemoteRef::Unborn { .. }));
    let mut out = Fetched {
        listing: listing(remote_refs),
        pack_bytes: 0,
    };
    if has_refs {
        let before = pack_bytes(dir);
        prepared
            .with_write_packed_refs_only(true)
            .receive(progress.node(), interrupt)
            .map_err(|e| classify(e, url, &auth_asked, interrupt))?;
        out.pack_bytes = pack_bytes(dir).saturating_sub(before);
    }
    Ok(out)
}

/// The size of the pack files of the repository at `dir`.
fn pack_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("objects/pack"))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".pack"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn open(dir: &Path) -> Result<gix::Repository, Error> {
    gix::open_opts(dir, gix::open::Options::isolated()).map_err(|e| Error::Local(e.to_string()))
}

/// An anonymous remote for `url` fetching `specs`: nothing is written to the configuration.
fn remote<'r, 's>(
    repo: &'r gix::Repository,
    url: &str,
    specs: impl IntoIterator<Item = &'s str>,
) -> Result<gix::Remote<'r>, Error> {
    repo.remote_at(url)
        .map_err(|e| Error::Failed(format!("invalid upstream URL {url}: {e}")))?
        .with_refspecs(specs, Direction::Fetch)
        .map_err(|e| Error::Local(e.to_string()))
}

type Connection<'a, 'repo> = gix::remote::Connection<
    'a,
    'static,
    'repo,
    Box<dyn gix::protocol::transport::client::blocking_io::Transport + Send>,
>;

/// Connect for fetching with our timeouts and header-only credentials; `auth_asked` is set if
/// the upstream asks for credentials.
fn connect<'a, 'repo>(
    remote: &'a gix::Remote<'repo>,
    authorization: Option<&str>,
    opts: &Options,
    auth_asked: &Arc<AtomicBool>,
) -> Result<Connection<'a, 'repo>, Error> {
    Ok(remote
        .connect(Direction::Fetch)
        .map_err(|e| Error::Failed(e.to_string()))?
        .with_credentials(credentials(Arc::clone(auth_asked)))
        .with_transport_options(Box::new(transport_options(authorization, opts))))
}

/// Credentials come only as headers from the caller: when the upstream asks for more, note it
/// and refuse, rather than running a credential helper or prompting.
fn credentials(
    asked: Arc<AtomicBool>,
) -> impl FnMut(
    gix::credentials::helper::Action,
) -> gix::Result<Option<gix::credentials::protocol::Outcome>> {
    move |action| {
        if let gix::credentials::helper::Action::Get(_) = action {
            asked.store(true, Ordering::Relaxed);
            return Err(gix::error::message("the upstream asked for credentials").into());
        }
        Ok(None)
    }
}

fn transport_options(authorization: Option<&str>, opts: &Options) -> http::Options {
    // The reqwest backend takes its timeouts from the client builder only; its blocking client
    // applies `timeout` to every connect, read and write, which makes it a stall timeout.
    let (connect, stall) = (opts.connect_timeout, opts.stall_timeout);
    let tls = opts.tls.clone();
    let backend = http::reqwest::Options {
        configure_client: Some(Box::new(move |builder| {
            Ok(tls.blocking_client(builder.connect_timeout(connect).timeout(stall)))
        })),
        configure_request: None,
    };
    http::Options {
        backend: Some(Arc::new(std::sync::Mutex::new(backend))),
        extra_headers: authorization
            .map(|a| vec![format!("Authorization: {a}")])
            .unwrap_or_default(),
        connect_timeout: Some(opts.connect_timeout),
        low_speed_limit_bytes_per_second: 1,
        low_speed_time_seconds: opts.stall_timeout.as_secs().max(1),
        user_agent: Some(crate::protocol::AGENT.into()),
        // gix would follow the first redirect to any host: only the ref listing follows, to
        // the allowed upstreams, and the fetch goes where it led.
        follow_redirects: http::options::FollowRedirects::None,
        ..Default::default()
    }
}

/// Redirects a ref listing follows at most.
const MAX_REDIRECTS: usize = 10;

/// The HTTP client of ref listings ([`ls_refs`]), and where their redirects may lead: to one of
/// the allowed origins (`scheme://host[:port]`: the `ALLOWED_UPSTREAMS` and `PARENT_PROXY`),
/// never from `https` to `http`, never to another origin with credentials, at most
/// `MAX_REDIRECTS`. An upstream cannot send the proxy, or a client's credentials, elsewhere.
#[derive(Debug, Clone)]
pub struct ListingClient {
    client: reqwest::Client,
    allowed: Arc<Vec<reqwest::Url>>,
}

impl ListingClient {
    /// A client with the timeouts of `opts`, following redirects to the `allowed` origins only.
    pub fn new(opts: &Options, allowed: &[String]) -> reqwest::Result<Self> {
        let allowed = allowed
            .iter()
            .filter_map(|a| reqwest::Url::parse(a).ok())
            .collect();
        let client = opts
            .tls
            .client(reqwest::Client::builder())
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.stall_timeout)
            .user_agent(crate::protocol::AGENT)
            // Followed in `ls_refs`, which re-sends the POST (reqwest would turn a 301 or 302
            // into a GET without a body) and checks where it goes.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(ListingClient {
            client,
            allowed: Arc::new(allowed),
        })
    }

    /// Where the redirect `response` to a request for `from` leads, if it may be followed
    /// (`with_credentials`: the request carries an `Authorization`).
    fn redirect(
        &self,
        from: &reqwest::Url,
        response: &reqwest::Response,
        with_credentials: bool,
    ) -> Result<reqwest::Url, Error> {
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| from.join(l).ok())
            .ok_or_else(|| Error::Failed(format!("a redirect from {from} without a location")))?;
        let origin = location.origin().ascii_serialization();
        let refuse = |why: &str| {
            Err(Error::Failed(format!(
                "refusing a redirect to {origin}: {why}"
            )))
        };
        if from.scheme() == "https" && location.scheme() != "https" {
            refuse("not https")
        } else if !self.allowed.iter().any(|a| a.origin() == location.origin()) {
            refuse("not in ALLOWED_UPSTREAMS")
        } else if with_credentials && location.origin() != from.origin() {
            refuse("the credentials are for another host")
        } else {
            Ok(location)
        }
    }
}

/// Why the one-request listing did not work.
#[derive(Debug, thiserror::Error)]
pub enum LsRefsError {
    /// The upstream does not answer a bare v2 `ls-refs` POST (an old server, a dumb one): list
    /// with gix's handshake instead.
    #[error("the upstream does not answer a bare ls-refs request: {0}")]
    Unsupported(String),
    /// A failure that the handshake would meet too.
    #[error(transparent)]
    Failed(Error),
}

/// The largest `ls-refs` answer read (about 64 bytes a ref): larger listings fall back to gix.
const MAX_LS_REFS_BYTES: usize = 64 * 1024 * 1024;

/// List the upstream's refs with one request: a protocol v2 `ls-refs` POST, without the
/// capability advertisement that gix's handshake fetches first. Smart HTTP is stateless, so
/// servers that speak v2 answer it directly; a no-op sync then costs a single round trip.
/// `revalidate` asks a parent proxy to check its own upstream first (`Cache-Control:
/// no-cache`), as a want-miss or a push notice needs; other upstreams ignore it.
pub async fn ls_refs(
    client: &ListingClient,
    url: &str,
    authorization: Option<&str>,
    revalidate: bool,
    opts: &Options,
) -> Result<Listing, LsRefsError> {
    use crate::protocol::pktline;
    let mut body = Vec::new();
    pktline::text(&mut body, "command=ls-refs");
    pktline::text(&mut body, &format!("agent={}", crate::protocol::AGENT));
    pktline::text(&mut body, "object-format=sha1");
    pktline::delim(&mut body);
    pktline::text(&mut body, "symrefs");
    pktline::text(&mut body, "peel");
    pktline::text(&mut body, "unborn");
    pktline::flush(&mut body);
    let failed = |e: reqwest::Error| LsRefsError::Failed(Error::from_request(&e));
    let mut endpoint = reqwest::Url::parse(&format!("{url}/git-upload-pack")).map_err(|e| {
        LsRefsError::Failed(Error::Failed(format!("invalid upstream URL {url}: {e}")))
    })?;
    let mut redirects = 0;
    let mut response = loop {
        let mut request = client
            .client
            .post(endpoint.clone())
            .header("Git-Protocol", "version=2")
            .header("Content-Type", "application/x-git-upload-pack-request")
            .header("Accept", "application/x-git-upload-pack-result")
            // A whole listing, not a stall: an upstream trickling bytes cannot hold the sync.
            .timeout(opts.connect_timeout + opts.stall_timeout)
            .body(body.clone());
        if let Some(a) = authorization {
            request = request.header("Authorization", a);
        }
        if revalidate {
            request = request.header("Cache-Control", "no-cache");
        }
        let response = request.send().await.map_err(failed)?;
        if !response.status().is_redirection() {
            break response;
        }
        redirects += 1;
        if redirects > MAX_REDIRECTS {
            return Err(LsRefsError::Failed(Error::Failed(format!(
                "more than {MAX_REDIRECTS} redirects from {url}"
            ))));
        }
        endpoint = client
            .redirect(&endpoint, &response, authorization.is_some())
            .map_err(LsRefsError::Failed)?;
    };
    // Only a 401 asks for credentials; anything else (a 403 from a firewall, a rate limit) is
    // left to gix's handshake, which tells them apart as it always did.
    match response.status().as_u16() {
        200 => {}
        401 => return Err(LsRefsError::Failed(Error::AuthRequired)),
        404 => return Err(LsRefsError::Failed(Error::NotFound)),
        status => return Err(LsRefsError::Unsupported(format!("HTTP {status}"))),
    }
    // The fetch goes where the listing was sent, as git sends every request after the first to
    // where that one was redirected.
    let redirected = match redirects {
        0 => None,
        _ => match endpoint.as_str().strip_suffix("/git-upload-pack") {
            Some(base) => Some(base.to_owned()),
            None => {
                return Err(LsRefsError::Failed(Error::Failed(format!(
                    "redirected to {endpoint}, which is not a repository's upload-pack"
                ))))
            }
        },
    };
    let mut answer = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if answer.len() + chunk.len() > MAX_LS_REFS_BYTES {
            return Err(LsRefsError::Unsupported("a very large ref listing".into()));
        }
        answer.extend_from_slice(&chunk);
    }
    let mut listing = parse_ls_refs(&answer)?;
    listing.url = redirected;
    Ok(listing)
}

/// Read an `ls-refs` answer: `<oid> <name>[ symref-target:<ref>][ peeled:<oid>]` lines (and
/// `unborn HEAD`).
fn parse_ls_refs(answer: &[u8]) -> Result<Listing, LsRefsError> {
    use crate::protocol::pktline::{Line, Reader};
    use gix::bstr::ByteSlice;
    let unsupported = |what: &str| LsRefsError::Unsupported(what.to_owned());
    let mut out = Listing::default();
    let mut reader = Reader::new(answer);
    loop {
        let line = match reader.read() {
            Ok(Some(Line::Data(line))) => line,
            Ok(Some(Line::Flush)) => return Ok(out),
            Ok(_) => return Err(unsupported("not an ls-refs answer")),
            Err(e) => return Err(unsupported(&e.to_string())),
        };
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if let Some(message) = line.strip_prefix(b"ERR ") {
            return Err(unsupported(&message.to_str_lossy()));
        }
        let mut fields = line.split_str(" ");
        let (Some(oid), Some(name)) = (fields.next(), fields.next()) else {
            return Err(unsupported("not an ls-refs answer"));
        };
        let (mut symref, mut peeled) = (None, None);
        for field in fields {
            if let Some(target) = field.strip_prefix(b"symref-target:") {
                symref = Some(target);
            } else if let Some(id) = field.strip_prefix(b"peeled:") {
                peeled =
                    Some(ObjectId::from_hex(id).map_err(|_| unsupported("not an ls-refs answer"))?);
            }
        }
        if name == b"HEAD" {
            out.head = symref.map(BString::from);
            continue;
        }
        let id = ObjectId::from_hex(oid).map_err(|_| unsupported("not an ls-refs answer"))?;
        // A name git would refuse cannot become a refspec either: skip it, as gix's listing
        // would fail on it.
        if gix::refs::FullName::try_from(BString::from(name)).is_err() {
            tracing::warn!(name = %name.to_str_lossy(), "skipping an invalid ref name from the upstream");
            continue;
        }
        if let Some(peeled) = peeled {
            out.peeled.insert(name.into(), peeled);
        }
        out.refs.push((name.into(), id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pktline;

    #[test]
    fn redirects_lead_only_to_allowed_origins_and_keep_credentials_at_home() {
        let opts = Options {
            connect_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(1),
            tls: crate::upstream::tls::ClientTls::system(),
        };
        let allowed = [
            "https://a.example".to_owned(),
            "http://127.0.0.1:9".to_owned(),
        ];
        let client = ListingClient::new(&opts, &allowed).unwrap();
        let follow = |from: &str, location: &str, credentials: bool| {
            let response = axum::http::Response::builder()
                .status(302)
                .header("location", location)
                .body("")
                .unwrap();
            let from = reqwest::Url::parse(from).unwrap();
            client
                .redirect(&from, &reqwest::Response::from(response), credentials)
                .map(|u| u.to_string())
        };
        let a = "https://a.example/o/r.git/git-upload-pack";
        assert_eq!(
            follow(a, "/n/r.git/git-upload-pack", true).unwrap(),
            "https://a.example/n/r.git/git-upload-pack",
            "a relative location, same origin, credentials kept"
        );
        for refused in [
            "https://evil.example/o/r.git/git-upload-pack",
            "https://a.example.evil.example/o/r.git/git-upload-pack",
            "https://a.example:8443/o/r.git/git-upload-pack",
            "http://a.example/o/r.git/git-upload-pack",
            "http://127.0.0.1:9/o/r.git/git-upload-pack",
            "file:///etc/passwd",
        ] {
            assert!(follow(a, refused, false).is_err(), "{refused}");
        }
        let local = "http://127.0.0.1:9/o/r.git/git-upload-pack";
        assert!(follow(local, a, false).is_ok(), "to another allowed origin");
        assert!(
            follow(local, a, true).is_err(),
            "credentials do not go to another origin"
        );
        let response = reqwest::Response::from(
            axum::http::Response::builder()
                .status(302)
                .body("")
                .unwrap(),
        );
        let from = reqwest::Url::parse(a).unwrap();
        assert!(
            client.redirect(&from, &response, false).is_err(),
            "no location"
        );
    }

    #[test]
    fn ls_refs_answers_are_read_and_anything_else_falls_back() {
        let a = "a".repeat(40);
        let mut answer = Vec::new();
        pktline::text(
            &mut answer,
            &format!("{a} HEAD symref-target:refs/heads/main"),
        );
        pktline::text(&mut answer, &format!("{a} refs/heads/main"));
        pktline::text(
            &mut answer,
            &format!("{} refs/tags/v1 peeled:{a}", "b".repeat(40)),
        );
        pktline::text(&mut answer, &format!("{a} refs/heads/no..way"));
        pktline::flush(&mut answer);
        let listing = parse_ls_refs(&answer).unwrap();
        assert_eq!(listing.head, Some("refs/heads/main".into()));
        assert_eq!(listing.refs.len(), 2);
        assert_eq!(listing.refs[1].0, "refs/tags/v1");
        assert_eq!(
            listing.peeled.get(&BString::from("refs/tags/v1")),
            Some(&ObjectId::from_hex(a.as_bytes()).unwrap())
        );

        let mut unborn = Vec::new();
        pktline::text(&mut unborn, "unborn HEAD symref-target:refs/heads/trunk");
        pktline::flush(&mut unborn);
        let listing = parse_ls_refs(&unborn).unwrap();
        assert_eq!(listing.head, Some("refs/heads/trunk".into()));
        assert!(listing.refs.is_empty());

        for bad in [
            b"001e# service=git-upload-pack\n0000".to_vec(),
            b"0012ERR no v2 here".to_vec(),
            b"000bgarbage".to_vec(),
            b"zzzz".to_vec(),
            Vec::new(),
        ] {
            assert!(
                matches!(parse_ls_refs(&bad), Err(LsRefsError::Unsupported(_))),
                "{}",
                String::from_utf8_lossy(&bad)
            );
        }
    }
}
