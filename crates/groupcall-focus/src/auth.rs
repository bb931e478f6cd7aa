//! Who may call the focus, and whose tracks may go where (issue 11 item 2).
//!
//! One [`Authoriser`] per room. It folds the room's state (`m.call`,
//! `m.call.member`, `m.room.member`) with groupcall-proto's
//! [`RoomCallState`] and the time into the call's live participants, and
//! answers:
//! - [`Authoriser::check_invite`]: may this `m.call.invite` be answered? A
//!   device is admitted only when it is a live participant of the room's
//!   current call: listed in its user's member event for that `conf_id`
//!   with the same session, not expired, the user's room membership `join`,
//!   and the invite came over Olm from that very device (plaintext only when
//!   [`AuthConfig::allow_plaintext`]). Every refusal is a [`Refusal`],
//!   logged and counted ([`Authoriser::counts`]).
//! - [`Authoriser::may_forward`]: may a track of one admitted device go to
//!   another? Only while both are admitted.
//! - [`Authoriser::poll_output`]: the admitted devices that stop being
//!   authorised ([`AuthOutput::Revoked`]: entry removed, expired, session
//!   changed, left the room, kicked, banned, call ended), so that the driver
//!   stops their uploads and subscriptions. Expiry is noticed from time
//!   alone: call [`Authoriser::handle_timeout`] at
//!   [`Authoriser::poll_timeout`].
//!
//! Time is wall-clock POSIX milliseconds (`u64`), because member entries
//! expire at a wall-clock `expires_ts`.
//!
//! [`AllowList`] decides which invitations to rooms the focus accepts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use groupcall_proto::events::{
    CALL_MEMBER, CALL_MEMBER_UNSTABLE, MemberContent, ROOM_MEMBER, StateEvent,
};
use groupcall_proto::room::{LeftReason, RoomCallState, RoomChange};
use groupcall_proto::signalling::CommonFields;
use groupcall_proto::{DeviceKey, ParseError};
use serde_json::Value;
use thiserror::Error;
use tracing::{debug, info};

/// The authorisation settings of the focus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuthConfig {
    /// Answer invites that arrived in plaintext (not Olm-encrypted). Off by
    /// default: a plaintext to-device message proves the sending user (the
    /// homeserver says so) but not the device, which is only claimed in the
    /// content.
    pub allow_plaintext: bool,
}

macro_rules! labelled_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = ($label:literal, $text:literal),)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Error)]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$vm])* #[error($text)] $var,)*
        }
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$var,)*];
            /// A stable short label, for metrics and logs.
            pub fn label(self) -> &'static str {
                match self {
                    $($name::$var => $label,)*
                }
            }
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

labelled_enum!(
    /// Why an invite was refused.
    Refusal {
        /// Not Olm-encrypted, and the config does not allow plaintext.
        Plaintext = ("plaintext", "plaintext invite refused (only Olm-encrypted invites are answered)"),
        /// Encrypted, but the crypto layer could not name the sending device.
        NoSenderDevice = ("no_sender_device", "the sending device of the encrypted invite is unknown"),
        /// The content's `device_id` is not the Olm-authenticated sender device.
        DeviceMismatch = ("device_mismatch", "the invite's device_id is not the device that sent it"),
        /// A plaintext invite without `device_id`.
        MissingDevice = ("missing_device", "the invite names no device"),
        /// No `sender_session_id`.
        MissingSession = ("missing_session", "the invite has no sender_session_id"),
        /// The room has no current call.
        NoCall = ("no_call", "the room has no ongoing call"),
        /// `conf_id` is not the room's current call.
        WrongConfId = ("wrong_conf_id", "conf_id is not the room's current call"),
        /// The sender's room membership is not `join`.
        NotInRoom = ("not_in_room", "the sender is not joined to the room"),
        /// The sender has no live device in the call.
        NotMember = ("not_member", "the sender is not a member of the call"),
        /// The sender is in the call, but not with this device.
        UnknownDevice = ("unknown_device", "the sending device is not listed in the call"),
        /// The device's member entry has expired.
        Expired = ("expired", "the device's call membership has expired"),
        /// `sender_session_id` differs from the device's member entry.
        StaleSession = ("stale_session", "the invite's session is not the device's current session"),
    }
);

labelled_enum!(
    /// Why an admitted device stopped being authorised.
    Revocation {
        /// Its entry was removed from its member event (it left the call).
        Left = ("left", "left the call"),
        /// Its entry expired.
        Expired = ("expired", "call membership expired"),
        /// Its entry now has another session.
        SessionChanged = ("session_changed", "started a new session"),
        /// Its user left the room.
        LeftRoom = ("left_room", "left the room"),
        /// Its user was removed from the room by someone else.
        Kicked = ("kicked", "was kicked from the room"),
        /// Its user was banned from the room.
        Banned = ("banned", "was banned from the room"),
        /// The call ended or another call became the room's current one.
        CallEnded = ("call_ended", "the call ended"),
        /// An admitted focus (a cascade link) that no live participant
        /// names in `m.foci.active` any more.
        FocusUnnamed = ("focus_unnamed", "no live member of the call names this focus any more"),
    }
);

/// What an admitted invite resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// The device, authenticated.
    pub device: DeviceKey,
    /// Its session.
    pub session_id: String,
    /// When its member entry expires (POSIX ms), unless republished
    /// (`u64::MAX` for a focus: it has no entry).
    pub expires_ts: u64,
    /// Admitted as another focus of the call (a cascade link), not as a
    /// participant: it has no member entry, but a live participant names
    /// it in `m.foci.active`.
    pub as_focus: bool,
}

