//! The client's side of MSC3898 over the focus peer's data channel: the
//! focus's metadata (who publishes what), our subscriptions, renegotiation
//! over the channel (the focus is the polite side), and ping/pong.
//!
//! The focus peer itself is an ordinary [`Peer`](super::peer::Peer) placed by
//! the mesh plan (see `orchestrate.rs`); this file adds what the channel
//! carries once it is open.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use tracing::{debug, info, warn};

use crate::dc::{self, DcMessage, TrackRef, TrackRequest, TrackSubscription};
use crate::ids::DeviceKey;
use crate::signalling::{Body, Negotiate};
use crate::types::*;

use super::GroupCall;

/// Why we hang up on a focus whose pings stopped.
pub const FOCUS_PING_TIMEOUT: &str = "focus_ping_timeout";
/// Why we hang up on a focus whose data channel closed.
pub const FOCUS_CHANNEL_CLOSED: &str = "focus_channel_closed";
/// Why we hang up on a focus whose media stopped (no packets).
pub const FOCUS_UNREACHABLE: &str = "focus_unreachable";
/// Why we hang up mesh calls with members we meet at the focus again.
pub const FOCUS_BACK: &str = "focus_back";
/// Why we hang up on a focus we leave for another.
pub const FOCUS_SWITCH: &str = "focus_switch";
/// Why we hang up on a draining focus once the mesh reaches everyone
/// (`m.call.focus_draining`).
pub const FOCUS_DRAINING: &str = "focus_draining";
/// Most past speakers remembered for
/// [`Config::focus_recent_speakers`](crate::Config::focus_recent_speakers)
/// (a larger N counts as this many).
pub const MAX_RECENT_SPEAKERS: usize = 64;

/// The state of our link with the focus, beside its peer.
#[derive(Debug, Clone, Default)]
pub(super) struct FocusLink {
    pub(super) channel_open: bool,
    /// The streams of other participants the focus offers, as its last
    /// metadata said, by stream id.
    pub(super) available: dc::SdpStreamMetadata,
    /// What we asked the focus for, with the size asked (video).
    pub(super) subscribed: BTreeMap<TrackRef, (Option<u32>, Option<u32>)>,
    /// Camera video sizes asked for per publisher
    /// ([`Command::FocusVideoSize`]), and for everyone else (`None` key).
    pub(super) video_sizes: BTreeMap<Option<DeviceKey>, (u32, u32)>,
    /// When the focus last pinged us (or the channel opened).
    pub(super) last_ping: u64,
    /// Publishers whose media we want through the focus (`None`: all).
    pub(super) only: Option<BTreeSet<DeviceKey>>,
    /// The active speakers the focus named, most recent first, each once
    /// (at most [`MAX_RECENT_SPEAKERS`]).
    pub(super) recent_speakers: VecDeque<DeviceKey>,
    /// The speaker the focus named last (`None`: nobody, or not said yet).
    pub(super) speaker: Option<DeviceKey>,
    /// The other foci we last asked the focus to connect to
    /// (`m.call.connect_to_focus`).
    pub(super) connect_asked: Vec<crate::events::FocusRef>,
    /// The focus said it is draining (`m.call.focus_draining`): we are in
    /// the mesh while its media still comes, until the mesh reaches
    /// everyone (or it hangs up).
    pub(super) draining: bool,
    /// When it said it hangs up (our clock), if it said.
    pub(super) drain_ends: Option<u64>,
}

impl GroupCall {
    /// Our focus's peer, if it has one and the channel is open: its key.
    fn open_focus(&self) -> Option<DeviceKey> {
        let key = self.focus_key()?;
        (self.peers.contains_key(&key) && self.focus_link.channel_open).then_some(key)
    }

    /// The focus peer's data channel opened.
    pub(super) fn focus_channel_open(&mut self, now: u64, key: &DeviceKey) {
        if !self.is_focus(key) {
            debug!(device = %key, "data channel on a mesh peer; ignored");
            return;
        }
        info!(device = %key, "focus data channel open");
        self.focus_link.channel_open = true;
        self.focus_link.last_ping = now;
        self.resubscribe();
        self.ask_focus_to_connect();
    }

