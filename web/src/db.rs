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

/// Creates the database `url` names when the server does not have it yet (as `make run` needs
/// on a fresh machine), connecting to the server's `postgres` database to do so.
pub async fn create_if_missing(url: &str) -> Result<(), Error> {
    use diesel::sql_types::Text;
    use diesel_async::{AsyncConnection, RunQueryDsl};

    #[derive(diesel::QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        #[allow(dead_code)]
        found: i32,
    }

    let mut admin_url =
        url::Url::parse(url).map_err(|e| Error::DatabaseUnavailable(e.to_string()))?;
    let name = admin_url.path().trim_start_matches('/').to_string();
    if name.is_empty() || name == "postgres" {
        return Ok(());
    }
    admin_url.set_path("/postgres");
    let mut admin = AsyncPgConnection::establish(admin_url.as_str())
        .await
        .map_err(|e| Error::DatabaseUnavailable(e.to_string()))?;
    let exists = diesel::sql_query("SELECT 1 AS found FROM pg_database WHERE datname = $1")
        .bind::<Text, _>(&name)
        .get_results::<Found>(&mut admin)
        .await?;
    if exists.is_empty() {
        let quoted = name.replace('"', "\"\"");
        diesel::sql_query(format!("CREATE DATABASE \"{quoted}\""))
            .execute(&mut admin)
            .await?;
        tracing::info!(database = %name, "created database");
    }
    Ok(())
}

/// The advisory lock migrations run under ("rcelery migrate" in ASCII).
const MIGRATION_LOCK: i64 = 0x7263_656c_6d69_6772;

/// Applies the migrations not yet applied to the database at `url`. Web replicas started
/// together each migrate at start: a PostgreSQL advisory lock makes them take turns, so the
/// first applies what is pending and the others find nothing left to do.
pub async fn migrate(url: &str) -> Result<(), Error> {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        use diesel::RunQueryDsl;
        let mut connection = AsyncConnectionWrapper::<AsyncPgConnection>::establish(&url)
            .map_err(|e| Error::DatabaseUnavailable(e.to_string()))?;
        let lock = |call: &str| diesel::sql_query(format!("SELECT {call}({MIGRATION_LOCK})"));
        lock("pg_advisory_lock").execute(&mut connection)?;
        let applied = connection
            .run_pending_migrations(MIGRATIONS)
            .map(|applied| applied.iter().map(ToString::to_string).collect::<Vec<_>>())
            .map_err(|e| Error::Migration(e.to_string()));
        // Closing the connection would release the lock too; releasing it says so. A failed
        // unlock must not hide why the migration failed.
        let unlocked = lock("pg_advisory_unlock").execute(&mut connection);
        let applied = applied?;
        unlocked?;
        for migration in applied {
            tracing::info!(%migration, "applied migration");
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Migration(e.to_string()))?
}
