//! A strict simulated VPC, in-process and on a virtual clock: every call takes `now`, and returns its
//! result with the latency the caller should wait before seeing it. It enforces what EC2 enforces and moto
//! does not: instance limits, device indexes, address uniqueness, reserved addresses, aligned /28 prefixes
//! and fragmentation, attachment state, and per-account request throttling.

#![forbid(unsafe_code)]

mod addresses;
mod throttle;
mod vpc;

pub use addresses::SubnetAddresses;
pub use throttle::{Category, TokenBucket};
pub use vpc::*;
