use kube::ResourceExt;

use super::*;
use crate::fixtures;
use crate::reconcile::ranks::JOB_LABEL;

fn defaults() -> WorkerDefaults {
    WorkerDefaults {
        image: Some("petl-worker:1".into()),
        cuda_image: Some("petl-worker-cuda:1".into()),
        metrics_port: 9100,
    }
}

fn render(job: &PetlJob, rank: i32) -> PodSpec {
    pod(job, &Names::of(job), rank, &defaults())
        .unwrap()
        .spec
        .unwrap()
}

fn agent(spec: &PodSpec) -> &Container {
    &spec.init_containers.as_ref().unwrap()[0]
}

/// The value after `flag` in a command line.
fn flag<'a>(command: &'a [String], flag: &str) -> Option<&'a str> {
    let at = command.iter().position(|a| a == flag)?;
    command.get(at + 1).map(String::as_str)
}

/// The trainer's flags and the variables it reads (docs/trainer.md, `petl train`, and its
/// URI resolution): the trainer crate is not a dependency of the operator, so its clap
/// definition is checked against this list instead.
const TRAINER_FLAGS: [&str; 15] = [
    "--config",
    "--rank",
    "--world-size",
    "--peers",
    "--port",
    "--job",
    "--secret-file",
    "--snapshot-socket",
    "--no-snapshots",
    "--connect-timeout",
    "--termination-log",
    "--output",
    "--metrics-addr",
    "--log-format",
    "--device",
];
const TRAINER_VARIABLES: [&str; 15] = [
    "PETL_CONFIG",
    "PETL_RANK",
    "PETL_WORLD_SIZE",
    "PETL_PEERS",
    "PETL_TRAINER_PORT",
    "PETL_JOB",
    "PETL_SNAPSHOT_TOKEN_FILE",
    "PETL_SNAPSHOT_SOCKET",
    "PETL_CONNECT_TIMEOUT",
    "PETL_TERMINATION_LOG",
    "PETL_METRICS_ADDR",
    "PETL_LOG_FORMAT",
    "PETL_DEVICE",
    "PETL_PVC_ROOT",
    "PETL_CACHE_DIR",
];

fn value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

#[test]
fn the_agent_command_parses_with_the_agents_own_flags() {
    use clap::Parser;
    let mut job = fixtures::job("sst2", 3);
    job.spec.snapshot.every_steps = 5;
    job.spec.snapshot.durable = Some(petl_crds::DurableSpec {
        uri: "pvc://ckpt/jobs/".into(),
        every_snapshots: 4,
        secret_ref: None,
    });
    let spec = render(&job, 1);
    let agent = agent(&spec);
    let command = agent.command.clone().unwrap();
    assert_eq!(command[..2], [PROGRAM, SNAPSHOT_AGENT]);
    // Everything is a flag; no variable meant for the trainer (PETL_PEERS) reaches it.
    assert_eq!(agent.env, None);
    let args = petl_snapshot::agent::AgentArgs::try_parse_from(&command[1..])
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert_eq!((args.rank, args.world_size), (1, 3));
    assert_eq!((args.data_shards, args.parity_shards), (2, 1));
    assert_eq!(args.job, "sst2");
    assert_eq!(args.listen.port(), SNAPSHOT_PORT as u16);
    assert_eq!(args.local_socket.to_str(), Some(SNAPSHOT_SOCKET));
    assert_eq!(
        args.durable_dir.unwrap().to_str(),
        Some("/mnt/pvc/ckpt/jobs")
    );
    assert_eq!(args.durable_every, 20);
    assert_eq!(args.metrics_addr.unwrap().port(), AGENT_METRICS_PORT as u16);
    // The secret file is the mounted token, in the token's volume.
    let token = args.secret_file.to_str().unwrap().to_string();
    assert_eq!(token, token_file());
    let mounted = agent.volume_mounts.iter().flatten();
    assert!(
        mounted
            .clone()
            .any(|m| token.starts_with(&m.mount_path) && m.name == "snapshot-token")
    );
    // Its peer pattern names every rank's agent through the headless Service.
    let peers = petl_snapshot::PeerList::parse(&args.peers)
        .resolve(args.world_size)
        .unwrap();
    let names = Names::of(&job);
    for (rank, peer) in (0..3).zip(peers.iter()) {
        assert_eq!(
            peer.to_string(),
            format!("{}:{SNAPSHOT_PORT}", names.peer_host(rank))
        );
    }
}

