//! Inputs, outputs and configuration of the orchestrator ([`crate::GroupCall`]).

use serde_json::Value;

use crate::error::ParseError;
use crate::events::{CallIntent, CallType, EventNames, FeedPurpose};
use crate::ids::DeviceKey;
use crate::room::LeftReason;
use crate::signalling::Candidate;

/// Settings of one participant. `Config::new` gives the reference's defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our user id.
    pub user_id: String,
    /// Our device id (also our `party_id`).
    pub device_id: String,
    /// Seed for call, session and stream ids (the driver passes OS randomness).
    pub seed: u64,
    /// Which event type names to write.
    pub event_names: EventNames,
    /// Lifetime of our `m.call.member` device entry (default 1 h, as the reference).
    pub member_expiry_ms: u64,
    /// Republish our entry this long after the last publish (default 45 min).
    pub member_refresh_ms: u64,
    /// An unanswered invite is sent again (same `seq`) this long after it
    /// was sent, then at doubling intervals; also the spacing of calls after
    /// a failed one (default 5 s).
    pub retry_interval_ms: u64,
    /// The MSC's retries: after the first call and this many more went
    /// unanswered, [`CallEvent::Unanswered`] is reported and the device is
    /// called on at a backed-off interval while it stays a live member with
    /// the same session (default 3).
    pub max_retries: u32,
    /// `lifetime` of our invites and negotiate offers (default 60 s). An
    /// unanswered invite stays open this long, as the reference's does.
    pub invite_lifetime_ms: u64,
    /// Longest backed-off wait: the lifetime of an invite after the MSC's
    /// retries (doubling from `invite_lifetime_ms`), and the spacing of calls
    /// after repeated failures (default 10 min).
    pub max_backoff_ms: u64,
    /// Our session id (MSC3401: "generated once per client load"). The
    /// driver passes one per process run; when `None` the core makes one
    /// when first joining and keeps it for later joins.
    pub session_id: Option<String>,
    /// Media must connect this long after the offer/answer exchange, and the
    /// media layer must produce a description within it (default 15 s).
    pub connect_timeout_ms: u64,
    /// Trickled candidates are batched for this long after our invite (2 s).
    pub caller_candidate_delay_ms: u64,
    /// ... and for this long after our answer (500 ms).
    pub callee_candidate_delay_ms: u64,
    /// A `seq` gap is skipped after this long (default 2 s); see [`crate::reorder`].
    pub reorder_gap_timeout_ms: u64,
    /// Messages from a device not (yet) in the member state are held this
    /// long waiting for its member event, then dropped (default 10 s).
    pub unknown_sender_grace_ms: u64,
    /// A connected device whose member entry disappears (not expired: removed)
    /// keeps its peer this long in case the entry comes back with the same
    /// session. Two devices of one user share one state event and can
    /// overwrite each other's entries; each republishes its own, so such a
    /// flap heals within a few state round trips (default 5 s).
    pub orphan_grace_ms: u64,
    /// Refuse plaintext signalling.
    pub require_encrypted: bool,
    /// Participants need room membership `join` (default true).
    pub require_room_membership: bool,
    /// Burst of signalling messages accepted from one user (default 200).
    pub rate_burst: u32,
    /// Refill of that burst per second (default 50).
    pub rate_per_sec: u32,
    /// The focus (MSC3898 SFU) we publish to, if any: published as our
    /// `m.foci.active` (and `m.foci.preferred`); members that publish to the
    /// same focus are then not called in the mesh (default none: full mesh).
    /// With [`Config::follow_foci`] it is our preferred focus.
    pub focus: Option<crate::events::FocusRef>,
    /// Choose the focus from the members' `m.foci.active` (MSC3898 "Choosing
    /// a focus"): our preferred focus ([`Config::focus`]) when another member
    /// is active on it, else the focus most other members are active on,
    /// else our preferred one, else none; looked at again whenever member
    /// entries change, so we follow the members when they move (default
    /// false: [`Config::focus`] only).
    pub follow_foci: bool,
    /// A focus that has not pinged us on its data channel for this long is
    /// hung up on (MSC3898: it pings at most every 30 s; default 60 s).
    pub focus_ping_timeout_ms: u64,
    /// Through our focus, receive the camera video of only the N most recent
    /// active speakers the focus names ([`CallEvent::ActiveSpeaker`]);
    /// everyone's audio and screenshares still come (default `None`: all
    /// video). Changed during the call with [`Command::FocusRecentSpeakers`].
    pub focus_recent_speakers: Option<usize>,
}

