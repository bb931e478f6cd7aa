//! WebRTC peer connections to remote devices: one `str0m::Rtc` per peer,
//! many peers of one participant in one sans-IO [`PeerSet`](set::PeerSet) behind one UDP
//! socket per bound local address, driven by one tokio task
//! ([`MediaHost`]).
//!
//! - [`set`]: the sans-IO core (peers, gathering, TURN, demultiplexing).
//! - [`host`]: the thin tokio driver and the handles ([`MediaHost`],
//!   [`MediaPeer`]).
//! - `state` / `negotiate`: one peer (str0m events, media, offer/answer).
//! - `gather`: STUN and TURN candidates for the whole set.
//!
//! Sockets: a host binds one UDP socket per local address (an unspecified
//! address such as `0.0.0.0` expands to the interface addresses of that
//! family, each bound separately so that the destination of every datagram
//! is known); all its peers share them. Participants in one process use one
//! host each: two of them on one socket could not tell their DTLS apart.
//!
//! Candidates: host candidates of every socket (unless `relay_only`),
//! server-reflexive addresses from STUN servers and relayed addresses from
//! TURN servers (one allocation per TURN server per host). Offers and
//! answers wait for gathering at most `gather_wait` (inside the set, without
//! holding up other peers), so they usually carry every candidate; later
//! ones are reported as [`PeerEvent::LocalCandidates`] for trickling.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::format::{Codec, CodecConfig, CodecSpec, FormatParams, PayloadParams};
use str0m::media::{
    Direction, Frequency, KeyframeRequestKind, MediaData, MediaKind, MediaTime, Pt,
};
pub use str0m::media::{Mid, Rid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use crate::ice::IceServer;
use crate::sdp::{self, LinePlan, Section};
use crate::simulcast::{LayerGovernor, RateMeter, SimulcastConfig};
use crate::sink::{FrameSink, SinkError, SinkFilter};
use crate::source::{FrameSource, SourceFrame};
use crate::stun;
use crate::types::{
    Counters, FeedPurpose, Frame, IceCandidate, LocalFeed, LocalTrackStats, PeerStats,
    RemoteTrackStats, SelectedPair, TrackKind,
};

/// Errors of [`MediaPeer`] operations.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// Binding or using a socket failed.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// No usable local address.
    #[error("no local address to bind")]
    NoLocalAddress,
    /// The remote SDP could not be parsed or applied.
    #[error("invalid remote SDP: {0}")]
    RemoteSdp(String),
    /// The WebRTC stack refused an operation.
    #[error("webrtc: {0}")]
    Rtc(String),
    /// A stream or track id is not a valid msid id, or is used twice.
    #[error("invalid feed: {0}")]
    InvalidFeed(String),
    /// A remote candidate could not be parsed.
    #[error("invalid ICE candidate {candidate:?}: {reason}")]
    BadCandidate {
        /// The candidate as given.
        candidate: String,
        /// Why it was refused.
        reason: String,
    },
    /// `apply_answer` without an outstanding offer.
    #[error("no local offer is waiting for an answer")]
    NoPendingOffer,
    /// `create_offer` found nothing to negotiate.
    #[error("nothing to negotiate")]
    NothingToNegotiate,
    /// The peer has been closed.
    #[error("peer closed")]
    Closed,
    /// No data channel is open on this peer.
    #[error("no data channel is open")]
    ChannelNotOpen,
    /// The data channel's send buffer cannot take the message now (the
    /// remote does not read fast enough): the message was not sent.
    #[error("data channel send buffer full ({len} bytes refused)")]
    ChannelFull {
        /// The size of the refused message.
        len: usize,
    },
    /// The message is larger than the data channel's send buffer
    /// ([`MAX_CHANNEL_MESSAGE`]): it can never be sent.
    #[error("data channel message too large ({len} bytes, at most {max})")]
    ChannelMessageTooLarge {
        /// The size of the refused message.
        len: usize,
        /// The largest message that can be sent.
        max: usize,
    },
    /// The request needs a forwarding peer ([`PeerConfig::forward`]), or
    /// one that is not (frames on a forwarding peer).
    #[error("not possible in this peer's mode: {0}")]
    WrongMode(&'static str),
}

/// Configuration of a [`MediaPeer`].
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Local addresses to bind one UDP socket each (ephemeral ports).
    /// `0.0.0.0` / `::` expand to the usable addresses of that family of
    /// the interfaces that are up (see [`crate::bind`]; falling back to
    /// loopback). Default: `127.0.0.1`.
    pub bind_addrs: Vec<IpAddr>,
    /// STUN server to learn a server-reflexive candidate from (the same as
    /// a `stun:` URL in `ice_servers`).
    pub stun_server: Option<SocketAddr>,
    /// STUN and TURN servers: `stun:` URLs give server-reflexive candidates,
    /// `turn:` URLs (UDP, with username and credential) relayed ones.
    pub ice_servers: Vec<IceServer>,
    /// Offer only relayed candidates (no host or server-reflexive ones):
    /// all media goes through a TURN server. Hides the local addresses and
    /// gets through strict NATs and firewalls that allow the TURN server.
    pub relay_only: bool,
    /// How long a STUN server's answer or a TURN allocation may take before
    /// that server is given up.
    pub stun_timeout: Duration,
    /// How long `create_offer`, `accept_offer` and `local_candidates` wait
    /// for gathering to finish (counted from the peer's creation); later
    /// candidates come as [`PeerEvent::LocalCandidates`].
    pub gather_wait: Duration,
    /// No packet for this long while connected: [`PeerEvent::Disconnected`].
    pub disconnect_timeout: Duration,
    /// No packet for this long (or no connection this long after the
    /// first negotiation): [`PeerEvent::Failed`].
    pub failed_timeout: Duration,
    /// Offer to receive audio even without a local audio track.
    pub receive_audio: bool,
    /// Offer to receive video even without a local video track.
    pub receive_video: bool,
    /// Deliver received frames as [`PeerEvent::Frame`] (counters and sinks
    /// work either way).
    pub deliver_frames: bool,
    /// With `deliver_frames`, at most this many undelivered frames queue up;
    /// further frames are dropped (and counted) until the queue drains.
    pub max_queued_frames: usize,
    /// Diagnostic knob, not for real calls (default `true`): `false` offers
    /// and accepts VP8 without an RTX payload type and without `nack`
    /// feedback, so lost video packets are neither NACKed by us nor
    /// retransmitted to a peer that has the same setting. The lossy-network
    /// test turns it off to measure what NACK/RTX recovers.
    pub retransmission: bool,
    /// Forwarding mode (for a focus / SFU): str0m's RTP mode. Media is not
    /// depacketized: every received RTP packet is reported as
    /// [`PeerEvent::Rtp`], and local tracks carry RTP packets written with
    /// [`Request::WriteRtp`] (no frames, no sources, no sinks). A focus
    /// usually also turns `receive_audio` and `receive_video` off (its
    /// offers then carry only the tracks it sends). Default `false`.
    pub forward: bool,
    /// Open a data channel labelled [`DATA_CHANNEL_LABEL`] in this peer's
    /// first offer (MSC3898: the client opens it in the initial offer).
    /// Channels the remote opens are accepted whatever this setting.
    /// Default `false`.
    pub data_channel: bool,
    /// Send the camera video as simulcast (issue 12; for a peer whose
    /// remote is a focus): its m-line is offered with these layers, and
    /// their sending follows the uplink estimate (see
    /// [`crate::simulcast`]). Screenshare and audio stay one layer.
    /// Default `None`: one layer.
    pub simulcast: Option<SimulcastConfig>,
    /// Estimate the bandwidth towards the remote (str0m's send-side
    /// estimation over transport-wide congestion control feedback),
    /// starting from this many bits per second, and report it as
    /// [`PeerEvent::EgressEstimate`]; [`Request::SetBitrateTargets`] says
    /// what to probe for. For a focus's peers, whose estimate picks each
    /// subscriber's simulcast layers. Default `None`.
    pub estimate_bandwidth: Option<u64>,
}

