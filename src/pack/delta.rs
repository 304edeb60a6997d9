//! Git's delta encoding, the payload of `OFS_DELTA` and `REF_DELTA` pack entries: a target
//! written as copies from a base and inserted bytes.
//!
//! gix-pack applies deltas but does not make them. A thin pack needs new ones when the mirror
//! holds an object whole, or as a delta against a base the client lacks, while the client has
//! another version of it at the same path (what git's `pack-objects` finds with its delta
//! search). The method is git's `diff-delta.c`: the base is indexed by the hash of each
//! 16-byte block, the target is scanned with a rolling hash of the same width, and every match
//! is extended both ways before it becomes a copy. No crate makes git deltas, hence this module.
//!
//! Cost: the index holds one entry per block of the base (12 bytes per 16 bytes), and encoding
//! looks at no more than [`MAX_CANDIDATES`] blocks per target position, so a delta costs time
//! proportional to the sizes of base and target.

/// Width of the blocks the base is indexed by, and of the rolling hash over the target.
const BLOCK: usize = 16;
/// Multiplier of the polynomial rolling hash.
const PRIME: u32 = 0x0100_0193;
/// Blocks of the base that are looked at for one target position (bucket entries, whether or
/// not their hash is the one sought): bounds the work on repetitive data.
const MAX_CANDIDATES: usize = 32;
/// The longest copy one instruction carries (git writes no longer ones).
const MAX_COPY: usize = 0x10000;
/// The most bytes one insert instruction carries.
const MAX_INSERT: usize = 0x7f;

/// `PRIME` to the power `BLOCK - 1`: what the byte leaving the rolling window contributed.
const OUT_FACTOR: u32 = {
    let mut f = 1u32;
    let mut i = 1;
    while i < BLOCK {
        f = f.wrapping_mul(PRIME);
        i += 1;
    }
    f
};

fn block_hash(block: &[u8]) -> u32 {
    block.iter().fold(0u32, |h, &b| {
        h.wrapping_mul(PRIME).wrapping_add(u32::from(b))
    })
}

fn roll(hash: u32, out: u8, into: u8) -> u32 {
    hash.wrapping_sub(u32::from(out).wrapping_mul(OUT_FACTOR))
        .wrapping_mul(PRIME)
        .wrapping_add(u32::from(into))
}

/// One indexed block of the base.
#[derive(Clone, Copy)]
struct Block {
    hash: u32,
    /// Where the block starts in the base.
    pos: u32,
    /// The next block of the same bucket, plus one (0 ends the chain).
    next: u32,
}

/// The blocks of a base, by hash: made once per base, used for any number of targets.
pub struct Index<'a> {
    base: &'a [u8],
    heads: Vec<u32>,
    blocks: Vec<Block>,
    shift: u32,
}

impl<'a> Index<'a> {
    /// Index `base`, which must be shorter than 4 GiB (copy offsets are 32 bits); `None`
    /// otherwise, and for a base too short to hold one block.
    pub fn new(base: &'a [u8]) -> Option<Self> {
        if base.len() < BLOCK || u32::try_from(base.len()).is_err() {
            return None;
        }
        let count = base.len() / BLOCK;
        let bits = count.next_power_of_two().trailing_zeros().max(4);
        let mut index = Index {
            base,
            heads: vec![0; 1 << bits],
            blocks: Vec::with_capacity(count),
            shift: 32 - bits,
        };
        // Blocks are chained newest first, so inserting from the end makes a bucket list the
        // earliest block first. A run of identical blocks is indexed once, at its start: a
        // match there extends over the whole run.
        let mut previous: Option<&[u8]> = None;
        for n in (0..count).rev() {
            let pos = n * BLOCK;
            let block = &base[pos..pos + BLOCK];
            if previous == Some(block) {
                if let Some(last) = index.blocks.last_mut() {
                    last.pos = pos as u32;
                }
                continue;
            }
            previous = Some(block);
            let hash = block_hash(block);
            let bucket = index.bucket(hash);
            index.blocks.push(Block {
                hash,
                pos: pos as u32,
                next: index.heads[bucket],
            });
            index.heads[bucket] = index.blocks.len() as u32;
        }
        Some(index)
    }

    fn bucket(&self, hash: u32) -> usize {
        (hash.wrapping_mul(0x9E37_79B1) >> self.shift) as usize
    }

