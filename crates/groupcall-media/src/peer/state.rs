//! One peer of a [`PeerSet`](super::set::PeerSet): its `str0m::Rtc`, local
//! and remote tracks, sources, sinks and connection state. Sans-IO: it
//! queues str0m's transmits and its events; the set routes them.

use super::*;

impl PeerState {
    pub(super) fn emit(&mut self, ev: PeerEvent) {
        self.events.push_back(ev);
    }

    pub(super) fn set_state(&mut self, s: ConnState) {
        if self.state == s || self.state == ConnState::Closed {
            return;
        }
        info!(from = ?self.state, to = ?s, "connection state");
        self.state = s;
        let ev = match s {
            ConnState::New => return,
            ConnState::Connected => PeerEvent::Connected,
            ConnState::Disconnected => PeerEvent::Disconnected,
            ConnState::Failed => PeerEvent::Failed,
            ConnState::Closed => PeerEvent::Closed,
        };
        self.emit(ev);
    }

    /// When the peer wants [`PeerState::handle_timer`] next.
    pub(super) fn next_deadline(&self) -> Instant {
        let mut d = self.rtc_timeout.min(self.now + Duration::from_secs(1));
        if !self.deferred.is_empty() && !self.gather_done {
            d = d.min(self.gather_deadline);
        }
        for t in &self.tracks {
            if let Some(due) = t.next_due {
                d = d.min(due);
            }
        }
        match self.state {
            ConnState::Connected => d = d.min(self.last_rx + self.config.disconnect_timeout),
            ConnState::Disconnected => d = d.min(self.last_rx + self.config.failed_timeout),
            ConnState::New => {
                if let Some(t) = self.negotiated_at {
                    d = d.min(t + self.config.failed_timeout);
                }
            }
            _ => {}
        }
        d
    }

    /// Polls str0m until it wants a timeout: the single-mutation invariant.
    /// Its transmits are queued for the set (which relays those from a
    /// relayed candidate).
    pub(super) fn drain(&mut self) -> Result<(), str0m::RtcError> {
        loop {
            if !self.rtc.is_alive() {
                self.rtc_timeout = self.now + Duration::from_secs(3600);
                return Ok(());
            }
            match self.rtc.poll_output()? {
                Output::Timeout(t) => {
                    self.rtc_timeout = t;
                    return Ok(());
                }
                Output::Transmit(t) => {
                    // STUN starts with 0b00; DTLS and SRTP only go on the
                    // selected pair.
                    if t.contents.first().is_some_and(|b| *b > 3) {
                        self.selected = Some((t.source, t.destination));
                    }
                    self.out.push_back(Transmit {
                        source: t.source,
                        destination: t.destination,
                        // str0m's buffer, moved (not copied).
                        contents: t.contents.into(),
                    });
                }
                Output::Event(e) => self.on_rtc_event(e),
            }
        }
    }

