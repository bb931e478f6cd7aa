//! The orchestrator's rules, one at a time, with hand-fed inputs.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use groupcall_proto::room::LeftReason;
use groupcall_proto::*;
use serde_json::{Value, json};

const NOW: u64 = 1_700_000_000_000;
const CONF: &str = "CONF";

fn member_ev(user: &str, device: &str, session: &str, expires: u64) -> Value {
    json!({"type": "org.matrix.msc3401.call.member", "state_key": user, "sender": user, "origin_server_ts": NOW,
        "content": {"m.calls": [{"m.call_id": CONF, "m.devices": [
            {"device_id": device, "session_id": session, "expires_ts": expires, "feeds": [{"purpose": "m.usermedia"}]}]}]}})
}

fn join_ev(user: &str, membership: &str) -> Value {
    json!({"type": "m.room.member", "state_key": user, "sender": user, "content": {"membership": membership}})
}

/// Us (`@a`, the caller of everyone here) joined to CONF, membership published.
fn joined(cfg: impl FnOnce(&mut Config)) -> GroupCall {
    let mut c = Config::new("@a:x", "ADEV");
    cfg(&mut c);
    let mut call = GroupCall::new(c);
    call.handle_state(NOW, &join_ev("@a:x", "join")).unwrap();
    call.handle_state(NOW, &join_ev("@b:x", "join")).unwrap();
    call.handle_state(
        NOW,
        &json!({"type": "org.matrix.msc3401.call", "state_key": CONF, "sender": "@b:x", "origin_server_ts": NOW,
            "content": {"m.intent": "m.prompt", "m.type": "m.video"}}),
    )
    .unwrap();
    call.handle_command(
        NOW,
        Command::Join {
            create: None,
            audio: true,
            video: true,
        },
    )
    .unwrap();
    call.handle_membership_published(NOW);
    drain(&mut call);
    call
}

fn drain(call: &mut GroupCall) -> Vec<Output> {
    std::iter::from_fn(|| call.poll_output()).collect()
}

/// Delivers a to-device message and returns its outcome: the report is the
/// first output after it (the queue being drained before), ahead of what it
/// caused, which stays queued.
macro_rules! deliver {
    ($call:expr, $now:expr, $m:expr $(,)?) => {{
        let m: IncomingToDevice = $m;
        let now: u64 = $now;
        $call.handle_to_device(now, m);
        match $call.poll_output() {
            Some(Output::Signalling(r)) => r.outcome,
            other => panic!("expected the signalling report first, got {other:?}"),
        }
    }};
}

/// The signalling reports among outputs.
fn reports(outs: &[Output]) -> Vec<SignallingReport> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Signalling(r) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

fn sent(outs: &[Output]) -> Vec<(String, Value)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::ToDevice(b) => Some(
                b.messages
                    .iter()
                    .map(|m| (b.event_type.clone(), m.content.clone()))
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect()
}

fn offer_request(outs: &[Output]) -> Option<PeerHandle> {
    outs.iter().find_map(|o| match o {
        Output::Media(MediaRequest::CreateOffer {
            peer,
            ice_restart: false,
            ..
        }) => Some(*peer),
        _ => None,
    })
}

/// `@b/BDEV` joins; we call it and it answers; media connects. Returns the
/// peer handle and the call id.
fn connected_with_b(call: &mut GroupCall, expires: u64) -> (PeerHandle, String) {
    call.handle_state(NOW, &member_ev("@b:x", "BDEV", "BSESS", expires))
        .unwrap();
    let peer = offer_request(&drain(call)).expect("we call b");
    call.handle_media(
        NOW,
        MediaEvent::OfferCreated {
            peer,
            sdp: "offer".into(),
            gathering_complete: true,
        },
    );
    let outs = drain(call);
    let invite = &sent(&outs)[0].1;
    let call_id = invite["call_id"].as_str().unwrap().to_owned();
    let answer = with_dest(
        from_b(
            "m.call.answer",
            &call_id,
            0,
            json!({"answer": {"type": "answer", "sdp": "answer"}}),
        ),
        call,
    );
    let r = deliver!(call, NOW + 10, answer);
    assert_eq!(r, Ok(Accepted::Processed));
    call.handle_media(
        NOW + 20,
        MediaEvent::State {
            peer,
            state: MediaState::Connected,
        },
    );
    drain(call);
    assert_eq!(
        call.peers(),
        vec![(DeviceKey::new("@b:x", "BDEV"), peer, true)]
    );
    (peer, call_id)
}

fn from_b(ty: &str, call_id: &str, seq: u64, body: Value) -> IncomingToDevice {
    from_b_session(ty, call_id, seq, body, "BSESS")
}

fn from_b_session(
    ty: &str,
    call_id: &str,
    seq: u64,
    mut body: Value,
    session: &str,
) -> IncomingToDevice {
    body["version"] = json!("1");
    body["call_id"] = json!(call_id);
    body["party_id"] = json!("BDEV");
    body["conf_id"] = json!(CONF);
    body["device_id"] = json!("BDEV");
    body["sender_session_id"] = json!(session);
    body["seq"] = json!(seq);
    IncomingToDevice {
        sender: "@b:x".into(),
        sender_device: Some("BDEV".into()),
        event_type: ty.into(),
        content: body,
        encrypted: true,
    }
}

fn with_dest(mut m: IncomingToDevice, call: &GroupCall) -> IncomingToDevice {
    m.content["dest_session_id"] = json!(call.session_id().unwrap());
    m
}

#[test]
fn expiry_removes_device_and_closes_peer_at_that_time() {
    let mut call = joined(|_| {});
    let expires = NOW + 60_000;
    let (peer, _) = connected_with_b(&mut call, expires);
    assert_eq!(call.poll_timeout(), Some(expires));
    call.handle_timeout(expires - 1);
    assert!(
        drain(&mut call)
            .iter()
            .all(|o| !matches!(o, Output::Media(MediaRequest::ClosePeer { .. })))
    );
    call.handle_timeout(expires);
    let outs = drain(&mut call);
    assert!(outs.contains(&Output::Media(MediaRequest::ClosePeer { peer })));
    assert!(outs.iter().any(|o| matches!(
        o,
        Output::Event(CallEvent::ParticipantLeft {
            reason: LeftReason::Expired,
            ..
        })
    )));
    assert!(call.peers().is_empty());
}

#[test]
fn room_leave_removes_device_and_closes_peer() {
    let mut call = joined(|_| {});
    let (peer, _) = connected_with_b(&mut call, NOW + 3_600_000);
    call.handle_state(NOW + 100, &join_ev("@b:x", "leave"))
        .unwrap();
    let outs = drain(&mut call);
    assert!(outs.contains(&Output::Media(MediaRequest::ClosePeer { peer })));
    assert!(outs.iter().any(|o| matches!(
        o,
        Output::Event(CallEvent::ParticipantLeft {
            reason: LeftReason::RoomLeft,
            ..
        })
    )));
}

#[test]
fn bad_input_is_ignored_with_a_reason_and_the_call_survives() {
    let mut call = joined(|_| {});
    let (peer, call_id) = connected_with_b(&mut call, NOW + 3_600_000);
    let ok = |seq| {
        with_dest(
            from_b(
                "m.call.candidates",
                &call_id,
                seq,
                json!({"candidates": []}),
            ),
            &call,
        )
    };
    type Case = (IncomingToDevice, fn(&Ignored) -> bool);
    let cases: Vec<Case> = vec![
        (
            {
                let mut m = ok(1);
                m.event_type = "m.call.bogus".into();
                m
            },
            |e| matches!(e, Ignored::NotSignalling(_)),
        ),
        (
            {
                let mut m = ok(1);
                m.content["seq"] = json!("one");
                m
            },
            |e| matches!(e, Ignored::Malformed(_)),
        ),
        (
            {
                let mut m = ok(1);
                m.content.as_object_mut().unwrap().remove("call_id");
                m
            },
            |e| matches!(e, Ignored::Malformed(_)),
        ),
        (
            {
                let mut m = ok(1);
                m.content["call_id"] = json!("x".repeat(100_000));
                m
            },
            |e| matches!(e, Ignored::Malformed(_)),
        ),
        (
            {
                let mut m = ok(1);
                m.content["candidates"] = json!([{"candidate": "x".repeat(5000)}]);
                m
            },
            |e| matches!(e, Ignored::Malformed(_)),
        ),
        (
            {
                let mut m = ok(1);
                m.content["candidates"] = json!(vec![json!({"candidate": "c"}); 1000]);
                m
            },
            |e| matches!(e, Ignored::Malformed(_)),
        ),
        (
            {
                let mut m = ok(1);
                m.content = json!([1, 2]);
                m
            },
            |e| matches!(e, Ignored::Malformed(_)),
        ),
        (
            {
                let mut m = ok(1);
                m.content["conf_id"] = json!("OTHER");
                m
            },
            |e| matches!(e, Ignored::OtherCall(_)),
        ),
        (
            {
                let mut m = ok(1);
                m.content["dest_session_id"] = json!("NOTME");
                m
            },
            |e| matches!(e, Ignored::WrongSession(_)),
        ),
        (
            {
                let mut m = ok(1);
                m.sender_device = Some("EVIL".into());
                m
            },
            |e| matches!(e, Ignored::DeviceMismatch { .. }),
        ),
        (
            {
                let mut m = ok(1);
                m.content["call_id"] = json!("nosuchcall");
                m.content["seq"] = json!(0);
                m
            },
            |e| matches!(e, Ignored::UnknownCall(_)),
        ),
        (
            {
                let mut m = with_dest(
                    from_b(
                        "m.call.invite",
                        "sdp",
                        0,
                        json!({"lifetime": 1, "offer": {"type": "offer", "sdp": "x".repeat(200_000)}}),
                    ),
                    &call,
                );
                m.content["call_id"] = json!("big");
                m
            },
            |e| matches!(e, Ignored::Malformed(_)),
        ),
    ];
    for (i, (m, expect)) in cases.into_iter().enumerate() {
        let r = deliver!(call, NOW + 200, m);
        match r {
            Err(e) => assert!(expect(&e), "case {i}: unexpected reason {e}"),
            Ok(a) => panic!("case {i}: accepted ({a:?})"),
        }
        assert!(drain(&mut call).is_empty(), "case {i} produced output");
    }
    // State garbage.
    assert!(call.handle_state(NOW, &json!("nope")).is_err());
    assert!(call.handle_state(NOW, &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@b:x", "sender": "@evil:x", "content": {}})).is_err());
    drain(&mut call);
    assert_eq!(
        call.peers(),
        vec![(DeviceKey::new("@b:x", "BDEV"), peer, true)]
    );
}

#[test]
fn plaintext_is_refused_when_encryption_is_required() {
    let mut call = joined(|c| c.require_encrypted = true);
    let (_, call_id) = connected_with_b(&mut call, NOW + 3_600_000);
    let mut m = with_dest(
        from_b("m.call.candidates", &call_id, 1, json!({"candidates": []})),
        &call,
    );
    m.encrypted = false;
    assert_eq!(deliver!(call, NOW, m), Err(Ignored::Unencrypted));
}

#[test]
fn floods_are_rate_limited_per_sender() {
    let mut call = joined(|c| {
        c.rate_burst = 20;
        c.rate_per_sec = 10;
    });
    let (_, call_id) = connected_with_b(&mut call, NOW + 3_600_000);
    let mut limited = 0;
    for seq in 1..100 {
        let m = with_dest(
            from_b(
                "m.call.candidates",
                &call_id,
                seq,
                json!({"candidates": []}),
            ),
            &call,
        );
        if deliver!(call, NOW + 1000, m) == Err(Ignored::RateLimited("@b:x".into())) {
            limited += 1;
        }
        drain(&mut call);
    }
    assert!(limited >= 75, "only {limited} limited");
    assert_eq!(call.peers().len(), 1);
}

#[test]
fn reorder_gap_is_skipped_after_the_timeout() {
    let mut call = joined(|_| {});
    let (peer, call_id) = connected_with_b(&mut call, NOW + 3_600_000);
    // seq 1 is lost; seq 2 (candidates) waits, then is released.
    let m = with_dest(
        from_b(
            "m.call.candidates",
            &call_id,
            2,
            json!({"candidates": [{"candidate": "candidate:x", "sdpMid": "0"}]}),
        ),
        &call,
    );
    assert_eq!(deliver!(call, NOW + 100, m), Ok(Accepted::Reordered));
    assert!(drain(&mut call).is_empty());
    let t = call.poll_timeout().unwrap();
    assert_eq!(t, NOW + 100 + 2000);
    call.handle_timeout(t);
    let outs = drain(&mut call);
    assert!(outs.iter().any(|o| matches!(o, Output::Media(MediaRequest::AddRemoteCandidates { peer: p, .. }) if *p == peer)));
    // A late seq 1 is now a duplicate.
    let late = with_dest(
        from_b("m.call.candidates", &call_id, 1, json!({"candidates": []})),
        &call,
    );
    assert_eq!(deliver!(call, t + 1, late), Err(Ignored::Duplicate));
}

/// An invite as sent: (ms since NOW, call_id, seq, lifetime).
type SentInvite = (u64, String, u64, u64);

/// Runs the call's timers up to `until`, answering every media offer request
/// at once; returns every invite sent (time, call_id, seq, lifetime) and
/// every event.
fn run_unanswered(
    call: &mut GroupCall,
    from: u64,
    until: u64,
) -> (Vec<SentInvite>, Vec<CallEvent>) {
    let mut invites = Vec::new();
    let mut events = Vec::new();
    let mut t = from;
    loop {
        let mut outs = drain(call);
        if let Some(peer) = offer_request(&outs) {
            call.handle_media(
                t,
                MediaEvent::OfferCreated {
                    peer,
                    sdp: "o".into(),
                    gathering_complete: true,
                },
            );
            outs.extend(drain(call));
        }
        for (ty, c) in sent(&outs) {
            if ty == "m.call.invite" {
                invites.push((
                    t - NOW,
                    c["call_id"].as_str().unwrap().to_owned(),
                    c["seq"].as_u64().unwrap(),
                    c["lifetime"].as_u64().unwrap(),
                ));
            }
        }
        events.extend(outs.into_iter().filter_map(|o| match o {
            Output::Event(e) => Some(e),
            _ => None,
        }));
        let Some(next) = call.poll_timeout() else {
            break;
        };
        if next > until {
            break;
        }
        t = next;
        call.handle_timeout(t);
    }
    (invites, events)
}

#[test]
fn an_unanswered_invite_stays_open_for_its_lifetime_and_is_sent_again_unchanged() {
    let mut call = joined(|_| {});
    call.handle_state(NOW, &member_ev("@b:x", "BDEV", "BSESS", NOW + 3_600_000))
        .unwrap();
    let (invites, events) = run_unanswered(&mut call, NOW, NOW + 59_999);
    // One call, open for its 60 s lifetime: sent at 0, then the same
    // message again every 5 s (the reference's retry cadence).
    let times: Vec<u64> = invites.iter().map(|i| i.0).collect();
    assert_eq!(times, (0..12).map(|k| k * 5_000).collect::<Vec<_>>());
    assert!(
        invites
            .iter()
            .all(|i| i.1 == invites[0].1 && i.2 == 0 && i.3 == 60_000)
    );
    assert!(!events.iter().any(|e| matches!(
        e,
        CallEvent::PeerState {
            status: PeerStatus::Closed(_) | PeerStatus::Failed(_),
            ..
        }
    )));
    assert_eq!(call.peers().len(), 1);
}

#[test]
fn a_device_that_never_answers_is_called_on_at_a_backed_off_interval() {
    let mut call = joined(|_| {});
    call.handle_state(NOW, &member_ev("@b:x", "BDEV", "BSESS", NOW + 3_600_000))
        .unwrap();
    let (invites, events) = run_unanswered(&mut call, NOW, NOW + 10 * 60_000);
    let mut calls: Vec<(u64, String, u64)> = Vec::new();
    for (t, id, _, lifetime) in &invites {
        if calls.last().is_none_or(|c| c.1 != *id) {
            calls.push((*t, id.clone(), *lifetime));
        }
    }
    // The first call and the MSC's 3 retries, each open 60 s with no gap
    // between them (there is always an invite to answer), then calls open
    // ever longer.
    let starts: Vec<(u64, u64)> = calls.iter().map(|c| (c.0, c.2)).collect();
    assert_eq!(
        starts,
        vec![
            (0, 60_000),
            (60_000, 60_000),
            (120_000, 60_000),
            (180_000, 60_000),
            (240_000, 120_000),
            (360_000, 240_000),
            (600_000, 480_000)
        ]
    );
    let unanswered: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, CallEvent::Unanswered { .. }))
        .collect();
    assert_eq!(
        unanswered,
        vec![&CallEvent::Unanswered {
            device: DeviceKey::new("@b:x", "BDEV"),
            calls: 4
        }],
        "reported once"
    );
    // Each expired call was hung up before the next one (one at a time).
    let timeouts = events
        .iter()
        .filter(|e| matches!(e, CallEvent::PeerState { status: PeerStatus::Failed(r), .. } if r == "invite_timeout"))
        .count();
    assert_eq!(timeouts, 6);
    assert!(call.peers().len() <= 1);
}

