//! To-device `m.call.*` signalling contents (MSC2746 semantics, with the
//! group fields of MSC3401).
//!
//! A message is its [`CommonFields`] (`version`, `call_id`, `party_id`,
//! `conf_id`, `device_id`, `sender_session_id`, `dest_session_id`, `seq`) and
//! a typed [`Body`]. Fields this crate does not know survive a round trip in
//! each body's `extra`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ParseError;
use crate::events::{FeedPurpose, MAX_ID_LEN, id_field};

/// Longest SDP accepted (bytes).
pub const MAX_SDP_LEN: usize = 128 * 1024;
/// Most candidates accepted in one message.
pub const MAX_CANDIDATES: usize = 256;
/// Longest candidate line accepted (bytes).
pub const MAX_CANDIDATE_LEN: usize = 1024;
/// Most streams accepted in `sdp_stream_metadata`.
pub const MAX_STREAMS: usize = 32;

/// The `version` we write.
pub const VOIP_VERSION: &str = "1";

/// The to-device event types of the signalling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum MessageType {
    /// `m.call.invite`
    Invite,
    /// `m.call.answer`
    Answer,
    /// `m.call.candidates`
    Candidates,
    /// `m.call.select_answer`
    SelectAnswer,
    /// `m.call.negotiate`
    Negotiate,
    /// `m.call.hangup`
    Hangup,
    /// `m.call.reject`
    Reject,
    /// `m.call.sdp_stream_metadata_changed`
    SdpStreamMetadataChanged,
}

impl MessageType {
    /// All types.
    pub const ALL: [MessageType; 8] = [
        MessageType::Invite,
        MessageType::Answer,
        MessageType::Candidates,
        MessageType::SelectAnswer,
        MessageType::Negotiate,
        MessageType::Hangup,
        MessageType::Reject,
        MessageType::SdpStreamMetadataChanged,
    ];

    /// The event type string.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Invite => "m.call.invite",
            MessageType::Answer => "m.call.answer",
            MessageType::Candidates => "m.call.candidates",
            MessageType::SelectAnswer => "m.call.select_answer",
            MessageType::Negotiate => "m.call.negotiate",
            MessageType::Hangup => "m.call.hangup",
            MessageType::Reject => "m.call.reject",
            MessageType::SdpStreamMetadataChanged => "m.call.sdp_stream_metadata_changed",
        }
    }

    /// Parses an event type string. The unstable
    /// `org.matrix.call.sdp_stream_metadata_changed` is accepted too.
    pub fn from_event_type(t: &str) -> Option<Self> {
        if t == "org.matrix.call.sdp_stream_metadata_changed" {
            return Some(MessageType::SdpStreamMetadataChanged);
        }
        Self::ALL.into_iter().find(|m| m.as_str() == t)
    }
}

/// The `version` field: `"1"` is written; `0` and anything else are read and
/// treated like `"1"`, as MSC2746 asks.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Version {
    /// Integer `0` (legacy).
    V0,
    /// String `"1"`.
    V1,
    /// Anything else, kept as it was.
    Other(Value),
}

impl Version {
    fn from_value(v: Option<&Value>) -> Self {
        match v {
            None => Version::V0,
            Some(Value::String(s)) if s == "1" => Version::V1,
            Some(Value::Number(n)) if n.as_u64() == Some(0) => Version::V0,
            Some(other) => Version::Other(other.clone()),
        }
    }
    fn to_value(&self) -> Value {
        match self {
            Version::V0 => Value::from(0),
            Version::V1 => Value::from(VOIP_VERSION),
            Version::Other(v) => v.clone(),
        }
    }
}

/// Fields every group-call to-device message carries.
#[derive(Debug, Clone, PartialEq)]
pub struct CommonFields {
    /// `version`.
    pub version: Version,
    /// `call_id`: the 1:1 call (peer connection) this message belongs to.
    pub call_id: String,
    /// `party_id`: the sender's party (the reference uses its device id);
    /// empty when the message carries neither `party_id` nor `device_id`.
    pub party_id: String,
    /// `conf_id`: the group call id (state key of `m.call`).
    pub conf_id: String,
    /// `device_id`: the sender's device. MSC3401 requires it on invites
    /// only; on other messages the device is known from Olm or from the call.
    pub device_id: Option<String>,
    /// `sender_session_id`: required on invites only, like `device_id`.
    pub sender_session_id: Option<String>,
    /// `dest_session_id`.
    pub dest_session_id: String,
    /// `seq`: per `call_id`, from 0, no gaps.
    pub seq: u64,
}

