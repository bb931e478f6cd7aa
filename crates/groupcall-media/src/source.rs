//! Encoded media sources: Ogg/Opus files, IVF/VP8 files, and built-in
//! media (a 440 Hz tone and a moving test pattern) embedded in the crate.
//!
//! A source hands out frames with their durations; the peer paces them in
//! real time and keeps RTP timestamps continuous, also across loops.
//!
//! The built-in files were made once on Debian 12 with `ffmpeg` 5.1 (libopus,
//! libvpx); see the crate README for the exact commands.

use std::path::Path;
use std::sync::Arc;

use crate::ivf::{IvfError, IvfReader, vp8_frame_info};
use crate::ogg::{OggError, OggOpusStream};
use crate::types::TrackKind;

/// 2 s of a 440 Hz sine, mono Opus, 20 ms packets, in Ogg.
pub const BUILTIN_TONE_OGG: &[u8] = include_bytes!("../media/tone.ogg");

/// The level of [`BUILTIN_TONE_OGG`], -dBov (RFC 6464: 0 the loudest, 127
/// silence): the RMS of every 20 ms of its decoded audio is -21.1 to -21.2
/// dBFS (`ffmpeg -i media/tone.ogg -af
/// asetnsamples=n=960,astats=metadata=1:reset=1,ametadata=print:key=lavfi.astats.Overall.RMS_level
/// -f null -`), a 440 Hz sine of amplitude 1/8.
pub const TONE_LEVEL: u8 = 21;

/// The RFC 6464 level of silence, -dBov.
pub const SILENCE_LEVEL: u8 = 127;

/// Whether an Opus packet carries nothing audible: at most 3 bytes, the
/// size of a DTX frame or of a CELT silence frame (as
/// [`OggOpusSource::silence`] sends). Real audio takes more.
pub fn opus_is_silence(packet: &[u8]) -> bool {
    packet.len() <= 3
}

/// 2 s of ffmpeg's `testsrc` pattern, VP8 320x240 at 30 fps, a key frame
/// every 15 frames, in IVF.
pub const BUILTIN_PATTERN_IVF: &[u8] = include_bytes!("../media/pattern.ivf");

/// The simulcast layers of the built-in pattern (issue 12): 2 s of ffmpeg's
/// `testsrc` at 30 fps, VP8, a key frame every 15 frames on the same frames
/// in every layer, lowest first. Each entry: (RID, width, height, IVF).
/// Bitrates about 130, 350 and 900 kbit/s.
pub const BUILTIN_PATTERN_LAYERS: [(&str, u16, u16, &[u8]); 3] = [
    ("q", 320, 180, include_bytes!("../media/layer-180.ivf")),
    ("h", 640, 360, include_bytes!("../media/layer-360.ivf")),
    ("f", 1280, 720, include_bytes!("../media/layer-720.ivf")),
];

