//! `beat`: sends the periodic tasks of `beat_schedule` (in `celeryconfig.toml`) on time, like
//! `celery beat`. Several may run; one sends at a time.

use crate::beat::Beat;
use crate::cli::Common;
use crate::{CeleryConfig, Result};

/// `beat`'s command line.
#[derive(Debug, clap::Parser)]
#[command(about = "Send the periodic tasks of beat_schedule")]
pub struct BeatArgs {
    #[command(flatten)]
    pub common: Common,
}

/// Parses the command line and sends the schedule's tasks until a signal stops it.
pub fn main() -> Result<()> {
    let args = <BeatArgs as clap::Parser>::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// Runs beat as `args` ask until a signal stops it.
pub async fn run(args: BeatArgs) -> Result<()> {
    let config = CeleryConfig::load(Some(&args.common.config))?;
    let _telemetry = args.common.init_logging(&config, "rcelery-beat")?;
    let beat = Beat::new(config).await?;
    beat.run(crate::signals::stop_requested()).await
}
