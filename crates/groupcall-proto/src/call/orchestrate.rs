//! Room-level orchestration: room state, commands, our membership, the
//! mesh plan and its retries.

use serde_json::Value;
use tracing::{debug, info, warn};

use crate::error::{CommandError, ParseError};
use crate::events::{CallContent, Feed, FeedPurpose};
use crate::ids::{DeviceKey, should_call};
use crate::membership::{OwnDevice, joined_content, left_content};
use crate::room::RoomChange;
use crate::signalling::{Body, Hangup, MetadataChanged, reason};
use crate::types::*;

use super::peer::{Direction, Peer, Phase};
use super::{GroupCall, Joined, Retry};

impl GroupCall {
    // ------------------------------------------------------------------
    // Room state

    /// A room state event (client-server JSON). Events of unrelated types
    /// are ignored; malformed call events are rejected with the reason.
    pub fn handle_state(&mut self, now: impl Into<Now>, event: &Value) -> Result<(), ParseError> {
        let now = self.clock(now.into());
        let changes = self.room.apply_json(event, self.wall(now))?;
        self.on_room_changes(now, changes);
        self.flush();
        Ok(())
    }

    pub(super) fn on_room_changes(&mut self, now: u64, changes: Vec<RoomChange>) {
        for ch in changes {
            match ch {
                RoomChange::CallChanged { call_id } => {
                    if self.joined.is_none() {
                        let started = call_id
                            .as_deref()
                            .and_then(|id| self.room.call(id))
                            .filter(|c| !c.content.is_terminated())
                            .map(|c| CallEvent::CallStarted {
                                call_id: c.call_id.clone(),
                                intent: c.content.intent.clone(),
                                call_type: c.content.call_type.clone(),
                                name: c.content.name.clone(),
                            });
                        self.event(CallEvent::RoomCallChanged { call_id });
                        if let Some(e) = started {
                            self.event(e);
                        }
                    }
                }
                RoomChange::CallTerminated { call_id, reason } => {
                    if self.joined.as_ref().is_some_and(|j| j.call_id == call_id) {
                        info!(%call_id, %reason, "call terminated");
                        self.leave(now, reason::USER_HANGUP);
                        self.event(CallEvent::CallEnded { call_id, reason });
                    }
                }
                RoomChange::DeviceJoined { device, session_id } => {
                    if device == self.me {
                        self.own_entry_seen(&session_id);
                        continue;
                    }
                    let back = self
                        .peers
                        .get_mut(&device)
                        .filter(|p| p.orphaned_since.is_some() && p.remote_session == session_id);
                    if let Some(peer) = back {
                        // It came back with the same session: a flap (two of
                        // a user's devices overwrote each other's entries).
                        debug!(%device, "member entry is back; keeping the peer");
                        peer.orphaned_since = None;
                    } else {
                        if self
                            .peers
                            .get(&device)
                            .is_some_and(|p| p.orphaned_since.is_some())
                        {
                            self.close_peer(&device, false, reason::NEW_SESSION, false);
                        }
                        self.event(CallEvent::ParticipantJoined {
                            device: device.clone(),
                            session_id,
                        });
                    }
                    self.release_held(now, &device);
                }
                RoomChange::DeviceLeft {
                    device,
                    session_id,
                    reason,
                } => {
                    if device == self.me {
                        self.own_entry_lost(now);
                        continue;
                    }
                    if reason == crate::room::LeftReason::Removed
                        && let Some(peer) = self.peers.get_mut(&device)
                        && peer.orphaned_since.is_none()
                    {
                        peer.orphaned_since = Some(now);
                        continue;
                    }
                    self.event(CallEvent::ParticipantLeft {
                        device: device.clone(),
                        session_id,
                        reason,
                    });
                    if self.peers.contains_key(&device) {
                        self.close_peer(&device, false, "participant_left", false);
                    }
                    self.forget_device(&device);
                }
                RoomChange::SessionChanged {
                    device,
                    old_session_id,
                    new_session_id,
                } => {
                    if device == self.me {
                        self.own_entry_seen(&new_session_id);
                        continue;
                    }
                    self.event(CallEvent::ParticipantLeft {
                        device: device.clone(),
                        session_id: old_session_id,
                        reason: crate::room::LeftReason::Removed,
                    });
                    self.event(CallEvent::ParticipantJoined {
                        device: device.clone(),
                        session_id: new_session_id,
                    });
                    if self
                        .peers
                        .get(&device)
                        .is_some_and(|p| p.remote_session != *self.session_of(&device))
                    {
                        // The reference's caller hangs up with new_session; the
                        // message goes to the old session, which may still run.
                        let send = self
                            .peers
                            .get(&device)
                            .is_some_and(|p| p.direction == Direction::Outbound);
                        self.close_peer(&device, send, reason::NEW_SESSION, false);
                    }
                    self.retry.remove(&device);
                    self.reorder.retain(|(d, _), _| *d != device);
                    self.release_held(now, &device);
                }
                RoomChange::FeedsChanged { device, .. }
                | RoomChange::DeviceRefreshed { device } => {
                    if device != self.me {
                        self.device_active(now, &device);
                    }
                }
            }
        }
        self.mesh(now);
    }