    pub(super) fn on_rtc_event(&mut self, e: Event) {
        match e {
            Event::Connected => {
                self.ever_connected = true;
                self.last_rx = self.now;
                self.set_state(ConnState::Connected);
                self.start_sources();
                let mids: Vec<Mid> = self
                    .remote
                    .values()
                    .filter(|r| r.kind == TrackKind::Video)
                    .map(|r| r.mid)
                    .collect();
                for mid in mids {
                    self.send_pli(mid);
                }
            }
            Event::IceConnectionStateChange(s) => {
                debug!(?s, "ICE state");
                match s {
                    IceConnectionState::Disconnected if self.state == ConnState::Connected => {
                        self.set_state(ConnState::Disconnected)
                    }
                    IceConnectionState::Connected | IceConnectionState::Completed
                        if self.ever_connected
                            && matches!(
                                self.state,
                                ConnState::Disconnected | ConnState::Failed
                            ) =>
                    {
                        self.last_rx = self.now;
                        self.set_state(ConnState::Connected)
                    }
                    _ => {}
                }
            }
            Event::MediaAdded(m) => {
                debug!(mid = %m.mid, kind = ?m.kind, dir = ?m.direction, "media added")
            }
            Event::MediaChanged(m) => debug!(mid = %m.mid, dir = ?m.direction, "media changed"),
            Event::MediaData(d) => self.on_media_data(d),
            Event::KeyframeRequest(k) => {
                let Some(t) = self.tracks.iter_mut().find(|t| t.mid == Some(k.mid)) else {
                    return;
                };
                debug!(track = %t.track_id, kind = ?k.kind, rid = ?k.rid, "key frame requested");
                let layer = k
                    .rid
                    .and_then(|rid| t.layers.iter().position(|l| l.rid == rid));
                let handled = match layer {
                    // One layer jumps to its next key frame.
                    Some(j) => t
                        .source
                        .as_mut()
                        .is_some_and(|s| !s.rids().is_empty() && s.request_layer_keyframe(j)),
                    None => t.source.as_mut().is_some_and(|s| s.request_keyframe()),
                };
                if !handled {
                    let track_id = t.track_id.clone();
                    self.emit(PeerEvent::KeyframeRequested {
                        track_id,
                        mid: k.mid,
                        rid: k.rid,
                        fir: k.kind == KeyframeRequestKind::Fir,
                    });
                }
            }
            Event::RtpPacket(p) => self.on_rtp_packet(p),
            Event::ChannelOpen(id, label) => self.on_channel_open(id, label),
            Event::ChannelData(d) => self.on_channel_data(d.id, d.binary, d.data),
            Event::ChannelClose(id) => self.on_channel_close(id),
            Event::EgressBitrateEstimate(str0m::bwe::BweKind::Remb { estimate, mid }) => {
                let bps = estimate.as_u64();
                debug!(%mid, bps, "the remote limits our bitrate (REMB)");
                self.emit(PeerEvent::BitrateLimit { mid, bps });
                self.on_estimate(Some(mid), crate::simulcast::EstimateKind::Remb, bps);
            }
            Event::EgressBitrateEstimate(str0m::bwe::BweKind::Twcc {
                estimate,
                can_probe,
            }) => {
                let bps = estimate.as_u64();
                trace!(bps, can_probe, "uplink estimate (TWCC)");
                if can_probe && self.config.estimate_bandwidth.is_some() {
                    self.emit(PeerEvent::EgressEstimate { bps });
                }
                if can_probe {
                    self.on_estimate(None, crate::simulcast::EstimateKind::Twcc, bps);
                }
            }
            Event::MediaEgressStats(s) => {
                // str0m's count of packets sent includes its RTX resends;
                // what we wrote on the m-line is the rest (packets still
                // queued make this a lower bound).
                let written: u64 = self
                    .tracks
                    .iter()
                    .filter(|t| t.mid == Some(s.mid))
                    .map(|t| t.sent.frames)
                    .sum();
                let resent = s.packets.saturating_sub(written);
                trace!(mid = %s.mid, rid = ?s.rid, nacks = s.nacks, resent, loss = ?s.loss, bytes = s.bytes, "egress stats");
                let r = self.egress_nacks.entry((s.mid, s.rid)).or_default();
                *r = EgressReport {
                    nacks: s.nacks,
                    resent,
                    loss: s.loss.map(|l| (l, s.timestamp)).or(r.loss),
                };
            }
            Event::Closed => {
                info!("remote closed the connection");
                self.set_state(ConnState::Closed);
                self.finish_all_sinks();
                self.finished = true;
            }
            _ => {}
        }
    }

    pub(super) fn send_pli(&mut self, mid: Mid) {
        self.request_keyframe_on(mid, None, false);
    }

    pub(super) fn on_media_data(&mut self, d: MediaData) {
        let Some(r) = self.remote.get_mut(&d.mid) else {
            self.frames_unmatched += 1;
            trace!(mid = %d.mid, "media on an m-line without a remote track");
            return;
        };
        let keyframe = r.kind == TrackKind::Video && d.is_keyframe();
        r.received.add(d.data.len(), keyframe);
        let first = (r.received.frames == 1).then(|| PeerEvent::FirstFrame {
            stream_id: r.stream_id.to_string(),
            kind: r.kind,
            mid: d.mid.to_string(),
            received: r.received,
        });
        let mut pli = false;
        if r.kind == TrackKind::Video {
            if keyframe {
                r.need_keyframe = false;
            } else if !d.contiguous {
                r.need_keyframe = true;
            }
            if r.need_keyframe
                && r.last_pli.is_none_or(|t| {
                    self.now.saturating_duration_since(t) >= Duration::from_millis(500)
                })
            {
                pli = true;
            }
        }
        let frame = Frame {
            stream_id: r.stream_id.clone(),
            track_id: r.track_id.clone(),
            kind: r.kind,
            data: d.data.clone(),
            rtp_time: d.time.numer(),
            keyframe,
            contiguous: d.contiguous,
            received_at: d.network_time,
            rid: d.rid,
        };
        if let Some(first) = first {
            self.emit(first);
        }
        if pli {
            let mid = d.mid;
            self.send_pli(mid);
        }
        let mut failed = Vec::new();
        for (i, (filter, sink)) in self.sinks.iter_mut().enumerate() {
            if filter.matches(&frame)
                && let Err(e) = sink.write_frame(&frame)
            {
                warn!(error = %e, "sink failed, detaching it");
                failed.push(i);
            }
        }
        for i in failed.into_iter().rev() {
            let (_, mut sink) = self.sinks.remove(i);
            let _ = sink.finish();
        }
        if self.config.deliver_frames {
            // The driver bounds the queue (`max_queued_frames`) and counts
            // what it drops.
            self.emit(PeerEvent::Frame(frame));
        }
    }

