/* The C kernels on their own, for the sanitizers: every entry point on buffers of exactly the size it may touch
 * (malloc'ed one by one, so AddressSanitizer sees any read or write past them), each path against a scalar reference of
 * the same integer arithmetic, and the refusals. Built and run by tests/test_kernel_sanitizers.py:
 *
 *     gcc -DSC_STANDALONE -fsanitize=address,undefined -pthread tests/kernel_harness.c appliance/kernels/prompt_kernels.c -lm
 *
 * Prints one line per path it ran or skipped and exits 0, or names the first mismatch and exits 1.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sc_cpu_features(void);
int sc_quantize_rows(const float *x, int M, int K, int G, int8_t *codes, float *scales, float *offsets);
int sc_int4_gemm(const int8_t *, const float *, const float *, int, int, int, const uint8_t *, const float *,
                 const float *, float *, int, int, int, uint8_t *);
int sc_int4_gemm_avx512vnni(const int8_t *, const float *, const float *, int, int, int, const uint8_t *,
                            const float *, const float *, float *, int, int, int, uint8_t *);
int sc_nbits_gemv(const float *x, int K, int G, int bits, const uint8_t *w, const float *ws, float *y, int n0, int n1);
int sc_layer_norm(const float *x, int rows, int K, const float *weight, const float *bias, float eps, float *out);
int sc_heads_to_fp16(const float *src, int rows, int heads, int hd, long src_row, long src_head, uint16_t *dst,
                     long dst_head, long dst_row);
int sc_gelu(float *x, size_t n);
int sc_heads_to_fp32(const uint16_t *src, int heads, int rows, int hd, long src_head, long src_row, float *dst);
int sc_masked_softmax(float *scores, int heads, int rows, int cols, const uint8_t *mask, long mask_row, float fill);
void *sc_team_create(int threads);
void sc_team_destroy(void *team);
int sc_team_linear(void *team, int path, const float *x, int K, const uint8_t *w, const float *ws, const float *bias,
                   float *y, int N);
int sc_team_attend(void *team, int path, const float *q, int heads, int hd, const uint16_t *k, const uint16_t *v,
                   long head_stride, int T, float *scratch, long scratch_stride, float *out);
int sc_team_logits(void *team, const float *x, int K, int G, int bits, const uint8_t *w, const float *ws, float *y,
                   int N);
int sc_repack_int4(const uint8_t *w, int N, int K, uint8_t *out);
int sc_step_run(void *team, int path, const int64_t *code, int count, float *arena, int64_t arena_floats, int past);

typedef int (*gemm_fn)(const int8_t *, const float *, const float *, int, int, int, const uint8_t *, const float *,
                       const float *, float *, int, int, int, uint8_t *);

static uint64_t state = 88172645463325252ull;
static uint32_t next(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return (uint32_t)state; }
static float uniform(void) { return (float)(next() % 2000001) / 1000000.f - 1.f; }

static void *exactly(size_t nbytes, size_t align) {
    void *p = aligned_alloc(align, (nbytes + align - 1) / align * align);
    if (!p) { puts("out of memory"); exit(2); }
    return p;
}

/* fp32 -> fp16, rounded to nearest even (the CPU's own conversion; run only where the paths' check found F16C) */
__attribute__((target("f16c"))) static uint16_t half(float f) { return (uint16_t)_cvtss_sh(f, 0); }

static int failures;
#define EXPECT(cond, ...) do { if (!(cond)) { printf(__VA_ARGS__); puts(""); failures++; return; } } while (0)

/* y[m][n] of the integer arithmetic the kernels promise, in double: per row and block, codes q = rint(x / s) with
 * s = max|x| / 127 (as the kernel rounds: x * (1 / s)), then ws * s * sum((c - 8) * q). */