#[test]
fn a_sleeping_device_that_shows_life_gets_the_invite_again_at_once() {
    let mut call = joined(|_| {});
    call.handle_state(NOW, &member_ev("@b:x", "BDEV", "BSESS", NOW + 3_600_000))
        .unwrap();
    let (invites, _) = run_unanswered(&mut call, NOW, NOW + 27_000);
    assert_eq!(invites.last().map(|i| i.0), Some(25_000));
    // At 27 s (next copy due at 30 s) it refreshes its membership: it is
    // awake, the invite goes out again now.
    call.handle_state(
        NOW + 27_000,
        &member_ev("@b:x", "BDEV", "BSESS", NOW + 7_200_000),
    )
    .unwrap();
    let again: Vec<_> = sent(&drain(&mut call))
        .into_iter()
        .filter(|(ty, _)| ty == "m.call.invite")
        .collect();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1["call_id"].as_str(), Some(invites[0].1.as_str()));
    assert_eq!(again[0].1["seq"], 0);
}

#[test]
fn a_repeated_invite_gets_the_answer_again_and_a_lost_first_copy_is_recovered() {
    // We are the callee here: @0 calls us.
    let mut call = joined(|_| {});
    let zero = |ty: &str, call_id: &str, seq: u64, mut body: Value, call: &GroupCall| {
        body["version"] = json!("1");
        body["call_id"] = json!(call_id);
        body["party_id"] = json!("ZDEV");
        body["conf_id"] = json!(CONF);
        body["device_id"] = json!("ZDEV");
        body["sender_session_id"] = json!("ZSESS");
        body["dest_session_id"] = json!(call.session_id().unwrap());
        body["seq"] = json!(seq);
        IncomingToDevice {
            sender: "@0:x".into(),
            sender_device: Some("ZDEV".into()),
            event_type: ty.into(),
            content: body,
            encrypted: true,
        }
    };
    call.handle_state(NOW, &join_ev("@0:x", "join")).unwrap();
    call.handle_state(NOW, &member_ev("@0:x", "ZDEV", "ZSESS", NOW + 3_600_000))
        .unwrap();
    drain(&mut call);
    let invite =
        json!({"lifetime": 60000, "offer": {"type": "offer", "sdp": "o"}, "invitee": "@a:x"});
    assert_eq!(
        deliver!(
            call,
            NOW,
            zero("m.call.invite", "C1", 0, invite.clone(), &call)
        ),
        Ok(Accepted::Processed)
    );
    let peer = drain(&mut call)
        .iter()
        .find_map(|o| match o {
            Output::Media(MediaRequest::AcceptOffer { peer, .. }) => Some(*peer),
            _ => None,
        })
        .unwrap();
    call.handle_media(
        NOW + 10,
        MediaEvent::AnswerCreated {
            peer,
            sdp: "a".into(),
            gathering_complete: true,
        },
    );
    let answer = sent(&drain(&mut call));
    assert_eq!(answer.len(), 1);
    assert_eq!(answer[0].0, "m.call.answer");
    // The caller heard nothing and sends the invite again: our answer goes
    // out again, unchanged (same seq).
    assert_eq!(
        deliver!(
            call,
            NOW + 5_000,
            zero("m.call.invite", "C1", 0, invite.clone(), &call)
        ),
        Ok(Accepted::Processed)
    );
    let again = sent(&drain(&mut call));
    assert_eq!(again, answer);
    // Once connected, a copy is only a duplicate.
    call.handle_media(
        NOW + 5_100,
        MediaEvent::State {
            peer,
            state: MediaState::Connected,
        },
    );
    drain(&mut call);
    assert_eq!(
        deliver!(
            call,
            NOW + 10_000,
            zero("m.call.invite", "C1", 0, invite.clone(), &call)
        ),
        Err(Ignored::Duplicate)
    );

    // A second caller whose first invite was lost: its candidates (seq 1)
    // wait for the gap, which is skipped; the invite's next copy is taken.
    call.handle_state(NOW, &join_ev("@1:x", "join")).unwrap();
    call.handle_state(NOW, &member_ev("@1:x", "ODEV", "OSESS", NOW + 3_600_000))
        .unwrap();
    drain(&mut call);
    let one = |ty: &str, seq: u64, body: Value, call: &GroupCall| {
        let mut m = zero(ty, "C2", seq, body, call);
        m.sender = "@1:x".into();
        m.sender_device = Some("ODEV".into());
        m.content["device_id"] = json!("ODEV");
        m.content["party_id"] = json!("ODEV");
        m.content["sender_session_id"] = json!("OSESS");
        m
    };
    let t = NOW + 20_000;
    assert_eq!(
        deliver!(
            call,
            t,
            one("m.call.candidates", 1, json!({"candidates": []}), &call)
        ),
        Ok(Accepted::Reordered)
    );
    call.handle_timeout(t + 2_000);
    drain(&mut call);
    assert_eq!(
        deliver!(call, t + 5_000, one("m.call.invite", 0, invite, &call)),
        Ok(Accepted::Processed)
    );
    assert!(drain(&mut call).iter().any(|o| matches!(o, Output::Media(MediaRequest::AcceptOffer { remote, .. }) if remote.device_id == "ODEV")));
}

#[test]
fn retries_stop_when_the_device_leaves() {
    let mut call = joined(|_| {});
    call.handle_state(NOW, &member_ev("@b:x", "BDEV", "BSESS", NOW + 3_600_000))
        .unwrap();
    let peer = offer_request(&drain(&mut call)).unwrap();
    call.handle_media(
        NOW,
        MediaEvent::OfferCreated {
            peer,
            sdp: "o".into(),
            gathering_complete: true,
        },
    );
    drain(&mut call);
    call.handle_state(NOW + 1000, &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@b:x", "sender": "@b:x", "content": {"m.calls": []}})).unwrap();
    // The unanswered invite's peer is kept through the orphan grace, then closed; no new call.
    for t in [NOW + 7000, NOW + 20_000, NOW + 40_000] {
        call.handle_timeout(t);
        assert!(offer_request(&drain(&mut call)).is_none());
    }
    assert!(call.peers().is_empty());
}

#[test]
fn glare_smaller_call_id_wins() {
    let mut call = joined(|_| {});
    call.handle_state(NOW, &member_ev("@b:x", "BDEV", "BSESS", NOW + 3_600_000))
        .unwrap();
    let peer = offer_request(&drain(&mut call)).unwrap();
    call.handle_media(
        NOW,
        MediaEvent::OfferCreated {
            peer,
            sdp: "o".into(),
            gathering_complete: true,
        },
    );
    let ours = sent(&drain(&mut call))[0].1["call_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Theirs is larger: we keep ours and hang up theirs.
    let big = format!("{ours}z");
    let inv = |_id: &str| json!({"lifetime": 60000, "offer": {"type": "offer", "sdp": "theirs"}, "invitee": "@a:x"});
    let r = deliver!(
        call,
        NOW + 5,
        with_dest(from_b("m.call.invite", &big, 0, inv(&big)), &call),
    );
    assert_eq!(r, Ok(Accepted::Processed));
    let outs = drain(&mut call);
    let s = sent(&outs);
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].0.as_str(), s[0].1["call_id"].as_str().unwrap()),
        ("m.call.hangup", big.as_str())
    );
    assert_eq!(call.peers()[0].1, peer);
    // Theirs is smaller: we drop ours and answer theirs.
    let small = "0000".to_owned();
    deliver!(
        call,
        NOW + 6,
        with_dest(from_b("m.call.invite", &small, 0, inv(&small)), &call),
    )
    .unwrap();
    let outs = drain(&mut call);
    assert!(outs.contains(&Output::Media(MediaRequest::ClosePeer { peer })));
    assert!(outs.iter().any(
        |o| matches!(o, Output::Media(MediaRequest::AcceptOffer { sdp, .. }) if sdp == "theirs")
    ));
    assert!(sent(&outs).iter().any(|(ty, c)| ty == "m.call.hangup"
        && c["call_id"] == ours.as_str()
        && c["reason"] == "replaced"));
}

