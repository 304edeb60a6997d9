//! The fuzz targets' checks, shared by the two drivers: the coverage-guided targets of
//! cargo fuzz (`fuzz_targets/`, run by `scripts/fuzz`) and the stable mutation harness that
//! replays the corpora in CI (`tests/fuzz.rs`, which includes this file as a module).
//!
//! Each check feeds one input to one reader of untrusted bytes, as the server would, and
//! returns the input's outcome class (the stable harness's feedback) or the invariant the
//! reader broke. A panic is a crash too.
//!
//! The bitmap and commit-graph checks read files an operator may copy into a mirror: the input
//! is written where the server would find it, beside the pack and index of a small repository
//! (`fixtures/disk.{pack,idx}`, written by `scripts/fuzz-seeds` with the seeds of those two
//! targets, so that the seeds belong to that pack).

use std::cell::RefCell;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use gix::object::Kind;
use gix::ObjectId;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use smart_git_proxy::config::Secret;
use smart_git_proxy::http::lfs::batch_operation;
use smart_git_proxy::http::{github_notice, gitlab_notice, Notice};
use smart_git_proxy::pack::{self, bitmap, graph, walk, Db, Selection};
use smart_git_proxy::protocol::filter::{Error as FilterError, Filter};
use smart_git_proxy::protocol::pktline::{Line, Reader, MAX_DATA_LEN};
use smart_git_proxy::protocol::{v0, v2, Deepen, Error as ParseError, INFINITE_DEPTH};
use smart_git_proxy::repo::path::Error as ResolveError;
use smart_git_proxy::repo::{self, resolve, Service};
use smart_git_proxy::upstream::Upstreams;

/// The outcome class of an input, or the invariant it broke.
pub type Outcome = Result<String, String>;

/// Read pkt-lines to the end: every line must lie where its header says, inside the input,
/// and the reader must stop (each packet is at least 4 bytes, so there are at most len/4).
pub fn check_pktline(input: &[u8]) -> Outcome {
    let mut reader = Reader::new(input);
    let mut consumed = 0usize;
    let mut class = String::new();
    for _ in 0..=input.len() / 4 {
        let line = match reader.read() {
            Ok(None) => {
                if consumed != input.len() || !reader.is_empty() {
                    return Err(format!("ended after {consumed} of {} bytes", input.len()));
                }
                class.push('$');
                return Ok(class);
            }
            Ok(Some(line)) => line,
            Err(e) => {
                class.push_str(&message_class(&e.to_string(), 3));
                return Ok(class);
            }
        };
        let header = input
            .get(consumed..consumed + 4)
            .ok_or_else(|| format!("a line past the end: {consumed} of {}", input.len()))?;
        let declared = std::str::from_utf8(header)
            .ok()
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .ok_or_else(|| format!("a line under the header {header:?}"))?;
        match line {
            Line::Data(d) => {
                let at = (d.as_ptr() as usize).wrapping_sub(input.as_ptr() as usize);
                if at != consumed + 4 || declared != d.len() + 4 || d.len() > MAX_DATA_LEN {
                    return Err(format!(
                        "data of {} bytes at {at}, header {declared} at {consumed}",
                        d.len()
                    ));
                }
                let text = line.text().ok_or("a data line without text")?;
                if !d.starts_with(text) || d.len() - text.len() > 1 {
                    return Err("text() is not the line less its newline".into());
                }
                consumed += d.len() + 4;
                class.push(if d.len() > 40 { 'D' } else { 'd' });
            }
            special => {
                if special.text().is_some() || declared > 2 {
                    return Err(format!("{special:?} from header {header:?}"));
                }
                consumed += 4;
                class.push(char::from(b'0' + declared as u8));
            }
        }
        if consumed > input.len() {
            return Err(format!("consumed {consumed} of {} bytes", input.len()));
        }
        class.truncate(12);
    }
    Err("the reader did not stop".into())
}

pub fn check_v0(input: &[u8]) -> Outcome {
    match v0::parse(input) {
        Ok(None) => Ok("none".into()),
        Ok(Some(req)) => {
            if req.wants.is_empty() {
                return Err("a request without wants".into());
            }
            if req.deepen.relative != req.caps.deepen_relative {
                return Err("deepen-relative differs from the capability".into());
            }
            check_deepen(&req.deepen)?;
            Ok(format!(
                "ok {}{}{} {:?} {:?} {} {}",
                u8::from(req.done),
                u8::from(req.wants_only),
                bucket(req.haves.len()),
                req.caps.multi_ack,
                req.caps.sideband,
                deepen_class(&req.deepen),
                req.filter.as_ref().map(filter_class).unwrap_or_default(),
            ))
        }
        Err(e) => Ok(parse_error_class(&e)),
    }
}

