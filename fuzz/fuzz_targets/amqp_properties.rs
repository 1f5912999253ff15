//! AMQP 0-9-1 message properties as a broker delivers them (the property list of a content
//! header frame, decoded by lapin's parser) through the conversions the amqp interface hands to
//! Lua. Properties: the conversion never asks for far more memory than the input's size; a table
//! nested past the value model's depth is an error, not a crash; what it gives, read back as the
//! properties of a publish and converted again, is stable after one normalisation (defaults such
//! as delivery_mode 2 are added once, never drift).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_resource_amqp::lapin::protocol::basic::parse_properties;
use rustomnic_resource_amqp::wire::{properties_from_value, properties_to_value};

fuzz_target!(|data: &[u8]| {
    let Ok((_, properties)) = parse_properties(data) else { return };
    let Ok(first) = bounded("properties_to_value", data.len(), || properties_to_value(&properties)) else { return };
    // Values from the wire that a publish refuses (delivery_mode 3, a header name over 255
    // bytes cannot happen: the wire's names are short strings) end the trip here; the error
    // must name the property.
    let again = match properties_from_value(Some(&first)) {
        Ok(o) => o,
        Err(e) => {
            assert!(e.contains("properties"), "an error that does not say where: {e}");
            return;
        }
    };
    let second = properties_to_value(&again.properties).expect("properties we built convert");
    let third = properties_to_value(&properties_from_value(Some(&second)).expect("a normal form reads back").properties).expect("converts");
    // Compared as printed: a NaN from the wire is the same NaN both times, which `==` denies.
    assert_eq!(format!("{second:?}"), format!("{third:?}"), "not stable after one normalisation");
});
