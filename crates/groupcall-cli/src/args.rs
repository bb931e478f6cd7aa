//! Command line arguments (their doc comments are the `--help` text) and
//! what they turn into.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use groupcall::{AudioSource, VideoSource};
use groupcall_proto::events::{CallIntent, CallType};

/// Native Matrix group calls (MSC3401) from the command line.
#[derive(Parser)]
#[command(name = "groupcall", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Join (or start) the group call of a Matrix room and send media.
    ///
    /// Prints a live view of the call (or JSON lines with --json) and reads
    /// commands from stdin, one per line: `mute audio`, `unmute audio`,
    /// `mute video`, `unmute video`, `screenshare on`, `screenshare off`,
    /// `leave`. The end of stdin does not end the call: --duration, `leave`,
    /// SIGINT or SIGTERM do, leaving cleanly (hang up, remove our membership).
    Join(JoinArgs),
    /// Run a throwaway local Synapse with users and a call room, until SIGINT
    /// or SIGTERM.
    ///
    /// Prints one JSON line: {"event":"synapse","homeserver":URL,
    /// "room_id":ID,"users":[{"user_id","name","password"},...]}. The room
    /// is public and lets every member send the call events. Synapse comes
    /// from a venv in ~/.cache/groupcall (installed with pip on first use).
    Synapse(SynapseArgs),
    /// Show the whole system working: a group call of N participants on a
    /// throwaway local Synapse (or any homeserver), with a report.
    ///
    /// Without --homeserver it starts a local Synapse (installed once into
    /// ~/.cache/groupcall), registers the users, creates a call room, runs
    /// --participants groupcall clients in this process (and --with-reference
    /// matrix-js-sdk peers from interop/), shows every pair connecting and
    /// media flowing, prints a table and writes a report directory
    /// (summary.json, timeline.svg, index.html, recordings). With
    /// --homeservers N it starts a local federation of N Synapses instead,
    /// the participants spread over them (and with --focus one linked
    /// focus per homeserver). Everything it started is stopped at the end,
    /// on errors and on SIGINT/SIGTERM.
    Demo(DemoArgs),
    /// Run a focus (an SFU, MSC3898) as a Matrix device of a bot account.
    ///
    /// Reads focus.toml (see docs/focus.example.toml and docs/focus.md),
    /// logs in (reusing the device stored in its data_dir), joins the rooms
    /// it is invited to by users or servers on its allow-list (declining the
    /// others), and serves GET /health and GET /metrics on http_listen.
    /// SIGTERM or SIGINT drains: it stops accepting, and exits 0 after
    /// drain.grace_period (a second signal stops it at once, exit 1). Media
    /// forwarding is not built yet.
    Focus(FocusArgs),
    /// Benchmarks against the reference implementation (matrix-js-sdk).
    #[command(subcommand)]
    Bench(BenchCmd),
}

/// `groupcall bench` subcommands.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Call setup: groupcall and the reference on one local Synapse, N = 2,
    /// 4, 8 participants (--sizes, up to 16), several repetitions each.
    ///
    /// P1: time from the last participant's join (its first member state
    /// event reaching the homeserver) until every pair receives audio and
    /// video frames both ways. P2: to-device requests, messages and bytes
    /// per pair, and member state events, counted by an HTTP proxy in front
    /// of Synapse. P4: CPU time per participant and connected peer over a
    /// fixed window once the mesh is up. The floor, measured first against
    /// the same Synapse: one member-state hop, one to-device hop and an
    /// ICE/DTLS handshake on loopback; P1 is shown against it. A run that
    /// does not complete is reported with its outcome (the remaining runs
    /// of that system and size are skipped); only groupcall's failures make
    /// the command fail. Prints a table; with --json also one JSON object
    /// for the floor and one per N on stdout.
    Setup(BenchSetupArgs),
    /// Forwarding capacity of groupcall's focus and of Janus VideoRoom
    /// (apt `janus`) side by side, each pinned to core 0, a load generator of real
    /// DTLS-SRTP peers on core 1; publishers' packet rate ramped until loss
    /// passes 0.1 %; prints capacity (egress packets/s), packets per
    /// CPU-second and latency at half of it.
    Focus(BenchFocusArgs),
    /// The load generator process of `bench focus` (JSON lines on stdin).
    #[command(hide = true)]
    Loadgen,
}