    pub(super) fn session_of(&self, device: &DeviceKey) -> &String {
        static EMPTY: String = String::new();
        self.room
            .participants()
            .get(device)
            .map(|p| &p.session_id)
            .unwrap_or(&EMPTY)
    }

    pub(super) fn own_entry_seen(&mut self, session_id: &str) {
        if let Some(j) = &mut self.joined
            && j.session_id == session_id
        {
            j.membership_published = true;
        }
    }

    pub(super) fn own_entry_lost(&mut self, now: u64) {
        // Someone (another client of ours, or an expiry) removed our entry
        // while we are in the call: publish it again.
        if self.joined.as_ref().is_some_and(|j| j.membership_published) {
            warn!("our member entry disappeared while in the call; republishing");
            self.publish_membership(now);
        }
    }

    pub(super) fn forget_device(&mut self, device: &DeviceKey) {
        self.retry.remove(device);
        self.reorder.retain(|(d, _), _| d != device);
        self.held.remove(device);
    }

    // ------------------------------------------------------------------
    // Commands

    /// A user command.
    pub fn handle_command(
        &mut self,
        now: impl Into<Now>,
        cmd: Command,
    ) -> Result<(), CommandError> {
        let now = self.clock(now.into());
        let r = self.command(now, cmd);
        self.flush();
        r
    }

    pub(super) fn command(&mut self, now: u64, cmd: Command) -> Result<(), CommandError> {
        match cmd {
            Command::Join {
                create,
                audio,
                video,
            } => self.join(now, create, audio, video),
            Command::Leave => {
                if self.joined.is_none() {
                    return Err(CommandError::NotJoined);
                }
                self.leave(now, reason::USER_HANGUP);
                Ok(())
            }
            Command::Terminate => {
                let call_id = self
                    .joined
                    .as_ref()
                    .map(|j| j.call_id.clone())
                    .ok_or(CommandError::NotJoined)?;
                self.leave(now, reason::USER_HANGUP);
                let mut content = self
                    .room
                    .call(&call_id)
                    .map(|c| c.content.clone())
                    .unwrap_or_default();
                content.terminate("call_ended");
                let changes = self
                    .room
                    .local_echo_call(&call_id, content.clone(), self.wall(now));
                self.publish_call(&call_id, &content);
                self.on_room_changes(now, changes);
                self.event(CallEvent::CallEnded {
                    call_id,
                    reason: "call_ended".into(),
                });
                Ok(())
            }
            Command::SetAudioMuted(m) => self.set_muted(Some(m), None),
            Command::SetVideoMuted(m) => self.set_muted(None, Some(m)),
            Command::Screenshare(on) => self.screenshare(now, on),
            Command::FocusSubscriptions(only) => {
                self.set_focus_subscriptions(only);
                Ok(())
            }
            Command::SetFocus(focus) => {
                self.cfg.focus = focus;
                self.cfg.follow_foci = false;
                self.mesh(now);
                Ok(())
            }
            Command::FocusRecentSpeakers(n) => {
                self.set_focus_recent_speakers(n);
                Ok(())
            }
            Command::FocusVideoSize { device, size } => {
                let valid = 1..=crate::dc::MAX_DIMENSION;
                if let Some((w, h)) = size
                    && !(valid.contains(&w) && valid.contains(&h))
                {
                    return Err(CommandError::InvalidArgument(format!(
                        "video size {w}x{h}: each side must be in {valid:?}"
                    )));
                }
                self.set_focus_video_size(device, size);
                Ok(())
            }
        }
    }

