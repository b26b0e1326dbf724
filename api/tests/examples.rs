//! Every manifest in `examples/` is a valid ParallelJob: it parses strictly, passes the CRD's
//! bounds and CEL rules, round-trips through the types, and the CRD's defaults agree with the
//! types' own defaults.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use lockstep_api::layout::Layout;
use lockstep_api::manifest::{job_from_value, parse_job, yaml_to_value};
use lockstep_api::training::Workload;
use lockstep_api::validation::{apply_defaults, validate};
use lockstep_api::{ParallelJob, contract};

const EXPECTED: &[&str] = &[
    "ddp-digits.yaml",
    "gpt-shakespeare.yaml",
    "pipeline-gpt.yaml",
    "pres-collegemsg.yaml",
    "torch-command.yaml",
];

#[test]
fn the_promised_examples_exist() {
    let names: Vec<String> = common::yaml_files("examples")
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in EXPECTED {
        assert!(
            names.iter().any(|n| n == want),
            "examples/{want} is missing"
        );
    }
}

#[test]
fn every_example_parses_validates_and_round_trips() {
    for (path, text) in common::yaml_files("examples") {
        let name = path.display();
        let job = parse_job(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let raw = yaml_to_value(&text).unwrap();
        let validated = validate(&raw, None).unwrap_or_else(|errs| {
            panic!(
                "{name}: {}",
                errs.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        });
        // Defaults applied by the API server (from the CRD schema) must give the same object as
        // the serde defaults of the types: one source of defaults, two consumers.
        assert_eq!(
            validated, job,
            "{name}: CRD defaults disagree with the types' defaults"
        );

        // Round trip: typed -> YAML -> typed is the identity.
        let yaml = serde_saphyr::to_string(&job).unwrap();
        let again = parse_job(&yaml).unwrap_or_else(|e| panic!("{name} re-parse: {e}\n{yaml}"));
        assert_eq!(again, job, "{name}: YAML round trip changed the job");

        // Defaulting is idempotent and a defaulted object still validates.
        let defaulted = apply_defaults(&raw);
        assert_eq!(
            apply_defaults(&defaulted),
            defaulted,
            "{name}: defaulting twice differs"
        );
        assert_eq!(job_from_value(&defaulted).unwrap(), job);

        // Every example names a worker container and has a sane layout.
        let p = &job.spec.parallelism;
        let layout = Layout::new(p.data_parallel as u32, p.pipeline_stages as u32).unwrap();
        assert!(layout.world_size() >= 1);
        let containers = &job.spec.template.spec.as_ref().unwrap().containers;
        assert!(
            containers
                .iter()
                .any(|c| c.name == contract::operator::WORKER_CONTAINER),
            "{name}: no worker container"
        );
    }
}

#[test]
fn examples_cover_every_workload() {
    let workloads: Vec<Workload> = common::yaml_files("examples")
        .iter()
        .map(|(_, t)| parse_job(t).unwrap().spec.training.workload)
        .collect();
    for w in [
        Workload::Ddp,
        Workload::Pipeline,
        Workload::Pres,
        Workload::Command,
    ] {
        assert!(workloads.contains(&w), "no example runs workload {w:?}");
    }
}

#[test]
fn builtin_examples_point_at_shipped_data() {
    for (path, text) in common::yaml_files("examples") {
        let job: ParallelJob = parse_job(&text).unwrap();
        if let Some(data) = &job.spec.training.data {
            let file = common::repo_root().join(&data.path);
            assert!(
                file.is_file(),
                "{}: data {} does not exist",
                path.display(),
                file.display()
            );
        }
    }
}
