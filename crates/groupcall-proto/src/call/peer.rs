//! The per-peer call state machine (MSC2746 with the MSC3401 group
//! fields): one [`Peer`] per remote device and `call_id`, driven by
//! signalling from the admission step and by media results.

use tracing::{debug, info, warn};

use crate::ids::DeviceKey;
use crate::signalling::{
    Answer, Body, Candidate, Candidates, Capabilities, CommonFields, Hangup, Invite, Message,
    Negotiate, SdpStreamMetadata, SelectAnswer, SessionDescription, reason,
};
use crate::types::*;

use super::{GroupCall, MAX_PENDING_REMOTE_CANDIDATES};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    Outbound,
    Inbound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Outbound: waiting for the media layer's offer.
    CreatingOffer,
    /// Outbound: invite sent, waiting for the answer.
    InviteSent,
    /// Inbound: waiting for the media layer's answer.
    CreatingAnswer,
    /// Descriptions exchanged, waiting for media.
    Connecting,
    /// Media connected.
    Connected,
    /// Lost connectivity after being connected; ICE restart under way.
    Restarting,
}

#[derive(Debug)]
pub(super) struct Peer {
    pub(super) handle: PeerHandle,
    pub(super) call_id: String,
    pub(super) direction: Direction,
    pub(super) remote: DeviceKey,
    pub(super) remote_session: String,
    pub(super) remote_party: Option<String>,
    pub(super) phase: Phase,
    /// When the current phase started (drives its timeout).
    pub(super) phase_since: u64,
    pub(super) send_seq: u64,
    /// Our invite/answer has been sent: later candidates can be trickled.
    pub(super) signalled_at: Option<u64>,
    pub(super) local_candidates: Vec<Candidate>,
    pub(super) candidates_flush_at: Option<u64>,
    pub(super) remote_description_set: bool,
    pub(super) remote_candidates: Vec<Candidate>,
    /// A local renegotiation offer is in flight (until its answer is applied).
    pub(super) local_offer_pending: bool,
    /// Our renegotiation offer on the wire: (message, sent at, times resent).
    /// Resent every `retry_interval_ms` until answered; a lost offer would
    /// otherwise stall renegotiation for good.
    pub(super) offer_in_flight: Option<(Negotiate, u64, u32)>,
    /// A remote renegotiation offer is being answered by the media layer.
    pub(super) answering_remote_offer: bool,
    /// Renegotiate once the current exchange is done.
    pub(super) renegotiate_needed: bool,
    pub(super) ice_restart_next: bool,
    pub(super) remote_feeds: SdpStreamMetadata,
    /// The device's entry vanished from the member state at this time; the
    /// peer is kept for a grace period in case it comes back (see
    /// [`Config::orphan_grace_ms`]).
    pub(super) orphaned_since: Option<u64>,
    /// Our invite (caller) or answer (callee) as sent, with its `seq`: sent
    /// again unchanged when it may have been lost. The receiver's reorder
    /// buffer drops a copy it already has.
    pub(super) kept: Option<(Body, u64)>,
    /// Caller, invite unanswered: when the invite is sent again next ...
    pub(super) resend_at: Option<u64>,
    /// ... and how many times it was sent again so far.
    pub(super) resends: u32,
    /// When we last sent the kept message.
    pub(super) kept_sent_at: u64,
    /// This call's invite lifetime: an unanswered invite is hung up after it.
    pub(super) lifetime: u64,
    /// When the peer was made (our invite was placed, or theirs arrived).
    pub(super) opened_at: u64,
}

impl Peer {
    /// A new peer: the caller waits for the media layer's offer, the callee
    /// for its answer.
    pub(super) fn new(
        handle: PeerHandle,
        call_id: String,
        direction: Direction,
        remote: DeviceKey,
        remote_session: String,
        now: u64,
        lifetime: u64,
    ) -> Self {
        Peer {
            handle,
            call_id,
            direction,
            remote,
            remote_session,
            remote_party: None,
            phase: match direction {
                Direction::Outbound => Phase::CreatingOffer,
                Direction::Inbound => Phase::CreatingAnswer,
            },
            phase_since: now,
            send_seq: 0,
            signalled_at: None,
            local_candidates: Vec::new(),
            candidates_flush_at: None,
            remote_description_set: false,
            remote_candidates: Vec::new(),
            local_offer_pending: false,
            offer_in_flight: None,
            answering_remote_offer: false,
            renegotiate_needed: false,
            ice_restart_next: false,
            remote_feeds: SdpStreamMetadata::new(),
            orphaned_since: None,
            kept: None,
            resend_at: None,
            resends: 0,
            kept_sent_at: now,
            lifetime,
            opened_at: now,
        }
    }

