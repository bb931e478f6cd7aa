//! The focus's counters and gauges, and their Prometheus text exposition
//! (format 0.0.4).
//!
//! [`Metrics`] holds plain numbers; the driver fills it from what the other
//! modules count (the forwarder's per-call figures, the authoriser's
//! refusals) and renders it for `GET /metrics`. Nothing here reads a clock
//! or touches a socket.
//!
//! The families (all prefixed `groupcall_focus_`):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `draining` | gauge (0 or 1) | |
//! | `rooms` | gauge | |
//! | `calls` | gauge | |
//! | `participants`, `tracks` | gauge | |
//! | `packets_in_total`, `bytes_in_total`, `packets_out_total`, `bytes_out_total` | counter | |
//! | `nacks_served_total`, `plis_sent_total`, `nacks_received_total`, `keyframe_requests_received_total`, `keyframe_requests_coalesced_total` | counter | |
//! | `drops_total` | counter | `reason` |
//! | `refusals_total` | counter | `reason` |
//! | `layer_switches_total`, `layer_switch_fallbacks_total`, `inter_before_keyframe_total`, `layer_switch_latency_ms_total`, `active_speaker_changes_total`, `layers_policed_total` | counter | |
//! | `subscription_layer_height` | gauge | `subscription` |
//! | `link_streams_out`, `link_streams_in` | gauge | `focus` |
//! | `link_packets_out_total`, `link_packets_in_total` | counter | `focus` |
//! | `looped_packets_total` | counter | |
//! | `call_participants`, `call_tracks` | gauge | `call` |
//! | `call_active_speaker` | gauge (1) | `call`, `speaker` |
//! | `call_packets_in_total`, `call_bytes_in_total`, `call_packets_out_total`, `call_bytes_out_total`, `call_nacks_served_total`, `call_plis_sent_total`, `call_nacks_received_total`, `call_keyframe_requests_received_total`, `call_keyframe_requests_coalesced_total`, `call_layer_switches_total`, `call_layer_switch_fallbacks_total`, `call_inter_before_keyframe_total`, `call_layer_switch_latency_ms_total`, `call_active_speaker_changes_total`, `call_layers_policed_total` | counter | `call` |
//!
//! `subscription_layer_height` is the height (from its last key frame) of
//! the simulcast layer each video subscription receives now, labelled
//! `<subscriber client number>/<stream id>/<track id>`.
//! `call_active_speaker` has one series per call with a named active
//! speaker, value 1, labelled with the speaker's device
//! (`@user:server/DEVICE`); `active_speaker_changes_total` counts the
//! announcements (a new speaker, or nobody). The `link_*`
//! series are per cascade link, labelled with the other focus's device
//! (`@user:server/DEVICE`), and exist while the link does.
//!
//! The unlabelled counters cover every call since the start, ended ones
//! included ([`Metrics::remove_call`] folds an ended call's figures into
//! them), so they never go down; the `call_*` series exist while the call
//! does.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prefix of every metric name.
const PREFIX: &str = "groupcall_focus_";

/// The figures of one call, as the forwarder counts them. Counters
/// (`packets_*`, `bytes_*`, `nacks_*`, `plis_sent`, `keyframe_requests_*`)
/// are cumulative
/// since the call started at the focus; `participants` and `tracks` are
/// the current numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallFigures {
    /// Participants connected to the focus in this call.
    pub participants: u64,
    /// Tracks published (uploaded) to the focus in this call.
    pub tracks: u64,
    /// RTP/RTCP packets received from participants.
    pub packets_in: u64,
    /// Bytes received from participants.
    pub bytes_in: u64,
    /// Packets sent to participants.
    pub packets_out: u64,
    /// Bytes sent to participants.
    pub bytes_out: u64,
    /// Retransmissions sent in answer to NACKs (from the packet cache).
    pub nacks_served: u64,
    /// Keyframe requests (PLI/FIR) sent to publishers.
    pub plis_sent: u64,
    /// NACK messages received from subscribers (one message may name
    /// several packets).
    pub nacks_received: u64,
    /// Keyframe requests (PLI/FIR) received from subscribers.
    pub keyframe_requests_received: u64,
    /// Keyframe requests (from subscribers, or for new subscriptions)
    /// folded into one already sent or pending toward the publisher.
    pub keyframe_requests_coalesced: u64,
    /// Simulcast layer switches done.
    pub layer_switches: u64,
    /// Layer switches given up (no key frame of the target in time).
    pub layer_switch_fallbacks: u64,
    /// Frames of a new layer forwarded before its key frame.
    pub inter_before_keyframe: u64,
    /// Sum of the layer switch latencies, milliseconds.
    pub layer_switch_latency_ms: u64,
    /// Times the active speaker was announced (a new speaker, or nobody).
    pub active_speaker_changes: u64,
    /// Times a publisher's video layer went over its share of
    /// `limits.max_kbps_per_participant` and was held back.
    pub layers_policed: u64,
}

