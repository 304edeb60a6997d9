//! Writing the `.bitmap` of a consolidated pack, as git's `pack-bitmap-write.c` would for it:
//! type bitmaps, and bitmaps for the commits of the ref tips plus a spread along their
//! first-parent history.
//!
//! Commits are taken tip by tip: the first-parent chain below a tip is followed down to a
//! commit that already has a bitmap (or the root), every [`SPREAD`]th commit of it is selected
//! with the tip, and they are computed bottom-up, each from the one below by walking only what
//! is new (a bitmap is closed under reachability, so a tree already in it needs no visit).
//! An entry is stored XORed with the one before it when that is smaller, with chains kept
//! short so that readers decode few entries per bitmap.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::hashtable::{HashMap, HashSet};
use gix::objs::FindHeader;
use gix::ObjectId;

use super::read::{MAGIC, OPT_FULL_DAG, VERSION};
use super::{ewah, Bits, Objects, Reach};
use crate::pack::walk::Commits;
use crate::pack::Db;

/// Every so many commits along a first-parent chain gets a bitmap.
pub const SPREAD: usize = 100;
/// At most this many commits get a bitmap.
pub const MAX_COMMITS: usize = 3_000;
/// An entry is XORed only with one whose chain is shorter than this.
const MAX_XOR_CHAIN: u8 = 16;

/// What [`write()`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The bitmap file.
    pub path: PathBuf,
    /// Commits with a bitmap.
    pub commits: usize,
    /// Of those, stored XORed with the entry before.
    pub xored: usize,
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
/// bitmaps for the commits `tips` peel to (in this order of preference, up to
/// [`MAX_COMMITS`]) and a spread below them. The file appears complete or not at all.
pub fn write(
    db: &Db,
    pack: &Path,
    tips: &[ObjectId],
    interrupt: &AtomicBool,
) -> Result<Outcome, Error> {
    let objects = Objects::open(pack).map_err(Error::Pack)?;
    let n = u32::try_from(objects.len()).map_err(|_| Error::Pack("too many objects".into()))?;
    let mut types: [Bits; 4] = std::array::from_fn(|_| Bits::with_len(objects.len()));
    // Every object of the pack is looked up, most of them many times (once per tree that
    // lists it).
    let positions = objects.positions();
    let mut reader =
        Some(super::PackReader::open(pack, &objects, &positions).map_err(Error::Pack)?);
    let mut commits = Commits::new(db, HashSet::default());
    let mut selected: HashMap<ObjectId, usize> = HashMap::default();
    let mut entries = Entries::default();
    let mut seen_tips = HashSet::default();
    for tip in tips {
        if selected.len() >= MAX_COMMITS {
            break;
        }
        let Some(tip) = commits.peel_to_commit(*tip)? else {
            continue;
        };
        if !seen_tips.insert(tip) || selected.contains_key(&tip) {
            continue;
        }
        // Down the first-parent chain to a commit with a bitmap, or the root.
        let mut chain = vec![tip];
        let mut below = None;
        loop {
            let last = chain[chain.len() - 1];
            let Some(parent) = commits.get(last)?.parents.first().copied() else {
                break;
            };
            if let Some(entry) = selected.get(&parent) {
                below = Some(*entry);
                break;
            }
            crate::pack::check_interrupt(interrupt, chain.len())?;
            chain.push(parent);
        }
        let room = MAX_COMMITS - selected.len();
        let spread = SPREAD.max(chain.len().div_ceil(room));
        let mut reach = Reach::new(&objects);
        reach.positions = Some(&positions);
        reach.reader = reader.take();
        reach.types = Some(std::mem::take(&mut types));
        if let Some(entry) = below {
            reach.bits = entries.bits(entry, objects.len()).map_err(Error::Pack)?;
        }
        // From the bottom of the chain up: the tip last.
        for (depth, id) in chain.iter().enumerate().rev() {
            let from_bottom = chain.len() - 1 - depth;
            if depth != 0 && (from_bottom + 1) % spread != 0 {
                continue;
            }
            let mut unbounded = usize::MAX;
            reach.add_commit(db, &mut commits, None, *id, &mut unbounded, interrupt)?;
            if !reach.ext.is_empty() {
                return Err(Error::Pack(format!(
                    "the pack lacks objects {id} reaches, e.g. {}",
                    reach
                        .ext
                        .keys()
                        .next()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                )));
            }
            let position = objects
                .idx
                .lookup(id)
                .ok_or_else(|| Error::Pack(format!("the pack lacks commit {id}")))?;
            selected.insert(*id, entries.push(position, &reach.bits, n));
        }
        types = reach.types.take().unwrap_or_default();
        reader = reach.reader.take();
    }

    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&OPT_FULL_DAG.to_be_bytes());
    // At most MAX_COMMITS.
    out.extend_from_slice(&(entries.count as u32).to_be_bytes());
    out.extend_from_slice(objects.pack_checksum().as_bytes());
    for bits in complete_types(db, &objects, types, interrupt)? {
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
        bytes: out.len() as u64,
    })
}

/// The type bitmaps, from `known` (the types the walks learnt) and the headers of the objects
/// no walk reached (tags, objects only refs beyond [`MAX_COMMITS`] or nothing reaches).
fn complete_types(
    db: &Db,
    objects: &Objects,
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
        let id = objects.id(pos);
        let header = db
            .try_header(&id)
            .map_err(|e| Error::Pack(format!("reading {id}: {e}")))?
            .ok_or_else(|| Error::Pack(format!("object {id} of the pack is missing")))?;
        known[super::type_index(header.kind)].set(pos);
    }
    Ok(known)
}

/// The commit entries written so far.
#[derive(Default)]
struct Entries {
    bytes: Vec<u8>,
    count: usize,
    xored: usize,
    /// The last entry's bits and XOR chain length.
    last: Option<(Bits, u8)>,
    /// Where each entry's EWAH starts in `bytes`, and the entry it XORs with.
    at: Vec<(usize, usize)>,
}

impl Entries {
    /// Append the entry of the commit at index position `position`; its number.
    fn push(&mut self, position: u32, bits: &Bits, n: u32) -> usize {
        let mut plain = Vec::new();
        ewah::encode(bits, n, &mut plain);
        let mut chosen = (plain, 0u8, 0u8);
        if let Some((last, chain)) = &self.last {
            if *chain < MAX_XOR_CHAIN {
                let mut x = bits.clone();
                x.xor(last);
                let mut xored = Vec::new();
                ewah::encode(&x, n, &mut xored);
                if xored.len() < chosen.0.len() {
                    chosen = (xored, 1, chain + 1);
                }
            }
        }
        let (ewah_bytes, xor, chain) = chosen;
        self.bytes.extend_from_slice(&position.to_be_bytes());
        self.bytes.push(xor);
        self.bytes.push(0);
        let number = self.count;
        self.at
            .push((self.bytes.len(), if xor == 1 { number - 1 } else { number }));
        self.bytes.extend_from_slice(&ewah_bytes);
        self.count += 1;
        self.xored += usize::from(xor);
        self.last = Some((bits.clone(), chain));
        number
    }

    /// The bits of entry `i`, decoded again.
    fn bits(&self, i: usize, n: usize) -> Result<Bits, String> {
        let (start, base) = self.at[i];
        let (mut bits, _) = ewah::decode(&self.bytes[start..], n)?;
        if base != i {
            bits.xor(&self.bits(base, n)?);
        }
        Ok(bits)
    }
}
