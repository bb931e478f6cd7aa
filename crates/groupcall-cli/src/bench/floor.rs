//! The floor of call setup, measured in the bench's own run: what no client
//! can beat on this machine, against this Synapse.
//!
//! A call between two participants cannot be set up faster than the time
//! for the caller to learn of the new member (one member-state hop), for
//! its invite to reach the callee (one to-device hop) and for ICE and DTLS
//! to complete (a handshake on loopback). The answer's hop may overlap the
//! handshake (the callee starts its connectivity checks as soon as it has
//! the offer), so it is not counted.
//!
//! - **Member-state hop**: user A sends an `org.matrix.msc3401.call.member`
//!   state event; user B's long-poll `/sync` (parked in Synapse before the
//!   send) returns it. From just before A's `PUT` to B's response.
//! - **To-device hop**: the same with a plaintext `m.call.invite`
//!   to-device message of a real invite's size (about 2 KB) from A to B's
//!   device.
//! - **Handshake**: two `groupcall-media` peers on 127.0.0.1 (one
//!   candidate each, as in the bench): from the answer being in the
//!   callee's hands (its first connectivity check leaves then) to both
//!   reporting `Connected` (ICE checks, DTLS handshake, SRTP keys).
//!
//! Both hops go through the counting proxy, as every client in the bench
//! does, with a raw HTTP client: no client-side processing of the sync
//! response is counted.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use groupcall::media::{MediaPeer, PeerConfig, PeerEvent, PeerEvents};
use serde_json::{Value, json};

use super::stats;
use crate::local::Local;

/// How long the receiver's long poll is given to park in Synapse before the
/// send.
const PARK: Duration = Duration::from_millis(150);
/// The long poll's own timeout, and the limit on one hop.
const POLL: Duration = Duration::from_secs(10);
/// Limit on one handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Median, min and max of one component, in ms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Component {
    /// Median.
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Samples.
    pub count: usize,
}

impl Component {
    fn of(mut v: Vec<f64>) -> Option<Component> {
        let count = v.len();
        stats(&mut v).map(|(median, min, max)| Component {
            median,
            min,
            max,
            count,
        })
    }

    /// `median [min–max]`.
    pub fn show(&self) -> String {
        format!("{:.1} [{:.1}–{:.1}]", self.median, self.min, self.max)
    }
}

/// The floor's components.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    /// One member-state hop.
    pub member_state: Component,
    /// One to-device hop.
    pub to_device: Component,
    /// ICE + DTLS on loopback.
    pub handshake: Component,
}

impl Floor {
    /// The sum of the medians, in ms.
    pub fn total(&self) -> f64 {
        self.member_state.median + self.to_device.median + self.handshake.median
    }

    /// As a JSON object.
    pub fn json(&self) -> Value {
        let c = |c: &Component| json!({"median_ms": c.median, "min_ms": c.min, "max_ms": c.max, "samples": c.count});
        json!({
            "floor_ms": self.total(),
            "member_state_hop": c(&self.member_state),
            "to_device_hop": c(&self.to_device),
            "handshake": c(&self.handshake),
        })
    }
}

/// One user's credentials.
pub(super) struct User {
    pub(super) user_id: String,
    pub(super) device_id: String,
    pub(super) token: String,
}

/// A raw client-server API client of one user, through the proxy.
pub(super) struct Api<'a> {
    pub(super) http: &'a reqwest::Client,
    pub(super) base: &'a str,
    pub(super) user: &'a User,
}

impl Api<'_> {
    pub(super) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/_matrix/client/v3{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.user.token)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .with_context(|| format!("reading the response of {method} {path}"))?;
        if !status.is_success() {
            bail!("{method} {path}: HTTP {status}: {text}");
        }
        serde_json::from_str(&text)
            .with_context(|| format!("{method} {path}: the response is not JSON: {text}"))
    }

    /// One `/sync`; returns the body.
    pub(super) async fn sync(
        &self,
        filter: &str,
        since: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let mut path = format!("/sync?filter={filter}&timeout={}", timeout.as_millis());
        if let Some(s) = since {
            path.push_str("&since=");
            path.push_str(s);
        }
        self.call(reqwest::Method::GET, &path, None, timeout + POLL)
            .await
    }
}

pub(super) fn next_batch(v: &Value) -> anyhow::Result<String> {
    let s = v
        .get("next_batch")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("a /sync response without next_batch"))?;
    // Synapse's tokens are URL-safe (`s12_34_...`); anything else would need
    // encoding in the query.
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '~'))
    {
        bail!("unexpected /sync token {s:?}");
    }
    Ok(s.to_owned())
}

