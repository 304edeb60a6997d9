//! Settings, from command-line flags or the environment (the seed README's names), validated
//! before anything binds or opens.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use bytesize::ByteSize;
use clap::Parser;

/// smart-git-proxy: serves Git repositories under MIRROR_DIR over smart HTTP, in-process.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// Address to listen on, `host:port` or `:port` (all interfaces).
    #[arg(long, env = "LISTEN_ADDR", default_value = ":8080")]
    pub listen_addr: String,
    /// Directory holding the bare repositories, as `{host}/{path}.git`.
    #[arg(long, env = "MIRROR_DIR", default_value = "/mnt/git-mirrors")]
    pub mirror_dir: PathBuf,
    /// Log filter: `debug`, `info`, `warn`, `error`, or a tracing directive.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Largest accepted request body after gzip decoding, e.g. `1GiB`, `64MiB`.
    #[arg(long, env = "MAX_REQUEST_BODY", default_value = "1GiB")]
    pub max_request_body: ByteSize,
    /// Upload-pack requests generating packs at the same time; more wait their turn.
    /// Defaults to twice the number of cores.
    #[arg(long, env = "MAX_CONCURRENT_PACKS")]
    pub max_concurrent_packs: Option<usize>,
    /// Threads compressing one pack; defaults to all cores.
    #[arg(long, env = "PACK_THREADS")]
    pub pack_threads: Option<usize>,
    /// zlib level (0–9) for objects a pack cannot copy from disk and compresses anew (for
    /// example the full objects of a `--depth=1` pack). Lower is faster, higher is smaller.
    #[arg(long, env = "PACK_COMPRESSION_LEVEL", default_value_t = DEFAULT_COMPRESSION_LEVEL)]
    pub pack_compression_level: u32,
}

/// See `PACK_COMPRESSION_LEVEL`; the README gives the measurements behind it.
pub const DEFAULT_COMPRESSION_LEVEL: u32 = 6;

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `LISTEN_ADDR` is not an address.
    #[error("LISTEN_ADDR '{value}' is not `host:port` or `:port`")]
    ListenAddr {
        /// The value given.
        value: String,
    },
    /// The zlib level is out of range.
    #[error("PACK_COMPRESSION_LEVEL must be 0 to 9, not {0}")]
    CompressionLevel(u32),
    /// A count that must be positive is zero.
    #[error("{key} must be at least 1")]
    Zero {
        /// The setting.
        key: &'static str,
    },
}

impl Config {
    /// The socket address to bind.
    pub fn listen_socket_addr(&self) -> Result<SocketAddr, Error> {
        let value = self.listen_addr.trim();
        let parsed = match value.strip_prefix(':') {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p)),
            None => value.parse().ok(),
        };
        parsed.ok_or_else(|| Error::ListenAddr {
            value: self.listen_addr.clone(),
        })
    }

    /// The zlib level for re-compressed objects.
    pub fn compression(&self) -> Result<gix::zlib::Compression, Error> {
        i32::try_from(self.pack_compression_level)
            .ok()
            .and_then(gix::zlib::Compression::new)
            .ok_or(Error::CompressionLevel(self.pack_compression_level))
    }

    /// Check every setting; call before binding.
    pub fn validate(&self) -> Result<(), Error> {
        self.listen_socket_addr()?;
        if self.max_concurrent_packs == Some(0) {
            return Err(Error::Zero {
                key: "MAX_CONCURRENT_PACKS",
            });
        }
        if self.pack_threads == Some(0) {
            return Err(Error::Zero {
                key: "PACK_THREADS",
            });
        }
        self.compression()?;
        Ok(())
    }

    /// A configuration with defaults for everything but the mirror directory, as tests and
    /// embedders need it.
    pub fn new(mirror_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen_addr: "127.0.0.1:0".into(),
            mirror_dir: mirror_dir.into(),
            log_level: "info".into(),
            max_request_body: ByteSize::gib(1),
            max_concurrent_packs: None,
            pack_threads: None,
            pack_compression_level: DEFAULT_COMPRESSION_LEVEL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addr_forms() {
        let mut c = Config::new("/m");
        c.listen_addr = ":8080".into();
        assert_eq!(
            c.listen_socket_addr().unwrap(),
            "0.0.0.0:8080".parse().unwrap()
        );
        c.listen_addr = "127.0.0.1:9000".into();
        assert_eq!(
            c.listen_socket_addr().unwrap(),
            "127.0.0.1:9000".parse().unwrap()
        );
        c.listen_addr = "[::1]:9000".into();
        assert!(c.listen_socket_addr().is_ok());
        c.listen_addr = "localhost".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn parses_flags_and_sizes() {
        let c =
            Config::try_parse_from(["x", "--mirror-dir", "/srv", "--max-request-body", "64MiB"])
                .unwrap();
        assert_eq!(c.max_request_body, ByteSize::mib(64));
        assert_eq!(c.mirror_dir, PathBuf::from("/srv"));
        let mut c = Config::new("/m");
        c.pack_threads = Some(0);
        assert!(c.validate().is_err());
        let mut c = Config::new("/m");
        c.pack_compression_level = 10;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "PACK_COMPRESSION_LEVEL must be 0 to 9, not 10"
        );
    }
}
