//! Runs the engine's actions: the shared choreography (`ipam::choreography`) says which EC2 call or
//! link change comes next; this interprets it against an [`Ec2`] and the node's [`Links`] on tokio,
//! a bounded number at once.

use crate::control::Clock;
use crate::metrics::Metrics;
use cloud::aws::AwsEc2;
use cloud::{CloudError, Ec2, Eni, EniQuery, ErrorKind};
use datapath::node::{self, EniLink};
use ipam::action::Outcome;
use ipam::choreography::{Choreography, Finished, LinkSpec, Next, NodeFacts, Reply, Request};
use ipam::{Action, Ipv4Cidr, Time};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub use ipam::choreography::{blocks_of, parse_mac};

/// EC2 actions running at once; more wait their turn (the client's buckets pace them further).
const CONCURRENCY: usize = 8;
/// A hot-plugged ENI's link shows up a moment after the attach returns.
const LINK_WAIT: Duration = Duration::from_secs(10);

/// Sets up and tears down ENI links on the node: the host's netlink in the daemon, anything in a
/// test.
pub trait Links: Send + Sync + 'static {
    /// Configures the link, waiting a while for a hot-plugged one to show up.
    fn setup(&self, link: &LinkSpec) -> impl Future<Output = Result<(), String>> + Send;
    fn teardown(&self, link: &LinkSpec) -> impl Future<Output = Result<(), String>> + Send;
}

/// The node's own links, through `datapath::node`.
pub struct HostLinks;

pub fn eni_link(spec: &LinkSpec) -> EniLink {
    EniLink {
        mac: spec.mac,
        primary_ip: spec.primary_ip,
        subnet: (spec.subnet.addr(), spec.subnet.prefix_len()),
        route_table: spec.route_table,
        mtu: spec.mtu,
    }
}

impl Links for HostLinks {
    async fn setup(&self, link: &LinkSpec) -> Result<(), String> {
        let link = eni_link(link);
        let deadline = tokio::time::Instant::now() + LINK_WAIT;
        loop {
            let attempt = link.clone();
            let result = tokio::task::spawn_blocking(move || node::setup_eni(&attempt))
                .await
                .expect("link setup does not panic");
            match result {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.to_string()),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn teardown(&self, link: &LinkSpec) -> Result<(), String> {
        let link = eni_link(link);
        tokio::task::spawn_blocking(move || node::teardown_eni(&link))
            .await
            .expect("teardown does not panic")
            .map_err(|e| e.to_string())
    }
}

/// How an action ended, and the EC2 error behind a failure.
pub type Report = Finished;

/// What the control loop asks of the executor. A trait object, so that the loop (and the events and
/// introspection that name it) stays one type whatever EC2 and links the executor drives: the AWS
/// SDK and the host in the daemon, the in-process simulated VPC in the loop's tests.
pub trait Actions: Send + Sync + 'static {
    /// Runs `action` to its end; `clock` gives wall time (for the `createdAt` tag).
    fn run<'a>(
        &'a self,
        action: &'a Action,
        clock: Clock,
    ) -> Pin<Box<dyn Future<Output = Report> + Send + 'a>>;
    fn avoid_device(&self, device: u32);
    fn stop_avoiding(&self, device: u32);
    /// The MAC of an ENI the executor configured or adopted (a branch's trunk).
    fn mac_of(&self, eni_id: &str) -> Option<[u8; 6]>;
    /// Calls EC2 throttled so far, by operation.
    fn throttled(&self) -> Vec<(&'static str, u64)>;
}

impl<E: Ec2 + 'static, L: Links> Actions for Executor<E, L> {
    fn run<'a>(
        &'a self,
        action: &'a Action,
        clock: Clock,
    ) -> Pin<Box<dyn Future<Output = Report> + Send + 'a>> {
        Box::pin(Executor::run(self, action, move || clock.now()))
    }

    fn avoid_device(&self, device: u32) {
        Executor::avoid_device(self, device)
    }

    fn stop_avoiding(&self, device: u32) {
        Executor::stop_avoiding(self, device)
    }

    fn mac_of(&self, eni_id: &str) -> Option<[u8; 6]> {
        self.link_of(eni_id).map(|l| l.mac)
    }

    fn throttled(&self) -> Vec<(&'static str, u64)> {
        self.ec2.throttled()
    }
}

pub struct Executor<E = AwsEc2, L = HostLinks> {
    pub ec2: E,
    pub links: L,
    slots: Semaphore,
    choreography: Mutex<Choreography>,
    metrics: Arc<Metrics>,
}

impl<E: Ec2, L: Links> Executor<E, L> {
    pub fn new(ec2: E, links: L, node: NodeFacts, metrics: Arc<Metrics>) -> Executor<E, L> {
        Executor {
            ec2,
            links,
            slots: Semaphore::new(CONCURRENCY),
            choreography: Mutex::new(Choreography::new(node)),
            metrics,
        }
    }

    fn choreography(&self) -> std::sync::MutexGuard<'_, Choreography> {
        self.choreography.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an ENI found attached at start: its device index is taken, and a secondary one's link
    /// can be torn down when it is freed.
    pub fn adopt(&self, eni: &Eni, subnet_cidr: Ipv4Cidr) {
        self.choreography().adopt(eni, subnet_cidr);
    }

