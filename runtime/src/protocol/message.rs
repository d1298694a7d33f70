//! The message every transport carries, and the task request inside it.
//!
//! [`Message`] is what kombu calls a message: content type and encoding, a header map, AMQP-like
//! properties and the body bytes. [`TaskRequest`] is a task invocation decoded from one (protocol
//! v2, or v1 from Celery 3 era clients) and encoded back into one when we send tasks.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::repr::{repr, repr_args};

/// The JSON content type, the only serializer we accept.
pub const JSON: &str = "application/json";

/// AMQP basic properties that Celery sets on task messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties {
    /// Equals the task id for task messages.
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// The sender's reply queue (only the rpc:// backend uses it).
    #[serde(default)]
    pub reply_to: Option<String>,
    /// 2 = persistent, 1 = transient.
    #[serde(default = "persistent")]
    pub delivery_mode: u8,
    /// 0-255; Celery uses 0-9.
    #[serde(default)]
    pub priority: u8,
    /// The sending application, as its client names it (`apply_async(app_id=...)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<String>,
}

fn persistent() -> u8 {
    2
}

impl Default for Properties {
    fn default() -> Self {
        Self {
            correlation_id: None,
            reply_to: None,
            delivery_mode: persistent(),
            priority: 0,
            app_id: None,
        }
    }
}

/// A message as kombu models it, independent of the broker it travelled through.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// e.g. `application/json`.
    pub content_type: String,
    /// e.g. `utf-8`.
    pub content_encoding: String,
    /// Application headers; protocol v2 keeps the task metadata here.
    pub headers: Map<String, Value>,
    /// Basic properties.
    pub properties: Properties,
    /// The serialized body.
    pub body: Vec<u8>,
}

impl Message {
    /// When the task is to run, for a protocol v2 task message that says (an unreadable time
    /// counts as none here; decoding the request reports it).
    pub fn eta(&self) -> Option<DateTime<Utc>> {
        time(&self.headers, "eta").ok().flatten()
    }
}

/// Why a message could not be turned into a task request; carries the id when it was readable,
/// so a FAILURE can still be stored for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    /// The task id, when the message got far enough to name one.
    pub task_id: Option<String>,
    /// The task name, when known.
    pub task: Option<String>,
    /// What was wrong, for logs and the stored exception.
    pub reason: String,
}

impl DecodeError {
    /// An error for a message whose id and name are unknown.
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            task_id: None,
            task: None,
            reason: reason.into(),
        }
    }
}

/// One task invocation: what to run, with what, and the workflow fields to carry along.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRequest {
    /// Task id (UUID text).
    pub id: String,
    /// Registered task name.
    pub task: String,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments.
    pub kwargs: Map<String, Value>,
    /// `{callbacks, errbacks, chain, chord}`, kept as sent.
    pub embed: Value,
    /// Do not run before this time.
    pub eta: Option<DateTime<Utc>>,
    /// Do not run after this time.
    pub expires: Option<DateTime<Utc>>,
    /// Retries so far.
    pub retries: u32,
    /// First task of the workflow.
    pub root_id: Option<String>,
    /// Task that sent this one.
    pub parent_id: Option<String>,
    /// Group (or chord) id.
    pub group: Option<String>,
    /// Position in the group.
    pub group_index: Option<u64>,
    /// Store no result.
    pub ignore_result: bool,
    /// `[hard, soft]` seconds.
    pub timelimit: (Option<f64>, Option<f64>),
    /// Node name of the sender.
    pub origin: Option<String>,
    /// Message properties (reply_to, priority...).
    pub properties: Properties,
    /// Headers not interpreted here (user headers, stamps...), carried through on resend.
    pub extra_headers: Map<String, Value>,
    /// Whether the broker delivered this message before (Celery's
    /// `delivery_info['redelivered']`): the worker sets it from the delivery; never sent.
    pub redelivered: bool,
}

/// The header counting the replacements that led to a task (`Task.replace`).
pub const REPLACED_TASK_NESTING: &str = "replaced_task_nesting";

