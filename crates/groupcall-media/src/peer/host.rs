//! The thin tokio driver of a [`PeerSet`]: one task and one UDP socket per
//! bound local address for a participant ([`MediaHost`]), and the per-peer
//! handles onto it ([`MediaPeer`]).
//!
//! The task only moves things: datagrams from the sockets, timeouts, host
//! name lookups and handle requests into the set; the set's transmits to
//! the sockets, its events to each peer's [`PeerEvents`] and its answers to
//! the waiting handle calls. Nothing in it waits for gathering: an offer
//! that waits for candidates waits inside the set, and every other peer and
//! request goes on.

use std::sync::atomic::{AtomicBool, AtomicU64};

use super::set::{PeerId, PeerSet, RequestId, SetInput, SetOutput};
use super::*;

/// UDP sockets held by the media hosts of this process.
static LIVE_SOCKETS: AtomicUsize = AtomicUsize::new(0);

/// The number of UDP sockets all [`MediaHost`]s of this process hold right
/// now (one per bound address per host, whatever their numbers of peers).
pub fn live_socket_count() -> usize {
    LIVE_SOCKETS.load(Ordering::Relaxed)
}

/// Counts a host's sockets in [`LIVE_SOCKETS`] while its task exists.
struct SocketCount(usize);

impl SocketCount {
    fn new(n: usize) -> Self {
        LIVE_SOCKETS.fetch_add(n, Ordering::Relaxed);
        SocketCount(n)
    }
}

