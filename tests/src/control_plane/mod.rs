//! A real Kubernetes control plane per test: etcd, kube-apiserver and kube-controller-manager
//! on free loopback ports under a temp dir (or an existing cluster via `PETL_TEST_KUBECONFIG`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use tempfile::TempDir;

use crate::binaries::Binaries;
use crate::error::{Error, IoContext, Result};
use crate::pki::Pki;
use crate::pod_status::PodStatusUpdate;
use crate::process::{Spawner, free_port};

mod components;

use components::{
    LocalComponents, apiserver_args, client_from_kubeconfig, controller_manager_args, etcd_args,
    server_url, write_kubeconfig,
};

/// Set to a kubeconfig path to run the tests against that cluster (e.g. kind)
/// instead of starting a local control plane.
pub const EXTERNAL_KUBECONFIG_ENV: &str = "PETL_TEST_KUBECONFIG";

/// Controllers the local kube-controller-manager runs by default: enough for
/// garbage collection, namespace deletion and service accounts (pods need the
/// `default` one), and nothing that would fight a test over pods (no pod GC,
/// no node lifecycle, no workload controllers).
pub const DEFAULT_CONTROLLERS: &[&str] = &[
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
];

/// How long the API server and controller manager may take to come up; generous
/// because CI runs several test binaries at once on two cores.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);
/// Field manager for the harness's server-side applies.
const FIELD_MANAGER: &str = "petl-tests";
/// Startup attempts; a retry picks new ports when another process took one.
const START_ATTEMPTS: u32 = 3;

/// Knobs for [`ControlPlane::start_with`]; `Default` is what [`ControlPlane::start`] uses.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// `--controllers` of kube-controller-manager (ignored for an external cluster).
    pub controllers: Vec<String>,
    /// Where the API server listens and what it advertises (default `127.0.0.1`). Any other
    /// address also publishes the `kubernetes` Service's endpoints, so that pods reach the
    /// API server through a service proxy, and joins the serving certificate's names.
    pub address: IpAddr,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            controllers: DEFAULT_CONTROLLERS.iter().map(|c| c.to_string()).collect(),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// A running control plane and a client for it; everything it started is
/// killed (whole process groups) and its temp dir removed when it is dropped,
/// also when the test panics. There is no scheduler and no kubelet: pods stay
/// unscheduled unless a test binds them, and tests set pod outcomes themselves
/// with [`ControlPlane::set_pod_status`].
pub struct ControlPlane {
    client: Client,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    helm: PathBuf,
    namespaces: Mutex<Vec<String>>,
    /// Declared before `dir` so the processes die before their files go.
    local: Option<LocalComponents>,
    dir: TempDir,
    startup: Duration,
}

impl ControlPlane {
    /// Starts a local control plane (building the binaries on first use), or
    /// connects to the cluster in `$PETL_TEST_KUBECONFIG` when set.
    pub async fn start() -> Result<Self> {
        Self::start_with(ControlPlaneOptions::default()).await
    }

