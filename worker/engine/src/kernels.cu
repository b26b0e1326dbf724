// The CUDA backend's kernels, compiled by NVRTC once per process (see cuda.rs). Each runs one
// primitive of backend.rs's Kernel the way the CPU backend (cpu.rs) does; shapes and names
// follow llm.c.
//
// Activation operands (void pointers) are FP32 or bf16, as their buffers are: the last
// argument, dt, has bit k set when the k-th of a kernel's activation operands (in the order of
// its signature, as each kernel's comment lists them) is bf16. Loads widen to FP32, all
// arithmetic is FP32, and stores round to bf16 (nearest, ties to even) where the destination
// is bf16. Parameters, their gradients, optimizer state and statistics are always FP32
// (float pointers).

#define WARP 32
// NVRTC has no math.h: infinity by its bits.
#define NEG_INF (-__int_as_float(0x7f800000))

// bf16 bits to FP32 (exact).
__device__ __forceinline__ float bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned)b) << 16);
}

// FP32 to bf16 bits, rounded to nearest with ties to even, NaN kept a quiet NaN: bf16.rs's
// to_bits. No cuda_bf16.h (NVRTC would need its include path): three integer operations.
__device__ __forceinline__ unsigned short f32_to_bf16(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Element i of activation operand p, bf16 when bf.
__device__ __forceinline__ float ld(const void* p, long i, int bf) {
    return bf ? bf16_to_f32(((const unsigned short*)p)[i]) : ((const float*)p)[i];
}

// Stores v as element i of activation operand p, rounded to bf16 when bf.
__device__ __forceinline__ void st(void* p, long i, float v, int bf) {
    if (bf) {
        ((unsigned short*)p)[i] = f32_to_bf16(v);
    } else {
        ((float*)p)[i] = v;
    }
}

// Whether activation operand k of a kernel is bf16.
#define BF(k) ((dt >> (k)) & 1)

// v as an operand stores it: rounded to bf16 when bf. A fused kernel reads back what its first
// half stores through this, so that it computes what the two kernels it replaces do.
__device__ __forceinline__ float stored(float v, int bf) {
    return bf ? bf16_to_f32(f32_to_bf16(v)) : v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// out[i, :] = table[ids[i], :] for N rows of W (an embedding lookup). Index arithmetic in 32
// bits (the host checks sizes below 2^31): 64-bit division is slow. Activations: out, table.
extern "C" __global__ void gather_rows(void* out, const void* table, const int* ids, int N,
                                       int W, int dt) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)N * W) return;
    unsigned r = i / (unsigned)W;
    unsigned c = i - r * W;
    st(out, i, ld(table, (long)ids[r] * W + c, BF(1)), BF(0));
}

// table[ids[i], :] += src[i, :] for N rows of W (an embedding's gradient); atomic, so repeated
// ids add up in any order. Activations: src (the table is FP32).
extern "C" __global__ void scatter_add_rows(float* table, const void* src, const int* ids, int N,
                                            int W, int dt) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)N * W) return;
    unsigned r = i / (unsigned)W;
    unsigned c = i - r * W;
    atomicAdd(&table[(long)ids[r] * W + c], ld(src, i, BF(0)));
}

// One warp per row. Activations: out, inp.
extern "C" __global__ void layernorm_fwd(void* out, float* mean, float* rstd, const void* inp,
                                         const float* w, const float* b, int N, int C, int dt) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= N) return;
    long x = row * C;
    float s = 0.0f;
    for (int i = lane; i < C; i += WARP) s += ld(inp, x + i, BF(1));
    float m = warp_sum(s) / C;
    float v = 0.0f;
    for (int i = lane; i < C; i += WARP) { float d = ld(inp, x + i, BF(1)) - m; v += d * d; }
    float r = rsqrtf(warp_sum(v) / C + 1e-5f);
    for (int i = lane; i < C; i += WARP) {
        st(out, x + i, (ld(inp, x + i, BF(1)) - m) * r * w[i] + b[i], BF(0));
    }
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// sum = a + bb, then layernorm_fwd of sum as stored, one warp per row: binary's add and
// layernorm_fwd in one pass (the same sums in the same order). Activations: sum, out, a, bb.
extern "C" __global__ void residual_layernorm(void* sum, void* out, float* mean, float* rstd,
                                              const void* a, const void* bb, const float* w,
                                              const float* b, int N, int C, int dt) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= N) return;
    long x = row * C;
    float s = 0.0f;
    for (int i = lane; i < C; i += WARP) {
        float v = stored(ld(a, x + i, BF(2)) + ld(bb, x + i, BF(3)), BF(0));
        st(sum, x + i, v, BF(0));
        s += v;
    }
    float m = warp_sum(s) / C;
    // Each lane reads back only what it wrote.
    float v = 0.0f;
    for (int i = lane; i < C; i += WARP) { float d = ld(sum, x + i, BF(0)) - m; v += d * d; }
    float r = rsqrtf(warp_sum(v) / C + 1e-5f);
    for (int i = lane; i < C; i += WARP) {
        st(out, x + i, (ld(sum, x + i, BF(0)) - m) * r * w[i] + b[i], BF(1));
    }
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}

