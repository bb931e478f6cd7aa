//! The VP8 RTP payload descriptor (RFC 7741 section 4.2): parsed with
//! strict bounds checks, and rewritten in place by a [`Vp8Patch`] of the
//! same length (the forwarder never changes the descriptor's size, so a
//! driver copies the payload once and patches at most 4 bytes).
//!
//! ```text
//!       0 1 2 3 4 5 6 7
//!      +-+-+-+-+-+-+-+-+
//!      |X|R|N|S|R| PID | (REQUIRED)
//!      +-+-+-+-+-+-+-+-+
//! X:   |I|L|T|K| RSV   | (OPTIONAL)
//!      +-+-+-+-+-+-+-+-+
//! I:   |M| PictureID   | (OPTIONAL, M: 15-bit form, one more byte)
//!      +-+-+-+-+-+-+-+-+
//! L:   |   TL0PICIDX   | (OPTIONAL)
//!      +-+-+-+-+-+-+-+-+
//! T/K: |TID|Y| KEYIDX  | (OPTIONAL)
//!      +-+-+-+-+-+-+-+-+
//! ```

use thiserror::Error;

/// Why a VP8 payload is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Vp8Error {
    /// The descriptor announces more bytes than the payload has.
    #[error("VP8 payload descriptor truncated")]
    Truncated,
    /// Nothing follows the descriptor.
    #[error("VP8 payload empty after the descriptor")]
    NoPayload,
    /// The first packet of a key frame lacks the key frame header (10
    /// bytes with the start code 9d 01 2a).
    #[error("VP8 key frame header malformed")]
    BadKeyframeHeader,
}

/// A VP8 PictureID as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PictureId {
    /// The value: 7 bits in the short form, 15 bits in the long form.
    pub value: u16,
    /// The 15-bit (M = 1) form.
    pub long: bool,
}

impl PictureId {
    /// The modulus of this form (128 or 32768).
    pub fn modulus(self) -> u16 {
        if self.long { 1 << 15 } else { 1 << 7 }
    }
}

/// A parsed VP8 payload descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Descriptor {
    /// N: the frame is not a reference frame.
    pub non_reference: bool,
    /// S: the packet starts a VP8 partition.
    pub start_of_partition: bool,
    /// PID: the partition index (3 bits).
    pub partition_index: u8,
    /// The PictureID, if present (I bit).
    pub picture_id: Option<PictureId>,
    /// TL0PICIDX, if present (L bit).
    pub tl0picidx: Option<u8>,
    /// TID and Y, if present (T bit).
    pub tid: Option<(u8, bool)>,
    /// KEYIDX (5 bits), if present (K bit).
    pub keyidx: Option<u8>,
    /// The descriptor's length in bytes (where the VP8 payload starts).
    pub len: usize,
    /// The packet starts a key frame: S = 1, PID = 0 and the P bit of the
    /// VP8 payload header is 0 (with the key frame start code checked).
    pub keyframe: bool,
}

