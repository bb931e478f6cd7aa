//! Candidate gathering for a whole [`PeerSet`](super::set::PeerSet):
//! server-reflexive addresses from STUN servers (one Binding request per
//! socket and server) and relayed addresses from TURN servers (one
//! [`TurnClient`], i.e. one allocation, per TURN server, shared by every
//! peer of the set: permissions and channels are per remote address).
//!
//! Sans-IO: host names are resolved by the driver (the set asks with
//! [`SetOutput::Resolve`](super::set::SetOutput::Resolve)), requests are
//! retransmitted from the set's timer, answers come in as datagrams.

use super::*;

use crate::ice::{IceServer, IceUrl, IceUrlScheme};
use crate::turn::{TurnClient, TurnEvent, TurnTiming};
use crate::types::RelayStats;

/// At most this many STUN servers and TURN allocations per peer set.
const MAX_STUN_SERVERS: usize = 4;
const MAX_TURN_SERVERS: usize = 2;

/// What a lookup is for.
#[derive(Clone)]
pub(super) enum Target {
    Stun,
    Turn {
        url: String,
        username: String,
        password: String,
    },
}

struct StunProbe {
    server: SocketAddr,
    socket: SocketAddr,
    tid: stun::TransactionId,
    request: Vec<u8>,
    next_send: Instant,
    rto: Duration,
    deadline: Instant,
    done: bool,
}

pub(super) struct Relay {
    pub(super) client: TurnClient,
    /// The local socket address the allocation was made from.
    pub(super) socket: SocketAddr,
    /// host and port of the URL: one allocation per server.
    key: (String, u16),
    url: String,
    relayed: Option<SocketAddr>,
    error: Option<String>,
}

/// A candidate found by the gatherer, for every peer of the set.
pub(super) struct Found {
    pub(super) candidate: Candidate,
    pub(super) relayed: bool,
}

pub(super) struct Gatherer {
    sockets: Vec<SocketAddr>,
    probes: Vec<StunProbe>,
    pub(super) relays: Vec<Relay>,
    /// Lookups asked of the driver: token -> what for.
    lookups: HashMap<u64, ((String, u16), Target)>,
    next_token: u64,
    /// Resolve requests for the driver.
    pub(super) resolve: VecDeque<(u64, String, u16)>,
    /// STUN servers and TURN servers (host, port) ever configured.
    stun_seen: Vec<(String, u16)>,
    turn_seen: Vec<(String, u16)>,
    started: Instant,
    /// When the last round of gathering finished (none running).
    pub(super) done: bool,
    pub(super) finished_after: Option<Duration>,
    /// Candidates found since the set last took them.
    pub(super) found: Vec<Found>,
    /// Relayed addresses of allocations given up (their candidates are not
    /// offered to new peers).
    pub(super) lost: Vec<SocketAddr>,
    stun_timeout: Duration,
}

impl Gatherer {
    pub(super) fn new(sockets: Vec<SocketAddr>, now: Instant) -> Gatherer {
        Gatherer {
            sockets,
            probes: Vec::new(),
            relays: Vec::new(),
            lookups: HashMap::new(),
            next_token: 1,
            resolve: VecDeque::new(),
            stun_seen: Vec::new(),
            turn_seen: Vec::new(),
            started: now,
            done: true,
            finished_after: Some(Duration::ZERO),
            found: Vec::new(),
            lost: Vec::new(),
            stun_timeout: Duration::from_millis(1500),
        }
    }

