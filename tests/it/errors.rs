//! Bad input and refusals: every one gets a clear HTTP status or an `ERR` packet, never a
//! panic, and the server keeps serving.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

const UPLOAD_PACK: &str = "/127.0.0.1:9/basic/git-upload-pack";
const V2: (&str, &str) = ("Git-Protocol", "version=2");

fn gzip(data: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("body");
    std::fs::write(&path, data).unwrap();
    let out = std::process::Command::new("gzip")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn unknown_repositories_hosts_and_endpoints() {
    let server = Server::start();
    // No mirror and an upstream that cannot be reached: 502 with the reason, which git prints,
    // in a few words: the upstream URL and the error chain are for the log (issue 19).
    let r = request(
        server.addr,
        "GET",
        "/127.0.0.1:9/nope/info/refs?service=git-upload-pack",
        &[],
        b"",
    );
    assert_eq!(r.status, 502);
    assert_eq!(
        r.text(),
        "cannot mirror 127.0.0.1:9/nope: the upstream is unreachable\n"
    );
    let work = tempfile::tempdir().unwrap();
    let out = git_output(work.path(), &["clone", &server.url("nope"), "x"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot mirror"));
    assert!(!work.path().join("x").exists());

    // Hosts outside ALLOWED_UPSTREAMS.
    let r = request(
        server.addr,
        "GET",
        "/evil.example/o/r/info/refs?service=git-upload-pack",
        &[],
        b"",
    );
    assert_eq!(r.status, 403);
    assert!(
        r.text()
            .contains("upstream host 'evil.example' is not allowed; allowed: 127.0.0.1:9"),
        "{}",
        r.text()
    );
    let r = request(
        server.addr,
        "GET",
        "/127.0.0.1:9/basic/objects/info/packs",
        &[],
        b"",
    );
    assert_eq!(r.status, 404);
    assert_eq!(
        request(server.addr, "GET", "/healthz", &[], b"").status,
        200
    );
}

#[test]
fn pushes_and_dumb_http_are_refused() {
    let server = Server::start();
    let url = server.serve_fixture("basic");
    let r = request(
        server.addr,
        "GET",
        "/127.0.0.1:9/basic/info/refs?service=git-receive-pack",
        &[],
        b"",
    );
    assert_eq!(r.status, 403);
    assert!(r.text().contains("read-only"));
    assert_eq!(
        request(
            server.addr,
            "POST",
            "/127.0.0.1:9/basic/git-receive-pack",
            &[],
            b"0000"
        )
        .status,
        403
    );
    assert_eq!(
        request(server.addr, "GET", "/127.0.0.1:9/basic/info/refs", &[], b"").status,
        403
    );
    assert_eq!(
        request(server.addr, "PUT", UPLOAD_PACK, &[], b"").status,
        405
    );
    assert_eq!(
        request(server.addr, "GET", UPLOAD_PACK, &[], b"").status,
        405
    );

    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", &url, "c"]);
    let c = work.path().join("c");
    git(&c, &["commit", "-q", "--allow-empty", "-m", "x"]);
    let out = git_output(&c, &["push", "origin", "HEAD:main"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("read-only mirror: push to the upstream"),
        "{stderr}"
    );
}

#[test]
fn unsafe_paths_are_400() {
    let server = Server::start();
    server.serve_fixture("basic");
    for path in [
        "/127.0.0.1:9/../basic/info/refs?service=git-upload-pack",
        "/127.0.0.1:9/./basic/info/refs?service=git-upload-pack",
        "/127.0.0.1:9//basic/info/refs?service=git-upload-pack",
        "/127.0.0.1:9/%2e%2e/basic/info/refs?service=git-upload-pack",
        "/127.0.0.1:9/b%61sic/info/refs?service=git-upload-pack",
        "/127.0.0.1:9/ba\\sic/info/refs?service=git-upload-pack",
    ] {
        assert_eq!(
            request(server.addr, "GET", path, &[], b"").status,
            400,
            "{path}"
        );
    }
}

/// What is wrong, the body, extra headers, the expected status.
type BadBody = (
    &'static str,
    Vec<u8>,
    Vec<(&'static str, &'static str)>,
    u16,
);

#[test]
fn malformed_bodies_are_4xx() {
    let server = Server::start_with(|c| c.max_request_body = bytesize::ByteSize::kib(4));
    server.serve_fixture("basic");
    let cases: Vec<BadBody> = vec![
        ("bad length", b"zzzzwant".to_vec(), vec![], 400),
        ("truncated", b"0032want 1111".to_vec(), vec![], 400),
        (
            "bad oid v0",
            pkt(&["want 12345 multi_ack", "0000", "done"]),
            vec![],
            400,
        ),
        (
            "bad oid v2",
            pkt(&["command=fetch", "0001", "want xyz", "0000"]),
            vec![V2],
            400,
        ),
        ("too large", b"0000".repeat(2000), vec![], 413),
        (
            "gzip garbage",
            b"\x1f\x8b\x08\x00garbage".to_vec(),
            vec![("Content-Encoding", "gzip")],
            400,
        ),
        (
            "gzip bomb",
            gzip(&vec![b'0'; 1 << 20]),
            vec![("Content-Encoding", "gzip")],
            413,
        ),
    ];
    for (what, body, headers, status) in cases {
        let r = request(server.addr, "POST", UPLOAD_PACK, &headers, &body);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert!(!r.body.is_empty(), "{what}: a message");
    }
    // Still serving.
    let r = request(
        server.addr,
        "POST",
        UPLOAD_PACK,
        &[V2],
        &pkt(&["command=ls-refs", "0000"]),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn gzip_and_chunked_requests_are_served() {
    let server = Server::start();
    server.serve_fixture("basic");
    let ls = pkt(&["command=ls-refs", "0001", "peel", "symrefs", "0000"]);
    let plain = request(server.addr, "POST", UPLOAD_PACK, &[V2], &ls);
    assert_eq!(plain.status, 200);
    assert!(plain
        .headers
        .contains("application/x-git-upload-pack-result"));
    assert!(plain.text().contains("HEAD symref-target:refs/heads/main"));
    let gz = request(
        server.addr,
        "POST",
        UPLOAD_PACK,
        &[V2, ("Content-Encoding", "gzip")],
        &gzip(&ls),
    );
    assert_eq!(gz.body, plain.body);
    let chunked = request(
        server.addr,
        "POST",
        UPLOAD_PACK,
        &[V2, ("Transfer-Encoding", "chunked")],
        &ls,
    );
    assert_eq!(chunked.body, plain.body);
    // git's probe before a large chunked POST is a lone flush: an empty answer.
    let probe = request(server.addr, "POST", UPLOAD_PACK, &[], b"0000");
    assert_eq!((probe.status, probe.body.len()), (200, 0));
}

#[test]
fn protocol_errors_are_err_packets() {
    let server = Server::start();
    server.serve_fixture("basic");
    let missing = "1234567890123456789012345678901234567890";
    let r = request(
        server.addr,
        "POST",
        UPLOAD_PACK,
        &[V2],
        &pkt(&[
            "command=fetch",
            "0001",
            &format!("want {missing}"),
            "no-progress",
            "done",
            "0000",
        ]),
    );
    assert_eq!(r.status, 200);
    assert!(
        r.text()
            .contains(&format!("ERR upload-pack: not our ref {missing}")),
        "{}",
        r.text()
    );
    // With progress, the answer starts while the mirror syncs: the refusal comes on band 3.
    let r = request(
        server.addr,
        "POST",
        UPLOAD_PACK,
        &[V2],
        &pkt(&[
            "command=fetch",
            "0001",
            &format!("want {missing}"),
            "done",
            "0000",
        ]),
    );
    let text = r.text();
    assert!(text.starts_with("000dpackfile\n"), "{text}");
    assert!(
        text.contains(&format!("\u{3}upload-pack: not our ref {missing}")),
        "{text}"
    );
    let r = request(
        server.addr,
        "POST",
        UPLOAD_PACK,
        &[V2],
        &pkt(&["command=frobnicate", "0000"]),
    );
    assert!(
        r.text().contains("ERR invalid command 'frobnicate'"),
        "{}",
        r.text()
    );
    let r = request(
        server.addr,
        "POST",
        UPLOAD_PACK,
        &[V2],
        &pkt(&["command=fetch", "0001", "sideband-all", "0000"]),
    );
    assert!(
        r.text().contains("ERR unexpected line: 'sideband-all'"),
        "{}",
        r.text()
    );
    // Fetches that ask for nothing: no arguments, only haves, only done.
    for args in [
        &["command=fetch", "0000"][..],
        &["command=fetch", "0001", &format!("have {missing}"), "0000"],
        &["command=fetch", "0001", "done", "0000"],
    ] {
        let r = request(server.addr, "POST", UPLOAD_PACK, &[V2], &pkt(args));
        assert_eq!(r.status, 200);
        assert!(
            r.text()
                .contains("ERR fetch: expected at least one want or want-ref line"),
            "{args:?}: {}",
            r.text()
        );
    }
    let r = request(
        server.addr,
        "POST",
        UPLOAD_PACK,
        &[],
        &pkt(&["have 1234", "0000"]),
    );
    assert!(
        r.text().contains("ERR protocol error: expected want list"),
        "{}",
        r.text()
    );
}

#[test]
fn want_ref_is_answered_in_wanted_refs_or_refused() {
    let server = Server::start();
    server.serve_fixture("basic");
    let main = git(&fixture("basic"), &["rev-parse", "refs/heads/main"]);
    let r = request(
        server.addr,
        "POST",
        UPLOAD_PACK,
        &[V2],
        &pkt(&[
            "command=fetch",
            "0001",
            "want-ref refs/heads/main",
            "no-progress",
            "done",
            "0000",
        ]),
    );
    let text = r.text();
    let wanted = text.find("wanted-refs\n").expect("wanted-refs section");
    assert!(text[wanted..].contains(&format!("{} refs/heads/main\n", main.trim())));
    assert!(wanted < text.find("packfile\n").expect("packfile section"));
    let r = request(
        server.addr,
        "POST",
        UPLOAD_PACK,
        &[V2],
        &pkt(&[
            "command=fetch",
            "0001",
            "want-ref refs/heads/nope",
            "done",
            "0000",
        ]),
    );
    assert!(
        r.text().contains("ERR unknown ref refs/heads/nope"),
        "{}",
        r.text()
    );
}

#[test]
fn want_semantics_differ_between_v2_and_v0() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("basic.git");
    build_fixture("basic", &served);
    let url = server.link("basic", &served);
    // A commit in the repository that no ref reaches.
    let tree = git(&served, &["rev-parse", "main^{tree}"]);
    let dangling = git(&served, &["commit-tree", tree.trim(), "-m", "dangling"]);
    let dangling = dangling.trim();
    let missing = "1234567890123456789012345678901234567890";
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &["init", "-q", "c"]);
        let c = work.path().join("c");
        let p = proto(v);
        let out = git_output(&c, &args(&["fetch", &url, missing], &p), &[]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("not our ref {missing}")),
            "v{v}: {stderr}"
        );

        let out = git_output(&c, &args(&["fetch", &url, dangling], &p), &[]);
        if v == "2" {
            assert!(
                out.status.success(),
                "v2 serves any object present: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_fsck(&c.join(".git"));
        } else {
            assert!(!out.status.success(), "v0 serves only what refs reach");
            assert!(String::from_utf8_lossy(&out.stderr).contains("not our ref"));
        }
        // A commit that a ref reaches but is not a tip is fine in both.
        let deep = git(&served, &["rev-parse", "main~3"]);
        git(&c, &args(&["fetch", "-q", &url, deep.trim()], &p));
        assert_fsck(&c.join(".git"));
    }
}

#[test]
fn a_client_that_disconnects_mid_pack_frees_its_slot() {
    let server = Server::start_with(|c| c.max_concurrent_packs = Some(1));
    server.serve_fixture("large");
    let main = git(&fixture("large"), &["rev-parse", "main"]);
    let body = pkt(&[
        "command=fetch",
        "0001",
        &format!("want {}", main.trim()),
        "ofs-delta",
        "done",
        "0000",
    ]);
    for _ in 0..3 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        let head = format!(
            "POST /127.0.0.1:9/large/git-upload-pack HTTP/1.1\r\nHost: x\r\nGit-Protocol: version=2\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body).unwrap();
        let mut first = [0u8; 512];
        let _ = s.read(&mut first).unwrap();
        drop(s);
    }
    // With one pack slot, this would wait forever if an abandoned request kept it.
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &["clone", "-q", "--bare", &server.url("large"), "c"],
    );
    assert_fsck(&work.path().join("c"));
}

/// `/healthz` is liveness; `/readyz` also needs a writable `MIRROR_DIR`.
#[test]
fn readiness_follows_the_mirror_directory() {
    let server = Server::start();
    let get = |path: &str| request(server.addr, "GET", path, &[], b"");
    assert_eq!(get("/readyz").status, 200);
    std::fs::remove_dir_all(server.mirror.path()).unwrap();
    let r = get("/readyz");
    assert_eq!(r.status, 503);
    assert!(
        r.text().contains("MIRROR_DIR is not writable"),
        "{}",
        r.text()
    );
    assert_eq!(get("/healthz").status, 200, "still alive");
    std::fs::create_dir(server.mirror.path()).unwrap();
    assert_eq!(get("/readyz").status, 200);
}

/// Issue 19: a full disk is not ready, below the free-space floor the pack cache keeps (here a
/// tenth of a 1 MiB filesystem), and ready again once there is room.
#[test]
fn readiness_needs_free_space() {
    let outer = tempfile::tempdir().unwrap();
    let disk = outer.path().join("disk");
    let Some(_tmpfs) = Tmpfs::mount(&disk, "1m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let mirror = tempfile::tempdir_in(&disk).unwrap();
    let filler = disk.join("filler");
    let server = Server::start_in(mirror, |_| {});
    let get = |path: &str| request(server.addr, "GET", path, &[], b"");
    assert_eq!(get("/readyz").status, 200);
    std::fs::write(&filler, vec![1u8; 960 << 10]).unwrap();
    let r = get("/readyz");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().contains("MIRROR_DIR is nearly full"),
        "{}",
        r.text()
    );
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(get("/readyz").status, 200);
    drop(server);
}

/// `/metrics`: every family described, durations as histograms, refusals by reason, build and
/// process figures.
#[test]
fn metrics_are_described_and_count_refusals() {
    let server = Server::start();
    let r = request(
        server.addr,
        "GET",
        "/example.com/o/r/info/refs?service=git-upload-pack",
        &[],
        b"",
    );
    assert_eq!(r.status, 403);
    let r = request(
        server.addr,
        "POST",
        &format!("/{HOST}/r/git-upload-pack"),
        &[],
        b"zzzz",
    );
    assert_eq!(r.status, 400);
    let text = request(server.addr, "GET", "/metrics", &[], b"").text();
    for needle in [
        "# HELP smart_git_proxy_requests_total",
        "# HELP smart_git_proxy_refusals_total",
        "smart_git_proxy_refusals_total{reason=\"host-not-allowed\"}",
        "smart_git_proxy_refusals_total{reason=\"malformed\"}",
        "smart_git_proxy_request_seconds_bucket{command=\"upload-pack\",le=\"0.005\"}",
        "smart_git_proxy_build_info{version=\"",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(text.contains(needle), "{needle} missing in:\n{text}");
    }
}

/// Issue 19: a 5xx answer gives the client a short cause; the URL and the error chain are in
/// the log.
#[test]
fn server_errors_are_short_for_the_client_and_whole_in_the_log() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mirror = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", mirror.path())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")
        .stderr(Stdio::from(log.reopen().unwrap()))
        .spawn()
        .unwrap();
    let _child = Killed(child);
    let mut addr = None;
    wait_until("the server listens", || {
        addr = BufReader::new(log.reopen().unwrap())
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                let rest = l.split("addr=").nth(1)?;
                rest.split_whitespace().next().map(str::to_owned)
            });
        addr.is_some()
    });
    let addr: std::net::SocketAddr = addr.unwrap().parse().unwrap();
    let r = request(
        addr,
        "GET",
        "/127.0.0.1:9/o/r/info/refs?service=git-upload-pack",
        &[],
        b"",
    );
    assert_eq!(r.status, 502);
    assert_eq!(
        r.text(),
        "cannot mirror 127.0.0.1:9/o/r: the upstream is unreachable\n"
    );
    let read = || std::fs::read_to_string(log.path()).unwrap();
    wait_until("the failure is logged", || read().contains("status=502"));
    let logged = read();
    assert!(
        logged.contains("http://127.0.0.1:9/o/r") && logged.contains("Connection refused"),
        "{logged}"
    );
}

