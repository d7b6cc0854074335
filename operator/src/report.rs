//! Rank 0's report, polled: one task per running job GETs `/report` from rank 0's trainer every
//! 10 s and, when it changed, keeps it and asks for a reconcile, which writes it into the status.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::Stream;
use kube::runtime::reflector::ObjectRef;
use petl_crds::report::REPORT_PATH;
use petl_crds::{PetlJob, WorkerReport};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tracing::debug;

use crate::metrics::Metrics;

/// Time between two polls of one job (and so the most the API server hears of it for progress).
pub const POLL_INTERVAL: Duration = Duration::from_secs(10);
/// Longest a poll may take, connection included.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a poll brought no report. The variant names are the `result` label of
/// `petl_operator_report_polls_total`.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// No answer within [`POLL_TIMEOUT`].
    #[error("GET {url}: no answer within {POLL_TIMEOUT:?}")]
    Timeout {
        /// The report's URL.
        url: String,
    },
    /// The connection failed (the trainer is not listening yet, or the network is in the way).
    #[error("GET {url}: {source}")]
    Unreachable {
        /// The report's URL.
        url: String,
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The trainer answered with an error status.
    #[error("GET {url}: HTTP {status}")]
    Status {
        /// The report's URL.
        url: String,
        /// The HTTP status code.
        status: u16,
    },
    /// The body is not a WorkerReport.
    #[error("GET {url}: not a worker report: {source}")]
    Body {
        /// The report's URL.
        url: String,
        /// The decoding error.
        #[source]
        source: reqwest::Error,
    },
}

impl PollError {
    /// The `result` metric label.
    pub fn label(&self) -> &'static str {
        match self {
            PollError::Timeout { .. } => "timeout",
            PollError::Unreachable { .. } => "unreachable",
            PollError::Status { .. } => "status",
            PollError::Body { .. } => "body",
        }
    }
}

/// GET rank 0's report at `addr`.
pub async fn fetch(http: &reqwest::Client, addr: SocketAddr) -> Result<WorkerReport, PollError> {
    let url = format!("http://{addr}{REPORT_PATH}");
    let sent = http.get(&url).timeout(POLL_TIMEOUT).send().await;
    let response = sent.map_err(|source| {
        if source.is_timeout() {
            PollError::Timeout { url: url.clone() }
        } else {
            PollError::Unreachable {
                url: url.clone(),
                source,
            }
        }
    })?;
    let status = response.status();
    if !status.is_success() {
        return Err(PollError::Status {
            url,
            status: status.as_u16(),
        });
    }
    response.json().await.map_err(|source| {
        if source.is_timeout() {
            PollError::Timeout { url: url.clone() }
        } else {
            PollError::Body {
                url: url.clone(),
                source,
            }
        }
    })
}

/// The jobs being polled, their latest reports, and the channel that asks for reconciles.
pub struct Reports {
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    polls: Mutex<HashMap<String, Poll>>,
    trigger: RwLock<Option<mpsc::UnboundedSender<ObjectRef<PetlJob>>>>,
}

/// One job's poller.
struct Poll {
    target: watch::Sender<Option<SocketAddr>>,
    latest: Arc<Mutex<Option<WorkerReport>>>,
    task: AbortHandle,
}

impl Drop for Poll {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reports {
    /// No job polled yet.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(POLL_TIMEOUT)
            .timeout(POLL_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            http,
            metrics,
            polls: Mutex::new(HashMap::new()),
            trigger: RwLock::new(None),
        }
    }