impl Config {
    /// Defaults like the reference for `user_id`/`device_id`.
    pub fn new(user_id: impl Into<String>, device_id: impl Into<String>) -> Self {
        Self {
            user_id: user_id.into(),
            device_id: device_id.into(),
            seed: 0,
            focus: None,
            focus_ping_timeout_ms: 60_000,
            follow_foci: false,
            focus_recent_speakers: None,
            event_names: EventNames::Unstable,
            member_expiry_ms: 60 * 60 * 1000,
            member_refresh_ms: 45 * 60 * 1000,
            retry_interval_ms: 5000,
            max_retries: 3,
            invite_lifetime_ms: 60_000,
            max_backoff_ms: 10 * 60 * 1000,
            session_id: None,
            connect_timeout_ms: 15_000,
            caller_candidate_delay_ms: 2000,
            callee_candidate_delay_ms: 500,
            reorder_gap_timeout_ms: 2000,
            unknown_sender_grace_ms: 10_000,
            orphan_grace_ms: 5000,
            require_encrypted: false,
            require_room_membership: true,
            rate_burst: 200,
            rate_per_sec: 50,
        }
    }
}

/// Identifies one peer connection (one `call_id` with one remote device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerHandle(pub u64);

/// A feed we send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFeed {
    /// Stream id: the SDP msid stream id and the `sdp_stream_metadata` key.
    pub stream_id: String,
    /// Purpose.
    pub purpose: FeedPurpose,
    /// Audio track id, if the feed has audio.
    pub audio_track_id: Option<String>,
    /// Video track id, if the feed has video.
    pub video_track_id: Option<String>,
}

/// Options to create a call when joining a room that has none.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateOptions {
    /// `m.intent`.
    pub intent: CallIntent,
    /// `m.type`.
    pub call_type: CallType,
    /// `m.name`.
    pub name: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            intent: CallIntent::Prompt,
            call_type: CallType::Video,
            name: None,
        }
    }
}

/// What the user asks for.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Command {
    /// Join the room's call; create one first if there is none and
    /// `create` is given.
    Join {
        /// Create the call if the room has none.
        create: Option<CreateOptions>,
        /// Send audio.
        audio: bool,
        /// Send video.
        video: bool,
    },
    /// Hang up everyone and remove our membership.
    Leave,
    /// Leave and mark the call terminated.
    Terminate,
    /// Mute or unmute our audio.
    SetAudioMuted(bool),
    /// Mute or unmute our video.
    SetVideoMuted(bool),
    /// Start or stop sharing the screen.
    Screenshare(bool),
    /// Through our focus, receive the media of these devices only (`None`,
    /// the default: everyone's). Devices met in the mesh are not affected.
    FocusSubscriptions(Option<Vec<crate::ids::DeviceKey>>),
    /// Publish to this focus from now on (`None`: none, the full mesh): our
    /// choice, so [`Config::follow_foci`] turns off. The call with the
    /// previous focus ends (`focus_switch`).
    SetFocus(Option<crate::events::FocusRef>),
    /// Through our focus, receive the camera video of only the N most
    /// recent active speakers (`None`: everyone's video); audio and
    /// screenshares are not affected. See [`Config::focus_recent_speakers`].
    FocusRecentSpeakers(Option<usize>),
    /// Through our focus, receive the camera video of `device` (`None`:
    /// of every publisher without a size of its own) at about `size`
    /// (width, height in pixels, each in `1..=16384`; `None`: back to the
    /// size the focus advertises). Sent as the width and height of
    /// `m.call.track_subscription`; a focus with simulcast picks the layer
    /// that covers it.
    FocusVideoSize {
        /// The publisher, or `None` for everyone else.
        device: Option<crate::ids::DeviceKey>,
        /// Width and height wished for.
        size: Option<(u32, u32)>,
    },
}

