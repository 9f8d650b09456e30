//! Packet capture on a link (tcpdump writing pcap) and a reader for what crossed it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::lab::Ns;

/// A running capture.
#[derive(Debug)]
pub struct Capture {
    child: Child,
    file: PathBuf,
}

/// One TCP segment seen on the wire.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

impl Capture {
    /// Captures TCP on `iface` inside `ns` into `dir`.
    pub fn start(ns: &Ns, iface: &str, dir: &Path) -> Self {
        let file = dir.join(format!("{}-{iface}.pcap", ns.name));
        let child = ns
            .open()
            .command("tcpdump")
            .args(["-i", iface, "-U", "--immediate-mode", "-s", "0", "-n", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(file.with_extension("log")).expect("capture log"))
            .spawn()
            .expect("tcpdump (apt-get install tcpdump)");
        // tcpdump writes the file header once it is listening.
        for _ in 0..200 {
            if std::fs::metadata(&file).is_ok_and(|m| m.len() >= 24) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        Self { child, file }
    }

    /// Stops the capture and returns every TCP segment it saw.
    pub fn stop(mut self) -> Vec<Segment> {
        std::thread::sleep(Duration::from_millis(200));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let data = std::fs::read(&self.file).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(self.file.with_extension("log")).unwrap_or_default();
            panic!(
                "no capture in {}: {e}; tcpdump said: {log}",
                self.file.display()
            )
        });
        parse_pcap(&data)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn u16be(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Reads a little-endian, Ethernet-linktype pcap file into TCP segments.
pub fn parse_pcap(data: &[u8]) -> Vec<Segment> {
    let mut out = Vec::new();
    if data.len() < 24 || data[..4] != [0xd4, 0xc3, 0xb2, 0xa1] {
        return out;
    }
    let mut at = 24;
    while at + 16 <= data.len() {
        let incl = u32::from_le_bytes(data[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
        let start = at + 16;
        let end = (start + incl).min(data.len());
        if let Some(seg) = parse_frame(&data[start..end]) {
            out.push(seg);
        }
        at = start + incl;
    }
    out
}

fn parse_frame(f: &[u8]) -> Option<Segment> {
    if f.len() < 14 {
        return None;
    }
    let ethertype = u16be(&f[12..14]);
    let ip = &f[14..];
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if ip.len() < ihl || ip[9] != 6 {
                return None;
            }
            let total = usize::from(u16be(&ip[2..4])).min(ip.len());
            let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
            let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            (src, dst, &ip[ihl..total])
        }
        0x86dd => {
            if ip.len() < 40 || ip[6] != 6 {
                return None;
            }
            let plen = usize::from(u16be(&ip[4..6]));
            let src = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?));
            let dst = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?));
            (src, dst, &ip[40..(40 + plen).min(ip.len())])
        }
        _ => return None,
    };
    if tcp.len() < 20 {
        return None;
    }
    let off = usize::from(tcp[12] >> 4) * 4;
    Some(Segment {
        src: SocketAddr::new(src, u16be(&tcp[0..2])),
        dst: SocketAddr::new(dst, u16be(&tcp[2..4])),
        payload: tcp.get(off..).unwrap_or_default().to_vec(),
    })
}

/// Whether `needle` occurs in any segment's payload.
pub fn contains(segments: &[Segment], needle: &[u8]) -> bool {
    segments
        .iter()
        .any(|s| s.payload.windows(needle.len()).any(|w| w == needle))
}
