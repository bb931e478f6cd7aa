//! Ogg container (RFC 3533) with the Opus mapping (RFC 7845): a reader
//! and a writer, written for this crate.
//!
//! The reader works on a byte slice and never panics on malformed input:
//! every problem is reported as an [`OggError`]. It follows the first
//! logical stream it meets and ignores pages of other streams.
//!
//! The writer emits one Opus packet per page, which keeps granule positions
//! trivially exact. The last packet is held back so that it can be written
//! with the end-of-stream flag by [`OggOpusWriter::finish`].

use std::io::Write;

/// Largest packet this reader reassembles (a guard against hostile input).
pub const MAX_PACKET_SIZE: usize = 1 << 20;

/// Opus always counts time in 48 kHz samples.
pub const OPUS_CLOCK_RATE: u32 = 48_000;

const CAPTURE: &[u8; 4] = b"OggS";
const PAGE_HEADER_LEN: usize = 27;
const FLAG_CONTINUED: u8 = 0x01;
const FLAG_BOS: u8 = 0x02;
const FLAG_EOS: u8 = 0x04;

/// Errors of the Ogg reader/writer and of the Opus mapping.
#[derive(Debug, thiserror::Error)]
pub enum OggError {
    /// The input ended in the middle of a page or a packet.
    #[error("truncated Ogg data at byte {offset}")]
    Truncated {
        /// Byte offset where more data was expected.
        offset: usize,
    },
    /// A page did not start with the `OggS` capture pattern.
    #[error("no Ogg capture pattern at byte {offset}")]
    BadCapture {
        /// Byte offset of the bad page.
        offset: usize,
    },
    /// The page's stream structure version is not 0.
    #[error("unsupported Ogg version {0}")]
    UnsupportedVersion(u8),
    /// The page checksum does not match its contents.
    #[error("Ogg CRC mismatch in page at byte {offset}")]
    BadCrc {
        /// Byte offset of the bad page.
        offset: usize,
    },
    /// A reassembled packet exceeded [`MAX_PACKET_SIZE`].
    #[error("Ogg packet larger than {MAX_PACKET_SIZE} bytes")]
    PacketTooLarge,
    /// A continued page appeared without a packet to continue, or a packet
    /// was left unfinished when a new one began.
    #[error("broken Ogg packet continuation at byte {offset}")]
    BadContinuation {
        /// Byte offset of the page.
        offset: usize,
    },
    /// The stream has no `OpusHead` identification header.
    #[error("not an Ogg Opus stream (no OpusHead)")]
    NotOpus,
    /// The `OpusHead` header is malformed.
    #[error("invalid OpusHead: {0}")]
    BadOpusHead(&'static str),
    /// The `OpusTags` header is missing or malformed.
    #[error("invalid OpusTags: {0}")]
    BadOpusTags(&'static str),
    /// An Opus packet is malformed (bad TOC byte or frame count).
    #[error("invalid Opus packet: {0}")]
    BadOpusPacket(&'static str),
    /// Writing failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

// ---------------------------------------------------------------------------
// CRC-32 as used by Ogg: polynomial 0x04c11db7, no reflection, init 0.

const fn make_crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut r = (i as u32) << 24;
        let mut j = 0;
        while j < 8 {
            r = if r & 0x8000_0000 != 0 {
                (r << 1) ^ 0x04c1_1db7
            } else {
                r << 1
            };
            j += 1;
        }
        table[i] = r;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = make_crc_table();

fn crc_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = (crc << 8) ^ CRC_TABLE[(((crc >> 24) as u8) ^ b) as usize];
    }
    crc
}

// ---------------------------------------------------------------------------
// Small bounds-checked readers.

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

// ---------------------------------------------------------------------------
// Pages.

/// One parsed Ogg page, borrowing its body from the input.
#[derive(Debug, Clone)]
pub struct OggPage<'a> {
    /// Header type flags (continued 0x01, BOS 0x02, EOS 0x04).
    pub header_type: u8,
    /// Granule position (codec defined; `u64::MAX` means "no packet ends here").
    pub granule_position: u64,
    /// Logical bitstream serial number.
    pub serial: u32,
    /// Page sequence number.
    pub sequence: u32,
    /// The lacing values.
    pub segments: &'a [u8],
    /// The page body.
    pub body: &'a [u8],
    /// Byte offset of the page in the input.
    pub offset: usize,
}

impl OggPage<'_> {
    /// Whether the first packet on this page continues one from the previous page.
    pub fn is_continued(&self) -> bool {
        self.header_type & FLAG_CONTINUED != 0
    }
    /// Whether this is the first page of its logical stream.
    pub fn is_bos(&self) -> bool {
        self.header_type & FLAG_BOS != 0
    }
    /// Whether this is the last page of its logical stream.
    pub fn is_eos(&self) -> bool {
        self.header_type & FLAG_EOS != 0
    }
}

