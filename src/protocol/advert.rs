//! What the server says before the client asks: the v0/v1 ref advertisement, the v2 capability
//! advertisement, and the v2 `ls-refs` answer.

use gix::bstr::{BStr, ByteSlice};
use gix::ObjectId;

use super::v2::LsRefs;
use super::{pktline, Ref, AGENT};

/// Capabilities of the v0/v1 advertisement, in git's order. Advertise only what works.
const V0_CAPABILITIES: &str = "multi_ack thin-pack side-band side-band-64k ofs-delta shallow \
deepen-since deepen-not deepen-relative no-progress include-tag multi_ack_detailed \
allow-tip-sha1-in-want allow-reachable-sha1-in-want no-done filter";

/// The refs of a repository as the protocol layer sees them.
#[derive(Debug, Clone, Default)]
pub struct Refs {
    /// `HEAD` first when it resolves, then every other ref sorted by name.
    pub refs: Vec<Ref>,
    /// When `HEAD` is a symbolic ref to a branch that does not exist yet, that branch.
    pub unborn_head: Option<gix::bstr::BString>,
}

/// Append the v0 (or, with `version_1`, v1) ref advertisement for `git-upload-pack`, including
/// the `# service=` preamble smart HTTP requires.
pub fn v0(out: &mut Vec<u8>, refs: &Refs, version_1: bool) {
    v0_preamble(out, version_1);
    v0_refs(out, refs);
}

/// The start of the v0 (or v1) advertisement: the `# service=` preamble smart HTTP requires,
/// and v1's version line.
pub fn v0_preamble(out: &mut Vec<u8>, version_1: bool) {
    pktline::text(out, "# service=git-upload-pack");
    pktline::flush(out);
    if version_1 {
        pktline::text(out, "version 1");
    }
}

/// The rest of the v0/v1 advertisement: the refs with the capabilities, and the flush.
pub fn v0_refs(out: &mut Vec<u8>, refs: &Refs) {
    let mut caps = String::from(V0_CAPABILITIES);
    if let Some(target) = refs
        .refs
        .first()
        .filter(|r| r.name == "HEAD")
        .and_then(|r| r.symref_target.as_ref())
    {
        caps.push_str(" symref=HEAD:");
        caps.push_str(&target.to_str_lossy());
    }
    caps.push_str(" object-format=sha1 agent=");
    caps.push_str(AGENT);

    if refs.refs.is_empty() {
        let null = ObjectId::null(gix::hash::Kind::Sha1).to_string();
        pktline::data_parts(
            out,
            &[
                null.as_bytes(),
                b" capabilities^{}\0",
                caps.as_bytes(),
                b"\n",
            ],
        );
    }
    for (i, r) in refs.refs.iter().enumerate() {
        let hex = r.target.to_string();
        if i == 0 {
            pktline::data_parts(
                out,
                &[hex.as_bytes(), b" ", &r.name, b"\0", caps.as_bytes(), b"\n"],
            );
        } else {
            pktline::data_parts(out, &[hex.as_bytes(), b" ", &r.name, b"\n"]);
        }
        if let Some(peeled) = r.peeled {
            pktline::data_parts(
                out,
                &[peeled.to_string().as_bytes(), b" ", &r.name, b"^{}\n"],
            );
        }
    }
    pktline::flush(out);
}

/// Append the v2 capability advertisement.
pub fn v2(out: &mut Vec<u8>) {
    pktline::text(out, "version 2");
    pktline::text(out, &format!("agent={AGENT}"));
    pktline::text(out, "ls-refs=unborn");
    pktline::text(out, "fetch=shallow filter ref-in-want");
    pktline::text(out, "server-option");
    pktline::text(out, "object-format=sha1");
    pktline::flush(out);
}

/// The part of `refs` after `HEAD`, which is sorted by name.
pub fn sorted_part(refs: &[Ref]) -> &[Ref] {
    match refs.first() {
        Some(r) if r.name == "HEAD" => &refs[1..],
        _ => refs,
    }
}