impl CallFigures {
    /// `self + other`, counter by counter (gauges too).
    fn plus(self, o: CallFigures) -> CallFigures {
        CallFigures {
            participants: self.participants + o.participants,
            tracks: self.tracks + o.tracks,
            packets_in: self.packets_in + o.packets_in,
            bytes_in: self.bytes_in + o.bytes_in,
            packets_out: self.packets_out + o.packets_out,
            bytes_out: self.bytes_out + o.bytes_out,
            nacks_served: self.nacks_served + o.nacks_served,
            plis_sent: self.plis_sent + o.plis_sent,
            nacks_received: self.nacks_received + o.nacks_received,
            keyframe_requests_received: self.keyframe_requests_received
                + o.keyframe_requests_received,
            keyframe_requests_coalesced: self.keyframe_requests_coalesced
                + o.keyframe_requests_coalesced,
            layer_switches: self.layer_switches + o.layer_switches,
            layer_switch_fallbacks: self.layer_switch_fallbacks + o.layer_switch_fallbacks,
            inter_before_keyframe: self.inter_before_keyframe + o.inter_before_keyframe,
            layer_switch_latency_ms: self.layer_switch_latency_ms + o.layer_switch_latency_ms,
            active_speaker_changes: self.active_speaker_changes + o.active_speaker_changes,
            layers_policed: self.layers_policed + o.layers_policed,
        }
    }
}

/// The focus's counters and gauges (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    draining: bool,
    rooms: u64,
    /// Live calls by label.
    calls: BTreeMap<String, CallFigures>,
    /// The active speaker of live calls that have one, by call label.
    speakers: BTreeMap<String, String>,
    /// The counters of calls that ended.
    ended: CallFigures,
    drops: BTreeMap<String, u64>,
    refusals: BTreeMap<String, u64>,
    /// The height of each video subscription's layer now.
    layers: BTreeMap<String, u64>,
    /// Per cascade link (the other focus's device): streams forwarded to
    /// it, streams asked of it, packets sent over it, packets received.
    links: BTreeMap<String, [u64; 4]>,
    /// Packets that came back to their origin over a link.
    looped_packets: u64,
}

impl Metrics {
    /// No calls, every counter 0.
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// Sets the figures of the call labelled `call` (e.g.
    /// `!room:server/call-id`), adding it if it is new.
    pub fn set_call(&mut self, call: &str, figures: CallFigures) {
        match self.calls.get_mut(call) {
            Some(f) => *f = figures,
            None => {
                self.calls.insert(call.to_owned(), figures);
            }
        }
    }

    /// Sets the active speaker of the call labelled `call` (the speaker's
    /// device, `@user:server/DEVICE`; `None`: nobody named).
    pub fn set_active_speaker(&mut self, call: &str, speaker: Option<&str>) {
        match speaker {
            Some(s) => {
                self.speakers.insert(call.to_owned(), s.to_owned());
            }
            None => {
                self.speakers.remove(call);
            }
        }
    }

    /// Ends every live call whose label `keep` refuses
    /// ([`Metrics::remove_call`]).
    pub fn retain_calls(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let gone: Vec<String> = self.calls.keys().filter(|c| !keep(c)).cloned().collect();
        for c in gone {
            self.remove_call(&c);
        }
    }

    /// The call ended: its series go, its counters stay in the totals.
    pub fn remove_call(&mut self, call: &str) {
        self.speakers.remove(call);
        if let Some(f) = self.calls.remove(call) {
            self.ended = self.ended.plus(CallFigures {
                participants: 0,
                tracks: 0,
                ..f
            });
        }
    }

    /// Counts one refusal (an invite declined, a call refused, a
    /// subscription denied...) with its reason, e.g. `invite_not_allowed`.
    pub fn add_refusal(&mut self, reason: &str) {
        add(&mut self.refusals, reason, 1);
    }

