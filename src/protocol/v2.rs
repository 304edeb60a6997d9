//! Protocol v2 requests (gitprotocol-v2): `command=<name>`, capability lines, a delimiter, the
//! command's arguments and a flush.

use gix::bstr::BString;
use gix::ObjectId;

use super::filter::Filter;
use super::pktline::{Line, Reader};
use super::{lossy, parse_oid, Deepen, Error};

/// git ignores `ref-prefix` filtering when a client sends more prefixes than this (`TOO_MANY_PREFIXES`
/// in ls-refs.c); so do we.
pub const MAX_REF_PREFIXES: usize = 65536;

/// Arguments of `ls-refs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LsRefs {
    /// Show `symref-target:` for symbolic refs.
    pub symrefs: bool,
    /// Show `peeled:` for annotated tags.
    pub peel: bool,
    /// Show an unborn `HEAD` as `unborn HEAD symref-target:…`.
    pub unborn: bool,
    /// Only refs starting with one of these; empty means all.
    pub prefixes: Vec<BString>,
}

/// Arguments of `fetch`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fetch {
    /// Objects wanted, in request order.
    pub wants: Vec<ObjectId>,
    /// Objects the client has, in request order.
    pub haves: Vec<ObjectId>,
    /// Whether any `have` line was present.
    pub seen_haves: bool,
    /// `done`: skip acknowledgements and send the pack.
    pub done: bool,
    /// Deltas against objects the client has are allowed.
    pub thin_pack: bool,
    /// No band-2 progress.
    pub no_progress: bool,
    /// Send annotated tags pointing into the pack.
    pub include_tag: bool,
    /// Offset deltas are understood.
    pub ofs_delta: bool,
    /// `shallow`/`deepen*` lines.
    pub deepen: Deepen,
    /// `filter <spec>`.
    pub filter: Option<Filter>,
    /// `want-ref <ref>`: refs whose current value is wanted, answered in `wanted-refs`.
    pub want_refs: Vec<BString>,
}

/// A v2 command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `command=ls-refs`
    LsRefs(LsRefs),
    /// `command=fetch`
    Fetch(Fetch),
}

/// One v2 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The command and its arguments.
    pub command: Command,
    /// `agent=…` as sent by the client, for logs.
    pub agent: Option<String>,
}

/// Parse a v2 request body. `Ok(None)` for a body that is a lone flush (end of session).
pub fn parse(body: &[u8]) -> Result<Option<Request>, Error> {
    let mut reader = Reader::new(body);
    let first = match reader.read()? {
        None | Some(Line::Flush) => return Ok(None),
        Some(line) => line,
    };
    let command_name = first
        .text()
        .and_then(|t| t.strip_prefix(b"command="))
        .ok_or_else(|| Error::Protocol(format!("expected command=<name>, got {first:?}")))?
        .to_vec();
    // Capability lines up to the delimiter (or a flush when there are no arguments).
    let mut agent = None;
    let mut has_args = false;
    loop {
        match reader.read()? {
            Some(Line::Delim) => {
                has_args = true;
                break;
            }
            Some(Line::Flush) => break,
            None => {
                return Err(Error::Protocol(
                    "request ended before its flush packet".into(),
                ))
            }
            Some(Line::ResponseEnd) => {
                return Err(Error::Protocol("unexpected response-end packet".into()))
            }
            Some(line @ Line::Data(_)) => {
                let text = line.text().unwrap_or_default();
                if let Some(value) = text.strip_prefix(b"agent=") {
                    agent = Some(lossy(value));
                } else if let Some(value) = text.strip_prefix(b"object-format=") {
                    if value != b"sha1" {
                        return Err(Error::Protocol(format!(
                            "unsupported object format '{}'",
                            lossy(value)
                        )));
                    }
                }
                // `server-option=…` and capabilities we do not know are ignored, as git does.
            }
        }
    }
    let mut args = Vec::new();
    if has_args {
        loop {
            match reader.read()? {
                Some(Line::Flush) => break,
                None => return Err(Error::Protocol("expected flush after arguments".into())),
                Some(line @ Line::Data(_)) => args.push(line.text().unwrap_or_default()),
                Some(other) => {
                    return Err(Error::Protocol(format!(
                        "unexpected packet {other:?} in arguments"
                    )))
                }
            }
        }
    }
    let command = match command_name.as_slice() {
        b"ls-refs" => Command::LsRefs(parse_ls_refs(&args)?),
        b"fetch" => Command::Fetch(parse_fetch(&args)?),
        other => {
            return Err(Error::Protocol(format!(
                "invalid command '{}'",
                lossy(other)
            )))
        }
    };
    Ok(Some(Request { command, agent }))
}

