//! MSC3898 data-channel messages: any bytes as one message; what parses
//! must encode (when within the size limit) and re-parse unchanged.
#![no_main]

use groupcall_focus::dc::{DcMessage, MAX_MESSAGE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = DcMessage::parse(data) else { return };
    if let Ok(out) = m.encode() {
        assert!(out.len() <= MAX_MESSAGE_LEN, "encode let an oversize message through");
        let again = DcMessage::parse(out.as_bytes()).expect("our own output parses");
        assert_eq!(again, m, "round trip changed the message");
    }
});
