//! The hostile-input suite (issue 9): for each defect found by attacking the proxy, a test that
//! repeats the attack and asserts the fixed behaviour. The other auth defects (#1–#3, #5, #6),
//! crash leftovers (#13) and protocol edges (#14, #15) have theirs in `auth.rs`, `mirror.rs`,
//! `errors.rs` and unit tests.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::upstream::{Mode, Upstream};
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A proxy in front of `up`, adjusted by `adjust`. The upstream timeouts stay at their
/// generous defaults: the test upstream sends nothing until `git http-backend` has finished,
/// which on a loaded machine can take seconds.
fn proxy(up: &Upstream, adjust: impl FnOnce(&mut smart_git_proxy::config::Config)) -> Server {
    Server::in_front_of(up, move |c| {
        c.sync_stale_after = HOUR.into();
        adjust(c);
    })
}

/// Send a request without caring whether the server reads all of it (it may answer early and
/// close), then read the answer's status line.
fn send_raw(addr: &str, head: &str, body: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// `count` bytes of zeros, gzipped (about 1 KiB on the wire per MiB).
fn gzip_bomb(count: u64) -> Vec<u8> {
    let mut zeros = Command::new("head")
        .args(["-c", &count.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Command::new("gzip")
        .arg("-1")
        .stdin(zeros.stdout.take().unwrap())
        .output()
        .unwrap();
    zeros.wait().unwrap();
    out.stdout
}

/// #7: concurrent gzip bombs are cut at MAX_REQUEST_BODY or refused once the shared body
/// budget is spent, and the process's peak memory stays near the budget.
#[test]
fn concurrent_gzip_bombs_keep_memory_bounded() {
    let (mirror, _) = seeded_mirror("basic");
    let running = Running::start(
        mirror.path(),
        &[
            ("ALLOWED_UPSTREAMS", "http://127.0.0.1:9"),
            ("MAX_REQUEST_BODY", "16MiB"),
            ("MAX_BUFFERED_BODIES", "32MiB"),
        ],
    );
    let before = running.status_kib("VmHWM");
    let bomb = Arc::new(gzip_bomb(256 << 20));
    let head = format!(
        "POST /127.0.0.1:9/basic/git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Encoding: gzip\r\nContent-Type: application/x-git-upload-pack-request\r\n\
         Content-Length: {}\r\n\r\n",
        bomb.len()
    );
    let start = Arc::new(Barrier::new(8));
    let statuses: Vec<Option<u16>> = (0..8)
        .map(|_| {
            let (bomb, head, start, addr) = (
                Arc::clone(&bomb),
                head.clone(),
                Arc::clone(&start),
                running.addr.clone(),
            );
            std::thread::spawn(move || {
                start.wait();
                send_raw(&addr, &head, &bomb)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let peak = running.status_kib("VmHWM");
    eprintln!(
        "8 gzip bombs of 256 MiB ({} KiB each on the wire): {statuses:?}; peak RSS {} MiB \
         (before: {} MiB)",
        bomb.len() / 1024,
        peak / 1024,
        before / 1024
    );
    // `None`: the connection was reset before the answer was read (the server closes a
    // connection whose body it did not read).
    assert!(
        statuses.iter().all(|s| matches!(s, Some(413 | 503) | None)),
        "{statuses:?}"
    );
    assert!(statuses.contains(&Some(413)), "{statuses:?}");
    // Without the budget, eight 16 MiB bodies (32 MiB of capacity each) alone are 256 MiB.
    assert!(
        peak < before + 100 * 1024,
        "peak RSS {peak} KiB, before {before} KiB"
    );
    // The budget is given back: a normal request is served.
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &format!("http://{}/127.0.0.1:9/basic", running.addr),
            "c",
        ],
    );
}

/// #7: a body held open near its end is cut at BODY_READ_TIMEOUT and its memory freed.
#[test]
fn a_body_held_open_times_out() {
    let server = Server::start_with(|c| {
        c.body_read_timeout = Duration::from_secs(1).into();
        c.max_buffered_bodies = bytesize::ByteSize::mib(1);
        c.max_request_body = bytesize::ByteSize::mib(1);
    });
    server.serve_fixture("basic");
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = vec![b'0'; 1000 * 1024];
    write!(
        s,
        "POST /{HOST}/basic/git-upload-pack HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len() + 1
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("BODY_READ_TIMEOUT"), "{answer}");
    // The nearly whole budget that body held is free again.
    let (_work, out) = fetch_into_new_repo(&server.url("basic"), "main", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The directories below `root`, except the pack cache.
fn directories(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            // The proxy's own caches, not mirrors.
            let cache = entry.file_name() == ".pack-cache" || entry.file_name() == ".lfs-cache";
            if entry.file_type().unwrap().is_dir() && !cache {
                out.push(entry.path().display().to_string());
                pending.push(entry.path());
            }
        }
    }
    out
}

/// #8: unknown repositories are answered 404, from memory after the first time, and leave
/// nothing on disk; deep paths are refused before anything is created.
#[test]
fn unknown_repositories_cost_one_upstream_request_per_ttl() {
    let up = Upstream::start();
    up.add_fixture("o/real", "basic");
    let server = proxy(&up, |_| {});
    for round in 0..3 {
        for i in 0..20 {
            let r = request(
                server.addr,
                "GET",
                &format!(
                    "/{}/o/missing-{i}/info/refs?service=git-upload-pack",
                    up.segment()
                ),
                &[],
                b"",
            );
            assert_eq!(r.status, 404, "round {round}: {}", r.text());
        }
    }
    let asked = up.count("missing-");
    eprintln!("60 requests for 20 unknown repositories: {asked} upstream requests");
    assert_eq!(asked, 20);
    let deep = format!(
        "/{}/{}r/info/refs?service=git-upload-pack",
        up.segment(),
        "d/".repeat(1900)
    );
    assert_eq!(request(server.addr, "GET", &deep, &[], b"").status, 400);
    assert_eq!(directories(server.mirror.path()), Vec::<String>::new());
    // A repository that appears upstream is found once the TTL passed (here: a new name).
    up.add_fixture("o/missing-later", "basic");
    let (_work, out) = fetch_into_new_repo(
        &server.url_for(&up.segment(), "o/missing-later"),
        "main",
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// #9: a flood of want-misses (random SHAs) shares want-miss syncs, at most one per
/// WANT_MISS_SYNC_INTERVAL, also while the upstream fails.
#[test]
fn a_want_miss_flood_shares_backed_off_syncs() {
    let up = Upstream::start();
    up.add_fixture("o/basic", "basic");
    let server = proxy(&up, |c| {
        c.want_miss_sync_interval = Duration::from_secs(2).into();
    });
    let segment = up.segment();
    let created = request(
        server.addr,
        "GET",
        &format!("/{segment}/o/basic/info/refs?service=git-upload-pack"),
        &[],
        b"",
    );
    assert_eq!(created.status, 200);
    for mode in [Mode::Normal, Mode::Fail] {
        up.set_mode(mode);
        // Each request once: `up.count` would count `info/refs?service=git-upload-pack` under
        // both needles, and a failed sync (ls-refs, then the handshake) as three requests.
        let upstream_requests = || {
            up.log()
                .iter()
                .filter(|l| l.path.ends_with("/git-upload-pack") || l.path.ends_with("/info/refs"))
                .count()
        };
        let before = upstream_requests();
        let started = Instant::now();
        let threads: Vec<_> = (0..30)
            .map(|i| {
                let (addr, segment) = (server.addr, segment.clone());
                std::thread::spawn(move || {
                    let want = format!("{:040x}", 0xdead_0000_u64 + i);
                    let r = request(
                        addr,
                        "POST",
                        &format!("/{segment}/o/basic/git-upload-pack"),
                        &[("Git-Protocol", "version=2")],
                        &pkt(&[
                            "command=fetch",
                            "0001",
                            &format!("want {want}"),
                            "done",
                            "0000",
                        ]),
                    );
                    (r.status, r.text().contains("not our ref"))
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), (200, true), "{mode:?}");
        }
        let syncs = upstream_requests() - before;
        let elapsed = started.elapsed();
        eprintln!("30 want-misses ({mode:?} upstream) in {elapsed:?}: {syncs} upstream requests");
        // Each sync is one or two requests (ls-refs, then a handshake when it fails); at most
        // one sync per started interval.
        let intervals = elapsed.as_secs() / 2 + 1;
        assert!(
            syncs <= 2 * intervals as usize,
            "{syncs} for {intervals} intervals"
        );
    }
}

/// Build a repository in `dir` with `git fast-import` from `stream`.
fn fast_import(dir: &Path, stream: &str) {
    git(
        dir.parent().unwrap(),
        &["init", "-q", "--bare", dir.to_str().unwrap()],
    );
    let mut child = Command::new("git")
        .current_dir(dir)
        .args(["fast-import", "--quiet"])
        .envs(git_env())
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stream.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// A fast-import commit on `branch` at `time` with a mark, its parent mark, and no files.
fn commit(out: &mut String, branch: &str, mark: usize, parent: Option<usize>, time: i64) {
    out.push_str(&format!(
        "commit refs/heads/{branch}\nmark :{mark}\ncommitter T <t@example.com> {time} +0000\n\
         data 2\nc\n"
    ));
    if let Some(p) = parent {
        out.push_str(&format!("from :{p}\n"));
    }
    out.push('\n');
}

/// #10: haves crafted to make every readiness check re-walk the history (common haves that are
/// not ancestors of the want, each older than the last) cost one traversal in all; and the
/// traversal stops when the client goes away.
#[test]
fn crafted_haves_cost_one_traversal() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("r.git");
    let (main, side) = (1500, 1500);
    let mut stream = String::new();
    commit(&mut stream, "main", 1, None, 1_000_000);
    for i in 2..=main {
        commit(
            &mut stream,
            "main",
            i,
            Some(i - 1),
            1_000_000 + 10 * i as i64,
        );
    }
    commit(&mut stream, "side", main + 1, Some(1), 2_000_000);
    for j in 2..=side {
        let mark = main + j;
        commit(
            &mut stream,
            "side",
            mark,
            Some(mark - 1),
            2_000_000 + j as i64,
        );
    }
    fast_import(&dir, &stream);
    let repo = gix::open(&dir).unwrap();
    let db = smart_git_proxy::pack::db(&repo);
    let id = |rev: &str| {
        gix::ObjectId::from_hex(git(&dir, &["rev-parse", rev]).trim().as_bytes()).unwrap()
    };
    let want = [id("side")];
    // Every main commit but the root, which the side branch grew from, and its child (the
    // parents of a have count as the client's too).
    let haves: Vec<gix::ObjectId> = git(&dir, &["rev-list", "main~0", "^main~1498"])
        .lines()
        .map(|l| gix::ObjectId::from_hex(l.as_bytes()).unwrap())
        .collect();
    let interrupt = AtomicBool::new(false);
    let mut neg = smart_git_proxy::upload_pack::Negotiator::new(&repo, &db, &want, &interrupt);
    for have in &haves {
        neg.have(*have).unwrap();
        assert!(!neg.ok_to_give_up().unwrap());
    }
    eprintln!(
        "{} crafted haves: {} commits expanded (history: {})",
        haves.len(),
        neg.expanded(),
        main + side
    );
    assert!(neg.expanded() <= main + side, "{}", neg.expanded());

    // A client that went away: the traversal stops.
    let interrupt = AtomicBool::new(true);
    let mut neg = smart_git_proxy::upload_pack::Negotiator::new(&repo, &db, &want, &interrupt);
    neg.have(id("main~1499")).unwrap();
    assert!(neg.ok_to_give_up().is_err());
}

/// #16: a commit whose date lies (older than its parent) does not hide what it reaches: a v0
/// fetch of a commit reachable only through it is served.
#[test]
fn a_skewed_commit_date_does_not_hide_reachable_wants() {
    let server = Server::start();
    let dir = server.repo_dir("skewed");
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let mut stream = String::new();
    commit(&mut stream, "main", 1, None, 1_000_000);
    commit(&mut stream, "main", 2, Some(1), 2_000_000);
    commit(&mut stream, "main", 3, Some(2), 1_000);
    fast_import(&dir, &stream);
    let middle = git(&dir, &["rev-parse", "main~1"]).trim().to_owned();
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["init", "-q"]);
    let out = git_output(
        work.path(),
        &[
            "-c",
            "protocol.version=0",
            "fetch",
            &server.url("skewed"),
            &middle,
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_fsck(&work.path().join(".git"));
}

/// #10, #12: a client that stops reading, or goes away, gives its pack slot back: at
/// REQUEST_TIMEOUT, or at once.
#[test]
fn stalled_and_vanished_clients_give_their_slot_back() {
    let server = Server::start_with(|c| {
        c.max_concurrent_packs = Some(1);
        c.pack_cache_max_size = bytesize::ByteSize::b(0);
        // It also bounds the fetch that takes the slot next: room for a loaded machine.
        c.request_timeout = Duration::from_secs(5).into();
        c.queue_timeout = Duration::from_secs(60).into();
    });
    server.serve_fixture("large");
    server.serve_fixture("basic");
    let tip = git(&fixture("large"), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let body = pkt(&[
        "command=fetch",
        "0001",
        "ofs-delta",
        &format!("want {tip}"),
        "done",
        "0000",
    ]);
    for vanish in [false, true] {
        // The pack (about 8 MiB) is more than the socket buffers and the response channel hold,
        // so the server's writes block once this client stops reading.
        let mut s = TcpStream::connect(server.addr).unwrap();
        write!(
            s,
            "POST /{HOST}/large/git-upload-pack HTTP/1.1\r\nHost: x\r\nGit-Protocol: version=2\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
        let mut first = [0u8; 1024];
        let _ = s.read(&mut first).unwrap();
        let started = Instant::now();
        if vanish {
            drop(s);
        }
        // It needs the only pack slot.
        let (_work, out) = fetch_into_new_repo(&server.url("basic"), "main", &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "slot free again after the client {}: {:?}",
            if vanish {
                "went away"
            } else {
                "stopped reading"
            },
            started.elapsed()
        );
    }
}

/// #11: a hanging upstream cannot starve the others of sync slots (per-host slots), and when
/// every slot is taken, a stale mirror is served as it is after SYNC_WAIT.
///
/// The hanging upstream stalls until the test releases it, so no upstream timeout has to fire
/// and the healthy upstream gets the default (generous) ones: with a 5 s stall timeout, a
/// loaded machine once turned the first healthy sync into a 502 (`git http-backend` took
/// longer than that to answer).
#[test]
fn a_hanging_upstream_does_not_starve_other_mirrors() {
    let hanging = Upstream::start();
    let healthy = Upstream::start();
    healthy.add_fixture("o/basic", "basic");
    let allowed = format!("{},{}", hanging.allowed(), healthy.allowed());
    for (syncs, expected) in [(2, "sync"), (1, "stale")] {
        let allowed = allowed.clone();
        let server = Server::start_with(move |c| {
            c.allowed_upstreams = allowed;
            c.max_concurrent_syncs = syncs;
            c.sync_wait = Duration::from_secs(1).into();
            c.sync_stale_after = Duration::ZERO.into();
        });
        let info_refs = |up: &Upstream, name: &str| {
            request(
                server.addr,
                "GET",
                &format!("/{}/{name}/info/refs?service=git-upload-pack", up.segment()),
                &[],
                b"",
            )
        };
        let created = info_refs(&healthy, "o/basic");
        assert_eq!(created.status, 200, "{}", created.text());
        hanging.set_mode(Mode::Stall);
        let asked_before = hanging.count("/o/r");
        let stuck: Vec<_> = (0..3)
            .map(|i| {
                let (addr, segment) = (server.addr, hanging.segment());
                std::thread::spawn(move || {
                    request(
                        addr,
                        "GET",
                        &format!("/{segment}/o/r{i}/info/refs?service=git-upload-pack"),
                        &[],
                        b"",
                    )
                    .status
                })
            })
            .collect();
        // One stuck sync holds the hanging host's only slot (and a global one) once its
        // request reached the upstream; the others queue for the host slot.
        wait_until("a sync stuck on the hanging upstream", || {
            hanging.count("/o/r") > asked_before
        });
        let r = info_refs(&healthy, "o/basic");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("x-git-proxy-status").as_deref(),
            Some(expected),
            "MAX_CONCURRENT_SYNCS={syncs}"
        );
        // Released, the upstream answers that these repositories do not exist.
        hanging.set_mode(Mode::Normal);
        for t in stuck {
            assert_ne!(t.join().unwrap(), 200);
        }
    }
}

/// #12: headers sent too slowly end the connection (HEADER_READ_TIMEOUT); connections beyond
/// MAX_CONNECTIONS are answered 503 and closed.
#[test]
fn slow_headers_time_out_and_extra_connections_are_shed() {
    let server = Server::start_with(|c| {
        c.header_read_timeout = Duration::from_secs(1).into();
    });
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    slow.write_all(b"GET /healthz HT").unwrap();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    // An idle keep-alive connection is closed after the same time.
    let mut idle = TcpStream::connect(server.addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    // Ends (rather than hitting the 30 s read timeout) only if the server closes it.
    let closed = idle.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        closed.is_ok(),
        "the idle connection stayed open: {closed:?}"
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let server = Server::start_with(|c| c.max_connections = 2);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    // Both are accepted before the third arrives.
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = TcpStream::connect(server.addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    let _ = extra.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    drop(held);
    // The slots come back once the server has seen those connections close (soon, but a
    // loaded machine decides when): until then it answers 503.
    let addr = server.addr.to_string();
    wait_until("a connection slot free again", || {
        send_raw(
            &addr,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"",
        ) == Some(200)
    });
}

/// #17: a full disk is reported as such to the client, in a few words (issue 19: no local
/// path, no error chain; those are in the log).
#[test]
fn a_full_disk_is_reported_as_such() {
    let up = Upstream::start();
    up.add_fixture("o/large", "large");
    let outer = tempfile::tempdir().unwrap();
    let disk = outer.path().join("disk");
    let Some(_tmpfs) = Tmpfs::mount(&disk, "512k") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    // A mirror dir on the tmpfs rather than the mount point itself: it is removed before the
    // tmpfs is unmounted, and the mount point (which cannot be removed while mounted) after.
    let mirror = tempfile::tempdir_in(&disk).unwrap();
    let allowed = up.allowed();
    let server = Server::start_in(mirror, move |c| {
        c.allowed_upstreams = allowed;
        c.pack_cache_max_size = bytesize::ByteSize::b(0);
    });
    let (_work, out) = fetch_into_new_repo(&server.url_for(&up.segment(), "o/large"), "main", &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let segment = up.segment();
    assert!(
        stderr.contains(&format!(
            "remote: cannot mirror {segment}/o/large: no space left on the proxy's disk\n"
        )) && stderr.contains("error: 507"),
        "{stderr}"
    );
    for secret in [outer.path().to_str().unwrap(), "Caused by", "objects/pack"] {
        assert!(!stderr.contains(secret), "{secret}: {stderr}");
    }
    let server_dir = server.stop();
    assert_eq!(directories(server_dir.path()), Vec::<String>::new());
}

/// `Authorization: Basic` for `user:password`.
fn basic(user_password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

/// #4: the early answer (progress during a want-miss sync) is checked again after the sync it
/// waited for: here another client's sync, made with credentials, found the upstream private.
/// The anonymous client passed the check before (the mirror was public) and is refused after.
#[test]
fn an_early_answer_is_checked_again_after_the_sync() {
    let Proxied { server, up } = Scenario::new()
        .fixture("acme/repo", "basic")
        .config(|c| {
            c.auth_mode = smart_git_proxy::config::AuthMode::PassThrough;
            c.sync_stale_after = Duration::ZERO.into();
        })
        .start();
    let upstream_dir = up.repo_dir("acme/repo");
    let segment = up.segment();
    let info_refs = format!("/{segment}/acme/repo/info/refs?service=git-upload-pack");
    let created = request(server.addr, "GET", &info_refs, &[], b"");
    assert_eq!(
        created.header("x-git-proxy-status").as_deref(),
        Some("clone")
    );
    // A commit the clients want, not in the mirror yet.
    let tree = git(&upstream_dir, &["rev-parse", "main^{tree}"]);
    let sha = git(
        &upstream_dir,
        &["commit-tree", tree.trim(), "-p", "main", "-m", "new"],
    );
    let sha = sha.trim().to_owned();
    git(&upstream_dir, &["update-ref", "refs/heads/main", &sha]);
    let fetch = |authorization: Option<String>| {
        let (addr, segment, sha) = (server.addr, segment.clone(), sha.clone());
        std::thread::spawn(move || {
            let mut headers = vec![("Git-Protocol", "version=2".to_owned())];
            headers.extend(authorization.map(|a| ("Authorization", a)));
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(
                addr,
                "POST",
                &format!("/{segment}/acme/repo/git-upload-pack"),
                &headers,
                &pkt(&[
                    "command=fetch",
                    "0001",
                    &format!("want {sha}"),
                    "done",
                    "0000",
                ]),
            )
        })
    };
    // B: a sync that holds the mirror's lock for a while (the upstream is slow, and still
    // public when B's listing arrives).
    up.set_mode(Mode::SlowAfterAuth(Duration::from_secs(2)));
    let asked_before = up.count("/acme/repo");
    let slow = {
        let (addr, path) = (server.addr, info_refs.clone());
        std::thread::spawn(move || request(addr, "GET", &path, &[], b"").status)
    };
    // B's listing reached the upstream (and passed its access check) while it was public.
    wait_until("B's sync at the upstream", || {
        up.count("/acme/repo") > asked_before
    });
    // The upstream turns private.
    up.require_auth("/acme", "alice:secret");
    up.set_mode(Mode::Normal);
    // A (credentials) and then C (none) want the new commit; both wait for B's sync, then
    // A's sync runs with A's credentials and finds the upstream private; C shares it.
    let with_credentials = fetch(Some(basic("alice:secret")));
    std::thread::sleep(Duration::from_millis(300));
    let anonymous = fetch(None);
    let _ = slow.join().unwrap();
    let a = with_credentials.join().unwrap();
    let c = anonymous.join().unwrap();
    assert_eq!(a.status, 200);
    assert!(a.body.windows(4).any(|w| w == b"PACK"), "{}", a.text());
    // C was answered early (200, the mirror was public), and refused once the sync was done.
    assert_eq!(c.status, 200);
    assert!(!c.body.windows(4).any(|w| w == b"PACK"), "C got a pack");
    assert!(c.text().contains("authentication required"), "{}", c.text());
}

/// #8/#11: concurrent first requests for a repository whose upstream fails share one attempt:
/// they do not each retry the upstream in turn.
#[test]
fn concurrent_creations_share_one_failed_attempt() {
    let up = Upstream::start();
    up.add_fixture("o/down", "basic");
    let server = proxy(&up, |_| {});
    up.set_mode(Mode::Fail);
    let path = format!("/{}/o/down/info/refs?service=git-upload-pack", up.segment());
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let (addr, path) = (server.addr, path.clone());
            std::thread::spawn(move || request(addr, "GET", &path, &[], b"").status)
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 502);
    }
    let asked = up.count("o/down");
    eprintln!("10 concurrent creations on a failing upstream: {asked} upstream requests");
    // One attempt is a listing and a handshake; stragglers that arrived after it may try once
    // more.
    assert!(asked <= 4, "{asked} upstream requests");
}

/// A connection to `addr` from the loopback address `from` (all of 127.0.0.0/8 is this
/// machine), with a receive buffer of `rcvbuf` bytes when given.
fn connect_from(from: &str, addr: std::net::SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).unwrap();
    }
    let local: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

/// `/proc/net/tcp`'s `tx_queue` and `rx_queue` of the socket from `local` to `remote`, and
/// its state (`01`: established); `None` once it is gone.
fn tcp_queues(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<(u8, u64, u64)> {
    let hex = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        std::net::SocketAddr::V6(_) => unreachable!("IPv4 loopback only"),
    };
    let (local, remote) = (hex(local), hex(remote));
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(1) != Some(&local.as_str()) || f.get(2) != Some(&remote.as_str()) {
                return None;
            }
            let (tx, rx) = f[4].split_once(':')?;
            Some((
                u8::from_str_radix(f[3], 16).ok()?,
                u64::from_str_radix(tx, 16).ok()?,
                u64::from_str_radix(rx, 16).ok()?,
            ))
        })
}

/// Whether the server at `theirs` has read everything sent from `ours`, or closed its side:
/// what it does with a body is then decided.
fn server_took_all(ours: std::net::SocketAddr, theirs: std::net::SocketAddr) -> bool {
    let sent = tcp_queues(ours, theirs).is_some_and(|(_, tx, _)| tx == 0);
    match tcp_queues(theirs, ours) {
        Some((1, _, unread)) => sent && unread == 0,
        _ => true,
    }
}

/// Clone `url` with protocol v2 and v0; both must succeed and pass fsck.
fn clone_both_ways(url: &str) {
    for version in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        let mut a = proto(version).to_vec();
        a.extend(["clone", "-q", "--bare", url, "c"].map(String::from));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = git_output(work.path(), &a, &[]);
        assert!(
            out.status.success(),
            "v{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_fsck(&work.path().join("c"));
    }
}

/// Issue 19, defect 4: one client holding five bodies open cannot take the body budget from
/// the others, who still clone (v2 and v0). Gzip bodies are cut at an expansion ratio (once
/// 300 KB of gzip filled MAX_BUFFERED_BODIES); plain ones at the client's share of the budget,
/// counted per client address, also when a trusted proxy names it.
#[test]
fn held_bodies_leave_room_for_other_clients() {
    let bomb = gzip_bomb(50 << 20);
    let zeros = vec![b'0'; 3 << 20];
    struct Round {
        what: &'static str,
        from: &'static str,
        forwarded_for: Option<&'static str>,
        gzip: bool,
        /// What one client may hold (MAX_REQUEST_BODY, the default share).
        share: u64,
        adjust: fn(&mut smart_git_proxy::config::Config),
    }
    let rounds = [
        Round {
            what: "gzip, default limits",
            from: "127.0.0.2",
            forwarded_for: None,
            gzip: true,
            share: 64 << 20,
            adjust: |_| {},
        },
        Round {
            what: "plain, one client's share",
            from: "127.0.0.2",
            forwarded_for: None,
            gzip: false,
            share: 4 << 20,
            adjust: |c| {
                c.max_request_body = bytesize::ByteSize::mib(4);
                c.max_buffered_bodies = bytesize::ByteSize::mib(16);
            },
        },
        Round {
            what: "plain, a client behind a trusted proxy",
            from: "127.0.0.1",
            forwarded_for: Some("203.0.113.7"),
            gzip: false,
            share: 4 << 20,
            adjust: |c| {
                c.max_request_body = bytesize::ByteSize::mib(4);
                c.max_buffered_bodies = bytesize::ByteSize::mib(16);
                c.trusted_proxies = "127.0.0.1".into();
            },
        },
    ];
    for round in rounds {
        let server = Server::start_with(round.adjust);
        server.serve_fixture("basic");
        let (body, length, encoding) = if round.gzip {
            // All but the gzip trailer: the body stays open.
            (
                &bomb[..bomb.len() - 8],
                bomb.len(),
                "Content-Encoding: gzip\r\n",
            )
        } else {
            (&zeros[..], 4 << 20, "")
        };
        let xff = round
            .forwarded_for
            .map(|a| format!("X-Forwarded-For: {a}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "POST /{HOST}/basic/git-upload-pack HTTP/1.1\r\nHost: x\r\n{encoding}{xff}\
             Content-Length: {length}\r\n\r\n"
        );
        // One after the other, each taken by the server before the next: what the server
        // holds then depends on its limits, not on which body grew first.
        let held: Vec<TcpStream> = (0..5)
            .map(|_| {
                let mut s = connect_from(round.from, server.addr, None);
                let ours = s.local_addr().unwrap();
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(body);
                wait_until("the server took the held body", || {
                    server_took_all(ours, server.addr)
                });
                s
            })
            .collect();
        let held_bytes = server.state.buffered_body_bytes();
        let share = bytesize::ByteSize::b(held_bytes);
        eprintln!("{}: {share} of bodies held", round.what);
        assert!(
            held_bytes <= round.share,
            "{}: {held_bytes} bytes held, more than one client's share",
            round.what
        );
        clone_both_ways(&server.url("basic"));
        drop(held);
    }
}

/// Issue 19: a client that stops reading its answer is disconnected after
/// CLIENT_STALL_TIMEOUT, which frees what it held (here the only connection slot); a client
/// that reads slowly is not.
#[test]
fn a_client_that_stops_reading_is_disconnected() {
    let server = Server::start_with(|c| {
        c.client_stall_timeout = Duration::from_secs(1).into();
        c.max_connections = 1;
        c.pack_cache_max_size = bytesize::ByteSize::b(0);
    });
    server.serve_fixture("large");
    let tip = git(&fixture("large"), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let body = pkt(&[
        "command=fetch",
        "0001",
        "ofs-delta",
        &format!("want {tip}"),
        "done",
        "0000",
    ]);
    let request_head = format!(
        "POST /{HOST}/large/git-upload-pack HTTP/1.1\r\nHost: x\r\nGit-Protocol: version=2\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // A small receive buffer: the pack (about 8 MiB) fills it and the server's send buffer
    // long before its end.
    let mut stalled = connect_from("127.0.0.1", server.addr, Some(16 << 10));
    stalled.write_all(request_head.as_bytes()).unwrap();
    stalled.write_all(&body).unwrap();
    let started = Instant::now();
    let addr = server.addr.to_string();
    wait_until("the stalled client's connection slot free again", || {
        send_raw(
            &addr,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"",
        ) == Some(200)
    });
    eprintln!("slot free {:?} after the request", started.elapsed());
    // What the client got ends before the pack does: the connection was closed.
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut got = Vec::new();
    let ended = stalled.read_to_end(&mut got);
    assert!(
        ended.is_ok()
            || ended
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{ended:?}"
    );
    assert!(got.len() < 8 << 20, "{} bytes", got.len());

    // A reader that pauses between reads is served to the end. (Not much slower than this
    // on loopback: the server's send buffer grows to several MiB there, and becomes writable
    // again only once a third of it is free.)
    let mut slow = connect_from("127.0.0.1", server.addr, None);
    slow.write_all(request_head.as_bytes()).unwrap();
    slow.write_all(&body).unwrap();
    let (mut total, mut reads) = (0, 0);
    let mut buf = vec![0; 64 << 10];
    loop {
        match slow.read(&mut buf).unwrap() {
            0 => break,
            n => total += n,
        }
        reads += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("the paused reader read {total} bytes in {reads} reads");
    assert!(total > 6 << 20, "only {total} bytes: cut off");
}

/// Signed but hostile webhook payloads (nesting deeper than any parser's stack, a huge string,
/// the wrong types, a clone URL that climbs out of the mirror directory), and admin queries with
/// hostile values: each is answered with a status, the server keeps serving, nothing panics.
#[test]
fn hostile_payloads_and_queries_are_answered() {
    let panics = library_panics();
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
    assert_eq!(library_panics(), panics, "a panic");
}