/// An `m.call.invite` to check, as the driver received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InviteCheck<'a> {
    /// The to-device sender (user id, vouched for by the homeserver).
    pub sender: &'a str,
    /// The sending device as authenticated by Olm; `None` when the message
    /// was plaintext or the crypto layer could not name the device.
    pub olm_device: Option<&'a str>,
    /// Whether the message arrived Olm-encrypted.
    pub encrypted: bool,
    /// The content's `conf_id`.
    pub conf_id: &'a str,
    /// The content's `device_id`, if any.
    pub device_id: Option<&'a str>,
    /// The content's `sender_session_id`, if any.
    pub sender_session_id: Option<&'a str>,
}

impl<'a> InviteCheck<'a> {
    /// The check for a parsed `m.call.invite` (its group fields) from
    /// `sender`, received encrypted or not, from the Olm device if known.
    pub fn from_common(
        sender: &'a str,
        olm_device: Option<&'a str>,
        encrypted: bool,
        common: &'a CommonFields,
    ) -> Self {
        Self {
            sender,
            olm_device,
            encrypted,
            conf_id: &common.conf_id,
            device_id: common.device_id.as_deref(),
            sender_session_id: common.sender_session_id.as_deref(),
        }
    }
}

/// What the authoriser tells the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthOutput {
    /// An admitted device is no longer authorised: stop its uploads and
    /// subscriptions and hang up its call.
    Revoked {
        /// The device.
        device: DeviceKey,
        /// The session it was admitted with.
        session_id: String,
        /// Why.
        reason: Revocation,
    },
}

/// Refusals and revocations counted by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthCounts {
    refused: [u64; Refusal::ALL.len()],
    revoked: [u64; Revocation::ALL.len()],
    admitted: u64,
}

impl AuthCounts {
    /// Invites refused for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()]
    }
    /// Admitted devices revoked for `reason`.
    pub fn revoked(&self, reason: Revocation) -> u64 {
        self.revoked[reason.index()]
    }
    /// Invites admitted.
    pub fn admitted(&self) -> u64 {
        self.admitted
    }
    /// Invites refused, all reasons.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }
    /// `(label, count)` of every refusal reason, zeros included.
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::ALL.iter().map(|r| (r.label(), self.refused(*r)))
    }
    /// `(label, count)` of every revocation reason, zeros included.
    pub fn revocations(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Revocation::ALL
            .iter()
            .map(|r| (r.label(), self.revoked(*r)))
    }
}

/// The authorisation state of one room. See the module docs.
#[derive(Debug, Clone)]
pub struct Authoriser {
    config: AuthConfig,
    state: RoomCallState,
    /// Admitted devices and the session each was admitted with.
    admitted: BTreeMap<DeviceKey, String>,
    /// Those of them admitted as other foci of the call (cascade links).
    admitted_foci: BTreeSet<DeviceKey>,
    /// The sender of each user's latest `m.room.member` event: a leave sent
    /// by someone else is a kick.
    membership_senders: BTreeMap<String, String>,
    outputs: VecDeque<AuthOutput>,
    counts: AuthCounts,
}

impl Authoriser {
    /// An authoriser for a room whose state is not known yet.
    pub fn new(config: AuthConfig) -> Self {
        Self {
            config,
            state: RoomCallState::new(),
            admitted: BTreeMap::new(),
            admitted_foci: BTreeSet::new(),
            membership_senders: BTreeMap::new(),
            outputs: VecDeque::new(),
            counts: AuthCounts::default(),
        }
    }

    /// The room's call state as folded so far.
    pub fn room(&self) -> &RoomCallState {
        &self.state
    }

    /// Refusals, revocations and admissions so far.
    pub fn counts(&self) -> &AuthCounts {
        &self.counts
    }

    /// Applies a state event from its client-server JSON. Events of other
    /// types are ignored; malformed ones are refused (nothing changes).
    pub fn handle_state_json(&mut self, event: &Value, now: u64) -> Result<(), ParseError> {
        let ev = StateEvent::from_json(event)?;
        self.handle_state(&ev, now)
    }

    /// Applies a state event.
    pub fn handle_state(&mut self, ev: &StateEvent, now: u64) -> Result<(), ParseError> {
        let changes = self.state.apply(ev, now)?;
        if ev.event_type == ROOM_MEMBER {
            self.membership_senders
                .insert(ev.state_key.clone(), ev.sender.clone());
        }
        self.absorb(changes);
        Ok(())
    }

    /// Advances time: admitted devices whose entries expired are revoked.
    pub fn handle_timeout(&mut self, now: u64) {
        let changes = self.state.tick(now);
        self.absorb(changes);
    }

