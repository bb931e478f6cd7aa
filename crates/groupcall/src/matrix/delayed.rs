//! MSC4140 delayed events through raw HTTP requests (matrix-sdk 0.18 has
//! no API for them).

use std::time::Duration;

use matrix_sdk::reqwest::Method;
use serde_json::{Value, json};
use tracing::{debug, warn};

use super::{MatrixError, MatrixSession};

/// Unstable prefix under which Synapse serves the management endpoints.
const UNSTABLE: [&str; 4] = ["_matrix", "client", "unstable", "org.matrix.msc4140"];
/// Stable prefix of the management endpoints (MSC4140 as merged).
const STABLE: [&str; 3] = ["_matrix", "client", "v1"];
const ATTEMPTS: u32 = 3;

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
}

/// Whether a retry is safe and useful.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// Idempotent request: retry transport errors, 5xx and 429.
    Transient,
    /// Retry only when the request provably never reached the server.
    ConnectOnly,
}

impl MatrixSession {
    /// Whether the homeserver announces MSC4140 delayed events
    /// (`org.matrix.msc4140` in `/versions`' `unstable_features`). The
    /// answer is cached for the session.
    pub async fn supports_delayed_events(&self) -> Result<bool, MatrixError> {
        self.delayed_support
            .get_or_try_init(|| async {
                let (_, body) = self
                    .raw_request(
                        "checking delayed event support",
                        Method::GET,
                        &["_matrix", "client", "versions"],
                        &[],
                        None,
                        Retry::Transient,
                    )
                    .await?;
                let supported = body
                    .pointer("/unstable_features/org.matrix.msc4140")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
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
        let body = self
            .put_state(
                room,
                event_type,
                state_key,
                &content,
                &[("org.matrix.msc4140.delay", delay_ms.to_string())],
            )
            .await?;
        match body.get("delay_id").and_then(Value::as_str) {
            Some(id) => {
                debug!(
                    room,
                    event_type,
                    state_key,
                    delay_ms,
                    delay_id = id,
                    "scheduled delayed state"
                );
                Ok(id.to_owned())
            }
            None => {
                // A server that ignored the delay parameter sent the event
                // right away.
                warn!(room, event_type, response = %body, "homeserver ignored the delay");
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
        let mut unstable: Vec<&str> = UNSTABLE.to_vec();
        unstable.extend(["delayed_events", delay_id, verb]);
        let mut stable: Vec<&str> = STABLE.to_vec();
        stable.extend(["delayed_events", delay_id, verb]);
        let mut legacy: Vec<&str> = UNSTABLE.to_vec();
        legacy.extend(["delayed_events", delay_id]);
        let empty = json!({});
        let legacy_body = json!({ "action": verb });
        let tries: [(&[&str], &Value); 3] = [
            (&unstable, &empty),
            (&stable, &empty),
            (&legacy, &legacy_body),
        ];

        let mut last = None;
        for (segments, body) in tries {
            match self
                .raw_request(
                    &what,
                    Method::POST,
                    segments,
                    &[],
                    Some(body),
                    Retry::Transient,
                )
                .await
            {
                Ok(_) => {
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
        let mut segments: Vec<&str> = UNSTABLE.to_vec();
        segments.push("delayed_events");
        let (_, body) = self
            .raw_request(
                "listing delayed events",
                Method::GET,
                &segments,
                &[],
                None,
                Retry::Transient,
            )
            .await?;
        Ok(body
            .get("delayed_events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default())
    }

    /// `PUT /rooms/{room}/state/{type}/{key}` with optional query
    /// parameters; returns the response JSON.
    pub(crate) async fn put_state(
        &self,
        room: &str,
        event_type: &str,
        state_key: &str,
        content: &Value,
        query: &[(&str, String)],
    ) -> Result<Value, MatrixError> {
        let delayed = !query.is_empty();
        let action = if delayed {
            format!("scheduling delayed {event_type} state in {room}")
        } else {
            format!("sending {event_type} state in {room}")
        };
        // Setting state is idempotent, scheduling is not: retry the latter
        // only when the request cannot have arrived.
        let retry = if delayed {
            Retry::ConnectOnly
        } else {
            Retry::Transient
        };
        let (_, body) = self
            .raw_request(
                &action,
                Method::PUT,
                &[
                    "_matrix", "client", "v3", "rooms", room, "state", event_type, state_key,
                ],
                query,
                Some(content),
                retry,
            )
            .await?;
        Ok(body)
    }

    /// An authenticated request to the homeserver with JSON in and out.
    /// Path segments are percent-encoded.
    pub(super) async fn raw_request(
        &self,
        action: &str,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
        retry: Retry,
    ) -> Result<(u16, Value), MatrixError> {
        let mut url = self.client.homeserver();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| MatrixError::InvalidId {
                    what: "homeserver URL",
                    value: self.client.homeserver().to_string(),
                    message: "cannot be a base URL".to_owned(),
                })?;
            path.pop_if_empty();
            path.extend(segments);
        }
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
        }
        let token = self.client.access_token();
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            let mut request = self
                .client
                .http_client()
                .request(method.clone(), url.clone())
                .timeout(Duration::from_secs(30));
            if let Some(t) = &token {
                request = request.bearer_auth(t);
            }
            if let Some(b) = body {
                request = request
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            let (err, retry_after) = match request.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|s| s.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.text().await.map_err(|e| MatrixError::Http {
                        action: action.to_owned(),
                        message: e.to_string(),
                    })?;
                    if (200..300).contains(&status) {
                        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
                        return Ok((status, json));
                    }
                    let err = MatrixError::from_response(action.to_owned(), status, &text);
                    let retryable = retry == Retry::Transient && err.is_transient();
                    if !retryable {
                        return Err(err);
                    }
                    (err, retry_after)
                }
                Err(e) => {
                    let retryable = retry == Retry::Transient || e.is_connect();
                    let err = MatrixError::Http {
                        action: action.to_owned(),
                        message: e.to_string(),
                    };
                    if !retryable {
                        return Err(err);
                    }
                    (err, None)
                }
            };
            if attempt >= ATTEMPTS {
                return Err(err);
            }
            let wait = retry_after.unwrap_or(delay).min(Duration::from_secs(5));
            warn!(action, attempt, error = %err, ?wait, "request failed; retrying");
            tokio::time::sleep(wait).await;
            delay *= 2;
            attempt += 1;
        }
    }
}

fn is_unrecognized(e: &MatrixError) -> bool {
    matches!(e, MatrixError::Api { status: 404 | 405, errcode, .. } if errcode == "M_UNRECOGNIZED")
}
