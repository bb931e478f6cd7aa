//! Janus (Debian's `janus` package) as the anchor of `groupcall bench
//! focus`: started with a configuration of our own (VideoRoom and the HTTP
//! transport only, IPv4, no session timeout; libnice leaves loopback out,
//! so its candidates are the machine's own addresses) in a temporary
//! directory, pinned to a core, and driven through its HTTP API (sessions,
//! handles, rooms, publishers, subscribers; JSEP without trickle).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// Where Debian installs Janus's modules.
const LIB: &str = "/usr/lib/x86_64-linux-gnu/janus";

/// Plugins and transports switched off: everything but VideoRoom and HTTP.
const OFF_PLUGINS: &str = "libjanus_audiobridge.so,libjanus_echotest.so,libjanus_nosip.so,\
libjanus_recordplay.so,libjanus_sip.so,libjanus_streaming.so,libjanus_textroom.so,\
libjanus_videocall.so,libjanus_voicemail.so,libjanus_duktape.so,libjanus_lua.so";
const OFF_TRANSPORTS: &str = "libjanus_websockets.so,libjanus_pfunix.so,libjanus_mqtt.so,\
libjanus_nanomsg.so,libjanus_rabbitmq.so";

/// A running Janus.
pub struct Janus {
    child: Child,
    /// `http://127.0.0.1:PORT/janus`.
    base: String,
    http: reqwest::Client,
    /// Its configuration and log.
    dir: tempfile::TempDir,
    next_tx: u64,
}

/// The Janus binary, or why it is missing.
pub fn binary() -> anyhow::Result<PathBuf> {
    let p = PathBuf::from("/usr/bin/janus");
    if p.exists() {
        Ok(p)
    } else {
        bail!("janus is not installed (apt-get install janus; scripts/setup-system does it)")
    }
}

/// A free TCP port on loopback (for Janus's HTTP transport).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn write_config(dir: &Path, http_port: u16, rtp_ports: (u16, u16)) -> anyhow::Result<()> {
    let d = dir.display();
    std::fs::write(
        dir.join("janus.jcfg"),
        format!(
            r#"general: {{
	configs_folder = "{d}"
	plugins_folder = "{LIB}/plugins"
	transports_folder = "{LIB}/transports"
	events_folder = "{LIB}/events"
	loggers_folder = "{LIB}/loggers"
	debug_level = 3
	session_timeout = 0
}}
media: {{
	ipv6 = false
	rtp_port_range = "{}-{}"
}}
nat: {{
	ignore_mdns = true
}}
plugins: {{
	disable = "{OFF_PLUGINS}"
}}
transports: {{
	disable = "{OFF_TRANSPORTS}"
}}
events: {{
	broadcast = false
}}
loggers: {{
	disable = "libjanus_jsonlog.so"
}}
"#,
            rtp_ports.0, rtp_ports.1
        ),
    )?;
    std::fs::write(
        dir.join("janus.transport.http.jcfg"),
        format!(
            "general: {{\n\tjson = \"compact\"\n\tbase_path = \"/janus\"\n\thttp = true\n\tport = {http_port}\n\tip = \"127.0.0.1\"\n\thttps = false\n}}\nadmin: {{\n\tadmin_http = false\n}}\n"
        ),
    )?;
    std::fs::write(dir.join("janus.plugin.videoroom.jcfg"), "general: {\n}\n")?;
    Ok(())
}

