//! An upload-pack answer in flight: the slots it holds, its time limits, the blocking thread
//! that writes it into a bounded response stream, and the record of how it ended (the one
//! place a streamed answer's outcome is logged and counted).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use tracing::{Instrument, Span};

use super::body::{ChannelWriter, ResponseStream};
use super::error::Error;
use super::git::{snapshot, Mirrored};
use super::{AppState, Line};
use crate::config::Config;
use crate::mirror::{Freshness, Status};
use crate::pack;
use crate::repo::Snapshot;
use crate::upload_pack;

/// What an upload-pack answer holds while it runs: a stream slot for its thread, for as long as
/// it streams (`MAX_CONCURRENT_STREAMS`), and a pack slot while it generates a pack
/// (`MAX_CONCURRENT_PACKS`), which an answer read from the pack cache gives back early.
pub(super) struct Slots {
    stream: tokio::sync::OwnedSemaphorePermit,
    pack: tokio::sync::OwnedSemaphorePermit,
}

impl Slots {
    /// Both slots, waiting at most `QUEUE_TIMEOUT` for them.
    pub(super) async fn acquire(state: &AppState) -> Result<Slots, Error> {
        let wait = async {
            let stream = Arc::clone(&state.stream_slots).acquire_owned().await;
            let pack = Arc::clone(&state.pack_slots).acquire_owned().await;
            match (stream, pack) {
                (Ok(stream), Ok(pack)) => Ok(Slots { stream, pack }),
                _ => Err(Error::Unavailable),
            }
        };
        tokio::time::timeout(*state.config.queue_timeout, wait)
            .await
            .map_err(|_| Error::Busy("every pack slot is taken"))?
    }
}

/// A request to answer with a pack, once its mirror has what it wants.
pub(super) struct Job {
    /// The request's mirror; its lease is held until the answer has been sent.
    pub(super) mirrored: Mirrored,
    pub(super) request: upload_pack::Request,
    /// The answer's preamble went out already (see [`upload_pack::Context::preamble_sent`]).
    pub(super) preamble_sent: bool,
    /// How the mirror was ensured (`X-Git-Proxy-Status`).
    pub(super) status: Status,
    /// When the request arrived, for the duration in its log line.
    pub(super) arrived: std::time::Instant,
}

impl Job {
    /// The start of this request's log line, with `status`.
    fn line(&self, status: u16) -> Line {
        Line::new(status, Some(self.status.as_str()), self.arrived.elapsed())
    }
}

/// Start answering `job` from `snapshot` with `slots`: the answer streams from the returned
/// body.
pub(super) fn start(
    state: &AppState,
    job: Job,
    snapshot: Arc<Snapshot>,
    slots: Slots,
    span: Span,
) -> Body {
    let interrupt = Arc::new(AtomicBool::new(false));
    let (stream, tx) = ResponseStream::new(Arc::clone(&interrupt));
    run(state, job, snapshot, slots, tx, interrupt, span);
    Body::from_stream(stream)
}

/// What an early answer waits for before its pack.
pub(super) enum Wait {
    /// A want-miss sync.
    Sync,
    /// The creation of the mirror (its first clone), under way in this task; then a
    /// want-miss sync if the upstream moved since the client's listing.
    Creation(tokio::task::JoinHandle<Result<Status, crate::mirror::Error>>),
}