#[test]
fn signalling_from_a_non_member_is_held_then_dropped_or_released() {
    let mut call = joined(|_| {});
    // An invite from @c, who is not (yet) in the member state.
    let mut m = from_b_session(
        "m.call.invite",
        "1",
        0,
        json!({"lifetime": 60000, "offer": {"type": "offer", "sdp": "c"}}),
        "CSESS",
    );
    m.sender = "@c:x".into();
    m.sender_device = Some("CDEV".into());
    m.content["device_id"] = json!("CDEV");
    m.content["party_id"] = json!("CDEV");
    let m = with_dest(m, &call);
    assert_eq!(
        deliver!(call, NOW, m.clone()),
        Ok(Accepted::HeldForMembership)
    );
    assert!(drain(&mut call).is_empty());
    // Grace passes: dropped, and reported once.
    call.handle_timeout(NOW + 9_999);
    assert!(reports(&drain(&mut call)).is_empty());
    call.handle_timeout(NOW + 10_000);
    let dropped = reports(&drain(&mut call));
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].sender, "@c:x");
    assert_eq!(dropped[0].event_type, "m.call.invite");
    assert!(dropped[0].encrypted);
    assert!(matches!(
        dropped[0].outcome,
        Err(Ignored::NotParticipant(_))
    ));
    call.handle_timeout(NOW + 10_000);
    assert!(reports(&drain(&mut call)).is_empty());
    call.handle_state(NOW + 10_001, &join_ev("@c:x", "join"))
        .unwrap();
    call.handle_state(
        NOW + 10_001,
        &member_ev("@c:x", "CDEV", "CSESS", NOW + 3_600_000),
    )
    .unwrap();
    assert!(
        !drain(&mut call)
            .iter()
            .any(|o| matches!(o, Output::Media(MediaRequest::AcceptOffer { .. })))
    );
    // Held, then its member event arrives in time: answered.
    let mut m2 = m.clone();
    m2.content["call_id"] = json!("2");
    call.handle_state(
        NOW + 10_002,
        &member_ev("@c:x", "CDEV", "CSESS2", NOW + 3_600_000),
    )
    .unwrap();
    drain(&mut call);
    m2.content["sender_session_id"] = json!("CSESS3");
    assert_eq!(
        deliver!(call, NOW + 10_003, m2),
        Ok(Accepted::HeldForMembership)
    );
    call.handle_state(
        NOW + 10_100,
        &member_ev("@c:x", "CDEV", "CSESS3", NOW + 3_600_000),
    )
    .unwrap();
    assert!(
        drain(&mut call)
            .iter()
            .any(|o| matches!(o, Output::Media(MediaRequest::AcceptOffer { .. })))
    );
}

#[test]
fn screenshare_renegotiates_and_updates_membership() {
    let mut call = joined(|_| {});
    let (peer, _) = connected_with_b(&mut call, NOW + 3_600_000);
    call.handle_command(NOW + 100, Command::Screenshare(true))
        .unwrap();
    let outs = drain(&mut call);
    let member = outs.iter().find_map(|o| match o {
        Output::PublishState { content, .. } => Some(content.clone()),
        _ => None,
    });
    assert_eq!(
        member.unwrap()["m.calls"][0]["m.devices"][0]["feeds"],
        json!([{"purpose": "m.usermedia"}, {"purpose": "m.screenshare"}])
    );
    let feeds = outs.iter().find_map(|o| match o {
        Output::Media(MediaRequest::CreateOffer {
            peer: p,
            feeds,
            ice_restart: false,
            ..
        }) if *p == peer => Some(feeds.clone()),
        _ => None,
    });
    assert_eq!(feeds.unwrap().len(), 2);
    call.handle_media(
        NOW + 110,
        MediaEvent::OfferCreated {
            peer,
            sdp: "o2".into(),
            gathering_complete: true,
        },
    );
    let s = sent(&drain(&mut call));
    assert_eq!(s[0].0, "m.call.negotiate");
    assert_eq!(s[0].1["description"]["type"], "offer");
    assert_eq!(s[0].1["sdp_stream_metadata"].as_object().unwrap().len(), 2);
}

/// The media of our call with b fails at `at`; the ICE restart offer is
/// created 1 ms later. Returns the outputs of each step.
fn ice_fails_at(call: &mut GroupCall, peer: PeerHandle, at: u64) -> (Vec<Output>, Vec<Output>) {
    call.handle_media(
        at,
        MediaEvent::State {
            peer,
            state: MediaState::Failed,
        },
    );
    let failed = drain(call);
    call.handle_media(
        at + 1,
        MediaEvent::OfferCreated {
            peer,
            sdp: "restart".into(),
            gathering_complete: true,
        },
    );
    (failed, drain(call))
}

#[test]
fn caller_restarts_ice_after_failure_then_hangs_up() {
    let mut call = joined(|_| {});
    let (peer, _) = connected_with_b(&mut call, NOW + 3_600_000);
    let (outs, restart) = ice_fails_at(&mut call, peer, NOW + 1000);
    assert!(outs.iter().any(|o| matches!(
        o,
        Output::Media(MediaRequest::CreateOffer {
            ice_restart: true,
            ..
        })
    )));
    assert!(outs.iter().any(|o| matches!(
        o,
        Output::Event(CallEvent::PeerState {
            status: PeerStatus::Reconnecting,
            ..
        })
    )));
    assert_eq!(sent(&restart)[0].0, "m.call.negotiate");
    // No recovery within the connect timeout: hang up with ice_timeout.
    call.handle_timeout(NOW + 1000 + 15_000);
    let outs = drain(&mut call);
    assert!(
        sent(&outs)
            .iter()
            .any(|(ty, c)| ty == "m.call.hangup" && c["reason"] == "ice_timeout")
    );
}

#[test]
fn a_hangup_crossing_ours_is_taken_as_after_the_end_and_one_for_an_unknown_call_is_refused() {
    let mut call = joined(|_| {});
    let (peer, call_id) = connected_with_b(&mut call, NOW + 3_600_000);
    // We give up on the call (no recovery after an ICE failure) while b
    // hangs up at the same moment: b's hangup arrives after ours went out.
    ice_fails_at(&mut call, peer, NOW + 1000);
    call.handle_timeout(NOW + 16_000);
    assert!(
        sent(&drain(&mut call))
            .iter()
            .any(|(ty, _)| ty == "m.call.hangup")
    );
    let theirs = with_dest(
        from_b(
            "m.call.hangup",
            &call_id,
            1,
            json!({"reason": "user_hangup"}),
        ),
        &call,
    );
    assert_eq!(deliver!(call, NOW + 16_100, theirs), Ok(Accepted::AfterEnd));
    drain(&mut call);
    // A hangup for a call this device never had is still refused.
    let stray = with_dest(
        from_b(
            "m.call.hangup",
            "never-seen",
            0,
            json!({"reason": "user_hangup"}),
        ),
        &call,
    );
    assert_eq!(
        deliver!(call, NOW + 16_200, stray),
        Err(Ignored::UnknownCall("never-seen".into()))
    );
}

#[test]
fn leave_hangs_up_and_removes_membership() {
    let mut call = joined(|_| {});
    let (peer, _) = connected_with_b(&mut call, NOW + 3_600_000);
    call.handle_command(NOW + 5, Command::Leave).unwrap();
    let outs = drain(&mut call);
    assert!(
        sent(&outs)
            .iter()
            .any(|(ty, c)| ty == "m.call.hangup" && c["reason"] == "user_hangup")
    );
    assert!(outs.contains(&Output::Media(MediaRequest::ClosePeer { peer })));
    assert!(outs.iter().any(
        |o| matches!(o, Output::PublishState { content, .. } if *content == json!({"m.calls": []}))
    ));
    assert!(outs.contains(&Output::Event(CallEvent::Left)));
    assert_eq!(
        call.handle_command(NOW + 6, Command::Leave),
        Err(CommandError::NotJoined)
    );
}

#[test]
fn membership_is_refreshed_before_it_expires() {
    let mut call = joined(|c| {
        c.member_expiry_ms = 60_000;
        c.member_refresh_ms = 45_000;
    });
    assert!(call.poll_timeout().unwrap() <= NOW + 45_000);
    call.handle_timeout(NOW + 45_000);
    let outs = drain(&mut call);
    let c = outs.iter().find_map(|o| match o {
        Output::PublishState { content, .. } => Some(content.clone()),
        _ => None,
    });
    assert_eq!(
        c.unwrap()["m.calls"][0]["m.devices"][0]["expires_ts"],
        NOW + 45_000 + 60_000
    );
}

#[test]
fn terminate_marks_the_call_ended() {
    let mut call = joined(|_| {});
    call.handle_command(NOW + 5, Command::Terminate).unwrap();
    let outs = drain(&mut call);
    assert!(outs.iter().any(|o| matches!(o, Output::PublishState { event_type, content, .. }
        if event_type == "org.matrix.msc3401.call" && content["m.terminated"] == "call_ended" && content["m.intent"] == "m.prompt")));
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Event(CallEvent::CallEnded { .. })))
    );
}

#[test]
fn terminated_by_someone_else_ends_our_call() {
    // The reference terminates with the call's content plus "m.terminated"
    // (a newer event with the same state key as the live call).
    let mut call = joined(|_| {});
    call.handle_state(
        NOW + 10,
        &json!({"type": "org.matrix.msc3401.call", "state_key": CONF, "sender": "@b:x", "origin_server_ts": NOW + 10,
            "content": {"m.intent": "m.prompt", "m.type": "m.video", "m.terminated": "call_ended"}}),
    )
    .unwrap();
    let outs = drain(&mut call);
    assert!(
        outs.iter().any(
            |o| matches!(o, Output::Event(CallEvent::CallEnded { call_id, reason })
            if call_id == CONF && reason == "call_ended")
        ),
        "{outs:?}"
    );
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Event(CallEvent::Left)))
    );
    assert!(outs.iter().any(
        |o| matches!(o, Output::PublishState { event_type, content, .. }
        if event_type == "org.matrix.msc3401.call.member" && content["m.calls"] == json!([]))
    ));
    assert_eq!(call.joined_call_id(), None);
}

#[test]
fn join_without_a_call_needs_create() {
    let mut call = GroupCall::new(Config::new("@a:x", "ADEV"));
    assert_eq!(
        call.handle_command(
            NOW,
            Command::Join {
                create: None,
                audio: true,
                video: false
            }
        ),
        Err(CommandError::NoCallToJoin)
    );
    call.handle_command(
        NOW,
        Command::Join {
            create: Some(CreateOptions::default()),
            audio: true,
            video: false,
        },
    )
    .unwrap();
    let outs = drain(&mut call);
    assert!(outs.iter().any(|o| matches!(o, Output::PublishState { event_type, .. } if event_type == "org.matrix.msc3401.call")));
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Event(CallEvent::Joined { created: true, .. })))
    );
}

#[test]
fn a_device_whose_entry_vanished_during_setup_is_reported_gone_when_its_peer_ends() {
    let mut call = joined(|_| {});
    call.handle_state(NOW, &member_ev("@b:x", "BDEV", "BSESS", NOW + 3_600_000))
        .unwrap();
    let peer = offer_request(&drain(&mut call)).unwrap();
    call.handle_media(
        NOW,
        MediaEvent::OfferCreated {
            peer,
            sdp: "o".into(),
            gathering_complete: true,
        },
    );
    drain(&mut call);
    // b's entry disappears while our invite is unanswered (open for its
    // 60 s lifetime); the peer is kept for the orphan grace, then ends.
    call.handle_state(
        NOW + 100,
        &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@b:x", "sender": "@b:x", "content": {"m.calls": []}}),
    )
    .unwrap();
    assert!(
        !drain(&mut call)
            .iter()
            .any(|o| matches!(o, Output::Event(CallEvent::ParticipantLeft { .. })))
    );
    call.handle_timeout(NOW + 5099);
    assert!(!drain(&mut call).contains(&Output::Media(MediaRequest::ClosePeer { peer })));
    call.handle_timeout(NOW + 5100);
    let outs = drain(&mut call);
    assert!(outs.contains(&Output::Media(MediaRequest::ClosePeer { peer })));
    assert!(outs.iter().any(|o| matches!(o, Output::Event(CallEvent::ParticipantLeft { device, reason: LeftReason::Removed, .. }) if device.device_id == "BDEV")));
    assert!(
        offer_request(&outs).is_none(),
        "no new call to a device that left"
    );
}

#[test]
fn a_failed_call_is_not_placed_again_before_the_retry_interval() {
    let mut call = joined(|_| {});
    let (peer, _) = connected_with_b(&mut call, NOW + 3_600_000);
    call.handle_media(
        NOW + 1000,
        MediaEvent::Error {
            peer,
            message: "peer closed".into(),
        },
    );
    let outs = drain(&mut call);
    assert!(outs.contains(&Output::Media(MediaRequest::ClosePeer { peer })));
    assert!(offer_request(&outs).is_none(), "re-called at once");
    assert_eq!(call.poll_timeout(), Some(NOW + 1000 + 5000));
    call.handle_timeout(NOW + 6000);
    assert!(
        offer_request(&drain(&mut call)).is_some(),
        "re-called after the interval"
    );
}

