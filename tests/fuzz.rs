//! Fuzzing of everything that reads untrusted bytes: pkt-line framing, the v0 and v2 request
//! parsers, filter specs, the request-path resolver, the Git LFS batch classifier, webhook
//! bodies, and the bitmap and commit-graph files an operator may copy into a mirror.
//!
//! The coverage-guided campaigns run the same checks (`fuzz/src/lib.rs`) under cargo fuzz
//! (`scripts/fuzz`), which needs nightly features and a sanitizer build of the whole
//! dependency tree: too much for CI (2 cores). Here, on the stable toolchain, each target
//! first replays its corpus in `fuzz/corpus/<target>/` (seeds recorded from real git clients
//! by `scripts/fuzz-seeds`, and what the campaigns found, minimised), a regression test of
//! every input, then runs a small mutation fuzzer for the time left. Every iteration draws bytes from
//! a deterministic PRNG and hands them to `arbitrary::Unstructured`, which picks either a
//! structured input (a `#[derive(Arbitrary)]` description of a request, encoded) or a stack of
//! mutations of corpus entries. Without coverage instrumentation, the only feedback is the
//! outcome of each run: an input that reaches an outcome class not seen before (a new error
//! message, a new request shape) joins the pool that mutations start from.
//!
//! A panic, an input slower than `FUZZ_SLOW_MS` (default 1000) or a broken invariant is a
//! crash: the input is saved to `target/fuzz-crashes/<target>/<hash>` and the test fails.
//!
//! Environment: `FUZZ_SECONDS` per target after the corpus (default 2, to keep `cargo test`
//! quick), `FUZZ_ITERATIONS` (optional; whichever limit comes first), `FUZZ_SEED` (decimal or
//! `0x` hex; a fixed default). `FUZZ_REPLAY=DIR` runs only the files in `DIR/<target>/`, e.g.
//! `FUZZ_REPLAY=target/fuzz-crashes` to rerun saved crashes (or `fuzz/artifacts`, where the
//! campaigns of `scripts/fuzz` save theirs).

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::panic::{self, AssertUnwindSafe, PanicHookInfo};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use smart_git_proxy::protocol::INFINITE_DEPTH;

#[test]
fn pktline() {
    Fuzzer::new("pktline", GIT_WORDS, check_pktline, gen_request).run();
}

#[test]
fn v0() {
    Fuzzer::new("v0", GIT_WORDS, check_v0, gen_request).run();
}

#[test]
fn v2() {
    Fuzzer::new("v2", GIT_WORDS, check_v2, gen_request).run();
}

#[test]
fn filter() {
    Fuzzer::new("filter", FILTER_WORDS, check_filter, gen_filter).run();
}

#[test]
fn resolve_path() {
    Fuzzer::new("resolve", PATH_WORDS, check_resolve, gen_path).run();
}

#[test]
fn lfs() {
    Fuzzer::new("lfs", JSON_WORDS, check_lfs, gen_lfs).run();
}

#[test]
fn webhook() {
    Fuzzer::new("webhook", JSON_WORDS, check_webhook, gen_json).run();
}

#[test]
fn bitmap() {
    Fuzzer::new("bitmap", FILE_WORDS, check_bitmap, gen_none).run();
}

#[test]
fn commit_graph() {
    Fuzzer::new("commit_graph", FILE_WORDS, check_commit_graph, gen_none).run();
}

/// The targets above, by corpus directory.
const TARGETS: &[&str] = &[
    "pktline",
    "v0",
    "v2",
    "filter",
    "resolve",
    "lfs",
    "webhook",
    "bitmap",
    "commit_graph",
];

/// Every corpus directory is replayed by a target above: a corpus added without one would
/// silently go unchecked.
#[test]
fn every_corpus_is_replayed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut dirs: Vec<String> = fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut targets = TARGETS.to_vec();
    targets.sort();
    assert_eq!(dirs, targets, "the directories of {}", root.display());
}

// ---------------------------------------------------------------------------------------------
// Targets: the checks live in fuzz/src/lib.rs, shared with the cargo fuzz targets.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use checks::{
    check_bitmap, check_commit_graph, check_filter, check_lfs, check_pktline, check_resolve,
    check_v0, check_v2, check_webhook, message_class, Outcome,
};

// ---------------------------------------------------------------------------------------------
// Structured inputs.

/// A request body: laid out as a v0 or v2 client would, or free-form pkt-lines.
#[derive(Arbitrary, Debug)]
enum Request {
    V0 {
        wants: Vec<Pkt>,
        haves: Vec<Pkt>,
        tail: Tail,
    },
    V2 {
        command: Command,
        caps: Vec<Pkt>,
        delim: bool,
        args: Vec<Pkt>,
        tail: Tail,
    },
    Lines(Vec<Pkt>),
}

/// The v2 command line: the two this server implements, or another name.
#[derive(Arbitrary, Debug)]
enum Command {
    Fetch,
    LsRefs,
    Other(Word),
}

