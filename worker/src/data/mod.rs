//! The built-in data sets and the distributed sampler.
//!
//! - [`Digits`]: 8x8 hand-written digits (CSV of 64 pixels and a label); every fifth row
//!   (rows 4, 9, 14, ...) is held out, so both parts mix every writer.
//! - [`Text`]: a UTF-8 text modelled character by character; the vocabulary is the sorted set of
//!   its characters; the last 10% is held out.
//! - [`Sampler`]: which samples each data-parallel replica takes at each step, reproducible from
//!   `(seed, step)` alone.

use std::io::Read;

use lockstep_api::contract::ExitCode;

use crate::error::WorkError;

mod digits;
mod sampler;
mod text;

pub use digits::Digits;
pub use sampler::Sampler;
pub use text::Text;

fn bad(m: String) -> WorkError {
    WorkError::new(ExitCode::Data, m)
}

/// Reads a file, decompressing `.gz`, as UTF-8 text.
pub fn read_text(path: &str) -> Result<String, WorkError> {
    let raw =
        std::fs::read(path).map_err(|e| bad(format!("cannot read the data set {path}: {e}")))?;
    if path.ends_with(".gz") {
        let mut s = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut s)
            .map_err(|e| bad(format!("{path} is not valid gzip text: {e}")))?;
        Ok(s)
    } else {
        String::from_utf8(raw).map_err(|e| bad(format!("{path} is not UTF-8: {e}")))
    }
}

/// A 64-bit mix of a seed and a counter (splitmix64).
pub fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