#[test]
fn an_unanswered_renegotiation_offer_is_sent_again_then_the_call_is_dropped() {
    let mut call = joined(|_| {});
    let (peer, _) = connected_with_b(&mut call, NOW + 3_600_000);
    call.handle_command(NOW + 100, Command::Screenshare(true))
        .unwrap();
    drain(&mut call);
    call.handle_media(
        NOW + 110,
        MediaEvent::OfferCreated {
            peer,
            sdp: "o2".into(),
            gathering_complete: true,
        },
    );
    let first = sent(&drain(&mut call));
    assert_eq!(first[0].0, "m.call.negotiate");
    let mut seqs = vec![first[0].1["seq"].as_u64().unwrap()];
    // The offer (or its answer) is lost: it goes out again every 5 s, the
    // same SDP with the next seq, three times.
    for i in 1..=3u64 {
        let t = NOW + 110 + i * 5000;
        assert!(call.poll_timeout().unwrap() <= t);
        call.handle_timeout(t);
        let again = sent(&drain(&mut call));
        assert_eq!(again.len(), 1, "resend {i}");
        assert_eq!(again[0].0, "m.call.negotiate");
        assert_eq!(again[0].1["description"]["sdp"], "o2");
        seqs.push(again[0].1["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, vec![seqs[0], seqs[0] + 1, seqs[0] + 2, seqs[0] + 3]);
    // Still nothing: hang up; the peer is gone.
    call.handle_timeout(NOW + 110 + 4 * 5000);
    let outs = drain(&mut call);
    assert!(
        sent(&outs)
            .iter()
            .any(|(ty, c)| ty == "m.call.hangup" && c["reason"] == "signalling_timeout")
    );
    assert!(outs.contains(&Output::Media(MediaRequest::ClosePeer { peer })));
}

#[test]
fn an_answered_renegotiation_offer_is_not_sent_again() {
    let mut call = joined(|_| {});
    let (peer, call_id) = connected_with_b(&mut call, NOW + 3_600_000);
    call.handle_command(NOW + 100, Command::Screenshare(true))
        .unwrap();
    drain(&mut call);
    call.handle_media(
        NOW + 110,
        MediaEvent::OfferCreated {
            peer,
            sdp: "o2".into(),
            gathering_complete: true,
        },
    );
    drain(&mut call);
    let answer = with_dest(
        from_b(
            "m.call.negotiate",
            &call_id,
            1,
            json!({"description": {"type": "answer", "sdp": "a2"}}),
        ),
        &call,
    );
    assert_eq!(deliver!(call, NOW + 200, answer), Ok(Accepted::Processed));
    assert!(
        drain(&mut call).iter().any(
            |o| matches!(o, Output::Media(MediaRequest::ApplyAnswer { sdp, .. }) if sdp == "a2")
        )
    );
    call.handle_timeout(NOW + 30_000);
    assert!(sent(&drain(&mut call)).is_empty());
}

// ----------------------------------------------------------------------
// What other clients write (read-side leniency).

#[test]
fn any_truthy_m_terminated_ends_the_call_and_falsy_ones_do_not() {
    // Hydrogen writes `true`; matrix-js-sdk only checks truthiness.
    for (value, ends, reason) in [
        (json!(true), true, "call_ended"),
        (json!("hung_up_by_admin"), true, "hung_up_by_admin"),
        (json!(1), true, "call_ended"),
        (json!({"why": "x"}), true, "call_ended"),
        (json!(false), false, ""),
        (json!(0), false, ""),
        (json!(""), false, ""),
        (json!(null), false, ""),
    ] {
        let mut call = joined(|_| {});
        let r = call.handle_state(
            NOW + 10,
            &json!({"type": "org.matrix.msc3401.call", "state_key": CONF, "sender": "@b:x", "origin_server_ts": NOW + 10,
                "content": {"m.intent": "m.prompt", "m.type": "m.video", "m.terminated": value.clone()}}),
        );
        assert_eq!(r, Ok(()), "{value}");
        let outs = drain(&mut call);
        let ended = outs.iter().any(|o| {
            matches!(o, Output::Event(CallEvent::CallEnded { call_id, reason: r }) if call_id == CONF && r == reason)
        });
        assert_eq!(ended, ends, "{value}: {outs:?}");
        assert_eq!(call.joined_call_id().is_none(), ends, "{value}");
        if ends {
            assert!(outs.iter().any(|o| matches!(o, Output::PublishState { content, .. } if content["m.calls"] == json!([]))));
        }
    }
}

#[test]
fn an_odd_field_in_m_call_does_not_hide_the_call() {
    let mut call = GroupCall::new(Config::new("@a:x", "ADEV"));
    call.handle_state(
        NOW,
        &json!({"type": "m.call", "state_key": "C9", "sender": "@b:x", "origin_server_ts": NOW,
            "content": {"m.intent": 7, "m.type": "m.voice", "x.other": [1]}}),
    )
    .unwrap();
    let live = call.room().live_call().unwrap();
    assert_eq!(live.call_id, "C9");
    assert_eq!(live.content.intent, None);
    assert_eq!(live.content.extra["m.intent"], json!(7), "kept as written");
}

#[test]
fn top_level_m_expires_ts_is_read_when_a_device_has_none() {
    let mut call = joined(|_| {});
    call.handle_state(
        NOW,
        &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@b:x", "sender": "@b:x", "origin_server_ts": NOW,
            "content": {"m.expires_ts": NOW + 30_000, "m.calls": [{"m.call_id": CONF, "m.devices": [
                {"device_id": "BDEV", "session_id": "BSESS", "feeds": [{"purpose": "m.usermedia"}]},
                {"device_id": "BDEV2", "session_id": "S2", "expires_ts": NOW + 90_000}]}]}}),
    )
    .unwrap();
    let p = call.room().participants();
    assert_eq!(p[&DeviceKey::new("@b:x", "BDEV")].expires_ts, NOW + 30_000);
    assert_eq!(
        p[&DeviceKey::new("@b:x", "BDEV2")].expires_ts,
        NOW + 90_000,
        "a device's own expiry wins; feeds may be missing"
    );
    call.handle_timeout(NOW + 30_000);
    assert!(
        !call
            .room()
            .participants()
            .contains_key(&DeviceKey::new("@b:x", "BDEV"))
    );
    // Without either, the entry is skipped.
    call.handle_state(
        NOW,
        &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@c:x", "sender": "@c:x", "origin_server_ts": NOW,
            "content": {"m.calls": [{"m.call_id": CONF, "m.devices": [{"device_id": "C", "session_id": "S", "feeds": []}]}]}}),
    )
    .unwrap();
    assert!(
        !call
            .room()
            .participants()
            .keys()
            .any(|k| k.user_id == "@c:x")
    );
}

#[test]
fn a_stale_member_event_under_one_name_does_not_hide_a_live_one_under_the_other() {
    let mut call = joined(|_| {});
    // b's live entry is under the unstable name ...
    call.handle_state(NOW, &member_ev("@b:x", "BDEV", "BSESS", NOW + 3_600_000))
        .unwrap();
    // ... and an old, expired one under the stable name arrives later.
    let mut stale = member_ev("@b:x", "BDEV", "OLD", NOW - 1);
    stale["type"] = json!("m.call.member");
    call.handle_state(NOW + 5, &stale).unwrap();
    let p = call.room().participants();
    assert_eq!(p[&DeviceKey::new("@b:x", "BDEV")].session_id, "BSESS");
    // The other way round: a stable live entry is not hidden by an
    // unstable stale one.
    let mut live_c = member_ev("@c:x", "CDEV", "CSESS", NOW + 3_600_000);
    live_c["type"] = json!("m.call.member");
    call.handle_state(NOW, &join_ev("@c:x", "join")).unwrap();
    call.handle_state(NOW, &live_c).unwrap();
    call.handle_state(NOW, &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@c:x", "sender": "@c:x", "content": {"m.calls": []}}))
        .unwrap();
    assert!(
        call.room()
            .participants()
            .contains_key(&DeviceKey::new("@c:x", "CDEV"))
    );
}

#[test]
fn our_content_is_edited_from_the_event_under_the_name_we_write() {
    let mut call = GroupCall::new(Config::new("@a:x", "ADEV"));
    call.handle_state(NOW, &join_ev("@a:x", "join")).unwrap();
    call.handle_state(
        NOW,
        &json!({"type": "org.matrix.msc3401.call", "state_key": CONF, "sender": "@b:x", "origin_server_ts": NOW,
            "content": {"m.intent": "m.prompt", "m.type": "m.video"}}),
    )
    .unwrap();
    // A stale stable-name event of ours from another client: not copied.
    call.handle_state(
        NOW,
        &json!({"type": "m.call.member", "state_key": "@a:x", "sender": "@a:x", "origin_server_ts": NOW,
            "content": {"m.calls": [{"m.call_id": "OLDCALL", "m.devices": [
                {"device_id": "OTHER", "session_id": "S", "expires_ts": NOW + 3_600_000, "feeds": []}]}], "x.stable": 1}}),
    )
    .unwrap();
    // Our unstable-name event keeps another app's key.
    call.handle_state(
        NOW,
        &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@a:x", "sender": "@a:x", "origin_server_ts": NOW,
            "content": {"m.calls": [], "memberships": [{"application": "m.call"}]}}),
    )
    .unwrap();
    drain(&mut call);
    call.handle_command(
        NOW,
        Command::Join {
            create: None,
            audio: true,
            video: true,
        },
    )
    .unwrap();
    let content = drain(&mut call)
        .into_iter()
        .find_map(|o| match o {
            Output::PublishState {
                event_type,
                content,
                ..
            } if event_type == "org.matrix.msc3401.call.member" => Some(content),
            _ => None,
        })
        .unwrap();
    assert_eq!(content["m.calls"].as_array().unwrap().len(), 1);
    assert_eq!(content["m.calls"][0]["m.call_id"], CONF);
    assert!(
        content.get("x.stable").is_none(),
        "nothing from the other name: {content}"
    );
    assert_eq!(content["memberships"], json!([{"application": "m.call"}]));
}

#[test]
fn messages_other_than_invites_need_no_device_id_nor_sender_session_id() {
    let mut call = joined(|_| {});
    let (peer, call_id) = connected_with_b(&mut call, NOW + 3_600_000);
    // A plaintext hangup that names neither: matched by its call id.
    let mut m = with_dest(
        from_b(
            "m.call.sdp_stream_metadata_changed",
            &call_id,
            1,
            json!({"sdp_stream_metadata": {}}),
        ),
        &call,
    );
    let obj = m.content.as_object_mut().unwrap();
    obj.remove("device_id");
    obj.remove("sender_session_id");
    obj.remove("party_id");
    m.sender_device = None;
    m.encrypted = false;
    assert_eq!(
        deliver!(call, NOW + 100, m.clone()),
        Ok(Accepted::Processed)
    );
    // The same shape on a call we do not have: refused, not guessed.
    m.content["call_id"] = json!("nope");
    m.content["seq"] = json!(0);
    assert_eq!(
        deliver!(call, NOW + 110, m),
        Err(Ignored::UnknownCall("nope".into()))
    );
    // An invite must name both (MSC3401).
    let mut inv = with_dest(
        from_b(
            "m.call.invite",
            "NEWCALL",
            0,
            json!({"lifetime": 60000, "offer": {"type": "offer", "sdp": "o"}}),
        ),
        &call,
    );
    inv.content
        .as_object_mut()
        .unwrap()
        .remove("sender_session_id");
    assert!(matches!(
        deliver!(call, NOW + 120, inv),
        Err(Ignored::Malformed(ParseError::MissingField(
            "sender_session_id"
        )))
    ));
    assert_eq!(
        call.peers(),
        vec![(DeviceKey::new("@b:x", "BDEV"), peer, true)]
    );
}

#[test]
fn msc4143_memberships_in_the_room_are_neither_misread_nor_an_error() {
    let mut call = joined(|_| {});
    connected_with_b(&mut call, NOW + 3_600_000);
    // Today's Element Call: per-device state keys on the same type.
    for key in ["_@e:x_EDEV", "@e:x_EDEV"] {
        let r = call.handle_state(
            NOW + 200,
            &json!({"type": "org.matrix.msc3401.call.member", "state_key": key, "sender": "@e:x", "origin_server_ts": NOW,
                "content": {"application": "m.call", "call_id": "", "device_id": "EDEV", "scope": "m.room",
                    "focus_active": {"type": "livekit"}, "foci_preferred": [{"type": "livekit", "livekit_service_url": "https://x"}],
                    "expires": 14400000}}),
        );
        assert_eq!(r, Ok(()), "{key}");
    }
    // The older MSC4143 shape under the user's own key.
    call.handle_state(NOW, &join_ev("@e:x", "join")).unwrap();
    call.handle_state(
        NOW + 200,
        &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@e:x", "sender": "@e:x", "origin_server_ts": NOW,
            "content": {"memberships": [{"application": "m.call", "call_id": "", "device_id": "EDEV", "expires": 3600000}]}}),
    )
    .unwrap();
    assert!(
        !call
            .room()
            .participants()
            .keys()
            .any(|k| k.user_id == "@e:x")
    );
    let keys: Vec<_> = call.room().participants().keys().cloned().collect();
    assert_eq!(keys, vec![DeviceKey::new("@b:x", "BDEV")], "b, untouched");
    assert_eq!(call.peers().len(), 1);
    assert!(call.peers()[0].2, "still connected");
    // A key that is not of that shape is still refused as a spoof.
    assert!(call
        .handle_state(NOW, &json!({"type": "org.matrix.msc3401.call.member", "state_key": "@b:x_BDEV", "sender": "@e:x", "content": {}}))
        .is_err());
}

#[test]
fn a_call_starting_in_the_room_is_reported_with_its_intent() {
    for intent in ["m.ring", "m.prompt", "m.room"] {
        let mut call = GroupCall::new(Config::new("@a:x", "ADEV"));
        call.handle_state(
            NOW,
            &json!({"type": "org.matrix.msc3401.call", "state_key": "C1", "sender": "@b:x", "origin_server_ts": NOW,
                "content": {"m.intent": intent, "m.type": "m.voice", "m.name": "standup"}}),
        )
        .unwrap();
        let outs = drain(&mut call);
        assert!(
            outs.contains(&Output::Event(CallEvent::CallStarted {
                call_id: "C1".into(),
                intent: Some(groupcall_proto::events::CallIntent::from(intent.to_owned())),
                call_type: Some(groupcall_proto::events::CallType::Voice),
                name: Some("standup".into()),
            })),
            "{outs:?}"
        );
    }
}

