//! Group commit: writes that arrive together reach PostgreSQL as one statement in one
//! transaction. Under load the database then does one round trip, one plan and one WAL flush for
//! many requests instead of one each; a write that arrives alone goes at once (no timer, so no
//! added wait). `POST /receive` records its rows this way, and the published marks too.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::Error;

/// A write queued for the next batch, with who waits for its outcome.
struct Pending<T> {
    item: T,
    done: oneshot::Sender<Result<(), Error>>,
}

/// The outcome of a queued write, once its batch is written.
pub struct Written(oneshot::Receiver<Result<(), Error>>);

impl Written {
    /// Waits for the batch. A writer gone (the app shutting down) is an unavailable database.
    pub async fn wait(self) -> Result<(), Error> {
        self.0
            .await
            .unwrap_or_else(|_| Err(Error::DatabaseUnavailable("the writer stopped".into())))
    }
}

/// Queues items and writes them in batches with one function.
pub struct Batcher<T> {
    queue: mpsc::Sender<Pending<T>>,
}

impl<T: Clone + Send + 'static> Batcher<T> {
    /// Starts the writer: `write` stores a batch of at most `max` items, and at most `parallel`
    /// batches are written at once (what queues meanwhile forms the next batch). A batch that
    /// fails is written again item by item, so one bad item fails only its own request.
    pub fn start<W, F>(max: usize, parallel: usize, write: W) -> Self
    where
        W: Fn(Vec<T>) -> F + Send + Sync + 'static,
        F: Future<Output = Result<(), Error>> + Send + 'static,
    {
        let (queue, mut incoming) = mpsc::channel::<Pending<T>>(max * parallel);
        let write = Arc::new(write);
        let slots = Arc::new(Semaphore::new(parallel));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = incoming.recv().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < max {
                    match incoming.try_recv() {
                        Ok(pending) => batch.push(pending),
                        Err(_) => break,
                    }
                }
                let write = write.clone();
                tokio::spawn(async move {
                    write_batch(&*write, batch).await;
                    drop(slot);
                });
            }
        });
        Self { queue }
    }

    /// Queues `item`, waiting only while the queue is full; the answer tells when it is written.
    pub async fn queue(&self, item: T) -> Result<Written, Error> {
        let (done, answer) = oneshot::channel();
        self.queue
            .send(Pending { item, done })
            .await
            .map_err(|_| Error::DatabaseUnavailable("the writer stopped".into()))?;
        Ok(Written(answer))
    }

    /// Queues `item` and waits until it is written.
    pub async fn write(&self, item: T) -> Result<(), Error> {
        self.queue(item).await?.wait().await
    }
}

async fn write_batch<T, W, F>(write: &W, batch: Vec<Pending<T>>)
where
    T: Clone,
    W: Fn(Vec<T>) -> F,
    F: Future<Output = Result<(), Error>>,
{
    let items = batch.iter().map(|p| p.item.clone()).collect();
    match write(items).await {
        Ok(()) => {
            for pending in batch {
                let _ = pending.done.send(Ok(()));
            }
        }
        Err(error) if batch.len() == 1 => {
            let _ = batch.into_iter().next().map(|p| p.done.send(Err(error)));
        }
        Err(error) => {
            tracing::debug!(%error, items = batch.len(), "batch failed; writing its items one by one");
            for pending in batch {
                let _ = pending.done.send(write(vec![pending.item]).await);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The batches a test writer was given, in order.
    type Batches = Arc<Mutex<Vec<Vec<u32>>>>;

    /// A writer that records the batches it gets and refuses any batch holding `bad`.
    fn recording(bad: u32) -> (Batcher<u32>, Batches) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let batcher = Batcher::start(8, 1, move |items: Vec<u32>| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(items.clone());
                tokio::task::yield_now().await;
                match items.contains(&bad) {
                    true => Err(Error::Unprocessable(format!("{bad} is bad"))),
                    false => Ok(()),
                }
            }
        });
        (batcher, seen)
    }

    #[tokio::test]
    async fn a_lone_write_goes_at_once_as_a_batch_of_one() {
        let (batcher, seen) = recording(u32::MAX);
        batcher.write(7).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![vec![7]]);
    }

    #[tokio::test]
    async fn writes_queued_together_share_batches_of_at_most_max() {
        let (batcher, seen) = recording(u32::MAX);
        let mut answers = Vec::new();
        for item in 0..20 {
            answers.push(batcher.queue(item).await.unwrap());
        }
        for answer in answers {
            answer.wait().await.unwrap();
        }
        let batches = seen.lock().unwrap().clone();
        assert!(batches.iter().all(|b| b.len() <= 8), "{batches:?}");
        assert!(
            batches.len() < 20,
            "some writes shared a batch: {batches:?}"
        );
        let written: Vec<u32> = batches.concat();
        assert_eq!(written, (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_bad_item_fails_only_its_own_write() {
        let (batcher, seen) = recording(3);
        let mut answers = Vec::new();
        for item in 0..6 {
            answers.push(batcher.queue(item).await.unwrap());
        }
        let mut outcomes = Vec::new();
        for answer in answers {
            outcomes.push(answer.wait().await.map_err(|e| e.to_string()));
        }
        assert_eq!(outcomes[3], Err("3 is bad".to_string()));
        assert!(outcomes
            .iter()
            .enumerate()
            .all(|(i, o)| i == 3 || o.is_ok()));
        assert!(
            seen.lock()
                .unwrap()
                .iter()
                .any(|b| b.len() > 1 && b.contains(&3)),
            "the bad item first went in a shared batch"
        );
    }
}