// One warp per row; accumulates into dinp. Activations: dinp, dout, inp.
extern "C" __global__ void layernorm_bwd_input(void* dinp, const void* dout, const void* inp,
                                               const float* w, const float* mean,
                                               const float* rstd, int N, int C, int dt) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= N) return;
    long x = row * C;
    float m = mean[row], r = rstd[row];
    float a = 0.0f, bb = 0.0f;
    for (int i = lane; i < C; i += WARP) {
        float dn = w[i] * ld(dout, x + i, BF(1));
        a += dn;
        bb += dn * (ld(inp, x + i, BF(2)) - m) * r;
    }
    a = warp_sum(a) / C;
    bb = warp_sum(bb) / C;
    for (int i = lane; i < C; i += WARP) {
        float norm = (ld(inp, x + i, BF(2)) - m) * r;
        float g = (w[i] * ld(dout, x + i, BF(1)) - a - norm * bb) * r;
        st(dinp, x + i, ld(dinp, x + i, BF(0)) + g, BF(0));
    }
}

// Column sums over a chunk of rows per block row, added atomically: dw += sum norm * dout,
// db += sum dout. Activations: dout, inp.
extern "C" __global__ void layernorm_bwd_params(float* dw, float* db, const void* dout,
                                                const void* inp, const float* mean,
                                                const float* rstd, int N, int C, int chunk,
                                                int dt) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    long r0 = (long)blockIdx.y * chunk;
    long r1 = r0 + chunk < (long)N ? r0 + chunk : (long)N;
    float aw = 0.0f, ab = 0.0f;
    for (long r = r0; r < r1; r++) {
        float d = ld(dout, r * C + c, BF(0));
        aw += (ld(inp, r * C + c, BF(1)) - mean[r]) * rstd[r] * d;
        ab += d;
    }
    atomicAdd(&dw[c], aw);
    atomicAdd(&db[c], ab);
}

// out[i, :] += b for N rows of OC (a bias; the position embedding, one row of T x C).
// Activations: out, b.
extern "C" __global__ void add_row(void* out, const void* b, int N, int OC, int dt) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)N * OC) return;
    st(out, i, ld(out, i, BF(0)) + ld(b, i % (unsigned)OC, BF(1)), BF(0));
}

// db += the column sums of N rows of OC: a chunk of rows per block row, added atomically.
// Activations: dout (db is FP32).
extern "C" __global__ void sum_rows(float* db, const void* dout, int N, int OC, int chunk,
                                   int dt) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= OC) return;
    long r0 = (long)blockIdx.y * chunk;
    long r1 = r0 + chunk < (long)N ? r0 + chunk : (long)N;
    float a = 0.0f;
    for (long r = r0; r < r1; r++) a += ld(dout, r * OC + c, BF(0));
    atomicAdd(&db[c], a);
}

#define GELU_SCALE 0.7978845608f

// GELU, tanh approximation: unary's and bias_gelu's.
__device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
}
// The codes of UnaryOp and BinaryOp (unary_code and binary_code in cuda.rs).
#define OP_GELU 0
#define OP_RELU 1
#define OP_SIGMOID 2
#define OP_TANH 3
#define OP_COS 4
#define OP_ADD 0
#define OP_SUB 1
#define OP_MUL 2

