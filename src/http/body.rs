//! Request and response bodies: reading a request within its limits (size, gzip expansion,
//! the shared memory budget and each client's share of it, time), and streaming a response
//! produced on a blocking thread through a bounded channel.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Chunks in flight between the pack writer and the socket. With sideband packets of 64 KiB
/// this bounds a response's buffered bytes to about 1 MiB; a slow client slows the writer.
const CHANNEL_CHUNKS: usize = 16;

/// Decoded bytes a gzip body may always reach, whatever its compression ratio.
const GZIP_FREE_BYTES: u64 = 1 << 20;

/// Beyond [`GZIP_FREE_BYTES`], a gzip body may decode to at most this many times the bytes
/// received so far. Git's bodies compress far less: `have` lines about 2:1, the most regular
/// (`want-ref refs/pull/N/head`, one per line) about 14:1; a body of zeros about 1000:1.
const GZIP_MAX_RATIO: u64 = 32;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Over the limit (after decompression).
    #[error("request body too large")]
    TooLarge,
    /// A gzip body that decodes to far more than was sent.
    #[error("gzip request body expands more than {GZIP_MAX_RATIO} times")]
    Expands,
    /// A `Content-Encoding` other than `gzip` or `identity`.
    #[error("Content-Encoding '{0}' is not supported (gzip or identity)")]
    Encoding(String),
    /// The body stream failed, e.g. invalid gzip.
    #[error("cannot read request body: {0}")]
    Body(String),
    /// The bytes all requests may buffer together are taken.
    #[error("too many request bodies in memory")]
    Busy,
    /// This client's requests hold their whole share of the budget.
    #[error("too many request bodies in memory from this client")]
    ClientShare,
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

/// Who a body is charged to: an IPv4 address, or the /64 prefix of an IPv6 address (what one
/// subscriber is usually given, so that walking its addresses gains nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                ClientKey(IpAddr::V6(prefix.into()))
            }
            v4 => ClientKey(v4),
        }
    }
}

/// The memory request bodies may hold while they are read and parsed (`MAX_BUFFERED_BODIES`),
/// and how much of it the bodies of one client may hold together
/// (`MAX_BUFFERED_BODIES_PER_CLIENT`): a client cannot take it all and hold it for
/// `BODY_READ_TIMEOUT`.
pub struct Budget {
    units: Arc<Semaphore>,
    total: u32,
    share: u32,
    held: parking_lot::Mutex<HashMap<ClientKey, u32>>,
}

impl Budget {
    /// A budget of `total` bytes, of which one client may hold `share`.
    pub fn new(total: u64, share: u64) -> Arc<Budget> {
        let units = budget_units(total).min(Semaphore::MAX_PERMITS as u32);
        Arc::new(Budget {
            units: Arc::new(Semaphore::new(units as usize)),
            total: units,
            share: budget_units(share).min(units),
            held: Default::default(),
        })
    }

    /// The bytes taken now.
    pub fn used(&self) -> u64 {
        let free = u32::try_from(self.units.available_permits()).unwrap_or(u32::MAX);
        u64::from(self.total.saturating_sub(free)) * BUDGET_UNIT as u64
    }

    /// An empty charge for `client`, to grow as its body arrives.
    fn charge(self: &Arc<Self>, client: ClientKey) -> Result<Charge, Error> {
        let permit = Arc::clone(&self.units)
            .try_acquire_many_owned(0)
            .map_err(|_| Error::Busy)?;
        Ok(Charge {
            budget: Arc::clone(self),
            client,
            permit,
        })
    }
}

/// Memory taken from a [`Budget`] for one body; given back when dropped.
pub struct Charge {
    budget: Arc<Budget>,
    client: ClientKey,
    permit: OwnedSemaphorePermit,
}

impl Charge {
    /// Make the charge `units` in all, failing at once (rather than waiting, since waiting
    /// requests would each hold part of the budget) when the client's share or the budget is
    /// spent.
    fn grow_to(&mut self, units: u32) -> Result<(), Error> {
        let more = units.saturating_sub(self.permit.num_permits() as u32);
        if more == 0 {
            return Ok(());
        }
        let mut held = self.budget.held.lock();
        let mine = held.entry(self.client).or_default();
        if mine.saturating_add(more) > self.budget.share {
            if *mine == 0 {
                held.remove(&self.client);
            }
            return Err(Error::ClientShare);
        }
        let Ok(extra) = Arc::clone(&self.budget.units).try_acquire_many_owned(more) else {
            if *mine == 0 {
                held.remove(&self.client);
            }
            return Err(Error::Busy);
        };
        *mine += more;
        self.permit.merge(extra);
        crate::metrics::buffered_body_bytes(f64::from(more) * BUDGET_UNIT as f64);
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let units = self.permit.num_permits() as u32;
        if units == 0 {
            return;
        }
        crate::metrics::buffered_body_bytes(-f64::from(units) * BUDGET_UNIT as f64);
        let mut held = self.budget.held.lock();
        if let Some(mine) = held.get_mut(&self.client) {
            *mine = mine.saturating_sub(units);
            if *mine == 0 {
                held.remove(&self.client);
            }
        }
    }
}

