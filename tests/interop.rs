//! The client matrix: every mainstream Git implementation against the real proxy in front of a
//! `git http-backend` upstream, in every fetch shape it supports. Each result must pass
//! `git fsck --strict` and carry the upstream's refs.
//!
//! Clients: the `git` CLI (protocol v2, v1, v0), dulwich (v2 and v0) and libgit2 through
//! pygit2 (v0 only: libgit2 speaks no v2), both driven by `interop/client.py` with the versions
//! pinned in `interop/requirements.txt`, isomorphic-git (v1, `interop/package.json`) on
//! Node.js, and gitoxide (`gix`, in-process).

mod common;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
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
}

impl Client {
    fn all() -> [Client; 8] {
        [
            Client::Git("2"),
            Client::Git("1"),
            Client::Git("0"),
            Client::Dulwich("2"),
            Client::Dulwich("0"),
            Client::Pygit2,
            Client::Gix,
            Client::Isomorphic,
        ]
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

struct Matrix {
    up: Upstream,
    server: Server,
    upstream_dir: PathBuf,
    url: String,
}

fn matrix() -> Matrix {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let allowed = up.allowed();
    let server = Server::start_with(move |c| {
        c.allowed_upstreams = allowed;
        c.sync_stale_after = Duration::from_millis(50).into();
    });
    let url = server.url_for(&up.segment(), "o/basic");
    Matrix {
        up,
        server,
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
        let expected = upstream_refs(&m, &["refs/heads/", "refs/tags/"]);
        for line in &expected {
            assert!(
                heads.contains(line),
                "{client:?}: {line} missing from {heads:?}"
            );
        }

        // New upstream commits, then a fetch with negotiation.
        let tree = git(&m.upstream_dir, &["rev-parse", "main^{tree}"]);
        let commit = git(
            &m.upstream_dir,
            &[
                "commit-tree",
                tree.trim(),
                "-p",
                "main",
                "-m",
                &format!("{client:?}"),
            ],
        );
        git(
            &m.upstream_dir,
            &["update-ref", "refs/heads/main", commit.trim()],
        );
        std::thread::sleep(Duration::from_millis(100));
        client
            .fetch(&dest, None)
            .unwrap_or_else(|e| panic!("{client:?} fetch: {e}"));
        assert_fsck(&git_dir(&dest));
        assert!(
            heads_and_tags(&dest).contains(&format!("{} refs/heads/main", commit.trim())),
            "{client:?}: fetched main"
        );
    }
    drop(m.server);
    drop(m.up);
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
        if !matches!(client, Client::Dulwich(_)) {
            client
                .fetch(&shallow, Some(3))
                .unwrap_or_else(|e| panic!("{client:?} deepen: {e}"));
            assert_fsck(&git_dir(&shallow));
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
}
