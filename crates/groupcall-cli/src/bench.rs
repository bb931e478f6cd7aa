//! `groupcall bench setup`: call setup of groupcall against the reference
//! (matrix-js-sdk's GroupCall in Node), on one local Synapse in one run.
//!
//! Every run registers fresh users, creates a fresh room, starts N
//! participants of one system and waits until every pair receives audio and
//! video frames both ways. Measured:
//!
//! - P1: from the last participant's join (its first member state event
//!   reaching the homeserver, seen by the counting proxy) to the moment the
//!   last pair has audio and video both ways (groupcall: a track's first
//!   depacketized RTP frame, reported at once as a `Media` event; the
//!   reference: its `first_frame` line, the first decoded video frame /
//!   audible audio frame). Both keep their usual 1 s statistics and offer
//!   one ICE candidate, UDP on 127.0.0.1;
//! - P2: call signalling through the proxy from the run's start until one
//!   second after P1's end: to-device requests, messages (recipient
//!   devices) and body bytes, per pair; member state events;
//! - P4: one extra run per N with the usual 1 s statistics: CPU time over a
//!   window once the mesh is up, per participant and connected peer
//!   (groupcall: this process, all N participants; reference: the N Node
//!   processes);
//! - the floor ([`floor`]): one member-state hop and one to-device hop
//!   through the same proxy and Synapse, and an ICE + DTLS handshake on
//!   loopback, measured once at the start of the run; P1 is printed
//!   against it.
//!
//! A run that fails (e.g. the reference at N=12 on 2 cores, not up within
//! the timeout) is reported with its outcome and the remaining runs of that
//! system at that size are skipped; the other sizes and systems go on.
//! Failed groupcall runs (or floor measurement) make the command fail at
//! the end; failed reference runs are an outcome to report, not an error.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use groupcall::JoinOptions;
use groupcall_proto::CreateOptions;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::args::{BenchSetupArgs, System};
use crate::demo::{Counts, count_signalling, leave_all};
use crate::join::Signals;
use crate::local::{self, Local};
use crate::peers::{self, GroupcallPeer, Obs, RefOptions, RefPeer, Reporter, What};
use crate::tracker::{Progress, Tracker};

mod floor;
pub mod focus_bench;
pub mod janus;
pub mod loadgen;

/// How often a run in progress says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The one address both systems offer candidates on.
const LOOPBACK: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Everything a benchmark starts.
#[derive(Default)]
struct Env {
    local: Option<Local>,
    gc: Vec<GroupcallPeer>,
    refs: Vec<RefPeer>,
}

impl Env {
    async fn end_run(&mut self) {
        leave_all(&mut self.gc, &mut self.refs).await;
        self.gc.clear();
        self.refs.clear();
    }

    async fn shutdown(&mut self) {
        self.end_run().await;
        if let Some(mut l) = self.local.take() {
            l.stop().await;
        }
    }
}

/// Runs `groupcall bench setup`.
pub async fn run_setup(args: BenchSetupArgs) -> anyhow::Result<()> {
    let mut signals = Signals::new()?;
    let mut env = Env::default();
    let result = tokio::select! {
        r = bench(&args, &mut env) => r,
        sig = signals.recv() => Err(anyhow!("interrupted by {sig}")),
    };
    tokio::select! {
        () = env.shutdown() => {}
        _ = signals.recv() => {}
    }
    result
}

/// What one run measured.
#[derive(Debug, Clone)]
struct RunResult {
    /// P1 in ms.
    setup_ms: f64,
    /// Where the time went: milestones in ms since the last join.
    breakdown: String,
    /// P2.
    counts: Counts,
    /// P4: CPU ms per second per participant and peer.
    cpu: Option<f64>,
}

/// Results of one system at one size.
#[derive(Debug, Default)]
struct Cell {
    runs: Vec<RunResult>,
    failures: Vec<String>,
    /// Runs not made after a failure.
    skipped: usize,
    cpu: Option<f64>,
}

impl Cell {
    fn p1(&self) -> Option<(f64, f64, f64)> {
        let mut v: Vec<f64> = self.runs.iter().map(|r| r.setup_ms).collect();
        stats(&mut v)
    }

