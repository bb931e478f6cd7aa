//! The focus's orchestration with hand-fed inputs: admission, answers,
//! subscriptions, renegotiation, revocation, limits, pings, draining.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use groupcall_focus::focus::*;
use groupcall_focus::heartbeat::HeartbeatConfig;
use groupcall_proto::signalling::MessageType;
use groupcall_proto::{DeviceKey, IncomingToDevice};
use serde_json::{Value, json};

const NOW: u64 = 1_700_000_000_000;
const ROOM: &str = "!room:x";
const CONF: &str = "CONF";

fn state(ty: &str, key: &str, sender: &str, content: Value) -> Value {
    json!({"type": ty, "state_key": key, "sender": sender, "origin_server_ts": NOW, "content": content})
}

fn member(user: &str, device: &str, session: &str) -> Value {
    state(
        "org.matrix.msc3401.call.member",
        user,
        user,
        json!({"m.calls": [{"m.call_id": CONF, "m.devices": [
            {"device_id": device, "session_id": session, "expires_ts": NOW + 3_600_000, "feeds": []}]}]}),
    )
}

fn joined(user: &str) -> Value {
    state("m.room.member", user, user, json!({"membership": "join"}))
}

/// A focus serving ROOM, whose call CONF has a and b as members.
fn focus(cfg: impl FnOnce(&mut FocusConfig)) -> Focus {
    let mut c = FocusConfig::new("FOCUS", "FSESS");
    c.heartbeat = HeartbeatConfig {
        interval_ms: 1000,
        timeout_ms: 3000,
    };
    cfg(&mut c);
    let mut f = Focus::new(c);
    f.handle_state(
        NOW,
        ROOM,
        &state(
            "org.matrix.msc3401.call",
            CONF,
            "@a:x",
            json!({"m.intent": "m.room", "m.type": "m.video"}),
        ),
    )
    .unwrap();
    for (u, d) in [("@a:x", "A"), ("@b:x", "B")] {
        f.handle_state(NOW, ROOM, &joined(u)).unwrap();
        f.handle_state(NOW, ROOM, &member(u, d, &format!("{d}-S")))
            .unwrap();
    }
    drain(&mut f);
    f
}

fn drain(f: &mut Focus) -> Vec<FocusOutput> {
    std::iter::from_fn(|| f.poll_output()).collect()
}

fn invite(
    user: &str,
    device: &str,
    session: &str,
    call_id: &str,
    encrypted: bool,
) -> IncomingToDevice {
    IncomingToDevice {
        sender: user.into(),
        sender_device: encrypted.then(|| device.to_owned()),
        event_type: "m.call.invite".into(),
        content: json!({"version": "1", "call_id": call_id, "party_id": device, "conf_id": CONF,
            "device_id": device, "sender_session_id": session, "dest_session_id": "FOCUS", "seq": 0,
            "lifetime": 60000, "offer": {"type": "offer", "sdp": format!("offer-{device}")},
            "sdp_stream_metadata": {format!("s-{device}"): {"purpose": "m.usermedia"}}}),
        encrypted,
    }
}

fn client_of(outs: &[FocusOutput]) -> Option<ClientId> {
    outs.iter().find_map(|o| match o {
        FocusOutput::ClientJoined { client, .. } => Some(*client),
        _ => None,
    })
}

fn to_device(outs: &[FocusOutput]) -> Vec<(MessageType, String, Value)> {
    outs.iter()
        .filter_map(|o| match o {
            FocusOutput::ToDevice {
                event_type,
                message,
            } => Some((
                *event_type,
                message.device_id.clone(),
                message.content.clone(),
            )),
            _ => None,
        })
        .collect()
}

fn channel(outs: &[FocusOutput], to: ClientId) -> Vec<Value> {
    outs.iter()
        .filter_map(|o| match o {
            FocusOutput::Media {
                client,
                op: MediaOp::SendChannel { text },
            } if *client == to => Some(serde_json::from_str(text).unwrap()),
            _ => None,
        })
        .collect()
}

