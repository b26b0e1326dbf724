//! The built-in data sets and the distributed sampler.
//!
//! - [`Digits`]: 8x8 hand-written digits (CSV of 64 pixels and a label); every fifth row
//!   (rows 4, 9, 14, ...) is held out, so both parts mix every writer.
//! - [`Text`]: a UTF-8 text modelled character by character; the vocabulary is the sorted set of
//!   its characters; the last 10% is held out.
//! - [`TemporalGraph`]: timestamped events for link prediction (SNAP edges, SNAP ratings, JODIE
//!   CSV), split chronologically 70/15/15, with the most-recent-k neighbour lists.
//! - [`Sampler`]: which samples each data-parallel replica takes at each step, reproducible from
//!   `(seed, step)` alone.

use std::io::Read;

use lockstep_api::contract::ExitCode;

use crate::error::WorkError;

mod digits;
mod sampler;
pub mod temporal;
mod text;

pub use digits::Digits;
pub use sampler::Sampler;
pub use temporal::TemporalGraph;
pub use text::Text;

fn bad(m: String) -> WorkError {
    WorkError::new(ExitCode::Data, m)
}

/// The largest data set read into memory, decompressed: a file (or a gzip bomb) past it is
/// refused with its size named instead of exhausting the pod's memory.
pub const MAX_DATA_BYTES: u64 = 2 << 30;

/// Reads a file, decompressing `.gz`, as UTF-8 text of at most [`MAX_DATA_BYTES`].
pub fn read_text(path: &str) -> Result<String, WorkError> {
    read_text_limited(path, MAX_DATA_BYTES)
}

/// [`read_text`] with another limit.
fn read_text_limited(path: &str, limit: u64) -> Result<String, WorkError> {
    let too_big = |what: &str| {
        bad(format!(
            "{path} is larger than {} MiB {what}: Lockstep reads a data set into memory whole; \
             use a smaller file",
            limit >> 20
        ))
    };
    let file = std::fs::File::open(path)
        .map_err(|e| bad(format!("cannot read the data set {path}: {e}")))?;
    let mut raw = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut raw)
        .map_err(|e| bad(format!("cannot read the data set {path}: {e}")))?;
    if raw.len() as u64 > limit {
        return Err(too_big("on disk"));
    }
    if path.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("{path} is not valid gzip: {e}")))?;
        if out.len() as u64 > limit {
            return Err(too_big("once decompressed"));
        }
        String::from_utf8(out).map_err(|e| bad(format!("{path} is not UTF-8 text: {e}")))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_file_past_the_limit_is_refused_compressed_or_not() {
        let dir = std::env::temp_dir().join(format!("lockstep-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("big.txt");
        std::fs::write(&plain, "a".repeat(5000)).unwrap();
        let p = plain.to_str().unwrap();
        assert_eq!(read_text_limited(p, 5000).unwrap().len(), 5000);
        let refused = |r: Result<String, WorkError>| match r {
            Ok(s) => panic!("{} bytes accepted past the limit", s.len()),
            Err(e) => e,
        };
        let e = refused(read_text_limited(p, 4096));
        assert!(
            e.message.contains("on disk") && e.message.contains(p),
            "{}",
            e.message
        );
        // A small gzip that decompresses to far more than the limit: refused before it is all
        // in memory.
        let gz = dir.join("bomb.txt.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![b'a'; 1 << 20]).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        let g = gz.to_str().unwrap();
        assert!(std::fs::metadata(&gz).unwrap().len() < 4096);
        let e = refused(read_text_limited(g, 64 << 10));
        assert!(e.message.contains("once decompressed"), "{}", e.message);
        assert_eq!(e.code, ExitCode::Data);
        assert_eq!(read_text_limited(g, 1 << 20).unwrap().len(), 1 << 20);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