    /// Counts `n` dropped packets with their reason, e.g. `queue_full`.
    pub fn add_drops(&mut self, reason: &str, n: u64) {
        add(&mut self.drops, reason, n);
    }

    /// Sets every video subscription's layer height (label: see the
    /// module docs), replacing the previous ones.
    pub fn set_subscription_layers(&mut self, layers: impl Iterator<Item = (String, u64)>) {
        self.layers.clear();
        self.layers.extend(layers);
    }

    /// Sets the cascade links now (the other focus's device; streams out,
    /// streams in, packets out, packets in), replacing the previous ones,
    /// and the looped packets so far.
    pub fn set_links(&mut self, links: impl Iterator<Item = (String, [u64; 4])>, looped: u64) {
        self.links.clear();
        self.links.extend(links);
        self.looped_packets = looped;
    }

    /// Sets the number of joined rooms.
    pub fn set_rooms(&mut self, rooms: u64) {
        self.rooms = rooms;
    }

    /// Sets whether the focus is draining (stopping).
    pub fn set_draining(&mut self, draining: bool) {
        self.draining = draining;
    }

    /// Refusals counted with `reason`.
    pub fn refusals(&self, reason: &str) -> u64 {
        self.refusals.get(reason).copied().unwrap_or(0)
    }

    /// Drops counted with `reason`.
    pub fn drops(&self, reason: &str) -> u64 {
        self.drops.get(reason).copied().unwrap_or(0)
    }

    /// Live calls.
    pub fn calls(&self) -> usize {
        self.calls.len()
    }

    /// The sum of every call's figures, ended calls' counters included
    /// (`participants` and `tracks`: live calls only).
    pub fn totals(&self) -> CallFigures {
        self.calls.values().fold(self.ended, |sum, f| sum.plus(*f))
    }

    /// The Prometheus text exposition (format 0.0.4; serve it with
    /// [`CONTENT_TYPE`]). Families in a fixed order, series sorted by
    /// label.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048 + 512 * self.calls.len());
        self.render_into(&mut out);
        out
    }

    /// [`Metrics::render`] into `out` (appended).
    pub fn render_into(&self, out: &mut String) {
        let t = self.totals();
        let mut w = Writer { out };
        w.single(
            "draining",
            Kind::Gauge,
            "1 while the focus is draining (stopping), else 0.",
            u64::from(self.draining),
        );
        w.single(
            "rooms",
            Kind::Gauge,
            "Rooms the focus has joined.",
            self.rooms,
        );
        w.single(
            "calls",
            Kind::Gauge,
            "Calls with participants at the focus.",
            self.calls.len() as u64,
        );
        w.single(
            "participants",
            Kind::Gauge,
            "Participants connected to the focus, over all calls.",
            t.participants,
        );
        w.single(
            "tracks",
            Kind::Gauge,
            "Tracks published to the focus, over all calls.",
            t.tracks,
        );
        for (name, help, get) in COUNTERS {
            w.single(
                &format!("{name}_total"),
                Kind::Counter,
                &format!("{help}, over all calls since the start."),
                get(&t),
            );
        }
        w.labelled(
            "drops_total",
            Kind::Counter,
            "Packets dropped, by reason.",
            "reason",
            self.drops.iter().map(|(k, v)| (k.as_str(), *v)),
        );
        w.labelled(
            "refusals_total",
            Kind::Counter,
            "Requests refused (invites, calls, subscriptions), by reason.",
            "reason",
            self.refusals.iter().map(|(k, v)| (k.as_str(), *v)),
        );
        w.labelled(
            "subscription_layer_height",
            Kind::Gauge,
            "Height of the simulcast layer each video subscription receives now.",
            "subscription",
            self.layers.iter().map(|(k, v)| (k.as_str(), *v)),
        );
        let links = || self.links.iter().map(|(k, v)| (k.as_str(), v));
        for (i, name, kind, help) in [
            (
                0,
                "link_streams_out",
                Kind::Gauge,
                "Streams forwarded over each cascade link (its clients asked for them), each once.",
            ),
            (
                1,
                "link_streams_in",
                Kind::Gauge,
                "Streams asked of the other focus over each cascade link (our clients asked for them), each once.",
            ),
            (
                2,
                "link_packets_out_total",
                Kind::Counter,
                "RTP packets forwarded over each cascade link since it started.",
            ),
            (
                3,
                "link_packets_in_total",
                Kind::Counter,
                "RTP packets received over each cascade link since it started.",
            ),
        ] {
            w.labelled(name, kind, help, "focus", links().map(|(k, v)| (k, v[i])));
        }
        w.single(
            "looped_packets_total",
            Kind::Counter,
            "Packets that came back to their origin focus over a cascade link (not forwarded); 0 unless foci disagree on the rules.",
            self.looped_packets,
        );
        let calls = || self.calls.iter().map(|(k, f)| (k.as_str(), f));
        w.labelled(
            "call_participants",
            Kind::Gauge,
            "Participants connected to the focus, per call.",
            "call",
            calls().map(|(k, f)| (k, f.participants)),
        );
        w.labelled(
            "call_tracks",
            Kind::Gauge,
            "Tracks published to the focus, per call.",
            "call",
            calls().map(|(k, f)| (k, f.tracks)),
        );
        w.header(
            "call_active_speaker",
            Kind::Gauge,
            "The active speaker of each call (1; the device in the speaker label).",
        );
        for (call, speaker) in &self.speakers {
            let _ = writeln!(
                w.out,
                "{PREFIX}call_active_speaker{{call=\"{}\",speaker=\"{}\"}} 1",
                escape_label(call),
                escape_label(speaker)
            );
        }
        for (name, help, get) in COUNTERS {
            w.labelled(
                &format!("call_{name}_total"),
                Kind::Counter,
                &format!("{help}, per call."),
                "call",
                calls().map(|(k, f)| (k, get(f))),
            );
        }
    }
}