    /// Whether our focus forwards `device`'s streams though it publishes to
    /// another focus (the two foci are linked): then we meet it there, not
    /// in the mesh.
    pub(super) fn reached_through_focus(&self, device: &DeviceKey) -> bool {
        self.focus_connected()
            && !self.is_focus(device)
            && self
                .focus_link
                .available
                .values()
                .any(|s| owned_by(s, device))
    }

    /// MSC3898: asks our focus to connect to the call's other foci (those
    /// the other members publish to), when that set changed.
    pub(super) fn ask_focus_to_connect(&mut self) {
        let Some(key) = self.open_focus() else {
            return;
        };
        let mut others: Vec<crate::events::FocusRef> = self
            .room
            .participants()
            .iter()
            .filter(|(k, _)| **k != self.me)
            .flat_map(|(_, p)| p.foci_active.iter())
            .filter(|f| self.active_focus.as_ref() != Some(*f))
            .cloned()
            .collect();
        others.sort();
        others.dedup();
        if others == self.focus_link.connect_asked {
            return;
        }
        self.focus_link.connect_asked = others.clone();
        if others.is_empty() {
            return;
        }
        info!(
            foci = others.len(),
            "asking our focus to connect to the call's other foci"
        );
        self.send_channel(&key, &DcMessage::ConnectToFocus { foci: others });
    }

    /// The focus peer's data channel closed: the focus is gone.
    pub(super) fn focus_channel_closed(&mut self, now: u64, key: &DeviceKey) {
        if !self.is_focus(key) || !self.focus_link.channel_open {
            return;
        }
        warn!(device = %key, "focus data channel closed");
        self.close_peer(key, true, FOCUS_CHANNEL_CLOSED, true);
        self.mesh(now);
    }

    /// The media of `key` changed state: if `key` is our connected focus and
    /// its media stopped, it is given up at once (restarting ICE with it is
    /// no use when the mesh is there to fall back to). Whether it was.
    pub(super) fn give_up_unreachable_focus(
        &mut self,
        now: u64,
        key: &DeviceKey,
        state: &MediaState,
    ) -> bool {
        let connected = self
            .peers
            .get(key)
            .is_some_and(|p| p.phase == super::peer::Phase::Connected);
        if !self.is_focus(key)
            || !connected
            || !matches!(state, MediaState::Disconnected | MediaState::Failed)
        {
            return false;
        }
        warn!(device = %key, ?state, "our focus is unreachable");
        self.close_peer(key, true, FOCUS_UNREACHABLE, true);
        self.mesh(now);
        true
    }

    /// A message on the focus peer's data channel.
    pub(super) fn focus_channel_message(&mut self, now: u64, key: &DeviceKey, text: &str) {
        if !self.is_focus(key) {
            debug!(device = %key, "data channel message from a mesh peer; ignored");
            return;
        }
        let msg = match DcMessage::parse(text.as_bytes()) {
            Ok(m) => m,
            Err(e) => {
                warn!(device = %key, "focus data channel message ignored: {e}");
                return;
            }
        };
        match msg {
            DcMessage::Ping => {
                self.focus_link.last_ping = now;
                self.send_channel(key, &DcMessage::Pong);
            }
            DcMessage::Pong => {}
            DcMessage::SdpStreamMetadataChanged {
                sdp_stream_metadata,
            } => {
                self.focus_metadata(sdp_stream_metadata, true);
                // Members at other foci may come (or stop coming) through
                // ours: the mesh follows.
                self.mesh(now);
            }
            DcMessage::Negotiate(n) => {
                let meta = n.sdp_stream_metadata.clone();
                let neg = Negotiate {
                    description: n.description(),
                    lifetime: None,
                    sdp_stream_metadata: None,
                    extra: Default::default(),
                };
                if let Err(e) = self.on_negotiate(now, key, neg) {
                    debug!(device = %key, "focus negotiate ignored: {e}");
                }
                // The streams of this negotiation only: added to what the
                // focus offers, nothing removed.
                if !meta.is_empty() {
                    self.focus_metadata(meta, false);
                }
            }
            DcMessage::TrackSubscription(_) => {
                debug!(device = %key, "track subscription from the focus; ignored");
            }
            DcMessage::ActiveSpeaker(speaker) => self.focus_speaker(speaker),
            DcMessage::FocusDraining { hangup_in_ms } => {
                self.focus_draining(now, key, hangup_in_ms);
            }
            other => debug!(device = %key, "focus message {} ignored", other.message_type()),
        }
    }

