//! The SMPP 3.4 PDU codec: the 16-byte header, the bodies of the binds, unbind, enquire_link,
//! generic_nack, submit_sm, deliver_sm, data_sm and their responses, and TLV optional
//! parameters. Decoding is bounded: a command_length over [`MAX_PDU`] or under the header, a
//! C-octet string over its spec length or without its NUL, a TLV running past the PDU are
//! errors. Unknown commands keep their body as bytes. `decode(encode(p)) == p` for every PDU
//! that decodes.

use std::fmt;

/// The largest PDU read or written (command_length included).
pub const MAX_PDU: usize = 64 << 10;
pub const HEADER: usize = 16;

pub const GENERIC_NACK: u32 = 0x8000_0000;
pub const BIND_RECEIVER: u32 = 0x0000_0001;
pub const BIND_TRANSMITTER: u32 = 0x0000_0002;
pub const SUBMIT_SM: u32 = 0x0000_0004;
pub const DELIVER_SM: u32 = 0x0000_0005;
pub const UNBIND: u32 = 0x0000_0006;
pub const BIND_TRANSCEIVER: u32 = 0x0000_0009;
pub const ENQUIRE_LINK: u32 = 0x0000_0015;
pub const DATA_SM: u32 = 0x0000_0103;
pub const RESP: u32 = 0x8000_0000;

pub const ESME_ROK: u32 = 0x00;
pub const ESME_RINVMSGLEN: u32 = 0x01;
pub const ESME_RINVCMDLEN: u32 = 0x02;
pub const ESME_RINVCMDID: u32 = 0x03;
pub const ESME_RINVBNDSTS: u32 = 0x04;
pub const ESME_RSYSERR: u32 = 0x08;
pub const ESME_RBINDFAIL: u32 = 0x0D;
pub const ESME_RINVPASWD: u32 = 0x0E;
pub const ESME_RINVSYSID: u32 = 0x0F;
pub const ESME_RMSGQFUL: u32 = 0x14;
pub const ESME_RTHROTTLED: u32 = 0x58;
pub const ESME_RX_T_APPN: u32 = 0x64;
pub const ESME_RX_P_APPN: u32 = 0x65;

/// TLV tags with a name here.
pub const TAG_USER_MESSAGE_REFERENCE: u16 = 0x0204;
pub const TAG_SAR_MSG_REF_NUM: u16 = 0x020C;
pub const TAG_SAR_TOTAL_SEGMENTS: u16 = 0x020E;
pub const TAG_SAR_SEGMENT_SEQNUM: u16 = 0x020F;
pub const TAG_MESSAGE_PAYLOAD: u16 = 0x0424;
pub const TAG_MESSAGE_STATE: u16 = 0x0427;
pub const TAG_RECEIPTED_MESSAGE_ID: u16 = 0x001E;

/// esm_class bits: a delivery receipt (SMSC delivery receipt, message type 0x04), and a short
/// message that starts with a user data header.
pub const ESM_DELIVERY_RECEIPT: u8 = 0x04;
pub const ESM_UDHI: u8 = 0x40;

/// Spec sizes of C-octet strings, the NUL included (SMPP 3.4 section 4).
pub const SYSTEM_ID: usize = 16;
pub const PASSWORD: usize = 9;
pub const SYSTEM_TYPE: usize = 13;
pub const ADDRESS_RANGE: usize = 41;
pub const SERVICE_TYPE: usize = 6;
pub const ADDR_21: usize = 21;
pub const ADDR_65: usize = 65;
pub const TIME: usize = 17;
pub const MESSAGE_ID: usize = 65;
/// The most short_message holds (sm_length is one octet).
pub const SHORT_MESSAGE: usize = 254;

/// The name of a command id, for errors and logs.
pub fn command_name(id: u32) -> String {
    let base = match id & !RESP {
        0x0000_0000 if id == GENERIC_NACK => return "generic_nack".into(),
        BIND_RECEIVER => "bind_receiver",
        BIND_TRANSMITTER => "bind_transmitter",
        0x03 => "query_sm",
        SUBMIT_SM => "submit_sm",
        DELIVER_SM => "deliver_sm",
        UNBIND => "unbind",
        0x07 => "replace_sm",
        0x08 => "cancel_sm",
        BIND_TRANSCEIVER => "bind_transceiver",
        0x0B => "outbind",
        ENQUIRE_LINK => "enquire_link",
        0x21 => "submit_multi",
        0x102 => "alert_notification",
        DATA_SM => "data_sm",
        _ => return format!("command 0x{id:08x}"),
    };
    if id & RESP != 0 {
        format!("{base}_resp")
    } else {
        base.to_string()
    }
}

