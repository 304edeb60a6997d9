//! A Git LFS upstream for the tests, shaped like GitHub's: the Git host answers the batch API
//! (through [`super::upstream::Upstream`], with its Basic auth per repository), and the bytes
//! live on a separate storage server behind signed URLs with a header of their own. Storage
//! counts its downloads, and can be made to corrupt, stall or pause them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::upstream::Upstream;
use super::{git, git_output};

/// How storage serves downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// At once.
    Open,
    /// Nothing at all (no status either) until the gate changes.
    Stall,
    /// The status and the first half of the bytes, then the rest once the gate opens.
    HoldHalf,
}

/// The header storage wants with every download, as the batch answer gives it.
const STORAGE_HEADER: &str = "x-storage-token";

pub struct Lfs {
    shared: Arc<Shared>,
    _storage: super::Background,
}

struct Shared {
    storage_addr: Mutex<Option<std::net::SocketAddr>>,
    secret: String,
    objects: Mutex<HashMap<String, Vec<u8>>>,
    /// Repository path (`/o/a`) -> the OIDs it has.
    repos: Mutex<HashMap<String, HashSet<String>>>,
    /// OIDs of the downloads storage started, in order.
    downloads: Mutex<Vec<String>>,
    /// This many next downloads get one byte changed.
    corrupt: AtomicUsize,
    gate: tokio::sync::watch::Sender<Gate>,
    /// The `expires_in` of the links in batch answers.
    expires_in: AtomicI64,
}

impl Lfs {
    pub fn start() -> Lfs {
        let shared = Arc::new(Shared {
            storage_addr: Mutex::new(None),
            secret: format!("storage-secret-{}", std::process::id()),
            objects: Default::default(),
            repos: Default::default(),
            downloads: Default::default(),
            corrupt: AtomicUsize::new(0),
            gate: tokio::sync::watch::Sender::new(Gate::Open),
            expires_in: AtomicI64::new(3600),
        });
        let app = axum::Router::new()
            .route("/objects/{oid}", axum::routing::get(download))
            .with_state(Arc::clone(&shared));
        let storage = super::Background::serve(app);
        *shared.storage_addr.lock().unwrap() = Some(storage.addr);
        Lfs {
            shared,
            _storage: storage,
        }
    }

    /// Store `content` for the repository at `repo` (`/o/a`); its OID.
    pub fn add(&self, repo: &str, content: &[u8]) -> String {
        let oid = hex::encode(Sha256::digest(content));
        self.shared
            .objects
            .lock()
            .unwrap()
            .insert(oid.clone(), content.to_vec());
        self.shared
            .repos
            .lock()
            .unwrap()
            .entry(repo.to_owned())
            .or_default()
            .insert(oid.clone());
        oid
    }

    /// Downloads storage started for `oid`.
    pub fn downloads_of(&self, oid: &str) -> usize {
        self.downloads().iter().filter(|o| *o == oid).count()
    }

    /// Every download storage started.
    pub fn downloads(&self) -> Vec<String> {
        self.shared.downloads.lock().unwrap().clone()
    }

    /// Corrupt the next `n` downloads.
    pub fn corrupt_next(&self, n: usize) {
        self.shared.corrupt.store(n, Ordering::SeqCst);
    }

    pub fn set_gate(&self, gate: Gate) {
        self.shared.gate.send_replace(gate);
    }

    pub fn set_expires_in(&self, secs: i64) {
        self.shared.expires_in.store(secs, Ordering::SeqCst);
    }

    /// The batch API's answer to `body` for the repository at `repo_path` (`/o/a.git/…`).
    pub fn batch(&self, repo_path: &str, body: &[u8]) -> Response {
        let repo = repo_path
            .split("/info/lfs")
            .next()
            .unwrap_or_default()
            .trim_end_matches(".git")
            .to_owned();
        let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
            return (StatusCode::UNPROCESSABLE_ENTITY, "bad json").into_response();
        };
        let known = self
            .shared
            .repos
            .lock()
            .unwrap()
            .get(&repo)
            .cloned()
            .unwrap_or_default();
        let storage = self.shared.storage_addr.lock().unwrap().expect("storage");
        let expires_in = self.shared.expires_in.load(Ordering::SeqCst);
        let objects: Vec<serde_json::Value> = request["objects"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|o| {
                let oid = o["oid"].as_str().unwrap_or_default().to_owned();
                let size = o["size"].clone();
                if !known.contains(&oid) {
                    return serde_json::json!({
                        "oid": oid, "size": size,
                        "error": {"code": 404, "message": "Object does not exist"}
                    });
                }
                let sig = self.shared.sign(&oid);
                serde_json::json!({
                    "oid": oid, "size": size,
                    "actions": {"download": {
                        "href": format!("http://{storage}/objects/{oid}?sig={sig}"),
                        "header": {STORAGE_HEADER: self.shared.secret},
                        "expires_in": expires_in,
                    }}
                })
            })
            .collect();
        let answer = serde_json::json!({"transfer": "basic", "objects": objects});
        (
            [("content-type", "application/vnd.git-lfs+json")],
            serde_json::to_vec(&answer).unwrap(),
        )
            .into_response()
    }
}

