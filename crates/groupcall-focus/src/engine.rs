//! The focus's media engine: one tokio task that owns the media socket,
//! the sans-IO peer set (groupcall-media's `PeerSet`, one str0m `Rtc` per
//! client, all on one socket), the [`Forwarder`] and the orchestration
//! ([`Focus`]). Matrix is not here: the service feeds room state and
//! to-device signalling in ([`EngineInput`]) and sends what comes out
//! ([`EngineOutput`]).
//!
//! Received RTP goes from the peer set to the forwarder and back to the
//! subscribers' peers inside the task, without channels per packet. A
//! client is one [`ClientId`]: the same number names its peer (`PeerId`)
//! and its forwarder participant (`ParticipantId`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use groupcall::media::{
    Answer, LocalFeed, Mid, PeerConfig, PeerEvent, PeerId, PeerSet, Reply, Request, RequestId,
    SetInput, SetOutput, TrackKind as MediaTrackKind, udp,
};
use groupcall_proto::IncomingToDevice;
use groupcall_proto::signalling::Candidate;
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, trace, warn};

use crate::focus::{
    ClientId, Focus, FocusConfig, FocusOutput, ForwardChange, MediaIn, MediaOp, PublishedTrack,
    SendTrack, TrackKind,
};
use crate::forward::{
    CallId, Codec, Congestion, Counters, Egress, ForwardError, Forwarder, ForwarderConfig,
    KeyframeKind, LayerGuard, LayerSpec, LayerStep, LossGuard, ParticipantId, RtpIn,
    SubscriptionLayer, TrackId, TrackKey, TrackSpec,
};

/// The engine's settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The orchestration's settings.
    pub focus: FocusConfig,
    /// The forwarder's settings.
    pub forwarder: ForwarderConfig,
    /// Where the media sockets bind, one socket per address (port 0: any).
    /// Empty: one socket on `0.0.0.0:0` (which then needs `advertise`).
    pub bind: Vec<SocketAddr>,
    /// TURN (or STUN) servers the focus gathers candidates from (one
    /// allocation per server, shared by every client's peer).
    pub ice_servers: Vec<groupcall::media::IceServer>,
    /// Offer clients only relayed candidates.
    pub relay_only: bool,
    /// The addresses offered to clients instead of the bound ones (with
    /// the bound ports): `[media] advertise`, e.g. the public IP of a NAT,
    /// or the address of a socket bound to every address. Empty: each
    /// socket's own address; as many as `bind`: one for each socket, in
    /// order; with one socket: all of them for it (e.g. its public IPv4
    /// and IPv6). See [`crate::config::offered_addrs`].
    pub advertise: Vec<std::net::IpAddr>,
    /// The upload limit of one participant, bits per second: told to every
    /// publisher once a second (RTCP REMB on its video, advisory).
    pub max_upload_bps: Option<u64>,
    /// Estimate each subscriber's downlink from this initial figure, bits
    /// per second (str0m's TWCC estimation), and let it cap the
    /// subscriber's simulcast layers; None: no estimation (the layers
    /// follow the requested sizes and the receiver-reported loss).
    pub estimate_bandwidth: Option<u64>,
}

/// The initial downlink estimate of a subscriber ([`EngineConfig::estimate_bandwidth`]
/// from `[media] estimate_bandwidth`): str0m's initial probes start from
/// it, and it lets a subscriber start on a high layer.
pub const INITIAL_DOWNLINK_ESTIMATE: u64 = 1_500_000;

/// How long after a subscriber's layers moved by its downlink estimate
/// its reported loss is not taken against it: receiver reports come about
/// once a second and cover the second before, so the first ones after a
/// move still count the layer left (as the loss guard's own moves wait,
/// `LayerGuard`). Forwarded video is not paced (groupcall-media writes it
/// unpaced), so nothing of the layer left is still queued at the focus.
const LAYER_SETTLE: Duration = Duration::from_millis(2000);
/// While a subscriber's downlink estimate caps its layers, a probe of its
/// downlink is asked for this often. str0m probes by itself at start, after
/// a large drop and, while the sending rate stays under 65 % of the
/// estimate, every 5 s or more; between those its estimate grows only to
/// 1.5 times the rate acknowledged, and a subscriber held on a low layer
/// sends little: after a cap is lifted, the estimate sat 10 s below the
/// next layer (simulcast_netns). An allocation probe (at twice the
/// estimate) fires whenever the desired rate rises, so the same target is
/// given again, 1 bit/s higher.
const PROBE_WHILE_CAPPED: Duration = Duration::from_secs(2);

/// What the service feeds the engine.
#[derive(Debug)]
#[non_exhaustive]
pub enum EngineInput {
    /// A state event of a joined room.
    State {
        /// The room.
        room_id: String,
        /// The event (client-server JSON).
        event: Value,
    },
    /// The focus left a room.
    RoomLeft {
        /// The room.
        room_id: String,
    },
    /// An `m.call.*` to-device message.
    ToDevice(IncomingToDevice),
    /// Stop accepting calls, and tell the clients (`m.call.focus_draining`)
    /// that the focus hangs up in `hangup_in_ms`.
    StartDraining {
        /// Milliseconds until the hangup, if known.
        hangup_in_ms: Option<u64>,
    },
    /// Hang up on everyone and close every peer (releasing the TURN
    /// allocation): the end of a drain. [`EngineOutput::Flushed`] follows
    /// the hangups.
    HangUpAll,
    /// Report the figures.
    Figures(oneshot::Sender<EngineFigures>),
    /// Test only (cargo feature `test-hooks`): the engine stops for this
    /// long (no packets read or sent, as a frozen process), then takes the
    /// inputs sent meanwhile before it reads its socket again. Lets a test
    /// make the focus's offer cross a client's (glare).
    #[cfg(feature = "test-hooks")]
    Stall {
        /// How long.
        duration: Duration,
        /// Told when the stall begins (nothing from the socket is read
        /// after that until it ends).
        started: oneshot::Sender<()>,
    },
}

/// What the engine asks the service to send.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EngineOutput {
    /// A to-device message (Olm-encrypted by the service).
    ToDevice {
        /// Recipient user.
        user_id: String,
        /// Recipient device.
        device_id: String,
        /// Event type.
        event_type: String,
        /// Content.
        content: Value,
    },
    /// Everything the engine was asked before this (the hangups of
    /// [`EngineInput::HangUpAll`]) is out.
    Flushed,
}

/// One call's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallFigures {
    /// The room.
    pub room_id: String,
    /// The `conf_id`.
    pub conf_id: String,
    /// Clients connected.
    pub participants: usize,
    /// Tracks published.
    pub tracks: usize,
    /// Subscriptions being forwarded.
    pub subscriptions: usize,
    /// The forwarder's counters.
    pub counters: Counters,
    /// RTCP NACK messages received from the call's subscribers (each may
    /// name several packets), as str0m counts them (reports once a
    /// second). The forwarder's `counters.nacks_*` stay 0 with this
    /// driver: str0m answers NACKs from its own per-subscriber send
    /// buffer, before they reach the forwarder's cache.
    pub nacks_received: u64,
    /// Packets str0m re-sent (RTX) in answer to those NACKs (a lower
    /// bound, see `groupcall_media::PeerStats::rtp_resent`).
    pub nack_resends: u64,
    /// The active speaker now (`@user:server/DEVICE`), if one is named.
    pub active_speaker: Option<String>,
    /// Times the active speaker was announced to the call (a new speaker,
    /// or nobody).
    pub active_speaker_changes: u64,
}

/// One media socket of the engine ([`EngineFigures::sockets`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SocketFigures {
    /// The bound address.
    pub bound: SocketAddr,
    /// The addresses offered to clients for it (host candidates).
    pub offered: Vec<SocketAddr>,
    /// Datagrams received on it.
    pub datagrams_in: u64,
}

