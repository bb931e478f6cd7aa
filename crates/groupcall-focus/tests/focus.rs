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

/// A focus serving ROOM, whose current call is CONF.
fn with_call(c: FocusConfig) -> Focus {
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
    f
}

/// A focus serving ROOM, whose call CONF has a and b as members.
fn focus(cfg: impl FnOnce(&mut FocusConfig)) -> Focus {
    let mut c = FocusConfig::new("FOCUS", "FSESS");
    c.heartbeat = HeartbeatConfig {
        interval_ms: 1000,
        timeout_ms: 3000,
    };
    cfg(&mut c);
    let mut f = with_call(c);
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

/// A client that closes its connection (DTLS close) ended the call: it is
/// dropped without a hangup of ours (its own is on its way, and ours would
/// cross it); a connection that fails gets one.
#[test]
fn a_client_that_closes_its_connection_is_dropped_without_a_hangup() {
    let mut f = focus(|_| {});
    let a = connect(&mut f, "@a:x", "A");
    let b = connect(&mut f, "@b:x", "B");
    drain(&mut f);
    f.handle_media(NOW + 10, a, MediaIn::Closed);
    let outs = drain(&mut f);
    assert!(forwards(&outs).contains(&ForwardChange::RemoveClient { client: a }));
    assert!(to_device(&outs).is_empty(), "{outs:?}");
    assert!(outs.iter().any(
        |o| matches!(o, FocusOutput::ClientLeft { reason, .. } if reason == "closed_by_client")
    ));
    f.handle_media(
        NOW + 20,
        b,
        MediaIn::Failed {
            reason: "ice_failed".into(),
        },
    );
    let hangup = to_device(&drain(&mut f));
    assert_eq!(hangup.len(), 1);
    assert_eq!(hangup[0].0, MessageType::Hangup);
    assert_eq!(hangup[0].2["reason"], "ice_failed");
    assert_eq!(f.client_count(), 0);
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
    let a = connect(&mut f, "@a:x", "A");
    drain(&mut f);
    f.start_draining(Some(10_000));
    // The client in the call is told at once, with the time left.
    let outs = drain(&mut f);
    assert_eq!(
        channel(&outs, a),
        vec![json!({"type": "m.call.focus_draining", "content": {"hangup_in_ms": 10000}})]
    );
    // Only once.
    f.start_draining(Some(10_000));
    assert!(drain(&mut f).is_empty());
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

// ----------------------------------------------------------------------
// Cascading: two foci, each with its own client, linked by hand-carried
// messages.

fn member_at(user: &str, device: &str, focus: (&str, &str)) -> Value {
    state(
        "org.matrix.msc3401.call.member",
        user,
        user,
        json!({"m.calls": [{"m.call_id": CONF, "m.devices": [
            {"device_id": device, "session_id": format!("{device}-S"), "expires_ts": NOW + 3_600_000,
             "feeds": [], "m.foci.active": [{"user_id": focus.0, "device_id": focus.1}]}]}]}),
    )
}

/// Focus `user`/`device` (cascading on) in ROOM, whose call CONF has
/// @a:x/A at @fa:x/FA and @b:y/B at @fb:y/FB.
fn cascade_focus(user: &str, device: &str) -> Focus {
    cascade_focus_with(user, device, true)
}

fn cascade_focus_with(user: &str, device: &str, cascade: bool) -> Focus {
    let mut c = FocusConfig::new(device, "FSESS");
    c.user_id = user.into();
    c.cascade = cascade;
    let mut f = with_call(c);
    for u in ["@a:x", "@b:y", "@fa:x", "@fb:y"] {
        f.handle_state(NOW, ROOM, &joined(u)).unwrap();
    }
    f.handle_state(NOW, ROOM, &member_at("@a:x", "A", ("@fa:x", "FA")))
        .unwrap();
    f.handle_state(NOW, ROOM, &member_at("@b:y", "B", ("@fb:y", "FB")))
        .unwrap();
    f
}

fn link_of(outs: &[FocusOutput]) -> Option<(ClientId, bool)> {
    outs.iter().find_map(|o| match o {
        FocusOutput::LinkStarted {
            client, outgoing, ..
        } => Some((*client, *outgoing)),
        _ => None,
    })
}

fn carried(sender: (&str, &str), ty: MessageType, content: Value) -> IncomingToDevice {
    IncomingToDevice {
        sender: sender.0.into(),
        sender_device: Some(sender.1.into()),
        event_type: ty.as_str().into(),
        content,
        encrypted: true,
    }
}

/// Carries every channel message `from` sent on `link` to `to`'s `peer`.
fn carry_channel(outs: &[FocusOutput], link: ClientId, to: &mut Focus, peer: ClientId) -> usize {
    let msgs = channel(outs, link);
    for m in &msgs {
        to.handle_media(
            NOW,
            peer,
            MediaIn::ChannelMessage {
                text: m.to_string(),
            },
        );
    }
    msgs.len()
}

/// fa with client a and fb with client b, linked (fa placed the link) and
/// each told the other's streams: (fa, fb, a, b, fa's link, fb's link).
fn linked_foci() -> (Focus, Focus, ClientId, ClientId, ClientId, ClientId) {
    let mut fa = cascade_focus("@fa:x", "FA");
    let mut fb = cascade_focus("@fb:y", "FB");
    // No client yet: no link.
    assert!(link_of(&drain(&mut fa)).is_none());
    assert!(link_of(&drain(&mut fb)).is_none());

    // a joins fa; fa sorts first, so it places the link.
    fa.handle_to_device(NOW, &invite("@a:x", "A", "A-S", "c-A", true));
    let outs = drain(&mut fa);
    let a = client_of(&outs).unwrap();
    let (la, outgoing) = link_of(&outs).expect("fa places a link");
    assert!(outgoing);
    assert!(outs.contains(&FocusOutput::Media {
        client: la,
        op: MediaOp::Offer { tracks: vec![] }
    }));
    fa.handle_media(NOW, a, MediaIn::Answer { sdp: "ans".into() });
    fa.handle_media(NOW, a, MediaIn::ChannelOpen);
    fa.handle_media(
        NOW,
        a,
        MediaIn::RemoteTracks {
            tracks: vec![
                track("s-A", "a-A", TrackKind::Audio),
                track("s-A", "v-A", TrackKind::Video),
            ],
        },
    );
    drain(&mut fa);
    // The link's first offer goes to fb as an Olm invite.
    fa.handle_media(
        NOW,
        la,
        MediaIn::Offer {
            sdp: "link-offer".into(),
        },
    );
    let sent = to_device(&drain(&mut fa));
    assert_eq!(sent.len(), 1);
    let (ty, to, inv) = &sent[0];
    assert_eq!((*ty, to.as_str()), (MessageType::Invite, "FB"));
    assert_eq!(inv["conf_id"], CONF);
    assert_eq!(inv["offer"]["sdp"], "link-offer");

    // b joins fb; fb does not place a link (fa does).
    let b = connect(&mut fb, "@b:y", "B");
    assert!(link_of(&drain(&mut fb)).is_none());
    // fb admits fa's invite: a live member (a) names fa.
    fb.handle_to_device(NOW, &carried(("@fa:x", "FA"), *ty, inv.clone()));
    let outs = drain(&mut fb);
    let (lb, outgoing) = link_of(&outs).expect("fb admits the link");
    assert!(!outgoing);
    assert!(client_of(&outs).is_none(), "a link is not a client");
    assert_eq!(fb.client_count(), 1);
    assert_eq!(fb.links(), vec![(lb, DeviceKey::new("@fa:x", "FA"), false)]);
    fb.handle_media(
        NOW,
        lb,
        MediaIn::Answer {
            sdp: "link-answer".into(),
        },
    );
    let sent = to_device(&drain(&mut fb));
    let (ty, _, ans) = &sent[0];
    assert_eq!(*ty, MessageType::Answer);
    fa.handle_to_device(NOW, &carried(("@fb:y", "FB"), *ty, ans.clone()));
    assert!(drain(&mut fa).contains(&FocusOutput::Media {
        client: la,
        op: MediaOp::ApplyAnswer {
            sdp: "link-answer".into()
        }
    }));

    // The channel opens on both sides; each focus tells the other what its
    // own clients publish.
    fa.handle_media(NOW, la, MediaIn::ChannelOpen);
    fb.handle_media(NOW, lb, MediaIn::ChannelOpen);
    let outs_a = drain(&mut fa);
    let outs_b = drain(&mut fb);
    let meta_a = channel(&outs_a, la);
    assert!(meta_a[0]["content"]["sdp_stream_metadata"]["s-A"].is_object());
    assert!(carry_channel(&outs_a, la, &mut fb, lb) > 0);
    assert!(carry_channel(&outs_b, lb, &mut fa, la) > 0);
    // b's metadata now names a's stream, published by @a:x/A.
    let outs_b = drain(&mut fb);
    let meta_b = channel(&outs_b, b);
    let s_a = &meta_b.last().unwrap()["content"]["sdp_stream_metadata"]["s-A"];
    assert_eq!(s_a["user_id"], "@a:x");
    assert_eq!(s_a["device_id"], "A");
    assert_eq!(s_a["tracks"]["v-A"]["kind"], "video");
    drain(&mut fa);
    (fa, fb, a, b, la, lb)
}

#[test]
fn two_foci_link_and_carry_each_asked_stream_once_from_its_origin_only() {
    let (mut fa, mut fb, a, b, la, lb) = linked_foci();

    // b subscribes to a's video: fb asks fa over the link, and forwards
    // nothing yet (it has not arrived).
    let sub = json!({"type": "m.call.track_subscription", "content": {
        "subscribe": [{"stream_id": "s-A", "track_id": "v-A", "width": 640, "height": 360}]}});
    fb.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: sub.to_string(),
        },
    );
    let outs_b = drain(&mut fb);
    assert!(forwards(&outs_b).is_empty());
    let asked = channel(&outs_b, lb);
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0]["content"]["subscribe"][0]["track_id"], "v-A");
    carry_channel(&outs_b, lb, &mut fa, la);
    let outs_a = drain(&mut fa);
    assert_eq!(
        forwards(&outs_a),
        vec![ForwardChange::Subscribe {
            subscriber: la,
            publisher: a,
            track: track("s-A", "v-A", TrackKind::Video),
            width: Some(640),
            height: Some(360),
        }]
    );
    // fa offers the track over the link; fb, the polite side, accepts it.
    assert!(outs_a.iter().any(|o| matches!(o, FocusOutput::Media { client, op: MediaOp::Offer { tracks } } if *client == la && tracks.len() == 1)));
    fa.handle_media(
        NOW,
        la,
        MediaIn::Offer {
            sdp: "reoffer".into(),
        },
    );
    let outs_a = drain(&mut fa);
    carry_channel(&outs_a, la, &mut fb, lb);
    let outs_b = drain(&mut fb);
    assert!(outs_b.iter().any(
        |o| matches!(o, FocusOutput::Media { client, op: MediaOp::Accept { .. } } if *client == lb)
    ));
    fb.handle_media(
        NOW,
        lb,
        MediaIn::Answer {
            sdp: "re-answer".into(),
        },
    );
    fb.handle_media(
        NOW,
        lb,
        MediaIn::RemoteTracks {
            tracks: vec![track("s-A", "v-A", TrackKind::Video)],
        },
    );
    let outs_b = drain(&mut fb);
    // Arrived: forwarded to b, and offered to b.
    assert!(forwards(&outs_b).contains(&ForwardChange::Subscribe {
        subscriber: b,
        publisher: lb,
        track: track("s-A", "v-A", TrackKind::Video),
        width: Some(640),
        height: Some(360),
    }));
    assert!(outs_b.iter().any(|o| matches!(o, FocusOutput::Media { client, op: MediaOp::Offer { tracks } } if *client == b && tracks.len() == 1)));

    // Origin only: fa asking fb for a's own stream (which fb got from fa)
    // is refused; fb forwards nothing to the link.
    let back = json!({"type": "m.call.track_subscription", "content": {
        "subscribe": [{"stream_id": "s-A", "track_id": "v-A"}]}});
    fb.handle_media(
        NOW,
        lb,
        MediaIn::ChannelMessage {
            text: back.to_string(),
        },
    );
    assert!(forwards(&drain(&mut fb)).is_empty());
    // Nor does fb describe a's stream to fa.
    assert!(
        channel(&outs_b, lb)
            .iter()
            .all(|m| m["content"]["sdp_stream_metadata"].get("s-A").is_none())
    );

    // b unsubscribes: fb stops forwarding and tells fa, which stops too.
    let unsub = json!({"type": "m.call.track_subscription", "content": {
        "unsubscribe": [{"stream_id": "s-A", "track_id": "v-A"}]}});
    fb.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: unsub.to_string(),
        },
    );
    let outs_b = drain(&mut fb);
    assert!(forwards(&outs_b).contains(&ForwardChange::Unsubscribe {
        subscriber: b,
        publisher: lb,
        track: track("s-A", "v-A", TrackKind::Video),
    }));
    assert_eq!(channel(&outs_b, lb).len(), 1);
    carry_channel(&outs_b, lb, &mut fa, la);
    assert!(
        forwards(&drain(&mut fa)).contains(&ForwardChange::Unsubscribe {
            subscriber: la,
            publisher: a,
            track: track("s-A", "v-A", TrackKind::Video),
        })
    );

    // a leaves fa: no client of fa is left in the call, so its link ends.
    fa.handle_to_device(
        NOW,
        &carried(
            ("@a:x", "A"),
            MessageType::Hangup,
            json!({"version": "1", "call_id": "c-A", "party_id": "A", "conf_id": CONF,
                "device_id": "A", "sender_session_id": "A-S", "dest_session_id": "FSESS", "seq": 1}),
        ),
    );
    let outs_a = drain(&mut fa);
    assert!(outs_a.contains(&FocusOutput::ClientLeft {
        client: la,
        device: DeviceKey::new("@fb:y", "FB"),
        reason: LINK_UNNEEDED.into(),
    }));
    assert!(fa.links().is_empty());
}

