//! The focus's orchestration, sans-IO: which clients are in which call,
//! what each publishes and subscribes to, and the conversations that keep
//! it so (to-device signalling, the data channel, authorisation, pings).
//!
//! [`Focus`] ties the other core modules together: [`crate::signal`] (the
//! to-device calls), [`crate::auth`] (one [`Authoriser`] per room),
//! [`crate::heartbeat`] (one per data channel) and the MSC3898 messages of
//! [`crate::dc`]. It does not move media: it tells the driver what to do
//! with each client's peer connection ([`MediaOp`]) and what the forwarder
//! should forward to whom ([`ForwardChange`]); the driver reports back what
//! the media layer did ([`MediaIn`]).
//!
//! Time is POSIX milliseconds (`u64`): member entries expire on the wall
//! clock, and the pings run on the same clock (a wall clock step makes at
//! most one early or late ping).
//!
//! Rules (docs/focus.md):
//! - an invite is answered only when the authoriser admits it; while the
//!   refusal may be the homeserver's lag (the caller's member event not
//!   synced yet) the invite is held for [`FocusConfig::hold_ms`] and checked
//!   again on every state change, then turned down (`m.call.reject` with
//!   the refusal's label);
//! - a call full ([`FocusConfig::max_participants_per_call`]) turns the
//!   invite down with `focus_full`: the client falls back to the mesh;
//! - a track is forwarded only to a subscriber of the same call, while both
//!   are admitted; when a client is revoked, hangs up, stops answering pings
//!   or its channel closes, everything it published or subscribed to stops
//!   at once ([`ForwardChange::RemoveClient`]) and the others' offers are
//!   renegotiated without its tracks;
//! - the focus is the polite side: a client's offer that crosses ours wins
//!   (the media layer rolls ours back), and ours is made again afterwards;
//! - cascading (with [`FocusConfig::cascade`]): the focus links with every
//!   other focus a live participant of a call it serves names in
//!   `m.foci.active`; of two foci, the one whose (user id, device id) sorts
//!   first places the call (an ordinary `m.call.invite` over Olm), the other
//!   admits it like a client's ([`Authoriser`]: a live participant names
//!   it). A link publishes over its channel only streams of the focus's own
//!   clients and asks the other focus only for the tracks its own clients
//!   subscribed to; a stream that came over a link goes to the focus's own
//!   clients only (each packet forwarded from its origin focus only: no
//!   loops, each stream over a link at most once). The caller of a link is
//!   its impolite side (a crossing offer of the other focus is ignored);
//! - the active speaker the forwarder names ([`Focus::handle_active_speaker`])
//!   goes to every client of the call as `m.call.active_speaker`, and to a
//!   client whose channel opens later.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use groupcall_proto::dc::{self, DcMessage, TrackRef};
use groupcall_proto::events::FeedPurpose;
use groupcall_proto::signalling::{Candidate, MessageType, SdpStreamMetadata};
use groupcall_proto::{DeviceKey, IncomingToDevice, OutgoingMessage, ParseError};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::auth::{AuthConfig, AuthOutput, Authoriser, InviteCheck, Refusal};
use crate::heartbeat::{Heartbeat, HeartbeatConfig, HeartbeatOutput, Role};
use crate::signal::{FocusSignalling, Signal, SignalError};

/// Reason a full call's invite is turned down with.
pub const FOCUS_FULL: &str = "focus_full";
/// Reason for turning invites down and hanging up while draining.
pub const FOCUS_SHUTDOWN: &str = "focus_shutdown";
/// Reason for hanging up on a client that stopped answering pings.
pub const PING_TIMEOUT: &str = "ping_timeout";
/// Reason for ending a cascade link the call no longer needs (no own
/// client left in it, or no participant names the other focus).
pub const LINK_UNNEEDED: &str = "link_unneeded";
/// How long our invite to another focus is valid.
pub const LINK_INVITE_LIFETIME_MS: u64 = 30_000;
/// First wait before calling another focus again after a link failed; it
/// doubles up to [`LINK_RETRY_MAX_MS`].
pub const LINK_RETRY_MS: u64 = 2_000;
/// Longest wait between calls to another focus.
pub const LINK_RETRY_MAX_MS: u64 = 30_000;

/// The orchestration's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FocusConfig {
    /// The focus's device id.
    pub device_id: String,
    /// The focus's session id (new at each start).
    pub session_id: String,
    /// Answer plaintext invites (off: Olm only).
    pub allow_plaintext: bool,
    /// Clients per call; more are turned down with `focus_full`.
    pub max_participants_per_call: usize,
    /// Tracks one client may publish; more are not forwarded.
    pub max_tracks_per_participant: usize,
    /// Ping interval and timeout of each data channel.
    pub heartbeat: HeartbeatConfig,
    /// How long an invite refused for a reason the homeserver's lag can
    /// explain is held and checked again (default 10 s).
    pub hold_ms: u64,
    /// The focus's user id (needed to find itself among the foci the
    /// participants name; empty: unknown, no cascading).
    pub user_id: String,
    /// Link with the other foci of the calls served (cascading; docs/protocol.md,
    /// "Cascading foci"). Off by default.
    pub cascade: bool,
}

impl FocusConfig {
    /// Defaults for the focus device `device_id` in session `session_id`.
    pub fn new(device_id: impl Into<String>, session_id: impl Into<String>) -> Self {
        Self {
            device_id: device_id.into(),
            session_id: session_id.into(),
            allow_plaintext: false,
            max_participants_per_call: 100,
            max_tracks_per_participant: 8,
            heartbeat: HeartbeatConfig::default(),
            hold_ms: 10_000,
            user_id: String::new(),
            cascade: false,
        }
    }
}

/// A client connection of the focus: names its peer connection too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum TrackKind {
    /// Audio.
    Audio,
    /// Video.
    Video,
}

/// A track a client sends to the focus, as its SDP names it (msid).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublishedTrack {
    /// The msid stream id.
    pub stream_id: String,
    /// The msid track id.
    pub track_id: String,
    /// Audio or video.
    pub kind: TrackKind,
}

/// A track the focus sends to a client: one of another client's tracks,
/// under the publisher's stream and track ids.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SendTrack {
    /// Whose track it is.
    pub publisher: ClientId,
    /// The track.
    pub track: PublishedTrack,
}

/// What the driver should do with a client's peer connection.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MediaOp {
    /// Accept the client's offer (a new peer connection in forwarding mode
    /// with the data channel, or a renegotiation); report
    /// [`MediaIn::Answer`].
    Accept {
        /// The offer.
        sdp: String,
        /// The tracks the answer sends (an answer adds none: those the
        /// client last agreed to; a yielded offer of ours does not count).
        tracks: Vec<SendTrack>,
    },
    /// Add the client's trickled candidates.
    AddRemoteCandidates {
        /// The candidates.
        candidates: Vec<Candidate>,
    },
    /// Make the client's send tracks exactly these and create an offer;
    /// report [`MediaIn::Offer`].
    Offer {
        /// The tracks the client receives.
        tracks: Vec<SendTrack>,
    },
    /// Apply the client's answer to our offer.
    ApplyAnswer {
        /// The answer.
        sdp: String,
    },
    /// Send a message on the data channel.
    SendChannel {
        /// JSON text.
        text: String,
    },
    /// Close the peer connection.
    Close,
}

/// What the media layer did with a client's peer connection.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MediaIn {
    /// The answer to [`MediaOp::Accept`].
    Answer {
        /// SDP.
        sdp: String,
    },
    /// The offer asked for by [`MediaOp::Offer`].
    Offer {
        /// SDP.
        sdp: String,
    },
    /// [`MediaOp::Offer`] failed: the client keeps what it has.
    OfferFailed {
        /// Why.
        reason: String,
    },
    /// Candidates found after the description.
    LocalCandidates {
        /// Candidates.
        candidates: Vec<Candidate>,
    },
    /// The tracks the client sends, as negotiated (complete list).
    RemoteTracks {
        /// The tracks.
        tracks: Vec<PublishedTrack>,
    },
    /// Media connected.
    Connected,
    /// The connection failed: the client is dropped and told (a hangup).
    Failed {
        /// Why.
        reason: String,
    },
    /// The client closed the connection (DTLS close): it ended the call,
    /// and its `m.call.hangup` may still be on its way. It is dropped
    /// without a hangup of ours (which would cross its own).
    Closed,
    /// The data channel opened.
    ChannelOpen,
    /// A data-channel message arrived.
    ChannelMessage {
        /// Its text.
        text: String,
    },
    /// A data-channel message could not be sent.
    ChannelSendFailed,
    /// The data channel closed.
    ChannelClosed,
}

