//! The room's call state: which call is live and which devices take part.

use std::collections::BTreeMap;

use serde_json::Value;
use tracing::debug;

use crate::error::ParseError;
use crate::events::{
    CALL_MEMBER, CallContent, FeedPurpose, FocusRef, MemberContent, ROOM_MEMBER, StateEvent,
    is_call_member_type, is_call_type,
};
use crate::ids::DeviceKey;

/// A call known from an `m.call` event.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    /// The call id (state key).
    pub call_id: String,
    /// Its content.
    pub content: CallContent,
    /// Server timestamp of the event, for "newest wins".
    pub ts: u64,
}

/// A live participant device of the current call.
#[derive(Debug, Clone, PartialEq)]
pub struct Participant {
    /// Session id.
    pub session_id: String,
    /// Expiry, POSIX ms.
    pub expires_ts: u64,
    /// Feed purposes listed.
    pub feeds: Vec<FeedPurpose>,
    /// The foci it publishes to (`m.foci.active`); empty: full mesh.
    pub foci_active: Vec<FocusRef>,
    /// The foci it would rather use (`m.foci.preferred`).
    pub foci_preferred: Vec<FocusRef>,
}

/// Why a device is no longer a participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeftReason {
    /// Its entry was removed from the member event.
    Removed,
    /// Its `expires_ts` passed.
    Expired,
    /// The user's room membership is no longer `join`.
    RoomLeft,
    /// The call it was in ended or is no longer the current call.
    CallEnded,
}

/// A change in the room's call state.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RoomChange {
    /// The current call changed (a new call, or none).
    CallChanged {
        /// The call id now current, if any.
        call_id: Option<String>,
    },
    /// The current (pinned) call was terminated.
    CallTerminated {
        /// Its id.
        call_id: String,
        /// The `m.terminated` reason.
        reason: String,
    },
    /// A device joined.
    DeviceJoined {
        /// The device.
        device: DeviceKey,
        /// Its session.
        session_id: String,
    },
    /// A device left.
    DeviceLeft {
        /// The device.
        device: DeviceKey,
        /// Its last session.
        session_id: String,
        /// Why.
        reason: LeftReason,
    },
    /// A device started a new session.
    SessionChanged {
        /// The device.
        device: DeviceKey,
        /// Previous session.
        old_session_id: String,
        /// New session.
        new_session_id: String,
    },
    /// A device republished its entry (same session, new expiry): it is
    /// alive.
    DeviceRefreshed {
        /// The device.
        device: DeviceKey,
    },
    /// A device's listed feeds changed.
    FeedsChanged {
        /// The device.
        device: DeviceKey,
        /// Purposes now listed.
        feeds: Vec<FeedPurpose>,
    },
}

/// Folds `m.call`, `m.call.member` and `m.room.member` state plus the time
/// into the live call and its participants.
///
/// The *current call* is the pinned call when one is pinned (the call we
/// joined), otherwise the newest non-terminated `m.call`. Participants are the
/// devices listed for the current call whose entries are well formed and not
/// expired, of users whose membership is `join` and who sent their own member
/// event (state key = sender).
#[derive(Debug, Clone, Default)]
pub struct RoomCallState {
    calls: BTreeMap<String, CallRecord>,
    /// Member event contents by (user, event type as sent): a user may have
    /// one under the stable and one under the unstable name, and a stale one
    /// under one name must not hide a live one under the other.
    /// Each with the `origin_server_ts` of the event it came from.
    members: BTreeMap<(String, String), (Value, u64)>,
    memberships: BTreeMap<String, String>,
    pinned: Option<String>,
    current: Option<String>,
    /// Whether `current` was terminated when last computed (the record
    /// itself is overwritten by the event that terminates it).
    current_terminated: bool,
    participants: BTreeMap<DeviceKey, Participant>,
    /// Whether to require `m.room.member` = join (default true).
    require_room_membership: bool,
}

impl RoomCallState {
    /// An empty state.
    pub fn new() -> Self {
        Self {
            require_room_membership: true,
            ..Default::default()
        }
    }

    /// Whether participants must have room membership `join` (default true).
    /// Turn off only for a driver that cannot see room membership.
    pub fn set_require_room_membership(&mut self, on: bool) {
        self.require_room_membership = on;
    }

