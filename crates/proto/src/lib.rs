//! The request/reply protocol between the `vpc-cni` plugin and `vpc-ipamd`.
//!
//! One request per connection over a unix socket that only root may open: the client writes one JSON
//! document and a newline, the server answers with one JSON document and a newline. Every request
//! carries the protocol version; a server that speaks another version answers
//! [`ErrorKind::VersionMismatch`] instead of guessing (upstream requires the exact same build, which
//! breaks every rolling upgrade for the seconds the two binaries differ).
//!
//! The framing is plain functions over `Read`/`Write` so that the synchronous plugin and an
//! asynchronous daemon can share it.

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bumped on any change a peer of the previous version would misread.
pub const PROTOCOL_VERSION: u32 = 1;

/// Where `vpc-ipamd` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/vpc-cni/ipamd.sock";

/// The largest message either side accepts; a GC request with thousands of attachments fits easily.
const MAX_MESSAGE_BYTES: u64 = 4 << 20;

/// The key of an assignment, as upstream keys it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub infra_container_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Give the attachment an address (the same one again if it already has one).
    Add {
        attachment: Attachment,
        pod: PodRef,
        netns: String,
    },
    /// Release the attachment's address. Unknown attachments are not an error.
    Del {
        attachment: Attachment,
        pod: Option<PodRef>,
        reason: DelReason,
    },
    /// The attachment's current address, without changing anything (CHECK uses it).
    Lookup {
        attachment: Attachment,
        /// The pod, from CNI_ARGS: on EKS a branch pod's address is in its annotation, which the
        /// daemon reads by the pod's name. Absent from older plugins.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<PodRef>,
    },
    /// Can the daemon give out addresses now?
    Status,
    /// Release every assignment of `network` whose attachment is not in `valid`.
    Gc {
        network: String,
        valid: Vec<Attachment>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DelReason {
    PodDeleted,
    /// The plugin got an address but could not wire the pod, and gives it back.
    SetupFailed,
}

/// Where a pod's address lives: enough for the plugin to wire it and for DEL to unwire it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// An IPv4 address in an IPv4 cluster, an IPv6 address (/128) in an IPv6 one. Either is written
    /// as the plain address, so an IPv4 reply reads the same to a plugin that knew only IPv4.
    pub address: IpAddr,
    /// The ENI's device number: 0 is the primary ENI.
    pub device_number: u32,
    /// The host route table for traffic from the pod: 254 (main) on the primary ENI.
    pub route_table: u32,
    /// An IPv6 pod's IPv4 egress address (169.254.172.0/22, SNATed to the node's IPv4 on the way
    /// out), when ENABLE_V4_EGRESS is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_v4: Option<Ipv4Addr>,
    /// Security groups for pods: the pod's own branch ENI, whose address `address` is; the plugin
    /// wires the pod through the trunk instead of the node's ENIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<BranchAllocation>,
}

/// A pod's branch ENI, as the plugin wires it (upstream's `vpc.amazonaws.com/pod-eni` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchAllocation {
    pub vlan: u16,
    pub mac: [u8; 6],
    /// The branch's subnet: its first address is the router.
    pub subnet: Ipv4Addr,
    pub subnet_len: u8,
    /// The trunk ENI's MAC: its link on the host carries the branch's VLAN.
    pub trunk_mac: [u8; 6],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Added {
        allocation: Allocation,
    },
    Deleted {
        /// `None` when the daemon did not know the attachment (already released, or never added).
        released: Option<Allocation>,
    },
    Found {
        allocation: Option<Allocation>,
    },
    Status {
        ready: bool,
        available_addresses: u32,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        detail: String,
    },
    Collected {
        /// Addresses still assigned on the node after collection, in every network (the host's
        /// routes and rules are shared by all of them); host state for any other address of ours
        /// is a leftover.
        keep: Vec<IpAddr>,
        released: u32,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    VersionMismatch,
    BadRequest,
    /// No address can be given now; more are being requested from EC2.
    NoAddressAvailable,
    /// The daemon is stopping or not ready yet.
    Unavailable,
    Internal,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("cannot reach vpc-ipamd at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("talking to vpc-ipamd: {0}")]
    Io(#[from] io::Error),
    #[error("vpc-ipamd sent a message that does not parse: {0}")]
    Decode(serde_json::Error),
    #[error("protocol version mismatch: we speak {ours}, the peer speaks {theirs}")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("message larger than {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    #[error("peer closed the connection without a message")]
    Closed,
}

pub fn write_message<T: Serialize>(mut out: impl Write, body: &T) -> Result<(), ProtoError> {
    let mut bytes = serde_json::to_vec(&Envelope {
        version: PROTOCOL_VERSION,
        body,
    })
    .expect("protocol types always serialise");
    bytes.push(b'\n');
    out.write_all(&bytes)?;
    out.flush()?;
    Ok(())
}

pub fn read_message<T: for<'de> Deserialize<'de>>(input: impl Read) -> Result<T, ProtoError> {
    let mut line = Vec::new();
    let mut limited = BufReader::new(input.take(MAX_MESSAGE_BYTES + 1));
    limited.read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(ProtoError::Closed);
    }
    if line.len() as u64 > MAX_MESSAGE_BYTES {
        return Err(ProtoError::TooLarge);
    }
    // Read the version first, so that a peer of another version gets a clear answer even when the
    // rest of its message would not parse.
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    let version: VersionOnly = serde_json::from_slice(&line).map_err(ProtoError::Decode)?;
    if version.version != PROTOCOL_VERSION {
        return Err(ProtoError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: version.version,
        });
    }
    let envelope: Envelope<T> = serde_json::from_slice(&line).map_err(ProtoError::Decode)?;
    Ok(envelope.body)
}