pub fn check_v2(input: &[u8]) -> Outcome {
    match v2::parse(input) {
        Ok(None) => Ok("none".into()),
        Ok(Some(req)) => match req.command {
            v2::Command::LsRefs(ls) => {
                if ls.prefixes.len() > v2::MAX_REF_PREFIXES {
                    return Err(format!("{} ref prefixes kept", ls.prefixes.len()));
                }
                Ok(format!(
                    "ls-refs {}{}{} {}",
                    u8::from(ls.symrefs),
                    u8::from(ls.peel),
                    u8::from(ls.unborn),
                    bucket(ls.prefixes.len())
                ))
            }
            v2::Command::Fetch(f) => {
                if f.seen_haves == f.haves.is_empty() {
                    return Err("seen_haves disagrees with the haves".into());
                }
                check_deepen(&f.deepen)?;
                Ok(format!(
                    "fetch {}{}{} {} {}",
                    u8::from(f.done),
                    bucket(f.wants.len()),
                    bucket(f.haves.len()),
                    deepen_class(&f.deepen),
                    f.filter.as_ref().map(filter_class).unwrap_or_default(),
                ))
            }
        },
        Err(e) => Ok(parse_error_class(&e)),
    }
}

/// The checks `Deepen::parse_line` promises: a positive depth within git's "infinite", a
/// positive timestamp, and never a depth together with since/not.
fn check_deepen(d: &Deepen) -> Result<(), String> {
    if d.depth.is_some_and(|n| n == 0 || n > INFINITE_DEPTH) || d.since.is_some_and(|t| t <= 0) {
        return Err(format!("out-of-range deepen: {d:?}"));
    }
    if d.depth.is_some() && (d.since.is_some() || !d.not.is_empty()) {
        return Err(format!("depth combined with since/not: {d:?}"));
    }
    Ok(())
}

/// Parse the spec; on success ask the parsed filter about objects of every kind at an
/// arbitrary depth. Depths are tree depths, so they are drawn from `u32` (a walk never gets
/// near `u64::MAX`).
pub fn check_filter(input: &[u8]) -> Outcome {
    let spec = String::from_utf8_lossy(input);
    let filter = match Filter::parse(&spec) {
        Ok(f) => f,
        Err(FilterError::Invalid(_)) => return Ok("invalid".into()),
        Err(FilterError::Unsupported(_)) => return Ok("unsupported".into()),
    };
    let mut u = Unstructured::new(input);
    let depth = u64::from(u32::arbitrary(&mut u).unwrap_or_default());
    let size = u64::arbitrary(&mut u).unwrap_or_default();
    for kind in [Kind::Commit, Kind::Tree, Kind::Blob, Kind::Tag] {
        filter.includes(kind, depth, &mut || size);
    }
    filter.descends(depth);
    filter.depends_on_depth();
    Ok(filter_class(&filter))
}

const MIRROR_ROOT: &str = "/srv/git-mirrors";

/// An accepted path must stay inside the mirror root: no `.`/`..` segment in the directory
/// below it or in the name.
pub fn check_resolve(input: &[u8]) -> Outcome {
    let root = Path::new(MIRROR_ROOT);
    let path = String::from_utf8_lossy(input);
    let target = match resolve(root, &path) {
        Ok(t) => t,
        Err(ResolveError::UnknownEndpoint(_)) => return Ok("unknown endpoint".into()),
        Err(ResolveError::InvalidPath { reason, .. }) => return Ok(reason.into()),
    };
    let dir = target.dir.as_os_str().as_bytes();
    let below = dir
        .strip_prefix(MIRROR_ROOT.as_bytes())
        .filter(|_| target.dir.starts_with(root))
        .ok_or_else(|| format!("{:?} is outside the root", target.dir))?;
    if below
        .split(|b| *b == b'/')
        .skip(1)
        .any(|s| s == b"." || s == b"..")
        || below.is_empty()
    {
        return Err(format!("{:?} climbs out of the root", target.dir));
    }
    if !below.starts_with(b"/") {
        return Err(format!("{:?} is a sibling of the root", target.dir));
    }
    if target.name.split('/').any(|s| s == "..") {
        return Err(format!("name {:?} has a '..' segment", target.name));
    }
    let service = match target.service {
        Service::InfoRefs => "refs",
        Service::UploadPack => "upload",
        Service::ReceivePack => "receive",
        Service::Lfs(_) => "lfs",
    };
    Ok(format!(
        "{service} {}",
        bucket(target.name.matches('/').count())
    ))
}

