//! The MSC3898 data-channel messages, for both sides (focus and client).
//!
//! On the data channel every message is one JSON object
//! `{"type": "<event type>", "content": {...}}`, as in the MSC's examples.
//!
//! Reading ([`DcMessage::parse`]) is lenient and total: unknown fields are
//! ignored; `m.call.track_subscription` is read with either array names
//! (`subscribe`/`unsubscribe`, the MSC's JSON, or `start`/`stop`, its
//! prose); a missing `content` reads as `{}`; a message of a type this module
//! does not know comes back as [`DcMessage::Unknown`] for the caller to log
//! and ignore. Everything else that is wrong (not JSON, wrong JSON types,
//! sizes over the `MAX_*` limits, a width or height out of range, an SDP
//! type other than `offer`/`answer`) is a typed [`ParseError`] (groupcall-proto's error for outside input); nothing panics.
//!
//! Writing ([`DcMessage::encode`]) is strict: one canonical form, described
//! in `docs/protocol.md` ("The focus (MSC3898)"): `subscribe`/`unsubscribe`,
//! both arrays always present, `width`/`height` only when known,
//! `sdp_stream_metadata` always present on `m.call.negotiate`, every stream
//! with `purpose`, `audio_muted`, `video_muted` and `tracks`.
//!
//! Beside the MSC's messages, a focus sends `m.call.active_speaker`
//! ([`DcMessage::ActiveSpeaker`]) and `m.call.focus_draining`
//! ([`DcMessage::FocusDraining`]), and names the `kind` of each track in its
//! metadata ([`TrackMetadata::kind`]): groupcall's additions, described in
//! `docs/protocol.md`.
//!
//! The stream purpose and the session description reuse groupcall-proto's
//! MSC3077/MSC2746 types ([`FeedPurpose`], [`SessionDescription`]). The
//! metadata itself is this module's [`StreamMetadata`]: the proto one has no
//! `tracks` (MSC3898 adds them); [`StreamMetadata::to_proto`] converts.

use std::collections::BTreeMap;

pub use crate::error::ParseError;
use crate::events::{FeedPurpose, FocusRef, MAX_ID_LEN, read_foci};
use crate::signalling::SessionDescription;
use serde_json::{Map, Value, json};

/// `m.call.track_subscription`.
pub const TRACK_SUBSCRIPTION: &str = "m.call.track_subscription";
/// `m.call.negotiate`.
pub const NEGOTIATE: &str = "m.call.negotiate";
/// `m.call.sdp_stream_metadata_changed`.
pub const SDP_STREAM_METADATA_CHANGED: &str = "m.call.sdp_stream_metadata_changed";
/// `m.call.ping`.
pub const PING: &str = "m.call.ping";
/// `m.call.pong`.
pub const PONG: &str = "m.call.pong";
/// `m.call.active_speaker` (focus to client): not in MSC3898, groupcall's
/// own (see `docs/protocol.md`); a client that does not know it ignores it.
pub const ACTIVE_SPEAKER: &str = "m.call.active_speaker";
/// `m.call.focus_draining` (focus to client): not in MSC3898, groupcall's
/// own (see `docs/protocol.md`, "Drain"): the focus is stopping and will
/// hang up after its grace period; a client that does not know it ignores
/// it (and learns of the drain from the hangup at its end).
pub const FOCUS_DRAINING: &str = "m.call.focus_draining";
/// `m.call.connect_to_focus` (client to its focus): the other foci of the
/// call the client's focus should link with (cascading; MSC3898 leaves its
/// content open, groupcall's is in `docs/protocol.md`, "Cascading foci").
pub const CONNECT_TO_FOCUS: &str = "m.call.connect_to_focus";

/// The unstable name of `sdp_stream_metadata` (MSC3077), read as well.
const METADATA_UNSTABLE: &str = "org.matrix.msc3077.sdp_stream_metadata";

/// Largest message accepted or written, bytes: 256 KiB, the
/// `a=max-message-size` Chromium advertises for its data channels (so
/// nothing bigger can come from or go to Chromium). It bounds the SDP too; a
/// focus's offer to a subscriber of a large call needs the room.
pub const MAX_MESSAGE_LEN: usize = 256 * 1024;
/// Most entries of one `m.call.track_subscription`, `subscribe` and
/// `unsubscribe` together (both spellings of each counted).
pub const MAX_SUBSCRIPTION_ENTRIES: usize = 512;
/// Most streams in one `sdp_stream_metadata`.
pub const MAX_STREAMS: usize = 512;
/// Most tracks of one stream in `sdp_stream_metadata`.
pub const MAX_TRACKS_PER_STREAM: usize = 16;
/// Largest width or height accepted, pixels (16K video).
pub const MAX_DIMENSION: u32 = 16_384;
/// Longest type string kept in [`DcMessage::Unknown`].
pub const MAX_TYPE_LEN: usize = MAX_ID_LEN;

/// A stable short label for a data-channel parse error, for metrics and
/// logs: `too_large` (the whole message over [`MAX_MESSAGE_LEN`]),
/// `not_json`, `not_an_object`, `missing_field`, `wrong_type`, `too_long`,
/// `invalid_value` (out-of-range widths and heights among them), `other`.
pub fn error_label(e: &ParseError) -> &'static str {
    match e {
        ParseError::TooLong {
            field: "message", ..
        } => "too_large",
        ParseError::Serde(_) => "not_json",
        ParseError::NotAnObject { .. } => "not_an_object",
        ParseError::MissingField(_) => "missing_field",
        ParseError::WrongType { .. } => "wrong_type",
        ParseError::TooLong { .. } => "too_long",
        ParseError::InvalidValue { .. } => "invalid_value",
        _ => "other",
    }
}

/// A track to receive, with the resolution wished for (video).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackRequest {
    /// The stream (SDP msid stream id) of the track.
    pub stream_id: String,
    /// The track id.
    pub track_id: String,
    /// Width wished for, pixels; `None` for audio or "any".
    pub width: Option<u32>,
    /// Height wished for, pixels; `None` for audio or "any".
    pub height: Option<u32>,
}

/// A track named by its stream and track ids.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrackRef {
    /// The stream id.
    pub stream_id: String,
    /// The track id.
    pub track_id: String,
}

/// `m.call.track_subscription`: tracks to start and stop receiving.
///
/// As read, each list holds every track once (a repeated track keeps its
/// first entry, as the MSC asks foci to ignore repeated requests). A track in
/// both lists is kept in both: the receiver applies `unsubscribe` first, then
/// `subscribe` (see `docs/protocol.md`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrackSubscription {
    /// Tracks to receive (or to receive at a new resolution).
    pub subscribe: Vec<TrackRequest>,
    /// Tracks to stop receiving.
    pub unsubscribe: Vec<TrackRef>,
}

/// Audio or video: the `kind` of a track in metadata a focus sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum MediaKind {
    /// `audio`.
    Audio,
    /// `video`.
    Video,
}

impl MediaKind {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Audio => "audio",
            MediaKind::Video => "video",
        }
    }
}

/// One track's entry in [`StreamMetadata::tracks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrackMetadata {
    /// Width, pixels, when known.
    pub width: Option<u32>,
    /// Height, pixels, when known.
    pub height: Option<u32>,
    /// Audio or video (`kind`, groupcall's addition to MSC3898: a focus
    /// names the kind of each track it forwards, so that a client can
    /// choose video without audio). Absent, or a kind this module does not
    /// know, reads as `None`.
    pub kind: Option<MediaKind>,
}

