//! Room state events of MSC3401: `m.call` and `m.call.member`.
//!
//! Both the stable names and the unstable `org.matrix.msc3401.*` names are
//! read; the unstable names are written by default because that is what the
//! reference implementation reads. Every content type keeps fields it does not
//! know in `extra`, so that a read/modify/write cycle loses nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ParseError;

/// Stable event type of the call event.
pub const CALL: &str = "m.call";
/// Unstable event type of the call event (what the reference writes).
pub const CALL_UNSTABLE: &str = "org.matrix.msc3401.call";
/// Stable event type of the call member event.
pub const CALL_MEMBER: &str = "m.call.member";
/// Unstable event type of the call member event (what the reference writes).
pub const CALL_MEMBER_UNSTABLE: &str = "org.matrix.msc3401.call.member";
/// Room membership event type.
pub const ROOM_MEMBER: &str = "m.room.member";

/// Longest identifier (call id, session id, device id, user id) accepted.
pub const MAX_ID_LEN: usize = 255;
/// Most devices of one member entry that are looked at.
pub const MAX_DEVICES_PER_CALL: usize = 64;
/// Most feeds of one device that are looked at.
pub const MAX_FEEDS: usize = 16;

/// The reason reported for a call whose `m.terminated` is truthy but not a
/// string (Hydrogen writes `true`).
pub const TERMINATED_WITHOUT_REASON: &str = "call_ended";

/// Which event type names to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum EventNames {
    /// `org.matrix.msc3401.call` / `org.matrix.msc3401.call.member` (default:
    /// what deployed clients read).
    #[default]
    Unstable,
    /// `m.call` / `m.call.member`.
    Stable,
}

impl EventNames {
    /// The call event type to write.
    pub fn call(self) -> &'static str {
        match self {
            EventNames::Unstable => CALL_UNSTABLE,
            EventNames::Stable => CALL,
        }
    }
    /// The call member event type to write.
    pub fn call_member(self) -> &'static str {
        match self {
            EventNames::Unstable => CALL_MEMBER_UNSTABLE,
            EventNames::Stable => CALL_MEMBER,
        }
    }
}

/// Is this the type of a call event (either name)?
pub fn is_call_type(t: &str) -> bool {
    t == CALL || t == CALL_UNSTABLE
}

/// Is this the type of a call member event (either name)?
pub fn is_call_member_type(t: &str) -> bool {
    t == CALL_MEMBER || t == CALL_MEMBER_UNSTABLE
}

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vm])* $var,)*
            /// A value this crate does not know, kept as it was.
            Other(String),
        }
        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($s => $name::$var,)*
                    _ => $name::Other(s),
                }
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_owned()
            }
        }
        impl $name {
            /// The wire string.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$var => $s,)*
                    $name::Other(s) => s,
                }
            }
        }
    };
}

string_enum!(
    /// `m.intent`: the intended UX of a call.
    CallIntent {
        /// Ring the room's members (1:1 or small group call).
        Ring = "m.ring",
        /// Present as a conference the members are prompted to join.
        Prompt = "m.prompt",
        /// A voice/video room: immersion on selecting the room.
        Room = "m.room",
    }
);

string_enum!(
    /// `m.type`: the initial media type of a call.
    CallType {
        /// Voice only.
        Voice = "m.voice",
        /// Video.
        Video = "m.video",
    }
);

string_enum!(
    /// The purpose of a feed (MSC3077).
    FeedPurpose {
        /// Camera and microphone.
        Usermedia = "m.usermedia",
        /// Screen sharing.
        Screenshare = "m.screenshare",
    }
);

