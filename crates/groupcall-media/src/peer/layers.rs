//! Sending simulcast (issue 12): layered sources and pushed layers written
//! under their RIDs, the uplink governor, the fallback to one layer when
//! the remote refuses simulcast.

use str0m::media::{Rids, Simulcast, SimulcastLayer};

use super::*;
use crate::simulcast::EstimateKind;

/// One layer of one instant: its RID, the encoded frame, whether the
/// source says it is a key frame.
type LayerFrame = (Rid, Arc<[u8]>, bool);

impl PeerState {
    /// The simulcast layers to offer for a new m-line of `t`: the camera
    /// video of a peer configured for simulcast.
    pub(super) fn simulcast_offer(
        &self,
        kind: TrackKind,
        purpose: FeedPurpose,
    ) -> Option<Simulcast> {
        let cfg = self.config.simulcast.as_ref()?;
        if kind != TrackKind::Video || purpose != FeedPurpose::Usermedia || cfg.rids.is_empty() {
            return None;
        }
        let mut s = Simulcast::new();
        for rid in &cfg.rids {
            s.add_send_layer(SimulcastLayer::new(rid));
        }
        Some(s)
    }

    /// The RIDs the remote accepted on `mid` (`None`: one layer).
    pub(super) fn tx_rids(&self, mid: Mid) -> Option<&[Rid]> {
        match self.rtc.media(mid)?.rids_tx() {
            Rids::Specific(v) if !v.is_empty() => Some(v.as_slice()),
            _ => None,
        }
    }

    /// Whether local track `idx` has a layered source and its m-line is
    /// negotiated for simulcast.
    pub(super) fn layered_source(&self, idx: usize) -> bool {
        let Some(t) = self.tracks.get(idx) else {
            return false;
        };
        t.source.as_ref().is_some_and(|s| !s.rids().is_empty())
            && t.mid.is_some_and(|m| self.tx_rids(m).is_some())
    }

    /// Paces one instant of a layered source. Returns false when the
    /// source ended (then it is detached).
    pub(super) fn next_layers(
        &mut self,
        idx: usize,
        due: Instant,
    ) -> Result<bool, str0m::RtcError> {
        let Some(t) = self.tracks.get_mut(idx) else {
            return Ok(false);
        };
        let mut frames = std::mem::take(&mut t.scratch);
        let Some(src) = t.source.as_mut() else {
            return Ok(false);
        };
        if !src.next_layers(&mut frames) || frames.is_empty() {
            debug!(track = %t.track_id, "source ended");
            t.source = None;
            t.next_due = None;
            return Ok(false);
        }
        let rids: Vec<Rid> = src.rids().iter().map(|r| Rid::from(r.as_str())).collect();
        let ticks = frames.first().map(|f| f.duration as u64).unwrap_or(3000);
        t.next_due = Some(due + ticks_to_duration(ticks, t.kind.clock_rate()));
        let items: Vec<LayerFrame> = rids
            .iter()
            .zip(frames.iter())
            .map(|(rid, f)| (*rid, f.data.clone(), f.keyframe))
            .collect();
        if let Some(t) = self.tracks.get_mut(idx) {
            t.scratch = frames;
        }
        self.write_layers(idx, &items, ticks, due)?;
        Ok(true)
    }

    /// Pushed frames of one instant of a simulcast track
    /// ([`Request::SendLayerFrames`]).
    pub(super) fn send_layer_frames(
        &mut self,
        track_id: &str,
        layers: Vec<(String, Arc<[u8]>)>,
        duration: Duration,
    ) -> Result<(), str0m::RtcError> {
        let Some(idx) = self.tracks.iter().position(|t| t.track_id == track_id) else {
            debug!(track = %track_id, "send_layer_frames on unknown track");
            return Ok(());
        };
        let Some(t) = self.tracks.get(idx) else {
            return Ok(());
        };
        let ticks = duration_to_ticks(duration, t.kind.clock_rate());
        if layers.iter().any(|(rid, _)| !crate::source::valid_rid(rid)) {
            warn!(track = %track_id, "pushed layers with an invalid RID dropped");
            return Ok(());
        }
        let simulcast = t.mid.is_some_and(|m| self.tx_rids(m).is_some());
        if !simulcast || t.kind != TrackKind::Video {
            // One layer for this remote: the middle one given.
            let middle = layers.len() / 2;
            let Some((_, data)) = layers.into_iter().nth(middle) else {
                return Ok(());
            };
            return self.write_frame(idx, data, ticks, false, self.now, None);
        }
        let items: Vec<LayerFrame> = layers
            .into_iter()
            .map(|(rid, data)| (Rid::from(rid.as_str()), data, false))
            .collect();
        self.write_layers(idx, &items, ticks, self.now)
    }

