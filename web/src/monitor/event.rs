//! What an event of the cluster (`celeryev`), or a result meta the catch-up reads, says of a task
//! or a worker, as the history's rows ([`TaskRecord`], [`WorkerRecord`]), and how two such
//! records of one task merge: without I/O. [`crate::store::record_tasks`] merges in SQL as
//! [`merge`] does here.
//!
//! A task's state only moves forward ([`rank`]): events come from many hosts over several
//! connections, and a replica may record an event twice or late, so `task-started` after
//! `task-succeeded` must leave SUCCESS. What came first stays first (the earliest times, the
//! name and arguments of the first event); what follows the state (worker, end, result) comes
//! with the state that moved the row.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use runtime::protocol::repr::{repr, repr_args};
use runtime::protocol::result::{state, ResultMeta};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::store::{TaskRecord, WorkerRecord, FINAL_RANK};

/// The state `task-received` records (Flower's name for it).
pub const RECEIVED: &str = "RECEIVED";
/// The state `task-rejected` records.
pub const REJECTED: &str = "REJECTED";

/// The longest text (arguments, result, exception, traceback) a row keeps, in characters.
pub const MAX_TEXT_CHARS: usize = 8192;

/// Order of states: sent (PENDING) 0, RECEIVED 1, STARTED 2, a custom state (PROGRESS...) 3,
/// RETRY and REJECTED 4 (a retried task is received and started again: its row stays RETRY
/// until it ends), final [`FINAL_RANK`].
pub fn rank(state_name: &str) -> i16 {
    match state_name {
        state::PENDING => 0,
        RECEIVED => 1,
        state::STARTED => 2,
        state::RETRY | REJECTED => 4,
        name if state::is_ready(name) => FINAL_RANK,
        _ => 3,
    }
}

/// What one event records.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "nearly every event is a task's: boxing tasks would allocate once more for each"
)]
pub enum Record {
    Task(TaskRecord),
    Worker(WorkerRecord),
}

/// The records of an event message's body: one event, or a list of them (Celery's receiver
/// takes both). What is not an event of a task with a UUID or of a worker is passed over;
/// `now` dates an event without a timestamp.
pub fn records(body: &[u8], now: DateTime<Utc>) -> Vec<Record> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(event)) => record(&event, now).into_iter().collect(),
        Ok(Value::Array(events)) => events
            .iter()
            .filter_map(Value::as_object)
            .filter_map(|event| record(event, now))
            .collect(),
        _ => Vec::new(),
    }
}

/// The record of one event, if it is of a task (with a UUID) or of a worker.
pub fn record(event: &Map<String, Value>, now: DateTime<Utc>) -> Option<Record> {
    let kind = event.get("type")?.as_str()?;
    let at = event
        .get("timestamp")
        .and_then(Value::as_f64)
        .and_then(|seconds| DateTime::from_timestamp_micros((seconds * 1e6) as i64))
        .unwrap_or(now);
    let text = |key: &str| event.get(key).and_then(Value::as_str).map(clean);
    let hostname = text("hostname");
    if let Some(worker_event) = kind.strip_prefix("worker-") {
        let software = match (text("sw_ident"), text("sw_ver")) {
            (Some(ident), Some(version)) => Some(format!("{ident} {version}")),
            (ident, version) => ident.or(version),
        };
        return Some(Record::Worker(WorkerRecord {
            hostname: hostname?,
            last_heartbeat: at,
            freq: event.get("freq").and_then(Value::as_f64).unwrap_or(2.0),
            active: count(event.get("active")) as i32,
            processed: count(event.get("processed")),
            online: worker_event != "offline",
            software,
        }));
    }
    let task_event = kind.strip_prefix("task-")?;
    let task_id = event
        .get("uuid")
        .and_then(Value::as_str)
        .and_then(|id| Uuid::parse_str(id).ok())?;
    let id = |key: &str| {
        event
            .get(key)
            .and_then(Value::as_str)
            .and_then(|id| Uuid::parse_str(id).ok())
    };
    let state_name = match task_event {
        "sent" => state::PENDING.to_string(),
        "received" => RECEIVED.to_string(),
        "started" => state::STARTED.to_string(),
        "succeeded" => state::SUCCESS.to_string(),
        "failed" => state::FAILURE.to_string(),
        "revoked" => state::REVOKED.to_string(),
        "retried" => state::RETRY.to_string(),
        "rejected" => REJECTED.to_string(),
        // A custom state (our worker's `task-progress`), named by the event if it says.
        custom => text("state").unwrap_or_else(|| custom.to_ascii_uppercase()),
    };
    let state_rank = rank(&state_name);
    let when = |wanted: &str| (task_event == wanted).then_some(at);
    let mut record = TaskRecord {
        task_id,
        name: text("name"),
        state: state_name,
        state_rank,
        args: text_of(event.get("args")),
        kwargs: text_of(event.get("kwargs")),
        // The sender of task-sent is a client, not a worker.
        worker: hostname.filter(|_| task_event != "sent"),
        queue: text("queue"),
        sent_at: when("sent"),
        received_at: when("received"),
        started_at: when("started"),
        finished_at: (state_rank == FINAL_RANK).then_some(at),
        runtime: event.get("runtime").and_then(Value::as_f64),
        result: text_of(event.get("result")),
        exception: text_of(event.get("exception")),
        traceback: text_of(event.get("traceback")),
        retries: count(event.get("retries")) as i32,
        root_id: id("root_id"),
        parent_id: id("parent_id"),
        seen_at: at,
    };
    if task_event == "revoked" && record.exception.is_none() {
        // Why, as the worker said: expired, terminated (with its signal), or revoked.
        let flag = |key: &str| event.get(key).and_then(Value::as_bool).unwrap_or(false);
        record.exception = Some(
            match (flag("expired"), flag("terminated")) {
                (true, _) => "expired",
                (_, true) => "terminated",
                _ => "revoked",
            }
            .to_string(),
        );
    }
    Some(Record::Task(record))
}