#[test]
fn the_trainer_gets_only_flags_and_variables_it_reads() {
    let job = fixtures::job("sst2", 3);
    let spec = render(&job, 2);
    let trainer = &spec.containers[0];
    let command = trainer.command.clone().unwrap();
    assert_eq!(command[..2], [PROGRAM, TRAIN]);
    for flag in command[2..].iter().filter(|a| a.starts_with("--")) {
        assert!(
            TRAINER_FLAGS.contains(&flag.as_str()),
            "{flag} in {command:?}"
        );
    }
    assert!(
        flag(&command, "--metrics-addr")
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .is_ok()
    );
    for var in trainer
        .env
        .iter()
        .flatten()
        .filter(|e| e.name.starts_with("PETL_"))
    {
        assert!(
            TRAINER_VARIABLES.contains(&var.name.as_str()),
            "{}",
            var.name
        );
    }
    // What a rank of several needs: its identity, every rank's host in rank order on the
    // Service's trainer port, and the secret the ranks authenticate each other with.
    assert_eq!(value(trainer, "PETL_RANK"), Some("2"));
    assert_eq!(value(trainer, "PETL_WORLD_SIZE"), Some("3"));
    assert_eq!(value(trainer, "PETL_JOB"), Some("sst2"));
    let names = Names::of(&job);
    let peers: Vec<String> = (0..3).map(|r| names.peer_host(r)).collect();
    assert_eq!(value(trainer, "PETL_PEERS"), Some(peers.join(",").as_str()));
    let port = value(trainer, "PETL_TRAINER_PORT").unwrap();
    assert_eq!(port.parse::<i32>().unwrap(), TRAINER_PORT);
    let trainer_port = trainer
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("trainer"));
    assert_eq!(trainer_port.map(|p| p.container_port), Some(TRAINER_PORT));
    assert_eq!(
        value(trainer, "PETL_SNAPSHOT_TOKEN_FILE"),
        Some(token_file().as_str())
    );
    assert_eq!(
        value(trainer, "PETL_SNAPSHOT_SOCKET"),
        Some(SNAPSHOT_SOCKET)
    );
    // Rank 0 writes the artifact where the kubelet reads the termination message.
    assert_eq!(
        value(trainer, "PETL_TERMINATION_LOG"),
        trainer.termination_message_path.as_deref()
    );
    // Every path it is told of lies on a volume, never on the read-only root.
    let mounts: Vec<&str> = trainer
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    for path in [
        CONFIG_PATH,
        SNAPSHOT_SOCKET,
        &token_file(),
        SCRATCH_DIR,
        TMP_DIR,
    ] {
        assert!(
            mounts.iter().any(|m| path.starts_with(m)),
            "{path} not on a volume"
        );
    }
    let config = flag(&command, "--config").unwrap();
    assert_eq!(config, CONFIG_PATH);
}

