//! The upload-pack service: turns a parsed request into the bytes of the answer — the ref
//! advertisement, `ls-refs`, acknowledgements and the pack.
//!
//! It works on an open repository and an `io::Write`; it does not know about HTTP. Errors the
//! client must see are written into the response (`ERR` packets before the pack, band 3
//! inside it) and also returned so the caller can log them.
//!
//! A request that wants what the mirror lacks (a want-miss) is reported as data
//! ([`Request::wants`], [`Missing`]): the caller syncs the mirror, then serves it. A caller
//! that answers before the sync frames its progress with [`progress_packets`] and
//! [`error_packets`].

mod negotiate;
mod shallow;
mod sideband;

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use gix::ObjectId;

pub use negotiate::{Have, Negotiator};
pub use shallow::Shallow;
pub use sideband::{error_packets, progress_packets, Sideband};

use crate::pack;
use crate::protocol::advert::{self, Refs};
use crate::protocol::filter::Filter;
use crate::protocol::v0::{self, MultiAck};
use crate::protocol::{pktline, v2, LARGE_BAND_PAYLOAD, SMALL_BAND_PAYLOAD};
use crate::repo;

/// The protocol version a client asked for with the `Git-Protocol` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// No header, or `version=0`.
    V0,
    /// `version=1`: v0 with a `version 1` line.
    V1,
    /// `version=2`.
    V2,
}

impl Version {
    /// Read the value of a `Git-Protocol` header (`key=value` pairs separated by `:`).
    pub fn from_header(value: Option<&str>) -> Self {
        let mut version = Version::V0;
        for kv in value.unwrap_or_default().split(':') {
            match kv.trim() {
                "version=2" => version = Version::V2,
                "version=1" if version == Version::V0 => version = Version::V1,
                _ => {}
            }
        }
        version
    }
}

/// A parsed upload-pack request, of either protocol.
#[derive(Debug)]
pub enum Request {
    /// A v0 or v1 request (wants, haves, capabilities).
    V0(v0::Request),
    /// A v2 command (`ls-refs` or `fetch`).
    V2(v2::Request),
}

impl Request {
    /// Parse a request body sent with `version`; `None` when it holds no request (a flush
    /// only: git's probe before a large body).
    pub fn parse(version: Version, body: &[u8]) -> Result<Option<Request>, crate::protocol::Error> {
        match version {
            Version::V2 => v2::parse(body).map(|r| r.map(Request::V2)),
            Version::V0 | Version::V1 => v0::parse(body).map(|r| r.map(Request::V0)),
        }
    }

    /// The command, for logs and metrics: `upload-pack` (v0/v1), `ls-refs` or `fetch`.
    pub fn command(&self) -> &'static str {
        match self {
            Request::V0(_) => "upload-pack",
            Request::V2(r) => match r.command {
                v2::Command::LsRefs(_) => "ls-refs",
                v2::Command::Fetch(_) => "fetch",
            },
        }
    }

    /// The arguments of a v2 `ls-refs`, which is answered from the snapshot alone.
    pub fn ls_refs(&self) -> Option<&v2::LsRefs> {
        match self {
            Request::V2(v2::Request {
                command: v2::Command::LsRefs(args),
                ..
            }) => Some(args),
            _ => None,
        }
    }

    /// What precedes the pack data (v2's `packfile` line, v0's `NAK`), when it may be sent
    /// before the mirror is synced to show progress meanwhile: for a fetch that needs no
    /// acknowledgements and no shallow or wanted-refs section, and asked for progress. Serve
    /// the request with [`Context::preamble_sent`] then.
    pub fn early_preamble(&self) -> Option<Vec<u8>> {
        match self {
            Request::V2(r) => match &r.command {
                v2::Command::Fetch(f) => early_preamble_v2(f),
                v2::Command::LsRefs(_) => None,
            },
            Request::V0(r) => early_preamble_v0(r),
        }
    }

    /// [`Request::early_preamble`] for a mirror being created, whose refs are `refs` (the
    /// upstream's listing): a v2 fetch's `want-ref`s (git's clone sends them) are resolved from
    /// `refs`, their `wanted-refs` section goes out in the preamble, and the returned request,
    /// which wants their objects instead, is the one to serve. `None` when the request cannot
    /// be answered early, or names a ref that `refs` lacks.
    pub fn early_answer(&self, refs: &Refs) -> Option<(Vec<u8>, Option<Request>)> {
        if let Some(preamble) = self.early_preamble() {
            return Some((preamble, None));
        }
        let mut resolved = self.for_new_mirror()?;
        let preamble = resolved.early_preamble()?;
        let (Request::V2(r), Request::V2(v2::Request { command, .. })) = (self, &mut resolved)
        else {
            return Some((preamble, Some(resolved)));
        };
        let (v2::Command::Fetch(f), v2::Command::Fetch(fetch)) = (&r.command, command) else {
            return None;
        };
        let mut preamble = Vec::new();
        pktline::text(&mut preamble, "wanted-refs");
        for name in &f.want_refs {
            let found = refs.find(name)?;
            pktline::text(&mut preamble, &format!("{} {name}", found.target));
            fetch.wants.push(found.target);
        }
        pktline::delim(&mut preamble);
        pktline::text(&mut preamble, "packfile");
        Some((preamble, Some(resolved)))
    }

    /// The request as the mirror being created answers it: a v2 fetch without its `want-ref`s
    /// (resolved from the upstream's listing instead), the final round of a v0 negotiation
    /// without its `have`s (nothing the client has can be in common with a mirror that did not
    /// exist when its rounds were answered: `NAK`). `None` for `ls-refs`.
    fn for_new_mirror(&self) -> Option<Request> {
        match self {
            Request::V2(r) => match &r.command {
                v2::Command::Fetch(f) => Some(Request::V2(v2::Request {
                    command: v2::Command::Fetch(v2::Fetch {
                        want_refs: Vec::new(),
                        ..f.clone()
                    }),
                    agent: r.agent.clone(),
                })),
                v2::Command::LsRefs(_) => None,
            },
            Request::V0(r) => Some(Request::V0(v0::Request {
                haves: Vec::new(),
                ..r.clone()
            })),
        }
    }

    /// The answer to a negotiation round (`have`s without `done`) for a mirror being created:
    /// nothing the client has can be in common with a mirror that does not exist yet, so the
    /// client goes on to its final round, which [`Request::early_answer`] answers. `None` for
    /// any other request, and for a v0 round that needs the shallow list first.
    pub fn nothing_in_common(&self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match self {
            Request::V2(v2::Request {
                command: v2::Command::Fetch(f),
                ..
            }) if f.seen_haves && !f.done => {
                pktline::text(&mut out, "acknowledgments");
                pktline::text(&mut out, "NAK");
                pktline::flush(&mut out);
            }
            Request::V0(r) if !r.done && !r.haves.is_empty() && !r.deepen.is_active() => {
                pktline::text(&mut out, "NAK");
            }
            _ => return None,
        }
        Some(out)
    }

    /// Whether [`Request::early_answer`] or [`Request::nothing_in_common`] may answer.
    pub fn may_answer_early(&self) -> bool {
        self.nothing_in_common().is_some()
            || self
                .for_new_mirror()
                .is_some_and(|r| r.early_preamble().is_some())
    }

    /// What the request wants, checked against `snapshot` as far as that needs no object
    /// lookup: the first step of finding a want-miss.
    pub fn wants(&self, snapshot: &repo::Snapshot) -> Wants {
        let (wants, want_refs): (&[ObjectId], &[gix::bstr::BString]) = match self {
            Request::V0(r) => (&r.wants, &[]),
            Request::V2(r) => match &r.command {
                v2::Command::Fetch(f) => (&f.wants, &f.want_refs),
                v2::Command::LsRefs(_) => (&[], &[]),
            },
        };
        let missing_refs: Vec<_> = want_refs
            .iter()
            .filter(|name| snapshot.find_ref(name).is_none())
            .cloned()
            .collect();
        // One missing ref is a want-miss already: its objects need no lookup.
        let beyond_tips = if missing_refs.is_empty() {
            wants
                .iter()
                .filter(|w| !snapshot.is_tip(w))
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        Wants {
            missing_refs,
            beyond_tips,
        }
    }
}