/// Errors opening a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading the file failed.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The Ogg/Opus data is invalid.
    #[error(transparent)]
    Ogg(#[from] OggError),
    /// The IVF data is invalid.
    #[error(transparent)]
    Ivf(#[from] IvfError),
    /// The file holds no usable frames.
    #[error("no frames in source")]
    Empty,
    /// A simulcast layer was refused (see [`SimulcastSource::new`]).
    #[error("simulcast layer: {0}")]
    BadLayer(String),
    /// The IVF file is not VP8.
    #[error("unsupported codec {0:?} (only VP8 is supported)")]
    UnsupportedCodec(String),
}

/// One encoded frame from a source.
#[derive(Debug, Clone)]
pub struct SourceFrame {
    /// Encoded data (one Opus packet or one VP8 frame).
    pub data: Arc<[u8]>,
    /// Duration in RTP clock ticks of the kind (48 kHz audio, 90 kHz video).
    pub duration: u32,
    /// Whether this is a VP8 key frame.
    pub keyframe: bool,
    /// Audio: the frame's level, -dBov (RFC 6464, 0 the loudest, 127
    /// silence), sent in the `ssrc-audio-level` header extension; `None`
    /// when unknown (then only a silent packet is marked, as silence).
    pub audio_level: Option<u8>,
}

/// Something that produces encoded frames for one track.
pub trait FrameSource: Send + 'static {
    /// Audio or video.
    fn kind(&self) -> TrackKind;
    /// The next frame; `None` when the source is exhausted.
    fn next_frame(&mut self) -> Option<SourceFrame>;
    /// Asks for the next frame to be a key frame. Returns whether the source
    /// could arrange that.
    fn request_keyframe(&mut self) -> bool {
        false
    }
    /// Simulcast: the RIDs of the layers this source makes, lowest first
    /// (empty, the default: one layer). A peer whose remote accepted these
    /// RIDs calls [`FrameSource::next_layers`]; otherwise it calls
    /// [`FrameSource::next_frame`], which then gives the layer meant for a
    /// remote without simulcast.
    fn rids(&self) -> &[String] {
        &[]
    }
    /// Simulcast: the next frame of every layer (in the order of
    /// [`FrameSource::rids`]), for one instant: all have the same duration
    /// and are sent with the same RTP timestamp. `out` is cleared first;
    /// returns false when the source is exhausted. The default gives the
    /// one layer of [`FrameSource::next_frame`].
    fn next_layers(&mut self, out: &mut Vec<SourceFrame>) -> bool {
        out.clear();
        match self.next_frame() {
            Some(f) => {
                out.push(f);
                true
            }
            None => false,
        }
    }
    /// Simulcast: asks for the next frame of layer `layer` (an index into
    /// [`FrameSource::rids`]) to be a key frame, the other layers unchanged.
    /// The default asks the whole source.
    fn request_layer_keyframe(&mut self, layer: usize) -> bool {
        let _ = layer;
        self.request_keyframe()
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, SourceError> {
    std::fs::read(path).map_err(|source| SourceError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Opus packets from an Ogg Opus file, looping by default.
///
/// Opus is not decoded here, so the level of a packet
/// ([`SourceFrame::audio_level`]) is what the source was told
/// ([`OggOpusSource::set_audio_level`]; the built-in tone knows its own,
/// [`TONE_LEVEL`]), except that a silent packet ([`opus_is_silence`]) is
/// always at [`SILENCE_LEVEL`].
#[derive(Debug, Clone)]
pub struct OggOpusSource {
    packets: Arc<[(Arc<[u8]>, u32)]>,
    pos: usize,
    looping: bool,
    level: Option<u8>,
}

impl OggOpusSource {
    /// Parses an Ogg Opus file held in memory.
    pub fn from_bytes(data: &[u8]) -> Result<Self, SourceError> {
        let stream = OggOpusStream::parse(data)?;
        let packets: Vec<(Arc<[u8]>, u32)> = stream
            .packets
            .into_iter()
            .filter(|p| !p.data.is_empty())
            .map(|p| (Arc::from(p.data), p.samples))
            .collect();
        if packets.is_empty() {
            return Err(SourceError::Empty);
        }
        Ok(Self {
            packets: packets.into(),
            pos: 0,
            looping: true,
            level: None,
        })
    }

    /// Reads an Ogg Opus file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        Self::from_bytes(&read_file(path.as_ref())?)
    }

    /// The built-in 440 Hz tone. Should the embedded file ever fail to
    /// parse, this falls back to Opus silence frames.
    pub fn tone() -> Self {
        match Self::from_bytes(BUILTIN_TONE_OGG) {
            Ok(mut s) => {
                s.level = Some(TONE_LEVEL);
                s
            }
            Err(e) => {
                tracing::error!(error = %e, "built-in tone unreadable, sending silence");
                Self::silence()
            }
        }
    }

    /// 20 ms Opus silence frames (CELT fullband, the common "silence" packet).
    pub fn silence() -> Self {
        let frame: Arc<[u8]> = Arc::from(&[0xf8u8, 0xff, 0xfe][..]);
        Self {
            packets: vec![(frame, 960)].into(),
            pos: 0,
            looping: true,
            level: Some(SILENCE_LEVEL),
        }
    }

    /// The level of this source's audible packets, -dBov (0..=127; more
    /// reads as 127), when the application knows it (`None`, the default
    /// for files: unknown, no level is sent but for silent packets).
    pub fn set_audio_level(&mut self, level: Option<u8>) {
        self.level = level.map(|l| l.min(SILENCE_LEVEL));
    }

    /// Whether to start over at the end (default true).
    pub fn set_looping(&mut self, looping: bool) {
        self.looping = looping;
    }

    /// Number of packets in one pass.
    pub fn len(&self) -> usize {
        self.packets.len()
    }

    /// Whether there are no packets (never true for a constructed source).
    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }
}

impl FrameSource for OggOpusSource {
    fn kind(&self) -> TrackKind {
        TrackKind::Audio
    }

    fn next_frame(&mut self) -> Option<SourceFrame> {
        if self.pos >= self.packets.len() {
            if !self.looping || self.packets.is_empty() {
                return None;
            }
            self.pos = 0;
        }
        let (data, samples) = self.packets.get(self.pos)?.clone();
        self.pos += 1;
        let audio_level = if opus_is_silence(&data) {
            Some(SILENCE_LEVEL)
        } else {
            self.level
        };
        Some(SourceFrame {
            data,
            duration: samples,
            keyframe: false,
            audio_level,
        })
    }
}

/// VP8 frames from an IVF file, looping by default. Answers key frame
/// requests by skipping ahead to the next key frame.
#[derive(Debug, Clone)]
pub struct IvfSource {
    frames: Arc<[SourceFrame]>,
    pos: usize,
    looping: bool,
    width: u16,
    height: u16,
}

impl IvfSource {
    /// Parses an IVF/VP8 file held in memory.
    pub fn from_bytes(data: &[u8]) -> Result<Self, SourceError> {
        let reader = IvfReader::new(data)?;
        let header = reader.header().clone();
        if &header.fourcc != b"VP80" {
            return Err(SourceError::UnsupportedCodec(
                String::from_utf8_lossy(&header.fourcc).into_owned(),
            ));
        }
        let raw = reader.frames()?;
        // Time base: timestamps count in num/den seconds. Fall back to 30 fps.
        let (num, den) = if header.timebase_den == 0 || header.timebase_num == 0 {
            (1u64, 30u64)
        } else {
            (header.timebase_num as u64, header.timebase_den as u64)
        };
        let to_ticks = |pts_delta: u64| -> u32 {
            let t = pts_delta.saturating_mul(90_000).saturating_mul(num) / den;
            t.clamp(1, 90_000) as u32
        };
        let default_delta = to_ticks(1);
        let mut frames = Vec::with_capacity(raw.len());
        let mut last_delta = default_delta;
        for (i, f) in raw.iter().enumerate() {
            if f.data.is_empty() {
                continue;
            }
            let duration = match raw.get(i + 1) {
                Some(next) if next.pts > f.pts => to_ticks(next.pts - f.pts),
                _ => last_delta,
            };
            last_delta = duration;
            let keyframe = vp8_frame_info(f.data).is_some_and(|i| i.keyframe);
            frames.push(SourceFrame {
                data: Arc::from(f.data),
                duration,
                keyframe,
                audio_level: None,
            });
        }
        // Start at the first key frame; drop leading delta frames.
        let first_key = frames
            .iter()
            .position(|f| f.keyframe)
            .ok_or(SourceError::Empty)?;
        frames.drain(..first_key);
        Ok(Self {
            frames: frames.into(),
            pos: 0,
            looping: true,
            width: header.width,
            height: header.height,
        })
    }

    /// Reads an IVF/VP8 file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        Self::from_bytes(&read_file(path.as_ref())?)
    }

    /// The built-in moving test pattern (320x240, 30 fps).
    pub fn test_pattern() -> Result<Self, SourceError> {
        Self::from_bytes(BUILTIN_PATTERN_IVF)
    }

    /// Whether to start over at the end (default true).
    pub fn set_looping(&mut self, looping: bool) {
        self.looping = looping;
    }

    /// Frame size from the file header.
    pub fn dimensions(&self) -> (u16, u16) {
        (self.width, self.height)
    }

    /// Number of frames in one pass.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether there are no frames (never true for a constructed source).
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

impl FrameSource for IvfSource {
    fn kind(&self) -> TrackKind {
        TrackKind::Video
    }

    fn next_frame(&mut self) -> Option<SourceFrame> {
        if self.pos >= self.frames.len() {
            if !self.looping || self.frames.is_empty() {
                return None;
            }
            self.pos = 0;
        }
        let f = self.frames.get(self.pos)?.clone();
        self.pos += 1;
        Some(f)
    }

    fn request_keyframe(&mut self) -> bool {
        if self.frames.get(self.pos).is_some_and(|f| f.keyframe) {
            return true;
        }
        let next = self
            .frames
            .iter()
            .skip(self.pos)
            .position(|f| f.keyframe)
            .map(|i| i + self.pos);
        match next {
            Some(i) => self.pos = i,
            // Wrap: the first frame is a key frame by construction.
            None if self.looping => self.pos = 0,
            None => return false,
        }
        true
    }
}

/// A simulcast source: one source per layer, paced together (issue 12).
///
/// Layers are given lowest first, each with its RID. Through
/// [`FrameSource::next_layers`] every layer gives its next frame for the
/// same instant (the first layer's duration is the step). Through
/// [`FrameSource::next_frame`] (a remote that did not accept simulcast) it
/// gives the frames of one layer, the *fallback* layer (by default the
/// middle one), while the other layers stay in step.
pub struct SimulcastSource {
    rids: Vec<String>,
    layers: Vec<Box<dyn FrameSource>>,
    fallback: usize,
    scratch: Vec<SourceFrame>,
}

impl std::fmt::Debug for SimulcastSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulcastSource")
            .field("rids", &self.rids)
            .field("fallback", &self.fallback)
            .finish_non_exhaustive()
    }
}

