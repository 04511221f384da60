/* What a decode step run in C on repacked weights could reach: ChatGLM-6B's 28 full-width layers of INT4 matmuls with
 * the weights of four columns interleaved block by block (one stream per four columns, their activations loaded once;
 * the layout onnxruntime repacks MatMulNBits weights into), the attention over an fp16 cache, LayerNorm, GELU and the
 * INT8 lm_head, every parallel part on the kernels' thread team, nothing in Python between them.
 *
 *     gcc -O3 -pthread -DSC_STANDALONE -I appliance/kernels bench/decode_step_c.c -lm -o /tmp/decode_step_c
 *     /tmp/decode_step_c [CONTEXT] [STEPS]           # default 128 positions, 12 steps
 *
 * A measurement, not a model: the weights are constant bytes (the speed does not depend on them), the rotary is a
 * stand-in of the same cost and the residual scaling is not ChatGLM's. It prints each step's time, its GEMV, logits
 * and other parts, and the bytes it read per second (weights + cache): compare with the read bandwidth measured around
 * it (bench/speed.py's read_bandwidth_gbs). docs/performance.md has the figures next to onnxruntime's decode.
 */
#include "prompt_kernels.c"

#include <stdio.h>
#include <time.h>

enum { LAYERS = 28, HIDDEN = 4096, INNER = 16384, HEADS = 32, HEAD_DIM = 128, CAPACITY = 2048, VOCAB = 130528 };
static const int K_OF[4] = {HIDDEN, HIDDEN, HIDDEN, INNER}, N_OF[4] = {3 * HIDDEN, HIDDEN, INNER, HIDDEN};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *must(size_t nbytes) {
    void *p = aligned_alloc(64, (nbytes + 63) / 64 * 64);
    if (!p) {
        fputs("out of memory\n", stderr);
        exit(2);
    }
    return p;
}

/* y[n..n+4) for groups of four columns whose 64-byte blocks lie side by side: [N/4][K/128][4][64] codes; the
 * activations' codes, quantized per block of 128, shared by the four. */
typedef struct {
    const int8_t *x_lo, *x_hi;
    const float *x_scales; /* one per block of 128 */
    int K;
    const uint8_t *w;
    const float *ws; /* [N][K/128] */
    float *y;
} interleaved_job;

VNNI512 static __m512 interleaved_dot(const uint8_t *block, __m512i x_lo, __m512i x_hi) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), raw = _mm512_load_si512(block);
    const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(raw, low4), x_lo);
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4), x_hi));
}

VNNI512 static void interleaved_task(const void *p, int first, int end, int worker) {
    const interleaved_job *j = p;
    const int blocks = j->K / 128;
    float scale[4][INNER / 128] __attribute__((aligned(64)));
    (void)worker;
    for (int n = first; n < end; n += 4) {
        const uint8_t *group = j->w + (size_t)n * (j->K / 2);
        for (int c = 0; c < 4; c++)
            for (int b = 0; b < blocks; b++) scale[c][b] = j->ws[(size_t)(n + c) * blocks + b] * j->x_scales[b];
        __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int b = 0; b < blocks; b++) {
            const __m512i lo = _mm512_load_si512(j->x_lo + b * 64), hi = _mm512_load_si512(j->x_hi + b * 64);
            for (int c = 0; c < 4; c++)
                f[c] = _mm512_fmadd_ps(interleaved_dot(group + (size_t)b * 256 + 64 * c, lo, hi),
                                       _mm512_set1_ps(scale[c][b]), f[c]);
        }
        for (int c = 0; c < 4; c++) j->y[n + c] = _mm512_reduce_add_ps(f[c]);
    }
}

static uint8_t *weights[LAYERS][4];
static float *weight_scales[LAYERS][4];
static void *crew;
static int8_t x_lo[INNER / 2] __attribute__((aligned(64))), x_hi[INNER / 2] __attribute__((aligned(64)));
static float lanes[INNER / 8 + INNER / 128], x_scales[INNER / 128];

static void linear(const float *x, int layer, int which, float *y) {
    const int K = K_OF[which];
    quantize_vector(x, K, 128, x_lo, x_hi, lanes, lanes + K / 8);
    for (int b = 0; b < K / 128; b++) x_scales[b] = lanes[b * 16];
    const interleaved_job job = {x_lo, x_hi, x_scales, K, weights[layer][which], weight_scales[layer][which], y};
    team_run(crew, interleaved_task, &job, N_OF[which], 64);
}

