//! The manifests under deploy/: every overlay renders with `kubectl kustomize`, validates against the
//! Kubernetes schemas offline (`kubernetes-validate` in the test venv), and the DaemonSet's
//! environment is exactly what its containers read: a setting nobody reads is a typo an operator
//! would never notice, one that is read but not set falls back to its default.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const OVERLAYS: &[&str] = &[
    "default",
    "prefix-delegation",
    "custom-networking",
    "aws-node",
    "ipv6",
    "network-policy",
    "network-policy-eks",
    "security-groups-for-pods",
    "security-groups-for-pods-node",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED deploy_check: {why}");
}

fn tool(path: &Path) -> Option<PathBuf> {
    path.is_file().then(|| path.to_path_buf())
}

/// kubectl is preinstalled on these machines and cannot be installed from Debian: says so when not.
fn kubectl_installed() -> bool {
    let there = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok();
    if !there {
        skip("kubectl is not installed (it cannot be installed from Debian here)");
    }
    there
}

fn render(overlay: &str) -> String {
    render_dir(&root().join("deploy/overlays").join(overlay))
}

fn render_dir(dir: &Path) -> String {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl runs");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `kubernetes-validate` and PyYAML from the test venv, and kubectl; says which is missing.
fn tools() -> Option<(PathBuf, PathBuf)> {
    let venv = root().join(".venv/bin");
    let (Some(validate), Some(python)) = (
        tool(&venv.join("kubernetes-validate")),
        tool(&venv.join("python")),
    ) else {
        skip("kubernetes-validate is not in .venv (scripts/test.sh installs it)");
        return None;
    };
    kubectl_installed().then_some((validate, python))
}

/// Validates rendered manifests against the Kubernetes schemas, offline and strict.
fn assert_valid(validate: &Path, yaml: &str, what: &str) {
    let file = std::env::temp_dir().join(format!("vpc-cni-{what}-{}.yaml", std::process::id()));
    std::fs::write(&file, yaml).unwrap();
    let output = Command::new(validate)
        .arg("--strict")
        .arg(&file)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    let _ = std::fs::remove_file(&file);
    assert!(
        output.status.success() && !report.contains("ERROR"),
        "{what}: {report}"
    );
}

/// The variables a binary's `--help` names as `[env: NAME=...]`.
fn help_variables(binary: &Path, args: &[&str]) -> BTreeSet<String> {
    let output = Command::new(binary)
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    text.match_indices("[env: ")
        .map(|(at, _)| {
            let rest = &text[at + "[env: ".len()..];
            rest[..rest.find(['=', ']']).unwrap()].to_string()
        })
        .collect()
}

fn binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

fn container_variables(
    container: &serde_json::Value,
    configmaps: &[&serde_json::Value],
) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let name = source["configMapRef"]["name"].as_str().unwrap();
        let map = configmaps
            .iter()
            .find(|m| m["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("envFrom names a ConfigMap {name} the overlay lacks"));
        names.extend(map["data"].as_object().unwrap().keys().cloned());
    }
    names
}

#[test]
fn overlays_render_validate_and_set_only_what_the_containers_read() {
    let Some((validate, python)) = tools() else {
        return;
    };
    let Some(ipamd) = binary("vpc-ipamd") else {
        skip("vpc-ipamd is not built (cargo test --workspace builds it)");
        return;
    };
    let mut daemon_reads: BTreeSet<String> = ipam::Config::VARIABLES
        .iter()
        .map(|v| v.to_string())
        .collect();
    daemon_reads.extend(help_variables(&ipamd, &[]));
    assert!(
        daemon_reads.contains("VPC_CNI_IPAMD_SOCKET"),
        "{daemon_reads:?}"
    );
    // The installer: what conflist() looks up, and the environment its command line reads.
    let install = <crate::Cli as clap::CommandFactory>::command();
    let install = install
        .find_subcommand("install")
        .expect("vpcctl has an install command");
    let mut installer_reads: BTreeSet<String> = crate::install::VARIABLES
        .iter()
        .map(|v| v.to_string())
        .collect();
    installer_reads.extend(
        install
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned()),
    );
    assert!(
        installer_reads.contains("HOST_CNI_BIN_PATH"),
        "{installer_reads:?}"
    );

    for overlay in OVERLAYS {
        let yaml = render(overlay);
        assert_valid(&validate, &yaml, overlay);

        let docs = testbed::yaml_documents(&python, &yaml);
        let configmaps: Vec<&serde_json::Value> =
            docs.iter().filter(|d| d["kind"] == "ConfigMap").collect();
        let daemonset = docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet")
            .unwrap_or_else(|| panic!("{overlay} has no DaemonSet"));
        let containers = daemonset["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap();
        let mut read_by_someone = BTreeSet::new();
        for container in containers {
            let set = container_variables(container, &configmaps);
            let reads = match container["name"].as_str().unwrap() {
                // The aws-node overlay names the daemon's container as upstream does.
                "vpc-ipamd" | "aws-node" => &daemon_reads,
                "cni-installer" => &installer_reads,
                other => panic!("{overlay}: unexpected container {other}"),
            };
            read_by_someone.extend(set.intersection(reads).cloned());
            let explicit: BTreeSet<String> = container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["name"].as_str().unwrap().to_string())
                .collect();
            let unread: Vec<_> = explicit.difference(reads).collect();
            assert!(
                unread.is_empty(),
                "{overlay}: {} sets {unread:?}, which it never reads",
                container["name"]
            );
        }
        for map in &configmaps {
            let keys: BTreeSet<String> = map["data"].as_object().unwrap().keys().cloned().collect();
            let unread: Vec<_> = keys.difference(&read_by_someone).collect();
            assert!(
                unread.is_empty(),
                "{overlay}: ConfigMap keys nobody reads: {unread:?}"
            );
        }
        let data = &configmaps[0]["data"];
        let pd = data["ENABLE_PREFIX_DELEGATION"] == "true";
        assert_eq!(
            pd,
            ["prefix-delegation", "ipv6"].contains(overlay),
            "{overlay}"
        );
        let v6 = data["ENABLE_IPv6"] == "true";
        assert_eq!(v6, *overlay == "ipv6", "{overlay}");
        assert_eq!(
            v6,
            data["ENABLE_IPv4"] == "false",
            "{overlay}: exactly one family"
        );
        for eniconfig in docs.iter().filter(|d| d["kind"] == "ENIConfig") {
            assert!(
                eniconfig["spec"]["subnet"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("subnet-")),
                "{eniconfig}"
            );
        }
    }
}

