//! Forwarder behaviour tests.

use std::time::{Duration, Instant};

use super::*;

const A: ParticipantId = ParticipantId(1);
const B: ParticipantId = ParticipantId(2);
const C: ParticipantId = ParticipantId(3);
const CALL: CallId = CallId(10);
const V_SSRC: u32 = 1000;
const A_SSRC: u32 = 2000;

fn vkey() -> TrackKey {
    TrackKey::new("sA", "v")
}
fn akey() -> TrackKey {
    TrackKey::new("sA", "a")
}

/// A VP8 payload: long PictureID, TL0PICIDX, TID/KEYIDX; a key frame
/// header (640x480) or an inter frame byte.
fn vp8(pid: u16, tl0: u8, keyidx: u8, keyframe: bool, start: bool) -> Vec<u8> {
    vp8_with(pid, tl0, 0, keyidx, keyframe, start, (640, 480))
}

/// An egress, owned, with its payload patched and parsed back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    to: ParticipantId,
    kind: MediaKind,
    hdr: RtpOut,
    payload: Vec<u8>,
    pid: Option<u16>,
    tl0: Option<u8>,
    keyidx: Option<u8>,
    retransmission: bool,
}

fn own(e: Egress<'_>) -> Sent {
    let mut payload = vec![0u8; e.payload.len()];
    assert_eq!(e.write_payload(&mut payload), Some(e.payload.len()));
    let d = (e.kind == MediaKind::Video).then(|| Vp8Descriptor::parse(&payload).unwrap());
    Sent {
        to: e.subscriber,
        kind: e.kind,
        hdr: e.header,
        pid: d.and_then(|d| d.picture_id.map(|p| p.value)),
        tl0: d.and_then(|d| d.tl0picidx),
        keyidx: d.and_then(|d| d.keyidx),
        payload,
        retransmission: e.retransmission,
    }
}

struct H {
    f: Forwarder,
    t0: Instant,
    sent: Vec<Sent>,
    /// The marker bit of the packets sent next.
    marker: bool,
}

impl H {
    fn new() -> Self {
        let mut f = Forwarder::new(ForwarderConfig {
            estimate_needs_loss: None,
            ..ForwarderConfig::default()
        });
        f.add_call(CALL).unwrap();
        for p in [A, B, C] {
            f.add_participant(CALL, p).unwrap();
        }
        Self::publish_av(&mut f, A, "sA", V_SSRC, A_SSRC);
        Self {
            f,
            t0: Instant::now(),
            sent: Vec::new(),
            marker: false,
        }
    }

