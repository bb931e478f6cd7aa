//! Offer/answer, track binding, remote tracks, candidates, stats, close.

use super::*;

fn rtc_err(e: str0m::RtcError) -> MediaError {
    MediaError::Rtc(e.to_string())
}

/// Our direction for an m-line, given the remote's and whether we send on it.
fn local_direction(remote: Direction, bound: bool) -> Direction {
    match (remote, bound) {
        (Direction::SendRecv, true) => Direction::SendRecv,
        (Direction::RecvOnly, true) => Direction::SendOnly,
        (Direction::SendRecv | Direction::SendOnly, _) => Direction::RecvOnly,
        (Direction::RecvOnly | Direction::Inactive, _) => Direction::Inactive,
    }
}

impl PeerState {
    /// Makes the local tracks match `wanted`. New tracks start unbound; the
    /// sources of removed tracks are kept in case the track comes back.
    /// Returns the removed tracks (without their sources).
    pub(super) fn sync_tracks(&mut self, wanted: &[Wanted]) -> Vec<LocalTrack> {
        let mut kept = Vec::with_capacity(wanted.len());
        let mut removed = Vec::new();
        for mut t in std::mem::take(&mut self.tracks) {
            let keep = wanted.iter().any(|w| {
                w.track_id == t.track_id && w.stream_id == t.stream_id && w.kind == t.kind
            });
            if keep {
                kept.push(t);
            } else {
                debug!(track = %t.track_id, mid = ?t.mid, "local track removed");
                if let Some(src) = t.source.take() {
                    self.pending_sources.insert(t.track_id.clone(), src);
                }
                removed.push(t);
            }
        }
        self.tracks = kept;
        for w in wanted {
            if let Some(t) = self.tracks.iter_mut().find(|t| t.track_id == w.track_id) {
                t.purpose = w.purpose;
                continue;
            }
            debug!(stream = %w.stream_id, track = %w.track_id, kind = %w.kind, purpose = w.purpose.as_str(), "local track added");
            let mut t = LocalTrack::new(&w.stream_id, &w.track_id, w.kind, w.purpose);
            if let Some(src) = self.pending_sources.remove(&w.track_id)
                && src.kind() == w.kind
            {
                t.source = Some(src);
            }
            if let Some(m) = self.pending_muted.remove(&w.track_id) {
                t.muted = m;
            }
            self.tracks.push(t);
        }
        self.tracks.sort_by_key(|t| {
            wanted
                .iter()
                .position(|w| w.track_id == t.track_id)
                .unwrap_or(usize::MAX)
        });
        self.start_sources();
        removed
    }

    /// Forgets the pending local offer (replaced, or rolled back: then
    /// `report` emits [`PeerEvent::OfferRolledBack`]).
    pub(super) fn rollback_pending(&mut self, report: bool) {
        if self.pending_offer.take().is_some() {
            debug!(report, "pending local offer dropped");
            self.undo_pending_bindings();
            if std::mem::take(&mut self.channel_pending) {
                // The channel goes into the next offer again.
                self.channel_offered = false;
            }
            if report {
                self.emit(PeerEvent::OfferRolledBack);
            }
        }
    }

    /// Unbinds the tracks the pending offer bound, puts back the tracks it
    /// removed (on their m-lines) and restores the directions it changed.
    fn undo_pending_bindings(&mut self) {
        // A track the offer removed is still sent on its m-line as far as
        // the remote knows: without it back, accepting the remote's offer
        // with that track wanted would make it a new track, which may not
        // reuse its old m-line (see `ever_bound`) and would wait unbound
        // for an offer that, with nothing else changed, has nothing to
        // negotiate (renegotiation glare at a focus).
        for mut t in std::mem::take(&mut self.pending_removed) {
            if self.tracks.iter().any(|x| x.track_id == t.track_id) {
                continue;
            }
            if let Some(src) = self.pending_sources.remove(&t.track_id) {
                t.source = Some(src);
                t.next_due = None;
            }
            debug!(track = %t.track_id, mid = ?t.mid, "local track put back");
            self.tracks.push(t);
        }
        for t in &mut self.tracks {
            if t.mid_pending {
                if let Some(mid) = t.mid.take() {
                    // The remote never took this binding up.
                    self.ever_bound.remove(&mid);
                }
                t.mid_pending = false;
                t.awaiting = false;
            }
        }
        let dirs = std::mem::take(&mut self.pending_dirs);
        if !dirs.is_empty() {
            let mut api = self.rtc.sdp_api();
            for (mid, d) in dirs {
                api.set_direction(mid, d);
            }
            // Dropped without apply(): the session is as negotiated.
        }
    }

