//! Coalescing to-device sends: messages queued at the same moment go out in
//! as few `sendToDevice` requests as possible (one per event type when
//! nothing forbids it), without reordering what any one recipient gets.

use serde_json::Value;

/// A to-device send: one event type, `(user_id, device_id, content)` per
/// recipient (`device_id` `*`: all the user's devices).
#[derive(Debug, Clone, PartialEq)]
pub struct ToDeviceBatch {
    /// The event type.
    pub event_type: String,
    /// The messages.
    pub messages: Vec<(String, String, Value)>,
}

/// Whether two recipients may be the same device.
fn overlaps(a: &(String, String, Value), b: &(String, String, Value)) -> bool {
    a.0 == b.0 && (a.1 == b.1 || a.1 == "*" || b.1 == "*")
}

/// Merges sends, in the order given, into as few requests as possible, to
/// be sent one after the other in the order returned.
///
/// Each message joins the earliest request of its event type that comes
/// after every request holding an earlier message to the same recipient
/// device, so every recipient gets its messages in the original order,
/// and one request never carries two messages for one device (the
/// `sendToDevice` body has one content per device). Messages to different
/// recipients may move relative to each other.
pub fn merge(sends: Vec<ToDeviceBatch>) -> Vec<ToDeviceBatch> {
    let mut out: Vec<ToDeviceBatch> = Vec::new();
    for send in sends {
        for m in send.messages {
            // After the last request that holds a message to this device.
            let lo = out
                .iter()
                .rposition(|b| b.messages.iter().any(|o| overlaps(o, &m)))
                .map_or(0, |i| i + 1);
            match out[lo..]
                .iter()
                .position(|b| b.event_type == send.event_type)
            {
                Some(i) => out[lo + i].messages.push(m),
                None => out.push(ToDeviceBatch {
                    event_type: send.event_type.clone(),
                    messages: vec![m],
                }),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn send(t: &str, to: &[(&str, &str, u32)]) -> ToDeviceBatch {
        ToDeviceBatch {
            event_type: t.to_owned(),
            messages: to
                .iter()
                .map(|(u, d, n)| ((*u).to_owned(), (*d).to_owned(), json!(n)))
                .collect(),
        }
    }

    /// A device and the (type, content) sequence it gets.
    type Received = (String, String, Vec<(String, Value)>);

    /// Per device, the (type, content) sequence.
    fn per_device(batches: &[ToDeviceBatch]) -> Vec<Received> {
        let mut out: Vec<Received> = Vec::new();
        for b in batches {
            for (u, d, c) in &b.messages {
                match out.iter_mut().find(|(ou, od, _)| ou == u && od == d) {
                    Some(e) => e.2.push((b.event_type.clone(), c.clone())),
                    None => out.push((
                        u.clone(),
                        d.clone(),
                        vec![(b.event_type.clone(), c.clone())],
                    )),
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    #[test]
    fn invites_to_several_peers_become_one_request() {
        let sends = vec![
            send("m.call.invite", &[("@b:x", "B", 1)]),
            send("m.call.invite", &[("@c:x", "C", 2)]),
            send("m.call.answer", &[("@d:x", "D", 3)]),
            send("m.call.invite", &[("@e:x", "E", 4)]),
            send("m.call.answer", &[("@f:x", "F", 5)]),
        ];
        let merged = merge(sends.clone());
        assert_eq!(merged.len(), 2, "{merged:?}");
        assert_eq!(merged[0].event_type, "m.call.invite");
        assert_eq!(merged[0].messages.len(), 3);
        assert_eq!(merged[1].event_type, "m.call.answer");
        assert_eq!(merged[1].messages.len(), 2);
        assert_eq!(per_device(&merged), per_device(&sends));
    }

    #[test]
    fn one_recipient_keeps_its_order() {
        // A hangup then a new invite to B must not become invite, hangup;
        // two invites to one device need two requests.
        let sends = vec![
            send("m.call.invite", &[("@c:x", "C", 1)]),
            send("m.call.hangup", &[("@b:x", "B", 2)]),
            send("m.call.invite", &[("@b:x", "B", 3)]),
            send("m.call.invite", &[("@b:x", "B", 4)]),
            send("m.call.candidates", &[("@b:x", "*", 5)]),
        ];
        let merged = merge(sends.clone());
        assert_eq!(per_device(&merged), per_device(&sends));
        let types: Vec<&str> = merged.iter().map(|b| b.event_type.as_str()).collect();
        assert_eq!(
            types,
            [
                "m.call.invite",
                "m.call.hangup",
                "m.call.invite",
                "m.call.invite",
                "m.call.candidates"
            ]
        );
        // C's invite went into the first request.
        assert_eq!(merged[0].messages.len(), 1);
        // Two devices of one user share a request; `*` waits for both.
        let merged = merge(vec![
            send("m.call.invite", &[("@b:x", "B1", 1)]),
            send("m.call.invite", &[("@b:x", "B2", 2)]),
            send("m.call.hangup", &[("@b:x", "*", 3)]),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].messages.len(), 2);
    }
}