    pub async fn start_with(options: ControlPlaneOptions) -> Result<Self> {
        if let Some(path) = std::env::var_os(EXTERNAL_KUBECONFIG_ENV) {
            return Self::connect(PathBuf::from(path)).await;
        }
        let binaries = tokio::task::spawn_blocking(Binaries::ensure)
            .await
            .map_err(|e| Error::Io {
                what: "building the control-plane binaries".into(),
                source: std::io::Error::other(e),
            })??;
        let mut attempt = 1;
        loop {
            match Self::start_local(&binaries, &options).await {
                Err(e) if attempt < START_ATTEMPTS && is_port_clash(&e) => {
                    eprintln!("petl-tests: a port was taken during startup; retrying ({e})");
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// A client with cluster-admin rights (the `system:masters` group).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The kubeconfig file for this cluster (admin credentials).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A scratch directory that lives as long as the control plane; component
    /// logs (`etcd.log`, `kube-apiserver.log`, `kube-controller-manager.log`) are here.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The API server's URL (`https://ADDRESS:PORT`, ADDRESS from
    /// [`ControlPlaneOptions::address`]); `None` for an external cluster.
    pub fn server_url(&self) -> Option<String> {
        self.local
            .as_ref()
            .map(|l| server_url(l.address, l.api_port))
    }

    /// The CA certificate (PEM) that signed the API server's serving certificate and every
    /// client certificate of this control plane; `None` for an external cluster.
    pub fn ca_certificate(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.pki.ca_cert.as_path())
    }

    /// A kubeconfig that authenticates as `user` in `group` with a client certificate of this
    /// control plane's CA (e.g. `system:node:NAME` in `system:nodes` for a kubelet), written to
    /// `dir()/users/`. Fails for an external cluster, whose CA key the harness does not hold.
    pub fn user_kubeconfig(&self, user: &str, group: Option<&str>) -> Result<PathBuf> {
        let Some(local) = &self.local else {
            return Err(Error::Kubeconfig {
                path: self.kubeconfig.clone(),
                message: format!(
                    "cannot issue a certificate for {user}: the cluster is external, its CA key is not here"
                ),
            });
        };
        let stem: String = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let (cert, key) = local.pki.issue_client(&stem, user, group)?;
        let users = self.dir.path().join("users");
        std::fs::create_dir_all(&users).context(|| format!("creating {}", users.display()))?;
        let path = users.join(format!("{stem}.kubeconfig"));
        write_kubeconfig(
            &path,
            &server_url(local.address, local.api_port),
            &local.pki.ca_cert,
            &cert,
            &key,
        )?;
        Ok(path)
    }

    /// Time from `start()` until the API server was ready and the controller
    /// manager had created the `default` service account.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Whether this harness started (and will stop) its own processes.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Process ids of etcd, kube-apiserver and kube-controller-manager (empty for
    /// an external cluster); each is also the id of the component's process group.
    pub fn pids(&self) -> Vec<u32> {
        self.local.as_ref().map_or_else(Vec::new, |l| {
            vec![l.etcd.pid(), l.apiserver.pid(), l.controller_manager.pid()]
        })
    }

    /// The last `lines` lines of each component's log, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        match &self.local {
            Some(l) => [&l.etcd, &l.apiserver, &l.controller_manager]
                .iter()
                .map(|c| format!("--- {} ---\n{}", c.name, c.log_tail(lines)))
                .collect(),
            None => String::new(),
        }
    }

    /// Runs kubectl (the one built with the control plane, else `kubectl` on
    /// PATH) against this cluster.
    pub async fn kubectl(&self, args: &[&str]) -> Result<Output> {
        let mut command = tokio::process::Command::new(&self.kubectl);
        command.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        run(command, &self.kubectl, args).await
    }

    /// Runs helm against this cluster with its own config, cache and data dirs.
    pub async fn helm(&self, args: &[&str]) -> Result<Output> {
        let home = self.dir.path().join("helm");
        let mut command = tokio::process::Command::new(&self.helm);
        command
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_DATA_HOME", home.join("data"));
        run(command, &self.helm, args).await
    }

    /// Creates a namespace named `<base>-<unique suffix>` and waits until its
    /// `default` service account exists (pods are refused before that).
    /// Returns the name. Namespaces on an external cluster are deleted on drop.
    pub async fn create_namespace(&self, base: &str) -> Result<String> {
        let name = unique_namespace_name(base);
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("petl.dev/test".to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(self.client())
            .create(&PostParams::default(), &namespace)
            .await?;
        self.namespaces
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(name.clone());
        let accounts = Api::<ServiceAccount>::namespaced(self.client(), &name);
        wait_until(
            &format!("service account default in namespace {name}"),
            Duration::from_secs(60),
            || async { Ok(accounts.get_opt("default").await?.is_some()) },
        )
        .await?;
        Ok(name)
    }

    /// Server-side-applies every CustomResourceDefinition in the `*.yaml`/`*.yml`
    /// files of `dir` and waits until each is Established. Returns their names.
    pub async fn install_crds(&self, dir: impl AsRef<Path>) -> Result<Vec<String>> {
        let crds = read_crds(dir.as_ref())?;
        let api = Api::<CustomResourceDefinition>::all(self.client());
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let mut names = Vec::new();
        for crd in &crds {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &params, &Patch::Apply(crd)).await?;
            names.push(name);
        }
        for name in &names {
            let established =
                kube::runtime::wait::await_condition(api.clone(), name, crd_established);
            tokio::time::timeout(Duration::from_secs(60), established)
                .await
                .map_err(|_| Error::Timeout {
                    what: format!("CustomResourceDefinition {name} becoming Established"),
                    seconds: 60,
                })??;
        }
        Ok(names)
    }

    /// [`install_crds`](Self::install_crds) on the chart's `charts/petl-operator/crds/`.
    pub async fn install_petl_crds(&self) -> Result<Vec<String>> {
        self.install_crds(repo_root().join("charts/petl-operator/crds"))
            .await
    }

    /// Sets a pod's status through the status subresource, standing in for the
    /// kubelet that this control plane does not have.
    pub async fn set_pod_status(
        &self,
        namespace: &str,
        pod: &str,
        update: &PodStatusUpdate,
    ) -> Result<Pod> {
        crate::pod_status::set_pod_status(&self.client, namespace, pod, update).await
    }

    async fn connect(kubeconfig: PathBuf) -> Result<Self> {
        let started = Instant::now();
        let client = client_from_kubeconfig(&kubeconfig).await?;
        client.apiserver_version().await?;
        let cached = Binaries::cached();
        let or_path = |built: PathBuf, name: &str| {
            if built.is_file() {
                built
            } else {
                PathBuf::from(name)
            }
        };
        Ok(Self {
            client,
            kubeconfig,
            kubectl: or_path(cached.kubectl, "kubectl"),
            helm: or_path(cached.helm, "helm"),
            namespaces: Mutex::new(Vec::new()),
            local: None,
            dir: temp_dir()?,
            startup: started.elapsed(),
        })
    }

    async fn start_local(binaries: &Binaries, options: &ControlPlaneOptions) -> Result<Self> {
        let started = Instant::now();
        let dir = temp_dir()?;
        let address = options.address;
        let pki = Pki::generate(&dir.path().join("pki"), &address.to_string())?;
        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let api_port = free_port()?;
        let kcm_port = free_port()?;
        let server = server_url(address, api_port);
        let kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            &server,
            &pki.ca_cert,
            &pki.admin_cert,
            &pki.admin_key,
        )?;
        let kcm_kubeconfig = dir.path().join("kube-controller-manager.kubeconfig");
        write_kubeconfig(
            &kcm_kubeconfig,
            &server,
            &pki.ca_cert,
            &pki.controller_manager_cert,
            &pki.controller_manager_key,
        )?;

        // All three start at once: the API server retries etcd and the
        // controller manager waits for the API server, which saves seconds.
        let spawner = Spawner::new()?;
        let log = |name: &str| dir.path().join(format!("{name}.log"));
        let etcd = spawner.spawn(
            "etcd",
            &binaries.etcd,
            &etcd_args(dir.path(), etcd_port, peer_port),
            &log("etcd"),
        )?;
        let apiserver = spawner.spawn(
            "kube-apiserver",
            &binaries.kube_apiserver,
            &apiserver_args(&pki, etcd_port, address, api_port),
            &log("kube-apiserver"),
        )?;
        let controller_manager = spawner.spawn(
            "kube-controller-manager",
            &binaries.kube_controller_manager,
            &controller_manager_args(dir.path(), &pki, &kcm_kubeconfig, kcm_port, options),
            &log("kube-controller-manager"),
        )?;
        let mut local = LocalComponents {
            controller_manager,
            apiserver,
            etcd,
            address,
            api_port,
            pki,
            _spawner: spawner,
        };

        let client = client_from_kubeconfig(&kubeconfig).await?;
        let service_accounts = options
            .controllers
            .iter()
            .any(|c| c == "serviceaccount-controller");
        local.wait_ready(&client, started, service_accounts).await?;
        Ok(Self {
            client,
            kubeconfig,
            kubectl: binaries.kubectl.clone(),
            helm: binaries.helm.clone(),
            namespaces: Mutex::new(Vec::new()),
            local: Some(local),
            dir,
            startup: started.elapsed(),
        })
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.local.is_some() {
            return; // the processes, and all state with them, die with `local`
        }
        // On a shared external cluster, leave no test namespaces behind.
        let namespaces = std::mem::take(
            &mut *self
                .namespaces
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        if namespaces.is_empty() {
            return;
        }
        let _ = std::process::Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["delete", "namespace", "--wait=false", "--ignore-not-found"])
            .args(&namespaces)
            .output();
    }
}

