// The CUDA backend's kernels, compiled by NVRTC once per process (see cuda.rs). Each mirrors
// one primitive of the CPU backend (cpu.rs); shapes and names follow llm.c.

#define WARP 32
// NVRTC has no math.h: infinity by its bits.
#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

extern "C" __global__ void encoder_fwd(float* out, const int* ids, const float* wte,
                                       const float* wpe, int B, int T, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)B * T * C) return;
    int c = i % C;
    long bt = i / C;
    int t = bt % T;
    out[i] = wte[(long)ids[bt] * C + c] + wpe[(long)t * C + c];
}

extern "C" __global__ void encoder_bwd(float* dwte, float* dwpe, const float* dout,
                                       const int* ids, int B, int T, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)B * T * C) return;
    int c = i % C;
    long bt = i / C;
    int t = bt % T;
    float d = dout[i];
    atomicAdd(&dwte[(long)ids[bt] * C + c], d);
    atomicAdd(&dwpe[(long)t * C + c], d);
}

// One warp per row.
extern "C" __global__ void layernorm_fwd(float* out, float* mean, float* rstd, const float* inp,
                                         const float* w, const float* b, int N, int C) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= N) return;
    const float* x = inp + row * C;
    float s = 0.0f;
    for (int i = lane; i < C; i += WARP) s += x[i];
    float m = warp_sum(s) / C;
    float v = 0.0f;
    for (int i = lane; i < C; i += WARP) { float d = x[i] - m; v += d * d; }
    float r = rsqrtf(warp_sum(v) / C + 1e-5f);
    float* o = out + row * C;
    for (int i = lane; i < C; i += WARP) o[i] = (x[i] - m) * r * w[i] + b[i];
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// One warp per row; accumulates into dinp.
extern "C" __global__ void layernorm_bwd_input(float* dinp, const float* dout, const float* inp,
                                               const float* w, const float* mean,
                                               const float* rstd, int N, int C) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= N) return;
    const float* x = inp + row * C;
    const float* d = dout + row * C;
    float m = mean[row], r = rstd[row];
    float a = 0.0f, bb = 0.0f;
    for (int i = lane; i < C; i += WARP) {
        float dn = w[i] * d[i];
        a += dn;
        bb += dn * (x[i] - m) * r;
    }
    a = warp_sum(a) / C;
    bb = warp_sum(bb) / C;
    float* di = dinp + row * C;
    for (int i = lane; i < C; i += WARP) {
        float norm = (x[i] - m) * r;
        di[i] += (w[i] * d[i] - a - norm * bb) * r;
    }
}

// Column sums over a chunk of rows per block row, added atomically: dw += sum norm * dout,
// db += sum dout.
extern "C" __global__ void layernorm_bwd_params(float* dw, float* db, const float* dout,
                                                const float* inp, const float* mean,
                                                const float* rstd, int N, int C, int chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    long r0 = (long)blockIdx.y * chunk;
    long r1 = r0 + chunk < (long)N ? r0 + chunk : (long)N;
    float aw = 0.0f, ab = 0.0f;
    for (long r = r0; r < r1; r++) {
        float d = dout[r * C + c];
        aw += (inp[r * C + c] - mean[r]) * rstd[r] * d;
        ab += d;
    }
    atomicAdd(&dw[c], aw);
    atomicAdd(&db[c], ab);
}

// Index arithmetic in 32 bits (the host checks sizes below 2^31): 64-bit division is slow.
extern "C" __global__ void bias_fwd(float* out, const float* b, int N, int OC) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)N * OC) return;
    out[i] += b[i % (unsigned)OC];
}

extern "C" __global__ void bias_bwd(float* db, const float* dout, int N, int OC, int chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= OC) return;
    long r0 = (long)blockIdx.y * chunk;
    long r1 = r0 + chunk < (long)N ? r0 + chunk : (long)N;
    float a = 0.0f;
    for (long r = r0; r < r1; r++) a += dout[r * OC + c];
    atomicAdd(&db[c], a);
}

#define GELU_SCALE 0.7978845608f

extern "C" __global__ void gelu_fwd(float* out, const float* inp, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = inp[i];
    out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
}

extern "C" __global__ void gelu_bwd(float* dinp, const float* inp, const float* dout, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = inp[i];
    float th = tanhf(GELU_SCALE * (x + 0.044715f * x * x * x));
    float sech2 = 1.0f - th * th;
    float g = 0.5f * (1.0f + th) + x * 0.5f * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
    dinp[i] = g * dout[i];
}

extern "C" __global__ void relu_fwd(float* out, const float* inp, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = fmaxf(inp[i], 0.0f);
}

extern "C" __global__ void relu_bwd(float* dinp, const float* out, const float* dout, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dinp[i] = out[i] > 0.0f ? dout[i] : 0.0f;
}

