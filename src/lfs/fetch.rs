//! The upstream download of an object, shared by every client that misses it meanwhile.
//!
//! A download runs in its own task, not in any client's request: a client that goes away
//! cancels nothing. Its bytes go to a temporary file on a blocking thread, which hashes them
//! as they come and publishes how far the file may be read; every waiting client reads the
//! file from its own offset as it grows (a slow client costs disk, not memory, and does not
//! slow the others). The last byte is published only once the SHA-256 and size matched, so
//! no client receives a complete object that the cache refused. Then the file is renamed into
//! the store.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::batch::Action;
use super::store::Store;
use super::Oid;

/// How far a download got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for the upstream's answer.
    Connecting,
    /// This many bytes may be read from the file.
    Streaming(u64),
    /// Verified and stored: the whole object may be read.
    Done,
    /// Failed, with the reason (the file is gone from the store's view).
    Failed(Arc<str>),
}

/// A download in progress.
pub struct Flight {
    /// The temporary file, opened before anyone could rename it: readers read it by offset.
    pub file: Arc<File>,
    /// The size the upstream announced.
    pub size: u64,
    progress: watch::Receiver<Progress>,
}

impl Flight {
    /// A receiver of the download's progress.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }
}

/// Where an object comes from.
pub enum Joined {
    /// Stored meanwhile: read it from the store.
    Stored,
    /// A download this request started (`shared: false`) or joined (`shared: true`).
    Flight {
        /// The download.
        flight: Arc<Flight>,
        /// Whether another request started it.
        shared: bool,
    },
}

/// Downloads in progress, by OID.
pub struct Downloads {
    client: reqwest::Client,
    store: Arc<Store>,
    stall_timeout: std::time::Duration,
    running: parking_lot::Mutex<HashMap<Oid, Arc<Flight>>>,
}

impl Downloads {
    /// Downloads with `client` into `store`. `stall_timeout` is the client's read timeout,
    /// quoted in the error when it fires.
    pub fn new(
        client: reqwest::Client,
        store: Arc<Store>,
        stall_timeout: std::time::Duration,
    ) -> Self {
        Downloads {
            client,
            store,
            stall_timeout,
            running: Default::default(),
        }
    }

    /// Join the download of `oid`, or start it from `action`.
    pub fn join(self: &Arc<Self>, oid: Oid, size: u64, action: &Action) -> std::io::Result<Joined> {
        let mut running = self.running.lock();
        if let Some(flight) = running.get(&oid) {
            return Ok(Joined::Flight {
                flight: Arc::clone(flight),
                shared: true,
            });
        }
        // A download commits before it leaves `running`: checked under the lock, an object
        // is either stored or still running.
        if self.store.contains(&oid) {
            return Ok(Joined::Stored);
        }
        let (file, path) = self.store.temporary()?;
        let file = Arc::new(file);
        let (tx, rx) = watch::channel(Progress::Connecting);
        let flight = Arc::new(Flight {
            file: Arc::clone(&file),
            size,
            progress: rx,
        });
        running.insert(oid, Arc::clone(&flight));
        drop(running);
        let downloads = Arc::clone(self);
        let action = action.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = downloads
                .download(&action, oid, size, file, path.clone(), &tx)
                .await;
            downloads.running.lock().remove(&oid);
            match result {
                Ok(evicted) => {
                    super::metrics::download("ok");
                    tracing::info!(%oid, size, evicted, seconds = started.elapsed().as_secs_f64(), "Git LFS object downloaded and stored");
                    tx.send_replace(Progress::Done);
                }
                Err(failure) => {
                    let label = failure.label();
                    super::metrics::download(label);
                    if label == "corrupt" {
                        super::metrics::verification_failed();
                    }
                    let message: Arc<str> = failure.to_string().into();
                    tracing::warn!(%oid, size, error = %message, "Git LFS object download failed");
                    if let Err(e) = std::fs::remove_file(&path) {
                        if e.kind() != std::io::ErrorKind::NotFound {
                            tracing::warn!(path = %path.display(), error = %e, "cannot remove a Git LFS temporary");
                        }
                    }
                    tx.send_replace(Progress::Failed(message));
                }
            }
        });
        Ok(Joined::Flight {
            flight,
            shared: false,
        })
    }

    /// Fetch, verify and store; the objects evicted to make room.
    async fn download(
        &self,
        action: &Action,
        oid: Oid,
        size: u64,
        file: Arc<File>,
        path: PathBuf,
        progress: &watch::Sender<Progress>,
    ) -> Result<usize, Failure> {
        let mut request = self.client.get(&action.href);
        for (name, value) in &action.header {
            request = request.header(name, value);
        }
        let stall = self.stall_timeout;
        let upstream = |e: reqwest::Error| {
            if e.is_timeout() {
                Failure::Stalled(stall)
            } else {
                Failure::Upstream(crate::error_chain(&e))
            }
        };
        let mut response = request.send().await.map_err(upstream)?;
        if !response.status().is_success() {
            return Err(Failure::Status(response.status().as_u16()));
        }
        if let Some(length) = response.content_length() {
            if length != size {
                return Err(Failure::Size {
                    expected: size,
                    got: length,
                });
            }
        }
        progress.send_replace(Progress::Streaming(0));
        let (chunks, mut received) = tokio::sync::mpsc::channel::<Bytes>(16);
        let writer_progress = progress.clone();
        let written_file = Arc::clone(&file);
        // Writing and hashing are blocking work: one blocking thread per download.
        let writer = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            let mut written = 0u64;
            while let Some(chunk) = received.blocking_recv() {
                let end = written + chunk.len() as u64;
                if end > size {
                    return Err(Failure::Size {
                        expected: size,
                        got: end,
                    });
                }
                file.write_all_at(&chunk, written).map_err(Failure::Local)?;
                hasher.update(&chunk);
                written = end;
                super::metrics::upstream_bytes(chunk.len() as u64);
                // Everything but the last byte, which waits for the verification.
                writer_progress
                    .send_replace(Progress::Streaming(written.min(size.saturating_sub(1))));
            }
            Ok((written, hasher.finalize()))
        });
        let mut failed = None;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if chunks.send(chunk).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(upstream(e));
                    break;
                }
            }
        }
        drop(chunks);
        let written = writer
            .await
            .map_err(|e| Failure::Local(std::io::Error::other(e)))?;
        if let Some(failure) = failed {
            return Err(failure);
        }
        let (written, digest) = written?;
        if written != size {
            return Err(Failure::Size {
                expected: size,
                got: written,
            });
        }
        if digest.as_slice() != oid.0 {
            return Err(Failure::Corrupt);
        }
        let store = Arc::clone(&self.store);
        // On disk before it has a name in the store: after a power loss, an entry is whole.
        tokio::task::spawn_blocking(move || {
            written_file.sync_data()?;
            store.commit(&path, &oid, size)
        })
        .await
        .map_err(|e| Failure::Local(std::io::Error::other(e)))?
        .map_err(Failure::Local)
    }
}

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("the upstream storage sent no byte for {0:?} (UPSTREAM_STALL_TIMEOUT)")]
    Stalled(std::time::Duration),
    #[error("the upstream storage failed: {0}")]
    Upstream(String),
    #[error("the upstream storage answered HTTP {0}")]
    Status(u16),
    #[error("the upstream storage sent {got} bytes for an object of {expected}")]
    Size { expected: u64, got: u64 },
    #[error("the upstream storage sent bytes whose SHA-256 is not the object's OID")]
    Corrupt,
    #[error("cannot store the object: {0}")]
    Local(std::io::Error),
}

