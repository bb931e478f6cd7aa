//! IVF container (the simple VP8/VP9 file format of libvpx): reader and
//! writer, plus VP8 frame-header helpers. Written for this crate.
//!
//! Layout: a 32-byte file header (`DKIF`, version 0, header size 32, FourCC,
//! width, height, time base denominator and numerator, frame count), then
//! frames, each with a 12-byte header (payload size, 64-bit timestamp).
//! The reader never panics on malformed input; problems are [`IvfError`]s.

use std::io::{Seek, SeekFrom, Write};

/// Largest frame this reader accepts (a guard against hostile input).
pub const MAX_FRAME_SIZE: u32 = 8 << 20;

const FILE_HEADER_LEN: usize = 32;
const FRAME_HEADER_LEN: usize = 12;

/// Errors of the IVF reader and writer.
#[derive(Debug, thiserror::Error)]
pub enum IvfError {
    /// The input ended in the middle of a header or frame.
    #[error("truncated IVF data at byte {offset}")]
    Truncated {
        /// Byte offset where more data was expected.
        offset: usize,
    },
    /// The file does not start with `DKIF`.
    #[error("not an IVF file (bad signature)")]
    BadSignature,
    /// Unknown IVF version.
    #[error("unsupported IVF version {0}")]
    UnsupportedVersion(u16),
    /// The header-size field is smaller than the fixed header.
    #[error("invalid IVF header size {0}")]
    BadHeaderSize(u16),
    /// A frame claims to be larger than [`MAX_FRAME_SIZE`].
    #[error("IVF frame of {0} bytes is too large")]
    FrameTooLarge(u32),
    /// Writing failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The IVF file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IvfHeader {
    /// Codec FourCC, e.g. `VP80`.
    pub fourcc: [u8; 4],
    /// Frame width in pixels.
    pub width: u16,
    /// Frame height in pixels.
    pub height: u16,
    /// Time base denominator (timestamps count in `numerator/denominator` s).
    pub timebase_den: u32,
    /// Time base numerator.
    pub timebase_num: u32,
    /// Frame count as written in the header (may be 0 when unknown).
    pub frame_count: u32,
}

impl IvfHeader {
    fn to_bytes(&self) -> [u8; FILE_HEADER_LEN] {
        let mut h = [0u8; FILE_HEADER_LEN];
        h[0..4].copy_from_slice(b"DKIF");
        h[4..6].copy_from_slice(&0u16.to_le_bytes());
        h[6..8].copy_from_slice(&(FILE_HEADER_LEN as u16).to_le_bytes());
        h[8..12].copy_from_slice(&self.fourcc);
        h[12..14].copy_from_slice(&self.width.to_le_bytes());
        h[14..16].copy_from_slice(&self.height.to_le_bytes());
        h[16..20].copy_from_slice(&self.timebase_den.to_le_bytes());
        h[20..24].copy_from_slice(&self.timebase_num.to_le_bytes());
        h[24..28].copy_from_slice(&self.frame_count.to_le_bytes());
        h
    }
}

/// One IVF frame, borrowing its payload from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IvfFrame<'a> {
    /// Timestamp in time-base units.
    pub pts: u64,
    /// Encoded frame.
    pub data: &'a [u8],
}

