//! Celery's remote control (pidbox) for one worker node: `celery inspect`, `celery control`
//! and Flower send requests to every node or to named ones; each node answers
//! `{hostname: reply}` on the caller's reply queue. Replies carry no secrets.

use std::sync::Arc;
use std::time::Duration;

use chrono::SecondsFormat;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Worker;
use crate::broker::declaration::Declaration;
use crate::broker::{Broadcast, Exchange};
use crate::config::{glob_match, CeleryConfig, QueueType};
use crate::events::timestamp;
use crate::protocol::message::JSON;
use crate::protocol::repr::repr;
use crate::protocol::{Message, Properties};
use crate::state::Phase;
use crate::urls::{failover_urls, redact_url, BrokerKind};

/// How long a request about held tasks waits for the task messages that arrived before it to be
/// held: well within the second Celery's `inspect` waits for replies by default.
const CATCH_UP_WITHIN: Duration = Duration::from_millis(500);

/// Whether `method` answers with the tasks this worker holds, so that it must not overtake
/// task messages that arrived before it.
fn lists_held_tasks(method: &str) -> bool {
    matches!(
        method,
        "active"
            | "dump_active"
            | "reserved"
            | "dump_reserved"
            | "scheduled"
            | "dump_schedule"
            | "query_task"
    )
}

/// Where a caller wants its answer.
#[derive(Debug, Deserialize)]
struct ReplyTo {
    routing_key: String,
}

/// A pidbox request body.
#[derive(Debug, Deserialize)]
struct Request {
    method: String,
    #[serde(default)]
    arguments: Map<String, Value>,
    #[serde(default)]
    destination: Option<Vec<String>>,
    #[serde(default)]
    pattern: Option<String>,
    #[serde(default)]
    matcher: Option<String>,
    #[serde(default)]
    ticket: Option<String>,
    #[serde(default)]
    reply_to: Option<ReplyTo>,
}

impl Request {
    /// Whether node `hostname` should act: named in `destination`, or matching `pattern`, or
    /// addressed to all.
    fn addressed_to(&self, hostname: &str) -> bool {
        if let Some(destination) = self.destination.as_ref().filter(|d| !d.is_empty()) {
            return destination.iter().any(|name| name == hostname);
        }
        match (self.pattern.as_deref(), self.matcher.as_deref()) {
            (Some(pattern), Some("pcre")) => {
                regex::Regex::new(pattern).is_ok_and(|re| re.is_match(hostname))
            }
            (Some(pattern), _) => glob_match(pattern, hostname),
            (None, _) => true,
        }
    }
}

impl Worker {
    /// Answers control requests until the subscription ends.
    pub(super) async fn serve_control(self: Arc<Self>, mut requests: mpsc::Receiver<Broadcast>) {
        while let Some(Broadcast { message, arrived }) = requests.recv().await {
            if let Some(clock) = message.headers.get("clock").and_then(Value::as_u64) {
                self.clock.observe(clock);
            }
            let expires = message
                .headers
                .get("expires")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            if expires > 0.0 && expires < timestamp() {
                continue;
            }
            let request: Request = match serde_json::from_slice(&message.body) {
                Ok(request) => request,
                Err(error) => {
                    warn!(%error, "ignoring unreadable control request");
                    continue;
                }
            };
            if !request.addressed_to(&self.hostname) {
                continue;
            }
            if lists_held_tasks(&request.method) {
                // Under load the task messages that came in first can still be on their way
                // to being held; the caller sent them first and counts on seeing them.
                if tokio::time::timeout(CATCH_UP_WITHIN, arrived.caught_up())
                    .await
                    .is_err()
                {
                    warn!(method = %request.method, "answering before every task received earlier is held");
                }
            }
            let reply = self.command(&request.method, &request.arguments).await;
            if let (Some(reply), Some(reply_to), Some(ticket)) =
                (reply, &request.reply_to, &request.ticket)
            {
                let message = Message {
                    content_type: JSON.into(),
                    content_encoding: "utf-8".into(),
                    headers: [
                        ("ticket".into(), json!(ticket)),
                        ("clock".into(), json!(self.clock.tick())),
                    ]
                    .into_iter()
                    .collect(),
                    properties: Properties {
                        delivery_mode: 1,
                        ..Properties::default()
                    },
                    body: serde_json::to_vec(&json!({ self.hostname.clone(): reply }))
                        .expect("replies are JSON"),
                };
                if let Err(error) = self
                    .broker
                    .publish_to(&Exchange::REPLY, &reply_to.routing_key, &message)
                    .await
                {
                    warn!(method = %request.method, %error, "cannot send control reply");
                }
            }
        }
    }