    /// When the current phase times out, if it can: an unanswered invite
    /// after its lifetime; a callee whose answer the caller has not
    /// confirmed waits as long as the caller's invite is open (bounded by
    /// `max_backoff_ms`), since the caller may be sending it again (our
    /// answer lost); setup and ICE restart after `connect_timeout_ms`.
    pub(super) fn deadline(&self, cfg: &Config) -> Option<u64> {
        match self.phase {
            Phase::InviteSent => Some(self.phase_since.saturating_add(self.lifetime)),
            Phase::Connecting if self.direction == Direction::Inbound && self.kept.is_some() => {
                Some(
                    (self.phase_since + cfg.connect_timeout_ms).max(
                        self.opened_at
                            .saturating_add(self.lifetime.min(cfg.max_backoff_ms)),
                    ),
                )
            }
            Phase::CreatingOffer
            | Phase::CreatingAnswer
            | Phase::Connecting
            | Phase::Restarting => Some(self.phase_since + cfg.connect_timeout_ms),
            Phase::Connected => None,
        }
    }

    /// Our invite or answer went out at `now`: candidates found later are
    /// trickled after `delay` (none when gathering was complete, since the
    /// SDP carries them all).
    pub(super) fn mark_signalled(&mut self, now: u64, gathering_complete: bool, delay: u64) {
        self.signalled_at = Some(now);
        if gathering_complete {
            self.candidates_flush_at = None;
        } else if !self.local_candidates.is_empty() || self.candidates_flush_at.is_none() {
            self.candidates_flush_at = Some(now + delay);
        }
    }

    pub(super) fn polite(&self) -> bool {
        self.direction == Direction::Inbound
    }
    pub(super) fn stable(&self) -> bool {
        matches!(
            self.phase,
            Phase::Connecting | Phase::Connected | Phase::Restarting
        ) && !self.local_offer_pending
            && !self.answering_remote_offer
    }
}