    fn publish_av(f: &mut Forwarder, p: ParticipantId, stream: &str, v: u32, a: u32) {
        f.publish_track(
            p,
            TrackSpec {
                key: TrackKey::new(stream, "v"),
                codec: Codec::Vp8,
                layers: vec![LayerSpec {
                    rid: None,
                    ssrc: Some(v),
                }],
            },
        )
        .unwrap();
        f.publish_track(
            p,
            TrackSpec {
                key: TrackKey::new(stream, "a"),
                codec: Codec::Opus,
                layers: vec![LayerSpec {
                    rid: None,
                    ssrc: Some(a),
                }],
            },
        )
        .unwrap();
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    #[allow(clippy::too_many_arguments)]
    fn rtp(&mut self, ms: u64, from: ParticipantId, ssrc: u32, seq: u16, ts: u32, payload: &[u8]) {
        self.rtp_level(ms, from, ssrc, seq, ts, payload, None);
    }

    /// The last packet of a frame (marker set).
    fn rtp_end(&mut self, ms: u64, ssrc: u32, seq: u16, ts: u32, payload: &[u8]) {
        self.marker = true;
        self.rtp(ms, A, ssrc, seq, ts, payload);
        self.marker = false;
    }

    #[allow(clippy::too_many_arguments)]
    fn rtp_level(
        &mut self,
        ms: u64,
        from: ParticipantId,
        ssrc: u32,
        seq: u16,
        ts: u32,
        payload: &[u8],
        level: Option<u8>,
    ) {
        let pkt = RtpIn {
            ssrc,
            seq,
            timestamp: ts,
            marker: self.marker,
            payload_type: 96,
            audio_level: level.map(|level| AudioLevel { voice: true, level }),
            payload,
        };
        let now = self.at(ms);
        let sent = &mut self.sent;
        self.f
            .handle_rtp(now, from, &pkt, &mut |e| sent.push(own(e)));
    }

    /// A video frame from A: `frame` numbers PID, TL0PICIDX, KEYIDX and
    /// the timestamp; two packets (seq, seq + 1).
    fn frame(&mut self, ms: u64, ssrc: u32, seq: u16, frame: u16, keyframe: bool) {
        let ts = u32::from(frame) * 3000;
        let (tl0, k) = (frame as u8, (frame % 32) as u8);
        let p1 = vp8(frame, tl0, k, keyframe, true);
        let p2 = vp8(frame, tl0, k, keyframe, false);
        self.rtp(ms, A, ssrc, seq, ts, &p1);
        self.rtp_end(ms, ssrc, seq.wrapping_add(1), ts, &p2);
    }

    fn take(&mut self, to: ParticipantId, kind: MediaKind) -> Vec<Sent> {
        let (mine, rest) = self
            .sent
            .drain(..)
            .partition(|s| s.to == to && s.kind == kind);
        self.sent = rest;
        mine
    }

    fn outputs(&mut self) -> Vec<Output> {
        std::iter::from_fn(|| self.f.poll_output()).collect()
    }

    fn counters(&self) -> Counters {
        *self.f.call_counters(CALL).unwrap()
    }
}

/// Asserts that `next` continues `prev` without a gap: sequence number,
/// PictureID, TL0PICIDX and KEYIDX + 1, timestamp later, same SSRC.
fn assert_continues(prev: &Sent, next: &Sent) {
    assert_eq!(next.hdr.ssrc, prev.hdr.ssrc, "same SSRC");
    assert_eq!(next.hdr.seq, prev.hdr.seq.wrapping_add(1), "seq continues");
    let dts = next.hdr.timestamp.wrapping_sub(prev.hdr.timestamp);
    assert!(dts > 0 && dts < 1 << 31, "timestamp moves forward ({dts})");
    if prev.kind == MediaKind::Video {
        assert_eq!(next.pid, prev.pid.map(|p| (p + 1) & 0x7fff), "PictureID");
        assert_eq!(next.tl0, prev.tl0.map(|t| t.wrapping_add(1)), "TL0PICIDX");
        assert_eq!(next.keyidx, prev.keyidx.map(|k| (k + 1) & 0x1f), "KEYIDX");
    }
}

#[test]
fn continuity_across_unsubscribe_and_resubscribe() {
    let mut h = H::new();
    let ssrc = h.f.subscribe(h.at(0), B, &vkey()).unwrap();
    h.frame(0, V_SSRC, 100, 10, true);
    for i in 1..5u16 {
        h.frame(u64::from(i) * 33, V_SSRC, 100 + 2 * i, 10 + i, false);
    }
    let before = h.take(B, MediaKind::Video);
    assert_eq!(before.len(), 10);
    assert!(before.iter().all(|s| s.hdr.ssrc == ssrc));
    // Consecutive in between too.
    for w in before.windows(2) {
        assert_eq!(w[1].hdr.seq, w[0].hdr.seq.wrapping_add(1));
    }
    h.f.unsubscribe(B, &vkey()).unwrap();
    for i in 5..40u16 {
        h.frame(u64::from(i) * 33, V_SSRC, 100 + 2 * i, 10 + i, i % 10 == 0);
    }
    assert!(
        h.take(B, MediaKind::Video).is_empty(),
        "nothing while unsubscribed"
    );
    assert_eq!(
        h.f.subscribe(h.at(1400), B, &vkey()).unwrap(),
        ssrc,
        "same SSRC"
    );
    // An inter frame first: held back; then a key frame.
    h.frame(1400, V_SSRC, 300, 200, false);
    assert!(h.take(B, MediaKind::Video).is_empty());
    h.frame(1433, V_SSRC, 302, 201, true);
    let after = h.take(B, MediaKind::Video);
    assert_eq!(after.len(), 2);
    assert_continues(before.last().unwrap(), &after[0]);
    // 1433 - 132 ms elapsed, at 90 kHz.
    let dts = after[0].hdr.timestamp.wrapping_sub(before[9].hdr.timestamp);
    assert_eq!(dts, (1433 - 132) * 90);
    assert_eq!(after[1].hdr.seq, after[0].hdr.seq.wrapping_add(1));
    assert_eq!(after[1].pid, after[0].pid, "same frame, same PictureID");
    // A packet from before the epoch's key frame, arriving late, would
    // repeat a number already sent: dropped.
    h.rtp(
        1440,
        A,
        V_SSRC,
        301,
        200 * 3000,
        &vp8(200, 200, 8, false, false),
    );
    assert!(h.take(B, MediaKind::Video).is_empty());
    assert_eq!(h.counters().drops.before_epoch, 1);
    // A packet reordered within the epoch keeps its place.
    h.frame(1500, V_SSRC, 306, 203, false);
    h.frame(1466, V_SSRC, 304, 202, false);
    let late = h.take(B, MediaKind::Video);
    assert_eq!(late.len(), 4);
    assert_eq!(late[2].hdr.seq, after[1].hdr.seq.wrapping_add(1));
    assert_eq!(late[0].hdr.seq, after[1].hdr.seq.wrapping_add(3));
    assert_eq!(late[2].pid, after[1].pid.map(|p| p + 1));
}

#[test]
fn continuity_across_publisher_ssrc_change() {
    let mut h = H::new();
    h.f.subscribe(h.at(0), B, &vkey()).unwrap();
    h.f.subscribe(h.at(0), B, &akey()).unwrap();
    h.frame(0, V_SSRC, 65534, 0x7ffe, true); // wraps seq and PictureID next
    h.frame(33, V_SSRC, 0, 0x7fff, false);
    h.rtp(0, A, A_SSRC, 7, 960, b"opus");
    let before = h.take(B, MediaKind::Video);
    let abefore = h.take(B, MediaKind::Audio);
    assert_eq!(before.len(), 4);
    assert_eq!(before[3].pid, Some(0x7fff));
    // The publisher restarts: new SSRCs, new numbering.
    let track = h.f.track_by_key(CALL, &vkey()).unwrap();
    let atrack = h.f.track_by_key(CALL, &akey()).unwrap();
    h.f.set_layer_ssrc(track, 0, 5000).unwrap();
    h.f.set_layer_ssrc(atrack, 0, 6000).unwrap();
    h.rtp(100, A, V_SSRC, 2, 6000, &vp8(1, 1, 1, false, true));
    assert!(
        h.take(B, MediaKind::Video).is_empty(),
        "old SSRC unknown now"
    );
    h.frame(200, 5000, 9000, 3, false); // not a key frame: held back
    assert!(h.take(B, MediaKind::Video).is_empty());
    h.frame(233, 5000, 9002, 4, true);
    let after = h.take(B, MediaKind::Video);
    assert_eq!(after.len(), 2);
    assert_continues(&before[3], &after[0]);
    assert_eq!(after[0].pid, Some(0), "PictureID wraps in 15 bits");
    // Audio needs no key frame: continues at once.
    h.rtp(240, A, 6000, 40_000, 1_000_000, b"opus2");
    let aafter = h.take(B, MediaKind::Audio);
    assert_eq!(aafter.len(), 1);
    assert_continues(&abefore[0], &aafter[0]);
    assert_eq!(
        aafter[0]
            .hdr
            .timestamp
            .wrapping_sub(abefore[0].hdr.timestamp),
        240 * 48
    );
    assert_eq!(aafter[0].payload, b"opus2");
    assert_eq!(h.counters().drops.unknown_source, 0);
    assert_eq!(h.f.counters().drops.unknown_source, 1);
}

#[test]
fn no_forwarding_across_calls() {
    let mut h = H::new();
    let (d, e) = (ParticipantId(4), ParticipantId(5));
    let call2 = CallId(20);
    h.f.add_call(call2).unwrap();
    h.f.add_participant(call2, d).unwrap();
    h.f.add_participant(call2, e).unwrap();
    assert_eq!(
        h.f.add_participant(call2, B),
        Err(ForwardError::ParticipantExists(B))
    );
    // Same track names in call 2, and a name only call 2 has.
    H::publish_av(&mut h.f, d, "sA", 7000, 7001);
    H::publish_av(&mut h.f, d, "sD", 7002, 7003);
    assert!(matches!(
        h.f.subscribe(h.at(0), B, &TrackKey::new("sD", "v")),
        Err(ForwardError::UnknownTrack(_))
    ));
    h.f.subscribe(h.at(0), B, &vkey()).unwrap();
    h.f.subscribe(h.at(0), B, &akey()).unwrap();
    h.f.subscribe(h.at(0), e, &vkey()).unwrap();
    h.f.subscribe(h.at(0), e, &akey()).unwrap();
    h.frame(0, V_SSRC, 1, 1, true);
    h.rtp(0, A, A_SSRC, 1, 0, b"a-audio");
    h.rtp(0, d, 7001, 1, 0, b"d-audio");
    h.rtp(0, d, 7003, 1, 0, b"d2-audio");
    // d sending with A's SSRC reaches nothing of A's.
    h.rtp(0, d, A_SSRC, 2, 0, b"spoof");
    let to_e: Vec<_> = h.sent.iter().filter(|s| s.to == e).collect();
    assert_eq!(to_e.len(), 1);
    assert_eq!(to_e[0].payload, b"d-audio");
    let to_b: Vec<_> = h.sent.iter().filter(|s| s.to == B).collect();
    assert_eq!(to_b.len(), 3);
    assert!(
        to_b.iter()
            .all(|s| s.payload != b"d-audio" && s.payload != b"spoof")
    );
    assert_eq!(h.sent.len(), 4);
    let c2 = *h.f.call_counters(call2).unwrap();
    assert_eq!((c2.packets_in, c2.packets_out), (2, 1));
    assert_eq!(h.counters().packets_in, 3);
}

#[test]
fn removed_participant_stops_sending_and_receiving() {
    let mut h = H::new();
    h.f.subscribe(h.at(0), B, &akey()).unwrap();
    h.f.subscribe(h.at(0), C, &akey()).unwrap();
    h.rtp(0, A, A_SSRC, 1, 0, b"x");
    assert_eq!(h.sent.len(), 2);
    h.sent.clear();
    h.f.remove_participant(B).unwrap();
    h.rtp(20, A, A_SSRC, 2, 960, b"y");
    assert_eq!(h.take(C, MediaKind::Audio).len(), 1);
    assert!(h.sent.is_empty(), "B receives nothing");
    assert!(matches!(
        h.f.subscribe(h.at(20), B, &akey()),
        Err(ForwardError::UnknownParticipant(_))
    ));
    // The publisher goes: its packets are dropped, its tracks gone.
    h.f.remove_participant(A).unwrap();
    h.rtp(40, A, A_SSRC, 3, 1920, b"z");
    assert!(h.sent.is_empty());
    assert_eq!(h.f.track_by_key(CALL, &akey()), None);
    assert_eq!(h.f.counters().drops.unknown_source, 1);
    assert_eq!(h.f.sizes(), (1, 1, 0, 0));
    assert_eq!(
        h.f.handle_keyframe_request(h.at(50), C, 1, KeyframeKind::Pli),
        Err(ForwardError::UnknownSsrc(1))
    );
}

#[test]
fn new_video_subscriber_waits_for_a_keyframe_and_requests_one() {
    let mut h = H::new();
    h.f.subscribe(h.at(0), B, &vkey()).unwrap();
    let track = h.f.track_by_key(CALL, &vkey()).unwrap();
    assert_eq!(
        h.outputs(),
        vec![Output::KeyframeRequest {
            publisher: A,
            track,
            layer: 0,
            ssrc: Some(V_SSRC),
            kind: KeyframeKind::Pli,
        }]
    );
    h.frame(10, V_SSRC, 1, 1, false);
    assert!(h.sent.is_empty());
    assert_eq!(h.counters().drops.awaiting_keyframe, 2);
    // Still no key frame after the interval: the request is repeated.
    h.f.handle_timeout(h.at(400));
    assert!(h.outputs().is_empty());
    h.f.handle_timeout(h.at(500));
    assert_eq!(h.outputs().len(), 1);
    h.frame(520, V_SSRC, 3, 2, true);
    let got = h.take(B, MediaKind::Video);
    assert_eq!(got.len(), 2, "the key frame and its continuation");
    h.f.handle_timeout(h.at(1100));
    assert!(h.outputs().is_empty(), "no more requests once served");
    let c = h.counters();
    assert_eq!((c.keyframe_requests_sent, c.keyframes_in), (2, 1));
}

#[test]
fn a_keyframe_the_driver_could_not_deliver_is_asked_for_again() {
    let mut h = H::new();
    h.f.subscribe(h.at(0), B, &vkey()).unwrap();
    let track = h.f.track_by_key(CALL, &vkey()).unwrap();
    assert_eq!(h.outputs().len(), 1);
    // The key frame goes out, but the driver has nowhere to put it yet.
    h.frame(30, V_SSRC, 1, 1, true);
    let lost = h.take(B, MediaKind::Video);
    assert_eq!(lost.len(), 2);
    h.f.await_keyframe(h.at(31), B, track, false).unwrap();
    assert!(h.outputs().is_empty(), "no request without asking");
    h.frame(40, V_SSRC, 3, 2, false);
    assert!(h.sent.is_empty(), "nothing before the next key frame");
    // The subscriber's m-line is ready: a request at once (the key frame
    // that arrived reset the rate limit).
    h.f.await_keyframe(h.at(50), B, track, true).unwrap();
    assert_eq!(h.outputs().len(), 1);
    h.frame(90, V_SSRC, 5, 3, true);
    let got = h.take(B, MediaKind::Video);
    assert_eq!(got.len(), 2, "the new key frame and its continuation");
    assert_continues(&lost[1], &got[0]);
    // Audio and unknown subscriptions are left alone / refused.
    let audio = h.f.track_by_key(CALL, &akey()).unwrap();
    assert!(h.f.await_keyframe(h.at(100), B, audio, true).is_err());
    h.f.subscribe(h.at(100), C, &akey()).unwrap();
    h.f.await_keyframe(h.at(100), C, audio, true).unwrap();
    assert!(h.outputs().is_empty());
}

#[test]
fn keyframe_requests_from_many_subscribers_are_coalesced() {
    let mut h = H::new();
    let subs: Vec<ParticipantId> = (100..110).map(ParticipantId).collect();
    let mut ssrcs = Vec::new();
    for &s in &subs {
        h.f.add_participant(CALL, s).unwrap();
        ssrcs.push(h.f.subscribe(h.at(0), s, &vkey()).unwrap());
    }
    assert_eq!(h.outputs().len(), 1, "ten subscriptions, one request");
    h.frame(50, V_SSRC, 1, 1, true);
    assert_eq!(h.sent.len(), 20);
    // Every subscriber asks, several times, within 400 ms.
    for round in 0..4u64 {
        for (i, (&s, &ssrc)) in subs.iter().zip(&ssrcs).enumerate() {
            let kind = if i == 3 {
                KeyframeKind::Fir
            } else {
                KeyframeKind::Pli
            };
            h.f.handle_keyframe_request(h.at(100 + round * 100), s, ssrc, kind)
                .unwrap();
        }
    }
    let out = h.outputs();
    assert_eq!(out.len(), 1, "one request at once");
    assert!(matches!(
        out[0],
        Output::KeyframeRequest {
            kind: KeyframeKind::Pli,
            ..
        }
    ));
    h.f.handle_timeout(h.at(590));
    assert!(h.outputs().is_empty(), "not before the interval");
    h.f.handle_timeout(h.at(600));
    let out = h.outputs();
    assert_eq!(out.len(), 1, "the coalesced rest, once");
    assert!(matches!(
        out[0],
        Output::KeyframeRequest {
            kind: KeyframeKind::Fir,
            ..
        }
    ));
    h.f.handle_timeout(h.at(1200));
    assert!(h.outputs().is_empty());
    // A key frame resets the wait: the next request goes at once.
    h.f.handle_keyframe_request(h.at(1300), subs[0], ssrcs[0], KeyframeKind::Pli)
        .unwrap();
    h.frame(1310, V_SSRC, 3, 2, true);
    h.f.handle_keyframe_request(h.at(1320), subs[1], ssrcs[1], KeyframeKind::Pli)
        .unwrap();
    assert_eq!(h.outputs().len(), 2);
    let c = h.counters();
    assert_eq!(c.keyframe_requests_received, 42);
    // At subscription, at 100, at 600 (the coalesced rest), at 1300 (the
    // interval since 600 has passed) and at 1320 (20 ms later: only
    // because the key frame at 1310 reset the wait).
    assert_eq!(c.keyframe_requests_sent, 5);
    assert_eq!(c.keyframe_requests_coalesced, 9 + 39);
}

#[test]
fn nack_is_served_from_the_cache_with_the_rewritten_numbers() {
    let mut h = H::new();
    let ssrc = h.f.subscribe(h.at(0), B, &vkey()).unwrap();
    h.frame(0, V_SSRC, 100, 1, true);
    h.f.unsubscribe(B, &vkey()).unwrap();
    h.f.subscribe(h.at(100), B, &vkey()).unwrap();
    // A new epoch with a non-zero offset: publisher seq 5000 -> out 102.
    h.frame(100, V_SSRC, 5000, 50, true);
    h.frame(133, V_SSRC, 5002, 51, false);
    let first = h.take(B, MediaKind::Video);
    assert_eq!(first.len(), 6);
    let lost = &first[4]; // publisher seq 5002
    assert_eq!(lost.hdr.seq, first[0].hdr.seq.wrapping_add(4));
    let mut resent = Vec::new();
    h.f.handle_nack(
        B,
        ssrc,
        &[
            lost.hdr.seq,
            first[0].hdr.seq,
            lost.hdr.seq.wrapping_add(10),
        ],
        &mut |e| resent.push(own(e)),
    )
    .unwrap();
    assert_eq!(resent.len(), 1, "the older epoch and the future are missed");
    let r = &resent[0];
    assert!(r.retransmission);
    assert_eq!(
        Sent {
            retransmission: false,
            ..r.clone()
        },
        *lost,
        "rewritten exactly as the first time"
    );
    let c = h.counters();
    assert_eq!(
        (c.nacks_received, c.nacks_served, c.nacks_missed),
        (3, 1, 2)
    );
    // Evicted after more than the cache's 512 packets.
    for i in 0..300u16 {
        h.frame(200, V_SSRC, 5004 + 2 * i, 52 + i, false);
    }
    let mut resent = Vec::new();
    h.f.handle_nack(B, ssrc, &[lost.hdr.seq], &mut |e| resent.push(own(e)))
        .unwrap();
    assert!(resent.is_empty());
    assert_eq!(h.counters().nacks_missed, 3);
    assert_eq!(
        h.f.handle_nack(C, ssrc, &[1], &mut |_| {}),
        Err(ForwardError::UnknownSsrc(ssrc))
    );
}

#[test]
fn slow_subscriber_drops_its_own_video_first_and_others_are_unaffected() {
    let mut h = H::new();
    for s in [B, C] {
        h.f.subscribe(h.at(0), s, &vkey()).unwrap();
        h.f.subscribe(h.at(0), s, &akey()).unwrap();
    }
    h.frame(0, V_SSRC, 1, 1, true);
    h.rtp(0, A, A_SSRC, 1, 0, b"a1");
    let b_video = h.take(B, MediaKind::Video);
    h.sent.clear();
    // B's queue grows past the video limit.
    h.f.set_backlog(B, 300 * 1024);
    h.frame(33, V_SSRC, 3, 2, false);
    h.rtp(33, A, A_SSRC, 2, 960, b"a2");
    assert!(h.take(B, MediaKind::Video).is_empty(), "B's video dropped");
    let b_audio = h.take(B, MediaKind::Audio);
    assert_eq!(b_audio.len(), 1, "B's audio kept");
    assert_eq!(h.take(C, MediaKind::Video).len(), 2, "C unaffected");
    assert_eq!(h.take(C, MediaKind::Audio).len(), 1);
    // Past the audio limit: B gets nothing; C still everything.
    h.f.set_backlog(B, 2 * 1024 * 1024);
    h.frame(66, V_SSRC, 5, 3, false);
    h.rtp(66, A, A_SSRC, 3, 1920, b"a3");
    assert!(h.take(B, MediaKind::Video).is_empty());
    assert!(h.take(B, MediaKind::Audio).is_empty());
    assert_eq!(h.take(C, MediaKind::Video).len(), 2);
    assert_eq!(h.take(C, MediaKind::Audio).len(), 1);
    let c = h.counters();
    assert_eq!((c.drops.congestion_video, c.drops.congestion_audio), (4, 1));
    // Drained: audio resumes at once, video at the next key frame (asked
    // for), both without a gap in B's numbering.
    h.f.set_backlog(B, 0);
    h.outputs();
    h.f.handle_timeout(h.at(700));
    assert_eq!(h.outputs().len(), 1, "a keyframe request for B");
    h.frame(700, V_SSRC, 7, 4, false);
    h.rtp(700, A, A_SSRC, 4, 2880, b"a4");
    assert!(h.take(B, MediaKind::Video).is_empty());
    let a = h.take(B, MediaKind::Audio);
    assert_eq!(a.len(), 1);
    assert_continues(&b_audio[0], &a[0]);
    h.frame(733, V_SSRC, 9, 5, true);
    let v = h.take(B, MediaKind::Video);
    assert_eq!(v.len(), 2);
    assert_continues(&b_video[1], &v[0]);
}

#[test]
fn malformed_vp8_is_dropped_and_counted() {
    let mut h = H::new();
    h.f.subscribe(h.at(0), B, &vkey()).unwrap();
    h.frame(0, V_SSRC, 1, 1, true);
    h.sent.clear();
    for bad in [
        &[][..],
        &[0x90],
        &[0x90, 0x80],
        &[0x10, 0x00, 0x00],
        &[0x80, 0x00],
    ] {
        h.rtp(10, A, V_SSRC, 3, 3000, bad);
    }
    assert!(h.sent.is_empty());
    assert_eq!(h.counters().drops.malformed, 5);
}

#[test]
fn active_speaker_needs_to_be_loudest_for_the_hold_time() {
    let mut h = H::new();
    H::publish_av(&mut h.f, B, "sB", 3000, 3001);
    H::publish_av(&mut h.f, C, "sC", 4000, 4001);
    let mut seq = 0u16;
    // 20 ms audio packets; levels per participant for [from, to) ms.
    let mut talk = |h: &mut H, from: u64, to: u64, levels: [u8; 3]| {
        let mut out = Vec::new();
        let mut t = from;
        while t < to {
            seq = seq.wrapping_add(1);
            for (p, (ssrc, l)) in [
                (A, (A_SSRC, levels[0])),
                (B, (3001, levels[1])),
                (C, (4001, levels[2])),
            ] {
                h.rtp_level(t, p, ssrc, seq, 0, b"o", Some(l));
            }
            if t.is_multiple_of(100) {
                h.f.handle_timeout(h.at(t));
                out.extend(h.outputs());
            }
            t += 20;
        }
        out
    };
    let change = |p: Option<ParticipantId>| Output::ActiveSpeakerChanged {
        call: CALL,
        participant: p,
    };
    // Silence (level 127) names nobody.
    assert!(talk(&mut h, 0, 500, [127, 127, 127]).is_empty());
    // A speaks: the first voice takes over at once.
    assert_eq!(
        talk(&mut h, 500, 1000, [20, 127, 127]),
        vec![change(Some(A))]
    );
    // C is louder for 600 ms only: no change.
    assert!(talk(&mut h, 1000, 1600, [40, 127, 10]).is_empty());
    assert_eq!(h.f.active_speaker(CALL), Some(A));
    // B is louder for long enough: it takes over about 1 s after it
    // started (plus the smoothing).
    let out = talk(&mut h, 1600, 3000, [40, 10, 127]);
    assert_eq!(out, vec![change(Some(B))]);
    assert_eq!(h.f.active_speaker(CALL), Some(B));
    // Quiet everyone: the last speaker stays.
    assert!(talk(&mut h, 3000, 4000, [127, 127, 127]).is_empty());
    h.f.remove_participant(B).unwrap();
    assert_eq!(h.outputs(), vec![change(None)]);
}

#[test]
fn backlog_before_subscribing_audio_plis_and_huge_intervals() {
    let mut f = Forwarder::new(ForwarderConfig {
        keyframe_interval: Duration::MAX,
        tick: Duration::MAX,
        ..ForwarderConfig::default()
    });
    f.add_call(CALL).unwrap();
    f.add_participant(CALL, A).unwrap();
    f.add_participant(CALL, B).unwrap();
    H::publish_av(&mut f, A, "sA", V_SSRC, A_SSRC);
    let now = Instant::now();
    // B is congested before it subscribes: its new stream is too.
    f.set_backlog(B, 2 * 1024 * 1024);
    let assrc = f.subscribe(now, B, &akey()).unwrap();
    let pkt = RtpIn {
        ssrc: A_SSRC,
        seq: 1,
        timestamp: 0,
        marker: false,
        payload_type: 111,
        audio_level: None,
        payload: b"o",
    };
    let mut n = 0;
    f.handle_rtp(now, A, &pkt, &mut |_| n += 1);
    assert_eq!(n, 0);
    assert_eq!(f.call_counters(CALL).unwrap().drops.congestion_audio, 1);
    // A PLI for an audio stream asks nothing of the publisher.
    f.handle_keyframe_request(now, B, assrc, KeyframeKind::Pli)
        .unwrap();
    assert_eq!(f.poll_output(), None);
    // Intervals too long for an Instant: requests wait, nothing panics.
    f.subscribe(now, B, &vkey()).unwrap();
    f.subscribe(now, A, &vkey()).unwrap();
    assert_eq!(std::iter::from_fn(|| f.poll_output()).count(), 1);
    f.handle_timeout(now + Duration::from_secs(1));
    assert_eq!(f.poll_output(), None);
    assert_eq!(f.poll_timeout(), None);
}

#[test]
fn call_and_participant_errors() {
    let mut f = Forwarder::new(ForwarderConfig::default());
    assert_eq!(
        f.add_participant(CALL, A),
        Err(ForwardError::UnknownCall(CALL))
    );
    f.add_call(CALL).unwrap();
    assert_eq!(f.add_call(CALL), Err(ForwardError::CallExists(CALL)));
    f.add_participant(CALL, A).unwrap();
    let spec = |ssrcs: &[u32]| TrackSpec {
        key: TrackKey::new("s", "v"),
        codec: Codec::Vp8,
        layers: ssrcs
            .iter()
            .map(|&s| LayerSpec {
                rid: Some(format!("r{s}")),
                ssrc: Some(s),
            })
            .collect(),
    };
    assert_eq!(f.publish_track(A, spec(&[])), Err(ForwardError::BadLayers));
    assert_eq!(
        f.publish_track(A, spec(&[1, 1])),
        Err(ForwardError::SsrcInUse(1))
    );
    let t = f.publish_track(A, spec(&[1, 2, 3])).unwrap();
    assert_eq!(f.layer_rid(t, 2), Some("r3"));
    assert_eq!(f.track_key(t), Some(&TrackKey::new("s", "v")));
    assert_eq!(f.track_publisher(t), Some(A));
    assert!(matches!(
        f.publish_track(A, spec(&[4])),
        Err(ForwardError::TrackExists(_))
    ));
    assert_eq!(f.set_layer_ssrc(t, 0, 2), Err(ForwardError::SsrcInUse(2)));
    assert_eq!(f.set_layer_ssrc(t, 9, 9), Err(ForwardError::BadLayers));
    f.unpublish_track(t).unwrap();
    assert_eq!(f.unpublish_track(t), Err(ForwardError::NoSuchTrack));
    assert!(f.poll_timeout().is_none());
    f.handle_timeout(Instant::now());
    assert!(f.poll_timeout().is_some());
    f.remove_call(CALL).unwrap();
    assert_eq!(f.sizes(), (0, 0, 0, 0));
    assert_eq!(f.call_of(A), None);
}

#[test]
fn long_streams_keep_forwarding_and_answering_nacks_across_wraps() {
    let mut h = H::new();
    let ssrc = h.f.subscribe(h.at(0), B, &vkey()).unwrap();
    h.frame(0, V_SSRC, 0, 0, true);
    let inter = vp8(1, 1, 1, false, true);
    let mut n = 0;
    let mut last = None;
    for i in 2..100_000u32 {
        let pkt = RtpIn {
            ssrc: V_SSRC,
            seq: i as u16,
            timestamp: i * 90,
            marker: false,
            payload_type: 96,
            audio_level: None,
            payload: &inter,
        };
        h.f.handle_rtp(h.at(u64::from(i)), A, &pkt, &mut |e| {
            n += 1;
            last = Some(e.header.seq);
        });
    }
    assert_eq!(n, 100_000 - 2, "every packet forwarded");
    let last = last.unwrap();
    let mut resent = Vec::new();
    h.f.handle_nack(B, ssrc, &[last, last.wrapping_sub(511)], &mut |e| {
        resent.push(e.header.seq)
    })
    .unwrap();
    assert_eq!(resent, vec![last, last.wrapping_sub(511)]);
    // A publisher whose numbering jumps back beyond the epoch's window
    // (last publisher seq 34463, now 3000) is followed after a run of
    // drops (at its next key frame).
    h.sent.clear();
    for i in 0..64u16 {
        h.rtp(200_000, A, V_SSRC, 3_000 + i, 0, &inter);
    }
    assert!(h.sent.is_empty());
    assert_eq!(h.counters().drops.before_epoch, 64);
    h.frame(200_100, V_SSRC, 3_064, 5, true);
    let got = h.take(B, MediaKind::Video);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].hdr.seq, last.wrapping_add(1));
}

