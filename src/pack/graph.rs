//! The commit-graph (`objects/info/commit-graph`, git's `gitformat-commit-graph`): read by the
//! commit walk when present, written by maintenance.
//!
//! A walk that finds a commit in the graph reads its parents, root tree and committer time from
//! a memory-mapped table instead of inflating and parsing the commit object. The graph holds
//! facts about immutable objects, so a graph older than the mirror's newest sync is incomplete,
//! never wrong: commits it lacks are read from the object database as before.
//!
//! gix reads commit-graphs but does not write them; [`write()`] produces a single-file graph
//! (no split chain, no Bloom filters, no generation-data chunk: git then uses the topological
//! levels of the `CDAT` chunk) over every commit reachable from the mirror's refs. That set is
//! closed under parents, as the format requires.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use gix::hashtable::HashMap;
use gix::ObjectId;

use super::walk::Commits;
use super::{check_interrupt, Db, Error};

/// The commit-graph of the repository behind `db`, if it has one that passes verification.
///
/// Opening checks only the file's structure; a graph whose bytes are damaged (or that lies
/// about parents) would make walks fail or send incomplete packs. So each version of the
/// graph's files is verified once (checksum, order, parent positions, generations, see
/// [`gix::commitgraph::Graph::verify_integrity`]) and, when it fails, ignored: walks then read
/// the objects, as without a graph.
///
/// Every walk asks (several per request), so the opened graph is kept per version: a request
/// pays two `stat`s, and only the first walk after a new graph opens and verifies it.
pub fn open(db: &Db) -> Option<Arc<gix::commitgraph::Graph>> {
    let store = db.store_ref();
    let info = store.path().join("info");
    let before = Version::of(&info);
    if let Some((_, graph)) = GRAPHS.lock().get(&info).filter(|(v, _)| *v == before) {
        return graph.clone();
    }
    let graph = gix::commitgraph::Graph::from_info_dir(&info, store.object_hash())
        .ok()
        .filter(
            |graph| match graph.verify_integrity(|_| Ok::<_, std::io::Error>(())) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(
                        dir = %info.display(),
                        error = %e,
                        "ignoring a commit-graph that fails verification"
                    );
                    false
                }
            },
        )
        .map(Arc::new);
    // Replaced while it was read: not remembered, the next walk looks again.
    if Version::of(&info) == before {
        GRAPHS.lock().insert(info, (before, graph.clone()));
    }
    graph
}

/// The verified commit-graph of each version (by `objects/info` directory; `None`: none, or
/// one that failed): one entry per mirror, replaced when its graph is.
static GRAPHS: std::sync::LazyLock<parking_lot::Mutex<Graphs>> =
    std::sync::LazyLock::new(Default::default);

/// By `objects/info` directory: the graph's version and the graph.
type Graphs = std::collections::HashMap<PathBuf, (Version, Option<Arc<gix::commitgraph::Graph>>)>;

/// A version of a repository's commit-graph files: the single file's and the split chain's
/// identity (device, inode, size, modification time), as a replacement by rename changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version([Option<FileId>; 2]);

/// Device, inode, size, modification time (seconds, nanoseconds).
type FileId = (u64, u64, u64, i64, i64);

impl Version {
    fn of(info: &Path) -> Version {
        use std::os::unix::fs::MetadataExt;
        let id = |path: PathBuf| {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
        };
        Version([
            id(info.join("commit-graph")),
            id(info.join("commit-graphs/commit-graph-chain")),
        ])
    }
}

/// The path of the single-file commit-graph in an objects directory.
pub fn path(objects_dir: &Path) -> PathBuf {
    objects_dir.join("info/commit-graph")
}

/// Largest committer time the format's 34 bits hold.
const MAX_TIME: i64 = (1 << 34) - 1;
/// Largest topological level the format's 30 bits hold; deeper commits share it, as in git.
const MAX_LEVEL: u32 = (1 << 30) - 1;
/// The `CDAT` parent value meaning "no parent".
const PARENT_NONE: u32 = 0x7000_0000;
/// Marks an index into the `EDGE` chunk (octopus merges) and the last entry of a list there.
const EDGE_FLAG: u32 = 0x8000_0000;

