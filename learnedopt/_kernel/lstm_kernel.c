/* The coordinatewise LSTM optimizer's hot loops, each fused into one pass over blocks of coordinates.
 *
 * lstm_step is the C twin of learnedopt/lstm/rule.py's LSTMRule.update without autograd, in place: the gradient
 * features (running moments or the paper's log/sign map), every LSTM layer, the head and the output map run per
 * block of BLOCK coordinates whose working set stays in the L1/L2 cache, so the hidden state is read and written
 * once per step, where the torch path makes a pass over memory per op. learnedopt/_kernel/build.py compiles this file
 * at first use with the net's sizes as constants (-D flags below) and tests it against the torch path
 * (tests/test_kernel.py); the torch path stays the reference and the fallback. cell_forward and cell_backward
 * are one LSTM layer of the differentiable path (learnedopt/lstm/kernel_ops.py's FusedLSTM), tested in tests/test_lstm.py.
 *
 * Compile-time constants: H (hidden size), LAYERS, NK (momentum decays), PAPER (1: log/sign inputs, 0:
 * normalized moments), ADAM (1: bounded Adam-modulating output, 0: linear), OUT (head outputs), BF16 (1: the
 * hidden state is stored as bfloat16), GP (4 H rounded up to 16 floats, the padded gate row).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VW 16                          /* floats per vector: one AVX-512 register */
#define ROWS 4                         /* rows per register tile of the gate matmul (32..128 and 2..6 measured */
                                       /* within 5% of these on an AVX-512 CPU) */
#else
#define VW 8                           /* one AVX register, two NEON ones: with 16-float vectors and 4-row tiles */
#define ROWS 1                         /* the accumulators spill past AVX2's 16 registers (results/performance.md) */
#endif
#define NV (GP / VW)                   /* vectors per padded gate row (GP is a multiple of 16) */
#define IN (PAPER ? 2 : 1 + NK)        /* input features */
#define XW (H > IN ? H : IN)            /* width of a layer's input buffer */
#define BLOCK 64                       /* coordinates per block: gates 64 x GP floats stay in the L1/L2 cache */
#define MAX_THREADS 64
#define GRAD_LIMIT 9223372036854775808.0f  /* 2^63: learnedopt/lstm/features.py's largest_gradient(float32) */

typedef float vf __attribute__((vector_size(VW * sizeof(float)), aligned(4)));  /* loads need no alignment */

#if BF16
typedef uint16_t state_t;
static inline float load_state(state_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
/* round to nearest even, as torch's float -> bfloat16 conversion (the state is finite: no NaN case) */
static inline state_t store_state(float f) {
    uint32_t u; memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u); return (state_t)(u >> 16);
}
#else
typedef float state_t;
static inline float load_state(state_t v) { return v; }
static inline state_t store_state(float f) { return f; }
#endif

/* exp(x) by range reduction to [-ln2/2, ln2/2] and a degree-6 polynomial (Cephes' coefficients), within ~2 ulp.
 * Branch-free so that the compiler vectorizes it: n = round(x / ln2) by the 1.5 * 2^23 shift, whose low
 * mantissa bits then hold n, and 2^n is built from those bits. Inputs are clamped to where 2^n is a normal float
 * (with ternaries: fminf/fmaxf would block vectorization). */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float shifted = x * 1.44269504088896341f + 12582912.0f;
    float n = shifted - 12582912.0f;
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { float f; int32_t i; } bits = {shifted};
    bits.i = (bits.i - 0x4B400000 + 127) << 23;
    return p * bits.f;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
static inline float tanh_(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

/* torch.lerp(start, end, weight) with torch's two formulas (the same rounding as the reference) */
static inline float lerp(float start, float end, float weight) {
    return weight < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.0f - weight);
}

typedef struct {
    int64_t n;                   /* coordinates of this tensor */
    const float *grad;           /* (n,) the gradient; non-finite coordinates are skipped */
    state_t *h, *c;              /* (LAYERS, n, H) hidden and cell state, updated in place */
    float *m, *v;                /* (NK, n) momenta and (n,) second moment, updated in place (moment nets) */
    float *update;               /* (n,) out: the additive update before the learning rate */
    const float *weights;        /* per layer: (in + H + 1, GP) gate weights, transposed, bias last, padded */
    const float *head;           /* (OUT, H + 1): head weights, bias last */
    const float *scalars;        /* see the S_* indices */
} args_t;