    /// Runs one command; `None` for commands that send no reply.
    async fn command(
        self: &Arc<Self>,
        method: &str,
        arguments: &Map<String, Value>,
    ) -> Option<Value> {
        // Python callers send any truthy value (Flower sends `terminate=1`).
        let flag = |name: &str| match arguments.get(name) {
            Some(Value::Bool(on)) => *on,
            Some(Value::Number(n)) => n.as_f64().is_some_and(|n| n != 0.0),
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(items)) => !items.is_empty(),
            Some(Value::Object(map)) => !map.is_empty(),
            Some(Value::Null) | None => false,
        };
        let list = |phase: fn(&Phase) -> bool, safe: bool| -> Value {
            self.state
                .infos(phase, safe)
                .into_iter()
                .map(|(_, info)| info)
                .collect()
        };
        Some(match method {
            "ping" => json!({"ok": "pong"}),
            "stats" => self.stats(),
            "registered" | "dump_tasks" => {
                let items = strings(arguments.get("taskinfoitems"));
                json!(self
                    .registry
                    .names(flag("builtins"))
                    .map(|name| registered_entry(name, &items))
                    .collect::<Vec<_>>())
            }
            "active" | "dump_active" => list(|p| matches!(p, Phase::Active(_)), flag("safe")),
            "reserved" | "dump_reserved" => list(|p| *p == Phase::Reserved, false),
            "scheduled" | "dump_schedule" => self
                .state
                .infos(|p| matches!(p, Phase::Scheduled(_)), false)
                .into_iter()
                .map(|(phase, info)| scheduled_entry(&phase, info))
                .collect(),
            "revoked" | "dump_revoked" => json!(self.state.revoked()),
            "active_queues" => self
                .queues()
                .await
                .iter()
                .map(|queue| queue_info(queue, self.broker.declaration(queue)))
                .collect(),
            "conf" => conf(&self.config),
            "query_task" => self.state.query(&strings(arguments.get("ids"))),
            "report" => json!({"ok": self.report()}),
            "clock" => json!({"clock": self.clock.value()}),
            "hello" => json!({"revoked": self.state.revoked(), "clock": self.clock.value()}),
            "revoke" | "terminate" => {
                let ids = strings(arguments.get("task_id"));
                let terminated = self
                    .state
                    .revoke(&ids, method == "terminate" || flag("terminate"));
                info!(?ids, ?terminated, "revoked");
                self.store_revoked(&ids).await;
                json!({"ok": format!("tasks {} flagged as revoked", ids.join(", "))})
            }
            "revoke_by_stamped_headers" => {
                let headers = stamped_headers(arguments.get("headers"));
                let terminate = flag("terminate");
                let terminated = self.state.revoke_stamps(&headers, terminate);
                info!(?headers, ?terminated, "revoked by stamped headers");
                let headers = repr(&Value::Object(headers));
                json!({"ok": match (terminate, terminated.is_empty()) {
                    (false, _) => format!("headers {headers} flagged as revoked, but not terminated"),
                    (true, true) => format!("headers {headers} were not terminated"),
                    (true, false) => format!("headers {} revoked", repr(&json!(terminated))),
                }})
            }
            "enable_events" => match self.events.set_task_events(true) {
                true => json!({"ok": "task events already enabled"}),
                false => json!({"ok": "task events enabled"}),
            },
            "disable_events" => match self.events.set_task_events(false) {
                true => json!({"ok": "task events disabled"}),
                false => json!({"ok": "task events already disabled"}),
            },
            "heartbeat" => {
                self.events
                    .send("worker-heartbeat", self.heartbeat_fields());
                return None;
            }
            "shutdown" => {
                info!("shutdown requested by remote control");
                self.shutdown_requested.cancel();
                return None;
            }
            "add_consumer" => match arguments.get("queue").and_then(Value::as_str) {
                None => json!({"error": "add_consumer needs a queue"}),
                Some(queue) => match self.add_consumer(queue).await {
                    Ok(true) => json!({"ok": format!("add consumer {queue}")}),
                    Ok(false) => json!({"ok": format!("already consuming from {queue}")}),
                    Err(error) => json!({"error": format!("cannot consume from {queue}: {error}")}),
                },
            },
            "cancel_consumer" => match arguments.get("queue").and_then(Value::as_str) {
                None => json!({"error": "cancel_consumer needs a queue"}),
                Some(queue) => match self.cancel_consumer(queue).await {
                    true => json!({"ok": format!("no longer consuming from {queue}")}),
                    false => json!({"error": format!("not consuming from {queue}")}),
                },
            },
            "pool_grow" | "pool_shrink" => {
                let n = arguments.get("n").and_then(Value::as_u64).unwrap_or(1) as usize;
                self.resize_pool(method == "pool_grow", n);
                json!({"ok": if method == "pool_grow" { "pool will grow" } else { "pool will shrink" }})
            }
            "rate_limit" => {
                let task = arguments
                    .get("task_name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let rate = match arguments.get("rate_limit") {
                    Some(Value::String(rate)) => rate.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => String::new(),
                };
                if self.registry.get(task).is_none() {
                    json!({"error": format!("unknown task {task:?}")})
                } else {
                    match crate::rate::parse(&rate) {
                        Ok(per_second) => {
                            self.set_rate_limit(task, per_second);
                            json!({"ok": "new rate limit set successfully"})
                        }
                        Err(error) => json!({"error": error.to_string()}),
                    }
                }
            }
            "time_limit" | "autoscale" | "pool_restart" => {
                json!({"error": format!("{method} is not supported by this worker")})
            }
            unknown => json!({"error": format!("KeyError('{unknown}')")}),
        })
    }

    /// `inspect stats`: what Flower's worker page indexes (`total`, `broker`) and the rest.
    fn stats(&self) -> Value {
        json!({
            "total": self.state.totals(),
            "pid": std::process::id(),
            "clock": self.clock.value().to_string(),
            "uptime": self.state.uptime(),
            "prefetch_count": self.prefetch(),
            "pool": {
                "implementation": "rcelery:tokio",
                "max-concurrency": self.pool_size.load(std::sync::atomic::Ordering::SeqCst),
                "processes": [std::process::id()],
                "max-tasks-per-child": null,
                "put-guarded-by-semaphore": false,
                "timeouts": [0, 0],
            },
            "broker": broker_info(&self.config),
            "rusage": rusage(),
        })
    }

    fn report(&self) -> String {
        format!(
            "software -> celery:rcelery-{} (rust) kombu:none py:none\nplatform -> system:{} arch:{}\nsettings -> transport:{} results:{}\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::env::consts::ARCH,
            broker_info(&self.config)["transport"].as_str().unwrap_or(""),
            self.config.result_backend.as_deref().map(redact_url).unwrap_or_default(),
        )
    }
}