    pub(super) fn start_sources(&mut self) {
        if !matches!(self.state, ConnState::Connected | ConnState::Disconnected) {
            return;
        }
        let now = self.now;
        for t in &mut self.tracks {
            if t.source.is_some() && t.next_due.is_none() {
                t.next_due = Some(now);
                if let Some(s) = t.source.as_mut() {
                    s.request_keyframe();
                }
            }
        }
    }

    /// Feeds one datagram the set routed to this peer (from a socket, or
    /// unwrapped from a TURN relay: then its destination is the relayed
    /// address). `known`: str0m's `accepts` said it belongs to this `Rtc`
    /// (then it proves the remote alive); the set may also route by a
    /// learnt remote address, e.g. an early DTLS hello that overtakes ICE
    /// nomination.
    pub(super) fn receive(
        &mut self,
        from: SocketAddr,
        input: Input<'_>,
        known: bool,
    ) -> Result<(), str0m::RtcError> {
        let now = self.now;
        if let Err(e) = self.rtc.handle_input(input) {
            debug!(%from, error = %e, "datagram refused");
            if !self.rtc.is_alive() {
                return Err(e);
            }
            return self.drain();
        }
        if known {
            self.last_rx = now;
        }
        if self.ever_connected
            && matches!(self.state, ConnState::Disconnected | ConnState::Failed)
            && self.rtc.is_connected()
        {
            self.set_state(ConnState::Connected);
        }
        self.drain()
    }

    pub(super) fn handle_timer(&mut self) -> Result<(), str0m::RtcError> {
        let now = self.now;
        for i in 0..self.tracks.len() {
            while let Some(t) = self.tracks.get_mut(i) {
                let Some(due) = t.next_due else { break };
                if due > now {
                    break;
                }
                let due = if now.duration_since(due) > Duration::from_secs(1) {
                    debug!(track = %t.track_id, "source fell behind, skipping ahead");
                    now
                } else {
                    due
                };
                if self.layered_source(i) {
                    if !self.next_layers(i, due)? {
                        break;
                    }
                    continue;
                }
                let Some(t) = self.tracks.get_mut(i) else {
                    break;
                };
                let Some(frame) = t.source.as_mut().and_then(|s| s.next_frame()) else {
                    debug!(track = %t.track_id, "source ended");
                    t.source = None;
                    t.next_due = None;
                    break;
                };
                t.next_due =
                    Some(due + ticks_to_duration(frame.duration as u64, t.kind.clock_rate()));
                self.write_frame(
                    i,
                    frame.data,
                    frame.duration as u64,
                    frame.keyframe,
                    due,
                    frame.audio_level,
                )?;
            }
        }
        self.governors_timeout();
        self.rtc.handle_input(Input::Timeout(now))?;
        self.drain()?;
        self.check_liveness(now);
        Ok(())
    }

    pub(super) fn check_liveness(&mut self, now: Instant) {
        let silent = now.saturating_duration_since(self.last_rx);
        match self.state {
            ConnState::Connected if silent >= self.config.disconnect_timeout => {
                self.set_state(ConnState::Disconnected)
            }
            ConnState::Disconnected if silent >= self.config.failed_timeout => {
                self.set_state(ConnState::Failed)
            }
            ConnState::New => {
                if let Some(t) = self.negotiated_at
                    && now.saturating_duration_since(t) >= self.config.failed_timeout
                {
                    self.set_state(ConnState::Failed)
                }
            }
            _ => {}
        }
    }

