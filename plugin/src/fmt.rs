//! Formatting shared by the commands: ages and durations as kubectl shows them, numbers, tables,
//! and what a job's status says in a few words.

use k8s_openapi::jiff::Timestamp;
use lockstep_api::ParallelJob;
use lockstep_api::status::condition_types;

/// A duration in kubectl's style: `45s`, `3m12s`, `2h5m`, `4d3h`.
pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..600 => format!("{}m{}s", s / 60, s % 60),
        600..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// Seconds from `t` to now.
pub fn since(t: Timestamp) -> f64 {
    Timestamp::now().duration_since(t).as_secs_f64()
}

/// The job's age.
pub fn age(job: &ParallelJob) -> String {
    job.metadata
        .creation_timestamp
        .as_ref()
        .map_or("-".into(), |t| duration(since(t.0)))
}

/// A number with at most 4 significant digits, or `-`.
pub fn num(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.4}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string(),
    }
}

/// A byte count in binary units.
pub fn bytes(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1}{}", UNITS[i])
}

/// Rows aligned in columns, separated by three spaces, as kubectl prints them.
pub fn table(rows: &[Vec<String>]) -> Vec<String> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c + 1 == r.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}

/// The job's phase, `Pending` when the operator has not written one.
pub fn phase(job: &ParallelJob) -> &'static str {
    job.status
        .as_ref()
        .and_then(|s| s.phase)
        .map_or("Pending", |p| p.as_str())
}

/// The condition `type_` of the job.
pub fn condition<'a>(
    job: &'a ParallelJob,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// The `Admitted` condition.
pub fn admitted(
    job: &ParallelJob,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    condition(job, condition_types::ADMITTED)
}

/// Ranks of the job (dataParallel x pipelineStages).
pub fn world(job: &ParallelJob) -> i32 {
    job.spec.parallelism.data_parallel.max(1) * job.spec.parallelism.pipeline_stages.max(1)
}

/// The progress rank 0 reported for the current attempt (not an earlier attempt's).
pub fn progress(job: &ParallelJob) -> Option<&lockstep_api::status::Progress> {
    let s = job.status.as_ref()?;
    s.progress
        .as_ref()
        .filter(|p| p.attempt.is_none_or(|a| a == s.attempt))
}

/// Samples in one optimizer step of the whole gang (what `progress.samplesPerSecond` counts).
pub fn samples_per_step(job: &ParallelJob) -> Option<f64> {
    let t = &job.spec.training;
    let batch = f64::from(t.batch_size?);
    let dp = f64::from(job.spec.parallelism.data_parallel.max(1));
    let accum = match t.workload {
        lockstep_api::training::Workload::Ddp => f64::from(t.ddp.grad_accumulation_steps.max(1)),
        _ => 1.0,
    };
    Some(batch * dp * accum)
}

/// Seconds until the job's last step, from its progress and throughput.
pub fn eta(job: &ParallelJob) -> Option<f64> {
    let p = progress(job)?;
    let left = (p.total_steps? - p.step).max(0) as f64;
    let steps_per_second = p.samples_per_second? / samples_per_step(job)?;
    (steps_per_second > 0.0).then(|| left / steps_per_second)
}

/// `step/total` (or `step`), `-` before the first report of the current attempt.
pub fn step(job: &ParallelJob) -> String {
    match progress(job) {
        Some(p) => match p.total_steps {
            Some(t) => format!("{}/{t}", p.step),
            None => p.step.to_string(),
        },
        None => "-".into(),
    }
}

/// The progress line of a running job: step, loss, throughput, ETA.
pub fn progress_line(job: &ParallelJob) -> String {
    let p = progress(job);
    let mut parts = vec![format!("step {}", step(job))];
    if let Some(l) = p.and_then(|p| p.loss) {
        parts.push(format!("loss {}", num(Some(l))));
    }
    if let Some(e) = p.and_then(|p| p.eval_metric) {
        parts.push(format!("eval {}", num(Some(e))));
    }
    if let Some(sps) = p.and_then(|p| p.samples_per_second) {
        parts.push(format!("{} samples/s", num(Some(sps))));
    }
    if let Some(e) = eta(job) {
        parts.push(format!("ETA {}", duration(e)));
    }
    parts.join("  ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_kubectl_writes_them() {
        assert_eq!(duration(42.4), "42s");
        assert_eq!(duration(192.0), "3m12s");
        assert_eq!(duration(900.0), "15m");
        assert_eq!(duration(7500.0), "2h5m");
        assert_eq!(duration(3.0 * 86400.0 + 7200.0), "3d2h");
    }

    #[test]
    fn tables_align_every_column_but_the_last() {
        let rows = vec![
            vec!["NAME".into(), "PHASE".into(), "AGE".into()],
            vec!["a-long-name".into(), "Running".into(), "3m".into()],
        ];
        assert_eq!(
            table(&rows),
            vec!["NAME          PHASE     AGE", "a-long-name   Running   3m"]
        );
    }

    #[test]
    fn the_progress_line_has_the_step_loss_throughput_and_eta() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ddp-digits.yaml"),
        )
        .unwrap();
        let mut job = lockstep_api::manifest::parse_job(&text).unwrap();
        let per_step = samples_per_step(&job).unwrap();
        job.status = Some(lockstep_api::ParallelJobStatus {
            attempt: 1,
            progress: Some(lockstep_api::status::Progress {
                step: 100,
                total_steps: Some(400),
                loss: Some(0.123456),
                // 2 steps a second: 300 steps left take 2m30s.
                samples_per_second: Some(2.0 * per_step),
                attempt: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            progress_line(&job),
            format!(
                "step 100/400  loss 0.1235  {} samples/s  ETA 2m30s",
                num(Some(2.0 * per_step))
            )
        );
        // A report of the attempt before is not this attempt's progress.
        if let Some(p) = job.status.as_mut().and_then(|s| s.progress.as_mut()) {
            p.attempt = Some(0);
        }
        assert_eq!(step(&job), "-");
        assert_eq!(progress_line(&job), "step -");
    }

    #[test]
    fn numbers_keep_four_decimals_at_most() {
        assert_eq!(num(Some(2.345678)), "2.3457");
        assert_eq!(num(Some(1.5)), "1.5");
        assert_eq!(num(Some(12345.6)), "12346");
        assert_eq!(num(None), "-");
        assert_eq!(bytes(3.5 * 1024.0 * 1024.0 * 1024.0), "3.5GiB");
    }
}
