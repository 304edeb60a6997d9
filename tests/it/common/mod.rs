//! Shared test harness: deterministic fixtures, the server on an ephemeral loopback port, and
//! a `git` client isolated from the machine's configuration.
#![allow(dead_code)]

pub mod lfs;
pub mod scenario;
pub mod upstream;

pub use scenario::{clone_checked, Proxied, Scenario, HOUR};

use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

use smart_git_proxy::config::Config;
use smart_git_proxy::http::{self, AppState};
use tempfile::TempDir;

/// The host segment test repositories are served under: an upstream that refuses connections
/// (nothing listens on the discard port), so that mirrors placed by the tests are served as
/// they are and no test reaches beyond loopback.
pub const HOST: &str = "127.0.0.1:9";

/// Where the tests keep what outlives one test process (fixtures, the `git` HOME): the
/// cargo target's temp dir, so that nothing piles up in `/tmp` and `cargo clean` removes it.
fn target_tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("a directory in the target's temp dir");
    dir
}

/// Build fixture `name` into `dest` (a `.git` directory): a private copy, which the test may
/// change.
pub fn build_fixture(name: &str, dest: &Path) {
    copy_dir(&fixture(name), dest);
}

/// The read-only fixture `name`, shared by every test process: built once per version of the
/// fixture script (and of git, which writes its packs) into the target's temp dir. Tests that
/// change a repository use [`build_fixture`] instead.
///
/// Test binaries run in parallel: the first to need a fixture builds it under a file lock
/// (one for all fixtures), into a scratch directory renamed into place, so no process sees a
/// half-built fixture.
pub fn fixture(name: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/make-fixture.py");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut hasher);
    std::fs::read(&script)
        .expect("the fixture script")
        .hash(&mut hasher);
    git_version().hash(&mut hasher);
    let cache = target_tmp("fixtures");
    let done = cache.join(format!("{name}-{:016x}.git", hasher.finish()));
    if done.exists() {
        return done;
    }
    let lock = std::fs::File::create(cache.join(".lock")).expect("lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("fixture lock");
    // Another process may have built it while this one waited.
    if !done.exists() {
        remove_leftovers(&cache, name);
        let scratch = tempfile::tempdir_in(&cache).expect("scratch dir for a fixture");
        let built = scratch.path().join("repo.git");
        let out = Command::new("python3")
            .arg(&script)
            .arg(name)
            .arg(&built)
            .envs(git_env())
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "fixture {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&built, &done).expect("fixture moved into place");
    }
    done
}

/// Under the fixture lock, so that no build is under way: remove the scratch directories of
/// builds that were killed, and the versions of fixture `name` made by older scripts.
fn remove_leftovers(cache: &Path, name: &str) {
    let prefix = format!("{name}-");
    for entry in std::fs::read_dir(cache)
        .expect("read fixture cache")
        .flatten()
    {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let old_version = file_name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".git"))
            .is_some_and(|key| key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit()));
        if file_name.starts_with(".tmp") || old_version {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// `git --version`: part of a fixture's cache key.
fn git_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        let out = Command::new("git")
            .arg("--version")
            .output()
            .expect("git runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

/// Copy the directory `src` to `dest` (created if missing), files and subdirectories.
fn copy_dir(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).expect("destination dir");
    for entry in std::fs::read_dir(src).expect("read fixture dir") {
        let entry = entry.expect("fixture dir entry");
        let to = dest.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).expect("copy fixture file");
        }
    }
}

/// Environment for every `git` the tests run: no system or user configuration, no prompts.
pub fn git_env() -> Vec<(&'static str, String)> {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    // Empty, and the same for every test process; git does not write into it (no global
    // configuration, no credential helper).
    let home = HOME.get_or_init(|| target_tmp("home"));
    vec![
        ("HOME", home.display().to_string()),
        ("GIT_CONFIG_NOSYSTEM", "1".into()),
        ("GIT_CONFIG_GLOBAL", "/dev/null".into()),
        ("GIT_TERMINAL_PROMPT", "0".into()),
        ("GIT_AUTHOR_NAME", "Test".into()),
        ("GIT_AUTHOR_EMAIL", "test@example.com".into()),
        ("GIT_COMMITTER_NAME", "Test".into()),
        ("GIT_COMMITTER_EMAIL", "test@example.com".into()),
        ("LC_ALL", "C".into()),
    ]
}

/// Run git in `dir` with `args`; the output whatever the exit status.
pub fn git_output(dir: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    Command::new("git")
        .current_dir(dir)
        .args(args)
        .envs(git_env())
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("git runs")
}

