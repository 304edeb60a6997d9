//! What is remembered of a mirror across restarts and shown to other processes
//! (`smart-git-proxy mirrors`): whether it is private, the time of its last successful sync
//! (so that a restart does not sync every mirror at once), the time and outcome of its last
//! sync, and the time it was last served, which is also its place in the eviction order.
//!
//! One small JSON file in the mirror, replaced atomically (written to a temporary, then
//! renamed), so that a reader or a crash never sees half of it. The server keeps the record in
//! memory and writes a serve at most once per [`SERVE_WRITE_INTERVAL`] per mirror (a busy mirror
//! is served many times a second), and every unwritten one when it shuts down.
//!
//! A mirror written by an older release keeps privacy and the last successful sync in two
//! marker files beside the record instead (`smart-git-proxy-private` and `-synced`). A record is
//! read together with any such marker, and `migrate` folds them into the record at start, so
//! that such a mirror keeps its privacy and is not synced again at once.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The record's file, in the mirror.
pub(super) const FILE: &str = "smart-git-proxy-state";
/// Prefix of its temporaries (removed with the other leftovers at start).
pub(super) const TMP_PREFIX: &str = "smart-git-proxy-state.tmp-";
/// An older release's marker of a private mirror: the file's existence.
pub(super) const LEGACY_PRIVATE: &str = "smart-git-proxy-private";
/// An older release's marker of the last successful sync: the file's modification time.
pub(super) const LEGACY_SYNCED: &str = "smart-git-proxy-synced";
/// At most one write of a serve per mirror per this interval.
pub const SERVE_WRITE_INTERVAL: Duration = Duration::from_secs(60);

/// How the last sync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncOutcome {
    /// The mirror was created or synced.
    Ok,
    /// The upstream failed; the mirror was served as it was.
    Failed,
}

impl SyncOutcome {
    /// `ok` or `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SyncOutcome::Ok => "ok",
            SyncOutcome::Failed => "failed",
        }
    }
}

/// The record of one mirror. Times are milliseconds since the Unix epoch: the eviction order
/// needs finer steps than seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Made or synced with credentials: served only to clients whose credentials the upstream
    /// accepts.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
    /// When the last successful sync (or the creation) ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_ms: Option<u64>,
    /// When the last sync (or the creation) ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_ms: Option<u64>,
    /// How it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_outcome: Option<SyncOutcome>,
    /// Why it failed, when it did (the upstream's message; never credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_error: Option<String>,
    /// When a request was last served from the mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_serve_ms: Option<u64>,
}