#[test]
fn simulcast_layer_switch_waits_for_a_keyframe_and_stays_continuous() {
    let mut h = H::new();
    let key = TrackKey::new("sA", "sim");
    let track =
        h.f.publish_track(
            A,
            TrackSpec {
                key: key.clone(),
                codec: Codec::Vp8,
                layers: ["q", "h"]
                    .iter()
                    .zip([1100u32, 1101])
                    .map(|(r, s)| LayerSpec {
                        rid: Some((*r).into()),
                        ssrc: Some(s),
                    })
                    .collect(),
            },
        )
        .unwrap();
    h.f.subscribe(h.at(0), B, &key).unwrap();
    h.outputs();
    // Layer 0 flows; layer 1 goes nowhere.
    h.frame(0, 1100, 10, 10, true);
    h.frame(0, 1101, 500, 300, true);
    let low = h.take(B, MediaKind::Video);
    assert_eq!(low.len(), 2);
    assert!(h.sent.is_empty());
    // Switch to layer 1: asked for at once; layer 0 continues until layer
    // 1's key frame.
    h.f.select_layer(h.at(40), B, &key, 1).unwrap();
    assert_eq!(
        h.outputs(),
        vec![Output::KeyframeRequest {
            publisher: A,
            track,
            layer: 1,
            ssrc: Some(1101),
            kind: KeyframeKind::Pli,
        }]
    );
    assert_eq!(h.f.layer_rid(track, 1), Some("h"));
    h.frame(33, 1101, 502, 301, false);
    h.frame(33, 1100, 12, 11, false);
    let low2 = h.take(B, MediaKind::Video);
    assert_eq!(low2.len(), 2);
    assert_eq!(low2[0].payload, vp8(11, 11, 11, false, true));
    h.frame(66, 1101, 504, 302, true);
    h.frame(66, 1100, 14, 12, false);
    let high = h.take(B, MediaKind::Video);
    assert_eq!(high.len(), 2, "layer 1 only from its key frame");
    assert_continues(&low2[1], &high[0]);
    assert!(h.sent.is_empty());
    assert_eq!(
        h.f.select_layer(h.at(70), B, &key, 2),
        Err(ForwardError::BadLayers)
    );
}