/// The name of a command_status, for errors and logs.
pub fn status_name(status: u32) -> String {
    let name = match status {
        ESME_ROK => "ESME_ROK",
        ESME_RINVMSGLEN => "ESME_RINVMSGLEN (message length invalid)",
        ESME_RINVCMDLEN => "ESME_RINVCMDLEN (command length invalid)",
        ESME_RINVCMDID => "ESME_RINVCMDID (invalid command id)",
        ESME_RINVBNDSTS => "ESME_RINVBNDSTS (incorrect bind status)",
        0x05 => "ESME_RALYBND (already bound)",
        ESME_RSYSERR => "ESME_RSYSERR (system error)",
        0x0A => "ESME_RINVSRCADR (invalid source address)",
        0x0B => "ESME_RINVDSTADR (invalid destination address)",
        0x0C => "ESME_RINVMSGID (message id invalid)",
        ESME_RBINDFAIL => "ESME_RBINDFAIL (bind failed)",
        ESME_RINVPASWD => "ESME_RINVPASWD (invalid password)",
        ESME_RINVSYSID => "ESME_RINVSYSID (invalid system id)",
        ESME_RMSGQFUL => "ESME_RMSGQFUL (message queue full)",
        0x15 => "ESME_RINVSERTYP (invalid service type)",
        0x45 => "ESME_RSUBMITFAIL (submit failed)",
        ESME_RTHROTTLED => "ESME_RTHROTTLED (throttling error)",
        ESME_RX_T_APPN => "ESME_RX_T_APPN (temporary application error)",
        ESME_RX_P_APPN => "ESME_RX_P_APPN (permanent application error)",
        0xFF => "ESME_RUNKNOWNERR (unknown error)",
        _ => return format!("status 0x{status:08x}"),
    };
    format!("{name} [0x{status:08x}]")
}

/// What went wrong decoding a PDU. `sequence` is known once the header was read (to answer
/// with generic_nack).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PduError {
    pub message: String,
    /// The status to answer with: ESME_RINVCMDLEN, ESME_RINVMSGLEN, ...
    pub status: u32,
    pub sequence: Option<u32>,
    /// The stream cannot be resynchronised (a bad command_length).
    pub fatal: bool,
}

impl fmt::Display for PduError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// One TLV optional parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlv {
    pub tag: u16,
    pub value: Vec<u8>,
}

/// The body of a bind_transmitter, bind_receiver or bind_transceiver.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bind {
    pub system_id: Vec<u8>,
    pub password: Vec<u8>,
    pub system_type: Vec<u8>,
    pub interface_version: u8,
    pub addr_ton: u8,
    pub addr_npi: u8,
    pub address_range: Vec<u8>,
}

/// An address with its type of number and numbering plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Address {
    pub ton: u8,
    pub npi: u8,
    pub addr: Vec<u8>,
}

/// The body of submit_sm and deliver_sm (the same fields; deliver_sm leaves the times empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sm {
    pub service_type: Vec<u8>,
    pub source: Address,
    pub destination: Address,
    pub esm_class: u8,
    pub protocol_id: u8,
    pub priority_flag: u8,
    pub schedule_delivery_time: Vec<u8>,
    pub validity_period: Vec<u8>,
    pub registered_delivery: u8,
    pub replace_if_present_flag: u8,
    pub data_coding: u8,
    pub sm_default_msg_id: u8,
    pub short_message: Vec<u8>,
    pub tlvs: Vec<Tlv>,
}

/// The body of data_sm.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataSm {
    pub service_type: Vec<u8>,
    pub source: Address,
    pub destination: Address,
    pub esm_class: u8,
    pub registered_delivery: u8,
    pub data_coding: u8,
    pub tlvs: Vec<Tlv>,
}

