//! Our message as AMQP carries it, without I/O: the basic properties and the header field
//! table, to and from [`Message`], with field values typed as py-amqp types them. Reading is
//! bounded in depth (a frame can nest tables far deeper than any Celery header) and writing in
//! the length of short strings (which lapin would write unchecked).

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use serde_json::{Map, Number, Value};

use super::{DecodeError, Message, Properties};

/// The longest AMQP short string, in bytes: its length is one byte on the wire. Queue and
/// exchange names, routing keys, header names and the text properties are short strings.
pub const SHORT_STRING_MAX: usize = 255;

/// A text longer than an AMQP short string can hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} of {len} bytes: AMQP takes {SHORT_STRING_MAX} at most")]
pub struct TooLong {
    /// What the text was for: `a queue name`, `a header name`, ...
    pub what: &'static str,
    /// Its length in bytes.
    pub len: usize,
}

/// Deepest nesting of tables and arrays read from a message's headers. Celery's own go two or
/// three levels deep (stamps, canvas options); a frame can carry about 21,800, which this
/// process would follow recursively.
pub const MAX_HEADER_DEPTH: usize = 32;

/// `text` as an AMQP short string, or why it cannot be one: lapin writes a short string's
/// length as one byte without checking it, so a longer one would make a malformed frame that
/// takes the whole shared connection down.
pub fn short(text: &str, what: &'static str) -> Result<ShortString, TooLong> {
    if text.len() > SHORT_STRING_MAX {
        return Err(TooLong {
            what,
            len: text.len(),
        });
    }
    Ok(ShortString::from(text))
}

/// A field table as JSON; `None` when it nests deeper than [`MAX_HEADER_DEPTH`].
pub fn table_to_json(table: &FieldTable) -> Option<Map<String, Value>> {
    table_within(table, MAX_HEADER_DEPTH)
}

/// `table` as JSON if it nests at most `depth` levels (itself included).
fn table_within(table: &FieldTable, depth: usize) -> Option<Map<String, Value>> {
    let depth = depth.checked_sub(1)?;
    table
        .inner()
        .iter()
        .map(|(k, v)| Some((k.as_str().to_string(), amqp_to_json(v, depth)?)))
        .collect()
}

/// AMQP field values as the JSON Celery meant by them, if nested at most `depth` levels.
fn amqp_to_json(value: &AMQPValue, depth: usize) -> Option<Value> {
    let float = |f: f64| Number::from_f64(f).map_or(Value::Null, Value::Number);
    Some(match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::Float(f) => float(f64::from(*f)),
        AMQPValue::Double(f) => float(*f),
        AMQPValue::DecimalValue(d) => float(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => {
            Value::String(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(items) => {
            let depth = depth.checked_sub(1)?;
            Value::Array(
                items
                    .as_slice()
                    .iter()
                    .map(|item| amqp_to_json(item, depth))
                    .collect::<Option<_>>()?,
            )
        }
        AMQPValue::FieldTable(table) => Value::Object(table_within(table, depth)?),
        AMQPValue::Void => Value::Null,
    })
}

/// JSON as the AMQP field values py-amqp would send for it.
pub fn json_to_amqp(value: &Value) -> Result<AMQPValue, TooLong> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(json_to_amqp)
                .collect::<Result<Vec<_>, _>>()?,
        )),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (k, v) in map {
                table.insert(short(k, "a header name")?, json_to_amqp(v)?);
            }
            AMQPValue::FieldTable(table)
        }
    })
}

pub fn properties_of(message: &Message) -> Result<BasicProperties, TooLong> {
    let headers = match json_to_amqp(&Value::Object(message.headers.clone()))? {
        AMQPValue::FieldTable(table) => table,
        _ => FieldTable::default(),
    };
    let p = &message.properties;
    let mut properties = BasicProperties::default()
        .with_content_type(short(&message.content_type, "a content type")?)
        .with_content_encoding(short(&message.content_encoding, "a content encoding")?)
        .with_headers(headers)
        .with_delivery_mode(p.delivery_mode)
        .with_priority(p.priority);
    if let Some(id) = &p.correlation_id {
        properties = properties.with_correlation_id(short(id, "a correlation id")?);
    }
    if let Some(reply_to) = &p.reply_to {
        properties = properties.with_reply_to(short(reply_to, "a reply-to")?);
    }
    if let Some(app_id) = &p.app_id {
        properties = properties.with_app_id(short(app_id, "an app id")?);
    }
    Ok(properties)
}