#[test]
fn a_focus_nobody_names_is_refused_and_one_with_cascading_off_refuses_foci() {
    let link_invite = |from: &str| {
        json!({"version": "1", "call_id": format!("l-{from}"), "party_id": from, "conf_id": CONF,
            "device_id": from, "sender_session_id": format!("{from}-S"), "dest_session_id": "FB",
            "seq": 0, "lifetime": 30000, "offer": {"type": "offer", "sdp": "x"}})
    };
    let refused = |outs: &[FocusOutput], who: &str, why: &str| {
        outs.iter().any(|o| {
            matches!(o, FocusOutput::Refused { device, reason }
                if device.device_id == who && reason == why)
        })
    };
    let mut fb = cascade_focus("@fb:y", "FB");
    // A focus no participant names (and not in the room) is a stranger:
    // held first (the homeserver may lag), then turned down.
    fb.handle_to_device(
        NOW,
        &carried(("@fc:z", "FC"), MessageType::Invite, link_invite("FC")),
    );
    assert!(link_of(&drain(&mut fb)).is_none());
    fb.handle_timeout(NOW + 20_000);
    assert!(refused(&drain(&mut fb), "FC", "not_in_room"));
    // fa, named by a, is admitted.
    fb.handle_to_device(
        NOW + 20_000,
        &carried(("@fa:x", "FA"), MessageType::Invite, link_invite("FA")),
    );
    assert!(link_of(&drain(&mut fb)).is_some());

    // With cascading off, fa is turned down (no link, no media).
    let mut off = cascade_focus_with("@fb:y", "FB", false);
    drain(&mut off);
    off.handle_to_device(
        NOW,
        &carried(("@fa:x", "FA"), MessageType::Invite, link_invite("FA")),
    );
    let outs = drain(&mut off);
    assert!(link_of(&outs).is_none());
    assert!(refused(&outs, "FA", "cascade_off"));
}

