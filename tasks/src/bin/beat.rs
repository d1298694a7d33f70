//! `beat`: sends the periodic tasks of `beat_schedule` (in `celeryconfig.toml`) on time, like
//! `celery beat`. Several may run; one sends at a time.

use anyhow::Context;
use clap::Parser;
use runtime::beat::Beat;
use runtime::cli::Common;
use runtime::CeleryConfig;

#[derive(Parser)]
#[command(about = "Send the periodic tasks of beat_schedule")]
struct Args {
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.common.init_logging();
    let config = CeleryConfig::load(Some(&args.common.config)).context("loading settings")?;
    let beat = Beat::new(config).await.context("starting beat")?;
    beat.run(runtime::signals::stop_requested())
        .await
        .context("beat")?;
    Ok(())
}
