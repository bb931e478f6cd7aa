//! The orchestrator: one participant in one room's call.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;
use tracing::{debug, info, warn};

use crate::error::{CommandError, ParseError};
use crate::events::{CallContent, Feed, FeedPurpose};
use crate::ids::{DeviceKey, IdGen, should_call};
use crate::membership::{OwnDevice, joined_content, left_content};
use crate::reorder::{Pushed, ReorderBuffer};
use crate::room::{RoomCallState, RoomChange};
use crate::signalling::{
    Answer, Body, Candidate, Candidates, Capabilities, CommonFields, Hangup, Invite, Message,
    MessageType, MetadataChanged, Negotiate, SdpStreamMetadata, SelectAnswer, SessionDescription,
    StreamMetadata, Version, reason,
};
use crate::types::*;

const REORDER_CAPACITY: usize = 64;
const MAX_HELD_PER_DEVICE: usize = 32;
const MAX_BUFFERS_PER_DEVICE: usize = 16;
const MAX_PENDING_REMOTE_CANDIDATES: usize = 512;
const ENDED_CALL_MEMORY_MS: u64 = 10 * 60 * 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Outbound,
    Inbound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
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
struct Peer {
    handle: PeerHandle,
    call_id: String,
    direction: Direction,
    remote: DeviceKey,
    remote_session: String,
    remote_party: Option<String>,
    phase: Phase,
    /// When the current phase started (drives its timeout).
    phase_since: u64,
    send_seq: u64,
    /// Our invite/answer has been sent: later candidates can be trickled.
    signalled_at: Option<u64>,
    local_candidates: Vec<Candidate>,
    candidates_flush_at: Option<u64>,
    remote_description_set: bool,
    remote_candidates: Vec<Candidate>,
    /// A local renegotiation offer is in flight (until its answer is applied).
    local_offer_pending: bool,
    /// Our renegotiation offer on the wire: (message, sent at, times resent).
    /// Resent every `retry_interval_ms` until answered; a lost offer would
    /// otherwise stall renegotiation for good.
    offer_in_flight: Option<(Negotiate, u64, u32)>,
    /// A remote renegotiation offer is being answered by the media layer.
    answering_remote_offer: bool,
    /// Renegotiate once the current exchange is done.
    renegotiate_needed: bool,
    ice_restart_next: bool,
    remote_feeds: SdpStreamMetadata,
    /// The device's entry vanished from the member state at this time; the
    /// peer is kept for a grace period in case it comes back (see
    /// [`Config::orphan_grace_ms`]).
    orphaned_since: Option<u64>,
    /// Our invite (caller) or answer (callee) as sent, with its `seq`: sent
    /// again unchanged when it may have been lost. The receiver's reorder
    /// buffer drops a copy it already has.
    kept: Option<(Body, u64)>,
    /// Caller, invite unanswered: when the invite is sent again next ...
    resend_at: Option<u64>,
    /// ... and how many times it was sent again so far.
    resends: u32,
    /// When we last sent the kept message.
    kept_sent_at: u64,
    /// This call's invite lifetime: an unanswered invite is hung up after it.
    lifetime: u64,
    /// When the peer was made (our invite was placed, or theirs arrived).
    opened_at: u64,
}

impl Peer {
    fn polite(&self) -> bool {
        self.direction == Direction::Inbound
    }
    fn stable(&self) -> bool {
        matches!(
            self.phase,
            Phase::Connecting | Phase::Connected | Phase::Restarting
        ) && !self.local_offer_pending
            && !self.answering_remote_offer
    }
}

#[derive(Debug, Clone)]
struct Retry {
    session_id: String,
    calls_placed: u32,
    /// No call before this time: `retry_interval_ms` after the last call
    /// was placed, or (backed off) after the last call failed or was hung up.
    not_before: u64,
    /// [`CallEvent::Unanswered`] was reported for this session.
    reported: bool,
}

impl Retry {
    fn new(session_id: String) -> Self {
        Self {
            session_id,
            calls_placed: 0,
            not_before: 0,
            reported: false,
        }
    }
}

#[derive(Debug, Clone)]
struct Joined {
    call_id: String,
    session_id: String,
    usermedia: LocalFeed,
    screenshare: Option<LocalFeed>,
    audio_muted: bool,
    video_muted: bool,
    membership_published: bool,
    refresh_at: u64,
}

