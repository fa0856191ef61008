//! Traffic probes: a listener that tells each client the address it came from, its client, and (from
//! `proto`) the small HTTP GET for the daemon's endpoints.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub use proto::http_get;

const TIMEOUT: Duration = Duration::from_secs(3);

/// Answers every connection with the client's address, then closes it. Bound in whatever namespace
/// the caller is in.
pub struct WhoAmI {
    fd: i32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WhoAmI {
    pub fn bind(address: SocketAddr) -> std::io::Result<WhoAmI> {
        let listener = TcpListener::bind(address)?;
        let fd = listener.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(mut stream) = stream {
                        if let Ok(peer) = stream.peer_addr() {
                            let _ = stream.write_all(peer.ip().to_string().as_bytes());
                        }
                    }
                }
            })
        };
        Ok(WhoAmI {
            fd,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for WhoAmI {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: the listener is owned by the thread joined below, so the fd is still open.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Echoes every datagram back to its sender, until dropped. Bound in whatever namespace the caller
/// is in.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn bind(address: SocketAddr) -> std::io::Result<UdpEcho> {
        let socket = std::net::UdpSocket::bind(address)?;
        // Wakes up to see whether it is to stop.
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 512];
                while !stop.load(Ordering::SeqCst) {
                    if let Ok((n, from)) = socket.recv_from(&mut buffer) {
                        let _ = socket.send_to(&buffer[..n], from);
                    }
                }
            })
        };
        Ok(UdpEcho {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `target` answers within `patience`: a TCP connection accepted, or a datagram echoed.
pub fn answers(target: SocketAddr, udp: bool, patience: Duration) -> bool {
    if !udp {
        return TcpStream::connect_timeout(&target, patience).is_ok();
    }
    let local: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    let Ok(socket) = std::net::UdpSocket::bind(local) else {
        return false;
    };
    if socket.set_read_timeout(Some(patience)).is_err() || socket.connect(target).is_err() {
        return false;
    }
    let mut buffer = [0u8; 16];
    socket.send(b"probe").is_ok() && matches!(socket.recv(&mut buffer), Ok(5))
}

pub fn seen_as(target: SocketAddr) -> Result<IpAddr, String> {
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("reading from {target}: {e}"))?;
    answer
        .parse()
        .map_err(|_| format!("{target} answered {answer:?}"))
}
