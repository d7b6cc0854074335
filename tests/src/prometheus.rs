//! A real Prometheus server (Debian's package) scraping given targets every second,
//! on a free loopback port with throwaway storage, queried through its HTTP API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tempfile::TempDir;

use crate::error::{Error, IoContext, Result};
use crate::process::{Spawner, Supervised, free_port};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);
/// The `job` label every scraped series carries.
pub const JOB: &str = "petl";

/// One element of an instant-query result: the series' labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A running Prometheus; killed, and its storage removed, on drop.
pub struct Prometheus {
    process: Supervised,
    /// Writes the pods `file_sd_configs` reads (see [`crate::pod_discovery`]); aborted on drop.
    discovery: Option<tokio::task::JoinHandle<()>>,
    _spawner: Spawner,
    port: u16,
    http: reqwest::Client,
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`/metrics` over HTTP, every 1s, job
    /// [`JOB`]) and waits until it is ready. Installs the Debian package with
    /// `scripts/setup/prometheus.sh` when the binary is missing.
    pub async fn start(targets: &[SocketAddr]) -> Result<Self> {
        let scrape = serde_json::json!({
            "job_name": JOB,
            "static_configs": [{
                "targets": targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            }],
        });
        Self::start_with(new_dir()?, vec![scrape]).await
    }

    /// Starts Prometheus scraping, every second, what each [`PodScrape`] selects among the pods
    /// of the API server of `kubeconfig`, found as Kubernetes service discovery finds them
    /// ([`crate::pod_discovery`] stands in for it: Debian's build lacks it). Every series
    /// carries `namespace`, `pod` and `container` labels. Pod IPs must be reachable from this
    /// machine (the local node's are).
    pub async fn start_pods(kubeconfig: &Path, scrapes: &[PodScrape]) -> Result<Self> {
        let client = crate::pod_discovery::client(kubeconfig).await?;
        let dir = new_dir()?;
        let namespaces: Vec<String> = if scrapes.iter().any(|s| s.namespaces.is_empty()) {
            Vec::new()
        } else {
            let mut all: Vec<String> = scrapes.iter().flat_map(|s| s.namespaces.clone()).collect();
            all.sort();
            all.dedup();
            all
        };
        let targets = dir.path().join("pods.json");
        std::fs::write(&targets, "[]").context(|| format!("writing {}", targets.display()))?;
        let discovery = crate::pod_discovery::spawn(client, namespaces, targets.clone());
        let configs = scrapes.iter().map(|s| s.config(&targets)).collect();
        let mut prometheus = Self::start_with(dir, configs).await?;
        prometheus.discovery = Some(discovery);
        Ok(prometheus)
    }

    async fn start_with(dir: TempDir, scrape_configs: Vec<serde_json::Value>) -> Result<Self> {
        let binary = tokio::task::spawn_blocking(ensure_binary)
            .await
            .map_err(|e| Error::Io {
                what: "installing prometheus".into(),
                source: std::io::Error::other(e),
            })??;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, config_yaml(scrape_configs))
            .context(|| format!("writing {}", config.display()))?;
        let port = free_port()?;
        let spawner = Spawner::new()?;
        let process = spawner.spawn(
            "prometheus",
            &binary,
            &[
                format!("--config.file={}", config.display()),
                format!("--storage.tsdb.path={}", dir.path().join("data").display()),
                format!("--web.listen-address=127.0.0.1:{port}"),
                "--storage.tsdb.retention.time=1h".into(),
                "--log.level=warn".into(),
            ],
            &dir.path().join("prometheus.log"),
        )?;
        let mut prometheus = Self {
            process,
            discovery: None,
            _spawner: spawner,
            port,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            dir,
        };
        prometheus.wait_ready().await?;
        Ok(prometheus)
    }

    /// Base URL of the HTTP API, e.g. `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The temp dir holding the config, storage and `prometheus.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs an instant query; a scalar result comes back as one unlabelled sample.
    pub async fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let response: QueryResponse = self
            .http
            .get(format!("{}/api/v1/query", self.url()))
            .query(&[("query", promql)])
            .send()
            .await?
            .json()
            .await?;
        let failed = |message: String| Error::Query {
            query: promql.to_string(),
            message,
        };
        if response.status != "success" {
            return Err(failed(format!(
                "{}: {}",
                response.error_type.unwrap_or_default(),
                response.error.unwrap_or_default()
            )));
        }
        let data = response
            .data
            .ok_or_else(|| failed("response has no data".into()))?;
        match data.result_type.as_str() {
            "vector" => {
                let series: Vec<VectorSample> =
                    serde_json::from_value(data.result).map_err(|e| failed(e.to_string()))?;
                series
                    .into_iter()
                    .map(|s| {
                        Ok(Sample {
                            labels: s.metric,
                            value: parse_value(&s.value.1).map_err(&failed)?,
                        })
                    })
                    .collect()
            }
            "scalar" => {
                let (_, value): (f64, String) =
                    serde_json::from_value(data.result).map_err(|e| failed(e.to_string()))?;
                Ok(vec![Sample {
                    labels: BTreeMap::new(),
                    value: parse_value(&value).map_err(&failed)?,
                }])
            }
            other => Err(failed(format!(
                "result type {other} is not supported; ask for an instant vector or scalar"
            ))),
        }
    }

    /// Repeats `promql` until it returns at least one sample, or fails after `timeout`.
    pub async fn wait_for(&self, promql: &str, timeout: Duration) -> Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let samples = self.query(promql).await?;
            if !samples.is_empty() {
                return Ok(samples);
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: format!("PromQL {promql:?} returning a sample"),
                    seconds: timeout.as_secs(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            self.process.ensure_running()?;
            let ready = self
                .http
                .get(format!("{}/-/ready", self.url()))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(Error::NotReady {
                    component: "prometheus".into(),
                    seconds: READY_TIMEOUT.as_secs(),
                    log_tail: self.process.log_tail(40),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(discovery) = &self.discovery {
            discovery.abort();
        }
    }
}

fn new_dir() -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix("petl-prometheus-")
        .tempdir()
        .context(|| "creating a temp dir for prometheus".to_string())
}

fn config_yaml(scrape_configs: Vec<serde_json::Value>) -> String {
    let config = serde_json::json!({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": scrape_configs,
    });
    // JSON is YAML; Prometheus reads it as is.
    config.to_string()
}

/// Which pods' ports one scrape job reads, in the terms of a prometheus-operator PodMonitor:
/// pods in `namespaces` (all when empty) carrying every label of `match_labels` and every label
/// named in `labels_present`, each container port named in `ports`, at `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodScrape {
    pub job: String,
    pub namespaces: Vec<String>,
    pub match_labels: BTreeMap<String, String>,
    pub labels_present: Vec<String>,
    pub ports: Vec<String>,
}

