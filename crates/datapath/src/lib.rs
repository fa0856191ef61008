//! The node's datapath: pod wiring and node setup over netlink, SNAT and connmark over nftables.
//!
//! Everything here is IPv4. Work inside a pod's network namespace happens on a thread of its own
//! (`setns` is per thread), so the caller's thread never changes namespace.

pub mod branch;
pub mod names;
pub mod netns;
pub mod netpol;
mod nl;
pub mod node;
pub mod pod;
pub mod snat;
pub mod upstream;

use std::io;

/// The host's main routing table.
pub const MAIN_TABLE: u32 = 254;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespace {path}: {source}")]
    Netns { path: String, source: io::Error },
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach what was being done to a netlink or I/O error.
pub(crate) trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, rtnetlink::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Netlink {
            what: what(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, io::Error> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            what: what(),
            source,
        })
    }
}
