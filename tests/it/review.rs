//! Hostile input found in review: a corrupt commit-graph in a mirror never makes a request
//! panic, and what is served from it is still a correct repository or a clean failure.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use smart_git_proxy::mirror::maintain;
use smart_git_proxy::pack::graph;

/// Panics anywhere in this test process (the server runs in it), counted by a hook installed
/// once.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// The chunks of a commit-graph file: id and byte range.
fn chunks(graph: &[u8]) -> Vec<([u8; 4], std::ops::Range<usize>)> {
    let n = usize::from(graph[6]);
    let entry = |i: usize| {
        let at = 8 + i * 12;
        let id: [u8; 4] = graph[at..at + 4].try_into().unwrap();
        let offset = u64::from_be_bytes(graph[at + 4..at + 12].try_into().unwrap());
        (id, usize::try_from(offset).unwrap())
    };
    (0..n)
        .map(|i| {
            let (id, start) = entry(i);
            (id, start..entry(i + 1).1)
        })
        .collect()
}

fn chunk(graph: &[u8], id: &[u8; 4]) -> std::ops::Range<usize> {
    chunks(graph)
        .into_iter()
        .find(|(i, _)| i == id)
        .map(|(_, r)| r)
        .unwrap_or_else(|| panic!("chunk {}", String::from_utf8_lossy(id)))
}

/// Each commit's `CDAT` entry (tree, parent 1, parent 2, generation and time) rewritten by
/// `edit(position, entry)`.
fn edit_cdat(graph: &mut [u8], mut edit: impl FnMut(u32, &mut [u8])) {
    let cdat = chunk(graph, b"CDAT");
    for (i, entry) in graph[cdat].chunks_exact_mut(36).enumerate() {
        edit(u32::try_from(i).unwrap(), entry);
    }
}

/// A way to damage a commit-graph's bytes.
type Corruption = Box<dyn Fn(&mut Vec<u8>)>;

/// Ways to damage a commit-graph, each named.
fn corruptions() -> Vec<(&'static str, Corruption)> {
    vec![
        ("empty", Box::new(|g: &mut Vec<u8>| g.clear())),
        (
            "truncated to half",
            Box::new(|g: &mut Vec<u8>| g.truncate(g.len() / 2)),
        ),
        (
            "truncated in the chunk table",
            Box::new(|g: &mut Vec<u8>| g.truncate(20)),
        ),
        (
            "fanout not monotonic",
            Box::new(|g: &mut Vec<u8>| {
                let fan = chunk(g, b"OIDF");
                g[fan.start..fan.start + 4].copy_from_slice(&u32::MAX.to_be_bytes());
            }),
        ),
        (
            "fanout counts more commits than listed",
            Box::new(|g: &mut Vec<u8>| {
                let fan = chunk(g, b"OIDF");
                let end = fan.end;
                g[end - 4..end].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
            }),
        ),
        (
            "parents out of range",
            Box::new(|g: &mut Vec<u8>| {
                edit_cdat(g, |_, e| {
                    e[20..24].copy_from_slice(&0x6fff_fff0u32.to_be_bytes())
                })
            }),
        ),
        (
            "every commit its own parent",
            Box::new(|g: &mut Vec<u8>| {
                edit_cdat(g, |i, e| e[20..24].copy_from_slice(&i.to_be_bytes()))
            }),
        ),
        (
            "every commit a root",
            Box::new(|g: &mut Vec<u8>| {
                edit_cdat(g, |_, e| {
                    e[20..24].copy_from_slice(&0x7000_0000u32.to_be_bytes());
                    e[24..28].copy_from_slice(&0x7000_0000u32.to_be_bytes());
                })
            }),
        ),
        (
            "second parent in a missing extra-edge list",
            Box::new(|g: &mut Vec<u8>| {
                edit_cdat(g, |_, e| {
                    e[24..28].copy_from_slice(&0x8000_0005u32.to_be_bytes())
                })
            }),
        ),
        (
            "trees that do not exist",
            Box::new(|g: &mut Vec<u8>| edit_cdat(g, |_, e| e[..20].fill(0xab))),
        ),
        (
            "times and generations garbage",
            Box::new(|g: &mut Vec<u8>| edit_cdat(g, |_, e| e[28..36].fill(0xff))),
        ),
        (
            "ids not sorted",
            Box::new(|g: &mut Vec<u8>| {
                let oidl = chunk(g, b"OIDL");
                g[oidl].reverse();
            }),
        ),
    ]
}