/// Iterates over the pages of an in-memory Ogg stream.
#[derive(Debug, Clone)]
pub struct OggPageReader<'a> {
    data: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> OggPageReader<'a> {
    /// Reads pages from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            failed: false,
        }
    }

    /// The next page, `Ok(None)` at a clean end of input.
    pub fn next_page(&mut self) -> Result<Option<OggPage<'a>>, OggError> {
        if self.failed {
            return Ok(None);
        }
        let r = self.parse_page();
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn parse_page(&mut self) -> Result<Option<OggPage<'a>>, OggError> {
        let offset = self.pos;
        let data = self.data;
        if offset >= data.len() {
            return Ok(None);
        }
        let header = data
            .get(offset..offset + PAGE_HEADER_LEN)
            .ok_or(OggError::Truncated { offset: data.len() })?;
        if &header[0..4] != CAPTURE {
            return Err(OggError::BadCapture { offset });
        }
        if header[4] != 0 {
            return Err(OggError::UnsupportedVersion(header[4]));
        }
        let header_type = header[5];
        let truncated = OggError::Truncated { offset };
        let granule_position = le_u64(header, 6).ok_or(OggError::Truncated { offset })?;
        let serial = le_u32(header, 14).ok_or(OggError::Truncated { offset })?;
        let sequence = le_u32(header, 18).ok_or(OggError::Truncated { offset })?;
        let crc = le_u32(header, 22).ok_or(OggError::Truncated { offset })?;
        let nsegs = header[26] as usize;
        let seg_start = offset + PAGE_HEADER_LEN;
        let segments = data
            .get(seg_start..seg_start + nsegs)
            .ok_or(OggError::Truncated { offset: data.len() })?;
        let body_len: usize = segments.iter().map(|&s| s as usize).sum();
        let body_start = seg_start + nsegs;
        let body = data
            .get(body_start..body_start + body_len)
            .ok_or(truncated)?;

        // Checksum over the whole page with the CRC field zeroed.
        let mut c = crc_update(0, &header[..22]);
        c = crc_update(c, &[0, 0, 0, 0]);
        c = crc_update(c, &header[26..]);
        c = crc_update(c, segments);
        c = crc_update(c, body);
        if c != crc {
            return Err(OggError::BadCrc { offset });
        }

        self.pos = body_start + body_len;
        Ok(Some(OggPage {
            header_type,
            granule_position,
            serial,
            sequence,
            segments,
            body,
            offset,
        }))
    }
}

/// One packet of a logical Ogg stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OggPacket {
    /// Packet bytes.
    pub data: Vec<u8>,
    /// Granule position of the page on which the packet ends, when it is
    /// the last packet ending on that page; `None` otherwise.
    pub granule_position: Option<u64>,
}

/// Reassembles the packets of the first logical stream of an Ogg input.
#[derive(Debug, Clone)]
pub struct OggPacketReader<'a> {
    pages: OggPageReader<'a>,
    serial: Option<u32>,
    partial: Option<Vec<u8>>,
    ready: std::collections::VecDeque<OggPacket>,
    ended: bool,
}