extern "C" __global__ void add(float* out, const float* a, const float* b, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = a[i] + b[i];
}

// qkv (B, T, 3, NH, HS) -> q, k, v each (B, NH, T, HS), one after the other.
extern "C" __global__ void permute_qkv(float* qkvr, const float* qkv, int B, int T, int NH,
                                       int HS, int backward) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned part = (unsigned)B * T * NH * HS;
    if (i >= 3 * part) return;
    unsigned which = i / part;
    unsigned j = i - which * part;
    unsigned d = j % HS;
    unsigned r = j / HS;
    unsigned t = r % T;
    r /= T;
    unsigned h = r % NH;
    unsigned b = r / NH;
    unsigned C = NH * HS;
    unsigned src = (b * T + t) * 3 * C + which * C + h * HS + d;
    if (backward) ((float*)qkv)[src] = qkvr[i];
    else qkvr[i] = qkv[src];
}

// (B, NH, T, HS) -> (B, T, NH, HS) when forward, the other way when not.
extern "C" __global__ void unpermute(float* out, const float* inp, int B, int T, int NH, int HS,
                                     int forward) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)B * T * NH * HS) return;
    unsigned d = i % HS;
    unsigned r = i / HS;
    unsigned t = r % T;
    r /= T;
    unsigned h = r % NH;
    unsigned b = r / NH;
    unsigned other = ((b * T + t) * NH + h) * HS + d;  // (b, t, h, d)
    if (forward) out[other] = inp[i];
    else out[i] = inp[other];
}

// One warp per row of T scores; row r is query t1 = r % T of block r / T.
extern "C" __global__ void softmax_causal_fwd(float* att, const float* preatt, float scale,
                                              int blocks, int T) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= (long)blocks * T) return;
    int t1 = row % T;
    const float* x = preatt + row * T;
    float* o = att + row * T;
    float mx = NEG_INF;
    for (int i = lane; i <= t1; i += WARP) mx = fmaxf(mx, x[i] * scale);
    mx = warp_max(mx);
    float s = 0.0f;
    for (int i = lane; i <= t1; i += WARP) s += expf(x[i] * scale - mx);
    float inv = 1.0f / warp_sum(s);
    for (int i = lane; i < T; i += WARP) o[i] = i <= t1 ? expf(x[i] * scale - mx) * inv : 0.0f;
}

extern "C" __global__ void softmax_causal_bwd(float* dpreatt, const float* datt, const float* att,
                                              float scale, int blocks, int T) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= (long)blocks * T) return;
    int t1 = row % T;
    const float* a = att + row * T;
    const float* d = datt + row * T;
    float* o = dpreatt + row * T;
    float dot = 0.0f;
    for (int i = lane; i <= t1; i += WARP) dot += a[i] * d[i];
    dot = warp_sum(dot);
    for (int i = lane; i < T; i += WARP) o[i] = i <= t1 ? scale * a[i] * (d[i] - dot) : 0.0f;
}

// Block-wide reductions for blockDim.x a multiple of 32, at most 1024.
__device__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x / WARP;
    v = lane < warps ? shared[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v, float* shared) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = blockDim.x / WARP;
    v = lane < warps ? shared[lane] : NEG_INF;
    return warp_max(v);
}

// One block per row of logits.
extern "C" __global__ void crossentropy(float* losses, float* logits, const int* targets, int N,
                                        int V, int Vp, float dloss, int grad) {
    __shared__ float shared[WARP];
    long row = blockIdx.x;
    if (row >= N) return;
    float* x = logits + row * Vp;
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, shared);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(x[i] - mx);
    s = block_sum(s, shared);
    int target = targets[row];
    float xt = x[target];
    __syncthreads();
    if (threadIdx.x == 0) losses[row] = logf(s) + mx - xt;
    if (!grad) return;
    float inv = 1.0f / s;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float p = i < V ? expf(x[i] - mx) * inv : 0.0f;
        x[i] = i < V ? dloss * (p - (i == target ? 1.0f : 0.0f)) : 0.0f;
    }
}

// Per-block partial sums of squares; the host adds the partials.
extern "C" __global__ void sum_squares(float* partial, const float* x, long n) {
    __shared__ float shared[WARP];
    float s = 0.0f;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        s += x[i] * x[i];
    }
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

extern "C" __global__ void adamw(float* params, const float* grads, float* m, float* v, long n,
                                 float lr, float beta1, float beta2, float eps, float wd,
                                 float bc1, float bc2, float grad_scale) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grads[i] * grad_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float mh = mi / bc1, vh = vi / bc2;
    params[i] -= lr * (mh / (sqrtf(vh) + eps) + wd * params[i]);
}
