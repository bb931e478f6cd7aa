//! The sans-IO RTP forwarding core of the focus.
//!
//! A [`Forwarder`] knows calls, their participants, the tracks they publish
//! and who subscribes to what. The driver feeds it each received RTP packet
//! ([`Forwarder::handle_rtp`], with an [`RtpIn`] that borrows the packet)
//! and it hands one [`Egress`] per subscriber to a sink closure: the
//! rewritten header ([`RtpOut`]), the received payload, borrowed, and for
//! VP8 a [`Vp8Patch`] of the same length that the driver applies to its
//! copy of the payload ([`Egress::write_payload`] does both). Nothing on
//! that path allocates: lookups are in maps filled when tracks are
//! published, the NACK cache's slots are allocated when a track is
//! published.
//!
//! Time comes in as an [`Instant`] argument. Rarer outputs (keyframe
//! requests toward publishers, active speaker changes) are queued and
//! polled ([`Forwarder::poll_output`]); [`Forwarder::handle_timeout`] is
//! to be called at [`Forwarder::poll_timeout`].
//!
//! Rules:
//! - call scoping: a subscription names a track by its [`TrackKey`], looked
//!   up only among the tracks of the subscriber's own call;
//! - a removed participant's packets are dropped (`unknown_source`) and it
//!   receives nothing from the moment [`Forwarder::remove_participant`]
//!   returns;
//! - a video subscription gets nothing until a key frame starts, and a
//!   keyframe request goes to the publisher when it starts (rate limited:
//!   at most one per layer per [`ForwarderConfig::keyframe_interval`],
//!   later ones coalesced; a key frame arriving resets the wait);
//! - a subscriber whose reported backlog ([`Forwarder::set_backlog`])
//!   exceeds [`ForwarderConfig::video_backlog_limit`] loses its own video
//!   (resumed at the next key frame), above
//!   [`ForwarderConfig::audio_backlog_limit`] its audio too; others are
//!   unaffected;
//! - with [`ForwarderConfig::publisher_limit_bps`], a publisher's video
//!   layer whose own bitrate is above its share of the limit (the limit
//!   less its audio, split over its video tracks) for two rate windows in
//!   a row is not forwarded (`drops.over_limit`): simulcast subscriptions
//!   move to a layer within the share, a track with none loses its video
//!   until it is back under 80 % of the share for two windows (then from
//!   a key frame). Audio is never held back for it.

mod cache;
pub mod layers;
pub mod loss;
mod rewrite;
pub mod rtp;
mod slab;
mod speaker;
pub mod vp8;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use thiserror::Error;

pub use cache::{Cached, PacketCache};
pub use layers::{LayerGuard, LayerGuardConfig, LayerStep};
use layers::{LayerStats, Wish};
pub use loss::{LossGuard, LossGuardConfig};
use rewrite::Rewriter;
pub use rtp::{AudioLevel, RtpIn, RtpOut, RtpParseError};
use slab::{Key, Slab};
use speaker::{LevelMeter, SpeakerState};
pub use vp8::{PictureId, Vp8Descriptor, Vp8Error, Vp8Patch};

/// A participant, as the driver names it (e.g. one per device session).
/// Each is in exactly one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParticipantId(pub u64);

/// A call, as the driver names it (e.g. one per room and call id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallId(pub u64);

/// A published track, as the forwarder names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(Key);

impl From<TrackId> for Key {
    fn from(t: TrackId) -> Key {
        t.0
    }
}

/// A track's name in MSC3898 (`stream_id`, `track_id`), unique within a
/// call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackKey {
    /// The stream (MediaStream) id.
    pub stream_id: String,
    /// The track id.
    pub track_id: String,
}

impl TrackKey {
    /// A key from its two parts.
    pub fn new(stream_id: impl Into<String>, track_id: impl Into<String>) -> Self {
        Self {
            stream_id: stream_id.into(),
            track_id: track_id.into(),
        }
    }
}

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MediaKind {
    /// Audio.
    Audio,
    /// Video.
    Video,
}

/// The codecs the forwarder understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// Opus (48 kHz RTP clock).
    Opus,
    /// VP8 (90 kHz RTP clock; the payload descriptor is rewritten).
    Vp8,
}

impl Codec {
    /// The RTP clock rate.
    pub fn clock_rate(self) -> u32 {
        match self {
            Codec::Opus => 48_000,
            Codec::Vp8 => 90_000,
        }
    }

    /// The kind of media.
    pub fn kind(self) -> MediaKind {
        match self {
            Codec::Opus => MediaKind::Audio,
            Codec::Vp8 => MediaKind::Video,
        }
    }
}

/// One encoding of a published track: the only one, or a simulcast layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    /// The RID of a simulcast layer (None without simulcast).
    pub rid: Option<String>,
    /// The publisher's SSRC for it, if known yet ([`Forwarder::set_layer_ssrc`]
    /// sets or changes it).
    pub ssrc: Option<u32>,
}

/// What a publisher announces about one track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackSpec {
    /// Its MSC3898 name.
    pub key: TrackKey,
    /// Its codec (which implies its kind).
    pub codec: Codec,
    /// Its encodings, 1 to [`MAX_LAYERS`]. Until issue 12 (simulcast),
    /// every subscriber receives layer 0.
    pub layers: Vec<LayerSpec>,
}

/// The most encodings a track may have.
pub const MAX_LAYERS: usize = 4;

/// Keyframe request kinds (RTCP PLI, RFC 4585, or FIR, RFC 5104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyframeKind {
    /// Picture Loss Indication.
    Pli,
    /// Full Intra Request.
    Fir,
}

/// Tunables of a [`Forwarder`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// At most one keyframe request per publisher layer per this interval
    /// (500 ms).
    pub keyframe_interval: Duration,
    /// Slots of the NACK cache of each video layer (512; a power of two is
    /// used, at most 32768).
    pub video_cache_packets: usize,
    /// Slots of the NACK cache of each audio track (0: audio is not
    /// cached).
    pub audio_cache_packets: usize,
    /// Largest payload a cache slot holds (1500 bytes).
    pub cache_mtu: usize,
    /// Reported backlog above which a subscriber's video is dropped
    /// (256 KiB).
    pub video_backlog_limit: usize,
    /// Reported backlog above which its audio is dropped too (1 MiB).
    pub audio_backlog_limit: usize,
    /// How often [`Forwarder::handle_timeout`] wants to run (50 ms).
    pub tick: Duration,
    /// How long a participant must stay the loudest to become the active
    /// speaker (1 s).
    pub speaker_hold: Duration,
    /// Levels quieter than this (in -dBov, 0..=127) never name a speaker
    /// (70).
    pub speaker_max_level: u8,
    /// A track whose last level is older than this counts as silent
    /// (500 ms).
    pub level_stale: Duration,
    /// Seed of the outgoing SSRCs.
    pub ssrc_seed: u64,
    /// A simulcast layer switch waits for a key frame of the new layer
    /// (true). False forwards the new layer's inter frames at once (what
    /// waterfall#100 did; for tests: the subscriber's decoder sees
    /// frames referring to pictures it never had).
    pub switch_on_keyframe: bool,
    /// A switch whose target sends no key frame within this long is given
    /// up (2 s): the subscription stays on its layer and the target is
    /// skipped until it sends a key frame.
    pub switch_timeout: Duration,
    /// How long a skipped layer stays skipped at most (10 s).
    pub no_keyframe_skip: Duration,
    /// A layer with no packet for this long (paused, muted) is not chosen
    /// (1 s).
    pub layer_stale: Duration,
    /// A downlink estimate must allow a higher layer this long before the
    /// subscription moves up to it (3 s; each layer's hold runs from when
    /// the estimate first allowed it). A step up that fails (the choice
    /// moves down again within `up_calm`) doubles the subscription's next
    /// hold, up to `up_hold_max`; see [`Forwarder::set_downlink_estimate`].
    pub up_hold: Duration,
    /// Steps up go one layer at a time, at least this far apart (1 s),
    /// so that a step that congests the link shows (the estimate falls)
    /// before the next is taken, even when the estimate has allowed both
    /// layers for their holds.
    pub up_step_gap: Duration,
    /// The longest hold after failed steps up (24 s).
    pub up_hold_max: Duration,
    /// A step up that stays this long has held (10 s): the next hold is
    /// `up_hold` again.
    pub up_calm: Duration,
    /// ... at this percentage of the higher layer's bitrate (125).
    pub up_margin_percent: u64,
    /// A falling downlink estimate starts a cap only when the fall and a
    /// sign of loss on that downlink ([`Forwarder::note_downlink_loss`])
    /// both came within this long (3 s), in either order; None: the
    /// estimate alone, at the tick it falls. An estimator's delay-based
    /// figure also falls when the focus or the subscriber is short of CPU
    /// (late send or receive times look like a queue): on a saturated
    /// machine with no congestion at all it capped subscribers' layers. A
    /// link that is too slow loses packets within a fraction of a second
    /// (its queue fills), and the next receiver report (about one a
    /// second) tells it.
    pub estimate_needs_loss: Option<Duration>,
    /// The most one publisher's media may take, bits per second of payload
    /// (`limits.max_kbps_per_participant`); None: not policed. See the
    /// module documentation.
    pub publisher_limit_bps: Option<u64>,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            keyframe_interval: Duration::from_millis(500),
            video_cache_packets: 512,
            audio_cache_packets: 0,
            cache_mtu: 1500,
            video_backlog_limit: 256 * 1024,
            audio_backlog_limit: 1024 * 1024,
            tick: Duration::from_millis(50),
            speaker_hold: Duration::from_secs(1),
            speaker_max_level: 70,
            level_stale: Duration::from_millis(500),
            ssrc_seed: 0x5eed_f0c5,
            switch_on_keyframe: true,
            switch_timeout: Duration::from_secs(2),
            no_keyframe_skip: Duration::from_secs(10),
            layer_stale: Duration::from_secs(1),
            up_hold: Duration::from_secs(3),
            up_step_gap: Duration::from_secs(1),
            up_hold_max: Duration::from_secs(24),
            up_calm: Duration::from_secs(10),
            up_margin_percent: 125,
            estimate_needs_loss: Some(Duration::from_secs(3)),
            publisher_limit_bps: None,
        }
    }
}