impl<'a> OggPacketReader<'a> {
    /// Reads packets from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self {
            pages: OggPageReader::new(data),
            serial: None,
            partial: None,
            ready: Default::default(),
            ended: false,
        }
    }

    /// The next packet, `Ok(None)` at the end of the stream. A packet left
    /// unfinished at the end of input is reported as [`OggError::Truncated`].
    pub fn next_packet(&mut self) -> Result<Option<OggPacket>, OggError> {
        loop {
            if let Some(p) = self.ready.pop_front() {
                return Ok(Some(p));
            }
            if self.ended {
                return Ok(None);
            }
            let Some(page) = self.pages.next_page()? else {
                self.ended = true;
                if self.partial.is_some() {
                    return Err(OggError::Truncated {
                        offset: self.pages.pos,
                    });
                }
                return Ok(None);
            };
            match self.serial {
                None => self.serial = Some(page.serial),
                Some(s) if s != page.serial => continue,
                Some(_) => {}
            }
            self.take_page(&page)?;
            if page.is_eos() {
                self.ended = true;
            }
        }
    }

    fn take_page(&mut self, page: &OggPage<'_>) -> Result<(), OggError> {
        let offset = page.offset;
        if page.is_continued() {
            if self.partial.is_none() {
                // A stream may legally start mid-packet only if we joined it
                // late; we read files from the start, so this is corrupt.
                return Err(OggError::BadContinuation { offset });
            }
        } else if self.partial.is_some() {
            return Err(OggError::BadContinuation { offset });
        }
        let mut pos = 0usize;
        let mut last_complete: Option<usize> = None;
        for &lace in page.segments {
            let lace = lace as usize;
            let chunk = page
                .body
                .get(pos..pos + lace)
                .ok_or(OggError::Truncated { offset })?;
            pos += lace;
            let buf = self.partial.get_or_insert_with(Vec::new);
            if buf.len() + chunk.len() > MAX_PACKET_SIZE {
                return Err(OggError::PacketTooLarge);
            }
            buf.extend_from_slice(chunk);
            if lace < 255 {
                let data = self.partial.take().unwrap_or_default();
                self.ready.push_back(OggPacket {
                    data,
                    granule_position: None,
                });
                last_complete = Some(self.ready.len() - 1);
            }
        }
        if let Some(i) = last_complete
            && page.granule_position != u64::MAX
            && let Some(p) = self.ready.get_mut(i)
        {
            p.granule_position = Some(page.granule_position);
        }
        Ok(())
    }
}

/// Writes pages of one logical Ogg stream.
#[derive(Debug)]
pub struct OggPageWriter<W: Write> {
    out: W,
    serial: u32,
    sequence: u32,
    started: bool,
}

impl<W: Write> OggPageWriter<W> {
    /// Starts a logical stream with the given serial number.
    pub fn new(out: W, serial: u32) -> Self {
        Self {
            out,
            serial,
            sequence: 0,
            started: false,
        }
    }

    /// Writes one packet on its own page(s). Packets longer than one page
    /// can hold are split over continued pages; only the last carries
    /// `granule_position`. `eos` marks the end of the stream.
    pub fn write_packet(
        &mut self,
        packet: &[u8],
        granule_position: u64,
        eos: bool,
    ) -> Result<(), OggError> {
        // A page holds at most 255 lacing values of up to 255 bytes.
        const MAX_BODY: usize = 255 * 255;
        let mut rest = packet;
        let mut continued = false;
        loop {
            // The last page of a packet needs a lacing value < 255, which
            // a page can fit only if the remainder is < 255 * 255.
            let last = rest.len() < MAX_BODY;
            let take = if last { rest.len() } else { MAX_BODY - 255 };
            let (chunk, tail) = rest.split_at(take);
            let mut segments: Vec<u8> = vec![255; chunk.len() / 255];
            if last {
                segments.push((chunk.len() % 255) as u8);
            }
            let mut flags = 0;
            if continued {
                flags |= FLAG_CONTINUED;
            }
            if !self.started {
                flags |= FLAG_BOS;
            }
            if last && eos {
                flags |= FLAG_EOS;
            }
            let granule = if last { granule_position } else { u64::MAX };
            self.write_page(flags, granule, &segments, chunk)?;
            self.started = true;
            if last {
                return Ok(());
            }
            rest = tail;
            continued = true;
        }
    }

