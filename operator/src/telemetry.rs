//! Log setup: tracing with an `RUST_LOG`-style filter, as text lines or JSON objects.
//! Called once by the binary; tests leave logging to the test harness.

use tracing_subscriber::EnvFilter;

use crate::LogFormat;

/// Install the global tracing subscriber. The filter comes from `RUST_LOG` (default `info`).
/// Calling it twice is harmless: the second call keeps the first subscriber.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.compact().try_init(),
    };
}
