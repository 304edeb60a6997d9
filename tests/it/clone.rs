//! Clones and ref listings through the server with the real `git` client, protocol v2 and v0.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;

fn clone_and_check(server_fixture: &str, version: &str, mirror: bool) {
    let server = Server::start();
    let url = server.serve_fixture(server_fixture);
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("clone");
    let dest_s = dest.to_str().unwrap();
    let p = proto(version);
    let mode = if mirror { "--mirror" } else { "--no-checkout" };
    git(work.path(), &args(&["clone", "-q", mode, &url, dest_s], &p));
    let git_dir = if mirror {
        dest.clone()
    } else {
        dest.join(".git")
    };
    assert_fsck(&git_dir);
    let served = fixture(server_fixture);
    if mirror {
        assert_eq!(
            refs(&git_dir),
            refs(&served),
            "{server_fixture} v{version}: mirror refs differ"
        );
    } else {
        let ours = git(
            &git_dir,
            &[
                "for-each-ref",
                "--format=%(objectname) %(refname)",
                "refs/remotes/origin/",
                "refs/tags/",
            ],
        );
        let theirs = git(
            &served,
            &[
                "for-each-ref",
                "--format=%(objectname) %(refname)",
                "refs/heads/",
                "refs/tags/",
            ],
        );
        let ours = ours.replace("refs/remotes/origin/", "refs/heads/");
        let ours: Vec<&str> = ours
            .lines()
            .filter(|l| !l.ends_with("refs/heads/HEAD"))
            .collect();
        let theirs: Vec<&str> = theirs.lines().collect();
        assert_eq!(
            ours, theirs,
            "{server_fixture} v{version}: clone refs differ"
        );
        if server_fixture != "empty" {
            git(&dest, &["checkout", "-q", "main"]);
            let head_tree = git(&dest, &["rev-parse", "HEAD^{tree}"]);
            assert_eq!(head_tree, git(&served, &["rev-parse", "main^{tree}"]));
        }
    }
}

#[test]
fn mirror_clone_of_every_fixture() {
    for name in ["basic", "many-refs", "large", "empty"] {
        for v in PROTOCOLS {
            clone_and_check(name, v, true);
        }
    }
}

#[test]
fn working_clone_of_every_fixture() {
    for name in ["basic", "many-refs", "empty"] {
        for v in PROTOCOLS {
            clone_and_check(name, v, false);
        }
    }
}

#[test]
fn ls_remote_matches_the_repository() {
    let server = Server::start();
    for name in ["basic", "many-refs", "empty"] {
        let url = server.serve_fixture(name);
        let direct = fixture(name);
        for v in PROTOCOLS {
            let p = proto(v);
            let work = tempfile::tempdir().unwrap();
            let through = git(work.path(), &args(&["ls-remote", &url], &p));
            let expected = git(
                work.path(),
                &args(&["ls-remote", direct.to_str().unwrap()], &p),
            );
            assert_eq!(through, expected, "{name} v{v}");
        }
    }
}

/// Clone with `flags` through the proxy and directly (`file://`, stock upload-pack) and compare
/// the resulting refs; both must pass fsck.
fn clone_like_git(work: &Path, url: &str, direct: &str, version: &str, flags: &[&str]) -> PathBuf {
    let p = proto(version);
    let work = work.join(flags.join("_").replace('/', "-"));
    std::fs::create_dir_all(&work).unwrap();
    let ours = work.join("ours");
    let theirs = work.join("theirs");
    let mut a = vec!["clone", "-q"];
    a.extend_from_slice(flags);
    git(
        &work,
        &args(&[&a[..], &[url, ours.to_str().unwrap()]].concat(), &p),
    );
    git(
        &work,
        &args(&[&a[..], &[direct, theirs.to_str().unwrap()]].concat(), &p),
    );
    assert_fsck(&ours);
    assert_eq!(refs(&ours), refs(&theirs), "v{version} clone {flags:?}");
    ours
}

#[test]
fn clone_single_branch_and_tags() {
    let server = Server::start();
    let url = server.serve_fixture("basic");
    let served = fixture("basic");
    let direct = format!("file://{}", served.display());
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        let work = work.path();
        // --single-branch uses include-tag: tags pointing into the branch come along.
        let one = clone_like_git(
            work,
            &url,
            &direct,
            v,
            &["--bare", "--single-branch", "--branch", "feature/a"],
        );
        let heads = git(
            &one,
            &["for-each-ref", "--format=%(refname)", "refs/heads/"],
        );
        assert_eq!(heads, "refs/heads/feature/a\n");
        assert!(
            git(&one, &["tag", "--list"]).contains("v1.0\n"),
            "v{v}: include-tag"
        );
        let notags = clone_like_git(work, &url, &direct, v, &["--bare", "--no-tags"]);
        assert_eq!(git(&notags, &["tag", "--list"]), "");
        let all = clone_like_git(work, &url, &direct, v, &["--bare"]);
        assert_eq!(
            git(&all, &["for-each-ref", "refs/tags/"]),
            git(&served, &["for-each-ref", "refs/tags/"]),
            "v{v}: every tag, including a tag of a tag and a tag of a blob"
        );
        clone_like_git(
            work,
            &url,
            &direct,
            v,
            &["--bare", "--single-branch", "--branch", "v2.0-signed-off"],
        );
    }
}

/// A test process leaves nothing in the system's temp directory: fixtures and the `git` HOME
/// live in the cargo target's temp dir, and every test's own directories go with the test.
/// Checked by running another test of this binary with a temp directory of its own.
#[test]
fn a_test_process_leaves_nothing_in_the_temp_dir() {
    let tmp = tempfile::tempdir().unwrap();
    // The harness names a test by its path below the crate: `clone::ls_remote_…`.
    let (_, suite) = module_path!().split_once("::").unwrap();
    let test = format!("{suite}::ls_remote_matches_the_repository");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test.as_str(), "--exact", "--quiet"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the test ran: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
}