impl GroupCall {
    pub(super) fn process(
        &mut self,
        now: u64,
        key: &DeviceKey,
        msg: Message,
    ) -> Result<(), Ignored> {
        let call_id = msg.common.call_id.clone();
        if let Body::Invite(inv) = msg.body {
            return self.on_invite(now, key, msg.common, inv);
        }
        let focus = self.is_focus(key);
        let Some(peer) = self.peers.get_mut(key).filter(|p| p.call_id == call_id) else {
            return Err(Ignored::UnknownCall(call_id));
        };
        if let Some(party) = &peer.remote_party
            && !msg.common.party_id.is_empty()
            && *party != msg.common.party_id
        {
            return Err(Ignored::Unexpected(format!(
                "party {} is not our peer's",
                msg.common.party_id
            )));
        }
        match msg.body {
            Body::Invite(_) => Ok(()),
            Body::Answer(a) => {
                if peer.phase != Phase::InviteSent {
                    return Err(Ignored::Unexpected(
                        "answer while not waiting for one".into(),
                    ));
                }
                if !msg.common.party_id.is_empty() {
                    peer.remote_party = Some(msg.common.party_id.clone());
                }
                // A focus has no member entry: its session is the one its
                // answer names (docs/protocol.md, "The focus").
                if focus && let Some(s) = &msg.common.sender_session_id {
                    peer.remote_session = s.clone();
                }
                peer.phase = Phase::Connecting;
                peer.phase_since = now;
                peer.remote_description_set = true;
                peer.kept = None;
                peer.resend_at = None;
                let handle = peer.handle;
                let cands = std::mem::take(&mut peer.remote_candidates);
                self.out.push_back(Output::Media(MediaRequest::ApplyAnswer {
                    peer: handle,
                    sdp: a.answer.sdp,
                }));
                if !cands.is_empty() {
                    self.out
                        .push_back(Output::Media(MediaRequest::AddRemoteCandidates {
                            peer: handle,
                            candidates: cands,
                        }));
                }
                self.send(
                    key,
                    Body::SelectAnswer(SelectAnswer {
                        selected_party_id: msg.common.party_id,
                        extra: Default::default(),
                    }),
                );
                // A focus's streams are its publishers' (its data channel
                // says whose), not the focus's own feeds.
                if let Some(meta) = a.sdp_stream_metadata.filter(|_| !focus) {
                    self.update_remote_feeds(key, meta, true);
                }
                self.after_stable(now, key);
                Ok(())
            }
            Body::Candidates(c) => {
                if peer.remote_description_set {
                    let handle = peer.handle;
                    self.out
                        .push_back(Output::Media(MediaRequest::AddRemoteCandidates {
                            peer: handle,
                            candidates: c.candidates,
                        }));
                } else if peer.remote_candidates.len() + c.candidates.len()
                    <= MAX_PENDING_REMOTE_CANDIDATES
                {
                    peer.remote_candidates.extend(c.candidates);
                } else {
                    return Err(Ignored::Overflow);
                }
                Ok(())
            }
            Body::SelectAnswer(s) => {
                if peer.direction != Direction::Inbound {
                    return Err(Ignored::Unexpected("select_answer to the caller".into()));
                }
                if s.selected_party_id != self.me.device_id {
                    info!(device = %key, "call answered elsewhere");
                    self.close_peer(key, false, "answered_elsewhere", false);
                } else {
                    // The caller has our answer: no copy of it is needed.
                    peer.kept = None;
                }
                Ok(())
            }
            Body::Negotiate(n) => self.on_negotiate(now, key, n),
            Body::Hangup(h) | Body::Reject(h) => {
                let why = h.reason.unwrap_or_else(|| reason::USER_HANGUP.into());
                info!(device = %key, reason = %why, "remote hung up");
                self.close_peer(key, false, &why, false);
                self.mesh(now);
                Ok(())
            }
            Body::SdpStreamMetadataChanged(m) => {
                self.update_remote_feeds(key, m.sdp_stream_metadata, false);
                Ok(())
            }
        }
    }

    /// An invite whose `seq` was seen before on its call: the caller sent it
    /// again because it heard nothing back. If we answered, our answer may
    /// have been lost: send it again (same `seq`). If we never took the
    /// invite (its first copy was lost and a `seq` gap skipped past it),
    /// take it now.
    pub(super) fn on_repeated_invite(
        &mut self,
        now: u64,
        key: &DeviceKey,
        msg: Message,
    ) -> Result<Accepted, Ignored> {
        let call_id = msg.common.call_id.clone();
        match self.peers.get(key) {
            Some(p) if p.call_id == call_id => {
                if p.direction == Direction::Inbound
                    && p.phase == Phase::Connecting
                    && p.kept.is_some()
                    && now >= p.kept_sent_at.saturating_add(1000)
                {
                    self.resend_kept(now, key);
                    return Ok(Accepted::Processed);
                }
                Err(Ignored::Duplicate)
            }
            _ if self.ended_calls.contains_key(&call_id) => Err(Ignored::Duplicate),
            _ => {
                let Body::Invite(inv) = msg.body else {
                    return Err(Ignored::Duplicate);
                };
                self.on_invite(now, key, msg.common, inv)
                    .map(|()| Accepted::Processed)
            }
        }
    }

