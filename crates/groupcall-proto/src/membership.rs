//! Our own `m.call.member` content: join, refresh and leave.
//!
//! These functions edit the user's existing member event content as JSON, so
//! that entries of the user's other devices, other calls and keys this crate
//! does not know are kept as they were.

use serde_json::{Map, Value, json};

use crate::events::{
    FOCI_ACTIVE, FOCI_ACTIVE_UNSTABLE, FOCI_PREFERRED, FOCI_PREFERRED_UNSTABLE, Feed, FocusRef,
};

/// Our device's entry.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnDevice {
    /// Our device id.
    pub device_id: String,
    /// Our session id for this join.
    pub session_id: String,
    /// Feeds we are actually sending.
    pub feeds: Vec<Feed>,
    /// The foci we publish to (MSC3898 `m.foci.active`); empty: full mesh.
    pub foci_active: Vec<FocusRef>,
    /// The foci we would rather use (`m.foci.preferred`).
    pub foci_preferred: Vec<FocusRef>,
}

fn device_json(dev: &OwnDevice, expires_ts: u64) -> Value {
    let mut v = json!({
        "device_id": dev.device_id,
        "session_id": dev.session_id,
        "expires_ts": expires_ts,
        "feeds": dev.feeds,
    });
    // Both names while MSC3898 is unstable: readers of either find them.
    let lists = [
        (&dev.foci_active, FOCI_ACTIVE, FOCI_ACTIVE_UNSTABLE),
        (&dev.foci_preferred, FOCI_PREFERRED, FOCI_PREFERRED_UNSTABLE),
    ];
    if let Some(obj) = v.as_object_mut() {
        for (list, stable, unstable) in lists {
            if !list.is_empty() {
                let list = json!(list);
                obj.insert(stable.to_owned(), list.clone());
                obj.insert(unstable.to_owned(), list);
            }
        }
    }
    v
}

/// Removes our device everywhere, and devices whose expiry has passed; drops
/// call entries that this left without devices. Returns the `m.calls` array.
fn prune(calls: &mut Vec<Value>, device_id: &str, now: u64) {
    for call in calls.iter_mut() {
        let Some(devices) = call.get_mut("m.devices").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = devices.len();
        devices.retain(|d| {
            let ours = d.get("device_id").and_then(Value::as_str) == Some(device_id);
            let expired = d
                .get("expires_ts")
                .and_then(Value::as_u64)
                .is_some_and(|t| t <= now);
            !ours && !expired
        });
        if before > 0 && devices.is_empty() {
            // Mark for removal.
            *call = Value::Null;
        }
    }
    calls.retain(|c| !c.is_null());
}

fn base(existing: Option<&Value>) -> (Map<String, Value>, Vec<Value>) {
    let mut obj = existing
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let calls = match obj.remove("m.calls") {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    };
    (obj, calls)
}

/// The content to publish when joining `call_id` or refreshing our entry:
/// our device is (re)written with `expires_ts`; everything else is kept.
pub fn joined_content(
    existing: Option<&Value>,
    call_id: &str,
    dev: &OwnDevice,
    expires_ts: u64,
    now: u64,
) -> Value {
    let (mut obj, mut calls) = base(existing);
    prune(&mut calls, &dev.device_id, now);
    let entry = calls
        .iter_mut()
        .find(|c| c.get("m.call_id").and_then(Value::as_str) == Some(call_id));
    match entry {
        Some(entry) => {
            if let Some(devices) = entry.get_mut("m.devices").and_then(Value::as_array_mut) {
                devices.push(device_json(dev, expires_ts));
            } else if let Some(o) = entry.as_object_mut() {
                o.insert(
                    "m.devices".into(),
                    Value::Array(vec![device_json(dev, expires_ts)]),
                );
            }
        }
        None => {
            calls.push(json!({"m.call_id": call_id, "m.devices": [device_json(dev, expires_ts)]}))
        }
    }
    obj.insert("m.calls".into(), Value::Array(calls));
    Value::Object(obj)
}

/// The content to publish when leaving: our device removed (and expired
/// devices with it); `{"m.calls": []}` when nothing else is left.
pub fn left_content(existing: Option<&Value>, device_id: &str, now: u64) -> Value {
    let (mut obj, mut calls) = base(existing);
    prune(&mut calls, device_id, now);
    obj.insert("m.calls".into(), Value::Array(calls));
    Value::Object(obj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::FeedPurpose;

    fn me() -> OwnDevice {
        OwnDevice {
            foci_active: Vec::new(),
            foci_preferred: Vec::new(),
            device_id: "ME".into(),
            session_id: "S".into(),
            feeds: vec![Feed::with_purpose(FeedPurpose::Usermedia)],
        }
    }

    #[test]
    fn join_keeps_other_devices_and_unknown_keys() {
        let existing = json!({"x.custom": 1, "m.calls": [{"m.call_id": "c", "m.foci": ["f"], "m.devices": [
            {"device_id": "OTHER", "session_id": "o", "expires_ts": 5000, "feeds": []},
            {"device_id": "ME", "session_id": "old", "expires_ts": 5000, "feeds": []},
            {"device_id": "STALE", "session_id": "o", "expires_ts": 10, "feeds": []}]}]});
        let c = joined_content(Some(&existing), "c", &me(), 9000, 100);
        assert_eq!(c["x.custom"], 1);
        assert_eq!(c["m.calls"][0]["m.foci"], json!(["f"]));
        let devs: Vec<_> = c["m.calls"][0]["m.devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["device_id"].clone())
            .collect();
        assert_eq!(devs, vec![json!("OTHER"), json!("ME")]);
        assert_eq!(c["m.calls"][0]["m.devices"][1]["session_id"], "S");
        assert_eq!(c["m.calls"][0]["m.devices"][1]["expires_ts"], 9000);
    }

    #[test]
    fn leave_gives_empty_calls() {
        let c = joined_content(None, "c", &me(), 9000, 100);
        assert_eq!(left_content(Some(&c), "ME", 200), json!({"m.calls": []}));
    }

    #[test]
    fn garbage_existing_content_is_replaced() {
        let c = joined_content(Some(&json!({"m.calls": "nope"})), "c", &me(), 9000, 100);
        assert_eq!(c["m.calls"].as_array().unwrap().len(), 1);
        let c = joined_content(Some(&json!(7)), "c", &me(), 9000, 100);
        assert_eq!(c["m.calls"][0]["m.call_id"], "c");
    }
}
