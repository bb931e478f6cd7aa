//! MSC4140 delayed events, through typed requests: ruma's
//! `update_delayed_event` for the `{"action": ...}` form, our own typed
//! requests (see `requests`) for the rest.

use matrix_sdk::ruma::api::FeatureFlag;
use matrix_sdk::ruma::api::client::delayed_events::update_delayed_event::unstable as update_legacy;
use serde_json::Value;
use tracing::{debug, warn};

use super::requests::{list_delayed, send_state, update_delayed};
use super::retry::{self, Retry, classify_http};
use super::{MatrixError, MatrixSession};

/// What to do with a scheduled delayed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelayedAction {
    /// Reset its timer to now + its original delay (the "heartbeat").
    Restart,
    /// Never send it.
    Cancel,
    /// Send it right now.
    Send,
}

impl DelayedAction {
    fn as_str(self) -> &'static str {
        match self {
            DelayedAction::Restart => "restart",
            DelayedAction::Cancel => "cancel",
            DelayedAction::Send => "send",
        }
    }

    fn legacy(self) -> update_legacy::UpdateAction {
        match self {
            DelayedAction::Restart => update_legacy::UpdateAction::Restart,
            DelayedAction::Cancel => update_legacy::UpdateAction::Cancel,
            DelayedAction::Send => update_legacy::UpdateAction::Send,
        }
    }
}

impl MatrixSession {
    /// Whether the homeserver announces MSC4140 delayed events
    /// (`org.matrix.msc4140` in `/versions`' `unstable_features`). The
    /// answer is cached for the session.
    pub async fn supports_delayed_events(&self) -> Result<bool, MatrixError> {
        self.delayed_support
            .get_or_try_init(|| async {
                let what = "checking delayed event support";
                let features = retry::REQUEST
                    .run(
                        what,
                        || self.client.unstable_features(),
                        |e| classify_http(e, Retry::Transient),
                    )
                    .await
                    .map_err(|e| MatrixError::http(what, e))?;
                let supported = features.contains(&FeatureFlag::from("org.matrix.msc4140"));
                debug!(supported, "MSC4140 delayed events support");
                Ok(supported)
            })
            .await
            .copied()
    }

    /// Schedules a state event that the homeserver sends after `delay_ms`
    /// unless it is restarted or cancelled first; returns the delay id.
    pub async fn schedule_delayed_state(
        &self,
        room: &str,
        event_type: &str,
        state_key: &str,
        content: Value,
        delay_ms: u64,
    ) -> Result<String, MatrixError> {
        Self::parse_room_id(room)?;
        if !self.supports_delayed_events().await? {
            return Err(MatrixError::DelayedEventsUnsupported);
        }
        let response = self
            .put_state(
                room,
                event_type,
                state_key,
                &content,
                Some(delay_ms),
                &retry::REQUEST,
            )
            .await?;
        match response.delay_id {
            Some(id) => {
                debug!(
                    room,
                    event_type,
                    state_key,
                    delay_ms,
                    delay_id = id,
                    "scheduled delayed state"
                );
                Ok(id)
            }
            None => {
                // A server that ignored the delay parameter sent the event
                // right away.
                warn!(room, event_type, event_id = ?response.event_id, "homeserver ignored the delay");
                Err(MatrixError::DelayedEventsUnsupported)
            }
        }
    }

    /// Resets the timer of a delayed event (now + its original delay).
    pub async fn restart_delayed(&self, delay_id: &str) -> Result<(), MatrixError> {
        self.update_delayed(delay_id, DelayedAction::Restart).await
    }

    /// Cancels a delayed event.
    pub async fn cancel_delayed(&self, delay_id: &str) -> Result<(), MatrixError> {
        self.update_delayed(delay_id, DelayedAction::Cancel).await
    }

    /// Sends a delayed event now.
    pub async fn send_delayed_now(&self, delay_id: &str) -> Result<(), MatrixError> {
        self.update_delayed(delay_id, DelayedAction::Send).await
    }