/// A PDU's body by its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Bind(Bind),
    /// bind_*_resp: the SMSC's system_id (absent in an error response) and TLVs.
    BindResp(Option<Vec<u8>>, Vec<Tlv>),
    /// unbind, unbind_resp, enquire_link, enquire_link_resp, generic_nack.
    Empty,
    /// submit_sm, deliver_sm.
    Sm(Box<Sm>),
    DataSm(Box<DataSm>),
    /// submit_sm_resp, deliver_sm_resp, data_sm_resp: the message_id (absent when the SMSC sent
    /// no body, as it may with an error status) and TLVs (data_sm_resp).
    SmResp(Option<Vec<u8>>, Vec<Tlv>),
    /// A command this codec does not read: its body as it came.
    Other(Vec<u8>),
}

/// One PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    pub command_id: u32,
    pub status: u32,
    pub sequence: u32,
    pub body: Body,
}

impl Pdu {
    pub fn new(command_id: u32, sequence: u32, body: Body) -> Pdu {
        Pdu { command_id, status: ESME_ROK, sequence, body }
    }

    /// The response to this request with `status` and `body`.
    pub fn response(&self, status: u32, body: Body) -> Pdu {
        Pdu { command_id: self.command_id | RESP, status, sequence: self.sequence, body }
    }

    pub fn is_response(&self) -> bool {
        self.command_id & RESP != 0
    }

    pub fn name(&self) -> String {
        command_name(self.command_id)
    }

    /// Encodes the PDU. Fields over their spec lengths are an error (never cut silently).
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.command_id.to_be_bytes());
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        let name = self.name();
        let w = &mut out;
        match &self.body {
            Body::Bind(b) => {
                cstr(w, &b.system_id, SYSTEM_ID, "system_id")?;
                cstr(w, &b.password, PASSWORD, "password")?;
                cstr(w, &b.system_type, SYSTEM_TYPE, "system_type")?;
                w.extend_from_slice(&[b.interface_version, b.addr_ton, b.addr_npi]);
                cstr(w, &b.address_range, ADDRESS_RANGE, "address_range")?;
            }
            Body::BindResp(id, tlvs) => {
                if let Some(id) = id {
                    cstr(w, id, SYSTEM_ID, "system_id")?;
                }
                put_tlvs(w, tlvs)?;
            }
            Body::Empty => {}
            Body::Sm(sm) => {
                cstr(w, &sm.service_type, SERVICE_TYPE, "service_type")?;
                address(w, &sm.source, ADDR_21, "source_addr")?;
                address(w, &sm.destination, ADDR_21, "destination_addr")?;
                w.extend_from_slice(&[sm.esm_class, sm.protocol_id, sm.priority_flag]);
                cstr(w, &sm.schedule_delivery_time, TIME, "schedule_delivery_time")?;
                cstr(w, &sm.validity_period, TIME, "validity_period")?;
                w.extend_from_slice(&[sm.registered_delivery, sm.replace_if_present_flag, sm.data_coding, sm.sm_default_msg_id]);
                if sm.short_message.len() > SHORT_MESSAGE {
                    return Err(format!("{name}: short_message is {} octets, over {SHORT_MESSAGE}", sm.short_message.len()));
                }
                w.push(sm.short_message.len() as u8);
                w.extend_from_slice(&sm.short_message);
                put_tlvs(w, &sm.tlvs)?;
            }
            Body::DataSm(d) => {
                cstr(w, &d.service_type, SERVICE_TYPE, "service_type")?;
                address(w, &d.source, ADDR_65, "source_addr")?;
                address(w, &d.destination, ADDR_65, "destination_addr")?;
                w.extend_from_slice(&[d.esm_class, d.registered_delivery, d.data_coding]);
                put_tlvs(w, &d.tlvs)?;
            }
            Body::SmResp(id, tlvs) => {
                if let Some(id) = id {
                    cstr(w, id, MESSAGE_ID, "message_id")?;
                }
                put_tlvs(w, tlvs)?;
            }
            Body::Other(bytes) => w.extend_from_slice(bytes),
        }
        if out.len() > MAX_PDU {
            return Err(format!("{name}: {} bytes, over the limit of {MAX_PDU}", out.len()));
        }
        let len = (out.len() as u32).to_be_bytes();
        out[..4].copy_from_slice(&len);
        Ok(out)
    }
}

fn cstr(w: &mut Vec<u8>, s: &[u8], max: usize, field: &str) -> Result<(), String> {
    if s.len() >= max {
        return Err(format!("{field} is {} octets, over its limit of {}", s.len(), max - 1));
    }
    if s.contains(&0) {
        return Err(format!("{field} holds a NUL octet"));
    }
    w.extend_from_slice(s);
    w.push(0);
    Ok(())
}