/// What a hop sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hop {
    MemberState,
    ToDevice,
}

/// Samples of the floor's components, in ms.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    member_state: Vec<f64>,
    to_device: Vec<f64>,
    handshake: Vec<f64>,
}

impl Samples {
    /// Adds another set of samples.
    pub fn extend(&mut self, o: &Samples) {
        self.member_state.extend_from_slice(&o.member_state);
        self.to_device.extend_from_slice(&o.to_device);
        self.handshake.extend_from_slice(&o.handshake);
    }

    /// The floor of these samples (`None` without samples of each).
    pub fn floor(&self) -> Option<Floor> {
        Some(Floor {
            member_state: Component::of(self.member_state.clone())?,
            to_device: Component::of(self.to_device.clone())?,
            handshake: Component::of(self.handshake.clone())?,
        })
    }
}

/// Two users in a room of their own, ready to measure hops.
pub struct Prober {
    http: reqwest::Client,
    base: String,
    users: [User; 2],
    room: String,
    filter: String,
    taken: usize,
}

impl Prober {
    /// Registers the two users (`floor{tag}a`, `floor{tag}b`), creates
    /// their room and B's sync filter.
    pub async fn new(local: &Local, tag: &str) -> anyhow::Result<Prober> {
        let password = "floor-pw";
        let mut users = Vec::new();
        for who in ["a", "b"] {
            let name = format!("floor{tag}{who}");
            let u = local
                .synapse
                .register_user(&name, password)
                .await
                .with_context(|| format!("registering {name}"))?;
            users.push(User {
                user_id: u.user_id,
                device_id: u.device_id,
                token: u.access_token,
            });
        }
        let [ua, ub]: [User; 2] = users
            .try_into()
            .map_err(|_| anyhow!("two users expected"))?;
        // Straight to the proxy on 127.0.0.1, whatever HTTP_PROXY says.
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .context("building an HTTP client")?;
        let base = local.url();
        let t = Duration::from_secs(30);
        let (room, filter) = {
            let a = Api {
                http: &http,
                base: &base,
                user: &ua,
            };
            let b = Api {
                http: &http,
                base: &base,
                user: &ub,
            };
            let room = a
                .call(
                    reqwest::Method::POST,
                    "/createRoom",
                    Some(&json!({"preset": "public_chat", "name": "floor"})),
                    t,
                )
                .await?
                .get("room_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("createRoom without room_id"))?;
            b.call(
                reqwest::Method::POST,
                &format!("/join/{room}"),
                Some(&json!({})),
                t,
            )
            .await?;
            let filter = b
                .call(
                    reqwest::Method::POST,
                    &format!("/user/{}/filter", b.user.user_id),
                    Some(&json!({
                        "presence": {"types": []},
                        "account_data": {"types": []},
                        "room": {
                            "timeline": {"limit": 5},
                            "ephemeral": {"types": []},
                            "account_data": {"types": []},
                        },
                    })),
                    t,
                )
                .await?
                .get("filter_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("a filter without filter_id"))?;
            (room, filter)
        };
        Ok(Prober {
            http,
            base,
            users: [ua, ub],
            room,
            filter,
            taken: 0,
        })
    }

    /// `reps` samples of each component.
    pub async fn sample(&mut self, reps: usize) -> anyhow::Result<Samples> {
        let a = Api {
            http: &self.http,
            base: &self.base,
            user: &self.users[0],
        };
        let b = Api {
            http: &self.http,
            base: &self.base,
            user: &self.users[1],
        };
        let mut out = Samples::default();
        // Alternate the two kinds, so that a burst of load elsewhere on the
        // machine hits both alike.
        for _ in 0..reps {
            self.taken += 1;
            let tag = format!("{}", self.taken);
            for hop in [Hop::MemberState, Hop::ToDevice] {
                let ms = one_hop(&a, &b, &self.filter, &self.room, hop, &tag).await?;
                match hop {
                    Hop::MemberState => out.member_state.push(ms),
                    Hop::ToDevice => out.to_device.push(ms),
                }
            }
        }
        for _ in 0..reps {
            out.handshake.push(handshake().await?);
        }
        Ok(out)
    }
}

/// A filler of a real invite's size: its SDP is about 2 KB.
fn sdp_filler() -> String {
    let line = "a=x-floor-filler:0123456789abcdef0123456789abcdef0123456789abcdef\r\n";
    line.repeat(2000 / line.len())
}

/// One hop: from A's send to B's long poll returning it, in ms.
async fn one_hop(
    a: &Api<'_>,
    b: &Api<'_>,
    filter: &str,
    room: &str,
    hop: Hop,
    tag: &str,
) -> anyhow::Result<f64> {
    // A fresh position: everything before this hop is behind it.
    let mut since = next_batch(&b.sync(filter, None, Duration::ZERO).await?)?;
    let marker = format!(
        "floor-{}-{tag}",
        if hop == Hop::MemberState {
            "state"
        } else {
            "todevice"
        }
    );
    let poll = |since: String| {
        let http = b.http.clone();
        let base = b.base.to_owned();
        let token = b.user.token.clone();
        let filter = filter.to_owned();
        tokio::spawn(async move {
            let url = format!(
                "{base}/_matrix/client/v3/sync?filter={filter}&timeout={}&since={since}",
                POLL.as_millis()
            );
            let resp = http
                .get(&url)
                .bearer_auth(token)
                .timeout(POLL + POLL)
                .send()
                .await?;
            let status = resp.status();
            let text = resp.text().await?;
            let at = Instant::now();
            Ok::<_, reqwest::Error>((status, text, at))
        })
    };
    let mut pending = poll(since.clone());
    tokio::time::sleep(PARK).await;
    let t0 = Instant::now();
    match hop {
        Hop::MemberState => {
            a.call(
                reqwest::Method::PUT,
                &format!(
                    "/rooms/{room}/state/org.matrix.msc3401.call.member/{}",
                    a.user.user_id
                ),
                Some(&json!({
                    "m.calls": [],
                    "floor_marker": marker,
                })),
                POLL,
            )
            .await?;
        }
        Hop::ToDevice => {
            let content = json!({
                "call_id": format!("floorcall{tag}"),
                "party_id": a.user.device_id,
                "version": "1",
                "lifetime": 60000,
                "offer": {"type": "offer", "sdp": sdp_filler()},
                "conf_id": "floor",
                "device_id": a.user.device_id,
                "sender_session_id": "floor",
                "dest_session_id": "floor",
                "seq": 0,
                "floor_marker": marker,
            });
            a.call(
                reqwest::Method::PUT,
                &format!("/sendToDevice/m.call.invite/floor{tag}"),
                Some(&json!({
                    "messages": {
                        b.user.user_id.clone(): {b.user.device_id.clone(): content}
                    }
                })),
                POLL,
            )
            .await?;
        }
    }
    let limit = t0 + POLL;
    loop {
        let (status, text, at) = pending
            .await
            .context("the long poll's task")?
            .context("the long poll")?;
        if !status.is_success() {
            bail!("/sync: HTTP {status}: {text}");
        }
        if text.contains(&marker) {
            return Ok(at.saturating_duration_since(t0).as_secs_f64() * 1000.0);
        }
        if at > limit {
            bail!("the receiver's /sync did not return the message within {POLL:?}");
        }
        // Woken by something else (e.g. the previous hop's echo): poll again.
        let v: Value = serde_json::from_str(&text).context("a /sync response is not JSON")?;
        since = next_batch(&v)?;
        pending = poll(since.clone());
    }
}

/// One ICE + DTLS handshake between two peers on 127.0.0.1, in ms.
async fn handshake() -> anyhow::Result<f64> {
    let config = PeerConfig::default();
    let (a, mut a_ev) = MediaPeer::new(config.clone()).await?;
    let (b, mut b_ev) = MediaPeer::new(config).await?;
    let offer = a.create_offer(&[]).await?;
    let answer = b.accept_offer(&offer, &[]).await?;
    // The callee starts its checks now.
    let t0 = Instant::now();
    a.apply_answer(&answer).await?;
    let both = async { tokio::try_join!(connected(&mut a_ev), connected(&mut b_ev)) };
    let r = tokio::time::timeout(HANDSHAKE_LIMIT, both).await;
    let _ = a.close().await;
    let _ = b.close().await;
    let (ta, tb) = r.map_err(|_| anyhow!("no loopback handshake within {HANDSHAKE_LIMIT:?}"))??;
    Ok(ta.max(tb).saturating_duration_since(t0).as_secs_f64() * 1000.0)
}

/// When the peer reports `Connected`.
async fn connected(ev: &mut PeerEvents) -> anyhow::Result<Instant> {
    loop {
        match ev.recv().await {
            Some(PeerEvent::Connected) => return Ok(Instant::now()),
            Some(PeerEvent::Failed | PeerEvent::Closed) | None => {
                bail!("the loopback peer did not connect");
            }
            Some(_) => {}
        }
    }
}