/// A change of what the forwarder forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardChange {
    /// A client joined a call (the forwarder's call scoping).
    AddClient {
        /// The client.
        client: ClientId,
        /// Its call: room id and `conf_id`.
        call: (String, String),
    },
    /// Forward `publisher`'s `track` to `subscriber` (`width`/`height`
    /// wished for video).
    Subscribe {
        /// Who receives.
        subscriber: ClientId,
        /// Whose track.
        publisher: ClientId,
        /// The track.
        track: PublishedTrack,
        /// Width wished for.
        width: Option<u32>,
        /// Height wished for.
        height: Option<u32>,
    },
    /// Stop forwarding it.
    Unsubscribe {
        /// Who received.
        subscriber: ClientId,
        /// Whose track.
        publisher: ClientId,
        /// The track.
        track: PublishedTrack,
    },
    /// The client is gone: nothing from it or to it any more.
    RemoveClient {
        /// The client.
        client: ClientId,
    },
}

/// What the orchestration asks of the driver.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum FocusOutput {
    /// Send a to-device message (Olm-encrypted).
    ToDevice {
        /// Its type.
        event_type: MessageType,
        /// Recipient and content.
        message: OutgoingMessage,
    },
    /// Act on a client's peer connection (a new one for a new client).
    Media {
        /// The client.
        client: ClientId,
        /// What to do.
        op: MediaOp,
    },
    /// Change forwarding.
    Forward(ForwardChange),
    /// A client was admitted to a call.
    ClientJoined {
        /// The client.
        client: ClientId,
        /// Its device.
        device: DeviceKey,
        /// The room.
        room_id: String,
    },
    /// A client left (for logs and metrics).
    ClientLeft {
        /// The client.
        client: ClientId,
        /// Its device.
        device: DeviceKey,
        /// Why.
        reason: String,
    },
    /// A cascade link with another focus started: a new peer connection
    /// (`outgoing`: ours, which opens the data channel and offers first).
    /// It leaves like a client ([`FocusOutput::ClientLeft`]).
    LinkStarted {
        /// The link's connection.
        client: ClientId,
        /// The other focus's device.
        device: DeviceKey,
        /// The room.
        room_id: String,
        /// We placed the call.
        outgoing: bool,
    },
    /// An invite was turned down (for logs and metrics).
    Refused {
        /// The device.
        device: DeviceKey,
        /// A stable label (a [`Refusal`] label, `focus_full`,
        /// `focus_shutdown`).
        reason: String,
    },
}

#[derive(Debug)]
struct Client {
    device: DeviceKey,
    room_id: String,
    conf_id: String,
    /// Purposes and mute states of its streams, as it last said.
    metadata: SdpStreamMetadata,
    published: Vec<PublishedTrack>,
    /// What it subscribed to: (publisher, track) -> resolution wished.
    wanted: BTreeMap<(ClientId, PublishedTrack), (Option<u32>, Option<u32>)>,
    /// The send tracks of the last offer we made (or are making).
    offered: Vec<SendTrack>,
    /// The send tracks of the last offer the client answered.
    negotiated: Vec<SendTrack>,
    offer_in_flight: bool,
    /// Accepting its offer (first or renegotiation): our answer is pending.
    answering: bool,
    /// Our answer to its invite went out (later answers go on the channel).
    invite_answered: bool,
    channel_open: bool,
    heartbeat: Option<Heartbeat>,
    /// The metadata we last sent it (to send only changes).
    last_metadata: Option<String>,
    /// Set when this is a cascade link with another focus.
    link: Option<Link>,
}

/// The state of a cascade link with another focus, beside its connection.
#[derive(Debug, Default)]
struct Link {
    /// We placed the call (the impolite side).
    outgoing: bool,
    /// Our invite went out (outgoing links).
    invite_sent: bool,
    /// When we placed it (outgoing links): given up when its channel is
    /// not open [`LINK_INVITE_LIFETIME_MS`] later.
    placed_at: u64,
    /// The streams the other focus offers, as its metadata names them
    /// (publishers: its own clients).
    origins: dc::SdpStreamMetadata,
    /// What we asked it for: tracks our clients subscribed to, with the
    /// largest size any of them asked.
    requested: BTreeMap<TrackRef, (Option<u32>, Option<u32>)>,
}

impl Client {
    /// A connection being set up by answering the device's invite.
    fn new(device: DeviceKey, room_id: &str, conf_id: &str, metadata: SdpStreamMetadata) -> Self {
        Self {
            device,
            room_id: room_id.to_owned(),
            conf_id: conf_id.to_owned(),
            metadata,
            published: Vec::new(),
            wanted: BTreeMap::new(),
            offered: Vec::new(),
            negotiated: Vec::new(),
            offer_in_flight: false,
            answering: true,
            invite_answered: false,
            channel_open: false,
            heartbeat: None,
            last_metadata: None,
            link: None,
        }
    }

    fn is_link(&self) -> bool {
        self.link.is_some()
    }

    /// The polite side gives way when offers cross: clients' calls and
    /// links the other focus placed.
    fn polite(&self) -> bool {
        !self.link.as_ref().is_some_and(|l| l.outgoing)
    }
}

/// An invite held while the caller's member event may be on its way.
#[derive(Debug)]
struct HeldInvite {
    until: u64,
    sender: String,
    olm_device: Option<String>,
    encrypted: bool,
    device_id: Option<String>,
    device: DeviceKey,
    conf_id: String,
    session_id: String,
    sdp: String,
    metadata: SdpStreamMetadata,
    candidates: Vec<Candidate>,
}

/// The focus's orchestration (see the module docs).
#[derive(Debug)]
pub struct Focus {
    cfg: FocusConfig,
    rooms: BTreeMap<String, Authoriser>,
    signalling: FocusSignalling,
    clients: BTreeMap<ClientId, Client>,
    by_device: BTreeMap<DeviceKey, ClientId>,
    held: Vec<HeldInvite>,
    next_id: u64,
    draining: bool,
    out: VecDeque<FocusOutput>,
    /// Our offers that yielded to a client's crossing one (glare).
    offers_yielded: u64,
    /// The active speaker of each call, as last announced, and how many
    /// times it changed.
    speakers: BTreeMap<(String, String), (Option<ClientId>, u64)>,
    /// When another focus may be called again, and the wait after that.
    link_retry: BTreeMap<DeviceKey, (u64, u64)>,
    /// Links placed so far (call ids).
    links_placed: u64,
}

/// Refusals the homeserver's lag can explain: the caller's member event or
/// the call may not have reached the focus's sync yet.
fn may_be_lag(r: Refusal) -> bool {
    matches!(
        r,
        Refusal::NoCall
            | Refusal::WrongConfId
            | Refusal::NotInRoom
            | Refusal::NotMember
            | Refusal::UnknownDevice
            | Refusal::StaleSession
    )
}

impl Focus {
    /// An orchestration serving no room yet.
    pub fn new(cfg: FocusConfig) -> Self {
        let signalling = FocusSignalling::new(
            cfg.device_id.clone(),
            cfg.session_id.clone(),
            cfg.allow_plaintext,
        );
        Self {
            cfg,
            rooms: BTreeMap::new(),
            signalling,
            clients: BTreeMap::new(),
            by_device: BTreeMap::new(),
            held: Vec::new(),
            next_id: 1,
            draining: false,
            out: VecDeque::new(),
            offers_yielded: 0,
            speakers: BTreeMap::new(),
            link_retry: BTreeMap::new(),
            links_placed: 0,
        }
    }

    /// The next thing to do.
    pub fn poll_output(&mut self) -> Option<FocusOutput> {
        self.out.pop_front()
    }

    /// Clients connected now (cascade links not counted).
    pub fn client_count(&self) -> usize {
        self.clients.values().filter(|c| !c.is_link()).count()
    }

    /// Cascade links with other foci now: (connection, other focus,
    /// whether we placed it).
    pub fn links(&self) -> Vec<(ClientId, DeviceKey, bool)> {
        self.clients
            .iter()
            .filter_map(|(id, c)| Some((*id, c.device.clone(), c.link.as_ref()?.outgoing)))
            .collect()
    }

