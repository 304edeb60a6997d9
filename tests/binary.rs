//! The real binary, started as the README says, serves a clone.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::*;

/// Kills the server when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_binary_serves_a_clone() {
    let mirror = tempfile::tempdir().unwrap();
    let repo_dir = mirror.path().join("127.0.0.1:9/basic.git");
    std::fs::create_dir_all(repo_dir.parent().unwrap()).unwrap();
    build_fixture("basic", &repo_dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", mirror.path())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")
        .env("LOG_LEVEL", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let running = Running(child);
    let mut lines = BufReader::new(stderr).lines();
    let addr = lines
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
