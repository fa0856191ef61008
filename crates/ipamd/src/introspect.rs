//! The HTTP endpoints: introspection (`/v1/...`, upstream's shapes where upstream has them) on
//! INTROSPECTION_BIND_ADDRESS, and `/metrics`, `/healthz`, `/readyz` on the metrics address. Every
//! answer about the pool is read by the control loop itself, so it is never torn.

use crate::control::{Control, Event, Phase};
use crate::http::{Response, Routes};
use ipam::config::Config;
use ipam::settings::PoolSettings;
use ipam::Ipv4Cidr;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Asks the control loop; `None` if it does not answer in time (a wedged loop fails /healthz).
pub async fn ask<T: Send + 'static>(
    events: &mpsc::UnboundedSender<Event>,
    question: impl FnOnce(&Control) -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = oneshot::channel();
    events
        .send(Event::Inspect(Box::new(move |control| {
            let _ = tx.send(question(control));
        })))
        .ok()?;
    tokio::time::timeout(Duration::from_secs(2), rx)
        .await
        .ok()?
        .ok()
}

/// Go's encoding of a net.IPMask in JSON: base64 of the mask's bytes.
fn mask_base64(prefix_len: u8) -> String {
    let mask = u32::MAX
        .checked_shl(32 - prefix_len as u32)
        .unwrap_or(0)
        .to_be_bytes();
    base64(&mask)
}

