//! [`MediaPeer`]: one WebRTC peer connection (one `str0m::Rtc`) to one
//! remote device, driven by a tokio task over real UDP sockets.
//!
//! Sockets: each peer binds its own UDP socket per local address (an
//! unspecified address such as `0.0.0.0` expands to the interface addresses
//! of that family, each bound separately so that the destination of every
//! datagram is known). There is no shared socket and no demultiplexing
//! between peers; a few sockets per peer are cheap at mesh sizes.
//!
//! Candidates: host candidates of every bound socket (and, if a STUN server
//! is configured, the server-reflexive address learnt at construction) are
//! added before any SDP is made, so every offer/answer carries them and no
//! separate candidates message is needed. TURN is not supported (str0m has
//! no TURN client).

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{
    Direction, Frequency, KeyframeRequestKind, MediaData, MediaKind, MediaTime, Mid,
};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};
use tokio::io::ReadBuf;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, trace, warn};

use crate::sdp::{self, LinePlan, Section};
use crate::sink::{FrameSink, SinkError, SinkFilter};
use crate::source::FrameSource;
use crate::stun;
use crate::types::{
    Counters, FeedPurpose, Frame, IceCandidate, LocalFeed, LocalTrackStats, PeerStats,
    RemoteTrackStats, TrackKind,
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
    /// `0.0.0.0` / `::` expand to the non-loopback interface addresses of
    /// that family (falling back to loopback). Default: `127.0.0.1`.
    pub bind_addrs: Vec<IpAddr>,
    /// STUN server to learn a server-reflexive candidate from.
    pub stun_server: Option<SocketAddr>,
    /// How long construction waits for the STUN answer.
    pub stun_timeout: Duration,
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
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            bind_addrs: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            stun_server: None,
            stun_timeout: Duration::from_millis(1500),
            disconnect_timeout: Duration::from_secs(5),
            failed_timeout: Duration::from_secs(15),
            receive_audio: true,
            receive_video: true,
            deliver_frames: false,
            max_queued_frames: 512,
        }
    }
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
        let mut rtc = Rtc::builder()
            .clear_codecs()
            .enable_opus(true, false)
            .enable_vp8(true)
            .build(now);

        let mut candidates = Vec::new();
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
        if let Some(server) = config.stun_server {
            for (s, base) in sockets.iter().zip(&local_addrs) {
                let Some(mapped) = gather_srflx(s, server, config.stun_timeout).await else {
                    warn!(%server, %base, "no STUN answer");
                    continue;
                };
                debug!(%base, %mapped, "server-reflexive address");
                if mapped == *base {
                    continue;
                }
                match Candidate::server_reflexive(mapped, *base, "udp") {
                    Ok(c) => {
                        if let Some(c) = rtc.add_local_candidate(c) {
                            candidates.push(c.clone());
                        }
                    }
                    Err(e) => warn!(%mapped, error = %e, "unusable srflx candidate"),
                }
            }
        }
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
            config,
            finished: false,
        };
        tokio::spawn(driver.run());
        Ok((
            MediaPeer {
                cmd: cmd_tx,
                local_addrs,
            },
            PeerEvents { rx: ev_rx, queued },
        ))
    }

    /// The bound socket addresses.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
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

    /// The local candidates (all of them are also in every local SDP).
    pub async fn local_candidates(&self) -> Result<Vec<IceCandidate>, MediaError> {
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
        match if_addrs::get_if_addrs() {
            Ok(ifs) => {
                for i in ifs {
                    let ip = i.ip();
                    let usable = match (a, ip) {
                        (IpAddr::V4(_), IpAddr::V4(v)) => !v.is_loopback() && !v.is_link_local(),
                        (IpAddr::V6(_), IpAddr::V6(v)) => {
                            !v.is_loopback() && (v.segments()[0] & 0xffc0) != 0xfe80
                        }
                        _ => false,
                    };
                    if usable {
                        push(ip, &mut out);
                        found = true;
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list interfaces"),
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

async fn gather_srflx(
    sock: &UdpSocket,
    server: SocketAddr,
    timeout: Duration,
) -> Option<SocketAddr> {
    let local = sock.local_addr().ok()?;
    if local.is_ipv4() != server.is_ipv4() {
        return None;
    }
    let tid = stun::new_transaction_id();
    let req = stun::binding_request(&tid);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut rto = Duration::from_millis(100);
    let mut buf = [0u8; 1500];
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return None;
        }
        if let Err(e) = sock.send_to(&req, server).await {
            debug!(error = %e, "STUN send failed");
        }
        let wait_until = (now + rto).min(deadline);
        rto *= 2;
        loop {
            match tokio::time::timeout_at(wait_until, sock.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) => {
                    if from == server
                        && let Some(a) = stun::parse_binding_response(&buf[..n], &tid)
                    {
                        return Some(a);
                    }
                }
                Ok(Err(e)) => {
                    debug!(error = %e, "STUN receive failed");
                    break;
                }
                Err(_) => break,
            }
        }
    }
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
    config: PeerConfig,
    finished: bool,
}

impl Driver {
    async fn run(mut self) {
        let mut buf = vec![0u8; 2048];
        if let Err(e) = self.drain().await {
            warn!(error = %e, "webrtc failed at start");
            return;
        }
        while !self.finished {
            let deadline = self.next_deadline();
            let wake = {
                let sockets = &self.sockets;
                let recv = poll_fn(|cx| {
                    for (i, s) in sockets.iter().enumerate() {
                        let mut rb = ReadBuf::new(&mut buf);
                        if let Poll::Ready(r) = s.poll_recv_from(cx, &mut rb) {
                            return Poll::Ready((i, r.map(|a| (rb.filled().len(), a))));
                        }
                    }
                    Poll::Pending
                });
                // Unbiased: neither a flood of commands nor of datagrams can
                // starve the other branches.
                tokio::select! {
                    c = self.cmd_rx.recv() => Wake::Command(c),
                    (i, r) = recv => Wake::Packet(i, r),
                    _ = tokio::time::sleep_until(deadline.into()) => Wake::Timer,
                }
            };
            let r = match wake {
                Wake::Command(Some(c)) => self.handle_command(c).await,
                Wake::Command(None) => {
                    debug!("handle dropped, closing peer");
                    self.do_close().await;
                    Ok(())
                }
                Wake::Packet(i, Ok((n, from))) => {
                    let data = buf.get(..n).unwrap_or(&[]);
                    self.handle_packet(i, from, data).await
                }
                Wake::Packet(i, Err(e)) => {
                    // E.g. ICMP port unreachable surfacing on Linux: ignore.
                    trace!(socket = i, error = %e, "UDP receive error");
                    Ok(())
                }
                Wake::Timer => self.handle_timer().await,
            };
            if let Err(e) = r {
                warn!(error = %e, "webrtc error, failing the peer");
                self.set_state(ConnState::Failed);
                self.rtc.disconnect();
                self.finish_all_sinks();
                self.finished = true;
            }
        }
        debug!("media peer task ended");
    }

    fn emit(&self, ev: PeerEvent) {
        let _ = self.events.send(ev);
    }

    fn set_state(&mut self, s: ConnState) {
        if self.state == s || self.state == ConnState::Closed {
            return;
        }
        info!(from = ?self.state, to = ?s, "connection state");
        self.state = s;
        let ev = match s {
            ConnState::New => return,
            ConnState::Connected => PeerEvent::Connected,
            ConnState::Disconnected => PeerEvent::Disconnected,
            ConnState::Failed => PeerEvent::Failed,
            ConnState::Closed => PeerEvent::Closed,
        };
        self.emit(ev);
    }

    fn next_deadline(&self) -> Instant {
        let now = Instant::now();
        let mut d = self.rtc_timeout.min(now + Duration::from_secs(1));
        for t in &self.tracks {
            if let Some(due) = t.next_due {
                d = d.min(due);
            }
        }
        match self.state {
            ConnState::Connected => d = d.min(self.last_rx + self.config.disconnect_timeout),
            ConnState::Disconnected => d = d.min(self.last_rx + self.config.failed_timeout),
            ConnState::New => {
                if let Some(t) = self.negotiated_at {
                    d = d.min(t + self.config.failed_timeout);
                }
            }
            _ => {}
        }
        d
    }

    /// Polls str0m until it wants a timeout: the single-mutation invariant.
    async fn drain(&mut self) -> Result<(), str0m::RtcError> {
        loop {
            if !self.rtc.is_alive() {
                self.rtc_timeout = Instant::now() + Duration::from_secs(3600);
                return Ok(());
            }
            match self.rtc.poll_output()? {
                Output::Timeout(t) => {
                    self.rtc_timeout = t;
                    return Ok(());
                }
                Output::Transmit(t) => {
                    let idx = self
                        .local_addrs
                        .iter()
                        .position(|a| *a == t.source)
                        .unwrap_or(0);
                    if let Some(s) = self.sockets.get(idx)
                        && let Err(e) = s.send_to(&t.contents, t.destination).await
                    {
                        trace!(dest = %t.destination, error = %e, "UDP send failed");
                    }
                }
                Output::Event(e) => self.on_rtc_event(e),
            }
        }
    }

    fn on_rtc_event(&mut self, e: Event) {
        match e {
            Event::Connected => {
                self.ever_connected = true;
                self.last_rx = Instant::now();
                self.set_state(ConnState::Connected);
                self.start_sources();
                let mids: Vec<Mid> = self
                    .remote
                    .values()
                    .filter(|r| r.kind == TrackKind::Video)
                    .map(|r| r.mid)
                    .collect();
                for mid in mids {
                    self.send_pli(mid);
                }
            }
            Event::IceConnectionStateChange(s) => {
                debug!(?s, "ICE state");
                match s {
                    IceConnectionState::Disconnected if self.state == ConnState::Connected => {
                        self.set_state(ConnState::Disconnected)
                    }
                    IceConnectionState::Connected | IceConnectionState::Completed
                        if self.ever_connected
                            && matches!(
                                self.state,
                                ConnState::Disconnected | ConnState::Failed
                            ) =>
                    {
                        self.last_rx = Instant::now();
                        self.set_state(ConnState::Connected)
                    }
                    _ => {}
                }
            }
            Event::MediaAdded(m) => {
                debug!(mid = %m.mid, kind = ?m.kind, dir = ?m.direction, "media added")
            }
            Event::MediaChanged(m) => debug!(mid = %m.mid, dir = ?m.direction, "media changed"),
            Event::MediaData(d) => self.on_media_data(d),
            Event::KeyframeRequest(k) => {
                let Some(t) = self.tracks.iter_mut().find(|t| t.mid == Some(k.mid)) else {
                    return;
                };
                debug!(track = %t.track_id, kind = ?k.kind, "key frame requested");
                let handled = t.source.as_mut().is_some_and(|s| s.request_keyframe());
                if !handled {
                    let track_id = t.track_id.clone();
                    self.emit(PeerEvent::KeyframeRequested { track_id });
                }
            }
            Event::Closed => {
                info!("remote closed the connection");
                self.set_state(ConnState::Closed);
                self.finish_all_sinks();
                self.finished = true;
            }
            _ => {}
        }
    }

    fn send_pli(&mut self, mid: Mid) {
        let now = Instant::now();
        if let Some(r) = self.remote.get_mut(&mid) {
            r.last_pli = Some(now);
        }
        if let Some(mut w) = self.rtc.writer(mid) {
            match w.request_keyframe(None, KeyframeRequestKind::Pli) {
                Ok(()) => debug!(%mid, "requested key frame (PLI)"),
                Err(e) => trace!(%mid, error = %e, "PLI not possible yet"),
            }
        }
    }

    fn on_media_data(&mut self, d: MediaData) {
        let Some(r) = self.remote.get_mut(&d.mid) else {
            self.frames_unmatched += 1;
            trace!(mid = %d.mid, "media on an m-line without a remote track");
            return;
        };
        let keyframe = r.kind == TrackKind::Video && d.is_keyframe();
        r.received.add(d.data.len(), keyframe);
        let mut pli = false;
        if r.kind == TrackKind::Video {
            if keyframe {
                r.need_keyframe = false;
            } else if !d.contiguous {
                r.need_keyframe = true;
            }
            if r.need_keyframe
                && r.last_pli
                    .is_none_or(|t| t.elapsed() >= Duration::from_millis(500))
            {
                pli = true;
            }
        }
        let frame = Frame {
            stream_id: r.stream_id.clone(),
            track_id: r.track_id.clone(),
            kind: r.kind,
            data: d.data.clone(),
            rtp_time: d.time.numer(),
            keyframe,
            contiguous: d.contiguous,
            received_at: d.network_time,
        };
        if pli {
            let mid = d.mid;
            self.send_pli(mid);
        }
        let mut failed = Vec::new();
        for (i, (filter, sink)) in self.sinks.iter_mut().enumerate() {
            if filter.matches(&frame)
                && let Err(e) = sink.write_frame(&frame)
            {
                warn!(error = %e, "sink failed, detaching it");
                failed.push(i);
            }
        }
        for i in failed.into_iter().rev() {
            let (_, mut sink) = self.sinks.remove(i);
            let _ = sink.finish();
        }
        if self.config.deliver_frames {
            if self.queued.load(Ordering::Relaxed) < self.config.max_queued_frames {
                self.queued.fetch_add(1, Ordering::Relaxed);
                self.emit(PeerEvent::Frame(frame));
            } else {
                self.frames_dropped += 1;
            }
        }
    }

    fn start_sources(&mut self) {
        if !matches!(self.state, ConnState::Connected | ConnState::Disconnected) {
            return;
        }
        let now = Instant::now();
        for t in &mut self.tracks {
            if t.source.is_some() && t.next_due.is_none() {
                t.next_due = Some(now);
                if let Some(s) = t.source.as_mut() {
                    s.request_keyframe();
                }
            }
        }
    }

    async fn handle_packet(
        &mut self,
        idx: usize,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), str0m::RtcError> {
        let Some(&local) = self.local_addrs.get(idx) else {
            return Ok(());
        };
        let now = Instant::now();
        let Ok(recv) = Receive::new(Protocol::Udp, from, local, data) else {
            trace!(%from, "unrecognised datagram");
            return Ok(());
        };
        let input = Input::Receive(now, recv);
        // Every datagram on our sockets is meant for this Rtc (sockets are
        // not shared), so all of them go in: filtering with `accepts` would
        // drop an early DTLS hello that overtakes ICE nomination. `accepts`
        // only decides whether the packet proves the remote alive.
        let known = self.rtc.accepts(&input);
        if let Err(e) = self.rtc.handle_input(input) {
            debug!(%from, error = %e, "datagram refused");
            if !self.rtc.is_alive() {
                return Err(e);
            }
            return self.drain().await;
        }
        if known {
            self.last_rx = now;
        }
        if self.ever_connected
            && matches!(self.state, ConnState::Disconnected | ConnState::Failed)
            && self.rtc.is_connected()
        {
            self.set_state(ConnState::Connected);
        }
        self.drain().await
    }

    async fn handle_timer(&mut self) -> Result<(), str0m::RtcError> {
        let now = Instant::now();
        for i in 0..self.tracks.len() {
            while let Some(t) = self.tracks.get_mut(i) {
                let Some(due) = t.next_due else { break };
                if due > now {
                    break;
                }
                let due = if now.duration_since(due) > Duration::from_secs(1) {
                    debug!(track = %t.track_id, "source fell behind, skipping ahead");
                    now
                } else {
                    due
                };
                let Some(frame) = t.source.as_mut().and_then(|s| s.next_frame()) else {
                    debug!(track = %t.track_id, "source ended");
                    t.source = None;
                    t.next_due = None;
                    break;
                };
                t.next_due =
                    Some(due + ticks_to_duration(frame.duration as u64, t.kind.clock_rate()));
                self.write_frame(i, frame.data, frame.duration as u64, frame.keyframe, due)
                    .await?;
            }
        }
        self.rtc.handle_input(Input::Timeout(now))?;
        self.drain().await?;
        self.check_liveness(now);
        Ok(())
    }

    fn check_liveness(&mut self, now: Instant) {
        let silent = now.saturating_duration_since(self.last_rx);
        match self.state {
            ConnState::Connected if silent >= self.config.disconnect_timeout => {
                self.set_state(ConnState::Disconnected)
            }
            ConnState::Disconnected if silent >= self.config.failed_timeout => {
                self.set_state(ConnState::Failed)
            }
            ConnState::New => {
                if let Some(t) = self.negotiated_at
                    && now.saturating_duration_since(t) >= self.config.failed_timeout
                {
                    self.set_state(ConnState::Failed)
                }
            }
            _ => {}
        }
    }

    /// Writes one frame of local track `idx` (a mutation) and drains.
    async fn write_frame(
        &mut self,
        idx: usize,
        data: Arc<[u8]>,
        ticks: u64,
        keyframe_hint: bool,
        wallclock: Instant,
    ) -> Result<(), str0m::RtcError> {
        let connected = matches!(self.state, ConnState::Connected | ConnState::Disconnected);
        let Some(t) = self.tracks.get_mut(idx) else {
            return Ok(());
        };
        let rtp = t.rtp;
        t.rtp = t.rtp.wrapping_add(ticks);
        if t.muted || !connected || data.is_empty() {
            return Ok(());
        }
        let Some(mid) = t.mid.filter(|_| !t.awaiting) else {
            return Ok(());
        };
        let keyframe = t.kind == TrackKind::Video
            && (keyframe_hint || crate::ivf::vp8_frame_info(&data).is_some_and(|i| i.keyframe));
        if t.kind == TrackKind::Video && t.want_keyframe {
            if !keyframe {
                return Ok(());
            }
            t.want_keyframe = false;
        }
        let kind = t.kind;
        let Some(writer) = self.rtc.writer(mid) else {
            return Ok(());
        };
        let codec = match kind {
            TrackKind::Audio => Codec::Opus,
            TrackKind::Video => Codec::Vp8,
        };
        let Some(pt) = writer
            .payload_params()
            .find(|p| p.spec().codec == codec)
            .map(|p| p.pt())
        else {
            trace!(%mid, "codec not negotiated on this m-line");
            return Ok(());
        };
        let freq = match kind {
            TrackKind::Audio => Frequency::FORTY_EIGHT_KHZ,
            TrackKind::Video => Frequency::NINETY_KHZ,
        };
        let len = data.len();
        match writer.write(pt, wallclock, MediaTime::new(rtp, freq), data) {
            Ok(()) => {
                if let Some(t) = self.tracks.get_mut(idx) {
                    t.sent.add(len, keyframe);
                }
            }
            Err(e) => trace!(%mid, error = %e, "write refused"),
        }
        self.drain().await
    }

    async fn handle_command(&mut self, c: Command) -> Result<(), str0m::RtcError> {
        match c {
            Command::CreateOffer {
                feeds,
                ice_restart,
                reply,
            } => {
                let r = self.create_offer(&feeds, ice_restart).await;
                let _ = reply.send(r);
            }
            Command::AcceptOffer { sdp, feeds, reply } => {
                let r = self.accept_offer(&sdp, &feeds).await;
                let _ = reply.send(r);
            }
            Command::ApplyAnswer { sdp, reply } => {
                let r = self.apply_answer(&sdp).await;
                let _ = reply.send(r);
            }
            Command::AddRemoteCandidate { candidate, reply } => {
                let r = self.add_remote_candidate(&candidate).await;
                let _ = reply.send(r);
            }
            Command::LocalCandidates { reply } => {
                let mid = self.local_sections.first().and_then(|s| s.mid.clone());
                let list = self
                    .candidates
                    .iter()
                    .map(|c| IceCandidate {
                        candidate: c.to_sdp_string(),
                        sdp_mid: mid.clone(),
                        sdp_m_line_index: Some(0),
                    })
                    .collect();
                let _ = reply.send(Ok(list));
            }
            Command::SendFrame {
                track_id,
                data,
                duration,
            } => {
                let Some(i) = self.tracks.iter().position(|t| t.track_id == track_id) else {
                    debug!(track = %track_id, "send_frame on unknown track");
                    return Ok(());
                };
                let ticks = self
                    .tracks
                    .get(i)
                    .map(|t| duration_to_ticks(duration, t.kind.clock_rate()))
                    .unwrap_or(0);
                self.write_frame(i, data, ticks, false, Instant::now())
                    .await?;
            }
            Command::SetSource { track_id, source } => {
                match self.tracks.iter_mut().find(|t| t.track_id == track_id) {
                    Some(t) => {
                        if source.kind() != t.kind {
                            warn!(track = %track_id, "source kind does not match the track");
                            return Ok(());
                        }
                        t.source = Some(source);
                        t.next_due = None;
                        self.start_sources();
                    }
                    None => {
                        self.pending_sources.insert(track_id, source);
                    }
                }
            }
            Command::SetMuted { track_id, muted } => {
                let Some(t) = self.tracks.iter_mut().find(|t| t.track_id == track_id) else {
                    self.pending_muted.insert(track_id, muted);
                    return Ok(());
                };
                let unmuting_video = t.muted && !muted && t.kind == TrackKind::Video;
                debug!(track = %track_id, muted, "mute");
                t.muted = muted;
                if unmuting_video {
                    t.want_keyframe = true;
                    if !t.source.as_mut().is_some_and(|s| s.request_keyframe()) {
                        self.emit(PeerEvent::KeyframeRequested { track_id });
                    }
                }
            }
            Command::RequestKeyframe { track_id } => {
                let mid = self
                    .remote
                    .values()
                    .find(|r| &*r.track_id == track_id.as_str())
                    .map(|r| r.mid);
                if let Some(mid) = mid {
                    self.send_pli(mid);
                    self.drain().await?;
                }
            }
            Command::AddSink { filter, sink } => self.sinks.push((filter, sink)),
            Command::FinishSinks { reply } => {
                let errors = self.finish_all_sinks();
                let _ = reply.send(Ok(errors));
            }
            Command::Stats { reply } => {
                let _ = reply.send(Ok(self.stats()));
            }
            Command::Close { reply } => {
                self.do_close().await;
                let _ = reply.send(Ok(()));
            }
        }
        Ok(())
    }
}

fn rtc_err(e: str0m::RtcError) -> MediaError {
    MediaError::Rtc(e.to_string())
}

/// Our direction for an m-line, given the remote's and whether we send on it.
fn local_direction(remote: Direction, bound: bool) -> Direction {
    match (remote, bound) {
        (Direction::SendRecv, true) => Direction::SendRecv,
        (Direction::RecvOnly, true) => Direction::SendOnly,
        (Direction::SendRecv | Direction::SendOnly, _) => Direction::RecvOnly,
        (Direction::RecvOnly | Direction::Inactive, _) => Direction::Inactive,
    }
}

impl Driver {
    /// Makes the local tracks match `wanted`. New tracks start unbound; the
    /// sources of removed tracks are kept in case the track comes back.
    fn sync_tracks(&mut self, wanted: &[Wanted]) {
        let mut kept = Vec::with_capacity(wanted.len());
        for mut t in std::mem::take(&mut self.tracks) {
            let keep = wanted.iter().any(|w| {
                w.track_id == t.track_id && w.stream_id == t.stream_id && w.kind == t.kind
            });
            if keep {
                kept.push(t);
            } else {
                debug!(track = %t.track_id, mid = ?t.mid, "local track removed");
                if let Some(src) = t.source.take() {
                    self.pending_sources.insert(t.track_id.clone(), src);
                }
            }
        }
        self.tracks = kept;
        for w in wanted {
            if let Some(t) = self.tracks.iter_mut().find(|t| t.track_id == w.track_id) {
                t.purpose = w.purpose;
                continue;
            }
            debug!(stream = %w.stream_id, track = %w.track_id, kind = %w.kind, purpose = w.purpose.as_str(), "local track added");
            let mut t = LocalTrack::new(&w.stream_id, &w.track_id, w.kind, w.purpose);
            if let Some(src) = self.pending_sources.remove(&w.track_id)
                && src.kind() == w.kind
            {
                t.source = Some(src);
            }
            if let Some(m) = self.pending_muted.remove(&w.track_id) {
                t.muted = m;
            }
            self.tracks.push(t);
        }
        self.tracks.sort_by_key(|t| {
            wanted
                .iter()
                .position(|w| w.track_id == t.track_id)
                .unwrap_or(usize::MAX)
        });
        self.start_sources();
    }

    /// Forgets the pending local offer (replaced or rolled back).
    fn rollback_pending(&mut self) {
        if self.pending_offer.take().is_some() {
            debug!("pending local offer dropped");
            for t in &mut self.tracks {
                if t.mid_pending {
                    t.mid = None;
                    t.mid_pending = false;
                    t.awaiting = false;
                }
            }
        }
    }

    /// A binding became effective: start video with a key frame.
    fn confirm_bindings(&mut self) {
        for t in &mut self.tracks {
            if t.mid.is_some() && t.awaiting {
                t.awaiting = false;
                t.mid_pending = false;
                if t.kind == TrackKind::Video {
                    t.want_keyframe = true;
                    if let Some(s) = t.source.as_mut() {
                        s.request_keyframe();
                    }
                }
            }
        }
    }

    fn note_negotiated(&mut self) {
        if self.state == ConnState::New && self.negotiated_at.is_none() {
            self.negotiated_at = Some(Instant::now());
        }
    }

    /// Rewrites our SDP's msid lines (and directions, for answers) and
    /// remembers its m-sections.
    fn finalize_local_sdp(
        &mut self,
        text: &str,
        directions: Option<&HashMap<Mid, Direction>>,
    ) -> String {
        let sections = sdp::parse_sections(text);
        let mut plan = HashMap::new();
        for s in &sections {
            let Some(mid_s) = &s.mid else { continue };
            if section_kind(s).is_none() {
                continue;
            }
            let mid = Mid::from(mid_s.as_str());
            let msid = self
                .tracks
                .iter()
                .find(|t| t.mid == Some(mid))
                .map(|t| (t.stream_id.clone(), t.track_id.clone()));
            let direction = directions.and_then(|d| d.get(&mid).copied());
            plan.insert(mid_s.clone(), LinePlan { msid, direction });
        }
        let out = sdp::rewrite_local(text, &plan);
        self.local_sections = sdp::parse_sections(&out);
        out
    }

    async fn create_offer(
        &mut self,
        feeds: &[LocalFeed],
        ice_restart: bool,
    ) -> Result<String, MediaError> {
        let wanted = wanted_tracks(feeds)?;
        self.rollback_pending();
        let before: HashSet<Mid> = self.tracks.iter().filter_map(|t| t.mid).collect();
        self.sync_tracks(&wanted);
        let still: HashSet<Mid> = self.tracks.iter().filter_map(|t| t.mid).collect();

        // Lines we stop sending on.
        let mut dir_changes: Vec<(Mid, Direction)> = Vec::new();
        for mid in before.difference(&still) {
            if let Some(m) = self.rtc.media(*mid) {
                if m.disabled() {
                    continue;
                }
                let nd = match m.direction() {
                    Direction::SendRecv => Direction::RecvOnly,
                    Direction::SendOnly => Direction::Inactive,
                    d => d,
                };
                if nd != m.direction() {
                    dir_changes.push((*mid, nd));
                }
            }
        }

        // Bind new tracks to unused receive-only lines, or add lines.
        let lines: Vec<(Mid, TrackKind)> = self
            .local_sections
            .iter()
            .filter(|s| !s.disabled)
            .filter_map(|s| Some((Mid::from(s.mid.as_deref()?), section_kind(s)?)))
            .collect();
        let mut taken = still.clone();
        let mut adds: Vec<usize> = Vec::new();
        for (i, t) in self.tracks.iter_mut().enumerate() {
            if t.mid.is_some() {
                continue;
            }
            let reuse = lines.iter().find(|(mid, kind)| {
                *kind == t.kind
                    && !taken.contains(mid)
                    && !self.ever_bound.contains(mid)
                    && self.rtc.media(*mid).is_some_and(|m| {
                        !m.disabled()
                            && matches!(m.direction(), Direction::RecvOnly | Direction::Inactive)
                    })
            });
            match reuse {
                Some((mid, _)) => {
                    let cur = self.rtc.media(*mid).map(|m| m.direction());
                    let nd = if cur == Some(Direction::RecvOnly) {
                        Direction::SendRecv
                    } else {
                        Direction::SendOnly
                    };
                    dir_changes.push((*mid, nd));
                    taken.insert(*mid);
                    self.ever_bound.insert(*mid);
                    t.mid = Some(*mid);
                    t.mid_pending = false;
                    t.awaiting = true;
                    debug!(track = %t.track_id, %mid, "reusing m-line");
                }
                None => adds.push(i),
            }
        }

        let mut recv_only = Vec::new();
        for (kind, want) in [
            (TrackKind::Audio, self.config.receive_audio),
            (TrackKind::Video, self.config.receive_video),
        ] {
            let has =
                lines.iter().any(|(_, k)| *k == kind) || self.tracks.iter().any(|t| t.kind == kind);
            if want && !has {
                recv_only.push(kind);
            }
        }

        let mut api = self.rtc.sdp_api();
        for (mid, d) in &dir_changes {
            api.set_direction(*mid, *d);
        }
        let mut new_mids = Vec::new();
        for &i in &adds {
            if let Some(t) = self.tracks.get(i) {
                let mid = api.add_media(
                    to_media_kind(t.kind),
                    Direction::SendRecv,
                    Some(t.stream_id.clone()),
                    Some(t.track_id.clone()),
                    None,
                );
                new_mids.push((i, mid));
            }
        }
        for kind in recv_only {
            api.add_media(to_media_kind(kind), Direction::RecvOnly, None, None, None);
        }
        if ice_restart {
            api.ice_restart(true);
        }
        let applied = api.apply();
        for (i, mid) in new_mids {
            if let Some(t) = self.tracks.get_mut(i) {
                t.mid = Some(mid);
                t.mid_pending = true;
                t.awaiting = true;
                self.ever_bound.insert(mid);
            }
        }
        self.drain().await.map_err(rtc_err)?;
        let Some((offer, pending)) = applied else {
            return Err(MediaError::NothingToNegotiate);
        };
        self.pending_offer = Some(pending);
        if ice_restart && self.state == ConnState::Failed {
            self.negotiated_at = Some(Instant::now());
        }
        let text = self.finalize_local_sdp(&offer.to_sdp_string(), None);
        debug!(restart = ice_restart, "created offer");
        trace!(sdp = %text, "local offer");
        Ok(text)
    }

    async fn accept_offer(
        &mut self,
        text: &str,
        feeds: &[LocalFeed],
    ) -> Result<String, MediaError> {
        let wanted = wanted_tracks(feeds)?;
        let offer =
            SdpOffer::from_sdp_string(text).map_err(|e| MediaError::RemoteSdp(e.to_string()))?;
        let remote_sections = sdp::parse_sections(text);
        trace!(sdp = %text, "remote offer");
        self.rollback_pending();
        let answer = self.rtc.sdp_api().accept_offer(offer);
        self.drain().await.map_err(rtc_err)?;
        let answer = answer.map_err(|e| MediaError::RemoteSdp(e.to_string()))?;
        self.sync_tracks(&wanted);

        // The remote's m-lines: kind, its direction, rejected.
        let remote_lines: Vec<(Mid, TrackKind, Direction)> = remote_sections
            .iter()
            .filter(|s| !s.disabled)
            .filter_map(|s| Some((Mid::from(s.mid.as_deref()?), section_kind(s)?, s.direction)))
            .collect();
        let can_send = |mid: Mid, kind: TrackKind| {
            remote_lines.iter().any(|(m, k, d)| {
                *m == mid && *k == kind && matches!(d, Direction::SendRecv | Direction::RecvOnly)
            })
        };
        for t in &mut self.tracks {
            if let Some(mid) = t.mid
                && (!can_send(mid, t.kind) || self.rtc.media(mid).is_none())
            {
                debug!(track = %t.track_id, %mid, "m-line no longer usable for sending");
                t.mid = None;
                t.mid_pending = false;
                t.awaiting = false;
            }
        }
        let mut taken: HashSet<Mid> = self.tracks.iter().filter_map(|t| t.mid).collect();
        for t in &mut self.tracks {
            if t.mid.is_some() {
                continue;
            }
            let free = remote_lines.iter().find(|(mid, kind, _)| {
                *kind == t.kind
                    && can_send(*mid, *kind)
                    && !taken.contains(mid)
                    && !self.ever_bound.contains(mid)
                    && self.rtc.media(*mid).is_some()
            });
            if let Some((mid, _, _)) = free {
                debug!(track = %t.track_id, %mid, "sending on offered m-line");
                taken.insert(*mid);
                self.ever_bound.insert(*mid);
                t.mid = Some(*mid);
                t.awaiting = true;
            }
        }
        let desired: HashMap<Mid, Direction> = remote_lines
            .iter()
            .map(|(mid, _, d)| (*mid, local_direction(*d, taken.contains(mid))))
            .collect();
        {
            let mut api = self.rtc.sdp_api();
            for (mid, d) in &desired {
                api.set_direction(*mid, *d);
            }
            // Dropped without apply(): the directions above are already in
            // the session and match the answer we send.
        }
        self.drain().await.map_err(rtc_err)?;
        self.confirm_bindings();
        let out = self.finalize_local_sdp(&answer.to_sdp_string(), Some(&desired));
        self.update_remote_tracks(&remote_sections);
        self.drain().await.map_err(rtc_err)?;
        self.note_negotiated();
        if self.tracks.iter().any(|t| t.mid.is_none()) {
            debug!("some local tracks need a new offer");
            self.emit(PeerEvent::NegotiationNeeded);
        }
        self.start_sources();
        debug!("accepted offer");
        trace!(sdp = %out, "local answer");
        Ok(out)
    }

    async fn apply_answer(&mut self, text: &str) -> Result<(), MediaError> {
        let Some(pending) = self.pending_offer.take() else {
            return Err(MediaError::NoPendingOffer);
        };
        let answer = match SdpAnswer::from_sdp_string(text) {
            Ok(a) => a,
            Err(e) => {
                self.pending_offer = Some(pending);
                return Err(MediaError::RemoteSdp(e.to_string()));
            }
        };
        trace!(sdp = %text, "remote answer");
        let remote_sections = sdp::parse_sections(text);
        let r = self.rtc.sdp_api().accept_answer(pending, answer);
        self.drain().await.map_err(rtc_err)?;
        if let Err(e) = r {
            for t in &mut self.tracks {
                if t.mid_pending {
                    t.mid = None;
                    t.mid_pending = false;
                    t.awaiting = false;
                }
            }
            return Err(MediaError::RemoteSdp(e.to_string()));
        }
        let mut renegotiate = false;
        for t in &mut self.tracks {
            if let Some(mid) = t.mid
                && self.rtc.media(mid).is_none_or(|m| m.disabled())
            {
                debug!(track = %t.track_id, %mid, "remote rejected the m-line");
                t.mid = None;
                t.awaiting = false;
                t.mid_pending = false;
                renegotiate = true;
            }
        }
        self.confirm_bindings();
        self.update_remote_tracks(&remote_sections);
        self.drain().await.map_err(rtc_err)?;
        self.note_negotiated();
        if renegotiate {
            self.emit(PeerEvent::NegotiationNeeded);
        }
        self.start_sources();
        debug!("applied answer");
        Ok(())
    }

    /// Diffs the remote tracks against a remote SDP.
    fn update_remote_tracks(&mut self, sections: &[Section]) {
        let mut active: Vec<(Mid, String, String, TrackKind)> = Vec::new();
        for s in sections {
            let (Some(kind), Some(mid_s)) = (section_kind(s), &s.mid) else {
                continue;
            };
            if s.disabled || !matches!(s.direction, Direction::SendRecv | Direction::SendOnly) {
                continue;
            }
            let mid = Mid::from(mid_s.as_str());
            let (stream, track) = match &s.msid {
                Some((st, tr)) => (
                    st.clone(),
                    if tr.is_empty() {
                        format!("mid-{mid}")
                    } else {
                        tr.clone()
                    },
                ),
                None => ("-".to_string(), format!("mid-{mid}")),
            };
            active.push((mid, stream, track, kind));
        }
        let gone: Vec<Mid> = self
            .remote
            .iter()
            .filter(|(mid, r)| {
                !active.iter().any(|(m, s, t, k)| {
                    m == *mid
                        && s.as_str() == &*r.stream_id
                        && t.as_str() == &*r.track_id
                        && *k == r.kind
                })
            })
            .map(|(m, _)| *m)
            .collect();
        for mid in gone {
            if let Some(r) = self.remote.remove(&mid) {
                info!(stream = %r.stream_id, track = %r.track_id, %mid, "remote track removed");
                self.ended_remote.push(r.stats(false));
                self.emit(PeerEvent::RemoteTrackRemoved {
                    stream_id: r.stream_id.to_string(),
                    track_id: r.track_id.to_string(),
                    kind: r.kind,
                    mid: mid.to_string(),
                });
            }
        }
        let connected = matches!(self.state, ConnState::Connected | ConnState::Disconnected);
        for (mid, stream, track, kind) in active {
            if self.remote.contains_key(&mid) {
                continue;
            }
            info!(%stream, %track, %kind, %mid, "remote track");
            self.remote.insert(
                mid,
                RemoteTrack {
                    stream_id: Arc::from(stream.as_str()),
                    track_id: Arc::from(track.as_str()),
                    kind,
                    mid,
                    received: Counters::default(),
                    need_keyframe: kind == TrackKind::Video,
                    last_pli: None,
                },
            );
            self.emit(PeerEvent::RemoteTrack {
                stream_id: stream,
                track_id: track,
                kind,
                mid: mid.to_string(),
            });
            if kind == TrackKind::Video && connected {
                self.send_pli(mid);
            }
        }
    }

    async fn add_remote_candidate(&mut self, cand: &str) -> Result<(), MediaError> {
        let s = cand.trim();
        let s = s.strip_prefix("a=").unwrap_or(s);
        if s.is_empty() || s == "end-of-candidates" {
            debug!("remote end of candidates");
            return Ok(());
        }
        let owned;
        let s = if s.starts_with("candidate:") {
            s
        } else {
            owned = format!("candidate:{s}");
            owned.as_str()
        };
        let c = match Candidate::from_sdp_string(s) {
            Ok(c) => c,
            // mDNS host names (browsers hide local IPs this way) cannot be
            // resolved here; the remote's checks to our candidates still
            // reveal its address as a peer-reflexive candidate.
            Err(_)
                if s.split_whitespace()
                    .nth(4)
                    .is_some_and(|a| a.ends_with(".local")) =>
            {
                debug!(candidate = s, "ignoring mDNS candidate");
                return Ok(());
            }
            Err(e) => {
                return Err(MediaError::BadCandidate {
                    candidate: cand.to_string(),
                    reason: e.to_string(),
                });
            }
        };
        debug!(candidate = %c, "adding remote candidate");
        self.rtc.add_remote_candidate(c);
        self.drain().await.map_err(rtc_err)
    }

    fn stats(&self) -> PeerStats {
        let mut remote: Vec<RemoteTrackStats> = self.ended_remote.clone();
        let mut current: Vec<&RemoteTrack> = self.remote.values().collect();
        current.sort_by_key(|a| a.mid);
        remote.extend(current.into_iter().map(|r| r.stats(true)));
        PeerStats {
            connected: self.rtc.is_connected(),
            local: self
                .tracks
                .iter()
                .map(|t| LocalTrackStats {
                    stream_id: t.stream_id.clone(),
                    track_id: t.track_id.clone(),
                    kind: t.kind,
                    mid: t.mid.map(|m| m.to_string()),
                    muted: t.muted,
                    has_source: t.source.is_some(),
                    sent: t.sent,
                })
                .collect(),
            remote,
            frames_dropped: self.frames_dropped,
            frames_unmatched: self.frames_unmatched,
        }
    }

    fn finish_all_sinks(&mut self) -> Vec<SinkError> {
        let mut errors = Vec::new();
        for (_, mut sink) in self.sinks.drain(..) {
            if let Err(e) = sink.finish() {
                warn!(error = %e, "finishing sink failed");
                errors.push(e);
            }
        }
        errors
    }

    async fn do_close(&mut self) {
        if self.finished {
            return;
        }
        info!("closing media peer");
        if let Err(e) = self.rtc.close() {
            debug!(error = %e, "close");
        }
        if let Err(e) = self.drain().await {
            debug!(error = %e, "drain on close");
        }
        self.finish_all_sinks();
        self.set_state(ConnState::Closed);
        self.finished = true;
    }
}
