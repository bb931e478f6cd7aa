//! Crash cleanup: how the others learn that we are gone when we cannot say
//! so ourselves (killed, power loss, network gone).
//!
//! - **MSC4140 delayed events** (when the homeserver advertises them):
//!   before we publish member content that lists our device we schedule a
//!   delayed state event with that content *minus our device*
//!   ([`membership::left_content`]), so that we are never in the call without
//!   one (and the request is not competing with the member event the others
//!   wait for); we restart its timer every [`LivenessOptions::heartbeat`],
//!   replace it when the member content we publish changes, and cancel it on
//!   a clean leave. Our own state events do not cancel it (MSC4140 cancels a
//!   pending delayed state event only for another user's event on the same
//!   state).
//!   If we die, the homeserver writes it [`LivenessOptions::leave_delay`]
//!   after our last heartbeat and the others drop us.
//! - **Fallback**: a short `expires_ts` on our device entry
//!   ([`LivenessOptions::fallback_expiry`], refreshed every
//!   [`LivenessOptions::fallback_refresh`]).
//! - **Media**: a peer without packets for
//!   [`LivenessOptions::media_failed_timeout`] is `Failed`; the core restarts
//!   ICE once and then hangs up.
//!
//! See `docs/reliability.md` for the timings.

use std::time::Duration;

use groupcall_proto::membership;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::matrix::{MatrixError, MatrixSession};

/// How fast a vanished participant is detected.
#[derive(Debug, Clone, PartialEq)]
pub struct LivenessOptions {
    /// Use MSC4140 delayed events when the homeserver advertises them
    /// (default true).
    pub delayed_leave: bool,
    /// Delay of the scheduled "leave" state event (default 8 s).
    pub leave_delay: Duration,
    /// How often its timer is restarted (default 3 s).
    pub heartbeat: Duration,
    /// Without delayed events: lifetime of our member entry (`expires_ts`,
    /// default 30 s). Applied only when shorter than the core's
    /// `member_expiry_ms`.
    pub fallback_expiry: Duration,
    /// Without delayed events: republish our entry this often (default 10 s).
    pub fallback_refresh: Duration,
    /// A media peer without packets this long is `Disconnected` (default 5 s).
    pub media_disconnect_timeout: Duration,
    /// ... and this long `Failed` (default 15 s).
    pub media_failed_timeout: Duration,
}

impl Default for LivenessOptions {
    fn default() -> Self {
        Self {
            delayed_leave: true,
            leave_delay: Duration::from_secs(8),
            heartbeat: Duration::from_secs(3),
            fallback_expiry: Duration::from_secs(30),
            fallback_refresh: Duration::from_secs(10),
            media_disconnect_timeout: Duration::from_secs(5),
            media_failed_timeout: Duration::from_secs(15),
        }
    }
}

/// Whether `content` (an `m.call.member` content) lists `device_id`.
fn lists_device(content: &Value, device_id: &str) -> bool {
    content
        .get("m.calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("m.devices").and_then(Value::as_array))
        .flatten()
        .any(|d| d.get("device_id").and_then(Value::as_str) == Some(device_id))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long the outbox waits for the delayed leave to be scheduled before
/// publishing member content anyway (a homeserver that is slow to answer
/// must not hold the join up for long; the task keeps trying).
const PRESCHEDULE_WAIT: Duration = Duration::from_secs(2);

enum Msg {
    /// We are about to publish this member content: schedule its delayed
    /// leave first if it lists us; `done` when that is settled.
    Publishing {
        event_type: String,
        content: Value,
        done: oneshot::Sender<()>,
    },
    /// Our member event with this content was accepted by the homeserver.
    Published { event_type: String, content: Value },
    /// Cancel and end.
    Stop(oneshot::Sender<()>),
}

/// A cloneable sender the outbox uses to report our published member
/// content.
#[derive(Clone, Debug)]
pub(crate) struct PublishedHook(mpsc::UnboundedSender<Msg>);

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Publishing { event_type, .. } => write!(f, "Publishing({event_type})"),
            Msg::Published { event_type, .. } => write!(f, "Published({event_type})"),
            Msg::Stop(_) => f.write_str("Stop"),
        }
    }
}