/// One publisher, 20 subscribers, 20,000 packets: every subscriber gets
/// every packet (the throughput itself is for the focus bench, issue 13).
#[test]
fn every_subscriber_gets_every_packet_of_a_long_stream() {
    let mut h = H::new();
    for i in 0..20 {
        let p = ParticipantId(100 + i);
        h.f.add_participant(CALL, p).unwrap();
        h.f.subscribe(h.at(0), p, &vkey()).unwrap();
    }
    let key = vp8(1, 1, 1, true, true);
    let inter = vp8(2, 2, 2, false, true);
    let mut n = 0u64;
    let mut bytes = 0u64;
    let now = h.at(0);
    for i in 0..20_000u32 {
        let payload: &[u8] = if i == 0 { &key } else { &inter };
        let pkt = RtpIn {
            ssrc: V_SSRC,
            seq: i as u16,
            timestamp: i * 3000,
            marker: false,
            payload_type: 96,
            audio_level: None,
            payload,
        };
        h.f.handle_rtp(now, A, &pkt, &mut |e| {
            n += 1;
            bytes +=
                e.header.seq as u64 + e.vp8.map_or(0, |p| p.picture_id.map_or(0, |x| x.2 as u64));
        });
    }
    assert_eq!(n, 20_000 * 20);
    assert!(bytes > 0);
}

/// Two participants exactly as loud (two copies of one test tone): the
/// current speaker keeps its place whichever of them the forwarder looks
/// at first; the other takes over once the speaker is quiet.
#[test]
fn on_a_tie_the_current_speaker_stays() {
    for (first, second) in [(A, B), (B, A)] {
        let mut h = H::new();
        H::publish_av(&mut h.f, B, "sB", 3000, 3001);
        let ssrc = |p: ParticipantId| if p == A { A_SSRC } else { 3001 };
        let mut seq = 0u16;
        let mut out = Vec::new();
        let mut talk = |h: &mut H, from: u64, to: u64, loud: &[ParticipantId]| {
            let mut t = from;
            while t < to {
                seq = seq.wrapping_add(1);
                for p in loud {
                    h.rtp_level(t, *p, ssrc(*p), seq, 0, b"o", Some(21));
                }
                if t.is_multiple_of(100) {
                    h.f.handle_timeout(h.at(t));
                    out.extend(h.outputs());
                }
                t += 20;
            }
        };
        talk(&mut h, 0, 500, &[first]);
        talk(&mut h, 500, 4000, &[first, second]);
        assert_eq!(h.f.active_speaker(CALL), Some(first), "{first:?} stays");
        talk(&mut h, 4000, 6000, &[second]);
        assert_eq!(h.f.active_speaker(CALL), Some(second));
        let changes: Vec<Option<ParticipantId>> = out
            .iter()
            .filter_map(|o| match o {
                Output::ActiveSpeakerChanged { participant, .. } => Some(*participant),
                _ => None,
            })
            .collect();
        assert_eq!(changes, vec![Some(first), Some(second)]);
    }
}

// ---- Simulcast (issue 12) ----

/// A VP8 payload with a TID and, for a key frame's first packet, a key
/// frame header of `w` x `h`.
fn vp8_sized(pid: u16, tl0: u8, tid: u8, keyframe: bool, start: bool, size: (u16, u16)) -> Vec<u8> {
    vp8_with(pid, tl0, tid, 0, keyframe, start, size)
}

/// With a TID: the layer sync (Y) bit.
const Y: u8 = 0x80;