fn read_crds(dir: &Path) -> Result<Vec<CustomResourceDefinition>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .context(|| format!("reading CRD directory {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut crds = Vec::new();
    for file in files {
        let text =
            std::fs::read_to_string(&file).context(|| format!("reading {}", file.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value =
                serde_yaml::Value::deserialize(document).map_err(|source| Error::CrdYaml {
                    file: file.clone(),
                    source,
                })?;
            if value.is_null() {
                continue; // an empty document, e.g. after a trailing `---`
            }
            let crd = serde_yaml::from_value(value).map_err(|source| Error::CrdYaml {
                file: file.clone(),
                source,
            })?;
            crds.push(crd);
        }
    }
    Ok(crds)
}

fn crd_established(crd: Option<&CustomResourceDefinition>) -> bool {
    crd.and_then(|c| c.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

async fn run(
    mut command: tokio::process::Command,
    program: &Path,
    args: &[&str],
) -> Result<Output> {
    command.kill_on_drop(true);
    command
        .output()
        .await
        .context(|| format!("running {} {}", program.display(), args.join(" ")))
}

/// Polls `check` until it returns true; errors from `check` end the wait.
pub(crate) async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                seconds: timeout.as_secs(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn unique_namespace_name(base: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut clean: String = base
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    clean.truncate(40);
    let clean = clean.trim_matches('-');
    let clean = if clean.is_empty() { "test" } else { clean };
    format!("{clean}-{}-{n}", std::process::id())
}

fn is_port_clash(error: &Error) -> bool {
    let text = error.to_string();
    text.contains("address already in use") || text.contains("bind: address")
}

fn temp_dir() -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix("petl-control-plane-")
        .tempdir()
        .context(|| "creating a temp dir for the control plane".to_string())
}

/// The workspace root, found from this crate's source tree.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}
