//! Natural batching of the writes a connection makes for its consumers' settlements: whatever
//! is given while a write is under way goes out together in the next one, one write at a time.
//!
//! Settling one message per round trip made the broker parse a command per task and the
//! worker wake a thread per write. Here a write starts as soon as nothing else is being
//! written, so a lone settlement goes at once (no timer, no added wait) and under load the
//! settlements pile up behind the write in progress and share the next. What is gathered, and
//! how a batch is written, is each broker's own: the AMQP acks' [`Ledger`](super::amqp) plans
//! `multiple` frames, the Redis settlements drop many `unacked` records in one transaction.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::sync::oneshot;

/// What has been given and not yet written.
pub(super) trait Gathering: Default + Send + 'static {
    /// One thing given to be written.
    type Item: Send;
    /// What one write sends.
    type Batch: Send;

    /// Adds `item` to what the next write sends.
    fn add(&mut self, item: Self::Item);

    /// What the next write sends; the gathering forgets what it returns.
    fn take(&mut self) -> Self::Batch;
}

/// Writes a batch of what was gathered.
#[async_trait]
pub(super) trait Writer: Send + Sync + 'static {
    type Gathering: Gathering;
    /// Told to every giver whose item the failed write carried, so it must clone.
    type Error: Clone + Send + 'static;

    async fn write(&self, batch: <Self::Gathering as Gathering>::Batch) -> Result<(), Self::Error>;

    /// What a giver is told when no write will carry its item (the runtime is stopping).
    fn abandoned() -> Self::Error;
}

/// Items gathered for `W`, written by one write at a time, each giver told when the write
/// that carried its item ended.
pub(super) struct Coalesced<W: Writer> {
    writer: W,
    state: Mutex<State<W>>,
}

type Told<W> = oneshot::Sender<Result<(), <W as Writer>::Error>>;

struct State<W: Writer> {
    gathered: W::Gathering,
    /// Givers whose items are gathered and not yet written.
    waiting: Vec<Told<W>>,
    /// Whether a write is under way; it takes what is given meanwhile before it ends.
    writing: bool,
}

impl<W: Writer> Coalesced<W> {
    pub(super) fn new(writer: W) -> Arc<Self> {
        Arc::new(Self {
            writer,
            state: Mutex::new(State {
                gathered: W::Gathering::default(),
                waiting: Vec::new(),
                writing: false,
            }),
        })
    }

    pub(super) fn writer(&self) -> &W {
        &self.writer
    }

    /// Runs `f` on what is gathered, for what a gathering must learn apart from items (the
    /// AMQP ledger, every delivery the server numbered).
    pub(super) fn gathered<R>(&self, f: impl FnOnce(&mut W::Gathering) -> R) -> R {
        f(&mut self.state().gathered)
    }

    /// Gives `item` and waits until the write that carries it ends.
    pub(super) async fn give(
        self: &Arc<Self>,
        item: <W::Gathering as Gathering>::Item,
    ) -> Result<(), W::Error> {
        let (told, outcome) = oneshot::channel();
        let lead = {
            let mut state = self.state();
            state.gathered.add(item);
            state.waiting.push(told);
            !std::mem::replace(&mut state.writing, true)
        };
        if lead {
            // A task of its own: a giver's future may be dropped (a cold shutdown), and the
            // write it would have made for the others must still go.
            tokio::spawn(self.clone().write_all());
        }
        outcome.await.unwrap_or_else(|_| Err(W::abandoned()))
    }

