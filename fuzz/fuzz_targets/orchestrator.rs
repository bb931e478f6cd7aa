//! Drives one orchestrator with arbitrary input sequences: state events,
//! signalling (well-formed templates with fuzzed fields, and raw junk),
//! media results, commands and time. It must never panic, and its outputs
//! must stay sane.
#![no_main]

use arbitrary::Arbitrary;
use groupcall_proto::*;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

#[derive(Arbitrary, Debug)]
enum Op {
    Join { create: bool, audio: bool, video: bool },
    Leave,
    Terminate,
    Mute { audio: bool, on: bool },
    Screenshare(bool),
    Published,
    Advance(u16),
    Timeout,
    RoomMember { user: u8, join: bool },
    Call { id: u8, terminated: u8, ts: u8 },
    Member { user: u8, device: u8, session: u8, expires: i16, call: u8 },
    Signal { kind: u8, user: u8, device: u8, session: u8, dest_ours: bool, call_id: u8, seq: u8, encrypted: bool, spoof: bool, sdp: u8 },
    Raw { kind: u8, json: String },
    Media { handle: u8, kind: u8, sdp: u8 },
    // The focus (MSC3898): choosing one, members' foci, the channel.
    SetFocus(u8),
    FocusSubscriptions(u8),
    RecentSpeakers(u8),
    MemberFoci { user: u8, device: u8, focus: u8, stable: bool },
    Channel { handle: u8, kind: u8, text: String },
}

const FOCI: [(&str, &str); 2] = [("@sfu:x", "SFUDEV"), ("@sfu2:x", "SFU2DEV")];

fn focus_ref(i: u8) -> FocusRef {
    let (u, d) = FOCI[i as usize % FOCI.len()];
    FocusRef { user_id: u.into(), device_id: d.into() }
}

const USERS: [&str; 4] = ["@a:x", "@b:x", "@me:x", "@z:x"];

fn user(i: u8) -> &'static str {
    USERS[i as usize % USERS.len()]
}