/// Arguments of `groupcall bench focus`.
#[derive(Args, Debug)]
pub struct BenchFocusArgs {
    /// Scenarios, comma separated, each PUBLISHERSxSUBSCRIBERS (every
    /// subscriber receives every publisher's audio and video), e.g.
    /// `1x10,1x50,1x200,10x10`.
    #[arg(long, value_name = "PxS,...", value_delimiter = ',', default_value = "1x10", value_parser = parse_scenario)]
    pub scenarios: Vec<Scenario>,

    /// Measured window per ramp step.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration)]
    pub window: Duration,

    /// First video packet rate per publisher.
    #[arg(long, value_name = "PPS", default_value_t = 100)]
    pub start_pps: u64,

    /// Each step multiplies the rate by this.
    #[arg(long, value_name = "F", default_value_t = 1.5)]
    pub ramp_factor: f64,

    /// Highest video packet rate per publisher tried.
    #[arg(long, value_name = "PPS", default_value_t = 20_000)]
    pub max_pps: u64,

    /// Which systems to run, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "groupcall,janus"
    )]
    pub systems: Vec<FocusSystem>,

    /// Also print one JSON object per scenario on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One scenario of `groupcall bench focus`: `PxS` (P publishers of audio
/// and video, S subscribers receiving all of them) or `NaVv` (N
/// participants all to all: each publishes audio, the first V video too,
/// and each receives everyone else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Publishers (Opus at 50 packets/s each).
    pub publishers: u16,
    /// Of them, those that publish VP8 at the ramped rate too.
    pub video_publishers: u16,
    /// Subscribers (each receives every publisher; all to all: everyone
    /// else).
    pub subscribers: u16,
    /// Every participant publishes and subscribes.
    pub all_to_all: bool,
}

impl Scenario {
    /// Subscribers of each published stream.
    pub fn fanout(&self) -> u64 {
        if self.all_to_all {
            u64::from(self.publishers.saturating_sub(1))
        } else {
            u64::from(self.subscribers)
        }
    }

    /// Matrix devices / peer connections of a focus client each.
    pub fn participants(&self) -> usize {
        if self.all_to_all {
            usize::from(self.publishers)
        } else {
            usize::from(self.publishers) + usize::from(self.subscribers)
        }
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.all_to_all {
            write!(f, "{}a{}v", self.publishers, self.video_publishers)
        } else {
            write!(f, "{}x{}", self.publishers, self.subscribers)
        }
    }
}

fn parse_scenario(s: &str) -> Result<Scenario, String> {
    let num = |t: &str| {
        t.parse::<u16>()
            .map_err(|_| format!("`{t}` is not a number"))
    };
    let sc = if let Some((n, v)) = s.strip_suffix('v').and_then(|r| r.split_once('a')) {
        let (n, v) = (num(n)?, num(v)?);
        if !(2..=100).contains(&n) || v > n {
            return Err(format!(
                "`{s}`: 2 to 100 participants, at most all of them with video"
            ));
        }
        Scenario {
            publishers: n,
            video_publishers: v,
            subscribers: n,
            all_to_all: true,
        }
    } else {
        let (p, sub) = s
            .split_once('x')
            .ok_or_else(|| format!("`{s}` is not PUBLISHERSxSUBSCRIBERS nor NaVv"))?;
        let (publishers, subscribers) = (num(p)?, num(sub)?);
        if !(1..=64).contains(&publishers) || !(1..=500).contains(&subscribers) {
            return Err(format!(
                "`{s}`: 1 to 64 publishers and 1 to 500 subscribers"
            ));
        }
        Scenario {
            publishers,
            video_publishers: publishers,
            subscribers,
            all_to_all: false,
        }
    };
    Ok(sc)
}

#[cfg(test)]
mod scenario_tests {
    use super::*;