/// How a body ends: the way clients end it, with a stray packet, or cut short.
#[derive(Arbitrary, Debug)]
enum Tail {
    Flush,
    Done,
    DoneFlush,
    Nothing,
    Delim,
    ResponseEnd,
    /// Cut the encoded body short by this many bytes.
    Truncate(u8),
}

/// One pkt-line: a keyword line from the v0/v2 vocabulary or a special packet.
#[derive(Arbitrary, Debug)]
struct Pkt {
    line: Arg,
    newline: bool,
    header: Header,
}

/// A line of the v0/v2 vocabulary; special packets are among them so that they show up in
/// any position.
#[derive(Arbitrary, Debug)]
enum Arg {
    Want(Oid, Vec<Cap>),
    Have(Oid),
    Shallow(Oid),
    Done,
    Deepen(Num),
    DeepenSince(Num),
    DeepenNot(Word),
    DeepenRelative,
    Filter(FilterSpec),
    ThinPack,
    OfsDelta,
    IncludeTag,
    NoProgress,
    WantRef(Word),
    RefPrefix(Word),
    Symrefs,
    Peel,
    Unborn,
    CommandFetch,
    CommandLsRefs,
    Agent(Word),
    ObjectFormat,
    ServerOption(Word),
    Raw(Vec<u8>),
    Flush,
    Delim,
    ResponseEnd,
}

/// A v0 capability on the first want line.
#[derive(Arbitrary, Debug)]
enum Cap {
    MultiAck,
    MultiAckDetailed,
    NoDone,
    SideBand,
    SideBand64k,
    ThinPack,
    OfsDelta,
    NoProgress,
    IncludeTag,
    Filter,
    DeepenRelative,
    DeepenSince,
    DeepenNot,
    Shallow,
    Agent(Word),
    Raw(Word),
}

/// An object id: mostly 40 lowercase hex digits, sometimes uppercase, short, long or not hex.
#[derive(Arbitrary, Debug)]
struct Oid {
    bytes: [u8; 20],
    form: u8,
}

/// A number argument: in range, at git's limits, past them, negative or not a number.
#[derive(Arbitrary, Debug)]
enum Num {
    Small(u8),
    U32(u32),
    Infinite,
    I64(i64),
    U64Max,
    Digits(u8),
    Text(Word),
}

/// A short word from the git vocabulary or arbitrary text.
#[derive(Arbitrary, Debug)]
enum Word {
    Known(u8),
    Text(String),
}

/// The 4-hex-digit length: right most of the time, otherwise off by a little, random, upper
/// case, not hex, a special packet's, or cut short.
#[derive(Arbitrary, Debug)]
struct Header {
    mode: u8,
    value: u16,
}

/// A filter spec: the forms git documents, nested with `combine:` and %-encoding.
#[derive(Arbitrary, Debug)]
enum FilterSpec {
    BlobNone,
    BlobLimit(Num, u8),
    Tree(Num),
    ObjectType(Word),
    Sparse(Word),
    Combine(Vec<FilterSpec>, u8),
    Raw(String),
}

fn gen_request(u: &mut Unstructured, out: &mut Vec<u8>) -> arbitrary::Result<()> {
    Request::arbitrary(u)?.encode(out);
    Ok(())
}

impl Request {
    fn encode(&self, out: &mut Vec<u8>) {
        let tail = match self {
            Request::V0 { wants, haves, tail } => {
                encode_all(wants, out);
                out.extend_from_slice(b"0000");
                encode_all(haves, out);
                tail
            }
            Request::V2 {
                command,
                caps,
                delim,
                args,
                tail,
            } => {
                let mut line = b"command=".to_vec();
                match command {
                    Command::Fetch => line.extend_from_slice(b"fetch"),
                    Command::LsRefs => line.extend_from_slice(b"ls-refs"),
                    Command::Other(w) => w.encode(&mut line),
                }
                line.push(b'\n');
                pkt(out, &line);
                encode_all(caps, out);
                if *delim {
                    out.extend_from_slice(b"0001");
                }
                encode_all(args, out);
                tail
            }
            Request::Lines(lines) => {
                encode_all(lines, out);
                return;
            }
        };
        match tail {
            Tail::Flush => out.extend_from_slice(b"0000"),
            Tail::Done => pkt(out, b"done\n"),
            Tail::DoneFlush => out.extend_from_slice(b"0009done\n0000"),
            Tail::Nothing => {}
            Tail::Delim => out.extend_from_slice(b"0001"),
            Tail::ResponseEnd => out.extend_from_slice(b"0002"),
            Tail::Truncate(n) => out.truncate(out.len().saturating_sub(usize::from(*n))),
        }
    }
}

fn encode_all(lines: &[Pkt], out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    for line in lines {
        payload.clear();
        match line.line {
            Arg::Flush => out.extend_from_slice(b"0000"),
            Arg::Delim => out.extend_from_slice(b"0001"),
            Arg::ResponseEnd => out.extend_from_slice(b"0002"),
            _ => {
                line.line.encode(&mut payload);
                if line.newline {
                    payload.push(b'\n');
                }
                line.header.encode(payload.len() + 4, out);
                out.extend_from_slice(&payload);
            }
        }
    }
}