    /// The newest non-terminated call, whatever is pinned.
    pub fn live_call(&self) -> Option<&CallRecord> {
        self.calls
            .values()
            .filter(|c| !c.content.is_terminated())
            .max_by(|a, b| a.ts.cmp(&b.ts).then_with(|| a.call_id.cmp(&b.call_id)))
    }

    /// A call by id.
    pub fn call(&self, call_id: &str) -> Option<&CallRecord> {
        self.calls.get(call_id)
    }

    /// The current call id (pinned or live).
    pub fn current_call_id(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// The live participants of the current call.
    pub fn participants(&self) -> &BTreeMap<DeviceKey, Participant> {
        &self.participants
    }

    /// The raw content of a user's member event under `event_type` (either
    /// name of the member event), if any. Our own content is edited from the
    /// event under the name we write, never from the other.
    pub fn member_content(&self, user_id: &str, event_type: &str) -> Option<&Value> {
        self.members
            .get(&(
                user_id.to_owned(),
                canonical_member_type(event_type).to_owned(),
            ))
            .map(|(content, _)| content)
    }

    /// A user's room membership, if known.
    pub fn membership(&self, user_id: &str) -> Option<&str> {
        self.memberships.get(user_id).map(String::as_str)
    }

    /// The next time a participant expires (POSIX ms): wake up then and call
    /// [`RoomCallState::tick`].
    pub fn next_expiry(&self) -> Option<u64> {
        self.participants.values().map(|p| p.expires_ts).min()
    }

    /// Pins the current call (after joining it) or unpins (`None`).
    pub fn pin(&mut self, call_id: Option<String>, now: u64) -> Vec<RoomChange> {
        self.pinned = call_id;
        self.recompute(now)
    }

    /// Records a call event we sent ourselves before its echo arrives.
    pub fn local_echo_call(
        &mut self,
        call_id: &str,
        content: CallContent,
        now: u64,
    ) -> Vec<RoomChange> {
        self.calls.insert(
            call_id.to_owned(),
            CallRecord {
                call_id: call_id.to_owned(),
                content,
                ts: now,
            },
        );
        self.recompute(now)
    }

    /// Applies a state event from its JSON.
    pub fn apply_json(&mut self, event: &Value, now: u64) -> Result<Vec<RoomChange>, ParseError> {
        let ev = StateEvent::from_json(event)?;
        self.apply(&ev, now)
    }

    /// Applies a state event. Events of other types are ignored (`Ok(vec![])`).
    pub fn apply(&mut self, ev: &StateEvent, now: u64) -> Result<Vec<RoomChange>, ParseError> {
        if is_call_type(&ev.event_type) {
            if ev.state_key.is_empty() {
                return Err(ParseError::InvalidValue {
                    field: "state_key",
                    reason: "empty call id".into(),
                });
            }
            let content = if ev.content.as_object().is_some_and(|o| o.is_empty()) {
                // A redacted call event: treat as terminated.
                let mut c = CallContent::default();
                c.terminate("redacted");
                c
            } else {
                CallContent::from_json_lenient(&ev.content)
            };
            self.calls.insert(
                ev.state_key.clone(),
                CallRecord {
                    call_id: ev.state_key.clone(),
                    content,
                    ts: ev.origin_server_ts,
                },
            );
        } else if is_call_member_type(&ev.event_type) {
            if is_msc4143_state_key(&ev.state_key, &ev.sender) {
                // MatrixRTC (MSC4143, today's Element Call): same event type,
                // per-device state keys, another content shape and protocol.
                // Not an MSC3401 participant; not an error either.
                debug!(state_key = %ev.state_key, "MSC4143 membership ignored");
                return Ok(Vec::new());
            }
            if ev.state_key != ev.sender {
                return Err(ParseError::InvalidValue {
                    field: "state_key",
                    reason: format!("member event for {} sent by {}", ev.state_key, ev.sender),
                });
            }
            if !ev.content.is_object() {
                return Err(ParseError::NotAnObject {
                    what: "member content",
                });
            }
            let key = (
                ev.state_key.clone(),
                canonical_member_type(&ev.event_type).to_owned(),
            );
            // A member event is its sender's own, sent one after the other:
            // one older than the entry we hold is older state, not a change.
            // An incremental sync's `state` section (the state at the start
            // of its timeline) carries such events after a fork in the room
            // DAG, which concurrent state events on one homeserver make too.
            // (An event without a time cannot be ordered: it applies.)
            if let Some((_, ts)) = self.members.get(&key)
                && ev.origin_server_ts != 0
                && ev.origin_server_ts < *ts
            {
                debug!(user = %ev.state_key, ts = ev.origin_server_ts, held = *ts, "stale member event ignored");
                return Ok(Vec::new());
            }
            self.members
                .insert(key, (ev.content.clone(), ev.origin_server_ts));
        } else if ev.event_type == ROOM_MEMBER {
            let m = ev
                .content
                .get("membership")
                .and_then(Value::as_str)
                .unwrap_or("leave");
            if m == "invite"
                && self.memberships.get(&ev.state_key).map(String::as_str) == Some("join")
            {
                // The auth rules forbid inviting a joined user, so this is
                // older state, not a change: an incremental sync's `state`
                // section is the state at the start of its timeline, which
                // after a fork in the room DAG (events arriving over
                // federation) can be older than what we already applied.
                debug!(user = %ev.state_key, "stale invite for a joined member ignored");
                return Ok(Vec::new());
            }
            self.memberships.insert(ev.state_key.clone(), m.to_owned());
        } else {
            return Ok(Vec::new());
        }
        Ok(self.recompute(now))
    }

    /// Advances time: expired devices leave.
    pub fn tick(&mut self, now: u64) -> Vec<RoomChange> {
        self.recompute(now)
    }

    fn compute_current(&self) -> Option<String> {
        match &self.pinned {
            Some(p) => Some(p.clone()),
            None => self.live_call().map(|c| c.call_id.clone()),
        }
    }

    fn recompute(&mut self, now: u64) -> Vec<RoomChange> {
        let mut changes = Vec::new();
        let current = self.compute_current();
        if current != self.current {
            changes.push(RoomChange::CallChanged {
                call_id: current.clone(),
            });
        }
        // Compare with what we knew before this event: by now the record
        // already holds the new content.
        let was_terminated = self.current_terminated && current == self.current;
        self.current = current;
        self.current_terminated = self
            .current
            .as_ref()
            .and_then(|c| self.calls.get(c))
            .is_some_and(|c| c.content.is_terminated());

        let mut next = BTreeMap::new();
        let mut call_live = false;
        if let Some(call_id) = &self.current {
            if let Some(rec) = self.calls.get(call_id) {
                if let Some(reason) = rec.content.termination() {
                    if !was_terminated {
                        changes.push(RoomChange::CallTerminated {
                            call_id: call_id.clone(),
                            reason,
                        });
                    }
                } else {
                    call_live = true;
                }
            }
            if call_live {
                for ((user, _), (content, _)) in &self.members {
                    if self.require_room_membership
                        && self.memberships.get(user).map(String::as_str) != Some("join")
                    {
                        continue;
                    }
                    let (devices, skipped) = MemberContent::live_devices(content, call_id, now);
                    for s in skipped {
                        debug!(user = %user, "member entry skipped: {s}");
                    }
                    for d in devices {
                        let key = DeviceKey::new(user.clone(), d.device_id);
                        // Listed under both names: the entry that lives
                        // longer is the device's current one.
                        if next
                            .get(&key)
                            .is_some_and(|p: &Participant| p.expires_ts >= d.expires_ts)
                        {
                            continue;
                        }
                        next.insert(
                            key,
                            Participant {
                                session_id: d.session_id,
                                expires_ts: d.expires_ts,
                                feeds: d.feeds,
                                foci_active: d.foci_active,
                                foci_preferred: d.foci_preferred,
                            },
                        );
                    }
                }
            }
        }

        for (key, old) in &self.participants {
            if let Some(new) = next.get(key)
                && new.foci_active != old.foci_active
            {
                debug!(device = %key, foci = ?new.foci_active, "member's active foci changed");
            }
            match next.get(key) {
                None => {
                    let reason = if !call_live {
                        LeftReason::CallEnded
                    } else if self.require_room_membership
                        && self.memberships.get(&key.user_id).map(String::as_str) != Some("join")
                    {
                        LeftReason::RoomLeft
                    } else if old.expires_ts <= now {
                        LeftReason::Expired
                    } else {
                        LeftReason::Removed
                    };
                    changes.push(RoomChange::DeviceLeft {
                        device: key.clone(),
                        session_id: old.session_id.clone(),
                        reason,
                    });
                }
                Some(new) if new.session_id != old.session_id => {
                    changes.push(RoomChange::SessionChanged {
                        device: key.clone(),
                        old_session_id: old.session_id.clone(),
                        new_session_id: new.session_id.clone(),
                    })
                }
                Some(new) if new.feeds != old.feeds => changes.push(RoomChange::FeedsChanged {
                    device: key.clone(),
                    feeds: new.feeds.clone(),
                }),
                Some(new) if new.expires_ts != old.expires_ts => {
                    changes.push(RoomChange::DeviceRefreshed {
                        device: key.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        for (key, new) in &next {
            if !self.participants.contains_key(key) {
                changes.push(RoomChange::DeviceJoined {
                    device: key.clone(),
                    session_id: new.session_id.clone(),
                });
            }
        }
        self.participants = next;
        changes
    }
}

/// The member event type a content is filed under: the stable name for the
/// stable type, the unstable name for everything else.
fn canonical_member_type(event_type: &str) -> &'static str {
    if event_type == CALL_MEMBER {
        CALL_MEMBER
    } else {
        crate::events::CALL_MEMBER_UNSTABLE
    }
}

/// Is this the state key of an MSC4143 (MatrixRTC) per-device membership of
/// `sender`: `_{user_id}_{device_id}` or `{user_id}_{device_id}`?
pub fn is_msc4143_state_key(state_key: &str, sender: &str) -> bool {
    let rest = state_key.strip_prefix('_').unwrap_or(state_key);
    rest.strip_prefix(sender)
        .is_some_and(|tail| tail.len() > 1 && tail.starts_with('_'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn member(user: &str, call: &str, dev: &str, sess: &str, exp: u64) -> Value {
        json!({"type": "org.matrix.msc3401.call.member", "state_key": user, "sender": user, "origin_server_ts": 1,
            "content": {"m.calls": [{"m.call_id": call, "m.devices": [
                {"device_id": dev, "session_id": sess, "expires_ts": exp, "feeds": [{"purpose": "m.usermedia"}]}]}]}})
    }
    fn join(user: &str) -> Value {
        json!({"type": "m.room.member", "state_key": user, "sender": user, "content": {"membership": "join"}})
    }
    fn call(id: &str, ts: u64, terminated: bool) -> Value {
        let mut c = json!({"m.intent": "m.prompt", "m.type": "m.video"});
        if terminated {
            c["m.terminated"] = json!("call_ended");
        }
        json!({"type": "org.matrix.msc3401.call", "state_key": id, "sender": "@a:x", "origin_server_ts": ts, "content": c})
    }

    #[test]
    fn newest_non_terminated_call_wins() {
        let mut r = RoomCallState::new();
        r.apply_json(&call("c1", 10, false), 0).unwrap();
        r.apply_json(&call("c2", 20, false), 0).unwrap();
        assert_eq!(r.current_call_id(), Some("c2"));
        r.apply_json(&call("c2", 30, true), 0).unwrap();
        assert_eq!(r.current_call_id(), Some("c1"));
    }

    #[test]
    fn an_older_member_event_does_not_undo_a_newer_one() {
        // An incremental sync's `state` section after a fork: a member
        // event older than the one we applied comes after it.
        let mut r = RoomCallState::new();
        r.apply_json(&call("c1", 10, false), 0).unwrap();
        r.apply_json(&join("@b:x"), 0).unwrap();
        let mut newer = member("@b:x", "c1", "D", "S2", 5000);
        newer["origin_server_ts"] = json!(20);
        r.apply_json(&newer, 0).unwrap();
        let older = member("@b:x", "c1", "D", "S1", 5000);
        assert!(r.apply_json(&older, 0).unwrap().is_empty());
        assert_eq!(
            r.participants()[&DeviceKey::new("@b:x", "D")].session_id,
            "S2"
        );
        // One of the same time or later applies.
        let mut later = member("@b:x", "c1", "D", "S3", 5000);
        later["origin_server_ts"] = json!(20);
        assert!(!r.apply_json(&later, 0).unwrap().is_empty());
        assert_eq!(
            r.participants()[&DeviceKey::new("@b:x", "D")].session_id,
            "S3"
        );
    }

    #[test]
    fn a_stale_invite_does_not_undo_a_join() {
        // An incremental sync's `state` section after a federation fork:
        // the invite that preceded the join arrives after it.
        let mut r = RoomCallState::new();
        r.apply_json(&call("c1", 10, false), 0).unwrap();
        r.apply_json(&join("@b:x"), 0).unwrap();
        r.apply_json(&member("@b:x", "c1", "D", "S", 5000), 0)
            .unwrap();
        assert_eq!(r.participants().len(), 1);
        let invite = json!({"type": "m.room.member", "state_key": "@b:x", "sender": "@a:x", "content": {"membership": "invite"}});
        assert!(r.apply_json(&invite, 0).unwrap().is_empty());
        assert_eq!(r.participants().len(), 1);
        // A real leave still counts.
        let leave = json!({"type": "m.room.member", "state_key": "@b:x", "sender": "@b:x", "content": {"membership": "leave"}});
        let ch = r.apply_json(&leave, 0).unwrap();
        assert!(matches!(
            &ch[..],
            [RoomChange::DeviceLeft {
                reason: LeftReason::RoomLeft,
                ..
            }]
        ));
    }

    #[test]
    fn expiry_and_membership() {
        let mut r = RoomCallState::new();
        r.apply_json(&call("c1", 10, false), 0).unwrap();
        r.apply_json(&join("@b:x"), 0).unwrap();
        let ch = r
            .apply_json(&member("@b:x", "c1", "D", "S", 1000), 0)
            .unwrap();
        assert!(ch.contains(&RoomChange::DeviceJoined {
            device: DeviceKey::new("@b:x", "D"),
            session_id: "S".into()
        }));
        assert_eq!(r.next_expiry(), Some(1000));
        assert!(r.tick(999).is_empty());
        let ch = r.tick(1000);
        assert!(matches!(
            &ch[..],
            [RoomChange::DeviceLeft {
                reason: LeftReason::Expired,
                ..
            }]
        ));
        r.apply_json(&member("@b:x", "c1", "D", "S", 5000), 1000)
            .unwrap();
        assert_eq!(r.participants().len(), 1);
        let ch = r
            .apply_json(&json!({"type": "m.room.member", "state_key": "@b:x", "sender": "@b:x", "content": {"membership": "leave"}}), 1000)
            .unwrap();
        assert!(matches!(
            &ch[..],
            [RoomChange::DeviceLeft {
                reason: LeftReason::RoomLeft,
                ..
            }]
        ));
    }

    #[test]
    fn member_for_other_call_or_spoofed_sender_is_ignored() {
        let mut r = RoomCallState::new();
        r.apply_json(&call("c1", 10, false), 0).unwrap();
        r.apply_json(&join("@b:x"), 0).unwrap();
        r.apply_json(&member("@b:x", "other", "D", "S", 1000), 0)
            .unwrap();
        assert!(r.participants().is_empty());
        let mut spoof = member("@b:x", "c1", "D", "S", 1000);
        spoof["sender"] = json!("@evil:x");
        assert!(r.apply_json(&spoof, 0).is_err());
        assert!(r.participants().is_empty());
    }

    #[test]
    fn session_change_and_bad_entries() {
        let mut r = RoomCallState::new();
        r.apply_json(&call("c1", 10, false), 0).unwrap();
        r.apply_json(&join("@b:x"), 0).unwrap();
        r.apply_json(&member("@b:x", "c1", "D", "S1", 1000), 0)
            .unwrap();
        let ch = r
            .apply_json(&member("@b:x", "c1", "D", "S2", 1000), 0)
            .unwrap();
        assert!(matches!(&ch[..], [RoomChange::SessionChanged { .. }]));
        let bad = json!({"type": "org.matrix.msc3401.call.member", "state_key": "@b:x", "sender": "@b:x",
            "origin_server_ts": 2, "content": {"m.calls": [{"m.call_id": "c1", "m.devices": [
                {"device_id": 5, "session_id": "S", "expires_ts": 1000, "feeds": []},
                {"device_id": "E", "session_id": "S", "expires_ts": "soon", "feeds": []},
                {"device_id": "F", "session_id": "S", "expires_ts": 1000, "feeds": []}]}]}});
        r.apply_json(&bad, 0).unwrap();
        let keys: Vec<_> = r
            .participants()
            .keys()
            .map(|k| k.device_id.as_str())
            .collect();
        assert_eq!(keys, vec!["F"]);
    }
}
