//! Prometheus metrics of a training run (step, loss, samples/s, peak memory), served over HTTP
//! at `/metrics` on `--metrics-addr` so Prometheus can scrape a trainer pod or a `petl run`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::{Error, Result};

/// The trainer's gauges; cheap to clone and to update from the training loop.
#[derive(Clone)]
pub struct TrainerMetrics {
    registry: Arc<Registry>,
    pub step: Gauge,
    pub total_steps: Gauge,
    pub loss: Gauge<f64, AtomicU64>,
    pub learning_rate: Gauge<f64, AtomicU64>,
    pub samples_per_second: Gauge<f64, AtomicU64>,
    pub peak_memory_bytes: Gauge,
    pub eval_metric: Gauge<f64, AtomicU64>,
}

impl Default for TrainerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl TrainerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("petl_trainer");
        let step = Gauge::default();
        let total_steps = Gauge::default();
        let loss = Gauge::<f64, AtomicU64>::default();
        let learning_rate = Gauge::<f64, AtomicU64>::default();
        let samples_per_second = Gauge::<f64, AtomicU64>::default();
        let peak_memory_bytes = Gauge::default();
        let eval_metric = Gauge::<f64, AtomicU64>::default();
        registry.register("step", "Optimiser steps completed", step.clone());
        registry.register(
            "total_steps",
            "Optimiser steps the run will take",
            total_steps.clone(),
        );
        registry.register("loss", "Training loss of the latest step", loss.clone());
        registry.register(
            "learning_rate",
            "Learning rate of the latest step",
            learning_rate.clone(),
        );
        registry.register(
            "samples_per_second",
            "Training examples per second over the latest step",
            samples_per_second.clone(),
        );
        registry.register(
            "peak_memory_bytes",
            "Peak training memory of any step so far: live heap bytes on CPU, bytes in use on a GPU",
            peak_memory_bytes.clone(),
        );
        registry.register(
            "eval_metric",
            "Latest validation metric (accuracy for classification)",
            eval_metric.clone(),
        );
        Self {
            registry: Arc::new(registry),
            step,
            total_steps,
            loss,
            learning_rate,
            samples_per_second,
            peak_memory_bytes,
            eval_metric,
        }
    }

    /// The exposition text Prometheus scrapes.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    /// Serves `/metrics` on `addr` from a background thread for the life of the process; returns
    /// the bound address (useful with port 0).
    pub fn serve(&self, addr: SocketAddr) -> Result<SocketAddr> {
        let listener = std::net::TcpListener::bind(addr).map_err(|source| Error::Io {
            path: format!("--metrics-addr {addr}"),
            source,
        })?;
        let bound = listener.local_addr().map_err(|source| Error::Io {
            path: format!("--metrics-addr {addr}"),
            source,
        })?;
        listener.set_nonblocking(true).map_err(|source| Error::Io {
            path: format!("--metrics-addr {addr}"),
            source,
        })?;
        let metrics = self.clone();
        std::thread::Builder::new()
            .name("petl-metrics".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime starts");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)
                        .expect("a bound non-blocking listener converts");
                    let app = axum::Router::new().route(
                        "/metrics",
                        axum::routing::get(move || {
                            let metrics = metrics.clone();
                            async move {
                                (
                                    [(
                                        axum::http::header::CONTENT_TYPE,
                                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                    )],
                                    metrics.render(),
                                )
                            }
                        }),
                    );
                    if let Err(e) = axum::serve(listener, app).await {
                        tracing::error!(error = %e, "metrics server stopped");
                    }
                });
            })
            .map_err(|source| Error::Io {
                path: "metrics thread".into(),
                source,
            })?;
        Ok(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn serves_current_values_over_http() {
        let metrics = TrainerMetrics::new();
        metrics.step.set(7);
        metrics.loss.set(0.25);
        metrics.peak_memory_bytes.set(1 << 20);
        let addr = metrics.serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        assert!(body.contains("petl_trainer_step 7"), "{body}");
        assert!(body.contains("petl_trainer_loss 0.25"), "{body}");
        assert!(
            body.contains("petl_trainer_peak_memory_bytes 1048576"),
            "{body}"
        );
    }
}
