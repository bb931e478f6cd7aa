//! [`PeerSet`]: the sans-IO core of a participant's media. Many peers (one
//! `str0m::Rtc` each), the candidate gatherer and the TURN clients, behind
//! [`PeerSet::handle_input`] / [`PeerSet::poll_output`] /
//! [`PeerSet::poll_timeout`] with `Instant` time, like str0m and quinn-proto.
//! No sockets, tasks or clocks inside: the driver (see `host.rs`) owns the
//! sockets and feeds datagrams, timeouts, resolved host names and requests.
//!
//! Demultiplexing of a datagram that arrives on one of the set's sockets:
//! 1. from a TURN server on the socket its allocation uses: the TURN client
//!    takes it; relayed data (ChannelData, Data indications) is then routed
//!    like a datagram that arrived on the relayed address;
//! 2. an answer to one of our STUN Binding probes: a server-reflexive
//!    address;
//! 3. a STUN Binding request: by its USERNAME, `<local ufrag>:<remote
//!    ufrag>`, to the peer whose local ICE ufrag matches; its source address
//!    is remembered for that peer;
//! 4. anything else (STUN answers, DTLS, SRTP): the peer that last sent a
//!    Binding request from that address, else the first peer whose `Rtc`
//!    accepts it (str0m's `Rtc::accepts`), else, in a set made for a single
//!    peer, that peer; otherwise it is dropped.

use super::*;

use super::gather::{Found, Gatherer};

/// How often a forwarding peer's str0m reports its sent streams (NACKs,
/// resends, receiver-reported loss).
const FORWARD_STATS_EVERY: Duration = Duration::from_millis(250);

/// Identifies a peer of a [`PeerSet`]; chosen by the caller of
/// [`PeerSet::add_peer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u64);

/// Identifies a request, to match its [`SetOutput::Answer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

/// A datagram to send.
#[derive(Debug, Clone)]
pub struct Transmit {
    /// The local socket address to send from (one the set was made with).
    pub source: SocketAddr,
    /// Where to.
    pub destination: SocketAddr,
    /// The payload.
    pub contents: Vec<u8>,
}

/// What happens to a [`PeerSet`].
#[derive(Debug)]
pub enum SetInput<'a> {
    /// A datagram arrived on the socket bound to `local`.
    Datagram {
        /// The receiving socket's address.
        local: SocketAddr,
        /// The sender.
        from: SocketAddr,
        /// The payload.
        data: &'a [u8],
        /// When it arrived: the kernel's receive time where the socket
        /// tells it ([`crate::udp`]), else when it was read; at or before
        /// the `now` it is fed with. What str0m's congestion feedback
        /// reports as its arrival, so the time it waited for the driver
        /// to read it does not count as delay on the link.
        received: Instant,
    },
    /// The answer to a [`SetOutput::Resolve`] (empty: not resolved).
    Resolved {
        /// The token of the request.
        token: u64,
        /// The addresses found.
        addrs: Vec<SocketAddr>,
    },
    /// Time passed (at or after [`PeerSet::poll_timeout`]).
    Timeout,
}

/// What a [`PeerSet`] wants done.
#[derive(Debug)]
pub enum SetOutput {
    /// Send a datagram.
    Transmit(Transmit),
    /// A peer's event.
    Event {
        /// The peer.
        peer: PeerId,
        /// The event.
        event: PeerEvent,
    },
    /// The answer to a request made with an id.
    Answer {
        /// The peer.
        peer: PeerId,
        /// The request.
        request: RequestId,
        /// Its outcome.
        answer: Answer,
    },
    /// Resolve a host name (a STUN or TURN server) and report it with
    /// [`SetInput::Resolved`].
    Resolve {
        /// Echoed in the answer.
        token: u64,
        /// The host name.
        host: String,
        /// The port.
        port: u16,
    },
    /// A peer ended (closed, failed, or closed by the remote): no more
    /// events from it.
    PeerEnded {
        /// The peer.
        peer: PeerId,
    },
}

/// Where the set sent a datagram (see the module docs); for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Relay,
    Probe,
    Peer(PeerId),
    Dropped,
}

/// The sans-IO peer set (see the module docs).
pub struct PeerSet {
    now: Instant,
    sockets: Vec<SocketAddr>,
    peers: BTreeMap<PeerId, PeerState>,
    gather: Gatherer,
    /// Every candidate the gatherer found, for peers added later.
    found: Vec<Found>,
    out: VecDeque<SetOutput>,
    /// Remote address -> the peer that last got a Binding request from it.
    learnt: HashMap<SocketAddr, PeerId>,
    /// Local ICE ufrag -> peer (an index, checked on use).
    by_ufrag: HashMap<String, PeerId>,
    /// Peers touched since their outputs were last taken: only these are
    /// looked at after an input (not every peer per datagram).
    dirty: Vec<PeerId>,
    /// The other half of `dirty` (capacity kept: no allocation per input).
    dirty_spare: Vec<PeerId>,
    close_when_empty: bool,
    closed: bool,
}

impl std::fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSet")
            .field("sockets", &self.sockets)
            .field("peers", &self.peers.len())
            .finish()
    }
}

fn is_sdp_request(r: &Request) -> bool {
    matches!(
        r,
        Request::CreateOffer { .. } | Request::AcceptOffer { .. } | Request::LocalCandidates
    )
}

