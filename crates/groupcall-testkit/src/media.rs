//! Media files of a test: counting and decoding recordings.

use std::path::Path;
use std::process::{Command as StdCommand, Stdio};
use std::time::Duration;

use groupcall::media::{PeerEvent, PeerEvents};

/// Waits at most `within` for a media peer's event matching `pred`,
/// skipping others; panics naming `what` on timeout or when the events end.
pub async fn peer_event_until(
    events: &mut PeerEvents,
    within: Duration,
    what: &str,
    pred: impl Fn(&PeerEvent) -> bool,
) -> PeerEvent {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(ev)) if pred(&ev) => return ev,
            Ok(Some(_)) => {}
            Ok(None) => panic!("event stream ended waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    }
}

/// The codec names ffprobe sees in a file, comma separated (`opus`,
/// `vp8`); panics when ffprobe cannot run (`scripts/setup-system` installs
/// ffmpeg).
pub fn ffprobe_codecs(path: &Path) -> String {
    let out = StdCommand::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_name",
            "-of",
            "csv=p=0",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run ffprobe ({e}): scripts/setup-system installs ffmpeg")
        });
    assert!(
        out.status.success(),
        "ffprobe failed on {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .replace('\n', ",")
}

/// Frames in an IVF (VP8) recording, read by groupcall's own reader.
pub fn count_ivf(path: &Path) -> usize {
    let data = std::fs::read(path).unwrap();
    groupcall::media::ivf::IvfReader::new(&data)
        .unwrap()
        .frames()
        .unwrap()
        .len()
}

/// Packets in an Ogg/Opus recording, read by groupcall's own reader.
pub fn count_ogg(path: &Path) -> usize {
    let data = std::fs::read(path).unwrap();
    let mut r = groupcall::media::ogg::OggPacketReader::new(&data);
    let mut n = 0;
    while r.next_packet().unwrap().is_some() {
        n += 1;
    }
    n
}

/// What ffmpeg made of a recording (see [`ffmpeg_decode`]).
#[derive(Debug, Clone)]
pub struct Decoded {
    /// Frames decoded (audio and video frames of every stream).
    pub frames: u64,
    /// ffmpeg's error lines (`-v error`): decoding or demuxing errors.
    pub errors: Vec<String>,
}

/// Decodes every stream of a recording (our Ogg/Opus or IVF/VP8 files)
/// with ffmpeg: `ffmpeg -v error -i FILE -f framecrc -`, which writes one
/// line per decoded frame (counted) and only errors on stderr. Panics when
/// ffmpeg cannot be run (`scripts/setup-system` installs it).
pub fn ffmpeg_decode(path: &Path) -> Decoded {
    let out = StdCommand::new("ffmpeg")
        .args(["-nostdin", "-hide_banner", "-v", "error", "-i"])
        .arg(path)
        .args(["-f", "framecrc", "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run ffmpeg ({e}): scripts/setup-system installs it"));
    let frames = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count() as u64;
    let mut errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    if !out.status.success() {
        errors.push(format!("ffmpeg exited with {}", out.status));
    }
    Decoded { frames, errors }
}

/// The number of frames ffmpeg decodes from a recording; fails the test on
/// any ffmpeg error line or when fewer than `min` frames decode.
pub fn assert_decodes(path: &Path, min: u64) -> u64 {
    let d = ffmpeg_decode(path);
    assert!(
        d.errors.is_empty(),
        "ffmpeg: {} does not decode cleanly ({} frames decoded): {}",
        path.display(),
        d.frames,
        d.errors.join("; ")
    );
    assert!(
        d.frames >= min,
        "ffmpeg decoded {} frames of {}, expected at least {min}",
        d.frames,
        path.display()
    );
    d.frames
}

/// One decoded video frame as ffprobe reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameSize {
    /// Presentation time, seconds from the recording's first frame.
    pub t: f64,
    /// Decoded width, pixels.
    pub width: u32,
    /// Decoded height, pixels.
    pub height: u32,
}

