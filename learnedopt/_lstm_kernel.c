/* One in-place step of the coordinatewise LSTM optimizer for a block of coordinates, fused into one pass.
 *
 * The C twin of learnedopt/lstm.py's LSTMRule.update(..., inplace=True) without autograd: the gradient
 * features (running moments or the paper's log/sign map), every LSTM layer, the head and the output map run per
 * block of BLOCK coordinates whose working set stays in the L1/L2 cache, so the hidden state is read and written
 * once per step, where the torch path makes a pass over memory per op. learnedopt/kernel.py compiles this file
 * at first use with the net's sizes as constants (-D flags below) and tests it against the torch path
 * (tests/test_kernel.py); the torch path stays the reference and the fallback.
 *
 * Compile-time constants: H (hidden size), LAYERS, NK (momentum decays), PAPER (1: log/sign inputs, 0:
 * normalized moments), ADAM (1: bounded Adam-modulating output, 0: linear), OUT (head outputs), BF16 (1: the
 * hidden state is stored as bfloat16), GP (4 H rounded up to the vector width, the padded gate row).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define VW 16                          /* floats per vector: one AVX-512 register, two AVX ones, four NEON ones */
#define NV (GP / VW)                   /* vectors per padded gate row */
#define IN (PAPER ? 2 : 1 + NK)        /* input features */
#define BLOCK 64                       /* coordinates per block: gates 64 x GP floats stay in the L1/L2 cache */
#define ROWS 4                         /* rows per register tile of the gate matmul (32..128 and 2..6 measured */
                                       /* within 5% of these on an AVX-512 CPU) */
#define MAX_THREADS 64

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

static int64_t lstm_block(const args_t *a, int64_t start, int64_t rows) {
    float x[BLOCK][H > IN ? H : IN];   /* the current layer's input: features, then each layer's new h */
    float gates[BLOCK][GP] __attribute__((aligned(64)));
    float c_new[BLOCK][H], tanh_c[BLOCK][H];
    float nominal[BLOCK];
    int valid[BLOCK], seen[BLOCK];
    const float *s = a->scalars;
    const int64_t n = a->n;

    /* the features, each loop over the rows of the block so that it vectorizes */
    float g[BLOCK], scale[BLOCK];
    for (int64_t r = 0; r < rows; r++) {
        float grad = a->grad[start + r];
        valid[r] = grad - grad == 0.0f;         /* false for NaN and +-Inf (isfinite would block vectorization) */
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
        const vf *wv = (const vf *)w;          /* row k of the transposed weights: NV vectors */
        for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {   /* gates = [x, h, 1] @ W, ROWS rows in registers */
            vf acc[ROWS][NV];
            int tile = rows - r0 < ROWS ? (int)(rows - r0) : ROWS;
            for (int t = 0; t < ROWS; t++)
                for (int j = 0; j < NV; j++) acc[t][j] = wv[(width + H) * NV + j];  /* the bias row */
            for (int k = 0; k < width; k++)
                for (int t = 0; t < ROWS; t++) {
                    float xv = t < tile ? x[r0 + t][k] : 0.0f;
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
        /* the cell, each loop over the whole block so that it vectorizes: one sigmoid over all gates, tanh as
         * 2 sigmoid(2x) - 1 (the cell gate's weights come scaled by 2) */
        float *flat = &gates[0][0];
        for (int64_t j = 0; j < rows * GP; j++) flat[j] = sigmoid(flat[j]);
        for (int64_t r = 0; r < rows; r++)
            for (int j = 0; j < H; j++)
                c_new[r][j] = gates[r][H + j] * load_state(c[r * H + j])             /* f c + i g, with the */
                              + gates[r][j] * (2.0f * gates[r][2 * H + j] - 1.0f);   /* candidate g a tanh */
        const float *c_flat = &c_new[0][0];
        float *t_flat = &tanh_c[0][0];
        for (int64_t j = 0; j < rows * H; j++) t_flat[j] = tanh_(c_flat[j]);
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
            raw[o][r] = sum;
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

typedef struct { const args_t *args; int64_t begin, end, skipped; } range_t;

static void *run_range(void *p) {
    range_t *range = p;
    for (int64_t start = range->begin; start < range->end; start += BLOCK) {
        int64_t rows = range->end - start < BLOCK ? range->end - start : BLOCK;
        range->skipped += lstm_block(range->args, start, rows);
    }
    return NULL;
}

/* The entry point: one tensor's step on `threads` threads, each taking a contiguous range of whole blocks (a
 * thread that cannot be started has its range run on the calling thread). Every coordinate's result is the same
 * whatever the thread count. Returns the number of coordinates skipped for a non-finite gradient. */
int64_t lstm_step(const args_t *args, int threads) {
    int64_t blocks = (args->n + BLOCK - 1) / BLOCK;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > blocks) threads = (int)blocks;
    if (threads < 1) threads = 1;
    range_t ranges[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        ranges[t].args = args;
        ranges[t].skipped = 0;
        ranges[t].begin = blocks * t / threads * BLOCK;
        ranges[t].end = blocks * (t + 1) / threads * BLOCK;
        if (ranges[t].end > args->n) ranges[t].end = args->n;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run_range, &ranges[t]) == 0;
    run_range(&ranges[0]);
    int64_t skipped = ranges[0].skipped;
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_range(&ranges[t]);
        skipped += ranges[t].skipped;
    }
    return skipped;
}