    fn per_pair(&self, n: usize, f: impl Fn(&Counts) -> usize) -> Option<f64> {
        let pairs = (n * (n - 1) / 2).max(1) as f64;
        let mut v: Vec<f64> = self
            .runs
            .iter()
            .map(|r| f(&r.counts) as f64 / pairs)
            .collect();
        stats(&mut v).map(|(m, _, _)| m)
    }

    fn per_participant(&self, n: usize, f: impl Fn(&Counts) -> usize) -> Option<f64> {
        let mut v: Vec<f64> = self
            .runs
            .iter()
            .map(|r| f(&r.counts) as f64 / n.max(1) as f64)
            .collect();
        stats(&mut v).map(|(m, _, _)| m)
    }
}

/// Median, min and max.
fn stats(v: &mut [f64]) -> Option<(f64, f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[0], v[n - 1]))
}

/// The machine, for the record.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<u64>().ok())
            })
        })
        .map_or_else(String::new, |kb| {
            format!(", {:.0} GiB", kb as f64 / 1_048_576.0)
        });
    format!("{cores} cores ({cpu}){mem}")
}

async fn bench(args: &BenchSetupArgs, env: &mut Env) -> anyhow::Result<()> {
    let started = Instant::now();
    let say = |s: &str| eprintln!("[{:7.1} s] {s}", started.elapsed().as_secs_f64());
    let mut systems = args.systems.clone();
    systems.sort();
    systems.dedup();
    let interop = if systems.contains(&System::Reference) {
        let d = peers::interop_dir(args.interop_dir.as_deref())?;
        peers::ensure_interop(&d).await?;
        Some(d)
    } else {
        None
    };
    say(&format!("machine: {}", machine()));
    say("starting a local Synapse");
    let l = Local::start(args.synapse_port).await?;
    say(&format!(
        "Synapse {} on {} behind the counting proxy {}",
        groupcall_synapse::SYNAPSE_VERSION,
        l.synapse.base_url(),
        l.url()
    ));
    env.local = Some(l);
    let mut floor_error = None;
    let mut prober = None;
    if args.floor_reps > 0 {
        match env.local.as_ref() {
            Some(local) => match floor::Prober::new(local, "").await {
                Ok(p) => prober = Some(p),
                Err(e) => {
                    let msg = format!("{e:#}");
                    say(&format!("preparing the floor measurement failed: {msg}"));
                    floor_error = Some(msg);
                }
            },
            None => floor_error = Some("no local Synapse".to_owned()),
        }
    }
    // Every floor sample of the run: at the start, between the runs, at the
    // end. The ratios use all of them, so the floor sees the same load as
    // the calls.
    let mut floor_all = floor::Samples::default();
    let floor_start = measure_floor(
        &mut prober,
        args.floor_reps,
        "at the start",
        &say,
        &mut floor_error,
    )
    .await;
    if let Some(f) = &floor_start {
        floor_all.extend(f);
    }
    let tmp = tempfile::Builder::new()
        .prefix("groupcall-bench-")
        .tempdir()
        .context("creating a temporary directory")?;

    let mut run_id = 0usize;
    let mut results: Vec<(usize, Vec<(System, Cell)>)> = Vec::new();
    for &n in &args.sizes {
        let n = usize::from(n);
        let mut row = Vec::new();
        for &system in &systems {
            let mut cell = Cell::default();
            let total = usize::from(args.reps) + usize::from(!args.cpu_window.is_zero());
            for rep in 0..total {
                let cpu_run = rep == usize::from(args.reps);
                let what = if cpu_run {
                    "CPU run".to_owned()
                } else {
                    format!("rep {}/{}", rep + 1, args.reps)
                };
                if !cell.failures.is_empty() {
                    cell.skipped = total - rep;
                    say(&format!(
                        "N={n} {system:?}: skipping the remaining {} runs after the failure",
                        cell.skipped
                    ));
                    break;
                }
                if !cpu_run
                    && let Some(f) =
                        measure_floor(&mut prober, FLOOR_PER_RUN, "", &say, &mut floor_error).await
                {
                    floor_all.extend(&f);
                }
                say(&format!("N={n} {system:?} {what}: starting"));
                run_id += 1;
                let r = run_once(
                    env,
                    &RunSpec {
                        system,
                        n,
                        run_id,
                        cpu_window: cpu_run.then_some(args.cpu_window),
                        connect_timeout: args.connect_timeout,
                        encrypted: args.encrypted,
                        interop: interop.as_deref(),
                        data: tmp.path(),
                        label: format!("N={n} {system:?} {what}"),
                        bench_start: started,
                    },
                )
                .await;
                env.end_run().await;
                match r {
                    Ok(r) => {
                        say(&format!(
                            "N={n} {system:?} {what}: setup {:.0} ms, {:.2} to-device messages per pair{}; ms since the last join: {}",
                            r.setup_ms,
                            r.counts.messages as f64 / (n * (n - 1) / 2) as f64,
                            r.cpu
                                .map(|c| format!(", CPU {c:.1} ms/s per peer"))
                                .unwrap_or_default(),
                            r.breakdown
                        ));
                        if cpu_run {
                            cell.cpu = r.cpu;
                        } else {
                            cell.runs.push(r);
                        }
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        say(&format!("N={n} {system:?} {what} failed: {msg}"));
                        cell.failures.push(msg);
                    }
                }
                // Let the homeserver settle (hangups, member removal).
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            row.push((system, cell));
        }
        results.push((n, row));
    }

    let floor_end = measure_floor(
        &mut prober,
        args.floor_reps,
        "at the end",
        &say,
        &mut floor_error,
    )
    .await;
    if let Some(f) = &floor_end {
        floor_all.extend(f);
    }
    let floor = floor_all.floor();
    let start = floor_start.as_ref().and_then(floor::Samples::floor);
    let end = floor_end.as_ref().and_then(floor::Samples::floor);
    let parts: Vec<(&str, floor::Floor)> = [("at the start", start), ("at the end", end)]
        .into_iter()
        .filter_map(|(w, f)| Some((w, f?)))
        .collect();
    let text = render(args, floor.as_ref(), &parts, &results);
    println!("{text}");
    if args.json {
        if let Some(f) = &floor {
            println!(
                "{}",
                json!({
                    "floor": f.json(),
                    "floor_start": start.as_ref().map(floor::Floor::json),
                    "floor_end": end.as_ref().map(floor::Floor::json),
                })
            );
        }
        for (n, row) in &results {
            println!("{}", json_line(*n, row, floor.as_ref()));
        }
    }
    let failures: usize = results
        .iter()
        .flat_map(|(_, row)| {
            row.iter()
                .filter(|(s, _)| *s == System::Groupcall)
                .map(|(_, c)| c.failures.len())
        })
        .sum();
    if let Some(e) = floor_error {
        bail!("measuring the floor failed: {e}");
    }
    if failures > 0 {
        bail!("{failures} groupcall benchmark runs failed (see the lines above)");
    }
    Ok(())
}

/// Floor samples of each component taken before each P1 run.
const FLOOR_PER_RUN: u16 = 2;

/// Takes `reps` floor samples of each component (unless there is no
/// prober), saying what it found when `when` is not empty; an error is said
/// and kept in `error`, and ends the floor measurement.
async fn measure_floor(
    prober: &mut Option<floor::Prober>,
    reps: u16,
    when: &str,
    say: &impl Fn(&str),
    error: &mut Option<String>,
) -> Option<floor::Samples> {
    let p = prober.as_mut()?;
    if reps == 0 {
        return None;
    }
    if !when.is_empty() {
        say(&format!(
            "measuring the floor {when}: {reps} member-state hops, {reps} to-device hops, {reps} loopback handshakes"
        ));
    }
    match p.sample(usize::from(reps)).await {
        Ok(samples) => {
            if !when.is_empty()
                && let Some(f) = samples.floor()
            {
                say(&format!(
                    "floor {when} {:.1} ms = member-state hop {} + to-device hop {} + ICE/DTLS handshake {} (ms, median [min–max])",
                    f.total(),
                    f.member_state.show(),
                    f.to_device.show(),
                    f.handshake.show()
                ));
            }
            Some(samples)
        }
        Err(e) => {
            let msg = format!("{e:#}");
            say(&format!("measuring the floor failed: {msg}"));
            error.get_or_insert(msg);
            *prober = None;
            None
        }
    }
}

struct RunSpec<'a> {
    system: System,
    n: usize,
    run_id: usize,
    cpu_window: Option<Duration>,
    connect_timeout: Duration,
    encrypted: bool,
    interop: Option<&'a Path>,
    data: &'a Path,
    /// `N=.. System rep ..`, for progress lines.
    label: String,
    /// The bench's start, for progress lines' timestamps.
    bench_start: Instant,
}

