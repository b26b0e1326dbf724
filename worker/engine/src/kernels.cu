// The CUDA backend's kernels, compiled by NVRTC once per process (see cuda.rs). Each runs one
// primitive of backend.rs's Kernel the way the CPU backend (cpu.rs) does; shapes and names
// follow llm.c.

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

// out[i, :] = table[ids[i], :] for N rows of W (an embedding lookup). Index arithmetic in 32
// bits (the host checks sizes below 2^31): 64-bit division is slow.
extern "C" __global__ void gather_rows(float* out, const float* table, const int* ids, int N,
                                       int W) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)N * W) return;
    unsigned r = i / (unsigned)W;
    unsigned c = i - r * W;
    out[i] = table[(long)ids[r] * W + c];
}

// table[ids[i], :] += src[i, :] for N rows of W (an embedding's gradient); atomic, so repeated
// ids add up in any order.
extern "C" __global__ void scatter_add_rows(float* table, const float* src, const int* ids, int N,
                                            int W) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)N * W) return;
    unsigned r = i / (unsigned)W;
    unsigned c = i - r * W;
    atomicAdd(&table[(long)ids[r] * W + c], src[i]);
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

// out[i, :] += b for N rows of OC (a bias; the position embedding, one row of T x C).
extern "C" __global__ void add_row(float* out, const float* b, int N, int OC) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)N * OC) return;
    out[i] += b[i % (unsigned)OC];
}

// db += the column sums of N rows of OC: a chunk of rows per block row, added atomically.
extern "C" __global__ void sum_rows(float* db, const float* dout, int N, int OC, int chunk) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= OC) return;
    long r0 = (long)blockIdx.y * chunk;
    long r1 = r0 + chunk < (long)N ? r0 + chunk : (long)N;
    float a = 0.0f;
    for (long r = r0; r < r1; r++) a += dout[r * OC + c];
    atomicAdd(&db[c], a);
}

#define GELU_SCALE 0.7978845608f
// The codes of UnaryOp and BinaryOp (unary_code and binary_code in cuda.rs).
#define OP_GELU 0
#define OP_RELU 1
#define OP_SIGMOID 2
#define OP_TANH 3
#define OP_COS 4
#define OP_ADD 0
#define OP_SUB 1
#define OP_MUL 2

// out = op(inp) over n values.
extern "C" __global__ void unary(float* out, const float* inp, long n, int op) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = inp[i];
    float y;
    switch (op) {
    case OP_GELU: y = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x))); break;
    case OP_RELU: y = fmaxf(x, 0.0f); break;
    case OP_SIGMOID: y = 1.0f / (1.0f + expf(-x)); break;
    case OP_COS: y = cosf(x); break;
    default: y = tanhf(x); break;
    }
    out[i] = y;
}

// dinp = op'(inp) * dout over n values, from the forward pass's input.
extern "C" __global__ void unary_bwd(float* dinp, const float* inp, const float* dout, long n,
                                     int op) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = inp[i];
    float d = dout[i];
    float r;
    switch (op) {
    case OP_GELU: {
        float th = tanhf(GELU_SCALE * (x + 0.044715f * x * x * x));
        float sech2 = 1.0f - th * th;
        float g = 0.5f * (1.0f + th) + x * 0.5f * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
        r = g * d;
        break;
    }
    case OP_RELU: r = x > 0.0f ? d : 0.0f; break;
    case OP_SIGMOID: {
        float s = 1.0f / (1.0f + expf(-x));
        r = s * (1.0f - s) * d;
        break;
    }
    case OP_COS: r = -sinf(x) * d; break;
    default: {
        float t = tanhf(x);
        r = (1.0f - t * t) * d;
        break;
    }
    }
    dinp[i] = r;
}

// out = op(a, b) over n values.
extern "C" __global__ void binary(float* out, const float* a, const float* b, long n, int op) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = a[i], y = b[i];
    out[i] = op == OP_ADD ? x + y : op == OP_SUB ? x - y : x * y;
}

// out = inp with its axes reordered (backend.rs's Permutation): output axis a, in the last 6 -
// first of 6 slots, has size dN and steps sN through the input.
extern "C" __global__ void permute(float* out, const float* inp, int n, int first, int d0,
                                   int d1, int d2, int d3, int d4, int d5, int s0, int s1,
                                   int s2, int s3, int s4, int s5) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)n) return;
    const unsigned dims[6] = {(unsigned)d0, (unsigned)d1, (unsigned)d2,
                              (unsigned)d3, (unsigned)d4, (unsigned)d5};
    const unsigned strides[6] = {(unsigned)s0, (unsigned)s1, (unsigned)s2,
                                 (unsigned)s3, (unsigned)s4, (unsigned)s5};
    unsigned rem = i, src = 0;