#[test]
fn a_stream_from_another_focus_is_shown_once_its_publisher_is_a_participant_at_that_focus() {
    let (_fa, mut fb, _a, b, _la, lb) = linked_foci();
    drain(&mut fb);
    // fa names a stream of z, whose member event fb has not seen yet.
    let meta = json!({"type": "m.call.sdp_stream_metadata_changed", "content": {"sdp_stream_metadata": {
        "s-A": {"purpose": "m.usermedia", "user_id": "@a:x", "device_id": "A",
            "tracks": {"a-A": {"kind": "audio"}, "v-A": {"kind": "video"}}},
        "s-Z": {"purpose": "m.usermedia", "user_id": "@z:x", "device_id": "Z",
            "tracks": {"a-Z": {"kind": "audio"}}}}}});
    fb.handle_media(
        NOW,
        lb,
        MediaIn::ChannelMessage {
            text: meta.to_string(),
        },
    );
    let shown = |outs: &[FocusOutput]| {
        channel(outs, b)
            .last()
            .map(|m| m["content"]["sdp_stream_metadata"].get("s-Z").is_some())
    };
    // Not shown (and so not subscribable) while z is no participant.
    assert_ne!(shown(&drain(&mut fb)), Some(true));
    let sub = json!({"type": "m.call.track_subscription", "content": {
        "subscribe": [{"stream_id": "s-Z", "track_id": "a-Z"}]}});
    fb.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: sub.to_string(),
        },
    );
    assert!(channel(&drain(&mut fb), lb).is_empty(), "not asked of fa");
    // z's member event arrives, but z publishes to another focus: fa
    // cannot pass a stream off as z's.
    fb.handle_state(NOW, ROOM, &joined("@z:x")).unwrap();
    fb.handle_state(NOW, ROOM, &member_at("@z:x", "Z", ("@fc:z", "FC")))
        .unwrap();
    assert_ne!(shown(&drain(&mut fb)), Some(true));
    // z publishes to fa: b is told.
    fb.handle_state(NOW, ROOM, &member_at("@z:x", "Z", ("@fa:x", "FA")))
        .unwrap();
    assert_eq!(shown(&drain(&mut fb)), Some(true));
}