    /// When to call [`Authoriser::handle_timeout`] next (POSIX ms): the
    /// earliest expiry of an admitted device.
    pub fn poll_timeout(&self) -> Option<u64> {
        let participants = self.state.participants();
        let devices = self
            .admitted
            .keys()
            .filter_map(|k| participants.get(k).map(|p| p.expires_ts));
        // An admitted focus stays while a live participant names it.
        let naming = participants
            .values()
            .filter(|p| {
                p.foci_active.iter().any(|f| {
                    self.admitted_foci
                        .iter()
                        .any(|k| k.user_id == f.user_id && k.device_id == f.device_id)
                })
            })
            .map(|p| p.expires_ts);
        devices.chain(naming).min()
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<AuthOutput> {
        self.outputs.pop_front()
    }

    /// Checks an `m.call.invite`. On success the device is admitted (until
    /// revoked or [`Authoriser::release`]d); a refusal is logged and counted.
    pub fn check_invite(
        &mut self,
        invite: &InviteCheck<'_>,
        now: u64,
    ) -> Result<Admitted, Refusal> {
        self.handle_timeout(now);
        match self.decide(invite) {
            Ok(a) => {
                self.counts.admitted += 1;
                debug!(device = %a.device, session = %a.session_id, "invite admitted");
                self.admitted.insert(a.device.clone(), a.session_id.clone());
                if a.as_focus {
                    info!(device = %a.device, "another focus of the call admitted (cascade link)");
                    self.admitted_foci.insert(a.device.clone());
                } else {
                    self.admitted_foci.remove(&a.device);
                }
                Ok(a)
            }
            Err(r) => {
                self.counts.refused[r.index()] += 1;
                info!(
                    reason = r.label(),
                    sender = invite.sender,
                    olm_device = invite.olm_device,
                    device_id = invite.device_id,
                    conf_id = invite.conf_id,
                    encrypted = invite.encrypted,
                    "invite refused: {r}"
                );
                Err(r)
            }
        }
    }

    fn decide(&self, inv: &InviteCheck<'_>) -> Result<Admitted, Refusal> {
        if !inv.encrypted && !self.config.allow_plaintext {
            return Err(Refusal::Plaintext);
        }
        let device = if inv.encrypted {
            let olm = inv.olm_device.ok_or(Refusal::NoSenderDevice)?;
            if inv.device_id.is_some_and(|d| d != olm) {
                return Err(Refusal::DeviceMismatch);
            }
            olm
        } else {
            inv.device_id.ok_or(Refusal::MissingDevice)?
        };
        let session = inv.sender_session_id.ok_or(Refusal::MissingSession)?;
        let call = self.state.current_call_id().ok_or(Refusal::NoCall)?;
        if call != inv.conf_id {
            return Err(Refusal::WrongConfId);
        }
        if self.state.membership(inv.sender) != Some("join") {
            return Err(Refusal::NotInRoom);
        }
        let key = DeviceKey::new(inv.sender, device);
        match self.state.participants().get(&key) {
            Some(p) if p.session_id == session => Ok(Admitted {
                device: key,
                session_id: p.session_id.clone(),
                expires_ts: p.expires_ts,
                as_focus: false,
            }),
            Some(_) => Err(Refusal::StaleSession),
            // Another focus of the call, named by a live participant.
            None if self.names_focus(&key) => Ok(Admitted {
                device: key,
                session_id: session.to_owned(),
                expires_ts: u64::MAX,
                as_focus: true,
            }),
            None => Err(self.why_not_participant(&key, call)),
        }
    }

    /// A joined user's device in the current call that is not a participant:
    /// its entry expired, or the user is in the call with other devices
    /// only, or not at all.
    fn why_not_participant(&self, key: &DeviceKey, call: &str) -> Refusal {
        let listed = [CALL_MEMBER, CALL_MEMBER_UNSTABLE]
            .into_iter()
            .filter_map(|t| self.state.member_content(&key.user_id, t))
            .any(|c| {
                // Well-formed entries whatever their expiry (all are > 0).
                let (devices, _) = MemberContent::live_devices(c, call, 0);
                devices.iter().any(|d| d.device_id == key.device_id)
            });
        if listed {
            Refusal::Expired
        } else if self
            .state
            .participants()
            .keys()
            .any(|k| k.user_id == key.user_id)
        {
            Refusal::UnknownDevice
        } else {
            Refusal::NotMember
        }
    }

    /// Counts `a` as admitted again (its new call replaced the one whose
    /// end released it).
    pub fn readmit(&mut self, a: &Admitted) {
        self.admitted.insert(a.device.clone(), a.session_id.clone());
        if a.as_focus {
            self.admitted_foci.insert(a.device.clone());
        }
    }

    /// Whether a live participant of the current call names `device` in
    /// `m.foci.active`.
    pub fn names_focus(&self, device: &DeviceKey) -> bool {
        self.state.participants().values().any(|p| {
            p.foci_active
                .iter()
                .any(|f| f.user_id == device.user_id && f.device_id == device.device_id)
        })
    }

    /// The foci the live participants of the current call publish to
    /// (`m.foci.active`), each once, except `me`: the other foci of the call
    /// a focus links with (docs/protocol.md, "Cascading foci").
    pub fn named_foci(&self, me: &DeviceKey) -> BTreeSet<DeviceKey> {
        self.state
            .participants()
            .values()
            .flat_map(|p| p.foci_active.iter())
            .map(|f| DeviceKey::new(f.user_id.clone(), f.device_id.clone()))
            .filter(|k| k != me)
            .collect()
    }

    /// Whether `device` is a live participant of the current call (e.g. the
    /// publisher another focus names for a stream it forwards).
    pub fn is_participant(&self, device: &DeviceKey) -> bool {
        self.state.participants().contains_key(device)
    }

    /// Admits another focus the focus itself calls (a cascade link it
    /// places), when a live participant names it and its user is in the
    /// room; it is revoked like one that called ([`Revocation::FocusUnnamed`]).
    pub fn admit_focus(&mut self, device: &DeviceKey) -> bool {
        if !self.names_focus(device) || self.state.membership(&device.user_id) != Some("join") {
            return false;
        }
        self.admitted.insert(device.clone(), String::new());
        self.admitted_foci.insert(device.clone());
        true
    }

    /// Whether `device` is a live participant of the current call that
    /// publishes to `focus` (names it in `m.foci.active`): the only
    /// publishers another focus may name for the streams it forwards.
    pub fn publishes_to(&self, device: &DeviceKey, focus: &DeviceKey) -> bool {
        self.state.participants().get(device).is_some_and(|p| {
            p.foci_active
                .iter()
                .any(|f| f.user_id == focus.user_id && f.device_id == focus.device_id)
        })
    }

    /// Whether `device` was admitted as another focus of the call.
    pub fn is_admitted_focus(&self, device: &DeviceKey) -> bool {
        self.admitted_foci.contains(device)
    }

    /// Forgets an admitted device whose session with the focus ended by
    /// itself (hangup, dead data channel): no revocation is reported for it
    /// afterwards. It must be admitted again to come back.
    pub fn release(&mut self, device: &DeviceKey) {
        self.admitted.remove(device);
        self.admitted_foci.remove(device);
    }

    /// Whether `device` is admitted with `session_id`.
    pub fn is_admitted(&self, device: &DeviceKey, session_id: &str) -> bool {
        self.admitted.get(device).is_some_and(|s| s == session_id)
    }

    /// The admitted devices and their sessions.
    pub fn admitted(&self) -> impl Iterator<Item = (&DeviceKey, &str)> + '_ {
        self.admitted.iter().map(|(k, s)| (k, s.as_str()))
    }