/// The engine's figures (metrics, the demo's report, tests).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineFigures {
    /// Per call.
    pub calls: Vec<CallFigures>,
    /// Invites turned down, by reason label.
    pub refusals: BTreeMap<String, u64>,
    /// Clients that left, by reason.
    pub departures: BTreeMap<String, u64>,
    /// Tracks each client publishes (audio, video), by device.
    pub uploads: BTreeMap<String, (usize, usize)>,
    /// Egress packets that had no negotiated m-line yet at the subscriber.
    pub egress_unready: u64,
    /// Datagrams the socket could not send at once (dropped).
    pub send_dropped: u64,
    /// The media address offered to clients: the socket's, or the
    /// advertised IP with the socket's port (the first socket's first).
    pub local_addr: Option<SocketAddr>,
    /// Every media socket: its bound address, the addresses offered for
    /// it, and the datagrams it received so far.
    pub sockets: Vec<SocketFigures>,
    /// Subscriptions in force (subscriber, track), all calls.
    pub subscriptions: usize,
    /// When the forwarder last started or stopped forwarding a track to a
    /// subscriber.
    pub last_subscription_change: Option<Instant>,
    /// Our offers that yielded to a client's crossing one (glare).
    pub offers_yielded: u64,
    /// NACK messages received from subscribers, all calls since the start
    /// (see [`CallFigures::nacks_received`]).
    pub nacks_received: u64,
    /// Packets re-sent in answer to NACKs, all calls since the start (see
    /// [`CallFigures::nack_resends`]).
    pub nack_resends: u64,
    /// For the latest new video subscriptions (at most
    /// [`KEYFRAME_WAITS_KEPT`], oldest first): the time from the
    /// subscription starting at the forwarder to the first key frame
    /// handed to the subscriber's peer.
    pub keyframe_waits: Vec<Duration>,
    /// The longest of all such waits since the start.
    pub keyframe_wait_max: Option<Duration>,
    /// New video subscriptions still waiting for their first key frame.
    pub keyframe_waits_pending: usize,
    /// Times a subscriber's video was stopped because its receiver
    /// reported heavy loss (a link too slow for it; see
    /// [`crate::forward::loss`]); its audio goes on.
    pub congestion_episodes: u64,
    /// Subscribers whose video is stopped so now.
    pub congested_subscribers: usize,
    /// The forwarder's totals since the start (every call, ended ones
    /// included). Simulcast: `layer_switches`, `layer_switch_fallbacks`,
    /// `inter_before_keyframe`, `switch_latency_*_ms`, `drops.temporal`.
    pub totals: Counters,
    /// Every video subscription's simulcast layer now (the subscriber is
    /// the client's number, see [`crate::focus::ClientId`]).
    pub subscription_layers: Vec<SubscriptionLayer>,
    /// The latest simulcast switch latencies (the switch asked for to the
    /// first packet of the new layer forwarded), oldest first.
    pub switch_latencies: Vec<Duration>,
    /// Times a subscriber's simulcast subscriptions went down a layer
    /// because its receiver reported loss ([`LayerGuard`]).
    pub layer_steps_down: u64,
    /// ... and back up.
    pub layer_steps_up: u64,
    /// The `<stream id>/<track id>` of each track in
    /// `subscription_layers`.
    pub track_names: HashMap<TrackId, String>,
    /// The cascade links with other foci now.
    pub links: Vec<LinkFigures>,
    /// Packets that arrived over a link on a stream one of our own clients
    /// publishes: back at their origin focus (a forwarding loop; such
    /// tracks are not forwarded). Since the start.
    pub looped_packets: u64,
}

/// One cascade link with another focus.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkFigures {
    /// The other focus's device (`@user:server/DEVICE`).
    pub device: String,
    /// We placed the link.
    pub outgoing: bool,
    /// Tracks we asked it for (its clients' streams our clients
    /// subscribed to), each once whatever the number of our subscribers.
    pub streams_in: usize,
    /// Tracks we forward to it (our clients' streams its clients asked
    /// for), each once whatever the number of its subscribers.
    pub streams_out: usize,
    /// RTP packets received over it.
    pub packets_in: u64,
    /// RTP packets forwarded over it.
    pub packets_out: u64,
}

impl EngineFigures {
    /// Packets dropped since the start, by the reason `/metrics` names
    /// (`drops_total{reason}`): the forwarder's reasons, `unready` (no
    /// negotiated m-line at the subscriber yet) and `socket_busy` (the
    /// socket could not take a datagram at once).
    pub fn drops(&self) -> [(&'static str, u64); 10] {
        let d = &self.totals.drops;
        [
            ("malformed", d.malformed),
            ("unknown_source", d.unknown_source),
            ("awaiting_keyframe", d.awaiting_keyframe),
            ("congestion_video", d.congestion_video),
            ("congestion_audio", d.congestion_audio),
            ("before_epoch", d.before_epoch),
            ("temporal", d.temporal),
            ("over_limit", d.over_limit),
            ("unready", self.egress_unready),
            ("socket_busy", self.send_dropped),
        ]
    }
}

/// How many of the latest first-keyframe waits
/// [`EngineFigures::keyframe_waits`] keeps.
pub const KEYFRAME_WAITS_KEPT: usize = 64;

/// How often the engine asks each client's peer for its counters (NACKs,
/// resends, receiver-reported loss): as often as a forwarding peer's str0m
/// reports them, so a subscriber's receiver report (once a second for
/// video) reaches the loss guards at most this long after it came.
const PEER_STATS_EVERY: Duration = Duration::from_millis(250);

/// Receiver-reported loss (per mille) that lets a falling downlink
/// estimate cap a subscriber's layers (`ForwarderConfig::estimate_needs_loss`;
/// 10 %, the layer guard's own step level), as resends at a rate do.
const LOSS_SIGN_PERMILLE: u16 = 100;

/// Packets resent to a subscriber on its NACKs within one stats poll that
/// let a falling downlink estimate cap its layers, as a lossy receiver
/// report does (3 in 250 ms; they come within a round trip of the loss,
/// a receiver report up to a second later). Resends, not NACK messages: a
/// subscriber also NACKs what its publisher's uplink lost, which the
/// focus never had (nothing to resend) and a lower layer would not help.
/// str0m stops resending past 15 % of what it sends, so a link losing
/// most of the high layer shows about 4 a poll. Only a sign for the
/// estimate: alone they move no layer (moderate random loss reaches them
/// too, and a lower layer would not help it).
const RESENDS_SIGN: u64 = 3;

/// With no new receiver report from a subscriber for this long, the loss
/// guards are told so (they judge it as no loss), once per this long.
const NO_REPORT_AFTER: Duration = Duration::from_millis(2500);

/// A running engine.
#[derive(Debug)]
pub struct Engine {
    tx: mpsc::UnboundedSender<EngineInput>,
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    figures: watch::Receiver<EngineFigures>,
}

impl Engine {
    /// Binds the media socket and starts the task (within a tokio
    /// runtime); what it wants sent goes to `out`.
    pub fn spawn(
        cfg: EngineConfig,
        out: mpsc::UnboundedSender<EngineOutput>,
    ) -> std::io::Result<Engine> {
        Self::spawn_with_figures(cfg, out, watch::Sender::new(EngineFigures::default()))
    }

    /// [`Engine::spawn`] publishing its figures (every 500 ms) into
    /// `figures`, a channel the caller made (and may watch).
    pub fn spawn_with_figures(
        cfg: EngineConfig,
        out: mpsc::UnboundedSender<EngineOutput>,
        figures_tx: watch::Sender<EngineFigures>,
    ) -> std::io::Result<Engine> {
        Self::spawn_on(cfg, out, figures_tx, mpsc::unbounded_channel())
    }

    /// [`Engine::spawn_with_figures`] taking its inputs from `inputs`, a
    /// channel the caller made (and may keep sending into).
    fn spawn_on(
        cfg: EngineConfig,
        out: mpsc::UnboundedSender<EngineOutput>,
        figures_tx: watch::Sender<EngineFigures>,
        inputs: (
            mpsc::UnboundedSender<EngineInput>,
            mpsc::UnboundedReceiver<EngineInput>,
        ),
    ) -> std::io::Result<Engine> {
        let binds = if cfg.bind.is_empty() {
            vec![SocketAddr::from(([0, 0, 0, 0], 0))]
        } else {
            cfg.bind.clone()
        };
        let mut sockets = Vec::with_capacity(binds.len());
        for bind in &binds {
            let socket = udp::bind(*bind)?;
            let (recv, send) = udp::buffer_sizes(&socket);
            info!(local_addr = %socket.local_addr()?, recv, send, "focus media socket bound");
            sockets.push(socket);
        }
        let bound = sockets
            .iter()
            .map(UdpSocket::local_addr)
            .collect::<std::io::Result<Vec<_>>>()?;
        let offered = crate::config::offered_addrs(&bound, &cfg.advertise)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        for (b, o) in bound.iter().zip(&offered) {
            if o.as_slice() != [*b] {
                info!(local_addr = %b, offered = ?o, "focus media: offering the advertised address");
            }
        }
        let local_addr = bound
            .first()
            .copied()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = inputs;
        let figures_rx = figures_tx.subscribe();
        let state = State::new(cfg, &bound, offered, out);
        let task = tokio::spawn(run(sockets, state, rx, figures_tx));
        Ok(Engine {
            tx,
            local_addr,
            task,
            figures: figures_rx,
        })
    }

    /// The figures as of the last second (no waiting).
    pub fn latest_figures(&self) -> EngineFigures {
        self.figures.borrow().clone()
    }

