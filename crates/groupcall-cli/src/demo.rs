//! `groupcall demo`: a whole group call on a machine with nothing set up.
//!
//! Starts a local Synapse (or uses --homeserver, or with --homeservers a
//! local test federation of several Synapses), registers the users,
//! creates a call room, runs the groupcall participants in this process
//! (and reference peers in Node), shows every pair connecting and media
//! flowing, then leaves, prints the table and writes the report. Whatever
//! it started is stopped on every way out: the end, an error, a signal.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use groupcall::JoinOptions;
use groupcall::matrix::MatrixSession;
use groupcall_focus::engine::EngineFigures;
use groupcall_proto::{CreateOptions, FocusRef};
use groupcall_synapse::{Federation, FederationOptions, Synapse};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::args::{DemoArgs, RecordWhich};
use crate::demo_focus::{DemoFocus, Figures as FocusFigures};
use crate::join::Signals;
use crate::local::{self, Local};
use crate::peers::{self, GroupcallPeer, Obs, RefOptions, RefPeer, Reporter, What};
use crate::proxy::{Kind as ReqKind, Proxy};
use crate::report;
use crate::tracker::{Progress, Tracker};

/// Names of the groupcall participants (then `user9`, ...).
const NAMES: [&str; 8] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];

/// The focus's account on the local Synapse, or on each homeserver of the
/// federation (with --focus).
const FOCUS_USER: &str = "focus";
/// Its password (a throwaway server's).
const FOCUS_PASSWORD: &str = "focus-demo-pw";

/// How long leaving may take per participant.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the demo starts, stopped by [`Env::shutdown`] (and killed on
/// drop if it comes to that).
#[derive(Default)]
struct Env {
    local: Option<Local>,
    /// With --homeservers (dropping it kills the Synapses).
    fed: Option<Federation>,
    gc: Vec<GroupcallPeer>,
    refs: Vec<RefPeer>,
    /// The foci (with --focus): one, or one per homeserver.
    foci: Vec<DemoFocus>,
    tmp: Option<tempfile::TempDir>,
}

impl Env {
    /// Leaves the call with everyone still in it, stops the reference
    /// peers, the foci and the Synapses.
    async fn shutdown(&mut self) {
        leave_all(&mut self.gc, &mut self.refs).await;
        self.gc.clear();
        self.refs.clear();
        for f in self.foci.drain(..) {
            f.stop().await;
        }
        if let Some(mut l) = self.local.take() {
            l.stop().await;
        }
        if let Some(mut fed) = self.fed.take()
            && let Err(e) = fed.stop().await
        {
            tracing::warn!("stopping the test federation: {e}");
        }
        self.tmp = None;
    }
}

/// Every participant leaves, concurrently, bounded.
pub async fn leave_all(gc: &mut [GroupcallPeer], refs: &mut [RefPeer]) {
    for p in gc.iter_mut() {
        p.begin_leave();
    }
    for r in refs.iter_mut() {
        r.begin_stop().await;
    }
    for p in gc.iter_mut() {
        p.wait(LEAVE_TIMEOUT).await;
    }
    for r in refs.iter_mut() {
        r.stop(LEAVE_TIMEOUT).await;
    }
}

/// Progress on stderr (and JSON lines on stdout with --json).
pub struct Out {
    json: bool,
    t0: Instant,
}

impl Out {
    /// Progress starting now.
    pub fn new(json: bool) -> Out {
        Out {
            json,
            t0: Instant::now(),
        }
    }

    /// A progress line on stderr.
    pub fn say(&self, text: &str) {
        eprintln!("[{:6.2} s] {text}", self.t0.elapsed().as_secs_f64());
    }

    /// A JSON line on stdout, with --json.
    pub fn json(&self, v: &Value) {
        if self.json {
            use std::io::Write as _;
            let mut o = std::io::stdout().lock();
            let _ = writeln!(o, "{v}");
            let _ = o.flush();
        }
    }
}

/// Runs `groupcall demo`.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let mut env = Env::default();
    let out = Out::new(args.json);
    let result = tokio::select! {
        r = demo(&args, &mut env, &out) => r,
        sig = signals.recv() => Err(anyhow!("interrupted by {sig}")),
    };
    if result.is_err() {
        out.say("stopping everything");
    }
    tokio::select! {
        () = env.shutdown() => {}
        sig = signals.recv() => {
            // Dropping `env` kills Synapse and the reference peers.
            out.say(&format!("{sig} again: not waiting for a clean leave"));
        }
    }
    result
}

/// A participant of the demo.
struct Part {
    name: String,
    login: String,
    password: String,
    reference: bool,
    /// The Chromium MSC3898 focus client (`interop/focus-client.mjs`).
    focus_client: bool,
    /// Its homeserver (index into the federation; 0 otherwise).
    hs: usize,
    /// Its user id, when known from registration.
    user_id: Option<String>,
}

/// The name of participant `i`: groupcall participants first (`n_gc`),
/// then `k` reference peers, then the Chromium focus clients.
fn part_name(i: usize, n_gc: usize, k: usize) -> String {
    if i < n_gc {
        NAMES
            .get(i)
            .map_or_else(|| format!("user{}", i + 1), |s| (*s).to_owned())
    } else if i < n_gc + k {
        format!("ref{}", i - n_gc + 1)
    } else {
        format!("chrome{}", i - n_gc - k + 1)
    }
}