    /// Our focus is draining (`m.call.focus_draining`): make before break.
    /// We go to the mesh as if it were gone (our entry stops naming it, so
    /// members still at it call us or answer us directly, and we call
    /// those we should), but keep its peer: its media goes on while the
    /// mesh calls connect. Each member met in the mesh is unsubscribed at
    /// the focus; once the mesh reaches every other participant we hang up
    /// on the focus (`focus_draining`), else the focus hangs up at the end
    /// of its grace period. We try it again on the usual backoff, not
    /// before one retry interval after the time it said it stops (a
    /// restarted focus takes us back).
    fn focus_draining(&mut self, now: u64, key: &DeviceKey, hangup_in_ms: Option<u64>) {
        if self.focus_link.draining {
            return;
        }
        info!(device = %key, ?hangup_in_ms, "our focus is draining; moving to the mesh before it hangs up");
        self.focus_link.draining = true;
        self.focus_link.drain_ends = hangup_in_ms.map(|ms| now.saturating_add(ms));
        self.mark_focus_down(now);
        self.mesh(now);
    }

    /// While our focus drains: stop taking through it what the mesh
    /// carries now, and hang up on it once the mesh reaches every other
    /// participant. Runs with every mesh plan and when a peer connects.
    pub(super) fn follow_focus_drain(&mut self) {
        if !self.focus_link.draining {
            return;
        }
        let Some(focus) = self.focus_key().filter(|k| self.peers.contains_key(k)) else {
            return;
        };
        self.resubscribe();
        let all = self
            .room
            .participants()
            .keys()
            .filter(|k| **k != self.me && !self.is_focus(k))
            .all(|k| self.met_in_mesh(k));
        if all {
            info!(device = %focus, "the mesh reaches everyone: leaving the draining focus");
            let ends = self.focus_link.drain_ends;
            self.close_peer(&focus, true, FOCUS_DRAINING, false);
            // It would turn a call down until it stops: not called again
            // before then, nor in the retry interval after (at its end it
            // hangs up and exits: a call placed at that moment races its
            // exit and is turned down). A restarted focus takes us back
            // after that.
            let margin = self.cfg.retry_interval_ms;
            if let (Some(ends), Some(r)) = (ends, self.retry.get_mut(&focus)) {
                r.not_before = r.not_before.max(ends.saturating_add(margin));
            }
        }
    }

    /// Whether a connected mesh call (not the focus's) carries `device`.
    fn met_in_mesh(&self, device: &DeviceKey) -> bool {
        !self.is_focus(device)
            && self
                .peers
                .get(device)
                .is_some_and(|p| p.phase == super::peer::Phase::Connected)
    }