static void reference(const float *x, int M, int K, int G, const uint8_t *w, const float *ws, int N, double *y,
                      double *bound) {
    const int blocks = K / G;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) y[m * N + n] = bound[m * N + n] = 0;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < blocks; b++) {
            float mx = 0;
            for (int i = 0; i < G; i++) mx = fmaxf(mx, fabsf(x[m * K + b * G + i]));
            const float s = mx / 127.f, inv = s > 0 ? 1.f / s : 0.f;
            int q[256];
            for (int i = 0; i < G; i++) q[i] = (int)nearbyintf(x[m * K + b * G + i] * inv);
            for (int n = 0; n < N; n++) {
                long dot = 0;
                for (int i = 0; i < G; i++) {
                    const uint8_t byte = w[(size_t)n * K / 2 + b * G / 2 + i / 2];
                    dot += (long)(((i & 1) ? byte >> 4 : byte & 15) - 8) * q[i];
                }
                const double term = (double)ws[n * blocks + b] * s * (double)dot;
                y[m * N + n] += term;
                bound[m * N + n] += fabs((double)ws[n * blocks + b] * s) * G * 15 * 127;
            }
        }
}

static void compare(const char *what, const float *got, const double *want, const double *bound, int M, int N, int ldy) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++)
            EXPECT(fabs(got[m * ldy + n] - want[m * N + n]) <= 1e-6 * bound[m * N + n] + 1e-6,
                   "%s: row %d column %d: %.7g, want %.7g", what, m, n, got[m * ldy + n], want[m * N + n]);
}

static void gemm_case(const char *path, gemm_fn gemm, int nr, int M, int K, int G, int N) {
    const int blocks = K / G;
    float *x = exactly(sizeof(float) * M * K, 64), *ws = exactly(sizeof(float) * N * blocks, 64);
    uint8_t *w = exactly((size_t)N * K / 2, 64), *scratch = exactly((size_t)(K + 4 * blocks) * nr, 64);
    int8_t *codes = exactly((size_t)M * K, 64);
    float *xs = exactly(sizeof(float) * M * blocks, 64), *xo = exactly(sizeof(float) * M * blocks, 64);
    float *y = exactly(sizeof(float) * M * N, 64);
    double *want = exactly(sizeof(double) * M * N, 64), *bound = exactly(sizeof(double) * M * N, 64);
    for (int i = 0; i < M * K; i++) x[i] = 3 * uniform();
    for (int i = 0; i < M * K / 3; i += 7) x[i] = 0; /* some zeros, and one all-zero row below */
    for (int i = 0; i < K; i++) x[(M - 1) * K + i] = 0;
    for (int i = 0; i < N * K / 2; i++) w[i] = (uint8_t)next();
    for (int i = 0; i < N * blocks; i++) ws[i] = 0.01f + 0.01f * uniform();
    float *bias = exactly(sizeof(float) * N, 4);
    for (int i = 0; i < N; i++) bias[i] = uniform();
    reference(x, M, K, G, w, ws, N, want, bound);
    for (int i = 0; i < M * N; i++) want[i] += bias[i % N], bound[i] += 1;
    char what[96];
    snprintf(what, sizeof what, "%s gemm %dx%dx%d g%d", path, M, K, N, G);
    EXPECT(sc_quantize_rows(x, M, K, G, codes, xs, xo) == 0, "%s: quantize refused", what);
    /* two column ranges, as two threads would run them */
    EXPECT(gemm(codes, xs, xo, M, K, G, w, ws, bias, y, N, 0, N / nr / 2 * nr, scratch) == 0, "%s: refused", what);
    EXPECT(gemm(codes, xs, xo, M, K, G, w, ws, bias, y, N, N / nr / 2 * nr, N, scratch) == 0, "%s: refused", what);
    compare(what, y, want, bound, M, N, N);
    /* refusals: nothing written */
    y[0] = 7.f;
    EXPECT(gemm(codes, xs, xo, M, K, G, w, ws, NULL, y, N, 0, nr / 2, scratch) == 1, "%s: half a panel accepted", what);
    EXPECT(gemm(codes, xs, xo, M - 1, K, G, w, ws, NULL, y, N, 0, N, scratch) == 1, "%s: partial tile accepted", what);
    EXPECT(gemm(codes, xs, xo, M, K, G, w, ws, NULL, y, N, 0, N, scratch + 16) == 2, "%s: misaligned scratch", what);
    EXPECT(y[0] == 7.f, "%s: a refused call wrote", what);
    free(x), free(ws), free(w), free(scratch), free(codes), free(xs), free(xo), free(y), free(want), free(bound);
    free(bias);
}