/// `RTCSessionDescriptionInit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionDescription {
    /// `offer` or `answer` (passed through, not validated, per MSC2746).
    #[serde(rename = "type")]
    pub sdp_type: String,
    /// The SDP.
    pub sdp: String,
}

impl SessionDescription {
    /// An offer.
    pub fn offer(sdp: impl Into<String>) -> Self {
        Self {
            sdp_type: "offer".into(),
            sdp: sdp.into(),
        }
    }
    /// An answer.
    pub fn answer(sdp: impl Into<String>) -> Self {
        Self {
            sdp_type: "answer".into(),
            sdp: sdp.into(),
        }
    }
    /// Is it an offer?
    pub fn is_offer(&self) -> bool {
        self.sdp_type == "offer"
    }
}

/// An ICE candidate as in `RTCIceCandidateInit`. An empty `candidate` is the
/// end-of-candidates marker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The `candidate:` line, or `""` for end of candidates.
    pub candidate: String,
    /// `sdpMid`.
    #[serde(rename = "sdpMid", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    /// `sdpMLineIndex`.
    #[serde(
        rename = "sdpMLineIndex",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sdp_m_line_index: Option<u32>,
    /// Fields this crate does not know (`usernameFragment`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Candidate {
    /// The end-of-candidates marker.
    pub fn end_of_candidates() -> Self {
        Self {
            candidate: String::new(),
            sdp_mid: None,
            sdp_m_line_index: None,
            extra: Map::new(),
        }
    }
    /// Is this the end-of-candidates marker?
    pub fn is_end(&self) -> bool {
        self.candidate.is_empty()
    }
}

/// One stream's entry in `sdp_stream_metadata` (MSC3077 + MSC3291).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamMetadata {
    /// Purpose of the stream.
    pub purpose: FeedPurpose,
    /// Audio muted.
    #[serde(default)]
    pub audio_muted: bool,
    /// Video muted.
    #[serde(default)]
    pub video_muted: bool,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `sdp_stream_metadata`: stream id (SDP msid) to metadata.
pub type SdpStreamMetadata = BTreeMap<String, StreamMetadata>;