/// Registers the participants (`n_gc` groupcall ones, `k` reference peers,
/// `c` Chromium focus clients; see [`part_name`]) and, with `focus`, the
/// focus account on every server: groupcall participant i on server
/// i % the number of servers, the Node participants on the first.
async fn register_parts(
    servers: &[&Synapse],
    n_gc: usize,
    k: usize,
    c: usize,
    focus: bool,
) -> anyhow::Result<Vec<Part>> {
    let mut parts = Vec::with_capacity(n_gc + k + c);
    for i in 0..n_gc + k + c {
        let name = part_name(i, n_gc, k);
        let hs = if i < n_gc {
            i % servers.len().max(1)
        } else {
            0
        };
        let server = servers
            .get(hs)
            .ok_or_else(|| anyhow!("no homeserver to register {name} on"))?;
        let password = format!("{name}-demo-pw");
        let user_id = local::register_on(server, &name, &password).await?;
        parts.push(Part {
            name: name.clone(),
            login: name,
            password,
            reference: i >= n_gc && i < n_gc + k,
            focus_client: i >= n_gc + k,
            hs,
            user_id: Some(user_id),
        });
    }
    if focus {
        for server in servers {
            local::register_on(server, FOCUS_USER, FOCUS_PASSWORD).await?;
        }
    }
    Ok(parts)
}

/// The figures of every focus together, `None` without a focus.
fn foci_figures(figures: &[EngineFigures]) -> Option<FocusFigures> {
    figures
        .iter()
        .map(FocusFigures::of)
        .reduce(FocusFigures::add)
}

/// `./groupcall-report-YYYYMMDD-HHMMSS` (UTC).
fn default_report_dir() -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from(format!("groupcall-report-{}", utc_stamp(secs)))
}

/// `YYYYMMDD-HHMMSS` of a Unix time (UTC), by the civil-from-days rule.
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn localpart(user: &str) -> String {
    user.strip_prefix('@')
        .map(|u| u.split_once(':').map_or(u, |(l, _)| l))
        .unwrap_or(user)
        .to_owned()
}

