//! The Celery-compatible layers that rusty-celery lacks, for tasks written with its macro.
//!
//! - [`config`]: `celeryconfig.toml` with `CELERY_*` overrides, one typed struct.
//! - [`protocol`]: Celery's message, envelope and result formats as pure data.
//! - [`broker`]: one [`broker::Broker`] interface over RabbitMQ (lapin) and Redis.
//! - [`backend`]: Celery's Redis result backend, written so Python's `AsyncResult` reads it.
//! - [`registry`]: the tasks a worker runs, with Celery's argument binding.
//! - [`builtins`]: Celery's `celery.map` and `celery.starmap`, calling a worker's own tasks.
//! - [`canvas`]: what a finished task sends next: link callbacks, errbacks, chain steps.
//! - [`chord`]: the chord join Celery's Redis backend keeps, shared with Python workers.
//! - [`add_to_chord`]: a chord header member adding work to its own chord.
//! - [`replace`]: `Task.replace`: a running task replacing itself with a canvas.
//! - [`delay`]: a running task sending a canvas of its own (`signature.delay()` in a task).
//! - [`rate`]: per-task rate limits.
//! - [`progress`]: the handle a running task reports custom states through.
//! - [`raise`]: a task ending with a Python exception of a named class.
//! - [`events`]: Celery events (worker heartbeats, task states) for Flower.
//! - [`state`]: what a worker node holds and has done, for remote control and heartbeats.
//! - [`metrics`]: a worker's Prometheus metrics and the listener that serves them.
//! - [`command`]: the `worker`, `beat` and `call` commands, each behind one function.
//! - [`worker`]: the dispatcher that takes messages from the broker and runs tasks, and
//!   answers Celery's remote control.
//! - [`logging`]: the tracing set-up every binary shares.
//! - [`cli`]: the command-line options every binary shares.
//! - [`signals`]: the signals that stop a binary.
//! - [`client`]: sending tasks by name to any Celery worker and reading their results.
//! - [`unconfirmed`]: the client's confirmations awaited in the background, bounded in number.
//! - [`tls`]: certificates for `amqps://` and `rediss://` (Celery's `*_use_ssl` settings).
//! - [`urls`]: broker and backend URLs read as text (transport, TLS, failover list, redacted).
//! - [`sentinel`]: `sentinel://` lists: finding the Redis master and following it over failovers.
//! - [`schedule`]: a `beat_schedule` entry and when it runs, without I/O.
//! - [`beat`]: sends the periodic tasks of `beat_schedule`, one beat at a time.

pub mod add_to_chord;
pub mod backend;
pub mod beat;
pub mod broker;
pub mod builtins;
pub mod canvas;
pub mod chord;
pub mod cli;
pub mod client;
pub mod command;
pub mod config;
pub mod delay;
pub mod error;
pub mod events;
pub mod logging;
pub mod metrics;
pub mod progress;
pub mod protocol;
pub mod raise;
pub mod rate;
pub mod registry;
pub mod replace;
pub mod schedule;
pub mod sending;
pub mod sentinel;
pub mod signals;
pub mod stamps;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod unconfirmed;
pub mod unique;
pub mod urls;
pub mod worker;

pub use config::CeleryConfig;
pub use error::{Error, Result};
