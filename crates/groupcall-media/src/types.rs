//! Plain data types shared by the peer, the sources and the sinks.

use std::sync::Arc;
use std::time::Instant;

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrackKind {
    /// Opus audio (48 kHz RTP clock).
    Audio,
    /// VP8 video (90 kHz RTP clock).
    Video,
}

impl TrackKind {
    /// RTP clock rate of the codec used for this kind (Opus 48 kHz, VP8 90 kHz).
    pub fn clock_rate(self) -> u32 {
        match self {
            TrackKind::Audio => 48_000,
            TrackKind::Video => 90_000,
        }
    }

    /// `"audio"` or `"video"`, as in SDP.
    pub fn as_str(self) -> &'static str {
        match self {
            TrackKind::Audio => "audio",
            TrackKind::Video => "video",
        }
    }
}

impl std::fmt::Display for TrackKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a local stream is (MSC3077 `purpose`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeedPurpose {
    /// Camera and/or microphone (`m.usermedia`).
    Usermedia,
    /// Screen sharing (`m.screenshare`).
    Screenshare,
}

impl FeedPurpose {
    /// The MSC3077 wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            FeedPurpose::Usermedia => "m.usermedia",
            FeedPurpose::Screenshare => "m.screenshare",
        }
    }
}

/// One local stream to send: its msid stream id and up to one audio and one
/// video track. The SDP carries `a=msid:<stream_id> <track_id>` for each
/// track, so the remote can look the stream up in `sdp_stream_metadata`.
///
/// Ids must be 1 to 64 RFC 8830 token characters (letters, digits and
/// ``!#$%&'*+-.^_`{|}~``); UUIDs qualify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFeed {
    /// The msid stream id (the key of `sdp_stream_metadata`).
    pub stream_id: String,
    /// Usermedia or screenshare.
    pub purpose: FeedPurpose,
    /// Track id of the Opus audio track, if any.
    pub audio_track_id: Option<String>,
    /// Track id of the VP8 video track, if any.
    pub video_track_id: Option<String>,
}

impl LocalFeed {
    /// A usermedia feed with audio and video tracks named `<stream_id>-audio`
    /// and `<stream_id>-video`.
    pub fn usermedia(stream_id: impl Into<String>) -> Self {
        let stream_id = stream_id.into();
        Self {
            audio_track_id: Some(format!("{stream_id}-audio")),
            video_track_id: Some(format!("{stream_id}-video")),
            stream_id,
            purpose: FeedPurpose::Usermedia,
        }
    }

    /// A video-only screenshare feed with track `<stream_id>-video`.
    pub fn screenshare(stream_id: impl Into<String>) -> Self {
        let stream_id = stream_id.into();
        Self {
            audio_track_id: None,
            video_track_id: Some(format!("{stream_id}-video")),
            stream_id,
            purpose: FeedPurpose::Screenshare,
        }
    }
}

/// An encoded frame received from the remote peer.
#[derive(Debug, Clone)]
pub struct Frame {
    /// msid stream id of the remote track.
    pub stream_id: Arc<str>,
    /// msid track id of the remote track.
    pub track_id: Arc<str>,
    /// Audio (one Opus packet) or video (one VP8 frame).
    pub kind: TrackKind,
    /// The encoded data.
    pub data: Arc<[u8]>,
    /// RTP timestamp, extended to 64 bits, in the kind's clock rate.
    pub rtp_time: u64,
    /// Whether this is a VP8 key frame (always false for audio).
    pub keyframe: bool,
    /// False when packets were lost right before this frame.
    pub contiguous: bool,
    /// When the first packet of the frame arrived.
    pub received_at: Instant,
    /// The simulcast layer (RID) it came on, when the sender sends
    /// simulcast.
    pub rid: Option<crate::Rid>,
}

/// An ICE candidate for trickling, in the shape Matrix `m.call.candidates`
/// uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceCandidate {
    /// `candidate:...` attribute value (without `a=`).
    pub candidate: String,
    /// The mid of the m-line the candidate belongs to (the first, BUNDLE).
    pub sdp_mid: Option<String>,
    /// Index of that m-line.
    pub sdp_m_line_index: Option<u16>,
}

/// Frame/byte counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames (audio packets or video frames).
    pub frames: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// VP8 key frames.
    pub keyframes: u64,
}

impl Counters {
    pub(crate) fn add(&mut self, len: usize, keyframe: bool) {
        self.frames += 1;
        self.bytes += len as u64;
        if keyframe {
            self.keyframes += 1;
        }
    }
}