    /// Feeds an input (ignored once the task is gone).
    pub fn send(&self, input: EngineInput) {
        let _ = self.tx.send(input);
    }

    /// The first media socket's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The current figures (`None` if the task is gone).
    pub async fn figures(&self) -> Option<EngineFigures> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(EngineInput::Figures(tx)).ok()?;
        rx.await.ok()
    }

    /// Stops the task (peers are dropped without goodbyes).
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a request to the peer set was for.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Accept,
    Offer,
    Channel,
    Stats,
}

#[derive(Debug, Default)]
struct ClientMedia {
    call: Option<CallId>,
    /// The client's uploads by m-line.
    uploads: HashMap<Mid, (TrackId, PublishedTrack)>,
    /// The m-line of each forwarded track on this client's peer, and the
    /// forwarder's SSRC of that copy.
    downs: HashMap<TrackId, (Mid, u32)>,
    /// The extended sequence number last written per m-line.
    ext_seq: HashMap<Mid, u64>,
    /// The send tracks of the offer being made or last made.
    send_tracks: Vec<SendTrack>,
    /// The peer's NACK messages received and packets resent, as of its
    /// last stats.
    nacks: (u64, u64),
    /// When the newest receiver-reported loss the guards judged was
    /// reported (`PeerStats::egress_loss_at`).
    loss_seen_at: Option<Instant>,
    /// When the guards were last given a report (or its absence).
    guards_fed_at: Option<Instant>,
    /// Drops its video while its receiver reports heavy loss.
    loss_guard: LossGuard,
    /// Before that, steps its simulcast subscriptions down a layer.
    layer_guard: LayerGuard,
    /// The bandwidth estimation targets last given to its peer
    /// (minimum, desired).
    bitrate_targets: (u64, u64),
    /// When its downlink estimate last got a probe asked for while it
    /// caps the layers ([`PROBE_WHILE_CAPPED`]).
    probe_asked: Option<Instant>,
    /// RTP packets received from it and forwarded to it.
    packets: (u64, u64),
    /// A link's m-lines carrying a stream of our own clients (looped).
    looped: HashSet<Mid>,
}

struct State {
    focus: Focus,
    fwd: Forwarder,
    set: PeerSet,
    ice_servers: Vec<groupcall::media::IceServer>,
    relay_only: bool,
    max_upload_bps: Option<u64>,
    estimate_bandwidth: Option<u64>,
    /// When the publishers are next told the upload limit, and the
    /// subscribers' bandwidth estimation its targets.
    next_limit: Instant,
    out: mpsc::UnboundedSender<EngineOutput>,
    clients: HashMap<ClientId, ClientMedia>,
    calls: HashMap<(String, String), CallId>,
    next_call: u64,
    pending: HashMap<RequestId, (ClientId, Pending)>,
    next_request: u64,
    figures: EngineFigures,
    /// Datagrams to send, filled by the peer set, drained by the loop.
    transmits: Vec<(usize, SocketAddr, Vec<u8>)>,
    /// NACKs and resends of clients that left: in all, and by call (so
    /// that a call's counts never go down).
    nacks_retired: (u64, u64),
    nacks_retired_by_call: HashMap<CallId, (u64, u64)>,
    /// New video subscriptions waiting for their first key frame: since
    /// when.
    keyframe_pending: HashMap<(ClientId, TrackId), Instant>,
    /// Video egress that found no negotiated m-line at its subscriber, from
    /// the packet being forwarded (reused: no allocation per packet).
    unready_video: Vec<(ClientId, TrackId)>,
    /// Video subscriptions whose key frame came before their m-line: a new
    /// one is asked for when the m-line is ready.
    keyframe_lost_unready: std::collections::HashSet<(ClientId, TrackId)>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn peer(c: ClientId) -> PeerId {
    PeerId(c.0)
}

fn part(c: ClientId) -> ParticipantId {
    ParticipantId(c.0)
}

/// The next extended sequence number for a 16-bit one, given the last.
fn extend_seq(last: Option<u64>, seq: u16) -> u64 {
    let Some(last) = last else {
        return u64::from(seq);
    };
    let base = last & !0xffff;
    let cand = base | u64::from(seq);
    let diff = cand as i64 - last as i64;
    if diff < -(1 << 15) {
        cand + (1 << 16)
    } else if diff > (1 << 15) && cand >= 1 << 16 {
        cand - (1 << 16)
    } else {
        cand
    }
}

impl State {
    fn new(
        cfg: EngineConfig,
        bound: &[SocketAddr],
        offered: Vec<Vec<SocketAddr>>,
        out: mpsc::UnboundedSender<EngineOutput>,
    ) -> Self {
        let all: Vec<SocketAddr> = offered.iter().flatten().copied().collect();
        let sockets: Vec<SocketFigures> = bound
            .iter()
            .zip(offered)
            .map(|(b, offered)| SocketFigures {
                bound: *b,
                offered,
                datagrams_in: 0,
            })
            .collect();
        Self {
            focus: Focus::new(cfg.focus),
            fwd: Forwarder::new(cfg.forwarder),
            set: PeerSet::new(Instant::now(), all.clone()),
            ice_servers: cfg.ice_servers,
            relay_only: cfg.relay_only,
            max_upload_bps: cfg.max_upload_bps,
            estimate_bandwidth: cfg.estimate_bandwidth,
            next_limit: Instant::now(),
            out,
            clients: HashMap::new(),
            calls: HashMap::new(),
            next_call: 1,
            pending: HashMap::new(),
            next_request: 1,
            figures: EngineFigures {
                local_addr: all.first().copied(),
                sockets,
                ..Default::default()
            },
            transmits: Vec::new(),
            nacks_retired: (0, 0),
            nacks_retired_by_call: HashMap::new(),
            keyframe_pending: HashMap::new(),
            unready_video: Vec::new(),
            keyframe_lost_unready: std::collections::HashSet::new(),
        }
    }

    /// The loop's socket that sends for the offered address `source`
    /// (the first socket for an address the set was not made with).
    fn socket_of(&self, source: SocketAddr) -> usize {
        self.figures
            .sockets
            .iter()
            .position(|s| s.offered.contains(&source))
            .unwrap_or(0)
    }

    /// The offered address a datagram from `from` reached on socket
    /// `socket`: the socket's offered address of `from`'s family (an
    /// IPv4-mapped IPv6 sender counts as IPv4), else its first.
    fn offered_on(&self, socket: usize, from: SocketAddr) -> Option<SocketAddr> {
        let v4 = match from.ip() {
            std::net::IpAddr::V4(_) => true,
            std::net::IpAddr::V6(a) => a.to_ipv4_mapped().is_some(),
        };
        let offered = &self.figures.sockets.get(socket)?.offered;
        offered
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .or(offered.first())
            .copied()
    }

    /// A datagram from socket `socket`, which arrived at `received`.
    fn on_datagram(&mut self, socket: usize, from: SocketAddr, data: &[u8], received: Instant) {
        if let Some(f) = self.figures.sockets.get_mut(socket) {
            f.datagrams_in += 1;
        }
        let Some(local) = self.offered_on(socket, from) else {
            return;
        };
        let input = SetInput::Datagram {
            local,
            from,
            data,
            received,
        };
        self.set.handle_input(Instant::now(), input);
    }

    /// Every offered address (the peer set's sockets), in socket order.
    fn offered_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.figures
            .sockets
            .iter()
            .flat_map(|s| s.offered.iter().copied())
    }

    /// Asks every client's peer for its counters.
    fn request_peer_stats(&mut self) {
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        for c in ids {
            self.request(c, Some(Pending::Stats), Request::Stats);
        }
    }

    /// A client's media state goes: its NACK counts stay in the totals,
    /// its first-keyframe waits end.
    fn retire_client(&mut self, client: ClientId) {
        if let Some(m) = self.clients.remove(&client) {
            self.nacks_retired.0 += m.nacks.0;
            self.nacks_retired.1 += m.nacks.1;
            if let Some(call) = m.call {
                let r = self.nacks_retired_by_call.entry(call).or_default();
                r.0 += m.nacks.0;
                r.1 += m.nacks.1;
            }
        }
        self.keyframe_pending.retain(|(c, _), _| *c != client);
        self.keyframe_lost_unready.retain(|(c, _)| *c != client);
    }

