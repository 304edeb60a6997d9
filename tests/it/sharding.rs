//! Issue 12, scaling out: `scripts/nginx-sharded.conf` (real nginx, started here as the current
//! user with a temporary prefix) in front of three proxy processes, each with its own
//! `MIRROR_DIR`, mirroring from a `git http-backend` upstream. Each repository is mirrored on
//! one node; when that node dies its repositories move to the others (and only those), and
//! come back when it returns; a clone cut off by the death fails cleanly and its retry
//! succeeds. And the nodes' logs name the client behind nginx, trusting `X-Forwarded-For`
//! only from `TRUSTED_PROXIES`. Git LFS object links reach the node that issued them.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::upstream::Upstream;
use common::*;

/// Waits below are for processes to come up or for a log line to be written, never
/// assertions: past this, the test fails with what it was waiting for.
const PATIENCE: Duration = Duration::from_secs(120);

/// `cond` until it holds, or fail naming `what`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < PATIENCE, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The real binary with its own mirror directory, logging JSON lines to a file that
/// survives restarts.
struct Node {
    child: Option<Child>,
    addr: String,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Node {
    /// A node listening on `ip` (a loopback address), on an ephemeral port.
    fn start(ip: &str, env: &[(&str, &str)]) -> Node {
        let mut node = Node {
            child: None,
            addr: String::new(),
            dir: tempfile::tempdir().unwrap(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        node.spawn(&format!("{ip}:0"));
        node
    }

    fn mirror_dir(&self) -> PathBuf {
        self.dir.path().join("mirror")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("node.log")
    }

    /// The JSON log lines so far.
    fn log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn listening_lines(&self) -> Vec<String> {
        self.log()
            .iter()
            .filter(|v| v["fields"]["message"] == "listening")
            .filter_map(|v| v["fields"]["addr"].as_str().map(str::to_owned))
            .collect()
    }

    fn spawn(&mut self, listen: &str) {
        let before = self.listening_lines().len();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("MIRROR_DIR", self.mirror_dir())
            .env("LISTEN_ADDR", listen)
            .env("LOG_FORMAT", "json")
            .env("LOG_LEVEL", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_for("a node to listen", || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "node exited with {status}:\n{}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            self.listening_lines().len() > before
        });
        self.addr = self.listening_lines().pop().unwrap();
    }

    /// `kill -9`: no drain, connections cut.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start again on the same address and mirror directory.
    fn restart(&mut self) {
        let addr = self.addr.clone();
        self.spawn(&addr);
        assert_eq!(self.addr, addr);
    }

    /// Whether this node holds a mirror of `{segment}/{name}`.
    fn holds(&self, segment: &str, name: &str) -> bool {
        self.mirror_dir()
            .join(segment)
            .join(format!("{name}.git"))
            .is_dir()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The load balancer in front of the nodes.
#[derive(Debug, Clone, Copy)]
enum Balancer {
    /// `scripts/nginx-sharded.conf`.
    Nginx,
    /// `scripts/haproxy-sharded.cfg`.
    Haproxy,
}

/// A balancer running its shipped configuration with the nodes' addresses substituted, logging
/// `URI|node|status` for every request it finished.
struct Front {
    balancer: Balancer,
    child: Child,
    addr: SocketAddr,
    /// The balancer's configuration, logs and temporary files, removed after it stopped.
    _dir: tempfile::TempDir,
    log: PathBuf,
}

/// The shipped file `name` with each `(from, to)` replaced (each `from` must be there).
fn shipped(name: &str, substitutions: &[(String, String)]) -> String {
    let mut conf = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts")
            .join(name),
    )
    .unwrap();
    for (from, to) in substitutions {
        assert!(conf.contains(from.as_str()), "{name} has '{from}'");
        conf = conf.replace(from.as_str(), to);
    }
    conf
}

impl Front {
    fn start(balancer: Balancer, nodes: &[&str]) -> Front {
        assert_eq!(nodes.len(), 3, "the shipped files list three nodes");
        let dir = tempfile::tempdir().unwrap();
        // Run as root (CI), nginx's workers drop to an unprivileged user: let them in.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (mut child, log, errors) = match balancer {
            Balancer::Nginx => nginx(dir.path(), addr, nodes),
            Balancer::Haproxy => haproxy(dir.path(), addr, nodes),
        };
        wait_for("the balancer to listen", || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{balancer:?} exited with {status}:\n{}",
                    std::fs::read_to_string(&errors).unwrap_or_default()
                );
            }
            TcpStream::connect(addr).is_ok()
        });
        Front {
            balancer,
            child,
            addr,
            _dir: dir,
            log,
        }
    }

