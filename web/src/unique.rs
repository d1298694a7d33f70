//! Unique jobs of `POST /receive`: the locks its rows hold ([`runtime::unique`]) are taken in
//! the result backend before the rows commit, so a refused request (409, naming the task that
//! holds the lock) writes nothing, and given back when the commit fails, so a request that made
//! no job holds no lock. Each row keeps its lock's name and life, and every publish of it names
//! the lock in the message (the outbox's too), so the worker that ends the job gives it back.

use runtime::client::Client;
use uuid::Uuid;

use crate::error::Error;
use crate::store::NewJob;

/// The locks a request took, each with the task id holding it.
#[must_use = "locks taken are given back when the rows do not commit"]
pub struct Taken<'a> {
    client: &'a Client,
    locks: Vec<(String, Uuid)>,
}

/// Takes the lock of each of `rows` that holds one, in order. When another task holds one, the
/// locks taken so far are given back and the answer is 409 naming that task.
pub async fn take<'a>(client: &'a Client, rows: &[NewJob]) -> Result<Taken<'a>, Error> {
    let mut taken = Taken {
        client,
        locks: Vec::new(),
    };
    for row in rows {
        let Some(lock) = row.lock() else {
            continue;
        };
        let id = row.task_id.to_string();
        if let Err(error) = client.take_unique(&row.task_name, &lock, &id).await {
            taken.give_back().await;
            return Err(refusal(error));
        }
        taken.locks.push((lock.name, row.task_id));
    }
    Ok(taken)
}

impl Taken<'_> {
    /// Passes on `committed`; when the rows did not commit, gives the locks back first.
    pub async fn unless_committed<T>(self, committed: Result<T, Error>) -> Result<T, Error> {
        if committed.is_err() {
            self.give_back().await;
        }
        committed
    }

    async fn give_back(&self) {
        for (name, id) in &self.locks {
            self.client.give_back_unique(name, &id.to_string()).await;
        }
    }
}

/// What a lock that could not be taken answers: 409 naming its holder, 422 without a result
/// backend to hold locks, 503 when it cannot be reached.
fn refusal(error: runtime::Error) -> Error {
    match error {
        runtime::Error::NotUnique { task, lock, holder } => Error::NotUnique { task, lock, holder },
        runtime::Error::NoBackend => {
            Error::Unprocessable("a unique job needs a result_backend to hold its lock".into())
        }
        other => Error::BackendUnavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use rocket::http::Status;

    use super::*;

    #[test]
    fn a_lock_held_is_409_and_a_backend_out_of_reach_503() {
        let held = refusal(runtime::Error::NotUnique {
            task: "tasks.add".into(),
            lock: "k".into(),
            holder: "h".into(),
        });
        assert_eq!(held.status(), Status::Conflict);
        assert!(
            held.to_string().contains("task h holds its lock `k`"),
            "{held}"
        );
        assert_eq!(
            refusal(runtime::Error::NoBackend).status(),
            Status::UnprocessableEntity
        );
        let cut = redis::RedisError::from((redis::ErrorKind::IoError, "connection refused"));
        assert_eq!(
            refusal(runtime::Error::Redis(cut)).status(),
            Status::ServiceUnavailable
        );
    }
}
