//! Typed errors of the Matrix transport.

use std::path::PathBuf;

use matrix_sdk::ruma::api::error::{ErrorBody, ErrorKind};

/// Errors of the Matrix transport.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MatrixError {
    /// The homeserver refused the user name / password pair.
    #[error("login as `{user}` on {homeserver} failed: wrong user name or password")]
    WrongPassword {
        /// The user that tried to log in.
        user: String,
        /// The homeserver asked.
        homeserver: String,
    },
    /// The homeserver answered `M_FORBIDDEN`.
    #[error("{action}: forbidden by the homeserver: {message}")]
    Forbidden {
        /// What we tried to do.
        action: String,
        /// The homeserver's explanation.
        message: String,
    },
    /// Our power level in the room is too low for an event type.
    #[error(
        "not allowed to send `{event_type}` in {room}: our power level is {ours}, the room \
         requires {required}; ask a room admin to lower the level for this event type"
    )]
    NotPermitted {
        /// The room.
        room: String,
        /// The event type.
        event_type: String,
        /// Our power level.
        ours: i64,
        /// The level required for the event type.
        required: i64,
    },
    /// The room is not known locally (not joined, or not synced yet).
    #[error("room `{room}` is unknown to this client (not joined, or not synced yet)")]
    UnknownRoom {
        /// The room id or alias as given.
        room: String,
    },
    /// The homeserver answered with a Matrix error other than the above.
    #[error("{action}: the homeserver answered HTTP {status} {errcode}: {message}")]
    Api {
        /// What we tried to do.
        action: String,
        /// HTTP status code.
        status: u16,
        /// The Matrix `errcode`, e.g. `M_NOT_FOUND` (empty if none).
        errcode: String,
        /// The homeserver's explanation.
        message: String,
    },
    /// The homeserver could not be reached (connection refused, timeout,
    /// broken response).
    #[error("{action}: could not talk to the homeserver: {message}")]
    Http {
        /// What we tried to do.
        action: String,
        /// What went wrong.
        message: String,
    },
    /// A user id, room id, alias or URL that does not parse.
    #[error("invalid {what} `{value}`: {message}")]
    InvalidId {
        /// Kind of identifier.
        what: &'static str,
        /// The value given.
        value: String,
        /// The parser's complaint.
        message: String,
    },
    /// `restore` found no stored session.
    #[error("no stored Matrix session in {dir}: log in first")]
    NoSession {
        /// The data directory.
        dir: PathBuf,
    },
    /// The data directory belongs to another account.
    #[error(
        "data directory {dir} holds the session of {stored}, not {requested}: use another \
         directory per account"
    )]
    SessionMismatch {
        /// The data directory.
        dir: PathBuf,
        /// The account stored there.
        stored: String,
        /// The account asked for.
        requested: String,
    },
    /// Reading or writing local files failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What we tried.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Some recipients of a to-device message could not be reached.
    #[error("to-device `{event_type}` not delivered to {failed:?}: {reason}")]
    ToDeviceFailed {
        /// The event type.
        event_type: String,
        /// `(user_id, device_id)` of the recipients that did not get it.
        failed: Vec<(String, String)>,
        /// Why.
        reason: String,
    },
    /// The homeserver does not offer MSC4140 delayed events.
    #[error(
        "the homeserver does not support delayed events (MSC4140; Synapse needs \
         `max_event_delay_duration` in its config)"
    )]
    DelayedEventsUnsupported,
    /// The delayed event is not (or no longer) scheduled.
    #[error("delayed event `{delay_id}` not found (already sent, cancelled or never scheduled)")]
    DelayedEventNotFound {
        /// The delay id.
        delay_id: String,
    },
    /// Any other error of matrix-sdk (store, crypto, ...).
    #[error("{action}: {source}")]
    Sdk {
        /// What we tried to do.
        action: String,
        /// The SDK's error.
        #[source]
        source: Box<matrix_sdk::Error>,
    },
}

impl MatrixError {
    /// Whether retrying the same request later may succeed (transport
    /// errors, 5xx, rate limiting).
    pub fn is_transient(&self) -> bool {
        match self {
            MatrixError::Http { .. } => true,
            MatrixError::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    pub(crate) fn sdk(action: impl Into<String>, e: matrix_sdk::Error) -> MatrixError {
        let action = action.into();
        match e {
            matrix_sdk::Error::Http(h) => MatrixError::http(action, *h),
            other => MatrixError::Sdk {
                action,
                source: Box::new(other),
            },
        }
    }

    pub(crate) fn http(action: impl Into<String>, e: matrix_sdk::HttpError) -> MatrixError {
        let action = action.into();
        if let Some(api) = e.as_client_api_error() {
            let status = api.status_code.as_u16();
            let (errcode, message) = match &api.body {
                ErrorBody::Standard(std) => (std.kind.errcode().to_string(), std.message.clone()),
                ErrorBody::Json(v) => (
                    v.get("errcode")
                        .and_then(|c| c.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                    v.to_string(),
                ),
                ErrorBody::NotJson { bytes, .. } => {
                    (String::new(), String::from_utf8_lossy(bytes).into_owned())
                }
            };
            if matches!(api.error_kind(), Some(ErrorKind::Forbidden)) {
                return MatrixError::Forbidden { action, message };
            }
            return MatrixError::Api {
                action,
                status,
                errcode,
                message,
            };
        }
        MatrixError::Http {
            action,
            message: e.to_string(),
        }
    }

    pub(crate) fn invalid(what: &'static str, value: &str, e: impl std::fmt::Display) -> Self {
        MatrixError::InvalidId {
            what,
            value: value.to_owned(),
            message: e.to_string(),
        }
    }
}