    /// The focus's metadata: the streams of the call it forwards, each with
    /// its publisher (`full`: all of them, as in
    /// `m.call.sdp_stream_metadata_changed`; else some, as in a
    /// negotiation). Feeds of other participants are reported as theirs;
    /// then we subscribe to every track we do not have.
    fn focus_metadata(&mut self, meta: dc::SdpStreamMetadata, full: bool) {
        let me = self.me.clone();
        let mut theirs: dc::SdpStreamMetadata = meta
            .into_iter()
            .filter(|(_, s)| match (&s.user_id, &s.device_id) {
                (Some(u), Some(d)) => !(*u == me.user_id && *d == me.device_id),
                _ => false,
            })
            .collect();
        if !full {
            // Some streams, some of their tracks: what is known stays.
            for (id, known) in &self.focus_link.available {
                match theirs.get_mut(id) {
                    Some(s) => {
                        for (t, m) in &known.tracks {
                            s.tracks.entry(t.clone()).or_insert(*m);
                        }
                    }
                    None => {
                        theirs.insert(id.clone(), known.clone());
                    }
                }
            }
        }
        let old = std::mem::replace(&mut self.focus_link.available, theirs.clone());
        let owner = |s: &dc::StreamMetadata| {
            DeviceKey::new(
                s.user_id.clone().unwrap_or_default(),
                s.device_id.clone().unwrap_or_default(),
            )
        };
        for (id, s) in &theirs {
            let e = match old.get(id) {
                None => Some(CallEvent::FeedAdded {
                    device: owner(s),
                    stream_id: id.clone(),
                    purpose: s.purpose.clone(),
                    audio_muted: s.audio_muted,
                    video_muted: s.video_muted,
                }),
                Some(o)
                    if o.audio_muted != s.audio_muted
                        || o.video_muted != s.video_muted
                        || o.purpose != s.purpose =>
                {
                    Some(CallEvent::FeedChanged {
                        device: owner(s),
                        stream_id: id.clone(),
                        purpose: s.purpose.clone(),
                        audio_muted: s.audio_muted,
                        video_muted: s.video_muted,
                    })
                }
                Some(_) => None,
            };
            if let Some(e) = e {
                self.event(e);
            }
        }
        for (id, s) in &old {
            if !theirs.contains_key(id) {
                self.event(CallEvent::FeedRemoved {
                    device: owner(s),
                    stream_id: id.clone(),
                });
            }
        }
        self.resubscribe();
    }

    /// The focus named the call's active speaker: the application is told,
    /// and with [`Config::focus_recent_speakers`](crate::Config::focus_recent_speakers)
    /// the video we receive follows.
    fn focus_speaker(&mut self, speaker: Option<dc::ActiveSpeaker>) {
        let (device, stream_id) = match speaker {
            Some(s) => (Some(DeviceKey::new(s.user_id, s.device_id)), s.stream_id),
            None => (None, None),
        };
        debug!(speaker = ?device.as_ref().map(ToString::to_string), "active speaker");
        self.focus_link.speaker = device.clone();
        if let Some(d) = &device {
            let recent = &mut self.focus_link.recent_speakers;
            recent.retain(|r| r != d);
            recent.push_front(d.clone());
            recent.truncate(MAX_RECENT_SPEAKERS);
        }
        self.event(CallEvent::ActiveSpeaker { device, stream_id });
        self.resubscribe();
    }

    /// Chooses how many recent speakers' video we receive through the focus
    /// (`None`: everyone's).
    pub(super) fn set_focus_recent_speakers(&mut self, n: Option<usize>) {
        self.cfg.focus_recent_speakers = n;
        self.resubscribe();
    }

    /// The publishers whose camera video we want in recent-speakers mode:
    /// the N most recent speakers among those the focus offers now (`None`:
    /// the mode is off).
    fn video_speakers(&self) -> Option<BTreeSet<DeviceKey>> {
        let n = self.cfg.focus_recent_speakers?;
        let offered = |d: &DeviceKey| self.focus_link.available.values().any(|s| owned_by(s, d));
        Some(
            self.focus_link
                .recent_speakers
                .iter()
                .filter(|d| offered(d))
                .take(n.min(MAX_RECENT_SPEAKERS))
                .cloned()
                .collect(),
        )
    }

    /// Asks the focus for camera video of `device` (`None`: of everyone
    /// without a size of their own) at `size` (`None`: back to the size the
    /// focus advertises). The focus picks the simulcast layer closest to it.
    pub(super) fn set_focus_video_size(
        &mut self,
        device: Option<DeviceKey>,
        size: Option<(u32, u32)>,
    ) {
        match size {
            Some(size) => {
                self.focus_link.video_sizes.insert(device, size);
            }
            None => {
                self.focus_link.video_sizes.remove(&device);
            }
        }
        self.resubscribe();
    }