    /// Applies `action` to a delayed event. Tries the unstable
    /// `.../org.matrix.msc4140/delayed_events/{id}/{action}` endpoint, then
    /// the stable `v1` one, then the older `{"action": ...}` form, as long as
    /// the homeserver answers `M_UNRECOGNIZED`.
    pub async fn update_delayed(
        &self,
        delay_id: &str,
        action: DelayedAction,
    ) -> Result<(), MatrixError> {
        let what = format!("{} delayed event {delay_id}", action.as_str());
        let verb = action.as_str();
        let classify = |e: &matrix_sdk::HttpError| classify_http(e, Retry::Transient);
        let once = retry::once;
        // One request form, retried by the policy (the three forms differ
        // only in their request type).
        macro_rules! send_retried {
            ($request:expr) => {{
                let request = $request;
                retry::REQUEST
                    .run(
                        &what,
                        || {
                            self.client
                                .send(request.clone())
                                .with_request_config(once())
                        },
                        classify,
                    )
                    .await
                    .map(drop)
            }};
        }
        let mut last = None;
        for form in 0..3 {
            let result = match form {
                0 => send_retried!(update_delayed::Unstable {
                    delay_id: delay_id.to_owned(),
                    action: verb,
                }),
                1 => send_retried!(update_delayed::Stable {
                    delay_id: delay_id.to_owned(),
                    action: verb,
                }),
                _ => send_retried!(update_legacy::Request::new(
                    delay_id.to_owned(),
                    action.legacy()
                )),
            };
            match result.map_err(|e| MatrixError::http(&what, e)) {
                Ok(()) => {
                    debug!(delay_id, action = verb, "updated delayed event");
                    return Ok(());
                }
                Err(MatrixError::Api { errcode, .. }) if errcode == "M_NOT_FOUND" => {
                    return Err(MatrixError::DelayedEventNotFound {
                        delay_id: delay_id.to_owned(),
                    });
                }
                Err(e @ MatrixError::Api { .. }) if is_unrecognized(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(MatrixError::DelayedEventsUnsupported))
    }

    /// Our scheduled delayed events as the homeserver lists them.
    pub async fn delayed_events(&self) -> Result<Vec<Value>, MatrixError> {
        let what = "listing delayed events";
        let response = retry::REQUEST
            .run(
                what,
                || {
                    self.client
                        .send(list_delayed::Request)
                        .with_request_config(retry::once())
                },
                |e| classify_http(e, Retry::Transient),
            )
            .await
            .map_err(|e| MatrixError::http(what, e))?;
        Ok(response.delayed_events)
    }

    /// `PUT /rooms/{room}/state/{type}/{key}`, delayed by `delay_ms` when
    /// given (MSC4140), retried as `policy` says.
    pub(crate) async fn put_state(
        &self,
        room: &str,
        event_type: &str,
        state_key: &str,
        content: &Value,
        delay_ms: Option<u64>,
        policy: &retry::Backoff,
    ) -> Result<send_state::Response, MatrixError> {
        let room_id = Self::parse_room_id(room)?;
        let action = if delay_ms.is_some() {
            format!("scheduling delayed {event_type} state in {room}")
        } else {
            format!("sending {event_type} state in {room}")
        };
        let request = send_state::Request {
            room_id,
            event_type: event_type.to_owned(),
            state_key: state_key.to_owned(),
            delay_ms,
            content: content.clone(),
        };
        // Setting state is idempotent, scheduling is not: retry the latter
        // only when the request cannot have been processed.
        let retry = if delay_ms.is_some() {
            Retry::ConnectOnly
        } else {
            Retry::Transient
        };
        policy
            .run(
                &action,
                || {
                    self.client
                        .send(request.clone())
                        .with_request_config(retry::once())
                },
                |e| classify_http(e, retry),
            )
            .await
            .map_err(|e| MatrixError::http(&action, e))
    }
}

fn is_unrecognized(e: &MatrixError) -> bool {
    matches!(e, MatrixError::Api { status: 404 | 405, errcode, .. } if errcode == "M_UNRECOGNIZED")
}
