//! State events: parse, fold into the room state, read member devices.
#![no_main]

use groupcall_proto::events::{CallContent, MemberContent, StateEvent};
use groupcall_proto::room::RoomCallState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let _ = StateEvent::from_json(&v);
    let _ = serde_json::from_value::<CallContent>(v.clone());
    let _ = MemberContent::live_devices(&v, "CONF", 1_700_000_000_000);
    if let Some(c) = v.get("content") {
        let _ = MemberContent::live_devices(c, "CONF", 1_700_000_000_000);
    }
    let mut room = RoomCallState::new();
    let _ = room.apply_json(&v, 1_700_000_000_000);
    let _ = room.tick(u64::MAX);
    let _ = room.next_expiry();
});