/* The decode GEMV of `path` on repacked weights and a team of 3 (the caller and two workers, which take columns when
 * they wake in time), bias added. */
static void gemv_case(const char *path, int path_number, int K, int N) {
    const int blocks = K / 128;
    float *x = exactly(sizeof(float) * K, 4), *ws = exactly(sizeof(float) * N * blocks, 4);
    float *bias = exactly(sizeof(float) * N, 4), *y = exactly(sizeof(float) * N, 4);
    uint8_t *w = exactly((size_t)N * K / 2, 1), *packed = exactly((size_t)N * K / 2, 64);
    double *want = exactly(sizeof(double) * N, 8), *bound = exactly(sizeof(double) * N, 8);
    for (int i = 0; i < K; i++) x[i] = 5 * uniform();
    for (int i = 0; i < N * K / 2; i++) w[i] = (uint8_t)next();
    for (int i = 0; i < N * blocks; i++) ws[i] = 0.01f + 0.01f * uniform();
    for (int n = 0; n < N; n++) bias[n] = (float)n;
    reference(x, 1, K, 128, w, ws, N, want, bound);
    for (int n = 0; n < N; n++) want[n] += n;
    char what[96];
    snprintf(what, sizeof what, "%s gemv %dx%d", path, K, N);
    EXPECT(sc_repack_int4(w, N, K, packed) == 0, "%s: repack refused", what);
    void *team = sc_team_create(3);
    EXPECT(team != NULL, "%s: no team", what);
    const int refused = sc_team_linear(team, path_number, x, K, packed, ws, bias, y, N);
    const int off_blocks = sc_team_linear(team, path_number, x, K + 64, packed, ws, bias, y, N);
    const int odd_columns = sc_team_linear(team, path_number, x, K, packed, ws, bias, y, N - 2);
    const int unaligned = sc_team_linear(team, path_number, x, K, packed + 1, ws, bias, y, N);
    sc_team_destroy(team);
    EXPECT(refused == 0, "%s: refused", what);
    compare(what, y, want, bound, 1, N, N);
    EXPECT(off_blocks == 1, "%s: K off the 128-code blocks", what);
    EXPECT(odd_columns == 1, "%s: columns not in fours accepted", what);
    EXPECT(unaligned == 2, "%s: unaligned weights accepted", what);
    free(x), free(ws), free(w), free(packed), free(bias), free(y), free(want), free(bound);
}

