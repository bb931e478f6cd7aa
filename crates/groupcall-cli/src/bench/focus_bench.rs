//! `groupcall bench focus`: forwarding capacity of an SFU, measured with a
//! load generator in a separate process ([`super::loadgen`]) on the other
//! core, the system under test pinned to core 0 (`taskset`).
//!
//! Per system and scenario (P publishers x S subscribers, each subscriber
//! receiving every publisher): the publishers' video packet rate is ramped
//! up; at each step the load runs for a warm-up second and a measured
//! window; egress is what the subscribers received per second, loss the
//! packets missing by sequence number or short of what the publishers
//! sent times the subscribers of each stream, CPU the system's user+sys time from
//! /proc over the window. Capacity is the highest egress rate whose loss
//! stayed below 0.1 %; latency percentiles are measured at half of it,
//! after a pause that lets the overloaded step's backlog drain.
//!
//! Systems: groupcall's focus (`groupcall focus`, set up through Matrix on
//! a local Synapse) and Janus VideoRoom (Debian's `janus`, configured and
//! started here), in the same run; see docs/benchmarks.md.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::janus::Janus;
use super::loadgen::ask;
use crate::args::{BenchFocusArgs, FocusSystem, Scenario};

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

/// How long the load pauses its video after the ramp, before the step at
/// half of the capacity.
const DRAIN: Duration = Duration::from_secs(5);

