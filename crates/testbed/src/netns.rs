//! Named network namespaces (`ip netns add`) and the shell commands that build the fabric. The
//! fabric is set up once per node or per EC2 change, never per pod, so `ip` is fine here.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` with these arguments; the error carries its stderr.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e} (is iproute2 installed?)"))?;
    if !output.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs many `ip` commands in one process (`ip -batch`), inside `netns`.
pub fn ip_batch(netns: &str, commands: &[String]) -> Result<(), String> {
    if commands.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("ip")
        .args(["-n", netns, "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ip: {e}"))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(commands.join("\n").as_bytes())
        .map_err(|e| format!("ip -batch: {e}"))?;
    let output = child.wait_with_output().map_err(|e| format!("ip: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "ip -n {netns} -batch: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(())
}

/// Writes a sysctl inside `netns` (from a thread that entered it: /proc/sys/net is per namespace),
/// without depending on the sysctl tool.
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<(), String> {
    let ns = datapath::netns::NetNs::open(format!("/var/run/netns/{netns}"))
        .map_err(|e| e.to_string())?;
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    ns.run(|| std::fs::write(&path, value))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{netns}: {path}: {e}"))
}

/// Applies an nftables script inside `netns`, in one transaction (`datapath::snat::nft`, from a
/// thread that entered the namespace).
pub fn nft(netns: &str, script: &str) -> Result<(), String> {
    let ns = datapath::netns::NetNs::open(format!("/var/run/netns/{netns}"))
        .map_err(|e| e.to_string())?;
    ns.run(|| datapath::snat::nft(script))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{netns}: {e}"))
}

/// A network namespace that is deleted, with everything in it, when dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(prefix: &str) -> Result<Netns, String> {
        let name = format!(
            "{prefix}{}x{}",
            std::process::id() % 100_000,
            UNIQUE.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    pub fn open(&self) -> Result<datapath::netns::NetNs, String> {
        datapath::netns::NetNs::open(self.path()).map_err(|e| e.to_string())
    }

    /// Runs `work` on a thread inside this namespace.
    pub fn run<T: Send>(&self, work: impl FnOnce() -> T + Send) -> Result<T, String> {
        self.open()?.run(work).map_err(|e| e.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}
