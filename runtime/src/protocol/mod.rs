//! Celery's wire formats as pure data: no sockets here, so every codec is tested on bytes alone.
//!
//! - [`message`]: the transport-neutral message and the task request it carries (protocol v2,
//!   and v1 on receipt).
//! - [`amqp`]: the message as AMQP basic properties and header field tables.
//! - [`envelope`]: kombu's JSON envelope, the form a message takes inside a Redis list.
//! - [`kombu_redis`]: kombu's key layout of a Redis broker (lists, bindings, channels, unacked).
//! - [`result`]: the result meta stored in the backend, states, and encoded exceptions.
//! - [`repr`]: Python `repr()` of JSON values, for `argsrepr`/`kwargsrepr`.
//! - [`queue_name`]: what a queue name may be, on both brokers.

pub mod amqp;
pub mod envelope;
pub mod kombu_redis;
pub mod message;
pub mod queue_name;
pub mod repr;
pub mod result;

pub use message::{DecodeError, Message, Properties, TaskRequest};