/// A request's wants against a snapshot (see [`Request::wants`]), before the object lookups
/// that [`Wants::missing`] makes.
#[derive(Debug)]
pub struct Wants {
    missing_refs: Vec<gix::bstr::BString>,
    /// Wants that are not ref tips: whether the mirror has them takes a lookup each.
    beyond_tips: Vec<ObjectId>,
}

impl Wants {
    /// Whether [`Wants::missing`] reads the object store, so that the caller runs it on a
    /// blocking thread.
    pub fn needs_lookup(&self) -> bool {
        !self.beyond_tips.is_empty()
    }

    /// What the mirror lacks of what the request wants.
    pub fn missing(self, snapshot: &repo::Snapshot) -> Missing {
        let objects = if self.beyond_tips.is_empty() {
            Vec::new()
        } else {
            let repo = snapshot.repo();
            self.beyond_tips
                .into_iter()
                .filter(|w| !repo.has_object(w))
                .collect()
        };
        Missing {
            refs: self.missing_refs,
            objects,
        }
    }
}

/// A want-miss: what a request wants that the mirror does not have (yet: a push after its
/// last sync, or a SHA given out of band). Reported, not acted on: the caller syncs the mirror
/// and serves the request afterwards.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Missing {
    /// Wanted refs (v2 `want-ref`) the mirror does not have.
    pub refs: Vec<gix::bstr::BString>,
    /// Wanted objects the mirror does not have; not looked for when a ref is missing.
    pub objects: Vec<ObjectId>,
}

impl Missing {
    /// Whether the mirror has everything the request wants.
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty() && self.objects.is_empty()
    }
}

/// Errors of the upload-pack service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client wants an object we may not or cannot give it.
    #[error("upload-pack: not our ref {0}")]
    NotOurRef(ObjectId),
    /// The request makes no sense for this repository (an unknown ref, a bad shallow line).
    #[error("{0}")]
    Protocol(String),
    /// Reading the repository failed.
    #[error(transparent)]
    Repo(#[from] repo::Error),
    /// Planning or writing the pack failed.
    #[error(transparent)]
    Pack(#[from] pack::Error),
    /// gix failed while negotiating.
    #[error("{context}")]
    Git {
        /// What we were doing.
        context: &'static str,
        /// gix's error.
        #[source]
        source: pack::Source,
    },
    /// A request built by the proxy itself (a prewarm's) did not parse.
    #[error("building a request")]
    Request(#[from] crate::protocol::Error),
    /// Writing the response failed: the client went away.
    #[error("writing response: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    pub(crate) fn git<E: Into<pack::Source>>(context: &'static str) -> impl FnOnce(E) -> Error {
        move |e| Error::Git {
            context,
            source: e.into(),
        }
    }

    /// Whether the request asked for what it may not have (not our ref, a missing object) or
    /// broke the protocol: the client's fault, not ours.
    pub fn is_refusal(&self) -> bool {
        match self {
            Error::NotOurRef(_) | Error::Protocol(_) => true,
            Error::Pack(e) => matches!(e.root(), pack::Error::Missing(_)),
            _ => false,
        }
    }

    /// The message for the client: precise for what the client caused, generic for our own
    /// faults (their details go to the log).
    pub fn client_message(&self) -> String {
        match self {
            e if e.is_refusal() => self.to_string(),
            Error::Pack(e) if matches!(e.root(), pack::Error::Interrupted) => {
                "upload-pack: aborted".into()
            }
            Error::Io(_) => "upload-pack: aborted".into(),
            _ => "upload-pack: internal server error (see the proxy's log)".into(),
        }
    }
}

/// What a request produced, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was asked (a probe, or a request without wants).
    Empty,
    /// The protocol v2 capability advertisement.
    Capabilities,
    /// A ref listing with this many refs.
    Refs(usize),
    /// A negotiation round without a pack.
    Acks {
        /// Haves acknowledged.
        common: usize,
    },
    /// A pack was sent.
    Pack {
        /// Objects in the pack.
        objects: usize,
        /// Pack bytes (without framing).
        bytes: u64,
    },
}

