//! PostgreSQL's binary numeric as the server sends it (`decode::numeric`). The property is a
//! second reading of the format, done differently: lay the base-10000 groups out as decimal
//! digits at the place the weight gives them, cut at the display scale, drop leading zeros;
//! the decoder's text must be exactly that, and is refused only when the bytes break the
//! format (length, sign, group over 9999, scale over 14 bits).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_resource_postgresql::fuzzing::numeric;

fn reference(raw: &[u8]) -> Option<String> {
    let field = |i: usize| raw.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (ndigits, weight, sign, dscale) = (
        field(0)? as usize,
        field(2)? as i16 as i64,
        field(4)?,
        field(6)? as usize,
    );
    if raw.len() != 8 + 2 * ndigits || dscale > 0x3fff {
        return None;
    }
    let groups: Vec<u16> = (0..ndigits)
        .map(|k| field(8 + 2 * k))
        .collect::<Option<_>>()?;
    if groups.iter().any(|g| *g > 9999) {
        return None;
    }
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        0 | 0x4000 => {}
        _ => return None,
    }
    // Decimal digit i (0 = the units digit, negative = after the point) of the number.
    let digit = |place: i64| -> u8 {
        // Group k holds places 4*(weight-k) .. 4*(weight-k)+3.
        let k = weight - place.div_euclid(4);
        if k < 0 || k as usize >= groups.len() {
            return 0;
        }
        let g = groups[k as usize] as u32;
        (g / 10u32.pow(place.rem_euclid(4) as u32) % 10) as u8
    };
    let top = 4 * weight + 3;
    let mut whole = String::new();
    let mut place = top.max(0);
    while place >= 0 {
        whole.push((b'0' + digit(place)) as char);
        place -= 1;
    }
    let whole = whole.trim_start_matches('0');
    let mut out = String::new();
    if sign == 0x4000 {
        out.push('-');
    }
    out.push_str(if whole.is_empty() { "0" } else { whole });
    if dscale > 0 {
        out.push('.');
        for i in 1..=dscale as i64 {
            out.push((b'0' + digit(-i)) as char);
        }
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let got = rustomnic_fuzz::asked(|| numeric(data));
    // At most 131072 digits before the point and 16383 after, whatever the bytes say.
    assert!(
        got.0 <= rustomnic_fuzz::budget(data.len()) + (1 << 20),
        "asked for {} bytes",
        got.0
    );
    assert_eq!(got.1.ok(), reference(data), "numeric {data:02x?}");
});
