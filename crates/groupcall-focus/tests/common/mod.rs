//! What the focus tests against a real Synapse share: a focus.toml, the
//! focus started in-process and invited into a call room, and media counts
//! on either kind of receiver.
#![allow(dead_code)]

use std::time::Duration;

use groupcall::client::JoinOptions;
use groupcall::matrix::{CreateRoomOptions, MatrixSession};
use groupcall::media::TrackKind;
use groupcall::proto::{CallEvent, CreateOptions, DeviceKey, FocusRef};
use groupcall_focus::config::Config;
use groupcall_focus::driver::{FocusHandle, FocusService};
use groupcall_focus::engine::{EngineCore, EngineFigures, EngineInput};
use groupcall_testkit::*;
use tokio::time::Instant;

/// Writes a focus.toml allowing `allow` and loads it.
pub fn focus_config(h: &Harness, focus_user: &str, allow: &str) -> Config {
    focus_config_with(h, focus_user, allow, "")
}

/// [`focus_config`] with `extra` (TOML sections) appended; a `[media]`
/// section there replaces the default one (loopback, any port).
pub fn focus_config_with(h: &Harness, focus_user: &str, allow: &str, extra: &str) -> Config {
    focus_config_at(h.tmp.path(), &h.hs, focus_user, allow, "", extra)
}

