//! `vpcctl install`, run by the DaemonSet's container: copy the plugin into the host's CNI bin
//! directory, wait until the daemon is ready, then write the conflist. Writing it last is what tells
//! kubelet the node's network is ready, as upstream's entrypoint does.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Install {
    pub plugin: PathBuf,
    /// Where the image keeps the plugins chained after ours (`CHAINED`), copied to `bin_dir` too.
    pub chained_from: PathBuf,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub socket: PathBuf,
    pub wait: Duration,
}

/// Upstream's variables that shape the conflist (upstream-plugin.md §1.2); the directories and the
/// socket come from the command line or HOST_CNI_BIN_PATH, HOST_CNI_CONFDIR_PATH, VPC_CNI_IPAMD_SOCKET.
pub const VARIABLES: &[&str] = &[
    "AWS_VPC_ENI_MTU",
    "POD_MTU",
    "AWS_VPC_K8S_PLUGIN_LOG_FILE",
    "AWS_VPC_K8S_CNI_VETHPREFIX",
    "POD_SECURITY_GROUP_ENFORCING_MODE",
    "AWS_VPC_K8S_PLUGIN_LOG_LEVEL",
    "ENABLE_BANDWIDTH_PLUGIN",
    "DISABLE_POD_V6",
    "ENABLE_IPv6",
    "ENABLE_V4_EGRESS",
];

/// The reference plugins upstream's image installs beside its own, for the conflist's chain and
/// for runtimes' loopback: loopback, portmap, bandwidth, and tuning for DISABLE_POD_V6.
pub const CHAINED: &[&str] = &["loopback", "portmap", "bandwidth", "tuning"];

/// CNI versions the conflist may declare, newest first: 1.1.0 lets runtimes call STATUS and GC,
/// but every plugin of the chain must speak it (the reference plugins do from v1.5; Debian
/// bookworm's v1.1.1 stop at 1.0.0).
const CONFLIST_VERSIONS: &[&str] = &["1.1.0", "1.0.0", "0.4.0"];

/// The newest version every plugin of the chain supports (each given by its VERSION answer).
pub fn chain_version(supported: &[Vec<String>]) -> Option<&'static str> {
    CONFLIST_VERSIONS
        .iter()
        .copied()
        .find(|v| supported.iter().all(|s| s.iter().any(|x| x == v)))
}

