//! STUN (RFC 5389/8489) and TURN (RFC 5766/8656) message codec.
//!
//! The crate uses it for server-reflexive addresses (Binding) and for its
//! TURN client (Allocate, Refresh, CreatePermission, ChannelBind, Send/Data
//! indications, ChannelData). Decoding never panics: every length and offset
//! is checked, and malformed input is a [`StunError`].
//!
//! Public are only the helpers tests use to stand in for a STUN server
//! ([`encode_binding_success`], [`binding_request_id`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;

pub(crate) const MAGIC: u32 = 0x2112_a442;
const HEADER_LEN: usize = 20;
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// STUN/TURN methods.
pub(crate) mod method {
    pub const BINDING: u16 = 0x001;
    pub const ALLOCATE: u16 = 0x003;
    pub const REFRESH: u16 = 0x004;
    pub const SEND: u16 = 0x006;
    pub const DATA: u16 = 0x007;
    pub const CREATE_PERMISSION: u16 = 0x008;
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// Attribute types.
pub(crate) mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const CHANNEL_NUMBER: u16 = 0x000c;
    pub const LIFETIME: u16 = 0x000d;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const FINGERPRINT: u16 = 0x8028;
}

/// Message class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }
}

/// The 16-bit message type of `method` and `class` (RFC 5389 section 6).
pub(crate) fn message_type(method: u16, class: Class) -> u16 {
    let m = method & 0x0fff;
    let c = class.bits();
    ((m & 0x0f80) << 2) | ((m & 0x0070) << 1) | (m & 0x000f) | ((c & 0b10) << 7) | ((c & 0b01) << 4)
}

fn split_type(t: u16) -> (u16, Class) {
    let method = ((t & 0x3e00) >> 2) | ((t & 0x00e0) >> 1) | (t & 0x000f);
    let class = match ((t >> 7) & 0b10) | ((t >> 4) & 0b01) {
        0b00 => Class::Request,
        0b01 => Class::Indication,
        0b10 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// Why a datagram is not an acceptable STUN or ChannelData message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Shorter than a header.
    #[error("message too short ({0} bytes)")]
    TooShort(usize),
    /// The first two bits are not zero or the magic cookie is wrong.
    #[error("not a STUN message")]
    NotStun,
    /// The header's length disagrees with the datagram or is not a multiple of 4.
    #[error("bad message length {declared} for a {actual}-byte datagram")]
    BadLength {
        /// Length in the header.
        declared: usize,
        /// Bytes available after the header.
        actual: usize,
    },
    /// An attribute runs past the end of the message.
    #[error("attribute 0x{0:04x} is truncated")]
    TruncatedAttribute(u16),
    /// An attribute's value is malformed.
    #[error("malformed attribute 0x{0:04x}")]
    BadAttribute(u16),
    /// FINGERPRINT does not match.
    #[error("bad FINGERPRINT")]
    BadFingerprint,
    /// Not a ChannelData message (channel number outside 0x4000..=0x7fff).
    #[error("not a ChannelData message")]
    NotChannelData,
}

/// One attribute, borrowed from the datagram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawAttr<'a> {
    pub typ: u16,
    pub value: &'a [u8],
    /// Offset of the attribute header within the message.
    offset: usize,
}

/// A decoded STUN message, borrowing the datagram.
#[derive(Debug, Clone)]
pub(crate) struct Message<'a> {
    pub method: u16,
    pub class: Class,
    pub tid: TransactionId,
    pub attrs: Vec<RawAttr<'a>>,
    raw: &'a [u8],
}

/// Whether `data` looks like a STUN message (first two bits zero, magic).
pub(crate) fn is_stun(data: &[u8]) -> bool {
    data.len() >= HEADER_LEN && data[0] & 0xc0 == 0 && data[4..8] == MAGIC.to_be_bytes()
}

