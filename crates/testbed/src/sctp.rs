//! SCTP probes without SCTP sockets: this kernel has no `sctp` module, so `socket(..., IPPROTO_SCTP)`
//! is refused, but raw IPv4 sockets of protocol 132 send and receive SCTP packets, and the
//! netfilter path (conntrack's SCTP tracker, nftables' `th dport`) handles them as it would any
//! association's. A probe is an INIT chunk, the packet that opens an association and the one a
//! NetworkPolicy judges; it reached its target when the target's listener saw it.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::collections::HashSet;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const IPPROTO_SCTP: i32 = 132;

/// CRC-32C (Castagnoli), bit by bit: SCTP's checksum (RFC 9260, appendix A).
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An SCTP packet of one INIT chunk from `source_port` to `port`, checksummed. `tag` is the
/// initiate tag (never 0).
pub fn init_packet(source_port: u16, port: u16, tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&source_port.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    // An INIT travels with verification tag 0; the checksum is filled in below.
    p.extend_from_slice(&[0; 8]);
    // INIT: type 1, flags 0, length 20; initiate tag, a_rwnd, outbound and inbound streams, TSN.
    p.extend_from_slice(&[1, 0, 0, 20]);
    p.extend_from_slice(&tag.max(1).to_be_bytes());
    p.extend_from_slice(&65_535u32.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&tag.wrapping_add(1).to_be_bytes());
    // The CRC goes in least significant byte first, as SCTP stacks write it.
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// Reads the source address and port and the destination address and port of an IPv4 packet
/// carrying SCTP, as a raw socket delivers it (IP header included).
fn parse(packet: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4)> {
    let header = usize::from(packet.first()? & 0x0f) * 4;
    if packet.len() < header + 12 || packet[9] != IPPROTO_SCTP as u8 {
        return None;
    }
    let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let destination = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let port = |at: usize| u16::from_be_bytes([packet[at], packet[at + 1]]);
    Some((
        SocketAddrV4::new(source, port(header)),
        SocketAddrV4::new(destination, port(header + 2)),
    ))
}

fn raw_socket() -> std::io::Result<Socket> {
    Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(IPPROTO_SCTP)))
}

/// Records every SCTP packet that arrives for `address` (any port), in the namespace the caller
/// is in, until dropped: its source address and port and its destination port. A probe sends from
/// a port of its own, so what an earlier probe got through does not count for a later one.
pub struct SctpListener {
    address: Ipv4Addr,
    seen: Arc<Mutex<HashSet<(SocketAddrV4, u16)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SctpListener {
    pub fn bind(address: Ipv4Addr) -> std::io::Result<SctpListener> {
        let socket = raw_socket()?;
        // Wakes up to see whether it is to stop.
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buffer = [0u8; 1500];
                while !stop.load(Ordering::SeqCst) {
                    let Ok(n) = (&socket).read(&mut buffer) else {
                        continue;
                    };
                    if let Some((source, destination)) = parse(&buffer[..n]) {
                        if *destination.ip() == address {
                            seen.lock()
                                .expect("no panic holding it")
                                .insert((source, destination.port()));
                        }
                    }
                }
            })
        };
        Ok(SctpListener {
            address,
            seen,
            stop,
            thread: Some(thread),
        })
    }

    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// Whether an SCTP packet from `source` to `port` has arrived.
    pub fn saw(&self, source: SocketAddrV4, port: u16) -> bool {
        self.seen
            .lock()
            .expect("no panic holding it")
            .contains(&(source, port))
    }
}

impl Drop for SctpListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends INITs to `target` from the caller's namespace: three, 100 ms apart, as an SCTP stack
/// retransmits an unanswered INIT (one lost to a table being replaced is not a policy's drop).
pub fn send_inits(target: SocketAddrV4, source_port: u16) -> std::io::Result<()> {
    let socket = raw_socket()?;
    let to = SockAddr::from(SocketAddr::V4(SocketAddrV4::new(*target.ip(), 0)));
    let packet = init_packet(source_port, target.port(), u32::from(source_port) << 16 | 1);
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        socket.send_to(&packet, &to)?;
    }
    Ok(())
}

/// Waits up to `patience` for `listener` to see a packet from `source` to `port`.
pub fn reached(
    listener: &SctpListener,
    source: SocketAddrV4,
    port: u16,
    patience: Duration,
) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        if listener.saw(source, port) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_value() {
        // The check value of CRC-32C over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn an_init_packet_parses_back() {
        let sctp = init_packet(40_000, 80, 7);
        assert_eq!(sctp.len(), 32);
        assert_eq!(&sctp[..4], &[0x9c, 0x40, 0, 80]);
        // The checksum covers the packet with its own field zeroed.
        let mut zeroed = sctp.clone();
        zeroed[8..12].copy_from_slice(&[0; 4]);
        assert_eq!(sctp[8..12], crc32c(&zeroed).to_le_bytes());
        let mut ip = vec![
            0x45, 0, 0, 52, 0, 0, 0, 0, 64, 132, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ip.extend_from_slice(&sctp);
        assert_eq!(
            parse(&ip),
            Some((
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 40_000),
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80)
            ))
        );
        ip[9] = 6;
        assert_eq!(parse(&ip), None);
    }
}
