//! A sans-IO TURN client (RFC 5766 / RFC 8656) over UDP.
//!
//! One [`TurnClient`] holds one allocation on one server. The peer's task
//! feeds it the datagrams that come from the server
//! ([`TurnClient::handle_input`]), its timer ([`TurnClient::handle_timeout`])
//! and the packets to relay ([`TurnClient::send_to`]); it sends what
//! [`TurnClient::poll_transmit`] returns to the server and handles
//! [`TurnClient::poll_event`].
//!
//! - Allocate with long-term credentials: the first request goes without,
//!   the 401 answer gives realm and nonce, the request is repeated with
//!   USERNAME, REALM, NONCE, MESSAGE-INTEGRITY and FINGERPRINT. 438 (stale
//!   nonce) takes the new nonce and repeats. Authenticated success responses
//!   must carry a valid MESSAGE-INTEGRITY.
//! - Refresh shortly before the allocation expires (and `Refresh` with
//!   lifetime 0 on [`TurnClient::close`]).
//! - CreatePermission for a peer's IP when a packet goes to it (packets wait
//!   in a small queue until it is installed), refreshed while in use.
//! - ChannelBind per peer address: Send indications until the channel is
//!   bound, then ChannelData; refreshed while in use.
//! - Receive: ChannelData and Data indications become (peer, payload).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tracing::{debug, trace, warn};

use crate::stun::{
    self, Class, Message, MessageBuilder, TransactionId, attr, method, new_transaction_id,
};

/// Why a TURN allocation could not be made or was lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TurnError {
    /// The server did not answer in time.
    #[error("no answer from TURN server {server} within {after:?}")]
    Timeout {
        /// The server.
        server: SocketAddr,
        /// How long we tried.
        after: Duration,
    },
    /// The server refused our credentials.
    #[error("TURN server {server} refused the credentials: {code} {reason}")]
    Unauthorized {
        /// The server.
        server: SocketAddr,
        /// The error code (401 or 441).
        code: u16,
        /// The server's reason phrase.
        reason: String,
    },
    /// The server answered with another error.
    #[error("TURN server {server} answered {code} {reason}")]
    Server {
        /// The server.
        server: SocketAddr,
        /// The error code.
        code: u16,
        /// The server's reason phrase.
        reason: String,
    },
    /// The server's success answer lacked something required or was malformed.
    #[error("TURN server {server} sent an unusable answer: {what}")]
    BadResponse {
        /// The server.
        server: SocketAddr,
        /// What was wrong.
        what: String,
    },
}

/// Timing of the client; tests shorten it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TurnTiming {
    /// First retransmission timeout (doubles per retransmission).
    pub rto: Duration,
    /// Largest retransmission timeout.
    pub max_rto: Duration,
    /// How long an Allocate (including the authentication round) may take.
    pub allocate_timeout: Duration,
    /// How long any other request may take.
    pub request_timeout: Duration,
    /// How long before expiry allocations, permissions and channels are
    /// refreshed (at most half of their lifetime).
    pub refresh_margin: Duration,
}

impl Default for TurnTiming {
    fn default() -> Self {
        Self {
            rto: Duration::from_millis(100),
            max_rto: Duration::from_millis(1600),
            allocate_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            refresh_margin: Duration::from_secs(60),
        }
    }
}

/// Permission lifetime (RFC 8656 section 9: 300 s, not negotiable).
const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel binding lifetime (RFC 8656 section 12: 600 s).
const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// Packets waiting for a permission, per peer IP.
const MAX_QUEUED: usize = 32;
/// Authentication retries (stale nonce) per request.
const MAX_AUTH_RETRIES: u8 = 3;
/// Requested transport UDP (protocol number 17).
const TRANSPORT_UDP: [u8; 4] = [17, 0, 0, 0];

/// What the client reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TurnEvent {
    /// The allocation exists: `relayed` is the relay address, `mapped` our
    /// address as the server sees it (server-reflexive), if it said.
    Allocated {
        relayed: SocketAddr,
        mapped: Option<SocketAddr>,
        lifetime: Duration,
    },
    /// The allocation could not be made.
    Failed(TurnError),
    /// An existing allocation was lost (refresh failed).
    Lost(TurnError),
}

/// Counters of one allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TurnCounters {
    pub packets_sent: u64,
    pub bytes_sent: u64,
    pub packets_received: u64,
    pub bytes_received: u64,
    pub channel_data_sent: u64,
    pub channel_data_received: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    Allocate,
    Refresh { lifetime: u32 },
    Permission { ip: IpAddr },
    ChannelBind { channel: u16, peer: SocketAddr },
}

struct Transaction {
    tid: TransactionId,
    request: Request,
    bytes: Vec<u8>,
    authenticated: bool,
    auth_retries: u8,
    next_send: Instant,
    rto: Duration,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Allocate in flight.
    Allocating,
    Allocated {
        relayed: SocketAddr,
        expires: Instant,
        refresh_at: Instant,
    },
    /// Failed, lost or closed: nothing more is sent.
    Done,
}

struct Permission {
    /// Installed until, once the server confirmed.
    until: Option<Instant>,
    pending: bool,
    last_used: Instant,
    queue: Vec<(SocketAddr, Vec<u8>)>,
}

struct Channel {
    number: u16,
    until: Option<Instant>,
    pending: bool,
    last_used: Instant,
}

