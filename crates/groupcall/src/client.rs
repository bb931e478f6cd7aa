//! The async group call client: drives the sans-IO core
//! ([`groupcall_proto::GroupCall`]) with a Matrix session (state, to-device)
//! and str0m media peers ([`groupcall_media::MediaPeer`]).
//!
//! One tokio task owns the core. Inputs (sync, media events, user commands,
//! timers) go into the core; its outputs are carried out here: state events
//! and to-device messages through one ordered outbox task (so that `seq`
//! order on the wire matches the order the core produced), media requests on
//! the peers directly.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use groupcall_media::{
    IvfRecorder, IvfSource, MediaPeer, OggOpusRecorder, OggOpusSource, PeerConfig, PeerEvent,
    SinkFilter, TrackKind,
};
use groupcall_proto::events::{self, FeedPurpose};
use groupcall_proto::{
    CallEvent, Command, Config, CreateOptions, DeviceKey, GroupCall, IncomingToDevice, MediaEvent,
    MediaRequest, MediaState, Output, PeerHandle,
};
use serde_json::Value;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

#[cfg(feature = "faults")]
use crate::faults::{FaultOptions, Faults};
use crate::liveness::{DelayedLeave, LivenessOptions, PublishedHook};
use crate::matrix::{
    KeylessDevices, MatrixError, MatrixInput, MatrixSession, SendModes, SyncOptions,
};

/// Where our audio comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioSource {
    /// The built-in tone (Opus, looped).
    Tone,
    /// An Ogg/Opus file (looped).
    File(PathBuf),
    /// Opus packets pushed by the application through
    /// [`CallHandle::frame_pusher`].
    Push,
    /// No audio track.
    None,
}

/// Where our video comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoSource {
    /// The built-in test pattern (VP8, looped).
    Pattern,
    /// An IVF/VP8 file (looped).
    File(PathBuf),
    /// VP8 frames pushed by the application through
    /// [`CallHandle::frame_pusher`].
    Push,
    /// No video track.
    None,
}

/// How to join a call.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Room id or alias.
    pub room: String,
    /// Create the call if the room has none.
    pub create: Option<CreateOptions>,
    /// Our audio.
    pub audio: AudioSource,
    /// Our video.
    pub video: VideoSource,
    /// Record every remote track into this directory (Ogg for audio, IVF for
    /// video).
    pub record_dir: Option<PathBuf>,
    /// Local addresses for host candidates. Empty (the default): chosen
    /// when joining from the homeserver's URL, see
    /// [`groupcall_media::bind::media_bind_addrs`] (`127.0.0.1` for a
    /// homeserver on loopback, else every usable interface address).
    pub bind_addrs: Vec<IpAddr>,
    /// Send signalling Olm-encrypted (default true). A device that has
    /// published no keys (a client without crypto) gets plaintext instead,
    /// reported as [`ClientEvent::SignallingTo`] with `encrypted: false`,
    /// unless `require_encrypted`.
    pub encrypt: bool,
    /// Encryption only, both ways: refuse plaintext signalling from others,
    /// and send nothing to a device that has published no keys (reported as
    /// [`ClientEvent::SignallingTo`] with `refused: true`).
    pub require_encrypted: bool,
    /// How often to report media counters.
    pub stats_interval: Duration,
    /// Deliver every received encoded frame as [`ClientEvent::Frame`].
    pub deliver_frames: bool,
    /// Core settings (timeouts, expiry...). `user_id`, `device_id`, `seed`
    /// and `require_encrypted` are filled in.
    pub core: Option<Config>,
    /// Offer only relayed candidates: all media goes through the
    /// homeserver's TURN server (for strict NATs; needs one).
    pub relay_only: bool,
    /// Crash cleanup (MSC4140 delayed leave or short expiry) and media
    /// liveness timeouts.
    pub liveness: LivenessOptions,
    /// Test only (cargo feature `faults`): inject faults into `m.call.*`
    /// to-device messages.
    #[cfg(feature = "faults")]
    pub faults: Option<FaultOptions>,
    /// When the room has no call (and `create` is `None`), wait for one to
    /// start and join it, instead of failing with
    /// [`CommandError::NoCallToJoin`]. The call's start is the first event
    /// ([`CallEvent::CallStarted`], with its intent).
    pub wait_for_call: bool,
    /// Diagnostic only, keep the default (`true`): `false` turns video
    /// retransmission (NACK/RTX) off, see
    /// [`groupcall_media::PeerConfig::retransmission`]. The lossy-network
    /// test uses it to measure what retransmission recovers.
    pub retransmission: bool,
}

impl JoinOptions {
    /// Defaults: tone + test pattern, media addresses chosen from the
    /// homeserver (see [`JoinOptions::bind_addrs`]), encrypted.
    pub fn new(room: impl Into<String>) -> Self {
        Self {
            room: room.into(),
            create: None,
            audio: AudioSource::Tone,
            video: VideoSource::Pattern,
            record_dir: None,
            bind_addrs: Vec::new(),
            encrypt: true,
            require_encrypted: false,
            stats_interval: Duration::from_secs(1),
            deliver_frames: false,
            core: None,
            relay_only: false,
            liveness: LivenessOptions::default(),
            #[cfg(feature = "faults")]
            faults: None,
            wait_for_call: false,
            retransmission: true,
        }
    }
}