int main(int argc, char **argv) {
    const int context = argc > 1 ? atoi(argv[1]) : 128, steps = argc > 2 ? atoi(argv[2]) : 12;
    if (!(sc_cpu_features() & SC_CPU_AVX512_VNNI) || context < 1 || context >= CAPACITY || steps < 1) {
        fputs("needs AVX-512 VNNI, 1 <= CONTEXT < 2048 and STEPS >= 1\n", stderr);
        return 2;
    }
    if (!(crew = sc_team_create((int)sysconf(_SC_NPROCESSORS_ONLN)))) return 2;
    uint16_t *keys[LAYERS], *values[LAYERS];
    size_t streamed = 0;
    for (int l = 0; l < LAYERS; l++) {
        for (int m = 0; m < 4; m++) {
            const size_t codes = (size_t)K_OF[m] * N_OF[m] / 2, scales = (size_t)K_OF[m] / 128 * N_OF[m];
            memset(weights[l][m] = must(codes), 0x37 + l + m, codes);
            weight_scales[l][m] = must(scales * 4);
            for (size_t i = 0; i < scales; i++) weight_scales[l][m][i] = 0.001f;
            streamed += codes + scales * 4;
        }
        const size_t cache = (size_t)HEADS * CAPACITY * HEAD_DIM * 2;
        memset(keys[l] = must(cache), 0x11, cache);
        memset(values[l] = must(cache), 0x11, cache);
    }
    uint8_t *head = must((size_t)VOCAB * HIDDEN);
    float *head_scales = must((size_t)VOCAB * (HIDDEN / 128) * 4);
    memset(head, 0x81, (size_t)VOCAB * HIDDEN);
    for (size_t i = 0; i < (size_t)VOCAB * (HIDDEN / 128); i++) head_scales[i] = 0.001f;
    streamed += (size_t)VOCAB * HIDDEN + (size_t)VOCAB * (HIDDEN / 128) * 4 + (size_t)2 * LAYERS * context * HIDDEN * 2;

    float *x = must(HIDDEN * 4), *normed = must(HIDDEN * 4), *qkv = must(3 * HIDDEN * 4), *q = must(HIDDEN * 4);
    float *attended = must(HIDDEN * 4), *h = must(HIDDEN * 4), *up = must(INNER * 4), *logits = must((size_t)VOCAB * 4);
    float *gain = must(HIDDEN * 4), *shift = must(HIDDEN * 4), *scores = must(sizeof(float) * 256 * CAPACITY);
    for (int i = 0; i < HIDDEN; i++) x[i] = (float)(i % 13) * 0.1f, gain[i] = 1, shift[i] = 0;
    printf("%d layers at context %d: %.2f GB read per step, team of %d\n", LAYERS, context, streamed / 1e9,
           sc_team_threads(crew));
    volatile size_t inner = INNER; /* a run-time length, as the kernels' own callers pass */
    for (int step = 0; step < steps; step++) {
        const double start = now();
        double gemv = 0;
        for (int l = 0; l < LAYERS; l++) {
            layer_norm(x, 1, HIDDEN, gain, shift, 1e-5f, normed);
            double t = now();
            linear(normed, l, 0, qkv);
            gemv += now() - t;
            for (int head_at = 0; head_at < HEADS; head_at++) { /* a rotary of the same cost; this step's key and value */
                const float *row = qkv + head_at * 3 * HEAD_DIM;
                for (int d = 0; d < HEAD_DIM; d++) q[head_at * HEAD_DIM + d] = row[d] * 0.5f + row[d ^ 32] * 0.25f;
                const size_t at = (size_t)head_at * CAPACITY * HEAD_DIM + (size_t)context * HEAD_DIM;
                heads_to_fp16(row + HEAD_DIM, 1, 1, HEAD_DIM, 0, 0, keys[l] + at, 0, 0);
                heads_to_fp16(row + 2 * HEAD_DIM, 1, 1, HEAD_DIM, 0, 0, values[l] + at, 0, 0);
            }
            const attend_job attention = {q, HEAD_DIM, context + 1, keys[l], values[l], (long)CAPACITY * HEAD_DIM,
                                          CAPACITY, scores, attended};
            team_run(crew, attend_task, &attention, HEADS, 1);
            t = now();
            linear(attended, l, 1, h);
            gemv += now() - t;
            for (int i = 0; i < HIDDEN; i++) h[i] += normed[i];
            layer_norm(h, 1, HIDDEN, gain, shift, 1e-5f, normed);
            t = now();
            linear(normed, l, 2, up);
            gemv += now() - t;
            gelu(up, inner);
            t = now();
            linear(up, l, 3, x);
            gemv += now() - t;
            for (int i = 0; i < HIDDEN; i++) x[i] = x[i] * 0.01f + normed[i];
        }
        layer_norm(x, 1, HIDDEN, gain, shift, 1e-5f, normed);
        const double t = now();
        const logits_job head_job = {normed, HIDDEN, 128, 8, head, head_scales, logits};
        team_run(crew, logits_task, &head_job, VOCAB, 64);
        const double head_s = now() - t, total = now() - start;
        printf("step %d: %.1f ms (GEMV %.1f, logits %.1f, the rest %.1f), %.1f GB/s\n", step + 1, total * 1e3,
               gemv * 1e3, head_s * 1e3, (total - gemv - head_s) * 1e3, streamed / total / 1e9);
    }
    return 0;
}