    /// The streams of a link: (forwarded to the other focus, as its
    /// clients asked; asked of it, as ours did), each counted once.
    pub fn link_streams(&self, link: ClientId) -> (usize, usize) {
        self.clients
            .get(&link)
            .and_then(|c| Some((c.wanted.len(), c.link.as_ref()?.requested.len())))
            .unwrap_or_default()
    }

    /// Whether `stream_id`, arriving over the link `link`, is published
    /// by one of our own clients of that call: it came back to its origin
    /// (a forwarding loop; never with origin-only forwarding).
    pub fn came_back(&self, link: ClientId, stream_id: &str) -> bool {
        let Some(l) = self.clients.get(&link).filter(|c| c.is_link()) else {
            return false;
        };
        self.clients.values().any(|c| {
            !c.is_link()
                && c.room_id == l.room_id
                && c.conf_id == l.conf_id
                && c.published.iter().any(|t| t.stream_id == stream_id)
        })
    }

    /// Whether `client` is a cascade link.
    pub fn is_link(&self, client: ClientId) -> bool {
        self.clients.get(&client).is_some_and(Client::is_link)
    }

    /// The device of a client.
    pub fn device_of(&self, client: ClientId) -> Option<&DeviceKey> {
        self.clients.get(&client).map(|c| &c.device)
    }

    /// The calls served, as (room id, conf id) -> clients.
    pub fn calls(&self) -> BTreeMap<(String, String), Vec<ClientId>> {
        let mut m: BTreeMap<(String, String), Vec<ClientId>> = BTreeMap::new();
        for (id, c) in &self.clients {
            m.entry((c.room_id.clone(), c.conf_id.clone()))
                .or_default()
                .push(*id);
        }
        m
    }

    /// The tracks a client publishes.
    pub fn published(&self, client: ClientId) -> &[PublishedTrack] {
        self.clients
            .get(&client)
            .map(|c| c.published.as_slice())
            .unwrap_or_default()
    }

    /// Our offers that yielded to a client's offer crossing them (glare:
    /// we are the polite side); each is made again afterwards.
    pub fn offers_yielded(&self) -> u64 {
        self.offers_yielded
    }

    /// Subscriptions in force: (subscriber, publisher's track) pairs.
    pub fn subscription_count(&self) -> usize {
        self.clients.values().map(|c| c.wanted.len()).sum()
    }

    /// The authorisers, by room (their counts feed the metrics).
    pub fn rooms(&self) -> &BTreeMap<String, Authoriser> {
        &self.rooms
    }

    // ------------------------------------------------------------------
    // Room state