    #[test]
    fn scenarios_parse_and_print_back() {
        for (text, p, v, s, all) in [("1x10", 1, 1, 10, false), ("50a10v", 50, 10, 50, true)] {
            let sc = parse_scenario(text).unwrap();
            assert_eq!(
                (
                    sc.publishers,
                    sc.video_publishers,
                    sc.subscribers,
                    sc.all_to_all
                ),
                (p, v, s, all)
            );
            assert_eq!(sc.to_string(), text);
        }
        assert_eq!(parse_scenario("50a10v").unwrap().participants(), 50);
        assert_eq!(parse_scenario("2x3").unwrap().participants(), 5);
        for bad in ["", "1x", "x5", "0x5", "1x501", "1a2v", "5a6v", "axbv", "10"] {
            assert!(parse_scenario(bad).is_err(), "{bad}");
        }
    }
}

/// A system `groupcall bench focus` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FocusSystem {
    /// groupcall's focus (`groupcall focus`), set up through Matrix.
    Groupcall,
    /// Janus VideoRoom (Debian's `janus`).
    Janus,
}

/// Which recordings the demo keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RecordWhich {
    /// The first participant's.
    First,
    /// Every groupcall participant's.
    All,
    /// None.
    None,
}

/// Arguments of `groupcall demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Number of groupcall participants (in this process). Default: 4 (6
    /// with --focus), or with --homeserver the number of --user accounts
    /// left after the reference peers.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
    pub participants: Option<u16>,

    /// Seconds of media after every pair is connected with media both ways.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration)]
    pub duration: Duration,

    /// Add K reference peers (matrix-js-sdk GroupCall in Node,
    /// `node interop/peer.mjs`; its npm packages come from
    /// `scripts/setup-node`, which `scripts/demo` runs).
    #[arg(long, value_name = "K", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=8))]
    pub with_reference: u16,

    /// Also start a focus (an MSC3898 SFU, `groupcall focus`) in this
    /// process, on its own bot account, invited into the call room: every
    /// groupcall participant publishes to it and receives the others
    /// through it. Reference peers (--with-reference) have no focus mode:
    /// they stay in the mesh with everyone. The report adds the focus's
    /// figures. With --homeservers: one focus per homeserver, linked
    /// (cascading foci).
    #[arg(long, conflicts_with = "homeserver")]
    pub focus: bool,

    /// With --focus: add C headless Chromium participants that speak
    /// MSC3898 to the focus (`node interop/focus-client.mjs`; the browser's
    /// own WebRTC). Default 1 with --focus (0 with --homeservers, where
    /// they use hs0 and its focus). They use the focus only: pairs of one
    /// with a reference peer are not expected to meet and are left out.
    #[arg(long, value_name = "C", requires = "focus", value_parser = clap::value_parser!(u16).range(0..=4))]
    pub with_chromium_focus_client: Option<u16>,

    /// Where the report goes (default ./groupcall-report-<UTC timestamp>).
    #[arg(long, value_name = "DIR")]
    pub report_dir: Option<PathBuf>,

    /// Whose received media is recorded into the report.
    #[arg(long, value_enum, default_value = "first")]
    pub record: RecordWhich,

    /// Also print JSON lines on stdout (progress, then a summary as the last
    /// line); the table then goes to stderr.
    #[arg(long)]
    pub json: bool,

    /// Start a local test federation of N Synapses (2 or 3, on loopback)
    /// instead of one Synapse. Groupcall participant i uses homeserver
    /// i % N (hs0, hs1, ...); reference peers and Chromium focus clients
    /// use hs0. The first participant creates a private call room and
    /// invites everyone, across the federation. Without --focus everyone
    /// meets in the mesh; with --focus there is one focus per homeserver
    /// (cascade = true), each participant publishes to its own
    /// homeserver's focus and the foci link with each other. The
    /// report, the terminal and the --json summary show the topology; the
    /// summary adds `homeservers` and, with --focus, `links` (one entry per
    /// focus and link, i.e. per direction: `from` the focus that reports
    /// it, `to` the other focus's device, `streams_carried` forwarded from
    /// `from` to `to`, `streams_subscribed` asked by `from` of `to`,
    /// `packets` forwarded from `from` to `to`, `packets_in` the other
    /// way) and `foci` (each focus's figures; `focus` is then their sum:
    /// the most uploads per participant, the rest added up, `user_id`
    /// listing them). No
    /// signalling counts with a federation (no counting proxy).
    #[arg(long, value_name = "N", conflicts_with_all = ["homeserver", "synapse_port"], value_parser = clap::value_parser!(u16).range(2..=3))]
    pub homeservers: Option<u16>,

    /// Use this homeserver instead of a local Synapse (needs --user).
    #[arg(long, value_name = "URL", requires = "users")]
    pub homeserver: Option<String>,

    /// An account on --homeserver, as NAME:PASSWORD (NAME a localpart; the
    /// password may hold colons); repeatable. The first ones are the
    /// groupcall participants, the rest the reference peers.
    #[arg(long = "user", value_name = "NAME:PASSWORD", value_parser = parse_user_spec, requires = "homeserver")]
    pub users: Vec<UserSpec>,

    /// With --homeserver: the room to call in (it must let members send the
    /// call events); default: the first user creates one.
    #[arg(long, value_name = "ROOM_ID_OR_ALIAS", requires = "homeserver")]
    pub room: Option<String>,

    /// Port for the local Synapse on 127.0.0.1 (default: a free one).
    #[arg(long, value_name = "PORT", conflicts_with = "homeserver")]
    pub synapse_port: Option<u16>,

    /// Give up when a participant has not joined, or a pair is not connected
    /// with media both ways, this many seconds after the last join.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Send signalling as plaintext to-device messages (no Olm).
    #[arg(long)]
    pub plaintext: bool,

    /// The interop directory with peer.mjs (default: ./interop, else the
    /// one of the source tree this binary was built from).
    #[arg(long, value_name = "DIR")]
    pub interop_dir: Option<PathBuf>,

    /// Test only: the last groupcall participant offers media on ::1 only,
    /// which the others (on 127.0.0.1) cannot reach, so its pairs never
    /// connect.
    #[arg(long, hide = true)]
    pub break_media: bool,

    /// Test only: this many seconds into the media time, the last groupcall
    /// participant mutes its microphone and camera, so that its pairs' media
    /// stops (which the demo must report as an error).
    #[arg(long, hide = true, value_name = "SECS", value_parser = parse_duration)]
    pub stop_media_after: Option<Duration>,
}