    fn write_page(
        &mut self,
        flags: u8,
        granule: u64,
        segments: &[u8],
        body: &[u8],
    ) -> Result<(), OggError> {
        let mut page = Vec::with_capacity(PAGE_HEADER_LEN + segments.len() + body.len());
        page.extend_from_slice(CAPTURE);
        page.push(0);
        page.push(flags);
        page.extend_from_slice(&granule.to_le_bytes());
        page.extend_from_slice(&self.serial.to_le_bytes());
        page.extend_from_slice(&self.sequence.to_le_bytes());
        page.extend_from_slice(&[0, 0, 0, 0]);
        page.push(segments.len() as u8);
        page.extend_from_slice(segments);
        page.extend_from_slice(body);
        let crc = crc_update(0, &page);
        page[22..26].copy_from_slice(&crc.to_le_bytes());
        self.out.write_all(&page)?;
        self.sequence = self.sequence.wrapping_add(1);
        Ok(())
    }

    /// Writes a page without packets that only marks the end of the stream.
    pub fn write_empty_eos_page(&mut self, granule_position: u64) -> Result<(), OggError> {
        let mut flags = FLAG_EOS;
        if !self.started {
            flags |= FLAG_BOS;
        }
        self.write_page(flags, granule_position, &[], &[])?;
        self.started = true;
        Ok(())
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), OggError> {
        self.out.flush()?;
        Ok(())
    }

    /// Returns the underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

// ---------------------------------------------------------------------------
// Opus mapping.

/// The `OpusHead` identification header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpusHead {
    /// Output channel count.
    pub channels: u8,
    /// Samples (48 kHz) to discard from the decoder output at the start.
    pub pre_skip: u16,
    /// Sample rate of the original input (informational).
    pub input_sample_rate: u32,
    /// Output gain in Q7.8 dB.
    pub output_gain: i16,
    /// Channel mapping family.
    pub mapping_family: u8,
}

impl OpusHead {
    /// Parses an `OpusHead` packet.
    pub fn parse(p: &[u8]) -> Result<Self, OggError> {
        if p.len() < 8 || &p[..8] != b"OpusHead" {
            return Err(OggError::NotOpus);
        }
        if p.len() < 19 {
            return Err(OggError::BadOpusHead("too short"));
        }
        let version = p[8];
        if version >> 4 != 0 {
            return Err(OggError::BadOpusHead("unsupported major version"));
        }
        let channels = p[9];
        if channels == 0 {
            return Err(OggError::BadOpusHead("zero channels"));
        }
        let pre_skip = le_u16(p, 10).ok_or(OggError::BadOpusHead("too short"))?;
        let input_sample_rate = le_u32(p, 12).ok_or(OggError::BadOpusHead("too short"))?;
        let output_gain = le_u16(p, 16).ok_or(OggError::BadOpusHead("too short"))? as i16;
        let mapping_family = p[18];
        if mapping_family == 0 {
            if channels > 2 {
                return Err(OggError::BadOpusHead("family 0 with more than 2 channels"));
            }
        } else if p.len() < 21 + channels as usize {
            return Err(OggError::BadOpusHead("missing channel mapping table"));
        }
        Ok(Self {
            channels,
            pre_skip,
            input_sample_rate,
            output_gain,
            mapping_family,
        })
    }

    /// Serialises the header (mapping family 0 only).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(19);
        v.extend_from_slice(b"OpusHead");
        v.push(1);
        v.push(self.channels);
        v.extend_from_slice(&self.pre_skip.to_le_bytes());
        v.extend_from_slice(&self.input_sample_rate.to_le_bytes());
        v.extend_from_slice(&self.output_gain.to_le_bytes());
        v.push(0);
        v
    }
}

/// The `OpusTags` comment header.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OpusTags {
    /// Encoder vendor string.
    pub vendor: String,
    /// `KEY=value` comments.
    pub comments: Vec<String>,
}