async fn run_once(env: &mut Env, spec: &RunSpec<'_>) -> anyhow::Result<RunResult> {
    let local = env
        .local
        .as_ref()
        .ok_or_else(|| anyhow!("no local Synapse"))?;
    let hs = local.url();
    let n = spec.n;
    let names: Vec<String> = (0..n)
        .map(|i| format!("b{}u{}", spec.run_id, i + 1))
        .collect();
    let password = "bench-pw";
    for name in &names {
        local.register(name, password).await?;
    }
    let user_ids: Vec<String> = names.iter().map(|n| local.user_id(n)).collect();
    let dir = spec.data.join(format!("run{}", spec.run_id));
    let creator = local::login(
        &hs,
        &names[0],
        password,
        &dir.join(&names[0]),
        spec.connect_timeout,
    )
    .await?;
    let room = local::create_room(&creator, "bench", Vec::new(), true).await?;
    // Both systems report a track's first frame the moment it comes
    // (groupcall a `Media` event, the reference its `first_frame` line) and
    // keep their usual 1 s statistics otherwise.
    let interval = Duration::from_secs(1);
    let ref_interval = interval;

    let (tx, mut rx) = mpsc::unbounded_channel::<Obs>();
    let start = Instant::now();
    let mut tracker = Tracker::new(names.clone(), start);
    for (i, u) in user_ids.iter().enumerate() {
        tracker.set_identity(i, u);
    }
    let mut waiting = Vec::new();
    match spec.system {
        System::Groupcall => {
            let mut sessions = vec![creator];
            for name in &names[1..] {
                sessions.push(
                    local::login(&hs, name, password, &dir.join(name), spec.connect_timeout)
                        .await?,
                );
            }
            for (i, s) in sessions.into_iter().enumerate() {
                let mut o = JoinOptions::new(room.clone());
                // The same one candidate as the reference offers (see below).
                o.bind_addrs = vec![LOOPBACK];
                o.stats_interval = interval;
                o.encrypt = spec.encrypted;
                o.create = (i == 0).then(CreateOptions::default);
                waiting.push((i, s, o));
            }
            let (i, s, o) = waiting.remove(0);
            env.gc.push(GroupcallPeer::spawn(
                s,
                o,
                spec.connect_timeout,
                Reporter::new(i, tx.clone()),
            ));
        }
        System::Reference => {
            if let Err(e) = creator.logout().await {
                tracing::debug!("logging the room creator's helper device out: {e}");
            }
            let interop = spec
                .interop
                .ok_or_else(|| anyhow!("no interop directory"))?;
            for (i, name) in names.iter().enumerate() {
                let log: PathBuf = spec.data.join(format!("{name}.stderr.log"));
                env.refs.push(RefPeer::spawn_with(
                    &RefOptions {
                        dir: interop,
                        homeserver: &hs,
                        user: name,
                        password,
                        room: &room,
                        create_call: i == 0,
                        encrypted: spec.encrypted,
                        media_interval: ref_interval,
                        log: &log,
                    },
                    // libwebrtc gathers UDP and TCP host candidates on every
                    // interface (here also ::1 and the LAN addresses): offer
                    // only the UDP one on 127.0.0.1, as groupcall does.
                    &["--candidate-ip", &LOOPBACK.to_string()],
                    Reporter::new(i, tx.clone()),
                )?);
            }
        }
    }

    // Node needs a few seconds to start: joining may take longer.
    let join_deadline = start + spec.connect_timeout + Duration::from_secs(60);
    let mut next_progress = start + PROGRESS_EVERY;
    loop {
        let deadline = tracker
            .all_joined()
            .map_or(join_deadline, |t| t + spec.connect_timeout);
        let o = tokio::select! {
            o = rx.recv() => o.ok_or_else(|| anyhow!("every participant stopped"))?,
            () = tokio::time::sleep_until(next_progress.into()) => {
                next_progress += PROGRESS_EVERY;
                eprintln!(
                    "[{:7.1} s] {}: {} s in, {}",
                    spec.bench_start.elapsed().as_secs_f64(),
                    spec.label,
                    start.elapsed().as_secs(),
                    how_far(&tracker)
                );
                continue;
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                let down = tracker.pairs_not_up();
                let waited = match tracker.all_joined() {
                    Some(j) => format!("{:.0} s after the last join", j.elapsed().as_secs_f64()),
                    None => format!("{:.0} s after the start", start.elapsed().as_secs_f64()),
                };
                bail!(
                    "not up {waited} ({}): {}",
                    how_far(&tracker),
                    down.into_iter().take(3).collect::<Vec<_>>().join("; ")
                );
            }
        };
        if let What::Fatal(m) = &o.what {
            bail!("{}: {m}", names[o.idx]);
        }
        let progress = tracker.apply(&o);
        if progress.contains(&Progress::Joined(0)) {
            for (i, s, o) in waiting.drain(..) {
                env.gc.push(GroupcallPeer::spawn(
                    s,
                    o,
                    spec.connect_timeout,
                    Reporter::new(i, tx.clone()),
                ));
            }
        }
        if progress.contains(&Progress::MeshUp) {
            break;
        }
    }
    let mesh_up = tracker.mesh_up().unwrap_or_else(Instant::now);
    // Signalling that belongs to the setup but lands just after the media.
    drain_for(&mut rx, &mut tracker, Duration::from_secs(1)).await?;
    let proxy = &env
        .local
        .as_ref()
        .ok_or_else(|| anyhow!("no local Synapse"))?
        .proxy;
    let counts = count_signalling(proxy, start, mesh_up + Duration::from_secs(1));
    let last_join = user_ids
        .iter()
        .map(|u| counts.first_member.get(u).copied())
        .collect::<Option<Vec<Instant>>>()
        .and_then(|v| v.into_iter().max())
        .or_else(|| tracker.all_joined())
        .ok_or_else(|| anyhow!("no join seen"))?;
    let setup_ms = mesh_up.saturating_duration_since(last_join).as_secs_f64() * 1000.0;
    let since = |t: Instant| -> String {
        if t >= last_join {
            format!("+{:.0}", t.duration_since(last_join).as_secs_f64() * 1000.0)
        } else {
            format!("-{:.0}", last_join.duration_since(t).as_secs_f64() * 1000.0)
        }
    };
    let mut breakdown = Vec::new();
    for (ty, (first, last)) in &counts.span_by_type {
        let short = ty.trim_start_matches("m.call.");
        breakdown.push(format!("{short} {}..{}", since(*first), since(*last)));
    }
    let summaries = tracker.summaries();
    let conn = summaries
        .iter()
        .filter_map(|p| Some(p.start_ms? + p.connected_ms?))
        .reduce(f64::max);
    if let Some(c) = conn {
        breakdown.push(format!(
            "last pair connected {}",
            since(start + Duration::from_secs_f64(c / 1000.0))
        ));
    }
    let breakdown = breakdown.join(", ");
    if std::env::var_os("GROUPCALL_BENCH_TRACE").is_some() {
        // Every request of the run, for finding where the time goes.
        for r in proxy.since(start) {
            let target = r.target.split('?').next().unwrap_or_default();
            eprintln!("  {:>7} {} {target}", since(r.at), r.method);
        }
    }

    let cpu = match spec.cpu_window {
        None => None,
        Some(window) => {
            drain_for(&mut rx, &mut tracker, Duration::from_secs(2)).await?;
            let pids: Vec<u32> = env.refs.iter().map(RefPeer::pid).collect();
            let read = || -> Option<Duration> {
                match spec.system {
                    System::Groupcall => peers::cpu_time(None),
                    System::Reference => pids.iter().map(|p| peers::cpu_time(Some(*p))).sum(),
                }
            };
            let before = read();
            let t = Instant::now();
            drain_for(&mut rx, &mut tracker, window).await?;
            let after = read();
            let secs = t.elapsed().as_secs_f64();
            match (before, after) {
                (Some(b), Some(a)) => {
                    let peers = (n * (n - 1)) as f64;
                    Some(a.saturating_sub(b).as_secs_f64() * 1000.0 / secs / peers)
                }
                _ => None,
            }
        }
    };
    Ok(RunResult {
        setup_ms,
        breakdown,
        counts,
        cpu,
    })
}

