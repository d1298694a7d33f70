//! Property tests over everything that reads bytes from the wire: whatever arrives, decoding
//! answers Ok or Err and never panics. `make fuzz` runs many more cases (`PROPTEST_CASES`).

use proptest::prelude::*;
use runtime::protocol::envelope;
use runtime::protocol::message::TASK_HEADERS;
use runtime::protocol::{Message, Properties, TaskRequest};
use serde_json::{json, Map, Value};

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Headers close to Celery's, with any values, so decoding gets past the first checks.
fn headers() -> impl Strategy<Value = Map<String, Value>> {
    let names = prop::sample::select(TASK_HEADERS);
    prop::collection::btree_map(names, json_value(), 0..8)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn message(headers: Map<String, Value>, body: Vec<u8>, content_type: &str) -> Message {
    Message {
        content_type: content_type.into(),
        content_encoding: "utf-8".into(),
        headers,
        properties: Properties::default(),
        body,
    }
}

proptest! {
    #[test]
    fn task_messages_of_any_bytes_never_panic(headers in headers(), body in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = TaskRequest::decode(&message(headers, body, "application/json"));
    }

    #[test]
    fn task_messages_of_any_json_never_panic(headers in headers(), body in json_value()) {
        let body = serde_json::to_vec(&body).unwrap();
        let _ = TaskRequest::decode(&message(headers, body, "application/json"));
    }

    #[test]
    fn v2_shaped_messages_with_any_fields_never_panic(
        headers in headers(), args in json_value(), kwargs in json_value(), embed in json_value(),
    ) {
        let mut headers = headers;
        headers.insert("task".into(), json!("tasks.add"));
        headers.insert("id".into(), json!("0c6daa40-2d78-42d5-a1ac-1b190ca917c4"));
        let body = serde_json::to_vec(&json!([args, kwargs, embed])).unwrap();
        if let Ok(request) = TaskRequest::decode(&message(headers, body, "application/json")) {
            // What decodes must encode and decode again to the same call.
            let again = TaskRequest::decode(&request.encode()).unwrap();
            prop_assert_eq!((again.args, again.kwargs), (request.args, request.kwargs));
        }
    }

    #[test]
    fn redis_envelopes_of_any_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = envelope::decode(&bytes);
    }

    #[test]
    fn redis_envelopes_of_any_json_never_panic(value in json_value()) {
        let _ = envelope::decode(&serde_json::to_vec(&value).unwrap());
    }
}