impl<'a> Message<'a> {
    /// Decodes a STUN message. Attributes after MESSAGE-INTEGRITY other
    /// than FINGERPRINT are ignored (RFC 5389 section 15.4); a present
    /// FINGERPRINT must match.
    pub fn decode(data: &'a [u8]) -> Result<Message<'a>, StunError> {
        if data.len() < HEADER_LEN {
            return Err(StunError::TooShort(data.len()));
        }
        if !is_stun(data) {
            return Err(StunError::NotStun);
        }
        let typ = u16::from_be_bytes([data[0], data[1]]);
        let len = u16::from_be_bytes([data[2], data[3]]) as usize;
        let actual = data.len() - HEADER_LEN;
        if len > actual || !len.is_multiple_of(4) {
            return Err(StunError::BadLength {
                declared: len,
                actual,
            });
        }
        let raw = &data[..HEADER_LEN + len];
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&raw[8..20]);
        let (method, class) = split_type(typ);
        let mut attrs = Vec::new();
        let mut pos = HEADER_LEN;
        let mut after_integrity = false;
        while pos < raw.len() {
            let head = raw
                .get(pos..pos + 4)
                .ok_or(StunError::TruncatedAttribute(0))?;
            let atype = u16::from_be_bytes([head[0], head[1]]);
            let alen = u16::from_be_bytes([head[2], head[3]]) as usize;
            let value = raw
                .get(pos + 4..pos + 4 + alen)
                .ok_or(StunError::TruncatedAttribute(atype))?;
            if atype == attr::FINGERPRINT {
                if value.len() != 4 {
                    return Err(StunError::BadAttribute(atype));
                }
                let want = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
                if fingerprint(raw, pos) != want {
                    return Err(StunError::BadFingerprint);
                }
                attrs.push(RawAttr {
                    typ: atype,
                    value,
                    offset: pos,
                });
                break;
            }
            if !after_integrity {
                attrs.push(RawAttr {
                    typ: atype,
                    value,
                    offset: pos,
                });
            }
            if atype == attr::MESSAGE_INTEGRITY {
                after_integrity = true;
            }
            pos += 4 + alen.div_ceil(4) * 4;
        }
        Ok(Message {
            method,
            class,
            tid,
            attrs,
            raw,
        })
    }

    /// The first attribute of this type.
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attrs.iter().find(|a| a.typ == typ).map(|a| a.value)
    }

    /// An (XOR-)address attribute, decoded; `None` when absent.
    pub fn address(&self, typ: u16) -> Result<Option<SocketAddr>, StunError> {
        let Some(v) = self.get(typ) else {
            return Ok(None);
        };
        let xor = typ != attr::MAPPED_ADDRESS;
        decode_address(v, xor.then_some(&self.tid))
            .map(Some)
            .ok_or(StunError::BadAttribute(typ))
    }

    /// A 32-bit attribute (LIFETIME).
    pub fn u32(&self, typ: u16) -> Result<Option<u32>, StunError> {
        match self.get(typ) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(u32::from_be_bytes([a, b, c, d]))),
            Some(_) => Err(StunError::BadAttribute(typ)),
        }
    }

    /// A UTF-8 text attribute (REALM, NONCE), lossily decoded.
    pub fn text(&self, typ: u16) -> Option<String> {
        self.get(typ)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// ERROR-CODE as (code, reason).
    pub fn error_code(&self) -> Result<Option<(u16, String)>, StunError> {
        let Some(v) = self.get(attr::ERROR_CODE) else {
            return Ok(None);
        };
        if v.len() < 4 {
            return Err(StunError::BadAttribute(attr::ERROR_CODE));
        }
        let class = (v[2] & 0x07) as u16;
        let number = v[3] as u16;
        if !(3..=6).contains(&class) || number > 99 {
            return Err(StunError::BadAttribute(attr::ERROR_CODE));
        }
        let reason = String::from_utf8_lossy(&v[4..]).into_owned();
        Ok(Some((class * 100 + number, reason)))
    }

    /// Whether MESSAGE-INTEGRITY is present and valid for `key`.
    pub fn check_integrity(&self, key: &[u8]) -> bool {
        let Some(a) = self.attrs.iter().find(|a| a.typ == attr::MESSAGE_INTEGRITY) else {
            return false;
        };
        if a.value.len() != 20 {
            return false;
        }
        let Some(prefix) = self.raw.get(..a.offset) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(key) else {
            return false;
        };
        let len = (a.offset - HEADER_LEN + 24) as u16;
        mac.update(&prefix[..2]);
        mac.update(&len.to_be_bytes());
        mac.update(&prefix[4..]);
        mac.verify_slice(a.value).is_ok()
    }
}