/// One stream's entry in `sdp_stream_metadata` (MSC3077, MSC3291, and the
/// per-track resolutions of MSC3898).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamMetadata {
    /// `m.usermedia` or `m.screenshare` (another value is kept as read).
    pub purpose: FeedPurpose,
    /// Audio muted (absent reads as `false`).
    pub audio_muted: bool,
    /// Video muted (absent reads as `false`).
    pub video_muted: bool,
    /// Track id to its resolution (absent reads as none).
    pub tracks: BTreeMap<String, TrackMetadata>,
    /// Whose stream it is, in metadata a focus sends (which participant
    /// publishes it): `user_id`, as matrix-js-sdk names it for foci.
    pub user_id: Option<String>,
    /// The publishing device (`device_id`), with `user_id`.
    pub device_id: Option<String>,
}

impl StreamMetadata {
    /// A stream with this purpose, unmuted, no tracks listed.
    pub fn new(purpose: FeedPurpose) -> Self {
        Self {
            purpose,
            audio_muted: false,
            video_muted: false,
            tracks: BTreeMap::new(),
            user_id: None,
            device_id: None,
        }
    }

    /// This module's form of a to-device (MSC3077) entry: purpose and mute
    /// states; tracks and publisher unknown.
    pub fn from_proto(m: &crate::signalling::StreamMetadata) -> Self {
        let mut s = Self::new(m.purpose.clone());
        s.audio_muted = m.audio_muted;
        s.video_muted = m.video_muted;
        s
    }

    /// The groupcall-proto (to-device, MSC3077) form of this entry: the
    /// tracks go into its `extra` under `tracks`, in this module's canonical
    /// form.
    pub fn to_proto(&self) -> crate::signalling::StreamMetadata {
        let mut extra = Map::new();
        extra.insert("tracks".into(), tracks_value(&self.tracks));
        crate::signalling::StreamMetadata {
            purpose: self.purpose.clone(),
            audio_muted: self.audio_muted,
            video_muted: self.video_muted,
            extra,
        }
    }
}

/// `sdp_stream_metadata`: stream id (SDP msid) to its metadata.
pub type SdpStreamMetadata = BTreeMap<String, StreamMetadata>;

/// The type of an SDP on the data channel: only offers and answers are
/// exchanged there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SdpType {
    /// `offer`.
    Offer,
    /// `answer`.
    Answer,
}

impl SdpType {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            SdpType::Offer => "offer",
            SdpType::Answer => "answer",
        }
    }
}

/// `m.call.negotiate` over the data channel, either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiate {
    /// Offer or answer.
    pub sdp_type: SdpType,
    /// The SDP (non-empty).
    pub sdp: String,
    /// The streams after this negotiation (absent reads as empty).
    pub sdp_stream_metadata: SdpStreamMetadata,
}

impl Negotiate {
    /// The description as groupcall-proto's `RTCSessionDescriptionInit`.
    pub fn description(&self) -> SessionDescription {
        SessionDescription {
            sdp_type: self.sdp_type.as_str().to_owned(),
            sdp: self.sdp.clone(),
        }
    }
}

/// The participant a focus names as the active speaker of the call
/// ([`DcMessage::ActiveSpeaker`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSpeaker {
    /// The speaker's user id.
    pub user_id: String,
    /// The speaker's device id.
    pub device_id: String,
    /// The stream (SDP msid stream id) that carries its voice, when the
    /// focus knows it.
    pub stream_id: Option<String>,
}

/// One data-channel message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DcMessage {
    /// `m.call.track_subscription` (client to focus).
    TrackSubscription(TrackSubscription),
    /// `m.call.negotiate` (either way).
    Negotiate(Negotiate),
    /// `m.call.sdp_stream_metadata_changed` (either way): who publishes
    /// what, muted or not.
    SdpStreamMetadataChanged {
        /// The new metadata.
        sdp_stream_metadata: SdpStreamMetadata,
    },
    /// `m.call.ping` (focus to client).
    Ping,
    /// `m.call.pong` (client to focus).
    Pong,
    /// `m.call.active_speaker` (focus to client): the call's active speaker
    /// changed (`None`: nobody speaks any more, e.g. the speaker left).
    ActiveSpeaker(Option<ActiveSpeaker>),
    /// `m.call.connect_to_focus` (client to its focus): link with these
    /// other foci of the call (`content.foci`, each `{user_id, device_id}`;
    /// entries that are not such objects are skipped, at most 8 read). The
    /// focus links only with foci a live participant of the call names in
    /// `m.foci.active` (docs/protocol.md, "Cascading foci").
    ConnectToFocus {
        /// The foci named.
        foci: Vec<FocusRef>,
    },
    /// `m.call.focus_draining` (focus to client): the focus is stopping;
    /// it takes no new calls and hangs up on this one after its grace
    /// period (`content.hangup_in_ms`, a non-negative integer, if given).
    FocusDraining {
        /// Milliseconds until the focus hangs up, as it said.
        hangup_in_ms: Option<u64>,
    },
    /// A type this module does not know: log and ignore.
    Unknown {
        /// The `type` as read (at most [`MAX_TYPE_LEN`] bytes).
        msg_type: String,
    },
}

impl DcMessage {
    /// The `type` of this message.
    pub fn message_type(&self) -> &str {
        match self {
            DcMessage::TrackSubscription(_) => TRACK_SUBSCRIPTION,
            DcMessage::Negotiate(_) => NEGOTIATE,
            DcMessage::SdpStreamMetadataChanged { .. } => SDP_STREAM_METADATA_CHANGED,
            DcMessage::Ping => PING,
            DcMessage::Pong => PONG,
            DcMessage::ActiveSpeaker(_) => ACTIVE_SPEAKER,
            DcMessage::ConnectToFocus { .. } => CONNECT_TO_FOCUS,
            DcMessage::FocusDraining { .. } => FOCUS_DRAINING,
            DcMessage::Unknown { msg_type } => msg_type,
        }
    }

    /// Reads a message from the bytes of one data-channel message (text or
    /// binary).
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(ParseError::TooLong {
                field: "message",
                len: bytes.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| ParseError::Serde(e.to_string()))?;
        Self::from_value(&v)
    }