async fn demo(args: &DemoArgs, env: &mut Env, out: &Out) -> anyhow::Result<()> {
    let k = usize::from(args.with_reference);
    // Homeservers: a local federation with --homeservers.
    let n_hs = args.homeservers.map_or(1, usize::from);
    let federated = n_hs > 1;
    // Chromium focus clients (with --focus, which is local only; by
    // default none with a federation).
    let c = usize::from(
        args.with_chromium_focus_client
            .unwrap_or(u16::from(args.focus && !federated)),
    );
    let remote = args.homeserver.is_some();
    let n_gc = match (remote, args.participants) {
        (_, Some(n)) => usize::from(n),
        (false, None) if args.focus => 6,
        (false, None) => 4,
        (true, None) => args.users.len().saturating_sub(k),
    };
    if n_gc == 0 {
        bail!(
            "the demo needs at least one groupcall participant (--participants, or more --user accounts)"
        );
    }
    if n_gc + k + c < 2 {
        bail!(
            "a call needs two participants at least: raise --participants or add --with-reference"
        );
    }
    if remote && args.users.len() < n_gc + k {
        bail!(
            "{n_gc} groupcall participants and {k} reference peers need {} --user accounts, got {}",
            n_gc + k,
            args.users.len()
        );
    }
    let report_dir = args.report_dir.clone().unwrap_or_else(default_report_dir);
    let interop = if k + c > 0 {
        let dir = peers::interop_dir(args.interop_dir.as_deref())?;
        peers::ensure_interop(&dir).await?;
        Some(dir)
    } else {
        None
    };
    let tmp = tempfile::Builder::new()
        .prefix("groupcall-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let data = tmp.path().to_owned();
    env.tmp = Some(tmp);

    // The homeserver and the accounts.
    let mut parts: Vec<Part> = Vec::new();
    // The URL clients of each homeserver use.
    let hs_urls: Vec<String> = match &args.homeserver {
        Some(url) => {
            for (i, u) in args.users.iter().take(n_gc + k).enumerate() {
                parts.push(Part {
                    name: localpart(&u.name),
                    login: u.name.clone(),
                    password: u.password.clone(),
                    reference: i >= n_gc,
                    focus_client: false,
                    hs: 0,
                    user_id: None,
                });
            }
            out.say(&format!("using {url}"));
            vec![url.trim_end_matches('/').to_owned()]
        }
        None if federated => {
            out.say(&format!(
                "starting a local test federation of {n_hs} Synapses (the first run installs Synapse into ~/.cache/groupcall, a minute or two)"
            ));
            let fed = Federation::start(FederationOptions {
                servers: n_hs,
                ..FederationOptions::default()
            })
            .await
            .context("cannot start the local test federation")?;
            for (s, hs) in fed.servers().iter().enumerate() {
                out.say(&format!(
                    "hs{s}: Synapse {} on {} (pid {})",
                    hs.server_name(),
                    hs.base_url(),
                    hs.pid().unwrap_or(0)
                ));
                out.json(&json!({
                    "event": "synapse",
                    "index": s,
                    "server_name": hs.server_name(),
                    "homeserver": hs.base_url(),
                    "pid": hs.pid(),
                }));
            }
            let servers: Vec<&Synapse> = fed.servers().iter().collect();
            parts = register_parts(&servers, n_gc, k, c, args.focus).await?;
            let urls = fed.servers().iter().map(|s| s.base_url()).collect();
            env.fed = Some(fed);
            urls
        }
        None => {
            out.say("starting a local Synapse (the first run installs it into ~/.cache/groupcall, a minute or two)");
            let l = Local::start(args.synapse_port).await?;
            out.say(&format!(
                "Synapse on {} (pid {}), clients go through {}",
                l.synapse.base_url(),
                l.synapse.pid().unwrap_or(0),
                l.url()
            ));
            out.json(&json!({
                "event": "synapse",
                "homeserver": l.synapse.base_url(),
                "proxy": l.url(),
                "pid": l.synapse.pid(),
            }));
            parts = register_parts(&[&l.synapse], n_gc, k, c, args.focus).await?;
            let url = l.url();
            env.local = Some(l);
            vec![url]
        }
    };
    let hs_url = hs_urls.first().cloned().unwrap_or_default();
    let names: Vec<String> = parts.iter().map(|p| p.name.clone()).collect();
    out.say(&format!(
        "participants: {} (groupcall{}){}{}",
        names[..n_gc].join(", "),
        if args.focus && federated {
            ", through their homeservers' linked foci"
        } else if args.focus {
            ", through the focus"
        } else {
            ""
        },
        if k > 0 {
            format!(
                ", {} (reference, matrix-js-sdk)",
                names[n_gc..n_gc + k].join(", ")
            )
        } else {
            String::new()
        },
        if c > 0 {
            format!(
                ", {} (Chromium, MSC3898 focus client)",
                names[n_gc + k..].join(", ")
            )
        } else {
            String::new()
        }
    ));

    // Log the groupcall participants in, concurrently.
    let mut logins = tokio::task::JoinSet::new();
    for (i, p) in parts.iter().enumerate().take(n_gc) {
        let (url, login, pw, dir) = (
            hs_urls.get(p.hs).cloned().unwrap_or_default(),
            p.login.clone(),
            p.password.clone(),
            data.join(&p.name),
        );
        let t = args.connect_timeout;
        logins.spawn(async move { (i, local::login(&url, &login, &pw, &dir, t).await) });
    }
    let mut sessions: Vec<Option<MatrixSession>> = vec![None; n_gc];
    while let Some(r) = logins.join_next().await {
        let (i, s) = r.context("a login task failed")?;
        sessions[i] = Some(s?);
    }
    let sessions: Vec<MatrixSession> = sessions.into_iter().flatten().collect();
    let first = sessions
        .first()
        .ok_or_else(|| anyhow!("no participant logged in"))?;
    let server = first
        .user_id()
        .split_once(':')
        .map(|(_, s)| s.to_owned())
        .unwrap_or_default();
    let user_id = |p: &Part| {
        if let Some(u) = &p.user_id {
            u.clone()
        } else if p.login.starts_with('@') {
            p.login.clone()
        } else {
            format!("@{}:{server}", p.login)
        }
    };

    // The foci (one per homeserver; linking with each other in a
    // federation), allowing the room's creator to invite them.
    let n_foci = if args.focus { n_hs } else { 0 };
    for (s, url) in hs_urls.iter().enumerate().take(n_foci) {
        let dir = if federated {
            data.join(format!("focus{s}"))
        } else {
            data.join("focus")
        };
        let f = DemoFocus::start(
            &dir,
            url,
            FOCUS_USER,
            FOCUS_PASSWORD,
            first.user_id(),
            args.plaintext,
            federated,
        )
        .await?;
        out.say(&format!(
            "{}focus {} (device {}) started in this process; metrics and health on http://{}",
            if federated {
                format!("hs{s}: ")
            } else {
                String::new()
            },
            f.user_id(),
            f.focus_ref().device_id,
            f.http_addr().map_or("?".to_owned(), |a| a.to_string())
        ));
        out.json(&json!({
            "event": "focus",
            "index": s,
            "user_id": f.user_id(),
            "device_id": f.focus_ref().device_id,
            "http": f.http_addr().map(|a| a.to_string()),
        }));
        env.foci.push(f);
    }
    let focus_refs: Vec<FocusRef> = env.foci.iter().map(DemoFocus::focus_ref).collect();

    let room = match &args.room {
        Some(r) => r.clone(),
        None => {
            let invite: Vec<String> = parts
                .iter()
                .skip(1)
                .map(user_id)
                .chain(focus_refs.iter().map(|f| f.user_id.clone()))
                .collect();
            // A private room across a federation (invites only).
            local::create_room(first, "groupcall demo", invite, !federated).await?
        }
    };
    out.say(&format!("call room {room}"));
    for f in &env.foci {
        f.wait_rooms(1, args.connect_timeout).await?;
    }
    match env.foci.len() {
        0 => {}
        1 => out.say("the focus joined the call room"),
        n => out.say(&format!("the {n} foci joined the call room")),
    }
    let topo = Topology {
        federated,
        homeservers: match &env.fed {
            Some(fed) => fed
                .servers()
                .iter()
                .map(|s| (s.base_url(), s.server_name().to_owned()))
                .collect(),
            None => hs_urls.iter().map(|u| (u.clone(), String::new())).collect(),
        },
        foci: env.foci.iter().map(DemoFocus::device_key).collect(),
        members: parts
            .iter()
            .map(|p| (p.hs, p.name.clone(), kind_of(p)))
            .collect(),
    };
    if federated {
        for line in topo.lines(None) {
            out.say(&line);
        }
    }

    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("creating the report directory {}", report_dir.display()))?;

    // Start: the reference peers (slow to start, they wait for the call),
    // the first groupcall participant creating the call, then the others.
    let (tx, mut rx) = mpsc::unbounded_channel::<Obs>();
    let origin = Instant::now();
    let mut tracker = Tracker::new(names.clone(), origin);
    for (i, p) in parts.iter().enumerate() {
        tracker.set_identity(i, &user_id(p));
    }
    for (s, f) in focus_refs.iter().enumerate() {
        // The groupcall participants of its homeserver and the Chromium
        // focus clients (on hs0).
        let members = (0..n_gc)
            .filter(|i| parts.get(*i).is_some_and(|p| p.hs == s))
            .chain((n_gc + k..n_gc + k + c).filter(|_| s == 0));
        tracker.set_focus(&f.user_id, members);
    }
    if !focus_refs.is_empty() {
        for r in n_gc..n_gc + k {
            for b in n_gc + k..n_gc + k + c {
                tracker.set_unreachable(r, b);
            }
        }
    }
    let stats_interval = Duration::from_millis(200);
    for (i, p) in parts.iter().enumerate().skip(n_gc) {
        let dir = interop.as_deref().unwrap_or(Path::new("interop"));
        let log = report_dir.join(format!("{}.stderr.log", p.name));
        let mut o = RefOptions {
            dir,
            homeserver: hs_urls.get(p.hs).map_or(&hs_url, |u| u),
            user: &p.login,
            password: &p.password,
            room: &room,
            create_call: false,
            encrypted: false,
            media_interval: stats_interval,
            log: &log,
        };
        let report = Reporter::new(i, tx.clone());
        let (r, what) = match (focus_refs.first(), p.focus_client) {
            (Some(f), true) => {
                // Olm unless --plaintext (the focus refuses plaintext then).
                o.encrypted = !args.plaintext;
                let r = RefPeer::spawn_focus_client(&o, &f.user_id, &f.device_id, report)?;
                (r, "Chromium focus client")
            }
            _ => (RefPeer::spawn(&o, report)?, "reference peer"),
        };
        out.say(&format!(
            "{}: {what} started (node, pid {})",
            p.name,
            r.pid()
        ));
        out.json(&json!({
            "event": if p.focus_client { "chromium_focus_client" } else { "reference" },
            "name": p.name,
            "pid": r.pid(),
        }));
        env.refs.push(r);
    }
    let opts_for = |i: usize| {
        let mut o = JoinOptions::new(room.clone());
        o.stats_interval = stats_interval;
        o.encrypt = !args.plaintext;
        o.create = (i == 0).then(CreateOptions::default);
        o.focus = parts.get(i).and_then(|p| focus_refs.get(p.hs)).cloned();
        let record = match args.record {
            RecordWhich::All => true,
            RecordWhich::First => i == 0,
            RecordWhich::None => false,
        };
        if record {
            o.record_dir = Some(report_dir.join("recordings").join(&names[i]));
        }
        if args.break_media && i + 1 == n_gc && i > 0 {
            // Test only: host candidates on ::1, which nobody on 127.0.0.1
            // can pair with.
            o.bind_addrs = vec![IpAddr::V6(Ipv6Addr::LOCALHOST)];
        }
        o
    };
    // Reference peers take seconds of CPU to start (SDK, crypto WebAssembly):
    // let them get ready first, so that their start-up does not slow down
    // the groupcall joins on a small machine.
    if k + c > 0 {
        out.say("waiting for the Node participants (reference peers, Chromium focus clients) to be logged in and synced");
        let mut ready = vec![false; k + c];
        while ready.iter().any(|r| !r) {
            let o = tokio::select! {
                o = rx.recv() => o.ok_or_else(|| anyhow!("every participant stopped"))?,
                () = tokio::time::sleep_until((origin + args.connect_timeout).into()) => {
                    bail!("the Node participants were not ready within {} s (--connect-timeout); see {}/*.stderr.log", args.connect_timeout.as_secs_f64(), report_dir.display());
                }
            };
            if let What::Identity(_) = &o.what
                && let Some(slot) = o.idx.checked_sub(n_gc).and_then(|r| ready.get_mut(r))
            {
                *slot = true;
            }
            observe(&mut tracker, &o, out)?;
        }
    }
    let origin = Instant::now();
    tracker.origin = origin;
    let mut pending: Vec<(usize, MatrixSession)> = sessions.into_iter().enumerate().collect();
    let (i0, s0) = pending.remove(0);
    env.gc.push(GroupcallPeer::spawn(
        s0,
        opts_for(i0),
        args.connect_timeout,
        Reporter::new(i0, tx.clone()),
    ));

    // Until every pair has audio and video both ways.
    let timeout = args.connect_timeout;
    let join_deadline = origin + timeout;
    loop {
        let deadline = tracker.all_joined().map_or(join_deadline, |t| t + timeout);
        let o = tokio::select! {
            o = rx.recv() => o.ok_or_else(|| anyhow!("every participant stopped"))?,
            () = tokio::time::sleep_until(deadline.into()) => {
                return Err(timeout_error(&tracker, timeout));
            }
        };
        let progress = observe(&mut tracker, &o, out)?;
        if progress.contains(&Progress::Joined(0)) {
            for (i, s) in pending.drain(..) {
                env.gc.push(GroupcallPeer::spawn(
                    s,
                    opts_for(i),
                    timeout,
                    Reporter::new(i, tx.clone()),
                ));
            }
        }
        if progress.contains(&Progress::MeshUp) {
            break;
        }
    }
    let last_join = tracker.all_joined().unwrap_or(origin);
    let mesh_up = tracker.mesh_up().unwrap_or(last_join);
    let setup_ms = mesh_up.saturating_duration_since(last_join).as_secs_f64() * 1000.0;
    out.say(&format!(
        "mesh up: {n}/{n} pairs with audio and video both ways, {setup_ms:.0} ms after the last join; media for {secs} s",
        n = tracker.pairs().len(),
        secs = args.duration.as_secs_f64()
    ));
    out.json(&json!({"event": "mesh_up", "pairs": tracker.pairs().len(), "after_last_join_ms": setup_ms}));
    // The media sockets of the groupcall participants (the only UDP
    // sockets of this process): one per participant and local address is
    // the design (issue 10); shown, not enforced.
    let sockets = udp_sockets();
    if let Some(s) = &sockets {
        let focus_sockets = env.foci.len();
        let expected = n_gc * s.addresses.len().max(1) + focus_sockets;
        out.say(&format!(
            "sockets: {} UDP sockets in this process for {n_gc} groupcall participants on {} local address(es) ({}){}; one per participant and address would be {expected}",
            s.count,
            s.addresses.len(),
            s.addresses.join(", "),
            match focus_sockets {
                0 => "",
                1 => " and the focus",
                _ => " and the foci",
            }
        ));
        out.json(&json!({"event": "sockets", "udp": s.count, "addresses": s.addresses, "participants": n_gc, "one_per_participant_and_address": s.count == expected}));
    }

    // Media for --duration, with a line every 2 s.
    let end = Instant::now() + args.duration;
    // Test only (--stop-media-after): the last groupcall participant's
    // media stops mid-call.
    let mut stop_media = args.stop_media_after.map(|d| Instant::now() + d);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.tick().await;
    let mut last = (
        Instant::now(),
        tracker.totals(),
        tracker.frames_by_direction(),
        foci_figures(&env.foci.iter().map(DemoFocus::figures).collect::<Vec<_>>()),
    );
    loop {
        tokio::select! {
            o = rx.recv() => {
                let o = o.ok_or_else(|| anyhow!("every participant stopped"))?;
                observe(&mut tracker, &o, out)?;
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let totals = tracker.totals();
                let by_dir = tracker.frames_by_direction();
                let dt = now.saturating_duration_since(last.0).as_secs_f64().max(0.001);
                let flowing = tracker
                    .pairs()
                    .iter()
                    .filter(|(a, b)| {
                        let grew = |k: (usize, usize)| by_dir.get(&k).copied().unwrap_or(0) > last.2.get(&k).copied().unwrap_or(0);
                        grew((*a, *b)) && grew((*b, *a))
                    })
                    .count();
                let focus_now = foci_figures(&env.foci.iter().map(DemoFocus::figures).collect::<Vec<_>>());
                let focus_text = match (focus_now, last.3) {
                    (Some(f), before) => format!(
                        "; focus: {} forwarded streams, {:.0} packets/s forwarded",
                        f.forwarded_streams,
                        f.packets_forwarded.saturating_sub(before.map_or(0, |b| b.packets_forwarded)) as f64 / dt
                    ),
                    (None, _) => String::new(),
                };
                out.say(&format!(
                    "media: {flowing}/{} pairs flowing both ways, {:.0} frames/s, {:.2} Mbit/s received by groupcall{focus_text}",
                    tracker.pairs().len(),
                    (totals.0.saturating_sub(last.1.0)) as f64 / dt,
                    (totals.1.saturating_sub(last.1.1)) as f64 * 8.0 / dt / 1e6,
                ));
                last = (now, totals, by_dir, focus_now);
            }
            () = async {
                match stop_media {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            } => {
                stop_media = None;
                if let Some(p) = env.gc.last() {
                    p.command(groupcall_proto::Command::SetAudioMuted(true));
                    p.command(groupcall_proto::Command::SetVideoMuted(true));
                    out.say(&format!(
                        "{}: stops its media (--stop-media-after, a test option)",
                        names[env.gc.len() - 1]
                    ));
                }
            }
            () = tokio::time::sleep_until(end.into()) => break,
        }
    }
    // Whether media still flowed is judged now, before anyone leaves.
    tracker.judge_recent_at(Instant::now());
    // The foci's figures too, while everyone is still in the call.
    let engine_figures: Vec<EngineFigures> = env.foci.iter().map(DemoFocus::figures).collect();
    let focus_figures = foci_figures(&engine_figures);
    let links: Vec<Value> = env
        .foci
        .iter()
        .zip(&engine_figures)
        .flat_map(|(f, e)| crate::demo_focus::links_json(&f.device_key(), e))
        .collect();
    let topology = topo.lines(Some(&engine_figures));
    if let Some(f) = &focus_figures {
        out.say(&f.line());
    }

    // Signalling of the whole call so far (setup; nothing more is sent
    // while media flows), before the hangups of leaving.
    let signalling = env
        .local
        .as_ref()
        .map(|l| signalling_json(&l.proxy, origin, Instant::now(), tracker.pairs().len()));
    out.say("leaving");
    leave_all(&mut env.gc, &mut env.refs).await;
    while let Ok(o) = rx.try_recv() {
        tracker.apply(&o);
    }

    // The report.
    let pairs = tracker.summaries();
    let joins_ms: Vec<Option<f64>> = tracker
        .joined
        .iter()
        .map(|j| j.map(|t| t.saturating_duration_since(origin).as_secs_f64() * 1000.0))
        .collect();
    let svg = report::timeline_svg(
        &names,
        &pairs,
        &joins_ms,
        &format!(
            "groupcall demo: setup of {} pairs ({} participants)",
            pairs.len(),
            names.len()
        ),
    );
    report::write(&report_dir.join("timeline.svg"), &svg)?;
    let report_abs = report_dir
        .canonicalize()
        .unwrap_or_else(|_| report_dir.clone());
    let recordings: Vec<String> = tracker
        .recordings
        .iter()
        .map(|p| {
            p.strip_prefix(&report_dir)
                .unwrap_or(p)
                .display()
                .to_string()
        })
        .collect();
    let up = pairs.iter().filter(|p| p.up()).count();
    let recent = pairs.iter().filter(|p| p.media_recent).count();
    let summary = json!({
        "event": "summary",
        "ok": up == pairs.len() && recent == pairs.len(),
        "pairs_total": pairs.len(),
        // Reference peer ↔ Chromium focus client: not expected to meet.
        "pairs_left_out": k * c,
        "pairs_connected": pairs.iter().filter(|p| p.connected_ms.is_some()).count(),
        "pairs_media_both_ways": up,
        "pairs_media_recent": recent,
        "media_recent_window_ms": crate::tracker::RECENT.as_secs_f64() * 1000.0,
        "mesh_up_after_last_join_ms": setup_ms,
        "participants": parts.iter().enumerate().map(|(i, p)| json!({
            "name": p.name,
            "user_id": user_id(p),
            "implementation": if p.reference {
                "matrix-js-sdk"
            } else if p.focus_client {
                "chromium-msc3898"
            } else {
                "groupcall"
            },
            "joined_ms": joins_ms[i],
        })).collect::<Vec<_>>(),
        "homeserver": if remote {
            hs_url.clone()
        } else if federated {
            format!("local test federation of {n_hs} Synapses")
        } else {
            "local Synapse".to_owned()
        },
        "homeservers": n_hs,
        "topology": topology,
        "room": room,
        "media_seconds": args.duration.as_secs_f64(),
        "signalling": signalling,
        "udp_sockets": sockets.as_ref().map(|s| json!({"count": s.count, "addresses": s.addresses})),
        "pairs": pairs.iter().map(|p| report::pair_json(&names, p)).collect::<Vec<_>>(),
        // The foci's figures summed up; `user_id` lists them all.
        "focus": match &focus_figures {
            Some(f) => f.json(&focus_refs.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>().join(", ")),
            None => Value::Null,
        },
        "foci": if args.focus {
            Value::Array(focus_refs.iter().zip(&engine_figures).map(|(r, e)| FocusFigures::of(e).json(&r.user_id)).collect())
        } else {
            Value::Null
        },
        // One entry per focus and link: per direction.
        "links": if args.focus { Value::Array(links) } else { Value::Null },
        "recordings": recordings,
        "report_dir": report_abs.display().to_string(),
    });
    let pretty = serde_json::to_string_pretty(&summary).context("serializing the summary")?;
    report::write(&report_dir.join("summary.json"), &format!("{pretty}\n"))?;
    let mut intro = vec![format!(
        "{} participants ({}), {}; every pair connected with audio and video both ways {setup_ms:.0} ms after the last join; then {} s of media.",
        names.len(),
        names.join(", "),
        if remote {
            hs_url.clone()
        } else if federated {
            format!("on a throwaway local federation of {n_hs} Synapses")
        } else {
            "on a throwaway local Synapse".to_owned()
        },
        args.duration.as_secs_f64()
    )];
    if let Some(f) = &focus_figures {
        if federated {
            intro.push(format!(
                "The groupcall participants met through {n_hs} linked foci (MSC3898 SFUs with cascade = true, one per homeserver) running in the demo; at the end of the media time, all foci together: {}.",
                f.line()
            ));
        } else {
            intro.push(format!(
                "The groupcall participants met through a focus (an MSC3898 SFU) running in the demo; at the end of the media time its {}.",
                f.line()
            ));
        }
    }
    if federated {
        intro.push("Topology:".to_owned());
        intro.extend(topology.iter().cloned());
    }
    if let Some(s) = &summary["signalling"].as_object() {
        intro.push(format!(
            "Setup signalling: {} to-device messages in {} requests ({} bytes), {} member state events.",
            s.get("to_device_messages").cloned().unwrap_or(Value::Null),
            s.get("to_device_requests").cloned().unwrap_or(Value::Null),
            s.get("to_device_bytes").cloned().unwrap_or(Value::Null),
            s.get("member_state_events").cloned().unwrap_or(Value::Null),
        ));
    }
    let mut links = vec![
        ("summary.json".to_owned(), "summary.json".to_owned()),
        ("timeline.svg".to_owned(), "timeline.svg".to_owned()),
    ];
    links.extend(recordings.iter().map(|r| (r.clone(), r.clone())));
    let html = report::index_html("groupcall demo", &intro, &svg, &names, &pairs, &links);
    report::write(&report_dir.join("index.html"), &html)?;

    let table = report::table(&names, &pairs);
    let mut focus_tail = focus_figures
        .as_ref()
        .map_or(String::new(), |f| format!("{}\n", f.line()));
    if federated {
        focus_tail.push_str(&format!("topology:\n  {}\n", topology.join("\n  ")));
    }
    let tail = format!(
        "\n{table}\n{focus_tail}{up}/{} pairs with audio and video both ways, {recent}/{} with media both ways in the last {} s; report: {}\n",
        pairs.len(),
        pairs.len(),
        crate::tracker::RECENT.as_secs(),
        report_abs.join("index.html").display()
    );
    if args.json {
        eprint!("{tail}");
    } else {
        print!("{tail}");
    }
    out.json(&summary);
    if up < pairs.len() {
        bail!(
            "{} of {} pairs lost media during the call (report: {})",
            pairs.len() - up,
            pairs.len(),
            report_abs.display()
        );
    }
    let stopped = tracker.pairs_media_stopped();
    if !stopped.is_empty() {
        bail!(
            "media stopped during the call: {} of {} pairs had no media both ways in the last {} s: {} (report: {})",
            stopped.len(),
            pairs.len(),
            crate::tracker::RECENT.as_secs(),
            stopped.join("; "),
            report_abs.display()
        );
    }
    Ok(())
}

/// What a participant is, for the topology (empty for groupcall).
fn kind_of(p: &Part) -> &'static str {
    if p.reference {
        "reference"
    } else if p.focus_client {
        "Chromium"
    } else {
        ""
    }
}