/// The time of an input, on the two clocks the core reads.
///
/// Every timer (retries, timeouts, rate limits, grace periods, the member
/// refresh) runs on `mono_ms`, a monotonic clock in milliseconds from any
/// origin ([`GroupCall::poll_timeout`](crate::GroupCall::poll_timeout) is on it
/// too); `unix_ms` (POSIX milliseconds) is read only where the wire carries
/// wall-clock times: the `expires_ts` we write and the ones we compare, and
/// call ids. A wall clock that jumps (NTP step, suspend) therefore moves
/// expiries, never timers.
///
/// A plain `u64` converts into a `Now` with both clocks equal: simulations
/// and tests that have one clock pass it directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds (any origin; never goes back).
    pub mono_ms: u64,
    /// Wall clock, POSIX milliseconds.
    pub unix_ms: u64,
}

impl From<u64> for Now {
    fn from(ms: u64) -> Self {
        Now {
            mono_ms: ms,
            unix_ms: ms,
        }
    }
}

/// A to-device message that arrived, after decryption.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingToDevice {
    /// Sender user (authenticated by the homeserver).
    pub sender: String,
    /// Sender device, known when the message was Olm-decrypted.
    pub sender_device: Option<String>,
    /// Event type.
    pub event_type: String,
    /// Content.
    pub content: Value,
    /// Whether it came Olm-encrypted.
    pub encrypted: bool,
}

/// Connection state reported by the media layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MediaState {
    /// ICE/DTLS in progress.
    Connecting,
    /// Media can flow.
    Connected,
    /// Temporarily no connectivity (may recover).
    Disconnected,
    /// Connectivity lost for good.
    Failed,
}

/// Results of [`MediaRequest`]s, from the media layer.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MediaEvent {
    /// The offer asked for by [`MediaRequest::CreateOffer`].
    OfferCreated {
        /// Peer.
        peer: PeerHandle,
        /// SDP, with the candidates known so far.
        sdp: String,
        /// All local candidates are in the SDP (it ends with end-of-candidates).
        gathering_complete: bool,
    },
    /// The answer asked for by [`MediaRequest::AcceptOffer`].
    AnswerCreated {
        /// Peer.
        peer: PeerHandle,
        /// SDP, with the candidates known so far.
        sdp: String,
        /// All local candidates are in the SDP.
        gathering_complete: bool,
    },
    /// Candidates found after the description; an end-of-candidates entry
    /// ends gathering.
    LocalCandidates {
        /// Peer.
        peer: PeerHandle,
        /// Candidates.
        candidates: Vec<Candidate>,
    },
    /// Connectivity changed.
    State {
        /// Peer.
        peer: PeerHandle,
        /// New state.
        state: MediaState,
    },
    /// The media layer could not do what was asked (bad SDP, ...).
    Error {
        /// Peer.
        peer: PeerHandle,
        /// What went wrong.
        message: String,
    },
    /// The data channel of a focus peer opened (MSC3898 signalling).
    ChannelOpen {
        /// Peer.
        peer: PeerHandle,
    },
    /// A text message arrived on a focus peer's data channel.
    ChannelMessage {
        /// Peer.
        peer: PeerHandle,
        /// The message (JSON, see [`crate::dc`]).
        text: String,
    },
    /// A focus peer's data channel closed.
    ChannelClosed {
        /// Peer.
        peer: PeerHandle,
    },
}

/// Everything that can come in, for drivers and fuzzers that prefer one entry point.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Input {
    /// A room state event (client-server JSON).
    State(Value),
    /// A to-device message.
    ToDevice(IncomingToDevice),
    /// A media result.
    Media(MediaEvent),
    /// A user command.
    Command(Command),
    /// Our last membership event was accepted by the homeserver.
    MembershipPublished,
}

/// One to-device message to send.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingMessage {
    /// Recipient user.
    pub user_id: String,
    /// Recipient device.
    pub device_id: String,
    /// Content.
    pub content: Value,
}

/// To-device messages of one event type: one HTTP request can carry them all.
#[derive(Debug, Clone, PartialEq)]
pub struct ToDeviceBatch {
    /// Event type, e.g. `m.call.invite`.
    pub event_type: String,
    /// The messages, in the order they must be sent.
    pub messages: Vec<OutgoingMessage>,
}

