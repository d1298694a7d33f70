//! Celery's stamps: a message names its stamped headers (`stamped_headers`) and carries their
//! values (`stamps`); remote control's `revoke_by_stamped_headers` revokes every task whose
//! stamp takes one of the values it names. Pure: the worker keeps a [`RevokedStamps`] and asks
//! it about each task before the task runs, and one of the revoke's own to find the running
//! tasks to terminate.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Map, Value};

use crate::protocol::TaskRequest;

/// Values kept at most per stamped header; the oldest go first.
const VALUES_MAX: usize = 50_000;

/// A value or a list of values, as a list (Python's `maybe_list`).
fn values(value: &Value) -> Vec<Value> {
    match value {
        Value::Array(many) => many.clone(),
        one => vec![one.clone()],
    }
}

/// The stamps a request carries: each header it names in `stamped_headers` with its value in
/// `stamps` (headers without a value are left out).
pub fn stamps_of(request: &TaskRequest) -> Vec<(String, Value)> {
    let names = request.extra_headers.get("stamped_headers");
    let stamps = request
        .extra_headers
        .get("stamps")
        .and_then(Value::as_object);
    names
        .map(values)
        .unwrap_or_default()
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|name| {
            let value = stamps?.get(name).filter(|v| !v.is_null())?;
            Some((name.to_string(), value.clone()))
        })
        .collect()
}

/// The `stamped_headers` and `stamps` headers for a task sent with canvas `options`, where a
/// stamp's value is the option of its header's name, as Celery's client writes them; `None`
/// when the options stamp nothing.
pub fn stamp_headers(options: &Map<String, Value>) -> Option<(Value, Value)> {
    let names = values(options.get("stamped_headers").filter(|n| !n.is_null())?);
    let stamps: Map<String, Value> = names
        .iter()
        .filter_map(Value::as_str)
        .map(|name| {
            let value = options.get(name).cloned().unwrap_or(Value::Null);
            (name.to_string(), value)
        })
        .collect();
    Some((Value::Array(names), Value::Object(stamps)))
}

/// The stamp values revoked so far, per header. Revokes only add, as in Celery.
#[derive(Debug, Default)]
pub struct RevokedStamps {
    by_header: BTreeMap<String, VecDeque<Value>>,
}

impl RevokedStamps {
    /// Revokes the values `headers` names (header to a value or a list of values).
    pub fn revoke(&mut self, headers: &Map<String, Value>) {
        for (header, revoked) in headers {
            let kept = self.by_header.entry(header.clone()).or_default();
            kept.extend(values(revoked));
            while kept.len() > VALUES_MAX {
                kept.pop_front();
            }
        }
    }

    /// The stamps of `request` that are revoked, as `(header, value)`: a stamp is revoked when
    /// its value, or one of its values, is among its header's revoked values.
    pub fn matches(&self, request: &TaskRequest) -> Vec<(String, Value)> {
        stamps_of(request)
            .into_iter()
            .flat_map(|(header, stamp)| {
                let revoked = self.by_header.get(&header);
                values(&stamp)
                    .into_iter()
                    .filter(move |value| revoked.is_some_and(|r| r.contains(value)))
                    .map(move |value| (header.clone(), value))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stamped(headers: Value, stamps: Value) -> TaskRequest {
        let mut request = TaskRequest::new("t.add", vec![], Map::new());
        request
            .extra_headers
            .insert("stamped_headers".into(), headers);
        request.extra_headers.insert("stamps".into(), stamps);
        request
    }

    fn map(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_stamp_is_revoked_by_its_value_or_one_of_its_values() {
        let mut revoked = RevokedStamps::default();
        let one = stamped(json!(["monitoring_id"]), json!({"monitoring_id": "m1"}));
        let many = stamped(
            json!(["monitoring_id"]),
            json!({"monitoring_id": [7, "m2"]}),
        );
        assert!(revoked.matches(&one).is_empty());
        revoked.revoke(&map(json!({"monitoring_id": ["m1"]})));
        assert_eq!(
            revoked.matches(&one),
            vec![("monitoring_id".into(), json!("m1"))]
        );
        assert!(revoked.matches(&many).is_empty());
        revoked.revoke(&map(json!({"monitoring_id": 7})));
        assert_eq!(
            revoked.matches(&many),
            vec![("monitoring_id".into(), json!(7))]
        );
        // Only the headers a message names as stamped count.
        let unnamed = stamped(json!([]), json!({"monitoring_id": "m1"}));
        assert!(revoked.matches(&unnamed).is_empty());
        assert!(revoked.matches(&stamped(Value::Null, json!({}))).is_empty());
    }

    #[test]
    fn matches_names_each_revoked_stamp() {
        let request = stamped(json!(["a", "b"]), json!({"a": [1, 2, 3], "b": "x"}));
        let mut revoked = RevokedStamps::default();
        revoked.revoke(&map(json!({"a": [2, 3], "b": "y"})));
        assert_eq!(
            revoked.matches(&request),
            vec![("a".to_string(), json!(2)), ("a".to_string(), json!(3))]
        );
    }

    #[test]
    fn canvas_options_become_the_stamp_headers() {
        let options = map(
            json!({"stamped_headers": ["monitoring_id"], "monitoring_id": "m1",
                                 "queue": "q"}),
        );
        assert_eq!(
            stamp_headers(&options),
            Some((json!(["monitoring_id"]), json!({"monitoring_id": "m1"})))
        );
        assert_eq!(stamp_headers(&map(json!({"queue": "q"}))), None);
    }
}