/// What the client reports.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// An event of the protocol core (joined, participant, peer state, feeds...).
    Call(CallEvent),
    /// A remote track started arriving.
    RemoteTrack {
        /// Remote device.
        device: DeviceKey,
        /// Stream id (msid).
        stream_id: String,
        /// Track id.
        track_id: String,
        /// Audio or video.
        kind: TrackKind,
    },
    /// Media counters of one remote track (totals), every `stats_interval`.
    Media {
        /// Remote device.
        device: DeviceKey,
        /// Stream id.
        stream_id: String,
        /// Audio or video.
        kind: TrackKind,
        /// Frames received so far.
        frames: u64,
        /// Bytes received so far.
        bytes: u64,
    },
    /// Media counters of what we send to one peer (totals).
    MediaSent {
        /// Remote device.
        device: DeviceKey,
        /// Audio or video.
        kind: TrackKind,
        /// Frames sent so far.
        frames: u64,
        /// Bytes sent so far.
        bytes: u64,
    },
    /// A signalling message arrived (for diagnostics and tests), or one
    /// held for its sender's member event was dropped after the grace period
    /// (then `ignored` says so and `encrypted` is false).
    Signalling {
        /// Sender user.
        sender: String,
        /// Event type.
        event_type: String,
        /// Whether it came Olm-encrypted.
        encrypted: bool,
        /// Why it was ignored, if it was.
        ignored: Option<String>,
    },
    /// How our signalling goes to one remote device: reported the first
    /// time we send it something and whenever that changes (e.g. a device
    /// without keys publishes them: Olm from then on).
    SignallingTo {
        /// Remote device.
        device: DeviceKey,
        /// Olm-encrypted (true) or plaintext (false).
        encrypted: bool,
        /// Nothing is sent to it: it has published no keys and
        /// [`JoinOptions::require_encrypted`] is set.
        refused: bool,
        /// Why it is not encrypted (`None` when it is).
        reason: Option<String>,
    },
    /// A received encoded frame (with [`JoinOptions::deliver_frames`]).
    Frame {
        /// Remote device.
        device: DeviceKey,
        /// The frame.
        frame: ReceivedFrame,
    },
    /// A recording was finished.
    Recorded {
        /// The file.
        path: PathBuf,
    },
    /// Something went wrong that did not end the call.
    Warning(String),
}

/// Why the client could not join or had to stop.
#[derive(Debug, Error)]
pub enum ClientError {
    /// A Matrix request failed.
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    /// The core refused the command (no call to join, ...).
    #[error(transparent)]
    Command(#[from] groupcall_proto::CommandError),
    /// A media file could not be used.
    #[error("media: {0}")]
    Media(String),
    /// The sync loop stopped for good.
    #[error("sync stopped: {0}")]
    SyncStopped(String),
}

/// An encoded frame received from a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedFrame {
    /// Stream id (msid) of the remote feed.
    pub stream_id: String,
    /// Track id.
    pub track_id: String,
    /// Audio (an Opus packet) or video (a VP8 frame).
    pub kind: TrackKind,
    /// The encoded data.
    pub data: std::sync::Arc<[u8]>,
    /// RTP time (48 kHz audio, 90 kHz video), extended to 64 bits.
    pub rtp_time: u64,
    /// A VP8 key frame.
    pub keyframe: bool,
}

/// Pushes encoded frames to every peer (for [`AudioSource::Push`] and
/// [`VideoSource::Push`]).
#[derive(Debug, Clone)]
pub struct FramePusher(mpsc::UnboundedSender<PushedFrame>);

type PushedFrame = (TrackKind, std::sync::Arc<[u8]>, Duration);

impl FramePusher {
    /// Sends one encoded frame (an Opus packet or a VP8 frame) of our
    /// camera/microphone feed to every peer; `duration` is its play time.
    /// `false` when the call has ended.
    pub fn push(
        &self,
        kind: TrackKind,
        data: impl Into<std::sync::Arc<[u8]>>,
        duration: Duration,
    ) -> bool {
        self.0.send((kind, data.into(), duration)).is_ok()
    }
}

/// A running call. Drop it or call [`CallHandle::leave`] to leave.
pub struct CallHandle {
    pusher: FramePusher,
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::UnboundedReceiver<ClientEvent>,
    task: JoinHandle<Result<(), ClientError>>,
}

/// A cloneable sender of commands to a running call.
#[derive(Debug, Clone)]
pub struct CallCommander(mpsc::UnboundedSender<Command>);

impl CallCommander {
    /// Sends a command; `false` when the call task has ended.
    pub fn send(&self, cmd: Command) -> bool {
        self.0.send(cmd).is_ok()
    }
}