/// `inspect conf`: our settings, secrets masked, with the settings every Celery worker reports
/// that ours does not read but has fixed, at what ours does.
fn conf(config: &CeleryConfig) -> Value {
    let mut table = match serde_json::to_value(config.redacted()) {
        Ok(Value::Object(table)) => table,
        _ => Map::new(),
    };
    // lapin asks for the URL's `heartbeat` when it names one, else takes the broker's.
    let heartbeat = failover_urls(&config.broker_url)
        .first()
        .and_then(|url| url::Url::parse(url).ok())
        .and_then(|url| {
            url.query_pairs()
                .find(|(key, _)| key == "heartbeat")
                .and_then(|(_, value)| value.parse::<f64>().ok())
        });
    let fixed = [
        // Only JSON messages are decoded.
        ("accept_content", json!([JSON_CONTENT_NAME])),
        // Every time is read, kept and written in UTC.
        ("enable_utc", json!(true)),
        ("timezone", json!("UTC")),
        // The worker installs the process's one log subscriber, as Celery takes the root logger.
        ("worker_hijack_root_logger", json!(true)),
        ("worker_log_color", json!(crate::logging::in_color())),
        ("broker_heartbeat", json!(heartbeat)),
        // No setting is read under an old name, and tasks are compiled in: no modules to import.
        ("deprecated_settings", json!([])),
        ("include", json!([])),
    ];
    for (key, value) in fixed {
        table.entry(key).or_insert(value);
    }
    Value::Object(table)
}

