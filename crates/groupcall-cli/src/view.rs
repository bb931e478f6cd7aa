//! The live view of `groupcall join` (without `--json`): participants, the
//! state of each peer connection and the bitrates in and out, redrawn about
//! once a second; notable events as lines.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use groupcall::ClientEvent;
use groupcall_proto::{CallEvent, Command, DeviceKey};

use crate::output::{left_reason, peer_status};

/// A byte counter reported as totals; the rate comes from the last two
/// reports.
#[derive(Debug, Default, Clone)]
pub struct Counter {
    bytes: u64,
    frames: u64,
    at: Option<Instant>,
    bits_per_sec: f64,
}

impl Counter {
    /// Records new totals seen at `now`.
    pub fn update(&mut self, bytes: u64, frames: u64, now: Instant) {
        if let Some(at) = self.at {
            let dt = now.saturating_duration_since(at).as_secs_f64();
            if dt > 0.05 {
                self.bits_per_sec = bytes.saturating_sub(self.bytes) as f64 * 8.0 / dt;
            }
        }
        self.bytes = bytes;
        self.frames = frames;
        self.at = Some(now);
    }

    /// The rate, or 0 when the counter has not moved for a while.
    pub fn rate(&self, now: Instant) -> f64 {
        match self.at {
            Some(at) if now.saturating_duration_since(at) < Duration::from_secs(5) => {
                self.bits_per_sec
            }
            _ => 0.0,
        }
    }
}

#[derive(Debug, Default)]
struct Feed {
    purpose: String,
    audio_muted: bool,
    video_muted: bool,
}

#[derive(Debug, Default)]
struct Participant {
    state: String,
    feeds: BTreeMap<String, Feed>,
    /// (stream id, kind) -> received totals.
    received: BTreeMap<(String, &'static str), Counter>,
    /// kind -> sent totals.
    sent: BTreeMap<&'static str, Counter>,
}

/// What the live view shows.
pub struct View {
    me: String,
    room: String,
    started: Instant,
    call_id: Option<String>,
    audio_muted: bool,
    video_muted: bool,
    screenshare: bool,
    participants: BTreeMap<DeviceKey, Participant>,
    recent: VecDeque<String>,
    /// The active speaker our focus named last.
    speaker: Option<DeviceKey>,
}

const RECENT: usize = 8;

impl View {
    /// An empty view for us (`@user:server (DEVICE)`) in a room.
    pub fn new(me: String, room: String) -> Self {
        View {
            me,
            room,
            started: Instant::now(),
            call_id: None,
            audio_muted: false,
            video_muted: false,
            screenshare: false,
            participants: BTreeMap::new(),
            recent: VecDeque::new(),
            speaker: None,
        }
    }

    /// Notes a command we gave.
    pub fn command(&mut self, cmd: &Command) {
        match cmd {
            Command::SetAudioMuted(m) => self.audio_muted = *m,
            Command::SetVideoMuted(m) => self.video_muted = *m,
            Command::Screenshare(on) => self.screenshare = *on,
            _ => {}
        }
    }

    /// Takes an event in; returns a line worth showing, if it is notable.
    pub fn event(&mut self, ev: &ClientEvent, now: Instant) -> Option<String> {
        let line = match ev {
            ClientEvent::Call(c) => self.call_event(c),
            ClientEvent::Media {
                device,
                stream_id,
                kind,
                frames,
                bytes,
                ..
            } => {
                self.participant(device)
                    .received
                    .entry((stream_id.clone(), kind.as_str()))
                    .or_default()
                    .update(*bytes, *frames, now);
                None
            }
            ClientEvent::MediaSent {
                device,
                kind,
                frames,
                bytes,
            } => {
                self.participant(device)
                    .sent
                    .entry(kind.as_str())
                    .or_default()
                    .update(*bytes, *frames, now);
                None
            }
            ClientEvent::RemoteTrack { device, kind, .. } => {
                Some(format!("{} sends {kind}", short(device)))
            }
            ClientEvent::Signalling { .. } => None,
            ClientEvent::Recorded { path } => Some(format!("recorded {}", path.display())),
            ClientEvent::Warning(w) => Some(format!("warning: {w}")),
            // Events added to the client later (e.g. received frames) are
            // not shown.
            #[allow(unreachable_patterns)]
            _ => None,
        };
        if let Some(l) = &line {
            self.note(l.clone());
        }
        line
    }

    /// Adds a line to the recent events.
    pub fn note(&mut self, line: String) {
        let secs = self.started.elapsed().as_secs();
        self.recent
            .push_back(format!("{:02}:{:02} {line}", secs / 60, secs % 60));
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
    }