    /// A device index on card 0 held by an ENI that is not ours: new ENIs go elsewhere.
    pub fn avoid_device(&self, device: u32) {
        self.choreography().avoid_device(device);
    }

    /// That ENI is gone: its device index may be used again.
    pub fn stop_avoiding(&self, device: u32) {
        self.choreography().stop_avoiding(device);
    }

    pub fn link_of(&self, eni_id: &str) -> Option<LinkSpec> {
        self.choreography().link_of(eni_id)
    }

    /// Times the call and counts it by operation and error code.
    pub async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = cloud::Result<T>>,
    ) -> cloud::Result<T> {
        let started = Instant::now();
        let result = call.await;
        self.metrics.ec2_call(
            operation,
            started.elapsed(),
            result.as_ref().err().map(|e| e.code.as_ref()),
        );
        result
    }

    /// Runs `action` through the choreography to its end. `now` reads the wall clock (for the
    /// `createdAt` tag); waits are tokio's, so a test can pause them.
    pub async fn run(&self, action: &Action, now: impl Fn() -> Time + Send) -> Report {
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let seed = rand::random();
        let token = cloud::aws::client_token();
        let mut run = self
            .choreography()
            .start(action.clone(), seed, token, now());
        let mut next = run.first();
        loop {
            let reply = match next {
                Next::Done(finished) => {
                    for warning in &finished.warnings {
                        tracing::warn!(action = ?action, "{warning}");
                    }
                    if let Outcome::EniCreated { eni, .. } = &finished.outcome {
                        tracing::info!(eni = %eni.id, device = %eni.device_number, subnet = %eni.subnet_id, "ENI attached");
                    }
                    return finished;
                }
                Next::Call(request) => self.call(request).await,
                Next::After(wait, request) => {
                    tokio::time::sleep(wait).await;
                    self.call(request).await
                }
            };
            next = self.choreography().step(&mut run, reply, now());
        }
    }

    async fn call(&self, request: &Request) -> Result<Reply, CloudError> {
        let op = request.operation();
        let host = |result: Result<(), String>| {
            result.map(|()| Reply::Done).map_err(|message| CloudError {
                kind: ErrorKind::Other,
                operation: op,
                code: "NodeSetup".into(),
                message: message.into(),
            })
        };
        match request {
            Request::AssignIps { eni, count } => self
                .timed(op, self.ec2.assign_private_ips(eni, *count))
                .await
                .map(|ips| Reply::Addresses(ips.into_iter().map(Ipv4Cidr::host).collect())),
            Request::AssignPrefixes { eni, count } => self
                .timed(op, self.ec2.assign_prefixes(eni, *count))
                .await
                .map(Reply::Addresses),
            Request::Unassign { eni, ips, prefixes } => self
                .timed(op, self.ec2.unassign(eni, ips, prefixes))
                .await
                .map(|()| Reply::Done),
            Request::DescribeEni { eni } => self
                .timed(
                    op,
                    self.ec2.describe_network_interfaces(&EniQuery::by_id(eni)),
                )
                .await
                .map(Reply::Enis),
            Request::DescribeSubnets { filters } => self
                .timed(op, self.ec2.describe_subnets(filters))
                .await
                .map(Reply::Subnets),
            Request::Create(create) => self
                .timed(op, self.ec2.create_network_interface(create))
                .await
                .map(|eni| Reply::Eni(Box::new(eni))),
            Request::Attach {
                eni,
                instance_id,
                device,
                network_card,
            } => self
                .timed(
                    op,
                    self.ec2
                        .attach_network_interface(eni, instance_id, *device, *network_card),
                )
                .await
                .map(Reply::Attachment),
            Request::KeepOnTermination { eni, attachment_id } => self
                .timed(op, self.ec2.set_delete_on_termination(eni, attachment_id))
                .await
                .map(|()| Reply::Done),
            Request::Detach { attachment_id } => self
                .timed(op, self.ec2.detach_network_interface(attachment_id))
                .await
                .map(|()| Reply::Done),
            Request::Delete { eni } => self
                .timed(op, self.ec2.delete_network_interface(eni))
                .await
                .map(|()| Reply::Done),
            Request::Associate {
                branch,
                trunk,
                vlan,
                client_token,
            } => self
                .timed(
                    op,
                    self.ec2
                        .associate_trunk_interface(branch, trunk, *vlan, client_token),
                )
                .await
                .map(Reply::Attachment),
            Request::Disassociate { association_id } => self
                .timed(op, self.ec2.disassociate_trunk_interface(association_id))
                .await
                .map(|()| Reply::Done),
            Request::SetupLink(link) => {
                let result = self.links.setup(link).await;
                if let Err(e) = &result {
                    self.metrics.count(
                        "awscni_aws_utils_error_count",
                        &[("fn", "setupENINetwork"), ("error", e)],
                    );
                }
                host(result)
            }
            Request::TeardownLink(link) => {
                let result = self.links.teardown(link).await;
                if let Err(e) = &result {
                    self.metrics.count(
                        "awscni_aws_utils_error_count",
                        &[("fn", "teardownENINetwork"), ("error", e)],
                    );
                }
                host(result)
            }
        }
    }
}
