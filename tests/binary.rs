//! The real binary, started as the README says, serves a clone.

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_binary_serves_a_clone() {
    let (mirror, repo_dir) = seeded_mirror("basic");
    let running = Running::start(
        mirror.path(),
        &[("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")],
    );
    let addr = running.addr.clone();
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/127.0.0.1:9/basic");
    git(work.path(), &["clone", "-q", &url, "c"]);
    assert_fsck(&work.path().join("c/.git"));
    assert_eq!(
        git(&work.path().join("c"), &["rev-parse", "HEAD"]),
        git(&repo_dir, &["rev-parse", "main"])
    );
    drop(running);
}

#[test]
fn an_invalid_configuration_exits_with_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("LISTEN_ADDR", "nowhere")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LISTEN_ADDR 'nowhere'"));
}
