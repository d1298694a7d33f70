//! Unique tasks: while a task sent as unique is queued or running, another send with the same
//! lock name is refused. The lock is a Redis key in the result backend holding the id of the task
//! that took it, set with `NX` and an expiry at send time; the message carries the lock name in
//! its [`UNIQUE_KEY_HEADER`] so the worker that ends the task gives the lock back (only if that
//! task still holds it). A worker that dies never gives it back: the expiry does.
//!
//! The lock name is the caller's own key, else the task name and a SHA-256 of its arguments as
//! canonical JSON (object keys sorted), so that the same call made from Rust or from Python, with
//! kwargs in any order, names the same lock.
//!
//! A send asks for a lock per call, or the task's `task_annotations` entry asks for it on every
//! send of the task ([`Lock::asked`]).

use std::time::Duration;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// The message header naming the lock a unique task holds (without [`KEY_PREFIX`]). A Python
/// caller opts in by taking the lock itself and sending `apply_async(headers={"unique_key": ..})`.
pub const UNIQUE_KEY_HEADER: &str = "unique_key";

/// Prefix of every lock key in the result backend's database, so a header can only ever name a
/// lock, never another key.
pub const KEY_PREFIX: &str = "rcelery-unique:";

/// The lock name of task `name` called with `args` and `kwargs`: `<name>:<sha256 hex>`.
pub fn lock_name(name: &str, args: &[Value], kwargs: &Map<String, Value>) -> String {
    // serde_json's maps are ordered by key (no `preserve_order` feature), so this text is
    // canonical: the same arguments always give the same bytes.
    let canonical = serde_json::to_string(&(args, kwargs)).expect("JSON values serialize");
    format!("{name}:{:x}", Sha256::digest(canonical.as_bytes()))
}

/// The Redis key of lock `name`.
pub fn lock_key(name: &str) -> String {
    format!("{KEY_PREFIX}{name}")
}

/// The unique lock a send takes: its name, as the message's header carries it, and its life in
/// whole seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub name: String,
    pub seconds: u64,
}

/// Why a send's unique options name no lock.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unique_key needs unique_for (per call, or the task's task_annotations entry)")]
pub struct KeyWithoutDuration;

impl Lock {
    /// The lock a send of task `name` with `args` and `kwargs` takes: for `unique_for` when the
    /// call asks, else for the task's `default` (its `task_annotations` `unique_for`); named
    /// `unique_key` when given, else after the call ([`lock_name`]). `None`: the send is not
    /// unique.
    pub fn asked(
        name: &str,
        args: &[Value],
        kwargs: &Map<String, Value>,
        unique_for: Option<Duration>,
        unique_key: Option<String>,
        default: Option<Duration>,
    ) -> Result<Option<Self>, KeyWithoutDuration> {
        match (unique_for.or(default), unique_key) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(KeyWithoutDuration),
            (Some(unique_for), key) => Ok(Some(Self {
                name: key.unwrap_or_else(|| lock_name(name, args, kwargs)),
                seconds: ttl_seconds(unique_for),
            })),
        }
    }
}

/// Whole seconds a lock held `for` lives: rounded up, at least one (Redis `EX` takes no less).
pub fn ttl_seconds(unique_for: Duration) -> u64 {
    unique_for.as_millis().div_ceil(1000).max(1) as u64
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn kwargs(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    #[test]
    fn the_same_call_names_the_same_lock_whatever_the_order_of_its_kwargs() {
        let a = lock_name(
            "t",
            &[json!(1)],
            &kwargs(json!({"b": 2, "a": {"y": 1, "x": 0}})),
        );
        let b = lock_name(
            "t",
            &[json!(1)],
            &kwargs(json!({"a": {"x": 0, "y": 1}, "b": 2})),
        );
        assert_eq!(a, b);
        assert!(a.starts_with("t:"));
        assert_eq!(a.len(), "t:".len() + 64);
    }

    #[test]
    fn another_name_or_other_arguments_name_another_lock() {
        let base = lock_name("t", &[json!(1)], &Map::new());
        assert_ne!(base, lock_name("u", &[json!(1)], &Map::new()));
        assert_ne!(base, lock_name("t", &[json!("1")], &Map::new()));
        assert_ne!(base, lock_name("t", &[], &kwargs(json!({"x": 1}))));
        // Arguments and kwargs are told apart: one positional list is not a kwarg.
        assert_ne!(
            lock_name("t", &[json!([])], &Map::new()),
            lock_name("t", &[], &Map::new())
        );
    }

    #[test]
    fn a_known_call_hashes_to_the_sha256_of_its_canonical_json() {
        // Python's `sha256(json.dumps([args, kwargs], separators=(",", ":"), sort_keys=True,
        // ensure_ascii=False).encode())` of the same call.
        let name = lock_name("t", &[json!(1), json!("a")], &kwargs(json!({"k": true})));
        assert_eq!(
            name,
            "t:ce5435e4715db46c10cede3c029821664f9ebbd8bb68daf99a6e3bfded1d676f"
        );
    }

    #[test]
    fn a_call_s_own_duration_wins_over_the_task_s_default_and_a_key_names_the_lock() {
        let (args, none) = ([json!(1)], Map::new());
        let asked = |unique_for: Option<u64>, key: Option<&str>, default: Option<u64>| {
            Lock::asked(
                "t",
                &args,
                &none,
                unique_for.map(Duration::from_secs),
                key.map(str::to_string),
                default.map(Duration::from_secs),
            )
        };
        let by_call = lock_name("t", &args, &none);
        assert_eq!(asked(None, None, None), Ok(None));
        assert_eq!(
            asked(None, None, Some(60)),
            Ok(Some(Lock {
                name: by_call.clone(),
                seconds: 60
            }))
        );
        assert_eq!(
            asked(Some(5), None, Some(60)),
            Ok(Some(Lock {
                name: by_call,
                seconds: 5
            }))
        );
        assert_eq!(
            asked(None, Some("k"), Some(60)),
            Ok(Some(Lock {
                name: "k".into(),
                seconds: 60
            }))
        );
        assert_eq!(asked(None, Some("k"), None), Err(KeyWithoutDuration));
    }

    #[test]
    fn ttls_round_up_to_whole_seconds_of_at_least_one() {
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(ttl_seconds(Duration::from_secs(60)), 60);
    }
}
