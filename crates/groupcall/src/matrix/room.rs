//! Room helpers: creating call rooms, joining, reading and writing state.

use matrix_sdk::deserialized_responses::RawAnySyncOrStrippedState;
use matrix_sdk::ruma::api::client::membership::leave_room;
use matrix_sdk::ruma::api::client::room::create_room::v3::{
    Request as CreateRoomRequest, RoomPreset,
};
use matrix_sdk::ruma::api::client::state::get_state_events;
use matrix_sdk::ruma::events::StateEventType;
use matrix_sdk::ruma::events::room::power_levels::UserPowerLevel;
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{OwnedUserId, RoomOrAliasId};
use serde_json::{Value, json};
use tracing::{debug, info};

use super::retry::{REQUEST, Retry, STATE, classify_http, classify_matrix, once};
use super::{
    CALL_EVENT_TYPE, CALL_EVENT_TYPE_STABLE, CALL_MEMBER_EVENT_TYPE, CALL_MEMBER_EVENT_TYPE_STABLE,
    MatrixError, MatrixSession,
};

/// Options of [`MatrixSession::create_call_room`].
#[derive(Debug, Clone, Default)]
pub struct CreateRoomOptions {
    /// Room name.
    pub name: Option<String>,
    /// Users to invite (full user ids).
    pub invite: Vec<String>,
    /// Turn on Megolm room encryption (`m.room.encryption`).
    pub encrypted: bool,
    /// Public room (anyone on the server may join without invite);
    /// otherwise a private, invite-only room.
    pub public: bool,
}

impl MatrixSession {
    /// Creates a room in which every member (power level 0) may send the
    /// MSC3401 call state events (`org.matrix.msc3401.call` and
    /// `org.matrix.msc3401.call.member`, and their stable `m.call*` names).
    /// Returns the room id. Not retried (a retry of a request that did
    /// arrive would make a second room).
    pub async fn create_call_room(
        &self,
        options: CreateRoomOptions,
    ) -> Result<String, MatrixError> {
        let invite = options
            .invite
            .iter()
            .map(|u| Self::parse_user_id(u))
            .collect::<Result<Vec<OwnedUserId>, _>>()?;

        // Synapse merges the override shallowly: `events` replaces the
        // default map, so repeat the defaults we want to keep.
        let power_levels = json!({
            "events": {
                "m.room.name": 50,
                "m.room.power_levels": 100,
                "m.room.history_visibility": 100,
                "m.room.canonical_alias": 50,
                "m.room.avatar": 50,
                "m.room.tombstone": 100,
                "m.room.server_acl": 100,
                "m.room.encryption": 100,
                CALL_EVENT_TYPE: 0,
                CALL_MEMBER_EVENT_TYPE: 0,
                CALL_EVENT_TYPE_STABLE: 0,
                CALL_MEMBER_EVENT_TYPE_STABLE: 0,
            }
        });
        let mut request = CreateRoomRequest::new();
        request.name = options.name.clone();
        request.invite = invite;
        request.preset = Some(if options.public {
            RoomPreset::PublicChat
        } else {
            RoomPreset::PrivateChat
        });
        request.power_level_content_override = Some(raw_json(&power_levels)?);
        if options.encrypted {
            request.initial_state.push(raw_json(&json!({
                "type": "m.room.encryption",
                "state_key": "",
                "content": { "algorithm": "m.megolm.v1.aes-sha2" },
            }))?);
        }
        let room = self
            .client
            .create_room(request)
            .await
            .map_err(|e| MatrixError::sdk("creating a call room", e))?;
        info!(room_id = %room.room_id(), encrypted = options.encrypted, "created call room");
        Ok(room.room_id().to_string())
    }