/// The size of every decoded video frame of a recording, read by ffprobe
/// (`-show_frames`), not by our own code: a simulcast subscriber's
/// recording changes size where the focus switched layers. Panics when
/// ffprobe cannot run or fails.
pub fn decoded_frame_sizes(path: &Path) -> Vec<FrameSize> {
    let out = StdCommand::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "frame=width,height,pts_time,best_effort_timestamp_time",
            "-of",
            "json",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run ffprobe ({e}): scripts/setup-system installs it"));
    assert!(
        out.status.success(),
        "ffprobe failed on {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ffprobe's JSON for {}: {e}", path.display()));
    let time = |f: &serde_json::Value, k: &str| f[k].as_str().and_then(|s| s.parse::<f64>().ok());
    v["frames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| {
                    Some(FrameSize {
                        t: time(f, "pts_time").or_else(|| time(f, "best_effort_timestamp_time"))?,
                        width: u32::try_from(f["width"].as_u64()?).ok()?,
                        height: u32::try_from(f["height"].as_u64()?).ok()?,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The recordings (`recorded`: every `Recorded` path participant `at`
/// reported) of `from`'s video and audio. The same stream may have been
/// recorded in several files (it came over a mesh call and then the focus,
/// say): every file must decode cleanly, and together they must hold at
/// least 11 video / 51 audio frames. Returns (video, audio) frames decoded.
pub fn assert_recordings_of(
    recorded: &[std::path::PathBuf],
    at: &str,
    from: &str,
    from_device: &str,
) -> (u64, u64) {
    let mut total = (0, 0);
    for (ext, min) in [("ivf", 11), ("ogg", 51)] {
        let files: Vec<&std::path::PathBuf> = recorded
            .iter()
            .filter(|p| {
                p.extension().is_some_and(|e| e == ext)
                    && p.file_name()
                        .is_some_and(|f| f.to_string_lossy().contains(from_device))
            })
            .collect();
        assert!(
            !files.is_empty(),
            "{at} has no {ext} recording from {from}: {recorded:?}"
        );
        let mut frames = 0;
        for path in files {
            let own = if ext == "ivf" {
                count_ivf(path)
            } else {
                // Past the OpusHead and OpusTags packets.
                count_ogg(path).saturating_sub(2)
            };
            // A file of a call that ended before its first frame.
            if own > 0 {
                frames += assert_decodes(path, 0);
            }
        }
        assert!(
            frames >= min,
            "{at}: {frames} {ext} frames from {from} decoded, expected at least {min}"
        );
        if ext == "ivf" {
            total.0 += frames;
        } else {
            total.1 += frames;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of the built-in 180p layer, then of the 720p layer from a key
    /// frame on, in one IVF file: ffprobe sees the size change.
    #[test]
    fn frame_sizes_follow_a_layer_switch_in_a_recording() {
        use groupcall::media::ivf::{IvfHeader, IvfReader, IvfWriter};
        use groupcall::media::source::BUILTIN_PATTERN_LAYERS;
        let low = IvfReader::new(BUILTIN_PATTERN_LAYERS[0].3).unwrap();
        let high = IvfReader::new(BUILTIN_PATTERN_LAYERS[2].3).unwrap();
        let (low, high) = (low.frames().unwrap(), high.frames().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switch.ivf");
        let file = std::fs::File::create(&path).unwrap();
        let mut w = IvfWriter::new(
            std::io::BufWriter::new(file),
            IvfHeader {
                fourcc: *b"VP80",
                width: 320,
                height: 180,
                timebase_den: 90_000,
                timebase_num: 1,
                frame_count: 0,
            },
        )
        .unwrap();
        // Frame 15 is a key frame in every layer.
        for (i, f) in low[..15].iter().chain(&high[15..45]).enumerate() {
            w.write_frame(f.data, i as u64 * 3000).unwrap();
        }
        w.finish().unwrap();
        let sizes = decoded_frame_sizes(&path);
        assert_eq!(sizes.len(), 45);
        assert!(
            sizes[..15]
                .iter()
                .all(|f| (f.width, f.height) == (320, 180))
        );
        assert!(
            sizes[15..]
                .iter()
                .all(|f| (f.width, f.height) == (1280, 720))
        );
        assert!((sizes[30].t - 1.0).abs() < 1e-6, "{:?}", sizes[30]);
        assert_decodes(&path, 45);
    }
}
