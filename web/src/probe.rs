//! What `/health` and `/metrics` answer from: a loop that checks the broker and the database
//! every [`INTERVAL`] on connections of its own, never the shared pool nor the publisher's
//! connection. However often the open routes are called, they cost one read of the last
//! snapshot, and they never wait behind a publish or for a pool connection.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use runtime::broker::{self, Broker};
use runtime::CeleryConfig;
use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::store;

/// Time between two checks.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// Longest a check may take before its part counts as down.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why a part is down, in words that hold no host, user or server message (those are logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Down {
    /// No connection could be made.
    CannotConnect,
    /// Connected, but the check failed.
    CheckFailed,
    /// The connection or the check took longer than 5 s.
    TimedOut,
}

/// The last check of both parts.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub broker: Result<(), Down>,
    pub database: Result<(), Down>,
    /// Jobs recorded but not yet published, as the database last told.
    pub backlog: Option<i64>,
    pub checked_at: DateTime<Utc>,
}

/// The latest snapshot, managed state.
pub struct Probe(watch::Receiver<Snapshot>);

impl Probe {
    /// Checks both parts once, then keeps checking every [`INTERVAL`] in the background.
    pub async fn start(config: &CeleryConfig) -> Self {
        let mut prober = Prober {
            config: config.clone(),
            broker: None,
            database: None,
            backlog: None,
        };
        let (tell, snapshot) = watch::channel(prober.round().await);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(INTERVAL);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                if tell.send(prober.round().await).is_err() {
                    return; // the app is gone
                }
            }
        });
        Self(snapshot)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.0.borrow().clone()
    }
}

/// The probe's own connections, made again after a failure.
struct Prober {
    config: CeleryConfig,
    broker: Option<Arc<dyn Broker>>,
    database: Option<AsyncPgConnection>,
    backlog: Option<i64>,
}

impl Prober {
    async fn round(&mut self) -> Snapshot {
        let (broker, database) = tokio::join!(
            bounded("broker", Self::check_broker(&self.config, &mut self.broker)),
            bounded(
                "database",
                Self::check_database(&self.config, &mut self.database, &mut self.backlog)
            ),
        );
        if broker.is_err() {
            self.broker = None;
        }
        if database.is_err() {
            self.database = None;
        }
        Snapshot {
            broker,
            database,
            backlog: self.backlog,
            checked_at: Utc::now(),
        }
    }

    async fn check_broker(
        config: &CeleryConfig,
        slot: &mut Option<Arc<dyn Broker>>,
    ) -> Result<(), (Down, String)> {
        let broker = match slot {
            Some(broker) => broker.clone(),
            None => {
                let broker = broker::of(config)
                    .await
                    .map_err(|e| (Down::CannotConnect, e.to_string()))?;
                slot.insert(broker).clone()
            }
        };
        broker
            .check()
            .await
            .map_err(|e| (Down::CheckFailed, e.to_string()))
    }

    async fn check_database(
        config: &CeleryConfig,
        slot: &mut Option<AsyncPgConnection>,
        backlog: &mut Option<i64>,
    ) -> Result<(), (Down, String)> {
        let connection = match slot {
            Some(connection) => connection,
            None => slot.insert(
                AsyncPgConnection::establish(&config.database_url)
                    .await
                    .map_err(|e| (Down::CannotConnect, e.to_string()))?,
            ),
        };
        let count = store::awaiting_publish(connection)
            .await
            .map_err(|e| (Down::CheckFailed, e.to_string()))?;
        *backlog = Some(count);
        Ok(())
    }
}

/// `check` within [`TIMEOUT`]; a failure is logged with its reason and answered without it.
async fn bounded(
    part: &str,
    check: impl std::future::Future<Output = Result<(), (Down, String)>>,
) -> Result<(), Down> {
    let outcome = tokio::time::timeout(TIMEOUT, check)
        .await
        .unwrap_or_else(|_| Err((Down::TimedOut, "no answer".into())));
    outcome.map_err(|(down, reason)| {
        tracing::warn!(part, ?down, %reason, "health check failed");
        down
    })
}
