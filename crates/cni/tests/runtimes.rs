//! Real CNI callers: containerd's `ctr run --cni` and podman run busybox containers whose network
//! is our plugin chained before Debian's portmap. Each runs inside a node namespace of its own, so
//! the host side of the pods never touches the machine's own network.

mod common;

use common::*;
use proto::Allocation;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
const MARKER: &str = "served-by-a-vpc-cni-pod";
/// `ctr run --cni` reads the system's CNI directories; the tests that use them take turns.
static SYSTEM_CNI_DIRS: Mutex<()> = Mutex::new(());

fn have(tools: &[&str], test: &str) -> bool {
    if !can_run_datapath_tests(test) {
        return false;
    }
    let missing: Vec<_> = tools
        .iter()
        .filter(|t| {
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true)
        })
        .collect();
    let portmap = Path::new(REFERENCE_PLUGINS).join("portmap").exists();
    if !missing.is_empty() || !portmap {
        skip(
            test,
            &format!("missing {missing:?} (portmap present: {portmap}); scripts/test.sh installs containerd, runc, podman, busybox-static, iptables and containernetworking-plugins"),
        );
        return false;
    }
    true
}

/// A busybox root filesystem whose httpd serves the marker.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for sub in ["bin", "www", "proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "httpd", "sleep", "ip", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("www/index.html"), format!("{MARKER}\n")).unwrap();
    root
}

/// Our plugin (with `extra` keys) first, then `chained` reference plugins, then portmap.
fn conflist_with(server: &AddressServer, log: &Path, extra: &Value, chained: &[Value]) -> String {
    let mut list = json!({
        "cniVersion": "1.0.0",
        "name": "aws-cni",
        "disableCheck": true,
        "plugins": [
            {
                "name": "aws-cni",
                "type": "vpc-cni",
                "vethPrefix": "eni",
                "mtu": "9001",
                "ipamdSocket": server.socket,
                "pluginLogFile": log,
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    });
    let plugins = list["plugins"].as_array_mut().unwrap();
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            plugins[0][k] = v.clone();
        }
    }
    for (i, plugin) in chained.iter().enumerate() {
        plugins.insert(1 + i, plugin.clone());
    }
    list.to_string()
}