    fn participant(&mut self, device: &DeviceKey) -> &mut Participant {
        self.participants
            .entry(device.clone())
            .or_insert_with(|| Participant {
                state: "joined".to_owned(),
                ..Participant::default()
            })
    }

    fn call_event(&mut self, ev: &CallEvent) -> Option<String> {
        match ev {
            CallEvent::RoomCallChanged { .. } | CallEvent::Left => None,
            CallEvent::Joined {
                call_id, created, ..
            } => {
                self.call_id = Some(call_id.clone());
                Some(if *created {
                    format!("started call {call_id}")
                } else {
                    format!("joined call {call_id}")
                })
            }
            CallEvent::CallEnded { reason, .. } => Some(format!("the call ended ({reason})")),
            CallEvent::ParticipantJoined { device, .. } => {
                self.participant(device);
                Some(format!("{} joined", short(device)))
            }
            CallEvent::ParticipantLeft { device, reason, .. } => {
                self.participants.remove(device);
                Some(format!("{} left ({})", short(device), left_reason(*reason)))
            }
            CallEvent::PeerState { device, status, .. } => {
                let (state, reason) = peer_status(status);
                // A peer closing after its participant left does not bring
                // the participant back.
                match self.participants.get_mut(device) {
                    Some(p) => p.state = state.to_owned(),
                    None if reason.is_none() => self.participant(device).state = state.to_owned(),
                    None => {}
                }
                Some(match reason {
                    Some(r) => format!("{}: {state} ({r})", short(device)),
                    None => format!("{}: {state}", short(device)),
                })
            }
            CallEvent::FeedAdded {
                device,
                stream_id,
                purpose,
                audio_muted,
                video_muted,
            }
            | CallEvent::FeedChanged {
                device,
                stream_id,
                purpose,
                audio_muted,
                video_muted,
            } => {
                let p = self.participant(device);
                let feed = p.feeds.entry(stream_id.clone()).or_default();
                feed.purpose = purpose.as_str().trim_start_matches("m.").to_owned();
                feed.audio_muted = *audio_muted;
                feed.video_muted = *video_muted;
                None
            }
            CallEvent::FeedRemoved { device, stream_id } => {
                self.participant(device).feeds.remove(stream_id);
                None
            }
            CallEvent::Unanswered { device, calls } => Some(format!(
                "{} answered none of {calls} calls; calling on, less often",
                short(device)
            )),
            CallEvent::CallStarted {
                call_id, intent, ..
            } => Some(format!(
                "call {call_id} started ({})",
                intent.as_ref().map_or("m.prompt", |i| i.as_str())
            )),
            CallEvent::ActiveSpeaker { device, .. } => {
                self.speaker = device.clone();
                // Shown in the table (a star), not as a line: it may change
                // every second.
                None
            }
            other => Some(format!("{other:?}")),
        }
    }