    /// Writes what is gathered until nothing is left, then lets the next giver lead.
    async fn write_all(self: Arc<Self>) {
        loop {
            let (batch, waiting) = {
                let mut state = self.state();
                if state.waiting.is_empty() {
                    state.writing = false;
                    return;
                }
                (state.gathered.take(), std::mem::take(&mut state.waiting))
            };
            let written = self.writer.write(batch).await;
            for told in waiting {
                let _ = told.send(written.clone());
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State<W>> {
        // The state stays whole when a holder panics: no holder runs code that can, but a
        // gathering's own code runs under the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gathers numbers in the order given.
    #[derive(Default)]
    struct Numbers(Vec<u32>);

    impl Gathering for Numbers {
        type Item = u32;
        type Batch = Vec<u32>;

        fn add(&mut self, item: u32) {
            self.0.push(item);
        }

        fn take(&mut self) -> Vec<u32> {
            std::mem::take(&mut self.0)
        }
    }

    /// Records each batch; a batch holding `bad` fails, and each write waits to be let go
    /// (`gate`), so that a test decides what piles up behind a write.
    struct Recording {
        batches: Mutex<Vec<Vec<u32>>>,
        bad: u32,
        gate: tokio::sync::Semaphore,
    }

    #[async_trait]
    impl Writer for Recording {
        type Gathering = Numbers;
        type Error = String;

        async fn write(&self, batch: Vec<u32>) -> Result<(), String> {
            self.gate.acquire().await.expect("gate open").forget();
            let failed = batch.contains(&self.bad);
            self.batches.lock().unwrap().push(batch);
            match failed {
                true => Err(format!("{} is bad", self.bad)),
                false => Ok(()),
            }
        }

        fn abandoned() -> String {
            "abandoned".into()
        }
    }

    fn recording(bad: u32, open: usize) -> Arc<Coalesced<Recording>> {
        Coalesced::new(Recording {
            batches: Mutex::default(),
            bad,
            gate: tokio::sync::Semaphore::new(open),
        })
    }

    fn batches(coalesced: &Coalesced<Recording>) -> Vec<Vec<u32>> {
        coalesced.writer().batches.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_lone_item_is_written_at_once() {
        let coalesced = recording(u32::MAX, 1);
        coalesced.give(7).await.unwrap();
        assert_eq!(batches(&coalesced), [vec![7]]);
    }

    /// Yields until `holds` is true of the coalescer's state.
    async fn until(coalesced: &Coalesced<Recording>, holds: impl Fn(&State<Recording>) -> bool) {
        while !holds(&coalesced.state()) {
            tokio::task::yield_now().await;
        }
    }

    fn give(
        coalesced: &Arc<Coalesced<Recording>>,
        n: u32,
    ) -> tokio::task::JoinHandle<Result<(), String>> {
        let coalesced = coalesced.clone();
        tokio::spawn(async move { coalesced.give(n).await })
    }

    /// Gives 1 and then 2..=5 while the write of 1 is held at the gate, then opens it.
    async fn one_then_four_behind_it(
        coalesced: &Arc<Coalesced<Recording>>,
    ) -> Vec<Result<(), String>> {
        let first = give(coalesced, 1);
        until(coalesced, |state| {
            state.writing && state.gathered.0.is_empty()
        })
        .await;
        let rest: Vec<_> = (2..=5).map(|n| give(coalesced, n)).collect();
        until(coalesced, |state| state.gathered.0.len() == 4).await;
        coalesced.writer().gate.add_permits(2);
        let mut outcomes = vec![first.await.unwrap()];
        for given in rest {
            outcomes.push(given.await.unwrap());
        }
        outcomes
    }

    #[tokio::test]
    async fn what_is_given_during_a_write_goes_together_in_the_next() {
        let coalesced = recording(u32::MAX, 0);
        let outcomes = one_then_four_behind_it(&coalesced).await;
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        let mut written = batches(&coalesced);
        written[1].sort_unstable();
        assert_eq!(written, [vec![1], vec![2, 3, 4, 5]]);
        assert!(
            !coalesced.state().writing,
            "the writer stops when nothing is left"
        );
    }

    #[tokio::test]
    async fn a_failed_write_is_told_to_every_giver_it_carried_and_to_no_other() {
        let coalesced = recording(3, 0);
        let outcomes = one_then_four_behind_it(&coalesced).await;
        assert_eq!(outcomes[0], Ok(()));
        assert!(
            outcomes[1..]
                .iter()
                .all(|o| *o == Err("3 is bad".to_string())),
            "{outcomes:?}"
        );
        coalesced.writer().gate.add_permits(1);
        coalesced.give(6).await.expect("a later write succeeds");
    }
}