/* scalars[]: float32 constants of the net and of this step, computed by the caller as the torch path rounds them */
enum { S_BETA2, S_BIAS2, S_OUTPUT_SCALE, S_LOG_RANGE, S_P, S_THRESHOLD, S_EXP_P, S_DECAYS, S_BIAS1 = S_DECAYS + 8 };

/* One LSTM layer for the rows of a block: gates = [x, h, 1] @ W with ROWS rows in registers, then one sigmoid
 * over all gates (the cell gate's weights come scaled by 2, so 2 sigmoid - 1 is its tanh), c_new = f c + i g and
 * tanh(c_new) = 2 sigmoid(2 c_new) - 1, each loop over the whole block so that it vectorizes. `x` has row stride
 * `x_stride`; rows past `rows` of a partial block are never read. */
static inline void cell_block(int64_t rows, const float *x, int64_t x_stride, int width, const state_t *h,
                              const state_t *c, const float *w, float gates[BLOCK][GP], float c_new[BLOCK][H],
                              float tanh_c[BLOCK][H]) {
    const vf *wv = (const vf *)w;          /* row k of the transposed weights: NV vectors */
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        vf acc[ROWS][NV];
        int tile = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
        for (int t = 0; t < ROWS; t++)
            for (int j = 0; j < NV; j++) acc[t][j] = wv[(width + H) * NV + j];  /* the bias row */
        for (int k = 0; k < width; k++)
            for (int t = 0; t < ROWS; t++) {
                float xv = t < tile ? x[(r0 + t) * x_stride + k] : 0.0f;
                for (int j = 0; j < NV; j++) acc[t][j] += xv * wv[k * NV + j];
            }
        for (int k = 0; k < H; k++)
            for (int t = 0; t < ROWS; t++) {
                float hv = t < tile ? load_state(h[(r0 + t) * H + k]) : 0.0f;
                for (int j = 0; j < NV; j++) acc[t][j] += hv * wv[(width + k) * NV + j];
            }
        for (int t = 0; t < tile; t++)
            for (int j = 0; j < NV; j++) memcpy(&gates[r0 + t][j * VW], &acc[t][j], sizeof(vf));
    }
    float *flat = &gates[0][0];
    for (int64_t j = 0; j < rows * GP; j++) flat[j] = sigmoid(flat[j]);
    for (int64_t r = 0; r < rows; r++)
        for (int j = 0; j < H; j++)
            c_new[r][j] = gates[r][H + j] * load_state(c[r * H + j])             /* f c + i g, with the */
                          + gates[r][j] * (2.0f * gates[r][2 * H + j] - 1.0f);   /* candidate g a tanh */
    const float *c_flat = &c_new[0][0];
    float *t_flat = &tanh_c[0][0];
    for (int64_t j = 0; j < rows * H; j++) t_flat[j] = tanh_(c_flat[j]);
}