/// `j/N joined, p/P pairs up`.
fn how_far(tracker: &Tracker) -> String {
    let joined = tracker.joined.iter().filter(|j| j.is_some()).count();
    let summaries = tracker.summaries();
    let up = summaries.iter().filter(|p| p.up()).count();
    let connected = summaries
        .iter()
        .filter(|p| p.connected_ms.is_some())
        .count();
    format!(
        "{joined}/{} joined, {connected}/{} pairs connected, {up} with media both ways",
        tracker.n(),
        summaries.len()
    )
}

/// Keeps folding observations in for `d`; a fatal one is an error.
async fn drain_for(
    rx: &mut mpsc::UnboundedReceiver<Obs>,
    tracker: &mut Tracker,
    d: Duration,
) -> anyhow::Result<()> {
    let end = tokio::time::Instant::now() + d;
    loop {
        tokio::select! {
            o = rx.recv() => {
                let o = o.ok_or_else(|| anyhow!("every participant stopped"))?;
                if let What::Fatal(m) = &o.what {
                    bail!("{}: {m}", tracker.names.get(o.idx).cloned().unwrap_or_default());
                }
                tracker.apply(&o);
            }
            () = tokio::time::sleep_until(end) => return Ok(()),
        }
    }
}

fn cell(row: &[(System, Cell)], s: System) -> Option<&Cell> {
    row.iter().find(|(x, _)| *x == s).map(|(_, c)| c)
}