/// The label of the data channel a peer opens ([`PeerConfig::data_channel`]).
pub const DATA_CHANNEL_LABEL: &str = "m.call";

/// The largest data channel message [`Request::SendChannel`] takes: str0m's
/// SCTP send buffer (128 KiB), which is below the 256 KiB
/// `max-message-size` browsers and str0m advertise.
pub const MAX_CHANNEL_MESSAGE: usize = 128 * 1024;

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            bind_addrs: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            stun_server: None,
            ice_servers: Vec::new(),
            relay_only: false,
            stun_timeout: Duration::from_millis(1500),
            gather_wait: Duration::from_millis(300),
            disconnect_timeout: Duration::from_secs(5),
            failed_timeout: Duration::from_secs(15),
            receive_audio: true,
            receive_video: true,
            deliver_frames: false,
            max_queued_frames: 512,
            retransmission: true,
            forward: false,
            data_channel: false,
            simulcast: None,
            estimate_bandwidth: None,
        }
    }
}

/// Adds VP8 without an RTX payload type and without `nack` feedback (see
/// [`PeerConfig::retransmission`]): str0m then neither sends NACKs for it
/// nor answers them.
fn without_retransmission(codecs: &mut CodecConfig) {
    let mut vp8 = PayloadParams::new(
        Pt::new_with_value(96),
        None,
        CodecSpec {
            codec: Codec::Vp8,
            clock_rate: Frequency::NINETY_KHZ,
            channels: None,
            format: FormatParams::default(),
        },
    );
    vp8.set_fb_nack(false);
    let mut params = codecs.params().to_vec();
    params.push(vp8);
    *codecs = CodecConfig::new_from_payload_params(params);
}

