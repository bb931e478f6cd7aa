//! WebRTC media for groupcall: peer connections on [`str0m`] over real UDP,
//! encoded media sources and sinks.
//!
//! This crate knows nothing about Matrix. The protocol core tells a
//! [`MediaPeer`] what to do (create an offer with these local feeds, accept
//! this remote offer, apply this answer, add these remote candidates,
//! restart ICE, close) and the peer reports back local SDP, candidates,
//! connection state, remote tracks and media as [`PeerEvent`]s.
//!
//! A participant's peers share a [`MediaHost`]: one tokio task and one UDP
//! socket per bound local address, feeding one sans-IO [`PeerSet`] (one
//! `str0m::Rtc` per peer, shared candidate gathering, one TURN allocation
//! per TURN server). Datagrams are demultiplexed by STUN USERNAME (the local
//! ICE ufrag) and then by remote address. [`MediaPeer::new`] makes a host
//! for a single peer.
//!
//! Media is handled as encoded frames only (Opus packets, VP8 frames): no
//! codec is linked. Sources read Ogg/Opus and IVF/VP8 (and built-in samples
//! made with real encoders); sinks count frames and record Ogg/Opus and IVF.
//!
//! ```no_run
//! # async fn demo() -> Result<(), groupcall_media::MediaError> {
//! use groupcall_media::*;
//! let (a, _a_events) = MediaPeer::new(PeerConfig::default()).await?;
//! let (b, mut b_events) = MediaPeer::new(PeerConfig::default()).await?;
//! let feeds = [LocalFeed::usermedia("stream-a")];
//! a.set_source("stream-a-audio", OggOpusSource::tone())?;
//! let offer = a.create_offer(&feeds).await?;
//! let answer = b.accept_offer(&offer, &[LocalFeed::usermedia("stream-b")]).await?;
//! a.apply_answer(&answer).await?;
//! while let Some(ev) = b_events.recv().await {
//!     if let PeerEvent::RemoteTrack { stream_id, .. } = ev {
//!         assert_eq!(stream_id, "stream-a");
//!         break;
//!     }
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod bind;
pub mod ice;
pub mod ivf;
pub mod ogg;
mod peer;
mod sdp;
pub mod simulcast;
pub mod sink;
pub mod source;
pub mod stun;
mod turn;
mod types;
pub mod udp;

pub use ice::{IceServer, IceTransport, IceUrl, IceUrlError, IceUrlScheme};
/// Test only (cargo feature `faults`): the media fault layer.
#[cfg(feature = "faults")]
pub use peer::faults::{MediaFaultCounts, MediaFaultOptions, MediaFaults};
pub use peer::set::{PeerId, PeerSet, RequestId, SetInput, SetOutput, Transmit};
pub use peer::{
    Answer, DATA_CHANNEL_LABEL, MAX_CHANNEL_MESSAGE, MediaError, MediaHost, MediaPeer, Mid,
    PeerConfig, PeerEvent, PeerEvents, Reply, Request, Rid, RtpIn, RtpOut, live_socket_count,
};
pub use simulcast::{EstimateKind, LayerGovernor, SimulcastConfig};
pub use sink::{CounterSink, FrameSink, IvfRecorder, OggOpusRecorder, SinkError, SinkFilter};
pub use source::{
    FrameSource, IvfSource, OggOpusSource, SILENCE_LEVEL, SimulcastSource, SourceError,
    SourceFrame, TONE_LEVEL, opus_is_silence,
};
pub use turn::TurnError;
pub use types::{
    Counters, FeedPurpose, Frame, IceCandidate, LocalFeed, LocalTrackStats, PeerStats, RelayStats,
    RemoteTrackStats, SelectedPair, TrackKind,
};
