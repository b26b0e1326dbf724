//! A backend wrapper that times every primitive: each call waits for the device before and
//! after, so the times are the device's own (and the whole step runs slower than unprofiled).
//! `lockstep-worker bench gpt --profile` prints the table.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::Result;
use crate::backend::{AdamStep, At, Backend, Gemm};

/// Times the primitives of an inner backend.
pub struct Profiled<'a, B: Backend> {
    inner: &'a B,
    times: RefCell<BTreeMap<String, (Duration, u64)>>,
}

impl<'a, B: Backend> Profiled<'a, B> {
    /// Wraps `inner`.
    pub fn new(inner: &'a B) -> Self {
        Self {
            inner,
            times: RefCell::new(BTreeMap::new()),
        }
    }

    /// Total time and calls per primitive since the last reset, longest first.
    pub fn report(&self) -> Vec<(String, Duration, u64)> {
        let mut v: Vec<_> = self
            .times
            .borrow()
            .iter()
            .map(|(k, (d, n))| (k.clone(), *d, *n))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }

    /// Forgets the times so far.
    pub fn reset(&self) {
        self.times.borrow_mut().clear();
    }

    fn time<T>(&self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.inner.sync()?;
        let start = Instant::now();
        let r = f()?;
        self.inner.sync()?;
        let mut t = self.times.borrow_mut();
        let e = t.entry(name.to_string()).or_default();
        e.0 += start.elapsed();
        e.1 += 1;
        Ok(r)
    }
}

