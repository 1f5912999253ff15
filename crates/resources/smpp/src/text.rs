//! Text in short messages: the data_coding values read and written (GSM 03.38 default alphabet
//! unpacked, one septet an octet as SMPP carries it; IA5/ASCII; Latin-1; UCS-2 read as UTF-16BE),
//! the choice of a coding for a text, and the split of a long message into concatenated parts
//! with a user data header (decision 137).

/// The GSM 03.38 default alphabet, by septet.
const GSM: [char; 128] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å', //
    'Δ', '_', 'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', '\u{1b}', 'Æ', 'æ', 'ß', 'É', //
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/', //
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?', //
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O', //
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§', //
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', //
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à', //
];

/// The extension table: septets after the escape 0x1B.
const GSM_EXT: [(u8, char); 10] =
    [(0x0A, '\u{c}'), (0x14, '^'), (0x28, '{'), (0x29, '}'), (0x2F, '\\'), (0x3C, '['), (0x3D, '~'), (0x3E, ']'), (0x40, '|'), (0x65, '€')];

const ESCAPE: u8 = 0x1B;

/// A coding a message is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// GSM 03.38, data_coding 0 (the SMSC's default alphabet).
    Gsm,
    /// data_coding 3.
    Latin1,
    /// data_coding 8, UTF-16BE (surrogate pairs kept whole).
    Ucs2,
    /// 8-bit data, data_coding 4.
    Binary,
}

impl Coding {
    pub fn data_coding(self) -> u8 {
        match self {
            Coding::Gsm => 0,
            Coding::Latin1 => 3,
            Coding::Ucs2 => 8,
            Coding::Binary => 4,
        }
    }

    /// Reads a config or call value: auto (None), gsm, latin1, ucs2, binary.
    pub fn parse(s: &str) -> Result<Option<Coding>, String> {
        match s {
            "auto" => Ok(None),
            "gsm" => Ok(Some(Coding::Gsm)),
            "latin1" => Ok(Some(Coding::Latin1)),
            "ucs2" => Ok(Some(Coding::Ucs2)),
            "binary" => Ok(Some(Coding::Binary)),
            other => Err(format!("coding {other:?} is not one of auto, gsm, latin1, ucs2, binary")),
        }
    }

    /// Octets a single message holds, and each part of a concatenated one (after the 6-octet
    /// UDH). GSM counts septets: 160 fit a message, 153 a part.
    pub fn capacity(self) -> (usize, usize) {
        match self {
            Coding::Gsm => (160, 153),
            _ => (140, 134),
        }
    }
}

/// What a received message's data_coding says of its text.
pub fn coding_of(data_coding: u8) -> Option<Coding> {
    match data_coding {
        0x00 | 0x01 => Some(Coding::Gsm),
        0x03 => Some(Coding::Latin1),
        0x08 => Some(Coding::Ucs2),
        0x02 | 0x04 => Some(Coding::Binary),
        // General data coding with a message class (00xx): bits 3-2 are the alphabet.
        0x10..=0x1F => match (data_coding >> 2) & 3 {
            0 => Some(Coding::Gsm),
            1 => Some(Coding::Binary),
            2 => Some(Coding::Ucs2),
            _ => None,
        },
        // Data coding / message class group: bit 2 set is 8-bit data.
        0xF0..=0xFF => Some(if data_coding & 0x04 != 0 { Coding::Binary } else { Coding::Gsm }),
        _ => None,
    }
}

/// The text of `bytes` in `data_coding` as UTF-8; `None` for binary data and codings not read
/// here (the handler gets the bytes). IA5 (1) is read as ASCII, not through the GSM table
/// (they differ at `@`, `$`, `_` and others).
pub fn decode(data_coding: u8, bytes: &[u8]) -> Option<String> {
    if data_coding == 0x01 {
        return Some(bytes.iter().map(|&b| if b < 0x80 { b as char } else { '\u{fffd}' }).collect());
    }
    match coding_of(data_coding)? {
        Coding::Gsm => Some(decode_gsm(bytes)),
        Coding::Latin1 => Some(bytes.iter().map(|&b| b as char).collect()),
        Coding::Ucs2 => Some(decode_ucs2(bytes)),
        Coding::Binary => None,
    }
}

