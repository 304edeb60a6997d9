//! Writing the `.bitmap` of a pack closed under reachability (the consolidated pack of
//! maintenance, or a mirror's only pack), as git's `pack-bitmap-write.c` would for it: type
//! bitmaps, and bitmaps for a selection of commits.
//!
//! **Which commits.** A request walks from its wants and haves down to the nearest bitmapped
//! commits (at most [`super::MAX_WALK`] commits), so what the selection must give is a short
//! way down from every ref, not a bitmap per ref: each bitmap costs a walk when written and
//! bytes when read, and a repository with thousands of `refs/pull/*` would pay for thousands.
//! - The newest [`MAX_TIPS`] tips of `HEAD`, branches and tags (by committer date) get one:
//!   what clones and fetches ask for most is answered without a walk.
//! - Along the first-parent history of every ref (those of `HEAD`, branches and tags first,
//!   so that the spread falls on their history), every commit is fewer than [`SPREAD`]
//!   first-parent steps above a bitmapped commit or a root commit. Fetching any other tip,
//!   `refs/pull/*` included, walks at most that many commits of its first-parent history (and
//!   what was merged into them) before it meets a bitmap.
//! - At most [`MAX_COMMITS`] in all: on a longer history the spread widens.
//!
//! Git (`bitmap_writer_select_commits`) selects comparably: every commit among the newest 100
//! by date, then about every 100th, and ref tips only where `pack.preferBitmapTips` names
//! them. On a repository with 5,000 refs, most of them pull requests, both select about 200.
//!
//! **Computing them.** One pass over the first-parent forest of the refs, from the roots up:
//! each commit adds to its first parent's set only what is new, walking its other parents
//! down to what the set has and only the trees not in it yet (a set is closed under
//! reachability, so a tree already in it needs no visit). At a fork the set is copied for the
//! smaller branches; the largest continues with it. Branches with no selected commit are not
//! walked. When the pack replaces one that had a bitmap (consolidation), a commit that bitmap
//! covers takes its set from there, translated to the new pack's order, instead of a walk.
//!
//! **Storing them.** An entry is stored XORed with the entry of the nearest bitmapped commit
//! below it or with the entry written before, whichever makes it smaller, with chains kept
//! short so that readers decode few entries per bitmap.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use gix::hashtable::{HashMap, HashSet};
use gix::objs::FindHeader;
use gix::ObjectId;

use super::read::{Decoder, File, Index, MAGIC, MAX_XOR_OFFSET, OPT_FULL_DAG, VERSION};
use super::{ewah, Bits, Cache, Objects, Positions, Reach};
use crate::pack::walk::Commits;
use crate::pack::Db;

/// Every commit on the first-parent history of a ref is fewer than this many first-parent
/// steps above a commit with a bitmap (or a root commit), unless [`MAX_COMMITS`] widens it.
pub const SPREAD: usize = 100;
/// The newest this many tips of `HEAD`, branches and tags get a bitmap of their own.
pub const MAX_TIPS: usize = 100;
/// At most this many commits get a bitmap.
pub const MAX_COMMITS: usize = 1_000;
/// An entry is XORed only with one whose chain is shorter than this.
const MAX_XOR_CHAIN: u8 = 16;
/// What decoding the replaced pack's bitmaps may keep decoded.
const OLD_CACHE_BYTES: usize = 16 << 20;
/// No node.
const NONE: u32 = u32::MAX;

/// The ref tips a bitmap is written for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tips<'a> {
    /// `HEAD`, branches and tags: the newest [`MAX_TIPS`] get a bitmap, and the spread falls
    /// on their history first.
    pub preferred: &'a [ObjectId],
    /// Other refs (`refs/pull/*` and the like): the spread along their history only.
    pub other: &'a [ObjectId],
}

/// What [`write()`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The bitmap file.
    pub path: PathBuf,
    /// Commits with a bitmap.
    pub commits: usize,
    /// Of those, stored XORed with another entry.
    pub xored: usize,
    /// Of those, whose set came from the replaced pack's bitmap.
    pub reused: usize,
    /// Commits walked to compute them.
    pub walked: usize,
    /// Bytes of the file.
    pub bytes: u64,
}

