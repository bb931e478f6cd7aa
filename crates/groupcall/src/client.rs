//! The async group call client: drives the sans-IO core
//! ([`groupcall_proto::GroupCall`]) with a Matrix session (state, to-device)
//! and str0m media peers ([`groupcall_media::MediaPeer`]).
//!
//! One tokio task owns the core. Inputs (sync, media events, user commands,
//! timers) go into the core; its outputs are carried out here: state events
//! and to-device messages through one ordered outbox task (so that `seq`
//! order on the wire matches the order the core produced), media requests
//! through one small worker task per peer (`peer_worker`), which
//! carries out that peer's operations in order and reports each result back
//! as a [`MediaEvent`]: the driver's loop never awaits a media operation, so
//! one peer's ICE gathering delays neither the others nor sync, timers and
//! commands.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use groupcall_media::{
    IvfRecorder, IvfSource, MediaPeer, OggOpusRecorder, OggOpusSource, PeerConfig, PeerEvent,
    PeerStats, SinkFilter, TrackKind,
};
use groupcall_proto::events::{self, FeedPurpose};
use groupcall_proto::{
    CallEvent, Command, Config, CreateOptions, DeviceKey, GroupCall, IncomingToDevice, MediaEvent,
    MediaRequest, MediaState, Now, Output, PeerHandle,
};
use serde_json::Value;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
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
    /// Test only (cargo feature `faults`): the fault layer of our media
    /// UDP (loss, an incoming rate cap, a black hole), see
    /// [`groupcall_media::MediaFaults`]; keep a clone to change it during
    /// the call.
    #[cfg(feature = "faults")]
    pub media_faults: Option<groupcall_media::MediaFaults>,
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
    /// How long a STUN server's answer or a TURN allocation may take before
    /// that server is given up (default 1.5 s). Gathering is done once for
    /// all of a participant's peers; candidates found after an offer or
    /// answer went out are trickled to that peer.
    pub stun_timeout: Duration,
    /// The focus (MSC3898 SFU) to publish to: named in our member entry
    /// (`m.foci.active`), called once; members that use a focus too are
    /// then met there rather than in the mesh. Default none: full mesh.
    pub focus: Option<groupcall_proto::FocusRef>,
    /// Choose the focus from the members' `m.foci.active` and follow them
    /// when they move (`focus` is then the preferred one); see
    /// `groupcall_proto::Config::follow_foci`. Default false.
    pub follow_foci: bool,
    /// Simulcast to the focus (issue 12): our camera video goes to a focus
    /// in layers (the built-in pattern as 320x180 "q", 640x360 "h" and
    /// 1280x720 "f"; pushed frames as the layers the application pushes
    /// with [`FramePusher::push_layers`]; a video file goes as one layer,
    /// under the lowest RID), and the top layers pause while
    /// the uplink estimate is too low for them (the thresholds are in the
    /// config; see [`groupcall_media::simulcast`]), reported as
    /// [`ClientEvent::SimulcastLayers`]. A focus whose answer does not
    /// accept simulcast gets one layer. Mesh peers always get one layer.
    /// Default: on, with [`groupcall_media::SimulcastConfig::default`]
    /// (see `SIMULCAST_DEFAULT` in this file); `None`: one layer to the
    /// focus too.
    pub simulcast: Option<groupcall_media::SimulcastConfig>,
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
            #[cfg(feature = "faults")]
            media_faults: None,
            wait_for_call: false,
            retransmission: true,
            stun_timeout: Duration::from_millis(1500),
            focus: None,
            follow_foci: false,
            simulcast: SIMULCAST_DEFAULT.then(groupcall_media::SimulcastConfig::default),
        }
    }
}