/// A data pkt-line with a correct header.
fn pkt(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(format!("{:04x}", payload.len() + 4).as_bytes());
    out.extend_from_slice(payload);
}

impl Arg {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut word = |w: &[u8]| out.extend_from_slice(w);
        match self {
            Arg::Want(oid, caps) => {
                word(b"want ");
                oid.encode(out);
                for cap in caps {
                    out.push(b' ');
                    cap.encode(out);
                }
            }
            Arg::Have(oid) => {
                word(b"have ");
                oid.encode(out);
            }
            Arg::Shallow(oid) => {
                word(b"shallow ");
                oid.encode(out);
            }
            Arg::Done => word(b"done"),
            Arg::Deepen(n) => {
                word(b"deepen ");
                n.encode(out);
            }
            Arg::DeepenSince(n) => {
                word(b"deepen-since ");
                n.encode(out);
            }
            Arg::DeepenNot(w) => {
                word(b"deepen-not ");
                w.encode(out);
            }
            Arg::DeepenRelative => word(b"deepen-relative"),
            Arg::Filter(spec) => {
                word(b"filter ");
                spec.encode(out, 0);
            }
            Arg::ThinPack => word(b"thin-pack"),
            Arg::OfsDelta => word(b"ofs-delta"),
            Arg::IncludeTag => word(b"include-tag"),
            Arg::NoProgress => word(b"no-progress"),
            Arg::WantRef(w) => {
                word(b"want-ref ");
                w.encode(out);
            }
            Arg::RefPrefix(w) => {
                word(b"ref-prefix ");
                w.encode(out);
            }
            Arg::Symrefs => word(b"symrefs"),
            Arg::Peel => word(b"peel"),
            Arg::Unborn => word(b"unborn"),
            Arg::CommandFetch => word(b"command=fetch"),
            Arg::CommandLsRefs => word(b"command=ls-refs"),
            Arg::Agent(w) => {
                word(b"agent=");
                w.encode(out);
            }
            Arg::ObjectFormat => word(b"object-format=sha1"),
            Arg::ServerOption(w) => {
                word(b"server-option=");
                w.encode(out);
            }
            Arg::Raw(bytes) => word(bytes),
            Arg::Flush => word(b"0000"),
            Arg::Delim => word(b"0001"),
            Arg::ResponseEnd => word(b"0002"),
        }
    }
}

impl Cap {
    fn encode(&self, out: &mut Vec<u8>) {
        let name: &[u8] = match self {
            Cap::MultiAck => b"multi_ack",
            Cap::MultiAckDetailed => b"multi_ack_detailed",
            Cap::NoDone => b"no-done",
            Cap::SideBand => b"side-band",
            Cap::SideBand64k => b"side-band-64k",
            Cap::ThinPack => b"thin-pack",
            Cap::OfsDelta => b"ofs-delta",
            Cap::NoProgress => b"no-progress",
            Cap::IncludeTag => b"include-tag",
            Cap::Filter => b"filter",
            Cap::DeepenRelative => b"deepen-relative",
            Cap::DeepenSince => b"deepen-since",
            Cap::DeepenNot => b"deepen-not",
            Cap::Shallow => b"shallow",
            Cap::Agent(w) => {
                out.extend_from_slice(b"agent=");
                return w.encode(out);
            }
            Cap::Raw(w) => return w.encode(out),
        };
        out.extend_from_slice(name);
    }
}

impl Oid {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut hex = String::with_capacity(40);
        for b in self.bytes {
            let _ = write!(hex, "{b:02x}");
        }
        let mut hex = hex.into_bytes();
        match self.form {
            0..=199 => {}
            200..=214 => hex.make_ascii_uppercase(),
            215..=234 => hex.truncate(usize::from(self.form - 215) * 2),
            235..=244 => hex.extend_from_slice(&hex.clone()[..usize::from(self.form - 234)]),
            _ => hex[usize::from(self.bytes[0]) % 40] = self.bytes[1] | 0x80,
        }
        out.extend_from_slice(&hex);
    }
}

impl Num {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Num::Small(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Num::U32(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Num::Infinite => out.extend_from_slice(INFINITE_DEPTH.to_string().as_bytes()),
            Num::I64(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Num::U64Max => out.extend_from_slice(u64::MAX.to_string().as_bytes()),
            Num::Digits(n) => out.extend(std::iter::repeat_n(b'9', usize::from(*n % 64))),
            Num::Text(w) => w.encode(out),
        }
    }
}

impl Word {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Word::Known(i) => out.extend_from_slice(GIT_WORDS[usize::from(*i) % GIT_WORDS.len()]),
            Word::Text(s) => out.extend_from_slice(s.as_bytes()),
        }
    }
}

