//! Protocol v0/v1 upload-pack requests as sent over stateless HTTP (gitprotocol-pack,
//! gitprotocol-http): every POST repeats the wants and all haves so far.

use gix::ObjectId;

use super::filter::Filter;
use super::pktline::{Line, Reader};
use super::{lossy, parse_oid, Deepen, Error};

/// How the client wants acknowledgements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MultiAck {
    /// One `ACK` at most, then the pack.
    #[default]
    None,
    /// `multi_ack`: `ACK <oid> continue`.
    Basic,
    /// `multi_ack_detailed`: `ACK <oid> common` and `ACK <oid> ready`.
    Detailed,
}

/// Which sideband, if any, carries the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sideband {
    /// Raw pack bytes, no progress.
    #[default]
    None,
    /// `side-band`: 1000-byte packets.
    Small,
    /// `side-band-64k`: 65520-byte packets.
    Large,
}

/// The capabilities a v0/v1 client requested on its first `want` line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Acknowledgement mode.
    pub multi_ack: MultiAck,
    /// `no-done`: send the pack right after `ACK <oid> ready`.
    pub no_done: bool,
    /// Pack transport.
    pub sideband: Sideband,
    /// `thin-pack`: deltas against objects the client has are allowed.
    pub thin_pack: bool,
    /// `ofs-delta`: offset deltas are understood.
    pub ofs_delta: bool,
    /// `no-progress`: no band-2 messages.
    pub no_progress: bool,
    /// `include-tag`: send annotated tags pointing into the pack.
    pub include_tag: bool,
    /// `filter`: the client may send a `filter` line.
    pub filter: bool,
    /// `deepen-relative`: `deepen <n>` counts from the client's shallow boundary.
    pub deepen_relative: bool,
    /// `agent=…` as sent by the client, for logs.
    pub agent: Option<String>,
}

/// One stateless v0/v1 upload-pack request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Objects the client wants, in request order.
    pub wants: Vec<ObjectId>,
    /// Capabilities from the first want line.
    pub caps: Capabilities,
    /// `shallow`/`deepen*` lines.
    pub deepen: Deepen,
    /// `filter <spec>`.
    pub filter: Option<Filter>,
    /// Objects the client says it has, in request order.
    pub haves: Vec<ObjectId>,
    /// Whether the request ended with `done` (otherwise it ended with a flush).
    pub done: bool,
    /// Whether the body ended right after the want section: a shallow client's first request,
    /// which only asks for the shallow list (git's upload-pack sees EOF and stops there).
    pub wants_only: bool,
}

/// Parse a request body. `Ok(None)` means the body holds no wants (git's probe request is a
/// lone flush), to which upload-pack answers nothing.
pub fn parse(body: &[u8]) -> Result<Option<Request>, Error> {
    let mut reader = Reader::new(body);
    let mut req = Request::default();
    // Want section, up to the first flush.
    loop {
        let line = match reader.read()? {
            None => break,
            Some(Line::Flush) => break,
            Some(Line::Data(d)) => d,
            Some(other) => {
                return Err(Error::Protocol(format!(
                    "unexpected packet {other:?} in want list"
                )))
            }
        };
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        if let Some(rest) = text.strip_prefix(b"want ") {
            let (id, tail) = parse_oid(rest, text)?;
            if req.wants.is_empty() {
                req.caps = parse_capabilities(tail);
            }
            req.wants.push(id);
        } else if text != b"deepen-relative" && req.deepen.parse_line(text)? {
            // `deepen-relative` is a capability in v0, not a line.
        } else if let Some(spec) = text.strip_prefix(b"filter ") {
            if !req.caps.filter {
                return Err(Error::Protocol(
                    "git upload-pack: filtering capability not negotiated".into(),
                ));
            }
            let spec = std::str::from_utf8(spec)
                .map_err(|_| Error::Protocol("invalid filter-spec".into()))?;
            req.filter = Some(Filter::parse(spec)?);
        } else {
            return Err(Error::Protocol(format!(
                "protocol error: expected want list, got '{}'",
                lossy(text)
            )));
        }
    }
    if req.wants.is_empty() {
        return Ok(None);
    }
    req.deepen.relative = req.caps.deepen_relative;
    // Have section: haves, then a flush (another round follows) or `done`.
    req.wants_only = reader.is_empty();
    loop {
        match reader.read()? {
            None | Some(Line::Flush) => break,
            Some(Line::Data(d)) => {
                let text = d.strip_suffix(b"\n").unwrap_or(d);
                if let Some(rest) = text.strip_prefix(b"have ") {
                    req.haves.push(parse_oid(rest, text)?.0);
                } else if text == b"done" {
                    req.done = true;
                    break;
                } else {
                    return Err(Error::Protocol(format!(
                        "git upload-pack: expected SHA1 list, got '{}'",
                        lossy(text)
                    )));
                }
            }
            Some(other) => {
                return Err(Error::Protocol(format!(
                    "unexpected packet {other:?} in have list"
                )))
            }
        }
    }
    Ok(Some(req))
}