fn address(w: &mut Vec<u8>, a: &Address, max: usize, field: &str) -> Result<(), String> {
    w.extend_from_slice(&[a.ton, a.npi]);
    cstr(w, &a.addr, max, field)
}

fn put_tlvs(w: &mut Vec<u8>, tlvs: &[Tlv]) -> Result<(), String> {
    for t in tlvs {
        let len = u16::try_from(t.value.len()).map_err(|_| format!("TLV 0x{:04x} is {} octets, over 65535", t.tag, t.value.len()))?;
        w.extend_from_slice(&t.tag.to_be_bytes());
        w.extend_from_slice(&len.to_be_bytes());
        w.extend_from_slice(&t.value);
    }
    Ok(())
}

/// The command_length at the head of `buf`, once 4 bytes are there: an error when it is under
/// the header or over [`MAX_PDU`] (the stream cannot be read on).
pub fn peek_length(buf: &[u8]) -> Result<Option<usize>, PduError> {
    let Some(head) = buf.get(..4) else { return Ok(None) };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if !(HEADER..=MAX_PDU).contains(&len) {
        let sequence = buf.get(12..16).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]));
        return Err(PduError {
            message: format!("a PDU announces command_length {len}, outside {HEADER}..={MAX_PDU}"),
            status: ESME_RINVCMDLEN,
            sequence,
            fatal: true,
        });
    }
    Ok(Some(len))
}

/// Decodes the first PDU of `buf`: `None` while it is incomplete, else the PDU and its length.
pub fn decode(buf: &[u8]) -> Result<Option<(Pdu, usize)>, PduError> {
    let Some(len) = peek_length(buf)? else { return Ok(None) };
    let Some(bytes) = buf.get(..len) else { return Ok(None) };
    decode_one(bytes).map(|p| Some((p, len)))
}

/// Decodes exactly one PDU (its command_length must be `bytes.len()`).
pub fn decode_one(bytes: &[u8]) -> Result<Pdu, PduError> {
    let word = |i: usize| bytes.get(i..i + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]));
    let (Some(len), Some(command_id), Some(status), Some(sequence)) = (word(0), word(4), word(8), word(12)) else {
        return Err(PduError {
            message: format!("a PDU of {} bytes is shorter than its header", bytes.len()),
            status: ESME_RINVCMDLEN,
            sequence: None,
            fatal: true,
        });
    };
    if len as usize != bytes.len() || bytes.len() > MAX_PDU {
        return Err(PduError {
            message: format!("command_length {len} does not match the {} bytes given", bytes.len()),
            status: ESME_RINVCMDLEN,
            sequence: Some(sequence),
            fatal: true,
        });
    }
    let name = command_name(command_id);
    let mut r = Cursor { b: &bytes[HEADER..], pos: 0, name: &name };
    let body =
        read_body(&mut r, command_id, status).map_err(|message| PduError { message, status: ESME_RINVMSGLEN, sequence: Some(sequence), fatal: false })?;
    Ok(Pdu { command_id, status, sequence, body })
}