impl Header {
    fn encode(&self, len: usize, out: &mut Vec<u8>) {
        let v = self.value;
        match self.mode {
            0..=223 => out.extend_from_slice(format!("{:04x}", len & 0xffff).as_bytes()),
            224..=231 => {
                let off = len as i64 + i64::from(v % 9) - 4;
                out.extend_from_slice(format!("{:04x}", off.clamp(0, 0xffff)).as_bytes());
            }
            232..=239 => out.extend_from_slice(format!("{v:04x}").as_bytes()),
            240..=243 => out.extend_from_slice(format!("{:04X}", len & 0xffff).as_bytes()),
            244..=247 => out.extend_from_slice(&[v as u8, (v >> 8) as u8, b'0', b'0']),
            248..=250 => out.extend_from_slice(format!("{:04x}", v % 5).as_bytes()),
            251..=253 => out.extend_from_slice(&format!("{:04x}", len & 0xffff).as_bytes()[..2]),
            _ => out.extend_from_slice(b"ffff"),
        }
    }
}

fn gen_filter(u: &mut Unstructured, out: &mut Vec<u8>) -> arbitrary::Result<()> {
    FilterSpec::arbitrary(u)?.encode(out, 0);
    Ok(())
}

impl FilterSpec {
    /// `level` is the `combine:` nesting: sub-specs are %-encoded once per level.
    fn encode(&self, out: &mut Vec<u8>, level: usize) {
        let mut spec = Vec::new();
        match self {
            FilterSpec::BlobNone => spec.extend_from_slice(b"blob:none"),
            FilterSpec::BlobLimit(n, unit) => {
                spec.extend_from_slice(b"blob:limit=");
                n.encode(&mut spec);
                if let Some(u) = b"kKmMgGtx".get(usize::from(*unit)) {
                    spec.push(*u);
                }
            }
            FilterSpec::Tree(n) => {
                spec.extend_from_slice(b"tree:");
                n.encode(&mut spec);
            }
            FilterSpec::ObjectType(w) => {
                spec.extend_from_slice(b"object:type=");
                match w {
                    Word::Known(i) => spec.extend_from_slice(
                        [&b"blob"[..], b"tree", b"commit", b"tag", b"note"][usize::from(*i) % 5],
                    ),
                    Word::Text(s) => spec.extend_from_slice(s.as_bytes()),
                }
            }
            FilterSpec::Sparse(w) => {
                spec.extend_from_slice(b"sparse:oid=");
                w.encode(&mut spec);
            }
            FilterSpec::Combine(subs, plus_mode) => {
                spec.extend_from_slice(b"combine:");
                for (i, sub) in subs.iter().enumerate() {
                    if i > 0 || *plus_mode > 250 {
                        spec.push(b'+');
                    }
                    sub.encode(&mut spec, 1);
                }
            }
            FilterSpec::Raw(s) => spec.extend_from_slice(s.as_bytes()),
        }
        if level == 0 {
            out.extend_from_slice(&spec);
        } else {
            percent_encode(&spec, out);
        }
    }
}

/// What git's `combine:` encoding escapes: `+`, `%`, and the characters it reserves.
fn percent_encode(spec: &[u8], out: &mut Vec<u8>) {
    for &b in spec {
        if b.is_ascii_alphanumeric() || b"-._".contains(&b) {
            out.push(b);
        } else {
            let _ = write!(Hex(out), "%{b:02X}");
        }
    }
}

struct Hex<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Hex<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// A request path: a host, repository segments, an endpoint.
#[derive(Arbitrary, Debug)]
struct UriPath {
    leading_slash: bool,
    host: Segment,
    segments: Vec<Segment>,
    endpoint: Endpoint,
}

/// A path segment: a known host or name, or one of the shapes the resolver must refuse.
#[derive(Arbitrary, Debug)]
enum Segment {
    Host(u8),
    Name(u8),
    DotGit(u8),
    Dot,
    DotDot,
    Empty,
    Hidden(u8),
    Encoded(u8),
    Text(String),
}

/// What follows the repository: a smart-HTTP endpoint, an LFS path, nothing or anything.
#[derive(Arbitrary, Debug)]
enum Endpoint {
    InfoRefs,
    UploadPack,
    ReceivePack,
    Lfs(Vec<Segment>),
    LfsPrefix(String),
    None,
    Text(String),
}

const HOSTS: &[&str] = &[
    "github.com",
    "GitHub.com",
    "gitlab.com",
    "127.0.0.1:9001",
    "localhost",
    "[::1]:8080",
    "gİthub.com",
    "xn--gthub-cta.com",
];
const NAMES: &[&str] = &[
    "owner",
    "repo",
    "runs-on",
    "a",
    "x.git.git",
    "git",
    "info",
    "lfs",
    "objects",
    "batch",
    "refs",
    "~",
    "-",
    "con",
    "nul",
    "é",
    "\u{202e}",
];
const ENCODED: &[&str] = &[
    "%2e", "%2E%2E", "%2f", "%00", "..%2f", "\\", "a\\..", "\0", "\n",
];