    /// Chooses whose media we receive through the focus (`None`: all).
    pub(super) fn set_focus_subscriptions(&mut self, only: Option<Vec<DeviceKey>>) {
        self.focus_link.only = only.map(|v| v.into_iter().collect());
        self.resubscribe();
    }

    /// Sends the subscription changes that bring what we receive in line
    /// with what the focus offers (everything of everyone else, or of the
    /// publishers chosen with [`Command::FocusSubscriptions`]; in
    /// recent-speakers mode, camera video of the recent speakers only: a
    /// track whose kind the focus did not name is kept).
    fn resubscribe(&mut self) {
        let Some(key) = self.open_focus() else { return };
        let only = self.focus_link.only.clone();
        // Draining: members the mesh carries now are not taken through it.
        let in_mesh: Vec<&DeviceKey> = if self.focus_link.draining {
            self.peers.keys().filter(|k| self.met_in_mesh(k)).collect()
        } else {
            Vec::new()
        };
        let speakers = self.video_speakers();
        let sizes = &self.focus_link.video_sizes;
        let wanted: BTreeMap<TrackRef, (Option<u32>, Option<u32>)> = self
            .focus_link
            .available
            .iter()
            .filter(|(_, s)| {
                only.as_ref()
                    .is_none_or(|only| only.iter().any(|d| owned_by(s, d)))
                    && !in_mesh.iter().any(|d| owned_by(s, d))
            })
            .flat_map(|(stream_id, s)| {
                let camera = s.purpose == crate::events::FeedPurpose::Usermedia;
                // In recent-speakers mode a camera stream of someone else
                // keeps its audio only.
                let audio_only = camera
                    && speakers
                        .as_ref()
                        .is_some_and(|sp| !sp.iter().any(|d| owned_by(s, d)));
                // The camera size asked for this publisher, or for everyone.
                let asked = camera
                    .then(|| {
                        sizes
                            .iter()
                            .find(|(d, _)| d.as_ref().is_some_and(|d| owned_by(s, d)))
                            .or_else(|| sizes.get_key_value(&None))
                            .map(|(_, size)| *size)
                    })
                    .flatten();
                s.tracks
                    .iter()
                    .filter(move |(_, t)| !(audio_only && t.kind == Some(dc::MediaKind::Video)))
                    .map(move |(track_id, t)| {
                        let video = t.kind == Some(dc::MediaKind::Video)
                            || (t.kind.is_none() && t.width.is_some());
                        let size = match asked {
                            Some((w, h)) if video => (Some(w), Some(h)),
                            _ => (t.width, t.height),
                        };
                        (
                            TrackRef {
                                stream_id: stream_id.clone(),
                                track_id: track_id.clone(),
                            },
                            size,
                        )
                    })
            })
            .collect();
        // New tracks, and tracks asked for at another size (MSC3898: a
        // subscribe to a track already received changes its size).
        let subscribe: Vec<TrackRequest> = wanted
            .iter()
            .filter(|(t, size)| self.focus_link.subscribed.get(*t) != Some(*size))
            .map(|(t, (width, height))| TrackRequest {
                stream_id: t.stream_id.clone(),
                track_id: t.track_id.clone(),
                width: *width,
                height: *height,
            })
            .collect();
        let unsubscribe: Vec<TrackRef> = self
            .focus_link
            .subscribed
            .keys()
            .filter(|t| !wanted.contains_key(*t))
            .cloned()
            .collect();
        if subscribe.is_empty() && unsubscribe.is_empty() {
            return;
        }
        debug!(
            subscribe = ?subscribe.iter().map(|t| &t.track_id).collect::<Vec<_>>(),
            unsubscribe = ?unsubscribe.iter().map(|t| &t.track_id).collect::<Vec<_>>(),
            "focus subscriptions"
        );
        self.focus_link.subscribed = wanted;
        self.send_channel(
            &key,
            &DcMessage::TrackSubscription(TrackSubscription {
                subscribe,
                unsubscribe,
            }),
        );
    }

