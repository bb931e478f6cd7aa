//! Sinks for received frames: counters, and recorders that write Ogg/Opus
//! and IVF/VP8 files that ordinary players open.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::Path;

use crate::ivf::{IvfError, IvfHeader, IvfWriter, vp8_frame_info};
use crate::ogg::{OggError, OggOpusWriter, opus_packet_is_stereo};
use crate::types::{Counters, Frame, TrackKind};

/// Errors of a sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The Ogg writer failed.
    #[error(transparent)]
    Ogg(#[from] OggError),
    /// The IVF writer failed.
    #[error(transparent)]
    Ivf(#[from] IvfError),
    /// The sink was already finished.
    #[error("sink already finished")]
    Finished,
}

/// Receives the frames of the tracks it was attached to.
pub trait FrameSink: Send + 'static {
    /// Handles one frame.
    fn write_frame(&mut self, frame: &Frame) -> Result<(), SinkError>;
    /// Completes the output (headers, end of stream). Called once, when the
    /// sink is detached or the peer closes.
    fn finish(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
}

/// Which frames a sink receives; `None` fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkFilter {
    /// Only this msid stream id.
    pub stream_id: Option<String>,
    /// Only this msid track id.
    pub track_id: Option<String>,
    /// Only this kind.
    pub kind: Option<TrackKind>,
    /// Only this simulcast layer (RID).
    pub rid: Option<String>,
}

impl SinkFilter {
    /// Matches every frame of `kind`.
    pub fn kind(kind: TrackKind) -> Self {
        Self {
            kind: Some(kind),
            ..Default::default()
        }
    }

    /// Matches the frames of `kind` in stream `stream_id`.
    pub fn stream(stream_id: impl Into<String>, kind: TrackKind) -> Self {
        Self {
            stream_id: Some(stream_id.into()),
            kind: Some(kind),
            ..Default::default()
        }
    }

    /// Whether `frame` passes the filter.
    pub fn matches(&self, frame: &Frame) -> bool {
        self.stream_id
            .as_deref()
            .is_none_or(|s| s == &*frame.stream_id)
            && self
                .track_id
                .as_deref()
                .is_none_or(|t| t == &*frame.track_id)
            && self.kind.is_none_or(|k| k == frame.kind)
            && self
                .rid
                .as_deref()
                .is_none_or(|r| frame.rid.is_some_and(|fr| *fr == *r))
    }

    /// Matches the video frames of one simulcast layer.
    pub fn layer(rid: impl Into<String>) -> Self {
        Self {
            kind: Some(TrackKind::Video),
            rid: Some(rid.into()),
            ..Default::default()
        }
    }
}

/// Counts frames, bytes and key frames. Shares its counts through a handle.
#[derive(Debug, Clone, Default)]
pub struct CounterSink {
    counts: std::sync::Arc<std::sync::Mutex<Counters>>,
}

impl CounterSink {
    /// A new counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Current counts.
    pub fn counters(&self) -> Counters {
        match self.counts.lock() {
            Ok(c) => *c,
            Err(p) => *p.into_inner(),
        }
    }
}

impl FrameSink for CounterSink {
    fn write_frame(&mut self, frame: &Frame) -> Result<(), SinkError> {
        let mut c = match self.counts.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        c.add(frame.data.len(), frame.keyframe);
        Ok(())
    }
}

enum OggState<W: Write> {
    Waiting(W),
    Writing(OggOpusWriter<W>),
    Done,
}

/// Records Opus audio frames into an Ogg Opus file.
///
/// Granule positions count the samples of the packets written (from each
/// packet's TOC byte); gaps from lost packets are not filled. Pre-skip is
/// 312 samples (libopus' usual encoder delay). The channel count comes from
/// the stereo flag of the first packet.
pub struct OggOpusRecorder<W: Write + Send + 'static> {
    state: OggState<W>,
}

impl OggOpusRecorder<BufWriter<File>> {
    /// Creates (truncates) `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        Ok(Self::new(BufWriter::new(File::create(path)?)))
    }
}