/// A body classified as a download must be one to the upstream's JSON parser too.
pub fn check_lfs(input: &[u8]) -> Outcome {
    let op = batch_operation(input);
    if op.as_deref() == Some("download") {
        let value: serde_json::Value =
            serde_json::from_slice(input).map_err(|e| format!("download but not JSON: {e}"))?;
        if value.get("operation").and_then(|o| o.as_str()) != Some("download") || !value.is_object()
        {
            return Err(format!(
                "download but not an object with that operation: {value}"
            ));
        }
    }
    // The same bytes as an upstream's batch answer: the cache's rewrite never panics, writes
    // JSON, and links exactly the objects it reports authorized.
    let mut links = 0;
    let rewritten = smart_git_proxy::lfs::batch::rewrite(
        input,
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000),
        std::time::Duration::from_secs(3600),
        |_, _, _| {
            links += 1;
            "http://proxy/link".into()
        },
    );
    if let Some((body, authorized)) = rewritten {
        serde_json::from_slice::<serde_json::Value>(&body)
            .map_err(|e| format!("the rewrite wrote no JSON: {e}"))?;
        if authorized.len() != links {
            return Err(format!("{links} links for {} objects", authorized.len()));
        }
    }
    Ok(match op.as_deref() {
        None => "none",
        Some("download") => "download",
        Some("upload") => "upload",
        Some("") => "empty",
        Some(_) => "other",
    }
    .into())
}

fn parse_error_class(e: &ParseError) -> String {
    format!(
        "{} {}",
        u8::from(e.is_malformed()),
        message_class(&e.to_string(), 3)
    )
}

/// The first words of an error message, up to where it echoes the input (a word with a quote,
/// a digit or anything but plain ASCII), so that echoed bytes do not make new classes.
pub fn message_class(message: &str, words: usize) -> String {
    let plain = |w: &&str| {
        w.bytes()
            .all(|b| b.is_ascii_graphic() && !b.is_ascii_digit() && !b"'\"[]".contains(&b))
    };
    let words: Vec<&str> = message.split(' ').take(words).take_while(plain).collect();
    words.join(" ")
}

fn filter_class(f: &Filter) -> String {
    match f {
        Filter::BlobNone => "n".into(),
        Filter::BlobLimit(n) => format!("l{}", bucket(*n as usize)),
        Filter::TreeDepth(n) => format!("t{}", bucket(*n as usize)),
        Filter::ObjectType(k) => format!("o{k}"),
        Filter::Combine(subs) => {
            let mut s = String::from("c(");
            for sub in subs.iter().take(4) {
                s.push_str(&filter_class(sub));
            }
            s.push(')');
            s
        }
    }
}

fn deepen_class(d: &Deepen) -> String {
    format!(
        "s{}d{}t{}n{}r{}",
        bucket(d.shallows.len()),
        d.depth.map_or(0, |n| bucket(n as usize)),
        u8::from(d.since.is_some()),
        bucket(d.not.len()),
        u8::from(d.relative)
    )
}

/// 0, 1, 2, or 3 for "more", so that counts do not make every input a new class.
fn bucket(n: usize) -> usize {
    n.min(3)
}

// ---------------------------------------------------------------------------------------------
// Webhook bodies.

/// The allowed upstreams the webhook check maps pushed URLs with: hosts of the seeds.
const WEBHOOK_UPSTREAMS: &str = "github.com,gitlab.com,gitlab.example.org,http://127.0.0.1:9001";

/// The body as a GitHub push (correctly signed) and as a GitLab push hook, then what the server
/// does with the pushed URL: the mirror name it maps to, resolved as a request path. A body
/// signed with its MAC is never refused, and a name that resolves stays inside the mirror root.
/// The body's first line is also tried as the signature header, which it almost never is.
pub fn check_webhook(input: &[u8]) -> Outcome {
    let secret = Secret::from("fuzz");
    let mut mac = Hmac::<Sha256>::new_from_slice(b"fuzz").map_err(|e| e.to_string())?;
    mac.update(input);
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let github = github_notice(&secret, Some(&signature), Some("push"), input)
        .ok_or("a body signed with its MAC was refused")?;
    let gitlab = gitlab_notice(Some("Push Hook"), input);
    let header = input.split(|b| *b == b'\n').next().unwrap_or_default();
    let forged = std::str::from_utf8(header)
        .ok()
        .and_then(|h| github_notice(&secret, Some(h), Some("push"), input));
    if forged.is_some() && header != signature.as_bytes() {
        return Err(format!("accepted the signature {header:?}"));
    }
    let upstreams = Upstreams::parse(WEBHOOK_UPSTREAMS).map_err(|e| e.to_string())?;
    let mut class = String::new();
    for notice in [github, gitlab] {
        let url = match notice {
            Notice::Push(url) => url,
            Notice::Malformed(_) => {
                class.push_str("malformed ");
                continue;
            }
            other => return Err(format!("a push event read as {other:?}")),
        };
        let Some(name) = upstreams.mirror_name(&url) else {
            class.push_str("not-allowed ");
            continue;
        };
        // As the webhook handler does (`mirror_request`): the name as a request path.
        match check_resolve(format!("/{name}/info/refs").as_bytes())? {
            c if c.starts_with("refs ") => class.push_str("mirror "),
            c => {
                class.push_str(&c);
                class.push(' ');
            }
        }
    }
    Ok(class)
}