    /// A binding became effective: start video with a key frame.
    pub(super) fn confirm_bindings(&mut self) {
        let mut ready = Vec::new();
        for t in &mut self.tracks {
            if let Some(mid) = t.mid
                && t.awaiting
            {
                t.awaiting = false;
                t.mid_pending = false;
                if t.kind == TrackKind::Video {
                    t.want_keyframe = true;
                    if let Some(s) = t.source.as_mut() {
                        s.request_keyframe();
                    }
                }
                ready.push(PeerEvent::LocalTrackReady {
                    stream_id: t.stream_id.clone(),
                    track_id: t.track_id.clone(),
                    kind: t.kind,
                    mid,
                });
            }
        }
        for ev in ready {
            self.emit(ev);
        }
    }

    pub(super) fn note_negotiated(&mut self) {
        if self.state == ConnState::New && self.negotiated_at.is_none() {
            self.negotiated_at = Some(self.now);
        }
    }

    /// Rewrites our SDP's msid lines (and directions, for answers) and
    /// remembers its m-sections.
    pub(super) fn finalize_local_sdp(
        &mut self,
        text: &str,
        directions: Option<&HashMap<Mid, Direction>>,
    ) -> String {
        if !self.gather_done {
            self.sdp_while_gathering = true;
        }
        let sections = sdp::parse_sections(text);
        let mut plan = HashMap::new();
        for s in &sections {
            let Some(mid_s) = &s.mid else { continue };
            if section_kind(s).is_none() {
                continue;
            }
            let mid = Mid::from(mid_s.as_str());
            let msid = self
                .tracks
                .iter()
                .find(|t| t.mid == Some(mid))
                .map(|t| (t.stream_id.clone(), t.track_id.clone()));
            let direction = directions.and_then(|d| d.get(&mid).copied());
            plan.insert(mid_s.clone(), LinePlan { msid, direction });
        }
        let out = sdp::rewrite_local(text, &plan);
        self.local_sections = sdp::parse_sections(&out);
        out
    }

