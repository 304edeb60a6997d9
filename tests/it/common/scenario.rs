//! The setting most tests start from: a real upstream holding fixture repositories, and the
//! proxy in front of it (in-process, or the real binary), allowed to reach that upstream only.
//!
//! ```ignore
//! let Proxied { server, up } = Scenario::new()
//!     .fixture("o/basic", "basic")
//!     .stale_after(HOUR)
//!     .config(|c| c.maintenance_pack_threshold = 0)
//!     .start();
//! let (_work, clone) = clone_checked(&server.url_for(&up.segment(), "o/basic"));
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use smart_git_proxy::config::Config;
use tempfile::TempDir;

use super::upstream::Upstream;
use super::{assert_fsck, git, Running, Server};

/// An hour: a `SYNC_STALE_AFTER` that never comes due while a test runs, so that only what
/// the test does (a want-miss, a webhook, an admin request) syncs a mirror.
pub const HOUR: Duration = Duration::from_secs(3600);

/// How an adjustment of the in-process proxy's configuration is kept until it starts.
type Adjust = Box<dyn FnOnce(&mut Config) + Send>;

/// What to start: the upstream's repositories, then the proxy's settings.
#[derive(Default)]
pub struct Scenario {
    fixtures: Vec<(String, String)>,
    adjust: Vec<Adjust>,
    env: Vec<(String, String)>,
}

impl Scenario {
    /// An upstream without repositories, and a proxy on default settings that may reach it.
    pub fn new() -> Scenario {
        Scenario::default()
    }

    /// Upstream repository `name` (`group/repo`), built from fixture `fixture`.
    pub fn fixture(mut self, name: &str, fixture: &str) -> Scenario {
        self.fixtures.push((name.into(), fixture.into()));
        self
    }

    /// `SYNC_STALE_AFTER` of the in-process proxy.
    pub fn stale_after(self, after: Duration) -> Scenario {
        self.config(move |c| c.sync_stale_after = after.into())
    }

    /// Adjust the in-process proxy's configuration ([`Scenario::start`]), after
    /// `allowed_upstreams` was set to the upstream. Adjustments apply in the order given.
    pub fn config(mut self, adjust: impl FnOnce(&mut Config) + Send + 'static) -> Scenario {
        self.adjust.push(Box::new(adjust));
        self
    }

    /// A setting of the binary's environment ([`Scenario::start_binary`]), after
    /// `ALLOWED_UPSTREAMS`, which it may replace.
    pub fn proxy_env(mut self, key: &str, value: &str) -> Scenario {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The upstream with its repositories.
    fn upstream(&self) -> Upstream {
        let up = Upstream::start();
        for (name, fixture) in &self.fixtures {
            up.add_fixture(name, fixture);
        }
        up
    }

    /// Start the upstream, then the proxy in this process in front of it.
    pub fn start(self) -> Proxied {
        let up = self.upstream();
        let adjust = self.adjust;
        let server = Server::in_front_of(&up, move |c| adjust.into_iter().for_each(|a| a(c)));
        Proxied { server, up }
    }

    /// Start the upstream, then the real binary in front of it, over a new mirror directory.
    pub fn start_binary(self) -> ProxiedBinary {
        let up = self.upstream();
        let mirror = tempfile::tempdir().expect("mirror dir");
        let mut env = vec![("ALLOWED_UPSTREAMS".to_owned(), up.allowed())];
        env.extend(self.env);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let running = Running::start(mirror.path(), &env);
        ProxiedBinary {
            running,
            mirror,
            up,
        }
    }
}

impl Server {
    /// An in-process proxy over a new mirror directory that may reach `up` (and only `up`),
    /// adjusting the configuration first.
    pub fn in_front_of(up: &Upstream, adjust: impl FnOnce(&mut Config)) -> Server {
        let allowed = up.allowed();
        Server::start_with(move |c| {
            c.allowed_upstreams = allowed;
            adjust(c);
        })
    }
}

/// The in-process proxy and its upstream. The server comes first, so that it stops before the
/// upstream does.
pub struct Proxied {
    pub server: Server,
    pub up: Upstream,
}

impl Proxied {
    /// The proxy's clone URL of upstream repository `name`.
    pub fn url(&self, name: &str) -> String {
        self.server.url_for(&self.up.segment(), name)
    }

    /// Where the upstream keeps repository `name`.
    pub fn upstream_dir(&self, name: &str) -> PathBuf {
        self.up.repo_dir(name)
    }

    /// Where the proxy mirrors upstream repository `name`.
    pub fn mirror_dir(&self, name: &str) -> PathBuf {
        mirror_dir(self.server.mirror.path(), &self.up, name)
    }
}

/// The real binary and its upstream; the binary is killed first, then its mirror directory
/// goes.
pub struct ProxiedBinary {
    pub running: Running,
    pub mirror: TempDir,
    pub up: Upstream,
}

impl ProxiedBinary {
    /// The proxy's clone URL of upstream repository `name`.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{}/{name}", self.running.addr, self.up.segment())
    }

    /// Where the proxy mirrors upstream repository `name`.
    pub fn mirror_dir(&self, name: &str) -> PathBuf {
        mirror_dir(self.mirror.path(), &self.up, name)
    }
}

/// Where a proxy over `root` mirrors repository `name` of `up`.
fn mirror_dir(root: &Path, up: &Upstream, name: &str) -> PathBuf {
    root.join(up.segment()).join(format!("{name}.git"))
}

/// `git clone --mirror` of `url` into a new directory, which `git fsck --strict` accepts; the
/// directory and the clone in it.
pub fn clone_checked(url: &str) -> (TempDir, PathBuf) {
    let work = tempfile::tempdir().expect("temp dir");
    git(work.path(), &["clone", "-q", "--mirror", url, "c"]);
    let clone = work.path().join("c");
    assert_fsck(&clone);
    (work, clone)
}