/// Run git in `dir` and return its stdout; panic with its stderr on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_output(dir, args, &[]);
    assert!(
        out.status.success(),
        "git {args:?} failed in {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `git fsck --strict` must pass on `git_dir`.
pub fn assert_fsck(git_dir: &Path) {
    let out = git_output(git_dir, &["fsck", "--strict", "--no-progress"], &[]);
    assert!(
        out.status.success(),
        "fsck --strict failed in {}:\n{}{}",
        git_dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// All refs of a repository as `oid name` lines, sorted.
pub fn refs(git_dir: &Path) -> String {
    git(
        git_dir,
        &["for-each-ref", "--format=%(objectname) %(refname)"],
    )
}

/// An axum application served on 127.0.0.1 (ephemeral port) by a runtime of its own; it
/// shuts down when dropped.
pub struct Background {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Serve an axum application with `axum::serve`.
    pub fn serve(app: axum::Router) -> Background {
        Background::start(move |listener, shutdown| async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
                .expect("serve")
        })
    }

    /// Run `serve` on a listener of its own until the returned value is dropped.
    pub fn start<F, Fut>(serve: F) -> Background
    where
        F: FnOnce(tokio::net::TcpListener, ShutdownSignal) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send addr");
                serve(
                    listener,
                    Box::pin(async {
                        let _ = shutdown_rx.await;
                    }),
                )
                .await
            });
        });
        let addr = addr_rx.recv().expect("server address");
        Background {
            addr,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }
}

/// Completes when a [`Background`] server is to stop.
pub type ShutdownSignal = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The proxy, running in-process on 127.0.0.1 with an ephemeral port.
pub struct Server {
    /// First, so that it is dropped first: the server stops (its syncs included) before its
    /// mirror directory is removed, which could otherwise fail and leave the directory behind.
    _background: Background,
    pub addr: SocketAddr,
    pub mirror: TempDir,
    pub state: AppState,
}

impl Server {
    /// Serve a new, empty mirror directory with default settings.
    pub fn start() -> Server {
        Server::start_with(|_| {})
    }

    /// Serve a new mirror directory, adjusting the configuration first.
    pub fn start_with(adjust: impl FnOnce(&mut Config)) -> Server {
        Server::start_in(tempfile::tempdir().expect("mirror dir"), adjust)
    }

    /// Serve an existing mirror directory (as after a restart), adjusting the configuration.
    pub fn start_in(mirror: TempDir, adjust: impl FnOnce(&mut Config)) -> Server {
        let mut config = Config::new(mirror.path());
        config.allowed_upstreams = format!("http://{HOST}");
        adjust(&mut config);
        let state = AppState::new(config.resolve().expect("a valid configuration"));
        let serving = state.clone();
        // The proxy's own server loop, with its connection limits and timeouts.
        let background = Background::start(move |listener, shutdown| async move {
            http::serve(listener, serving, shutdown)
                .await
                .expect("serve")
        });
        Server {
            addr: background.addr,
            mirror,
            state,
            _background: background,
        }
    }

    /// Stop serving and hand back the mirror directory.
    pub fn stop(self) -> TempDir {
        drop(self._background);
        self.mirror
    }

    /// The pack cache's counters (the cache must be on).
    pub fn cache_stats(&self) -> &smart_git_proxy::pack::cache::Stats {
        self.state.pack_cache().expect("pack cache on").stats()
    }

    /// Make the read-only fixture `name` available as `example.com/{name}`.
    pub fn serve_fixture(&self, name: &str) -> String {
        let src = fixture(name);
        self.link(name, &src)
    }

    /// Serve the repository at `git_dir` as `example.com/{name}`.
    pub fn link(&self, name: &str, git_dir: &Path) -> String {
        let dest = self.repo_dir(name);
        std::fs::create_dir_all(dest.parent().expect("parent")).expect("host dir");
        std::os::unix::fs::symlink(git_dir, &dest).expect("symlink");
        self.url(name)
    }

    /// Where `example.com/{name}` lives in the mirror directory.
    pub fn repo_dir(&self, name: &str) -> PathBuf {
        self.mirror.path().join(HOST).join(format!("{name}.git"))
    }

    /// The clone URL of `{segment}/{name}` (a repository of another upstream).
    pub fn url_for(&self, segment: &str, name: &str) -> String {
        format!("http://{}/{segment}/{name}", self.addr)
    }

    /// The clone URL of `{HOST}/{name}`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{HOST}/{name}", self.addr)
    }
}

/// The protocol versions every protocol test runs with.
pub const PROTOCOLS: [&str; 2] = ["2", "0"];

