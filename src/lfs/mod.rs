//! The Git LFS object cache: every object crosses the upstream link once, and nothing is
//! served that the upstream did not authorize for the client and repository.
//!
//! Authorization stays the upstream's: every `download` batch request still goes upstream with
//! the client's credentials (or the lent token), and only the objects its answer authorizes
//! get a proxy link ([`sign`]), bound to the repository, OID and size and short-lived; the
//! upstream's own `href` and headers stay here, remembered for the link's lifetime. Per-object
//! errors pass unchanged, so a cached copy never answers for a repository that was refused.
//!
//! A link is served from the [`store`] when the object is there, otherwise from the shared
//! download of [`fetch`]. The HTTP layer (`http::lfs`) only extracts requests, calls
//! [`Cache::batch`] or [`Cache::object`] and maps the result; uploads, `verify` and the locks
//! API do not come here.

pub mod batch;
pub mod fetch;
mod metrics;
pub mod sign;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

pub use metrics::describe as describe_metrics;

/// A SHA-256 object ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Oid(pub [u8; 32]);

impl Oid {
    /// The OID written as git-lfs writes it: 64 lower-case hexadecimal digits.
    pub fn parse(hex: &str) -> Option<Oid> {
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut oid = [0; 32];
        hex::decode_to_slice(hex, &mut oid).ok()?;
        Some(Oid(oid))
    }
}

impl std::fmt::Display for Oid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for Oid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The path, under a repository's LFS URL (`…/info/lfs`), of the proxy's object links.
pub const LINK_PATH: &str = "/info/lfs/cache/";

/// The longest a proxy link lives: GitHub's own links last an hour.
pub const LINK_TTL: Duration = Duration::from_secs(3600);

/// How the cache is set up.
pub struct Settings {
    /// Where objects are stored (`LFS_CACHE_DIR`).
    pub dir: PathBuf,
    /// The store's bound in bytes (`LFS_CACHE_MAX_SIZE`).
    pub max_size: u64,
    /// The links' key (`LFS_URL_KEY`); a random one per process when unset.
    pub url_key: Option<Vec<u8>>,
    /// The longest a link lives (shorter when the upstream's own link expires sooner).
    pub link_ttl: Duration,
    /// Upstream storage: the time to connect.
    pub connect_timeout: Duration,
    /// Upstream storage: the longest wait for a byte.
    pub stall_timeout: Duration,
    /// Upstream storage: the trust roots (`UPSTREAM_CA_FILE` included).
    pub tls: crate::upstream::tls::ClientTls,
}

/// The most upstream actions remembered at once (about 100 batches of 100 objects in flight
/// per node; beyond it, new links still work for objects already stored).
const MAX_ACTIONS: usize = 100_000;

/// The cache.
pub struct Cache {
    store: Arc<store::Store>,
    downloads: Arc<fetch::Downloads>,
    signer: sign::Signer,
    link_ttl: Duration,
    /// The upstream's download actions of live links, by repository and OID.
    actions: parking_lot::Mutex<HashMap<(String, Oid), (SystemTime, batch::Action)>>,
}

/// Why a request of the cache failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A proxy link that is not genuine, or no longer valid.
    #[error(transparent)]
    Link(#[from] sign::Error),
    /// A link path that names no object.
    #[error("not a Git LFS object: {0}")]
    NotAnObject(String),
    /// A valid link to an object that is neither stored nor downloadable any more (its
    /// upstream action was forgotten, e.g. by a restart).
    #[error("Git LFS object {0} is not available here any more: ask the batch API again")]
    Gone(Oid),
    /// A `Range` the object cannot satisfy.
    #[error("range not satisfiable for an object of {0} bytes")]
    Range(u64),
    /// The batch request failed upstream.
    #[error("Git LFS batch request to the upstream failed")]
    Batch(#[source] reqwest::Error),
    /// The upstream's batch answer is larger than the cache reads ([`batch::MAX_ANSWER`]).
    #[error("Git LFS batch answer from the upstream is larger than {max} bytes")]
    BatchTooLarge {
        /// The bound.
        max: usize,
    },
    /// The object's download failed.
    #[error("Git LFS object download failed: {0}")]
    Download(String),
    /// The local disk failed.
    #[error("Git LFS cache: {0}")]
    Local(#[from] std::io::Error),
}

/// The cache's answer to a batch request.
pub enum Batch {
    /// The upstream's answer, rewritten: authorized downloads point to the proxy.
    Rewritten {
        /// The JSON to send.
        body: Vec<u8>,
        /// Objects with a proxy link.
        linked: usize,
    },
    /// An answer that is not a successful batch answer, as received.
    Upstream(reqwest::Response),
    /// A successful answer the cache does not understand (another transfer, say), as read.
    Unchanged {
        /// Its status.
        status: reqwest::StatusCode,
        /// Its headers.
        headers: reqwest::header::HeaderMap,
        /// Its body.
        body: Bytes,
    },
}

/// Where an object's bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The store.
    Hit,
    /// A download this request started.
    Miss,
    /// A download another request had started.
    Shared,
}

impl Source {
    /// The metrics and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Hit => "hit",
            Source::Miss => "miss",
            Source::Shared => "shared",
        }
    }
}