    /// Once node `index` is dead, wait until the balancer routes nothing to it. nginx skips a
    /// node on its first refused connection; HAProxy retries a refused connection elsewhere
    /// at once, but takes the node off the ring (where the next node may differ: it picks
    /// the closest point on either side) only when its health checks fail.
    fn wait_until_out(&self, index: usize) {
        if let Balancer::Haproxy = self.balancer {
            let down = format!("smart_git_proxy/node{} is DOWN", index + 1);
            wait_for("HAProxy to take the node out", || {
                std::fs::read_to_string(&self.log)
                    .unwrap_or_default()
                    .contains(&down)
            });
        }
    }

    /// Every request the balancer has finished: (request URI, the node that answered it — the
    /// last one tried —, status). A marker request is awaited first, so that the requests
    /// before it are written.
    fn served(&self) -> Vec<(String, String, u16)> {
        static MARKS: AtomicUsize = AtomicUsize::new(0);
        let mark = format!("/healthz?mark={}", MARKS.fetch_add(1, Ordering::Relaxed));
        let reply = request(self.addr, "GET", &mark, &[], b"");
        assert_eq!(reply.status, 200);
        let read = || std::fs::read_to_string(&self.log).unwrap_or_default();
        wait_for("the balancer's log", || {
            read().lines().any(|l| l.starts_with(&format!("{mark}|")))
        });
        read()
            .lines()
            .filter_map(|l| {
                let mut parts = l.split('|');
                let uri = parts.next()?.to_owned();
                let node = parts.next()?.rsplit(", ").next()?.trim().to_owned();
                let status = parts.next()?.trim().parse().ok()?;
                Some((uri, node, status))
            })
            .collect()
    }
}

/// nginx as the current user, in the foreground, with everything it writes under `dir`: the
/// process, its access log and its error log.
fn nginx(dir: &Path, addr: SocketAddr, nodes: &[&str]) -> (Child, PathBuf, PathBuf) {
    let version = Command::new("nginx")
        .arg("-V")
        .output()
        .unwrap_or_else(|e| panic!("nginx is needed for this test (apt-get install nginx): {e}"));
    let build = String::from_utf8_lossy(&version.stderr).into_owned();
    let mut substitutions: Vec<(String, String)> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            (
                format!("server 10.0.0.{}:8080 ", i + 1),
                format!("server {node} "),
            )
        })
        .collect();
    substitutions.push(("listen 8080;".into(), format!("listen {addr};")));
    // A returning node is tried again after a second, not ten.
    substitutions.push(("fail_timeout=10s".into(), "fail_timeout=1s".into()));
    std::fs::write(
        dir.join("sharded.conf"),
        shipped("nginx-sharded.conf", &substitutions),
    )
    .unwrap();
    let d = dir.display();
    // Every temporary directory this nginx was built with, under the prefix (the built-in
    // ones need root).
    let temp_paths: String = [
        ("client-body", "client_body"),
        ("proxy", "proxy"),
        ("fastcgi", "fastcgi"),
        ("uwsgi", "uwsgi"),
        ("scgi", "scgi"),
    ]
    .iter()
    .filter(|(flag, _)| build.contains(&format!("--http-{flag}-temp-path")))
    .map(|(_, name)| format!("    {name}_temp_path {d}/{name}_temp;\n"))
    .collect();
    let main = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 512; }}\nhttp {{\n{temp_paths}\
         \x20   log_format shard '$request_uri|$upstream_addr|$status';\n\
         \x20   access_log {d}/access.log shard;\n\
         \x20   include {d}/sharded.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let child = Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, dir.join("access.log"), dir.join("error.log"))
}