/// Why a forwarder call was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The call exists already.
    #[error("call {0:?} exists already")]
    CallExists(CallId),
    /// No such call.
    #[error("no call {0:?}")]
    UnknownCall(CallId),
    /// The participant is in a call already.
    #[error("participant {0:?} is in a call already")]
    ParticipantExists(ParticipantId),
    /// No such participant.
    #[error("no participant {0:?}")]
    UnknownParticipant(ParticipantId),
    /// No track of that name in the participant's call (tracks of other
    /// calls are never found).
    #[error("no track {0:?} in the participant's call")]
    UnknownTrack(TrackKey),
    /// No such track (unpublished).
    #[error("no such track")]
    NoSuchTrack,
    /// A track of that name is published in the call already.
    #[error("track {0:?} is published already")]
    TrackExists(TrackKey),
    /// Zero or more than [`MAX_LAYERS`] layers, or no such layer.
    #[error("bad layers")]
    BadLayers,
    /// The publisher uses this SSRC for another track or layer.
    #[error("SSRC {0} is in use by another track of the publisher")]
    SsrcInUse(u32),
    /// The subscriber has no outgoing stream with this SSRC.
    #[error("no outgoing stream with SSRC {0}")]
    UnknownSsrc(u32),
}

/// Packets dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Drops {
    /// Malformed payload (VP8 descriptor) or datagram.
    pub malformed: u64,
    /// From a participant or SSRC the forwarder does not know (removed
    /// participants, unpublished tracks).
    pub unknown_source: u64,
    /// Not sent to a video subscription waiting for a key frame (counted
    /// per subscription).
    pub awaiting_keyframe: u64,
    /// Video not sent to a congested subscriber.
    pub congestion_video: u64,
    /// Audio not sent to a very congested subscriber.
    pub congestion_audio: u64,
    /// Arrived late, from before the packet that started the
    /// subscription's current epoch (counted per subscription).
    pub before_epoch: u64,
    /// VP8 packets of a temporal layer above the subscription's maximum
    /// (counted per subscription).
    pub temporal: u64,
    /// Video of a layer above its publisher's share of
    /// [`ForwarderConfig::publisher_limit_bps`] (counted per
    /// subscription).
    pub over_limit: u64,
}

/// Counters of a call (or of the whole forwarder).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// RTP packets received from publishers.
    pub packets_in: u64,
    /// Their payload bytes.
    pub bytes_in: u64,
    /// RTP packets handed to the sink (retransmissions included).
    pub packets_out: u64,
    /// Their payload bytes.
    pub bytes_out: u64,
    /// Drops by reason.
    pub drops: Drops,
    /// Key frames received (first packets).
    pub keyframes_in: u64,
    /// Sequence numbers NACKed by subscribers.
    pub nacks_received: u64,
    /// NACKed packets re-sent from the cache.
    pub nacks_served: u64,
    /// NACKed packets not in the cache (or of an earlier epoch).
    pub nacks_missed: u64,
    /// PLI/FIR received from subscribers.
    pub keyframe_requests_received: u64,
    /// Keyframe requests sent to publishers (PLIs sent).
    pub keyframe_requests_sent: u64,
    /// Keyframe requests folded into one already sent or pending.
    pub keyframe_requests_coalesced: u64,
    /// Simulcast layer switches done (the first packet of the new layer
    /// forwarded).
    pub layer_switches: u64,
    /// Switches given up: the target sent no key frame in time.
    pub layer_switch_fallbacks: u64,
    /// Key frames of a switch's target not switched at because a frame of
    /// the current layer was still being forwarded (the switch waits for
    /// the next one).
    pub layer_switches_deferred: u64,
    /// Frames of a new layer forwarded before its first key frame (0
    /// unless [`ForwarderConfig::switch_on_keyframe`] is off).
    pub inter_before_keyframe: u64,
    /// Sum of the switch latencies (the switch asked for to the first
    /// packet of the new layer forwarded), milliseconds.
    pub switch_latency_total_ms: u64,
    /// The longest of them, milliseconds (a maximum, not a sum, in
    /// [`Counters::add`]).
    pub switch_latency_max_ms: u64,
    /// Times a publisher's layer went over its share of the limit and was
    /// held back ([`ForwarderConfig::publisher_limit_bps`]).
    pub layers_policed: u64,
}

impl Counters {
    /// Adds `o` to `self`.
    pub fn add(&mut self, o: &Counters) {
        self.packets_in += o.packets_in;
        self.bytes_in += o.bytes_in;
        self.packets_out += o.packets_out;
        self.bytes_out += o.bytes_out;
        self.drops.malformed += o.drops.malformed;
        self.drops.unknown_source += o.drops.unknown_source;
        self.drops.awaiting_keyframe += o.drops.awaiting_keyframe;
        self.drops.congestion_video += o.drops.congestion_video;
        self.drops.congestion_audio += o.drops.congestion_audio;
        self.drops.before_epoch += o.drops.before_epoch;
        self.drops.temporal += o.drops.temporal;
        self.drops.over_limit += o.drops.over_limit;
        self.keyframes_in += o.keyframes_in;
        self.nacks_received += o.nacks_received;
        self.nacks_served += o.nacks_served;
        self.nacks_missed += o.nacks_missed;
        self.keyframe_requests_received += o.keyframe_requests_received;
        self.keyframe_requests_sent += o.keyframe_requests_sent;
        self.keyframe_requests_coalesced += o.keyframe_requests_coalesced;
        self.layer_switches += o.layer_switches;
        self.layer_switch_fallbacks += o.layer_switch_fallbacks;
        self.layer_switches_deferred += o.layer_switches_deferred;
        self.inter_before_keyframe += o.inter_before_keyframe;
        self.switch_latency_total_ms += o.switch_latency_total_ms;
        self.switch_latency_max_ms = self.switch_latency_max_ms.max(o.switch_latency_max_ms);
        self.layers_policed += o.layers_policed;
    }
}

/// One outgoing copy of a packet, for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Egress<'a> {
    /// Who gets it.
    pub subscriber: ParticipantId,
    /// Which track it belongs to.
    pub track: TrackId,
    /// Audio or video.
    pub kind: MediaKind,
    /// The rewritten header.
    pub header: RtpOut,
    /// The payload as received (borrowed from the input or the cache).
    pub payload: &'a [u8],
    /// For VP8: the descriptor values to write into the copied payload.
    pub vp8: Option<Vp8Patch>,
    /// A retransmission answering a NACK.
    pub retransmission: bool,
}

impl Egress<'_> {
    /// Copies the payload into `dst` and applies the VP8 patch; returns
    /// the length, or `None` if `dst` is too short.
    pub fn write_payload(&self, dst: &mut [u8]) -> Option<usize> {
        let n = self.payload.len();
        let d = dst.get_mut(..n)?;
        d.copy_from_slice(self.payload);
        if let Some(p) = self.vp8
            && !p.apply(d)
        {
            return None;
        }
        Some(n)
    }
}

/// What the forwarder asks of the driver, apart from packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// Send a keyframe request to the publisher of a track layer.
    KeyframeRequest {
        /// The publisher.
        publisher: ParticipantId,
        /// The track.
        track: TrackId,
        /// The layer index ([`Forwarder::layer_rid`] names its RID).
        layer: u8,
        /// The publisher's SSRC of that layer, if known.
        ssrc: Option<u32>,
        /// FIR if any coalesced request was a FIR, else PLI.
        kind: KeyframeKind,
    },
    /// The active speaker of a call changed (None: the speaker left and
    /// nobody speaks). To be sent to the call's clients.
    ActiveSpeakerChanged {
        /// The call.
        call: CallId,
        /// The new speaker.
        participant: Option<ParticipantId>,
    },
}

/// Whether `interval` has passed from `since` to `now` (never, if the sum
/// does not fit in an `Instant`).
fn elapsed(since: Instant, now: Instant, interval: Duration) -> bool {
    since.checked_add(interval).is_some_and(|t| now >= t)
}

/// Keyframe request rate limiting of one publisher layer.
#[derive(Debug, Clone, Copy, Default)]
struct KeyframeRequests {
    last_sent: Option<Instant>,
    pending: bool,
    pending_fir: bool,
}

impl KeyframeRequests {
    /// Whether to send a request now; if not, it is pending (and counted
    /// as coalesced).
    fn request(&mut self, now: Instant, interval: Duration, fir: bool) -> bool {
        match self.last_sent {
            Some(t) if !elapsed(t, now, interval) => {
                self.pending = true;
                self.pending_fir |= fir;
                false
            }
            _ => {
                self.last_sent = Some(now);
                self.pending = false;
                self.pending_fir = false;
                true
            }
        }
    }

    /// A pending request now due: returns its FIR flag.
    fn due(&mut self, now: Instant, interval: Duration) -> Option<bool> {
        let t = self.last_sent?;
        if !self.pending || !elapsed(t, now, interval) {
            return None;
        }
        let fir = self.pending_fir;
        self.last_sent = Some(now);
        self.pending = false;
        self.pending_fir = false;
        Some(fir)
    }

    fn keyframe_arrived(&mut self) {
        *self = Self::default();
    }
}

#[derive(Debug)]
struct Layer {
    rid: Option<String>,
    ssrc: Option<u32>,
    cache: PacketCache,
    kf: KeyframeRequests,
    stats: LayerStats,
}

#[derive(Debug)]
struct Track {
    call: CallId,
    publisher: ParticipantId,
    key: TrackKey,
    codec: Codec,
    layers: Vec<Layer>,
    /// Active subscriptions.
    outs: Vec<Key>,
    level: LevelMeter,
}

#[derive(Debug)]
struct Participant {
    call: CallId,
    /// From the last reported backlog (copied into each of its streams).
    congestion: Congestion,
    /// Its downlink estimate, bits per second.
    downlink_bps: Option<u64>,
    /// Layers below the wanted ones ([`LayerGuard`]).
    steps_down: u8,
    /// The last automatic layer move of one of its subscriptions.
    layers_moved_at: Option<Instant>,
    /// The estimate fell since the last tick.
    estimate_fell: bool,
    /// The tick that last saw it fall.
    fell_at: Option<Instant>,
    /// The estimate caps its layers ([`Forwarder::set_downlink_estimate`]).
    constrained: bool,
    /// The last sign of loss on its downlink
    /// ([`Forwarder::note_downlink_loss`]).
    lossy_at: Option<Instant>,
    tracks: Vec<TrackId>,
    /// Its outgoing streams, active or paused (kept for continuity).
    outs: Vec<Key>,
}

#[derive(Debug, Default)]
struct Call {
    participants: Vec<ParticipantId>,
    tracks: HashMap<TrackKey, TrackId>,
    counters: Counters,
    speaker: SpeakerState,
}

