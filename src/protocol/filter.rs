//! Partial-clone filter specs (`git rev-list --filter=…`, gitprotocol-v2 `filter`): parsing and
//! the per-object decision. The traversal that applies them lives in `pack`.

use gix::object::Kind;

/// Why a filter spec cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The spec is not valid filter syntax.
    #[error("invalid filter-spec '{0}'")]
    Invalid(String),
    /// A valid spec this server does not implement.
    #[error("filter '{0}' is not supported by this server")]
    Unsupported(String),
}

/// A parsed filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// `blob:none`: no blobs.
    BlobNone,
    /// `blob:limit=<n>[kmg]`: only blobs smaller than `n` bytes.
    BlobLimit(u64),
    /// `tree:<depth>`: no trees or blobs at `depth` or deeper (the root tree is at depth 0).
    TreeDepth(u64),
    /// `object:type=<type>`: only objects of this kind.
    ObjectType(Kind),
    /// `combine:<a>+<b>…`: what every sub-filter includes.
    Combine(Vec<Filter>),
}

impl Filter {
    /// Parse a filter spec as clients send it.
    pub fn parse(spec: &str) -> Result<Filter, Error> {
        let invalid = || Error::Invalid(spec.to_owned());
        if spec == "blob:none" {
            return Ok(Filter::BlobNone);
        }
        if let Some(limit) = spec.strip_prefix("blob:limit=") {
            return parse_size(limit).map(Filter::BlobLimit).ok_or_else(invalid);
        }
        if let Some(depth) = spec.strip_prefix("tree:") {
            return depth.parse().map(Filter::TreeDepth).map_err(|_| invalid());
        }
        if let Some(kind) = spec.strip_prefix("object:type=") {
            return match kind {
                "blob" => Ok(Filter::ObjectType(Kind::Blob)),
                "tree" => Ok(Filter::ObjectType(Kind::Tree)),
                "commit" => Ok(Filter::ObjectType(Kind::Commit)),
                "tag" => Ok(Filter::ObjectType(Kind::Tag)),
                _ => Err(invalid()),
            };
        }
        if let Some(list) = spec.strip_prefix("combine:") {
            let subs = list
                .split('+')
                .map(|sub| {
                    percent_decode(sub)
                        .ok_or_else(invalid)
                        .and_then(|s| Filter::parse(&s))
                })
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Filter::Combine(subs));
        }
        if spec.starts_with("sparse:") {
            return Err(Error::Unsupported(spec.to_owned()));
        }
        Err(invalid())
    }

    /// Whether an object of `kind` at `depth` (trees and blobs: 0 for a root tree, 1 for its
    /// entries, …) passes. `size` is asked for blobs only, and only when a size limit applies.
    pub fn includes(&self, kind: Kind, depth: u64, size: &mut dyn FnMut() -> u64) -> bool {
        match self {
            Filter::BlobNone => kind != Kind::Blob,
            Filter::BlobLimit(limit) => kind != Kind::Blob || size() < *limit,
            Filter::TreeDepth(max) => !matches!(kind, Kind::Tree | Kind::Blob) || depth < *max,
            Filter::ObjectType(wanted) => kind == *wanted,
            Filter::Combine(subs) => subs.iter().all(|f| f.includes(kind, depth, size)),
        }
    }

    /// Whether anything below a tree at `depth` can pass, i.e. whether to walk into it.
    pub fn descends(&self, depth: u64) -> bool {
        match self {
            Filter::BlobNone | Filter::BlobLimit(_) => true,
            Filter::TreeDepth(max) => depth.saturating_add(1) < *max,
            Filter::ObjectType(kind) => matches!(kind, Kind::Tree | Kind::Blob),
            Filter::Combine(subs) => subs.iter().all(|f| f.descends(depth)),
        }
    }

    /// Whether the decision for a tree depends on the depth it is reached at, so that a tree
    /// seen again closer to the root must be walked again.
    pub fn depends_on_depth(&self) -> bool {
        match self {
            Filter::TreeDepth(_) => true,
            Filter::Combine(subs) => subs.iter().any(Filter::depends_on_depth),
            _ => false,
        }
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&s[..i], c.to_ascii_lowercase()),
        _ => (s, ' '),
    };
    let n: u64 = digits.parse().ok()?;
    let factor = match unit {
        ' ' => 1,
        'k' => 1 << 10,
        'm' => 1 << 20,
        'g' => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// Sub-filters of `combine:` escape `+`, `%` and other specials as `%XX`.
fn percent_decode(s: &str) -> Option<String> {
    // Stricter than the crate, which keeps a `%` without two hex digits as it is: such a
    // spec is invalid, not a literal `%`.
    let escapes_valid = s.split('%').skip(1).all(|rest| {
        rest.as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_valid {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_size() -> u64 {
        panic!("size not needed")
    }

    #[test]
    fn parses_every_supported_form() {
        assert_eq!(Filter::parse("blob:none"), Ok(Filter::BlobNone));
        assert_eq!(Filter::parse("blob:limit=0"), Ok(Filter::BlobLimit(0)));
        assert_eq!(
            Filter::parse("blob:limit=10k"),
            Ok(Filter::BlobLimit(10 * 1024))
        );
        assert_eq!(
            Filter::parse("blob:limit=2M"),
            Ok(Filter::BlobLimit(2 << 20))
        );
        assert_eq!(
            Filter::parse("blob:limit=1g"),
            Ok(Filter::BlobLimit(1 << 30))
        );
        assert_eq!(Filter::parse("tree:0"), Ok(Filter::TreeDepth(0)));
        assert_eq!(
            Filter::parse("object:type=tag"),
            Ok(Filter::ObjectType(Kind::Tag))
        );
        assert_eq!(
            Filter::parse("combine:blob:none+tree:3"),
            Ok(Filter::Combine(vec![
                Filter::BlobNone,
                Filter::TreeDepth(3)
            ]))
        );
        assert_eq!(
            Filter::parse("combine:blob%3Alimit%3D5+object%3Atype%3Dblob"),
            Ok(Filter::Combine(vec![
                Filter::BlobLimit(5),
                Filter::ObjectType(Kind::Blob)
            ]))
        );
    }

    #[test]
    fn rejects_invalid_and_unsupported_specs() {
        for bad in [
            "",
            "blob:some",
            "blob:limit=",
            "blob:limit=5x",
            "tree:-1",
            "object:type=note",
            "combine:blob:none+%zz",
        ] {
            assert_eq!(Filter::parse(bad), Err(Error::Invalid(bad.into())), "{bad}");
        }
        assert!(matches!(
            Filter::parse("sparse:oid=main:.sparse"),
            Err(Error::Unsupported(_))
        ));
        assert_eq!(
            Filter::parse("sparse:oid=x").unwrap_err().to_string(),
            "filter 'sparse:oid=x' is not supported by this server"
        );
    }

    #[test]
    fn decides_per_object() {
        assert!(!Filter::BlobNone.includes(Kind::Blob, 1, &mut no_size));
        assert!(Filter::BlobNone.includes(Kind::Tree, 3, &mut no_size));
        assert!(Filter::BlobLimit(100).includes(Kind::Blob, 1, &mut || 99));
        assert!(!Filter::BlobLimit(100).includes(Kind::Blob, 1, &mut || 100));
        let tree1 = Filter::TreeDepth(1);
        assert!(tree1.includes(Kind::Tree, 0, &mut no_size));
        assert!(!tree1.includes(Kind::Blob, 1, &mut no_size));
        assert!(tree1.includes(Kind::Commit, 0, &mut no_size));
        assert!(!tree1.descends(0));
        assert!(Filter::TreeDepth(2).descends(0));
        assert!(!Filter::TreeDepth(0).includes(Kind::Tree, 0, &mut no_size));
        assert!(!Filter::ObjectType(Kind::Commit).descends(0));
        assert!(Filter::ObjectType(Kind::Blob).descends(4));
        let both = Filter::Combine(vec![Filter::BlobNone, Filter::TreeDepth(2)]);
        assert!(!both.includes(Kind::Blob, 1, &mut no_size));
        assert!(both.includes(Kind::Tree, 1, &mut no_size));
        assert!(!both.includes(Kind::Tree, 2, &mut no_size));
        assert!(both.depends_on_depth());
    }
}
