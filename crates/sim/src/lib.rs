//! The simulator: nodes running the real pool engine (`ipam`) against the strict simulated VPC
//! (`simvpc`) on a virtual clock, driven by a pod workload. Used by `vpcctl simulate`, the property tests
//! and the benchmark.

#![forbid(unsafe_code)]

mod cluster;
mod node;
pub mod plot;
mod queue;
pub mod report;
pub mod scenario;
pub mod tune;

pub use cluster::{Cluster, Ended, Spent};
pub use report::Report;
pub use scenario::Scenario;
