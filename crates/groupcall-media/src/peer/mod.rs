//! [`MediaPeer`]: one WebRTC peer connection (one `str0m::Rtc`) to one
//! remote device, driven by a tokio task over real UDP sockets.
//!
//! Sockets: each peer binds its own UDP socket per local address (an
//! unspecified address such as `0.0.0.0` expands to the interface addresses
//! of that family, each bound separately so that the destination of every
//! datagram is known). There is no shared socket and no demultiplexing
//! between peers; a few sockets per peer are cheap at mesh sizes.
//!
//! Candidates: host candidates of every bound socket (unless `relay_only`),
//! server-reflexive addresses from STUN servers and relayed addresses from
//! TURN servers (see `gather`). Offers and answers wait for gathering at
//! most `gather_wait`, so they usually carry every candidate; later ones are
//! reported as [`PeerEvent::LocalCandidates`] for trickling.

use std::collections::{HashMap, HashSet};
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
use tokio::sync::{mpsc, oneshot, watch};
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

type Reply<T> = oneshot::Sender<Result<T, MediaError>>;

enum Command {
    CreateOffer {
        feeds: Vec<LocalFeed>,
        ice_restart: bool,
        reply: Reply<String>,
    },
    AcceptOffer {
        sdp: String,
        feeds: Vec<LocalFeed>,
        reply: Reply<String>,
    },
    ApplyAnswer {
        sdp: String,
        reply: Reply<()>,
    },
    AddRemoteCandidate {
        candidate: String,
        reply: Reply<()>,
    },
    LocalCandidates {
        reply: Reply<Vec<IceCandidate>>,
    },
    SendFrame {
        track_id: String,
        data: Arc<[u8]>,
        duration: Duration,
    },
    SetSource {
        track_id: String,
        source: Box<dyn FrameSource>,
    },
    SetMuted {
        track_id: String,
        muted: bool,
    },
    RequestKeyframe {
        track_id: String,
    },
    AddSink {
        filter: SinkFilter,
        sink: Box<dyn FrameSink>,
    },
    FinishSinks {
        reply: Reply<Vec<SinkError>>,
    },
    Stats {
        reply: Reply<PeerStats>,
    },
    Close {
        reply: Reply<()>,
    },
}

/// A WebRTC peer connection to one remote device.
///
/// Cheap to share by reference; all methods only enqueue work for the
/// peer's task. Dropping the handle closes the connection.
pub struct MediaPeer {
    cmd: mpsc::UnboundedSender<Command>,
    local_addrs: Vec<SocketAddr>,
    gathered: watch::Receiver<bool>,
    gather_deadline: Instant,
}

impl std::fmt::Debug for MediaPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaPeer")
            .field("local_addrs", &self.local_addrs)
            .finish()
    }
}