#[test]
fn one_session_per_core_across_rejoins() {
    let mut call = joined(|_| {});
    let first = call.session_id().unwrap().to_owned();
    call.handle_command(NOW + 1, Command::Leave).unwrap();
    call.handle_command(
        NOW + 2,
        Command::Join {
            create: None,
            audio: true,
            video: true,
        },
    )
    .unwrap();
    assert_eq!(call.session_id(), Some(first.as_str()));
    // A driver passes its process's session.
    let mut c = Config::new("@a:x", "ADEV");
    c.session_id = Some("PROCESS".into());
    let mut other = GroupCall::new(c);
    other.handle_state(NOW, &join_ev("@a:x", "join")).unwrap();
    other
        .handle_command(
            NOW,
            Command::Join {
                create: Some(CreateOptions::default()),
                audio: true,
                video: false,
            },
        )
        .unwrap();
    assert_eq!(other.session_id(), Some("PROCESS"));
}

#[test]
fn timers_run_on_the_monotonic_clock_and_expiries_on_the_wall_clock() {
    const HOUR: u64 = 3_600_000;
    let mut call = joined(|c| {
        c.member_expiry_ms = 60_000;
        c.member_refresh_ms = 45_000;
    });
    call.handle_state(NOW, &member_ev("@b:x", "BDEV", "BSESS", NOW + HOUR))
        .unwrap();
    let peer = offer_request(&drain(&mut call)).expect("we call b");
    call.handle_media(
        NOW,
        MediaEvent::OfferCreated {
            peer,
            sdp: "offer".into(),
            gathering_complete: true,
        },
    );
    let first = sent(&drain(&mut call));
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, "m.call.invite");
    // The wall clock steps back an hour (an NTP step): the unanswered
    // invite is still sent again 5 s later on the monotonic clock.
    let back = |mono: u64| Now {
        mono_ms: mono,
        unix_ms: mono - HOUR,
    };
    call.handle_timeout(back(NOW + 4_999));
    assert!(sent(&drain(&mut call)).is_empty());
    assert!(call.poll_timeout().unwrap() <= NOW + 5_000);
    call.handle_timeout(back(NOW + 5_000));
    let again = sent(&drain(&mut call));
    assert_eq!(again.len(), 1);
    assert_eq!(again[0], first[0]);
    // Our membership refresh is a monotonic timer too; the expires_ts it
    // writes is wall-clock time.
    call.handle_timeout(back(NOW + 45_000));
    let content = drain(&mut call)
        .into_iter()
        .find_map(|o| match o {
            Output::PublishState { content, .. } => Some(content),
            _ => None,
        })
        .expect("membership refreshed at 45 s");
    assert_eq!(
        content["m.calls"][0]["m.devices"][0]["expires_ts"],
        NOW + 45_000 - HOUR + 60_000
    );
    // b's entry expires on the wall clock: once wall time passes its
    // expires_ts, b is gone although the monotonic clock moved 1 s.
    assert_eq!(call.peers().len(), 1);
    call.handle_timeout(Now {
        mono_ms: NOW + 46_000,
        unix_ms: NOW + HOUR,
    });
    let outs = drain(&mut call);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Media(MediaRequest::ClosePeer { peer: p }) if *p == peer))
    );
    assert!(outs.iter().any(|o| matches!(
        o,
        Output::Event(CallEvent::ParticipantLeft {
            reason: LeftReason::Expired,
            ..
        })
    )));
    assert!(call.peers().is_empty());
}

fn focus() -> FocusRef {
    FocusRef {
        user_id: "@sfu:x".into(),
        device_id: "SFUDEV".into(),
    }
}

/// The devices new calls were placed to (offers without ICE restart), with
/// whether the peer is a focus peer.
fn calls_placed(outs: &[Output]) -> Vec<(DeviceKey, PeerHandle, bool)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Media(MediaRequest::CreateOffer {
                peer,
                remote,
                ice_restart: false,
                focus,
                ..
            }) => Some((remote.clone(), *peer, *focus)),
            _ => None,
        })
        .collect()
}

fn placed_to(outs: &[Output], user: &str) -> bool {
    calls_placed(outs).iter().any(|(d, _, _)| d.user_id == user)
}

/// `user`'s member event listing `foci` (stable or unstable key) as active.
fn member_with_foci(user: &str, device: &str, key: &str, foci: Value) -> Value {
    let mut ev = member_ev(user, device, &format!("{device}-S"), NOW + 7_200_000);
    ev["content"]["m.calls"][0]["m.devices"][0][key] = foci;
    ev
}

fn from_focus(
    ty: &str,
    call_id: &str,
    seq: u64,
    mut body: Value,
    call: &GroupCall,
) -> IncomingToDevice {
    body["version"] = json!("1");
    body["call_id"] = json!(call_id);
    body["party_id"] = json!("SFUDEV");
    body["conf_id"] = json!(CONF);
    body["device_id"] = json!("SFUDEV");
    body["sender_session_id"] = json!("FOCUS-S");
    body["dest_session_id"] = json!(call.session_id().unwrap());
    body["seq"] = json!(seq);
    IncomingToDevice {
        sender: "@sfu:x".into(),
        sender_device: Some("SFUDEV".into()),
        event_type: ty.into(),
        content: body,
        encrypted: true,
    }
}

#[test]
fn devices_that_publish_to_a_focus_meet_there_and_keep_the_mesh_with_the_others() {
    let mut call = joined(|c| c.focus = Some(focus()));
    let now = NOW + 1000;
    // Our entry names the focus, under both names of both lists.
    call.handle_command(now, Command::Screenshare(true))
        .unwrap();
    let published = drain(&mut call)
        .into_iter()
        .find_map(|o| match o {
            Output::PublishState { content, .. } => Some(content),
            _ => None,
        })
        .expect("the screenshare republishes our entry");
    let dev = &published["m.calls"][0]["m.devices"][0];
    let f = json!([{"user_id": "@sfu:x", "device_id": "SFUDEV"}]);
    for key in [
        "m.foci.active",
        "org.matrix.msc3898.foci.active",
        "m.foci.preferred",
        "org.matrix.msc3898.foci.preferred",
    ] {
        assert_eq!(dev[key], f, "{key}");
    }

    // b publishes to a focus (unstable key): not called in the mesh.
    call.handle_state(
        now,
        &member_with_foci("@b:x", "BDEV", "org.matrix.msc3898.foci.active", f.clone()),
    )
    .unwrap();
    assert!(!placed_to(&drain(&mut call), "@b:x"));
    assert_eq!(
        call.room().participants()[&DeviceKey::new("@b:x", "BDEV")].foci_active,
        vec![focus()]
    );
    // c has no focus (the reference has no focus mode): called in the mesh.
    call.handle_state(now, &join_ev("@c:x", "join")).unwrap();
    call.handle_state(now, &member_ev("@c:x", "CDEV", "CSESS", NOW + 7_200_000))
        .unwrap();
    assert!(placed_to(&drain(&mut call), "@c:x"));
    // A malformed foci list reads as none: d is called in the mesh.
    call.handle_state(now, &join_ev("@d:x", "join")).unwrap();
    call.handle_state(
        now,
        &member_with_foci(
            "@d:x",
            "DDEV",
            "m.foci.active",
            json!([{"user_id": 5}, "x"]),
        ),
    )
    .unwrap();
    assert!(placed_to(&drain(&mut call), "@d:x"));
}

#[test]
fn without_a_focus_of_our_own_members_that_use_one_are_called_in_the_mesh() {
    let mut call = joined(|_| {});
    call.handle_state(
        NOW,
        &member_with_foci(
            "@b:x",
            "BDEV",
            "m.foci.active",
            json!([{"user_id": "@sfu:x", "device_id": "SFUDEV"}]),
        ),
    )
    .unwrap();
    assert!(placed_to(&drain(&mut call), "@b:x"));
}