fn fmt_p1(c: Option<&Cell>) -> String {
    match c.and_then(Cell::p1) {
        Some((m, lo, hi)) => {
            let failed = c.map_or(0, |c| c.failures.len());
            format!(
                "{m:.0} [{lo:.0}–{hi:.0}]{}",
                if failed > 0 {
                    format!(" ({failed} failed)")
                } else {
                    String::new()
                }
            )
        }
        None => match c {
            Some(c) if !c.failures.is_empty() => "failed (see below)".to_owned(),
            _ => "-".to_owned(),
        },
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.prec$}"))
}

fn render(
    args: &BenchSetupArgs,
    floor: Option<&floor::Floor>,
    parts: &[(&str, floor::Floor)],
    results: &[(usize, Vec<(System, Cell)>)],
) -> String {
    let g = System::Groupcall;
    let r = System::Reference;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "\ngroupcall bench setup: {} reps per size, {} signalling; machine: {}",
        args.reps,
        if args.encrypted {
            "Olm-encrypted"
        } else {
            "plaintext"
        },
        machine()
    );
    if let Some(f) = floor {
        let _ = writeln!(
            t,
            "\nFloor (same Synapse and proxy, this run: at the start, before each P1 run and at the end; ms, median [min–max] of {}):\n  member-state hop (PUT state -> the other user's parked /sync returns)  {}\n  to-device hop (PUT sendToDevice m.call.invite, 2 KB -> parked /sync)   {}\n  ICE + DTLS handshake, two groupcall-media peers on 127.0.0.1           {}\n  floor = sum of the medians                                             {:.1}",
            f.member_state.count,
            f.member_state.show(),
            f.to_device.show(),
            f.handshake.show(),
            f.total()
        );
        for (when, e) in parts {
            let _ = writeln!(
                t,
                "  {when} alone ({} samples): {:.1} + {:.1} + {:.1} = {:.1}",
                e.member_state.count,
                e.member_state.median,
                e.to_device.median,
                e.handshake.median,
                e.total()
            );
        }
    }
    let _ = writeln!(
        t,
        "\nP1  setup: last join -> every pair has audio and video both ways, ms, median [min–max]\n    (end point: groupcall a depacketized RTP frame, reference a decoded frame, both reported at once;\n     both offer one candidate, UDP 127.0.0.1)"
    );
    let _ = writeln!(
        t,
        "  {:>3}  {:>22}  {:>22}  {:>13}  {:>15}  {:>15}",
        "N", "groupcall", "reference", "groupcall/ref", "groupcall/floor", "reference/floor"
    );
    let x = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.2}x"));
    for (n, row) in results {
        let (gc, rc) = (cell(row, g), cell(row, r));
        let gm = gc.and_then(Cell::p1).map(|x| x.0);
        let rm = rc.and_then(Cell::p1).map(|x| x.0);
        let fl = floor.map(floor::Floor::total);
        let _ = writeln!(
            t,
            "  {n:>3}  {:>22}  {:>22}  {:>13}  {:>15}  {:>15}",
            fmt_p1(gc),
            fmt_p1(rc),
            x(ratio(gm, rm)),
            x(ratio(gm, fl)),
            x(ratio(rm, fl))
        );
    }
    let mut outcomes = Vec::new();
    for (n, row) in results {
        for (system, c) in row {
            for (i, f) in c.failures.iter().enumerate() {
                outcomes.push(format!("  N={n} {system:?}: run {} failed: {f}", i + 1));
            }
            if c.skipped > 0 {
                outcomes.push(format!(
                    "  N={n} {system:?}: {} further runs (reps and CPU run) skipped after the failure",
                    c.skipped
                ));
            }
        }
    }
    if !outcomes.is_empty() {
        let _ = writeln!(t, "\nRuns that did not complete:");
        for o in outcomes {
            let _ = writeln!(t, "{o}");
        }
    }
    let _ = writeln!(
        t,
        "\nP2  signalling per pair during setup (median): to-device requests / messages / body bytes; member state events per participant"
    );
    let _ = writeln!(t, "  {:>3}  {:>32}  {:>32}", "N", "groupcall", "reference");
    for (n, row) in results {
        let f = |c: Option<&Cell>| -> String {
            match c {
                Some(c) if !c.runs.is_empty() => format!(
                    "{} / {} / {} B; {}",
                    opt(c.per_pair(*n, |x| x.requests), 2),
                    opt(c.per_pair(*n, |x| x.messages), 2),
                    opt(c.per_pair(*n, |x| x.bytes), 0),
                    opt(c.per_participant(*n, |x| x.member_events), 1)
                ),
                _ => "-".to_owned(),
            }
        };
        let _ = writeln!(
            t,
            "  {n:>3}  {:>32}  {:>32}",
            f(cell(row, g)),
            f(cell(row, r))
        );
    }
    let _ = writeln!(
        t,
        "\nP4  CPU per participant and connected peer, ms of CPU per second ({} s window, 1 s statistics)",
        args.cpu_window.as_secs_f64()
    );
    let _ = writeln!(
        t,
        "  {:>3}  {:>10}  {:>10}  {:>14}",
        "N", "groupcall", "reference", "groupcall/ref"
    );
    for (n, row) in results {
        let gc = cell(row, g).and_then(|c| c.cpu);
        let rc = cell(row, r).and_then(|c| c.cpu);
        let _ = writeln!(
            t,
            "  {n:>3}  {:>10}  {:>10}  {:>14}",
            opt(gc, 2),
            opt(rc, 2),
            ratio(gc, rc).map_or("-".to_owned(), |x| format!("{x:.2}x"))
        );
    }
    t
}

