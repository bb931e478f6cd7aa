//! The seam between the driver and the focus's logic.

use std::collections::BTreeMap;
use std::time::Duration;

use groupcall_proto::room::{RoomCallState, RoomChange};
use serde_json::Value;
use tracing::info;

use crate::metrics::Metrics;

/// An `m.call.*` to-device event, as the sync delivered it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CallToDevice {
    /// The sending user.
    pub sender: String,
    /// The sending device, known only when the event came Olm-encrypted
    /// (from the Olm session, not from the content).
    pub sender_device: Option<String>,
    /// The event type, e.g. `m.call.invite`.
    pub event_type: String,
    /// The (decrypted) content.
    pub content: Value,
    /// Whether it came Olm-encrypted.
    pub encrypted: bool,
}

/// What the core asks the driver to do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum CoreOutput {
    /// Send a to-device message (call signalling) to one device.
    ToDevice {
        /// The recipient user.
        user_id: String,
        /// The recipient device.
        device_id: String,
        /// The event type, e.g. `m.call.answer`.
        event_type: String,
        /// The content.
        content: Value,
        /// Olm-encrypt it (a device without keys then gets nothing);
        /// otherwise plaintext.
        encrypted: bool,
    },
    /// On the output channel ([`FocusCore::take_outputs`]): everything
    /// [`FocusCore::stopping`] asked for is before this. The service waits
    /// for it (bounded) before its last sends.
    Flushed,
}

/// The focus's logic as the driver sees it: inputs in, outputs returned.
/// Every method has a default that does nothing, so an implementation
/// overrides what it needs. Time is POSIX milliseconds (`now_ms`), the
/// clock of the call state's `expires_ts`.
///
/// The driver calls it from one task, in the order the homeserver reported
/// things: room state before the to-device events of the same sync.
pub trait FocusCore: Send + 'static {
    /// The focus is logged in as `user_id` / `device_id`: start what needs
    /// to know who it is (the media engine). An error stops the service.
    fn started(&mut self, user_id: &str, device_id: &str) -> Result<(), String> {
        let _ = (user_id, device_id);
        Ok(())
    }

    /// Outputs the core produces on its own (answers made once the media
    /// layer is done): the driver sends them as they come. Taken once,
    /// after [`FocusCore::started`].
    fn take_outputs(&mut self) -> Option<tokio::sync::mpsc::UnboundedReceiver<CoreOutput>> {
        None
    }

    /// Every state event of a joined room, as received (before
    /// [`FocusCore::room_changed`] for the changes it made).
    fn state_event(&mut self, now_ms: u64, room_id: &str, event: &Value) {
        let _ = (now_ms, room_id, event);
    }

    /// The grace period is over: hang up on everyone. The driver sends
    /// what this returns (and the outputs queued before) before it stops.
    fn stopping(&mut self, now_ms: u64) -> Vec<CoreOutput> {
        let _ = now_ms;
        Vec::new()
    }

    /// A joined room's call state changed (an event applied, or an entry
    /// expired); `state` is the room's state after the change.
    fn room_changed(
        &mut self,
        now_ms: u64,
        room_id: &str,
        state: &RoomCallState,
        changes: &[RoomChange],
    ) -> Vec<CoreOutput> {
        let _ = (now_ms, room_id, state, changes);
        Vec::new()
    }

    /// The focus left (or was removed from) a room: whatever it served
    /// there stops.
    fn room_left(&mut self, now_ms: u64, room_id: &str) -> Vec<CoreOutput> {
        let _ = (now_ms, room_id);
        Vec::new()
    }

    /// An `m.call.*` (or `org.matrix.call.*`) to-device event arrived.
    /// `rooms` is the call state of every joined room.
    fn to_device(
        &mut self,
        now_ms: u64,
        event: CallToDevice,
        rooms: &BTreeMap<String, RoomCallState>,
    ) -> Vec<CoreOutput> {
        let _ = (now_ms, event, rooms);
        Vec::new()
    }

    /// The focus started draining: tell clients, refuse new calls; the
    /// driver stops after the grace period (`grace`).
    fn draining(&mut self, now_ms: u64, grace: Duration) -> Vec<CoreOutput> {
        let _ = (now_ms, grace);
        Vec::new()
    }

    /// Called about once a second and before each `/metrics` answer: copy
    /// the core's figures into `metrics` (e.g.
    /// [`Metrics::set_call`](crate::metrics::Metrics::set_call)).
    fn fill_metrics(&mut self, metrics: &mut Metrics) {
        let _ = metrics;
    }
}

/// The default core: logs every call to-device event (type, sender,
/// device, whether it was encrypted) and every call state change, and
/// answers nothing.
#[derive(Debug, Default)]
pub struct LogCore;

impl FocusCore for LogCore {
    fn room_changed(
        &mut self,
        _now_ms: u64,
        room_id: &str,
        state: &RoomCallState,
        changes: &[RoomChange],
    ) -> Vec<CoreOutput> {
        for change in changes {
            info!(
                room_id,
                call_id = state.current_call_id().unwrap_or("-"),
                participants = state.participants().len(),
                ?change,
                "call state changed"
            );
        }
        Vec::new()
    }

    fn to_device(
        &mut self,
        _now_ms: u64,
        event: CallToDevice,
        _rooms: &BTreeMap<String, RoomCallState>,
    ) -> Vec<CoreOutput> {
        let field = |k: &str| {
            event
                .content
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("-")
                .to_owned()
        };
        info!(
            event_type = event.event_type,
            sender = event.sender,
            sender_device = event.sender_device.as_deref().unwrap_or("-"),
            encrypted = event.encrypted,
            call_id = field("call_id"),
            conf_id = field("conf_id"),
            "call to-device event received (not answered: the focus's call handling is not built yet)"
        );
        Vec::new()
    }
}
