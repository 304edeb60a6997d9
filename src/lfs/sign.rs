//! Proxy links: the `href` a rewritten batch answer gives for an object the upstream
//! authorized. A link is self-authorising and therefore bound to everything it grants: the
//! repository it was authorized for, the OID, the size the upstream announced and an expiry,
//! under an HMAC-SHA256 with a key that never leaves the proxy (`LFS_URL_KEY`, or a random
//! key per process). The upstream's own `href` and headers are not in it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// What a link grants, as read back from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The repository (`host/path`) whose batch authorized the object.
    pub repo: String,
    /// The object's OID, lower-case hex.
    pub oid: String,
    /// The size the upstream announced.
    pub size: u64,
    /// Seconds since the Unix epoch after which the link is refused.
    pub expires: u64,
}

/// Why a link is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The query lacks a field or has a malformed one.
    #[error("malformed Git LFS object link")]
    Malformed,
    /// The signature does not match what the link claims (tampered, or signed with another key).
    #[error("invalid Git LFS object link signature")]
    Signature,
    /// The link is past its expiry: the client asks the batch API again.
    #[error("expired Git LFS object link: ask the batch API again")]
    Expired,
}

impl Error {
    /// The metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Malformed => "malformed",
            Error::Signature => "signature",
            Error::Expired => "expired",
        }
    }
}

/// Signs and checks links.
pub struct Signer {
    key: Vec<u8>,
}

impl Signer {
    /// A signer with `key` (`LFS_URL_KEY`, shared by the nodes behind one balancer), or with a
    /// random key when there is none: links then only work on the process that issued them.
    pub fn new(key: Option<&[u8]>) -> std::io::Result<Self> {
        let key = match key {
            Some(key) => key.to_vec(),
            None => {
                let mut key = vec![0; 32];
                getrandom::fill(&mut key).map_err(std::io::Error::other)?;
                key
            }
        };
        Ok(Signer { key })
    }

    fn mac(&self, grant: &Grant) -> Hmac<Sha256> {
        // Any key length is valid for HMAC.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC accepts keys of any length");
        // Length-prefixed fields: no two grants share an input.
        for field in [
            b"smart-git-proxy lfs v1".as_slice(),
            grant.repo.as_bytes(),
            grant.oid.as_bytes(),
            &grant.size.to_be_bytes(),
            &grant.expires.to_be_bytes(),
        ] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac
    }

    /// The link's query string for `grant`: `size=…&expires=…&sig=…`.
    pub fn query(&self, grant: &Grant) -> String {
        let sig = hex::encode(self.mac(grant).finalize().into_bytes());
        format!("size={}&expires={}&sig={sig}", grant.size, grant.expires)
    }

    /// The grant of the link for `repo` and `oid` with `query`, if it is genuine and has not
    /// expired at `now` (seconds since the Unix epoch).
    pub fn check(&self, repo: &str, oid: &str, query: &str, now: u64) -> Result<Grant, Error> {
        let (mut size, mut expires, mut sig) = (None, None, None);
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').ok_or(Error::Malformed)?;
            let slot = match name {
                "size" => &mut size,
                "expires" => &mut expires,
                "sig" => &mut sig,
                _ => return Err(Error::Malformed),
            };
            if slot.replace(value).is_some() {
                return Err(Error::Malformed);
            }
        }
        let number = |v: Option<&str>| {
            v.filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(Error::Malformed)
        };
        let grant = Grant {
            repo: repo.to_owned(),
            oid: oid.to_owned(),
            size: number(size)?,
            expires: number(expires)?,
        };
        let sig = hex::decode(sig.ok_or(Error::Malformed)?).map_err(|_| Error::Malformed)?;
        // Constant-time comparison: the signature is what an attacker would guess at.
        self.mac(&grant)
            .verify_slice(&sig)
            .map_err(|_| Error::Signature)?;
        if now >= grant.expires {
            return Err(Error::Expired);
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            repo: "github.com/o/r".into(),
            oid: "a".repeat(64),
            size: 42,
            expires: 1000,
        }
    }

    #[test]
    fn a_link_is_bound_to_what_it_grants() {
        let signer = Signer::new(Some(b"key")).unwrap();
        let g = grant();
        let q = signer.query(&g);
        assert_eq!(signer.check(&g.repo, &g.oid, &q, 999), Ok(g.clone()));
        assert_eq!(signer.check(&g.repo, &g.oid, &q, 1000), Err(Error::Expired));
        assert_eq!(
            signer.check("github.com/o/other", &g.oid, &q, 999),
            Err(Error::Signature)
        );
        assert_eq!(
            signer.check(&g.repo, &"b".repeat(64), &q, 999),
            Err(Error::Signature)
        );
        let longer = q.replace("expires=1000", "expires=2000");
        assert_eq!(
            signer.check(&g.repo, &g.oid, &longer, 999),
            Err(Error::Signature)
        );
        let bigger = q.replace("size=42", "size=43");
        assert_eq!(
            signer.check(&g.repo, &g.oid, &bigger, 999),
            Err(Error::Signature)
        );
        let other = Signer::new(Some(b"other key")).unwrap();
        assert_eq!(other.check(&g.repo, &g.oid, &q, 999), Err(Error::Signature));
        let random = Signer::new(None).unwrap();
        assert_eq!(
            random.check(&g.repo, &g.oid, &q, 999),
            Err(Error::Signature)
        );
    }

    #[test]
    fn malformed_queries_are_refused() {
        let signer = Signer::new(Some(b"key")).unwrap();
        let g = grant();
        let q = signer.query(&g);
        for bad in [
            String::new(),
            format!("{q}&size=42"),
            format!("{q}&x=1"),
            q.replace("size=42", "size=+42"),
            q.replace("size=42", "size="),
            q.replace("sig=", "sig=zz"),
            q.replace("&expires=1000", ""),
        ] {
            assert_eq!(
                signer.check(&g.repo, &g.oid, &bad, 0),
                Err(Error::Malformed),
                "{bad}"
            );
        }
    }
}
