//! The client matrix: every mainstream Git implementation against the real proxy binary in
//! front of a `git http-backend` upstream, in every fetch shape it supports. Each result must pass
//! `git fsck --strict` and carry the upstream's refs.
//!
//! Clients: the `git` CLI (protocol v2, v1, v0), dulwich (v2 and v0) and libgit2 through
//! pygit2 (v0 only: libgit2 speaks no v2), both driven by `interop/client.py` with the versions
//! pinned in `interop/requirements.txt`, isomorphic-git (v1, `interop/package.json`) on
//! Node.js, gitoxide (`gix`, in-process), and two clients from Debian's packages: JGit
//! (`libjgit-java`, driven by `interop/JgitClient.java`) and go-git
//! (`golang-github-go-git-go-git-dev`, driven by `interop/go-git/main.go`). Both drivers are
//! built offline once per test run and kept under `target/tmp/interop/`.

use crate::common;

use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::OnceLock;
use std::time::Duration;

use common::upstream::Upstream;
use common::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Git(&'static str),
    Dulwich(&'static str),
    Pygit2,
    Gix,
    /// isomorphic-git on Node.js (protocol v1 only), driven by `interop/iso_client.mjs`.
    Isomorphic,
    /// JGit 4.11 from Debian (protocol v0 only; no shallow or partial fetch).
    Jgit,
    /// go-git 5.4 from Debian (protocol v0 only).
    GoGit,
}

impl Client {
    fn all() -> [Client; 10] {
        [
            Client::Git("2"),
            Client::Git("1"),
            Client::Git("0"),
            Client::Dulwich("2"),
            Client::Dulwich("0"),
            Client::Pygit2,
            Client::Gix,
            Client::Isomorphic,
            Client::Jgit,
            Client::GoGit,
        ]
    }

    /// Whether the client can fetch shallow (`--depth`, then deepen). Debian's JGit (4.11)
    /// cannot: shallow fetches came to JGit's client in 6.3.
    fn shallow(self) -> bool {
        self != Client::Jgit
    }

    /// A clone of `url` into `dest` (bare, but a working clone without checkout for `git`, whose
    /// bare clones have no fetch refspec).
    fn clone(
        self,
        url: &str,
        dest: &Path,
        depth: Option<u32>,
        branch: Option<&str>,
    ) -> Result<(), String> {
        match self {
            Client::Git(v) => {
                let mut a = vec![
                    "-c".to_string(),
                    format!("protocol.version={v}"),
                    "clone".into(),
                    "-q".into(),
                    "--no-checkout".into(),
                ];
                if let Some(d) = depth {
                    a.push(format!("--depth={d}"));
                }
                if let Some(b) = branch {
                    a.extend(["--single-branch".into(), "--branch".into(), b.into()]);
                }
                a.extend([url.into(), dest.display().to_string()]);
                run_git(Path::new("/"), &a)
            }
            Client::Dulwich(v) => {
                let mut a = vec![
                    "dulwich".to_string(),
                    "clone".into(),
                    url.into(),
                    dest.display().to_string(),
                    "--bare".into(),
                    "--protocol".into(),
                    v.into(),
                ];
                push_opts(&mut a, depth, branch);
                run_python(&a)
            }
            Client::Pygit2 => {
                let mut a = vec![
                    "pygit2".to_string(),
                    "clone".into(),
                    url.into(),
                    dest.display().to_string(),
                    "--bare".into(),
                ];
                push_opts(&mut a, depth, branch);
                run_python(&a)
            }
            Client::Gix => gix_clone(url, dest, depth, branch),
            Client::Isomorphic => {
                let mut a = vec!["clone".to_string(), url.into(), dest.display().to_string()];
                push_opts(&mut a, depth, branch);
                if branch.is_some() {
                    a.push("--single-branch".into());
                }
                run_node(&a)
            }
            Client::Jgit => {
                let mut a = vec!["clone".to_string(), url.into(), dest.display().to_string()];
                push_opts(&mut a, depth, branch);
                run_jgit(&a)
            }
            Client::GoGit => {
                let mut a = vec!["clone".to_string(), url.into(), dest.display().to_string()];
                push_opts(&mut a, depth, branch);
                run_go_git(&a)
            }
        }
    }

    /// Fetch from `origin` into the bare clone `dir`.
    fn fetch(self, dir: &Path, depth: Option<u32>) -> Result<(), String> {
        match self {
            Client::Git(v) => {
                let mut a = vec![
                    "-c".to_string(),
                    format!("protocol.version={v}"),
                    "fetch".into(),
                    "-q".into(),
                    "origin".into(),
                ];
                if let Some(d) = depth {
                    a.push(format!("--depth={d}"));
                }
                run_git(dir, &a)
            }
            Client::Dulwich(v) => {
                let mut a = vec![
                    "dulwich".to_string(),
                    "fetch".into(),
                    dir.display().to_string(),
                    "--protocol".into(),
                    v.into(),
                ];
                push_opts(&mut a, depth, None);
                run_python(&a)
            }
            Client::Pygit2 => {
                let mut a = vec![
                    "pygit2".to_string(),
                    "fetch".into(),
                    dir.display().to_string(),
                ];
                push_opts(&mut a, depth, None);
                run_python(&a)
            }
            Client::Gix => gix_fetch(dir, depth),
            Client::Isomorphic => {
                let mut a = vec!["fetch".to_string(), dir.display().to_string()];
                push_opts(&mut a, depth, None);
                run_node(&a)
            }
            Client::Jgit => {
                let mut a = vec!["fetch".to_string(), dir.display().to_string()];
                push_opts(&mut a, depth, None);
                run_jgit(&a)
            }
            Client::GoGit => {
                let mut a = vec!["fetch".to_string(), dir.display().to_string()];
                push_opts(&mut a, depth, None);
                run_go_git(&a)
            }
        }
    }
}

fn push_opts(a: &mut Vec<String>, depth: Option<u32>, branch: Option<&str>) {
    if let Some(d) = depth {
        a.extend(["--depth".into(), d.to_string()]);
    }
    if let Some(b) = branch {
        a.extend(["--branch".into(), b.into()]);
    }
}

fn run_git(cwd: &Path, a: &[String]) -> Result<(), String> {
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = git_output(cwd, &a, &[]);
    out.status
        .success()
        .then_some(())
        .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

fn run_python(a: &[String]) -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/client.py");
    let out = Command::new("python3")
        .arg(script)
        .args(a)
        .envs(git_env())
        .output()
        .map_err(|e| e.to_string())?;
    out.status
        .success()
        .then_some(())
        .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

fn run_node(a: &[String]) -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/iso_client.mjs");
    let out = Command::new("node")
        .arg(script)
        .args(a)
        .output()
        .map_err(|e| e.to_string())?;
    out.status
        .success()
        .then_some(())
        .ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The output of `cmd` (with the tests' git environment) when it succeeds, its stderr otherwise.
fn output_of(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.envs(git_env()).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Where the driver built from `sources` (files of `interop/`) lives: a directory under
/// `target/tmp/interop/` named after `name` and a hash of the sources, built by `build` into
/// a scratch directory and renamed into place, so that a rerun with unchanged sources builds
/// nothing and a concurrent or interrupted build never leaves a half-built driver.
fn built_driver(name: &str, sources: &[&str], build: impl FnOnce(&Path, &Path)) -> PathBuf {
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for source in sources {
        std::fs::read(interop.join(source))
            .unwrap_or_else(|e| panic!("interop/{source}: {e}"))
            .hash(&mut hasher);
    }
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop");
    let done = base.join(format!("{name}-{:016x}", hasher.finish()));
    if !done.exists() {
        std::fs::create_dir_all(&base).unwrap();
        let scratch = tempfile::tempdir_in(&base).unwrap();
        build(&interop, scratch.path());
        // Another test process may have won the race: its build is as good as this one.
        if std::fs::rename(scratch.path(), &done).is_err() && !done.exists() {
            panic!("cannot move the {name} driver into {}", done.display());
        }
    }
    done
}

/// Run `cmd` to build a driver; panic with its output if it fails (a missing toolchain
/// included: CI installs it, so a missing client must fail loudly, not skip).
fn build_step(what: &str, cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} (see .ci/run for the Debian packages)"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Debian's JGit jar; its manifest's Class-Path names its dependencies beside it.
const JGIT_JAR: &str = "/usr/share/java/org.eclipse.jgit.jar";

/// The class path that runs `interop/JgitClient.java`, compiled once per source version.
fn jgit_class_path() -> &'static str {
    static CLASS_PATH: OnceLock<String> = OnceLock::new();
    CLASS_PATH.get_or_init(|| {
        let classes = built_driver("jgit", &["JgitClient.java"], |src, out| {
            build_step(
                "javac interop/JgitClient.java",
                Command::new("javac")
                    .args(["-nowarn", "-cp", JGIT_JAR, "-d"])
                    .arg(out)
                    .arg(src.join("JgitClient.java")),
            )
        });
        // slf4j-nop keeps slf4j's "no binding" notice out of the errors the tests print.
        format!(
            "{}:{JGIT_JAR}:/usr/share/java/slf4j-nop.jar",
            classes.display()
        )
    })
}

fn run_jgit(a: &[String]) -> Result<(), String> {
    jgit(a).map(drop)
}

fn jgit(a: &[String]) -> Result<String, String> {
    output_of(
        Command::new("java")
            .args(["-cp", jgit_class_path(), "JgitClient"])
            .args(a),
    )
}

/// The `interop/go-git` driver, built once per source version against Debian's go-git in
/// GOPATH mode, offline. The driver's `go.mod` is there only for Go's minimal module
/// compatibility, which resolves go-git's `/v5` import paths in GOPATH mode; it takes effect
/// for a package inside a GOPATH, so the sources are copied into one.
fn go_git_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let sources = ["go-git/main.go", "go-git/go.mod"];
        let built = built_driver("go-git", &sources, |src, out| {
            let package = out.join("gopath/src/go-git-client");
            std::fs::create_dir_all(&package).unwrap();
            for source in sources {
                let name = Path::new(source).file_name().unwrap();
                std::fs::copy(src.join(source), package.join(name)).unwrap();
            }
            let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop/go-cache");
            build_step(
                "go build interop/go-git",
                Command::new("go")
                    .current_dir(&package)
                    .args(["build", "-o"])
                    .arg(out.join("go-git-client"))
                    .arg(".")
                    .env(
                        "GOPATH",
                        format!("{}:/usr/share/gocode", out.join("gopath").display()),
                    )
                    .env("GO111MODULE", "off")
                    .env("GOPROXY", "off")
                    .env("GOFLAGS", "")
                    .env("GOTOOLCHAIN", "local")
                    .env("GOENV", "off")
                    .env("CGO_ENABLED", "0")
                    .env("GOCACHE", cache),
            )
        });
        built.join("go-git-client")
    })
}