/// Arguments of `groupcall bench setup`.
#[derive(Args, Debug)]
pub struct BenchSetupArgs {
    /// Call sizes (participants), comma separated.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', default_value = "2,4,8", value_parser = clap::value_parser!(u16).range(2..=16))]
    pub sizes: Vec<u16>,

    /// Repetitions per size and system.
    #[arg(long, value_name = "R", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=50))]
    pub reps: u16,

    /// Which systems to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "groupcall,reference"
    )]
    pub systems: Vec<System>,

    /// CPU measurement window once the mesh is up (P4); 0 skips P4.
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration_or_zero)]
    pub cpu_window: Duration,

    /// Give up on a run when a pair is not up this long after the last join.
    #[arg(long, value_name = "SECS", default_value = "60", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Olm-encrypted signalling for both systems (default: plaintext, the
    /// reference's default).
    #[arg(long)]
    pub encrypted: bool,

    /// Port for the local Synapse on 127.0.0.1 (default: a free one).
    #[arg(long, value_name = "PORT")]
    pub synapse_port: Option<u16>,

    /// The interop directory with peer.mjs (default: ./interop, else the
    /// one of the source tree this binary was built from).
    #[arg(long, value_name = "DIR")]
    pub interop_dir: Option<PathBuf>,

    /// Samples of each floor component (member-state hop, to-device hop,
    /// loopback ICE/DTLS handshake) measured at the start; 0 skips the
    /// floor.
    #[arg(long, value_name = "K", default_value_t = 10, value_parser = clap::value_parser!(u16).range(0..=100))]
    pub floor_reps: u16,

    /// Also print one JSON object per size on stdout (and one with the
    /// floor first).
    #[arg(long)]
    pub json: bool,
}

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum System {
    /// groupcall (this project), in this process.
    Groupcall,
    /// matrix-js-sdk GroupCall in Node (interop/peer.mjs).
    Reference,
}