/// HAProxy in the foreground, logging to a file under `dir` (its standard error).
fn haproxy(dir: &Path, addr: SocketAddr, nodes: &[&str]) -> (Child, PathBuf, PathBuf) {
    let mut substitutions: Vec<(String, String)> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            (
                format!("server node{} 10.0.0.{}:8080", i + 1, i + 1),
                format!("server node{} {node}", i + 1),
            )
        })
        .collect();
    substitutions.push(("bind :8080".into(), format!("bind {addr}")));
    substitutions.push((
        "    mode http\n".into(),
        "    mode http\n    log global\n    log-format \"%HU|%si:%sp|%ST\"\n".into(),
    ));
    // Frequent health checks, so that the test does not wait for them.
    substitutions.push((
        "inter 2s fall 2 rise 2".into(),
        "inter 300ms fall 2 rise 1".into(),
    ));
    let conf = format!(
        "global\n    log stderr format raw local0 info\n\n{}",
        shipped("haproxy-sharded.cfg", &substitutions)
    );
    std::fs::write(dir.join("haproxy.cfg"), conf).unwrap();
    let log = dir.join("haproxy.log");
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(dir.join("haproxy.cfg"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("haproxy is needed for this test (apt-get install haproxy): {e}")
        });
    (child, log.clone(), log)
}

impl Drop for Front {
    fn drop(&mut self) {
        // SIGTERM: nginx's master stops its workers and exits (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// The upstream, three nodes, and a balancer in front of them. Dropped in that order's reverse.
struct Cluster {
    front: Front,
    nodes: Vec<Node>,
    upstream: Upstream,
}

impl Cluster {
    fn start(node_env: &[(&str, &str)]) -> Cluster {
        Cluster::start_behind(Balancer::Nginx, node_env)
    }

    fn start_behind(balancer: Balancer, node_env: &[(&str, &str)]) -> Cluster {
        let upstream = Upstream::start();
        let allowed = upstream.allowed();
        let mut env = vec![("ALLOWED_UPSTREAMS", allowed.as_str())];
        env.extend_from_slice(node_env);
        // Each on an address of its own, as nodes on separate machines.
        let nodes: Vec<Node> = (0..3)
            .map(|i| Node::start(&format!("127.0.0.{}", 11 + i), &env))
            .collect();
        let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
        let front = Front::start(balancer, &addrs);
        Cluster {
            front,
            nodes,
            upstream,
        }
    }

    /// The clone URL of upstream repository `name` through nginx, with or without `.git`.
    fn url(&self, name: &str, dot_git: bool) -> String {
        let suffix = if dot_git { ".git" } else { "" };
        format!(
            "http://{}/{}/{name}{suffix}",
            self.front.addr,
            self.upstream.segment()
        )
    }

    /// The indexes of the nodes holding a mirror of `name`.
    fn holders(&self, name: &str) -> BTreeSet<usize> {
        let segment = self.upstream.segment();
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].holds(&segment, name))
            .collect()
    }

    /// The node (index) that answered each repository's requests logged from `since` on
    /// (a position in [`Front::served`]); a repository answered by several is a failure.
    fn routes(&self, names: &[String], since: usize) -> BTreeMap<String, usize> {
        let segment = self.upstream.segment();
        let mut seen: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        for (uri, node, _) in self.front.served().into_iter().skip(since) {
            let Some(name) = names.iter().find(|n| {
                uri.contains(&format!("/{segment}/{n}/"))
                    || uri.contains(&format!("/{segment}/{n}.git/"))
            }) else {
                continue;
            };
            let index = self
                .nodes
                .iter()
                .position(|n| n.addr == node)
                .unwrap_or_else(|| panic!("{uri} answered by an unknown node '{node}'"));
            seen.entry(name.clone()).or_default().insert(index);
        }
        seen.into_iter()
            .map(|(name, nodes)| {
                assert_eq!(nodes.len(), 1, "{name} was answered by nodes {nodes:?}");
                (name, nodes.into_iter().next().unwrap())
            })
            .collect()
    }
}

/// A clone through nginx that must succeed and pass `git fsck --strict`; returns its git dir.
fn clone_ok(work: &Path, args: &[&str], url: &str, dest: &str) -> PathBuf {
    let mut all = args.to_vec();
    all.extend(["-q", url, dest]);
    git(work, &all);
    let dir = work.join(dest);
    let git_dir = if dir.join(".git").is_dir() {
        dir.join(".git")
    } else {
        dir
    };
    assert_fsck(&git_dir);
    git_dir
}

#[test]
fn repositories_are_sharded_move_when_their_node_dies_and_return_when_it_is_back() {
    sharding(Balancer::Nginx);
}

/// The same with the HAProxy equivalent of `docs/scaling.md`.
#[test]
fn haproxy_shards_the_same_way() {
    sharding(Balancer::Haproxy);
}