/// What a result meta of the backend says of task `task_id`, for a task whose end no event
/// told (the catch-up); `None` for PENDING, which says nothing.
pub fn from_meta(task_id: Uuid, meta: &ResultMeta, now: DateTime<Utc>) -> Option<TaskRecord> {
    let state_rank = rank(&meta.status);
    if state_rank == 0 {
        return None;
    }
    let done = meta
        .date_done
        .as_deref()
        .and_then(|d| DateTime::parse_from_rfc3339(d).ok())
        .map(|d| d.to_utc());
    let finished_at = (state_rank == FINAL_RANK).then(|| done.unwrap_or(now));
    let extended = meta.extended.as_ref();
    let exception = meta.exception();
    Some(TaskRecord {
        task_id,
        name: extended.map(|e| clean(&e.name)),
        state: clean(&meta.status),
        state_rank,
        args: extended.map(|e| cut(&repr_args(&e.args))),
        kwargs: extended.map(|e| cut(&repr(&Value::Object(e.kwargs.clone())))),
        worker: extended.map(|e| clean(&e.worker)).or_else(|| {
            (meta.status == state::STARTED)
                .then(|| meta.result.get("hostname").and_then(Value::as_str))
                .flatten()
                .map(clean)
        }),
        queue: extended.map(|e| clean(&e.queue)),
        sent_at: None,
        received_at: None,
        started_at: None,
        finished_at,
        runtime: None,
        result: (meta.status == state::SUCCESS).then(|| cut(&repr(&meta.result))),
        exception: exception.as_ref().map(|e| cut(&e.repr())),
        traceback: meta.traceback.as_deref().map(cut),
        retries: extended.map_or(0, |e| e.retries as i32),
        root_id: None,
        parent_id: meta
            .parent_id
            .as_deref()
            .and_then(|id| Uuid::parse_str(id).ok()),
        seen_at: finished_at.unwrap_or(now),
    })
}

/// `newer` merged into `older`, as [`crate::store::record_tasks`] merges a record into its row.
pub fn merge(older: TaskRecord, newer: TaskRecord) -> TaskRecord {
    let ahead = newer.state_rank > older.state_rank
        || (newer.state_rank == older.state_rank && older.state_rank < FINAL_RANK);
    let follows = |old: Option<String>, new: Option<String>| match ahead {
        true => new.or(old),
        false => old.or(new),
    };
    let earliest = |old: Option<DateTime<Utc>>, new: Option<DateTime<Utc>>| match (old, new) {
        (Some(old), Some(new)) => Some(old.min(new)),
        (old, new) => old.or(new),
    };
    TaskRecord {
        task_id: older.task_id,
        state: if ahead { newer.state } else { older.state },
        state_rank: older.state_rank.max(newer.state_rank),
        name: older.name.or(newer.name),
        args: older.args.or(newer.args),
        kwargs: older.kwargs.or(newer.kwargs),
        queue: older.queue.or(newer.queue),
        root_id: older.root_id.or(newer.root_id),
        parent_id: older.parent_id.or(newer.parent_id),
        sent_at: earliest(older.sent_at, newer.sent_at),
        received_at: earliest(older.received_at, newer.received_at),
        started_at: earliest(older.started_at, newer.started_at),
        seen_at: older.seen_at.min(newer.seen_at),
        worker: follows(older.worker, newer.worker),
        finished_at: match ahead {
            true => newer.finished_at.or(older.finished_at),
            false => older.finished_at.or(newer.finished_at),
        },
        runtime: match ahead {
            true => newer.runtime.or(older.runtime),
            false => older.runtime.or(newer.runtime),
        },
        result: follows(older.result, newer.result),
        exception: follows(older.exception, newer.exception),
        traceback: follows(older.traceback, newer.traceback),
        retries: older.retries.max(newer.retries),
    }
}

