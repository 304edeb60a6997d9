//! TLS for every upstream connection (gix's fetches, ref listings, LFS, the GitHub App token
//! endpoint): rustls with the ring provider, so the binary links no OpenSSL. The trust roots
//! are the system's certificates, read as git and curl read them (`SSL_CERT_FILE` and
//! `SSL_CERT_DIR` replace the system store when set), plus the PEM bundle `UPSTREAM_CA_FILE`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

/// Why the trust roots cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `UPSTREAM_CA_FILE` cannot be read, or holds something that is not a PEM certificate.
    #[error("UPSTREAM_CA_FILE '{path}': {reason}")]
    CaFile {
        /// The setting's value.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The TLS settings every upstream HTTP client is built with; cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    roots: usize,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("roots", &self.roots)
            .finish()
    }
}

impl ClientTls {
    /// The system's roots, plus the certificates of `ca_file` when given. A system store that
    /// cannot be read is logged (an operator may trust `ca_file` alone); a `ca_file` that cannot
    /// be read, or has no certificate, is an error.
    pub fn load(ca_file: Option<&Path>) -> Result<Self, Error> {
        let mut roots = system_roots();
        if let Some(path) = ca_file {
            for cert in read_pem(path)? {
                roots.add(cert).map_err(|e| Error::CaFile {
                    path: path.to_owned(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        Ok(Self::with_roots(roots))
    }

    /// The system's roots only.
    pub fn system() -> Self {
        Self::with_roots(system_roots())
    }

    fn with_roots(roots: rustls::RootCertStore) -> Self {
        install_provider();
        let count = roots.len();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        ClientTls {
            config: Arc::new(config),
            roots: count,
        }
    }

    /// `builder` with these roots.
    pub fn client(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        builder.tls_backend_preconfigured(rustls::ClientConfig::clone(&self.config))
    }

    /// `builder` (gix's blocking client) with these roots.
    pub fn blocking_client(
        &self,
        builder: reqwest::blocking::ClientBuilder,
    ) -> reqwest::blocking::ClientBuilder {
        builder.tls_backend_preconfigured(rustls::ClientConfig::clone(&self.config))
    }
}

/// Make ring the process's rustls provider, if none is yet. Every client this crate builds
/// does; a program that uses gix's HTTP transport (or reqwest) itself, without a
/// [`ClientTls`], must call it first: reqwest is built without a provider of its own (its
/// default, aws-lc, needs cmake) and panics without one.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The system's trusted certificates (`SSL_CERT_FILE`/`SSL_CERT_DIR` when set). Unreadable
/// ones are logged: an operator may trust `UPSTREAM_CA_FILE` alone.
fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::warn!(error = %e, "reading the system's trusted certificates");
    }
    let (_, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!(
            ignored,
            "system certificates rustls cannot use as trust roots"
        );
    }
    roots
}

/// The certificates of the PEM file at `path`: at least one.
fn read_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let error = |reason: String| Error::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(format!("not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(error("no PEM certificate (BEGIN CERTIFICATE) in it".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = ClientTls::load(Some(&path)).unwrap_err().to_string();
        assert!(
            e.contains("UPSTREAM_CA_FILE") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = ClientTls::load(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