fn gen_path(u: &mut Unstructured, out: &mut Vec<u8>) -> arbitrary::Result<()> {
    let p = UriPath::arbitrary(u)?;
    if p.leading_slash {
        out.push(b'/');
    }
    p.host.encode(out);
    for s in &p.segments {
        out.push(b'/');
        s.encode(out);
    }
    match &p.endpoint {
        Endpoint::InfoRefs => out.extend_from_slice(b"/info/refs"),
        Endpoint::UploadPack => out.extend_from_slice(b"/git-upload-pack"),
        Endpoint::ReceivePack => out.extend_from_slice(b"/git-receive-pack"),
        Endpoint::Lfs(rest) => {
            out.extend_from_slice(b"/info/lfs");
            for s in rest {
                out.push(b'/');
                s.encode(out);
            }
        }
        Endpoint::LfsPrefix(s) => {
            out.extend_from_slice(b"/info/lfs");
            out.extend_from_slice(s.as_bytes());
        }
        Endpoint::None => {}
        Endpoint::Text(s) => out.extend_from_slice(s.as_bytes()),
    }
    Ok(())
}

impl Segment {
    fn encode(&self, out: &mut Vec<u8>) {
        let pick = |list: &[&'static str], i: u8| list[usize::from(i) % list.len()];
        let s = match self {
            Segment::Host(i) => pick(HOSTS, *i),
            Segment::Name(i) => pick(NAMES, *i),
            Segment::DotGit(i) => {
                out.extend_from_slice(pick(NAMES, *i).as_bytes());
                ".git"
            }
            Segment::Dot => ".",
            Segment::DotDot => "..",
            Segment::Empty => "",
            Segment::Hidden(i) => {
                out.push(b'.');
                pick(NAMES, *i)
            }
            Segment::Encoded(i) => pick(ENCODED, *i),
            Segment::Text(s) => s,
        };
        out.extend_from_slice(s.as_bytes());
    }
}

/// A JSON value for LFS batch bodies, with the keys and values the batch API uses.
#[derive(Arbitrary, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(JsonStr),
    Array(Vec<Json>),
    Object(Vec<(JsonStr, Json)>),
}

/// A JSON string: a batch API word, `download` spelled with escapes, or arbitrary text.
#[derive(Arbitrary, Debug)]
enum JsonStr {
    Known(u8),
    /// `download` with the letters chosen by the mask written as `\u00XX`.
    Escaped(u8),
    Text(String),
}

/// A batch request: a top-level object (usually), white space, and sometimes trailing bytes.
#[derive(Arbitrary, Debug)]
struct Batch {
    fields: Vec<(JsonStr, Json)>,
    operation_at: u8,
    operation: JsonStr,
    pretty: bool,
    trailer: u8,
}

const JSON_KEYS: &[&str] = &[
    "operation",
    "download",
    "upload",
    "objects",
    "transfers",
    "basic",
    "ref",
    "name",
    "refs/heads/main",
    "hash_algo",
    "sha256",
    "oid",
    "size",
    "Operation",
    "operation ",
    "",
    "repository",
    "clone_url",
    "project",
    "git_http_url",
    "https://github.com/owner/repo.git",
    "http://127.0.0.1:9001/g/sub/basic.git",
    "https://gitlab.example.org/group/../project",
];

/// Any JSON value, with the keys of LFS batches and webhook payloads.
fn gen_json(u: &mut Unstructured, out: &mut Vec<u8>) -> arbitrary::Result<()> {
    Json::arbitrary(u)?.encode(out, 0);
    Ok(())
}

/// No structured form: the targets that read files mutate their seeds only.
fn gen_none(_: &mut Unstructured, _: &mut Vec<u8>) -> arbitrary::Result<()> {
    Err(arbitrary::Error::NotEnoughData)
}

fn gen_lfs(u: &mut Unstructured, out: &mut Vec<u8>) -> arbitrary::Result<()> {
    let batch = Batch::arbitrary(u)?;
    let mut fields = batch.fields.iter().peekable();
    let mut emitted = 0u8;
    let sep: &[u8] = if batch.pretty { b",\n  " } else { b"," };
    out.push(b'{');
    loop {
        if emitted == batch.operation_at % 4 {
            if emitted > 0 {
                out.extend_from_slice(sep);
            }
            out.extend_from_slice(b"\"operation\":");
            batch.operation.encode(out);
            emitted += 1;
        }
        let Some((key, value)) = fields.next() else {
            break;
        };
        if emitted > 0 {
            out.extend_from_slice(sep);
        }
        key.encode(out);
        out.push(b':');
        value.encode(out, 0);
        emitted = emitted.saturating_add(1);
    }
    out.push(b'}');
    match batch.trailer {
        0..=239 => {}
        240..=247 => out.push(b'\n'),
        248..=251 => out.extend_from_slice(b"{}"),
        _ => out.truncate(out.len() / 2),
    }
    Ok(())
}

impl Json {
    /// serde_json stops at 128 levels; go a little past that, not arbitrarily far.
    fn encode(&self, out: &mut Vec<u8>, depth: usize) {
        match self {
            Json::Null => out.extend_from_slice(b"null"),
            Json::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Json::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
            Json::Float(f) => out.extend_from_slice(f.to_string().as_bytes()),
            Json::Str(s) => s.encode(out),
            Json::Array(items) if depth < 140 => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.encode(out, depth + 1);
                }
                out.push(b']');
            }
            Json::Object(fields) if depth < 140 => {
                out.push(b'{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    k.encode(out);
                    out.push(b':');
                    v.encode(out, depth + 1);
                }
                out.push(b'}');
            }
            Json::Array(_) | Json::Object(_) => out.extend_from_slice(b"[]"),
        }
    }
}