/// State of one remote track as seen by [`crate::MediaPeer::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTrackStats {
    /// msid stream id.
    pub stream_id: String,
    /// msid track id.
    pub track_id: String,
    /// Audio or video.
    pub kind: TrackKind,
    /// The m-line's mid.
    pub mid: String,
    /// Whether the remote currently sends this track.
    pub active: bool,
    /// Received frames (on a forwarding peer: RTP packets, `keyframes`
    /// counting the first packets of VP8 key frames).
    pub received: Counters,
}

/// State of one local track as seen by [`crate::MediaPeer::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalTrackStats {
    /// msid stream id.
    pub stream_id: String,
    /// msid track id.
    pub track_id: String,
    /// Audio or video.
    pub kind: TrackKind,
    /// The m-line's mid, when negotiated.
    pub mid: Option<String>,
    /// Whether the track is muted.
    pub muted: bool,
    /// Whether a source is attached.
    pub has_source: bool,
    /// Frames handed to the WebRTC stack (on a forwarding peer: RTP
    /// packets written, `keyframes` counting first packets of VP8 key
    /// frames).
    pub sent: Counters,
}

/// A snapshot of a peer's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Whether ICE and DTLS are up.
    pub connected: bool,
    /// Local tracks.
    pub local: Vec<LocalTrackStats>,
    /// Remote tracks, including ended ones (`active == false`).
    pub remote: Vec<RemoteTrackStats>,
    /// Frames not delivered as events because the event queue was full.
    pub frames_dropped: u64,
    /// Media frames on m-lines without a known remote track.
    pub frames_unmatched: u64,
    /// The candidate pair DTLS and media go over, once known.
    pub selected_pair: Option<SelectedPair>,
    /// The TURN allocations of this peer.
    pub relays: Vec<RelayStats>,
    /// How long gathering took, once it finished.
    pub gathering_time: Option<std::time::Duration>,
    /// Forwarding peers: RTP packets asked to be written but dropped
    /// (unknown or not yet negotiated m-line, not connected).
    pub rtp_write_dropped: u64,
    /// Forwarding peers: NACKs the remote sent for our local tracks (str0m
    /// answers them from its send buffer for packets written `nackable`),
    /// as of str0m's last egress report (every 250 ms).
    pub nacks_received: u64,
    /// Forwarding peers: RTP packets str0m re-sent from its send buffer in
    /// answer to those NACKs (its count of packets sent on our local
    /// m-lines less the packets written on them, as of the same report:
    /// a lower bound while packets are queued).
    pub rtp_resent: u64,
    /// Forwarding peers: the highest fraction of packets lost, in per
    /// mille, that the remote's newest receiver reports gave for one of
    /// our local streams (None: no receiver report yet).
    pub egress_loss_permille: Option<u16>,
    /// When str0m's egress report carrying that loss was made: a reader
    /// polling more often than receiver reports come tells a new report
    /// from the one it saw already by this.
    pub egress_loss_at: Option<std::time::Instant>,
    /// Data channel messages dropped on receipt (binary, not UTF-8, or on
    /// another channel than the first one opened).
    pub channel_messages_dropped: u64,
}

/// The candidate pair in use (as seen from what we send).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectedPair {
    /// Our side: a socket address, or a TURN relayed address.
    pub local: std::net::SocketAddr,
    /// The remote candidate's address.
    pub remote: std::net::SocketAddr,
    /// Whether `local` is a relayed address (media goes through TURN).
    pub relayed: bool,
}

/// One TURN allocation of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayStats {
    /// The `turn:` URL it came from.
    pub url: String,
    /// The server's address.
    pub server: std::net::SocketAddr,
    /// The relayed address (also after the allocation was lost).
    pub relayed: Option<std::net::SocketAddr>,
    /// Why allocating failed or the allocation was lost.
    pub error: Option<String>,
    /// Packets relayed to peers.
    pub packets_sent: u64,
    /// Payload bytes relayed to peers.
    pub bytes_sent: u64,
    /// Packets received from peers through the relay.
    pub packets_received: u64,
    /// Payload bytes received from peers through the relay.
    pub bytes_received: u64,
    /// Of the packets sent, how many went as ChannelData.
    pub channel_data_sent: u64,
    /// Of the packets received, how many came as ChannelData.
    pub channel_data_received: u64,
    /// Peer IPs with an installed permission.
    pub permissions: usize,
    /// Peer addresses with a bound channel.
    pub channels: usize,
}