/// The per-call counters: name (without `_total`), help, value.
type CounterField = (&'static str, &'static str, fn(&CallFigures) -> u64);
const COUNTERS: [CounterField; 15] = [
    ("packets_in", "Packets received from participants", |f| {
        f.packets_in
    }),
    ("bytes_in", "Bytes received from participants", |f| {
        f.bytes_in
    }),
    ("packets_out", "Packets sent to participants", |f| {
        f.packets_out
    }),
    ("bytes_out", "Bytes sent to participants", |f| f.bytes_out),
    (
        "nacks_served",
        "Retransmissions sent in answer to NACKs",
        |f| f.nacks_served,
    ),
    (
        "plis_sent",
        "Keyframe requests (PLI/FIR) sent to publishers",
        |f| f.plis_sent,
    ),
    (
        "nacks_received",
        "NACK messages received from subscribers",
        |f| f.nacks_received,
    ),
    (
        "keyframe_requests_received",
        "Keyframe requests (PLI/FIR) received from subscribers",
        |f| f.keyframe_requests_received,
    ),
    (
        "keyframe_requests_coalesced",
        "Keyframe requests folded into one already sent or pending toward the publisher",
        |f| f.keyframe_requests_coalesced,
    ),
    ("layer_switches", "Simulcast layer switches", |f| {
        f.layer_switches
    }),
    (
        "layer_switch_fallbacks",
        "Simulcast layer switches given up (no key frame of the new layer in time)",
        |f| f.layer_switch_fallbacks,
    ),
    (
        "inter_before_keyframe",
        "Frames of a new simulcast layer forwarded before its key frame",
        |f| f.inter_before_keyframe,
    ),
    (
        "layer_switch_latency_ms",
        "Sum of the simulcast switch latencies (switch asked for to first packet of the new layer), milliseconds",
        |f| f.layer_switch_latency_ms,
    ),
    (
        "active_speaker_changes",
        "Active speaker announcements (a new speaker, or nobody)",
        |f| f.active_speaker_changes,
    ),
    (
        "layers_policed",
        "Publishers' video layers held back for going over their share of the participant limit",
        |f| f.layers_policed,
    ),
];