/// Records of one batch as one statement can write them: one per task, merged in the order
/// they came, in task id order (so concurrent writers lock rows in one order); and one per
/// worker, its most recent.
pub fn coalesce(records: Vec<Record>) -> (Vec<TaskRecord>, Vec<WorkerRecord>) {
    let mut tasks: BTreeMap<Uuid, TaskRecord> = BTreeMap::new();
    let mut workers: BTreeMap<String, WorkerRecord> = BTreeMap::new();
    for record in records {
        match record {
            Record::Task(task) => {
                let merged = match tasks.remove(&task.task_id) {
                    Some(older) => merge(older, task),
                    None => task,
                };
                tasks.insert(merged.task_id, merged);
            }
            Record::Worker(worker) => {
                let newer = workers
                    .get(&worker.hostname)
                    .is_none_or(|known| worker.last_heartbeat >= known.last_heartbeat);
                if newer {
                    workers.insert(worker.hostname.clone(), worker);
                }
            }
        }
    }
    (
        tasks.into_values().collect(),
        workers.into_values().collect(),
    )
}

/// A count field (`active`, `processed`, `retries`): a number, or for `active` Celery's list.
fn count(value: Option<&Value>) -> i64 {
    match value {
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        Some(Value::Array(items)) => items.len() as i64,
        _ => 0,
    }
}

/// A text field as a row keeps it: strings as they are, anything else as its repr; `None` for
/// null.
fn text_of(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::Null => None,
        Value::String(text) => Some(cut(text)),
        other => Some(cut(&repr(other))),
    }
}

/// `text` without NUL (PostgreSQL's text cannot hold it) and cut at [`MAX_TEXT_CHARS`].
fn cut(text: &str) -> String {
    let kept: String = text.chars().take(MAX_TEXT_CHARS).collect();
    clean(&kept)
}

