//! Runtime commands read from stdin, one per line.

use groupcall_proto::Command;
use tokio::sync::mpsc;

/// One line of stdin, understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// Nothing to do (a blank line).
    Empty,
    /// A command for the call.
    Call(Command),
    /// Leave the call and exit.
    Leave,
}

/// The commands, for help texts.
pub const HELP: &str = "mute audio | unmute audio | mute video | unmute video | screenshare on | screenshare off | speakers N | speakers all | video WxH | video auto | leave";

/// Parses one line; an unknown line is an error message.
pub fn parse(line: &str) -> Result<Line, String> {
    let words: Vec<String> = line
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    Ok(match words.as_slice() {
        [] => Line::Empty,
        ["mute", "audio"] => Line::Call(Command::SetAudioMuted(true)),
        ["unmute", "audio"] => Line::Call(Command::SetAudioMuted(false)),
        ["mute", "video"] => Line::Call(Command::SetVideoMuted(true)),
        ["unmute", "video"] => Line::Call(Command::SetVideoMuted(false)),
        ["screenshare", "on"] => Line::Call(Command::Screenshare(true)),
        ["screenshare", "off"] => Line::Call(Command::Screenshare(false)),
        // Through a focus: the camera video of the N most recent speakers.
        ["speakers", "all"] => Line::Call(Command::FocusRecentSpeakers(None)),
        ["speakers", n] if n.parse::<usize>().is_ok() => {
            Line::Call(Command::FocusRecentSpeakers(n.parse().ok()))
        }
        // Through a focus: everyone's camera video at about this size (a
        // focus with simulcast picks the layer), or the advertised size.
        ["video", "auto"] => Line::Call(Command::FocusVideoSize {
            device: None,
            size: None,
        }),
        ["video", size] if video_size(size).is_some() => Line::Call(Command::FocusVideoSize {
            device: None,
            size: video_size(size),
        }),
        ["leave"] => Line::Leave,
        _ => {
            return Err(format!(
                "unknown command `{}` (commands: {HELP})",
                line.trim()
            ));
        }
    })
}

/// `WxH`, each side a positive number of pixels.
fn video_size(s: &str) -> Option<(u32, u32)> {
    let (w, h) = s.split_once('x')?;
    let (w, h) = (w.parse::<u32>().ok()?, h.parse::<u32>().ok()?);
    (w > 0 && h > 0).then_some((w, h))
}

/// Reads stdin lines on a plain thread (a blocked read must never hold up
/// the exit) and sends them; the channel closes at the end of stdin.
pub fn spawn_stdin_reader() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("stdin".to_owned())
        .spawn(move || {
            let stdin = std::io::stdin();
            let mut line = String::new();
            loop {
                line.clear();
                match stdin.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(line.clone()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot read commands from stdin: {e}");
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(parse("  \n"), Ok(Line::Empty));
        assert_eq!(
            parse("mute audio\n"),
            Ok(Line::Call(Command::SetAudioMuted(true)))
        );
        assert_eq!(
            parse("Unmute  Video"),
            Ok(Line::Call(Command::SetVideoMuted(false)))
        );
        assert_eq!(
            parse("screenshare on"),
            Ok(Line::Call(Command::Screenshare(true)))
        );
        assert_eq!(
            parse("screenshare off"),
            Ok(Line::Call(Command::Screenshare(false)))
        );
        assert_eq!(parse("leave"), Ok(Line::Leave));
        assert_eq!(
            parse("speakers 2"),
            Ok(Line::Call(Command::FocusRecentSpeakers(Some(2))))
        );
        assert_eq!(
            parse("Speakers ALL"),
            Ok(Line::Call(Command::FocusRecentSpeakers(None)))
        );
        assert_eq!(
            parse("video 320x180"),
            Ok(Line::Call(Command::FocusVideoSize {
                device: None,
                size: Some((320, 180))
            }))
        );
        assert_eq!(
            parse("video auto"),
            Ok(Line::Call(Command::FocusVideoSize {
                device: None,
                size: None
            }))
        );
        for bad in ["video 0x180", "video 320", "video x", "video -1x2"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("speakers -1").is_err());
        assert!(parse("speakers many").is_err());
        assert!(
            parse("dance")
                .unwrap_err()
                .contains("unknown command `dance`")
        );
        assert!(parse("mute everything").is_err());
    }
}