/// What runs where: the homeservers, their foci and participants, the
/// links between the foci; a few lines for the terminal and the report.
struct Topology {
    federated: bool,
    /// Per homeserver: the URL its clients use and its server name (empty
    /// when not started by the demo).
    homeservers: Vec<(String, String)>,
    /// Per focus (focus i on homeserver i): its device, `@user:server/DEVICE`.
    foci: Vec<String>,
    /// Per participant: its homeserver, name and kind ([`kind_of`]).
    members: Vec<(usize, String, &'static str)>,
}

impl Topology {
    /// `hs0 (server name, URL): focus0 @focus:.../DEVICE; alice carol`, one
    /// line per homeserver, then the links between the foci: the expected
    /// ones without figures, each focus's view of each of its links with
    /// them.
    fn lines(&self, figures: Option<&[EngineFigures]>) -> Vec<String> {
        let mut out = Vec::new();
        for (s, (url, name)) in self.homeservers.iter().enumerate() {
            let label = if name.is_empty() {
                url.clone()
            } else {
                format!("{name}, {url}")
            };
            let focus = self
                .foci
                .get(s)
                .map_or(String::new(), |f| format!(" focus{s} {f};"));
            let members: Vec<String> = self
                .members
                .iter()
                .filter(|(h, _, _)| *h == s)
                .map(|(_, n, kind)| {
                    if kind.is_empty() {
                        n.clone()
                    } else {
                        format!("{n} ({kind})")
                    }
                })
                .collect();
            let prefix = if self.federated {
                format!("hs{s} ")
            } else {
                String::new()
            };
            out.push(format!("{prefix}({label}):{focus} {}", members.join(" ")));
        }
        if self.foci.len() < 2 {
            return out;
        }
        let label = |device: &str| {
            self.foci
                .iter()
                .position(|f| f == device)
                .map_or_else(|| device.to_owned(), |i| format!("focus{i}"))
        };
        match figures {
            None => {
                for i in 0..self.foci.len() {
                    for j in i + 1..self.foci.len() {
                        out.push(format!("focus{i} <-link-> focus{j} (once the call starts)"));
                    }
                }
            }
            Some(figures) => {
                for (i, f) in figures.iter().enumerate() {
                    if f.links.is_empty() {
                        out.push(format!("focus{i}: no link"));
                    }
                    for l in &f.links {
                        out.push(format!(
                            "focus{i} -> {} ({}): {} streams carried, {} packets; {} streams asked of it, {} packets back",
                            label(&l.device),
                            if l.outgoing {
                                format!("placed by focus{i}")
                            } else {
                                "placed by the other".to_owned()
                            },
                            l.streams_out,
                            l.packets_out,
                            l.streams_in,
                            l.packets_in
                        ));
                    }
                }
            }
        }
        out
    }
}

/// The UDP sockets of this process.
struct UdpSockets {
    /// How many.
    count: usize,
    /// Their distinct local IP addresses.
    addresses: Vec<String>,
}

/// The UDP sockets this process holds: the entries of `/proc/self/fd` that
/// are sockets whose inode `/proc/net/udp` or `/proc/net/udp6` lists. `None`
/// without `/proc`.
fn udp_sockets() -> Option<UdpSockets> {
    let mut by_inode: HashMap<u64, String> = HashMap::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if let (Some(local), Some(Ok(inode))) =
                (cols.get(1), cols.get(9).map(|i| i.parse::<u64>()))
                && let Some(ip) = proc_net_ip(local)
            {
                by_inode.insert(inode, ip);
            }
        }
    }
    let fds = std::fs::read_dir("/proc/self/fd").ok()?;
    let mut addresses: Vec<String> = Vec::new();
    let mut count = 0;
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let inode = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']'))
            .and_then(|i| i.parse::<u64>().ok());
        if let Some(ip) = inode.and_then(|i| by_inode.get(&i)) {
            count += 1;
            if !addresses.contains(ip) {
                addresses.push(ip.clone());
            }
        }
    }
    addresses.sort();
    Some(UdpSockets { count, addresses })
}