impl PublishedHook {
    /// We are about to publish our member event (`event_type`, `content`):
    /// returns once the delayed leave for it is scheduled (or could not be
    /// within [`PRESCHEDULE_WAIT`]; the task keeps trying). Content that
    /// does not list our device (a leave) returns at once: its delayed leave
    /// is settled after publishing.
    pub(crate) async fn publishing(&self, event_type: &str, content: &Value) {
        let (done, settled) = oneshot::channel();
        let msg = Msg::Publishing {
            event_type: event_type.to_owned(),
            content: content.clone(),
            done,
        };
        if self.0.send(msg).is_ok()
            && tokio::time::timeout(PRESCHEDULE_WAIT, settled)
                .await
                .is_err()
        {
            warn!("the delayed leave is not scheduled yet; publishing our member event anyway");
        }
    }

    /// Our member event (`event_type`, `content`) is on the homeserver.
    pub(crate) fn published(&self, event_type: &str, content: &Value) {
        let _ = self.0.send(Msg::Published {
            event_type: event_type.to_owned(),
            content: content.clone(),
        });
    }
}

/// Where the task reports what the user should know (the client turns it
/// into `ClientEvent::Warning`).
pub(crate) type WarningSink = Box<dyn Fn(String) + Send + Sync + 'static>;

/// The delayed "leave" of our device, kept alive by heartbeats. Dropping it
/// stops the heartbeats without cancelling (as a crash would), so the leave
/// fires.
pub(crate) struct DelayedLeave {
    tx: mpsc::UnboundedSender<Msg>,
    task: JoinHandle<()>,
}

impl Drop for DelayedLeave {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DelayedLeave {
    /// Starts the task; nothing is scheduled before the first
    /// [`PublishedHook::published`].
    pub(crate) fn start(
        session: MatrixSession,
        room_id: String,
        opts: &LivenessOptions,
        warn: WarningSink,
    ) -> (DelayedLeave, PublishedHook) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            device_id: session.device_id(),
            state_key: session.user_id().to_owned(),
            session,
            room_id,
            delay_ms: opts.leave_delay.as_millis() as u64,
            current: None,
            wanted: None,
            warn,
        };
        let handle = tokio::spawn(task.run(rx, opts.heartbeat));
        (
            DelayedLeave {
                tx: tx.clone(),
                task: handle,
            },
            PublishedHook(tx),
        )
    }

    /// Cancels the delayed leave (we left cleanly) and ends the task.
    pub(crate) async fn stop(self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.tx.send(Msg::Stop(done_tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), done_rx).await;
        }
    }
}

/// What a scheduled delayed event writes.
#[derive(Debug, Clone, PartialEq)]
struct Planned {
    event_type: String,
    /// The published member content it was derived from.
    source: Value,
    /// Our member content without our device.
    left: Value,
}

