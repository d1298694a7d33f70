//! The command-line options every binary shares (`--config`, `--loglevel`, `--log-format`),
//! declared once and flattened into each binary's own arguments.

use std::path::PathBuf;

use crate::logging::LogFormat;
use crate::telemetry::Telemetry;
use crate::{CeleryConfig, Result};

/// Options common to `worker`, `beat`, `call` and `web`: `#[command(flatten)]` them. A binary
/// with another default log level changes it with
/// `#[command(mut_arg("loglevel", |arg| arg.default_value("warning")))]`.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// Settings file (Celery setting names; CELERY_* environment variables override).
    #[arg(long, default_value = "celeryconfig.toml")]
    pub config: PathBuf,
    /// debug, info, warning, error or critical.
    #[arg(short = 'l', long, default_value = "info")]
    pub loglevel: String,
    /// Log lines as text, or as JSON objects, one a line.
    #[arg(long, value_enum, env = "CELERY_LOG_FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Common {
    /// Installs logging as `--loglevel` and `--log-format` ask, and starts the span export
    /// when `config` or the environment names a collector (`service`: the process's name in
    /// traces). Keep what it returns until the process ends: dropping it sends the last spans.
    pub fn init_logging(&self, config: &CeleryConfig, service: &str) -> Result<Telemetry> {
        let telemetry = Telemetry::start(config, service)?;
        crate::logging::init(&self.loglevel, self.log_format, &telemetry);
        Ok(telemetry)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        common: Common,
    }

    #[derive(Parser)]
    #[command(mut_arg("loglevel", |arg| arg.default_value("warning")))]
    struct Quieter {
        #[command(flatten)]
        common: Common,
    }

    fn parse(argv: &[&str]) -> Result<Common, clap::Error> {
        Args::try_parse_from(std::iter::once("bin").chain(argv.iter().copied()))
            .map(|args| args.common)
    }

    #[test]
    fn log_format_defaults_to_text_and_parses_json() {
        let defaults = parse(&[]).unwrap();
        assert_eq!(defaults.log_format, LogFormat::Text);
        assert_eq!(defaults.loglevel, "info");
        assert_eq!(defaults.config, PathBuf::from("celeryconfig.toml"));
        assert_eq!(
            parse(&["--log-format", "json"]).unwrap().log_format,
            LogFormat::Json
        );
        assert_eq!(
            parse(&["--log-format=text"]).unwrap().log_format,
            LogFormat::Text
        );
        let all = parse(&["--config", "x.toml", "-l", "debug"]).unwrap();
        assert_eq!(
            (all.config, all.loglevel),
            ("x.toml".into(), "debug".into())
        );
    }

    #[test]
    fn an_unknown_log_format_is_an_error_naming_the_choices() {
        let error = parse(&["--log-format", "yaml"]).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::InvalidValue);
        let message = error.to_string();
        assert!(message.contains("'yaml'"), "{message}");
        assert!(message.contains("text, json"), "{message}");
    }

    #[test]
    fn a_binary_may_change_the_default_level_and_keep_the_flag() {
        let parsed = Quieter::try_parse_from(["bin"]).unwrap().common;
        assert_eq!(parsed.loglevel, "warning");
        let parsed = Quieter::try_parse_from(["bin", "-l", "info"])
            .unwrap()
            .common;
        assert_eq!(parsed.loglevel, "info");
    }
}