impl JsonStr {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(b'"');
        match self {
            JsonStr::Known(i) => {
                out.extend_from_slice(JSON_KEYS[usize::from(*i) % JSON_KEYS.len()].as_bytes())
            }
            JsonStr::Escaped(mask) => {
                for (i, c) in "download".bytes().enumerate() {
                    if mask & (1 << i) != 0 {
                        let _ = write!(Hex(out), "\\u{:04x}", c);
                    } else {
                        out.push(c);
                    }
                }
            }
            JsonStr::Text(s) => {
                for c in s.chars() {
                    match c {
                        '"' | '\\' => {
                            out.push(b'\\');
                            out.push(c as u8);
                        }
                        c if (c as u32) < 0x20 => {
                            let _ = write!(Hex(out), "\\u{:04x}", c as u32);
                        }
                        c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
            }
        }
        out.push(b'"');
    }
}

// ---------------------------------------------------------------------------------------------
// Dictionaries: tokens the mutator inserts.

const GIT_WORDS: &[&[u8]] = &[
    b"want ",
    b"have ",
    b"done",
    b"deepen ",
    b"deepen-since ",
    b"deepen-not ",
    b"deepen-relative",
    b"shallow ",
    b"filter ",
    b"thin-pack",
    b"ofs-delta",
    b"include-tag",
    b"no-progress",
    b"command=fetch",
    b"command=ls-refs",
    b"ref-prefix ",
    b"symrefs",
    b"peel",
    b"unborn",
    b"want-ref ",
    b"agent=git/2.47.3",
    b"object-format=sha1",
    b"multi_ack_detailed",
    b"side-band-64k",
    b"no-done",
    b"0000",
    b"0001",
    b"0002",
    b"0003",
    b"0004",
    b"ffff",
    b"fff0",
    b"\n",
    b" ",
    b"refs/heads/main",
    b"HEAD",
    b"2147483647",
    b"4294967296",
    b"-1",
    b"blob:none",
    b"combine:blob:none+tree:0",
    b"1111111111111111111111111111111111111111",
];

const FILTER_WORDS: &[&[u8]] = &[
    b"blob:",
    b"none",
    b"limit=",
    b"tree:",
    b"object:type=",
    b"blob",
    b"commit",
    b"tag",
    b"combine:",
    b"sparse:oid=",
    b"+",
    b"%",
    b"%2B",
    b"%25",
    b"%3A",
    b"%3D",
    b"%3a",
    b"%zz",
    b"%C3%A9",
    b"%FF",
    b"k",
    b"M",
    b"g",
    b"18446744073709551615",
    b"18446744073709551616",
    b"17179869184",
    b"-0",
    b"+1",
    b"\xc3\xa9",
];

const PATH_WORDS: &[&[u8]] = &[
    b"/",
    b"//",
    b"..",
    b".",
    b".git",
    b"/info/refs",
    b"/git-upload-pack",
    b"/git-receive-pack",
    b"/info/lfs",
    b"/info/lfs/objects/batch",
    b"/info/lfsx",
    b"%2e",
    b"%2f",
    b"\\",
    b"\0",
    b"\t",
    b"github.com",
    b"GITHUB.COM",
    b"\xc4\xb0",
    b"\xe2\x80\xae",
    b"\xef\xbc\x8e",
    b"/./",
    b"/../",
];

const JSON_WORDS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"\"operation\"",
    b"\"download\"",
    b"\"upload\"",
    b"\"objects\"",
    b"\\u0064",
    b"\\u006f",
    b"\\ud800",
    b"\\\"",
    b"null",
    b"true",
    b"1e999",
    b"-0",
    b" ",
    b"\n",
    b"\xef\xbb\xbf",
    b"\"operation\":\"download\"",
    b"\"operation\":\"upload\"",
];

/// Signatures and chunk names of the bitmap and commit-graph formats, and edge values.
const FILE_WORDS: &[&[u8]] = &[
    b"BITM",
    b"\0\x01\0\x01",
    b"CGPH",
    b"OIDF",
    b"OIDL",
    b"CDAT",
    b"EDGE",
    b"GDA2",
    b"GDO2",
    b"BIDX",
    b"BDAT",
    b"\0\0\0\0",
    b"\xff\xff\xff\xff",
    b"\x70\0\0\0",
    b"\x80\0\0\0",
    b"\0\0\0\x01",
];

// ---------------------------------------------------------------------------------------------
// The engine.

/// Most inputs stay far below this; it bounds the work of mutations that keep duplicating.
const MAX_INPUT: usize = 128 * 1024;
/// The pool of outcome-novel inputs stops growing here.
const MAX_POOL: usize = 4096;
/// Crash files written per target; later crashes are only counted.
const MAX_SAVED: usize = 100;

struct Fuzzer {
    target: &'static str,
    dict: &'static [&'static [u8]],
    check: fn(&[u8]) -> Outcome,
    generate: fn(&mut Unstructured, &mut Vec<u8>) -> arbitrary::Result<()>,
}