/// The IP of a `/proc/net/udp{,6}` local address (`0100007F:1F90`: 32-bit
/// words in host byte order).
fn proc_net_ip(s: &str) -> Option<String> {
    let hex = s.split_once(':')?.0;
    let mut bytes = Vec::with_capacity(16);
    for i in (0..hex.len()).step_by(8) {
        let w = u32::from_str_radix(hex.get(i..i + 8)?, 16).ok()?;
        bytes.extend_from_slice(&w.to_ne_bytes());
    }
    match bytes.len() {
        4 => Some(std::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()),
        16 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            Some(std::net::Ipv6Addr::from(b).to_string())
        }
        _ => None,
    }
}

/// Folds one observation in, printing progress; a fatal one is the error.
fn observe(tracker: &mut Tracker, o: &Obs, out: &Out) -> anyhow::Result<Vec<Progress>> {
    let names = tracker.names.clone();
    let name = |i: usize| names.get(i).cloned().unwrap_or_default();
    match &o.what {
        What::Fatal(msg) => bail!("{}: {msg}", name(o.idx)),
        What::Warning(w) => out.say(&format!("warning: {}: {w}", name(o.idx))),
        _ => {}
    }
    let progress = tracker.apply(o);
    let summaries: HashMap<(usize, usize), _> = if progress.is_empty() {
        HashMap::new()
    } else {
        tracker
            .summaries()
            .into_iter()
            .map(|p| ((p.a, p.b), p))
            .collect()
    };
    for p in &progress {
        match p {
            Progress::Joined(i) => {
                out.say(&format!("{} joined the call", name(*i)));
                out.json(&json!({"event": "joined", "name": name(*i)}));
            }
            Progress::Connected(a, b) => {
                let ms = summaries.get(&(*a, *b)).and_then(|s| s.connected_ms);
                out.say(&format!(
                    "{} ↔ {} connected{} ({} ms after both joined)",
                    name(*a),
                    name(*b),
                    if tracker.through_focus(*a, *b) {
                        " through the focus"
                    } else {
                        ""
                    },
                    ms.map_or("?".to_owned(), |m| format!("{m:.0}"))
                ));
                out.json(
                    &json!({"event": "pair_connected", "a": name(*a), "b": name(*b), "ms": ms}),
                );
            }
            Progress::FirstFrame { from, to } => {
                out.say(&format!("{} → {}: first frame", name(*from), name(*to)));
            }
            Progress::PairUp(a, b) => {
                let s = summaries.get(&(*a, *b));
                let ms = s.and_then(|s| Some(s.media_ab_ms?.max(s.media_ba_ms?)));
                out.say(&format!(
                    "{} ↔ {}: audio and video both ways ({} ms after both joined)",
                    name(*a),
                    name(*b),
                    ms.map_or("?".to_owned(), |m| format!("{m:.0}"))
                ));
                out.json(&json!({"event": "pair_media", "a": name(*a), "b": name(*b), "ms": ms}));
            }
            Progress::PeerDown { at, remote, why } if why.contains("focus_back") => {
                // Linked foci: the mesh call of two members of different
                // foci ends once the foci forward their streams.
                out.say(&format!(
                    "{} ↔ {}: mesh call ended at {}, they meet through the foci now ({why})",
                    name(*at),
                    name(*remote),
                    name(*at)
                ));
            }
            Progress::PeerDown { at, remote, why } => {
                out.say(&format!(
                    "{} ↔ {}: {why} at {}",
                    name(*at),
                    name(*remote),
                    name(*at)
                ));
            }
            Progress::MeshUp => {}
        }
    }
    Ok(progress)
}

