//! MQTT 5 PUBLISH packets as a broker sends them (decoded by rumqttc's packet reader with the
//! interface's size limit) through the conversions the mqtt interface hands to Lua: the message
//! table and its properties. Properties: no packet decoded under the limit makes the message
//! table cost far more than the packet; the body and topic arrive byte for byte; the properties
//! table read back as the properties of a publish converts to the same table (a user property
//! sent twice keeps its last value, once), or the error names the property.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::{bounded, Choices};
use rustomnic_mqtt::message_value;
use rustomnic_resource_mqtt::client::Incoming;
use rustomnic_resource_mqtt::lua::{properties_from_value, properties_to_value};
use rustomnic_resource_mqtt::rumqttc::v5::mqttbytes::v5::Packet;
use rustomnic_core::Value;

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let limit = 16 + u32::from(c.u16());
    let mut stream = bytes::BytesMut::from(c.rest());
    let len = stream.len();
    let Ok(Packet::Publish(p)) = Packet::read(&mut stream, Some(limit)) else { return };
    let (topic, payload) = (p.topic.clone(), p.payload.clone());
    assert!(topic.len() + payload.len() <= len, "a packet holds more than it was sent");
    let m = Incoming::from_v5(p);
    let table = bounded("message_value", len, || message_value(&m, 1));
    let Value::Map(fields) = &table else { panic!("the message is a table") };
    let field = |name: &str| fields.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v);
    assert_eq!(field("body"), Some(&Value::Str(payload.to_vec())));
    assert_eq!(field("topic"), Some(&Value::Str(topic.to_vec())));
    let Some(properties) = &m.properties else { return };
    let first = properties_to_value(properties);
    match properties_from_value(&first) {
        Ok(back) => assert_eq!(properties_to_value(&back), first, "the properties table does not round-trip"),
        Err(e) => assert!(e.contains("properties"), "an error that does not say where: {e}"),
    }
});