impl<W: Write + Send + 'static> OggOpusRecorder<W> {
    /// Records into `out`.
    pub fn new(out: W) -> Self {
        Self {
            state: OggState::Waiting(out),
        }
    }

    /// Finishes the file and returns the writer (None if already finished).
    pub fn into_inner(mut self) -> Result<Option<W>, SinkError> {
        match std::mem::replace(&mut self.state, OggState::Done) {
            OggState::Waiting(out) => {
                let w = OggOpusWriter::new(out, 1, 312, "groupcall-media")?;
                Ok(Some(w.finish()?))
            }
            OggState::Writing(w) => Ok(Some(w.finish()?)),
            OggState::Done => Ok(None),
        }
    }
}

impl<W: Write + Send + 'static> FrameSink for OggOpusRecorder<W> {
    fn write_frame(&mut self, frame: &Frame) -> Result<(), SinkError> {
        if frame.kind != TrackKind::Audio || frame.data.is_empty() {
            return Ok(());
        }
        let state = std::mem::replace(&mut self.state, OggState::Done);
        let mut writer = match state {
            OggState::Waiting(out) => {
                let channels = if opus_packet_is_stereo(&frame.data) {
                    2
                } else {
                    1
                };
                OggOpusWriter::new(out, channels, 312, "groupcall-media")?
            }
            OggState::Writing(w) => w,
            OggState::Done => return Err(SinkError::Finished),
        };
        let r = writer.write_packet(&frame.data);
        self.state = OggState::Writing(writer);
        match r {
            Ok(()) => Ok(()),
            // A malformed packet from the network: skip it, keep recording.
            Err(OggError::BadOpusPacket(why)) => {
                tracing::debug!(why, "skipping malformed Opus packet");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        match std::mem::replace(&mut self.state, OggState::Done) {
            OggState::Waiting(out) => {
                OggOpusWriter::new(out, 1, 312, "groupcall-media")?.finish()?;
            }
            OggState::Writing(w) => {
                w.finish()?;
            }
            OggState::Done => {}
        }
        Ok(())
    }
}

enum IvfState<W: Write + Seek> {
    Waiting(W),
    Writing { w: IvfWriter<W>, first_rtp: u64 },
    Done,
}

/// Records VP8 frames into an IVF file. Recording starts at the first key
/// frame (which gives the dimensions); timestamps are RTP time relative to
/// it, in a 1/90000 s time base. The frame count is patched in at finish.
pub struct IvfRecorder<W: Write + Seek + Send + 'static> {
    state: IvfState<W>,
}

impl IvfRecorder<BufWriter<File>> {
    /// Creates (truncates) `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        Ok(Self::new(BufWriter::new(File::create(path)?)))
    }
}

impl<W: Write + Seek + Send + 'static> IvfRecorder<W> {
    /// Records into `out`.
    pub fn new(out: W) -> Self {
        Self {
            state: IvfState::Waiting(out),
        }
    }
}

