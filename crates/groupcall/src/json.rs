//! The one JSON shape of a [`ClientEvent`]: `impl Serialize for ClientEvent`.
//!
//! Every program that prints events as JSON (`groupcall join --json`, the
//! `participant` example) uses it, so every consumer reads the same names.
//! Each event is one object whose `event` field names it; a remote device is
//! always `user_id` + `device_id`.
//!
//! | `event` | other fields |
//! |---|---|
//! | `room_call_changed` | `call_id` (or null) |
//! | `joined` | `call_id`, `session_id`, `created` |
//! | `left` | none |
//! | `call_ended` | `call_id`, `reason` |
//! | `participant_joined` | `user_id`, `device_id`, `session_id` |
//! | `participant_left` | `user_id`, `device_id`, `session_id`, `reason` ([`left_reason`]) |
//! | `peer_state` | `user_id`, `device_id`, `peer` (the peer's number: the same across an ICE restart, a new one for a new peer), `call_id`, `state` ([`peer_state`]); `reason` only for failed and closed |
//! | `feed_added`, `feed_changed` | `user_id`, `device_id`, `stream_id`, `purpose` (`m.usermedia`, `m.screenshare`), `audio_muted`, `video_muted` |
//! | `feed_removed` | `user_id`, `device_id`, `stream_id` |
//! | `unanswered` | `user_id`, `device_id`, `calls` |
//! | `call_started` | `call_id`, `intent`, `type`, `name` (each may be null) |
//! | `active_speaker` | `user_id`, `device_id`, `stream_id` (each may be null: all null when nobody speaks) |
//! | `remote_track` | `user_id`, `device_id`, `stream_id`, `track_id`, `kind` (`audio`, `video`) |
//! | `media` | `user_id`, `device_id`, `stream_id`, `kind`, `frames`, `bytes` (totals received) |
//! | `media_sent` | `user_id`, `device_id`, `kind`, `frames`, `bytes` (totals sent) |
//! | `signalling` | `sender`, `type`, `encrypted`, `ignored` (why, or null) |
//! | `signalling_to` | `user_id`, `device_id`, `encrypted`, `refused`, `reason` (or null) |
//! | `frame` | `user_id`, `device_id`, `stream_id`, `track_id`, `kind`, `bytes` (the frame's size; the data itself is not serialized), `rtp_time`, `keyframe` |
//! | `recorded` | `path` |
//! | `warning` | `message` |

use groupcall_proto::room::LeftReason;
use groupcall_proto::{CallEvent, DeviceKey, PeerStatus};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::ClientEvent;

/// `(state, reason)` of a peer status: `connecting`, `connected`,
/// `reconnecting`, or `failed` / `closed` with the hangup reason.
pub fn peer_state(status: &PeerStatus) -> (&'static str, Option<&str>) {
    match status {
        PeerStatus::Connecting => ("connecting", None),
        PeerStatus::Connected => ("connected", None),
        PeerStatus::Reconnecting => ("reconnecting", None),
        PeerStatus::Failed(r) => ("failed", Some(r)),
        PeerStatus::Closed(r) => ("closed", Some(r)),
        _ => ("unknown", None),
    }
}

/// Why a participant left: `removed`, `expired`, `room_left`, `call_ended`.
pub fn left_reason(reason: LeftReason) -> &'static str {
    match reason {
        LeftReason::Removed => "removed",
        LeftReason::Expired => "expired",
        LeftReason::RoomLeft => "room_left",
        LeftReason::CallEnded => "call_ended",
        _ => "unknown",
    }
}

impl ClientEvent {
    /// The event as a JSON object (see the [module](self) for its shape).
    pub fn to_json(&self) -> Value {
        // The shape has string keys and plain values only: serializing it
        // into a `Value` cannot fail.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl Serialize for ClientEvent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        Shape::of(self).serialize(serializer)
    }
}

/// A remote device's two fields.
#[derive(Serialize)]
struct Device<'a> {
    user_id: &'a str,
    device_id: &'a str,
}