#[test]
fn the_focus_is_called_once_and_when_it_goes_the_mesh_takes_over() {
    // Joining with a focus calls it (a focus peer: the data channel).
    let mut c = Config::new("@a:x", "ADEV");
    c.focus = Some(focus());
    let mut call = GroupCall::new(c);
    call.handle_state(NOW, &join_ev("@a:x", "join")).unwrap();
    call.handle_state(NOW, &join_ev("@b:x", "join")).unwrap();
    call.handle_state(
        NOW,
        &json!({"type": "org.matrix.msc3401.call", "state_key": CONF, "sender": "@b:x", "origin_server_ts": NOW,
            "content": {"m.intent": "m.prompt", "m.type": "m.video"}}),
    )
    .unwrap();
    call.handle_command(
        NOW,
        Command::Join {
            create: None,
            audio: true,
            video: true,
        },
    )
    .unwrap();
    call.handle_membership_published(NOW);
    let placed = calls_placed(&drain(&mut call));
    let focus_key = DeviceKey::new("@sfu:x", "SFUDEV");
    assert_eq!(placed.len(), 1);
    let (dev, peer, is_focus) = placed[0].clone();
    assert_eq!((dev, is_focus), (focus_key.clone(), true));

    // b uses the same focus: not called.
    call.handle_state(
        NOW,
        &member_with_foci(
            "@b:x",
            "BDEV",
            "m.foci.active",
            json!([{"user_id": "@sfu:x", "device_id": "SFUDEV"}]),
        ),
    )
    .unwrap();
    assert!(calls_placed(&drain(&mut call)).is_empty());

    // The invite goes to the focus device, whose session we do not know
    // yet: its device id stands for it.
    call.handle_media(
        NOW,
        MediaEvent::OfferCreated {
            peer,
            sdp: "offer".into(),
            gathering_complete: true,
        },
    );
    let outs = drain(&mut call);
    let invites: Vec<_> = outs
        .iter()
        .filter_map(|o| match o {
            Output::ToDevice(b) if b.event_type.ends_with("call.invite") => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(invites.len(), 1);
    let m = &invites[0].messages[0];
    assert_eq!(
        (m.user_id.as_str(), m.device_id.as_str()),
        ("@sfu:x", "SFUDEV")
    );
    assert_eq!(m.content["dest_session_id"], json!("SFUDEV"));
    let call_id = m.content["call_id"].as_str().unwrap().to_owned();

    // Its answer is taken although it has no member entry; its session is
    // learnt from the answer and used from then on.
    let answer = from_focus(
        "m.call.answer",
        &call_id,
        0,
        json!({"answer": {"type": "answer", "sdp": "answer"}}),
        &call,
    );
    assert_eq!(deliver!(call, NOW + 10, answer), Ok(Accepted::Processed));
    let outs = drain(&mut call);
    let select = sent(&outs)
        .into_iter()
        .find(|(t, _)| t.ends_with("select_answer"))
        .expect("select_answer to the focus");
    assert_eq!(select.1["dest_session_id"], json!("FOCUS-S"));
    call.handle_media(
        NOW + 20,
        MediaEvent::State {
            peer,
            state: MediaState::Connected,
        },
    );
    drain(&mut call);
    assert_eq!(call.peers(), vec![(focus_key.clone(), peer, true)]);

    // The focus hangs up: b (which uses it too) is called in the mesh, and
    // the focus is called again after the retry interval.
    let hangup = from_focus(
        "m.call.hangup",
        &call_id,
        1,
        json!({"reason": "user_hangup"}),
        &call,
    );
    assert_eq!(deliver!(call, NOW + 30, hangup), Ok(Accepted::Processed));
    let outs = drain(&mut call);
    assert!(placed_to(&outs, "@b:x"), "the mesh takes over: {outs:?}");
    assert!(!placed_to(&outs, "@sfu:x"));
    call.handle_timeout(NOW + 30 + 60_000);
    let outs = drain(&mut call);
    assert!(
        calls_placed(&outs)
            .iter()
            .any(|(d, _, f)| *d == focus_key && *f),
        "the focus is called again: {outs:?}"
    );
}

/// Our member entry as last published among `outs`, if it was.
fn own_entry(outs: &[Output]) -> Option<Value> {
    outs.iter().rev().find_map(|o| match o {
        Output::PublishState { content, .. } => Some(content["m.calls"][0]["m.devices"][0].clone()),
        _ => None,
    })
}

#[test]
fn a_client_the_focus_turns_down_names_no_active_focus_until_it_is_back() {
    let (mut call, peer, call_id) = connected_to_focus();
    // The focus is full: its reject makes us fall back to the mesh, and our
    // entry now names no active focus (still the preferred one), so that
    // members still at the focus meet us in the mesh.
    let reject = from_focus(
        "m.call.hangup",
        &call_id,
        1,
        json!({"reason": "focus_full"}),
        &call,
    );
    assert_eq!(deliver!(call, NOW + 30, reject), Ok(Accepted::Processed));
    let outs = drain(&mut call);
    let dev = own_entry(&outs).expect("our entry is republished");
    let f = json!([{"user_id": "@sfu:x", "device_id": "SFUDEV"}]);
    for key in ["m.foci.active", "org.matrix.msc3898.foci.active"] {
        assert!(dev.get(key).is_none(), "{key} in {dev}");
    }
    for key in ["m.foci.preferred", "org.matrix.msc3898.foci.preferred"] {
        assert_eq!(dev[key], f, "{key}");
    }
    assert!(
        placed_to(&outs, "@b:x"),
        "b is called in the mesh: {outs:?}"
    );

    // The focus is called again later and answers: our entry names it
    // again, and the mesh call with b (at the focus) ends.
    call.handle_timeout(NOW + 30 + 10_000);
    let outs = drain(&mut call);
    let (_, again, _) = calls_placed(&outs)
        .into_iter()
        .find(|(_, _, f)| *f)
        .expect("the focus is called again");
    assert_ne!(again, peer);
    call.handle_media(
        NOW + 10_100,
        MediaEvent::OfferCreated {
            peer: again,
            sdp: "offer".into(),
            gathering_complete: true,
        },
    );
    let invite = sent(&drain(&mut call))
        .into_iter()
        .find(|(t, _)| t.ends_with("call.invite"))
        .expect("an invite to the focus")
        .1;
    let answer = from_focus(
        "m.call.answer",
        invite["call_id"].as_str().unwrap(),
        0,
        json!({"answer": {"type": "answer", "sdp": "answer"}}),
        &call,
    );
    assert_eq!(
        deliver!(call, NOW + 10_200, answer),
        Ok(Accepted::Processed)
    );
    assert!(
        call.peers().iter().any(|(d, _, _)| d.user_id == "@b:x"),
        "in the mesh with b: {:?}",
        call.peers()
    );
    call.handle_media(
        NOW + 10_300,
        MediaEvent::State {
            peer: again,
            state: MediaState::Connected,
        },
    );
    let outs = drain(&mut call);
    let dev = own_entry(&outs).expect("our entry is republished");
    assert_eq!(dev["m.foci.active"], f);
    assert_eq!(
        call.peers(),
        vec![(DeviceKey::new("@sfu:x", "SFUDEV"), again, true)],
        "the mesh call with b ends: {outs:?}"
    );
}

#[test]
fn members_still_at_the_focus_call_one_that_fell_back_and_leave_it_when_it_returns() {
    let (mut call, _, _) = connected_to_focus();
    let f = json!([{"user_id": "@sfu:x", "device_id": "SFUDEV"}]);
    // b fell back to the mesh: its entry names no active focus. We (a,
    // still at the focus) call it.
    let mut b = member_with_foci("@b:x", "BDEV", "m.foci.preferred", f.clone());
    b["origin_server_ts"] = json!(NOW + 100);
    call.handle_state(NOW + 100, &b).unwrap();
    let outs = drain(&mut call);
    let b_peer = calls_placed(&outs)
        .into_iter()
        .find(|(d, _, _)| d.user_id == "@b:x")
        .expect("b is called in the mesh")
        .1;
    // b is back at the focus: we end the mesh call and meet it there.
    let mut b = member_with_foci("@b:x", "BDEV", "m.foci.active", f);
    b["origin_server_ts"] = json!(NOW + 200);
    call.handle_state(NOW + 200, &b).unwrap();
    let outs = drain(&mut call);
    assert!(
        outs.iter().any(
            |o| matches!(o, Output::Media(MediaRequest::ClosePeer { peer: p }) if *p == b_peer)
        ),
        "the mesh call with b ends: {outs:?}"
    );
    let hangup = sent(&outs)
        .into_iter()
        .find(|(t, _)| t.ends_with("call.hangup"))
        .expect("a hangup to b")
        .1;
    assert_eq!(hangup["reason"], "focus_back");
}

#[test]
fn following_the_members_foci_we_join_theirs_and_move_when_they_do() {
    let mut call = joined(|c| c.follow_foci = true);
    let f1 = json!([{"user_id": "@sfu:x", "device_id": "SFUDEV"}]);
    let f2 = json!([{"user_id": "@sfu2:x", "device_id": "SFU2DEV"}]);
    // b is active on F1: we follow it there (no mesh call to b).
    call.handle_state(
        NOW,
        &member_with_foci("@b:x", "BDEV", "m.foci.active", f1.clone()),
    )
    .unwrap();
    let outs = drain(&mut call);
    let placed = calls_placed(&outs);
    assert_eq!(placed.len(), 1, "{placed:?}");
    assert_eq!(placed[0].0, DeviceKey::new("@sfu:x", "SFUDEV"));
    assert!(placed[0].2, "a focus peer");
    let f1_peer = placed[0].1;
    assert_eq!(own_entry(&outs).expect("republished")["m.foci.active"], f1);
    // c and d are active on F2: most members are there now; we move. The
    // call with F1 ends (focus_switch, not a fallback), F2 is called, and b
    // (still on F1: foci do not cascade yet) is met in the mesh.
    for (user, dev) in [("@c:x", "CDEV"), ("@d:x", "DDEV")] {
        call.handle_state(NOW + 10, &join_ev(user, "join")).unwrap();
        call.handle_state(
            NOW + 10,
            &member_with_foci(user, dev, "m.foci.active", f2.clone()),
        )
        .unwrap();
    }
    let outs = drain(&mut call);
    assert!(
        outs.iter().any(
            |o| matches!(o, Output::Media(MediaRequest::ClosePeer { peer }) if *peer == f1_peer)
        ),
        "the call with F1 ends: {outs:?}"
    );
    let hangup = sent(&outs)
        .into_iter()
        .find(|(t, _)| t.ends_with("call.hangup"))
        .expect("a hangup to F1")
        .1;
    assert_eq!(hangup["reason"], "focus_switch");
    let placed = calls_placed(&outs);
    assert!(
        placed
            .iter()
            .any(|(d, _, f)| *d == DeviceKey::new("@sfu2:x", "SFU2DEV") && *f),
        "F2 is called: {placed:?}"
    );
    assert!(placed_to(&outs, "@b:x"), "b is met in the mesh: {placed:?}");
    // (c came first, when F1 and F2 were even: we stayed and met c in the
    // mesh until we are connected at F2.) d is met at F2.
    assert!(!placed_to(&outs, "@d:x"));
    assert_eq!(own_entry(&outs).expect("republished")["m.foci.active"], f2);
    // Without follow_foci, the configured focus only.
    let mut fixed = joined(|c| c.focus = Some(focus()));
    fixed
        .handle_state(NOW, &member_with_foci("@b:x", "BDEV", "m.foci.active", f2))
        .unwrap();
    let placed = calls_placed(&drain(&mut fixed));
    assert!(
        placed.iter().all(|(d, _, _)| d.user_id != "@sfu2:x"),
        "{placed:?}"
    );
}

#[test]
fn a_focus_we_prefer_and_another_member_prefers_wins_over_the_busier_one() {
    // MSC3898's example: b is at F1 (New York) but would rather use F2
    // (London); we prefer F2 too: we call F2, not F1.
    let f2 = FocusRef {
        user_id: "@sfu2:x".into(),
        device_id: "SFU2DEV".into(),
    };
    let mut call = joined(|c| {
        c.follow_foci = true;
        c.focus = Some(f2.clone());
    });
    let mut b = member_with_foci(
        "@b:x",
        "BDEV",
        "m.foci.active",
        json!([{"user_id": "@sfu:x", "device_id": "SFUDEV"}]),
    );
    b["content"]["m.calls"][0]["m.devices"][0]["m.foci.preferred"] =
        json!([{"user_id": "@sfu2:x", "device_id": "SFU2DEV"}]);
    call.handle_state(NOW, &b).unwrap();
    let outs = drain(&mut call);
    assert!(!placed_to(&outs, "@sfu:x"), "F1 is not called: {outs:?}");
    let foci: Vec<DeviceKey> = call
        .peers()
        .into_iter()
        .map(|(d, _, _)| d)
        .filter(|d| d.user_id.starts_with("@sfu"))
        .collect();
    assert_eq!(foci, vec![DeviceKey::new("@sfu2:x", "SFU2DEV")]);
    // b is at another focus: met in the mesh meanwhile.
    assert!(placed_to(&outs, "@b:x"));
    // Without b's preference, the busier F1 would win.
    let mut call = joined(|c| {
        c.follow_foci = true;
        c.focus = Some(f2.clone());
    });
    call.handle_state(
        NOW,
        &member_with_foci(
            "@b:x",
            "BDEV",
            "m.foci.active",
            json!([{"user_id": "@sfu:x", "device_id": "SFUDEV"}]),
        ),
    )
    .unwrap();
    assert!(placed_to(&drain(&mut call), "@sfu:x"));
}

#[test]
fn signalling_from_a_focus_that_is_not_ours_is_held_like_a_non_member() {
    let mut call = joined(|_| {});
    let m = from_focus(
        "m.call.invite",
        "c1",
        0,
        json!({"offer": {"type": "offer", "sdp": "x"}, "lifetime": 60000}),
        &call,
    );
    assert_eq!(deliver!(call, NOW, m), Ok(Accepted::HeldForMembership));
}

/// Joined with a focus, the focus peer connected; b publishes to the same
/// focus. Returns the call, the focus peer and its call id.
fn connected_to_focus() -> (GroupCall, PeerHandle, String) {
    let mut c = Config::new("@a:x", "ADEV");
    c.focus = Some(focus());
    let mut call = GroupCall::new(c);
    call.handle_state(NOW, &join_ev("@a:x", "join")).unwrap();
    call.handle_state(NOW, &join_ev("@b:x", "join")).unwrap();
    call.handle_state(
        NOW,
        &json!({"type": "org.matrix.msc3401.call", "state_key": CONF, "sender": "@b:x", "origin_server_ts": NOW,
            "content": {"m.intent": "m.prompt", "m.type": "m.video"}}),
    )
    .unwrap();
    call.handle_command(
        NOW,
        Command::Join {
            create: None,
            audio: true,
            video: true,
        },
    )
    .unwrap();
    call.handle_membership_published(NOW);
    call.handle_state(
        NOW,
        &member_with_foci(
            "@b:x",
            "BDEV",
            "m.foci.active",
            json!([{"user_id": "@sfu:x", "device_id": "SFUDEV"}]),
        ),
    )
    .unwrap();
    let (_, peer, _) = calls_placed(&drain(&mut call))[0].clone();
    call.handle_media(
        NOW,
        MediaEvent::OfferCreated {
            peer,
            sdp: "offer".into(),
            gathering_complete: true,
        },
    );
    let invite = sent(&drain(&mut call))[0].1.clone();
    let call_id = invite["call_id"].as_str().unwrap().to_owned();
    let answer = from_focus(
        "m.call.answer",
        &call_id,
        0,
        json!({"answer": {"type": "answer", "sdp": "answer"}, "sdp_stream_metadata": {"x": {"purpose": "m.usermedia"}}}),
        &call,
    );
    assert_eq!(deliver!(call, NOW, answer), Ok(Accepted::Processed));
    call.handle_media(
        NOW,
        MediaEvent::State {
            peer,
            state: MediaState::Connected,
        },
    );
    let outs = drain(&mut call);
    // The focus's answer metadata is not reported as the focus's feeds.
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, Output::Event(CallEvent::FeedAdded { .. })))
    );
    (call, peer, call_id)
}

/// The data-channel messages among outputs, parsed.
fn channel_sent(outs: &[Output]) -> Vec<Value> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Media(MediaRequest::SendChannel { text, .. }) => {
                Some(serde_json::from_str(text).unwrap())
            }
            _ => None,
        })
        .collect()
}

fn channel(call: &mut GroupCall, now: u64, peer: PeerHandle, msg: Value) -> Vec<Output> {
    call.handle_media(
        now,
        MediaEvent::ChannelMessage {
            peer,
            text: msg.to_string(),
        },
    );
    drain(call)
}