/// A VP8 payload: long PictureID, TL0PICIDX, TID (`| Y` for the layer
/// sync bit) and KEYIDX; a key frame header of `w` x `h` or an inter frame
/// byte.
fn vp8_with(
    pid: u16,
    tl0: u8,
    tid: u8,
    keyidx: u8,
    keyframe: bool,
    start: bool,
    (w, h): (u16, u16),
) -> Vec<u8> {
    let d = Vp8Descriptor {
        non_reference: false,
        start_of_partition: start,
        partition_index: 0,
        picture_id: Some(PictureId {
            value: pid,
            long: true,
        }),
        tl0picidx: Some(tl0),
        tid: Some((tid & 0x7f, tid & Y != 0)),
        keyidx: Some(keyidx),
        len: 0,
        keyframe: false,
    };
    let mut b = vec![0u8; 16];
    let n = d.write(&mut b).unwrap();
    b.truncate(n);
    if keyframe && start {
        b.extend_from_slice(&[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a]);
        b.extend_from_slice(&w.to_le_bytes());
        b.extend_from_slice(&h.to_le_bytes());
    } else {
        b.extend_from_slice(&[0x01, 0xaa, 0xbb]);
    }
    b
}

const SIZES: [(u16, u16); 3] = [(320, 180), (640, 360), (1280, 720)];
/// SSRCs of the three layers: listed high first, so that layer indices
/// (arrival order) differ from the size order.
const SIM_SSRC: [u32; 3] = [3002, 3000, 3001];
const SIM_RID: [&str; 3] = ["f", "q", "h"];

fn simkey() -> TrackKey {
    TrackKey::new("sA", "sim")
}

impl H {
    /// Publishes A's 3-layer track (layers learnt from RIDs as a driver
    /// does: layer 0 "f", 1 "q", 2 "h").
    fn publish_sim(&mut self) -> TrackId {
        let t = self
            .f
            .publish_track(
                A,
                TrackSpec {
                    key: simkey(),
                    codec: Codec::Vp8,
                    layers: vec![LayerSpec {
                        rid: None,
                        ssrc: None,
                    }],
                },
            )
            .unwrap();
        for (i, (rid, ssrc)) in SIM_RID.iter().zip(SIM_SSRC).enumerate() {
            let l = self.f.layer_for_rid(t, rid).unwrap();
            assert_eq!(usize::from(l), i);
            assert_eq!(self.f.layer_for_rid(t, rid).unwrap(), l, "found again");
            self.f.set_layer_ssrc(t, l, ssrc).unwrap();
        }
        t
    }

    /// Frame `n` (at 30 fps, ts 3000 apart) of each listed layer (index
    /// into SIZES: 0 low, 1 mid, 2 high), two packets each; layer seqs
    /// are 1000 apart; `key` for a key frame; `tid` its temporal layer.
    fn sim_frame(&mut self, n: u16, layers: &[usize], key: bool, tid: u8) {
        let ms = u64::from(n) * 33;
        for &l in layers {
            let ssrc = [3000, 3001, 3002][l];
            let seq = (l as u16) * 1000 + n * 2;
            let ts = u32::from(n) * 3000 + l as u32;
            let p1 = vp8_sized(n, n as u8, tid, key, true, SIZES[l]);
            let p2 = vp8_sized(n, n as u8, tid, key, false, SIZES[l]);
            self.rtp(ms, A, ssrc, seq, ts, &p1);
            self.rtp_end(ms, ssrc, seq + 1, ts, &p2);
        }
    }

    /// `s` subscribes, asks 320x180 and gets the low layer's key frame
    /// (frames 0 and 1, all key frames; what it got is discarded).
    fn sim_subscribe_low(&mut self, s: ParticipantId) {
        self.f.subscribe(self.at(0), s, &simkey()).unwrap();
        self.sim_frame(0, &[0, 1, 2], true, 0);
        self.f
            .set_wanted_size(self.at(1), s, &simkey(), Some(320), Some(180))
            .unwrap();
        self.sim_frame(1, &[0, 1, 2], true, 0);
        self.take(s, MediaKind::Video);
    }

    /// The size index of the layers a subscriber's packets came from
    /// (told by their payload: the descriptor is patched, not the rest).
    fn sizes_of(sent: &[Sent]) -> Vec<u16> {
        sent.iter()
            .filter_map(|s| {
                let d = Vp8Descriptor::parse(&s.payload).unwrap();
                layers::keyframe_size(&s.payload, &d).map(|(w, _)| w)
            })
            .collect()
    }
}

/// The subscriber's packets are consecutive (seq, and PictureID per frame).
fn assert_consecutive(sent: &[Sent]) {
    for w in sent.windows(2) {
        assert_eq!(w[1].hdr.seq, w[0].hdr.seq.wrapping_add(1), "seq continues");
        let dp = w[1].pid.unwrap().wrapping_sub(w[0].pid.unwrap()) & 0x7fff;
        assert!(
            dp <= 1,
            "PictureID continues ({:?} -> {:?})",
            w[0].pid,
            w[1].pid
        );
        let dts = w[1].hdr.timestamp.wrapping_sub(w[0].hdr.timestamp);
        assert!(dts < 1 << 31, "timestamp does not go back");
    }
}

#[test]
fn simulcast_layer_by_requested_size_and_switches_at_key_frames() {
    let mut h = H::new();
    let t = h.publish_sim();
    h.f.subscribe(h.at(0), B, &simkey()).unwrap();
    h.f.subscribe(h.at(0), C, &simkey()).unwrap();
    // Sizes are learnt from the first key frames.
    h.sim_frame(0, &[0, 1, 2], true, 0);
    h.f.set_wanted_size(h.at(10), B, &simkey(), Some(320), Some(180))
        .unwrap();
    h.f.set_wanted_size(h.at(10), C, &simkey(), Some(1280), Some(720))
        .unwrap();
    h.sent.clear();
    h.outputs();
    assert_eq!(h.f.layer_info(t, 1), Some((320, 180, 0)));
    for n in 1..15 {
        h.sim_frame(n, &[0, 1, 2], n == 1, 0);
    }
    let b = h.take(B, MediaKind::Video);
    let c = h.take(C, MediaKind::Video);
    assert_eq!(H::sizes_of(&b), vec![320], "B: the low layer's key frame");
    assert_eq!(H::sizes_of(&c), vec![1280], "C: the high layer's");
    assert_eq!(b.len(), 28);
    assert_eq!(c.len(), 28);
    assert_consecutive(&b);
    let layers: Vec<_> = h.f.subscription_layers().collect();
    assert!(
        layers
            .iter()
            .any(|l| l.subscriber == B && l.layer == 1 && l.width == 320)
    );
    assert!(
        layers
            .iter()
            .any(|l| l.subscriber == C && l.layer == 0 && l.height == 720)
    );
    // B asks 640x360: the mid layer, from its next key frame; the low one
    // goes on until then; a PLI toward the mid layer at once.
    h.f.set_wanted_size(h.at(15 * 33), B, &simkey(), Some(640), Some(360))
        .unwrap();
    assert_eq!(
        h.outputs(),
        vec![Output::KeyframeRequest {
            publisher: A,
            track: t,
            layer: 2,
            ssrc: Some(3001),
            kind: KeyframeKind::Pli,
        }]
    );
    for n in 15..20 {
        // Only the mid layer's key frame (the low one's would be forwarded
        // too, before the switch).
        h.sim_frame(n, &[0], false, 0);
        h.sim_frame(n, &[1, 2], n == 18, 0);
    }
    let b2 = h.take(B, MediaKind::Video);
    assert_eq!(H::sizes_of(&b2), vec![640]);
    // Frames 15..18 of the low layer (its frame 18 came before the mid
    // layer's key frame 18), then 18 and 19 of the mid one.
    assert_eq!(b2.len(), 12);
    let mut all = b.clone();
    all.extend(b2.iter().cloned());
    assert_consecutive(&all);
    let c2 = h.counters();
    assert_eq!(c2.layer_switches, 2, "B's first from 1280 to 320, this one");
    assert_eq!(c2.inter_before_keyframe, 0);
    assert_eq!(c2.switch_latency_max_ms, 3 * 33);
    assert_eq!(
        h.f.switch_latencies().last(),
        Some(Duration::from_millis(99))
    );
    // No size: the largest.
    h.f.set_wanted_size(h.at(20 * 33), B, &simkey(), None, None)
        .unwrap();
    h.sim_frame(20, &[0, 1, 2], true, 0);
    assert_eq!(H::sizes_of(&h.take(B, MediaKind::Video)), vec![640, 1280]);
}

#[test]
fn paused_layer_is_skipped_and_steps_down_lower_the_layer() {
    let mut h = H::new();
    h.publish_sim();
    h.f.subscribe(h.at(0), C, &simkey()).unwrap();
    h.sim_frame(0, &[0, 1, 2], true, 0);
    h.f.set_wanted_size(h.at(1), C, &simkey(), Some(1280), Some(720))
        .unwrap();
    for n in 1..10 {
        h.sim_frame(n, &[0, 1, 2], false, 0);
    }
    assert_eq!(H::sizes_of(&h.take(C, MediaKind::Video)), vec![1280]);
    // The high layer stops (its publisher paused it): after ~1 s it is
    // skipped; C moves to the mid layer at its next key frame.
    for n in 10..50 {
        h.sim_frame(n, &[0, 1], n == 45, 0);
        h.f.handle_timeout(h.at(u64::from(n) * 33));
    }
    let c = h.take(C, MediaKind::Video);
    assert_eq!(H::sizes_of(&c), vec![640]);
    assert_eq!(c.len(), 10, "frames 45..49 of the mid layer");
    // The high layer comes back: C returns to it at its key frame.
    for n in 50..60 {
        h.sim_frame(n, &[0, 1, 2], n == 50 || n == 55, 0);
        h.f.handle_timeout(h.at(u64::from(n) * 33));
    }
    assert_eq!(
        H::sizes_of(&h.take(C, MediaKind::Video)),
        vec![640, 640, 1280],
        "mid key frames 50 and 55, then the high one of 55"
    );
    // One loss step down: the mid layer; another: the low one; a third
    // changes nothing.
    assert!(h.f.can_step_down(h.at(60 * 33), C));
    h.f.set_layer_steps(C, 1);
    for n in 60..62 {
        h.f.handle_timeout(h.at(u64::from(n) * 33));
        h.sim_frame(n, &[0, 1, 2], n == 61, 0);
    }
    assert_eq!(H::sizes_of(&h.take(C, MediaKind::Video)), vec![640]);
    h.f.set_layer_steps(C, 3);
    for n in 62..64 {
        h.f.handle_timeout(h.at(u64::from(n) * 33));
        h.sim_frame(n, &[0, 1, 2], n == 63, 0);
    }
    assert_eq!(H::sizes_of(&h.take(C, MediaKind::Video)), vec![320]);
    assert!(!h.f.can_step_down(h.at(64 * 33), C));
    assert_eq!(h.counters().layer_switches, 4, "mid, high, mid, low");
}