static int64_t lstm_block(const args_t *a, int64_t start, int64_t rows) {
    float x[BLOCK][XW];   /* the current layer's input: features, then each layer's new h */
    float gates[BLOCK][GP] __attribute__((aligned(64)));
    float c_new[BLOCK][H], tanh_c[BLOCK][H];
    float nominal[BLOCK] __attribute__((unused));   /* used by moment nets */
    int valid[BLOCK], seen[BLOCK] __attribute__((unused));
    const float *s = a->scalars;
    const int64_t n = a->n;

    /* the features, each loop over the rows of the block so that it vectorizes */
    float g[BLOCK];
    for (int64_t r = 0; r < rows; r++) {
        float grad = a->grad[start + r];
        valid[r] = fabsf(grad) <= GRAD_LIMIT;   /* false for NaN, +-Inf and gradients whose square overflows */
        g[r] = valid[r] ? grad : 0.0f;
    }
#if PAPER
    for (int64_t r = 0; r < rows; r++) {
        float magnitude = fabsf(g[r]);
        int large = magnitude >= s[S_THRESHOLD];
        x[r][0] = large ? logf(fmaxf(magnitude, s[S_THRESHOLD])) / s[S_P] : -1.0f;
        x[r][1] = large ? (float)((g[r] > 0.0f) - (g[r] < 0.0f)) : g[r] * s[S_EXP_P];
    }
#endif
#if !PAPER || ADAM
    float scale[BLOCK];
    float *v = a->v + start;
    for (int64_t r = 0; r < rows; r++) {
        float v_new = valid[r] ? lerp(g[r] * g[r], v[r], s[S_BETA2]) : v[r];   /* a skipped coordinate keeps */
        v[r] = v_new;                                                           /* its moments */
        scale[r] = 1.0f / (sqrtf(v_new / s[S_BIAS2]) + 1e-8f);
        seen[r] = v_new > 0.0f;
    }
    for (int k = 0; k < NK; k++) {
        float *m = a->m + k * n + start;
        float decay = s[S_DECAYS + k], correction = s[S_BIAS1 + k];
        for (int64_t r = 0; r < rows; r++) {
            float m_new = valid[r] ? lerp(g[r], m[r], decay) : m[r];
            m[r] = m_new;
            float normed = m_new / correction * scale[r];
            if (k == 0) nominal[r] = normed;
#if !PAPER
            x[r][1 + k] = normed;
#endif
        }
    }
#if !PAPER
    for (int64_t r = 0; r < rows; r++) x[r][0] = g[r] * scale[r];
#endif
#endif

    const float *w = a->weights;
    int width = IN;
    for (int layer = 0; layer < LAYERS; layer++) {
        state_t *h = a->h + (int64_t)layer * n * H + start * H;
        state_t *c = a->c + (int64_t)layer * n * H + start * H;
        cell_block(rows, &x[0][0], XW, width, h, c, w, gates, c_new, tanh_c);
        for (int64_t r = 0; r < rows; r++)
            for (int j = 0; j < H; j++) {
                float h_new = gates[r][3 * H + j] * tanh_c[r][j];
                x[r][j] = h_new;
                h[r * H + j] = valid[r] ? store_state(h_new) : h[r * H + j];   /* a skipped coordinate keeps */
                c[r * H + j] = valid[r] ? store_state(c_new[r][j]) : c[r * H + j];   /* its state */
            }
        w += (width + H + 1) * GP;
        width = H;
    }

    float raw[OUT][BLOCK];                          /* the head, then the output map: loops over rows */
    for (int o = 0; o < OUT; o++)
        for (int64_t r = 0; r < rows; r++) {
            float sum = a->head[o * (H + 1) + H];
            for (int j = 0; j < H; j++) sum += x[r][j] * a->head[o * (H + 1) + j];
            raw[o][r] = sum - sum == 0.0f ? sum : 0.0f;   /* non-finite (a net's NaN weights) counts as zero */
        }
    for (int64_t r = 0; r < rows; r++) {
#if ADAM
        float magnitude = exp_approx(s[S_LOG_RANGE] * tanh_(raw[0][r]));
        float nominal_step = nominal[r] < -1.0f ? -1.0f : nominal[r] > 1.0f ? 1.0f : nominal[r];
        float step = magnitude * nominal_step - tanh_(raw[1][r]);
        float u = seen[r] ? step * -s[S_OUTPUT_SCALE] : 0.0f;
#else
        float u = raw[0][r] * s[S_OUTPUT_SCALE];
#endif
        a->update[start + r] = valid[r] ? u : 0.0f;
    }
    int64_t skipped = 0;
    for (int64_t r = 0; r < rows; r++) skipped += !valid[r];
    return skipped;
}

/* Runs fn over the blocks of [0, n) on `threads` threads, each taking a contiguous range of whole blocks (a thread
 * that cannot be started has its range run on the calling thread), so every block's result is the same whatever
 * the thread count. Thread t accumulates into outs + t * out_size. */
typedef void (*block_fn)(const void *args, int64_t start, int64_t rows, void *out);
typedef struct { block_fn fn; const void *args; int64_t begin, end; void *out; } range_t;

static void *run_range(void *p) {
    range_t *range = p;
    for (int64_t start = range->begin; start < range->end; start += BLOCK) {
        int64_t rows = range->end - start < BLOCK ? range->end - start : BLOCK;
        range->fn(range->args, start, rows, range->out);
    }
    return NULL;
}

static int clamp_threads(int64_t n, int threads) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks) threads = (int)blocks;
    return threads < 1 ? 1 : threads;
}

static void parallel_blocks(int64_t n, int threads, block_fn fn, const void *args, char *outs, size_t out_size) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    range_t ranges[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        ranges[t] = (range_t){fn, args, blocks * t / threads * BLOCK, blocks * (t + 1) / threads * BLOCK,
                              outs + t * out_size};
        if (ranges[t].end > n) ranges[t].end = n;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run_range, &ranges[t]) == 0;
    run_range(&ranges[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_range(&ranges[t]);
    }
}

