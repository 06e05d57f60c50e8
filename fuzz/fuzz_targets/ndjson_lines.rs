//! The intake NDJSON line splitter (`intake::Lines`, a tokio-util `Decoder` over the
//! registry's request body, untrusted).
//!
//! Input: byte 0 picks the line limit (0–63 bytes), byte 1 seeds the read sizes, the rest is
//! the body. The body is fed in reads of varying size, as `FramedRead` does (decode until
//! `None` after every read, `decode_eof` until `None` at the end). Properties: no panic; the
//! items are those of a plain split of the whole body on `\n` — a line over the limit is one
//! `TooLong`, any other line comes out whole without its `\n` (and without a `\r` before it;
//! an unterminated last line may keep a trailing `\r`) — whatever the read sizes; and the
//! splitter never holds more than a limit's worth of an unfinished line.
#![no_main]

use bytes::BytesMut;
use cardpipe_intake::intake::{LineItem, Lines};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

/// What the splitter must produce: (line bytes, or None for too long; whether terminated).
fn expected(body: &[u8], max: usize) -> Vec<(Option<&[u8]>, bool)> {
    let mut out = Vec::new();
    let mut parts: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    let last = parts.pop().expect("split yields at least one part");
    for p in parts {
        out.push(((p.len() <= max).then_some(p), true));
    }
    if !last.is_empty() {
        out.push(((last.len() <= max).then_some(last), false));
    }
    out
}

fn run(body: &[u8], max: usize, mut seed: u32) -> Vec<LineItem> {
    let mut lines = Lines::new(max);
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (1 + (seed >> 16) as usize % 97).min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        while let Some(item) = lines.decode(&mut buf).expect("the splitter never fails") {
            items.push(item);
        }
        // An unfinished line is dropped once it is over the limit, never buffered whole.
        if !buf.contains(&b'\n') {
            assert!(
                buf.len() <= max,
                "{} bytes buffered for a limit of {max}",
                buf.len()
            );
        }
    }
    while let Some(item) = lines
        .decode_eof(&mut buf)
        .expect("the splitter never fails")
    {
        items.push(item);
    }
    assert!(buf.is_empty(), "bytes left in the buffer at the end");
    items
}

fuzz_target!(|data: &[u8]| {
    let [m, s, body @ ..] = data else { return };
    let max = usize::from(*m % 64);
    let want = expected(body, max);
    for seed in [u32::from(*s), u32::from(*s) ^ 0xFFFF_FFFF] {
        let got = run(body, max, seed);
        assert_eq!(got.len(), want.len(), "number of items");
        for (item, (line, terminated)) in got.iter().zip(&want) {
            match (item, line) {
                (LineItem::TooLong, None) => {}
                (LineItem::Line(b), Some(l)) => {
                    let stripped = l.strip_suffix(b"\r").unwrap_or(l);
                    if *terminated {
                        assert_eq!(&b[..], stripped);
                    } else {
                        assert!(&b[..] == *l || &b[..] == stripped);
                    }
                }
                _ => panic!("line over the limit or not: splitter and plain split disagree"),
            }
        }
    }
});