/// How a request body travels (`Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// As it is.
    Identity,
    /// gzip (git compresses larger upload-pack requests).
    Gzip,
}

impl Encoding {
    /// The encoding `headers` announce; the header's text when it is another.
    fn of(headers: &HeaderMap) -> Result<Encoding, String> {
        let mut encoding = Encoding::Identity;
        for value in headers.get_all(header::CONTENT_ENCODING) {
            let text = value.to_str().unwrap_or("(not text)");
            for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                match coding.to_ascii_lowercase().as_str() {
                    "identity" => {}
                    "gzip" | "x-gzip" if encoding == Encoding::Identity => {
                        encoding = Encoding::Gzip
                    }
                    _ => return Err(text.chars().take(64).collect()),
                }
            }
        }
        Ok(encoding)
    }
}

/// A request body as it arrives, with what reading it needs to know.
pub struct Incoming {
    body: Body,
    encoding: Result<Encoding, String>,
    client: ClientKey,
}

impl Incoming {
    /// The body of a request with `headers`, charged to `client` when it is read.
    pub fn new(body: Body, headers: &HeaderMap, client: ClientKey) -> Self {
        Incoming {
            body,
            encoding: Encoding::of(headers),
            client,
        }
    }

    /// The body itself, not read.
    pub fn into_body(self) -> Body {
        self.body
    }
}

/// The decoded body, within its limits; its memory is charged as it grows.
struct Collect {
    out: Vec<u8>,
    charge: Charge,
    limit: u64,
    /// Decoded bytes the expansion ratio allows so far; `u64::MAX` for a body not encoded.
    allowed: u64,
    /// Why the last write was refused.
    refused: Option<Error>,
}

impl Collect {
    fn push(&mut self, data: &[u8]) -> Result<(), Error> {
        let needed = self.out.len() as u64 + data.len() as u64;
        if needed > self.limit {
            return Err(Error::TooLarge);
        }
        if needed > self.allowed {
            return Err(Error::Expands);
        }
        if needed > self.out.capacity() as u64 {
            // Grow as Vec would (doubling), within the limit, paying for it first.
            let capacity = needed.max(self.out.capacity() as u64 * 2).min(self.limit);
            self.charge.grow_to(budget_units(capacity))?;
            self.out.reserve_exact(capacity as usize - self.out.len());
        }
        self.out.extend_from_slice(data);
        Ok(())
    }
}

impl Write for Collect {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.push(buf) {
            Ok(()) => Ok(buf.len()),
            Err(e) => {
                self.refused = Some(e);
                Err(io::Error::other("request body refused"))
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Read `incoming` into memory within `timeout`, decoding gzip, failing once it exceeds
/// `limit` bytes decoded or expands beyond [`GZIP_MAX_RATIO`]. Its memory is taken from
/// `budget` (allocation, not length, is counted, within its client's share) and given back
/// when the returned charge drops.
pub async fn read_limited(
    incoming: Incoming,
    limit: u64,
    budget: &Arc<Budget>,
    timeout: std::time::Duration,
) -> Result<(Bytes, Charge), Error> {
    let encoding = incoming.encoding.map_err(Error::Encoding)?;
    let charge = budget.charge(incoming.client)?;
    let collect = Collect {
        out: Vec::new(),
        charge,
        limit,
        allowed: match encoding {
            Encoding::Identity => u64::MAX,
            Encoding::Gzip => GZIP_FREE_BYTES,
        },
        refused: None,
    };
    let read = async move {
        let mut body = incoming.body;
        let mut sink = match encoding {
            Encoding::Identity => Sink::Plain(collect),
            Encoding::Gzip => Sink::Gzip(Box::new(flate2::write::GzDecoder::new(collect))),
        };
        let mut received: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Error::Body(crate::error_chain(&e)))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            received += data.len() as u64;
            sink.write(&data, received)?;
        }
        sink.finish()
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Error::TimedOut)?
}

/// Where received bytes go: straight into the body, or through a gzip decoder first.
enum Sink {
    Plain(Collect),
    Gzip(Box<flate2::write::GzDecoder<Collect>>),
}

impl Sink {
    /// Take `data`, `received` bytes having arrived in all.
    fn write(&mut self, data: &[u8], received: u64) -> Result<(), Error> {
        match self {
            Sink::Plain(collect) => collect.push(data),
            Sink::Gzip(decoder) => {
                decoder.get_mut().allowed =
                    GZIP_FREE_BYTES.max(received.saturating_mul(GZIP_MAX_RATIO));
                decoder
                    .write_all(data)
                    .map_err(|e| gzip_error(decoder.get_mut(), e))
            }
        }
    }