/// The HTTP body at `address:port`, fetched from inside `ns`, retried until `deadline`.
fn http_get(ns: &Netns, target: SocketAddr, deadline: Duration) -> String {
    let start = Instant::now();
    loop {
        let attempt = ns.run(move || -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            stream.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            stream.read_to_string(&mut body)?;
            Ok(body)
        });
        match attempt {
            Ok(body) if body.contains(MARKER) => return body,
            other if start.elapsed() > deadline => {
                panic!("no answer from {target} within {deadline:?}: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn wait_for_socket(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Puts our plugin in the system plugin directory and the conflist first in line, and takes both
/// away again.
struct SystemCniFiles {
    files: Vec<PathBuf>,
}

impl SystemCniFiles {
    fn install(conflist: &str) -> Self {
        let mut files = Vec::new();
        std::fs::create_dir_all("/opt/cni/bin").unwrap();
        std::fs::create_dir_all("/etc/cni/net.d").unwrap();
        for (name, source) in [
            ("vpc-cni", plugin_binary()),
            ("portmap", Path::new(REFERENCE_PLUGINS).join("portmap")),
            ("loopback", Path::new(REFERENCE_PLUGINS).join("loopback")),
        ] {
            let target = Path::new("/opt/cni/bin").join(name);
            if !target.exists() || name == "vpc-cni" {
                std::fs::copy(&source, &target).unwrap();
                files.push(target);
            }
        }
        let conf = PathBuf::from("/etc/cni/net.d/00-vpc-cni-test.conflist");
        std::fs::write(&conf, conflist).unwrap();
        files.push(conf);
        Self { files }
    }
}

impl Drop for SystemCniFiles {
    fn drop(&mut self) {
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// A node namespace with an address of each family of its own, so that host ports have somewhere
/// to live.
fn node() -> Netns {
    let node = Netns::new("rtnode");
    node.exec("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");
    node.exec("ip link add eth0 type veth peer name peer0");
    node.exec("ip addr add 10.0.0.10/24 dev eth0");
    node.exec(&format!("ip addr add {NODE_IP6}/64 dev eth0 nodad"));
    node.exec("ip link set eth0 up");
    node.exec("ip link set peer0 up");
    node
}

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 60);
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const POD_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0xaaaa, 0, 0, 0x60);

/// What the runtime test runs: an IPv4 pod, or an IPv6 pod with IPv4 egress.
struct Family {
    server: AddressServer,
    pod: IpAddr,
    node: IpAddr,
    extra: Value,
}

fn ipv4() -> Family {
    Family {
        server: AddressServer::start(&[(POD_IP, 0, 254)]),
        pod: POD_IP.into(),
        node: Ipv4Addr::new(10, 0, 0, 10).into(),
        extra: json!({}),
    }
}

fn ipv6() -> Family {
    Family {
        server: AddressServer::serving(vec![Allocation {
            address: POD_IP6.into(),
            device_number: 0,
            route_table: 254,
            egress_v4: Some(Ipv4Addr::new(169, 254, 172, 2)),
            branch: None,
        }]),
        pod: POD_IP6.into(),
        node: NODE_IP6.into(),
        extra: json!({"enableIPv6": true}),
    }
}

/// Nothing of the pod left on the node: no rule or route naming its address, no veth.
fn host_is_clean(node: &Netns, pod: IpAddr) {
    let pod = pod.to_string();
    assert!(!node.exec("ip rule show").contains(&pod));
    assert!(!node.exec("ip -6 route show").contains(&pod));
    assert!(!node.exec("ip -4 route show").contains("169.254.172."));
    let links = node.exec("ip -o link show");
    assert!(!links.contains("eni") && !links.contains("v4e"), "{links}");
}

#[test]
fn containerd_ctr_runs_a_container_on_our_network() {
    containerd_ctr_runs("containerd_ctr_runs_a_container_on_our_network", ipv4());
}

#[test]
fn containerd_ctr_runs_an_ipv6_container_with_ipv4_egress() {
    containerd_ctr_runs(
        "containerd_ctr_runs_an_ipv6_container_with_ipv4_egress",
        ipv6(),
    );
}

fn containerd_ctr_runs(test: &str, family: Family) {
    if !have(&["containerd", "ctr", "runc"], test) {
        return;
    }
    let _turn = SYSTEM_CNI_DIRS.lock().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let server = &family.server;
    let log = dir.path().join("plugin.log");
    let _files = SystemCniFiles::install(&conflist_with(server, &log, &family.extra, &[]));
    let node = node();
    let address = dir.path().join("containerd.sock");
    let _containerd = KillOnDrop(
        Command::new("containerd")
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--address")
            .arg(&address)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("containerd.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for_socket(&address);

    let id = unique("ctr");
    // ctr itself calls the plugins, so it runs in the node namespace; `--rm` makes it call DEL when
    // the container exits.
    let mut ctr = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &node.name, "ctr", "--address"])
            .arg(&address)
            .args(["run", "--cni", "--rm", "--rootfs"])
            .arg(&root)
            .args([&id, "/bin/sh", "-c", "httpd -p 8080 -h /www; sleep 4"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let body = http_get(
        &node,
        SocketAddr::from((family.pod, 8080)),
        Duration::from_secs(20),
    );
    assert!(body.contains(MARKER));
    assert_eq!(server.assigned().len(), 1);
    let status = ctr.0.wait().unwrap();
    let mut stderr = String::new();
    ctr.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "ctr run failed: {stderr}");
    assert!(
        server.assigned().is_empty(),
        "ctr's DEL released the address"
    );
    host_is_clean(&node, family.pod);
}

#[test]
fn podman_with_a_host_port_through_portmap() {
    podman_with_a_host_port("podman_with_a_host_port_through_portmap", ipv4());
}

#[test]
fn podman_runs_an_ipv6_pod_with_a_host_port_through_portmap() {
    podman_with_a_host_port(
        "podman_runs_an_ipv6_pod_with_a_host_port_through_portmap",
        ipv6(),
    );
}

fn podman_with_a_host_port(test: &str, family: Family) {
    if !have(&["podman", "runc", "iptables", "ip6tables"], test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path());
    let server = &family.server;
    let log = dir.path().join("plugin.log");
    let net_dir = dir.path().join("net.d");
    let plugin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&net_dir).unwrap();
    std::fs::create_dir_all(&plugin_dir).unwrap();
    // tuning and bandwidth chained after us read our result: tuning sets a sysctl in the pod,
    // bandwidth shapes the host end of our veth.
    let chained = [
        json!({"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.accept_local": "1"}}),
        json!({"type": "bandwidth", "ingressRate": 100_000_000, "ingressBurst": 1_000_000}),
    ];
    std::fs::write(
        net_dir.join("aws-cni.conflist"),
        conflist_with(server, &log, &family.extra, &chained),
    )
    .unwrap();
    std::fs::copy(plugin_binary(), plugin_dir.join("vpc-cni")).unwrap();
    let containers_conf = dir.path().join("containers.conf");
    std::fs::write(
        &containers_conf,
        format!(
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"{REFERENCE_PLUGINS}\"]\nnetwork_config_dir = \"{}\"\n",
            plugin_dir.display(),
            net_dir.display()
        ),
    )
    .unwrap();
    let node = node();
    let podman = |args: &[&str]| {
        // nsenter rather than `ip netns exec`, which remounts /sys and hides the cgroup mounts
        // that runc needs.
        let output = Command::new("nsenter")
            .arg(format!("--net={}", node.path().display()))
            .args(["podman", "--root"])
            .arg(dir.path().join("storage"))
            .arg("--runroot")
            .arg(dir.path().join("run"))
            .args(args)
            .env("CONTAINERS_CONF", &containers_conf)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    };
    let image = format!("localhost/{}", unique("bb"));
    let import = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C {} -c . | CONTAINERS_CONF={} podman --root {} --runroot {} import - {image}",
            root.display(),
            containers_conf.display(),
            dir.path().join("storage").display(),
            dir.path().join("run").display()
        ))
        .output()
        .unwrap();
    assert!(
        import.status.success(),
        "{}",
        String::from_utf8_lossy(&import.stderr)
    );

    let name = unique("web");
    podman(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "aws-cni",
        "-p",
        "18080:8080",
        &image,
        "/bin/httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    // Straight to the pod's VPC address, and through the host port that portmap set up.
    http_get(
        &node,
        SocketAddr::from((family.pod, 8080)),
        Duration::from_secs(20),
    );
    http_get(
        &node,
        SocketAddr::from((family.node, 18080)),
        Duration::from_secs(20),
    );
    let attached = server.assigned();
    assert_eq!(attached.len(), 1);
    assert_eq!(attached.keys().next().unwrap().network, "aws-cni");
    assert_eq!(
        podman(&[
            "exec",
            &name,
            "cat",
            "/proc/sys/net/ipv4/conf/eth0/accept_local"
        ]),
        "1",
        "tuning, chained after us, set its sysctl in the pod"
    );
    // podman names the pod but not its namespace, so the veth is named after the container id.
    let host_veth =
        datapath::names::host_veth_name("eni", &attached.keys().next().unwrap().container_id);
    let qdiscs = node.exec(&format!("tc qdisc show dev {host_veth}"));
    assert!(
        qdiscs.contains("tbf"),
        "bandwidth shaped our host veth: {qdiscs}"
    );

    podman(&["rm", "-f", &name]);
    assert!(
        server.assigned().is_empty(),
        "podman's DEL released the address"
    );
    host_is_clean(&node, family.pod);
    let _ = podman(&["rmi", &image]);
}