    /// Writes one frame of local track `idx` (a mutation) and drains.
    /// An audio frame carries its level (`level`, -dBov; a silent Opus
    /// packet is at 127 whatever `level` says) in the RFC 6464
    /// `ssrc-audio-level` header extension, with the voice flag set when it
    /// is not silence; a frame of unknown level carries none.
    pub(super) fn write_frame(
        &mut self,
        idx: usize,
        data: Arc<[u8]>,
        ticks: u64,
        keyframe_hint: bool,
        wallclock: Instant,
        level: Option<u8>,
    ) -> Result<(), str0m::RtcError> {
        let connected = matches!(self.state, ConnState::Connected | ConnState::Disconnected);
        if self.config.forward {
            // str0m's frame writer does not exist in RTP mode.
            return Ok(());
        }
        let Some(t) = self.tracks.get_mut(idx) else {
            return Ok(());
        };
        let rtp = t.rtp;
        t.rtp = t.rtp.wrapping_add(ticks);
        if t.muted || !connected || data.is_empty() {
            return Ok(());
        }
        let Some(mid) = t.mid.filter(|_| !t.awaiting) else {
            return Ok(());
        };
        let keyframe = t.kind == TrackKind::Video
            && (keyframe_hint || crate::ivf::vp8_frame_info(&data).is_some_and(|i| i.keyframe));
        if t.kind == TrackKind::Video && t.want_keyframe {
            if !keyframe {
                return Ok(());
            }
            t.want_keyframe = false;
        }
        let kind = t.kind;
        // One layer on a line negotiated for simulcast: under its first RID.
        let rid = self.tx_rids(mid).and_then(|r| r.first().copied());
        let Some(mut writer) = self.rtc.writer(mid) else {
            return Ok(());
        };
        if let Some(rid) = rid {
            writer = writer.rid(rid);
        }
        if kind == TrackKind::Audio {
            let level = if crate::source::opus_is_silence(&data) {
                Some(crate::source::SILENCE_LEVEL)
            } else {
                level.map(|l| l.min(crate::source::SILENCE_LEVEL))
            };
            if let Some(l) = level {
                // -dBov as str0m wants it: 0 the loudest, -127 silence.
                writer = writer.audio_level(-(l as i8), l < crate::source::SILENCE_LEVEL);
            }
        }
        let codec = match kind {
            TrackKind::Audio => Codec::Opus,
            TrackKind::Video => Codec::Vp8,
        };
        let Some(pt) = writer
            .payload_params()
            .find(|p| p.spec().codec == codec)
            .map(|p| p.pt())
        else {
            trace!(%mid, "codec not negotiated on this m-line");
            return Ok(());
        };
        let freq = match kind {
            TrackKind::Audio => Frequency::FORTY_EIGHT_KHZ,
            TrackKind::Video => Frequency::NINETY_KHZ,
        };
        let len = data.len();
        match writer.write(pt, wallclock, MediaTime::new(rtp, freq), data) {
            Ok(()) => {
                if let Some(t) = self.tracks.get_mut(idx) {
                    t.sent.add(len, keyframe);
                }
            }
            Err(e) => trace!(%mid, error = %e, "write refused"),
        }
        self.drain()
    }

