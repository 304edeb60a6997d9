//! A real upstream for the tests: `git http-backend` (CGI) behind a small HTTP server on
//! 127.0.0.1, with a request log, optional Basic auth per repository, refs hidden from
//! anonymous requests, and switches to make it fail, stall, slow, redirect, or cut a response
//! short.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// How the upstream behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serve requests.
    Normal,
    /// Answer every request with 500.
    Fail,
    /// Answer nothing until the mode changes, then go on as the new mode says: a hanging
    /// upstream that a test releases when it is done with it, instead of waiting for the
    /// proxy's stall timeout.
    Stall,
    /// Serve upload-pack POST responses only up to this many bytes, then drop the connection.
    CutPacksAfter(usize),
    /// Speak protocol v0 only, as an old server does (the `Git-Protocol` header is ignored).
    V0Only,
    /// Check access, then wait this long before answering (a slow upstream; the access
    /// decision is the one of the moment the request arrived).
    SlowAfterAuth(std::time::Duration),
    /// Wait this long before anything else, refusals included (a slow upstream whose checks
    /// overlap).
    Slow(std::time::Duration),
    /// Answer every request with `302 Found` to the same path and query on this address.
    RedirectTo(SocketAddr),
    /// The same for `GET` requests only (a fetch's handshake; a bare `ls-refs` POST is
    /// served).
    RedirectGetsTo(SocketAddr),
}

/// One received request.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

#[derive(Clone)]
struct Shared {
    root: PathBuf,
    log: Arc<Mutex<Vec<Logged>>>,
    /// A watch, so that stalled requests see the mode change that releases them.
    mode: Arc<tokio::sync::watch::Sender<Mode>>,
    /// Repository path prefix (e.g. `/private`) -> `user:password`.
    auth: Arc<Mutex<HashMap<String, String>>>,
    /// Repository path prefix -> (refs hidden from requests without these credentials
    /// (`uploadpack.hideRefs`), `user:password`).
    hidden: Arc<Mutex<HashMap<String, (String, String)>>>,
    lfs_status: Arc<AtomicUsize>,
    /// The batch API and its storage, once [`Upstream::serve_lfs`] started them.
    lfs: Arc<std::sync::OnceLock<Arc<super::lfs::Lfs>>>,
}