fn run_go_git(a: &[String]) -> Result<(), String> {
    go_git(a).map(drop)
}

fn go_git(a: &[String]) -> Result<String, String> {
    output_of(Command::new(go_git_binary()).args(a))
}

fn gix_clone(
    url: &str,
    dest: &Path,
    depth: Option<u32>,
    branch: Option<&str>,
) -> Result<(), String> {
    let mut prepare = gix::clone::PrepareFetch::new(
        url,
        dest,
        gix::create::Kind::Bare,
        gix::create::Options::default(),
        gix::open::Options::isolated(),
    )
    .map_err(|e| e.to_string())?;
    if let Some(d) = depth.and_then(NonZeroU32::new) {
        prepare = prepare.with_shallow(gix::remote::fetch::Shallow::DepthAtRemote(d));
    }
    if let Some(b) = branch {
        prepare = prepare.with_ref_name(Some(b)).map_err(|e| e.to_string())?;
    }
    prepare
        .fetch_only(gix::progress::Discard, &AtomicBool::new(false))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn gix_fetch(dir: &Path, depth: Option<u32>) -> Result<(), String> {
    let repo = gix::open_opts(dir, gix::open::Options::isolated()).map_err(|e| e.to_string())?;
    // A bare clone has no fetch refspec, as with git.
    let remote = repo
        .find_remote("origin")
        .map_err(|e| e.to_string())?
        .with_refspecs(
            Some("+refs/heads/*:refs/heads/*"),
            gix::remote::Direction::Fetch,
        )
        .map_err(|e| e.to_string())?;
    remote
        .connect(gix::remote::Direction::Fetch)
        .map_err(|e| e.to_string())?
        .prepare_fetch(gix::progress::Discard, Default::default())
        .map_err(|e| e.to_string())?
        .with_shallow(match depth.and_then(NonZeroU32::new) {
            Some(d) => gix::remote::fetch::Shallow::DepthAtRemote(d),
            None => gix::remote::fetch::Shallow::NoChange,
        })
        .receive(gix::progress::Discard, &AtomicBool::new(false))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The git directory of a clone, bare or not.
fn git_dir(dest: &Path) -> PathBuf {
    let dot_git = dest.join(".git");
    if dot_git.is_dir() {
        dot_git
    } else {
        dest.to_path_buf()
    }
}

/// `oid name` of the branches and tags a client keeps, whatever namespace it fetched them into.
fn heads_and_tags(dir: &Path) -> Vec<String> {
    let dir = &git_dir(dir);
    let mut out: Vec<String> = git(dir, &["for-each-ref", "--format=%(objectname) %(refname)"])
        .lines()
        .filter_map(|l| {
            let (id, name) = l.split_once(' ')?;
            let name = name
                .strip_prefix("refs/remotes/origin/")
                .map(|b| format!("refs/heads/{b}"))
                .unwrap_or_else(|| name.to_owned());
            (name.starts_with("refs/heads/") && !name.ends_with("/HEAD")
                || name.starts_with("refs/tags/"))
            .then(|| format!("{id} {name}"))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The upstream (`git http-backend`) and the real proxy binary in front of it.
struct Matrix {
    up: Upstream,
    /// Declared before `_mirror`, so the server is killed before its directory goes.
    server: Running,
    _mirror: tempfile::TempDir,
    upstream_dir: PathBuf,
    url: String,
}

fn matrix() -> Matrix {
    // gix is a client in this process: its reqwest needs the rustls provider the proxy uses.
    smart_git_proxy::upstream::tls::install_provider();
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let mirror = tempfile::tempdir().unwrap();
    let server = Running::start(
        mirror.path(),
        &[
            ("ALLOWED_UPSTREAMS", &up.allowed()),
            ("SYNC_STALE_AFTER", "50ms"),
        ],
    );
    let url = format!("http://{}/{}/o/basic", server.addr, up.segment());
    Matrix {
        up,
        server,
        _mirror: mirror,
        upstream_dir,
        url,
    }
}

fn upstream_refs(m: &Matrix, prefixes: &[&str]) -> Vec<String> {
    let mut a = vec!["for-each-ref", "--format=%(objectname) %(refname)"];
    a.extend_from_slice(prefixes);
    git(&m.upstream_dir, &a)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A new upstream commit on `main` (same tree), once the proxy would sync again; its id.
fn advance_main(m: &Matrix, message: &str) -> String {
    let tree = git(&m.upstream_dir, &["rev-parse", "main^{tree}"]);
    let commit = git(
        &m.upstream_dir,
        &["commit-tree", tree.trim(), "-p", "main", "-m", message],
    );
    let commit = commit.trim();
    git(&m.upstream_dir, &["update-ref", "refs/heads/main", commit]);
    std::thread::sleep(Duration::from_millis(100));
    commit.to_owned()
}

#[test]
fn full_clone_then_incremental_fetch() {
    let m = matrix();
    for client in Client::all() {
        let work = tempfile::tempdir().unwrap();
        let dest = work.path().join("c");
        client
            .clone(&m.url, &dest, None, None)
            .unwrap_or_else(|e| panic!("{client:?} clone: {e}"));
        assert_fsck(&git_dir(&dest));
        let heads = heads_and_tags(&dest);
        let mut expected = upstream_refs(&m, &["refs/heads/", "refs/tags/"]);
        expected.sort();
        assert_eq!(
            heads, expected,
            "{client:?}: the upstream's branches and tags"
        );

        // New upstream commits, then a fetch with negotiation.
        let commit = advance_main(&m, &format!("{client:?}"));
        client
            .fetch(&dest, None)
            .unwrap_or_else(|e| panic!("{client:?} fetch: {e}"));
        assert_fsck(&git_dir(&dest));
        assert!(
            heads_and_tags(&dest).contains(&format!("{commit} refs/heads/main")),
            "{client:?}: fetched main"
        );
    }
    drop(m.server);
    drop(m.up);
}

/// The proxy's count of `git-upload-pack` requests answered.
fn upload_packs(m: &Matrix) -> u64 {
    let addr = m.server.addr.parse().unwrap();
    request(addr, "GET", "/metrics", &[], b"")
        .text()
        .lines()
        .filter(|l| {
            l.starts_with("smart_git_proxy_requests_total{")
                && l.contains(r#"command="upload-pack""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// `count` new commits on `refs/heads/local-side` of the clone at `git_dir`, forked from its
/// `main` and newer than anything upstream, so a fetch offers them first as haves.
fn local_commits(git_dir: &Path, count: usize) {
    let mut stream = String::new();
    for i in 0..count {
        let from = if i == 0 { "from refs/heads/main\n" } else { "" };
        let body = format!("{i}\n");
        stream.push_str(&format!(
            "commit refs/heads/local-side\ncommitter T <t@example.com> {} +0000\ndata 6\nlocal\n{from}M 644 inline local.txt\ndata {}\n{body}\n",
            2_000_000_000 + i,
            body.len(),
        ));
    }
    let out = Command::new("git")
        .current_dir(git_dir)
        .args(["fast-import", "--quiet"])
        .envs(git_env())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(stream.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// An incremental fetch by a client with hundreds of commits the upstream has never seen: the
/// proxy must NAK its way down to the common history, over several stateless rounds for
/// JGit (go-git offers all its haves in one request).
#[test]
fn fetch_past_local_commits_the_upstream_lacks() {
    let m = matrix();
    for client in [Client::Jgit, Client::GoGit] {
        let work = tempfile::tempdir().unwrap();
        let dest = work.path().join("c");
        client
            .clone(&m.url, &dest, None, None)
            .unwrap_or_else(|e| panic!("{client:?} clone: {e}"));
        local_commits(&dest, 300);
        advance_main(&m, &format!("{client:?} 1"));
        let commit = advance_main(&m, &format!("{client:?} 2"));
        let before = upload_packs(&m);
        client
            .fetch(&dest, None)
            .unwrap_or_else(|e| panic!("{client:?} fetch: {e}"));
        let rounds = upload_packs(&m) - before;
        assert_fsck(&dest);
        assert!(
            heads_and_tags(&dest).contains(&format!("{commit} refs/heads/main")),
            "{client:?}: fetched main"
        );
        if client == Client::Jgit {
            assert!(rounds >= 2, "JGit negotiated in {rounds} round(s)");
        }
    }
}

#[test]
fn single_branch_and_shallow_clones() {
    let m = matrix();
    for client in Client::all() {
        let work = tempfile::tempdir().unwrap();
        let one = work.path().join("one");
        client
            .clone(&m.url, &one, None, Some("feature/a"))
            .unwrap_or_else(|e| panic!("{client:?} single branch: {e}"));
        assert_fsck(&git_dir(&one));
        let feature = git(&m.upstream_dir, &["rev-parse", "feature/a"]);
        assert!(
            heads_and_tags(&one).contains(&format!("{} refs/heads/feature/a", feature.trim())),
            "{client:?}"
        );

        if !client.shallow() {
            continue;
        }
        let shallow = work.path().join("shallow");
        client
            .clone(&m.url, &shallow, Some(1), None)
            .unwrap_or_else(|e| panic!("{client:?} depth 1: {e}"));
        assert_fsck(&git_dir(&shallow));
        let boundary =
            std::fs::read_to_string(git_dir(&shallow).join("shallow")).unwrap_or_default();
        assert!(!boundary.is_empty(), "{client:?}: a shallow boundary");
        // dulwich 1.2.21's deepening walks the parents of
        // every ref and fails on the fixture's tag of a blob ('Blob' object has no attribute
        // 'parents') against stock git http-backend just the same.
        if matches!(client, Client::Dulwich(_)) {
            continue;
        }
        if client == Client::GoGit {
            // go-git 5.4 cannot deepen over HTTP. With the refs where they were, its HTTP
            // transport drops the request unsent, its wants being all haves ("empty
            // git-upload-pack given"; its other transports let a shallow fetch through). Once
            // upstream has moved, it lists haves by walking each local ref's history, past
            // the shallow boundary into commits it lacks ("object not found"). Pinned: each
            // fails the same way straight from the upstream's git http-backend.
            let direct = work.path().join("direct");
            client
                .clone(
                    &format!("{}/o/basic", m.up.allowed()),
                    &direct,
                    Some(1),
                    None,
                )
                .unwrap_or_else(|e| panic!("go-git depth 1 from upstream: {e}"));
            let deepen_fails_with = |expected: &str| {
                for dir in [&shallow, &direct] {
                    let err = client.fetch(dir, Some(3)).unwrap_err();
                    assert!(err.contains(expected), "go-git deepen: {err}");
                }
            };
            deepen_fails_with("empty git-upload-pack given");
            advance_main(&m, "deepen for go-git");
            deepen_fails_with("object not found");
            continue;
        }
        client
            .fetch(&shallow, Some(3))
            .unwrap_or_else(|e| panic!("{client:?} deepen: {e}"));
        assert_fsck(&git_dir(&shallow));
        let deeper = std::fs::read_to_string(git_dir(&shallow).join("shallow")).unwrap_or_default();
        // isomorphic-git 1.44.17's deepen succeeds but leaves the boundary as it was, against
        // stock git http-backend just the same.
        if client != Client::Isomorphic {
            assert_ne!(boundary, deeper, "{client:?}: deepen moved the boundary");
        }
    }
}

#[test]
fn ls_remote_lists_the_upstream_refs() {
    let m = matrix();
    let mut expected: Vec<String> = upstream_refs(&m, &["refs/heads/", "refs/tags/"]);
    expected.sort();
    for version in ["2", "1", "0"] {
        let out = git(
            Path::new("/"),
            &[
                "-c",
                &format!("protocol.version={version}"),
                "ls-remote",
                "--heads",
                "--tags",
                &m.url,
            ],
        );
        let mut got: Vec<String> = out
            .lines()
            .filter(|l| !l.ends_with("^{}"))
            .map(|l| l.replace('\t', " "))
            .collect();
        got.sort();
        assert_eq!(got, expected, "git v{version}");
    }
    // gix: a ref listing through an anonymous remote.
    let dir = tempfile::tempdir().unwrap();
    let repo = gix::init_bare(dir.path()).unwrap();
    let (ref_map, _) = repo
        .remote_at(m.url.as_str())
        .unwrap()
        .with_refspecs(Some("+refs/*:refs/*"), gix::remote::Direction::Fetch)
        .unwrap()
        .connect(gix::remote::Direction::Fetch)
        .unwrap()
        .ref_map(
            gix::progress::Discard,
            gix::remote::ref_map::Options {
                prefix_from_spec_as_filter_on_remote: false,
                ..Default::default()
            },
        )
        .unwrap();
    let listed: Vec<String> = ref_map
        .remote_refs
        .iter()
        .filter_map(|r| {
            let (name, target, _) = r.unpack();
            Some(format!("{} {name}", target?))
        })
        .collect();
    for line in &expected {
        assert!(listed.contains(line), "gix ls-remote: {line} in {listed:?}");
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scratch = tempfile::tempdir().unwrap();
    let scratch = scratch.path().join("ls-remote.git");
    let scratch = scratch.to_str().unwrap();
    let py = root.join("interop/client.py");
    let node = root.join("interop/iso_client.mjs");
    for (name, program, args) in [
        (
            "dulwich",
            "python3",
            vec![py.to_str().unwrap(), "dulwich", "ls-remote", &m.url],
        ),
        (
            "pygit2",
            "python3",
            vec![
                py.to_str().unwrap(),
                "pygit2",
                "ls-remote",
                &m.url,
                "--scratch",
                scratch,
            ],
        ),
        (
            "isomorphic-git",
            "node",
            vec![node.to_str().unwrap(), "ls-remote", &m.url],
        ),
    ] {
        let out = Command::new(program)
            .args(&args)
            .envs(git_env())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed = String::from_utf8_lossy(&out.stdout);
        for line in &expected {
            assert!(
                listed.contains(line.as_str()),
                "{name} ls-remote: {line} in {listed}"
            );
        }
    }
    for (name, listed) in [
        ("jgit", jgit(&["ls-remote".into(), m.url.clone()])),
        ("go-git", go_git(&["ls-remote".into(), m.url.clone()])),
    ] {
        let listed = listed.unwrap_or_else(|e| panic!("{name} ls-remote: {e}"));
        let mut got: Vec<&str> = listed
            .lines()
            .filter(|l| {
                (l.contains(" refs/heads/") || l.contains(" refs/tags/")) && !l.ends_with("^{}")
            })
            .collect();
        got.sort();
        assert_eq!(got, expected, "{name} ls-remote");
    }
}