    /// The longest match of `target[at..]` (whose first block hashes to `hash`) in the base,
    /// among the first candidates of its bucket: `(base position, length)`.
    fn longest_match(&self, hash: u32, target: &[u8], at: usize) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        let mut link = self.heads[self.bucket(hash)];
        let mut tried = 0;
        while link != 0 && tried < MAX_CANDIDATES {
            let block = self.blocks[link as usize - 1];
            link = block.next;
            tried += 1;
            if block.hash != hash {
                continue;
            }
            let pos = block.pos as usize;
            let len = common_prefix(&self.base[pos..], &target[at..]);
            if len >= BLOCK && best.is_none_or(|(_, l)| len > l) {
                best = Some((pos, len));
                if at + len == target.len() {
                    break;
                }
            }
        }
        best
    }
}

fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The delta that makes `target` from the base of `index`, or `None` when it would be longer
/// than `max_len` bytes (then the target is better sent whole).
pub fn encode(index: &Index<'_>, target: &[u8], max_len: usize) -> Option<Vec<u8>> {
    let base = index.base;
    let mut out = Vec::with_capacity(max_len.min(8192));
    put_size(&mut out, base.len());
    put_size(&mut out, target.len());
    // Target bytes from `pending` to `at` are not covered yet: they become inserts.
    let mut pending = 0;
    let mut at = 0;
    let mut hash = (target.len() >= BLOCK).then(|| block_hash(&target[..BLOCK]));
    while let Some(h) = hash {
        // What the pending bytes will cost as inserts already rules the delta out.
        if out.len() + (at - pending) > max_len {
            return None;
        }
        match index.longest_match(h, target, at) {
            Some((mut pos, mut len)) => {
                let mut start = at;
                while start > pending && pos > 0 && base[pos - 1] == target[start - 1] {
                    start -= 1;
                    pos -= 1;
                    len += 1;
                }
                put_insert(&mut out, &target[pending..start]);
                put_copy(&mut out, pos, len);
                at = start + len;
                pending = at;
                hash = (at + BLOCK <= target.len()).then(|| block_hash(&target[at..at + BLOCK]));
            }
            None => {
                hash = (at + BLOCK < target.len()).then(|| roll(h, target[at], target[at + BLOCK]));
                at += 1;
            }
        }
    }
    put_insert(&mut out, &target[pending..]);
    (out.len() <= max_len).then_some(out)
}

