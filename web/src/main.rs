//! `web`: the HTTP front of the job system (Rocket; address and port from `ROCKET_*`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use runtime::CeleryConfig;

#[derive(Parser)]
#[command(about = "Serve POST /receive and GET /status/<uuid>")]
struct Args {
    /// Settings file (Celery setting names; CELERY_* environment variables override).
    #[arg(long, default_value = "celeryconfig.toml")]
    config: PathBuf,
    /// Create the database if missing, apply pending migrations, then exit.
    #[arg(long)]
    migrate: bool,
    /// debug, info, warning, error or critical.
    #[arg(short = 'l', long, default_value = "info")]
    loglevel: String,
}

#[rocket::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    runtime::logging::init(&args.loglevel);
    let config = CeleryConfig::load(Some(&args.config)).context("loading settings")?;
    if args.migrate {
        web::db::create_if_missing(&config.database_url)
            .await
            .context("creating the database")?;
        web::db::migrate(&config.database_url)
            .await
            .context("applying migrations")?;
        return Ok(());
    }
    let app = web::build(config).await.context("starting the web app")?;
    app.launch().await.context("serving")?;
    Ok(())
}