/// Unpacked GSM septets to text; an escape before an unknown septet reads as a space, as
/// 03.38 says a receiver should.
pub fn decode_gsm(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut it = bytes.iter().map(|&b| b & 0x7F);
    while let Some(b) = it.next() {
        if b == ESCAPE {
            match it.next() {
                Some(n) => out.push(GSM_EXT.iter().find(|(s, _)| *s == n).map(|(_, c)| *c).unwrap_or(' ')),
                None => out.push(' '),
            }
        } else {
            out.push(GSM[b as usize]);
        }
    }
    out
}

/// UTF-16BE to text; a lone surrogate or odd last octet becomes U+FFFD.
pub fn decode_ucs2(bytes: &[u8]) -> String {
    let units = bytes.chunks(2).map(|c| if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { 0xFFFD });
    char::decode_utf16(units).map(|r| r.unwrap_or('\u{fffd}')).collect()
}

/// Text to unpacked GSM septets; `None` when a character is not in the alphabet.
pub fn encode_gsm(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        if c != '\u{1b}' {
            if let Some(i) = GSM.iter().position(|&g| g == c) {
                out.push(i as u8);
                continue;
            }
        }
        let (s, _) = GSM_EXT.iter().find(|(_, e)| *e == c)?;
        out.extend_from_slice(&[ESCAPE, *s]);
    }
    Some(out)
}

/// Text to Latin-1; `None` when a character is beyond U+00FF.
pub fn encode_latin1(text: &str) -> Option<Vec<u8>> {
    text.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect()
}

pub fn encode_ucs2(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

/// Encodes `text` in `coding`, or in the first of GSM and UCS-2 that can carry it when `coding`
/// is `None`.
pub fn encode(text: &str, coding: Option<Coding>) -> Result<(Coding, Vec<u8>), String> {
    match coding {
        None => Ok(match encode_gsm(text) {
            Some(b) => (Coding::Gsm, b),
            None => (Coding::Ucs2, encode_ucs2(text)),
        }),
        Some(Coding::Gsm) => encode_gsm(text)
            .map(|b| (Coding::Gsm, b))
            .ok_or_else(|| "the text has characters the GSM alphabet lacks; use coding = \"ucs2\" or \"auto\"".to_string()),
        Some(Coding::Latin1) => encode_latin1(text)
            .map(|b| (Coding::Latin1, b))
            .ok_or_else(|| "the text has characters beyond Latin-1; use coding = \"ucs2\" or \"auto\"".to_string()),
        Some(Coding::Ucs2) => Ok((Coding::Ucs2, encode_ucs2(text))),
        Some(Coding::Binary) => Ok((Coding::Binary, text.as_bytes().to_vec())),
    }
}

/// Splits encoded octets into the short messages that carry them: one without a header when it
/// fits, else parts of at most the coding's part size, each to be prefixed with a UDH. A GSM
/// escape and its septet, and a UTF-16 surrogate pair, are never split.
pub fn split(coding: Coding, bytes: &[u8]) -> Vec<&[u8]> {
    let (single, part) = coding.capacity();
    if bytes.len() <= single {
        return vec![bytes];
    }
    let mut parts = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let mut n = part.min(rest.len());
        if n < rest.len() {
            match coding {
                Coding::Gsm if rest[n - 1] == ESCAPE && !ends_escaped(&rest[..n - 1]) => n -= 1,
                Coding::Ucs2 => {
                    n -= n % 2;
                    if n >= 2 && (0xD8..=0xDB).contains(&rest[n - 2]) {
                        n -= 2;
                    }
                }
                _ => {}
            }
        }
        parts.push(&rest[..n]);
        rest = &rest[n..];
    }
    parts
}

