//! `ALLOWED_UPSTREAMS`: the upstream hosts the proxy may mirror from, and the URL each is
//! fetched at. Parsed once at start ([`crate::config`]); the HTTP front looks a request's host
//! up here, and push notices map their repository URL back to a mirror name.

/// One allowed upstream host: its URL segment and the base URL to fetch from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The first path segment of proxy URLs, `host` or `host:port`.
    pub segment: String,
    /// `scheme://host[:port]`
    pub base_url: String,
}

/// The `ALLOWED_UPSTREAMS` list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Upstreams(Vec<Upstream>);

/// An `ALLOWED_UPSTREAMS` entry that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("ALLOWED_UPSTREAMS entry '{0}' is not `host`, `host:port` or `http(s)://host[:port]`")]
pub struct Error(String);

impl Upstreams {
    /// Parse a comma-separated list; entries without a scheme use `https`.
    pub fn parse(list: &str) -> Result<Self, Error> {
        let mut out = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (scheme, rest) = match entry.split_once("://") {
                Some((s @ ("http" | "https"), rest)) => (s, rest),
                Some(_) => return Err(Error(entry.into())),
                None => ("https", entry),
            };
            let host = rest.trim_end_matches('/');
            let valid = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
            if !valid {
                return Err(Error(entry.into()));
            }
            out.push(Upstream {
                segment: host.to_ascii_lowercase(),
                base_url: format!("{scheme}://{host}"),
            });
        }
        Ok(Upstreams(out))
    }

    /// The upstream whose segment is `segment`.
    pub fn get(&self, segment: &str) -> Option<&Upstream> {
        self.0
            .iter()
            .find(|u| u.segment.eq_ignore_ascii_case(segment))
    }

    /// The mirror name (`{segment}/{path}`) of a repository URL as a push notice gives it
    /// (`https://github.com/o/r.git` → `github.com/o/r`), if its scheme and host are allowed.
    /// The name still has to pass the path rules ([`crate::repo::resolve`]).
    pub fn mirror_name(&self, clone_url: &str) -> Option<String> {
        self.0.iter().find_map(|u| {
            let n = u.base_url.len();
            let (prefix, rest) = (clone_url.get(..n)?, clone_url.get(n..)?);
            let path = rest.strip_prefix('/')?;
            let path = path.trim_end_matches('/');
            let path = path.strip_suffix(".git").unwrap_or(path);
            (prefix.eq_ignore_ascii_case(&u.base_url) && !path.is_empty())
                .then(|| format!("{}/{path}", u.segment))
        })
    }

    /// The base URLs (`scheme://host[:port]`) of the allowed upstreams.
    pub fn base_urls(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|u| u.base_url.as_str())
    }

    /// The allowed upstreams, in the order they were listed.
    pub fn iter(&self) -> impl Iterator<Item = &Upstream> {
        self.0.iter()
    }

    /// The allowed segments, for messages.
    pub fn names(&self) -> String {
        self.0
            .iter()
            .map(|u| u.segment.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_allowed_upstreams() {
        let u = Upstreams::parse("github.com, http://127.0.0.1:9001,https://GitLab.example.org/")
            .unwrap();
        assert_eq!(u.get("github.com").unwrap().base_url, "https://github.com");
        assert_eq!(
            u.get("127.0.0.1:9001").unwrap().base_url,
            "http://127.0.0.1:9001"
        );
        assert_eq!(
            u.get("gitlab.example.org").unwrap().base_url,
            "https://GitLab.example.org"
        );
        assert!(u.get("evil.com").is_none());
        assert_eq!(u.names(), "github.com, 127.0.0.1:9001, gitlab.example.org");
        assert!(Upstreams::parse("ftp://x").is_err());
        assert!(Upstreams::parse("a/b").is_err());
    }

    #[test]
    fn push_notices_name_mirrors_of_allowed_upstreams_only() {
        let u = Upstreams::parse("github.com, http://127.0.0.1:9001").unwrap();
        let name = |url| u.mirror_name(url);
        assert_eq!(
            name("https://github.com/o/r.git").as_deref(),
            Some("github.com/o/r")
        );
        assert_eq!(
            name("https://GitHub.com/g/sub/r").as_deref(),
            Some("github.com/g/sub/r")
        );
        assert_eq!(
            name("http://127.0.0.1:9001/o/r.git").as_deref(),
            Some("127.0.0.1:9001/o/r")
        );
        for other in [
            "http://github.com/o/r.git",
            "https://github.com.evil.org/o/r.git",
            "https://github.com",
            "https://github.com/",
            "http://127.0.0.1:9002/o/r.git",
            "git@github.com:o/r.git",
            "",
        ] {
            assert_eq!(name(other), None, "{other}");
        }
    }
}