// out = op(inp) over n values. Activations: out, inp.
extern "C" __global__ void unary(void* out, const void* inp, long n, int op, int dt) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = ld(inp, i, BF(1));
    float y;
    switch (op) {
    case OP_GELU: y = gelu(x); break;
    case OP_RELU: y = fmaxf(x, 0.0f); break;
    case OP_SIGMOID: y = 1.0f / (1.0f + expf(-x)); break;
    case OP_COS: y = cosf(x); break;
    default: y = tanhf(x); break;
    }
    st(out, i, y, BF(0));
}

// dinp = op'(inp) * dout over n values, from the forward pass's input. Activations: dinp, inp,
// dout.
extern "C" __global__ void unary_bwd(void* dinp, const void* inp, const void* dout, long n,
                                     int op, int dt) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = ld(inp, i, BF(1));
    float d = ld(dout, i, BF(2));
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
    st(dinp, i, r, BF(0));
}

// pre[i, :] += b for N rows of W, then out = gelu(pre as stored): add_row and unary's GELU in
// one pass. Activations: out, pre.
extern "C" __global__ void bias_gelu(void* out, void* pre, const float* b, int N, int W, int dt) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (unsigned)N * W) return;
    float x = stored(ld(pre, i, BF(1)) + b[i % (unsigned)W], BF(1));
    st(pre, i, x, BF(1));
    st(out, i, gelu(x), BF(0));
}

// out = op(a, b) over n values. Activations: out, a, b.
extern "C" __global__ void binary(void* out, const void* a, const void* b, long n, int op,
                                  int dt) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = ld(a, i, BF(1)), y = ld(b, i, BF(2));
    st(out, i, op == OP_ADD ? x + y : op == OP_SUB ? x - y : x * y, BF(0));
}

// out = inp with its axes reordered (backend.rs's Permutation): output axis a, in the last 6 -
// first of 6 slots, has size dN and steps sN through the input. Activations: out, inp.
extern "C" __global__ void permute(void* out, const void* inp, int n, int first, int d0,
                                   int d1, int d2, int d3, int d4, int d5, int s0, int s1,
                                   int s2, int s3, int s4, int s5, int dt) {
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
    st(out, i, ld(inp, src, BF(1)), BF(0));
}

// One warp per row of T scores, of N rows. With causal, row r is query t1 = r % T of block
// r / T and sees the scores up to t1; without, it sees all T. Activations: att, preatt.
extern "C" __global__ void softmax_fwd(void* att, const void* preatt, float scale, int N, int T,
                                       int causal, int dt) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= N) return;
    int t1 = causal ? row % T : T - 1;
    long x = row * T;
    float mx = NEG_INF;
    for (int i = lane; i <= t1; i += WARP) mx = fmaxf(mx, ld(preatt, x + i, BF(1)) * scale);
    mx = warp_max(mx);
    float s = 0.0f;
    for (int i = lane; i <= t1; i += WARP) s += expf(ld(preatt, x + i, BF(1)) * scale - mx);
    float inv = 1.0f / warp_sum(s);
    for (int i = lane; i < T; i += WARP) {
        float p = i <= t1 ? expf(ld(preatt, x + i, BF(1)) * scale - mx) * inv : 0.0f;
        st(att, x + i, p, BF(0));
    }
}

// Activations: dpreatt, datt, att.
extern "C" __global__ void softmax_bwd(void* dpreatt, const void* datt, const void* att,
                                       float scale, int N, int T, int causal, int dt) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= N) return;
    int t1 = causal ? row % T : T - 1;
    long x = row * T;
    float dot = 0.0f;
    for (int i = lane; i <= t1; i += WARP) dot += ld(att, x + i, BF(2)) * ld(datt, x + i, BF(1));
    dot = warp_sum(dot);
    for (int i = lane; i < T; i += WARP) {
        float g = i <= t1 ? scale * ld(att, x + i, BF(2)) * (ld(datt, x + i, BF(1)) - dot) : 0.0f;
        st(dpreatt, x + i, g, BF(0));
    }
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

