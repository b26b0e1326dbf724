//! `kubectl lockstep submit -f FILE [--wait] [--local]`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kube::api::{Patch, PatchParams};
use lockstep_api::ParallelJob;

use crate::{Ctx, fmt};

/// The field manager of the plugin's server-side applies.
pub const FIELD_MANAGER: &str = "kubectl-lockstep";

/// Validates `file` exactly as the API server will, applies it server-side, and with `wait`
/// follows it; with `local` (a `lockstep-worker` binary), runs it on this machine instead.
pub async fn submit(
    ctx: &Ctx,
    file: &Path,
    wait: bool,
    local: Option<&Path>,
) -> anyhow::Result<i32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    // The CRD's own schema and CEL rules, as `make validate` and the API server run them.
    let job = lockstep_api::validation::validate_yaml(&text)
        .with_context(|| format!("{} is not a valid ParallelJob", file.display()))?;
    if let Some(worker) = local {
        return run_local(worker, file).await;
    }
    let name = job
        .metadata
        .name
        .clone()
        .context("the manifest has no metadata.name")?;
    let ns = job
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| ctx.namespace.clone());
    let ctx = Ctx {
        namespace: ns.clone(),
        ..ctx.clone()
    };
    // What the file says, not the defaulted object: the plugin owns only the fields it sets.
    let manifest = lockstep_api::manifest::yaml_to_value(&text)?;
    crate::jobs(&ctx)
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&manifest),
        )
        .await
        .with_context(|| format!("applying {name} in namespace {ns}"))?;
    ctx.out.line(format!(
        "paralleljob.lockstep.dev/{name} applied in namespace {ns}"
    ));
    if !wait {
        return Ok(0);
    }
    follow(&ctx, &name).await
}

/// Prints each change of phase and admission, then the progress, until the job ends; 0 when it
/// succeeds.
async fn follow(ctx: &Ctx, name: &str) -> anyhow::Result<i32> {
    let started = Instant::now();
    let mut last_state = String::new();
    let mut last_progress = String::new();
    let mut printed_at: Option<Instant> = None;
    loop {
        let Some(job) = crate::jobs(ctx).get_opt(name).await? else {
            anyhow::bail!("{name} was deleted");
        };
        let state = state_line(&job);
        if state != last_state {
            ctx.out.line(format!(
                "[{}] {state}",
                fmt::duration(started.elapsed().as_secs_f64())
            ));
            last_state = state;
        }
        let phase = fmt::phase(&job);
        if phase == "Running" {
            let p = fmt::progress_line(&job);
            let due = printed_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
            if p != last_progress && due {
                ctx.out.line(format!(
                    "[{}] {p}",
                    fmt::duration(started.elapsed().as_secs_f64())
                ));
                last_progress = p;
                printed_at = Some(Instant::now());
            }
        }
        match phase {
            "Succeeded" => {
                ctx.out
                    .line(format!("{name} succeeded: {}", fmt::progress_line(&job)));
                return Ok(0);
            }
            "Failed" => {
                ctx.out.line(format!("{name} failed:"));
                crate::why::why(ctx, name).await?;
                return Ok(1);
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The phase, the attempt and the `Admitted` condition in a line.
fn state_line(job: &ParallelJob) -> String {
    let attempt = job.status.as_ref().map_or(0, |s| s.attempt);
    let mut l = format!("{} (attempt {attempt})", fmt::phase(job));
    if let Some(c) = fmt::admitted(job) {
        l.push_str(&format!("  Admitted={} {}", c.status, c.reason));
        if c.status != "True" && !c.message.is_empty() {
            l.push_str(&format!(": {}", c.message));
        }
    }
    l
}

/// Runs the manifest with `lockstep-worker local`; returns its exit code.
async fn run_local(worker: &Path, file: &Path) -> anyhow::Result<i32> {
    let status = tokio::process::Command::new(worker)
        .arg("local")
        .arg(file)
        .status()
        .await
        .with_context(|| {
            format!(
                "cannot run {} (install it with cargo install --path worker, or set \
                 LOCKSTEP_WORKER to its path)",
                worker.display()
            )
        })?;
    Ok(status.code().unwrap_or(1))
}

/// `$LOCKSTEP_WORKER`, else `lockstep-worker` beside this binary, else from `PATH`.
pub fn worker_binary() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("LOCKSTEP_WORKER") {
        return p.into();
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("lockstep-worker")));
    match beside {
        Some(b) if b.exists() => b,
        _ => "lockstep-worker".into(),
    }
}
