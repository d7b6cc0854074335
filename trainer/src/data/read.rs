//! Reads raw rows (text, optional label, line number) from CSV, TSV, JSONL, Orange `.tab` and
//! plain-text files, decompressing `.bz2` and `.gz` by extension.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use super::{Format, RawRow};
use crate::{Error, Result};

/// The fields a reader extracts from each row.
pub struct Fields<'a> {
    pub text: &'a str,
    /// `None` for causal-LM text, which has no label.
    pub label: Option<&'a str>,
}

/// Reads every row of `path`; the format comes from `format` or, if `None`, from the extension.
pub fn read_rows(path: &Path, format: Option<Format>, fields: &Fields) -> Result<Vec<RawRow>> {
    let format = match format {
        Some(format) => format,
        None => format_from_extension(path)?,
    };
    let reader = open_decompressed(path)?;
    let rows = match format {
        Format::Csv => read_delimited(path, reader, b',', true, 0, fields)?,
        Format::Tsv => read_delimited(path, reader, b'\t', true, 0, fields)?,
        // Orange's .tab: names, then a type row and a flag row; values are never quoted.
        Format::Tab => read_delimited(path, reader, b'\t', false, 2, fields)?,
        Format::Jsonl => read_jsonl(path, reader, fields)?,
        Format::Text => read_text_lines(path, reader)?,
    };
    if rows.is_empty() {
        return Err(Error::Data {
            file: path.display().to_string(),
            line: None,
            field: "(file)".into(),
            message: "no data rows: the file is empty or holds only a header".into(),
        });
    }
    Ok(rows)
}

/// Picks the format from the name, looking through a `.bz2`/`.gz` suffix.
pub fn format_from_extension(path: &Path) -> Result<Format> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let name = name
        .strip_suffix(".bz2")
        .or_else(|| name.strip_suffix(".gz"))
        .unwrap_or(&name);
    let extension = name.rsplit_once('.').map(|(_, ext)| ext).unwrap_or("");
    match extension {
        "csv" => Ok(Format::Csv),
        "tsv" => Ok(Format::Tsv),
        "tab" => Ok(Format::Tab),
        "jsonl" | "ndjson" | "json" => Ok(Format::Jsonl),
        "txt" | "text" => Ok(Format::Text),
        _ => Err(Error::Data {
            file: path.display().to_string(),
            line: None,
            field: "dataset.format".into(),
            message: format!(
                "cannot tell the format from the extension '.{extension}'; set dataset.format to csv, tsv, jsonl, tab or text"
            ),
        }),
    }
}

pub(super) fn open_decompressed(path: &Path) -> Result<Box<dyn Read>> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let name = path.to_string_lossy().to_lowercase();
    Ok(if name.ends_with(".bz2") {
        Box::new(bzip2::read::MultiBzDecoder::new(BufReader::new(file)))
    } else if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(file)
    })
}

fn data_error(path: &Path, line: Option<u64>, field: &str, message: impl Into<String>) -> Error {
    Error::Data {
        file: path.display().to_string(),
        line,
        field: field.to_string(),
        message: message.into(),
    }
}

/// Maps a read or decode failure to an error naming the file and, where known, the line.
fn csv_error(path: &Path, error: csv::Error) -> Error {
    let line = error.position().map(|p| p.line());
    let message = match error.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!(
            "malformed row: {len} fields where the header has {expected_len}; check quoting and delimiters"
        ),
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8; re-encode the file as UTF-8".to_string(),
        csv::ErrorKind::Io(e) => format!("read failed: {e} (is the compressed file truncated?)"),
        _ => error.to_string(),
    };
    data_error(path, line, "(row)", message)
}

fn read_delimited(
    path: &Path,
    reader: Box<dyn Read>,
    delimiter: u8,
    quoting: bool,
    extra_header_rows: usize,
    fields: &Fields,
) -> Result<Vec<RawRow>> {
    let mut csv = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .quoting(quoting)
        .has_headers(true)
        .from_reader(reader);
    let headers = csv.headers().map_err(|e| csv_error(path, e))?.clone();
    if headers.iter().all(str::is_empty) {
        return Err(data_error(
            path,
            None,
            "(file)",
            "no header row: the file is empty",
        ));
    }
    let column = |field: &str| {
        headers.iter().position(|h| h == field).ok_or_else(|| {
            let names: Vec<&str> = headers.iter().collect();
            data_error(
                path,
                Some(1),
                field,
                format!("no column named '{field}'; the header has {names:?}"),
            )
        })
    };
    let text_column = column(fields.text)?;
    let label_column = fields.label.map(column).transpose()?;
    let mut rows = Vec::new();
    for (index, record) in csv.records().enumerate() {
        let record = record.map_err(|e| csv_error(path, e))?;
        if index < extra_header_rows {
            continue;
        }
        let line = record.position().map_or(index as u64 + 2, |p| p.line());
        let text = record.get(text_column).unwrap_or_default().to_string();
        let label = label_column.map(|c| record.get(c).unwrap_or_default().trim().to_string());
        rows.push(RawRow { line, text, label });
    }
    Ok(rows)
}

fn read_jsonl(path: &Path, reader: Box<dyn Read>, fields: &Fields) -> Result<Vec<RawRow>> {
    let mut rows = Vec::new();
    for (index, line) in BufReader::new(reader).lines().enumerate() {
        let number = index as u64 + 1;
        let line =
            line.map_err(|e| data_error(path, Some(number), "(row)", format!("read failed: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| data_error(path, Some(number), "(row)", format!("malformed JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| {
            data_error(
                path,
                Some(number),
                "(row)",
                "each line must be a JSON object",
            )
        })?;
        let field_text = |field: &str| -> Result<String> {
            match object.get(field) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(serde_json::Value::Bool(b)) => Ok(b.to_string()),
                Some(other) => Err(data_error(
                    path,
                    Some(number),
                    field,
                    format!("expected a string, found {other}"),
                )),
                None => {
                    let keys: Vec<&String> = object.keys().collect();
                    Err(data_error(
                        path,
                        Some(number),
                        field,
                        format!("missing field '{field}'; the object has {keys:?}"),
                    ))
                }
            }
        };
        let text = field_text(fields.text)?;
        let label = fields.label.map(field_text).transpose()?;
        rows.push(RawRow {
            line: number,
            text,
            label,
        });
    }
    Ok(rows)
}

fn read_text_lines(path: &Path, reader: Box<dyn Read>) -> Result<Vec<RawRow>> {
    let mut rows = Vec::new();
    for (index, line) in BufReader::new(reader).lines().enumerate() {
        let number = index as u64 + 1;
        let line = line.map_err(|e| {
            data_error(
                path,
                Some(number),
                "(line)",
                format!("read failed (not UTF-8?): {e}"),
            )
        })?;
        if !line.trim().is_empty() {
            rows.push(RawRow {
                line: number,
                text: line,
                label: None,
            });
        }
    }
    Ok(rows)
}
