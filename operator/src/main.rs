//! The `petl-operator` binary: parse flags, set up logs, connect to the cluster (kubeconfig
//! outside, service account inside) and run until SIGINT/SIGTERM.

use clap::Parser;
use petl_operator::{Config, Error, Operator, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = Config::parse();
    telemetry::init(config.log_format);
    match run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "petl-operator failed");
            eprintln!("petl-operator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), Error> {
    let client = kube::Client::try_default()
        .await
        .map_err(Error::ClientConfigError)?;
    let mut operator = Operator::start(client, config).await?;
    tokio::select! {
        result = operator.wait() => return result,
        _ = shutdown_signal() => tracing::info!("shutting down"),
    }
    operator.stop().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