/// What a [`MediaPeer`] reports.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// ICE and DTLS are up (again).
    Connected,
    /// No packets for `disconnect_timeout` (or ICE consent lost).
    Disconnected,
    /// Not connected within, or no packets for, `failed_timeout`.
    Failed,
    /// The connection was closed (locally or by the remote).
    Closed,
    /// The remote started sending a track.
    RemoteTrack {
        /// msid stream id (the remote's `sdp_stream_metadata` key).
        stream_id: String,
        /// msid track id.
        track_id: String,
        /// Audio or video.
        kind: TrackKind,
        /// The m-line's mid.
        mid: String,
    },
    /// The remote stopped sending a track (renegotiated away).
    RemoteTrackRemoved {
        /// msid stream id.
        stream_id: String,
        /// msid track id.
        track_id: String,
        /// Audio or video.
        kind: TrackKind,
        /// The m-line's mid.
        mid: String,
    },
    /// The first frame of a remote track arrived (on a forwarding peer: its
    /// first RTP packet), once per m-line: the moment media is flowing,
    /// without waiting for the next [`MediaPeer::stats`] poll.
    FirstFrame {
        /// msid stream id.
        stream_id: String,
        /// Audio or video.
        kind: TrackKind,
        /// The m-line's mid.
        mid: String,
        /// The track's counters, that frame included.
        received: crate::types::Counters,
    },
    /// A received frame (only with [`PeerConfig::deliver_frames`]).
    Frame(Frame),
    /// The remote asked us to keep under this bitrate on an m-line (RTCP
    /// REMB: a receiver's or a focus's limit); for applications that
    /// encode their own media.
    BitrateLimit {
        /// The m-line.
        mid: Mid,
        /// The limit, bits per second.
        bps: u64,
    },
    /// The estimated bandwidth towards the remote, bits per second (only
    /// with [`PeerConfig::estimate_bandwidth`]; repeated as it changes,
    /// about every 100 ms while feedback arrives).
    EgressEstimate {
        /// The estimate, bits per second.
        bps: u64,
    },
    /// The remote asked for a key frame on a local track that has no source
    /// able to produce one: push a key frame with `send_frame` (or, on a
    /// forwarding peer, ask the publisher for one).
    KeyframeRequested {
        /// The local track.
        track_id: String,
        /// The m-line it is sent on.
        mid: Mid,
        /// The simulcast layer asked for, if any.
        rid: Option<Rid>,
        /// A FIR (full intra request) rather than a PLI.
        fir: bool,
    },
    /// A local track's m-line is negotiated: from now on it carries what is
    /// sent on it (on a forwarding peer: [`Request::WriteRtp`] to `mid`).
    LocalTrackReady {
        /// msid stream id.
        stream_id: String,
        /// msid track id.
        track_id: String,
        /// Audio or video.
        kind: TrackKind,
        /// The m-line.
        mid: Mid,
    },
    /// One received RTP packet (forwarding peers only, see
    /// [`PeerConfig::forward`]).
    Rtp(RtpIn),
    /// The data channel is open (opened by us or by the remote); text can
    /// go both ways ([`Request::SendChannel`]).
    ChannelOpen {
        /// Its label.
        label: String,
    },
    /// A text message arrived on the data channel. Binary or non-UTF-8
    /// messages are dropped (logged).
    ChannelMessage {
        /// The message.
        text: String,
    },
    /// The data channel closed.
    ChannelClosed,
    /// Our pending offer was rolled back (by [`Request::Rollback`], or by
    /// accepting the remote's offer instead: glare, where we are the polite
    /// side). Local tracks it was to add are unbound; offer again once the
    /// remote's offer is answered.
    OfferRolledBack,
    /// The simulcast layers sent on a local track changed (the uplink
    /// estimate dropped or resumed layers; see [`crate::simulcast`]), or
    /// are known for the first time.
    SimulcastLayers {
        /// The local track.
        track_id: String,
        /// Its m-line.
        mid: Mid,
        /// The RIDs sent now, lowest first.
        sending: Vec<String>,
        /// The RIDs paused for lack of bandwidth, lowest first.
        paused: Vec<String>,
        /// The uplink estimate that decided it, bits per second.
        estimate_bps: Option<u64>,
    },
    /// Some local tracks could not be placed in the last answer: make a new
    /// offer (`create_offer`) to send them.
    NegotiationNeeded,
    /// Local candidates found after an offer or answer was made without
    /// them (gathering took longer than `gather_wait`): send them to the
    /// remote. `complete` marks the end of gathering (then `candidates` may
    /// be empty). Only reported when an SDP went out before gathering
    /// finished.
    LocalCandidates {
        /// The new candidates.
        candidates: Vec<IceCandidate>,
        /// Gathering is over.
        complete: bool,
    },
}

