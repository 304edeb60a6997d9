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
mod response;
mod shallow;
mod sideband;
mod v0;
mod v2;

use std::io::{self, Write};
use std::sync::atomic::AtomicBool;

use gix::ObjectId;

pub use negotiate::{Have, Negotiator};
pub use shallow::Shallow;
pub use sideband::{error_packets, progress_packets, Sideband};

pub use v2::{prefill_v2, Prefill};

use crate::pack;
use crate::protocol::advert::{self, Refs};
use crate::protocol::filter::Filter;
use crate::protocol::{self, pktline, LARGE_BAND_PAYLOAD, SMALL_BAND_PAYLOAD};
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
    V0(protocol::v0::Request),
    /// A v2 command (`ls-refs` or `fetch`).
    V2(protocol::v2::Request),
}

impl Request {
    /// Parse a request body sent with `version`; `None` when it holds no request (a flush
    /// only: git's probe before a large body).
    pub fn parse(version: Version, body: &[u8]) -> Result<Option<Request>, crate::protocol::Error> {
        match version {
            Version::V2 => protocol::v2::parse(body).map(|r| r.map(Request::V2)),
            Version::V0 | Version::V1 => protocol::v0::parse(body).map(|r| r.map(Request::V0)),
        }
    }

    /// The command, for logs and metrics: `upload-pack` (v0/v1), `ls-refs` or `fetch`.
    pub fn command(&self) -> &'static str {
        match self {
            Request::V0(_) => "upload-pack",
            Request::V2(r) => match r.command {
                protocol::v2::Command::LsRefs(_) => "ls-refs",
                protocol::v2::Command::Fetch(_) => "fetch",
            },
        }
    }

    /// The arguments of a v2 `ls-refs`, which is answered from the snapshot alone.
    pub fn ls_refs(&self) -> Option<&protocol::v2::LsRefs> {
        match self {
            Request::V2(protocol::v2::Request {
                command: protocol::v2::Command::LsRefs(args),
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
                protocol::v2::Command::Fetch(f) => v2::early_preamble(f),
                protocol::v2::Command::LsRefs(_) => None,
            },
            Request::V0(r) => v0::early_preamble(r),
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
        let (Request::V2(r), Request::V2(protocol::v2::Request { command, .. })) =
            (self, &mut resolved)
        else {
            return Some((preamble, Some(resolved)));
        };
        let (protocol::v2::Command::Fetch(f), protocol::v2::Command::Fetch(fetch)) =
            (&r.command, command)
        else {
            return None;
        };
        let mut wanted = Vec::with_capacity(f.want_refs.len());
        for name in &f.want_refs {
            let found = refs.find(name)?;
            wanted.push((found.target, name));
            fetch.wants.push(found.target);
        }
        let mut preamble = Vec::new();
        v2::write_wanted_refs(&mut preamble, &wanted);
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
                protocol::v2::Command::Fetch(f) => Some(Request::V2(protocol::v2::Request {
                    command: protocol::v2::Command::Fetch(protocol::v2::Fetch {
                        want_refs: Vec::new(),
                        ..f.clone()
                    }),
                    agent: r.agent.clone(),
                })),
                protocol::v2::Command::LsRefs(_) => None,
            },
            Request::V0(r) => Some(Request::V0(protocol::v0::Request {
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
            Request::V2(protocol::v2::Request {
                command: protocol::v2::Command::Fetch(f),
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
                protocol::v2::Command::Fetch(f) => (&f.wants, &f.want_refs),
                protocol::v2::Command::LsRefs(_) => (&[], &[]),
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
pub fn ls_refs(snapshot: &repo::Snapshot, args: &protocol::v2::LsRefs) -> (Vec<u8>, Outcome) {
    ls_refs_of(snapshot.refs(), args)
}

/// [`ls_refs`] from `refs` alone (see [`advertise_refs`]).
pub fn ls_refs_of(refs: &Refs, args: &protocol::v2::LsRefs) -> (Vec<u8>, Outcome) {
    let mut out = Vec::with_capacity(64 * 1024);
    advert::ls_refs(&mut out, refs, args);
    (out, Outcome::Refs(refs.refs.len()))
}

/// Serve `request`, writing the answer to `out`.
pub fn serve(ctx: &Context<'_>, request: &Request, out: impl Write) -> Result<Outcome, Error> {
    match request {
        Request::V0(req) => v0::serve(ctx, req, out),
        Request::V2(req) => v2::serve(ctx, req, out),
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