/// Why no bitmap was written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the pack's index or objects failed, or the pack is not closed under
    /// reachability.
    #[error("{0}")]
    Pack(String),
    /// Walking the history failed.
    #[error(transparent)]
    Walk(#[from] crate::pack::Error),
    /// Writing the file failed.
    #[error("writing the bitmap: {0}")]
    Io(#[from] std::io::Error),
}

/// Write `pack-<hash>.bitmap` next to the pack at `pack` (closed under reachability), with
/// bitmaps for the commits the module documentation says `tips` select. `replaced` is the
/// bitmap of a pack this one replaces, if any: commits it covers are not walked again. The
/// file appears complete or not at all.
pub fn write(
    db: &Db,
    pack: &Path,
    tips: Tips<'_>,
    replaced: Option<&Path>,
    interrupt: &AtomicBool,
) -> Result<Outcome, Error> {
    let objects = Objects::open(pack).map_err(Error::Pack)?;
    let n = u32::try_from(objects.len()).map_err(|_| Error::Pack("too many objects".into()))?;
    // Every object of the pack is looked up, most of them many times (once per tree that
    // lists it).
    let positions = objects.positions();
    let mut commits = Commits::new(db, HashSet::default());
    let forest = Forest::select(&mut commits, tips, interrupt)?;
    let old = replaced.and_then(|path| match Old::open(path, &positions, objects.len()) {
        Ok(old) => Some(old),
        Err(e) => {
            tracing::debug!(bitmap = %path.display(), error = %e, "not reusing the old bitmap");
            None
        }
    });
    let mut reach = Reach::new(&objects);
    reach.positions = Some(&positions);
    reach.reader = Some(super::PackReader::open(pack, &objects, &positions).map_err(Error::Pack)?);
    reach.types = Some(match &old {
        Some(old) => old.types(),
        None => std::array::from_fn(|_| Bits::with_len(objects.len())),
    });
    let computed = forest.compute(db, &mut commits, &mut reach, old.as_ref(), n, interrupt)?;
    let entries = computed.entries;
    let types = reach.types.take().unwrap_or_default();
    let reader = reach.reader.take();
    drop((reach, old));

    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&OPT_FULL_DAG.to_be_bytes());
    // At most MAX_COMMITS.
    out.extend_from_slice(&(entries.count as u32).to_be_bytes());
    out.extend_from_slice(objects.pack_checksum().as_bytes());
    for bits in complete_types(db, &objects, reader.as_ref(), types, interrupt)? {
        ewah::encode(&bits, n, &mut out);
    }
    out.extend_from_slice(&entries.bytes);
    let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
    hasher.update(&out);
    let trailer = hasher
        .try_finalize()
        .map_err(|e| Error::Pack(e.to_string()))?;
    out.extend_from_slice(trailer.as_bytes());

    let path = pack.with_extension("bitmap");
    // `.tmp*` in the pack directory: start-up cleanup removes it after a crash.
    let tmp = path.with_file_name(format!(".tmp-bitmap-{}", std::process::id()));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&out)?;
        f.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(Outcome {
        path,
        commits: entries.count,
        xored: entries.xored,
        reused: computed.reused,
        walked: computed.walked,
        bytes: out.len() as u64,
    })
}

/// The first-parent history of the refs, each commit once, with the selected commits.
#[derive(Default)]
struct Forest {
    ids: Vec<ObjectId>,
    /// The node of each node's first parent, or [`NONE`]; always an earlier node.
    parent: Vec<u32>,
    selected: Vec<bool>,
}

/// What [`Forest::compute`] made.
struct Computed {
    entries: Entries,
    reused: usize,
    walked: usize,
}

/// A step of [`Forest::compute`]'s pass.
enum Task {
    /// Add the node to the set (which holds what its first parent reaches).
    Visit(u32),
    /// Make the set this again: what the first parent of the next node visited reaches.
    Restore(Rc<Bits>),
}