/// Arguments of `groupcall join`.
#[derive(Args)]
pub struct JoinArgs {
    /// Homeserver base URL, e.g. https://matrix.example.org.
    #[arg(long, value_name = "URL")]
    pub homeserver: String,

    /// User to log in as: a localpart (alice) or a full Matrix user id
    /// (@alice:example.org).
    #[arg(long, value_name = "NAME")]
    pub user: String,

    /// Password. Other local users can see command lines: prefer
    /// --password-file or the GROUPCALL_PASSWORD environment variable.
    #[arg(long, value_name = "PW", conflicts_with = "password_file")]
    pub password: Option<String>,

    /// Read the password from the first line of this file.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,

    /// Room id (!id:server) or alias (#alias:server); joined first if needed.
    #[arg(long, value_name = "ROOM_ID_OR_ALIAS")]
    pub room: String,

    /// Start a call if the room has none (otherwise joining a room without a
    /// call is an error).
    #[arg(long)]
    pub create_call: bool,

    /// If the room has no call, wait in it for one to start, then join it
    /// (an answering bot in one command). The call's start is reported first
    /// (`call_started`, with its intent).
    #[arg(long, conflicts_with = "create_call")]
    pub wait: bool,

    /// Intent of a call started with --create-call.
    #[arg(long, value_enum, requires = "create_call")]
    pub intent: Option<Intent>,

    /// Voice call: a call started with --create-call is a voice call, and we
    /// send no video.
    #[arg(long, conflicts_with = "video")]
    pub voice: bool,

    /// Audio to send: `tone` (a built-in 440 Hz tone), an Ogg/Opus FILE
    /// (looped), or `none`.
    #[arg(long, value_name = "tone|FILE|none", default_value = "tone")]
    pub audio: String,

    /// Video to send: `pattern` (a built-in moving test pattern), an IVF/VP8
    /// FILE (looped), or `none`. Default: pattern.
    #[arg(long, value_name = "pattern|FILE|none")]
    pub video: Option<String>,

    /// Record every remote track into this directory (Ogg/Opus for audio,
    /// IVF/VP8 for video), one file per device and stream.
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,

    /// Leave the call after this many seconds (fractions allowed).
    #[arg(long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Where the login session and the encryption keys are kept (the device is
    /// reused across runs). Default:
    /// $XDG_DATA_HOME/groupcall/<user>@<homeserver host>, or
    /// ~/.local/share/groupcall/<user>@<homeserver host>.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Print one JSON object per line on stdout instead of the live view.
    #[arg(long)]
    pub json: bool,

    /// Local address for media (host candidates); repeatable. Default:
    /// 127.0.0.1 when the homeserver is on loopback (127.0.0.0/8, ::1,
    /// localhost), else every address (IPv4 and IPv6, not loopback or
    /// link-local) of every interface that is up. `0.0.0.0` / `::` stand for
    /// every such address of that family.
    #[arg(long = "bind", value_name = "ADDR")]
    pub bind: Vec<IpAddr>,

    /// Encryption only: refuse signalling that did not come Olm-encrypted,
    /// and send none to a device without published keys (by default such a
    /// device gets plaintext, with a warning).
    #[arg(long, conflicts_with = "plaintext")]
    pub require_encrypted: bool,

    /// Send signalling as plaintext to-device messages (no Olm).
    #[arg(long)]
    pub plaintext: bool,

    /// Publish to this focus (an SFU, MSC3898), given as
    /// `@user:server/DEVICE`: it is named in our member entry and called;
    /// members that use a focus too are met there, the others in the mesh.
    #[arg(long, value_name = "@USER:SERVER/DEVICE")]
    pub focus: Option<groupcall::proto::FocusRef>,

    /// Choose the focus the other members are active on (MSC3898), and
    /// follow them when they move; --focus is then only the preferred one.
    #[arg(long)]
    pub follow_foci: bool,

    /// With --focus: receive the camera video of only the N most recent
    /// active speakers the focus names (everyone's audio and screenshares
    /// still come). Also on stdin: `speakers N`, `speakers all`.
    #[arg(long, value_name = "N", requires = "focus")]
    pub recent_speakers: Option<usize>,