/// Reads an in-memory IVF file.
#[derive(Debug, Clone)]
pub struct IvfReader<'a> {
    header: IvfHeader,
    data: &'a [u8],
    pos: usize,
    failed: bool,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl<'a> IvfReader<'a> {
    /// Parses the file header of `data`.
    pub fn new(data: &'a [u8]) -> Result<Self, IvfError> {
        if data.len() >= 4 && &data[..4] != b"DKIF" {
            return Err(IvfError::BadSignature);
        }
        let h = data
            .get(..FILE_HEADER_LEN)
            .ok_or(IvfError::Truncated { offset: data.len() })?;
        let version = le_u16(h, 4);
        if version != 0 {
            return Err(IvfError::UnsupportedVersion(version));
        }
        let header_len = le_u16(h, 6);
        if (header_len as usize) < FILE_HEADER_LEN {
            return Err(IvfError::BadHeaderSize(header_len));
        }
        if data.len() < header_len as usize {
            return Err(IvfError::Truncated { offset: data.len() });
        }
        let header = IvfHeader {
            fourcc: [h[8], h[9], h[10], h[11]],
            width: le_u16(h, 12),
            height: le_u16(h, 14),
            timebase_den: le_u32(h, 16),
            timebase_num: le_u32(h, 20),
            frame_count: le_u32(h, 24),
        };
        Ok(Self {
            header,
            data,
            pos: header_len as usize,
            failed: false,
        })
    }

    /// The file header.
    pub fn header(&self) -> &IvfHeader {
        &self.header
    }

    /// The next frame, `Ok(None)` at a clean end of input.
    pub fn next_frame(&mut self) -> Result<Option<IvfFrame<'a>>, IvfError> {
        if self.failed || self.pos >= self.data.len() {
            return Ok(None);
        }
        let r = self.parse_frame();
        if r.is_err() {
            self.failed = true;
        }
        r.map(Some)
    }

    fn parse_frame(&mut self) -> Result<IvfFrame<'a>, IvfError> {
        let data = self.data;
        let at = self.pos;
        let fh = data
            .get(at..at + FRAME_HEADER_LEN)
            .ok_or(IvfError::Truncated { offset: data.len() })?;
        let size = le_u32(fh, 0);
        if size > MAX_FRAME_SIZE {
            return Err(IvfError::FrameTooLarge(size));
        }
        let mut pts = [0u8; 8];
        pts.copy_from_slice(&fh[4..12]);
        let start = at + FRAME_HEADER_LEN;
        let payload = data
            .get(start..start + size as usize)
            .ok_or(IvfError::Truncated { offset: data.len() })?;
        self.pos = start + size as usize;
        Ok(IvfFrame {
            pts: u64::from_le_bytes(pts),
            data: payload,
        })
    }

    /// Reads all remaining frames.
    pub fn frames(mut self) -> Result<Vec<IvfFrame<'a>>, IvfError> {
        let mut v = Vec::new();
        while let Some(f) = self.next_frame()? {
            v.push(f);
        }
        Ok(v)
    }
}

/// Writes an IVF file. The header is written up front and patched by
/// [`IvfWriter::finish`] with the final frame count.
#[derive(Debug)]
pub struct IvfWriter<W: Write + Seek> {
    out: W,
    header: IvfHeader,
}

impl<W: Write + Seek> IvfWriter<W> {
    /// Writes the header (`frame_count` is filled in by `finish`).
    pub fn new(mut out: W, mut header: IvfHeader) -> Result<Self, IvfError> {
        header.frame_count = 0;
        out.write_all(&header.to_bytes())?;
        Ok(Self { out, header })
    }

    /// Appends a frame with timestamp `pts` (time-base units).
    pub fn write_frame(&mut self, data: &[u8], pts: u64) -> Result<(), IvfError> {
        let len = u32::try_from(data.len())
            .ok()
            .filter(|&l| l <= MAX_FRAME_SIZE)
            .ok_or(IvfError::FrameTooLarge(u32::MAX))?;
        let mut fh = [0u8; FRAME_HEADER_LEN];
        fh[0..4].copy_from_slice(&len.to_le_bytes());
        fh[4..12].copy_from_slice(&pts.to_le_bytes());
        self.out.write_all(&fh)?;
        self.out.write_all(data)?;
        self.header.frame_count = self.header.frame_count.saturating_add(1);
        Ok(())
    }

    /// Frames written so far.
    pub fn frame_count(&self) -> u32 {
        self.header.frame_count
    }

