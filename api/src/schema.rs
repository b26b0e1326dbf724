//! Hand-tuned parts of the generated OpenAPI schema that derive attributes cannot express: the
//! embedded pod template gets bounds on its container and env lists (so that CEL cost estimates
//! stay within the API server's budget) and a rule that refuses env names the operator owns.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use schemars::{Schema, SchemaGenerator};
use serde_json::{Value, json};

use crate::contract::env;

/// Most containers a worker pod template may have.
pub const MAX_CONTAINERS: u64 = 32;
/// Most env entries a container of the template may have.
pub const MAX_ENV: u64 = 512;
/// Longest env name allowed in the template.
pub const MAX_ENV_NAME: u64 = 256;

/// The CEL rule, evaluated on each env entry of each template container, that refuses the names
/// the operator sets (built from [`env::RESERVED_PREFIXES`] and [`env::RESERVED_NAMES`]).
pub fn reserved_env_rule() -> String {
    let prefixes = env::RESERVED_PREFIXES
        .iter()
        .map(|p| format!("self.name.startsWith('{p}')"));
    let names = env::RESERVED_NAMES
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let any = prefixes
        .chain(std::iter::once(format!("self.name in [{names}]")))
        .collect::<Vec<_>>()
        .join(" || ");
    format!("!({any})")
}

fn reserved_env_summary() -> String {
    let mut all: Vec<String> = env::RESERVED_PREFIXES
        .iter()
        .map(|p| format!("{p}*"))
        .collect();
    all.extend(env::RESERVED_NAMES.iter().map(|n| n.to_string()));
    all.join(", ")
}

/// Schema of `spec.template`: the upstream PodTemplateSpec with bounded lists and the reserved
/// env rule on every container's env entries.
pub(crate) fn pod_template(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<PodTemplateSpec>();
    let containers = schema
        .as_object_mut()
        .and_then(|o| o.get_mut("properties"))
        .and_then(|p| p.get_mut("spec"))
        .and_then(|s| s.get_mut("properties"))
        .and_then(|p| p.get_mut("containers"));
    let Some(containers) = containers else {
        // Subschemas are inlined for CRDs; a generator that references them instead gets the
        // upstream schema unchanged (used only outside CRD generation).
        return schema;
    };
    containers["maxItems"] = json!(MAX_CONTAINERS);
    let env_list = &mut containers["items"]["properties"]["env"];
    env_list["maxItems"] = json!(MAX_ENV);
    let item = &mut env_list["items"];
    item["properties"]["name"]["maxLength"] = json!(MAX_ENV_NAME);
    let message = format!(
        "spec.template: the operator sets {} on the worker; remove it from the template's env",
        reserved_env_summary()
    );
    let rules = json!([{
        "rule": reserved_env_rule(),
        "messageExpression": format!(
            "'spec.template: env ' + self.name + ' is set by the operator (reserved: {}); remove it from the template'",
            reserved_env_summary()
        ),
        "message": message,
        "fieldPath": ".name",
        "reason": "FieldValueForbidden",
    }]);
    if let Value::Object(o) = item {
        o.insert("x-kubernetes-validations".into(), rules);
    }
    schema
}
