//! Forwarding mode ([`PeerConfig::forward`], str0m's RTP mode): received
//! RTP packets out as [`PeerEvent::Rtp`], RTP packets in on local tracks
//! with [`Request::WriteRtp`], key frame requests by m-line.
//!
//! Nothing here allocates per packet: the payload is str0m's `Arc<[u8]>`,
//! moved into the event and back into str0m's send queue.

use str0m::format::Codec;
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, Vp8Descriptor};

use super::*;

/// Whether a VP8 RTP payload (RFC 7741 descriptor + VP8 payload header)
/// starts a key frame: S set, partition 0, and the P bit of the frame tag
/// clear.
pub(crate) fn vp8_keyframe_start(payload: &[u8]) -> bool {
    let Some(&b0) = payload.first() else {
        return false;
    };
    let start = b0 & 0x10 != 0;
    let partition = b0 & 0x07;
    if !start || partition != 0 {
        return false;
    }
    let mut i = 1usize;
    if b0 & 0x80 != 0 {
        let Some(&x) = payload.get(i) else {
            return false;
        };
        i += 1;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits.
            let Some(&p) = payload.get(i) else {
                return false;
            };
            i += if p & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            i += 1; // TID/Y/KEYIDX
        }
    }
    payload.get(i).is_some_and(|tag| tag & 0x01 == 0)
}

impl PeerState {
    /// A received RTP packet (forwarding mode).
    pub(super) fn on_rtp_packet(&mut self, p: RtpPacket) {
        let ssrc = p.header.ssrc;
        let Some((mid, rid)) = self
            .rtc
            .direct_api()
            .stream_rx(&ssrc)
            .map(|s| (s.mid(), s.rid()))
        else {
            self.frames_unmatched += 1;
            trace!(%ssrc, "RTP packet of an unknown stream");
            return;
        };
        let Some(kind) = self.rtc.media(mid).map(|m| match m.kind() {
            MediaKind::Audio => TrackKind::Audio,
            MediaKind::Video => TrackKind::Video,
        }) else {
            self.frames_unmatched += 1;
            return;
        };
        let keyframe_start = kind == TrackKind::Video && vp8_keyframe_start(&p.payload);
        match self.remote.get_mut(&mid) {
            Some(r) => {
                r.received.add(p.payload.len(), keyframe_start);
                if r.received.frames == 1 {
                    let first = PeerEvent::FirstFrame {
                        stream_id: r.stream_id.to_string(),
                        kind,
                        mid: mid.to_string(),
                        received: r.received,
                    };
                    self.emit(first);
                }
            }
            None => self.frames_unmatched += 1,
        }
        let ext = &p.header.ext_vals;
        self.emit(PeerEvent::Rtp(RtpIn {
            mid,
            rid,
            kind,
            ssrc: *ssrc,
            seq: *p.seq_no,
            pt: *p.header.payload_type,
            timestamp: p.header.timestamp,
            marker: p.header.marker,
            audio_level: ext.audio_level,
            voice_activity: ext.voice_activity,
            keyframe_start,
            payload: p.payload,
            received_at: p.timestamp,
        }));
    }

