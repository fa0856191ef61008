//! 802.1Q sub-interfaces where the kernel has no VLAN links (this one has none): a trunk's VLAN is
//! emulated by a veth pair and two eBPF programs attached with TCX. What the stack sends out of the
//! sub-interface arrives at its peer, whose ingress program tags it with the VLAN id and sends it out
//! of the parent (the trunk); a frame arriving at the parent with that VLAN id is untagged by the
//! parent's ingress program and sent out of the peer, so it arrives at the sub-interface. Frames of
//! other VLANs go on to the next program on the parent. The wire between trunks carries real tagged
//! frames, as EC2's trunk ENIs do, so branch pods are wired and tested as on a node; only the link's
//! creation differs (on a node the plugin creates a `vlan` link).
//!
//! The programs are a dozen instructions each, assembled here: no compiler, no loader library.

use crate::netns::ip;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// One eBPF instruction as the kernel reads it (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

const fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}
const fn mov_reg(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}
const fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}
const fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}
/// `dst = *(u32 *)(src + off)`.
const fn load_word(dst: u8, src: u8, off: i16) -> Insn {
    insn(0x61, dst, src, off, 0)
}
/// Skips `off` instructions when `dst == imm`.
const fn jump_eq(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x15, dst, 0, off, imm)
}
const fn jump_ne(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x55, dst, 0, off, imm)
}
const fn and_imm(dst: u8, imm: i32) -> Insn {
    insn(0x57, dst, 0, 0, imm)
}

// Helper ids and `struct __sk_buff` offsets from the kernel's UAPI (include/uapi/linux/bpf.h).
const SKB_VLAN_PUSH: i32 = 18;
const SKB_VLAN_POP: i32 = 19;
const REDIRECT: i32 = 23;
const VLAN_PRESENT: i16 = 20;
const VLAN_TCI: i16 = 24;
/// ETH_P_8021Q in network order, as the helper takes it.
const ETH_P_8021Q_BE: i32 = 0x0081;
const TC_ACT_SHOT: i32 = 2;
const TCX_NEXT: i32 = -1;

const BPF_PROG_LOAD: i64 = 5;
const BPF_LINK_CREATE: i64 = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;

/// Tags the frame with `vlan` and sends it out of `parent`.
fn tag(vlan: u16, parent: u32) -> [Insn; 12] {
    [
        mov_reg(6, 1),
        mov_reg(1, 6),
        mov_imm(2, ETH_P_8021Q_BE),
        mov_imm(3, vlan as i32),
        call(SKB_VLAN_PUSH),
        jump_eq(0, 0, 2),
        mov_imm(0, TC_ACT_SHOT),
        exit(),
        mov_imm(1, parent as i32),
        mov_imm(2, 0),
        call(REDIRECT),
        exit(),
    ]
}

/// A frame of `vlan`: untagged and sent out of `peer`; any other: to the next program.
fn untag(vlan: u16, peer: u32) -> [Insn; 14] {
    [
        mov_reg(6, 1),
        load_word(2, 6, VLAN_PRESENT),
        jump_eq(2, 0, 9),
        load_word(2, 6, VLAN_TCI),
        and_imm(2, 0xfff),
        jump_ne(2, vlan as i32, 6),
        mov_reg(1, 6),
        call(SKB_VLAN_POP),
        mov_imm(1, peer as i32),
        mov_imm(2, 0),
        call(REDIRECT),
        exit(),
        mov_imm(0, TCX_NEXT),
        exit(),
    ]
}

fn bpf(cmd: i64, attr: &mut [u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: `attr` is a zeroed `union bpf_attr` of the length passed, filled for `cmd`; every
    // pointer in it refers to memory that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put32(attr: &mut [u8], at: usize, value: u32) {
    attr[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put64(attr: &mut [u8], at: usize, value: u64) {
    attr[at..at + 8].copy_from_slice(&value.to_ne_bytes());
}

fn load(program: &[Insn]) -> Result<OwnedFd, String> {
    let license = b"GPL\0";
    let mut log = vec![0u8; 16 * 1024];
    let mut attr = [0u8; 128];
    put32(&mut attr, 0, BPF_PROG_TYPE_SCHED_CLS);
    put32(&mut attr, 4, program.len() as u32);
    put64(&mut attr, 8, program.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1);
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        format!(
            "loading a VLAN program: {e} (run as root?): {}",
            String::from_utf8_lossy(&log[..end])
        )
    })
}

/// Attaches `program` to `ifindex`'s ingress in the calling thread's namespace; detached when the
/// returned link is dropped.
fn attach_ingress(program: &OwnedFd, ifindex: u32) -> Result<OwnedFd, String> {
    let mut attr = [0u8; 64];
    put32(&mut attr, 0, program.as_raw_fd() as u32);
    put32(&mut attr, 4, ifindex);
    put32(&mut attr, 8, BPF_TCX_INGRESS);
    bpf(BPF_LINK_CREATE, &mut attr).map_err(|e| format!("attaching with TCX: {e}"))
}

/// VLANs one parent can carry here: each is a TCX program on the parent's ingress, and the kernel
/// takes at most 64 per hook.
pub const MAX_PER_PARENT: usize = 60;

/// An emulated VLAN sub-interface; its programs stay attached while it lives.
#[derive(Debug)]
pub struct VlanPort {
    pub name: String,
    _links: [OwnedFd; 2],
}

/// Creates `name` in the named namespace `netns` as VLAN `vlan` of `parent`, with `mac`, up.
pub fn add(
    netns: &str,
    parent: &str,
    vlan: u16,
    name: &str,
    mac: &str,
) -> Result<VlanPort, String> {
    // Unique in the namespace whatever the names' lengths (a link's name has 15 bytes at most).
    let peer = {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in parent.bytes().chain(vlan.to_be_bytes()).chain(name.bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("vq{:012x}", h & 0xffff_ffff_ffff)
    };
    let n = netns;
    ip(&[
        "-n", n, "link", "add", name, "address", mac, "type", "veth", "peer", "name", &peer,
    ])?;
    for link in [name, peer.as_str()] {
        ip(&["-n", n, "link", "set", link, "up"])?;
    }
    let namespace =
        datapath::netns::NetNs::open(format!("/var/run/netns/{n}")).map_err(|e| e.to_string())?;
    let links = namespace
        .run(|| -> Result<[OwnedFd; 2], String> {
            let index = |link: &str| {
                let c = std::ffi::CString::new(link).map_err(|e| e.to_string())?;
                // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
                match unsafe { libc::if_nametoindex(c.as_ptr()) } {
                    0 => Err(format!("{link} is not in {n}")),
                    i => Ok(i),
                }
            };
            let (parent_index, peer_index) = (index(parent)?, index(&peer)?);
            Ok([
                attach_ingress(&load(&tag(vlan, parent_index))?, peer_index)?,
                attach_ingress(&load(&untag(vlan, peer_index))?, parent_index)?,
            ])
        })
        .map_err(|e| e.to_string())??;
    Ok(VlanPort {
        name: name.to_string(),
        _links: links,
    })
}