    pub(super) fn on_invite(
        &mut self,
        now: u64,
        key: &DeviceKey,
        common: CommonFields,
        inv: Invite,
    ) -> Result<(), Ignored> {
        if inv.invitee.as_ref().is_some_and(|i| *i != self.me.user_id) {
            return Err(Ignored::NotForUs);
        }
        if self.ended_calls.contains_key(&common.call_id) {
            return Err(Ignored::UnknownCall(common.call_id));
        }
        if let Some(existing) = self.peers.get(key) {
            if existing.call_id == common.call_id {
                return Err(Ignored::Duplicate);
            }
            let unanswered_outbound = existing.direction == Direction::Outbound
                && matches!(existing.phase, Phase::CreatingOffer | Phase::InviteSent);
            if unanswered_outbound && existing.call_id < common.call_id {
                // Glare, and our call wins (smaller call_id, as the
                // reference): refuse theirs; they will answer ours.
                info!(device = %key, "glare: keeping our call");
                self.reject_foreign(key, &common, reason::REPLACED);
                return Ok(());
            }
            let why = reason::REPLACED;
            if unanswered_outbound {
                info!(device = %key, "glare: taking their call");
            }
            self.close_peer(key, true, why, false);
        }
        let handle = self.new_peer(
            now,
            common.call_id.clone(),
            Direction::Inbound,
            key.clone(),
            common.sender_session_id.clone().unwrap_or_default(),
            inv.lifetime,
        );
        if let Some(p) = self.peers.get_mut(key) {
            if !common.party_id.is_empty() {
                p.remote_party = Some(common.party_id.clone());
            }
            p.remote_description_set = true;
        }
        let feeds = self.local_feeds();
        self.out.push_back(Output::Media(MediaRequest::AcceptOffer {
            peer: handle,
            remote: key.clone(),
            sdp: inv.offer.sdp,
            feeds,
        }));
        if let Some(meta) = inv.sdp_stream_metadata {
            self.update_remote_feeds(key, meta, true);
        }
        Ok(())
    }

    /// Sends a hangup on a call we have no peer for (glare loser).
    pub(super) fn reject_foreign(&mut self, key: &DeviceKey, common: &CommonFields, why: &str) {
        self.ended_calls.insert(common.call_id.clone(), self.now);
        let body = Body::Hangup(Hangup {
            reason: Some(why.into()),
            extra: Default::default(),
        });
        // Their call, our first message on it: seq 0.
        self.queue_message(
            key,
            common.call_id.clone(),
            common.sender_session_id.clone().unwrap_or_default(),
            0,
            body,
        );
    }

    pub(super) fn on_negotiate(
        &mut self,
        now: u64,
        key: &DeviceKey,
        n: Negotiate,
    ) -> Result<(), Ignored> {
        let Some(peer) = self.peers.get_mut(key) else {
            return Ok(());
        };
        if n.description.is_offer() {
            let collision = peer.local_offer_pending
                || !matches!(
                    peer.phase,
                    Phase::Connecting | Phase::Connected | Phase::Restarting
                );
            if collision && !peer.polite() {
                return Err(Ignored::Unexpected(
                    "negotiate offer collides with ours (we are impolite)".into(),
                ));
            }
            peer.offer_in_flight = None;
            if peer.local_offer_pending {
                // Polite: roll back ours (the media layer does on AcceptOffer)
                // and offer again afterwards.
                peer.local_offer_pending = false;
                peer.renegotiate_needed = true;
            }
            peer.answering_remote_offer = true;
            peer.remote_description_set = true;
            let handle = peer.handle;
            let feeds = self.local_feeds();
            self.out.push_back(Output::Media(MediaRequest::AcceptOffer {
                peer: handle,
                remote: key.clone(),
                sdp: n.description.sdp,
                feeds,
            }));
        } else {
            if !peer.local_offer_pending {
                return Err(Ignored::Unexpected(
                    "negotiate answer without an offer".into(),
                ));
            }
            peer.local_offer_pending = false;
            peer.offer_in_flight = None;
            let handle = peer.handle;
            self.out.push_back(Output::Media(MediaRequest::ApplyAnswer {
                peer: handle,
                sdp: n.description.sdp,
            }));
        }
        if let Some(meta) = n.sdp_stream_metadata {
            self.update_remote_feeds(key, meta, true);
        }
        self.after_stable(now, key);
        Ok(())
    }

