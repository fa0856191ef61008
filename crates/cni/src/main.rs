//! `vpc-cni`, the CNI plugin: wires a pod into the VPC with an address from `vpc-ipamd`.
//!
//! One process per command. Stdout carries only the result or the error JSON; logs go to
//! `pluginLogFile` when the configuration names one.

#![forbid(unsafe_code)]

mod conf;
mod error;
mod result;

use conf::{Env, K8sArgs, NetConf, SUPPORTED_VERSIONS};
use datapath::branch::BranchLink;
use datapath::netns::NetNs;
use datapath::pod::{self, AddError, Family, HostRoutes, PodAddress, PodLink, PodNetwork};
use error::{CniError, Code};
use proto::{Attachment, DelReason, ErrorKind, PodRef, ProtoError, Reply, Request};
use std::io::{Read, Write};
use std::time::Duration;

/// An ADD may wait while the daemon grows the pool from EC2; kubelet's own deadline is longer.
const ADD_TIMEOUT: Duration = Duration::from_secs(60);
const OTHER_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let env = Env::from_lookup(|key| std::env::var(key).ok());
    if env.command.is_empty() {
        eprintln!(
            "vpc-cni {}: CNI protocol versions supported: {}",
            env!("CARGO_PKG_VERSION"),
            SUPPORTED_VERSIONS.join(", ")
        );
        return;
    }
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        fail(
            "1.0.0",
            CniError::new(Code::Io, format!("reading the configuration: {e}")),
        );
    }
    let version = reported_version(&stdin);
    match run(&env, &stdin) {
        Ok(Some(output)) => {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{output}");
        }
        Ok(None) => {}
        Err(e) => fail(&version, e),
    }
}

fn fail(version: &str, error: CniError) -> ! {
    println!("{}", error.to_json(version));
    std::process::exit(1);
}

/// The version to answer in, even when the configuration is otherwise unusable.
fn reported_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| "1.0.0".into())
}

fn run(env: &Env, stdin: &[u8]) -> Result<Option<String>, CniError> {
    if env.command == "VERSION" {
        return Ok(Some(
            serde_json::json!({
                "cniVersion": reported_version(stdin),
                "supportedVersions": SUPPORTED_VERSIONS,
            })
            .to_string(),
        ));
    }
    let conf = NetConf::parse(stdin)?;
    let log = Log::new(&conf, env);
    let outcome = match env.command.as_str() {
        "ADD" => add(env, &conf, &log).map(Some),
        "DEL" => del(env, &conf, &log).map(|()| None),
        "CHECK" => check(env, &conf).map(|()| None),
        "STATUS" => status(&conf).map(|()| None),
        "GC" => gc(&conf, &log).map(|()| None),
        other => Err(CniError::new(
            Code::InvalidEnvironment,
            format!("unknown CNI_COMMAND {other:?}"),
        )),
    };
    if let Err(e) = &outcome {
        log.write(&format!("error {}: {} {}", e.code as u32, e.msg, e.details));
    }
    outcome
}

fn attachment(env: &Env, conf: &NetConf) -> Attachment {
    Attachment {
        network: conf.name.clone(),
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

fn pod_ref(args: &K8sArgs) -> PodRef {
    PodRef {
        namespace: args.pod_namespace.clone(),
        name: args.pod_name.clone(),
        infra_container_id: args.infra_container_id.clone(),
        uid: args.pod_uid.clone(),
    }
}

/// What host veth names are made from: upstream's pod key when Kubernetes says which pod this is,
/// the container id for bare runtimes.
fn veth_key(env: &Env, args: &K8sArgs) -> String {
    if args.pod_name.is_empty() || args.pod_namespace.is_empty() {
        env.container_id.clone()
    } else {
        datapath::names::pod_key(&args.pod_namespace, &args.pod_name)
    }
}

fn host_veth(env: &Env, conf: &NetConf, args: &K8sArgs) -> String {
    datapath::names::host_veth_name(&conf.veth_prefix, &veth_key(env, args))
}

/// The host end of an IPv6 pod's `v4if0`, when the configuration gives IPv6 pods IPv4 egress.
fn egress_veth(env: &Env, conf: &NetConf, args: &K8sArgs) -> Option<String> {
    (conf.ipv6 && conf.v4_egress)
        .then(|| datapath::names::host_veth_name(pod::EGRESS_VETH_PREFIX, &veth_key(env, args)))
}

fn family(env: &Env, conf: &NetConf, args: &K8sArgs) -> Family {
    if conf.ipv6 {
        Family::Ipv6 {
            egress_veth: egress_veth(env, conf, args),
        }
    } else {
        Family::Ipv4
    }
}

/// A branch ENI as `datapath::branch` wires it.
fn branch_link(
    address: std::net::IpAddr,
    branch: proto::BranchAllocation,
) -> Result<BranchLink, CniError> {
    let std::net::IpAddr::V4(address) = address else {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!("vpc-ipamd gave the branch ENI an IPv6 address ({address}): IPv6 branch pods are not supported"),
        ));
    };
    Ok(BranchLink {
        vlan: branch.vlan,
        mac: branch.mac,
        address,
        subnet: (branch.subnet, branch.subnet_len),
        trunk_mac: branch.trunk_mac,
    })
}