    pub(super) fn create_offer(
        &mut self,
        feeds: &[LocalFeed],
        ice_restart: bool,
    ) -> Result<String, MediaError> {
        let wanted = wanted_tracks(feeds)?;
        self.rollback_pending(false);
        let removed = self.sync_tracks(&wanted);
        let still: HashSet<Mid> = self.tracks.iter().filter_map(|t| t.mid).collect();

        let lines: Vec<(Mid, TrackKind)> = self
            .local_sections
            .iter()
            .filter(|s| !s.disabled)
            .filter_map(|s| Some((Mid::from(s.mid.as_deref()?), section_kind(s)?)))
            .collect();
        // Lines we stop sending on: they send, but no track is bound to
        // them any more.
        let mut dir_changes: Vec<(Mid, Direction)> = Vec::new();
        for (mid, _) in &lines {
            if still.contains(mid) {
                continue;
            }
            if let Some(m) = self.rtc.media(*mid) {
                if m.disabled() {
                    continue;
                }
                let nd = match m.direction() {
                    Direction::SendRecv => Direction::RecvOnly,
                    Direction::SendOnly => Direction::Inactive,
                    d => d,
                };
                if nd != m.direction() {
                    dir_changes.push((*mid, nd));
                }
            }
        }

        // Bind new tracks to unused receive-only lines, or add lines.
        let mut taken = still.clone();
        let mut adds: Vec<usize> = Vec::new();
        for (i, t) in self.tracks.iter_mut().enumerate() {
            if t.mid.is_some() {
                continue;
            }
            // A line on which the remote sends simulcast is not reused:
            // the remote (a str0m peer among them) expects a RID on every
            // packet of that line, ours in the other direction would be
            // dropped (a focus would lose the first track it forwards to a
            // simulcast publisher).
            let reuse = lines.iter().find(|(mid, kind)| {
                *kind == t.kind
                    && !taken.contains(mid)
                    && !self.ever_bound.contains(mid)
                    && self.rtc.media(*mid).is_some_and(|m| {
                        !m.disabled()
                            && matches!(m.direction(), Direction::RecvOnly | Direction::Inactive)
                            && !matches!(m.rids_rx(), str0m::media::Rids::Specific(_))
                    })
            });
            match reuse {
                Some((mid, _)) => {
                    let cur = self.rtc.media(*mid).map(|m| m.direction());
                    let nd = if cur == Some(Direction::RecvOnly) {
                        Direction::SendRecv
                    } else {
                        Direction::SendOnly
                    };
                    dir_changes.push((*mid, nd));
                    taken.insert(*mid);
                    self.ever_bound.insert(*mid);
                    t.mid = Some(*mid);
                    // Bound by this offer: undone if it is rolled back.
                    t.mid_pending = true;
                    t.awaiting = true;
                    debug!(track = %t.track_id, %mid, "reusing m-line");
                }
                None => adds.push(i),
            }
        }

        let mut recv_only = Vec::new();
        for (kind, want) in [
            (TrackKind::Audio, self.config.receive_audio),
            (TrackKind::Video, self.config.receive_video),
        ] {
            let has =
                lines.iter().any(|(_, k)| *k == kind) || self.tracks.iter().any(|t| t.kind == kind);
            if want && !has {
                recv_only.push(kind);
            }
        }

        let with_channel = self.wants_channel_in_offer();
        // str0m changes a direction in the session at once (not when the
        // answer comes): remember the old ones for a rollback.
        let old_dirs: Vec<(Mid, Direction)> = dir_changes
            .iter()
            .filter_map(|(mid, _)| Some((*mid, self.rtc.media(*mid)?.direction())))
            .collect();
        let sim_offers: HashMap<usize, str0m::media::Simulcast> = adds
            .iter()
            .filter_map(|&i| {
                let t = self.tracks.get(i)?;
                Some((i, self.simulcast_offer(t.kind, t.purpose)?))
            })
            .collect();
        let mut api = self.rtc.sdp_api();
        if with_channel {
            let id = api.add_channel_with_config(super::channel::channel_config());
            debug!(?id, "data channel in the offer");
        }
        for (mid, d) in &dir_changes {
            api.set_direction(*mid, *d);
        }
        let mut new_mids = Vec::new();
        for &i in &adds {
            if let Some(t) = self.tracks.get(i) {
                let simulcast = sim_offers.get(&i).cloned();
                let mid = api.add_media(
                    to_media_kind(t.kind),
                    Direction::SendRecv,
                    Some(t.stream_id.clone()),
                    Some(t.track_id.clone()),
                    simulcast,
                );
                new_mids.push((i, mid));
            }
        }
        for kind in recv_only {
            api.add_media(to_media_kind(kind), Direction::RecvOnly, None, None, None);
        }
        if ice_restart {
            api.ice_restart(true);
        }
        let applied = api.apply();
        for (i, mid) in new_mids {
            if let Some(t) = self.tracks.get_mut(i) {
                t.offered_rids = sim_offers
                    .get(&i)
                    .map(|s| s.send.iter().map(|l| l.rid).collect())
                    .unwrap_or_default();
                t.mid = Some(mid);
                t.mid_pending = true;
                t.awaiting = true;
                self.ever_bound.insert(mid);
            }
        }
        self.drain().map_err(rtc_err)?;
        let Some((offer, pending)) = applied else {
            return Err(MediaError::NothingToNegotiate);
        };
        self.pending_offer = Some(pending);
        self.pending_dirs = old_dirs;
        self.pending_removed = removed;
        if with_channel {
            self.channel_offered = true;
            self.channel_pending = true;
        }
        if ice_restart && self.state == ConnState::Failed {
            self.negotiated_at = Some(self.now);
        }
        let text = self.finalize_local_sdp(&offer.to_sdp_string(), None);
        debug!(restart = ice_restart, "created offer");
        trace!(sdp = %text, "local offer");
        Ok(text)
    }

