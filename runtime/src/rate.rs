//! Per-task rate limits (`rate_limit = "10/s"`, `"100/m"`, `"1000/h"`), as Celery spaces task
//! starts: a token bucket of one token refilled at the limit's rate.
//!
//! With `task_rate_limit_scope = "cluster"` the same spacing is kept for all workers together:
//! the bucket's state lives in Redis (GCRA: one key per task holding the time the next start
//! may begin), read and moved on by one script per start on the server's clock.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::error::{Error, Result};

/// Prefix of the Redis keys of cluster-wide limits: `rcelery-rate:<task name>`.
pub const CLUSTER_KEY_PREFIX: &str = "rcelery-rate:";

/// GCRA with a burst of one, the token bucket's shape: KEYS[1] holds the theoretical arrival
/// time (µs, server clock) of the next start; ARGV[1] is the spacing in µs. Reserves the next
/// start at max(now, TAT), moves TAT one spacing on, and returns the µs to wait (0: go now).
/// `TIME` is the server's, so the workers' clocks do not matter; the key expires once the time
/// it holds has passed, when it would tell nothing anyway.
static CLUSTER_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local spacing = tonumber(ARGV[1])
-- Lua prints big numbers as 1.7e+15; '%.0f' keeps every µs of the stored time.
local start = math.max(now, tonumber(redis.call('GET', KEYS[1]) or now))
local next_start = start + spacing
redis.call('SET', KEYS[1], string.format('%.0f', next_start), 'PX',
  math.floor((next_start - now) / 1000) + 1000)
return start - now
"#,
    )
});

/// Parses Celery's rate notation into tasks per second; `None` for "no limit" (`"0"`, empty).
pub fn parse(rate: &str) -> Result<Option<f64>> {
    let rate = rate.trim();
    let bad = || Error::Config(format!("invalid rate limit {rate:?}: use N/s, N/m or N/h"));
    let (count, per) = match rate.split_once('/') {
        Some((count, unit)) => {
            let seconds = match unit.trim() {
                "s" => 1.0,
                "m" => 60.0,
                "h" => 3600.0,
                _ => return Err(bad()),
            };
            (count.trim(), seconds)
        }
        None => (rate, 1.0),
    };
    if count.is_empty() {
        return Ok(None);
    }
    let count: f64 = count.parse().map_err(|_| bad())?;
    if !count.is_finite() || count < 0.0 {
        return Err(bad());
    }
    Ok((count > 0.0).then_some(count / per))
}

/// Spaces events at most `per_second` apart on average, allowing one at once.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket for `per_second` events.
    pub fn new(per_second: f64) -> Self {
        Self {
            per_second,
            tokens: 1.0,
            updated: Instant::now(),
        }
    }

    /// The events per second it allows.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// Takes a token, now or in the future; returns how long to wait before acting on it.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(1.0);
        self.updated = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            // A rate so slow the wait overflows (`1e-30/s`) waits for ever, without a panic.
            Duration::try_from_secs_f64(-self.tokens / self.per_second).unwrap_or(Duration::MAX)
        }
    }
}

/// The Redis key of `task`'s cluster-wide limit.
pub fn cluster_key(task: &str) -> String {
    format!("{CLUSTER_KEY_PREFIX}{task}")
}

/// The spacing between starts at `per_second`, in whole µs as the script takes it (at least 1;
/// a rate too slow for the clock is spaced a year apart rather than overflowing).
pub fn spacing_micros(per_second: f64) -> u64 {
    const YEAR_MICROS: f64 = 365.0 * 86_400.0 * 1e6;
    (1e6 / per_second).clamp(1.0, YEAR_MICROS).round() as u64
}

/// Takes the next start of the limit shared under `key` at `per_second`, as
/// [`TokenBucket::reserve`] does for one worker; returns how long to wait before starting.
pub async fn reserve_shared(
    connection: &mut impl redis::aio::ConnectionLike,
    key: &str,
    per_second: f64,
) -> Result<Duration> {
    let micros: u64 = CLUSTER_SCRIPT
        .key(key)
        .arg(spacing_micros(per_second))
        .invoke_async(connection)
        .await?;
    Ok(Duration::from_micros(micros))
}