/// Content of `m.call` (state key = call id).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CallContent {
    /// `m.intent`.
    #[serde(rename = "m.intent", default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<CallIntent>,
    /// `m.type`.
    #[serde(rename = "m.type", default, skip_serializing_if = "Option::is_none")]
    pub call_type: Option<CallType>,
    /// `m.terminated`, as written: the call has ended when the value is
    /// truthy (JavaScript's rule, which the reference applies): a reason
    /// string (`"call_ended"` from matrix-js-sdk), `true` (Hydrogen), any
    /// non-zero number, object or array. `false`, `0`, `""` and `null` do not
    /// end it. See [`CallContent::termination`].
    #[serde(
        rename = "m.terminated",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub terminated: Option<Value>,
    /// `m.name`: a human-visible label.
    #[serde(rename = "m.name", default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CallContent {
    /// A new, live call.
    pub fn new(intent: CallIntent, call_type: CallType) -> Self {
        Self {
            intent: Some(intent),
            call_type: Some(call_type),
            ..Default::default()
        }
    }

    /// Is this call over? (`m.terminated` present and truthy.)
    pub fn is_terminated(&self) -> bool {
        self.termination().is_some()
    }

    /// Why the call ended, if it did: the `m.terminated` string when it is
    /// one, [`TERMINATED_WITHOUT_REASON`] for any other truthy value.
    pub fn termination(&self) -> Option<String> {
        match self.terminated.as_ref()? {
            Value::Null | Value::Bool(false) => None,
            Value::String(s) if s.is_empty() => None,
            Value::Number(n) if n.as_f64() == Some(0.0) => None,
            Value::String(s) => Some(s.chars().take(MAX_ID_LEN).collect()),
            _ => Some(TERMINATED_WITHOUT_REASON.to_owned()),
        }
    }

    /// Reads a call content the way the reference does: field by field, so
    /// that an odd value in one field (a non-string `m.intent`, a boolean
    /// `m.terminated`) never hides the rest. Fields of an unexpected type
    /// are kept in `extra` as they were.
    pub fn from_json_lenient(content: &Value) -> Self {
        let mut extra = content.as_object().cloned().unwrap_or_default();
        let mut take_str = |key: &str| match extra.get(key) {
            Some(Value::String(s)) => {
                let s = s.clone();
                extra.remove(key);
                Some(s)
            }
            _ => None,
        };
        let intent = take_str("m.intent").map(CallIntent::from);
        let call_type = take_str("m.type").map(CallType::from);
        let name = take_str("m.name");
        let terminated = extra.remove("m.terminated");
        Self {
            intent,
            call_type,
            terminated,
            name,
            extra,
        }
    }

    /// Marks the call ended with `reason` (a string, as the reference writes).
    pub fn terminate(&mut self, reason: &str) {
        self.terminated = Some(Value::String(reason.to_owned()));
    }
}

/// A track of a feed in `m.call.member` (informational).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Track {
    /// `audio` or `video`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// WebRTC track id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Human-readable label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Fields this crate does not know (`settings`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A feed a device shares, as listed in `m.call.member`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feed {
    /// What the feed is.
    pub purpose: FeedPurpose,
    /// WebRTC stream id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Its tracks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracks: Option<Vec<Track>>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Feed {
    /// A feed with just a purpose (what the reference writes).
    pub fn with_purpose(purpose: FeedPurpose) -> Self {
        Self {
            purpose,
            id: None,
            tracks: None,
            extra: Map::new(),
        }
    }
}

/// One device's participation in a call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceEntry {
    /// Device id for to-device messages.
    pub device_id: String,
    /// Session id; a change means a new session of that device.
    pub session_id: String,
    /// POSIX ms after which this entry is stale.
    pub expires_ts: u64,
    /// Feeds the device shares.
    pub feeds: Vec<Feed>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One call a user takes part in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallMembership {
    /// `m.call_id`.
    #[serde(rename = "m.call_id")]
    pub call_id: String,
    /// `m.devices`.
    #[serde(rename = "m.devices")]
    pub devices: Vec<DeviceEntry>,
    /// Fields this crate does not know (`m.foci`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Content of `m.call.member` (state key = user id).
///
/// For writing. Reading other users' events goes through
/// [`MemberContent::live_devices`], which is lenient: one malformed device
/// entry does not hide the others (the reference checks entries one by one).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct MemberContent {
    /// `m.calls`.
    #[serde(rename = "m.calls", default)]
    pub calls: Vec<CallMembership>,
    /// Fields this crate does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A device read out of someone's `m.call.member` event.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberDevice {
    /// Device id.
    pub device_id: String,
    /// Session id.
    pub session_id: String,
    /// Expiry, POSIX ms.
    pub expires_ts: u64,
    /// Purposes of the feeds it lists (unknown purposes left out).
    pub feeds: Vec<FeedPurpose>,
    /// The foci it publishes to (MSC3898 `m.foci.active`); empty when it
    /// takes part full mesh.
    pub foci_active: Vec<FocusRef>,
    /// The foci it would rather use (MSC3898 `m.foci.preferred`).
    pub foci_preferred: Vec<FocusRef>,
}

/// A focus (an SFU, MSC3898), named by the Matrix device it runs as.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FocusRef {
    /// The focus's user id.
    pub user_id: String,
    /// The focus's device id.
    pub device_id: String,
}

impl std::str::FromStr for FocusRef {
    type Err = ParseError;

    /// `@user:server/DEVICE`: a user id (starting with `@`, with a server
    /// part), a slash, and a device id (no whitespace, no slash).
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = |reason: &str| ParseError::InvalidValue {
            field: "focus",
            reason: format!("{reason} (expected @user:server/DEVICE)"),
        };
        let (user_id, device_id) = s.rsplit_once('/').ok_or_else(|| bad("no device id"))?;
        if !user_id.starts_with('@') || !user_id.contains(':') {
            return Err(bad("not a user id"));
        }
        if device_id.is_empty() || device_id.chars().any(char::is_whitespace) {
            return Err(bad("not a device id"));
        }
        if user_id.len() > MAX_ID_LEN || device_id.len() > MAX_ID_LEN {
            return Err(bad("too long"));
        }
        Ok(FocusRef {
            user_id: user_id.to_owned(),
            device_id: device_id.to_owned(),
        })
    }
}

