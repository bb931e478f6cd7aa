//! One participant in one room's call: [`GroupCall`], the core's public face.
//!
//! The work is split by job, one file each, all methods of [`GroupCall`]:
//! - `orchestrate`: room-level orchestration: room state, commands, our
//!   membership, the mesh plan and its retries;
//! - `admission`: what incoming to-device messages get in (rate limits,
//!   filtering, holding for the member event, `seq` reordering);
//! - `peer`: the per-peer MSC2746 state machine (invite / answer /
//!   candidates / negotiate / hangup, glare, media results, ICE restart);
//! - this file: the public entry points, sending, and timers.

use std::collections::{BTreeMap, VecDeque};

use tracing::{debug, info, warn};

use crate::events::FeedPurpose;
use crate::ids::{DeviceKey, IdGen};
use crate::reorder::ReorderBuffer;
use crate::room::RoomCallState;
use crate::signalling::{
    Body, CommonFields, Message, MessageType, SdpStreamMetadata, StreamMetadata, Version, reason,
};
use crate::types::*;

const REORDER_CAPACITY: usize = 64;
const MAX_HELD_PER_DEVICE: usize = 32;
const MAX_BUFFERS_PER_DEVICE: usize = 16;
const MAX_PENDING_REMOTE_CANDIDATES: usize = 512;
const ENDED_CALL_MEMORY_MS: u64 = 10 * 60 * 1000;

mod admission;
mod focus;
mod orchestrate;
mod peer;

use admission::Bucket;
use peer::{Peer, Phase};

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
    /// Our focus's call ended (failed, hung up, unanswered) and has not
    /// connected since: members that use a focus are called in the mesh
    /// meanwhile.
    focus_down: bool,
    /// The data-channel side of our link with the focus.
    focus_link: focus::FocusLink,
    /// The focus we publish to now (`Config::focus`, or the members' with
    /// `Config::follow_foci`).
    active_focus: Option<crate::events::FocusRef>,
}

impl GroupCall {
    /// A participant that is not in a call yet.
    pub fn new(cfg: Config) -> Self {
        let mut room = RoomCallState::new();
        room.set_require_room_membership(cfg.require_room_membership);
        let active_focus = cfg.focus.clone();
        Self {
            active_focus,
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
            focus_down: false,
            focus_link: focus::FocusLink::default(),
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
    // Sending

    fn send(&mut self, device: &DeviceKey, body: Body) {
        // Renegotiation with our focus goes over its data channel.
        let Some(body) = self.via_focus_channel(device, body) else {
            return;
        };
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
            if let Some(d) = p.deadline(&self.cfg) {
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
        if let Some(x) = self.focus_ping_deadline() {
            at(x);
        }
        for (k, r) in &self.retry {
            if !self.peers.contains_key(k)
                && (self.room.participants().contains_key(k) || self.is_focus(k))
            {
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

    /// Processes everything due at `now`.
    pub fn handle_timeout(&mut self, now: impl Into<Now>) {
        let now = self.clock(now.into());
        let changes = self.room.tick(self.wall(now));
        self.on_room_changes(now, changes);
        if self.joined.as_ref().is_some_and(|j| now >= j.refresh_at) {
            self.publish_membership(now);
        }
        self.check_focus_pings(now);
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
            .filter(|p| p.deadline(&self.cfg).is_some_and(|d| now >= d))
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