fn forwards(outs: &[FocusOutput]) -> Vec<ForwardChange> {
    outs.iter()
        .filter_map(|o| match o {
            FocusOutput::Forward(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn track(stream: &str, id: &str, kind: TrackKind) -> PublishedTrack {
    PublishedTrack {
        stream_id: stream.into(),
        track_id: id.into(),
        kind,
    }
}

/// Admits `device` of `user`, answers, opens its channel and reports its
/// two tracks (stream `s-<device>`). Returns its client id.
fn connect(f: &mut Focus, user: &str, device: &str) -> ClientId {
    f.handle_to_device(
        NOW,
        &invite(
            user,
            device,
            &format!("{device}-S"),
            &format!("c-{device}"),
            true,
        ),
    );
    let outs = drain(f);
    let id = client_of(&outs).expect("admitted");
    assert!(outs.contains(&FocusOutput::Media {
        client: id,
        op: MediaOp::Accept {
            sdp: format!("offer-{device}"),
            tracks: Vec::new(),
        }
    }));
    f.handle_media(
        NOW,
        id,
        MediaIn::Answer {
            sdp: "answer".into(),
        },
    );
    let outs = drain(f);
    let sent = to_device(&outs);
    assert_eq!(sent.len(), 1);
    let (ty, to, c) = &sent[0];
    assert_eq!((*ty, to.as_str()), (MessageType::Answer, device));
    assert_eq!(c["sender_session_id"], "FSESS");
    assert_eq!(c["dest_session_id"], format!("{device}-S"));
    assert_eq!(c["call_id"], format!("c-{device}"));
    f.handle_media(NOW, id, MediaIn::ChannelOpen);
    f.handle_media(
        NOW,
        id,
        MediaIn::RemoteTracks {
            tracks: vec![
                track(
                    &format!("s-{device}"),
                    &format!("a-{device}"),
                    TrackKind::Audio,
                ),
                track(
                    &format!("s-{device}"),
                    &format!("v-{device}"),
                    TrackKind::Video,
                ),
            ],
        },
    );
    id
}

#[test]
fn members_are_admitted_see_each_other_and_subscriptions_are_negotiated_over_the_channel() {
    let mut f = focus(|_| {});
    let a = connect(&mut f, "@a:x", "A");
    drain(&mut f);
    let b = connect(&mut f, "@b:x", "B");
    let outs = drain(&mut f);
    // Both are told what the call publishes, with the publishers.
    let to_b = channel(&outs, b);
    let meta = &to_b.last().unwrap()["content"]["sdp_stream_metadata"];
    assert_eq!(meta["s-A"]["user_id"], "@a:x");
    assert_eq!(meta["s-A"]["device_id"], "A");
    assert_eq!(
        meta["s-A"]["tracks"],
        json!({"a-A": {"kind": "audio"}, "v-A": {"kind": "video"}})
    );
    assert_eq!(meta["s-B"]["user_id"], "@b:x");
    assert!(!channel(&outs, a).is_empty(), "a hears of b's tracks");

    // b subscribes to a's tracks: forwarding starts and b gets an offer.
    let sub = json!({"type": "m.call.track_subscription", "content": {"subscribe": [
        {"stream_id": "s-A", "track_id": "a-A"}, {"stream_id": "s-A", "track_id": "v-A", "width": 320, "height": 180},
        {"stream_id": "s-Z", "track_id": "nope"}, {"stream_id": "s-B", "track_id": "a-B"}]}});
    f.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: sub.to_string(),
        },
    );
    let outs = drain(&mut f);
    assert_eq!(
        forwards(&outs),
        vec![
            ForwardChange::Subscribe {
                subscriber: b,
                publisher: a,
                track: track("s-A", "a-A", TrackKind::Audio),
                width: None,
                height: None
            },
            ForwardChange::Subscribe {
                subscriber: b,
                publisher: a,
                track: track("s-A", "v-A", TrackKind::Video),
                width: Some(320),
                height: Some(180)
            },
        ],
        "unknown tracks and its own are not subscribed"
    );
    let offer = outs.iter().find_map(|o| match o {
        FocusOutput::Media {
            client,
            op: MediaOp::Offer { tracks },
        } if *client == b => Some(tracks.clone()),
        _ => None,
    });
    assert_eq!(offer.map(|t| t.len()), Some(2));
    f.handle_media(
        NOW,
        b,
        MediaIn::Offer {
            sdp: "focus-offer".into(),
        },
    );
    let outs = drain(&mut f);
    let neg = &channel(&outs, b)[0];
    assert_eq!(neg["type"], "m.call.negotiate");
    assert_eq!(
        neg["content"]["description"],
        json!({"type": "offer", "sdp": "focus-offer"})
    );
    assert_eq!(
        neg["content"]["sdp_stream_metadata"]["s-A"]["user_id"],
        "@a:x"
    );
    let answer = json!({"type": "m.call.negotiate", "content": {"description": {"type": "answer", "sdp": "b-answer"}}});
    f.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: answer.to_string(),
        },
    );
    let outs = drain(&mut f);
    assert!(outs.contains(&FocusOutput::Media {
        client: b,
        op: MediaOp::ApplyAnswer {
            sdp: "b-answer".into()
        }
    }));

    // Unsubscribing stops the forwarding and renegotiates.
    let unsub = json!({"type": "m.call.track_subscription", "content": {"stop": [{"stream_id": "s-A", "track_id": "v-A"}]}});
    f.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: unsub.to_string(),
        },
    );
    let outs = drain(&mut f);
    assert_eq!(
        forwards(&outs),
        vec![ForwardChange::Unsubscribe {
            subscriber: b,
            publisher: a,
            track: track("s-A", "v-A", TrackKind::Video)
        }]
    );
    assert!(outs.iter().any(|o| matches!(o, FocusOutput::Media { client, op: MediaOp::Offer { tracks } } if *client == b && tracks.len() == 1)));
}

