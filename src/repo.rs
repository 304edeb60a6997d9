//! The repository resolver: maps a request path to a bare repository under the mirror
//! directory ([`path`]), opens it with gix, and lists its refs for the advertisements.
//!
//! It knows nothing of HTTP beyond the path string, and nothing of upstreams.

pub mod path;

pub use path::{resolve, Service, Target};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use gix::bstr::{BString, ByteSlice};
use gix::refs::TargetRef;

use crate::protocol::advert::Refs;
use crate::protocol::Ref;

/// Errors reading a repository.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// There is no repository at the resolved location.
    #[error("repository not found")]
    NotFound,
    /// gix could not open or read the repository.
    #[error("{context}")]
    Git {
        /// What we were doing.
        context: &'static str,
        /// gix's error.
        #[source]
        source: crate::pack::Source,
    },
}

impl Error {
    pub(crate) fn git<E: Into<crate::pack::Source>>(
        context: &'static str,
    ) -> impl FnOnce(E) -> Error {
        move |e| Error::Git {
            context,
            source: e.into(),
        }
    }
}

/// Whether `dir` looks like a bare repository (cheap: one `stat`).
pub fn exists(dir: &Path) -> bool {
    dir.join("objects").is_dir()
}

/// Open the bare repository at `dir`, ignoring any configuration outside of it.
pub fn open(dir: &Path) -> Result<gix::Repository, Error> {
    if !exists(dir) {
        return Err(Error::NotFound);
    }
    let mut repo = gix::open_opts(dir, gix::open::Options::isolated())
        .map_err(Error::git("opening repository"))?;
    repo.object_cache_size_if_unset(16 * 1024 * 1024);
    Ok(repo)
}

/// Refs with longer names are not advertised: every pkt-line must stay under 65,516 bytes,
/// and the first v0 line carries the capabilities and, in `ls-refs`, the symref target too.
pub(crate) const MAX_REF_NAME_LEN: usize = 16 * 1024;

/// Peeled targets already known, by tag id: tags never change, so a snapshot rebuilt after a
/// sync peels only the tags that are new.
pub type PeelMemo = gix::hashtable::HashMap<gix::ObjectId, Option<gix::ObjectId>>;

/// List the refs of `repo` for advertisement: `HEAD` first (when it resolves), then all refs
/// sorted by name, with annotated tags peeled. Refs whose target is missing are skipped, as
/// git skips broken refs.
pub fn list_refs(repo: &gix::Repository) -> Result<Refs, Error> {
    list_refs_memo(repo, &PeelMemo::default())
}

fn list_refs_memo(repo: &gix::Repository, memo: &PeelMemo) -> Result<Refs, Error> {
    let peel = |id: gix::ObjectId| match memo.get(&id) {
        Some(peeled) => Ok(*peeled),
        None => peel(repo, id),
    };
    let mut out = Refs::default();
    let head = repo.head().map_err(Error::git("reading HEAD"))?;
    match &head.kind {
        gix::head::Kind::Symbolic(r) => {
            if let Some(id) = r.target.try_id() {
                out.refs.push(Ref {
                    name: "HEAD".into(),
                    target: id.to_owned(),
                    peeled: peel(id.to_owned())?,
                    symref_target: Some(r.name.as_bstr().to_owned()),
                });
            }
        }
        gix::head::Kind::Unborn(name) => out.unborn_head = Some(name.as_bstr().to_owned()),
        gix::head::Kind::Detached { target, .. } => out.refs.push(Ref {
            name: "HEAD".into(),
            target: *target,
            peeled: peel(*target)?,
            symref_target: None,
        }),
    }
    let platform = repo.references().map_err(Error::git("listing refs"))?;
    let iter = platform.all().map_err(Error::git("listing refs"))?;
    let mut refs = Vec::new();
    for r in iter {
        let mut r = r.map_err(Error::git("reading a ref"))?;
        let name: BString = r.name().as_bstr().to_owned();
        if name.len() > MAX_REF_NAME_LEN {
            // It would not fit a pkt-line together with its object id and capabilities.
            tracing::warn!(len = name.len(), "skipping a ref with an over-long name");
            continue;
        }
        let symref_target = match r.target() {
            TargetRef::Symbolic(n) => Some(n.as_bstr().to_owned()),
            TargetRef::Object(_) => None,
        };
        let Ok(target) = r.follow_to_object() else {
            continue;
        };
        let target = target.detach();
        if !memo.contains_key(&target) && !repo.has_object(target) {
            continue;
        }
        refs.push(Ref {
            name,
            target,
            peeled: peel(target)?,
            symref_target,
        });
    }
    refs.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    out.refs.extend(refs);
    Ok(out)
}

/// For an annotated tag, the object at the end of its tag chain.
fn peel(repo: &gix::Repository, id: gix::ObjectId) -> Result<Option<gix::ObjectId>, Error> {
    let header = repo
        .find_header(id)
        .map_err(Error::git("reading a ref's object"))?;
    if header.kind() != gix::object::Kind::Tag {
        return Ok(None);
    }
    let object = repo.find_object(id).map_err(Error::git("reading a tag"))?;
    let peeled = object
        .peel_tags_to_end()
        .map_err(Error::git("peeling a tag"))?;
    Ok(Some(peeled.id))
}