    /// Joins a room by id (`!...`) or alias (`#...`) and returns its id.
    pub async fn join_room(&self, id_or_alias: &str) -> Result<String, MatrixError> {
        let target = <&RoomOrAliasId>::try_from(id_or_alias)
            .map_err(|e| MatrixError::invalid("room id or alias", id_or_alias, e))?;
        let what = format!("joining {id_or_alias}");
        // Joining is idempotent: retried like any request.
        let room = REQUEST
            .run(
                &what,
                || async {
                    self.client
                        .join_room_by_id_or_alias(target, &[])
                        .await
                        .map_err(|e| MatrixError::sdk(what.clone(), e))
                },
                classify_matrix,
            )
            .await?;
        info!(room_id = %room.room_id(), "joined room");
        Ok(room.room_id().to_string())
    }

    /// Leaves a room: a plain `POST /rooms/{id}/leave`, so it works on a
    /// session that has not synced the room (e.g. just logged in again).
    /// Leaving is idempotent: transient failures are retried.
    pub async fn leave_room(&self, room: &str) -> Result<(), MatrixError> {
        let room_id = Self::parse_room_id(room)?;
        let what = format!("leaving {room}");
        let request = leave_room::v3::Request::new(room_id);
        REQUEST
            .run(
                &what,
                || {
                    self.client
                        .send(request.clone())
                        .with_request_config(once())
                },
                |e| classify_http(e, Retry::Transient),
            )
            .await
            .map_err(|e| MatrixError::http(what.clone(), e))?;
        info!(room_id = room, "left room");
        Ok(())
    }

    /// All state events of `event_type` (every state key) as the local
    /// store knows them from sync: full event JSON with `type`,
    /// `state_key`, `sender`, `origin_server_ts`, `content`.
    ///
    /// Works with any type string, e.g. `org.matrix.msc3401.call.member`,
    /// `m.call.member` or `m.room.member`; only events of exactly that type
    /// are returned. Empty until the room's state has been synced; see
    /// [`MatrixSession::fetch_room_state`] for the homeserver's view.
    ///
    /// Caveat of matrix-sdk 0.18: its store keeps `m.call.member` and
    /// `org.matrix.msc3401.call.member` as one type, so when one user has
    /// both, only the newer of the two is known here (the sync channel
    /// delivers both).
    pub async fn room_state(
        &self,
        room: &str,
        event_type: &str,
    ) -> Result<Vec<Value>, MatrixError> {
        let r = self.room(room)?;
        let events = r
            .get_state_events(StateEventType::from(event_type))
            .await
            .map_err(|e| MatrixError::sdk(format!("reading {event_type} state of {room}"), e))?;
        let mut out = Vec::with_capacity(events.len());
        for ev in events {
            let parsed = match ev {
                RawAnySyncOrStrippedState::Sync(raw) => raw.deserialize_as::<Value>(),
                RawAnySyncOrStrippedState::Stripped(raw) => raw.deserialize_as::<Value>(),
            };
            match parsed {
                // ruma files `m.call.member` and its unstable name under one
                // type: keep only events of exactly the asked type.
                Ok(v) if v.get("type").and_then(Value::as_str) != Some(event_type) => {}
                Ok(mut v) => {
                    if let Some(obj) = v.as_object_mut() {
                        obj.entry("room_id").or_insert_with(|| json!(room));
                    }
                    out.push(v);
                }
                Err(e) => debug!(error = %e, "skipping unparsable state event"),
            }
        }
        Ok(out)
    }

    /// All state events of `event_type` in the room's current state, asked
    /// from the homeserver (`GET /rooms/{id}/state`), not from the local
    /// store. Useful right after joining, before the first sync.
    pub async fn fetch_room_state(
        &self,
        room: &str,
        event_type: &str,
    ) -> Result<Vec<Value>, MatrixError> {
        self.fetch_room_states(room, &[event_type]).await
    }