impl Forest {
    /// The first-parent history of `tips` and the commits of it that get a bitmap (see the
    /// module documentation).
    fn select(
        commits: &mut Commits<'_>,
        tips: Tips<'_>,
        interrupt: &AtomicBool,
    ) -> Result<Forest, Error> {
        let mut seen = HashSet::default();
        let mut preferred = Vec::new();
        for tip in tips.preferred {
            if let Some(commit) = commits.peel_to_commit(*tip)? {
                if seen.insert(commit) {
                    preferred.push((commits.get(commit)?.time, commit));
                }
            }
        }
        // Newest first; the id breaks ties, so that the order of refs does not matter.
        preferred.sort_unstable_by(|a, b| b.cmp(a));
        let mut order: Vec<ObjectId> = preferred.iter().map(|(_, id)| *id).collect();
        for tip in tips.other {
            if let Some(commit) = commits.peel_to_commit(*tip)? {
                if seen.insert(commit) {
                    order.push(commit);
                }
            }
        }

        let mut forest = Forest::default();
        let mut node: HashMap<ObjectId, u32> = HashMap::default();
        let mut chain = Vec::new();
        for tip in order {
            // Down the first-parent chain to a commit already in the forest, or a root.
            chain.clear();
            let mut id = tip;
            let mut below = NONE;
            loop {
                if let Some(at) = node.get(&id) {
                    below = *at;
                    break;
                }
                chain.push(id);
                crate::pack::check_interrupt(interrupt, node.len() + chain.len())?;
                match commits.get(id)?.parents.first() {
                    Some(parent) => id = *parent,
                    None => break,
                }
            }
            for id in chain.iter().rev() {
                let at = u32::try_from(forest.ids.len())
                    .map_err(|_| Error::Pack("too many commits".into()))?;
                forest.ids.push(*id);
                forest.parent.push(below);
                node.insert(*id, at);
                below = at;
            }
        }

        forest.selected = vec![false; forest.ids.len()];
        let chosen = preferred.len().min(MAX_TIPS);
        for (_, id) in &preferred[..chosen] {
            if let Some(at) = node.get(id) {
                forest.selected[*at as usize] = true;
            }
        }
        let tips = forest.selected.clone();
        let mut spread = SPREAD.max(forest.ids.len().div_ceil(MAX_COMMITS - chosen));
        // Branches that fork near the end of a spread can select more than the length of the
        // history over the spread; a wider one then selects fewer.
        while forest.spread(&tips, spread) > MAX_COMMITS {
            spread *= 2;
        }
        Ok(forest)
    }

    /// The entries of the selected commits, in one pass from the roots up (see the module
    /// documentation). `reach` is empty, and reads the pack.
    fn compute(
        &self,
        db: &Db,
        commits: &mut Commits<'_>,
        reach: &mut Reach<'_>,
        old: Option<&Old>,
        n: u32,
        interrupt: &AtomicBool,
    ) -> Result<Computed, Error> {
        let len = self.ids.len();
        // Nodes whose set the replaced bitmap has: they need no walk below them.
        let reusable: Vec<bool> = match old {
            Some(old) => self.ids.iter().map(|id| old.has(id)).collect(),
            None => vec![false; len],
        };
        // A node is visited when it is selected or a child needs its set (a visited child
        // whose set is not reusable). `size`: the visited nodes a node's set is carried to
        // (itself included), 0 for a node not visited.
        let mut size = vec![0u32; len];
        for at in (0..len).rev() {
            if self.selected[at] || size[at] > 0 {
                size[at] += 1;
                if let (false, Some(parent)) = (reusable[at], self.parent_of(at)) {
                    size[parent] += size[at];
                }
            }
        }
        // The children each node carries its set to, largest last: `kids[start[i]..start[i + 1]]`.
        let carried = |at: usize| size[at] > 0 && !reusable[at];
        let mut start = vec![0usize; len + 1];
        for at in 0..len {
            if let (true, Some(parent)) = (carried(at), self.parent_of(at)) {
                start[parent + 1] += 1;
            }
        }
        for i in 0..len {
            start[i + 1] += start[i];
        }
        let mut kids = vec![0u32; start[len]];
        let mut fill = start.clone();
        for at in 0..len {
            if let (true, Some(parent)) = (carried(at), self.parent_of(at)) {
                kids[fill[parent]] = at as u32;
                fill[parent] += 1;
            }
        }
        for i in 0..len {
            kids[start[i]..start[i + 1]].sort_unstable_by_key(|k| size[*k as usize]);
        }

        let mut entries = Entries::default();
        // The entry of the nearest selected node at or below each visited node.
        let mut near = vec![NONE; len];
        let mut reused = 0;
        let mut walked = 0;
        let empty = Rc::new(Bits::with_len(reach.objects.len()));
        // Passes start at roots (from nothing) and at reusable nodes (from their set).
        let mut tasks = Vec::new();
        for at in (0..len).rev() {
            if size[at] > 0 && (reusable[at] || self.parent[at] == NONE) {
                tasks.push(Task::Visit(at as u32));
                if !reusable[at] {
                    tasks.push(Task::Restore(Rc::clone(&empty)));
                }
            }
        }
        while let Some(task) = tasks.pop() {
            let at = match task {
                Task::Restore(bits) => {
                    reach.bits.clone_from(&bits);
                    continue;
                }
                Task::Visit(at) => at as usize,
            };
            let id = self.ids[at];
            let from_old = match (reusable[at], old) {
                (true, Some(old)) => old.reach(&id),
                _ => None,
            };
            match from_old {
                Some(bits) => {
                    reach.bits = bits;
                    reused += 1;
                }
                None => {
                    if reusable[at] {
                        // Not readable after all: from nothing.
                        reach.bits.clone_from(&empty);
                    }
                    let mut unbounded = usize::MAX;
                    reach.add_commit(db, commits, None, id, &mut unbounded, interrupt)?;
                    walked += 1;
                    if let Some(missing) = reach.ext.keys().next() {
                        return Err(Error::Pack(format!(
                            "the pack lacks objects {id} reaches, e.g. {missing}"
                        )));
                    }
                }
            }
            let below = self.parent_of(at).map_or(NONE, |parent| near[parent]);
            near[at] = if self.selected[at] {
                let position = reach
                    .objects
                    .idx
                    .lookup(id)
                    .ok_or_else(|| Error::Pack(format!("the pack lacks commit {id}")))?;
                let below = (below != NONE).then_some(below as usize);
                let entry = entries
                    .push(position, &reach.bits, n, below)
                    .map_err(Error::Pack)?;
                u32::try_from(entry).map_err(|_| Error::Pack("too many entries".into()))?
            } else {
                below
            };
            let Some((largest, smaller)) = kids[start[at]..start[at + 1]].split_last() else {
                continue;
            };
            tasks.push(Task::Visit(*largest));
            if !smaller.is_empty() {
                let snapshot = Rc::new(reach.bits.clone());
                for kid in smaller.iter().rev() {
                    tasks.push(Task::Restore(Rc::clone(&snapshot)));
                    tasks.push(Task::Visit(*kid));
                }
            }
        }
        Ok(Computed {
            entries,
            reused,
            walked,
        })
    }

