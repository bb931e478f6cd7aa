//! Drives one forwarder with arbitrary bytes: RTP datagrams (parsed, then
//! forwarded as VP8 video or Opus audio), bare VP8 payload descriptors
//! (parse, write back, patch), NACKs, keyframe requests, subscription
//! changes, SSRC changes, backlogs and time. It must never panic, and every
//! packet it hands out must be writable and, for VP8, still parse.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use groupcall_focus::forward::*;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    /// A well-formed VP8 packet from the publisher (so that key frames,
    /// rewriting and NACKs are reached), with fuzzed fields.
    Video {
        layer: u8,
        seq: u16,
        ts: u32,
        desc: (
            bool,
            bool,
            u8,
            Option<(u16, bool)>,
            Option<u8>,
            Option<(u8, bool)>,
            Option<u8>,
        ),
        keyframe: bool,
        tail: Vec<u8>,
    },
    /// A datagram from a participant; `as_ssrc` overrides its SSRC with
    /// one of the published ones (so that most reach the forwarding path).
    Datagram {
        from: u8,
        as_ssrc: u8,
        bytes: Vec<u8>,
    },
    /// A bare VP8 payload.
    Vp8 {
        payload: Vec<u8>,
        pid: u16,
        tl0: u8,
        keyidx: u8,
    },
    /// A NACK for sequence numbers `back` before the last one the
    /// stream sent (so that some hit the cache).
    Nack {
        who: u8,
        track: u8,
        back: Vec<u8>,
    },
    Pli {
        who: u8,
        track: u8,
        fir: bool,
    },
    Subscribe {
        who: u8,
        track: u8,
        on: bool,
    },
    Layer {
        who: u8,
        layer: u8,
    },
    NewSsrc {
        track: u8,
        layer: u8,
        ssrc: u32,
    },
    Backlog {
        who: u8,
        bytes: u32,
    },
    Advance(u16),
    Timeout,
    Remove {
        who: u8,
    },
}

const CALL: CallId = CallId(1);
const PEOPLE: [ParticipantId; 3] = [ParticipantId(1), ParticipantId(2), ParticipantId(3)];
/// Video, audio, and the two layers of a simulcast video track.
const SSRCS: [u32; 4] = [1000, 2000, 3000, 3001];

fn key(i: u8) -> TrackKey {
    TrackKey::new("s", ["v", "a", "sim"][usize::from(i % 3)])
}

fn check(e: &Egress<'_>, buf: &mut [u8]) {
    assert!(
        PEOPLE[1..].contains(&e.subscriber),
        "only subscribers receive"
    );
    let n = e.write_payload(buf).expect("egress writable");
    if e.kind == MediaKind::Video {
        Vp8Descriptor::parse(&buf[..n]).expect("rewritten VP8 parses");
    }
    let mut hdr = [0u8; 32];
    e.header
        .write_header(&mut hdr, Some(1))
        .expect("header writable");
}