fn read_body(r: &mut Cursor<'_>, command_id: u32, status: u32) -> Result<Body, String> {
    let body = match command_id {
        BIND_RECEIVER | BIND_TRANSMITTER | BIND_TRANSCEIVER => {
            let b = Bind {
                system_id: r.cstr(SYSTEM_ID, "system_id")?,
                password: r.cstr(PASSWORD, "password")?,
                system_type: r.cstr(SYSTEM_TYPE, "system_type")?,
                interface_version: r.u8("interface_version")?,
                addr_ton: r.u8("addr_ton")?,
                addr_npi: r.u8("addr_npi")?,
                address_range: r.cstr(ADDRESS_RANGE, "address_range")?,
            };
            r.end()?;
            Body::Bind(b)
        }
        c if c == BIND_RECEIVER | RESP || c == BIND_TRANSMITTER | RESP || c == BIND_TRANSCEIVER | RESP => {
            // An error response may come without a body.
            if r.rest() == 0 && status != ESME_ROK {
                Body::BindResp(None, Vec::new())
            } else {
                let id = r.cstr(SYSTEM_ID, "system_id")?;
                Body::BindResp(Some(id), r.tlvs()?)
            }
        }
        UNBIND | ENQUIRE_LINK | GENERIC_NACK => {
            r.end()?;
            Body::Empty
        }
        c if c == UNBIND | RESP || c == ENQUIRE_LINK | RESP => {
            r.end()?;
            Body::Empty
        }
        SUBMIT_SM | DELIVER_SM => {
            let mut sm = Sm {
                service_type: r.cstr(SERVICE_TYPE, "service_type")?,
                source: r.address(ADDR_21, "source_addr")?,
                destination: r.address(ADDR_21, "destination_addr")?,
                esm_class: r.u8("esm_class")?,
                protocol_id: r.u8("protocol_id")?,
                priority_flag: r.u8("priority_flag")?,
                schedule_delivery_time: r.cstr(TIME, "schedule_delivery_time")?,
                validity_period: r.cstr(TIME, "validity_period")?,
                registered_delivery: r.u8("registered_delivery")?,
                replace_if_present_flag: r.u8("replace_if_present_flag")?,
                data_coding: r.u8("data_coding")?,
                sm_default_msg_id: r.u8("sm_default_msg_id")?,
                ..Sm::default()
            };
            let n = r.u8("sm_length")? as usize;
            if n > SHORT_MESSAGE {
                return Err(format!("{}: sm_length {n} is over {SHORT_MESSAGE}", r.name));
            }
            sm.short_message = r.take(n, "short_message")?.to_vec();
            sm.tlvs = r.tlvs()?;
            Body::Sm(Box::new(sm))
        }
        DATA_SM => {
            let d = DataSm {
                service_type: r.cstr(SERVICE_TYPE, "service_type")?,
                source: r.address(ADDR_65, "source_addr")?,
                destination: r.address(ADDR_65, "destination_addr")?,
                esm_class: r.u8("esm_class")?,
                registered_delivery: r.u8("registered_delivery")?,
                data_coding: r.u8("data_coding")?,
                tlvs: r.tlvs()?,
            };
            Body::DataSm(Box::new(d))
        }
        c if c == SUBMIT_SM | RESP || c == DELIVER_SM | RESP || c == DATA_SM | RESP => {
            if r.rest() == 0 {
                Body::SmResp(None, Vec::new())
            } else {
                let id = r.cstr(MESSAGE_ID, "message_id")?;
                Body::SmResp(Some(id), r.tlvs()?)
            }
        }
        _ => Body::Other(r.take(r.rest(), "body")?.to_vec()),
    };
    Ok(body)
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    name: &'a str,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> usize {
        self.b.len() - self.pos
    }

    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], String> {
        let s = self.b.get(self.pos..self.pos + n).ok_or_else(|| format!("{}: the PDU ends inside {field}", self.name))?;
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, field: &str) -> Result<u8, String> {
        Ok(self.take(1, field)?[0])
    }

    /// A C-octet string of at most `max` octets with its NUL.
    fn cstr(&mut self, max: usize, field: &str) -> Result<Vec<u8>, String> {
        let window = &self.b[self.pos..self.b.len().min(self.pos + max)];
        match window.iter().position(|&c| c == 0) {
            Some(i) => {
                let s = window[..i].to_vec();
                self.pos += i + 1;
                Ok(s)
            }
            None if window.len() == max => Err(format!("{}: {field} is longer than its limit of {} octets", self.name, max - 1)),
            None => Err(format!("{}: the PDU ends inside {field} (no NUL)", self.name)),
        }
    }

    fn address(&mut self, max: usize, field: &str) -> Result<Address, String> {
        Ok(Address { ton: self.u8("addr_ton")?, npi: self.u8("addr_npi")?, addr: self.cstr(max, field)? })
    }

    fn tlvs(&mut self) -> Result<Vec<Tlv>, String> {
        let mut out = Vec::new();
        while self.rest() > 0 {
            let head = self.take(4, "a TLV header")?;
            let tag = u16::from_be_bytes([head[0], head[1]]);
            let len = u16::from_be_bytes([head[2], head[3]]) as usize;
            let value = self.take(len, &format!("TLV 0x{tag:04x}"))?.to_vec();
            out.push(Tlv { tag, value });
        }
        Ok(out)
    }

    fn end(&self) -> Result<(), String> {
        match self.rest() {
            0 => Ok(()),
            n => Err(format!("{}: {n} unexpected octets after the body", self.name)),
        }
    }
}