impl Joined {
    fn feeds(&self) -> Vec<LocalFeed> {
        let mut v = vec![self.usermedia.clone()];
        v.extend(self.screenshare.clone());
        v
    }
    fn metadata(&self) -> SdpStreamMetadata {
        let mut m = SdpStreamMetadata::new();
        m.insert(
            self.usermedia.stream_id.clone(),
            StreamMetadata {
                purpose: FeedPurpose::Usermedia,
                audio_muted: self.audio_muted || self.usermedia.audio_track_id.is_none(),
                video_muted: self.video_muted || self.usermedia.video_track_id.is_none(),
                extra: Default::default(),
            },
        );
        if let Some(s) = &self.screenshare {
            m.insert(
                s.stream_id.clone(),
                StreamMetadata {
                    purpose: FeedPurpose::Screenshare,
                    audio_muted: false,
                    video_muted: false,
                    extra: Default::default(),
                },
            );
        }
        m
    }
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at: u64,
}

/// One participant of one room's group call, sans-IO.
///
/// Feed it room state ([`GroupCall::handle_state`]), to-device messages
/// ([`GroupCall::handle_to_device`]), media results
/// ([`GroupCall::handle_media`]), user commands ([`GroupCall::handle_command`])
/// and time ([`GroupCall::handle_timeout`] when [`GroupCall::poll_timeout`]
/// says); carry out what [`GroupCall::poll_output`] returns. Time is passed
/// in by the caller as a [`Now`]: timers on its monotonic clock, wall-clock
/// times only where the wire has them.
#[derive(Debug)]
pub struct GroupCall {
    cfg: Config,
    me: DeviceKey,
    ids: IdGen,
    room: RoomCallState,
    joined: Option<Joined>,
    peers: BTreeMap<DeviceKey, Peer>,
    retry: BTreeMap<DeviceKey, Retry>,
    reorder: BTreeMap<(DeviceKey, String), ReorderBuffer<Message>>,
    ended_calls: BTreeMap<String, u64>,
    /// Messages from devices not (yet) in the member state: (arrival, message, encrypted).
    held: BTreeMap<DeviceKey, Vec<(u64, Message, bool)>>,
    buckets: BTreeMap<String, Bucket>,
    next_handle: u64,
    /// The latest monotonic time passed in.
    now: u64,
    /// `unix_ms - mono_ms` at the latest input: turns wall-clock times
    /// (`expires_ts`) into monotonic deadlines and back.
    wall_offset: i64,
    out: VecDeque<Output>,
    to_device: Vec<(MessageType, OutgoingMessage)>,
}

impl GroupCall {
    /// A participant that is not in a call yet.
    pub fn new(cfg: Config) -> Self {
        let mut room = RoomCallState::new();
        room.set_require_room_membership(cfg.require_room_membership);
        Self {
            me: DeviceKey::new(cfg.user_id.clone(), cfg.device_id.clone()),
            ids: IdGen::new(cfg.seed),
            room,
            cfg,
            joined: None,
            peers: BTreeMap::new(),
            retry: BTreeMap::new(),
            reorder: BTreeMap::new(),
            ended_calls: BTreeMap::new(),
            held: BTreeMap::new(),
            buckets: BTreeMap::new(),
            next_handle: 1,
            now: 0,
            wall_offset: 0,
            out: VecDeque::new(),
            to_device: Vec::new(),
        }
    }

