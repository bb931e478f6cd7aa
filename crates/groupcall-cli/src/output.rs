//! The JSON lines of `groupcall join --json`: one object per event, with an
//! `"event"` field naming it.

use groupcall::ClientEvent;
use groupcall_proto::room::LeftReason;
use groupcall_proto::{CallEvent, DeviceKey, PeerStatus};
use serde_json::{Map, Value, json};

/// The JSON object of a client event. `None` for [`CallEvent::Left`]: the
/// `left` line is printed once, after leaving is complete.
pub fn event_json(ev: &ClientEvent) -> Option<Value> {
    let v = match ev {
        ClientEvent::Call(c) => return call_event_json(c),
        ClientEvent::RemoteTrack {
            device,
            stream_id,
            track_id,
            kind,
        } => with_device(
            "remote_track",
            device,
            json!({ "stream_id": stream_id, "track_id": track_id, "kind": kind.as_str() }),
        ),
        ClientEvent::Media {
            device,
            stream_id,
            kind,
            frames,
            bytes,
        } => with_device(
            "media",
            device,
            json!({ "stream_id": stream_id, "kind": kind.as_str(), "frames": frames, "bytes": bytes }),
        ),
        ClientEvent::MediaSent {
            device,
            kind,
            frames,
            bytes,
        } => with_device(
            "media_sent",
            device,
            json!({ "kind": kind.as_str(), "frames": frames, "bytes": bytes }),
        ),
        ClientEvent::Signalling {
            sender,
            event_type,
            encrypted,
            ignored,
        } => json!({
            "event": "signalling",
            "sender": sender,
            "type": event_type,
            "encrypted": encrypted,
            "ignored": ignored,
        }),
        ClientEvent::SignallingTo {
            device,
            encrypted,
            refused,
            reason,
        } => with_device(
            "signalling_to",
            device,
            json!({ "encrypted": encrypted, "refused": refused, "reason": reason }),
        ),
        ClientEvent::Recorded { path } => {
            json!({ "event": "recorded", "path": path.display().to_string() })
        }
        ClientEvent::Warning(message) => warning_json(message),
        // Events added to the client later (e.g. received frames) have no
        // line.
        #[allow(unreachable_patterns)]
        _ => return None,
    };
    Some(v)
}

/// `{"event":"warning","message":...}`.
pub fn warning_json(message: &str) -> Value {
    json!({ "event": "warning", "message": message })
}

fn call_event_json(ev: &CallEvent) -> Option<Value> {
    let v = match ev {
        CallEvent::RoomCallChanged { call_id } => {
            json!({ "event": "room_call_changed", "call_id": call_id })
        }
        CallEvent::Joined {
            call_id,
            session_id,
            created,
        } => json!({
            "event": "joined",
            "call_id": call_id,
            "session_id": session_id,
            "created": created,
        }),
        CallEvent::Left => return None,
        CallEvent::CallEnded { call_id, reason } => {
            json!({ "event": "call_ended", "call_id": call_id, "reason": reason })
        }
        CallEvent::ParticipantJoined { device, session_id } => with_device(
            "participant_joined",
            device,
            json!({ "session_id": session_id }),
        ),
        CallEvent::ParticipantLeft {
            device,
            session_id,
            reason,
        } => with_device(
            "participant_left",
            device,
            json!({ "session_id": session_id, "reason": left_reason(*reason) }),
        ),
        CallEvent::PeerState {
            device,
            call_id,
            status,
            ..
        } => {
            let (state, reason) = peer_status(status);
            let mut extra = json!({ "state": state, "call_id": call_id });
            if let (Some(reason), Some(obj)) = (reason, extra.as_object_mut()) {
                obj.insert("reason".to_owned(), json!(reason));
            }
            with_device("peer_state", device, extra)
        }
        CallEvent::FeedAdded {
            device,
            stream_id,
            purpose,
            audio_muted,
            video_muted,
        } => with_device(
            "feed_added",
            device,
            json!({
                "stream_id": stream_id,
                "purpose": purpose.as_str(),
                "audio_muted": audio_muted,
                "video_muted": video_muted,
            }),
        ),
        CallEvent::FeedChanged {
            device,
            stream_id,
            purpose,
            audio_muted,
            video_muted,
        } => with_device(
            "feed_changed",
            device,
            json!({
                "stream_id": stream_id,
                "purpose": purpose.as_str(),
                "audio_muted": audio_muted,
                "video_muted": video_muted,
            }),
        ),
        CallEvent::FeedRemoved { device, stream_id } => {
            with_device("feed_removed", device, json!({ "stream_id": stream_id }))
        }
        CallEvent::Unanswered { device, calls } => {
            with_device("unanswered", device, json!({ "calls": calls }))
        }
        CallEvent::CallStarted {
            call_id,
            intent,
            call_type,
            name,
        } => json!({
            "event": "call_started",
            "call_id": call_id,
            "intent": intent.as_ref().map(|i| i.as_str()),
            "type": call_type.as_ref().map(|t| t.as_str()),
            "name": name,
        }),
    };
    Some(v)
}

