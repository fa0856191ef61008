//! Test support: a small address server speaking the real plugin-daemon protocol (until the daemon
//! exists), network namespaces that clean up after themselves, and a way to run the plugin binary.
#![allow(dead_code)] // each test binary uses a different part of this module

use proto::{Allocation, Attachment, ErrorKind, Listener, Reply, Request};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The plugin under test: the one `VPC_CNI_PLUGIN` names (scripts/test.sh points it at the binary
/// as shipped, from scripts/build-plugin.sh), else the one cargo built for this test run.
pub fn plugin_binary() -> PathBuf {
    std::env::var_os("VPC_CNI_PLUGIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vpc-cni")))
}

/// Says on the terminal, past the test harness's output capture, that a test did not run its body.
pub fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Root and the tools are needed for anything that touches the kernel; say so loudly when missing.
pub fn can_run_datapath_tests(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "nft"]
        .iter()
        .all(|t| Command::new(t).arg("-V").output().is_ok());
    if !root || !tools {
        skip(
            test,
            &format!("needs root and the ip and nft commands (root: {root}, tools: {tools}); scripts/test.sh installs them"),
        );
        return false;
    }
    true
}

#[derive(Default)]
struct ServerState {
    free: Vec<Allocation>,
    assigned: HashMap<Attachment, Allocation>,
    requests: Vec<Request>,
}

