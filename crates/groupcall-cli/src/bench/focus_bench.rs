//! `groupcall bench focus`: forwarding capacity of an SFU, measured with a
//! load generator in a separate process ([`super::loadgen`]) on the other
//! core, the system under test pinned to core 0 (`taskset`).
//!
//! Per system and scenario (P publishers x S subscribers, each subscriber
//! receiving every publisher): the publishers' video packet rate is ramped
//! up; at each step the load runs for a warm-up second and a measured
//! window; egress is what the subscribers received per second, loss the
//! packets missing by sequence number, CPU the system's user+sys time from
//! /proc over the window. Capacity is the highest egress rate whose loss
//! stayed below 0.1 %; latency percentiles are measured at half of it.
//!
//! Systems: Janus VideoRoom (Debian's `janus`, configured and started
//! here). groupcall's focus through its production path is the issue's
//! other half and not built yet (docs/benchmarks.md says so).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::janus::Janus;
use super::loadgen::ask;
use crate::args::BenchFocusArgs;

/// The core the system under test runs on; the load generator gets the
/// other one.
const SUT_CORE: usize = 0;
const LOADGEN_CORE: usize = 1;
/// Loss above this ends the ramp (0.1 %).
const MAX_LOSS: f64 = 0.001;

/// The load generator process.
struct Loadgen {
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Loadgen {
    async fn start() -> anyhow::Result<Loadgen> {
        let exe = std::env::current_exe().context("the groupcall binary")?;
        let mut child = Command::new("taskset")
            .arg("-c")
            .arg(LOADGEN_CORE.to_string())
            .arg(exe)
            .args(["bench", "loadgen"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the load generator (taskset)")?;
        let stdin = child.stdin.take().context("load generator stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("load generator stdout")?).lines();
        Ok(Loadgen {
            child,
            stdin,
            stdout,
        })
    }

    async fn ask(&mut self, cmd: Value) -> anyhow::Result<Value> {
        ask(&mut self.stdin, &mut self.stdout, cmd).await
    }

    async fn stop(mut self) {
        let _ = self.ask(json!({"op": "quit"})).await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// user+sys CPU seconds of process `pid` so far (/proc/PID/stat).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc stat format")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), 12 and 13 here.
    let ticks: f64 = f
        .get(11..13)
        .context("/proc stat fields")?
        .iter()
        .map(|v| v.parse::<f64>().unwrap_or(0.0))
        .sum();
    Ok(ticks / 100.0)
}

/// One measured step of the ramp.
#[derive(Debug, Clone)]
struct Step {
    video_pps: u64,
    egress_pps: f64,
    loss: f64,
    cpu: f64,
    /// The load generator's CPU share over the window: near 1, the
    /// generator, not the system, limits the step.
    loadgen_cpu: f64,
    p50_us: u32,
    p99_us: u32,
}

/// The figures of one system in one scenario.
#[derive(Debug, Clone)]
struct Outcome {
    steps: Vec<Step>,
    /// The last step under the loss limit.
    capacity: Option<Step>,
    /// At half the capacity rate.
    half: Option<Step>,
}

async fn measure(
    lg: &mut Loadgen,
    pid: u32,
    video_pps: u64,
    window: Duration,
) -> anyhow::Result<Step> {
    lg.ask(json!({"op": "rate", "video_pps": video_pps}))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lg_pid = lg.child.id().context("load generator pid")?;
    let (c0, l0) = (cpu_seconds(pid)?, cpu_seconds(lg_pid)?);
    let w = lg
        .ask(json!({"op": "window", "secs": window.as_secs_f64()}))
        .await?;
    let (c1, l1) = (cpu_seconds(pid)?, cpu_seconds(lg_pid)?);
    let secs = w["secs"].as_f64().unwrap_or(window.as_secs_f64()).max(0.1);
    let received = w["received"].as_f64().unwrap_or(0.0);
    let lost = w["lost"].as_f64().unwrap_or(0.0);
    Ok(Step {
        video_pps,
        egress_pps: received / secs,
        loss: if received + lost > 0.0 {
            lost / (received + lost)
        } else {
            1.0
        },
        cpu: (c1 - c0) / secs,
        loadgen_cpu: (l1 - l0) / secs,
        p50_us: w["p50_us"].as_u64().unwrap_or(0) as u32,
        p99_us: w["p99_us"].as_u64().unwrap_or(0) as u32,
    })
}

/// Ramps the publishers' rate by `factor` from `start` until loss passes
/// the limit (or the rate cap), then measures at half of the capacity.
async fn ramp(
    lg: &mut Loadgen,
    pid: u32,
    args: &BenchFocusArgs,
    label: &str,
) -> anyhow::Result<Outcome> {
    let mut steps = Vec::new();
    let mut capacity: Option<Step> = None;
    let mut pps = args.start_pps;
    while pps <= args.max_pps {
        let s = measure(lg, pid, pps, args.window).await?;
        eprintln!(
            "{label}: {pps} video packets/s per publisher: egress {:.0} packets/s, loss {:.3} %, CPU {:.0} % (load generator {:.0} %), latency p50 {} µs p99 {} µs",
            s.egress_pps,
            100.0 * s.loss,
            100.0 * s.cpu,
            100.0 * s.loadgen_cpu,
            s.p50_us,
            s.p99_us
        );
        let ok = s.loss < MAX_LOSS;
        steps.push(s.clone());
        if !ok {
            break;
        }
        capacity = Some(s);
        pps = ((pps as f64) * args.ramp_factor).ceil() as u64;
    }
    let half = match &capacity {
        Some(c) => Some(measure(lg, pid, (c.video_pps / 2).max(1), args.window).await?),
        None => None,
    };
    lg.ask(json!({"op": "rate", "video_pps": 0})).await?;
    Ok(Outcome {
        steps,
        capacity,
        half,
    })
}

/// Janus VideoRoom with `publishers` x `subscribers`.
async fn run_janus(args: &BenchFocusArgs) -> anyhow::Result<Outcome> {
    let mut janus = Janus::start(SUT_CORE).await?;
    let pid = janus.pid().context("janus pid")?;
    let mut lg = Loadgen::start().await?;
    let result = async {
        let session = janus.session().await?;
        let admin = janus.attach(session).await?;
        let room = 1234;
        janus
            .create_room(session, admin, room, usize::from(args.publishers) + 1)
            .await?;
        let mut feeds = Vec::new();
        for i in 0..args.publishers {
            let id = format!("pub{i}");
            let offer = lg.ask(json!({"op": "publisher", "id": id})).await?;
            let handle = janus.attach(session).await?;
            let p = janus
                .publish(
                    session,
                    handle,
                    room,
                    offer["offer"].as_str().unwrap_or_default(),
                )
                .await?;
            if std::env::var_os("GROUPCALL_BENCH_SDP").is_some() {
                eprintln!(
                    "offer:\n{}\nanswer:\n{}",
                    offer["offer"].as_str().unwrap_or_default(),
                    p.answer
                );
            }
            lg.ask(json!({"op": "answer", "id": id, "sdp": p.answer}))
                .await?;
            feeds.push(p.id);
        }
        // Janus offers a feed to subscribers once its PeerConnection is up.
        lg.ask(json!({"op": "connected", "timeout_s": 30})).await?;
        for j in 0..args.subscribers {
            let handle = janus.attach(session).await?;
            let offer = janus.subscribe(session, handle, room, &feeds).await?;
            let a = lg
                .ask(json!({"op": "subscriber", "id": format!("sub{j}"), "offer": offer}))
                .await?;
            janus
                .start_subscription(session, handle, a["answer"].as_str().unwrap_or_default())
                .await?;
        }
        lg.ask(json!({"op": "connected", "timeout_s": 30})).await?;
        ramp(&mut lg, pid, args, "janus").await
    }
    .await;
    lg.stop().await;
    let log = janus.log_tail();
    janus.stop().await?;
    result.with_context(|| format!("janus log:\n{log}"))
}

/// Runs `groupcall bench focus`.
pub async fn run(args: BenchFocusArgs) -> anyhow::Result<()> {
    if args.start_pps == 0 || args.ramp_factor <= 1.0 {
        bail!("--start-pps must be positive and --ramp-factor above 1");
    }
    let scenario = format!("{}x{}", args.publishers, args.subscribers);
    eprintln!(
        "bench focus: scenario {scenario} (publishers x subscribers), windows of {:.0} s, system on core {SUT_CORE}, load generator on core {LOADGEN_CORE}",
        args.window.as_secs_f64()
    );
    let janus = run_janus(&args).await?;
    let cap = janus.capacity.as_ref();
    let half = janus.half.as_ref();
    let per_core = cap.map(|c| c.egress_pps / c.cpu.max(0.01));
    println!(
        "{:<10} {:>14} {:>16} {:>12} {:>12} {:>10}",
        "system", "capacity pps", "pps per core-s", "p50 ms @50%", "p99 ms @50%", "loss @50%"
    );
    println!(
        "{:<10} {:>14} {:>16} {:>12} {:>12} {:>10}",
        "janus",
        cap.map_or("-".into(), |c| format!("{:.0}", c.egress_pps)),
        per_core.map_or("-".into(), |v| format!("{v:.0}")),
        half.map_or("-".into(), |h| format!(
            "{:.2}",
            f64::from(h.p50_us) / 1000.0
        )),
        half.map_or("-".into(), |h| format!(
            "{:.2}",
            f64::from(h.p99_us) / 1000.0
        )),
        half.map_or("-".into(), |h| format!("{:.3} %", 100.0 * h.loss)),
    );
    if args.json {
        println!(
            "{}",
            json!({
                "scenario": scenario,
                "janus_egress_pps": cap.map(|c| c.egress_pps),
                "janus_egress_pps_per_core": per_core,
                "janus_p99_added_ms": half.map(|h| f64::from(h.p99_us) / 1000.0),
                "janus_loss": half.map(|h| h.loss),
                "janus_steps": janus.steps.iter().map(|s| json!({
                    "video_pps": s.video_pps, "egress_pps": s.egress_pps, "loss": s.loss,
                    "cpu": s.cpu, "loadgen_cpu": s.loadgen_cpu, "p50_us": s.p50_us, "p99_us": s.p99_us})).collect::<Vec<_>>(),
            })
        );
    }
    Ok(())
}