impl<'a> From<&'a DeviceKey> for Device<'a> {
    fn from(d: &'a DeviceKey) -> Self {
        Device {
            user_id: &d.user_id,
            device_id: &d.device_id,
        }
    }
}

/// The shape itself: one variant per `event` name, borrowing from the event.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Shape<'a> {
    RoomCallChanged {
        call_id: Option<&'a str>,
    },
    Joined {
        call_id: &'a str,
        session_id: &'a str,
        created: bool,
    },
    Left,
    CallEnded {
        call_id: &'a str,
        reason: &'a str,
    },
    ParticipantJoined {
        #[serde(flatten)]
        device: Device<'a>,
        session_id: &'a str,
    },
    ParticipantLeft {
        #[serde(flatten)]
        device: Device<'a>,
        session_id: &'a str,
        reason: &'static str,
    },
    PeerState {
        #[serde(flatten)]
        device: Device<'a>,
        peer: u64,
        call_id: &'a str,
        state: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    FeedAdded(Feed<'a>),
    FeedChanged(Feed<'a>),
    FeedRemoved {
        #[serde(flatten)]
        device: Device<'a>,
        stream_id: &'a str,
    },
    Unanswered {
        #[serde(flatten)]
        device: Device<'a>,
        calls: u32,
    },
    ActiveSpeaker {
        user_id: Option<&'a str>,
        device_id: Option<&'a str>,
        stream_id: Option<&'a str>,
    },
    CallStarted {
        call_id: &'a str,
        intent: Option<&'a str>,
        #[serde(rename = "type")]
        call_type: Option<&'a str>,
        name: Option<&'a str>,
    },
    RemoteTrack {
        #[serde(flatten)]
        device: Device<'a>,
        stream_id: &'a str,
        track_id: &'a str,
        kind: &'static str,
    },
    Media {
        #[serde(flatten)]
        device: Device<'a>,
        stream_id: &'a str,
        mid: &'a str,
        kind: &'static str,
        frames: u64,
        bytes: u64,
    },
    MediaSent {
        #[serde(flatten)]
        device: Device<'a>,
        kind: &'static str,
        frames: u64,
        bytes: u64,
    },
    KeyframeRequested {
        #[serde(flatten)]
        device: Device<'a>,
        track_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        rid: Option<&'a str>,
        fir: bool,
    },
    SimulcastLayers {
        #[serde(flatten)]
        device: Device<'a>,
        track_id: &'a str,
        sending: &'a [String],
        paused: &'a [String],
        estimate_bps: Option<u64>,
    },
    TargetBitrate {
        #[serde(flatten)]
        device: Device<'a>,
        bps: u64,
    },
    Signalling {
        sender: &'a str,
        #[serde(rename = "type")]
        event_type: &'a str,
        encrypted: bool,
        ignored: Option<&'a str>,
    },
    SignallingTo {
        #[serde(flatten)]
        device: Device<'a>,
        encrypted: bool,
        refused: bool,
        reason: Option<&'a str>,
    },
    Frame {
        #[serde(flatten)]
        device: Device<'a>,
        stream_id: &'a str,
        track_id: &'a str,
        kind: &'static str,
        bytes: usize,
        rtp_time: u64,
        keyframe: bool,
    },
    Recorded {
        path: String,
    },
    Warning {
        message: &'a str,
    },
    Unknown {
        debug: String,
    },
}

/// `feed_added` and `feed_changed`.
#[derive(Serialize)]
struct Feed<'a> {
    #[serde(flatten)]
    device: Device<'a>,
    stream_id: &'a str,
    purpose: &'a str,
    audio_muted: bool,
    video_muted: bool,
}

impl<'a> Shape<'a> {
    fn of(ev: &'a ClientEvent) -> Shape<'a> {
        match ev {
            ClientEvent::Call(c) => Shape::of_call(c),
            ClientEvent::RemoteTrack {
                device,
                stream_id,
                track_id,
                kind,
            } => Shape::RemoteTrack {
                device: device.into(),
                stream_id,
                track_id,
                kind: kind.as_str(),
            },
            ClientEvent::Media {
                device,
                stream_id,
                mid,
                kind,
                frames,
                bytes,
            } => Shape::Media {
                device: device.into(),
                stream_id,
                mid,
                kind: kind.as_str(),
                frames: *frames,
                bytes: *bytes,
            },
            ClientEvent::MediaSent {
                device,
                kind,
                frames,
                bytes,
            } => Shape::MediaSent {
                device: device.into(),
                kind: kind.as_str(),
                frames: *frames,
                bytes: *bytes,
            },
            ClientEvent::KeyframeRequested {
                device,
                track_id,
                rid,
                fir,
            } => Shape::KeyframeRequested {
                device: device.into(),
                track_id,
                rid: rid.as_deref(),
                fir: *fir,
            },
            ClientEvent::SimulcastLayers {
                device,
                track_id,
                sending,
                paused,
                estimate_bps,
            } => Shape::SimulcastLayers {
                device: device.into(),
                track_id,
                sending,
                paused,
                estimate_bps: *estimate_bps,
            },
            ClientEvent::TargetBitrate { device, bps } => Shape::TargetBitrate {
                device: device.into(),
                bps: *bps,
            },
            ClientEvent::Signalling {
                sender,
                event_type,
                encrypted,
                ignored,
            } => Shape::Signalling {
                sender,
                event_type,
                encrypted: *encrypted,
                ignored: ignored.as_deref(),
            },
            ClientEvent::SignallingTo {
                device,
                encrypted,
                refused,
                reason,
            } => Shape::SignallingTo {
                device: device.into(),
                encrypted: *encrypted,
                refused: *refused,
                reason: reason.as_deref(),
            },
            ClientEvent::Frame { device, frame } => Shape::Frame {
                device: device.into(),
                stream_id: &frame.stream_id,
                track_id: &frame.track_id,
                kind: frame.kind.as_str(),
                bytes: frame.data.len(),
                rtp_time: frame.rtp_time,
                keyframe: frame.keyframe,
            },
            ClientEvent::Recorded { path } => Shape::Recorded {
                path: path.display().to_string(),
            },
            ClientEvent::Warning(message) => Shape::Warning { message },
        }
    }

    fn of_call(ev: &'a CallEvent) -> Shape<'a> {
        match ev {
            CallEvent::RoomCallChanged { call_id } => Shape::RoomCallChanged {
                call_id: call_id.as_deref(),
            },
            CallEvent::Joined {
                call_id,
                session_id,
                created,
            } => Shape::Joined {
                call_id,
                session_id,
                created: *created,
            },
            CallEvent::Left => Shape::Left,
            CallEvent::CallEnded { call_id, reason } => Shape::CallEnded { call_id, reason },
            CallEvent::ParticipantJoined { device, session_id } => Shape::ParticipantJoined {
                device: device.into(),
                session_id,
            },
            CallEvent::ParticipantLeft {
                device,
                session_id,
                reason,
            } => Shape::ParticipantLeft {
                device: device.into(),
                session_id,
                reason: left_reason(*reason),
            },
            CallEvent::PeerState {
                device,
                peer,
                call_id,
                status,
            } => {
                let (state, reason) = peer_state(status);
                Shape::PeerState {
                    device: device.into(),
                    peer: peer.0,
                    call_id,
                    state,
                    reason,
                }
            }
            CallEvent::FeedAdded {
                device,
                stream_id,
                purpose,
                audio_muted,
                video_muted,
            } => Shape::FeedAdded(Feed {
                device: device.into(),
                stream_id,
                purpose: purpose.as_str(),
                audio_muted: *audio_muted,
                video_muted: *video_muted,
            }),
            CallEvent::FeedChanged {
                device,
                stream_id,
                purpose,
                audio_muted,
                video_muted,
            } => Shape::FeedChanged(Feed {
                device: device.into(),
                stream_id,
                purpose: purpose.as_str(),
                audio_muted: *audio_muted,
                video_muted: *video_muted,
            }),
            CallEvent::FeedRemoved { device, stream_id } => Shape::FeedRemoved {
                device: device.into(),
                stream_id,
            },
            CallEvent::Unanswered { device, calls } => Shape::Unanswered {
                device: device.into(),
                calls: *calls,
            },
            CallEvent::CallStarted {
                call_id,
                intent,
                call_type,
                name,
            } => Shape::CallStarted {
                call_id,
                intent: intent.as_ref().map(|i| i.as_str()),
                call_type: call_type.as_ref().map(|t| t.as_str()),
                name: name.as_deref(),
            },
            CallEvent::ActiveSpeaker { device, stream_id } => Shape::ActiveSpeaker {
                user_id: device.as_ref().map(|d| d.user_id.as_str()),
                device_id: device.as_ref().map(|d| d.device_id.as_str()),
                stream_id: stream_id.as_deref(),
            },
            // A core event this version does not map yet: printed, not lost.
            other => Shape::Unknown {
                debug: format!("{other:?}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use groupcall_media::TrackKind;
    use groupcall_proto::PeerHandle;
    use groupcall_proto::events::{CallIntent, CallType, FeedPurpose};
    use serde_json::json;

    use super::*;
    use crate::client::ReceivedFrame;

    fn dev() -> DeviceKey {
        DeviceKey::new("@bob:localhost", "BOBDEV")
    }

    fn call(ev: CallEvent) -> Value {
        ClientEvent::Call(ev).to_json()
    }

    #[test]
    fn call_event_shapes() {
        assert_eq!(
            call(CallEvent::RoomCallChanged {
                call_id: Some("c".into())
            }),
            json!({"event":"room_call_changed","call_id":"c"})
        );
        assert_eq!(
            call(CallEvent::RoomCallChanged { call_id: None }),
            json!({"event":"room_call_changed","call_id":null})
        );
        assert_eq!(
            call(CallEvent::Joined {
                call_id: "c".into(),
                session_id: "s".into(),
                created: true
            }),
            json!({"event":"joined","call_id":"c","session_id":"s","created":true})
        );
        assert_eq!(call(CallEvent::Left), json!({"event":"left"}));
        assert_eq!(
            call(CallEvent::CallEnded {
                call_id: "c".into(),
                reason: "call_ended".into()
            }),
            json!({"event":"call_ended","call_id":"c","reason":"call_ended"})
        );
        assert_eq!(
            call(CallEvent::ParticipantJoined {
                device: dev(),
                session_id: "s".into()
            }),
            json!({"event":"participant_joined","user_id":"@bob:localhost","device_id":"BOBDEV","session_id":"s"})
        );
        for (reason, name) in [
            (LeftReason::Removed, "removed"),
            (LeftReason::Expired, "expired"),
            (LeftReason::RoomLeft, "room_left"),
            (LeftReason::CallEnded, "call_ended"),
        ] {
            assert_eq!(
                call(CallEvent::ParticipantLeft {
                    device: dev(),
                    session_id: "s".into(),
                    reason
                }),
                json!({"event":"participant_left","user_id":"@bob:localhost","device_id":"BOBDEV","session_id":"s","reason":name})
            );
        }
        assert_eq!(
            call(CallEvent::Unanswered {
                device: dev(),
                calls: 4
            }),
            json!({"event":"unanswered","user_id":"@bob:localhost","device_id":"BOBDEV","calls":4})
        );
        assert_eq!(
            call(CallEvent::CallStarted {
                call_id: "c".into(),
                intent: Some(CallIntent::Ring),
                call_type: Some(CallType::Video),
                name: Some("n".into())
            }),
            json!({"event":"call_started","call_id":"c","intent":"m.ring","type":"m.video","name":"n"})
        );
        assert_eq!(
            call(CallEvent::CallStarted {
                call_id: "c".into(),
                intent: None,
                call_type: None,
                name: None
            }),
            json!({"event":"call_started","call_id":"c","intent":null,"type":null,"name":null})
        );
    }

    #[test]
    fn active_speaker_shapes() {
        assert_eq!(
            call(CallEvent::ActiveSpeaker {
                device: Some(dev()),
                stream_id: Some("st".into())
            }),
            json!({"event":"active_speaker","user_id":"@bob:localhost","device_id":"BOBDEV","stream_id":"st"})
        );
        assert_eq!(
            call(CallEvent::ActiveSpeaker {
                device: None,
                stream_id: None
            }),
            json!({"event":"active_speaker","user_id":null,"device_id":null,"stream_id":null})
        );
    }

    #[test]
    fn peer_state_shapes() {
        let peer = |status| {
            call(CallEvent::PeerState {
                device: dev(),
                peer: PeerHandle(7),
                call_id: "c1".into(),
                status,
            })
        };
        for (status, state) in [
            (PeerStatus::Connecting, "connecting"),
            (PeerStatus::Connected, "connected"),
            (PeerStatus::Reconnecting, "reconnecting"),
        ] {
            assert_eq!(
                peer(status),
                json!({"event":"peer_state","user_id":"@bob:localhost","device_id":"BOBDEV","peer":7,"call_id":"c1","state":state})
            );
        }
        assert_eq!(
            peer(PeerStatus::Failed("ice_failed".into())),
            json!({"event":"peer_state","user_id":"@bob:localhost","device_id":"BOBDEV","peer":7,"call_id":"c1","state":"failed","reason":"ice_failed"})
        );
        assert_eq!(
            peer(PeerStatus::Closed("user_hangup".into())),
            json!({"event":"peer_state","user_id":"@bob:localhost","device_id":"BOBDEV","peer":7,"call_id":"c1","state":"closed","reason":"user_hangup"})
        );
    }

    #[test]
    fn feed_shapes() {
        let added = call(CallEvent::FeedAdded {
            device: dev(),
            stream_id: "st".into(),
            purpose: FeedPurpose::Usermedia,
            audio_muted: false,
            video_muted: true,
        });
        assert_eq!(
            added,
            json!({"event":"feed_added","user_id":"@bob:localhost","device_id":"BOBDEV","stream_id":"st","purpose":"m.usermedia","audio_muted":false,"video_muted":true})
        );
        assert_eq!(
            call(CallEvent::FeedChanged {
                device: dev(),
                stream_id: "st".into(),
                purpose: FeedPurpose::Screenshare,
                audio_muted: true,
                video_muted: false,
            }),
            json!({"event":"feed_changed","user_id":"@bob:localhost","device_id":"BOBDEV","stream_id":"st","purpose":"m.screenshare","audio_muted":true,"video_muted":false})
        );
        assert_eq!(
            call(CallEvent::FeedRemoved {
                device: dev(),
                stream_id: "st".into()
            }),
            json!({"event":"feed_removed","user_id":"@bob:localhost","device_id":"BOBDEV","stream_id":"st"})
        );
    }

    #[test]
    fn client_event_shapes() {
        assert_eq!(
            ClientEvent::RemoteTrack {
                device: dev(),
                stream_id: "st".into(),
                track_id: "tr".into(),
                kind: TrackKind::Audio,
            }
            .to_json(),
            json!({"event":"remote_track","user_id":"@bob:localhost","device_id":"BOBDEV","stream_id":"st","track_id":"tr","kind":"audio"})
        );
        assert_eq!(
            ClientEvent::Media {
                device: dev(),
                stream_id: "st".into(),
                mid: "1".into(),
                kind: TrackKind::Video,
                frames: 30,
                bytes: 1000,
            }
            .to_json(),
            json!({"event":"media","user_id":"@bob:localhost","device_id":"BOBDEV","stream_id":"st","mid":"1","kind":"video","frames":30,"bytes":1000})
        );
        assert_eq!(
            ClientEvent::MediaSent {
                device: dev(),
                kind: TrackKind::Audio,
                frames: 50,
                bytes: 4000,
            }
            .to_json(),
            json!({"event":"media_sent","user_id":"@bob:localhost","device_id":"BOBDEV","kind":"audio","frames":50,"bytes":4000})
        );
        assert_eq!(
            ClientEvent::Signalling {
                sender: "@bob:localhost".into(),
                event_type: "m.call.invite".into(),
                encrypted: true,
                ignored: None,
            }
            .to_json(),
            json!({"event":"signalling","sender":"@bob:localhost","type":"m.call.invite","encrypted":true,"ignored":null})
        );
        assert_eq!(
            ClientEvent::Signalling {
                sender: "@bob:localhost".into(),
                event_type: "m.call.negotiate".into(),
                encrypted: false,
                ignored: Some("stale".into()),
            }
            .to_json()["ignored"],
            "stale"
        );
        assert_eq!(
            ClientEvent::SignallingTo {
                device: dev(),
                encrypted: false,
                refused: false,
                reason: Some("no keys".into()),
            }
            .to_json(),
            json!({"event":"signalling_to","user_id":"@bob:localhost","device_id":"BOBDEV","encrypted":false,"refused":false,"reason":"no keys"})
        );
        assert_eq!(
            ClientEvent::SignallingTo {
                device: dev(),
                encrypted: true,
                refused: false,
                reason: None,
            }
            .to_json()["reason"],
            Value::Null
        );
        assert_eq!(
            ClientEvent::Frame {
                device: dev(),
                frame: ReceivedFrame {
                    stream_id: "st".into(),
                    track_id: "tr".into(),
                    kind: TrackKind::Video,
                    data: Arc::from(&[1u8, 2, 3][..]),
                    rtp_time: 90_000,
                    keyframe: true,
                },
            }
            .to_json(),
            json!({"event":"frame","user_id":"@bob:localhost","device_id":"BOBDEV","stream_id":"st","track_id":"tr","kind":"video","bytes":3,"rtp_time":90000,"keyframe":true})
        );
        assert_eq!(
            ClientEvent::KeyframeRequested {
                device: DeviceKey::new("@f:x", "F"),
                track_id: "t".into(),
                rid: None,
                fir: false,
            }
            .to_json(),
            json!({"event":"keyframe_requested","user_id":"@f:x","device_id":"F","track_id":"t","fir":false})
        );
        assert_eq!(
            ClientEvent::KeyframeRequested {
                device: DeviceKey::new("@f:x", "F"),
                track_id: "t".into(),
                rid: Some("f".into()),
                fir: false,
            }
            .to_json(),
            json!({"event":"keyframe_requested","user_id":"@f:x","device_id":"F","track_id":"t","rid":"f","fir":false})
        );
        assert_eq!(
            ClientEvent::SimulcastLayers {
                device: DeviceKey::new("@f:x", "F"),
                track_id: "t".into(),
                sending: vec!["q".into()],
                paused: vec!["h".into(), "f".into()],
                estimate_bps: Some(400_000),
            }
            .to_json(),
            json!({"event":"simulcast_layers","user_id":"@f:x","device_id":"F","track_id":"t","sending":["q"],"paused":["h","f"],"estimate_bps":400_000})
        );
        assert_eq!(
            ClientEvent::TargetBitrate {
                device: DeviceKey::new("@f:x", "F"),
                bps: 300_000,
            }
            .to_json(),
            json!({"event":"target_bitrate","user_id":"@f:x","device_id":"F","bps":300_000})
        );
        assert_eq!(
            ClientEvent::Recorded {
                path: "/tmp/x.ogg".into()
            }
            .to_json(),
            json!({"event":"recorded","path":"/tmp/x.ogg"})
        );
        assert_eq!(
            ClientEvent::Warning("w".into()).to_json(),
            json!({"event":"warning","message":"w"})
        );
    }

    /// Printed straight from `Serialize` (no `Value` in between), the line
    /// keeps the declared order: `event` first, then the device.
    #[test]
    fn line_order() {
        let line = serde_json::to_string(&ClientEvent::Call(CallEvent::ParticipantJoined {
            device: dev(),
            session_id: "s".into(),
        }))
        .unwrap();
        assert_eq!(
            line,
            r#"{"event":"participant_joined","user_id":"@bob:localhost","device_id":"BOBDEV","session_id":"s"}"#
        );
    }
}
