//! Celery events on the `celeryev` exchange, so Flower and `celery events` see our workers.
//!
//! Events are queued on a bounded buffer and published by a background task, many at once, so
//! a busy worker never waits on monitoring: when the buffer is full an event is dropped and
//! logged, never the task held up. `worker-*` events are always sent; `task-*` events only
//! while task events are enabled (`-E`, `worker_send_task_events`, or the `enable_events`
//! control command).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::broker::{Broker, Exchange};
use crate::protocol::message::JSON;
use crate::protocol::{Message, Properties};

/// Events buffered before new ones are dropped.
const BUFFER: usize = 10_000;
/// Events published together at most.
const BATCH: usize = 512;

/// The seconds since the epoch, as Celery's `time.time()`.
pub fn timestamp() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The Lamport clock Celery keeps per node, shared by events and control replies.
#[derive(Debug, Default)]
pub struct Clock(AtomicU64);

impl Clock {
    /// Advances the clock for an event of ours; returns the new value.
    pub fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Moves past a clock value seen from another node.
    pub fn observe(&self, other: u64) -> u64 {
        let advance = |current: u64| Some(current.max(other) + 1);
        let previous = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, advance)
            .unwrap_or_default();
        previous.max(other) + 1
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A node's event sender.
pub struct Events {
    hostname: String,
    clock: Arc<Clock>,
    task_events: AtomicBool,
    /// Taken by `close`, which ends the publisher once it has drained the buffer.
    buffer: Mutex<Option<mpsc::Sender<Value>>>,
    publisher: Mutex<Option<JoinHandle<()>>>,
    /// Events dropped because the buffer was full; the publisher tells them in its log.
    dropped: Arc<AtomicU64>,
}

impl Events {
    /// Starts the publisher of node `hostname`.
    pub fn start(
        broker: Arc<dyn Broker>,
        hostname: &str,
        clock: Arc<Clock>,
        task_events: bool,
    ) -> Arc<Self> {
        let (buffer, pending) = mpsc::channel::<Value>(BUFFER);
        let dropped = Arc::new(AtomicU64::new(0));
        let publisher = tokio::spawn(publish(
            broker,
            hostname.to_string(),
            pending,
            dropped.clone(),
        ));
        Arc::new(Self {
            hostname: hostname.to_string(),
            clock,
            task_events: AtomicBool::new(task_events),
            buffer: Mutex::new(Some(buffer)),
            publisher: Mutex::new(Some(publisher)),
            dropped,
        })
    }

    /// Sends what is buffered, then stops; later events are dropped.
    pub async fn close(&self) {
        self.buffer.lock().expect("events lock").take();
        let publisher = self.publisher.lock().expect("events lock").take();
        if let Some(publisher) = publisher {
            let _ = publisher.await;
        }
    }

    /// Turns task events on or off; returns whether they were on.
    pub fn set_task_events(&self, on: bool) -> bool {
        self.task_events.swap(on, Ordering::SeqCst)
    }

    /// Whether task events are on.
    pub fn task_events(&self) -> bool {
        self.task_events.load(Ordering::SeqCst)
    }

    /// Sends a `task-*` event for task `uuid`, if task events are on.
    pub fn task(&self, event_type: &str, uuid: &str, mut fields: Map<String, Value>) {
        if self.task_events() {
            fields.insert("uuid".into(), json!(uuid));
            self.send(event_type, fields);
        }
    }

    /// Sends an event whatever the task-event switch says (`worker-*`, a client's `task-sent`).
    pub fn send(&self, event_type: &str, mut fields: Map<String, Value>) {
        fields.insert("type".into(), json!(event_type));
        fields.insert("hostname".into(), json!(self.hostname));
        fields.insert("timestamp".into(), json!(timestamp()));
        fields.insert("utcoffset".into(), json!(utcoffset_hours_west()));
        fields.insert("pid".into(), json!(std::process::id()));
        fields.insert("clock".into(), json!(self.clock.tick()));
        let buffer = self.buffer.lock().expect("events lock");
        let sent = buffer
            .as_ref()
            .is_some_and(|buffer| buffer.try_send(Value::Object(fields)).is_ok());
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Publishes what `pending` holds until it closes: all that waits at once in one
/// [`Broker::publish_all_to`] (on Redis one round trip, so the publisher keeps up with a busy
/// worker), and says how many events were dropped since it last looked.
async fn publish(
    broker: Arc<dyn Broker>,
    hostname: String,
    mut pending: mpsc::Receiver<Value>,
    dropped: Arc<AtomicU64>,
) {
    let mut events = Vec::with_capacity(BATCH);
    let mut told = 0;
    while pending.recv_many(&mut events, BATCH).await > 0 {
        let messages: Vec<(String, Message)> = events
            .drain(..)
            .map(|event| message_of(&hostname, event))
            .collect();
        if let Err(error) = broker.publish_all_to(&Exchange::EVENTS, &messages).await {
            tracing::warn!(%error, events = messages.len(), "cannot send events");
        }
        let now = dropped.load(Ordering::Relaxed);
        if now > told {
            tracing::warn!(
                dropped = now - told,
                "events dropped: the event buffer was full"
            );
            told = now;
        }
    }
}

/// `event` as its message on `celeryev`, with its routing key (`task-started`: `task.started`).
fn message_of(hostname: &str, event: Value) -> (String, Message) {
    let routing_key = event["type"].as_str().unwrap_or("").replace('-', ".");
    let message = Message {
        content_type: JSON.into(),
        content_encoding: "utf-8".into(),
        headers: [("hostname".to_string(), json!(hostname))]
            .into_iter()
            .collect(),
        properties: Properties {
            delivery_mode: 1,
            ..Properties::default()
        },
        body: serde_json::to_vec(&event).expect("events are JSON"),
    };
    (routing_key, message)
}

/// Celery's `utcoffset`: hours west of UTC, as Python's `time.timezone / 3600`.
fn utcoffset_hours_west() -> f64 {
    let offset = chrono::Local::now().offset().local_minus_utc();
    -f64::from(offset) / 3600.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_past_what_it_observes() {
        let clock = Clock::default();
        assert_eq!(clock.tick(), 1);
        assert_eq!(clock.observe(10), 11);
        assert_eq!(clock.observe(3), 12);
        assert_eq!(clock.tick(), 13);
    }
}
