//! Command and response APDUs (ISO/IEC 7816-4): what the card OS reads from a reader and
//! what the host reads from a card, both untrusted.
//!
//! Any byte string: no panic. A command that parses re-encodes to exactly its own bytes (the
//! encoding is canonical), and so does a response. Reading the same bytes as the fields of a
//! command (`Command::new` … `with_le`) and encoding it gives bytes that parse back to that
//! command, whenever its data and Le are representable.
#![no_main]

use cardpipe_card::apdu::{Command, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cmd) = Command::parse(data) {
        assert_eq!(
            cmd.to_bytes(),
            data,
            "a parsed command re-encodes to its bytes"
        );
        assert!(cmd.le.is_none_or(|le| (1..=65536).contains(&le)));
        assert!(cmd.data.len() <= 65535);
    }
    if let Ok(resp) = Response::parse(data) {
        assert_eq!(resp.to_bytes(), data);
    }
    // The same bytes as command fields: header, flags, Le, then the data.
    let [cla, ins, p1, p2, flags, le_hi, le_lo, body @ ..] = data else {
        return;
    };
    if body.len() > 65535 {
        return; // Lc is at most 65535
    }
    let mut cmd = Command::new(*cla, *ins, *p1, *p2).with_data(body.to_vec());
    if flags & 1 != 0 {
        // Le 1..=65536 (0 is not a length; the encoding 00 means 256 or 65536).
        cmd = cmd.with_le(usize::from(u16::from_be_bytes([*le_hi, *le_lo])) + 1);
    }
    if flags & 2 != 0 {
        cmd = cmd.extended();
    }
    let bytes = cmd.to_bytes();
    let parsed = Command::parse(&bytes).expect("an encoded command parses");
    let mut expected = cmd.clone();
    // A header-only command has no length fields, so nothing says "extended".
    expected.extended = cmd.needs_extended() && (!cmd.data.is_empty() || cmd.le.is_some());
    assert!(parsed == expected, "{parsed:?} != {expected:?}");
});