    /// Sends `body` to our focus over the data channel if it is a
    /// renegotiation and the channel is open. Returns `body` back otherwise
    /// (it goes as a to-device message).
    pub(super) fn via_focus_channel(&mut self, device: &DeviceKey, body: Body) -> Option<Body> {
        let Body::Negotiate(n) = body else {
            return Some(body);
        };
        if self.open_focus().as_ref() != Some(device) {
            return Some(Body::Negotiate(n));
        }
        let sdp_type = if n.description.is_offer() {
            dc::SdpType::Offer
        } else {
            dc::SdpType::Answer
        };
        let meta = n
            .sdp_stream_metadata
            .unwrap_or_default()
            .iter()
            .map(|(id, m)| (id.clone(), dc::StreamMetadata::from_proto(m)))
            .collect();
        self.send_channel(
            device,
            &DcMessage::Negotiate(dc::Negotiate {
                sdp_type,
                sdp: n.description.sdp,
                sdp_stream_metadata: meta,
            }),
        );
        None
    }

    fn send_channel(&mut self, device: &DeviceKey, msg: &DcMessage) {
        let Some(peer) = self.peers.get(device).map(|p| p.handle) else {
            return;
        };
        match msg.encode() {
            Ok(text) => self
                .out
                .push_back(Output::Media(MediaRequest::SendChannel { peer, text })),
            Err(e) => warn!(%device, "data channel message not sent: {e}"),
        }
    }

    /// When the focus's pings are overdue.
    pub(super) fn focus_ping_deadline(&self) -> Option<u64> {
        self.open_focus()?;
        Some(
            self.focus_link
                .last_ping
                .saturating_add(self.cfg.focus_ping_timeout_ms),
        )
    }

    /// Hangs up on a focus whose pings stopped (it may be unable to send:
    /// we time out all the same); the mesh takes over.
    pub(super) fn check_focus_pings(&mut self, now: u64) {
        if let (Some(key), Some(at)) = (self.open_focus(), self.focus_ping_deadline())
            && now >= at
        {
            warn!(device = %key, "no ping from the focus for {} ms; hanging up", self.cfg.focus_ping_timeout_ms);
            self.close_peer(&key, true, FOCUS_PING_TIMEOUT, true);
            self.mesh(now);
        }
    }

    /// The focus to publish to now: [`Config::focus`], or with
    /// [`Config::follow_foci`] the members' choice (MSC3898 "Choosing a
    /// focus", without its latency probing): our preferred focus when
    /// another member is active on it or prefers it too, else the focus most
    /// other members are active on (the current one on a tie, else the
    /// smallest), else our preferred one.
    ///
    /// [`Config::focus`]: crate::Config::focus
    /// [`Config::follow_foci`]: crate::Config::follow_foci
    pub(super) fn choose_focus(&self) -> Option<crate::events::FocusRef> {
        // A draining focus is kept until we leave it (its members stop
        // naming it as they go to the mesh: following them away would
        // drop its media before the mesh is up).
        if self.focus_link.draining {
            return self.active_focus.clone();
        }
        if !self.cfg.follow_foci {
            return self.cfg.focus.clone();
        }
        let mut used: std::collections::BTreeMap<&crate::events::FocusRef, usize> =
            std::collections::BTreeMap::new();
        let mut preferred_by_others = false;
        for (k, p) in self.room.participants() {
            if *k != self.me {
                for f in &p.foci_active {
                    *used.entry(f).or_default() += 1;
                }
                preferred_by_others |= self
                    .cfg
                    .focus
                    .as_ref()
                    .is_some_and(|f| p.foci_preferred.contains(f));
            }
        }
        // MSC3898: a focus another member uses or prefers, among ours.
        if let Some(pref) = &self.cfg.focus
            && (used.contains_key(pref) || preferred_by_others)
        {
            return Some(pref.clone());
        }
        let most = used.values().copied().max().unwrap_or(0);
        if most > 0 {
            if let Some(cur) = &self.active_focus
                && used.get(cur) == Some(&most)
            {
                return Some(cur.clone());
            }
            return used
                .iter()
                .find(|(_, n)| **n == most)
                .map(|(f, _)| (*f).clone());
        }
        self.cfg.focus.clone()
    }