impl SimulcastSource {
    /// Layers, lowest first: (RID, source). Errors when there is no layer,
    /// a RID is empty, not alphanumeric or longer than 8 characters
    /// (RFC 8851 allows more; str0m keeps 8), used twice, or a layer
    /// is not video.
    pub fn new(layers: Vec<(String, Box<dyn FrameSource>)>) -> Result<Self, SourceError> {
        if layers.is_empty() {
            return Err(SourceError::Empty);
        }
        let mut rids: Vec<String> = Vec::with_capacity(layers.len());
        let mut sources = Vec::with_capacity(layers.len());
        for (rid, src) in layers {
            if !valid_rid(&rid) || rids.contains(&rid) {
                return Err(SourceError::BadLayer(format!(
                    "invalid or repeated RID {rid:?}"
                )));
            }
            if src.kind() != TrackKind::Video {
                return Err(SourceError::BadLayer(format!("layer {rid:?} is not video")));
            }
            rids.push(rid);
            sources.push(src);
        }
        let fallback = rids.len() / 2;
        Ok(Self {
            rids,
            layers: sources,
            fallback,
            scratch: Vec::new(),
        })
    }

    /// The built-in pattern in its three layers
    /// ([`BUILTIN_PATTERN_LAYERS`]: "q" 320x180, "h" 640x360, "f"
    /// 1280x720); "h" for a remote without simulcast.
    pub fn test_pattern() -> Result<Self, SourceError> {
        let mut layers: Vec<(String, Box<dyn FrameSource>)> = Vec::new();
        for (rid, _, _, ivf) in BUILTIN_PATTERN_LAYERS {
            layers.push((rid.to_string(), Box::new(IvfSource::from_bytes(ivf)?)));
        }
        Self::new(layers)
    }