/// The daemon's answer as the pod's address, if it is what the configuration prepared the pod for.
fn pod_address(conf: &NetConf, allocation: proto::Allocation) -> Result<PodAddress, CniError> {
    let wanted_egress = conf.ipv6 && conf.v4_egress;
    if allocation.address.is_ipv6() != conf.ipv6 || allocation.egress_v4.is_some() != wanted_egress
    {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!(
                "vpc-ipamd gave {} (IPv4 egress {:?}) but the configuration says enableIPv6={}, \
                 enableV4Egress={}: the conflist and the daemon's ENABLE_IPv6/ENABLE_V4_EGRESS \
                 disagree (vpcctl install writes the conflist from the same settings)",
                allocation.address, allocation.egress_v4, conf.ipv6, conf.v4_egress
            ),
        ));
    }
    let host_routes = match allocation.branch {
        Some(branch) => {
            branch_link(allocation.address, branch)?;
            datapath::branch::host_routes(conf.pod_sg_enforcing)
        }
        None => HostRoutes::Main,
    };
    Ok(PodAddress {
        address: allocation.address,
        route_table: allocation.route_table,
        egress_v4: allocation.egress_v4,
        host_routes,
    })
}

fn daemon_error(conf: &NetConf, e: ProtoError) -> CniError {
    match e {
        ProtoError::Connect { .. } => CniError::new(
            Code::TryAgainLater,
            format!(
                "vpc-ipamd is not reachable at {}",
                conf.ipamd_socket.display()
            ),
        )
        .details(e.to_string()),
        other => CniError::new(Code::Internal, other.to_string()),
    }
}

fn reply_error(kind: ErrorKind, message: String) -> CniError {
    let code = match kind {
        ErrorKind::NoAddressAvailable | ErrorKind::Unavailable => Code::TryAgainLater,
        ErrorKind::VersionMismatch | ErrorKind::BadRequest | ErrorKind::Internal => Code::Internal,
    };
    CniError::new(code, format!("vpc-ipamd: {message}"))
}

fn add(env: &Env, conf: &NetConf, log: &Log) -> Result<String, CniError> {
    env.validate(true)?;
    let args = K8sArgs::parse(&env.args)?;
    let netns = NetNs::open(&env.netns)?;
    let link = PodLink {
        host_veth: host_veth(env, conf, &args),
        ifname: env.ifname.clone(),
        mtu: conf.mtu,
        family: family(env, conf, &args),
    };
    let request = Request::Add {
        attachment: attachment(env, conf),
        pod: pod_ref(&args),
        netns: env.netns.clone(),
    };
    // The address goes back at once rather than waiting for the runtime's DEL.
    let give_back = |address| {
        let give_back = Request::Del {
            attachment: attachment(env, conf),
            pod: Some(pod_ref(&args)),
            reason: DelReason::SetupFailed,
        };
        if let Err(del_error) = proto::call(&conf.ipamd_socket, &give_back, OTHER_TIMEOUT) {
            log.write(&format!(
                "could not return {address} after a failed ADD: {del_error}"
            ));
        }
    };
    // A branch ENI (security groups for pods) is wired once the pod is: its VLAN comes last.
    let branch = std::cell::Cell::new(None);
    let allocate = || match proto::call(&conf.ipamd_socket, &request, ADD_TIMEOUT)
        .map_err(|e| daemon_error(conf, e))?
    {
        Reply::Added { allocation } => {
            branch.set(allocation.branch);
            pod_address(conf, allocation).inspect_err(|_| give_back(allocation.address))
        }
        Reply::Error { kind, message } => Err(reply_error(kind, message)),
        other => Err(CniError::new(
            Code::Internal,
            format!("vpc-ipamd answered ADD with {other:?}"),
        )),
    };
    let (wired, allocated) = match pod::add(&netns, &link, allocate) {
        Ok(done) => done,
        Err(AddError::Allocation(e)) => return Err(e),
        Err(AddError::Wiring { error, allocated }) => {
            if let Some(allocated) = allocated {
                give_back(allocated.address);
            }
            return Err(error.into());
        }
    };
    if let Some(b) = branch.get() {
        let b = branch_link(allocated.address, b)?;
        if let Err(e) = datapath::branch::finish(&link.host_veth, &b, conf.pod_sg_enforcing) {
            give_back(allocated.address);
            return Err(e.into());
        }
        log.write(&format!(
            "branch ENI: VLAN {} ({:?})",
            b.vlan, conf.pod_sg_enforcing
        ));
    }
    log.write(&format!(
        "added {} table {} on {} (IPv4 egress {:?})",
        allocated.address, allocated.route_table, link.host_veth, allocated.egress_v4
    ));
    let egress_veth = egress_veth(env, conf, &args);
    Ok(result::AddResult {
        cni_version: &conf.cni_version,
        host_veth: &link.host_veth,
        host_mac: wired.host_mac,
        ifname: &env.ifname,
        pod_mac: wired.pod_mac,
        netns: &env.netns,
        address: allocated.address,
        egress: egress_veth
            .as_deref()
            .zip(wired.egress_macs)
            .map(|(veth, (host_mac, pod_mac))| (veth, host_mac, pod_mac)),
        branch: branch.get().map(|b| (b.vlan, b.mac)),
    }
    .to_json()
    .to_string())
}