/// What the core asks the media layer to do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MediaRequest {
    /// Create an offer with our feeds: a new peer connection if `peer` is
    /// new, otherwise a renegotiation (with an ICE restart if asked). Answer
    /// with [`MediaEvent::OfferCreated`].
    CreateOffer {
        /// Peer.
        peer: PeerHandle,
        /// Remote device.
        remote: DeviceKey,
        /// Feeds to send.
        feeds: Vec<LocalFeed>,
        /// Restart ICE.
        ice_restart: bool,
        /// The remote is our focus (MSC3898): a new peer connection opens
        /// the data channel that carries the focus's signalling.
        focus: bool,
    },
    /// Accept a remote offer (a new peer connection if `peer` is new; a
    /// pending local offer is rolled back). Answer with
    /// [`MediaEvent::AnswerCreated`].
    AcceptOffer {
        /// Peer.
        peer: PeerHandle,
        /// Remote device.
        remote: DeviceKey,
        /// Remote SDP.
        sdp: String,
        /// Feeds to send.
        feeds: Vec<LocalFeed>,
    },
    /// Apply the remote answer to our offer.
    ApplyAnswer {
        /// Peer.
        peer: PeerHandle,
        /// Remote SDP.
        sdp: String,
    },
    /// Add remote candidates (an empty candidate ends them).
    AddRemoteCandidates {
        /// Peer.
        peer: PeerHandle,
        /// Candidates.
        candidates: Vec<Candidate>,
    },
    /// Mute state of our feeds changed (applies to every peer).
    SetMuted {
        /// Audio muted.
        audio_muted: bool,
        /// Video muted.
        video_muted: bool,
    },
    /// Close the peer connection.
    ClosePeer {
        /// Peer.
        peer: PeerHandle,
    },
    /// Send a text message on a focus peer's data channel (MSC3898).
    SendChannel {
        /// Peer.
        peer: PeerHandle,
        /// The message (JSON, see [`crate::dc`]).
        text: String,
    },
}

/// State of a peer as shown to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerStatus {
    /// Signalling or ICE in progress.
    Connecting,
    /// Connected.
    Connected,
    /// Lost connectivity; an ICE restart is under way.
    Reconnecting,
    /// Failed, with the hangup reason (the peer is gone).
    Failed(String),
    /// Closed in an orderly way, with the reason (the peer is gone).
    Closed(String),
}

/// What the application is told.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CallEvent {
    /// The room's current call changed (before or without joining).
    RoomCallChanged {
        /// The call id, if the room has a live call.
        call_id: Option<String>,
    },
    /// We joined.
    Joined {
        /// Call id.
        call_id: String,
        /// Our session id.
        session_id: String,
        /// Whether we created the call.
        created: bool,
    },
    /// We left.
    Left,
    /// The call was terminated (by us or someone else).
    CallEnded {
        /// Call id.
        call_id: String,
        /// `m.terminated`.
        reason: String,
    },
    /// A device joined the call.
    ParticipantJoined {
        /// The device.
        device: DeviceKey,
        /// Its session.
        session_id: String,
    },
    /// A device left the call.
    ParticipantLeft {
        /// The device.
        device: DeviceKey,
        /// Its session.
        session_id: String,
        /// Why.
        reason: LeftReason,
    },
    /// A peer connection changed state.
    PeerState {
        /// Remote device.
        device: DeviceKey,
        /// The peer.
        peer: PeerHandle,
        /// The 1:1 call id.
        call_id: String,
        /// New state.
        status: PeerStatus,
    },
    /// A remote feed appeared.
    FeedAdded {
        /// Remote device.
        device: DeviceKey,
        /// Stream id (SDP msid).
        stream_id: String,
        /// Purpose.
        purpose: FeedPurpose,
        /// Audio muted.
        audio_muted: bool,
        /// Video muted.
        video_muted: bool,
    },
    /// A remote feed's mute state changed.
    FeedChanged {
        /// Remote device.
        device: DeviceKey,
        /// Stream id.
        stream_id: String,
        /// Purpose.
        purpose: FeedPurpose,
        /// Audio muted.
        audio_muted: bool,
        /// Video muted.
        video_muted: bool,
    },
    /// A remote feed went away.
    FeedRemoved {
        /// Remote device.
        device: DeviceKey,
        /// Stream id.
        stream_id: String,
    },
    /// A device answered neither our first call nor the MSC's retries
    /// ([`Config::max_retries`]). Reported once per session of the device;
    /// we go on calling it at a backed-off interval (each invite open longer,
    /// up to [`Config::max_backoff_ms`]), and at once when it sends anything
    /// or refreshes its membership.
    Unanswered {
        /// The device.
        device: DeviceKey,
        /// Calls placed so far.
        calls: u32,
    },
    /// Our focus named the call's active speaker (`m.call.active_speaker`,
    /// sent when it changes): `device` (`None`: nobody speaks now, e.g. the
    /// speaker left, or our focus is gone) and the stream of its voice when
    /// the focus said. We may be the speaker.
    ActiveSpeaker {
        /// The speaker.
        device: Option<DeviceKey>,
        /// The stream (SDP msid) that carries its voice, if known.
        stream_id: Option<String>,
    },
    /// A call became live in the room while we are not in one: ring, prompt
    /// or stay silent according to its `intent` (`m.ring` rings, `m.prompt`
    /// prompts, `m.room` is silent; absent or unknown: prompt).
    CallStarted {
        /// Its call id.
        call_id: String,
        /// `m.intent` of its `m.call` event.
        intent: Option<CallIntent>,
        /// `m.type` of its `m.call` event.
        call_type: Option<CallType>,
        /// `m.name`, if any.
        name: Option<String>,
    },
}

