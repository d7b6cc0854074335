//! Measures the PetlJob operator at scale: creates N PetlJobs on a real local control plane with
//! the operator running as its own process; prints reconcile p50/p99, apply→pods and peak RSS.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::{Stream, StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, CustomResourceExt, ResourceExt};
use petl_crds::PetlJob;
use petl_operator::metrics::TIMING_TARGET;
use petl_tests::{ControlPlane, PodStatusUpdate, sample_job};
use serde_json::json;

/// Targets the operator is held to.
const P99_TARGET_MS: f64 = 50.0;
const RSS_TARGET_MIB: f64 = 64.0;
/// The job reconciled before the clock starts (left out of the counts, not of the quantiles).
const WARM_UP_JOB: &str = "warm-up";

#[derive(Parser, Debug)]
#[command(about = "Create many PetlJobs and measure the petl operator")]
struct Args {
    /// PetlJobs to create.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Workers per job.
    #[arg(long, default_value_t = 1)]
    replicas: i32,
    /// Creates in flight at once.
    #[arg(long, default_value_t = 32)]
    parallel: usize,
    /// Where the operator's JSON log goes (default: inside the control plane's temporary
    /// directory, removed at exit).
    #[arg(long)]
    operator_log: Option<PathBuf>,
    /// Creates per second (0: as fast as `parallel` allows, a burst).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// The petl-operator binary (default: next to this binary).
    #[arg(long)]
    operator_bin: Option<PathBuf>,
    /// Also mark every pod Running+Ready and time until every job reports Running.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    run_pods: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = match &args.operator_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("petl-operator"),
    };
    if !bin.is_file() {
        bail!(
            "{} not found; build it first: cargo build --release -p petl-operator (or pass --operator-bin)",
            bin.display()
        );
    }

    let cp = ControlPlane::start()
        .await
        .context("starting the control plane")?;
    let client = cp.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = PetlJob::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("petl-bench").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(crds, &crd.name_any(), conditions::is_crd_established()),
    )
    .await??;
    let ns = cp.create_namespace("bench-op").await?;

    let port = free_port()?;
    let log = args
        .operator_log
        .clone()
        .unwrap_or_else(|| cp.dir().join("operator.log"));
    let mut operator = spawn_operator(&bin, cp.kubeconfig_path(), &ns, port, &log)?;
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    wait_ready(port).await?;
    println!(
        "operator pid {} on {metrics_url}; control plane up in {:.1}s",
        operator.id(),
        cp.startup_time().as_secs_f64()
    );

    let jobs: Api<PetlJob> = Api::namespaced(client.clone(), &ns);
    let want_pods = args.jobs * args.replicas as usize;
    // Progress comes from watches: polling lists of 1,000 objects a few times a second would
    // load the API server the operator is measured against.
    let labelled =
        watcher::Config::default().labels(&format!("petl.dev/job,petl.dev/job!={WARM_UP_JOB}"));
    let pods = mirror(watcher(
        Api::<PartialObjectMeta<Pod>>::namespaced(client.clone(), &ns),
        labelled,
    ));
    let job_store = mirror(watcher(
        jobs.clone(),
        watcher::Config::default().fields(&format!("metadata.name!={WARM_UP_JOB}")),
    ));
    warm_up(&jobs).await?;
    let mut components: Vec<(&str, u32)> = vec![("operator", operator.id())];
    components.extend(
        ["etcd", "kube-apiserver", "kube-controller-manager"]
            .into_iter()
            .zip(cp.pids()),
    );
    components.push(("load generator", std::process::id()));
    let cpu_before: Vec<f64> = components
        .iter()
        .map(|(_, pid)| cpu_seconds(*pid))
        .collect();

    let served_before = apiserver_time(&client).await?;
    let start = Instant::now();
    let spacing = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    stream::iter(0..args.jobs)
        .map(|i| {
            let jobs = jobs.clone();
            let replicas = args.replicas;
            async move {
                if let Some(spacing) = spacing {
                    tokio::time::sleep_until((start + spacing * i as u32).into()).await;
                }
                jobs.create(
                    &PostParams::default(),
                    &sample_job(
                        &format!("bench-{i:04}"),
                        json!({ "replicas": replicas, "image": "registry.example/petl:bench" }),
                        json!({}),
                    ),
                )
                .await
            }
        })
        .buffer_unordered(args.parallel)
        .try_collect::<Vec<_>>()
        .await?;
    let applied = start.elapsed();
    let pods_created = loop {
        let n = pods.state().len();
        if n >= want_pods {
            break start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(900) {
            bail!("only {n} of {want_pods} pods after 15 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "created {} PetlJobs in {:.2}s ({}); all {want_pods} pods existed {:.2}s after the first apply",
        args.jobs,
        applied.as_secs_f64(),
        if args.rate > 0.0 {
            format!("paced at {} per second", args.rate)
        } else {
            format!("a burst, {} in flight", args.parallel)
        },
        pods_created.as_secs_f64()
    );

    if args.run_pods {
        let names: Vec<String> = pods.state().iter().map(|p| p.name_any()).collect();
        let marked = Instant::now();
        stream::iter(names.into_iter().enumerate())
            .map(|(i, name)| {
                let cp = &cp;
                let ns = &ns;
                async move {
                    if let Some(spacing) = spacing {
                        tokio::time::sleep_until((marked + spacing * i as u32).into()).await;
                    }
                    cp.set_pod_status(
                        ns,
                        &name,
                        &PodStatusUpdate::running()
                            .container_running("trainer")
                            .ready(),
                    )
                    .await
                }
            })
            .buffer_unordered(args.parallel)
            .try_collect::<Vec<_>>()
            .await?;
        let all_running = loop {
            let running = job_store
                .state()
                .iter()
                .filter(|j| {
                    j.status.as_ref().and_then(|s| s.phase) == Some(petl_crds::Phase::Running)
                })
                .count();
            if running == args.jobs {
                break marked.elapsed();
            }
            if marked.elapsed() > Duration::from_secs(900) {
                bail!(
                    "only {running} of {} jobs Running after 15 minutes",
                    args.jobs
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        println!(
            "every job reported Running {:.2}s after its pods were marked Ready",
            all_running.as_secs_f64()
        );
    }

    let served = apiserver_time(&client).await?;
    let text = reqwest::get(&metrics_url).await?.text().await?;
    let buckets = histogram(&text, "petl_operator_reconcile_duration_seconds");
    let count = buckets.last().map_or(0.0, |b| b.1);
    let p50_buckets = quantile(&buckets, 0.50) * 1000.0;
    let p99_buckets = quantile(&buckets, 0.99) * 1000.0;
    let errors: f64 = text
        .lines()
        .filter(|l| l.starts_with("petl_operator_reconcile_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // The peak since the operator started, so one read at the end covers the whole run.
    let rss_mib = vm_hwm_kib(operator.id()).unwrap_or(0) as f64 / 1024.0;
    let cpu: Vec<String> = components
        .iter()
        .zip(&cpu_before)
        .map(|((name, pid), before)| format!("{name} {:.1}", cpu_seconds(*pid) - before))
        .collect();
    operator.kill().ok();
    operator.wait().ok();
    let mut durations = reconcile_durations(&log)?;
    durations.sort_by(f64::total_cmp);
    let exact = |q: f64| nearest_rank(&durations, q) * 1000.0;
    let (p50, p99) = (exact(0.50), exact(0.99));

    println!();
    println!(
        "reconciles            {count:.0} ({} failed)",
        errors as u64
    );
    println!(
        "reconcile p50         {p50:.1} ms exact ({} durations logged); {p50_buckets:.1} ms interpolated in the histogram's buckets",
        durations.len()
    );
    println!(
        "reconcile p99         {p99:.1} ms exact; {p99_buckets:.1} ms interpolated   target {P99_TARGET_MS} ms   ratio {:.2}x of target",
        p99 / P99_TARGET_MS
    );
    println!("reconcile max         {:.1} ms", exact(1.0));
    println!(
        "apply -> all pods     {:.2} s for {want_pods} pods ({:.0} pods/s)",
        pods_created.as_secs_f64(),
        want_pods as f64 / pods_created.as_secs_f64()
    );
    println!(
        "operator peak RSS     {rss_mib:.1} MiB (VmHWM)   target {RSS_TARGET_MIB} MiB   ratio {:.2}x of target",
        rss_mib / RSS_TARGET_MIB
    );
    println!("CPU seconds           {}", cpu.join(", "));
    let mut served: Vec<(String, f64, f64)> = served
        .into_iter()
        .map(|(kind, (count, seconds))| {
            let (c0, s0) = served_before.get(&kind).copied().unwrap_or_default();
            (kind, count - c0, seconds - s0)
        })
        .filter(|(_, count, _)| *count > 0.0)
        .collect();
    served.sort_by(|a, b| b.2.total_cmp(&a.2));
    println!("API server time       (requests, seconds serving them, mean; largest first)");
    for (kind, count, seconds) in served.iter().take(10) {
        println!(
            "  {kind:<36} {count:>6.0} {seconds:>7.2} s {:>6.1} ms",
            seconds / count * 1000.0
        );
    }
    println!("operator log          {}", log.display());
    Ok(())
}

fn spawn_operator(
    bin: &PathBuf,
    kubeconfig: &std::path::Path,
    ns: &str,
    port: u16,
    log: &std::path::Path,
) -> Result<Child> {
    let log_file = std::fs::File::create(log)?;
    Command::new(bin)
        .args([
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--namespace",
            ns,
            "--log-format",
            "json",
        ])
        .env("KUBECONFIG", kubeconfig)
        // Warnings, plus one line per reconcile with its exact duration, inside the reconcile's
        // span (which names the job), plus the operator's info lines (a few per job).
        .env(
            "RUST_LOG",
            format!("warn,petl_operator=info,{TIMING_TARGET}=debug"),
        )
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

async fn wait_ready(port: u16) -> Result<()> {
    let url = format!("http://127.0.0.1:{port}/readyz");
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(&url).await
            && r.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the operator did not become ready on {url}")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Create one job and wait until the operator has reported on it. The operator is ready as
/// soon as it reaches the API server, before its controller's first list; jobs created in
/// that gap would queue and be timed as one burst at the start of a paced run.
async fn warm_up(jobs: &Api<PetlJob>) -> Result<()> {
    let job = sample_job(
        WARM_UP_JOB,
        json!({ "replicas": 1, "image": "registry.example/petl:bench" }),
        json!({}),
    );
    jobs.create(&PostParams::default(), &job).await?;
    let reported = |j: Option<&PetlJob>| {
        j.and_then(|j| j.status.as_ref())
            .is_some_and(|s| s.observed_generation.is_some())
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(jobs.clone(), WARM_UP_JOB, reported),
    )
    .await
    .context("the operator did not report on the warm-up job within 60 s")??;
    Ok(())
}

/// Requests the API server has served by "VERB resource[/subresource]": (count, seconds spent),
/// from its request-duration histogram (watches left out: they last as long as they are open).
async fn apiserver_time(
    client: &kube::Client,
) -> Result<std::collections::HashMap<String, (f64, f64)>> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(request).await?;
    let mut served = std::collections::HashMap::<String, (f64, f64)>::new();
    for (suffix, slot) in [("_count{", 0), ("_sum{", 1)] {
        let prefix = format!("apiserver_request_duration_seconds{suffix}");
        for line in text.lines().filter_map(|l| l.strip_prefix(&prefix)) {
            let Some((labels, value)) = line.rsplit_once("} ") else {
                continue;
            };
            let label = |name: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                    .map_or("", |v| v.trim_end_matches('"'))
            };
            let (verb, resource, sub) = (label("verb"), label("resource"), label("subresource"));
            if verb == "WATCH" {
                continue;
            }
            let kind = if sub.is_empty() {
                format!("{verb} {resource}")
            } else {
                format!("{verb} {resource}/{sub}")
            };
            let entry = served.entry(kind).or_default();
            let value: f64 = value.trim().parse().unwrap_or(0.0);
            if slot == 0 {
                entry.0 += value;
            } else {
                entry.1 += value;
            }
        }
    }
    Ok(served)
}

/// A store the watch `events` keep up to date, in a task of its own.
fn mirror<K>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> Store<K>
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    tokio::spawn(
        events
            .default_backoff()
            .reflect(writer)
            .for_each(|_| async {}),
    );
    reader
}

/// CPU time (user + system) `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    // /proc reports USER_HZ ticks, 100 per second on Linux.
    ticks / 100.0
}

/// Peak resident set size of `pid` in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Cumulative (upper bound, count) pairs of a histogram in OpenMetrics text.
fn histogram(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, rest) = rest.split_once('"')?;
            let count = rest.rsplit(' ').next()?.parse().ok()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count))
        })
        .collect()
}

/// Every reconcile's exact duration in seconds, from the operator's JSON log.
fn reconcile_durations(log: &std::path::Path) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(log)
        .with_context(|| format!("reading the operator log {}", log.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == TIMING_TARGET && v["message"] == "reconcile finished")
        .filter_map(|v| v["seconds"].as_f64())
        .collect())
}

/// The q-quantile of sorted values: the smallest value with at least q of them at or below it.
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The q-quantile by linear interpolation inside the bucket that holds it.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let width = count - lower.1;
            let fraction = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return lower.0 + (le - lower.0) * fraction;
        }
        lower = (le, count);
    }
    lower.0
}