/// Asks an installed plugin which CNI versions it speaks (CNI_COMMAND=VERSION).
fn supported_versions(binary: &Path) -> Result<Vec<String>, String> {
    use std::io::Write;
    let mut child = std::process::Command::new(binary)
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    // A plugin may answer VERSION without reading its configuration.
    match child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(br#"{"cniVersion":"0.4.0"}"#)
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(format!("{}: {e}", binary.display()))
        }
        _ => {}
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    let answer: Value = serde_json::from_slice(&output.stdout).map_err(|e| {
        format!(
            "{} answered VERSION with no JSON ({e}): {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )
    })?;
    Ok(answer["supportedVersions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Copies the chained plugins the host lacks into its CNI bin directory. One the host has is kept:
/// EKS AMIs ship their own build, and ours (Debian's) needs glibc 2.34, which Amazon Linux 2
/// lacks. The conflist's version is then settled against what is installed (`negotiate`).
fn install_chained(from: &Path, bin_dir: &Path) -> Result<(), String> {
    for name in CHAINED {
        if bin_dir.join(name).exists() {
            continue;
        }
        let source = from.join(name);
        let binary = std::fs::read(&source).map_err(|e| {
            format!(
                "chained plugin {}: {e} (the image ships them in {})",
                source.display(),
                from.display()
            )
        })?;
        write_atomically(&bin_dir.join(name), &binary, 0o755)?;
    }
    Ok(())
}

/// The conflist's version: the newest one every plugin of the chain, ours included, speaks as
/// installed in `bin_dir`. A plugin that is missing fails the install (the chain would fail every
/// ADD); one that is there but gives no usable VERSION answer is taken to speak 1.0.0, what the
/// conflist declared before versions were negotiated.
fn negotiate(conflist: &Value, bin_dir: &Path) -> Result<&'static str, String> {
    let mut supported = Vec::new();
    for plugin in conflist["plugins"].as_array().into_iter().flatten() {
        let kind = plugin["type"].as_str().unwrap_or_default();
        let binary = bin_dir.join(kind);
        if !binary.is_file() {
            return Err(format!(
                "the conflist chains {kind}, but {} does not exist",
                binary.display()
            ));
        }
        supported.push(supported_versions(&binary).unwrap_or_else(|e| {
            eprintln!("vpcctl install: {e}; taking {kind} to speak CNI 1.0.0");
            vec!["0.4.0".into(), "1.0.0".into()]
        }));
    }
    chain_version(&supported).ok_or_else(|| {
        format!(
            "the plugins of the chain in {} share no CNI version: {supported:?}",
            bin_dir.display()
        )
    })
}

/// A setting with upstream's default.
fn setting(lookup: &dyn Fn(&str) -> Option<String>, name: &str, default: &str) -> String {
    lookup(name)
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

fn flag(lookup: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<bool, String> {
    flag_or(lookup, name, false)
}

fn flag_or(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &str,
    default: bool,
) -> Result<bool, String> {
    match setting(lookup, name, if default { "true" } else { "false" }).trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        other => Err(format!("{name}={other:?}: expected true or false")),
    }
}

/// The conflist: our plugin first, portmap after it, then bandwidth and tuning when asked for.
pub fn conflist(lookup: &dyn Fn(&str) -> Option<String>, socket: &Path) -> Result<Value, String> {
    let eni_mtu = setting(lookup, "AWS_VPC_ENI_MTU", "9001");
    let mtu = setting(lookup, "POD_MTU", &eni_mtu);
    let mtu_value: u32 = mtu
        .trim()
        .parse()
        .map_err(|_| format!("POD_MTU/AWS_VPC_ENI_MTU {mtu:?} is not a number"))?;
    let ipv6 = flag(lookup, "ENABLE_IPv6")?;
    let lowest = if ipv6 { 1280 } else { 576 };
    if !(lowest..=9001).contains(&mtu_value) {
        return Err(format!(
            "MTU {mtu_value} must lie between {lowest} and 9001{}",
            if ipv6 { " for IPv6 pods" } else { "" }
        ));
    }
    let log_file = setting(
        lookup,
        "AWS_VPC_K8S_PLUGIN_LOG_FILE",
        "/var/log/aws-routed-eni/plugin.log",
    );
    if log_file == "stdout" {
        return Err("AWS_VPC_K8S_PLUGIN_LOG_FILE=stdout: the plugin's stdout is its result; use a file or stderr".into());
    }
    let mut plugin = json!({
        "name": "aws-cni",
        "type": "vpc-cni",
        "vethPrefix": setting(lookup, "AWS_VPC_K8S_CNI_VETHPREFIX", "eni"),
        "mtu": mtu_value.to_string(),
        "podSGEnforcingMode": setting(lookup, "POD_SECURITY_GROUP_ENFORCING_MODE", "strict"),
        "pluginLogFile": log_file,
        "pluginLogLevel": setting(lookup, "AWS_VPC_K8S_PLUGIN_LOG_LEVEL", "Debug"),
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
    });
    if socket != Path::new(proto::DEFAULT_SOCKET) {
        plugin["ipamdSocket"] = json!(socket.display().to_string());
    }
    // Told to the plugin so that it adds the family's routes (and v4if0) while the daemon answers;
    // upstream chains a separate egress plugin for v4if0 instead.
    let v4_egress = flag_or(lookup, "ENABLE_V4_EGRESS", true)?;
    if ipv6 {
        plugin["enableIPv6"] = json!(true);
        plugin["enableV4Egress"] = json!(v4_egress);
    }
    let mut plugins = vec![
        plugin,
        json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
    ];
    if flag(lookup, "ENABLE_BANDWIDTH_PLUGIN")? {
        plugins.push(json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}));
    }
    if flag(lookup, "DISABLE_POD_V6")? {
        if ipv6 {
            return Err(
                "DISABLE_POD_V6=true with ENABLE_IPv6=true would turn off the pods' only family"
                    .into(),
            );
        }
        plugins.push(json!({"type": "tuning", "sysctl": {
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
            "net.ipv6.conf.lo.disable_ipv6": "1",
        }}));
    }
    // The version is settled once the chain is installed (`negotiate`).
    Ok(json!({"cniVersion": "1.0.0", "name": "aws-cni", "disableCheck": false, "plugins": plugins}))
}

/// Writes `bytes` to `path` so that readers see the old file or the new one, never half of it.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes).map_err(|e| format!("{}: {e}", temporary.display()))?;
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", temporary.display()))?;
    std::fs::rename(&temporary, path).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn run(install: &Install, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let conflist = conflist(lookup, &install.socket)?;
    let binary = std::fs::read(&install.plugin)
        .map_err(|e| format!("plugin {}: {e}", install.plugin.display()))?;
    std::fs::create_dir_all(&install.bin_dir)
        .map_err(|e| format!("{}: {e}", install.bin_dir.display()))?;
    write_atomically(&install.bin_dir.join("vpc-cni"), &binary, 0o755)?;
    install_chained(&install.chained_from, &install.bin_dir)?;
    let mut conflist = conflist;
    conflist["cniVersion"] = json!(negotiate(&conflist, &install.bin_dir)?);

    let deadline = Instant::now() + install.wait;
    loop {
        let last = match proto::call(
            &install.socket,
            &proto::Request::Status,
            Duration::from_secs(5),
        ) {
            Ok(proto::Reply::Status { ready: true, .. }) => break,
            Ok(proto::Reply::Status { detail, .. }) => format!("not ready: {detail}"),
            Ok(other) => format!("unexpected reply {other:?}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!(
                "vpc-ipamd at {} did not become ready within {} s ({last}); the conflist was not written",
                install.socket.display(),
                install.wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::create_dir_all(&install.conf_dir)
        .map_err(|e| format!("{}: {e}", install.conf_dir.display()))?;
    let path = install.conf_dir.join("10-aws.conflist");
    let text = serde_json::to_string_pretty(&conflist).expect("JSON serialises");
    write_atomically(&path, text.as_bytes(), 0o644)?;
    let from: Vec<&str> = VARIABLES
        .iter()
        .copied()
        .filter(|v| lookup(v).is_some())
        .collect();
    Ok(if from.is_empty() {
        format!("{} (upstream's defaults)", path.display())
    } else {
        format!("{} (set: {})", path.display(), from.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_conflist_reads_only_the_variables_it_declares() {
        let asked = std::sync::Mutex::new(Vec::new());
        let recording = |name: &str| {
            asked.lock().unwrap().push(name.to_string());
            None
        };
        conflist(&recording, Path::new(proto::DEFAULT_SOCKET)).unwrap();
        let asked = asked.into_inner().unwrap();
        for name in &asked {
            assert!(
                VARIABLES.contains(&name.as_str()),
                "{name} is read but not declared"
            );
        }
        for name in VARIABLES {
            assert!(
                asked.iter().any(|a| a == name),
                "{name} is declared but never read"
            );
        }
    }

    #[test]
    fn defaults_are_upstreams_with_portmap_chained_after_our_plugin() {
        let c = conflist(&lookup(&[]), Path::new(proto::DEFAULT_SOCKET)).unwrap();
        assert_eq!(c["name"], "aws-cni");
        let plugins = c["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[0]["type"], "vpc-cni");
        assert_eq!(plugins[0]["mtu"], "9001");
        assert_eq!(plugins[0]["vethPrefix"], "eni");
        assert!(plugins[0].get("ipamdSocket").is_none());
        assert_eq!(plugins[1]["type"], "portmap");
    }

    #[test]
    fn settings_shape_the_conflist_and_bad_values_are_refused() {
        let vars = [
            ("POD_MTU", "1500"),
            ("AWS_VPC_K8S_CNI_VETHPREFIX", "cali"),
            ("ENABLE_BANDWIDTH_PLUGIN", "true"),
            ("DISABLE_POD_V6", "true"),
        ];
        let c = conflist(&lookup(&vars), Path::new("/run/x.sock")).unwrap();
        let plugins = c["plugins"].as_array().unwrap();
        assert_eq!(plugins[0]["mtu"], "1500");
        assert_eq!(plugins[0]["vethPrefix"], "cali");
        assert_eq!(plugins[0]["ipamdSocket"], "/run/x.sock");
        let types: Vec<&str> = plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["vpc-cni", "portmap", "bandwidth", "tuning"]);
        let v6 = conflist(&lookup(&[("ENABLE_IPv6", "true")]), Path::new("/s")).unwrap();
        let types: Vec<&str> = v6["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["vpc-cni", "portmap"], "portmap still chained");
        assert_eq!(v6["plugins"][0]["enableIPv6"], true);
        assert_eq!(v6["plugins"][0]["enableV4Egress"], true);
        let no_egress = conflist(
            &lookup(&[("ENABLE_IPv6", "true"), ("ENABLE_V4_EGRESS", "false")]),
            Path::new("/s"),
        )
        .unwrap();
        assert_eq!(no_egress["plugins"][0]["enableV4Egress"], false);
        assert!(plugins[0].get("enableIPv6").is_none(), "IPv4 says nothing");
        for bad in [
            [("ENABLE_IPv6", "true"), ("POD_MTU", "1200")],
            [("ENABLE_IPv6", "true"), ("DISABLE_POD_V6", "true")],
        ] {
            let e = conflist(&lookup(&bad), Path::new("/s")).unwrap_err();
            assert!(e.contains(bad[1].1) || e.contains(bad[1].0), "{e}");
        }
        let e = conflist(&lookup(&[("POD_MTU", "70000")]), Path::new("/s")).unwrap_err();
        assert!(e.contains("70000"), "{e}");
        let e = conflist(
            &lookup(&[("ENABLE_BANDWIDTH_PLUGIN", "yes")]),
            Path::new("/s"),
        )
        .unwrap_err();
        assert!(e.contains("ENABLE_BANDWIDTH_PLUGIN"), "{e}");
    }

    /// A stand-in plugin that answers VERSION with these versions.
    fn fake_plugin(path: &Path, versions: &[&str]) {
        use std::os::unix::fs::PermissionsExt;
        let list: Vec<String> = versions.iter().map(|v| format!("\"{v}\"")).collect();
        std::fs::write(
            path,
            format!(
                "#!/bin/sh\necho '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[{}]}}'\n",
                list.join(",")
            ),
        )
        .unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A scratch directory with a plugin and the chained plugins, speaking `chained` versions.
    fn scratch(name: &str, chained: &[&str]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("vpcctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("image-cni")).unwrap();
        fake_plugin(&root.join("plugin"), &["0.4.0", "1.0.0", "1.1.0"]);
        for name in CHAINED {
            fake_plugin(&root.join("image-cni").join(name), chained);
        }
        root
    }

    #[test]
    fn the_conflist_declares_the_newest_version_the_whole_chain_speaks() {
        let modern = vec!["0.4.0".to_string(), "1.0.0".into(), "1.1.0".into()];
        let bookworm = vec!["0.4.0".to_string(), "1.0.0".into()];
        assert_eq!(
            chain_version(&[modern.clone(), modern.clone()]),
            Some("1.1.0")
        );
        assert_eq!(chain_version(&[modern, bookworm]), Some("1.0.0"));
        assert_eq!(chain_version(&[vec!["0.2.0".to_string()]]), None);
        // And from the binaries themselves: Debian's reference plugins where installed.
        let root = scratch("negotiate", &["0.4.0", "1.0.0", "1.1.0"]);
        let bin = root.join("image-cni");
        std::fs::copy(root.join("plugin"), bin.join("vpc-cni")).unwrap();
        let c = conflist(&lookup(&[]), Path::new(proto::DEFAULT_SOCKET)).unwrap();
        assert_eq!(negotiate(&c, &bin).unwrap(), "1.1.0");
        if Path::new("/usr/lib/cni/portmap").exists() {
            std::fs::copy("/usr/lib/cni/portmap", bin.join("portmap")).unwrap();
            assert_eq!(negotiate(&c, &bin).unwrap(), "1.0.0");
        }
        // A plugin that cannot say is taken to speak 1.0.0; a missing one fails the install.
        std::fs::write(bin.join("portmap"), b"not a program").unwrap();
        assert_eq!(negotiate(&c, &bin).unwrap(), "1.0.0");
        std::fs::remove_file(bin.join("portmap")).unwrap();
        let e = negotiate(&c, &bin).unwrap_err();
        assert!(e.contains("portmap") && e.contains("does not exist"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn without_a_ready_daemon_the_plugin_is_copied_but_no_conflist_is_written() {
        let root = scratch("install", &["1.0.0"]);
        let install = Install {
            plugin: root.join("plugin"),
            chained_from: root.join("image-cni"),
            bin_dir: root.join("bin"),
            conf_dir: root.join("net.d"),
            socket: root.join("absent.sock"),
            wait: Duration::from_millis(300),
        };
        let e = run(&install, &lookup(&[])).unwrap_err();
        assert!(e.contains("did not become ready"), "{e}");
        assert!(root.join("bin/vpc-cni").exists());
        for name in CHAINED {
            assert!(root.join("bin").join(name).exists(), "{name} not installed");
        }
        // The host's own copies are kept.
        let portmap = root.join("bin/portmap");
        std::fs::write(&portmap, b"host's own").unwrap();
        assert!(run(&install, &lookup(&[])).is_err());
        assert_eq!(std::fs::read(&portmap).unwrap(), b"host's own");
        assert!(!root.join("net.d/10-aws.conflist").exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_conflist_is_written_once_the_daemon_says_ready() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED the_conflist_is_written_once_the_daemon_says_ready: the daemon's socket serves root only");
            return;
        }
        let root = scratch("install-ready", &["0.4.0", "1.0.0", "1.1.0"]);
        let socket = root.join("ipamd.sock");
        let listener = proto::Listener::bind(&socket).unwrap();
        // A daemon that is warming for its first two answers, then ready.
        let daemon = std::thread::spawn(move || {
            for answered in 0..3 {
                let stream = listener.accept().unwrap();
                proto::serve_one(&stream, |_| proto::Reply::Status {
                    ready: answered == 2,
                    available_addresses: 9,
                    detail: String::new(),
                })
                .unwrap();
            }
        });
        let install = Install {
            plugin: root.join("plugin"),
            chained_from: root.join("image-cni"),
            bin_dir: root.join("bin"),
            conf_dir: root.join("net.d"),
            socket: socket.clone(),
            wait: Duration::from_secs(10),
        };
        let written = run(&install, &lookup(&[("POD_MTU", "1500")])).unwrap();
        daemon.join().unwrap();
        assert!(written.ends_with("(set: POD_MTU)"), "{written}");
        let written = written.split(" (").next().unwrap();
        let conflist: Value =
            serde_json::from_str(&std::fs::read_to_string(written).unwrap()).unwrap();
        assert_eq!(
            conflist["plugins"][0]["ipamdSocket"],
            socket.display().to_string()
        );
        assert_eq!(conflist["cniVersion"], "1.1.0", "every plugin speaks 1.1.0");
        let _ = std::fs::remove_dir_all(&root);
    }
}
