//! Candidate gathering in the peer's task: server-reflexive addresses from
//! STUN servers, relayed addresses from TURN servers (one [`TurnClient`]
//! per TURN server), and the relaying of str0m's packets through them.
//!
//! Gathering never blocks the task: servers are resolved by spawned
//! lookups, requests are retransmitted from the task's timer, answers come
//! in on the peer's sockets. Offers wait for gathering at most
//! `PeerConfig::gather_wait` (in the handle); candidates found later are
//! added to str0m and reported as [`PeerEvent::LocalCandidates`].

use super::*;

use crate::ice::{IceServer, IceUrl, IceUrlScheme};
use crate::turn::{TurnClient, TurnEvent, TurnTiming};
use crate::types::RelayStats;

/// At most this many STUN servers and TURN allocations per peer.
const MAX_STUN_SERVERS: usize = 4;
const MAX_TURN_SERVERS: usize = 2;

/// A resolved server address, from a spawned lookup.
pub(super) struct Lookup {
    target: Target,
    addrs: Vec<SocketAddr>,
}

#[derive(Clone)]
enum Target {
    Stun,
    Turn {
        url: String,
        username: String,
        password: String,
    },
}

struct StunProbe {
    server: SocketAddr,
    socket: usize,
    tid: stun::TransactionId,
    request: Vec<u8>,
    next_send: Instant,
    rto: Duration,
    deadline: Instant,
    done: bool,
}

pub(super) struct Relay {
    pub(super) client: TurnClient,
    pub(super) socket: usize,
    url: String,
    relayed: Option<SocketAddr>,
    error: Option<String>,
}

pub(super) struct Gatherer {
    probes: Vec<StunProbe>,
    pub(super) relays: Vec<Relay>,
    pending_lookups: usize,
    lookup_tx: mpsc::UnboundedSender<Lookup>,
    pub(super) lookup_rx: mpsc::UnboundedReceiver<Lookup>,
    done_tx: watch::Sender<bool>,
    started: Instant,
    pub(super) finished_after: Option<Duration>,
    /// An SDP was made before gathering finished: later candidates and the
    /// end of gathering are reported as events.
    pub(super) sdp_while_gathering: bool,
    /// Candidates found since the last report.
    late: Vec<Candidate>,
    /// Local candidates already handed to str0m's checks.
    candidates_seen: usize,
    /// Some TURN server is configured.
    relays_wanted: bool,
    stun_timeout: Duration,
}