#[test]
fn switch_falls_back_when_the_target_sends_no_key_frame() {
    let mut h = H::new();
    let t = h.publish_sim();
    h.sim_subscribe_low(B);
    let before = h.counters();
    // B wants the high layer, which never sends a key frame again.
    h.f.set_wanted_size(h.at(2 * 33), B, &simkey(), Some(1280), Some(720))
        .unwrap();
    let mut got = Vec::new();
    for n in 2..70 {
        h.sim_frame(n, &[0, 1, 2], false, 0);
        h.f.handle_timeout(h.at(u64::from(n) * 33));
        got.extend(h.take(B, MediaKind::Video));
    }
    // The low layer went on throughout (continuous), nothing else came.
    assert_eq!(got.len(), 68 * 2);
    assert!(got.iter().all(|s| s.payload.len() == got[0].payload.len()));
    assert_consecutive(&got);
    let c = h.counters();
    assert_eq!(c.layer_switch_fallbacks, 1, "given up once after 2 s");
    assert_eq!(c.layer_switches, before.layer_switches);
    // Still on the low layer; the target is now the mid layer (the
    // largest usable one, the high one being skipped), which would be
    // given up in turn if it sent no key frame either.
    let l =
        h.f.subscription_layers()
            .find(|l| l.subscriber == B)
            .unwrap();
    assert_eq!((l.layer, l.target), (1, 2));
    // Keyframe requests toward the high layer: one at once, repeats every
    // 500 ms while waiting, none after the fallback.
    let reqs = h
        .outputs()
        .into_iter()
        .filter(|o| matches!(o, Output::KeyframeRequest { layer: 0, track, .. } if *track == t))
        .count();
    assert!((4..=5).contains(&reqs), "{reqs} requests");
    // The skipped layer is usable again after its next key frame.
    h.sim_frame(70, &[0, 1, 2], true, 0);
    h.f.handle_timeout(h.at(70 * 33));
    h.sim_frame(71, &[0, 1, 2], true, 0);
    assert_eq!(
        H::sizes_of(&h.take(B, MediaKind::Video)).last(),
        Some(&1280)
    );
}

#[test]
fn without_the_key_frame_wait_inter_frames_of_the_new_layer_go_first() {
    for wait in [true, false] {
        let mut h = H::new();
        h.f = Forwarder::new(ForwarderConfig {
            switch_on_keyframe: wait,
            ..ForwarderConfig::default()
        });
        h.f.add_call(CALL).unwrap();
        for p in [A, B] {
            h.f.add_participant(CALL, p).unwrap();
        }
        h.publish_sim();
        h.sim_subscribe_low(B);
        let before = h.counters().layer_switches;
        h.f.set_wanted_size(h.at(40), B, &simkey(), None, None)
            .unwrap();
        for n in 2..10 {
            h.sim_frame(n, &[0], false, 0);
            h.sim_frame(n, &[1, 2], n == 6, 0);
        }
        let b = h.take(B, MediaKind::Video);
        assert_consecutive(&b);
        let c = h.counters();
        assert_eq!(c.layer_switches, before + 1);
        if wait {
            assert_eq!(c.inter_before_keyframe, 0);
            assert_eq!(b.len(), 18);
        } else {
            assert_eq!(c.inter_before_keyframe, 4, "frames 2..5 of the high layer");
            assert_eq!(
                h.f.switch_latencies().last(),
                Some(Duration::from_millis(2 * 33 - 40))
            );
        }
    }
}

#[test]
fn temporal_layers_above_the_maximum_are_dropped_with_continuous_numbering() {
    let mut h = H::new();
    h.publish_sim();
    h.f.subscribe(h.at(0), B, &simkey()).unwrap();
    h.f.subscribe(h.at(0), C, &simkey()).unwrap();
    h.sim_frame(0, &[0, 1, 2], true, 0);
    for s in [B, C] {
        h.f.set_wanted_size(h.at(1), s, &simkey(), Some(320), Some(180))
            .unwrap();
    }
    h.f.set_max_temporal(B, &simkey(), Some(0)).unwrap();
    h.sent.clear();
    // L1T2: odd frames TID 0, even ones TID 1; the key frame is TID 0.
    for n in 1..22 {
        h.sim_frame(n, &[0], n == 1, (n % 2 == 0) as u8);
    }
    let b = h.take(B, MediaKind::Video);
    let c = h.take(C, MediaKind::Video);
    assert_eq!(c.len(), 42, "all 21 frames");
    assert_eq!(b.len(), 22, "11 frames: TID 0 only");
    assert_consecutive(&b);
    let pids: Vec<u16> = b.iter().step_by(2).map(|s| s.pid.unwrap()).collect();
    assert!(pids.windows(2).all(|w| w[1] == w[0] + 1), "{pids:?}");
    assert_eq!(h.counters().drops.temporal, 20);
    // NACKs: the packets after the last drop are served as sent; those
    // before it (sent with another offset) are missed, never misnamed.
    let ssrc = b[0].hdr.ssrc;
    let mut again = Vec::new();
    h.f.handle_nack(
        B,
        ssrc,
        &[b[21].hdr.seq, b[20].hdr.seq, b[0].hdr.seq],
        &mut |e| again.push(own(e)),
    )
    .unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(again[0].hdr, b[21].hdr);
    assert_eq!(again[0].payload, b[21].payload);
    assert_eq!(again[1].hdr, b[20].hdr);
    assert_eq!(h.counters().nacks_missed, 1);
    // All temporal layers again: TID 1 from its next layer sync frame on
    // (frame 22 refers to TID 1 frames B never got; 24 only to TID 0).
    h.f.set_max_temporal(B, &simkey(), None).unwrap();
    for n in 22..28 {
        let tid = match n {
            24 => 1 | Y,
            _ => (n % 2 == 0) as u8,
        };
        h.sim_frame(n, &[0], false, tid);
    }
    let b2 = h.take(B, MediaKind::Video);
    assert_eq!(b2.len(), 10, "frames 23 to 27");
    assert_eq!(h.counters().drops.temporal, 22, "and frame 22");
    let mut all = b;
    all.extend(b2);
    assert_consecutive(&all);
    // Automatic: C asks 160x90 (half the low layer's size) and gets TID
    // 0 only; 161x90 all again.
    h.take(C, MediaKind::Video);
    h.f.set_wanted_size(h.at(26 * 33), C, &simkey(), Some(160), Some(90))
        .unwrap();
    for n in 28..32 {
        h.sim_frame(n, &[0], false, (n % 2 == 0) as u8);
    }
    assert_eq!(h.take(C, MediaKind::Video).len(), 4, "frames 29 and 31");
    h.f.set_wanted_size(h.at(32 * 33), C, &simkey(), Some(161), Some(90))
        .unwrap();
    for n in 32..36 {
        h.sim_frame(n, &[0], false, (n % 2 == 0) as u8 | Y);
    }
    assert_eq!(h.take(C, MediaKind::Video).len(), 8);
}

/// Frame `n` (at `n` x 33 ms) of the three simulcast layers, two packets
/// each, padded to about 15, 110 and 400 kbit/s at 30 fps.
fn padded_sim_frame(h: &mut H, n: u16, key: bool) {
    let ms = u64::from(n) * 33;
    for l in 0..3usize {
        let ssrc = [3000, 3001, 3002][l];
        let seq = (l as u16) * 1000 + n * 2;
        let mut p1 = vp8_sized(n, n as u8, 0, key, true, SIZES[l]);
        let mut p2 = vp8_sized(n, n as u8, 0, key, false, SIZES[l]);
        let pad = [0usize, 200, 800][l];
        p1.resize(p1.len() + pad, 0);
        p2.resize(p2.len() + pad, 0);
        let ts = u32::from(n) * 3000;
        h.rtp(ms, A, ssrc, seq, ts, &p1);
        h.rtp_end(ms, ssrc, seq + 1, ts, &p2);
    }
}

/// One frame of [`padded_sim_frame`] at frame `n` (30 fps), then the
/// forwarder's timeout.
fn padded_step(h: &mut H, n: u16, key: bool) {
    padded_sim_frame(h, n, key);
    h.f.handle_timeout(h.at(u64::from(n) * 33));
}

/// C subscribed to a simulcast publisher sending 2 s of padded frames
/// (a key frame every 15); the layers' measured rates by index.
fn padded_sim_subscriber(h: &mut H) -> Vec<u64> {
    h.publish_sim();
    h.f.subscribe(h.at(0), C, &simkey()).unwrap();
    for n in 0..60 {
        padded_step(h, n, n % 15 == 0);
    }
    let t = h.f.subscription_layers().next().unwrap().track;
    (0..3).map(|l| h.f.layer_info(t, l).unwrap().2).collect()
}

#[test]
fn downlink_estimate_caps_layers_and_rises_only_after_holding() {
    let mut h = H::new();
    // 2 s of frames: per layer 2 packets of ~30 bytes per frame at 30 fps
    // (~15 kbit/s each; scaled by padding the high layers).
    let rates = padded_sim_subscriber(&mut h);
    let step = padded_step;
    // Layer 1 (low) ~ 2 * 30 B, layer 2 (mid) + 400 B, layer 0 (high) + 1600 B per frame.
    assert!(rates[1] < rates[2] && rates[2] < rates[0], "{rates:?}");
    assert_eq!(
        H::sizes_of(&h.take(C, MediaKind::Video)).last(),
        Some(&1280)
    );
    // An estimator's first figure, even a low one, is a guess: nothing is
    // capped before the estimate falls.
    h.f.set_downlink_estimate(C, Some(rates[1]));
    for n in 60..62 {
        step(&mut h, n, false);
    }
    assert!(!h.f.downlink_constrained(C));
    h.f.set_downlink_estimate(C, Some(rates[0] * 2));
    // It falls, between the mid and high rates (below what is sent): down
    // to mid at the next key frame.
    h.f.set_downlink_estimate(C, Some((rates[2] + rates[0]) / 2));
    for n in 62..76 {
        step(&mut h, n, n % 15 == 0);
    }
    assert_eq!(H::sizes_of(&h.take(C, MediaKind::Video)).last(), Some(&640));
    // Plenty again: up only after 3 s of holding (then the next key frame).
    h.f.set_downlink_estimate(C, Some(rates[0] * 2));
    let mut first_high = None;
    for n in 76..200 {
        step(&mut h, n, n % 15 == 0);
        if first_high.is_none() && H::sizes_of(&h.take(C, MediaKind::Video)).contains(&1280) {
            first_high = Some(n);
        }
    }
    let n = first_high.expect("back to the high layer");
    assert!(!h.f.downlink_constrained(C), "the cap is lifted once back");
    let waited = u64::from(n - 76) * 33;
    assert!(
        (3000..3000 + 15 * 33 + 100).contains(&waited),
        "{waited} ms"
    );
}

