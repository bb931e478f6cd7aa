//! The sync loop: long-polls `/sync` in a task and turns each response
//! into ordered [`MatrixInput`]s on a channel, surviving homeserver
//! outages with capped exponential backoff.

use std::collections::HashSet;
use std::time::Duration;

use matrix_sdk::config::{SyncSettings, SyncToken};
use matrix_sdk::deserialized_responses::ProcessedToDeviceEvent;
use matrix_sdk::ruma::api::error::ErrorKind;
use matrix_sdk::sync::{State, SyncResponse, Timeline};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, error, info, trace, warn};

use super::{MatrixError, MatrixSession};

/// What the sync loop delivers, in the order the homeserver reported it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum MatrixInput {
    /// A state event of a joined (or just left) room, from the sync's
    /// `state` section or its timeline.
    State {
        /// The room.
        room_id: String,
        /// The full event JSON: `type`, `state_key`, `sender`,
        /// `origin_server_ts`, `content`, `event_id`, `unsigned`, and
        /// `room_id` (added if the sync format left it out).
        event: Value,
    },
    /// A to-device event, decrypted if it came Olm-encrypted.
    ToDevice {
        /// The sending user.
        sender: String,
        /// The sending device, known only for Olm-decrypted events (from
        /// the Olm session, not from the content).
        sender_device: Option<String>,
        /// The (decrypted) event type, e.g. `m.call.invite`.
        event_type: String,
        /// The (decrypted) content.
        content: Value,
        /// Whether the event arrived Olm-encrypted.
        encrypted: bool,
    },
    /// We were invited to a room (reported with every sync that lists the
    /// room under `invite`: once when the invite arrives, and again in a
    /// full initial sync while it is pending). Accept with
    /// [`MatrixSession::join_room`], decline with
    /// [`MatrixSession::leave_room`].
    Invited {
        /// The room.
        room_id: String,
        /// Who invited us: the sender of our `m.room.member` invite event
        /// in the invite's stripped state, if it is there.
        inviter: Option<String>,
    },
    /// A sync succeeded after the loop started (`first == true`) or after
    /// an outage (`first == false`); everything before it in the channel
    /// is caught up with the homeserver.
    Synced {
        /// Whether this was the loop's first successful sync.
        first: bool,
    },
    /// Syncing failed; the loop retries with backoff unless `fatal`.
    /// Sent once per outage.
    Disconnected {
        /// What went wrong.
        error: String,
        /// The loop gave up (e.g. the access token was revoked).
        fatal: bool,
    },
}

/// Settings of [`MatrixSession::start_sync`].
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Long-poll timeout of each `/sync`.
    pub timeout: Duration,
    /// First retry delay after a failed sync.
    pub min_backoff: Duration,
    /// Cap of the exponential retry delay.
    pub max_backoff: Duration,
    /// Capacity of the channel; the loop waits when it is full.
    pub channel_capacity: usize,
    /// Start with a full initial sync (no stored `since` token), so that
    /// the channel first carries the whole current state of every joined
    /// room. With `false`, a loop started again on the same session
    /// continues where the last one stopped and only changes arrive (the
    /// room state is kept in memory: a new process starts with a full
    /// sync either way).
    pub from_scratch: bool,
}

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            channel_capacity: 1024,
            from_scratch: true,
        }
    }
}

/// The running sync task. Dropping the handle stops the loop.
#[derive(Debug)]
pub struct SyncHandle {
    task: JoinHandle<()>,
}

impl SyncHandle {
    /// Stops the loop.
    pub fn stop(self) {
        self.task.abort();
    }

    /// Whether the loop has ended (receiver dropped, fatal error, stop).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// To-device types that are the crypto layer's business, not ours.
const CRYPTO_INTERNAL: &[&str] = &[
    "m.room_key",
    "m.room_key_request",
    "m.room_key.withheld",
    "m.forwarded_room_key",
    "m.secret.request",
    "m.secret.send",
    "m.dummy",
];

impl MatrixSession {
    /// Spawns the sync loop on the current tokio runtime and returns its
    /// handle and the channel of inputs.
    ///
    /// Within one sync response, room state comes first (per room: the
    /// `state` section, then the timeline's state events in order), then
    /// to-device events in the order the homeserver sent them.
    pub fn start_sync(&self, options: SyncOptions) -> (SyncHandle, mpsc::Receiver<MatrixInput>) {
        let (tx, rx) = mpsc::channel(options.channel_capacity.max(1));
        let session = self.clone();
        let task = tokio::spawn(async move { session.sync_loop(options, tx).await });
        (SyncHandle { task }, rx)
    }

