//! SCP03 secure messaging: the card unwrapping (C-MAC, C-DEC) the commands it is sent and
//! the host unwrapping (R-MAC) the card's responses, both over an untrusted reader link.
//!
//! A host and a card session are opened in memory at the level byte 0 picks. The rest is a
//! sequence of length-prefixed (one byte) items, each read as a plain command (4-byte header,
//! a flags byte, Le, data) and a plain response (the status word from the header): the host
//! wraps the command, the wire encoding is parsed, the card unwraps it and must get the
//! command back; the card wraps the response and the host must get it back. A command too
//! long to wrap is refused and the session goes on. The bytes after the last whole item are
//! then fed raw to the card's and the host's unwrap: no panic (a forged MAC cannot be
//! asserted impossible — the fuzzer sees the comparison — so nothing is asserted there).
#![no_main]

use cardpipe_card::apdu::{Command, Response};
use cardpipe_card::cplc::ChipSerial;
use cardpipe_card::scp03::{CardHandshake, HostHandshake, MasterKeys, Scp03Error, SecurityLevel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [level, rest @ ..] = data else { return };
    let mut rest: &[u8] = rest;
    let level = [
        SecurityLevel::C_MAC,
        SecurityLevel::C_DEC_C_MAC,
        SecurityLevel::C_MAC_R_MAC,
        SecurityLevel::C_DEC_C_MAC_R_MAC,
    ][usize::from(level % 4)];
    let serial = ChipSerial::simulated(1, 42);
    let keys = MasterKeys::test_keys().diversify(&serial);
    let host = HostHandshake::new(keys.clone(), [1, 2, 3, 4, 5, 6, 7, 8], level);
    let iu = host.initialize_update();
    let (card_hs, resp) = CardHandshake::initialize_update(&keys, &serial, 0x30, &iu.data, [9; 8]);
    let (mut hs, ext) = host
        .complete(&Response::ok(resp), Some(&serial))
        .expect("handshake");
    let mut cs = card_hs
        .external_authenticate(&Command::parse(&ext.to_bytes()).expect("EXTERNAL AUTHENTICATE"))
        .expect("card accepts the host cryptogram");

    while let &[n, ref tail @ ..] = rest {
        let n = usize::from(n);
        if tail.len() < n {
            break;
        }
        let (item, tail) = tail.split_at(n);
        rest = tail;
        let [cla, ins, p1, p2, flags, le, body @ ..] = item else {
            continue;
        };
        // A plain command: the SM bit clear (the host sets it).
        let mut cmd = Command::new(cla & !0x04, *ins, *p1, *p2).with_data(body.to_vec());
        if flags & 1 != 0 {
            cmd = cmd.with_le(usize::from(*le) + 1);
        }
        if flags & 2 != 0 {
            cmd = cmd.extended();
        }
        let wrapped = match hs.wrap(&cmd) {
            Ok(w) => w,
            Err(Scp03Error::TooLong) => continue,
            Err(e) => panic!("wrap failed: {e}"),
        };
        let wire = Command::parse(&wrapped.to_bytes()).expect("a wrapped command parses");
        let plain = cs
            .unwrap_command(&wire)
            .expect("the card unwraps the host's command");
        let mut expected = cmd.clone();
        expected.extended = wrapped.extended;
        assert!(plain == expected, "{plain:?} != {expected:?}");

        let resp = Response {
            data: body.to_vec(),
            sw: u16::from_be_bytes([*cla, *ins]),
        };
        let wire = Response::parse(&cs.wrap_response(resp.clone()).to_bytes()).expect("response");
        let got = hs
            .unwrap(wire)
            .expect("the host unwraps the card's response");
        assert!(got == resp, "{got:?} != {resp:?}");
    }
    if let Ok(cmd) = Command::parse(rest) {
        let _ = cs.unwrap_command(&cmd);
    }
    if let Ok(resp) = Response::parse(rest) {
        let _ = hs.unwrap(resp);
    }
});