/// The error when the deadline passed: who did not join, or which pairs
/// are not up and why.
fn timeout_error(tracker: &Tracker, timeout: Duration) -> anyhow::Error {
    let secs = timeout.as_secs_f64();
    let missing: Vec<String> = tracker
        .joined
        .iter()
        .enumerate()
        .filter(|(_, j)| j.is_none())
        .map(|(i, _)| tracker.names[i].clone())
        .collect();
    if !missing.is_empty() {
        return anyhow!(
            "{} did not join the call within {secs} s (--connect-timeout)",
            missing.join(", ")
        );
    }
    let down = tracker.pairs_not_up();
    let shown: Vec<&str> = down.iter().take(3).map(String::as_str).collect();
    anyhow!(
        "{} of {} pairs did not connect with media both ways within {secs} s of the last join (--connect-timeout): {}{}",
        down.len(),
        tracker.pairs().len(),
        shown.join("; "),
        if down.len() > 3 { "; ..." } else { "" }
    )
}

/// To-device and member state requests through the proxy from `from` to
/// `until`, in total and per pair.
pub fn signalling_json(proxy: &Proxy, from: Instant, until: Instant, pairs: usize) -> Value {
    let c = count_signalling(proxy, from, until);
    let per = |x: usize| x as f64 / pairs.max(1) as f64;
    json!({
        "window_ms": until.saturating_duration_since(from).as_secs_f64() * 1000.0,
        "to_device_requests": c.requests,
        "to_device_messages": c.messages,
        "to_device_bytes": c.bytes,
        "to_device_messages_by_type": c.by_type,
        "to_device_requests_per_pair": per(c.requests),
        "to_device_messages_per_pair": per(c.messages),
        "to_device_bytes_per_pair": per(c.bytes),
        "member_state_events": c.member_events,
        "delayed_event_requests": c.delayed,
    })
}

