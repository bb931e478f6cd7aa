//! RTP packets as the forwarder sees them: [`RtpIn`] (borrowed, filled by
//! the driver from str0m's `Event::RtpPacket` or parsed from a raw datagram
//! with [`RtpIn::parse`]) and [`RtpOut`] (the rewritten header of one
//! outgoing copy).

use thiserror::Error;

/// The RFC 6464 client-to-mixer audio level of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioLevel {
    /// The V bit: the sender's voice activity flag.
    pub voice: bool,
    /// The level in -dBov, 0 (loudest) to 127 (silence).
    pub level: u8,
}

impl AudioLevel {
    /// Decodes the one-byte extension value (V bit + 7-bit level).
    pub fn from_byte(b: u8) -> Self {
        Self {
            voice: b & 0x80 != 0,
            level: b & 0x7f,
        }
    }

    /// The one-byte extension value.
    pub fn to_byte(self) -> u8 {
        (u8::from(self.voice) << 7) | (self.level & 0x7f)
    }
}

/// One incoming RTP packet: the header fields the forwarder needs and the
/// payload, borrowed (never copied on the way in).
///
/// A driver on str0m's RTP mode fills it from `Event::RtpPacket`
/// (`header.ssrc`, `header.sequence_number`, `header.timestamp`,
/// `header.marker`, `header.payload_type`, `header.ext_vals.audio_level`
/// with `voice_activity`, and `&packet.payload`); a raw-datagram fast path
/// uses [`RtpIn::parse`] on the decrypted datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpIn<'a> {
    /// The sender's SSRC.
    pub ssrc: u32,
    /// The sequence number.
    pub seq: u16,
    /// The RTP timestamp.
    pub timestamp: u32,
    /// The marker bit.
    pub marker: bool,
    /// The payload type (7 bits).
    pub payload_type: u8,
    /// The RFC 6464 audio level, if the packet carries it.
    pub audio_level: Option<AudioLevel>,
    /// The payload (no header, no padding).
    pub payload: &'a [u8],
}

/// Why a datagram is not an RTP packet we can forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum RtpParseError {
    /// Shorter than the fixed header, its CSRCs or its extension.
    #[error("RTP packet truncated")]
    Truncated,
    /// The version field is not 2.
    #[error("RTP version is not 2")]
    Version,
    /// The padding count is zero or larger than the payload.
    #[error("bad RTP padding")]
    Padding,
    /// The payload type is one of RTCP's (72..=79 with the marker bit).
    #[error("RTCP, not RTP")]
    Rtcp,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

impl<'a> RtpIn<'a> {
    /// Parses a plain (already decrypted) RTP datagram (RFC 3550), reading
    /// the RFC 6464 audio level from the header extension with id
    /// `audio_level_ext` (one-byte RFC 8285 form, or two-byte form) when
    /// given. Every length is checked; nothing here panics.
    pub fn parse(buf: &'a [u8], audio_level_ext: Option<u8>) -> Result<Self, RtpParseError> {
        let b0 = *buf.first().ok_or(RtpParseError::Truncated)?;
        let b1 = *buf.get(1).ok_or(RtpParseError::Truncated)?;
        if b0 >> 6 != 2 {
            return Err(RtpParseError::Version);
        }
        if (200..=207).contains(&b1) {
            return Err(RtpParseError::Rtcp);
        }
        let seq = be16(buf, 2).ok_or(RtpParseError::Truncated)?;
        let timestamp = be32(buf, 4).ok_or(RtpParseError::Truncated)?;
        let ssrc = be32(buf, 8).ok_or(RtpParseError::Truncated)?;
        let mut at = 12 + 4 * usize::from(b0 & 0x0f);
        if at > buf.len() {
            return Err(RtpParseError::Truncated);
        }
        let mut audio_level = None;
        if b0 & 0x10 != 0 {
            let profile = be16(buf, at).ok_or(RtpParseError::Truncated)?;
            let words = be16(buf, at + 2).ok_or(RtpParseError::Truncated)?;
            let start = at + 4;
            let end = start + 4 * usize::from(words);
            let ext = buf.get(start..end).ok_or(RtpParseError::Truncated)?;
            if let Some(id) = audio_level_ext {
                audio_level = find_extension(profile, ext, id)
                    .and_then(|v| v.first().copied())
                    .map(AudioLevel::from_byte);
            }
            at = end;
        }
        let mut end = buf.len();
        if b0 & 0x20 != 0 {
            let pad = usize::from(*buf.last().ok_or(RtpParseError::Truncated)?);
            if pad == 0 || at + pad > end {
                return Err(RtpParseError::Padding);
            }
            end -= pad;
        }
        Ok(Self {
            ssrc,
            seq,
            timestamp,
            marker: b1 & 0x80 != 0,
            payload_type: b1 & 0x7f,
            audio_level,
            payload: buf.get(at..end).ok_or(RtpParseError::Truncated)?,
        })
    }
}