#[test]
fn a_falling_estimate_caps_only_near_a_sign_of_loss() {
    let mut h = H::with_config(ForwarderConfig::default());
    let rates = padded_sim_subscriber(&mut h);
    let step = padded_step;
    h.f.set_downlink_estimate(C, Some(rates[0] * 2));
    // It falls below what is sent, with no sign of loss (a CPU-starved
    // estimator): no cap, the high layer goes on.
    h.f.set_downlink_estimate(C, Some((rates[2] + rates[0]) / 2));
    for n in 60..200 {
        step(&mut h, n, n % 15 == 0);
    }
    assert!(!h.f.downlink_constrained(C));
    assert_eq!(
        H::sizes_of(&h.take(C, MediaKind::Video)).last(),
        Some(&1280)
    );
    // Loss 4 s ago (longer than 3 s) counts no more.
    h.f.note_downlink_loss(C, h.at(200 * 33 - 4000));
    h.f.set_downlink_estimate(C, Some((rates[2] + rates[0]) / 2 - 1));
    step(&mut h, 200, false);
    assert!(!h.f.downlink_constrained(C));
    // Loss now, a little after that fall (a receiver report comes up to
    // a second after the estimate moved): that fall caps, down to mid at
    // the next key frame.
    h.f.note_downlink_loss(C, h.at(220 * 33));
    for n in 201..236 {
        step(&mut h, n, n % 15 == 0);
    }
    assert!(h.f.downlink_constrained(C));
    assert_eq!(H::sizes_of(&h.take(C, MediaKind::Video)).last(), Some(&640));
    // And the other order: loss first, then the fall within 3 s.
    let mut h = H::with_config(ForwarderConfig::default());
    let rates = padded_sim_subscriber(&mut h);
    h.f.set_downlink_estimate(C, Some(rates[0] * 2));
    for n in 60..100 {
        step(&mut h, n, n % 15 == 0);
    }
    h.f.note_downlink_loss(C, h.at(100 * 33));
    step(&mut h, 100, false);
    assert!(!h.f.downlink_constrained(C), "loss alone caps nothing");
    h.f.set_downlink_estimate(C, Some((rates[2] + rates[0]) / 2));
    for n in 101..131 {
        step(&mut h, n, n % 15 == 0);
    }
    assert!(h.f.downlink_constrained(C));
    assert_eq!(H::sizes_of(&h.take(C, MediaKind::Video)).last(), Some(&640));
}

#[test]
fn each_layers_hold_runs_from_when_the_estimate_first_allows_it() {
    let mut h = H::new();
    let rates = padded_sim_subscriber(&mut h);
    let step = padded_step;
    // Capped to the low layer (index 1).
    h.f.set_downlink_estimate(C, Some(rates[0] * 2));
    h.f.set_downlink_estimate(C, Some(rates[1] * 2));
    for n in 60..120 {
        step(&mut h, n, n % 15 == 0);
    }
    assert_eq!(H::sizes_of(&h.take(C, MediaKind::Video)).last(), Some(&320));
    // The estimate allows the high layer (and so the middle one) at once:
    // up to the middle after its hold, then to the high one a step gap
    // (1 s) later (its hold ran meanwhile), not one more hold later.
    let first = |h: &mut H, from: u16, to: u16, size: u16| {
        (from..to).find(|&n| {
            step(h, n, n % 15 == 0);
            H::sizes_of(&h.take(C, MediaKind::Video)).contains(&size)
        })
    };
    h.f.set_downlink_estimate(C, Some(rates[0] * 2));
    let mid = first(&mut h, 120, 300, 640).expect("the middle layer");
    let high = first(&mut h, mid + 1, 400, 1280).expect("the high layer");
    let (mid_ms, high_ms) = (u64::from(mid - 120) * 33, u64::from(high - 120) * 33);
    assert!(
        (3000..3000 + 15 * 33 + 100).contains(&mid_ms),
        "{mid_ms} ms"
    );
    assert!(
        high_ms < mid_ms + 1000 + 15 * 33 + 100,
        "{high_ms} ms, middle at {mid_ms}"
    );
    // Held there past `up_calm` (the steps did not fail, so the next hold
    // is the first one again); capped again; then an estimate that allows
    // the middle layer only, and 2 s later the high one: the high layer
    // waits its own full hold from then.
    for n in high + 1..high + 400 {
        step(&mut h, n, n % 15 == 0);
    }
    let n0 = high + 400;
    h.f.set_downlink_estimate(C, Some(rates[1] * 2));
    for n in n0..n0 + 60 {
        step(&mut h, n, n % 15 == 0);
    }
    assert_eq!(H::sizes_of(&h.take(C, MediaKind::Video)).last(), Some(&320));
    h.f.set_downlink_estimate(C, Some(rates[2] * 2));
    for n in n0 + 60..n0 + 120 {
        step(&mut h, n, n % 15 == 0);
    }
    h.f.set_downlink_estimate(C, Some(rates[0] * 2));
    let high = first(&mut h, n0 + 120, n0 + 300, 1280).expect("the high layer again");
    let high_ms = u64::from(high - (n0 + 120)) * 33;
    assert!(
        (3000..3000 + 15 * 33 + 100).contains(&high_ms),
        "{high_ms} ms"
    );
}

#[test]
fn layers_learnt_from_rids_are_bounded_and_checked() {
    let mut h = H::new();
    let t = h.publish_sim();
    assert_eq!(h.f.layer_count(t), Some(3));
    assert_eq!(h.f.layer_for_rid(t, "x"), Ok(3));
    assert_eq!(h.f.layer_for_rid(t, "y"), Err(ForwardError::BadLayers));
    assert_eq!(h.f.layer_count(t), Some(MAX_LAYERS));
    // An audio track has one layer only.
    let audio = h.f.track_by_key(CALL, &akey()).unwrap();
    assert_eq!(h.f.layer_for_rid(audio, "q"), Err(ForwardError::BadLayers));
    // A size or temporal limit needs an active subscription to the track.
    assert_eq!(
        h.f.set_wanted_size(h.at(0), B, &simkey(), Some(1), Some(1)),
        Err(ForwardError::UnknownTrack(simkey()))
    );
    assert_eq!(
        h.f.set_max_temporal(B, &TrackKey::new("no", "pe"), Some(0)),
        Err(ForwardError::UnknownTrack(TrackKey::new("no", "pe")))
    );
    // A layer with no key frame yet is never chosen; nothing moves.
    h.f.subscribe(h.at(0), B, &simkey()).unwrap();
    h.f.set_wanted_size(h.at(0), B, &simkey(), Some(320), Some(180))
        .unwrap();
    h.f.handle_timeout(h.at(50));
    let l =
        h.f.subscription_layers()
            .find(|l| l.subscriber == B)
            .unwrap();
    assert_eq!((l.layer, l.target, l.width), (0, 0, 0));
    assert!(!h.f.can_step_down(h.at(50), B));
}

#[test]
fn a_switch_never_cuts_a_frame_of_the_current_layer() {
    let mut h = H::new();
    let t = h.publish_sim();
    h.sim_subscribe_low(B);
    h.sim_frame(2, &[0, 1, 2], false, 0);
    h.take(B, MediaKind::Video);
    h.outputs();
    h.f.set_wanted_size(h.at(90), B, &simkey(), None, None)
        .unwrap();
    h.outputs();
    // The layers interleave: the high layer's key frame starts while the
    // low layer's frame 3 is half sent.
    let low = |n: u16, start: bool| vp8_sized(n, n as u8, 0, false, start, SIZES[0]);
    let high = |n: u16, start: bool| vp8_sized(n, n as u8, 0, true, start, SIZES[2]);
    h.rtp(99, A, 3000, 6, 9000, &low(3, true));
    h.rtp(99, A, 3002, 2006, 9002, &high(3, true));
    h.rtp_end(99, 3002, 2007, 9002, &high(3, false));
    h.rtp_end(99, 3000, 7, 9000, &low(3, false));
    let b = h.take(B, MediaKind::Video);
    assert_eq!(b.len(), 2, "the low frame whole, no high packet");
    assert!(b[1].hdr.marker);
    let c = h.counters();
    assert_eq!(c.layer_switches_deferred, 1);
    // A key frame of the high layer is asked for again (the first request
    // went at set_wanted_size: rate limited, it is pending).
    h.f.handle_timeout(h.at(600));
    assert!(h.outputs().iter().any(|o| matches!(o,
        Output::KeyframeRequest { track, layer: 0, .. } if *track == t)));
    // The next high key frame, at a frame boundary: switched.
    h.sim_frame(4, &[0], false, 0);
    h.sim_frame(4, &[2], true, 0);
    let b2 = h.take(B, MediaKind::Video);
    assert_eq!(H::sizes_of(&b2), vec![1280]);
    let mut all = b;
    all.extend(b2);
    assert_consecutive(&all);
    assert_eq!(h.counters().layer_switches, c.layer_switches + 1);
    // A current layer gone quiet is not waited on: a switch at once even
    // though its last frame never ended.
    h.f.set_wanted_size(h.at(700), B, &simkey(), Some(320), Some(180))
        .unwrap();
    h.rtp(700, A, 3002, 2010, 15002, &high(5, true));
    h.rtp(
        900,
        A,
        3000,
        10,
        15000,
        &vp8_sized(5, 5, 0, true, true, SIZES[0]),
    );
    assert_eq!(H::sizes_of(&h.take(B, MediaKind::Video)), vec![1280, 320]);
}

