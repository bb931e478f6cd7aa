//! Just enough STUN (RFC 5389) to learn a server-reflexive address: a
//! Binding request and the parsing of its success response.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const MAGIC: u32 = 0x2112_a442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// A 96-bit STUN transaction id.
pub(crate) type TransactionId = [u8; 12];

/// A new random transaction id.
pub(crate) fn new_transaction_id() -> TransactionId {
    let mut t = [0u8; 12];
    for b in &mut t {
        *b = fastrand::u8(..);
    }
    t
}

/// Encodes a Binding request without attributes.
pub(crate) fn binding_request(tid: &TransactionId) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    // length 0
    m[4..8].copy_from_slice(&MAGIC.to_be_bytes());
    m[8..20].copy_from_slice(tid);
    m
}

/// Parses a Binding success response for `tid` and returns the mapped
/// address (XOR-MAPPED-ADDRESS preferred, MAPPED-ADDRESS as fallback).
/// `None` for anything else, including malformed messages.
pub(crate) fn parse_binding_response(msg: &[u8], tid: &TransactionId) -> Option<SocketAddr> {
    let header = msg.get(0..20)?;
    let typ = u16::from_be_bytes([header[0], header[1]]);
    let len = u16::from_be_bytes([header[2], header[3]]) as usize;
    if typ != BINDING_SUCCESS
        || header[4..8] != MAGIC.to_be_bytes()
        || &header[8..20] != tid
        || !len.is_multiple_of(4)
    {
        return None;
    }
    let body = msg.get(20..20 + len)?;
    let mut pos = 0;
    let mut mapped = None;
    while pos + 4 <= body.len() {
        let atype = u16::from_be_bytes([body[pos], body[pos + 1]]);
        let alen = u16::from_be_bytes([body[pos + 2], body[pos + 3]]) as usize;
        let value = body.get(pos + 4..pos + 4 + alen)?;
        match atype {
            ATTR_XOR_MAPPED_ADDRESS => return parse_address(value, Some(tid)),
            ATTR_MAPPED_ADDRESS => mapped = parse_address(value, None),
            _ => {}
        }
        pos += 4 + alen.div_ceil(4) * 4;
    }
    mapped
}

fn parse_address(v: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let mut port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    if xor.is_some() {
        port ^= (MAGIC >> 16) as u16;
    }
    let ip = match family {
        0x01 => {
            let raw = v.get(4..8)?;
            let mut b = [raw[0], raw[1], raw[2], raw[3]];
            if xor.is_some() {
                for (x, m) in b.iter_mut().zip(MAGIC.to_be_bytes()) {
                    *x ^= m;
                }
            }
            IpAddr::V4(Ipv4Addr::from(b))
        }
        0x02 => {
            let raw = v.get(4..20)?;
            let mut b = [0u8; 16];
            b.copy_from_slice(raw);
            if let Some(tid) = xor {
                let mut key = [0u8; 16];
                key[0..4].copy_from_slice(&MAGIC.to_be_bytes());
                key[4..16].copy_from_slice(tid);
                for (x, k) in b.iter_mut().zip(key) {
                    *x ^= k;
                }
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Encodes a Binding success response carrying XOR-MAPPED-ADDRESS; used by
/// tests to stand in for a STUN server.
pub fn encode_binding_success(tid: &[u8; 12], mapped: SocketAddr) -> Vec<u8> {
    let mut value = Vec::new();
    value.push(0);
    let port = mapped.port() ^ (MAGIC >> 16) as u16;
    match mapped.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            for (o, m) in ip.octets().iter().zip(MAGIC.to_be_bytes()) {
                value.push(o ^ m);
            }
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            let mut key = [0u8; 16];
            key[0..4].copy_from_slice(&MAGIC.to_be_bytes());
            key[4..16].copy_from_slice(tid);
            for (o, k) in ip.octets().iter().zip(key) {
                value.push(o ^ k);
            }
        }
    }
    let mut m = Vec::with_capacity(20 + 4 + value.len());
    m.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    m.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    m.extend_from_slice(&MAGIC.to_be_bytes());
    m.extend_from_slice(tid);
    m.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    m.extend_from_slice(&(value.len() as u16).to_be_bytes());
    m.extend_from_slice(&value);
    m
}

/// If `msg` is a STUN Binding request, its transaction id (for test servers).
pub fn binding_request_id(msg: &[u8]) -> Option<[u8; 12]> {
    let h = msg.get(0..20)?;
    if u16::from_be_bytes([h[0], h[1]]) != BINDING_REQUEST || h[4..8] != MAGIC.to_be_bytes() {
        return None;
    }
    let mut t = [0u8; 12];
    t.copy_from_slice(&h[8..20]);
    Some(t)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_v4_v6() {
        let tid = new_transaction_id();
        let req = binding_request(&tid);
        assert_eq!(binding_request_id(&req), Some(tid));
        for addr in ["203.0.113.7:40000", "[2001:db8::1]:5000"] {
            let a: SocketAddr = addr.parse().unwrap();
            let resp = encode_binding_success(&tid, a);
            assert_eq!(parse_binding_response(&resp, &tid), Some(a));
            let other = new_transaction_id();
            assert_eq!(parse_binding_response(&resp, &other), None);
        }
    }

    #[test]
    fn garbage_is_ignored() {
        let tid = new_transaction_id();
        let mut rng = fastrand::Rng::with_seed(5);
        let good = encode_binding_success(&tid, "1.2.3.4:5".parse().unwrap());
        for _ in 0..5000 {
            let mut v = good.clone();
            let i = rng.usize(0..v.len());
            v[i] = rng.u8(..);
            v.truncate(rng.usize(0..=v.len()));
            let _ = parse_binding_response(&v, &tid);
        }
        assert_eq!(parse_binding_response(&[], &tid), None);
    }
}