    /// With --focus: send the camera to the focus as simulcast, three
    /// layers of the built-in pattern (320x180, 640x360, 1280x720) whose
    /// top ones pause while the uplink estimate is low (`true`), or one
    /// layer (`false`). Default: the library's default. Mesh peers always
    /// get one layer.
    #[arg(long, value_name = "BOOL", requires = "focus", action = clap::ArgAction::Set)]
    pub simulcast: Option<bool>,
}

/// `m.intent` of a new call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Intent {
    /// Members are prompted to join (a conference).
    Prompt,
    /// Members' devices ring.
    Ring,
    /// A voice/video room.
    Room,
}

impl From<Intent> for CallIntent {
    fn from(i: Intent) -> CallIntent {
        match i {
            Intent::Prompt => CallIntent::Prompt,
            Intent::Ring => CallIntent::Ring,
            Intent::Room => CallIntent::Room,
        }
    }
}

/// Arguments of `groupcall focus`.
#[derive(Args)]
pub struct FocusArgs {
    /// The configuration file (focus.toml).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Arguments of `groupcall synapse`.
#[derive(Args)]
pub struct SynapseArgs {
    /// A user to register, as NAME:PASSWORD; repeatable. The first one creates
    /// the room and invites the others.
    #[arg(long = "user", value_name = "NAME:PASSWORD", required = true, value_parser = parse_user_spec)]
    pub users: Vec<UserSpec>,

    /// Port on 127.0.0.1 (default: a free one).
    #[arg(long)]
    pub port: Option<u16>,

    /// Keep Synapse's config, database and log in this directory (default: a
    /// temporary directory, removed on exit).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Name of the call room.
    #[arg(long, default_value = "groupcall")]
    pub room_name: String,
}

/// A user of `groupcall synapse --user`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserSpec {
    /// Localpart.
    pub name: String,
    /// Password.
    pub password: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if secs <= 0.0 {
        return Err("the duration must be positive".to_owned());
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

fn parse_user_spec(s: &str) -> Result<UserSpec, String> {
    match s.split_once(':') {
        Some((name, password)) if !name.is_empty() && !password.is_empty() => Ok(UserSpec {
            name: name.to_owned(),
            password: password.to_owned(),
        }),
        _ => Err("expected NAME:PASSWORD".to_owned()),
    }
}

impl JoinArgs {
    /// The password from --password, --password-file or GROUPCALL_PASSWORD.
    pub fn password(&self) -> anyhow::Result<String> {
        if let Some(p) = &self.password {
            return Ok(p.clone());
        }
        if let Some(f) = &self.password_file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read the password file {}", f.display()))?;
            let line = text.lines().next().unwrap_or_default();
            if line.is_empty() {
                bail!("the password file {} is empty", f.display());
            }
            return Ok(line.to_owned());
        }
        match std::env::var("GROUPCALL_PASSWORD") {
            Ok(p) if !p.is_empty() => Ok(p),
            _ => bail!("no password: give --password, --password-file or set GROUPCALL_PASSWORD"),
        }
    }

    /// Our audio source; a file must be readable Ogg/Opus.
    pub fn audio_source(&self) -> anyhow::Result<AudioSource> {
        Ok(match self.audio.as_str() {
            "tone" => AudioSource::Tone,
            "none" => AudioSource::None,
            file => {
                groupcall::media::OggOpusSource::open(file)
                    .with_context(|| format!("cannot use audio file {file}"))?;
                AudioSource::File(PathBuf::from(file))
            }
        })
    }

    /// Our video source; a file must be readable IVF/VP8.
    pub fn video_source(&self) -> anyhow::Result<VideoSource> {
        if self.voice {
            return Ok(VideoSource::None);
        }
        Ok(match self.video.as_deref().unwrap_or("pattern") {
            "pattern" => VideoSource::Pattern,
            "none" => VideoSource::None,
            file => {
                groupcall::media::IvfSource::open(file)
                    .with_context(|| format!("cannot use video file {file}"))?;
                VideoSource::File(PathBuf::from(file))
            }
        })
    }

    /// Type of a call we create.
    pub fn call_type(&self) -> CallType {
        if self.voice {
            CallType::Voice
        } else {
            CallType::Video
        }
    }

    /// The data directory: given, or derived from user and homeserver.
    pub fn data_dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(d) = &self.data_dir {
            return Ok(d.clone());
        }
        let base = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            Some(d) => PathBuf::from(d),
            None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
                Some(h) => Path::new(&h).join(".local").join("share"),
                None => bail!("no data directory: give --data-dir, or set XDG_DATA_HOME or HOME"),
            },
        };
        Ok(base
            .join("groupcall")
            .join(account_dir_name(&self.user, &self.homeserver)))
    }
}

