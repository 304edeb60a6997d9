//! Request and response bodies: reading a request with a size limit, and streaming a response
//! produced on a blocking thread through a bounded channel.

use std::io::{self, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Chunks in flight between the pack writer and the socket. With sideband packets of 64 KiB
/// this bounds a response's buffered bytes to about 1 MiB; a slow client slows the writer.
const CHANNEL_CHUNKS: usize = 16;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Over the limit (after decompression).
    #[error("request body too large")]
    TooLarge,
    /// The body stream failed, e.g. invalid gzip.
    #[error("cannot read request body: {0}")]
    Body(String),
    /// The bytes all requests may buffer together are taken.
    #[error("too many request bodies in memory")]
    Busy,
    /// The client took longer than allowed to send it.
    #[error("request body not received in time")]
    TimedOut,
}

/// The unit of the shared body budget (a semaphore counts `u32` permits).
const BUDGET_UNIT: usize = 1024;

/// How many budget units a buffer of `bytes` takes.
pub fn budget_units(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(BUDGET_UNIT as u64)).unwrap_or(u32::MAX)
}

/// Read `body` into memory within `timeout`, failing once it exceeds `limit` bytes. Its
/// memory is taken from `budget` (shared by all requests; allocation, not length, is counted)
/// and given back when the returned permit drops; a request that finds the budget spent fails
/// at once rather than wait, since waiting requests would each hold part of it.
pub async fn read_limited(
    body: Body,
    limit: u64,
    budget: &Arc<Semaphore>,
    timeout: std::time::Duration,
) -> Result<(Bytes, OwnedSemaphorePermit), ReadError> {
    let mut permit = Arc::clone(budget)
        .try_acquire_many_owned(0)
        .map_err(|_| ReadError::Busy)?;
    let read = async {
        let mut body = body;
        let mut out: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ReadError::Body(crate::error_chain(&e)))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let needed = out.len() as u64 + data.len() as u64;
            if needed > limit {
                return Err(ReadError::TooLarge);
            }
            if needed > out.capacity() as u64 {
                // Grow as Vec would (doubling), within the limit, paying for it first.
                let capacity = needed.max(out.capacity() as u64 * 2).min(limit);
                let more = budget_units(capacity).saturating_sub(permit.num_permits() as u32);
                let extra = Arc::clone(budget)
                    .try_acquire_many_owned(more)
                    .map_err(|_| ReadError::Busy)?;
                permit.merge(extra);
                out.reserve_exact(capacity as usize - out.len());
            }
            out.extend_from_slice(&data);
        }
        Ok(out)
    };
    let out = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ReadError::TimedOut)??;
    Ok((out.into(), permit))
}

type Chunk = Result<Bytes, io::Error>;

/// The response body: chunks from the producing thread. Dropping it (the client went away)
/// sets the interrupt flag so that the producer stops.
pub struct ResponseStream {
    rx: mpsc::Receiver<Chunk>,
    interrupt: Arc<AtomicBool>,
}

impl ResponseStream {
    /// A stream and the sender its producer writes to.
    pub fn new(interrupt: Arc<AtomicBool>) -> (Self, mpsc::Sender<Chunk>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        (ResponseStream { rx, interrupt }, tx)
    }
}

impl futures_util::Stream for ResponseStream {
    type Item = Chunk;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        self.interrupt.store(true, Ordering::Relaxed);
    }
}

/// How long a response may wait for a client that stopped reading before it is abandoned,
/// so that such a client cannot hold a pack slot forever.
const CLIENT_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// How often a writer blocked on a full channel looks at the interrupt flag.
const INTERRUPT_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// The producer's end: a blocking `io::Write` over the channel. A write blocks while the
/// channel is full, and fails once the receiver is gone, the client stalled too long, or the
/// interrupt flag is set (a time limit passed while the client was not reading).
pub struct ChannelWriter {
    tx: mpsc::Sender<Chunk>,
    runtime: tokio::runtime::Handle,
    interrupt: Arc<AtomicBool>,
}

impl ChannelWriter {
    /// Write into `tx`, waiting on `runtime`'s timers.
    pub fn new(
        tx: mpsc::Sender<Chunk>,
        runtime: tokio::runtime::Handle,
        interrupt: Arc<AtomicBool>,
    ) -> Self {
        ChannelWriter {
            tx,
            runtime,
            interrupt,
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let started = std::time::Instant::now();
        let (tx, interrupt) = (&self.tx, &self.interrupt);
        let permit = self.runtime.block_on(async {
            loop {
                match tokio::time::timeout(INTERRUPT_POLL, tx.reserve()).await {
                    Ok(Ok(permit)) => return Ok(permit),
                    Ok(Err(_)) => {
                        return Err(io::Error::new(
                            io::ErrorKind::BrokenPipe,
                            "client disconnected",
                        ))
                    }
                    // Not `ErrorKind::Interrupted`, which `write_all` retries.
                    Err(_) if interrupt.load(Ordering::Relaxed) => {
                        return Err(io::Error::other("stopped: a time limit passed"))
                    }
                    Err(_) if started.elapsed() >= CLIENT_STALL_TIMEOUT => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "client stopped reading",
                        ))
                    }
                    Err(_) => {}
                }
            }
        })?;
        permit.send(Ok(Bytes::copy_from_slice(buf)));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
