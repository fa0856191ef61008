//! The Amazon VPC CNI's host rules, removed when we take a node over from it. Left in place they keep
//! SNATing and marking after the switch: its `AWS-SNAT-CHAIN-0` SNATs to the node's address with its
//! own exemptions, its connmark chains mark what our table does not, and its nftables connmark table
//! does the same when it ran its nft backend. It wrote them with iptables-legacy or iptables-nft
//! (whichever the host's iptables was), IPv4 or IPv6: each is read with its own `*-save` and cleaned
//! in one `*-restore --noflush` transaction per table.

use crate::{Context, Error, Result};
use std::io::Write;
use std::process::{Command, Stdio};

/// Upstream's chains: `AWS-SNAT-CHAIN-<n>` and `AWS-CONNMARK-CHAIN-<n>` (older releases numbered
/// several).
const CHAIN_PREFIXES: [&str; 2] = ["AWS-SNAT-CHAIN-", "AWS-CONNMARK-CHAIN-"];
/// Comments upstream puts on the rules it adds to the built-in chains.
const COMMENTS: [&str; 4] = [
    "\"AWS SNAT CHAIN\"",
    "\"AWS, primary ENI\"",
    "\"AWS, outbound connections\"",
    "\"AWS, CONNMARK\"",
];
/// The table of upstream's nftables connmark backend.
const NFT_TABLE: &str = "aws-cni";
/// The iptables front ends that may hold upstream's rules, as (save, restore).
const TOOLS: [(&str, &str); 4] = [
    ("iptables-legacy-save", "iptables-legacy-restore"),
    ("iptables-nft-save", "iptables-nft-restore"),
    ("ip6tables-legacy-save", "ip6tables-legacy-restore"),
    ("ip6tables-nft-save", "ip6tables-nft-restore"),
];

