//! AMQP field values and JSON, without I/O: message headers as the JSON Celery meant by them
//! and back, as py-amqp types them, bounded in depth (a frame can nest tables far deeper than
//! any Celery header) and in the length of short strings (which lapin would write unchecked).

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Number, Value};

use crate::error::{Error, Result};

/// Deepest nesting of tables and arrays read from a message's headers. Celery's own go two or
/// three levels deep (stamps, canvas options); a frame can carry about 21,800, which this
/// process would follow recursively.
pub const MAX_HEADER_DEPTH: usize = 32;

/// `text` as an AMQP short string, or why it cannot be one: lapin writes a short string's
/// length as one byte without checking it, so a longer one would make a malformed frame that
/// takes the whole shared connection down.
pub fn short(text: &str, what: &str) -> Result<ShortString> {
    if text.len() > super::MAX_NAME_BYTES {
        return Err(Error::InvalidName(format!(
            "{what} of {} bytes: AMQP takes {} at most",
            text.len(),
            super::MAX_NAME_BYTES
        )));
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
pub fn json_to_amqp(value: &Value) -> Result<AMQPValue> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(json_to_amqp).collect::<Result<Vec<_>>>()?,
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
}
