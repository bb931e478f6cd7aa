//! Which local addresses media binds when the application names none.
//!
//! [`media_bind_addrs`] decides, from the homeserver's URL:
//! - addresses given explicitly (`--bind`) are used as they are;
//! - a homeserver on loopback (`127.0.0.0/8`, `::1`, `localhost`: tests, a
//!   demo on one machine) means every participant is on this machine:
//!   `127.0.0.1` alone;
//! - any other homeserver means participants elsewhere: every usable
//!   address of every interface that is up, IPv4 and IPv6 (not loopback,
//!   not link-local: link-local IPv6 needs scope ids, which candidates do
//!   not carry). Server-reflexive and relayed candidates then come from the
//!   STUN/TURN servers the peer is given (the homeserver's
//!   `/voip/turnServer`), reached from these addresses.
//!
//! Interfaces are listed with `getifaddrs` (through `if-addrs`); whether an
//! interface is up is read from `/sys/class/net/<name>/{flags,operstate}`
//! on Linux (elsewhere every listed interface counts as up).

use std::net::{IpAddr, Ipv4Addr};

use tracing::warn;

/// One address of a local network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddr {
    /// Interface name (`eth0`, `wlan0`...).
    pub name: String,
    /// The address.
    pub ip: IpAddr,
    /// Whether the interface is up (administratively and, as far as the
    /// system says, operationally).
    pub up: bool,
}

/// Why [`media_bind_addrs`] chose what it chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindChoice {
    /// The addresses were given explicitly.
    Explicit,
    /// The homeserver is on loopback: loopback alone.
    LoopbackHomeserver,
    /// The homeserver is elsewhere: every usable interface address.
    Interfaces,
    /// The homeserver is elsewhere but no interface has a usable address:
    /// loopback, as the only thing left.
    NoUsableInterface,
}

impl BindChoice {
    /// A short text for logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            BindChoice::Explicit => "explicit",
            BindChoice::LoopbackHomeserver => "loopback homeserver",
            BindChoice::Interfaces => "interfaces",
            BindChoice::NoUsableInterface => "no usable interface",
        }
    }
}

/// The host part of a URL (`http://[::1]:8008/` gives `::1`), or `None`
/// when there is none.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        v6.split_once(']').map(|(h, _)| h)?
    } else {
        hostport.split(':').next().unwrap_or("")
    };
    (!host.is_empty()).then_some(host)
}

/// Whether `host` (a URL's host: a name, an IPv4 address or an IPv6
/// address with or without brackets) is on loopback: `127.0.0.0/8`, `::1`
/// (also IPv4-mapped), `localhost` and names under `.localhost`.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if h == "localhost" || h.ends_with(".localhost") {
        return true;
    }
    match h.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// Whether `ip` may be bound for media reachable from elsewhere: not
/// loopback, unspecified, multicast or link-local (IPv4 `169.254/16`,
/// IPv6 `fe80::/10`).
pub fn is_usable_media_addr(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            !(v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || v.is_broadcast()
                || v.is_link_local())
        }
        IpAddr::V6(v) => {
            !(v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (v.segments()[0] & 0xffc0) == 0xfe80
                || v.to_ipv4_mapped().is_some())
        }
    }
}