/// The running upstream; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    pub root: tempfile::TempDir,
    shared: Shared,
    background: Option<super::Background>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let root = tempfile::tempdir().expect("upstream root");
        let shared = Shared {
            root: root.path().to_path_buf(),
            log: Default::default(),
            mode: Arc::new(tokio::sync::watch::Sender::new(Mode::Normal)),
            auth: Default::default(),
            hidden: Default::default(),
            lfs_status: Arc::new(AtomicUsize::new(200)),
            lfs: Default::default(),
        };
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let background = super::Background::serve(app);
        Upstream {
            addr: background.addr,
            root,
            shared,
            background: Some(background),
        }
    }

    /// `host:port`, the proxy's URL segment for this upstream.
    pub fn segment(&self) -> String {
        self.addr.to_string()
    }

    /// The `ALLOWED_UPSTREAMS` entry for this upstream.
    pub fn allowed(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where repository `name` (`group/repo`) lives: `{root}/{name}.git`.
    pub fn repo_dir(&self, name: &str) -> PathBuf {
        self.root.path().join(format!("{name}.git"))
    }

    /// Build fixture `fixture` as upstream repository `name`.
    pub fn add_fixture(&self, name: &str, fixture: &str) -> PathBuf {
        let dir = self.repo_dir(name);
        std::fs::create_dir_all(dir.parent().expect("parent")).expect("dirs");
        super::build_fixture(fixture, &dir);
        dir
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    /// Require Basic auth `user:password` for repositories under `/prefix`.
    pub fn require_auth(&self, prefix: &str, user_password: &str) {
        self.shared
            .auth
            .lock()
            .unwrap()
            .insert(prefix.into(), user_password.into());
    }

    /// For repositories under `/prefix`, hide the refs under `refs` (an `uploadpack.hideRefs`
    /// value) from every request that does not carry Basic auth `user:password`: they are
    /// neither listed nor fetchable by name, as on a server with per-ref read rights. The
    /// repositories stay readable without credentials.
    pub fn hide_from_anonymous(&self, prefix: &str, refs: &str, user_password: &str) {
        self.shared
            .hidden
            .lock()
            .unwrap()
            .insert(prefix.into(), (refs.into(), user_password.into()));
    }

    /// Stop requiring credentials anywhere.
    pub fn open_to_all(&self) {
        self.shared.auth.lock().unwrap().clear();
    }

    /// Answer the Git LFS batch API (instead of echoing LFS requests), with objects on a
    /// storage server of their own.
    pub fn serve_lfs(&self) -> Arc<super::lfs::Lfs> {
        Arc::clone(
            self.shared
                .lfs
                .get_or_init(|| Arc::new(super::lfs::Lfs::start())),
        )
    }

    pub fn set_lfs_status(&self, status: usize) {
        self.shared.lfs_status.store(status, Ordering::Relaxed);
    }

    pub fn log(&self) -> Vec<Logged> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Requests whose path contains `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log()
            .iter()
            .filter(|l| l.path.contains(needle) || l.query.contains(needle))
            .count()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Release stalled handlers: they would keep the graceful shutdown waiting.
        self.set_mode(Mode::Normal);
        self.background.take();
    }
}

async fn handle(State(shared): State<Shared>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default()
        .to_vec();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    shared.log.lock().unwrap().push(Logged {
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let mut mode = *shared.mode.borrow();
    if let Mode::Slow(delay) = mode {
        tokio::time::sleep(delay).await;
    }
    let redirect = match mode {
        Mode::RedirectTo(to) => Some(to),
        Mode::RedirectGetsTo(to) if parts.method == axum::http::Method::GET => Some(to),
        _ => None,
    };
    if let Some(to) = redirect {
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        let mut r = StatusCode::FOUND.into_response();
        if let Ok(location) = HeaderValue::from_str(&format!("http://{to}{path}{query}")) {
            r.headers_mut().insert("location", location);
        }
        return r;
    }
    if mode == Mode::Stall {
        let mut changes = shared.mode.subscribe();
        // The sender lives in `shared`, so the wait ends only with a mode change.
        mode = changes
            .wait_for(|m| *m != Mode::Stall)
            .await
            .map_or(Mode::Normal, |m| *m);
    }
    match mode {
        Mode::Fail => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "upstream is down\n").into_response()
        }
        Mode::Stall
        | Mode::Normal
        | Mode::CutPacksAfter(_)
        | Mode::V0Only
        | Mode::SlowAfterAuth(_)
        | Mode::Slow(_)
        | Mode::RedirectTo(_)
        | Mode::RedirectGetsTo(_) => {}
    }
    let given = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let carries = |user_password: &str| {
        use base64::Engine as _;
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_password)
        );
        given.as_deref() == Some(expected.as_str())
    };
    let required = shared
        .auth
        .lock()
        .unwrap()
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
        .map(|(_, up)| up.clone());
    if let Some(user_password) = required {
        if !carries(&user_password) {
            let mut r = (StatusCode::UNAUTHORIZED, "credentials required\n").into_response();
            r.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Basic realm=\"upstream\""),
            );
            return r;
        }
    }
    if let Mode::SlowAfterAuth(delay) = mode {
        tokio::time::sleep(delay).await;
    }
    if let Some(lfs) = shared
        .lfs
        .get()
        .filter(|_| path.ends_with("/info/lfs/objects/batch"))
    {
        return lfs.batch(&path, &body);
    }
    if path.contains("/info/lfs/") {
        let status = StatusCode::from_u16(shared.lfs_status.load(Ordering::Relaxed) as u16)
            .unwrap_or(StatusCode::OK);
        let mut r = (
            status,
            format!(
                "lfs-echo {} {}",
                parts.method,
                String::from_utf8_lossy(&body)
            ),
        )
            .into_response();
        r.headers_mut().insert(
            "content-type",
            HeaderValue::from_static("application/vnd.git-lfs+json"),
        );
        return r;
    }
    // Git reads `GIT_CONFIG_COUNT` and friends as configuration: per request, without touching
    // the repository's own.
    let hide = shared
        .hidden
        .lock()
        .unwrap()
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
        .filter(|(_, (_, user_password))| !carries(user_password))
        .map(|(_, (refs, _))| refs.clone());
    let config: Vec<(String, String)> = hide
        .map(|refs| {
            vec![
                ("GIT_CONFIG_COUNT".into(), "1".into()),
                ("GIT_CONFIG_KEY_0".into(), "uploadpack.hideRefs".into()),
                ("GIT_CONFIG_VALUE_0".into(), refs),
            ]
        })
        .unwrap_or_default();
    let root = shared.root.clone();
    let mut headers = parts.headers.clone();
    if mode == Mode::V0Only {
        headers.remove("git-protocol");
    }
    let method = parts.method.to_string();
    let output = tokio::task::spawn_blocking(move || {
        cgi(&root, &method, &path, &query, &headers, &body, &config)
    })
    .await
    .expect("cgi task");
    let (status, body, hdrs) = output;
    let cut = match mode {
        Mode::CutPacksAfter(n)
            if body.len() > n && parts.uri.path().ends_with("git-upload-pack") =>
        {
            Some(n)
        }
        _ => None,
    };
    if let Some(n) = cut {
        // Send the start of the body, then end the connection abruptly.
        let start = bytes::Bytes::from(body[..n].to_vec());
        let stream = futures_util::stream::iter(vec![
            Ok::<_, std::io::Error>(start),
            Err(std::io::Error::other("upstream cut the response")),
        ]);
        let mut r = Response::new(Body::from_stream(stream));
        *r.status_mut() = status;
        *r.headers_mut() = hdrs;
        return r;
    }
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    *r.headers_mut() = hdrs;
    r
}

fn cgi(
    root: &Path,
    method: &str,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
    config: &[(String, String)],
) -> (StatusCode, Vec<u8>, HeaderMap) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut child = Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_ADDR", "127.0.0.1")
        .envs(config.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("git http-backend starts");
    let mut stdin = child.stdin.take().expect("stdin");
    let body = body.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().expect("http-backend output");
    let _ = writer.join();
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2)));
    let Some((end, sep)) = split else {
        return (StatusCode::INTERNAL_SERVER_ERROR, raw, HeaderMap::new());
    };
    let mut status = StatusCode::OK;
    let mut hdrs = HeaderMap::new();
    for line in String::from_utf8_lossy(&raw[..end]).lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("status") {
            status = v
                .split(' ')
                .next()
                .and_then(|c| c.parse().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::OK);
        } else if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(k.trim().as_bytes()),
            HeaderValue::from_str(v),
        ) {
            hdrs.insert(name, value);
        }
    }
    (status, raw[end + sep..].to_vec(), hdrs)
}