    pub(super) fn accept_offer(
        &mut self,
        text: &str,
        feeds: &[LocalFeed],
    ) -> Result<String, MediaError> {
        let wanted = wanted_tracks(feeds)?;
        let offer =
            SdpOffer::from_sdp_string(text).map_err(|e| MediaError::RemoteSdp(e.to_string()))?;
        let remote_sections = sdp::parse_sections(text);
        trace!(sdp = %text, "remote offer");
        self.rollback_pending(true);
        if remote_sections
            .iter()
            .any(|s| s.media == "application" && !s.disabled)
        {
            // The remote negotiates SCTP (and opens the channel, if it has
            // not already).
            self.channel_offered = true;
        }
        let answer = self.rtc.sdp_api().accept_offer(offer);
        self.drain().map_err(rtc_err)?;
        let answer = answer.map_err(|e| MediaError::RemoteSdp(e.to_string()))?;
        // (Removed tracks' sources wait in `pending_sources`.)
        let _removed = self.sync_tracks(&wanted);

        // The remote's m-lines: kind, its direction, rejected.
        let remote_lines: Vec<(Mid, TrackKind, Direction)> = remote_sections
            .iter()
            .filter(|s| !s.disabled)
            .filter_map(|s| Some((Mid::from(s.mid.as_deref()?), section_kind(s)?, s.direction)))
            .collect();
        let can_send = |mid: Mid, kind: TrackKind| {
            remote_lines.iter().any(|(m, k, d)| {
                *m == mid && *k == kind && matches!(d, Direction::SendRecv | Direction::RecvOnly)
            })
        };
        for t in &mut self.tracks {
            if let Some(mid) = t.mid
                && (!can_send(mid, t.kind) || self.rtc.media(mid).is_none())
            {
                debug!(track = %t.track_id, %mid, "m-line no longer usable for sending");
                t.mid = None;
                t.mid_pending = false;
                t.awaiting = false;
            }
        }
        let mut taken: HashSet<Mid> = self.tracks.iter().filter_map(|t| t.mid).collect();
        for t in &mut self.tracks {
            if t.mid.is_some() {
                continue;
            }
            let free = remote_lines.iter().find(|(mid, kind, _)| {
                *kind == t.kind
                    && can_send(*mid, *kind)
                    && !taken.contains(mid)
                    && !self.ever_bound.contains(mid)
                    && self.rtc.media(*mid).is_some()
            });
            if let Some((mid, _, _)) = free {
                debug!(track = %t.track_id, %mid, "sending on offered m-line");
                taken.insert(*mid);
                self.ever_bound.insert(*mid);
                t.mid = Some(*mid);
                t.awaiting = true;
            }
        }
        let desired: HashMap<Mid, Direction> = remote_lines
            .iter()
            .map(|(mid, _, d)| (*mid, local_direction(*d, taken.contains(mid))))
            .collect();
        {
            let mut api = self.rtc.sdp_api();
            for (mid, d) in &desired {
                api.set_direction(*mid, *d);
            }
            // Dropped without apply(): the directions above are already in
            // the session and match the answer we send.
        }
        self.drain().map_err(rtc_err)?;
        self.confirm_bindings();
        self.simulcast_fallback();
        let out = self.finalize_local_sdp(&answer.to_sdp_string(), Some(&desired));
        self.update_remote_tracks(&remote_sections);
        self.drain().map_err(rtc_err)?;
        self.note_negotiated();
        if self.tracks.iter().any(|t| t.mid.is_none()) {
            debug!("some local tracks need a new offer");
            self.emit(PeerEvent::NegotiationNeeded);
        }
        self.start_sources();
        debug!("accepted offer");
        trace!(sdp = %out, "local answer");
        Ok(out)
    }