/// Everything a request reads that changes only when the repository does: built once per
/// sync (and at start), then shared read-only by every request through an `Arc`. Requests
/// never reopen the repository, list refs or peel tags.
pub struct Snapshot {
    repo: gix::ThreadSafeRepository,
    refs: Refs,
    /// The v0 advertisement after its `# service=` preamble (and v1's version line).
    advert_v0: bytes::Bytes,
    /// Every ref target and peeled target, sorted, for reachability checks of wants.
    tips: Box<[gix::ObjectId]>,
    /// What was on disk when the snapshot was built: see [`Snapshot::is_current`].
    packs: Vec<std::ffi::OsString>,
    /// The consolidated pack's first region, when it holds exactly what a clone of these refs
    /// needs ([`crate::pack::reuse`]).
    clone_region: Option<(crate::pack::reuse::Region, PathBuf)>,
    /// Which version of the file that records it: maintenance writes it after the bitmap.
    layout_version: Option<FileVersion>,
    /// The reachability bitmap found when the snapshot was built, mapped; requests decode
    /// what they need of it into the shared bitmap cache.
    bitmap_path: Option<PathBuf>,
    /// Which version of that file: maintenance replaces the bitmap of a pack it keeps.
    bitmap_version: Option<FileVersion>,
    bitmap: Option<Arc<crate::pack::bitmap::File>>,
    /// Names what the tips reach in the bitmap cache ([`Snapshot::reachable`]).
    reachable_key: u64,
    /// Whether that was asked for.
    reachable_asked: std::sync::atomic::AtomicBool,
    /// [`Snapshot::heap_bytes`]
    heap_bytes: usize,
}

/// What a snapshot holds besides its refs, advertisement and tips: the repository handle
/// (measured: 17 KiB) and small fields.
const SNAPSHOT_FIXED_BYTES: usize = 24 * 1024;

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(file) = &self.bitmap {
            if self
                .reachable_asked
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                crate::pack::bitmap::Reachable::forget(file, self.reachable_key);
            }
        }
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("refs", &self.refs.refs.len())
            .field("packs", &self.packs.len())
            .finish()
    }
}

impl Snapshot {
    /// Read the repository at `dir`. Tags already peeled in `previous` are not peeled again.
    pub fn open(dir: &Path, previous: Option<&Snapshot>) -> Result<Snapshot, Error> {
        let packs = pack_names(dir);
        let repo = open(dir)?;
        let mut refs = list_refs_memo(
            &repo,
            &previous.map(Snapshot::peel_memo).unwrap_or_default(),
        )?;
        // Kept as long as the mirror is served: no room to grow.
        refs.refs.shrink_to_fit();
        let mut advert = Vec::new();
        crate::protocol::advert::v0_refs(&mut advert, &refs);
        advert.shrink_to_fit();
        let mut tips: Vec<gix::ObjectId> = refs
            .refs
            .iter()
            .flat_map(|r| [Some(r.target), r.peeled])
            .flatten()
            .collect();
        tips.sort_unstable();
        tips.dedup();
        let layout_version = FileVersion::of(&crate::pack::reuse::layout_path(dir));
        let clone_region = crate::pack::reuse::read_layout(dir, &refs);
        let bitmap_path = bitmap_file(dir);
        let bitmap_version = bitmap_path.as_deref().and_then(FileVersion::of);
        // Mapped now, off the request path (the snapshot is built on a blocking thread); the
        // bitmap belongs to its pack, which a sync leaves alone, so one already mapped stays.
        let bitmap = match previous
            .filter(|p| p.bitmap_path == bitmap_path && p.bitmap_version == bitmap_version)
        {
            Some(p) => p.bitmap.clone(),
            None => bitmap_path.as_deref().and_then(open_bitmap),
        };
        // A heap block costs its size and about 16 bytes of the allocator's.
        let block = |len: usize| len + 16;
        let heap_bytes = SNAPSHOT_FIXED_BYTES
            + refs.refs.capacity() * std::mem::size_of::<Ref>()
            + refs
                .refs
                .iter()
                .map(|r| {
                    block(r.name.capacity())
                        + r.symref_target.as_ref().map_or(0, |t| block(t.capacity()))
                })
                .sum::<usize>()
            + block(advert.capacity())
            + block(tips.len() * std::mem::size_of::<gix::ObjectId>());
        Ok(Snapshot {
            bitmap_path,
            bitmap_version,
            bitmap,
            reachable_key: crate::pack::bitmap::Reachable::owner(),
            reachable_asked: Default::default(),
            heap_bytes,
            repo: repo.into_sync(),
            refs,
            advert_v0: advert.into(),
            tips: tips.into_boxed_slice(),
            packs,
            clone_region,
            layout_version,
        })
    }