pub struct AddressServer {
    pub socket: PathBuf,
    state: Arc<Mutex<ServerState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl AddressServer {
    /// Serves `addresses` (address, device number, route table) in order.
    pub fn start(addresses: &[(Ipv4Addr, u32, u32)]) -> Self {
        Self::serving(
            addresses
                .iter()
                .map(|&(address, device_number, route_table)| Allocation {
                    address: address.into(),
                    device_number,
                    route_table,
                    egress_v4: None,
                    branch: None,
                })
                .collect(),
        )
    }

    /// Serves these allocations in order (an IPv6 daemon's, for one).
    pub fn serving(free: Vec<Allocation>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("ipamd.sock");
        let listener = Listener::bind(&socket).unwrap();
        let state = Arc::new(Mutex::new(ServerState {
            free,
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || loop {
                let Ok(stream) = listener.accept() else {
                    return;
                };
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let _ = proto::serve_one(&stream, |request| handle(&state, request));
            })
        };
        Self {
            socket,
            state,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn assigned(&self) -> HashMap<Attachment, Allocation> {
        self.state.lock().unwrap().assigned.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Stops serving and removes the socket, as a daemon that went away.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for AddressServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn handle(state: &Mutex<ServerState>, request: Request) -> Reply {
    let mut state = state.lock().unwrap();
    state.requests.push(request.clone());
    match request {
        Request::Add { attachment, .. } => {
            if let Some(allocation) = state.assigned.get(&attachment) {
                return Reply::Added {
                    allocation: *allocation,
                };
            }
            if state.free.is_empty() {
                return Reply::Error {
                    kind: ErrorKind::NoAddressAvailable,
                    message: "no free address".into(),
                };
            }
            let allocation = state.free.remove(0);
            state.assigned.insert(attachment, allocation);
            Reply::Added { allocation }
        }
        Request::Del { attachment, .. } => {
            let released = state.assigned.remove(&attachment);
            if let Some(allocation) = released {
                state.free.push(allocation);
            }
            Reply::Deleted { released }
        }
        Request::Lookup { attachment, .. } => Reply::Found {
            allocation: state.assigned.get(&attachment).copied(),
        },
        Request::Status => Reply::Status {
            ready: true,
            available_addresses: state.free.len() as u32,
            detail: String::new(),
        },
        Request::Gc { network, valid } => {
            let stale: Vec<Attachment> = state
                .assigned
                .keys()
                .filter(|a| a.network == network && !valid.contains(a))
                .cloned()
                .collect();
            for attachment in &stale {
                let allocation = state.assigned.remove(attachment).unwrap();
                state.free.push(allocation);
            }
            Reply::Collected {
                keep: state.assigned.values().map(|a| a.address).collect(),
                released: stale.len() as u32,
            }
        }
    }
}

static UNIQUE: AtomicUsize = AtomicUsize::new(0);

/// A short name unique to this test process, for namespaces and links.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        UNIQUE.fetch_add(1, Ordering::SeqCst)
    )
}

/// A named network namespace (`ip netns add`), deleted on drop with everything in it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip -n {name} link set lo up"));
        Self { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    pub fn open(&self) -> datapath::netns::NetNs {
        datapath::netns::NetNs::open(self.path()).unwrap()
    }

    /// Runs `work` on a thread inside this namespace.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> T {
        self.open().run(work).unwrap()
    }

    pub fn exec(&self, command: &str) -> String {
        sh(&format!("ip netns exec {} {command}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a shell command that must succeed; returns its stdout.
pub fn sh(command: &str) -> String {
    let output = Command::new("sh").arg("-c").arg(command).output().unwrap();
    assert!(
        output.status.success(),
        "{command} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub struct PluginRun {
    pub status: i32,
    pub stdout: Value,
    pub raw: String,
    pub elapsed: Duration,
}

/// Runs the plugin binary with the given CNI environment and stdin, inside `node` if given (the
/// node's namespace), and parses its stdout.
pub fn plugin(node: Option<&Netns>, env: &[(&str, &str)], stdin: &str) -> PluginRun {
    run_cni(&plugin_binary(), node, env, stdin)
}

/// Runs a CNI plugin binary as a runtime does: entered into `node`'s namespace before exec, the
/// CNI environment only, the configuration on stdin. `elapsed` spans spawn to exit.
pub fn run_cni(
    binary: &Path,
    node: Option<&Netns>,
    env: &[(&str, &str)],
    stdin: &str,
) -> PluginRun {
    let mut command = Command::new(binary);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let namespace = node.map(|ns| std::fs::File::open(ns.path()).unwrap());
    if let Some(file) = &namespace {
        let fd = std::os::unix::io::AsRawFd::as_raw_fd(file);
        // SAFETY: setns is async-signal-safe, and the file stays open until the child has spawned.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let start = Instant::now();
    let mut child = command.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let elapsed = start.elapsed();
    let raw = String::from_utf8_lossy(&output.stdout).into_owned();
    let stdout = if raw.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {raw:?}"))
    };
    PluginRun {
        status: output.status.code().unwrap_or(-1),
        stdout,
        raw,
        elapsed,
    }
}

/// A network configuration for the plugin, as the runtime hands it over.
pub fn conf(version: &str, socket: &Path, extra: Value) -> String {
    let mut conf = serde_json::json!({
        "cniVersion": version,
        "name": "aws-cni",
        "type": "vpc-cni",
        "mtu": "9001",
        "vethPrefix": "eni",
        "ipamdSocket": socket,
    });
    if let Value::Object(extra) = extra {
        for (k, v) in extra {
            conf[k] = v;
        }
    }
    conf.to_string()
}

/// A TCP server in a namespace that answers each line with the address it sees the peer as.
/// Accepts `connections` connections, then ends.
pub fn peer_echo_server(ns: &Netns, listen: SocketAddr, connections: usize) -> JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = ns.path();
    let handle = std::thread::spawn(move || {
        let ns = datapath::netns::NetNs::open(&path).unwrap();
        ns.run(move || {
            let listener = TcpListener::bind(listen).unwrap();
            ready_tx.send(()).unwrap();
            let mut handles = Vec::new();
            for _ in 0..connections {
                let (stream, peer) = listener.accept().unwrap();
                handles.push(std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    let mut line = String::new();
                    while reader.read_line(&mut line).unwrap_or(0) > 0 {
                        let _ = writeln!(writer, "{}", peer.ip());
                        line.clear();
                    }
                }));
            }
            for h in handles {
                h.join().unwrap();
            }
        })
        .unwrap();
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    handle
}

/// A connection from inside `ns` to `target`, open until dropped.
pub struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(ns: &Netns, target: SocketAddr) -> Result<Client, String> {
        let stream = ns
            .run(move || TcpStream::connect_timeout(&target, Duration::from_secs(3)))
            .map_err(|e| format!("connect to {target}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Ok(Client { stream, reader })
    }

    /// Sends a line; returns the address the server saw us as.
    pub fn seen_as(&mut self) -> Result<String, String> {
        writeln!(self.stream, "hello").map_err(|e| e.to_string())?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim().to_string())
    }
}

/// Connects once from `ns` to `target` and returns the address the server saw.
pub fn seen_as(ns: &Netns, target: SocketAddr) -> Result<String, String> {
    Client::connect(ns, target)?.seen_as()
}
