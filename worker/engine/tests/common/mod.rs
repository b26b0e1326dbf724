//! Helpers shared by the engine's integration tests.

use rand::{Rng, SeedableRng};

/// `n` values uniform in `-scale..scale`, drawn from `seed`.
pub fn rnd(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// Compares `analytic` with central differences of `f` at `x` on up to `samples` coordinates;
/// the tolerance is absolute plus relative to the largest gradient.
pub fn check_grad(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    samples: usize,
    eps: f32,
    tol: f64,
    f: &mut dyn FnMut(&[f32]) -> f64,
) {
    check_grad_at(name, x, analytic, 0..x.len(), samples, eps, tol, f);
}

/// [`check_grad`] on the coordinates in `range` only (one tensor of a flat buffer).
#[allow(clippy::too_many_arguments)]
pub fn check_grad_at(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    range: std::ops::Range<usize>,
    samples: usize,
    eps: f32,
    tol: f64,
    f: &mut dyn FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let scale = analytic[range.clone()]
        .iter()
        .fold(0.0f64, |m, g| m.max(f64::from(g.abs())));
    let step = (range.len() / samples).max(1);
    let mut worst = 0.0f64;
    for i in range.step_by(step) {
        let mut xp = x.to_vec();
        xp[i] += eps;
        let fp = f(&xp);
        xp[i] -= 2.0 * eps;
        let fm = f(&xp);
        let fd = (fp - fm) / (2.0 * f64::from(eps));
        let err = (fd - f64::from(analytic[i])).abs();
        worst = worst.max(err / (scale + 1e-12));
        assert!(
            err <= tol * (scale + 1e-3),
            "{name}[{i}]: analytic {} vs finite difference {fd} (largest gradient {scale})",
            analytic[i]
        );
    }
    eprintln!("{name}: worst error {worst:.2e} of the largest gradient");
}