/// `capabilities`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// `m.call.transferee`.
    #[serde(rename = "m.call.transferee", default)]
    pub transferee: bool,
    /// `m.call.dtmf`.
    #[serde(rename = "m.call.dtmf", default)]
    pub dtmf: bool,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `m.call.invite`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invite {
    /// How long the invite is valid, ms.
    pub lifetime: u64,
    /// The offer.
    pub offer: SessionDescription,
    /// The user being called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invitee: Option<String>,
    /// Capabilities of the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// Streams in the offer.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "org.matrix.msc3077.sdp_stream_metadata"
    )]
    pub sdp_stream_metadata: Option<SdpStreamMetadata>,
    /// `m.intent` (MSC3401: lets a 1:1 call ring before `m.call` arrives).
    #[serde(rename = "m.intent", default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<crate::events::CallIntent>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `m.call.answer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The answer.
    pub answer: SessionDescription,
    /// Capabilities of the callee.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// Streams in the answer.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "org.matrix.msc3077.sdp_stream_metadata"
    )]
    pub sdp_stream_metadata: Option<SdpStreamMetadata>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `m.call.candidates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidates {
    /// The candidates; an empty `candidate` ends them.
    pub candidates: Vec<Candidate>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `m.call.select_answer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelectAnswer {
    /// The party whose answer the caller took.
    pub selected_party_id: String,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `m.call.negotiate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Negotiate {
    /// The new offer or the answer to one.
    pub description: SessionDescription,
    /// How long the offer is valid, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<u64>,
    /// Streams after this negotiation.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "org.matrix.msc3077.sdp_stream_metadata"
    )]
    pub sdp_stream_metadata: Option<SdpStreamMetadata>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `m.call.hangup` and `m.call.reject`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Hangup {
    /// Reason code; absent means `user_hangup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `m.call.sdp_stream_metadata_changed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataChanged {
    /// The new metadata.
    #[serde(alias = "org.matrix.msc3077.sdp_stream_metadata")]
    pub sdp_stream_metadata: SdpStreamMetadata,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The type-specific part of a message.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Body {
    /// `m.call.invite`
    Invite(Invite),
    /// `m.call.answer`
    Answer(Answer),
    /// `m.call.candidates`
    Candidates(Candidates),
    /// `m.call.select_answer`
    SelectAnswer(SelectAnswer),
    /// `m.call.negotiate`
    Negotiate(Negotiate),
    /// `m.call.hangup`
    Hangup(Hangup),
    /// `m.call.reject`
    Reject(Hangup),
    /// `m.call.sdp_stream_metadata_changed`
    SdpStreamMetadataChanged(MetadataChanged),
}

impl Body {
    /// The message type of this body.
    pub fn message_type(&self) -> MessageType {
        match self {
            Body::Invite(_) => MessageType::Invite,
            Body::Answer(_) => MessageType::Answer,
            Body::Candidates(_) => MessageType::Candidates,
            Body::SelectAnswer(_) => MessageType::SelectAnswer,
            Body::Negotiate(_) => MessageType::Negotiate,
            Body::Hangup(_) => MessageType::Hangup,
            Body::Reject(_) => MessageType::Reject,
            Body::SdpStreamMetadataChanged(_) => MessageType::SdpStreamMetadataChanged,
        }
    }
}

/// A complete to-device signalling message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The group fields.
    pub common: CommonFields,
    /// The type-specific content.
    pub body: Body,
}

const COMMON_KEYS: [&str; 8] = [
    "version",
    "call_id",
    "party_id",
    "conf_id",
    "device_id",
    "sender_session_id",
    "dest_session_id",
    "seq",
];

impl Message {
    /// The message type.
    pub fn message_type(&self) -> MessageType {
        self.body.message_type()
    }

    /// Reads a message from its to-device event type and content.
    ///
    /// `call_id`, `conf_id`, `dest_session_id` and `seq` are required on every
    /// message; `device_id` and `sender_session_id` on invites only (as
    /// MSC3401 says), but checked wherever present. `version` defaults to `0`,
    /// `party_id` to `device_id`. Sizes are bounded (see the `MAX_*`
    /// constants).
    pub fn parse(event_type: &str, content: &Value) -> Result<Self, ParseError> {
        let ty = MessageType::from_event_type(event_type)
            .ok_or_else(|| ParseError::UnknownEventType(event_type.to_owned()))?;
        let obj = content
            .as_object()
            .ok_or(ParseError::NotAnObject { what: "content" })?;
        let invite = ty == MessageType::Invite;
        let optional_id = |field: &'static str| match obj.get(field) {
            None | Some(Value::Null) if !invite => Ok(None),
            _ => id_field(obj, field).map(Some),
        };
        let device_id = optional_id("device_id")?;
        let sender_session_id = optional_id("sender_session_id")?;
        // Without `party_id` (version 0) the party is the device, or unknown
        // (empty) when the message names no device either.
        let party_id = match obj.get("party_id") {
            None | Some(Value::Null) => device_id.clone().unwrap_or_default(),
            Some(_) => id_field(obj, "party_id")?,
        };
        let seq = match obj.get("seq") {
            None => return Err(ParseError::MissingField("seq")),
            Some(v) => v.as_u64().ok_or(ParseError::WrongType {
                field: "seq",
                expected: "non-negative integer",
            })?,
        };
        let common = CommonFields {
            version: Version::from_value(obj.get("version")),
            call_id: id_field(obj, "call_id")?,
            party_id,
            conf_id: id_field(obj, "conf_id")?,
            device_id,
            sender_session_id,
            dest_session_id: id_field(obj, "dest_session_id")?,
            seq,
        };
        let mut rest = obj.clone();
        for k in COMMON_KEYS {
            rest.remove(k);
        }
        let rest = Value::Object(rest);
        let body = match ty {
            MessageType::Invite => Body::Invite(serde_json::from_value(rest)?),
            MessageType::Answer => Body::Answer(serde_json::from_value(rest)?),
            MessageType::Candidates => Body::Candidates(serde_json::from_value(rest)?),
            MessageType::SelectAnswer => Body::SelectAnswer(serde_json::from_value(rest)?),
            MessageType::Negotiate => Body::Negotiate(serde_json::from_value(rest)?),
            MessageType::Hangup => Body::Hangup(serde_json::from_value(rest)?),
            MessageType::Reject => Body::Reject(serde_json::from_value(rest)?),
            MessageType::SdpStreamMetadataChanged => {
                Body::SdpStreamMetadataChanged(serde_json::from_value(rest)?)
            }
        };
        let msg = Message { common, body };
        msg.validate()?;
        Ok(msg)
    }

    fn validate(&self) -> Result<(), ParseError> {
        fn sdp(d: &SessionDescription) -> Result<(), ParseError> {
            if d.sdp.len() > MAX_SDP_LEN {
                return Err(ParseError::TooLong {
                    field: "sdp",
                    len: d.sdp.len(),
                    max: MAX_SDP_LEN,
                });
            }
            Ok(())
        }
        fn meta(m: &Option<SdpStreamMetadata>) -> Result<(), ParseError> {
            if let Some(m) = m {
                if m.len() > MAX_STREAMS {
                    return Err(ParseError::TooLong {
                        field: "sdp_stream_metadata",
                        len: m.len(),
                        max: MAX_STREAMS,
                    });
                }
                if let Some(k) = m.keys().find(|k| k.len() > MAX_ID_LEN) {
                    return Err(ParseError::TooLong {
                        field: "sdp_stream_metadata",
                        len: k.len(),
                        max: MAX_ID_LEN,
                    });
                }
            }
            Ok(())
        }
        match &self.body {
            Body::Invite(i) => {
                sdp(&i.offer)?;
                meta(&i.sdp_stream_metadata)
            }
            Body::Answer(a) => {
                sdp(&a.answer)?;
                meta(&a.sdp_stream_metadata)
            }
            Body::Negotiate(n) => {
                sdp(&n.description)?;
                meta(&n.sdp_stream_metadata)
            }
            Body::Candidates(c) => {
                if c.candidates.len() > MAX_CANDIDATES {
                    return Err(ParseError::TooLong {
                        field: "candidates",
                        len: c.candidates.len(),
                        max: MAX_CANDIDATES,
                    });
                }
                if let Some(c) = c
                    .candidates
                    .iter()
                    .find(|c| c.candidate.len() > MAX_CANDIDATE_LEN)
                {
                    return Err(ParseError::TooLong {
                        field: "candidate",
                        len: c.candidate.len(),
                        max: MAX_CANDIDATE_LEN,
                    });
                }
                Ok(())
            }
            Body::SdpStreamMetadataChanged(m) => meta(&Some(m.sdp_stream_metadata.clone())),
            Body::SelectAnswer(s) if s.selected_party_id.len() > MAX_ID_LEN => {
                Err(ParseError::TooLong {
                    field: "selected_party_id",
                    len: s.selected_party_id.len(),
                    max: MAX_ID_LEN,
                })
            }
            Body::SelectAnswer(_) | Body::Hangup(_) | Body::Reject(_) => Ok(()),
        }
    }

    /// The content JSON to send.
    pub fn to_content(&self) -> Value {
        let body = match &self.body {
            Body::Invite(b) => serde_json::to_value(b),
            Body::Answer(b) => serde_json::to_value(b),
            Body::Candidates(b) => serde_json::to_value(b),
            Body::SelectAnswer(b) => serde_json::to_value(b),
            Body::Negotiate(b) => serde_json::to_value(b),
            Body::Hangup(b) | Body::Reject(b) => serde_json::to_value(b),
            Body::SdpStreamMetadataChanged(b) => serde_json::to_value(b),
        };
        // Serialising these plain structs into a Value cannot fail (string
        // keys only); an empty object is the harmless fallback.
        let mut map = match body {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let c = &self.common;
        map.insert("version".into(), c.version.to_value());
        map.insert("call_id".into(), c.call_id.clone().into());
        map.insert("party_id".into(), c.party_id.clone().into());
        map.insert("conf_id".into(), c.conf_id.clone().into());
        if let Some(d) = &c.device_id {
            map.insert("device_id".into(), d.clone().into());
        }
        if let Some(s) = &c.sender_session_id {
            map.insert("sender_session_id".into(), s.clone().into());
        }
        map.insert("dest_session_id".into(), c.dest_session_id.clone().into());
        map.insert("seq".into(), c.seq.into());
        Value::Object(map)
    }
}

/// Hangup reason codes (MSC2746 and MSC3401).
pub mod reason {
    /// The user ended the call.
    pub const USER_HANGUP: &str = "user_hangup";
    /// No media connection could be established.
    pub const ICE_FAILED: &str = "ice_failed";
    /// The connection failed after media was exchanged.
    pub const ICE_TIMEOUT: &str = "ice_timeout";
    /// The invite was not answered in time.
    pub const INVITE_TIMEOUT: &str = "invite_timeout";
    /// Local media could not be started.
    pub const USER_MEDIA_FAILED: &str = "user_media_failed";
    /// Busy.
    pub const USER_BUSY: &str = "user_busy";
    /// Another failure.
    pub const UNKNOWN_ERROR: &str = "unknown_error";
    /// The call was replaced by another one (glare, re-invite).
    pub const REPLACED: &str = "replaced";
    /// The remote device started a new session (MSC3401).
    pub const NEW_SESSION: &str = "new_session";
    /// Signalling failed.
    pub const SIGNALLING_FAILED: &str = "signalling_timeout";
}
