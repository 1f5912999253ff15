//! Reads the few fields of an X.509 certificate that a handler may authorize by (subject,
//! subject alternative names, serial number, end of validity) from its DER bytes. The
//! certificate has already been verified by rustls; anything unexpected here yields `None`
//! rather than a guess.

/// A certificate as `request.tls.peer` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// "CN=alice, O=Example" (RFC 4514 names for the usual attributes, dotted OIDs for others).
    pub subject: String,
    /// "DNS:name", "IP:address", "email:address" or "URI:uri", in certificate order.
    pub sans: Vec<String>,
    /// Upper-case hex, as openssl prints it.
    pub serial: String,
    /// "2027-01-31T12:00:00Z".
    pub not_after: String,
}

/// One DER element: its tag, its contents, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The element with tag `want` at the start of `input`, and what follows it.
fn expect(input: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    let (tag, body, rest) = element(input)?;
    (tag == want).then_some((body, rest))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;

pub fn describe(cert: &[u8]) -> Option<Described> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    // [0] version, optional.
    let tbs = match element(tbs)? {
        (0xa0, _, rest) => rest,
        _ => tbs,
    };
    let (serial, tbs) = expect(tbs, 0x02)?;
    let (_signature, tbs) = expect(tbs, SEQUENCE)?;
    let (_issuer, tbs) = expect(tbs, SEQUENCE)?;
    let (validity, tbs) = expect(tbs, SEQUENCE)?;
    let (subject, tbs) = expect(tbs, SEQUENCE)?;
    let (_key, mut tbs) = expect(tbs, SEQUENCE)?;
    let (_, _, after) = element(validity)?;
    let (time_tag, not_after, _) = element(after)?;
    let mut sans = Vec::new();
    while let Some((tag, body, rest)) = element(tbs) {
        tbs = rest;
        if tag == 0xa3 {
            sans = alt_names(body)?;
        }
    }
    let serial = serial.iter().skip_while(|&&b| b == 0).map(|b| format!("{b:02X}")).collect::<String>();
    Some(Described { subject: name(subject)?, sans, serial: if serial.is_empty() { "00".into() } else { serial }, not_after: time(time_tag, not_after)? })
}

/// The subject alternative names in the extensions (`[3]` of the certificate).
fn alt_names(extensions: &[u8]) -> Option<Vec<String>> {
    const SAN: &[u8] = &[0x55, 0x1d, 0x11];
    let (mut list, _) = expect(extensions, SEQUENCE)?;
    while let Some((_, ext, rest)) = element(list) {
        list = rest;
        let (oid, mut ext) = expect(ext, 0x06)?;
        if oid != SAN {
            continue;
        }
        // The critical flag, when present.
        if let Some((0x01, _, rest)) = element(ext) {
            ext = rest;
        }
        let (value, _) = expect(ext, 0x04)?;
        let (mut names, _) = expect(value, SEQUENCE)?;
        let mut out = Vec::new();
        while let Some((tag, body, rest)) = element(names) {
            names = rest;
            let text = || String::from_utf8_lossy(body).into_owned();
            match tag {
                0x81 => out.push(format!("email:{}", text())),
                0x82 => out.push(format!("DNS:{}", text())),
                0x86 => out.push(format!("URI:{}", text())),
                0x87 => match body.len() {
                    4 => out.push(format!("IP:{}", std::net::Ipv4Addr::new(body[0], body[1], body[2], body[3]))),
                    16 => {
                        let mut b = [0u8; 16];
                        b.copy_from_slice(body);
                        out.push(format!("IP:{}", std::net::Ipv6Addr::from(b)));
                    }
                    _ => {}
                },
                // Other kinds (directory names, other names) are not shown.
                _ => {}
            }
        }
        return Some(out);
    }
    Some(Vec::new())
}

/// A distinguished name as "CN=..., O=...", in the order written.
fn name(mut rdns: &[u8]) -> Option<String> {
    let mut parts = Vec::new();
    while let Some((tag, set, rest)) = element(rdns) {
        rdns = rest;
        if tag != SET {
            return None;
        }
        let mut set = set;
        while let Some((_, pair, rest)) = element(set) {
            set = rest;
            let (oid, pair) = expect(pair, 0x06)?;
            let (vtag, value, _) = element(pair)?;
            parts.push(format!("{}={}", attribute(oid), string(vtag, value)));
        }
    }
    Some(parts.join(", "))
}

fn attribute(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x55, 0x04, 0x05] => "serialNumber".into(),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "emailAddress".into(),
        _ => dotted(oid),
    }
}

fn dotted(oid: &[u8]) -> String {
    let mut out = Vec::new();
    let mut n: u64 = 0;
    for &b in oid {
        n = (n << 7) | (b & 0x7f) as u64;
        if b & 0x80 == 0 {
            if out.is_empty() {
                let first = (n / 40).min(2);
                out.push(first);
                out.push(n - first * 40);
            } else {
                out.push(n);
            }
            n = 0;
        }
    }
    out.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(".")
}

fn string(tag: u8, value: &[u8]) -> String {
    match tag {
        // BMPString: UTF-16 big-endian.
        0x1e => {
            let units: Vec<u16> = value.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])).collect();
            String::from_utf16_lossy(&units)
        }
        _ => String::from_utf8_lossy(value).into_owned(),
    }
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ) as ISO 8601.
fn time(tag: u8, value: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(value).ok()?;
    let digits = text.strip_suffix('Z')?;
    let full = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy: u32 = digits[..2].parse().ok()?;
            format!("{}{}", if yy >= 50 { 19 } else { 20 }, digits)
        }
        (0x18, 14) => digits.to_string(),
        _ => return None,
    };
    if !full.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(format!("{}-{}-{}T{}:{}:{}Z", &full[..4], &full[4..6], &full[6..8], &full[8..10], &full[10..12], &full[12..14]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_lengths() {
        assert_eq!(element(&[0x04, 0x02, 1, 2, 9]), Some((0x04, &[1u8, 2][..], &[9u8][..])));
        let mut long = vec![0x04, 0x81, 0x80];
        long.extend(std::iter::repeat_n(7u8, 0x80));
        assert_eq!(element(&long).map(|(_, b, _)| b.len()), Some(0x80));
        // A length that runs past the input is refused, not read out of bounds.
        assert_eq!(element(&[0x04, 0x82, 0xff, 0xff, 1]), None);
    }

    #[test]
    fn times_and_oids() {
        assert_eq!(time(0x17, b"270131120000Z").as_deref(), Some("2027-01-31T12:00:00Z"));
        assert_eq!(time(0x18, b"40960101000000Z").as_deref(), Some("4096-01-01T00:00:00Z"));
        assert_eq!(time(0x17, b"2701311200Z"), None);
        assert_eq!(dotted(&[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37]), "1.3.6.1.4.1.311");
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(describe(&[]), None);
        assert_eq!(describe(&[0x30, 0x03, 0x30, 0x01]), None);
    }
}