/// CRC-32 of `raw[..offset]` with the header length covering a FINGERPRINT
/// at `offset`, XORed as RFC 5389 section 15.5 says.
fn fingerprint(raw: &[u8], offset: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let len = (offset - HEADER_LEN + 8) as u16;
    h.update(&raw[..2]);
    h.update(&len.to_be_bytes());
    h.update(&raw[4..offset]);
    h.finalize() ^ FINGERPRINT_XOR
}

/// The long-term credential key: MD5(username ":" realm ":" password).
/// (No SASLprep: TURN REST credentials are ASCII.)
pub(crate) fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// Builds a STUN message.
pub(crate) struct MessageBuilder {
    buf: Vec<u8>,
    tid: TransactionId,
}

impl MessageBuilder {
    pub fn new(method: u16, class: Class, tid: TransactionId) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC.to_be_bytes());
        buf.extend_from_slice(&tid);
        Self { buf, tid }
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends an attribute (padded to 4 bytes). Values longer than 65535
    /// bytes are cut (never produced by this crate: datagrams are smaller).
    pub fn attr(mut self, typ: u16, value: &[u8]) -> Self {
        let value = &value[..value.len().min(u16::MAX as usize)];
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let pad = value.len().div_ceil(4) * 4 - value.len();
        self.buf.extend(std::iter::repeat_n(0, pad));
        self.set_len();
        self
    }

    pub fn u32(self, typ: u16, v: u32) -> Self {
        self.attr(typ, &v.to_be_bytes())
    }

    pub fn address(self, typ: u16, addr: SocketAddr) -> Self {
        let xor = typ != attr::MAPPED_ADDRESS;
        let tid = self.tid;
        let v = encode_address(addr, xor.then_some(&tid));
        self.attr(typ, &v)
    }

    #[cfg(test)]
    pub fn error_code(self, code: u16, reason: &str) -> Self {
        let mut v = vec![0, 0, (code / 100) as u8, (code % 100) as u8];
        v.extend_from_slice(reason.as_bytes());
        self.attr(attr::ERROR_CODE, &v)
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1 with `key`).
    pub fn integrity(mut self, key: &[u8]) -> Self {
        let offset = self.buf.len();
        let len = (offset - HEADER_LEN + 24) as u16;
        self.buf[2..4].copy_from_slice(&len.to_be_bytes());
        let value: [u8; 20] = match Hmac::<Sha1>::new_from_slice(key) {
            Ok(mut mac) => {
                mac.update(&self.buf);
                mac.finalize().into_bytes().into()
            }
            // HMAC takes keys of any length: not reached.
            Err(_) => [0; 20],
        };
        self.attr(attr::MESSAGE_INTEGRITY, &value)
    }

    /// Appends FINGERPRINT and returns the message.
    pub fn fingerprint(mut self) -> Vec<u8> {
        let offset = self.buf.len();
        let fp = fingerprint(&self.buf, offset);
        self = self.attr(attr::FINGERPRINT, &fp.to_be_bytes());
        self.buf
    }

    /// The message without FINGERPRINT.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