/// A focus.toml for `focus_user` of homeserver `hs` under `tmp`, allowing
/// `allow`, with `top` (top-level keys) and `extra` (sections).
pub fn focus_config_at(
    tmp: &std::path::Path,
    hs: &str,
    focus_user: &str,
    allow: &str,
    top: &str,
    extra: &str,
) -> Config {
    // One directory (and data dir) per focus account.
    let local = focus_user
        .trim_start_matches('@')
        .split(':')
        .next()
        .unwrap_or("focus");
    let dir = tmp.join(format!("{local}-conf"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("password"), format!("{PASSWORD}\n")).unwrap();
    let text = format!(
        r#"homeserver = "{hs}"
user = "{focus_user}"
password_file = "password"
data_dir = "data"
allow = ["{allow}"]
http_listen = "127.0.0.1:0"
{top}

{media}
[drain]
grace_period = "1s"
{extra}"#,
        // `extra` may bring its own [media].
        media = if extra.contains("[media]") {
            ""
        } else {
            "[media]\nbind = [\"127.0.0.1:0\"]\n"
        },
    );
    let path = dir.join("focus.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(path).unwrap()
}

/// The focus, running in-process.
pub struct RunningFocus {
    pub handle: FocusHandle,
    /// How participants name it (`JoinOptions::focus`).
    pub focus_ref: FocusRef,
    /// Its device.
    pub device: DeviceKey,
    /// The call room: created by `creator`, the focus invited and joined.
    pub room: String,
    /// The engine's figures (every 500 ms).
    pub figures: tokio::sync::watch::Receiver<EngineFigures>,
    /// Inputs straight to the engine.
    pub inputs: tokio::sync::mpsc::UnboundedSender<EngineInput>,
    /// Its configuration (to start it again).
    pub config: Config,
}

impl RunningFocus {
    /// Registers the focus's account (`focus`), starts the focus (allowing
    /// invites from `creator`), has `creator` create a public call room
    /// inviting it, and waits until the focus has joined it.
    pub async fn start(h: &Harness, creator: &MatrixSession) -> RunningFocus {
        Self::start_with(h, creator, "").await
    }

    /// [`RunningFocus::start`] with `extra` in its focus.toml.
    pub async fn start_with(h: &Harness, creator: &MatrixSession, extra: &str) -> RunningFocus {
        let focus_user = h.register("focus").await;
        let config = focus_config_with(h, &focus_user, creator.user_id(), extra);
        let mut f = Self::launch(config).await;
        f.room = creator
            .create_call_room(CreateRoomOptions {
                name: Some("through the focus".into()),
                invite: vec![focus_user],
                encrypted: false,
                public: true,
            })
            .await
            .unwrap();
        f.joined_rooms(1, 30).await;
        f
    }

    /// Starts a focus with `config`, in no room yet (`room` empty).
    pub async fn launch(config: Config) -> RunningFocus {
        let core = EngineCore::from_config(&config).expect("the focus's settings");
        let figures = core.figures_watch();
        let inputs = core.input_sender();
        let handle = FocusService::start_with_core(config.clone(), core)
            .await
            .expect("the focus starts");
        let focus_ref = FocusRef {
            user_id: handle.user_id().to_owned(),
            device_id: handle.device_id().to_owned(),
        };
        let device = DeviceKey::new(focus_ref.user_id.clone(), focus_ref.device_id.clone());
        RunningFocus {
            handle,
            focus_ref,
            device,
            room: String::new(),
            figures,
            inputs,
            config,
        }
    }

    /// Waits until the focus has joined `n` rooms.
    pub async fn joined_rooms(&self, n: u64, secs: u64) {
        let mut status = self.handle.watch_status();
        tokio::time::timeout(Duration::from_secs(secs), async {
            while status.borrow().rooms < n {
                status.changed().await.unwrap();
            }
        })
        .await
        .expect("the focus joins the room");
    }

    /// Drains the focus and waits for it to end.
    pub async fn stop(mut self) {
        self.handle.shutdown();
        self.handle.wait().await.unwrap();
    }
}

/// A participant of a test: its log index, whether it is a groupcall
/// client (else a Node or Chromium peer reporting JSON lines), its name
/// and device.
#[derive(Debug, Clone)]
pub struct Member {
    pub idx: usize,
    pub rust: bool,
    pub name: String,
    pub dev: DeviceKey,
}

/// Joins groupcall clients (`clients`: name and session) to the call in
/// the focus's room, each with the focus (`JoinOptions::focus`), the first
/// creating the call. Once the creator has joined, `after_creator` may
/// start another participant: its member is placed second.
pub async fn join_through_focus(
    h: &mut Harness,
    focus: &RunningFocus,
    clients: Vec<(&str, MatrixSession)>,
    after_creator: impl FnMut(&mut Harness) -> Option<Member>,
) -> (Vec<Member>, Vec<Participant>) {
    join_through_focus_with(h, focus, clients, after_creator, |_, _| {}).await
}

/// [`join_through_focus`], with `options(i, o)` changing the join options
/// of the `i`th client.
pub async fn join_through_focus_with(
    h: &mut Harness,
    focus: &RunningFocus,
    clients: Vec<(&str, MatrixSession)>,
    mut after_creator: impl FnMut(&mut Harness) -> Option<Member>,
    options: impl Fn(usize, &mut JoinOptions),
) -> (Vec<Member>, Vec<Participant>) {
    let mut members = Vec::new();
    let mut parts = Vec::new();
    for (i, (name, s)) in clients.into_iter().enumerate() {
        let dev = DeviceKey::new(s.user_id(), s.device_id());
        let mut o = JoinOptions::new(focus.room.clone());
        o.create = (i == 0).then(CreateOptions::default);
        o.focus = Some(focus.focus_ref.clone());
        options(i, &mut o);
        let (idx, p) = h.join_rust(name, s, o).await;
        parts.push(p);
        members.push(Member {
            idx,
            rust: true,
            name: name.to_owned(),
            dev,
        });
        if i == 0 {
            h.log
                .wait_for("the creator to join", 30, |s| {
                    s.iter().any(|e| {
                        e.who == idx
                            && matches!(e.call(), Some(CallEvent::Joined { created: true, .. }))
                    })
                })
                .await;
            members.extend(after_creator(h));
        }
    }
    (members, parts)
}

/// Has every groupcall client of `parts` leave and waits for them.
pub async fn leave_all(parts: Vec<Participant>) {
    for p in &parts {
        p.commander.send(groupcall::proto::Command::Leave);
    }
    for p in parts {
        p.done.await.unwrap();
    }
}

/// Asserts that no groupcall client among `members` connected to another
/// member directly, and that each connected to the focus `focus`.
pub fn assert_only_through(seen: &[Entry], since: Instant, members: &[Member], focus: &DeviceKey) {
    for at in members.iter().filter(|m| m.rust) {
        assert!(
            rust_connected(seen, since, at.idx, focus),
            "{} connected to the focus",
            at.name
        );
        for other in members {
            assert!(
                at.idx == other.idx || !rust_connected(seen, since, at.idx, &other.dev),
                "{} connected to {} directly",
                at.name,
                other.name
            );
        }
    }
}

/// Audio and video frames `at` received from `from` since `since`: for a
/// groupcall client its `Media` events; for a reference or Chromium peer
/// its `media` lines (decoded video frames, audible 10 ms audio frames,
/// halved to count 20 ms frames as groupcall does).
pub fn frames(seen: &[Entry], since: Instant, at: &Member, from: &DeviceKey) -> (u64, u64) {
    if at.rust {
        (
            rust_frames(seen, since, at.idx, from, TrackKind::Audio, None),
            rust_frames(seen, since, at.idx, from, TrackKind::Video, None),
        )
    } else {
        (
            js_frames(seen, since, at.idx, from, "audio", "m.usermedia") / 2,
            js_frames(seen, since, at.idx, from, "video", "m.usermedia"),
        )
    }
}

/// The directions (receiver <- sender) among `members` still short of
/// `audio` audio frames or `video` video frames since `since`, with what
/// they had.
pub fn missing_media(
    seen: &[Entry],
    since: Instant,
    members: &[Member],
    audio: u64,
    video: u64,
) -> Vec<String> {
    let mut missing = Vec::new();
    for at in members {
        for from in members {
            if at.idx == from.idx {
                continue;
            }
            let (a, v) = frames(seen, since, at, &from.dev);
            if a < audio || v < video {
                missing.push(format!("{}<-{} (audio {a}, video {v})", at.name, from.name));
            }
        }
    }
    missing
}

/// Waits (up to `secs`) until every direction among `members` has `audio`
/// audio and `video` video frames since `since`; fails naming the
/// directions short of it. Returns when it held.
pub async fn wait_media(
    h: &mut Harness,
    since: Instant,
    members: &[Member],
    audio: u64,
    video: u64,
    secs: u64,
) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        h.log.pump();
        let missing = missing_media(&h.log.seen, since, members, audio, video);
        if missing.is_empty() {
            return Instant::now();
        }
        if Instant::now() >= deadline {
            panic!(
                "media missing after {secs} s: {}\nrecent events:\n{}",
                missing.join(", "),
                h.log.dump(80)
            );
        }
        h.log.run_for(Duration::from_millis(250)).await;
    }
}

