//! The focus as a running service (cargo feature `driver`): a Matrix device
//! of the bot account that accepts room invites from its allow-list, keeps
//! every joined room's call state, serves `/health` and `/metrics`, and
//! drains on request.
//!
//! - [`FocusService::start`] logs in (or reuses the device stored in the
//!   data directory), starts syncing and the HTTP endpoint, and returns a
//!   [`FocusHandle`]; [`FocusHandle::shutdown`] drains (stop accepting,
//!   wait `drain.grace_period`, stop) and [`FocusHandle::wait`] waits for
//!   the end. `groupcall focus` calls `shutdown` on SIGTERM or SIGINT.
//! - [`FocusCore`] is the seam to the focus's logic (authorisation and
//!   forwarding, written on top): it sees every joined room's
//!   [`RoomCallState`](groupcall_proto::room::RoomCallState) after each change
//!   and every `m.call.*` to-device event, and may answer with to-device
//!   messages. [`LogCore`], the default, logs what arrives and answers
//!   nothing.
//!
//! No media yet: the media sockets of `[media]` are not bound by this
//! driver.

mod core;
mod http;
mod service;

pub use core::{CallToDevice, CoreOutput, FocusCore, LogCore};
pub use service::{DriverError, FocusHandle, FocusService, FocusState, Status};
