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
//!
//! A broker that pushes (AMQP) hands over its deliveries in the order they came. One that is
//! pulled from (Redis: lists fetched by the consumer, control requests by pub/sub on another
//! connection) may hear of a request before it has fetched the task sent ahead of it, which
//! waits in its list. Each fetch loop there is a [`Puller`]: a mark also waits until every
//! puller has finished a fetch begun after the mark (so has taken what was sent before it), or
//! has no room to take anything, and wakes the idle ones so that this costs no idle wait.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// The arrivals of one connection.
#[derive(Debug, Default)]
pub struct Arrivals {
    places: Mutex<Places>,
    /// Woken whenever a task delivery is taken in, or a puller finishes a fetch, runs out of
    /// room or stops: what a waiting mark looks at.
    changed: Notify,
    /// Woken by each mark: idle pullers fetch at once.
    wanted: Notify,
}

#[derive(Debug, Default)]
struct Places {
    /// The place the next arrival gets.
    next: u64,
    /// The places of task deliveries not yet taken in.
    pending: BTreeSet<u64>,
    /// The pullers of this connection, by id.
    pullers: BTreeMap<u64, Pulling>,
    /// The id the next puller gets.
    next_puller: u64,
}

/// Where one puller stands.
#[derive(Debug, Default)]
struct Pulling {
    /// The place at which its last finished fetch began.
    fetched_from: Option<u64>,
    /// Whether it waits for room (every prefetch slot taken), so fetches nothing.
    full: bool,
}

impl Places {
    fn take(&mut self) -> u64 {
        let place = self.next;
        self.next += 1;
        place
    }

    /// Whether every puller has fetched since `place`, or cannot fetch.
    fn pulled_since(&self, place: u64) -> bool {
        self.pullers
            .values()
            .all(|pulling| pulling.full || pulling.fetched_from.is_some_and(|from| from > place))
    }

    /// Whether no task delivery placed before `place` is still pending.
    fn taken_in_before(&self, place: u64) -> bool {
        self.pending.range(..place).next().is_none()
    }
}

impl Arrivals {
    /// A task delivery arriving now: pending until its [`Arrival`] is dropped.
    pub fn task(self: &Arc<Self>) -> Arrival {
        let mut places = self.places.lock().expect("arrivals lock");
        let place = places.take();
        places.pending.insert(place);
        Arrival {
            place,
            arrivals: self.clone(),
        }
    }

    /// A message arriving now that must not overtake the task deliveries before it.
    pub fn mark(self: &Arc<Self>) -> Mark {
        let place = self.places.lock().expect("arrivals lock").take();
        self.wanted.notify_waiters();
        Mark {
            place,
            arrivals: self.clone(),
        }
    }

    /// A fetch loop of this connection, counted with until dropped.
    pub fn puller(self: &Arc<Self>) -> Puller {
        let mut places = self.places.lock().expect("arrivals lock");
        let id = places.next_puller;
        places.next_puller += 1;
        places.pullers.insert(id, Pulling::default());
        Puller {
            id,
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
        self.arrivals.changed.notify_waiters();
    }
}

/// One fetch loop of a pulled connection (see the module's doc).
#[derive(Debug)]
pub struct Puller {
    id: u64,
    arrivals: Arc<Arrivals>,
}

/// A fetch begun, to be reported to [`Puller::fetched`] once its deliveries are placed.
#[derive(Debug)]
#[must_use]
pub struct Fetch {
    place: u64,
}

impl Puller {
    /// A task delivery this puller fetched: see [`Arrivals::task`].
    pub fn task(&self) -> Arrival {
        self.arrivals.task()
    }

    /// Resolves at the next mark. Enable it before fetching, so that a mark made during the
    /// fetch still cuts the idle wait after it short.
    pub fn wanted(&self) -> Notified<'_> {
        self.arrivals.wanted.notified()
    }

    /// A fetch beginning now.
    pub fn fetch(&self) -> Fetch {
        Fetch {
            place: self.arrivals.places.lock().expect("arrivals lock").take(),
        }
    }

    /// `fetch` is done, and what it took is placed (by [`Puller::task`]).
    pub fn fetched(&self, fetch: Fetch) {
        self.update(|pulling| pulling.fetched_from = Some(fetch.place));
    }

    /// Whether this puller waits for room (so takes nothing a mark could wait for).
    pub fn full(&self, full: bool) {
        self.update(|pulling| pulling.full = full);
    }

    fn update(&self, change: impl FnOnce(&mut Pulling)) {
        if let Some(pulling) = self
            .arrivals
            .places
            .lock()
            .expect("arrivals lock")
            .pullers
            .get_mut(&self.id)
        {
            change(pulling);
        }
        self.arrivals.changed.notify_waiters();
    }
}

impl Drop for Puller {
    fn drop(&mut self) {
        self.arrivals
            .places
            .lock()
            .expect("arrivals lock")
            .pullers
            .remove(&self.id);
        self.arrivals.changed.notify_waiters();
    }
}

/// A message's place in its connection's arrival order.
#[derive(Debug)]
pub struct Mark {
    place: u64,
    arrivals: Arc<Arrivals>,
}

impl Mark {
    /// Waits until every task delivery that arrived before this mark is taken in: on a pulled
    /// connection, every one its pullers fetch once the mark is made.
    pub async fn caught_up(&self) {
        // Where the deliveries to wait for end: known once every puller has fetched since.
        let mut until = None;
        loop {
            let changed = self.arrivals.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a change in between still wakes us.
            changed.as_mut().enable();
            {
                let places = self.arrivals.places.lock().expect("arrivals lock");
                if until.is_none() && places.pulled_since(self.place) {
                    until = Some(if places.pullers.is_empty() {
                        self.place
                    } else {
                        places.next
                    });
                }
                if until.is_some_and(|until| places.taken_in_before(until)) {
                    return;
                }
            }
            changed.await;
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

    #[tokio::test]
    async fn a_mark_waits_for_each_puller_to_fetch_after_it_and_for_what_it_fetched() {
        let arrivals = Arc::new(Arrivals::default());
        let puller = arrivals.puller();
        let idle = puller.fetch();
        puller.fetched(idle);
        let early = puller.fetch();
        let mark = arrivals.mark();
        puller.fetched(early);
        assert!(
            !caught_up_soon(&mark).await,
            "a fetch begun before the mark may have missed what was sent just before it"
        );
        let fetch = puller.fetch();
        let fetched = puller.task();
        puller.fetched(fetch);
        assert!(
            !caught_up_soon(&mark).await,
            "what that fetch took is not taken in"
        );
        drop(fetched);
        assert!(caught_up_soon(&mark).await);
    }

    #[tokio::test]
    async fn a_puller_without_room_or_gone_holds_no_mark_back() {
        let arrivals = Arc::new(Arrivals::default());
        let full = arrivals.puller();
        let stopped = arrivals.puller();
        let mark = arrivals.mark();
        assert!(!caught_up_soon(&mark).await);
        full.full(true);
        drop(stopped);
        assert!(caught_up_soon(&mark).await);
    }

    #[tokio::test]
    async fn a_mark_wakes_idle_pullers() {
        let arrivals = Arc::new(Arrivals::default());
        let puller = arrivals.puller();
        let wanted = puller.wanted();
        tokio::pin!(wanted);
        wanted.as_mut().enable();
        let _mark = arrivals.mark();
        tokio::time::timeout(Duration::from_secs(5), wanted)
            .await
            .expect("woken by the mark");
    }
}