impl Failure {
    fn label(&self) -> &'static str {
        match self {
            Failure::Stalled(_) => "stalled",
            Failure::Upstream(_) | Failure::Status(_) => "failed",
            Failure::Size { .. } | Failure::Corrupt => "corrupt",
            Failure::Local(_) => "local",
        }
    }
}

/// The largest read from disk per chunk of an answer.
const CHUNK: u64 = 1024 * 1024;

/// Bytes `start..end` of `file` as a stream of chunks read on blocking threads, one at a time
/// (the client's pace sets the reads'). With `progress`, the file is a download's: reads wait
/// for the bytes to be published, and fail when the download does. Without, the file must be
/// this stream's alone (its cursor is used).
pub fn read(
    file: Arc<File>,
    start: u64,
    end: u64,
    progress: Option<watch::Receiver<Progress>>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    futures_util::stream::try_unfold(
        (file, start, progress),
        move |(file, pos, mut progress)| async move {
            if pos >= end {
                return Ok(None);
            }
            let available = match &mut progress {
                None => end,
                Some(rx) => loop {
                    let state = rx.borrow_and_update().clone();
                    let available = match state {
                        Progress::Connecting => 0,
                        Progress::Streaming(n) => n.min(end),
                        Progress::Done => end,
                        Progress::Failed(reason) => {
                            return Err(std::io::Error::other(reason.to_string()))
                        }
                    };
                    if available > pos {
                        break available;
                    }
                    if rx.changed().await.is_err() {
                        return Err(std::io::Error::other("the download was abandoned"));
                    }
                },
            };
            let len = (available - pos).min(CHUNK) as usize;
            let reader = Arc::clone(&file);
            let shared = progress.is_some();
            let chunk = tokio::task::spawn_blocking(move || read_chunk(&reader, pos, len, shared))
                .await
                .map_err(std::io::Error::other)??;
            let next = pos + chunk.len() as u64;
            Ok(Some((chunk, (file, next, progress))))
        },
    )
}

/// `len` bytes of `file` from `pos`. A download's file is read by several clients at once, by
/// offset; a stored object's is opened per answer, and read through its cursor into
/// uninitialised memory (no zeroing of every chunk, which the hits' rate notices).
fn read_chunk(file: &File, pos: u64, len: usize, shared: bool) -> std::io::Result<Bytes> {
    use std::io::{Read, Seek};
    let mut buf = Vec::with_capacity(len);
    if shared {
        buf.resize(len, 0);
        file.read_exact_at(&mut buf, pos)?;
    } else {
        let mut file = file;
        file.seek(std::io::SeekFrom::Start(pos))?;
        file.take(len as u64).read_to_end(&mut buf)?;
        if buf.len() != len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Bytes::from(buf))
}