    /// Reads a message from its JSON (no size check: [`DcMessage::parse`]
    /// does that on the bytes).
    pub fn from_value(v: &Value) -> Result<Self, ParseError> {
        let obj = v
            .as_object()
            .ok_or(ParseError::NotAnObject { what: "message" })?;
        let msg_type = match obj.get("type") {
            None => return Err(ParseError::MissingField("type")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => {
                return Err(ParseError::WrongType {
                    field: "type",
                    expected: "string",
                });
            }
        };
        let empty = Map::new();
        let content = match obj.get("content") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(c)) => c,
            Some(_) => return Err(ParseError::NotAnObject { what: "content" }),
        };
        Ok(match msg_type {
            TRACK_SUBSCRIPTION => DcMessage::TrackSubscription(read_subscription(content)?),
            NEGOTIATE => DcMessage::Negotiate(read_negotiate(content)?),
            SDP_STREAM_METADATA_CHANGED => DcMessage::SdpStreamMetadataChanged {
                sdp_stream_metadata: match metadata_field(content) {
                    Some(m) => read_metadata(m)?,
                    None => return Err(ParseError::MissingField("sdp_stream_metadata")),
                },
            },
            PING => DcMessage::Ping,
            PONG => DcMessage::Pong,
            ACTIVE_SPEAKER => DcMessage::ActiveSpeaker(read_active_speaker(content)?),
            CONNECT_TO_FOCUS => match content.get("foci") {
                None | Some(Value::Null) => return Err(ParseError::MissingField("foci")),
                Some(Value::Array(_)) => DcMessage::ConnectToFocus {
                    foci: read_foci(content, "foci", "foci"),
                },
                Some(_) => {
                    return Err(ParseError::WrongType {
                        field: "foci",
                        expected: "array",
                    });
                }
            },
            FOCUS_DRAINING => DcMessage::FocusDraining {
                hangup_in_ms: match content.get("hangup_in_ms") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(v.as_u64().ok_or(ParseError::WrongType {
                        field: "hangup_in_ms",
                        expected: "non-negative integer",
                    })?),
                },
            },
            other if other.len() > MAX_TYPE_LEN => {
                return Err(ParseError::TooLong {
                    field: "type",
                    len: other.len(),
                    max: MAX_TYPE_LEN,
                });
            }
            other => DcMessage::Unknown {
                msg_type: other.to_owned(),
            },
        })
    }

    /// The canonical JSON of this message. An [`DcMessage::Unknown`] is
    /// written with an empty content.
    pub fn to_value(&self) -> Value {
        let content = match self {
            DcMessage::TrackSubscription(s) => json!({
                "subscribe": s.subscribe.iter().map(|r| {
                    let mut o = Map::new();
                    o.insert("stream_id".into(), r.stream_id.clone().into());
                    o.insert("track_id".into(), r.track_id.clone().into());
                    put_dimensions(&mut o, r.width, r.height);
                    Value::Object(o)
                }).collect::<Vec<_>>(),
                "unsubscribe": s.unsubscribe.iter().map(|r| json!({
                    "stream_id": r.stream_id,
                    "track_id": r.track_id,
                })).collect::<Vec<_>>(),
            }),
            DcMessage::Negotiate(n) => json!({
                "description": {"type": n.sdp_type.as_str(), "sdp": n.sdp},
                "sdp_stream_metadata": metadata_value(&n.sdp_stream_metadata),
            }),
            DcMessage::SdpStreamMetadataChanged {
                sdp_stream_metadata,
            } => json!({"sdp_stream_metadata": metadata_value(sdp_stream_metadata)}),
            DcMessage::ActiveSpeaker(Some(a)) => {
                let mut o = Map::new();
                o.insert("user_id".into(), a.user_id.clone().into());
                o.insert("device_id".into(), a.device_id.clone().into());
                if let Some(s) = &a.stream_id {
                    o.insert("stream_id".into(), s.clone().into());
                }
                Value::Object(o)
            }
            DcMessage::ConnectToFocus { foci } => json!({
                "foci": foci.iter().map(|f| json!({
                    "user_id": f.user_id,
                    "device_id": f.device_id,
                })).collect::<Vec<_>>(),
            }),
            DcMessage::FocusDraining {
                hangup_in_ms: Some(ms),
            } => json!({ "hangup_in_ms": ms }),
            DcMessage::FocusDraining { hangup_in_ms: None }
            | DcMessage::ActiveSpeaker(None)
            | DcMessage::Ping
            | DcMessage::Pong
            | DcMessage::Unknown { .. } => json!({}),
        };
        json!({"type": self.message_type(), "content": content})
    }

    /// The canonical wire form of this message, refused when it is bigger
    /// than [`MAX_MESSAGE_LEN`] (the other side would refuse it).
    pub fn encode(&self) -> Result<String, ParseError> {
        // The envelope is written by hand so that `type` comes first
        // whatever key order serde_json is built with.
        let content = match self.to_value() {
            Value::Object(mut o) => o.remove("content").unwrap_or_default(),
            _ => Value::Object(Map::new()),
        };
        let s = format!(
            "{{\"type\":{},\"content\":{}}}",
            Value::from(self.message_type()),
            content
        );
        if s.len() > MAX_MESSAGE_LEN {
            return Err(ParseError::TooLong {
                field: "message",
                len: s.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        Ok(s)
    }
}

fn put_dimensions(o: &mut Map<String, Value>, width: Option<u32>, height: Option<u32>) {
    if let Some(w) = width {
        o.insert("width".into(), w.into());
    }
    if let Some(h) = height {
        o.insert("height".into(), h.into());
    }
}

fn tracks_value(tracks: &BTreeMap<String, TrackMetadata>) -> Value {
    Value::Object(
        tracks
            .iter()
            .map(|(id, t)| {
                let mut o = Map::new();
                put_dimensions(&mut o, t.width, t.height);
                if let Some(k) = t.kind {
                    o.insert("kind".into(), k.as_str().into());
                }
                (id.clone(), Value::Object(o))
            })
            .collect(),
    )
}

fn metadata_value(m: &SdpStreamMetadata) -> Value {
    Value::Object(
        m.iter()
            .map(|(id, s)| {
                let mut v = json!({
                    "purpose": s.purpose.as_str(),
                    "audio_muted": s.audio_muted,
                    "video_muted": s.video_muted,
                    "tracks": tracks_value(&s.tracks),
                });
                if let (Some(u), Some(d), Some(o)) = (&s.user_id, &s.device_id, v.as_object_mut()) {
                    o.insert("user_id".into(), json!(u));
                    o.insert("device_id".into(), json!(d));
                }
                (id.clone(), v)
            })
            .collect(),
    )
}

/// An optional string id: absent or null reads as `None`; otherwise as
/// [`id`].
fn optional_id(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, ParseError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => id(obj, field).map(Some),
    }
}

/// A non-empty string id of at most [`MAX_ID_LEN`] bytes.
fn id(obj: &Map<String, Value>, field: &'static str) -> Result<String, ParseError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(ParseError::MissingField(field)),
        Some(Value::String(s)) => check_id(field, s).map(str::to_owned),
        Some(_) => Err(ParseError::WrongType {
            field,
            expected: "string",
        }),
    }
}

fn check_id<'a>(field: &'static str, s: &'a str) -> Result<&'a str, ParseError> {
    if s.is_empty() {
        return Err(ParseError::InvalidValue {
            field,
            reason: "empty".into(),
        });
    }
    if s.len() > MAX_ID_LEN {
        return Err(ParseError::TooLong {
            field,
            len: s.len(),
            max: MAX_ID_LEN,
        });
    }
    Ok(s)
}

/// An optional width or height: a JSON number in `1..=MAX_DIMENSION`; a
/// fractional value (a client's scaled tile size) is rounded to the nearest
/// pixel first. `null` reads as absent.
fn dimension(obj: &Map<String, Value>, field: &'static str) -> Result<Option<u32>, ParseError> {
    let n = match obj.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n,
        Some(_) => {
            return Err(ParseError::WrongType {
                field,
                expected: "number",
            });
        }
    };
    let out_of_range = || ParseError::InvalidValue {
        field,
        reason: format!("{n} is outside 1..={MAX_DIMENSION}"),
    };
    let rounded = match n.as_u64() {
        Some(u) => u,
        None => {
            let f = n.as_f64().ok_or_else(out_of_range)?;
            if !(0.5..MAX_DIMENSION as f64 + 0.5).contains(&f) {
                return Err(out_of_range());
            }
            f.round() as u64
        }
    };
    match u32::try_from(rounded) {
        Ok(v) if (1..=MAX_DIMENSION).contains(&v) => Ok(Some(v)),
        _ => Err(out_of_range()),
    }
}