    /// Select `tips` and, along the first-parent chains, each commit `spread` steps above a
    /// selected one or a root; how many are selected.
    fn spread(&mut self, tips: &[bool], spread: usize) -> usize {
        self.selected.clone_from_slice(tips);
        // First-parent steps down to a selected commit, or past a root.
        let mut gap = vec![0usize; self.ids.len()];
        for at in 0..self.ids.len() {
            let below = self.parent_of(at).map_or(0, |parent| gap[parent]) + 1;
            if self.selected[at] || below >= spread {
                self.selected[at] = true;
            } else {
                gap[at] = below;
            }
        }
        self.selected.iter().filter(|s| **s).count()
    }

    fn parent_of(&self, at: usize) -> Option<usize> {
        match self.parent[at] {
            NONE => None,
            parent => Some(parent as usize),
        }
    }
}

/// The bitmap of the pack the new one replaces, with the new pack position of each of its
/// objects.
struct Old {
    index: Index,
    /// The new position of each old position, [`NONE`] for an object the new pack lacks.
    map: Vec<u32>,
    /// Objects in the new pack.
    len: usize,
}

impl Old {
    fn open(path: &Path, positions: &Positions, len: usize) -> Result<Old, String> {
        let file = File::open_in(path, Arc::new(Cache::new(OLD_CACHE_BYTES)))
            .map_err(|e| e.to_string())?;
        let index = Arc::new(file).try_load().map_err(|e| e.to_string())?;
        let objects = index.objects();
        let map = (0..objects.len())
            .map(|pos| positions.get(&objects.id(pos)).copied().unwrap_or(NONE))
            .collect();
        Ok(Old { index, map, len })
    }

    /// `bits` of the old pack in the new pack's positions; `None` when the new pack lacks
    /// one of them.
    fn translate(&self, bits: &Bits) -> Option<Bits> {
        let mut out = Bits::with_len(self.len);
        for pos in bits.ones() {
            match self.map.get(pos) {
                Some(&new) if new != NONE => out.set(new as usize),
                _ => return None,
            }
        }
        Some(out)
    }

    /// The type bitmaps of the new pack's objects that the old one has.
    fn types(&self) -> [Bits; 4] {
        std::array::from_fn(|t| {
            let mut out = Bits::with_len(self.len);
            for pos in self.index.types()[t].ones() {
                if let Some(&new) = self.map.get(pos) {
                    if new != NONE {
                        out.set(new as usize);
                    }
                }
            }
            out
        })
    }

    /// Whether the old bitmap has commit `id`.
    fn has(&self, id: &ObjectId) -> bool {
        self.index.entry(id).is_some()
    }

    /// What commit `id` reaches, in the new pack's positions, if the old bitmap has it.
    fn reach(&self, id: &ObjectId) -> Option<Bits> {
        let entry = self.index.entry(id)?;
        let bits = Decoder::new(&self.index).get(entry).ok()?;
        self.translate(&bits)
    }
}

