//! `GET /health`: whether the broker and the database answered the last check (503 when either
//! did not), from the [`Probe`]'s snapshot: no connection is taken to answer.

use chrono::{DateTime, Utc};
use rocket::http::Status;
use rocket::serde::json::Json;
use rocket::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::probe::{Down, Probe};

/// Whether the app can serve.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// The broker and the database answer.
    Ok,
    /// Either does not.
    Unavailable,
}

/// Whether one dependency answered.
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    pub ok: bool,
    /// Why not, when not: a kind of failure, never the server's words (the log has those).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Down>,
}

impl From<Result<(), Down>> for Check {
    fn from(result: Result<(), Down>) -> Self {
        Self {
            ok: result.is_ok(),
            error: result.err(),
        }
    }
}

/// The body of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: HealthStatus,
    pub broker: Check,
    pub database: Check,
    /// When both were checked (every 2 s).
    pub checked_at: DateTime<Utc>,
}

/// `{"status": "ok"|"unavailable", "broker": {...}, "database": {...}, "checked_at"}`.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "the broker and the database answered the last check", body = Health),
        (status = 503, description = "the broker or the database did not", body = Health),
    ),
)]
#[rocket::get("/health")]
pub fn health(probe: &State<Probe>) -> (Status, Json<Health>) {
    let snapshot = probe.snapshot();
    let healthy = snapshot.broker.is_ok() && snapshot.database.is_ok();
    let body = Health {
        status: if healthy {
            HealthStatus::Ok
        } else {
            HealthStatus::Unavailable
        },
        broker: snapshot.broker.into(),
        database: snapshot.database.into(),
        checked_at: snapshot.checked_at,
    };
    (
        if healthy {
            Status::Ok
        } else {
            Status::ServiceUnavailable
        },
        Json(body),
    )
}