impl Drop for SocketCount {
    fn drop(&mut self) {
        LIVE_SOCKETS.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// After a datagram, at most this many more already waiting on the same
/// socket are fed in before the outputs are sent.
const RECV_BATCH: usize = 32;

/// Lookups of STUN/TURN host names give up after this long.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

enum HostCommand {
    AddPeer {
        id: PeerId,
        config: Box<PeerConfig>,
        events: mpsc::UnboundedSender<PeerEvent>,
        queued: Arc<AtomicUsize>,
        gathered: Arc<AtomicBool>,
    },
    Request {
        peer: PeerId,
        req: Request,
        reply: Option<oneshot::Sender<Answer>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

/// Figures the task publishes for the handles.
struct Shared {
    local_addrs: Vec<SocketAddr>,
    next_peer: AtomicU64,
    peers: AtomicUsize,
    allocations: AtomicUsize,
    gathered: AtomicBool,
}

/// A participant's media: one [`PeerSet`] and its sockets (one per bound
/// local address), run by one tokio task. Peers made with
/// [`MediaHost::new_peer`] share the sockets and the TURN allocations.
///
/// Cheap to clone. The task ends (closing every peer and releasing the TURN
/// allocations) on [`MediaHost::close`] or when every handle (hosts and
/// peers) is dropped.
#[derive(Clone)]
pub struct MediaHost {
    cmd: mpsc::UnboundedSender<HostCommand>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MediaHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaHost")
            .field("local_addrs", &self.shared.local_addrs)
            .finish()
    }
}

impl MediaHost {
    /// Binds one UDP socket per address (ephemeral ports; `0.0.0.0` / `::`
    /// expand to the usable interface addresses of that family, see
    /// [`crate::bind`]) and starts the task. Must be called within a tokio
    /// runtime.
    pub fn spawn(bind_addrs: &[IpAddr]) -> Result<MediaHost, MediaError> {
        Self::spawn_inner(bind_addrs, false, None)
    }

    /// Test only (cargo feature `faults`): [`MediaHost::spawn`] with a fault
    /// layer between its sockets and its peers (loss, an incoming rate cap,
    /// a black hole), changed at run time through `faults` (keep a clone).
    #[cfg(feature = "faults")]
    pub fn spawn_with_faults(
        bind_addrs: &[IpAddr],
        faults: super::faults::MediaFaults,
    ) -> Result<MediaHost, MediaError> {
        Self::spawn_inner(bind_addrs, false, Some(faults))
    }

    fn spawn_inner(
        bind_addrs: &[IpAddr],
        close_when_empty: bool,
        faults: Option<Faults>,
    ) -> Result<MediaHost, MediaError> {
        let addrs = expand_bind_addrs(bind_addrs);
        if addrs.is_empty() {
            return Err(MediaError::NoLocalAddress);
        }
        let mut sockets = Vec::new();
        for ip in addrs {
            match crate::udp::bind(SocketAddr::new(ip, 0)) {
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
        info!(addrs = ?local_addrs, "media host bound");
        let mut set = PeerSet::new(Instant::now(), local_addrs.clone());
        if close_when_empty {
            set.close_when_empty();
        }
        let shared = Arc::new(Shared {
            local_addrs,
            next_peer: AtomicU64::new(1),
            peers: AtomicUsize::new(0),
            allocations: AtomicUsize::new(0),
            gathered: AtomicBool::new(true),
        });
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (lookup_tx, lookup_rx) = mpsc::unbounded_channel();
        let task = HostTask {
            addrs: shared.local_addrs.clone(),
            count: Some(SocketCount::new(sockets.len())),
            set,
            sockets,
            cmd_rx,
            lookup_tx,
            lookup_rx,
            peers: HashMap::new(),
            pending: HashMap::new(),
            next_request: 1,
            ungathered: Vec::new(),
            shared: shared.clone(),
            faults,
        };
        tokio::spawn(task.run());
        Ok(MediaHost {
            cmd: cmd_tx,
            shared,
        })
    }

    /// A new peer on this host's sockets. Its `bind_addrs` are not used; its
    /// STUN and TURN servers join the host's (one allocation per TURN
    /// server for all peers).
    pub fn new_peer(&self, config: PeerConfig) -> Result<(MediaPeer, PeerEvents), MediaError> {
        let id = PeerId(self.shared.next_peer.fetch_add(1, Ordering::Relaxed));
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let has_servers = config.stun_server.is_some() || !config.ice_servers.is_empty();
        let gathered = Arc::new(AtomicBool::new(
            !has_servers && self.shared.gathered.load(Ordering::Relaxed),
        ));
        self.cmd
            .send(HostCommand::AddPeer {
                id,
                config: Box::new(config),
                events: ev_tx,
                queued: queued.clone(),
                gathered: gathered.clone(),
            })
            .map_err(|_| MediaError::Closed)?;
        Ok((
            MediaPeer {
                id,
                cmd: self.cmd.clone(),
                shared: self.shared.clone(),
                gathered,
            },
            PeerEvents { rx: ev_rx, queued },
        ))
    }

    /// The bound socket addresses.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.shared.local_addrs
    }

    /// The number of UDP sockets this host holds (one per bound address,
    /// whatever the number of peers).
    pub fn socket_count(&self) -> usize {
        self.shared.local_addrs.len()
    }

    /// The number of TURN allocations in place (at most one per TURN
    /// server, shared by all peers).
    pub fn turn_allocations(&self) -> usize {
        self.shared.allocations.load(Ordering::Relaxed)
    }

    /// The number of live peers.
    pub fn peer_count(&self) -> usize {
        self.shared.peers.load(Ordering::Relaxed)
    }

    /// Closes every peer, releases the TURN allocations and ends the task.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(HostCommand::Close { reply: tx }).is_ok() {
            let _ = rx.await;
        }
    }
}

struct PeerChannel {
    events: mpsc::UnboundedSender<PeerEvent>,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    dropped: u64,
}

struct HostTask {
    /// Dropped when the task ends (before a `close` caller is answered).
    count: Option<SocketCount>,
    set: PeerSet,
    sockets: Vec<UdpSocket>,
    /// The sockets' local addresses, in the same order.
    addrs: Vec<SocketAddr>,
    cmd_rx: mpsc::UnboundedReceiver<HostCommand>,
    lookup_tx: mpsc::UnboundedSender<(u64, Vec<SocketAddr>)>,
    lookup_rx: mpsc::UnboundedReceiver<(u64, Vec<SocketAddr>)>,
    peers: HashMap<PeerId, PeerChannel>,
    pending: HashMap<RequestId, oneshot::Sender<Answer>>,
    next_request: u64,
    /// Peers whose handles wait for `gathering_complete`.
    ungathered: Vec<Arc<AtomicBool>>,
    shared: Arc<Shared>,
    /// Test only: the fault layer (always `None` without the feature).
    #[cfg_attr(not(feature = "faults"), allow(dead_code))]
    faults: Option<Faults>,
}

/// The fault layer's handle, or nothing without the `faults` feature.
#[cfg(feature = "faults")]
type Faults = super::faults::MediaFaults;
#[cfg(not(feature = "faults"))]
type Faults = std::convert::Infallible;

impl HostTask {
    /// Whether the fault layer lets an incoming datagram through (always,
    /// without the `faults` feature).
    fn pass_in(&self, _now: Instant, _len: usize) -> bool {
        #[cfg(feature = "faults")]
        if let Some(f) = &self.faults {
            return f.pass_in(_now, _len);
        }
        true
    }

    /// Feeds the datagram `d` read from socket `i` (its bytes at the
    /// front of `buf`) to the peer set, if the fault layer lets it in.
    fn datagram_in(&mut self, now: Instant, i: usize, d: crate::udp::Received, buf: &[u8]) {
        if !self.pass_in(now, d.len) {
            return;
        }
        if let (Some(&local), Some(data)) = (self.addrs.get(i), buf.get(..d.len)) {
            let input = SetInput::Datagram {
                local,
                from: d.from,
                data,
                received: d.at,
            };
            self.set.handle_input(now, input);
        }
    }

    /// Whether the fault layer lets an outgoing datagram go.
    fn pass_out(&self) -> bool {
        #[cfg(feature = "faults")]
        if let Some(f) = &self.faults {
            return f.pass_out();
        }
        true
    }
}

enum Wake {
    Command(Option<HostCommand>),
    Packet(usize, std::io::Result<crate::udp::Received>),
    Lookup(Option<(u64, Vec<SocketAddr>)>),
    Timer,
}

impl HostTask {
    async fn run(mut self) {
        let mut buf = vec![0u8; 2048];
        let mut next_socket = 0;
        let mut closing: Option<oneshot::Sender<()>> = None;
        loop {
            self.flush().await;
            if self.set.is_closed() {
                break;
            }
            let deadline = self
                .set
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let wake = {
                let recv = crate::udp::recv_any(&self.sockets, &mut buf, &mut next_socket);
                // Unbiased: neither a flood of commands nor of datagrams can
                // starve the other branches.
                tokio::select! {
                    c = self.cmd_rx.recv() => Wake::Command(c),
                    (i, r) = recv => Wake::Packet(i, r),
                    l = self.lookup_rx.recv() => Wake::Lookup(l),
                    _ = tokio::time::sleep_until(deadline.into()) => Wake::Timer,
                }
            };
            let now = Instant::now();
            match wake {
                Wake::Command(Some(c)) => {
                    if let Some(reply) = self.command(now, c) {
                        self.set.close(now);
                        closing = Some(reply);
                    }
                }
                Wake::Command(None) => {
                    debug!("every handle dropped, closing the media host");
                    self.set.close(now);
                }
                Wake::Packet(i, Ok(d)) => {
                    self.datagram_in(now, i, d, &buf);
                    // Take what else is waiting on that socket before
                    // sending and sleeping again (bounded, so that timers
                    // and commands still come in between).
                    for _ in 0..RECV_BATCH {
                        let Some(s) = self.sockets.get(i) else { break };
                        let Ok(d) = crate::udp::try_recv(s, &mut buf) else {
                            break;
                        };
                        self.datagram_in(Instant::now(), i, d, &buf);
                    }
                }
                Wake::Packet(i, Err(e)) => {
                    // E.g. ICMP port unreachable surfacing on Linux: ignore.
                    trace!(socket = i, error = %e, "UDP receive error");
                }
                Wake::Lookup(Some((token, addrs))) => {
                    self.set
                        .handle_input(now, SetInput::Resolved { token, addrs });
                }
                Wake::Lookup(None) => {}
                Wake::Timer => self.set.handle_input(now, SetInput::Timeout),
            }
        }
        self.flush().await;
        for (_, tx) in self.pending.drain() {
            let _ = tx.send(Err(MediaError::Closed));
        }
        self.shared.peers.store(0, Ordering::Relaxed);
        self.shared.allocations.store(0, Ordering::Relaxed);
        self.sockets.clear();
        self.count = None;
        if let Some(reply) = closing {
            let _ = reply.send(());
        }
        debug!("media host task ended");
    }

    /// Handles a command; `Some` for a close request.
    fn command(&mut self, now: Instant, c: HostCommand) -> Option<oneshot::Sender<()>> {
        match c {
            HostCommand::AddPeer {
                id,
                config,
                events,
                queued,
                gathered,
            } => {
                self.peers.insert(
                    id,
                    PeerChannel {
                        events,
                        queued,
                        max_queued: config.max_queued_frames,
                        dropped: 0,
                    },
                );
                self.set.add_peer(now, id, *config);
                if self.set.gathering_complete() {
                    gathered.store(true, Ordering::Relaxed);
                } else {
                    self.ungathered.push(gathered);
                }
            }
            HostCommand::Request { peer, req, reply } => {
                let id = reply.map(|tx| {
                    let id = RequestId(self.next_request);
                    self.next_request += 1;
                    self.pending.insert(id, tx);
                    id
                });
                self.set.request(now, peer, id, req);
            }
            HostCommand::Close { reply } => return Some(reply),
        }
        None
    }

    /// Carries out everything the set wants done.
    async fn flush(&mut self) {
        // The set's figures do not change while its outputs are taken:
        // publish them first, so that a handle sees them by the time it sees
        // the events.
        let done = self.set.gathering_complete();
        self.shared.gathered.store(done, Ordering::Relaxed);
        if done {
            for g in self.ungathered.drain(..) {
                g.store(true, Ordering::Relaxed);
            }
        }
        self.shared
            .peers
            .store(self.set.peer_count(), Ordering::Relaxed);
        self.shared
            .allocations
            .store(self.set.turn_allocations(), Ordering::Relaxed);
        while let Some(o) = self.set.poll_output() {
            match o {
                SetOutput::Transmit(t) => {
                    let Some(s) = self
                        .addrs
                        .iter()
                        .position(|a| *a == t.source)
                        .and_then(|i| self.sockets.get(i))
                    else {
                        trace!(source = %t.source, "transmit from an unknown address");
                        continue;
                    };
                    if !self.pass_out() {
                        continue;
                    }
                    if let Err(e) = s.send_to(&t.contents, t.destination).await {
                        trace!(dest = %t.destination, error = %e, "UDP send failed");
                    }
                }
                SetOutput::Event { peer, event } => {
                    let Some(ch) = self.peers.get_mut(&peer) else {
                        continue;
                    };
                    if let PeerEvent::Frame(_) | PeerEvent::Rtp(_) = &event {
                        if ch.queued.load(Ordering::Relaxed) >= ch.max_queued {
                            ch.dropped += 1;
                            continue;
                        }
                        ch.queued.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = ch.events.send(event);
                }
                SetOutput::Answer {
                    peer,
                    request,
                    mut answer,
                } => {
                    if let (Ok(Reply::Stats(s)), Some(ch)) = (&mut answer, self.peers.get(&peer)) {
                        s.frames_dropped += ch.dropped;
                    }
                    if let Some(tx) = self.pending.remove(&request) {
                        let _ = tx.send(answer);
                    }
                }
                SetOutput::Resolve { token, host, port } => {
                    let tx = self.lookup_tx.clone();
                    tokio::spawn(async move {
                        let addrs = match tokio::time::timeout(
                            LOOKUP_TIMEOUT,
                            tokio::net::lookup_host((host.as_str(), port)),
                        )
                        .await
                        {
                            Ok(Ok(a)) => a.collect(),
                            Ok(Err(e)) => {
                                warn!(%host, error = %e, "cannot resolve ICE server");
                                Vec::new()
                            }
                            Err(_) => {
                                warn!(%host, "resolving ICE server timed out");
                                Vec::new()
                            }
                        };
                        let _ = tx.send((token, addrs));
                    });
                }
                SetOutput::PeerEnded { peer } => {
                    // Dropping the sender ends the peer's event stream.
                    self.peers.remove(&peer);
                }
            }
        }
    }
}

/// A WebRTC peer connection to one remote device: a handle onto one peer of
/// a [`MediaHost`].
///
/// All methods only enqueue work for the host's task; the `async` ones wait
/// for its answer (offers and answers until gathering is done, at most
/// `gather_wait` after the peer was made; other peers are not held up).
/// Dropping the handle closes the connection.
pub struct MediaPeer {
    id: PeerId,
    cmd: mpsc::UnboundedSender<HostCommand>,
    shared: Arc<Shared>,
    gathered: Arc<AtomicBool>,
}

impl std::fmt::Debug for MediaPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaPeer")
            .field("id", &self.id)
            .field("local_addrs", &self.shared.local_addrs)
            .finish()
    }
}

impl Drop for MediaPeer {
    fn drop(&mut self) {
        let _ = self.cmd.send(HostCommand::Request {
            peer: self.id,
            req: Request::Close,
            reply: None,
        });
    }
}

impl MediaPeer {
    /// A peer with a host of its own: binds its sockets (`bind_addrs`),
    /// gathers candidates (host, and server-reflexive and relayed if
    /// configured) and starts the host's task, which ends with the peer.
    /// Must be called within a tokio runtime. Peers of one participant
    /// should share a host instead ([`MediaHost::new_peer`]).
    pub async fn new(config: PeerConfig) -> Result<(MediaPeer, PeerEvents), MediaError> {
        let host = MediaHost::spawn_inner(&config.bind_addrs, true, None)?;
        host.new_peer(config)
    }