#[test]
fn a_link_negotiation_naming_some_tracks_keeps_the_others() {
    let (_fa, mut fb, _a, b, _la, lb) = linked_foci();
    drain(&mut fb);
    // fa offers a's video only; its negotiation metadata names that track.
    let offer = json!({"type": "m.call.negotiate", "content": {
        "description": {"type": "offer", "sdp": "v-only"},
        "sdp_stream_metadata": {"s-A": {"purpose": "m.usermedia", "user_id": "@a:x", "device_id": "A",
            "tracks": {"v-A": {"kind": "video"}}}}}});
    fb.handle_media(
        NOW,
        lb,
        MediaIn::ChannelMessage {
            text: offer.to_string(),
        },
    );
    let outs = drain(&mut fb);
    // b is not told that a's audio went: no metadata without it.
    for m in channel(&outs, b) {
        if let Some(s) = m["content"]["sdp_stream_metadata"].get("s-A") {
            assert!(s["tracks"].get("a-A").is_some(), "{m}");
        }
    }
    // And a subscription to a's audio is still asked of fa.
    let sub = json!({"type": "m.call.track_subscription", "content": {
        "subscribe": [{"stream_id": "s-A", "track_id": "a-A"}]}});
    fb.handle_media(
        NOW,
        b,
        MediaIn::ChannelMessage {
            text: sub.to_string(),
        },
    );
    let asked = channel(&drain(&mut fb), lb);
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0]["content"]["subscribe"][0]["track_id"], "a-A");
}
