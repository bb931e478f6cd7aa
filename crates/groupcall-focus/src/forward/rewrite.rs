//! The per-subscriber-and-track rewriting state: offsets added to the
//! publisher's sequence numbers, timestamps and VP8 PictureID /
//! TL0PICIDX / KEYIDX, recomputed at each switch (first packet, resume
//! after a pause or a congestion drop, new publisher SSRC, a new
//! simulcast layer) so that the subscriber's stream continues where it
//! stopped.

use std::time::Instant;

use super::rtp::{RtpIn, RtpOut};
use super::vp8::{Vp8Descriptor, Vp8Patch};

const PID_MASK: u16 = 0x7fff;

/// How far back from the last packet sent the current epoch reaches, at
/// most (packets older than that are neither forwarded nor re-sent).
const EPOCH_WINDOW: u16 = 0x7000;

/// Offsets of the current epoch and the last values written.
#[derive(Debug, Clone, Copy)]
pub struct Rewriter {
    started: bool,
    /// The publisher SSRC of the current epoch.
    pub src_ssrc: u32,
    seq_off: u16,
    ts_off: u32,
    pid_off: u16,
    tl0_off: u8,
    key_off: u8,
    /// The first outgoing sequence number of the current epoch (or, in a
    /// long epoch, the last one minus [`EPOCH_WINDOW`]).
    epoch_first: u16,
    last_seq: u16,
    last_ts: u32,
    last_pid: u16,
    last_tl0: u8,
    last_key: u8,
    last_at: Option<Instant>,
    /// The publisher sequence number of the last packet skipped in this
    /// epoch: packets before it were sent with another offset.
    last_skip: Option<u16>,
}

impl Rewriter {
    /// A rewriter that has sent nothing yet.
    pub fn new() -> Self {
        Self {
            started: false,
            src_ssrc: 0,
            seq_off: 0,
            ts_off: 0,
            pid_off: 0,
            tl0_off: 0,
            key_off: 0,
            epoch_first: 0,
            last_seq: 0,
            last_ts: 0,
            last_pid: 0,
            last_tl0: 0,
            last_key: 0,
            last_at: None,
            last_skip: None,
        }
    }

    /// Starts a new epoch at `pkt`: its outgoing values follow the last
    /// ones written (sequence number + 1, timestamp + the time elapsed in
    /// `clock_rate` ticks, at least 1, PictureID / TL0PICIDX / KEYIDX + 1).
    /// The very first epoch keeps the publisher's values.
    pub fn switch(
        &mut self,
        now: Instant,
        pkt: &RtpIn<'_>,
        vp8: Option<&Vp8Descriptor>,
        clock_rate: u32,
    ) {
        if self.started {
            let ms = self
                .last_at
                .map_or(0, |t| now.saturating_duration_since(t).as_millis());
            let ticks = (ms.saturating_mul(u128::from(clock_rate)) / 1000).clamp(1, 1 << 30) as u32;
            self.seq_off = self.last_seq.wrapping_add(1).wrapping_sub(pkt.seq);
            self.ts_off = self.last_ts.wrapping_add(ticks).wrapping_sub(pkt.timestamp);
            if let Some(d) = vp8 {
                if let Some(p) = d.picture_id {
                    self.pid_off = self.last_pid.wrapping_add(1).wrapping_sub(p.value) & PID_MASK;
                }
                if let Some(t) = d.tl0picidx {
                    self.tl0_off = self.last_tl0.wrapping_add(1).wrapping_sub(t);
                }
                if let Some(k) = d.keyidx {
                    self.key_off = self.last_key.wrapping_add(1).wrapping_sub(k) & 0x1f;
                }
            }
        }
        self.started = true;
        self.last_skip = None;
        self.src_ssrc = pkt.ssrc;
        self.epoch_first = pkt.seq.wrapping_add(self.seq_off);
        self.last_seq = self.epoch_first.wrapping_sub(1);
    }

    /// The outgoing header and VP8 patch of a packet of the current epoch,
    /// without changing any state (retransmissions use it as is).
    pub fn map(
        &self,
        out_ssrc: u32,
        pkt: &RtpIn<'_>,
        vp8: Option<&Vp8Descriptor>,
    ) -> (RtpOut, Option<Vp8Patch>) {
        let hdr = RtpOut {
            ssrc: out_ssrc,
            seq: pkt.seq.wrapping_add(self.seq_off),
            timestamp: pkt.timestamp.wrapping_add(self.ts_off),
            marker: pkt.marker,
            payload_type: pkt.payload_type,
            audio_level: pkt.audio_level,
        };
        let patch = vp8.map(|d| {
            let (pid, tl0, key) = self.map_vp8(d);
            Vp8Patch::new(d, pid, tl0, key)
        });
        (hdr, patch)
    }

