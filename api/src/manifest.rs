//! Reading a `ParallelJob` manifest from YAML (what `lockstep-worker local` and the tests do)
//! with errors that name the offending field.
//!
//! Parsing is strict where the API server would be: unknown fields are errors (kubectl's default
//! strict field validation rejects them too), and so are a wrong `apiVersion` or `kind`.

use kube::Resource;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::spec::ParallelJob;
use crate::{Error, Result};

/// Parses one YAML document into a `ParallelJob`, checking `apiVersion`, `kind`, types, required
/// fields, enum values and unknown fields. It does not apply defaults or the schema's bounds and
/// CEL rules: see [`crate::validation::validate`] for those.
pub fn parse_job(yaml: &str) -> Result<ParallelJob> {
    let value = yaml_to_value(yaml)?;
    job_from_value(&value)
}

/// Parses YAML into a JSON value (the form the schema and CEL rules are checked on).
pub fn yaml_to_value(yaml: &str) -> Result<Value> {
    serde_saphyr::from_str::<Value>(yaml).map_err(|e| Error::Yaml(e.to_string()))
}

/// Converts a JSON value into a `ParallelJob` with the same checks as [`parse_job`].
pub fn job_from_value(value: &Value) -> Result<ParallelJob> {
    let want_api = ParallelJob::api_version(&());
    let want_kind = ParallelJob::kind(&());
    let api = value.get("apiVersion").and_then(Value::as_str);
    if api != Some(want_api.as_ref()) {
        return Err(Error::Field {
            path: "apiVersion".into(),
            message: format!("expected {want_api:?}, found {}", shown(api)),
        });
    }
    let kind = value.get("kind").and_then(Value::as_str);
    if kind != Some(want_kind.as_ref()) {
        return Err(Error::Field {
            path: "kind".into(),
            message: format!("expected {want_kind:?}, found {}", shown(kind)),
        });
    }
    strict_from_value(value)
}

fn shown(v: Option<&str>) -> String {
    v.map_or_else(|| "nothing".into(), |s| format!("{s:?}"))
}

/// Deserializes `value` into `T`, naming the path of the first type error or unknown field.
pub(crate) fn strict_from_value<T: DeserializeOwned>(value: &Value) -> Result<T> {
    let mut unknown: Vec<String> = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let parsed: std::result::Result<T, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(value, &mut record));
    let parsed = parsed.map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // serde reports a missing field at its parent; name the field itself, as the API
        // server does.
        match missing_field(&message) {
            Some(field) if path == "." => Error::Field {
                path: field.into(),
                message: "Required value".into(),
            },
            Some(field) => Error::Field {
                path: format!("{path}.{field}"),
                message: "Required value".into(),
            },
            None => Error::Field {
                path: display_path(&path),
                message,
            },
        }
    })?;
    // apiVersion and kind are checked by the caller (kube's root type skips them); `status` is the
    // operator's: a manifest may carry one (kubectl get -o yaml) and the API server ignores it on
    // create, so it is not an error here either.
    let expected =
        |p: &str| p == "apiVersion" || p == "kind" || p == "status" || p.starts_with("status.");
    if let Some(path) = unknown.into_iter().find(|p| !expected(p)) {
        return Err(Error::Field {
            path: display_path(&path),
            message: "unknown field".into(),
        });
    }
    Ok(parsed)
}

fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// `serde_path_to_error` writes `.` for the root; spell it as kubectl does.
fn display_path(p: &str) -> String {
    if p == "." || p.is_empty() {
        "<root>".into()
    } else {
        p.to_string()
    }
}