    /// Makes `t.layers` the layers of `rids` (a change of layers starts
    /// them over: key frames first, a new governor).
    fn ensure_layers(&mut self, idx: usize, rids: &[Rid]) {
        let Some(t) = self.tracks.get_mut(idx) else {
            return;
        };
        if t.layers.len() == rids.len() && t.layers.iter().zip(rids).all(|(l, r)| l.rid == *r) {
            return;
        }
        t.layers = rids
            .iter()
            .map(|rid| SendLayer {
                rid: *rid,
                want_keyframe: true,
                meter: RateMeter::default(),
            })
            .collect();
        t.governor = self
            .config
            .simulcast
            .clone()
            .map(|c| LayerGovernor::new(c, rids.len()));
        self.report_layers(idx);
    }

    /// Writes one instant of a simulcast track: each layer under its RID,
    /// all with the same RTP timestamp; paused layers and layers waiting
    /// for their key frame are skipped.
    fn write_layers(
        &mut self,
        idx: usize,
        items: &[LayerFrame],
        ticks: u64,
        wallclock: Instant,
    ) -> Result<(), str0m::RtcError> {
        let connected = matches!(self.state, ConnState::Connected | ConnState::Disconnected);
        if self.config.forward {
            return Ok(());
        }
        let rids: Vec<Rid> = items.iter().map(|i| i.0).collect();
        self.ensure_layers(idx, &rids);
        let Some(t) = self.tracks.get_mut(idx) else {
            return Ok(());
        };
        let rtp = t.rtp;
        t.rtp = t.rtp.wrapping_add(ticks);
        if t.muted || !connected {
            return Ok(());
        }
        let Some(mid) = t.mid.filter(|_| !t.awaiting) else {
            return Ok(());
        };
        if std::mem::take(&mut t.want_keyframe) {
            for l in &mut t.layers {
                l.want_keyframe = true;
            }
        }
        let sending = t.governor.as_ref().map_or(items.len(), |g| g.sending());
        let accepted: Vec<Rid> = self.tx_rids(mid).map(<[Rid]>::to_vec).unwrap_or_default();
        let now = self.now;
        let mut retarget = false;
        for (j, (rid, data, hint)) in items.iter().enumerate() {
            if j >= sending || data.is_empty() || !accepted.contains(rid) {
                continue;
            }
            let keyframe = *hint || crate::ivf::vp8_frame_info(data).is_some_and(|i| i.keyframe);
            let Some(t) = self.tracks.get_mut(idx) else {
                return Ok(());
            };
            let Some(layer) = t.layers.get_mut(j) else {
                continue;
            };
            if layer.want_keyframe {
                if !keyframe {
                    continue;
                }
                layer.want_keyframe = false;
            }
            let Some(writer) = self.rtc.writer(mid) else {
                return Ok(());
            };
            let Some(pt) = writer
                .payload_params()
                .find(|p| p.spec().codec == Codec::Vp8)
                .map(|p| p.pt())
            else {
                trace!(%mid, "VP8 not negotiated on this m-line");
                return Ok(());
            };
            let time = MediaTime::new(rtp, Frequency::NINETY_KHZ);
            match writer.rid(*rid).write(pt, wallclock, time, data.clone()) {
                Ok(()) => {
                    if let Some(t) = self.tracks.get_mut(idx) {
                        t.sent.add(data.len(), keyframe);
                        let rate = t
                            .layers
                            .get_mut(j)
                            .and_then(|l| l.meter.add(now, data.len()));
                        if let (Some(bps), Some(g)) = (rate, t.governor.as_mut()) {
                            g.set_layer_rate(j, bps);
                            retarget = true;
                        }
                    }
                }
                Err(e) => trace!(%mid, ?rid, error = %e, "write refused"),
            }
        }
        if retarget {
            self.set_bwe_targets(idx);
        }
        self.drain()
    }

    /// Tells str0m's bandwidth estimation what track `idx`'s layers need
    /// (see [`LayerGovernor::bwe_targets`]).
    fn set_bwe_targets(&mut self, idx: usize) {
        if !self.config.simulcast.as_ref().is_some_and(|s| s.twcc) {
            return;
        }
        let Some((minimum, desired)) = self
            .tracks
            .get(idx)
            .and_then(|t| t.governor.as_ref())
            .and_then(|g| g.bwe_targets())
        else {
            return;
        };
        trace!(minimum, desired, "bandwidth estimation targets");
        self.rtc.bwe().set_bitrate(
            str0m::bwe::Bitrate::bps(minimum),
            str0m::bwe::Bitrate::bps(desired),
        );
    }