    /// A state event of a joined room (client-server JSON).
    pub fn handle_state(
        &mut self,
        now: u64,
        room_id: &str,
        event: &Value,
    ) -> Result<(), ParseError> {
        let allow_plaintext = self.cfg.allow_plaintext;
        let auth = self
            .rooms
            .entry(room_id.to_owned())
            .or_insert_with(|| Authoriser::new(AuthConfig { allow_plaintext }));
        auth.handle_state_json(event, now)?;
        self.absorb_auth(now);
        self.recheck_held(now);
        self.plan_links(now);
        // Streams from other foci are shown only while their publishers
        // are participants: that may have changed.
        let linked: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.is_link() && c.room_id == room_id)
            .map(|(id, _)| *id)
            .collect();
        for l in linked {
            self.broadcast_metadata(l);
        }
        Ok(())
    }

    /// The focus left a room: its clients are hung up on.
    pub fn room_left(&mut self, now: u64, room_id: &str) {
        let gone: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.room_id == room_id)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove_client(now, id, "room_left", true);
        }
        self.rooms.remove(room_id);
    }

    fn absorb_auth(&mut self, now: u64) {
        let mut revoked = Vec::new();
        for auth in self.rooms.values_mut() {
            while let Some(o) = auth.poll_output() {
                match o {
                    AuthOutput::Revoked { device, reason, .. } => revoked.push((device, reason)),
                }
            }
        }
        for (device, reason) in revoked {
            if let Some(id) = self.by_device.get(&device).copied() {
                self.remove_client(now, id, reason.label(), true);
            }
        }
    }

    // ------------------------------------------------------------------
    // To-device signalling

    /// An incoming `m.call.*` to-device message.
    pub fn handle_to_device(&mut self, now: u64, m: &IncomingToDevice) {
        self.on_to_device(now, m);
        self.plan_links(now);
    }

    fn on_to_device(&mut self, now: u64, m: &IncomingToDevice) {
        let signal = match self.signalling.receive(m) {
            Ok(s) => s,
            Err(e) => {
                info!(sender = %m.sender, event_type = %m.event_type, "signalling ignored: {e}");
                if matches!(e, SignalError::Plaintext)
                    && MessageType::from_event_type(&m.event_type) == Some(MessageType::Invite)
                {
                    let device = m
                        .content
                        .get("device_id")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    self.out.push_back(FocusOutput::Refused {
                        device: DeviceKey::new(m.sender.clone(), device),
                        reason: Refusal::Plaintext.label().to_owned(),
                    });
                }
                return;
            }
        };
        match signal {
            Signal::Invite {
                device,
                conf_id,
                session_id,
                encrypted,
                sdp,
                metadata,
                early_candidates,
                ..
            } => {
                // The device's current call, if any, goes on until this
                // one is admitted (`consider`).
                self.held.retain(|h| h.device != device);
                let invite = HeldInvite {
                    until: now.saturating_add(self.cfg.hold_ms),
                    sender: m.sender.clone(),
                    olm_device: m.sender_device.clone(),
                    encrypted,
                    device_id: m
                        .content
                        .get("device_id")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    device,
                    conf_id,
                    session_id,
                    sdp,
                    metadata,
                    candidates: early_candidates,
                };
                self.consider(now, invite, false);
            }
            Signal::Candidates {
                device,
                pending,
                candidates,
            } => {
                if pending {
                    if let Some(h) = self.held.iter_mut().find(|h| h.device == device) {
                        h.candidates.extend(candidates);
                    }
                } else if let Some(id) = self.by_device.get(&device).copied() {
                    self.media(id, MediaOp::AddRemoteCandidates { candidates });
                }
            }
            Signal::Answered { device, sdp } => self.link_answered(device, sdp),
            Signal::Ended {
                device,
                pending,
                reason,
            } => {
                if pending {
                    self.held.retain(|h| h.device != device);
                } else if let Some(id) = self.by_device.get(&device).copied() {
                    self.remove_client(now, id, &reason, false);
                }
            }
            _ => {}
        }
    }

    /// Decides on an invite: answer, hold, or turn down (`last`: the hold
    /// is over).
    fn consider(&mut self, now: u64, inv: HeldInvite, last: bool) {
        if self.draining {
            return self.refuse(inv.device, FOCUS_SHUTDOWN);
        }
        let check = InviteCheck {
            sender: &inv.sender,
            olm_device: inv.olm_device.as_deref(),
            encrypted: inv.encrypted,
            conf_id: &inv.conf_id,
            device_id: inv.device_id.as_deref(),
            sender_session_id: Some(&inv.session_id),
        };
        // The room whose current call is this one; else any room (for the
        // refusal's reason).
        let room = self
            .rooms
            .iter()
            .find(|(_, a)| a.room().current_call_id() == Some(inv.conf_id.as_str()))
            .or_else(|| self.rooms.iter().next())
            .map(|(r, _)| r.clone());
        let Some(room) = room else {
            return self.hold_or_refuse(inv, Refusal::NoCall, last);
        };
        let Some(auth) = self.rooms.get_mut(&room) else {
            return;
        };
        let admitted = match auth.check_invite(&check, now) {
            Ok(a) => a,
            Err(r) => return self.hold_or_refuse(inv, r, last),
        };
        let in_call = self
            .clients
            .values()
            .filter(|c| {
                c.room_id == room
                    && c.conf_id == inv.conf_id
                    && c.device != inv.device
                    && !c.is_link()
            })
            .count();
        if admitted.as_focus && !self.cfg.cascade {
            if let Some(auth) = self.rooms.get_mut(&room) {
                auth.release(&admitted.device);
            }
            return self.refuse(admitted.device, "cascade_off");
        }
        if !admitted.as_focus && in_call >= self.cfg.max_participants_per_call {
            if let Some(auth) = self.rooms.get_mut(&room) {
                auth.release(&admitted.device);
            }
            warn!(device = %admitted.device, in_call, "call full; invite turned down");
            return self.refuse(admitted.device, FOCUS_FULL);
        }
        // A new call of a device that has one replaces it, now that it is
        // admitted (a refused one never ends the current call).
        if let Some(old) = self.by_device.get(&admitted.device).copied() {
            info!(device = %admitted.device, "a new call replaces the device's current one");
            self.remove_client(now, old, "replaced", false);
            if let Some(auth) = self.rooms.get_mut(&room) {
                auth.readmit(&admitted);
            }
        }
        let _ = self.signalling.admit(&admitted.device);
        let id = ClientId(self.next_id);
        self.next_id += 1;
        info!(device = %admitted.device, client = id.0, %room, conf_id = %inv.conf_id, "client admitted");
        let mut c = Client::new(admitted.device.clone(), &room, &inv.conf_id, inv.metadata);
        c.link = admitted.as_focus.then(Link::default);
        self.clients.insert(id, c);
        self.by_device.insert(admitted.device.clone(), id);
        if admitted.as_focus {
            info!(device = %admitted.device, client = id.0, "cascade link from another focus");
            self.out.push_back(FocusOutput::LinkStarted {
                client: id,
                device: admitted.device,
                room_id: room.clone(),
                outgoing: false,
            });
        } else {
            self.out.push_back(FocusOutput::ClientJoined {
                client: id,
                device: admitted.device,
                room_id: room.clone(),
            });
        }
        self.out
            .push_back(FocusOutput::Forward(ForwardChange::AddClient {
                client: id,
                call: (room, inv.conf_id),
            }));
        self.media(
            id,
            MediaOp::Accept {
                sdp: inv.sdp,
                tracks: Vec::new(),
            },
        );
        if !inv.candidates.is_empty() {
            self.media(
                id,
                MediaOp::AddRemoteCandidates {
                    candidates: inv.candidates,
                },
            );
        }
        self.plan_links(now);
    }

    fn hold_or_refuse(&mut self, inv: HeldInvite, r: Refusal, last: bool) {
        if may_be_lag(r) && !last {
            debug!(device = %inv.device, reason = r.label(), "invite held: the caller's state may be on its way");
            self.held.push(inv);
        } else {
            self.refuse(inv.device, r.label());
        }
    }

    fn refuse(&mut self, device: DeviceKey, reason: &str) {
        info!(%device, reason, "invite turned down");
        if let Some((event_type, message)) = self.signalling.reject(&device, reason) {
            self.out.push_back(FocusOutput::ToDevice {
                event_type,
                message,
            });
        }
        self.out.push_back(FocusOutput::Refused {
            device,
            reason: reason.to_owned(),
        });
    }

    fn recheck_held(&mut self, now: u64) {
        let held = std::mem::take(&mut self.held);
        for h in held {
            let last = now >= h.until;
            self.consider(now, h, last);
        }
    }

    // ------------------------------------------------------------------
    // Media and the data channel

    /// What the media layer did for `client`.
    pub fn handle_media(&mut self, now: u64, client: ClientId, ev: MediaIn) {
        self.media_event(now, client, ev);
        self.plan_links(now);
    }

    fn media_event(&mut self, now: u64, client: ClientId, ev: MediaIn) {
        if !self.clients.contains_key(&client) {
            debug!(client = client.0, "media event for a client that is gone");
            return;
        }
        match ev {
            MediaIn::Answer { sdp } => self.answered(client, sdp),
            MediaIn::Offer { sdp } => self.offer_made(client, sdp),
            MediaIn::OfferFailed { reason } => {
                warn!(client = client.0, %reason, "offer failed; the client keeps its tracks");
                if let Some(c) = self.clients.get_mut(&client) {
                    c.offer_in_flight = false;
                    c.offered = c.negotiated.clone();
                }
            }
            MediaIn::LocalCandidates { candidates } => {
                if let Some(device) = self.clients.get(&client).map(|c| c.device.clone())
                    && let Some((event_type, message)) =
                        self.signalling.candidates(&device, candidates)
                {
                    self.out.push_back(FocusOutput::ToDevice {
                        event_type,
                        message,
                    });
                }
            }
            MediaIn::RemoteTracks { tracks } => self.set_published(now, client, tracks),
            MediaIn::Connected => debug!(client = client.0, "media connected"),
            MediaIn::Failed { reason } => self.remove_client(now, client, &reason, true),
            MediaIn::Closed => self.remove_client(now, client, "closed_by_client", false),
            MediaIn::ChannelOpen => {
                // The side that placed a link answers pings like a client.
                let role = if self.clients.get(&client).is_some_and(|c| !c.polite()) {
                    Role::Client
                } else {
                    Role::Focus
                };
                let hb = Heartbeat::new(role, self.cfg.heartbeat, now);
                if let Some(c) = self.clients.get_mut(&client) {
                    c.channel_open = true;
                    c.heartbeat = hb.ok();
                    if c.is_link() {
                        info!(client = client.0, focus = %c.device, "cascade link open");
                        // A link that worked starts its backoff over.
                        self.link_retry.remove(&c.device);
                    }
                }
                self.send_metadata(client);
                self.send_speaker(client);
                self.sync_link_requests(client);
                self.pump_heartbeat(now, client);
                self.maybe_offer(client);
            }
            MediaIn::ChannelMessage { text } => self.channel_message(now, client, &text),
            MediaIn::ChannelSendFailed => {
                if let Some(hb) = self
                    .clients
                    .get_mut(&client)
                    .and_then(|c| c.heartbeat.as_mut())
                {
                    hb.handle_send_failed(now);
                }
            }
            MediaIn::ChannelClosed => self.remove_client(now, client, "channel_closed", true),
        }
    }

    fn answered(&mut self, client: ClientId, sdp: String) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        let first = !c.invite_answered;
        c.invite_answered = true;
        c.answering = false;
        if first {
            let device = c.device.clone();
            if let Some((event_type, message)) =
                self.signalling
                    .answer(&device, sdp, SdpStreamMetadata::new())
            {
                self.out.push_back(FocusOutput::ToDevice {
                    event_type,
                    message,
                });
            }
        } else {
            let text = DcMessage::Negotiate(dc::Negotiate {
                sdp_type: dc::SdpType::Answer,
                sdp,
                sdp_stream_metadata: self.send_metadata_of(client),
            });
            self.channel(client, &text);
        }
        self.maybe_offer(client);
    }

    fn offer_made(&mut self, client: ClientId, sdp: String) {
        let first_of_link = self
            .clients
            .get(&client)
            .and_then(|c| c.link.as_ref())
            .is_some_and(|l| l.outgoing && !l.invite_sent);
        if first_of_link {
            let Some(c) = self.clients.get_mut(&client) else {
                return;
            };
            if let Some(l) = c.link.as_mut() {
                l.invite_sent = true;
            }
            self.links_placed += 1;
            let call_id = format!("{}-link-{}", self.cfg.session_id, self.links_placed);
            let (device, conf) = (c.device.clone(), c.conf_id.clone());
            info!(client = client.0, %device, %call_id, "calling another focus (cascade link)");
            let (event_type, message) =
                self.signalling
                    .invite(&device, &conf, &call_id, sdp, LINK_INVITE_LIFETIME_MS);
            self.out.push_back(FocusOutput::ToDevice {
                event_type,
                message,
            });
            return;
        }
        let meta = self.send_metadata_of(client);
        self.channel(
            client,
            &DcMessage::Negotiate(dc::Negotiate {
                sdp_type: dc::SdpType::Offer,
                sdp,
                sdp_stream_metadata: meta,
            }),
        );
    }

    fn channel_message(&mut self, now: u64, client: ClientId, text: &str) {
        let msg = match DcMessage::parse(text.as_bytes()) {
            Ok(m) => m,
            Err(e) => {
                info!(client = client.0, "data channel message ignored: {e}");
                return;
            }
        };
        if let Some(hb) = self
            .clients
            .get_mut(&client)
            .and_then(|c| c.heartbeat.as_mut())
            && hb.handle_received(now, &msg)
        {
            self.pump_heartbeat(now, client);
            return;
        }
        match msg {
            DcMessage::TrackSubscription(ts) => self.subscription(client, ts),
            DcMessage::Negotiate(n) => match n.sdp_type {
                dc::SdpType::Offer => {
                    let Some(c) = self.clients.get_mut(&client) else {
                        return;
                    };
                    if c.offer_in_flight && !c.polite() {
                        // Our link: the other focus yields and answers ours.
                        info!(
                            client = client.0,
                            "offers crossed on a link we placed; theirs is ignored"
                        );
                        return;
                    }
                    if c.offer_in_flight {
                        // We are polite: the media layer rolls our offer back
                        // on Accept; ours is made again afterwards.
                        info!(
                            client = client.0,
                            "offers crossed; ours yields and is made again after"
                        );
                        c.offer_in_flight = false;
                        c.offered = c.negotiated.clone();
                        self.offers_yielded += 1;
                    }
                    c.answering = true;
                    let tracks = c.negotiated.clone();
                    let meta = n.sdp_stream_metadata.clone();
                    let link = c.is_link();
                    self.media(client, MediaOp::Accept { sdp: n.sdp, tracks });
                    if link {
                        self.link_metadata(client, meta, false);
                    } else if !meta.is_empty() {
                        self.client_metadata(client, meta);
                    }
                }
                _ => {
                    let Some(c) = self.clients.get_mut(&client) else {
                        return;
                    };
                    if !c.offer_in_flight {
                        debug!(client = client.0, "answer without an offer; ignored");
                        return;
                    }
                    c.offer_in_flight = false;
                    c.negotiated = c.offered.clone();
                    debug!(
                        client = client.0,
                        tracks = c.negotiated.len(),
                        "the client answered our offer"
                    );
                    self.media(client, MediaOp::ApplyAnswer { sdp: n.sdp });
                    self.maybe_offer(client);
                }
            },
            DcMessage::SdpStreamMetadataChanged {
                sdp_stream_metadata,
            } => {
                if self.is_link(client) {
                    self.link_metadata(client, sdp_stream_metadata, true);
                } else {
                    self.client_metadata(client, sdp_stream_metadata);
                }
            }
            DcMessage::ConnectToFocus { foci } => {
                info!(
                    client = client.0,
                    foci = foci.len(),
                    "asked to connect to other foci"
                );
                // Only foci a live participant names are linked with; the
                // request only makes the focus look now.
                if let Some(c) = self.clients.get(&client).filter(|c| !c.is_link())
                    && let Some(auth) = self.rooms.get(&c.room_id)
                {
                    for f in foci {
                        let key = DeviceKey::new(f.user_id, f.device_id);
                        if auth.names_focus(&key) {
                            self.link_retry.remove(&key);
                        } else {
                            info!(client = client.0, focus = %key, "not linking: no participant names that focus");
                        }
                    }
                }
                self.plan_links(now);
            }
            other => debug!(
                client = client.0,
                "data channel message {} ignored",
                other.message_type()
            ),
        }
    }

    /// A client's own metadata (mute states, purposes).
    fn client_metadata(&mut self, client: ClientId, meta: dc::SdpStreamMetadata) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        for (id, s) in meta {
            c.metadata.insert(id, s.to_proto());
        }
        self.broadcast_metadata(client);
    }

    fn subscription(&mut self, client: ClientId, ts: dc::TrackSubscription) {
        let Some(sub) = self.clients.get(&client) else {
            return;
        };
        let (room, conf, sub_device, sub_link) = (
            sub.room_id.clone(),
            sub.conf_id.clone(),
            sub.device.clone(),
            sub.is_link(),
        );
        let mut changes = Vec::new();
        for r in ts.unsubscribe {
            if let Some((publisher, track)) = self.find_track(&room, &conf, &r) {
                changes.push((false, publisher, track, None, None));
            }
        }
        for r in ts.subscribe {
            let tref = TrackRef {
                stream_id: r.stream_id.clone(),
                track_id: r.track_id.clone(),
            };
            let Some((publisher, track)) = self.find_track(&room, &conf, &tref) else {
                info!(client = client.0, stream = %r.stream_id, track = %r.track_id, "subscription to an unknown track refused");
                continue;
            };
            if publisher == client {
                continue;
            }
            let Some(p) = self.clients.get(&publisher) else {
                continue;
            };
            if sub_link && p.is_link() {
                // Origin only: another focus gets our own clients' streams.
                info!(client = client.0, stream = %r.stream_id, "a stream from another focus is not forwarded to a focus");
                continue;
            }
            let allowed = self.rooms.get(&room).is_some_and(|a| {
                a.may_forward(&p.device, &sub_device)
                    && (!p.is_link() || origin_is_participant(p, &track.stream_id, a))
            });
            if !allowed {
                info!(client = client.0, "subscription refused: not authorised");
                continue;
            }
            changes.push((true, publisher, track, r.width, r.height));
        }
        // A track another focus has not sent yet is asked for over the
        // link; the forwarder hears of the subscription once it arrives.
        let arrived = |p: ClientId, t: &PublishedTrack| {
            self.clients
                .get(&p)
                .is_some_and(|c| !c.is_link() || c.published.contains(t))
        };
        let changes: Vec<_> = changes
            .into_iter()
            .map(|(on, p, t, w, h)| {
                let here = arrived(p, &t);
                (on, p, t, w, h, here)
            })
            .collect();
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        let mut outs = Vec::new();
        for (on, publisher, track, width, height, here) in changes {
            let key = (publisher, track.clone());
            if on {
                let fresh = c.wanted.insert(key, (width, height)) != Some((width, height));
                if fresh && here {
                    outs.push(ForwardChange::Subscribe {
                        subscriber: client,
                        publisher,
                        track,
                        width,
                        height,
                    });
                }
            } else if c.wanted.remove(&key).is_some() && here {
                outs.push(ForwardChange::Unsubscribe {
                    subscriber: client,
                    publisher,
                    track,
                });
            }
        }
        self.out.extend(outs.into_iter().map(FocusOutput::Forward));
        self.maybe_offer(client);
        self.sync_links_of(&room, &conf);
    }

    fn find_track(
        &self,
        room: &str,
        conf: &str,
        r: &TrackRef,
    ) -> Option<(ClientId, PublishedTrack)> {
        self.clients.iter().find_map(|(id, c)| {
            if c.room_id != room || c.conf_id != conf {
                return None;
            }
            let published = c
                .published
                .iter()
                .find(|t| t.stream_id == r.stream_id && t.track_id == r.track_id)
                .cloned();
            // Another focus's stream it has not sent us yet.
            let offered = || {
                let s = c.link.as_ref()?.origins.get(&r.stream_id)?;
                let kind = match s.tracks.get(&r.track_id)?.kind? {
                    dc::MediaKind::Audio => TrackKind::Audio,
                    _ => TrackKind::Video,
                };
                Some(PublishedTrack {
                    stream_id: r.stream_id.clone(),
                    track_id: r.track_id.clone(),
                    kind,
                })
            };
            published.or_else(offered).map(|t| (*id, t))
        })
    }

    fn set_published(&mut self, _now: u64, client: ClientId, mut tracks: Vec<PublishedTrack>) {
        let link = self.is_link(client);
        let max = if link {
            // A link carries the tracks of the other focus's clients.
            self.cfg
                .max_tracks_per_participant
                .saturating_mul(self.cfg.max_participants_per_call)
        } else {
            self.cfg.max_tracks_per_participant
        };
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        if tracks.len() > max {
            warn!(
                client = client.0,
                tracks = tracks.len(),
                max,
                "more tracks than allowed; the rest are not forwarded"
            );
            tracks.truncate(max);
        }
        let gone: Vec<PublishedTrack> = c
            .published
            .iter()
            .filter(|t| !tracks.contains(t))
            .cloned()
            .collect();
        let fresh: Vec<PublishedTrack> = tracks
            .iter()
            .filter(|t| !c.published.contains(t))
            .cloned()
            .collect();
        c.published = tracks;
        // Subscriptions to tracks it stopped sending end (a link's
        // subscriptions stay while the other focus still offers the
        // stream: it is renegotiated again once asked for).
        let origins: Vec<String> = c
            .link
            .as_ref()
            .map(|l| l.origins.keys().cloned().collect())
            .unwrap_or_default();
        let mut affected = Vec::new();
        for (id, s) in self.clients.iter_mut() {
            let before = s.wanted.len();
            s.wanted.retain(|(p, t), _| {
                !(*p == client && gone.contains(t) && !origins.contains(&t.stream_id))
            });
            if s.wanted.len() != before {
                affected.push(*id);
            }
        }
        if link {
            // Tracks asked for over the link arrived: forward them now.
            let mut now_forwarded = Vec::new();
            for (id, s) in &self.clients {
                for ((p, t), (w, h)) in &s.wanted {
                    if *p == client && fresh.contains(t) {
                        now_forwarded.push(ForwardChange::Subscribe {
                            subscriber: *id,
                            publisher: client,
                            track: t.clone(),
                            width: *w,
                            height: *h,
                        });
                        affected.push(*id);
                    }
                }
            }
            self.out
                .extend(now_forwarded.into_iter().map(FocusOutput::Forward));
            affected.sort();
            affected.dedup();
        }
        for t in gone {
            for id in &affected {
                self.out
                    .push_back(FocusOutput::Forward(ForwardChange::Unsubscribe {
                        subscriber: *id,
                        publisher: client,
                        track: t.clone(),
                    }));
            }
        }
        for id in affected {
            self.maybe_offer(id);
        }
        self.broadcast_metadata(client);
    }

    /// Offers the client its current send tracks if they changed and no
    /// exchange is under way.
    fn maybe_offer(&mut self, client: ClientId) {
        let Some(c) = self.clients.get(&client) else {
            return;
        };
        let tracks: Vec<SendTrack> = c
            .wanted
            .keys()
            .filter(|(p, t)| {
                self.clients
                    .get(p)
                    .is_some_and(|p| !p.is_link() || p.published.contains(t))
            })
            .map(|(p, t)| SendTrack {
                publisher: *p,
                track: t.clone(),
            })
            .collect();
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        if c.offer_in_flight || c.answering || !c.channel_open {
            // Looked at again when the exchange is over.
            return;
        }
        if tracks == c.negotiated {
            return;
        }
        debug!(
            client = client.0,
            tracks = tracks.len(),
            "offering the client its send tracks"
        );
        c.offer_in_flight = true;
        c.offered = tracks.clone();
        self.media(client, MediaOp::Offer { tracks });
    }

    /// The metadata of the tracks `client` receives (with their publishers).
    fn send_metadata_of(&self, client: ClientId) -> dc::SdpStreamMetadata {
        let Some(c) = self.clients.get(&client) else {
            return dc::SdpStreamMetadata::new();
        };
        let mut meta = dc::SdpStreamMetadata::new();
        for st in &c.offered {
            if let Some(p) = self.clients.get(&st.publisher)
                && let Some(entry) = stream_entry(p, &st.track.stream_id)
            {
                let e = meta.entry(st.track.stream_id.clone()).or_insert(entry);
                e.tracks
                    .insert(st.track.track_id.clone(), track_entry(&st.track));
            }
        }
        meta
    }

    /// Everything published in a call, with publishers: our clients'
    /// streams, and (unless `for_link`: origin only) those the other foci
    /// offer whose publishers are live participants.
    fn call_metadata(&self, room: &str, conf: &str, for_link: bool) -> dc::SdpStreamMetadata {
        let mut meta = dc::SdpStreamMetadata::new();
        let auth = self.rooms.get(room);
        for p in self
            .clients
            .values()
            .filter(|c| c.room_id == room && c.conf_id == conf)
        {
            if let Some(l) = &p.link {
                if for_link {
                    continue;
                }
                for (id, s) in &l.origins {
                    if auth.is_some_and(|a| origin_is_participant(p, id, a)) {
                        meta.entry(id.clone()).or_insert_with(|| s.clone());
                    } else {
                        debug!(
                            stream = %id,
                            publisher = ?s.user_id,
                            device = ?s.device_id,
                            focus = %p.device,
                            "a stream from another focus not shown: its publisher is no participant at that focus"
                        );
                    }
                }
                continue;
            }
            for t in &p.published {
                if let Some(entry) = stream_entry(p, &t.stream_id) {
                    let e = meta.entry(t.stream_id.clone()).or_insert(entry);
                    e.tracks.insert(t.track_id.clone(), track_entry(t));
                }
            }
        }
        meta
    }

    /// Sends the call's metadata to everyone in `about`'s call.
    fn broadcast_metadata(&mut self, about: ClientId) {
        let Some(c) = self.clients.get(&about) else {
            return;
        };
        let (room, conf) = (c.room_id.clone(), c.conf_id.clone());
        let ids: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.room_id == room && c.conf_id == conf)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.send_metadata(id);
        }
    }

    fn send_metadata(&mut self, client: ClientId) {
        let Some(c) = self.clients.get(&client) else {
            return;
        };
        if !c.channel_open {
            return;
        }
        let meta = self.call_metadata(&c.room_id, &c.conf_id, c.is_link());
        let msg = DcMessage::SdpStreamMetadataChanged {
            sdp_stream_metadata: meta,
        };
        let Ok(text) = msg.encode() else {
            warn!(client = client.0, "call metadata too large to send");
            return;
        };
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        if c.last_metadata.as_deref() == Some(text.as_str()) {
            return;
        }
        c.last_metadata = Some(text.clone());
        self.media(client, MediaOp::SendChannel { text });
    }

    fn channel(&mut self, client: ClientId, msg: &DcMessage) {
        match msg.encode() {
            Ok(text) => self.media(client, MediaOp::SendChannel { text }),
            Err(e) => warn!(client = client.0, "data channel message not sent: {e}"),
        }
    }

    fn media(&mut self, client: ClientId, op: MediaOp) {
        self.out.push_back(FocusOutput::Media { client, op });
    }

    fn pump_heartbeat(&mut self, now: u64, client: ClientId) {
        let mut outs = Vec::new();
        if let Some(hb) = self
            .clients
            .get_mut(&client)
            .and_then(|c| c.heartbeat.as_mut())
        {
            hb.handle_timeout(now);
            while let Some(o) = hb.poll_output() {
                outs.push(o);
            }
        }
        for o in outs {
            match o {
                HeartbeatOutput::SendPing => self.channel(client, &DcMessage::Ping),
                HeartbeatOutput::SendPong => self.channel(client, &DcMessage::Pong),
                HeartbeatOutput::Dead { reason } => {
                    warn!(client = client.0, "client unresponsive: {reason}");
                    self.remove_client(now, client, PING_TIMEOUT, true);
                    return;
                }
            }
        }
    }

    /// Removes a client: forwarding stops at once, its subscribers are
    /// renegotiated without its tracks, its call is hung up (`hangup`).
    fn remove_client(&mut self, _now: u64, client: ClientId, reason: &str, hangup: bool) {
        let Some(c) = self.clients.remove(&client) else {
            return;
        };
        info!(client = client.0, device = %c.device, reason, link = c.is_link(), "client leaves");
        self.by_device.remove(&c.device);
        if c.link.as_ref().is_some_and(|l| l.outgoing) && reason != LINK_UNNEEDED {
            // Called again after a backoff (set when it was placed).
            debug!(device = %c.device, "cascade link lost; it is placed again later");
        }
        if let Some(auth) = self.rooms.get_mut(&c.room_id) {
            auth.release(&c.device);
        }
        self.out
            .push_back(FocusOutput::Forward(ForwardChange::RemoveClient { client }));
        if hangup {
            if let Some((event_type, message)) = self.signalling.hangup(&c.device, reason) {
                self.out.push_back(FocusOutput::ToDevice {
                    event_type,
                    message,
                });
            }
        } else {
            self.signalling.forget(&c.device);
        }
        self.media(client, MediaOp::Close);
        self.out.push_back(FocusOutput::ClientLeft {
            client,
            device: c.device.clone(),
            reason: reason.to_owned(),
        });
        let affected: Vec<ClientId> = self
            .clients
            .iter_mut()
            .filter_map(|(id, s)| {
                let before = s.wanted.len();
                s.wanted.retain(|(p, _), _| *p != client);
                (s.wanted.len() != before).then_some(*id)
            })
            .collect();
        for id in affected {
            self.maybe_offer(id);
        }
        let peer = self
            .clients
            .iter()
            .find(|(_, o)| o.room_id == c.room_id && o.conf_id == c.conf_id)
            .map(|(id, _)| *id);
        if let Some(peer) = peer {
            self.broadcast_metadata(peer);
            self.sync_links_of(&c.room_id, &c.conf_id);
        } else {
            // The call is over here: so is its speaker.
            self.speakers.remove(&(c.room_id, c.conf_id));
        }
    }

    // ------------------------------------------------------------------
    // Cascade links

    /// Our own device key, when cascading is on and it is known.
    fn me(&self) -> Option<DeviceKey> {
        (self.cfg.cascade && !self.cfg.user_id.is_empty())
            .then(|| DeviceKey::new(self.cfg.user_id.clone(), self.cfg.device_id.clone()))
    }

    /// Places the links the calls need and ends those they do not: for every
    /// call with a client of ours, a link with each other focus its live
    /// participants name, placed by the focus that sorts first.
    fn plan_links(&mut self, now: u64) {
        let Some(me) = self.me() else {
            return;
        };
        let calls: BTreeSet<(String, String)> = self
            .clients
            .values()
            .filter(|c| !c.is_link())
            .map(|c| (c.room_id.clone(), c.conf_id.clone()))
            .collect();
        let mut wanted: BTreeSet<(String, String, DeviceKey)> = BTreeSet::new();
        for (room, conf) in calls {
            let Some(auth) = self.rooms.get(&room) else {
                continue;
            };
            if auth.room().current_call_id() != Some(conf.as_str()) {
                continue;
            }
            for f in auth.named_foci(&me) {
                wanted.insert((room.clone(), conf.clone(), f));
            }
        }
        let unneeded: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| {
                c.link.as_ref().is_some_and(|l| l.outgoing)
                    && !wanted.contains(&(c.room_id.clone(), c.conf_id.clone(), c.device.clone()))
            })
            .map(|(id, _)| *id)
            .collect();
        for id in unneeded {
            self.remove_client(now, id, LINK_UNNEEDED, true);
        }
        if self.draining {
            return;
        }
        for (room, conf, f) in wanted {
            if me > f {
                // The other focus places this link.
                continue;
            }
            if let Some(id) = self.by_device.get(&f) {
                if self.clients.get(id).is_some_and(|c| c.conf_id != conf) {
                    debug!(focus = %f, "linked with that focus for another call already");
                }
                continue;
            }
            if self.link_retry.get(&f).is_some_and(|(at, _)| now < *at) {
                continue;
            }
            self.start_link(now, room, conf, f);
        }
    }

    /// Calls another focus for a link: a new peer connection of ours (it
    /// opens the data channel) whose first offer goes as the invite.
    fn start_link(&mut self, now: u64, room: String, conf: String, focus: DeviceKey) {
        let Some(auth) = self.rooms.get_mut(&room) else {
            return;
        };
        if !auth.admit_focus(&focus) {
            return;
        }
        let wait = self
            .link_retry
            .get(&focus)
            .map_or(LINK_RETRY_MS, |(_, w)| *w);
        self.link_retry.insert(
            focus.clone(),
            (
                now.saturating_add(wait),
                wait.saturating_mul(2).min(LINK_RETRY_MAX_MS),
            ),
        );
        let id = ClientId(self.next_id);
        self.next_id += 1;
        info!(focus = %focus, client = id.0, %room, conf_id = %conf, "placing a cascade link");
        let mut c = Client::new(focus.clone(), &room, &conf, SdpStreamMetadata::new());
        c.offer_in_flight = true;
        c.answering = false;
        c.link = Some(Link {
            outgoing: true,
            placed_at: now,
            ..Link::default()
        });
        self.clients.insert(id, c);
        self.by_device.insert(focus.clone(), id);
        self.out.push_back(FocusOutput::LinkStarted {
            client: id,
            device: focus,
            room_id: room.clone(),
            outgoing: true,
        });
        self.out
            .push_back(FocusOutput::Forward(ForwardChange::AddClient {
                client: id,
                call: (room, conf),
            }));
        self.media(id, MediaOp::Offer { tracks: Vec::new() });
    }

    /// The other focus answered the link we placed.
    fn link_answered(&mut self, device: DeviceKey, sdp: String) {
        let Some(id) = self.by_device.get(&device).copied() else {
            debug!(%device, "answer for a link that is gone");
            return;
        };
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if !c.link.as_ref().is_some_and(|l| l.outgoing) || !c.offer_in_flight {
            debug!(%device, "unexpected answer; ignored");
            return;
        }
        info!(%device, client = id.0, "the other focus answered our link");
        c.offer_in_flight = false;
        c.negotiated = c.offered.clone();
        c.invite_answered = true;
        self.media(id, MediaOp::ApplyAnswer { sdp });
    }

    /// The streams another focus offers over a link (`full`: all of them,
    /// else changes): our clients see them, named by their publishers.
    fn link_metadata(&mut self, link: ClientId, meta: dc::SdpStreamMetadata, full: bool) {
        let Some(c) = self.clients.get_mut(&link) else {
            return;
        };
        let (room, conf) = (c.room_id.clone(), c.conf_id.clone());
        let Some(l) = c.link.as_mut() else {
            return;
        };
        if full {
            l.origins.clear();
        }
        for (id, mut s) in meta {
            if s.user_id.is_some() && s.device_id.is_some() {
                // A negotiation names only the tracks of that offer: the
                // stream's other known tracks stay.
                if !full && let Some(known) = l.origins.get(&id) {
                    for (t, m) in &known.tracks {
                        s.tracks.entry(t.clone()).or_insert(*m);
                    }
                }
                l.origins.insert(id, s);
            } else {
                info!(client = link.0, stream = %id, "a stream from another focus that names no publisher; ignored");
            }
        }
        debug!(
            client = link.0,
            streams = l.origins.len(),
            "streams the other focus offers"
        );
        // Our clients' wishes for streams it no longer offers go.
        let offered: BTreeSet<String> = l.origins.keys().cloned().collect();
        let published = c.published.clone();
        for s in self.clients.values_mut() {
            s.wanted.retain(|(p, t), _| {
                *p != link || offered.contains(&t.stream_id) || published.contains(t)
            });
        }
        self.broadcast_metadata(link);
        self.sync_links_of(&room, &conf);
    }

    /// Asks the links of a call for what our clients subscribed to.
    fn sync_links_of(&mut self, room: &str, conf: &str) {
        let links: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.is_link() && c.room_id == room && c.conf_id == conf)
            .map(|(id, _)| *id)
            .collect();
        for l in links {
            self.sync_link_requests(l);
        }
    }

    /// Tells the other focus of `link` which of its tracks our clients want
    /// (each once, at the largest size asked; any size when one asks for
    /// none), as the difference from what we asked before.
    fn sync_link_requests(&mut self, link: ClientId) {
        let Some(l) = self.clients.get(&link) else {
            return;
        };
        if !l.is_link() || !l.channel_open {
            return;
        }
        let (room, conf) = (l.room_id.clone(), l.conf_id.clone());
        let merge = |a: Option<u32>, b: Option<u32>| a.zip(b).map(|(a, b)| a.max(b));
        let mut want: BTreeMap<TrackRef, (Option<u32>, Option<u32>)> = BTreeMap::new();
        for c in self
            .clients
            .values()
            .filter(|c| !c.is_link() && c.room_id == room && c.conf_id == conf)
        {
            for ((p, t), (w, h)) in &c.wanted {
                if *p != link {
                    continue;
                }
                let r = TrackRef {
                    stream_id: t.stream_id.clone(),
                    track_id: t.track_id.clone(),
                };
                want.entry(r)
                    .and_modify(|e| *e = (merge(e.0, *w), merge(e.1, *h)))
                    .or_insert((*w, *h));
            }
        }
        let Some(l) = self.clients.get_mut(&link).and_then(|c| c.link.as_mut()) else {
            return;
        };
        if want == l.requested {
            return;
        }
        let subscribe: Vec<dc::TrackRequest> = want
            .iter()
            .filter(|(r, size)| l.requested.get(*r) != Some(*size))
            .map(|(r, (w, h))| dc::TrackRequest {
                stream_id: r.stream_id.clone(),
                track_id: r.track_id.clone(),
                width: *w,
                height: *h,
            })
            .collect();
        let unsubscribe: Vec<TrackRef> = l
            .requested
            .keys()
            .filter(|r| !want.contains_key(*r))
            .cloned()
            .collect();
        debug!(
            client = link.0,
            subscribe = subscribe.len(),
            unsubscribe = unsubscribe.len(),
            "asking the other focus for our clients' tracks"
        );
        l.requested = want;
        self.channel(
            link,
            &DcMessage::TrackSubscription(dc::TrackSubscription {
                subscribe,
                unsubscribe,
            }),
        );
    }

    // ------------------------------------------------------------------
    // Active speaker

    /// The forwarder named a new active speaker of the call `conf_id` in
    /// `room_id` (`None`: nobody, e.g. the speaker left). Every client of
    /// that call whose data channel is open is sent `m.call.active_speaker`
    /// (the speaker too); a client whose channel opens later is sent the
    /// current one. A speaker that is not a client of that call is ignored
    /// (logged); the same speaker again sends nothing.
    pub fn handle_active_speaker(
        &mut self,
        room_id: &str,
        conf_id: &str,
        speaker: Option<ClientId>,
    ) {
        let in_call = |c: &Client| c.room_id == room_id && c.conf_id == conf_id;
        if !self.clients.values().any(in_call) {
            debug!(%room_id, %conf_id, "active speaker of a call with no client; ignored");
            return;
        }
        if let Some(s) = speaker
            && !self.clients.get(&s).is_some_and(in_call)
        {
            debug!(%room_id, %conf_id, client = s.0, "active speaker not in that call; ignored");
            return;
        }
        let key = (room_id.to_owned(), conf_id.to_owned());
        let entry = self.speakers.entry(key).or_insert((None, 0));
        if entry.1 > 0 && entry.0 == speaker {
            return;
        }
        *entry = (speaker, entry.1 + 1);
        info!(
            %room_id,
            %conf_id,
            speaker = ?speaker.and_then(|s| self.device_of(s)).map(ToString::to_string),
            "active speaker"
        );
        let ids: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| in_call(c))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.send_speaker(id);
        }
    }

    /// The active speaker of a call, as last announced.
    pub fn active_speaker(&self, room_id: &str, conf_id: &str) -> Option<ClientId> {
        self.speakers
            .get(&(room_id.to_owned(), conf_id.to_owned()))
            .and_then(|(s, _)| *s)
    }

    /// How many times the active speaker of a call was announced (a new
    /// speaker, or nobody), since the call started at the focus.
    pub fn active_speaker_changes(&self, room_id: &str, conf_id: &str) -> u64 {
        self.speakers
            .get(&(room_id.to_owned(), conf_id.to_owned()))
            .map_or(0, |(_, n)| *n)
    }

    /// Sends `client` its call's active speaker, if one was announced.
    fn send_speaker(&mut self, client: ClientId) {
        let Some(c) = self.clients.get(&client) else {
            return;
        };
        if !c.channel_open || c.is_link() {
            return;
        }
        let Some(speaker) = self
            .speakers
            .get(&(c.room_id.clone(), c.conf_id.clone()))
            .map(|(s, _)| *s)
        else {
            return;
        };
        if speaker.is_some_and(|s| self.is_link(s)) {
            // A link carries several voices: the other focus names its own
            // speaker to its clients.
            return;
        }
        let msg = DcMessage::ActiveSpeaker(speaker.and_then(|s| {
            let p = self.clients.get(&s)?;
            Some(dc::ActiveSpeaker {
                user_id: p.device.user_id.clone(),
                device_id: p.device.device_id.clone(),
                stream_id: voice_stream(p),
            })
        }));
        self.channel(client, &msg);
    }

    // ------------------------------------------------------------------
    // Time and draining

    /// When [`Focus::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<u64> {
        let auth = self.rooms.values().filter_map(Authoriser::poll_timeout);
        let hb = self
            .clients
            .values()
            .filter_map(|c| c.heartbeat.as_ref().and_then(Heartbeat::poll_timeout));
        let held = self.held.iter().map(|h| h.until);
        // Links that may be placed again, and placed ones not yet open.
        let retry = self
            .me()
            .into_iter()
            .flat_map(|_| self.link_retry.values().map(|(at, _)| *at));
        let placed = self.clients.values().filter_map(|c| {
            let l = c.link.as_ref().filter(|l| l.outgoing && !c.channel_open)?;
            Some(l.placed_at.saturating_add(LINK_INVITE_LIFETIME_MS))
        });
        auth.chain(hb).chain(held).chain(retry).chain(placed).min()
    }

    /// Runs what is due at `now`: expiries, pings, held invites.
    pub fn handle_timeout(&mut self, now: u64) {
        for auth in self.rooms.values_mut() {
            auth.handle_timeout(now);
        }
        self.absorb_auth(now);
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        for id in ids {
            self.pump_heartbeat(now, id);
        }
        if self.held.iter().any(|h| now >= h.until) {
            self.recheck_held(now);
        }
        let unanswered: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| {
                !c.channel_open
                    && c.link.as_ref().is_some_and(|l| {
                        l.outgoing && now >= l.placed_at.saturating_add(LINK_INVITE_LIFETIME_MS)
                    })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in unanswered {
            self.remove_client(now, id, "link_timeout", true);
        }
        self.plan_links(now);
    }

    /// Stops accepting calls (invites are turned down with
    /// `focus_shutdown`); the calls already served go on until
    /// [`Focus::hang_up_all`]. Every client whose data channel is open is
    /// told (`m.call.focus_draining`, with `hangup_in_ms` when given), so
    /// that it can set up its mesh calls while its media still comes
    /// through here; links with other foci are not told (their clients
    /// learn it from their own focus's metadata once the link ends).
    pub fn start_draining(&mut self, hangup_in_ms: Option<u64>) {
        if self.draining {
            return;
        }
        self.draining = true;
        let held = std::mem::take(&mut self.held);
        for h in held {
            self.refuse(h.device, FOCUS_SHUTDOWN);
        }
        let told: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.channel_open && c.link.is_none())
            .map(|(id, _)| *id)
            .collect();
        info!(
            clients = told.len(),
            ?hangup_in_ms,
            "draining: telling the clients"
        );
        for id in told {
            self.channel(id, &DcMessage::FocusDraining { hangup_in_ms });
        }
    }

    /// Hangs up on every client (`focus_shutdown`): they fall back to the
    /// mesh.
    pub fn hang_up_all(&mut self, now: u64) {
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        for id in ids {
            self.remove_client(now, id, FOCUS_SHUTDOWN, true);
        }
    }
}