/// [`reserve_shared`] on `connection()`, asked again while Redis fails, the waits doubling from
/// 0.1 s to 5 s. It fails closed: no start goes past the limit for want of Redis, and none is
/// taken until Redis answers; the caller ends the wait (the worker's, at shutdown or a revoke).
pub async fn reserve_shared_or_hold<C: redis::aio::ConnectionLike>(
    mut connection: impl FnMut() -> C,
    key: &str,
    per_second: f64,
) -> Duration {
    let mut backoff = Duration::from_millis(100);
    loop {
        match reserve_shared(&mut connection(), key, per_second).await {
            Ok(wait) => return wait,
            Err(error) => {
                warn!(%key, %error, retry_in = ?backoff, "cluster rate limiter unreachable, holding the task");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_celery_rates() {
        assert_eq!(parse("10/s").unwrap(), Some(10.0));
        assert_eq!(parse("120/m").unwrap(), Some(2.0));
        assert_eq!(parse("3600/h").unwrap(), Some(1.0));
        assert_eq!(parse("5").unwrap(), Some(5.0));
        assert_eq!(parse("0").unwrap(), None);
        assert_eq!(parse("").unwrap(), None);
        for bad in ["ten/s", "1/d", "-1/s", "1/"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reservations_are_spaced_by_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(4.0);
        let waits: Vec<Duration> = (0..4).map(|_| bucket.reserve(start)).collect();
        assert_eq!(waits, [0.0, 0.25, 0.5, 0.75].map(Duration::from_secs_f64));
        // A rate too slow for any clock is no panic: the second start waits for ever.
        let mut glacial = TokenBucket::new(parse("1e-30/s").unwrap().unwrap());
        assert_eq!(glacial.reserve(start), Duration::ZERO);
        assert_eq!(glacial.reserve(start), Duration::MAX);
        // A second later the backlog is paid off and one token is back.
        assert_eq!(
            bucket.reserve(start + Duration::from_secs(2)),
            Duration::ZERO
        );
    }

    /// A Redis that refuses the first `failures` commands, then answers every script "wait
    /// 250 ms"; its clones (one connection each) count in `asked` together.
    #[derive(Clone)]
    struct Flaky {
        failures: usize,
        asked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl redis::aio::ConnectionLike for Flaky {
        fn req_packed_command<'a>(
            &'a mut self,
            _: &'a redis::Cmd,
        ) -> redis::RedisFuture<'a, redis::Value> {
            let asked = 1 + self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = if asked <= self.failures {
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into())
            } else {
                Ok(redis::Value::Int(250_000))
            };
            Box::pin(async move { answer })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a redis::Pipeline,
            _: usize,
            _: usize,
        ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
            unreachable!("the limiter sends no pipelines")
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    #[tokio::test]
    async fn an_unreachable_limiter_holds_the_task_until_it_answers() {
        let flaky = Flaky {
            failures: 2,
            asked: Default::default(),
        };
        let began = Instant::now();
        let wait = reserve_shared_or_hold(|| flaky.clone(), "rcelery-rate:t", 4.0).await;
        assert_eq!(wait, Duration::from_millis(250));
        assert_eq!(flaky.asked.load(std::sync::atomic::Ordering::SeqCst), 3);
        // Held 0.1 s, then 0.2 s, before the answer that let it go.
        assert!(
            began.elapsed() >= Duration::from_millis(300),
            "{:?}",
            began.elapsed()
        );
    }

    #[test]
    fn cluster_limits_are_keyed_by_task_and_spaced_in_micros() {
        assert_eq!(cluster_key("tasks.add"), "rcelery-rate:tasks.add");
        assert_eq!(spacing_micros(parse("60/m").unwrap().unwrap()), 1_000_000);
        assert_eq!(spacing_micros(parse("20/s").unwrap().unwrap()), 50_000);
        assert_eq!(spacing_micros(parse("3/s").unwrap().unwrap()), 333_333);
        // Faster than the clock's grain: starts 1 µs apart, never 0 (no limit at all).
        assert_eq!(spacing_micros(1e9), 1);
        assert_eq!(spacing_micros(1e-30), 31_536_000_000_000);
    }
}