impl Vp8Descriptor {
    /// Parses the descriptor at the start of an RTP payload.
    pub fn parse(p: &[u8]) -> Result<Self, Vp8Error> {
        let b0 = *p.first().ok_or(Vp8Error::Truncated)?;
        let mut d = Self {
            non_reference: b0 & 0x20 != 0,
            start_of_partition: b0 & 0x10 != 0,
            partition_index: b0 & 0x07,
            picture_id: None,
            tl0picidx: None,
            tid: None,
            keyidx: None,
            len: 1,
            keyframe: false,
        };
        let mut at = 1;
        if b0 & 0x80 != 0 {
            let x = *p.get(at).ok_or(Vp8Error::Truncated)?;
            at += 1;
            if x & 0x80 != 0 {
                let m = *p.get(at).ok_or(Vp8Error::Truncated)?;
                if m & 0x80 != 0 {
                    let lo = *p.get(at + 1).ok_or(Vp8Error::Truncated)?;
                    d.picture_id = Some(PictureId {
                        value: (u16::from(m & 0x7f) << 8) | u16::from(lo),
                        long: true,
                    });
                    at += 2;
                } else {
                    d.picture_id = Some(PictureId {
                        value: u16::from(m),
                        long: false,
                    });
                    at += 1;
                }
            }
            if x & 0x40 != 0 {
                d.tl0picidx = Some(*p.get(at).ok_or(Vp8Error::Truncated)?);
                at += 1;
            }
            if x & 0x30 != 0 {
                let tk = *p.get(at).ok_or(Vp8Error::Truncated)?;
                at += 1;
                if x & 0x20 != 0 {
                    d.tid = Some((tk >> 6, tk & 0x20 != 0));
                }
                if x & 0x10 != 0 {
                    d.keyidx = Some(tk & 0x1f);
                }
            }
        }
        d.len = at;
        let rest = p.get(at..).ok_or(Vp8Error::Truncated)?;
        let first = *rest.first().ok_or(Vp8Error::NoPayload)?;
        if d.start_of_partition && d.partition_index == 0 && first & 0x01 == 0 {
            if rest.get(3..6) != Some(&[0x9d, 0x01, 0x2a][..]) || rest.len() < 10 {
                return Err(Vp8Error::BadKeyframeHeader);
            }
            d.keyframe = true;
        }
        Ok(d)
    }

    /// The packet starts a frame (S = 1 and PID = 0).
    pub fn starts_frame(&self) -> bool {
        self.start_of_partition && self.partition_index == 0
    }

    /// Writes this descriptor (not the VP8 payload) into `dst`, in the
    /// forms its fields name; returns its length, or `None` if `dst` is
    /// too short. `keyframe` and `len` are not written (they describe the
    /// payload).
    pub fn write(&self, dst: &mut [u8]) -> Option<usize> {
        let ext = self.picture_id.is_some()
            || self.tl0picidx.is_some()
            || self.tid.is_some()
            || self.keyidx.is_some();
        let mut at = 0;
        let mut put = |b: u8, at: &mut usize| -> Option<()> {
            *dst.get_mut(*at)? = b;
            *at += 1;
            Some(())
        };
        put(
            (u8::from(ext) << 7)
                | (u8::from(self.non_reference) << 5)
                | (u8::from(self.start_of_partition) << 4)
                | (self.partition_index & 0x07),
            &mut at,
        )?;
        if ext {
            put(
                (u8::from(self.picture_id.is_some()) << 7)
                    | (u8::from(self.tl0picidx.is_some()) << 6)
                    | (u8::from(self.tid.is_some()) << 5)
                    | (u8::from(self.keyidx.is_some()) << 4),
                &mut at,
            )?;
            if let Some(pid) = self.picture_id {
                if pid.long {
                    put(0x80 | ((pid.value >> 8) as u8 & 0x7f), &mut at)?;
                    put(pid.value as u8, &mut at)?;
                } else {
                    put(pid.value as u8 & 0x7f, &mut at)?;
                }
            }
            if let Some(t) = self.tl0picidx {
                put(t, &mut at)?;
            }
            if self.tid.is_some() || self.keyidx.is_some() {
                let (tid, y) = self.tid.unwrap_or((0, false));
                put(
                    ((tid & 0x03) << 6) | (u8::from(y) << 5) | (self.keyidx.unwrap_or(0) & 0x1f),
                    &mut at,
                )?;
            }
        }
        Some(at)
    }
}

/// The rewritten values of one outgoing copy's VP8 descriptor, with where
/// they go: apply it to the copied payload ([`Vp8Patch::apply`]). Fields
/// absent from the received descriptor stay `None`; the form (7 or 15-bit
/// PictureID) is the received one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vp8Patch {
    /// (offset in the payload, long form, new value) of the PictureID.
    pub picture_id: Option<(u8, bool, u16)>,
    /// (offset, new value) of TL0PICIDX.
    pub tl0picidx: Option<(u8, u8)>,
    /// (offset, new value) of KEYIDX (5 bits; TID and Y are kept).
    pub keyidx: Option<(u8, u8)>,
}

