//! `kubectl lockstep top NAME`: per rank, what its worker's `/metrics` says (step, mean step
//! time, throughput, GPU utilization and memory, all-reduce bus bandwidth), read through the API
//! server's pod proxy, so that no port-forward and no Prometheus are needed.

use std::collections::HashMap;

use crate::{Ctx, fmt};

/// Samples of a Prometheus text exposition: metric name to the values of its series.
pub fn parse(text: &str) -> HashMap<String, Vec<f64>> {
    let mut m: HashMap<String, Vec<f64>> = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        // `name{labels} value [timestamp]` or `name value [timestamp]`.
        let (name, rest) = match line.find('{') {
            Some(i) => {
                let close = line[i..].find('}').map_or(line.len(), |j| i + j + 1);
                (&line[..i], &line[close..])
            }
            None => line.split_once(' ').unwrap_or((line, "")),
        };
        if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
            m.entry(name.trim().to_string()).or_default().push(v);
        }
    }
    m
}

fn first(m: &HashMap<String, Vec<f64>>, k: &str) -> Option<f64> {
    m.get(k).and_then(|v| v.first().copied())
}

/// Prints one row per rank of the current attempt.
pub async fn top(ctx: &Ctx, name: &str) -> anyhow::Result<i32> {
    let job = crate::get_job(ctx, name).await?;
    let attempt = job.status.as_ref().map_or(0, |s| s.attempt);
    let port = job.spec.monitoring.metrics_port;
    let pods = crate::logs::pods_of(ctx, name, Some(attempt)).await?;
    if pods.is_empty() {
        anyhow::bail!(
            "{name} has no pods (phase {}): kubectl lockstep why {name}",
            fmt::phase(&job)
        );
    }
    let mut rows = vec![
        [
            "RANK",
            "POD",
            "NODE",
            "STEP",
            "STEP-TIME",
            "TOKENS/S",
            "SAMPLES/S",
            "GPU",
            "GPU-MEM",
            "ALLREDUCE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let mut failed = 0;
    for p in &pods {
        let pod = p.metadata.name.clone().unwrap_or_default();
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| "-".into());
        let mut row = vec![crate::why::rank_of(p).to_string(), pod.clone(), node];
        let path = format!(
            "/api/v1/namespaces/{}/pods/{pod}:{port}/proxy/metrics",
            ctx.namespace
        );
        let text = match http::Request::get(&path).body(Vec::new()) {
            Ok(req) => ctx
                .client
                .request_text(req)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match text {
            Ok(t) => {
                let m = parse(&t);
                let step_time = match (
                    first(&m, "lockstep_worker_step_seconds_sum"),
                    first(&m, "lockstep_worker_step_seconds_count"),
                ) {
                    (Some(s), Some(c)) if c > 0.0 => format!("{:.1}ms", 1e3 * s / c),
                    _ => "-".into(),
                };
                let gpu = m.get("lockstep_worker_gpu_utilization_ratio").map(|v| {
                    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
                    format!("{:.0}%", 100.0 * mean)
                });
                let mem = m
                    .get("lockstep_worker_gpu_memory_used_bytes")
                    .map(|v| fmt::bytes(v.iter().sum()));
                let busbw = first(&m, "lockstep_worker_allreduce_busbw_bytes_per_second")
                    .filter(|b| *b > 0.0)
                    .map(|b| format!("{}/s", fmt::bytes(b)));
                row.extend([
                    first(&m, "lockstep_worker_step").map_or("-".into(), |s| format!("{s:.0}")),
                    step_time,
                    fmt::num(first(&m, "lockstep_worker_tokens_per_second")),
                    fmt::num(first(&m, "lockstep_worker_samples_per_second")),
                    gpu.unwrap_or_else(|| "-".into()),
                    mem.unwrap_or_else(|| "-".into()),
                    busbw.unwrap_or_else(|| "-".into()),
                ]);
            }
            Err(e) => {
                failed += 1;
                let short: String = e.chars().take(60).collect();
                row.push(format!("(no metrics: {short})"));
            }
        }
        rows.push(row);
    }
    for l in fmt::table(&rows) {
        ctx.out.line(l);
    }
    Ok(if failed == pods.len() { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_series_with_and_without_labels() {
        let m = parse(
            "# HELP lockstep_worker_step Last step\n\
             # TYPE lockstep_worker_step gauge\n\
             lockstep_worker_step 42\n\
             lockstep_worker_gpu_utilization_ratio{gpu=\"0\",uuid=\"a b\"} 0.5\n\
             lockstep_worker_gpu_utilization_ratio{gpu=\"1\"} 0.7 1700000000\n",
        );
        assert_eq!(first(&m, "lockstep_worker_step"), Some(42.0));
        assert_eq!(m["lockstep_worker_gpu_utilization_ratio"], vec![0.5, 0.7]);
    }
}
