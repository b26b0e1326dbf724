//! `lockstep-worker bench cuda-libs`: the report of which CUDA libraries load, and the engine's
//! kernels compiled by NVRTC. Here (CI) NVRTC may be on the library path (worker/fetch-nvrtc.sh,
//! with LOCKSTEP_REQUIRE_NVRTC=1), but neither cuBLAS, NCCL nor a driver is: the report must
//! name every library, compile the kernels where NVRTC loads, and fail naming what is missing,
//! never the driver. The CUDA image's build (images/build.sh) runs the same command inside the
//! image, where all but the driver load, and needs it to pass.
#![cfg(feature = "cuda")]

use std::process::Command;

#[test]
fn cuda_libs_reports_every_library_and_fails_naming_the_missing_ones_but_not_the_driver() {
    let out = Command::new(env!("CARGO_BIN_EXE_lockstep-worker"))
        .args(["bench", "cuda-libs", "--arch", "sm_90"])
        .output()
        .expect("run lockstep-worker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let row = |name: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{stdout}"))
            .to_string()
    };
    let loaded = |name: &str| row(name).split_whitespace().nth(1) == Some("loaded");
    for name in ["cuda", "cublas", "cublasLt", "nvrtc", "nccl", "nvidia-ml"] {
        // The second column says whether it loaded: "loaded", or "not found".
        let r = row(name);
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert!(
            cols.get(1) == Some(&"loaded") || cols.get(1..3) == Some(&["not", "found"][..]),
            "{name}: neither loaded nor not found: {r}"
        );
    }
    if std::env::var_os("LOCKSTEP_REQUIRE_NVRTC").is_some() {
        assert!(loaded("nvrtc"), "LOCKSTEP_REQUIRE_NVRTC is set:\n{stdout}");
    }
    if loaded("nvrtc") {
        let n = lockstep_engine::cuda::KERNELS.len();
        assert!(
            stdout.contains(&format!(
                "# kernels: {n} of {n} compiled by NVRTC for sm_90"
            )),
            "{stdout}\n{stderr}"
        );
    }
    let missing: Vec<_> = ["cublas", "cublasLt", "nvrtc", "nccl"]
        .into_iter()
        .filter(|n| !loaded(n))
        .collect();
    assert_eq!(
        out.status.success(),
        missing.is_empty(),
        "{stdout}\n{stderr}"
    );
    for n in &missing {
        assert!(
            stderr.contains(&format!("lib{n} does not load")),
            "{n} missing but not named:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("libcuda does not load"),
        "the driver is optional without --require-driver:\n{stderr}"
    );
}
