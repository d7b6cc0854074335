//! The Prometheus harness scrapes a real endpoint and answers PromQL about it.
//! The endpoint is a tiny axum server on loopback that this test serves itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use petl_tests::Prometheus;

async fn serve_counter() -> (SocketAddr, Arc<AtomicU64>) {
    let steps = Arc::new(AtomicU64::new(41));
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(steps): State<Arc<AtomicU64>>| async move {
                format!(
                    "# HELP petl_probe_steps_total Steps seen by the probe.\n\
                     # TYPE petl_probe_steps_total counter\n\
                     petl_probe_steps_total{{job_name=\"probe\"}} {}\n",
                    steps.load(Ordering::SeqCst)
                )
            }),
        )
        .with_state(steps.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, steps)
}

#[tokio::test]
async fn scrapes_a_target_and_answers_promql_about_it() {
    let (addr, steps) = serve_counter().await;
    let prometheus = Prometheus::start(&[addr]).await.unwrap();

    let samples = prometheus
        .wait_for("petl_probe_steps_total", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0].value, 41.0);
    assert_eq!(samples[0].labels["job"], petl_tests::prometheus::JOB);
    assert_eq!(samples[0].labels["instance"], addr.to_string());
    assert_eq!(samples[0].labels["job_name"], "probe");

    // A changed value shows up in a later scrape: the harness reads live data.
    steps.store(99, Ordering::SeqCst);
    prometheus
        .wait_for("petl_probe_steps_total == 99", Duration::from_secs(30))
        .await
        .unwrap();

    let up = prometheus.query("sum(up)").await.unwrap();
    assert_eq!(up[0].value, 1.0);

    let err = prometheus.query("sum(").await.unwrap_err().to_string();
    assert!(err.contains("sum("), "{err}");
}