    async fn sync_loop(self, options: SyncOptions, tx: mpsc::Sender<MatrixInput>) {
        let mut token: Option<String> = None;
        // The one retry policy's schedule (the loop itself never gives up).
        let backoff = super::retry::Backoff {
            first: options.min_backoff,
            max_delay: options.max_backoff,
            attempts: None,
            budget: None,
        };
        let mut failures = 0u32;
        let mut first = true;
        let mut outage = false;
        info!(user_id = %self.user_id, "sync loop started");
        loop {
            // Right after start or an outage, return at once so that
            // `Synced` reports the (re)connection without a long poll.
            let timeout = if first || outage {
                Duration::ZERO
            } else {
                options.timeout
            };
            let mut settings = SyncSettings::new().timeout(timeout);
            settings = match &token {
                Some(t) => settings.token(t.clone()),
                None if options.from_scratch => settings.token(SyncToken::NoToken),
                None => settings,
            };
            match self.client.sync_once(settings).await {
                Ok(response) => {
                    token = Some(response.next_batch.clone());
                    failures = 0;
                    if outage {
                        info!(user_id = %self.user_id, "sync recovered");
                    }
                    if deliver(&tx, response, self.user_id.as_str()).await.is_err() {
                        break;
                    }
                    if (first || outage) && tx.send(MatrixInput::Synced { first }).await.is_err() {
                        break;
                    }
                    first = false;
                    outage = false;
                }
                Err(e) => {
                    let fatal =
                        matches!(e.client_api_error_kind(), Some(ErrorKind::UnknownToken(_)));
                    let err = MatrixError::sdk("syncing", e);
                    if fatal {
                        error!(user_id = %self.user_id, error = %err, "sync stopped: access token no longer valid");
                        let _ = tx
                            .send(MatrixInput::Disconnected {
                                error: err.to_string(),
                                fatal: true,
                            })
                            .await;
                        break;
                    }
                    if !outage {
                        warn!(user_id = %self.user_id, error = %err, "sync failed; retrying with backoff");
                        outage = true;
                        let sent = tx
                            .send(MatrixInput::Disconnected {
                                error: err.to_string(),
                                fatal: false,
                            })
                            .await;
                        if sent.is_err() {
                            break;
                        }
                    } else {
                        debug!(error = %err, retry_in = ?backoff.delay(failures + 1), "sync still failing");
                    }
                    failures += 1;
                    tokio::time::sleep(backoff.delay(failures)).await;
                }
            }
        }
        info!(user_id = %self.user_id, "sync loop ended");
    }
}

/// Sends the inputs of one sync response; `Err` when the receiver is gone.
async fn deliver(
    tx: &mpsc::Sender<MatrixInput>,
    response: SyncResponse,
    own_user_id: &str,
) -> Result<(), ()> {
    let SyncResponse {
        rooms, to_device, ..
    } = response;
    for (room_id, invited) in &rooms.invited {
        let events: Vec<Value> = invited
            .invite_state
            .events
            .iter()
            .filter_map(|raw| raw.deserialize_as::<Value>().ok())
            .collect();
        tx.send(MatrixInput::Invited {
            room_id: room_id.to_string(),
            inviter: inviter(&events, own_user_id),
        })
        .await
        .map_err(|_| ())?;
    }
    let joined = rooms
        .joined
        .into_iter()
        .map(|(id, r)| (id, r.state, r.timeline));
    let left = rooms
        .left
        .into_iter()
        .map(|(id, r)| (id, r.state, r.timeline));
    for (room_id, state, timeline) in joined.chain(left) {
        for event in room_state_events(room_id.as_str(), state, timeline) {
            tx.send(MatrixInput::State {
                room_id: room_id.to_string(),
                event,
            })
            .await
            .map_err(|_| ())?;
        }
    }
    for ev in to_device {
        if let Some(input) = to_device_input(ev) {
            tx.send(input).await.map_err(|_| ())?;
        }
    }
    Ok(())
}

/// The room's state events in the order to apply them, each once: the
/// `state` section (the state at the start of the timeline) then the
/// timeline's state events; or with MSC4222 the timeline's state events
/// then `state_after` (the state at its end).
fn room_state_events(room_id: &str, state: State, timeline: Timeline) -> Vec<Value> {
    let timeline_state: Vec<Value> = timeline
        .events
        .iter()
        .filter_map(|ev| ev.raw().deserialize_as::<Value>().ok())
        .filter(|v| v.get("state_key").is_some())
        .collect();
    let in_timeline: HashSet<&str> = timeline_state
        .iter()
        .filter_map(|v| v.get("event_id").and_then(Value::as_str))
        .collect();
    let (after, section) = match state {
        State::Before(events) => (false, events),
        State::After(events) => (true, events),
    };
    // Events the timeline carries are applied in its order, once.
    let section: Vec<Value> = section
        .iter()
        .filter_map(|raw| raw.deserialize_as::<Value>().ok())
        .filter(|v| {
            v.get("event_id")
                .and_then(Value::as_str)
                .is_none_or(|id| !in_timeline.contains(id))
        })
        .collect();
    // MSC4222 `state_after`: the room's state at the end of the timeline;
    // the timeline's state events (the changes as they happened) first,
    // then the state after them, which wins. `state`: the state at the
    // start of the timeline, then the timeline (after a fork in the room
    // DAG it may hold state older than what an earlier sync gave: the core
    // orders member events by their time).
    let (mut out, then) = if after {
        (timeline_state, section)
    } else {
        (section, timeline_state)
    };
    out.extend(then);
    with_room_id(out, room_id)
}

/// Names the room in each event (sync leaves it out).
fn with_room_id(mut events: Vec<Value>, room_id: &str) -> Vec<Value> {
    for v in &mut events {
        if let Some(obj) = v.as_object_mut() {
            obj.entry("room_id")
                .or_insert_with(|| Value::String(room_id.to_owned()));
        }
    }
    events
}

/// The sender of the `m.room.member` event that invites `own_user_id`,
/// among a room's stripped invite state.
fn inviter(invite_state: &[Value], own_user_id: &str) -> Option<String> {
    invite_state
        .iter()
        .find(|v| {
            v.get("type").and_then(Value::as_str) == Some("m.room.member")
                && v.get("state_key").and_then(Value::as_str) == Some(own_user_id)
                && v.pointer("/content/membership").and_then(Value::as_str) == Some("invite")
        })
        .and_then(|v| v.get("sender").and_then(Value::as_str))
        .map(str::to_owned)
}

fn to_device_input(ev: ProcessedToDeviceEvent) -> Option<MatrixInput> {
    let (raw, info) = match ev {
        ProcessedToDeviceEvent::Decrypted {
            raw,
            encryption_info,
        } => (raw, Some(encryption_info)),
        ProcessedToDeviceEvent::PlainText(raw) => (raw, None),
        ProcessedToDeviceEvent::UnableToDecrypt {
            encrypted_event,
            utd_info,
        } => {
            let sender = encrypted_event
                .get_field::<String>("sender")
                .ok()
                .flatten()
                .unwrap_or_default();
            warn!(sender, reason = ?utd_info, "dropping a to-device event we could not decrypt");
            return None;
        }
        ProcessedToDeviceEvent::Invalid(raw) => {
            debug!(event = %raw.json().get(), "dropping an invalid to-device event");
            return None;
        }
    };
    let mut value = match raw.deserialize_as::<Value>() {
        Ok(v) => v,
        Err(e) => {
            debug!(error = %e, "dropping an unparsable to-device event");
            return None;
        }
    };
    let event_type = value.get("type").and_then(Value::as_str)?.to_owned();
    if CRYPTO_INTERNAL.contains(&event_type.as_str()) {
        trace!(event_type, "skipping crypto-internal to-device event");
        return None;
    }
    let content = value
        .get_mut("content")
        .map(Value::take)
        .unwrap_or(Value::Object(Default::default()));
    let raw_sender = value
        .get("sender")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Some(match info {
        Some(info) => MatrixInput::ToDevice {
            sender: info.sender.to_string(),
            sender_device: info.sender_device.map(|d| d.to_string()),
            event_type,
            content,
            encrypted: true,
        },
        None => MatrixInput::ToDevice {
            sender: raw_sender,
            sender_device: None,
            event_type,
            content,
            encrypted: false,
        },
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use matrix_sdk::deserialized_responses::TimelineEvent;
    use matrix_sdk::ruma::serde::Raw;
    use serde_json::json;

    use super::*;

    fn state(id: &str, ty: &str, key: &str) -> Value {
        json!({
            "type": ty, "state_key": key, "event_id": id, "sender": "@a:x",
            "origin_server_ts": 1, "content": {},
        })
    }

    fn timeline(events: &[Value]) -> Timeline {
        Timeline {
            events: events
                .iter()
                .map(|e| TimelineEvent::from_plaintext(Raw::new(e).unwrap().cast_unchecked()))
                .collect(),
            ..Timeline::default()
        }
    }

    #[test]
    fn state_before_the_timeline_then_the_timeline() {
        let s1 = state("$1", "m.room.member", "@a:x");
        let s2 = state("$2", CALL_MEMBER, "@a:x");
        let s4 = state("$4", CALL_MEMBER, "@b:x");
        let section = vec![
            Raw::new(&s1).unwrap().cast_unchecked(),
            Raw::new(&s4).unwrap().cast_unchecked(),
        ];
        let out = room_state_events(
            "!r:x",
            State::Before(section),
            timeline(&[s2.clone(), s4.clone()]),
        );
        let ids: Vec<&str> = out
            .iter()
            .map(|v| v["event_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["$1", "$2", "$4"]);
    }

    #[test]
    fn timeline_then_the_state_after_it_without_duplicates() {
        let s1 = state("$1", "m.room.member", "@a:x");
        let s2 = state("$2", CALL_MEMBER, "@a:x");
        let message = json!({
            "type": "m.room.message", "event_id": "$3", "sender": "@a:x",
            "origin_server_ts": 2, "content": { "body": "hi" },
        });
        let s4 = state("$4", CALL_MEMBER, "@b:x");
        let section = vec![
            Raw::new(&s1).unwrap().cast_unchecked(),
            // state_after repeats the timeline's final state: skipped.
            Raw::new(&s4).unwrap().cast_unchecked(),
        ];
        let out = room_state_events(
            "!r:x",
            State::After(section),
            timeline(&[s2.clone(), message, s4.clone()]),
        );
        let ids: Vec<&str> = out
            .iter()
            .map(|v| v["event_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["$2", "$4", "$1"]);
        assert!(out.iter().all(|v| v["room_id"] == "!r:x"));
    }

    const CALL_MEMBER: &str = "org.matrix.msc3401.call.member";

    #[test]
    fn plaintext_to_device_keeps_sender_and_content() {
        let raw = Raw::new(&json!({
            "type": "m.call.invite", "sender": "@a:x", "content": { "call_id": "c" },
        }))
        .unwrap()
        .cast_unchecked();
        let input = to_device_input(ProcessedToDeviceEvent::PlainText(raw)).unwrap();
        assert_eq!(
            input,
            MatrixInput::ToDevice {
                sender: "@a:x".to_owned(),
                sender_device: None,
                event_type: "m.call.invite".to_owned(),
                content: json!({ "call_id": "c" }),
                encrypted: false,
            }
        );
    }

    #[test]
    fn inviter_is_the_sender_of_our_invite() {
        let events = [
            json!({"type": "m.room.create", "state_key": "", "sender": "@c:x", "content": {}}),
            json!({"type": "m.room.member", "state_key": "@c:x", "sender": "@c:x",
                   "content": {"membership": "join"}}),
            json!({"type": "m.room.member", "state_key": "@bot:x", "sender": "@a:x",
                   "content": {"membership": "invite"}}),
        ];
        assert_eq!(inviter(&events, "@bot:x").as_deref(), Some("@a:x"));
        assert_eq!(inviter(&events, "@other:x"), None);
        assert_eq!(inviter(&events[..2], "@bot:x"), None);
    }

    #[test]
    fn crypto_internal_to_device_is_skipped() {
        let raw = Raw::new(&json!({ "type": "m.dummy", "sender": "@a:x", "content": {} }))
            .unwrap()
            .cast_unchecked();
        assert!(to_device_input(ProcessedToDeviceEvent::PlainText(raw)).is_none());
    }
}