    fn finish(self) -> Result<(Bytes, Charge), Error> {
        let collect = match self {
            Sink::Plain(collect) => collect,
            Sink::Gzip(mut decoder) => {
                decoder
                    .try_finish()
                    .map_err(|e| gzip_error(decoder.get_mut(), e))?;
                decoder
                    .finish()
                    .map_err(|e| Error::Body(format!("invalid gzip: {e}")))?
            }
        };
        Ok((collect.out.into(), collect.charge))
    }
}

/// The error of a failed decoder write: the body's own refusal, or invalid gzip.
fn gzip_error(collect: &mut Collect, e: io::Error) -> Error {
    collect
        .refused
        .take()
        .unwrap_or_else(|| Error::Body(format!("invalid gzip: {e}")))
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

/// How often a writer blocked on a full channel looks at the interrupt flag.
const INTERRUPT_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// The producer's end: a blocking `io::Write` over the channel. A write blocks while the
/// channel is full, and fails once the receiver is gone, the client took nothing for
/// `CLIENT_STALL_TIMEOUT`, or the interrupt flag is set (a time limit passed while the client
/// was not reading).
pub struct ChannelWriter {
    tx: mpsc::Sender<Chunk>,
    runtime: tokio::runtime::Handle,
    interrupt: Arc<AtomicBool>,
    stall: std::time::Duration,
}

impl ChannelWriter {
    /// Write into `tx`, waiting on `runtime`'s timers, at most `stall` for room in it.
    pub fn new(
        tx: mpsc::Sender<Chunk>,
        runtime: tokio::runtime::Handle,
        interrupt: Arc<AtomicBool>,
        stall: std::time::Duration,
    ) -> Self {
        ChannelWriter {
            tx,
            runtime,
            interrupt,
            stall,
        }
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let started = std::time::Instant::now();
        let (tx, interrupt, stall) = (&self.tx, &self.interrupt, self.stall);
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
                    Err(_) if started.elapsed() >= stall => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn client(ip: &str) -> ClientKey {
        ip.parse::<IpAddr>().unwrap().into()
    }

    fn incoming(body: Vec<u8>, encoding: Option<&str>, from: &str) -> Incoming {
        let mut headers = HeaderMap::new();
        if let Some(e) = encoding {
            headers.insert(header::CONTENT_ENCODING, e.parse().unwrap());
        }
        Incoming::new(Body::from(body), &headers, client(from))
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    async fn read(budget: &Arc<Budget>, body: Incoming) -> Result<(Bytes, Charge), Error> {
        read_limited(body, 64 << 20, budget, std::time::Duration::from_secs(5)).await
    }

    #[test]
    fn clients_are_addresses_and_ipv6_prefixes() {
        assert_eq!(client("2001:db8:1:2::1"), client("2001:db8:1:2:ffff::9"));
        assert_ne!(client("2001:db8:1:2::1"), client("2001:db8:1:3::1"));
        assert_eq!(client("::ffff:10.0.0.1"), client("10.0.0.1"));
        assert_ne!(client("10.0.0.1"), client("10.0.0.2"));
    }

    #[tokio::test]
    async fn gzip_is_decoded_within_its_expansion_ratio() {
        let budget = Budget::new(256 << 20, 64 << 20);
        let text = b"0032have 0123456789abcdef0123456789abcdef01234567\n".repeat(1000);
        let (bytes, _) = read(&budget, incoming(gzip(&text), Some("gzip"), "10.0.0.1"))
            .await
            .unwrap();
        assert_eq!(&bytes[..], &text[..]);
        let bomb = gzip(&vec![0; 8 << 20]);
        let e = read(&budget, incoming(bomb, Some("x-gzip"), "10.0.0.1"))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::Expands), "{e}");
        for bad in ["br", "gzip, gzip", "deflate"] {
            let e = read(&budget, incoming(b"x".to_vec(), Some(bad), "10.0.0.1"))
                .await
                .err()
                .unwrap();
            assert!(matches!(e, Error::Encoding(_)), "{bad}: {e}");
        }
        let e = read(
            &budget,
            incoming(b"\x1f\x8bnot".to_vec(), Some("gzip"), "10.0.0.1"),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(e, Error::Body(_)), "{e}");
        let (plain, _) = read(
            &budget,
            incoming(text.clone(), Some("identity"), "10.0.0.1"),
        )
        .await
        .unwrap();
        assert_eq!(plain.len(), text.len());
        assert_eq!(budget.used(), 0, "every charge was given back");
    }

    #[tokio::test]
    async fn one_client_holds_at_most_its_share() {
        let budget = Budget::new(8 << 20, 3 << 19);
        let (_held, first) = read(&budget, incoming(vec![b'0'; 1 << 20], None, "10.0.0.1"))
            .await
            .unwrap();
        let e = read(&budget, incoming(vec![b'0'; 1 << 20], None, "10.0.0.1"))
            .await
            .err()
            .unwrap();
        assert!(matches!(e, Error::ClientShare), "{e}");
        let (_, other) = read(&budget, incoming(vec![b'0'; 1 << 20], None, "10.0.0.2"))
            .await
            .unwrap();
        assert_eq!(budget.used(), 2 << 20);
        drop((first, other));
        assert_eq!(budget.used(), 0);
        assert!(budget.held.lock().is_empty(), "no client left behind");
    }
}