/// An object's answer.
pub struct Object {
    /// The whole object's size.
    pub size: u64,
    /// The bytes sent, `start..end`, when the request had a satisfiable `Range`.
    pub range: Option<(u64, u64)>,
    /// Where they come from.
    pub source: Source,
    /// The bytes.
    pub body: futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>,
}

impl Cache {
    /// Open the cache: the store (removing temporaries), and the client for upstream storage.
    pub fn open(settings: Settings) -> Result<Cache, Error> {
        let store = Arc::new(store::Store::open(&settings.dir, settings.max_size)?);
        let client = settings
            .tls
            .client(reqwest::Client::builder())
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.stall_timeout)
            .redirect(redirect_policy())
            .user_agent(crate::protocol::AGENT)
            .build()
            .map_err(|e| std::io::Error::other(crate::error_chain(&e)))?;
        let downloads = Arc::new(fetch::Downloads::new(
            client,
            Arc::clone(&store),
            settings.stall_timeout,
        ));
        Ok(Cache {
            store,
            downloads,
            signer: sign::Signer::new(settings.url_key.as_deref())?,
            link_ttl: settings.link_ttl,
            actions: Default::default(),
        })
    }

    /// Send the client's `download` batch request upstream and rewrite a successful answer:
    /// the objects it authorizes get links to `{base_url}/{repo}.git/info/lfs/cache/{oid}`.
    pub async fn batch(
        &self,
        repo: &str,
        base_url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Batch, Error> {
        let response = request.send().await.map_err(Error::Batch)?;
        if response.status() != reqwest::StatusCode::OK {
            metrics::batch("upstream");
            return Ok(Batch::Upstream(response));
        }
        if response
            .content_length()
            .is_some_and(|n| n > batch::MAX_ANSWER as u64)
        {
            return Err(Error::BatchTooLarge {
                max: batch::MAX_ANSWER,
            });
        }
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_limited(response, batch::MAX_ANSWER).await?;
        let now = SystemTime::now();
        let link = |oid: &Oid, size: u64, expires: u64| {
            let grant = sign::Grant {
                repo: repo.to_owned(),
                oid: oid.to_string(),
                size,
                expires,
            };
            format!(
                "{base_url}/{repo}.git{LINK_PATH}{oid}?{}",
                self.signer.query(&grant)
            )
        };
        let Some((rewritten, authorized)) = batch::rewrite(&body, now, self.link_ttl, link) else {
            metrics::batch("upstream");
            return Ok(Batch::Unchanged {
                status,
                headers,
                body,
            });
        };
        let linked = authorized.len();
        metrics::batch("rewritten");
        self.remember(repo, authorized, now);
        Ok(Batch::Rewritten {
            body: rewritten,
            linked,
        })
    }

    fn remember(&self, repo: &str, authorized: Vec<batch::Authorized>, now: SystemTime) {
        let ceiling = now + self.link_ttl;
        let mut actions = self.actions.lock();
        if actions.len() + authorized.len() > MAX_ACTIONS {
            actions.retain(|_, (until, _)| *until > now);
        }
        for a in authorized {
            if actions.len() >= MAX_ACTIONS {
                tracing::warn!("too many Git LFS links alive: some misses will be refused");
                break;
            }
            let until = a.action.expires_at.map_or(ceiling, |at| at.min(ceiling));
            actions.insert((repo.to_owned(), a.oid), (until, a.action));
        }
    }

    /// Answer the link `…/info/lfs/cache/{oid}?{query}` for `repo`: from the store, or from
    /// the (shared) upstream download; `range` is the request's `Range` header.
    pub async fn object(
        &self,
        repo: &str,
        oid: &str,
        query: &str,
        range: Option<&str>,
    ) -> Result<Object, Error> {
        use futures_util::StreamExt;
        let now = SystemTime::now();
        let now_secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let grant = self
            .signer
            .check(repo, oid, query, now_secs)
            .inspect_err(|e| {
                metrics::link_refused(e.label());
            })?;
        let oid = Oid::parse(&grant.oid).ok_or_else(|| Error::NotAnObject(grant.oid.clone()))?;
        if let Some(object) = self.stored(&oid, range).await? {
            return Ok(object);
        }
        let action = self
            .actions
            .lock()
            .get(&(repo.to_owned(), oid))
            .filter(|(until, _)| *until > now)
            .map(|(_, action)| action.clone())
            .ok_or(Error::Gone(oid))?;
        let (flight, shared) = match self.downloads.join(oid, grant.size, &action)? {
            fetch::Joined::Stored => {
                return self.stored(&oid, range).await?.ok_or(Error::Gone(oid));
            }
            fetch::Joined::Flight { flight, shared } => (flight, shared),
        };
        let source = if shared { Source::Shared } else { Source::Miss };
        // Wait for the upstream's answer: a refusal or a stall is an error status, not a
        // body cut short.
        let mut progress = flight.progress();
        let started = progress
            .wait_for(|p| *p != fetch::Progress::Connecting)
            .await
            .map(|p| p.clone());
        if let Ok(fetch::Progress::Failed(reason)) = started {
            return Err(Error::Download(reason.to_string()));
        }
        let (start, end, partial) = satisfy(range, flight.size)?;
        let mut body = fetch::read(
            Arc::clone(&flight.file),
            start,
            end,
            Some(flight.progress()),
        )
        .boxed();
        // The first chunk before the status line: a download that fails before any of its
        // bytes went out (its check failed, the upstream broke off) is answered 502 with the
        // reason, not with a connection closed before any answer.
        let body = match body.next().await {
            Some(Err(e)) => return Err(Error::Download(e.to_string())),
            Some(Ok(first)) => futures_util::stream::once(async move { Ok(first) })
                .chain(body)
                .boxed(),
            None => body,
        };
        Ok(answer(flight.size, start, end, partial, source, body))
    }

    /// The stored object's answer, if it is stored.
    async fn stored(&self, oid: &Oid, range: Option<&str>) -> Result<Option<Object>, Error> {
        let store = Arc::clone(&self.store);
        let oid = *oid;
        let opened = tokio::task::spawn_blocking(move || store.open_object(&oid))
            .await
            .map_err(std::io::Error::other)?;
        let Some((file, size)) = opened else {
            return Ok(None);
        };
        let (start, end, partial) = satisfy(range, size)?;
        let body = fetch::read(Arc::new(file), start, end, None);
        Ok(Some(answer(size, start, end, partial, Source::Hit, body)))
    }
}