#[test]
fn worker_pod_carries_rank_identity_and_sidecar() {
    let job = fixtures::job("sst2", 3);
    let names = Names::of(&job);
    let pod = pod(&job, &names, 1, &defaults()).unwrap();
    assert_eq!(pod.metadata.name.as_deref(), Some("sst2-worker-1"));
    assert_eq!(pod.labels()[RANK_LABEL], "1");
    assert_eq!(pod.labels()[JOB_LABEL], "sst2");
    let spec = pod.spec.unwrap();
    let env = spec.containers[0].env.clone().unwrap();
    let get = |n: &str| {
        env.iter()
            .find(|e| e.name == n)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(get("PETL_RANK").as_deref(), Some("1"));
    assert_eq!(get("PETL_WORLD_SIZE").as_deref(), Some("3"));
    assert_eq!(
        get("PETL_SNAPSHOT_SOCKET").as_deref(),
        Some(SNAPSHOT_SOCKET)
    );
    let threads = env
        .iter()
        .find(|e| e.name == "RAYON_NUM_THREADS")
        .and_then(|e| e.value_from.as_ref()?.resource_field_ref.as_ref())
        .expect("the trainer's threads follow its CPU limit");
    assert_eq!(threads.resource, "limits.cpu");
    assert_eq!(threads.container_name.as_deref(), Some(TRAINER_CONTAINER));
    assert_eq!(
        get("PETL_PEERS").unwrap(),
        "sst2-worker-0.sst2-workers.default.svc,sst2-worker-1.sst2-workers.default.svc,sst2-worker-2.sst2-workers.default.svc"
    );
    let agent = agent(&spec);
    assert_eq!(agent.name, AGENT_CONTAINER);
    assert_eq!(agent.restart_policy.as_deref(), Some("Always"));
    assert_eq!(spec.subdomain.as_deref(), Some("sst2-workers"));
}

#[test]
fn the_agent_gets_its_whole_configuration_as_flags() {
    let mut job = fixtures::job("sst2", 3);
    job.spec.snapshot.every_steps = 5;
    job.spec.snapshot.durable = Some(petl_crds::DurableSpec {
        uri: "pvc://ckpt/jobs/sst2/".into(),
        every_snapshots: 20,
        secret_ref: None,
    });
    let spec = render(&job, 2);
    let command = agent(&spec).command.clone().unwrap();
    assert_eq!(command[..2], [PROGRAM, SNAPSHOT_AGENT]);
    let expect = [
        ("--rank", "2"),
        ("--world-size", "3"),
        ("--job", "sst2"),
        (
            "--peers",
            "sst2-worker-{rank}.sst2-workers.default.svc:7070",
        ),
        ("--data-shards", "2"),
        ("--parity-shards", "1"),
        ("--listen", "0.0.0.0:7070"),
        ("--local-socket", "/run/petl/snapshot.sock"),
        ("--secret-file", "/var/run/petl/snapshot-token/token"),
        ("--metrics-addr", "0.0.0.0:9101"),
        ("--durable-dir", "/mnt/pvc/ckpt/jobs/sst2"),
        ("--durable-every", "100"),
    ];
    for (name, value) in expect {
        assert_eq!(flag(&command, name), Some(value), "{name} in {command:?}");
    }
    // The durable claim is mounted writable where the agent writes.
    let mounts = agent(&spec).volume_mounts.clone().unwrap();
    let ckpt = mounts
        .iter()
        .find(|m| m.mount_path == "/mnt/pvc/ckpt")
        .unwrap();
    assert_eq!(ckpt.read_only, Some(false));
}

#[test]
fn explicit_erasure_coding_and_file_durable_dirs_reach_the_agent() {
    let mut job = fixtures::job("sst2", 4);
    job.spec.snapshot.erasure_coding = Some(petl_crds::ErasureCoding {
        data_shards: 2,
        parity_shards: 2,
    });
    job.spec.snapshot.durable = Some(petl_crds::DurableSpec {
        uri: "file:///var/ckpt".into(),
        every_snapshots: 3,
        secret_ref: None,
    });
    let command = agent(&render(&job, 0)).command.clone().unwrap();
    assert_eq!(flag(&command, "--data-shards"), Some("2"));
    assert_eq!(flag(&command, "--parity-shards"), Some("2"));
    assert_eq!(flag(&command, "--durable-dir"), Some("/var/ckpt"));
    assert_eq!(flag(&command, "--durable-every"), Some("3"));

    // An object store is not a directory: no durable tier in the agent.
    job.spec.snapshot.durable.as_mut().unwrap().uri = "s3://bucket/ckpt".into();
    let command = agent(&render(&job, 0)).command.clone().unwrap();
    assert_eq!(flag(&command, "--durable-dir"), None);
    // One worker keeps a local copy only.
    let command = agent(&render(&fixtures::job("one", 1), 0))
        .command
        .clone()
        .unwrap();
    assert_eq!(flag(&command, "--data-shards"), Some("1"));
    assert_eq!(flag(&command, "--parity-shards"), Some("0"));
}

#[test]
fn both_containers_share_the_run_directory_and_name_their_metrics_ports() {
    let spec = render(&fixtures::job("sst2", 2), 0);
    let trainer = &spec.containers[0];
    for c in [trainer, agent(&spec)] {
        let run = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == RUN_DIR)
            .unwrap_or_else(|| panic!("{} lacks {RUN_DIR}", c.name));
        assert_eq!(run.read_only, Some(false));
    }
    let port = |c: &Container, name: &str| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    };
    assert_eq!(port(trainer, "metrics"), Some(9100));
    assert_eq!(port(agent(&spec), "agent-metrics"), Some(9101));
    assert_eq!(port(agent(&spec), "snapshot"), Some(7070));
    let command = trainer.command.clone().unwrap();
    assert_eq!(flag(&command, "--metrics-addr"), Some("0.0.0.0:9100"));
    assert_eq!(
        trainer.termination_message_path.as_deref(),
        Some("/dev/termination-log")
    );
    assert_eq!(trainer.termination_message_policy.as_deref(), Some("File"));
}