/// What the core asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Output {
    /// Send these to-device messages (Olm-encrypted where possible).
    ToDevice(ToDeviceBatch),
    /// Send a state event; for our membership the driver reports success
    /// with [`Input::MembershipPublished`].
    PublishState {
        /// Event type.
        event_type: String,
        /// State key.
        state_key: String,
        /// Content.
        content: Value,
    },
    /// A request to the media layer.
    Media(MediaRequest),
    /// An event for the application.
    Event(CallEvent),
    /// What became of an incoming to-device message: one for every message
    /// passed to [`crate::call::GroupCall::handle_to_device`] (before the
    /// outputs it caused), and one more when a message held for its
    /// sender's member event is dropped later.
    Signalling(SignallingReport),
}

/// What became of one incoming to-device message (see
/// [`Output::Signalling`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SignallingReport {
    /// Sender user.
    pub sender: String,
    /// Event type.
    pub event_type: String,
    /// Whether it came Olm-encrypted.
    pub encrypted: bool,
    /// `Ok`: what was done with it; `Err`: why it was refused.
    pub outcome: Result<Accepted, Ignored>,
}

/// Why an incoming to-device message was not acted upon.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Ignored {
    /// Not an `m.call.*` signalling type.
    #[error("not a call signalling event: {0}")]
    NotSignalling(String),
    /// We are not in a call.
    #[error("not in a call")]
    NotJoined,
    /// Plaintext while encryption is required.
    #[error("plaintext signalling refused (encryption required)")]
    Unencrypted,
    /// Sender over its rate limit.
    #[error("rate limit exceeded by {0}")]
    RateLimited(String),
    /// Malformed content.
    #[error("malformed: {0}")]
    Malformed(#[from] ParseError),
    /// For another group call.
    #[error("for another call (conf_id {0})")]
    OtherCall(String),
    /// For another session of ours.
    #[error("for another session (dest_session_id {0})")]
    WrongSession(String),
    /// `device_id` differs from the Olm-authenticated sender device.
    #[error("device_id {claimed} does not match the sender device {actual}")]
    DeviceMismatch {
        /// In the content.
        claimed: String,
        /// From decryption.
        actual: String,
    },
    /// From ourselves.
    #[error("our own message")]
    OwnEcho,
    /// Already seen.
    #[error("duplicate seq")]
    Duplicate,
    /// Too many messages buffered for that sender.
    #[error("buffer full")]
    Overflow,
    /// Not addressed to us (`invitee`).
    #[error("invite for another user")]
    NotForUs,
    /// A message for a call that does not exist or has ended.
    #[error("unknown or ended call_id {0}")]
    UnknownCall(String),
    /// A message that does not fit the call's state.
    #[error("unexpected in this state: {0}")]
    Unexpected(String),
    /// Held for [`Config::unknown_sender_grace_ms`] waiting for the sender's
    /// member event, which never came: the sender is not a participant.
    #[error("sender device {0} is not a participant of the call (grace period over)")]
    NotParticipant(String),
}

/// What happened to an incoming to-device message that was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Accepted {
    /// Processed (possibly with buffered messages after it).
    Processed,
    /// Buffered until an earlier `seq` arrives.
    Reordered,
    /// Held until the sender's member event arrives.
    HeldForMembership,
    /// For a call that ended a moment ago (by either side): sent before the
    /// sender learnt of the end (crossing hangups, an answer or
    /// `select_answer` overtaken by the hangup). Nothing is left to do.
    AfterEnd,
}