impl CallHandle {
    /// A sender of encoded frames for [`AudioSource::Push`] /
    /// [`VideoSource::Push`].
    pub fn frame_pusher(&self) -> FramePusher {
        self.pusher.clone()
    }

    /// A sender of commands that can live apart from the handle.
    pub fn commander(&self) -> CallCommander {
        CallCommander(self.commands.clone())
    }

    /// Waits for the call task to end (after a `Leave` command, or when the
    /// call was terminated), draining events.
    pub async fn finished(mut self) -> Result<(), ClientError> {
        let drain = async { while self.events.recv().await.is_some() {} };
        let (_, r) = tokio::join!(drain, &mut self.task);
        r.unwrap_or_else(|e| Err(ClientError::SyncStopped(format!("call task panicked: {e}"))))
    }

    /// Sends a command (mute, screenshare, leave...).
    pub fn command(&self, cmd: Command) {
        let _ = self.commands.send(cmd);
    }

    /// The next event; `None` when the call task has ended.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }

    /// Leaves the call (hang up everyone, remove our membership) and waits
    /// for the task to finish.
    pub async fn leave(self) -> Result<(), ClientError> {
        let _ = self.commands.send(Command::Leave);
        self.finished().await
    }

    /// Ends the task without leaving (as if the process died): for tests.
    pub fn abort(self) {
        self.task.abort();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Joins the room's call (creating it if asked) and runs it in a task.
pub async fn join_call(
    session: MatrixSession,
    mut opts: JoinOptions,
) -> Result<CallHandle, ClientError> {
    if opts.bind_addrs.is_empty() {
        let hs = session.homeserver_url();
        let (addrs, why) = groupcall_media::bind::media_bind_addrs(&[], &hs);
        info!(addrs = ?addrs, why = why.as_str(), homeserver = %hs, "media addresses");
        opts.bind_addrs = addrs;
    }
    // Fail early on unusable media files.
    if let AudioSource::File(p) = &opts.audio {
        OggOpusSource::open(p).map_err(|e| ClientError::Media(e.to_string()))?;
    }
    if let VideoSource::File(p) = &opts.video {
        IvfSource::open(p).map_err(|e| ClientError::Media(e.to_string()))?;
    }
    if let Some(dir) = &opts.record_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| ClientError::Media(format!("{}: {e}", dir.display())))?;
    }
    let room_id = session.join_room(&opts.room).await?;
    // Start syncing first so nothing between the state fetch and the first
    // sync is lost; the permission check needs the first sync's state.
    let (sync, mut sync_rx) = session.start_sync(SyncOptions::default());
    let mut early = Vec::new();
    let first_sync = async {
        while let Some(input) = sync_rx.recv().await {
            match input {
                MatrixInput::Synced { .. } => return Ok(()),
                MatrixInput::Disconnected { error, fatal: true } => {
                    return Err(ClientError::SyncStopped(error));
                }
                other => early.push(other),
            }
        }
        Err(ClientError::SyncStopped(
            "sync ended before the first response".into(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(60), first_sync)
        .await
        .map_err(|_| ClientError::SyncStopped("no sync response within 60 s".into()))??;
    session
        .ensure_can_send_state(&room_id, events::CALL_MEMBER_UNSTABLE)
        .await?;
    if opts.create.is_some() {
        session
            .ensure_can_send_state(&room_id, events::CALL_UNSTABLE)
            .await?;
    }

    let mut cfg = opts.core.clone().unwrap_or_else(|| Config::new("", ""));
    let delayed_leave =
        opts.liveness.delayed_leave && session.supports_delayed_events().await.unwrap_or(false);
    if !delayed_leave {
        // No crash cleanup by the homeserver: a short expiry instead.
        let expiry = opts.liveness.fallback_expiry.as_millis() as u64;
        let refresh = opts.liveness.fallback_refresh.as_millis() as u64;
        cfg.member_expiry_ms = cfg.member_expiry_ms.min(expiry);
        cfg.member_refresh_ms = cfg.member_refresh_ms.min(refresh);
    }
    info!(
        delayed_leave,
        member_expiry_ms = cfg.member_expiry_ms,
        "crash cleanup"
    );
    cfg.user_id = session.user_id().to_owned();
    cfg.device_id = session.device_id();
    cfg.seed = RandomState::new().hash_one(SystemTime::now());
    cfg.require_encrypted = opts.require_encrypted;
    if cfg.session_id.is_none() {
        cfg.session_id = Some(session.call_session_id().to_owned());
    }
    let mut call = GroupCall::new(cfg);

    // Load the room's current call state from the homeserver, then what the
    // first sync brought.
    let now = now_ms();
    for ty in [
        events::ROOM_MEMBER,
        events::CALL_UNSTABLE,
        events::CALL,
        events::CALL_MEMBER_UNSTABLE,
        events::CALL_MEMBER,
    ] {
        for ev in session.fetch_room_state(&room_id, ty).await? {
            if let Err(e) = call.handle_state(now, &ev) {
                debug!("ignoring state event: {e}");
            }
        }
    }
    for input in early {
        if let MatrixInput::State { room_id: r, event } = input
            && r == room_id
        {
            let _ = call.handle_state(now, &event);
        }
    }
    // Before joining only a call's start matters to the application.
    let mut started = Vec::new();
    let mut keep_started = |call: &mut GroupCall| {
        while let Some(out) = call.poll_output() {
            if let Output::Event(e @ CallEvent::CallStarted { .. }) = out {
                started.push(e);
            }
        }
    };
    keep_started(&mut call);
    if opts.wait_for_call && opts.create.is_none() && call.room().live_call().is_none() {
        info!(room = %opts.room, "no call in the room; waiting for one to start");
        while call.room().live_call().is_none() {
            match sync_rx.recv().await {
                Some(MatrixInput::State { room_id: r, event }) if r == room_id => {
                    if let Err(e) = call.handle_state(now_ms(), &event) {
                        debug!("ignoring state event: {e}");
                    }
                    keep_started(&mut call);
                }
                Some(MatrixInput::Disconnected { error, fatal: true }) => {
                    return Err(ClientError::SyncStopped(error));
                }
                Some(_) => {}
                None => {
                    return Err(ClientError::SyncStopped(
                        "sync ended while waiting for a call".into(),
                    ));
                }
            }
        }
    }
    // Only the latest start counts (a call may have replaced another).
    let started = started.pop();
    let now = now_ms();
    let audio = opts.audio != AudioSource::None;
    let video = opts.video != VideoSource::None;
    call.handle_command(
        now,
        Command::Join {
            create: opts.create.clone(),
            audio,
            video,
        },
    )?;

    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (push_tx, push_rx) = mpsc::unbounded_channel();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    if let Some(e) = started {
        let _ = ev_tx.send(ClientEvent::Call(e));
    }
    let (media_tx, media_rx) = mpsc::unbounded_channel();
    let (ack_tx, ack_rx) = mpsc::unbounded_channel();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (liveness, hook) = if delayed_leave {
        let (l, h) = DelayedLeave::start(
            session.clone(),
            room_id.clone(),
            &opts.liveness,
            ev_tx.clone(),
        );
        (Some(l), Some(h))
    } else {
        (None, None)
    };
    #[cfg(feature = "faults")]
    let sync_rx = match &opts.faults {
        Some(f) if f.incoming => crate::faults::wrap_incoming(sync_rx, f.clone()),
        _ => sync_rx,
    };
    let outbox = tokio::spawn(outbox(
        session.clone(),
        room_id.clone(),
        (opts.encrypt, opts.require_encrypted),
        out_rx,
        ack_tx,
        ev_tx.clone(),
        OutboxHooks {
            member_published: hook,
            #[cfg(feature = "faults")]
            faults: opts
                .faults
                .clone()
                .filter(|f| f.outgoing)
                .map(|f| Faults::new(f, "outgoing")),
        },
    ));
    let turn = session.watch_turn_servers().await;
    let driver = Driver {
        call,
        room_id,
        opts,
        peers: HashMap::new(),
        media_tx,
        out_tx,
        events: ev_tx,
        pending: VecDeque::new(),
        recordings: Vec::new(),
        turn,
        liveness,
    };
    let inputs = Inputs {
        sync,
        sync_rx,
        cmd_rx,
        media_rx,
        ack_rx,
        push_rx,
    };
    let task = tokio::spawn(driver.run(inputs, outbox));
    Ok(CallHandle {
        pusher: FramePusher(push_tx),
        commands: cmd_tx,
        events: ev_rx,
        task,
    })
}

enum OutItem {
    ToDevice {
        event_type: String,
        messages: Vec<(String, String, Value)>,
    },
    State {
        event_type: String,
        state_key: String,
        content: Value,
    },
    /// Reply once everything before this was sent.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Optional extras of the outbox.
struct OutboxHooks {
    /// Told about our member content once the homeserver accepted it.
    member_published: Option<PublishedHook>,
    /// Test only: faults on outgoing signalling.
    #[cfg(feature = "faults")]
    faults: Option<Faults>,
}

/// Sends state events and to-device messages one after the other, in the
/// order the core produced them.
async fn outbox(
    session: MatrixSession,
    room_id: String,
    (encrypt, require_encrypted): (bool, bool),
    mut rx: mpsc::UnboundedReceiver<OutItem>,
    ack: mpsc::UnboundedSender<()>,
    events: mpsc::UnboundedSender<ClientEvent>,
    #[cfg_attr(not(feature = "faults"), allow(unused_mut))] mut hooks: OutboxHooks,
) {
    let keyless = if require_encrypted {
        KeylessDevices::Refuse
    } else {
        KeylessDevices::Plaintext
    };
    let mut modes = SendModes::default();
    while let Some(item) = rx.recv().await {
        match item {
            OutItem::ToDevice {
                event_type,
                messages,
            } => {
                #[cfg(feature = "faults")]
                let messages = match &mut hooks.faults {
                    Some(f) => crate::faults::outgoing(f, &session, &event_type, messages, encrypt),
                    None => messages,
                };
                let n = messages.len();
                let report = session
                    .send_signalling(&event_type, messages, encrypt, keyless)
                    .await;
                for m in modes.changes(&report, &event_type) {
                    let _ = events.send(ClientEvent::SignallingTo {
                        device: DeviceKey::new(m.user_id, m.device_id),
                        encrypted: m.encrypted,
                        refused: m.refused,
                        reason: m.reason,
                    });
                }
                if let Some(e) = report.error {
                    warn!(%event_type, "to-device send failed: {e}");
                    let _ = events.send(ClientEvent::Warning(format!(
                        "sending {event_type} to {n} devices failed: {e}"
                    )));
                }
            }
            OutItem::State {
                event_type,
                state_key,
                content,
            } => {
                let member = events::is_call_member_type(&event_type);
                let mut delay = Duration::from_millis(200);
                loop {
                    match session
                        .send_state(&room_id, &event_type, &state_key, content.clone())
                        .await
                    {
                        Ok(_) => {
                            if member {
                                let _ = ack.send(());
                                if let Some(h) = &hooks.member_published
                                    && state_key == session.user_id()
                                {
                                    h.published(&event_type, &content);
                                }
                            }
                            break;
                        }
                        Err(e) if e.is_transient() && delay < Duration::from_secs(10) => {
                            warn!(%event_type, "state send failed, retrying: {e}");
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                        Err(e) => {
                            warn!(%event_type, "state send failed: {e}");
                            let _ = events.send(ClientEvent::Warning(format!(
                                "sending {event_type} failed: {e}"
                            )));
                            break;
                        }
                    }
                }
            }
            OutItem::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

struct Peer {
    media: MediaPeer,
    device: DeviceKey,
    /// Local track ids that already have a source.
    sourced: Vec<String>,
    /// stream id -> (kind) of remote tracks seen.
    remote_tracks: BTreeMap<(String, &'static str), String>,
}

/// Everything the driver task listens to.
struct Inputs {
    sync: crate::matrix::SyncHandle,
    sync_rx: mpsc::Receiver<MatrixInput>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    media_rx: mpsc::UnboundedReceiver<(PeerHandle, PeerEvent)>,
    ack_rx: mpsc::UnboundedReceiver<()>,
    push_rx: mpsc::UnboundedReceiver<PushedFrame>,
}

struct Driver {
    call: GroupCall,
    room_id: String,
    opts: JoinOptions,
    peers: HashMap<PeerHandle, Peer>,
    media_tx: mpsc::UnboundedSender<(PeerHandle, PeerEvent)>,
    out_tx: mpsc::UnboundedSender<OutItem>,
    events: mpsc::UnboundedSender<ClientEvent>,
    /// Media results to feed back into the core.
    pending: VecDeque<MediaEvent>,
    recordings: Vec<PathBuf>,
    /// The homeserver's TURN servers, kept fresh.
    turn: crate::matrix::TurnWatch,
    /// The MSC4140 delayed leave, when used.
    liveness: Option<DelayedLeave>,
}

impl Driver {
    async fn run(mut self, inputs: Inputs, outbox: JoinHandle<()>) -> Result<(), ClientError> {
        let Inputs {
            sync,
            mut sync_rx,
            mut cmd_rx,
            mut media_rx,
            mut ack_rx,
            mut push_rx,
        } = inputs;
        self.drain().await;
        let mut stats = tokio::time::interval(self.opts.stats_interval);
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let result = loop {
            let wake = self.call.poll_timeout().map(|t| {
                let d = Duration::from_millis(t.saturating_sub(now_ms()));
                tokio::time::Instant::now() + d
            });
            let timer = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                input = sync_rx.recv() => match input {
                    Some(input) => self.on_matrix(input),
                    None => break Err(ClientError::SyncStopped("sync channel closed".into())),
                },
                Some((handle, ev)) = media_rx.recv() => self.on_peer_event(handle, ev),
                cmd = cmd_rx.recv() => {
                    let cmd = cmd.unwrap_or(Command::Leave);
                    let leaving = matches!(cmd, Command::Leave | Command::Terminate);
                    if let Err(e) = self.call.handle_command(now_ms(), cmd) {
                        let _ = self.events.send(ClientEvent::Warning(e.to_string()));
                    }
                    if leaving && self.call.joined_call_id().is_none() {
                        self.drain().await;
                        break Ok(());
                    }
                }
                Some(()) = ack_rx.recv() => self.call.handle_membership_published(now_ms()),
                _ = timer => self.call.handle_timeout(now_ms()),
                _ = stats.tick() => self.report_stats().await,
                Some((kind, data, duration)) = push_rx.recv() => self.push_frame(kind, data, duration),
            }
            self.drain().await;
            if self.call.joined_call_id().is_none() {
                // The call ended under us (terminated by someone else).
                break Ok(());
            }
        };
        // Close every peer (finishing recordings), flush the outbox, stop.
        let handles: Vec<_> = self.peers.keys().copied().collect();
        for h in handles {
            self.close_peer(h).await;
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let _ = self.out_tx.send(OutItem::Flush(done_tx));
        let _ = tokio::time::timeout(Duration::from_secs(10), done_rx).await;
        drop(self.out_tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), outbox).await;
        // After a clean leave our member event no longer lists us: cancel
        // the delayed leave. Otherwise dropping it stops the heartbeat and
        // the homeserver removes our entry after the delay.
        if let Some(l) = self.liveness.take()
            && result.is_ok()
        {
            l.stop().await;
        }
        sync.stop();
        for path in std::mem::take(&mut self.recordings) {
            let _ = self.events.send(ClientEvent::Recorded { path });
        }
        result
    }

    fn on_matrix(&mut self, input: MatrixInput) {
        let now = now_ms();
        match input {
            MatrixInput::State { room_id, event } => {
                if room_id == self.room_id
                    && let Err(e) = self.call.handle_state(now, &event)
                {
                    debug!("ignoring state event: {e}");
                }
            }
            MatrixInput::ToDevice {
                sender,
                sender_device,
                event_type,
                content,
                encrypted,
            } => {
                if !event_type.starts_with("m.call.") && !event_type.starts_with("org.matrix.call.")
                {
                    return;
                }
                let r = self.call.handle_to_device(
                    now,
                    IncomingToDevice {
                        sender: sender.clone(),
                        sender_device,
                        event_type: event_type.clone(),
                        content,
                        encrypted,
                    },
                );
                let _ = self.events.send(ClientEvent::Signalling {
                    sender,
                    event_type,
                    encrypted,
                    ignored: r.err().map(|e| e.to_string()),
                });
            }
            MatrixInput::Disconnected { error, fatal } => {
                warn!(fatal, "homeserver unreachable: {error}");
                let _ = self.events.send(ClientEvent::Warning(format!(
                    "homeserver unreachable ({}): {error}",
                    if fatal {
                        "giving up"
                    } else {
                        "retrying with backoff"
                    }
                )));
            }
            MatrixInput::Synced { first: false } => {
                info!("homeserver reachable again");
                let _ = self
                    .events
                    .send(ClientEvent::Warning("homeserver reachable again".into()));
            }
            _ => {}
        }
    }

    fn on_peer_event(&mut self, handle: PeerHandle, ev: PeerEvent) {
        let state = match ev {
            PeerEvent::Connected => Some(MediaState::Connected),
            PeerEvent::Disconnected => Some(MediaState::Disconnected),
            PeerEvent::Failed => Some(MediaState::Failed),
            PeerEvent::Frame(frame) => {
                if let Some(peer) = self.peers.get(&handle) {
                    let _ = self.events.send(ClientEvent::Frame {
                        device: peer.device.clone(),
                        frame: ReceivedFrame {
                            stream_id: frame.stream_id.to_string(),
                            track_id: frame.track_id.to_string(),
                            kind: frame.kind,
                            data: frame.data,
                            rtp_time: frame.rtp_time,
                            keyframe: frame.keyframe,
                        },
                    });
                }
                None
            }
            PeerEvent::RemoteTrack {
                stream_id,
                track_id,
                kind,
                ..
            } => {
                if let Some(peer) = self.peers.get_mut(&handle) {
                    if kind == TrackKind::Video {
                        let _ = peer.media.request_keyframe(&track_id);
                    }
                    let first = peer
                        .remote_tracks
                        .insert((stream_id.clone(), kind.as_str()), track_id.clone())
                        .is_none();
                    if first && let Some(dir) = &self.opts.record_dir {
                        let name = sanitize(&format!(
                            "{}_{}_{}",
                            peer.device.user_id, peer.device.device_id, stream_id
                        ));
                        let path = match kind {
                            TrackKind::Audio => dir.join(format!("{name}.ogg")),
                            TrackKind::Video => dir.join(format!("{name}.ivf")),
                        };
                        let filter = SinkFilter::stream(stream_id.clone(), kind);
                        let added = match kind {
                            TrackKind::Audio => OggOpusRecorder::create(&path)
                                .map(|r| peer.media.add_sink(filter, r)),
                            TrackKind::Video => {
                                IvfRecorder::create(&path).map(|r| peer.media.add_sink(filter, r))
                            }
                        };
                        match added {
                            Ok(_) => self.recordings.push(path),
                            Err(e) => warn!("cannot record {}: {e}", path.display()),
                        }
                    }
                    let _ = self.events.send(ClientEvent::RemoteTrack {
                        device: peer.device.clone(),
                        stream_id,
                        track_id,
                        kind,
                    });
                }
                None
            }
            PeerEvent::LocalCandidates {
                candidates,
                complete,
            } => {
                // Found after the offer/answer went out: trickle them.
                let mut candidates: Vec<_> = candidates
                    .into_iter()
                    .map(|c| groupcall_proto::signalling::Candidate {
                        candidate: c.candidate,
                        sdp_mid: c.sdp_mid,
                        sdp_m_line_index: c.sdp_m_line_index.map(u32::from),
                        extra: Default::default(),
                    })
                    .collect();
                if complete {
                    candidates.push(groupcall_proto::signalling::Candidate::end_of_candidates());
                }
                self.call.handle_media(
                    now_ms(),
                    MediaEvent::LocalCandidates {
                        peer: handle,
                        candidates,
                    },
                );
                None
            }
            _ => None,
        };
        if let Some(state) = state {
            self.call.handle_media(
                now_ms(),
                MediaEvent::State {
                    peer: handle,
                    state,
                },
            );
        }
    }

    async fn report_stats(&mut self) {
        for peer in self.peers.values() {
            let Ok(stats) = peer.media.stats().await else {
                continue;
            };
            for t in stats.remote {
                let _ = self.events.send(ClientEvent::Media {
                    device: peer.device.clone(),
                    stream_id: t.stream_id,
                    kind: t.kind,
                    frames: t.received.frames,
                    bytes: t.received.bytes,
                });
            }
            let mut sent: BTreeMap<&'static str, (TrackKind, u64, u64)> = BTreeMap::new();
            for t in stats.local {
                let e = sent.entry(t.kind.as_str()).or_insert((t.kind, 0, 0));
                e.1 += t.sent.frames;
                e.2 += t.sent.bytes;
            }
            for (_, (kind, frames, bytes)) in sent {
                let _ = self.events.send(ClientEvent::MediaSent {
                    device: peer.device.clone(),
                    kind,
                    frames,
                    bytes,
                });
            }
        }
    }

    /// Carries out everything the core asks for, feeding media results
    /// back, until it is quiet.
    async fn drain(&mut self) {
        loop {
            while let Some(out) = self.call.poll_output() {
                match out {
                    Output::ToDevice(batch) => {
                        let messages = batch
                            .messages
                            .into_iter()
                            .map(|m| (m.user_id, m.device_id, m.content))
                            .collect();
                        let _ = self.out_tx.send(OutItem::ToDevice {
                            event_type: batch.event_type,
                            messages,
                        });
                    }
                    Output::PublishState {
                        event_type,
                        state_key,
                        content,
                    } => {
                        let _ = self.out_tx.send(OutItem::State {
                            event_type,
                            state_key,
                            content,
                        });
                    }
                    Output::Media(req) => self.media_request(req).await,
                    Output::Event(e) => {
                        info!(event = ?e, "call");
                        let _ = self.events.send(ClientEvent::Call(e));
                    }
                }
            }
            match self.pending.pop_front() {
                Some(ev) => self.call.handle_media(now_ms(), ev),
                None => break,
            }
        }
        for d in self.call.take_dropped_signalling() {
            let _ = self.events.send(ClientEvent::Signalling {
                sender: d.sender,
                event_type: d.event_type,
                encrypted: false,
                ignored: Some(d.reason.to_string()),
            });
        }
    }

    fn media_feeds(&self) -> Vec<groupcall_media::LocalFeed> {
        self.call
            .local_feeds()
            .into_iter()
            .map(|f| groupcall_media::LocalFeed {
                stream_id: f.stream_id,
                purpose: match f.purpose {
                    FeedPurpose::Screenshare => groupcall_media::FeedPurpose::Screenshare,
                    _ => groupcall_media::FeedPurpose::Usermedia,
                },
                audio_track_id: f.audio_track_id,
                video_track_id: f.video_track_id,
            })
            .collect()
    }

    async fn ensure_peer(&mut self, handle: PeerHandle, remote: &DeviceKey) -> Result<(), String> {
        if self.peers.contains_key(&handle) {
            return Ok(());
        }
        let config = PeerConfig {
            bind_addrs: self.opts.bind_addrs.clone(),
            ice_servers: self.turn.ice_servers(),
            relay_only: self.opts.relay_only,
            deliver_frames: self.opts.deliver_frames,
            disconnect_timeout: self.opts.liveness.media_disconnect_timeout,
            failed_timeout: self.opts.liveness.media_failed_timeout,
            retransmission: self.opts.retransmission,
            ..PeerConfig::default()
        };
        let (media, mut events) = MediaPeer::new(config).await.map_err(|e| e.to_string())?;
        let tx = self.media_tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                if tx.send((handle, ev)).is_err() {
                    break;
                }
            }
        });
        self.peers.insert(
            handle,
            Peer {
                media,
                device: remote.clone(),
                sourced: Vec::new(),
                remote_tracks: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Gives every local track of the peer a source (once).
    /// Sends a pushed frame on the camera/microphone track of its kind to
    /// every peer.
    fn push_frame(&mut self, kind: TrackKind, data: std::sync::Arc<[u8]>, duration: Duration) {
        let feeds = self.call.local_feeds();
        let Some(track) = feeds
            .iter()
            .find(|f| f.purpose == FeedPurpose::Usermedia)
            .and_then(|f| match kind {
                TrackKind::Audio => f.audio_track_id.clone(),
                TrackKind::Video => f.video_track_id.clone(),
            })
        else {
            return;
        };
        for peer in self.peers.values() {
            if let Err(e) = peer.media.send_frame(&track, data.clone(), duration) {
                debug!("pushed frame not sent: {e}");
            }
        }
    }

    fn attach_sources(&mut self, handle: PeerHandle, feeds: &[groupcall_media::LocalFeed]) {
        let Some(peer) = self.peers.get_mut(&handle) else {
            return;
        };
        for f in feeds {
            if let Some(t) = &f.audio_track_id
                && !peer.sourced.contains(t)
            {
                let src = match &self.opts.audio {
                    AudioSource::File(p) => OggOpusSource::open(p).ok(),
                    AudioSource::Push => None,
                    _ => Some(OggOpusSource::tone()),
                };
                if let Some(src) = src
                    && peer.media.set_source(t, src).is_ok()
                {
                    peer.sourced.push(t.clone());
                }
            }
            if let Some(t) = &f.video_track_id
                && !peer.sourced.contains(t)
            {
                let src = match (&self.opts.video, f.purpose) {
                    (VideoSource::File(p), groupcall_media::FeedPurpose::Usermedia) => {
                        IvfSource::open(p).ok()
                    }
                    (VideoSource::Push, groupcall_media::FeedPurpose::Usermedia) => None,
                    _ => IvfSource::test_pattern().ok(),
                };
                if let Some(src) = src
                    && peer.media.set_source(t, src).is_ok()
                {
                    peer.sourced.push(t.clone());
                }
            }
        }
    }

    async fn media_request(&mut self, req: MediaRequest) {
        match req {
            MediaRequest::CreateOffer {
                peer,
                remote,
                feeds: _,
                ice_restart,
            } => {
                let feeds = self.media_feeds();
                let r = match self.ensure_peer(peer, &remote).await {
                    Err(e) => Err(e),
                    Ok(()) => {
                        let media = &self.peers[&peer].media;
                        let sdp = if ice_restart {
                            media.restart_ice(&feeds).await
                        } else {
                            media.create_offer(&feeds).await
                        };
                        sdp.map_err(|e| e.to_string())
                    }
                };
                match r {
                    Ok(sdp) => {
                        self.attach_sources(peer, &feeds);
                        self.pending.push_back(MediaEvent::OfferCreated {
                            peer,
                            sdp,
                            gathering_complete: true,
                        });
                    }
                    Err(message) => self.pending.push_back(MediaEvent::Error { peer, message }),
                }
            }
            MediaRequest::AcceptOffer {
                peer,
                remote,
                sdp,
                feeds: _,
            } => {
                let feeds = self.media_feeds();
                let r = match self.ensure_peer(peer, &remote).await {
                    Err(e) => Err(e),
                    Ok(()) => self.peers[&peer]
                        .media
                        .accept_offer(&sdp, &feeds)
                        .await
                        .map_err(|e| e.to_string()),
                };
                match r {
                    Ok(sdp) => {
                        self.attach_sources(peer, &feeds);
                        self.pending.push_back(MediaEvent::AnswerCreated {
                            peer,
                            sdp,
                            gathering_complete: true,
                        });
                    }
                    Err(message) => self.pending.push_back(MediaEvent::Error { peer, message }),
                }
            }
            MediaRequest::ApplyAnswer { peer, sdp } => {
                if let Some(p) = self.peers.get(&peer)
                    && let Err(e) = p.media.apply_answer(&sdp).await
                {
                    self.pending.push_back(MediaEvent::Error {
                        peer,
                        message: e.to_string(),
                    });
                }
            }
            MediaRequest::AddRemoteCandidates { peer, candidates } => {
                if let Some(p) = self.peers.get(&peer) {
                    for c in candidates {
                        let idx = c.sdp_m_line_index.and_then(|i| u16::try_from(i).ok());
                        if let Err(e) = p
                            .media
                            .add_remote_candidate(&c.candidate, c.sdp_mid.as_deref(), idx)
                            .await
                        {
                            debug!("remote candidate refused: {e}");
                        }
                    }
                }
            }
            MediaRequest::SetMuted {
                audio_muted,
                video_muted,
            } => {
                let feeds = self.call.local_feeds();
                for p in self.peers.values() {
                    for f in feeds.iter().filter(|f| f.purpose == FeedPurpose::Usermedia) {
                        if let Some(t) = &f.audio_track_id {
                            let _ = p.media.set_muted(t, audio_muted);
                        }
                        if let Some(t) = &f.video_track_id {
                            let _ = p.media.set_muted(t, video_muted);
                        }
                    }
                }
            }
            MediaRequest::ClosePeer { peer } => self.close_peer(peer).await,
        }
    }

    async fn close_peer(&mut self, handle: PeerHandle) {
        if let Some(peer) = self.peers.remove(&handle) {
            match peer.media.finish_sinks().await {
                Ok(errors) => {
                    for e in errors {
                        warn!("recording: {e}");
                    }
                }
                Err(e) => debug!("finishing sinks: {e}"),
            }
            let _ = peer.media.close().await;
        }
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
