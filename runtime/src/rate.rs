//! Per-task rate limits (`rate_limit = "10/s"`, `"100/m"`, `"1000/h"`), as Celery spaces task
//! starts: a token bucket of one token refilled at the limit's rate.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};

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
}