impl Fuzzer {
    fn new(
        target: &'static str,
        dict: &'static [&'static [u8]],
        check: fn(&[u8]) -> Outcome,
        generate: fn(&mut Unstructured, &mut Vec<u8>) -> arbitrary::Result<()>,
    ) -> Self {
        Fuzzer {
            target,
            dict,
            check,
            generate,
        }
    }

    fn run(&self) {
        // FUZZ_REPLAY=DIR runs the files in DIR/<target>/ (e.g. target/fuzz-crashes) and no more.
        let replay = std::env::var_os("FUZZ_REPLAY").map(PathBuf::from);
        let replay_only = replay.is_some();
        let seconds: f64 = env_parse("FUZZ_SECONDS").unwrap_or(2.0);
        let mut limit = Duration::from_secs_f64(seconds.max(0.0));
        let mut iterations: u64 = env_parse("FUZZ_ITERATIONS").unwrap_or(u64::MAX);
        let slow = Duration::from_millis(env_parse("FUZZ_SLOW_MS").unwrap_or(1000));
        let seed = std::env::var("FUZZ_SEED")
            .ok()
            .and_then(|s| parse_u64(&s))
            .unwrap_or(0x5eed_f022_2024_0001);
        let mut rng = Rng::new(seed ^ fnv1a(self.target.as_bytes()));

        let corpus =
            replay.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus"));
        let mut pool = load_corpus(&corpus.join(self.target));
        let corpus_len = pool.len();
        if replay_only {
            (iterations, limit) = (corpus_len as u64, Duration::MAX);
        }
        let mut classes = HashSet::new();
        let mut crashes = 0u64;
        let mut saved = 0usize;
        // Crashes by kind (panic location or invariant), with the first input of each kind.
        let mut kinds: BTreeMap<String, (u64, String, PathBuf)> = BTreeMap::new();
        let mut raw = Vec::new();
        let mut input = Vec::new();
        let mut execs = 0u64;
        println!(
            "fuzz {}: seed {seed:#x}, {corpus_len} inputs from {}",
            self.target,
            corpus.join(self.target).display()
        );
        let quiet = QuietPanics::install();
        let start = Instant::now();

        // The corpus first, as it is and all of it (the regression test), then new inputs
        // until a limit is reached.
        while (execs as usize) < corpus_len || (execs < iterations && start.elapsed() < limit) {
            input.clear();
            if (execs as usize) < corpus_len {
                input.extend_from_slice(&pool[execs as usize]);
            } else {
                raw.resize(64 + (rng.next() % 960) as usize, 0);
                rng.fill(&mut raw);
                let mut u = Unstructured::new(&raw);
                self.next_input(&mut u, &pool, &mut input);
                input.truncate(MAX_INPUT);
            }
            execs += 1;

            let began = Instant::now();
            let result = panic::catch_unwind(AssertUnwindSafe(|| (self.check)(&input)));
            let took = began.elapsed();
            let (kind, message) = match result {
                Ok(Ok(_)) if took > slow => ("slow".to_owned(), format!("took {took:?}")),
                Ok(Ok(class)) => {
                    if pool.len() < MAX_POOL && classes.insert(class) && execs > corpus_len as u64 {
                        pool.push(input.clone());
                    }
                    continue;
                }
                Ok(Err(violation)) => (message_class(&violation, 7), violation),
                Err(_) => LAST_PANIC.with(|p| p.take()).unwrap_or_default(),
            };
            crashes += 1;
            let known = kinds.get_mut(&kind).map(|k| k.0 += 1).is_some();
            if !known || saved < MAX_SAVED {
                saved += 1;
                let path = save_crash(self.target, &input);
                if !known {
                    kinds.insert(kind, (1, message, path));
                }
            }
        }
        drop(quiet);

        println!(
            "fuzz {}: pool of {} inputs, {} outcome classes",
            self.target,
            pool.len(),
            classes.len()
        );
        for (kind, (count, message, path)) in &kinds {
            let message: String = message.chars().take(300).collect();
            println!(
                "fuzz {}: {count} crashes of kind '{kind}', first {}: {message}",
                self.target,
                path.display()
            );
        }
        println!(
            "fuzz {}: {execs} executions, {crashes} crashes, {:.1}s",
            self.target,
            start.elapsed().as_secs_f64()
        );
        assert_eq!(crashes, 0, "fuzz {}: crashes saved", self.target);
    }

    /// Build the next input: a structured generation or mutations of pool entries.
    fn next_input(&self, u: &mut Unstructured, pool: &[Vec<u8>], out: &mut Vec<u8>) {
        let structured = pool.is_empty() || u.ratio(1u8, 4).unwrap_or(false);
        let built = if structured {
            (self.generate)(u, out)
        } else {
            self.mutate(u, pool, out)
        };
        if built.is_err() && out.is_empty() {
            out.extend_from_slice(u.bytes(u.len()).unwrap_or_default());
        }
    }

    fn mutate(
        &self,
        u: &mut Unstructured,
        pool: &[Vec<u8>],
        out: &mut Vec<u8>,
    ) -> arbitrary::Result<()> {
        out.extend_from_slice(u.choose(pool)?);
        for _ in 0..u.int_in_range(1..=5)? {
            let len = out.len();
            let pos = u.int_in_range(0..=len)?;
            let end = u.int_in_range(pos..=len.min(pos + 64))?;
            match u.int_in_range(0..=10)? {
                0 if len > 0 => {
                    let at = pos.min(len - 1);
                    out[at] ^= 1 << u.int_in_range(0..=7)?;
                }
                1 => out.insert(pos, u8::arbitrary(u)?),
                2 => {
                    out.drain(pos..end);
                }
                3 => {
                    let copy = out[pos..end].to_vec();
                    let at = u.int_in_range(0..=len)?;
                    out.splice(at..at, copy);
                }
                4 => {
                    let other = u.choose(pool)?;
                    let from = u.int_in_range(0..=other.len())?;
                    out.truncate(pos);
                    out.extend_from_slice(&other[from..]);
                }
                5 => out.truncate(pos),
                6 => {
                    let headers = pkt_headers(out);
                    let at = match headers.is_empty() {
                        true => pos.min(len.saturating_sub(4)),
                        false => *u.choose(&headers)?,
                    };
                    let value = match u.int_in_range(0..=3)? {
                        0 => *u.choose(&[0u16, 1, 2, 3, 4, 5, 0xfff0, 0xfff4, 0xffff])?,
                        _ => u16::arbitrary(u)?,
                    };
                    let hex = format!("{value:04x}");
                    let n = 4.min(out.len() - at.min(out.len()));
                    out.splice(at..at + n, hex.bytes());
                }
                7 => {
                    let word = *u.choose(self.dict)?;
                    out.splice(pos..pos, word.iter().copied());
                }
                8 => {
                    let word = *u.choose(self.dict)?;
                    out.splice(pos..end, word.iter().copied());
                }
                9 => {
                    // A whole keyword pkt-line, for the targets that read pkt-lines.
                    let word = *u.choose(self.dict)?;
                    let at = pkt_headers(out)
                        .into_iter()
                        .find(|h| *h >= pos)
                        .unwrap_or(len);
                    let mut line = Vec::new();
                    pkt(&mut line, word);
                    out.splice(at..at, line);
                }
                _ if len > 0 => {
                    let at = pos.min(len - 1);
                    out[at] = *u.choose(b"\0\xff\n /:=+%.-0119afAF\"\\{")?;
                }
                _ => out.push(u8::arbitrary(u)?),
            }
            out.truncate(MAX_INPUT);
        }
        Ok(())
    }
}