fn sharding(balancer: Balancer) {
    let mut cluster = Cluster::start_behind(balancer, &[("TRUSTED_PROXIES", "127.0.0.1")]);
    let segment = cluster.upstream.segment();
    let names: Vec<String> = (0..12)
        .map(|i| match i {
            0 => "acme/platform/tools".to_owned(),
            i => format!("team-{i}/service-{i}"),
        })
        .collect();
    let basic = fixture("basic");
    for name in &names {
        let dest = cluster.upstream.repo_dir(name);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let copied = Command::new("cp").arg("-R").arg(&basic).arg(&dest).status();
        assert!(copied.unwrap().success());
    }
    let head = git(&basic, &["rev-parse", "HEAD"]);

    // Every shape, each repository through both spellings of its URL, plus Git LFS and the
    // warm-up API: all of a repository's requests reach one node, which alone mirrors it.
    let shapes: [&[&str]; 6] = [
        &["-c", "protocol.version=2", "clone"],
        &["-c", "protocol.version=0", "clone"],
        &["-c", "protocol.version=2", "clone", "--depth=1"],
        &["-c", "protocol.version=2", "clone", "--filter=blob:none"],
        &[
            "-c",
            "protocol.version=1",
            "clone",
            "--single-branch",
            "--branch",
            "main",
        ],
        &["-c", "protocol.version=2", "clone", "--bare"],
    ];
    let work = tempfile::tempdir().unwrap();
    for (i, name) in names.iter().enumerate() {
        let dot_git = i % 2 == 0;
        let dest = format!("first-{i}");
        let git_dir = clone_ok(
            work.path(),
            shapes[i % shapes.len()],
            &cluster.url(name, dot_git),
            &dest,
        );
        assert_eq!(git(&git_dir, &["rev-parse", "HEAD"]), head, "{name}");
        if i % shapes.len() == 2 {
            // An incremental fetch of the shallow clone, through the other spelling.
            git(
                &git_dir,
                &["fetch", "-q", "--unshallow", &cluster.url(name, !dot_git)],
            );
            assert_fsck(&git_dir);
        }
        let listed = git(work.path(), &["ls-remote", &cluster.url(name, !dot_git)]);
        assert!(listed.contains("refs/heads/main"), "{listed}");
        let lfs = request(
            cluster.front.addr,
            "POST",
            &format!("/{segment}/{name}.git/info/lfs/objects/batch"),
            &[("Content-Type", "application/vnd.git-lfs+json")],
            br#"{"operation":"download","objects":[]}"#,
        );
        assert_eq!(lfs.status, 200, "{}", lfs.text());
        assert!(lfs.text().starts_with("lfs-echo POST"), "{}", lfs.text());
        // Whatever the node answers (the API may be off), the request must reach the owner.
        request(
            cluster.front.addr,
            "POST",
            &format!("/api/v1/mirrors/{segment}/{name}/sync"),
            &[],
            b"",
        );
    }
    let first = cluster.routes(&names, 0);
    assert_eq!(first.len(), names.len(), "{first:?}");
    for name in &names {
        assert_eq!(
            cluster.holders(name),
            BTreeSet::from([first[name]]),
            "{name} is mirrored on exactly the node that answered it"
        );
    }
    let per_node: Vec<usize> = (0..3)
        .map(|n| first.values().filter(|&&i| i == n).count())
        .collect();
    eprintln!("{balancer:?}: repositories per node: {per_node:?}");

    // The node with the most repositories dies: its repositories, and only those, move to the
    // others, which create the mirrors they lack and serve every clone.
    let victim = (0..3).max_by_key(|&n| per_node[n]).unwrap();
    let orphans: Vec<&String> = names.iter().filter(|n| first[*n] == victim).collect();
    cluster.nodes[victim].kill();
    cluster.front.wait_until_out(victim);
    let since = cluster.front.served().len();
    for (i, name) in names.iter().enumerate() {
        let git_dir = clone_ok(
            work.path(),
            &["-c", "protocol.version=2", "clone"],
            &cluster.url(name, i % 2 == 1),
            &format!("after-death-{i}"),
        );
        assert_eq!(git(&git_dir, &["rev-parse", "HEAD"]), head, "{name}");
    }
    let second = cluster.routes(&names, since);
    let moved: Vec<&String> = names.iter().filter(|n| second[*n] != first[*n]).collect();
    for name in &names {
        assert_ne!(second[name], victim, "{name} answered by the dead node");
        let survivors: BTreeSet<usize> = cluster
            .holders(name)
            .into_iter()
            .filter(|&n| n != victim)
            .collect();
        assert_eq!(survivors, BTreeSet::from([second[name]]), "{name}");
    }
    assert_eq!(moved, orphans, "only the dead node's repositories move");
    eprintln!(
        "{balancer:?}: moved when a node left: {} of {} repositories ({:.0}%; 1/N = 33%)",
        moved.len(),
        names.len(),
        100.0 * moved.len() as f64 / names.len() as f64
    );

    // It comes back (same address, same mirrors): once the balancer tries it again, its
    // repositories return to it.
    cluster.nodes[victim].restart();
    // nginx leaves a failed node alone for fail_timeout (counted in whole seconds), then tries
    // it on the next request that hashes to it; HAProxy puts it back once a health check
    // passes.
    let probe = cluster.url(orphans[0], false);
    let victim_addr = cluster.nodes[victim].addr.clone();
    wait_for("the balancer to try the node again", || {
        git(work.path(), &["ls-remote", &probe]);
        cluster
            .front
            .served()
            .iter()
            .rev()
            .find(|(uri, _, _)| uri.contains(&format!("/{}/info/refs", orphans[0])))
            .is_some_and(|(_, node, _)| *node == victim_addr)
    });
    let since = cluster.front.served().len();
    for (i, name) in names.iter().enumerate() {
        clone_ok(
            work.path(),
            &["-c", "protocol.version=2", "clone"],
            &cluster.url(name, i % 2 == 0),
            &format!("after-return-{i}"),
        );
    }
    let third = cluster.routes(&names, since);
    let returned = orphans.iter().filter(|n| third[**n] == victim).count();
    let moved_again = names.iter().filter(|n| third[*n] != second[*n]).count();
    eprintln!(
        "{balancer:?}: after the node returned: {returned} of its {} repositories came back; \
         {moved_again} of {} moved in all",
        orphans.len(),
        names.len()
    );
    assert!(
        returned * 2 > orphans.len(),
        "most repositories return to their node: {returned} of {}",
        orphans.len()
    );
    for name in &names {
        assert_eq!(
            cluster.holders(name).len(),
            1 + usize::from(moved.contains(&name))
        );
    }
}

