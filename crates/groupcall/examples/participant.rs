//! One call participant as a process: joins a room's call and prints every
//! event as a JSON line on stdout. Used by the reliability tests, which run
//! it in network namespaces and kill it with SIGKILL.
//!
//! ```sh
//! cargo run -p groupcall --example participant -- \
//!     --homeserver http://127.0.0.1:8008 --user alice --password pw \
//!     --data-dir /tmp/alice --room '!room:localhost' [--create] \
//!     [--bind 10.0.0.2] [--record DIR] [--no-delayed-leave] \
//!     [--expiry-ms 8000 --refresh-ms 3000] \
//!     [--media-timeouts-ms 1000,3000] [--connect-timeout-ms 15000] \
//!     [--stats-ms 1000] [--no-retransmission]
//! ```
//!
//! `--no-retransmission` turns video NACK/RTX off (a diagnostic knob: the
//! lossy-network test compares the recordings with and without it).
//!
//! Lines on stdout: every client event in the library's one JSON shape
//! ([`groupcall::json`]), plus `{"event":"ready","user_id","device_id"}`
//! after login, `{"event":"finished"}` at the end and
//! `{"event":"error","message"}`; each with `t_ms` (wall clock, ms).
//!
//! Lines on stdin: `leave` leaves the call, `screenshare on|off`.

#![allow(clippy::print_stdout)]
#![recursion_limit = "256"]

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use groupcall::matrix::MatrixSession;
use groupcall::proto::{Command, Config, CreateOptions};
use groupcall::{JoinOptions, join_call};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("usage: {0}")]
    Usage(String),
    #[error(transparent)]
    Matrix(#[from] groupcall::matrix::MatrixError),
    #[error(transparent)]
    Client(#[from] groupcall::ClientError),
}

#[derive(Default)]
struct Args {
    homeserver: String,
    user: String,
    password: String,
    data_dir: PathBuf,
    room: String,
    create: bool,
    bind: Vec<IpAddr>,
    record: Option<PathBuf>,
    no_delayed_leave: bool,
    expiry_ms: Option<u64>,
    refresh_ms: Option<u64>,
    media_timeouts_ms: Option<(u64, u64)>,
    connect_timeout_ms: Option<u64>,
    stats_ms: Option<u64>,
    no_retransmission: bool,
}

fn parse_args() -> Result<Args, Error> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    let usage = |m: &str| Error::Usage(m.to_owned());
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| usage(&format!("{flag} needs a value")))
        };
        let num = |v: String| v.parse::<u64>().map_err(|e| usage(&format!("{v}: {e}")));
        match flag.as_str() {
            "--homeserver" => a.homeserver = val()?,
            "--user" => a.user = val()?,
            "--password" => a.password = val()?,
            "--data-dir" => a.data_dir = val()?.into(),
            "--room" => a.room = val()?,
            "--create" => a.create = true,
            "--bind" => {
                let v = val()?;
                a.bind
                    .push(v.parse().map_err(|e| usage(&format!("{v}: {e}")))?);
            }
            "--record" => a.record = Some(val()?.into()),
            "--no-delayed-leave" => a.no_delayed_leave = true,
            "--no-retransmission" => a.no_retransmission = true,
            "--expiry-ms" => a.expiry_ms = Some(num(val()?)?),
            "--refresh-ms" => a.refresh_ms = Some(num(val()?)?),
            "--connect-timeout-ms" => a.connect_timeout_ms = Some(num(val()?)?),
            "--stats-ms" => a.stats_ms = Some(num(val()?)?),
            "--media-timeouts-ms" => {
                let v = val()?;
                let (d, f) = v
                    .split_once(',')
                    .ok_or_else(|| usage("--media-timeouts-ms DISCONNECT,FAILED"))?;
                a.media_timeouts_ms = Some((num(d.into())?, num(f.into())?));
            }
            other => return Err(usage(&format!("unknown argument {other}"))),
        }
    }
    if a.homeserver.is_empty() || a.user.is_empty() || a.room.is_empty() {
        return Err(usage(
            "--homeserver, --user, --password, --data-dir and --room are needed",
        ));
    }
    Ok(a)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn emit(mut v: Value) {
    if let Some(o) = v.as_object_mut() {
        o.insert("t_ms".into(), json!(now_ms()));
    }
    println!("{v}");
}

async fn run(args: Args) -> Result<(), Error> {
    let session =
        MatrixSession::login(&args.homeserver, &args.user, &args.password, &args.data_dir).await?;
    emit(json!({"event": "ready", "user_id": session.user_id(), "device_id": session.device_id()}));
    let mut opts = JoinOptions::new(args.room.clone());
    opts.create = args.create.then(CreateOptions::default);
    if !args.bind.is_empty() {
        opts.bind_addrs = args.bind.clone();
    }
    opts.record_dir = args.record.clone();
    opts.liveness.delayed_leave = !args.no_delayed_leave;
    opts.retransmission = !args.no_retransmission;
    if let Some(e) = args.expiry_ms {
        opts.liveness.fallback_expiry = Duration::from_millis(e);
    }
    if let Some(r) = args.refresh_ms {
        opts.liveness.fallback_refresh = Duration::from_millis(r);
    }
    if let Some((d, f)) = args.media_timeouts_ms {
        opts.liveness.media_disconnect_timeout = Duration::from_millis(d);
        opts.liveness.media_failed_timeout = Duration::from_millis(f);
    }
    if let Some(ms) = args.stats_ms {
        opts.stats_interval = Duration::from_millis(ms.max(50));
    }
    if let Some(c) = args.connect_timeout_ms {
        let mut core = Config::new("", "");
        core.connect_timeout_ms = c;
        opts.core = Some(core);
    }
    let mut call = join_call(session, opts).await?;
    let commander = call.commander();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let cmd = match line.trim() {
                "leave" => Command::Leave,
                "screenshare on" => Command::Screenshare(true),
                "screenshare off" => Command::Screenshare(false),
                _ => continue,
            };
            if !commander.send(cmd) {
                break;
            }
        }
    });
    while let Some(ev) = call.next_event().await {
        // Frames are not asked for (`deliver_frames` stays off).
        emit(ev.to_json());
    }
    call.finished().await?;
    emit(json!({"event": "finished"}));
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| "warn,matrix_sdk_crypto=error,groupcall=info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let result = match parse_args() {
        Ok(a) => run(a).await,
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        emit(json!({"event": "error", "message": e.to_string()}));
        std::process::exit(1);
    }
}
