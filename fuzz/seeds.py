#!/usr/bin/env python3
"""Writes the seed corpus fuzz/corpus/<target>/ (small valid and invalid inputs per target).

Deterministic: run it again after changing a format and commit the result. Inputs follow
each target's framing (see the doc comment of fuzz/fuzz_targets/<target>.rs). The ISO/IEC
19794-2 templates are the FVC2002 ones already in libs/card/testdata (BSD-2-Clause, see its
README); everything else is built here. Usage: python3 fuzz/seeds.py
"""
import base64
import json
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
TEMPLATES = [
    open(os.path.join(ROOT, "libs", "card", "testdata", n), "rb").read()
    for n in ("101_1.iso", "101_2.iso", "102_1.iso")
]


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- ISO/IEC 19794-2
def minutiae(n, w=300, h=400, size=6):
    out = b""
    for i in range(n):
        kind = 1 + i % 2
        x, y = (10 + i * 13) % w, (20 + i * 17) % h
        out += struct.pack(">HHB", (kind << 14) | x, y, (i * 11) % 256)
        if size == 6:
            out += bytes([50])
    return out


def iso2005(views, w=300, h=400, ext=b""):
    body = b""
    for pos, view, n in views:
        body += bytes([pos, view << 4, 60, n]) + minutiae(n, w, h)
        body += struct.pack(">H", len(ext)) + ext
    head = b"FMR\0 20\0" + struct.pack(">IHHHHHBB", 24 + len(body), 0, w, h, 197, 197, len(views), 0)
    return head + body


def rep2011(pos, number, n, w=300, h=400, quality=True):
    rep = bytes([0x07, 0xE6, 1, 1, 0, 0, 0, 0xFF, 0xFF, 0, 0, 0, 0, 0])
    rep += (bytes([1, 60, 0, 0, 0, 0]) if quality else bytes([0]))
    rep += bytes([pos, number]) + struct.pack(">HHBHH", 197, 197, 0, w, h)
    rep += bytes([0x60, n]) + minutiae(n, w, h) + b"\0\0"
    return struct.pack(">I", 4 + len(rep)) + rep


def iso2011(reps):
    body = b"".join(reps)
    return b"FMR\x00030\x00" + struct.pack(">IHB", 15 + len(body), len(reps), 0) + body


def iso_seeds():
    seeds = {f"fvc_{i}": t for i, t in enumerate(TEMPLATES)}
    seeds["fvc_truncated"] = TEMPLATES[0][:-3]
    seeds["v2005_two_views_ext"] = iso2005([(2, 0, 12), (7, 1, 5)], ext=b"\x00\x02\x00\x06\x01\x02")
    seeds["v2005_zero_minutiae"] = iso2005([(0, 0, 0)])
    seeds["v2011_one"] = iso2011([rep2011(3, 0, 10)])
    seeds["v2011_multi_finger_code"] = iso2011([rep2011(13, 0, 4), rep2011(1, 1, 4, w=500, h=500)])
    # The old false crash: more than 255 representations (2011 counts them in 16 bits).
    seeds["v2011_256_reps"] = iso2011([rep2011(0, 0, 1, quality=False) for _ in range(256)])
    seeds["garbage"] = b"FMR\0 20\0\0\0\0\x18" + b"\xff" * 14
    for name, data in seeds.items():
        write("iso19794_2_parse", name, data)
    return seeds


