//! `vpcctl status | enis | pods | metrics`: the daemon's introspection and metrics endpoints as
//! tables, or as JSON with `--json`. Run on the node (the endpoints listen on loopback).

use serde_json::Value;
use std::net::SocketAddr;

#[derive(clap::Args)]
pub struct Target {
    /// The daemon's introspection address (INTROSPECTION_BIND_ADDRESS).
    #[arg(long, default_value = "127.0.0.1:61679")]
    address: SocketAddr,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct MetricsTarget {
    #[arg(long, default_value = "127.0.0.1:61678")]
    address: SocketAddr,
    /// Only the series whose name starts with this.
    #[arg(long)]
    prefix: Option<String>,
}

fn get(address: SocketAddr, path: &str) -> Result<String, String> {
    match proto::http_get(address, path) {
        Ok((200, body)) => Ok(body),
        Ok((status, body)) => Err(format!("{address}{path}: HTTP {status}: {body}")),
        Err(e) => Err(format!("{e} (is vpc-ipamd running on this node?)")),
    }
}

fn get_json(target: &Target, path: &str) -> Result<Value, String> {
    let body = get(target.address, path)?;
    serde_json::from_str(&body).map_err(|e| format!("{path}: {e}"))
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = header
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn status(target: &Target) -> Result<(), String> {
    let s = get_json(target, "/v1/status")?;
    if target.json {
        println!("{s:#}");
        return Ok(());
    }
    let a = &s["addresses"];
    println!("phase:        {}", show(&s["phase"]));
    println!(
        "instance:     {} (max pods {})",
        show(&s["instanceType"]),
        s["maxPods"]
    );
    println!("ENIs:         {} of {}", s["enis"], s["maxEnis"]);
    println!(
        "addresses:    {} total, {} assigned, {} cooling down, {} available, {} prefixes",
        a["total"], a["assigned"], a["coolingDown"], a["available"], a["prefixes"]
    );
    println!("waiting ADDs: {}", s["pendingAdds"]);
    println!("EC2 actions:  {} in flight", s["ec2ActionsInFlight"]);
    if let Some(why) = s["stalled"].as_str().filter(|w| !w.is_empty()) {
        println!("stalled:      {why}");
    }
    Ok(())
}

pub fn enis(target: &Target) -> Result<(), String> {
    let e = get_json(target, "/v1/enis")?;
    if target.json {
        println!("{e:#}");
        return Ok(());
    }
    let mut rows = Vec::new();
    for (id, eni) in e["0"]["ENIs"].as_object().into_iter().flatten() {
        let cidrs = eni["AvailableIPv4Cidrs"].as_object();
        let assigned = cidrs
            .into_iter()
            .flatten()
            .flat_map(|(_, c)| c["IPAddresses"].as_object().into_iter().flatten())
            .filter(|(_, a)| {
                a["IPAMKey"]["networkName"]
                    .as_str()
                    .is_some_and(|n| !n.is_empty())
            })
            .count();
        rows.push(vec![
            id.clone(),
            show(&eni["DeviceNumber"]),
            show(&eni["SubnetID"]),
            show(&eni["RouteTableID"]),
            if eni["IsPrimary"] == Value::Bool(true) {
                "yes"
            } else {
                ""
            }
            .to_string(),
            cidrs.map(|c| c.len()).unwrap_or(0).to_string(),
            assigned.to_string(),
            cidrs
                .map(|c| c.keys().cloned().collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
        ]);
    }
    table(
        &[
            "ENI", "DEVICE", "SUBNET", "TABLE", "PRIMARY", "BLOCKS", "ASSIGNED", "CIDRS",
        ],
        &rows,
    );
    Ok(())
}

pub fn pods(target: &Target) -> Result<(), String> {
    let p = get_json(target, "/v1/pods")?;
    if target.json {
        println!("{p:#}");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = p
        .as_array()
        .into_iter()
        .flatten()
        .map(|pod| {
            vec![
                show(&pod["namespace"]),
                show(&pod["name"]),
                show(&pod["ip"]),
                show(&pod["eni"]),
                show(&pod["routeTable"]),
                show(&pod["assignedTime"]),
            ]
        })
        .collect();
    table(
        &["NAMESPACE", "NAME", "IP", "ENI", "TABLE", "ASSIGNED"],
        &rows,
    );
    Ok(())
}

/// `vpcctl netpol [NAMESPACE/POD]`.
#[derive(clap::Args)]
pub struct NetpolTarget {
    #[command(flatten)]
    target: Target,
    /// Only this pod, as namespace/name.
    pod: Option<String>,
}

/// What each pod's NetworkPolicies allow, a row per grant: who may reach it (ingress) and whom it
/// may reach (egress), on which ports, by which policy.
pub fn netpol(args: &NetpolTarget) -> Result<(), String> {
    let view = get_json(&args.target, "/v1/network-policy")?;
    let wanted = |pod: &Value| {
        args.pod
            .as_deref()
            .is_none_or(|p| format!("{}/{}", show(&pod["namespace"]), show(&pod["name"])) == p)
    };
    let pods: Vec<&Value> = view["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| wanted(p))
        .collect();
    if let Some(p) = &args.pod {
        if pods.is_empty() {
            return Err(format!("{p} is not a pod of this node"));
        }
    }
    if args.target.json {
        println!(
            "{:#}",
            serde_json::json!({"mode": view["mode"], "clusterKnown": view["clusterKnown"], "pods": pods})
        );
        return Ok(());
    }
    let list = |v: &Value| match v {
        Value::Array(items) => items.iter().map(show).collect::<Vec<_>>().join(" "),
        other => show(other),
    };
    let mut rows = Vec::new();
    for pod in pods {
        let name = format!("{}/{}", show(&pod["namespace"]), show(&pod["name"]));
        for direction in ["ingress", "egress"] {
            match &pod[direction] {
                Value::Array(grants) if grants.is_empty() => rows.push(vec![
                    name.clone(),
                    direction.into(),
                    "(isolated)".into(),
                    "nothing".into(),
                    "-".into(),
                ]),
                Value::Array(grants) => rows.extend(grants.iter().map(|g| {
                    vec![
                        name.clone(),
                        direction.into(),
                        show(&g["policy"]),
                        list(&g["peers"]),
                        list(&g["ports"]),
                    ]
                })),
                _ => rows.push(vec![
                    name.clone(),
                    direction.into(),
                    "(no policy)".into(),
                    "any".into(),
                    "any".into(),
                ]),
            }
        }
    }
    println!(
        "mode {}, cluster known: {}",
        show(&view["mode"]),
        show(&view["clusterKnown"])
    );
    table(&["POD", "DIRECTION", "POLICY", "PEERS", "PORTS"], &rows);
    Ok(())
}

pub fn metrics(target: &MetricsTarget) -> Result<(), String> {
    let text = get(target.address, "/metrics")?;
    for line in text.lines() {
        match &target.prefix {
            Some(prefix) if !line.starts_with(prefix.as_str()) => {}
            _ => println!("{line}"),
        }
    }
    Ok(())
}
