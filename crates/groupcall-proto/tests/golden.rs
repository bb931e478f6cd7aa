//! Golden tests: the JSON shapes the reference (matrix-js-sdk GroupCall)
//! writes parse in ours and survive a round trip, and what we write passes
//! the checks the reference applies.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use groupcall_proto::events::{CallContent, CallIntent, CallType, MemberContent};
use groupcall_proto::signalling::{Body, Message};
use groupcall_proto::*;
use serde_json::{Value, json};

fn golden(name: &str) -> Value {
    let path = format!("{}/tests/golden/{name}.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn reference_call_event() {
    let v = golden("call");
    let c: CallContent = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(c.intent, Some(CallIntent::Prompt));
    assert_eq!(c.call_type, Some(CallType::Video));
    assert!(!c.is_terminated());
    assert_eq!(serde_json::to_value(&c).unwrap(), v);
    let t: CallContent = serde_json::from_value(golden("call_terminated")).unwrap();
    assert_eq!(t.termination().as_deref(), Some("call_ended"));
}

#[test]
fn reference_member_event() {
    let v = golden("member");
    let (devs, skipped) = MemberContent::live_devices(&v, "CONFID", 1_800_000_000_000);
    assert!(skipped.is_empty());
    assert_eq!(devs.len(), 1);
    assert_eq!(devs[0].device_id, "JSDEVICE");
    assert_eq!(devs[0].session_id, "JSSESSION");
    let typed: MemberContent = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(serde_json::to_value(&typed).unwrap(), v);
    let left: MemberContent = serde_json::from_value(golden("member_left")).unwrap();
    assert!(left.calls.is_empty());
}

#[test]
fn reference_signalling_round_trips() {
    for (name, ty) in [
        ("invite", "m.call.invite"),
        ("answer", "m.call.answer"),
        ("candidates", "m.call.candidates"),
        ("select_answer", "m.call.select_answer"),
        ("metadata_changed", "m.call.sdp_stream_metadata_changed"),
        ("hangup", "m.call.hangup"),
        ("reject", "m.call.reject"),
    ] {
        let v = golden(name);
        let m = Message::parse(ty, &v).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.common.conf_id, "CONFID");
        assert_eq!(m.common.device_id.as_deref(), Some("JSDEVICE"));
        assert_eq!(m.to_content(), v, "{name} round trip");
    }
}

#[test]
fn reference_negotiate_with_unstable_metadata_key() {
    let m = Message::parse("m.call.negotiate", &golden("negotiate")).unwrap();
    let Body::Negotiate(n) = &m.body else {
        panic!("not a negotiate")
    };
    let meta = n.sdp_stream_metadata.as_ref().unwrap();
    assert_eq!(meta.len(), 2);
    assert_eq!(meta["JSSCREEN"].purpose, events::FeedPurpose::Screenshare);
    // Written back under the stable key, which the reference reads too.
    assert!(m.to_content().get("sdp_stream_metadata").is_some());
}

// ---------------------------------------------------------------------
// What we write, checked the way the reference checks it.

/// The reference's per-device check in `m.call.member` (groupCall.ts).
fn reference_accepts_device(d: &Value, now: u64) -> bool {
    d["device_id"].is_string()
        && d["session_id"].is_string()
        && d["expires_ts"].as_f64().is_some_and(|t| t > now as f64)
        && d["feeds"].is_array()
}

/// The fields the reference's call event handler and MatrixCall read.
fn reference_accepts_to_device(ty: &str, c: &Value, my_session: &str) {
    assert_eq!(c["version"], "1", "{ty}: version");
    for k in [
        "call_id",
        "party_id",
        "conf_id",
        "device_id",
        "sender_session_id",
        "dest_session_id",
    ] {
        assert!(c[k].is_string(), "{ty}: {k} must be a string");
    }
    assert!(c["seq"].is_u64(), "{ty}: seq");
    assert_eq!(c["dest_session_id"], my_session, "{ty}: dest_session_id");
    let meta_ok = |m: &Value| {
        m.as_object().is_some_and(|o| {
            !o.is_empty()
                && o.values().all(|s| {
                    s["purpose"].is_string()
                        && s["audio_muted"].is_boolean()
                        && s["video_muted"].is_boolean()
                })
        })
    };
    match ty {
        "m.call.invite" => {
            assert!(c["lifetime"].is_u64());
            assert_eq!(c["offer"]["type"], "offer");
            assert!(c["offer"]["sdp"].is_string());
            assert!(c["invitee"].is_string());
            assert!(meta_ok(&c["sdp_stream_metadata"]), "invite metadata");
        }
        "m.call.answer" => {
            assert_eq!(c["answer"]["type"], "answer");
            assert!(meta_ok(&c["sdp_stream_metadata"]), "answer metadata");
        }
        "m.call.select_answer" => assert!(c["selected_party_id"].is_string()),
        "m.call.sdp_stream_metadata_changed" => assert!(meta_ok(&c["sdp_stream_metadata"])),
        _ => {}
    }
}