impl Gatherer {
    /// Parses the configured servers and starts lookups. `sockets` are the
    /// peer's bound addresses.
    pub(super) fn new(config: &PeerConfig, now: Instant) -> (Gatherer, watch::Receiver<bool>) {
        let (lookup_tx, lookup_rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = watch::channel(false);
        let mut g = Gatherer {
            probes: Vec::new(),
            relays: Vec::new(),
            pending_lookups: 0,
            lookup_tx,
            lookup_rx,
            done_tx,
            started: now,
            finished_after: None,
            sdp_while_gathering: false,
            late: Vec::new(),
            candidates_seen: 0,
            relays_wanted: false,
            stun_timeout: config.stun_timeout,
        };
        let mut stun_targets: Vec<(String, u16)> = Vec::new();
        if let Some(s) = config.stun_server {
            stun_targets.push((s.ip().to_string(), s.port()));
        }
        let mut turn_targets: Vec<(IceUrl, String, String, String)> = Vec::new();
        for server in &config.ice_servers {
            add_targets(server, &mut stun_targets, &mut turn_targets);
        }
        stun_targets.dedup();
        stun_targets.truncate(MAX_STUN_SERVERS);
        turn_targets.truncate(MAX_TURN_SERVERS);
        for (host, port) in stun_targets {
            g.lookup(host, port, Target::Stun);
        }
        for (u, url, username, password) in turn_targets {
            g.relays_wanted = true;
            g.lookup(
                u.host,
                u.port,
                Target::Turn {
                    url,
                    username,
                    password,
                },
            );
        }
        if config.relay_only && !g.relays_wanted {
            warn!("relay_only without a usable TURN server: this peer has no candidates");
        }
        if g.pending_lookups == 0 {
            // Nothing to gather: offers need not wait.
            g.finished_after = Some(Duration::ZERO);
            g.done_tx.send_replace(true);
        }
        (g, done_rx)
    }

    fn lookup(&mut self, host: String, port: u16, target: Target) {
        self.pending_lookups += 1;
        let tx = self.lookup_tx.clone();
        let timeout = self.stun_timeout;
        tokio::spawn(async move {
            let addrs = match host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, port)],
                Err(_) => {
                    match tokio::time::timeout(
                        timeout,
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
                    }
                }
            };
            let _ = tx.send(Lookup { target, addrs });
        });
    }

    pub(super) fn pending_lookups(&self) -> usize {
        self.pending_lookups
    }

    pub(super) fn is_done(&self) -> bool {
        self.finished_after.is_some()
    }

    fn all_settled(&self) -> bool {
        self.pending_lookups == 0
            && self.probes.iter().all(|p| p.done)
            && self.relays.iter().all(|r| r.client.settled())
    }

    pub(super) fn next_timeout(&self) -> Option<Instant> {
        let probes = self
            .probes
            .iter()
            .filter(|p| !p.done)
            .map(|p| p.next_send.min(p.deadline));
        let relays = self.relays.iter().filter_map(|r| r.client.next_timeout());
        probes.chain(relays).min()
    }

    pub(super) fn relay_stats(&self) -> Vec<RelayStats> {
        self.relays
            .iter()
            .map(|r| {
                let c = r.client.counters();
                RelayStats {
                    url: r.url.clone(),
                    server: r.client.server(),
                    relayed: r.client.relayed().or(r.relayed),
                    error: r.error.clone(),
                    packets_sent: c.packets_sent,
                    bytes_sent: c.bytes_sent,
                    packets_received: c.packets_received,
                    bytes_received: c.bytes_received,
                    channel_data_sent: c.channel_data_sent,
                    channel_data_received: c.channel_data_received,
                    permissions: r.client.permissions(),
                    channels: r.client.bound_channels(),
                }
            })
            .collect()
    }
}

fn add_targets(
    server: &IceServer,
    stun_targets: &mut Vec<(String, u16)>,
    turn_targets: &mut Vec<(IceUrl, String, String, String)>,
) {
    for url in &server.urls {
        let u: IceUrl = match url.parse() {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "ignoring ICE server URL");
                continue;
            }
        };
        if !u.is_supported() {
            debug!(%url, "skipping ICE server URL (only UDP is supported)");
            continue;
        }
        match u.scheme {
            IceUrlScheme::Stun => stun_targets.push((u.host, u.port)),
            IceUrlScheme::Turn => {
                let (Some(user), Some(pass)) = (&server.username, &server.credential) else {
                    warn!(%url, "ignoring TURN URL without username and credential");
                    continue;
                };
                if turn_targets
                    .iter()
                    .any(|(t, ..)| t.host == u.host && t.port == u.port)
                {
                    continue;
                }
                turn_targets.push((u, url.clone(), user.clone(), pass.clone()));
            }
        }
    }
}