fn parse_ls_refs(args: &[&[u8]]) -> Result<LsRefs, Error> {
    let mut out = LsRefs::default();
    for arg in args {
        match *arg {
            b"symrefs" => out.symrefs = true,
            b"peel" => out.peel = true,
            b"unborn" => out.unborn = true,
            other => match other.strip_prefix(b"ref-prefix ") {
                Some(prefix) => out.prefixes.push(prefix.into()),
                None => {
                    return Err(Error::Protocol(format!(
                        "unexpected line: '{}'",
                        lossy(other)
                    )))
                }
            },
        }
    }
    if out.prefixes.len() > MAX_REF_PREFIXES {
        out.prefixes.clear();
    }
    Ok(out)
}

fn parse_fetch(args: &[&[u8]]) -> Result<Fetch, Error> {
    let mut out = Fetch::default();
    for arg in args {
        match *arg {
            b"done" => out.done = true,
            b"thin-pack" => out.thin_pack = true,
            b"no-progress" => out.no_progress = true,
            b"include-tag" => out.include_tag = true,
            b"ofs-delta" => out.ofs_delta = true,
            other => {
                if let Some(rest) = other.strip_prefix(b"want ") {
                    out.wants.push(parse_oid(rest, other)?.0);
                } else if let Some(rest) = other.strip_prefix(b"have ") {
                    out.seen_haves = true;
                    out.haves.push(parse_oid(rest, other)?.0);
                } else if let Some(name) = other.strip_prefix(b"want-ref ") {
                    out.want_refs.push(name.into());
                } else if let Some(spec) = other.strip_prefix(b"filter ") {
                    if out.filter.is_some() {
                        return Err(Error::Protocol(
                            "multiple filter-specs cannot be combined".into(),
                        ));
                    }
                    let spec = std::str::from_utf8(spec)
                        .map_err(|_| Error::Protocol("invalid filter-spec".into()))?;
                    out.filter = Some(Filter::parse(spec)?);
                } else if out.deepen.parse_line(other)? {
                } else {
                    return Err(Error::Protocol(format!(
                        "unexpected line: '{}'",
                        lossy(other)
                    )));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pktline;

    const A: &str = "1111111111111111111111111111111111111111";

    fn request(command: &str, caps: &[&str], args: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        pktline::text(&mut out, &format!("command={command}"));
        for c in caps {
            pktline::text(&mut out, c);
        }
        pktline::delim(&mut out);
        for a in args {
            pktline::text(&mut out, a);
        }
        pktline::flush(&mut out);
        out
    }

    #[test]
    fn parses_ls_refs() {
        let body = request(
            "ls-refs",
            &["agent=git/2.47", "object-format=sha1"],
            &[
                "peel",
                "symrefs",
                "unborn",
                "ref-prefix HEAD",
                "ref-prefix refs/heads/",
            ],
        );
        let req = parse(&body).unwrap().unwrap();
        assert_eq!(req.agent.as_deref(), Some("git/2.47"));
        let Command::LsRefs(ls) = req.command else {
            panic!("not ls-refs")
        };
        assert!(ls.peel && ls.symrefs && ls.unborn);
        assert_eq!(
            ls.prefixes,
            vec![BString::from("HEAD"), BString::from("refs/heads/")]
        );
    }

    #[test]
    fn too_many_prefixes_means_no_filter() {
        let prefixes: Vec<String> = (0..=MAX_REF_PREFIXES)
            .map(|i| format!("ref-prefix refs/{i}"))
            .collect();
        let args: Vec<&str> = prefixes.iter().map(String::as_str).collect();
        let req = parse(&request("ls-refs", &[], &args)).unwrap().unwrap();
        let Command::LsRefs(ls) = req.command else {
            panic!("not ls-refs")
        };
        assert!(ls.prefixes.is_empty());
    }

    #[test]
    fn parses_fetch() {
        let body = request(
            "fetch",
            &[],
            &[
                &format!("want {A}"),
                &format!("have {A}"),
                "thin-pack",
                "ofs-delta",
                "no-progress",
                "include-tag",
                "done",
            ],
        );
        let Command::Fetch(f) = parse(&body).unwrap().unwrap().command else {
            panic!("not fetch")
        };
        assert_eq!(f.wants.len(), 1);
        assert_eq!(f.haves.len(), 1);
        assert!(
            f.seen_haves && f.done && f.thin_pack && f.ofs_delta && f.no_progress && f.include_tag
        );
    }

    #[test]
    fn parses_shallow_filter_and_want_ref() {
        let body = request(
            "fetch",
            &[],
            &[
                &format!("want {A}"),
                "want-ref refs/heads/main",
                &format!("shallow {A}"),
                "deepen 1",
                "deepen-relative",
                "filter combine:blob:none+tree:2",
                "done",
            ],
        );
        let Command::Fetch(f) = parse(&body).unwrap().unwrap().command else {
            panic!("not fetch")
        };
        assert_eq!(f.want_refs, vec![BString::from("refs/heads/main")]);
        assert_eq!(f.deepen.depth, Some(1));
        assert!(f.deepen.relative && f.deepen.deepens());
        assert_eq!(f.deepen.shallows.len(), 1);
        assert_eq!(
            f.filter,
            Some(Filter::Combine(vec![
                Filter::BlobNone,
                Filter::TreeDepth(2)
            ]))
        );
        let since = request(
            "fetch",
            &[],
            &[
                &format!("want {A}"),
                "deepen-since 1700000000",
                "deepen-not refs/tags/v1",
            ],
        );
        let Command::Fetch(f) = parse(&since).unwrap().unwrap().command else {
            panic!("not fetch")
        };
        assert_eq!(f.deepen.since, Some(1_700_000_000));
        assert_eq!(f.deepen.not, vec![BString::from("refs/tags/v1")]);
    }

    #[test]
    fn ls_refs_without_arguments() {
        let mut body = Vec::new();
        pktline::text(&mut body, "command=ls-refs");
        pktline::flush(&mut body);
        let req = parse(&body).unwrap().unwrap();
        assert_eq!(req.command, Command::LsRefs(LsRefs::default()));
    }

    #[test]
    fn rejects_what_it_does_not_know() {
        let e = parse(&request("push", &[], &[])).unwrap_err();
        assert_eq!(e.to_string(), "invalid command 'push'");
        let e = parse(&request("fetch", &[], &["deepen-everything"])).unwrap_err();
        assert_eq!(e.to_string(), "unexpected line: 'deepen-everything'");
        let e = parse(&request("fetch", &[], &["filter sparse:oid=abc"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "filter 'sparse:oid=abc' is not supported by this server"
        );
        let e = parse(&request("fetch", &["object-format=sha256"], &[])).unwrap_err();
        assert!(e.to_string().contains("sha256"));
        let e = parse(&request("fetch", &[], &["want nothex"])).unwrap_err();
        assert!(e.is_malformed());
        let mut truncated = request("fetch", &[], &[&format!("want {A}")]);
        truncated.truncate(truncated.len() - 4);
        assert!(parse(&truncated).is_err());
        assert_eq!(parse(b"0000").unwrap(), None);
    }
}