    /// Roughly the memory it holds (its refs, advertisement, tips and repository handle; not
    /// what the bitmap cache holds for it).
    pub fn heap_bytes(&self) -> usize {
        self.heap_bytes
    }

    /// Whether the repository on disk still has the refs, packs, bitmap and pack layout of this
    /// snapshot: someone else (an operator's `git fetch`, maintenance) may have changed it.
    /// Reads the refs (packed and loose), the names of the pack indexes and the versions of the
    /// bitmap and layout files; tags are not peeled again.
    pub fn is_current(&self, dir: &Path) -> Result<bool, Error> {
        if pack_names(dir) != self.packs {
            return Ok(false);
        }
        let bitmap = bitmap_file(dir);
        if bitmap != self.bitmap_path
            || bitmap.as_deref().and_then(FileVersion::of) != self.bitmap_version
            || FileVersion::of(&crate::pack::reuse::layout_path(dir)) != self.layout_version
        {
            return Ok(false);
        }
        let repo = open(dir)?;
        Ok(list_refs_memo(&repo, &self.peel_memo())?.refs == self.refs.refs)
    }

    fn peel_memo(&self) -> PeelMemo {
        self.refs
            .refs
            .iter()
            .map(|r| (r.target, r.peeled))
            .collect()
    }

    /// A repository handle for this thread (cheap: it shares the object store).
    pub fn repo(&self) -> gix::Repository {
        let mut repo = self.repo.to_thread_local();
        repo.object_cache_size_if_unset(16 * 1024 * 1024);
        repo
    }

    /// The refs: `HEAD` first when it resolves, then the others sorted by name.
    pub fn refs(&self) -> &Refs {
        &self.refs
    }

    /// The ref named `name` (binary search).
    pub fn find_ref(&self, name: &[u8]) -> Option<&Ref> {
        self.refs.find(name)
    }

    /// The v0 advertisement's refs and capabilities, prebuilt.
    pub fn advert_v0(&self) -> bytes::Bytes {
        self.advert_v0.clone()
    }

    /// Whether `id` is the target of a ref or of a peeled tag.
    pub fn is_tip(&self, id: &gix::ObjectId) -> bool {
        self.tips.binary_search(id).is_ok()
    }

    /// Every ref target and peeled tag target.
    pub fn tips(&self) -> impl Iterator<Item = &gix::ObjectId> {
        self.tips.iter()
    }

    /// The repository's reachability bitmap, decoded for a request (from the shared bitmap
    /// cache when another request decoded it recently); `None` when there is none or it cannot
    /// be read (then the planner walks, and the reason is logged once).
    pub fn bitmap(&self) -> Option<Arc<crate::pack::bitmap::Index>> {
        self.bitmap.as_ref()?.load()
    }

    /// Everything the tips reach, from the bitmap (computed on first use, and kept in the
    /// bitmap cache while it is used); `Ok(None)` when there is no bitmap or it does not cover
    /// the tips.
    pub fn reachable(
        &self,
        db: &crate::pack::Db,
        interrupt: &std::sync::atomic::AtomicBool,
    ) -> Result<Option<crate::pack::bitmap::Reachable>, crate::pack::Error> {
        let Some(index) = self.bitmap() else {
            return Ok(None);
        };
        self.reachable_asked
            .store(true, std::sync::atomic::Ordering::Relaxed);
        crate::pack::bitmap::Reachable::cached(
            db,
            index,
            self.reachable_key,
            || self.tips.to_vec(),
            interrupt,
        )
    }

    /// The region of the consolidated pack a clone of this snapshot can be sent verbatim from,
    /// and the pack's path.
    pub fn clone_region(&self) -> Option<&(crate::pack::reuse::Region, PathBuf)> {
        self.clone_region.as_ref()
    }
}

/// A file's identity and modification time: a file replaced by rename has another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileVersion {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileVersion {
    fn of(path: &Path) -> Option<FileVersion> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileVersion {
            dev: m.dev(),
            ino: m.ino(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
        })
    }
}

/// Map the bitmap at `path`; `None` (and a warning) when it cannot be used.
fn open_bitmap(path: &Path) -> Option<Arc<crate::pack::bitmap::File>> {
    match crate::pack::bitmap::File::open(path) {
        Ok(file) => {
            tracing::debug!(?file, "bitmap mapped");
            Some(Arc::new(file))
        }
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the reachability bitmap");
            None
        }
    }
}

/// Read the bitmap at `path` and decode it for use now; `None` (and a warning) when it cannot
/// be used.
pub(crate) fn load_bitmap(path: &Path) -> Option<Arc<crate::pack::bitmap::Index>> {
    open_bitmap(path)?.load()
}

/// The first `.bitmap` in the repository at `dir` whose pack and index are there (git, too,
/// uses one bitmap per repository).
pub fn bitmap_file(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join("objects/pack"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "bitmap")
                && p.with_extension("idx").is_file()
                && p.with_extension("pack").is_file()
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The names of the pack indexes of the repository at `dir`, sorted.
fn pack_names(dir: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir.join("objects/pack"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().ends_with(".idx"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
