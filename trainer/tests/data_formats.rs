//! Reading datasets: every format, compression, labels, splits, and the errors bad files get.

use std::io::Write;
use std::path::{Path, PathBuf};

use petl_trainer::data::{DataConfig, Format, Task, UnknownLabels, Validation, labelled_split};

fn config(path: &Path) -> DataConfig {
    DataConfig {
        path: path.to_path_buf(),
        format: None,
        task: Task::SequenceClassification,
        text_field: "text".into(),
        label_field: "label".into(),
        labels: vec!["neg".into(), "pos".into()],
        unknown_labels: UnknownLabels::Error,
        validation: Validation::Fraction(0.0),
        max_sequence_length: 64,
        max_samples: None,
    }
}

fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
    let path = dir.join(name);
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(body).unwrap();
    path
}

fn sorted(rows: Vec<(String, u32)>) -> Vec<(String, u32)> {
    let mut rows = rows;
    rows.sort();
    rows
}

fn expected() -> Vec<(String, u32)> {
    vec![("bad film".into(), 0), ("good, \"fun\" film".into(), 1)]
}

#[test]
fn reads_the_same_rows_from_csv_tsv_jsonl_and_tab() {
    let dir = tempfile::tempdir().unwrap();
    let csv = write(
        dir.path(),
        "a.csv",
        b"id,label,text\n1,pos,\"good, \"\"fun\"\" film\"\n2,neg,bad film\n",
    );
    let tsv = write(
        dir.path(),
        "a.tsv",
        b"label\ttext\npos\t\"good, \"\"fun\"\" film\"\nneg\tbad film\n",
    );
    let jsonl = write(
        dir.path(),
        "a.jsonl",
        b"{\"text\": \"good, \\\"fun\\\" film\", \"label\": \"pos\"}\n\n{\"text\": \"bad film\", \"label\": \"neg\"}\n",
    );
    let tab = write(
        dir.path(),
        "a.tab",
        b"label\ttext\nd\tstring\nclass\t\npos\tgood, \"fun\" film\nneg\tbad film\n",
    );
    for path in [csv, tsv, jsonl, tab] {
        let (train, validation) = labelled_split(&config(&path)).unwrap();
        assert_eq!(sorted(train), expected(), "{}", path.display());
        assert!(validation.is_empty());
    }
}

#[test]
fn decompresses_bz2_and_gz_by_extension() {
    let dir = tempfile::tempdir().unwrap();
    let body = b"label,text\npos,\"good, \"\"fun\"\" film\"\nneg,bad film\n";
    let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
    bz.write_all(body).unwrap();
    let bz2 = write(dir.path(), "a.csv.bz2", &bz.finish().unwrap());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body).unwrap();
    let gz = write(dir.path(), "a.csv.gz", &gz.finish().unwrap());
    for path in [bz2, gz] {
        assert_eq!(
            sorted(labelled_split(&config(&path)).unwrap().0),
            expected()
        );
    }
}

#[test]
fn unknown_label_names_file_line_field_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "a.csv",
        b"label,text\npos,fine\n\"neg\",\"two\nlines\"\nplot,a story\n",
    );
    let err = labelled_split(&config(&path)).unwrap_err().to_string();
    assert!(err.contains("a.csv:5"), "{err}");
    assert!(err.contains("label") && err.contains("'plot'"), "{err}");
    assert!(err.contains("unknownLabels: skip"), "{err}");
}

#[test]
fn unknown_labels_skip_drops_only_those_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.csv", b"label,text\npos,a\nplot,b\nneg,c\n");
    let mut config = config(&path);
    config.unknown_labels = UnknownLabels::Skip;
    let rows = sorted(labelled_split(&config).unwrap().0);
    assert_eq!(rows, vec![("a".into(), 1), ("c".into(), 0)]);
}

#[test]
fn malformed_row_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.csv", b"label,text\npos,a\nneg,b,extra\n");
    let err = labelled_split(&config(&path)).unwrap_err().to_string();
    assert!(err.contains("a.csv:3") && err.contains("3 fields"), "{err}");
    let jsonl = write(
        dir.path(),
        "b.jsonl",
        b"{\"text\":\"a\",\"label\":\"pos\"}\n{\"text\": oops}\n",
    );
    let err = labelled_split(&config(&jsonl)).unwrap_err().to_string();
    assert!(
        err.contains("b.jsonl:2") && err.contains("malformed JSON"),
        "{err}"
    );
}

