//! `groupcall join`: log in, join the call, report, obey stdin, leave.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use groupcall::matrix::{MatrixError, MatrixSession};
use groupcall::{
    AudioSource, CallHandle, ClientError, ClientEvent, JoinOptions, VideoSource, join_call,
};
use groupcall_proto::{CallEvent, Command, CommandError, CreateOptions};
use serde_json::{Value, json};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::args::{Intent, JoinArgs};
use crate::commands::{self, Line};
use crate::output::{event_json, left_json, warning_json};
use crate::view::View;

/// How long leaving (hangups, membership removal, recordings) may take.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `groupcall join` until the call is left.
pub async fn run(args: JoinArgs) -> anyhow::Result<()> {
    // Everything that can be checked locally, before talking to anyone.
    let password = args.password()?;
    let audio = args.audio_source()?;
    let video = args.video_source()?;
    if audio == AudioSource::None && video == VideoSource::None {
        anyhow::bail!(
            "nothing to send: a participant needs audio or video (drop --audio none, or --voice / \
             --video none)"
        );
    }
    let data_dir = args.data_dir()?;
    let mut signals = Signals::new()?;
    let mut out = Out::new(args.json);

    let login = MatrixSession::login(&args.homeserver, &args.user, &password, &data_dir);
    let session = tokio::select! {
        r = login => r.map_err(|e| explain(ClientError::Matrix(e), &args))?,
        sig = signals.recv() => {
            info!("{sig} while logging in: not joined");
            out.left();
            return Ok(());
        }
    };
    let user_id = session.user_id().to_owned();
    let device_id = session.device_id();

    let mut opts = JoinOptions::new(args.room.clone());
    opts.create = args.create_call.then(|| CreateOptions {
        intent: args.intent.unwrap_or(Intent::Prompt).into(),
        call_type: args.call_type(),
        name: None,
    });
    opts.audio = audio;
    opts.video = video;
    opts.record_dir = args.record.clone();
    // --bind, else loopback for a homeserver on loopback, else every usable
    // interface address.
    let (media_addrs, why) =
        groupcall::media::bind::media_bind_addrs(&args.bind, &session.homeserver_url());
    info!(addrs = ?media_addrs, why = why.as_str(), "media addresses");
    opts.bind_addrs = media_addrs.clone();
    opts.encrypt = !args.plaintext;
    opts.require_encrypted = args.require_encrypted;
    opts.wait_for_call = args.wait;
    opts.focus = args.focus.clone();
    opts.follow_foci = args.follow_foci;
    if let Some(on) = args.simulcast {
        opts.simulcast = on.then(groupcall::media::SimulcastConfig::default);
    }
    if args.recent_speakers.is_some() {
        let mut core = groupcall::proto::Config::new("", "");
        core.focus_recent_speakers = args.recent_speakers;
        opts.core = Some(core);
    }

    let handle = tokio::select! {
        r = join_call(session, opts) => r.map_err(|e| explain(e, &args))?,
        sig = signals.recv() => {
            info!("{sig} while joining: not joined");
            out.left();
            return Ok(());
        }
    };
    out.me(&user_id, &device_id, &args.room);
    out.media_addrs = media_addrs;
    run_call(handle, &args, &mut signals, &mut out).await?;
    out.left();
    Ok(())
}

/// Why the main loop stopped.
enum End {
    /// We leave: `leave` on stdin, --duration, a signal.
    Leave(String),
    /// The call task ended by itself (the call was ended by someone else, or
    /// the client failed).
    Ended,
}

async fn run_call(
    mut handle: CallHandle,
    args: &JoinArgs,
    signals: &mut Signals,
    out: &mut Out,
) -> anyhow::Result<()> {
    let mut stdin = commands::spawn_stdin_reader();
    let mut stdin_open = true;
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
    let duration_over = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(duration_over);
    let mut redraw = tokio::time::interval(Duration::from_secs(1));
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let live = !args.json;

    let end = loop {
        tokio::select! {
            ev = handle.next_event() => match ev {
                Some(ev) => out.event(&ev),
                None => break End::Ended,
            },
            line = stdin.recv(), if stdin_open => match line {
                None => {
                    // No more commands; the call goes on.
                    stdin_open = false;
                }
                Some(line) => match commands::parse(&line) {
                    Ok(Line::Empty) => {}
                    Ok(Line::Call(cmd)) => {
                        out.command(line.trim(), &cmd);
                        handle.command(cmd);
                    }
                    Ok(Line::Leave) => break End::Leave("leave command".to_owned()),
                    Err(message) => out.warning(&message),
                },
            },
            sig = signals.recv() => break End::Leave(sig.to_owned()),
            () = &mut duration_over => break End::Leave("--duration is over".to_owned()),
            _ = redraw.tick(), if live => out.redraw(),
        }
    };

    if let End::Leave(why) = &end {
        info!("leaving the call ({why})");
        handle.command(Command::Leave);
    }
    // Report what happens while leaving (hangups, recordings) until the call
    // task ends; a second signal stops waiting.
    let finished = {
        let drain = async {
            while let Some(ev) = handle.next_event().await {
                out.event(&ev);
            }
        };
        tokio::select! {
            r = tokio::time::timeout(LEAVE_TIMEOUT, drain) => {
                r.map_err(|_| format!("leaving took longer than {LEAVE_TIMEOUT:?}; exiting anyway"))
            }
            sig = signals.recv() => Err(format!("{sig} again: exiting without finishing to leave")),
        }
    };
    match finished {
        Err(message) => {
            warn!("{message}");
            out.warning(&message);
            Ok(())
        }
        Ok(()) => match tokio::time::timeout(Duration::from_secs(5), handle.leave()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => match end {
                End::Ended => Err(anyhow!("the call stopped: {e}")),
                End::Leave(_) => {
                    out.warning(&format!("leaving: {e}"));
                    Ok(())
                }
            },
            Err(_) => Ok(()),
        },
    }
}

