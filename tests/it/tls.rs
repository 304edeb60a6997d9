//! Issue 23, item 1: TLS without OpenSSL. An HTTPS upstream (real nginx, terminating TLS with a
//! certificate from a CA this test makes, in front of the test upstream) is refused while its
//! CA is unknown, and cloned from once `UPSTREAM_CA_FILE` or `SSL_CERT_FILE` names the CA. The
//! binary links no OpenSSL.

use crate::common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::upstream::Upstream;
use common::{assert_fsck, git_output, wait_until, Killed, Running};

/// A CA, and a certificate it signed for `127.0.0.1`, written as PEM files under `dir`:
/// (CA certificate, server certificate, server key).
fn make_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "smart-git-proxy test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

/// nginx terminating TLS on a free loopback port and passing everything to `backend`; stopped
/// when dropped.
struct TlsFront {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl TlsFront {
    fn start(backend: SocketAddr, cert: &Path, key: &Path) -> TlsFront {
        let dir = tempfile::tempdir().unwrap();
        // Run as root, nginx's workers drop to an unprivileged user: let them in.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let addr: SocketAddr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let d = dir.path().display();
        let conf = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   access_log off;\n\
             \x20   server {{\n\
             \x20       listen {addr} ssl;\n\
             \x20       ssl_certificate {cert};\n\
             \x20       ssl_certificate_key {key};\n\
             \x20       client_max_body_size 0;\n\
             \x20       location / {{\n\
             \x20           proxy_pass http://{backend};\n\
             \x20           proxy_http_version 1.1;\n\
             \x20           proxy_buffering off;\n\
             \x20           proxy_request_buffering off;\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n",
            cert = cert.display(),
            key = key.display(),
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let errors = dir.path().join("error.log");
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(&errors)
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("nginx is needed for this test (apt-get install nginx-light): {e}")
            });
        wait_until("nginx listens", || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "nginx exited with {status}:\n{}",
                    std::fs::read_to_string(&errors).unwrap_or_default()
                );
            }
            TcpStream::connect(addr).is_ok()
        });
        TlsFront {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        // SIGTERM: nginx's master stops its workers and exits (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// The binary, mirroring `allowed`, its log in `log`; killed when dropped. Its address.
fn logged(mirror: &Path, allowed: &str, log: &Path) -> (Killed, String) {
    use std::io::{BufRead, BufReader};
    let child = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", mirror)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ALLOWED_UPSTREAMS", allowed)
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let child = Killed(child);
    let mut addr = None;
    wait_until("the server listens", || {
        addr = BufReader::new(std::fs::File::open(log).unwrap())
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                let rest = l.split("addr=").nth(1)?;
                rest.split_whitespace().next().map(str::to_owned)
            });
        addr.is_some()
    });
    (child, addr.unwrap_or_default())
}

/// Clone `url` into a new directory; the output.
fn clone(url: &str) -> (tempfile::TempDir, std::process::Output) {
    let work = tempfile::tempdir().unwrap();
    let out = git_output(work.path(), &["clone", "--bare", url, "c.git"], &[]);
    (work, out)
}

#[test]
fn an_upstream_with_a_private_ca_is_trusted_with_upstream_ca_file_only() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_ca(certs.path());
    let up = Upstream::start();
    up.add_fixture("o/r", "basic");
    let front = TlsFront::start(up.addr, &cert, &key);
    let segment = front.addr.to_string();
    let allowed = format!("https://{segment}");

    // The system's roots do not know the test's CA: refused, and the log says why.
    let mirror = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let (proxy, addr) = logged(mirror.path(), &allowed, log.path());
    let (_work, out) = clone(&format!("http://{addr}/{segment}/o/r"));
    assert!(!out.status.success(), "cloned through an unknown CA");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the upstream is unreachable"), "{stderr}");
    let read = || std::fs::read_to_string(log.path()).unwrap();
    wait_until("the refusal is logged with its cause", || {
        read().contains("invalid peer certificate: UnknownIssuer")
    });
    drop(proxy);

    // With the CA as UPSTREAM_CA_FILE: cloned, complete.
    let mirror = tempfile::tempdir().unwrap();
    let ca_file = ca.to_str().unwrap();
    let proxy = Running::start(
        mirror.path(),
        &[
            ("ALLOWED_UPSTREAMS", &allowed),
            ("UPSTREAM_CA_FILE", ca_file),
        ],
    );
    let (work, out) = clone(&format!("http://{}/{segment}/o/r", proxy.addr));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_fsck(&work.path().join("c.git"));
    assert!(
        up.count("git-upload-pack") > 0,
        "the upstream served the fetch"
    );
    drop(proxy);

    // SSL_CERT_FILE replaces the system's roots, as for git and curl.
    let mirror = tempfile::tempdir().unwrap();
    let proxy = Running::start(
        mirror.path(),
        &[("ALLOWED_UPSTREAMS", &allowed), ("SSL_CERT_FILE", ca_file)],
    );
    let (work, out) = clone(&format!("http://{}/{segment}/o/r", proxy.addr));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_fsck(&work.path().join("c.git"));
}

#[test]
fn an_unusable_upstream_ca_file_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, "not a certificate\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", dir.path().join("m"))
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("UPSTREAM_CA_FILE", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: UPSTREAM_CA_FILE") && stderr.contains("no PEM certificate"),
        "{stderr}"
    );
}

/// The binary depends on nothing but the C library (and its loader, libm, libgcc_s): no
/// OpenSSL, so it runs where none is installed.
#[test]
fn the_binary_links_no_openssl() {
    let out = Command::new("ldd")
        .arg(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .output()
        .expect("ldd (libc-bin)");
    let libraries = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{libraries}");
    for forbidden in ["libssl", "libcrypto"] {
        assert!(!libraries.contains(forbidden), "{libraries}");
    }
}