static void step_block(const void *args, int64_t start, int64_t rows, void *skipped) {
    *(int64_t *)skipped += lstm_block(args, start, rows);
}

/* The optimizer's step for one tensor. Returns the number of coordinates skipped for a non-finite gradient. */
int64_t lstm_step(const args_t *args, int threads) {
    threads = clamp_threads(args->n, threads);
    int64_t skipped[MAX_THREADS] = {0}, total = 0;
    parallel_blocks(args->n, threads, step_block, args, (char *)skipped, sizeof(int64_t));
    for (int t = 0; t < threads; t++) total += skipped[t];
    return total;
}

#if !BF16
/* One LSTM cell of the differentiable path (meta-training): the forward saves the gates' sigmoids and tanh(c_new)
 * for the backward, which returns the gradients of the cell's inputs and of its (transposed) gate weights.
 * Built with a float32 state; the input width must not exceed H (true of every LSTMConfig's layers but for
 * unusually many input features, which run on torch ops). */
#define KP (((2 * H) + 15) / 16 * 16)   /* the widest [x, h] row, padded to 16 floats as lstm.py pads it */
#define KV (KP / VW)

typedef struct {
    int64_t n, width, outputs;
    const float *x, *h, *c;           /* (n, width), (n, H), (n, H) */
    const float *weights;             /* (width + H + 1, GP): [W_ih, W_hh, b] transposed, as for lstm_step */
    const float *head;                /* the last layer's (outputs, H + 1) head, bias last; NULL for the others */
    float *new_h, *new_c, *raw;       /* out: (n, H), (n, H), and (n, outputs) where head is given */
} cell_forward_t;

static void cell_forward_block(const cell_forward_t *a, int64_t start, int64_t rows) {
    float gates[BLOCK][GP] __attribute__((aligned(64)));
    float c_new[BLOCK][H], tanh_c[BLOCK][H];
    cell_block(rows, a->x + start * a->width, a->width, (int)a->width, a->h + start * H, a->c + start * H,
               a->weights, gates, c_new, tanh_c);
    for (int64_t r = 0; r < rows; r++) {
        int64_t i = start + r;
        for (int j = 0; j < H; j++) {
            a->new_h[i * H + j] = gates[r][3 * H + j] * tanh_c[r][j];
            a->new_c[i * H + j] = c_new[r][j];
        }
        for (int o = 0; a->head && o < a->outputs; o++) {
            const float *w = a->head + o * (H + 1);
            float sum = w[H];
            for (int j = 0; j < H; j++) sum += a->new_h[i * H + j] * w[j];
            a->raw[i * a->outputs + o] = sum;
        }
    }
}

/* One thread: between the unroll's torch ops, torch's OpenMP workers still spin on the other cores, and threads
 * started here measured slower (benchmarks/meta_train_cost.py at --threads 2). */
void cell_forward(const cell_forward_t *args) {
    for (int64_t start = 0; start < args->n; start += BLOCK)
        cell_forward_block(args, start, args->n - start < BLOCK ? args->n - start : BLOCK);
}

typedef struct {
    int64_t n, width, outputs;
    const float *grad_h, *grad_h2, *grad_c;   /* (n, H) the new state's gradients; grad_h2 (may be NULL) is added
                                                 to grad_h: the next layer's share */
    const float *head, *grad_raw;     /* the last layer: its head and the (n, outputs) raw outputs' gradient */
    float *grad_head;                 /* out, with head: (outputs, H + 1), accumulated */
    const float *x, *h, *c;           /* the forward's inputs: its gates are recomputed, not stored */
    const float *weights;             /* the forward's (width + H + 1, GP) transposed weights */
    const float *weight_rows;         /* (4 H, KP): [W_ih, W_hh] untransposed, zero-padded */
    float *grad_weight;               /* out: (width + H + 1, GP), the transposed weights' gradient */
    float *grad_x, *grad_h_old, *grad_c_old;   /* out, each may be NULL: (n, width), (n, H), (n, H) */
} cell_backward_t;