impl Outcome {
    /// What the answer was, in a word, for the request log.
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Empty => "empty",
            Outcome::Capabilities => "capabilities",
            Outcome::Refs(_) => "refs",
            Outcome::Acks { .. } => "acks",
            Outcome::Pack { .. } => "pack",
        }
    }
}

/// Settings that shape every pack.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Threads compressing pack entries per request; `None` for all cores.
    pub pack_threads: Option<usize>,
    /// zlib level for objects compressed anew.
    pub compression: gix::zlib::Compression,
}

/// Whatever bounds concurrent pack generations (a semaphore permit), held while one runs.
pub type PackSlot = Box<dyn Send>;

/// One request's access to the repository and its cancellation flag.
pub struct Context<'a> {
    /// The mirror's refs and what else only changes when it syncs.
    pub snapshot: &'a repo::Snapshot,
    /// A handle on the repository being served ([`repo::Snapshot::repo`]).
    pub repo: &'a gix::Repository,
    /// One object-database handle for all of the request's object work ([`pack::db`]).
    pub db: &'a pack::Db,
    /// Set when the client went away or a time limit passed: long work stops.
    pub interrupt: &'a AtomicBool,
    /// The answer's side of its time limits.
    pub limits: &'a Limits,
    /// Settings.
    pub options: Options,
    /// The pack cache, if it is on, and the mirror's name for its keys.
    pub cache: Option<(&'a pack::cache::PackCache, &'a str)>,
    /// The slot this request holds for pack generation. A request served from the pack cache
    /// gives it up (it only reads a file); one that starts a shared generation hands it over.
    pub pack_slot: std::cell::Cell<Option<PackSlot>>,
    /// The caller already sent what precedes the pack data — v2's `packfile` line or v0's
    /// `NAK` — to show progress while it synced the mirror. Only for requests that need no
    /// acknowledgements and no shallow or wanted-refs section; errors then go on band 3.
    pub preamble_sent: bool,
}

/// An answer's time limits as the answer sees them; a watchdog outside enforces them by
/// setting the interrupt flag.
#[derive(Debug, Default)]
pub struct Limits {
    /// Set once the pack (or what directly precedes it) streams: the limit on computing no
    /// longer applies.
    pub streaming: AtomicBool,
    /// Set by the watchdog, before the interrupt flag, when a limit passed.
    pub timed_out: AtomicBool,
}

/// The `info/refs` answer for `version`, in pieces that share the snapshot's prebuilt bytes.
pub fn advertise(snapshot: &repo::Snapshot, version: Version) -> (Vec<bytes::Bytes>, Outcome) {
    let mut out = Vec::new();
    match version {
        Version::V2 => {
            advert::v2(&mut out);
            (vec![out.into()], Outcome::Capabilities)
        }
        Version::V0 | Version::V1 => {
            advert::v0_preamble(&mut out, version == Version::V1);
            (
                vec![out.into(), snapshot.advert_v0()],
                Outcome::Refs(snapshot.refs().refs.len()),
            )
        }
    }
}

/// The `info/refs` answer for `version` from `refs` alone, without a repository: for a
/// mirror being created, from the upstream's listing.
pub fn advertise_refs(refs: &Refs, version: Version) -> (Vec<u8>, Outcome) {
    let mut out = Vec::new();
    match version {
        Version::V2 => {
            advert::v2(&mut out);
            (out, Outcome::Capabilities)
        }
        Version::V0 | Version::V1 => {
            advert::v0(&mut out, refs, version == Version::V1);
            (out, Outcome::Refs(refs.refs.len()))
        }
    }
}

/// The answer to a v2 `ls-refs` command: cheap enough (a binary search and the matching refs)
/// to run without a blocking thread.
pub fn ls_refs(snapshot: &repo::Snapshot, args: &v2::LsRefs) -> (Vec<u8>, Outcome) {
    ls_refs_of(snapshot.refs(), args)
}

/// [`ls_refs`] from `refs` alone (see [`advertise_refs`]).
pub fn ls_refs_of(refs: &Refs, args: &v2::LsRefs) -> (Vec<u8>, Outcome) {
    let mut out = Vec::with_capacity(64 * 1024);
    advert::ls_refs(&mut out, refs, args);
    (out, Outcome::Refs(refs.refs.len()))
}

/// Serve `request`, writing the answer to `out`.
pub fn serve(ctx: &Context<'_>, request: &Request, out: impl Write) -> Result<Outcome, Error> {
    match request {
        Request::V0(req) => serve_v0(ctx, req, out),
        Request::V2(req) => serve_v2(ctx, req, out),
    }
}

/// Serve one v2 command, writing the answer to `out`.
fn serve_v2(ctx: &Context<'_>, req: &v2::Request, out: impl Write) -> Result<Outcome, Error> {
    respond(out, ctx, |out| match &req.command {
        v2::Command::LsRefs(args) => {
            let (buf, outcome) = ls_refs(ctx.snapshot, args);
            out.write_all(&buf)?;
            Ok(outcome)
        }
        v2::Command::Fetch(args) => fetch_v2(ctx, args, out),
    })
}

/// Run `serve`; if it fails, tell the client: with an `ERR` packet before the pack started, on
/// sideband 3 inside it (unless the failure was writing to the client).
fn respond<W: Write>(
    out: W,
    ctx: &Context<'_>,
    serve: impl FnOnce(&mut Response<W>) -> Result<Outcome, Error>,
) -> Result<Outcome, Error> {
    let mut out = Response {
        out,
        pack_started: ctx.preamble_sent,
        band_errors: ctx.preamble_sent,
    };
    let result = serve(&mut out);
    if let Err(e) = &result {
        let message = if ctx.limits.timed_out.load(Ordering::Relaxed) {
            "upload-pack: the request took too long and was stopped".to_owned()
        } else {
            e.client_message()
        };
        let mut buf = Vec::new();
        if !out.pack_started {
            pktline::err(&mut buf, &message);
        } else if out.band_errors && !matches!(e, Error::Io(_)) {
            pktline::band(&mut buf, 3, format!("{message}\n").as_bytes());
            pktline::flush(&mut buf);
        }
        // The client may be gone; the error is returned for logging either way.
        let _ = out.out.write_all(&buf).and_then(|_| out.out.flush());
    }
    result
}