    /// Our device.
    pub fn me(&self) -> &DeviceKey {
        &self.me
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The room's call state.
    pub fn room(&self) -> &RoomCallState {
        &self.room
    }

    /// The call we are in, if any.
    pub fn joined_call_id(&self) -> Option<&str> {
        self.joined.as_ref().map(|j| j.call_id.as_str())
    }

    /// Our session id, while joined.
    pub fn session_id(&self) -> Option<&str> {
        self.joined.as_ref().map(|j| j.session_id.as_str())
    }

    /// Our feeds, while joined.
    pub fn local_feeds(&self) -> Vec<LocalFeed> {
        self.joined.as_ref().map(Joined::feeds).unwrap_or_default()
    }

    /// The remote devices we have a peer connection with, and whether it is
    /// connected.
    pub fn peers(&self) -> Vec<(DeviceKey, PeerHandle, bool)> {
        self.peers
            .values()
            .map(|p| (p.remote.clone(), p.handle, p.phase == Phase::Connected))
            .collect()
    }

    /// The remote device of a peer handle (while the peer exists).
    pub fn peer_device(&self, handle: PeerHandle) -> Option<&DeviceKey> {
        self.peers
            .values()
            .find(|p| p.handle == handle)
            .map(|p| &p.remote)
    }

    /// Takes the time of an input: records the wall clock's offset and
    /// returns the monotonic time every timer uses.
    fn clock(&mut self, now: Now) -> u64 {
        self.wall_offset = (now.unix_ms as i64).wrapping_sub(now.mono_ms as i64);
        self.now = self.now.max(now.mono_ms);
        now.mono_ms
    }

    /// The wall-clock time (POSIX ms) of monotonic time `mono`.
    fn wall(&self, mono: u64) -> u64 {
        (mono as i64).saturating_add(self.wall_offset).max(0) as u64
    }

    /// The monotonic time of wall-clock time `unix_ms`.
    fn mono_of_wall(&self, unix_ms: u64) -> u64 {
        (unix_ms as i64).saturating_sub(self.wall_offset).max(0) as u64
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Any input, through one entry point (errors are logged and dropped).
    pub fn handle_input(&mut self, now: impl Into<Now>, input: Input) {
        let now: Now = now.into();
        match input {
            Input::State(v) => {
                if let Err(e) = self.handle_state(now, &v) {
                    debug!("state event ignored: {e}");
                }
            }
            Input::ToDevice(m) => self.handle_to_device(now, m),
            Input::Media(m) => self.handle_media(now, m),
            Input::Command(c) => {
                if let Err(e) = self.handle_command(now, c) {
                    debug!("command refused: {e}");
                }
            }
            Input::MembershipPublished => self.handle_membership_published(now),
        }
    }

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

    fn on_room_changes(&mut self, now: u64, changes: Vec<RoomChange>) {
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

    fn session_of(&self, device: &DeviceKey) -> &String {
        static EMPTY: String = String::new();
        self.room
            .participants()
            .get(device)
            .map(|p| &p.session_id)
            .unwrap_or(&EMPTY)
    }

    fn own_entry_seen(&mut self, session_id: &str) {
        if let Some(j) = &mut self.joined
            && j.session_id == session_id
        {
            j.membership_published = true;
        }
    }

    fn own_entry_lost(&mut self, now: u64) {
        // Someone (another client of ours, or an expiry) removed our entry
        // while we are in the call: publish it again.
        if self.joined.as_ref().is_some_and(|j| j.membership_published) {
            warn!("our member entry disappeared while in the call; republishing");
            self.publish_membership(now);
        }
    }

    fn forget_device(&mut self, device: &DeviceKey) {
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

    fn command(&mut self, now: u64, cmd: Command) -> Result<(), CommandError> {
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
        }
    }

    fn join(
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

    fn leave(&mut self, now: u64, why: &str) {
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

    fn set_muted(&mut self, audio: Option<bool>, video: Option<bool>) -> Result<(), CommandError> {
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

    fn screenshare(&mut self, now: u64, on: bool) -> Result<(), CommandError> {
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

    fn publish_membership(&mut self, now: u64) {
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
        };
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

    fn publish_call(&mut self, call_id: &str, content: &CallContent) {
        self.out.push_back(Output::PublishState {
            event_type: self.cfg.event_names.call().into(),
            state_key: call_id.to_owned(),
            content: serde_json::to_value(content)
                .unwrap_or_else(|_| Value::Object(Default::default())),
        });
    }

    // ------------------------------------------------------------------
    // The mesh

    fn mesh(&mut self, now: u64) {
        let Some(j) = &self.joined else { return };
        if !j.membership_published {
            return;
        }
        let wanted: Vec<(DeviceKey, String)> = self
            .room
            .participants()
            .iter()
            .filter(|(k, _)| **k != self.me && should_call(&self.me, k))
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
            let r = self
                .retry
                .entry(device.clone())
                .or_insert_with(|| Retry::new(session.clone()));
            if r.session_id != session {
                *r = Retry::new(session.clone());
            }
            if now < r.not_before {
                continue;
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
    }

    /// `base` doubled for each call placed beyond the MSC's retries, capped
    /// at [`Config::max_backoff_ms`] (never below `base`).
    fn backoff(&self, base: u64, calls_placed: u32) -> u64 {
        let beyond = calls_placed
            .saturating_sub(self.cfg.max_retries + 1)
            .min(20);
        base.saturating_mul(1u64 << beyond)
            .min(self.cfg.max_backoff_ms)
            .max(base)
    }

    /// The device showed signs of life (it sent us something outside our
    /// call with it, or republished its member entry): an invite to it that
    /// has been unanswered for a retry interval goes out again now, and a
    /// call waiting for its backed-off slot is placed now.
    fn device_active(&mut self, now: u64, device: &DeviceKey) {
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

    fn new_peer(
        &mut self,
        now: u64,
        call_id: String,
        direction: Direction,
        remote: DeviceKey,
        session: String,
        lifetime: u64,
    ) -> PeerHandle {
        let phase = match direction {
            Direction::Outbound => Phase::CreatingOffer,
            Direction::Inbound => Phase::CreatingAnswer,
        };
        let handle = PeerHandle(self.next_handle);
        self.next_handle += 1;
        self.peers.insert(
            remote.clone(),
            Peer {
                handle,
                call_id: call_id.clone(),
                direction,
                remote: remote.clone(),
                remote_session: session,
                remote_party: None,
                phase,
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
            },
        );
        self.event(CallEvent::PeerState {
            device: remote,
            peer: handle,
            call_id,
            status: PeerStatus::Connecting,
        });
        handle
    }

    fn place_call(&mut self, now: u64, device: &DeviceKey, session: String, lifetime: u64) {
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
        self.out.push_back(Output::Media(MediaRequest::CreateOffer {
            peer: handle,
            remote: device.clone(),
            feeds,
            ice_restart: false,
        }));
    }

    /// Removes the peer with `device`; optionally sends a hangup first.
    fn close_peer(&mut self, device: &DeviceKey, send_hangup: bool, why: &str, failed: bool) {
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
        for stream_id in peer.remote_feeds.keys() {
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

    // ------------------------------------------------------------------
    // Sending

    fn send(&mut self, device: &DeviceKey, body: Body) {
        let Some(peer) = self.peers.get_mut(device) else {
            return;
        };
        let (call_id, dest, seq) = (
            peer.call_id.clone(),
            peer.remote_session.clone(),
            peer.send_seq,
        );
        peer.send_seq += 1;
        self.queue_message(device, call_id, dest, seq, body);
    }

    /// Sends our invite or answer and keeps it (with its `seq`) to send
    /// again unchanged if it may have been lost.
    fn send_kept(&mut self, now: u64, device: &DeviceKey, body: Body) {
        let Some(peer) = self.peers.get_mut(device) else {
            return;
        };
        peer.kept = Some((body.clone(), peer.send_seq));
        peer.kept_sent_at = now;
        self.send(device, body);
    }

    /// Sends the kept invite or answer again, with its original `seq`.
    fn resend_kept(&mut self, now: u64, device: &DeviceKey) {
        let Some(peer) = self.peers.get_mut(device) else {
            return;
        };
        let Some((body, seq)) = peer.kept.clone() else {
            return;
        };
        peer.kept_sent_at = now;
        let (call_id, dest) = (peer.call_id.clone(), peer.remote_session.clone());
        debug!(%device, %call_id, seq, "sending {} again", body.message_type().as_str());
        self.queue_message(device, call_id, dest, seq, body);
    }

    /// Queues one message of `call_id` to `device` with our group fields.
    fn queue_message(
        &mut self,
        device: &DeviceKey,
        call_id: String,
        dest_session_id: String,
        seq: u64,
        body: Body,
    ) {
        let Some(j) = &self.joined else { return };
        let msg = Message {
            common: CommonFields {
                version: Version::V1,
                call_id,
                party_id: self.me.device_id.clone(),
                conf_id: j.call_id.clone(),
                device_id: Some(self.me.device_id.clone()),
                sender_session_id: Some(j.session_id.clone()),
                dest_session_id,
                seq,
            },
            body,
        };
        self.to_device.push((
            msg.message_type(),
            OutgoingMessage {
                user_id: device.user_id.clone(),
                device_id: device.device_id.clone(),
                content: msg.to_content(),
            },
        ));
    }

    /// Moves queued to-device messages into outputs, one batch per event
    /// type, types in order of first appearance.
    fn flush(&mut self) {
        if self.to_device.is_empty() {
            return;
        }
        let mut order: Vec<MessageType> = Vec::new();
        let mut by_type: BTreeMap<MessageType, Vec<OutgoingMessage>> = BTreeMap::new();
        for (t, m) in self.to_device.drain(..) {
            if !by_type.contains_key(&t) {
                order.push(t);
            }
            by_type.entry(t).or_default().push(m);
        }
        for t in order {
            if let Some(messages) = by_type.remove(&t) {
                self.out.push_back(Output::ToDevice(ToDeviceBatch {
                    event_type: t.as_str().into(),
                    messages,
                }));
            }
        }
    }

    fn event(&mut self, e: CallEvent) {
        self.out.push_back(Output::Event(e));
    }

    // ------------------------------------------------------------------
    // Incoming signalling

    /// A to-device message. What was done with it comes out first as an
    /// [`Output::Signalling`], ahead of the outputs it caused.
    pub fn handle_to_device(&mut self, now: impl Into<Now>, m: IncomingToDevice) {
        let now = self.clock(now.into());
        let at = self.out.len();
        let (sender, event_type, encrypted) =
            (truncate(&m.sender), truncate(&m.event_type), m.encrypted);
        let outcome = self.receive_to_device(now, m);
        if let Err(e) = &outcome {
            debug!("signalling ignored: {e}");
        }
        self.out.insert(
            at.min(self.out.len()),
            Output::Signalling(SignallingReport {
                sender,
                event_type,
                encrypted,
                outcome,
            }),
        );
        self.flush();
    }

    fn receive_to_device(&mut self, now: u64, m: IncomingToDevice) -> Result<Accepted, Ignored> {
        if MessageType::from_event_type(&m.event_type).is_none() {
            return Err(Ignored::NotSignalling(truncate(&m.event_type)));
        }
        let Some(j) = &self.joined else {
            return Err(Ignored::NotJoined);
        };
        let (conf, session) = (j.call_id.clone(), j.session_id.clone());
        if self.cfg.require_encrypted && !m.encrypted {
            return Err(Ignored::Unencrypted);
        }
        if !self.take_token(&m.sender, now) {
            return Err(Ignored::RateLimited(truncate(&m.sender)));
        }
        let msg = Message::parse(&m.event_type, &m.content)?;
        if msg.common.conf_id != conf {
            return Err(Ignored::OtherCall(msg.common.conf_id));
        }
        if msg.common.dest_session_id != session {
            return Err(Ignored::WrongSession(msg.common.dest_session_id));
        }
        // The sending device: named in the message (required on invites
        // only), known from Olm, or else the peer whose call this is.
        let device_id = match (&msg.common.device_id, &m.sender_device) {
            (Some(claimed), Some(actual)) if claimed != actual => {
                return Err(Ignored::DeviceMismatch {
                    claimed: claimed.clone(),
                    actual: actual.clone(),
                });
            }
            (Some(d), _) | (None, Some(d)) => d.clone(),
            (None, None) => self
                .peers
                .values()
                .find(|p| p.remote.user_id == m.sender && p.call_id == msg.common.call_id)
                .map(|p| p.remote.device_id.clone())
                .ok_or_else(|| Ignored::UnknownCall(truncate(&msg.common.call_id)))?,
        };
        let key = DeviceKey::new(m.sender, device_id);
        if key == self.me {
            return Err(Ignored::OwnEcho);
        }
        let known = self.room.participants().get(&key).is_some_and(|p| {
            msg.common
                .sender_session_id
                .as_ref()
                .is_none_or(|s| *s == p.session_id)
        });
        // Messages of our call with it are its answer (or its end): the
        // state machine takes those.
        let other_call = self
            .peers
            .get(&key)
            .is_none_or(|p| p.call_id != msg.common.call_id);
        if known && other_call {
            self.device_active(now, &key);
        }
        if !known {
            let held = self.held.entry(key.clone()).or_default();
            if held.len() >= MAX_HELD_PER_DEVICE {
                return Err(Ignored::Overflow);
            }
            debug!(device = %key, "holding signalling until the sender's member event arrives");
            held.push((now, msg, m.encrypted));
            return Ok(Accepted::HeldForMembership);
        }
        let r = self.accept_from_member(now, key, msg);
        self.mesh(now);
        r
    }

    fn accept_from_member(
        &mut self,
        now: u64,
        key: DeviceKey,
        msg: Message,
    ) -> Result<Accepted, Ignored> {
        let bkey = (key.clone(), msg.common.call_id.clone());
        if !self.reorder.contains_key(&bkey) {
            let n = self.reorder.keys().filter(|(d, _)| *d == key).count();
            if n >= MAX_BUFFERS_PER_DEVICE {
                // Drop the oldest-named buffers of that device that have no peer.
                let live = self.peers.get(&key).map(|p| p.call_id.clone());
                self.reorder
                    .retain(|(d, c), _| *d != key || Some(c) == live.as_ref());
            }
        }
        let buf = self
            .reorder
            .entry(bkey)
            .or_insert_with(|| ReorderBuffer::new(REORDER_CAPACITY));
        // An invite is kept aside: a repeated one still matters.
        let invite = matches!(msg.body, Body::Invite(_)).then(|| msg.clone());
        match buf.push(msg.common.seq, msg, now) {
            Pushed::Released(msgs) => {
                let mut first = Ok(Accepted::Processed);
                for (i, m) in msgs.into_iter().enumerate() {
                    let r = self.process(now, &key, m);
                    if i == 0 {
                        first = r.map(|_| Accepted::Processed);
                    }
                }
                first
            }
            Pushed::Buffered => Ok(Accepted::Reordered),
            Pushed::Duplicate => match invite {
                Some(msg) => self.on_repeated_invite(now, &key, msg),
                None => Err(Ignored::Duplicate),
            },
            Pushed::Overflow => Err(Ignored::Overflow),
        }
    }

    fn release_held(&mut self, now: u64, device: &DeviceKey) {
        let Some(session) = self
            .room
            .participants()
            .get(device)
            .map(|p| p.session_id.clone())
        else {
            return;
        };
        let Some(held) = self.held.remove(device) else {
            return;
        };
        let (ready, keep): (Vec<_>, Vec<_>) = held.into_iter().partition(|(_, m, _)| {
            m.common
                .sender_session_id
                .as_ref()
                .is_none_or(|s| *s == session)
        });
        if !keep.is_empty() {
            self.held.insert(device.clone(), keep);
        }
        for (_, m, _) in ready {
            if let Err(e) = self.accept_from_member(now, device.clone(), m) {
                debug!(%device, "held signalling ignored: {e}");
            }
        }
    }

    fn take_token(&mut self, sender: &str, now: u64) -> bool {
        let burst = f64::from(self.cfg.rate_burst);
        let b = self.buckets.entry(sender.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_sub(b.at) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * f64::from(self.cfg.rate_per_sec)).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn process(&mut self, now: u64, key: &DeviceKey, msg: Message) -> Result<(), Ignored> {
        let call_id = msg.common.call_id.clone();
        if let Body::Invite(inv) = msg.body {
            return self.on_invite(now, key, msg.common, inv);
        }
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
                if let Some(meta) = a.sdp_stream_metadata {
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
    fn on_repeated_invite(
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

    fn on_invite(
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
    fn reject_foreign(&mut self, key: &DeviceKey, common: &CommonFields, why: &str) {
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

    fn on_negotiate(&mut self, now: u64, key: &DeviceKey, n: Negotiate) -> Result<(), Ignored> {
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

    fn update_remote_feeds(&mut self, key: &DeviceKey, meta: SdpStreamMetadata, full: bool) {
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

    fn device_of(&self, handle: PeerHandle) -> Option<DeviceKey> {
        self.peers
            .values()
            .find(|p| p.handle == handle)
            .map(|p| p.remote.clone())
    }

    fn media(&mut self, now: u64, ev: MediaEvent) {
        let handle = match &ev {
            MediaEvent::OfferCreated { peer, .. }
            | MediaEvent::AnswerCreated { peer, .. }
            | MediaEvent::LocalCandidates { peer, .. }
            | MediaEvent::State { peer, .. }
            | MediaEvent::Error { peer, .. } => *peer,
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
                    Self::mark_signalled(
                        peer,
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
                    Self::mark_signalled(
                        peer,
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
                    Self::mark_signalled(
                        peer,
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
                    Self::mark_signalled(
                        peer,
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
        }
    }

    fn mark_signalled(peer: &mut Peer, now: u64, gathering_complete: bool, delay: u64) {
        peer.signalled_at = Some(now);
        if gathering_complete {
            // Everything is in the SDP already; nothing to trickle.
            peer.candidates_flush_at = None;
        } else if !peer.local_candidates.is_empty() || peer.candidates_flush_at.is_none() {
            peer.candidates_flush_at = Some(now + delay);
        }
    }

    fn flush_candidates(&mut self, now: u64, key: &DeviceKey) {
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

    fn on_media_state(&mut self, now: u64, key: &DeviceKey, state: MediaState) {
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
                    self.event(CallEvent::PeerState {
                        device: key.clone(),
                        peer: handle,
                        call_id,
                        status: PeerStatus::Connected,
                    });
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

    fn renegotiate(&mut self, now: u64, key: &DeviceKey, ice_restart: bool) {
        let feeds = self.local_feeds();
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
        }));
    }

    fn after_stable(&mut self, now: u64, key: &DeviceKey) {
        if self
            .peers
            .get(key)
            .is_some_and(|p| p.renegotiate_needed && p.stable())
        {
            self.renegotiate(now, key, false);
        }
    }

    // ------------------------------------------------------------------
    // Time

    /// When [`GroupCall::handle_timeout`] should be called next, on the
    /// monotonic clock ([`Now::mono_ms`]).
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t: Option<u64> = None;
        let mut at = |x: u64| t = Some(t.map_or(x, |t| t.min(x)));
        if let Some(x) = self.room.next_expiry() {
            at(self.mono_of_wall(x));
        }
        let Some(j) = &self.joined else { return t };
        at(j.refresh_at);
        for p in self.peers.values() {
            if let Some(d) = self.phase_deadline(p) {
                at(d);
            }
            if let Some(o) = p.orphaned_since {
                at(o + self.cfg.orphan_grace_ms);
            }
            if let Some((_, sent, _)) = &p.offer_in_flight {
                at(sent + self.cfg.retry_interval_ms);
            }
            if let Some(x) = p.candidates_flush_at {
                at(x);
            }
            if let Some(x) = p.resend_at {
                at(x);
            }
        }
        for (k, r) in &self.retry {
            if !self.peers.contains_key(k) && self.room.participants().contains_key(k) {
                at(r.not_before);
            }
        }
        for b in self.reorder.values() {
            if let Some(x) = b.deadline(self.cfg.reorder_gap_timeout_ms) {
                at(x);
            }
        }
        for held in self.held.values() {
            if let Some((first, _, _)) = held.first() {
                at(first + self.cfg.unknown_sender_grace_ms);
            }
        }
        t
    }

    fn phase_deadline(&self, p: &Peer) -> Option<u64> {
        match p.phase {
            Phase::InviteSent => Some(p.phase_since.saturating_add(p.lifetime)),
            // Callee whose answer the caller has not confirmed: the caller
            // may still be sending its invite again (our answer lost), so
            // wait for it as long as its invite is open (bounded).
            Phase::Connecting if p.direction == Direction::Inbound && p.kept.is_some() => Some(
                (p.phase_since + self.cfg.connect_timeout_ms).max(
                    p.opened_at
                        .saturating_add(p.lifetime.min(self.cfg.max_backoff_ms)),
                ),
            ),
            Phase::CreatingOffer
            | Phase::CreatingAnswer
            | Phase::Connecting
            | Phase::Restarting => Some(p.phase_since + self.cfg.connect_timeout_ms),
            Phase::Connected => None,
        }
    }

    /// Processes everything due at `now`.
    pub fn handle_timeout(&mut self, now: impl Into<Now>) {
        let now = self.clock(now.into());
        let changes = self.room.tick(self.wall(now));
        self.on_room_changes(now, changes);
        if self.joined.as_ref().is_some_and(|j| now >= j.refresh_at) {
            self.publish_membership(now);
        }
        // Peers whose device stayed gone.
        let gone: Vec<DeviceKey> = self
            .peers
            .values()
            .filter(|p| {
                p.orphaned_since
                    .is_some_and(|o| now >= o + self.cfg.orphan_grace_ms)
            })
            .map(|p| p.remote.clone())
            .collect();
        for device in gone {
            self.close_peer(&device, false, "participant_left", false);
            self.forget_device(&device);
        }
        // Renegotiation offers without an answer: send again, then give up
        // on the call (the designated caller calls again).
        let unanswered: Vec<(DeviceKey, u32)> = self
            .peers
            .values()
            .filter_map(|p| match &p.offer_in_flight {
                Some((_, sent, resends)) if now >= sent + self.cfg.retry_interval_ms => {
                    Some((p.remote.clone(), *resends))
                }
                _ => None,
            })
            .collect();
        for (device, resends) in unanswered {
            if resends < self.cfg.max_retries {
                let Some(n) = self.peers.get_mut(&device).and_then(|p| {
                    let (n, sent, count) = p.offer_in_flight.as_mut()?;
                    *sent = now;
                    *count += 1;
                    Some(n.clone())
                }) else {
                    continue;
                };
                info!(%device, "renegotiation offer unanswered; sending it again");
                self.send(&device, Body::Negotiate(n));
            } else {
                warn!(%device, "renegotiation offer never answered; hanging up");
                self.close_peer(&device, true, reason::SIGNALLING_FAILED, true);
            }
        }
        // Unanswered invites: the same invite again (same seq), at doubling
        // intervals, until its lifetime ends.
        let resend: Vec<DeviceKey> = self
            .peers
            .values()
            .filter(|p| p.phase == Phase::InviteSent && p.resend_at.is_some_and(|t| now >= t))
            .map(|p| p.remote.clone())
            .collect();
        for device in resend {
            let Some(resends) = self.peers.get(&device).map(|p| p.resends + 1) else {
                continue;
            };
            // Every retry interval while we are within the MSC's retries
            // (the first call and 3 more): a lost message costs at most that
            // long, as with the reference's re-invites. Beyond them, the
            // backed-off calls' copies come at doubling intervals.
            let beyond_msc = self
                .retry
                .get(&device)
                .is_some_and(|r| r.calls_placed > self.cfg.max_retries + 1);
            let wait = if beyond_msc {
                self.backoff(
                    self.cfg.retry_interval_ms,
                    resends + self.cfg.max_retries + 1,
                )
            } else {
                self.cfg.retry_interval_ms
            };
            if let Some(p) = self.peers.get_mut(&device) {
                p.resends = resends;
                p.resend_at = Some(now.saturating_add(wait));
            }
            self.resend_kept(now, &device);
        }
        // Peer deadlines.
        let due: Vec<(DeviceKey, Phase)> = self
            .peers
            .values()
            .filter(|p| self.phase_deadline(p).is_some_and(|d| now >= d))
            .map(|p| (p.remote.clone(), p.phase))
            .collect();
        for (key, phase) in due {
            let (why, failed) = match phase {
                Phase::InviteSent => (reason::INVITE_TIMEOUT, true),
                Phase::Restarting => (reason::ICE_TIMEOUT, true),
                Phase::Connecting => (reason::ICE_FAILED, true),
                _ => (reason::USER_MEDIA_FAILED, true),
            };
            info!(device = %key, reason = why, "peer timed out");
            self.close_peer(&key, true, why, failed);
        }
        let flush: Vec<DeviceKey> = self
            .peers
            .values()
            .filter(|p| p.candidates_flush_at.is_some_and(|t| now >= t))
            .map(|p| p.remote.clone())
            .collect();
        for key in flush {
            self.flush_candidates(now, &key);
        }
        // Reorder gaps.
        let gap = self.cfg.reorder_gap_timeout_ms;
        let keys: Vec<_> = self
            .reorder
            .iter()
            .filter(|(_, b)| b.deadline(gap).is_some_and(|d| now >= d))
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let msgs = self
                .reorder
                .get_mut(&k)
                .map(|b| b.expire(now, gap))
                .unwrap_or_default();
            if !msgs.is_empty() {
                warn!(device = %k.0, call_id = %k.1, "seq gap timed out; continuing with {} buffered messages", msgs.len());
            }
            for m in msgs {
                if let Err(e) = self.process(now, &k.0, m) {
                    debug!("released message ignored: {e}");
                }
            }
        }
        // Held messages past their grace.
        let grace = self.cfg.unknown_sender_grace_ms;
        for (device, held) in self.held.iter_mut() {
            let before = held.len();
            let out = &mut self.out;
            held.retain(|(t, m, encrypted)| {
                let keep = now < t + grace;
                if !keep {
                    out.push_back(Output::Signalling(SignallingReport {
                        sender: device.user_id.clone(),
                        event_type: m.message_type().as_str().into(),
                        encrypted: *encrypted,
                        outcome: Err(Ignored::NotParticipant(truncate(&device.device_id))),
                    }));
                }
                keep
            });
            if held.len() < before {
                warn!(%device, "dropped {} messages from a device that never joined the call", before - held.len());
            }
        }
        self.held.retain(|_, h| !h.is_empty());
        self.ended_calls
            .retain(|_, t| now < t.saturating_add(ENDED_CALL_MEMORY_MS));
        self.mesh(now);
        self.flush();
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}
