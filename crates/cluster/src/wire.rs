//! MessagePack on the wire: values of the value model, and the envelopes of a call and its reply.
//!
//! Hand-written over `rmp`'s markers rather than serde, because the value model keeps byte
//! strings and map key order that serde's generic data model would blur, and because the decoder
//! must refuse hostile input (deep nesting, lengths larger than the message) before allocating.

use rmp::encode;
use rmp::Marker;
use rustomnic_core::value::MAX_DEPTH;
use rustomnic_core::Value;

/// The version of the envelopes; a peer speaking another one gets a clear error.
pub const VERSION: u8 = 1;

/// Appends `value` to `out` as MessagePack: UTF-8 strings as str, other bytes as bin.
pub fn encode_value(out: &mut Vec<u8>, value: &Value) -> Result<(), String> {
    encode_at(out, value, 0)
}

fn encode_at(out: &mut Vec<u8>, value: &Value, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("value nested deeper than {MAX_DEPTH} levels"));
    }
    // Writing into a Vec cannot fail; the Results of rmp are for io writers.
    match value {
        Value::Nil => encode::write_nil(out).map_err(|e| e.to_string())?,
        Value::Bool(b) => encode::write_bool(out, *b).map_err(|e| e.to_string())?,
        Value::Int(i) => {
            encode::write_sint(out, *i).map_err(|e| e.to_string())?;
        }
        Value::Float(f) => encode::write_f64(out, *f).map_err(|e| e.to_string())?,
        Value::Str(bytes) => {
            let len = u32::try_from(bytes.len()).map_err(|_| "string longer than 4 GiB".to_string())?;
            if std::str::from_utf8(bytes).is_ok() {
                encode::write_str_len(out, len).map_err(|e| e.to_string())?;
            } else {
                encode::write_bin_len(out, len).map_err(|e| e.to_string())?;
            }
            out.extend_from_slice(bytes);
        }
        Value::Array(items) => {
            let len = u32::try_from(items.len()).map_err(|_| "array too long".to_string())?;
            encode::write_array_len(out, len).map_err(|e| e.to_string())?;
            for item in items {
                encode_at(out, item, depth + 1)?;
            }
        }
        Value::Map(pairs) => {
            let len = u32::try_from(pairs.len()).map_err(|_| "map too long".to_string())?;
            encode::write_map_len(out, len).map_err(|e| e.to_string())?;
            for (k, v) in pairs {
                encode_at(out, k, depth + 1)?;
                encode_at(out, v, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Reads MessagePack from a byte slice, refusing anything malformed with a message that says
/// where.
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data, pos: 0 }
    }

    pub fn at_end(&self) -> bool {
        self.pos == self.data.len()
    }

    fn fail<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("malformed MessagePack at byte {}: {what}", self.pos))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.data.len() - self.pos < n {
            return self.fail(&format!("{n} bytes announced, {} left", self.data.len() - self.pos));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn be<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// A length that cannot be larger than what is left: every element takes at least a byte.
    fn count(&mut self, n: usize) -> Result<usize, String> {
        if n > self.data.len() - self.pos {
            return self.fail(&format!("{n} elements announced, {} bytes left", self.data.len() - self.pos));
        }
        Ok(n)
    }

    pub fn value(&mut self) -> Result<Value, String> {
        self.value_at(0)
    }

    /// The element count of the array that starts here (its elements follow). Envelopes are
    /// read with this, so that the values they carry are counted from their own top, as they
    /// were when encoded.
    pub fn array_header(&mut self, what: &str) -> Result<usize, String> {
        let n = match Marker::from_u8(self.byte()?) {
            Marker::FixArray(n) => n as usize,
            Marker::Array16 => u16::from_be_bytes(self.be()?) as usize,
            Marker::Array32 => u32::from_be_bytes(self.be()?) as usize,
            _ => return Err(format!("{what} must be a MessagePack array")),
        };
        self.count(n)
    }

    /// Trailing bytes are an error.
    pub fn end(&self) -> Result<(), String> {
        if self.at_end() {
            Ok(())
        } else {
            self.fail("trailing bytes after the value")
        }
    }

    fn value_at(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return self.fail(&format!("nested deeper than {MAX_DEPTH} levels"));
        }
        let marker = Marker::from_u8(self.byte()?);
        Ok(match marker {
            Marker::Null => Value::Nil,
            Marker::True => Value::Bool(true),
            Marker::False => Value::Bool(false),
            Marker::FixPos(n) => Value::Int(n as i64),
            Marker::FixNeg(n) => Value::Int(n as i64),
            Marker::U8 => Value::Int(self.byte()? as i64),
            Marker::U16 => Value::Int(u16::from_be_bytes(self.be()?) as i64),
            Marker::U32 => Value::Int(u32::from_be_bytes(self.be()?) as i64),
            Marker::U64 => {
                let n = u64::from_be_bytes(self.be()?);
                match i64::try_from(n) {
                    Ok(i) => Value::Int(i),
                    Err(_) => return self.fail(&format!("integer {n} is out of the 64-bit signed range")),
                }
            }
            Marker::I8 => Value::Int(i8::from_be_bytes(self.be()?) as i64),
            Marker::I16 => Value::Int(i16::from_be_bytes(self.be()?) as i64),
            Marker::I32 => Value::Int(i32::from_be_bytes(self.be()?) as i64),
            Marker::I64 => Value::Int(i64::from_be_bytes(self.be()?)),
            Marker::F32 => Value::Float(f32::from_be_bytes(self.be()?) as f64),
            Marker::F64 => Value::Float(f64::from_be_bytes(self.be()?)),
            Marker::FixStr(n) => Value::Str(self.take(n as usize)?.to_vec()),
            Marker::Str8 | Marker::Bin8 => {
                let n = self.byte()? as usize;
                Value::Str(self.take(n)?.to_vec())
            }
            Marker::Str16 | Marker::Bin16 => {
                let n = u16::from_be_bytes(self.be()?) as usize;
                Value::Str(self.take(n)?.to_vec())
            }
            Marker::Str32 | Marker::Bin32 => {
                let n = u32::from_be_bytes(self.be()?) as usize;
                Value::Str(self.take(n)?.to_vec())
            }
            Marker::FixArray(n) => self.array(n as usize, depth)?,
            Marker::Array16 => {
                let n = u16::from_be_bytes(self.be()?) as usize;
                self.array(n, depth)?
            }
            Marker::Array32 => {
                let n = u32::from_be_bytes(self.be()?) as usize;
                self.array(n, depth)?
            }
            Marker::FixMap(n) => self.map(n as usize, depth)?,
            Marker::Map16 => {
                let n = u16::from_be_bytes(self.be()?) as usize;
                self.map(n, depth)?
            }
            Marker::Map32 => {
                let n = u32::from_be_bytes(self.be()?) as usize;
                self.map(n, depth)?
            }
            Marker::FixExt1 | Marker::FixExt2 | Marker::FixExt4 | Marker::FixExt8 | Marker::FixExt16 | Marker::Ext8 | Marker::Ext16 | Marker::Ext32 => {
                return self.fail("extension types are not part of the value model")
            }
            Marker::Reserved => return self.fail("reserved marker 0xc1"),
        })
    }

    // Containers grow as their elements arrive instead of reserving what their header
    // announces: an announced count is only an upper bound (each element takes a byte), and a
    // reservation of 32 bytes per announced value, repeated at every level of nesting, let a
    // 1 MiB message ask for gigabytes (docs/decisions/060-bounded-decoding.md).
    fn array(&mut self, n: usize, depth: usize) -> Result<Value, String> {
        let n = self.count(n)?;
        let mut items = Vec::new();
        for _ in 0..n {
            items.push(self.value_at(depth + 1)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value, String> {
        let n = self.count(n)?;
        let mut pairs = Vec::new();
        for _ in 0..n {
            let k = self.value_at(depth + 1)?;
            let v = self.value_at(depth + 1)?;
            pairs.push((k, v));
        }
        Ok(Value::Map(pairs))
    }
}

/// Decodes one whole value; trailing bytes are an error.
pub fn decode_value(data: &[u8]) -> Result<Value, String> {
    let mut r = Reader::new(data);
    let v = r.value()?;
    if !r.at_end() {
        return r.fail("trailing bytes after the value");
    }
    Ok(v)
}

/// A call as it travels from the caller's process to the callee's.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub from_cage: String,
    pub request_id: String,
    /// Time left before the caller's deadline when the call was sent; the callee runs under it.
    pub timeout_us: u64,
    pub cage: String,
    pub module: String,
    pub function: String,
    pub args: Vec<Value>,
}

fn s(v: &str) -> Value {
    Value::Str(v.as_bytes().to_vec())
}

impl Call {
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(64);
        let envelope = Value::Array(vec![
            Value::Int(VERSION as i64),
            s(&self.from_cage),
            s(&self.request_id),
            Value::Int(i64::try_from(self.timeout_us).unwrap_or(i64::MAX)),
            s(&self.cage),
            s(&self.module),
            s(&self.function),
        ]);
        // The arguments follow the envelope's fields inside one array, so they are written
        // without being moved into a Value first.
        let Value::Array(fields) = envelope else { return Err("internal: envelope".into()) };
        encode::write_array_len(&mut out, (fields.len() + 1) as u32).map_err(|e| e.to_string())?;
        for f in &fields {
            encode_value(&mut out, f)?;
        }
        encode::write_array_len(&mut out, u32::try_from(self.args.len()).map_err(|_| "too many arguments")?).map_err(|e| e.to_string())?;
        for (i, a) in self.args.iter().enumerate() {
            encode_value(&mut out, a).map_err(|e| format!("argument {}: {e}", i + 1))?;
        }
        Ok(out)
    }

    pub fn decode(data: &[u8]) -> Result<Call, String> {
        let mut r = Reader::new(data);
        let n = r.array_header("a call")?;
        let mut fields = Vec::new();
        while fields.len() < n.min(7) {
            fields.push(r.value()?);
        }
        if fields.first() != Some(&Value::Int(VERSION as i64)) {
            return Err(format!("unknown call format {:?} (this process speaks version {VERSION})", fields.first()));
        }
        if n != 8 {
            return Err(format!("a call has 8 fields, this one has {n}"));
        }
        let count = r.array_header("call arguments")?;
        let mut args = Vec::new();
        for _ in 0..count {
            args.push(r.value()?);
        }
        r.end()?;
        let text = |v: &Value, what: &str| match v {
            Value::Str(b) => String::from_utf8(b.clone()).map_err(|_| format!("call {what} is not UTF-8")),
            _ => Err(format!("call {what} must be a string")),
        };
        let timeout_us = match fields[3] {
            Value::Int(n) if n >= 0 => n as u64,
            _ => return Err("call timeout must be a non-negative integer".into()),
        };
        Ok(Call {
            from_cage: text(&fields[1], "caller")?,
            request_id: text(&fields[2], "request id")?,
            timeout_us,
            cage: text(&fields[4], "cage")?,
            module: text(&fields[5], "module")?,
            function: text(&fields[6], "function")?,
            args,
        })
    }
}

/// Why a remote call failed, as the callee saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The function raised an error.
    Failed = 1,
    /// The deadline passed while the callee ran.
    Deadline = 2,
    /// No such module or function in the callee cage.
    NotFound = 3,
    /// The callee instance has too many calls in flight.
    Busy = 4,
    /// The callee could not read the call.
    BadCall = 5,
    /// The call can never succeed as made (a durable call to a queue the cage does not have):
    /// the caller must not try it again. Older peers read it as Failed.
    Refused = 6,
}

