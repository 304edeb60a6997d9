//! Request paths: which repository under `MIRROR_DIR` a path names, and which Git endpoint
//! below it. Paths are taken raw (percent-encoding is refused, not decoded) and bounded, so
//! that a client can neither leave the mirror directory nor make deep or long paths.

use std::path::{Path, PathBuf};

/// What a request path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Service {
    /// `GET …/info/refs?service=…`
    InfoRefs,
    /// `POST …/git-upload-pack`
    UploadPack,
    /// `POST …/git-receive-pack`, which this read-only server refuses.
    ReceivePack,
    /// `…/info/lfs/…`: Git LFS, passed through to the upstream. The field is the path from
    /// `/info/lfs` on.
    Lfs(String),
}

/// A request path resolved to a repository location and a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `{host}/{path}` without `.git`, as used in logs and messages.
    pub name: String,
    /// `{MIRROR_DIR}/{host}/{path}.git`
    pub dir: PathBuf,
    /// The endpoint below the repository.
    pub service: Service,
}

/// Why a request path does not name a repository.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The path does not end in a Git smart-HTTP endpoint.
    #[error("not a Git smart-HTTP endpoint: {0}")]
    UnknownEndpoint(String),
    /// The repository part of the path is unsafe or malformed.
    #[error("invalid repository path '{path}': {reason}")]
    InvalidPath {
        /// The offending path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The longest repository path (`{host}/{path}`) accepted: each segment becomes a directory,
/// so a client must not be able to make deep or long paths. GitLab nests groups 20 deep.
const MAX_PATH_BYTES: usize = 1024;
const MAX_SEGMENTS: usize = 24;
/// A file name's limit on common file systems.
const MAX_SEGMENT_BYTES: usize = 255;

/// Resolve `uri_path` (the raw, still percent-encoded path of the request) against `root`.
pub fn resolve(root: &Path, uri_path: &str) -> Result<Target, Error> {
    let lfs = uri_path
        .find("/info/lfs")
        .filter(|at| matches!(uri_path.as_bytes().get(at + 9), None | Some(b'/')))
        .map(|at| (&uri_path[..at], Service::Lfs(uri_path[at..].to_owned())));
    let (repo_part, service) = lfs
        .or_else(|| {
            [
                ("/info/refs", Service::InfoRefs),
                ("/git-upload-pack", Service::UploadPack),
                ("/git-receive-pack", Service::ReceivePack),
            ]
            .into_iter()
            .find_map(|(suffix, service)| uri_path.strip_suffix(suffix).map(|rest| (rest, service)))
        })
        .ok_or_else(|| Error::UnknownEndpoint(uri_path.to_owned()))?;

    let invalid = |reason| Error::InvalidPath {
        path: repo_part.to_owned(),
        reason,
    };
    if let Service::Lfs(suffix) = &service {
        // The suffix is appended to the upstream URL: it must not climb out of `info/lfs`.
        let unsafe_suffix = suffix.contains(['%', '\\'])
            || suffix.chars().any(char::is_control)
            || suffix
                .split('/')
                .skip(1)
                .any(|s| s.is_empty() || s == "." || s == "..");
        if unsafe_suffix {
            return Err(invalid("unsafe Git LFS path"));
        }
    }
    let repo_part = repo_part.strip_prefix('/').unwrap_or(repo_part);
    if repo_part.contains('%') {
        return Err(invalid("percent-encoded characters are not allowed"));
    }
    if repo_part.contains('\\') {
        return Err(invalid("backslashes are not allowed"));
    }
    if repo_part.chars().any(char::is_control) {
        return Err(invalid("control characters are not allowed"));
    }
    if repo_part.len() > MAX_PATH_BYTES {
        return Err(invalid("longer than 1024 bytes"));
    }
    let mut segments: Vec<&str> = repo_part.split('/').collect();
    if segments.len() > MAX_SEGMENTS {
        return Err(invalid("more than 24 segments"));
    }
    if segments.iter().any(|s| s.len() > MAX_SEGMENT_BYTES) {
        return Err(invalid("a segment is longer than 255 bytes"));
    }
    if segments.len() < 2 {
        return Err(invalid("expected {host}/{path}"));
    }
    if segments.iter().any(|s| s.is_empty()) {
        return Err(invalid("empty path segment"));
    }
    if segments.iter().any(|s| *s == "." || *s == "..") {
        return Err(invalid("'.' and '..' segments are not allowed"));
    }
    // Dot-prefixed names are our temporaries (and hidden files); a `.git` directory in the
    // middle would nest a mirror inside another repository.
    if segments.iter().any(|s| s.starts_with('.')) {
        return Err(invalid("segments starting with '.' are not allowed"));
    }
    if segments[..segments.len() - 1]
        .iter()
        .any(|s| s.ends_with(".git"))
    {
        return Err(invalid("only the last segment may end in .git"));
    }
    let last = segments.pop().unwrap_or_default();
    let last = last.strip_suffix(".git").unwrap_or(last);
    if last.is_empty() || last == "." || last == ".." {
        return Err(invalid("empty repository name"));
    }
    // Host names are case-insensitive: `GitHub.com` and `github.com` are one mirror.
    let host = segments[0].to_ascii_lowercase();
    segments[0] = &host;
    let mut dir = root.to_path_buf();
    for s in &segments {
        dir.push(s);
    }
    dir.push(format!("{last}.git"));
    segments.push(last);
    Ok(Target {
        name: segments.join("/"),
        dir,
        service,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: &str) -> Target {
        resolve(Path::new("/m"), path).unwrap()
    }

    #[test]
    fn maps_paths_to_mirror_directories() {
        let t = ok("/github.com/o/r/info/refs");
        assert_eq!(t.dir, Path::new("/m/github.com/o/r.git"));
        assert_eq!(t.name, "github.com/o/r");
        assert_eq!(t.service, Service::InfoRefs);
        assert_eq!(
            ok("/github.com/o/r.git/git-upload-pack").dir,
            Path::new("/m/github.com/o/r.git")
        );
        assert_eq!(
            ok("/gitlab.com/a/b/c/repo/git-receive-pack").service,
            Service::ReceivePack
        );
        assert_eq!(
            ok("/gitlab.com/a/b/c/repo.git/info/refs").dir,
            Path::new("/m/gitlab.com/a/b/c/repo.git")
        );
        let spelled = ok("/GitHub.COM/o/r/info/refs");
        assert_eq!(spelled.dir, Path::new("/m/github.com/o/r.git"));
        assert_eq!(spelled.name, "github.com/o/r");
        assert_eq!(ok("/LOCALHOST:9/o/r/info/refs").name, "localhost:9/o/r");
        let lfs = ok("/github.com/o/r.git/info/lfs/objects/batch");
        assert_eq!(lfs.service, Service::Lfs("/info/lfs/objects/batch".into()));
        assert_eq!(lfs.name, "github.com/o/r");
        assert!(resolve(Path::new("/m"), "/github.com/o/r/info/lfsx").is_err());
    }

    #[test]
    fn rejects_unsafe_paths() {
        for bad in [
            "/github.com/../etc/info/refs",
            "/github.com/o/../../x/info/refs",
            "/github.com/./r/info/refs",
            "/github.com//r/info/refs",
            "/github.com/o/%2e%2e/info/refs",
            "/github.com/o\\r/info/refs",
            "/github.com/o/r\u{1}/info/refs",
            "/github.com/info/refs",
            "/github.com/o/.git/info/refs",
            "/github.com/o/../info/refs",
            "/github.com/o/r.git/objects/x/info/refs",
            "/github.com/o/.smart-git-proxy-tmp-r.git-1-0/info/refs",
            "/github.com/.hidden/r/info/refs",
            "/github.com/o/r.git/info/lfs/../../../o2/r2.git/git-receive-pack",
            "/github.com/o/r.git/info/lfs/%2e%2e/%2e%2e/api",
            "/github.com/o/r.git/info/lfs//objects",
        ] {
            assert!(
                matches!(
                    resolve(Path::new("/m"), bad),
                    Err(Error::InvalidPath { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            resolve(Path::new("/m"), "/github.com/o/r/objects/info/packs"),
            Err(Error::UnknownEndpoint(_))
        ));
    }

    #[test]
    fn bounds_path_depth_and_length() {
        let resolve_repo = |repo: &str| resolve(Path::new("/m"), &format!("/{repo}/info/refs"));
        let deep = |n: usize| format!("gitlab.com/{}r", "g/".repeat(n - 2));
        assert!(
            resolve_repo(&deep(24)).is_ok(),
            "GitLab's 20 levels of groups fit"
        );
        assert!(resolve_repo(&deep(25)).is_err());
        assert!(resolve_repo(&deep(1900)).is_err());
        assert!(resolve_repo(&format!("github.com/o/{}", "r".repeat(255))).is_ok());
        assert!(resolve_repo(&format!("github.com/o/{}", "r".repeat(256))).is_err());
        let long = format!("github.com/{}/r", vec!["o".repeat(200); 6].join("/"));
        assert!(resolve_repo(&long).is_err(), "over 1024 bytes");
    }
}