    /// The payload type negotiated on `mid` for its kind's codec.
    fn negotiated_pt(&self, mid: Mid, kind: TrackKind) -> Option<Pt> {
        let media = self.rtc.media(mid)?;
        let codec = match kind {
            TrackKind::Audio => Codec::Opus,
            TrackKind::Video => Codec::Vp8,
        };
        let remote = media.remote_pts();
        self.rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == codec && remote.contains(&p.pt()))
            .map(|p| p.pt())
    }

    /// Writes one RTP packet on a local track (forwarding mode); drops
    /// (and counts) what cannot be written.
    pub(super) fn write_rtp(&mut self, out: RtpOut) -> Result<(), str0m::RtcError> {
        let connected = matches!(self.state, ConnState::Connected | ConnState::Disconnected);
        let track = self
            .tracks
            .iter()
            .position(|t| t.mid == Some(out.mid) && !t.awaiting && !t.muted);
        let (Some(idx), true, true) = (track, connected, self.config.forward) else {
            self.rtp_write_dropped += 1;
            trace!(mid = %out.mid, connected, "RTP write dropped");
            return Ok(());
        };
        let Some(kind) = self.tracks.get(idx).map(|t| t.kind) else {
            return Ok(());
        };
        let pt = match out.pt {
            Some(pt) => Some(Pt::new_with_value(pt)),
            None => self.negotiated_pt(out.mid, kind),
        };
        let Some(pt) = pt else {
            self.rtp_write_dropped += 1;
            trace!(mid = %out.mid, "no payload type for this m-line");
            return Ok(());
        };
        let keyframe = kind == TrackKind::Video && vp8_keyframe_start(&out.payload);
        let patch = match out.vp8_picture_id {
            Some(id) if kind == TrackKind::Video => Vp8Descriptor::parse(&out.payload)
                .ok()
                .and_then(|d| d.patch().picture_id(id).build().ok()),
            _ => None,
        };
        let len = out.payload.len();
        let ext = ExtensionValues {
            audio_level: out.audio_level,
            voice_activity: out.voice_activity,
            ..Default::default()
        };
        let mut write = RtpWrite::new(
            pt,
            out.seq.into(),
            out.timestamp,
            out.wallclock,
            out.payload,
        )
        .marker(out.marker)
        .ext_vals(ext)
        .nackable(out.nackable);
        if let Some(patch) = patch {
            write = write.vp8_patch(patch);
        }
        let mut api = self.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(out.mid, None) else {
            self.rtp_write_dropped += 1;
            trace!(mid = %out.mid, "no send stream on this m-line");
            return Ok(());
        };
        // Forwarded packets leave as they come, also while str0m estimates
        // the bandwidth (which otherwise paces video to the estimate): the
        // publisher paced them already, and a second queue here only holds
        // back a switch's key frame and, after a step down, keeps sending
        // the layer left for as long as it queued (up to 2 s). The
        // estimator still sees every packet (transport-wide sequence
        // numbers), and its probes are still paced.
        tx.set_unpaced(true);
        tx.write_rtp(write);
        if let Some(t) = self.tracks.get_mut(idx) {
            t.sent.add(len, keyframe);
        }
        self.drain()
    }

    /// Asks the remote to keep its video to us under `bps` in all (REMB on
    /// each remote video m-line, the total shared among them).
    pub(super) fn limit_incoming_bitrate(&mut self, bps: u64) {
        let mids: Vec<Mid> = self
            .remote
            .values()
            .filter(|r| r.kind == TrackKind::Video)
            .map(|r| r.mid)
            .collect();
        if mids.is_empty() {
            return;
        }
        let each = bps / mids.len() as u64;
        for mid in mids {
            // A simulcast sender's streams have RIDs: the REMB goes on the
            // first one (it limits the sender as a whole).
            let mut rids: Vec<Option<Rid>> = vec![None];
            if let Some(str0m::media::Rids::Specific(v)) = self.rtc.media(mid).map(|m| m.rids_rx())
            {
                rids.extend(v.iter().copied().map(Some));
            }
            let mut api = self.rtc.direct_api();
            let rid = rids
                .into_iter()
                .find(|rid| api.stream_rx_by_mid(mid, *rid).is_some());
            match rid.and_then(|rid| api.stream_rx_by_mid(mid, rid)) {
                Some(rx) => rx.request_remb(str0m::bwe::Bitrate::bps(each)),
                None => trace!(%mid, "bitrate limit: no receive stream yet"),
            }
        }
    }

    /// Asks the remote for a key frame on `mid` (both modes).
    pub(super) fn request_keyframe_on(&mut self, mid: Mid, rid: Option<Rid>, fir: bool) {
        let kind = if fir {
            KeyframeRequestKind::Fir
        } else {
            KeyframeRequestKind::Pli
        };
        if let Some(r) = self.remote.get_mut(&mid) {
            r.last_pli = Some(self.now);
        }
        if self.config.forward {
            match self.rtc.direct_api().stream_rx_by_mid(mid, rid) {
                Some(rx) => {
                    rx.request_keyframe(kind);
                    debug!(%mid, ?rid, ?kind, "requested key frame");
                }
                None => trace!(%mid, "key frame request: no receive stream yet"),
            }
        } else if let Some(mut w) = self.rtc.writer(mid) {
            match w.request_keyframe(rid, kind) {
                Ok(()) => debug!(%mid, ?kind, "requested key frame"),
                Err(e) => trace!(%mid, error = %e, "key frame request not possible yet"),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn vp8_keyframe_start_reads_the_descriptor() {
        // S=1, partition 0, no extension; frame tag P=0: key frame.
        assert!(vp8_keyframe_start(&[0x10, 0x00, 0x01]));
        // P=1: delta frame.
        assert!(!vp8_keyframe_start(&[0x10, 0x01]));
        // Not the start of a partition.
        assert!(!vp8_keyframe_start(&[0x00, 0x00]));
        // X, I with a 15-bit picture id, L, T/K: tag after 5 bytes.
        assert!(vp8_keyframe_start(&[
            0x90, 0xf0, 0x81, 0x23, 0x05, 0x20, 0x00
        ]));
        assert!(!vp8_keyframe_start(&[
            0x90, 0xf0, 0x81, 0x23, 0x05, 0x20, 0x01
        ]));
        // Truncated.
        assert!(!vp8_keyframe_start(&[0x90, 0xf0, 0x81]));
        assert!(!vp8_keyframe_start(&[]));
    }
}