impl Shared {
    fn sign(&self, oid: &str) -> String {
        hex::encode(Sha256::digest(format!("{}:{oid}", self.secret)))
    }
}

async fn download(
    State(shared): State<Arc<Shared>>,
    Path(oid): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let signed = query.get("sig").is_some_and(|s| *s == shared.sign(&oid));
    let header = headers
        .get(STORAGE_HEADER)
        .is_some_and(|v| v.as_bytes() == shared.secret.as_bytes());
    if !signed || !header {
        return (StatusCode::FORBIDDEN, "bad signature").into_response();
    }
    let Some(mut content) = shared.objects.lock().unwrap().get(&oid).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    shared.downloads.lock().unwrap().push(oid);
    let corrupt = shared
        .corrupt
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if corrupt {
        if let Some(b) = content.last_mut() {
            *b ^= 0xff;
        }
    }
    let mut gate = shared.gate.subscribe();
    let current = *gate.borrow_and_update();
    match current {
        Gate::Open => content.into_response(),
        Gate::Stall => {
            let _ = gate.wait_for(|g| *g != Gate::Stall).await;
            content.into_response()
        }
        Gate::HoldHalf => {
            let len = content.len() as u64;
            let rest = content.split_off(content.len() / 2);
            let first = futures_util::stream::once(async move {
                Ok::<_, std::io::Error>(bytes::Bytes::from(content))
            });
            let second = futures_util::stream::once(async move {
                let _ = gate.wait_for(|g| *g == Gate::Open).await;
                Ok::<_, std::io::Error>(bytes::Bytes::from(rest))
            });
            let mut r = Response::new(Body::from_stream(futures_util::StreamExt::chain(
                first, second,
            )));
            r.headers_mut().insert("content-length", len.into());
            r
        }
    }
}

/// Create upstream repository `name` (`o/a`) whose `files` are Git LFS pointers, their
/// objects in `lfs` for that repository; their OIDs.
pub fn lfs_repo(up: &Upstream, lfs: &Lfs, name: &str, files: &[(&str, &[u8])]) -> Vec<String> {
    let work = tempfile::tempdir().unwrap();
    let w = work.path().join("w");
    git(work.path(), &["init", "-q", "-b", "main", "w"]);
    std::fs::write(
        w.join(".gitattributes"),
        "*.bin filter=lfs diff=lfs merge=lfs -text\n",
    )
    .unwrap();
    let mut oids = Vec::new();
    for (file, bytes) in files {
        let oid = lfs.add(&format!("/{name}"), bytes);
        let pointer = format!(
            "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {}\n",
            bytes.len()
        );
        std::fs::write(w.join(file), pointer).unwrap();
        oids.push(oid);
    }
    std::fs::write(w.join("README"), format!("{name}\n")).unwrap();
    git(&w, &["add", "-A"]);
    git(&w, &["commit", "-q", "-m", "LFS objects"]);
    let bare = up.repo_dir(name);
    std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
    git(
        work.path(),
        &[
            "clone",
            "-q",
            "--bare",
            w.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    oids
}

/// `git clone` of upstream `name` through the proxy (`insteadOf`), with `git lfs` as the
/// filter and `extra` configuration.
pub fn lfs_clone(
    proxy: &str,
    up: &Upstream,
    name: &str,
    dest: &std::path::Path,
    extra: &[(&str, &str)],
) -> std::process::Output {
    let rewrite = format!("url.http://{proxy}/{}/.insteadOf", up.segment());
    let original = format!("http://{}/", up.addr);
    let mut config: Vec<(&str, &str)> = vec![
        ("filter.lfs.process", "git-lfs filter-process"),
        ("filter.lfs.smudge", "git-lfs smudge -- %f"),
        ("filter.lfs.clean", "git-lfs clean -- %f"),
        ("filter.lfs.required", "true"),
        (&rewrite, &original),
    ];
    config.extend_from_slice(extra);
    let mut env = vec![("GIT_CONFIG_COUNT".to_owned(), config.len().to_string())];
    for (i, (k, v)) in config.iter().enumerate() {
        env.push((format!("GIT_CONFIG_KEY_{i}"), k.to_string()));
        env.push((format!("GIT_CONFIG_VALUE_{i}"), v.to_string()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = format!("http://{}/{name}", up.addr);
    git_output(
        dest.parent().unwrap(),
        &[
            "clone",
            "-q",
            &url,
            dest.file_name().unwrap().to_str().unwrap(),
        ],
        &env,
    )
}
