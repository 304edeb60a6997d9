//! The Git wire protocol, as pure functions over byte slices: pkt-line framing, the ref and
//! capability advertisements, and parsers for v0/v1 and v2 upload-pack requests.
//!
//! Nothing here performs I/O or looks at a repository; `upload_pack` decides what to answer and
//! `http` moves the bytes.

pub mod advert;
pub mod filter;
pub mod pktline;
pub mod v0;
pub mod v2;

use gix::bstr::BString;
use gix::ObjectId;

/// The agent string we send, `smart-git-proxy/<version>`.
pub const AGENT: &str = concat!("smart-git-proxy/", env!("CARGO_PKG_VERSION"));

/// The largest pack payload of one `side-band-64k` packet: a full pkt-line minus the band byte.
pub const LARGE_BAND_PAYLOAD: usize = pktline::MAX_DATA_LEN - 1;
/// The largest pack payload of one plain `side-band` packet (1000-byte packets).
pub const SMALL_BAND_PAYLOAD: usize = 1000 - 4 - 1;

/// One advertised reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref {
    /// Full name, e.g. `refs/heads/main` or `HEAD`.
    pub name: BString,
    /// The object the ref points to (after following symbolic refs).
    pub target: ObjectId,
    /// For annotated tags, the object the tag chain finally points to.
    pub peeled: Option<ObjectId>,
    /// For symbolic refs, the full name of the ref they point to.
    pub symref_target: Option<BString>,
}

/// Why a request body could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body is not a valid pkt-line stream.
    #[error(transparent)]
    Framing(#[from] pktline::Error),
    /// A line that should carry an object id carries something else.
    #[error("invalid object id in '{line}'")]
    InvalidOid {
        /// The offending line.
        line: String,
    },
    /// A well-formed line that makes no sense at this point of the protocol.
    #[error("{0}")]
    Protocol(String),
    /// A `filter` line with a filter spec we cannot use.
    #[error(transparent)]
    Filter(#[from] filter::Error),
}

impl Error {
    /// Whether the fault is in the framing or syntax of the body (an HTTP 400) rather than a
    /// protocol violation git reports through an `ERR` packet.
    pub fn is_malformed(&self) -> bool {
        matches!(self, Error::Framing(_) | Error::InvalidOid { .. })
    }
}

/// `deepen 2147483647`: what `git fetch --unshallow` sends for "all history".
pub const INFINITE_DEPTH: u32 = 0x7fff_ffff;

/// The shallow-related lines of a fetch request, common to v0/v1 and v2.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deepen {
    /// `shallow <oid>`: the client's current shallow boundary.
    pub shallows: Vec<ObjectId>,
    /// `deepen <n>`: history depth from the wants (or, with `relative`, from the client's
    /// shallow boundary).
    pub depth: Option<u32>,
    /// `deepen-since <timestamp>`: only history newer than this.
    pub since: Option<i64>,
    /// `deepen-not <ref>`: no history reachable from these refs.
    pub not: Vec<BString>,
    /// `deepen-relative`: `depth` counts from the client's shallow boundary.
    pub relative: bool,
}

impl Deepen {
    /// Whether the request asks for a new shallow boundary (and so for a shallow list in the
    /// answer), as opposed to only telling the client's current one.
    pub fn deepens(&self) -> bool {
        self.depth.is_some() || self.since.is_some() || !self.not.is_empty()
    }

    /// Whether the request involves shallow history at all.
    pub fn is_active(&self) -> bool {
        self.deepens() || !self.shallows.is_empty()
    }

    /// Take `line` if it is one of the shallow lines; `Ok(false)` if it is not.
    pub(crate) fn parse_line(&mut self, line: &[u8]) -> Result<bool, Error> {
        if let Some(rest) = line.strip_prefix(b"shallow ") {
            self.shallows.push(parse_oid(rest, line)?.0);
        } else if let Some(rest) = line.strip_prefix(b"deepen ") {
            let depth = std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.parse::<u32>().ok())
                .filter(|d| *d > 0)
                .ok_or_else(|| Error::Protocol(format!("Invalid deepen: {}", lossy(line))))?;
            self.depth = Some(depth.min(INFINITE_DEPTH));
        } else if let Some(rest) = line.strip_prefix(b"deepen-since ") {
            let since = std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|t| *t > 0)
                .ok_or_else(|| Error::Protocol(format!("Invalid deepen-since: {}", lossy(line))))?;
            self.since = Some(since);
        } else if let Some(rest) = line.strip_prefix(b"deepen-not ") {
            self.not.push(rest.into());
        } else if line == b"deepen-relative" {
            self.relative = true;
        } else {
            return Ok(false);
        }
        if self.depth.is_some() && (self.since.is_some() || !self.not.is_empty()) {
            return Err(Error::Protocol(
                "--depth and --shallow-since (or --shallow-exclude) cannot be used together".into(),
            ));
        }
        Ok(true)
    }
}

/// Parse `<hex-oid>` at the start of `rest` (optionally followed by a space and more text).
pub(crate) fn parse_oid<'a>(rest: &'a [u8], line: &[u8]) -> Result<(ObjectId, &'a [u8]), Error> {
    let (hex, tail) = match rest.iter().position(|b| *b == b' ') {
        Some(pos) => (&rest[..pos], &rest[pos + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    let invalid = || Error::InvalidOid {
        line: String::from_utf8_lossy(line).into_owned(),
    };
    if hex.len() != 40 {
        return Err(invalid());
    }
    let id = ObjectId::from_hex(hex).map_err(|_| invalid())?;
    Ok((id, tail))
}

pub(crate) fn lossy(line: &[u8]) -> String {
    String::from_utf8_lossy(line).into_owned()
}
