//! The web app's one error type, and how each error answers a client: JSON `{"error": "..."}`
//! with the status that names the problem. Internal details are logged, never sent.

use rocket::http::Status;
use rocket::response::{self, Responder};
use rocket::serde::json::Json;
use rocket::Request;
use serde::Serialize;
use utoipa::{ToResponse, ToSchema};

/// Everything a request or the app's start-up can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (e.g. not JSON, not a UUID).
    #[error("{0}")]
    BadRequest(String),
    /// The body is well-formed but its fields are wrong.
    #[error("{0}")]
    Unprocessable(String),
    /// The body is over the configured limit.
    #[error("request body is larger than {0} bytes")]
    TooLarge(u64),
    /// A workflow whose steps, each passing its payload on, could store more than
    /// `web_workflow_max_bytes`.
    #[error("a workflow of {steps} steps of a {bytes}-byte body is over web_workflow_max_bytes ({max}): fewer steps or a smaller body")]
    WorkflowTooLarge {
        steps: usize,
        bytes: usize,
        max: u64,
    },
    /// The body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No job has that id.
    #[error("no job or workflow with id {0}")]
    NotFound(String),
    /// A unique job (or a workflow's step) whose lock another task holds: that task is queued or
    /// running.
    #[error("`{task}` is not unique: task {holder} holds its lock `{lock}` while it is queued or running")]
    NotUnique {
        task: String,
        lock: String,
        holder: String,
    },
    /// The result backend, which holds unique locks, could not be reached.
    #[error("the result backend is unavailable: {0}")]
    BackendUnavailable(String),
    /// The broker did not take the message.
    #[error("the broker did not accept the job; it is recorded and was not sent: {0}")]
    Publish(String),
    /// The broker could not be reached or did not answer.
    #[error("the broker is unavailable: {0}")]
    BrokerUnavailable(String),
    /// Every status stream this process allows (`web_max_streams`) is open.
    #[error("{0} status streams are open, the most web_max_streams allows; try again later")]
    TooManyStreams(usize),
    /// The database could not be reached.
    #[error("the database is unavailable: {0}")]
    DatabaseUnavailable(String),
    /// A query failed (a server that went away is [`Error::DatabaseUnavailable`] instead).
    #[error("database error: {0}")]
    Database(diesel::result::Error),
    /// Migrations could not be applied.
    #[error("migrations: {0}")]
    Migration(String),
    /// The Celery runtime failed (config, broker, backend).
    #[error(transparent)]
    Runtime(#[from] runtime::Error),
}

impl From<diesel::result::Error> for Error {
    fn from(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind as Kind, Error as Diesel};
        match &error {
            // The connection broke, or the server refused the statement for its own state
            // (shutting down, starting up, out of connections or space): the request was fine
            // and may be sent again. Only a broken constraint or a bug of ours is a 500.
            Diesel::DatabaseError(
                Kind::UnableToSendCommand
                | Kind::ClosedConnection
                | Kind::SerializationFailure
                | Kind::ReadOnlyTransaction
                | Kind::Unknown,
                info,
            ) => Error::DatabaseUnavailable(info.message().to_string()),
            _ => Error::Database(error),
        }
    }
}

impl From<deadpool::managed::PoolError<diesel_async::pooled_connection::PoolError>> for Error {
    fn from(
        error: deadpool::managed::PoolError<diesel_async::pooled_connection::PoolError>,
    ) -> Self {
        Error::DatabaseUnavailable(error.to_string())
    }
}