/// The response stream, remembering how far it got.
struct Response<W> {
    out: W,
    /// Pack data (or what directly precedes it) was sent: no more `ERR` packets.
    pack_started: bool,
    /// The pack travels on a sideband, so errors can go on band 3.
    band_errors: bool,
}

impl<W: Write> Write for Response<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn fetch_v2<W: Write>(
    ctx: &Context<'_>,
    args: &v2::Fetch,
    out: &mut Response<W>,
) -> Result<Outcome, Error> {
    match resolve_v2(ctx, args)? {
        Step::Acks(lines, outcome) => {
            out.write_all(&lines)?;
            Ok(outcome)
        }
        Step::Pack(lines, pack_args) => send_pack(ctx, &pack_args, lines, true, out),
    }
}

/// Where a request stands after negotiation.
enum Step {
    /// Acknowledgements only: the lines to send, and what they acknowledged.
    Acks(Vec<u8>, Outcome),
    /// The lines to send before the pack (acknowledgements, shallow and wanted-refs sections),
    /// and the pack.
    Pack(Vec<u8>, Box<PackArgs>),
}

/// Negotiate a v2 fetch and resolve its shallow boundary and wanted refs.
fn resolve_v2(ctx: &Context<'_>, args: &v2::Fetch) -> Result<Step, Error> {
    for (i, want) in args.wants.iter().enumerate() {
        pack::check_interrupt(ctx.interrupt, i + 1)?;
        if !ctx.repo.has_object(want) {
            return Err(Error::NotOurRef(*want));
        }
    }
    let refs = ctx.snapshot.refs();
    let mut wants = args.wants.clone();
    let mut wanted_refs = Vec::new();
    for name in &args.want_refs {
        let r = ctx
            .snapshot
            .find_ref(name)
            .ok_or_else(|| Error::Protocol(format!("unknown ref {name}")))?;
        wanted_refs.push((r.target, name));
        wants.push(r.target);
    }
    if wants.is_empty() {
        // git answers nothing here; an error says what is wrong with the request.
        return Err(Error::Protocol(
            "fetch: expected at least one want or want-ref line".into(),
        ));
    }
    let bitmap = ctx.snapshot.bitmap();
    let mut neg =
        Negotiator::new(ctx.repo, ctx.db, &wants, ctx.interrupt).with_bitmap(bitmap.as_ref());
    for (i, have) in args.haves.iter().enumerate() {
        pack::check_interrupt(ctx.interrupt, i + 1)?;
        neg.have(*have)?;
    }
    let mut lines = Vec::new();
    if !args.done && args.seen_haves {
        // Acknowledge every have that was new to us; `ready` when we can stop.
        pktline::text(&mut lines, "acknowledgments");
        if neg.common().is_empty() {
            pktline::text(&mut lines, "NAK");
        }
        for id in neg.common() {
            pktline::text(&mut lines, &format!("ACK {id}"));
        }
        if !neg.ok_to_give_up()? {
            pktline::flush(&mut lines);
            let common = neg.common().len();
            return Ok(Step::Acks(lines, Outcome::Acks { common }));
        }
        pktline::text(&mut lines, "ready");
        pktline::delim(&mut lines);
    }
    let common = neg.common().to_vec();
    drop(neg);
    // Section order per gitprotocol-v2 (and git's fetch-pack): shallow-info, wanted-refs.
    let shallow = if args.deepen.is_active() {
        let shallow = shallow::compute(ctx.db, refs, &wants, &args.deepen, ctx.interrupt)?;
        pktline::text(&mut lines, "shallow-info");
        write_shallow_lines(&mut lines, &shallow);
        pktline::delim(&mut lines);
        shallow
    } else {
        Shallow::default()
    };
    if !wanted_refs.is_empty() {
        pktline::text(&mut lines, "wanted-refs");
        for (id, name) in &wanted_refs {
            pktline::text(&mut lines, &format!("{id} {name}"));
        }
        pktline::delim(&mut lines);
    }
    let pack_args = PackArgs {
        wants,
        common,
        shallow,
        filter: args.filter.clone(),
        tags: include_tag_candidates(args.include_tag, refs),
        ofs_delta: args.ofs_delta,
        thin: args.thin_pack,
        progress: !args.no_progress,
        sideband: Some(LARGE_BAND_PAYLOAD),
    };
    Ok(Step::Pack(lines, Box::new(pack_args)))
}

/// What [`prefill_v2`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// The pack was generated into the cache.
    Generated {
        /// Objects in the pack.
        objects: usize,
    },
    /// The cache has it already, or a generation of it is under way.
    Present,
    /// The cache takes no new pack now (low on disk space, or a write failed lately).
    NoRoom,
}

/// Put the pack that the v2 fetch `args` is answered with into the pack cache (`ctx.cache`;
/// without one, [`Prefill::NoRoom`]), under the key that request looks up, generating it on
/// this thread: the client that sends the request later is served a cache hit. `args` must
/// need no negotiation (`done`, or no `have`).
pub fn prefill_v2(ctx: &Context<'_>, args: &v2::Fetch) -> Result<Prefill, Error> {
    let Some((cache, mirror)) = ctx.cache else {
        return Ok(Prefill::NoRoom);
    };
    let pack_args = match resolve_v2(ctx, args)? {
        Step::Pack(_, pack_args) => pack_args,
        Step::Acks(..) => {
            return Err(Error::Protocol(
                "prefill: the request needs negotiation".into(),
            ))
        }
    };
    let (wants, common) = pack_args.ends();
    let generation = match cache.prefill(pack_args.cache_key(ctx, mirror, &wants, &common)) {
        pack::cache::Prefill::Present => return Ok(Prefill::Present),
        pack::cache::Prefill::NoRoom => return Ok(Prefill::NoRoom),
        pack::cache::Prefill::Generate(generation) => generation,
    };
    let bitmap = ctx.snapshot.bitmap();
    let selection = pack_args.selection(&wants, &common, bitmap.as_ref());
    let reuse = pack_args.reusable(ctx, &wants, &common).cloned();
    let opts = pack_args.write_options(ctx);
    let objects = fill(ctx.db, &selection, reuse.as_ref(), opts, generation)?;
    Ok(Prefill::Generated { objects })
}