/// The message a delivery carries, or why not: headers nested deeper than
/// [`MAX_HEADER_DEPTH`] are refused, naming the task id and name when the top level has them.
pub fn message_of(properties: &BasicProperties, body: Vec<u8>) -> Result<Message, DecodeError> {
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_string());
    let headers = match properties.headers() {
        None => Map::new(),
        Some(table) => table_to_json(table).ok_or_else(|| {
            let top = |name: &str| match table.inner().get(name) {
                Some(AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
                _ => None,
            };
            DecodeError {
                task_id: top("id"),
                task: top("task"),
                reason: format!("headers nested deeper than {MAX_HEADER_DEPTH} levels"),
            }
        })?,
    };
    Ok(Message {
        content_type: text(properties.content_type()).unwrap_or_default(),
        content_encoding: text(properties.content_encoding()).unwrap_or_default(),
        headers,
        properties: Properties {
            correlation_id: text(properties.correlation_id()),
            reply_to: text(properties.reply_to()),
            delivery_mode: properties.delivery_mode().unwrap_or(2),
            priority: properties.priority().unwrap_or(0),
            app_id: text(properties.app_id()),
        },
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn headers_survive_the_amqp_field_table() {
        let headers = json!({"task": "tasks.add", "retries": 0, "timelimit": [null, 20.5],
            "ignore_result": false, "stamps": {}, "group": null, "big": 12345678901_i64});
        let table = json_to_amqp(&headers).unwrap();
        assert_eq!(amqp_to_json(&table, MAX_HEADER_DEPTH), Some(headers));
    }

    #[test]
    fn headers_nested_past_the_bound_are_refused() {
        // As many tables as the bound allows, one inside the other.
        let mut nested = json!(1);
        for _ in 0..MAX_HEADER_DEPTH {
            nested = json!({ "n": nested });
        }
        let table = json_to_amqp(&nested).unwrap();
        assert!(amqp_to_json(&table, MAX_HEADER_DEPTH).is_some());
        assert_eq!(amqp_to_json(&table, MAX_HEADER_DEPTH - 1), None);
        let listed = json_to_amqp(&json!([[[1]]])).unwrap();
        assert_eq!(amqp_to_json(&listed, 3), Some(json!([[[1]]])));
        assert_eq!(amqp_to_json(&listed, 2), None);
    }

    #[test]
    fn a_message_survives_its_amqp_properties() {
        let message = Message {
            content_type: "application/json".into(),
            content_encoding: "utf-8".into(),
            headers: json!({"id": "d1", "task": "tasks.add", "retries": 2, "eta": null})
                .as_object()
                .unwrap()
                .clone(),
            properties: Properties {
                correlation_id: Some("d1".into()),
                reply_to: Some("r-1".into()),
                delivery_mode: 2,
                priority: 7,
                app_id: Some("1234".into()),
            },
            body: br#"[[2, 3], {}, {}]"#.to_vec(),
        };
        let properties = properties_of(&message).unwrap();
        assert_eq!(message_of(&properties, message.body.clone()), Ok(message));
    }

    #[test]
    fn overlong_short_strings_are_refused_before_lapin_writes_them() {
        let name = "h".repeat(SHORT_STRING_MAX + 1);
        let error = json_to_amqp(&json!({ name: 1 })).unwrap_err();
        assert_eq!(
            error.to_string(),
            "a header name of 256 bytes: AMQP takes 255 at most"
        );
        let message = Message {
            content_type: "x".repeat(SHORT_STRING_MAX + 1),
            content_encoding: "utf-8".into(),
            headers: Map::new(),
            properties: Properties::default(),
            body: Vec::new(),
        };
        assert_eq!(properties_of(&message).unwrap_err().what, "a content type");
    }

    #[test]
    fn headers_too_deep_are_a_decode_error_naming_the_task() {
        let mut nested = json!(1);
        for _ in 0..MAX_HEADER_DEPTH {
            nested = json!({ "n": nested });
        }
        let headers = json!({"id": "d2", "task": "tasks.add", "deep": nested});
        let properties = BasicProperties::default().with_headers(match json_to_amqp(&headers) {
            Ok(AMQPValue::FieldTable(table)) => table,
            other => panic!("{other:?}"),
        });
        let error = message_of(&properties, Vec::new()).unwrap_err();
        assert_eq!(
            (error.task_id.as_deref(), error.task.as_deref()),
            (Some("d2"), Some("tasks.add"))
        );
    }
}