/// `-c protocol.version=N` as git arguments.
pub fn proto(version: &str) -> [String; 2] {
    ["-c".into(), format!("protocol.version={version}")]
}

/// Concatenate string-ish arguments for `git`.
pub fn args<'a>(parts: &'a [&'a str], extra: &'a [String]) -> Vec<&'a str> {
    extra
        .iter()
        .map(String::as_str)
        .chain(parts.iter().copied())
        .collect()
}

/// A raw HTTP response.
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

impl Reply {
    /// The value of response header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A pkt-line body: each line gets its length prefix and a trailing newline; `"0000"` (flush)
/// and `"0001"` (delimiter) are sent as they are.
pub fn pkt(lines: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        match *l {
            "0000" | "0001" => out.extend_from_slice(l.as_bytes()),
            l => out.extend_from_slice(format!("{:04x}{l}\n", l.len() + 5).as_bytes()),
        }
    }
    out
}

/// The data packets of a pkt-line answer, in order (flush and delimiter packets left out).
pub fn pkt_payloads(mut body: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while body.len() >= 4 {
        let len = usize::from_str_radix(std::str::from_utf8(&body[..4]).unwrap(), 16).unwrap();
        if len < 4 {
            body = &body[4..];
            continue;
        }
        out.push(&body[4..len]);
        body = &body[len..];
    }
    out
}

/// A minimal HTTP/1.1 client, so that tests can send exactly the bytes they mean.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && *v == "chunked");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !chunked {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if chunked {
        for chunk in body.chunks(7) {
            s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .unwrap();
            s.write_all(chunk).unwrap();
            s.write_all(b"\r\n").unwrap();
        }
        s.write_all(b"0\r\n\r\n").unwrap();
    } else {
        s.write_all(body).unwrap();
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let headers = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = headers[9..12].parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// The body of a chunked HTTP/1.1 answer.
pub fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16)
                .unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[line_end + 2..line_end + 2 + size]);
        data = &data[line_end + 2 + size + 2..];
    }
}

/// actions/checkout's exact fetch of one commit (no ls-refs, `--depth=1`) into `repo`, which
/// has `origin` configured, storing it as `dest_ref`.
pub fn actions_checkout_fetch(
    repo: &Path,
    version: &str,
    sha: &str,
    dest_ref: &str,
    env: &[(&str, &str)],
) -> Output {
    git_output(
        repo,
        &[
            "-c",
            &format!("protocol.version={version}"),
            "fetch",
            "--no-tags",
            "--prune",
            "--no-recurse-submodules",
            "--depth=1",
            "origin",
            &format!("+{sha}:{dest_ref}"),
        ],
        env,
    )
}

/// `git fetch <url> <what> <extra…>` into a new, empty repository.
pub fn fetch_into_new_repo(url: &str, what: &str, extra: &[&str]) -> (tempfile::TempDir, Output) {
    let work = tempfile::tempdir().expect("temp dir");
    git(work.path(), &["init", "-q"]);
    let mut a = vec!["fetch"];
    a.extend_from_slice(extra);
    a.extend([url, what]);
    let out = git_output(work.path(), &a, &[]);
    (work, out)
}

/// A mirror directory holding fixture `name` as `{HOST}/{name}.git`, for the binary to serve;
/// and that repository's path.
pub fn seeded_mirror(name: &str) -> (TempDir, PathBuf) {
    let mirror = tempfile::tempdir().unwrap();
    let repo_dir = mirror.path().join(HOST).join(format!("{name}.git"));
    std::fs::create_dir_all(repo_dir.parent().unwrap()).unwrap();
    build_fixture(name, &repo_dir);
    (mirror, repo_dir)
}

/// A tmpfs of `size` mounted at `dir` for the test's lifetime (root only; `None` elsewhere).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

/// Drop it before the directory it is mounted in is removed (declare it after the server that
/// owns that directory): a mount point cannot be removed, and the directory would be left
/// behind.
impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily: a server still running holds files there (its lock file), which would make a
        // plain umount fail and leave the mount.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The real binary, started as the README says on 127.0.0.1 with an ephemeral port, over
/// `mirror_dir` with extra settings `env`; killed when dropped, however the test ends.
pub struct Running {
    pub child: std::process::Child,
    pub addr: String,
}

