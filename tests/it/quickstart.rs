//! The README's "Quick test without internet" block, extracted from the README and run with
//! `bash` as a newcomer pastes it: twice, as the second paste must work too (issue 21, item 1).

use crate::common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

/// The first ```` ```bash ```` block after the heading that contains "without internet".
fn quick_test_block() -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut lines = readme
        .lines()
        .skip_while(|l| !(l.starts_with('#') && l.contains("without internet")));
    assert!(
        lines.next().is_some(),
        "no heading with \"without internet\""
    );
    let block: Vec<&str> = lines
        .skip_while(|l| *l != "```bash")
        .skip(1)
        .take_while(|l| *l != "```")
        .collect();
    assert!(!block.is_empty(), "no bash block under the heading");
    block.join("\n") + "\n"
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn the_readme_quick_test_works_pasted_twice() {
    let block = quick_test_block();
    let demo = tempfile::tempdir().unwrap();
    let (up, proxy) = (free_port(), free_port());
    for paste in 1..=2 {
        let mut child = Command::new("bash")
            .arg("-s")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(git_env())
            .env("UP", up.to_string())
            .env("PROXY", proxy.to_string())
            .env("DEMO", demo.path())
            .env("BIN", env!("CARGO_BIN_EXE_smart-git-proxy"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(block.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let context = format!("paste {paste}:\nstdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(out.status.success(), "{context}");
        assert!(stderr.contains("Cloning into"), "{context}");
        assert!(!stderr.contains("fatal:"), "{context}");
        let clone = demo.path().join("widgets");
        let upstream = demo.path().join("upstream/acme/widgets.git");
        let tip = git(&upstream, &["rev-parse", "main"]);
        assert_eq!(git(&clone, &["rev-parse", "HEAD"]), tip, "{context}");
        assert!(
            stdout.contains(&tip[..7]),
            "the last line shows the cloned commit: {context}"
        );
        assert_fsck(&clone.join(".git"));
        let mirror = demo
            .path()
            .join(format!("mirrors/127.0.0.1:{up}/acme/widgets.git"));
        assert!(mirror.is_dir(), "{context}");
        // Both background processes are gone: their ports are free for the next paste.
        assert!(!listening(up) && !listening(proxy), "{context}");
    }
}