impl MediaPeer {
    /// Binds the sockets, gathers candidates (host, and server-reflexive if
    /// configured) and starts the peer's task. Must be called within a
    /// tokio runtime.
    pub async fn new(config: PeerConfig) -> Result<(MediaPeer, PeerEvents), MediaError> {
        let addrs = expand_bind_addrs(&config.bind_addrs);
        if addrs.is_empty() {
            return Err(MediaError::NoLocalAddress);
        }
        let mut sockets = Vec::new();
        for ip in addrs {
            match UdpSocket::bind(SocketAddr::new(ip, 0)).await {
                Ok(s) => sockets.push(s),
                Err(e) => warn!(%ip, error = %e, "cannot bind UDP socket"),
            }
        }
        if sockets.is_empty() {
            return Err(MediaError::NoLocalAddress);
        }
        let mut local_addrs = Vec::new();
        for s in &sockets {
            local_addrs.push(s.local_addr()?);
        }

        let now = Instant::now();
        let mut builder = Rtc::builder().clear_codecs().enable_opus(true, false);
        if config.retransmission {
            builder = builder.enable_vp8(true);
        } else {
            without_retransmission(builder.codec_config());
        }
        let mut rtc = builder.build(now);

        let mut candidates = Vec::new();
        if !config.relay_only {
            for addr in &local_addrs {
                match Candidate::host(*addr, "udp") {
                    Ok(c) => {
                        if let Some(c) = rtc.add_local_candidate(c) {
                            candidates.push(c.clone());
                        }
                    }
                    Err(e) => warn!(%addr, error = %e, "unusable host candidate"),
                }
            }
        }
        let (gather, gathered) = gather::Gatherer::new(&config, now);
        info!(addrs = ?local_addrs, "media peer bound");

        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let driver = Driver {
            rtc,
            sockets,
            local_addrs: local_addrs.clone(),
            cmd_rx,
            events: ev_tx,
            queued: queued.clone(),
            candidates,
            tracks: Vec::new(),
            pending_sources: HashMap::new(),
            pending_muted: HashMap::new(),
            ever_bound: HashSet::new(),
            local_sections: Vec::new(),
            remote: HashMap::new(),
            ended_remote: Vec::new(),
            pending_offer: None,
            sinks: Vec::new(),
            state: ConnState::New,
            ever_connected: false,
            last_rx: now,
            negotiated_at: None,
            rtc_timeout: now,
            frames_dropped: 0,
            frames_unmatched: 0,
            gather,
            selected: None,
            gather_deadline: now + config.gather_wait,
            config,
            finished: false,
        };
        let gather_deadline = driver.gather_deadline;
        tokio::spawn(driver.run());
        Ok((
            MediaPeer {
                cmd: cmd_tx,
                local_addrs,
                gathered,
                gather_deadline,
            },
            PeerEvents { rx: ev_rx, queued },
        ))
    }

    /// The bound socket addresses.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Whether gathering has finished (every STUN server answered or was
    /// given up, every TURN allocation made or failed).
    pub fn gathering_complete(&self) -> bool {
        *self.gathered.borrow()
    }

    /// Waits until gathering finished or `gather_wait` after creation.
    async fn wait_gathering(&self) {
        let mut rx = self.gathered.clone();
        let _ =
            tokio::time::timeout_at(self.gather_deadline.into(), rx.wait_for(|done| *done)).await;
    }