    fn deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        let wall = unix_ms();
        let focus = self
            .focus
            .poll_timeout()
            .map(|t| now + Duration::from_millis(t.saturating_sub(wall)));
        let limit = (self.max_upload_bps.is_some() || self.estimate_bandwidth.is_some())
            .then_some(self.next_limit);
        [
            self.set.poll_timeout(),
            self.fwd.poll_timeout(),
            focus,
            limit,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_input(&mut self, input: EngineInput) {
        let now = unix_ms();
        match input {
            EngineInput::State { room_id, event } => {
                if let Err(e) = self.focus.handle_state(now, &room_id, &event) {
                    debug!(%room_id, "state event ignored: {e}");
                }
            }
            EngineInput::RoomLeft { room_id } => self.focus.room_left(now, &room_id),
            EngineInput::ToDevice(m) => self.focus.handle_to_device(now, &m),
            EngineInput::StartDraining { hangup_in_ms } => self.focus.start_draining(hangup_in_ms),
            EngineInput::HangUpAll => {
                self.focus.hang_up_all(now);
                self.pump();
                // The end: every peer closes and the TURN allocation is
                // released (its Refresh with lifetime 0 goes out with this
                // round's datagrams).
                self.set.close(Instant::now());
                self.pump();
                let _ = self.out.send(EngineOutput::Flushed);
            }
            EngineInput::Figures(tx) => {
                let _ = tx.send(self.figures());
            }
            #[cfg(feature = "test-hooks")]
            EngineInput::Stall { .. } => {}
        }
    }

    fn on_timeout(&mut self) {
        let now = Instant::now();
        if now >= self.next_limit {
            self.next_limit = now + Duration::from_secs(1);
            let clients: Vec<ClientId> = self.clients.keys().copied().collect();
            if let Some(bps) = self.max_upload_bps {
                // REMB is a standing limit a sender re-reads: say it again
                // every second (and to clients that joined since).
                for &c in &clients {
                    self.request(c, None, Request::LimitIncomingBitrate { bps });
                }
            }
            if self.estimate_bandwidth.is_some() {
                for c in clients {
                    self.update_bitrate_targets(now, c);
                }
            }
        }
        self.set.handle_input(now, SetInput::Timeout);
        self.fwd.handle_timeout(now);
        self.focus.handle_timeout(unix_ms());
    }

    /// Tells a subscriber's bandwidth estimation what to probe for: half
    /// again the rate of what it would get with no downlink limit (the
    /// forwarder moves up a layer once the estimate covers 125 % of its
    /// rate; headers come on top of the payload rates). Only changes of
    /// more than half are sent (str0m probes on a raise), and, while the
    /// estimate caps the layers, the same target raised by 1 bit/s every
    /// [`PROBE_WHILE_CAPPED`] (a probe).
    fn update_bitrate_targets(&mut self, now: Instant, client: ClientId) {
        let Some(rates) = self.fwd.downlink_rates(now, part(client)) else {
            return;
        };
        let wanted = rates.wanted;
        let desired = wanted.saturating_mul(3) / 2;
        let capped = self.fwd.downlink_constrained(part(client));
        let Some(m) = self.clients.get_mut(&client) else {
            return;
        };
        // Layer rates vary from second to second (key frames): only a
        // change by half is passed on, so that probes are not asked for
        // again and again.
        let last = m.bitrate_targets.1;
        if desired == 0 {
            return;
        }
        let desired = if desired * 2 < last * 3 && desired * 3 > last * 2 {
            if !capped || m.probe_asked.is_some_and(|t| now < t + PROBE_WHILE_CAPPED) {
                return;
            }
            trace!(
                client = client.0,
                "a downlink probe while the estimate caps the layers"
            );
            m.probe_asked = Some(now);
            last + 1
        } else {
            desired
        };
        m.bitrate_targets = (0, desired);
        debug!(
            client = client.0,
            desired, "subscriber bandwidth estimation target"
        );
        self.request(
            client,
            None,
            Request::SetBitrateTargets {
                minimum_bps: 0,
                desired_bps: desired,
            },
        );
    }

    fn figures(&self) -> EngineFigures {
        let mut f = self.figures.clone();
        f.calls = self
            .focus
            .calls()
            .into_iter()
            .map(|((room_id, conf_id), ids)| {
                let call = self.calls.get(&(room_id.clone(), conf_id.clone())).copied();
                let tracks = ids.iter().map(|c| self.focus.published(*c).len()).sum();
                let subscriptions = ids
                    .iter()
                    .filter_map(|c| self.clients.get(c))
                    .map(|m| m.downs.len())
                    .sum();
                let retired = call
                    .and_then(|c| self.nacks_retired_by_call.get(&c))
                    .copied()
                    .unwrap_or_default();
                let (nacks_received, nack_resends) = ids
                    .iter()
                    .filter_map(|c| self.clients.get(c))
                    .fold(retired, |(a, b), m| (a + m.nacks.0, b + m.nacks.1));
                let active_speaker = self
                    .focus
                    .active_speaker(&room_id, &conf_id)
                    .and_then(|s| self.focus.device_of(s))
                    .map(|d| format!("{}/{}", d.user_id, d.device_id));
                let active_speaker_changes = self.focus.active_speaker_changes(&room_id, &conf_id);
                CallFigures {
                    room_id,
                    conf_id,
                    participants: ids.iter().filter(|c| !self.focus.is_link(**c)).count(),
                    tracks,
                    subscriptions,
                    counters: call
                        .and_then(|c| self.fwd.call_counters(c).copied())
                        .unwrap_or_default(),
                    nacks_received,
                    nack_resends,
                    active_speaker,
                    active_speaker_changes,
                }
            })
            .collect();
        f.subscriptions = self.focus.subscription_count();
        f.offers_yielded = self.focus.offers_yielded();
        let live = self
            .clients
            .values()
            .fold((0, 0), |(a, b), m| (a + m.nacks.0, b + m.nacks.1));
        f.nacks_received = self.nacks_retired.0 + live.0;
        f.nack_resends = self.nacks_retired.1 + live.1;
        f.keyframe_waits_pending = self.keyframe_pending.len();
        f.congested_subscribers = self
            .clients
            .values()
            .filter(|m| m.loss_guard.dropping())
            .count();
        f.totals = self.fwd.counters();
        f.subscription_layers = self.fwd.subscription_layers().collect();
        f.track_names = f
            .subscription_layers
            .iter()
            .filter_map(|l| {
                let k = self.fwd.track_key(l.track)?;
                Some((l.track, format!("{}/{}", k.stream_id, k.track_id)))
            })
            .collect();
        f.switch_latencies = self.fwd.switch_latencies().collect();
        f.links = self
            .focus
            .links()
            .into_iter()
            .map(|(c, device, outgoing)| {
                let m = self.clients.get(&c);
                let (streams_out, streams_in) = self.focus.link_streams(c);
                LinkFigures {
                    device: device.to_string(),
                    outgoing,
                    streams_in,
                    streams_out,
                    packets_in: m.map_or(0, |m| m.packets.0),
                    packets_out: m.map_or(0, |m| m.packets.1),
                }
            })
            .collect();
        f.uploads = self
            .clients
            .keys()
            .filter(|c| !self.focus.is_link(**c))
            .filter_map(|c| {
                let device = self.focus.device_of(*c)?;
                let p = self.focus.published(*c);
                let audio = p.iter().filter(|t| t.kind == TrackKind::Audio).count();
                Some((device.to_string(), (audio, p.len() - audio)))
            })
            .collect();
        f
    }

    /// Carries out everything the parts ask for until all are quiet.
    fn pump(&mut self) {
        loop {
            let mut busy = false;
            while let Some(o) = self.focus.poll_output() {
                busy = true;
                self.on_focus(o);
            }
            while let Some(o) = self.set.poll_output() {
                busy = true;
                self.on_set(o);
            }
            while let Some(o) = self.fwd.poll_output() {
                busy = true;
                self.on_forwarder(o);
            }
            if !busy {
                break;
            }
        }
    }

    fn request(&mut self, client: ClientId, pending: Option<Pending>, req: Request) {
        let id = pending.map(|p| {
            let id = RequestId(self.next_request);
            self.next_request += 1;
            self.pending.insert(id, (client, p));
            id
        });
        self.set.request(Instant::now(), peer(client), id, req);
    }

    fn on_focus(&mut self, o: FocusOutput) {
        match o {
            FocusOutput::ToDevice {
                event_type,
                message,
            } => {
                let _ = self.out.send(EngineOutput::ToDevice {
                    user_id: message.user_id,
                    device_id: message.device_id,
                    event_type: event_type.as_str().to_owned(),
                    content: message.content,
                });
            }
            FocusOutput::Media { client, op } => self.on_media_op(client, op),
            FocusOutput::Forward(change) => self.on_forward_change(change),
            FocusOutput::ClientJoined {
                client,
                device,
                room_id,
            } => {
                info!(client = client.0, %device, %room_id, "client joined");
                self.add_forwarding_peer(client, false);
            }
            FocusOutput::LinkStarted {
                client,
                device,
                room_id,
                outgoing,
            } => {
                info!(client = client.0, %device, %room_id, outgoing, "cascade link started");
                // The side that places the link opens the channel.
                self.add_forwarding_peer(client, outgoing);
            }
            FocusOutput::ClientLeft {
                client,
                device,
                reason,
            } => {
                info!(client = client.0, %device, %reason, "client left");
                *self.figures.departures.entry(reason).or_default() += 1;
                self.retire_client(client);
            }
            FocusOutput::Refused { device, reason } => {
                info!(%device, %reason, "invite turned down");
                *self.figures.refusals.entry(reason).or_default() += 1;
            }
        }
    }

    /// A new peer connection in forwarding mode for a client or a link
    /// (`data_channel`: ours opens the channel in its first offer).
    fn add_forwarding_peer(&mut self, client: ClientId, data_channel: bool) {
        self.clients.entry(client).or_default();
        let cfg = PeerConfig {
            forward: true,
            receive_audio: false,
            receive_video: false,
            data_channel,
            bind_addrs: self.offered_addrs().map(|a| a.ip()).collect(),
            ice_servers: self.ice_servers.clone(),
            relay_only: self.relay_only,
            estimate_bandwidth: self.estimate_bandwidth,
            ..PeerConfig::default()
        };
        self.set.add_peer(Instant::now(), peer(client), cfg);
    }

    fn on_media_op(&mut self, client: ClientId, op: MediaOp) {
        match op {
            MediaOp::Accept { sdp, tracks } => {
                let feeds = feeds_of(&tracks);
                if let Some(m) = self.clients.get_mut(&client) {
                    m.send_tracks = tracks;
                }
                self.request(
                    client,
                    Some(Pending::Accept),
                    Request::AcceptOffer { sdp, feeds },
                );
            }
            MediaOp::AddRemoteCandidates { candidates } => {
                for c in candidates.into_iter().filter(|c| !c.is_end()) {
                    self.request(
                        client,
                        None,
                        Request::AddRemoteCandidate {
                            candidate: c.candidate,
                        },
                    );
                }
            }
            MediaOp::Offer { tracks } => {
                let feeds = feeds_of(&tracks);
                if let Some(m) = self.clients.get_mut(&client) {
                    m.send_tracks = tracks;
                }
                self.request(
                    client,
                    Some(Pending::Offer),
                    Request::CreateOffer {
                        feeds,
                        ice_restart: false,
                    },
                );
            }
            MediaOp::ApplyAnswer { sdp } => {
                self.request(client, None, Request::ApplyAnswer { sdp })
            }
            MediaOp::SendChannel { text } => self.request(
                client,
                Some(Pending::Channel),
                Request::SendChannel { text },
            ),
            MediaOp::Close => self.request(client, None, Request::Close),
        }
    }

    fn on_forward_change(&mut self, change: ForwardChange) {
        let now = Instant::now();
        let subscription = matches!(
            change,
            ForwardChange::Subscribe { .. } | ForwardChange::Unsubscribe { .. }
        );
        let r: Result<(), ForwardError> = match change {
            ForwardChange::AddClient { client, call } => {
                let id = match self.calls.get(&call) {
                    Some(id) => *id,
                    None => {
                        let id = CallId(self.next_call);
                        self.next_call += 1;
                        self.calls.insert(call, id);
                        if let Err(e) = self.fwd.add_call(id) {
                            warn!("forwarder: {e}");
                        }
                        id
                    }
                };
                self.clients.entry(client).or_default().call = Some(id);
                self.fwd.add_participant(id, part(client))
            }
            ForwardChange::Subscribe {
                subscriber,
                track,
                width,
                height,
                ..
            } => {
                debug!(subscriber = subscriber.0, stream = %track.stream_id, track = %track.track_id, ?width, ?height, "subscribe");
                let key = TrackKey::new(track.stream_id, track.track_id);
                let was = self.fwd.is_subscribed(part(subscriber), &key);
                let r = self.fwd.subscribe(now, part(subscriber), &key).map(|_| ());
                // The layer follows the requested size (a change of size
                // comes as a new Subscribe).
                if r.is_ok()
                    && let Err(e) =
                        self.fwd
                            .set_wanted_size(now, part(subscriber), &key, width, height)
                {
                    debug!(subscriber = subscriber.0, "wanted size: {e}");
                }
                // A new video subscription: timed until its first key frame.
                let tid = self
                    .clients
                    .get(&subscriber)
                    .and_then(|m| m.call)
                    .and_then(|c| self.fwd.track_by_key(c, &key));
                if let Some(tid) = tid
                    && r.is_ok()
                    && !was
                    && self.fwd.track_kind(tid) == Some(crate::forward::MediaKind::Video)
                {
                    self.keyframe_pending.insert((subscriber, tid), now);
                }
                r
            }
            ForwardChange::Unsubscribe {
                subscriber, track, ..
            } => {
                let key = TrackKey::new(track.stream_id, track.track_id);
                if let Some(tid) = self
                    .clients
                    .get(&subscriber)
                    .and_then(|m| m.call)
                    .and_then(|c| self.fwd.track_by_key(c, &key))
                {
                    self.keyframe_pending.remove(&(subscriber, tid));
                }
                self.fwd.unsubscribe(part(subscriber), &key)
            }
            ForwardChange::RemoveClient { client } => {
                self.retire_client(client);
                self.fwd.remove_participant(part(client))
            }
        };
        match r {
            Ok(()) if subscription => self.figures.last_subscription_change = Some(now),
            Ok(()) => {}
            Err(e) => debug!("forwarder: {e}"),
        }
    }

    fn on_set(&mut self, o: SetOutput) {
        match o {
            SetOutput::Transmit(t) => {
                let socket = self.socket_of(t.source);
                self.transmits.push((socket, t.destination, t.contents));
            }
            SetOutput::Answer {
                peer: p,
                request,
                answer,
            } => self.on_answer(ClientId(p.0), request, answer),
            SetOutput::Event { peer: p, event } => self.on_peer_event(ClientId(p.0), event),
            SetOutput::PeerEnded { peer: p } => self.focus.handle_media(
                unix_ms(),
                ClientId(p.0),
                MediaIn::Failed {
                    reason: "media_ended".into(),
                },
            ),
            SetOutput::Resolve { host, .. } => {
                debug!(%host, "no STUN/TURN servers are configured: not resolved");
            }
        }
    }

    fn on_answer(&mut self, client: ClientId, request: RequestId, answer: Answer) {
        let Some((_, what)) = self.pending.remove(&request) else {
            return;
        };
        let now = unix_ms();
        let ev = match (what, answer) {
            (Pending::Stats, Ok(Reply::Stats(s))) => {
                if let Some(m) = self.clients.get_mut(&client) {
                    let resent_new = s.rtp_resent.saturating_sub(m.nacks.1);
                    m.nacks = (s.nacks_received, s.rtp_resent);
                    let t = Instant::now();
                    if resent_new >= RESENDS_SIGN {
                        self.fwd.note_downlink_loss(part(client), t);
                    }
                    // Polled more often than receiver reports come: only a
                    // new report is judged, or, after long without one,
                    // its absence.
                    let fresh = s
                        .egress_loss_at
                        .filter(|at| m.loss_seen_at.is_none_or(|seen| *at > seen));
                    let silent = m
                        .guards_fed_at
                        .is_none_or(|f| t.saturating_duration_since(f) >= NO_REPORT_AFTER);
                    let loss = match fresh {
                        Some(at) => {
                            m.loss_seen_at = Some(at);
                            if s.egress_loss_permille
                                .is_some_and(|l| l >= LOSS_SIGN_PERMILLE)
                            {
                                self.fwd.note_downlink_loss(part(client), t);
                            }
                            s.egress_loss_permille
                        }
                        None if silent => None,
                        None => return,
                    };
                    m.guards_fed_at = Some(t);
                    trace!(client = client.0, ?loss, "receiver-reported loss");
                    // A simulcast subscriber goes down a layer first; its
                    // video stops only when nothing can go lower.
                    let room = self.fwd.steps_to_lowest(t, part(client));
                    let can_go_down = room > 0;
                    if !m.loss_guard.dropping() && (can_go_down || m.layer_guard.steps() > 0) {
                        if let Some(step) = m.layer_guard.report(t, loss, room) {
                            info!(
                                client = client.0,
                                ?loss,
                                ?step,
                                steps = m.layer_guard.steps(),
                                "subscriber layers (receiver-reported loss)"
                            );
                            match step {
                                LayerStep::Down => self.figures.layer_steps_down += 1,
                                _ => self.figures.layer_steps_up += 1,
                            }
                            self.fwd
                                .set_layer_steps(part(client), m.layer_guard.steps());
                        }
                        if can_go_down || m.layer_guard.settling(t) {
                            return;
                        }
                    }
                    // Just after a layer move by the estimate, the loss
                    // reported still counts the layer left (the guard's
                    // own moves are covered by its settling time above).
                    let moved = self.fwd.layers_moved_at(part(client));
                    if !m.loss_guard.dropping()
                        && self.estimate_bandwidth.is_some()
                        && moved.is_some_and(|at| t.saturating_duration_since(at) < LAYER_SETTLE)
                    {
                        return;
                    }
                    if let Some(c) = m.loss_guard.report(t, loss) {
                        info!(client = client.0, ?loss, congestion = ?c, "subscriber congestion (receiver-reported loss)");
                        if c == Congestion::Video {
                            self.figures.congestion_episodes += 1;
                        }
                        self.fwd.set_congestion(part(client), c);
                    }
                }
                return;
            }
            (Pending::Stats, _) => return,
            (Pending::Accept, Ok(Reply::Sdp(sdp))) => MediaIn::Answer { sdp },
            (Pending::Offer, Ok(Reply::Sdp(sdp))) => MediaIn::Offer { sdp },
            (Pending::Channel, Err(e)) => {
                debug!(client = client.0, "data channel message not sent: {e}");
                MediaIn::ChannelSendFailed
            }
            (Pending::Channel, Ok(_)) => return,
            (Pending::Offer, Err(e)) => MediaIn::OfferFailed {
                reason: e.to_string(),
            },
            (_, Err(e)) => MediaIn::Failed {
                reason: format!("media: {e}"),
            },
            (_, Ok(other)) => {
                debug!(client = client.0, "unexpected reply {other:?}");
                return;
            }
        };
        self.focus.handle_media(now, client, ev);
    }

    fn on_peer_event(&mut self, client: ClientId, ev: PeerEvent) {
        let now = unix_ms();
        match ev {
            PeerEvent::Rtp(p) => self.on_rtp(client, p),
            PeerEvent::Connected => self.focus.handle_media(now, client, MediaIn::Connected),
            PeerEvent::EgressEstimate { bps } => {
                trace!(client = client.0, bps, "subscriber downlink estimate");
                self.fwd.set_downlink_estimate(part(client), Some(bps));
            }
            PeerEvent::Failed => self.focus.handle_media(
                now,
                client,
                MediaIn::Failed {
                    reason: "ice_failed".into(),
                },
            ),
            // The client closed it (or we did, for a client already gone).
            PeerEvent::Closed => self.focus.handle_media(now, client, MediaIn::Closed),
            PeerEvent::RemoteTrack {
                stream_id,
                track_id,
                kind,
                mid,
            } => {
                let kind_f = match kind {
                    MediaTrackKind::Audio => TrackKind::Audio,
                    _ => TrackKind::Video,
                };
                let codec = match kind_f {
                    TrackKind::Audio => Codec::Opus,
                    _ => Codec::Vp8,
                };
                let spec = TrackSpec {
                    key: TrackKey::new(stream_id.clone(), track_id.clone()),
                    codec,
                    layers: vec![LayerSpec {
                        rid: None,
                        ssrc: None,
                    }],
                };
                if self.focus.came_back(client, &stream_id) {
                    warn!(client = client.0, %stream_id, %track_id, "a stream of our own came back over a link; not forwarded");
                    self.clients
                        .entry(client)
                        .or_default()
                        .looped
                        .insert(Mid::from(mid.as_str()));
                    return;
                }
                info!(client = client.0, %stream_id, %track_id, ?kind, %mid, "client publishes a track");
                match self.fwd.publish_track(part(client), spec) {
                    Ok(tid) => {
                        let t = PublishedTrack {
                            stream_id,
                            track_id,
                            kind: kind_f,
                        };
                        let mid = Mid::from(mid.as_str());
                        let m = self.clients.entry(client).or_default();
                        m.uploads.insert(mid, (tid, t));
                        let tracks = m.uploads.values().map(|(_, t)| t.clone()).collect();
                        self.focus
                            .handle_media(now, client, MediaIn::RemoteTracks { tracks });
                    }
                    Err(e) => warn!(client = client.0, "track not published: {e}"),
                }
            }
            PeerEvent::RemoteTrackRemoved { mid, .. } => {
                let mid = Mid::from(mid.as_str());
                if let Some(m) = self.clients.get_mut(&client)
                    && let Some((tid, _)) = m.uploads.remove(&mid)
                {
                    let _ = self.fwd.unpublish_track(tid);
                    let tracks = m.uploads.values().map(|(_, t)| t.clone()).collect();
                    self.focus
                        .handle_media(now, client, MediaIn::RemoteTracks { tracks });
                }
            }
            PeerEvent::LocalTrackReady {
                stream_id,
                track_id,
                mid,
                ..
            } => {
                let Some(m) = self.clients.get_mut(&client) else {
                    return;
                };
                let Some(call) = m.call else { return };
                let key = TrackKey::new(stream_id, track_id);
                let Some(tid) = self.fwd.track_by_key(call, &key) else {
                    debug!(client = client.0, "send track for an unknown track");
                    return;
                };
                // The forwarder's SSRC of this copy (stable across
                // resubscriptions).
                let ssrc = self
                    .fwd
                    .subscribe(Instant::now(), part(client), &key)
                    .unwrap_or(0);
                debug!(client = client.0, %mid, ssrc, "send track ready");
                m.downs.insert(tid, (mid, ssrc));
                // Its first key frame came too early: ask for another.
                if self.keyframe_lost_unready.remove(&(client, tid))
                    && let Err(e) = self
                        .fwd
                        .await_keyframe(Instant::now(), part(client), tid, true)
                {
                    debug!(client = client.0, "keyframe request: {e}");
                }
            }
            PeerEvent::KeyframeRequested { mid, fir, .. } => {
                let Some(ssrc) = self
                    .clients
                    .get(&client)
                    .and_then(|m| m.downs.values().find(|(x, _)| *x == mid).map(|(_, s)| *s))
                else {
                    return;
                };
                let kind = if fir {
                    KeyframeKind::Fir
                } else {
                    KeyframeKind::Pli
                };
                if let Err(e) =
                    self.fwd
                        .handle_keyframe_request(Instant::now(), part(client), ssrc, kind)
                {
                    debug!(client = client.0, "keyframe request: {e}");
                }
            }
            PeerEvent::ChannelOpen { .. } => {
                self.focus.handle_media(now, client, MediaIn::ChannelOpen)
            }
            PeerEvent::ChannelMessage { text } => {
                self.focus
                    .handle_media(now, client, MediaIn::ChannelMessage { text })
            }
            PeerEvent::ChannelClosed => {
                self.focus.handle_media(now, client, MediaIn::ChannelClosed)
            }
            PeerEvent::LocalCandidates {
                candidates,
                complete,
            } => {
                let mut candidates: Vec<Candidate> = candidates
                    .into_iter()
                    .map(|c| Candidate {
                        candidate: c.candidate,
                        sdp_mid: c.sdp_mid,
                        sdp_m_line_index: c.sdp_m_line_index.map(u32::from),
                        extra: Default::default(),
                    })
                    .collect();
                if complete {
                    candidates.push(Candidate::end_of_candidates());
                }
                self.focus
                    .handle_media(now, client, MediaIn::LocalCandidates { candidates });
            }
            other => debug!(client = client.0, "peer event: {other:?}"),
        }
    }

    /// One received RTP packet: to the forwarder, and its copies to the
    /// subscribers' peers.
    fn on_rtp(&mut self, client: ClientId, p: groupcall::media::RtpIn) {
        let now = Instant::now();
        let Some(m) = self.clients.get_mut(&client) else {
            return;
        };
        let Some((tid, _)) = m.uploads.get(&p.mid) else {
            if m.looped.contains(&p.mid) {
                self.figures.looped_packets += 1;
            }
            return;
        };
        let tid = *tid;
        m.packets.0 += 1;
        // The publisher's SSRC of each layer (simulcast: each RID) is
        // learnt from its packets (and follows a restart with a new one).
        let layer = match p.rid {
            Some(rid) => match self.fwd.layer_for_rid(tid, &rid) {
                Ok(l) => l,
                Err(e) => {
                    debug!(client = client.0, %rid, "forwarder: layer not added: {e}");
                    return;
                }
            },
            None => 0,
        };
        if let Err(e) = self.fwd.set_layer_ssrc(tid, layer, p.ssrc) {
            debug!("forwarder: {e}");
        }
        let input = RtpIn {
            ssrc: p.ssrc,
            seq: p.seq as u16,
            timestamp: p.timestamp,
            marker: p.marker,
            payload_type: p.pt,
            audio_level: p.audio_level.map(|l| crate::forward::AudioLevel {
                voice: p.voice_activity.unwrap_or(false),
                level: l.unsigned_abs().min(127),
            }),
            payload: &p.payload,
        };
        let keyframe_start = p.keyframe_start;
        let Self {
            fwd,
            set,
            clients,
            figures,
            keyframe_pending,
            unready_video,
            ..
        } = self;
        fwd.handle_rtp(now, part(client), &input, &mut |e: Egress<'_>| {
            let sub = ClientId(e.subscriber.0);
            let Some(sm) = clients.get_mut(&sub) else {
                return;
            };
            let Some(&(mid, _)) = sm.downs.get(&e.track) else {
                figures.egress_unready += 1;
                if e.kind == crate::forward::MediaKind::Video
                    && !unready_video.contains(&(sub, e.track))
                {
                    unready_video.push((sub, e.track));
                }
                return;
            };
            // The received buffer itself when nothing changes; else one copy,
            // patched in place.
            let payload: Arc<[u8]> = match e.vp8 {
                None if std::ptr::eq(e.payload, &p.payload[..]) => Arc::clone(&p.payload),
                patch => {
                    let mut copy: Arc<[u8]> = Arc::from(e.payload);
                    let patched = match (patch, Arc::get_mut(&mut copy)) {
                        (Some(patch), Some(bytes)) => patch.apply(bytes),
                        (None, _) => true,
                        (Some(_), None) => false,
                    };
                    if !patched {
                        return;
                    }
                    copy
                }
            };
            let ext = extend_seq(sm.ext_seq.get(&mid).copied(), e.header.seq);
            sm.ext_seq.insert(mid, ext);
            sm.packets.1 += 1;
            let video = e.kind == crate::forward::MediaKind::Video;
            if video
                && keyframe_start
                && !keyframe_pending.is_empty()
                && let Some(t0) = keyframe_pending.remove(&(sub, e.track))
            {
                let wait = now.saturating_duration_since(t0);
                debug!(subscriber = sub.0, ?wait, "first key frame forwarded");
                if figures.keyframe_waits.len() >= KEYFRAME_WAITS_KEPT {
                    figures.keyframe_waits.remove(0);
                }
                figures.keyframe_waits.push(wait);
                figures.keyframe_wait_max = figures.keyframe_wait_max.max(Some(wait));
            }
            set.request(
                now,
                peer(sub),
                None,
                Request::WriteRtp(groupcall::media::RtpOut {
                    mid,
                    pt: None,
                    seq: ext,
                    timestamp: e.header.timestamp,
                    marker: e.header.marker,
                    audio_level: e.header.audio_level.map(|l| -(l.level as i8)),
                    voice_activity: e.header.audio_level.map(|l| l.voice),
                    nackable: video,
                    vp8_picture_id: None,
                    payload,
                    wallclock: p.received_at,
                }),
            );
        });
        if !self.unready_video.is_empty() {
            self.after_unready_video(now);
        }
    }

