//! OpenTelemetry traces: the OTLP export's set-up, and the switch every span site reads.
//!
//! Tracing is on when a collector is named: the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) variable, else the `otlp_endpoint` setting. Off, no span
//! is made and no message is given a context, at the cost of one load per span site. On, the
//! `tracing` spans of [`spans`] are bridged to OpenTelemetry and sent over OTLP/HTTP (protobuf)
//! in batches from the SDK's own thread, whose queue ([`QUEUE`] spans) drops spans when full: a
//! slow or unreachable collector costs its warnings and those spans, never a task's time.

pub mod propagation;
pub mod spans;

pub use opentelemetry::Context;

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{
    BatchConfig, BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::{CeleryConfig, Error, Result};

/// Whether spans are made: set once, by [`Telemetry::start`] finding a collector.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process traces.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The variables that name a collector by themselves, as OpenTelemetry's SDKs read them.
const ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Spans held for export unless `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise. The SDK's 2,048 is
/// a fraction of a second of a busy worker's runs, and spans past it are lost; one waiting
/// costs a few hundred bytes.
const QUEUE: usize = 32_768;
/// Spans a request carries unless `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` says otherwise: the SDK's
/// thread sends one request at a time, so larger ones keep up with more spans a second.
const BATCH: usize = 2_048;

/// The batching: the SDK's, from the `OTEL_BSP_*` variables, with our queue and batch sizes
/// where the variables name none.
fn batch_config() -> BatchConfig {
    let unset = |name| std::env::var_os(name).is_none();
    let mut config = BatchConfigBuilder::default();
    if unset("OTEL_BSP_MAX_QUEUE_SIZE") {
        config = config.with_max_queue_size(QUEUE);
    }
    if unset("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
        config = config.with_max_export_batch_size(BATCH);
    }
    config.build()
}

/// Where spans go.
#[derive(Debug, PartialEq, Eq)]
enum Destination {
    /// Nowhere: tracing is off.
    Nowhere,
    /// Where the standard variables say.
    Environment,
    /// To this OTLP/HTTP traces URL.
    Url(String),
}

impl Destination {
    /// The variables, when they name a collector, win over the setting (a base URL, as the
    /// variable is, with the traces' path put after it).
    fn of(setting: Option<&str>, named_by_environment: bool) -> Self {
        match (setting, named_by_environment) {
            (_, true) => Destination::Environment,
            (Some(base), false) => {
                Destination::Url(format!("{}/v1/traces", base.trim_end_matches('/')))
            }
            (None, false) => Destination::Nowhere,
        }
    }
}

/// The process's span export, while it lives: dropping it sends the spans still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Starts the export when a collector is named (see the module's doc); `service` names the
    /// process in the traces unless `OTEL_SERVICE_NAME` does.
    pub fn start(config: &CeleryConfig, service: &str) -> Result<Self> {
        let named_by_environment = ENDPOINT_VARIABLES
            .iter()
            .any(|name| std::env::var(name).is_ok_and(|value| !value.is_empty()));
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
        let exporter = match Destination::of(config.otlp_endpoint.as_deref(), named_by_environment)
        {
            Destination::Nowhere => return Ok(Self { provider: None }),
            // The exporter reads the variables itself, as every OpenTelemetry SDK does.
            Destination::Environment => exporter,
            Destination::Url(url) => exporter.with_endpoint(url),
        };
        let exporter = exporter
            .build()
            .map_err(|error| Error::Config(format!("OTLP exporter: {error}")))?;
        let resource = match std::env::var("OTEL_SERVICE_NAME") {
            Ok(name) if !name.is_empty() => Resource::builder().build(),
            _ => Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        };
        let batches = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch_config())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batches)
            .with_resource(resource)
            .build();
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Self {
            provider: Some(provider),
        })
    }

    /// The `tracing` layer that turns the spans of [`spans`] into OpenTelemetry ones, when
    /// tracing is on. It takes those spans only, whatever the log level: log lines are not
    /// exported, nor the SDK's own warnings (which would feed back into the export).
    pub fn layer<S>(&self) -> Option<impl Layer<S>>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        let tracer = self.provider.as_ref()?.tracer("rcelery");
        let ours = Targets::new().with_target(module_path!(), tracing::Level::INFO);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(ours),
        )
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(error) = provider.shutdown() {
                tracing::warn!(%error, "spans not all sent at exit");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_variables_win_over_the_setting_and_without_either_nothing_is_traced() {
        assert_eq!(Destination::of(None, false), Destination::Nowhere);
        assert_eq!(
            Destination::of(Some("http://127.0.0.1:4318/"), false),
            Destination::Url("http://127.0.0.1:4318/v1/traces".into())
        );
        assert_eq!(
            Destination::of(Some("http://127.0.0.1:4318"), true),
            Destination::Environment
        );
        assert_eq!(Destination::of(None, true), Destination::Environment);
    }
}