impl OpusTags {
    /// Parses an `OpusTags` packet.
    pub fn parse(p: &[u8]) -> Result<Self, OggError> {
        if p.len() < 8 || &p[..8] != b"OpusTags" {
            return Err(OggError::BadOpusTags("missing magic"));
        }
        let mut pos = 8usize;
        let take_str = |pos: &mut usize| -> Result<String, OggError> {
            let len = le_u32(p, *pos).ok_or(OggError::BadOpusTags("truncated"))? as usize;
            *pos += 4;
            let end = pos
                .checked_add(len)
                .ok_or(OggError::BadOpusTags("bad length"))?;
            let s = p.get(*pos..end).ok_or(OggError::BadOpusTags("truncated"))?;
            *pos = end;
            Ok(String::from_utf8_lossy(s).into_owned())
        };
        let vendor = take_str(&mut pos)?;
        let count = le_u32(p, pos).ok_or(OggError::BadOpusTags("truncated"))? as usize;
        pos += 4;
        // Each comment needs at least 4 bytes: bound the count by the input.
        if count > p.len().saturating_sub(pos) / 4 {
            return Err(OggError::BadOpusTags("comment count too large"));
        }
        let mut comments = Vec::with_capacity(count);
        for _ in 0..count {
            comments.push(take_str(&mut pos)?);
        }
        Ok(Self { vendor, comments })
    }

    /// Serialises the header.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(b"OpusTags");
        v.extend_from_slice(&(self.vendor.len() as u32).to_le_bytes());
        v.extend_from_slice(self.vendor.as_bytes());
        v.extend_from_slice(&(self.comments.len() as u32).to_le_bytes());
        for c in &self.comments {
            v.extend_from_slice(&(c.len() as u32).to_le_bytes());
            v.extend_from_slice(c.as_bytes());
        }
        v
    }
}

/// Duration of an Opus packet in 48 kHz samples, from its TOC byte
/// (RFC 6716 section 3.1).
pub fn opus_packet_samples(packet: &[u8]) -> Result<u32, OggError> {
    let toc = *packet.first().ok_or(OggError::BadOpusPacket("empty"))?;
    let config = toc >> 3;
    let frame = match config {
        0..=11 => [480, 960, 1920, 2880][(config % 4) as usize],
        12..=15 => [480, 960][(config % 2) as usize],
        _ => [120, 240, 480, 960][(config % 4) as usize],
    };
    let frames = match toc & 0x3 {
        0 => 1,
        1 | 2 => 2,
        _ => {
            let c = packet
                .get(1)
                .ok_or(OggError::BadOpusPacket("code 3 without frame count"))?
                & 0x3f;
            if c == 0 {
                return Err(OggError::BadOpusPacket("zero frames"));
            }
            c as u32
        }
    };
    let total = frame * frames;
    if total > 5760 {
        return Err(OggError::BadOpusPacket("longer than 120 ms"));
    }
    Ok(total)
}

/// Whether the TOC byte of an Opus packet signals stereo.
pub fn opus_packet_is_stereo(packet: &[u8]) -> bool {
    packet.first().is_some_and(|toc| toc & 0x04 != 0)
}

/// One audio packet of an Ogg Opus stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpusPacket {
    /// The encoded Opus packet.
    pub data: Vec<u8>,
    /// Its duration in 48 kHz samples.
    pub samples: u32,
}

/// A fully parsed Ogg Opus stream.
#[derive(Debug, Clone)]
pub struct OggOpusStream {
    /// Identification header.
    pub head: OpusHead,
    /// Comment header.
    pub tags: OpusTags,
    /// Audio packets in order.
    pub packets: Vec<OpusPacket>,
    /// Granule position of the last page (total samples incl. pre-skip).
    pub last_granule: Option<u64>,
}

impl OggOpusStream {
    /// Parses a complete Ogg Opus file held in memory.
    pub fn parse(data: &[u8]) -> Result<Self, OggError> {
        let mut r = OggPacketReader::new(data);
        let head_pkt = r.next_packet()?.ok_or(OggError::NotOpus)?;
        let head = OpusHead::parse(&head_pkt.data)?;
        let tags_pkt = r.next_packet()?.ok_or(OggError::BadOpusTags("missing"))?;
        let tags = OpusTags::parse(&tags_pkt.data)?;
        let mut packets = Vec::new();
        let mut last_granule = None;
        while let Some(p) = r.next_packet()? {
            if let Some(g) = p.granule_position {
                last_granule = Some(g);
            }
            let samples = opus_packet_samples(&p.data)?;
            packets.push(OpusPacket {
                data: p.data,
                samples,
            });
        }
        Ok(Self {
            head,
            tags,
            packets,
            last_granule,
        })
    }