/// What the seeds' runbook asks of `kubectl` (`-l key=value`, `-c container`, `daemonset NAME`,
/// `ds/NAME`) and what its manifests select (`k8s-app: aws-node`, `serviceAccountName`), found in
/// the aws-node overlay as rendered.
#[test]
fn the_seeds_runbook_finds_the_aws_node_overlay() {
    let seeds = root().join("../shared/seeds");
    let Ok(entries) = std::fs::read_dir(&seeds) else {
        skip(&format!("no seeds at {}", seeds.display()));
        return;
    };
    if !kubectl_installed() {
        return;
    }
    let Some(python) = tool(&root().join(".venv/bin/python")) else {
        skip("PyYAML in .venv is needed to read the manifests (scripts/test.sh creates it)");
        return;
    };
    let text: String = entries
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .collect::<Vec<_>>()
        .join("\n");
    let docs = testbed::yaml_documents(&python, &render("aws-node"));
    let of = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind);
    let daemonset = of("DaemonSet").next().expect("a DaemonSet");
    let template = &daemonset["spec"]["template"];
    let containers: Vec<&str> = template["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    // The kubectl commands, continuation lines joined, up to a `--` (what follows runs in the
    // container).
    let mut commands: Vec<String> = Vec::new();
    let mut continued = false;
    for line in text.lines().map(str::trim) {
        let part = line.trim_end_matches('\\');
        if continued {
            commands.last_mut().expect("a command").push_str(part);
        } else if line.starts_with("kubectl ") {
            commands.push(part.to_string());
        } else {
            continue;
        }
        continued = line.ends_with('\\');
    }
    let words: Vec<&str> = commands
        .iter()
        .flat_map(|c| c.split_whitespace().take_while(|w| *w != "--"))
        .collect();
    let mut checked = 0;
    for pair in words.windows(2) {
        match pair {
            ["-l", selector] => {
                let (key, value) = selector.split_once('=').expect("key=value");
                assert_eq!(
                    template["metadata"]["labels"][key], *value,
                    "the runbook selects pods by {selector}"
                );
                checked += 1;
            }
            ["-c", container] => {
                assert!(
                    containers.contains(container),
                    "the runbook reads container {container}; the DaemonSet has {containers:?}"
                );
                checked += 1;
            }
            ["daemonset", name] if !name.starts_with('-') => {
                assert_eq!(
                    daemonset["metadata"]["name"], *name,
                    "kubectl ... daemonset {name}"
                );
                checked += 1;
            }
            [word, _] if word.starts_with("ds/") => {
                assert_eq!(
                    daemonset["metadata"]["name"],
                    word[3..],
                    "kubectl ... {word}"
                );
                checked += 1;
            }
            _ => {}
        }
    }
    assert!(
        checked >= 5,
        "the seeds name too few selectors to check: {checked}"
    );
    // Their manifests: the ServiceAccount (IRSA annotates it), and a ServiceMonitor selecting
    // k8s-app: aws-node, which our metrics Service must carry.
    assert!(text.contains("serviceAccountName: aws-node"));
    assert_eq!(template["spec"]["serviceAccountName"], "aws-node");
    assert!(of("ServiceAccount").any(|sa| sa["metadata"]["name"] == "aws-node"));
    let service = of("Service").next().expect("the metrics Service");
    assert_eq!(service["metadata"]["labels"]["k8s-app"], "aws-node");
    assert_eq!(service["spec"]["selector"]["k8s-app"], "aws-node");
    let monitor = of("ServiceMonitor").next().expect("a ServiceMonitor");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["k8s-app"],
        "aws-node"
    );
    assert_eq!(
        daemonset["spec"]["selector"]["matchLabels"],
        serde_json::json!({"k8s-app": "aws-node"})
    );
}