impl PodScrape {
    /// The scrape job over the pods listed in `targets` (a `file_sd_configs` file).
    fn config(&self, targets: &Path) -> serde_json::Value {
        let mut relabel = Vec::new();
        if !self.namespaces.is_empty() {
            let names: Vec<String> = self.namespaces.iter().map(|n| regex_escape(n)).collect();
            relabel.push(serde_json::json!({
                "action": "keep",
                "source_labels": ["__meta_kubernetes_namespace"],
                "regex": names.join("|"),
            }));
        }
        for (name, value) in &self.match_labels {
            relabel.push(serde_json::json!({
                "action": "keep",
                "source_labels": [format!("__meta_kubernetes_pod_label_{}", label_name(name))],
                "regex": regex_escape(value),
            }));
        }
        for name in &self.labels_present {
            relabel.push(serde_json::json!({
                "action": "keep",
                "source_labels": [format!("__meta_kubernetes_pod_labelpresent_{}", label_name(name))],
                "regex": "true",
            }));
        }
        let ports: Vec<String> = self.ports.iter().map(|p| regex_escape(p)).collect();
        relabel.push(serde_json::json!({
            "action": "keep",
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": ports.join("|"),
        }));
        // Pods that ended keep their IP in discovery for a while; scrape running ones only.
        relabel.push(serde_json::json!({
            "action": "keep",
            "source_labels": ["__meta_kubernetes_pod_phase"],
            "regex": "Running",
        }));
        for (meta, label) in [
            ("__meta_kubernetes_namespace", "namespace"),
            ("__meta_kubernetes_pod_name", "pod"),
            ("__meta_kubernetes_pod_container_name", "container"),
            ("__meta_kubernetes_pod_container_port_name", "port"),
        ] {
            relabel.push(serde_json::json!({"source_labels": [meta], "target_label": label}));
        }
        serde_json::json!({
            "job_name": self.job,
            "file_sd_configs": [{"files": [targets], "refresh_interval": "1s"}],
            "relabel_configs": relabel,
        })
    }
}

/// A Kubernetes label name as Prometheus' discovery spells it in meta labels.
pub(crate) fn label_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

fn regex_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn parse_value(text: &str) -> std::result::Result<f64, String> {
    // Prometheus spells special values as Go does.
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => text
            .parse()
            .map_err(|e| format!("sample value {text:?}: {e}")),
    }
}

fn ensure_binary() -> Result<PathBuf> {
    if let Some(found) = find_on_path("prometheus") {
        return Ok(found);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup/prometheus.sh");
    eprintln!(
        "petl-tests: prometheus not found; running {}",
        script.display()
    );
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .context(|| format!("running {}", script.display()))?;
    match find_on_path("prometheus") {
        Some(found) if status.success() => Ok(found),
        _ => Err(Error::Setup {
            script,
            status: status.to_string(),
        }),
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[derive(Deserialize)]
struct QueryResponse {
    status: String,
    data: Option<QueryData>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct QueryData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct VectorSample {
    metric: BTreeMap<String, String>,
    value: (f64, String),
}