/// Clone, shallow clone and deepen, and fetch with a common history from `url` (protocol
/// v2): each either succeeds with a repository `git fsck --strict` accepts, or fails.
fn exercise(url: &str, what: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let mut check = |step: &str, dir: &Path, out: std::process::Output| {
        if out.status.success() {
            let fsck = git_output(dir, &["fsck", "--strict", "--no-progress"], &[]);
            if !fsck.status.success() {
                failures.push(format!(
                    "{what}: {step}: served a broken repository: {}",
                    String::from_utf8_lossy(&fsck.stderr).trim()
                ));
            }
        } else {
            failures.push(format!(
                "{what}: {step}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        out.status.success()
    };
    let v2 = ["-c", "protocol.version=2"];
    let work = tempfile::tempdir().unwrap();
    let out = git_output(
        work.path(),
        &args(&["clone", "--mirror", url, "m"], &[]),
        &[],
    );
    check("clone --mirror", &work.path().join("m"), out);
    let out = git_output(
        work.path(),
        &[v2[0], v2[1], "clone", "--bare", "--depth=2", url, "s"],
        &[],
    );
    let s = work.path().join("s");
    if check("clone --depth=2", &s, out) {
        let out = git_output(&s, &[v2[0], v2[1], "fetch", "--deepen=30", "origin"], &[]);
        check("fetch --deepen=30", &s, out);
        // Negotiation over the history the shallow clone has.
        let out = git_output(&s, &[v2[0], v2[1], "fetch", "--unshallow", "origin"], &[]);
        check("fetch --unshallow", &s, out);
    }
    failures
}

/// Whether walks in the repository at `dir` read its commit-graph.
fn graph_is_used(dir: &Path) -> bool {
    let repo = gix::open(dir).unwrap();
    graph::open(&smart_git_proxy::pack::db(&repo)).is_some()
}

#[test]
fn graphs_git_writes_verify() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("r.git");
    build_fixture("basic", &dir);
    git(&dir, &["commit-graph", "write", "--reachable"]);
    assert!(graph_is_used(&dir));
    // A split chain, as `git maintenance` or `fetch.writeCommitGraph` leave it.
    let _ = std::fs::remove_file(dir.join("objects/info/commit-graph"));
    git(&dir, &["commit-graph", "write", "--reachable", "--split"]);
    assert!(dir
        .join("objects/info/commit-graphs/commit-graph-chain")
        .is_file());
    assert!(graph_is_used(&dir));
}

#[test]
fn a_corrupt_commit_graph_never_panics_and_never_serves_a_broken_repository() {
    count_panics();
    let mut failures = Vec::new();
    for (what, corrupt) in corruptions() {
        let server = Server::start_with(|c| c.pack_cache_max_size = bytesize::ByteSize::b(0));
        let dir = server.repo_dir("graph");
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        build_fixture("basic", &dir);
        let outcome = maintain_now(&dir);
        assert!(outcome.commit_graph.is_some_and(|n| n > 0), "{outcome:?}");
        assert!(graph_is_used(&dir), "our own graph verifies");
        let path = dir.join("objects/info/commit-graph");
        let mut graph = std::fs::read(&path).unwrap();
        corrupt(&mut graph);
        std::fs::write(&path, &graph).unwrap();

        failures.extend(exercise(&server.url("graph"), what));
        assert_eq!(PANICS.load(Ordering::SeqCst), 0, "{what}: a panic");
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// An empty `ADMIN_TOKEN` or `WEBHOOK_SECRET` (as `ADMIN_TOKEN=` in an environment file
/// leaves it) would turn the admin API or the webhooks on with the empty string as their
/// secret, which any request without credentials presents: the server refuses to start.
#[test]
fn empty_secrets_are_refused_at_start() {
    let mirror = tempfile::tempdir().unwrap();
    for key in ["ADMIN_TOKEN", "WEBHOOK_SECRET"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("MIRROR_DIR", mirror.path())
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")
            .env(key, "")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A server that starts would serve until killed.
        let mut exited = None;
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until("the server to refuse to start", || {
                exited = child.try_wait().unwrap();
                exited.is_some()
            })
        }));
        if waited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{key}: the server started with an empty secret");
        }
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(exited.is_some_and(|s| !s.success()), "{key}: {stderr}");
        assert!(stderr.contains(&format!("{key} is empty")), "{stderr}");
    }
}

/// A `User-Agent` is the client's text: in the text log it is quoted, so that it cannot add
/// fields (`outcome=...`) or end the line's fields early.
#[test]
fn user_agents_cannot_forge_log_fields() {
    use std::io::{BufRead, BufReader};
    let mirror = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", mirror.path())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")
        .env("LOG_FORMAT", "text")
        .env("LOG_LEVEL", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let addr = lines
        .by_ref()
        .find_map(|l| {
            l.split("addr=")
                .nth(1)
                .and_then(|a| a.split_whitespace().next())
                .map(str::to_owned)
        })
        .expect("the server logs its address");
    let forged = r#"evil" repo="victim/repo" outcome=ok x="#;
    let r = request(
        addr.parse().unwrap(),
        "GET",
        "/healthz",
        &[("User-Agent", forged)],
        b"",
    );
    assert_eq!(r.status, 200);
    let answered = lines
        .find(|l| l.contains("answered"))
        .expect("the request is logged");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        answered.contains(r#"agent="evil\" repo=\"victim/repo\" outcome=ok x=""#),
        "{answered}"
    );
}

