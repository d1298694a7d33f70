//! The PostgreSQL pool (diesel-async, so a slow query never blocks Rocket's workers) and the
//! embedded migrations of `migrations/`.

use std::time::Duration;

use diesel::Connection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::pooled_connection::AsyncDieselConnectionManager;
use diesel_async::AsyncPgConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::error::Error;

/// Pooled async connections.
pub type Pool = diesel_async::pooled_connection::deadpool::Pool<AsyncPgConnection>;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// How long a request waits for a connection before answering 503.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A pool of up to `size` connections to `url`.
pub fn pool(url: &str, size: usize) -> Result<Pool, Error> {
    let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| Error::DatabaseUnavailable(e.to_string()))
}

/// Applies the migrations not yet applied to the database at `url`.
pub async fn migrate(url: &str) -> Result<(), Error> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let mut connection = AsyncConnectionWrapper::<AsyncPgConnection>::establish(&url)
            .map_err(|e| Error::DatabaseUnavailable(e.to_string()))?;
        let applied = connection
            .run_pending_migrations(MIGRATIONS)
            .map_err(|e| Error::Migration(e.to_string()))?;
        for migration in applied {
            tracing::info!(%migration, "applied migration");
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Migration(e.to_string()))?
}
