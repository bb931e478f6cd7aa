//! The peer task: run loop, str0m events, sending and receiving media.

use super::*;

impl Driver {
    pub(super) async fn run(mut self) {
        let mut buf = vec![0u8; 2048];
        if let Err(e) = self.drain().await {
            warn!(error = %e, "webrtc failed at start");
            return;
        }
        while !self.finished {
            let deadline = self.next_deadline();
            let wake = {
                let lookups = self.gather.pending_lookups() > 0;
                let sockets = &self.sockets;
                let recv = poll_fn(|cx| {
                    for (i, s) in sockets.iter().enumerate() {
                        let mut rb = ReadBuf::new(&mut buf);
                        if let Poll::Ready(r) = s.poll_recv_from(cx, &mut rb) {
                            return Poll::Ready((i, r.map(|a| (rb.filled().len(), a))));
                        }
                    }
                    Poll::Pending
                });
                // Unbiased: neither a flood of commands nor of datagrams can
                // starve the other branches.
                tokio::select! {
                    c = self.cmd_rx.recv() => Wake::Command(c),
                    (i, r) = recv => Wake::Packet(i, r),
                    Some(l) = self.gather.lookup_rx.recv(), if lookups => Wake::Lookup(l),
                    _ = tokio::time::sleep_until(deadline.into()) => Wake::Timer,
                }
            };
            let r = match wake {
                Wake::Command(Some(c)) => self.handle_command(c).await,
                Wake::Command(None) => {
                    debug!("handle dropped, closing peer");
                    self.do_close().await;
                    Ok(())
                }
                Wake::Packet(i, Ok((n, from))) => {
                    let data = buf.get(..n).unwrap_or(&[]);
                    self.handle_packet(i, from, data).await
                }
                Wake::Packet(i, Err(e)) => {
                    // E.g. ICMP port unreachable surfacing on Linux: ignore.
                    trace!(socket = i, error = %e, "UDP receive error");
                    Ok(())
                }
                Wake::Lookup(l) => self.on_lookup(l).await,
                Wake::Timer => self.handle_timer().await,
            };
            if let Err(e) = r {
                warn!(error = %e, "webrtc error, failing the peer");
                self.set_state(ConnState::Failed);
                self.rtc.disconnect();
                self.finish_all_sinks();
                self.finished = true;
            }
        }
        // However the peer ended (closed here or by the remote, failed, or
        // the handle dropped), release the TURN allocations.
        self.close_relays().await;
        debug!("media peer task ended");
    }