/// The serializer name Celery's `accept_content` gives JSON.
const JSON_CONTENT_NAME: &str = "json";

/// The priority Celery's worker gives every ETA entry on its timer (its `scheduled` answer shows
/// the timer entry's priority, not the message's).
const ETA_TIMER_PRIORITY: u8 = 6;

/// One entry of `inspect scheduled`: the ETA as Python's `datetime.isoformat()` writes an aware
/// UTC time with microseconds, the timer priority and the request's info.
fn scheduled_entry(phase: &Phase, request: Value) -> Value {
    let eta = match phase {
        Phase::Scheduled(eta) => Some(eta.to_rfc3339_opts(SecondsFormat::Micros, false)),
        _ => None,
    };
    json!({"eta": eta, "priority": ETA_TIMER_PRIORITY, "request": request})
}

/// One line of `inspect registered`: the task's name, then the asked `items` it has, as Celery
/// writes them (`NAME [name=NAME]`). Of Celery's task attributes a Rust task has only its name.
fn registered_entry(name: &str, items: &[String]) -> String {
    let known: Vec<String> = items
        .iter()
        .filter(|item| *item == "name")
        .map(|item| format!("{item}={name}"))
        .collect();
    match known.is_empty() {
        true => name.to_string(),
        false => format!("{name} [{}]", known.join(" ")),
    }
}

/// `revoke_by_stamped_headers`'s headers: a mapping of header to value(s), or (since Celery 3.1)
/// a list of `header=value` strings.
fn stamped_headers(value: Option<&Value>) -> Map<String, Value> {
    match value {
        Some(Value::Object(headers)) => headers.clone(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|item| item.split_once('='))
            .map(|(header, value)| (header.to_string(), json!(value)))
            .collect(),
        _ => Map::new(),
    }
}