    pub(super) fn update_remote_feeds(
        &mut self,
        key: &DeviceKey,
        meta: SdpStreamMetadata,
        full: bool,
    ) {
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        let old = std::mem::take(&mut peer.remote_feeds);
        let mut events = Vec::new();
        let mut new = if full {
            SdpStreamMetadata::new()
        } else {
            old.clone()
        };
        for (id, m) in meta {
            match old.get(&id) {
                None => events.push(CallEvent::FeedAdded {
                    device: key.clone(),
                    stream_id: id.clone(),
                    purpose: m.purpose.clone(),
                    audio_muted: m.audio_muted,
                    video_muted: m.video_muted,
                }),
                Some(o)
                    if o.audio_muted != m.audio_muted
                        || o.video_muted != m.video_muted
                        || o.purpose != m.purpose =>
                {
                    events.push(CallEvent::FeedChanged {
                        device: key.clone(),
                        stream_id: id.clone(),
                        purpose: m.purpose.clone(),
                        audio_muted: m.audio_muted,
                        video_muted: m.video_muted,
                    })
                }
                Some(_) => {}
            }
            new.insert(id, m);
        }
        if full {
            for id in old.keys().filter(|k| !new.contains_key(*k)) {
                events.push(CallEvent::FeedRemoved {
                    device: key.clone(),
                    stream_id: id.clone(),
                });
            }
        }
        peer.remote_feeds = new;
        for e in events {
            self.event(e);
        }
    }

    // ------------------------------------------------------------------
    // Media results

    /// A result from the media layer.
    pub fn handle_media(&mut self, now: impl Into<Now>, ev: MediaEvent) {
        let now = self.clock(now.into());
        self.media(now, ev);
        self.flush();
    }

    pub(super) fn device_of(&self, handle: PeerHandle) -> Option<DeviceKey> {
        self.peers
            .values()
            .find(|p| p.handle == handle)
            .map(|p| p.remote.clone())
    }

    pub(super) fn media(&mut self, now: u64, ev: MediaEvent) {
        let handle = match &ev {
            MediaEvent::OfferCreated { peer, .. }
            | MediaEvent::AnswerCreated { peer, .. }
            | MediaEvent::LocalCandidates { peer, .. }
            | MediaEvent::State { peer, .. }
            | MediaEvent::Error { peer, .. }
            | MediaEvent::ChannelOpen { peer }
            | MediaEvent::ChannelMessage { peer, .. }
            | MediaEvent::ChannelClosed { peer } => *peer,
        };
        let Some(key) = self.device_of(handle) else {
            debug!(?handle, "media event for a closed peer");
            return;
        };
        let Some(j) = &self.joined else { return };
        let meta = j.metadata();
        let Some(peer) = self.peers.get_mut(&key) else {
            return;
        };
        match ev {
            MediaEvent::OfferCreated {
                sdp,
                gathering_complete,
                ..
            } => {
                if peer.phase == Phase::CreatingOffer {
                    peer.phase = Phase::InviteSent;
                    peer.phase_since = now;
                    peer.mark_signalled(
                        now,
                        gathering_complete,
                        self.cfg.caller_candidate_delay_ms,
                    );
                    let invite = Invite {
                        lifetime: peer.lifetime,
                        offer: SessionDescription::offer(sdp),
                        invitee: Some(key.user_id.clone()),
                        capabilities: Some(Capabilities::default()),
                        sdp_stream_metadata: Some(meta),
                        intent: self
                            .room
                            .call(&j.call_id)
                            .and_then(|c| c.content.intent.clone()),
                        extra: Default::default(),
                    };
                    peer.resend_at = Some(now + self.cfg.retry_interval_ms);
                    self.send_kept(now, &key, Body::Invite(invite));
                } else if peer.local_offer_pending {
                    peer.mark_signalled(
                        now,
                        gathering_complete,
                        self.cfg.caller_candidate_delay_ms,
                    );
                    let n = Negotiate {
                        description: SessionDescription::offer(sdp),
                        lifetime: Some(self.cfg.invite_lifetime_ms),
                        sdp_stream_metadata: Some(meta),
                        extra: Default::default(),
                    };
                    peer.offer_in_flight = Some((n.clone(), now, 0));
                    self.send(&key, Body::Negotiate(n));
                } else {
                    debug!(device = %key, "unexpected offer from the media layer (rolled back?)");
                }
            }
            MediaEvent::AnswerCreated {
                sdp,
                gathering_complete,
                ..
            } => {
                if peer.phase == Phase::CreatingAnswer {
                    peer.phase = Phase::Connecting;
                    peer.phase_since = now;
                    peer.mark_signalled(
                        now,
                        gathering_complete,
                        self.cfg.callee_candidate_delay_ms,
                    );
                    let answer = Answer {
                        answer: SessionDescription::answer(sdp),
                        capabilities: Some(Capabilities::default()),
                        sdp_stream_metadata: Some(meta),
                        extra: Default::default(),
                    };
                    self.send_kept(now, &key, Body::Answer(answer));
                    self.after_stable(now, &key);
                } else if peer.answering_remote_offer {
                    peer.answering_remote_offer = false;
                    peer.mark_signalled(
                        now,
                        gathering_complete,
                        self.cfg.callee_candidate_delay_ms,
                    );
                    let n = Negotiate {
                        description: SessionDescription::answer(sdp),
                        lifetime: None,
                        sdp_stream_metadata: Some(meta),
                        extra: Default::default(),
                    };
                    self.send(&key, Body::Negotiate(n));
                    self.after_stable(now, &key);
                } else {
                    debug!(device = %key, "unexpected answer from the media layer");
                }
            }
            MediaEvent::LocalCandidates { candidates, .. } => {
                let end = candidates.iter().any(Candidate::is_end);
                peer.local_candidates.extend(candidates);
                if end && peer.signalled_at.is_some() {
                    peer.candidates_flush_at = Some(now);
                }
                self.flush_candidates(now, &key);
            }
            MediaEvent::State { state, .. } => self.on_media_state(now, &key, state),
            MediaEvent::Error { message, .. } => {
                warn!(device = %key, "media error: {message}");
                self.close_peer(&key, true, reason::UNKNOWN_ERROR, true);
                self.mesh(now);
            }
            MediaEvent::ChannelOpen { .. } => self.focus_channel_open(now, &key),
            MediaEvent::ChannelMessage { text, .. } => self.focus_channel_message(now, &key, &text),
            MediaEvent::ChannelClosed { .. } => self.focus_channel_closed(now, &key),
        }
    }