    /// May a track published by `publisher` be forwarded to `subscriber`?
    /// Only while both are admitted (both live members of this room's
    /// current call).
    pub fn may_forward(&self, publisher: &DeviceKey, subscriber: &DeviceKey) -> bool {
        self.admitted.contains_key(publisher) && self.admitted.contains_key(subscriber)
    }

    fn absorb(&mut self, changes: Vec<RoomChange>) {
        for ch in changes {
            let (device, reason) = match ch {
                RoomChange::DeviceLeft { device, reason, .. } => {
                    let why = match reason {
                        LeftReason::Expired => Revocation::Expired,
                        LeftReason::RoomLeft => self.why_left_room(&device.user_id),
                        LeftReason::CallEnded => Revocation::CallEnded,
                        _ => Revocation::Left,
                    };
                    (device, why)
                }
                RoomChange::SessionChanged { device, .. } => (device, Revocation::SessionChanged),
                _ => continue,
            };
            self.revoke(device, reason);
        }
        // Foci stay admitted while a live participant names them and their
        // user is in the room.
        let unnamed: Vec<(DeviceKey, Revocation)> = self
            .admitted_foci
            .iter()
            .filter_map(|k| {
                if self.state.membership(&k.user_id) != Some("join") {
                    Some((k.clone(), self.why_left_room(&k.user_id)))
                } else if self.state.current_call_id().is_none() {
                    Some((k.clone(), Revocation::CallEnded))
                } else {
                    (!self.names_focus(k)).then(|| (k.clone(), Revocation::FocusUnnamed))
                }
            })
            .collect();
        for (device, reason) in unnamed {
            self.revoke(device, reason);
        }
    }

    fn revoke(&mut self, device: DeviceKey, reason: Revocation) {
        if let Some(session_id) = self.admitted.remove(&device) {
            self.admitted_foci.remove(&device);
            self.counts.revoked[reason.index()] += 1;
            info!(%device, session = %session_id, reason = reason.label(), "authorisation revoked: {reason}");
            self.outputs.push_back(AuthOutput::Revoked {
                device,
                session_id,
                reason,
            });
        }
    }

    fn why_left_room(&self, user: &str) -> Revocation {
        match self.state.membership(user) {
            Some("ban") => Revocation::Banned,
            Some("leave") if self.membership_senders.get(user).is_some_and(|s| s != user) => {
                Revocation::Kicked
            }
            _ => Revocation::LeftRoom,
        }
    }
}

/// Why an allow-list entry was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AllowListError {
    /// A user entry that is not `@localpart:server`.
    #[error("`{0}` is not a user id (@localpart:server)")]
    BadUserId(String),
    /// A server entry that is empty or has characters a server name cannot
    /// have.
    #[error("`{0}` is not a server name")]
    BadServerName(String),
}

/// Whose room invitations the focus accepts: listed users, and every user
/// of listed servers. An empty list accepts nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    users: BTreeSet<String>,
    servers: BTreeSet<String>,
}

impl AllowList {
    /// An allow-list of user ids (`@alice:example.org`, compared exactly)
    /// and server names (`example.org`, `example.org:8448`, compared
    /// ignoring ASCII case, port included).
    pub fn new<U, S>(
        users: impl IntoIterator<Item = U>,
        servers: impl IntoIterator<Item = S>,
    ) -> Result<Self, AllowListError>
    where
        U: AsRef<str>,
        S: AsRef<str>,
    {
        let mut out = Self::default();
        for u in users {
            let u = u.as_ref();
            if split_user_id(u).is_none() {
                return Err(AllowListError::BadUserId(u.to_owned()));
            }
            out.users.insert(u.to_owned());
        }
        for s in servers {
            let s = s.as_ref();
            if !is_server_name(s) {
                return Err(AllowListError::BadServerName(s.to_owned()));
            }
            out.servers.insert(s.to_ascii_lowercase());
        }
        Ok(out)
    }

    /// May the focus join a room `inviter` invited it to? A malformed user
    /// id never may.
    pub fn may_join(&self, inviter: &str) -> bool {
        let Some((_, server)) = split_user_id(inviter) else {
            return false;
        };
        self.users.contains(inviter) || self.servers.contains(&server.to_ascii_lowercase())
    }
}