fn json_line(n: usize, row: &[(System, Cell)], floor: Option<&floor::Floor>) -> Value {
    let gc = cell(row, System::Groupcall);
    let rc = cell(row, System::Reference);
    let p1 = |c: Option<&Cell>| c.and_then(Cell::p1);
    let pp = |c: Option<&Cell>, f: fn(&Counts) -> usize| c.and_then(|c| c.per_pair(n, f));
    let member = |c: Option<&Cell>| c.and_then(|c| c.per_participant(n, |x| x.member_events));
    let cpu = |c: Option<&Cell>| c.and_then(|c| c.cpu);
    let runs = |c: Option<&Cell>| c.map(|c| c.runs.iter().map(|r| r.setup_ms).collect::<Vec<_>>());
    json!({
        "n": n,
        "groupcall_ms": p1(gc).map(|x| x.0),
        "groupcall_min_ms": p1(gc).map(|x| x.1),
        "groupcall_max_ms": p1(gc).map(|x| x.2),
        "groupcall_runs_ms": runs(gc),
        "reference_ms": p1(rc).map(|x| x.0),
        "reference_min_ms": p1(rc).map(|x| x.1),
        "reference_max_ms": p1(rc).map(|x| x.2),
        "reference_runs_ms": runs(rc),
        "ratio": ratio(p1(gc).map(|x| x.0), p1(rc).map(|x| x.0)),
        "floor_ms": floor.map(floor::Floor::total),
        "groupcall_floor_ratio": ratio(p1(gc).map(|x| x.0), floor.map(floor::Floor::total)),
        "reference_floor_ratio": ratio(p1(rc).map(|x| x.0), floor.map(floor::Floor::total)),
        "groupcall_todevice_per_pair": pp(gc, |x| x.messages),
        "reference_todevice_per_pair": pp(rc, |x| x.messages),
        "groupcall_todevice_requests_per_pair": pp(gc, |x| x.requests),
        "reference_todevice_requests_per_pair": pp(rc, |x| x.requests),
        "groupcall_todevice_bytes_per_pair": pp(gc, |x| x.bytes),
        "reference_todevice_bytes_per_pair": pp(rc, |x| x.bytes),
        "groupcall_member_events_per_participant": member(gc),
        "reference_member_events_per_participant": member(rc),
        "groupcall_cpu_ms_per_s_per_peer": cpu(gc),
        "reference_cpu_ms_per_s_per_peer": cpu(rc),
        "cpu_ratio": ratio(cpu(gc), cpu(rc)),
        "groupcall_failed_runs": gc.map(|c| c.failures.len()),
        "reference_failed_runs": rc.map(|c| c.failures.len()),
        "groupcall_failures": gc.map(|c| c.failures.clone()),
        "reference_failures": rc.map(|c| c.failures.clone()),
        "groupcall_skipped_runs": gc.map(|c| c.skipped),
        "reference_skipped_runs": rc.map(|c| c.skipped),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(stats(&mut []), None);
        assert_eq!(stats(&mut [3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats(&mut [4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), None), None);
    }

    /// A reference that failed at N=12 is reported with its outcome, next to
    /// groupcall's figures and the floor.
    #[test]
    fn render_states_failed_runs_and_the_floor() {
        use clap::Parser as _;
        let cli = crate::args::Cli::try_parse_from([
            "groupcall",
            "bench",
            "setup",
            "--sizes",
            "12",
            "--reps",
            "1",
        ])
        .unwrap();
        let crate::args::Cmd::Bench(crate::args::BenchCmd::Setup(args)) = cli.command else {
            panic!("not bench setup");
        };
        let c = |m| floor::Component {
            median: m,
            min: m,
            max: m,
            count: 1,
        };
        let fl = floor::Floor {
            member_state: c(20.0),
            to_device: c(10.0),
            handshake: c(10.0),
        };
        let gc = Cell {
            runs: vec![RunResult {
                setup_ms: 400.0,
                breakdown: String::new(),
                counts: Counts::default(),
                cpu: None,
            }],
            cpu: Some(3.0),
            ..Cell::default()
        };
        let rc = Cell {
            failures: vec!["not up 60 s after the last join".to_owned()],
            skipped: 1,
            ..Cell::default()
        };
        let results = vec![(12, vec![(System::Groupcall, gc), (System::Reference, rc)])];
        let t = render(&args, Some(&fl), &[], &results);
        assert!(t.contains("floor = sum of the medians"), "{t}");
        assert!(t.contains("10.00x"), "400 ms against a 40 ms floor: {t}");
        assert!(t.contains("failed (see below)"), "{t}");
        assert!(
            t.contains("N=12 Reference: run 1 failed: not up 60 s after the last join"),
            "{t}"
        );
        assert!(t.contains("1 further runs"), "{t}");
        let j = json_line(12, &results[0].1, Some(&fl));
        assert_eq!(j["groupcall_floor_ratio"], 10.0);
        assert_eq!(j["reference_failed_runs"], 1);
        assert_eq!(j["reference_ms"], Value::Null);
    }
}