    /// Total duration of all packets in 48 kHz samples.
    pub fn total_samples(&self) -> u64 {
        self.packets.iter().map(|p| p.samples as u64).sum()
    }
}

/// Writes an Ogg Opus stream: headers first, then one packet per page with
/// exact granule positions; [`OggOpusWriter::finish`] marks the end.
#[derive(Debug)]
pub struct OggOpusWriter<W: Write> {
    pages: OggPageWriter<W>,
    granule: u64,
    held: Option<(Vec<u8>, u64)>,
    packets: u64,
}

impl<W: Write> OggOpusWriter<W> {
    /// Writes the `OpusHead` and `OpusTags` pages.
    pub fn new(out: W, channels: u8, pre_skip: u16, vendor: &str) -> Result<Self, OggError> {
        let serial = fastrand::u32(..);
        let mut pages = OggPageWriter::new(out, serial);
        let head = OpusHead {
            channels: channels.clamp(1, 2),
            pre_skip,
            input_sample_rate: OPUS_CLOCK_RATE,
            output_gain: 0,
            mapping_family: 0,
        };
        pages.write_packet(&head.to_bytes(), 0, false)?;
        let tags = OpusTags {
            vendor: vendor.to_string(),
            comments: vec![],
        };
        pages.write_packet(&tags.to_bytes(), 0, false)?;
        Ok(Self {
            pages,
            granule: 0,
            held: None,
            packets: 0,
        })
    }

    /// Appends one Opus packet; its duration comes from its TOC byte.
    pub fn write_packet(&mut self, packet: &[u8]) -> Result<(), OggError> {
        let samples = opus_packet_samples(packet)?;
        if let Some((data, granule)) = self.held.take() {
            self.pages.write_packet(&data, granule, false)?;
        }
        self.granule += samples as u64;
        self.held = Some((packet.to_vec(), self.granule));
        self.packets += 1;
        Ok(())
    }