/// A TCP stream to `target` from `local` (another loopback address), with a fixed receive
/// buffer when `rcvbuf` is given (a fixed size also stops the kernel from growing it).
fn connect(local: Option<&str>, rcvbuf: Option<u32>, target: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(local) = local {
            socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
        }
        if let Some(size) = rcvbuf {
            socket.set_recv_buffer_size(size).unwrap();
        }
        let stream = socket.connect(target).await.unwrap().into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream
    })
}

/// A TCP relay to `target` that stops passing answers on once `pause_after` bytes of them went
/// through (over all its connections), says so on the channel, and goes on when `resume` is
/// set: a client that stops reading in the middle of a pack.
fn pausing_relay(
    target: SocketAddr,
    pause_after: usize,
    resume: Arc<AtomicBool>,
) -> (SocketAddr, mpsc::Receiver<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (paused_tx, paused_rx) = mpsc::channel();
    let relayed = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let mut server = connect(None, Some(64 << 10), target);
            let (mut client_in, mut server_out) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut client_in, &mut server_out);
                let _ = server_out.shutdown(std::net::Shutdown::Write);
            });
            let (resume, relayed, paused_tx) =
                (Arc::clone(&resume), Arc::clone(&relayed), paused_tx.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 << 10];
                let mut said = false;
                loop {
                    if relayed.load(Ordering::SeqCst) >= pause_after
                        && !resume.load(Ordering::SeqCst)
                    {
                        if !said {
                            let _ = paused_tx.send(());
                            said = true;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if client.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            relayed.fetch_add(n, Ordering::SeqCst);
                        }
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addr, paused_rx)
}

/// A repository of `files` incompressible 4 MiB files, much bigger than every socket buffer
/// between a node and the client (a few MiB each).
fn big_repository(dest: &Path, files: usize) {
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["init", "-q", "-b", "main"]);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for f in 0..files {
        let mut data = Vec::with_capacity(4 << 20);
        while data.len() < 4 << 20 {
            // xorshift64: cheap bytes zlib cannot shrink.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            data.extend_from_slice(&state.to_le_bytes());
        }
        std::fs::write(work.path().join(format!("blob-{f}.bin")), data).unwrap();
    }
    git(work.path(), &["add", "-A"]);
    git(work.path(), &["commit", "-q", "-m", "big"]);
    git(
        work.path(),
        &["clone", "-q", "--bare", ".", dest.to_str().unwrap()],
    );
}