/* The logits GEMV (fp32 activations, 4- or 8-bit codes) against a double sum of (code - zero point) * ws * x. */
static void logits_case(int bits, int K, int G, int N) {
    const int blocks = K / G, row_bytes = K / 8 * bits;
    float *x = exactly(sizeof(float) * K, 4), *ws = exactly(sizeof(float) * N * blocks, 4);
    float *y = exactly(sizeof(float) * N, 4);
    uint8_t *w = exactly((size_t)N * row_bytes, 1);
    for (int i = 0; i < K; i++) x[i] = 5 * uniform();
    for (int i = 0; i < N * row_bytes; i++) w[i] = (uint8_t)next();
    for (int i = 0; i < N * blocks; i++) ws[i] = 0.01f + 0.01f * uniform();
    char what[96];
    snprintf(what, sizeof what, "logits %d-bit %dx%d g%d", bits, K, N, G);
    float *by_team = exactly(sizeof(float) * N, 4);
    void *team = sc_team_create(2);
    const int team_refused = team == NULL || sc_team_logits(team, x, K, G, bits, w, ws, by_team, N) != 0;
    sc_team_destroy(team);
    EXPECT(!team_refused, "%s: the team refused", what);
    EXPECT(sc_nbits_gemv(x, K, G, bits, w, ws, y, 0, N / 2) == 0, "%s: refused", what);
    EXPECT(sc_nbits_gemv(x, K, G, bits, w, ws, y, N / 2, N) == 0, "%s: refused", what);
    EXPECT(!memcmp(y, by_team, sizeof(float) * N), "%s: the team's logits differ", what);
    free(by_team);
    for (int n = 0; n < N; n++) {
        double want = 0, bound = 0;
        for (int k = 0; k < K; k++) {
            const uint8_t byte = w[(size_t)n * row_bytes + k * bits / 8];
            const int code = bits == 8 ? byte - 128 : ((k & 1) ? byte >> 4 : byte & 15) - 8;
            const double term = (double)ws[n * blocks + k / G] * code * x[k];
            want += term, bound += fabs(term);
        }
        EXPECT(fabs(y[n] - want) <= 1e-6 * bound + 1e-6, "%s: column %d: %.7g, want %.7g", what, n, y[n], want);
    }
    y[0] = 7.f;
    EXPECT(sc_nbits_gemv(x, K, G, 6, w, ws, y, 0, N) == 1, "%s: 6 bits accepted", what);
    EXPECT(sc_nbits_gemv(x, K, 96, bits, w, ws, y, 0, N) == 1, "%s: a group of 96 accepted", what);
    EXPECT(sc_nbits_gemv(x, K, G, bits, w, ws, y, 3, 2) == 1, "%s: an empty range turned round", what);
    EXPECT(sc_nbits_gemv(x, K, G, bits, NULL, ws, y, 0, N) == 2, "%s: no weights accepted", what);
    EXPECT(y[0] == 7.f, "%s: a refused call wrote", what);
    free(x), free(ws), free(y), free(w);
}

/* One query row of 3 heads x hd against 11 of a 12-position fp16 cache on a team of 2 (path 0 avx2, 1 avx512vnni,
 * whose values are summed 16 columns to a vector when hd is a multiple of 16), against a double softmax(q . K) V; the
 * scratch exactly 11 scores per thread, the cache's last row never read. */
__attribute__((target("f16c"))) static void attention_case(int path, int hd) {
    const int heads = 3, cap = 12, T = 11;
    float *q = exactly(sizeof(float) * heads * hd, 4), *out = exactly(sizeof(float) * heads * hd, 4);
    float *scratch = exactly(sizeof(float) * 2 * T, 4); /* a row of T scores per thread */
    uint16_t *k = exactly(sizeof(uint16_t) * heads * cap * hd, 2), *v = exactly(sizeof(uint16_t) * heads * cap * hd, 2);
    for (int i = 0; i < heads * hd; i++) q[i] = uniform();
    for (int i = 0; i < heads * cap * hd; i++) k[i] = half(uniform()), v[i] = half(uniform());
    void *team = sc_team_create(2);
    int bad = team == NULL || sc_team_attend(team, path, q, heads, hd, k, v, cap * hd, T, scratch, T, out) != 0;
    for (int h = 0; h < heads && !bad; h++) {
        double s[11], top = -1e300, total = 0;
        for (int j = 0; j < T; j++) {
            s[j] = 0;
            for (int d = 0; d < hd; d++) s[j] += (double)q[h * hd + d] * _cvtsh_ss(k[(h * cap + j) * hd + d]);
            top = s[j] > top ? s[j] : top;
        }
        for (int j = 0; j < T; j++) total += s[j] = exp(s[j] - top);
        for (int d = 0; d < hd; d++) {
            double want = 0;
            for (int j = 0; j < T; j++) want += s[j] / total * _cvtsh_ss(v[(h * cap + j) * hd + d]);
            bad |= fabs(out[h * hd + d] - want) > 1e-5;
        }
    }
    bad |= sc_team_attend(team, path, q, heads, hd, k, v, T * hd - 8, T, scratch, T, out) != 1; /* heads overlapping */
    bad |= sc_team_attend(team, path, q, heads, 36, k, v, cap * hd, T, scratch, T, out) != 1;
    bad |= sc_team_attend(team, path, q, heads, hd, k, v, cap * hd, T, scratch, T - 1, out) != 1; /* scratch too short */
    sc_team_destroy(team);
    if (bad) { printf("attention, path %d, heads of %d: wrong\n", path, hd); failures++; }
    free(q), free(out), free(scratch), free(k), free(v);
}

