//! kombu's JSON envelope: how a message is stored as one string in a Redis list.
//!
//! Python workers read `properties.delivery_info.exchange` and `.routing_key` when they ack, so
//! every envelope we write carries both (rusty-celery's lack of them loses messages).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::message::{DecodeError, Message, Properties};

/// Where a message was published: exchange `""` means straight to the queue named by the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeliveryInfo {
    /// The exchange name.
    pub exchange: String,
    /// The routing key (the queue name for direct publishing).
    pub routing_key: String,
    /// Given back after an earlier delivery (kombu marks what it restores or requeues).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub redelivered: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct EnvelopeProperties {
    #[serde(flatten)]
    basic: Properties,
    delivery_info: DeliveryInfo,
    #[serde(default)]
    body_encoding: Option<String>,
    delivery_tag: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    body: String,
    #[serde(rename = "content-encoding", default)]
    content_encoding: Option<String>,
    #[serde(rename = "content-type", default)]
    content_type: Option<String>,
    #[serde(default)]
    headers: Option<Map<String, Value>>,
    properties: EnvelopeProperties,
}

/// A message read from a Redis list, with its ack handle and route.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The decoded message.
    pub message: Message,
    /// The envelope's `delivery_tag`, the key of the `unacked` hash entry.
    pub delivery_tag: String,
    /// The envelope's `delivery_info`.
    pub delivery_info: DeliveryInfo,
}

/// Encodes `message` for publishing with a fresh delivery tag; returns (tag, envelope JSON).
pub fn encode(message: &Message, delivery_info: DeliveryInfo) -> (String, String) {
    let delivery_tag = uuid::Uuid::new_v4().to_string();
    let envelope = Envelope {
        body: BASE64.encode(&message.body),
        content_encoding: Some(message.content_encoding.clone()),
        content_type: Some(message.content_type.clone()),
        headers: Some(message.headers.clone()),
        properties: EnvelopeProperties {
            basic: message.properties.clone(),
            delivery_info,
            body_encoding: Some("base64".into()),
            delivery_tag: delivery_tag.clone(),
        },
    };
    let text = serde_json::to_string(&envelope).expect("envelopes always serialize");
    (delivery_tag, text)
}

/// Decodes an envelope as kombu writes it.
pub fn decode(text: &[u8]) -> Result<Received, DecodeError> {
    let envelope: Envelope = serde_json::from_slice(text)
        .map_err(|e| DecodeError::new(format!("not a kombu envelope: {e}")))?;
    let body = match envelope.properties.body_encoding.as_deref() {
        Some("base64") => BASE64
            .decode(envelope.body.as_bytes())
            .map_err(|e| DecodeError::new(format!("body is not valid base64: {e}")))?,
        _ => envelope.body.into_bytes(),
    };
    Ok(Received {
        message: Message {
            content_type: envelope.content_type.unwrap_or_default(),
            content_encoding: envelope.content_encoding.unwrap_or_default(),
            headers: envelope.headers.unwrap_or_default(),
            properties: envelope.properties.basic,
            body,
        },
        delivery_tag: envelope.properties.delivery_tag,
        delivery_info: envelope.properties.delivery_info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The envelope Celery 5.7 LPUSHed for `add.apply_async((2, 3))`.
    const CAPTURED: &str = r#"{"body": "W1syLCAzXSwge30sIHsiY2FsbGJhY2tzIjogbnVsbCwgImVycmJhY2tzIjogbnVsbCwgImNoYWluIjogbnVsbCwgImNob3JkIjogbnVsbH1d",
 "content-encoding": "utf-8", "content-type": "application/json",
 "headers": {"lang": "py", "task": "add", "id": "bba8fac3-976c-486b-ba7a-797c191ed034", "retries": 0},
 "properties": {"correlation_id": "bba8fac3-976c-486b-ba7a-797c191ed034",
   "reply_to": "d31d5bf5-1bb0-3c67-830a-cfdbb097fff5", "delivery_mode": 2,
   "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0,
   "body_encoding": "base64", "delivery_tag": "2e9c266b-e4b7-4914-a327-109d118a1085"}}"#;

    #[test]
    fn decodes_a_captured_envelope() {
        let received = decode(CAPTURED.as_bytes()).unwrap();
        assert_eq!(
            received.delivery_tag,
            "2e9c266b-e4b7-4914-a327-109d118a1085"
        );
        assert_eq!(received.delivery_info.routing_key, "celery");
        assert_eq!(
            received.message.body,
            br#"[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#
        );
        assert_eq!(
            received.message.properties.reply_to.as_deref(),
            Some("d31d5bf5-1bb0-3c67-830a-cfdbb097fff5")
        );
    }

    #[test]
    fn encoded_envelopes_carry_what_python_workers_read() {
        let message = decode(CAPTURED.as_bytes()).unwrap().message;
        let info = DeliveryInfo {
            exchange: String::new(),
            routing_key: "q1".into(),
            redelivered: false,
        };
        let (tag, text) = encode(&message, info.clone());
        let raw: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(raw["properties"]["delivery_info"]["exchange"], "");
        assert_eq!(raw["properties"]["delivery_info"]["routing_key"], "q1");
        assert_eq!(raw["properties"]["body_encoding"], "base64");
        let back = decode(text.as_bytes()).unwrap();
        assert_eq!(
            (back.message, back.delivery_tag, back.delivery_info),
            (message, tag, info)
        );
    }

    #[test]
    fn kombus_app_id_and_redelivered_are_read() {
        let text = CAPTURED.replace(
            r#""delivery_info": {"exchange": "", "routing_key": "celery"}"#,
            r#""app_id": "1234", "delivery_info": {"exchange": "", "routing_key": "celery", "redelivered": true}"#,
        );
        let received = decode(text.as_bytes()).unwrap();
        assert_eq!(received.message.properties.app_id.as_deref(), Some("1234"));
        assert!(received.delivery_info.redelivered);
        let (_, again) = encode(&received.message, DeliveryInfo::default());
        let raw: Value = serde_json::from_str(&again).unwrap();
        assert_eq!(raw["properties"]["app_id"], "1234");
        assert!(raw["properties"]["delivery_info"]
            .get("redelivered")
            .is_none());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode(b"{").is_err());
        assert!(decode(br#"{"body": "x"}"#).is_err());
    }
}