#[test]
fn a_clone_whose_node_dies_fails_cleanly_and_its_retry_succeeds() {
    let mut cluster = Cluster::start(&[]);
    let upstream_repo = cluster.upstream.repo_dir("acme/big");
    std::fs::create_dir_all(upstream_repo.parent().unwrap()).unwrap();
    big_repository(&upstream_repo, 10);
    let head = git(&upstream_repo, &["rev-parse", "HEAD"]);

    // The client reads the first MiB of answers, then stops: the node is in the middle of the
    // 40 MiB pack when it dies.
    let resume = Arc::new(AtomicBool::new(false));
    let (relay, paused) = pausing_relay(cluster.front.addr, 1 << 20, Arc::clone(&resume));
    let url = format!("http://{relay}/{}/acme/big", cluster.upstream.segment());
    let work = tempfile::tempdir().unwrap();
    let dest = work.path().join("cut");
    let clone = {
        let (url, dest) = (url.clone(), dest.clone());
        std::thread::spawn(move || {
            let work = dest.parent().unwrap();
            git_output(work, &["clone", "-q", &url, "cut"], &[])
        })
    };
    paused
        .recv_timeout(PATIENCE)
        .expect("the clone reaches the pack");
    let owner = *cluster
        .holders("acme/big")
        .iter()
        .next()
        .expect("a node mirrored it");
    // The pack streams: the node cannot have finished it while the client reads nothing (an
    // nginx that buffered answers would have taken it all by now).
    std::thread::sleep(Duration::from_secs(1));
    let served_packs = cluster.nodes[owner]
        .log()
        .into_iter()
        .filter(|v| {
            v["fields"]["message"] == "answered"
                && v["fields"]["outcome"]
                    .as_str()
                    .is_some_and(|o| o.ends_with("/pack"))
        })
        .count();
    assert_eq!(served_packs, 0, "the node finished the pack: buffered?");
    cluster.nodes[owner].kill();
    resume.store(true, Ordering::SeqCst);
    let out = clone.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("the cut clone: {:?}: {stderr}", out.status);
    assert!(!out.status.success(), "the clone cannot have succeeded");
    assert!(
        !dest.exists(),
        "a failed clone leaves no repository behind: {}",
        dest.display()
    );

    // The retry goes to the next node on the ring, which mirrors the repository and serves it.
    let git_dir = clone_ok(
        work.path(),
        &["clone"],
        &cluster.url("acme/big", false),
        "retry",
    );
    assert_eq!(git(&git_dir, &["rev-parse", "HEAD"]), head);
    let holders = cluster.holders("acme/big");
    assert_eq!(holders.len(), 2, "the dead node's mirror and a new one");
}

/// Only a trusted peer's `X-Forwarded-For` counts: through nginx (trusted), the log names the
/// client nginx saw, not what the client claimed; straight from an untrusted address, the
/// header is ignored; from a trusted one, it is believed.
#[test]
fn logs_name_the_client_behind_a_trusted_proxy_only() {
    let cluster = Cluster::start(&[("TRUSTED_PROXIES", "127.0.0.1/32")]);
    let segment = cluster.upstream.segment();
    cluster.upstream.add_fixture("acme/logged", "basic");
    let get = |from: &str, to: SocketAddr, path: &str, forwarded: &str| {
        let mut s = connect(Some(from), None, to);
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {forwarded}\r\n\
             Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    };
    // The `client` of the `answered` line of the request for `path`, on whichever node.
    let client_of = |path: &str| -> String {
        let mut found = None;
        wait_for("the answered line", || {
            found = cluster.nodes.iter().flat_map(Node::log).find_map(|v| {
                (v["fields"]["message"] == "answered" && v["span"]["path"] == path)
                    .then(|| v["span"]["client"].as_str().unwrap_or_default().to_owned())
            });
            found.is_some()
        });
        found.unwrap()
    };
    let info_refs = |name: &str| format!("/{segment}/{name}/info/refs");
    let query = "?service=git-upload-pack";

    let via_nginx = info_refs("acme/logged");
    get(
        "127.0.0.2",
        cluster.front.addr,
        &format!("{via_nginx}{query}"),
        "6.6.6.6",
    );
    assert_eq!(client_of(&via_nginx), "127.0.0.2");

    let node: SocketAddr = cluster.nodes[0].addr.parse().unwrap();
    let untrusted = info_refs("acme/untrusted");
    get("127.0.0.2", node, &format!("{untrusted}{query}"), "6.6.6.6");
    assert_eq!(client_of(&untrusted), "127.0.0.2");

    let trusted = info_refs("acme/trusted");
    get(
        "127.0.0.1",
        node,
        &format!("{trusted}{query}"),
        "6.6.6.6, 203.0.113.9",
    );
    assert_eq!(client_of(&trusted), "203.0.113.9");
}