/// One step: `fanout` is how many subscribers receive each published
/// stream.
async fn measure(
    lg: &mut Loadgen,
    pid: u32,
    video_pps: u64,
    window: Duration,
    fanout: u64,
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
    let gaps = w["lost"].as_f64().unwrap_or(0.0);
    // What the subscribers should have received of what the publishers
    // sent in the window: a system that drops packets and renumbers the
    // rest (a focus stopping video to a subscriber it thinks congested)
    // leaves no sequence gap, so the shortfall counts as lost too.
    let expected = w["sent"].as_f64().unwrap_or(0.0) * fanout as f64;
    let lost = gaps + (expected - received - gaps).max(0.0);
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
    fanout: u64,
) -> anyhow::Result<Outcome> {
    let mut steps = Vec::new();
    let mut capacity: Option<Step> = None;
    let mut pps = args.start_pps;
    while pps <= args.max_pps {
        let s = measure(lg, pid, pps, args.window, fanout).await?;
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
    // The step that overloaded the system left packets queued in socket
    // buffers (up to seconds of them): without video for a while they
    // drain, so that the latency at half of the capacity is not the
    // backlog's.
    let half = match &capacity {
        Some(c) => {
            lg.ask(json!({"op": "rate", "video_pps": 0})).await?;
            tokio::time::sleep(DRAIN).await;
            Some(measure(lg, pid, (c.video_pps / 2).max(1), args.window, fanout).await?)
        }
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
async fn run_janus(args: &BenchFocusArgs, sc: Scenario) -> anyhow::Result<Outcome> {
    let mut janus = Janus::start(SUT_CORE).await?;
    let pid = janus.pid().context("janus pid")?;
    let mut lg = Loadgen::start().await?;
    let result = async {
        let session = janus.session().await?;
        let admin = janus.attach(session).await?;
        let room = 1234;
        janus
            .create_room(session, admin, room, usize::from(sc.publishers) + 1)
            .await?;
        let mut feeds = Vec::new();
        for i in 0..sc.publishers {
            let id = format!("pub{i}");
            let video = i < sc.video_publishers;
            let offer = lg
                .ask(json!({"op": "publisher", "id": id, "video": video}))
                .await?;
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
        for j in 0..sc.subscribers {
            let handle = janus.attach(session).await?;
            // All to all: participant j receives everyone but itself.
            let wanted: Vec<u64> = feeds
                .iter()
                .enumerate()
                .filter(|(i, _)| !sc.all_to_all || *i != usize::from(j))
                .map(|(_, f)| *f)
                .collect();
            let offer = janus.subscribe(session, handle, room, &wanted).await?;
            let a = lg
                .ask(json!({"op": "subscriber", "id": format!("sub{j}"), "offer": offer}))
                .await?;
            janus
                .start_subscription(session, handle, a["answer"].as_str().unwrap_or_default())
                .await?;
        }
        lg.ask(json!({"op": "connected", "timeout_s": 30})).await?;
        ramp(&mut lg, pid, args, &format!("janus {sc}"), sc.fanout()).await
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
    eprintln!(
        "bench focus: scenarios {} (publishers x subscribers), windows of {:.0} s, system on core {SUT_CORE}, load generator on core {LOADGEN_CORE}",
        args.scenarios
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        args.window.as_secs_f64()
    );
    for sc in &args.scenarios {
        scenario(&args, *sc).await?;
    }
    Ok(())
}

/// One scenario, every system: the table, and the JSON object.
async fn scenario(args: &BenchFocusArgs, sc: Scenario) -> anyhow::Result<()> {
    let scenario = sc.to_string();
    let mut results: Vec<(&str, Outcome)> = Vec::new();
    for system in &args.systems {
        let (name, outcome) = match system {
            FocusSystem::Groupcall => ("groupcall", run_groupcall(args, sc).await?),
            FocusSystem::Janus => ("janus", run_janus(args, sc).await?),
        };
        results.push((name, outcome));
    }
    let per_core = |o: &Outcome| o.capacity.as_ref().map(|c| c.egress_pps / c.cpu.max(0.01));
    println!("scenario {scenario}");
    println!(
        "{:<10} {:>14} {:>16} {:>12} {:>12} {:>10}",
        "system", "capacity pps", "pps per core-s", "p50 ms @50%", "p99 ms @50%", "loss @50%"
    );
    for (name, o) in &results {
        let (cap, half) = (o.capacity.as_ref(), o.half.as_ref());
        println!(
            "{:<10} {:>14} {:>16} {:>12} {:>12} {:>10}",
            name,
            cap.map_or("-".into(), |c| format!("{:.0}", c.egress_pps)),
            per_core(o).map_or("-".into(), |v| format!("{v:.0}")),
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
    }
    let find = |n: &str| results.iter().find(|(name, _)| *name == n).map(|(_, o)| o);
    let ratio = match (
        find("groupcall").and_then(per_core),
        find("janus").and_then(per_core),
    ) {
        (Some(g), Some(j)) if j > 0.0 => Some(g / j),
        _ => None,
    };
    if let Some(r) = ratio {
        println!("groupcall / janus, egress packets per core-second: {r:.2}x");
    }
    if args.json {
        let mut o = json!({"scenario": scenario, "ratio": ratio});
        for (name, out) in &results {
            o[format!("{name}_egress_pps")] = json!(out.capacity.as_ref().map(|c| c.egress_pps));
            o[format!("{name}_egress_pps_per_core")] = json!(per_core(out));
            o[format!("{name}_p99_added_ms")] =
                json!(out.half.as_ref().map(|h| f64::from(h.p99_us) / 1000.0));
            o[format!("{name}_loss")] = json!(out.half.as_ref().map(|h| h.loss));
            o[format!("{name}_steps")] = out
                .steps
                .iter()
                .map(|s| {
                    json!({"video_pps": s.video_pps, "egress_pps": s.egress_pps, "loss": s.loss,
                        "cpu": s.cpu, "loadgen_cpu": s.loadgen_cpu, "p50_us": s.p50_us,
                        "p99_us": s.p99_us})
                })
                .collect();
        }
        println!("{o}");
    }
    Ok(())
}

/// A load peer's Matrix device.
struct LoadUser {
    user: super::floor::User,
    session_id: String,
    /// Its /sync position.
    since: Option<String>,
}

/// `/sync` with no rooms (to-device messages only); URL-encoded
/// `{"room":{"rooms":[]},"presence":{"types":[]},"account_data":{"types":[]}}`.
const TO_DEVICE_ONLY: &str = "%7B%22room%22%3A%7B%22rooms%22%3A%5B%5D%7D%2C%22presence%22%3A%7B%22types%22%3A%5B%5D%7D%2C%22account_data%22%3A%7B%22types%22%3A%5B%5D%7D%7D";

fn random_id(n: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    while out.len() < n {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(out.len());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(n);
    out
}

/// groupcall's focus (`groupcall focus`, pinned to core 0) on a local
/// Synapse: the load peers are Matrix devices of their own (raw
/// client-server API, plaintext to-device signalling, which the bench's
/// focus.toml allows), members of the call naming the focus, calling it
/// with `m.call.invite` as a groupcall client does; subscribers subscribe
/// over the data channel to every track the focus offers.
async fn run_groupcall(args: &BenchFocusArgs, sc: Scenario) -> anyhow::Result<Outcome> {
    let mut local = crate::local::Local::start(None).await?;
    let dir = tempfile::Builder::new()
        .prefix("groupcall-bench-focus-")
        .tempdir()?;
    let r = groupcall_inner(args, sc, &local, dir.path()).await;
    local.stop().await;
    r
}

fn api<'a>(http: &'a reqwest::Client, base: &'a str, u: &'a LoadUser) -> super::floor::Api<'a> {
    super::floor::Api {
        http,
        base,
        user: &u.user,
    }
}

async fn groupcall_inner(
    args: &BenchFocusArgs,
    sc: Scenario,
    local: &crate::local::Local,
    dir: &std::path::Path,
) -> anyhow::Result<Outcome> {
    use super::floor::{Api, User};
    use reqwest::Method;
    let pw = "bench-focus-pw";
    let t = Duration::from_secs(30);
    let http = reqwest::Client::builder().no_proxy().build()?;
    let base = local.url();
    let focus_user = local.register("benchfocus", pw).await?;
    let n = sc.participants();
    let mut users = Vec::new();
    for i in 0..n {
        let u = local
            .synapse
            .register_user(&format!("benchload{i}"), pw)
            .await
            .with_context(|| format!("registering load user {i}"))?;
        users.push(LoadUser {
            user: User {
                user_id: u.user_id,
                device_id: u.device_id,
                token: u.access_token,
            },
            session_id: random_id(16),
            since: None,
        });
    }

    // The focus process. Its downlink estimation is off, as the figures in
    // docs/benchmarks.md were measured: the load publishes unlayered
    // video, so the estimate could move nothing and would only cost CPU.
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{http_port}");
    let config = dir.join("focus.toml");
    std::fs::write(
        &config,
        format!(
            r#"homeserver = "{base}"
user = "{focus_user}"
password_env = "GROUPCALL_BENCH_FOCUS_PASSWORD"
data_dir = "{}"
allow = ["{}"]
allow_plaintext = true
http_listen = "{addr}"
[media]
bind = ["127.0.0.1:0"]
estimate_bandwidth = false
[limits]
max_participants_per_call = {}
[drain]
grace_period = "1s"
"#,
            dir.join("data").display(),
            users[0].user.user_id,
            n + 1
        ),
    )?;
    let log = std::fs::File::create(dir.join("focus.log"))?;
    let exe = std::env::current_exe().context("the groupcall binary")?;
    let mut focus = Command::new("taskset")
        .arg("-c")
        .arg(SUT_CORE.to_string())
        .arg(exe)
        .arg("focus")
        .arg("--config")
        .arg(&config)
        .env("GROUPCALL_BENCH_FOCUS_PASSWORD", pw)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the focus (taskset)")?;
    let pid = focus.id().context("focus pid")?;
    let health = |rooms: u64| {
        let http = http.clone();
        let url = format!("http://{addr}/health");
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(r) = http.get(&url).send().await
                    && let Ok(h) = r.json::<Value>().await
                    && h["state"] == "running"
                    && h["rooms"].as_u64() >= Some(rooms)
                {
                    return Ok::<Value, anyhow::Error>(h);
                }
                if std::time::Instant::now() > deadline {
                    bail!("the focus was not healthy with {rooms} rooms within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let result = async {
        let h = health(0).await?;
        let focus_ref = groupcall_proto::events::FocusRef {
            user_id: h["user_id"].as_str().unwrap_or_default().to_owned(),
            device_id: h["device_id"].as_str().unwrap_or_default().to_owned(),
        };
        // The room and the call.
        let room = api(&http, &base, &users[0])
            .call(
                Method::POST,
                "/createRoom",
                Some(&json!({"preset": "public_chat", "name": "bench focus",
                    "invite": [focus_user],
                    "power_level_content_override": {"events": {
                        "org.matrix.msc3401.call": 0, "org.matrix.msc3401.call.member": 0}}})),
                t,
            )
            .await?["room_id"]
            .as_str()
            .map(str::to_owned)
            .context("createRoom without room_id")?;
        health(1).await?;
        let conf_id = random_id(24);
        api(&http, &base, &users[0])
            .call(
                Method::PUT,
                &format!("/rooms/{room}/state/org.matrix.msc3401.call/{conf_id}"),
                Some(&json!({"m.intent": "m.prompt", "m.type": "m.video"})),
                t,
            )
            .await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for (i, u) in users.iter().enumerate() {
            if i > 0 {
                api(&http, &base, u)
                    .call(Method::POST, &format!("/join/{room}"), Some(&json!({})), t)
                    .await?;
            }
            let publisher = i < usize::from(sc.publishers) || sc.all_to_all;
            let own = groupcall_proto::membership::OwnDevice {
                device_id: u.user.device_id.clone(),
                session_id: u.session_id.clone(),
                feeds: if publisher {
                    vec![groupcall_proto::events::Feed::with_purpose(
                        groupcall_proto::events::FeedPurpose::Usermedia,
                    )]
                } else {
                    Vec::new()
                },
                foci_active: vec![focus_ref.clone()],
                foci_preferred: Vec::new(),
            };
            let content = groupcall_proto::membership::joined_content(
                None,
                &conf_id,
                &own,
                now + 3_600_000,
                now,
            );
            api(&http, &base, u)
                .call(
                    Method::PUT,
                    &format!(
                        "/rooms/{room}/state/org.matrix.msc3401.call.member/{}",
                        u.user.user_id
                    ),
                    Some(&content),
                    t,
                )
                .await?;
        }
        // Each load peer calls the focus, publishers first.
        let mut lg = Loadgen::start().await?;
        let calls = async {
            for (i, u) in users.iter_mut().enumerate() {
                let publisher = i < usize::from(sc.publishers);
                let id = format!("lg{i}");
                let offer = lg
                    .ask(json!({"op": "client", "id": id, "publish": publisher,
                        "video": i < usize::from(sc.video_publishers),
                        "subscribe": !publisher || sc.all_to_all}))
                    .await?;
                let call_id = format!("{now}{}", random_id(16));
                let metadata = if publisher {
                    json!({ id.clone(): {"purpose": "m.usermedia"} })
                } else {
                    json!({})
                };
                let invite = json!({
                    "call_id": call_id, "party_id": u.user.device_id, "version": "1",
                    "conf_id": conf_id, "device_id": u.user.device_id,
                    "sender_session_id": u.session_id, "dest_session_id": "focus",
                    "seq": 0, "lifetime": 60_000, "invitee": focus_ref.user_id,
                    "offer": {"type": "offer", "sdp": offer["offer"]},
                    "sdp_stream_metadata": metadata,
                });
                Api {
                    http: &http,
                    base: &base,
                    user: &u.user,
                }
                .call(
                    Method::PUT,
                    &format!("/sendToDevice/m.call.invite/{}", random_id(20)),
                    Some(&json!({"messages": {focus_ref.user_id.clone(): {
                        focus_ref.device_id.clone(): invite}}})),
                    t,
                )
                .await?;
                let answer = wait_answer(&http, &base, u, &call_id).await?;
                lg.ask(json!({"op": "answer", "id": id, "sdp": answer}))
                    .await?;
            }
            lg.ask(json!({"op": "connected", "timeout_s": 60})).await?;
            // Subscriptions go over the data channels; let them settle.
            lg.ask(json!({"op": "rate", "video_pps": args.start_pps}))
                .await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            let r = ramp(&mut lg, pid, args, &format!("groupcall {sc}"), sc.fanout()).await;
            // The focus's own counts of what it forwarded and dropped.
            if let Ok(resp) = http.get(format!("http://{addr}/metrics")).send().await
                && let Ok(text) = resp.text().await
            {
                let lines: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.contains("{call="))
                    .filter(|l| l.contains("packets") || l.contains("drop"))
                    .collect();
                eprintln!("groupcall focus /metrics:\n{}", lines.join("\n"));
            }
            r
        }
        .await;
        lg.stop().await;
        calls
    }
    .await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    if tokio::time::timeout(Duration::from_secs(10), focus.wait())
        .await
        .is_err()
    {
        let _ = focus.kill().await;
    }
    result.with_context(|| {
        let text = std::fs::read_to_string(dir.join("focus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "focus log:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    })
}

/// Syncs `u`'s device until the focus's `m.call.answer` to `call_id`.
async fn wait_answer(
    http: &reqwest::Client,
    base: &str,
    u: &mut LoadUser,
    call_id: &str,
) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let api = super::floor::Api {
            http,
            base,
            user: &u.user,
        };
        let mut path = format!("/sync?timeout=5000&filter={TO_DEVICE_ONLY}");
        if let Some(s) = &u.since {
            path.push_str("&since=");
            path.push_str(s);
        }
        let body = api
            .call(reqwest::Method::GET, &path, None, Duration::from_secs(15))
            .await?;
        u.since = Some(super::floor::next_batch(&body)?);
        for e in body["to_device"]["events"].as_array().into_iter().flatten() {
            let c = &e["content"];
            if e["type"] == "m.call.answer" && c["call_id"] == call_id {
                return c["answer"]["sdp"]
                    .as_str()
                    .map(str::to_owned)
                    .context("an answer without SDP");
            }
            if e["type"] == "m.call.hangup" && c["call_id"] == call_id {
                bail!("the focus hung up: {c}");
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("no answer from the focus to {call_id} within 30 s");
        }
    }
}
