//! The generated CRD installs with the real kubectl, becomes Established, and `kubectl explain`
//! shows the descriptions written on the Rust types.

use lockstep_e2e::cluster;

#[tokio::test]
async fn crd_applies_with_kubectl_and_becomes_established() -> anyhow::Result<()> {
    let c = cluster().await;
    // Applying again is a no-op (idempotent), and the harness waited for Established.
    c.install_crd().await?;
    let out = c
        .kubectl(&[
            "get",
            "crd",
            "paralleljobs.lockstep.dev",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ])
        .await?;
    assert_eq!(out.trim(), "True");
    let names = c
        .kubectl(&["api-resources", "--api-group=lockstep.dev", "--no-headers"])
        .await?;
    assert!(
        names.contains("paralleljobs") && names.contains("pj,pjob"),
        "{names}"
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_explain_shows_the_descriptions() -> anyhow::Result<()> {
    let c = cluster().await;
    let out = c
        .kubectl(&["explain", "paralleljob.spec.parallelism"])
        .await?;
    for needle in [
        "Immutable after creation",
        "dataParallel",
        "Number of data-parallel replicas",
        "pipelineStages",
        "gpusPerWorker",
    ] {
        assert!(out.contains(needle), "explain lacks {needle:?}:\n{out}");
    }
    let training = c
        .kubectl(&["explain", "paralleljob.spec.training.pres.gamma"])
        .await?;
    assert!(training.contains("gamma * predicted"), "{training}");
    Ok(())
}