impl Vp8Patch {
    /// Builds the patch that writes `pid`, `tl0` and `keyidx` into the
    /// fields of `d` (each value is used only if `d` has that field).
    pub fn new(d: &Vp8Descriptor, pid: u16, tl0: u8, keyidx: u8) -> Self {
        // Offsets: 0 = first byte, 1 = X byte, 2.. = the optional fields.
        let mut at: u8 = 2;
        let mut patch = Self::default();
        if let Some(p) = d.picture_id {
            patch.picture_id = Some((at, p.long, pid % p.modulus()));
            at += if p.long { 2 } else { 1 };
        }
        if d.tl0picidx.is_some() {
            patch.tl0picidx = Some((at, tl0));
            at += 1;
        }
        if d.keyidx.is_some() {
            patch.keyidx = Some((at, keyidx & 0x1f));
        }
        patch
    }

    /// Writes the new values into `payload` (a copy of the received one).
    /// Returns false, changing nothing, if `payload` is too short for
    /// them.
    pub fn apply(&self, payload: &mut [u8]) -> bool {
        let need = [
            self.picture_id
                .map(|(o, long, _)| usize::from(o) + if long { 2 } else { 1 }),
            self.tl0picidx.map(|(o, _)| usize::from(o) + 1),
            self.keyidx.map(|(o, _)| usize::from(o) + 1),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
        if payload.len() < need {
            return false;
        }
        if let Some((o, long, v)) = self.picture_id {
            let o = usize::from(o);
            if long {
                payload[o] = 0x80 | ((v >> 8) as u8 & 0x7f);
                payload[o + 1] = v as u8;
            } else {
                payload[o] = v as u8 & 0x7f;
            }
        }
        if let Some((o, v)) = self.tl0picidx {
            payload[usize::from(o)] = v;
        }
        if let Some((o, v)) = self.keyidx {
            let o = usize::from(o);
            payload[o] = (payload[o] & 0xe0) | (v & 0x1f);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_HDR: [u8; 10] = [0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01];

    fn desc(
        pid: Option<PictureId>,
        tl0: Option<u8>,
        tid: Option<(u8, bool)>,
        k: Option<u8>,
    ) -> Vp8Descriptor {
        Vp8Descriptor {
            non_reference: false,
            start_of_partition: true,
            partition_index: 0,
            picture_id: pid,
            tl0picidx: tl0,
            tid,
            keyidx: k,
            len: 0,
            keyframe: false,
        }
    }

    /// Every combination of the optional fields: write, parse back, patch,
    /// parse again.
    #[test]
    fn round_trips_all_forms() {
        let pids = [
            None,
            Some(PictureId {
                value: 0x55,
                long: false,
            }),
            Some(PictureId {
                value: 0x1234,
                long: true,
            }),
        ];
        for pid in pids {
            for tl0 in [None, Some(200u8)] {
                for tid in [None, Some((2u8, true))] {
                    for k in [None, Some(17u8)] {
                        for keyframe in [false, true] {
                            let d = desc(pid, tl0, tid, k);
                            let mut buf = [0u8; 32];
                            let n = d.write(&mut buf).unwrap();
                            let body: &[u8] = if keyframe { &KEY_HDR } else { &[0x01, 0xaa] };
                            buf[n..n + body.len()].copy_from_slice(body);
                            let pkt = &mut buf[..n + body.len()];
                            let p = Vp8Descriptor::parse(pkt).unwrap();
                            assert_eq!(p.len, n);
                            assert_eq!(p.keyframe, keyframe);
                            assert_eq!(
                                Vp8Descriptor {
                                    len: 0,
                                    keyframe: false,
                                    ..p
                                },
                                d
                            );
                            // Too short a buffer is refused.
                            assert_eq!(d.write(&mut [0u8; 32][..n - 1]), None);

                            let patch = Vp8Patch::new(&p, 0x7ffe, 3, 40);
                            assert!(patch.apply(pkt));
                            let q = Vp8Descriptor::parse(pkt).unwrap();
                            assert_eq!(q.len, n, "same length");
                            assert_eq!(
                                q.picture_id.map(|x| x.value),
                                pid.map(|x| 0x7ffe % x.modulus())
                            );
                            assert_eq!(q.picture_id.map(|x| x.long), pid.map(|x| x.long));
                            assert_eq!(q.tl0picidx, tl0.map(|_| 3));
                            assert_eq!(q.tid, tid, "TID and Y kept");
                            assert_eq!(q.keyidx, k.map(|_| 40 & 0x1f));
                            assert_eq!(q.keyframe, keyframe);
                            assert_eq!(&pkt[n..], body, "payload untouched");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_inputs_are_errors() {
        assert_eq!(Vp8Descriptor::parse(&[]), Err(Vp8Error::Truncated));
        assert_eq!(Vp8Descriptor::parse(&[0x10]), Err(Vp8Error::NoPayload));
        // X set, no X byte.
        assert_eq!(Vp8Descriptor::parse(&[0x90]), Err(Vp8Error::Truncated));
        // I set, no PictureID.
        assert_eq!(
            Vp8Descriptor::parse(&[0x90, 0x80]),
            Err(Vp8Error::Truncated)
        );
        // Long PictureID cut after its first byte.
        assert_eq!(
            Vp8Descriptor::parse(&[0x90, 0x80, 0x81]),
            Err(Vp8Error::Truncated)
        );
        // L set, TL0PICIDX missing.
        assert_eq!(
            Vp8Descriptor::parse(&[0x90, 0xc0, 0x01]),
            Err(Vp8Error::Truncated)
        );
        // K set, T/K byte missing.
        assert_eq!(
            Vp8Descriptor::parse(&[0x90, 0x10]),
            Err(Vp8Error::Truncated)
        );
        // Complete descriptor, nothing after it.
        assert_eq!(
            Vp8Descriptor::parse(&[0x90, 0xf0, 0x81, 0x02, 0x03, 0x04]),
            Err(Vp8Error::NoPayload)
        );
        // P = 0 at the start of a frame without the key frame header.
        assert_eq!(
            Vp8Descriptor::parse(&[0x10, 0x00, 0x00, 0x9d]),
            Err(Vp8Error::BadKeyframeHeader)
        );
        let mut bad = [0x10u8; 11];
        bad[1..].copy_from_slice(&KEY_HDR);
        bad[5] = 0x00; // start code broken
        assert_eq!(Vp8Descriptor::parse(&bad), Err(Vp8Error::BadKeyframeHeader));
        // P = 0 but not the first partition: not a key frame, not an error.
        let mid = Vp8Descriptor::parse(&[0x11, 0x00]).unwrap();
        assert!(!mid.keyframe && !mid.starts_frame());
        // A patch never writes past a short buffer.
        let patch = Vp8Patch {
            picture_id: Some((2, true, 5)),
            ..Vp8Patch::default()
        };
        let mut short = [0x90, 0x80, 0x80];
        assert!(!patch.apply(&mut short));
        assert_eq!(short, [0x90, 0x80, 0x80]);
    }

    #[test]
    fn keyframe_needs_s_bit_pid_zero_and_p_bit() {
        let mut pkt = [0u8; 11];
        pkt[0] = 0x10;
        pkt[1..].copy_from_slice(&KEY_HDR);
        assert!(Vp8Descriptor::parse(&pkt).unwrap().keyframe);
        pkt[0] = 0x00; // S = 0: a continuation, not a key frame start
        assert!(!Vp8Descriptor::parse(&pkt).unwrap().keyframe);
        pkt[0] = 0x10;
        pkt[1] |= 0x01; // P = 1: inter frame
        assert!(!Vp8Descriptor::parse(&pkt).unwrap().keyframe);
    }
}
