//! Folds the participants' observations into the state of every pair:
//! when both had joined, when they were connected, when the first frames
//! arrived each way, and the totals.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::peers::{Kind, Obs, What};

/// Received media of one direction (at `to`, from `from`).
#[derive(Debug, Default, Clone)]
pub struct Direction {
    /// The first frame of any kind.
    pub first_frame: Option<Instant>,
    /// The first audio frame.
    pub first_audio: Option<Instant>,
    /// The first video frame.
    pub first_video: Option<Instant>,
    /// Latest totals per (stream, kind): frames and bytes.
    pub tracks: BTreeMap<(String, Kind), (u64, Option<u64>)>,
    /// When the total of frames last grew.
    pub last_frame: Option<Instant>,
}

impl Direction {
    /// When both audio and video had arrived.
    pub fn both_kinds(&self) -> Option<Instant> {
        Some(self.first_audio?.max(self.first_video?))
    }

    /// Total frames.
    pub fn frames(&self) -> u64 {
        self.tracks.values().map(|(f, _)| f).sum()
    }

    /// Total bytes, when every track says.
    pub fn bytes(&self) -> Option<u64> {
        self.tracks.values().map(|(_, b)| *b).sum()
    }
}

/// Something worth telling the user about, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Participant joined.
    Joined(usize),
    /// Both sides of pair (a, b) report connected.
    Connected(usize, usize),
    /// The first frame from `from` arrived at `to`.
    FirstFrame {
        /// Sender.
        from: usize,
        /// Receiver.
        to: usize,
    },
    /// Pair (a, b) has audio and video both ways.
    PairUp(usize, usize),
    /// Every pair is up.
    MeshUp,
    /// A peer connection failed or closed.
    PeerDown {
        /// Where it was seen.
        at: usize,
        /// The remote.
        remote: usize,
        /// State and reason.
        why: String,
    },
}

/// The state of every pair.
pub struct Tracker {
    /// Participant names.
    pub names: Vec<String>,
    /// When the first participant started joining.
    pub origin: Instant,
    user_idx: HashMap<String, usize>,
    /// When each joined.
    pub joined: Vec<Option<Instant>>,
    /// (at, remote) -> when `at` first saw the peer connected.
    connected: HashMap<(usize, usize), Instant>,
    /// (at, remote) -> last state.
    states: HashMap<(usize, usize), String>,
    /// (to, from) -> received media.
    dirs: HashMap<(usize, usize), Direction>,
    pairs_up: usize,
    mesh_up: Option<Instant>,
    /// The latest observation.
    latest: Option<Instant>,
    /// "Recent media" is judged at this moment (default: the latest
    /// observation), see [`Tracker::judge_recent_at`].
    recent_at: Option<Instant>,
    /// Recordings made.
    pub recordings: Vec<std::path::PathBuf>,
    /// The foci's user ids, when participants use foci (several with
    /// cascading foci, each participant connected to one).
    focus_users: Vec<String>,
    /// Which participants go through a focus.
    via_focus: Vec<bool>,
    /// Participant -> when it first saw its peer with the focus connected.
    focus_connected: HashMap<usize, Instant>,
    /// Pairs (a < b) that are not expected to meet (a device without a
    /// focus and one that uses only the focus): not counted.
    unreachable: std::collections::HashSet<(usize, usize)>,
}

/// One pair's figures; times in ms since the later of the two joins
/// (`start_ms` is since the origin).
#[derive(Debug, Clone)]
pub struct PairSummary {
    /// First participant.
    pub a: usize,
    /// Second participant.
    pub b: usize,
    /// The later join, ms since the origin.
    pub start_ms: Option<f64>,
    /// Both sides connected.
    pub connected_ms: Option<f64>,
    /// First frame a -> b.
    pub first_ab_ms: Option<f64>,
    /// First frame b -> a.
    pub first_ba_ms: Option<f64>,
    /// Audio and video a -> b.
    pub media_ab_ms: Option<f64>,
    /// Audio and video b -> a.
    pub media_ba_ms: Option<f64>,
    /// Frames a -> b (as received by b).
    pub frames_ab: u64,
    /// Frames b -> a.
    pub frames_ba: u64,
    /// Bytes a -> b, when b says.
    pub bytes_ab: Option<u64>,
    /// Bytes b -> a.
    pub bytes_ba: Option<u64>,
    /// Last peer state at a and at b.
    pub states: (String, String),
    /// Frames arrived both ways within [`RECENT`] before the moment of
    /// judgement ([`Tracker::judge_recent_at`]): media had not stopped.
    pub media_recent: bool,
}

