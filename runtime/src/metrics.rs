//! Prometheus metrics of a worker process, in Prometheus' text format, and the small HTTP
//! listener that serves them (`worker_metrics_port`, off by default).
//!
//! The counters live as long as the process, not as long as one broker connection: the worker
//! binary keeps one [`WorkerMetrics`] across reconnects. Task names are labels only for tasks
//! in the registry, so a flood of messages naming made-up tasks cannot grow the label set;
//! those count in `messages_rejected_total` by reason.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Prefix of every metric name.
pub const NAMESPACE: &str = "rcelery";

/// Upper bounds of the task runtime histogram's buckets, in seconds: from a fast Rust task's
/// sub-millisecond run to a long batch job.
const RUNTIME_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0,
];

/// How a task run ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Succeeded,
    Failed,
    Retried,
    Revoked,
}

/// Why a message was rejected without running a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not a task message this worker can read.
    Undecodable,
    /// A task this worker does not have.
    Unregistered,
}

/// Everything a worker counts.
pub struct WorkerMetrics {
    registry: Registry,
    received: IntCounterVec,
    succeeded: IntCounterVec,
    failed: IntCounterVec,
    retried: IntCounterVec,
    revoked: IntCounterVec,
    runtime: HistogramVec,
    in_flight: IntGauge,
    prefetched: IntGauge,
    rejected: IntCounterVec,
    reconnects: IntCounter,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some(NAMESPACE.into()), None).expect("a valid namespace");
        let by_task = |name: &str, help: &str| {
            let counter =
                IntCounterVec::new(Opts::new(name, help), &["task"]).expect("a valid counter");
            register(&registry, counter)
        };
        let gauge = |name: &str, help: &str| {
            register(&registry, IntGauge::new(name, help).expect("a valid gauge"))
        };
        let runtime = HistogramVec::new(
            HistogramOpts::new("task_runtime_seconds", "Seconds each task run took.")
                .buckets(RUNTIME_BUCKETS.to_vec()),
            &["task"],
        )
        .expect("a valid histogram");
        let rejected = IntCounterVec::new(
            Opts::new(
                "messages_rejected_total",
                "Messages rejected without running a task, by reason.",
            ),
            &["reason"],
        )
        .expect("a valid counter");
        let reconnects = IntCounter::new(
            "broker_reconnects_total",
            "Times the worker connected to the broker again after losing it.",
        )
        .expect("a valid counter");
        Self {
            received: by_task("tasks_received_total", "Task messages received."),
            succeeded: by_task("tasks_succeeded_total", "Task runs that succeeded."),
            failed: by_task("tasks_failed_total", "Task runs that failed."),
            retried: by_task("tasks_retried_total", "Task runs that asked to retry."),
            revoked: by_task(
                "tasks_revoked_total",
                "Tasks revoked, expired or terminated.",
            ),
            runtime: register(&registry, runtime),
            in_flight: gauge("tasks_in_flight", "Tasks running now."),
            prefetched: gauge(
                "messages_prefetched",
                "Task messages held, not yet running (waiting for a slot, an eta or a rate limit).",
            ),
            rejected: register(&registry, rejected),
            reconnects: register(&registry, reconnects),
            registry,
        }
    }

    /// A message for `task` arrived.
    pub fn received(&self, task: &str) {
        self.received.with_label_values(&[task]).inc();
    }

    /// A received message is held, waiting to run.
    pub fn held(&self) {
        self.prefetched.inc();
    }

    /// A held message's task starts running.
    pub fn started(&self) {
        self.prefetched.dec();
        self.in_flight.inc();
    }

    /// A held message is let go: its run ended (`ran`), or it never started.
    pub fn let_go(&self, ran: bool) {
        if ran {
            self.in_flight.dec();
        } else {
            self.prefetched.dec();
        }
    }

    /// A run of `task` took `seconds`.
    pub fn ran(&self, task: &str, seconds: f64) {
        self.runtime.with_label_values(&[task]).observe(seconds);
    }

    /// A run of `task` ended as `how`.
    pub fn ended(&self, task: &str, how: Ended) {
        let counter = match how {
            Ended::Succeeded => &self.succeeded,
            Ended::Failed => &self.failed,
            Ended::Retried => &self.retried,
            Ended::Revoked => &self.revoked,
        };
        counter.with_label_values(&[task]).inc();
    }

    /// A message was rejected for `reason`.
    pub fn rejected(&self, reason: Rejected) {
        let reason = match reason {
            Rejected::Undecodable => "undecodable",
            Rejected::Unregistered => "unregistered",
        };
        self.rejected.with_label_values(&[reason]).inc();
    }

    /// The worker connected to the broker again.
    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// Every metric in Prometheus' text format.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

/// Registers `metric` in `registry` and hands it back, to be kept and updated.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

/// `registry`'s metrics in Prometheus' text format.
pub fn render(registry: &Registry) -> String {
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .expect("encoding to memory cannot fail");
    String::from_utf8(text).expect("the text format is UTF-8")
}

/// The content type of Prometheus' text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest request head read.
const MAX_HEAD: usize = 8192;
/// How long one connection may take, from the request's first byte to the answer's last: a
/// client that stops reading or writing is cut off.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may take to send its request head: short, so that connections that
/// send nothing (all [`MAX_CONNECTIONS`] of them, say) hold the listener only this long and a
/// scrape behind them is still answered in time. A scraper sends its head at once.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections answered at once; more wait to be accepted, so scrapers cannot exhaust the
/// file descriptors the broker connection needs.
const MAX_CONNECTIONS: usize = 16;

