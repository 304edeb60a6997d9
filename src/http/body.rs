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
use tokio::sync::mpsc;

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
}

/// Read `body` into memory, failing once it exceeds `limit` bytes.
pub async fn read_limited(mut body: Body, limit: u64) -> Result<Bytes, ReadError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Body(error_chain(&e)))?;
        if let Ok(data) = frame.into_data() {
            if out.len() as u64 + data.len() as u64 > limit {
                return Err(ReadError::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.into())
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
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

/// The producer's end: a blocking `io::Write` over the channel. A write blocks while the
/// channel is full, and fails once the receiver is gone or the client stalled too long.
pub struct ChannelWriter {
    tx: mpsc::Sender<Chunk>,
    runtime: tokio::runtime::Handle,
}

impl ChannelWriter {
    /// Write into `tx`, waiting on `runtime`'s timers.
    pub fn new(tx: mpsc::Sender<Chunk>, runtime: tokio::runtime::Handle) -> Self {
        ChannelWriter { tx, runtime }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let send = self.tx.send(Ok(Bytes::copy_from_slice(buf)));
        match self
            .runtime
            .block_on(tokio::time::timeout(CLIENT_STALL_TIMEOUT, send))
        {
            Ok(Ok(())) => Ok(buf.len()),
            Ok(Err(_)) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "client disconnected",
            )),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading",
            )),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
