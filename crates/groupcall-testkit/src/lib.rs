//! groupcall's test kit: one harness for every test file, the demo's tests
//! and the bench's tests.
//!
//! - [`harness`]: a real Synapse, groupcall participants in this process
//!   and reference peers (matrix-js-sdk in Node or headless Chromium) as
//!   child processes, all reporting into one [`Log`]; predicates over it
//!   ([`rust_frames`], [`rust_connected`], [`js_frames`], ...).
//! - [`process`]: a child process whose stdout lines are JSON (the
//!   `groupcall` command, the participant example).
//! - [`netns`]: network namespaces and a userspace impairment router.
//! - [`media`]: counting and decoding (ffmpeg) recordings.
//! - [`sockets`]: the process's UDP sockets, from `/proc`.
//! - [`stun`]: a STUN server that answers late.
//! - [`env`]: checks of what the machine must have (tests install nothing:
//!   `scripts/setup-system` and `scripts/setup-node` do).
//! - The launchers: [`synapse`] (`groupcall-synapse`) and [`coturn`]
//!   (`groupcall-coturn`), re-exported.
//!
//! It builds `groupcall` with the `faults` feature: the fault injector
//! (`JoinOptions::faults`, [`groupcall::FaultOptions`]) exists only in test
//! builds, never in the product's default API.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![recursion_limit = "256"]

pub mod env;
pub mod harness;
pub mod media;
pub mod netns;
pub mod process;
pub mod sockets;
pub mod stun;

pub use groupcall;
pub use groupcall::FaultOptions;
pub use groupcall_coturn as coturn;
pub use groupcall_synapse as synapse;

pub use env::{interop_dir, repo_root, require_chromium, require_node_modules};
pub use harness::*;
pub use media::{
    Decoded, assert_decodes, assert_recordings_of, count_ivf, count_ogg, ffmpeg_decode,
};
pub use process::Proc;
pub use sockets::udp_sockets;
pub use stun::LateStun;

/// One test at a time per test binary: tests share two CPU cores with
/// everything else and some measure timings. [`Harness`] takes it; a test
/// without a harness takes it itself.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// Logs of the code under test into the test's output: `RUST_LOG`, else
/// `default`. The first call in a test binary wins.
pub fn init_tracing(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| default.to_owned()))
        .with_test_writer()
        .try_init();
}

/// A throwaway coturn with the default options; fails the test with the
/// reason when it cannot run (`scripts/setup-system` installs coturn).
pub async fn coturn() -> coturn::Coturn {
    match coturn::Coturn::start(coturn::CoturnOptions::default()).await {
        Ok(t) => t,
        Err(e) => panic!("cannot run coturn for the TURN tests: {e}"),
    }
}
