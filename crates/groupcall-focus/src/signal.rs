//! The focus's side of MSC2746/MSC3401 to-device signalling: clients call
//! the focus (it is their callee), one call per device; the focus calls
//! another focus of the call itself for a cascade link
//! ([`FocusSignalling::invite`], docs/protocol.md "Cascading foci").
//!
//! Sans-IO. [`FocusSignalling::receive`] reads an incoming to-device
//! message into a [`Signal`] for the orchestrator (which decides, with the
//! authorisation module, whether to answer an invite);
//! [`FocusSignalling::answer`], [`FocusSignalling::candidates`],
//! [`FocusSignalling::hangup`] and [`FocusSignalling::reject`] write the
//! focus's messages with the group fields (`conf_id`, `seq`, session ids).
//!
//! The focus has no member entry, so clients cannot know its session before
//! it answers: an invite's `dest_session_id` is not checked (groupcall
//! clients send the focus's device id), and the focus's answer names its
//! session in `sender_session_id` (docs/protocol.md, "The focus"). Later
//! messages are not checked against it either: the Olm sender and the
//! `call_id` identify the call.

use std::collections::BTreeMap;

use groupcall_proto::signalling::{
    Answer, Body, Candidate, Candidates, CommonFields, Hangup, Invite, Message, MessageType,
    SdpStreamMetadata, SessionDescription, Version,
};
use groupcall_proto::{DeviceKey, IncomingToDevice, OutgoingMessage};
use serde_json::Value;

/// Candidates of a call whose invite has not arrived yet, kept per device.
const MAX_EARLY_CANDIDATES: usize = 64;

/// Why an incoming message was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignalError {
    /// Not an `m.call.*` signalling event type.
    #[error("not call signalling: {0}")]
    NotSignalling(String),
    /// Malformed content.
    #[error("malformed {event_type}: {reason}")]
    Malformed {
        /// The event type.
        event_type: String,
        /// What was wrong.
        reason: String,
    },
    /// It came in plaintext and plaintext is not allowed.
    #[error("plaintext signalling refused")]
    Plaintext,
    /// The device named in the content is not the Olm sender's.
    #[error("device {claimed} claimed, Olm says {actual}")]
    DeviceMismatch {
        /// Named in the content.
        claimed: String,
        /// From the Olm session.
        actual: String,
    },
    /// No device could be told (plaintext without `device_id`).
    #[error("sending device unknown")]
    UnknownDevice,
    /// A message of a call the focus does not have with that device.
    #[error("no call {0} with that device")]
    UnknownCall(String),
    /// An invite without `sender_session_id` (MSC3401 requires it).
    #[error("invite without sender_session_id")]
    NoSession,
}

/// What an incoming message means for the focus.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Signal {
    /// A client calls the focus. The invite is pending until
    /// [`FocusSignalling::admit`] (then answer with
    /// [`FocusSignalling::answer`]) or [`FocusSignalling::reject`]; the
    /// device's current call, if any, goes on until the new one is
    /// admitted (a refused invite never ends a healthy call).
    Invite {
        /// The calling device (from Olm when encrypted).
        device: DeviceKey,
        /// The 1:1 call id.
        call_id: String,
        /// The group call (`m.call` state key).
        conf_id: String,
        /// The caller's session, to check against its member entry.
        session_id: String,
        /// Whether it came Olm-encrypted.
        encrypted: bool,
        /// The offer SDP.
        sdp: String,
        /// The caller's streams.
        metadata: SdpStreamMetadata,
        /// Candidates that arrived before the invite.
        early_candidates: Vec<Candidate>,
        /// The device's current call, which this one replaces if admitted.
        replaced: Option<String>,
    },
    /// Trickled candidates of a call.
    Candidates {
        /// The device.
        device: DeviceKey,
        /// Whether they belong to its pending invite (else its current
        /// call).
        pending: bool,
        /// The candidates.
        candidates: Vec<Candidate>,
    },
    /// The answer to a call the focus placed ([`FocusSignalling::invite`]).
    Answered {
        /// The device called.
        device: DeviceKey,
        /// The answer SDP.
        sdp: String,
    },
    /// The client ended a call (hangup or reject).
    Ended {
        /// The device.
        device: DeviceKey,
        /// Whether that was its pending invite (else its current call).
        pending: bool,
        /// Its reason.
        reason: String,
    },
    /// Nothing to do (e.g. `select_answer`, a repeated invite, early
    /// candidates kept for their invite).
    Nothing,
}