impl Driver {
    /// A lookup finished: start probing or allocating.
    pub(super) async fn on_lookup(&mut self, l: Lookup) -> Result<(), str0m::RtcError> {
        self.gather.pending_lookups = self.gather.pending_lookups.saturating_sub(1);
        let now = Instant::now();
        match l.target {
            Target::Stun => {
                // One Binding request per socket, to the first server address
                // of its family.
                for (i, local) in self.local_addrs.iter().enumerate() {
                    let Some(server) = l.addrs.iter().find(|a| a.is_ipv4() == local.is_ipv4())
                    else {
                        continue;
                    };
                    if self
                        .gather
                        .probes
                        .iter()
                        .any(|p| p.socket == i && p.server == *server)
                    {
                        continue;
                    }
                    let tid = stun::new_transaction_id();
                    self.gather.probes.push(StunProbe {
                        server: *server,
                        socket: i,
                        tid,
                        request: stun::binding_request(&tid),
                        next_send: now,
                        rto: Duration::from_millis(100),
                        deadline: now + self.config.stun_timeout,
                        done: false,
                    });
                }
            }
            Target::Turn {
                url,
                username,
                password,
            } => {
                // One allocation, from the first socket of a family the
                // server has.
                let pick = self.local_addrs.iter().enumerate().find_map(|(i, local)| {
                    l.addrs
                        .iter()
                        .find(|a| a.is_ipv4() == local.is_ipv4())
                        .map(|a| (i, *a))
                });
                match pick {
                    Some((socket, server)) => {
                        if !self
                            .gather
                            .relays
                            .iter()
                            .any(|r| r.client.server() == server)
                        {
                            debug!(%url, %server, "allocating on TURN server");
                            let timing = TurnTiming {
                                allocate_timeout: self.config.stun_timeout,
                                ..TurnTiming::default()
                            };
                            self.gather.relays.push(Relay {
                                client: TurnClient::new(server, &username, &password, timing, now),
                                socket,
                                url,
                                relayed: None,
                                error: None,
                            });
                        }
                    }
                    None => warn!(%url, "no local socket can reach this TURN server"),
                }
            }
        }
        self.service_gathering(now).await
    }

    /// Retransmits and times out probes; runs the TURN clients' timers.
    pub(super) async fn gather_timeout(&mut self, now: Instant) -> Result<(), str0m::RtcError> {
        for p in &mut self.gather.probes {
            if p.done {
                continue;
            }
            if now >= p.deadline {
                warn!(server = %p.server, "no STUN answer");
                p.done = true;
                continue;
            }
            if now >= p.next_send {
                if let Some(s) = self.sockets.get(p.socket)
                    && let Err(e) = s.send_to(&p.request, p.server).await
                {
                    debug!(server = %p.server, error = %e, "STUN send failed");
                }
                p.next_send = now + p.rto;
                p.rto = (p.rto * 2).min(Duration::from_millis(1600));
            }
        }
        for r in &mut self.gather.relays {
            if r.client.next_timeout().is_some_and(|t| t <= now) {
                r.client.handle_timeout(now);
            }
        }
        self.service_gathering(now).await
    }

