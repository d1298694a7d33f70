//! `GET /health`: whether the broker and the database answer (503 when either does not).

use diesel_async::RunQueryDsl;
use rocket::http::Status;
use rocket::serde::json::Json;
use rocket::State;
use runtime::client::Client;
use serde::Serialize;
use utoipa::ToSchema;

use crate::db::Pool;

async fn database(pool: &Pool) -> Result<(), String> {
    let mut connection = pool.get().await.map_err(|e| e.to_string())?;
    diesel::sql_query("SELECT 1")
        .execute(&mut connection)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Whether the app can serve.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// The broker and the database answer.
    Ok,
    /// Either does not.
    Unavailable,
}

/// Whether one dependency answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    pub ok: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<Result<(), String>> for Check {
    fn from(result: Result<(), String>) -> Self {
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
}

/// `{"status": "ok"|"unavailable", "broker": {...}, "database": {...}}`.
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    responses(
        (status = 200, description = "the broker and the database answer", body = Health),
        (status = 503, description = "the broker or the database does not", body = Health),
    ),
)]
#[rocket::get("/health")]
pub async fn health(pool: &State<Pool>, client: &State<Client>) -> (Status, Json<Health>) {
    let (broker, database) = tokio::join!(client.check(), database(pool));
    let healthy = broker.is_ok() && database.is_ok();
    let body = Health {
        status: if healthy {
            HealthStatus::Ok
        } else {
            HealthStatus::Unavailable
        },
        broker: broker.map_err(|e| e.to_string()).into(),
        database: database.into(),
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