    /// An uplink estimate: for the track sent on `mid` (REMB), or for all
    /// (TWCC).
    pub(super) fn on_estimate(&mut self, mid: Option<Mid>, kind: EstimateKind, bps: u64) {
        let now = self.now;
        let mut changed = Vec::new();
        for (i, t) in self.tracks.iter_mut().enumerate() {
            if mid.is_some_and(|m| t.mid != Some(m)) {
                continue;
            }
            if let Some(g) = t.governor.as_mut()
                && g.handle_estimate(now, kind, bps).is_some()
            {
                changed.push(i);
            }
        }
        for i in changed {
            self.layers_changed(i);
        }
    }

    /// Lets the governors act on time passing.
    pub(super) fn governors_timeout(&mut self) {
        let now = self.now;
        let mut changed = Vec::new();
        for (i, t) in self.tracks.iter_mut().enumerate() {
            if let Some(g) = t.governor.as_mut()
                && g.poll_timeout().is_some_and(|at| at <= now)
                && g.handle_timeout(now).is_some()
            {
                changed.push(i);
            }
        }
        for i in changed {
            self.layers_changed(i);
        }
    }

    /// The governor changed the layers of track `idx`: resumed layers
    /// start with a key frame; reported.
    fn layers_changed(&mut self, idx: usize) {
        let Some(t) = self.tracks.get_mut(idx) else {
            return;
        };
        let sending = t.governor.as_ref().map_or(t.layers.len(), |g| g.sending());
        let mut ask = Vec::new();
        for (j, l) in t.layers.iter_mut().enumerate() {
            if j < sending {
                continue;
            }
            // Paused: when it resumes, it waits for its key frame.
            l.want_keyframe = true;
            l.meter.reset();
        }

        for (j, l) in t.layers.iter().enumerate().take(sending) {
            if l.want_keyframe {
                ask.push((j, l.rid));
            }
        }
        for (j, rid) in ask {
            let handled = t
                .source
                .as_mut()
                .is_some_and(|s| s.request_layer_keyframe(j));
            if !handled && let Some(mid) = t.mid {
                let track_id = t.track_id.clone();
                self.events.push_back(PeerEvent::KeyframeRequested {
                    track_id,
                    mid,
                    rid: Some(rid),
                    fir: false,
                });
            }
        }
        self.set_bwe_targets(idx);
        self.report_layers(idx);
    }

    fn report_layers(&mut self, idx: usize) {
        let Some(t) = self.tracks.get(idx) else {
            return;
        };
        let Some(mid) = t.mid else {
            return;
        };
        let sending = t.governor.as_ref().map_or(t.layers.len(), |g| g.sending());
        let names = |ls: &[SendLayer]| ls.iter().map(|l| l.rid.to_string()).collect::<Vec<_>>();
        let (on, off) = t.layers.split_at(sending.min(t.layers.len()));
        let ev = PeerEvent::SimulcastLayers {
            track_id: t.track_id.clone(),
            mid,
            sending: names(on),
            paused: names(off),
            estimate_bps: t.governor.as_ref().and_then(|g| g.estimate()),
        };
        info!(track = %t.track_id, ?ev, "simulcast layers");
        self.emit(ev);
    }

    /// After a negotiation: a line offered for simulcast whose answer did
    /// not accept it gets a send stream without RID (str0m made streams
    /// only for the offered RIDs), so one layer goes out as before.
    pub(super) fn simulcast_fallback(&mut self) {
        let refused: Vec<Mid> = self
            .tracks
            .iter()
            .filter(|t| !t.offered_rids.is_empty() && !t.awaiting)
            .filter_map(|t| t.mid)
            .filter(|m| self.tx_rids(*m).is_none())
            .collect();
        for mid in refused {
            let mut api = self.rtc.direct_api();
            if api.stream_tx_by_mid(mid, None).is_some() {
                continue;
            }
            let ssrc = str0m::rtp::Ssrc::from(fastrand::u32(1..));
            let rtx = self
                .config
                .retransmission
                .then(|| str0m::rtp::Ssrc::from(fastrand::u32(1..)));
            api.declare_stream_tx(ssrc, rtx, mid, None);
            info!(%mid, "the remote did not accept simulcast: sending one layer");
        }
    }
}