/// `shallow <oid>` and `unshallow <oid>` lines, without a trailing newline as git writes them:
/// libgit2 rejects these lines with one ("invalid packet line").
fn write_shallow_lines(out: &mut Vec<u8>, shallow: &Shallow) {
    for id in &shallow.shallow {
        pktline::data(out, format!("shallow {id}").as_bytes());
    }
    for id in &shallow.unshallow {
        pktline::data(out, format!("unshallow {id}").as_bytes());
    }
}

/// `(tag, peeled)` for every annotated tag under `refs/tags/`, when `include-tag` was asked.
fn include_tag_candidates(include_tag: bool, refs: &Refs) -> Vec<(ObjectId, ObjectId)> {
    if !include_tag {
        return Vec::new();
    }
    refs.refs
        .iter()
        .filter(|r| r.name.starts_with(b"refs/tags/"))
        .filter_map(|r| r.peeled.map(|p| (r.target, p)))
        .collect()
}

/// What precedes the pack data of a v2 fetch that needs no acknowledgements and no shallow or
/// wanted-refs section — its `packfile` line — so that a caller may send it, and progress on
/// band 2, before the objects are there (a mirror syncing). `None` for any other fetch, and
/// when the client asked for no progress. Serve the request with
/// [`Context::preamble_sent`] then.
fn early_preamble_v2(f: &v2::Fetch) -> Option<Vec<u8>> {
    let eligible = (f.done || !f.seen_haves)
        && !f.no_progress
        && !f.deepen.is_active()
        && f.want_refs.is_empty();
    eligible.then(|| {
        let mut out = Vec::new();
        pktline::text(&mut out, "packfile");
        out
    })
}

/// Like [`early_preamble_v2`] for v0/v1: a final round without haves or shallow lines on a
/// sideband starts with `NAK`, then the pack.
fn early_preamble_v0(r: &v0::Request) -> Option<Vec<u8>> {
    let eligible = r.done
        && r.haves.is_empty()
        && !r.caps.no_progress
        && !r.deepen.is_active()
        && r.caps.sideband != v0::Sideband::None;
    eligible.then(|| {
        let mut out = Vec::new();
        pktline::text(&mut out, "NAK");
        out
    })
}

/// Serve one stateless v0/v1 request, writing the answer to `out`.
fn serve_v0(ctx: &Context<'_>, req: &v0::Request, out: impl Write) -> Result<Outcome, Error> {
    respond(out, ctx, |out| fetch_v0(ctx, req, out))
}

fn fetch_v0<W: Write>(
    ctx: &Context<'_>,
    req: &v0::Request,
    out: &mut Response<W>,
) -> Result<Outcome, Error> {
    let refs = ctx.snapshot.refs();
    check_reachable_wants(ctx, &req.wants)?;
    let caps = &req.caps;
    let mut lines = Vec::new();
    // Over stateless HTTP every round repeats the shallow request, and git's fetch-pack
    // expects the shallow list again before the acknowledgements of each round.
    let shallow = if req.deepen.is_active() {
        shallow::compute(ctx.db, refs, &req.wants, &req.deepen, ctx.interrupt)?
    } else {
        Shallow::default()
    };
    if req.deepen.deepens() {
        write_shallow_lines(&mut lines, &shallow);
        pktline::flush(&mut lines);
    }
    if req.wants_only {
        out.write_all(&lines)?;
        return Ok(Outcome::Acks { common: 0 });
    }
    let bitmap = ctx.snapshot.bitmap();
    let mut neg =
        Negotiator::new(ctx.repo, ctx.db, &req.wants, ctx.interrupt).with_bitmap(bitmap.as_ref());
    let (mut got_common, mut got_other, mut sent_ready) = (false, false, false);
    let mut last = None;
    // This follows git's get_common_commits() for one stateless round.
    for (i, have) in req.haves.iter().enumerate() {
        pack::check_interrupt(ctx.interrupt, i + 1)?;
        match neg.have(*have)? {
            Have::Missing => {
                got_other = true;
                if caps.multi_ack != MultiAck::None && neg.ok_to_give_up()? {
                    if caps.multi_ack == MultiAck::Detailed {
                        sent_ready = true;
                        pktline::text(&mut lines, &format!("ACK {have} ready"));
                    } else {
                        pktline::text(&mut lines, &format!("ACK {have} continue"));
                    }
                }
            }
            Have::Common { .. } => {
                got_common = true;
                last = Some(*have);
                match caps.multi_ack {
                    MultiAck::Detailed => pktline::text(&mut lines, &format!("ACK {have} common")),
                    MultiAck::Basic => pktline::text(&mut lines, &format!("ACK {have} continue")),
                    MultiAck::None if neg.common().len() == 1 => {
                        pktline::text(&mut lines, &format!("ACK {have}"))
                    }
                    MultiAck::None => {}
                }
            }
        }
    }
    if req.done {
        match last.filter(|_| !neg.common().is_empty()) {
            Some(last) if caps.multi_ack != MultiAck::None => {
                pktline::text(&mut lines, &format!("ACK {last}"))
            }
            Some(_) => {}
            None => pktline::text(&mut lines, "NAK"),
        }
    } else {
        if caps.multi_ack == MultiAck::Detailed
            && got_common
            && !got_other
            && neg.ok_to_give_up()?
        {
            sent_ready = true;
            if let Some(last) = last {
                pktline::text(&mut lines, &format!("ACK {last} ready"));
            }
        }
        if neg.common().is_empty() || caps.multi_ack != MultiAck::None {
            pktline::text(&mut lines, "NAK");
        }
        match last.filter(|_| caps.no_done && sent_ready) {
            Some(last) => pktline::text(&mut lines, &format!("ACK {last}")),
            None => {
                out.write_all(&lines)?;
                return Ok(Outcome::Acks {
                    common: neg.common().len(),
                });
            }
        }
    }
    let pack_args = PackArgs {
        wants: req.wants.clone(),
        common: neg.common().to_vec(),
        shallow,
        filter: req.filter.clone(),
        tags: include_tag_candidates(caps.include_tag, refs),
        ofs_delta: caps.ofs_delta,
        thin: caps.thin_pack,
        progress: !caps.no_progress,
        sideband: match caps.sideband {
            v0::Sideband::None => None,
            v0::Sideband::Small => Some(SMALL_BAND_PAYLOAD),
            v0::Sideband::Large => Some(LARGE_BAND_PAYLOAD),
        },
    };
    send_pack(ctx, &pack_args, lines, false, out)
}