    /// Adds the STUN and TURN servers of a peer's configuration that the set
    /// does not use yet. Servers already known (also failed ones) are not
    /// tried again.
    pub(super) fn add_servers(&mut self, config: &PeerConfig, now: Instant) {
        self.stun_timeout = config.stun_timeout;
        let mut stun_targets: Vec<(String, u16)> = Vec::new();
        if let Some(s) = config.stun_server {
            stun_targets.push((s.ip().to_string(), s.port()));
        }
        let mut turn_targets: Vec<(IceUrl, String, String, String)> = Vec::new();
        for server in &config.ice_servers {
            add_targets(server, &mut stun_targets, &mut turn_targets);
        }
        let mut started = false;
        for (host, port) in stun_targets {
            let key = (host.clone(), port);
            if self.stun_seen.contains(&key) || self.stun_seen.len() >= MAX_STUN_SERVERS {
                continue;
            }
            self.stun_seen.push(key);
            started |= self.lookup(host, port, Target::Stun, now);
        }
        for (u, url, username, password) in turn_targets {
            let key = (u.host.clone(), u.port);
            if self.turn_seen.contains(&key) {
                // Known: shared, unless its allocation failed or was lost;
                // then this peer's (perhaps newer) credentials try again.
                let Some(i) = self.relays.iter().position(|r| {
                    r.key == key && r.client.settled() && r.client.relayed().is_none()
                }) else {
                    continue;
                };
                let old = self.relays.remove(i);
                if let Some(addr) = old.relayed {
                    self.lost.push(addr);
                }
                debug!(url = %old.url, "allocating again on a TURN server whose allocation failed");
            } else if self.turn_seen.len() >= MAX_TURN_SERVERS {
                continue;
            } else {
                self.turn_seen.push(key);
            }
            started |= self.lookup(
                u.host,
                u.port,
                Target::Turn {
                    url,
                    username,
                    password,
                },
                now,
            );
        }
        if config.relay_only && self.turn_seen.is_empty() {
            warn!("relay_only without a usable TURN server: this peer has no candidates");
        }
        if started && self.done {
            self.done = false;
            self.started = now;
            self.finished_after = None;
        }
    }

    /// `true` if work started (a lookup was asked or, for an IP literal,
    /// done right away).
    fn lookup(&mut self, host: String, port: u16, target: Target, now: Instant) -> bool {
        match host.parse::<IpAddr>() {
            Ok(ip) => {
                self.resolved(target, (host, port), vec![SocketAddr::new(ip, port)], now);
            }
            Err(_) => {
                let token = self.next_token;
                self.next_token += 1;
                self.lookups.insert(token, ((host.clone(), port), target));
                self.resolve.push_back((token, host, port));
            }
        }
        true
    }

    /// The driver resolved a host name (an empty list: it could not).
    pub(super) fn on_resolved(&mut self, token: u64, addrs: Vec<SocketAddr>, now: Instant) {
        let Some((key, target)) = self.lookups.remove(&token) else {
            return;
        };
        if addrs.is_empty() {
            warn!(host = %key.0, "cannot resolve ICE server");
        }
        self.resolved(target, key, addrs, now);
    }