    /// Video the forwarder sent before the subscriber's m-line was
    /// negotiated was lost: the subscription waits for a key frame again,
    /// asked for once the m-line is ready.
    fn after_unready_video(&mut self, now: Instant) {
        while let Some((sub, tid)) = self.unready_video.pop() {
            if self.fwd.await_keyframe(now, part(sub), tid, false).is_ok() {
                debug!(
                    subscriber = sub.0,
                    "video before its m-line: waiting for a key frame again"
                );
                self.keyframe_lost_unready.insert((sub, tid));
            }
        }
    }

    fn on_forwarder(&mut self, o: crate::forward::Output) {
        match o {
            crate::forward::Output::KeyframeRequest {
                publisher,
                track,
                layer,
                kind,
                ..
            } => {
                let rid = self
                    .fwd
                    .layer_rid(track, layer)
                    .map(groupcall::media::Rid::from);
                let client = ClientId(publisher.0);
                let Some(mid) = self.clients.get(&client).and_then(|m| {
                    m.uploads
                        .iter()
                        .find(|(_, (t, _))| *t == track)
                        .map(|(mid, _)| *mid)
                }) else {
                    return;
                };
                self.request(
                    client,
                    None,
                    Request::RequestKeyframeOn {
                        mid,
                        rid,
                        fir: kind == KeyframeKind::Fir,
                    },
                );
            }
            crate::forward::Output::ActiveSpeakerChanged { call, participant } => {
                // To the orchestration, which tells the call's clients.
                if let Some((room, conf)) = self
                    .calls
                    .iter()
                    .find_map(|(k, id)| (*id == call).then_some(k))
                {
                    self.focus.handle_active_speaker(
                        room,
                        conf,
                        participant.map(|p| ClientId(p.0)),
                    );
                }
            }
        }
    }
}