    /// The layer sent to a remote without simulcast (an index into the
    /// RIDs); out of range is ignored.
    pub fn set_fallback(&mut self, layer: usize) {
        if layer < self.layers.len() {
            self.fallback = layer;
        }
    }
}

/// Whether `rid` is a RID we send: 1 to 8 ASCII letters or digits.
pub fn valid_rid(rid: &str) -> bool {
    !rid.is_empty() && rid.len() <= 8 && rid.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl FrameSource for SimulcastSource {
    fn kind(&self) -> TrackKind {
        TrackKind::Video
    }

    fn next_frame(&mut self) -> Option<SourceFrame> {
        let mut scratch = std::mem::take(&mut self.scratch);
        let ok = self.next_layers(&mut scratch);
        let f = if ok {
            scratch.get(self.fallback).cloned()
        } else {
            None
        };
        self.scratch = scratch;
        f
    }

    fn request_keyframe(&mut self) -> bool {
        let mut all = true;
        for l in &mut self.layers {
            all &= l.request_keyframe();
        }
        all
    }

    fn rids(&self) -> &[String] {
        &self.rids
    }

    fn next_layers(&mut self, out: &mut Vec<SourceFrame>) -> bool {
        out.clear();
        let mut step = None;
        for l in &mut self.layers {
            let Some(mut f) = l.next_frame() else {
                out.clear();
                return false;
            };
            // Paced together: the first layer's duration for all.
            let d = *step.get_or_insert(f.duration);
            f.duration = d;
            out.push(f);
        }
        true
    }

    fn request_layer_keyframe(&mut self, layer: usize) -> bool {
        self.layers
            .get_mut(layer)
            .is_some_and(|l| l.request_keyframe())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn tone_loops_forever() {
        let mut s = OggOpusSource::tone();
        assert_eq!(s.len(), 101);
        let total: u64 = (0..250)
            .map(|_| s.next_frame().unwrap().duration as u64)
            .sum();
        assert_eq!(total, 250 * 960);
    }

    #[test]
    fn audio_levels_of_the_tone_silence_and_files() {
        let mut tone = OggOpusSource::tone();
        let levels: Vec<Option<u8>> = (0..tone.len())
            .map(|_| tone.next_frame().unwrap().audio_level)
            .collect();
        assert!(levels.iter().all(|l| *l == Some(TONE_LEVEL)), "{levels:?}");
        let mut silence = OggOpusSource::silence();
        assert_eq!(
            silence.next_frame().unwrap().audio_level,
            Some(SILENCE_LEVEL)
        );
        // A file's level is unknown until the application says.
        let mut file = OggOpusSource::from_bytes(BUILTIN_TONE_OGG).unwrap();
        assert_eq!(file.next_frame().unwrap().audio_level, None);
        file.set_audio_level(Some(200));
        assert_eq!(file.next_frame().unwrap().audio_level, Some(SILENCE_LEVEL));
        file.set_audio_level(Some(40));
        assert_eq!(file.next_frame().unwrap().audio_level, Some(40));
        assert!(opus_is_silence(&[0xf8, 0xff, 0xfe]));
        assert!(!opus_is_silence(&[0xfc, 1, 2, 3]));
        let mut video = IvfSource::test_pattern().unwrap();
        assert_eq!(video.next_frame().unwrap().audio_level, None);
    }

    #[test]
    fn pattern_keyframes() {
        let mut s = IvfSource::test_pattern().unwrap();
        assert_eq!(s.dimensions(), (320, 240));
        let f = s.next_frame().unwrap();
        assert!(f.keyframe);
        assert_eq!(f.duration, 3000);
        s.next_frame().unwrap();
        assert!(s.request_keyframe());
        assert!(s.next_frame().unwrap().keyframe);
        let mut s2 = s.clone();
        s2.set_looping(false);
        let n = std::iter::from_fn(|| s2.next_frame()).count();
        assert!(n < 60);
    }

    #[test]
    fn simulcast_pattern_layers_step_together() {
        let mut s = SimulcastSource::test_pattern().unwrap();
        assert_eq!(s.rids(), ["q", "h", "f"]);
        let mut out = Vec::new();
        assert!(s.next_layers(&mut out));
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|f| f.keyframe && f.duration == 3000));
        // Sizes grow with the layer.
        assert!(out[0].data.len() < out[1].data.len() && out[1].data.len() < out[2].data.len());
        assert!(s.next_layers(&mut out));
        assert!(out.iter().all(|f| !f.keyframe));
        // A key frame on the top layer only.
        assert!(s.request_layer_keyframe(2));
        assert!(s.next_layers(&mut out));
        assert_eq!(
            out.iter().map(|f| f.keyframe).collect::<Vec<_>>(),
            [false, false, true]
        );
        // One layer for a remote without simulcast: the middle one, in step.
        let mut h2 = IvfSource::from_bytes(BUILTIN_PATTERN_LAYERS[1].3).unwrap();
        let mut s2 = SimulcastSource::test_pattern().unwrap();
        for _ in 0..20 {
            assert_eq!(s2.next_frame().unwrap().data, h2.next_frame().unwrap().data);
        }
        assert!(!s.request_layer_keyframe(7));
    }

    #[test]
    fn simulcast_source_refuses_bad_layers() {
        let pat = || -> Box<dyn FrameSource> { Box::new(IvfSource::test_pattern().unwrap()) };
        assert!(SimulcastSource::new(Vec::new()).is_err());
        assert!(SimulcastSource::new(vec![("a".into(), pat()), ("a".into(), pat())]).is_err());
        assert!(SimulcastSource::new(vec![("".into(), pat())]).is_err());
        assert!(SimulcastSource::new(vec![("a b".into(), pat())]).is_err());
        assert!(SimulcastSource::new(vec![("a".into(), Box::new(OggOpusSource::tone()))]).is_err());
        assert!(valid_rid("q") && valid_rid("r0") && !valid_rid("x;y"));
    }

    #[test]
    fn bad_files() {
        assert!(OggOpusSource::from_bytes(b"nope").is_err());
        assert!(IvfSource::from_bytes(b"DKIF").is_err());
        assert!(OggOpusSource::open("/nonexistent/file.ogg").is_err());
    }
}