impl Record {
    /// The record of the mirror at `dir`, with what markers of an older release say (see the
    /// module documentation); empty when it has none or it cannot be read (a mirror adopted
    /// from elsewhere).
    pub fn read(dir: &Path) -> Record {
        let mut record: Record = std::fs::read(dir.join(FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        // Markers are newer than the record they sit beside: after a migration, only a release
        // that writes them (and not these fields) can have left them.
        let private = dir.join(LEGACY_PRIVATE).is_file();
        let synced = std::fs::metadata(dir.join(LEGACY_SYNCED)).and_then(|m| m.modified());
        if private || synced.is_ok() {
            record.private = private;
        }
        if let Some(ms) = synced.ok().and_then(ms_of) {
            record.last_success_ms = Some(ms);
        }
        record
    }

    /// Replace the record of the mirror at `dir` with this one, atomically.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{TMP_PREFIX}{}-{n}", std::process::id()));
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let written =
            std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, dir.join(FILE)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// When the mirror was last used: served, or else synced (created).
    pub fn last_used_ms(&self) -> u64 {
        self.last_serve_ms.or(self.last_sync_ms).unwrap_or(0)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    ms_of(SystemTime::now()).unwrap_or(0)
}

/// `time` in milliseconds since the Unix epoch; `None` before it.
fn ms_of(time: SystemTime) -> Option<u64> {
    time.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Fold the markers of an older release in the mirror at `dir` into its record (see the
/// module documentation): the record is written first, then the markers are removed, so that
/// a crash at any point leaves a mirror that reads the same and is migrated again at the next
/// start. Returns whether there was anything to migrate.
pub(super) fn migrate(dir: &Path) -> std::io::Result<bool> {
    let markers = [dir.join(LEGACY_SYNCED), dir.join(LEGACY_PRIVATE)];
    if !markers.iter().any(|m| m.exists()) {
        return Ok(false);
    }
    Record::read(dir).write(dir)?;
    // The privacy marker last: until the record that says so is written, it keeps the mirror
    // private.
    for marker in markers {
        match std::fs::remove_file(marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Change the record held for the mirror at `dir` and write it, under its lock so that writes
/// land in order.
pub(super) fn update(
    held: &parking_lot::Mutex<Held>,
    dir: &Path,
    change: impl FnOnce(&mut Record),
) -> std::io::Result<()> {
    let mut held = held.lock();
    change(&mut held.record);
    held.dirty = false;
    held.record.write(dir)
}

/// A time of a [`Record`] as a `SystemTime`.
pub fn time_of(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A mirror's record as the server holds it: the record, and what of it is on disk.
#[derive(Debug, Default)]
pub(super) struct Held {
    pub record: Record,
    /// When a serve was last written; `None`: not since start.
    pub serve_written: Option<Instant>,
    /// A serve is newer in memory than on disk.
    pub dirty: bool,
}

impl Held {
    /// Note a serve now; whether the record is to be written (see [`SERVE_WRITE_INTERVAL`]).
    pub fn served(&mut self) -> bool {
        self.record.last_serve_ms = Some(now_ms());
        let due = self
            .serve_written
            .is_none_or(|t| t.elapsed() >= SERVE_WRITE_INTERVAL);
        if due {
            self.serve_written = Some(Instant::now());
        }
        self.dirty = !due;
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_replaced_whole_and_missing_ones_are_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Record::read(dir.path()), Record::default());
        let record = Record {
            private: true,
            last_success_ms: Some(3),
            last_sync_ms: Some(5),
            last_sync_outcome: Some(SyncOutcome::Failed),
            last_sync_error: Some("upstream unreachable".into()),
            last_serve_ms: Some(7),
        };
        record.write(dir.path()).unwrap();
        assert_eq!(Record::read(dir.path()), record);
        assert_eq!(record.last_used_ms(), 7);
        // No temporary is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::write(dir.path().join(FILE), b"{not json").unwrap();
        assert_eq!(Record::read(dir.path()), Record::default());
    }

    #[test]
    fn the_markers_of_an_older_release_are_read_with_the_record_and_migrated_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        // A private mirror as that release leaves it.
        std::fs::write(
            dir.join(FILE),
            br#"{"last_sync_ms":5,"last_sync_outcome":"ok","last_serve_ms":7}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join(LEGACY_PRIVATE),
            b"the upstream lists refs only with credentials\n",
        )
        .unwrap();
        let synced = std::fs::File::create(dir.join(LEGACY_SYNCED)).unwrap();
        synced.set_modified(time_of(1_000_000)).unwrap();
        let expected = Record {
            private: true,
            last_success_ms: Some(1_000_000),
            last_sync_ms: Some(5),
            last_sync_outcome: Some(SyncOutcome::Ok),
            last_sync_error: None,
            last_serve_ms: Some(7),
        };
        assert_eq!(Record::read(dir), expected);
        assert!(migrate(dir).unwrap());
        assert!(!dir.join(LEGACY_PRIVATE).exists() && !dir.join(LEGACY_SYNCED).exists());
        assert_eq!(Record::read(dir), expected);
        assert!(!migrate(dir).unwrap(), "nothing is left to migrate");

        // A crash after the record was written and before the markers were removed: read
        // the same, and migrated again.
        std::fs::write(dir.join(LEGACY_PRIVATE), b"").unwrap();
        let synced = std::fs::File::create(dir.join(LEGACY_SYNCED)).unwrap();
        synced.set_modified(time_of(1_000_000)).unwrap();
        assert_eq!(Record::read(dir), expected);
        assert!(migrate(dir).unwrap());
        assert_eq!(Record::read(dir), expected);

        // A public mirror of that release has its sync marker only: the markers, newer than
        // the record, say it is public.
        let synced = std::fs::File::create(dir.join(LEGACY_SYNCED)).unwrap();
        synced.set_modified(time_of(2_000_000)).unwrap();
        let public = Record {
            private: false,
            last_success_ms: Some(2_000_000),
            ..expected
        };
        assert_eq!(Record::read(dir), public);
        assert!(migrate(dir).unwrap());
        assert_eq!(Record::read(dir), public);
        assert_eq!(
            std::fs::read_dir(dir).unwrap().count(),
            1,
            "the record alone"
        );
    }

    #[test]
    fn serves_are_written_at_most_once_per_interval() {
        let mut held = Held::default();
        assert!(held.served(), "the first serve since start is written");
        assert!(!held.served());
        assert!(held.dirty);
        held.serve_written = Instant::now().checked_sub(SERVE_WRITE_INTERVAL);
        assert!(held.served());
        assert!(!held.dirty);
    }
}