#[test]
fn a_member_who_leaves_stops_at_once_and_the_others_are_renegotiated() {
    let mut f = focus(|_| {});
    let a = connect(&mut f, "@a:x", "A");
    let b = connect(&mut f, "@b:x", "B");
    drain(&mut f);
    let sub = json!({"type": "m.call.track_subscription", "content": {"subscribe": [{"stream_id": "s-A", "track_id": "a-A"}]}});
    f.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: sub.to_string(),
        },
    );
    f.handle_media(NOW, b, MediaIn::Offer { sdp: "o".into() });
    let answer = json!({"type": "m.call.negotiate", "content": {"description": {"type": "answer", "sdp": "x"}}});
    f.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: answer.to_string(),
        },
    );
    drain(&mut f);

    // a's member entry goes: revoked.
    f.handle_state(
        NOW + 100,
        ROOM,
        &state(
            "org.matrix.msc3401.call.member",
            "@a:x",
            "@a:x",
            json!({"m.calls": []}),
        ),
    )
    .unwrap();
    let outs = drain(&mut f);
    assert!(forwards(&outs).contains(&ForwardChange::RemoveClient { client: a }));
    let hangup = to_device(&outs);
    assert_eq!(hangup[0].0, MessageType::Hangup);
    assert_eq!(hangup[0].2["reason"], "left");
    assert!(outs.contains(&FocusOutput::Media {
        client: a,
        op: MediaOp::Close
    }));
    assert!(outs.iter().any(|o| matches!(o, FocusOutput::Media { client, op: MediaOp::Offer { tracks } } if *client == b && tracks.is_empty())));
    let meta = channel(&outs, b);
    assert!(
        meta.iter()
            .any(|m| m["type"] == "m.call.sdp_stream_metadata_changed"
                && m["content"]["sdp_stream_metadata"].get("s-A").is_none())
    );
    assert_eq!(f.client_count(), 1);
}