impl std::fmt::Display for FocusRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.user_id, self.device_id)
    }
}

#[cfg(test)]
mod focus_ref_tests {
    use super::*;

    #[test]
    fn a_focus_is_written_as_user_slash_device() {
        let f: FocusRef = "@sfu:example.org:8448/SFUDEV".parse().unwrap_or_else(|e| {
            unreachable!("{e}");
        });
        assert_eq!(f.user_id, "@sfu:example.org:8448");
        assert_eq!(f.device_id, "SFUDEV");
        assert_eq!(f.to_string(), "@sfu:example.org:8448/SFUDEV");
        for bad in ["@sfu:x", "sfu:x/D", "@sfu/D", "@sfu:x/", "@sfu:x/a b", ""] {
            assert!(bad.parse::<FocusRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn foci_lists_prefer_the_stable_name_and_skip_bad_entries() {
        let v = serde_json::json!({
            "m.foci.active": [{"user_id": "@a:x", "device_id": "A"}, {"user_id": "@a:x", "device_id": "A"}, 7, {"user_id": "@b:x"}],
            "org.matrix.msc3898.foci.active": [{"user_id": "@u:x", "device_id": "U"}],
            "org.matrix.msc3898.foci.preferred": [{"user_id": "@u:x", "device_id": "U"}],
        });
        let obj = v.as_object().cloned().unwrap_or_default();
        let a = read_foci(&obj, FOCI_ACTIVE, FOCI_ACTIVE_UNSTABLE);
        assert_eq!(
            a,
            vec![FocusRef {
                user_id: "@a:x".into(),
                device_id: "A".into()
            }]
        );
        let p = read_foci(&obj, FOCI_PREFERRED, FOCI_PREFERRED_UNSTABLE);
        assert_eq!(
            p,
            vec![FocusRef {
                user_id: "@u:x".into(),
                device_id: "U".into()
            }]
        );
        let none = serde_json::Map::new();
        assert!(read_foci(&none, FOCI_ACTIVE, FOCI_ACTIVE_UNSTABLE).is_empty());
    }
}

/// MSC3898's key for the foci a device publishes to, stable name.
pub const FOCI_ACTIVE: &str = "m.foci.active";
/// MSC3898's key for the foci a device publishes to, unstable name.
pub const FOCI_ACTIVE_UNSTABLE: &str = "org.matrix.msc3898.foci.active";
/// MSC3898's key for the foci a device would rather use, stable name.
pub const FOCI_PREFERRED: &str = "m.foci.preferred";
/// MSC3898's key for the foci a device would rather use, unstable name.
pub const FOCI_PREFERRED_UNSTABLE: &str = "org.matrix.msc3898.foci.preferred";

/// At most this many foci are read from one list.
const MAX_FOCI: usize = 8;

/// Reads a foci list (`m.foci.active` or `m.foci.preferred`) of a device
/// entry: the stable key, else the unstable one. Entries that are not
/// objects with string `user_id` and `device_id` of a sane length are
/// skipped; a list that is not an array reads as empty.
pub fn read_foci(entry: &Map<String, Value>, stable: &str, unstable: &str) -> Vec<FocusRef> {
    let list = entry
        .get(stable)
        .or_else(|| entry.get(unstable))
        .and_then(Value::as_array);
    let Some(list) = list else {
        return Vec::new();
    };
    let mut out: Vec<FocusRef> = Vec::new();
    for f in list.iter().take(MAX_FOCI) {
        let Some(obj) = f.as_object() else { continue };
        let (Ok(user_id), Ok(device_id)) = (id_field(obj, "user_id"), id_field(obj, "device_id"))
        else {
            continue;
        };
        let f = FocusRef { user_id, device_id };
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

impl MemberContent {
    /// The well-formed, unexpired device entries for `call_id` in a raw
    /// member event content, and the reasons entries were skipped.
    ///
    /// A device counts when `device_id` and `session_id` are strings of a sane
    /// length and its expiry is a number greater than `now`: the checks of the
    /// reference, with two leniencies for what other clients write. The expiry
    /// is the entry's `expires_ts` or, when the entry has none, the content's
    /// top-level `m.expires_ts` (older matrix-js-sdk, the MSC3898 example);
    /// `feeds` may be missing (no feeds), but when present must be an array.
    pub fn live_devices(
        content: &Value,
        call_id: &str,
        now: u64,
    ) -> (Vec<MemberDevice>, Vec<String>) {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        let top_expiry = content.get(TOP_LEVEL_EXPIRES_TS).and_then(as_timestamp);
        let Some(calls) = content.get("m.calls").and_then(Value::as_array) else {
            if content.get("m.calls").is_some() {
                skipped.push("`m.calls` is not an array".to_owned());
            }
            return (out, skipped);
        };
        for call in calls {
            if call.get("m.call_id").and_then(Value::as_str) != Some(call_id) {
                continue;
            }
            let Some(devices) = call.get("m.devices").and_then(Value::as_array) else {
                skipped.push("`m.devices` is not an array".to_owned());
                continue;
            };
            for (i, dev) in devices.iter().enumerate() {
                if i >= MAX_DEVICES_PER_CALL {
                    skipped.push(format!("more than {MAX_DEVICES_PER_CALL} devices"));
                    break;
                }
                match parse_member_device(dev, top_expiry) {
                    Ok(d) if d.expires_ts > now => out.push(d),
                    Ok(d) => skipped.push(format!(
                        "device {} expired at {}",
                        d.device_id, d.expires_ts
                    )),
                    Err(e) => skipped.push(format!("device entry {i}: {e}")),
                }
            }
        }
        (out, skipped)
    }
}

/// Key of the content-wide expiry some clients write instead of (or besides)
/// each device's `expires_ts`.
pub const TOP_LEVEL_EXPIRES_TS: &str = "m.expires_ts";

/// A timestamp written as a JSON number (integer or float, not negative).
fn as_timestamp(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

fn parse_member_device(dev: &Value, top_expiry: Option<u64>) -> Result<MemberDevice, ParseError> {
    let obj = dev.as_object().ok_or(ParseError::NotAnObject {
        what: "device entry",
    })?;
    let device_id = id_field(obj, "device_id")?;
    let session_id = id_field(obj, "session_id")?;
    let expires_ts = match obj.get("expires_ts") {
        None => top_expiry.ok_or(ParseError::MissingField("expires_ts"))?,
        Some(v) => as_timestamp(v).ok_or(ParseError::WrongType {
            field: "expires_ts",
            expected: "number",
        })?,
    };
    let feeds = match obj.get("feeds") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .take(MAX_FEEDS)
            .filter_map(|f| f.get("purpose").and_then(Value::as_str))
            .filter_map(|p| match FeedPurpose::from(p.to_owned()) {
                FeedPurpose::Other(_) => None,
                known => Some(known),
            })
            .collect(),
        Some(_) => {
            return Err(ParseError::WrongType {
                field: "feeds",
                expected: "array",
            });
        }
    };
    let foci_active = read_foci(obj, FOCI_ACTIVE, FOCI_ACTIVE_UNSTABLE);
    let foci_preferred = read_foci(obj, FOCI_PREFERRED, FOCI_PREFERRED_UNSTABLE);
    Ok(MemberDevice {
        device_id,
        session_id,
        expires_ts,
        feeds,
        foci_active,
        foci_preferred,
    })
}

/// Reads a string id field of bounded length.
pub(crate) fn id_field(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<String, ParseError> {
    match obj.get(field) {
        None => Err(ParseError::MissingField(field)),
        Some(Value::String(s)) if s.is_empty() => Err(ParseError::InvalidValue {
            field,
            reason: "empty".to_owned(),
        }),
        Some(Value::String(s)) if s.len() > MAX_ID_LEN => Err(ParseError::TooLong {
            field,
            len: s.len(),
            max: MAX_ID_LEN,
        }),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ParseError::WrongType {
            field,
            expected: "string",
        }),
    }
}

/// A room state event as the core needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct StateEvent {
    /// Event type.
    pub event_type: String,
    /// State key.
    pub state_key: String,
    /// Sender user id.
    pub sender: String,
    /// Server timestamp, ms.
    pub origin_server_ts: u64,
    /// Content (may be `{}` for redacted events).
    pub content: Value,
}

impl StateEvent {
    /// Reads a state event from its client-server API JSON.
    pub fn from_json(v: &Value) -> Result<Self, ParseError> {
        let obj = v.as_object().ok_or(ParseError::NotAnObject {
            what: "state event",
        })?;
        let s = |field: &'static str| -> Result<String, ParseError> {
            match obj.get(field) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(ParseError::WrongType {
                    field,
                    expected: "string",
                }),
                None => Err(ParseError::MissingField(field)),
            }
        };
        let event_type = s("type")?;
        let state_key = s("state_key")?;
        let sender = s("sender")?;
        let origin_server_ts = obj
            .get("origin_server_ts")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let content = match obj.get("content") {
            Some(c @ Value::Object(_)) => c.clone(),
            Some(_) => {
                return Err(ParseError::WrongType {
                    field: "content",
                    expected: "object",
                });
            }
            None => Value::Object(Map::new()),
        };
        Ok(Self {
            event_type,
            state_key,
            sender,
            origin_server_ts,
            content,
        })
    }
}
