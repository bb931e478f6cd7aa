//! A deterministic in-memory world for orchestrators: a homeserver that
//! echoes state and relays to-device messages with seeded delay, reordering
//! and duplication, and a fake media layer that answers at once and
//! "connects" two peers when each has the other's description.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use groupcall_proto::ids::IdGen;
use groupcall_proto::*;
use serde_json::{Value, json};

pub struct Faults {
    /// Max to-device delay (ms); min is 5.
    pub max_delay: u64,
    /// Percent of to-device messages delivered twice.
    pub dup_percent: u64,
    /// Percent of to-device messages dropped.
    pub drop_percent: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            max_delay: 300,
            dup_percent: 10,
            drop_percent: 0,
        }
    }
}

#[derive(Default)]
pub struct FakePeer {
    pub remote: Option<(usize, PeerHandle)>,
    pub closed: bool,
    pub connected: bool,
}

pub struct Node {
    pub call: GroupCall,
    pub key: DeviceKey,
    pub media: BTreeMap<PeerHandle, FakePeer>,
    pub joined: bool,
}

enum Ev {
    State(usize, Value),
    ToDevice(usize, IncomingToDevice),
    Media(usize, MediaEvent),
    Published(usize),
    Cmd(usize, Command),
}

pub struct InviteRecord {
    pub from: DeviceKey,
    pub to: DeviceKey,
    pub at: u64,
}

pub struct World {
    pub now: u64,
    pub nodes: Vec<Node>,
    rng: IdGen,
    faults: Faults,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Ev>,
    seq: u64,
    state_last: Vec<u64>,
    /// The homeserver's current state: (type, state_key) -> event.
    published: BTreeMap<(String, String), Value>,
    pub invites: Vec<InviteRecord>,
    /// (from node, to node) -> to-device messages sent.
    pub sent: BTreeMap<(usize, usize), u64>,
    pub log: Vec<String>,
}

pub const T0: u64 = 1_700_000_000_000;

impl World {
    /// `users[i]` is the user of node i; device ids are `DEV{i}`.
    pub fn new(seed: u64, users: &[&str], faults: Faults) -> Self {
        Self::with_config(seed, users, faults, |_| {})
    }

    /// [`World::new`] with every participant's [`Config`] adjusted by `f`.
    pub fn with_config(seed: u64, users: &[&str], faults: Faults, f: impl Fn(&mut Config)) -> Self {
        let mut nodes = Vec::new();
        for (i, u) in users.iter().enumerate() {
            let mut cfg = Config::new(*u, format!("DEV{i}"));
            cfg.seed = seed.wrapping_mul(1000).wrapping_add(i as u64);
            f(&mut cfg);
            nodes.push(Node {
                key: DeviceKey::new(*u, format!("DEV{i}")),
                call: GroupCall::new(cfg),
                media: BTreeMap::new(),
                joined: false,
            });
        }
        let n = nodes.len();
        let mut w = World {
            now: T0,
            nodes,
            rng: IdGen::new(seed ^ 0x5EED),
            faults,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            state_last: vec![T0; n],
            published: BTreeMap::new(),
            invites: Vec::new(),
            sent: BTreeMap::new(),
            log: Vec::new(),
        };
        let mut users_sorted: Vec<&str> = users.to_vec();
        users_sorted.sort();
        users_sorted.dedup();
        for u in users_sorted {
            let ev = json!({"type": "m.room.member", "state_key": u, "sender": u, "origin_server_ts": T0,
                "content": {"membership": "join"}});
            w.published
                .insert(("m.room.member".into(), u.into()), ev.clone());
            for i in 0..n {
                w.nodes[i].call.handle_state(T0, &ev).unwrap();
            }
        }
        w
    }