/// `text` without NUL.
fn clean(text: &str) -> String {
    text.replace('\0', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use runtime::protocol::result::{ExceptionInfo, Extended};
    use serde_json::json;

    const ID: &str = "7f0c3c52-3b8e-4a51-9f34-5a1b2c3d4e5f";

    fn task(event: Value) -> TaskRecord {
        match record(event.as_object().unwrap(), Utc::now()) {
            Some(Record::Task(task)) => task,
            other => panic!("not a task record: {other:?}"),
        }
    }

    fn at(seconds: f64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_micros((seconds * 1e6) as i64)
    }

    fn sent() -> TaskRecord {
        task(json!({
            "type": "task-sent", "uuid": ID, "hostname": "client@h", "timestamp": 100.0,
            "name": "tasks.add", "args": "(2, 3)", "kwargs": "{}", "retries": 0,
            "queue": "celery", "root_id": ID, "parent_id": null,
        }))
    }

    fn received() -> TaskRecord {
        task(json!({
            "type": "task-received", "uuid": ID, "hostname": "w1@h", "timestamp": 101.0,
            "name": "tasks.add", "args": "(2, 3)", "kwargs": "{}", "retries": 0,
        }))
    }

    fn started() -> TaskRecord {
        task(json!({"type": "task-started", "uuid": ID, "hostname": "w1@h", "timestamp": 102.0}))
    }

    fn succeeded() -> TaskRecord {
        task(json!({
            "type": "task-succeeded", "uuid": ID, "hostname": "w1@h", "timestamp": 103.5,
            "result": "5", "runtime": 0.25,
        }))
    }

    #[test]
    fn states_rank_forward_and_finals_last() {
        let order = [
            "PENDING", "RECEIVED", "STARTED", "PROGRESS", "RETRY", "SUCCESS",
        ];
        for pair in order.windows(2) {
            assert!(rank(pair[0]) < rank(pair[1]), "{pair:?}");
        }
        assert_eq!(rank("REJECTED"), rank("RETRY"));
        assert_eq!(rank("FAILURE"), FINAL_RANK);
        assert_eq!(rank("REVOKED"), FINAL_RANK);
    }

    #[test]
    fn each_task_event_fills_its_columns() {
        let sent = sent();
        assert_eq!(
            (
                sent.state.as_str(),
                sent.name.as_deref(),
                sent.args.as_deref()
            ),
            ("PENDING", Some("tasks.add"), Some("(2, 3)"))
        );
        assert_eq!((sent.worker, sent.sent_at), (None, at(100.0)));
        assert_eq!(sent.queue.as_deref(), Some("celery"));
        assert_eq!(sent.root_id, Some(Uuid::parse_str(ID).unwrap()));
        let received = received();
        assert_eq!(received.state, "RECEIVED");
        assert_eq!(received.worker.as_deref(), Some("w1@h"));
        assert_eq!(received.received_at, at(101.0));
        let done = succeeded();
        assert_eq!(
            (done.state.as_str(), done.result.as_deref(), done.runtime),
            ("SUCCESS", Some("5"), Some(0.25))
        );
        assert_eq!(done.finished_at, at(103.5));
        let failed = task(json!({
            "type": "task-failed", "uuid": ID, "hostname": "w1@h", "timestamp": 5.0,
            "exception": "RuntimeError('boom')", "traceback": "Traceback...",
        }));
        assert_eq!(failed.exception.as_deref(), Some("RuntimeError('boom')"));
        assert_eq!(failed.state_rank, FINAL_RANK);
        let revoked = task(json!({
            "type": "task-revoked", "uuid": ID, "hostname": "w1@h", "expired": true,
        }));
        assert_eq!(
            (revoked.state.as_str(), revoked.exception.as_deref()),
            ("REVOKED", Some("expired"))
        );
        let progress = task(json!({
            "type": "task-progress", "uuid": ID, "hostname": "w1@h", "state": "PROGRESS",
        }));
        assert_eq!(
            (progress.state.as_str(), progress.state_rank),
            ("PROGRESS", 3)
        );
    }

    #[test]
    fn worker_events_fill_the_worker_and_offline_says_so() {
        let heartbeat = json!({
            "type": "worker-heartbeat", "hostname": "w1@h", "timestamp": 50.0, "freq": 2.0,
            "active": 3, "processed": 120, "sw_ident": "py-celery", "sw_ver": "5.4.0",
        });
        let Some(Record::Worker(worker)) = record(heartbeat.as_object().unwrap(), Utc::now())
        else {
            panic!("not a worker record");
        };
        assert_eq!(
            (
                worker.hostname.as_str(),
                worker.active,
                worker.processed,
                worker.online
            ),
            ("w1@h", 3, 120, true)
        );
        assert_eq!(worker.software.as_deref(), Some("py-celery 5.4.0"));
        assert_eq!(Some(worker.last_heartbeat), at(50.0));
        let offline = json!({"type": "worker-offline", "hostname": "w1@h", "active": []});
        let Some(Record::Worker(worker)) = record(offline.as_object().unwrap(), Utc::now()) else {
            panic!("not a worker record");
        };
        assert!(!worker.online);
    }

    #[test]
    fn what_is_not_a_task_with_a_uuid_or_a_worker_is_passed_over() {
        let now = Utc::now();
        for body in [
            json!({"type": "task-sent", "uuid": "not-a-uuid"}),
            json!({"type": "task-sent"}),
            json!({"type": "something-else", "uuid": ID}),
            json!({"type": "worker-heartbeat"}),
            json!(42),
        ] {
            assert!(
                records(body.to_string().as_bytes(), now).is_empty(),
                "{body}"
            );
        }
        assert!(records(b"not json", now).is_empty());
        let list = json!([
            {"type": "task-sent", "uuid": ID},
            {"type": "task-started", "uuid": ID},
        ]);
        assert_eq!(records(list.to_string().as_bytes(), now).len(), 2);
    }

    #[test]
    fn text_loses_nul_and_is_cut() {
        let long = "x".repeat(MAX_TEXT_CHARS + 10);
        let record = task(json!({
            "type": "task-sent", "uuid": ID, "name": "a\u{0}b", "args": long,
            "kwargs": {"k": [1, null]},
        }));
        assert_eq!(record.name.as_deref(), Some("ab"));
        assert_eq!(record.args.unwrap().chars().count(), MAX_TEXT_CHARS);
        assert_eq!(record.kwargs.as_deref(), Some("{'k': [1, None]}"));
    }

    #[test]
    fn any_order_of_the_events_merges_to_the_same_row() {
        let events = [sent(), received(), started(), succeeded()];
        let in_order = events.iter().cloned().reduce(merge).unwrap();
        assert_eq!(in_order.state, "SUCCESS");
        assert_eq!(in_order.worker.as_deref(), Some("w1@h"));
        assert_eq!(
            (in_order.sent_at, in_order.received_at, in_order.started_at),
            (at(100.0), at(101.0), at(102.0))
        );
        assert_eq!(in_order.seen_at, at(100.0).unwrap());
        assert_eq!(in_order.name.as_deref(), Some("tasks.add"));
        let reversed = events.iter().rev().cloned().reduce(merge).unwrap();
        assert_eq!(reversed, in_order);
        // A late task-started after the end, and an event recorded twice, change nothing.
        let late = merge(merge(in_order.clone(), started()), succeeded());
        assert_eq!(late, in_order);
    }

    #[test]
    fn a_retried_task_stays_retry_until_it_ends_on_the_worker_that_ended_it() {
        let retried = task(json!({
            "type": "task-retried", "uuid": ID, "hostname": "w1@h", "timestamp": 102.5,
            "exception": "Retry(...)",
        }));
        let again = task(json!({
            "type": "task-received", "uuid": ID, "hostname": "w2@h", "timestamp": 110.0,
            "retries": 1,
        }));
        let row = [sent(), received(), started(), retried, again]
            .into_iter()
            .reduce(merge)
            .unwrap();
        assert_eq!((row.state.as_str(), row.retries), ("RETRY", 1));
        assert_eq!(row.received_at, at(101.0));
        let mut end = succeeded();
        end.worker = Some("w2@h".into());
        let row = merge(row, end);
        assert_eq!(row.state, "SUCCESS");
        assert_eq!(row.worker.as_deref(), Some("w2@h"));
    }

    #[test]
    fn a_batch_coalesces_to_one_record_per_task_and_the_newest_per_worker() {
        let heartbeat = |seconds: f64, processed: i64| {
            Record::Worker(WorkerRecord {
                hostname: "w1@h".into(),
                last_heartbeat: at(seconds).unwrap(),
                freq: 2.0,
                active: 0,
                processed,
                online: true,
                software: None,
            })
        };
        let mut other = sent();
        other.task_id = Uuid::nil();
        let (tasks, workers) = coalesce(vec![
            Record::Task(succeeded()),
            heartbeat(10.0, 5),
            Record::Task(other),
            Record::Task(sent()),
            heartbeat(8.0, 4),
        ]);
        assert_eq!(tasks.len(), 2);
        assert!(tasks[0].task_id < tasks[1].task_id);
        let ours = tasks.iter().find(|t| t.task_id != Uuid::nil()).unwrap();
        assert_eq!(ours.state, "SUCCESS");
        assert_eq!(ours.sent_at, at(100.0));
        assert_eq!(workers.len(), 1);
        assert_eq!(workers[0].processed, 5);
    }

    #[test]
    fn a_result_meta_tells_the_end_an_event_did_not() {
        let now = Utc::now();
        let id = Uuid::parse_str(ID).unwrap();
        let mut meta = ResultMeta::new(ID, "SUCCESS", json!(5), now);
        meta.extended = Some(Extended {
            name: "tasks.add".into(),
            args: vec![json!(2), json!(3)],
            kwargs: Default::default(),
            worker: "w1@h".into(),
            retries: 0,
            queue: "celery".into(),
        });
        let record = from_meta(id, &meta, now).unwrap();
        assert_eq!(
            (record.state.as_str(), record.result.as_deref()),
            ("SUCCESS", Some("5"))
        );
        assert_eq!(record.args.as_deref(), Some("(2, 3)"));
        assert_eq!(record.worker.as_deref(), Some("w1@h"));
        assert!(record.finished_at.is_some());
        let exc = ExceptionInfo::builtin("RuntimeError", "boom");
        let failed = ResultMeta::new(ID, "FAILURE", exc.to_value(), now);
        let record = from_meta(id, &failed, now).unwrap();
        assert_eq!(record.exception.as_deref(), Some("RuntimeError('boom')"));
        assert!(from_meta(id, &ResultMeta::new(ID, "PENDING", json!(null), now), now).is_none());
        // Merged into a row its events made, it ends it and keeps what they told.
        let row = merge(
            merge(sent(), received()),
            from_meta(id, &meta, now).unwrap(),
        );
        assert_eq!(
            (row.state.as_str(), row.received_at),
            ("SUCCESS", at(101.0))
        );
    }
}