/// The entries of the arrays named `names` (each may be absent; present
/// ones must be arrays), in order.
fn entries<'a>(
    content: &'a Map<String, Value>,
    names: [&'static str; 2],
    budget: &mut usize,
) -> Result<Vec<&'a Map<String, Value>>, ParseError> {
    let mut out = Vec::new();
    for name in names {
        let arr = match content.get(name) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(ParseError::WrongType {
                    field: name,
                    expected: "array",
                });
            }
        };
        if arr.len() > *budget {
            return Err(ParseError::TooLong {
                field: name,
                len: arr.len(),
                max: MAX_SUBSCRIPTION_ENTRIES,
            });
        }
        *budget -= arr.len();
        for e in arr {
            out.push(e.as_object().ok_or(ParseError::NotAnObject {
                what: "subscription entry",
            })?);
        }
    }
    Ok(out)
}

fn read_subscription(content: &Map<String, Value>) -> Result<TrackSubscription, ParseError> {
    let mut budget = MAX_SUBSCRIPTION_ENTRIES;
    let mut sub = TrackSubscription::default();
    let mut seen = std::collections::BTreeSet::new();
    for e in entries(content, ["subscribe", "start"], &mut budget)? {
        let r = TrackRequest {
            stream_id: id(e, "stream_id")?,
            track_id: id(e, "track_id")?,
            width: dimension(e, "width")?,
            height: dimension(e, "height")?,
        };
        if seen.insert((r.stream_id.clone(), r.track_id.clone())) {
            sub.subscribe.push(r);
        }
    }
    seen.clear();
    for e in entries(content, ["unsubscribe", "stop"], &mut budget)? {
        let r = TrackRef {
            stream_id: id(e, "stream_id")?,
            track_id: id(e, "track_id")?,
        };
        if seen.insert((r.stream_id.clone(), r.track_id.clone())) {
            sub.unsubscribe.push(r);
        }
    }
    Ok(sub)
}

/// `m.call.active_speaker`: `user_id` and `device_id` together name the
/// speaker; both absent (or null) say nobody speaks; one without the other
/// is an error. `stream_id` is optional.
fn read_active_speaker(content: &Map<String, Value>) -> Result<Option<ActiveSpeaker>, ParseError> {
    let user_id = optional_id(content, "user_id")?;
    let device_id = optional_id(content, "device_id")?;
    let stream_id = optional_id(content, "stream_id")?;
    match (user_id, device_id) {
        (Some(user_id), Some(device_id)) => Ok(Some(ActiveSpeaker {
            user_id,
            device_id,
            stream_id,
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ParseError::MissingField("device_id")),
        (None, Some(_)) => Err(ParseError::MissingField("user_id")),
    }
}

fn metadata_field(content: &Map<String, Value>) -> Option<&Value> {
    match content.get("sdp_stream_metadata") {
        None | Some(Value::Null) => content.get(METADATA_UNSTABLE).filter(|v| !v.is_null()),
        some => some,
    }
}

fn read_negotiate(content: &Map<String, Value>) -> Result<Negotiate, ParseError> {
    let desc = match content.get("description") {
        None | Some(Value::Null) => return Err(ParseError::MissingField("description")),
        Some(Value::Object(d)) => d,
        Some(_) => {
            return Err(ParseError::NotAnObject {
                what: "description",
            });
        }
    };
    let sdp_type = match desc.get("type") {
        None | Some(Value::Null) => return Err(ParseError::MissingField("type")),
        Some(Value::String(s)) if s == "offer" => SdpType::Offer,
        Some(Value::String(s)) if s == "answer" => SdpType::Answer,
        Some(Value::String(s)) => {
            return Err(ParseError::InvalidValue {
                field: "type",
                reason: format!(
                    "`{}` is neither offer nor answer",
                    s.chars().take(32).collect::<String>()
                ),
            });
        }
        Some(_) => {
            return Err(ParseError::WrongType {
                field: "type",
                expected: "string",
            });
        }
    };
    let sdp = match desc.get("sdp") {
        None | Some(Value::Null) => return Err(ParseError::MissingField("sdp")),
        Some(Value::String(s)) if s.is_empty() => {
            return Err(ParseError::InvalidValue {
                field: "sdp",
                reason: "empty".into(),
            });
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ParseError::WrongType {
                field: "sdp",
                expected: "string",
            });
        }
    };
    let sdp_stream_metadata = match metadata_field(content) {
        Some(m) => read_metadata(m)?,
        None => SdpStreamMetadata::new(),
    };
    Ok(Negotiate {
        sdp_type,
        sdp,
        sdp_stream_metadata,
    })
}

fn flag(obj: &Map<String, Value>, field: &'static str) -> Result<bool, ParseError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ParseError::WrongType {
            field,
            expected: "boolean",
        }),
    }
}

/// A track's `kind`: `audio` or `video`; absent, null or another string
/// (a kind added later) reads as `None`.
fn media_kind(obj: &Map<String, Value>) -> Result<Option<MediaKind>, ParseError> {
    match obj.get("kind") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s == "audio" => Ok(Some(MediaKind::Audio)),
        Some(Value::String(s)) if s == "video" => Ok(Some(MediaKind::Video)),
        Some(Value::String(_)) => Ok(None),
        Some(_) => Err(ParseError::WrongType {
            field: "kind",
            expected: "string",
        }),
    }
}