    /// The state events of each of `event_types` in the room's current
    /// state, from one `GET /rooms/{id}/state`: all events of the first
    /// type, then all of the second, and so on (the homeserver's order
    /// within a type). A type listed twice is returned once.
    pub async fn fetch_room_states(
        &self,
        room: &str,
        event_types: &[&str],
    ) -> Result<Vec<Value>, MatrixError> {
        let room_id = Self::parse_room_id(room)?;
        let what = format!("fetching the state of {room}");
        let request = get_state_events::v3::Request::new(room_id);
        let response = REQUEST
            .run(
                &what,
                || {
                    self.client
                        .send(request.clone())
                        .with_request_config(once())
                },
                |e| classify_http(e, Retry::Transient),
            )
            .await
            .map_err(|e| MatrixError::http(what.clone(), e))?;
        let events: Vec<Value> = response
            .room_state
            .iter()
            .filter_map(|raw| raw.deserialize_as::<Value>().ok())
            .collect();
        let mut out = Vec::new();
        for (i, ty) in event_types.iter().enumerate() {
            if event_types[..i].contains(ty) {
                continue;
            }
            out.extend(
                events
                    .iter()
                    .filter(|v| v.get("type").and_then(Value::as_str) == Some(*ty))
                    .cloned(),
            );
        }
        Ok(out)
    }

    /// Sends a state event with raw JSON content under exactly the given
    /// type; returns its event id.
    ///
    /// A typed request of our own (`requests::send_state`), not ruma's:
    /// ruma treats `m.call.member` as an alias of
    /// `org.matrix.msc3401.call.member` and would put the unstable name on
    /// the wire. Transient failures are retried (4 attempts, 200 ms doubling).
    pub async fn send_state(
        &self,
        room: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
    ) -> Result<String, MatrixError> {
        let event_id = self
            .put_state(room, event_type, state_key, &content, None, &REQUEST)
            .await?
            .event_id
            .unwrap_or_default();
        debug!(room, event_type, state_key, event_id, "sent state");
        Ok(event_id)
    }

    /// Like [`MatrixSession::send_state`], but keeps retrying transient
    /// failures for longer ([`STATE`], ~15 s): for publishing our call
    /// membership, which everything else waits for.
    pub(crate) async fn publish_state(
        &self,
        room: &str,
        event_type: &str,
        state_key: &str,
        content: &Value,
    ) -> Result<(), MatrixError> {
        self.put_state(room, event_type, state_key, content, None, &STATE)
            .await
            .map(drop)
    }

    /// Whether our power level lets us send state events of `event_type`
    /// in the room, according to the locally synced power levels.
    pub async fn can_send_state(&self, room: &str, event_type: &str) -> Result<bool, MatrixError> {
        Ok(self.state_permission(room, event_type).await?.0)
    }

    /// Like [`MatrixSession::can_send_state`], but a refusal is a clear
    /// [`MatrixError::NotPermitted`] (to report before joining a call).
    pub async fn ensure_can_send_state(
        &self,
        room: &str,
        event_type: &str,
    ) -> Result<(), MatrixError> {
        let (ok, ours, required) = self.state_permission(room, event_type).await?;
        if ok {
            Ok(())
        } else {
            Err(MatrixError::NotPermitted {
                room: room.to_owned(),
                event_type: event_type.to_owned(),
                ours,
                required,
            })
        }
    }

    async fn state_permission(
        &self,
        room: &str,
        event_type: &str,
    ) -> Result<(bool, i64, i64), MatrixError> {
        let r = self.room(room)?;
        let levels = r.power_levels().await.map_err(|e| {
            MatrixError::sdk(format!("reading the power levels of {room}"), e.into())
        })?;
        let state_type = StateEventType::from(event_type);
        let ok = levels.user_can_send_state(&self.user_id, state_type.clone());
        let ours = match levels.for_user(&self.user_id) {
            UserPowerLevel::Infinite => i64::MAX,
            UserPowerLevel::Int(i) => i.into(),
            _ => i64::MAX,
        };
        let required = levels.for_state(state_type).into();
        Ok((ok, ours, required))
    }
}

fn raw_json<T>(value: &Value) -> Result<Raw<T>, MatrixError> {
    Raw::new(value)
        .map(Raw::cast_unchecked)
        .map_err(|e| MatrixError::invalid("JSON", &value.to_string(), e))
}