/// A string or a list of strings.
fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) => many
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// A queue as `inspect active_queues` describes it: as the broker holds it where the broker
/// told (RabbitMQ), else Celery's default topology.
fn queue_info(queue: &str, declared: Option<Declaration>) -> Value {
    let declared = declared.unwrap_or_else(|| Declaration::celery(QueueType::Classic));
    let arguments = declared.arguments_json();
    // kombu's Queue also shows these arguments as attributes, in its own units.
    let argument = |name: &str| arguments.as_ref().and_then(|a| a.get(name)).cloned();
    let message_ttl = argument("x-message-ttl")
        .and_then(|ms| ms.as_f64())
        .map(|ms| ms / 1000.0);
    let expires = argument("x-expires")
        .and_then(|ms| ms.as_f64())
        .map(|ms| ms / 1000.0);
    json!({
        "name": queue,
        "exchange": {"name": queue, "type": declared.exchange_type, "arguments": null, "durable": declared.exchange_durable, "passive": false,
                     "auto_delete": false, "delivery_mode": null, "no_declare": false},
        "routing_key": queue,
        "queue_arguments": arguments, "binding_arguments": null, "consumer_arguments": null,
        "durable": declared.durable, "exclusive": false, "auto_delete": declared.auto_delete, "no_ack": false, "alias": null,
        "bindings": [], "no_declare": null, "expires": expires, "message_ttl": message_ttl,
        "max_length": argument("x-max-length"), "max_length_bytes": argument("x-max-length-bytes"),
        "max_priority": argument("x-max-priority"),
    })
}

/// The broker connection as `stats` shows it: never the password. A failover list is shown
/// as kombu shows it, by its first URL with the whole list as `alternates` (masked here).
fn broker_info(config: &CeleryConfig) -> Value {
    let urls = failover_urls(&config.broker_url);
    let broker_url = urls.first().map_or("", String::as_str);
    let alternates: Vec<String> = match urls.len() {
        1 => Vec::new(),
        _ => urls.iter().map(|url| redact_url(url)).collect(),
    };
    let parsed = url::Url::parse(broker_url).ok();
    let transport = match BrokerKind::of(broker_url) {
        Ok(BrokerKind::Redis) => "redis",
        _ => "amqp",
    };
    let host = parsed
        .as_ref()
        .and_then(|u| u.host_str().map(str::to_owned));
    let port = parsed.as_ref().and_then(url::Url::port);
    let userid = parsed
        .as_ref()
        .map(|u| u.username().to_string())
        .filter(|u| !u.is_empty());
    let virtual_host = parsed
        .as_ref()
        .map(|u| u.path().trim_start_matches('/').to_string())
        .map(|v| if v.is_empty() { "/".to_string() } else { v });
    json!({
        "hostname": host, "userid": userid, "virtual_host": virtual_host, "port": port,
        "insist": false, "ssl": broker_url.starts_with("amqps") || broker_url.starts_with("rediss"),
        "transport": transport, "connect_timeout": 4, "transport_options": {}, "login_method": null,
        "uri_prefix": null, "credential_provider": null, "heartbeat": 120.0, "failover_strategy": config.broker_failover_strategy, "alternates": alternates,
    })
}