fn parse_capabilities(list: &[u8]) -> Capabilities {
    let mut caps = Capabilities::default();
    let (mut small_band, mut large_band, mut basic, mut detailed) = (false, false, false, false);
    for cap in list.split(|b| *b == b' ').filter(|c| !c.is_empty()) {
        match cap {
            b"multi_ack" => basic = true,
            b"multi_ack_detailed" => detailed = true,
            b"no-done" => caps.no_done = true,
            b"side-band" => small_band = true,
            b"side-band-64k" => large_band = true,
            b"thin-pack" => caps.thin_pack = true,
            b"ofs-delta" => caps.ofs_delta = true,
            b"no-progress" => caps.no_progress = true,
            b"include-tag" => caps.include_tag = true,
            b"filter" => caps.filter = true,
            b"deepen-relative" => caps.deepen_relative = true,
            other => {
                if let Some(agent) = other.strip_prefix(b"agent=") {
                    caps.agent = Some(lossy(agent));
                }
            }
        }
    }
    caps.multi_ack = if detailed {
        MultiAck::Detailed
    } else if basic {
        MultiAck::Basic
    } else {
        MultiAck::None
    };
    caps.sideband = if large_band {
        Sideband::Large
    } else if small_band {
        Sideband::Small
    } else {
        Sideband::None
    };
    caps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pktline;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";

    fn body(lines: &[Option<&str>]) -> Vec<u8> {
        let mut out = Vec::new();
        for l in lines {
            match l {
                Some(l) => pktline::text(&mut out, l),
                None => pktline::flush(&mut out),
            }
        }
        out
    }

    #[test]
    fn parses_a_clone_request() {
        let b = body(&[
            Some(&format!(
                "want {A} multi_ack_detailed no-done side-band-64k thin-pack ofs-delta agent=git/2.47"
            )),
            Some(&format!("want {B}")),
            None,
            Some("done"),
        ]);
        let req = parse(&b).unwrap().unwrap();
        assert_eq!(req.wants.len(), 2);
        assert_eq!(req.caps.multi_ack, MultiAck::Detailed);
        assert_eq!(req.caps.sideband, Sideband::Large);
        assert!(req.caps.no_done && req.caps.thin_pack && req.caps.ofs_delta);
        assert!(!req.caps.include_tag && !req.caps.no_progress);
        assert_eq!(req.caps.agent.as_deref(), Some("git/2.47"));
        assert!(req.done && req.haves.is_empty() && !req.wants_only);
    }

    #[test]
    fn parses_a_negotiation_round() {
        let b = body(&[
            Some(&format!("want {A} multi_ack side-band")),
            None,
            Some(&format!("have {B}")),
            Some(&format!("have {A}")),
            None,
        ]);
        let req = parse(&b).unwrap().unwrap();
        assert_eq!(req.caps.multi_ack, MultiAck::Basic);
        assert_eq!(req.caps.sideband, Sideband::Small);
        assert_eq!(req.haves.len(), 2);
        assert!(!req.done);
    }

    #[test]
    fn parses_shallow_and_filter_lines() {
        let b = body(&[
            Some(&format!(
                "want {A} multi_ack_detailed side-band-64k filter deepen-relative"
            )),
            Some(&format!("shallow {B}")),
            Some("deepen 3"),
            Some("filter blob:limit=1k"),
            None,
            Some("done"),
        ]);
        let req = parse(&b).unwrap().unwrap();
        assert_eq!(req.deepen.shallows.len(), 1);
        assert_eq!(req.deepen.depth, Some(3));
        assert!(req.deepen.relative);
        assert_eq!(req.filter, Some(Filter::BlobLimit(1024)));
        let first = body(&[Some(&format!("want {A} shallow")), Some("deepen 1"), None]);
        assert!(parse(&first).unwrap().unwrap().wants_only);

        let no_cap = body(&[Some(&format!("want {A}")), Some("filter blob:none"), None]);
        assert!(parse(&no_cap)
            .unwrap_err()
            .to_string()
            .contains("filtering capability not negotiated"));
        let bad = body(&[
            Some(&format!("want {A} filter")),
            Some("filter blob:maybe"),
            None,
        ]);
        assert_eq!(
            parse(&bad).unwrap_err().to_string(),
            "invalid filter-spec 'blob:maybe'"
        );
        let both = body(&[
            Some(&format!("want {A}")),
            Some("deepen 1"),
            Some("deepen-since 1000"),
            None,
        ]);
        assert!(parse(&both)
            .unwrap_err()
            .to_string()
            .contains("cannot be used together"));
        let zero = body(&[Some(&format!("want {A}")), Some("deepen 0"), None]);
        assert_eq!(
            parse(&zero).unwrap_err().to_string(),
            "Invalid deepen: deepen 0"
        );
    }

    #[test]
    fn a_lone_flush_is_the_probe() {
        assert_eq!(parse(b"0000").unwrap(), None);
        assert_eq!(parse(b"").unwrap(), None);
    }

    #[test]
    fn bad_lines_are_rejected() {
        let e = parse(&body(&[Some("want 12345"), None])).unwrap_err();
        assert!(e.is_malformed(), "{e}");
        let e = parse(&body(&[Some("wnat 1"), None])).unwrap_err();
        assert!(!e.is_malformed());
        assert!(e.to_string().contains("expected want list"));
        let e = parse(&body(&[Some(&format!("want {A}")), None, Some("hve x")])).unwrap_err();
        assert!(e.to_string().contains("expected SHA1 list"));
        let e = parse(&body(&[Some(&format!("want {A}")), None, Some("have zz")])).unwrap_err();
        assert!(e.is_malformed());
        assert!(parse(b"0009want").unwrap_err().is_malformed());
    }
}