#[test]
fn a_gpu_job_gets_the_cuda_trainer_and_a_cpu_agent() {
    let mut job = fixtures::job("gpu", 2);
    job.spec.workers.image = None;
    let spec = render(&job, 0);
    let command = spec.containers[0].command.clone().unwrap();
    assert_eq!(flag(&command, "--device"), Some("cpu"));
    assert_eq!(spec.containers[0].image.as_deref(), Some("petl-worker:1"));

    let resources: ResourceRequirements = serde_json::from_value(serde_json::json!({
        "limits": { "nvidia.com/gpu": "1", "memory": "8Gi" }
    }))
    .unwrap();
    job.spec.workers.resources = Some(resources);
    let spec = render(&job, 0);
    let command = spec.containers[0].command.clone().unwrap();
    assert_eq!(flag(&command, "--device"), Some("cuda"));
    assert_eq!(
        spec.containers[0].image.as_deref(),
        Some("petl-worker-cuda:1")
    );
    assert_eq!(agent(&spec).image.as_deref(), Some("petl-worker:1"));

    // The job's own image wins for both.
    job.spec.workers.image = Some("mine:2".into());
    let spec = render(&job, 0);
    assert_eq!(spec.containers[0].image.as_deref(), Some("mine:2"));
    assert_eq!(agent(&spec).image.as_deref(), Some("mine:2"));

    // A GPU job with no CUDA image to run says which flag is missing.
    job.spec.workers.image = None;
    let no_cuda = WorkerDefaults {
        cuda_image: None,
        ..defaults()
    };
    let err = pod(&job, &Names::of(&job), 0, &no_cuda)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--trainer-cuda-image"), "{err}");
}

#[test]
fn the_trainer_restarts_in_place_except_on_success_and_permanent_exits() {
    let spec = render(&fixtures::job("sst2", 2), 0);
    let trainer = &spec.containers[0];
    assert_eq!(trainer.restart_policy.as_deref(), Some("Never"));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let rules = trainer.restart_policy_rules.clone().unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].action, "Restart");
    let codes = rules[0].exit_codes.clone().unwrap();
    assert_eq!(codes.operator, "NotIn");
    assert_eq!(codes.values.unwrap(), vec![0, 64, 65, 66, 70, 78]);

    // A user's FailJob rule keeps its exit codes from restarting in place too.
    let mut policy = RunPolicy {
        failure_policy: Some(petl_crds::FailurePolicy {
            rules: vec![petl_crds::FailurePolicyRule {
                action: FailureAction::FailJob,
                on_exit_codes: Some(vec![1, 2]),
                on_pod_conditions: None,
            }],
        }),
        ..RunPolicy::default()
    };
    let codes = restart_in_place(&policy).unwrap()[0]
        .exit_codes
        .clone()
        .unwrap();
    assert_eq!(codes.values.unwrap(), vec![0, 1, 2, 64, 65, 66, 70, 78]);

    // Every exit permanent: nothing restarts in place.
    policy.failure_policy.as_mut().unwrap().rules[0].on_exit_codes = Some((1..=255).collect());
    assert_eq!(restart_in_place(&policy), None);
    // Almost every exit permanent: the shorter list of codes that do restart.
    policy.failure_policy.as_mut().unwrap().rules[0].on_exit_codes =
        Some((1..=255).filter(|c| *c != 75).collect());
    let codes = restart_in_place(&policy).unwrap()[0]
        .exit_codes
        .clone()
        .unwrap();
    assert_eq!(
        (codes.operator.as_str(), codes.values.unwrap()),
        ("In", vec![75])
    );
}

#[test]
fn missing_image_names_the_field_and_the_flag() {
    let mut job = fixtures::job("sst2", 1);
    job.spec.workers.image = None;
    let none = WorkerDefaults::default();
    let err = pod(&job, &Names::of(&job), 0, &none)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spec.workers.image") && err.contains("--trainer-image"),
        "{err}"
    );
    assert!(pod(&job, &Names::of(&job), 0, &defaults()).is_ok());
}

#[test]
fn pvc_uris_become_mounts_writable_only_for_sinks() {
    let mut job = fixtures::job("sst2", 1);
    job.spec.model.uri = "pvc://models/minilm".into();
    job.spec.output.uri = "pvc://out/adapters".into();
    let (volumes, mounts) = pvc_volumes(&job);
    assert_eq!(volumes.len(), 2);
    let by_path = |p: &str| mounts.iter().find(|m| m.mount_path == p).unwrap().read_only;
    assert_eq!(by_path("/mnt/pvc/models"), Some(true));
    assert_eq!(by_path("/mnt/pvc/out"), Some(false));
}

#[test]
fn overlong_job_names_are_refused_with_the_limit() {
    let job = fixtures::job(&"a".repeat(60), 1);
    let err = pod(&job, &Names::of(&job), 0, &defaults())
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 52"), "{err}");
}