#[test]
fn through_the_focus_channel_we_subscribe_to_everyone_else_answer_pings_and_renegotiate() {
    let (mut call, peer, _) = connected_to_focus();
    call.handle_media(NOW + 10, MediaEvent::ChannelOpen { peer });
    assert!(
        channel_sent(&drain(&mut call)).is_empty(),
        "nothing to subscribe to yet"
    );

    // The focus says b publishes s-b (audio + video); our own stream is in
    // its list too and is not subscribed to.
    let meta = json!({"type": "m.call.sdp_stream_metadata_changed", "content": {"sdp_stream_metadata": {
        "s-b": {"purpose": "m.usermedia", "user_id": "@b:x", "device_id": "BDEV",
            "tracks": {"a-b": {}, "v-b": {"width": 640, "height": 360}}},
        "s-a": {"purpose": "m.usermedia", "user_id": "@a:x", "device_id": "ADEV", "tracks": {"a-a": {}}}}}});
    let outs = channel(&mut call, NOW + 20, peer, meta);
    let added: Vec<_> = outs
        .iter()
        .filter_map(|o| match o {
            Output::Event(CallEvent::FeedAdded {
                device, stream_id, ..
            }) => Some((device.clone(), stream_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        added,
        vec![(DeviceKey::new("@b:x", "BDEV"), "s-b".to_owned())]
    );
    let sub = channel_sent(&outs);
    assert_eq!(
        sub,
        vec![json!({"type": "m.call.track_subscription", "content": {
            "subscribe": [
                {"stream_id": "s-b", "track_id": "a-b"},
                {"stream_id": "s-b", "track_id": "v-b", "width": 640, "height": 360}],
            "unsubscribe": []}})]
    );

    // Pings are answered at once.
    let outs = channel(
        &mut call,
        NOW + 30,
        peer,
        json!({"type": "m.call.ping", "content": {}}),
    );
    assert_eq!(
        channel_sent(&outs),
        vec![json!({"type": "m.call.pong", "content": {}})]
    );

    // The focus renegotiates over the channel; our answer goes back there,
    // not as a to-device message.
    let outs = channel(
        &mut call,
        NOW + 40,
        peer,
        json!({"type": "m.call.negotiate", "content": {"description": {"type": "offer", "sdp": "focus-offer"}}}),
    );
    assert!(outs.iter().any(|o| matches!(o,
        Output::Media(MediaRequest::AcceptOffer { sdp, .. }) if sdp == "focus-offer")));
    call.handle_media(
        NOW + 41,
        MediaEvent::AnswerCreated {
            peer,
            sdp: "our-answer".into(),
            gathering_complete: true,
        },
    );
    let outs = drain(&mut call);
    assert!(sent(&outs).iter().all(|(t, _)| !t.ends_with("negotiate")));
    let answer = channel_sent(&outs);
    assert_eq!(answer.len(), 1);
    assert_eq!(answer[0]["type"], "m.call.negotiate");
    assert_eq!(
        answer[0]["content"]["description"],
        json!({"type": "answer", "sdp": "our-answer"})
    );

    // b stops publishing: its feed goes, and so does our subscription.
    let outs = channel(
        &mut call,
        NOW + 50,
        peer,
        json!({"type": "m.call.sdp_stream_metadata_changed", "content": {"sdp_stream_metadata": {}}}),
    );
    assert!(outs.iter().any(|o| matches!(o,
        Output::Event(CallEvent::FeedRemoved { device, stream_id }) if device.user_id == "@b:x" && stream_id == "s-b")));
    let unsub = channel_sent(&outs);
    assert_eq!(
        unsub[0]["content"]["unsubscribe"].as_array().unwrap().len(),
        2
    );

    // Garbage on the channel is ignored; the link stays.
    let outs = channel(&mut call, NOW + 60, peer, json!({"type": 5}));
    assert!(outs.is_empty(), "{outs:?}");
    assert_eq!(call.peers().len(), 1);
}

#[test]
fn a_member_at_another_focus_is_met_through_ours_once_it_forwards_that_members_streams() {
    let (mut call, peer, _) = connected_to_focus();
    call.handle_media(NOW + 10, MediaEvent::ChannelOpen { peer });
    drain(&mut call);
    // c publishes to another focus (another homeserver's): called in the
    // mesh, and our focus is asked to connect to that focus (MSC3898).
    let other = json!([{"user_id": "@sfu2:y", "device_id": "SFU2"}]);
    call.handle_state(NOW + 20, &join_ev("@c:y", "join"))
        .unwrap();
    call.handle_state(
        NOW + 20,
        &member_with_foci("@c:y", "CDEV", "m.foci.active", other.clone()),
    )
    .unwrap();
    let outs = drain(&mut call);
    let (_, mesh_peer, focus_peer) = calls_placed(&outs)
        .into_iter()
        .find(|(d, _, _)| d.user_id == "@c:y")
        .expect("c is called in the mesh");
    assert!(!focus_peer);
    assert_eq!(
        channel_sent(&outs),
        vec![json!({"type": "m.call.connect_to_focus", "content": {"foci": other}})]
    );
    call.handle_media(
        NOW + 21,
        MediaEvent::OfferCreated {
            peer: mesh_peer,
            sdp: "mesh-offer".into(),
            gathering_complete: true,
        },
    );
    assert!(
        sent(&drain(&mut call))
            .iter()
            .any(|(t, _)| t == "m.call.invite")
    );
    // The same foci again: not asked twice.
    call.handle_state(
        NOW + 22,
        &member_with_foci("@c:y", "CDEV", "m.foci.active", other.clone()),
    )
    .unwrap();
    assert!(channel_sent(&drain(&mut call)).is_empty());

    // Our focus now forwards c's stream (the foci are linked): the mesh
    // call with c ends, and c's feed comes through the focus.
    let meta = json!({"type": "m.call.sdp_stream_metadata_changed", "content": {"sdp_stream_metadata": {
        "s-c": {"purpose": "m.usermedia", "user_id": "@c:y", "device_id": "CDEV",
            "tracks": {"a-c": {"kind": "audio"}, "v-c": {"kind": "video"}}}}}});
    let outs = channel(&mut call, NOW + 30, peer, meta);
    assert!(outs.iter().any(|o| matches!(o,
        Output::Event(CallEvent::FeedAdded { device, stream_id, .. })
            if device.user_id == "@c:y" && stream_id == "s-c")));
    let hangups: Vec<Value> = sent(&outs)
        .into_iter()
        .filter(|(t, _)| t == "m.call.hangup")
        .map(|(_, c)| c)
        .collect();
    assert_eq!(hangups.len(), 1, "{outs:?}");
    assert_eq!(hangups[0]["reason"], "focus_back");
    assert!(!call.peers().iter().any(|p| p.0.user_id == "@c:y"));
    // Later mesh plans do not call c while the focus forwards it.
    call.handle_state(NOW + 40, &join_ev("@d:x", "join"))
        .unwrap();
    assert!(!placed_to(&drain(&mut call), "@c:y"));

    // The link goes (c's streams leave the focus's list): c is called in
    // the mesh again once the retry interval allows.
    let outs = channel(
        &mut call,
        NOW + 60_000,
        peer,
        json!({"type": "m.call.sdp_stream_metadata_changed", "content": {"sdp_stream_metadata": {}}}),
    );
    assert!(placed_to(&outs, "@c:y"), "{outs:?}");
}

#[test]
fn a_focus_that_stops_pinging_is_hung_up_on_and_the_mesh_takes_over() {
    let (mut call, peer, _) = connected_to_focus();
    call.handle_media(NOW + 10, MediaEvent::ChannelOpen { peer });
    drain(&mut call);
    channel(
        &mut call,
        NOW + 20_000,
        peer,
        json!({"type": "m.call.ping", "content": {}}),
    );
    // The deadline follows the last ping.
    assert_eq!(call.poll_timeout().map(|t| t <= NOW + 80_000), Some(true));
    call.handle_timeout(NOW + 79_999);
    assert_eq!(call.peers().len(), 1);
    call.handle_timeout(NOW + 80_000);
    let outs = drain(&mut call);
    let hangup = sent(&outs)
        .into_iter()
        .find(|(t, _)| t.ends_with("hangup"))
        .expect("a hangup to the focus");
    assert_eq!(hangup.1["reason"], "focus_ping_timeout");
    assert!(
        placed_to(&outs, "@b:x"),
        "b is called in the mesh: {outs:?}"
    );
}

#[test]
fn a_focus_whose_channel_closes_is_hung_up_on() {
    let (mut call, peer, _) = connected_to_focus();
    call.handle_media(NOW + 10, MediaEvent::ChannelOpen { peer });
    drain(&mut call);
    call.handle_media(NOW + 20, MediaEvent::ChannelClosed { peer });
    let outs = drain(&mut call);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Media(MediaRequest::ClosePeer { .. })))
    );
    assert!(placed_to(&outs, "@b:x"));
}

/// Connected to the focus, its channel open, and the focus saying b
/// publishes `s-b` (audio `a-b`, video `v-b`), which we subscribe to.
fn at_focus_with_b_publishing() -> (GroupCall, PeerHandle) {
    let (mut call, peer, _) = connected_to_focus();
    call.handle_media(NOW + 10, MediaEvent::ChannelOpen { peer });
    drain(&mut call);
    let meta = json!({"type": "m.call.sdp_stream_metadata_changed", "content": {"sdp_stream_metadata": {
        "s-b": {"purpose": "m.usermedia", "user_id": "@b:x", "device_id": "BDEV",
            "tracks": {"a-b": {}, "v-b": {}}}}}});
    channel(&mut call, NOW + 20, peer, meta);
    (call, peer)
}

#[test]
fn a_focus_offer_naming_some_tracks_does_not_unsubscribe_the_others() {
    let (mut call, peer) = at_focus_with_b_publishing();
    // The focus's offer carries the metadata of the tracks it sends so far:
    // b's audio only. Nothing is unsubscribed.
    let offer = json!({"type": "m.call.negotiate", "content": {"description": {"type": "offer", "sdp": "o"},
        "sdp_stream_metadata": {"s-b": {"purpose": "m.usermedia", "user_id": "@b:x", "device_id": "BDEV",
            "tracks": {"a-b": {}}}}}});
    let outs = channel(&mut call, NOW + 30, peer, offer);
    assert!(
        channel_sent(&outs).is_empty(),
        "no subscription change: {outs:?}"
    );
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, Output::Event(CallEvent::FeedRemoved { .. })))
    );
}

#[test]
fn an_unreachable_focus_is_left_at_once_and_when_it_is_back_the_mesh_calls_end() {
    let (mut call, peer, _) = connected_to_focus();
    call.handle_media(NOW + 10, MediaEvent::ChannelOpen { peer });
    drain(&mut call);
    // No packets from the focus: given up at once (no ICE restart), b is
    // called in the mesh.
    call.handle_media(
        NOW + 5_000,
        MediaEvent::State {
            peer,
            state: MediaState::Disconnected,
        },
    );
    let outs = drain(&mut call);
    let hangup = sent(&outs)
        .into_iter()
        .find(|(t, _)| t.ends_with("hangup"))
        .expect("a hangup to the focus");
    assert_eq!(hangup.1["reason"], "focus_unreachable");
    let b = calls_placed(&outs)
        .into_iter()
        .find(|(d, _, _)| d.user_id == "@b:x")
        .expect("b is called in the mesh");
    assert!(!outs.iter().any(|o| matches!(
        o,
        Output::Media(MediaRequest::CreateOffer {
            ice_restart: true,
            ..
        })
    )));

    // The focus is called again after the retry interval and connects: the
    // mesh call with b (which uses the same focus) ends.
    let mut again = None;
    let mut t = NOW + 5_000;
    while again.is_none() && t < NOW + 40_000 {
        t = call.poll_timeout().unwrap().max(t + 1);
        call.handle_timeout(t);
        again = calls_placed(&drain(&mut call))
            .into_iter()
            .find(|(d, _, f)| d.user_id == "@sfu:x" && *f);
    }
    let (_, focus_peer, _) = again.expect("the focus is called again");
    assert!(call.peers().iter().any(|(d, _, _)| d.user_id == "@b:x"));
    call.handle_media(
        t,
        MediaEvent::OfferCreated {
            peer: focus_peer,
            sdp: "offer".into(),
            gathering_complete: true,
        },
    );
    let outs = drain(&mut call);
    let invite = sent(&outs)
        .into_iter()
        .find(|(t, c)| t.ends_with("invite") && c["dest_session_id"] == "SFUDEV")
        .expect("the invite to the focus");
    let call_id = invite.1["call_id"].as_str().unwrap().to_owned();
    let answer = from_focus(
        "m.call.answer",
        &call_id,
        0,
        json!({"answer": {"type": "answer", "sdp": "answer"}}),
        &call,
    );
    assert_eq!(
        deliver!(call, NOW + 65_010, answer),
        Ok(Accepted::Processed)
    );
    drain(&mut call);
    call.handle_media(
        NOW + 65_020,
        MediaEvent::State {
            peer: focus_peer,
            state: MediaState::Connected,
        },
    );
    let outs = drain(&mut call);
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Media(MediaRequest::ClosePeer { peer }) if *peer == b.1)),
        "the mesh call with b ends: {outs:?}"
    );
    let hangups: Vec<_> = sent(&outs)
        .into_iter()
        .filter(|(t, _)| t.ends_with("hangup"))
        .collect();
    assert_eq!(hangups.len(), 1);
    assert_eq!(hangups[0].1["reason"], "focus_back");
}

