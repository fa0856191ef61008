//! The pool engine of vpc-cni-rs, free of I/O: it never reads a clock, the environment, a file or a
//! socket. Callers (the daemon, the simulator) pass `now` and feed it the results of EC2 calls.

#![forbid(unsafe_code)]

pub mod action;
pub mod branch;
pub mod branches;
pub mod checkpoint;
pub mod choreography;
pub mod config;
pub mod config_map;
pub mod ec2;
pub mod limits;
pub mod maxpods;
pub mod net;
pub mod ownership;
pub mod pacing;
pub mod plan;
pub mod policy;
pub mod pool;
pub mod reconcile;
pub mod settings;
pub mod subnets;
pub mod time;
pub mod v6;

pub use action::{Action, AddressKind, SubnetTarget};
pub use config::Config;
pub use net::{Ipv4Cidr, Ipv6Cidr};
pub use policy::{decide, Decision, Demand, PolicyMemory, Stall};
pub use pool::{IpamKey, NodeSpec, PodMeta, Pool};
pub use settings::PoolSettings;
pub use time::Time;