fn add(map: &mut BTreeMap<String, u64>, key: &str, n: u64) {
    match map.get_mut(key) {
        Some(v) => *v = v.saturating_add(n),
        None => {
            map.insert(key.to_owned(), n);
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
}

struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    fn header(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {PREFIX}{name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {PREFIX}{name} {kind}");
    }

    fn single(&mut self, name: &str, kind: Kind, help: &str, value: u64) {
        self.header(name, kind, help);
        let _ = writeln!(self.out, "{PREFIX}{name} {value}");
    }

    fn labelled<'v>(
        &mut self,
        name: &str,
        kind: Kind,
        help: &str,
        label: &str,
        series: impl Iterator<Item = (&'v str, u64)>,
    ) {
        self.header(name, kind, help);
        for (value_label, value) in series {
            let _ = writeln!(
                self.out,
                "{PREFIX}{name}{{{label}=\"{}\"}} {value}",
                escape_label(value_label)
            );
        }
    }
}

/// A label value: `\`, `"` and line feeds escaped.
fn escape_label(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A `# HELP` text: `\` and line feeds escaped.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_rendering() {
        let text = Metrics::new().render();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "groupcall_focus_draining 0",
                "groupcall_focus_rooms 0",
                "groupcall_focus_calls 0",
                "groupcall_focus_participants 0",
                "groupcall_focus_tracks 0",
                "groupcall_focus_packets_in_total 0",
                "groupcall_focus_bytes_in_total 0",
                "groupcall_focus_packets_out_total 0",
                "groupcall_focus_bytes_out_total 0",
                "groupcall_focus_nacks_served_total 0",
                "groupcall_focus_plis_sent_total 0",
                "groupcall_focus_nacks_received_total 0",
                "groupcall_focus_keyframe_requests_received_total 0",
                "groupcall_focus_keyframe_requests_coalesced_total 0",
                "groupcall_focus_layer_switches_total 0",
                "groupcall_focus_layer_switch_fallbacks_total 0",
                "groupcall_focus_inter_before_keyframe_total 0",
                "groupcall_focus_layer_switch_latency_ms_total 0",
                "groupcall_focus_active_speaker_changes_total 0",
                "groupcall_focus_layers_policed_total 0",
                "groupcall_focus_looped_packets_total 0",
            ]
        );
        // Every family has its HELP and TYPE, in that order.
        assert_eq!(text.matches("# HELP ").count(), 46);
        assert_eq!(text.matches("# TYPE ").count(), 46);
    }

    #[test]
    fn golden_rendering() {
        let mut m = Metrics::new();
        m.set_rooms(2);
        m.set_draining(true);
        m.set_call(
            "!a:x/c1",
            CallFigures {
                participants: 3,
                tracks: 6,
                packets_in: 100,
                bytes_in: 10_000,
                packets_out: 200,
                bytes_out: 20_000,
                nacks_served: 4,
                plis_sent: 1,
                nacks_received: 7,
                keyframe_requests_received: 9,
                keyframe_requests_coalesced: 5,
                layer_switches: 2,
                layer_switch_fallbacks: 1,
                inter_before_keyframe: 0,
                layer_switch_latency_ms: 150,
                active_speaker_changes: 3,
                layers_policed: 1,
            },
        );
        m.set_active_speaker("!a:x/c1", Some("@s:x/D\"1"));
        m.set_subscription_layers([("3/s/v".to_string(), 720)].into_iter());
        m.set_links([("@fb:y/FB".to_string(), [4, 2, 900, 450])].into_iter(), 0);
        m.set_call(
            "!b:x/c\"2\\\n",
            CallFigures {
                participants: 1,
                tracks: 2,
                packets_in: 5,
                ..CallFigures::default()
            },
        );
        // An ended call: its counters stay in the totals.
        m.set_call(
            "!old:x/c0",
            CallFigures {
                participants: 2,
                tracks: 2,
                packets_in: 1000,
                bytes_out: 7,
                ..CallFigures::default()
            },
        );
        m.set_active_speaker("!old:x/c0", Some("@gone:x/G"));
        m.remove_call("!old:x/c0");
        m.add_refusal("invite_not_allowed");
        m.add_refusal("invite_not_allowed");
        m.add_refusal("plaintext");
        m.add_drops("queue_full", 3);
        let expected = r#"# HELP groupcall_focus_draining 1 while the focus is draining (stopping), else 0.
# TYPE groupcall_focus_draining gauge
groupcall_focus_draining 1
# HELP groupcall_focus_rooms Rooms the focus has joined.
# TYPE groupcall_focus_rooms gauge
groupcall_focus_rooms 2
# HELP groupcall_focus_calls Calls with participants at the focus.
# TYPE groupcall_focus_calls gauge
groupcall_focus_calls 2
# HELP groupcall_focus_participants Participants connected to the focus, over all calls.
# TYPE groupcall_focus_participants gauge
groupcall_focus_participants 4
# HELP groupcall_focus_tracks Tracks published to the focus, over all calls.
# TYPE groupcall_focus_tracks gauge
groupcall_focus_tracks 8
# HELP groupcall_focus_packets_in_total Packets received from participants, over all calls since the start.
# TYPE groupcall_focus_packets_in_total counter
groupcall_focus_packets_in_total 1105
# HELP groupcall_focus_bytes_in_total Bytes received from participants, over all calls since the start.
# TYPE groupcall_focus_bytes_in_total counter
groupcall_focus_bytes_in_total 10000
# HELP groupcall_focus_packets_out_total Packets sent to participants, over all calls since the start.
# TYPE groupcall_focus_packets_out_total counter
groupcall_focus_packets_out_total 200
# HELP groupcall_focus_bytes_out_total Bytes sent to participants, over all calls since the start.
# TYPE groupcall_focus_bytes_out_total counter
groupcall_focus_bytes_out_total 20007
# HELP groupcall_focus_nacks_served_total Retransmissions sent in answer to NACKs, over all calls since the start.
# TYPE groupcall_focus_nacks_served_total counter
groupcall_focus_nacks_served_total 4
# HELP groupcall_focus_plis_sent_total Keyframe requests (PLI/FIR) sent to publishers, over all calls since the start.
# TYPE groupcall_focus_plis_sent_total counter
groupcall_focus_plis_sent_total 1
# HELP groupcall_focus_nacks_received_total NACK messages received from subscribers, over all calls since the start.
# TYPE groupcall_focus_nacks_received_total counter
groupcall_focus_nacks_received_total 7
# HELP groupcall_focus_keyframe_requests_received_total Keyframe requests (PLI/FIR) received from subscribers, over all calls since the start.
# TYPE groupcall_focus_keyframe_requests_received_total counter
groupcall_focus_keyframe_requests_received_total 9
# HELP groupcall_focus_keyframe_requests_coalesced_total Keyframe requests folded into one already sent or pending toward the publisher, over all calls since the start.
# TYPE groupcall_focus_keyframe_requests_coalesced_total counter
groupcall_focus_keyframe_requests_coalesced_total 5
# HELP groupcall_focus_layer_switches_total Simulcast layer switches, over all calls since the start.
# TYPE groupcall_focus_layer_switches_total counter
groupcall_focus_layer_switches_total 2
# HELP groupcall_focus_layer_switch_fallbacks_total Simulcast layer switches given up (no key frame of the new layer in time), over all calls since the start.
# TYPE groupcall_focus_layer_switch_fallbacks_total counter
groupcall_focus_layer_switch_fallbacks_total 1
# HELP groupcall_focus_inter_before_keyframe_total Frames of a new simulcast layer forwarded before its key frame, over all calls since the start.
# TYPE groupcall_focus_inter_before_keyframe_total counter
groupcall_focus_inter_before_keyframe_total 0
# HELP groupcall_focus_layer_switch_latency_ms_total Sum of the simulcast switch latencies (switch asked for to first packet of the new layer), milliseconds, over all calls since the start.
# TYPE groupcall_focus_layer_switch_latency_ms_total counter
groupcall_focus_layer_switch_latency_ms_total 150
# HELP groupcall_focus_active_speaker_changes_total Active speaker announcements (a new speaker, or nobody), over all calls since the start.
# TYPE groupcall_focus_active_speaker_changes_total counter
groupcall_focus_active_speaker_changes_total 3
# HELP groupcall_focus_layers_policed_total Publishers' video layers held back for going over their share of the participant limit, over all calls since the start.
# TYPE groupcall_focus_layers_policed_total counter
groupcall_focus_layers_policed_total 1
# HELP groupcall_focus_drops_total Packets dropped, by reason.
# TYPE groupcall_focus_drops_total counter
groupcall_focus_drops_total{reason="queue_full"} 3
# HELP groupcall_focus_refusals_total Requests refused (invites, calls, subscriptions), by reason.
# TYPE groupcall_focus_refusals_total counter
groupcall_focus_refusals_total{reason="invite_not_allowed"} 2
groupcall_focus_refusals_total{reason="plaintext"} 1
# HELP groupcall_focus_subscription_layer_height Height of the simulcast layer each video subscription receives now.
# TYPE groupcall_focus_subscription_layer_height gauge
groupcall_focus_subscription_layer_height{subscription="3/s/v"} 720
# HELP groupcall_focus_link_streams_out Streams forwarded over each cascade link (its clients asked for them), each once.
# TYPE groupcall_focus_link_streams_out gauge
groupcall_focus_link_streams_out{focus="@fb:y/FB"} 4
# HELP groupcall_focus_link_streams_in Streams asked of the other focus over each cascade link (our clients asked for them), each once.
# TYPE groupcall_focus_link_streams_in gauge
groupcall_focus_link_streams_in{focus="@fb:y/FB"} 2
# HELP groupcall_focus_link_packets_out_total RTP packets forwarded over each cascade link since it started.
# TYPE groupcall_focus_link_packets_out_total counter
groupcall_focus_link_packets_out_total{focus="@fb:y/FB"} 900
# HELP groupcall_focus_link_packets_in_total RTP packets received over each cascade link since it started.
# TYPE groupcall_focus_link_packets_in_total counter
groupcall_focus_link_packets_in_total{focus="@fb:y/FB"} 450
# HELP groupcall_focus_looped_packets_total Packets that came back to their origin focus over a cascade link (not forwarded); 0 unless foci disagree on the rules.
# TYPE groupcall_focus_looped_packets_total counter
groupcall_focus_looped_packets_total 0
# HELP groupcall_focus_call_participants Participants connected to the focus, per call.
# TYPE groupcall_focus_call_participants gauge
groupcall_focus_call_participants{call="!a:x/c1"} 3
groupcall_focus_call_participants{call="!b:x/c\"2\\\n"} 1
# HELP groupcall_focus_call_tracks Tracks published to the focus, per call.
# TYPE groupcall_focus_call_tracks gauge
groupcall_focus_call_tracks{call="!a:x/c1"} 6
groupcall_focus_call_tracks{call="!b:x/c\"2\\\n"} 2
# HELP groupcall_focus_call_active_speaker The active speaker of each call (1; the device in the speaker label).
# TYPE groupcall_focus_call_active_speaker gauge
groupcall_focus_call_active_speaker{call="!a:x/c1",speaker="@s:x/D\"1"} 1
# HELP groupcall_focus_call_packets_in_total Packets received from participants, per call.
# TYPE groupcall_focus_call_packets_in_total counter
groupcall_focus_call_packets_in_total{call="!a:x/c1"} 100
groupcall_focus_call_packets_in_total{call="!b:x/c\"2\\\n"} 5
# HELP groupcall_focus_call_bytes_in_total Bytes received from participants, per call.
# TYPE groupcall_focus_call_bytes_in_total counter
groupcall_focus_call_bytes_in_total{call="!a:x/c1"} 10000
groupcall_focus_call_bytes_in_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_packets_out_total Packets sent to participants, per call.
# TYPE groupcall_focus_call_packets_out_total counter
groupcall_focus_call_packets_out_total{call="!a:x/c1"} 200
groupcall_focus_call_packets_out_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_bytes_out_total Bytes sent to participants, per call.
# TYPE groupcall_focus_call_bytes_out_total counter
groupcall_focus_call_bytes_out_total{call="!a:x/c1"} 20000
groupcall_focus_call_bytes_out_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_nacks_served_total Retransmissions sent in answer to NACKs, per call.
# TYPE groupcall_focus_call_nacks_served_total counter
groupcall_focus_call_nacks_served_total{call="!a:x/c1"} 4
groupcall_focus_call_nacks_served_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_plis_sent_total Keyframe requests (PLI/FIR) sent to publishers, per call.
# TYPE groupcall_focus_call_plis_sent_total counter
groupcall_focus_call_plis_sent_total{call="!a:x/c1"} 1
groupcall_focus_call_plis_sent_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_nacks_received_total NACK messages received from subscribers, per call.
# TYPE groupcall_focus_call_nacks_received_total counter
groupcall_focus_call_nacks_received_total{call="!a:x/c1"} 7
groupcall_focus_call_nacks_received_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_keyframe_requests_received_total Keyframe requests (PLI/FIR) received from subscribers, per call.
# TYPE groupcall_focus_call_keyframe_requests_received_total counter
groupcall_focus_call_keyframe_requests_received_total{call="!a:x/c1"} 9
groupcall_focus_call_keyframe_requests_received_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_keyframe_requests_coalesced_total Keyframe requests folded into one already sent or pending toward the publisher, per call.
# TYPE groupcall_focus_call_keyframe_requests_coalesced_total counter
groupcall_focus_call_keyframe_requests_coalesced_total{call="!a:x/c1"} 5
groupcall_focus_call_keyframe_requests_coalesced_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_layer_switches_total Simulcast layer switches, per call.
# TYPE groupcall_focus_call_layer_switches_total counter
groupcall_focus_call_layer_switches_total{call="!a:x/c1"} 2
groupcall_focus_call_layer_switches_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_layer_switch_fallbacks_total Simulcast layer switches given up (no key frame of the new layer in time), per call.
# TYPE groupcall_focus_call_layer_switch_fallbacks_total counter
groupcall_focus_call_layer_switch_fallbacks_total{call="!a:x/c1"} 1
groupcall_focus_call_layer_switch_fallbacks_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_inter_before_keyframe_total Frames of a new simulcast layer forwarded before its key frame, per call.
# TYPE groupcall_focus_call_inter_before_keyframe_total counter
groupcall_focus_call_inter_before_keyframe_total{call="!a:x/c1"} 0
groupcall_focus_call_inter_before_keyframe_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_layer_switch_latency_ms_total Sum of the simulcast switch latencies (switch asked for to first packet of the new layer), milliseconds, per call.
# TYPE groupcall_focus_call_layer_switch_latency_ms_total counter
groupcall_focus_call_layer_switch_latency_ms_total{call="!a:x/c1"} 150
groupcall_focus_call_layer_switch_latency_ms_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_active_speaker_changes_total Active speaker announcements (a new speaker, or nobody), per call.
# TYPE groupcall_focus_call_active_speaker_changes_total counter
groupcall_focus_call_active_speaker_changes_total{call="!a:x/c1"} 3
groupcall_focus_call_active_speaker_changes_total{call="!b:x/c\"2\\\n"} 0
# HELP groupcall_focus_call_layers_policed_total Publishers' video layers held back for going over their share of the participant limit, per call.
# TYPE groupcall_focus_call_layers_policed_total counter
groupcall_focus_call_layers_policed_total{call="!a:x/c1"} 1
groupcall_focus_call_layers_policed_total{call="!b:x/c\"2\\\n"} 0
"#;
        let got = m.render();
        for (i, (g, e)) in got.lines().zip(expected.lines()).enumerate() {
            assert_eq!(g, e, "line {}", i + 1);
        }
        assert_eq!(got, expected);
        assert_eq!(m.refusals("invite_not_allowed"), 2);
        assert_eq!(m.refusals("nothing"), 0);
        assert_eq!(m.drops("queue_full"), 3);
        assert_eq!(m.calls(), 2);
    }

    #[test]
    fn totals_never_go_down_when_calls_end() {
        let mut m = Metrics::new();
        let f = CallFigures {
            participants: 2,
            packets_out: 10,
            ..CallFigures::default()
        };
        m.set_call("c", f);
        m.set_call(
            "c",
            CallFigures {
                packets_out: 15,
                ..f
            },
        );
        assert_eq!(m.totals().packets_out, 15);
        m.remove_call("c");
        m.remove_call("c");
        assert_eq!(m.totals().packets_out, 15);
        assert_eq!(m.totals().participants, 0);
        assert_eq!(m.calls(), 0);
    }

    #[test]
    fn calls_that_ended_lose_their_series_and_speaker() {
        let mut m = Metrics::new();
        let f = CallFigures {
            participants: 2,
            packets_out: 10,
            active_speaker_changes: 1,
            ..CallFigures::default()
        };
        m.set_call("gone", f);
        m.set_call("live", f);
        m.set_active_speaker("gone", Some("@a:x/A"));
        m.set_active_speaker("live", Some("@b:x/B"));
        m.retain_calls(|c| c == "live");
        assert_eq!(m.calls(), 1);
        assert_eq!(m.totals().packets_out, 20);
        assert_eq!(m.totals().participants, 2);
        let text = m.render();
        assert!(!text.contains("\"gone\""), "{text}");
        assert!(
            text.contains(
                "groupcall_focus_call_active_speaker{call=\"live\",speaker=\"@b:x/B\"} 1"
            )
        );
        m.set_active_speaker("live", None);
        assert!(!m.render().contains("speaker=\""));
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("l1\nl2"), "l1\\nl2");
        assert_eq!(escape_help("a\\b\nc\"d"), "a\\\\b\\nc\"d");
    }
}
