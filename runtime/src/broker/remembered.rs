//! What a broker connection remembers of the queues it has declared, bounded: every new queue
//! name a publisher sees would otherwise stay in memory for the life of the process. Forgetting
//! a queue only costs declaring it again, so the least recently used one is let go.

use std::collections::HashMap;

/// Queues one connection remembers at most.
pub const MAX_REMEMBERED_QUEUES: usize = 1024;

/// Up to a bound of queue names, each with what is known of it, least recently used first out.
#[derive(Debug)]
pub struct Remembered<V> {
    entries: HashMap<String, (V, u64)>,
    /// Bumped at each use; an entry's stamp is its last use.
    clock: u64,
    bound: usize,
}

impl<V> Default for Remembered<V> {
    fn default() -> Self {
        Self::with_bound(MAX_REMEMBERED_QUEUES)
    }
}

impl<V> Remembered<V> {
    /// At most `bound` queues (at least one).
    pub fn with_bound(bound: usize) -> Self {
        Self {
            entries: HashMap::new(),
            clock: 0,
            bound: bound.max(1),
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// What is known of `queue`, marking it used.
    pub fn get(&mut self, queue: &str) -> Option<&V> {
        let now = self.tick();
        let (value, used) = self.entries.get_mut(queue)?;
        *used = now;
        Some(value)
    }

    /// Whether `queue` is known, marking it used.
    pub fn contains(&mut self, queue: &str) -> bool {
        self.get(queue).is_some()
    }

    /// Remembers `value` for `queue`, forgetting the least recently used queue when full. The
    /// scan for it is linear, but runs only when a new queue is declared, a broker round trip.
    pub fn insert(&mut self, queue: String, value: V) {
        let now = self.tick();
        if self.entries.len() >= self.bound && !self.entries.contains_key(&queue) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(queue, (value, now));
    }

    /// Forgets `queue`.
    pub fn remove(&mut self, queue: &str) {
        self.entries.remove(queue);
    }

    /// Queues remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_queue_is_forgotten_past_the_bound() {
        let mut known = Remembered::with_bound(3);
        for (n, queue) in ["a", "b", "c"].into_iter().enumerate() {
            known.insert(queue.to_string(), n);
        }
        assert_eq!(
            known.get("a"),
            Some(&0),
            "a is used again: b is now the oldest"
        );
        known.insert("d".into(), 3);
        assert_eq!(known.len(), 3);
        assert!(!known.contains("b"));
        assert!(known.contains("a") && known.contains("c") && known.contains("d"));
        known.insert("d".into(), 4);
        assert_eq!(
            (known.len(), known.get("d")),
            (3, Some(&4)),
            "an update evicts none"
        );
        known.remove("a");
        assert!(!known.contains("a"));
    }

    #[test]
    fn many_queue_names_stay_within_the_default_bound() {
        let mut known = Remembered::default();
        for n in 0..MAX_REMEMBERED_QUEUES * 3 {
            known.insert(format!("q{n}"), ());
        }
        assert_eq!(known.len(), MAX_REMEMBERED_QUEUES);
        assert!(known.contains(&format!("q{}", MAX_REMEMBERED_QUEUES * 3 - 1)));
        assert!(!known.contains("q0"));
    }
}
