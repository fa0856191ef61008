//! The simulated VPC over HTTP: EC2's Query protocol (form-encoded `Action=...`, XML replies, AWS
//! error XML) and IMDSv2, so that the real AWS SDK, boto3 or the AWS CLI can drive the same strict
//! VPC that the simulator uses in-process. For loopback use: signatures are not checked.

pub mod config;
mod ec2;
pub mod http;
mod imds;
mod query;
mod server;
mod xml;

pub use config::ServeConfig;
pub use server::{Observer, Running, Server};