/// Offsets of the headers of a pkt-line stream, as far as its framing holds.
fn pkt_headers(buf: &[u8]) -> Vec<usize> {
    let mut at = 0;
    let mut out = Vec::new();
    while let Some(n) = buf
        .get(at..at + 4)
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| usize::from_str_radix(h, 16).ok())
    {
        out.push(at);
        at += if n < 4 { 4 } else { n };
    }
    out
}

fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.sort();
    if files.is_empty() {
        println!("fuzz: no inputs in {}", dir.display());
    }
    files.iter().filter_map(|f| fs::read(f).ok()).collect()
}

fn save_crash(target: &str, input: &[u8]) -> PathBuf {
    let target_dir = option_env!("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target_dir.join("fuzz-crashes").join(target);
    let path = dir.join(format!("{:016x}", fnv1a(input)));
    if let Err(e) = fs::create_dir_all(&dir).and_then(|()| fs::write(&path, input)) {
        println!("fuzz {target}: cannot save {}: {e}", path.display());
    }
    path
}

fn env_parse<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64: fast, and the same sequence everywhere for a given seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let n = self.next().to_le_bytes();
            chunk.copy_from_slice(&n[..chunk.len()]);
        }
    }
}

type Hook = Box<dyn Fn(&PanicHookInfo<'_>) + Sync + Send + 'static>;

/// Fuzz targets that run at the same time share one silent panic hook: the first installs
/// it, the last restores the hook that was there before.
static HOOK: Mutex<(usize, Option<Hook>)> = Mutex::new((0, None));

thread_local! {
    /// This thread's last panic, for the crash report: its location and its message.
    static LAST_PANIC: Cell<Option<(String, String)>> = const { Cell::new(None) };
}

struct QuietPanics;

impl QuietPanics {
    fn install() -> Self {
        let mut hook = HOOK.lock().unwrap_or_else(|e| e.into_inner());
        if hook.0 == 0 {
            hook.1 = Some(panic::take_hook());
            panic::set_hook(Box::new(|info| {
                let message = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let at = info.location().map(|l| l.to_string()).unwrap_or_default();
                let panic = (
                    format!("panic at {at}"),
                    format!("panicked at {at}: {message}"),
                );
                LAST_PANIC.with(|p| p.set(Some(panic)));
            }));
        }
        hook.0 += 1;
        QuietPanics
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        let mut hook = HOOK.lock().unwrap_or_else(|e| e.into_inner());
        hook.0 -= 1;
        if hook.0 == 0 {
            if let Some(previous) = hook.1.take() {
                panic::set_hook(previous);
            }
        }
    }
}
