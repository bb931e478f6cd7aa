//! To-device signalling: parse any content as any type; what parses must
//! round-trip unchanged.
#![no_main]

use groupcall_proto::signalling::{Message, MessageType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let ty = MessageType::ALL[sel as usize % MessageType::ALL.len()];
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) else { return };
    if let Ok(m) = Message::parse(ty.as_str(), &v) {
        let out = m.to_content();
        let again = Message::parse(ty.as_str(), &out).expect("our own output parses");
        assert_eq!(again, m, "round trip changed the message");
    }
});