/// deploy/metrics-helper renders, validates, and sets only what the helper reads; its Role grants
/// exactly the pod listing it does.
#[test]
fn the_metrics_helper_manifests_render_validate_and_set_only_what_it_reads() {
    let Some((validate, python)) = tools() else {
        return;
    };
    let Some(helper) = binary("vpc-cni-metrics-helper") else {
        skip("vpc-cni-metrics-helper is not built (cargo test --workspace builds it)");
        return;
    };
    let yaml = render_dir(&root().join("deploy/metrics-helper"));
    assert_valid(&validate, &yaml, "metrics-helper");
    let docs = testbed::yaml_documents(&python, &yaml);
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    let reads = help_variables(&helper, &[]);
    assert!(reads.contains("AWS_CLUSTER_ID"), "{reads:?}");
    for container in deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
    {
        let set = container_variables(container, &[]);
        let unread: Vec<_> = set.difference(&reads).collect();
        assert!(unread.is_empty(), "the helper never reads {unread:?}");
    }
    let role = docs.iter().find(|d| d["kind"] == "Role").expect("a Role");
    assert_eq!(
        role["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}])
    );
    let policy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/metrics-helper/iam-policy.json")).unwrap(),
    )
    .expect("the IAM policy is JSON");
    assert_eq!(
        policy["Statement"][0]["Action"],
        serde_json::json!(["cloudwatch:PutMetricData"])
    );
}