impl<B: Backend> Backend for Profiled<'_, B> {
    type Buf = B::Buf;
    type Ids = B::Ids;

    fn name(&self) -> String {
        format!("{} (profiled)", self.inner.name())
    }
    fn zeros(&self, n: usize) -> Result<B::Buf> {
        self.inner.zeros(n)
    }
    fn upload_at(&self, dst: &mut B::Buf, off: usize, src: &[f32]) -> Result<()> {
        self.time("upload", || self.inner.upload_at(dst, off, src))
    }
    fn download(&self, src: &B::Buf, off: usize, len: usize) -> Result<Vec<f32>> {
        self.time("download", || self.inner.download(src, off, len))
    }
    fn ids(&self, n: usize) -> Result<B::Ids> {
        self.inner.ids(n)
    }
    fn upload_ids(&self, dst: &mut B::Ids, src: &[i32]) -> Result<()> {
        self.time("upload", || self.inner.upload_ids(dst, src))
    }
    fn fill_zero(&self, buf: &mut B::Buf, off: usize, len: usize) -> Result<()> {
        self.time("fill_zero", || self.inner.fill_zero(buf, off, len))
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn gemm(
        &self,
        g: &Gemm,
        a: At<'_, Self>,
        b: At<'_, Self>,
        c: (&mut B::Buf, usize),
    ) -> Result<()> {
        let name = if g.batch > 1 {
            "gemm (attention, batched)"
        } else if g.beta != 0.0 {
            "gemm (weight gradients)"
        } else {
            "gemm (linear)"
        };
        self.time(name, || self.inner.gemm(g, a, b, c))
    }
    fn encoder_fwd(
        &self,
        out: &mut B::Buf,
        ids: &B::Ids,
        params: &B::Buf,
        wte: usize,
        wpe: usize,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        self.time("encoder_fwd", || {
            self.inner.encoder_fwd(out, ids, params, wte, wpe, b, t, c)
        })
    }
    fn encoder_bwd(
        &self,
        grads: &mut B::Buf,
        dwte: usize,
        dwpe: usize,
        dout: &B::Buf,
        ids: &B::Ids,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        self.time("encoder_bwd", || {
            self.inner
                .encoder_bwd(grads, dwte, dwpe, dout, ids, b, t, c)
        })
    }
    fn layernorm_fwd(
        &self,
        out: &mut B::Buf,
        mean: &mut B::Buf,
        rstd: &mut B::Buf,
        inp: &B::Buf,
        params: &B::Buf,
        w: usize,
        n: usize,
        c: usize,
    ) -> Result<()> {
        self.time("layernorm_fwd", || {
            self.inner
                .layernorm_fwd(out, mean, rstd, inp, params, w, n, c)
        })
    }
    fn layernorm_bwd(
        &self,
        dinp: &mut B::Buf,
        grads: &mut B::Buf,
        dw: usize,
        dout: &B::Buf,
        inp: &B::Buf,
        params: &B::Buf,
        w: usize,
        mean: &B::Buf,
        rstd: &B::Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        self.time("layernorm_bwd", || {
            self.inner
                .layernorm_bwd(dinp, grads, dw, dout, inp, params, w, mean, rstd, n, c)
        })
    }
    fn bias_fwd(
        &self,
        out: &mut B::Buf,
        params: &B::Buf,
        bias: usize,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        self.time("bias_fwd", || self.inner.bias_fwd(out, params, bias, n, oc))
    }
    fn bias_bwd(
        &self,
        grads: &mut B::Buf,
        dbias: usize,
        dout: &B::Buf,
        n: usize,
        oc: usize,
    ) -> Result<()> {
        self.time("bias_bwd", || {
            self.inner.bias_bwd(grads, dbias, dout, n, oc)
        })
    }
    fn gelu_fwd(&self, out: &mut B::Buf, inp: &B::Buf, n: usize) -> Result<()> {
        self.time("gelu_fwd", || self.inner.gelu_fwd(out, inp, n))
    }
    fn gelu_bwd(&self, dinp: &mut B::Buf, inp: &B::Buf, dout: &B::Buf, n: usize) -> Result<()> {
        self.time("gelu_bwd", || self.inner.gelu_bwd(dinp, inp, dout, n))
    }
    fn relu_fwd(&self, out: &mut B::Buf, inp: &B::Buf, n: usize) -> Result<()> {
        self.time("relu_fwd", || self.inner.relu_fwd(out, inp, n))
    }
    fn relu_bwd(&self, dinp: &mut B::Buf, out: &B::Buf, dout: &B::Buf, n: usize) -> Result<()> {
        self.time("relu_bwd", || self.inner.relu_bwd(dinp, out, dout, n))
    }
    fn add(&self, out: &mut B::Buf, a: &B::Buf, b: &B::Buf, n: usize) -> Result<()> {
        self.time("add", || self.inner.add(out, a, b, n))
    }
    fn permute_qkv(
        &self,
        qkvr: &mut B::Buf,
        qkv: &B::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        self.time("permute", || {
            self.inner.permute_qkv(qkvr, qkv, b, t, nh, hs)
        })
    }
    fn permute_qkv_bwd(
        &self,
        dqkv: &mut B::Buf,
        dqkvr: &B::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
    ) -> Result<()> {
        self.time("permute", || {
            self.inner.permute_qkv_bwd(dqkv, dqkvr, b, t, nh, hs)
        })
    }
    fn unpermute(
        &self,
        out: &mut B::Buf,
        inp: &B::Buf,
        b: usize,
        t: usize,
        nh: usize,
        hs: usize,
        forward: bool,
    ) -> Result<()> {
        self.time("permute", || {
            self.inner.unpermute(out, inp, b, t, nh, hs, forward)
        })
    }
    fn softmax_causal_fwd(
        &self,
        att: &mut B::Buf,
        preatt: &B::Buf,
        scale: f32,
        rows: usize,
        t: usize,
    ) -> Result<()> {
        self.time("softmax_fwd", || {
            self.inner.softmax_causal_fwd(att, preatt, scale, rows, t)
        })
    }
    fn softmax_causal_bwd(
        &self,
        dpreatt: &mut B::Buf,
        datt: &B::Buf,
        att: &B::Buf,
        scale: f32,
        rows: usize,
        t: usize,
    ) -> Result<()> {
        self.time("softmax_bwd", || {
            self.inner
                .softmax_causal_bwd(dpreatt, datt, att, scale, rows, t)
        })
    }
    fn crossentropy(
        &self,
        losses: &mut B::Buf,
        logits: &mut B::Buf,
        targets: &B::Ids,
        n: usize,
        v: usize,
        vp: usize,
        dloss: f32,
        grad: bool,
    ) -> Result<()> {
        self.time("crossentropy", || {
            self.inner
                .crossentropy(losses, logits, targets, n, v, vp, dloss, grad)
        })
    }
    fn sum_squares(&self, buf: &B::Buf, off: usize, len: usize) -> Result<f64> {
        self.time("sum_squares", || self.inner.sum_squares(buf, off, len))
    }
    fn adamw(
        &self,
        params: &mut B::Buf,
        grads: &B::Buf,
        m: &mut B::Buf,
        v: &mut B::Buf,
        off: usize,
        len: usize,
        s: &AdamStep,
    ) -> Result<()> {
        self.time("adamw", || {
            self.inner.adamw(params, grads, m, v, off, len, s)
        })
    }
}
