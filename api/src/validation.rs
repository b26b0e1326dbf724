//! Client-side validation of a ParallelJob with the same rules the API server applies, driven by
//! the generated CRD itself so that nothing is written twice: the schema's defaults are applied,
//! then its bounds (minimum, maximum, lengths, required fields, enum values) and its CEL rules
//! (`x-kubernetes-validations`, evaluated with kube-cel) are checked. `lockstep-worker local` uses
//! it, because there is no API server to reject a broken manifest there; unit tests use it to check
//! every rule without a server. The real API server remains the authority (the e2e tests check
//! that it agrees).

use std::sync::OnceLock;

use kube::core::cel::Validator;
use serde_json::Value;

use crate::spec::ParallelJob;
use crate::{Error, Result};

/// One violated rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field, for example `spec.parallelism.dataParallel`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let crd = crate::crd::crd();
        let v = &crd.spec.versions[0];
        serde_json::to_value(
            v.schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("the generated CRD has a schema"),
        )
        .expect("a schema serializes")
    })
}

/// Applies the CRD's defaults to a manifest, as the API server does on create.
pub fn apply_defaults(manifest: &Value) -> Value {
    kube::core::cel::apply_defaults(schema(), manifest)
}

/// Validates a manifest (as JSON) against the CRD: defaults, schema bounds, CEL rules, then the
/// typed parse. `old` is the stored object for an update, so that transition rules (immutable
/// fields) are checked too. Returns the defaulted, typed job, or every violation found.
pub fn validate(
    manifest: &Value,
    old: Option<&Value>,
) -> std::result::Result<ParallelJob, Vec<FieldError>> {
    let defaulted = apply_defaults(manifest);
    let old = old.map(apply_defaults);
    let mut errors = Vec::new();
    check_schema(schema(), &defaulted, "", &mut errors);
    if errors.is_empty() {
        // CEL rules assume a well-typed object (as on the server, where the schema runs first).
        if let Err(cel) = Validator::new().validate(schema(), &defaulted, old.as_ref()) {
            errors.extend(cel.into_vec().into_iter().map(|e| FieldError {
                field: e.field_path.trim_start_matches('.').to_string(),
                message: e.message,
            }));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    crate::manifest::job_from_value(&defaulted).map_err(|e| vec![field_error(e)])
}

/// Parses and validates a YAML manifest, joining every violation into one error.
pub fn validate_yaml(yaml: &str) -> Result<ParallelJob> {
    let value = crate::manifest::yaml_to_value(yaml)?;
    // Type errors and unknown fields first: they make bounds and rules meaningless.
    crate::manifest::job_from_value(&value)?;
    validate(&value, None).map_err(Error::Invalid)
}

fn field_error(e: Error) -> FieldError {
    match e {
        Error::Field { path, message } => FieldError {
            field: path,
            message,
        },
        other => FieldError {
            field: "<root>".into(),
            message: other.to_string(),
        },
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Checks the structural bounds of `schema` on `value`: required properties, numeric bounds,
/// list and string lengths, enum values and basic types. CEL rules are left to kube-cel.
fn check_schema(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    let here = if path.is_empty() { "<root>" } else { path };
    let mut err = |message: String| {
        errors.push(FieldError {
            field: here.to_string(),
            message,
        })
    };
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) && schema.get("type").is_some() {
            err("must not be null".into());
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            err(format!("must be an integer or a string, found {value}"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let type_ok = match ty {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        _ => true,
    };
    if !type_ok {
        err(format!(
            "must be of type {}, found {value}",
            ty.unwrap_or("?")
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        err(format!(
            "unsupported value {value}: supported values are {}",
            list.join(", ")
        ));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
            let exclusive = schema.get("exclusiveMinimum") == Some(&Value::Bool(true));
            if n < min || (exclusive && n == min) {
                err(format!(
                    "must be {} {min}, found {value}",
                    if exclusive { ">" } else { ">=" }
                ));
            }
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
            let exclusive = schema.get("exclusiveMaximum") == Some(&Value::Bool(true));
            if n > max || (exclusive && n == max) {
                err(format!(
                    "must be {} {max}, found {value}",
                    if exclusive { "<" } else { "<=" }
                ));
            }
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            err(format!("must have at least {min} characters"));
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            err(format!("must have at most {max} characters, found {len}"));
        }
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as u64;
        if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
            && len < min
        {
            err(format!("must have at least {min} items"));
        }
        if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
            && len > max
        {
            err(format!("must have at most {max} items, found {len}"));
        }
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check_schema(item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
        return;
    }
    if let Some(obj) = value.as_object() {
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for key in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(key) {
                    errors.push(FieldError {
                        field: join(path, key),
                        message: "Required value".into(),
                    });
                }
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties").filter(|a| a.is_object());
        for (key, v) in obj {
            if let Some(s) = props.and_then(|p| p.get(key)).or(additional) {
                check_schema(s, v, &join(path, key), errors);
            }
        }
    }
}
