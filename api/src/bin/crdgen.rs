//! Writes the ParallelJob CRD generated from the Rust types (`make crds`).
//!
//! `crdgen` prints it; `crdgen PATH...` writes it to each path (the repository's `crds/` file and
//! the Helm chart's copy).

fn main() -> std::io::Result<()> {
    let yaml = lockstep_api::crd::crd_yaml();
    let paths: Vec<String> = std::env::args().skip(1).collect();
    if paths.is_empty() {
        use std::io::Write;
        return std::io::stdout().write_all(yaml.as_bytes());
    }
    for p in paths {
        if let Some(dir) = std::path::Path::new(&p).parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&p, &yaml)?;
    }
    Ok(())
}