// One block per row of logits. Activations: logits.
extern "C" __global__ void crossentropy(float* losses, void* logits, const int* targets, int N,
                                        int V, int Vp, float dloss, int grad, int dt) {
    __shared__ float shared[WARP];
    long row = blockIdx.x;
    if (row >= N) return;
    long x = row * Vp;
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, ld(logits, x + i, BF(0)));
    mx = block_max(mx, shared);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(ld(logits, x + i, BF(0)) - mx);
    s = block_sum(s, shared);
    int target = targets[row];
    float xt = ld(logits, x + target, BF(0));
    // Every thread has read the row (and the target's logit) before any overwrites it.
    __syncthreads();
    if (threadIdx.x == 0) losses[row] = logf(s) + mx - xt;
    if (!grad) return;
    float inv = 1.0f / s;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float p = i < V ? expf(ld(logits, x + i, BF(0)) - mx) * inv : 0.0f;
        st(logits, x + i, i < V ? dloss * (p - (i == target ? 1.0f : 0.0f)) : 0.0f, BF(0));
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

// out = inp over n values, converted between FP32 and bf16 as the two are stored (rounded to
// nearest, ties to even, into bf16): the FP32 operands of a bf16 GEMM, and copies between
// buffers of the two kinds. Activations: out, inp.
extern "C" __global__ void convert(void* out, const void* inp, long n, int dt) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    st(out, i, ld(inp, i, BF(1)), BF(0));
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

// s . g for HS channels of shared s and of activation g from element off.
__device__ __forceinline__ float dot_shared(const float* s, const void* g, long off, int HS,
                                            int bf) {
    float d = 0.0f;
    for (int c = 0; c < HS; c++) d += s[c] * ld(g, off + c, bf);
    return d;
}

// One warp per query row: keys in tiles of 32, lane l scoring key j0 + l; an online softmax
// rescales the running sum and output at each tile. Writes out (heads, T, HS) and lse.
// Activations: out, qkv.
extern "C" __global__ void attention_fwd(void* out, float* lse, const void* qkv, int heads,
                                         int T, int HS, float scale, int dt) {
    __shared__ float sq[ATT_WARPS][MAX_HS];
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= (long)heads * T) return;
    long n = (long)heads * T * HS;
    long base = row - row % T;
    int i = row % T;
    int bq = BF(1);
    // Offsets of the head's first key and value in qkv.
    long k = n + base * HS;
    long v = 2 * n + base * HS;
    for (int d = lane; d < HS; d += WARP) sq[w][d] = ld(qkv, row * HS + d, bq);
    __syncwarp();
    float acc[PER_LANE];
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) acc[c] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for (int j0 = 0; j0 <= i; j0 += WARP) {
        int j = j0 + lane;
        float s = j <= i ? scale * dot_shared(sq[w], qkv, k + (long)j * HS, HS, bq) : NEG_INF;
        float m_new = fmaxf(m, warp_max(s));
        float corr = expf(m - m_new);
        float p = j <= i ? expf(s - m_new) : 0.0f;
        l = l * corr + warp_sum(p);
        int last = min(WARP, i - j0 + 1);
#pragma unroll
        for (int c = 0; c < PER_LANE; c++) acc[c] *= corr;
        for (int jj = 0; jj < last; jj++) {
            float pj = __shfl_sync(0xffffffff, p, jj);
            long vj = v + (long)(j0 + jj) * HS;
#pragma unroll
            for (int c = 0; c < PER_LANE; c++) {
                int d = lane + c * WARP;
                if (d < HS) acc[c] += pj * ld(qkv, vj + d, bq);
            }
        }
        m = m_new;
    }
    float inv = 1.0f / l;
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) {
        int d = lane + c * WARP;
        if (d < HS) st(out, row * HS + d, acc[c] * inv, BF(0));
    }
    if (lane == 0) lse[row] = m + logf(l);
}

// delta[row] = dout[row] . out[row]: one warp per row. Activations: dout, out.
extern "C" __global__ void attention_delta(float* delta, const void* dout, const void* out,
                                           int rows, int HS, int dt) {
    int lane = threadIdx.x % WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= rows) return;
    float s = 0.0f;
    for (int d = lane; d < HS; d += WARP) {
        s += ld(dout, row * HS + d, BF(0)) * ld(out, row * HS + d, BF(1));
    }
    s = warp_sum(s);
    if (lane == 0) delta[row] = s;
}