static void run_path(const char *path, gemm_fn gemm, int nr, int gemv) {
    const int groups[] = {32, 64, 128, 256};
    for (int g = 0; g < 4; g++) {
        gemm_case(path, gemm, nr, 8, 1024, groups[g], 3 * nr);
        gemm_case(path, gemm, nr, 4, groups[g], groups[g], nr);
        gemm_case(path, gemm, nr, 4, 3 * groups[g], groups[g], nr); /* K an odd multiple of 32 where G = 32 */
    }
    gemv_case(path, gemv, 1024, 200); /* more than one 64-column unit, for the workers to take */
    gemv_case(path, gemv, 128, 4);
    gemv_case(path, gemv, 384, 8); /* an odd number of blocks */
    printf("%s: %s\n", path, failures ? "FAILED" : "ok");
}

/* A recorded step of every operation on an arena of exactly its size, on a team of 3: LayerNorm, the GEMV on
 * repacked weights (against the reference), GELU, a broadcast multiply and add, attention at position 2 of a 5-position
 * fp16 cache, the logits of a 4-bit table (fp32) and of an 8-bit one (int8 activations, against their reference); a
 * full cache, and a program with one offset past the arena, are refused before anything runs. */
static int64_t bits_of(float f) {
    int32_t b;
    memcpy(&b, &f, 4);
    return b;
}

/* y[n] = sum over groups of ws * s * sum((code - 128) * q), q = rint(x / s), s = max|x| / 127: the 8-bit logits */
static void logits8_reference(const float *x, int K, int G, const uint8_t *w, const float *ws, int N, double *y,
                              double *bound) {
    for (int n = 0; n < N; n++) {
        y[n] = bound[n] = 0;
        for (int b = 0; b < K / G; b++) {
            float top = 0;
            for (int i = 0; i < G; i++) top = fmaxf(top, fabsf(x[b * G + i]));
            const float s = top / 127.f, inv = s > 0 ? 1.f / s : 0.f;
            long dot = 0;
            for (int i = 0; i < G; i++) dot += (long)(w[(size_t)n * K + b * G + i] - 128) * lrintf(x[b * G + i] * inv);
            y[n] += (double)ws[n * (K / G) + b] * s * dot;
            bound[n] += fabs((double)ws[n * (K / G) + b] * s) * 128 * 127 * G;
        }
    }
}