fuzz_target!(|ops: Vec<Op>| {
    let mut f = Forwarder::new(ForwarderConfig {
        video_cache_packets: 64,
        audio_cache_packets: 16,
        ..ForwarderConfig::default()
    });
    let t0 = Instant::now();
    let mut now = t0;
    let _ = f.add_call(CALL);
    for p in PEOPLE {
        let _ = f.add_participant(CALL, p);
    }
    let mut tracks = Vec::new();
    let layer = |i: usize| LayerSpec {
        rid: None,
        ssrc: Some(SSRCS[i]),
    };
    for (codec, i, layers) in [
        (Codec::Vp8, 0u8, vec![layer(0)]),
        (Codec::Opus, 1, vec![layer(1)]),
        (Codec::Vp8, 2, vec![layer(2), layer(3)]),
    ] {
        if let Ok(t) = f.publish_track(
            PEOPLE[0],
            TrackSpec {
                key: key(i),
                codec,
                layers,
            },
        ) {
            tracks.push(t);
        }
    }
    let mut out_ssrcs = [[0u32; 3]; 3];
    let mut buf = vec![0u8; 70_000];
    let mut last = std::collections::HashMap::new();
    for op in ops.into_iter().take(512) {
        match op {
            Op::Video {
                layer,
                seq,
                ts,
                desc: (n, s, pid, picture_id, tl0picidx, tid, keyidx),
                keyframe,
                tail,
            } => {
                let d = Vp8Descriptor {
                    non_reference: n,
                    start_of_partition: s,
                    partition_index: pid & 7,
                    picture_id: picture_id.map(|(v, long)| PictureId {
                        value: v & if long { 0x7fff } else { 0x7f },
                        long,
                    }),
                    tl0picidx,
                    tid: tid.map(|(t, y)| (t & 3, y)),
                    keyidx: keyidx.map(|k| k & 0x1f),
                    len: 0,
                    keyframe: false,
                };
                let mut payload = [0u8; 64];
                let Some(n) = d.write(&mut payload) else {
                    continue;
                };
                let body: &[u8] = if keyframe {
                    &[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01]
                } else {
                    &[0x01]
                };
                payload[n..n + body.len()].copy_from_slice(body);
                let rest = tail.len().min(payload.len() - n - body.len());
                payload[n + body.len()..][..rest].copy_from_slice(&tail[..rest]);
                let pkt = RtpIn {
                    ssrc: [SSRCS[0], SSRCS[2], SSRCS[3]][usize::from(layer % 3)],
                    seq,
                    timestamp: ts,
                    marker: false,
                    payload_type: 96,
                    audio_level: None,
                    payload: &payload[..n + body.len() + rest],
                };
                f.handle_rtp(now, PEOPLE[0], &pkt, &mut |e| {
                    check(&e, &mut buf);
                    last.insert(e.header.ssrc, e.header.seq);
                });
            }
            Op::Datagram {
                from,
                as_ssrc,
                bytes,
            } => {
                let Ok(mut pkt) = RtpIn::parse(&bytes, Some(1)) else {
                    continue;
                };
                if as_ssrc < 200 {
                    pkt.ssrc = SSRCS[usize::from(as_ssrc % 4)];
                }
                let who = PEOPLE[usize::from(from % 4).min(2)];
                f.handle_rtp(now, who, &pkt, &mut |e| {
                    check(&e, &mut buf);
                    last.insert(e.header.ssrc, e.header.seq);
                });
            }
            Op::Vp8 {
                payload,
                pid,
                tl0,
                keyidx,
            } => {
                if let Ok(d) = Vp8Descriptor::parse(&payload) {
                    let mut w = [0u8; 9];
                    let n = d.write(&mut w).expect("descriptor fits");
                    // As long as parsed, except an X byte with no field
                    // set, which is not written back.
                    let fields = d.picture_id.is_some()
                        || d.tl0picidx.is_some()
                        || d.tid.is_some()
                        || d.keyidx.is_some();
                    assert_eq!(n, if fields { d.len } else { 1 });
                    w[n] = 0x01; // an inter frame byte
                    let back = Vp8Descriptor::parse(&w[..=n]).expect("written parses");
                    assert_eq!(
                        (back.picture_id, back.tl0picidx, back.tid, back.keyidx),
                        (d.picture_id, d.tl0picidx, d.tid, d.keyidx),
                        "parse(write(d)) == d"
                    );
                    let mut p = payload.clone();
                    assert!(Vp8Patch::new(&d, pid, tl0, keyidx).apply(&mut p));
                    let q = Vp8Descriptor::parse(&p).expect("patched parses");
                    assert_eq!((q.len, q.keyframe, q.tid), (d.len, d.keyframe, d.tid));
                }
            }
            Op::Nack { who, track, back } => {
                let w = usize::from(who % 3);
                let ssrc = out_ssrcs[w][usize::from(track % 3)];
                let top = last.get(&ssrc).copied().unwrap_or(0);
                let seqs: Vec<u16> = back.iter().map(|&b| top.wrapping_sub(b.into())).collect();
                let _ = f.handle_nack(PEOPLE[w], ssrc, &seqs, &mut |e| {
                    check(&e, &mut buf);
                    last.insert(e.header.ssrc, e.header.seq);
                });
            }
            Op::Pli { who, track, fir } => {
                let w = usize::from(who % 3);
                let ssrc = out_ssrcs[w][usize::from(track % 3)];
                let kind = if fir {
                    KeyframeKind::Fir
                } else {
                    KeyframeKind::Pli
                };
                let _ = f.handle_keyframe_request(now, PEOPLE[w], ssrc, kind);
            }
            Op::Subscribe { who, track, on } => {
                // The publisher itself never subscribes here (so that
                // every egress goes to PEOPLE[1..]).
                let w = 1 + usize::from(who % 2);
                if on {
                    if let Ok(s) = f.subscribe(now, PEOPLE[w], &key(track)) {
                        out_ssrcs[w][usize::from(track % 3)] = s;
                    }
                } else {
                    let _ = f.unsubscribe(PEOPLE[w], &key(track));
                }
            }
            Op::Layer { who, layer } => {
                let _ = f.select_layer(now, PEOPLE[1 + usize::from(who % 2)], &key(2), layer % 3);
            }
            Op::NewSsrc { track, layer, ssrc } => {
                if let Some(&t) = tracks.get(usize::from(track % 3)) {
                    let _ = f.set_layer_ssrc(t, layer % 3, ssrc);
                }
            }
            Op::Backlog { who, bytes } => {
                f.set_backlog(PEOPLE[usize::from(who % 3)], bytes as usize)
            }
            Op::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
            Op::Timeout => f.handle_timeout(now),
            Op::Remove { who } => {
                let _ = f.remove_participant(PEOPLE[usize::from(who % 3)]);
            }
        }
        while f.poll_output().is_some() {}
    }
    let c = f.counters();
    assert!(c.nacks_served + c.nacks_missed == c.nacks_received);
});