// dq of one query row per warp: dq_i = scale * sum over keys j <= i of ds_ij k_j, with
// p_ij = exp(scale q_i.k_j - lse_i) and ds_ij = p_ij (dout_i.v_j - delta_i). Activations:
// dqkv, dout, qkv.
extern "C" __global__ void attention_bwd_dq(void* dqkv, const void* dout, const float* lse,
                                            const float* delta, const void* qkv, int heads,
                                            int T, int HS, float scale, int dt) {
    __shared__ float sq[ATT_WARPS][MAX_HS];
    __shared__ float sdo[ATT_WARPS][MAX_HS];
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= (long)heads * T) return;
    long n = (long)heads * T * HS;
    long base = row - row % T;
    int i = row % T;
    int bq = BF(2);
    long k = n + base * HS;
    long v = 2 * n + base * HS;
    for (int d = lane; d < HS; d += WARP) {
        sq[w][d] = ld(qkv, row * HS + d, bq);
        sdo[w][d] = ld(dout, row * HS + d, BF(1));
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
            float p = expf(scale * dot_shared(sq[w], qkv, k + (long)j * HS, HS, bq) - L);
            ds = p * (dot_shared(sdo[w], qkv, v + (long)j * HS, HS, bq) - D);
        }
        int last = min(WARP, i - j0 + 1);
        for (int jj = 0; jj < last; jj++) {
            float dsj = __shfl_sync(0xffffffff, ds, jj);
            long kj = k + (long)(j0 + jj) * HS;
#pragma unroll
            for (int c = 0; c < PER_LANE; c++) {
                int d = lane + c * WARP;
                if (d < HS) acc[c] += dsj * ld(qkv, kj + d, bq);
            }
        }
    }
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) {
        int d = lane + c * WARP;
        if (d < HS) st(dqkv, row * HS + d, acc[c] * scale, BF(0));
    }
}

// dk and dv of one key row per warp: dk_j = scale * sum over queries i >= j of ds_ij q_i,
// dv_j = sum over the same queries of p_ij dout_i. Activations: dqkv, dout, qkv.
extern "C" __global__ void attention_bwd_dkv(void* dqkv, const void* dout, const float* lse,
                                             const float* delta, const void* qkv, int heads,
                                             int T, int HS, float scale, int dt) {
    __shared__ float sk[ATT_WARPS][MAX_HS];
    __shared__ float sv[ATT_WARPS][MAX_HS];
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (row >= (long)heads * T) return;
    long n = (long)heads * T * HS;
    long base = row - row % T;
    int j = row % T;
    int bq = BF(2), bd = BF(1);
    // Offsets of the head's first query in qkv and first output gradient in dout.
    long q = base * HS;
    long dob = base * HS;
    for (int d = lane; d < HS; d += WARP) {
        sk[w][d] = ld(qkv, n + row * HS + d, bq);
        sv[w][d] = ld(qkv, 2 * n + row * HS + d, bq);
    }
    __syncwarp();
    float acck[PER_LANE], accv[PER_LANE];
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) { acck[c] = 0.0f; accv[c] = 0.0f; }
    for (int i0 = j; i0 < T; i0 += WARP) {
        int i = i0 + lane;
        float p = 0.0f, ds = 0.0f;
        if (i < T) {
            p = expf(scale * dot_shared(sk[w], qkv, q + (long)i * HS, HS, bq) - lse[base + i]);
            ds = p * (dot_shared(sv[w], dout, dob + (long)i * HS, HS, bd) - delta[base + i]);
        }
        int last = min(WARP, T - i0);
        for (int ii = 0; ii < last; ii++) {
            float pi = __shfl_sync(0xffffffff, p, ii);
            float dsi = __shfl_sync(0xffffffff, ds, ii);
            long qi = q + (long)(i0 + ii) * HS;
            long doi = dob + (long)(i0 + ii) * HS;
#pragma unroll
            for (int c = 0; c < PER_LANE; c++) {
                int d = lane + c * WARP;
                if (d < HS) {
                    acck[c] += dsi * ld(qkv, qi + d, bq);
                    accv[c] += pi * ld(dout, doi + d, bd);
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < PER_LANE; c++) {
        int d = lane + c * WARP;
        if (d < HS) {
            st(dqkv, n + row * HS + d, acck[c] * scale, BF(0));
            st(dqkv, 2 * n + row * HS + d, accv[c], BF(0));
        }
    }
}