#[test]
fn strangers_are_held_then_turned_down_and_late_members_admitted() {
    let mut f = focus(|_| {});
    // c is in the room but not in the call: held, then refused when the
    // hold ends.
    f.handle_state(NOW, ROOM, &joined("@c:x")).unwrap();
    f.handle_to_device(NOW, &invite("@c:x", "C", "C-S", "c-C", true));
    assert!(client_of(&drain(&mut f)).is_none());
    assert_eq!(f.poll_timeout(), Some(NOW + 10_000));
    f.handle_timeout(NOW + 10_000);
    let outs = drain(&mut f);
    assert!(outs.contains(&FocusOutput::Refused {
        device: DeviceKey::new("@c:x", "C"),
        reason: "not_member".into()
    }));
    let sent = to_device(&outs);
    assert_eq!(
        (sent[0].0, sent[0].2["reason"].as_str()),
        (MessageType::Reject, Some("not_member"))
    );

    // d's invite comes before its member event: admitted when it arrives.
    f.handle_to_device(NOW, &invite("@d:x", "D", "D-S", "c-D", true));
    assert!(client_of(&drain(&mut f)).is_none());
    f.handle_state(NOW + 50, ROOM, &joined("@d:x")).unwrap();
    f.handle_state(NOW + 50, ROOM, &member("@d:x", "D", "D-S"))
        .unwrap();
    assert!(client_of(&drain(&mut f)).is_some());

    // A stale session is refused after the hold too; plaintext at once.
    f.handle_to_device(NOW, &invite("@a:x", "A", "OLD", "c-A", true));
    f.handle_timeout(NOW + 10_000);
    let outs = drain(&mut f);
    assert!(
        outs.iter()
            .any(|o| matches!(o, FocusOutput::Refused { reason, .. } if reason == "stale_session"))
    );
    f.handle_to_device(NOW, &invite("@b:x", "B", "B-S", "c-B", false));
    let outs = drain(&mut f);
    assert_eq!(
        outs,
        vec![FocusOutput::Refused {
            device: DeviceKey::new("@b:x", "B"),
            reason: "plaintext".into()
        }]
    );
}

#[test]
fn a_full_call_turns_the_next_invite_down() {
    let mut f = focus(|c| c.max_participants_per_call = 1);
    connect(&mut f, "@a:x", "A");
    drain(&mut f);
    f.handle_to_device(NOW, &invite("@b:x", "B", "B-S", "c-B", true));
    let outs = drain(&mut f);
    assert!(client_of(&outs).is_none());
    assert!(outs.contains(&FocusOutput::Refused {
        device: DeviceKey::new("@b:x", "B"),
        reason: "focus_full".into()
    }));
    assert_eq!(to_device(&outs)[0].2["reason"], "focus_full");
}

#[test]
fn pings_go_out_and_a_client_that_stops_answering_is_dropped() {
    let mut f = focus(|_| {});
    let a = connect(&mut f, "@a:x", "A");
    drain(&mut f);
    assert_eq!(f.poll_timeout(), Some(NOW + 1000));
    f.handle_timeout(NOW + 1000);
    let outs = drain(&mut f);
    assert_eq!(
        channel(&outs, a),
        vec![json!({"type": "m.call.ping", "content": {}})]
    );
    f.handle_media(
        NOW + 1010,
        a,
        MediaIn::ChannelMessage {
            text: json!({"type": "m.call.pong"}).to_string(),
        },
    );
    // Pings cannot be sent any more: it still times out, from the last pong.
    for t in [2000, 3000, 4000] {
        f.handle_timeout(NOW + t);
        f.handle_media(NOW + t, a, MediaIn::ChannelSendFailed);
    }
    assert_eq!(f.client_count(), 1);
    f.handle_timeout(NOW + 4010);
    let outs = drain(&mut f);
    assert!(
        outs.iter().any(
            |o| matches!(o, FocusOutput::ClientLeft { reason, .. } if reason == "ping_timeout")
        )
    );
    assert_eq!(f.client_count(), 0);
}

#[test]
fn a_clients_offer_that_crosses_ours_wins_and_ours_is_made_again() {
    let mut f = focus(|_| {});
    let _a = connect(&mut f, "@a:x", "A");
    let b = connect(&mut f, "@b:x", "B");
    drain(&mut f);
    let sub = json!({"type": "m.call.track_subscription", "content": {"subscribe": [{"stream_id": "s-A", "track_id": "a-A"}]}});
    f.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: sub.to_string(),
        },
    );
    drain(&mut f);
    // Our offer is in flight; b offers too (e.g. it starts a screenshare).
    let theirs = json!({"type": "m.call.negotiate", "content": {"description": {"type": "offer", "sdp": "b-offer"},
        "sdp_stream_metadata": {"s-B": {"purpose": "m.usermedia", "audio_muted": true}}}});
    f.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: theirs.to_string(),
        },
    );
    let outs = drain(&mut f);
    // Our answer sends what b agreed to before (nothing yet), not what our
    // yielded offer had.
    assert!(outs.contains(&FocusOutput::Media {
        client: b,
        op: MediaOp::Accept {
            sdp: "b-offer".into(),
            tracks: Vec::new(),
        }
    }));
    f.handle_media(
        NOW,
        b,
        MediaIn::Answer {
            sdp: "our-answer".into(),
        },
    );
    let outs = drain(&mut f);
    let ans = &channel(&outs, b)[0];
    assert_eq!(
        ans["content"]["description"],
        json!({"type": "answer", "sdp": "our-answer"})
    );
    assert!(
        to_device(&outs).is_empty(),
        "renegotiation stays on the channel"
    );
    assert!(outs.iter().any(|o| matches!(o, FocusOutput::Media { client, op: MediaOp::Offer { .. } } if *client == b)), "ours again");
    assert_eq!(f.offers_yielded(), 1);
}

