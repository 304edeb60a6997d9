//! What `GET /api/v1/mirrors` and `smart-git-proxy mirrors` list: each mirror's size, packs,
//! record and pack-cache bytes, from the store (a running server) or from the disk alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{evict, record, root, Mirrors, Repo};

/// One mirror as the inventory lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Info {
    /// `host/path`
    pub repo: String,
    /// Bytes of its files.
    pub bytes: u64,
    /// Its pack files.
    pub packs: usize,
    /// When its last sync (or creation) ended, RFC 3339.
    pub last_sync: Option<String>,
    /// `ok` or `failed`.
    pub last_sync_outcome: Option<record::SyncOutcome>,
    /// When it was last served, RFC 3339.
    pub last_serve: Option<String>,
    /// Served only to clients whose credentials the upstream accepts (who they are is not
    /// kept).
    pub private: bool,
    /// Bytes of its packs in the pack cache.
    pub pack_cache_bytes: u64,
}

impl Info {
    fn new(repo: String, usage: evict::Usage, rec: &record::Record, pack_cache_bytes: u64) -> Info {
        // RFC 3339 ends with year 9999 (the formatter fails beyond it): a damaged record's
        // time is then unknown.
        let time = |ms: u64| {
            use std::fmt::Write;
            let mut text = String::new();
            write!(
                text,
                "{}",
                humantime::format_rfc3339_seconds(record::time_of(ms))
            )
            .ok()
            .map(|()| text)
        };
        // A mirror whose record knows only its last successful sync: one migrated from an
        // older release's marker.
        let last_sync_ms = rec.last_sync_ms.or(rec.last_success_ms);
        Info {
            repo,
            bytes: usage.bytes,
            packs: usage.packs,
            last_sync: last_sync_ms.and_then(time),
            last_sync_outcome: rec.last_sync_outcome,
            last_serve: rec.last_serve_ms.and_then(time),
            private: rec.private,
            pack_cache_bytes,
        }
    }
}

/// The mirrors under `root` as read from disk alone, sorted by name: what `smart-git-proxy
/// mirrors` prints beside a running server (whose serve times may be up to
/// [`record::SERVE_WRITE_INTERVAL`] behind). Call on a blocking thread.
pub fn inventory_on_disk(root: &Path, pack_cache_dir: &Path) -> std::io::Result<Vec<Info>> {
    let cached = crate::pack::cache::bytes_by_mirror_on_disk(pack_cache_dir)?;
    let mut out: Vec<Info> = root::scan(root)?
        .0
        .into_iter()
        .map(|dir| {
            let name = name_of(root, &dir);
            let cache = cached
                .get(&crate::pack::cache::MirrorId::of(&name))
                .copied()
                .unwrap_or(0);
            Info::new(name, evict::usage(&dir), &record::Record::read(&dir), cache)
        })
        .collect();
    out.sort_by(|a, b| a.repo.cmp(&b.repo));
    Ok(out)
}

/// `host/path` of the mirror at `dir` below `root`.
fn name_of(root: &Path, dir: &Path) -> String {
    let relative = dir.strip_prefix(root).unwrap_or(dir).to_string_lossy();
    relative
        .strip_suffix(".git")
        .unwrap_or(&relative)
        .to_owned()
}

impl Mirrors {
    /// One page of the inventory: up to `limit` mirrors whose names sort after `after`, in
    /// name order, and whether more follow. Call on a blocking thread (sizes not known yet are
    /// measured).
    pub fn inventory(
        &self,
        cache: Option<&crate::pack::cache::PackCache>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Info>, bool) {
        let root = &self.settings.root;
        let mut all: Vec<(String, PathBuf, Arc<Repo>)> = self
            .repos
            .lock()
            .iter()
            .map(|(dir, repo)| (name_of(root, dir), dir.clone(), Arc::clone(repo)))
            .filter(|(name, ..)| after.is_none_or(|a| name.as_str() > a))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let cached = cache.map(|c| c.bytes_by_mirror()).unwrap_or_default();
        let mut page = Vec::new();
        let mut more = false;
        for (name, dir, repo) in all {
            if !crate::repo::exists(&dir) {
                continue;
            }
            if page.len() == limit {
                more = true;
                break;
            }
            let cache = cached
                .get(&crate::pack::cache::MirrorId::of(&name))
                .copied()
                .unwrap_or(0);
            let rec = repo.record.lock().record.clone();
            page.push(Info::new(name, repo.usage(&dir), &rec, cache));
        }
        (page, more)
    }

    /// `host/path` of the mirror at `dir`.
    pub(super) fn name_of(&self, dir: &Path) -> String {
        name_of(&self.settings.root, dir)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::store;
    use super::*;
    use std::time::Instant;

    #[test]
    fn the_inventory_pages_through_every_mirror_in_name_order() {
        let root = tempfile::tempdir().unwrap();
        let mirrors = store(root.path());
        // Thousands of directories are slow to make on a busy disk: 2,000 in pages of 250.
        for i in 0..2_000 {
            let dir = root.path().join(format!("h/g{}/r{i}.git", i % 100));
            std::fs::create_dir_all(dir.join("objects")).unwrap();
            mirrors.repo(&dir);
        }
        let started = Instant::now();
        let (mut names, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let (page, more) = mirrors.inventory(None, cursor.as_deref(), 250);
            pages += 1;
            names.extend(page.into_iter().map(|m| m.repo));
            if !more {
                break;
            }
            cursor = names.last().cloned();
        }
        eprintln!("2,000 mirrors in {pages} pages: {:?}", started.elapsed());
        assert_eq!(pages, 8);
        assert_eq!(names.len(), 2_000);
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        assert_eq!(names[0], "h/g0/r0");
    }

    #[test]
    fn the_inventory_shows_times_beyond_year_9999_as_unknown() {
        let root = tempfile::tempdir().unwrap();
        let mirrors = store(root.path());
        let dir = root.path().join("h/r.git");
        std::fs::create_dir_all(dir.join("objects")).unwrap();
        // A damaged or hand-edited record: RFC 3339 has no year 10000.
        std::fs::write(
            dir.join(record::FILE),
            br#"{"last_sync_ms":300000000000000,"last_serve_ms":18446744073709551615}"#,
        )
        .unwrap();
        mirrors.repo(&dir);
        let (page, _) = mirrors.inventory(None, None, 10);
        assert_eq!(
            (page[0].last_sync.as_deref(), page[0].last_serve.as_deref()),
            (None, None)
        );
        let on_disk = inventory_on_disk(root.path(), &root.path().join(".pack-cache")).unwrap();
        assert_eq!(on_disk[0].last_serve, None);
    }
}
