//! `--log-format` on the real binaries: with `json` every stderr line is one JSON object a log
//! collector can parse, text stays the default, and a format we do not write stops the binary at
//! start. The worker runs on Redis with a queue and node name of its own.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Ample for a debug build to connect, start and stop; a hung binary fails its test instead of
/// holding up the suite.
const DEADLINE: Duration = Duration::from_secs(30);

/// What one worker run wrote: its node name, exit status and stderr lines.
struct Run {
    node: String,
    status: ExitStatus,
    lines: Vec<String>,
}

impl Run {
    /// The line announcing the node is ready (the worker's first info line with fields).
    fn ready_line(&self) -> &str {
        let marker = format!("{} ready.", self.node);
        self.lines
            .iter()
            .find(|line| line.contains(&marker))
            .unwrap_or_else(|| panic!("no ready line in {:#?}", self.lines))
    }
}

/// Runs the worker binary with `args` and `env` until it logs that it is ready, stops it with
/// SIGTERM, and returns everything it wrote on stderr. `CELERY_LOG_FORMAT` and `RUST_LOG` from
/// the test's own environment are dropped so they cannot change what is tested.
fn run_worker(args: &[&str], env: &[(&str, &str)]) -> Run {
    let queue = format!("test-log-format-{}", uuid::Uuid::new_v4().simple());
    let node = format!("{queue}@host");
    let config = std::env::temp_dir().join(format!("{queue}.toml"));
    std::fs::write(
        &config,
        "broker_url = \"redis://127.0.0.1:6379/0\"\nworker_concurrency = 1\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("--config")
        .arg(&config)
        .args(["-Q", &queue, "-n", &node])
        .args(args)
        .env_remove("CELERY_LOG_FORMAT")
        .env_remove("RUST_LOG")
        .env_remove("CELERY_BROKER_URL")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Lines arrive through a channel so that waiting for each one can be bounded in time.
    let (sender, receiver) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if sender.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let ready = format!("{node} ready.");
    let started = Instant::now();
    let mut lines = Vec::new();
    let mut stopping = false;
    loop {
        let left = DEADLINE.saturating_sub(started.elapsed());
        match receiver.recv_timeout(left) {
            Ok(line) => {
                if !stopping && line.contains(&ready) {
                    let killed = Command::new("kill")
                        .args(["-TERM", &child.id().to_string()])
                        .status()
                        .unwrap();
                    assert!(killed.success());
                    stopping = true;
                }
                lines.push(line);
            }
            // Stderr closed: the worker has exited.
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("worker did not start and stop within {DEADLINE:?}: {lines:#?}");
            }
        }
    }
    let status = child.wait().unwrap();
    std::fs::remove_file(&config).unwrap();
    assert!(stopping, "worker exited before it was ready: {lines:#?}");
    Run {
        node,
        status,
        lines,
    }
}

/// Every line is a JSON object with a timestamp, a level, a target and a message.
fn parse_all(run: &Run) -> Vec<Value> {
    assert!(!run.lines.is_empty());
    run.lines
        .iter()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(value[key].is_string(), "no string {key:?} in {line}");
            }
            value
        })
        .collect()
}

#[test]
fn json_logs_one_object_a_line_with_the_events_fields() {
    let run = run_worker(&["--log-format", "json"], &[]);
    assert!(run.status.success(), "{:?}: {:#?}", run.status, run.lines);
    let events = parse_all(&run);
    let ready: Value = serde_json::from_str(run.ready_line()).unwrap();
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["target"], "runtime::worker");
    assert_eq!(ready["message"], format!("{} ready.", run.node));
    // The event's own fields sit at the top level beside the message.
    assert_eq!(ready["hostname"], run.node.as_str());
    assert_eq!(ready["concurrency"], 1);
    assert_eq!(ready["broker"], "redis://127.0.0.1:6379/0");
    // Shutdown is logged in the same format.
    assert!(
        events
            .iter()
            .any(|event| event["message"] == "worker stopped"),
        "{:#?}",
        run.lines
    );
}

#[test]
fn the_format_can_come_from_celery_log_format() {
    let run = run_worker(&[], &[("CELERY_LOG_FORMAT", "json")]);
    assert!(run.status.success(), "{:?}: {:#?}", run.status, run.lines);
    parse_all(&run);
}

#[test]
fn text_is_the_default() {
    let run = run_worker(&[], &[]);
    assert!(run.status.success(), "{:?}: {:#?}", run.status, run.lines);
    for line in &run.lines {
        assert!(serde_json::from_str::<Value>(line).is_err(), "JSON: {line}");
    }
    let ready = run.ready_line();
    assert!(ready.contains(" INFO runtime::worker: "), "{ready}");
    assert!(ready.contains(&format!("hostname={}", run.node)), "{ready}");
}

#[test]
fn an_unknown_format_stops_the_binary_at_start_naming_the_choices() {
    let from_flag = Command::new(env!("CARGO_BIN_EXE_call"))
        .args(["tasks.add", "--log-format", "yaml"])
        .env_remove("CELERY_LOG_FORMAT")
        .output()
        .unwrap();
    let from_env = Command::new(env!("CARGO_BIN_EXE_worker"))
        .env("CELERY_LOG_FORMAT", "xml")
        .output()
        .unwrap();
    for (output, value) in [(from_flag, "yaml"), (from_env, "xml")] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(output.stdout.is_empty(), "sent something: {output:?}");
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '--log-format")),
            "{stderr}"
        );
        assert!(stderr.contains("[possible values: text, json]"), "{stderr}");
    }
}