/// Headers this module reads or writes itself; the rest are carried as `extra_headers` (the
/// fuzzers pick from these, so that what they send gets past the first checks).
pub const TASK_HEADERS: &[&str] = &[
    "compression",
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
];

impl TaskRequest {
    /// A fresh request for `task` with a new id, as a client sends it.
    pub fn new(task: impl Into<String>, args: Vec<Value>, kwargs: Map<String, Value>) -> Self {
        let id = uuid::Uuid::new_v4().to_string();
        Self {
            root_id: Some(id.clone()),
            id,
            task: task.into(),
            args,
            kwargs,
            embed: json!({"callbacks": null, "errbacks": null, "chain": null, "chord": null}),
            eta: None,
            expires: None,
            retries: 0,
            parent_id: None,
            group: None,
            group_index: None,
            ignore_result: false,
            timelimit: (None, None),
            origin: None,
            properties: Properties::default(),
            extra_headers: Map::new(),
            redelivered: false,
        }
    }

    /// How many replacements led to this task: its `replaced_task_nesting` header, else 0.
    pub fn replaced_task_nesting(&self) -> u64 {
        self.extra_headers
            .get(REPLACED_TASK_NESTING)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// Decodes a task message the way a Celery worker tells the protocols apart: a `task`
    /// header means v2; otherwise a JSON object body with a `task` key is v1.
    pub fn decode(message: &Message) -> Result<Self, DecodeError> {
        let headers = &message.headers;
        let id = headers.get("id").and_then(Value::as_str).map(str::to_owned);
        let task = headers
            .get("task")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let fail = |reason: String| DecodeError {
            task_id: id.clone(),
            task: task.clone(),
            reason,
        };

        if message.content_type != JSON {
            return Err(fail(format!(
                "content type {:?} refused: only {JSON} is accepted",
                message.content_type
            )));
        }
        let compression = headers.get("compression").and_then(Value::as_str);
        let body = decompress(compression, &message.body).map_err(&fail)?;
        let body: Value = serde_json::from_slice(&body)
            .map_err(|e| fail(format!("body is not valid JSON: {e}")))?;

        match (task.is_some(), body) {
            (true, Value::Array(parts)) => Self::decode_v2(message, parts).map_err(fail),
            (false, Value::Object(fields)) if fields.contains_key("task") => {
                Self::decode_v1(message, fields).map_err(|reason| DecodeError {
                    task_id: None,
                    task: None,
                    reason,
                })
            }
            (true, _) => Err(fail(
                "protocol v2 body must be [args, kwargs, embed]".into(),
            )),
            (false, _) => Err(fail(
                "not a task message: no task header and no v1 body".into(),
            )),
        }
    }

    fn decode_v2(message: &Message, parts: Vec<Value>) -> Result<Self, String> {
        let h = &message.headers;
        let id = string(h, "id")?.ok_or("the id header is missing")?;
        let task = string(h, "task")?.ok_or("the task header is missing")?;
        let [args, kwargs, embed]: [Value; 3] = parts
            .try_into()
            .map_err(|p: Vec<Value>| format!("body has {} elements, expected 3", p.len()))?;
        let Value::Array(args) = args else {
            return Err("args must be a list".into());
        };
        let Value::Object(kwargs) = kwargs else {
            return Err("kwargs must be a mapping".into());
        };
        if !(embed.is_object() || embed.is_null()) {
            return Err("embed must be a mapping".into());
        }
        let timelimit = match h.get("timelimit") {
            Some(Value::Array(pair)) if pair.len() == 2 => (pair[0].as_f64(), pair[1].as_f64()),
            _ => (None, None),
        };
        Ok(Self {
            eta: time(h, "eta")?,
            expires: time(h, "expires")?,
            retries: h.get("retries").and_then(Value::as_u64).unwrap_or(0) as u32,
            root_id: string(h, "root_id")?,
            parent_id: string(h, "parent_id")?,
            group: string(h, "group")?,
            group_index: h.get("group_index").and_then(Value::as_u64),
            ignore_result: h
                .get("ignore_result")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            timelimit,
            origin: string(h, "origin")?,
            properties: message.properties.clone(),
            extra_headers: h
                .iter()
                .filter(|(k, _)| !TASK_HEADERS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            redelivered: false,
            id,
            task,
            args,
            kwargs,
            embed,
        })
    }

    fn decode_v1(message: &Message, body: Map<String, Value>) -> Result<Self, String> {
        let id = string(&body, "id")?.ok_or("v1 body has no id")?;
        let task = string(&body, "task")?.ok_or("v1 body has no task")?;
        let args = match body.get("args") {
            Some(Value::Array(args)) => args.clone(),
            None | Some(Value::Null) => Vec::new(),
            Some(_) => return Err("args must be a list".into()),
        };
        let kwargs = match body.get("kwargs") {
            Some(Value::Object(kwargs)) => kwargs.clone(),
            None | Some(Value::Null) => Map::new(),
            Some(_) => return Err("kwargs must be a mapping".into()),
        };
        let embed = json!({
            "callbacks": body.get("callbacks").cloned().unwrap_or(Value::Null),
            "errbacks": body.get("errbacks").cloned().unwrap_or(Value::Null),
            "chain": null,
            "chord": body.get("chord").cloned().unwrap_or(Value::Null),
        });
        let mut request = Self::new(task, args, kwargs);
        request.root_id = Some(id.clone());
        request.id = id;
        request.eta = time(&body, "eta")?;
        request.expires = time(&body, "expires")?;
        request.retries = body.get("retries").and_then(Value::as_u64).unwrap_or(0) as u32;
        request.group = string(&body, "group")?.or(string(&body, "taskset")?);
        request.embed = embed;
        request.properties = message.properties.clone();
        request.extra_headers = message.headers.clone();
        Ok(request)
    }

    /// Encodes as a protocol v2 message, with every header a Celery 5 client sends.
    pub fn encode(&self) -> Message {
        let iso = |t: &Option<DateTime<Utc>>| {
            t.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, false))
                .map_or(Value::Null, Value::String)
        };
        let mut headers = self.extra_headers.clone();
        for (key, value) in [
            ("lang", json!("rust")),
            ("task", json!(self.task)),
            ("id", json!(self.id)),
            ("shadow", Value::Null),
            ("eta", iso(&self.eta)),
            ("expires", iso(&self.expires)),
            ("group", json!(self.group)),
            ("group_index", json!(self.group_index)),
            ("retries", json!(self.retries)),
            ("timelimit", json!([self.timelimit.0, self.timelimit.1])),
            (
                "root_id",
                json!(self.root_id.as_deref().unwrap_or(&self.id)),
            ),
            ("parent_id", json!(self.parent_id)),
            ("argsrepr", json!(repr_args(&self.args))),
            (
                "kwargsrepr",
                json!(repr(&Value::Object(self.kwargs.clone()))),
            ),
            ("origin", json!(self.origin)),
            ("ignore_result", json!(self.ignore_result)),
        ] {
            headers.insert(key.into(), value);
        }
        headers.entry(REPLACED_TASK_NESTING).or_insert(json!(0));
        headers.entry("stamped_headers").or_insert(Value::Null);
        headers.entry("stamps").or_insert(json!({}));
        let body = json!([self.args, self.kwargs, self.embed]);
        Message {
            content_type: JSON.into(),
            content_encoding: "utf-8".into(),
            headers,
            properties: Properties {
                correlation_id: Some(self.id.clone()),
                ..self.properties.clone()
            },
            body: serde_json::to_vec(&body).expect("JSON values always serialize"),
        }
    }
}