fn answer(
    size: u64,
    start: u64,
    end: u64,
    partial: bool,
    source: Source,
    body: impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
) -> Object {
    use futures_util::StreamExt;
    metrics::object(source);
    let label = if source == Source::Hit {
        "cache"
    } else {
        "upstream"
    };
    let body = body.inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            metrics::served_bytes(label, chunk.len() as u64);
        }
    });
    Object {
        size,
        range: partial.then_some((start, end)),
        source,
        body: body.boxed(),
    }
}

/// The bytes to send for `range` (a `Range` header) of an object of `size`: `start..end`, and
/// whether it is a partial answer. Only one `bytes` range is honoured; other forms (several
/// ranges, other units) get the whole object, as RFC 9110 §14.2 allows.
fn satisfy(range: Option<&str>, size: u64) -> Result<(u64, u64, bool), Error> {
    let whole = Ok((0, size, false));
    let Some(spec) = range.and_then(|r| r.trim().strip_prefix("bytes=")) else {
        return whole;
    };
    if spec.contains(',') {
        return whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return whole;
    };
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let (start, end) = match (first, last) {
        ("", suffix) => {
            let Some(n) = number(suffix) else {
                return whole;
            };
            if n == 0 {
                return Err(Error::Range(size));
            }
            (size.saturating_sub(n), size)
        }
        (first, "") => {
            let Some(start) = number(first) else {
                return whole;
            };
            (start, size)
        }
        (first, last) => {
            let (Some(start), Some(last)) = (number(first), number(last)) else {
                return whole;
            };
            if last < start {
                return whole;
            }
            (start, last.saturating_add(1).min(size))
        }
    };
    if start >= size {
        return Err(Error::Range(size));
    }
    Ok((start, end, true))
}