    fn send(&self, c: Command) -> Result<(), MediaError> {
        self.cmd.send(c).map_err(|_| MediaError::Closed)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, MediaError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| MediaError::Closed)?
    }

    /// Creates an offer sending `feeds` (the complete set of local feeds:
    /// tracks missing from it stop being sent). The SDP contains all local
    /// candidates. The offer stays pending until [`MediaPeer::apply_answer`]
    /// or until a remote offer is accepted instead.
    pub async fn create_offer(&self, feeds: &[LocalFeed]) -> Result<String, MediaError> {
        self.wait_gathering().await;
        let feeds = feeds.to_vec();
        self.call(|reply| Command::CreateOffer {
            feeds,
            ice_restart: false,
            reply,
        })
        .await
    }

    /// Like [`MediaPeer::create_offer`] with new ICE credentials (ICE restart).
    pub async fn restart_ice(&self, feeds: &[LocalFeed]) -> Result<String, MediaError> {
        self.wait_gathering().await;
        let feeds = feeds.to_vec();
        self.call(|reply| Command::CreateOffer {
            feeds,
            ice_restart: true,
            reply,
        })
        .await
    }

    /// Accepts a remote offer and returns the answer, sending `feeds` on the
    /// offered m-lines where possible (see [`PeerEvent::NegotiationNeeded`]).
    /// A pending local offer is rolled back.
    pub async fn accept_offer(&self, sdp: &str, feeds: &[LocalFeed]) -> Result<String, MediaError> {
        self.wait_gathering().await;
        let feeds = feeds.to_vec();
        let sdp = sdp.to_string();
        self.call(|reply| Command::AcceptOffer { sdp, feeds, reply })
            .await
    }

    /// Applies the remote answer to the pending offer.
    pub async fn apply_answer(&self, sdp: &str) -> Result<(), MediaError> {
        let sdp = sdp.to_string();
        self.call(|reply| Command::ApplyAnswer { sdp, reply }).await
    }

    /// Adds a trickled remote candidate (`candidate:...`, with or without
    /// `a=`). An empty string or `end-of-candidates` is accepted and ignored.
    /// With BUNDLE all m-lines share one transport, so `sdp_mid` and
    /// `sdp_m_line_index` are only logged.
    pub async fn add_remote_candidate(
        &self,
        candidate: &str,
        sdp_mid: Option<&str>,
        sdp_m_line_index: Option<u16>,
    ) -> Result<(), MediaError> {
        trace!(candidate, ?sdp_mid, ?sdp_m_line_index, "remote candidate");
        let candidate = candidate.to_string();
        self.call(|reply| Command::AddRemoteCandidate { candidate, reply })
            .await
    }

    /// The local candidates gathered so far (waiting for gathering like
    /// `create_offer`); all of them are also in every later local SDP.
    pub async fn local_candidates(&self) -> Result<Vec<IceCandidate>, MediaError> {
        self.wait_gathering().await;
        self.call(|reply| Command::LocalCandidates { reply }).await
    }

    /// Sends one encoded frame on a local track: an Opus packet (audio) or a
    /// VP8 frame (video), lasting `duration`. RTP timestamps advance by the
    /// duration, also while muted or not yet connected (frames are dropped
    /// then). After (un)binding or unmuting a video track, delta frames are
    /// dropped until a key frame comes.
    pub fn send_frame(
        &self,
        track_id: &str,
        data: impl Into<Arc<[u8]>>,
        duration: Duration,
    ) -> Result<(), MediaError> {
        self.send(Command::SendFrame {
            track_id: track_id.to_string(),
            data: data.into(),
            duration,
        })
    }

    /// Attaches a source that the peer paces in real time for `track_id`
    /// (replacing any previous one). It may be set before the track is
    /// negotiated; it starts once connected.
    pub fn set_source(&self, track_id: &str, source: impl FrameSource) -> Result<(), MediaError> {
        self.send(Command::SetSource {
            track_id: track_id.to_string(),
            source: Box::new(source),
        })
    }

    /// Mutes or unmutes a local track: nothing is sent while muted, without
    /// renegotiation.
    pub fn set_muted(&self, track_id: &str, muted: bool) -> Result<(), MediaError> {
        self.send(Command::SetMuted {
            track_id: track_id.to_string(),
            muted,
        })
    }

    /// Asks the remote for a key frame (PLI) on a remote video track.
    pub fn request_keyframe(&self, remote_track_id: &str) -> Result<(), MediaError> {
        self.send(Command::RequestKeyframe {
            track_id: remote_track_id.to_string(),
        })
    }

    /// Attaches a sink for received frames matching `filter`.
    pub fn add_sink(&self, filter: SinkFilter, sink: impl FrameSink) -> Result<(), MediaError> {
        self.send(Command::AddSink {
            filter,
            sink: Box::new(sink),
        })
    }

    /// Finishes (writes trailers, flushes) and detaches all sinks; returns
    /// the errors sinks reported while finishing or writing.
    pub async fn finish_sinks(&self) -> Result<Vec<SinkError>, MediaError> {
        self.call(|reply| Command::FinishSinks { reply }).await
    }

    /// Counters of all local and remote tracks.
    pub async fn stats(&self) -> Result<PeerStats, MediaError> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// Closes the connection (DTLS close_notify), finishes the sinks and ends
    /// the peer's task. Emits [`PeerEvent::Closed`].
    pub async fn close(&self) -> Result<(), MediaError> {
        match self.call(|reply| Command::Close { reply }).await {
            Err(MediaError::Closed) => Ok(()),
            r => r,
        }
    }
}

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

enum Wake {
    Command(Option<Command>),
    Packet(usize, std::io::Result<(usize, SocketAddr)>),
    Lookup(gather::Lookup),
    Timer,
}

struct Driver {
    rtc: Rtc,
    sockets: Vec<UdpSocket>,
    local_addrs: Vec<SocketAddr>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<PeerEvent>,
    queued: Arc<AtomicUsize>,
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
    /// Candidate gathering and the TURN relays.
    gather: gather::Gatherer,
    /// (source, destination) of the last non-STUN packet str0m sent: the
    /// selected candidate pair.
    selected: Option<(SocketAddr, SocketAddr)>,
    gather_deadline: Instant,
    config: PeerConfig,
    finished: bool,
}

mod driver;
mod gather;
mod negotiate;