/// Signed but hostile webhook payloads (nesting deeper than any parser's stack, a huge string,
/// the wrong types, a clone URL that climbs out of the mirror directory), and admin queries with
/// hostile values: each is answered with a status, the server keeps serving, nothing panics.
#[test]
fn hostile_payloads_and_queries_are_answered() {
    count_panics();
    let server = Server::start_with(|c| {
        c.webhook_secret = Some("s".into());
        c.admin_token = Some("t".into());
    });
    let sign = |body: &[u8]| {
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s").unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    };
    let deep = format!(
        "{{\"repository\":{}{}}}",
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    let long = format!(
        "{{\"repository\":{{\"clone_url\":\"http://127.0.0.1:9/{}\"}}}}",
        "a".repeat(1 << 20)
    );
    let payloads: [(&str, Vec<u8>, u16); 5] = [
        ("deep", deep.into_bytes(), 400),
        ("long", long.into_bytes(), 202),
        ("types", br#"{"repository":{"clone_url":7}}"#.to_vec(), 400),
        (
            "climbs",
            br#"{"repository":{"clone_url":"http://127.0.0.1:9/o/../../etc.git"}}"#.to_vec(),
            202,
        ),
        ("not json", b"\xff\xfe{".to_vec(), 400),
    ];
    for (what, body, status) in payloads {
        let sig = sign(&body);
        let r = request(
            server.addr,
            "POST",
            "/webhooks/github",
            &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
            &body,
        );
        assert_eq!(r.status, status, "{what}: {}", r.text());
    }
    let bearer = [("Authorization", "Bearer t")];
    let cursor = format!("/api/v1/mirrors?cursor={}", "z".repeat(16 << 10));
    for (path, status) in [
        ("/api/v1/mirrors?limit=-1", 400),
        ("/api/v1/mirrors?limit=99999999999999999999999", 400),
        ("/api/v1/mirrors?limit=0", 200),
        ("/api/v1/mirrors?limit=1&limit=2", 400),
        ("/api/v1/mirrors?cursor=%ff%fe", 200),
        (cursor.as_str(), 200),
    ] {
        let r = request(server.addr, "GET", path, &bearer, b"");
        assert_eq!(r.status, status, "{path}: {}", r.text());
    }
    for path in [
        "/api/v1/mirrors/127.0.0.1:9/o/%2e%2e/x/sync",
        "/api/v1/mirrors/127.0.0.1:9/../../x/sync",
        "/api/v1/mirrors//sync",
        "/api/v1/mirrors/sync",
    ] {
        let r = request(server.addr, "POST", path, &bearer, b"");
        assert!(
            [400, 404].contains(&r.status),
            "{path}: {} {}",
            r.status,
            r.text()
        );
    }
    assert_eq!(
        request(server.addr, "GET", "/healthz", &[], b"").status,
        200
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

/// A maintenance lock taken while eviction held it and moved the mirror away is a lock on the
/// file of the removed mirror: the waiter must lock the file the path names now, or it would
/// run beside a sync of a mirror created anew at the same path.
#[test]
fn a_lock_taken_after_the_mirror_moved_is_the_new_mirrors() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("r.git");
    std::fs::create_dir_all(&dir).unwrap();
    let held = maintain::lock(&dir).unwrap();
    let waiter = {
        let dir = dir.clone();
        std::thread::spawn(move || maintain::lock(&dir).unwrap())
    };
    // The waiter is blocked on the lock file: /proc/locks lists it with "->" and its inode.
    let inode = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.join("smart-git-proxy-maintenance.lock"))
            .unwrap()
            .ino()
    };
    wait_until("the waiter to block on the lock", || {
        std::fs::read_to_string("/proc/locks")
            .unwrap()
            .lines()
            .any(|l| l.contains("->") && l.contains(&format!(":{inode} ")))
    });
    // Evicted: moved aside and deleted; then created anew at the same path.
    let aside = root.path().join(".evicted-r");
    std::fs::rename(&dir, &aside).unwrap();
    std::fs::remove_dir_all(&aside).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    drop(held);
    let _lock = waiter.join().unwrap();
    assert!(
        maintain::try_lock(&dir).unwrap().is_none(),
        "the waiter holds the lock of the mirror at the path"
    );
}

/// A GitHub delivery without a well-formed `X-Hub-Signature-256` cannot be authentic: it is
/// refused before its body is read (here, a body over the limit is not even looked at).
#[test]
fn unsigned_github_deliveries_are_refused_before_their_body_is_read() {
    let server = Server::start_with(|c| {
        c.webhook_secret = Some("s".into());
        c.max_request_body = bytesize::ByteSize::kib(1);
        c.max_buffered_bodies = bytesize::ByteSize::kib(64);
    });
    let big = vec![b' '; 4096];
    for signature in [None, Some("sha1=00"), Some("sha256=zz"), Some("sha256=")] {
        let mut headers = vec![("X-GitHub-Event", "push")];
        headers.extend(signature.map(|s| ("X-Hub-Signature-256", s)));
        let r = request(server.addr, "POST", "/webhooks/github", &headers, &big);
        assert_eq!(r.status, 401, "{signature:?}: {}", r.text());
    }
    // A well-formed signature gets the body read (and refused as too large).
    let sig = format!("sha256={}", "0".repeat(64));
    let r = request(
        server.addr,
        "POST",
        "/webhooks/github",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
        &big,
    );
    assert_eq!(r.status, 413, "{}", r.text());
}