/// Largest body a compressed message may expand to: a bound against decompression bombs.
const MAX_DECOMPRESSED: u64 = 64 << 20;

/// The body as serialized, undoing `task_compression`. kombu's `application/x-gzip` is zlib's
/// format, not a gzip file; a gzip file is read too, since other producers send one.
fn decompress<'a>(
    compression: Option<&str>,
    body: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, String> {
    use std::io::Read;
    let Some(compression) = compression else {
        return Ok(std::borrow::Cow::Borrowed(body));
    };
    if !matches!(
        compression,
        "application/x-gzip" | "application/gzip" | "gzip" | "zlib"
    ) {
        return Err(format!(
            "compression {compression:?} is not supported (zlib and gzip are)"
        ));
    }
    let mut out = Vec::new();
    let read = if body.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(body)
            .take(MAX_DECOMPRESSED + 1)
            .read_to_end(&mut out)
    } else {
        flate2::read::ZlibDecoder::new(body)
            .take(MAX_DECOMPRESSED + 1)
            .read_to_end(&mut out)
    };
    read.map_err(|e| format!("body does not decompress as {compression}: {e}"))?;
    if out.len() as u64 > MAX_DECOMPRESSED {
        return Err(format!(
            "body decompresses to more than {MAX_DECOMPRESSED} bytes"
        ));
    }
    Ok(std::borrow::Cow::Owned(out))
}