    /// Runs one request; `Ok(None)` for requests without an answer, `Err`
    /// when str0m failed (the peer is then failed).
    pub(super) fn handle_request(&mut self, c: Request) -> Result<Option<Answer>, str0m::RtcError> {
        match c {
            Request::CreateOffer { feeds, ice_restart } => {
                return Ok(Some(self.create_offer(&feeds, ice_restart).map(Reply::Sdp)));
            }
            Request::AcceptOffer { sdp, feeds } => {
                return Ok(Some(self.accept_offer(&sdp, &feeds).map(Reply::Sdp)));
            }
            Request::ApplyAnswer { sdp } => {
                return Ok(Some(self.apply_answer(&sdp).map(|()| Reply::Done)));
            }
            Request::AddRemoteCandidate { candidate } => {
                return Ok(Some(
                    self.add_remote_candidate(&candidate).map(|()| Reply::Done),
                ));
            }
            Request::LocalCandidates => {
                let mid = self.local_sections.first().and_then(|s| s.mid.clone());
                let list = self
                    .candidates
                    .iter()
                    .map(|c| IceCandidate {
                        candidate: c.to_sdp_string(),
                        sdp_mid: mid.clone(),
                        sdp_m_line_index: Some(0),
                    })
                    .collect();
                return Ok(Some(Ok(Reply::Candidates(list))));
            }
            Request::SendFrame {
                track_id,
                data,
                duration,
            } => {
                let Some(i) = self.tracks.iter().position(|t| t.track_id == track_id) else {
                    debug!(track = %track_id, "send_frame on unknown track");
                    return Ok(None);
                };
                let ticks = self
                    .tracks
                    .get(i)
                    .map(|t| duration_to_ticks(duration, t.kind.clock_rate()))
                    .unwrap_or(0);
                self.write_frame(i, data, ticks, false, self.now, None)?;
            }
            Request::SendLayerFrames {
                track_id,
                layers,
                duration,
            } => self.send_layer_frames(&track_id, layers, duration)?,
            Request::SetSource { track_id, source } => {
                if self.config.forward {
                    warn!(track = %track_id, "sources do not run on a forwarding peer");
                    return Ok(None);
                }
                match self.tracks.iter_mut().find(|t| t.track_id == track_id) {
                    Some(t) => {
                        if source.kind() != t.kind {
                            warn!(track = %track_id, "source kind does not match the track");
                            return Ok(None);
                        }
                        t.source = Some(source);
                        t.next_due = None;
                        self.start_sources();
                    }
                    None => {
                        self.pending_sources.insert(track_id, source);
                    }
                }
            }
            Request::SetMuted { track_id, muted } => {
                let Some(t) = self.tracks.iter_mut().find(|t| t.track_id == track_id) else {
                    self.pending_muted.insert(track_id, muted);
                    return Ok(None);
                };
                let unmuting_video = t.muted && !muted && t.kind == TrackKind::Video;
                debug!(track = %track_id, muted, "mute");
                t.muted = muted;
                if unmuting_video {
                    t.want_keyframe = true;
                    if !t.source.as_mut().is_some_and(|s| s.request_keyframe())
                        && let Some(mid) = t.mid
                    {
                        self.emit(PeerEvent::KeyframeRequested {
                            track_id,
                            mid,
                            rid: None,
                            fir: false,
                        });
                    }
                }
            }
            Request::RequestKeyframe { track_id } => {
                let mid = self
                    .remote
                    .values()
                    .find(|r| &*r.track_id == track_id.as_str())
                    .map(|r| r.mid);
                if let Some(mid) = mid {
                    self.send_pli(mid);
                    self.drain()?;
                }
            }
            Request::AddSink { filter, sink } => self.sinks.push((filter, sink)),
            Request::FinishSinks => {
                let errors = self.finish_all_sinks();
                return Ok(Some(Ok(Reply::SinkErrors(errors))));
            }
            Request::Stats => {
                return Ok(Some(Ok(Reply::Stats(Box::new(self.stats())))));
            }
            Request::Close => {
                self.do_close();
                return Ok(Some(Ok(Reply::Done)));
            }
            Request::SendChannel { text } => {
                let r = self.send_channel(&text);
                self.drain()?;
                return Ok(Some(r.map(|()| Reply::Done)));
            }
            Request::WriteRtp(out) => self.write_rtp(out)?,
            Request::RequestKeyframeOn { mid, rid, fir } => {
                self.request_keyframe_on(mid, rid, fir);
                self.drain()?;
            }
            Request::LimitIncomingBitrate { bps } => {
                self.limit_incoming_bitrate(bps);
                self.drain()?;
            }
            Request::SetBitrateTargets {
                minimum_bps,
                desired_bps,
            } => {
                if self.config.estimate_bandwidth.is_some() {
                    trace!(minimum_bps, desired_bps, "bandwidth estimation targets");
                    self.rtc.bwe().set_bitrate(
                        str0m::bwe::Bitrate::bps(minimum_bps),
                        str0m::bwe::Bitrate::bps(desired_bps),
                    );
                }
                self.drain()?;
            }
            Request::Rollback => {
                if self.pending_offer.is_none() {
                    return Ok(Some(Err(MediaError::NoPendingOffer)));
                }
                self.rollback_pending(true);
                self.drain()?;
                return Ok(Some(Ok(Reply::Done)));
            }
        }
        Ok(None)
    }
}
