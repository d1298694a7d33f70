//! kombu's layout of a Redis broker, as data: which keys hold a queue's messages (one list per
//! priority step), the binding table of an exchange, the PUB/SUB channels of fanout exchanges,
//! and the `unacked` records a visibility timeout restores from. Python's kombu and our worker
//! share one database, so every name here is kombu's, byte for byte.

use serde_json::{Map, Value};

/// kombu's separator inside key names and binding members.
pub const SEP: &str = "\x06\x16";
/// kombu's priority steps; a message goes to the list of the largest step not above its priority.
pub const PRIORITY_STEPS: [u8; 4] = [0, 3, 6, 9];
/// The hash of delivered, unacked messages: delivery tag to `[envelope, exchange, routing_key]`.
pub const UNACKED: &str = "unacked";
/// The sorted set of unacked delivery tags, scored by delivery time.
pub const UNACKED_INDEX: &str = "unacked_index";
/// The lock one restorer holds while it puts back what outlived its visibility timeout.
pub const UNACKED_MUTEX: &str = "unacked_mutex";

/// The list holding messages of `priority` for `queue`.
pub fn list_for(queue: &str, priority: u8) -> String {
    let step = PRIORITY_STEPS
        .iter()
        .rev()
        .find(|&&s| s <= priority)
        .copied()
        .unwrap_or(0);
    if step == 0 {
        queue.to_string()
    } else {
        format!("{queue}{SEP}{step}")
    }
}

/// The order kombu's BRPOP takes lists in: every queue's top-priority list first.
pub fn fetch_order(queues: &[String]) -> Vec<String> {
    PRIORITY_STEPS
        .iter()
        .flat_map(|&step| queues.iter().map(move |q| list_for(q, step)))
        .collect()
}

/// The queue a list of [`list_for`] belongs to.
pub fn queue_of(list: &str) -> &str {
    list.split(SEP).next().unwrap_or(list)
}

/// The set listing the queues bound to `exchange`.
pub fn binding_key(exchange: &str) -> String {
    format!("_kombu.binding.{exchange}")
}

/// The set kombu keeps of `queue`'s own binding, which a queue deletion does not remove.
pub fn permanent_binding_key(queue: &str) -> String {
    format!("_kombu.binding_permanent.{queue}")
}

/// A member of a binding set: `queue` bound with `routing_key` (no pattern).
pub fn binding_member(routing_key: &str, queue: &str) -> String {
    format!("{routing_key}{SEP}{SEP}{queue}")
}

/// The queue a binding `member` names, if it is bound with `routing_key`.
pub fn bound_queue<'a>(member: &'a str, routing_key: &str) -> Option<&'a str> {
    let mut fields = member.split(SEP);
    let key = fields.next()?;
    let queue = fields.nth(1)?;
    (key == routing_key).then_some(queue)
}

/// The PUB/SUB channel kombu uses for a fanout or topic `exchange`: prefixed with the database
/// number `db`, because channels are not scoped by database.
pub fn fanout_channel(db: i64, exchange: &str, routing_key: &str) -> String {
    match routing_key {
        "" => format!("/{db}.{exchange}"),
        key => format!("/{db}.{exchange}/{key}"),
    }
}

/// From an `unacked` entry `[envelope, exchange, routing_key]`: the list to put it back on and
/// the envelope marked redelivered, or why it cannot be. Only direct-to-queue entries (exchange
/// `""`, as Celery publishes tasks) are restorable without the publisher's exchange table.
pub fn redelivered(entry: &str) -> Result<(String, String), String> {
    let unreadable = || "not [envelope, exchange, routing_key]".to_string();
    let Ok(Value::Array(mut parts)) = serde_json::from_str(entry) else {
        return Err(unreadable());
    };
    let routing_key = parts
        .get(2)
        .and_then(Value::as_str)
        .ok_or_else(unreadable)?
        .to_string();
    let exchange = parts
        .get(1)
        .and_then(Value::as_str)
        .ok_or_else(unreadable)?;
    if !exchange.is_empty() {
        return Err(format!("published through the named exchange {exchange:?}"));
    }
    let envelope = parts
        .get_mut(0)
        .and_then(Value::as_object_mut)
        .ok_or_else(unreadable)?;
    let priority = envelope["properties"]["priority"]
        .as_u64()
        .unwrap_or(0)
        .min(255) as u8;
    mark_redelivered(envelope);
    Ok((
        list_for(&routing_key, priority),
        Value::Object(envelope.clone()).to_string(),
    ))
}