fn string(map: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("{key} must be a string, got {other}")),
    }
}

/// ISO-8601 with an offset, or naive (taken as UTC, as Celery's `utc=True` clients mean).
fn time(map: &Map<String, Value>, key: &str) -> Result<Option<DateTime<Utc>>, String> {
    let Some(text) = string(map, key)? else {
        return Ok(None);
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(&text) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f")
        .map(|t| Some(t.and_utc()))
        .map_err(|_| format!("{key} is not an ISO-8601 time: {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Headers and body of `add.apply_async((2, 3))` as Celery 5.7 sends them.
    fn captured_v2() -> Message {
        let headers = json!({"lang": "py", "task": "add", "id": "bba8fac3-976c-486b-ba7a-797c191ed034",
            "shadow": null, "eta": null, "expires": "2026-11-25T05:23:47.212795+00:00", "group": null,
            "group_index": null, "retries": 0, "timelimit": [30, 20],
            "root_id": "bba8fac3-976c-486b-ba7a-797c191ed034", "parent_id": null, "argsrepr": "(2, 3)",
            "kwargsrepr": "{}", "origin": "gen31756@vm", "ignore_result": false,
            "replaced_task_nesting": 0, "stamped_headers": null, "stamps": {}, "x-custom": "v"});
        Message {
            content_type: JSON.into(),
            content_encoding: "utf-8".into(),
            headers: headers.as_object().unwrap().clone(),
            properties: Properties { correlation_id: Some("bba8fac3-976c-486b-ba7a-797c191ed034".into()), ..Default::default() },
            body: br#"[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#.to_vec(),
        }
    }

    #[test]
    fn decodes_a_captured_v2_message() {
        let request = TaskRequest::decode(&captured_v2()).unwrap();
        assert_eq!(request.task, "add");
        assert_eq!(request.args, vec![json!(2), json!(3)]);
        assert!(request.kwargs.is_empty());
        assert_eq!(request.timelimit, (Some(30.0), Some(20.0)));
        assert_eq!(
            request.expires.unwrap().to_rfc3339(),
            "2026-11-25T05:23:47.212795+00:00"
        );
        assert_eq!(request.extra_headers.get("x-custom"), Some(&json!("v")));
        assert_eq!(request.origin.as_deref(), Some("gen31756@vm"));
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let mut sent = TaskRequest::new(
            "tasks.add",
            vec![json!(1)],
            json!({"y": 2}).as_object().unwrap().clone(),
        );
        sent.eta = Some(Utc::now());
        sent.extra_headers.insert("x-custom".into(), json!("v"));
        let message = sent.encode();
        assert_eq!(message.headers["argsrepr"], json!("(1,)"));
        assert_eq!(message.headers["kwargsrepr"], json!("{'y': 2}"));
        assert_eq!(
            message.properties.correlation_id.as_deref(),
            Some(sent.id.as_str())
        );
        let received = TaskRequest::decode(&message).unwrap();
        let eta = |r: &TaskRequest| r.eta.unwrap().timestamp_micros();
        assert_eq!(eta(&received), eta(&sent));
        assert_eq!(
            (received.id, received.args, received.kwargs),
            (sent.id, sent.args, sent.kwargs)
        );
        assert!(received.extra_headers.contains_key("x-custom"));
    }

    #[test]
    fn compressed_bodies_are_decoded_and_bombs_refused() {
        use std::io::Write;
        let plain = captured_v2();
        let compressed = |mut encoder: Box<dyn Write>| {
            encoder.write_all(&plain.body).unwrap();
            drop(encoder);
        };
        let mut zlib = Vec::new();
        compressed(Box::new(flate2::write::ZlibEncoder::new(
            &mut zlib,
            flate2::Compression::default(),
        )));
        let mut gzip = Vec::new();
        compressed(Box::new(flate2::write::GzEncoder::new(
            &mut gzip,
            flate2::Compression::default(),
        )));
        for body in [zlib, gzip] {
            let mut message = Message {
                body,
                ..captured_v2()
            };
            message
                .headers
                .insert("compression".into(), json!("application/x-gzip"));
            assert_eq!(
                TaskRequest::decode(&message).unwrap().args,
                vec![json!(2), json!(3)]
            );
        }
        let mut message = captured_v2();
        message
            .headers
            .insert("compression".into(), json!("application/x-bz2"));
        assert!(TaskRequest::decode(&message)
            .unwrap_err()
            .reason
            .contains("not supported"));
        message
            .headers
            .insert("compression".into(), json!("application/x-gzip"));
        assert!(TaskRequest::decode(&message)
            .unwrap_err()
            .reason
            .contains("does not decompress"));
        let mut bomb = Vec::new();
        let mut encoder = flate2::write::ZlibEncoder::new(&mut bomb, flate2::Compression::best());
        for _ in 0..65 {
            encoder.write_all(&vec![b' '; 1 << 20]).unwrap();
        }
        drop(encoder);
        let mut message = Message {
            body: bomb,
            ..captured_v2()
        };
        message
            .headers
            .insert("compression".into(), json!("application/x-gzip"));
        assert!(TaskRequest::decode(&message)
            .unwrap_err()
            .reason
            .contains("more than"));
    }

    #[test]
    fn decodes_a_v1_body() {
        let message = Message {
            headers: Map::new(),
            body: br#"{"task": "add", "id": "42d3", "args": [2, 3], "kwargs": {}, "retries": 1,
                "eta": "2026-01-01T00:00:00", "utc": true, "taskset": "g1"}"#
                .to_vec(),
            ..captured_v2()
        };
        let request = TaskRequest::decode(&message).unwrap();
        assert_eq!(
            (request.task.as_str(), request.id.as_str(), request.retries),
            ("add", "42d3", 1)
        );
        assert_eq!(request.group.as_deref(), Some("g1"));
        assert_eq!(
            request.eta.unwrap().to_rfc3339(),
            "2026-01-01T00:00:00+00:00"
        );
    }

    #[test]
    fn bad_messages_are_errors_that_keep_the_id() {
        let cases: [(&[u8], &str); 4] = [
            (b"not json", "not valid JSON"),
            (b"[[1], {}]", "expected 3"),
            (b"{\"a\": 1}", "[args, kwargs, embed]"),
            (b"[{}, {}, null]", "args must be a list"),
        ];
        for (body, reason) in cases {
            let err = TaskRequest::decode(&Message {
                body: body.to_vec(),
                ..captured_v2()
            })
            .unwrap_err();
            assert!(err.reason.contains(reason), "{body:?}: {err}");
            assert_eq!(
                err.task_id.as_deref(),
                Some("bba8fac3-976c-486b-ba7a-797c191ed034")
            );
        }
        let pickle = Message {
            content_type: "application/x-python-serialize".into(),
            ..captured_v2()
        };
        assert!(TaskRequest::decode(&pickle)
            .unwrap_err()
            .reason
            .contains("refused"));
        let no_task = Message {
            headers: Map::new(),
            ..captured_v2()
        };
        assert!(TaskRequest::decode(&no_task)
            .unwrap_err()
            .reason
            .contains("not a task message"));
    }
}
