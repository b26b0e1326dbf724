//! The optimizer (AdamW with global-norm clipping) and the learning-rate schedule (linear warmup,
//! then constant or cosine decay).

use crate::Result;
use crate::backend::{AdamStep, Backend, Kernel};

/// AdamW state on a backend, with the learning rate decided by the caller.
pub struct Adam<B: Backend> {
    /// First moments.
    pub m: B::Buf,
    /// Second moments.
    pub v: B::Buf,
    /// Updates taken so far.
    pub t: i32,
}

impl<B: Backend> Adam<B> {
    /// Zero moments for `n` parameters.
    pub fn new(be: &B, n: usize) -> Result<Self> {
        Ok(Self {
            m: be.zeros(n)?,
            v: be.zeros(n)?,
            t: 0,
        })
    }

    /// Restores the moments and the update count of a checkpoint.
    pub fn restore(&mut self, be: &B, m: &[f32], v: &[f32], t: i32) -> Result<()> {
        be.upload(&mut self.m, m)?;
        be.upload(&mut self.v, v)?;
        self.t = t;
        Ok(())
    }

    /// One update over `ranges` (see [`crate::Net::decay_ranges`]); clips the global gradient
    /// norm to `clip` when above 0. Returns the gradient norm before clipping, which is only
    /// computed (a pass over the gradients and a wait for the device) when clipping.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        be: &B,
        params: &mut B::Buf,
        grads: &B::Buf,
        ranges: &[(usize, usize, bool)],
        lr: f32,
        betas: (f32, f32),
        eps: f32,
        weight_decay: f32,
        clip: f32,
    ) -> Result<Option<f32>> {
        let norm = if clip > 0.0 {
            let total: usize = ranges.iter().map(|r| r.1).sum();
            Some(be.sum_squares(grads, 0, total)?.sqrt() as f32)
        } else {
            None
        };
        self.apply(
            be,
            params,
            grads,
            ranges,
            lr,
            betas,
            eps,
            weight_decay,
            clip_scale(norm, clip),
        )?;
        Ok(norm)
    }

    /// One update over `ranges` with every gradient multiplied by `grad_scale` first (the
    /// clipping factor of a global norm computed elsewhere, e.g. across pipeline stages: see
    /// [`clip_scale`]).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        &mut self,
        be: &B,
        params: &mut B::Buf,
        grads: &B::Buf,
        ranges: &[(usize, usize, bool)],
        lr: f32,
        betas: (f32, f32),
        eps: f32,
        weight_decay: f32,
        grad_scale: f32,
    ) -> Result<()> {
        self.t += 1;
        for &(off, len, decays) in ranges {
            let step = AdamStep {
                lr,
                beta1: betas.0,
                beta2: betas.1,
                eps,
                weight_decay: if decays { weight_decay } else { 0.0 },
                t: self.t,
                grad_scale,
            };
            be.launch(Kernel::AdamW {
                params,
                grads,
                m: &mut self.m,
                v: &mut self.v,
                off,
                len,
                step,
            })?;
        }
        Ok(())
    }
}

/// The factor that clips a gradient of global norm `norm` to `clip` (1 when it is within, or
/// when there is no norm).
pub fn clip_scale(norm: Option<f32>, clip: f32) -> f32 {
    match norm {
        Some(n) if n > clip => clip / (n + 1e-6),
        _ => 1.0,
    }
}

/// How the learning rate decays after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    /// Stays at the peak.
    Constant,
    /// Half a cosine from the peak down to the minimum at the last step.
    Cosine,
}

/// The learning rate of every step: linear warmup to `peak`, then [`Decay`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    /// The rate after warmup.
    pub peak: f64,
    /// The rate cosine decay ends at.
    pub min: f64,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// What follows warmup.
    pub decay: Decay,
    /// Optimizer steps of the whole run.
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate of `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        let warm = self.warmup_steps;
        if step < warm {
            return self.peak * (step + 1) as f64 / warm as f64;
        }
        match self.decay {
            Decay::Constant => self.peak,
            Decay::Cosine => {
                let span = self.total_steps.saturating_sub(warm).max(1) as f64;
                let p = ((step - warm) as f64 / span).min(1.0);
                self.min + 0.5 * (self.peak - self.min) * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_the_minimum() {
        let s = LrSchedule {
            peak: 1.0,
            min: 0.1,
            warmup_steps: 10,
            decay: Decay::Cosine,
            total_steps: 110,
        };
        assert!((s.at(0) - 0.1).abs() < 1e-12);
        assert!((s.at(9) - 1.0).abs() < 1e-12);
        assert!((s.at(10) - 1.0).abs() < 1e-12);
        assert!((s.at(60) - 0.55).abs() < 1e-12);
        assert!((s.at(110) - 0.1).abs() < 1e-12);
        let c = LrSchedule {
            decay: Decay::Constant,
            ..s
        };
        assert!((c.at(60) - 1.0).abs() < 1e-12);
    }
}