    /// Handles a datagram from a STUN or TURN server; `false` when it is
    /// not one (then it goes to str0m).
    pub(super) async fn gather_packet(
        &mut self,
        idx: usize,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<bool, str0m::RtcError> {
        let now = Instant::now();
        if let Some(r) = self
            .gather
            .relays
            .iter_mut()
            .find(|r| r.socket == idx && r.client.server() == from)
        {
            let relayed = r.client.relayed();
            let unwrapped = r.client.handle_input(now, data);
            if let (Some((peer, payload)), Some(relayed)) = (unwrapped, relayed) {
                self.receive(now, peer, relayed, payload).await?;
            }
            self.service_gathering(now).await?;
            return Ok(true);
        }
        if !stun::is_stun(data) {
            return Ok(false);
        }
        let Some(p) = self
            .gather
            .probes
            .iter_mut()
            .find(|p| !p.done && p.socket == idx && p.server == from)
        else {
            return Ok(false);
        };
        let Some(mapped) = stun::parse_binding_response(data, &p.tid) else {
            return Ok(false);
        };
        p.done = true;
        let base = self.local_addrs.get(idx).copied();
        debug!(?base, %mapped, "server-reflexive address");
        if let Some(base) = base {
            self.add_srflx(mapped, base);
        }
        self.service_gathering(now).await?;
        Ok(true)
    }

    fn add_srflx(&mut self, mapped: SocketAddr, base: SocketAddr) {
        if self.config.relay_only || mapped == base {
            return;
        }
        match Candidate::server_reflexive(mapped, base, "udp") {
            Ok(c) => self.add_local_candidate(c),
            Err(e) => warn!(%mapped, error = %e, "unusable srflx candidate"),
        }
    }

    pub(super) fn add_local_candidate(&mut self, c: Candidate) {
        if let Some(c) = self.rtc.add_local_candidate(c) {
            let c = c.clone();
            debug!(candidate = %c, "local candidate");
            self.candidates.push(c.clone());
            self.gather.late.push(c);
        }
    }

    /// Sends what the TURN clients want sent, handles their events, and
    /// reports late candidates and the end of gathering.
    pub(super) async fn service_gathering(&mut self, now: Instant) -> Result<(), str0m::RtcError> {
        let mut allocated = Vec::new();
        for r in &mut self.gather.relays {
            while let Some(d) = r.client.poll_transmit() {
                if let Some(s) = self.sockets.get(r.socket)
                    && let Err(e) = s.send_to(&d, r.client.server()).await
                {
                    trace!(server = %r.client.server(), error = %e, "TURN send failed");
                }
            }
            while let Some(ev) = r.client.poll_event() {
                match ev {
                    TurnEvent::Allocated {
                        relayed, mapped, ..
                    } => {
                        info!(url = %r.url, %relayed, "TURN relay allocated");
                        r.relayed = Some(relayed);
                        let base = self.local_addrs.get(r.socket).copied();
                        allocated.push((relayed, mapped, base));
                    }
                    TurnEvent::Failed(e) | TurnEvent::Lost(e) => {
                        warn!(url = %r.url, error = %e, "TURN relay unusable");
                        r.error = Some(e.to_string());
                    }
                }
            }
        }
        for (relayed, mapped, base) in allocated {
            let Some(base) = base else { continue };
            match Candidate::relayed(relayed, base, "udp") {
                Ok(c) => self.add_local_candidate(c),
                Err(e) => warn!(%relayed, error = %e, "unusable relay candidate"),
            }
            if let Some(mapped) = mapped {
                self.add_srflx(mapped, base);
            }
        }
        let finished_now = !self.gather.is_done() && self.gather.all_settled();
        if finished_now {
            let took = now.saturating_duration_since(self.gather.started);
            info!(
                ?took,
                candidates = self.candidates.len(),
                "gathering complete"
            );
            self.gather.finished_after = Some(took);
            self.gather.done_tx.send_replace(true);
        }
        if self.gather.sdp_while_gathering && (!self.gather.late.is_empty() || finished_now) {
            let mid = self.local_sections.first().and_then(|s| s.mid.clone());
            let candidates = self
                .gather
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
                complete: finished_now,
            });
            if finished_now {
                self.gather.sdp_while_gathering = false;
            }
        } else if !self.gather.sdp_while_gathering {
            // Every candidate so far is in the SDPs to come.
            self.gather.late.clear();
        }
        if self.candidates.len() == self.gather.candidates_seen {
            return Ok(());
        }
        // str0m pairs the new candidates and may check them right away.
        self.gather.candidates_seen = self.candidates.len();
        self.rtc.handle_input(Input::Timeout(now))?;
        self.drain().await
    }

    /// Relays a packet str0m sends from a relayed candidate; `false` when
    /// `source` is not one.
    pub(super) async fn relay_transmit(
        &mut self,
        source: SocketAddr,
        destination: SocketAddr,
        contents: &[u8],
    ) -> bool {
        let Some(r) = self
            .gather
            .relays
            .iter_mut()
            .find(|r| r.client.relayed() == Some(source))
        else {
            return false;
        };
        r.client.send_to(Instant::now(), destination, contents);
        while let Some(d) = r.client.poll_transmit() {
            if let Some(s) = self.sockets.get(r.socket)
                && let Err(e) = s.send_to(&d, r.client.server()).await
            {
                trace!(server = %r.client.server(), error = %e, "TURN send failed");
            }
        }
        true
    }

    /// Releases the TURN allocations.
    pub(super) async fn close_relays(&mut self) {
        let now = Instant::now();
        for r in &mut self.gather.relays {
            r.client.close(now);
            while let Some(d) = r.client.poll_transmit() {
                if let Some(s) = self.sockets.get(r.socket) {
                    let _ = s.send_to(&d, r.client.server()).await;
                }
            }
        }
    }
}