/// How much of a subscriber's media is dropped for congestion
/// ([`Forwarder::set_congestion`], or from the backlog,
/// [`Forwarder::set_backlog`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
#[non_exhaustive]
pub enum Congestion {
    /// Nothing dropped.
    #[default]
    None,
    /// Its video is dropped (resumed at a key frame).
    Video,
    /// Its audio too.
    All,
}

/// A subscriber's downlink as the forwarder sees it
/// ([`Forwarder::downlink_rates`]): payload bitrates, bits per second
/// (headers come on top), over the last second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DownlinkRates {
    /// With no downlink limit: for each active subscription, the layer its
    /// requested size picks (or the track's one layer).
    pub wanted: u64,
    /// What it is sent now.
    pub current: u64,
    /// Every simulcast subscription targets the layer its requested size
    /// picks (none is held lower by the estimate or loss steps).
    pub at_wanted: bool,
}

#[derive(Debug)]
struct OutStream {
    subscriber: ParticipantId,
    track: TrackId,
    kind: MediaKind,
    ssrc: u32,
    active: bool,
    /// The layer forwarded now.
    layer: u8,
    /// The layer wanted: forwarded from its next key frame on.
    target_layer: u8,
    waiting_keyframe: bool,
    resync: bool,
    congestion: Congestion,
    /// Consecutive packets dropped as `before_epoch`.
    stale_run: u8,
    rw: Rewriter,
    /// The requested size (MSC3898 width/height).
    want: (Option<u32>, Option<u32>),
    /// Set by [`Forwarder::select_layer`]: no automatic choice.
    pinned: bool,
    /// The highest VP8 temporal layer forwarded (None: all).
    max_temporal: Option<u8>,
    /// `max_temporal` follows the requested size (until
    /// [`Forwarder::set_max_temporal`]).
    temporal_auto: bool,
    /// When the switch to `target_layer` was asked for.
    switch_since: Option<Instant>,
    /// Since when the downlink estimate has allowed each layer (by index;
    /// `layers::covered`), for the hold before a step up to it.
    up_since: [Option<Instant>; MAX_LAYERS],
    /// How long the estimate must allow the next step up (`up_hold`,
    /// doubled by each failed step up).
    up_hold: Duration,
    /// The last step up taken on the estimate: when, and the share of the
    /// estimate it was taken on.
    up_taken: Option<(Instant, u64)>,
    /// The share of the estimate a step up failed on: a hold lengthened by
    /// failures is shortened again once the estimate clearly exceeds it.
    up_failed_at: Option<u64>,
    /// Switched without a key frame: frames are counted until one comes.
    unkeyed: bool,
    /// The PictureID of the last frame dropped for its temporal layer.
    skipped_pid: Option<u16>,
    /// The highest VP8 temporal layer the subscriber can decode now
    /// (`u8::MAX`: all): reset by a key frame, lowered with
    /// `max_temporal`, raised only at layer sync frames.
    tl_synced: u8,
    /// The last video packet forwarded did not end its frame (no marker).
    mid_frame: bool,
}

/// Keeps a subscription's hold before a step up on the estimate
/// ([`ForwarderConfig::up_hold`]): a step up followed by a move down
/// within `calm` failed and doubles the hold (up to `max`); one that stays
/// `calm` long, or an estimate share 25 % above the one a step failed on,
/// brings it back to `first`. `to` is the layer chosen now, `up` whether
/// it is above the one targeted (None: not known), `budget` the
/// subscription's share of the estimate (None: not capped).
fn backoff(
    out: &mut OutStream,
    now: Instant,
    to: u8,
    up: Option<bool>,
    budget: Option<u64>,
    (calm, first, max): (Duration, Duration, Duration),
) {
    if let Some((at, _)) = out.up_taken
        && elapsed(at, now, calm)
    {
        out.up_taken = None;
        out.up_hold = first;
    }
    if let (Some(b), Some(f)) = (budget, out.up_failed_at)
        && b >= f.saturating_mul(5) / 4
    {
        out.up_failed_at = None;
        out.up_hold = first;
    }
    if to == out.target_layer {
        return;
    }
    match (up, budget) {
        (Some(true), Some(b)) => out.up_taken = Some((now, b)),
        (Some(false), Some(_)) => {
            if let Some((_, b)) = out.up_taken.take() {
                out.up_hold = out.up_hold.saturating_mul(2).min(max);
                out.up_failed_at = Some(b);
                tracing::debug!(
                    subscriber = out.subscriber.0,
                    hold_ms = out.up_hold.as_millis() as u64,
                    "forwarder: a step up on the estimate failed; the next waits longer"
                );
            }
        }
        _ => {}
    }
}

/// Whether a subscription asking `want` of a layer of `width` x `height`
/// is a thumbnail (at most half of both): it gets the lowest temporal
/// layer only. An unknown size (no key frame yet) is not.
fn is_thumbnail(want: (Option<u32>, Option<u32>), width: u16, height: u16) -> bool {
    width > 0
        && height > 0
        && matches!(want, (Some(w), Some(h))
            if w.saturating_mul(2) <= u32::from(width) && h.saturating_mul(2) <= u32::from(height))
}

/// A layer silent this long is not waited on to end its frame before a
/// switch.
const MID_FRAME_QUIET: Duration = Duration::from_millis(100);

/// After this many consecutive `before_epoch` drops a subscription starts
/// a new epoch.
const STALE_RUN_RESYNC: u8 = 64;

/// The forwarding core (see the module documentation).
#[derive(Debug)]
pub struct Forwarder {
    config: ForwarderConfig,
    calls: HashMap<CallId, Call>,
    participants: HashMap<ParticipantId, Participant>,
    tracks: Slab<Track>,
    outs: Slab<OutStream>,
    /// (publisher, SSRC) -> (track, layer).
    routes: HashMap<(ParticipantId, u32), (TrackId, u8)>,
    outputs: VecDeque<Output>,
    /// Counters of packets of no call, and of removed calls.
    unattributed: Counters,
    retired: Counters,
    ssrc_counter: u64,
    next_tick: Option<Instant>,
    /// The latest switch latencies (at most [`SWITCH_LATENCIES_KEPT`]).
    switch_latencies: VecDeque<Duration>,
}

/// How many switch latencies [`Forwarder::switch_latencies`] keeps.
pub const SWITCH_LATENCIES_KEPT: usize = 256;

/// One subscription's layers, as [`Forwarder::subscription_layers`]
/// reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionLayer {
    /// The subscriber.
    pub subscriber: ParticipantId,
    /// The track.
    pub track: TrackId,
    /// The layer forwarded now (index; [`Forwarder::layer_rid`] names it).
    pub layer: u8,
    /// The layer it switches to (= `layer` when none).
    pub target: u8,
    /// The size of the current layer from its last key frame (0 x 0 if
    /// none yet).
    pub width: u16,
    /// See `width`.
    pub height: u16,
}