#pragma unroll
    for (int a = 5; a >= 0; a--) {
        if (a >= first) {
            unsigned q = rem / dims[a];
            src += (rem - q * dims[a]) * strides[a];
            rem = q;
        }
    }
    out[i] = inp[src];
}

// One warp per row of T scores, of N rows. With causal, row r is query t1 = r % T of block
// r / T and sees the scores up to t1; without, it sees all T.
extern "C" __global__ void softmax_fwd(float* att, const float* preatt, float scale, int N, int T,
                                       int causal) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= N) return;
    int t1 = causal ? row % T : T - 1;
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

extern "C" __global__ void softmax_bwd(float* dpreatt, const float* datt, const float* att,
                                       float scale, int N, int T, int causal) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= N) return;
    int t1 = causal ? row % T : T - 1;
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

// out = inp rounded to bf16 (nearest, ties to even; NaN kept a quiet NaN) as raw bits, the
// conversion of bf16.rs: the operands of a bf16 GEMM. No cuda_bf16.h (NVRTC would need its
// include path): the rounding is three integer operations.
extern "C" __global__ void to_bf16(unsigned short* out, const float* inp, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned u = __float_as_uint(inp[i]);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out[i] = (unsigned short)((u >> 16) | 0x0040u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    out[i] = (unsigned short)(u >> 16);
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

// Fused causal attention (flash-attention's algorithm, without tensor cores): the kernels of
// Kernel::AttentionFwd and Kernel::AttentionBwd, twins of flash.rs. qkv holds q, k and v one
// after the other, each (heads, T, HS); rows are (head, token) pairs, one warp per row, 8 warps
// a block (THREADS in cuda.rs). A lane owns channels lane, lane + 32, ... of a row, so HS is at
// most MAX_HS.
#define ATT_WARPS 8
#define MAX_HS 128
#define PER_LANE (MAX_HS / WARP)

__device__ __forceinline__ float dot_shared(const float* s, const float* g, int HS) {
    float d = 0.0f;
    for (int c = 0; c < HS; c++) d += s[c] * g[c];
    return d;
}

// One warp per query row: keys in tiles of 32, lane l scoring key j0 + l; an online softmax
// rescales the running sum and output at each tile. Writes out (heads, T, HS) and lse.
extern "C" __global__ void attention_fwd(float* out, float* lse, const float* qkv, int heads,
                                         int T, int HS, float scale) {
    __shared__ float sq[ATT_WARPS][MAX_HS];
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= (long)heads * T) return;
    long n = (long)heads * T * HS;
    long base = row - row % T;
    int i = row % T;
    const float* k = qkv + n + base * HS;
    const float* v = qkv + 2 * n + base * HS;
    for (int d = lane; d < HS; d += WARP) sq[w][d] = qkv[row * HS + d];
    __syncwarp();
    float acc[PER_LANE];
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) acc[c] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for (int j0 = 0; j0 <= i; j0 += WARP) {
        int j = j0 + lane;
        float s = j <= i ? scale * dot_shared(sq[w], k + (long)j * HS, HS) : NEG_INF;
        float m_new = fmaxf(m, warp_max(s));
        float corr = expf(m - m_new);
        float p = j <= i ? expf(s - m_new) : 0.0f;
        l = l * corr + warp_sum(p);
        int last = min(WARP, i - j0 + 1);
#pragma unroll
        for (int c = 0; c < PER_LANE; c++) acc[c] *= corr;
        for (int jj = 0; jj < last; jj++) {
            float pj = __shfl_sync(0xffffffff, p, jj);
            const float* vj = v + (long)(j0 + jj) * HS;
#pragma unroll
            for (int c = 0; c < PER_LANE; c++) {
                int d = lane + c * WARP;
                if (d < HS) acc[c] += pj * vj[d];
            }
        }
        m = m_new;
    }
    float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) {
        int d = lane + c * WARP;
        if (d < HS) out[row * HS + d] = acc[c] * inv;
    }
    if (lane == 0) lse[row] = m + logf(l);
}