/// Whether [`JoinOptions::new`] turns simulcast to the focus on: yes, the
/// focus forwards each subscriber the layer it asks for
/// (`groupcall-focus/tests/simulcast_call.rs`). It was off while two focus
/// tests failed with it on; their causes, fixed: a renegotiation glare
/// (`tests/glare.rs`) lost the call's media because a rolled-back offer
/// did not put back the tracks it had removed (with simulcast the client
/// reused another m-line, which exposed it); the others' video fell while
/// one subscriber was throttled (`tests/media_path.rs`) because the uplink
/// governor paused the top layer on every back-off of the delay-based
/// estimate (see `SimulcastConfig::drop_factor`) and each pause froze the
/// subscribers on that layer until the focus saw it stale. Still racing
/// there: with simulcast the focus takes a throttled subscriber down its
/// layers before it stops its video (two steps with 2 s settles, then two
/// loss reports: 6 to 8 s after the cap), and the test checks the stop
/// 8 s after the cap. (A focus that
/// accepts simulcast in its answer but forwards one layer per track mixes
/// the three layers into one stream: set [`JoinOptions::simulcast`] to
/// `None` for such a focus.)
const SIMULCAST_DEFAULT: bool = true;

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
    /// Media counters of one remote track (totals), every `stats_interval`
    /// and at once when the track's first frame arrives.
    Media {
        /// Remote device.
        device: DeviceKey,
        /// Stream id.
        stream_id: String,
        /// The m-line it arrives on (of the peer connection with `device`,
        /// or with the focus): a stream renegotiated onto a new m-line
        /// (a focus forwarding it again) counts from 0 under a new mid.
        mid: String,
        /// Audio or video.
        kind: TrackKind,
        /// Frames received so far.
        frames: u64,
        /// Bytes received so far.
        bytes: u64,
    },
    /// A peer asked for a key frame of one of our video tracks that has no
    /// source able to make one ([`VideoSource::Push`]): push a key frame
    /// next. Through a focus, `device` is the focus, asking on behalf of its
    /// subscribers (it coalesces their requests).
    KeyframeRequested {
        /// The peer that asked (a mesh peer or the focus).
        device: DeviceKey,
        /// Our track.
        track_id: String,
        /// The simulcast layer (RID) asked for, when we send simulcast:
        /// push a key frame of that layer ([`FramePusher::push_layers`]).
        rid: Option<String>,
        /// A FIR (full intra request) rather than a PLI.
        fir: bool,
    },
    /// The simulcast layers we send to a peer (the focus) changed: the
    /// uplink estimate paused the top layers or let them resume (see
    /// [`JoinOptions::simulcast`]); also reported once when they start.
    SimulcastLayers {
        /// The peer (the focus).
        device: DeviceKey,
        /// Our track.
        track_id: String,
        /// The RIDs sent, lowest first.
        sending: Vec<String>,
        /// The RIDs paused, lowest first.
        paused: Vec<String>,
        /// The uplink estimate that decided it, bits per second.
        estimate_bps: Option<u64>,
    },
    /// A peer (or the focus, for its subscribers or its upload limit)
    /// asked us to keep what we send it under this bitrate (RTCP REMB on
    /// one of our video tracks), reported when it changes: a target for
    /// applications that encode their own media ([`VideoSource::Push`]).
    /// The built-in sources do not adapt.
    TargetBitrate {
        /// The peer that asked.
        device: DeviceKey,
        /// The limit, bits per second.
        bps: u64,
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

/// What the application pushed.
#[derive(Debug)]
enum PushedFrame {
    /// One frame of the camera/microphone track of a kind.
    One(TrackKind, std::sync::Arc<[u8]>, Duration),
    /// One instant of the camera video in simulcast layers.
    Layers(Vec<(String, std::sync::Arc<[u8]>)>, Duration),
}

impl FramePusher {
    /// Sends one instant of our camera video as simulcast layers: one VP8
    /// frame per layer, `(RID, frame)` lowest first (e.g. "q", "h", "f";
    /// RIDs of 1 to 8 letters or digits). The focus gets every layer under
    /// its RID when it accepted simulcast ([`JoinOptions::simulcast`]);
    /// other peers get the middle layer given. A key frame request for a
    /// layer names its RID ([`ClientEvent::KeyframeRequested`]). `false`
    /// when the call has ended.
    pub fn push_layers(
        &self,
        layers: Vec<(String, std::sync::Arc<[u8]>)>,
        duration: Duration,
    ) -> bool {
        self.0.send(PushedFrame::Layers(layers, duration)).is_ok()
    }

    /// Sends one encoded frame (an Opus packet or a VP8 frame) of our
    /// camera/microphone feed to every peer; `duration` is its play time.
    /// `false` when the call has ended.
    pub fn push(
        &self,
        kind: TrackKind,
        data: impl Into<std::sync::Arc<[u8]>>,
        duration: Duration,
    ) -> bool {
        self.0
            .send(PushedFrame::One(kind, data.into(), duration))
            .is_ok()
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

/// The time for the core: monotonic ms since this process first asked
/// (every timer runs on it) and the wall clock (only `expires_ts` and call
/// ids use it).
fn clock_now() -> Now {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    Now {
        mono_ms: origin.elapsed().as_millis() as u64,
        unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
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
    // A room just joined over federation can be missing from the first
    // syncs: Synapse joins remote rooms with partial state and leaves such
    // rooms out of (non-lazy-loading) syncs until it has the full state, so
    // the power levels are not known yet. Wait for the sync that brings
    // them (a refusal is final).
    let state_wait = tokio::time::Instant::now();
    let state_deadline = state_wait + Duration::from_secs(60);
    loop {
        match session
            .ensure_can_send_state(&room_id, events::CALL_MEMBER_UNSTABLE)
            .await
        {
            Ok(()) => {
                let waited = state_wait.elapsed();
                if waited > Duration::from_millis(100) {
                    info!(room = %room_id, waited_ms = waited.as_millis() as u64, "room state synced");
                }
                break;
            }
            Err(e @ MatrixError::NotPermitted { .. }) => return Err(e.into()),
            Err(e) => {
                if tokio::time::Instant::now() >= state_deadline {
                    return Err(e.into());
                }
                debug!(error = %e, room = %room_id, "room state not synced yet; checking again");
                // Sync goes on meanwhile (only the first response and
                // reconnections are reported as `Synced`): keep what it
                // delivers and look again shortly.
                let pause = tokio::time::sleep(Duration::from_millis(200));
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        input = sync_rx.recv() => match input {
                            Some(MatrixInput::Disconnected { error, fatal: true }) => {
                                return Err(ClientError::SyncStopped(error));
                            }
                            Some(other) => early.push(other),
                            None => return Err(ClientError::SyncStopped("sync ended".into())),
                        },
                        () = &mut pause => break,
                    }
                }
            }
        }
    }
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
    if opts.focus.is_some() {
        cfg.focus = opts.focus.clone();
    }
    if opts.follow_foci {
        cfg.follow_foci = true;
    }
    if cfg.session_id.is_none() {
        cfg.session_id = Some(session.call_session_id().to_owned());
    }
    let mut call = GroupCall::new(cfg);

    // Load the room's current call state from the homeserver, then what the
    // first sync brought.
    // One request for the whole state; room members first, then calls,
    // then call members, as the core expects them.
    let now = clock_now();
    let types = [
        events::ROOM_MEMBER,
        events::CALL_UNSTABLE,
        events::CALL,
        events::CALL_MEMBER_UNSTABLE,
        events::CALL_MEMBER,
    ];
    for ev in session.fetch_room_states(&room_id, &types).await? {
        if let Err(e) = call.handle_state(now, &ev) {
            debug!("ignoring state event: {e}");
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
                    if let Err(e) = call.handle_state(clock_now(), &event) {
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
    let now = clock_now();
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
        let warnings = ev_tx.clone();
        let (l, h) = DelayedLeave::start(
            session.clone(),
            room_id.clone(),
            &opts.liveness,
            Box::new(move |w| {
                let _ = warnings.send(ClientEvent::Warning(w));
            }),
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
        media_host: None,
        media_tx,
        out_tx,
        events: ev_tx,
        workers: JoinSet::new(),
        muted: (false, false),
        recordings: Vec::new(),
        stream_owners: BTreeMap::new(),
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

/// Sends state events and to-device messages in the order the core
/// produced them. What is queued at the same moment is coalesced: between
/// two state events (or flushes), to-device messages go out in as few
/// `sendToDevice` requests as possible, one per event type unless a
/// recipient's order forbids it (see [`crate::matrix::batch::merge`]).
async fn outbox(
    session: MatrixSession,
    room_id: String,
    (encrypt, require_encrypted): (bool, bool),
    mut rx: mpsc::UnboundedReceiver<OutItem>,
    ack: mpsc::UnboundedSender<()>,
    events: mpsc::UnboundedSender<ClientEvent>,
    #[cfg_attr(not(feature = "faults"), allow(unused_mut))] mut hooks: OutboxHooks,
) {
    use crate::matrix::batch::{ToDeviceBatch, merge};
    let keyless = if require_encrypted {
        KeylessDevices::Refuse
    } else {
        KeylessDevices::Plaintext
    };
    let mut modes = SendModes::default();
    while let Some(first) = rx.recv().await {
        // Everything queued now; a yield lets a producer that is still
        // running finish its burst (a few rounds at most, so that a steady
        // stream cannot hold the first item back).
        let mut items = vec![first];
        for _ in 0..4 {
            while let Ok(more) = rx.try_recv() {
                items.push(more);
            }
            tokio::task::yield_now().await;
            if rx.is_empty() {
                break;
            }
        }
        while let Ok(more) = rx.try_recv() {
            items.push(more);
        }
        let mut run: Vec<ToDeviceBatch> = Vec::new();
        let mut items = items.into_iter();
        loop {
            let item = items.next();
            if let Some(OutItem::ToDevice {
                event_type,
                messages,
            }) = item
            {
                #[cfg(feature = "faults")]
                let messages = match &mut hooks.faults {
                    Some(f) => crate::faults::outgoing(f, &session, &event_type, messages, encrypt),
                    None => messages,
                };
                run.push(ToDeviceBatch {
                    event_type,
                    messages,
                });
                continue;
            }
            // A state event, a flush or the end: send the to-device run
            // queued before it first.
            let queued = run.len();
            let merged = merge(std::mem::take(&mut run));
            if queued > 0 {
                debug!(
                    user_id = session.user_id(),
                    queued,
                    requests = ?merged
                        .iter()
                        .map(|b| (b.event_type.as_str(), b.messages.len()))
                        .collect::<Vec<_>>(),
                    "outbox: to-device sends coalesced"
                );
            }
            for batch in merged {
                let ToDeviceBatch {
                    event_type,
                    messages,
                } = batch;
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
            match item {
                Some(OutItem::State {
                    event_type,
                    state_key,
                    content,
                }) => {
                    let member = events::is_call_member_type(&event_type);
                    if member
                        && state_key == session.user_id()
                        && let Some(h) = &hooks.member_published
                    {
                        h.publishing(&event_type, &content).await;
                    }
                    match session
                        .publish_state(&room_id, &event_type, &state_key, &content)
                        .await
                    {
                        Ok(()) => {
                            if member {
                                let _ = ack.send(());
                                if let Some(h) = &hooks.member_published
                                    && state_key == session.user_id()
                                {
                                    h.published(&event_type, &content);
                                }
                            }
                        }
                        Err(e) => {
                            warn!(%event_type, "state send failed: {e}");
                            let _ = events.send(ClientEvent::Warning(format!(
                                "sending {event_type} failed: {e}"
                            )));
                        }
                    }
                }
                Some(OutItem::Flush(done)) => {
                    let _ = done.send(());
                }
                Some(OutItem::ToDevice { .. }) | None => break,
            }
        }
    }
}

struct Peer {
    /// Operations for the peer's worker, carried out in order.
    ops: mpsc::UnboundedSender<PeerOp>,
    /// Dropped with the peer: tells its worker to finish the sinks and close
    /// the connection (abandoning operations not yet carried out).
    _close: oneshot::Sender<()>,
    /// The media peer, once its worker has made it (the worker reports it
    /// before any result or event of the peer).
    media: Option<Arc<MediaPeer>>,
    /// A stats request is with the worker.
    stats_pending: bool,
    device: DeviceKey,
    /// Local track ids that already have a source.
    sourced: Vec<String>,
    /// stream id -> (kind) of remote tracks seen.
    remote_tracks: BTreeMap<(String, &'static str), String>,
    /// The peer is our focus (MSC3898): its remote streams are other
    /// participants', and it has the data channel.
    focus: bool,
    /// The last bitrate limit it gave us (reported when it changes).
    bitrate_limit: Option<u64>,
}

/// Everything the driver task listens to.
struct Inputs {
    sync: crate::matrix::SyncHandle,
    sync_rx: mpsc::Receiver<MatrixInput>,
    cmd_rx: mpsc::UnboundedReceiver<Command>,
    media_rx: mpsc::UnboundedReceiver<(PeerHandle, FromPeer)>,
    ack_rx: mpsc::UnboundedReceiver<()>,
    push_rx: mpsc::UnboundedReceiver<PushedFrame>,
}

struct Driver {
    call: GroupCall,
    room_id: String,
    opts: JoinOptions,
    peers: HashMap<PeerHandle, Peer>,
    /// This participant's media peer set: every peer shares its sockets
    /// (one per bound address) and TURN allocations. Made with the first
    /// peer.
    media_host: Option<groupcall_media::MediaHost>,
    /// Where the peers' workers report results and events.
    media_tx: mpsc::UnboundedSender<(PeerHandle, FromPeer)>,
    out_tx: mpsc::UnboundedSender<OutItem>,
    events: mpsc::UnboundedSender<ClientEvent>,
    /// The peers' workers, also those still closing their peer.
    workers: JoinSet<()>,
    /// The last mute state asked for (audio, video): a peer made later
    /// starts with it.
    muted: (bool, bool),
    recordings: Vec<PathBuf>,
    /// Who publishes each stream the focus forwards to us (from the core's
    /// `FeedAdded`): their media is reported as theirs.
    stream_owners: BTreeMap<String, DeviceKey>,
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
        self.drain();
        let mut stats = tokio::time::interval(self.opts.stats_interval);
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let result = loop {
            let wake = self.call.poll_timeout().map(|t| {
                let d = Duration::from_millis(t.saturating_sub(clock_now().mono_ms));
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
                Some((handle, msg)) = media_rx.recv() => self.on_worker(handle, msg),
                cmd = cmd_rx.recv() => {
                    let cmd = cmd.unwrap_or(Command::Leave);
                    let leaving = matches!(cmd, Command::Leave | Command::Terminate);
                    if let Err(e) = self.call.handle_command(clock_now(), cmd) {
                        let _ = self.events.send(ClientEvent::Warning(e.to_string()));
                    }
                    if leaving && self.call.joined_call_id().is_none() {
                        self.drain();
                        break Ok(());
                    }
                }
                Some(()) = ack_rx.recv() => self.call.handle_membership_published(clock_now()),
                _ = timer => self.call.handle_timeout(clock_now()),
                _ = stats.tick() => self.request_stats(),
                Some(pushed) = push_rx.recv() => self.push_frame(pushed),
            }
            self.drain();
            // Forget the workers that have closed their peer.
            while self.workers.try_join_next().is_some() {}
            if self.call.joined_call_id().is_none() {
                // The call ended under us (terminated by someone else).
                break Ok(());
            }
        };
        // Close every peer: each worker finishes its sinks (recordings) and
        // closes the connection, all at once and bounded. Then flush the
        // outbox and stop.
        self.peers.clear();
        let closing = async { while self.workers.join_next().await.is_some() {} };
        if tokio::time::timeout(CLOSE_ALL_WAIT, closing).await.is_err() {
            warn!("media peers still closing after {CLOSE_ALL_WAIT:?}; leaving them");
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
        let now = clock_now();
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
                // What became of it comes out of the core as
                // `Output::Signalling` (see `drain`).
                self.call.handle_to_device(
                    now,
                    IncomingToDevice {
                        sender,
                        sender_device,
                        event_type,
                        content,
                        encrypted,
                    },
                );
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
            PeerEvent::FirstFrame {
                stream_id,
                kind,
                mid,
                received,
            } => {
                // Reported now rather than at the next `stats_interval`:
                // when media starts flowing is what a caller waits for.
                if let Some(peer) = self.peers.get(&handle) {
                    self.report_track(&peer.device, peer.focus, stream_id, mid, kind, received);
                }
                None
            }
            PeerEvent::ChannelOpen { .. } => {
                self.call
                    .handle_media(clock_now(), MediaEvent::ChannelOpen { peer: handle });
                None
            }
            PeerEvent::ChannelMessage { text } => {
                self.call.handle_media(
                    clock_now(),
                    MediaEvent::ChannelMessage { peer: handle, text },
                );
                None
            }
            PeerEvent::ChannelClosed => {
                self.call
                    .handle_media(clock_now(), MediaEvent::ChannelClosed { peer: handle });
                None
            }
            PeerEvent::RemoteTrack {
                stream_id,
                track_id,
                kind,
                ..
            } => {
                let owner = self.stream_owners.get(&stream_id).cloned();
                if let Some(peer) = self.peers.get_mut(&handle)
                    && let Some(media) = peer.media.clone()
                {
                    // Through a focus, the stream is its publisher's.
                    let device = match (peer.focus, owner) {
                        (true, Some(owner)) => owner,
                        _ => peer.device.clone(),
                    };
                    if kind == TrackKind::Video {
                        let _ = media.request_keyframe(&track_id);
                    }
                    let first = peer
                        .remote_tracks
                        .insert((stream_id.clone(), kind.as_str()), track_id.clone())
                        .is_none();
                    if first && let Some(dir) = &self.opts.record_dir {
                        let name = sanitize(&format!(
                            "{}_{}_{}",
                            device.user_id, device.device_id, stream_id
                        ));
                        let ext = match kind {
                            TrackKind::Audio => "ogg",
                            TrackKind::Video => "ivf",
                        };
                        // The same stream can arrive over two peers (a mesh
                        // call and the focus, while one takes over from the
                        // other): each gets its own file, none overwritten.
                        let mut path = dir.join(format!("{name}.{ext}"));
                        let mut n = 1;
                        while self.recordings.contains(&path) {
                            n += 1;
                            path = dir.join(format!("{name}-{n}.{ext}"));
                        }
                        let filter = SinkFilter::stream(stream_id.clone(), kind);
                        let added = match kind {
                            TrackKind::Audio => {
                                OggOpusRecorder::create(&path).map(|r| media.add_sink(filter, r))
                            }
                            TrackKind::Video => {
                                IvfRecorder::create(&path).map(|r| media.add_sink(filter, r))
                            }
                        };
                        match added {
                            Ok(_) => self.recordings.push(path),
                            Err(e) => warn!("cannot record {}: {e}", path.display()),
                        }
                    }
                    let _ = self.events.send(ClientEvent::RemoteTrack {
                        device,
                        stream_id,
                        track_id,
                        kind,
                    });
                }
                None
            }
            PeerEvent::BitrateLimit { bps, .. } => {
                // Senders repeat REMB (about once a second): report changes.
                if let Some(peer) = self.peers.get_mut(&handle)
                    && peer.bitrate_limit.replace(bps) != Some(bps)
                {
                    let _ = self.events.send(ClientEvent::TargetBitrate {
                        device: peer.device.clone(),
                        bps,
                    });
                }
                None
            }
            PeerEvent::KeyframeRequested {
                track_id, rid, fir, ..
            } => {
                if let Some(peer) = self.peers.get(&handle) {
                    let _ = self.events.send(ClientEvent::KeyframeRequested {
                        device: peer.device.clone(),
                        track_id,
                        rid: rid.map(|r| r.to_string()),
                        fir,
                    });
                }
                None
            }
            PeerEvent::SimulcastLayers {
                track_id,
                sending,
                paused,
                estimate_bps,
                ..
            } => {
                if let Some(peer) = self.peers.get(&handle) {
                    let _ = self.events.send(ClientEvent::SimulcastLayers {
                        device: peer.device.clone(),
                        track_id,
                        sending,
                        paused,
                        estimate_bps,
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
                    clock_now(),
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
                clock_now(),
                MediaEvent::State {
                    peer: handle,
                    state,
                },
            );
        }
    }

    /// Handles what a peer's worker reported: results go into the core as
    /// the [`MediaEvent`] they answer, peer events as before.
    fn on_worker(&mut self, handle: PeerHandle, msg: FromPeer) {
        // A closed peer's worker may have reported before it noticed: the
        // core has forgotten the handle, so nothing of it matters.
        let Some(peer) = self.peers.get_mut(&handle) else {
            return;
        };
        match msg {
            FromPeer::Created(media) => peer.media = Some(media),
            FromPeer::Offer { sdp, feeds } => {
                self.attach_sources(handle, &feeds);
                self.call.handle_media(
                    clock_now(),
                    MediaEvent::OfferCreated {
                        peer: handle,
                        sdp,
                        gathering_complete: true,
                    },
                );
            }
            FromPeer::Answer { sdp, feeds } => {
                self.attach_sources(handle, &feeds);
                self.call.handle_media(
                    clock_now(),
                    MediaEvent::AnswerCreated {
                        peer: handle,
                        sdp,
                        gathering_complete: true,
                    },
                );
            }
            FromPeer::Failed(message) => self.call.handle_media(
                clock_now(),
                MediaEvent::Error {
                    peer: handle,
                    message,
                },
            ),
            FromPeer::Event(ev) => self.on_peer_event(handle, ev),
            FromPeer::Stats(stats) => {
                peer.stats_pending = false;
                if let Some(stats) = stats {
                    let device = peer.device.clone();
                    let focus = peer.focus;
                    self.report_stats(device, focus, stats);
                }
            }
        }
    }

    /// Keeps who publishes each remote stream, for the media the focus
    /// forwards.
    fn note_stream_owner(&mut self, e: &CallEvent) {
        match e {
            CallEvent::FeedAdded {
                device, stream_id, ..
            } => {
                self.stream_owners.insert(stream_id.clone(), device.clone());
            }
            CallEvent::FeedRemoved { stream_id, .. } => {
                self.stream_owners.remove(stream_id);
            }
            _ => {}
        }
    }

    /// Asks every peer's worker for its counters (reported in
    /// [`Driver::on_worker`]); at most one request per peer at a time.
    fn request_stats(&mut self) {
        for peer in self.peers.values_mut() {
            if !peer.stats_pending && peer.ops.send(PeerOp::Stats).is_ok() {
                peer.stats_pending = true;
            }
        }
    }

    /// One remote track's counters as [`ClientEvent::Media`]: through a
    /// focus, each stream is its publisher's.
    fn report_track(
        &self,
        device: &DeviceKey,
        focus: bool,
        stream_id: String,
        mid: String,
        kind: TrackKind,
        received: groupcall_media::Counters,
    ) {
        let owner = focus.then(|| self.stream_owners.get(&stream_id)).flatten();
        let _ = self.events.send(ClientEvent::Media {
            device: owner.unwrap_or(device).clone(),
            stream_id,
            mid,
            kind,
            frames: received.frames,
            bytes: received.bytes,
        });
    }

    fn report_stats(&self, device: DeviceKey, focus: bool, stats: PeerStats) {
        for t in stats.remote {
            self.report_track(&device, focus, t.stream_id, t.mid, t.kind, t.received);
        }
        let mut sent: BTreeMap<&'static str, (TrackKind, u64, u64)> = BTreeMap::new();
        for t in stats.local {
            let e = sent.entry(t.kind.as_str()).or_insert((t.kind, 0, 0));
            e.1 += t.sent.frames;
            e.2 += t.sent.bytes;
        }
        for (_, (kind, frames, bytes)) in sent {
            let _ = self.events.send(ClientEvent::MediaSent {
                device: device.clone(),
                kind,
                frames,
                bytes,
            });
        }
    }

    /// Carries out everything the core asks for until it is quiet. Media
    /// requests only go to the peers' workers: their results come back
    /// later through [`Driver::on_worker`].
    fn drain(&mut self) {
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
                Output::Media(req) => self.media_request(req),
                Output::Event(e) => {
                    info!(event = ?e, "call");
                    self.note_stream_owner(&e);
                    let _ = self.events.send(ClientEvent::Call(e));
                }
                Output::Signalling(r) => {
                    let _ = self.events.send(ClientEvent::Signalling {
                        sender: r.sender,
                        event_type: r.event_type,
                        encrypted: r.encrypted,
                        ignored: r.outcome.err().map(|e| e.to_string()),
                    });
                }
                other => warn!("core output not handled by this driver: {other:?}"),
            }
        }
    }

    /// This participant's media host (its sockets and TURN allocations,
    /// shared by all its peers), made with the first peer.
    fn media_host(&mut self) -> Result<groupcall_media::MediaHost, String> {
        if let Some(h) = &self.media_host {
            return Ok(h.clone());
        }
        #[cfg(feature = "faults")]
        let h = match &self.opts.media_faults {
            Some(f) => {
                groupcall_media::MediaHost::spawn_with_faults(&self.opts.bind_addrs, f.clone())
            }
            None => groupcall_media::MediaHost::spawn(&self.opts.bind_addrs),
        };
        #[cfg(not(feature = "faults"))]
        let h = groupcall_media::MediaHost::spawn(&self.opts.bind_addrs);
        let h = h.map_err(|e| format!("media sockets: {e}"))?;
        info!(sockets = h.socket_count(), addrs = ?h.local_addrs(), "media host");
        self.media_host = Some(h.clone());
        Ok(h)
    }

    /// The peer of `handle`, with a worker started for it if it is new (the
    /// worker makes the media peer before carrying out anything else).
    fn peer_or_start(&mut self, handle: PeerHandle, remote: &DeviceKey, focus: bool) -> &mut Peer {
        let host = (!self.peers.contains_key(&handle)).then(|| self.media_host());
        match self.peers.entry(handle) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let host = host.unwrap_or_else(|| Err("no media host".into()));
                let config = PeerConfig {
                    bind_addrs: self.opts.bind_addrs.clone(),
                    ice_servers: self.turn.ice_servers(),
                    relay_only: self.opts.relay_only,
                    deliver_frames: self.opts.deliver_frames,
                    disconnect_timeout: self.opts.liveness.media_disconnect_timeout,
                    failed_timeout: self.opts.liveness.media_failed_timeout,
                    retransmission: self.opts.retransmission,
                    stun_timeout: self.opts.stun_timeout,
                    data_channel: focus,
                    simulcast: if focus {
                        self.opts.simulcast.clone()
                    } else {
                        None
                    },
                    ..PeerConfig::default()
                };
                let (ops_tx, ops_rx) = mpsc::unbounded_channel();
                let (close_tx, close_rx) = oneshot::channel();
                self.workers.spawn(peer_worker(
                    handle,
                    host,
                    config,
                    ops_rx,
                    close_rx,
                    self.media_tx.clone(),
                ));
                e.insert(Peer {
                    ops: ops_tx,
                    _close: close_tx,
                    media: None,
                    stats_pending: false,
                    bitrate_limit: None,
                    device: remote.clone(),
                    sourced: Vec::new(),
                    remote_tracks: BTreeMap::new(),
                    focus,
                })
            }
        }
    }

    /// Like [`Driver::peer_or_start`]; a new peer is first muted as asked before
    /// (the core's `SetMuted` only reaches the peers that exist when it is
    /// made): its tracks are made by the offer or answer that follows.
    fn start_muted(
        &mut self,
        handle: PeerHandle,
        remote: &DeviceKey,
        feeds: &[groupcall_media::LocalFeed],
        focus: bool,
    ) -> &mut Peer {
        let new = !self.peers.contains_key(&handle);
        let muted = self.muted;
        let p = self.peer_or_start(handle, remote, focus);
        if new && muted != (false, false) {
            let _ = p.ops.send(PeerOp::SetMuted {
                tracks: usermedia_tracks(feeds, muted),
            });
        }
        p
    }

    /// Sends a pushed frame on the camera/microphone track of its kind to
    /// every peer (layers: each peer takes what it negotiated).
    fn push_frame(&mut self, pushed: PushedFrame) {
        let kind = match &pushed {
            PushedFrame::One(kind, ..) => *kind,
            PushedFrame::Layers(..) => TrackKind::Video,
        };
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
        for media in self.peers.values().filter_map(|p| p.media.as_ref()) {
            let r = match &pushed {
                PushedFrame::One(_, data, duration) => {
                    media.send_frame(&track, data.clone(), *duration)
                }
                PushedFrame::Layers(layers, duration) => {
                    media.send_layer_frames(&track, layers.clone(), *duration)
                }
            };
            if let Err(e) = r {
                debug!("pushed frame not sent: {e}");
            }
        }
    }

    /// Gives every local track of the peer a source (once).
    fn attach_sources(&mut self, handle: PeerHandle, feeds: &[groupcall_media::LocalFeed]) {
        let Some(peer) = self.peers.get_mut(&handle) else {
            return;
        };
        let Some(media) = &peer.media else {
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
                    && media.set_source(t, src).is_ok()
                {
                    peer.sourced.push(t.clone());
                }
            }
            if let Some(t) = &f.video_track_id
                && !peer.sourced.contains(t)
            {
                let usermedia = f.purpose == groupcall_media::FeedPurpose::Usermedia;
                // The camera pattern to the focus: its simulcast layers.
                let layered = usermedia
                    && peer.focus
                    && self.opts.simulcast.is_some()
                    && self.opts.video == VideoSource::Pattern;
                let src: Option<Box<dyn groupcall_media::FrameSource>> =
                    match (&self.opts.video, usermedia) {
                        _ if layered => groupcall_media::SimulcastSource::test_pattern()
                            .ok()
                            .map(|s| Box::new(s) as _),
                        (VideoSource::File(p), true) => {
                            IvfSource::open(p).ok().map(|s| Box::new(s) as _)
                        }
                        (VideoSource::Push, true) => None,
                        _ => IvfSource::test_pattern().ok().map(|s| Box::new(s) as _),
                    };
                if let Some(src) = src
                    && media.set_source_boxed(t, src).is_ok()
                {
                    peer.sourced.push(t.clone());
                }
            }
        }
    }

    /// Hands a media request to the peer's worker (starting one for a new
    /// peer); nothing here waits for the media layer.
    fn media_request(&mut self, req: MediaRequest) {
        let op = match req {
            MediaRequest::CreateOffer {
                peer,
                remote,
                feeds,
                ice_restart,
                focus,
                ..
            } => {
                let feeds = media_feeds(feeds);
                let p = self.start_muted(peer, &remote, &feeds, focus);
                let _ = p.ops.send(PeerOp::CreateOffer { feeds, ice_restart });
                return;
            }
            MediaRequest::AcceptOffer {
                peer,
                remote,
                sdp,
                feeds,
            } => {
                let feeds = media_feeds(feeds);
                let p = self.start_muted(peer, &remote, &feeds, false);
                let _ = p.ops.send(PeerOp::AcceptOffer { sdp, feeds });
                return;
            }
            MediaRequest::ApplyAnswer { peer, sdp } => (peer, PeerOp::ApplyAnswer { sdp }),
            MediaRequest::AddRemoteCandidates { peer, candidates } => {
                (peer, PeerOp::AddRemoteCandidates { candidates })
            }
            MediaRequest::SetMuted {
                audio_muted,
                video_muted,
            } => {
                // The request carries no feeds: our camera/microphone tracks.
                self.muted = (audio_muted, video_muted);
                let tracks = usermedia_tracks(&media_feeds(self.call.local_feeds()), self.muted);
                // Through the workers, so that it follows the offers and
                // answers already asked for (and reaches a peer still being
                // made).
                for p in self.peers.values() {
                    let _ = p.ops.send(PeerOp::SetMuted {
                        tracks: tracks.clone(),
                    });
                }
                return;
            }
            MediaRequest::SendChannel { peer, text } => (peer, PeerOp::SendChannel { text }),
            MediaRequest::ClosePeer { peer } => {
                // Dropping it tells the worker to finish the sinks and close.
                self.peers.remove(&peer);
                return;
            }
            other => {
                warn!("media request not handled by this driver: {other:?}");
                return;
            }
        };
        let (peer, op) = op;
        if let Some(p) = self.peers.get(&peer) {
            let _ = p.ops.send(op);
        }
    }
}

/// The camera/microphone tracks of `feeds`, each with its mute state
/// (`muted` is (audio, video)).
fn usermedia_tracks(
    feeds: &[groupcall_media::LocalFeed],
    (audio_muted, video_muted): (bool, bool),
) -> Vec<(String, bool)> {
    let mut tracks = Vec::new();
    for f in feeds {
        if f.purpose != groupcall_media::FeedPurpose::Usermedia {
            continue;
        }
        if let Some(t) = &f.audio_track_id {
            tracks.push((t.clone(), audio_muted));
        }
        if let Some(t) = &f.video_track_id {
            tracks.push((t.clone(), video_muted));
        }
    }
    tracks
}

/// The core's feeds as the media layer takes them.
fn media_feeds(feeds: Vec<groupcall_proto::LocalFeed>) -> Vec<groupcall_media::LocalFeed> {
    feeds
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

/// How long closing one peer may take (finishing its sinks, then closing).
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How long leaving waits for every peer to close.
const CLOSE_ALL_WAIT: Duration = Duration::from_secs(10);

/// A media operation for a peer's worker.
enum PeerOp {
    /// Answered with [`FromPeer::Offer`] or [`FromPeer::Failed`].
    CreateOffer {
        feeds: Vec<groupcall_media::LocalFeed>,
        ice_restart: bool,
    },
    /// Answered with [`FromPeer::Answer`] or [`FromPeer::Failed`].
    AcceptOffer {
        sdp: String,
        feeds: Vec<groupcall_media::LocalFeed>,
    },
    /// Answered with [`FromPeer::Failed`] only if it fails.
    ApplyAnswer { sdp: String },
    /// Not answered (a refused candidate is logged).
    AddRemoteCandidates {
        candidates: Vec<groupcall_proto::signalling::Candidate>,
    },
    /// Not answered: (local track id, muted).
    SetMuted { tracks: Vec<(String, bool)> },
    /// Answered with [`FromPeer::Stats`].
    Stats,
    /// Not answered (a message that cannot be sent is logged; the focus's
    /// pings time out on their own).
    SendChannel { text: String },
}

/// What a peer's worker reports to the driver, in order.
enum FromPeer {
    /// The media peer exists (reported before anything else of the peer).
    Created(Arc<MediaPeer>),
    /// The offer asked for, made with these feeds.
    Offer {
        sdp: String,
        feeds: Vec<groupcall_media::LocalFeed>,
    },
    /// The answer asked for, made with these feeds.
    Answer {
        sdp: String,
        feeds: Vec<groupcall_media::LocalFeed>,
    },
    /// Making the peer or an operation failed.
    Failed(String),
    /// An event of the media peer.
    Event(PeerEvent),
    /// The counters asked for (`None`: the peer could not tell).
    Stats(Option<PeerStats>),
}

/// Carries out one peer's media operations in the order they were asked
/// for, and forwards its events, reporting everything through `tx`. The
/// driver never waits for it: ICE gathering (up to the peer's gathering wait
/// in `create_offer` / `accept_offer`) holds up this peer only.
///
/// Events the peer emits while an operation runs are forwarded after that
/// operation's result, as when the driver awaited operations itself: local
/// candidates found after an offer follow the offer.
///
/// When `close` fires or its sender is dropped (the peer was closed, or the
/// call is over), operations not yet carried out are abandoned and the peer
/// finishes its sinks and closes, each step bounded by [`CLOSE_WAIT`].
async fn peer_worker(
    handle: PeerHandle,
    host: Result<groupcall_media::MediaHost, String>,
    config: PeerConfig,
    mut ops: mpsc::UnboundedReceiver<PeerOp>,
    mut close: oneshot::Receiver<()>,
    tx: mpsc::UnboundedSender<(PeerHandle, FromPeer)>,
) {
    let created = host.and_then(|h| h.new_peer(config).map_err(|e| e.to_string()));
    let (media, mut events) = match created {
        Ok((media, events)) => (Arc::new(media), events),
        Err(e) => {
            // The core closes the peer on this error.
            let _ = tx.send((handle, FromPeer::Failed(e)));
            return;
        }
    };
    if tx.send((handle, FromPeer::Created(media.clone()))).is_err() {
        return;
    }
    let mut events_open = true;
    loop {
        tokio::select! {
            biased;
            _ = &mut close => break,
            ev = events.recv(), if events_open => match ev {
                Some(ev) => {
                    if tx.send((handle, FromPeer::Event(ev))).is_err() {
                        break;
                    }
                }
                None => events_open = false,
            },
            op = ops.recv() => {
                let Some(op) = op else { break };
                let result = tokio::select! {
                    biased;
                    _ = &mut close => break,
                    r = run_op(&media, op) => r,
                };
                if let Some(msg) = result
                    && tx.send((handle, msg)).is_err()
                {
                    break;
                }
            }
        }
    }
    match tokio::time::timeout(CLOSE_WAIT, media.finish_sinks()).await {
        Ok(Ok(errors)) => {
            for e in errors {
                warn!("recording: {e}");
            }
        }
        Ok(Err(e)) => debug!("finishing sinks: {e}"),
        Err(_) => warn!("finishing sinks took longer than {CLOSE_WAIT:?}"),
    }
    if tokio::time::timeout(CLOSE_WAIT, media.close())
        .await
        .is_err()
    {
        warn!("closing a media peer took longer than {CLOSE_WAIT:?}");
    }
}

/// Carries out one operation; what to report, if anything.
async fn run_op(media: &MediaPeer, op: PeerOp) -> Option<FromPeer> {
    match op {
        PeerOp::CreateOffer { feeds, ice_restart } => {
            let sdp = if ice_restart {
                media.restart_ice(&feeds).await
            } else {
                media.create_offer(&feeds).await
            };
            Some(match sdp {
                Ok(sdp) => FromPeer::Offer { sdp, feeds },
                Err(e) => FromPeer::Failed(e.to_string()),
            })
        }
        PeerOp::AcceptOffer { sdp, feeds } => Some(match media.accept_offer(&sdp, &feeds).await {
            Ok(sdp) => FromPeer::Answer { sdp, feeds },
            Err(e) => FromPeer::Failed(e.to_string()),
        }),
        PeerOp::ApplyAnswer { sdp } => media
            .apply_answer(&sdp)
            .await
            .err()
            .map(|e| FromPeer::Failed(e.to_string())),
        PeerOp::AddRemoteCandidates { candidates } => {
            for c in candidates {
                let idx = c.sdp_m_line_index.and_then(|i| u16::try_from(i).ok());
                if let Err(e) = media
                    .add_remote_candidate(&c.candidate, c.sdp_mid.as_deref(), idx)
                    .await
                {
                    debug!("remote candidate refused: {e}");
                }
            }
            None
        }
        PeerOp::SetMuted { tracks } => {
            for (track, muted) in tracks {
                let _ = media.set_muted(&track, muted);
            }
            None
        }
        PeerOp::Stats => Some(FromPeer::Stats(media.stats().await.ok())),
        PeerOp::SendChannel { text } => {
            if let Err(e) = media.send_channel(&text).await {
                warn!("data channel message not sent: {e}");
            }
            None
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

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