static void step_case(const char *path, int path_number) {
    enum { K = 256, N = 48, HEADS = 2, HD = 8, CAP = 5, VOCAB = 10 };
    /* arena (floats): x 0, normed 256, y 512 (N), up 576 (N), scaled 640 (N), q.k.v 704 (N = heads x 3 x hd),
     * attended 768 (16), logits 784 (10), linear scratch 800 (64 + 4), attention scratch 880 (16 + 3 x 5),
     * 8-bit logits 912 (10) */
    const int64_t arena_floats = 922;
    float *arena = exactly(sizeof(float) * arena_floats, 64), *gain = exactly(sizeof(float) * K, 4);
    float *shift = exactly(sizeof(float) * K, 4), *ws = exactly(sizeof(float) * N * 2, 4);
    float *head_scales = exactly(sizeof(float) * VOCAB * 2, 4);
    uint8_t *w = exactly((size_t)N * K / 2, 1), *packed = exactly((size_t)N * K / 2, 64);
    uint8_t *head = exactly((size_t)VOCAB * K / 2, 1), *head8 = exactly((size_t)VOCAB * K, 1);
    uint16_t *keys = exactly(sizeof(uint16_t) * HEADS * CAP * HD, 2), *values = exactly(sizeof(uint16_t) * HEADS * CAP * HD, 2);
    double want[N], bound[N];
    for (int i = 0; i < arena_floats; i++) arena[i] = 0;
    for (int i = 0; i < K; i++) arena[i] = 5 * uniform(), gain[i] = 1, shift[i] = 0;
    for (int i = 0; i < N * K / 2; i++) w[i] = (uint8_t)next();
    for (int i = 0; i < N * 2; i++) ws[i] = 0.01f + 0.01f * uniform();
    for (int i = 0; i < VOCAB * K / 2; i++) head[i] = (uint8_t)next();
    for (int i = 0; i < VOCAB * K; i++) head8[i] = (uint8_t)next();
    for (int i = 0; i < VOCAB * 2; i++) head_scales[i] = 0.1f;
    for (int i = 0; i < HEADS * CAP * HD; i++) keys[i] = values[i] = half(uniform());
    char what[64];
    snprintf(what, sizeof what, "%s step", path);
    EXPECT(sc_repack_int4(w, N, K, packed) == 0 && sc_repack_int4(w, N - 2, K, packed) == 1, "%s: repack", what);
    int64_t code[8][24] = {
        {3, 256, 0, K, (intptr_t)gain, (intptr_t)shift, bits_of(1e-5f)},
        {4, 512, 256, K, N, (intptr_t)packed, (intptr_t)ws, 0, 800},
        {5, 576, 512, N},
        {2, 640, 576, -1, bits_of(0.5f), 1, 1, 1, N, 0, 0, 0, 1, 0, 0, 0, 1},
        {1, 704, 640, 512, 0, 1, 1, 1, N, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1},
        {6, 768, 704, 712, 720, HEADS, HD, 3 * HD, 3 * HD, 3 * HD, (intptr_t)keys, (intptr_t)values, CAP,
         bits_of(0.35f), 880},
        {7, 784, 256, K, 128, 4, VOCAB, (intptr_t)head, (intptr_t)head_scales, 800},
        {7, 912, 256, K, 128, 8, VOCAB, (intptr_t)head8, (intptr_t)head_scales, 800},
    };
    void *team = sc_team_create(3);
    EXPECT(team != NULL, "%s: no team", what);
    const int ran = sc_step_run(team, path_number, &code[0][0], 8, arena, arena_floats, 2);
    const int full = sc_step_run(team, path_number, &code[0][0], 8, arena, arena_floats, CAP);
    code[6][1] = arena_floats - VOCAB + 1; /* the logits one float past the arena */
    for (int i = 0; i < VOCAB; i++) arena[784 + i] = -1;
    const int past_end = sc_step_run(team, path_number, &code[0][0], 8, arena, arena_floats, 2);
    code[6][1] = 784;
    int crafted = 0; /* operands whose checks could overflow or skip: each must be refused */
    code[5][7] = ((int64_t)1 << 61) + 1; /* a head stride whose product with the heads wraps round */
    crafted += sc_step_run(team, path_number, &code[0][0], 8, arena, arena_floats, 2) == 1;
    code[5][7] = 3 * HD, code[7][4] = -((int64_t)1 << 32) + 128; /* a group that is 128 once cast to 32 bits */
    crafted += sc_step_run(team, path_number, &code[0][0], 8, arena, arena_floats, 2) == 1;
    code[7][4] = 128;
    int64_t copy[24] = {0, 0, 256, 0, 0, 1, 1, 1, 8, 0, 0, 0, 1, 0, 0, 0, 1}; /* a copy naming a second operand */
    crafted += sc_step_run(team, path_number, copy, 1, arena, arena_floats, 2) == 1;
    sc_team_destroy(team);
    EXPECT(ran == 0 && full == 1 && past_end == 1 && crafted == 3, "%s: ran %d, full cache %d, past the arena %d, "
           "crafted operands refused %d of 3", what, ran, full, past_end, crafted);
    EXPECT(arena[784] == -1, "%s: a refused program ran", what);
    reference(arena + 256, 1, K, 128, w, ws, N, want, bound);
    compare(what, arena + 512, want, bound, 1, N, N);
    logits8_reference(arena + 256, K, 128, head8, head_scales, VOCAB, want, bound);
    for (int n = 0; n < VOCAB; n++)
        EXPECT(fabs(arena[912 + n] - want[n]) <= 1e-6 * bound[n] + 1e-5, "%s: 8-bit logit %d: %.7g, want %.7g", what, n,
               arena[912 + n], want[n]);
    for (int i = 0; i < arena_floats; i++) /* every value but the scratch's (int8 codes read as floats) */
        EXPECT(isfinite(arena[i]) || (i >= 800 && i < 912), "%s: arena[%d] is not finite", what, i);
    free(arena), free(gain), free(shift), free(ws), free(head_scales), free(w), free(packed), free(head), free(head8),
        free(keys), free(values);
}

