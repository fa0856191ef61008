//! `vpc-ipamd`: the node daemon. See docs/daemon.md.

#![forbid(unsafe_code)]

pub mod branches;
pub mod control;
pub mod executor;
pub mod http;
pub mod introspect;
pub mod log;
pub mod metrics;
pub mod netpol;
pub mod plugin_socket;
pub mod settings;
pub mod startup;
pub mod store;