impl PairSummary {
    /// Connected with audio and video both ways.
    pub fn up(&self) -> bool {
        self.media_ab_ms.is_some() && self.media_ba_ms.is_some()
    }
}

/// How recent the last frames of both directions of a pair must be for
/// its media to count as still flowing.
pub const RECENT: Duration = Duration::from_secs(3);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Tracker {
    /// A tracker for these participants.
    pub fn new(names: Vec<String>, origin: Instant) -> Tracker {
        let n = names.len();
        Tracker {
            names,
            origin,
            user_idx: HashMap::new(),
            joined: vec![None; n],
            connected: HashMap::new(),
            states: HashMap::new(),
            dirs: HashMap::new(),
            pairs_up: 0,
            mesh_up: None,
            latest: None,
            recent_at: None,
            recordings: Vec::new(),
            focus_users: Vec::new(),
            via_focus: vec![false; n],
            focus_connected: HashMap::new(),
            unreachable: std::collections::HashSet::new(),
        }
    }

    /// Pair (a, b) cannot meet (e.g. a reference peer, which has no focus
    /// mode, and the focus-only Chromium client): it is left out of
    /// [`Tracker::pairs`].
    pub fn set_unreachable(&mut self, a: usize, b: usize) {
        self.unreachable.insert((a.min(b), a.max(b)));
    }

    /// Participants `members` meet through the focus `user_id`: a pair of
    /// them is connected once both are connected to the focus. Called once
    /// per focus with cascading foci: a pair of participants of two linked
    /// foci is connected once both are connected to their own.
    pub fn set_focus(&mut self, user_id: &str, members: impl IntoIterator<Item = usize>) {
        if !self.focus_users.iter().any(|u| u == user_id) {
            self.focus_users.push(user_id.to_owned());
        }
        for i in members {
            if let Some(v) = self.via_focus.get_mut(i) {
                *v = true;
            }
        }
    }

    /// Whether pair (a, b) meets through the focus.
    pub fn through_focus(&self, a: usize, b: usize) -> bool {
        let via = |i: usize| self.via_focus.get(i).copied().unwrap_or(false);
        !self.focus_users.is_empty() && via(a) && via(b)
    }

    /// Participant `at` is connected to the focus: every pair of it with
    /// another participant connected to the focus is connected.
    fn focus_up(&mut self, at: usize, when: Instant, out: &mut Vec<Progress>) {
        if self.focus_connected.contains_key(&at) {
            return;
        }
        self.focus_connected.insert(at, when);
        let mut others: Vec<usize> = self
            .focus_connected
            .keys()
            .copied()
            .filter(|r| *r != at && self.through_focus(at, *r))
            .collect();
        others.sort_unstable();
        for r in others {
            if !self.connected.contains_key(&(at, r)) {
                self.connected.insert((at, r), when);
                self.connected.insert((r, at), when);
                self.states
                    .insert((at, r), "connected (through the focus)".into());
                self.states
                    .insert((r, at), "connected (through the focus)".into());
                out.push(Progress::Connected(at.min(r), at.max(r)));
            }
        }
    }

    /// Number of participants.
    pub fn n(&self) -> usize {
        self.names.len()
    }

    /// Every unordered pair (but those set unreachable).
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        let n = self.n();
        (0..n)
            .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
            .filter(|p| !self.unreachable.contains(p))
            .collect()
    }

    /// Tells which participant a user id belongs to.
    pub fn set_identity(&mut self, idx: usize, user_id: &str) {
        self.user_idx.insert(user_id.to_owned(), idx);
    }

    /// When the last participant joined (once all have).
    pub fn all_joined(&self) -> Option<Instant> {
        self.joined
            .iter()
            .copied()
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().max())
    }

    /// When every pair was up.
    pub fn mesh_up(&self) -> Option<Instant> {
        self.mesh_up
    }

    /// Judges "recent media" ([`PairSummary::media_recent`]) at `at`
    /// instead of at the latest observation: the end of the media time,
    /// before anyone leaves.
    pub fn judge_recent_at(&mut self, at: Instant) {
        self.recent_at = Some(at);
    }

    /// Takes one observation in; returns what became true.
    pub fn apply(&mut self, o: &Obs) -> Vec<Progress> {
        let mut out = Vec::new();
        let at = o.idx;
        self.latest = Some(self.latest.map_or(o.at, |l| l.max(o.at)));
        match &o.what {
            What::Identity(u) => self.set_identity(at, u),
            What::Joined => {
                if let Some(slot) = self.joined.get_mut(at)
                    && slot.is_none()
                {
                    *slot = Some(o.at);
                    out.push(Progress::Joined(at));
                }
            }
            What::Peer {
                remote,
                state,
                reason,
            } => {
                if self.focus_users.iter().any(|u| u == remote) {
                    if state == "connected" && self.via_focus.get(at).copied().unwrap_or(false) {
                        self.focus_up(at, o.at, &mut out);
                    }
                    return out;
                }
                let Some(&r) = self.user_idx.get(remote) else {
                    return out;
                };
                let text = match reason {
                    Some(why) => format!("{state} ({why})"),
                    None => state.clone(),
                };
                self.states.insert((at, r), text.clone());
                if state == "connected" && !self.connected.contains_key(&(at, r)) {
                    self.connected.insert((at, r), o.at);
                    if self.connected.contains_key(&(r, at)) {
                        out.push(Progress::Connected(at.min(r), at.max(r)));
                    }
                }
                if matches!(state.as_str(), "failed" | "closed" | "ended") {
                    out.push(Progress::PeerDown {
                        at,
                        remote: r,
                        why: text,
                    });
                }
            }
            What::Frames {
                remote,
                stream,
                kind,
                frames,
                bytes,
            } => {
                let Some(&from) = self.user_idx.get(remote) else {
                    return out;
                };
                let d = self.dirs.entry((at, from)).or_default();
                let before = d.frames();
                d.tracks.insert((stream.clone(), *kind), (*frames, *bytes));
                if d.frames() > before {
                    d.last_frame = Some(o.at);
                }
                if *frames > 0 {
                    if d.first_frame.is_none() {
                        d.first_frame = Some(o.at);
                        out.push(Progress::FirstFrame { from, to: at });
                    }
                    let had_both = d.both_kinds().is_some();
                    match kind {
                        Kind::Audio => {
                            d.first_audio.get_or_insert(o.at);
                        }
                        Kind::Video => {
                            d.first_video.get_or_insert(o.at);
                        }
                    }
                    if !had_both && d.both_kinds().is_some() {
                        let other = self.dirs.get(&(from, at)).and_then(Direction::both_kinds);
                        let counted = !self.unreachable.contains(&(at.min(from), at.max(from)));
                        if other.is_some() && counted {
                            self.pairs_up += 1;
                            out.push(Progress::PairUp(at.min(from), at.max(from)));
                            if self.pairs_up == self.pairs().len() && self.mesh_up.is_none() {
                                self.mesh_up = Some(o.at);
                                out.push(Progress::MeshUp);
                            }
                        }
                    }
                }
            }
            What::Recorded(p) => self.recordings.push(p.clone()),
            What::Warning(_) | What::Fatal(_) | What::Left => {}
        }
        out
    }

    /// Total frames and bytes received over every direction (bytes only
    /// where the receiver says).
    pub fn totals(&self) -> (u64, u64) {
        self.dirs.values().fold((0, 0), |(f, b), d| {
            (f + d.frames(), b + d.bytes().unwrap_or(0))
        })
    }

    /// Frames received per direction (to, from), for rates.
    pub fn frames_by_direction(&self) -> HashMap<(usize, usize), u64> {
        self.dirs.iter().map(|(k, d)| (*k, d.frames())).collect()
    }

    /// Pairs that are not up, with their states, for error messages.
    pub fn pairs_not_up(&self) -> Vec<String> {
        self.summaries()
            .into_iter()
            .filter(|p| !p.up())
            .map(|p| {
                let what = if p.connected_ms.is_none() {
                    "not connected"
                } else {
                    "no media both ways"
                };
                format!(
                    "{} ↔ {} {what} ({} sees {}, {} sees {})",
                    self.names[p.a],
                    self.names[p.b],
                    self.names[p.a],
                    p.states.0,
                    self.names[p.b],
                    p.states.1
                )
            })
            .collect()
    }

    /// Pairs whose media stopped: up once, but no frames both ways within
    /// [`RECENT`] before the moment of judgement, with how long each
    /// direction has been silent, for error messages.
    pub fn pairs_media_stopped(&self) -> Vec<String> {
        let judge = self.recent_at.or(self.latest);
        let silent = |to: usize, from: usize| -> String {
            let last = self.dirs.get(&(to, from)).and_then(|d| d.last_frame);
            match (judge, last) {
                (Some(j), Some(l)) => {
                    format!("{:.1} s", j.saturating_duration_since(l).as_secs_f64())
                }
                _ => "ever".to_owned(),
            }
        };
        self.summaries()
            .into_iter()
            .filter(|p| p.up() && !p.media_recent)
            .map(|p| {
                format!(
                    "{a} ↔ {b} (nothing {a} → {b} for {}, {b} → {a} for {})",
                    silent(p.b, p.a),
                    silent(p.a, p.b),
                    a = self.names[p.a],
                    b = self.names[p.b],
                )
            })
            .collect()
    }

    /// Every pair's figures.
    pub fn summaries(&self) -> Vec<PairSummary> {
        let judge = self.recent_at.or(self.latest);
        let recent = |d: &Direction| match (judge, d.last_frame) {
            (Some(j), Some(l)) => l + RECENT >= j,
            _ => false,
        };
        self.pairs()
            .into_iter()
            .map(|(a, b)| {
                let start = match (self.joined[a], self.joined[b]) {
                    (Some(x), Some(y)) => Some(x.max(y)),
                    _ => None,
                };
                let since = |t: Option<Instant>| -> Option<f64> {
                    Some(ms(t?.saturating_duration_since(start?)))
                };
                let connected = match (self.connected.get(&(a, b)), self.connected.get(&(b, a))) {
                    (Some(x), Some(y)) => Some(*x.max(y)),
                    (Some(x), None) | (None, Some(x)) => Some(*x),
                    (None, None) => None,
                };
                let empty = Direction::default();
                let ab = self.dirs.get(&(b, a)).unwrap_or(&empty);
                let ba = self.dirs.get(&(a, b)).unwrap_or(&empty);
                let state = |at: usize, r: usize| {
                    self.states
                        .get(&(at, r))
                        .cloned()
                        .unwrap_or_else(|| "no peer".to_owned())
                };
                PairSummary {
                    a,
                    b,
                    start_ms: start.map(|s| ms(s.saturating_duration_since(self.origin))),
                    connected_ms: since(connected),
                    first_ab_ms: since(ab.first_frame),
                    first_ba_ms: since(ba.first_frame),
                    media_ab_ms: since(ab.both_kinds()),
                    media_ba_ms: since(ba.both_kinds()),
                    frames_ab: ab.frames(),
                    frames_ba: ba.frames(),
                    bytes_ab: ab.bytes(),
                    bytes_ba: ba.bytes(),
                    states: (state(a, b), state(b, a)),
                    media_recent: recent(ab) && recent(ba),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(at: Instant, idx: usize, what: What) -> Obs {
        Obs { at, idx, what }
    }

    fn frames(remote: &str, kind: Kind, n: u64) -> What {
        What::Frames {
            remote: remote.into(),
            stream: "s".into(),
            kind,
            frames: n,
            bytes: Some(n * 100),
        }
    }

    #[test]
    fn pairs_through_the_focus_connect_when_both_reach_it() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut t = Tracker::new(vec!["a".into(), "b".into(), "r".into()], t0);
        for (i, u) in ["@a:x", "@b:x", "@r:x"].into_iter().enumerate() {
            t.apply(&obs(t0, i, What::Identity(u.into())));
        }
        t.set_focus("@focus:x", [0, 1]);
        assert!(t.through_focus(0, 1));
        assert!(!t.through_focus(0, 2));
        let connected = |r: &str| What::Peer {
            remote: r.into(),
            state: "connected".into(),
            reason: None,
        };
        assert!(t.apply(&obs(at(10), 0, connected("@focus:x"))).is_empty());
        // The reference is not through the focus: its own peers count.
        assert!(t.apply(&obs(at(20), 2, connected("@focus:x"))).is_empty());
        assert_eq!(
            t.apply(&obs(at(30), 1, connected("@focus:x"))),
            vec![Progress::Connected(0, 1)]
        );
        assert!(t.apply(&obs(at(40), 1, connected("@focus:x"))).is_empty());
        t.set_unreachable(2, 1);
        assert_eq!(t.pairs(), vec![(0, 1), (0, 2)]);
        assert!(t.apply(&obs(at(50), 0, connected("@r:x"))).is_empty());
        assert_eq!(
            t.apply(&obs(at(60), 2, connected("@a:x"))),
            vec![Progress::Connected(0, 2)]
        );
    }

    #[test]
    fn a_pair_comes_up() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut t = Tracker::new(vec!["a".into(), "b".into()], t0);
        t.apply(&obs(t0, 0, What::Identity("@a:x".into())));
        t.apply(&obs(t0, 1, What::Identity("@b:x".into())));
        assert_eq!(
            t.apply(&obs(at(0), 0, What::Joined)),
            vec![Progress::Joined(0)]
        );
        t.apply(&obs(at(100), 1, What::Joined));
        assert_eq!(t.all_joined(), Some(at(100)));
        let connected = |r: &str| What::Peer {
            remote: r.into(),
            state: "connected".into(),
            reason: None,
        };
        assert!(t.apply(&obs(at(300), 0, connected("@b:x"))).is_empty());
        assert_eq!(
            t.apply(&obs(at(350), 1, connected("@a:x"))),
            vec![Progress::Connected(0, 1)]
        );
        assert_eq!(
            t.apply(&obs(at(400), 1, frames("@a:x", Kind::Audio, 5))),
            vec![Progress::FirstFrame { from: 0, to: 1 }]
        );
        t.apply(&obs(at(450), 1, frames("@a:x", Kind::Video, 2)));
        t.apply(&obs(at(420), 0, frames("@b:x", Kind::Video, 1)));
        let p = t.apply(&obs(at(500), 0, frames("@b:x", Kind::Audio, 9)));
        assert_eq!(p, vec![Progress::PairUp(0, 1), Progress::MeshUp]);
        assert_eq!(t.mesh_up(), Some(at(500)));
        let s = &t.summaries()[0];
        assert!(s.up());
        assert_eq!(s.start_ms, Some(100.0));
        assert_eq!(s.connected_ms, Some(250.0));
        assert_eq!(s.first_ab_ms, Some(300.0));
        assert_eq!(s.media_ab_ms, Some(350.0));
        assert_eq!(s.media_ba_ms, Some(400.0));
        assert_eq!(s.frames_ab, 7);
        assert_eq!(s.bytes_ba, Some(1000));
        assert!(t.pairs_not_up().is_empty());
    }

    #[test]
    fn media_that_stops_is_not_recent() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut t = Tracker::new(vec!["a".into(), "b".into()], t0);
        t.apply(&obs(t0, 0, What::Identity("@a:x".into())));
        t.apply(&obs(t0, 1, What::Identity("@b:x".into())));
        t.apply(&obs(t0, 0, What::Joined));
        t.apply(&obs(t0, 1, What::Joined));
        for (ms, n) in [(100, 1), (1000, 30)] {
            for k in [Kind::Audio, Kind::Video] {
                t.apply(&obs(at(ms), 0, frames("@b:x", k, n)));
                t.apply(&obs(at(ms), 1, frames("@a:x", k, n)));
            }
        }
        assert!(t.summaries()[0].media_recent);
        assert!(t.pairs_media_stopped().is_empty());
        // b keeps receiving; a's counters from b stop growing.
        for ms in [2000, 3000, 4000, 5000] {
            t.apply(&obs(at(ms), 1, frames("@a:x", Kind::Video, ms)));
            t.apply(&obs(at(ms), 0, frames("@b:x", Kind::Video, 30)));
        }
        let s = &t.summaries()[0];
        assert!(s.up() && !s.media_recent);
        assert_eq!(
            t.pairs_media_stopped(),
            vec!["a ↔ b (nothing a → b for 0.0 s, b → a for 4.0 s)".to_owned()]
        );
        // Judged at an earlier moment, it was still flowing.
        t.judge_recent_at(at(3500));
        assert!(t.summaries()[0].media_recent);
    }

    #[test]
    fn pairs_not_up_say_why() {
        let t0 = Instant::now();
        let mut t = Tracker::new(vec!["a".into(), "b".into(), "c".into()], t0);
        for (i, u) in ["@a:x", "@b:x", "@c:x"].iter().enumerate() {
            t.apply(&obs(t0, i, What::Identity((*u).into())));
        }
        t.apply(&obs(
            t0,
            0,
            What::Peer {
                remote: "@c:x".into(),
                state: "failed".into(),
                reason: Some("ice_failed".into()),
            },
        ));
        let down = t.pairs_not_up();
        assert_eq!(down.len(), 3);
        assert!(
            down[1].contains("a ↔ c not connected (a sees failed (ice_failed), c sees no peer)"),
            "{down:?}"
        );
        assert_eq!(t.pairs().len(), 3);
    }
}
