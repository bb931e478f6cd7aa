//! Errors of the protocol core.

use thiserror::Error;

/// Why a piece of external input (a state event, a to-device message, a
/// data-channel message) was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The input is not a JSON object where one is required.
    #[error("{what} is not a JSON object")]
    NotAnObject {
        /// What was expected to be an object.
        what: &'static str,
    },
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A field has the wrong JSON type.
    #[error("field `{field}` has the wrong type: expected {expected}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// The expected JSON type.
        expected: &'static str,
    },
    /// A field is longer than this implementation accepts.
    #[error("field `{field}` is too long ({len} > {max})")]
    TooLong {
        /// The field's name.
        field: &'static str,
        /// Its length (bytes or items).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field has a value outside its allowed set.
    #[error("field `{field}` has an invalid value: {reason}")]
    InvalidValue {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The event type is not one this crate understands.
    #[error("unknown event type `{0}`")]
    UnknownEventType(String),
    /// serde could not read the content.
    #[error("invalid content: {0}")]
    Serde(String),
}

impl From<serde_json::Error> for ParseError {
    fn from(e: serde_json::Error) -> Self {
        ParseError::Serde(e.to_string())
    }
}

/// Why a user command could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CommandError {
    /// `join` without `create` in a room that has no live call.
    #[error("the room has no ongoing call to join (use create to start one)")]
    NoCallToJoin,
    /// A command that needs a joined call was given while not in one.
    #[error("not in a call")]
    NotJoined,
    /// `join` while already in the call.
    #[error("already in the call")]
    AlreadyJoined,
    /// A command argument is not valid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}