/// `getrusage(RUSAGE_SELF)` as Celery reports it.
fn rusage() -> Value {
    // SAFETY: getrusage only writes the struct we pass, which is zero-initialised plain data.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    json!({
        "utime": seconds(usage.ru_utime), "stime": seconds(usage.ru_stime), "maxrss": usage.ru_maxrss,
        "ixrss": usage.ru_ixrss, "idrss": usage.ru_idrss, "isrss": usage.ru_isrss,
        "minflt": usage.ru_minflt, "majflt": usage.ru_majflt, "nswap": usage.ru_nswap,
        "inblock": usage.ru_inblock, "oublock": usage.ru_oublock, "msgsnd": usage.ru_msgsnd,
        "msgrcv": usage.ru_msgrcv, "nsignals": usage.ru_nsignals, "nvcsw": usage.ru_nvcsw,
        "nivcsw": usage.ru_nivcsw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> Request {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn scheduled_writes_the_eta_as_python_with_the_timer_priority() {
        let eta = chrono::DateTime::parse_from_rfc3339("2030-01-02T03:04:05Z")
            .unwrap()
            .to_utc();
        let entry = scheduled_entry(&Phase::Scheduled(eta), json!({"id": "t"}));
        assert_eq!(
            entry,
            json!({"eta": "2030-01-02T03:04:05.000000+00:00", "priority": 6, "request": {"id": "t"}})
        );
    }

    #[test]
    fn conf_has_celerys_settings_and_no_secrets() {
        let table = conf(&CeleryConfig {
            broker_url: "amqp://guest:s3cret@127.0.0.1:5672//?heartbeat=30".into(),
            result_backend: Some("redis://:s3cret@127.0.0.1:6379/1".into()),
            ..CeleryConfig::default()
        });
        for key in [
            "worker_hijack_root_logger",
            "worker_log_color",
            "accept_content",
            "enable_utc",
            "timezone",
            "broker_url",
            "result_backend",
            "broker_heartbeat",
            "deprecated_settings",
            "include",
        ] {
            assert!(table.get(key).is_some(), "{key} missing");
        }
        assert_eq!(table["accept_content"], json!(["json"]));
        assert_eq!(table["broker_heartbeat"], json!(30.0));
        assert!(!table.to_string().contains("s3cret"));
    }

    #[test]
    fn stamped_headers_come_as_a_mapping_or_as_header_equals_value() {
        assert_eq!(
            stamped_headers(Some(&json!({"myheader": ["myvalue"]}))),
            json!({"myheader": ["myvalue"]})
                .as_object()
                .unwrap()
                .clone()
        );
        assert_eq!(
            stamped_headers(Some(&json!(["a=1", "junk"]))),
            json!({"a": "1"}).as_object().unwrap().clone()
        );
        assert_eq!(
            repr(&json!({"myheader": ["myvalue"]})),
            "{'myheader': ['myvalue']}"
        );
    }

    #[test]
    fn registered_names_the_asked_items_it_knows() {
        assert_eq!(registered_entry("t.add", &[]), "t.add");
        assert_eq!(
            registered_entry("t.add", &["name".into()]),
            "t.add [name=t.add]"
        );
        assert_eq!(
            registered_entry("t.add", &["rate_limit".into(), "name".into()]),
            "t.add [name=t.add]"
        );
    }

    #[test]
    fn addressing_follows_kombu() {
        let all = request(json!({"method": "ping", "destination": null}));
        assert!(all.addressed_to("w@h"));
        let named = request(json!({"method": "ping", "destination": ["other@x"]}));
        assert!(!named.addressed_to("w@h"));
        let glob = request(json!({"method": "ping", "pattern": "w@*", "matcher": "glob"}));
        assert!(glob.addressed_to("w@h") && !glob.addressed_to("x@h"));
        let pcre = request(json!({"method": "ping", "pattern": "^w@.$", "matcher": "pcre"}));
        assert!(pcre.addressed_to("w@h"));
    }

    #[test]
    fn broker_info_never_shows_the_password() {
        let config = |broker_url: &str| CeleryConfig {
            broker_url: broker_url.into(),
            ..CeleryConfig::default()
        };
        let info = broker_info(&config("amqp://guest:s3cret@127.0.0.1:5672//"));
        assert_eq!(
            (&info["userid"], &info["virtual_host"], &info["port"]),
            (&json!("guest"), &json!("/"), &json!(5672))
        );
        assert_eq!(info["alternates"], json!([]));
        assert!(!info.to_string().contains("s3cret"));
        assert_eq!(
            broker_info(&config("redis://:pw@127.0.0.1:6379/0"))["transport"],
            "redis"
        );
        let list = "amqp://guest:s3cret@127.0.0.1:5701//;amqp://guest:s3cret@127.0.0.1:5702//";
        let info = broker_info(&config(list));
        assert_eq!(
            (
                &info["port"],
                &info["virtual_host"],
                &info["failover_strategy"]
            ),
            (&json!(5701), &json!("/"), &json!("round-robin"))
        );
        assert_eq!(
            info["alternates"],
            json!([
                "amqp://guest:********@127.0.0.1:5701//",
                "amqp://guest:********@127.0.0.1:5702//"
            ])
        );
        assert!(!info.to_string().contains("s3cret"));
    }
}