    fn resolved(
        &mut self,
        target: Target,
        _key: (String, u16),
        addrs: Vec<SocketAddr>,
        now: Instant,
    ) {
        match target {
            Target::Stun => {
                // One Binding request per socket, to the first server
                // address of its family.
                for local in &self.sockets {
                    let Some(server) = addrs.iter().find(|a| a.is_ipv4() == local.is_ipv4()) else {
                        continue;
                    };
                    if self
                        .probes
                        .iter()
                        .any(|p| p.socket == *local && p.server == *server)
                    {
                        continue;
                    }
                    let tid = stun::new_transaction_id();
                    self.probes.push(StunProbe {
                        server: *server,
                        socket: *local,
                        tid,
                        request: stun::binding_request(&tid),
                        next_send: now,
                        rto: Duration::from_millis(100),
                        deadline: now + self.stun_timeout,
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
                let pick = self.sockets.iter().find_map(|local| {
                    addrs
                        .iter()
                        .find(|a| a.is_ipv4() == local.is_ipv4())
                        .map(|a| (*local, *a))
                });
                match pick {
                    Some((socket, server)) => {
                        debug!(%url, %server, "allocating on TURN server");
                        let timing = TurnTiming {
                            allocate_timeout: self.stun_timeout,
                            ..TurnTiming::default()
                        };
                        self.relays.push(Relay {
                            client: TurnClient::new(server, &username, &password, timing, now),
                            socket,
                            key: _key,
                            url,
                            relayed: None,
                            error: None,
                        });
                    }
                    None => warn!(%url, "no local socket can reach this TURN server"),
                }
            }
        }
    }

    fn all_settled(&self) -> bool {
        self.lookups.is_empty()
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

    /// Retransmits and times out probes; runs the TURN clients' timers.
    pub(super) fn handle_timeout(&mut self, now: Instant, out: &mut VecDeque<Transmit>) {
        for p in &mut self.probes {
            if p.done {
                continue;
            }
            if now >= p.deadline {
                warn!(server = %p.server, "no STUN answer");
                p.done = true;
                continue;
            }
            if now >= p.next_send {
                out.push_back(Transmit {
                    source: p.socket,
                    destination: p.server,
                    contents: p.request.clone(),
                });
                p.next_send = now + p.rto;
                p.rto = (p.rto * 2).min(Duration::from_millis(1600));
            }
        }
        for r in &mut self.relays {
            if r.client.next_timeout().is_some_and(|t| t <= now) {
                r.client.handle_timeout(now);
            }
        }
    }

    /// The relay that receives on `local` from `from`, if any.
    pub(super) fn relay_for(&self, local: SocketAddr, from: SocketAddr) -> Option<usize> {
        self.relays
            .iter()
            .position(|r| r.socket == local && r.client.server() == from)
    }

    /// The relay whose relayed address is `addr`.
    pub(super) fn relay_with_address(&self, addr: SocketAddr) -> Option<usize> {
        self.relays
            .iter()
            .position(|r| r.client.relayed() == Some(addr))
    }

    /// A STUN Binding answer to one of our probes: `true` if it was one.
    pub(super) fn probe_answer(
        &mut self,
        local: SocketAddr,
        from: SocketAddr,
        data: &[u8],
    ) -> bool {
        let Some(p) = self
            .probes
            .iter_mut()
            .find(|p| !p.done && p.socket == local && p.server == from)
        else {
            return false;
        };
        let Some(mapped) = stun::parse_binding_response(data, &p.tid) else {
            return false;
        };
        p.done = true;
        debug!(base = %local, %mapped, "server-reflexive address");
        self.add_srflx(mapped, local);
        true
    }

    fn add_srflx(&mut self, mapped: SocketAddr, base: SocketAddr) {
        if mapped == base {
            return;
        }
        match Candidate::server_reflexive(mapped, base, "udp") {
            Ok(c) => self.found.push(Found {
                candidate: c,
                relayed: false,
            }),
            Err(e) => warn!(%mapped, error = %e, "unusable srflx candidate"),
        }
    }

    /// Moves what the TURN clients want sent to `out`, handles their events
    /// and notices the end of gathering (`true` when it ended now).
    pub(super) fn service(&mut self, now: Instant, out: &mut VecDeque<Transmit>) -> bool {
        let mut allocated = Vec::new();
        for r in &mut self.relays {
            while let Some(d) = r.client.poll_transmit() {
                out.push_back(Transmit {
                    source: r.socket,
                    destination: r.client.server(),
                    contents: d,
                });
            }
            while let Some(ev) = r.client.poll_event() {
                match ev {
                    TurnEvent::Allocated {
                        relayed, mapped, ..
                    } => {
                        info!(url = %r.url, %relayed, "TURN relay allocated");
                        r.relayed = Some(relayed);
                        allocated.push((relayed, mapped, r.socket));
                    }
                    TurnEvent::Failed(e) | TurnEvent::Lost(e) => {
                        warn!(url = %r.url, error = %e, "TURN relay unusable");
                        r.error = Some(e.to_string());
                        if let Some(addr) = r.relayed {
                            self.lost.push(addr);
                        }
                    }
                }
            }
        }
        for (relayed, mapped, base) in allocated {
            match Candidate::relayed(relayed, base, "udp") {
                Ok(c) => self.found.push(Found {
                    candidate: c,
                    relayed: true,
                }),
                Err(e) => warn!(%relayed, error = %e, "unusable relay candidate"),
            }
            if let Some(mapped) = mapped {
                self.add_srflx(mapped, base);
            }
        }
        if !self.done && self.all_settled() {
            let took = now.saturating_duration_since(self.started);
            info!(?took, "gathering complete");
            self.done = true;
            self.finished_after = Some(took);
            return true;
        }
        false
    }

    /// Number of TURN allocations in place.
    pub(super) fn allocations(&self) -> usize {
        self.relays
            .iter()
            .filter(|r| r.client.relayed().is_some())
            .count()
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

    /// Releases the TURN allocations (Refresh with lifetime 0).
    pub(super) fn close(&mut self, now: Instant, out: &mut VecDeque<Transmit>) {
        for r in &mut self.relays {
            r.client.close(now);
            while let Some(d) = r.client.poll_transmit() {
                out.push_back(Transmit {
                    source: r.socket,
                    destination: r.client.server(),
                    contents: d,
                });
            }
        }
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