    pub(super) fn apply_answer(&mut self, text: &str) -> Result<(), MediaError> {
        let Some(pending) = self.pending_offer.take() else {
            return Err(MediaError::NoPendingOffer);
        };
        let answer = match SdpAnswer::from_sdp_string(text) {
            Ok(a) => a,
            Err(e) => {
                self.pending_offer = Some(pending);
                return Err(MediaError::RemoteSdp(e.to_string()));
            }
        };
        trace!(sdp = %text, "remote answer");
        let remote_sections = sdp::parse_sections(text);
        let r = self.rtc.sdp_api().accept_answer(pending, answer);
        self.drain().map_err(rtc_err)?;
        if let Err(e) = r {
            self.undo_pending_bindings();
            return Err(MediaError::RemoteSdp(e.to_string()));
        }
        self.channel_pending = false;
        self.pending_dirs.clear();
        self.pending_removed.clear();
        let mut renegotiate = false;
        for t in &mut self.tracks {
            if let Some(mid) = t.mid
                && self.rtc.media(mid).is_none_or(|m| m.disabled())
            {
                debug!(track = %t.track_id, %mid, "remote rejected the m-line");
                t.mid = None;
                t.awaiting = false;
                t.mid_pending = false;
                renegotiate = true;
            }
        }
        self.confirm_bindings();
        self.simulcast_fallback();
        self.update_remote_tracks(&remote_sections);
        self.drain().map_err(rtc_err)?;
        self.note_negotiated();
        if renegotiate {
            self.emit(PeerEvent::NegotiationNeeded);
        }
        self.start_sources();
        debug!("applied answer");
        Ok(())
    }

    /// Diffs the remote tracks against a remote SDP.
    pub(super) fn update_remote_tracks(&mut self, sections: &[Section]) {
        let mut active: Vec<(Mid, String, String, TrackKind)> = Vec::new();
        for s in sections {
            let (Some(kind), Some(mid_s)) = (section_kind(s), &s.mid) else {
                continue;
            };
            if s.disabled || !matches!(s.direction, Direction::SendRecv | Direction::SendOnly) {
                continue;
            }
            let mid = Mid::from(mid_s.as_str());
            let (stream, track) = match &s.msid {
                Some((st, tr)) => (
                    st.clone(),
                    if tr.is_empty() {
                        format!("mid-{mid}")
                    } else {
                        tr.clone()
                    },
                ),
                None => ("-".to_string(), format!("mid-{mid}")),
            };
            active.push((mid, stream, track, kind));
        }
        let gone: Vec<Mid> = self
            .remote
            .iter()
            .filter(|(mid, r)| {
                !active.iter().any(|(m, s, t, k)| {
                    m == *mid
                        && s.as_str() == &*r.stream_id
                        && t.as_str() == &*r.track_id
                        && *k == r.kind
                })
            })
            .map(|(m, _)| *m)
            .collect();
        for mid in gone {
            if let Some(r) = self.remote.remove(&mid) {
                info!(stream = %r.stream_id, track = %r.track_id, %mid, "remote track removed");
                self.ended_remote.push(r.stats(false));
                self.emit(PeerEvent::RemoteTrackRemoved {
                    stream_id: r.stream_id.to_string(),
                    track_id: r.track_id.to_string(),
                    kind: r.kind,
                    mid: mid.to_string(),
                });
            }
        }
        let connected = matches!(self.state, ConnState::Connected | ConnState::Disconnected);
        for (mid, stream, track, kind) in active {
            if self.remote.contains_key(&mid) {
                continue;
            }
            info!(%stream, %track, %kind, %mid, "remote track");
            self.remote.insert(
                mid,
                RemoteTrack {
                    stream_id: Arc::from(stream.as_str()),
                    track_id: Arc::from(track.as_str()),
                    kind,
                    mid,
                    received: Counters::default(),
                    need_keyframe: kind == TrackKind::Video,
                    last_pli: None,
                },
            );
            self.emit(PeerEvent::RemoteTrack {
                stream_id: stream,
                track_id: track,
                kind,
                mid: mid.to_string(),
            });
            if kind == TrackKind::Video && connected {
                self.send_pli(mid);
            }
        }
    }