    /// Moves to the focus [`GroupCall::choose_focus`] names, if it changed:
    /// the call with the previous focus ends (`focus_switch`), our entry
    /// names the new one, and the mesh plan calls it.
    pub(super) fn follow_focus(&mut self, now: u64) {
        let want = self.choose_focus();
        if want == self.active_focus {
            return;
        }
        info!(from = ?self.active_focus, to = ?want, "switching focus");
        let old = self.focus_key();
        if let Some(old) = old.filter(|k| self.peers.contains_key(k)) {
            // Ours, not the focus going: not a fallback. (Closing the
            // focus's peer clears the link with it.)
            self.close_peer(&old, true, FOCUS_SWITCH, false);
        }
        self.active_focus = want;
        self.focus_down = false;
        if self.joined.as_ref().is_some_and(|j| j.membership_published) {
            self.publish_membership(now);
        }
    }

    /// Whether our focus's peer is connected (and not given up).
    pub(super) fn focus_connected(&self) -> bool {
        !self.focus_down
            && self
                .focus_key()
                .and_then(|k| self.peers.get(&k))
                .is_some_and(|p| p.phase == super::peer::Phase::Connected)
    }

    /// We are connected to our focus (again): the mesh calls with members
    /// that publish to it, or (calls we placed) whose streams it forwards
    /// from their focus, end; we meet them at the focus. Runs when the focus comes back and
    /// with every mesh plan, as members return to it.
    pub(super) fn leave_mesh_for_focus(&mut self) {
        let Some(focus) = self.active_focus.clone() else {
            return;
        };
        let meet_there: Vec<DeviceKey> = self
            .peers
            .keys()
            .filter(|k| {
                self.room
                    .participants()
                    .get(*k)
                    .is_some_and(|p| p.foci_active.contains(&focus))
                    // A member at another focus: the caller decides (its
                    // focus may not forward ours yet; then the call stays).
                    || (self.reached_through_focus(k) && crate::ids::should_call(&self.me, k))
            })
            .cloned()
            .collect();
        for k in meet_there {
            info!(device = %k, "back at the focus: ending the mesh call");
            self.close_peer(&k, true, FOCUS_BACK, false);
        }
    }

    /// The focus peer closed: its streams are gone (the choice of
    /// publishers and of video sizes stays).
    pub(super) fn focus_closed(&mut self) {
        let only = self.focus_link.only.take();
        let sizes = std::mem::take(&mut self.focus_link.video_sizes);
        let link = std::mem::take(&mut self.focus_link);
        self.focus_link.only = only;
        self.focus_link.video_sizes = sizes;
        if link.speaker.is_some() {
            // Nobody is named the speaker any more.
            self.event(CallEvent::ActiveSpeaker {
                device: None,
                stream_id: None,
            });
        }
        for (id, s) in link.available {
            // Streams a mesh call also carries are not gone.
            if self
                .peers
                .values()
                .any(|p| p.remote_feeds.contains_key(&id))
            {
                continue;
            }
            self.event(CallEvent::FeedRemoved {
                device: DeviceKey::new(
                    s.user_id.unwrap_or_default(),
                    s.device_id.unwrap_or_default(),
                ),
                stream_id: id,
            });
        }
    }
}

/// Whether the focus's metadata names `d` as the publisher of stream `s`.
fn owned_by(s: &dc::StreamMetadata, d: &DeviceKey) -> bool {
    s.user_id.as_deref() == Some(d.user_id.as_str())
        && s.device_id.as_deref() == Some(d.device_id.as_str())
}