/// Request bodies stream through nginx: a node sees a POST while its body is still coming, so
/// a client that stops sending in the middle meets the node's own `BODY_READ_TIMEOUT` (nginx
/// buffering the body would have kept the request from the node altogether).
#[test]
fn request_bodies_stream_through_to_the_node() {
    let cluster = Cluster::start(&[("BODY_READ_TIMEOUT", "1s")]);
    cluster.upstream.add_fixture("acme/streamed", "basic");
    let url = cluster.url("acme/streamed", false);
    git(tempfile::tempdir().unwrap().path(), &["ls-remote", &url]);
    let path = format!(
        "/{}/acme/streamed/git-upload-pack",
        cluster.upstream.segment()
    );
    let mut s = TcpStream::connect(cluster.front.addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let first = pkt(&["command=ls-refs", "0001"]);
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nGit-Protocol: version=2\r\n\
         Content-Type: application/x-git-upload-pack-request\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        first.len()
    )
    .unwrap();
    s.write_all(&first).unwrap();
    s.write_all(b"\r\n").unwrap();
    // The rest of the body never comes.
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("BODY_READ_TIMEOUT"), "{answer}");
}

/// The excerpts in `docs/scaling.md` are the shipped files' lines, so that they cannot drift
/// apart.
#[test]
fn the_scaling_doc_quotes_the_shipped_configurations() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/scaling.md")).unwrap();
    for (fence, file) in [
        ("```nginx", "nginx-sharded.conf"),
        ("```haproxy", "haproxy-sharded.cfg"),
    ] {
        let shipped = std::fs::read_to_string(root.join("scripts").join(file)).unwrap();
        let shipped: BTreeSet<&str> = shipped.lines().map(str::trim).collect();
        let excerpt = doc
            .split(fence)
            .nth(1)
            .unwrap_or_else(|| panic!("docs/scaling.md quotes {file}"))
            .split("```")
            .next()
            .unwrap();
        for line in excerpt.lines() {
            // A trailing comment in the doc explains; the directive must be the file's.
            let line = line.split("  #").next().unwrap().trim();
            if !line.is_empty() {
                assert!(
                    shipped.iter().any(|l| l.starts_with(line)),
                    "docs/scaling.md line not in {file}: {line}"
                );
            }
        }
    }
}

#[test]
fn git_lfs_links_reach_the_node_that_issued_them() {
    let cluster = Cluster::start(&[("LFS_URL_KEY", "one key for the fleet")]);
    let lfs = cluster.upstream.serve_lfs();
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let files: [(&str, &[u8]); 1] = [("a.bin", &bytes)];
    let oids = common::lfs::lfs_repo(&cluster.upstream, &lfs, "o/lfs", &files);
    let work = tempfile::tempdir().unwrap();
    let since = cluster.front.served().len();
    for dest in ["first", "second"] {
        let dest = work.path().join(dest);
        let out = common::lfs::lfs_clone(
            &cluster.front.addr.to_string(),
            &cluster.upstream,
            "o/lfs",
            &dest,
            &[],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(std::fs::read(dest.join("a.bin")).unwrap() == bytes);
    }
    let served = cluster.front.served();
    let links = served[since..]
        .iter()
        .filter(|(uri, _, status)| uri.contains("/info/lfs/cache/") && *status == 200)
        .count();
    assert_eq!(
        links, 2,
        "each clone read the object from a proxy link, through nginx"
    );
    // Batches, links and the Git requests of the repository all went to one node.
    cluster.routes(&["o/lfs".to_owned()], since);
    assert_eq!(lfs.downloads_of(&oids[0]), 1);
}
