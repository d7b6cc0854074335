//! The API's method table, the trainer's registry and docs/methods.md name the same methods:
//! every method `spec.method.type` accepts is built by the trainer under its own name and has a
//! row in the docs table.

use std::path::Path;

use candle_core::{DType, Device};
use petl_crds::{MethodSpec, MethodType};
use petl_trainer::methods::{self, REGISTERED};
use petl_trainer::models::bert::{Bert, Config};

fn tiny_bert() -> Bert {
    let config = Config::with_shape(50, 32, 2, 4, 64, 16);
    Bert::random(config, 5, DType::F32, &Device::Cpu).unwrap()
}

/// The method names in the first column of docs/methods.md's first table.
fn documented_methods() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/methods.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .skip_while(|l| !l.starts_with("| method |"))
        .skip(2) // the header and its separator
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cell = row.split('|').nth(1).unwrap_or_default().trim();
            cell.trim_matches('`').to_string()
        })
        .collect()
}

#[test]
fn every_method_has_one_row_in_docs_methods_md() {
    let documented = documented_methods();
    for &m in MethodType::ALL {
        let rows = documented.iter().filter(|d| *d == m.as_str()).count();
        assert_eq!(
            rows, 1,
            "docs/methods.md has {rows} rows for method {m}; its table needs exactly one"
        );
    }
    for name in &documented {
        assert!(
            name.parse::<MethodType>().is_ok(),
            "docs/methods.md has a row for {name:?}, which is not a method"
        );
    }
}

#[test]
fn the_registry_builds_every_api_method_under_its_name() {
    assert_eq!(REGISTERED.len(), MethodType::ALL.len());
    for &m in MethodType::ALL {
        assert!(REGISTERED.contains(&m), "{m} is not registered");
        let config = MethodSpec::of_type(m).config();
        let method = methods::build(&config, Box::new(tiny_bert()), 2, 1)
            .unwrap_or_else(|e| panic!("{m} with its defaults: {e}"));
        assert_eq!(method.name(), m.as_str());
        assert!(method.trainable_parameters() > 0, "{m}");
    }
}