    pub(super) fn join(
        &mut self,
        now: u64,
        create: Option<CreateOptions>,
        audio: bool,
        video: bool,
    ) -> Result<(), CommandError> {
        if self.joined.is_some() {
            return Err(CommandError::AlreadyJoined);
        }
        if !audio && !video {
            return Err(CommandError::InvalidArgument(
                "a participant needs audio or video".into(),
            ));
        }
        let mut created = false;
        let call_id = match (self.room.live_call().map(|c| c.call_id.clone()), create) {
            (Some(id), _) => id,
            (None, Some(opts)) => {
                let id = self.ids.call_id(self.wall(now));
                let mut content = CallContent::new(opts.intent, opts.call_type);
                content.name = opts.name;
                self.publish_call(&id, &content);
                let changes = self.room.local_echo_call(&id, content, self.wall(now));
                self.on_room_changes(now, changes);
                created = true;
                id
            }
            (None, None) => return Err(CommandError::NoCallToJoin),
        };
        let session_id = match &self.cfg.session_id {
            Some(s) => s.clone(),
            None => {
                let s = self.ids.string(16);
                self.cfg.session_id = Some(s.clone());
                s
            }
        };
        let usermedia = LocalFeed {
            stream_id: self.ids.string(16),
            purpose: FeedPurpose::Usermedia,
            audio_track_id: audio.then(|| self.ids.string(16)),
            video_track_id: video.then(|| self.ids.string(16)),
        };
        self.joined = Some(Joined {
            call_id: call_id.clone(),
            session_id: session_id.clone(),
            usermedia,
            screenshare: None,
            audio_muted: false,
            video_muted: false,
            membership_published: false,
            refresh_at: now,
        });
        let changes = self.room.pin(Some(call_id.clone()), self.wall(now));
        self.publish_membership(now);
        self.event(CallEvent::Joined {
            call_id,
            session_id,
            created,
        });
        // Participants already there (announce them now that we are in).
        let present: Vec<_> = self
            .room
            .participants()
            .iter()
            .filter(|(k, _)| **k != self.me)
            .map(|(k, p)| (k.clone(), p.session_id.clone()))
            .collect();
        for (device, session_id) in present {
            self.event(CallEvent::ParticipantJoined { device, session_id });
        }
        let changes: Vec<_> = changes
            .into_iter()
            .filter(|c| !matches!(c, RoomChange::DeviceJoined { .. }))
            .collect();
        self.on_room_changes(now, changes);
        Ok(())
    }

    pub(super) fn leave(&mut self, now: u64, why: &str) {
        let Some(j) = self.joined.clone() else { return };
        let devices: Vec<_> = self.peers.keys().cloned().collect();
        for d in devices {
            self.close_peer(&d, true, why, false);
        }
        let content = left_content(
            self.room
                .member_content(&self.me.user_id, self.cfg.event_names.call_member()),
            &self.me.device_id,
            self.wall(now),
        );
        self.out.push_back(Output::PublishState {
            event_type: self.cfg.event_names.call_member().into(),
            state_key: self.me.user_id.clone(),
            content,
        });
        self.joined = None;
        self.retry.clear();
        self.reorder.clear();
        self.held.clear();
        let _ = self.room.pin(None, self.wall(now));
        debug!(call_id = %j.call_id, "left");
        self.event(CallEvent::Left);
    }

