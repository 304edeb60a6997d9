//! Pack reuse (git's `pack.allowPackReuse`): a full clone of a maintained mirror is the first
//! region of its consolidated pack, sent as it lies on disk.
//!
//! Maintenance ([`crate::mirror::maintain`]) writes the objects reachable from `HEAD`,
//! `refs/heads/*` and `refs/tags/*` first, with every delta's base inside that region, and
//! records in `smart-git-proxy-layout` (in the mirror) which pack it wrote, how many objects
//! the region holds, where it ends, and a digest of the ref targets it was made for. A request
//! that wants exactly those targets (a clone), with no haves, shallow boundary or filter, and
//! that takes offset deltas, is answered with a fresh pack header (the region's object count),
//! the region's bytes, and a trailer hashed while they stream: no object is looked at.
//!
//! A mirror the proxy created keeps the pack its first fetch wrote; when every object of that
//! pack is one a clone needs (a repository with no refs beyond heads and tags), the maintenance
//! after creation records the whole pack as the region. Such a region is sent as the file is,
//! header and trailer included: nothing is hashed either.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use gix::ObjectId;

use crate::protocol::advert::Refs;

/// The file, in the mirror directory, that describes the consolidated pack's first region.
const LAYOUT_FILE: &str = "smart-git-proxy-layout";

/// The first region of a consolidated pack, valid for the refs it was written for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Region {
    /// The pack's file name in `objects/pack`.
    pub pack: String,
    /// Objects in the region.
    pub objects: u32,
    /// Offset of the first byte after the region.
    pub end: u64,
    /// [`tips_digest`] of the ref targets the region holds the objects of.
    pub tips: String,
}

/// Whether a clone wants the ref `name`: `HEAD`, `refs/heads/*` and `refs/tags/*`.
pub fn is_clone_ref(name: &[u8]) -> bool {
    name == b"HEAD" || name.starts_with(b"refs/heads/") || name.starts_with(b"refs/tags/")
}

/// The targets of the refs a clone wants.
pub fn clone_tips(refs: &Refs) -> Vec<ObjectId> {
    refs.refs
        .iter()
        .filter(|r| is_clone_ref(&r.name))
        .map(|r| r.target)
        .collect()
}

/// A digest of a set of object ids (order and repetition do not matter).
pub fn tips_digest(ids: &[ObjectId]) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut h = gix::hash::hasher(gix::hash::Kind::Sha1);
    for id in &ids {
        h.update(id.as_bytes());
    }
    h.try_finalize()
        .map(|d| d.to_hex().to_string())
        .unwrap_or_default()
}

/// The file that records the region of the mirror at `dir`.
pub fn layout_path(dir: &Path) -> PathBuf {
    dir.join(LAYOUT_FILE)
}

/// Record `region` for the mirror at `dir`.
pub fn write_layout(dir: &Path, region: &Region) -> std::io::Result<()> {
    let tmp = dir.join(format!("{LAYOUT_FILE}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(region).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, dir.join(LAYOUT_FILE))
}

/// Forget the layout (the packs are about to change).
pub fn remove_layout(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(LAYOUT_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The reusable region of the mirror at `dir` with `refs`: when the layout's pack is still
/// there and the clone tips are those it was written for.
pub fn read_layout(dir: &Path, refs: &Refs) -> Option<(Region, PathBuf)> {
    let region: Region =
        serde_json::from_slice(&std::fs::read(dir.join(LAYOUT_FILE)).ok()?).ok()?;
    let path = dir.join("objects/pack").join(&region.pack);
    let valid = !region.pack.contains('/')
        && path.is_file()
        && region.tips == tips_digest(&clone_tips(refs));
    valid.then_some((region, path))
}

/// Why a reused region could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the pack failed (or the flag to stop was set).
    #[error(transparent)]
    Pack(super::Error),
    /// Writing to the client failed.
    #[error("writing the pack")]
    Client(#[source] std::io::Error),
}

/// Stream `region` of the pack `file` (opened by the caller, so that a pack maintenance just
/// replaced is noticed before anything is sent) to `out` as a pack of its own; the bytes
/// written.
pub fn stream(
    region: &Region,
    mut file: std::fs::File,
    mut out: impl Write,
    interrupt: &AtomicBool,
) -> Result<u64, Error> {
    let pack_err =
        |e: std::io::Error| Error::Pack(super::Error::file(format!("reusing {}", region.pack))(e));
    let mut header = [0u8; 12];
    file.read_exact(&mut header).map_err(pack_err)?;
    if &header[..4] != b"PACK" || header[4..8] != 2u32.to_be_bytes() {
        return Err(pack_err(std::io::Error::other("not a version 2 pack")));
    }
    let len = file.metadata().map_err(pack_err)?.len();
    let whole = header[8..12] == region.objects.to_be_bytes() && len == region.end + TRAILER;
    if whole {
        // The region is the whole pack: its own trailer ends it, and nothing is hashed. A pack
        // damaged on disk then fails the client's check of that trailer instead of being
        // passed off under a fresh one.
        out.write_all(&header).map_err(Error::Client)?;
        copy(&mut file, len - 12, &mut out, None, interrupt, &pack_err)?;
        return Ok(len);
    }
    header[8..12].copy_from_slice(&region.objects.to_be_bytes());
    let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
    hasher.update(&header);
    out.write_all(&header).map_err(Error::Client)?;
    copy(
        &mut file,
        region.end.saturating_sub(12),
        &mut out,
        Some(&mut hasher),
        interrupt,
        &pack_err,
    )?;
    let trailer = hasher.try_finalize().map_err(|e| {
        Error::Pack(super::Error::Hash {
            what: "a reused pack",
            source: e.into(),
        })
    })?;
    out.write_all(trailer.as_bytes()).map_err(Error::Client)?;
    Ok(region.end + TRAILER)
}

/// Bytes of a pack's trailer (its SHA-1).
pub(crate) const TRAILER: u64 = 20;

/// Copy the next `len` bytes of `file` to `out`, hashing them into `hasher` when there is one.
fn copy(
    file: &mut std::fs::File,
    len: u64,
    out: &mut impl Write,
    mut hasher: Option<&mut gix::hash::Hasher>,
    interrupt: &AtomicBool,
    pack_err: &dyn Fn(std::io::Error) -> Error,
) -> Result<(), Error> {
    let mut left = len;
    let mut buf = vec![0u8; 256 * 1024];
    while left > 0 {
        if interrupt.load(Ordering::Relaxed) {
            return Err(Error::Pack(super::Error::Interrupted));
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = file.read(&mut buf[..want]).map_err(pack_err)?;
        if n == 0 {
            return Err(pack_err(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(&buf[..n]);
        }
        out.write_all(&buf[..n]).map_err(Error::Client)?;
        left -= n as u64;
    }
    Ok(())
}