/// The receiving end of a peer's events.
pub struct PeerEvents {
    rx: mpsc::UnboundedReceiver<PeerEvent>,
    queued: Arc<AtomicUsize>,
}

impl std::fmt::Debug for PeerEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerEvents").finish_non_exhaustive()
    }
}

impl PeerEvents {
    /// The next event; `None` once the peer's task has ended.
    pub async fn recv(&mut self) -> Option<PeerEvent> {
        let ev = self.rx.recv().await;
        self.account(&ev);
        ev
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<PeerEvent> {
        let ev = self.rx.try_recv().ok();
        self.account(&ev);
        ev
    }

    fn account(&self, ev: &Option<PeerEvent>) {
        if let Some(PeerEvent::Frame(_) | PeerEvent::Rtp(_)) = ev {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A request to one peer of a [`PeerSet`](set::PeerSet) (see [`MediaPeer`] for what
/// each does).
pub enum Request {
    /// Create an offer sending these feeds (with new ICE credentials if
    /// `ice_restart`). Answered with [`Reply::Sdp`].
    CreateOffer {
        /// The complete set of local feeds.
        feeds: Vec<LocalFeed>,
        /// ICE restart.
        ice_restart: bool,
    },
    /// Accept a remote offer. Answered with [`Reply::Sdp`].
    AcceptOffer {
        /// The remote SDP.
        sdp: String,
        /// The complete set of local feeds.
        feeds: Vec<LocalFeed>,
    },
    /// Apply the remote answer. Answered with [`Reply::Done`].
    ApplyAnswer {
        /// The remote SDP.
        sdp: String,
    },
    /// Add a trickled remote candidate. Answered with [`Reply::Done`].
    AddRemoteCandidate {
        /// The candidate line.
        candidate: String,
    },
    /// The local candidates. Answered with [`Reply::Candidates`].
    LocalCandidates,
    /// Send one encoded frame. No answer.
    SendFrame {
        /// The local track.
        track_id: String,
        /// The encoded frame.
        data: Arc<[u8]>,
        /// Its duration.
        duration: Duration,
    },
    /// Send one instant of a simulcast track: one encoded frame per layer,
    /// all with the same RTP timestamp. Layers are named by RID; a remote
    /// that did not accept simulcast gets the middle layer given. No
    /// answer.
    SendLayerFrames {
        /// The local track.
        track_id: String,
        /// (RID, encoded frame), lowest layer first.
        layers: Vec<(String, Arc<[u8]>)>,
        /// Their duration.
        duration: Duration,
    },
    /// Attach a paced source. No answer.
    SetSource {
        /// The local track.
        track_id: String,
        /// The source.
        source: Box<dyn FrameSource>,
    },
    /// Mute or unmute a local track. No answer.
    SetMuted {
        /// The local track.
        track_id: String,
        /// Muted.
        muted: bool,
    },
    /// Ask the remote for a key frame. No answer.
    RequestKeyframe {
        /// The remote track.
        track_id: String,
    },
    /// Attach a sink. No answer.
    AddSink {
        /// Which frames.
        filter: SinkFilter,
        /// The sink.
        sink: Box<dyn FrameSink>,
    },
    /// Finish and detach the sinks. Answered with [`Reply::SinkErrors`].
    FinishSinks,
    /// Counters. Answered with [`Reply::Stats`].
    Stats,
    /// Close the connection. Answered with [`Reply::Done`].
    Close,
    /// Send a text message on the data channel. Answered with
    /// [`Reply::Done`], or an error when no channel is open
    /// ([`MediaError::ChannelNotOpen`]), its send buffer cannot take the
    /// message now ([`MediaError::ChannelFull`]: nothing is queued) or ever
    /// ([`MediaError::ChannelMessageTooLarge`]).
    SendChannel {
        /// The message (MSC3898 messages are JSON text).
        text: String,
    },
    /// Write one RTP packet on a local track of a forwarding peer. No
    /// answer: packets that cannot be written (unknown or unready m-line,
    /// not connected, not a forwarding peer) are dropped and counted
    /// ([`PeerStats::rtp_write_dropped`]).
    WriteRtp(RtpOut),
    /// Ask for a key frame on a remote m-line (and simulcast layer), by
    /// PLI or FIR. Works in both modes. No answer.
    RequestKeyframeOn {
        /// The remote m-line.
        mid: Mid,
        /// The simulcast layer, if any.
        rid: Option<Rid>,
        /// FIR instead of PLI.
        fir: bool,
    },
    /// Roll back our pending offer (the polite side of glare, before
    /// accepting the remote's). Answered with [`Reply::Done`], or
    /// [`MediaError::NoPendingOffer`]. Emits [`PeerEvent::OfferRolledBack`].
    Rollback,
    /// Ask the remote to keep what it sends us under `bps` bits per second
    /// in all (RTCP REMB on its video streams, the total shared among
    /// them). Advisory: a sender may ignore it. No answer.
    LimitIncomingBitrate {
        /// The limit, bits per second.
        bps: u64,
    },
    /// What the bandwidth estimation ([`PeerConfig::estimate_bandwidth`])
    /// works towards: `minimum_bps` is kept up with padding when media
    /// sends less (capped by the estimate), `desired_bps` is probed for
    /// (str0m's `Bwe::set_bitrate`). Ignored without estimation. No
    /// answer.
    SetBitrateTargets {
        /// Total outgoing rate to sustain, bits per second.
        minimum_bps: u64,
        /// The rate we would like to send at, bits per second.
        desired_bps: u64,
    },
}

/// One RTP packet received by a forwarding peer ([`PeerEvent::Rtp`]). The
/// payload is str0m's decrypted buffer, moved out (not copied).
#[derive(Debug, Clone)]
pub struct RtpIn {
    /// The m-line it came on.
    pub mid: Mid,
    /// The simulcast layer, if any.
    pub rid: Option<Rid>,
    /// Audio or video (the m-line's kind).
    pub kind: TrackKind,
    /// The sender's SSRC (RTX is already unwrapped: the main SSRC).
    pub ssrc: u32,
    /// Extended sequence number (the 16-bit one is its low bits).
    pub seq: u64,
    /// Payload type.
    pub pt: u8,
    /// RTP timestamp.
    pub timestamp: u32,
    /// Marker bit (video: last packet of a frame).
    pub marker: bool,
    /// RFC 6464 audio level (-dBov, 0 loudest, -127 silence), if sent.
    pub audio_level: Option<i8>,
    /// RFC 6464 voice activity flag, if sent.
    pub voice_activity: Option<bool>,
    /// VP8: the first packet of a key frame.
    pub keyframe_start: bool,
    /// The payload (without the RTP header).
    pub payload: Arc<[u8]>,
    /// When the datagram was received.
    pub received_at: Instant,
}

/// One RTP packet to write on a forwarding peer's local track
/// ([`Request::WriteRtp`]).
#[derive(Debug, Clone)]
pub struct RtpOut {
    /// The local track's m-line ([`PeerEvent::LocalTrackReady`]).
    pub mid: Mid,
    /// Payload type; `None`: the one negotiated on this m-line for its
    /// kind's codec (Opus or VP8), which is what a forwarder usually wants
    /// (the publisher's and the subscriber's numbers may differ).
    pub pt: Option<u8>,
    /// Extended sequence number. The first packet of a stream must have a
    /// sequence number below 65536 (the receiver starts with rollover
    /// counter 0): rebase the publisher's numbers per subscriber.
    pub seq: u64,
    /// RTP timestamp.
    pub timestamp: u32,
    /// Marker bit.
    pub marker: bool,
    /// RFC 6464 audio level to send, if any.
    pub audio_level: Option<i8>,
    /// RFC 6464 voice activity to send, if any.
    pub voice_activity: Option<bool>,
    /// Keep the packet in str0m's send buffer so that a NACK from the
    /// receiver is answered by an RTX retransmission (video).
    pub nackable: bool,
    /// VP8: rewrite the payload descriptor's PictureID to this value (when
    /// the descriptor has one; the payload is patched while serialising,
    /// not copied here).
    pub vp8_picture_id: Option<u16>,
    /// The payload (without the RTP header); shared, not copied.
    pub payload: Arc<[u8]>,
    /// The wallclock time matching `timestamp` (e.g. when the publisher's
    /// packet arrived).
    pub wallclock: Instant,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Request::CreateOffer { .. } => "CreateOffer",
            Request::AcceptOffer { .. } => "AcceptOffer",
            Request::ApplyAnswer { .. } => "ApplyAnswer",
            Request::AddRemoteCandidate { .. } => "AddRemoteCandidate",
            Request::LocalCandidates => "LocalCandidates",
            Request::SendFrame { .. } => "SendFrame",
            Request::SendLayerFrames { .. } => "SendLayerFrames",
            Request::SetSource { .. } => "SetSource",
            Request::SetMuted { .. } => "SetMuted",
            Request::RequestKeyframe { .. } => "RequestKeyframe",
            Request::AddSink { .. } => "AddSink",
            Request::FinishSinks => "FinishSinks",
            Request::Stats => "Stats",
            Request::Close => "Close",
            Request::SendChannel { .. } => "SendChannel",
            Request::WriteRtp(_) => "WriteRtp",
            Request::RequestKeyframeOn { .. } => "RequestKeyframeOn",
            Request::Rollback => "Rollback",
            Request::LimitIncomingBitrate { .. } => "LimitIncomingBitrate",
            Request::SetBitrateTargets { .. } => "SetBitrateTargets",
        };
        f.write_str(name)
    }
}

/// The successful outcome of a [`Request`].
#[derive(Debug)]
pub enum Reply {
    /// Done.
    Done,
    /// A local SDP (offer or answer).
    Sdp(String),
    /// Local candidates.
    Candidates(Vec<IceCandidate>),
    /// Errors of sinks while finishing.
    SinkErrors(Vec<SinkError>),
    /// Counters.
    Stats(Box<PeerStats>),
}

/// The outcome of a [`Request`].
pub type Answer = Result<Reply, MediaError>;

fn expand_bind_addrs(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    let push = |ip: IpAddr, out: &mut Vec<IpAddr>| {
        if !out.contains(&ip) {
            out.push(ip);
        }
    };
    for &a in addrs {
        if !a.is_unspecified() {
            push(a, &mut out);
            continue;
        }
        let mut found = false;
        let interfaces = crate::bind::interface_addrs();
        for ip in crate::bind::usable_addrs(&interfaces) {
            if ip.is_ipv4() == a.is_ipv4() {
                push(ip, &mut out);
                found = true;
            }
        }
        if !found {
            let lo = match a {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            push(lo, &mut out);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The driver task.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    New,
    Connected,
    Disconnected,
    Failed,
    Closed,
}

struct LocalTrack {
    stream_id: String,
    track_id: String,
    kind: TrackKind,
    purpose: FeedPurpose,
    /// The m-line this track is sent on.
    mid: Option<Mid>,
    /// The mid was added by a pending offer (gone if the offer is dropped).
    mid_pending: bool,
    /// Bound, but the negotiation has not completed: nothing is sent yet.
    awaiting: bool,
    muted: bool,
    source: Option<Box<dyn FrameSource>>,
    next_due: Option<Instant>,
    /// Next RTP timestamp (extended) in the kind's clock.
    rtp: u64,
    /// Drop video delta frames until a key frame.
    want_keyframe: bool,
    sent: Counters,
    /// The RIDs offered for simulcast on its m-line (empty: one layer).
    offered_rids: Vec<Rid>,
    /// The simulcast layers being sent (empty: one layer).
    layers: Vec<SendLayer>,
    /// Which layers fit the uplink (with `layers`).
    governor: Option<LayerGovernor>,
    /// The frames of one instant of a simulcast source (reused).
    scratch: Vec<SourceFrame>,
}

/// One simulcast layer of a local track.
struct SendLayer {
    rid: Rid,
    /// Drop this layer's delta frames until its key frame.
    want_keyframe: bool,
    meter: RateMeter,
}

impl LocalTrack {
    fn new(stream_id: &str, track_id: &str, kind: TrackKind, purpose: FeedPurpose) -> Self {
        Self {
            stream_id: stream_id.to_string(),
            track_id: track_id.to_string(),
            kind,
            purpose,
            mid: None,
            mid_pending: false,
            awaiting: false,
            muted: false,
            source: None,
            next_due: None,
            rtp: fastrand::u32(..) as u64,
            want_keyframe: kind == TrackKind::Video,
            sent: Counters::default(),
            offered_rids: Vec::new(),
            layers: Vec::new(),
            governor: None,
            scratch: Vec::new(),
        }
    }
}

struct RemoteTrack {
    stream_id: Arc<str>,
    track_id: Arc<str>,
    kind: TrackKind,
    mid: Mid,
    received: Counters,
    need_keyframe: bool,
    last_pli: Option<Instant>,
}

impl RemoteTrack {
    fn stats(&self, active: bool) -> RemoteTrackStats {
        RemoteTrackStats {
            stream_id: self.stream_id.to_string(),
            track_id: self.track_id.to_string(),
            kind: self.kind,
            mid: self.mid.to_string(),
            active,
            received: self.received,
        }
    }
}

/// A wanted local track, from the feeds.
struct Wanted {
    stream_id: String,
    track_id: String,
    kind: TrackKind,
    purpose: FeedPurpose,
}

fn wanted_tracks(feeds: &[LocalFeed]) -> Result<Vec<Wanted>, MediaError> {
    let mut out: Vec<Wanted> = Vec::new();
    let mut streams = HashSet::new();
    for f in feeds {
        if !sdp::is_valid_msid_id(&f.stream_id) {
            return Err(MediaError::InvalidFeed(format!(
                "stream id {:?} is not a valid msid id",
                f.stream_id
            )));
        }
        if !streams.insert(f.stream_id.as_str()) {
            return Err(MediaError::InvalidFeed(format!(
                "stream id {:?} used twice",
                f.stream_id
            )));
        }
        for (kind, id) in [
            (TrackKind::Audio, &f.audio_track_id),
            (TrackKind::Video, &f.video_track_id),
        ] {
            let Some(id) = id else { continue };
            if !sdp::is_valid_msid_id(id) {
                return Err(MediaError::InvalidFeed(format!(
                    "track id {id:?} is not a valid msid id"
                )));
            }
            if out.iter().any(|w| &w.track_id == id) {
                return Err(MediaError::InvalidFeed(format!(
                    "track id {id:?} used twice"
                )));
            }
            out.push(Wanted {
                stream_id: f.stream_id.clone(),
                track_id: id.clone(),
                kind,
                purpose: f.purpose,
            });
        }
    }
    Ok(out)
}

fn to_media_kind(k: TrackKind) -> MediaKind {
    match k {
        TrackKind::Audio => MediaKind::Audio,
        TrackKind::Video => MediaKind::Video,
    }
}

fn section_kind(s: &Section) -> Option<TrackKind> {
    match s.media.as_str() {
        "audio" => Some(TrackKind::Audio),
        "video" => Some(TrackKind::Video),
        _ => None,
    }
}

fn ticks_to_duration(ticks: u64, rate: u32) -> Duration {
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / rate.max(1) as u64)
}

fn duration_to_ticks(d: Duration, rate: u32) -> u64 {
    (d.as_nanos() * rate as u128 / 1_000_000_000) as u64
}

/// One peer of a [`PeerSet`](set::PeerSet) (sans-IO).
struct PeerState {
    /// The time of the input being handled.
    now: Instant,
    rtc: Rtc,
    /// str0m's transmits, for the set to send or relay.
    out: VecDeque<Transmit>,
    events: VecDeque<PeerEvent>,
    candidates: Vec<Candidate>,
    tracks: Vec<LocalTrack>,
    pending_sources: HashMap<String, Box<dyn FrameSource>>,
    pending_muted: HashMap<String, bool>,
    /// Mids a local track was ever bound to (not reused for other tracks).
    ever_bound: HashSet<Mid>,
    /// m-sections of the last local SDP.
    local_sections: Vec<Section>,
    remote: HashMap<Mid, RemoteTrack>,
    ended_remote: Vec<RemoteTrackStats>,
    pending_offer: Option<SdpPendingOffer>,
    /// Directions the pending offer changed (str0m changes them in the
    /// session at once), as they were: restored by a rollback.
    pending_dirs: Vec<(Mid, Direction)>,
    /// Local tracks the pending offer removed, with their m-lines: put
    /// back by a rollback (their sources wait in `pending_sources`).
    pending_removed: Vec<LocalTrack>,
    sinks: Vec<(SinkFilter, Box<dyn FrameSink>)>,
    state: ConnState,
    ever_connected: bool,
    last_rx: Instant,
    negotiated_at: Option<Instant>,
    rtc_timeout: Instant,
    frames_dropped: u64,
    frames_unmatched: u64,
    /// (source, destination) of the last non-STUN packet str0m sent: the
    /// selected candidate pair.
    selected: Option<(SocketAddr, SocketAddr)>,
    /// The set's gathering is complete.
    gather_done: bool,
    /// An SDP was made before gathering finished: later candidates and the
    /// end of gathering are reported as events.
    sdp_while_gathering: bool,
    /// Candidates found since the last report.
    late: Vec<Candidate>,
    /// The end of gathering is to be reported.
    late_complete: bool,
    gathering_time: Option<Duration>,
    created: Instant,
    /// SDP requests wait for gathering until then.
    gather_deadline: Instant,
    /// Requests waiting for gathering, in order.
    deferred: VecDeque<(Option<RequestId>, Request)>,
    /// The local ICE ufrag (for demultiplexing Binding requests).
    ufrag: String,
    config: PeerConfig,
    finished: bool,
    /// The data channel (the first one opened, by either side).
    channel: Option<ChannelId>,
    /// A data channel was put in an offer (pending or accepted), or the
    /// remote offered SCTP.
    channel_offered: bool,
    /// The pending offer carries the data channel.
    channel_pending: bool,
    /// Forwarding mode: RTP packets written but dropped.
    rtp_write_dropped: u64,
    /// Data channel messages dropped (binary, not UTF-8, other channels).
    channel_dropped: u64,
    /// Forwarding mode: what str0m's last egress report said of each sent
    /// stream (its counts are totals).
    egress_nacks: HashMap<(Mid, Option<Rid>), EgressReport>,
}

/// What str0m's egress reports said of one sent stream.
#[derive(Debug, Clone, Copy, Default)]
struct EgressReport {
    /// NACKs received, as of the last report.
    nacks: u64,
    /// Packets resent: str0m's packets sent on the m-line less the packets
    /// written on it, as of the last report.
    resent: u64,
    /// The loss the last receiver report gave (a fraction), and the time
    /// of the egress report that carried it: kept across reports that
    /// carried none, so a reader that looks less often than str0m reports
    /// misses none.
    loss: Option<(f32, Instant)>,
}

mod channel;
#[cfg(feature = "faults")]
pub mod faults;
mod gather;
pub mod host;
mod layers;
mod negotiate;
mod rtp;
pub mod set;
mod state;

pub use host::{MediaHost, MediaPeer, live_socket_count};
use set::{RequestId, Transmit};