#[test]
fn missing_field_names_the_field_and_the_columns_there_are() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.csv", b"category,review\npos,a\n");
    let err = labelled_split(&config(&path)).unwrap_err().to_string();
    assert!(
        err.contains("a.csv:1") && err.contains("no column named 'text'"),
        "{err}"
    );
    assert!(err.contains("category") && err.contains("review"), "{err}");
    let jsonl = write(dir.path(), "b.jsonl", b"{\"text\":\"a\"}\n");
    let err = labelled_split(&config(&jsonl)).unwrap_err().to_string();
    assert!(err.contains("b.jsonl:1: label: missing field"), "{err}");
}

#[test]
fn empty_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("empty.csv", &b""[..]),
        ("header.csv", b"label,text\n"),
        ("empty.jsonl", b"\n\n"),
        ("empty.txt", b""),
    ] {
        let path = write(dir.path(), name, body);
        let mut config = config(&path);
        if name.ends_with(".txt") {
            config.task = Task::CausalLm;
        }
        let err = labelled_split(&config).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
        assert!(
            err.contains("empty") || err.contains("no data rows"),
            "{err}"
        );
    }
}

#[test]
fn unknown_extension_asks_for_dataset_format() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.parquet", b"x");
    let err = labelled_split(&config(&path)).unwrap_err().to_string();
    assert!(err.contains("dataset.format"), "{err}");
    let mut explicit = config(&path);
    explicit.format = Some(Format::Csv);
    let err = labelled_split(&explicit).unwrap_err().to_string();
    assert!(err.contains("no column named 'text'"), "{err}");
}

#[test]
fn bad_settings_name_the_job_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "a.csv", b"label,text\npos,a\n");
    let mut one_label = config(&path);
    one_label.labels = vec!["pos".into()];
    let err = labelled_split(&one_label).unwrap_err().to_string();
    assert!(err.contains("dataset.labels"), "{err}");
    let mut fraction = config(&path);
    fraction.validation = Validation::Fraction(1.5);
    let err = labelled_split(&fraction).unwrap_err().to_string();
    assert!(err.contains("dataset.validationFraction"), "{err}");
}

#[test]
fn validation_fraction_split_is_deterministic_and_disjoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut body = String::from("label,text\n");
    for i in 0..200 {
        body.push_str(&format!(
            "{},row {i}\n",
            if i % 3 == 0 { "neg" } else { "pos" }
        ));
    }
    let path = write(dir.path(), "a.csv", body.as_bytes());
    let mut config = config(&path);
    config.validation = Validation::Fraction(0.1);
    let (train, validation) = labelled_split(&config).unwrap();
    assert_eq!((train.len(), validation.len()), (180, 20));
    let again = labelled_split(&config).unwrap();
    assert_eq!((train.clone(), validation.clone()), again);
    assert!(validation.iter().all(|v| !train.contains(v)));
    config.max_samples = Some(50);
    let (small, small_validation) = labelled_split(&config).unwrap();
    assert_eq!((small.len(), small_validation.len()), (50, 20));
}

#[test]
fn separate_validation_file_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let train = write(
        dir.path(),
        "train.csv",
        b"label,text\npos,a\nneg,b\npos,c\n",
    );
    let validation = write(
        dir.path(),
        "val.jsonl",
        b"{\"text\":\"d\",\"label\":\"neg\"}\n",
    );
    let mut config = config(&train);
    config.validation = Validation::File(validation);
    config.format = None;
    // The validation file has its own extension; the format is picked per file.
    let (train, validation) = labelled_split(&config).unwrap();
    assert_eq!(train.len(), 3);
    assert_eq!(validation, vec![("d".to_string(), 0)]);
}

#[test]
fn causal_lm_reads_one_document_per_line_or_a_text_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = write(dir.path(), "a.txt", b"first document\n\nsecond one\n");
    let mut config = config(&text);
    config.task = Task::CausalLm;
    let rows = sorted(labelled_split(&config).unwrap().0);
    assert_eq!(
        rows,
        vec![("first document".into(), 0), ("second one".into(), 0)]
    );
    let jsonl = write(dir.path(), "a.jsonl", b"{\"text\":\"only text\"}\n");
    config.path = jsonl;
    assert_eq!(
        labelled_split(&config).unwrap().0,
        vec![("only text".into(), 0)]
    );
}

#[test]
fn numeric_labels_are_class_indices() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "a.jsonl",
        b"{\"text\":\"a\",\"label\":1}\n{\"text\":\"b\",\"label\":\"neg\"}\n",
    );
    let rows = sorted(labelled_split(&config(&path)).unwrap().0);
    assert_eq!(rows, vec![("a".into(), 1), ("b".into(), 0)]);
    let out_of_range = write(dir.path(), "b.jsonl", b"{\"text\":\"a\",\"label\":2}\n");
    let err = labelled_split(&config(&out_of_range))
        .unwrap_err()
        .to_string();
    assert!(err.contains("b.jsonl:1: label: label '2'"), "{err}");
}
