//! The order in which deliveries arrived on one broker connection, across its consumers.
//!
//! Each consumer's deliveries reach the worker by a way of their own, and tokio polls those
//! ways in no set order: under load, a control request asking what the worker holds
//! (`inspect scheduled`) can be answered before a task message that came in ahead of it is
//! held, and the caller, who sent the task first, finds it missing. Celery's worker, one event
//! loop reading one socket, takes them in the order they came. So task deliveries are counted
//! in as they arrive ([`Arrivals::task`]) and out once the worker has taken them in (their
//! [`Arrival`] dropped); a control request, marked as it arrives ([`Arrivals::mark`]), can wait
//! ([`Mark::caught_up`]) until every task delivery ahead of it is taken in.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The arrivals of one connection.
#[derive(Debug, Default)]
pub struct Arrivals {
    places: Mutex<Places>,
    /// Woken whenever a task delivery is taken in.
    taken: Notify,
}

#[derive(Debug, Default)]
struct Places {
    /// The place the next arrival gets.
    next: u64,
    /// The places of task deliveries not yet taken in.
    pending: BTreeSet<u64>,
}

impl Arrivals {
    /// A task delivery arriving now: pending until its [`Arrival`] is dropped.
    pub fn task(self: &Arc<Self>) -> Arrival {
        let mut places = self.places.lock().expect("arrivals lock");
        let place = places.next;
        places.next += 1;
        places.pending.insert(place);
        Arrival {
            place,
            arrivals: self.clone(),
        }
    }

    /// A message arriving now that must not overtake the task deliveries before it.
    pub fn mark(self: &Arc<Self>) -> Mark {
        let mut places = self.places.lock().expect("arrivals lock");
        let place = places.next;
        places.next += 1;
        Mark {
            place,
            arrivals: self.clone(),
        }
    }
}

/// A task delivery's place in its connection's arrival order, held until the worker has taken
/// the delivery in (held it, or decided not to).
#[derive(Debug)]
pub struct Arrival {
    place: u64,
    arrivals: Arc<Arrivals>,
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.arrivals
            .places
            .lock()
            .expect("arrivals lock")
            .pending
            .remove(&self.place);
        self.arrivals.taken.notify_waiters();
    }
}

/// A message's place in its connection's arrival order.
#[derive(Debug)]
pub struct Mark {
    place: u64,
    arrivals: Arc<Arrivals>,
}

impl Mark {
    /// Whether every task delivery that arrived before this mark is taken in.
    fn passed(&self) -> bool {
        let places = self.arrivals.places.lock().expect("arrivals lock");
        places
            .pending
            .first()
            .is_none_or(|first| *first > self.place)
    }

    /// Waits until every task delivery that arrived before this mark is taken in.
    pub async fn caught_up(&self) {
        loop {
            let taken = self.arrivals.taken.notified();
            tokio::pin!(taken);
            // Registered before looking, so a delivery taken in between still wakes us.
            taken.as_mut().enable();
            if self.passed() {
                return;
            }
            taken.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn caught_up_soon(mark: &Mark) -> bool {
        tokio::time::timeout(Duration::from_millis(50), mark.caught_up())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_mark_waits_for_the_task_deliveries_that_came_before_it() {
        let arrivals = Arc::new(Arrivals::default());
        let first = arrivals.task();
        let second = arrivals.task();
        let mark = arrivals.mark();
        assert!(!caught_up_soon(&mark).await);
        drop(second);
        assert!(!caught_up_soon(&mark).await, "the first is still pending");
        let waiting = tokio::spawn(async move { mark.caught_up().await });
        tokio::task::yield_now().await;
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken when the last one before it is taken in")
            .unwrap();
    }

    #[tokio::test]
    async fn a_mark_does_not_wait_for_task_deliveries_after_it() {
        let arrivals = Arc::new(Arrivals::default());
        let mark = arrivals.mark();
        let _later = arrivals.task();
        assert!(caught_up_soon(&mark).await);
    }
}
