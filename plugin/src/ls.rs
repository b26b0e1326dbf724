//! `kubectl lockstep ls`: the jobs with what a person watching them asks first.

use kube::api::ListParams;
use lockstep_api::ParallelJob;

use crate::fmt::{self, table};
use crate::{Ctx, Output};

/// Lists the jobs of the namespace (or of every namespace).
pub async fn ls(ctx: &Ctx, all: bool, output: Option<Output>) -> anyhow::Result<i32> {
    let api: kube::Api<ParallelJob> = if all {
        kube::Api::all(ctx.client.clone())
    } else {
        crate::jobs(ctx)
    };
    let mut list = api.list(&ListParams::default()).await?.items;
    list.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    match output {
        Some(Output::Json) | Some(Output::Yaml) => {
            let v = serde_json::json!({
                "apiVersion": "v1",
                "kind": "List",
                "items": list,
            });
            if output == Some(Output::Json) {
                ctx.out.line(serde_json::to_string_pretty(&v)?);
            } else {
                ctx.out
                    .line(serde_saphyr::to_string(&v)?.trim_end().to_string());
            }
            return Ok(0);
        }
        _ => {}
    }
    if list.is_empty() {
        let scope = if all {
            "any namespace".to_string()
        } else {
            format!("namespace {}", ctx.namespace)
        };
        ctx.out.line(format!("No ParallelJobs in {scope}."));
        return Ok(0);
    }
    let wide = output == Some(Output::Wide);
    let mut rows = vec![header(all, wide)];
    rows.extend(list.iter().map(|j| row(j, all, wide)));
    for l in table(&rows) {
        ctx.out.line(l);
    }
    Ok(0)
}

fn header(all: bool, wide: bool) -> Vec<String> {
    let mut h: Vec<&str> = Vec::new();
    if all {
        h.push("NAMESPACE");
    }
    h.extend([
        "NAME", "PHASE", "READY", "STEP", "LOSS", "RESTARTS", "QUEUE", "WAIT", "POLICY", "AGE",
    ]);
    if wide {
        h.extend(["ADMISSION", "SAMPLES/S", "ETA", "WORLD", "NODES"]);
    }
    h.into_iter().map(String::from).collect()
}

/// One job's row.
pub fn row(j: &ParallelJob, all: bool, wide: bool) -> Vec<String> {
    let s = j.status.clone().unwrap_or_default();
    let phase = fmt::phase(j);
    let waiting = matches!(phase, "Pending" | "Queued");
    let admission = s.admission.clone().unwrap_or_default();
    // How long the gang waited for admission: recorded once admitted, counted while it waits.
    let wait = if waiting {
        let since = fmt::admitted(j).map(|c| c.last_transition_time.0).or(j
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0));
        since.map_or("-".into(), |t| fmt::duration(fmt::since(t)))
    } else {
        admission.wait_seconds.map_or("-".into(), fmt::duration)
    };
    let queue = match admission.queue_position {
        Some(p) if waiting => format!("#{p}"),
        _ => "-".into(),
    };
    let loss = fmt::progress(j).and_then(|p| p.loss);
    let mut r = Vec::new();
    if all {
        r.push(j.metadata.namespace.clone().unwrap_or_default());
    }
    r.extend([
        j.metadata.name.clone().unwrap_or_default(),
        phase.to_string(),
        s.ready.clone().unwrap_or_else(|| "-".into()),
        fmt::step(j),
        fmt::num(loss),
        s.attempt.to_string(),
        queue,
        wait,
        format!("{:?}", j.spec.scheduling.gang_policy),
        fmt::age(j),
    ]);
    if wide {
        let world =
            j.spec.parallelism.data_parallel.max(1) * j.spec.parallelism.pipeline_stages.max(1);
        let nodes = if admission.nodes.is_empty() {
            "-".to_string()
        } else {
            let mut n = admission
                .nodes
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(",");
            if admission.nodes.len() > 3 {
                n.push_str(&format!(",+{}", admission.nodes.len() - 3));
            }
            n
        };
        r.extend([
            fmt::admitted(j).map_or("-".into(), |c| c.reason.clone()),
            fmt::num(fmt::progress(j).and_then(|p| p.samples_per_second)),
            fmt::eta(j).map_or("-".into(), fmt::duration),
            world.to_string(),
            nodes,
        ]);
    }
    r
}