#[derive(Debug, Clone)]
struct ClientCall {
    call_id: String,
    conf_id: String,
    remote_session: String,
    send_seq: u64,
    /// The last invite's `seq`: a repeated invite (same call, same seq) is
    /// a resend of one we already took.
    invite_seq: u64,
    /// The focus placed this call and waits for its answer.
    awaiting_answer: bool,
}

/// The focus's signalling state: one call per client device.
#[derive(Debug)]
pub struct FocusSignalling {
    device_id: String,
    session_id: String,
    allow_plaintext: bool,
    calls: BTreeMap<DeviceKey, ClientCall>,
    /// Invites being decided on (at most one per device).
    pending: BTreeMap<DeviceKey, ClientCall>,
    early: BTreeMap<(DeviceKey, String), Vec<Candidate>>,
}

impl FocusSignalling {
    /// The focus device `device_id` with its session `session_id` (new at
    /// each start); plaintext signalling is refused unless
    /// `allow_plaintext`.
    pub fn new(
        device_id: impl Into<String>,
        session_id: impl Into<String>,
        allow_plaintext: bool,
    ) -> Self {
        Self {
            device_id: device_id.into(),
            session_id: session_id.into(),
            allow_plaintext,
            calls: BTreeMap::new(),
            pending: BTreeMap::new(),
            early: BTreeMap::new(),
        }
    }

    /// The focus's session id.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The call id of `device`'s current call, if any.
    pub fn call_of(&self, device: &DeviceKey) -> Option<&str> {
        self.calls.get(device).map(|c| c.call_id.as_str())
    }

    /// The group call `device`'s current call belongs to.
    pub fn conf_of(&self, device: &DeviceKey) -> Option<&str> {
        self.calls.get(device).map(|c| c.conf_id.as_str())
    }