// ---------------------------------------------------------------------------------------------
// Files from disk: bitmaps and commit-graphs.

/// A bare repository holding the fixture pack, in a directory of its own: one per thread, as
/// the object database handle is not shared across threads.
struct Disk {
    _dir: tempfile::TempDir,
    /// `objects/pack/pack-<hash>.bitmap`, where the input goes.
    bitmap: PathBuf,
    /// `objects/info/commit-graph`, where the input goes.
    graph: PathBuf,
    db: Db,
    /// The fixture's commits, in index order.
    commits: Vec<ObjectId>,
    /// A small cache of decoded bitmaps, so that decoding into it is exercised.
    cache: Arc<bitmap::Cache>,
}

thread_local! {
    static DISK: RefCell<Option<Disk>> = const { RefCell::new(None) };
}

impl Disk {
    fn new() -> Result<Disk, String> {
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let dir = tempfile::tempdir().map_err(|e| err(&e))?;
        let git = dir.path().join("disk.git");
        let packs = git.join("objects/pack");
        fs::create_dir_all(&packs).map_err(|e| err(&e))?;
        fs::create_dir_all(git.join("objects/info")).map_err(|e| err(&e))?;
        fs::create_dir_all(git.join("refs")).map_err(|e| err(&e))?;
        fs::write(git.join("HEAD"), "ref: refs/heads/main\n").map_err(|e| err(&e))?;
        fs::write(git.join("config"), "[core]\n\tbare = true\n").map_err(|e| err(&e))?;
        let idx = include_bytes!("../fixtures/disk.idx");
        // The pack's name is its checksum, which the index ends with (before its own).
        let checksum = idx
            .len()
            .checked_sub(40)
            .map(|at| &idx[at..at + 20])
            .ok_or("a short fixture index")?;
        let base = packs.join(format!("pack-{}", hex::encode(checksum)));
        fs::write(
            base.with_extension("pack"),
            include_bytes!("../fixtures/disk.pack"),
        )
        .map_err(|e| err(&e))?;
        fs::write(base.with_extension("idx"), idx).map_err(|e| err(&e))?;
        let repository = repo::open(&git).map_err(|e| err(&e))?;
        let db = pack::db(&repository);
        let index = gix_pack::index::File::at(base.with_extension("idx"), gix::hash::Kind::Sha1)
            .map_err(|e| err(&e))?;
        let mut commits = Vec::new();
        for entry in index.iter() {
            let object = repository.find_object(entry.oid).map_err(|e| err(&e))?;
            if object.kind == Kind::Commit {
                commits.push(entry.oid);
            }
        }
        Ok(Disk {
            bitmap: base.with_extension("bitmap"),
            graph: git.join("objects/info/commit-graph"),
            _dir: dir,
            db,
            commits,
            cache: Arc::new(bitmap::Cache::new(1 << 20)),
        })
    }

    /// Run `f` with this thread's repository.
    fn with<T>(f: impl FnOnce(&Disk) -> Result<T, String>) -> Result<T, String> {
        DISK.with(|disk| {
            let mut disk = disk.borrow_mut();
            if disk.is_none() {
                *disk = Some(Disk::new().map_err(|e| format!("setting up the fixture: {e}"))?);
            }
            f(disk.as_ref().ok_or("no fixture")?)
        })
    }
}

/// Put `data` at `path` as git and maintenance do: written aside and renamed into place, so
/// that a file still mapped is never changed.
fn replace(path: &Path, data: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("fuzz-tmp");
    fs::write(&tmp, data).map_err(|e| e.to_string())?;
    fs::rename(&tmp, path).map_err(|e| e.to_string())
}