    pub(super) fn flush_candidates(&mut self, now: u64, key: &DeviceKey) {
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        let due = peer.signalled_at.is_some() && peer.candidates_flush_at.is_some_and(|t| now >= t);
        if !due {
            return;
        }
        peer.candidates_flush_at = None;
        if peer.local_candidates.is_empty() {
            return;
        }
        let candidates = std::mem::take(&mut peer.local_candidates);
        self.send(
            key,
            Body::Candidates(Candidates {
                candidates,
                extra: Default::default(),
            }),
        );
    }

    pub(super) fn on_media_state(&mut self, now: u64, key: &DeviceKey, state: MediaState) {
        if self.give_up_unreachable_focus(now, key, &state) {
            return;
        }
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        let (handle, call_id) = (peer.handle, peer.call_id.clone());
        match state {
            MediaState::Connecting | MediaState::Disconnected => {}
            MediaState::Connected => {
                if peer.phase != Phase::Connected {
                    peer.phase = Phase::Connected;
                    peer.phase_since = now;
                    peer.kept = None;
                    peer.resend_at = None;
                    if let Some(r) = self.retry.get_mut(key) {
                        r.calls_placed = 0;
                        r.reported = false;
                    }
                    if self.is_focus(key)
                        && !self.focus_link.draining
                        && std::mem::take(&mut self.focus_down)
                    {
                        info!(device = %key, "our focus is back");
                        self.leave_mesh_for_focus();
                        // `m.foci.active` names it again.
                        self.publish_membership(now);
                    }
                    self.event(CallEvent::PeerState {
                        device: key.clone(),
                        peer: handle,
                        call_id,
                        status: PeerStatus::Connected,
                    });
                    // A mesh call while our focus drains: maybe the last.
                    self.follow_focus_drain();
                }
            }
            MediaState::Failed => match peer.phase {
                Phase::Connected if peer.direction == Direction::Outbound => {
                    info!(device = %key, "connection failed; restarting ICE");
                    peer.phase = Phase::Restarting;
                    peer.phase_since = now;
                    self.event(CallEvent::PeerState {
                        device: key.clone(),
                        peer: handle,
                        call_id,
                        status: PeerStatus::Reconnecting,
                    });
                    self.renegotiate(now, key, true);
                }
                Phase::Connected => {
                    // The caller restarts ICE; we wait for its offer.
                    peer.phase = Phase::Restarting;
                    peer.phase_since = now;
                    self.event(CallEvent::PeerState {
                        device: key.clone(),
                        peer: handle,
                        call_id,
                        status: PeerStatus::Reconnecting,
                    });
                }
                Phase::Restarting => {
                    self.close_peer(key, true, reason::ICE_TIMEOUT, true);
                    self.mesh(now);
                }
                _ => {
                    self.close_peer(key, true, reason::ICE_FAILED, true);
                    self.mesh(now);
                }
            },
        }
    }