/// One TURN allocation (see the module docs).
pub(crate) struct TurnClient {
    server: SocketAddr,
    username: String,
    password: String,
    timing: TurnTiming,
    state: State,
    realm: Option<String>,
    nonce: Option<String>,
    key: Option<[u8; 16]>,
    transactions: Vec<Transaction>,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<TurnEvent>,
    permissions: HashMap<IpAddr, Permission>,
    channels: HashMap<SocketAddr, Channel>,
    by_channel: HashMap<u16, SocketAddr>,
    next_channel: u16,
    counters: TurnCounters,
}

impl TurnClient {
    /// Starts allocating on `server` with these long-term credentials.
    pub fn new(
        server: SocketAddr,
        username: &str,
        password: &str,
        timing: TurnTiming,
        now: Instant,
    ) -> Self {
        let mut c = Self {
            server,
            username: username.to_string(),
            password: password.to_string(),
            timing,
            state: State::Allocating,
            realm: None,
            nonce: None,
            key: None,
            transactions: Vec::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            permissions: HashMap::new(),
            channels: HashMap::new(),
            by_channel: HashMap::new(),
            next_channel: 0x4000,
            counters: TurnCounters::default(),
        };
        c.start(Request::Allocate, now, 0, None);
        c
    }

    /// The TURN server's address.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The relayed address, once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        match self.state {
            State::Allocated { relayed, .. } => Some(relayed),
            _ => None,
        }
    }

    /// Whether allocating is over (allocated, failed or closed).
    pub fn settled(&self) -> bool {
        self.state != State::Allocating
    }

    pub fn counters(&self) -> TurnCounters {
        self.counters
    }

    /// Peer addresses with a bound channel.
    pub fn bound_channels(&self) -> usize {
        self.channels.values().filter(|c| c.until.is_some()).count()
    }

    /// Peer IPs with an installed permission.
    pub fn permissions(&self) -> usize {
        self.permissions
            .values()
            .filter(|p| p.until.is_some())
            .count()
    }

    /// The next datagram to send to the server.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<TurnEvent> {
        self.events.pop_front()
    }

    /// When [`TurnClient::handle_timeout`] wants to run next.
    pub fn next_timeout(&self) -> Option<Instant> {
        let mut t = self
            .transactions
            .iter()
            .map(|t| t.next_send.min(t.deadline))
            .min();
        let mut consider = |x: Instant| t = Some(t.map_or(x, |t| t.min(x)));
        if let State::Allocated { refresh_at, .. } = self.state {
            consider(refresh_at);
            // Entries with a request in flight wake through the transaction.
            for p in self.permissions.values().filter(|p| !p.pending) {
                if let Some(until) = p.until {
                    consider(
                        until
                            .checked_sub(self.margin(PERMISSION_LIFETIME))
                            .unwrap_or(until),
                    );
                }
            }
            for c in self.channels.values().filter(|c| !c.pending) {
                if let Some(until) = c.until {
                    consider(
                        until
                            .checked_sub(self.margin(CHANNEL_LIFETIME))
                            .unwrap_or(until),
                    );
                }
            }
        }
        t
    }

    fn margin(&self, lifetime: Duration) -> Duration {
        self.timing.refresh_margin.min(lifetime / 2)
    }

    /// Retransmits, times out and refreshes.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Retransmissions and timeouts.
        let mut expired = Vec::new();
        for t in &mut self.transactions {
            if now >= t.deadline {
                expired.push(t.tid);
            } else if now >= t.next_send {
                trace!(server = %self.server, request = ?t.request, "TURN retransmit");
                self.out.push_back(t.bytes.clone());
                t.rto = (t.rto * 2).min(self.timing.max_rto);
                t.next_send = now + t.rto;
            }
        }
        for tid in expired {
            if let Some(i) = self.transactions.iter().position(|t| t.tid == tid) {
                let t = self.transactions.remove(i);
                let after = match t.request {
                    Request::Allocate => self.timing.allocate_timeout,
                    _ => self.timing.request_timeout,
                };
                let e = TurnError::Timeout {
                    server: self.server,
                    after,
                };
                self.request_failed(&t.request, e, now);
            }
        }
        let State::Allocated {
            expires,
            refresh_at,
            ..
        } = self.state
        else {
            return;
        };
        if now >= expires {
            warn!(server = %self.server, "TURN allocation expired");
            self.finish(TurnEvent::Lost(TurnError::Timeout {
                server: self.server,
                after: self.timing.request_timeout,
            }));
            return;
        }
        if now >= refresh_at && !self.in_flight(|r| matches!(r, Request::Refresh { .. })) {
            debug!(server = %self.server, "refreshing TURN allocation");
            if let State::Allocated { relayed, .. } = self.state {
                // The transaction's timers take over until it ends.
                self.state = State::Allocated {
                    relayed,
                    expires,
                    refresh_at: expires,
                };
            }
            self.start(Request::Refresh { lifetime: 600 }, now, 0, None);
        }
        // Permissions and channels in use are refreshed shortly before they
        // expire; unused ones are dropped then (a later packet makes them
        // again).
        let perm_margin = self.margin(PERMISSION_LIFETIME);
        let mut refresh_perms = Vec::new();
        self.permissions.retain(|ip, p| {
            if p.pending {
                return true;
            }
            let Some(until) = p.until else { return false };
            if now + perm_margin < until {
                return true;
            }
            if now.saturating_duration_since(p.last_used) < PERMISSION_LIFETIME {
                p.pending = true;
                refresh_perms.push(*ip);
                true
            } else {
                debug!(%ip, "unused TURN permission dropped");
                false
            }
        });
        for ip in refresh_perms {
            self.start(Request::Permission { ip }, now, 0, None);
        }
        let chan_margin = self.margin(CHANNEL_LIFETIME);
        let mut refresh_chans = Vec::new();
        let mut lapsed = Vec::new();
        for (peer, c) in &mut self.channels {
            if c.pending {
                continue;
            }
            let Some(until) = c.until else { continue };
            if now + chan_margin < until {
                continue;
            }
            if now.saturating_duration_since(c.last_used) < CHANNEL_LIFETIME {
                c.pending = true;
                refresh_chans.push((c.number, *peer));
            } else {
                lapsed.push(*peer);
            }
        }
        for peer in lapsed {
            // Numbers are never reused, so a lapsing channel cannot be
            // confused with a new one.
            if let Some(c) = self.channels.remove(&peer) {
                debug!(%peer, channel = c.number, "unused TURN channel dropped");
                self.by_channel.remove(&c.number);
            }
        }
        for (channel, peer) in refresh_chans {
            self.start(Request::ChannelBind { channel, peer }, now, 0, None);
        }
    }

    fn in_flight(&self, f: impl Fn(&Request) -> bool) -> bool {
        self.transactions.iter().any(|t| f(&t.request))
    }

    /// A datagram from the server. Returns the relayed payload and the peer
    /// it came from, or `None` when it was a response (or garbage).
    pub fn handle_input<'a>(
        &mut self,
        now: Instant,
        data: &'a [u8],
    ) -> Option<(SocketAddr, &'a [u8])> {
        if self.state == State::Done {
            return None;
        }
        match data.first() {
            Some(0x40..=0x7f) => {
                let (channel, payload) = match stun::decode_channel_data(data) {
                    Ok(x) => x,
                    Err(e) => {
                        trace!(error = %e, "bad ChannelData");
                        return None;
                    }
                };
                let Some(peer) = self.by_channel.get(&channel).copied() else {
                    trace!(channel, "ChannelData on an unknown channel");
                    return None;
                };
                self.counters.packets_received += 1;
                self.counters.bytes_received += payload.len() as u64;
                self.counters.channel_data_received += 1;
                Some((peer, payload))
            }
            Some(0x00..=0x3f) => {
                let msg = match Message::decode(data) {
                    Ok(m) => m,
                    Err(e) => {
                        trace!(error = %e, "bad STUN message from the TURN server");
                        return None;
                    }
                };
                if msg.class == Class::Indication && msg.method == method::DATA {
                    let peer = msg.address(attr::XOR_PEER_ADDRESS).ok().flatten()?;
                    let payload = msg.get(attr::DATA)?;
                    self.counters.packets_received += 1;
                    self.counters.bytes_received += payload.len() as u64;
                    return Some((peer, payload));
                }
                if matches!(msg.class, Class::Success | Class::Error) {
                    self.handle_response(&msg, now);
                }
                None
            }
            _ => None,
        }
    }

    /// Relays `payload` to `peer`. Without a permission for the peer's IP the
    /// packet waits (at most a few per IP) until the permission is installed.
    pub fn send_to(&mut self, now: Instant, peer: SocketAddr, payload: &[u8]) {
        if self.relayed().is_none_or(|r| r.is_ipv4() != peer.is_ipv4()) {
            self.counters.dropped += 1;
            return;
        }
        let ip = peer.ip();
        let installed = match self.permissions.get_mut(&ip) {
            Some(p) => {
                p.last_used = now;
                if p.until.is_some_and(|u| u > now) {
                    true
                } else {
                    if p.queue.len() < MAX_QUEUED {
                        p.queue.push((peer, payload.to_vec()));
                    } else {
                        self.counters.dropped += 1;
                    }
                    if !p.pending {
                        p.pending = true;
                        self.start(Request::Permission { ip }, now, 0, None);
                    }
                    false
                }
            }
            None => {
                debug!(%ip, "creating TURN permission");
                self.permissions.insert(
                    ip,
                    Permission {
                        until: None,
                        pending: true,
                        last_used: now,
                        queue: vec![(peer, payload.to_vec())],
                    },
                );
                self.start(Request::Permission { ip }, now, 0, None);
                false
            }
        };
        if installed {
            self.relay(now, peer, payload);
        }
    }

    fn relay(&mut self, now: Instant, peer: SocketAddr, payload: &[u8]) {
        self.counters.packets_sent += 1;
        self.counters.bytes_sent += payload.len() as u64;
        let mut bind = None;
        let bound = match self.channels.get_mut(&peer) {
            Some(c) => {
                c.last_used = now;
                c.until.filter(|u| *u > now).map(|_| c.number)
            }
            // Numbers are never reused; 16384 peers per allocation is more
            // than ICE ever tries.
            None if self.next_channel <= 0x7fff => {
                let number = self.next_channel;
                self.next_channel += 1;
                self.channels.insert(
                    peer,
                    Channel {
                        number,
                        until: None,
                        pending: true,
                        last_used: now,
                    },
                );
                bind = Some(number);
                None
            }
            None => None,
        };
        let datagram = match bound {
            Some(number) => {
                self.counters.channel_data_sent += 1;
                stun::encode_channel_data(number, payload)
            }
            None => MessageBuilder::new(method::SEND, Class::Indication, new_transaction_id())
                .address(attr::XOR_PEER_ADDRESS, peer)
                .attr(attr::DATA, payload)
                .finish(),
        };
        self.out.push_back(datagram);
        if let Some(channel) = bind {
            self.start(Request::ChannelBind { channel, peer }, now, 0, None);
        }
    }

    /// Deletes the allocation (Refresh with lifetime 0, sent once) and stops.
    pub fn close(&mut self, now: Instant) {
        if let State::Allocated { .. } = self.state {
            debug!(server = %self.server, "releasing TURN allocation");
            self.start(Request::Refresh { lifetime: 0 }, now, 0, None);
        }
        self.state = State::Done;
        self.transactions.clear();
    }

    /// Sends a request; `deadline` carries over the one of a request
    /// repeated for authentication.
    fn start(
        &mut self,
        request: Request,
        now: Instant,
        auth_retries: u8,
        deadline: Option<Instant>,
    ) {
        let tid = new_transaction_id();
        let (bytes, authenticated) = self.encode(&request, tid);
        let timeout = match request {
            Request::Allocate => self.timing.allocate_timeout,
            _ => self.timing.request_timeout,
        };
        self.out.push_back(bytes.clone());
        let deadline = deadline.unwrap_or(now + timeout);
        self.transactions.retain(|t| t.request != request);
        self.transactions.push(Transaction {
            tid,
            request,
            bytes,
            authenticated,
            auth_retries,
            next_send: now + self.timing.rto,
            rto: self.timing.rto,
            deadline,
        });
    }

    fn encode(&self, request: &Request, tid: TransactionId) -> (Vec<u8>, bool) {
        let b = match request {
            Request::Allocate => MessageBuilder::new(method::ALLOCATE, Class::Request, tid)
                .attr(attr::REQUESTED_TRANSPORT, &TRANSPORT_UDP),
            Request::Refresh { lifetime } => {
                MessageBuilder::new(method::REFRESH, Class::Request, tid)
                    .u32(attr::LIFETIME, *lifetime)
            }
            Request::Permission { ip } => {
                MessageBuilder::new(method::CREATE_PERMISSION, Class::Request, tid)
                    .address(attr::XOR_PEER_ADDRESS, SocketAddr::new(*ip, 0))
            }
            Request::ChannelBind { channel, peer } => {
                MessageBuilder::new(method::CHANNEL_BIND, Class::Request, tid)
                    .attr(
                        attr::CHANNEL_NUMBER,
                        &[(channel >> 8) as u8, *channel as u8, 0, 0],
                    )
                    .address(attr::XOR_PEER_ADDRESS, *peer)
            }
        };
        match (&self.key, &self.realm, &self.nonce) {
            (Some(key), Some(realm), Some(nonce)) => (
                b.attr(attr::USERNAME, self.username.as_bytes())
                    .attr(attr::REALM, realm.as_bytes())
                    .attr(attr::NONCE, nonce.as_bytes())
                    .integrity(key)
                    .fingerprint(),
                true,
            ),
            _ => (b.fingerprint(), false),
        }
    }

    fn handle_response(&mut self, msg: &Message<'_>, now: Instant) {
        let Some(i) = self.transactions.iter().position(|t| t.tid == msg.tid) else {
            trace!("TURN response to an unknown transaction");
            return;
        };
        let Some(t) = self.transactions.get(i) else {
            return;
        };
        let expected_method = match t.request {
            Request::Allocate => method::ALLOCATE,
            Request::Refresh { .. } => method::REFRESH,
            Request::Permission { .. } => method::CREATE_PERMISSION,
            Request::ChannelBind { .. } => method::CHANNEL_BIND,
        };
        if msg.method != expected_method {
            return;
        }
        // Responses to authenticated requests must prove they come from the
        // server that knows the key (error responses other than 401/438
        // carry MESSAGE-INTEGRITY too, but some servers omit it: accept
        // those, they only make us give up).
        if msg.class == Class::Success
            && t.authenticated
            && !self.key.is_some_and(|k| msg.check_integrity(&k))
        {
            debug!(server = %self.server, "TURN response with a bad MESSAGE-INTEGRITY ignored");
            return;
        }
        let t = self.transactions.remove(i);
        match msg.class {
            Class::Success => self.on_success(t.request, msg, now),
            _ => self.on_error(t, msg, now),
        }
    }

    fn on_success(&mut self, request: Request, msg: &Message<'_>, now: Instant) {
        let lifetime = || {
            msg.u32(attr::LIFETIME)
                .ok()
                .flatten()
                .map(|s| Duration::from_secs(s as u64))
        };
        match request {
            Request::Allocate => {
                let relayed = match msg.address(attr::XOR_RELAYED_ADDRESS) {
                    Ok(Some(a)) => a,
                    Ok(None) | Err(_) => {
                        self.finish(TurnEvent::Failed(TurnError::BadResponse {
                            server: self.server,
                            what: "no valid XOR-RELAYED-ADDRESS".into(),
                        }));
                        return;
                    }
                };
                let mapped = msg.address(attr::XOR_MAPPED_ADDRESS).ok().flatten();
                let lifetime = lifetime().unwrap_or(Duration::from_secs(600));
                debug!(server = %self.server, %relayed, ?mapped, ?lifetime, "TURN allocation");
                self.state = State::Allocated {
                    relayed,
                    expires: now + lifetime,
                    refresh_at: now + lifetime - self.margin(lifetime),
                };
                self.events.push_back(TurnEvent::Allocated {
                    relayed,
                    mapped,
                    lifetime,
                });
            }
            Request::Refresh { .. } => {
                if let State::Allocated { relayed, .. } = self.state {
                    let lifetime = lifetime().unwrap_or(Duration::from_secs(600));
                    debug!(server = %self.server, ?lifetime, "TURN allocation refreshed");
                    self.state = State::Allocated {
                        relayed,
                        expires: now + lifetime,
                        refresh_at: now + lifetime - self.margin(lifetime),
                    };
                }
            }
            Request::Permission { ip } => {
                let mut queued = Vec::new();
                if let Some(p) = self.permissions.get_mut(&ip) {
                    trace!(%ip, "TURN permission installed");
                    p.until = Some(now + PERMISSION_LIFETIME);
                    p.pending = false;
                    queued = std::mem::take(&mut p.queue);
                }
                for (peer, payload) in queued {
                    self.relay(now, peer, &payload);
                }
            }
            Request::ChannelBind { channel, peer } => {
                if let Some(c) = self.channels.get_mut(&peer) {
                    trace!(%peer, channel, "TURN channel bound");
                    c.until = Some(now + CHANNEL_LIFETIME);
                    c.pending = false;
                    self.by_channel.insert(channel, peer);
                }
                // A channel binding also installs/refreshes the permission.
                if let Some(p) = self.permissions.get_mut(&peer.ip()) {
                    p.until = Some(now + PERMISSION_LIFETIME);
                }
            }
        }
    }

    fn on_error(&mut self, t: Transaction, msg: &Message<'_>, now: Instant) {
        let (code, reason) = msg
            .error_code()
            .ok()
            .flatten()
            .unwrap_or((0, "malformed error".into()));
        let realm = msg.text(attr::REALM);
        let nonce = msg.text(attr::NONCE);
        let retry_auth = match code {
            // The first (unauthenticated) request learns realm and nonce.
            401 if !t.authenticated => true,
            // Stale nonce: take the new one.
            438 => t.auth_retries < MAX_AUTH_RETRIES,
            _ => false,
        };
        if retry_auth && let Some(nonce) = nonce {
            if let Some(realm) = realm {
                self.key = Some(stun::long_term_key(&self.username, &realm, &self.password));
                self.realm = Some(realm);
            }
            self.nonce = Some(nonce);
            if self.key.is_some() {
                debug!(server = %self.server, code, request = ?t.request, "TURN authenticating");
                self.start(t.request, now, t.auth_retries + 1, Some(t.deadline));
                return;
            }
        }
        let e = match code {
            401 | 441 => TurnError::Unauthorized {
                server: self.server,
                code,
                reason,
            },
            _ => TurnError::Server {
                server: self.server,
                code,
                reason,
            },
        };
        self.request_failed(&t.request, e, now);
    }

    fn request_failed(&mut self, request: &Request, e: TurnError, now: Instant) {
        match request {
            Request::Allocate => {
                warn!(error = %e, "TURN allocation failed");
                self.finish(TurnEvent::Failed(e));
            }
            Request::Refresh { lifetime: 0 } => {}
            Request::Refresh { .. } => {
                // Keep going until the allocation really expires: retry once
                // the next timer fires.
                warn!(error = %e, "TURN refresh failed");
                if let State::Allocated {
                    relayed, expires, ..
                } = self.state
                {
                    if now + self.timing.rto >= expires {
                        self.finish(TurnEvent::Lost(e));
                    } else {
                        self.state = State::Allocated {
                            relayed,
                            expires,
                            refresh_at: now + (expires - now) / 2,
                        };
                    }
                }
            }
            Request::Permission { ip } => {
                // Dropped: the next packet to this IP asks again.
                debug!(%ip, error = %e, "TURN permission failed");
                if let Some(p) = self.permissions.remove(ip) {
                    self.counters.dropped += p.queue.len() as u64;
                }
            }
            Request::ChannelBind { peer, channel } => {
                debug!(%peer, channel, error = %e, "TURN channel bind failed");
                // This peer keeps using Send indications; the entry stays
                // (unbound) so that no new bind is tried.
                if let Some(c) = self.channels.get_mut(peer) {
                    c.pending = false;
                    c.until = None;
                }
            }
        }
    }

    fn finish(&mut self, ev: TurnEvent) {
        self.state = State::Done;
        self.transactions.clear();
        self.events.push_back(ev);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const SERVER: &str = "198.51.100.1:3478";
    const RELAYED: &str = "198.51.100.1:50000";
    const MAPPED: &str = "203.0.113.9:40000";
    const PEER: &str = "192.0.2.7:6000";

    /// A scripted server: answers requests like a TURN server would.
    struct FakeServer {
        realm: &'static str,
        nonce: String,
        key: [u8; 16],
        lifetime: u32,
        channels: HashMap<u16, SocketAddr>,
        permissions: Vec<IpAddr>,
        seen: Vec<(u16, bool)>,
        refreshes: Vec<u32>,
        sent: Vec<(SocketAddr, Vec<u8>)>,
    }

    impl FakeServer {
        fn new(lifetime: u32) -> Self {
            Self {
                realm: "example.org",
                nonce: "nonce-1".into(),
                key: stun::long_term_key("user", "example.org", "secret"),
                lifetime,
                channels: HashMap::new(),
                permissions: Vec::new(),
                seen: Vec::new(),
                refreshes: Vec::new(),
                sent: Vec::new(),
            }
        }

        /// Answers one datagram from the client.
        fn answer(&mut self, data: &[u8]) -> Option<Vec<u8>> {
            if let Ok((ch, payload)) = stun::decode_channel_data(data) {
                let peer = self.channels[&ch];
                self.sent.push((peer, payload.to_vec()));
                return None;
            }
            let m = Message::decode(data).unwrap();
            let authed = m.get(attr::MESSAGE_INTEGRITY).is_some();
            self.seen.push((m.method, authed));
            if m.class == Class::Indication {
                assert_eq!(m.method, method::SEND);
                let peer = m.address(attr::XOR_PEER_ADDRESS).unwrap().unwrap();
                assert!(self.permissions.contains(&peer.ip()), "no permission");
                self.sent.push((peer, m.get(attr::DATA).unwrap().to_vec()));
                return None;
            }
            if !authed {
                return Some(
                    MessageBuilder::new(m.method, Class::Error, m.tid)
                        .error_code(401, "Unauthorized")
                        .attr(attr::REALM, self.realm.as_bytes())
                        .attr(attr::NONCE, self.nonce.as_bytes())
                        .fingerprint(),
                );
            }
            assert!(m.check_integrity(&self.key));
            if m.text(attr::NONCE).as_deref() != Some(self.nonce.as_str()) {
                return Some(
                    MessageBuilder::new(m.method, Class::Error, m.tid)
                        .error_code(438, "Stale Nonce")
                        .attr(attr::REALM, self.realm.as_bytes())
                        .attr(attr::NONCE, self.nonce.as_bytes())
                        .fingerprint(),
                );
            }
            let b = MessageBuilder::new(m.method, Class::Success, m.tid);
            let b = match m.method {
                method::ALLOCATE => {
                    assert_eq!(m.get(attr::REQUESTED_TRANSPORT), Some(&TRANSPORT_UDP[..]));
                    b.address(attr::XOR_RELAYED_ADDRESS, RELAYED.parse().unwrap())
                        .address(attr::XOR_MAPPED_ADDRESS, MAPPED.parse().unwrap())
                        .u32(attr::LIFETIME, self.lifetime)
                }
                method::REFRESH => {
                    let l = m.u32(attr::LIFETIME).unwrap().unwrap();
                    self.refreshes.push(l);
                    b.u32(attr::LIFETIME, l.min(self.lifetime))
                }
                method::CREATE_PERMISSION => {
                    let peer = m.address(attr::XOR_PEER_ADDRESS).unwrap().unwrap();
                    self.permissions.push(peer.ip());
                    b
                }
                method::CHANNEL_BIND => {
                    let v = m.get(attr::CHANNEL_NUMBER).unwrap();
                    let ch = u16::from_be_bytes([v[0], v[1]]);
                    let peer = m.address(attr::XOR_PEER_ADDRESS).unwrap().unwrap();
                    self.channels.insert(ch, peer);
                    self.permissions.push(peer.ip());
                    b
                }
                other => panic!("unexpected method {other}"),
            };
            Some(b.integrity(&self.key).fingerprint())
        }
    }

    /// Delivers everything the client sends to the server and back, until
    /// quiet.
    fn exchange(c: &mut TurnClient, s: &mut FakeServer, now: Instant) {
        while let Some(d) = c.poll_transmit() {
            if let Some(r) = s.answer(&d) {
                assert!(c.handle_input(now, &r).is_none());
            }
        }
    }

    fn allocated(s: &mut FakeServer, now: Instant) -> TurnClient {
        let mut c = TurnClient::new(
            SERVER.parse().unwrap(),
            "user",
            "secret",
            TurnTiming::default(),
            now,
        );
        exchange(&mut c, s, now);
        assert_eq!(
            c.poll_event(),
            Some(TurnEvent::Allocated {
                relayed: RELAYED.parse().unwrap(),
                mapped: Some(MAPPED.parse().unwrap()),
                lifetime: Duration::from_secs(s.lifetime as u64),
            })
        );
        c
    }

    #[test]
    fn allocate_permission_channel_and_receive() {
        let now = Instant::now();
        let mut s = FakeServer::new(600);
        let mut c = allocated(&mut s, now);
        assert_eq!(
            s.seen,
            vec![(method::ALLOCATE, false), (method::ALLOCATE, true)]
        );
        let peer: SocketAddr = PEER.parse().unwrap();
        // First packet: it waits for the permission, then goes as a Send
        // indication while the channel gets bound.
        c.send_to(now, peer, b"one");
        assert_eq!(c.permissions(), 0);
        exchange(&mut c, &mut s, now);
        assert_eq!(s.sent, vec![(peer, b"one".to_vec())]);
        assert_eq!(c.permissions(), 1);
        assert_eq!(c.bound_channels(), 1);
        assert_eq!(c.counters().channel_data_sent, 0);
        // Then ChannelData.
        c.send_to(now, peer, b"two");
        exchange(&mut c, &mut s, now);
        assert_eq!(s.sent.len(), 2);
        assert_eq!(s.sent[1], (peer, b"two".to_vec()));
        assert_eq!(c.counters().channel_data_sent, 1);
        assert_eq!(
            s.seen.iter().map(|(m, _)| *m).collect::<Vec<_>>(),
            [
                method::ALLOCATE,
                method::ALLOCATE,
                method::CREATE_PERMISSION,
                method::SEND,
                method::CHANNEL_BIND
            ]
        );

        // Receive: ChannelData and a Data indication.
        let ch = *s.channels.keys().next().unwrap();
        let cd = stun::encode_channel_data(ch, b"back");
        assert_eq!(c.handle_input(now, &cd), Some((peer, &b"back"[..])));
        let other: SocketAddr = "192.0.2.8:1".parse().unwrap();
        let di = MessageBuilder::new(method::DATA, Class::Indication, new_transaction_id())
            .address(attr::XOR_PEER_ADDRESS, other)
            .attr(attr::DATA, b"ind")
            .finish();
        assert_eq!(c.handle_input(now, &di), Some((other, &b"ind"[..])));
        // Unknown channel, garbage: nothing.
        assert_eq!(
            c.handle_input(now, &stun::encode_channel_data(0x7000, b"x")),
            None
        );
        assert_eq!(c.handle_input(now, &[0x40, 0x00, 0xff]), None);
        assert_eq!(c.handle_input(now, &[0xff; 40]), None);
        assert_eq!(c.counters().packets_received, 2);

        // Close sends a Refresh with lifetime 0.
        c.close(now);
        exchange(&mut c, &mut s, now);
        assert_eq!(s.refreshes, vec![0]);
        assert!(c.relayed().is_none());
    }

    #[test]
    fn refreshes_before_expiry() {
        let t0 = Instant::now();
        let mut s = FakeServer::new(600);
        let mut c = allocated(&mut s, t0);
        let peer: SocketAddr = PEER.parse().unwrap();
        c.send_to(t0, peer, b"x");
        exchange(&mut c, &mut s, t0);
        c.send_to(t0, peer, b"y");
        exchange(&mut c, &mut s, t0);
        // Walk the clock for 30 minutes, sending now and then, running every
        // timer; the allocation, its permission and channel stay alive.
        let mut now = t0;
        let mut binds = 0;
        let mut perms = 0;
        while now < t0 + Duration::from_secs(1800) {
            let next = c.next_timeout().unwrap();
            assert!(next >= now, "timer in the past");
            now = next.max(now) + Duration::from_millis(1);
            c.send_to(now, peer, b"z");
            c.handle_timeout(now);
            let before = s.seen.len();
            exchange(&mut c, &mut s, now);
            for (m, _) in &s.seen[before..] {
                match *m {
                    method::CHANNEL_BIND => binds += 1,
                    method::CREATE_PERMISSION => perms += 1,
                    _ => {}
                }
            }
            assert!(c.relayed().is_some(), "allocation lost at {:?}", now - t0);
            assert!(c.poll_event().is_none());
        }
        // Refreshed at 540 s, 1080 s, 1620 s.
        assert_eq!(s.refreshes, vec![600, 600, 600]);
        assert!(binds >= 3, "channel refreshed {binds} times");
        assert!(perms >= 1);
        assert_eq!(c.bound_channels(), 1);
    }

    #[test]
    fn stale_nonce_is_retried() {
        let now = Instant::now();
        let mut s = FakeServer::new(600);
        let mut c = allocated(&mut s, now);
        s.nonce = "nonce-2".into();
        c.send_to(now, PEER.parse().unwrap(), b"x");
        exchange(&mut c, &mut s, now);
        assert_eq!(c.permissions(), 1);
        assert_eq!(s.sent.len(), 1);
    }

    #[test]
    fn wrong_password_fails() {
        let now = Instant::now();
        let mut s = FakeServer::new(600);
        s.key = stun::long_term_key("user", "example.org", "other");
        let mut c = TurnClient::new(
            SERVER.parse().unwrap(),
            "user",
            "secret",
            TurnTiming::default(),
            now,
        );
        // The fake asserts integrity: answer the authenticated Allocate
        // with a 401 instead, as a real server does.
        let first = c.poll_transmit().unwrap();
        let r = s.answer(&first).unwrap();
        c.handle_input(now, &r);
        let second = c.poll_transmit().unwrap();
        let m = Message::decode(&second).unwrap();
        assert!(!m.check_integrity(&s.key));
        let r = MessageBuilder::new(method::ALLOCATE, Class::Error, m.tid)
            .error_code(401, "Unauthorized")
            .attr(attr::REALM, b"example.org")
            .attr(attr::NONCE, b"n2")
            .fingerprint();
        c.handle_input(now, &r);
        assert!(matches!(
            c.poll_event(),
            Some(TurnEvent::Failed(TurnError::Unauthorized { code: 401, .. }))
        ));
        assert!(c.settled());
        assert!(c.poll_transmit().is_none());
    }

    #[test]
    fn forged_success_is_ignored_and_silence_times_out() {
        let t0 = Instant::now();
        let mut s = FakeServer::new(600);
        let mut c = TurnClient::new(
            SERVER.parse().unwrap(),
            "user",
            "secret",
            TurnTiming::default(),
            t0,
        );
        let first = c.poll_transmit().unwrap();
        let r = s.answer(&first).unwrap();
        c.handle_input(t0, &r);
        let second = c.poll_transmit().unwrap();
        let m = Message::decode(&second).unwrap();
        // A success without (or with a wrong) MESSAGE-INTEGRITY.
        let forged = MessageBuilder::new(method::ALLOCATE, Class::Success, m.tid)
            .address(attr::XOR_RELAYED_ADDRESS, "6.6.6.6:6".parse().unwrap())
            .fingerprint();
        c.handle_input(t0, &forged);
        let forged = MessageBuilder::new(method::ALLOCATE, Class::Success, m.tid)
            .address(attr::XOR_RELAYED_ADDRESS, "6.6.6.6:6".parse().unwrap())
            .integrity(b"not the key")
            .fingerprint();
        c.handle_input(t0, &forged);
        assert!(c.relayed().is_none());
        // Retransmissions with growing intervals, then a timeout.
        let mut now = t0;
        let mut sends = 0;
        while let Some(t) = c.next_timeout() {
            now = t;
            c.handle_timeout(now);
            while c.poll_transmit().is_some() {
                sends += 1;
            }
        }
        assert!((4..=10).contains(&sends), "{sends} retransmissions");
        assert!(now - t0 <= Duration::from_secs(3) + Duration::from_millis(1));
        assert!(matches!(
            c.poll_event(),
            Some(TurnEvent::Failed(TurnError::Timeout { .. }))
        ));
    }

    #[test]
    fn server_errors_and_bad_answers() {
        let now = Instant::now();
        let mut s = FakeServer::new(600);
        let mut c = TurnClient::new(
            SERVER.parse().unwrap(),
            "user",
            "secret",
            TurnTiming::default(),
            now,
        );
        let first = c.poll_transmit().unwrap();
        let r = s.answer(&first).unwrap();
        c.handle_input(now, &r);
        let m_bytes = c.poll_transmit().unwrap();
        let m = Message::decode(&m_bytes).unwrap();
        // Success without a relayed address.
        let r = MessageBuilder::new(method::ALLOCATE, Class::Success, m.tid)
            .integrity(&s.key)
            .fingerprint();
        c.handle_input(now, &r);
        assert!(matches!(
            c.poll_event(),
            Some(TurnEvent::Failed(TurnError::BadResponse { .. }))
        ));

        let mut c = TurnClient::new(
            SERVER.parse().unwrap(),
            "user",
            "secret",
            TurnTiming::default(),
            now,
        );
        let first = c.poll_transmit().unwrap();
        let m = Message::decode(&first).unwrap();
        let r = MessageBuilder::new(method::ALLOCATE, Class::Error, m.tid)
            .error_code(486, "Allocation Quota Reached")
            .fingerprint();
        c.handle_input(now, &r);
        assert_eq!(
            c.poll_event(),
            Some(TurnEvent::Failed(TurnError::Server {
                server: SERVER.parse().unwrap(),
                code: 486,
                reason: "Allocation Quota Reached".into()
            }))
        );
    }

    #[test]
    fn garbage_from_the_server_never_panics() {
        let now = Instant::now();
        let mut s = FakeServer::new(600);
        let mut c = allocated(&mut s, now);
        let peer: SocketAddr = PEER.parse().unwrap();
        c.send_to(now, peer, b"x");
        exchange(&mut c, &mut s, now);
        c.send_to(now, peer, b"x");
        exchange(&mut c, &mut s, now);
        let ch = *s.channels.keys().next().unwrap();
        let samples = [
            stun::encode_channel_data(ch, b"payload"),
            MessageBuilder::new(method::DATA, Class::Indication, new_transaction_id())
                .address(attr::XOR_PEER_ADDRESS, peer)
                .attr(attr::DATA, b"data")
                .fingerprint(),
            MessageBuilder::new(method::REFRESH, Class::Success, new_transaction_id())
                .u32(attr::LIFETIME, 600)
                .integrity(&s.key)
                .fingerprint(),
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20000 {
            let mut v = samples[rng.usize(0..samples.len())].clone();
            for _ in 0..rng.usize(0..3) {
                let i = rng.usize(0..v.len());
                v[i] = rng.u8(..);
            }
            v.truncate(rng.usize(0..=v.len()));
            let _ = c.handle_input(now, &v);
        }
        assert!(c.relayed().is_some());
    }
}

/// Against a real coturn (see groupcall-coturn): what a long call needs.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod against_coturn {
    use super::*;

    fn drain(c: &mut TurnClient) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| c.poll_transmit()).collect()
    }

    /// Sends what the client wants sent and feeds back answers (at `now`)
    /// until the server is quiet for 200 ms.
    async fn exchange(
        c: &mut TurnClient,
        sock: &tokio::net::UdpSocket,
        server: SocketAddr,
        now: Instant,
    ) {
        let mut buf = [0u8; 2048];
        loop {
            for d in drain(c) {
                sock.send_to(&d, server).await.unwrap();
            }
            match tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await {
                Ok(Ok((n, _))) => {
                    c.handle_input(now, &buf[..n]);
                }
                _ => return,
            }
        }
    }

    /// TURN REST credentials expire (Synapse's `turn_user_lifetime`), but
    /// an allocation made with them must outlive them: coturn accepts the
    /// Refresh of an existing allocation after the user name's expiry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refresh_after_the_credentials_expired() {
        let turn = groupcall_coturn::Coturn::start(Default::default())
            .await
            .unwrap();
        let (user, pass) = turn.credentials("long-call", Duration::from_secs(1));
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t0 = Instant::now();
        let mut c = TurnClient::new(turn.addr(), &user, &pass, TurnTiming::default(), t0);
        exchange(&mut c, &sock, turn.addr(), t0).await;
        assert!(matches!(c.poll_event(), Some(TurnEvent::Allocated { .. })));
        let relayed = c.relayed();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        // Pretend 9 minutes passed: the refresh is due.
        let later = Instant::now() + Duration::from_secs(541);
        c.handle_timeout(later);
        let refresh = drain(&mut c);
        assert_eq!(refresh.len(), 1);
        assert_eq!(
            Message::decode(&refresh[0]).unwrap().method,
            method::REFRESH
        );
        for d in refresh {
            sock.send_to(&d, turn.addr()).await.unwrap();
        }
        exchange(&mut c, &sock, turn.addr(), later).await;
        assert_eq!(c.poll_event(), None, "{}", turn.log_tail(10));
        assert_eq!(c.relayed(), relayed);
        // The next refresh is due about ten minutes after this one.
        let next = c.next_timeout().unwrap();
        assert!(
            next > later + Duration::from_secs(500),
            "{:?}",
            next - later
        );
    }
}