/// `@localpart:server` split into its parts, both non-empty, the server a
/// plausible server name.
fn split_user_id(id: &str) -> Option<(&str, &str)> {
    let (local, server) = id.strip_prefix('@')?.split_once(':')?;
    (!local.is_empty() && is_server_name(server)).then_some((local, server))
}

/// A plausible server name: non-empty, at most 255 bytes, no whitespace,
/// `@`, `/` or control characters.
fn is_server_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '@' || c == '/')
}

impl fmt::Display for AuthOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthOutput::Revoked {
                device,
                session_id,
                reason,
            } => write!(f, "{device} (session {session_id}) revoked: {reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CALL: &str = "c1";
    const NOW: u64 = 1_000_000;
    const EXP: u64 = NOW + 3_600_000;

    fn member_ev(user: &str, devices: Value) -> Value {
        json!({"type": "org.matrix.msc3401.call.member", "state_key": user, "sender": user,
            "origin_server_ts": 1, "content": {"m.calls": [{"m.call_id": CALL, "m.devices": devices}]}})
    }
    fn dev(id: &str, sess: &str, exp: u64) -> Value {
        json!({"device_id": id, "session_id": sess, "expires_ts": exp, "feeds": [{"purpose": "m.usermedia"}]})
    }
    fn membership(user: &str, sender: &str, m: &str) -> Value {
        json!({"type": "m.room.member", "state_key": user, "sender": sender, "content": {"membership": m}})
    }
    fn call_ev(id: &str, ts: u64, terminated: bool) -> Value {
        let mut c = json!({"m.intent": "m.prompt", "m.type": "m.video"});
        if terminated {
            c["m.terminated"] = json!("call_ended");
        }
        json!({"type": "org.matrix.msc3401.call", "state_key": id, "sender": "@a:x", "origin_server_ts": ts, "content": c})
    }

    /// A room with call c1 and two members: @a:x/A (session SA) and
    /// @b:x/B (session SB), both expiring at EXP.
    fn room(config: AuthConfig) -> Authoriser {
        let mut a = Authoriser::new(config);
        for ev in [
            call_ev(CALL, 10, false),
            membership("@a:x", "@a:x", "join"),
            membership("@b:x", "@b:x", "join"),
            member_ev("@a:x", json!([dev("A", "SA", EXP)])),
            member_ev("@b:x", json!([dev("B", "SB", EXP)])),
        ] {
            a.handle_state_json(&ev, NOW).unwrap();
        }
        a
    }

    fn olm<'a>(user: &'a str, device: &'a str, session: &'a str) -> InviteCheck<'a> {
        InviteCheck {
            sender: user,
            olm_device: Some(device),
            encrypted: true,
            conf_id: CALL,
            device_id: Some(device),
            sender_session_id: Some(session),
        }
    }

    fn key(u: &str, d: &str) -> DeviceKey {
        DeviceKey::new(u, d)
    }

    fn outputs(a: &mut Authoriser) -> Vec<AuthOutput> {
        std::iter::from_fn(|| a.poll_output()).collect()
    }

    fn revoked(user: &str, device: &str, session: &str, reason: Revocation) -> AuthOutput {
        AuthOutput::Revoked {
            device: key(user, device),
            session_id: session.into(),
            reason,
        }
    }

    #[test]
    fn a_live_member_over_olm_is_admitted() {
        let mut a = room(AuthConfig::default());
        let ok = a.check_invite(&olm("@a:x", "A", "SA"), NOW).unwrap();
        assert_eq!(
            ok,
            Admitted {
                device: key("@a:x", "A"),
                session_id: "SA".into(),
                expires_ts: EXP,
                as_focus: false,
            }
        );
        assert!(a.is_admitted(&key("@a:x", "A"), "SA"));
        assert!(!a.is_admitted(&key("@a:x", "A"), "other"));
        assert_eq!(a.counts().admitted(), 1);
        assert_eq!(a.counts().refused_total(), 0);
        // The content may omit device_id: the Olm device is the device.
        let mut inv = olm("@b:x", "B", "SB");
        inv.device_id = None;
        assert!(a.check_invite(&inv, NOW).is_ok());
        assert!(a.may_forward(&key("@a:x", "A"), &key("@b:x", "B")));
        assert!(a.may_forward(&key("@b:x", "B"), &key("@a:x", "A")));
        assert_eq!(a.poll_timeout(), Some(EXP));
        assert!(outputs(&mut a).is_empty());
    }

    /// Each refusal reason, from one room, counted once each.
    #[test]
    fn every_refusal_reason() {
        let mut a = room(AuthConfig::default());
        // @c:x is joined and in the call with device C1 only; @d:x is
        // joined but not in the call; @e:x listed D but left the room; @f:x
        // has an expired entry.
        for ev in [
            membership("@c:x", "@c:x", "join"),
            member_ev("@c:x", json!([dev("C1", "SC", EXP)])),
            membership("@d:x", "@d:x", "join"),
            membership("@e:x", "@e:x", "join"),
            member_ev("@e:x", json!([dev("E", "SE", EXP)])),
            membership("@e:x", "@e:x", "leave"),
            membership("@f:x", "@f:x", "join"),
            member_ev("@f:x", json!([dev("F", "SF", NOW - 1)])),
        ] {
            a.handle_state_json(&ev, NOW).unwrap();
        }
        let base = olm("@a:x", "A", "SA");
        let cases: Vec<(InviteCheck<'_>, Refusal)> = vec![
            (
                InviteCheck {
                    encrypted: false,
                    olm_device: None,
                    ..base
                },
                Refusal::Plaintext,
            ),
            (
                InviteCheck {
                    olm_device: None,
                    ..base
                },
                Refusal::NoSenderDevice,
            ),
            (
                InviteCheck {
                    device_id: Some("B"),
                    ..base
                },
                Refusal::DeviceMismatch,
            ),
            (
                InviteCheck {
                    sender_session_id: None,
                    ..base
                },
                Refusal::MissingSession,
            ),
            (
                InviteCheck {
                    conf_id: "other",
                    ..base
                },
                Refusal::WrongConfId,
            ),
            (olm("@e:x", "E", "SE"), Refusal::NotInRoom),
            (olm("@d:x", "D", "SD"), Refusal::NotMember),
            (olm("@c:x", "C2", "SC"), Refusal::UnknownDevice),
            (olm("@f:x", "F", "SF"), Refusal::Expired),
            (olm("@a:x", "A", "old"), Refusal::StaleSession),
        ];
        for (inv, want) in &cases {
            assert_eq!(a.check_invite(inv, NOW), Err(*want), "{want:?}");
            assert_eq!(a.counts().refused(*want), 1, "{want:?}");
        }
        assert_eq!(a.counts().refused_total(), cases.len() as u64);
        assert_eq!(a.counts().admitted(), 0);
        assert_eq!(a.admitted().count(), 0);
        // Every reason has a distinct label and a sentence.
        let labels: BTreeSet<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Refusal::ALL.len());
        assert_eq!(
            Refusal::StaleSession.to_string(),
            "the invite's session is not the device's current session"
        );
        assert_eq!(
            a.counts().refusals().find(|(l, _)| *l == "stale_session"),
            Some(("stale_session", 1))
        );
    }

    #[test]
    fn a_parsed_invite_is_checked_by_its_group_fields() {
        let mut a = room(AuthConfig::default());
        let content = json!({"version": "1", "call_id": "call1", "party_id": "A",
            "conf_id": CALL, "device_id": "A", "sender_session_id": "SA",
            "dest_session_id": "FOCUS", "seq": 0, "lifetime": 60000,
            "offer": {"type": "offer", "sdp": "v=0"}});
        let msg = groupcall_proto::signalling::Message::parse("m.call.invite", &content).unwrap();
        let inv = InviteCheck::from_common("@a:x", Some("A"), true, &msg.common);
        assert_eq!(inv, olm("@a:x", "A", "SA"));
        assert!(a.check_invite(&inv, NOW).is_ok());
    }

    #[test]
    fn no_call_and_plaintext_rules() {
        let mut a = Authoriser::new(AuthConfig::default());
        a.handle_state_json(&membership("@a:x", "@a:x", "join"), NOW)
            .unwrap();
        assert_eq!(
            a.check_invite(&olm("@a:x", "A", "SA"), NOW),
            Err(Refusal::NoCall)
        );
        // Plaintext allowed: the device is the content's.
        let mut a = room(AuthConfig {
            allow_plaintext: true,
        });
        let plain = InviteCheck {
            encrypted: false,
            olm_device: None,
            ..olm("@a:x", "A", "SA")
        };
        assert_eq!(
            a.check_invite(&plain, NOW).unwrap().device,
            key("@a:x", "A")
        );
        let nameless = InviteCheck {
            device_id: None,
            ..plain
        };
        assert_eq!(a.check_invite(&nameless, NOW), Err(Refusal::MissingDevice));
        // Still only listed devices.
        let spoof = InviteCheck {
            device_id: Some("Z"),
            ..plain
        };
        assert_eq!(a.check_invite(&spoof, NOW), Err(Refusal::UnknownDevice));
        // An encrypted invite is checked against Olm even then.
        let mismatch = InviteCheck {
            device_id: Some("Z"),
            ..olm("@a:x", "A", "SA")
        };
        assert_eq!(a.check_invite(&mismatch, NOW), Err(Refusal::DeviceMismatch));
    }

    #[test]
    fn a_refused_device_does_not_affect_others() {
        let mut a = room(AuthConfig::default());
        a.check_invite(&olm("@a:x", "A", "SA"), NOW).unwrap();
        a.check_invite(&olm("@b:x", "B", "SB"), NOW).unwrap();
        for bad in [
            olm("@b:x", "B", "stale"),
            olm("@a:x", "X", "SA"),
            olm("@z:x", "Z", "SZ"),
        ] {
            assert!(a.check_invite(&bad, NOW).is_err());
        }
        assert!(outputs(&mut a).is_empty());
        assert!(a.is_admitted(&key("@a:x", "A"), "SA"));
        assert!(a.is_admitted(&key("@b:x", "B"), "SB"));
        assert!(a.may_forward(&key("@a:x", "A"), &key("@b:x", "B")));
        assert!(!a.may_forward(&key("@a:x", "A"), &key("@a:x", "X")));
        assert!(!a.may_forward(&key("@z:x", "Z"), &key("@b:x", "B")));
        assert_eq!(a.counts().admitted(), 2);
        assert_eq!(a.counts().refused_total(), 3);
    }

    #[test]
    fn expiry_is_noticed_from_time_alone() {
        let mut a = room(AuthConfig::default());
        // B expires earlier than A.
        a.handle_state_json(&member_ev("@b:x", json!([dev("B", "SB", NOW + 5000)])), NOW)
            .unwrap();
        a.check_invite(&olm("@a:x", "A", "SA"), NOW).unwrap();
        a.check_invite(&olm("@b:x", "B", "SB"), NOW).unwrap();
        assert_eq!(a.poll_timeout(), Some(NOW + 5000));
        a.handle_timeout(NOW + 4999);
        assert!(outputs(&mut a).is_empty());
        a.handle_timeout(NOW + 5000);
        assert_eq!(
            outputs(&mut a),
            vec![revoked("@b:x", "B", "SB", Revocation::Expired)]
        );
        assert!(!a.may_forward(&key("@a:x", "A"), &key("@b:x", "B")));
        assert_eq!(a.poll_timeout(), Some(EXP));
        assert_eq!(a.counts().revoked(Revocation::Expired), 1);
        // Republishing before expiry keeps a device: A refreshed.
        a.handle_state_json(
            &member_ev("@a:x", json!([dev("A", "SA", EXP + 10)])),
            EXP - 1,
        )
        .unwrap();
        a.handle_timeout(EXP);
        assert!(outputs(&mut a).is_empty());
        assert_eq!(a.poll_timeout(), Some(EXP + 10));
    }

    #[test]
    fn leaving_the_call_and_session_change_revoke() {
        let mut a = room(AuthConfig::default());
        a.check_invite(&olm("@a:x", "A", "SA"), NOW).unwrap();
        a.check_invite(&olm("@b:x", "B", "SB"), NOW).unwrap();
        a.handle_state_json(&member_ev("@a:x", json!([])), NOW)
            .unwrap();
        a.handle_state_json(&member_ev("@b:x", json!([dev("B", "SB2", EXP)])), NOW)
            .unwrap();
        assert_eq!(
            outputs(&mut a),
            vec![
                revoked("@a:x", "A", "SA", Revocation::Left),
                revoked("@b:x", "B", "SB", Revocation::SessionChanged)
            ]
        );
        assert_eq!(a.admitted().count(), 0);
        // The new session may call again; the old one may not.
        assert_eq!(
            a.check_invite(&olm("@b:x", "B", "SB"), NOW),
            Err(Refusal::StaleSession)
        );
        assert!(a.check_invite(&olm("@b:x", "B", "SB2"), NOW).is_ok());
    }

    #[test]
    fn leaving_kicked_and_banned_users_are_revoked_with_their_reason() {
        let mut a = room(AuthConfig::default());
        for ev in [
            membership("@c:x", "@c:x", "join"),
            member_ev("@c:x", json!([dev("C", "SC", EXP)])),
        ] {
            a.handle_state_json(&ev, NOW).unwrap();
        }
        for (u, d, s) in [
            ("@a:x", "A", "SA"),
            ("@b:x", "B", "SB"),
            ("@c:x", "C", "SC"),
        ] {
            a.check_invite(&olm(u, d, s), NOW).unwrap();
        }
        a.handle_state_json(&membership("@a:x", "@a:x", "leave"), NOW)
            .unwrap();
        a.handle_state_json(&membership("@b:x", "@mod:x", "leave"), NOW)
            .unwrap();
        a.handle_state_json(&membership("@c:x", "@mod:x", "ban"), NOW)
            .unwrap();
        assert_eq!(
            outputs(&mut a),
            vec![
                revoked("@a:x", "A", "SA", Revocation::LeftRoom),
                revoked("@b:x", "B", "SB", Revocation::Kicked),
                revoked("@c:x", "C", "SC", Revocation::Banned),
            ]
        );
        let c = a.counts();
        assert_eq!(
            (
                c.revoked(Revocation::LeftRoom),
                c.revoked(Revocation::Kicked),
                c.revoked(Revocation::Banned)
            ),
            (1, 1, 1)
        );
    }

    #[test]
    fn the_call_ending_revokes_everyone() {
        let mut a = room(AuthConfig::default());
        a.check_invite(&olm("@a:x", "A", "SA"), NOW).unwrap();
        a.handle_state_json(&call_ev(CALL, 20, true), NOW).unwrap();
        assert_eq!(
            outputs(&mut a),
            vec![revoked("@a:x", "A", "SA", Revocation::CallEnded)]
        );
        assert_eq!(
            a.check_invite(&olm("@a:x", "A", "SA"), NOW),
            Err(Refusal::NoCall)
        );
    }

    #[test]
    fn released_and_unadmitted_devices_are_not_reported() {
        let mut a = room(AuthConfig::default());
        a.check_invite(&olm("@a:x", "A", "SA"), NOW).unwrap();
        a.release(&key("@a:x", "A"));
        assert_eq!(a.poll_timeout(), None);
        // Both leave: A was released, B never admitted.
        a.handle_state_json(&member_ev("@a:x", json!([])), NOW)
            .unwrap();
        a.handle_state_json(&member_ev("@b:x", json!([])), NOW)
            .unwrap();
        assert!(outputs(&mut a).is_empty());
        assert_eq!(a.counts().revocations().map(|(_, n)| n).sum::<u64>(), 0);
    }

    #[test]
    fn bad_state_events_change_nothing() {
        let mut a = room(AuthConfig::default());
        a.check_invite(&olm("@a:x", "A", "SA"), NOW).unwrap();
        let mut spoof = member_ev("@a:x", json!([]));
        spoof["sender"] = json!("@evil:x");
        assert!(a.handle_state_json(&spoof, NOW).is_err());
        assert!(a.handle_state_json(&json!([1]), NOW).is_err());
        assert!(outputs(&mut a).is_empty());
        assert!(a.is_admitted(&key("@a:x", "A"), "SA"));
    }

    #[test]
    fn allow_list() {
        let l = AllowList::new(["@alice:example.org"], ["Trusted.org", "hs.net:8448"]).unwrap();
        assert!(l.may_join("@alice:example.org"));
        assert!(!l.may_join("@bob:example.org"));
        assert!(!l.may_join("@Alice:example.org"));
        assert!(l.may_join("@anyone:trusted.org"));
        assert!(l.may_join("@anyone:TRUSTED.org"));
        assert!(!l.may_join("@anyone:trusted.org.evil"));
        assert!(!l.may_join("@anyone:eviltrusted.org"));
        assert!(l.may_join("@x:hs.net:8448"));
        assert!(!l.may_join("@x:hs.net"));
        for bad in ["", "trusted.org", "@:trusted.org", "@x:", "@x", "alice"] {
            assert!(!l.may_join(bad), "{bad:?}");
        }
        assert!(!AllowList::default().may_join("@alice:example.org"));
        assert_eq!(
            AllowList::new(["alice"], [""; 0]).unwrap_err(),
            AllowListError::BadUserId("alice".into())
        );
        assert_eq!(
            AllowList::new([""; 0], ["bad server"]).unwrap_err(),
            AllowListError::BadServerName("bad server".into())
        );
        assert!(AllowList::new([""; 0], [""]).is_err());
    }

    fn dev_with_focus(id: &str, sess: &str, exp: u64, focus: (&str, &str)) -> Value {
        let mut d = dev(id, sess, exp);
        d["m.foci.active"] = json!([{"user_id": focus.0, "device_id": focus.1}]);
        d
    }

    /// @b:x's entry names @fb:y/FB in `m.foci.active`.
    fn b_publishes_to_fb(a: &mut Authoriser) {
        a.handle_state_json(
            &member_ev(
                "@b:x",
                json!([dev_with_focus("B", "SB", EXP, ("@fb:y", "FB"))]),
            ),
            NOW,
        )
        .unwrap();
    }

    #[test]
    fn another_focus_is_admitted_while_a_live_member_names_it() {
        let mut a = room(AuthConfig::default());
        a.handle_state_json(&membership("@fb:y", "@fb:y", "join"), NOW)
            .unwrap();
        // Nobody names @fb:y/FB yet: it is a stranger.
        assert_eq!(
            a.check_invite(&olm("@fb:y", "FB", "S1"), NOW),
            Err(Refusal::NotMember)
        );
        // @b:x publishes to it (a member of another homeserver's focus).
        b_publishes_to_fb(&mut a);
        assert!(a.names_focus(&key("@fb:y", "FB")));
        assert_eq!(
            a.named_foci(&key("@fa:x", "FA")),
            BTreeSet::from([key("@fb:y", "FB")])
        );
        assert!(a.named_foci(&key("@fb:y", "FB")).is_empty());
        let ok = a.check_invite(&olm("@fb:y", "FB", "S1"), NOW).unwrap();
        assert!(ok.as_focus);
        assert_eq!(ok.expires_ts, u64::MAX);
        assert!(a.is_admitted_focus(&key("@fb:y", "FB")));
        // Forwarding between an admitted member and the focus is allowed.
        a.check_invite(&olm("@a:x", "A", "SA"), NOW).unwrap();
        assert!(a.may_forward(&key("@a:x", "A"), &key("@fb:y", "FB")));
        assert!(a.is_participant(&key("@b:x", "B")));
        assert!(!a.is_participant(&key("@fb:y", "FB")));
        // Plaintext is refused for foci as for clients.
        let mut plain = olm("@fb:y", "FB", "S1");
        plain.encrypted = false;
        plain.olm_device = None;
        assert_eq!(a.check_invite(&plain, NOW), Err(Refusal::Plaintext));
        // Its naming member's entry expires: the focus goes with it.
        assert_eq!(a.poll_timeout(), Some(EXP));
        a.handle_timeout(EXP + 1);
        let outs = outputs(&mut a);
        assert!(outs.contains(&revoked("@fb:y", "FB", "S1", Revocation::FocusUnnamed)));
        assert!(!a.is_admitted_focus(&key("@fb:y", "FB")));
        assert_eq!(a.counts().revoked(Revocation::FocusUnnamed), 1);
    }

    #[test]
    fn an_admitted_focus_is_revoked_when_unnamed_or_out_of_the_room() {
        let mut a = room(AuthConfig::default());
        a.handle_state_json(&membership("@fb:y", "@fb:y", "join"), NOW)
            .unwrap();
        b_publishes_to_fb(&mut a);
        a.check_invite(&olm("@fb:y", "FB", "S1"), NOW).unwrap();
        // @b:x stops naming it (back to the mesh).
        a.handle_state_json(&member_ev("@b:x", json!([dev("B", "SB", EXP)])), NOW)
            .unwrap();
        assert_eq!(
            outputs(&mut a),
            vec![revoked("@fb:y", "FB", "S1", Revocation::FocusUnnamed)]
        );
        // Named again and admitted again; then its user is kicked.
        b_publishes_to_fb(&mut a);
        a.check_invite(&olm("@fb:y", "FB", "S2"), NOW).unwrap();
        a.handle_state_json(&membership("@fb:y", "@a:x", "leave"), NOW)
            .unwrap();
        assert_eq!(
            outputs(&mut a),
            vec![revoked("@fb:y", "FB", "S2", Revocation::Kicked)]
        );
        // A focus out of the room is not admitted.
        assert_eq!(
            a.check_invite(&olm("@fb:y", "FB", "S3"), NOW),
            Err(Refusal::NotInRoom)
        );
    }
}
