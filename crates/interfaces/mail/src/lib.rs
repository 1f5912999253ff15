//! The mail interfaces: `smtp` (a cage receives mail over ESMTP, smtp.rs) and `imap` (a cage
//! polls a mailbox, imap.rs). Each message is one request; both hand the handler the same table,
//! made in one place (message.rs, with mail-parser). The keys of each interface are documented
//! in its module and on docs/interfaces/smtp.md and docs/interfaces/imap.md; the choices in
//! docs/decisions/136-mail-in.md.

pub mod imap;
pub mod message;
pub mod smtp;
pub mod wire;

use rustomnic_core::Section;

pub use imap::ImapProtocol;
pub use smtp::SmtpProtocol;

/// The keys of the message limits both interfaces have.
pub const LIMIT_KEYS: &[&str] = &["max_message_size", "max_parts", "max_depth", "max_headers"];

/// The largest `max_message_size` a config may set.
const MAX_MESSAGE_SIZE_LIMIT: u64 = 256 << 20;

/// Reads `max_message_size`, `max_parts`, `max_depth` and `max_headers` (problems recorded).
pub fn read_limits(section: &Section) -> message::Limits {
    let d = message::Limits::default();
    message::Limits {
        max_size: section.size("max_message_size", MAX_MESSAGE_SIZE_LIMIT).map(|v| v.value as usize).unwrap_or(d.max_size),
        max_parts: section.integer("max_parts", 1, 10_000).map(|v| v.value as usize).unwrap_or(d.max_parts),
        max_depth: section.integer("max_depth", 1, 100).map(|v| v.value as usize).unwrap_or(d.max_depth),
        max_headers: section.integer("max_headers", 1, 10_000).map(|v| v.value as usize).unwrap_or(d.max_headers),
    }
}

/// For the fuzz targets: the conversion and the SMTP reading as the interfaces run them.
pub mod fuzzing {
    pub use crate::message::{to_value, Limits};
    pub use crate::wire::{parse, stuff, DataDecoder, Fed, Line, Lines};
}