fn mask_base64_v6(prefix_len: u8) -> String {
    let mask = u128::MAX
        .checked_shl(128 - prefix_len as u32)
        .unwrap_or(0)
        .to_be_bytes();
    base64(&mask)
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let bits = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(bits >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn rfc3339_nanos(nanos: u64) -> String {
    cloud::gc::format_rfc3339(UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// Go's zero time, which upstream prints for "never".
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// `/v1/enis`: upstream's shape. Container ids and interface names are left out, as upstream does.
pub fn enis(control: &Control) -> Value {
    let pool = control.pool();
    let owners: HashMap<Ipv4Addr, _> = pool.assignments().map(|(k, a)| (a.ip, (k, a))).collect();
    let stats = pool.stats();
    let mut enis = Map::new();
    for eni in pool.enis() {
        let mut cidrs = Map::new();
        for block in eni.blocks() {
            let mut addresses = Map::new();
            for i in 0..block.size() {
                let ip = block.cidr.nth(i);
                let entry = match owners.get(&ip) {
                    Some((key, a)) => json!({
                        "Address": ip.to_string(),
                        "IPAMKey": {"networkName": key.network_name, "containerID": "", "ifName": ""},
                        "IPAMMetadata": {"k8sPodNamespace": a.meta.namespace, "k8sPodName": a.meta.name},
                        "AssignedTime": rfc3339_nanos(a.assigned_at.as_nanos()),
                        "UnassignedTime": ZERO_TIME,
                    }),
                    None => json!({
                        "Address": ip.to_string(),
                        "IPAMKey": {"networkName": "", "containerID": "", "ifName": ""},
                        "IPAMMetadata": {},
                        "AssignedTime": ZERO_TIME,
                        "UnassignedTime": ZERO_TIME,
                    }),
                };
                addresses.insert(ip.to_string(), entry);
            }
            cidrs.insert(
                block.cidr.to_string(),
                json!({
                    "Cidr": {"IP": block.cidr.addr().to_string(), "Mask": mask_base64(block.cidr.prefix_len())},
                    "IPAddresses": addresses,
                    "IsPrefix": block.is_prefix(),
                    "AddressFamily": "4",
                }),
            );
        }
        enis.insert(
            eni.info.id.clone(),
            json!({
                "ID": eni.info.id,
                "IsPrimary": eni.info.is_primary,
                "IsTrunk": eni.info.is_trunk,
                "IsEFA": eni.info.is_efa,
                "DeviceNumber": eni.info.device_number,
                "AvailableIPv4Cidrs": cidrs,
                "IPv6Cidrs": match control.v6().filter(|_| eni.info.is_primary) {
                    Some(v6) => ipv6_cidrs(v6),
                    None => json!({}),
                },
                "IsExcludedForPodIPs": eni.info.excluded || !pool.gives_pod_addresses(eni),
                "RouteTableID": eni.info.route_table(),
                "SubnetID": eni.info.subnet_id,
            }),
        );
    }
    let gauges = control.gauges();
    let (total, assigned) = match control.v6() {
        Some(_) => (gauges.total_addresses, gauges.assigned_addresses),
        None => (stats.total, stats.assigned),
    };
    json!({"0": {"TotalIPs": total, "AssignedIPs": assigned, "ENIs": enis}})
}

/// An IPv6 node's /80 in upstream's shape, with the /128s assigned from it (the free ones are
/// 2^48 and not listed).
fn ipv6_cidrs(v6: &ipam::v6::V6Pool) -> Value {
    let prefix = v6.prefix();
    let addresses: Map<String, Value> = v6
        .assignments()
        .map(|(key, a)| {
            (
                a.ip.to_string(),
                json!({
                    "Address": a.ip.to_string(),
                    "IPAMKey": {"networkName": key.network_name, "containerID": "", "ifName": ""},
                    "IPAMMetadata": {"k8sPodNamespace": a.meta.namespace, "k8sPodName": a.meta.name},
                    "AssignedTime": rfc3339_nanos(a.assigned_at.as_nanos()),
                    "UnassignedTime": ZERO_TIME,
                    "EgressIPv4": a.egress_v4.map(|e| e.to_string()),
                }),
            )
        })
        .collect();
    json!({
        prefix.to_string(): {
            "Cidr": {"IP": prefix.addr().to_string(), "Mask": mask_base64_v6(prefix.prefix_len())},
            "IPAddresses": addresses,
            "IsPrefix": true,
            "AddressFamily": "6",
        }
    })
}

/// `/v1/pods`: one entry per assignment.
pub fn pods(control: &Control) -> Value {
    let mut pods: Vec<Value> = control
        .pool()
        .assignments()
        .map(|(k, a)| {
            json!({
                "namespace": a.meta.namespace,
                "name": a.meta.name,
                "network": k.network_name,
                "ip": a.ip.to_string(),
                "eni": a.eni,
                "deviceNumber": a.device_number,
                "routeTable": a.route_table,
                "assignedTime": rfc3339_nanos(a.assigned_at.as_nanos()),
            })
        })
        .collect();
    if let Some(v6) = control.v6() {
        let eni = control
            .pool()
            .enis()
            .iter()
            .find(|e| e.info.is_primary)
            .map(|e| e.info.id.clone());
        pods.extend(v6.assignments().map(|(k, a)| {
            json!({
                "namespace": a.meta.namespace,
                "name": a.meta.name,
                "network": k.network_name,
                "ip": a.ip.to_string(),
                "egressIPv4": a.egress_v4.map(|e| e.to_string()),
                "eni": eni,
                "deviceNumber": 0,
                "routeTable": datapath::MAIN_TABLE,
                "assignedTime": rfc3339_nanos(a.assigned_at.as_nanos()),
            })
        }));
    }
    if let Some(b) = control.node_branches() {
        pods.extend(b.given().map(|(k, meta, branch)| {
            json!({
                "namespace": meta.map(|m| m.namespace.as_str()),
                "name": meta.map(|m| m.name.as_str()),
                "network": k.network_name,
                "ip": branch.ip.to_string(),
                "eni": branch.eni_id,
                "vlan": branch.vlan,
                "routeTable": datapath::branch::route_table(branch.vlan),
                "securityGroups": branch.groups.groups(),
            })
        }));
    }
    pods.sort_by_key(|p| (p["namespace"].to_string(), p["name"].to_string()));
    Value::Array(pods)
}

fn branch_json(branch: &ipam::branches::Branch) -> Value {
    json!({
        "eni": branch.eni_id,
        "ip": branch.ip.to_string(),
        "vlan": branch.vlan,
        "associationID": branch.association_id,
        "securityGroups": branch.groups.groups(),
    })
}

/// `/v1/branches`, where the node makes its branch ENIs: the trunk, the limit and warm target, each
/// pod's branch, the warm ones, and how many pods wait; None otherwise.
pub fn branches(control: &Control) -> Option<Value> {
    let b = control.node_branches()?;
    let engine = b.engine();
    let settings = engine.settings();
    Some(json!({
        "trunk": engine.trunk().map(|t| &t.eni_id),
        "limit": settings.limit,
        "warmTarget": settings.warm_target,
        "given": b.given().map(|(_, meta, branch)| {
            let mut v = branch_json(branch);
            v["pod"] = json!(meta.map(|m| format!("{}/{}", m.namespace, m.name)));
            v
        }).collect::<Vec<_>>(),
        "warm": engine.warm_branches().map(branch_json).collect::<Vec<_>>(),
        "waiting": engine.waiting(),
        "inFlight": engine.in_flight(),
    }))
}

/// `/v1/status`: what `vpcctl status` shows.
pub fn status(control: &Control) -> Value {
    let mut stats = control.pool().stats();
    let node = &control.pool().node;
    let v6 = control.v6().map(|v6| {
        // An IPv6 node's addresses are bounded by max-pods alone.
        let gauges = control.gauges();
        stats.total = gauges.total_addresses;
        stats.assigned = gauges.assigned_addresses;
        stats.available = stats.total - stats.assigned;
        stats.cooling = 0;
        stats.prefixes = 1;
        json!({
            "prefix": v6.prefix().to_string(),
            "assigned": v6.assigned(),
            "egressIPv4": v6.egress(),
        })
    });
    let mut status = json!({
        "phase": match control.phase() {
            Phase::Warming => "warming",
            Phase::Ready => "ready",
            Phase::Draining { .. } => "draining",
        },
        "instanceType": node.instance_type,
        "maxPods": node.max_pods,
        "enis": control.pool().enis().len(),
        "maxEnis": node.max_enis,
        "addresses": {
            "total": stats.total,
            "assigned": stats.assigned,
            "coolingDown": stats.cooling,
            "available": stats.available,
            "prefixes": stats.prefixes,
        },
        "pendingAdds": control.waiting(),
        "ec2ActionsInFlight": control.actions_in_flight(),
        "stalled": control.stall_detail(),
    });
    if let Some(v6) = v6 {
        status["ipv6"] = v6;
    }
    status
}

fn cidr_list(cidrs: &[Ipv4Cidr]) -> Vec<String> {
    cidrs.iter().map(|c| c.to_string()).collect()
}

pub fn networkutils_settings(config: &Config) -> Value {
    json!({
        "AWS_VPC_K8S_CNI_CONNMARK": config.connmark,
        "AWS_VPC_K8S_CNI_EXCLUDE_SNAT_CIDRS": cidr_list(&config.exclude_snat_cidrs),
        "AWS_VPC_K8S_CNI_EXTERNALSNAT": config.external_snat,
        "AWS_EXTERNAL_SERVICE_CIDRS": cidr_list(&config.external_service_cidrs),
        "AWS_VPC_ENI_MTU": config.eni_mtu,
        "AWS_VPC_K8S_CNI_VETHPREFIX": config.veth_prefix,
        "AWS_VPC_CNI_NODE_PORT_SUPPORT": config.node_port_support,
        "AWS_VPC_K8S_CNI_RANDOMIZESNAT": config.randomize_snat.upstream_code(),
    })
}

/// Upstream's `/v1/ipamd-env-settings`, with the pool's settings as they are now (a ConfigMap
/// change applies the live ones without a restart).
pub fn ipamd_settings(config: &Config, live: &PoolSettings) -> Value {
    json!({
        "WARM_IP_TARGET": live.warm_ip_target,
        "WARM_ENI_TARGET": live.warm_eni_target,
        "MINIMUM_IP_TARGET": live.minimum_ip_target,
        "WARM_PREFIX_TARGET": live.warm_prefix_target,
        "ENABLE_PREFIX_DELEGATION": live.prefix_delegation,
        "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": live.custom_networking,
        "AWS_MANAGE_ENIS_NON_SCHEDULABLE": live.manage_enis_non_schedulable,
        "ENABLE_SUBNET_DISCOVERY": live.subnet_discovery,
        "IP_COOLDOWN_PERIOD": live.ip_cooldown.as_secs(),
        "MAX_ENI": live.max_eni,
        "VPC_CNI_VERSION": config.vpc_cni_version,
    })
}

/// `/v1/config`: the pool's settings now and where each came from; what the ConfigMap set that
/// was refused, belongs to another component, or waits for a restart.
fn settings(control: &Control) -> Value {
    let (live, view) = control.settings();
    json!({
        "precedence": format!(
            "the ConfigMap {}/{} over the environment",
            ipam::config_map::NAMESPACE,
            view.name
        ),
        "configMap": match view.config_map {
            None => json!("not read (no API server, or VPC_CNI_CONFIG_MAP empty)"),
            Some(false) => json!("absent"),
            Some(true) => json!({"keys": view.keys, "refused": view.refused, "others": view.others}),
        },
        "live": {
            "WARM_ENI_TARGET": live.warm_eni_target,
            "WARM_IP_TARGET": live.warm_ip_target,
            "MINIMUM_IP_TARGET": live.minimum_ip_target,
            "WARM_PREFIX_TARGET": live.warm_prefix_target,
            "MAX_ENI": live.max_eni,
            "IP_COOLDOWN_PERIOD": live.ip_cooldown.as_secs(),
        },
        "pendingRestart": view.pending_restart,
    })
}

fn eni_config(control: &Control) -> Option<Value> {
    let (source, spec) = control.eni_config()?;
    Some(json!({
        "source": source,
        "subnet": spec.subnet,
        "securityGroups": spec.security_groups,
    }))
}

const COMMANDS: &[&str] = &[
    "/v1/enis",
    "/v1/pods",
    "/v1/status",
    "/v1/eni-configs",
    "/v1/branches",
    "/v1/network-policy",
    "/v1/networkutils-env-settings",
    "/v1/ipamd-env-settings",
    "/v1/config",
];

pub fn introspection_routes(
    events: mpsc::UnboundedSender<Event>,
    config: Arc<Config>,
    network_policy: Option<mpsc::UnboundedSender<crate::netpol::Input>>,
) -> Routes {
    Arc::new(move |path: String| {
        let events = events.clone();
        let config = config.clone();
        let network_policy = network_policy.clone();
        Box::pin(async move {
            let from_loop = |answer: Option<Value>| match answer {
                Some(v) => Response::json(&v),
                None => Response::text(503, "the control loop did not answer"),
            };
            match path.as_str() {
                "/" => Response::json(&json!({ "AvailableCommands": COMMANDS })),
                "/v1/enis" => from_loop(ask(&events, enis).await),
                "/v1/pods" => from_loop(ask(&events, pods).await),
                "/v1/status" => from_loop(ask(&events, status).await),
                "/v1/branches" => match ask(&events, branches).await {
                    Some(Some(v)) => Response::json(&v),
                    Some(None) => Response::text(
                        404,
                        "this node does not make branch ENIs (POD_ENI_MANAGER=node)",
                    ),
                    None => Response::text(503, "the control loop did not answer"),
                },
                "/v1/eni-configs" => match ask(&events, eni_config).await {
                    Some(Some(config)) => Response::json(&config),
                    Some(None) => Response::text(404, "this node has no ENIConfig"),
                    None => Response::text(503, "the control loop did not answer"),
                },
                "/v1/network-policy" => match network_policy {
                    None => Response::text(
                        404,
                        "NetworkPolicy is not enforced on this node (ENABLE_NETWORK_POLICY)",
                    ),
                    Some(enforcer) => {
                        let (tx, rx) = oneshot::channel();
                        let _ = enforcer.send(crate::netpol::Input::Inspect(tx));
                        match tokio::time::timeout(Duration::from_secs(2), rx).await {
                            Ok(Ok(view)) => Response::json(&view),
                            _ => Response::text(503, "the NetworkPolicy task did not answer"),
                        }
                    }
                },
                "/v1/networkutils-env-settings" => Response::json(&networkutils_settings(&config)),
                "/v1/ipamd-env-settings" => {
                    let config = config.clone();
                    from_loop(ask(&events, move |c| ipamd_settings(&config, c.settings().0)).await)
                }
                "/v1/config" => from_loop(ask(&events, settings).await),
                _ => Response::text(
                    404,
                    format!("no such endpoint; try {}", COMMANDS.join(", ")),
                ),
            }
        })
    })
}

/// The packets each isolated pod's NetworkPolicy chains dropped, as Prometheus text: the pods from
/// the enforcer, the counts from the table's counters.
async fn policy_drops(enforcer: &mpsc::UnboundedSender<crate::netpol::Input>) -> String {
    let (tx, rx) = oneshot::channel();
    if enforcer.send(crate::netpol::Input::Pods(tx)).is_err() {
        return String::new();
    }
    let Ok(Ok(pods)) = tokio::time::timeout(Duration::from_secs(2), rx).await else {
        return String::new();
    };
    let counts = match tokio::task::spawn_blocking(datapath::netpol::dropped).await {
        Ok(Ok(counts)) => counts,
        _ => return String::new(),
    };
    let mut out = String::from(
        "# HELP vpccni_network_policy_dropped_packets_total Packets a pod's NetworkPolicies dropped, by direction\n\
         # TYPE vpccni_network_policy_dropped_packets_total counter\n",
    );
    for (namespace, name, veth) in pods {
        for (prefix, direction) in [("in", "ingress"), ("eg", "egress")] {
            if let Some(n) = counts.get(&format!("{prefix}-{veth}")) {
                out += &format!(
                    "vpccni_network_policy_dropped_packets_total{{namespace=\"{namespace}\",pod=\"{name}\",direction=\"{direction}\"}} {n}\n"
                );
            }
        }
    }
    out
}

pub fn metrics_routes(
    events: mpsc::UnboundedSender<Event>,
    metrics: Arc<crate::metrics::Metrics>,
    network_policy: Option<mpsc::UnboundedSender<crate::netpol::Input>>,
) -> Routes {
    Arc::new(move |path: String| {
        let events = events.clone();
        let metrics = metrics.clone();
        let network_policy = network_policy.clone();
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => match ask(&events, |c| c.gauges()).await {
                    Some(gauges) => {
                        let mut body = metrics.render(&gauges);
                        if let Some(enforcer) = &network_policy {
                            body += &policy_drops(enforcer).await;
                        }
                        Response {
                            status: 200,
                            content_type: "text/plain; version=0.0.4",
                            body,
                        }
                    }
                    None => Response::text(503, "the control loop did not answer"),
                },
                "/healthz" => match ask(&events, |_| ()).await {
                    Some(()) => Response::text(200, "ok"),
                    None => Response::text(503, "the control loop did not answer"),
                },
                "/readyz" => match ask(&events, |c| c.phase()).await {
                    Some(Phase::Ready) => Response::text(200, "ready"),
                    Some(Phase::Warming) => Response::text(503, "initialising"),
                    Some(Phase::Draining { .. }) => Response::text(503, "stopping"),
                    None => Response::text(503, "the control loop did not answer"),
                },
                _ => Response::text(404, "try /metrics, /healthz or /readyz"),
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_encode_as_go_does() {
        assert_eq!(mask_base64(32), "/////w==");
        assert_eq!(mask_base64(28), "////8A==");
        assert_eq!(mask_base64(24), "////AA==");
        assert_eq!(mask_base64(0), "AAAAAA==");
        assert_eq!(mask_base64_v6(80), "/////////////wAAAAAAAA==");
        assert_eq!(mask_base64_v6(128), "/////////////////////w==");
    }
}