fn is_upstream_chain(name: &str) -> bool {
    CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// From `*-save` output, the `*-restore --noflush` input that deletes upstream's rules from the
/// built-in chains and then flushes and deletes its chains, one transaction per table; None when
/// nothing of upstream's is there. Nothing else is touched (kube-proxy's chains live alongside).
pub fn removal_script(saved: &str) -> Option<String> {
    let mut script = String::new();
    let mut table: Option<&str> = None;
    let mut deletes: Vec<String> = Vec::new();
    let mut chains: Vec<&str> = Vec::new();
    let mut finish = |table: Option<&str>, deletes: &mut Vec<String>, chains: &mut Vec<&str>| {
        if let Some(t) = table {
            if !deletes.is_empty() || !chains.is_empty() {
                script.push_str(&format!("*{t}\n"));
                for d in deletes.iter() {
                    script.push_str(&format!("{d}\n"));
                }
                for c in chains.iter() {
                    script.push_str(&format!("-F {c}\n"));
                }
                for c in chains.iter() {
                    script.push_str(&format!("-X {c}\n"));
                }
                script.push_str("COMMIT\n");
            }
        }
        deletes.clear();
        chains.clear();
    };
    for line in saved.lines() {
        if let Some(name) = line.strip_prefix('*') {
            finish(table, &mut deletes, &mut chains);
            table = Some(name.trim());
        } else if let Some(declared) = line.strip_prefix(':') {
            let name = declared.split_whitespace().next().unwrap_or_default();
            if is_upstream_chain(name) {
                chains.push(name);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            if is_upstream_chain(chain) {
                continue; // goes with the chain's flush
            }
            let jumps_to_upstream = rule
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && is_upstream_chain(w[1]));
            if jumps_to_upstream || COMMENTS.iter().any(|c| rule.contains(c)) {
                deletes.push(format!("-D {rule}"));
            }
        } else if line.trim() == "COMMIT" {
            finish(table, &mut deletes, &mut chains);
            table = None;
        }
    }
    finish(table, &mut deletes, &mut chains);
    (!script.is_empty()).then_some(script)
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context(|| format!("running {program}"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    if let Some(text) = input {
        stdin
            .write_all(text.as_bytes())
            .context(|| format!("writing to {program}"))?;
    }
    drop(stdin);
    let output = child
        .wait_with_output()
        .context(|| format!("waiting for {program}"))?;
    if !output.status.success() {
        return Err(Error::Invalid(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// What was removed, in words; the front ends that could not be asked (not installed); and what
/// failed, in words (upstream's rules may then still be there: the caller says so loudly).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub removed: Vec<String>,
    pub unavailable: Vec<String>,
    pub failed: Vec<String>,
}

/// Removes upstream's iptables rules and chains from every front end installed, and its nftables
/// connmark table. Idempotent: a node without them is left as it is. A front end that fails (a
/// host whose kernel lacks its tables, say) is reported, not fatal: the node must still come up.
pub fn remove_rules() -> Removed {
    let mut report = Removed::default();
    let not_installed = |e: &Error| matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
    for (save, restore) in TOOLS {
        let saved = match run(save, &[], None) {
            Ok(text) => text,
            Err(e) if not_installed(&e) => {
                report.unavailable.push(save.to_string());
                continue;
            }
            Err(e) => {
                report.failed.push(e.to_string());
                continue;
            }
        };
        if let Some(script) = removal_script(&saved) {
            // --wait: iptables-legacy takes the host's xtables lock, which kube-proxy holds while
            // it rewrites its own rules.
            match run(restore, &["--noflush", "--wait=10"], Some(&script)) {
                Ok(_) => report.removed.extend(
                    script
                        .lines()
                        .filter(|l| l.starts_with("-D ") || l.starts_with("-X "))
                        .map(|l| format!("{save}: {l}")),
                ),
                Err(e) => report.failed.push(e.to_string()),
            }
        }
    }
    match run("nft", &["list", "tables", "ip"], None) {
        Ok(tables) => {
            if tables
                .lines()
                .any(|l| l.trim() == format!("table ip {NFT_TABLE}"))
            {
                match run("nft", &["delete", "table", "ip", NFT_TABLE], None) {
                    Ok(_) => report.removed.push(format!("nft table ip {NFT_TABLE}")),
                    Err(e) => report.failed.push(e.to_string()),
                }
            }
        }
        Err(e) if not_installed(&e) => report.unavailable.push("nft".into()),
        Err(e) => report.failed.push(e.to_string()),
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What iptables-save prints on a node aws-node ran on, with kube-proxy beside it.
    const SAVED: &str = r#"# Generated by iptables-save v1.8.9 on Thu Dec  3 10:00:00 2026
*mangle
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A PREROUTING -i eth0 -m comment --comment "AWS, primary ENI" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80
-A PREROUTING -i eni+ -m comment --comment "AWS, primary ENI" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80
-A PREROUTING -i vlan+ -m comment --comment "AWS, primary ENI" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80
COMMIT
*filter
:INPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:AWS-CONNMARK-CHAIN-0 - [0:0]
:AWS-SNAT-CHAIN-0 - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A PREROUTING -i eni+ -m comment --comment "AWS, outbound connections" -j AWS-CONNMARK-CHAIN-0
-A PREROUTING -m comment --comment "AWS, CONNMARK" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80
-A POSTROUTING -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0
-A AWS-CONNMARK-CHAIN-0 -d 10.0.0.0/16 -m comment --comment "AWS CONNMARK CHAIN, VPC CIDR" -j RETURN
-A AWS-CONNMARK-CHAIN-0 -m comment --comment "AWS, CONNMARK" -j CONNMARK --set-xmark 0x80/0x80
-A AWS-SNAT-CHAIN-0 -d 10.0.0.0/16 -m comment --comment "AWS SNAT CHAIN" -j RETURN
-A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment "AWS, SNAT" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 10.0.0.10 --random-fully
COMMIT
"#;

    #[test]
    fn only_upstreams_rules_and_chains_go() {
        let script = removal_script(SAVED).unwrap();
        assert_eq!(
            script,
            "*mangle\n\
             -D PREROUTING -i eth0 -m comment --comment \"AWS, primary ENI\" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark 0x80/0x80\n\
             -D PREROUTING -i eni+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80\n\
             -D PREROUTING -i vlan+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80\n\
             COMMIT\n\
             *nat\n\
             -D PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0\n\
             -D PREROUTING -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80\n\
             -D POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0\n\
             -F AWS-CONNMARK-CHAIN-0\n\
             -F AWS-SNAT-CHAIN-0\n\
             -X AWS-CONNMARK-CHAIN-0\n\
             -X AWS-SNAT-CHAIN-0\n\
             COMMIT\n"
        );
    }

    #[test]
    fn a_node_without_upstreams_rules_is_left_alone() {
        let kube_only = "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
                         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\nCOMMIT\n";
        assert_eq!(removal_script(kube_only), None);
        assert_eq!(removal_script(""), None);
    }
}
