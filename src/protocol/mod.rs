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
pub enum ParseError {
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
}

impl ParseError {
    /// Whether the fault is in the framing or syntax of the body (an HTTP 400) rather than a
    /// protocol violation git reports through an `ERR` packet.
    pub fn is_malformed(&self) -> bool {
        matches!(self, ParseError::Framing(_) | ParseError::InvalidOid { .. })
    }
}

/// Parse `<hex-oid>` at the start of `rest` (optionally followed by a space and more text).
pub(crate) fn parse_oid<'a>(
    rest: &'a [u8],
    line: &[u8],
) -> Result<(ObjectId, &'a [u8]), ParseError> {
    let (hex, tail) = match rest.iter().position(|b| *b == b' ') {
        Some(pos) => (&rest[..pos], &rest[pos + 1..]),
        None => (rest, &rest[rest.len()..]),
    };
    let invalid = || ParseError::InvalidOid {
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