    pub fn rand(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.rng.next_u64() % n }
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert(self.seq, ev);
        self.queue.push(Reverse((at, self.seq)));
    }

    pub fn command_at(&mut self, at: u64, node: usize, cmd: Command) {
        self.push(at, Ev::Cmd(node, cmd));
    }

    fn node_of(&self, user: &str, device: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.key.user_id == user && n.key.device_id == device)
    }

    /// Runs until `until` (absolute ms).
    pub fn run_until(&mut self, until: u64) {
        loop {
            let next_ev = self.queue.peek().map(|Reverse((t, _))| *t);
            let next_timer = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(i, n)| n.call.poll_timeout().map(|t| (t, i)))
                .min();
            let t_ev = next_ev.unwrap_or(u64::MAX);
            let t_tm = next_timer.map(|(t, _)| t).unwrap_or(u64::MAX);
            let t = t_ev.min(t_tm);
            if t > until {
                self.now = until;
                return;
            }
            self.now = self.now.max(t);
            if t_ev <= t_tm {
                let Reverse((_, id)) = self.queue.pop().unwrap();
                let ev = self.events.remove(&id).unwrap();
                self.deliver(ev);
            } else {
                let (_, i) = next_timer.unwrap();
                let now = self.now;
                self.nodes[i].call.handle_timeout(now);
                self.drain(i);
            }
        }
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now;
        let i = match ev {
            Ev::State(i, v) => {
                self.nodes[i].call.handle_state(now, &v).unwrap();
                i
            }
            Ev::ToDevice(i, m) => {
                self.nodes[i].call.handle_to_device(now, m);
                i
            }
            Ev::Media(i, m) => {
                self.nodes[i].call.handle_media(now, m);
                i
            }
            Ev::Published(i) => {
                self.nodes[i].call.handle_membership_published(now);
                i
            }
            Ev::Cmd(i, c) => {
                match &c {
                    Command::Join { .. } => self.nodes[i].joined = true,
                    Command::Leave | Command::Terminate => self.nodes[i].joined = false,
                    _ => {}
                }
                if let Err(e) = self.nodes[i].call.handle_command(now, c) {
                    self.log.push(format!("{now} node{i} command error {e}"));
                }
                i
            }
        };
        self.drain(i);
    }

    fn drain(&mut self, i: usize) {
        while let Some(out) = self.nodes[i].call.poll_output() {
            let now = self.now;
            match out {
                Output::Signalling(_) => {}
                Output::PublishState {
                    event_type,
                    state_key,
                    content,
                } => {
                    let is_member = event_type.ends_with("call.member");
                    let ev = json!({"type": event_type, "state_key": state_key,
                        "sender": self.nodes[i].key.user_id, "origin_server_ts": now, "content": content});
                    self.published
                        .insert((event_type.clone(), state_key.clone()), ev.clone());
                    for j in 0..self.nodes.len() {
                        let d = 30 + self.rand(120);
                        let at = (now + d).max(self.state_last[j]);
                        self.state_last[j] = at;
                        self.push(at, Ev::State(j, ev.clone()));
                    }
                    if is_member {
                        let d = 10 + self.rand(30);
                        self.push(now + d, Ev::Published(i));
                    }
                }
                Output::ToDevice(batch) => {
                    for m in batch.messages {
                        let Some(j) = self.node_of(&m.user_id, &m.device_id) else {
                            continue;
                        };
                        *self.sent.entry((i, j)).or_default() += 1;
                        if batch.event_type == "m.call.invite" {
                            self.invites.push(InviteRecord {
                                from: self.nodes[i].key.clone(),
                                to: self.nodes[j].key.clone(),
                                at: now,
                            });
                        }
                        self.log.push(format!(
                            "{now} node{i} -> node{j} {} {}",
                            batch.event_type, m.content["call_id"]
                        ));
                        if self.rand(100) < self.faults.drop_percent {
                            continue;
                        }
                        let copies = if self.rand(100) < self.faults.dup_percent {
                            2
                        } else {
                            1
                        };
                        for _ in 0..copies {
                            let d = 5 + self.rand(self.faults.max_delay);
                            let msg = IncomingToDevice {
                                sender: self.nodes[i].key.user_id.clone(),
                                sender_device: Some(self.nodes[i].key.device_id.clone()),
                                event_type: batch.event_type.clone(),
                                content: m.content.clone(),
                                encrypted: true,
                            };
                            self.push(now + d, Ev::ToDevice(j, msg));
                        }
                    }
                }
                Output::Media(req) => self.media(i, req),
                Output::Event(e) => self.log.push(format!("{now} node{i} {e:?}")),
                other => panic!("the simulation does not know {other:?}"),
            }
        }
    }

    fn parse_fake(sdp: &str) -> Option<(usize, PeerHandle)> {
        let mut it = sdp.strip_prefix("fake:")?.split(':');
        let n = it.next()?.parse().ok()?;
        let h = it.next()?.parse().ok()?;
        Some((n, PeerHandle(h)))
    }

    fn media(&mut self, i: usize, req: MediaRequest) {
        let now = self.now;
        match req {
            MediaRequest::CreateOffer { peer, .. } => {
                self.nodes[i].media.entry(peer).or_default();
                let sdp = format!("fake:{i}:{}", peer.0);
                let d = 1 + self.rand(5);
                self.push(
                    now + d,
                    Ev::Media(
                        i,
                        MediaEvent::OfferCreated {
                            peer,
                            sdp,
                            gathering_complete: true,
                        },
                    ),
                );
            }
            MediaRequest::AcceptOffer { peer, sdp, .. } => {
                let fp = self.nodes[i].media.entry(peer).or_default();
                fp.remote = Self::parse_fake(&sdp);
                let sdp = format!("fake:{i}:{}", peer.0);
                let d = 1 + self.rand(5);
                self.push(
                    now + d,
                    Ev::Media(
                        i,
                        MediaEvent::AnswerCreated {
                            peer,
                            sdp,
                            gathering_complete: true,
                        },
                    ),
                );
                self.check_link(i, peer);
            }
            MediaRequest::ApplyAnswer { peer, sdp } => {
                let fp = self.nodes[i].media.entry(peer).or_default();
                fp.remote = Self::parse_fake(&sdp);
                self.check_link(i, peer);
            }
            MediaRequest::AddRemoteCandidates { .. } | MediaRequest::SetMuted { .. } => {}
            MediaRequest::ClosePeer { peer } => {
                let remote = self.nodes[i].media.get(&peer).and_then(|p| p.remote);
                if let Some(fp) = self.nodes[i].media.get_mut(&peer) {
                    fp.closed = true;
                }
                if let Some((j, hj)) = remote {
                    self.fail_later(j, hj, i, peer);
                }
            }
            other => panic!("the simulation does not know {other:?}"),
        }
    }

    /// The far side of a closed peer notices (ICE consent) after 3 s.
    fn fail_later(&mut self, j: usize, hj: PeerHandle, i: usize, h: PeerHandle) {
        let linked = self.nodes[j]
            .media
            .get(&hj)
            .is_some_and(|p| p.remote == Some((i, h)) && p.connected && !p.closed);
        if linked {
            let now = self.now;
            self.push(
                now + 3000,
                Ev::Media(
                    j,
                    MediaEvent::State {
                        peer: hj,
                        state: MediaState::Failed,
                    },
                ),
            );
        }
    }

    fn check_link(&mut self, i: usize, h: PeerHandle) {
        let now = self.now;
        let Some(fp) = self.nodes[i].media.get(&h) else {
            return;
        };
        let Some((j, hj)) = fp.remote else { return };
        if fp.closed || fp.connected {
            return;
        }
        let ok = self.nodes[j]
            .media
            .get(&hj)
            .is_some_and(|p| p.remote == Some((i, h)) && !p.closed);
        if ok {
            self.nodes[i].media.get_mut(&h).unwrap().connected = true;
            self.nodes[j].media.get_mut(&hj).unwrap().connected = true;
            self.push(
                now + 2,
                Ev::Media(
                    i,
                    MediaEvent::State {
                        peer: h,
                        state: MediaState::Connected,
                    },
                ),
            );
            self.push(
                now + 2,
                Ev::Media(
                    j,
                    MediaEvent::State {
                        peer: hj,
                        state: MediaState::Connected,
                    },
                ),
            );
        }
    }

    /// Replaces node `i` by a fresh participant on the same device (a crash
    /// and restart): its media peers vanish without hangups.
    pub fn restart_node(&mut self, i: usize) {
        let key = self.nodes[i].key.clone();
        let mut cfg = Config::new(key.user_id.clone(), key.device_id.clone());
        cfg.seed = 999_999 + i as u64;
        let mut call = GroupCall::new(cfg);
        let now = self.now;
        for v in self.published.values() {
            let _ = call.handle_state(now, v);
        }
        while call.poll_output().is_some() {}
        let closed: Vec<(PeerHandle, Option<(usize, PeerHandle)>)> = self.nodes[i]
            .media
            .iter()
            .filter(|(_, p)| !p.closed)
            .map(|(h, p)| (*h, p.remote))
            .collect();
        for (h, remote) in closed {
            if let Some(fp) = self.nodes[i].media.get_mut(&h) {
                fp.closed = true;
            }
            if let Some((j, hj)) = remote {
                self.fail_later(j, hj, i, h);
            }
        }
        self.nodes[i].call = call;
        self.nodes[i].joined = false;
    }

    /// Checks that every pair of joined nodes is connected exactly once, to
    /// each other. Returns a description of the first problem.
    pub fn check_full_mesh(&self) -> Result<(), String> {
        let joined: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].joined)
            .collect();
        for &a in &joined {
            let peers = self.nodes[a].call.peers();
            for &b in &joined {
                if a == b {
                    continue;
                }
                let bk = &self.nodes[b].key;
                let mine: Vec<_> = peers.iter().filter(|(k, _, _)| k == bk).collect();
                if mine.len() != 1 {
                    return Err(format!("node{a} has {} peers for node{b}", mine.len()));
                }
                let (_, h, connected) = mine[0];
                if !connected {
                    return Err(format!("node{a}'s peer for node{b} is not connected"));
                }
                let fp = self.nodes[a].media.get(h).ok_or("no media peer")?;
                let Some((j, hj)) = fp.remote else {
                    return Err(format!("node{a} peer {h:?} has no remote"));
                };
                if j != b {
                    return Err(format!("node{a}'s peer for node{b} is linked to node{j}"));
                }
                let back = self.nodes[b].call.peers();
                if !back
                    .iter()
                    .any(|(k, h2, c)| *k == self.nodes[a].key && *h2 == hj && *c)
                {
                    return Err(format!(
                        "node{b}'s live peer for node{a} is not the one node{a} is linked to"
                    ));
                }
            }
            let extra = peers
                .iter()
                .filter(|(k, _, _)| !joined.iter().any(|&b| self.nodes[b].key == *k))
                .count();
            if extra > 0 {
                return Err(format!(
                    "node{a} has {extra} peers with nodes not in the call"
                ));
            }
        }
        Ok(())
    }
}