    /// The bound socket addresses (the host's).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.shared.local_addrs
    }

    /// Whether gathering has finished (every STUN server answered or was
    /// given up, every TURN allocation made or failed).
    pub fn gathering_complete(&self) -> bool {
        self.gathered.load(Ordering::Relaxed)
    }

    fn send(&self, req: Request) -> Result<(), MediaError> {
        self.cmd
            .send(HostCommand::Request {
                peer: self.id,
                req,
                reply: None,
            })
            .map_err(|_| MediaError::Closed)
    }

    async fn call(&self, req: Request) -> Result<Reply, MediaError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(HostCommand::Request {
                peer: self.id,
                req,
                reply: Some(tx),
            })
            .map_err(|_| MediaError::Closed)?;
        rx.await.map_err(|_| MediaError::Closed)?
    }

    async fn call_sdp(&self, req: Request) -> Result<String, MediaError> {
        match self.call(req).await? {
            Reply::Sdp(s) => Ok(s),
            other => Err(MediaError::Rtc(format!("unexpected reply {other:?}"))),
        }
    }

    async fn call_done(&self, req: Request) -> Result<(), MediaError> {
        match self.call(req).await? {
            Reply::Done => Ok(()),
            other => Err(MediaError::Rtc(format!("unexpected reply {other:?}"))),
        }
    }

    /// Creates an offer sending `feeds` (the complete set of local feeds:
    /// tracks missing from it stop being sent). The SDP contains all local
    /// candidates. The offer stays pending until [`MediaPeer::apply_answer`]
    /// or until a remote offer is accepted instead.
    pub async fn create_offer(&self, feeds: &[LocalFeed]) -> Result<String, MediaError> {
        self.call_sdp(Request::CreateOffer {
            feeds: feeds.to_vec(),
            ice_restart: false,
        })
        .await
    }

    /// Like [`MediaPeer::create_offer`] with new ICE credentials (ICE restart).
    pub async fn restart_ice(&self, feeds: &[LocalFeed]) -> Result<String, MediaError> {
        self.call_sdp(Request::CreateOffer {
            feeds: feeds.to_vec(),
            ice_restart: true,
        })
        .await
    }

    /// Accepts a remote offer and returns the answer, sending `feeds` on the
    /// offered m-lines where possible (see [`PeerEvent::NegotiationNeeded`]).
    /// A pending local offer is rolled back.
    pub async fn accept_offer(&self, sdp: &str, feeds: &[LocalFeed]) -> Result<String, MediaError> {
        self.call_sdp(Request::AcceptOffer {
            sdp: sdp.to_string(),
            feeds: feeds.to_vec(),
        })
        .await
    }

    /// Applies the remote answer to the pending offer.
    pub async fn apply_answer(&self, sdp: &str) -> Result<(), MediaError> {
        self.call_done(Request::ApplyAnswer {
            sdp: sdp.to_string(),
        })
        .await
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
        self.call_done(Request::AddRemoteCandidate {
            candidate: candidate.to_string(),
        })
        .await
    }

    /// The local candidates gathered so far (waiting for gathering like
    /// `create_offer`); all of them are also in every later local SDP.
    pub async fn local_candidates(&self) -> Result<Vec<IceCandidate>, MediaError> {
        match self.call(Request::LocalCandidates).await? {
            Reply::Candidates(c) => Ok(c),
            other => Err(MediaError::Rtc(format!("unexpected reply {other:?}"))),
        }
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
        self.send(Request::SendFrame {
            track_id: track_id.to_string(),
            data: data.into(),
            duration,
        })
    }

    /// Asks the remote to keep what it sends us under `bps` bits per second
    /// in all (RTCP REMB; see [`Request::LimitIncomingBitrate`]).
    pub fn limit_incoming_bitrate(&self, bps: u64) -> Result<(), MediaError> {
        self.send(Request::LimitIncomingBitrate { bps })
    }

    /// Sends one instant of a simulcast video track: one encoded VP8 frame
    /// per layer, `(RID, frame)` lowest first, all with the same RTP
    /// timestamp. Where the remote accepted simulcast each layer goes out
    /// under its RID (layers it did not accept, and layers paused for lack
    /// of uplink, are dropped; a layer starts or resumes at its key frame,
    /// asked for with [`PeerEvent::KeyframeRequested`] naming the RID);
    /// otherwise the middle layer given is sent as one layer.
    pub fn send_layer_frames(
        &self,
        track_id: &str,
        layers: Vec<(String, Arc<[u8]>)>,
        duration: Duration,
    ) -> Result<(), MediaError> {
        self.send(Request::SendLayerFrames {
            track_id: track_id.to_string(),
            layers,
            duration,
        })
    }

    /// Attaches a source that the peer paces in real time for `track_id`
    /// (replacing any previous one). It may be set before the track is
    /// negotiated; it starts once connected.
    pub fn set_source(&self, track_id: &str, source: impl FrameSource) -> Result<(), MediaError> {
        self.send(Request::SetSource {
            track_id: track_id.to_string(),
            source: Box::new(source),
        })
    }

    /// [`MediaPeer::set_source`] for a boxed source.
    pub fn set_source_boxed(
        &self,
        track_id: &str,
        source: Box<dyn FrameSource>,
    ) -> Result<(), MediaError> {
        self.send(Request::SetSource {
            track_id: track_id.to_string(),
            source,
        })
    }

    /// Mutes or unmutes a local track: nothing is sent while muted, without
    /// renegotiation.
    pub fn set_muted(&self, track_id: &str, muted: bool) -> Result<(), MediaError> {
        self.send(Request::SetMuted {
            track_id: track_id.to_string(),
            muted,
        })
    }

    /// Asks the remote for a key frame (PLI) on a remote video track.
    pub fn request_keyframe(&self, remote_track_id: &str) -> Result<(), MediaError> {
        self.send(Request::RequestKeyframe {
            track_id: remote_track_id.to_string(),
        })
    }

    /// Attaches a sink for received frames matching `filter`.
    pub fn add_sink(&self, filter: SinkFilter, sink: impl FrameSink) -> Result<(), MediaError> {
        self.send(Request::AddSink {
            filter,
            sink: Box::new(sink),
        })
    }

    /// Finishes (writes trailers, flushes) and detaches all sinks; returns
    /// the errors sinks reported while finishing or writing.
    pub async fn finish_sinks(&self) -> Result<Vec<SinkError>, MediaError> {
        match self.call(Request::FinishSinks).await? {
            Reply::SinkErrors(e) => Ok(e),
            other => Err(MediaError::Rtc(format!("unexpected reply {other:?}"))),
        }
    }

    /// Counters of all local and remote tracks.
    pub async fn stats(&self) -> Result<PeerStats, MediaError> {
        match self.call(Request::Stats).await? {
            Reply::Stats(s) => Ok(*s),
            other => Err(MediaError::Rtc(format!("unexpected reply {other:?}"))),
        }
    }

    /// Sends a text message on the data channel (see
    /// [`PeerConfig::data_channel`]). Fails with
    /// [`MediaError::ChannelNotOpen`] before [`PeerEvent::ChannelOpen`], and
    /// with [`MediaError::ChannelFull`] when the channel's send buffer
    /// cannot take it (nothing is queued).
    pub async fn send_channel(&self, text: &str) -> Result<(), MediaError> {
        self.call_done(Request::SendChannel {
            text: text.to_string(),
        })
        .await
    }

    /// Writes one RTP packet on a local track of a forwarding peer (see
    /// [`PeerConfig::forward`] and [`Request::WriteRtp`]).
    pub fn write_rtp(&self, packet: RtpOut) -> Result<(), MediaError> {
        self.send(Request::WriteRtp(packet))
    }

    /// Asks the remote for a key frame on one of its m-lines (PLI, or FIR).
    pub fn request_keyframe_on(
        &self,
        mid: Mid,
        rid: Option<Rid>,
        fir: bool,
    ) -> Result<(), MediaError> {
        self.send(Request::RequestKeyframeOn { mid, rid, fir })
    }

    /// Rolls back the pending local offer (glare, polite side); emits
    /// [`PeerEvent::OfferRolledBack`]. Accepting the remote's offer with
    /// [`MediaPeer::accept_offer`] rolls it back as well.
    pub async fn rollback(&self) -> Result<(), MediaError> {
        self.call_done(Request::Rollback).await
    }

    /// Closes the connection (DTLS close_notify) and finishes the sinks.
    /// Emits [`PeerEvent::Closed`]. A peer made with [`MediaPeer::new`]
    /// also ends its host (releasing its TURN allocations).
    pub async fn close(&self) -> Result<(), MediaError> {
        match self.call(Request::Close).await {
            Err(MediaError::Closed) => Ok(()),
            r => r.map(|_| ()),
        }
    }
}