/// `(state, reason)` of a peer status.
pub fn peer_status(status: &PeerStatus) -> (&'static str, Option<&str>) {
    match status {
        PeerStatus::Connecting => ("connecting", None),
        PeerStatus::Connected => ("connected", None),
        PeerStatus::Reconnecting => ("reconnecting", None),
        PeerStatus::Failed(r) => ("failed", Some(r)),
        PeerStatus::Closed(r) => ("closed", Some(r)),
    }
}

/// The wire-ish name of why a participant left.
pub fn left_reason(reason: LeftReason) -> &'static str {
    match reason {
        LeftReason::Removed => "removed",
        LeftReason::Expired => "expired",
        LeftReason::RoomLeft => "room_left",
        LeftReason::CallEnded => "call_ended",
    }
}

/// `{"event": name, "user_id", "device_id", ...extra}`.
fn with_device(name: &str, device: &DeviceKey, extra: Value) -> Value {
    let mut obj = Map::new();
    obj.insert("event".to_owned(), json!(name));
    obj.insert("user_id".to_owned(), json!(device.user_id));
    obj.insert("device_id".to_owned(), json!(device.device_id));
    if let Value::Object(extra) = extra {
        obj.extend(extra);
    }
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use groupcall::media::TrackKind;
    use groupcall_proto::PeerHandle;
    use groupcall_proto::events::FeedPurpose;

    fn dev() -> DeviceKey {
        DeviceKey::new("@bob:localhost", "BOBDEV")
    }

    fn call(ev: CallEvent) -> Value {
        event_json(&ClientEvent::Call(ev)).unwrap()
    }

    #[test]
    fn shapes() {
        assert_eq!(
            call(CallEvent::Joined {
                call_id: "c".into(),
                session_id: "s".into(),
                created: true
            }),
            json!({"event":"joined","call_id":"c","session_id":"s","created":true})
        );
        assert_eq!(
            call(CallEvent::ParticipantJoined {
                device: dev(),
                session_id: "s".into()
            }),
            json!({"event":"participant_joined","user_id":"@bob:localhost","device_id":"BOBDEV","session_id":"s"})
        );
        let connected = call(CallEvent::PeerState {
            device: dev(),
            peer: PeerHandle(1),
            call_id: "c1".into(),
            status: PeerStatus::Connected,
        });
        assert_eq!(connected["event"], "peer_state");
        assert_eq!(connected["state"], "connected");
        assert!(connected.get("reason").is_none());
        let failed = call(CallEvent::PeerState {
            device: dev(),
            peer: PeerHandle(1),
            call_id: "c1".into(),
            status: PeerStatus::Failed("ice_failed".into()),
        });
        assert_eq!(failed["state"], "failed");
        assert_eq!(failed["reason"], "ice_failed");
        assert_eq!(
            call(CallEvent::FeedAdded {
                device: dev(),
                stream_id: "st".into(),
                purpose: FeedPurpose::Usermedia,
                audio_muted: false,
                video_muted: true
            }),
            json!({"event":"feed_added","user_id":"@bob:localhost","device_id":"BOBDEV","stream_id":"st","purpose":"m.usermedia","audio_muted":false,"video_muted":true})
        );
        assert_eq!(
            call(CallEvent::FeedRemoved {
                device: dev(),
                stream_id: "st".into()
            }),
            json!({"event":"feed_removed","user_id":"@bob:localhost","device_id":"BOBDEV","stream_id":"st"})
        );
        assert_eq!(
            call(CallEvent::ParticipantLeft {
                device: dev(),
                session_id: "s".into(),
                reason: LeftReason::Expired
            })["reason"],
            "expired"
        );
        assert_eq!(
            call(CallEvent::CallEnded {
                call_id: "c".into(),
                reason: "call_ended".into()
            })["event"],
            "call_ended"
        );
        assert!(event_json(&ClientEvent::Call(CallEvent::Left)).is_none());
    }

    #[test]
    fn client_shapes() {
        let media = event_json(&ClientEvent::Media {
            device: dev(),
            stream_id: "st".into(),
            kind: TrackKind::Video,
            frames: 30,
            bytes: 1000,
        })
        .unwrap();
        assert_eq!(
            media,
            json!({"event":"media","user_id":"@bob:localhost","device_id":"BOBDEV","stream_id":"st","kind":"video","frames":30,"bytes":1000})
        );
        let sig = event_json(&ClientEvent::Signalling {
            sender: "@bob:localhost".into(),
            event_type: "m.call.invite".into(),
            encrypted: true,
            ignored: None,
        })
        .unwrap();
        assert_eq!(
            sig,
            json!({"event":"signalling","sender":"@bob:localhost","type":"m.call.invite","encrypted":true,"ignored":null})
        );
        let to = event_json(&ClientEvent::SignallingTo {
            device: dev(),
            encrypted: false,
            refused: false,
            reason: Some("no keys".into()),
        })
        .unwrap();
        assert_eq!(
            to,
            json!({"event":"signalling_to","user_id":"@bob:localhost","device_id":"BOBDEV","encrypted":false,"refused":false,"reason":"no keys"})
        );
        assert_eq!(
            event_json(&ClientEvent::Warning("w".into())).unwrap(),
            json!({"event":"warning","message":"w"})
        );
        assert_eq!(
            event_json(&ClientEvent::Recorded {
                path: "/tmp/x.ogg".into()
            })
            .unwrap(),
            json!({"event":"recorded","path":"/tmp/x.ogg"})
        );
    }
}
