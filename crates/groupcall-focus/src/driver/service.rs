//! The service: login, sync, invites, room call state, HTTP, drain.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use groupcall::matrix::{KeylessDevices, MatrixError, MatrixInput, MatrixSession, SyncOptions};
use groupcall_proto::room::RoomCallState;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::core::{CallToDevice, CoreOutput, FocusCore};
use super::http::{self, Answer, Route};
use crate::config::{Config, ConfigError};
use crate::metrics::{CONTENT_TYPE, Metrics};

/// Refusal reason: an invite from someone not on the allow-list (or whose
/// inviter the invite did not name).
pub const REFUSAL_INVITE_NOT_ALLOWED: &str = "invite_not_allowed";
/// Refusal reason: an invite that arrived while draining.
pub const REFUSAL_INVITE_DRAINING: &str = "invite_draining";

/// How often room state expiry is checked and the core's figures copied.
const TICK: Duration = Duration::from_secs(1);
/// Joins tried for an accepted invite before giving up, `n` seconds apart
/// after the `n`th failure: over federation the inviting server may not
/// have stored the invite yet when its notice reaches us (Synapse asks the
/// invitee's server to sign it first), and refuses an immediate join.
const JOIN_ATTEMPTS: u64 = 5;

/// Joins `room_id`, trying again on failure (see [`JOIN_ATTEMPTS`]).
async fn join_with_retries(session: &MatrixSession, room_id: &str) -> Result<(), MatrixError> {
    let mut attempt = 1;
    loop {
        match session.join_room(room_id).await {
            Ok(_) => return Ok(()),
            Err(e) if attempt < JOIN_ATTEMPTS => {
                warn!(room_id, attempt, error = %e, "focus: joining failed; trying again");
                tokio::time::sleep(Duration::from_secs(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Why the service could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The configuration (or a secret it names) is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The HTTP endpoint could not be bound.
    #[error("cannot listen on http_listen {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Logging in (or restoring the stored device) failed.
    #[error("logging in: {0}")]
    Login(#[source] MatrixError),
    /// The sync loop ended for good (e.g. the access token was revoked).
    #[error("syncing stopped: {0}")]
    SyncStopped(String),
    /// The service's task ended abnormally.
    #[error("the focus's task failed: {0}")]
    Task(String),
    /// The media engine could not start (e.g. its socket cannot be bound).
    #[error("media: {0}")]
    Media(String),
}

/// Where the service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FocusState {
    /// Serving: invites from the allow-list are accepted.
    Running,
    /// Stopping: nothing new is accepted; stops after the grace period.
    Draining,
    /// Stopped.
    Stopped,
}

impl FocusState {
    /// `running`, `draining` or `stopped` (as `/health` says it).
    pub fn as_str(self) -> &'static str {
        match self {
            FocusState::Running => "running",
            FocusState::Draining => "draining",
            FocusState::Stopped => "stopped",
        }
    }
}

/// A snapshot of the service (what `/health` reports).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// Running, draining or stopped.
    pub state: FocusState,
    /// Whether the last sync succeeded (false before the first one and
    /// during a homeserver outage).
    pub sync_ok: bool,
    /// Rooms joined.
    pub rooms: u64,
    /// Calls with participants at the focus (from the core's figures).
    pub calls: u64,
    /// Participants connected to the focus (from the core's figures).
    pub participants: u64,
}

/// What the handle asks of the service's loop.
enum Control {
    Drain,
}

/// The focus as a service (see the module docs).
#[derive(Debug)]
pub struct FocusService;

impl FocusService {
    /// Starts the focus with its media engine ([`crate::engine::EngineCore`]): reads the
    /// password, binds `http_listen`, logs in (reusing the device stored in
    /// `data_dir` when there is one), and starts syncing. Returns once the
    /// device is logged in; the first sync follows in the background
    /// ([`Status::sync_ok`]).
    pub async fn start(config: Config) -> Result<FocusHandle, DriverError> {
        let core = crate::engine::EngineCore::from_config(&config)?;
        Self::start_with_core(config, core).await
    }

    /// [`FocusService::start`] with another [`FocusCore`].
    pub async fn start_with_core<C: FocusCore>(
        config: Config,
        core: C,
    ) -> Result<FocusHandle, DriverError> {
        let password = config.matrix_password()?;
        let listener = match config.http_listen {
            Some(addr) => Some(
                http::bind(addr)
                    .await
                    .map_err(|source| DriverError::Http { addr, source })?,
            ),
            None => None,
        };
        let http_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        info!(
            homeserver = config.homeserver,
            user = config.user,
            data_dir = %config.data_dir.display(),
            "focus: logging in"
        );
        let session = MatrixSession::login(
            &config.homeserver,
            &config.user,
            &password,
            &config.data_dir,
        )
        .await
        .map_err(DriverError::Login)?;
        drop(password);
        let user_id = session.user_id().to_owned();
        let device_id = session.device_id();
        info!(
            user_id,
            device_id,
            reused_device = session.from_stored_session(),
            http = ?http_addr,
            allowed_users = config.allow.users.len(),
            allowed_servers = config.allow.servers.len(),
            allow_plaintext = config.allow_plaintext,
            grace_period_ms = config.drain.grace_period.as_millis() as u64,
            "focus: started"
        );
        let mut core = core;
        core.started(&user_id, &device_id)
            .map_err(DriverError::Media)?;
        let core_rx = core.take_outputs();

        let (sync, sync_rx) = session.start_sync(SyncOptions::default());
        let (http_tx, http_rx) = mpsc::channel(64);
        if let Some(listener) = listener {
            tokio::spawn(http::serve(listener, http_tx));
        }
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let initial = Status {
            state: FocusState::Running,
            sync_ok: false,
            rooms: 0,
            calls: 0,
            participants: 0,
        };
        let (status_tx, status_rx) = watch::channel(initial);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let service = Service {
            config,
            session,
            own_user: user_id.clone(),
            core,
            rooms: BTreeMap::new(),
            joined: BTreeSet::new(),
            invites_in_flight: BTreeSet::new(),
            metrics: Metrics::new(),
            state: FocusState::Running,
            sync_ok: false,
            status_tx,
            done_tx,
        };
        let task = tokio::spawn(service.run(sync_rx, http_rx, control_rx, done_rx, core_rx, sync));
        Ok(FocusHandle {
            user_id,
            device_id,
            http_addr,
            control: control_tx,
            status: status_rx,
            task: Some(task),
        })
    }
}

/// The running focus. Dropping it does not stop the service; call
/// [`FocusHandle::shutdown`] and [`FocusHandle::wait`].
#[derive(Debug)]
pub struct FocusHandle {
    user_id: String,
    device_id: String,
    http_addr: Option<SocketAddr>,
    control: mpsc::UnboundedSender<Control>,
    status: watch::Receiver<Status>,
    /// `None` once [`FocusHandle::wait`] saw it end.
    task: Option<JoinHandle<Result<(), DriverError>>>,
}

impl FocusHandle {
    /// The bot's user id.
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// The focus's device id.
    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The bound address of the HTTP endpoint (`http_listen`, with the
    /// actual port when it asked for port 0).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Starts draining (what SIGTERM does): stop accepting, tell the core,
    /// stop after `drain.grace_period`. Idempotent.
    pub fn shutdown(&self) {
        let _ = self.control.send(Control::Drain);
    }

    /// Stops the focus at once, as a crash would: no goodbyes to clients,
    /// the media socket closed (for tests of what clients do when their
    /// focus dies).
    pub fn abort(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Waits until the service stops: `Ok` after a drain, the error if it
    /// failed (reported once; later calls return `Ok`). Cancel-safe: it may
    /// be raced against other futures (e.g. signals) and called again.
    pub async fn wait(&mut self) -> Result<(), DriverError> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let result = task.await;
        self.task = None;
        match result {
            Ok(r) => r,
            Err(e) => Err(DriverError::Task(e.to_string())),
        }
    }
}

/// What a background task (join, decline) reports back to the loop.
enum Done {
    Invite {
        room_id: String,
        accepted: bool,
        result: Result<(), MatrixError>,
    },
}

struct Service<C> {
    config: Config,
    session: MatrixSession,
    own_user: String,
    core: C,
    /// Call state of rooms we have state for (joined ones; entries of rooms
    /// we leave are removed).
    rooms: BTreeMap<String, RoomCallState>,
    /// Rooms whose latest own membership event says `join`.
    joined: BTreeSet<String>,
    invites_in_flight: BTreeSet<String>,
    metrics: Metrics,
    state: FocusState,
    sync_ok: bool,
    status_tx: watch::Sender<Status>,
    done_tx: mpsc::UnboundedSender<Done>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl<C: FocusCore> Service<C> {
    async fn run(
        mut self,
        mut sync_rx: mpsc::Receiver<MatrixInput>,
        mut http_rx: mpsc::Receiver<http::Request>,
        mut control_rx: mpsc::UnboundedReceiver<Control>,
        mut done_rx: mpsc::UnboundedReceiver<Done>,
        core_rx: Option<mpsc::UnboundedReceiver<CoreOutput>>,
        sync: groupcall::matrix::SyncHandle,
    ) -> Result<(), DriverError> {
        let mut core_rx = core_rx;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline: Option<Instant> = None;
        let result = loop {
            tokio::select! {
                input = sync_rx.recv() => match input {
                    Some(input) => {
                        if let Err(e) = self.on_matrix(input) {
                            break Err(e);
                        }
                    }
                    None => break Err(DriverError::SyncStopped("the sync loop ended".into())),
                },
                Some(req) = http_rx.recv() => {
                    let answer = self.answer(req.route);
                    let _ = req.reply.send(answer);
                }
                Some(control) = control_rx.recv() => match control {
                    Control::Drain => {
                        if self.state == FocusState::Running {
                            let grace = self.config.drain.grace_period;
                            info!(
                                grace_period_ms = grace.as_millis() as u64,
                                "focus: draining: refusing new invites and calls; stopping after the grace period"
                            );
                            self.state = FocusState::Draining;
                            self.metrics.set_draining(true);
                            let outs = self.core.draining(now_ms(), grace);
                            self.send(outs);
                            deadline = Some(Instant::now() + grace);
                        }
                    }
                },
                Some(done) = done_rx.recv() => self.on_done(done),
                Some(out) = async {
                    match core_rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.send(vec![out]),
                _ = tick.tick() => self.on_tick(),
                () = sleep_until(deadline) => {
                    info!("focus: grace period over: hanging up and stopping");
                    let mut outs = self.core.stopping(now_ms());
                    if let Some(rx) = core_rx.as_mut() {
                        // The hangups the core makes on its own task: up to
                        // its `Flushed` mark (bounded: a core that never
                        // sends one is not waited for long).
                        let collect = async {
                            while let Some(o) = rx.recv().await {
                                if o == CoreOutput::Flushed {
                                    break;
                                }
                                outs.push(o);
                            }
                        };
                        if tokio::time::timeout(Duration::from_secs(2), collect).await.is_err() {
                            warn!("focus: the core's last messages did not come within 2 s");
                        }
                    }
                    send_and_wait(self.session.clone(), self.keyless(), outs).await;
                    break Ok(());
                }
            }
            self.publish_status();
        };
        sync.stop();
        self.state = FocusState::Stopped;
        self.publish_status();
        match &result {
            Ok(()) => info!("focus: stopped"),
            Err(e) => warn!(error = %e, "focus: stopped with an error"),
        }
        result
    }

    fn on_matrix(&mut self, input: MatrixInput) -> Result<(), DriverError> {
        match input {
            MatrixInput::State { room_id, event } => self.on_state(room_id, &event),
            MatrixInput::ToDevice {
                sender,
                sender_device,
                event_type,
                content,
                encrypted,
            } => {
                if event_type.starts_with("m.call.") || event_type.starts_with("org.matrix.call.") {
                    let event = CallToDevice {
                        sender,
                        sender_device,
                        event_type,
                        content,
                        encrypted,
                    };
                    let outs = self.core.to_device(now_ms(), event, &self.rooms);
                    self.send(outs);
                } else {
                    debug!(event_type, sender, "ignoring a to-device event");
                }
            }
            MatrixInput::Invited { room_id, inviter } => self.on_invite(room_id, inviter),
            MatrixInput::Synced { first } => {
                if !self.sync_ok {
                    info!(
                        first,
                        rooms = self.joined.len(),
                        "focus: synced with the homeserver"
                    );
                }
                self.sync_ok = true;
            }
            MatrixInput::Disconnected { error, fatal } => {
                self.sync_ok = false;
                if fatal {
                    return Err(DriverError::SyncStopped(error));
                }
                warn!(error, "focus: homeserver unreachable; retrying");
            }
            other => debug!(?other, "ignoring a sync input"),
        }
        Ok(())
    }

    fn on_state(&mut self, room_id: String, event: &Value) {
        let now = now_ms();
        self.core.state_event(now, &room_id, event);
        let event_type = event.get("type").and_then(Value::as_str).unwrap_or("");
        let state_key = event.get("state_key").and_then(Value::as_str).unwrap_or("");
        debug!(room_id, event_type, state_key, "state event");
        // Not `or_default()`: `RoomCallState::default()` does not require
        // room membership `join`; `new()` does.
        #[allow(clippy::unwrap_or_default)]
        let room = self
            .rooms
            .entry(room_id.clone())
            .or_insert_with(RoomCallState::new);
        let outs = match room.apply_json(event, now) {
            Ok(changes) if !changes.is_empty() => {
                debug!(room_id, ?changes, "call state changed");
                self.core.room_changed(now, &room_id, room, &changes)
            }
            Ok(_) => Vec::new(),
            Err(e) => {
                debug!(room_id, error = %e, "ignoring a state event");
                Vec::new()
            }
        };
        // Our own membership, as this room's state now has it (whatever
        // order the sync listed the events in: an earlier invite event of
        // ours must not drop what came before our join).
        let own = room.membership(&self.own_user).map(str::to_owned);
        self.send(outs);
        match own.as_deref() {
            Some("join") if self.joined.insert(room_id.clone()) => {
                info!(room_id, "focus: in room");
            }
            Some(membership @ ("leave" | "ban")) => {
                self.rooms.remove(&room_id);
                if self.joined.remove(&room_id) {
                    info!(room_id, membership, "focus: no longer in room");
                    let outs = self.core.room_left(now, &room_id);
                    self.send(outs);
                }
            }
            _ => {}
        }
    }

    fn on_invite(&mut self, room_id: String, inviter: Option<String>) {
        if self.joined.contains(&room_id) || !self.invites_in_flight.insert(room_id.clone()) {
            debug!(room_id, "invite already handled");
            return;
        }
        let refusal = match &inviter {
            _ if self.state != FocusState::Running => {
                Some((REFUSAL_INVITE_DRAINING, "the focus is draining"))
            }
            Some(user) if self.config.allow.allows(user) => None,
            Some(_) => Some((
                REFUSAL_INVITE_NOT_ALLOWED,
                "the inviter is not on the allow-list",
            )),
            None => Some((
                REFUSAL_INVITE_NOT_ALLOWED,
                "the invite does not say who sent it",
            )),
        };
        let inviter = inviter.as_deref().unwrap_or("unknown");
        let accepted = match refusal {
            None => {
                info!(
                    room_id,
                    inviter, "focus: invited by an allowed user: joining"
                );
                true
            }
            Some((label, reason)) => {
                warn!(room_id, inviter, reason, "focus: declining an invite");
                self.metrics.add_refusal(label);
                false
            }
        };
        let session = self.session.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let result = if accepted {
                join_with_retries(&session, &room_id).await
            } else {
                session.leave_room(&room_id).await
            };
            let _ = done.send(Done::Invite {
                room_id,
                accepted,
                result,
            });
        });
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Invite {
                room_id,
                accepted,
                result,
            } => {
                self.invites_in_flight.remove(&room_id);
                match (accepted, result) {
                    (true, Ok(())) => info!(room_id, "focus: joined room"),
                    (false, Ok(())) => info!(room_id, "focus: invite declined"),
                    (true, Err(e)) => warn!(room_id, error = %e, "focus: joining failed"),
                    (false, Err(e)) => warn!(room_id, error = %e, "focus: declining failed"),
                }
            }
        }
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        let mut outs = Vec::new();
        for (room_id, room) in &mut self.rooms {
            let changes = room.tick(now);
            if !changes.is_empty() {
                outs.extend(self.core.room_changed(now, room_id, room, &changes));
            }
        }
        self.send(outs);
        self.refresh_metrics();
    }

    fn refresh_metrics(&mut self) {
        self.metrics.set_rooms(self.joined.len() as u64);
        self.core.fill_metrics(&mut self.metrics);
    }

    fn status(&self) -> Status {
        let totals = self.metrics.totals();
        Status {
            state: self.state,
            sync_ok: self.sync_ok,
            rooms: self.joined.len() as u64,
            calls: self.metrics.calls() as u64,
            participants: totals.participants,
        }
    }

    fn publish_status(&self) {
        let status = self.status();
        self.status_tx.send_if_modified(|s| {
            let changed = *s != status;
            *s = status;
            changed
        });
    }

    fn answer(&mut self, route: Route) -> Answer {
        self.refresh_metrics();
        match route {
            Route::Metrics => Answer {
                status: 200,
                content_type: CONTENT_TYPE,
                body: self.metrics.render(),
            },
            Route::Health => {
                let s = self.status();
                let body = json!({
                    "state": s.state.as_str(),
                    "sync_ok": s.sync_ok,
                    "rooms": s.rooms,
                    "calls": s.calls,
                    "participants": s.participants,
                    "user_id": self.own_user,
                    "device_id": self.session.device_id(),
                });
                Answer {
                    status: 200,
                    content_type: "application/json",
                    body: format!("{body}\n"),
                }
            }
        }
    }

    /// Devices without keys get plaintext only where the configuration
    /// allows plaintext signalling.
    fn keyless(&self) -> KeylessDevices {
        if self.config.allow_plaintext {
            KeylessDevices::Plaintext
        } else {
            KeylessDevices::Refuse
        }
    }

    /// Sends the core's to-device messages in the background.
    fn send(&self, outs: Vec<CoreOutput>) {
        for out in outs {
            match out {
                CoreOutput::ToDevice {
                    user_id,
                    device_id,
                    event_type,
                    content,
                    encrypted,
                } => {
                    let session = self.session.clone();
                    let keyless = self.keyless();
                    tokio::spawn(async move {
                        let report = session
                            .send_signalling(
                                &event_type,
                                vec![(user_id.clone(), device_id.clone(), content)],
                                encrypted,
                                keyless,
                            )
                            .await;
                        if let Some(e) = report.error {
                            warn!(event_type, user_id, device_id, error = %e, "focus: sending failed");
                        }
                    });
                }
                CoreOutput::Flushed => {}
            }
        }
    }
}

/// Sends the core's last messages and waits for them (at most 5 s).
async fn send_and_wait(session: MatrixSession, keyless: KeylessDevices, outs: Vec<CoreOutput>) {
    let mut sends = tokio::task::JoinSet::new();
    for out in outs {
        let CoreOutput::ToDevice {
            user_id,
            device_id,
            event_type,
            content,
            encrypted,
        } = out
        else {
            continue;
        };
        let session = session.clone();
        sends.spawn(async move {
            session
                .send_signalling(
                    &event_type,
                    vec![(user_id, device_id, content)],
                    encrypted,
                    keyless,
                )
                .await
        });
    }
    let all = async { while sends.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .is_err()
    {
        warn!("focus: the last messages took longer than 5 s");
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
