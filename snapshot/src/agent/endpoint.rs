//! The agent's HTTP endpoint: `/metrics` (OpenMetrics text) for Prometheus and `/healthz`, which
//! names the rank and its newest committed generation.

use std::sync::Arc;

use tokio::net::TcpListener;

use super::Agent;

pub(super) async fn serve(agent: Arc<Agent>, listener: TcpListener) {
    use axum::routing::get;
    let for_metrics = agent.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let agent = for_metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        agent.metrics.render(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let agent = agent.clone();
                async move {
                    let committed = *agent.committed.borrow();
                    format!(
                        "ok rank={} committed_generation={}\n",
                        agent.cfg.rank,
                        committed.map_or("none".to_string(), |g| g.to_string())
                    )
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "metrics server stopped");
    }
}
