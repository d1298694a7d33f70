//! The runtime's one error type.

use crate::protocol::DecodeError;

/// Everything that can go wrong in the runtime outside a task's own code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `celeryconfig.toml` or an environment override is unreadable or invalid.
    #[error("configuration: {0}")]
    Config(String),

    /// A broker or backend URL names a scheme we do not speak.
    #[error("unsupported URL scheme in {0}")]
    UnsupportedUrl(String),

    /// A queue, exchange, routing key or header name the broker cannot take.
    #[error("invalid name: {0}")]
    InvalidName(String),

    /// A send option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// The broker cannot do what was asked of it.
    #[error("not supported by this broker: {0}")]
    Unsupported(&'static str),

    /// TLS settings are unusable (unreadable or empty certificate files).
    #[error("tls: {0}")]
    Tls(String),

    /// No sentinel named a reachable master.
    #[error("no sentinel names a reachable Redis master {name:?}: {reasons}")]
    NoMaster {
        /// The `master_name` asked for.
        name: String,
        /// What each sentinel answered.
        reasons: String,
    },

    /// An AMQP operation failed.
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),

    /// A Redis operation failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    /// A message could not be decoded.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),

    /// JSON (de)serialization failed outside message decoding.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),

    /// A local resource (a listening socket, the async runtime's threads) is not to be had.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),

    /// The broker did not confirm a publish.
    #[error("broker did not confirm the publish of task {0}")]
    NotConfirmed(String),

    /// Tasks sent without waiting for their confirmation that the broker did not take, as a
    /// flush found them (each was also told on its own handle).
    #[error("{}", refusals(.0))]
    Unconfirmed(Vec<Refused>),

    /// No URL of a failover `broker_url` could be connected to; each with why (redacted).
    #[error("no broker of the failover list answered: {0}")]
    NoBrokerAnswered(String),

    /// The broker closed the consumer's connection.
    #[error("the broker connection was lost")]
    ConnectionLost,

    /// A publish to a queue that does not exist, which `task_create_missing_queues = false`
    /// forbids creating.
    #[error("queue {0} does not exist and task_create_missing_queues is false")]
    MissingQueue(String),

    /// A unique task's lock is held: the same task (or one sent with the same `unique_key`) is
    /// queued or running.
    #[error("task {task} is already queued or running as {holder} (unique lock {lock})")]
    NotUnique {
        /// The task refused.
        task: String,
        /// The lock name (`unique_key` header).
        lock: String,
        /// The id of the task holding the lock.
        holder: String,
    },

    /// No result backend is configured but an operation needs one.
    #[error("no result_backend is configured")]
    NoBackend,

    /// Waiting for a result took longer than allowed.
    #[error("timed out waiting for the result of task {0}")]
    Timeout(String),

    /// Progress was reported from code the dispatcher is not running as a task.
    #[error("update_state called outside a running task")]
    NotInTask,

    /// The task ended in a failure state; carries Celery's exception fields.
    #[error("{exc_type}: {message}")]
    TaskFailed {
        /// The exception class name (`exc_type`).
        exc_type: String,
        /// The exception message, joined from `exc_message`.
        message: String,
    },
}

/// A task sent without waiting for its confirmation, which the broker did not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The task's id.
    pub task_id: String,
    /// Why: the nack, or the loss of the channel or connection.
    pub reason: String,
}

/// How many tasks the broker did not take, and the first few with why.
fn refusals(refused: &[Refused]) -> String {
    const NAMED: usize = 3;
    let named: Vec<String> = refused
        .iter()
        .take(NAMED)
        .map(|r| format!("{} ({})", r.task_id, r.reason))
        .collect();
    let more = match refused.len().saturating_sub(NAMED) {
        0 => String::new(),
        more => format!(" and {more} more"),
    };
    format!(
        "the broker did not take {} task(s) sent: {}{more}",
        refused.len(),
        named.join(", ")
    )
}

/// A text AMQP cannot carry is a name the broker cannot take.
impl From<crate::protocol::amqp::TooLong> for Error {
    fn from(too_long: crate::protocol::amqp::TooLong) -> Self {
        Self::InvalidName(too_long.to_string())
    }
}

/// Shorthand used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(n: usize) -> Vec<Refused> {
        (0..n)
            .map(|i| Refused {
                task_id: format!("t{i}"),
                reason: "nack".into(),
            })
            .collect()
    }

    #[test]
    fn a_flush_names_the_first_refused_tasks_and_counts_the_rest() {
        assert_eq!(
            Error::Unconfirmed(refused(1)).to_string(),
            "the broker did not take 1 task(s) sent: t0 (nack)"
        );
        assert_eq!(
            Error::Unconfirmed(refused(5)).to_string(),
            "the broker did not take 5 task(s) sent: t0 (nack), t1 (nack), t2 (nack) and 2 more"
        );
    }
}