    /// Reads an incoming to-device message.
    pub fn receive(&mut self, m: &IncomingToDevice) -> Result<Signal, SignalError> {
        if MessageType::from_event_type(&m.event_type).is_none() {
            return Err(SignalError::NotSignalling(m.event_type.clone()));
        }
        if !m.encrypted && !self.allow_plaintext {
            return Err(SignalError::Plaintext);
        }
        let msg =
            Message::parse(&m.event_type, &m.content).map_err(|e| SignalError::Malformed {
                event_type: m.event_type.clone(),
                reason: e.to_string(),
            })?;
        let device_id = match (&msg.common.device_id, &m.sender_device) {
            (Some(claimed), Some(actual)) if claimed != actual => {
                return Err(SignalError::DeviceMismatch {
                    claimed: claimed.clone(),
                    actual: actual.clone(),
                });
            }
            (_, Some(d)) | (Some(d), None) => d.clone(),
            (None, None) => self
                .calls
                .iter()
                .chain(self.pending.iter())
                .find(|(k, c)| k.user_id == m.sender && c.call_id == msg.common.call_id)
                .map(|(k, _)| k.device_id.clone())
                .ok_or(SignalError::UnknownDevice)?,
        };
        let device = DeviceKey::new(m.sender.clone(), device_id);
        let call_id = msg.common.call_id.clone();
        match msg.body {
            Body::Invite(inv) => {
                let session_id = msg
                    .common
                    .sender_session_id
                    .clone()
                    .ok_or(SignalError::NoSession)?;
                let seen = |c: Option<&ClientCall>| {
                    c.is_some_and(|c| c.call_id == call_id && c.invite_seq == msg.common.seq)
                };
                if seen(self.calls.get(&device)) || seen(self.pending.get(&device)) {
                    return Ok(Signal::Nothing);
                }
                let replaced = self.calls.get(&device).map(|c| c.call_id.clone());
                self.pending.insert(
                    device.clone(),
                    ClientCall {
                        call_id: call_id.clone(),
                        conf_id: msg.common.conf_id.clone(),
                        remote_session: session_id.clone(),
                        send_seq: 0,
                        invite_seq: msg.common.seq,
                        awaiting_answer: false,
                    },
                );
                let early_candidates = self
                    .early
                    .remove(&(device.clone(), call_id.clone()))
                    .unwrap_or_default();
                self.early.retain(|(d, _), _| *d != device);
                Ok(Signal::Invite {
                    device,
                    call_id,
                    conf_id: msg.common.conf_id,
                    session_id,
                    encrypted: m.encrypted,
                    sdp: inv.offer.sdp,
                    metadata: inv.sdp_stream_metadata.unwrap_or_default(),
                    early_candidates,
                    replaced,
                })
            }
            body => {
                let is = |c: Option<&ClientCall>| c.is_some_and(|c| c.call_id == call_id);
                let pending = is(self.pending.get(&device));
                let current = pending || is(self.calls.get(&device));
                match body {
                    Body::Candidates(c) if !current => {
                        let key = (device, call_id);
                        if !self.early.contains_key(&key)
                            && self.early.keys().filter(|(d, _)| *d == key.0).count() >= 4
                        {
                            return Err(SignalError::UnknownCall(key.1));
                        }
                        let kept = self.early.entry(key).or_default();
                        let room = MAX_EARLY_CANDIDATES.saturating_sub(kept.len());
                        kept.extend(c.candidates.into_iter().take(room));
                        Ok(Signal::Nothing)
                    }
                    _ if !current => Err(SignalError::UnknownCall(call_id)),
                    Body::Candidates(c) => Ok(Signal::Candidates {
                        device,
                        pending,
                        candidates: c.candidates,
                    }),
                    Body::Answer(a) if !pending => {
                        let Some(call) = self.calls.get_mut(&device) else {
                            return Err(SignalError::UnknownCall(call_id));
                        };
                        if !call.awaiting_answer {
                            // A resent answer, or one to a call we did not place.
                            return Ok(Signal::Nothing);
                        }
                        call.awaiting_answer = false;
                        if let Some(session) = &msg.common.sender_session_id {
                            call.remote_session = session.clone();
                        }
                        Ok(Signal::Answered {
                            device,
                            sdp: a.answer.sdp,
                        })
                    }
                    Body::Hangup(h) | Body::Reject(h) => {
                        if pending {
                            self.pending.remove(&device);
                        } else {
                            self.calls.remove(&device);
                        }
                        Ok(Signal::Ended {
                            device,
                            pending,
                            reason: h.reason.unwrap_or_else(|| "user_hangup".to_owned()),
                        })
                    }
                    _ => Ok(Signal::Nothing),
                }
            }
        }
    }

    /// The answer to `device`'s current call (`None` if it has none).
    pub fn answer(
        &mut self,
        device: &DeviceKey,
        sdp: String,
        metadata: SdpStreamMetadata,
    ) -> Option<(MessageType, OutgoingMessage)> {
        self.message(
            device,
            Body::Answer(Answer {
                answer: SessionDescription::answer(sdp),
                capabilities: None,
                sdp_stream_metadata: Some(metadata),
                extra: Default::default(),
            }),
        )
    }

    /// Trickles the focus's candidates to `device`.
    pub fn candidates(
        &mut self,
        device: &DeviceKey,
        candidates: Vec<Candidate>,
    ) -> Option<(MessageType, OutgoingMessage)> {
        self.message(
            device,
            Body::Candidates(Candidates {
                candidates,
                extra: Default::default(),
            }),
        )
    }