/// One clear message for errors of logging in and joining.
fn explain(e: ClientError, args: &JoinArgs) -> anyhow::Error {
    match e {
        ClientError::Matrix(MatrixError::NotPermitted { .. }) => {
            anyhow!("permission denied: {e}")
        }
        ClientError::Matrix(
            MatrixError::Forbidden { .. } | MatrixError::Api { .. } | MatrixError::InvalidId { .. },
        ) if e.to_string().contains(&args.room) => {
            let msg = e.to_string();
            let rest = msg
                .strip_prefix(&format!("joining {}: ", args.room))
                .unwrap_or(&msg);
            let hint = match &e {
                ClientError::Matrix(MatrixError::Api { status: 404, .. }) => {
                    " (is the room id or alias right, and the room on this homeserver?)"
                }
                _ => "",
            };
            anyhow!("cannot join room {}: {rest}{hint}", args.room)
        }
        ClientError::Command(CommandError::NoCallToJoin) => anyhow!(
            "room {} has no ongoing call to join; use --create-call to start one, or --wait to wait for one",
            args.room
        ),
        e => anyhow::Error::new(e),
    }
}

/// SIGINT and SIGTERM.
pub(crate) struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub(crate) fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())
                .map_err(|e| anyhow!("cannot handle SIGTERM: {e}"))?,
            int: signal(SignalKind::interrupt())
                .map_err(|e| anyhow!("cannot handle SIGINT: {e}"))?,
        })
    }

    /// The next signal's name.
    pub(crate) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Where reports go: JSON lines, or the live view.
struct Out {
    json: bool,
    tty: bool,
    view: View,
    me: Option<(String, String)>,
    /// The local media addresses, for the `joined` line.
    media_addrs: Vec<std::net::IpAddr>,
}

impl Out {
    fn new(json: bool) -> Out {
        Out {
            json,
            tty: std::io::stdout().is_terminal(),
            view: View::new(String::new(), String::new()),
            me: None,
            media_addrs: Vec::new(),
        }
    }

    fn me(&mut self, user_id: &str, device_id: &str, room: &str) {
        self.view = View::new(format!("{user_id} ({device_id})"), room.to_owned());
        self.me = Some((user_id.to_owned(), device_id.to_owned()));
    }

    fn event(&mut self, ev: &ClientEvent) {
        if self.json {
            if let Some(mut v) = event_json(ev) {
                if let (ClientEvent::Call(CallEvent::Joined { .. }), Some((u, d)), Some(obj)) =
                    (ev, &self.me, v.as_object_mut())
                {
                    obj.insert("user_id".to_owned(), json!(u));
                    obj.insert("device_id".to_owned(), json!(d));
                    let addrs: Vec<String> =
                        self.media_addrs.iter().map(|a| a.to_string()).collect();
                    obj.insert("media_addrs".to_owned(), json!(addrs));
                }
                self.line(&v);
            }
        } else if let Some(line) = self.view.event(ev, Instant::now())
            && !self.tty
        {
            self.text(&format!("* {line}\n"));
        }
    }

    fn command(&mut self, line: &str, cmd: &Command) {
        self.view.command(cmd);
        if !self.json && self.tty {
            self.view.note(format!("> {line}"));
        }
    }

    fn warning(&mut self, message: &str) {
        if self.json {
            self.line(&warning_json(message));
        } else if self.tty {
            self.view.note(format!("warning: {message}"));
        } else {
            self.text(&format!("* warning: {message}\n"));
        }
    }

    fn redraw(&mut self) {
        let text = self.view.render(Instant::now(), self.tty);
        if self.tty {
            self.text(&format!("\x1b[H\x1b[2J{text}"));
        } else {
            self.text(&format!("{text}\n"));
        }
    }

    fn left(&mut self) {
        if self.json {
            self.line(&left_json());
        } else {
            self.text("left the call\n");
        }
    }

    fn line(&self, v: &Value) {
        self.text(&format!("{v}\n"));
    }

    /// Writes and flushes; a closed stdout is not an error worth dying for.
    fn text(&self, s: &str) {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(s.as_bytes());
        let _ = o.flush();
    }
}