impl H {
    /// A forwarder as [`H::new`] with `config`.
    fn with_config(config: ForwarderConfig) -> Self {
        let mut h = Self::new();
        let mut f = Forwarder::new(config);
        f.add_call(CALL).unwrap();
        for p in [A, B, C] {
            f.add_participant(CALL, p).unwrap();
        }
        Self::publish_av(&mut f, A, "sA", V_SSRC, A_SSRC);
        h.f = f;
        h
    }

    /// One 20 ms step of A's media from `ms`: an audio packet of 20 bytes
    /// and, every other step, a video frame (two packets, `pad` bytes
    /// added to each); the forwarder's tick runs. Returns the next frame
    /// number.
    fn step_av(&mut self, ms: u64, frame: u16, keyframe: bool, pad: usize) -> u16 {
        let a_seq = (ms / 20) as u16;
        self.rtp(ms, A, A_SSRC, a_seq, (ms * 48) as u32, &[0x55; 20]);
        let mut next = frame;
        if (ms / 20).is_multiple_of(2) {
            let ts = u32::from(frame) * 3000;
            let (tl0, k) = (frame as u8, (frame % 32) as u8);
            let mut p1 = vp8(frame, tl0, k, keyframe, true);
            let mut p2 = vp8(frame, tl0, k, keyframe, false);
            p1.resize(p1.len() + pad, 0x11);
            p2.resize(p2.len() + pad, 0x22);
            let seq = frame.wrapping_mul(2);
            self.rtp(ms, A, V_SSRC, seq, ts, &p1);
            self.rtp_end(ms, V_SSRC, seq.wrapping_add(1), ts, &p2);
            next = frame.wrapping_add(1);
        }
        self.f.handle_timeout(self.at(ms));
        next
    }
}

/// A publisher's one-layer video above its limit is held back from its
/// subscribers (audio goes on), and comes back from a key frame once the
/// publisher is under 80 % of its share again.
#[test]
fn a_publisher_over_its_limit_loses_its_video_until_it_is_back_under() {
    let mut h = H::with_config(ForwarderConfig {
        publisher_limit_bps: Some(60_000),
        ..ForwarderConfig::default()
    });
    h.f.subscribe(h.at(0), B, &vkey()).unwrap();
    h.f.subscribe(h.at(0), B, &akey()).unwrap();
    // 3 s within the limit: audio 8 kbit/s, video about 8 kbit/s.
    let mut frame = 0;
    for ms in (0..3000).step_by(20) {
        frame = h.step_av(ms, frame, ms == 0, 0);
    }
    assert!(
        h.take(B, MediaKind::Video).len() > 140,
        "video within the limit"
    );
    assert!(h.take(B, MediaKind::Audio).len() > 140);
    assert_eq!(h.counters().layers_policed, 0);
    h.outputs();
    // 5 s at about 100 kbit/s of video (share: 60 - 8 = 52): held back
    // after two rate windows over it.
    let mut last_video = None;
    for ms in (3000..8000).step_by(20) {
        frame = h.step_av(ms, frame, false, 200);
        if !h.take(B, MediaKind::Video).is_empty() {
            last_video = Some(ms);
        }
    }
    let last_video = last_video.unwrap();
    assert!(
        (4000..=6000).contains(&last_video),
        "video held back after two windows over: last at {last_video} ms"
    );
    let audio = h.take(B, MediaKind::Audio);
    assert_eq!(audio.len(), 250, "audio never held back");
    let c = h.counters();
    assert_eq!(c.layers_policed, 1);
    assert!(c.drops.over_limit > 50, "{c:?}");
    // No keyframe requests toward a held-back layer.
    assert!(
        !h.outputs()
            .iter()
            .any(|o| matches!(o, Output::KeyframeRequest { .. })),
        "keyframes asked of a held-back layer"
    );
    // Back to 8 kbit/s: let go after two windows at or under 80 % of the
    // share, a key frame is asked for, and the video resumes with it.
    let mut asked_at = None;
    for ms in (8000..12000).step_by(20) {
        let key = asked_at.is_some_and(|t| ms == t + 40);
        frame = h.step_av(ms, frame, key, 0);
        if asked_at.is_none()
            && h.outputs().iter().any(|o| {
                matches!(
                    o,
                    Output::KeyframeRequest {
                        ssrc: Some(V_SSRC),
                        ..
                    }
                )
            })
        {
            asked_at = Some(ms);
        }
    }
    let asked_at = asked_at.expect("a key frame asked for when let go");
    assert!(
        (9000..=11000).contains(&asked_at),
        "let go at {asked_at} ms"
    );
    let back = h.take(B, MediaKind::Video);
    assert!(!back.is_empty(), "video back");
    let first = Vp8Descriptor::parse(&back[0].payload).unwrap();
    assert!(first.keyframe, "resumed at a key frame");
    assert_eq!(h.counters().layers_policed, 1);
}

/// A simulcast subscription whose layer goes over the publisher's limit
/// moves to a layer within it; the held-back layer is not chosen.
#[test]
fn a_simulcast_layer_over_the_limit_is_left_for_one_within_it() {
    let mut h = H::with_config(ForwarderConfig {
        publisher_limit_bps: Some(150_000),
        ..ForwarderConfig::default()
    });
    h.publish_sim();
    h.f.subscribe(h.at(0), C, &simkey()).unwrap();
    // The high layer (SIZES[2]) at about 240 kbit/s, the others small.
    let mut got_high = 0;
    for n in 0..200u16 {
        let ms = u64::from(n) * 33;
        for l in [0usize, 1, 2] {
            let ssrc = [3000, 3001, 3002][l];
            let seq = (l as u16) * 1000 + n * 2;
            let ts = u32::from(n) * 3000 + l as u32;
            let key = n % 30 == 0;
            let mut p1 = vp8_sized(n, n as u8, 0, key, true, SIZES[l]);
            let mut p2 = vp8_sized(n, n as u8, 0, key, false, SIZES[l]);
            if l == 2 {
                p1.resize(p1.len() + 450, 0x11);
                p2.resize(p2.len() + 450, 0x22);
            }
            h.rtp(ms, A, ssrc, seq, ts, &p1);
            h.rtp_end(ms, ssrc, seq + 1, ts, &p2);
        }
        h.f.handle_timeout(h.at(ms));
        let sent = h.take(C, MediaKind::Video);
        if n < 30 {
            got_high += H::sizes_of(&sent).iter().filter(|w| **w == 1280).count();
        } else if n >= 150 {
            assert!(
                !H::sizes_of(&sent).contains(&1280),
                "the held-back layer still forwarded at frame {n}"
            );
        }
    }
    assert!(got_high > 0, "the high layer before it was measured");
    let layers: Vec<_> = h.f.subscription_layers().collect();
    assert!(
        layers.iter().any(|l| l.subscriber == C && l.width == 640),
        "C on the mid layer: {layers:?}"
    );
    assert_eq!(h.counters().layers_policed, 1);
}

#[test]
fn failed_steps_up_on_the_estimate_wait_longer_until_it_clearly_rises() {
    let mut h = H::new();
    h.publish_sim();
    h.f.subscribe(h.at(0), C, &simkey()).unwrap();
    // As above: three layers of ~15, ~110 and ~400 kbit/s.
    // `run` sends up to `frames` frames and stops after the first key
    // frame of width `until` forwarded: the widths of the key frames
    // forwarded, and how many frames it sent.
    let mut n = 0u16;
    let mut run = |h: &mut H, frames: u16, until: u16| -> (Vec<u16>, u16) {
        let mut sizes = Vec::new();
        for i in 0..frames {
            padded_sim_frame(h, n, n.is_multiple_of(15));
            h.f.handle_timeout(h.at(u64::from(n) * 33));
            sizes.extend(H::sizes_of(&h.take(C, MediaKind::Video)));
            n += 1;
            if sizes.last() == Some(&until) {
                return (sizes, i + 1);
            }
        }
        (sizes, frames)
    };
    run(&mut h, 60, 0);
    let t = h.f.subscription_layers().next().unwrap().track;
    let mut rates: Vec<u64> = (0..3).map(|l| h.f.layer_info(t, l).unwrap().2).collect();
    rates.sort_unstable();
    let [low, mid, high] = [rates[0], rates[1], rates[2]];
    // Congested: down to the low layer.
    h.f.set_downlink_estimate(C, Some(high * 2));
    h.f.set_downlink_estimate(C, Some((low + mid) / 2));
    assert_eq!(run(&mut h, 20, 0).0.last(), Some(&320));
    // Room for the middle layer (not the top one): up after `up_hold`;
    // then it falls back within `up_calm`, and the next step up waits
    // twice as long, then four times; an estimate 25 % above the one the
    // steps failed on waits `up_hold` again.
    let room = mid * 13 / 10;
    let mut waits = Vec::new();
    for (estimate, fail) in [
        (room, true),
        (room, true),
        (room, true),
        (room * 13 / 10, false),
    ] {
        h.f.set_downlink_estimate(C, Some(estimate));
        let (sizes, frames) = run(&mut h, 800, 640);
        assert_eq!(sizes.last(), Some(&640), "a step up");
        waits.push(u64::from(frames) * 33);
        if fail {
            h.f.set_downlink_estimate(C, Some((low + mid) / 2));
            assert_eq!(run(&mut h, 20, 0).0.last(), Some(&320));
        }
    }
    let near = |got: u64, hold: u64| (hold * 1000..hold * 1000 + 15 * 33 + 200).contains(&got);
    assert!(near(waits[0], 3), "{waits:?}");
    assert!(near(waits[1], 6), "{waits:?}");
    assert!(near(waits[2], 12), "{waits:?}");
    assert!(near(waits[3], 3), "{waits:?}");
    assert!(h.f.downlink_constrained(C));
}
