//! groupcall-focus: a selective forwarding unit ("focus", MSC3898) for
//! MSC3401 group calls.
//!
//! Layers, bottom up (see `docs/architecture.md`):
//! - the sans-IO core, no sockets, clocks or tasks (it builds with
//!   `--no-default-features`):
//!   - [`dc`]: the MSC3898 data-channel messages (`m.call.track_subscription`,
//!     `m.call.negotiate`, `m.call.sdp_stream_metadata_changed`,
//!     `m.call.ping` / `m.call.pong`), parsed leniently, written strictly;
//!   - [`auth`]: who may call the focus and whose tracks may go where,
//!     decided from the room's call state;
//!   - [`heartbeat`]: the ping/pong liveness of one data channel, for either
//!     side;
//!   - [`forward`]: the RTP forwarding core (one upload per publisher,
//!     rewriting per subscriber, NACK cache, keyframe requests, active
//!     speaker);
//!   - [`metrics`]: the focus's counters and their Prometheus text form;
//!   - [`config`]: the operator's `focus.toml`, parsed and checked;
//!   - [`signal`]: the focus's side of the to-device calls;
//!   - [`focus`]: the orchestration of all of the above.
//! - the drivers (cargo feature `driver`, on by default): [`engine`], the
//!   media task (socket, peer set, forwarder, orchestration), and
//!   [`driver`], the focus as a Matrix device (login, sync, rooms, HTTP
//!   endpoints, drain).

#![warn(missing_docs)]

pub mod auth;
pub mod config;
pub use groupcall_proto::dc;
#[cfg(feature = "driver")]
pub mod driver;
#[cfg(feature = "driver")]
pub mod engine;
pub mod focus;
pub mod forward;
pub mod heartbeat;
pub mod metrics;
pub mod signal;