    /// The reconcile requests of the pollers, for one run of the controller; a new call
    /// replaces the previous stream and stops every poller started for it.
    pub fn triggers(&self) -> impl Stream<Item = ObjectRef<PetlJob>> + Send + 'static {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.stop_all();
        *self.trigger.write().unwrap_or_else(|e| e.into_inner()) = Some(sender);
        futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|job| (job, receiver))
        })
    }

    /// Poll rank 0 of `job` (UID `uid`) at `target`, or stop polling it (`None`).
    pub fn follow(&self, job: ObjectRef<PetlJob>, uid: &str, target: Option<SocketAddr>) {
        let mut polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        let Some(addr) = target else {
            polls.remove(uid);
            return;
        };
        if let Some(poll) = polls.get(uid) {
            poll.target.send_if_modified(|current| {
                let changed = *current != Some(addr);
                *current = Some(addr);
                changed
            });
            return;
        }
        let Some(trigger) = self
            .trigger
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return; // no controller runs: nothing would take the report in
        };
        let (target, watched) = watch::channel(Some(addr));
        let latest = Arc::new(Mutex::new(None));
        let poller = Poller {
            http: self.http.clone(),
            metrics: self.metrics.clone(),
            job,
            target: watched,
            latest: latest.clone(),
            trigger,
        };
        let task = tokio::spawn(poller.run()).abort_handle();
        polls.insert(
            uid.to_string(),
            Poll {
                target,
                latest,
                task,
            },
        );
    }

    /// The latest report of job `uid`, if one came in.
    pub fn latest(&self, uid: &str) -> Option<WorkerReport> {
        let polls = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        let poll = polls.get(uid)?;
        poll.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stop polling job `uid`.
    pub fn forget(&self, uid: &str) {
        self.polls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// Stop every poller (the controller stopped).
    pub fn stop_all(&self) {
        self.polls.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *self.trigger.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The task behind one [`Poll`].
struct Poller {
    http: reqwest::Client,
    metrics: Arc<Metrics>,
    job: ObjectRef<PetlJob>,
    target: watch::Receiver<Option<SocketAddr>>,
    latest: Arc<Mutex<Option<WorkerReport>>>,
    trigger: mpsc::UnboundedSender<ObjectRef<PetlJob>>,
}

impl Poller {
    /// Poll now, then every [`POLL_INTERVAL`] and whenever the target moves.
    async fn run(mut self) {
        loop {
            let target = *self.target.borrow_and_update();
            if let Some(addr) = target {
                self.poll(addr).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                changed = self.target.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn poll(&self, addr: SocketAddr) {
        let started = Instant::now();
        let result = fetch(&self.http, addr).await;
        self.metrics.report_polled(
            result.as_ref().err().map(PollError::label),
            started.elapsed(),
        );
        match result {
            Ok(report) => {
                let changed = {
                    let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
                    let changed = latest.as_ref() != Some(&report);
                    *latest = Some(report);
                    changed
                };
                if changed {
                    let _ = self.trigger.send(self.job.clone());
                }
            }
            Err(e) => debug!(job = %self.job, error = %e, "no report from rank 0"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::get;
    use futures::StreamExt;

    async fn serve(router: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    const REPORT: &str = r#"{"progress":{"step":7,"totalSteps":50,"loss":0.25},"snapshot":{"generation":7,"step":7,"healthyShards":3,"tolerableLosses":1},"recoveries":0}"#;

    #[tokio::test]
    async fn a_report_is_fetched_and_parsed() {
        let addr = serve(Router::new().route(REPORT_PATH, get(|| async { REPORT }))).await;
        let report = fetch(&reqwest::Client::new(), addr).await.unwrap();
        assert_eq!((report.progress.step, report.progress.total_steps), (7, 50));
        assert_eq!(report.snapshot.unwrap().healthy_shards, 3);
    }

    #[tokio::test]
    async fn failures_are_told_apart() {
        let http = reqwest::Client::new();
        let addr = serve(Router::new().route(REPORT_PATH, get(|| async { "not json" }))).await;
        let err = fetch(&http, addr).await.unwrap_err();
        assert_eq!(err.label(), "body", "{err}");

        let missing = serve(Router::new()).await;
        let err = fetch(&http, missing).await.unwrap_err();
        assert_eq!(err.label(), "status", "{err}");
        assert!(err.to_string().contains("HTTP 404"), "{err}");

        // Nothing listens on a port just released.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let err = fetch(&http, closed).await.unwrap_err();
        assert_eq!(err.label(), "unreachable", "{err}");
        assert!(err.to_string().contains(&closed.to_string()), "{err}");

        // A listener that never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let err = fetch(&http, silent_addr).await.unwrap_err();
        assert_eq!(err.label(), "timeout", "{err}");
        drop(silent);
    }

    #[tokio::test]
    async fn a_poller_keeps_the_latest_report_and_asks_for_a_reconcile_when_it_changes() {
        let addr = serve(Router::new().route(REPORT_PATH, get(|| async { REPORT }))).await;
        let reports = Reports::new(Arc::new(Metrics::new()));
        let mut triggers = Box::pin(reports.triggers());
        let job = ObjectRef::new("j").within("ns");
        reports.follow(job.clone(), "uid-j", Some(addr));
        let asked = tokio::time::timeout(Duration::from_secs(5), triggers.next())
            .await
            .expect("a reconcile is asked for")
            .unwrap();
        assert_eq!(asked, job);
        assert_eq!(reports.latest("uid-j").unwrap().progress.step, 7);
        reports.follow(job, "uid-j", None);
        assert!(reports.latest("uid-j").is_none(), "stopped and forgotten");
    }
}