/// Write the commit-graph of every commit reachable from `tips` (any object ids: tags are
/// peeled, trees and blobs ignored) into `objects_dir/info/commit-graph`, replacing the old one
/// atomically. Returns the number of commits, or `None` when a commit's time does not fit the
/// format (the graph is then not written, and an old one removed, since it would be
/// incomplete anyway).
pub fn write(
    objects_dir: &Path,
    db: &Db,
    tips: &[ObjectId],
    interrupt: &AtomicBool,
) -> Result<Option<usize>, Error> {
    if db.store_ref().object_hash() != gix::hash::Kind::Sha1 {
        return Ok(None);
    }
    // The old graph, where it has a commit, is as true as the objects (commits do not change).
    let mut commits = Commits::new(db, Default::default());
    let mut table: HashMap<ObjectId, (ObjectId, smallvec::SmallVec<[ObjectId; 2]>, i64)> =
        HashMap::default();
    let mut stack = Vec::new();
    for tip in tips {
        if let Some(commit) = commits.peel_to_commit(*tip)? {
            stack.push(commit);
        }
    }
    let mut step = 0;
    while let Some(id) = stack.pop() {
        step += 1;
        check_interrupt(interrupt, step)?;
        if table.contains_key(&id) {
            continue;
        }
        let commit = commits.get(id)?;
        let entry = (commit.tree, commit.parents.clone(), commit.time);
        stack.extend(entry.1.iter().filter(|p| !table.contains_key(*p)));
        table.insert(id, entry);
    }
    let target = path(objects_dir);
    if table
        .values()
        .any(|(_, _, time)| !(0..=MAX_TIME).contains(time))
    {
        remove(&target)?;
        return Ok(None);
    }

    let mut ids: Vec<ObjectId> = table.keys().copied().collect();
    ids.sort_unstable();
    let position: HashMap<ObjectId, u32> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as u32))
        .collect();
    let levels = levels(&ids, &table, &position);

    let hash_len = ObjectId::null(gix::hash::Kind::Sha1).as_bytes().len();
    let mut cdat = Vec::with_capacity(ids.len() * (hash_len + 16));
    let mut edge = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (tree, parents, time) = &table[id];
        let pos = |p: &ObjectId| position[p];
        cdat.extend_from_slice(tree.as_bytes());
        let first = parents.first().map_or(PARENT_NONE, pos);
        let second = match parents.len() {
            0 | 1 => PARENT_NONE,
            2 => pos(&parents[1]),
            _ => {
                let start = (edge.len() / 4) as u32;
                for (n, p) in parents[1..].iter().enumerate() {
                    let last = if n == parents.len() - 2 { EDGE_FLAG } else { 0 };
                    edge.extend_from_slice(&(pos(p) | last).to_be_bytes());
                }
                EDGE_FLAG | start
            }
        };
        cdat.extend_from_slice(&first.to_be_bytes());
        cdat.extend_from_slice(&second.to_be_bytes());
        let time = *time as u64;
        cdat.extend_from_slice(&((levels[i] << 2) | (time >> 32) as u32).to_be_bytes());
        cdat.extend_from_slice(&(time as u32).to_be_bytes());
    }
    let mut fanout = Vec::with_capacity(256 * 4);
    let mut count = 0usize;
    for byte in 0..=255u8 {
        count += ids[count..]
            .iter()
            .take_while(|id| id.as_bytes()[0] == byte)
            .count();
        fanout.extend_from_slice(&(count as u32).to_be_bytes());
    }
    let mut oidl = Vec::with_capacity(ids.len() * hash_len);
    for id in &ids {
        oidl.extend_from_slice(id.as_bytes());
    }
    let mut chunks: Vec<(&[u8; 4], &[u8])> =
        vec![(b"OIDF", &fanout), (b"OIDL", &oidl), (b"CDAT", &cdat)];
    if !edge.is_empty() {
        chunks.push((b"EDGE", &edge));
    }

    let mut out = Vec::new();
    out.extend_from_slice(b"CGPH");
    out.extend_from_slice(&[1, 1, chunks.len() as u8, 0]);
    let mut offset = (out.len() + (chunks.len() + 1) * 12) as u64;
    for (id, data) in &chunks {
        out.extend_from_slice(*id);
        out.extend_from_slice(&offset.to_be_bytes());
        offset += data.len() as u64;
    }
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&offset.to_be_bytes());
    for (_, data) in &chunks {
        out.extend_from_slice(data);
    }
    let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
    hasher.update(&out);
    let checksum = hasher.try_finalize().map_err(|e| Error::Hash {
        what: "the commit-graph",
        source: e.into(),
    })?;
    out.extend_from_slice(checksum.as_bytes());

    let io = || Error::file("writing the commit-graph");
    let info = objects_dir.join("info");
    std::fs::create_dir_all(&info).map_err(io())?;
    let tmp = info.join(format!(".tmp-commit-graph-{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut file| file.write_all(&out).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, &target));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io())?;
    Ok(Some(ids.len()))
}

fn remove(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::file(format!(
            "removing the commit-graph {}",
            path.display()
        ))(e)),
        _ => Ok(()),
    }
}

/// Topological levels (1 for a root, else one more than the highest parent), by position.
/// Iterative, since histories are deeper than any stack.
fn levels(
    ids: &[ObjectId],
    table: &HashMap<ObjectId, (ObjectId, smallvec::SmallVec<[ObjectId; 2]>, i64)>,
    position: &HashMap<ObjectId, u32>,
) -> Vec<u32> {
    let mut levels = vec![0u32; ids.len()];
    let mut stack = Vec::new();
    for start in 0..ids.len() {
        if levels[start] != 0 {
            continue;
        }
        stack.push(start);
        while let Some(&top) = stack.last() {
            let parents = &table[&ids[top]].1;
            let mut ready = true;
            let mut level = 0;
            for parent in parents {
                let p = position[parent] as usize;
                match levels[p] {
                    0 => {
                        ready = false;
                        stack.push(p);
                    }
                    l => level = level.max(l),
                }
            }
            if ready {
                stack.pop();
                levels[top] = (level + 1).min(MAX_LEVEL);
            }
        }
    }
    levels
}