#[test]
fn our_output_passes_reference_checks() {
    let now = 1_700_000_000_000u64;
    // We are @a (the caller); the js peer is @z with device JSDEVICE.
    let mut call = GroupCall::new(Config::new("@a:localhost", "RUSTDEV"));
    let member = |u: &str| json!({"type": "m.room.member", "state_key": u, "sender": u, "content": {"membership": "join"}});
    call.handle_state(now, &member("@a:localhost")).unwrap();
    call.handle_state(now, &member("@z:localhost")).unwrap();
    call.handle_state(
        now,
        &json!({"type": "org.matrix.msc3401.call", "state_key": "CONFID", "sender": "@z:localhost",
        "origin_server_ts": now, "content": golden("call")}),
    )
    .unwrap();
    call.handle_command(
        now,
        Command::Join {
            create: None,
            audio: true,
            video: true,
        },
    )
    .unwrap();
    let mut published = None;
    while let Some(o) = call.poll_output() {
        if let Output::PublishState {
            event_type,
            state_key,
            content,
        } = o
        {
            assert_eq!(event_type, "org.matrix.msc3401.call.member");
            assert_eq!(state_key, "@a:localhost");
            published = Some(content);
        }
    }
    let content = published.unwrap();
    let devices = &content["m.calls"][0]["m.devices"];
    assert_eq!(content["m.calls"][0]["m.call_id"], "CONFID");
    assert!(reference_accepts_device(&devices[0], now));
    assert_eq!(devices[0]["feeds"], json!([{"purpose": "m.usermedia"}]));
    assert_eq!(devices[0]["expires_ts"], now + 3_600_000);

    call.handle_membership_published(now);
    let mut member_z = golden("member");
    member_z["m.calls"][0]["m.devices"][0]["expires_ts"] = json!(now + 3_600_000);
    call.handle_state(
        now,
        &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@z:localhost",
        "sender": "@z:localhost", "content": member_z}),
    )
    .unwrap();
    let mut offer_peer = None;
    while let Some(o) = call.poll_output() {
        if let Output::Media(MediaRequest::CreateOffer { peer, feeds, .. }) = o {
            assert_eq!(feeds.len(), 1);
            offer_peer = Some(peer);
        }
    }
    let peer = offer_peer.expect("we call the js peer");
    call.handle_media(
        now,
        MediaEvent::OfferCreated {
            peer,
            sdp: "v=0\r\n".into(),
            gathering_complete: true,
        },
    );
    let mut sent = Vec::new();
    while let Some(o) = call.poll_output() {
        if let Output::ToDevice(b) = o {
            for m in b.messages {
                assert_eq!(
                    (m.user_id.as_str(), m.device_id.as_str()),
                    ("@z:localhost", "JSDEVICE")
                );
                sent.push((b.event_type.clone(), m.content));
            }
        }
    }
    assert_eq!(sent.len(), 1);
    reference_accepts_to_device(&sent[0].0, &sent[0].1, "JSSESSION");
    assert_eq!(sent[0].1["invitee"], "@z:localhost");
    assert_eq!(sent[0].1["seq"], 0);
    assert_eq!(sent[0].1["m.intent"], "m.prompt");

    // Their answer (the golden one, addressed to our session and call).
    let mut answer = golden("answer");
    answer["call_id"] = sent[0].1["call_id"].clone();
    answer["dest_session_id"] = json!(call.session_id().unwrap());
    call.handle_to_device(
        now,
        IncomingToDevice {
            sender: "@z:localhost".into(),
            sender_device: None,
            event_type: "m.call.answer".into(),
            content: answer,
            encrypted: false,
        },
    );
    let r = match call.poll_output() {
        Some(Output::Signalling(r)) => r.outcome,
        other => panic!("expected the signalling report first, got {other:?}"),
    };
    assert_eq!(r, Ok(Accepted::Processed));
    let mut sent2 = Vec::new();
    let mut feed_muted = None;
    while let Some(o) = call.poll_output() {
        match o {
            Output::ToDevice(b) => sent2.extend(
                b.messages
                    .into_iter()
                    .map(|m| (b.event_type.clone(), m.content)),
            ),
            Output::Event(CallEvent::FeedAdded { video_muted, .. }) => {
                feed_muted = Some(video_muted)
            }
            _ => {}
        }
    }
    assert_eq!(feed_muted, Some(true));
    assert_eq!(sent2.len(), 1);
    assert_eq!(sent2[0].0, "m.call.select_answer");
    reference_accepts_to_device(&sent2[0].0, &sent2[0].1, "JSSESSION");
    assert_eq!(sent2[0].1["selected_party_id"], "JSDEVICE");
    assert_eq!(sent2[0].1["seq"], 1);

    // Muting sends metadata the reference accepts.
    call.handle_command(now, Command::SetAudioMuted(true))
        .unwrap();
    let mut sent3 = Vec::new();
    while let Some(o) = call.poll_output() {
        if let Output::ToDevice(b) = o {
            sent3.extend(
                b.messages
                    .into_iter()
                    .map(|m| (b.event_type.clone(), m.content)),
            );
        }
    }
    assert_eq!(sent3[0].0, "m.call.sdp_stream_metadata_changed");
    reference_accepts_to_device(&sent3[0].0, &sent3[0].1, "JSSESSION");
    let meta = sent3[0].1["sdp_stream_metadata"].as_object().unwrap();
    assert!(meta.values().all(|m| m["audio_muted"] == true));
}