/// The value of the first TLV with `tag`.
pub fn tlv(tlvs: &[Tlv], tag: u16) -> Option<&[u8]> {
    tlvs.iter().find(|t| t.tag == tag).map(|t| t.value.as_slice())
}

/// A TLV as an integer (1, 2 or 4 octets, big-endian).
pub fn tlv_int(tlvs: &[Tlv], tag: u16) -> Option<u32> {
    match tlv(tlvs, tag)? {
        [a] => Some(u32::from(*a)),
        [a, b] => Some(u32::from(u16::from_be_bytes([*a, *b]))),
        [a, b, c, d] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// A C-octet string TLV (receipted_message_id) without its NUL.
pub fn tlv_cstr(tlvs: &[Tlv], tag: u16) -> Option<Vec<u8>> {
    let v = tlv(tlvs, tag)?;
    Some(v.iter().take_while(|&&c| c != 0).copied().collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn round(p: &Pdu) -> Pdu {
        let bytes = p.encode().unwrap();
        let (q, n) = decode(&bytes).unwrap().unwrap();
        assert_eq!(n, bytes.len());
        q
    }

    #[test]
    fn pdus_round_trip() {
        let bind = Pdu::new(
            BIND_TRANSCEIVER,
            7,
            Body::Bind(Bind {
                system_id: b"pmnc".to_vec(),
                password: b"secret".to_vec(),
                system_type: b"t".to_vec(),
                interface_version: 0x34,
                ..Bind::default()
            }),
        );
        assert_eq!(round(&bind), bind);
        let sm = Pdu::new(
            SUBMIT_SM,
            8,
            Body::Sm(Box::new(Sm {
                source: Address { ton: 5, npi: 0, addr: b"Shop".to_vec() },
                destination: Address { ton: 1, npi: 1, addr: b"4912345".to_vec() },
                data_coding: 8,
                short_message: vec![0, 0x41],
                tlvs: vec![Tlv { tag: TAG_USER_MESSAGE_REFERENCE, value: vec![0, 9] }],
                ..Sm::default()
            })),
        );
        assert_eq!(round(&sm), sm);
        let resp = sm.response(ESME_RTHROTTLED, Body::SmResp(None, vec![]));
        assert_eq!(round(&resp), resp);
        let data =
            Pdu::new(DATA_SM, 9, Body::DataSm(Box::new(DataSm { tlvs: vec![Tlv { tag: TAG_MESSAGE_PAYLOAD, value: vec![1; 300] }], ..DataSm::default() })));
        assert_eq!(round(&data), data);
        assert_eq!(tlv_int(&[Tlv { tag: 1, value: vec![1, 2] }], 1), Some(258));
    }

    #[test]
    fn bad_input_is_refused_clearly() {
        assert!(decode(&[0, 0, 0]).unwrap().is_none());
        let e = decode(&[0, 0, 0, 4, 0, 0, 0, 0x15]).unwrap_err();
        assert!(e.fatal && e.message.contains("command_length 4"), "{e}");
        assert!(decode(&[0, 1, 0, 1]).unwrap_err().message.contains("65537"));
        let sm = Pdu::new(SUBMIT_SM, 1, Body::Sm(Box::default()));
        let mut bytes = sm.encode().unwrap();
        bytes.truncate(bytes.len() - 2);
        let n = bytes.len() as u32;
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        let e = decode(&bytes).unwrap_err();
        assert!(!e.fatal && e.message.contains("submit_sm: the PDU ends inside"), "{e}");
        let long = Pdu::new(BIND_TRANSMITTER, 1, Body::Bind(Bind { system_id: vec![b'a'; 16], ..Bind::default() }));
        assert!(long.encode().unwrap_err().contains("system_id is 16 octets, over its limit of 15"));
        // A system_id without its NUL within 16 octets.
        let mut b = Pdu::new(BIND_TRANSMITTER, 1, Body::Bind(Bind::default())).encode().unwrap();
        b.splice(16..17, vec![b'a'; 20]);
        let n = b.len() as u32;
        b[..4].copy_from_slice(&n.to_be_bytes());
        assert!(decode(&b).unwrap_err().message.contains("longer than its limit of 15"));
        assert_eq!(command_name(DELIVER_SM | RESP), "deliver_sm_resp");
        assert!(status_name(ESME_RINVPASWD).contains("ESME_RINVPASWD"));
    }
}