impl Error {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> Status {
        match self {
            Error::BadRequest(_) => Status::BadRequest,
            Error::Unprocessable(_) => Status::UnprocessableEntity,
            Error::TooLarge(_) | Error::WorkflowTooLarge { .. } => Status::PayloadTooLarge,
            Error::UnsupportedMediaType(_) => Status::UnsupportedMediaType,
            Error::NotFound(_) => Status::NotFound,
            Error::NotUnique { .. } => Status::Conflict,
            Error::Publish(_)
            | Error::BrokerUnavailable(_)
            | Error::BackendUnavailable(_)
            | Error::DatabaseUnavailable(_)
            | Error::TooManyStreams(_) => Status::ServiceUnavailable,
            Error::Database(_) | Error::Migration(_) | Error::Runtime(_) => {
                Status::InternalServerError
            }
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong; for a 500 only "internal error", for a 401 only "Unauthorized".
    #[schema(example = "unknown task `tasks.nope`")]
    pub error: String,
}

/// The body of a 409: a unique job refused, naming the task that holds its lock.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotUniqueBody {
    #[schema(
        example = "`tasks.add` is not unique: task f4d39611-b181-4004-85fd-6208e91cb392 holds its lock `tasks.add:5e1c…` while it is queued or running"
    )]
    pub error: String,
    /// The task id of the job holding the lock (a Python caller's lock may name any text).
    #[schema(example = "f4d39611-b181-4004-85fd-6208e91cb392")]
    pub holder: String,
    /// `/status/<holder>`, where that job is followed (404 when it was not sent by this API).
    #[schema(example = "/status/f4d39611-b181-4004-85fd-6208e91cb392")]
    pub status_url: String,
}

/// The 401 of every guarded route, described once for the API document.
#[derive(ToResponse)]
#[response(description = "a bearer token is required and was missing or refused")]
#[expect(
    dead_code,
    reason = "never built: the API document reads its type through the derive"
)]
pub struct Unauthorized(ErrorBody);

/// The 503 of every route that reads or writes the jobs table, described once for the API
/// document.
#[derive(ToResponse)]
#[response(description = "the database is unavailable")]
#[expect(
    dead_code,
    reason = "never built: the API document reads its type through the derive"
)]
pub struct DatabaseUnavailable(ErrorBody);

impl<'r> Responder<'r, 'static> for Error {
    fn respond_to(self, request: &'r Request<'_>) -> response::Result<'static> {
        let status = self.status();
        if let Error::NotUnique { holder, .. } = &self {
            let body = NotUniqueBody {
                error: self.to_string(),
                status_url: crate::links::status_url(holder),
                holder: holder.clone(),
            };
            return (status, Json(body)).respond_to(request);
        }
        let message = if status == Status::InternalServerError {
            tracing::error!(error = %self, uri = %request.uri(), "request failed");
            "internal error".to_string()
        } else {
            if status.code >= 500 {
                tracing::warn!(error = ?self, uri = %request.uri(), "request could not be served");
            }
            self.to_string()
        };
        (status, Json(ErrorBody { error: message })).respond_to(request)
    }
}

/// JSON bodies for errors Rocket raises itself (no route, a guard that failed).
#[rocket::catch(default)]
pub fn catch_all(status: Status, _request: &Request<'_>) -> Json<ErrorBody> {
    Json(ErrorBody {
        error: status.reason_lossy().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind, Error as Diesel};

    fn database_error(kind: DatabaseErrorKind, message: &str) -> Error {
        Diesel::DatabaseError(kind, Box::new(message.to_string())).into()
    }

    #[test]
    fn a_database_gone_away_is_503_and_a_broken_constraint_500() {
        for (kind, message) in [
            (DatabaseErrorKind::UnableToSendCommand, "connection closed"),
            (
                DatabaseErrorKind::Unknown,
                "terminating connection due to administrator command",
            ),
        ] {
            let error = database_error(kind, message);
            assert_eq!(error.status(), Status::ServiceUnavailable, "{error}");
            assert!(error.to_string().contains(message), "{error}");
        }
        let duplicate = database_error(DatabaseErrorKind::UniqueViolation, "duplicate key");
        assert_eq!(duplicate.status(), Status::InternalServerError);
        assert_eq!(
            Error::from(Diesel::NotFound).status(),
            Status::InternalServerError
        );
    }
}