impl Failure {
    fn from_code(n: i64) -> Failure {
        match n {
            2 => Failure::Deadline,
            3 => Failure::NotFound,
            4 => Failure::Busy,
            5 => Failure::BadCall,
            6 => Failure::Refused,
            _ => Failure::Failed,
        }
    }
}

/// The answer to a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Ok(Vec<Value>),
    Err { failure: Failure, message: String, instance: String },
}

impl Reply {
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(32);
        match self {
            Reply::Ok(values) => {
                encode::write_array_len(&mut out, 2).map_err(|e| e.to_string())?;
                encode::write_uint(&mut out, 0).map_err(|e| e.to_string())?;
                encode::write_array_len(&mut out, u32::try_from(values.len()).map_err(|_| "too many results")?).map_err(|e| e.to_string())?;
                for (i, v) in values.iter().enumerate() {
                    encode_value(&mut out, v).map_err(|e| format!("result {}: {e}", i + 1))?;
                }
            }
            Reply::Err { failure, message, instance } => {
                encode_value(&mut out, &Value::Array(vec![Value::Int(*failure as i64), s(message), s(instance)]))?;
            }
        }
        Ok(out)
    }

    pub fn decode(data: &[u8]) -> Result<Reply, String> {
        let mut r = Reader::new(data);
        let n = r.array_header("a reply")?;
        let first = if n > 0 { Some(r.value()?) } else { None };
        let reply = match first {
            Some(Value::Int(0)) if n == 2 => {
                let count = r.array_header("reply results")?;
                let mut values = Vec::new();
                for _ in 0..count {
                    values.push(r.value()?);
                }
                Reply::Ok(values)
            }
            Some(Value::Int(code)) if n == 3 => {
                let text = |v: Value| match v {
                    Value::Str(b) => String::from_utf8_lossy(&b).into_owned(),
                    _ => String::new(),
                };
                let message = text(r.value()?);
                let instance = text(r.value()?);
                Reply::Err { failure: Failure::from_code(code), message, instance }
            }
            _ => return Err("unknown reply format".into()),
        };
        r.end()?;
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(v: Value) {
        let mut out = Vec::new();
        encode_value(&mut out, &v).unwrap();
        assert_eq!(decode_value(&out).unwrap(), v);
    }

    #[test]
    fn values_roundtrip() {
        roundtrip(Value::Nil);
        roundtrip(Value::Bool(true));
        for i in [0, 1, -1, 127, 128, -33, 255, 256, 65536, i64::MAX, i64::MIN] {
            roundtrip(Value::Int(i));
        }
        roundtrip(Value::Float(0.1));
        roundtrip(Value::Str(b"text".to_vec()));
        roundtrip(Value::Str(vec![0xff, 0x00, 0xfe]));
        roundtrip(Value::Str(vec![b'x'; 70000]));
        roundtrip(Value::Array((0..20).map(Value::Int).collect()));
        roundtrip(Value::Map(vec![(Value::Str(b"b".to_vec()), Value::Int(1)), (Value::Str(b"a".to_vec()), Value::Nil)]));
    }

    #[test]
    fn non_utf8_goes_as_bin() {
        let mut out = Vec::new();
        encode_value(&mut out, &Value::Str(vec![0xff])).unwrap();
        assert_eq!(out, [0xc4, 1, 0xff]);
        out.clear();
        encode_value(&mut out, &Value::Str(b"a".to_vec())).unwrap();
        assert_eq!(out, [0xa1, b'a']);
    }

    #[test]
    fn hostile_input_is_refused() {
        // An array claiming 4 billion elements in a 5-byte message.
        let e = decode_value(&[0xdd, 0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(e.contains("elements announced"), "{e}");
        let e = decode_value(&[0xda, 0x00, 0x10, b'a']).unwrap_err();
        assert!(e.contains("bytes announced"), "{e}");
        let deep = vec![0x91u8; 200];
        let e = decode_value(&deep).unwrap_err();
        assert!(e.contains("nested deeper"), "{e}");
        assert!(decode_value(&[0xc1]).unwrap_err().contains("reserved"));
        assert!(decode_value(&[0xd4, 1, 2]).unwrap_err().contains("extension"));
        assert!(decode_value(&[0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).unwrap_err().contains("out of"));
        assert!(decode_value(&[0xc0, 0xc0]).unwrap_err().contains("trailing"));
        assert!(decode_value(&[]).is_err());
    }

    #[test]
    fn calls_and_replies_roundtrip() {
        let call = Call {
            from_cage: "web".into(),
            request_id: "r1".into(),
            timeout_us: 1_500_000,
            cage: "worker".into(),
            module: "work".into(),
            function: "handle".into(),
            args: vec![Value::Int(2), Value::Str(b"x".to_vec())],
        };
        assert_eq!(Call::decode(&call.encode().unwrap()).unwrap(), call);
        let ok = Reply::Ok(vec![Value::Int(4)]);
        assert_eq!(Reply::decode(&ok.encode().unwrap()).unwrap(), ok);
        let err = Reply::Err { failure: Failure::Deadline, message: "late".into(), instance: "abc".into() };
        assert_eq!(Reply::decode(&err.encode().unwrap()).unwrap(), err);
    }

    /// A cheap stand-in for the fuzz target that runs in every test run: mutated encodings of
    /// real calls never panic, and whatever decodes re-encodes to itself.
    #[test]
    fn mutated_input_never_panics() {
        let call = Call {
            from_cage: "web".into(),
            request_id: "r".into(),
            timeout_us: 5,
            cage: "w".into(),
            module: "m".into(),
            function: "f".into(),
            args: vec![Value::Map(vec![(Value::Str(b"k".to_vec()), Value::Array(vec![Value::Float(1.5), Value::Nil]))])],
        };
        let base = call.encode().unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let mut data = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % data.len();
                data[i] = next() as u8;
            }
            data.truncate(data.len() - (next() as usize % 3));
            if let Ok(v) = decode_value(&data) {
                let mut out = Vec::new();
                encode_value(&mut out, &v).unwrap();
                let mut again = Vec::new();
                encode_value(&mut again, &decode_value(&out).unwrap()).unwrap();
                assert_eq!(out, again);
            }
            let _ = Call::decode(&data);
            let _ = Reply::decode(&data);
        }
    }

    /// Found while writing the msgpack fuzz target's round-trip property: arguments, results
    /// and event values were encoded counting depth from themselves but decoded counting from
    /// the envelope, so a value nested 127 or 128 levels deep was sent and then refused.
    #[test]
    fn the_deepest_values_cross_in_calls_replies_and_events() {
        let mut deep = Value::Nil;
        for _ in 0..MAX_DEPTH {
            deep = Value::Array(vec![deep]);
        }
        let mut out = Vec::new();
        encode_value(&mut out, &deep).unwrap();
        assert_eq!(decode_value(&out).unwrap(), deep);
        let call = Call {
            from_cage: "a".into(),
            request_id: "r".into(),
            timeout_us: 1,
            cage: "b".into(),
            module: "m".into(),
            function: "f".into(),
            args: vec![deep.clone()],
        };
        assert_eq!(Call::decode(&call.encode().unwrap()).unwrap(), call);
        let reply = Reply::Ok(vec![deep.clone()]);
        assert_eq!(Reply::decode(&reply.encode().unwrap()).unwrap(), reply);
        let event = crate::events::encode("i", "t", &deep).unwrap();
        assert_eq!(crate::events::decode(&event).unwrap().2, deep);
        // One level more is refused by the encoder, as everywhere.
        assert!(encode_value(&mut Vec::new(), &Value::Array(vec![deep])).is_err());
    }

    #[test]
    fn foreign_calls_are_refused() {
        let mut out = Vec::new();
        encode_value(&mut out, &Value::Array(vec![Value::Int(9)])).unwrap();
        assert!(Call::decode(&out).unwrap_err().contains("unknown call format"));
        assert!(Call::decode(b"\x93\x01\x02\x03").unwrap_err().contains("8 fields"));
    }
}
