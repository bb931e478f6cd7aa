//! groupcall: native Matrix group calls (MSC3401) in Rust.
//!
//! [`matrix`] is the Matrix transport: session, rooms and state, the sync
//! loop, to-device messaging and MSC4140 delayed events.

// matrix-sdk's deeply nested futures overflow the default limit when the
// sync loop is spawned (E0275).
#![recursion_limit = "256"]
#![warn(missing_docs)]

pub mod client;
#[cfg(feature = "faults")]
pub mod faults;
pub mod json;
pub mod liveness;
pub mod matrix;

pub use client::{
    AudioSource, CallHandle, ClientError, ClientEvent, JoinOptions, VideoSource, join_call,
};
#[cfg(feature = "faults")]
pub use faults::FaultOptions;
pub use groupcall_media as media;
pub use groupcall_proto as proto;
pub use liveness::LivenessOptions;
