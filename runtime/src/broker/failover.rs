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

/// The URLs of `list`, each whole (hosts completed from the first URL); empty entries are
/// skipped. A Sentinel list is one URL: its sentinels are tried by the Redis transport, which
/// asks them for the one master.
pub fn urls(list: &str) -> Vec<String> {
    if crate::sentinel::is_sentinel_url(list) {
        return vec![list.trim().to_string()];
    }
    let mut entries = list.split(';').map(str::trim).filter(|e| !e.is_empty());
    let Some(first) = entries.next() else {
        return Vec::new();
    };
    let mut urls = vec![first.to_string()];
    urls.extend(entries.map(|entry| {
        if entry.contains("://") {
            entry.to_string()
        } else {
            with_host(first, entry)
        }
    }));
    urls
}

/// `template` with its host (and port, when `host` has one) replaced by `host`. Left as the
/// bare entry when `template` cannot take it, so that the connect names what is wrong.
fn with_host(template: &str, host: &str) -> String {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => match port.parse::<u16>() {
            Ok(port) => (name, Some(port)),
            Err(_) => (host, None),
        },
        None => (host, None),
    };
    let Ok(mut url) = url::Url::parse(template) else {
        return host.to_string();
    };
    if url.set_host(Some(name)).is_err() {
        return host.to_string();
    }
    if port.is_some() && url.set_port(port).is_err() {
        return host.to_string();
    }
    url.to_string()
}

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
    let urls = urls(list);
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
    let len = urls(list).len().max(1);
    positions()
        .lock()
        .expect("failover positions")
        .insert(list.to_string(), (index + 1) % len);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_splits_at_semicolons_and_bare_hosts_take_the_first_urls_rest() {
        assert_eq!(
            urls("amqp://guest:pw@127.0.0.1:5701//; amqp://u:p@h2:5702/v;;h3:5703;h4"),
            [
                "amqp://guest:pw@127.0.0.1:5701//",
                "amqp://u:p@h2:5702/v",
                "amqp://guest:pw@h3:5703//",
                "amqp://guest:pw@h4:5701//",
            ]
        );
        assert_eq!(
            urls("redis://127.0.0.1:6379/0"),
            ["redis://127.0.0.1:6379/0"]
        );
        assert!(urls(" ; ").is_empty());
    }

    #[test]
    fn a_sentinel_list_is_one_url_whose_sentinels_find_one_master() {
        let list = "sentinel://:pw@127.0.0.1:26379/2;sentinel://127.0.0.1:26380/2";
        assert_eq!(urls(list), [list]);
    }

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