/// The type bitmaps, from `known` (the types the walks learnt) and, for the objects no walk
/// reached (tags, objects only unwalked history or nothing reaches), the pack's entry headers
/// (a delta has its base's type; bases come first in pack order), or the object database.
fn complete_types(
    db: &Db,
    objects: &Objects,
    reader: Option<&super::PackReader<'_>>,
    mut known: [Bits; 4],
    interrupt: &AtomicBool,
) -> Result<[Bits; 4], Error> {
    let mut any = Bits::with_len(objects.len());
    for bits in &known {
        any.or(bits);
    }
    for pos in 0..objects.len() {
        crate::pack::check_interrupt(interrupt, pos + 1)?;
        if any.get(pos) {
            continue;
        }
        let stored = match reader.map(|r| r.stored_kind(pos)).transpose() {
            Ok(stored) => stored,
            Err(e) => {
                return Err(Error::Pack(format!(
                    "reading object {pos} of the pack: {e}"
                )))
            }
        };
        let kind = match stored {
            Some(Ok(kind)) => Some(kind),
            Some(Err(Some(base))) if any.get(base) => {
                (0..4).find(|t| known[*t].get(base)).map(|t| KINDS[t])
            }
            _ => None,
        };
        let kind = match kind {
            Some(kind) => kind,
            None => {
                let id = objects.id(pos);
                db.try_header(&id)
                    .map_err(|e| Error::Pack(format!("reading {id}: {e}")))?
                    .ok_or_else(|| Error::Pack(format!("object {id} of the pack is missing")))?
                    .kind
            }
        };
        known[super::type_index(kind)].set(pos);
        any.set(pos);
    }
    Ok(known)
}

/// The kinds of the type bitmaps, in order.
const KINDS: [gix::objs::Kind; 4] = [
    gix::objs::Kind::Commit,
    gix::objs::Kind::Tree,
    gix::objs::Kind::Blob,
    gix::objs::Kind::Tag,
];

/// The commit entries written so far.
#[derive(Default)]
struct Entries {
    bytes: Vec<u8>,
    count: usize,
    xored: usize,
    /// The last entry's bits.
    last: Option<Bits>,
    /// Where each entry's EWAH starts in `bytes`, the entry it XORs with (itself: none) and
    /// the length of its XOR chain.
    at: Vec<(usize, usize, u8)>,
}

impl Entries {
    /// Append the entry of the commit at index position `position`, XORed with the entry
    /// before or entry `below` when that is smaller; its number.
    fn push(
        &mut self,
        position: u32,
        bits: &Bits,
        n: u32,
        below: Option<usize>,
    ) -> Result<usize, String> {
        let number = self.count;
        let mut plain = Vec::new();
        ewah::encode(bits, n, &mut plain);
        // (bytes, base entry, chain length)
        let mut chosen = (plain, number, 0u8);
        let before = number.checked_sub(1);
        for base in [before, below.filter(|b| Some(*b) != before)]
            .into_iter()
            .flatten()
        {
            let chain = self.at[base].2;
            if chain >= MAX_XOR_CHAIN || number - base > MAX_XOR_OFFSET {
                continue;
            }
            let mut x = bits.clone();
            match (&self.last, Some(base) == before) {
                (Some(last), true) => x.xor(last),
                _ => x.xor(&self.bits(base, n as usize)?),
            }
            let mut xored = Vec::new();
            ewah::encode(&x, n, &mut xored);
            if xored.len() < chosen.0.len() {
                chosen = (xored, base, chain + 1);
            }
        }
        let (ewah_bytes, base, chain) = chosen;
        self.bytes.extend_from_slice(&position.to_be_bytes());
        // At most MAX_XOR_OFFSET, which fits a byte.
        self.bytes.push((number - base) as u8);
        self.bytes.push(0);
        self.at.push((self.bytes.len(), base, chain));
        self.bytes.extend_from_slice(&ewah_bytes);
        self.count += 1;
        self.xored += usize::from(base != number);
        self.last = Some(bits.clone());
        Ok(number)
    }

    /// The bits of entry `i`, decoded again.
    fn bits(&self, i: usize, n: usize) -> Result<Bits, String> {
        let (start, base, _) = self.at[i];
        let (mut bits, _) = ewah::decode(&self.bytes[start..], n)?;
        if base != i {
            bits.xor(&self.bits(base, n)?);
        }
        Ok(bits)
    }
}