/// Finds the value of extension `id` in an RFC 8285 extension block
/// (`profile` 0xBEDE: one-byte headers; 0x100x: two-byte headers).
fn find_extension(profile: u16, ext: &[u8], id: u8) -> Option<&[u8]> {
    let one_byte = profile == 0xBEDE;
    if !one_byte && profile & 0xfff0 != 0x1000 {
        return None;
    }
    let mut i = 0;
    while i < ext.len() {
        let b = ext[i];
        if b == 0 {
            i += 1; // padding
            continue;
        }
        let (eid, len, hdr) = if one_byte {
            if b >> 4 == 15 {
                return None; // reserved id: stop (RFC 8285 4.2)
            }
            (b >> 4, usize::from(b & 0x0f) + 1, 1)
        } else {
            (b, usize::from(*ext.get(i + 1)?), 2)
        };
        let val = ext.get(i + hdr..i + hdr + len)?;
        if eid == id {
            return Some(val);
        }
        i += hdr + len;
    }
    None
}

/// The rewritten header of one outgoing copy of a packet.
///
/// The payload type is the publisher's: a driver whose subscriber
/// negotiated another number for the codec maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpOut {
    /// The SSRC of this subscriber's copy of the track.
    pub ssrc: u32,
    /// The rewritten sequence number.
    pub seq: u16,
    /// The rewritten RTP timestamp.
    pub timestamp: u32,
    /// The marker bit, as received.
    pub marker: bool,
    /// The payload type, as received.
    pub payload_type: u8,
    /// The audio level, as received.
    pub audio_level: Option<AudioLevel>,
}

