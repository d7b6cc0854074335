//! The processes of a local control plane (etcd, kube-apiserver, kube-controller-manager): their
//! command lines, the kubeconfig that reaches them, and the wait until they are ready.

use std::net::IpAddr;
use std::path::Path;
use std::time::Instant;

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use super::{ControlPlaneOptions, POLL, READY_TIMEOUT};
use crate::error::{Error, IoContext, Result};
use crate::pki::{Pki, SERVICE_CIDR};
use crate::process::{Spawner, Supervised};

/// The processes of a local control plane, killed in declaration order.
pub(super) struct LocalComponents {
    pub(super) controller_manager: Supervised,
    pub(super) apiserver: Supervised,
    pub(super) etcd: Supervised,
    pub(super) address: IpAddr,
    pub(super) api_port: u16,
    pub(super) pki: Pki,
    pub(super) _spawner: Spawner,
}

impl LocalComponents {
    /// Ready means: `/readyz` answers ok, and the controller manager has created
    /// the `default` service account in `default` (so its informers and
    /// controllers run); without the service-account controller, the accounts its
    /// controllers act as in `kube-system`. Fails early with the log of a
    /// component that exited.
    pub(super) async fn wait_ready(
        &mut self,
        client: &Client,
        started: Instant,
        service_accounts: bool,
    ) -> Result<()> {
        let accounts = Api::<ServiceAccount>::namespaced(client.clone(), "default");
        let system_accounts = Api::<ServiceAccount>::namespaced(client.clone(), "kube-system");
        let mut api_ready = false;
        loop {
            self.etcd.ensure_running()?;
            self.apiserver.ensure_running()?;
            self.controller_manager.ensure_running()?;
            if !api_ready {
                let readyz = http::Request::get("/readyz").body(Vec::new());
                if let Ok(request) = readyz {
                    api_ready = matches!(client.request_text(request).await, Ok(body) if body.trim() == "ok");
                }
            }
            let controllers_up = if service_accounts {
                matches!(accounts.get_opt("default").await, Ok(Some(_)))
            } else {
                let listed = system_accounts.list(&ListParams::default()).await;
                matches!(listed, Ok(list) if !list.items.is_empty())
            };
            if api_ready && controllers_up {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                let laggard = if api_ready {
                    &self.controller_manager
                } else {
                    &self.apiserver
                };
                return Err(Error::NotReady {
                    component: laggard.name.clone(),
                    seconds: READY_TIMEOUT.as_secs(),
                    log_tail: format!("{}{}", laggard.log_tail(40), self.etcd.log_tail(10)),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

pub(super) fn etcd_args(dir: &Path, client_port: u16, peer_port: u16) -> Vec<String> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    vec![
        "--name=default".into(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=default={peer}"),
        // Test data is thrown away; fsync would only slow every write.
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ]
}

pub(super) fn apiserver_args(
    pki: &Pki,
    etcd_port: u16,
    address: IpAddr,
    api_port: u16,
) -> Vec<String> {
    let sa_key = pki.service_account_key.display();
    // Endpoints refuse a loopback address; a control plane on loopback serves no pods, so
    // the `kubernetes` Service then goes without endpoints.
    let endpoint_reconciler = if address.is_loopback() {
        "none"
    } else {
        "lease"
    };
    vec![
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        format!("--bind-address={address}"),
        format!("--advertise-address={address}"),
        format!("--secure-port={api_port}"),
        format!("--tls-cert-file={}", pki.serving_cert.display()),
        format!("--tls-private-key-file={}", pki.serving_key.display()),
        format!("--client-ca-file={}", pki.ca_cert.display()),
        format!(
            "--service-account-key-file={}",
            pki.service_account_public_key.display()
        ),
        format!("--service-account-signing-key-file={sa_key}"),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        "--authorization-mode=Node,RBAC".into(),
        "--allow-privileged=true".into(),
        format!("--endpoint-reconciler-type={endpoint_reconciler}"),
        // For `kubectl logs/exec` through a kubelet: the admin identity, which the kubelet's
        // webhook authorizer lets through (the kubelet's serving certificate is self-signed
        // and not checked).
        format!("--kubelet-client-certificate={}", pki.admin_cert.display()),
        format!("--kubelet-client-key={}", pki.admin_key.display()),
        // The node's name is not in any DNS the API server asks; its InternalIP is.
        "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ]
}

pub(super) fn controller_manager_args(
    dir: &Path,
    pki: &Pki,
    kubeconfig: &Path,
    port: u16,
    options: &ControlPlaneOptions,
) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--leader-elect=false".into(),
        format!("--controllers={}", options.controllers.join(",")),
        format!(
            "--service-account-private-key-file={}",
            pki.service_account_key.display()
        ),
        format!("--root-ca-file={}", pki.ca_cert.display()),
        // Each controller acts as its own service account with its bootstrap
        // RBAC role (as kubeadm sets it up); the manager's own identity may not
        // list and delete arbitrary objects, so the garbage collector needs this.
        "--use-service-account-credentials=true".into(),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", dir.join("kcm-serving").display()),
        "--profiling=false".into(),
        "--v=1".into(),
    ]
}

pub(super) fn server_url(address: IpAddr, port: u16) -> String {
    match address {
        IpAddr::V4(v4) => format!("https://{v4}:{port}"),
        IpAddr::V6(v6) => format!("https://[{v6}]:{port}"),
    }
}

pub(super) fn write_kubeconfig(
    path: &Path,
    server: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "petl-test", "cluster": {
            "server": server,
            "certificate-authority": ca,
        }}],
        "users": [{"name": "petl-test", "user": {
            "client-certificate": cert,
            "client-key": key,
        }}],
        "contexts": [{"name": "petl-test", "context": {
            "cluster": "petl-test", "user": "petl-test", "namespace": "default",
        }}],
        "current-context": "petl-test",
    });
    let yaml = serde_yaml::to_string(&config).map_err(|e| Error::Kubeconfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, yaml).context(|| format!("writing {}", path.display()))
}

pub(super) async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| Error::Kubeconfig {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    Ok(Client::try_from(config)?)
}
