//! `petl-dev-cluster`: the end-to-end tests' cluster (control plane + node + petl's images) for
//! a developer, kept until SIGINT or SIGTERM; `scripts/dev-cluster.sh up|down` runs it.

use std::path::PathBuf;
use std::process::ExitCode;

use petl_tests::{Cluster, cache_dir};

/// Where the running cluster's kubeconfig and the "ready" marker are written.
fn state_dir() -> PathBuf {
    std::env::var_os("PETL_DEV_CLUSTER_DIR")
        .map_or_else(|| cache_dir().join("dev-cluster"), PathBuf::from)
}

#[tokio::main]
async fn main() -> ExitCode {
    let state = state_dir();
    let ready = state.join("ready");
    let _ = std::fs::remove_file(&ready);
    let cluster = match Cluster::start().await {
        Ok(cluster) => cluster,
        Err(e) => {
            eprintln!("petl-dev-cluster: the cluster did not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let kubeconfig = state.join("kubeconfig");
    if let Err(e) = std::fs::create_dir_all(&state)
        .and_then(|()| std::fs::copy(cluster.kubeconfig_path(), &kubeconfig).map(|_| ()))
    {
        eprintln!("petl-dev-cluster: writing {}: {e}", kubeconfig.display());
        return ExitCode::FAILURE;
    }
    let images = cluster.images();
    let node = cluster.node().map_or_else(String::new, |n| {
        format!(
            "node {} at {} (logs in {})",
            n.name(),
            n.ip(),
            n.dir().display()
        )
    });
    let summary = format!(
        "KUBECONFIG={}\n{node}\ncontrol plane logs in {}\nimages: {} {} {}\n",
        kubeconfig.display(),
        cluster.dir().display(),
        images.operator,
        images.worker,
        images.probe,
    );
    print!("{summary}");
    if let Err(e) = std::fs::write(&ready, summary) {
        eprintln!("petl-dev-cluster: writing {}: {e}", ready.display());
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            eprintln!("petl-dev-cluster: cannot wait for SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("petl-dev-cluster: stopping");
    let _ = std::fs::remove_file(&ready);
    let _ = std::fs::remove_file(&kubeconfig);
    match cluster.stop() {
        Some(stopped) if !stopped.problems.is_empty() => {
            eprintln!(
                "petl-dev-cluster: teardown problems: {:?}",
                stopped.problems
            );
            ExitCode::FAILURE
        }
        _ => ExitCode::SUCCESS,
    }
}