/// The feeds (msid streams) that carry `tracks`: one per stream, with its
/// audio and video track.
fn feeds_of(tracks: &[SendTrack]) -> Vec<LocalFeed> {
    let mut feeds: Vec<LocalFeed> = Vec::new();
    for t in tracks {
        let i = match feeds.iter().position(|f| f.stream_id == t.track.stream_id) {
            Some(i) => i,
            None => {
                feeds.push(LocalFeed {
                    stream_id: t.track.stream_id.clone(),
                    purpose: groupcall::media::FeedPurpose::Usermedia,
                    audio_track_id: None,
                    video_track_id: None,
                });
                feeds.len() - 1
            }
        };
        if let Some(f) = feeds.get_mut(i) {
            match t.track.kind {
                TrackKind::Audio => f.audio_track_id = Some(t.track.track_id.clone()),
                _ => f.video_track_id = Some(t.track.track_id.clone()),
            }
        }
    }
    feeds
}

async fn run(
    sockets: Vec<UdpSocket>,
    mut state: State,
    mut rx: mpsc::UnboundedReceiver<EngineInput>,
    figures: watch::Sender<EngineFigures>,
) {
    let mut buf = vec![0u8; 2048];
    let mut next_socket = 0;
    let mut figures_at = Instant::now();
    let mut stats_at = Instant::now();
    loop {
        if stats_at.elapsed() >= PEER_STATS_EVERY {
            stats_at = Instant::now();
            state.request_peer_stats();
        }
        if figures_at.elapsed() >= Duration::from_millis(500) {
            figures_at = Instant::now();
            figures.send_replace(state.figures());
        }
        let deadline = state.deadline();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            (i, r) = udp::recv_any(&sockets, &mut buf, &mut next_socket) => match r {
                Ok(d) => {
                    let data = buf.get(..d.len).unwrap_or_default();
                    state.on_datagram(i, d.from, data, d.at);
                }
                Err(e) => debug!(socket = i, "media socket: {e}"),
            },
            input = rx.recv() => match input {
                #[cfg(feature = "test-hooks")]
                Some(EngineInput::Stall { duration, started }) => {
                    let _ = started.send(());
                    tokio::time::sleep(duration).await;
                    while let Ok(i) = rx.try_recv() {
                        state.on_input(i);
                    }
                }
                Some(i) => state.on_input(i),
                None => break,
            },
            () = sleep => state.on_timeout(),
        }
        state.pump();
        for (i, to, data) in state.transmits.drain(..) {
            let sent = sockets
                .get(i)
                .is_some_and(|s| s.try_send_to(&data, to).is_ok());
            if !sent {
                state.figures.send_dropped += 1;
            }
        }
    }
    info!("focus media engine stopped");
}