fuzz_target!(|input: (bool, Vec<Op>)| {
    let (follow, ops) = input;
    let mut cfg = Config::new("@me:x", "MEDEV");
    cfg.follow_foci = follow;
    let mut call = GroupCall::new(cfg);
    let mut now: u64 = 1_700_000_000_000;
    for op in ops.into_iter().take(256) {
        match op {
            Op::Join { create, audio, video } => {
                let create = create.then(CreateOptions::default);
                let _ = call.handle_command(now, Command::Join { create, audio, video });
            }
            Op::Leave => { let _ = call.handle_command(now, Command::Leave); }
            Op::Terminate => { let _ = call.handle_command(now, Command::Terminate); }
            Op::Mute { audio, on } => {
                let c = if audio { Command::SetAudioMuted(on) } else { Command::SetVideoMuted(on) };
                let _ = call.handle_command(now, c);
            }
            Op::Screenshare(on) => { let _ = call.handle_command(now, Command::Screenshare(on)); }
            Op::Published => call.handle_membership_published(now),
            Op::Advance(ms) => now += u64::from(ms) * 10,
            Op::Timeout => {
                if let Some(t) = call.poll_timeout() {
                    assert!(t < now + 400 * 24 * 3600 * 1000, "timeout absurdly far: {t}");
                    now = now.max(t);
                    call.handle_timeout(now);
                }
            }
            Op::RoomMember { user: u, join } => {
                let ev = json!({"type": "m.room.member", "state_key": user(u), "sender": user(u),
                    "content": {"membership": if join { "join" } else { "leave" }}});
                let _ = call.handle_state(now, &ev);
            }
            Op::Call { id, terminated, ts } => {
                let mut c = json!({"m.intent": "m.prompt", "m.type": "m.video"});
                // What different clients write (and some nonsense).
                match terminated % 6 {
                    0 => {}
                    1 => c["m.terminated"] = json!("call_ended"),
                    2 => c["m.terminated"] = json!(true),
                    3 => c["m.terminated"] = json!(false),
                    4 => c["m.terminated"] = json!(0),
                    _ => c["m.terminated"] = json!({"x": 1}),
                }
                let ev = json!({"type": "org.matrix.msc3401.call", "state_key": format!("C{}", id % 3),
                    "sender": "@b:x", "origin_server_ts": u64::from(ts), "content": c});
                let _ = call.handle_state(now, &ev);
            }
            Op::Member { user: u, device, session, expires, call: c } => {
                let exp = (now as i64 + i64::from(expires) * 100).max(0);
                let ev = json!({"type": "org.matrix.msc3401.call.member", "state_key": user(u), "sender": user(u),
                    "content": {"m.calls": [{"m.call_id": format!("C{}", c % 3), "m.devices": [
                        {"device_id": format!("D{}", device % 3), "session_id": format!("S{}", session % 3),
                         "expires_ts": exp, "feeds": [{"purpose": "m.usermedia"}]}]}]}});
                let _ = call.handle_state(now, &ev);
            }
            Op::Signal { kind, user: u, device, session, dest_ours, call_id, seq, encrypted, spoof, sdp } => {
                let ty = signalling::MessageType::ALL[kind as usize % 8];
                let dev = format!("D{}", device % 3);
                let mut c = json!({
                    "version": "1", "call_id": format!("K{}", call_id % 4), "party_id": dev.clone(),
                    "conf_id": call.joined_call_id().unwrap_or("C0"), "device_id": dev.clone(),
                    "sender_session_id": format!("S{}", session % 3),
                    "dest_session_id": if dest_ours { call.session_id().unwrap_or("x").to_owned() } else { "other".to_owned() },
                    "seq": u64::from(seq % 8),
                    "lifetime": 60000, "invitee": "@me:x",
                    "offer": {"type": "offer", "sdp": format!("sdp{sdp}")},
                    "answer": {"type": "answer", "sdp": format!("sdp{sdp}")},
                    "description": {"type": if sdp % 2 == 0 { "offer" } else { "answer" }, "sdp": "x"},
                    "candidates": [{"candidate": "candidate:1", "sdpMid": "0"}, {"candidate": ""}],
                    "selected_party_id": if sdp % 2 == 0 { "MEDEV" } else { "OTHER" },
                    "reason": "user_hangup",
                    "sdp_stream_metadata": {"st": {"purpose": "m.usermedia", "audio_muted": sdp % 3 == 0, "video_muted": false}},
                });
                if sdp == 255 {
                    c["sdp_stream_metadata"] = Value::Null;
                }
                let m = IncomingToDevice {
                    sender: user(u).into(),
                    sender_device: encrypted.then(|| if spoof { "EVIL".to_owned() } else { dev }),
                    event_type: ty.as_str().into(),
                    content: c,
                    encrypted,
                };
                let _ = call.handle_to_device(now, m);
            }
            Op::Raw { kind, json } => {
                let content = serde_json::from_str(&json).unwrap_or(Value::String(json));
                let ty = signalling::MessageType::ALL[kind as usize % 8];
                let _ = call.handle_to_device(now, IncomingToDevice {
                    sender: "@b:x".into(), sender_device: None, event_type: ty.as_str().into(), content, encrypted: false,
                });
                let _ = call.handle_state(now, &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@b:x", "sender": "@b:x", "content": {}}));
            }
            Op::Media { handle, kind, sdp } => {
                let peer = PeerHandle(u64::from(handle % 8));
                let ev = match kind % 7 {
                    0 => MediaEvent::OfferCreated { peer, sdp: format!("o{sdp}"), gathering_complete: sdp % 2 == 0 },
                    1 => MediaEvent::AnswerCreated { peer, sdp: format!("a{sdp}"), gathering_complete: sdp % 2 == 0 },
                    2 => MediaEvent::LocalCandidates { peer, candidates: vec![signalling::Candidate::end_of_candidates()] },
                    3 => MediaEvent::State { peer, state: MediaState::Connected },
                    4 => MediaEvent::State { peer, state: MediaState::Failed },
                    5 => MediaEvent::State { peer, state: MediaState::Disconnected },
                    _ => MediaEvent::Error { peer, message: "boom".into() },
                };
                call.handle_media(now, ev);
            }
            Op::SetFocus(f) => {
                let f = (f % 3 != 2).then(|| focus_ref(f));
                let _ = call.handle_command(now, Command::SetFocus(f));
            }
            Op::FocusSubscriptions(n) => {
                let only = (n % 3 != 0).then(|| {
                    (0..n % 4).map(|i| DeviceKey::new(user(i), format!("D{}", i % 3))).collect()
                });
                let _ = call.handle_command(now, Command::FocusSubscriptions(only));
            }
            Op::RecentSpeakers(n) => {
                let n = (n % 5 != 0).then_some(usize::from(n % 5));
                let _ = call.handle_command(now, Command::FocusRecentSpeakers(n));
            }
            Op::MemberFoci { user: u, device, focus, stable } => {
                let (fu, fd) = FOCI[focus as usize % FOCI.len()];
                let key = if stable { "m.foci.active" } else { "org.matrix.msc3898.foci.active" };
                let mut dev = json!({"device_id": format!("D{}", device % 3), "session_id": "S0",
                    "expires_ts": now + 3_600_000, "feeds": [{"purpose": "m.usermedia"}]});
                dev[key] = if focus % 5 == 4 { json!("junk") } else { json!([{"user_id": fu, "device_id": fd}]) };
                let ev = json!({"type": "org.matrix.msc3401.call.member", "state_key": user(u), "sender": user(u),
                    "origin_server_ts": now, "content": {"m.calls": [{"m.call_id": call.joined_call_id().unwrap_or("C0"), "m.devices": [dev]}]}});
                let _ = call.handle_state(now, &ev);
            }
            Op::Channel { handle, kind, text } => {
                let peer = PeerHandle(u64::from(handle % 8));
                let ev = match kind % 3 {
                    0 => MediaEvent::ChannelOpen { peer },
                    1 => MediaEvent::ChannelMessage { peer, text },
                    _ => MediaEvent::ChannelClosed { peer },
                };
                call.handle_media(now, ev);
            }
        }
        while let Some(out) = call.poll_output() {
            if let Output::ToDevice(b) = &out {
                assert!(!b.messages.is_empty());
                for m in &b.messages {
                    assert!(signalling::Message::parse(&b.event_type, &m.content).is_ok(), "we sent something we cannot parse");
                    assert!(!(m.user_id == "@me:x" && m.device_id == "MEDEV"), "we sent to ourselves");
                }
            }
        }
    }
});
