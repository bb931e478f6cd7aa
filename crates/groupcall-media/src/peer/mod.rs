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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::poll_fn;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::{Codec, CodecConfig, CodecSpec, FormatParams, PayloadParams};
use str0m::media::{
    Direction, Frequency, KeyframeRequestKind, MediaData, MediaKind, MediaTime, Mid, Pt,
};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use crate::ice::IceServer;
use crate::sdp::{self, LinePlan, Section};
use crate::sink::{FrameSink, SinkError, SinkFilter};
use crate::source::FrameSource;
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
}

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
    /// A received frame (only with [`PeerConfig::deliver_frames`]).
    Frame(Frame),
    /// The remote asked for a key frame on a local track that has no source
    /// able to produce one: push a key frame with `send_frame`.
    KeyframeRequested {
        /// The local track.
        track_id: String,
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
        if let Some(PeerEvent::Frame(_)) = ev {
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
            Request::SetSource { .. } => "SetSource",
            Request::SetMuted { .. } => "SetMuted",
            Request::RequestKeyframe { .. } => "RequestKeyframe",
            Request::AddSink { .. } => "AddSink",
            Request::FinishSinks => "FinishSinks",
            Request::Stats => "Stats",
            Request::Close => "Close",
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
}

mod gather;
pub mod host;
mod negotiate;
pub mod set;
mod state;

pub use host::{MediaHost, MediaPeer, live_socket_count};
use set::{RequestId, Transmit};
