//! What the training tests share: a scratch folder and a small text to train on.

use std::path::{Path, PathBuf};

/// An empty folder for test `name` of `suite`, under the system's temporary folder.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lockstep-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A text with some structure to learn (20 kB of words drawn by a fixed generator), written
/// into `dir`.
pub fn text(dir: &Path) -> PathBuf {
    let words = [
        "the ", "quick ", "brown ", "fox ", "jumps ", "over ", "a ", "lazy ", "dog. ",
    ];
    let mut s = String::new();
    let mut x = 7u64;
    while s.len() < 20_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s.push_str(words[(x >> 33) as usize % words.len()]);
    }
    let p = dir.join("text.txt");
    std::fs::write(&p, s).expect("write text");
    p
}