/// Requests that keep their order behind a deferred SDP request.
fn is_ordered(r: &Request) -> bool {
    matches!(
        r,
        Request::CreateOffer { .. }
            | Request::AcceptOffer { .. }
            | Request::LocalCandidates
            | Request::ApplyAnswer { .. }
            | Request::AddRemoteCandidate { .. }
            | Request::Rollback
    )
}

impl PeerSet {
    /// A set whose peers use the sockets bound to `sockets` (their host
    /// candidates).
    pub fn new(now: Instant, sockets: Vec<SocketAddr>) -> PeerSet {
        PeerSet {
            now,
            gather: Gatherer::new(sockets.clone(), now),
            sockets,
            peers: BTreeMap::new(),
            found: Vec::new(),
            out: VecDeque::new(),
            learnt: HashMap::new(),
            by_ufrag: HashMap::new(),
            dirty: Vec::new(),
            dirty_spare: Vec::new(),
            close_when_empty: false,
            closed: false,
        }
    }

    /// Closes the set (releasing its TURN allocations) once its last peer
    /// ended: for a set made for one peer.
    pub fn close_when_empty(&mut self) {
        self.close_when_empty = true;
    }

    /// The local socket addresses.
    pub fn socket_addrs(&self) -> &[SocketAddr] {
        &self.sockets
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Number of TURN allocations in place (one per TURN server at most,
    /// whatever the number of peers).
    pub fn turn_allocations(&self) -> usize {
        self.gather.allocations()
    }

    /// No STUN probe or TURN allocation is under way.
    pub fn gathering_complete(&self) -> bool {
        self.gather.done
    }

    /// The set was closed: nothing more happens.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Adds a peer. Its STUN and TURN servers join the set's (a server the
    /// set already uses is shared, not allocated again); `bind_addrs` of
    /// `config` is not used (the set's sockets are).
    pub fn add_peer(&mut self, now: Instant, id: PeerId, config: PeerConfig) {
        self.now = now;
        if self.closed || self.peers.contains_key(&id) {
            warn!(peer = id.0, "peer id refused (set closed or id in use)");
            self.out.push_back(SetOutput::PeerEnded { peer: id });
            return;
        }
        self.gather.add_servers(&config, now);
        let mut builder = Rtc::builder().clear_codecs().enable_opus(true, false);
        if config.forward {
            // RTP mode; egress stats count the NACKs str0m answers from
            // its send buffer and carry the receiver-reported loss, every
            // 250 ms: a focus polling as often sees a receiver report at
            // most that long after it came.
            builder = builder
                .set_rtp_mode(true)
                .set_stats_interval(Some(FORWARD_STATS_EVERY));
        }
        if config.retransmission {
            builder = builder.enable_vp8(true);
        } else {
            without_retransmission(builder.codec_config());
        }
        let initial_estimate = config.estimate_bandwidth.or(config
            .simulcast
            .as_ref()
            .filter(|s| s.twcc)
            .map(|s| s.initial_estimate_bps));
        if let Some(bps) = initial_estimate {
            // Send-side bandwidth estimation (TWCC): for the simulcast
            // governor of a sender, or reported (a focus's subscribers).
            builder = builder.enable_bwe(Some(str0m::bwe::Bitrate::bps(bps)));
        }
        let mut rtc = builder.build(now);
        let mut candidates = Vec::new();
        if !config.relay_only {
            for addr in &self.sockets {
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
        for f in &self.found {
            if config.relay_only && !f.relayed {
                continue;
            }
            if let Some(c) = rtc.add_local_candidate(f.candidate.clone()) {
                candidates.push(c.clone());
            }
        }
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let done = self.gather.done;
        debug!(peer = id.0, candidates = candidates.len(), "peer added");
        let peer = PeerState {
            now,
            rtc,
            out: VecDeque::new(),
            events: VecDeque::new(),
            candidates,
            tracks: Vec::new(),
            pending_sources: HashMap::new(),
            pending_muted: HashMap::new(),
            ever_bound: HashSet::new(),
            local_sections: Vec::new(),
            remote: HashMap::new(),
            ended_remote: Vec::new(),
            pending_offer: None,
            pending_dirs: Vec::new(),
            pending_removed: Vec::new(),
            sinks: Vec::new(),
            state: ConnState::New,
            ever_connected: false,
            last_rx: now,
            negotiated_at: None,
            rtc_timeout: now,
            frames_dropped: 0,
            frames_unmatched: 0,
            selected: None,
            gather_done: done,
            sdp_while_gathering: false,
            late: Vec::new(),
            late_complete: false,
            gathering_time: done.then_some(Duration::ZERO),
            created: now,
            gather_deadline: now + config.gather_wait,
            deferred: VecDeque::new(),
            ufrag,
            config,
            finished: false,
            channel: None,
            channel_offered: false,
            channel_pending: false,
            rtp_write_dropped: 0,
            channel_dropped: 0,
            egress_nacks: HashMap::new(),
        };
        self.peers.insert(id, peer);
        self.dirty.push(id);
        if let Some(p) = self.peers.get_mut(&id)
            && let Err(e) = p.drain()
        {
            warn!(peer = id.0, error = %e, "webrtc failed at start");
            fail_peer(p);
        }
        self.pump();
    }

    /// A request for a peer. With `id`, its outcome comes as
    /// [`SetOutput::Answer`] (with an error if the peer does not exist).
    /// Offers and answers (and `LocalCandidates`) wait until gathering is
    /// complete or the peer's `gather_wait` passed; the peer's later
    /// negotiation requests queue behind them. Other peers never wait.
    pub fn request(&mut self, now: Instant, peer: PeerId, id: Option<RequestId>, req: Request) {
        self.now = now;
        let gather_done = self.gather.done;
        let Some(p) = self.peers.get_mut(&peer) else {
            if let Some(request) = id {
                self.out.push_back(SetOutput::Answer {
                    peer,
                    request,
                    answer: Err(MediaError::Closed),
                });
            }
            return;
        };
        p.now = now;
        self.dirty.push(peer);
        let defer = is_ordered(&req)
            && (!p.deferred.is_empty()
                || (is_sdp_request(&req) && !gather_done && now < p.gather_deadline));
        if defer {
            trace!(peer = peer.0, "request waits for gathering");
            p.deferred.push_back((id, req));
            return;
        }
        if matches!(req, Request::Stats) && !p.finished {
            let mut stats = p.stats();
            complete_stats(&self.gather, &mut stats);
            if let Some(request) = id {
                self.out.push_back(SetOutput::Answer {
                    peer,
                    request,
                    answer: Ok(Reply::Stats(Box::new(stats))),
                });
            }
            return;
        }
        if matches!(req, Request::Close) {
            for (rid, _) in p.deferred.drain(..) {
                if let Some(request) = rid {
                    self.out.push_back(SetOutput::Answer {
                        peer,
                        request,
                        answer: Err(MediaError::Closed),
                    });
                }
            }
        }
        run_request(p, peer, id, req, &mut self.out);
        self.pump();
    }

    /// Closes every peer and releases the TURN allocations.
    pub fn close(&mut self, now: Instant) {
        self.now = now;
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.request(now, id, None, Request::Close);
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.closed {
            return;
        }
        let mut tx = VecDeque::new();
        self.gather.close(self.now, &mut tx);
        self.out.extend(tx.into_iter().map(SetOutput::Transmit));
        self.closed = true;
        debug!("peer set closed");
    }

    /// Feeds an input.
    pub fn handle_input(&mut self, now: Instant, input: SetInput<'_>) {
        self.now = now;
        if self.closed {
            return;
        }
        match input {
            SetInput::Datagram {
                local,
                from,
                data,
                received,
            } => {
                self.datagram(local, from, data, received.min(now));
            }
            SetInput::Resolved { token, addrs } => self.gather.on_resolved(token, addrs, now),
            SetInput::Timeout => self.timeout(),
        }
        self.pump();
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<SetOutput> {
        self.out.pop_front()
    }

    /// When [`SetInput::Timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            return None;
        }
        let peers = self.peers.values().map(|p| p.next_deadline());
        peers.chain(self.gather.next_timeout()).min()
    }

    fn timeout(&mut self) {
        let now = self.now;
        let mut tx = VecDeque::new();
        self.gather.handle_timeout(now, &mut tx);
        self.out.extend(tx.into_iter().map(SetOutput::Transmit));
        for (id, p) in &mut self.peers {
            p.now = now;
            if p.finished {
                continue;
            }
            if !p.deferred.is_empty() {
                self.dirty.push(*id);
                run_deferred(p, *id, false, &mut self.out);
            }
            if p.next_deadline() <= now {
                self.dirty.push(*id);
                if let Err(e) = p.handle_timer() {
                    warn!(peer = id.0, error = %e, "webrtc error, failing the peer");
                    fail_peer(p);
                }
            }
        }
    }

    fn datagram(
        &mut self,
        local: SocketAddr,
        from: SocketAddr,
        data: &[u8],
        received: Instant,
    ) -> Route {
        if let Some(i) = self.gather.relay_for(local, from) {
            let now = self.now;
            let relayed = self.gather.relays.get(i).and_then(|r| r.client.relayed());
            let unwrapped = self
                .gather
                .relays
                .get_mut(i)
                .and_then(|r| r.client.handle_input(now, data))
                .map(|(peer, payload)| (peer, payload.to_vec()));
            if let (Some((peer, payload)), Some(relayed)) = (unwrapped, relayed) {
                self.deliver(relayed, peer, &payload, received);
            }
            return Route::Relay;
        }
        if stun::is_stun(data) && self.gather.probe_answer(local, from, data) {
            return Route::Probe;
        }
        self.deliver(local, from, data, received)
    }

    /// Routes a datagram (arrived on `local`, a socket or relayed address)
    /// to a peer and feeds it in.
    /// `received`: when it arrived (see [`SetInput::Datagram`]).
    fn deliver(
        &mut self,
        local: SocketAddr,
        from: SocketAddr,
        data: &[u8],
        received: Instant,
    ) -> Route {
        let Some(id) = self.route(local, from, data) else {
            trace!(%from, %local, len = data.len(), "datagram for no peer");
            return Route::Dropped;
        };
        let Ok(recv) = Receive::new(Protocol::Udp, from, local, data) else {
            trace!(%from, "unrecognised datagram");
            return Route::Dropped;
        };
        let input = Input::Receive(received, recv);
        if let Some(p) = self.peers.get_mut(&id) {
            self.dirty.push(id);
            p.now = self.now;
            let known = p.rtc.accepts(&input);
            if let Err(e) = p.receive(from, input, known) {
                warn!(peer = id.0, error = %e, "webrtc error, failing the peer");
                fail_peer(p);
            }
        }
        Route::Peer(id)
    }

    /// Which peer a datagram is for (see the module docs).
    pub(crate) fn route(
        &mut self,
        local: SocketAddr,
        from: SocketAddr,
        data: &[u8],
    ) -> Option<PeerId> {
        if let Some(username) = binding_request_username(data) {
            let ufrag = username.split(':').next().unwrap_or("");
            let live = |peers: &BTreeMap<PeerId, PeerState>, id: &PeerId| {
                peers
                    .get(id)
                    .is_some_and(|p| !p.finished && p.ufrag == ufrag)
            };
            // The index is rebuilt when it misses (a new peer, an ICE
            // restart changed a ufrag, or a ufrag nobody has).
            let mut id = self
                .by_ufrag
                .get(ufrag)
                .copied()
                .filter(|id| live(&self.peers, id));
            if id.is_none() {
                self.by_ufrag = self
                    .peers
                    .iter()
                    .filter(|(_, p)| !p.finished)
                    .map(|(id, p)| (p.ufrag.clone(), *id))
                    .collect();
                id = self.by_ufrag.get(ufrag).copied();
            }
            match id {
                Some(id) => {
                    self.learnt.insert(from, id);
                }
                None => trace!(%from, ufrag, "Binding request for an unknown ufrag"),
            }
            return id;
        }
        if let Some(id) = self.learnt.get(&from)
            && self.peers.get(id).is_some_and(|p| !p.finished)
        {
            return Some(*id);
        }
        let recv = Receive::new(Protocol::Udp, from, local, data).ok()?;
        let input = Input::Receive(self.now, recv);
        if let Some((id, _)) = self
            .peers
            .iter()
            .find(|(_, p)| !p.finished && p.rtc.accepts(&input))
        {
            return Some(*id);
        }
        // A set made for one peer (`MediaPeer::new`) gives it everything,
        // as its own socket would; a shared set never guesses (a packet of a
        // peer that just ended must not reach another).
        if self.close_when_empty && self.peers.len() == 1 {
            return self.peers.keys().next().copied();
        }
        None
    }

    /// Moves the peers' transmits and events out (relaying what goes from a
    /// relayed address), hands new candidates to every peer, notices the
    /// end of gathering and removes ended peers.
    fn pump(&mut self) {
        let now = self.now;
        loop {
            let mut more = false;
            let mut tx = VecDeque::new();
            let ended = self.gather.service(now, &mut tx);
            self.out.extend(tx.drain(..).map(SetOutput::Transmit));
            while let Some((token, host, port)) = self.gather.resolve.pop_front() {
                self.out.push_back(SetOutput::Resolve { token, host, port });
            }
            for lost in std::mem::take(&mut self.gather.lost) {
                self.found.retain(|f| f.candidate.addr() != lost);
            }
            let found: Vec<Found> = std::mem::take(&mut self.gather.found);
            for f in &found {
                debug!(candidate = %f.candidate, "local candidate (all peers)");
                for (id, p) in &mut self.peers {
                    if p.finished || (p.config.relay_only && !f.relayed) {
                        continue;
                    }
                    self.dirty.push(*id);
                    p.now = now;
                    if let Err(e) = p.add_gathered(f.candidate.clone()) {
                        warn!(peer = id.0, error = %e, "webrtc error, failing the peer");
                        fail_peer(p);
                    }
                }
                more = true;
            }
            self.found.extend(found);
            if ended {
                for (id, p) in &mut self.peers {
                    self.dirty.push(*id);
                    p.now = now;
                    p.gathering_finished();
                    run_deferred(p, *id, true, &mut self.out);
                }
                more = true;
            }
            // Peers' outputs.
            let mut ended_peers = Vec::new();
            let mut dirty = std::mem::take(&mut self.dirty_spare);
            std::mem::swap(&mut dirty, &mut self.dirty);
            dirty.sort_unstable();
            dirty.dedup();
            for id in dirty.drain(..) {
                let Some(p) = self.peers.get_mut(&id) else {
                    continue;
                };
                p.report_late();
                while let Some(t) = p.out.pop_front() {
                    match self.gather.relay_with_address(t.source) {
                        Some(i) => {
                            if let Some(r) = self.gather.relays.get_mut(i) {
                                r.client.send_to(now, t.destination, &t.contents);
                            }
                            more = true;
                        }
                        None => self.out.push_back(SetOutput::Transmit(t)),
                    }
                }
                while let Some(event) = p.events.pop_front() {
                    self.out.push_back(SetOutput::Event { peer: id, event });
                }
                if p.finished {
                    ended_peers.push(id);
                }
            }
            self.dirty_spare = dirty;
            for id in ended_peers {
                self.peers.remove(&id);
                self.learnt.retain(|_, p| *p != id);
                debug!(peer = id.0, "peer ended");
                self.out.push_back(SetOutput::PeerEnded { peer: id });
                if self.close_when_empty && self.peers.is_empty() {
                    self.shutdown();
                }
            }
            if !more {
                break;
            }
        }
    }
}

/// Adds the set-level figures (relays) to a peer's stats.
fn complete_stats(gather: &Gatherer, stats: &mut PeerStats) {
    if let Some(pair) = stats.selected_pair.as_mut() {
        pair.relayed = gather.relay_with_address(pair.local).is_some();
    }
    stats.relays = gather.relay_stats();
}

/// The USERNAME of a STUN Binding request, if `data` is one.
fn binding_request_username(data: &[u8]) -> Option<String> {
    if !stun::is_stun(data) {
        return None;
    }
    let msg = stun::Message::decode(data).ok()?;
    if msg.method != stun::method::BINDING || msg.class != stun::Class::Request {
        return None;
    }
    msg.text(stun::attr::USERNAME)
}

fn fail_peer(p: &mut PeerState) {
    p.set_state(ConnState::Failed);
    p.rtc.disconnect();
    p.finish_all_sinks();
    p.finished = true;
}

fn run_request(
    p: &mut PeerState,
    peer: PeerId,
    id: Option<RequestId>,
    req: Request,
    out: &mut VecDeque<SetOutput>,
) {
    if p.finished {
        if let Some(request) = id {
            out.push_back(SetOutput::Answer {
                peer,
                request,
                answer: Err(MediaError::Closed),
            });
        }
        return;
    }
    // Only offers and answers can change the local ICE credentials (and
    // reading them allocates: not for every packet written).
    let sdp = matches!(
        req,
        Request::CreateOffer { .. } | Request::AcceptOffer { .. } | Request::ApplyAnswer { .. }
    );
    let r = p.handle_request(req);
    if sdp {
        p.ufrag = p.rtc.direct_api().local_ice_credentials().ufrag;
    }
    match r {
        Ok(Some(answer)) => {
            if let Some(request) = id {
                out.push_back(SetOutput::Answer {
                    peer,
                    request,
                    answer,
                });
            }
        }
        Ok(None) => {}
        Err(e) => {
            warn!(peer = peer.0, error = %e, "webrtc error, failing the peer");
            fail_peer(p);
            if let Some(request) = id {
                out.push_back(SetOutput::Answer {
                    peer,
                    request,
                    answer: Err(MediaError::Rtc(e.to_string())),
                });
            }
        }
    }
}

/// Runs the peer's deferred requests that may run now.
fn run_deferred(p: &mut PeerState, peer: PeerId, gather_done: bool, out: &mut VecDeque<SetOutput>) {
    if gather_done {
        p.gather_done = true;
    }
    while let Some((_, front)) = p.deferred.front() {
        if is_sdp_request(front) && !p.gather_done && p.now < p.gather_deadline {
            break;
        }
        let Some((id, req)) = p.deferred.pop_front() else {
            break;
        };
        run_request(p, peer, id, req, out);
    }
}

impl PeerState {
    /// A candidate the set's gatherer found.
    pub(super) fn add_gathered(&mut self, c: Candidate) -> Result<(), str0m::RtcError> {
        if let Some(c) = self.rtc.add_local_candidate(c) {
            let c = c.clone();
            self.candidates.push(c.clone());
            if self.sdp_while_gathering {
                self.late.push(c);
            }
            // str0m pairs the new candidate and may check it right away.
            self.rtc.handle_input(Input::Timeout(self.now))?;
            self.drain()?;
        }
        Ok(())
    }

    /// The set's gathering ended.
    pub(super) fn gathering_finished(&mut self) {
        self.gather_done = true;
        if self.gathering_time.is_none() {
            self.gathering_time = Some(self.now.saturating_duration_since(self.created));
        }
        if self.sdp_while_gathering {
            self.late_complete = true;
        }
    }

    /// Reports late candidates (and the end of gathering) when an SDP went
    /// out before gathering finished.
    pub(super) fn report_late(&mut self) {
        if !self.sdp_while_gathering {
            self.late.clear();
            return;
        }
        let complete = std::mem::take(&mut self.late_complete);
        if self.late.is_empty() && !complete {
            return;
        }
        let mid = self.local_sections.first().and_then(|s| s.mid.clone());
        let candidates = self
            .late
            .drain(..)
            .map(|c| IceCandidate {
                candidate: c.to_sdp_string(),
                sdp_mid: mid.clone(),
                sdp_m_line_index: Some(0),
            })
            .collect();
        self.emit(PeerEvent::LocalCandidates {
            candidates,
            complete,
        });
        if complete {
            self.sdp_while_gathering = false;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn binding_request(username: &str) -> Vec<u8> {
        stun::MessageBuilder::new(
            stun::method::BINDING,
            stun::Class::Request,
            stun::new_transaction_id(),
        )
        .attr(stun::attr::USERNAME, username.as_bytes())
        .fingerprint()
    }

    /// A DTLS record header (content type 22, handshake) and some bytes.
    const DTLS: &[u8] = &[22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4];

    fn set_with_peers(n: u64) -> (PeerSet, Instant) {
        let now = Instant::now();
        let mut set = PeerSet::new(now, vec![addr("127.0.0.1:5000")]);
        for i in 1..=n {
            set.add_peer(now, PeerId(i), PeerConfig::default());
        }
        (set, now)
    }

    fn ufrag(set: &PeerSet, id: u64) -> String {
        set.peers.get(&PeerId(id)).unwrap().ufrag.clone()
    }

    #[test]
    fn binding_requests_go_by_ufrag_then_by_address() {
        let (mut set, _) = set_with_peers(3);
        let local = addr("127.0.0.1:5000");
        let (u1, u2, u3) = (ufrag(&set, 1), ufrag(&set, 2), ufrag(&set, 3));
        assert!(u1 != u2 && u2 != u3 && u1 != u3);
        let (r1, r2, r3) = (
            addr("10.0.0.1:4001"),
            addr("10.0.0.2:4002"),
            addr("10.0.0.3:4003"),
        );
        // Binding requests: by the local ufrag before the colon.
        let req = binding_request(&format!("{u2}:remote2"));
        assert_eq!(set.route(local, r2, &req), Some(PeerId(2)));
        let req = binding_request(&format!("{u3}:remote3"));
        assert_eq!(set.route(local, r3, &req), Some(PeerId(3)));
        let req = binding_request(&format!("{u1}:remote1"));
        assert_eq!(set.route(local, r1, &req), Some(PeerId(1)));
        // An unknown ufrag goes nowhere.
        let req = binding_request("nobody:remote");
        assert_eq!(set.route(local, addr("10.0.0.9:9"), &req), None);
        // Everything else: by the address the requests came from.
        assert_eq!(set.route(local, r2, DTLS), Some(PeerId(2)));
        assert_eq!(set.route(local, r3, DTLS), Some(PeerId(3)));
        assert_eq!(set.route(local, r1, DTLS), Some(PeerId(1)));
        // An address no peer knows: dropped (several peers, none accepts).
        assert_eq!(set.route(local, addr("10.0.0.9:9"), DTLS), None);
        // The same remote address, now checking a new peer (e.g. a call
        // replaced): the latest Binding request wins.
        let req = binding_request(&format!("{u3}:other"));
        assert_eq!(set.route(local, r1, &req), Some(PeerId(3)));
        assert_eq!(set.route(local, r1, DTLS), Some(PeerId(3)));
    }

    #[test]
    fn datagrams_through_handle_input_reach_the_routed_peer() {
        let (mut set, now) = set_with_peers(2);
        let local = addr("127.0.0.1:5000");
        while set.poll_output().is_some() {}
        // A datagram for no peer: nothing happens.
        set.handle_input(
            now,
            SetInput::Datagram {
                local,
                from: addr("10.0.0.9:9"),
                data: DTLS,
                received: now,
            },
        );
        assert!(set.poll_output().is_none());
        // A Binding request for peer 2, signed with its ICE password: str0m
        // parses it and it is fed to peer 2 (no answer yet: no remote
        // credentials before an offer/answer).
        let u2 = ufrag(&set, 2);
        let pass = set
            .peers
            .get_mut(&PeerId(2))
            .unwrap()
            .rtc
            .direct_api()
            .local_ice_credentials()
            .pass;
        let from = addr("10.0.0.2:4002");
        let req = stun::MessageBuilder::new(
            stun::method::BINDING,
            stun::Class::Request,
            stun::new_transaction_id(),
        )
        .attr(stun::attr::USERNAME, format!("{u2}:x").as_bytes())
        .u32(0x0024, 1) // PRIORITY
        .integrity(pass.as_bytes())
        .fingerprint();
        assert_eq!(set.datagram(local, from, &req, now), Route::Peer(PeerId(2)));
        assert_eq!(set.learnt.get(&from), Some(&PeerId(2)));
        // Garbage from it goes to peer 2 and does not break anything.
        assert_eq!(set.datagram(local, from, DTLS, now), Route::Peer(PeerId(2)));
        assert_eq!(set.peer_count(), 2);
    }

    #[test]
    fn only_a_single_peer_set_takes_unknown_datagrams() {
        let local = addr("127.0.0.1:5000");
        // A shared set left with one peer drops what no peer knows.
        let (mut set, _) = set_with_peers(1);
        assert_eq!(set.route(local, addr("10.0.0.9:9"), DTLS), None);
        // A set made for one peer gives it everything, like its own socket.
        let now = Instant::now();
        let mut set = PeerSet::new(now, vec![local]);
        set.close_when_empty();
        set.add_peer(now, PeerId(1), PeerConfig::default());
        assert_eq!(set.route(local, addr("10.0.0.9:9"), DTLS), Some(PeerId(1)));
    }

    #[test]
    fn an_offer_waits_for_gathering_without_holding_up_other_peers() {
        let now = Instant::now();
        let local = addr("127.0.0.1:5000");
        let mut set = PeerSet::new(now, vec![local]);
        // A TURN server that never answers (nothing listens there).
        let turn = crate::ice::IceServer::turn(
            ["turn:127.0.0.1:9?transport=udp".to_string()],
            "user".to_string(),
            "pass".to_string(),
        );
        let cfg = PeerConfig {
            ice_servers: vec![turn],
            gather_wait: Duration::from_millis(300),
            ..PeerConfig::default()
        };
        set.add_peer(now, PeerId(1), cfg.clone());
        set.add_peer(now, PeerId(2), cfg);
        assert!(!set.gathering_complete());
        // The Allocate request goes out from the set's socket.
        let mut allocates = 0;
        while let Some(o) = set.poll_output() {
            if let SetOutput::Transmit(t) = o {
                assert_eq!(t.source, local);
                assert_eq!(t.destination, addr("127.0.0.1:9"));
                allocates += 1;
            }
        }
        assert_eq!(allocates, 1, "one Allocate for two peers");

        let feeds = vec![LocalFeed::usermedia("s1")];
        set.request(
            now,
            PeerId(1),
            Some(RequestId(1)),
            Request::CreateOffer {
                feeds,
                ice_restart: false,
            },
        );
        // Peer 1's offer waits; peer 2's requests are answered at once.
        set.request(now, PeerId(2), Some(RequestId(2)), Request::Stats);
        let mut answered = Vec::new();
        while let Some(o) = set.poll_output() {
            if let SetOutput::Answer { request, .. } = o {
                answered.push(request);
            }
        }
        assert_eq!(answered, vec![RequestId(2)]);
        // The set wakes at the gather deadline at the latest.
        let wake = set.poll_timeout().unwrap();
        assert!(wake <= now + Duration::from_millis(300), "{wake:?}");
        let later = now + Duration::from_millis(300);
        set.handle_input(later, SetInput::Timeout);
        let mut sdp = None;
        while let Some(o) = set.poll_output() {
            if let SetOutput::Answer {
                peer,
                request,
                answer,
            } = o
            {
                assert_eq!((peer, request), (PeerId(1), RequestId(1)));
                sdp = Some(answer);
            }
        }
        let Some(Ok(Reply::Sdp(sdp))) = sdp else {
            panic!("no offer after the gather wait: {sdp:?}");
        };
        assert!(sdp.contains("typ host"), "{sdp}");
        assert!(!sdp.contains("typ relay"), "{sdp}");
        // Requests for an unknown peer are answered with an error.
        set.request(later, PeerId(9), Some(RequestId(3)), Request::Stats);
        assert!(matches!(
            set.poll_output(),
            Some(SetOutput::Answer {
                answer: Err(MediaError::Closed),
                ..
            })
        ));
    }

    #[test]
    fn garbage_datagrams_never_break_the_set() {
        let (mut set, now) = set_with_peers(3);
        let local = addr("127.0.0.1:5000");
        let u1 = ufrag(&set, 1);
        let seeds: Vec<Vec<u8>> = vec![
            binding_request(&format!("{u1}:r")),
            binding_request("no-colon"),
            binding_request(""),
            DTLS.to_vec(),
            vec![0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4], // ChannelData
            vec![0x80, 0x60, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1], // RTP
            Vec::new(),
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..3000u32 {
            let mut data = seeds[round as usize % seeds.len()].clone();
            // Flip bytes, truncate or extend.
            match rng.u8(0..4) {
                0 if !data.is_empty() => {
                    let i = rng.usize(0..data.len());
                    data[i] ^= 1 << rng.u8(0..8);
                }
                1 if !data.is_empty() => data.truncate(rng.usize(0..data.len())),
                2 => data.extend((0..rng.usize(0..64)).map(|_| rng.u8(..))),
                _ => {}
            }
            let from = SocketAddr::new([10, 0, 0, rng.u8(1..5)].into(), 4000 + rng.u16(0..4));
            let at = now + Duration::from_millis(u64::from(round));
            set.handle_input(
                at,
                SetInput::Datagram {
                    local,
                    from,
                    data: &data,
                    received: at,
                },
            );
            while set.poll_output().is_some() {}
        }
        // Every peer is still there and answers.
        assert_eq!(set.peer_count(), 3);
        for i in 1..=3 {
            let later = now + Duration::from_secs(3);
            set.request(later, PeerId(i), Some(RequestId(i)), Request::Stats);
            assert!(matches!(
                set.poll_output(),
                Some(SetOutput::Answer {
                    answer: Ok(Reply::Stats(_)),
                    ..
                })
            ));
        }
    }

    #[test]
    fn a_failed_allocation_is_tried_again_for_a_later_peer() {
        let now = Instant::now();
        let local = addr("127.0.0.1:5000");
        let mut set = PeerSet::new(now, vec![local]);
        let turn = crate::ice::IceServer::turn(
            ["turn:127.0.0.1:9?transport=udp".to_string()],
            "user".to_string(),
            "pass".to_string(),
        );
        let cfg = PeerConfig {
            ice_servers: vec![turn],
            stun_timeout: Duration::from_millis(200),
            ..PeerConfig::default()
        };
        let allocates = |set: &mut PeerSet| {
            let mut n = 0;
            while let Some(o) = set.poll_output() {
                if let SetOutput::Transmit(t) = o
                    && t.destination == addr("127.0.0.1:9")
                {
                    n += 1;
                }
            }
            n
        };
        set.add_peer(now, PeerId(1), cfg.clone());
        assert_eq!(allocates(&mut set), 1);
        // A second peer while the first allocation is under way: shared.
        set.add_peer(now, PeerId(2), cfg.clone());
        assert_eq!(allocates(&mut set), 0);
        // No answer: the allocation fails and gathering ends.
        let mut t = now;
        while !set.gathering_complete() {
            t = set.poll_timeout().unwrap().max(t);
            set.handle_input(t, SetInput::Timeout);
            let _ = allocates(&mut set);
            assert!(t < now + Duration::from_secs(2), "allocation never gave up");
        }
        assert_eq!(set.turn_allocations(), 0);
        // A later peer (e.g. with fresh credentials) tries again.
        set.add_peer(t, PeerId(3), cfg);
        assert!(!set.gathering_complete());
        assert_eq!(allocates(&mut set), 1);
    }

    type Drained = (Vec<(PeerId, Answer)>, Vec<(PeerId, PeerEvent)>);

    /// Takes a set's outputs: transmits go to `wire`, answers and events
    /// are returned.
    fn drain_set(set: &mut PeerSet, wire: &mut Vec<Transmit>) -> Drained {
        let (mut answers, mut events) = (Vec::new(), Vec::new());
        while let Some(o) = set.poll_output() {
            match o {
                SetOutput::Transmit(t) => wire.push(t),
                SetOutput::Answer { peer, answer, .. } => answers.push((peer, answer)),
                SetOutput::Event { peer, event } => events.push((peer, event)),
                _ => {}
            }
        }
        (answers, events)
    }

    fn sdp_of(answers: Vec<(PeerId, Answer)>, peer: PeerId) -> String {
        answers
            .into_iter()
            .find_map(|(p, a)| match a {
                Ok(Reply::Sdp(s)) if p == peer => Some(s),
                _ => None,
            })
            .expect("an SDP")
    }

    /// Three participants' sets wired together in memory, no sockets and a
    /// simulated clock: A's two peers (to B and to C) share A's one address
    /// and both connect.
    #[test]
    fn two_peers_of_one_set_connect_over_a_simulated_wire() {
        let t0 = Instant::now();
        let (a_addr, b_addr, c_addr) = (
            addr("10.0.0.1:1000"),
            addr("10.0.0.2:2000"),
            addr("10.0.0.3:3000"),
        );
        let mut sets = [
            PeerSet::new(t0, vec![a_addr]),
            PeerSet::new(t0, vec![b_addr]),
            PeerSet::new(t0, vec![c_addr]),
        ];
        let (ab, ac, remote) = (PeerId(1), PeerId(2), PeerId(1));
        sets[0].add_peer(t0, ab, PeerConfig::default());
        sets[0].add_peer(t0, ac, PeerConfig::default());
        sets[1].add_peer(t0, remote, PeerConfig::default());
        sets[2].add_peer(t0, remote, PeerConfig::default());
        let mut wire = Vec::new();
        let mut connected: Vec<(usize, PeerId)> = Vec::new();
        for (i, mine) in [(1usize, ab), (2, ac)] {
            let feeds = vec![LocalFeed::usermedia("a")];
            sets[0].request(
                t0,
                mine,
                Some(RequestId(1)),
                Request::CreateOffer {
                    feeds,
                    ice_restart: false,
                },
            );
            let offer = sdp_of(drain_set(&mut sets[0], &mut wire).0, mine);
            let feeds = vec![LocalFeed::usermedia("r")];
            sets[i].request(
                t0,
                remote,
                Some(RequestId(1)),
                Request::AcceptOffer { sdp: offer, feeds },
            );
            let answer = sdp_of(drain_set(&mut sets[i], &mut wire).0, remote);
            sets[0].request(
                t0,
                mine,
                Some(RequestId(2)),
                Request::ApplyAnswer { sdp: answer },
            );
        }
        let mut now = t0;
        let mut from_a = 0;
        while connected.len() < 4 {
            assert!(
                now < t0 + Duration::from_secs(10),
                "not connected in 10 simulated seconds: {connected:?}"
            );
            for (i, set) in sets.iter_mut().enumerate() {
                for (peer, ev) in drain_set(set, &mut wire).1 {
                    if matches!(ev, PeerEvent::Connected) {
                        connected.push((i, peer));
                    }
                }
            }
            if wire.is_empty() {
                // Nothing in flight: on to the next timeout.
                now = sets
                    .iter()
                    .filter_map(|s| s.poll_timeout())
                    .min()
                    .unwrap_or(now)
                    .max(now + Duration::from_millis(1));
                for set in sets.iter_mut() {
                    set.handle_input(now, SetInput::Timeout);
                }
                continue;
            }
            now += Duration::from_millis(1);
            for t in std::mem::take(&mut wire) {
                if t.source == a_addr {
                    from_a += 1;
                }
                assert!([a_addr, b_addr, c_addr].contains(&t.source), "{t:?}");
                let Some(set) = sets
                    .iter_mut()
                    .find(|s| s.socket_addrs() == [t.destination])
                else {
                    continue;
                };
                set.handle_input(
                    now,
                    SetInput::Datagram {
                        local: t.destination,
                        from: t.source,
                        data: &t.contents,
                        received: now,
                    },
                );
            }
        }
        connected.sort();
        assert_eq!(connected, vec![(0, ab), (0, ac), (1, remote), (2, remote)]);
        eprintln!(
            "connected after {:?} simulated, {from_a} datagrams from A's address",
            now - t0
        );
        // 1 ms per hop: no datagram was lost to the demux (a lost check or
        // handshake packet would cost a retransmission timeout, >= 50 ms).
        assert!(now - t0 < Duration::from_millis(50), "{:?}", now - t0);
        assert!(from_a > 0);
        // Each of A's peers learnt its remote's address, on A's one socket.
        assert_eq!(sets[0].learnt.get(&b_addr), Some(&ab));
        assert_eq!(sets[0].learnt.get(&c_addr), Some(&ac));
    }
}