    pub(super) fn renegotiate(&mut self, now: u64, key: &DeviceKey, ice_restart: bool) {
        let feeds = self.local_feeds();
        let focus = self.is_focus(key);
        let Some(peer) = self.peers.get_mut(key) else {
            return;
        };
        if ice_restart {
            peer.ice_restart_next = true;
        }
        if !peer.stable() {
            peer.renegotiate_needed = true;
            return;
        }
        peer.local_offer_pending = true;
        peer.renegotiate_needed = false;
        let ice = std::mem::take(&mut peer.ice_restart_next);
        let _ = now;
        self.out.push_back(Output::Media(MediaRequest::CreateOffer {
            peer: peer.handle,
            remote: key.clone(),
            feeds,
            ice_restart: ice,
            focus,
        }));
    }

    pub(super) fn after_stable(&mut self, now: u64, key: &DeviceKey) {
        if self
            .peers
            .get(key)
            .is_some_and(|p| p.renegotiate_needed && p.stable())
        {
            self.renegotiate(now, key, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(direction: Direction) -> Peer {
        Peer::new(
            PeerHandle(1),
            "c1".into(),
            direction,
            DeviceKey::new("@b:x", "B"),
            "S".into(),
            1_000,
            60_000,
        )
    }

    #[test]
    fn a_new_peer_waits_for_the_media_layer_within_the_connect_timeout() {
        let cfg = Config::new("@a:x", "A");
        let out = peer(Direction::Outbound);
        assert_eq!(out.phase, Phase::CreatingOffer);
        assert!(!out.polite());
        assert_eq!(out.deadline(&cfg), Some(1_000 + cfg.connect_timeout_ms));
        let inb = peer(Direction::Inbound);
        assert_eq!(inb.phase, Phase::CreatingAnswer);
        assert!(inb.polite());
        assert!(!inb.stable());
    }

    #[test]
    fn an_invite_is_open_for_its_lifetime_and_a_connected_peer_never_times_out() {
        let cfg = Config::new("@a:x", "A");
        let mut p = peer(Direction::Outbound);
        p.phase = Phase::InviteSent;
        p.phase_since = 2_000;
        assert_eq!(p.deadline(&cfg), Some(62_000));
        p.phase = Phase::Connected;
        assert_eq!(p.deadline(&cfg), None);
        assert!(p.stable());
        p.local_offer_pending = true;
        assert!(!p.stable());
    }

    #[test]
    fn an_unconfirmed_answer_waits_while_the_callers_invite_is_open_bounded() {
        let mut cfg = Config::new("@a:x", "A");
        let mut p = peer(Direction::Inbound);
        p.phase = Phase::Connecting;
        p.phase_since = 1_500;
        // Confirmed (nothing kept): the connect timeout.
        assert_eq!(p.deadline(&cfg), Some(1_500 + cfg.connect_timeout_ms));
        // Our answer is kept for resending: wait out the invite's lifetime.
        p.kept = Some((
            Body::Hangup(Hangup {
                reason: None,
                extra: Default::default(),
            }),
            0,
        ));
        assert_eq!(p.deadline(&cfg), Some(1_000 + 60_000));
        // ... at most max_backoff_ms.
        cfg.max_backoff_ms = 20_000;
        assert_eq!(
            p.deadline(&cfg),
            Some((1_500 + cfg.connect_timeout_ms).max(21_000))
        );
    }

    #[test]
    fn candidates_are_trickled_only_when_gathering_was_incomplete() {
        let mut p = peer(Direction::Outbound);
        p.mark_signalled(5_000, true, 200);
        assert_eq!(p.signalled_at, Some(5_000));
        assert_eq!(p.candidates_flush_at, None);
        let mut p = peer(Direction::Outbound);
        p.mark_signalled(5_000, false, 200);
        assert_eq!(p.candidates_flush_at, Some(5_200));
    }
}