impl Refs {
    /// The ref called `name` (`HEAD` included), found by binary search.
    pub fn find(&self, name: &[u8]) -> Option<&Ref> {
        if name == b"HEAD" {
            return self.refs.first().filter(|r| r.name == "HEAD");
        }
        let sorted = sorted_part(&self.refs);
        sorted
            .binary_search_by(|r| r.name.as_bytes().cmp(name))
            .ok()
            .map(|i| &sorted[i])
    }
}

/// Append the answer to a v2 `ls-refs` request. Prefixes select ranges of the sorted refs by
/// binary search, so the cost follows the answer, not the number of refs.
pub fn ls_refs(out: &mut Vec<u8>, refs: &Refs, args: &LsRefs) {
    let wanted =
        |name: &BStr| args.prefixes.is_empty() || args.prefixes.iter().any(|p| name.starts_with(p));
    if args.unborn && wanted("HEAD".into()) {
        if let Some(target) = &refs.unborn_head {
            let mut line = b"unborn HEAD".to_vec();
            if args.symrefs {
                line.extend_from_slice(b" symref-target:");
                line.extend_from_slice(target);
            }
            line.push(b'\n');
            pktline::data(out, &line);
        }
    }
    let sorted = sorted_part(&refs.refs);
    let head = &refs.refs[..refs.refs.len() - sorted.len()];
    let mut line = Vec::with_capacity(128);
    for r in head.iter().filter(|r| wanted(r.name.as_ref())) {
        ref_line(out, &mut line, r, args);
    }
    if args.prefixes.is_empty() {
        for r in sorted {
            ref_line(out, &mut line, r, args);
        }
    } else {
        let mut ranges: Vec<(usize, usize)> = args
            .prefixes
            .iter()
            .map(|p| {
                let start = sorted.partition_point(|r| r.name.as_slice() < p.as_slice());
                let len = sorted[start..].partition_point(|r| r.name.starts_with(p));
                (start, start + len)
            })
            .filter(|(start, end)| start < end)
            .collect();
        ranges.sort_unstable();
        let mut next = 0;
        for (start, end) in ranges {
            for r in &sorted[start.max(next)..end.max(next)] {
                ref_line(out, &mut line, r, args);
            }
            next = next.max(end);
        }
    }
    pktline::flush(out);
}