/// Releases the address and removes the host state. Succeeds when things are already gone, and
/// when the daemon is down: the host state is then found from prevResult and the daemon's own
/// reconciliation returns the address later.
fn del(env: &Env, conf: &NetConf, log: &Log) -> Result<(), CniError> {
    env.validate(false)?;
    let args = K8sArgs::parse(&env.args)?;
    let recorded = match conf
        .prev_result
        .as_ref()
        .map(|p| result::recorded(p, &env.ifname))
    {
        Some(Ok(recorded)) => Some(recorded),
        Some(Err(e)) => {
            log.write(&format!("ignoring prevResult: {}", e.msg));
            None
        }
        None => None,
    };
    let request = Request::Del {
        attachment: attachment(env, conf),
        pod: Some(pod_ref(&args)),
        reason: DelReason::PodDeleted,
    };
    let released = match proto::call(&conf.ipamd_socket, &request, OTHER_TIMEOUT) {
        Ok(Reply::Deleted { released }) => released,
        Ok(other) => {
            log.write(&format!("vpc-ipamd answered DEL with {other:?}"));
            None
        }
        Err(e) => {
            log.write(&format!("cleaning up from prevResult: {e}"));
            None
        }
    };
    let host_veth = recorded
        .as_ref()
        .map(|r| r.host_veth.clone())
        .unwrap_or_else(|| host_veth(env, conf, &args));
    // A branch pod's VLAN, from the daemon or else from prevResult (on EKS the daemon cannot
    // find it once the pod object is gone).
    let address = released
        .map(|a| a.address)
        .or_else(|| recorded.as_ref().map(|r| r.address));
    let branch = match released {
        Some(a) => a.branch.map(|b| (b.vlan, b.mac)),
        None => None,
    }
    .or_else(|| recorded.as_ref().and_then(|r| r.branch));
    match (address, branch) {
        (Some(std::net::IpAddr::V4(address)), Some((vlan, mac))) => {
            datapath::branch::remove(&host_veth, vlan, &mac, address)?
        }
        (Some(address), _) => pod::remove(&host_veth, address)?,
        (None, _) => {}
    }
    // The egress pair itself goes with the pod's namespace; its route is taken now, as its
    // address may be given to the next pod.
    let egress_veth = recorded
        .as_ref()
        .and_then(|r| r.egress_veth.clone())
        .or_else(|| egress_veth(env, conf, &args));
    if let (Some(veth), Some(egress)) = (egress_veth, released.and_then(|a| a.egress_v4)) {
        pod::remove_egress(&veth, egress)?;
    }
    Ok(())
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    if !conf.version_at_least(0, 4) {
        return Err(CniError::new(
            Code::IncompatibleVersion,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, not {}",
                conf.cni_version
            ),
        ));
    }
    env.validate(true)?;
    let args = K8sArgs::parse(&env.args)?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(Code::InvalidConfig, "CHECK needs prevResult"))?;
    let recorded = result::recorded(prev, &env.ifname)?;
    let netns = NetNs::open(&env.netns)?;
    let lookup = Request::Lookup {
        attachment: attachment(env, conf),
        pod: Some(pod_ref(&args)),
    };
    let allocation = match proto::call(&conf.ipamd_socket, &lookup, OTHER_TIMEOUT)
        .map_err(|e| daemon_error(conf, e))?
    {
        Reply::Found {
            allocation: Some(allocation),
        } => allocation,
        Reply::Found { allocation: None } => {
            return Err(CniError::new(
                Code::CheckFailed,
                format!(
                    "vpc-ipamd has no address for this attachment (prevResult says {})",
                    recorded.address
                ),
            ))
        }
        Reply::Error { kind, message } => return Err(reply_error(kind, message)),
        other => {
            return Err(CniError::new(
                Code::Internal,
                format!("vpc-ipamd answered CHECK with {other:?}"),
            ))
        }
    };
    let mut problems = Vec::new();
    if allocation.address != recorded.address {
        problems.push(format!(
            "vpc-ipamd assigned {}, prevResult says {}",
            allocation.address, recorded.address
        ));
    }
    let branch = allocation
        .branch
        .map(|b| branch_link(allocation.address, b))
        .transpose()?;
    let host_routes = match branch {
        Some(_) => datapath::branch::host_routes(conf.pod_sg_enforcing),
        None => HostRoutes::Main,
    };
    if let Some(b) = &branch {
        problems.extend(datapath::branch::check(
            &recorded.host_veth,
            b,
            conf.pod_sg_enforcing,
        )?);
    }
    problems.extend(pod::check(
        &netns,
        &PodNetwork {
            link: PodLink {
                host_veth: recorded.host_veth,
                ifname: env.ifname.clone(),
                mtu: conf.mtu,
                family: family(env, conf, &args),
            },
            address: PodAddress {
                address: recorded.address,
                route_table: allocation.route_table,
                egress_v4: allocation.egress_v4,
                host_routes,
            },
        },
    )?);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            Code::CheckFailed,
            "the pod's network differs from what ADD set up",
        )
        .details(problems.join("; ")))
    }
}