    pub(super) fn add_remote_candidate(&mut self, cand: &str) -> Result<(), MediaError> {
        let s = cand.trim();
        let s = s.strip_prefix("a=").unwrap_or(s);
        if s.is_empty() || s == "end-of-candidates" {
            debug!("remote end of candidates");
            return Ok(());
        }
        let owned;
        let s = if s.starts_with("candidate:") {
            s
        } else {
            owned = format!("candidate:{s}");
            owned.as_str()
        };
        let c = match Candidate::from_sdp_string(s) {
            Ok(c) => c,
            // mDNS host names (browsers hide local IPs this way) cannot be
            // resolved here; the remote's checks to our candidates still
            // reveal its address as a peer-reflexive candidate.
            Err(_)
                if s.split_whitespace()
                    .nth(4)
                    .is_some_and(|a| a.ends_with(".local")) =>
            {
                debug!(candidate = s, "ignoring mDNS candidate");
                return Ok(());
            }
            Err(e) => {
                return Err(MediaError::BadCandidate {
                    candidate: cand.to_string(),
                    reason: e.to_string(),
                });
            }
        };
        debug!(candidate = %c, "adding remote candidate");
        self.rtc.add_remote_candidate(c);
        self.drain().map_err(rtc_err)
    }

    pub(super) fn stats(&self) -> PeerStats {
        let mut remote: Vec<RemoteTrackStats> = self.ended_remote.clone();
        let mut current: Vec<&RemoteTrack> = self.remote.values().collect();
        current.sort_by_key(|a| a.mid);
        remote.extend(current.into_iter().map(|r| r.stats(true)));
        // The newest receiver-reported loss: the highest of the streams
        // whose reports came with it.
        let newest_at = self
            .egress_nacks
            .values()
            .filter_map(|v| v.loss.map(|(_, at)| at))
            .max();
        let newest_loss = newest_at.map(|at| {
            let worst = self
                .egress_nacks
                .values()
                .filter_map(|v| v.loss.filter(|(_, t)| *t == at).map(|(l, _)| l))
                .fold(0.0f32, f32::max);
            ((worst.clamp(0.0, 1.0) * 1000.0).round() as u16, at)
        });
        PeerStats {
            connected: self.rtc.is_connected(),
            local: self
                .tracks
                .iter()
                .map(|t| LocalTrackStats {
                    stream_id: t.stream_id.clone(),
                    track_id: t.track_id.clone(),
                    kind: t.kind,
                    mid: t.mid.map(|m| m.to_string()),
                    muted: t.muted,
                    has_source: t.source.is_some(),
                    sent: t.sent,
                })
                .collect(),
            remote,
            frames_dropped: self.frames_dropped,
            frames_unmatched: self.frames_unmatched,
            selected_pair: self.selected.map(|(local, remote)| SelectedPair {
                local,
                remote,
                // Filled in by the set, which holds the relays.
                relayed: false,
            }),
            relays: Vec::new(),
            gathering_time: self.gathering_time,
            rtp_write_dropped: self.rtp_write_dropped,
            nacks_received: self.egress_nacks.values().map(|v| v.nacks).sum(),
            rtp_resent: self.egress_nacks.values().map(|v| v.resent).sum(),
            egress_loss_permille: newest_loss.map(|(l, _)| l),
            egress_loss_at: newest_loss.map(|(_, at)| at),
            channel_messages_dropped: self.channel_dropped,
        }
    }

    pub(super) fn finish_all_sinks(&mut self) -> Vec<SinkError> {
        let mut errors = Vec::new();
        for (_, mut sink) in self.sinks.drain(..) {
            if let Err(e) = sink.finish() {
                warn!(error = %e, "finishing sink failed");
                errors.push(e);
            }
        }
        errors
    }

    pub(super) fn do_close(&mut self) {
        if self.finished {
            return;
        }
        info!("closing media peer");
        if let Err(e) = self.rtc.close() {
            debug!(error = %e, "close");
        }
        if let Err(e) = self.drain() {
            debug!(error = %e, "drain on close");
        }
        self.finish_all_sinks();
        self.set_state(ConnState::Closed);
        self.finished = true;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
