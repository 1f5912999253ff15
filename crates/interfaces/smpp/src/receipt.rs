//! The text of an SMSC delivery receipt (SMPP 3.4 appendix B):
//! `id:IIII sub:SSS dlvrd:DDD submit date:YYMMDDhhmm done date:YYMMDDhhmm stat:DDDDDDD err:E
//! text:...`, read into fields. SMSCs vary (case, missing fields, longer ids): every key found is
//! kept, the rest left out; `text` runs to the end.

use rustomnic_core::Value;

/// The keys of a receipt and their names in Lua.
const KEYS: &[(&str, &str)] = &[
    ("id:", "id"),
    ("sub:", "sub"),
    ("dlvrd:", "dlvrd"),
    ("submit date:", "submit_date"),
    ("done date:", "done_date"),
    ("stat:", "stat"),
    ("err:", "err"),
    ("text:", "text"),
];

/// The fields of a receipt text, in the order they appear.
pub fn parse_receipt(text: &str) -> Vec<(String, Value)> {
    let lower = text.to_ascii_lowercase();
    let mut found: Vec<(usize, usize, &str)> = Vec::new();
    for (key, name) in KEYS {
        let mut from = 0;
        while let Some(i) = lower[from..].find(key).map(|i| i + from) {
            // A key starts the text or follows a space, and "text:" ends the fields.
            let starts_word = i == 0 || lower.as_bytes()[i - 1] == b' ';
            let inside_text = found.iter().any(|(at, _, n)| *n == "text" && *at < i);
            if starts_word && !inside_text && !found.iter().any(|(_, _, n)| n == name) {
                found.push((i, i + key.len(), name));
                break;
            }
            from = i + key.len();
        }
    }
    found.sort();
    // Keys found after "text:" belong to the text.
    if let Some(t) = found.iter().position(|(_, _, n)| *n == "text") {
        found.truncate(t + 1);
    }
    let mut out = Vec::with_capacity(found.len());
    for (i, (_, start, name)) in found.iter().enumerate() {
        let end = if *name == "text" { text.len() } else { found.get(i + 1).map(|(at, _, _)| *at).unwrap_or(text.len()) };
        let value = text.get(*start..end).unwrap_or("");
        let value = if *name == "text" { value } else { value.trim() };
        out.push((name.to_string(), Value::str(value)));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn get<'a>(f: &'a [(String, Value)], k: &str) -> Option<&'a str> {
        f.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.as_str())
    }

    #[test]
    fn receipts_are_read_leniently() {
        let f = parse_receipt("id:0123456789 sub:001 dlvrd:001 submit date:0610191018 done date:0610191018 stat:DELIVRD err:000 text:id:x stat:y");
        assert_eq!(get(&f, "id"), Some("0123456789"));
        assert_eq!(get(&f, "done_date"), Some("0610191018"));
        assert_eq!(get(&f, "stat"), Some("DELIVRD"));
        assert_eq!(get(&f, "text"), Some("id:x stat:y"));
        let f = parse_receipt("ID:abc Stat:UNDELIV");
        assert_eq!((get(&f, "id"), get(&f, "stat"), get(&f, "err")), (Some("abc"), Some("UNDELIV"), None));
        assert!(parse_receipt("just a message").is_empty());
    }
}