/// SplitMix64: the outgoing SSRC generator.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Forwarder {
    /// A forwarder with no calls.
    pub fn new(config: ForwarderConfig) -> Self {
        Self {
            config,
            calls: HashMap::new(),
            participants: HashMap::new(),
            tracks: Slab::default(),
            outs: Slab::default(),
            routes: HashMap::new(),
            outputs: VecDeque::with_capacity(64),
            unattributed: Counters::default(),
            retired: Counters::default(),
            ssrc_counter: 0,
            next_tick: None,
            switch_latencies: VecDeque::with_capacity(SWITCH_LATENCIES_KEPT),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ForwarderConfig {
        &self.config
    }

    /// Adds a call.
    pub fn add_call(&mut self, call: CallId) -> Result<(), ForwardError> {
        if self.calls.contains_key(&call) {
            return Err(ForwardError::CallExists(call));
        }
        self.calls.insert(call, Call::default());
        Ok(())
    }

    /// Removes a call with all its participants (its counters go to the
    /// totals of [`Forwarder::counters`]).
    pub fn remove_call(&mut self, call: CallId) -> Result<(), ForwardError> {
        let ps = self
            .calls
            .get(&call)
            .ok_or(ForwardError::UnknownCall(call))?
            .participants
            .clone();
        for p in ps {
            self.remove_participant(p)?;
        }
        if let Some(c) = self.calls.remove(&call) {
            self.retired.add(&c.counters);
        }
        Ok(())
    }

    /// Adds a participant to a call.
    pub fn add_participant(&mut self, call: CallId, p: ParticipantId) -> Result<(), ForwardError> {
        if self.participants.contains_key(&p) {
            return Err(ForwardError::ParticipantExists(p));
        }
        let c = self
            .calls
            .get_mut(&call)
            .ok_or(ForwardError::UnknownCall(call))?;
        c.participants.push(p);
        self.participants.insert(
            p,
            Participant {
                call,
                congestion: Congestion::None,
                downlink_bps: None,
                layers_moved_at: None,
                estimate_fell: false,
                fell_at: None,
                constrained: false,
                lossy_at: None,
                steps_down: 0,
                tracks: Vec::new(),
                outs: Vec::new(),
            },
        );
        Ok(())
    }

    /// The call of a participant.
    pub fn call_of(&self, p: ParticipantId) -> Option<CallId> {
        self.participants.get(&p).map(|x| x.call)
    }

    /// Removes a participant: its tracks are unpublished (their
    /// subscriptions end), its subscriptions end, and any later packet from
    /// it is dropped.
    pub fn remove_participant(&mut self, p: ParticipantId) -> Result<(), ForwardError> {
        let part = self
            .participants
            .remove(&p)
            .ok_or(ForwardError::UnknownParticipant(p))?;
        for t in part.tracks {
            self.drop_track(t);
        }
        for o in part.outs {
            if let Some(out) = self.outs.remove(o)
                && let Some(t) = self.tracks.get_mut(out.track)
            {
                t.outs.retain(|&k| k != o);
            }
        }
        if let Some(c) = self.calls.get_mut(&part.call) {
            c.participants.retain(|&x| x != p);
            if c.speaker.forget(p) {
                self.outputs.push_back(Output::ActiveSpeakerChanged {
                    call: part.call,
                    participant: None,
                });
            }
        }
        tracing::debug!(participant = p.0, "forwarder: participant removed");
        Ok(())
    }

    /// Publishes a track of `publisher` in its call.
    pub fn publish_track(
        &mut self,
        publisher: ParticipantId,
        spec: TrackSpec,
    ) -> Result<TrackId, ForwardError> {
        let part = self
            .participants
            .get(&publisher)
            .ok_or(ForwardError::UnknownParticipant(publisher))?;
        let call_id = part.call;
        let call = self
            .calls
            .get(&call_id)
            .ok_or(ForwardError::UnknownCall(call_id))?;
        if spec.layers.is_empty() || spec.layers.len() > MAX_LAYERS {
            return Err(ForwardError::BadLayers);
        }
        if call.tracks.contains_key(&spec.key) {
            return Err(ForwardError::TrackExists(spec.key));
        }
        for (i, l) in spec.layers.iter().enumerate() {
            if let Some(s) = l.ssrc
                && (self.routes.contains_key(&(publisher, s))
                    || spec.layers[..i].iter().any(|o| o.ssrc == Some(s)))
            {
                return Err(ForwardError::SsrcInUse(s));
            }
        }
        let packets = match spec.codec.kind() {
            MediaKind::Audio => self.config.audio_cache_packets,
            MediaKind::Video => self.config.video_cache_packets,
        };
        let layers = spec
            .layers
            .iter()
            .map(|l| Layer {
                rid: l.rid.clone(),
                ssrc: l.ssrc,
                cache: PacketCache::new(packets, self.config.cache_mtu),
                kf: KeyframeRequests::default(),
                stats: LayerStats::default(),
            })
            .collect();
        let id = TrackId(self.tracks.insert(Track {
            call: call_id,
            publisher,
            key: spec.key.clone(),
            codec: spec.codec,
            layers,
            outs: Vec::new(),
            level: LevelMeter::default(),
        }));
        for (i, l) in spec.layers.iter().enumerate() {
            if let Some(s) = l.ssrc {
                self.routes.insert((publisher, s), (id, i as u8));
            }
        }
        if let Some(c) = self.calls.get_mut(&call_id) {
            c.tracks.insert(spec.key, id);
        }
        if let Some(p) = self.participants.get_mut(&publisher) {
            p.tracks.push(id);
        }
        Ok(id)
    }

    /// Sets (or changes, when the publisher restarts with a new SSRC) the
    /// SSRC of a layer. Subscribers continue seamlessly: their next packet
    /// from the new SSRC starts a new epoch (for video at a key frame).
    pub fn set_layer_ssrc(
        &mut self,
        track: TrackId,
        layer: u8,
        ssrc: u32,
    ) -> Result<(), ForwardError> {
        let t = self.tracks.get(track).ok_or(ForwardError::NoSuchTrack)?;
        let publisher = t.publisher;
        let old = t
            .layers
            .get(usize::from(layer))
            .ok_or(ForwardError::BadLayers)?
            .ssrc;
        if old == Some(ssrc) {
            return Ok(());
        }
        if self.routes.contains_key(&(publisher, ssrc)) {
            return Err(ForwardError::SsrcInUse(ssrc));
        }
        if let Some(o) = old {
            self.routes.remove(&(publisher, o));
        }
        self.routes.insert((publisher, ssrc), (track, layer));
        if let Some(l) = self
            .tracks
            .get_mut(track)
            .and_then(|t| t.layers.get_mut(usize::from(layer)))
        {
            l.ssrc = Some(ssrc);
        }
        Ok(())
    }

    /// The name of a track.
    pub fn track_key(&self, track: TrackId) -> Option<&TrackKey> {
        self.tracks.get(track).map(|t| &t.key)
    }

    /// The publisher of a track.
    pub fn track_publisher(&self, track: TrackId) -> Option<ParticipantId> {
        self.tracks.get(track).map(|t| t.publisher)
    }

    /// The RID of a track's layer.
    pub fn layer_rid(&self, track: TrackId, layer: u8) -> Option<&str> {
        self.tracks
            .get(track)?
            .layers
            .get(usize::from(layer))?
            .rid
            .as_deref()
    }

    /// A track of a call, by name.
    pub fn track_by_key(&self, call: CallId, key: &TrackKey) -> Option<TrackId> {
        self.calls.get(&call)?.tracks.get(key).copied()
    }

    /// Unpublishes a track: its subscriptions end.
    pub fn unpublish_track(&mut self, track: TrackId) -> Result<(), ForwardError> {
        let publisher = self
            .tracks
            .get(track)
            .ok_or(ForwardError::NoSuchTrack)?
            .publisher;
        if let Some(p) = self.participants.get_mut(&publisher) {
            p.tracks.retain(|&t| t != track);
        }
        self.drop_track(track);
        Ok(())
    }

    fn drop_track(&mut self, track: TrackId) {
        let Some(t) = self.tracks.remove(track.0) else {
            return;
        };
        for l in &t.layers {
            if let Some(s) = l.ssrc {
                self.routes.remove(&(t.publisher, s));
            }
        }
        if let Some(c) = self.calls.get_mut(&t.call) {
            c.tracks.remove(&t.key);
        }
        // Every out stream of the track, active or paused.
        let mut gone = Vec::new();
        for (k, o) in self.outs.iter_mut() {
            if o.track == track {
                gone.push((k, o.subscriber));
            }
        }
        for (k, sub) in gone {
            self.outs.remove(k);
            if let Some(p) = self.participants.get_mut(&sub) {
                p.outs.retain(|&x| x != k);
            }
        }
    }

    /// The track named `key` in the call of `subscriber`: the one place
    /// where a subscription finds its track, so that tracks of other calls
    /// are never found (call scoping).
    fn track_in_call_of(
        &self,
        subscriber: ParticipantId,
        key: &TrackKey,
    ) -> Result<TrackId, ForwardError> {
        let part = self
            .participants
            .get(&subscriber)
            .ok_or(ForwardError::UnknownParticipant(subscriber))?;
        self.calls
            .get(&part.call)
            .and_then(|c| c.tracks.get(key))
            .copied()
            .ok_or_else(|| ForwardError::UnknownTrack(key.clone()))
    }

    /// The outgoing stream (active or paused) of a participant for a track.
    /// Whether `subscriber` has an active subscription to the track named
    /// `key` in its call.
    pub fn is_subscribed(&self, subscriber: ParticipantId, key: &TrackKey) -> bool {
        let Ok(track) = self.track_in_call_of(subscriber, key) else {
            return false;
        };
        self.participants
            .get(&subscriber)
            .and_then(|p| self.out_of(p, track))
            .and_then(|o| self.outs.get(o))
            .is_some_and(|o| o.active)
    }

    /// The kind of a published track.
    pub fn track_kind(&self, track: TrackId) -> Option<MediaKind> {
        self.tracks.get(track).map(|t| t.codec.kind())
    }

    fn out_of(&self, p: &Participant, track: TrackId) -> Option<Key> {
        p.outs
            .iter()
            .copied()
            .find(|&o| self.outs.get(o).is_some_and(|x| x.track == track))
    }

    /// Subscribes a participant to a track of its own call; returns the
    /// SSRC of its copy (the same one again after an unsubscribe). A second
    /// subscription to the same track is ignored (MSC3898). For video, a
    /// keyframe request goes to the publisher at once (rate limited) and
    /// nothing is sent before a key frame.
    pub fn subscribe(
        &mut self,
        now: Instant,
        subscriber: ParticipantId,
        key: &TrackKey,
    ) -> Result<u32, ForwardError> {
        let track = self.track_in_call_of(subscriber, key)?;
        let part = self
            .participants
            .get(&subscriber)
            .ok_or(ForwardError::UnknownParticipant(subscriber))?;
        let existing = self.out_of(part, track);
        let kind = self
            .tracks
            .get(track)
            .ok_or(ForwardError::NoSuchTrack)?
            .codec
            .kind();
        let video = kind == MediaKind::Video;
        let (okey, ssrc, layer) = match existing {
            Some(o) => {
                let Some(out) = self.outs.get_mut(o) else {
                    return Err(ForwardError::NoSuchTrack);
                };
                if out.active {
                    return Ok(out.ssrc);
                }
                out.active = true;
                out.resync = true;
                out.waiting_keyframe = video;
                (o, out.ssrc, out.layer)
            }
            None => {
                let ssrc = self.new_ssrc(subscriber);
                let congestion = self
                    .participants
                    .get(&subscriber)
                    .map_or(Congestion::None, |p| p.congestion);
                let o = self.outs.insert(OutStream {
                    subscriber,
                    track,
                    kind,
                    ssrc,
                    active: true,
                    layer: 0,
                    target_layer: 0,
                    waiting_keyframe: video,
                    resync: true,
                    congestion,
                    stale_run: 0,
                    rw: Rewriter::new(),
                    want: (None, None),
                    pinned: false,
                    max_temporal: None,
                    temporal_auto: true,
                    switch_since: None,
                    up_since: [None; MAX_LAYERS],
                    up_hold: self.config.up_hold,
                    up_taken: None,
                    up_failed_at: None,
                    unkeyed: false,
                    skipped_pid: None,
                    tl_synced: u8::MAX,
                    mid_frame: false,
                });
                if let Some(p) = self.participants.get_mut(&subscriber) {
                    p.outs.push(o);
                }
                (o, ssrc, 0)
            }
        };
        if let Some(t) = self.tracks.get_mut(track) {
            t.outs.push(okey);
        }
        if video {
            self.request_keyframe(now, track, layer, false);
        }
        Ok(ssrc)
    }

    /// Makes a subscriber's video subscription to `track` wait for a key
    /// frame again (a new epoch, nothing forwarded before it), e.g. when
    /// the driver could not deliver the one the forwarder sent (the
    /// subscriber's m-line was not negotiated yet); with `request`, asks
    /// the publisher for one (rate limited, like every request). Audio
    /// subscriptions are left alone.
    pub fn await_keyframe(
        &mut self,
        now: Instant,
        subscriber: ParticipantId,
        track: TrackId,
        request: bool,
    ) -> Result<(), ForwardError> {
        let p = self
            .participants
            .get(&subscriber)
            .ok_or(ForwardError::UnknownParticipant(subscriber))?;
        let o = self.out_of(p, track).ok_or(ForwardError::NoSuchTrack)?;
        let Some(out) = self.outs.get_mut(o) else {
            return Err(ForwardError::NoSuchTrack);
        };
        if out.kind != MediaKind::Video || !out.active {
            return Ok(());
        }
        out.waiting_keyframe = true;
        out.resync = true;
        let layer = out.layer;
        if request {
            self.request_keyframe(now, track, layer, false);
        }
        Ok(())
    }

    /// Chooses the layer (simulcast encoding, by index) a subscriber
    /// receives of a track. A subscription still waiting for its first key
    /// frame moves at once; otherwise the current layer is forwarded until
    /// a key frame of the new one arrives (asked for at once, rate
    /// limited), and the switch keeps the subscriber's numbering
    /// continuous.
    pub fn select_layer(
        &mut self,
        now: Instant,
        subscriber: ParticipantId,
        key: &TrackKey,
        layer: u8,
    ) -> Result<(), ForwardError> {
        let track = self.track_in_call_of(subscriber, key)?;
        let layers = self
            .tracks
            .get(track)
            .ok_or(ForwardError::NoSuchTrack)?
            .layers
            .len();
        if usize::from(layer) >= layers {
            return Err(ForwardError::BadLayers);
        }
        let o = self
            .participants
            .get(&subscriber)
            .and_then(|p| self.out_of(p, track))
            .ok_or_else(|| ForwardError::UnknownTrack(key.clone()))?;
        if let Some(out) = self.outs.get_mut(o) {
            out.pinned = true;
        }
        self.retarget(now, o, track, layer);
        Ok(())
    }

    /// Points a subscription at `layer`: at once while it waits for a key
    /// frame anyway, else from the layer's next key frame (asked for now,
    /// rate limited; the switch is timed from now).
    fn retarget(&mut self, now: Instant, o: Key, track: TrackId, layer: u8) {
        let Some(out) = self.outs.get_mut(o) else {
            return;
        };
        out.target_layer = layer;
        if out.waiting_keyframe {
            out.layer = layer;
        }
        out.switch_since = (out.layer != layer).then_some(now);
        let ask = out.active && out.kind == MediaKind::Video;
        if ask {
            self.request_keyframe(now, track, layer, false);
        }
    }

    /// The active subscription of `subscriber` to the track named `key`.
    fn active_out(
        &self,
        subscriber: ParticipantId,
        key: &TrackKey,
    ) -> Result<(Key, TrackId), ForwardError> {
        let track = self.track_in_call_of(subscriber, key)?;
        let o = self
            .participants
            .get(&subscriber)
            .and_then(|p| self.out_of(p, track))
            .filter(|&o| self.outs.get(o).is_some_and(|x| x.active))
            .ok_or_else(|| ForwardError::UnknownTrack(key.clone()))?;
        Ok((o, track))
    }

    /// The size a subscriber asks of a track (MSC3898
    /// `m.call.track_subscription` width/height): its layer is chosen
    /// automatically from then on (module [`layers`]: the smallest layer
    /// covering the size, capped by the downlink), undoing a
    /// [`Forwarder::select_layer`]. For a track of one layer nothing
    /// changes.
    pub fn set_wanted_size(
        &mut self,
        now: Instant,
        subscriber: ParticipantId,
        key: &TrackKey,
        width: Option<u32>,
        height: Option<u32>,
    ) -> Result<(), ForwardError> {
        let (o, _) = self.active_out(subscriber, key)?;
        if let Some(out) = self.outs.get_mut(o) {
            out.want = (width, height);
            out.pinned = false;
        }
        self.choose_layers(now, Some(o));
        Ok(())
    }

    /// The highest VP8 temporal layer (TID) a subscription gets (None:
    /// all). Packets of higher ones are dropped and taken out of its
    /// numbering (sequence numbers and PictureIDs stay consecutive).
    /// Without this call the choice is automatic: a subscription whose
    /// requested size is at most half the width and half the height of
    /// the smallest layer (a thumbnail) gets temporal layer 0 only (for
    /// L1T2, half the frame rate), any other all of them.
    pub fn set_max_temporal(
        &mut self,
        subscriber: ParticipantId,
        key: &TrackKey,
        max: Option<u8>,
    ) -> Result<(), ForwardError> {
        let (o, _) = self.active_out(subscriber, key)?;
        if let Some(out) = self.outs.get_mut(o) {
            out.max_temporal = max;
            out.temporal_auto = false;
        }
        Ok(())
    }

    /// A subscriber's downlink estimate, bits per second (e.g. from
    /// transport-wide congestion control feedback or REMB), or None. Once
    /// it shows congestion (it fell, and below what the subscriber is sent
    /// now), it caps the layers of its simulcast subscriptions (what is
    /// not chosen comes off first, the rest is shared equally among them)
    /// from the next [`Forwarder::handle_timeout`]; the cap is lifted once
    /// every subscription is back on the layer its requested size picks
    /// with the estimate at [`ForwarderConfig::up_margin_percent`] of that
    /// rate. Upward moves wait for the estimate to hold
    /// ([`ForwarderConfig::up_hold`], lengthened after failed steps up).
    /// Before any congestion the estimate caps nothing: an
    /// estimator's starting figure is a guess, and it rises only as far as
    /// traffic and probes take it. Nor does it without a recent sign of
    /// loss ([`ForwarderConfig::estimate_needs_loss`]).
    pub fn set_downlink_estimate(&mut self, subscriber: ParticipantId, bps: Option<u64>) {
        if let Some(p) = self.participants.get_mut(&subscriber) {
            if let (Some(new), Some(old)) = (bps, p.downlink_bps)
                && new < old
            {
                p.estimate_fell = true;
            }
            if bps.is_none() {
                p.constrained = false;
            }
            p.downlink_bps = bps;
        }
    }

    /// A sign of loss on a subscriber's downlink now (the engine's: a
    /// receiver report of 10 % or more): within
    /// [`ForwarderConfig::estimate_needs_loss`] of it, a falling estimate
    /// may start a cap.
    pub fn note_downlink_loss(&mut self, subscriber: ParticipantId, now: Instant) {
        if let Some(p) = self.participants.get_mut(&subscriber) {
            p.lossy_at = Some(now);
        }
    }

    /// Whether a subscriber's downlink estimate caps its layers now (see
    /// [`Forwarder::set_downlink_estimate`]).
    pub fn downlink_constrained(&self, subscriber: ParticipantId) -> bool {
        self.participants
            .get(&subscriber)
            .is_some_and(|p| p.constrained)
    }

    /// Starts and ends the downlink caps (see
    /// [`Forwarder::set_downlink_estimate`]).
    fn update_constraints(&mut self, now: Instant) {
        let margin = self.config.up_margin_percent;
        let ids: Vec<ParticipantId> = self
            .participants
            .iter()
            .filter(|(_, p)| p.downlink_bps.is_some())
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let Some(rates) = self.downlink_rates(now, id) else {
                continue;
            };
            let Some(p) = self.participants.get_mut(&id) else {
                continue;
            };
            let Some(bps) = p.downlink_bps else {
                continue;
            };
            if std::mem::take(&mut p.estimate_fell) {
                p.fell_at = Some(now);
            }
            // Congested: the estimate fell below what is sent (and, when
            // asked, a sign of loss came near the fall: the two may come
            // in either order, the receiver report up to a second after
            // the estimate). Clear: back on the wanted layers with room
            // for them.
            let within = |at: Option<Instant>, d: Duration| {
                at.is_some_and(|t| now.saturating_duration_since(t) < d)
            };
            let fell = match self.config.estimate_needs_loss {
                None => p.fell_at == Some(now),
                Some(d) => within(p.fell_at, d) && within(p.lossy_at, d),
            };
            let constrained = if p.constrained {
                !(rates.at_wanted && bps >= rates.wanted * margin / 100)
            } else {
                fell && bps < rates.current
            };
            if constrained != p.constrained {
                tracing::debug!(
                    subscriber = id.0,
                    bps,
                    sent = rates.current,
                    wanted = rates.wanted,
                    constrained,
                    "forwarder: the downlink estimate caps the layers (or no longer)"
                );
                p.constrained = constrained;
            }
        }
    }

    /// What a subscriber is sent and would be sent with no downlink
    /// limit (see [`DownlinkRates`]). None for an unknown subscriber.
    pub fn downlink_rates(&self, now: Instant, subscriber: ParticipantId) -> Option<DownlinkRates> {
        let p = self.participants.get(&subscriber)?;
        let (mut wanted, mut current) = (0u64, 0u64);
        let mut at_wanted = true;
        for out in p.outs.iter().filter_map(|&o| self.outs.get(o)) {
            let Some(t) = self.tracks.get(out.track) else {
                continue;
            };
            if !out.active {
                continue;
            }
            let rate = |i: u8| t.layers.get(usize::from(i)).map_or(0, |l| l.stats.bps);
            current += rate(out.layer);
            if out.pinned || out.kind != MediaKind::Video || t.layers.len() < 2 {
                wanted += rate(out.layer);
                continue;
            }
            let mut stats = [LayerStats::default(); MAX_LAYERS];
            for (s, l) in stats.iter_mut().zip(&t.layers) {
                *s = l.stats;
            }
            let stats = &stats[..t.layers.len().min(MAX_LAYERS)];
            let wish = Wish {
                width: out.want.0,
                height: out.want.1,
                steps_down: 0,
                budget_bps: None,
            };
            let by_size = layers::choose(
                stats,
                now,
                self.config.layer_stale,
                wish,
                out.target_layer,
                100,
                |_| true,
            )
            .unwrap_or(out.layer);
            wanted += rate(by_size);
            at_wanted &= out.target_layer == by_size;
        }
        Some(DownlinkRates {
            wanted,
            current,
            at_wanted,
        })
    }

    /// How many layers below the wanted ones a subscriber's simulcast
    /// subscriptions go (a [`LayerGuard`]'s steps), from the next
    /// [`Forwarder::handle_timeout`].
    pub fn set_layer_steps(&mut self, subscriber: ParticipantId, steps: u8) {
        if let Some(p) = self.participants.get_mut(&subscriber) {
            p.steps_down = steps;
        }
    }

    /// Whether some automatic simulcast subscription of `subscriber`
    /// targets a layer above the lowest usable one of its track (so that a
    /// step down would lower something).
    pub fn can_step_down(&self, now: Instant, subscriber: ParticipantId) -> bool {
        self.steps_to_lowest(now, subscriber) > 0
    }

    /// How many layer steps down would bring every automatic simulcast
    /// subscription of `subscriber` to the lowest usable layer of its track
    /// (the most over its subscriptions; 0: all at their lowest already).
    pub fn steps_to_lowest(&self, now: Instant, subscriber: ParticipantId) -> u8 {
        let Some(p) = self.participants.get(&subscriber) else {
            return 0;
        };
        let stale = self.config.layer_stale;
        let area = |l: &Layer| u32::from(l.stats.width) * u32::from(l.stats.height);
        p.outs
            .iter()
            .filter_map(|&o| {
                let out = self.outs.get(o)?;
                let t = self.tracks.get(out.track)?;
                if !out.active || out.pinned || t.layers.len() < 2 {
                    return None;
                }
                let target = area(t.layers.get(usize::from(out.target_layer))?);
                let below = t
                    .layers
                    .iter()
                    .filter(|l| l.stats.usable(now, stale) && area(l) < target)
                    .count();
                u8::try_from(below).ok()
            })
            .max()
            .unwrap_or(0)
    }

    /// The layer of `track` whose RID is `rid`, added if the track has
    /// none yet (a publisher's simulcast layers are learnt from its
    /// packets): a layer without RID or SSRC yet takes it, else a new one
    /// (at most [`MAX_LAYERS`]).
    pub fn layer_for_rid(&mut self, track: TrackId, rid: &str) -> Result<u8, ForwardError> {
        let packets = self.config.video_cache_packets;
        let mtu = self.config.cache_mtu;
        let t = self
            .tracks
            .get_mut(track)
            .ok_or(ForwardError::NoSuchTrack)?;
        if let Some(i) = t.layers.iter().position(|l| l.rid.as_deref() == Some(rid)) {
            return Ok(i as u8);
        }
        if let Some(i) = t
            .layers
            .iter()
            .position(|l| l.rid.is_none() && l.ssrc.is_none())
        {
            if let Some(l) = t.layers.get_mut(i) {
                l.rid = Some(rid.to_owned());
            }
            return Ok(i as u8);
        }
        if t.layers.len() >= MAX_LAYERS || t.codec.kind() != MediaKind::Video {
            return Err(ForwardError::BadLayers);
        }
        t.layers.push(Layer {
            rid: Some(rid.to_owned()),
            ssrc: None,
            cache: PacketCache::new(packets, mtu),
            kf: KeyframeRequests::default(),
            stats: LayerStats::default(),
        });
        Ok((t.layers.len() - 1) as u8)
    }

    /// The number of layers of a track.
    pub fn layer_count(&self, track: TrackId) -> Option<usize> {
        self.tracks.get(track).map(|t| t.layers.len())
    }

    /// A layer's size from its last key frame and its measured bitrate
    /// (payload bits per second over the last second).
    pub fn layer_info(&self, track: TrackId, layer: u8) -> Option<(u16, u16, u64)> {
        let l = self.tracks.get(track)?.layers.get(usize::from(layer))?;
        Some((l.stats.width, l.stats.height, l.stats.bps))
    }

    /// Every active video subscription with its layers.
    pub fn subscription_layers(&self) -> impl Iterator<Item = SubscriptionLayer> + '_ {
        self.outs
            .values()
            .filter(|o| o.active && o.kind == MediaKind::Video)
            .map(|o| {
                let (width, height) = self
                    .tracks
                    .get(o.track)
                    .and_then(|t| t.layers.get(usize::from(o.layer)))
                    .map_or((0, 0), |l| (l.stats.width, l.stats.height));
                SubscriptionLayer {
                    subscriber: o.subscriber,
                    track: o.track,
                    layer: o.layer,
                    target: o.target_layer,
                    width,
                    height,
                }
            })
    }

    /// The latest layer switch latencies (from the switch asked for to the
    /// first packet of the new layer forwarded), oldest first.
    pub fn switch_latencies(&self) -> impl Iterator<Item = Duration> + '_ {
        self.switch_latencies.iter().copied()
    }

    /// Automatic layer choice (module [`layers`]) for every automatic
    /// simulcast subscription, or only `only`; then gives up switches
    /// whose target sent no key frame within
    /// [`ForwarderConfig::switch_timeout`].
    fn choose_layers(&mut self, now: Instant, only: Option<Key>) {
        let cfg = &self.config;
        // Each choice, whether it is a thumbnail, whether it is above the
        // layer targeted now, and the subscription's share of the estimate.
        type Move = (
            Key,
            TrackId,
            u8,
            bool,
            Option<bool>,
            Option<u64>,
            [bool; MAX_LAYERS],
        );
        let mut moves: Vec<Move> = Vec::new();
        let mut give_up: Vec<(Key, TrackId, u8)> = Vec::new();
        // One-layer video: only the automatic temporal choice.
        let mut thumbs: Vec<(Key, bool)> = Vec::new();
        for (k, t) in self.tracks.iter() {
            if t.codec.kind() != MediaKind::Video {
                continue;
            }
            if t.layers.len() < 2 {
                let Some(l) = t.layers.first() else {
                    continue;
                };
                for &o in &t.outs {
                    if only.is_some_and(|x| x != o) {
                        continue;
                    }
                    if let Some(out) = self.outs.get(o) {
                        thumbs.push((o, is_thumbnail(out.want, l.stats.width, l.stats.height)));
                    }
                }
                continue;
            }
            let mut stats = [LayerStats::default(); MAX_LAYERS];
            for (s, l) in stats.iter_mut().zip(&t.layers) {
                *s = l.stats;
            }
            let stats = &stats[..t.layers.len().min(MAX_LAYERS)];
            for &o in &t.outs {
                if only.is_some_and(|x| x != o) {
                    continue;
                }
                let Some(out) = self.outs.get(o) else {
                    continue;
                };
                if let Some(t0) = out.switch_since
                    && out.target_layer != out.layer
                    && elapsed(t0, now, cfg.switch_timeout)
                {
                    give_up.push((o, TrackId(k), out.target_layer));
                    continue;
                }
                if out.pinned || !out.active {
                    continue;
                }
                let p = self.participants.get(&out.subscriber);
                let budget = p.filter(|p| p.constrained).and_then(|p| {
                    let bps = p.downlink_bps?;
                    // What is not chosen (audio, one-layer video, pinned
                    // layers) comes off first; the rest is shared.
                    let mut fixed = 0u64;
                    let mut n = 0u64;
                    for x in p.outs.iter().filter_map(|&x| self.outs.get(x)) {
                        if !x.active {
                            continue;
                        }
                        let Some(t) = self.tracks.get(x.track) else {
                            continue;
                        };
                        if !x.pinned && x.kind == MediaKind::Video && t.layers.len() > 1 {
                            n += 1;
                        } else if let Some(l) = t.layers.get(usize::from(x.layer)) {
                            fixed += l.stats.bps;
                        }
                    }
                    Some(bps.saturating_sub(fixed) / n.max(1))
                });
                let wish = Wish {
                    width: out.want.0,
                    height: out.want.1,
                    steps_down: p.map_or(0, |p| p.steps_down),
                    budget_bps: budget,
                };
                let gap_passed = out
                    .up_taken
                    .is_none_or(|(at, _)| elapsed(at, now, cfg.up_step_gap));
                let up_held = |l: u8| {
                    gap_passed
                        && out
                            .up_since
                            .get(usize::from(l))
                            .copied()
                            .flatten()
                            .is_some_and(|since| elapsed(since, now, out.up_hold))
                };
                let covered = layers::covered(stats, budget, cfg.up_margin_percent);
                if let Some(ch) = layers::choose(
                    stats,
                    now,
                    cfg.layer_stale,
                    wish,
                    out.target_layer,
                    cfg.up_margin_percent,
                    up_held,
                ) {
                    let l = stats[usize::from(ch)];
                    let thumb = is_thumbnail(out.want, l.width, l.height);
                    let up = stats
                        .get(usize::from(out.target_layer))
                        .map(|c| (l.width, l.height) > (c.width, c.height));
                    moves.push((o, TrackId(k), ch, thumb, up, budget, covered));
                }
            }
        }
        let skip = self.config.no_keyframe_skip;
        for (o, track, target) in give_up {
            if let Some(t) = self.tracks.get_mut(track) {
                if let Some(l) = t.layers.get_mut(usize::from(target)) {
                    l.stats.no_keyframe_until = now.checked_add(skip);
                }
                if let Some(c) = self.calls.get_mut(&t.call) {
                    c.counters.layer_switch_fallbacks += 1;
                }
            }
            if let Some(out) = self.outs.get_mut(o) {
                tracing::debug!(
                    subscriber = out.subscriber.0,
                    target,
                    "forwarder: no key frame of the new layer in time; switch given up"
                );
                out.target_layer = out.layer;
                out.switch_since = None;
                out.up_since = [None; MAX_LAYERS];
            }
        }
        for (o, thumb) in thumbs {
            if let Some(out) = self.outs.get_mut(o)
                && out.temporal_auto
            {
                out.max_temporal = thumb.then_some(0);
            }
        }
        let (calm, first_hold, max_hold) = (cfg.up_calm, cfg.up_hold, cfg.up_hold_max);
        for (o, track, ch, thumb, up, budget, covered) in moves {
            let Some(out) = self.outs.get_mut(o) else {
                continue;
            };
            backoff(out, now, ch, up, budget, (calm, first_hold, max_hold));
            if out.temporal_auto {
                out.max_temporal = thumb.then_some(0);
            }
            for (since, c) in out.up_since.iter_mut().zip(covered) {
                *since = if c { since.or(Some(now)) } else { None };
            }
            if ch != out.target_layer {
                let subscriber = out.subscriber;
                let height = |l: u8| {
                    self.tracks
                        .get(track)
                        .and_then(|t| t.layers.get(usize::from(l)))
                        .map_or(0, |l| l.stats.height)
                };
                tracing::debug!(
                    subscriber = subscriber.0,
                    from = height(out.target_layer),
                    to = height(ch),
                    budget = ?self.participants.get(&subscriber).and_then(|p| p.downlink_bps),
                    "forwarder: layer choice moved (heights)"
                );
                self.retarget(now, o, track, ch);
                if let Some(p) = self.participants.get_mut(&subscriber) {
                    p.layers_moved_at = Some(now);
                }
            }
        }
    }

    /// When the automatic choice last moved one of a subscriber's
    /// simulcast subscriptions to another layer (the loss its receiver
    /// reports just after still counts the layer left).
    pub fn layers_moved_at(&self, subscriber: ParticipantId) -> Option<Instant> {
        self.participants.get(&subscriber)?.layers_moved_at
    }

    /// Ends a subscription (its rewriting state is kept so that a later
    /// subscription continues the same stream).
    pub fn unsubscribe(
        &mut self,
        subscriber: ParticipantId,
        key: &TrackKey,
    ) -> Result<(), ForwardError> {
        let track = self.track_in_call_of(subscriber, key)?;
        let part = self
            .participants
            .get(&subscriber)
            .ok_or(ForwardError::UnknownParticipant(subscriber))?;
        for &o in &part.outs {
            if let Some(out) = self.outs.get_mut(o)
                && out.track == track
            {
                out.active = false;
                if let Some(t) = self.tracks.get_mut(track) {
                    t.outs.retain(|&k| k != o);
                }
            }
        }
        Ok(())
    }

    fn new_ssrc(&mut self, subscriber: ParticipantId) -> u32 {
        loop {
            self.ssrc_counter += 1;
            let s = mix(self.config.ssrc_seed ^ mix(self.ssrc_counter)) as u32;
            let taken = self.participants.get(&subscriber).is_some_and(|p| {
                p.outs
                    .iter()
                    .any(|&o| self.outs.get(o).is_some_and(|x| x.ssrc == s))
            });
            if s != 0 && !taken {
                return s;
            }
        }
    }

    /// Sets the number of bytes queued toward a subscriber (the driver
    /// reports it, e.g. after each send batch). Above the video limit its
    /// video is dropped, above the audio limit its audio too.
    pub fn set_backlog(&mut self, subscriber: ParticipantId, bytes: usize) {
        let c = if bytes > self.config.audio_backlog_limit {
            Congestion::All
        } else if bytes > self.config.video_backlog_limit {
            Congestion::Video
        } else {
            Congestion::None
        };
        self.set_congestion(subscriber, c);
    }

    /// Sets how much of a subscriber's media is dropped, for a driver
    /// that judges congestion otherwise than by a backlog (e.g. from the
    /// loss its receiver reports). The last of this and
    /// [`Forwarder::set_backlog`] holds. Others are not affected; dropped
    /// streams resume as a new epoch (video at a key frame, asked for once
    /// the congestion ends).
    pub fn set_congestion(&mut self, subscriber: ParticipantId, c: Congestion) {
        let Some(p) = self.participants.get_mut(&subscriber) else {
            return;
        };
        p.congestion = c;
        for &o in &p.outs {
            if let Some(out) = self.outs.get_mut(o) {
                out.congestion = c;
            }
        }
    }

    fn request_keyframe(&mut self, now: Instant, track: TrackId, layer: u8, fir: bool) {
        let interval = self.config.keyframe_interval;
        let Some(t) = self.tracks.get_mut(track) else {
            return;
        };
        let Some(l) = t.layers.get_mut(usize::from(layer)) else {
            return;
        };
        let send = l.kf.request(now, interval, fir);
        let ssrc = l.ssrc;
        let (publisher, call) = (t.publisher, t.call);
        let c = self.calls.get_mut(&call).map(|c| &mut c.counters);
        if send {
            if let Some(c) = c {
                c.keyframe_requests_sent += 1;
            }
            self.outputs.push_back(Output::KeyframeRequest {
                publisher,
                track,
                layer,
                ssrc,
                kind: if fir {
                    KeyframeKind::Fir
                } else {
                    KeyframeKind::Pli
                },
            });
        } else if let Some(c) = c {
            c.keyframe_requests_coalesced += 1;
        }
    }

    /// A keyframe request (PLI or FIR) from a subscriber for its stream
    /// `media_ssrc`: passed on to the publisher, rate limited.
    pub fn handle_keyframe_request(
        &mut self,
        now: Instant,
        subscriber: ParticipantId,
        media_ssrc: u32,
        kind: KeyframeKind,
    ) -> Result<(), ForwardError> {
        let o = self.find_out(subscriber, media_ssrc)?;
        let Some(out) = self.outs.get(o) else {
            return Err(ForwardError::UnknownSsrc(media_ssrc));
        };
        let (track, layer) = (out.track, out.layer);
        if out.kind != MediaKind::Video {
            return Ok(()); // audio has no key frames
        }
        if let Some(c) = self
            .tracks
            .get(track)
            .and_then(|t| self.calls.get_mut(&t.call))
        {
            c.counters.keyframe_requests_received += 1;
        }
        self.request_keyframe(now, track, layer, kind == KeyframeKind::Fir);
        Ok(())
    }

    fn find_out(&self, subscriber: ParticipantId, ssrc: u32) -> Result<Key, ForwardError> {
        let p = self
            .participants
            .get(&subscriber)
            .ok_or(ForwardError::UnknownParticipant(subscriber))?;
        p.outs
            .iter()
            .copied()
            .find(|&o| self.outs.get(o).is_some_and(|x| x.ssrc == ssrc && x.active))
            .ok_or(ForwardError::UnknownSsrc(ssrc))
    }

    /// Handles one RTP packet from `publisher`: caches it, then hands each
    /// subscriber's rewritten copy to `sink`. Unknown sources and malformed
    /// payloads are dropped and counted.
    pub fn handle_rtp(
        &mut self,
        now: Instant,
        publisher: ParticipantId,
        pkt: &RtpIn<'_>,
        sink: &mut impl FnMut(Egress<'_>),
    ) {
        let len = pkt.payload.len() as u64;
        let Some(&(tid, layer)) = self.routes.get(&(publisher, pkt.ssrc)) else {
            self.unattributed.packets_in += 1;
            self.unattributed.bytes_in += len;
            self.unattributed.drops.unknown_source += 1;
            return;
        };
        let Self {
            tracks,
            outs,
            calls,
            unattributed,
            config,
            switch_latencies,
            outputs,
            ..
        } = self;
        let switch_on_keyframe = config.switch_on_keyframe;
        let keyframe_interval = config.keyframe_interval;
        let Some(track) = tracks.get_mut(tid.0) else {
            unattributed.drops.unknown_source += 1;
            return;
        };
        let Some(call) = calls.get_mut(&track.call) else {
            unattributed.drops.unknown_source += 1;
            return;
        };
        let c = &mut call.counters;
        c.packets_in += 1;
        c.bytes_in += len;
        let vp8 = match track.codec {
            Codec::Vp8 => match Vp8Descriptor::parse(pkt.payload) {
                Ok(d) => Some(d),
                Err(e) => {
                    c.drops.malformed += 1;
                    tracing::trace!(error = %e, "forwarder: VP8 packet dropped");
                    return;
                }
            },
            Codec::Opus => None,
        };
        let keyframe = vp8.is_some_and(|d| d.keyframe);
        let Some(lay) = track.layers.get_mut(usize::from(layer)) else {
            return;
        };
        if keyframe {
            c.keyframes_in += 1;
            lay.kf.keyframe_arrived();
        }
        let size = vp8
            .as_ref()
            .and_then(|d| layers::keyframe_size(pkt.payload, d));
        lay.stats.packet(now, pkt.payload.len(), size);
        let starts_frame = vp8.is_some_and(|d| d.starts_frame());
        if let Some(l) = pkt.audio_level {
            track.level.update(now, l);
        }
        let lay_policed = lay.stats.policed;
        lay.cache.insert(cache::Cached {
            ssrc: pkt.ssrc,
            seq: pkt.seq,
            timestamp: pkt.timestamp,
            marker: pkt.marker,
            payload_type: pkt.payload_type,
            payload: pkt.payload,
        });
        let kind = track.codec.kind();
        let clock = track.codec.clock_rate();
        for &o in &track.outs {
            let Some(out) = outs.get_mut(o) else { continue };
            if out.layer != layer {
                // A layer switch happens at a key frame of the target
                // (or, with the wait turned off, at any frame start).
                let at = keyframe || (!switch_on_keyframe && starts_frame);
                if out.target_layer != layer || !at {
                    continue;
                }
                // Not in the middle of a frame of the current layer (the
                // publisher's layers interleave): its rest would never be
                // sent and the subscriber would get a truncated frame. The
                // switch waits for the next key frame, asked for now (rate
                // limited), unless the current layer went quiet.
                let current_live = track
                    .layers
                    .get(usize::from(out.layer))
                    .and_then(|l| l.stats.last_packet)
                    .is_some_and(|t| now.saturating_duration_since(t) < MID_FRAME_QUIET);
                if out.mid_frame && current_live {
                    c.layer_switches_deferred += 1;
                    if let Some(l) = track.layers.get_mut(usize::from(layer))
                        && l.kf.request(now, keyframe_interval, false)
                    {
                        c.keyframe_requests_sent += 1;
                        outputs.push_back(Output::KeyframeRequest {
                            publisher: track.publisher,
                            track: tid,
                            layer,
                            ssrc: l.ssrc,
                            kind: KeyframeKind::Pli,
                        });
                    }
                    continue;
                }
                out.layer = layer;
                out.resync = true;
                out.unkeyed = !keyframe;
                c.layer_switches += 1;
                if let Some(t0) = out.switch_since.take() {
                    let d = now.saturating_duration_since(t0);
                    let ms = d.as_millis() as u64;
                    c.switch_latency_total_ms += ms;
                    c.switch_latency_max_ms = c.switch_latency_max_ms.max(ms);
                    if switch_latencies.len() >= SWITCH_LATENCIES_KEPT {
                        switch_latencies.pop_front();
                    }
                    switch_latencies.push_back(d);
                }
            }
            if lay_policed {
                // Held back whole, as for congestion: it resumes with a new
                // epoch at a key frame once the layer is within the limit
                // (or the subscription moved to one that is).
                out.waiting_keyframe = true;
                out.resync = true;
                c.drops.over_limit += 1;
                continue;
            }
            let congested = match kind {
                MediaKind::Video => out.congestion != Congestion::None,
                MediaKind::Audio => out.congestion == Congestion::All,
            };
            if congested {
                // Dropped whole: the stream resumes with a new epoch (for
                // video at a key frame), so the subscriber sees no gap to
                // NACK.
                if kind == MediaKind::Video {
                    out.waiting_keyframe = true;
                    c.drops.congestion_video += 1;
                } else {
                    c.drops.congestion_audio += 1;
                }
                out.resync = true;
                continue;
            }
            if kind == MediaKind::Video && out.rw.src_ssrc != pkt.ssrc && !out.resync {
                // The publisher restarted with a new SSRC: a new epoch,
                // from a key frame.
                out.resync = true;
                out.waiting_keyframe = true;
            }
            if out.waiting_keyframe {
                if !keyframe {
                    c.drops.awaiting_keyframe += 1;
                    continue;
                }
                out.waiting_keyframe = false;
            }
            if keyframe {
                out.tl_synced = u8::MAX;
            } else if let Some((t, sync)) = vp8.and_then(|d| d.tid) {
                if let Some(max) = out.max_temporal {
                    out.tl_synced = out.tl_synced.min(max);
                }
                let wanted = out.max_temporal.is_none_or(|m| t <= m);
                // A temporal layer above the ones the subscriber's decoder
                // has is taken up only at a frame with the layer sync bit
                // (it refers to TL0 only), one layer at a time; before,
                // its frames refer to frames the subscriber never got.
                let synced = t <= out.tl_synced
                    || (sync && starts_frame && t == out.tl_synced.saturating_add(1));
                if !wanted || !synced {
                    // Taken out of its numbering.
                    c.drops.temporal += 1;
                    if !out.resync {
                        out.rw.skip(pkt, vp8.as_ref(), &mut out.skipped_pid);
                    }
                    continue;
                }
                out.tl_synced = out.tl_synced.max(t);
            }
            if out.unkeyed {
                if keyframe {
                    out.unkeyed = false;
                } else if starts_frame {
                    c.inter_before_keyframe += 1;
                }
            }
            if out.resync || out.rw.src_ssrc != pkt.ssrc {
                out.rw.switch(now, pkt, vp8.as_ref(), clock);
                out.resync = false;
            }
            let (header, patch) = out.rw.map(out.ssrc, pkt, vp8.as_ref());
            if !out.rw.in_epoch(header.seq) {
                // Reordered from before the epoch's first packet: its
                // number would repeat one already sent. A long run of
                // them means the publisher's numbering jumped: a new
                // epoch then.
                c.drops.before_epoch += 1;
                out.stale_run = out.stale_run.saturating_add(1);
                if out.stale_run >= STALE_RUN_RESYNC {
                    out.stale_run = 0;
                    out.resync = true;
                    out.waiting_keyframe = kind == MediaKind::Video;
                }
                continue;
            }
            out.stale_run = 0;
            out.rw.advance(now, &header, vp8.as_ref());
            if kind == MediaKind::Video {
                out.mid_frame = !pkt.marker;
            }
            c.packets_out += 1;
            c.bytes_out += len;
            sink(Egress {
                subscriber: out.subscriber,
                track: tid,
                kind,
                header,
                payload: pkt.payload,
                vp8: patch,
                retransmission: false,
            });
        }
    }

    /// A NACK from a subscriber for sequence numbers of its stream
    /// `media_ssrc`: each one still cached (and of the current epoch) is
    /// re-sent to `sink`, rewritten as the first time.
    pub fn handle_nack(
        &mut self,
        subscriber: ParticipantId,
        media_ssrc: u32,
        seqs: &[u16],
        sink: &mut impl FnMut(Egress<'_>),
    ) -> Result<(), ForwardError> {
        let o = self.find_out(subscriber, media_ssrc)?;
        let Self {
            tracks,
            outs,
            calls,
            ..
        } = self;
        let out = outs.get(o).ok_or(ForwardError::UnknownSsrc(media_ssrc))?;
        let track = tracks.get(out.track).ok_or(ForwardError::NoSuchTrack)?;
        let call = calls
            .get_mut(&track.call)
            .ok_or(ForwardError::UnknownCall(track.call))?;
        let c = &mut call.counters;
        let layer = track
            .layers
            .get(usize::from(out.layer))
            .ok_or(ForwardError::BadLayers)?;
        let congested = match out.kind {
            MediaKind::Video => out.congestion != Congestion::None,
            MediaKind::Audio => out.congestion == Congestion::All,
        };
        for &seq in seqs {
            c.nacks_received += 1;
            let cached = out
                .rw
                .source_seq(seq)
                .and_then(|s| layer.cache.get(out.rw.src_ssrc, s));
            let Some(p) = cached.filter(|_| !congested && !out.waiting_keyframe) else {
                c.nacks_missed += 1;
                continue;
            };
            let pkt = RtpIn {
                ssrc: p.ssrc,
                seq: p.seq,
                timestamp: p.timestamp,
                marker: p.marker,
                payload_type: p.payload_type,
                audio_level: None,
                payload: p.payload,
            };
            let vp8 = match track.codec {
                Codec::Vp8 => match Vp8Descriptor::parse(p.payload) {
                    Ok(d) => Some(d),
                    Err(_) => {
                        c.nacks_missed += 1;
                        continue;
                    }
                },
                Codec::Opus => None,
            };
            let (header, patch) = out.rw.map(out.ssrc, &pkt, vp8.as_ref());
            c.nacks_served += 1;
            c.packets_out += 1;
            c.bytes_out += p.payload.len() as u64;
            sink(Egress {
                subscriber,
                track: out.track,
                kind: out.kind,
                header,
                payload: p.payload,
                vp8: patch,
                retransmission: true,
            });
        }
        Ok(())
    }

    /// When [`Forwarder::handle_timeout`] wants to run next (None while
    /// there is no call).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.calls.is_empty() {
            return None;
        }
        self.next_tick
    }

    /// Periodic work: due keyframe requests (coalesced ones, and repeats
    /// for subscriptions still waiting for a key frame) and the active
    /// speaker of each call; before them, the publishers' limits
    /// ([`ForwarderConfig::publisher_limit_bps`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        // First, so that a layer let go is asked for its key frame below.
        self.police();
        let interval = self.config.keyframe_interval;
        let mut repeats: Vec<(TrackId, u8)> = Vec::new();
        for (k, t) in self.tracks.iter_mut() {
            let tid = TrackId(k);
            for (i, l) in t.layers.iter_mut().enumerate() {
                if let Some(fir) = l.kf.due(now, interval) {
                    if let Some(c) = self.calls.get_mut(&t.call) {
                        c.counters.keyframe_requests_sent += 1;
                    }
                    self.outputs.push_back(Output::KeyframeRequest {
                        publisher: t.publisher,
                        track: tid,
                        layer: i as u8,
                        ssrc: l.ssrc,
                        kind: if fir {
                            KeyframeKind::Fir
                        } else {
                            KeyframeKind::Pli
                        },
                    });
                }
            }
            for &o in &t.outs {
                let Some(out) = self.outs.get(o) else {
                    continue;
                };
                // A subscription waiting for a key frame of its layer, or
                // of the layer it switches to.
                let wants = if out.waiting_keyframe {
                    Some(out.layer)
                } else if out.target_layer != out.layer {
                    Some(out.target_layer)
                } else {
                    None
                };
                if let Some(l) = wants
                    && out.congestion == Congestion::None
                    && !repeats.contains(&(tid, l))
                    && t.layers.get(usize::from(l)).is_some_and(|l| {
                        // A held-back layer is not asked for key frames
                        // (large ones would only add to its rate).
                        !l.stats.policed && l.kf.last_sent.is_none_or(|s| elapsed(s, now, interval))
                    })
                {
                    repeats.push((tid, l));
                }
            }
        }
        for (t, l) in repeats {
            self.request_keyframe(now, t, l, false);
        }
        self.update_constraints(now);
        self.choose_layers(now, None);
        self.tick_speakers(now);
        self.next_tick = now.checked_add(self.config.tick);
    }

    /// Holds back the video layers above their publisher's share of
    /// [`ForwarderConfig::publisher_limit_bps`], and lets them go again
    /// (see the module documentation). Judged once per rate window; a
    /// subscription waiting on a layer let go gets its key frame from
    /// [`Forwarder::handle_timeout`]'s repeats, as any waiting one.
    fn police(&mut self) {
        let Some(limit) = self.config.publisher_limit_bps else {
            return;
        };
        for p in self.participants.values() {
            let mut audio = 0u64;
            let mut videos = 0u64;
            for t in p.tracks.iter().filter_map(|t| self.tracks.get(t.0)) {
                match t.codec.kind() {
                    MediaKind::Audio => audio += t.layers.iter().map(|l| l.stats.bps).sum::<u64>(),
                    MediaKind::Video => videos += 1,
                }
            }
            if videos == 0 {
                continue;
            }
            let share = limit.saturating_sub(audio) / videos;
            for &tid in &p.tracks {
                let Some(t) = self.tracks.get_mut(tid.0) else {
                    continue;
                };
                if t.codec.kind() != MediaKind::Video {
                    continue;
                }
                for (i, l) in t.layers.iter_mut().enumerate() {
                    let Some(held) = l.stats.police(share) else {
                        continue;
                    };
                    tracing::info!(
                        publisher = t.publisher.0,
                        layer = i,
                        bps = l.stats.bps,
                        share,
                        held,
                        "forwarder: layer {} the publisher's limit",
                        if held {
                            "over; held back"
                        } else {
                            "within again; let go"
                        }
                    );
                    if held && let Some(c) = self.calls.get_mut(&t.call) {
                        c.counters.layers_policed += 1;
                    }
                }
            }
        }
    }

    fn tick_speakers(&mut self, now: Instant) {
        let min_loud = 127 - self.config.speaker_max_level.min(127);
        for (&cid, call) in self.calls.iter_mut() {
            let mut best: Option<(u8, ParticipantId)> = None;
            // On a tie the current speaker stays the loudest.
            let current = call.speaker.current;
            for &t in call.tracks.values() {
                let Some(t) = self.tracks.get(t.0) else {
                    continue;
                };
                if t.codec.kind() != MediaKind::Audio {
                    continue;
                }
                let l = t.level.loudness(now, self.config.level_stale);
                let louder =
                    |(b, _): (u8, ParticipantId)| l > b || (l == b && current == Some(t.publisher));
                if l >= min_loud && l > 0 && best.is_none_or(louder) {
                    best = Some((l, t.publisher));
                }
            }
            if let Some(p) = call
                .speaker
                .tick(now, best.map(|(_, p)| p), self.config.speaker_hold)
            {
                self.outputs.push_back(Output::ActiveSpeakerChanged {
                    call: cid,
                    participant: Some(p),
                });
            }
        }
    }

    /// The next queued output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// The active speaker of a call.
    pub fn active_speaker(&self, call: CallId) -> Option<ParticipantId> {
        self.calls.get(&call)?.speaker.current
    }

    /// The counters of a live call.
    pub fn call_counters(&self, call: CallId) -> Option<&Counters> {
        self.calls.get(&call).map(|c| &c.counters)
    }

    /// Every live call with its counters (for the Prometheus rendering).
    pub fn calls(&self) -> impl Iterator<Item = (CallId, &Counters)> {
        self.calls.iter().map(|(&id, c)| (id, &c.counters))
    }

    /// Totals since the start: every call, removed ones included, and the
    /// packets of no call.
    pub fn counters(&self) -> Counters {
        let mut t = self.unattributed;
        t.add(&self.retired);
        for c in self.calls.values() {
            t.add(&c.counters);
        }
        t
    }

    /// Numbers of (calls, participants, tracks, active subscriptions).
    pub fn sizes(&self) -> (usize, usize, usize, usize) {
        let subs = self.tracks.values().map(|t| t.outs.len()).sum();
        (
            self.calls.len(),
            self.participants.len(),
            self.tracks.values().count(),
            subs,
        )
    }
}
