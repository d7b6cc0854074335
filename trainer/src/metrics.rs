//! Prometheus metrics of a training run (step, loss, samples/s, peak memory, recoveries), served
//! over HTTP at `/metrics` on `--metrics-addr` so Prometheus can scrape a trainer pod or a `petl
//! run`, next to rank 0's `/report` (the JSON the operator copies into the job's status).

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use petl_crds::report::{REPORT_PATH, WorkerReport};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
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
    /// Ranks in the job.
    pub world_size: Gauge,
    /// Recoveries (a lost rank replaced, state restored) this process went through.
    pub recoveries: Counter,
    /// Seconds the latest recovery took, from the loss noticed to training resumed.
    pub recovery_seconds: Gauge<f64, AtomicU64>,
    /// Newest snapshot generation committed on every rank; -1 before the first.
    pub committed_generation: Gauge,
    /// What `/report` serves (rank 0 keeps it current).
    pub report: Arc<Mutex<WorkerReport>>,
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
        let world_size = Gauge::default();
        let recoveries = Counter::default();
        let recovery_seconds = Gauge::<f64, AtomicU64>::default();
        let committed_generation = Gauge::default();
        committed_generation.set(-1);
        registry.register("world_size", "Ranks in the job", world_size.clone());
        registry.register(
            "recoveries",
            "Recoveries (lost ranks replaced, state restored) this process went through",
            recoveries.clone(),
        );
        registry.register(
            "recovery_seconds",
            "Seconds the latest recovery took, from the loss noticed to training resumed",
            recovery_seconds.clone(),
        );
        registry.register(
            "snapshot_committed_generation",
            "Newest snapshot generation committed on every rank (-1 before the first)",
            committed_generation.clone(),
        );
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
            world_size,
            recoveries,
            recovery_seconds,
            committed_generation,
            report: Arc::default(),
        }
    }

    /// The report as JSON.
    pub fn report_json(&self) -> String {
        let report = self.report.lock().map(|r| r.clone()).unwrap_or_default();
        serde_json::to_string(&report).unwrap_or_else(|_| "{}".into())
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
                    let report = metrics.clone();
                    let app = axum::Router::new()
                        .route(
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
                        )
                        .route(
                            REPORT_PATH,
                            axum::routing::get(move || {
                                let report = report.clone();
                                async move {
                                    (
                                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                                        report.report_json(),
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

    #[test]
    fn serves_the_worker_report_as_json() {
        let metrics = TrainerMetrics::new();
        metrics.report.lock().unwrap().progress.step = 12;
        metrics.report.lock().unwrap().recoveries = 2;
        let addr = metrics.serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /report HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let body = response.split("\r\n\r\n").nth(1).unwrap();
        let report: WorkerReport = serde_json::from_str(body).unwrap();
        assert_eq!(report.progress.step, 12);
        assert_eq!(report.recoveries, 2);
        assert!(response.contains("application/json"), "{response}");
    }
}