    /// The whole view as text. `recent` includes the recent events.
    pub fn render(&self, now: Instant, recent: bool) -> String {
        let mut s = String::new();
        let up = self.started.elapsed().as_secs();
        let _ = writeln!(
            s,
            "groupcall  {}  in {}  call {}  up {:02}:{:02}:{:02}",
            self.me,
            self.room,
            self.call_id.as_deref().unwrap_or("-"),
            up / 3600,
            up / 60 % 60,
            up % 60
        );
        let onoff = |muted: bool| if muted { "muted" } else { "on" };
        let _ = writeln!(
            s,
            "we send: audio {}, video {}, screenshare {}",
            onoff(self.audio_muted),
            onoff(self.video_muted),
            if self.screenshare { "on" } else { "off" }
        );
        let _ = writeln!(
            s,
            "{:<44} {:<13} {:>10} {:>10}  feeds",
            "participant (* speaks)", "peer", "in kbit/s", "out kbit/s"
        );
        if self.participants.is_empty() {
            let _ = writeln!(s, "(nobody else in the call)");
        }
        for (device, p) in &self.participants {
            // (fold, not sum: an empty f64 sum is -0.0)
            let rx = p.received.values().fold(0.0, |a, c| a + c.rate(now));
            let tx = p.sent.values().fold(0.0, |a, c| a + c.rate(now));
            let feeds: Vec<String> = p
                .feeds
                .values()
                .map(|f| {
                    format!(
                        "{}(audio {}, video {})",
                        f.purpose,
                        onoff(f.audio_muted),
                        onoff(f.video_muted)
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "{:<44} {:<13} {:>10.1} {:>10.1}  {}",
                format!(
                    "{}{} {}",
                    if self.speaker.as_ref() == Some(device) {
                        "* "
                    } else {
                        ""
                    },
                    device.user_id,
                    device.device_id
                ),
                p.state,
                rx / 1000.0,
                tx / 1000.0,
                feeds.join(" ")
            );
        }
        if recent && !self.recent.is_empty() {
            let _ = writeln!(s, "\nrecent:");
            for l in &self.recent {
                let _ = writeln!(s, "  {l}");
            }
        }
        let _ = writeln!(s, "\ncommands on stdin: {}", crate::commands::HELP);
        s
    }
}

fn short(device: &DeviceKey) -> String {
    format!("{} ({})", device.user_id, device.device_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use groupcall::media::TrackKind;
    use groupcall_proto::events::FeedPurpose;
    use groupcall_proto::{PeerHandle, PeerStatus};

    #[test]
    fn counter_rate() {
        let t0 = Instant::now();
        let mut c = Counter::default();
        c.update(1000, 10, t0);
        assert_eq!(c.rate(t0), 0.0);
        c.update(126_000, 60, t0 + Duration::from_secs(1));
        assert!((c.rate(t0 + Duration::from_secs(1)) - 1_000_000.0).abs() < 1.0);
        // Stale counters read as zero.
        assert_eq!(c.rate(t0 + Duration::from_secs(10)), 0.0);
    }

    #[test]
    fn participants_and_rates() {
        let bob = DeviceKey::new("@bob:localhost", "BOBDEV");
        let mut v = View::new("@alice:localhost (A)".into(), "!r:localhost".into());
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        assert!(
            v.event(
                &ClientEvent::Call(CallEvent::ParticipantJoined {
                    device: bob.clone(),
                    session_id: "s".into()
                }),
                t0
            )
            .unwrap()
            .contains("joined")
        );
        v.event(
            &ClientEvent::Call(CallEvent::PeerState {
                device: bob.clone(),
                peer: PeerHandle(1),
                call_id: "c".into(),
                status: PeerStatus::Connected,
            }),
            t0,
        );
        v.event(
            &ClientEvent::Call(CallEvent::FeedAdded {
                device: bob.clone(),
                stream_id: "st".into(),
                purpose: FeedPurpose::Usermedia,
                audio_muted: true,
                video_muted: false,
            }),
            t0,
        );
        for (t, bytes) in [(t0, 0), (t1, 12_500)] {
            v.event(
                &ClientEvent::Media {
                    device: bob.clone(),
                    stream_id: "st".into(),
                    mid: "0".into(),
                    kind: TrackKind::Video,
                    frames: 1,
                    bytes,
                },
                t,
            );
            v.event(
                &ClientEvent::MediaSent {
                    device: bob.clone(),
                    kind: TrackKind::Audio,
                    frames: 1,
                    bytes: bytes * 2,
                },
                t,
            );
        }
        let text = v.render(t1, true);
        assert!(text.contains("@bob:localhost BOBDEV"), "{text}");
        assert!(text.contains("connected"), "{text}");
        assert!(text.contains("100.0"), "{text}");
        assert!(text.contains("200.0"), "{text}");
        assert!(text.contains("usermedia(audio muted, video on)"), "{text}");
        // The active speaker our focus names is starred.
        assert!(
            v.event(
                &ClientEvent::Call(CallEvent::ActiveSpeaker {
                    device: Some(bob.clone()),
                    stream_id: Some("st".into())
                }),
                t1
            )
            .is_none()
        );
        assert!(v.render(t1, false).contains("* @bob:localhost BOBDEV"));
        v.event(
            &ClientEvent::Call(CallEvent::ActiveSpeaker {
                device: None,
                stream_id: None,
            }),
            t1,
        );
        assert!(!v.render(t1, false).contains("* @bob"));
        v.event(
            &ClientEvent::Call(CallEvent::ParticipantLeft {
                device: bob,
                session_id: "s".into(),
                reason: groupcall_proto::room::LeftReason::Removed,
            }),
            t1,
        );
        v.event(
            &ClientEvent::Call(CallEvent::PeerState {
                device: DeviceKey::new("@bob:localhost", "BOBDEV"),
                peer: PeerHandle(1),
                call_id: "c".into(),
                status: PeerStatus::Closed("user_hangup".into()),
            }),
            t1,
        );
        let text = v.render(t1, true);
        assert!(text.contains("nobody else"), "{text}");
        assert!(!text.contains("-0.0"), "{text}");
    }
}