int main(void) {
    const int features = sc_cpu_features();
    if (features & 1) run_path("avx2", sc_int4_gemm, 16, 0);
    else printf("avx2: skipped, this CPU has no AVX2/FMA\n");
    if (features & 2) run_path("avx512vnni", sc_int4_gemm_avx512vnni, 32, 1);
    else printf("avx512vnni: skipped, this CPU has no AVX-512 VNNI\n");
    if (features & 1) {
        const int groups[] = {32, 64, 128, 256};
        for (int g = 0; g < 4; g++)
            for (int bits = 4; bits <= 8; bits += 4) logits_case(bits, 1024, groups[g], 150); /* 3 units of 64 */
        printf("logits: %s\n", failures ? "FAILED" : "ok");
        float *x = exactly(sizeof(float) * 3 * 40, 4), *out = exactly(sizeof(float) * 3 * 40, 4);
        float *weight = exactly(sizeof(float) * 40, 4), *bias = exactly(sizeof(float) * 40, 4);
        for (int i = 0; i < 120; i++) x[i] = 4 * uniform() + (float)(i / 40);
        for (int i = 0; i < 40; i++) weight[i] = 1 + uniform(), bias[i] = uniform();
        int bad = sc_layer_norm(x, 3, 40, weight, bias, 1e-5f, out) != 0;
        for (int r = 0; r < 3 && !bad; r++) {
            double mean = 0, var = 0;
            for (int k = 0; k < 40; k++) mean += x[r * 40 + k] / 40.;
            for (int k = 0; k < 40; k++) var += (x[r * 40 + k] - mean) * (x[r * 40 + k] - mean) / 40.;
            for (int k = 0; k < 40; k++)
                bad |= fabs(out[r * 40 + k] - ((x[r * 40 + k] - mean) / sqrt(var + 1e-5) * weight[k] + bias[k])) > 1e-5;
        }
        bad |= sc_layer_norm(x, 3, 36, weight, bias, 1e-5f, out) != 1;
        if (bad) { puts("layer norm: wrong"); failures++; }
        free(x), free(out), free(weight), free(bias);
        /* 3 rows x 2 heads x 8 into a [2][5][8] cache at rows 1..3: exactly those 48 halves written */
        float *kv = exactly(sizeof(float) * 3 * 2 * 8, 4);
        uint16_t *cache = exactly(sizeof(uint16_t) * 2 * 5 * 8, 2);
        for (int i = 0; i < 48; i++) kv[i] = (float)i + 0.5f;
        for (int i = 0; i < 80; i++) cache[i] = 0xFFFF;
        bad = sc_heads_to_fp16(kv, 3, 2, 8, 16, 8, cache + 8, 40, 8) != 0;
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < 5; r++)
                for (int d = 0; d < 8; d++) {
                    const uint16_t got = cache[h * 40 + r * 8 + d];
                    if (r < 1 || r > 3) bad |= got != 0xFFFF;
                    else bad |= got != half(kv[(r - 1) * 16 + h * 8 + d]);
                }
        if (bad) { puts("fp16 cache writes: wrong"); failures++; }
        free(kv), free(cache);
        float v[13];
        for (int i = 0; i < 13; i++) v[i] = (float)(i - 6);
        if (sc_gelu(v, 13) || fabsf(v[7] - 0.8412f) > 1e-4f || v[6] != 0.f) { puts("gelu: wrong"); failures++; }
        /* rows 1..3 of 2 heads of a [2][5][8] fp16 cache into exactly 2 x 3 x 8 floats */
        uint16_t *halves = exactly(sizeof(uint16_t) * 2 * 5 * 8, 2);
        float *wide = exactly(sizeof(float) * 2 * 3 * 8, 4);
        for (int i = 0; i < 80; i++) halves[i] = half((float)i);
        bad = sc_heads_to_fp32(halves + 8, 2, 3, 8, 40, 8, wide) != 0;
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < 3; r++)
                for (int d = 0; d < 8; d++) bad |= wide[(h * 3 + r) * 8 + d] != (float)(h * 40 + (r + 1) * 8 + d);
        if (bad) { puts("fp16 cache reads: wrong"); failures++; }
        free(halves), free(wide);
        /* 2 heads x 2 rows of 11 scores (a vector and a tail), the mask's rows 16 bytes apart: row 0 masks one
         * score, row 1 all of them (the fill everywhere: uniform) */
        float *scores = exactly(sizeof(float) * 2 * 2 * 11, 4);
        uint8_t *mask = exactly(16 + 11, 1);
        memset(mask, 0, 27);
        mask[3] = 1;
        memset(mask + 16, 1, 11);
        for (int i = 0; i < 44; i++) scores[i] = (float)(i % 11) * 0.5f - (float)(i / 22);
        bad = sc_masked_softmax(scores, 2, 2, 11, mask, 16, -10000.f) != 0;
        for (int h = 0; h < 2; h++) {
            double e[11], sum = 0;
            for (int j = 0; j < 11; j++) sum += e[j] = j == 3 ? 0 : exp(j * 0.5 - 5.0);
            for (int j = 0; j < 11; j++) {
                bad |= fabs(scores[h * 22 + j] - e[j] / sum) > 1e-6 || (j == 3 && scores[h * 22 + j] != 0.f);
                bad |= fabs(scores[h * 22 + 11 + j] - 1.0 / 11) > 1e-6;
            }
        }
        /* a NaN score, in a vector and in the tail, makes its row NaN, as numpy's softmax does */
        memset(mask, 0, 27);
        for (int i = 0; i < 22; i++) scores[i] = (float)i;
        scores[2] = NAN, scores[11 + 9] = NAN;
        bad |= sc_masked_softmax(scores, 1, 2, 11, mask, 16, -10000.f) != 0;
        for (int i = 0; i < 22; i++) bad |= !isnan(scores[i]);
        if (bad) { puts("masked softmax: wrong"); failures++; }
        free(scores), free(mask);
        attention_case(0, 40);
        attention_case(0, 48);
        if (features & 2) attention_case(1, 48), attention_case(1, 144); /* one pass of 3 vectors, then 8 and 1 */
        step_case("avx2", 0);
        if (features & 2) step_case("avx512vnni", 1);
        printf("decode step: %s\n", failures ? "FAILED" : "ok");
    }
    return failures ? 1 : 0;
}
