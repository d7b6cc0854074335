//! Leader election on a coordination.k8s.io Lease (kube-lease-manager, server-side apply based):
//! only the holder reconciles; a replica that loses the lease stops reconciling.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::{Config, Error, Result};

/// This replica's membership in the election.
pub struct Lease {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
    name: String,
}

impl Lease {
    /// Join the election for the Lease named in `config`, creating the Lease when absent.
    pub async fn join(client: Client, config: &Config, identity: &str) -> Result<Self> {
        let name = format!("{}/{}", config.lease_namespace, config.lease_name);
        let manager = LeaseManagerBuilder::new(client, &config.lease_name)
            .with_namespace(&config.lease_namespace)
            .with_identity(identity)
            .with_duration(config.lease_duration_seconds)
            .with_grace(
                config
                    .lease_renew_grace_seconds
                    .min(config.lease_duration_seconds.saturating_sub(1))
                    .max(1),
            )
            .with_field_manager(format!("{}-lease-{identity}", crate::FIELD_MANAGER))
            .build()
            .await
            .map_err(|source| Error::LeaseError {
                lease: name.clone(),
                source,
            })?;
        let (state, task) = manager.watch().await;
        info!(lease = %name, identity, "joined leader election");
        Ok(Self { state, task, name })
    }

    /// Resolves once this replica holds the lease.
    pub async fn until_leader(&mut self) {
        if self.state.wait_for(|leader| *leader).await.is_err() {
            // The manager task ended; never report leadership.
            std::future::pending::<()>().await;
        }
    }

    /// A future that resolves when this replica no longer holds the lease.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            let _ = state.wait_for(|leader| !*leader).await;
        }
    }

    /// Ends the lease manager without releasing the lease (for [`crate::Operator::abort`]).
    pub fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.task.abort_handle()
    }

    /// Leave the election, releasing the lease if held so another replica takes over at once.
    pub async fn release(self) -> Result<()> {
        drop(self.state);
        match tokio::time::timeout(Duration::from_secs(10), self.task).await {
            Ok(Ok(Ok(_))) | Err(_) => Ok(()),
            Ok(Ok(Err(source))) => Err(Error::LeaseError {
                lease: self.name,
                source,
            }),
            Ok(Err(join)) => {
                tracing::warn!(error = %join, "lease manager task ended abnormally");
                Ok(())
            }
        }
    }
}
