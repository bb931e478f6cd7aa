//! The UDP sockets this process holds, from `/proc`: what a test counts to
//! check that media peers share sockets.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The local addresses of the UDP sockets this process has open: the
/// entries of `/proc/self/fd` that are sockets (`socket:[INODE]`) whose
/// inode `/proc/net/udp` or `/proc/net/udp6` lists. Sorted.
pub fn udp_sockets() -> Vec<SocketAddr> {
    let mut by_inode: HashMap<u64, SocketAddr> = HashMap::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (cols.get(1), cols.get(9)) else {
                continue;
            };
            if let (Some(addr), Ok(inode)) = (parse_addr(local), inode.parse::<u64>()) {
                by_inode.insert(inode, addr);
            }
        }
    }
    let mut out: Vec<SocketAddr> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|target| {
                    let t = target.to_str()?;
                    let inode = t.strip_prefix("socket:[")?.strip_suffix(']')?;
                    by_inode.get(&inode.parse::<u64>().ok()?).copied()
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6), as the kernel
/// prints them: 32-bit words in host byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_a_socket_it_opens() {
        let before = udp_sockets();
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = s.local_addr().unwrap();
        let after = udp_sockets();
        assert!(after.contains(&addr), "{addr} not in {after:?}");
        assert_eq!(after.len(), before.len() + 1);
        drop(s);
        assert!(!udp_sockets().contains(&addr));
    }

    #[test]
    fn parses_kernel_addresses() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_addr("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().unwrap())
            );
            assert_eq!(
                parse_addr("00000000000000000000000001000000:0035"),
                Some("[::1]:53".parse().unwrap())
            );
        }
        assert_eq!(parse_addr("zz"), None);
    }
}