/// The requests the bitmap and commit-graph checks plan and walk: everything, everything but
/// what the first commit reaches, and the last commit alone.
fn selections(commits: &[ObjectId]) -> Vec<(Vec<ObjectId>, Vec<ObjectId>)> {
    let first: Vec<ObjectId> = commits.first().copied().into_iter().collect();
    let last: Vec<ObjectId> = commits.last().copied().into_iter().collect();
    vec![
        (commits.to_vec(), Vec::new()),
        (commits.to_vec(), first.clone()),
        (last, first),
    ]
}

/// The input as the fixture pack's `.bitmap`: opened, loaded, every object's type and every
/// commit's bitmap read, and packs planned from it. Set bits name objects of the pack, and a
/// plan holds only objects that exist.
pub fn check_bitmap(input: &[u8]) -> Outcome {
    Disk::with(|disk| {
        replace(&disk.bitmap, input)?;
        let file = match bitmap::File::open_in(&disk.bitmap, Arc::clone(&disk.cache)) {
            Ok(file) => Arc::new(file),
            Err(bitmap::ReadError::Format { message, .. }) => {
                return Ok(format!("open: {}", message_class(&message, 3)))
            }
            Err(e) => return Err(e.to_string()),
        };
        let index = match file.try_load() {
            Ok(index) => Arc::new(index),
            Err(bitmap::ReadError::Format { message, .. }) => {
                return Ok(format!("load: {}", message_class(&message, 3)))
            }
            Err(e) => return Err(e.to_string()),
        };
        let objects = index.objects().len();
        let mut kinds = 0usize;
        let mut bitmaps = 0usize;
        for pos in 0..objects {
            kinds += usize::from(index.kind(pos).is_some());
            if let Some(bits) = index.commit_bits(&index.objects().id(pos)) {
                bitmaps += 1;
                if let Some(past) = bits.ones().find(|p| *p >= objects) {
                    return Err(format!("bit {past} set of {objects} objects"));
                }
            }
        }
        let mut planned = 0usize;
        for (wants, common) in selections(&disk.commits) {
            let sel = Selection {
                wants: &wants,
                common: &common,
                tags: &[],
                shallow: &[],
                filter: None,
                thin: false,
                bitmap: Some(&index),
            };
            if let Ok(plan) = pack::plan(&disk.db, &sel, &AtomicBool::new(false)) {
                check_plan(disk, &plan)?;
                planned += 1;
            }
        }
        Ok(format!(
            "loaded {} {} {} {}",
            bucket(index.commits()),
            bucket(kinds),
            bucket(bitmaps),
            bucket(planned)
        ))
    })
}

/// Every object of a plan exists in the fixture pack.
fn check_plan(disk: &Disk, plan: &pack::Plan) -> Result<(), String> {
    use gix::objs::Exists;
    match plan.counts.iter().find(|count| !disk.db.exists(&count.id)) {
        Some(count) => Err(format!("planned {}, which the pack lacks", count.id)),
        None => Ok(()),
    }
}

/// The input as `objects/info/commit-graph`, with its trailing checksum recomputed so that
/// mutations get past the checksum test to the checks behind it. The graph is opened and
/// verified as walks do it, and walks and plans run through it. A walk ends, and lists each
/// commit once.
pub fn check_commit_graph(input: &[u8]) -> Outcome {
    let mut data = input.to_vec();
    if let Some(body) = data.len().checked_sub(20) {
        let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
        hasher.update(&data[..body]);
        let sum = hasher.try_finalize().map_err(|e| e.to_string())?;
        data[body..].copy_from_slice(sum.as_bytes());
    }
    Disk::with(|disk| {
        replace(&disk.graph, &data)?;
        let verified = graph::open(&disk.db).is_some();
        let interrupt = AtomicBool::new(false);
        let mut walked = 0usize;
        for (tips, hidden) in selections(&disk.commits) {
            let mut commits = walk::Commits::new(&disk.db, Default::default());
            if let Ok(out) = walk::walk(&mut commits, &tips, &hidden, None, &interrupt) {
                let mut seen = std::collections::HashSet::new();
                if let Some(again) = out.commits.iter().find(|c| !seen.insert(**c)) {
                    return Err(format!("the walk listed {again} twice"));
                }
                walked += 1;
            }
        }
        let mut planned = 0usize;
        for (wants, common) in selections(&disk.commits) {
            let sel = Selection {
                wants: &wants,
                common: &common,
                tags: &[],
                shallow: &[],
                filter: None,
                thin: true,
                bitmap: None,
            };
            if let Ok(plan) = pack::plan(&disk.db, &sel, &interrupt) {
                check_plan(disk, &plan)?;
                planned += 1;
            }
        }
        Ok(format!(
            "{} {} {}",
            u8::from(verified),
            bucket(walked),
            bucket(planned)
        ))
    })
}