fn require_1_1(conf: &NetConf, command: &str) -> Result<(), CniError> {
    if conf.version_at_least(1, 1) {
        Ok(())
    } else {
        Err(CniError::new(
            Code::IncompatibleVersion,
            format!("{command} needs cniVersion 1.1.0, not {}", conf.cni_version),
        ))
    }
}

fn status(conf: &NetConf) -> Result<(), CniError> {
    require_1_1(conf, "STATUS")?;
    match proto::call(&conf.ipamd_socket, &Request::Status, OTHER_TIMEOUT) {
        Ok(Reply::Status { ready: true, .. }) => Ok(()),
        Ok(Reply::Status {
            ready: false,
            detail,
            ..
        }) => Err(CniError::new(
            Code::NotAvailable,
            format!("vpc-ipamd is not ready: {detail}"),
        )),
        Ok(other) => Err(CniError::new(
            Code::NotAvailable,
            format!("vpc-ipamd answered STATUS with {other:?}"),
        )),
        Err(e) => Err(CniError::new(
            Code::NotAvailable,
            format!("vpc-ipamd is not reachable: {e}"),
        )),
    }
}

fn gc(conf: &NetConf, log: &Log) -> Result<(), CniError> {
    require_1_1(conf, "GC")?;
    let valid = conf
        .valid_attachments
        .iter()
        .flatten()
        .map(|a| Attachment {
            network: conf.name.clone(),
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
        })
        .collect();
    let request = Request::Gc {
        network: conf.name.clone(),
        valid,
    };
    let keep = match proto::call(&conf.ipamd_socket, &request, OTHER_TIMEOUT)
        .map_err(|e| daemon_error(conf, e))?
    {
        Reply::Collected { keep, released } => {
            log.write(&format!("vpc-ipamd released {released} stale assignments"));
            keep
        }
        Reply::Error { kind, message } => return Err(reply_error(kind, message)),
        other => {
            return Err(CniError::new(
                Code::Internal,
                format!("vpc-ipamd answered GC with {other:?}"),
            ))
        }
    };
    let removed = pod::collect_leftovers(&conf.veth_prefix, &keep.into_iter().collect())?;
    for item in removed {
        log.write(&format!("gc removed {item}"));
    }
    Ok(())
}

/// Appends lines to `pluginLogFile`; silent without one. A log that cannot be written never fails
/// the command.
struct Log {
    file: Option<std::path::PathBuf>,
    prefix: String,
}

impl Log {
    fn new(conf: &NetConf, env: &Env) -> Self {
        Self {
            file: conf.plugin_log_file.clone(),
            prefix: format!("{} {} {}", env.command, env.container_id, env.ifname),
        }
    }

    fn write(&self, message: &str) {
        let Some(path) = &self.file else { return };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{now:.3} {} {message}", self.prefix);
        }
    }
}