# ---------------------------------------------------------------- JPEG
def jpeg(w=240, h=320, entropy=1200, comps=3):
    def seg(marker, payload):
        return bytes([0xFF, marker]) + struct.pack(">H", 2 + len(payload)) + payload

    out = b"\xff\xd8"
    out += seg(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0")
    out += seg(0xDB, b"\0" + bytes(range(1, 65)))
    sof = bytes([8]) + struct.pack(">HHB", h, w, comps)
    for c in range(comps):
        sof += bytes([c + 1, 0x11, 0])
    out += seg(0xC0, sof)
    out += seg(0xC4, b"\0" + bytes([0, 1] + [0] * 14) + b"\0")
    sos = bytes([comps]) + b"".join(bytes([c + 1, 0]) for c in range(comps)) + b"\0\x3f\0"
    out += seg(0xDA, sos)
    # Entropy-coded data: stuffed FF 00 and a restart marker, no other markers.
    data = bytes((i * 37 + 11) % 255 for i in range(entropy))
    out += data[: entropy // 2] + b"\xff\x00" + b"\xff\xd0" + data[entropy // 2:]
    return out + b"\xff\xd9"


def jpeg_seeds():
    seeds = {
        "colour_240x320": jpeg(),
        "grey_small": jpeg(16, 16, 40, comps=1),
        "no_eoi": jpeg()[:-2],
        "no_sof": jpeg().replace(b"\xff\xc0", b"\xff\xe1", 1),
        "fill_bytes": jpeg().replace(b"\xff\xdb", b"\xff\xff\xff\xdb", 1),
        "not_jpeg": b"\x89PNG\r\n\x1a\n",
    }
    for name, data in seeds.items():
        write("jpeg_check", name, data)
    return seeds


# ---------------------------------------------------------------- NDJSON and records
def check_digit(d):
    s = sum(d[i] * (10 - i) for i in range(9)) % 11
    return s if s < 2 else 11 - s


def national_code(n):
    d = [int(c) for c in f"{n:09d}"]
    return "".join(map(str, d)) + str(check_digit(d))


def record(i, photo, templates):
    return {
        "application_id": f"REG-fuzz-{i:08}",
        "applied_on": "2025-11-20",
        "tracking_code": f"0001{i:010}",
        "payment_tracking_code": f"PAY{i:012}",
        "national_code": national_code(123456780 + i),
        "first_name": "زهرا",
        "last_name": "احمدی",
        "father_name": "علی",
        "birth_date": "1990-05-17",
        "birth_certificate_number": "12345",
        "gender": "female",
        "postal_code": "1234567890",
        "address": "تهران، خیابان آزادی، پلاک ۱۲",
        "mobile": "09121234567",
        "landline": "02188776655",
        "applicant_group": "first_card",
        "residence": "domestic",
        "pickup_office": "THR-001",
        "fees": {"issuance_rial": 200000, "office_fee_rial": 50000, "delivery_fee_rial": 20000},
        "photo": base64.b64encode(photo).decode(),
        "fingerprints": [
            {"position": p, "template": base64.b64encode(templates[(p - 1) % len(templates)]).decode()}
            if p != 4 else {"position": p, "missing": "amputated"}
            for p in range(1, 11)
        ],
        "priority": "normal",
    }


def line(v):
    return json.dumps(v, ensure_ascii=False, separators=(",", ":")).encode()


def intake_seeds(photo):
    good = record(1, photo, TEMPLATES)
    by_key = dict(good, photo={"object_key": "registry/photos/1.jpg"})
    bad = dict(good, national_code="1111111111", birth_date="2030-01-01", fees={"issuance_rial": -1})
    abroad = dict(good, residence="abroad")
    seeds = {
        "valid": line(good),
        "valid_object_keys": line(by_key),
        "invalid_fields": line(bad),
        "abroad": line(abroad),
        "not_an_object": b"[1,2,3]",
        "broken_json": b'{"application_id": "broken',
    }
    for name, data in seeds.items():
        write("intake_record", name, data)
    # NDJSON splitter: [limit byte][read-size seed][body]
    small = line(dict(good, photo="", fingerprints=[]))
    bodies = {
        "two_lines_crlf": (63, small[:40] + b"\r\n" + b'{"a":1}\r\n'),
        "long_line_then_short": (8, b"x" * 30 + b"\n" + b"short\n" + b"tail"),
        "empty_lines": (4, b"\n\n\r\n\n"),
        "unterminated_cr": (16, b"abc\ndef\r"),
        "limit_zero": (0, b"\n\na\n"),
    }
    for name, (limit, body) in bodies.items():
        write("ndjson_lines", name, bytes([limit, 7]) + body)


# ---------------------------------------------------------------- TLV and LDS
def tlv(tag, value):
    t = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    n = len(value)
    if n < 0x80:
        ln = bytes([n])
    elif n <= 0xFF:
        ln = bytes([0x81, n])
    else:
        ln = bytes([0x82]) + struct.pack(">H", n)
    return t + ln + value


def ef_com():
    return tlv(0x60, tlv(0x5F01, b"0108") + tlv(0x5F36, b"040000") + tlv(0x5C, bytes([0x61, 0x75, 0x63, 0x6B])))


def dg1():
    return tlv(0x61, tlv(0x5F10, b"0499370899") + tlv(0x5F40, "زهرا".encode()) + tlv(0x5F41, "احمدی".encode())
               + tlv(0x5F43, "علی".encode()) + tlv(0x5F2B, b"19900517") + tlv(0x5F44, b"12345") + tlv(0x5F35, b"F"))


def bio_header(bio_type, subtype, fmt):
    h = tlv(0x80, b"\x01\x01") + tlv(0x81, bytes([bio_type]))
    if subtype is not None:
        h += tlv(0x82, bytes([subtype]))
    return tlv(0xA1, h + tlv(0x87, b"\x01\x01") + tlv(0x88, struct.pack(">H", fmt)))


def dg2(photo):
    rec = b"FAC\x00010\x00" + struct.pack(">IH", 14 + 32 + len(photo), 1) + struct.pack(">I", 32 + len(photo))
    rec += bytes(18) + bytes([1, 0]) + struct.pack(">HH", 240, 320) + bytes([1, 2, 0, 0, 0, 0]) + photo
    return tlv(0x75, tlv(0x7F61, tlv(0x02, b"\x01") + tlv(0x7F60, bio_header(0x02, None, 8) + tlv(0x5F2E, rec))))


def dg3(templates):
    subtypes = {1: 0x05, 2: 0x09, 6: 0x06}
    inner = tlv(0x02, bytes([len(templates)]))
    for (pos, t) in templates:
        inner += tlv(0x7F60, bio_header(0x08, subtypes[pos], 1) + tlv(0x5F2E, t))
    return tlv(0x63, tlv(0x7F61, inner))


def dg11():
    return tlv(0x6B, tlv(0x5C, b"\x5f\x42\x5f\x50") + tlv(0x5F42, "تهران".encode()) + tlv(0x5F50, b"1234567890"))


def lds_seeds(small_photo):
    fp = [(1, TEMPLATES[1]), (6, TEMPLATES[0][:60])]
    groups = [ef_com(), dg1(), dg2(small_photo), dg3(fp)]
    whole = b"".join(struct.pack(">H", len(g)) + g for g in groups) + dg11()
    seeds = {
        "tlv_nested": b"\x00" + tlv(0x7F61, tlv(0x5F2E, b"x" * 130) + tlv(0x02, b"\x01")),
        "tlv_three_byte_tag": b"\x00" + tlv(0x5F8101, b"abc"),
        "tlv_bad_length": b"\x00\x04\x85\x00\x00\x00\x00\x01",
        "ef_com": b"\x01" + ef_com(),
        "dg1": b"\x02" + dg1(),
        "dg2": b"\x03" + dg2(small_photo),
        "dg3": b"\x04" + dg3(fp),
        "dg11": b"\x05" + dg11(),
        "whole_lds": b"\x06" + whole,
        "dg1_bad_date": b"\x02" + dg1().replace(b"19900517", b"19901317"),
    }
    for name, data in seeds.items():
        write("tlv_lds", name, data)


# ---------------------------------------------------------------- APDUs and the card OS
def apdu_seeds():
    seeds = {
        "select_aid": bytes.fromhex("00A4040C07A0000002471001"),
        "read_binary_le0": bytes.fromhex("00B0000000"),
        "case4s": bytes.fromhex("0088000108" + "11" * 8 + "00"),
        "case2e": bytes.fromhex("00B00000000000"),
        "case4e": bytes.fromhex("00D60000000003AABBCC0100"),
        "bad_lc": bytes.fromhex("00D6000005AABB"),
        "response": bytes.fromhex("6A82"),
    }
    for name, data in seeds.items():
        write("apdu", name, data)


def seq(apdus):
    out = b""
    for a in apdus:
        out += (bytes([255]) + struct.pack(">H", len(a)) if len(a) >= 255 else bytes([len(a)])) + a
    return out


def card_os_seeds():
    lds_aid = bytes.fromhex("A0000002471001")
    select_lds = bytes.fromhex("00A4040C07") + lds_aid
    read = [select_lds, bytes.fromhex("00A4020C02011E"), bytes.fromhex("00B0000000"), bytes.fromhex("00B0000400")]
    pins = [bytes.fromhex("0020008100"), bytes.fromhex("00200081083132333435363738"), bytes.fromhex("002C0181083132333435363738")]
    perso = [select_lds, bytes.fromhex("00A4020C020101"), bytes.fromhex("00D6000005") + b"hello",
             bytes.fromhex("10D6000003") + b"abc", bytes.fromhex("00D6000303") + b"def", bytes.fromhex("80F0800F")]
    seeds = {
        "blank_read": bytes([0]) + seq(read),
        "blank_get_data": bytes([0]) + seq([bytes.fromhex("80CA9F7F00"), bytes.fromhex("8050300008") + bytes(8) + b"\0"]),
        "session_perso_cmac": bytes([1]) + seq(perso),
        "session_perso_full": bytes([1 + 3 * 3]) + seq(perso + [bytes.fromhex("80DA000104") + b"\1\2\3\4"]),
        "locked_read_and_pins": bytes([2]) + seq(read + pins),
        "locked_write_attempts": bytes([2]) + seq(perso + [bytes.fromhex("00D7000004540100005300")]),
        "malformed": bytes([0]) + seq([b"\x00", bytes.fromhex("00D6000005AABB")]),
    }
    for name, data in seeds.items():
        write("card_os", name, data)


def scp03_seeds():
    def item(cla, ins, p1, p2, flags, le, body):
        b = bytes([cla, ins, p1, p2, flags, le]) + body
        return bytes([len(b)]) + b

    seeds = {
        "cmac_update_binary": bytes([0]) + item(0x80, 0xD6, 0, 0, 0, 0, b"A" * 20) + item(0x90, 0x00, 0, 0, 1, 255, b""),
        "cdec_put_data": bytes([1]) + item(0x80, 0xDA, 0, 1, 0, 0, b"K" * 32) + item(0x80, 0xCA, 0x9F, 0x7F, 3, 0, b""),
        "rmac_error_sw": bytes([2]) + item(0x6A, 0x82, 0, 0, 1, 0, b"x"),
        "full_long": bytes([3]) + item(0x80, 0xD6, 0, 0, 2, 0, b"Z" * 240) + bytes.fromhex("84D6000010") + bytes(16),
    }
    for name, data in seeds.items():
        write("scp03_unwrap", name, data)


# ---------------------------------------------------------------- wrapped keys and sealed objects
def wrapped_blob(key_id, card_ref, key_ref, nonce, ct):
    return b"CPWK\x01" + bytes([len(key_id)]) + key_id + struct.pack(">H", len(card_ref)) + card_ref + bytes([key_ref]) + nonce + ct


def wrapped_key_seeds():
    blob = wrapped_blob(b"fuzz-tk", b"APP-0001", 1, bytes(range(12)), bytes(48))
    wk = {"key_id": "fuzz-tk", "card_ref": "APP-0001", "key_ref": 1,
          "nonce": bytes(range(12)).hex(), "ciphertext": base64.b64encode(bytes(48)).decode()}
    seeds = {
        "blob": b"\x00" + blob,
        "blob_truncated": b"\x00" + blob[:20],
        "blob_long_ref": b"\x00" + wrapped_blob(b"k", b"R" * 300, 2, bytes(12), bytes(10)),
        "json": b"\x01" + json.dumps(wk).encode(),
        "json_bad_hex": b"\x01" + json.dumps(dict(wk, nonce="zz")).encode(),
        "round_trip": b"\x02\x01\x00\x10" + bytes(range(32)) + b"APP-0001",
        "round_trip_empty_ref": b"\x02\x00\x01\x00" + bytes(32),
    }
    for name, data in seeds.items():
        write("wrapped_key", name, data)


def sealed_object_seeds(photo):
    rec = record(2, photo, TEMPLATES)
    fps = [{"position": 1, "template": base64.b64encode(TEMPLATES[0]).decode(), "missing_reason": None},
           {"position": 2, "template": None, "missing_reason": "amputated"}]
    fake = b"CPE1\x02k1" + bytes(12) + bytes(48) + bytes(12) + bytes(20)
    seeds = {
        "open_fake_blob": b"\x00" + fake,
        "open_unknown_key": b"\x00" + fake.replace(b"k1", b"k9"),
        "open_short": b"\x00CPE1\x02k1",
        "decode_fingerprints": b"\x01" + json.dumps(fps).encode(),
        "decode_record_like": b"\x01" + line({k: v for k, v in rec.items() if k not in ("photo", "fingerprints")}),
        "round_trip": b"\x02" + bytes([11, 0, 7]) + b"photo:APP-1" + b"\xff\xd8" + b"pixels" * 10,
        "round_trip_empty": b"\x02\x00\x00\x00",
    }
    for name, data in seeds.items():
        write("sealed_object", name, data)


def main():
    shutil.rmtree(CORPUS, ignore_errors=True)
    iso_seeds()
    photo = jpeg()
    jpeg_seeds()
    intake_seeds(photo)
    lds_seeds(jpeg(16, 16, 40, comps=1))
    apdu_seeds()
    card_os_seeds()
    scp03_seeds()
    wrapped_key_seeds()
    sealed_object_seeds(photo)


if __name__ == "__main__":
    main()
