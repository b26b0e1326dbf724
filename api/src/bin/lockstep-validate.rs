//! Checks ParallelJob manifests the way the API server (and `lockstep-worker local`) will: strict
//! parsing, the CRD's defaults, bounds and CEL rules. Prints a one-line summary per valid file
//! and every violation of an invalid one; exits 1 if any file is invalid.
//!
//!     lockstep-validate examples/*.yaml
//!     lockstep-validate --defaulted examples/ddp-digits.yaml   # print the defaulted job as YAML

use std::process::ExitCode;

use lockstep_api::layout::Layout;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let defaulted = args.first().is_some_and(|a| a == "--defaulted");
    if defaulted {
        args.remove(0);
    }
    if args.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: lockstep-validate [--defaulted] MANIFEST.yaml...");
        return ExitCode::from(2);
    }
    let mut failed = false;
    for path in &args {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{path}: cannot read: {e}");
                failed = true;
                continue;
            }
        };
        match lockstep_api::validation::validate_yaml(&text) {
            Ok(job) => {
                let p = &job.spec.parallelism;
                let world = Layout::new(p.data_parallel as u32, p.pipeline_stages as u32)
                    .map(|l| l.world_size())
                    .unwrap_or(0);
                let name = job.metadata.name.as_deref().unwrap_or("<unnamed>");
                if defaulted {
                    match serde_saphyr::to_string(&job) {
                        #[allow(clippy::print_stdout)] // CLI output
                        Ok(y) => print!("{y}"),
                        Err(e) => eprintln!("{path}: cannot print: {e}"),
                    }
                } else {
                    #[allow(clippy::print_stdout)] // CLI output
                    {
                        println!(
                            "{path}: ok: {name}, workload {:?}, {world} ranks ({} x {} stages), {} GPU(s) per rank",
                            job.spec.training.workload,
                            p.data_parallel,
                            p.pipeline_stages,
                            p.gpus_per_worker
                        );
                    }
                }
            }
            Err(e) => {
                eprintln!("{path}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