/// Whether `b` ends with an escape that is itself the second septet of an escape pair: such a
/// septet does not start a pair (no extension septet is 0x1B, so this never happens in text we
/// wrote; kept for octets given as GSM).
fn ends_escaped(b: &[u8]) -> bool {
    b.iter().rev().take_while(|&&c| c == ESCAPE).count() % 2 == 1
}

/// The 6-octet UDH of part `number` (from 1) of `total` with the 8-bit reference `reference`.
pub fn udh(reference: u8, total: u8, number: u8) -> [u8; 6] {
    [0x05, 0x00, 0x03, reference, total, number]
}

/// A concatenation header at the head of a short message with the UDHI bit: reference, total,
/// number, and the length of the whole header. 8-bit (IE 0x00) and 16-bit (IE 0x08) references.
pub fn read_udh(sm: &[u8]) -> Option<(u16, u8, u8, usize)> {
    let len = *sm.first()? as usize;
    let header = sm.get(1..1 + len)?;
    let mut i = 0;
    let mut found = None;
    while i + 1 < header.len() {
        let (ie, l) = (header[i], header[i + 1] as usize);
        let data = header.get(i + 2..i + 2 + l)?;
        match (ie, data) {
            (0x00, [r, t, n]) => found = Some((u16::from(*r), *t, *n)),
            (0x08, [r1, r2, t, n]) => found = Some((u16::from_be_bytes([*r1, *r2]), *t, *n)),
            _ => {}
        }
        i += 2 + l;
    }
    found.map(|(r, t, n)| (r, t, n, 1 + len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn codings_round_trip() {
        let t = "Hello @£ {x} €5 Ñandù";
        let g = encode_gsm(t).unwrap();
        assert_eq!(g[0], b'H');
        assert_eq!(&g[6..8], &[0x00, 0x01]);
        assert_eq!(decode(0, &g).unwrap(), t);
        assert!(encode_gsm("Привет").is_none());
        assert_eq!(encode("Привет", None).unwrap().0, Coding::Ucs2);
        let u = encode_ucs2("a😀");
        assert_eq!(u, vec![0, 0x61, 0xD8, 0x3D, 0xDE, 0x00]);
        assert_eq!(decode(8, &u).unwrap(), "a😀");
        assert_eq!(decode(3, &[0xE9]).unwrap(), "é");
        assert_eq!(decode(4, &[1, 2]), None);
        assert_eq!(decode(8, &[0xD8, 0x00, 0x41]).unwrap(), "\u{fffd}\u{fffd}");
        assert!(encode("€", Some(Coding::Latin1)).unwrap_err().contains("Latin-1"));
    }

    #[test]
    fn long_texts_split_without_breaking_characters() {
        let g = encode_gsm(&"a".repeat(152)).unwrap();
        let mut g2 = g.clone();
        g2.extend(encode_gsm("€€€€€€€€€").unwrap());
        let parts = split(Coding::Gsm, &g2);
        assert_eq!(parts[0].len(), 152, "the escape is not cut from its septet");
        assert_eq!(parts.concat(), g2);
        assert_eq!(split(Coding::Gsm, &g[..]).len(), 1);
        let u = encode_ucs2(&format!("{}😀{}", "a".repeat(66), "b".repeat(10)));
        let parts = split(Coding::Ucs2, &u);
        assert_eq!(parts[0].len(), 132, "the surrogate pair stays whole");
        assert_eq!(decode_ucs2(parts[1]), format!("😀{}", "b".repeat(10)));
        let mut sm = udh(7, 3, 2).to_vec();
        sm.extend_from_slice(b"x");
        assert_eq!(read_udh(&sm), Some((7, 3, 2, 6)));
        assert_eq!(read_udh(&[9, 0]), None);
    }
}
