//! `beat`: sends the periodic tasks of `beat_schedule` (in `celeryconfig.toml`) on time, like
//! `celery beat`. Several may run; one sends at a time.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use runtime::beat::Beat;
use runtime::CeleryConfig;

#[derive(Parser)]
#[command(about = "Send the periodic tasks of beat_schedule")]
struct Args {
    /// Settings file (Celery setting names; CELERY_* environment variables override).
    #[arg(long, default_value = "celeryconfig.toml")]
    config: PathBuf,
    /// debug, info, warning, error or critical.
    #[arg(short = 'l', long, default_value = "info")]
    loglevel: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    runtime::logging::init(&args.loglevel);
    let config = CeleryConfig::load(Some(&args.config)).context("loading settings")?;
    let beat = Beat::new(config).await.context("starting beat")?;
    beat.run(runtime::signals::stop_requested())
        .await
        .context("beat")?;
    Ok(())
}
