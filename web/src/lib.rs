//! The web app: jobs in over HTTP, out to Celery workers, tracked in PostgreSQL.
//!
//! - [`routes`]: `POST /receive`, `GET /status/<uuid>` (and its `/stream`), `GET /tasks`,
//!   `GET /history`, `GET /workers`, `GET /queues`, `GET /health`, `GET /metrics`, and the API's own `GET /openapi.json` and
//!   `GET /docs`.
//! - [`metrics`]: the Prometheus metrics of requests and the outbox.
//! - [`management`]: RabbitMQ's management API, for `GET /queues`.
//! - [`store`] and [`schema`]: the jobs table (Diesel, migrations in `migrations/`).
//! - [`tracking`]: keeps rows true to the result backend, for jobs any worker runs.
//! - [`monitor`]: with `monitor = true`, records every task and worker of the cluster from its
//!   events (the task history).
//! - [`outbox`]: publishes jobs the broker has not confirmed yet, so none is lost.
//! - [`probe`]: the checks `/health` and `/metrics` answer from, on connections of their own.
//! - [`submission`]: a `POST /receive` body read and checked, and its schema, without I/O.
//! - [`workflow`]: chains and groups of jobs accepted as one, and what they amount to.
//! - [`auth`]: the optional bearer authentication of the job routes (shared token or JWT).
//! - [`idempotency`]: `Idempotency-Key` on `POST /receive`, and forgetting expired keys.
//! - [`unique`]: unique jobs' locks, taken before their rows commit.
//! - [`batch`]: group commit of the rows `POST /receive` and the outbox write.
//! - [`db`]: the async connection pool and embedded migrations.
//! - [`error`]: the one error type and its JSON answers.

pub mod auth;
pub mod batch;
pub mod db;
pub mod error;
pub mod idempotency;
pub mod links;
pub mod management;
pub mod metrics;
pub mod monitor;
pub mod outbox;
pub mod probe;
pub mod routes;
pub mod schema;
pub mod store;
pub mod submission;
pub mod trace;
pub mod tracking;
pub mod unique;
pub mod workflow;

use std::sync::Arc;
use std::time::Duration;

use rocket::fairing::AdHoc;
use rocket::{Build, Rocket};
use runtime::backend::RedisBackend;
use runtime::broker::BrokerKind;
use runtime::client::Client;
use runtime::CeleryConfig;

use crate::error::Error;
use crate::management::ManagementApi;
use crate::routes::status::AnswerBudget;
use crate::routes::stream::Streams;
use crate::submission::Accepts;

/// `rocket` with every route and the JSON error catcher: what the API document describes.
pub fn mount(rocket: Rocket<Build>) -> Rocket<Build> {
    rocket
        .mount("/", routes::all())
        .register("/", rocket::catchers![error::catch_all])
}

/// Connects everything the app needs and builds it. Migrations are applied first.
pub async fn build(config: CeleryConfig) -> Result<Rocket<Build>, Error> {
    db::migrate(&config.database_url).await?;
    let pool = db::pool(&config.database_url, 16)?;
    let backend = RedisBackend::of(&config).await?;
    let accepts = Accepts::new(&config);
    let budget = AnswerBudget(config.web_answer_max_bytes);
    let streams = Streams::new(
        config.web_max_streams,
        Duration::from_secs(config.web_stream_max_seconds),
    );
    let sweep_interval = Duration::from_secs(config.web_sweep_interval);
    let key_ttl = idempotency::Ttl(Duration::from_secs(config.web_idempotency_ttl));
    let auth = auth::Auth::new(&config);
    let management = match (&config.broker_api, BrokerKind::of(&config.broker_url)?) {
        (Some(api), BrokerKind::Amqp) => Some(ManagementApi::new(api, &config.broker_url)?),
        (Some(_), BrokerKind::Redis) => {
            tracing::warn!("broker_api is RabbitMQ's management API; ignored with a Redis broker");
            None
        }
        (None, _) => None,
    };
    let max_attempts = config.web_publish_max_attempts;
    let monitor = config
        .monitor
        .then(|| (config.clone(), pool.clone(), backend.clone()));
    let probe = probe::Probe::start(&config).await;
    let client = Client::new(config).await?;
    let outbox = Arc::new(outbox::Outbox::new(
        pool.clone(),
        client.clone(),
        max_attempts,
    ));
    let finishing = outbox.clone();
    let tracker_pool = pool.clone();
    let keys_pool = pool.clone();
    let changes = tracking::Changes::default();
    let tracker_changes = changes.clone();
    Ok(mount(rocket::build())
        .manage(pool)
        .manage(outbox.clone())
        .manage(client)
        .manage(accepts)
        .manage(budget)
        .manage(streams)
        .manage(probe)
        .manage(auth)
        .manage(changes)
        .manage(management)
        .manage(key_ttl)
        .manage(Arc::new(metrics::WebMetrics::new()))
        .attach(metrics::RequestMetrics)
        .attach(AdHoc::on_liftoff("outbox", move |_| {
            Box::pin(async move {
                tokio::spawn(outbox.run());
            })
        }))
        .attach(AdHoc::on_shutdown("outbox", move |_| {
            Box::pin(async move { finishing.finish().await })
        }))
        .attach(AdHoc::on_liftoff("idempotency keys", move |_| {
            Box::pin(async move {
                // Expired keys are deleted at the sweep's pace, result backend or not.
                tokio::spawn(idempotency::forget_expired(
                    keys_pool,
                    key_ttl,
                    sweep_interval,
                ));
            })
        }))
        .attach(AdHoc::on_liftoff("monitor", move |_| {
            Box::pin(async move {
                if let Some((config, pool, backend)) = monitor {
                    monitor::start(&config, pool, backend);
                }
            })
        }))
        .attach(AdHoc::on_liftoff("tracking", move |_| {
            Box::pin(async move {
                match backend {
                    Some(backend) => {
                        tokio::spawn(tracking::follow(
                            tracker_pool.clone(),
                            backend.clone(),
                            tracker_changes.clone(),
                        ));
                        tokio::spawn(tracking::sweep(
                            tracker_pool,
                            backend,
                            tracker_changes,
                            sweep_interval,
                        ));
                    }
                    None => tracing::warn!("no result_backend: job states will stay PENDING"),
                }
            })
        })))
}
