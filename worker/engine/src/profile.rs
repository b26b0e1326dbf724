//! A backend wrapper that times every primitive: each [`Backend::launch`] (and each copy) waits
//! for the device before and after, so the times are the device's own (and the whole step runs
//! slower than unprofiled). `lockstep-worker bench gpt --profile` prints the table.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::Result;
use crate::backend::{Backend, Kernel};

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
    fn dtype_of(&self, buf: &B::Buf) -> crate::DType {
        self.inner.dtype_of(buf)
    }
    fn activation_dtype(&self) -> crate::DType {
        self.inner.activation_dtype()
    }
    fn activations(&self, n: usize) -> Result<B::Buf> {
        self.inner.activations(n)
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
    fn copy(
        &self,
        dst: &mut B::Buf,
        dst_off: usize,
        src: &B::Buf,
        src_off: usize,
        len: usize,
    ) -> Result<()> {
        self.time("copy", || self.inner.copy(dst, dst_off, src, src_off, len))
    }
    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }
    fn launch(&self, kernel: Kernel<'_, B::Buf, B::Ids>) -> Result<()> {
        self.time(kernel.name(), || self.inner.launch(kernel))
    }
}