fn read_metadata(v: &Value) -> Result<SdpStreamMetadata, ParseError> {
    let obj = v.as_object().ok_or(ParseError::NotAnObject {
        what: "sdp_stream_metadata",
    })?;
    if obj.len() > MAX_STREAMS {
        return Err(ParseError::TooLong {
            field: "sdp_stream_metadata",
            len: obj.len(),
            max: MAX_STREAMS,
        });
    }
    let mut out = SdpStreamMetadata::new();
    for (stream_id, s) in obj {
        check_id("stream_id", stream_id)?;
        let s = s.as_object().ok_or(ParseError::NotAnObject {
            what: "stream metadata",
        })?;
        let purpose = match s.get("purpose") {
            None | Some(Value::Null) => return Err(ParseError::MissingField("purpose")),
            Some(Value::String(p)) => FeedPurpose::from(check_id("purpose", p)?.to_owned()),
            Some(_) => {
                return Err(ParseError::WrongType {
                    field: "purpose",
                    expected: "string",
                });
            }
        };
        let mut tracks = BTreeMap::new();
        match s.get("tracks") {
            None | Some(Value::Null) => {}
            Some(Value::Object(t)) => {
                if t.len() > MAX_TRACKS_PER_STREAM {
                    return Err(ParseError::TooLong {
                        field: "tracks",
                        len: t.len(),
                        max: MAX_TRACKS_PER_STREAM,
                    });
                }
                for (track_id, tm) in t {
                    check_id("track_id", track_id)?;
                    let tm = tm.as_object().ok_or(ParseError::NotAnObject {
                        what: "track metadata",
                    })?;
                    tracks.insert(
                        track_id.clone(),
                        TrackMetadata {
                            width: dimension(tm, "width")?,
                            height: dimension(tm, "height")?,
                            kind: media_kind(tm)?,
                        },
                    );
                }
            }
            Some(_) => return Err(ParseError::NotAnObject { what: "tracks" }),
        }
        out.insert(
            stream_id.clone(),
            StreamMetadata {
                purpose,
                audio_muted: flag(s, "audio_muted")?,
                video_muted: flag(s, "video_muted")?,
                tracks,
                user_id: optional_id(s, "user_id")?,
                device_id: optional_id(s, "device_id")?,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<DcMessage, ParseError> {
        DcMessage::parse(v.to_string().as_bytes())
    }

    fn req(stream: &str, track: &str, w: Option<u32>, h: Option<u32>) -> TrackRequest {
        TrackRequest {
            stream_id: stream.into(),
            track_id: track.into(),
            width: w,
            height: h,
        }
    }

    fn tref(stream: &str, track: &str) -> TrackRef {
        TrackRef {
            stream_id: stream.into(),
            track_id: track.into(),
        }
    }

    /// The MSC's `m.call.track_subscription` example, verbatim.
    const MSC_SUBSCRIPTION: &str = r#"{
        "type": "m.call.track_subscription",
        "content": {
            "subscribe": [
                {"stream_id": "streamId1", "track_id": "trackId1", "width": 1920, "height": 1080},
                {"stream_id": "streamId2", "track_id": "trackId2", "width": 256, "height": 144}
            ],
            "unsubscribe": [
                {"stream_id": "streamId3", "track_id": "trackId4"},
                {"stream_id": "streamId4", "track_id": "trackId4"}
            ]
        }
    }"#;

    fn msc_subscription() -> TrackSubscription {
        TrackSubscription {
            subscribe: vec![
                req("streamId1", "trackId1", Some(1920), Some(1080)),
                req("streamId2", "trackId2", Some(256), Some(144)),
            ],
            unsubscribe: vec![tref("streamId3", "trackId4"), tref("streamId4", "trackId4")],
        }
    }

    #[test]
    fn msc_subscription_example_parses_and_round_trips() {
        let m = DcMessage::parse(MSC_SUBSCRIPTION.as_bytes()).unwrap();
        assert_eq!(m, DcMessage::TrackSubscription(msc_subscription()));
        let again = DcMessage::parse(m.encode().unwrap().as_bytes()).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn start_stop_form_reads_the_same_and_writes_subscribe() {
        let text = MSC_SUBSCRIPTION
            .replace("\"subscribe\"", "\"start\"")
            .replace("\"unsubscribe\"", "\"stop\"");
        assert!(text.contains("\"start\"") && text.contains("\"stop\""));
        let m = DcMessage::parse(text.as_bytes()).unwrap();
        assert_eq!(m, DcMessage::TrackSubscription(msc_subscription()));
        let out = m.to_value();
        assert_eq!(
            out,
            json!({"type": "m.call.track_subscription", "content": {
                "subscribe": [
                    {"stream_id": "streamId1", "track_id": "trackId1", "width": 1920, "height": 1080},
                    {"stream_id": "streamId2", "track_id": "trackId2", "width": 256, "height": 144}],
                "unsubscribe": [
                    {"stream_id": "streamId3", "track_id": "trackId4"},
                    {"stream_id": "streamId4", "track_id": "trackId4"}]}})
        );
    }

    #[test]
    fn both_spellings_together_merge_and_repeats_keep_the_first() {
        let m = parse(json!({"type": "m.call.track_subscription", "content": {
            "subscribe": [{"stream_id": "s", "track_id": "a", "width": 640, "height": 360}],
            "start": [{"stream_id": "s", "track_id": "a", "width": 1280, "height": 720},
                      {"stream_id": "s", "track_id": "b"}],
            "stop": [{"stream_id": "t", "track_id": "c"}, {"stream_id": "t", "track_id": "c"}],
        }}))
        .unwrap();
        assert_eq!(
            m,
            DcMessage::TrackSubscription(TrackSubscription {
                subscribe: vec![
                    req("s", "a", Some(640), Some(360)),
                    req("s", "b", None, None)
                ],
                unsubscribe: vec![tref("t", "c")],
            })
        );
    }

    #[test]
    fn empty_subscription_and_unknown_fields() {
        let m = parse(json!({"type": "m.call.track_subscription", "content": {},
            "extra": 1}))
        .unwrap();
        assert_eq!(
            m,
            DcMessage::TrackSubscription(TrackSubscription::default())
        );
        assert_eq!(
            m.to_value(),
            json!({"type": "m.call.track_subscription", "content": {"subscribe": [], "unsubscribe": []}})
        );
        let m = parse(json!({"type": "m.call.track_subscription", "content": {
            "subscribe": [{"stream_id": "s", "track_id": "a", "rid": "h", "x": {"y": 1}}],
            "unsubscribe": [{"stream_id": "s", "track_id": "b", "width": 10}]}}))
        .unwrap();
        assert_eq!(
            m,
            DcMessage::TrackSubscription(TrackSubscription {
                subscribe: vec![req("s", "a", None, None)],
                unsubscribe: vec![tref("s", "b")],
            })
        );
    }

    #[test]
    fn dimensions_fractional_rounded_out_of_range_refused() {
        let sub = |w: Value, h: Value| {
            parse(json!({"type": "m.call.track_subscription", "content": {
                "subscribe": [{"stream_id": "s", "track_id": "a", "width": w, "height": h}]}}))
        };
        assert_eq!(
            sub(json!(426.67), json!(240.0)).unwrap(),
            DcMessage::TrackSubscription(TrackSubscription {
                subscribe: vec![req("s", "a", Some(427), Some(240))],
                unsubscribe: vec![],
            })
        );
        assert!(sub(json!(16384), json!(1)).is_ok());
        assert!(sub(json!(null), json!(null)).is_ok());
        for bad in [
            json!(0),
            json!(-1),
            json!(16385),
            json!(0.4),
            json!(1e300),
            json!(u64::MAX),
        ] {
            let e = sub(bad.clone(), json!(100)).unwrap_err();
            assert!(
                matches!(e, ParseError::InvalidValue { field: "width", .. }),
                "{bad}: {e}"
            );
            let e = sub(json!(100), bad.clone()).unwrap_err();
            assert!(
                matches!(
                    e,
                    ParseError::InvalidValue {
                        field: "height",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            sub(json!("1920"), json!(1080)).unwrap_err(),
            ParseError::WrongType {
                field: "width",
                expected: "number"
            }
        );
    }

    #[test]
    fn bad_subscriptions_are_typed_errors() {
        let sub = |c: Value| parse(json!({"type": "m.call.track_subscription", "content": c}));
        assert_eq!(
            sub(json!({"subscribe": {"stream_id": "s"}})).unwrap_err(),
            ParseError::WrongType {
                field: "subscribe",
                expected: "array"
            }
        );
        assert_eq!(
            sub(json!({"stop": [1]})).unwrap_err(),
            ParseError::NotAnObject {
                what: "subscription entry"
            }
        );
        assert_eq!(
            sub(json!({"subscribe": [{"track_id": "a"}]})).unwrap_err(),
            ParseError::MissingField("stream_id")
        );
        assert_eq!(
            sub(json!({"subscribe": [{"stream_id": "s", "track_id": 5}]})).unwrap_err(),
            ParseError::WrongType {
                field: "track_id",
                expected: "string"
            }
        );
        assert!(matches!(
            sub(json!({"subscribe": [{"stream_id": "", "track_id": "a"}]})).unwrap_err(),
            ParseError::InvalidValue {
                field: "stream_id",
                ..
            }
        ));
        assert!(matches!(
            sub(json!({"subscribe": [{"stream_id": "x".repeat(256), "track_id": "a"}]}))
                .unwrap_err(),
            ParseError::TooLong {
                field: "stream_id",
                ..
            }
        ));
    }

    #[test]
    fn subscription_entry_limit_counts_both_lists() {
        let entry = |i: usize| json!({"stream_id": "s", "track_id": format!("t{i}")});
        let half: Vec<_> = (0..MAX_SUBSCRIPTION_ENTRIES / 2).map(entry).collect();
        let ok = parse(json!({"type": "m.call.track_subscription",
            "content": {"subscribe": half, "unsubscribe": half}}))
        .unwrap();
        let DcMessage::TrackSubscription(s) = ok else {
            panic!("not a subscription")
        };
        assert_eq!(
            s.subscribe.len() + s.unsubscribe.len(),
            MAX_SUBSCRIPTION_ENTRIES
        );
        let e = parse(json!({"type": "m.call.track_subscription",
            "content": {"subscribe": half, "unsubscribe": half, "stop": [entry(0)]}}))
        .unwrap_err();
        assert!(
            matches!(e, ParseError::TooLong { field: "stop", .. }),
            "{e}"
        );
    }

    /// The MSC's metadata example.
    fn msc_metadata_json() -> Value {
        json!({
            "streamId1": {
                "purpose": "m.usermedia",
                "audio_muted": false,
                "video_muted": true,
                "tracks": {
                    "trackId1": {"width": 1920, "height": 1080},
                    "trackId2": {}
                }
            }
        })
    }

    fn msc_metadata() -> SdpStreamMetadata {
        let mut s = StreamMetadata::new(FeedPurpose::Usermedia);
        s.video_muted = true;
        s.tracks.insert(
            "trackId1".into(),
            TrackMetadata {
                width: Some(1920),
                height: Some(1080),
                kind: None,
            },
        );
        s.tracks.insert("trackId2".into(), TrackMetadata::default());
        BTreeMap::from([("streamId1".to_owned(), s)])
    }

    #[test]
    fn msc_negotiate_example_parses_and_writes_canonically() {
        let v = json!({"type": "m.call.negotiate", "content": {
            "description": {"type": "offer", "sdp": "v=0\r\n"},
            "sdp_stream_metadata": msc_metadata_json()}});
        let m = parse(v.clone()).unwrap();
        let DcMessage::Negotiate(n) = &m else {
            panic!("not a negotiate: {m:?}")
        };
        assert_eq!(n.sdp_type, SdpType::Offer);
        assert_eq!(n.sdp, "v=0\r\n");
        assert_eq!(n.sdp_stream_metadata, msc_metadata());
        assert_eq!(n.description(), SessionDescription::offer("v=0\r\n"));
        // The example is already in the canonical form.
        assert_eq!(m.to_value(), v);
        let answer = parse(json!({"type": "m.call.negotiate", "content": {
            "description": {"type": "answer", "sdp": "v=0"}}}))
        .unwrap();
        assert_eq!(
            answer,
            DcMessage::Negotiate(Negotiate {
                sdp_type: SdpType::Answer,
                sdp: "v=0".into(),
                sdp_stream_metadata: SdpStreamMetadata::new(),
            })
        );
        assert_eq!(
            answer.to_value()["content"]["sdp_stream_metadata"],
            json!({})
        );
    }

    #[test]
    fn bad_negotiates_are_typed_errors() {
        let neg = |c: Value| parse(json!({"type": "m.call.negotiate", "content": c}));
        assert_eq!(
            neg(json!({})).unwrap_err(),
            ParseError::MissingField("description")
        );
        assert!(matches!(
            neg(json!({"description": {"type": "pranswer", "sdp": "v=0"}})).unwrap_err(),
            ParseError::InvalidValue { field: "type", .. }
        ));
        assert!(matches!(
            neg(json!({"description": {"type": "offer", "sdp": ""}})).unwrap_err(),
            ParseError::InvalidValue { field: "sdp", .. }
        ));
        assert_eq!(
            neg(json!({"description": {"type": "offer", "sdp": 1}})).unwrap_err(),
            ParseError::WrongType {
                field: "sdp",
                expected: "string"
            }
        );
        assert_eq!(
            neg(json!({"description": "offer"})).unwrap_err(),
            ParseError::NotAnObject {
                what: "description"
            }
        );
        assert_eq!(
            neg(json!({"description": {"type": "offer", "sdp": "v=0"},
                "sdp_stream_metadata": []}))
            .unwrap_err(),
            ParseError::NotAnObject {
                what: "sdp_stream_metadata"
            }
        );
    }

    #[test]
    fn msc_metadata_changed_example_and_unstable_key() {
        let m = parse(json!({"type": "m.call.sdp_stream_metadata_changed",
            "content": {"sdp_stream_metadata": msc_metadata_json()}}))
        .unwrap();
        let want = DcMessage::SdpStreamMetadataChanged {
            sdp_stream_metadata: msc_metadata(),
        };
        assert_eq!(m, want);
        let m = parse(json!({"type": "m.call.sdp_stream_metadata_changed",
            "content": {"org.matrix.msc3077.sdp_stream_metadata": msc_metadata_json()}}))
        .unwrap();
        assert_eq!(m, want);
        assert_eq!(
            parse(json!({"type": "m.call.sdp_stream_metadata_changed", "content": {}}))
                .unwrap_err(),
            ParseError::MissingField("sdp_stream_metadata")
        );
    }

    #[test]
    fn metadata_defaults_other_purposes_and_bad_values() {
        let meta = |m: Value| {
            parse(json!({"type": "m.call.sdp_stream_metadata_changed",
                "content": {"sdp_stream_metadata": m}}))
        };
        let m = meta(json!({"s": {"purpose": "m.screenshare", "extra": true}})).unwrap();
        assert_eq!(
            m,
            DcMessage::SdpStreamMetadataChanged {
                sdp_stream_metadata: BTreeMap::from([(
                    "s".to_owned(),
                    StreamMetadata::new(FeedPurpose::Screenshare)
                )])
            }
        );
        assert_eq!(
            m.to_value()["content"]["sdp_stream_metadata"]["s"],
            json!({"purpose": "m.screenshare", "audio_muted": false, "video_muted": false, "tracks": {}})
        );
        let m = meta(json!({"s": {"purpose": "org.example.whiteboard"}})).unwrap();
        let DcMessage::SdpStreamMetadataChanged {
            sdp_stream_metadata,
        } = m
        else {
            panic!()
        };
        assert_eq!(
            sdp_stream_metadata["s"].purpose,
            FeedPurpose::Other("org.example.whiteboard".into())
        );
        assert_eq!(
            meta(json!({"s": {}})).unwrap_err(),
            ParseError::MissingField("purpose")
        );
        assert_eq!(
            meta(json!({"s": {"purpose": "m.usermedia", "audio_muted": "yes"}})).unwrap_err(),
            ParseError::WrongType {
                field: "audio_muted",
                expected: "boolean"
            }
        );
        assert_eq!(
            meta(json!({"s": {"purpose": "m.usermedia", "tracks": []}})).unwrap_err(),
            ParseError::NotAnObject { what: "tracks" }
        );
        assert!(matches!(
            meta(json!({"s": {"purpose": "m.usermedia", "tracks": {"t": {"width": 0}}}}))
                .unwrap_err(),
            ParseError::InvalidValue { field: "width", .. }
        ));
        assert!(matches!(
            meta(json!({"": {"purpose": "m.usermedia"}})).unwrap_err(),
            ParseError::InvalidValue {
                field: "stream_id",
                ..
            }
        ));
        let many: Map<String, Value> = (0..=MAX_TRACKS_PER_STREAM)
            .map(|i| (format!("t{i}"), json!({})))
            .collect();
        assert!(matches!(
            meta(json!({"s": {"purpose": "m.usermedia", "tracks": many}})).unwrap_err(),
            ParseError::TooLong {
                field: "tracks",
                ..
            }
        ));
        let many: Map<String, Value> = (0..=MAX_STREAMS)
            .map(|i| (format!("s{i}"), json!({"purpose": "m.usermedia"})))
            .collect();
        assert!(matches!(
            meta(Value::Object(many)).unwrap_err(),
            ParseError::TooLong {
                field: "sdp_stream_metadata",
                ..
            }
        ));
    }

    #[test]
    fn metadata_to_proto_keeps_tracks() {
        let p = msc_metadata()["streamId1"].to_proto();
        assert_eq!(p.purpose, FeedPurpose::Usermedia);
        assert!(p.video_muted && !p.audio_muted);
        assert_eq!(
            p.extra["tracks"],
            json!({"trackId1": {"width": 1920, "height": 1080}, "trackId2": {}})
        );
    }

    #[test]
    fn connect_to_focus_names_other_foci() {
        let m = parse(
            json!({"type": "m.call.connect_to_focus", "content": {"foci": [
                {"user_id": "@fb:y", "device_id": "FB"},
                {"user_id": "@fb:y", "device_id": "FB"},
                {"user_id": "@fc:z"},
                7,
                {"user_id": "@fc:z", "device_id": "FC"}
            ]}}),
        )
        .unwrap();
        let foci = vec![
            FocusRef {
                user_id: "@fb:y".into(),
                device_id: "FB".into(),
            },
            FocusRef {
                user_id: "@fc:z".into(),
                device_id: "FC".into(),
            },
        ];
        assert_eq!(m, DcMessage::ConnectToFocus { foci: foci.clone() });
        assert_eq!(
            m.encode().unwrap(),
            r#"{"type":"m.call.connect_to_focus","content":{"foci":[{"device_id":"FB","user_id":"@fb:y"},{"device_id":"FC","user_id":"@fc:z"}]}}"#
        );
        assert_eq!(parse(m.to_value()).unwrap(), m);
        assert_eq!(
            parse(json!({"type": "m.call.connect_to_focus", "content": {}})).unwrap_err(),
            ParseError::MissingField("foci")
        );
        assert!(matches!(
            parse(json!({"type": "m.call.connect_to_focus", "content": {"foci": {}}})).unwrap_err(),
            ParseError::WrongType { field: "foci", .. }
        ));
    }

    #[test]
    fn msc_ping_pong_examples() {
        let ping = parse(json!({"type": "m.call.ping", "content": {}})).unwrap();
        assert_eq!(ping, DcMessage::Ping);
        assert_eq!(
            ping.encode().unwrap(),
            r#"{"type":"m.call.ping","content":{}}"#
        );
        let pong = parse(json!({"type": "m.call.pong", "content": {}})).unwrap();
        assert_eq!(pong, DcMessage::Pong);
        assert_eq!(
            pong.to_value(),
            json!({"type": "m.call.pong", "content": {}})
        );
        // Lenient: no content, or content with fields.
        assert_eq!(
            DcMessage::parse(br#"{"type":"m.call.ping"}"#).unwrap(),
            DcMessage::Ping
        );
        assert_eq!(
            parse(json!({"type": "m.call.pong", "content": {"ts": 5}})).unwrap(),
            DcMessage::Pong
        );
    }

    #[test]
    fn unknown_types_come_back_as_unknown() {
        let m = parse(json!({"type": "org.example.unknown", "content": {"x": 1}})).unwrap();
        assert_eq!(
            m,
            DcMessage::Unknown {
                msg_type: "org.example.unknown".into()
            }
        );
        assert_eq!(m.message_type(), "org.example.unknown");
        assert!(matches!(
            parse(json!({"type": "x".repeat(MAX_TYPE_LEN + 1)})).unwrap_err(),
            ParseError::TooLong { field: "type", .. }
        ));
    }

    #[test]
    fn bad_envelopes_are_typed_errors() {
        assert!(matches!(
            DcMessage::parse(b"not json").unwrap_err(),
            ParseError::Serde(_)
        ));
        assert!(matches!(
            DcMessage::parse(b"").unwrap_err(),
            ParseError::Serde(_)
        ));
        assert_eq!(
            DcMessage::parse(b"[1,2]").unwrap_err(),
            ParseError::NotAnObject { what: "message" }
        );
        assert_eq!(
            DcMessage::parse(b"{}").unwrap_err(),
            ParseError::MissingField("type")
        );
        assert_eq!(
            parse(json!({"type": 7})).unwrap_err(),
            ParseError::WrongType {
                field: "type",
                expected: "string"
            }
        );
        assert_eq!(
            parse(json!({"type": "m.call.ping", "content": []})).unwrap_err(),
            ParseError::NotAnObject { what: "content" }
        );
        let deep = "[".repeat(10_000);
        assert!(matches!(
            DcMessage::parse(deep.as_bytes()).unwrap_err(),
            ParseError::Serde(_)
        ));
    }

    #[test]
    fn errors_have_stable_labels() {
        let label = |v: &[u8]| error_label(&DcMessage::parse(v).unwrap_err());
        assert_eq!(label(b"{"), "not_json");
        assert_eq!(label(b"1"), "not_an_object");
        assert_eq!(label(b"{}"), "missing_field");
        assert_eq!(label(br#"{"type":1}"#), "wrong_type");
        assert_eq!(
            label(br#"{"type":"m.call.negotiate","content":{"description":{"type":"rollback","sdp":"v=0"}}}"#),
            "invalid_value"
        );
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(MAX_TYPE_LEN + 1));
        assert_eq!(label(long.as_bytes()), "too_long");
        assert_eq!(label(&vec![b' '; MAX_MESSAGE_LEN + 1]), "too_large");
    }

    #[test]
    fn oversize_is_refused_both_ways() {
        let sdp = "a".repeat(MAX_MESSAGE_LEN);
        let m = DcMessage::Negotiate(Negotiate {
            sdp_type: SdpType::Offer,
            sdp,
            sdp_stream_metadata: SdpStreamMetadata::new(),
        });
        let e = m.encode().unwrap_err();
        assert!(matches!(
            e,
            ParseError::TooLong {
                field: "message",
                max: MAX_MESSAGE_LEN,
                ..
            }
        ));
        assert_eq!(error_label(&e), "too_large");
        let text = m.to_value().to_string();
        assert!(matches!(
            DcMessage::parse(text.as_bytes()).unwrap_err(),
            ParseError::TooLong {
                field: "message",
                ..
            }
        ));
        // Just under the limit is read.
        let pad = MAX_MESSAGE_LEN - r#"{"type":"m.call.ping","content":{"p":""}}"#.len();
        let text = format!(
            r#"{{"type":"m.call.ping","content":{{"p":"{}"}}}}"#,
            "a".repeat(pad)
        );
        assert_eq!(text.len(), MAX_MESSAGE_LEN);
        assert_eq!(DcMessage::parse(text.as_bytes()).unwrap(), DcMessage::Ping);
    }

    #[test]
    fn a_focus_names_the_publisher_of_each_stream() {
        let text = r#"{"type": "m.call.sdp_stream_metadata_changed", "content": {"sdp_stream_metadata": {
            "s1": {"purpose": "m.usermedia", "user_id": "@b:x", "device_id": "BDEV"},
            "s2": {"purpose": "m.usermedia", "user_id": 7}}}}"#;
        assert!(DcMessage::parse(text.as_bytes()).is_err());
        let text = text.replace(r#""user_id": 7"#, r#""user_id": null"#);
        let DcMessage::SdpStreamMetadataChanged {
            sdp_stream_metadata,
        } = DcMessage::parse(text.as_bytes()).unwrap()
        else {
            unreachable!("metadata");
        };
        let s1 = &sdp_stream_metadata["s1"];
        assert_eq!(s1.user_id.as_deref(), Some("@b:x"));
        assert_eq!(s1.device_id.as_deref(), Some("BDEV"));
        assert_eq!(sdp_stream_metadata["s2"].user_id, None);
        let m = DcMessage::SdpStreamMetadataChanged {
            sdp_stream_metadata,
        };
        let back = DcMessage::parse(m.encode().unwrap().as_bytes()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn focus_draining_round_trips_and_is_validated() {
        let m = parse(json!({"type": "m.call.focus_draining", "content": {"hangup_in_ms": 10000}}))
            .unwrap();
        assert_eq!(
            m,
            DcMessage::FocusDraining {
                hangup_in_ms: Some(10_000)
            }
        );
        assert_eq!(
            m.encode().unwrap(),
            r#"{"type":"m.call.focus_draining","content":{"hangup_in_ms":10000}}"#
        );
        // Without a time (absent or null): a drain of unknown length.
        for content in [json!({}), json!({"hangup_in_ms": null})] {
            let m = parse(json!({"type": "m.call.focus_draining", "content": content})).unwrap();
            assert_eq!(m, DcMessage::FocusDraining { hangup_in_ms: None });
        }
        assert_eq!(
            DcMessage::FocusDraining { hangup_in_ms: None }
                .encode()
                .unwrap(),
            r#"{"type":"m.call.focus_draining","content":{}}"#
        );
        // Anything but a non-negative integer is refused.
        for bad in [json!(-1), json!(1.5), json!("10000"), json!([])] {
            let e =
                parse(json!({"type": "m.call.focus_draining", "content": {"hangup_in_ms": bad}}))
                    .unwrap_err();
            assert!(
                matches!(
                    e,
                    ParseError::WrongType {
                        field: "hangup_in_ms",
                        ..
                    }
                ),
                "{e:?}"
            );
        }
    }

    #[test]
    fn active_speaker_round_trips_and_is_validated() {
        let m = parse(json!({"type": "m.call.active_speaker", "content": {
            "user_id": "@b:x", "device_id": "BDEV", "stream_id": "s1", "extra": 1}}))
        .unwrap();
        let want = DcMessage::ActiveSpeaker(Some(ActiveSpeaker {
            user_id: "@b:x".into(),
            device_id: "BDEV".into(),
            stream_id: Some("s1".into()),
        }));
        assert_eq!(m, want);
        assert_eq!(m.message_type(), ACTIVE_SPEAKER);
        assert_eq!(
            m.to_value(),
            json!({"type": "m.call.active_speaker", "content": {
                "user_id": "@b:x", "device_id": "BDEV", "stream_id": "s1"}})
        );
        assert_eq!(DcMessage::parse(m.encode().unwrap().as_bytes()).unwrap(), m);
        // No stream: still a speaker; nobody: an empty content (or nulls).
        let m = parse(json!({"type": "m.call.active_speaker", "content": {
            "user_id": "@b:x", "device_id": "BDEV"}}))
        .unwrap();
        assert!(matches!(&m, DcMessage::ActiveSpeaker(Some(a)) if a.stream_id.is_none()));
        assert_eq!(DcMessage::parse(m.encode().unwrap().as_bytes()).unwrap(), m);
        let nobody = DcMessage::ActiveSpeaker(None);
        assert_eq!(
            parse(json!({"type": "m.call.active_speaker", "content": {}})).unwrap(),
            nobody
        );
        assert_eq!(
            parse(json!({"type": "m.call.active_speaker",
                "content": {"user_id": null, "device_id": null}}))
            .unwrap(),
            nobody
        );
        assert_eq!(
            nobody.encode().unwrap(),
            r#"{"type":"m.call.active_speaker","content":{}}"#
        );
        // Half a speaker, wrong types, bad ids: typed errors.
        assert_eq!(
            parse(json!({"type": "m.call.active_speaker", "content": {"user_id": "@b:x"}}))
                .unwrap_err(),
            ParseError::MissingField("device_id")
        );
        assert_eq!(
            parse(json!({"type": "m.call.active_speaker", "content": {"device_id": "B"}}))
                .unwrap_err(),
            ParseError::MissingField("user_id")
        );
        assert_eq!(
            parse(json!({"type": "m.call.active_speaker",
                "content": {"user_id": 5, "device_id": "B"}}))
            .unwrap_err(),
            ParseError::WrongType {
                field: "user_id",
                expected: "string"
            }
        );
        assert!(matches!(
            parse(json!({"type": "m.call.active_speaker",
                "content": {"user_id": "@b:x", "device_id": "B", "stream_id": ""}}))
            .unwrap_err(),
            ParseError::InvalidValue {
                field: "stream_id",
                ..
            }
        ));
        assert!(matches!(
            parse(json!({"type": "m.call.active_speaker",
                "content": {"user_id": "u".repeat(MAX_ID_LEN + 1), "device_id": "B"}}))
            .unwrap_err(),
            ParseError::TooLong {
                field: "user_id",
                ..
            }
        ));
    }

    #[test]
    fn track_kinds_are_read_and_written() {
        let m = parse(json!({"type": "m.call.sdp_stream_metadata_changed",
            "content": {"sdp_stream_metadata": {"s": {"purpose": "m.usermedia", "tracks": {
                "a": {"kind": "audio"}, "v": {"kind": "video", "width": 320},
                "x": {"kind": "data"}, "n": {"kind": null}}}}}}))
        .unwrap();
        let DcMessage::SdpStreamMetadataChanged {
            sdp_stream_metadata,
        } = &m
        else {
            panic!("not metadata: {m:?}")
        };
        let t = &sdp_stream_metadata["s"].tracks;
        assert_eq!(t["a"].kind, Some(MediaKind::Audio));
        assert_eq!(t["v"].kind, Some(MediaKind::Video));
        assert_eq!(t["v"].width, Some(320));
        assert_eq!(t["x"].kind, None);
        assert_eq!(t["n"].kind, None);
        assert_eq!(
            m.to_value()["content"]["sdp_stream_metadata"]["s"]["tracks"],
            json!({"a": {"kind": "audio"}, "v": {"kind": "video", "width": 320}, "x": {}, "n": {}})
        );
        assert_eq!(DcMessage::parse(m.encode().unwrap().as_bytes()).unwrap(), m);
        assert_eq!(
            parse(json!({"type": "m.call.sdp_stream_metadata_changed",
                "content": {"sdp_stream_metadata": {"s": {"purpose": "m.usermedia",
                    "tracks": {"a": {"kind": 1}}}}}}))
            .unwrap_err(),
            ParseError::WrongType {
                field: "kind",
                expected: "string"
            }
        );
    }
}