#[test]
fn draining_turns_new_invites_down_and_hangs_up_at_the_end() {
    let mut f = focus(|_| {});
    connect(&mut f, "@a:x", "A");
    drain(&mut f);
    f.start_draining();
    f.handle_to_device(NOW, &invite("@b:x", "B", "B-S", "c-B", true));
    let outs = drain(&mut f);
    assert!(
        outs.iter().any(
            |o| matches!(o, FocusOutput::Refused { reason, .. } if reason == "focus_shutdown")
        )
    );
    f.hang_up_all(NOW + 5);
    let outs = drain(&mut f);
    let sent = to_device(&outs);
    assert_eq!(
        (sent[0].0, sent[0].2["reason"].as_str()),
        (MessageType::Hangup, Some("focus_shutdown"))
    );
    assert_eq!(f.client_count(), 0);
}

/// The forwarder's active speaker goes to every client of the call as
/// `m.call.active_speaker` (once per change), to a client whose channel
/// opens later, and "nobody" when the speaker leaves; speakers of another
/// call or unknown clients are ignored.
#[test]
fn the_active_speaker_is_sent_to_the_calls_clients() {
    let mut f = focus(|_| {});
    let a = connect(&mut f, "@a:x", "A");
    let b = connect(&mut f, "@b:x", "B");
    drain(&mut f);
    let speaker_msgs = |outs: &[FocusOutput], to: ClientId| -> Vec<Value> {
        channel(outs, to)
            .into_iter()
            .filter(|m| m["type"] == "m.call.active_speaker")
            .collect()
    };
    f.handle_active_speaker(ROOM, CONF, Some(b));
    let outs = drain(&mut f);
    let want = json!({"type": "m.call.active_speaker",
        "content": {"user_id": "@b:x", "device_id": "B", "stream_id": "s-B"}});
    assert_eq!(speaker_msgs(&outs, a), vec![want.clone()]);
    assert_eq!(speaker_msgs(&outs, b), vec![want.clone()]);
    assert_eq!(f.active_speaker(ROOM, CONF), Some(b));
    // The same speaker again, another call, a stranger: nothing.
    f.handle_active_speaker(ROOM, CONF, Some(b));
    f.handle_active_speaker(ROOM, "OTHER", Some(a));
    f.handle_active_speaker(ROOM, CONF, Some(ClientId(999)));
    assert!(drain(&mut f).is_empty());
    assert_eq!(f.active_speaker(ROOM, CONF), Some(b));

    // A client that arrives later is told who speaks when its channel opens.
    f.handle_state(NOW, ROOM, &joined("@c:x")).unwrap();
    f.handle_state(NOW, ROOM, &member("@c:x", "C", "C-S"))
        .unwrap();
    drain(&mut f);
    let c = connect(&mut f, "@c:x", "C");
    let outs = drain(&mut f);
    assert_eq!(speaker_msgs(&outs, c), vec![want]);

    // The speaker leaves; the forwarder says nobody speaks: the others hear
    // of it.
    f.handle_media(NOW, b, MediaIn::ChannelClosed);
    drain(&mut f);
    f.handle_active_speaker(ROOM, CONF, None);
    let outs = drain(&mut f);
    let nobody = json!({"type": "m.call.active_speaker", "content": {}});
    assert_eq!(speaker_msgs(&outs, a), vec![nobody.clone()]);
    assert_eq!(speaker_msgs(&outs, c), vec![nobody]);
    assert!(speaker_msgs(&outs, b).is_empty());
    assert_eq!(f.active_speaker(ROOM, CONF), None);
    f.handle_active_speaker(ROOM, CONF, Some(a));
    let outs = drain(&mut f);
    assert_eq!(speaker_msgs(&outs, c)[0]["content"]["user_id"], "@a:x");
}