#[cfg(test)]
mod tests {
    use super::extend_seq;

    #[test]
    fn sequence_numbers_extend_across_wraps_both_ways() {
        assert_eq!(extend_seq(None, 7), 7);
        assert_eq!(extend_seq(Some(65_535), 0), 65_536);
        assert_eq!(extend_seq(Some(65_536), 65_535), 65_535);
        assert_eq!(extend_seq(Some(131_071), 2), 131_074);
        assert_eq!(extend_seq(Some(10), 9), 9);
    }
}

/// The engine behind the service: the [`crate::driver::FocusCore`] of a
/// real focus. Its [`Engine`] starts once the device is known.
#[derive(Debug)]
pub struct EngineCore {
    cfg: EngineConfig,
    engine: Option<Engine>,
    outputs: Option<mpsc::UnboundedReceiver<crate::driver::CoreOutput>>,
    /// Refusals already counted into the metrics, by reason.
    refusals_reported: BTreeMap<String, u64>,
    /// Drops already counted into the metrics, by reason.
    drops_reported: BTreeMap<&'static str, u64>,
    figures: watch::Sender<EngineFigures>,
    /// The engine's inputs: made here so that they can be handed out
    /// before it starts; the receiver goes to the engine.
    inputs: mpsc::UnboundedSender<EngineInput>,
    inputs_rx: Option<mpsc::UnboundedReceiver<EngineInput>>,
}