/// `<localpart>@<host[:port]>`, safe as one path component.
pub fn account_dir_name(user: &str, homeserver: &str) -> String {
    let localpart = user
        .strip_prefix('@')
        .map(|u| u.split_once(':').map_or(u, |(l, _)| l))
        .unwrap_or(user);
    let host = homeserver
        .split_once("://")
        .map_or(homeserver, |(_, rest)| rest)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.:=".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}@{}", clean(localpart), clean(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(extra: &[&str]) -> Result<JoinArgs, clap::Error> {
        let mut argv = vec![
            "groupcall",
            "join",
            "--homeserver",
            "http://127.0.0.1:8008",
            "--user",
            "alice",
            "--room",
            "!r:localhost",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| match c.command {
            Cmd::Join(a) => a,
            _ => unreachable!(),
        })
    }

    #[test]
    fn data_dir_names() {
        assert_eq!(
            account_dir_name("alice", "http://127.0.0.1:8008/"),
            "alice@127.0.0.1:8008"
        );
        assert_eq!(
            account_dir_name("@alice:example.org", "https://matrix.example.org"),
            "alice@matrix.example.org"
        );
        assert_eq!(account_dir_name("a/b", "x"), "a_b@x");
    }

    #[test]
    fn flags() {
        let a = join(&["--voice", "--create-call", "--intent", "ring"]).unwrap();
        assert_eq!(a.video_source().unwrap(), VideoSource::None);
        assert_eq!(a.call_type(), CallType::Voice);
        assert_eq!(a.intent, Some(Intent::Ring));
        let a = join(&["--bind", "127.0.0.1", "--bind", "::1", "--audio", "none"]).unwrap();
        assert_eq!(a.bind.len(), 2);
        assert_eq!(a.audio_source().unwrap(), AudioSource::None);
        assert_eq!(a.video_source().unwrap(), VideoSource::Pattern);
        assert!(join(&["--voice", "--video", "none"]).is_err());
        assert!(join(&["--intent", "ring"]).is_err());
        assert!(join(&["--plaintext", "--require-encrypted"]).is_err());
        assert!(join(&["--password", "a", "--password-file", "f"]).is_err());
        assert!(join(&["--bind", "nope"]).is_err());
        assert!(join(&["--duration", "-1"]).is_err());
        assert!(join(&["--duration", "inf"]).is_err());
        assert_eq!(
            join(&["--duration", "1.5"]).unwrap().duration,
            Some(Duration::from_millis(1500))
        );
        assert!(
            join(&["--audio", "/nonexistent.ogg"])
                .unwrap()
                .audio_source()
                .is_err()
        );
        let a = join(&["--focus", "@sfu:localhost/SFU", "--recent-speakers", "2"]).unwrap();
        assert_eq!(a.recent_speakers, Some(2));
        assert!(join(&["--recent-speakers", "2"]).is_err(), "needs --focus");
        assert!(join(&["--focus", "@sfu:localhost/SFU", "--recent-speakers", "-1"]).is_err());
    }

    #[test]
    fn password_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let a = join(&["--password-file", f.to_str().unwrap()]).unwrap();
        assert_eq!(a.password().unwrap(), "s3cret");
    }

    #[test]
    fn user_specs() {
        assert_eq!(
            parse_user_spec("bob:pw:x").unwrap(),
            UserSpec {
                name: "bob".into(),
                password: "pw:x".into()
            }
        );
        assert!(parse_user_spec("bob").is_err());
        assert!(parse_user_spec(":pw").is_err());
    }
}
