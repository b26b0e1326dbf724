//! The end-to-end suite, one module per behaviour, in one test binary so that one control plane
//! serves them all (see `lockstep_e2e` for how it is started or reused).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "e2e/admission.rs"]
mod admission;
#[path = "e2e/broken.rs"]
mod broken;
#[path = "e2e/chart.rs"]
mod chart;
#[path = "e2e/crash.rs"]
mod crash;
#[path = "e2e/crd.rs"]
mod crd;
#[path = "e2e/examples.rs"]
mod examples;
#[path = "e2e/gang.rs"]
mod gang;
#[path = "e2e/gc.rs"]
mod gc;
#[path = "e2e/guard.rs"]
mod guard;
#[path = "e2e/kueue.rs"]
mod kueue;
#[path = "e2e/leader.rs"]
mod leader;
#[path = "e2e/namespaced.rs"]
mod namespaced;
#[path = "e2e/network_policy.rs"]
mod network_policy;
#[path = "e2e/operator.rs"]
mod operator;
#[path = "e2e/ownership.rs"]
mod ownership;
#[path = "e2e/plugin.rs"]
mod plugin;
#[path = "e2e/progress.rs"]
mod progress;
#[path = "e2e/published.rs"]
mod published;
#[path = "e2e/quota.rs"]
mod quota;
#[path = "e2e/real_node.rs"]
mod real_node;
#[path = "e2e/real_node_torch.rs"]
mod real_node_torch;
#[path = "e2e/restart.rs"]
mod restart;
#[path = "e2e/restricted.rs"]
mod restricted;
#[path = "e2e/scheduling.rs"]
mod scheduling;
#[path = "e2e/token.rs"]
mod token;