    /// Patches the frame count into the header, flushes and returns the writer.
    pub fn finish(mut self) -> Result<W, IvfError> {
        let end = self.out.stream_position()?;
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&self.header.to_bytes())?;
        self.out.seek(SeekFrom::Start(end))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Facts from a VP8 frame header (RFC 6386 section 9.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8FrameInfo {
    /// Whether this is a key frame.
    pub keyframe: bool,
    /// Width and height, present on key frames.
    pub size: Option<(u16, u16)>,
}

/// Parses the VP8 frame tag; `None` when the data is not a plausible VP8 frame.
pub fn vp8_frame_info(frame: &[u8]) -> Option<Vp8FrameInfo> {
    let tag = frame.get(..3)?;
    let keyframe = tag[0] & 0x01 == 0;
    if !keyframe {
        return Some(Vp8FrameInfo {
            keyframe,
            size: None,
        });
    }
    let kf = frame.get(3..10)?;
    if kf[0..3] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let w = u16::from_le_bytes([kf[3], kf[4]]) & 0x3fff;
    let h = u16::from_le_bytes([kf[5], kf[6]]) & 0x3fff;
    Some(Vp8FrameInfo {
        keyframe,
        size: Some((w, h)),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sample(n: usize) -> Vec<u8> {
        let header = IvfHeader {
            fourcc: *b"VP80",
            width: 320,
            height: 240,
            timebase_den: 90_000,
            timebase_num: 1,
            frame_count: 0,
        };
        let mut w = IvfWriter::new(Cursor::new(Vec::new()), header).unwrap();
        for i in 0..n {
            w.write_frame(&vec![i as u8; 5 + i], i as u64 * 3000)
                .unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn roundtrip() {
        let bytes = sample(10);
        let r = IvfReader::new(&bytes).unwrap();
        assert_eq!(r.header().frame_count, 10);
        assert_eq!(r.header().width, 320);
        assert_eq!(&r.header().fourcc, b"VP80");
        let frames = r.frames().unwrap();
        assert_eq!(frames.len(), 10);
        assert_eq!(frames[4].pts, 12000);
        assert_eq!(frames[4].data, &[4u8; 9][..]);
    }

    #[test]
    fn builtin_pattern_parses() {
        let r = IvfReader::new(crate::source::BUILTIN_PATTERN_IVF).unwrap();
        assert_eq!((r.header().width, r.header().height), (320, 240));
        let frames = r.frames().unwrap();
        assert_eq!(frames.len(), 60);
        let info = vp8_frame_info(frames[0].data).unwrap();
        assert!(info.keyframe);
        assert_eq!(info.size, Some((320, 240)));
        let keys = frames
            .iter()
            .filter(|f| vp8_frame_info(f.data).is_some_and(|i| i.keyframe))
            .count();
        assert_eq!(keys, 4);
    }

    #[test]
    fn truncated_is_an_error() {
        let bytes = sample(3);
        // Frames are 5, 6, 7 bytes: cuts between frames leave a valid file.
        let boundaries = [32, 32 + 17, 32 + 17 + 18];
        for cut in 1..bytes.len() {
            let res = IvfReader::new(&bytes[..cut]).and_then(|r| r.frames());
            if boundaries.contains(&cut) {
                assert!(res.is_ok(), "cut at {cut} failed");
            } else {
                assert!(res.is_err(), "cut at {cut} parsed");
            }
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            IvfReader::new(b"RIFF....WAVEfmt this is not ivf at all"),
            Err(IvfError::BadSignature)
        ));
        assert!(IvfReader::new(b"").is_err());
        let mut bytes = sample(2);
        bytes[6] = 4; // header size 4
        assert!(matches!(
            IvfReader::new(&bytes),
            Err(IvfError::BadHeaderSize(4))
        ));
        let mut bytes = sample(2);
        bytes[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        let r = IvfReader::new(&bytes).unwrap();
        assert!(matches!(r.frames(), Err(IvfError::FrameTooLarge(_))));
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..3000 {
            let mut v = sample(4);
            for _ in 0..rng.usize(1..5) {
                let i = rng.usize(0..v.len());
                v[i] = rng.u8(..);
            }
            if let Ok(r) = IvfReader::new(&v) {
                let _ = r.frames();
            }
            let n = rng.usize(0..100);
            let g: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            if let Ok(r) = IvfReader::new(&g) {
                let _ = r.frames();
            }
        }
    }

    #[test]
    fn vp8_headers() {
        assert!(vp8_frame_info(&[]).is_none());
        assert!(vp8_frame_info(&[0x00, 0, 0, 0x9d, 0x01]).is_none());
        assert!(vp8_frame_info(&[0x00, 0, 0, 1, 2, 3, 0, 0, 0, 0]).is_none());
        let p = vp8_frame_info(&[0x01, 0, 0]).unwrap();
        assert!(!p.keyframe);
        let k = vp8_frame_info(&[0x10, 0, 0, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xf0, 0x00]).unwrap();
        assert_eq!(k.size, Some((320, 240)));
    }
}
