//! # groupcall-proto
//!
//! The sans-IO protocol core of MSC3401 "Native Group VoIP signalling": no
//! sockets, no clock, no tasks. Inputs go in with the current time (a
//! [`Now`]: monotonic ms for timers, POSIX ms for `expires_ts`; a plain `u64`
//! sets both), and everything that must happen comes out of
//! [`GroupCall::poll_output`]; [`GroupCall::poll_timeout`] says when to call
//! [`GroupCall::handle_timeout`]. The async drivers (Matrix client, WebRTC
//! media) live in other crates.
//!
//! ```
//! use groupcall_proto::{Command, Config, CreateOptions, GroupCall, Output};
//!
//! let mut call = GroupCall::new(Config::new("@bot:example.org", "BOTDEVICE"));
//! let now = 1_700_000_000_000;
//! call.handle_command(now, Command::Join { create: Some(CreateOptions::default()), audio: true, video: true })
//!     .unwrap();
//! while let Some(out) = call.poll_output() {
//!     match out {
//!         Output::PublishState { event_type, .. } => println!("send state {event_type}"),
//!         Output::ToDevice(batch) => println!("send {} x{}", batch.event_type, batch.messages.len()),
//!         Output::Media(req) => println!("media: {req:?}"),
//!         Output::Event(ev) => println!("event: {ev:?}"),
//!         Output::Signalling(r) => println!("{} from {}: {:?}", r.event_type, r.sender, r.outcome),
//!         _ => {} // outputs are #[non_exhaustive]: newer ones are ignored here
//!     }
//! }
//! ```
//!
//! Modules, bottom up: [`events`] (state event types), [`signalling`]
//! (to-device contents), [`room`] (the room's call state), [`membership`]
//! (our member event), [`ids`] (mesh rule, ids), [`reorder`] (seq
//! reordering), and the orchestrator [`GroupCall`].

pub mod call;
pub mod dc;
pub mod error;
pub mod events;
pub mod ids;
pub mod membership;
pub mod reorder;
pub mod room;
pub mod signalling;
pub mod types;

pub use call::GroupCall;
pub use error::{CommandError, ParseError};
pub use events::FocusRef;
pub use ids::{DeviceKey, should_call};
pub use types::*;