/// A size in the delta header: 7 bits per byte, least significant first.
fn put_size(out: &mut Vec<u8>, mut size: usize) {
    loop {
        let byte = (size & 0x7f) as u8;
        size >>= 7;
        if size == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn put_insert(out: &mut Vec<u8>, data: &[u8]) {
    for chunk in data.chunks(MAX_INSERT) {
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
}

/// Copy instructions for `len` bytes of the base at `pos`: a flag byte saying which offset and
/// size bytes follow, and only the non-zero ones.
fn put_copy(out: &mut Vec<u8>, mut pos: usize, mut len: usize) {
    while len > 0 {
        let n = len.min(MAX_COPY);
        let at = out.len();
        let mut op = 0x80u8;
        out.push(0);
        for i in 0..4 {
            let byte = (pos >> (8 * i)) as u8;
            if byte != 0 {
                op |= 1 << i;
                out.push(byte);
            }
        }
        // A size of 0x10000 is written as no size bytes at all.
        if n != MAX_COPY {
            for i in 0..3 {
                let byte = (n >> (8 * i)) as u8;
                if byte != 0 {
                    op |= 0x10 << i;
                    out.push(byte);
                }
            }
        }
        out[at] = op;
        pos += n;
        len -= n;
    }
}

/// Git's `patch_delta`: the target `delta` makes from `base`, into `out`. `None` when the
/// delta is malformed or does not fit `base` (its sizes, a copy beyond the base, an insert
/// beyond the delta, a reserved instruction): nothing it says is trusted.
pub fn apply(base: &[u8], delta: &[u8], out: &mut Vec<u8>) -> Option<()> {
    fn size(d: &[u8], i: &mut usize) -> Option<usize> {
        let (mut v, mut shift) = (0usize, 0u32);
        loop {
            let b = *d.get(*i)?;
            *i += 1;
            let part = usize::from(b & 0x7f);
            // Bits that would be shifted out make a size beyond usize.
            if shift > 0 && part >> (usize::BITS - shift) != 0 {
                return None;
            }
            v |= part << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return Some(v);
            }
            if shift >= usize::BITS {
                return None;
            }
        }
    }
    let mut i = 0;
    if size(delta, &mut i)? != base.len() {
        return None;
    }
    let expected = size(delta, &mut i)?;
    out.clear();
    // A hint only: the size is the delta's word, and a copy may repeat the base, so the
    // buffer grows past this as the instructions prove it must.
    out.reserve(expected.min(base.len().saturating_add(delta.len())));
    while i < delta.len() {
        let op = delta[i];
        i += 1;
        if op & 0x80 != 0 {
            let (mut off, mut len) = (0usize, 0usize);
            for k in 0..4 {
                if op & (1 << k) != 0 {
                    off |= usize::from(*delta.get(i)?) << (8 * k);
                    i += 1;
                }
            }
            for k in 0..3 {
                if op & (0x10 << k) != 0 {
                    len |= usize::from(*delta.get(i)?) << (8 * k);
                    i += 1;
                }
            }
            if len == 0 {
                len = 0x10000;
            }
            out.extend_from_slice(base.get(off..off.checked_add(len)?)?);
        } else if op != 0 {
            let len = usize::from(op);
            out.extend_from_slice(delta.get(i..i + len)?);
            i += len;
        } else {
            return None;
        }
        if out.len() > expected {
            return None;
        }
    }
    (out.len() == expected).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(base: &[u8], target: &[u8]) -> Option<usize> {
        let index = Index::new(base)?;
        let delta = encode(&index, target, usize::MAX).expect("no bound");
        let mut out = Vec::new();
        assert_eq!(apply(base, &delta, &mut out), Some(()));
        assert_eq!(out, target);
        Some(delta.len())
    }

    /// Deterministic pseudo-random bytes (xorshift).
    fn noise(n: usize, mut seed: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    #[test]
    fn an_edit_in_the_middle_is_two_copies_and_an_insert() {
        let base = noise(10_000, 1);
        let mut target = base.clone();
        target.splice(5000..5010, b"a new line\n".iter().copied());
        let len = roundtrip(&base, &target).expect("indexable");
        assert!(len < 40, "delta of {len} bytes");
    }

    #[test]
    fn targets_of_every_shape_come_back_exactly() {
        let base = noise(70_000, 7);
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"short".to_vec(),
            base.clone(),
            base[..15].to_vec(),
            noise(3000, 99),
            [&base[60_000..], &base[..60_000]].concat(),
            [&base[..], &base[..], b"tail"].concat(),
        ];
        // Long copies (beyond one instruction's 64 KiB) and offsets with zero bytes.
        cases.push([b"x".as_slice(), &base[256..68_000], &base[0x10000..]].concat());
        for target in &cases {
            roundtrip(&base, target).expect("indexable");
        }
        // Repetitive data: runs of one byte and short periods.
        let zeros = vec![0u8; 100_000];
        let len =
            roundtrip(&zeros, &[&zeros[..50_000], b"!", &zeros[..]].concat()).expect("indexable");
        assert!(len < 40, "delta of {len} bytes");
        let period: Vec<u8> = b"abcdefg".iter().copied().cycle().take(40_000).collect();
        roundtrip(&period, &period[3..]).expect("indexable");
    }

    #[test]
    fn a_delta_longer_than_the_bound_is_refused() {
        let base = noise(4096, 3);
        let index = Index::new(&base).expect("indexable");
        let unrelated = noise(4096, 4);
        assert!(encode(&index, &unrelated, 2048).is_none());
        assert!(encode(&index, &base, 2048).is_some());
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let base = b"0123456789abcdef0123456789abcdef".to_vec();
        let mut out = Vec::new();
        // Sizes: base 32, target 4; copy 4 bytes at 0.
        assert_eq!(apply(&base, &[32, 4, 0x90, 4], &mut out), Some(()));
        assert_eq!(out, b"0123");
        for (delta, why) in [
            (&[31u8, 4, 0x90, 4][..], "base size"),
            (&[32, 5, 0x90, 4][..], "target size"),
            (&[32, 4, 0x91, 30, 4][..], "copy beyond the base"),
            (&[32, 4, 0x91][..], "truncated copy"),
            (&[32, 4, 5, b'a'][..], "insert beyond the delta"),
            (&[32, 4, 0][..], "reserved instruction"),
            (&[32, 2, 0x90, 4][..], "more than the target"),
            (&[32][..], "no target size"),
            (&[0xff; 12][..], "a size beyond usize"),
        ] {
            assert_eq!(apply(&base, delta, &mut out), None, "{why}");
        }
    }

    #[test]
    fn bases_shorter_than_a_block_are_not_indexed() {
        assert!(Index::new(b"fifteen bytes!!").is_none());
        assert!(Index::new(b"sixteen bytes!!!").is_some());
    }
}