/// The usable addresses (see [`is_usable_media_addr`]) of the interfaces
/// that are up, in the system's order, without duplicates.
pub fn usable_addrs(interfaces: &[InterfaceAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for i in interfaces {
        if i.up && is_usable_media_addr(i.ip) && !out.contains(&i.ip) {
            out.push(i.ip);
        }
    }
    out
}

/// The decision of [`media_bind_addrs`], on a given list of interfaces.
pub fn choose_bind_addrs(
    explicit: &[IpAddr],
    homeserver_url: &str,
    interfaces: impl FnOnce() -> Vec<InterfaceAddr>,
) -> (Vec<IpAddr>, BindChoice) {
    if !explicit.is_empty() {
        return (explicit.to_vec(), BindChoice::Explicit);
    }
    if url_host(homeserver_url).is_some_and(is_loopback_host) {
        return (
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            BindChoice::LoopbackHomeserver,
        );
    }
    let addrs = usable_addrs(&interfaces());
    if addrs.is_empty() {
        return (
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            BindChoice::NoUsableInterface,
        );
    }
    (addrs, BindChoice::Interfaces)
}

/// The local addresses to bind media to: `explicit` if not empty, else
/// loopback for a homeserver on loopback, else every usable interface
/// address (see the module documentation).
pub fn media_bind_addrs(explicit: &[IpAddr], homeserver_url: &str) -> (Vec<IpAddr>, BindChoice) {
    let r = choose_bind_addrs(explicit, homeserver_url, interface_addrs);
    if r.1 == BindChoice::NoUsableInterface {
        warn!(
            homeserver = %homeserver_url,
            "no network interface with a usable address is up: media binds 127.0.0.1, \
             which only reaches participants on this machine"
        );
    }
    r
}

/// Every address of every local interface, with whether its interface is
/// up. An error listing them is logged and gives an empty list.
pub fn interface_addrs() -> Vec<InterfaceAddr> {
    match if_addrs::get_if_addrs() {
        Ok(ifs) => ifs
            .into_iter()
            .map(|i| InterfaceAddr {
                up: interface_up(&i.name),
                ip: i.ip(),
                name: i.name,
            })
            .collect(),
        Err(e) => {
            warn!(error = %e, "cannot list network interfaces");
            Vec::new()
        }
    }
}

/// `IFF_UP` and an operational state that is not down, as far as
/// `/sys/class/net` tells (true when it tells nothing).
fn interface_up(name: &str) -> bool {
    // IPv4 alias labels (`eth0:1`) belong to their interface.
    let name = name.split(':').next().unwrap_or(name);
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return true;
    }
    let dir = std::path::Path::new("/sys/class/net").join(name);
    let flags = std::fs::read_to_string(dir.join("flags"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok());
    if flags.is_some_and(|f| f & 0x1 == 0) {
        return false;
    }
    let oper = std::fs::read_to_string(dir.join("operstate")).unwrap_or_default();
    parse_operstate_up(&oper)
}

/// Operational states that pass packets (or may: `unknown` is what
/// loopback, TUN and many virtual interfaces report).
fn parse_operstate_up(s: &str) -> bool {
    !matches!(s.trim(), "down" | "lowerlayerdown" | "notpresent")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs() -> Vec<InterfaceAddr> {
        let a = |name: &str, ip: &str, up: bool| InterfaceAddr {
            name: name.into(),
            ip: ip.parse().unwrap(),
            up,
        };
        vec![
            a("lo", "127.0.0.1", true),
            a("lo", "::1", true),
            a("eth0", "192.0.2.2", true),
            a("eth0", "fd00::2", true),
            a("eth0", "2001:db8::5", true),
            a("eth0", "fe80::fc:ff:fe00:1", true),
            a("eth0:1", "192.0.2.3", true),
            a("docker0", "172.17.0.1", false),
            a("wlan0", "169.254.3.4", true),
            a("eth1", "192.0.2.2", true),
        ]
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_homeserver_binds_loopback_only() {
        for url in [
            "http://127.0.0.1:8008",
            "http://127.3.2.1:8008/",
            "https://localhost/",
            "http://LOCALHOST.:1",
            "http://matrix.localhost:8008",
            "http://[::1]:8008/_matrix",
            "http://[::ffff:127.0.0.1]:80",
            "http://user@127.0.0.1:80",
        ] {
            let (addrs, why) = choose_bind_addrs(&[], url, || panic!("no listing needed"));
            assert_eq!(addrs, vec![ip("127.0.0.1")], "{url}");
            assert_eq!(why, BindChoice::LoopbackHomeserver, "{url}");
        }
    }

    #[test]
    fn other_homeserver_binds_every_usable_interface_address() {
        for url in [
            "https://matrix.example.org",
            "http://10.231.5.1:8008/",
            "http://[2001:db8::1]:8008",
            "https://127.0.0.1.example.org/",
            "not a url",
        ] {
            let (addrs, why) = choose_bind_addrs(&[], url, ifs);
            assert_eq!(why, BindChoice::Interfaces, "{url}");
            assert_eq!(
                addrs,
                vec![
                    ip("192.0.2.2"),
                    ip("fd00::2"),
                    ip("2001:db8::5"),
                    ip("192.0.2.3")
                ],
                "{url}: no loopback, link-local, down interface or duplicate"
            );
        }
    }

    #[test]
    fn no_usable_interface_falls_back_to_loopback() {
        let only_lo = || ifs().into_iter().filter(|i| i.name == "lo").collect();
        let (addrs, why) = choose_bind_addrs(&[], "https://matrix.example.org", only_lo);
        assert_eq!(addrs, vec![ip("127.0.0.1")]);
        assert_eq!(why, BindChoice::NoUsableInterface);
    }

    #[test]
    fn explicit_addresses_win() {
        let explicit = [ip("127.0.0.1"), ip("::1")];
        for url in ["https://matrix.example.org", "http://127.0.0.1:8008"] {
            let (addrs, why) = choose_bind_addrs(&explicit, url, || panic!("no listing needed"));
            assert_eq!(addrs, explicit.to_vec());
            assert_eq!(why, BindChoice::Explicit);
        }
        let (addrs, _) = choose_bind_addrs(&[ip("0.0.0.0")], "http://localhost", ifs);
        assert_eq!(addrs, vec![ip("0.0.0.0")], "expanded later, by the peer");
    }

    #[test]
    fn url_hosts() {
        assert_eq!(url_host("http://a.b:80/x"), Some("a.b"));
        assert_eq!(url_host("https://a.b"), Some("a.b"));
        assert_eq!(url_host("http://[::1]:80/"), Some("::1"));
        assert_eq!(url_host("http://u:p@h?q"), Some("h"));
        assert_eq!(url_host("http://[::1"), None);
        assert_eq!(url_host("http:///path"), None);
    }

    #[test]
    fn operstates() {
        assert!(parse_operstate_up("up\n"));
        assert!(parse_operstate_up("unknown\n"));
        assert!(parse_operstate_up(""));
        assert!(!parse_operstate_up("down\n"));
        assert!(!parse_operstate_up("lowerlayerdown"));
    }

    #[test]
    fn this_machine_lists_interfaces() {
        // Whatever the machine has, loopback is never chosen for a remote
        // homeserver unless nothing else is usable.
        let all = interface_addrs();
        let (addrs, why) = media_bind_addrs(&[], "https://matrix.example.org");
        if why == BindChoice::Interfaces {
            assert!(addrs.iter().all(|a| is_usable_media_addr(*a)), "{addrs:?}");
            assert!(
                addrs.iter().all(|a| all.iter().any(|i| i.ip == *a && i.up)),
                "{addrs:?} {all:?}"
            );
        } else {
            assert_eq!(addrs, vec![ip("127.0.0.1")]);
        }
    }
}