/// Issue 21, item 8: an `ALLOWED_UPSTREAMS` entry written `host:port` is fetched over HTTPS.
/// Against a plain-HTTP server the TLS handshake fails (rustls: "received corrupt message of
/// type InvalidContentType");
/// the client is told that the entry needs `http://`, and the log names the URL to write.
#[test]
fn a_plain_http_upstream_listed_without_a_scheme_is_pointed_out() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let up = upstream::Upstream::start();
    up.add_fixture("o/r", "basic");
    let segment = up.segment();
    let mirror = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", mirror.path())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ALLOWED_UPSTREAMS", &segment)
        .stderr(Stdio::from(log.reopen().unwrap()))
        .spawn()
        .unwrap();
    let _child = Killed(child);
    let mut addr = None;
    wait_until("the server listens", || {
        addr = BufReader::new(log.reopen().unwrap())
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                let rest = l.split("addr=").nth(1)?;
                rest.split_whitespace().next().map(str::to_owned)
            });
        addr.is_some()
    });
    let addr = addr.unwrap();
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/{segment}/o/r");
    let out = git_output(work.path(), &["clone", &url, "c"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot mirror {segment}/o/r: the upstream answers in plain HTTP, not HTTPS: its \
             ALLOWED_UPSTREAMS entry needs http://"
        )),
        "{stderr}"
    );
    let read = || std::fs::read_to_string(log.path()).unwrap();
    wait_until("the failure is logged", || read().contains("status=502"));
    let logged = read();
    assert!(
        logged.contains(&format!(
            "https://{segment} answers in plain HTTP, not HTTPS: write it as http://{segment} in \
             ALLOWED_UPSTREAMS"
        )),
        "{logged}"
    );
}