impl<W: Write + Seek + Send + 'static> FrameSink for IvfRecorder<W> {
    fn write_frame(&mut self, frame: &Frame) -> Result<(), SinkError> {
        if frame.kind != TrackKind::Video {
            return Ok(());
        }
        let state = std::mem::replace(&mut self.state, IvfState::Done);
        let (mut w, first_rtp) = match state {
            IvfState::Waiting(out) => {
                let size = vp8_frame_info(&frame.data)
                    .filter(|i| i.keyframe)
                    .and_then(|i| i.size);
                let Some((width, height)) = size else {
                    self.state = IvfState::Waiting(out);
                    return Ok(());
                };
                let header = IvfHeader {
                    fourcc: *b"VP80",
                    width,
                    height,
                    timebase_den: 90_000,
                    timebase_num: 1,
                    frame_count: 0,
                };
                (IvfWriter::new(out, header)?, frame.rtp_time)
            }
            IvfState::Writing { w, first_rtp } => (w, first_rtp),
            IvfState::Done => return Err(SinkError::Finished),
        };
        let pts = frame.rtp_time.saturating_sub(first_rtp);
        let r = w.write_frame(&frame.data, pts);
        self.state = IvfState::Writing { w, first_rtp };
        r.map_err(Into::into)
    }

    fn finish(&mut self) -> Result<(), SinkError> {
        match std::mem::replace(&mut self.state, IvfState::Done) {
            IvfState::Waiting(mut out) => {
                // No key frame ever arrived: leave a valid empty file.
                let header = IvfHeader {
                    fourcc: *b"VP80",
                    width: 0,
                    height: 0,
                    timebase_den: 90_000,
                    timebase_num: 1,
                    frame_count: 0,
                };
                IvfWriter::new(&mut out, header)?.finish()?;
                out.flush()?;
            }
            IvfState::Writing { w, .. } => {
                w.finish()?;
            }
            IvfState::Done => {}
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::ivf::IvfReader;
    use crate::ogg::OggOpusStream;
    use crate::source::{FrameSource, IvfSource, OggOpusSource};
    use std::io::Cursor;
    use std::sync::Arc;
    use std::time::Instant;

    fn frame(kind: TrackKind, data: Arc<[u8]>, rtp: u64, keyframe: bool) -> Frame {
        Frame {
            stream_id: Arc::from("s"),
            track_id: Arc::from("t"),
            kind,
            data,
            rtp_time: rtp,
            keyframe,
            contiguous: true,
            received_at: Instant::now(),
            rid: None,
        }
    }

    #[test]
    fn records_ogg_that_parses_back() {
        let mut src = OggOpusSource::tone();
        let shared = SharedBuf::default();
        let mut rec = OggOpusRecorder::new(shared.clone());
        let mut rtp = 0;
        for _ in 0..120 {
            let f = src.next_frame().unwrap();
            rec.write_frame(&frame(TrackKind::Audio, f.data, rtp, false))
                .unwrap();
            rtp += f.duration as u64;
        }
        rec.finish().unwrap();
        let bytes = shared.bytes();
        let s = OggOpusStream::parse(&bytes).unwrap();
        assert_eq!(s.packets.len(), 120);
        assert_eq!(s.last_granule, Some(120 * 960));
        assert_eq!(s.head.channels, 1);
    }

    #[test]
    fn records_ivf_starting_at_keyframe() {
        let mut src = IvfSource::test_pattern().unwrap();
        let mut rec = IvfRecorder::new(Cursor::new(Vec::new()));
        // A delta frame first: skipped.
        let f0 = src.next_frame().unwrap();
        let f1 = src.next_frame().unwrap();
        rec.write_frame(&frame(TrackKind::Video, f1.data.clone(), 100, false))
            .unwrap();
        rec.write_frame(&frame(TrackKind::Video, f0.data.clone(), 3100, true))
            .unwrap();
        rec.write_frame(&frame(TrackKind::Video, f1.data.clone(), 6100, false))
            .unwrap();
        let IvfState::Writing { w, .. } = std::mem::replace(&mut rec.state, IvfState::Done) else {
            panic!("not writing");
        };
        let bytes = w.finish().unwrap().into_inner();
        let r = IvfReader::new(&bytes).unwrap();
        assert_eq!(r.header().frame_count, 2);
        assert_eq!((r.header().width, r.header().height), (320, 240));
        let frames = r.frames().unwrap();
        assert_eq!(frames[0].pts, 0);
        assert_eq!(frames[1].pts, 3000);
        assert_eq!(frames[0].data, &f0.data[..]);
    }

    #[test]
    fn filter_matches() {
        let f = frame(TrackKind::Audio, Arc::from(&[1u8][..]), 0, false);
        assert!(SinkFilter::default().matches(&f));
        assert!(SinkFilter::kind(TrackKind::Audio).matches(&f));
        assert!(!SinkFilter::kind(TrackKind::Video).matches(&f));
        assert!(SinkFilter::stream("s", TrackKind::Audio).matches(&f));
        assert!(!SinkFilter::stream("x", TrackKind::Audio).matches(&f));
    }

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl SharedBuf {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