impl Running {
    pub fn start(mirror_dir: &Path, env: &[(&str, &str)]) -> Running {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("MIRROR_DIR", mirror_dir)
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("LOG_LEVEL", "info")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut running = Running {
            child,
            addr: String::new(),
        };
        let mut lines = BufReader::new(stderr).lines();
        running.addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.contains("listening")
                    .then(|| {
                        l.split("addr=")
                            .nth(1)?
                            .split_whitespace()
                            .next()
                            .map(str::to_owned)
                    })
                    .flatten()
            })
            .expect("the server logs its address");
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        running
    }

    /// Send SIGTERM, as systemd does to stop the service.
    pub fn terminate(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }

    /// A v2 fetch of `tip` from fixture `large` (mirrored as `127.0.0.1:9/large`), on a new
    /// connection, read up to the first bytes of its answer, which must be a 200: an answer in
    /// flight, with the rest (and the pack) still to come.
    pub fn answer_in_flight(&self, tip: &str) -> (std::net::TcpStream, Vec<u8>) {
        use std::io::{Read, Write};
        let body = pkt(&[
            "command=fetch",
            "0001",
            "ofs-delta",
            "no-progress",
            &format!("want {}", tip.trim()),
            "done",
            "0000",
        ]);
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        write!(
            s,
            "POST /127.0.0.1:9/large/git-upload-pack HTTP/1.1\r\nHost: x\r\nGit-Protocol: version=2\r\n\
             Connection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
        let mut answer = vec![0u8; 4096];
        let n = s.read(&mut answer).unwrap();
        answer.truncate(n);
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
        (s, answer)
    }

    /// A line of `/proc/<pid>/status`, in KiB (`VmRSS`, `VmHWM`).
    pub fn status_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc status"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Consolidate the mirror at `dir` now, with an hour's grace for unreachable objects.
pub fn maintain_now(dir: &Path) -> smart_git_proxy::mirror::maintain::Outcome {
    smart_git_proxy::mirror::maintain::consolidate(
        dir,
        std::time::Duration::from_secs(3600),
        None,
        &std::sync::atomic::AtomicBool::new(false),
    )
    .expect("maintenance")
}

/// A child process killed when dropped, however the test ends (a panic included), so that no
/// server outlives its test.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One upstream commit on `branch` of the bare repository `dir`, through a scratch clone; its
/// id.
pub fn push_commit(dir: &Path, branch: &str) -> String {
    let work = tempfile::tempdir().unwrap();
    let src = format!("file://{}", dir.display());
    git(work.path(), &["clone", "-q", "--branch", branch, &src, "w"]);
    let w = work.path().join("w");
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::fs::write(w.join(format!("pushed-{unique}")), "pushed\n").unwrap();
    git(&w, &["add", "-A"]);
    git(&w, &["commit", "-q", "-m", "pushed"]);
    git(&w, &["push", "-q", "origin", &format!("HEAD:{branch}")]);
    git(&w, &["rev-parse", "HEAD"]).trim().to_owned()
}

/// Wait until `done` holds, checking every 50 ms; panics with `what` after a minute (a bound
/// for a hung test, not a timing assertion).
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `git clone --progress --mirror {url} c` in `dir` with protocol `v`, its stderr piped.
pub fn clone_with_progress(dir: &Path, url: &str, v: &str) -> Child {
    git_with_progress(dir, &["clone", "--progress", "--mirror", url, "c"], v)
}

/// `git {command}` in `dir` with protocol `v`, started, its stderr piped (for
/// [`until_progress`] and [`finish`]).
pub fn git_with_progress(dir: &Path, command: &[&str], v: &str) -> Child {
    Command::new("git")
        .current_dir(dir)
        .args(args(command, &proto(v)))
        .envs(git_env())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Read what `child` prints as it arrives, up to its first `remote: mirroring` line.
pub fn until_progress(child: &mut Child) -> Vec<u8> {
    let stderr = child.stderr.as_mut().expect("stderr piped");
    let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
    while !String::from_utf8_lossy(&seen).contains("remote: mirroring") {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "no progress: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// The rest of what `child` prints after `seen`, and whether it succeeded.
pub fn finish(mut child: Child, mut seen: Vec<u8>) -> (String, bool) {
    let stderr = child.stderr.as_mut().expect("stderr piped");
    stderr.read_to_end(&mut seen).unwrap();
    let ok = child.wait().unwrap().success();
    (String::from_utf8_lossy(&seen).into_owned(), ok)
}

/// How many panics this process has seen outside the tests' own code: in the library or a
/// dependency, such as in a server a test runs in-process. Counted by a hook installed on the
/// first call, so call it before starting what is to be watched, and compare.
///
/// Every test of the binary shares the process: a failing assertion of another test (whose
/// location is under `tests/`) is not counted; a panic of the library while serving another
/// test is, and is a defect either way.
pub fn library_panics() -> usize {
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| !l.file().starts_with("tests/"))
            {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
    PANICS.load(Ordering::SeqCst)
}