impl Janus {
    /// Starts Janus pinned to `core` (with `taskset`) and waits until its
    /// HTTP API answers.
    pub async fn start(core: usize) -> anyhow::Result<Janus> {
        let bin = binary()?;
        let dir = tempfile::Builder::new()
            .prefix("groupcall-janus-")
            .tempdir()?;
        let port = free_port()?;
        write_config(dir.path(), port, (42_000, 43_999))?;
        let log = std::fs::File::create(dir.path().join("janus.log"))?;
        let child = Command::new("taskset")
            .arg("-c")
            .arg(core.to_string())
            .arg(bin)
            .arg("-C")
            .arg(dir.path().join("janus.jcfg"))
            .arg("-F")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting janus with taskset")?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(40))
            .build()?;
        let mut j = Janus {
            child,
            base: format!("http://127.0.0.1:{port}/janus"),
            http,
            dir,
            next_tx: 0,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = j.http.get(format!("{}/info", j.base)).send().await
                && r.status().is_success()
            {
                return Ok(j);
            }
            if let Ok(Some(status)) = j.child.try_wait() {
                bail!("janus exited with {status} at start:\n{}", j.log_tail());
            }
            if std::time::Instant::now() > deadline {
                bail!("janus did not answer within 20 s:\n{}", j.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The process id (CPU time is read from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The end of Janus's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("janus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn tx(&mut self) -> String {
        self.next_tx += 1;
        format!("t{}", self.next_tx)
    }

    /// POSTs `body` (a transaction added) to `path` under the API root;
    /// returns the reply, failing on `"janus": "error"`.
    async fn post(&mut self, path: &str, mut body: Value) -> anyhow::Result<Value> {
        body["transaction"] = json!(self.tx());
        let r: Value = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("janus {path}"))?
            .json()
            .await
            .with_context(|| format!("janus {path}: reply"))?;
        if r["janus"] == "error" {
            bail!("janus {path}: {}", r["error"]);
        }
        Ok(r)
    }

    /// A new session.
    pub async fn session(&mut self) -> anyhow::Result<u64> {
        let r = self.post("", json!({"janus": "create"})).await?;
        r["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("janus create: no session id in {r}"))
    }

    /// A VideoRoom handle in `session`.
    pub async fn attach(&mut self, session: u64) -> anyhow::Result<u64> {
        let r = self
            .post(
                &format!("/{session}"),
                json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}),
            )
            .await?;
        r["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("janus attach: no handle id in {r}"))
    }

    /// A synchronous VideoRoom request (`create`, ...): its plugin data.
    pub async fn request(
        &mut self,
        session: u64,
        handle: u64,
        body: Value,
    ) -> anyhow::Result<Value> {
        let r = self
            .post(
                &format!("/{session}/{handle}"),
                json!({"janus": "message", "body": body}),
            )
            .await?;
        let data = r["plugindata"]["data"].clone();
        if data["videoroom"] == "event" && data.get("error").is_some() {
            bail!("videoroom: {}", data["error"]);
        }
        Ok(data)
    }

    /// An asynchronous VideoRoom request with optional JSEP: waits (long
    /// poll) for the handle's event that answers it and returns it whole
    /// (`plugindata` and `jsep`).
    pub async fn request_async(
        &mut self,
        session: u64,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut msg = json!({"janus": "message", "body": body});
        if let Some(j) = jsep {
            msg["jsep"] = j;
        }
        let tx = self.tx();
        msg["transaction"] = json!(tx);
        let r: Value = self
            .http
            .post(format!("{}/{session}/{handle}", self.base))
            .json(&msg)
            .send()
            .await?
            .json()
            .await?;
        if r["janus"] == "error" {
            bail!("janus message: {}", r["error"]);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let events: Value = self
                .http
                .get(format!("{}/{session}?maxev=20", self.base))
                .send()
                .await?
                .json()
                .await?;
            let list = match events {
                Value::Array(a) => a,
                other => vec![other],
            };
            for e in list {
                if e["transaction"] == tx.as_str() && e["janus"] == "event" {
                    let data = &e["plugindata"]["data"];
                    if let Some(err) = data.get("error") {
                        bail!("videoroom: {err}");
                    }
                    return Ok(e);
                }
            }
            if std::time::Instant::now() > deadline {
                bail!("janus: no answer to {tx} within 30 s");
            }
        }
    }

    /// Stops Janus (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(r) => {
                r?;
            }
            Err(_) => {
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}

/// The publisher's SDP answer and its id, after `join` + `publish`.
pub struct Published {
    /// The publisher's id in the room (subscribers name it as `feed`).
    pub id: u64,
    /// Janus's answer.
    pub answer: String,
}

impl Janus {
    /// Creates room `room` for `publishers` publishers, VP8 and Opus.
    pub async fn create_room(
        &mut self,
        session: u64,
        handle: u64,
        room: u64,
        publishers: usize,
    ) -> anyhow::Result<()> {
        let r = self
            .request(
                session,
                handle,
                json!({"request": "create", "room": room, "publishers": publishers,
                    "videocodec": "vp8", "audiocodec": "opus", "bitrate": 0,
                    "fir_freq": 0, "notify_joining": false, "audiolevel_event": false}),
            )
            .await?;
        if r["videoroom"] != "created" {
            bail!("videoroom create: {r}");
        }
        Ok(())
    }

    /// Joins `handle` to `room` as a publisher and publishes `offer`.
    pub async fn publish(
        &mut self,
        session: u64,
        handle: u64,
        room: u64,
        offer: &str,
    ) -> anyhow::Result<Published> {
        let joined = self
            .request_async(
                session,
                handle,
                json!({"request": "join", "room": room, "ptype": "publisher"}),
                None,
            )
            .await?;
        let id = joined["plugindata"]["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("videoroom join: no id in {joined}"))?;
        let e = self
            .request_async(
                session,
                handle,
                json!({"request": "publish", "audio": true, "video": true}),
                Some(json!({"type": "offer", "sdp": offer, "trickle": false})),
            )
            .await?;
        let answer = e["jsep"]["sdp"]
            .as_str()
            .ok_or_else(|| anyhow!("videoroom publish: no answer in {e}"))?
            .to_owned();
        Ok(Published { id, answer })
    }

    /// Joins `handle` to `room` as a subscriber of every stream of `feeds`
    /// (one multistream PeerConnection): Janus's offer.
    pub async fn subscribe(
        &mut self,
        session: u64,
        handle: u64,
        room: u64,
        feeds: &[u64],
    ) -> anyhow::Result<String> {
        let streams: Vec<Value> = feeds.iter().map(|f| json!({"feed": f})).collect();
        let e = self
            .request_async(
                session,
                handle,
                json!({"request": "join", "room": room, "ptype": "subscriber",
                    "streams": streams}),
                None,
            )
            .await?;
        e["jsep"]["sdp"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("videoroom subscribe: no offer in {e}"))
    }

    /// Starts a subscription with our answer.
    pub async fn start_subscription(
        &mut self,
        session: u64,
        handle: u64,
        answer: &str,
    ) -> anyhow::Result<()> {
        self.request_async(
            session,
            handle,
            json!({"request": "start"}),
            Some(json!({"type": "answer", "sdp": answer, "trickle": false})),
        )
        .await?;
        Ok(())
    }
}
