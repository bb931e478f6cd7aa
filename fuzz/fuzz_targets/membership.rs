//! Our member content built on top of any existing content must contain our
//! device (join) and not contain it (leave).
#![no_main]

use groupcall_proto::events::{Feed, FeedPurpose, MemberContent};
use groupcall_proto::membership::{OwnDevice, joined_content, left_content};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(existing) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let dev = OwnDevice {
        foci_active: Vec::new(),
        foci_preferred: Vec::new(),
        device_id: "ME".into(),
        session_id: "S".into(),
        feeds: vec![Feed::with_purpose(FeedPurpose::Usermedia)],
    };
    let now = 1_000;
    let joined = joined_content(Some(&existing), "CONF", &dev, now + 10, now);
    let (devs, _) = MemberContent::live_devices(&joined, "CONF", now);
    assert!(devs.iter().any(|d| d.device_id == "ME" && d.session_id == "S"));
    let left = left_content(Some(&joined), "ME", now);
    let (devs, _) = MemberContent::live_devices(&left, "CONF", now);
    assert!(devs.iter().all(|d| d.device_id != "ME"));
});