    pub(super) fn set_muted(
        &mut self,
        audio: Option<bool>,
        video: Option<bool>,
    ) -> Result<(), CommandError> {
        let j = self.joined.as_mut().ok_or(CommandError::NotJoined)?;
        if let Some(a) = audio {
            j.audio_muted = a;
        }
        if let Some(v) = video {
            j.video_muted = v;
        }
        let (audio_muted, video_muted) = (j.audio_muted, j.video_muted);
        let meta = j.metadata();
        self.out.push_back(Output::Media(MediaRequest::SetMuted {
            audio_muted,
            video_muted,
        }));
        let devices: Vec<_> = self
            .peers
            .iter()
            .filter(|(_, p)| p.signalled_at.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for d in devices {
            self.send(
                &d,
                Body::SdpStreamMetadataChanged(MetadataChanged {
                    sdp_stream_metadata: meta.clone(),
                    extra: Default::default(),
                }),
            );
        }
        Ok(())
    }

    pub(super) fn screenshare(&mut self, now: u64, on: bool) -> Result<(), CommandError> {
        let stream_id = self.ids.string(16);
        let track_id = self.ids.string(16);
        let j = self.joined.as_mut().ok_or(CommandError::NotJoined)?;
        if j.screenshare.is_some() == on {
            return Ok(());
        }
        j.screenshare = on.then_some(LocalFeed {
            stream_id,
            purpose: FeedPurpose::Screenshare,
            audio_track_id: None,
            video_track_id: Some(track_id),
        });
        self.publish_membership(now);
        let devices: Vec<_> = self.peers.keys().cloned().collect();
        for d in devices {
            self.renegotiate(now, &d, false);
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Membership

    /// Our membership event was accepted by the homeserver: calls can start.
    pub fn handle_membership_published(&mut self, now: impl Into<Now>) {
        let now = self.clock(now.into());
        if let Some(j) = &mut self.joined {
            j.membership_published = true;
        }
        self.mesh(now);
        self.flush();
    }

    pub(super) fn publish_membership(&mut self, now: u64) {
        let wall = self.wall(now);
        let Some(j) = &mut self.joined else { return };
        let mut feeds = vec![Feed::with_purpose(FeedPurpose::Usermedia)];
        if j.screenshare.is_some() {
            feeds.push(Feed::with_purpose(FeedPurpose::Screenshare));
        }
        let dev = OwnDevice {
            device_id: self.me.device_id.clone(),
            session_id: j.session_id.clone(),
            feeds,
            // While our focus is down we are in the mesh: `m.foci.active`
            // names no focus, so that members still at the focus call us
            // (or answer us) directly; it names it again once we are back.
            foci_active: self
                .active_focus
                .iter()
                .filter(|_| !self.focus_down)
                .cloned()
                .collect(),
            foci_preferred: self.cfg.focus.iter().cloned().collect(),
        };
        debug!(
            foci_active = dev.foci_active.len(),
            "publishing our member entry"
        );
        j.refresh_at = now.saturating_add(self.cfg.member_refresh_ms);
        let content = joined_content(
            self.room
                .member_content(&self.me.user_id, self.cfg.event_names.call_member()),
            &j.call_id,
            &dev,
            wall.saturating_add(self.cfg.member_expiry_ms),
            wall,
        );
        self.out.push_back(Output::PublishState {
            event_type: self.cfg.event_names.call_member().into(),
            state_key: self.me.user_id.clone(),
            content,
        });
    }

    pub(super) fn publish_call(&mut self, call_id: &str, content: &CallContent) {
        self.out.push_back(Output::PublishState {
            event_type: self.cfg.event_names.call().into(),
            state_key: call_id.to_owned(),
            content: serde_json::to_value(content)
                .unwrap_or_else(|_| Value::Object(Default::default())),
        });
    }

    // ------------------------------------------------------------------
    // The mesh

    pub(super) fn mesh(&mut self, now: u64) {
        self.follow_focus(now);
        let Some(j) = &self.joined else { return };
        if !j.membership_published {
            return;
        }
        let wanted: Vec<(DeviceKey, String)> = self
            .room
            .participants()
            .iter()
            .filter(|(k, _)| **k != self.me && should_call(&self.me, k))
            // Two devices that both publish to the same focus meet there,
            // not in the mesh (MSC3898); so do devices at another focus once
            // ours forwards their streams (the foci cascade); devices
            // without a focus, or at one ours is not linked with, keep the
            // mesh.
            .filter(|(k, p)| !self.meets_at_focus(p) && !self.reached_through_focus(k))
            .map(|(k, p)| (k.clone(), p.session_id.clone()))
            .collect();
        for (device, session) in wanted {
            if self
                .peers
                .get(&device)
                .is_some_and(|p| p.remote_session == session)
            {
                continue;
            }
            self.call_when_due(now, device, session);
        }
        // Members we meet at the focus again are no longer called directly.
        if self.focus_connected() {
            self.leave_mesh_for_focus();
        }
        self.follow_focus_drain();
        self.ask_focus_to_connect();
        // Our focus: called once. It has no member entry: the invite names
        // its device id as the session, and its answer its real session.
        if let Some(focus) = self.focus_key()
            && !self.peers.contains_key(&focus)
        {
            let session = focus.device_id.clone();
            self.call_when_due(now, focus, session);
        }
    }

    /// The device key of our focus, if we publish to one.
    pub(super) fn focus_key(&self) -> Option<DeviceKey> {
        self.active_focus
            .as_ref()
            .map(|f| DeviceKey::new(f.user_id.clone(), f.device_id.clone()))
            .filter(|k| *k != self.me)
    }

    /// Whether `device` is our focus.
    pub(super) fn is_focus(&self, device: &DeviceKey) -> bool {
        self.active_focus
            .as_ref()
            .is_some_and(|f| f.user_id == device.user_id && f.device_id == device.device_id)
    }

    /// Our focus is down (gone, or draining): we are in the mesh, and the
    /// members are told (our entry stops naming it in `m.foci.active`, so
    /// those still at the focus meet us in the mesh).
    pub(super) fn mark_focus_down(&mut self, now: u64) {
        if std::mem::replace(&mut self.focus_down, true) {
            return;
        }
        if self.joined.as_ref().is_some_and(|j| j.membership_published) {
            self.publish_membership(now);
        }
    }

    /// Whether members that publish to our focus meet us there rather than
    /// in the mesh: we have a focus and it is not known to be down.
    pub(super) fn focus_usable(&self) -> bool {
        self.active_focus.is_some() && !self.focus_down
    }

    /// Whether `p` publishes to our focus (and we can meet it there).
    fn meets_at_focus(&self, p: &crate::room::Participant) -> bool {
        self.focus_usable()
            && self
                .active_focus
                .as_ref()
                .is_some_and(|f| p.foci_active.contains(f))
    }

    /// Places a call to `device` (in `session`) unless the retry policy
    /// says not yet.
    fn call_when_due(&mut self, now: u64, device: DeviceKey, session: String) {
        let r = self
            .retry
            .entry(device.clone())
            .or_insert_with(|| Retry::new(session.clone()));
        if r.session_id != session {
            *r = Retry::new(session.clone());
        }
        if now < r.not_before {
            return;
        }
        r.calls_placed += 1;
        r.not_before = now + self.cfg.retry_interval_ms;
        let calls = r.calls_placed;
        let report = calls > self.cfg.max_retries + 1 && !r.reported;
        if report {
            r.reported = true;
        }
        // The first call and the MSC's retries are open for the invite
        // lifetime; later ones ever longer: there is always one invite
        // for the device to answer when it wakes, and fewer of them.
        let lifetime = self.backoff(self.cfg.invite_lifetime_ms, calls);
        self.place_call(now, &device, session, lifetime);
        if report {
            warn!(%device, "no answer after {} calls; calling on at a backed-off interval", calls - 1);
            self.event(CallEvent::Unanswered {
                device,
                calls: calls - 1,
            });
        }
    }

    /// `base` doubled for each call placed beyond the MSC's retries, capped
    /// at [`Config::max_backoff_ms`] (never below `base`).
    pub(super) fn backoff(&self, base: u64, calls_placed: u32) -> u64 {
        backoff(&self.cfg, base, calls_placed)
    }

    /// The device showed signs of life (it sent us something outside our
    /// call with it, or republished its member entry): an invite to it that
    /// has been unanswered for a retry interval goes out again now, and a
    /// call waiting for its backed-off slot is placed now.
    pub(super) fn device_active(&mut self, now: u64, device: &DeviceKey) {
        let retry = self.cfg.retry_interval_ms;
        if let Some(p) = self.peers.get_mut(device) {
            if p.phase == Phase::InviteSent && now >= p.phase_since.saturating_add(retry) {
                // At most one extra copy a second, whatever it sends.
                let at = p.kept_sent_at.saturating_add(1000);
                if now >= at {
                    self.resend_kept(now, device);
                } else if p.resend_at.is_none_or(|t| t > at) {
                    p.resend_at = Some(at);
                }
            }
        } else if let Some(r) = self.retry.get_mut(device)
            && r.not_before > now
        {
            debug!(%device, "device is active; calling it now");
            r.not_before = now;
        }
    }

    pub(super) fn new_peer(
        &mut self,
        now: u64,
        call_id: String,
        direction: Direction,
        remote: DeviceKey,
        session: String,
        lifetime: u64,
    ) -> PeerHandle {
        let handle = PeerHandle(self.next_handle);
        self.next_handle += 1;
        self.peers.insert(
            remote.clone(),
            Peer::new(
                handle,
                call_id.clone(),
                direction,
                remote.clone(),
                session,
                now,
                lifetime,
            ),
        );
        self.event(CallEvent::PeerState {
            device: remote,
            peer: handle,
            call_id,
            status: PeerStatus::Connecting,
        });
        handle
    }

    pub(super) fn place_call(
        &mut self,
        now: u64,
        device: &DeviceKey,
        session: String,
        lifetime: u64,
    ) {
        let call_id = self.ids.call_id(self.wall(now));
        debug!(%device, %call_id, lifetime, "calling");
        let handle = self.new_peer(
            now,
            call_id,
            Direction::Outbound,
            device.clone(),
            session,
            lifetime,
        );
        let feeds = self.local_feeds();
        let focus = self.is_focus(device);
        self.out.push_back(Output::Media(MediaRequest::CreateOffer {
            peer: handle,
            remote: device.clone(),
            feeds,
            ice_restart: false,
            focus,
        }));
    }

    /// Removes the peer with `device`; optionally sends a hangup first.
    pub(super) fn close_peer(
        &mut self,
        device: &DeviceKey,
        send_hangup: bool,
        why: &str,
        failed: bool,
    ) {
        if send_hangup && self.peers.contains_key(device) {
            self.send(
                device,
                Body::Hangup(Hangup {
                    reason: Some(why.to_owned()),
                    extra: Default::default(),
                }),
            );
        }
        let Some(peer) = self.peers.remove(device) else {
            return;
        };
        // Our own hangup (leaving the call, or leaving the focus for
        // another) does not make the focus "gone".
        let ours = send_hangup && (why == reason::USER_HANGUP || why == super::focus::FOCUS_SWITCH);
        if self.is_focus(device) {
            self.focus_closed();
            if !self.focus_down && !ours {
                warn!(%device, reason = why, "our focus is gone; falling back to the mesh");
                self.mark_focus_down(self.now);
            }
        }
        // A call that failed or was hung up is not placed again at once: the
        // device may be leaving (its hangup or member event is on the way),
        // and a remote that hung up deserves the retry spacing. An
        // unanswered invite was already waited for.
        if why != reason::INVITE_TIMEOUT
            && let Some(calls) = self.retry.get(device).map(|r| r.calls_placed)
        {
            let wait = self.backoff(self.cfg.retry_interval_ms, calls);
            if let Some(r) = self.retry.get_mut(device) {
                r.not_before = r.not_before.max(self.now + wait);
            }
        }
        if peer.orphaned_since.is_some() {
            // Its member entry is gone: it is now a participant that left.
            self.event(CallEvent::ParticipantLeft {
                device: device.clone(),
                session_id: peer.remote_session.clone(),
                reason: crate::room::LeftReason::Removed,
            });
        }
        self.out
            .push_back(Output::Media(MediaRequest::ClosePeer { peer: peer.handle }));
        let through_focus = !self.is_focus(device);
        for stream_id in peer.remote_feeds.keys() {
            // A mesh call ending with a member we also meet at the focus:
            // its streams still come through the focus.
            if through_focus && self.focus_link.available.contains_key(stream_id) {
                continue;
            }
            self.event(CallEvent::FeedRemoved {
                device: device.clone(),
                stream_id: stream_id.clone(),
            });
        }
        let status = if failed {
            PeerStatus::Failed(why.to_owned())
        } else {
            PeerStatus::Closed(why.to_owned())
        };
        self.ended_calls.insert(peer.call_id.clone(), self.now);
        self.reorder
            .retain(|(d, c), _| !(d == device && *c == peer.call_id));
        self.event(CallEvent::PeerState {
            device: device.clone(),
            peer: peer.handle,
            call_id: peer.call_id,
            status,
        });
    }
}

/// The interval `base` (invite lifetime, retry interval) for a device we
/// placed `calls_placed` calls to: unchanged within the retries, then
/// doubling per call, at most `max_backoff_ms` (never below `base`).
fn backoff(cfg: &Config, base: u64, calls_placed: u32) -> u64 {
    let beyond = calls_placed.saturating_sub(cfg.max_retries + 1).min(20);
    base.saturating_mul(1u64 << beyond)
        .min(cfg.max_backoff_ms)
        .max(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_keeps_the_interval_within_the_retries_then_doubles_up_to_the_cap() {
        let cfg = Config::new("@a:x", "A");
        let got: Vec<u64> = (0..12).map(|n| backoff(&cfg, 5_000, n)).collect();
        // max_retries = 3: the first call and its 3 retries at the base.
        assert_eq!(
            got,
            [
                5_000, 5_000, 5_000, 5_000, 5_000, 10_000, 20_000, 40_000, 80_000, 160_000,
                320_000, 600_000
            ]
        );
        assert_eq!(backoff(&cfg, 5_000, u32::MAX), 600_000);
        // A base above the cap stays the base.
        assert_eq!(backoff(&cfg, 900_000, 10), 900_000);
    }
}
