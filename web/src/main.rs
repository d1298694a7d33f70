//! `web`: the HTTP front of the job system (Rocket; address and port from `ROCKET_*`).

use anyhow::Context;
use clap::Parser;
use runtime::cli::Common;
use runtime::CeleryConfig;

#[derive(Parser)]
#[command(about = "Serve POST /receive and GET /status/<uuid>")]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Create the database if missing, apply pending migrations, then exit.
    #[arg(long)]
    migrate: bool,
}

#[rocket::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = CeleryConfig::load(Some(&args.common.config)).context("loading settings")?;
    let _telemetry = args
        .common
        .init_logging(&config, "rcelery-web")
        .context("starting the span export")?;
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