/// A focus that says it drains (`m.call.focus_draining`, ours): make before
/// break. We go to the mesh while its media goes on (its peer is kept, our
/// entry stops naming it, b is called); once the mesh call with b
/// connects, b's tracks are unsubscribed at the focus and, the mesh
/// reaching everyone, we hang up on the focus ourselves.
#[test]
fn a_draining_focus_is_kept_until_the_mesh_reaches_everyone() {
    let (mut call, peer) = at_focus_with_b_publishing();

    let outs = channel(
        &mut call,
        NOW + 30,
        peer,
        json!({"type": "m.call.focus_draining", "content": {"hangup_in_ms": 10000}}),
    );
    let (_, b, _) = calls_placed(&outs)
        .into_iter()
        .find(|(d, _, _)| d.user_id == "@b:x")
        .expect("b is called in the mesh");
    assert!(
        sent(&outs).iter().all(|(t, _)| !t.ends_with("hangup")),
        "the focus is kept: {outs:?}"
    );
    assert!(channel_sent(&outs).is_empty(), "b still comes through it");
    let dev = own_entry(&outs).expect("our entry is republished");
    assert!(dev.get("m.foci.active").is_none(), "{dev}");
    assert_eq!(call.peers().len(), 2);
    // Told again: nothing new.
    let outs = channel(
        &mut call,
        NOW + 40,
        peer,
        json!({"type": "m.call.focus_draining", "content": {}}),
    );
    assert!(calls_placed(&outs).is_empty() && own_entry(&outs).is_none());

    // The mesh call with b connects.
    call.handle_media(
        NOW + 50,
        MediaEvent::OfferCreated {
            peer: b,
            sdp: "offer".into(),
            gathering_complete: true,
        },
    );
    let invite = sent(&drain(&mut call))
        .into_iter()
        .find(|(t, c)| t.ends_with("invite") && c["dest_session_id"] == "BDEV-S")
        .expect("the invite to b")
        .1;
    let answer = with_dest(
        from_b_session(
            "m.call.answer",
            invite["call_id"].as_str().unwrap(),
            0,
            json!({"answer": {"type": "answer", "sdp": "answer"},
                "sdp_stream_metadata": {"s-b": {"purpose": "m.usermedia"}}}),
            "BDEV-S",
        ),
        &call,
    );
    assert_eq!(deliver!(call, NOW + 60, answer), Ok(Accepted::Processed));
    drain(&mut call);
    call.handle_media(
        NOW + 70,
        MediaEvent::State {
            peer: b,
            state: MediaState::Connected,
        },
    );
    let outs = drain(&mut call);
    // b's tracks no longer through the focus, and the focus is left.
    let unsub = channel_sent(&outs);
    assert_eq!(unsub.len(), 1, "{outs:?}");
    assert_eq!(
        unsub[0]["content"]["unsubscribe"].as_array().map(Vec::len),
        Some(2)
    );
    let hangup = sent(&outs)
        .into_iter()
        .find(|(t, _)| t.ends_with("hangup"))
        .expect("a hangup to the focus");
    assert_eq!(hangup.1["reason"], "focus_draining");
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::Media(MediaRequest::ClosePeer { peer: p }) if *p == peer))
    );
    assert_eq!(
        call.peers(),
        vec![(DeviceKey::new("@b:x", "BDEV"), b, true)]
    );
    // b's feed stays (the mesh carries it).
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, Output::Event(CallEvent::FeedRemoved { .. }))),
        "{outs:?}"
    );
    // The focus is called again, but not before one retry interval after
    // the time it said it stops (it would turn the call down until then,
    // and at that moment it is exiting).
    let mut t = NOW + 70;
    let mut again = None;
    while again.is_none() && t < NOW + 120_000 {
        t = call.poll_timeout().unwrap().max(t + 1);
        call.handle_timeout(t);
        again = calls_placed(&drain(&mut call))
            .into_iter()
            .find(|(_, _, f)| *f)
            .map(|_| t);
    }
    let at = again.expect("the focus is called again later");
    let retry = Config::new("", "").retry_interval_ms;
    assert!(
        at >= NOW + 30 + 10_000 + retry,
        "called again {} ms in",
        at - NOW
    );
}

#[test]
fn we_choose_whose_media_comes_through_the_focus() {
    let (mut call, peer, _) = connected_to_focus();
    call.handle_media(NOW + 10, MediaEvent::ChannelOpen { peer });
    drain(&mut call);
    let meta = json!({"type": "m.call.sdp_stream_metadata_changed", "content": {"sdp_stream_metadata": {
        "s-b": {"purpose": "m.usermedia", "user_id": "@b:x", "device_id": "BDEV", "tracks": {"a-b": {}, "v-b": {}}},
        "s-c": {"purpose": "m.usermedia", "user_id": "@c:x", "device_id": "CDEV", "tracks": {"a-c": {}, "v-c": {}}}}}});
    let outs = channel(&mut call, NOW + 20, peer, meta);
    assert_eq!(
        channel_sent(&outs)[0]["content"]["subscribe"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    // Only b: c's tracks are unsubscribed.
    call.handle_command(
        NOW + 30,
        Command::FocusSubscriptions(Some(vec![DeviceKey::new("@b:x", "BDEV")])),
    )
    .unwrap();
    let sub = channel_sent(&drain(&mut call));
    assert_eq!(
        sub,
        vec![
            json!({"type": "m.call.track_subscription", "content": {"subscribe": [], "unsubscribe": [
            {"stream_id": "s-c", "track_id": "a-c"}, {"stream_id": "s-c", "track_id": "v-c"}]}})
        ]
    );
    // Everyone again.
    call.handle_command(NOW + 40, Command::FocusSubscriptions(None))
        .unwrap();
    let sub = channel_sent(&drain(&mut call));
    assert_eq!(sub[0]["content"]["subscribe"].as_array().unwrap().len(), 2);
    assert_eq!(sub[0]["content"]["unsubscribe"], json!([]));
}

#[test]
fn we_ask_the_focus_for_a_video_size_per_publisher() {
    let (mut call, peer, _) = connected_to_focus();
    call.handle_media(NOW + 10, MediaEvent::ChannelOpen { peer });
    drain(&mut call);
    let meta = json!({"type": "m.call.sdp_stream_metadata_changed", "content": {"sdp_stream_metadata": {
        "s-b": {"purpose": "m.usermedia", "user_id": "@b:x", "device_id": "BDEV",
            "tracks": {"a-b": {"kind": "audio"}, "v-b": {"kind": "video", "width": 1280, "height": 720}}},
        "s-c": {"purpose": "m.usermedia", "user_id": "@c:x", "device_id": "CDEV",
            "tracks": {"a-c": {"kind": "audio"}, "v-c": {"kind": "video", "width": 1280, "height": 720}}},
        "x-c": {"purpose": "m.screenshare", "user_id": "@c:x", "device_id": "CDEV",
            "tracks": {"sv-c": {"kind": "video", "width": 1920, "height": 1080}}}}}});
    let outs = channel(&mut call, NOW + 20, peer, meta);
    // At first, the size the focus advertises.
    let first = &channel_sent(&outs)[0]["content"]["subscribe"];
    assert!(
        first.as_array().unwrap().contains(
            &json!({"stream_id": "s-b", "track_id": "v-b", "width": 1280, "height": 720})
        )
    );
    // b's camera small: only that track is asked for again, at that size.
    call.handle_command(
        NOW + 30,
        Command::FocusVideoSize {
            device: Some(DeviceKey::new("@b:x", "BDEV")),
            size: Some((320, 180)),
        },
    )
    .unwrap();
    assert_eq!(
        channel_sent(&drain(&mut call)),
        vec![json!({"type": "m.call.track_subscription", "content": {
            "subscribe": [{"stream_id": "s-b", "track_id": "v-b", "width": 320, "height": 180}],
            "unsubscribe": []}})]
    );
    // Everyone else's camera at 640x360: c's camera only (not its
    // screenshare, not b who has a size of its own).
    call.handle_command(
        NOW + 40,
        Command::FocusVideoSize {
            device: None,
            size: Some((640, 360)),
        },
    )
    .unwrap();
    assert_eq!(
        channel_sent(&drain(&mut call)),
        vec![json!({"type": "m.call.track_subscription", "content": {
            "subscribe": [{"stream_id": "s-c", "track_id": "v-c", "width": 640, "height": 360}],
            "unsubscribe": []}})]
    );
    // The same again: nothing to send.
    call.handle_command(
        NOW + 50,
        Command::FocusVideoSize {
            device: None,
            size: Some((640, 360)),
        },
    )
    .unwrap();
    assert!(channel_sent(&drain(&mut call)).is_empty());
    // b back to the advertised size.
    call.handle_command(
        NOW + 60,
        Command::FocusVideoSize {
            device: Some(DeviceKey::new("@b:x", "BDEV")),
            size: None,
        },
    )
    .unwrap();
    assert_eq!(
        channel_sent(&drain(&mut call))[0]["content"]["subscribe"],
        json!([{"stream_id": "s-b", "track_id": "v-b", "width": 640, "height": 360}])
    );
    // Nonsense sizes are refused.
    for bad in [(0, 180), (320, 100_000)] {
        assert!(matches!(
            call.handle_command(
                NOW + 70,
                Command::FocusVideoSize {
                    device: None,
                    size: Some(bad),
                },
            ),
            Err(CommandError::InvalidArgument(_))
        ));
    }
}

/// The subscription changes among outputs: (subscribed, unsubscribed)
/// track ids, sorted.
fn subscription_change(outs: &[Output]) -> (Vec<String>, Vec<String>) {
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                let mut ids: Vec<String> = a
                    .iter()
                    .map(|t| t["track_id"].as_str().unwrap().to_owned())
                    .collect();
                ids.sort();
                ids
            })
            .unwrap_or_default()
    };
    let subs: Vec<Value> = channel_sent(outs)
        .into_iter()
        .filter(|m| m["type"] == "m.call.track_subscription")
        .collect();
    assert!(subs.len() <= 1, "{subs:?}");
    subs.first()
        .map(|m| {
            (
                ids(&m["content"]["subscribe"]),
                ids(&m["content"]["unsubscribe"]),
            )
        })
        .unwrap_or_default()
}

fn speaker_events(outs: &[Output]) -> Vec<(Option<DeviceKey>, Option<String>)> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Event(CallEvent::ActiveSpeaker { device, stream_id }) => {
                Some((device.clone(), stream_id.clone()))
            }
            _ => None,
        })
        .collect()
}

/// `m.call.active_speaker` from the focus becomes `CallEvent::ActiveSpeaker`;
/// in recent-speakers mode (N) the camera video we receive follows the N
/// most recent speakers, while everyone's audio and screenshares stay.
#[test]
fn the_focus_names_the_active_speaker_and_recent_speakers_mode_follows_it() {
    let (mut call, peer, _) = connected_to_focus();
    call.handle_media(NOW + 10, MediaEvent::ChannelOpen { peer });
    drain(&mut call);
    call.handle_command(NOW + 11, Command::FocusRecentSpeakers(Some(1)))
        .unwrap();
    assert_eq!(subscription_change(&drain(&mut call)), (vec![], vec![]));
    let meta = json!({"type": "m.call.sdp_stream_metadata_changed", "content": {"sdp_stream_metadata": {
        "s-b": {"purpose": "m.usermedia", "user_id": "@b:x", "device_id": "BDEV",
            "tracks": {"a-b": {"kind": "audio"}, "v-b": {"kind": "video"}, "x-b": {}}},
        "s-c": {"purpose": "m.usermedia", "user_id": "@c:x", "device_id": "CDEV",
            "tracks": {"a-c": {"kind": "audio"}, "v-c": {"kind": "video"}}},
        "sc-c": {"purpose": "m.screenshare", "user_id": "@c:x", "device_id": "CDEV",
            "tracks": {"v-sc": {"kind": "video"}}}}}});
    // Nobody has spoken: audio, the screenshare, and the track of unknown
    // kind; no camera video.
    let outs = channel(&mut call, NOW + 20, peer, meta);
    assert_eq!(
        subscription_change(&outs),
        (
            vec!["a-b".into(), "a-c".into(), "v-sc".into(), "x-b".into()],
            vec![]
        )
    );
    let b = DeviceKey::new("@b:x", "BDEV");
    let c = DeviceKey::new("@c:x", "CDEV");
    let speaker = |who: &DeviceKey, stream: &str| {
        json!({"type": "m.call.active_speaker", "content": {
            "user_id": who.user_id, "device_id": who.device_id, "stream_id": stream}})
    };
    // b speaks: b's camera comes.
    let outs = channel(&mut call, NOW + 30, peer, speaker(&b, "s-b"));
    assert_eq!(
        speaker_events(&outs),
        vec![(Some(b.clone()), Some("s-b".into()))]
    );
    assert_eq!(subscription_change(&outs), (vec!["v-b".into()], vec![]));
    // c speaks: c's camera comes, b's goes (N = 1).
    let outs = channel(&mut call, NOW + 40, peer, speaker(&c, "s-c"));
    assert_eq!(
        speaker_events(&outs),
        vec![(Some(c.clone()), Some("s-c".into()))]
    );
    assert_eq!(
        subscription_change(&outs),
        (vec!["v-c".into()], vec!["v-b".into()])
    );
    // Nobody speaks: reported; what we receive stays.
    let outs = channel(
        &mut call,
        NOW + 50,
        peer,
        json!({"type": "m.call.active_speaker", "content": {}}),
    );
    assert_eq!(speaker_events(&outs), vec![(None, None)]);
    assert_eq!(subscription_change(&outs), (vec![], vec![]));
    // N = 2: the two most recent speakers (c, then b).
    call.handle_command(NOW + 60, Command::FocusRecentSpeakers(Some(2)))
        .unwrap();
    assert_eq!(
        subscription_change(&drain(&mut call)),
        (vec!["v-b".into()], vec![])
    );
    // N = 0: no camera video at all; the screenshare stays.
    call.handle_command(NOW + 70, Command::FocusRecentSpeakers(Some(0)))
        .unwrap();
    assert_eq!(
        subscription_change(&drain(&mut call)),
        (vec![], vec!["v-b".into(), "v-c".into()])
    );
    // Off: everyone's video again.
    call.handle_command(NOW + 80, Command::FocusRecentSpeakers(None))
        .unwrap();
    assert_eq!(
        subscription_change(&drain(&mut call)),
        (vec!["v-b".into(), "v-c".into()], vec![])
    );
    // A speaker message that is not valid is ignored.
    let outs = channel(
        &mut call,
        NOW + 90,
        peer,
        json!({"type": "m.call.active_speaker", "content": {"user_id": "@b:x"}}),
    );
    assert!(outs.is_empty(), "{outs:?}");
}