/// Counted signalling.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    /// sendToDevice requests of call signalling.
    pub requests: usize,
    /// Messages (recipient devices) in them.
    pub messages: usize,
    /// Their body bytes.
    pub bytes: usize,
    /// Messages per event type.
    pub by_type: std::collections::BTreeMap<String, usize>,
    /// Member state events sent now (not delayed).
    pub member_events: usize,
    /// MSC4140 requests: delayed member events scheduled, restarted, sent.
    pub delayed: usize,
    /// Per user id: when its first member state event went through.
    pub first_member: HashMap<String, Instant>,
    /// Per to-device event type: when the first and the last request went
    /// through.
    pub span_by_type: std::collections::BTreeMap<String, (Instant, Instant)>,
}

/// Counts the call signalling that went through the proxy in a window.
/// To-device requests count when their type is `m.call.*` (or
/// `m.room.encrypted`: Olm-encrypted call signalling; the call rooms are
/// unencrypted, so no room keys travel).
pub fn count_signalling(proxy: &Proxy, from: Instant, until: Instant) -> Counts {
    let mut c = Counts::default();
    for r in proxy.since(from) {
        if r.at > until {
            continue;
        }
        match r.kind {
            ReqKind::ToDevice {
                event_type,
                messages,
            } if event_type.starts_with("m.call.")
                || event_type.starts_with("org.matrix.call.")
                || event_type == "m.room.encrypted" =>
            {
                c.requests += 1;
                c.messages += messages;
                c.bytes += r.body_bytes;
                *c.by_type.entry(event_type.clone()).or_default() += messages;
                let span = c.span_by_type.entry(event_type).or_insert((r.at, r.at));
                span.0 = span.0.min(r.at);
                span.1 = span.1.max(r.at);
            }
            ReqKind::MemberState { state_key, delayed } => {
                if delayed {
                    c.delayed += 1;
                } else {
                    c.member_events += 1;
                    c.first_member.entry(state_key).or_insert(r.at);
                }
            }
            ReqKind::DelayedEvents => c.delayed += 1,
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(1_700_000_000), "20231114-221320");
        assert_eq!(utc_stamp(951_782_400), "20000229-000000");
    }

    #[test]
    fn proc_net_addresses() {
        if cfg!(target_endian = "little") {
            assert_eq!(proc_net_ip("0100007F:1F90").as_deref(), Some("127.0.0.1"));
            assert_eq!(
                proc_net_ip("00000000000000000000000001000000:0035").as_deref(),
                Some("::1")
            );
        }
        assert_eq!(proc_net_ip("zz:1"), None);
        assert_eq!(proc_net_ip("nocolon"), None);
    }

    #[test]
    fn counts_own_udp_sockets() {
        let before = udp_sockets().map_or(0, |s| s.count);
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let after = udp_sockets().unwrap();
        assert_eq!(after.count, before + 1);
        assert!(after.addresses.contains(&"127.0.0.1".to_owned()));
        drop(sock);
    }

    #[test]
    fn localparts() {
        assert_eq!(localpart("@bob:example.org"), "bob");
        assert_eq!(localpart("bob"), "bob");
    }
}