/// One request, one reply. `timeout` bounds the whole exchange so that a wedged daemon turns into a
/// clear error for the runtime instead of a hung kubelet.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, ProtoError> {
    let stream = UnixStream::connect(socket).map_err(|source| ProtoError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    if let Err(e) = write_message(&stream, request) {
        // The daemon may answer without reading (it refuses a peer that is not root) and close
        // before the request is written: its answer is still there to read, and says more.
        return read_message(&stream).map_err(|_| e);
    }
    read_message(&stream)
}

/// A listening socket that only root can connect to: the file is created mode 0600 and every
/// connection's peer credentials are checked, so a loosened file mode alone does not open it up.
pub struct Listener {
    inner: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Replaces a stale socket file left by a previous run; refuses to replace anything else.
    pub fn bind(path: &Path) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
                std::fs::remove_file(path)?
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let inner = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next connection from a root peer; connections from anyone else are answered with an
    /// error and dropped.
    pub fn accept(&self) -> io::Result<UnixStream> {
        loop {
            let (stream, _) = self.inner.accept()?;
            if peer_uid(&stream)? == 0 {
                return Ok(stream);
            }
            let _ = write_message(
                &stream,
                &Reply::Error {
                    kind: ErrorKind::BadRequest,
                    message: "only root may use this socket".into(),
                },
            );
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, and the fd is open for the
    // duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Serve one request on an accepted connection. A request that does not parse or speaks another
/// version is answered with an error reply rather than dropped, so that the plugin can say why.
pub fn serve_one(
    stream: &UnixStream,
    handle: impl FnOnce(Request) -> Reply,
) -> Result<(), ProtoError> {
    let reply = match read_message::<Request>(stream) {
        Ok(request) => handle(request),
        Err(ProtoError::VersionMismatch { ours, theirs }) => Reply::Error {
            kind: ErrorKind::VersionMismatch,
            message: format!("vpc-ipamd speaks protocol {ours}, the plugin speaks {theirs}"),
        },
        Err(ProtoError::Decode(e)) => Reply::Error {
            kind: ErrorKind::BadRequest,
            message: format!("request does not parse: {e}"),
        },
        Err(e) => return Err(e),
    };
    write_message(stream, &reply)
}

const HTTP_TIMEOUT: Duration = Duration::from_secs(3);

/// One GET with `Connection: close` to the daemon's loopback HTTP endpoints (introspection, metrics,
/// health); returns the status and the body. For `vpcctl` and the tests, which need no HTTP client
/// beyond this.
pub fn http_get(address: std::net::SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut stream = std::net::TcpStream::connect_timeout(&address, HTTP_TIMEOUT)
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    stream
        .set_read_timeout(Some(HTTP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("reading from {address}: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{address}{path}: no HTTP response: {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{address}{path}: bad status line {head:?}"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add() -> Request {
        Request::Add {
            attachment: Attachment {
                network: "aws-cni".into(),
                container_id: "abc".into(),
                ifname: "eth0".into(),
            },
            pod: PodRef {
                namespace: "default".into(),
                name: "web".into(),
                infra_container_id: String::new(),
                uid: String::new(),
            },
            netns: "/var/run/netns/x".into(),
        }
    }

    #[test]
    fn messages_round_trip_with_the_version() {
        let mut buf = Vec::new();
        write_message(&mut buf, &add()).unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.starts_with("{\"version\":1,\"op\":\"add\""), "{text}");
        assert!(text.ends_with('\n'));
        assert_eq!(read_message::<Request>(&buf[..]).unwrap(), add());
    }

    #[test]
    fn another_version_is_refused_before_the_body_is_read() {
        let line = b"{\"version\":2,\"op\":\"teleport\"}\n";
        match read_message::<Request>(&line[..]) {
            Err(ProtoError::VersionMismatch { ours: 1, theirs: 2 }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_and_empty_input_are_errors() {
        assert!(matches!(
            read_message::<Request>(&b"not json\n"[..]),
            Err(ProtoError::Decode(_))
        ));
        assert!(matches!(
            read_message::<Request>(&b""[..]),
            Err(ProtoError::Closed)
        ));
    }

    #[test]
    fn a_call_over_a_root_only_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipamd.sock");
        let listener = Listener::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let server = std::thread::spawn(move || {
            let stream = listener.accept().unwrap();
            serve_one(&stream, |request| match request {
                Request::Add { .. } => Reply::Added {
                    allocation: Allocation {
                        address: Ipv4Addr::new(10, 0, 0, 5).into(),
                        device_number: 1,
                        route_table: 2,
                        egress_v4: None,
                        branch: None,
                    },
                },
                _ => Reply::Error {
                    kind: ErrorKind::BadRequest,
                    message: "unexpected".into(),
                },
            })
            .unwrap();
        });
        let reply = call(&path, &add(), Duration::from_secs(5)).unwrap();
        server.join().unwrap();
        assert_eq!(
            reply,
            Reply::Added {
                allocation: Allocation {
                    address: Ipv4Addr::new(10, 0, 0, 5).into(),
                    device_number: 1,
                    route_table: 2,
                    egress_v4: None,
                    branch: None,
                }
            }
        );
    }

    #[test]
    fn an_ipv4_allocation_reads_as_protocol_1_always_wrote_it() {
        let written = r#"{"reply":"added","allocation":{"address":"10.0.0.5","device_number":1,"route_table":2}}"#;
        let v4 = Reply::Added {
            allocation: Allocation {
                address: Ipv4Addr::new(10, 0, 0, 5).into(),
                device_number: 1,
                route_table: 2,
                egress_v4: None,
                branch: None,
            },
        };
        assert_eq!(serde_json::to_string(&v4).unwrap(), written);
        assert_eq!(serde_json::from_str::<Reply>(written).unwrap(), v4);
        let v6 = Allocation {
            address: "2600:1f14::7".parse().unwrap(),
            device_number: 0,
            route_table: 254,
            egress_v4: Some(Ipv4Addr::new(169, 254, 172, 9)),
            branch: None,
        };
        let text = serde_json::to_string(&v6).unwrap();
        assert!(text.contains(r#""address":"2600:1f14::7""#), "{text}");
        assert_eq!(serde_json::from_str::<Allocation>(&text).unwrap(), v6);
    }

    #[test]
    fn binding_refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, "keep me").unwrap();
        assert!(Listener::bind(&path).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[test]
    fn an_answer_sent_before_the_request_was_read_is_still_read() {
        // A request far larger than the socket's buffer: the writer is still writing when the other
        // end answers and closes, so the write fails (broken pipe) every time.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refusing.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            write_message(
                &stream,
                &Reply::Error {
                    kind: ErrorKind::BadRequest,
                    message: "only root may use this socket".into(),
                },
            )
            .unwrap();
        });
        let valid = (0..100_000)
            .map(|i| Attachment {
                network: "aws-cni".into(),
                container_id: format!("container-{i:032}"),
                ifname: "eth0".into(),
            })
            .collect();
        let request = Request::Gc {
            network: "aws-cni".into(),
            valid,
        };
        let reply = call(&path, &request, Duration::from_secs(10)).unwrap();
        server.join().unwrap();
        assert!(
            matches!(&reply, Reply::Error { message, .. } if message.contains("only root")),
            "{reply:?}"
        );
    }

    #[test]
    fn an_absent_daemon_is_a_connect_error_naming_the_path() {
        let err = call(
            Path::new("/nonexistent/ipamd.sock"),
            &Request::Status,
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(matches!(err, ProtoError::Connect { .. }));
        assert!(err.to_string().contains("/nonexistent/ipamd.sock"));
    }
}