// delta[row] = dout[row] . out[row]: one warp per row.
extern "C" __global__ void attention_delta(float* delta, const float* dout, const float* out,
                                           int rows, int HS) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= rows) return;
    float s = 0.0f;
    for (int d = lane; d < HS; d += WARP) s += dout[row * HS + d] * out[row * HS + d];
    s = warp_sum(s);
    if (lane == 0) delta[row] = s;
}

// dq of one query row per warp: dq_i = scale * sum over keys j <= i of ds_ij k_j, with
// p_ij = exp(scale q_i.k_j - lse_i) and ds_ij = p_ij (dout_i.v_j - delta_i).
extern "C" __global__ void attention_bwd_dq(float* dqkv, const float* dout, const float* lse,
                                            const float* delta, const float* qkv, int heads,
                                            int T, int HS, float scale) {
    __shared__ float sq[ATT_WARPS][MAX_HS];
    __shared__ float sdo[ATT_WARPS][MAX_HS];
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= (long)heads * T) return;
    long n = (long)heads * T * HS;
    long base = row - row % T;
    int i = row % T;
    const float* k = qkv + n + base * HS;
    const float* v = qkv + 2 * n + base * HS;
    for (int d = lane; d < HS; d += WARP) {
        sq[w][d] = qkv[row * HS + d];
        sdo[w][d] = dout[row * HS + d];
    }
    __syncwarp();
    float L = lse[row], D = delta[row];
    float acc[PER_LANE];
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) acc[c] = 0.0f;
    for (int j0 = 0; j0 <= i; j0 += WARP) {
        int j = j0 + lane;
        float ds = 0.0f;
        if (j <= i) {
            float p = expf(scale * dot_shared(sq[w], k + (long)j * HS, HS) - L);
            ds = p * (dot_shared(sdo[w], v + (long)j * HS, HS) - D);
        }
        int last = min(WARP, i - j0 + 1);
        for (int jj = 0; jj < last; jj++) {
            float dsj = __shfl_sync(0xffffffff, ds, jj);
            const float* kj = k + (long)(j0 + jj) * HS;
#pragma unroll
            for (int c = 0; c < PER_LANE; c++) {
                int d = lane + c * WARP;
                if (d < HS) acc[c] += dsj * kj[d];
            }
        }
    }
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) {
        int d = lane + c * WARP;
        if (d < HS) dqkv[row * HS + d] = acc[c] * scale;
    }
}

// dk and dv of one key row per warp: dk_j = scale * sum over queries i >= j of ds_ij q_i,
// dv_j = sum over the same queries of p_ij dout_i.
extern "C" __global__ void attention_bwd_dkv(float* dqkv, const float* dout, const float* lse,
                                             const float* delta, const float* qkv, int heads,
                                             int T, int HS, float scale) {
    __shared__ float sk[ATT_WARPS][MAX_HS];
    __shared__ float sv[ATT_WARPS][MAX_HS];
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= (long)heads * T) return;
    long n = (long)heads * T * HS;
    long base = row - row % T;
    int j = row % T;
    const float* q = qkv + base * HS;
    const float* dob = dout + base * HS;
    for (int d = lane; d < HS; d += WARP) {
        sk[w][d] = qkv[n + row * HS + d];
        sv[w][d] = qkv[2 * n + row * HS + d];
    }
    __syncwarp();
    float acck[PER_LANE], accv[PER_LANE];
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) { acck[c] = 0.0f; accv[c] = 0.0f; }
    for (int i0 = j; i0 < T; i0 += WARP) {
        int i = i0 + lane;
        float p = 0.0f, ds = 0.0f;
        if (i < T) {
            p = expf(scale * dot_shared(sk[w], q + (long)i * HS, HS) - lse[base + i]);
            ds = p * (dot_shared(sv[w], dob + (long)i * HS, HS) - delta[base + i]);
        }
        int last = min(WARP, T - i0);
        for (int ii = 0; ii < last; ii++) {
            float pi = __shfl_sync(0xffffffff, p, ii);
            float dsi = __shfl_sync(0xffffffff, ds, ii);
            const float* qi = q + (long)(i0 + ii) * HS;
            const float* doi = dob + (long)(i0 + ii) * HS;
#pragma unroll
            for (int c = 0; c < PER_LANE; c++) {
                int d = lane + c * WARP;
                if (d < HS) {
                    acck[c] += dsi * qi[d];
                    accv[c] += pi * doi[d];
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) {
        int d = lane + c * WARP;
        if (d < HS) {
            dqkv[n + row * HS + d] = acck[c] * scale;
            dqkv[2 * n + row * HS + d] = accv[c];
        }
    }
}
