//! `GET /health`: whether the broker and the database answer (503 when either does not).

use diesel_async::RunQueryDsl;
use rocket::http::Status;
use rocket::serde::json::Json;
use rocket::State;
use runtime::client::Client;
use serde_json::{json, Value};

use crate::db::Pool;

async fn database(pool: &Pool) -> Result<(), String> {
    let mut connection = pool.get().await.map_err(|e| e.to_string())?;
    diesel::sql_query("SELECT 1")
        .execute(&mut connection)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// `{"status": "ok"|"unavailable", "broker": {...}, "database": {...}}`.
#[rocket::get("/health")]
pub async fn health(pool: &State<Pool>, client: &State<Client>) -> (Status, Json<Value>) {
    let (broker, database) = tokio::join!(client.check(), database(pool));
    let report = |result: Result<(), String>| match result {
        Ok(()) => json!({"ok": true}),
        Err(error) => json!({"ok": false, "error": error}),
    };
    let healthy = broker.is_ok() && database.is_ok();
    let body = json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "broker": report(broker.map_err(|e| e.to_string())),
        "database": report(database),
    });
    (
        if healthy {
            Status::Ok
        } else {
            Status::ServiceUnavailable
        },
        Json(body),
    )
}