/// Per pair of `members`: when media was flowing both ways (the later of
/// the first audio and first video frame in each direction), in ms from
/// `since`, as `a-b N ms`.
pub fn pair_figures(seen: &[Entry], since: Instant, members: &[Member]) -> String {
    let mut out = Vec::new();
    for (i, x) in members.iter().enumerate() {
        for y in &members[i + 1..] {
            let mut last: Option<Instant> = Some(since);
            for (at, from) in [(x, y), (y, x)] {
                for kind in [TrackKind::Audio, TrackKind::Video] {
                    let t = first_frames_at(seen, since, at.idx, &from.dev, kind);
                    last = match (last, t) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    };
                }
            }
            let t = last.map_or("-".to_owned(), |t| format!("{} ms", ms(since, t)));
            out.push(format!("{}-{} {t}", x.name, y.name));
        }
    }
    out.join(", ")
}

/// The value of a `/metrics` sample (the series' name with its labels, if
/// any), if there.
pub fn metric_opt(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// [`metric_opt`], 0 when not there (yet).
pub fn metric_or_0(text: &str, series: &str) -> u64 {
    metric_opt(text, series).unwrap_or(0)
}

/// [`metric_opt`], failing the test with the whole text when not there.
pub fn metric(text: &str, series: &str) -> u64 {
    metric_opt(text, series).unwrap_or_else(|| panic!("{series} in /metrics:\n{text}"))
}

/// A plain HTTP/1.1 GET of one of the focus's endpoints: the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    raw.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}