/// In v0, a want must be reachable from an advertised ref (`allow-reachable-sha1-in-want`).
/// Commits are checked with a walk that hides every ref; other objects (rare: lazy fetches of
/// a partial clone forced to protocol v0) against the objects of all refs.
fn check_reachable_wants(ctx: &Context<'_>, wants: &[ObjectId]) -> Result<(), Error> {
    let snapshot = ctx.snapshot;
    let db = ctx.db;
    if wants.iter().all(|w| snapshot.is_tip(w)) {
        return Ok(());
    }
    // The bitmap answers for every kind of object, without walking every ref.
    if let Some(reachable) = snapshot.reachable(db, ctx.interrupt)? {
        return match wants.iter().find(|w| !reachable.contains(w)) {
            Some(id) => Err(Error::NotOurRef(*id)),
            None => Ok(()),
        };
    }
    let mut commits = pack::walk::Commits::new(db, Default::default());
    let (mut commit_wants, mut other_wants) = (Vec::new(), Vec::new());
    for (i, want) in wants.iter().filter(|w| !snapshot.is_tip(w)).enumerate() {
        pack::check_interrupt(ctx.interrupt, i + 1)?;
        match ctx.repo.find_header(*want).map(|h| h.kind()) {
            Ok(gix::object::Kind::Commit) => commit_wants.push(*want),
            Ok(_) => other_wants.push(*want),
            Err(_) => return Err(Error::NotOurRef(*want)),
        }
    }
    let tips: Vec<ObjectId> = snapshot.tips().copied().collect();
    if !commit_wants.is_empty() {
        let mut hidden = Vec::new();
        for tip in &tips {
            hidden.extend(commits.peel_to_commit(*tip)?);
        }
        let walked = pack::walk::walk(&mut commits, &commit_wants, &hidden, None, ctx.interrupt)?;
        let wanted: gix::hashtable::HashSet<ObjectId> = commit_wants.iter().copied().collect();
        if let Some(id) = walked.commits.iter().find(|c| wanted.contains(*c)) {
            return Err(Error::NotOurRef(*id));
        }
    }
    if !other_wants.is_empty() {
        let all = pack::plan(
            db,
            &pack::Selection {
                wants: &tips,
                ..Default::default()
            },
            ctx.interrupt,
        )?;
        let reachable: gix::hashtable::HashSet<ObjectId> =
            all.counts.iter().map(|c| c.id).collect();
        if let Some(id) = other_wants.iter().find(|w| !reachable.contains(*w)) {
            return Err(Error::NotOurRef(*id));
        }
    }
    Ok(())
}

/// What a pack is made of, once negotiation and the shallow boundary are resolved.
struct PackArgs {
    wants: Vec<ObjectId>,
    common: Vec<ObjectId>,
    shallow: Shallow,
    filter: Option<Filter>,
    /// `include-tag` candidates.
    tags: Vec<(ObjectId, ObjectId)>,
    ofs_delta: bool,
    /// `thin-pack`: deltas against objects the client has may go out as ref-deltas.
    thin: bool,
    progress: bool,
    /// Payload size of sideband packets; `None` for a raw pack.
    sideband: Option<usize>,
}

impl PackArgs {
    /// What the pack starts from and stops at: the wants and the common haves, with what the
    /// shallow boundary adds to each.
    fn ends(&self) -> (Vec<ObjectId>, Vec<ObjectId>) {
        let wants = self
            .wants
            .iter()
            .chain(&self.shallow.extra_wants)
            .copied()
            .collect();
        let common = self
            .common
            .iter()
            .chain(&self.shallow.extra_haves)
            .copied()
            .collect();
        (wants, common)
    }

    fn selection<'a>(
        &'a self,
        wants: &'a [ObjectId],
        common: &'a [ObjectId],
        bitmap: Option<&'a std::sync::Arc<pack::bitmap::Index>>,
    ) -> pack::Selection<'a> {
        pack::Selection {
            wants,
            common,
            tags: &self.tags,
            shallow: &self.shallow.grafts,
            filter: self.filter.as_ref(),
            thin: self.thin,
            bitmap,
        }
    }

    fn write_options(&self, ctx: &Context<'_>) -> pack::WriteOptions {
        pack::WriteOptions {
            ofs_delta: self.ofs_delta,
            thread_limit: ctx.options.pack_threads,
            compression: ctx.options.compression,
        }
    }

    /// The pack cache's key for this pack of `mirror`.
    fn cache_key(
        &self,
        ctx: &Context<'_>,
        mirror: &str,
        wants: &[ObjectId],
        common: &[ObjectId],
    ) -> pack::cache::Key {
        let filter = self.filter.as_ref().map(|f| format!("{f:?}"));
        pack::cache::KeyParts {
            mirror,
            wants,
            common,
            shallow: &self.shallow.grafts,
            tags: &self.tags,
            filter: filter.as_deref(),
            ofs_delta: self.ofs_delta,
            thin: self.thin,
            compression: ctx.options.compression.level(),
        }
        .key()
    }

    /// The consolidated pack's first region, when it is exactly this pack.
    fn reusable<'c>(
        &self,
        ctx: &'c Context<'_>,
        wants: &[ObjectId],
        common: &[ObjectId],
    ) -> Option<&'c (pack::reuse::Region, std::path::PathBuf)> {
        ctx.snapshot.clone_region().filter(|(region, path)| {
            self.ofs_delta
                && common.is_empty()
                && self.shallow.grafts.is_empty()
                && self.filter.is_none()
                && pack::reuse::tips_digest(wants) == region.tips
                // A snapshot older than the last maintenance names a pack that is gone: plan.
                && path.is_file()
        })
    }
}