fn ref_line(out: &mut Vec<u8>, line: &mut Vec<u8>, r: &Ref, args: &LsRefs) {
    // Hex without a `String` per id: this loop is most of an `ls-refs` answer's cost.
    let mut hex = [0u8; 40];
    line.clear();
    line.extend_from_slice(r.target.hex_to_buf(&mut hex).as_bytes());
    line.push(b' ');
    line.extend_from_slice(&r.name);
    if args.symrefs {
        if let Some(target) = &r.symref_target {
            line.extend_from_slice(b" symref-target:");
            line.extend_from_slice(target);
        }
    }
    if args.peel {
        if let Some(peeled) = r.peeled {
            line.extend_from_slice(b" peeled:");
            line.extend_from_slice(peeled.hex_to_buf(&mut hex).as_bytes());
        }
    }
    line.push(b'\n');
    pktline::data(out, line);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::pktline::{Line, Reader};

    fn oid(c: char) -> ObjectId {
        ObjectId::from_hex(c.to_string().repeat(40).as_bytes()).unwrap()
    }

    fn sample() -> Refs {
        Refs {
            refs: vec![
                Ref {
                    name: "HEAD".into(),
                    target: oid('a'),
                    peeled: None,
                    symref_target: Some("refs/heads/main".into()),
                },
                Ref {
                    name: "refs/heads/main".into(),
                    target: oid('a'),
                    peeled: None,
                    symref_target: None,
                },
                Ref {
                    name: "refs/tags/v1".into(),
                    target: oid('b'),
                    peeled: Some(oid('a')),
                    symref_target: None,
                },
            ],
            unborn_head: None,
        }
    }

    fn lines(buf: &[u8]) -> Vec<String> {
        let mut r = Reader::new(buf);
        let mut out = Vec::new();
        while let Some(l) = r.read().unwrap() {
            out.push(match l {
                Line::Data(d) => String::from_utf8_lossy(d).into_owned(),
                other => format!("{other:?}"),
            });
        }
        out
    }

    #[test]
    fn v0_advertisement() {
        let mut out = Vec::new();
        v0(&mut out, &sample(), false);
        let l = lines(&out);
        assert_eq!(l[0], "# service=git-upload-pack\n");
        assert_eq!(l[1], "Flush");
        assert!(l[2].starts_with(&format!("{} HEAD\0multi_ack ", oid('a'))));
        assert!(l[2].contains(" symref=HEAD:refs/heads/main "));
        assert!(l[2].contains(" agent=smart-git-proxy/"));
        assert_eq!(l[3], format!("{} refs/heads/main\n", oid('a')));
        assert_eq!(l[4], format!("{} refs/tags/v1\n", oid('b')));
        assert_eq!(l[5], format!("{} refs/tags/v1^{{}}\n", oid('a')));
        assert_eq!(l[6], "Flush");
        for cap in [
            "shallow",
            "deepen-since",
            "deepen-not",
            "deepen-relative",
            "filter",
            "no-done",
        ] {
            assert!(
                l[2].split(['\0', ' ']).any(|c| c == cap),
                "{cap} is advertised"
            );
        }
    }

    #[test]
    fn v0_empty_repository_and_v1() {
        let mut out = Vec::new();
        v0(&mut out, &Refs::default(), true);
        let l = lines(&out);
        assert_eq!(l[2], "version 1\n");
        assert!(l[3].starts_with("0000000000000000000000000000000000000000 capabilities^{}\0"));
        assert!(!l[3].contains("symref="));
    }

    #[test]
    fn ls_refs_prefixes_select_sorted_ranges_once_each() {
        let mut refs = sample();
        for name in [
            "refs/heads/a",
            "refs/heads/mainline",
            "refs/pull/1/head",
            "refs/tags/v0",
        ] {
            refs.refs.push(Ref {
                name: name.into(),
                target: oid('c'),
                peeled: None,
                symref_target: None,
            });
        }
        refs.refs[1..].sort_by(|a, b| a.name.cmp(&b.name));
        let names = |prefixes: &[&str]| {
            let mut out = Vec::new();
            let args = LsRefs {
                prefixes: prefixes.iter().map(|p| (*p).into()).collect(),
                ..Default::default()
            };
            ls_refs(&mut out, &refs, &args);
            lines(&out)
                .into_iter()
                .filter_map(|l| l.split_once(' ').map(|(_, n)| n.trim_end().to_owned()))
                .collect::<Vec<_>>()
        };
        // Overlapping prefixes, in any order, list each ref once and in sorted order.
        assert_eq!(
            names(&["refs/tags/", "refs/heads/main", "HEAD", "refs/heads/"]),
            [
                "HEAD",
                "refs/heads/a",
                "refs/heads/main",
                "refs/heads/mainline",
                "refs/tags/v0",
                "refs/tags/v1"
            ]
        );
        assert_eq!(
            names(&["refs/heads/main"]),
            ["refs/heads/main", "refs/heads/mainline"]
        );
        assert_eq!(names(&["refs/pull/"]), ["refs/pull/1/head"]);
        assert!(names(&["refs/nothing/", "zzz"]).is_empty());
    }

    #[test]
    fn ls_refs_honours_arguments() {
        let mut out = Vec::new();
        let args = LsRefs {
            symrefs: true,
            peel: true,
            unborn: true,
            prefixes: vec!["refs/tags/".into()],
        };
        ls_refs(&mut out, &sample(), &args);
        assert_eq!(
            lines(&out),
            vec![
                format!("{} refs/tags/v1 peeled:{}\n", oid('b'), oid('a')),
                "Flush".into()
            ]
        );

        out.clear();
        ls_refs(&mut out, &sample(), &LsRefs::default());
        let l = lines(&out);
        assert_eq!(l.len(), 4);
        assert_eq!(l[0], format!("{} HEAD\n", oid('a')));

        out.clear();
        let args = LsRefs {
            symrefs: true,
            unborn: true,
            ..Default::default()
        };
        let empty = Refs {
            refs: vec![],
            unborn_head: Some("refs/heads/main".into()),
        };
        ls_refs(&mut out, &empty, &args);
        assert_eq!(
            lines(&out),
            vec![
                "unborn HEAD symref-target:refs/heads/main\n".to_string(),
                "Flush".into()
            ]
        );
    }
}
