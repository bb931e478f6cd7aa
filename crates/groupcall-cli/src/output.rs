//! The JSON lines of `groupcall join --json`: one object per event, with an
//! `"event"` field naming it. The shape is the library's one mapping
//! ([`groupcall::json`]); this only decides which events get a line.

use groupcall::ClientEvent;
use groupcall_proto::CallEvent;
use serde_json::Value;

pub use groupcall::json::{left_reason, peer_state as peer_status};

/// The JSON object of a client event. `None` for [`CallEvent::Left`] (the
/// `left` line is printed once, after leaving is complete) and for received
/// frames (never asked for by `join`).
pub fn event_json(ev: &ClientEvent) -> Option<Value> {
    match ev {
        ClientEvent::Call(CallEvent::Left) | ClientEvent::Frame { .. } => None,
        ev => Some(ev.to_json()),
    }
}

/// `{"event":"warning","message":...}`.
pub fn warning_json(message: &str) -> Value {
    ClientEvent::Warning(message.to_owned()).to_json()
}

/// `{"event":"left"}`.
pub fn left_json() -> Value {
    ClientEvent::Call(CallEvent::Left).to_json()
}

#[cfg(test)]
mod tests {
    use super::*;
    use groupcall_proto::DeviceKey;
    use serde_json::json;

    #[test]
    fn lines() {
        assert!(event_json(&ClientEvent::Call(CallEvent::Left)).is_none());
        assert_eq!(left_json(), json!({"event":"left"}));
        assert_eq!(warning_json("w"), json!({"event":"warning","message":"w"}));
        assert_eq!(
            event_json(&ClientEvent::Call(CallEvent::ParticipantJoined {
                device: DeviceKey::new("@bob:localhost", "BOBDEV"),
                session_id: "s".into()
            })),
            Some(
                json!({"event":"participant_joined","user_id":"@bob:localhost","device_id":"BOBDEV","session_id":"s"})
            )
        );
    }
}
