//! smart-git-proxy: a caching Git mirror proxy that serves `git-upload-pack` in-process.
//!
//! Data flow: [`http`] receives a request, resolves the repository with [`repo`], and hands
//! the parsed request ([`protocol`]) to [`upload_pack`], which negotiates and asks [`pack`]
//! for the objects and the pack bytes.
#![deny(missing_docs, unsafe_code)]

pub mod config;
pub mod http;
pub mod lfs;
pub mod metrics;
pub mod mirror;
pub mod pack;
pub mod prewarm;
pub mod protocol;
pub mod repo;
pub mod ttl;
pub mod upload_pack;
pub mod upstream;

/// An error with its causes, `outer: inner: …`: many errors (reqwest's, hyper's) name only
/// the outermost step in their own message.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Whether `e` or one of its causes is a full disk (or a spent quota): a local condition a
/// client may be told about, unlike the paths the messages name.
pub(crate) fn is_no_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) {
                return true;
            }
        }
        next = e.source();
    }
    false
}