struct Task {
    session: MatrixSession,
    room_id: String,
    device_id: String,
    state_key: String,
    delay_ms: u64,
    /// The scheduled delayed event: its id and what it writes.
    current: Option<(String, Planned)>,
    /// What should be scheduled (None once we left).
    wanted: Option<Planned>,
    warn: WarningSink,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>, heartbeat: Duration) {
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut failing = false;
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Publishing { event_type, content, done }) => {
                        if lists_device(&content, &self.device_id) {
                            self.want(event_type, content);
                            self.reconcile().await;
                        }
                        let _ = done.send(());
                    }
                    Some(Msg::Published { event_type, content }) => {
                        self.want(event_type, content);
                        self.reconcile().await;
                    }
                    Some(Msg::Stop(done)) => {
                        self.wanted = None;
                        self.reconcile().await;
                        let _ = done.send(());
                        return;
                    }
                    None => return,
                },
                _ = tick.tick() => {
                    let Some((id, _)) = &self.current else {
                        // Scheduling failed earlier: try again.
                        self.reconcile().await;
                        continue;
                    };
                    match self.session.restart_delayed(id).await {
                        Ok(()) => {
                            if failing {
                                info!("delayed leave heartbeat works again");
                                failing = false;
                            }
                        }
                        Err(MatrixError::DelayedEventNotFound { .. }) => {
                            // It fired (we were unreachable for longer than
                            // its delay) or the homeserver lost it: the core
                            // republishes our entry when it sees it gone;
                            // schedule a new leave.
                            warn!("our delayed leave is gone (fired?); scheduling a new one");
                            self.current = None;
                            self.reconcile().await;
                        }
                        Err(e) => {
                            if !failing {
                                warn!("delayed leave heartbeat failed: {e}");
                                failing = true;
                            }
                        }
                    }
                }
            }
        }
    }

    /// What should be scheduled for our member content `content`: its
    /// leave if it lists us, nothing otherwise. Content already planned
    /// (scheduled before publishing, now published) keeps its plan.
    fn want(&mut self, event_type: String, content: Value) {
        if self
            .wanted
            .as_ref()
            .is_some_and(|w| w.event_type == event_type && w.source == content)
        {
            return;
        }
        self.wanted = lists_device(&content, &self.device_id).then(|| Planned {
            left: membership::left_content(Some(&content), &self.device_id, now_ms()),
            event_type,
            source: content,
        });
    }

    /// Makes the scheduled delayed event match `wanted`: schedule the new
    /// one first, then cancel the old one, so there is never a moment
    /// without one.
    async fn reconcile(&mut self) {
        let same = match (&self.current, &self.wanted) {
            (Some((_, cur)), Some(w)) => cur == w,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let old = self.current.take();
        if let Some(w) = self.wanted.clone() {
            match self
                .session
                .schedule_delayed_state(
                    &self.room_id,
                    &w.event_type,
                    &self.state_key,
                    w.left.clone(),
                    self.delay_ms,
                )
                .await
            {
                Ok(id) => {
                    debug!(delay_id = %id, delay_ms = self.delay_ms, "delayed leave scheduled");
                    self.current = Some((id, w));
                }
                Err(e) => {
                    warn!("scheduling the delayed leave failed: {e}");
                    (self.warn)(format!(
                        "scheduling the delayed leave failed (retrying): {e}"
                    ));
                }
            }
        }
        if let Some((id, _)) = old {
            match self.session.cancel_delayed(&id).await {
                Ok(()) | Err(MatrixError::DelayedEventNotFound { .. }) => {
                    debug!(delay_id = %id, "delayed leave cancelled")
                }
                Err(e) => {
                    // It will fire and remove our device: the core
                    // republishes our entry when it sees that.
                    warn!(delay_id = %id, "cancelling the old delayed leave failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn lists_device_finds_our_entry_only() {
        let c = json!({"m.calls": [{"m.call_id": "c", "m.devices": [
            {"device_id": "OTHER", "session_id": "s", "expires_ts": 1, "feeds": []},
            {"device_id": "ME", "session_id": "s", "expires_ts": 1, "feeds": []}]}]});
        assert!(lists_device(&c, "ME"));
        assert!(!lists_device(&c, "NOPE"));
        assert!(!lists_device(&json!({"m.calls": []}), "ME"));
        assert!(!lists_device(&json!("garbage"), "ME"));
    }

    #[test]
    fn left_content_removes_only_us() {
        let c = json!({"m.calls": [{"m.call_id": "c", "m.devices": [
            {"device_id": "OTHER", "session_id": "s", "expires_ts": u64::MAX, "feeds": []},
            {"device_id": "ME", "session_id": "s", "expires_ts": u64::MAX, "feeds": []}]}]});
        let left = membership::left_content(Some(&c), "ME", 0);
        assert!(!lists_device(&left, "ME"));
        assert!(lists_device(&left, "OTHER"));
    }
}