/// Plan the pack, then write `preamble` (acknowledgements), the `packfile` section header in
/// v2, and the pack. Planning happens before anything is written so that a failure can still
/// be reported as an `ERR` packet.
fn send_pack<W: Write>(
    ctx: &Context<'_>,
    args: &PackArgs,
    preamble: Vec<u8>,
    v2: bool,
    out: &mut Response<W>,
) -> Result<Outcome, Error> {
    let (wants, common) = args.ends();
    let bitmap = ctx.snapshot.bitmap();
    let selection = args.selection(&wants, &common, bitmap.as_ref());
    let opts = args.write_options(ctx);
    let reuse = args.reusable(ctx, &wants, &common);
    if let Some((cache, mirror)) = ctx.cache {
        let key = args.cache_key(ctx, mirror, &wants, &common);
        let reader = match cache.lookup(key) {
            pack::cache::Lookup::Hit(reader) => Some((reader, "hit")),
            pack::cache::Lookup::Shared(reader) => Some((reader, "shared")),
            pack::cache::Lookup::Miss(generation, reader) => {
                generate(ctx, &selection, reuse.cloned(), opts, generation);
                Some((reader, "miss"))
            }
            pack::cache::Lookup::Bypass => None,
        };
        if let Some((reader, how)) = reader {
            // Reading a file needs no generation slot.
            drop(ctx.pack_slot.take());
            return send_cached(ctx, args, preamble, v2, out, reader, how);
        }
    }
    if let Some((region, path)) = reuse {
        match std::fs::File::open(path) {
            Ok(file) => {
                // A file read: no generation slot needed.
                drop(ctx.pack_slot.take());
                return send_reused(ctx, args, preamble, v2, out, region, file);
            }
            Err(e) => tracing::debug!(error = %e, "reusable pack gone: planning instead"),
        }
    }
    let started = std::time::Instant::now();
    let plan = match pack::plan(ctx.db, &selection, ctx.interrupt) {
        Ok(plan) => plan,
        Err(e) => return fail_before_pack(ctx, args, &preamble, v2, out, e),
    };
    begin_pack(ctx, args, preamble, v2, out)?;
    let stats = plan.stats;
    let mut sb = Sideband::new(out, args.sideband);
    if args.progress {
        sb.progress(&format!(
            "Enumerating objects: {}, done.\nCounting objects: {} ({} commits, {} trees, {} blobs, {} tags), done.\n",
            stats.total(),
            stats.total(),
            stats.commits,
            stats.trees,
            stats.blobs,
            stats.tags
        ))?;
    }
    let planned = started.elapsed();
    // On failure `respond` tells the client why the pack ends here.
    let written = pack::write(ctx.db.clone(), plan, &mut sb, opts, ctx.interrupt)?;
    if args.progress {
        sb.progress(&format!(
            "Total {} (delta {}), reused {} (delta {}), pack-reused 0\n",
            written.objects, written.deltas, written.deltas, written.deltas
        ))?;
    }
    sb.finish()?;
    tracing::debug!(?planned, written = ?started.elapsed() - planned, objects = written.objects, thin_deltas = written.thin_deltas, "pack sent");
    Ok(Outcome::Pack {
        objects: written.objects,
        bytes: written.bytes,
    })
}

/// The pack could not be made: send the acknowledgements first, so that the error is read
/// where git expects it. After the final ACK/NAK of v0 the client reads the pack, so the error
/// goes on band 3 there; `respond` writes it.
fn fail_before_pack<W: Write>(
    ctx: &Context<'_>,
    args: &PackArgs,
    preamble: &[u8],
    v2: bool,
    out: &mut Response<W>,
    error: pack::Error,
) -> Result<Outcome, Error> {
    if !ctx.preamble_sent {
        out.write_all(preamble)?;
        if !v2 {
            out.pack_started = true;
            out.band_errors = args.sideband.is_some();
        }
    }
    Err(error.into())
}

/// Write `preamble` (unless the caller sent it) and, in v2, the `packfile` line: from here on
/// the pack follows, and errors go on band 3.
fn begin_pack<W: Write>(
    ctx: &Context<'_>,
    args: &PackArgs,
    mut preamble: Vec<u8>,
    v2: bool,
    out: &mut Response<W>,
) -> io::Result<()> {
    if !ctx.preamble_sent {
        if v2 {
            pktline::text(&mut preamble, "packfile");
        }
        out.write_all(&preamble)?;
    }
    ctx.limits.streaming.store(true, Ordering::Relaxed);
    out.pack_started = true;
    out.band_errors = args.sideband.is_some();
    Ok(())
}