    /// Number of audio packets written so far.
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Writes the held-back last packet with the end-of-stream flag (or an
    /// empty end-of-stream page) and flushes. Returns the writer.
    pub fn finish(mut self) -> Result<W, OggError> {
        match self.held.take() {
            Some((data, granule)) => self.pages.write_packet(&data, granule, true)?,
            None => self.pages.write_empty_eos_page(self.granule)?,
        }
        self.pages.flush()?;
        Ok(self.pages.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn sample_stream(n: usize) -> Vec<u8> {
        let mut w = OggOpusWriter::new(Vec::new(), 1, 312, "test").unwrap();
        for i in 0..n {
            // config 1 = SILK NB 20 ms, code 0, mono.
            let mut p = vec![0x08u8];
            p.extend(std::iter::repeat_n(i as u8, 10 + i));
            w.write_packet(&p).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn crc_known_value() {
        // CRC of "OggS" with the Ogg polynomial, computed by hand-verified table.
        assert_eq!(crc_update(0, b""), 0);
        assert_ne!(crc_update(0, b"OggS"), crc_update(0, b"OggT"));
    }

    #[test]
    fn roundtrip() {
        let bytes = sample_stream(50);
        let s = OggOpusStream::parse(&bytes).unwrap();
        assert_eq!(s.head.channels, 1);
        assert_eq!(s.head.pre_skip, 312);
        assert_eq!(s.tags.vendor, "test");
        assert_eq!(s.packets.len(), 50);
        assert_eq!(s.total_samples(), 50 * 960);
        assert_eq!(s.last_granule, Some(50 * 960));
        assert_eq!(s.packets[3].data.len(), 14);
    }

    #[test]
    fn large_packet_spans_pages() {
        let mut w = OggPageWriter::new(Vec::new(), 7);
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        w.write_packet(b"first", 0, false).unwrap();
        w.write_packet(&big, 5, false).unwrap();
        w.write_packet(&[0u8; 255], 6, true).unwrap();
        let bytes = w.into_inner();
        let mut r = OggPacketReader::new(&bytes);
        assert_eq!(r.next_packet().unwrap().unwrap().data, b"first");
        let p = r.next_packet().unwrap().unwrap();
        assert_eq!(p.data, big);
        assert_eq!(p.granule_position, Some(5));
        let p = r.next_packet().unwrap().unwrap();
        assert_eq!(p.data.len(), 255);
        assert!(r.next_packet().unwrap().is_none());
    }

    #[test]
    fn builtin_tone_parses() {
        let s = OggOpusStream::parse(crate::source::BUILTIN_TONE_OGG).unwrap();
        // 2 s of 20 ms packets plus the encoder's delay.
        assert_eq!(s.packets.len(), 101);
        assert_eq!(s.head.pre_skip, 312);
        assert!(s.packets.iter().all(|p| p.samples == 960));
    }

    #[test]
    fn truncated_input_is_an_error() {
        let bytes = sample_stream(5);
        // Cutting exactly between pages leaves a valid (shorter) stream.
        let mut boundaries = vec![];
        let mut pages = OggPageReader::new(&bytes);
        while let Some(p) = pages.next_page().unwrap() {
            boundaries.push(p.offset);
        }
        for cut in 1..bytes.len() {
            let r = OggOpusStream::parse(&bytes[..cut]);
            if boundaries.contains(&cut) && cut > boundaries[1] {
                let s = r.unwrap();
                assert!(s.packets.len() < 5);
            } else {
                assert!(r.is_err(), "cut at {cut} parsed");
            }
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            OggOpusStream::parse(b"hello world, not ogg at all"),
            Err(OggError::BadCapture { .. })
        ));
        assert!(OggOpusStream::parse(&[]).is_err());
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2000 {
            let n = rng.usize(0..300);
            let mut v: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            if rng.bool() && v.len() >= 4 {
                v[..4].copy_from_slice(b"OggS");
            }
            let _ = OggOpusStream::parse(&v);
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let bytes = sample_stream(8);
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..3000 {
            let mut v = bytes.clone();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(0..v.len());
                v[i] = rng.u8(..);
            }
            let _ = OggOpusStream::parse(&v);
        }
        // A flipped body byte must fail the CRC.
        let mut v = bytes.clone();
        let last = v.len() - 1;
        v[last] ^= 0xff;
        assert!(matches!(
            OggOpusStream::parse(&v),
            Err(OggError::BadCrc { .. })
        ));
    }

    #[test]
    fn bad_headers() {
        assert!(matches!(
            OpusHead::parse(b"OpusHea"),
            Err(OggError::NotOpus)
        ));
        assert!(OpusHead::parse(b"OpusHead\x01\x00").is_err());
        let mut h = OpusHead {
            channels: 2,
            pre_skip: 1,
            input_sample_rate: 48000,
            output_gain: 0,
            mapping_family: 0,
        }
        .to_bytes();
        assert!(OpusHead::parse(&h).is_ok());
        h[9] = 0;
        assert!(OpusHead::parse(&h).is_err());
        assert!(OpusTags::parse(b"OpusTags\xff\xff\xff\xff").is_err());
        assert!(OpusTags::parse(b"OpusTags\x00\x00\x00\x00\xff\xff\xff\x7f").is_err());
    }

    #[test]
    fn opus_durations() {
        assert_eq!(opus_packet_samples(&[0x08]).unwrap(), 960); // SILK 20 ms
        assert_eq!(opus_packet_samples(&[0xf8]).unwrap(), 960); // CELT FB 20 ms
        assert_eq!(opus_packet_samples(&[0xf9, 0, 0]).unwrap(), 1920); // 2 frames
        assert_eq!(opus_packet_samples(&[0xfb, 0x03]).unwrap(), 2880); // 3 frames
        assert!(opus_packet_samples(&[]).is_err());
        assert!(opus_packet_samples(&[0xfb]).is_err());
        assert!(opus_packet_samples(&[0xfb, 0x00]).is_err());
        assert!(opus_packet_samples(&[0x1b, 0x3f]).is_err()); // 63 x 60 ms
    }
}