    /// Ends `device`'s call from the focus's side.
    pub fn hangup(
        &mut self,
        device: &DeviceKey,
        reason: &str,
    ) -> Option<(MessageType, OutgoingMessage)> {
        let m = self.message(
            device,
            Body::Hangup(Hangup {
                reason: Some(reason.to_owned()),
                extra: Default::default(),
            }),
        );
        self.calls.remove(device);
        m
    }

    /// Places a call to `device` (another focus of the group call
    /// `conf_id`, for a cascade link) with our offer: the invite to send.
    /// It becomes the device's current call (one it had is forgotten); its
    /// answer comes back as [`Signal::Answered`]. The callee has no member
    /// entry, so `dest_session_id` is its device id until it answers, as
    /// clients do when they call a focus.
    pub fn invite(
        &mut self,
        device: &DeviceKey,
        conf_id: &str,
        call_id: &str,
        sdp: String,
        lifetime_ms: u64,
    ) -> (MessageType, OutgoingMessage) {
        self.pending.remove(device);
        self.early.retain(|(d, _), _| d != device);
        let mut call = ClientCall {
            call_id: call_id.to_owned(),
            conf_id: conf_id.to_owned(),
            remote_session: device.device_id.clone(),
            send_seq: 0,
            invite_seq: 0,
            awaiting_answer: true,
        };
        let m = make(
            &self.device_id,
            &self.session_id,
            &mut call,
            device,
            Body::Invite(Invite {
                lifetime: lifetime_ms,
                offer: SessionDescription::offer(sdp),
                invitee: Some(device.user_id.clone()),
                capabilities: None,
                sdp_stream_metadata: Some(SdpStreamMetadata::new()),
                intent: None,
                extra: Default::default(),
            }),
        );
        self.calls.insert(device.clone(), call);
        m
    }

    /// Admits `device`'s pending invite: it becomes the device's current
    /// call. Returns the call it replaces, if any (end that one).
    pub fn admit(&mut self, device: &DeviceKey) -> Option<String> {
        let call = self.pending.remove(device)?;
        self.calls
            .insert(device.clone(), call)
            .map(|old| old.call_id)
    }

    /// Turns down `device`'s pending invite (`m.call.reject` with
    /// `reason`): the client falls back to the mesh. Its current call, if
    /// any, is not touched.
    pub fn reject(
        &mut self,
        device: &DeviceKey,
        reason: &str,
    ) -> Option<(MessageType, OutgoingMessage)> {
        let mut call = self.pending.remove(device)?;
        Some(make(
            &self.device_id,
            &self.session_id,
            &mut call,
            device,
            Body::Reject(Hangup {
                reason: Some(reason.to_owned()),
                extra: Default::default(),
            }),
        ))
    }

    /// Forgets `device`'s current call without a message (e.g. it left
    /// the call). A pending invite is decided on its own.
    pub fn forget(&mut self, device: &DeviceKey) {
        self.calls.remove(device);
        self.early.retain(|(d, _), _| d != device);
    }

    fn message(
        &mut self,
        device: &DeviceKey,
        body: Body,
    ) -> Option<(MessageType, OutgoingMessage)> {
        let call = self.calls.get_mut(device)?;
        Some(make(&self.device_id, &self.session_id, call, device, body))
    }
}

