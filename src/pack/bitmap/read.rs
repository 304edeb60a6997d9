//! Reading a pack's `.bitmap`: ours, and git's (which may carry a name-hash cache, a lookup
//! table or pseudo-merges after the commit entries; those are not needed and not read).

use std::ops::Range;
use std::path::{Path, PathBuf};

use gix::hashtable::HashMap;
use gix::objs::Kind;
use gix::ObjectId;

use super::{ewah, Bits, Objects};

/// The bitmap file's signature.
pub(super) const MAGIC: &[u8; 4] = b"BITM";
/// The only version of the format.
pub(super) const VERSION: u16 = 1;
/// Required: the pack is closed under reachability.
pub(super) const OPT_FULL_DAG: u16 = 0x1;
/// An entry XORs with one of at most this many entries before it (git's `MAX_XOR_OFFSET`).
pub(super) const MAX_XOR_OFFSET: usize = 160;

/// Why a bitmap could not be read; the planner then walks.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bitmap or its pack could not be read.
    #[error("reading {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
    /// The bitmap is not in the format, or not for its pack.
    #[error("bitmap {path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// One commit's bitmap in the file.
struct Entry {
    /// The EWAH bytes.
    range: Range<usize>,
    /// The entry this one is XORed with, as a distance back (0: none).
    xor: usize,
}

/// The bitmaps of one pack. The commit bitmaps stay compressed until a request needs them.
pub struct Index {
    path: PathBuf,
    objects: Objects,
    /// Commits, trees, blobs, tags.
    types: [Bits; 4],
    data: Vec<u8>,
    entries: Vec<Entry>,
    commits: HashMap<ObjectId, usize>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("path", &self.path)
            .field("objects", &self.objects.len())
            .field("commits", &self.entries.len())
            .finish()
    }
}

impl Index {
    /// Read the bitmap at `path` (`pack-<hash>.bitmap`) and its pack's index.
    pub fn open(path: &Path) -> Result<Index, Error> {
        let format = |message: String| Error::Format {
            path: path.to_owned(),
            message,
        };
        let data = std::fs::read(path).map_err(|e| Error::Io {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let objects = Objects::open(&path.with_extension("pack")).map_err(|message| Error::Io {
            path: path.to_owned(),
            message,
        })?;
        let header = data
            .get(..32)
            .ok_or_else(|| format("shorter than its header".into()))?;
        if &header[..4] != MAGIC {
            return Err(format("not a bitmap file".into()));
        }
        let version = u16::from_be_bytes([header[4], header[5]]);
        let flags = u16::from_be_bytes([header[6], header[7]]);
        if version != VERSION || flags & OPT_FULL_DAG == 0 {
            return Err(format(format!(
                "unsupported version {version} or flags {flags:#x}"
            )));
        }
        let count = u32::from_be_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if header[12..32] != *objects.pack_checksum().as_bytes() {
            return Err(format("written for another pack".into()));
        }
        let mut rest = &data[32..];
        let mut types: [Bits; 4] = Default::default();
        for t in &mut types {
            let (bits, after) = ewah::decode(rest, objects.len()).map_err(&format)?;
            *t = bits;
            rest = after;
        }
        let mut at = data.len() - rest.len();
        // Entries hold at least their 6 header bytes: the count cannot promise more.
        let mut entries = Vec::with_capacity(count.min(rest.len() / 6));
        let mut commits = HashMap::default();
        for i in 0..count {
            let head = data
                .get(at..at + 6)
                .ok_or_else(|| format(format!("entry {i} is cut off")))?;
            let index_pos = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
            let xor = head[4] as usize;
            if xor > MAX_XOR_OFFSET || xor > i {
                return Err(format(format!("entry {i} has XOR offset {xor}")));
            }
            let len = ewah::skip(&data[at + 6..])
                .ok_or_else(|| format(format!("entry {i} is cut off")))?;
            let pos = objects
                .position_of_index(index_pos)
                .ok_or_else(|| format(format!("entry {i} names object {index_pos}")))?;
            if commits.insert(objects.id(pos), i).is_some() {
                return Err(format(format!("entry {i} repeats a commit")));
            }
            entries.push(Entry {
                range: at + 6..at + 6 + len,
                xor,
            });
            at += 6 + len;
        }
        Ok(Index {
            path: path.to_owned(),
            objects,
            types,
            data,
            entries,
            commits,
        })
    }

    /// The bitmap file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pack's objects in bit order.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// How many commits have a bitmap.
    pub fn commits(&self) -> usize {
        self.entries.len()
    }

    /// The entry of commit `id`, if it has a bitmap.
    pub(super) fn entry(&self, id: &ObjectId) -> Option<usize> {
        self.commits.get(id).copied()
    }

    /// What commit `id` reaches, if it has a bitmap (one that cannot be decoded counts as
    /// none).
    pub fn commit_bits(&self, id: &ObjectId) -> Option<Bits> {
        let entry = self.entry(id)?;
        Decoder::new(self).get(entry).ok().cloned()
    }

    /// The type of the object at pack position `pos`, from the type bitmaps.
    pub fn kind(&self, pos: usize) -> Option<Kind> {
        [Kind::Commit, Kind::Tree, Kind::Blob, Kind::Tag]
            .into_iter()
            .zip(&self.types)
            .find(|(_, bits)| bits.get(pos))
            .map(|(kind, _)| kind)
    }

    fn raw(&self, i: usize) -> Result<Bits, String> {
        let range = self.entries[i].range.clone();
        ewah::decode(&self.data[range], self.objects.len()).map(|(bits, _)| bits)
    }
}

/// Decodes commit bitmaps of one [`Index`], remembering recent ones: an entry is stored as
/// the XOR with an earlier one, so decoding one decodes its chain.
pub(super) struct Decoder<'a> {
    index: &'a Index,
    memo: std::collections::HashMap<usize, Bits>,
}

/// Decoded bitmaps a [`Decoder`] keeps at most (each is a bit per object of the pack).
const MEMO_ENTRIES: usize = 256;

impl<'a> Decoder<'a> {
    pub(super) fn new(index: &'a Index) -> Self {
        Decoder {
            index,
            memo: std::collections::HashMap::new(),
        }
    }

    /// The bitmaps decoded.
    pub(super) fn index(&self) -> &'a Index {
        self.index
    }

    /// The objects commit entry `i` reaches.
    pub(super) fn get(&mut self, i: usize) -> Result<&Bits, String> {
        let mut chain = vec![i];
        loop {
            let last = chain[chain.len() - 1];
            let xor = self.index.entries[last].xor;
            if xor == 0 || self.memo.contains_key(&last) {
                break;
            }
            chain.push(last - xor);
        }
        if self.memo.len() + chain.len() > MEMO_ENTRIES {
            // Keep what the chain starts from, if anything.
            let keep = chain.last().and_then(|b| self.memo.remove_entry(b));
            self.memo.clear();
            self.memo.extend(keep);
        }
        let mut base: Option<Bits> = None;
        for at in chain.iter().rev() {
            let bits = match self.memo.get(at) {
                Some(bits) => bits.clone(),
                None => {
                    let mut bits = self.index.raw(*at)?;
                    if let Some(base) = &base {
                        bits.xor(base);
                    }
                    self.memo.insert(*at, bits.clone());
                    bits
                }
            };
            base = Some(bits);
        }
        self.memo
            .get(&i)
            .ok_or_else(|| "bitmap entry not decoded".to_owned())
    }
}