impl EngineCore {
    /// A core that will run an engine with these settings (its
    /// `focus.device_id` is filled in at start).
    pub fn new(cfg: EngineConfig) -> Self {
        let (inputs, inputs_rx) = mpsc::unbounded_channel();
        Self {
            cfg,
            engine: None,
            outputs: None,
            refusals_reported: BTreeMap::new(),
            drops_reported: BTreeMap::new(),
            figures: watch::Sender::new(EngineFigures::default()),
            inputs,
            inputs_rx: Some(inputs_rx),
        }
    }

    /// A sender of inputs to the engine (they wait until the service has
    /// started it). Take it before
    /// handing the core to [`crate::driver::FocusService::start_with_core`].
    pub fn input_sender(&self) -> mpsc::UnboundedSender<EngineInput> {
        self.inputs.clone()
    }

    /// The engine's figures as it publishes them (every 500 ms once the
    /// service has started it; the defaults until then). Take it before
    /// handing the core to [`crate::driver::FocusService::start_with_core`].
    pub fn figures_watch(&self) -> watch::Receiver<EngineFigures> {
        self.figures.subscribe()
    }

    /// The settings of a focus.toml: media bind address, TURN, limits,
    /// plaintext and heartbeat. Fails when the TURN password cannot be
    /// read.
    pub fn from_config(config: &crate::config::Config) -> Result<Self, crate::config::ConfigError> {
        let mut focus = FocusConfig::new("", "");
        focus.allow_plaintext = config.allow_plaintext;
        focus.cascade = config.cascade;
        focus.max_participants_per_call = config.limits.max_participants_per_call as usize;
        focus.max_tracks_per_participant = config.limits.max_tracks_per_participant as usize;
        focus.heartbeat = crate::heartbeat::HeartbeatConfig {
            interval_ms: config.heartbeat.ping_interval.as_millis() as u64,
            timeout_ms: config.heartbeat.ping_timeout.as_millis() as u64,
        };
        let bind = config.media.bind.clone();
        let (ice_servers, relay_only) = match &config.turn {
            Some(t) => {
                let password = config.turn_password()?.unwrap_or_default();
                (
                    vec![groupcall::media::IceServer::turn(
                        t.uris.clone(),
                        t.username.clone(),
                        password,
                    )],
                    t.relay_only,
                )
            }
            None => (Vec::new(), false),
        };
        let forwarder = ForwarderConfig {
            publisher_limit_bps: Some(u64::from(config.limits.max_kbps_per_participant) * 1000),
            ..ForwarderConfig::default()
        };
        Ok(Self::new(EngineConfig {
            focus,
            forwarder,
            bind,
            ice_servers,
            relay_only,
            advertise: config.media.advertise.clone(),
            max_upload_bps: Some(u64::from(config.limits.max_kbps_per_participant) * 1000),
            estimate_bandwidth: config
                .media
                .estimate_bandwidth
                .then_some(INITIAL_DOWNLINK_ESTIMATE),
        }))
    }

    fn send(&self, input: EngineInput) {
        if self.engine.is_some() {
            let _ = self.inputs.send(input);
        }
    }
}

impl crate::driver::FocusCore for EngineCore {
    fn started(&mut self, user_id: &str, device_id: &str) -> Result<(), String> {
        self.cfg.focus.device_id = device_id.to_owned();
        self.cfg.focus.user_id = user_id.to_owned();
        let session: u64 = rand_session();
        self.cfg.focus.session_id = format!("{device_id}-{session:x}");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let inputs_rx = self
            .inputs_rx
            .take()
            .ok_or_else(|| "the engine was started already".to_owned())?;
        let engine = Engine::spawn_on(
            self.cfg.clone(),
            tx,
            self.figures.clone(),
            (self.inputs.clone(), inputs_rx),
        )
        .map_err(|e| format!("binding {:?}: {e}", self.cfg.bind))?;
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                let out = match out {
                    EngineOutput::ToDevice {
                        user_id,
                        device_id,
                        event_type,
                        content,
                    } => crate::driver::CoreOutput::ToDevice {
                        user_id,
                        device_id,
                        event_type,
                        content,
                        encrypted: true,
                    },
                    EngineOutput::Flushed => crate::driver::CoreOutput::Flushed,
                };
                if out_tx.send(out).is_err() {
                    break;
                }
            }
        });
        self.engine = Some(engine);
        self.outputs = Some(out_rx);
        Ok(())
    }

    fn take_outputs(&mut self) -> Option<mpsc::UnboundedReceiver<crate::driver::CoreOutput>> {
        self.outputs.take()
    }

    fn state_event(&mut self, _now_ms: u64, room_id: &str, event: &Value) {
        self.send(EngineInput::State {
            room_id: room_id.to_owned(),
            event: event.clone(),
        });
    }

    fn room_left(&mut self, _now_ms: u64, room_id: &str) -> Vec<crate::driver::CoreOutput> {
        self.send(EngineInput::RoomLeft {
            room_id: room_id.to_owned(),
        });
        Vec::new()
    }

    fn to_device(
        &mut self,
        _now_ms: u64,
        event: crate::driver::CallToDevice,
        _rooms: &BTreeMap<String, groupcall_proto::room::RoomCallState>,
    ) -> Vec<crate::driver::CoreOutput> {
        self.send(EngineInput::ToDevice(IncomingToDevice {
            sender: event.sender,
            sender_device: event.sender_device,
            event_type: event.event_type,
            content: event.content,
            encrypted: event.encrypted,
        }));
        Vec::new()
    }

    fn draining(&mut self, _now_ms: u64, grace: Duration) -> Vec<crate::driver::CoreOutput> {
        self.send(EngineInput::StartDraining {
            hangup_in_ms: Some(u64::try_from(grace.as_millis()).unwrap_or(u64::MAX)),
        });
        Vec::new()
    }

    fn stopping(&mut self, _now_ms: u64) -> Vec<crate::driver::CoreOutput> {
        self.send(EngineInput::HangUpAll);
        Vec::new()
    }

    fn fill_metrics(&mut self, metrics: &mut crate::metrics::Metrics) {
        let Some(e) = &self.engine else { return };
        let f = e.latest_figures();
        metrics.set_links(
            f.links.iter().map(|l| {
                (
                    l.device.clone(),
                    [
                        l.streams_out as u64,
                        l.streams_in as u64,
                        l.packets_out,
                        l.packets_in,
                    ],
                )
            }),
            f.looped_packets,
        );
        for (reason, n) in &f.refusals {
            let done = self.refusals_reported.entry(reason.clone()).or_default();
            while *done < *n {
                metrics.add_refusal(reason);
                *done += 1;
            }
        }
        for (reason, n) in f.drops() {
            let done = self.drops_reported.entry(reason).or_default();
            if n > *done {
                metrics.add_drops(reason, n - *done);
                *done = n;
            }
        }
        // A call that ended here: its series go (its counters stay in the
        // totals).
        let live: std::collections::BTreeSet<String> = f
            .calls
            .iter()
            .map(|c| format!("{}/{}", c.room_id, c.conf_id))
            .collect();
        metrics.retain_calls(|c| live.contains(c));
        for c in &f.calls {
            let k = &c.counters;
            let label = format!("{}/{}", c.room_id, c.conf_id);
            metrics.set_active_speaker(&label, c.active_speaker.as_deref());
            metrics.set_call(
                &label,
                crate::metrics::CallFigures {
                    participants: c.participants as u64,
                    tracks: c.tracks as u64,
                    packets_in: k.packets_in,
                    bytes_in: k.bytes_in,
                    packets_out: k.packets_out,
                    bytes_out: k.bytes_out,
                    // str0m answers NACKs (from its per-subscriber send
                    // buffer) before they reach the forwarder's cache:
                    // both counts, whichever served them.
                    nacks_served: k.nacks_served + c.nack_resends,
                    plis_sent: k.keyframe_requests_sent,
                    nacks_received: c.nacks_received,
                    keyframe_requests_received: k.keyframe_requests_received,
                    keyframe_requests_coalesced: k.keyframe_requests_coalesced,
                    layer_switches: k.layer_switches,
                    layer_switch_fallbacks: k.layer_switch_fallbacks,
                    inter_before_keyframe: k.inter_before_keyframe,
                    layer_switch_latency_ms: k.switch_latency_total_ms,
                    active_speaker_changes: c.active_speaker_changes,
                    layers_policed: k.layers_policed,
                },
            );
        }
        metrics.set_subscription_layers(f.subscription_layers.iter().filter_map(|l| {
            let key = f.track_names.get(&l.track)?;
            Some((format!("{}/{key}", l.subscriber.0), u64::from(l.height)))
        }));
    }
}

/// A session id for this start of the focus: different at each start.
fn rand_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