    pub(super) fn emit(&self, ev: PeerEvent) {
        let _ = self.events.send(ev);
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

    pub(super) fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        let mut d = self.rtc_timeout.min(now + Duration::from_secs(1));
        if let Some(t) = self.gather.next_timeout() {
            d = d.min(t);
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
    pub(super) async fn drain(&mut self) -> Result<(), str0m::RtcError> {
        loop {
            if !self.rtc.is_alive() {
                self.rtc_timeout = Instant::now() + Duration::from_secs(3600);
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
                    if self
                        .relay_transmit(t.source, t.destination, &t.contents)
                        .await
                    {
                        continue;
                    }
                    let idx = self
                        .local_addrs
                        .iter()
                        .position(|a| *a == t.source)
                        .unwrap_or(0);
                    if let Some(s) = self.sockets.get(idx)
                        && let Err(e) = s.send_to(&t.contents, t.destination).await
                    {
                        trace!(dest = %t.destination, error = %e, "UDP send failed");
                    }
                }
                Output::Event(e) => self.on_rtc_event(e),
            }
        }
    }

    pub(super) fn on_rtc_event(&mut self, e: Event) {
        match e {
            Event::Connected => {
                self.ever_connected = true;
                self.last_rx = Instant::now();
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
                        self.last_rx = Instant::now();
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
                debug!(track = %t.track_id, kind = ?k.kind, "key frame requested");
                let handled = t.source.as_mut().is_some_and(|s| s.request_keyframe());
                if !handled {
                    let track_id = t.track_id.clone();
                    self.emit(PeerEvent::KeyframeRequested { track_id });
                }
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
        let now = Instant::now();
        if let Some(r) = self.remote.get_mut(&mid) {
            r.last_pli = Some(now);
        }
        if let Some(mut w) = self.rtc.writer(mid) {
            match w.request_keyframe(None, KeyframeRequestKind::Pli) {
                Ok(()) => debug!(%mid, "requested key frame (PLI)"),
                Err(e) => trace!(%mid, error = %e, "PLI not possible yet"),
            }
        }
    }

    pub(super) fn on_media_data(&mut self, d: MediaData) {
        let Some(r) = self.remote.get_mut(&d.mid) else {
            self.frames_unmatched += 1;
            trace!(mid = %d.mid, "media on an m-line without a remote track");
            return;
        };
        let keyframe = r.kind == TrackKind::Video && d.is_keyframe();
        r.received.add(d.data.len(), keyframe);
        let mut pli = false;
        if r.kind == TrackKind::Video {
            if keyframe {
                r.need_keyframe = false;
            } else if !d.contiguous {
                r.need_keyframe = true;
            }
            if r.need_keyframe
                && r.last_pli
                    .is_none_or(|t| t.elapsed() >= Duration::from_millis(500))
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
        };
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
            if self.queued.load(Ordering::Relaxed) < self.config.max_queued_frames {
                self.queued.fetch_add(1, Ordering::Relaxed);
                self.emit(PeerEvent::Frame(frame));
            } else {
                self.frames_dropped += 1;
            }
        }
    }

    pub(super) fn start_sources(&mut self) {
        if !matches!(self.state, ConnState::Connected | ConnState::Disconnected) {
            return;
        }
        let now = Instant::now();
        for t in &mut self.tracks {
            if t.source.is_some() && t.next_due.is_none() {
                t.next_due = Some(now);
                if let Some(s) = t.source.as_mut() {
                    s.request_keyframe();
                }
            }
        }
    }

    pub(super) async fn handle_packet(
        &mut self,
        idx: usize,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), str0m::RtcError> {
        let Some(&local) = self.local_addrs.get(idx) else {
            return Ok(());
        };
        if self.gather_packet(idx, from, data).await? {
            return Ok(());
        }
        self.receive(Instant::now(), from, local, data).await
    }

    /// Feeds one datagram (from a socket, or unwrapped from a TURN relay:
    /// then `local` is the relayed address) to str0m.
    pub(super) async fn receive(
        &mut self,
        now: Instant,
        from: SocketAddr,
        local: SocketAddr,
        data: &[u8],
    ) -> Result<(), str0m::RtcError> {
        let Ok(recv) = Receive::new(Protocol::Udp, from, local, data) else {
            trace!(%from, "unrecognised datagram");
            return Ok(());
        };
        let input = Input::Receive(now, recv);
        // Every datagram on our sockets is meant for this Rtc (sockets are
        // not shared), so all of them go in: filtering with `accepts` would
        // drop an early DTLS hello that overtakes ICE nomination. `accepts`
        // only decides whether the packet proves the remote alive.
        let known = self.rtc.accepts(&input);
        if let Err(e) = self.rtc.handle_input(input) {
            debug!(%from, error = %e, "datagram refused");
            if !self.rtc.is_alive() {
                return Err(e);
            }
            return self.drain().await;
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
        self.drain().await
    }

    pub(super) async fn handle_timer(&mut self) -> Result<(), str0m::RtcError> {
        let now = Instant::now();
        if self.gather.next_timeout().is_some_and(|t| t <= now) {
            self.gather_timeout(now).await?;
        }
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
                let Some(frame) = t.source.as_mut().and_then(|s| s.next_frame()) else {
                    debug!(track = %t.track_id, "source ended");
                    t.source = None;
                    t.next_due = None;
                    break;
                };
                t.next_due =
                    Some(due + ticks_to_duration(frame.duration as u64, t.kind.clock_rate()));
                self.write_frame(i, frame.data, frame.duration as u64, frame.keyframe, due)
                    .await?;
            }
        }
        self.rtc.handle_input(Input::Timeout(now))?;
        self.drain().await?;
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
    pub(super) async fn write_frame(
        &mut self,
        idx: usize,
        data: Arc<[u8]>,
        ticks: u64,
        keyframe_hint: bool,
        wallclock: Instant,
    ) -> Result<(), str0m::RtcError> {
        let connected = matches!(self.state, ConnState::Connected | ConnState::Disconnected);
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
        let Some(writer) = self.rtc.writer(mid) else {
            return Ok(());
        };
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
        self.drain().await
    }

    pub(super) async fn handle_command(&mut self, c: Command) -> Result<(), str0m::RtcError> {
        match c {
            Command::CreateOffer {
                feeds,
                ice_restart,
                reply,
            } => {
                let r = self.create_offer(&feeds, ice_restart).await;
                let _ = reply.send(r);
            }
            Command::AcceptOffer { sdp, feeds, reply } => {
                let r = self.accept_offer(&sdp, &feeds).await;
                let _ = reply.send(r);
            }
            Command::ApplyAnswer { sdp, reply } => {
                let r = self.apply_answer(&sdp).await;
                let _ = reply.send(r);
            }
            Command::AddRemoteCandidate { candidate, reply } => {
                let r = self.add_remote_candidate(&candidate).await;
                let _ = reply.send(r);
            }
            Command::LocalCandidates { reply } => {
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
                let _ = reply.send(Ok(list));
            }
            Command::SendFrame {
                track_id,
                data,
                duration,
            } => {
                let Some(i) = self.tracks.iter().position(|t| t.track_id == track_id) else {
                    debug!(track = %track_id, "send_frame on unknown track");
                    return Ok(());
                };
                let ticks = self
                    .tracks
                    .get(i)
                    .map(|t| duration_to_ticks(duration, t.kind.clock_rate()))
                    .unwrap_or(0);
                self.write_frame(i, data, ticks, false, Instant::now())
                    .await?;
            }
            Command::SetSource { track_id, source } => {
                match self.tracks.iter_mut().find(|t| t.track_id == track_id) {
                    Some(t) => {
                        if source.kind() != t.kind {
                            warn!(track = %track_id, "source kind does not match the track");
                            return Ok(());
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
            Command::SetMuted { track_id, muted } => {
                let Some(t) = self.tracks.iter_mut().find(|t| t.track_id == track_id) else {
                    self.pending_muted.insert(track_id, muted);
                    return Ok(());
                };
                let unmuting_video = t.muted && !muted && t.kind == TrackKind::Video;
                debug!(track = %track_id, muted, "mute");
                t.muted = muted;
                if unmuting_video {
                    t.want_keyframe = true;
                    if !t.source.as_mut().is_some_and(|s| s.request_keyframe()) {
                        self.emit(PeerEvent::KeyframeRequested { track_id });
                    }
                }
            }
            Command::RequestKeyframe { track_id } => {
                let mid = self
                    .remote
                    .values()
                    .find(|r| &*r.track_id == track_id.as_str())
                    .map(|r| r.mid);
                if let Some(mid) = mid {
                    self.send_pli(mid);
                    self.drain().await?;
                }
            }
            Command::AddSink { filter, sink } => self.sinks.push((filter, sink)),
            Command::FinishSinks { reply } => {
                let errors = self.finish_all_sinks();
                let _ = reply.send(Ok(errors));
            }
            Command::Stats { reply } => {
                let _ = reply.send(Ok(self.stats()));
            }
            Command::Close { reply } => {
                self.do_close().await;
                let _ = reply.send(Ok(()));
            }
        }
        Ok(())
    }
}