/// Answer at once: the `preamble`, progress on band 2 while the mirror is synced or created
/// (`wait`), then the pack. A failure ends the answer with a band-3 message.
pub(super) fn wait_then_pack(
    state: AppState,
    job: Job,
    preamble: Vec<u8>,
    wait: Wait,
    span: Span,
) -> Body {
    let interrupt = Arc::new(AtomicBool::new(false));
    let (stream, tx) = ResponseStream::new(Arc::clone(&interrupt));
    let task = async move {
        let send = |bytes: Vec<u8>| tx.send(Ok(bytes.into()));
        let gone = |job: &Job| {
            job.line(200)
                .failed(
                    "client-gone",
                    "the client closed the connection".into(),
                    tracing::Level::INFO,
                )
                .log()
        };
        if send(preamble).await.is_err() {
            return gone(&job);
        }
        let arrived = job.arrived;
        let started = std::time::Instant::now();
        let name = job.mirrored.target.name.clone();
        let request = job.mirrored.request();
        let progress = state.mirrors.fetch_progress(&job.mirrored.target.dir);
        let progress_line = || {
            format!(
                "mirroring {name}: fetching from upstream, {} ({}s)\r",
                progress.received().describe(),
                started.elapsed().as_secs()
            )
        };
        let result = {
            let want_miss_sync = async {
                state
                    .mirrors
                    .ensure(&request, Freshness::SyncedAfter(arrived))
                    .await
                    .map_err(Error::from)
            };
            let updated = async {
                match wait {
                    Wait::Sync => want_miss_sync.await,
                    Wait::Creation(creation) => {
                        creation
                            .await
                            .map_err(|e| Error::Internal(e.to_string()))??;
                        // The client's wants come from the upstream's listing: the mirror has
                        // them, unless the upstream moved since.
                        let created = snapshot(&state, &job.mirrored).await?;
                        if super::git::want_miss(&created, &job.request)
                            .await?
                            .is_empty()
                        {
                            Ok(Status::Clone)
                        } else {
                            want_miss_sync.await.map(|_| Status::Clone)
                        }
                    }
                }
            };
            tokio::pin!(updated);
            let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
            loop {
                tokio::select! {
                    result = &mut updated => break result,
                    _ = ticks.tick() => {
                        if send(upload_pack::progress_packets(&progress_line())).await.is_err() {
                            return gone(&job);
                        }
                    }
                }
            }
        };
        // Any failure from here on ends the answer with a band-3 message git prints.
        let ready = async {
            let status = result?;
            let line = match status {
                Status::Stale => {
                    format!("mirroring {name}: upstream unavailable, serving the mirror as it is\n")
                }
                _ => format!(
                    "mirroring {name}: done in {}s.\n",
                    started.elapsed().as_secs()
                ),
            };
            Ok::<_, Error>((line, snapshot(&state, &job.mirrored).await?))
        };
        let snapshot = match ready.await {
            Ok((line, snapshot)) => {
                if send(upload_pack::progress_packets(&line)).await.is_err() {
                    return gone(&job);
                }
                snapshot
            }
            Err(e) => {
                // The answer's status went out as 200; the failure is told in band 3.
                let failure = e.failure();
                failure
                    .line(200, Some(job.status.as_str()), arrived.elapsed())
                    .log();
                let _ = send(upload_pack::error_packets(&format!("{e}\n"))).await;
                return;
            }
        };
        match Slots::acquire(&state).await {
            Ok(slots) => run(&state, job, snapshot, slots, tx, interrupt, span),
            // The preamble went out: say why the pack does not follow.
            Err(e) => {
                e.failure()
                    .line(200, Some(job.status.as_str()), arrived.elapsed())
                    .log();
                let _ = send(upload_pack::error_packets(&format!("{e}\n"))).await;
            }
        }
    };
    tokio::spawn(task.in_current_span());
    Body::from_stream(stream)
}