/// A message of `call` (its next `seq`) from the focus (`focus_device`,
/// `focus_session`) to `device`.
fn make(
    focus_device: &str,
    focus_session: &str,
    call: &mut ClientCall,
    device: &DeviceKey,
    body: Body,
) -> (MessageType, OutgoingMessage) {
    let msg = Message {
        common: CommonFields {
            version: Version::V1,
            call_id: call.call_id.clone(),
            party_id: focus_device.to_owned(),
            conf_id: call.conf_id.clone(),
            device_id: Some(focus_device.to_owned()),
            sender_session_id: Some(focus_session.to_owned()),
            dest_session_id: call.remote_session.clone(),
            seq: call.send_seq,
        },
        body,
    };
    call.send_seq += 1;
    let content: Value = msg.to_content();
    (
        msg.message_type(),
        OutgoingMessage {
            user_id: device.user_id.clone(),
            device_id: device.device_id.clone(),
            content,
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn incoming(
        ty: &str,
        call_id: &str,
        seq: u64,
        mut body: Value,
        encrypted: bool,
    ) -> IncomingToDevice {
        body["version"] = json!("1");
        body["call_id"] = json!(call_id);
        body["party_id"] = json!("ADEV");
        body["conf_id"] = json!("CONF");
        body["device_id"] = json!("ADEV");
        body["sender_session_id"] = json!("ASESS");
        body["dest_session_id"] = json!("FOCUS");
        body["seq"] = json!(seq);
        IncomingToDevice {
            sender: "@a:x".into(),
            sender_device: encrypted.then(|| "ADEV".to_owned()),
            event_type: ty.into(),
            content: body,
            encrypted,
        }
    }

    fn invite(call_id: &str, seq: u64) -> IncomingToDevice {
        incoming(
            "m.call.invite",
            call_id,
            seq,
            json!({"lifetime": 60000, "offer": {"type": "offer", "sdp": "v=0"},
                "sdp_stream_metadata": {"s1": {"purpose": "m.usermedia"}}}),
            true,
        )
    }

    fn a() -> DeviceKey {
        DeviceKey::new("@a:x", "ADEV")
    }

    #[test]
    fn an_invite_is_answered_with_the_focus_session_and_the_callers_fields() {
        let mut s = FocusSignalling::new("FOCUS", "FSESS", false);
        let early = incoming(
            "m.call.candidates",
            "c1",
            1,
            json!({"candidates": [{"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": "0"}]}),
            true,
        );
        assert_eq!(s.receive(&early), Ok(Signal::Nothing));
        let Signal::Invite {
            device,
            conf_id,
            session_id,
            sdp,
            metadata,
            early_candidates,
            replaced,
            ..
        } = s.receive(&invite("c1", 0)).unwrap()
        else {
            panic!("an invite");
        };
        assert_eq!(
            (device, conf_id.as_str(), session_id.as_str(), sdp.as_str()),
            (a(), "CONF", "ASESS", "v=0")
        );
        assert!(metadata.contains_key("s1"));
        assert_eq!(early_candidates.len(), 1);
        assert_eq!(replaced, None);
        // Pending until admitted: nothing to answer yet.
        assert!(s.answer(&a(), "x".into(), Default::default()).is_none());
        assert_eq!(s.admit(&a()), None);
        let (ty, m) = s
            .answer(&a(), "answer-sdp".into(), Default::default())
            .unwrap();
        assert_eq!(ty, MessageType::Answer);
        assert_eq!((m.user_id.as_str(), m.device_id.as_str()), ("@a:x", "ADEV"));
        let c = &m.content;
        assert_eq!(c["call_id"], "c1");
        assert_eq!(c["conf_id"], "CONF");
        assert_eq!(c["party_id"], "FOCUS");
        assert_eq!(c["sender_session_id"], "FSESS");
        assert_eq!(c["dest_session_id"], "ASESS");
        assert_eq!(c["seq"], 0);
        assert_eq!(c["answer"]["sdp"], "answer-sdp");
        let (_, m) = s
            .candidates(&a(), vec![Candidate::end_of_candidates()])
            .unwrap();
        assert_eq!(m.content["seq"], 1);
        // A repeated invite (the caller sent it again) is not a new call.
        assert_eq!(s.receive(&invite("c1", 0)), Ok(Signal::Nothing));
        // A new invite would replace the call, once admitted: until then
        // the current call goes on (its candidates are its own).
        let Signal::Invite { replaced, .. } = s.receive(&invite("c2", 0)).unwrap() else {
            panic!("an invite");
        };
        assert_eq!(replaced.as_deref(), Some("c1"));
        assert_eq!(s.call_of(&a()), Some("c1"));
        let cands = |call: &str| {
            incoming(
                "m.call.candidates",
                call,
                2,
                json!({"candidates": [{"candidate": "candidate:1 1 udp 1 127.0.0.1 5000 typ host", "sdpMid": "0"}]}),
                true,
            )
        };
        assert!(matches!(
            s.receive(&cands("c1")),
            Ok(Signal::Candidates { pending: false, .. })
        ));
        assert!(matches!(
            s.receive(&cands("c2")),
            Ok(Signal::Candidates { pending: true, .. })
        ));
        assert_eq!(s.admit(&a()).as_deref(), Some("c1"));
        assert_eq!(s.call_of(&a()), Some("c2"));
    }

    #[test]
    fn a_refused_invite_leaves_the_current_call_alone() {
        let mut s = FocusSignalling::new("FOCUS", "FSESS", false);
        s.receive(&invite("c1", 0)).unwrap();
        s.admit(&a());
        s.receive(&invite("c2", 0)).unwrap();
        let (_, m) = s.reject(&a(), "stale_session").unwrap();
        assert_eq!(m.content["call_id"], "c2");
        assert_eq!(s.call_of(&a()), Some("c1"));
        // The current call still answers, with its own seq.
        let (_, m) = s.answer(&a(), "sdp".into(), Default::default()).unwrap();
        assert_eq!(m.content["call_id"], "c1");
    }

    #[test]
    fn plaintext_forged_devices_and_strangers_are_refused() {
        let mut s = FocusSignalling::new("FOCUS", "FSESS", false);
        let mut plain = invite("c1", 0);
        plain.encrypted = false;
        plain.sender_device = None;
        assert_eq!(s.receive(&plain), Err(SignalError::Plaintext));
        let mut forged = invite("c1", 0);
        forged.sender_device = Some("OTHER".into());
        assert!(matches!(
            s.receive(&forged),
            Err(SignalError::DeviceMismatch { .. })
        ));
        let hangup = incoming("m.call.hangup", "c9", 1, json!({}), true);
        assert_eq!(
            s.receive(&hangup),
            Err(SignalError::UnknownCall("c9".into()))
        );
        let junk = IncomingToDevice {
            sender: "@a:x".into(),
            sender_device: Some("ADEV".into()),
            event_type: "m.call.invite".into(),
            content: json!({"offer": 5}),
            encrypted: true,
        };
        assert!(matches!(
            s.receive(&junk),
            Err(SignalError::Malformed { .. })
        ));
        let other = IncomingToDevice {
            event_type: "m.room_key".into(),
            ..junk
        };
        assert!(matches!(
            s.receive(&other),
            Err(SignalError::NotSignalling(_))
        ));
        // Allowed by configuration, plaintext with the device in the content.
        let mut s = FocusSignalling::new("FOCUS", "FSESS", true);
        assert!(matches!(
            s.receive(&plain),
            Ok(Signal::Invite {
                encrypted: false,
                ..
            })
        ));
    }

    #[test]
    fn a_hangup_ends_the_call_and_reject_writes_the_reason() {
        let mut s = FocusSignalling::new("FOCUS", "FSESS", false);
        s.receive(&invite("c1", 0)).unwrap();
        let (ty, m) = s.reject(&a(), "focus_full").unwrap();
        assert_eq!(ty, MessageType::Reject);
        assert_eq!(m.content["reason"], "focus_full");
        assert_eq!(s.call_of(&a()), None);
        s.receive(&invite("c2", 0)).unwrap();
        s.admit(&a());
        let hangup = incoming(
            "m.call.hangup",
            "c2",
            1,
            json!({"reason": "user_hangup"}),
            true,
        );
        assert_eq!(
            s.receive(&hangup),
            Ok(Signal::Ended {
                device: a(),
                pending: false,
                reason: "user_hangup".into()
            })
        );
        assert!(s.answer(&a(), "x".into(), Default::default()).is_none());
    }
}