/// The stream that carries a client's voice: its first audio track of a
/// usermedia stream, else its first audio track.
fn voice_stream(p: &Client) -> Option<String> {
    let audio = || p.published.iter().filter(|t| t.kind == TrackKind::Audio);
    audio()
        .find(|t| {
            p.metadata
                .get(&t.stream_id)
                .is_none_or(|m| m.purpose == FeedPurpose::Usermedia)
        })
        .or_else(|| audio().next())
        .map(|t| t.stream_id.clone())
}

/// A track's metadata entry as the focus sends it: its kind.
fn track_entry(t: &PublishedTrack) -> dc::TrackMetadata {
    dc::TrackMetadata {
        kind: Some(match t.kind {
            TrackKind::Audio => dc::MediaKind::Audio,
            TrackKind::Video => dc::MediaKind::Video,
        }),
        ..dc::TrackMetadata::default()
    }
}

/// Whether the publisher another focus names for `stream_id` (a stream
/// of the link `p`) is a live participant of the call that publishes to
/// that focus: a focus cannot pass a stream off as another member's, nor
/// as that of a member of a third focus.
fn origin_is_participant(p: &Client, stream_id: &str, auth: &Authoriser) -> bool {
    p.link
        .as_ref()
        .and_then(|l| l.origins.get(stream_id))
        .and_then(|s| Some(DeviceKey::new(s.user_id.clone()?, s.device_id.clone()?)))
        .is_some_and(|d| auth.publishes_to(&d, &p.device))
}

/// A stream's metadata entry as the focus sends it: the publisher's
/// purpose and mute states, and who it is (for a stream that came over a
/// link, as the other focus named it; `None` if it named nobody).
fn stream_entry(p: &Client, stream_id: &str) -> Option<dc::StreamMetadata> {
    if let Some(l) = &p.link {
        let mut s = l.origins.get(stream_id)?.clone();
        s.tracks.clear();
        return (s.user_id.is_some() && s.device_id.is_some()).then_some(s);
    }
    let own = p.metadata.get(stream_id);
    let mut s = dc::StreamMetadata::new(
        own.map(|m| m.purpose.clone())
            .unwrap_or(FeedPurpose::Usermedia),
    );
    s.audio_muted = own.is_some_and(|m| m.audio_muted);
    s.video_muted = own.is_some_and(|m| m.video_muted);
    s.user_id = Some(p.device.user_id.clone());
    s.device_id = Some(p.device.device_id.clone());
    Some(s)
}