/// How often progress is reported while a client waits for a sync.
const PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Generate the answer to `job` on a blocking thread, streaming it into `tx`, and record how
/// it ended.
fn run(
    state: &AppState,
    job: Job,
    snapshot: Arc<Snapshot>,
    slots: Slots,
    tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    interrupt: Arc<AtomicBool>,
    span: Span,
) {
    let line = job.line(200);
    let Job {
        mirrored,
        request,
        preamble_sent,
        ..
    } = job;
    state.mirrors.served(&mirrored.target.dir);
    let options = upload_pack::Options {
        pack_threads: state.config.pack_threads,
        compression: state.compression,
    };
    let runtime = tokio::runtime::Handle::current();
    let pack_cache = state.pack_cache.clone();
    let limits = Arc::new(upload_pack::Limits::default());
    let watchdog = watchdog(&state.config, Arc::clone(&interrupt), Arc::clone(&limits));
    let stall = *state.config.client_stall_timeout;
    let started = std::time::Instant::now();
    let cut_off = Arc::clone(&state.cut_off);
    tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let _watchdog = AbortOnDrop(watchdog);
        // Held until the answer has been sent: the mirror's lease and the stream slot.
        let _lease = mirrored.lease;
        let _stream = slots.stream;
        let out = ChannelWriter::new(tx, runtime, Arc::clone(&interrupt), stall);
        let repo = snapshot.repo();
        let db = crate::pack::db(&repo);
        let ctx = upload_pack::Context {
            snapshot: &snapshot,
            repo: &repo,
            db: &db,
            interrupt: &interrupt,
            limits: &limits,
            options,
            cache: pack_cache
                .as_ref()
                .map(|c| (c, mirrored.target.name.as_str())),
            pack_slot: std::cell::Cell::new(Some(Box::new(slots.pack))),
            preamble_sent,
        };
        let result = upload_pack::serve(&ctx, &request, out);
        let timed_out = limits.timed_out.load(Ordering::Relaxed);
        let line = Line {
            duration: line.duration + started.elapsed(),
            ..line
        };
        let cut_off = cut_off.load(Ordering::Relaxed);
        record(
            request.command(),
            &result,
            timed_out || cut_off,
            cut_off,
            line,
        );
    });
}

/// Log and count how an answer ended, in its request `line`; `timed_out`: a time limit
/// stopped it, `cut_off`: the server did, at the end of `SHUTDOWN_GRACE`.
fn record(
    command: &'static str,
    result: &Result<upload_pack::Outcome, upload_pack::Error>,
    timed_out: bool,
    cut_off: bool,
    line: Line,
) {
    use tracing::Level;
    let line = match result {
        Ok(outcome) => {
            crate::metrics::request(command, "ok");
            if let upload_pack::Outcome::Pack { objects, bytes } = outcome {
                crate::metrics::pack(*objects, *bytes);
            }
            line.outcome(outcome)
        }
        Err(_) if cut_off => {
            crate::metrics::request(command, "cut-off");
            line.failed(
                "cut-off",
                "the server shut down: SHUTDOWN_GRACE passed".into(),
                Level::WARN,
            )
        }
        Err(_) if timed_out => {
            crate::metrics::request(command, "timeout");
            line.failed(
                "timeout",
                "COMPUTE_TIMEOUT or REQUEST_TIMEOUT passed".into(),
                Level::WARN,
            )
        }
        Err(upload_pack::Error::Io(e)) => {
            crate::metrics::request(command, "client-gone");
            line.failed("client-gone", e.to_string(), Level::INFO)
        }
        Err(upload_pack::Error::Pack(e)) if matches!(e.root(), pack::Error::Interrupted) => {
            crate::metrics::request(command, "client-gone");
            line.failed(
                "client-gone",
                "the client closed the connection".into(),
                Level::INFO,
            )
        }
        Err(e) if e.is_refusal() => {
            crate::metrics::request(command, "refused");
            line.failed("refused", e.to_string(), Level::INFO)
        }
        Err(e) => {
            crate::metrics::request(command, "error");
            line.failed("error", crate::error_chain(e), Level::ERROR)
        }
    };
    line.log();
}

/// Enforce an answer's time limits: once `COMPUTE_TIMEOUT` has passed before its pack
/// streams, or `REQUEST_TIMEOUT` in all, it is interrupted as if its client had gone.
fn watchdog(
    config: &Config,
    interrupt: Arc<AtomicBool>,
    limits: Arc<upload_pack::Limits>,
) -> tokio::task::AbortHandle {
    let (compute, total) = (*config.compute_timeout, *config.request_timeout);
    let stop = move |limits: &upload_pack::Limits| {
        limits.timed_out.store(true, Ordering::Relaxed);
        interrupt.store(true, Ordering::Relaxed);
    };
    tokio::spawn(async move {
        tokio::time::sleep(compute.min(total)).await;
        if !limits.streaming.load(Ordering::Relaxed) {
            return stop(&limits);
        }
        tokio::time::sleep(total.saturating_sub(compute)).await;
        stop(&limits)
    })
    .abort_handle()
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