/// Answers `GET /metrics` on `listener` with `render()`, one connection at a time per task,
/// until the process ends. A worker needs nothing more of HTTP than this one read-only page, so
/// it takes no web framework: it reads the request head, answers, and closes.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let render = render.clone();
                tokio::spawn(async move {
                    let exchange =
                        tokio::time::timeout(EXCHANGE_TIMEOUT, answer(stream, render.as_ref()));
                    match exchange.await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::debug!(%error, "metrics request failed"),
                        Err(_) => tracing::debug!("metrics request cut off: too slow"),
                    }
                    drop(slot);
                });
            }
            Err(error) => {
                tracing::warn!(%error, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(
    mut stream: TcpStream,
    render: &(dyn Fn() -> String + Send + Sync),
) -> std::io::Result<()> {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no request head in time")
        })??;
    let (status, content_type, body) = match request_line(&head) {
        Some(("GET" | "HEAD", "/metrics")) => ("200 OK", CONTENT_TYPE, render()),
        Some((_, "/metrics")) => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
        _ => (
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n".into(),
        ),
    };
    let body = if head.starts_with("HEAD ") {
        String::new()
    } else {
        body
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The request head (up to the blank line), at most [`MAX_HEAD`] bytes.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..read]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The method and the path (without its query) of an HTTP request line.
fn request_line(head: &str) -> Option<(&str, &str)> {
    let mut parts = head.lines().next()?.split_whitespace();
    let method = parts.next()?;
    let target = parts.next()?;
    let path = target.split('?').next().unwrap_or(target);
    parts.next()?.starts_with("HTTP/").then_some((method, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `name{labels}` in `text`, if present.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counts_move_with_what_the_worker_does() {
        let metrics = WorkerMetrics::new();
        metrics.received("tasks.add");
        metrics.held();
        metrics.started();
        let running = metrics.render();
        assert_eq!(sample(&running, "rcelery_tasks_in_flight"), Some(1.0));
        assert_eq!(sample(&running, "rcelery_messages_prefetched"), Some(0.0));
        metrics.ran("tasks.add", 0.002);
        metrics.let_go(true);
        metrics.ended("tasks.add", Ended::Succeeded);
        metrics.ended("tasks.add", Ended::Retried);
        metrics.rejected(Rejected::Unregistered);
        metrics.reconnected();
        let text = metrics.render();
        for (series, value) in [
            (r#"rcelery_tasks_received_total{task="tasks.add"}"#, 1.0),
            (r#"rcelery_tasks_succeeded_total{task="tasks.add"}"#, 1.0),
            (r#"rcelery_tasks_retried_total{task="tasks.add"}"#, 1.0),
            (
                r#"rcelery_task_runtime_seconds_count{task="tasks.add"}"#,
                1.0,
            ),
            (
                r#"rcelery_task_runtime_seconds_bucket{task="tasks.add",le="0.0025"}"#,
                1.0,
            ),
            (
                r#"rcelery_task_runtime_seconds_bucket{task="tasks.add",le="0.001"}"#,
                0.0,
            ),
            (
                r#"rcelery_messages_rejected_total{reason="unregistered"}"#,
                1.0,
            ),
            ("rcelery_broker_reconnects_total", 1.0),
            ("rcelery_tasks_in_flight", 0.0),
        ] {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        assert!(text.contains("# TYPE rcelery_task_runtime_seconds histogram"));
        assert_eq!(
            sample(&text, r#"rcelery_tasks_failed_total{task="tasks.add"}"#),
            None,
            "no series until a task fails"
        );
    }

    #[test]
    fn a_message_let_go_before_it_ran_leaves_the_prefetched_count() {
        let metrics = WorkerMetrics::new();
        metrics.held();
        metrics.held();
        metrics.let_go(false);
        assert_eq!(
            sample(&metrics.render(), "rcelery_messages_prefetched"),
            Some(1.0)
        );
    }

    #[test]
    fn request_lines_are_read_for_method_and_path() {
        assert_eq!(
            request_line("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(request_line("GET /metrics\r\n\r\n"), None);
        assert_eq!(request_line(""), None);
    }

    #[tokio::test]
    async fn the_listener_answers_get_metrics_and_refuses_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(|| "up 1\n".to_string())));
        let ask = |request: &'static str| async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let ok = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains(CONTENT_TYPE) && ok.ends_with("\r\n\r\nup 1\n"),
            "{ok}"
        );
        let missing = ask("GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = ask("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    }

    #[tokio::test]
    async fn idle_connections_cannot_starve_a_scrape() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::new(|| "up 1\n".to_string())));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(address).await.unwrap());
        }
        let began = std::time::Instant::now();
        let scrape = async {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        // Well under the whole exchange's bound, which idle connections held before.
        let bound = HEAD_TIMEOUT + Duration::from_secs(3);
        assert!(bound < EXCHANGE_TIMEOUT);
        let answer = tokio::time::timeout(bound, scrape)
            .await
            .expect("a scrape is answered while idle connections are open");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(began.elapsed() >= HEAD_TIMEOUT / 2, "the idle ones held it");
        drop(idle);
    }
}
