//! Celery's failover list in `broker_url`: `amqp://a//;amqp://b//;amqp://c//`, tried in the
//! order `broker_failover_strategy` says (`round-robin`, the default, or `shuffle`).
//!
//! As kombu reads it: the list is split at `;`, and an entry without `://` is a host
//! (`host` or `host:port`) that takes everything else (scheme, credentials, virtual host,
//! query) from the first URL. Round-robin starts at the first URL and, once a connection is
//! made, goes on from the URL after it: the reconnect that follows a lost node tries the next
//! node first, and the lost one last. Shuffle tries the URLs in a new random order each time.
//! The position is kept per process and per list, as kombu keeps it per connection object.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, OnceLock};

use crate::config::FailoverStrategy;
use crate::urls::failover_urls;

/// Indexes of `len` URLs in the order one connect tries them, round-robin from `start`.
fn order(len: usize, strategy: FailoverStrategy, start: usize) -> Vec<usize> {
    match strategy {
        FailoverStrategy::RoundRobin => (0..len).map(|i| (start + i) % len).collect(),
        FailoverStrategy::Shuffle => {
            // A fresh RandomState is freshly keyed: sorting by its hashes is a random order,
            // without a dependency for it.
            let keys = RandomState::new();
            let mut indexes: Vec<usize> = (0..len).collect();
            indexes.sort_by_cached_key(|i| keys.hash_one(i));
            indexes
        }
    }
}

/// Per list, the index round-robin starts from next.
fn positions() -> &'static Mutex<HashMap<String, usize>> {
    static POSITIONS: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
    POSITIONS.get_or_init(Default::default)
}

/// The URLs of `list` in the order this connect tries them.
pub(crate) fn attempts(list: &str, strategy: FailoverStrategy) -> Vec<(usize, String)> {
    let urls = failover_urls(list);
    let start = positions()
        .lock()
        .expect("failover positions")
        .get(list)
        .copied()
        .unwrap_or(0);
    order(urls.len(), strategy, start)
        .into_iter()
        .map(|i| (i, urls[i].clone()))
        .collect()
}

/// Records that URL `index` of `list` took the connection: the next connect starts after it.
pub(crate) fn connected(list: &str, index: usize) {
    let len = failover_urls(list).len().max(1);
    positions()
        .lock()
        .expect("failover positions")
        .insert(list.to_string(), (index + 1) % len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_goes_on_after_the_url_that_connected() {
        let list = "amqp://h1:5701//;amqp://h2:5702//;amqp://h3:5703//";
        let ports = |attempts: Vec<(usize, String)>| -> Vec<usize> {
            attempts.into_iter().map(|(i, _)| i).collect()
        };
        assert_eq!(
            ports(attempts(list, FailoverStrategy::RoundRobin)),
            [0, 1, 2]
        );
        connected(list, 0);
        assert_eq!(
            ports(attempts(list, FailoverStrategy::RoundRobin)),
            [1, 2, 0]
        );
        connected(list, 2);
        assert_eq!(
            ports(attempts(list, FailoverStrategy::RoundRobin)),
            [0, 1, 2]
        );
        // Another list keeps a position of its own.
        assert_eq!(
            ports(attempts(
                "amqp://a//;amqp://b//",
                FailoverStrategy::RoundRobin
            )),
            [0, 1]
        );
    }

    #[test]
    fn shuffle_tries_every_url_once_in_varying_orders() {
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..64 {
            let mut tried = order(3, FailoverStrategy::Shuffle, 0);
            firsts.insert(tried[0]);
            tried.sort_unstable();
            assert_eq!(tried, [0, 1, 2]);
        }
        // Each order is random: 64 draws that all start alike have a chance of 3 in 3^64.
        assert!(firsts.len() > 1, "{firsts:?}");
    }
}
