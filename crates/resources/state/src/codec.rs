//! The stored form of a value: a format byte, then the value as a tag byte followed by its
//! payload. Written here (not MessagePack) so that every `Value` round-trips exactly — bytes stay
//! bytes, integers stay integers, map key order is kept — and so that a decoder can refuse a
//! hostile or damaged blob without allocating what its lengths claim.
//!
//! Format 1, after the leading `0x01`:
//!
//! | tag    | value   | payload                                             |
//! |--------|---------|-----------------------------------------------------|
//! | `0x00` | nil     | none                                                |
//! | `0x01` | false   | none                                                |
//! | `0x02` | true    | none                                                |
//! | `0x03` | integer | zigzag LEB128 varint                                |
//! | `0x04` | float   | 8 bytes, IEEE 754 bits, little-endian               |
//! | `0x05` | string  | varint length, then the bytes                       |
//! | `0x06` | array   | varint count, then each item                        |
//! | `0x07` | map     | varint count, then key and value of each entry      |

use rustomnic_core::value::{Value, MAX_DEPTH};

/// The first byte of every stored value; a reader refuses formats it does not know.
pub const FORMAT: u8 = 1;

const NIL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const INT: u8 = 3;
const FLOAT: u8 = 4;
const STR: u8 = 5;
const ARRAY: u8 = 6;
const MAP: u8 = 7;

/// Encodes `value`, giving up as soon as the encoding passes `limit` bytes so that an oversized
/// value is refused without building all of it.
pub fn encode(value: &Value, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![FORMAT];
    encode_at(value, 0, limit, &mut out)?;
    Ok(out)
}

fn too_big(limit: usize) -> String {
    format!("the value is over the limit of {} encoded", human_size(limit))
}

fn encode_at(value: &Value, depth: usize, limit: usize, out: &mut Vec<u8>) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("the value is nested deeper than {MAX_DEPTH} levels"));
    }
    match value {
        Value::Nil => out.push(NIL),
        Value::Bool(false) => out.push(FALSE),
        Value::Bool(true) => out.push(TRUE),
        Value::Int(i) => {
            out.push(INT);
            // Zigzag keeps small negative numbers short.
            put_varint(out, ((*i << 1) ^ (*i >> 63)) as u64);
        }
        Value::Float(f) => {
            out.push(FLOAT);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Str(bytes) => {
            out.push(STR);
            put_varint(out, bytes.len() as u64);
            if out.len() + bytes.len() > limit {
                return Err(too_big(limit));
            }
            out.extend_from_slice(bytes);
        }
        Value::Array(items) => {
            out.push(ARRAY);
            put_varint(out, items.len() as u64);
            for item in items {
                encode_at(item, depth + 1, limit, out)?;
            }
        }
        Value::Map(entries) => {
            out.push(MAP);
            put_varint(out, entries.len() as u64);
            for (k, v) in entries {
                encode_at(k, depth + 1, limit, out)?;
                encode_at(v, depth + 1, limit, out)?;
            }
        }
    }
    if out.len() > limit {
        return Err(too_big(limit));
    }
    Ok(())
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Decodes a stored value; damaged input gives an error, never a panic or a huge allocation.
pub fn decode(bytes: &[u8]) -> Result<Value, String> {
    let Some((&format, rest)) = bytes.split_first() else {
        return Err("the stored value is empty".into());
    };
    if format != FORMAT {
        return Err(format!("the stored value has format {format}, this build reads format {FORMAT} (written by a newer version?)"));
    }
    let mut reader = Reader { bytes: rest, pos: 0 };
    let value = reader.value(0)?;
    if reader.pos != rest.len() {
        return Err(format!("the stored value has {} bytes after its end", rest.len() - reader.pos));
    }
    Ok(value)
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn damaged(&self, what: &str) -> String {
        format!("the stored value is damaged: {what} at byte {}", self.pos + 1)
    }

    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.bytes.get(self.pos).ok_or_else(|| self.damaged("it ends early"))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len()).ok_or_else(|| self.damaged("a length runs past the end"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    /// A LEB128 number in its shortest form: the encoder writes no other, so a longer one (or
    /// one past 64 bits, whose extra bits would be dropped) is damage.
    fn varint(&mut self) -> Result<u64, String> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err(self.damaged("a number is too long"));
            }
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                if b == 0 && shift > 0 {
                    return Err(self.damaged("a number is written longer than it needs"));
                }
                return Ok(n);
            }
        }
        Err(self.damaged("a number is too long"))
    }

    /// A count of items, each at least one byte, so it cannot exceed what is left.
    fn count(&mut self) -> Result<usize, String> {
        let n = self.varint()?;
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(self.damaged("a count runs past the end"));
        }
        Ok(n as usize)
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(self.damaged("nesting too deep"));
        }
        Ok(match self.byte()? {
            NIL => Value::Nil,
            FALSE => Value::Bool(false),
            TRUE => Value::Bool(true),
            INT => {
                let z = self.varint()?;
                Value::Int(((z >> 1) as i64) ^ -((z & 1) as i64))
            }
            FLOAT => {
                let raw = self.take(8)?;
                let mut bits = [0u8; 8];
                bits.copy_from_slice(raw);
                Value::Float(f64::from_bits(u64::from_le_bytes(bits)))
            }
            STR => {
                let n = self.count()?;
                Value::Str(self.take(n)?.to_vec())
            }
            // Containers grow as their items arrive: a count is only an upper bound, and
            // reserving it at every level of nesting let a 1 MiB blob ask for gigabytes
            // (docs/decisions/060-bounded-decoding.md).
            ARRAY => {
                let n = self.count()?;
                let mut items = Vec::new();
                for _ in 0..n {
                    items.push(self.value(depth + 1)?);
                }
                Value::Array(items)
            }
            MAP => {
                let n = self.count()?;
                let mut entries = Vec::new();
                for _ in 0..n {
                    let k = self.value(depth + 1)?;
                    let v = self.value(depth + 1)?;
                    entries.push((k, v));
                }
                Value::Map(entries)
            }
            tag => {
                self.pos -= 1;
                return Err(self.damaged(&format!("unknown tag {tag}")));
            }
        })
    }
}