static void cell_backward_block(const cell_backward_t *a, int64_t start, int64_t rows) {
    float *grad_weight = a->grad_weight;
    const int64_t width = a->width;
    float dg[BLOCK][GP] __attribute__((aligned(64)));   /* the gates' pre-activation gradients */
    float gates[BLOCK][GP] __attribute__((aligned(64)));
    float c_new[BLOCK][H], tanh_c[BLOCK][H];
    /* recomputing the block's gates measured faster than storing them in the forward: (n, 5 H) floats of fresh
     * memory per layer and step cost more in page faults and traffic than the matmul costs here */
    cell_block(rows, a->x + start * width, width, (int)width, a->h + start * H, a->c + start * H, a->weights,
               gates, c_new, tanh_c);
    float from_above[BLOCK][H];   /* new_h's gradient from above: the next layer's input, or the head */
    for (int64_t r = 0; r < rows; r++)
        for (int j = 0; j < H; j++) from_above[r][j] = a->grad_h2 ? a->grad_h2[(start + r) * H + j] : 0.0f;
    for (int64_t r = 0; a->head && r < rows; r++)   /* through raw = head(new_h) */
        for (int k = 0; k < a->outputs; k++) {
            float grad_raw = a->grad_raw[(start + r) * a->outputs + k];
            for (int j = 0; j < H; j++) from_above[r][j] += grad_raw * a->head[k * (H + 1) + j];
            for (int j = 0; j < H; j++) a->grad_head[k * (H + 1) + j] += grad_raw * gates[r][3 * H + j] * tanh_c[r][j];
            a->grad_head[k * (H + 1) + H] += grad_raw;
        }
    for (int64_t r = 0; r < rows; r++) {
        const int64_t i = start + r;
        const float *sig = gates[r];
        for (int j = 0; j < H; j++) {
            float in = sig[j], f = sig[H + j], g = sig[2 * H + j], o = sig[3 * H + j];
            float t = tanh_c[r][j], gh = a->grad_h[i * H + j] + from_above[r][j];
            float gc = a->grad_c[i * H + j] + gh * o * (1.0f - t * t);   /* through new_h = o tanh(new_c) */
            dg[r][j] = gc * (2.0f * g - 1.0f) * in * (1.0f - in);
            dg[r][H + j] = gc * a->c[i * H + j] * f * (1.0f - f);
            dg[r][2 * H + j] = gc * in * 2.0f * g * (1.0f - g);         /* candidate = 2 sigmoid(gate) - 1 */
            dg[r][3 * H + j] = gh * t * o * (1.0f - o);
            if (a->grad_c_old) a->grad_c_old[i * H + j] = gc * f;
        }
        for (int j = 4 * H; j < GP; j++) dg[r][j] = 0.0f;
    }
    if (a->grad_x || a->grad_h_old) {   /* [grad_x, grad_h_old] = dg @ [W_ih, W_hh], ROWS rows in registers */
        const vf *wr = (const vf *)a->weight_rows;
        for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
            vf acc[ROWS][KV];
            int tile = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
            for (int t = 0; t < ROWS; t++)
                for (int v = 0; v < KV; v++) acc[t][v] = (vf){0};
            for (int j = 0; j < 4 * H; j++)
                for (int t = 0; t < ROWS; t++) {
                    float d = t < tile ? dg[r0 + t][j] : 0.0f;
                    for (int v = 0; v < KV; v++) acc[t][v] += d * wr[j * KV + v];
                }
            for (int t = 0; t < tile; t++) {
                float row[KP];
                memcpy(row, acc[t], sizeof row);
                const int64_t i = start + r0 + t;
                if (a->grad_x) memcpy(a->grad_x + i * width, row, width * sizeof(float));
                if (a->grad_h_old) memcpy(a->grad_h_old + i * H, row + width, H * sizeof(float));
            }
        }
    }
    const vf *dgv = (const vf *)&dg[0][0];   /* grad_weight[k] += sum over rows of [x, h, 1][k] * dg */
    for (int64_t k = 0; k < width + H + 1; k++) {
        vf acc[NV];
        memcpy(acc, grad_weight + k * GP, sizeof acc);
        for (int64_t r = 0; r < rows; r++) {
            const int64_t i = start + r;
            float in = k < width ? a->x[i * width + k] : k < width + H ? a->h[i * H + k - width] : 1.0f;
            for (int v = 0; v < NV; v++) acc[v] += in * dgv[r * NV + v];
        }
        memcpy(grad_weight + k * GP, acc, sizeof acc);
    }
}

/* One thread, as cell_forward. grad_weight (and grad_head) accumulate: the caller zeroes them. */
void cell_backward(const cell_backward_t *args) {
    for (int64_t start = 0; start < args->n; start += BLOCK)
        cell_backward_block(args, start, args->n - start < BLOCK ? args->n - start : BLOCK);
}
#endif
