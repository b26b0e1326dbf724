//! bfloat16: the upper 16 bits of an IEEE single (1 sign, 8 exponent, 7 mantissa bits), and
//! the conversion the engine uses everywhere it rounds to it: round to nearest, ties to even
//! (what `__float2bfloat16_rn` and PyTorch's `.to(torch.bfloat16)` do), with NaN kept a
//! (quiet) NaN. No stochastic rounding: the master weights stay FP32, so updates smaller than
//! a bf16 ulp are not lost, and rounding is deterministic, so the CPU emulation and the CUDA
//! kernels round the same value to the same bits.
//!
//! bf16 has FP32's exponent range, so gradients neither overflow nor underflow where FP32's
//! would not: unlike FP16, mixed precision in bf16 needs no loss scaling, and the engine has
//! none.

/// The bf16 bits of `x`, rounded to nearest, ties to even. Values above bf16's largest
/// finite value (by at least half an ulp) round to infinity; NaN stays NaN.
pub fn to_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if x.is_nan() {
        // Keep the sign, force a quiet NaN (a payload only in the low bits would be lost).
        return ((u >> 16) as u16) | 0x0040;
    }
    let lsb = (u >> 16) & 1;
    (u.wrapping_add(0x7fff + lsb) >> 16) as u16
}

/// The f32 holding the bf16 bits `b` (exact).
pub fn from_bits(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// `x` rounded to the nearest bf16 value (ties to even), as an f32.
pub fn round(x: f32) -> f32 {
    from_bits(to_bits(x))
}

/// Rounds every value of `xs` to bf16 in place.
pub fn round_all(xs: &mut [f32]) {
    for x in xs {
        *x = round(*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn representable_values_are_kept_exactly() {
        for x in [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            0.15625,
            3.0e38,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            let r = round(x);
            assert_eq!(
                r.to_bits() & 0xffff,
                0,
                "{x} has no low bits after rounding"
            );
            if x.to_bits() & 0xffff == 0 {
                assert_eq!(r.to_bits(), x.to_bits(), "{x} is a bf16 value");
            }
        }
        assert_eq!(to_bits(1.0), 0x3f80);
        assert_eq!(from_bits(0xc020), -2.5);
    }

    #[test]
    fn rounding_is_to_nearest_with_ties_to_even() {
        let ulp = 2f32.powi(-7); // bf16's spacing in [1, 2)
        // Half an ulp above 1.0 (even): down to 1.0. Half an ulp above 1 + ulp (odd): up.
        assert_eq!(round(1.0 + ulp / 2.0), 1.0);
        assert_eq!(round(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp);
        // Just above and below the tie go to the nearer neighbour.
        assert_eq!(round(1.0 + ulp / 2.0 + 2f32.powi(-20)), 1.0 + ulp);
        assert_eq!(round(1.0 + ulp / 2.0 - 2f32.powi(-20)), 1.0);
        assert_eq!(round(-(1.0 + 0.75 * ulp)), -(1.0 + ulp));
        // Subnormals round like everything else.
        let tiny = f32::from_bits(0x0000_8001);
        assert_eq!(round(tiny), f32::from_bits(0x0001_0000));
    }

    #[test]
    fn overflow_goes_to_infinity_and_nan_stays_nan() {
        let max = from_bits(0x7f7f); // largest finite bf16, about 3.39e38
        assert_eq!(round(max), max);
        assert_eq!(round(f32::MAX), f32::INFINITY);
        assert!(round(f32::NAN).is_nan());
        assert!(round(-f32::NAN).is_nan());
        // A NaN whose payload is only in the low bits must not become infinity.
        assert!(round(f32::from_bits(0x7f80_0001)).is_nan());
    }

    #[test]
    fn the_relative_error_is_at_most_half_an_ulp() {
        let mut x = 1.0e-30f32;
        while x < 1.0e30 {
            let r = round(x);
            assert!(((r - x) / x).abs() <= 2f32.powi(-8), "{x} rounds to {r}");
            x *= 1.37;
        }
    }
}