/// "16 MiB", "1 KiB" or "300 bytes", for limits in messages.
pub fn human_size(n: usize) -> String {
    if n >= 1 << 20 && n & ((1 << 20) - 1) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n & ((1 << 10) - 1) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: Value) {
        let bytes = encode(&v, usize::MAX).unwrap();
        assert_eq!(decode(&bytes).unwrap(), v);
    }

    #[test]
    fn every_kind_round_trips() {
        round_trip(Value::Nil);
        round_trip(Value::Bool(true));
        round_trip(Value::Bool(false));
        for i in [0, 1, -1, 63, -64, 64, i64::MAX, i64::MIN, 1 << 40] {
            round_trip(Value::Int(i));
        }
        for f in [0.0, -0.0, 1.5, f64::MAX, f64::MIN_POSITIVE, f64::INFINITY] {
            round_trip(Value::Float(f));
        }
        round_trip(Value::Str(vec![0, 255, 10]));
        round_trip(Value::Array(vec![]));
        round_trip(Value::Map(vec![]));
        round_trip(Value::Map(vec![
            (Value::str("z"), Value::Array(vec![Value::Int(1), Value::Nil, Value::str("x")])),
            (Value::Int(3), Value::Map(vec![(Value::Bool(true), Value::Float(2.0))])),
        ]));
        let nan = decode(&encode(&Value::Float(f64::NAN), 100).unwrap()).unwrap();
        assert!(matches!(nan, Value::Float(f) if f.is_nan()));
    }

    #[test]
    fn small_values_are_compact() {
        assert_eq!(encode(&Value::Int(-1), 100).unwrap(), vec![FORMAT, INT, 1]);
        assert_eq!(encode(&Value::str("ab"), 100).unwrap(), vec![FORMAT, STR, 2, b'a', b'b']);
    }

    /// A number written with needless continuation bytes decoded to the same value as its short
    /// form; refused, so that the fuzz target can hold the codec to one encoding per value.
    #[test]
    fn every_value_has_one_encoding() {
        assert!(decode(&[FORMAT, INT, 0x82, 0x00]).unwrap_err().contains("longer than it needs"));
        assert!(decode(&[FORMAT, STR, 0x80, 0x00]).unwrap_err().contains("longer than it needs"));
        assert_eq!(decode(&[FORMAT, INT, 0x80, 0x01]).unwrap(), Value::Int(64));
        assert_eq!(decode(&[FORMAT, INT, 0x00]).unwrap(), Value::Int(0));
        for v in [Value::Int(i64::MIN), Value::Int(i64::MAX), Value::Int(-65), Value::Str(vec![7; 300])] {
            let bytes = encode(&v, usize::MAX).unwrap();
            assert_eq!(decode(&bytes).unwrap(), v);
        }
    }

    #[test]
    fn limits_are_enforced_while_encoding() {
        let e = encode(&Value::Str(vec![0; 2000]), 1024).unwrap_err();
        assert_eq!(e, "the value is over the limit of 1 KiB encoded");
        let many = Value::Array(vec![Value::Int(1); 600]);
        assert!(encode(&many, 1024).unwrap_err().contains("over the limit"));
        let mut deep = Value::Nil;
        for _ in 0..=MAX_DEPTH + 1 {
            deep = Value::Array(vec![deep]);
        }
        assert!(encode(&deep, usize::MAX).unwrap_err().contains("nested deeper"));
    }

    #[test]
    fn damaged_input_is_refused() {
        assert!(decode(&[]).unwrap_err().contains("empty"));
        assert!(decode(&[9, NIL]).unwrap_err().contains("format 9"));
        assert!(decode(&[FORMAT, STR, 5, b'a']).unwrap_err().contains("damaged"));
        assert!(decode(&[FORMAT, ARRAY, 0xff, 0xff, 0xff, 0xff, 0x0f]).unwrap_err().contains("count runs past"));
        assert!(decode(&[FORMAT, 42]).unwrap_err().contains("unknown tag 42"));
        assert!(decode(&[FORMAT, NIL, NIL]).unwrap_err().contains("after its end"));
        assert!(decode(&[FORMAT, INT, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).unwrap_err().contains("too long"));
        // A tenth varint byte can carry one bit only; more would be dropped silently.
        let e = decode(&[FORMAT, INT, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).unwrap_err();
        assert!(e.contains("too long"), "{e}");
        let mut deep = vec![FORMAT];
        deep.extend(std::iter::repeat_n([ARRAY, 1], MAX_DEPTH + 5).flatten());
        deep.push(NIL);
        assert!(decode(&deep).unwrap_err().contains("too deep"));
    }
}