    fn map_vp8(&self, d: &Vp8Descriptor) -> (u16, u8, u8) {
        (
            d.picture_id
                .map_or(0, |p| p.value.wrapping_add(self.pid_off) & PID_MASK),
            d.tl0picidx.map_or(0, |t| t.wrapping_add(self.tl0_off)),
            d.keyidx.map_or(0, |k| k.wrapping_add(self.key_off) & 0x1f),
        )
    }

    /// Records a packet written now with `hdr` (only a newer sequence
    /// number moves the state).
    pub fn advance(&mut self, now: Instant, hdr: &RtpOut, vp8: Option<&Vp8Descriptor>) {
        if (hdr.seq.wrapping_sub(self.last_seq) as i16) <= 0 {
            return;
        }
        self.last_seq = hdr.seq;
        // The epoch's start slides along so that every number in it stays
        // within half the 16-bit space of the last one (unambiguous).
        if self.last_seq.wrapping_sub(self.epoch_first) > EPOCH_WINDOW {
            self.epoch_first = self.last_seq.wrapping_sub(EPOCH_WINDOW);
        }
        self.last_ts = hdr.timestamp;
        self.last_at = Some(now);
        if let Some(d) = vp8 {
            let (pid, tl0, key) = self.map_vp8(d);
            if d.picture_id.is_some() {
                self.last_pid = pid;
            }
            if d.tl0picidx.is_some() {
                self.last_tl0 = tl0;
            }
            if d.keyidx.is_some() {
                self.last_key = key;
            }
        }
    }

    /// A packet not forwarded inside the epoch (a VP8 temporal layer above
    /// the subscription's maximum): if it is newer than the last one
    /// written, the following ones move down by one sequence number, and
    /// its frame's PictureID is taken out of the numbering the same way
    /// (once per frame: `skipped_pid` remembers the last one), so that the
    /// subscriber sees no gap to NACK and consecutive PictureIDs.
    pub fn skip(
        &mut self,
        pkt: &RtpIn<'_>,
        vp8: Option<&Vp8Descriptor>,
        skipped_pid: &mut Option<u16>,
    ) {
        let seq = pkt.seq.wrapping_add(self.seq_off);
        if (seq.wrapping_sub(self.last_seq) as i16) > 0 {
            self.seq_off = self.seq_off.wrapping_sub(1);
            self.last_skip = Some(pkt.seq);
        }
        if let Some(p) = vp8.and_then(|d| d.picture_id)
            && *skipped_pid != Some(p.value)
        {
            *skipped_pid = Some(p.value);
            let m = p.modulus();
            let mapped = p.value.wrapping_add(self.pid_off) & PID_MASK;
            let ahead = mapped.wrapping_sub(self.last_pid) % m;
            if ahead != 0 && ahead < m / 2 {
                self.pid_off = self.pid_off.wrapping_sub(1) & PID_MASK;
            }
        }
    }

    /// Whether outgoing `seq` belongs to the current epoch (is not before
    /// its first packet, nor more than [`EPOCH_WINDOW`] before the last).
    pub fn in_epoch(&self, seq: u16) -> bool {
        if (seq.wrapping_sub(self.last_seq) as i16) > 0 {
            return true; // newer than all sent
        }
        let sent = self.last_seq.wrapping_sub(self.epoch_first).wrapping_add(1);
        seq.wrapping_sub(self.epoch_first) < sent
    }

    /// The publisher sequence number of outgoing `seq`, if `seq` was
    /// written in the current epoch (and after its last skipped packet:
    /// earlier ones had another offset).
    pub fn source_seq(&self, seq: u16) -> Option<u16> {
        if !self.started {
            return None;
        }
        let sent = self.last_seq.wrapping_sub(self.epoch_first);
        let age = seq.wrapping_sub(self.epoch_first);
        if age > sent || sent > EPOCH_WINDOW {
            return None;
        }
        let src = seq.wrapping_sub(self.seq_off);
        if self
            .last_skip
            .is_some_and(|k| (src.wrapping_sub(k) as i16) <= 0)
        {
            return None;
        }
        Some(src)
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}