/// An envelope given back to its queue (a reject with requeue), marked redelivered as kombu
/// marks what it puts back; `None` when `raw` is no envelope.
pub fn requeued(raw: &[u8]) -> Option<String> {
    let Ok(Value::Object(mut envelope)) = serde_json::from_slice(raw) else {
        return None;
    };
    mark_redelivered(&mut envelope);
    Some(Value::Object(envelope).to_string())
}

/// Sets `redelivered` where kombu reads it: the headers and the delivery info.
fn mark_redelivered(envelope: &mut Map<String, Value>) {
    if let Some(headers) = envelope.get_mut("headers").and_then(Value::as_object_mut) {
        headers.insert("redelivered".into(), true.into());
    }
    if let Some(info) = envelope
        .get_mut("properties")
        .and_then(|p| p.get_mut("delivery_info"))
        .and_then(Value::as_object_mut)
    {
        info.insert("redelivered".into(), true.into());
    }
}

/// The delivery tag under which [`POP_AND_RECORD`] recorded an envelope Rust cannot decode.
pub fn recorded_tag(raw: &[u8]) -> Option<String> {
    let envelope: Value = serde_json::from_slice(raw).ok()?;
    let properties = envelope.get("properties")?;
    properties.get("delivery_info")?.as_object()?;
    Some(properties.get("delivery_tag")?.as_str()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_map_to_kombus_lists() {
        assert_eq!(list_for("celery", 0), "celery");
        assert_eq!(list_for("celery", 2), "celery");
        assert_eq!(list_for("celery", 5), "celery\x06\x163");
        assert_eq!(list_for("celery", 9), "celery\x06\x169");
        assert_eq!(list_for("celery", 255), "celery\x06\x169");
        let keys = fetch_order(&["a".into(), "b".into()]);
        assert_eq!(
            keys[..3],
            ["a".to_string(), "b".into(), "a\x06\x163".into()]
        );
        assert_eq!(keys.len(), 8);
    }

    #[test]
    fn bindings_and_channels_are_kombus() {
        let member = binding_member("celery", "celery");
        assert_eq!(member, "celery\x06\x16\x06\x16celery");
        assert_eq!(bound_queue(&member, "celery"), Some("celery"));
        assert_eq!(bound_queue(&member, "other"), None);
        assert_eq!(binding_key("celery.pidbox"), "_kombu.binding.celery.pidbox");
        assert_eq!(
            fanout_channel(3, "celeryev", "worker.heartbeat"),
            "/3.celeryev/worker.heartbeat"
        );
        assert_eq!(fanout_channel(0, "celery.pidbox", ""), "/0.celery.pidbox");
        assert_eq!(queue_of("celery\x06\x169"), "celery");
    }

    #[test]
    fn an_unacked_entry_goes_back_to_its_priority_list_marked_redelivered() {
        let envelope = r#"{"body": "e30=", "headers": {"id": "t1"}, "properties": {"priority": 6,
            "delivery_tag": "tag-1", "delivery_info": {"exchange": "", "routing_key": "q"}}}"#;
        let entry = format!(r#"[{envelope}, "", "q"]"#);
        let (list, restored) = redelivered(&entry).unwrap();
        assert_eq!(list, "q\x06\x166");
        let restored: Value = serde_json::from_str(&restored).unwrap();
        assert_eq!(restored["headers"]["redelivered"], true);
        assert_eq!(restored["properties"]["delivery_info"]["redelivered"], true);
        assert_eq!(recorded_tag(envelope.as_bytes()).as_deref(), Some("tag-1"));
        let named = format!(r#"[{envelope}, "direct-x", "q"]"#);
        assert!(redelivered(&named).unwrap_err().contains("direct-x"));
        assert!(redelivered("[1]").is_err());
    }

    #[test]
    fn a_requeued_envelope_is_marked_redelivered() {
        let envelope = br#"{"body": "e30=", "headers": {"id": "t1"}, "properties": {
            "delivery_tag": "tag-1", "delivery_info": {"exchange": "", "routing_key": "q"}}}"#;
        let back: Value = serde_json::from_str(&requeued(envelope).unwrap()).unwrap();
        assert_eq!(back["headers"]["redelivered"], true);
        assert_eq!(back["properties"]["delivery_info"]["redelivered"], true);
        assert_eq!(requeued(b"[1]"), None);
    }
}