/// Read a response body of at most `max` bytes.
async fn read_limited(mut response: reqwest::Response, max: usize) -> Result<Bytes, Error> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(Error::Batch)? {
        if body.len() + chunk.len() > max {
            return Err(Error::BatchTooLarge { max });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Redirects of upstream storage: see [`redirect_refusal`].
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        match redirect_refusal(attempt.previous(), attempt.url()) {
            Some(reason) => attempt.error(reason),
            None => attempt.follow(),
        }
    })
}

/// Why a redirect to `to` after the URLs `previous` (the first is the upstream's `href`) is
/// not followed, if it is not: beyond 10 redirects, from `https` to `http`, or to a loopback,
/// private or link-local address when the storage itself is not on one (as in tests). Host
/// names are judged as written, not as resolved.
fn redirect_refusal(previous: &[reqwest::Url], to: &reqwest::Url) -> Option<&'static str> {
    if previous.len() > 10 {
        return Some("too many redirects");
    }
    if previous
        .last()
        .is_some_and(|from| from.scheme() == "https" && to.scheme() != "https")
    {
        return Some("redirect from https to http");
    }
    if is_internal(to) && !previous.first().is_some_and(is_internal) {
        return Some("redirect to an internal address");
    }
    None
}

fn is_internal(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return true;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => is_internal_v4(ip),
        Ok(std::net::IpAddr::V6(ip)) => {
            ip.is_loopback()
                || ip.is_unspecified()
                || (ip.segments()[0] & 0xfe00) == 0xfc00
                || (ip.segments()[0] & 0xffc0) == 0xfe80
                || ip.to_ipv4_mapped().is_some_and(is_internal_v4)
        }
        Err(_) => host == "localhost" || host.ends_with(".localhost"),
    }
}

fn is_internal_v4(ip: std::net::Ipv4Addr) -> bool {
    ip.is_loopback() || ip.is_private() || ip.is_link_local() || ip.is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let s = |r: &str| satisfy(Some(r), 100).map_err(|e| e.to_string());
        assert_eq!(s("bytes=0-9"), Ok((0, 10, true)));
        assert_eq!(s("bytes=90-"), Ok((90, 100, true)));
        assert_eq!(s("bytes=-10"), Ok((90, 100, true)));
        assert_eq!(s("bytes=-1000"), Ok((0, 100, true)));
        assert_eq!(s("bytes=50-1000"), Ok((50, 100, true)));
        assert!(s("bytes=100-").is_err());
        assert!(s("bytes=-0").is_err());
        for whole in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=5-1",
            "bytes=x-",
            "bytes=-",
        ] {
            assert_eq!(s(whole), Ok((0, 100, false)), "{whole}");
        }
        assert_eq!(satisfy(None, 0).unwrap(), (0, 0, false));
        assert!(satisfy(Some("bytes=0-"), 0).is_err());
    }

    #[test]
    fn oids_are_lower_case_hex() {
        let a = "a".repeat(64);
        assert_eq!(Oid::parse(&a).unwrap().to_string(), a);
        assert!(Oid::parse(&"A".repeat(64)).is_none());
        assert!(Oid::parse(&"a".repeat(63)).is_none());
        assert!(Oid::parse(&"g".repeat(64)).is_none());
    }

    #[test]
    fn storage_redirects() {
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        let public = vec![url("https://storage.example/o")];
        let refused = |previous: &[reqwest::Url], to: &str| redirect_refusal(previous, &url(to));
        assert_eq!(refused(&public, "https://cdn.example/o"), None);
        assert!(refused(&public, "http://cdn.example/o").is_some());
        assert!(refused(&public, "https://127.0.0.1/o").is_some());
        assert!(refused(&public, "https://10.0.0.1/o").is_some());
        let local = vec![url("http://127.0.0.1:9000/o")];
        assert_eq!(refused(&local, "http://127.0.0.1:9001/o"), None);
        assert!(refused(&vec![public[0].clone(); 11], "https://cdn.example/o").is_some());
    }

    #[test]
    fn internal_addresses() {
        let internal = |u: &str| is_internal(&reqwest::Url::parse(u).unwrap());
        assert!(internal("http://127.0.0.1:80/x"));
        assert!(internal("http://10.1.2.3/x"));
        assert!(internal("http://[::1]/x"));
        assert!(internal("http://[fd00::1]/x"));
        assert!(internal("http://localhost/x"));
        assert!(!internal("https://github-cloud.s3.amazonaws.com/x"));
        assert!(!internal("https://140.82.112.3/x"));
    }
}
