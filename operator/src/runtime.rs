//! Starting and stopping a whole operator: the HTTP server, leader election and the
//! controller. The binary and the in-process operators of tests and benches share it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kube::api::ListParams;
use kube::{Api, Client};
use petl_crds::PetlJob;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{info, warn};

use crate::context::Context;
use crate::controller;
use crate::leader::Lease;
use crate::metrics::Metrics;
use crate::server::{self, ServerState};
use crate::{Config, Error, Result};

/// A running operator.
pub struct Operator {
    /// Where /metrics, /healthz and /readyz are served.
    pub metrics_addr: SocketAddr,
    /// The metrics it records (also served on `metrics_addr`).
    pub metrics: Arc<Metrics>,
    /// This replica's leader-election identity.
    pub identity: String,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
    lease_task: Arc<Mutex<Option<AbortHandle>>>,
}

impl Operator {
    /// Start an operator with `client`: bind the metrics address, check the PetlJob API is
    /// served, then reconcile (after winning the election with `--leader-elect`).
    pub async fn start(client: Client, mut config: Config) -> Result<Self> {
        let identity = config.identity.clone().unwrap_or_else(default_identity);
        config.identity = Some(identity.clone());
        let listener = TcpListener::bind(config.metrics_addr)
            .await
            .map_err(|source| Error::ServerError {
                addr: config.metrics_addr.to_string(),
                source,
            })?;
        let metrics_addr = listener.local_addr().map_err(|source| Error::ServerError {
            addr: config.metrics_addr.to_string(),
            source,
        })?;
        let metrics = Arc::new(Metrics::new());
        let ready = Arc::new(AtomicBool::new(false));
        let (shutdown, stop) = watch::channel(false);

        let state = ServerState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        };
        let server_stop = wait_true(stop.clone());
        tokio::spawn(async move {
            if let Err(e) = server::serve(listener, state, server_stop).await {
                warn!(error = %e, "metrics server stopped");
            }
        });

        check_api(&client, &config).await?;
        ready.store(true, Ordering::Release);
        info!(%metrics_addr, identity, leader_elect = config.leader_elect, "petl-operator started");
        let ctx = Arc::new(Context::new(client, config, metrics.clone()));
        let lease_task = Arc::new(Mutex::new(None));
        let task = tokio::spawn({
            let identity = identity.clone();
            let lease_task = lease_task.clone();
            async move {
                let result = run_until_stopped(ctx, stop, identity, lease_task).await;
                // An operator that can no longer reconcile (e.g. it could not join the
                // election) must not keep receiving readiness.
                if result.is_err() {
                    ready.store(false, Ordering::Release);
                }
                result
            }
        });
        Ok(Self {
            metrics_addr,
            metrics,
            identity,
            shutdown,
            task,
            lease_task,
        })
    }

    /// Stop reconciling (letting in-flight reconciles finish), release the lease, stop serving.
    pub async fn stop(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(e) => {
                warn!(error = %e, "operator task ended abnormally");
                Ok(())
            }
        }
    }

    /// Stop at once, as a crashed process would: in-flight reconciles are dropped and a held
    /// lease is not released, so another replica takes over only once it expires.
    pub fn abort(self) {
        if let Some(lease) = self
            .lease_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            lease.abort();
        }
        self.task.abort();
        let _ = self.shutdown.send(true);
    }

    /// Wait until the operator stops by itself (a fatal error), or forever.
    pub async fn wait(&mut self) -> Result<()> {
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => {
                warn!(error = %e, "operator task ended abnormally");
                Ok(())
            }
        }
    }
}

/// Fail early, with a hint, when PetlJobs cannot be listed (CRD missing or RBAC).
async fn check_api(client: &Client, config: &Config) -> Result<()> {
    let jobs: Api<PetlJob> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    jobs.list_metadata(&ListParams::default().limit(1))
        .await
        .map_err(Error::CrdNotInstalled)?;
    Ok(())
}

async fn run_until_stopped(
    ctx: Arc<Context>,
    stop: watch::Receiver<bool>,
    identity: String,
    lease_task: Arc<Mutex<Option<AbortHandle>>>,
) -> Result<()> {
    if !ctx.config.leader_elect {
        ctx.metrics.leader.set(1);
        controller::run(ctx.clone(), spawn_waiter(wait_true(stop))).await;
        ctx.metrics.leader.set(0);
        return Ok(());
    }
    let mut lease = Lease::join(ctx.client.clone(), &ctx.config, &identity).await?;
    *lease_task.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease.abort_handle());
    loop {
        let mut stopping = stop.clone();
        tokio::select! {
            _ = lease.until_leader() => {}
            _ = stopping.wait_for(|s| *s) => break,
        }
        info!(identity, "became the leader; reconciling");
        ctx.metrics.leader.set(1);
        let lost = lease.lost();
        let stopped = wait_true(stop.clone());
        let waiter = tokio::spawn(async move {
            tokio::select! {
                _ = lost => {}
                _ = stopped => {}
            }
        });
        controller::run(ctx.clone(), async move {
            let _ = waiter.await;
        })
        .await;
        ctx.metrics.leader.set(0);
        if *stop.borrow() {
            break;
        }
        warn!(
            identity,
            "lost the lease; stopped reconciling until it is won again"
        );
    }
    lease.release().await
}

/// A `Send + Sync` future resolving when `stop` turns true (the controller's shutdown trigger
/// must be `Sync`, which a borrowed receiver future is not).
fn spawn_waiter(
    fut: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
    let handle = tokio::spawn(fut);
    async move {
        let _ = handle.await;
    }
}

async fn wait_true(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "petl-operator".into());
    let suffix: u32 = rand::random();
    format!("{host}-{suffix:08x}")
}