fn encode_address(addr: SocketAddr, xor: Option<&TransactionId>) -> Vec<u8> {
    let mut value = vec![0];
    let port = match xor {
        Some(_) => addr.port() ^ (MAGIC >> 16) as u16,
        None => addr.port(),
    };
    let mut key = [0u8; 16];
    if let Some(tid) = xor {
        key[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        key[4..16].copy_from_slice(tid);
    }
    match addr.ip() {
        IpAddr::V4(ip) => {
            value.push(0x01);
            value.extend_from_slice(&port.to_be_bytes());
            value.extend(ip.octets().iter().zip(key).map(|(o, k)| o ^ k));
        }
        IpAddr::V6(ip) => {
            value.push(0x02);
            value.extend_from_slice(&port.to_be_bytes());
            value.extend(ip.octets().iter().zip(key).map(|(o, k)| o ^ k));
        }
    }
    value
}

fn decode_address(v: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let mut port = u16::from_be_bytes([*v.get(2)?, *v.get(3)?]);
    let mut key = [0u8; 16];
    if let Some(tid) = xor {
        port ^= (MAGIC >> 16) as u16;
        key[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        key[4..16].copy_from_slice(tid);
    }
    let ip = match family {
        0x01 => {
            let raw = v.get(4..8)?;
            let mut b = [0u8; 4];
            for ((o, r), k) in b.iter_mut().zip(raw).zip(key) {
                *o = r ^ k;
            }
            IpAddr::V4(Ipv4Addr::from(b))
        }
        0x02 => {
            let raw = v.get(4..20)?;
            let mut b = [0u8; 16];
            for ((o, r), k) in b.iter_mut().zip(raw).zip(key) {
                *o = r ^ k;
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Encodes a ChannelData message (no padding: over UDP it is optional).
pub(crate) fn encode_channel_data(channel: u16, payload: &[u8]) -> Vec<u8> {
    let len = payload.len().min(u16::MAX as usize);
    let mut m = Vec::with_capacity(4 + len);
    m.extend_from_slice(&channel.to_be_bytes());
    m.extend_from_slice(&(len as u16).to_be_bytes());
    m.extend_from_slice(&payload[..len]);
    m
}

/// Decodes a ChannelData message into (channel number, payload).
pub(crate) fn decode_channel_data(data: &[u8]) -> Result<(u16, &[u8]), StunError> {
    if data.len() < 4 {
        return Err(StunError::TooShort(data.len()));
    }
    let channel = u16::from_be_bytes([data[0], data[1]]);
    if !(0x4000..=0x7fff).contains(&channel) {
        return Err(StunError::NotChannelData);
    }
    let len = u16::from_be_bytes([data[2], data[3]]) as usize;
    let payload = data.get(4..4 + len).ok_or(StunError::BadLength {
        declared: len,
        actual: data.len() - 4,
    })?;
    Ok((channel, payload))
}

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
pub(crate) fn binding_request(tid: &TransactionId) -> Vec<u8> {
    MessageBuilder::new(method::BINDING, Class::Request, *tid).finish()
}

/// Parses a Binding success response for `tid` and returns the mapped
/// address (XOR-MAPPED-ADDRESS preferred, MAPPED-ADDRESS as fallback).
/// `None` for anything else, including malformed messages.
pub(crate) fn parse_binding_response(msg: &[u8], tid: &TransactionId) -> Option<SocketAddr> {
    let m = Message::decode(msg).ok()?;
    if m.method != method::BINDING || m.class != Class::Success || &m.tid != tid {
        return None;
    }
    match m.address(attr::XOR_MAPPED_ADDRESS) {
        Ok(Some(a)) => Some(a),
        _ => m.address(attr::MAPPED_ADDRESS).ok().flatten(),
    }
}

/// Encodes a Binding success response carrying XOR-MAPPED-ADDRESS; used by
/// tests to stand in for a STUN server.
pub fn encode_binding_success(tid: &[u8; 12], mapped: SocketAddr) -> Vec<u8> {
    MessageBuilder::new(method::BINDING, Class::Success, *tid)
        .address(attr::XOR_MAPPED_ADDRESS, mapped)
        .finish()
}

/// If `msg` is a STUN Binding request, its transaction id (for test servers).
pub fn binding_request_id(msg: &[u8]) -> Option<[u8; 12]> {
    let m = Message::decode(msg).ok()?;
    (m.method == method::BINDING && m.class == Class::Request).then_some(m.tid)
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
    fn message_types() {
        // Known values from RFC 5766/5389.
        assert_eq!(message_type(method::BINDING, Class::Request), 0x0001);
        assert_eq!(message_type(method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(method::ALLOCATE, Class::Request), 0x0003);
        assert_eq!(message_type(method::ALLOCATE, Class::Success), 0x0103);
        assert_eq!(message_type(method::ALLOCATE, Class::Error), 0x0113);
        assert_eq!(message_type(method::SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(method::DATA, Class::Indication), 0x0017);
        assert_eq!(message_type(method::CHANNEL_BIND, Class::Request), 0x0009);
        for m in [1, 3, 4, 6, 7, 8, 9, 0xfff] {
            for c in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                assert_eq!(split_type(message_type(m, c)), (m, c));
            }
        }
    }

    /// RFC 5769 section 2.4: request with long-term authentication.
    #[test]
    fn rfc5769_long_term_vector() {
        let hex = "00010060 2112a442 78ad3433c6ad72c029da412e \
                   00060012 e3839ee38388e383aae38383e382afe382b9 0000 \
                   0015001c 662f2f3439396b39353464364f4c33346f4c39465354767936347341 \
                   0014000b 6578616d706c652e6f7267 00 \
                   00080014 f67024656dd64a3e02b8e0712e85c9a28ca89666";
        let bytes: Vec<u8> = hex
            .split_whitespace()
            .collect::<String>()
            .as_bytes()
            .chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).unwrap())
            .collect();
        let m = Message::decode(&bytes).unwrap();
        assert_eq!(m.method, method::BINDING);
        assert_eq!(m.text(attr::REALM).as_deref(), Some("example.org"));
        // Username "<U+30DE><U+30C8><U+30EA><U+30C3><U+30AF><U+30B9>",
        // password "TheMatrIX" (after SASLprep).
        let user = m.text(attr::USERNAME).unwrap();
        let key = long_term_key(&user, "example.org", "TheMatrIX");
        assert!(m.check_integrity(&key));
        assert!(!m.check_integrity(b"wrong"));
    }

    #[test]
    fn integrity_and_fingerprint_roundtrip() {
        let tid = new_transaction_id();
        let key = long_term_key("user", "realm", "pass");
        let peer: SocketAddr = "192.0.2.1:3000".parse().unwrap();
        let msg = MessageBuilder::new(method::CREATE_PERMISSION, Class::Request, tid)
            .address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::USERNAME, b"user")
            .attr(attr::REALM, b"realm")
            .attr(attr::NONCE, b"abc")
            .integrity(&key)
            .fingerprint();
        let m = Message::decode(&msg).unwrap();
        assert_eq!(m.method, method::CREATE_PERMISSION);
        assert_eq!(m.class, Class::Request);
        assert_eq!(m.address(attr::XOR_PEER_ADDRESS).unwrap(), Some(peer));
        assert!(m.check_integrity(&key));
        let other = long_term_key("user", "realm", "other");
        assert!(!m.check_integrity(&other));
        // Any flipped bit breaks the fingerprint (or the framing).
        for i in 0..msg.len() {
            let mut bad = msg.clone();
            bad[i] ^= 0x10;
            match Message::decode(&bad) {
                Err(_) => {}
                Ok(m) => assert!(
                    !m.check_integrity(&key) || m.get(attr::FINGERPRINT).is_none(),
                    "bit flip at {i} went unnoticed"
                ),
            }
        }
    }

    #[test]
    fn error_code() {
        let tid = new_transaction_id();
        let msg = MessageBuilder::new(method::ALLOCATE, Class::Error, tid)
            .error_code(401, "Unauthorized")
            .attr(attr::REALM, b"r")
            .attr(attr::NONCE, b"n")
            .finish();
        let m = Message::decode(&msg).unwrap();
        assert_eq!(m.class, Class::Error);
        assert_eq!(m.error_code().unwrap(), Some((401, "Unauthorized".into())));
        let bad = MessageBuilder::new(method::ALLOCATE, Class::Error, tid)
            .attr(attr::ERROR_CODE, &[0, 0, 9, 0])
            .finish();
        assert!(Message::decode(&bad).unwrap().error_code().is_err());
        let short = MessageBuilder::new(method::ALLOCATE, Class::Error, tid)
            .attr(attr::ERROR_CODE, &[0, 0])
            .finish();
        assert!(Message::decode(&short).unwrap().error_code().is_err());
    }

    #[test]
    fn channel_data() {
        let m = encode_channel_data(0x4001, b"hello");
        assert_eq!(decode_channel_data(&m).unwrap(), (0x4001, &b"hello"[..]));
        // Padding after the payload is allowed.
        let mut padded = m.clone();
        padded.extend_from_slice(&[0, 0, 0]);
        assert_eq!(decode_channel_data(&padded).unwrap().1, b"hello");
        assert_eq!(
            decode_channel_data(&m[..6]),
            Err(StunError::BadLength {
                declared: 5,
                actual: 2
            })
        );
        assert_eq!(decode_channel_data(&[0x40]), Err(StunError::TooShort(1)));
        assert_eq!(
            decode_channel_data(&[0x80, 0, 0, 0]),
            Err(StunError::NotChannelData)
        );
        assert_eq!(
            decode_channel_data(&[0x3f, 0xff, 0, 0]),
            Err(StunError::NotChannelData)
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(Message::decode(&[]).unwrap_err(), StunError::TooShort(0));
        let tid = new_transaction_id();
        let good = MessageBuilder::new(method::ALLOCATE, Class::Success, tid)
            .address(attr::XOR_RELAYED_ADDRESS, "10.0.0.1:5000".parse().unwrap())
            .u32(attr::LIFETIME, 600)
            .fingerprint();
        // Wrong magic.
        let mut v = good.clone();
        v[5] ^= 1;
        assert_eq!(Message::decode(&v).unwrap_err(), StunError::NotStun);
        // Length past the end, and not a multiple of 4.
        let mut v = good.clone();
        v[3] = v[3].wrapping_add(4);
        assert!(matches!(
            Message::decode(&v),
            Err(StunError::BadLength { .. })
        ));
        let mut v = good.clone();
        v[3] = v[3].wrapping_sub(1);
        assert!(matches!(
            Message::decode(&v),
            Err(StunError::BadLength { .. })
        ));
        // An attribute claiming more than the message has.
        let v = MessageBuilder::new(method::ALLOCATE, Class::Success, tid)
            .attr(attr::LIFETIME, &[0, 0, 0, 1])
            .finish();
        let mut v2 = v.clone();
        v2[22..24].copy_from_slice(&100u16.to_be_bytes());
        assert_eq!(
            Message::decode(&v2).unwrap_err(),
            StunError::TruncatedAttribute(attr::LIFETIME)
        );
        // A bad address family, a short LIFETIME.
        let v = MessageBuilder::new(method::ALLOCATE, Class::Success, tid)
            .attr(attr::XOR_RELAYED_ADDRESS, &[0, 3, 0, 0, 1, 2, 3, 4])
            .attr(attr::LIFETIME, &[0, 1])
            .finish();
        let m = Message::decode(&v).unwrap();
        assert!(m.address(attr::XOR_RELAYED_ADDRESS).is_err());
        assert!(m.u32(attr::LIFETIME).is_err());
        assert_eq!(m.address(attr::XOR_PEER_ADDRESS), Ok(None));
        // A wrong fingerprint.
        let mut v = good.clone();
        let n = v.len();
        v[n - 1] ^= 1;
        assert_eq!(Message::decode(&v).unwrap_err(), StunError::BadFingerprint);
    }

    #[test]
    fn fuzzed_input_never_panics() {
        let tid = new_transaction_id();
        let key = long_term_key("u", "r", "p");
        let good = MessageBuilder::new(method::DATA, Class::Indication, tid)
            .address(attr::XOR_PEER_ADDRESS, "[2001:db8::2]:9".parse().unwrap())
            .attr(attr::DATA, b"payload bytes")
            .error_code(438, "Stale Nonce")
            .u32(attr::LIFETIME, 5)
            .integrity(&key)
            .fingerprint();
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20000 {
            let mut v = good.clone();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(0..v.len());
                v[i] = rng.u8(..);
            }
            v.truncate(rng.usize(0..=v.len()));
            if let Ok(m) = Message::decode(&v) {
                let _ = m.address(attr::XOR_PEER_ADDRESS);
                let _ = m.error_code();
                let _ = m.u32(attr::LIFETIME);
                let _ = m.check_integrity(&key);
                let _ = m.text(attr::NONCE);
            }
            let _ = decode_channel_data(&v);
            let _ = parse_binding_response(&v, &tid);
            let _ = binding_request_id(&v);
        }
        let mut noise = [0u8; 64];
        for _ in 0..20000 {
            let n = rng.usize(0..64);
            for b in noise.iter_mut().take(n) {
                *b = rng.u8(..);
            }
            let _ = Message::decode(&noise[..n]);
            let _ = decode_channel_data(&noise[..n]);
        }
    }
}