/// Send the pack `reader` reads from the cache (`how`: hit, shared or miss, for progress).
/// It waits for the generation to have planned, so that a failure to plan is still reported
/// before the pack, as [`send_pack`] does.
fn send_cached<W: Write>(
    ctx: &Context<'_>,
    args: &PackArgs,
    preamble: Vec<u8>,
    v2: bool,
    out: &mut Response<W>,
    mut reader: pack::cache::Reader,
    how: &str,
) -> Result<Outcome, Error> {
    let objects = match reader.start(ctx.interrupt) {
        Ok(objects) => objects,
        Err(e) => return fail_before_pack(ctx, args, &preamble, v2, out, e),
    };
    begin_pack(ctx, args, preamble, v2, out)?;
    let mut sb = Sideband::new(out, args.sideband);
    if args.progress {
        sb.progress(&format!("Enumerating objects: {objects}, done.\n"))?;
    }
    let mut buf = vec![0u8; CACHED_READ_BYTES];
    let mut bytes = 0;
    loop {
        let n = reader.read(&mut buf, ctx.interrupt)?;
        if n == 0 {
            break;
        }
        sb.write_all(&buf[..n])?;
        bytes += n as u64;
    }
    if args.progress {
        sb.progress(&format!("Total {objects} (pack cache {how})\n"))?;
    }
    sb.finish()?;
    Ok(Outcome::Pack {
        objects: objects as usize,
        bytes,
    })
}

/// Send the first region of the consolidated pack (see [`pack::reuse`]).
fn send_reused<W: Write>(
    ctx: &Context<'_>,
    args: &PackArgs,
    preamble: Vec<u8>,
    v2: bool,
    out: &mut Response<W>,
    region: &pack::reuse::Region,
    file: std::fs::File,
) -> Result<Outcome, Error> {
    begin_pack(ctx, args, preamble, v2, out)?;
    let mut sb = Sideband::new(out, args.sideband);
    if args.progress {
        sb.progress(&format!("Enumerating objects: {}, done.\n", region.objects))?;
    }
    let bytes = match pack::reuse::stream(region, file, &mut sb, ctx.interrupt) {
        Ok(bytes) => bytes,
        Err(pack::reuse::Error::Client(e)) => return Err(Error::Io(e)),
        Err(pack::reuse::Error::Pack(e)) => return Err(Error::Pack(e)),
    };
    if args.progress {
        sb.progress(&format!(
            "Total {0} (delta 0), reused {0} (delta 0), pack-reused {0}\n",
            region.objects
        ))?;
    }
    sb.finish()?;
    Ok(Outcome::Pack {
        objects: region.objects as usize,
        bytes,
    })
}

/// How much of a cached pack is read at a time (a few sideband packets).
const CACHED_READ_BYTES: usize = 256 * 1024;

/// Plan and write the pack of `selection` into `generation` on a thread of its own, which
/// takes over this request's generation slot: the request only follows the file from now on,
/// like any other request for the same pack. With `reuse`, the pack is that region instead,
/// copied: cache hits then need no trailer hashing.
fn generate(
    ctx: &Context<'_>,
    selection: &pack::Selection<'_>,
    reuse: Option<(pack::reuse::Region, std::path::PathBuf)>,
    opts: pack::WriteOptions,
    generation: pack::cache::Generation,
) {
    let slot = ctx.pack_slot.take();
    let db = ctx.db.clone();
    let wants = selection.wants.to_vec();
    let common = selection.common.to_vec();
    let tags = selection.tags.to_vec();
    let shallow = selection.shallow.to_vec();
    let filter = selection.filter.cloned();
    let thin = selection.thin;
    let bitmap = selection.bitmap.cloned();
    let span = tracing::Span::current();
    let run = move || {
        let _slot = slot;
        let _entered = span.enter();
        let selection = pack::Selection {
            wants: &wants,
            common: &common,
            tags: &tags,
            shallow: &shallow,
            filter: filter.as_ref(),
            thin,
            bitmap: bitmap.as_ref(),
        };
        // Its readers get the error; nothing more to do with it here.
        let _ = fill(&db, &selection, reuse.as_ref(), opts, generation);
    };
    if let Err(e) = std::thread::Builder::new()
        .name("pack-generation".into())
        .spawn(run)
    {
        tracing::error!(error = %e, "cannot start a pack generation thread");
    }
}

/// Plan and write the pack of `selection` into `generation` on this thread, or with `reuse`
/// copy that region instead; then finish the generation (or fail it, which its readers see).
/// Returns the number of objects.
fn fill(
    db: &pack::Db,
    selection: &pack::Selection<'_>,
    reuse: Option<&(pack::reuse::Region, std::path::PathBuf)>,
    opts: pack::WriteOptions,
    mut generation: pack::cache::Generation,
) -> Result<usize, pack::Error> {
    let interrupt = generation.abandoned();
    let started = std::time::Instant::now();
    let result = match reuse {
        Some((region, path)) => std::fs::File::open(path)
            .map_err(pack::Error::file(format!("reusing {}", region.pack)))
            .and_then(|file| {
                match pack::reuse::stream(region, file, &mut generation, &interrupt) {
                    Ok(_) => Ok(region.objects as usize),
                    Err(pack::reuse::Error::Pack(e)) => Err(e),
                    Err(pack::reuse::Error::Client(e)) => {
                        Err(pack::Error::file("pack cache: writing a pack")(e))
                    }
                }
            }),
        None => pack::plan(db, selection, &interrupt).and_then(|plan| {
            pack::write(db.clone(), plan, &mut generation, opts, &interrupt)
                .map(|stats| stats.objects)
        }),
    };
    match result {
        Ok(objects) => {
            let len = generation.finish().inspect_err(|e| {
                tracing::warn!(error = %crate::error_chain(e), "pack cache: finishing failed");
            })?;
            tracing::debug!(objects, bytes = len, duration = ?started.elapsed(), "pack cached");
            Ok(objects)
        }
        Err(e) => {
            tracing::debug!(error = %crate::error_chain(&e), "shared pack generation failed");
            let e = std::sync::Arc::new(e);
            generation.fail(std::sync::Arc::clone(&e));
            Err(pack::Error::Shared(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_version_from_header() {
        assert_eq!(Version::from_header(None), Version::V0);
        assert_eq!(Version::from_header(Some("version=2")), Version::V2);
        assert_eq!(Version::from_header(Some("version=1")), Version::V1);
        assert_eq!(Version::from_header(Some("foo=bar:version=2")), Version::V2);
        assert_eq!(Version::from_header(Some("version=3")), Version::V0);
    }
}