impl RtpOut {
    /// Writes the RTP header (12 bytes, plus a one-byte-form extension with
    /// the audio level as `audio_level_ext` when both are present) into
    /// `dst`; returns its length, or `None` if `dst` is too short or the id
    /// is not 1..=14.
    pub fn write_header(&self, dst: &mut [u8], audio_level_ext: Option<u8>) -> Option<usize> {
        let ext = match (audio_level_ext, self.audio_level) {
            (Some(id), Some(l)) if (1..=14).contains(&id) => Some((id, l)),
            (Some(id), Some(_)) if !(1..=14).contains(&id) => return None,
            _ => None,
        };
        let len = if ext.is_some() { 20 } else { 12 };
        let h = dst.get_mut(..len)?;
        h[0] = 0x80 | if ext.is_some() { 0x10 } else { 0 };
        h[1] = (u8::from(self.marker) << 7) | (self.payload_type & 0x7f);
        h[2..4].copy_from_slice(&self.seq.to_be_bytes());
        h[4..8].copy_from_slice(&self.timestamp.to_be_bytes());
        h[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        if let Some((id, l)) = ext {
            h[12..16].copy_from_slice(&[0xBE, 0xDE, 0, 1]);
            h[16..20].copy_from_slice(&[id << 4, l.to_byte(), 0, 0]);
        }
        Some(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_write_round_trip() {
        let out = RtpOut {
            ssrc: 0xdead_beef,
            seq: 65535,
            timestamp: 123_456,
            marker: true,
            payload_type: 111,
            audio_level: Some(AudioLevel {
                voice: true,
                level: 33,
            }),
        };
        let mut buf = [0u8; 64];
        let n = out.write_header(&mut buf, Some(1)).unwrap();
        buf[n..n + 3].copy_from_slice(b"abc");
        let p = RtpIn::parse(&buf[..n + 3], Some(1)).unwrap();
        assert_eq!(
            (p.ssrc, p.seq, p.timestamp, p.marker, p.payload_type),
            (0xdead_beef, 65535, 123_456, true, 111)
        );
        assert_eq!(p.audio_level, out.audio_level);
        assert_eq!(p.payload, b"abc");
        // Without the extension id the level is not read.
        assert_eq!(RtpIn::parse(&buf[..n + 3], None).unwrap().audio_level, None);
        assert_eq!(out.write_header(&mut buf, Some(15)), None);
        assert_eq!(out.write_header(&mut buf[..19], Some(1)), None);
    }

    #[test]
    fn parse_rejects_malformed() {
        assert_eq!(RtpIn::parse(&[], None), Err(RtpParseError::Truncated));
        assert_eq!(
            RtpIn::parse(&[0x80; 11], None),
            Err(RtpParseError::Truncated)
        );
        assert_eq!(RtpIn::parse(&[0x40; 12], None), Err(RtpParseError::Version));
        let mut rtcp = [0u8; 12];
        rtcp[0] = 0x80;
        rtcp[1] = 200;
        assert_eq!(RtpIn::parse(&rtcp, None), Err(RtpParseError::Rtcp));
        // 2 CSRCs announced, none present.
        let mut csrc = [0u8; 12];
        csrc[0] = 0x82;
        assert_eq!(RtpIn::parse(&csrc, None), Err(RtpParseError::Truncated));
        // Extension announced, 3 words long, only 1 present.
        let mut ext = [0u8; 20];
        ext[0] = 0x90;
        ext[12..16].copy_from_slice(&[0xBE, 0xDE, 0, 3]);
        assert_eq!(RtpIn::parse(&ext, Some(1)), Err(RtpParseError::Truncated));
        // Padding larger than the payload, and zero padding.
        let mut pad = [0u8; 14];
        pad[0] = 0xA0;
        pad[13] = 5;
        assert_eq!(RtpIn::parse(&pad, None), Err(RtpParseError::Padding));
        pad[13] = 0;
        assert_eq!(RtpIn::parse(&pad, None), Err(RtpParseError::Padding));
        pad[13] = 2;
        assert_eq!(RtpIn::parse(&pad, None).unwrap().payload.len(), 0);
    }

    #[test]
    fn parse_two_byte_extension_and_csrcs() {
        let mut b = vec![0x91, 96, 0, 7, 0, 0, 0, 9, 0, 0, 0, 1];
        b.extend_from_slice(&[0, 0, 0, 2]); // one CSRC
        b.extend_from_slice(&[0x10, 0x00, 0, 2]); // two-byte form, 2 words
        b.extend_from_slice(&[0, 3, 1, 0x85, 4, 1, 0x10, 0]); // pad, id 3 = 0x85, id 4
        b.extend_from_slice(b"xy");
        let p = RtpIn::parse(&b, Some(3)).unwrap();
        assert_eq!(
            p.audio_level,
            Some(AudioLevel {
                voice: true,
                level: 5
            })
        );
        assert_eq!(p.payload, b"xy");
        assert_eq!(RtpIn::parse(&b, Some(9)).unwrap().audio_level, None);
        let mut b2 = vec![0x90, 96, 0, 7, 0, 0, 0, 9, 0, 0, 0, 1];
        b2.extend_from_slice(&[0x10, 0x00, 0, 1]);
        b2.extend_from_slice(&[2, 9, 0x85, 0]); // id 2, len 9: runs past the block
        let p = RtpIn::parse(&b2, Some(2)).unwrap();
        assert_eq!(p.audio_level, None);
        assert!(p.payload.is_empty());
    }
}
