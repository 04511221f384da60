/* Prompt kernels for AVX2 CPUs: Y = X @ W.T with W in onnxruntime's MatMulNBits INT4 layout, and tanh GELU.
 *
 * Why: a prompt is arithmetic-bound, and onnxruntime's INT4 kernels for more than one row are built for AVX-512 VNNI;
 * on AVX2 CPUs without it this kernel multiplies prompts faster on the same weights (docs/performance.md). A panel of
 * NR weight columns is unpacked once into int8 codes laid out [K/4][NR columns][4], then every 4-row tile of the prompt
 * runs over it: one vpmaddubsw multiplies 4 codes of 8 columns by 4 broadcast activation bytes, so the per-block
 * scales are applied once per 8 columns, not per dot product.
 *
 * W [N][K/G][G/2] uint8: codes 0..15, low nibble first, zero point 8; scales [N][K/G] fp32 (appliance/model/weights.py).
 * X is quantized per row and per block of G to int8 (scale = max|x| / 127), as MatMulNBits' accuracy level 4 does.
 * Each entry point (sc_*) checks the CPU, its shapes and its pointers before any AVX2 code runs and returns SC_OK or
 * why it refused (SC_NO_AVX2, SC_BAD_SHAPE, SC_MISALIGNED): a wrong call is an error code, not a crash or SIGILL.
 * The library is also a (empty) Python extension module, so installers and freezers ship it like any other.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define MR 4 /* prompt rows per tile */
#define NR 16 /* weight columns per panel: two vectors of 8 */
#define AVX2 __attribute__((target("avx2,fma")))

enum { SC_OK = 0, SC_BAD_SHAPE = 1, SC_MISALIGNED = 2, SC_NO_AVX2 = 3 };

int sc_kernels_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

static int aligned(const void *p, size_t to) { return p != NULL && (uintptr_t)p % to == 0; }

/* The blocking both kernels share: K in whole groups, groups of whole 32-code runs of at most 256 codes. */
static int groups_fit(int K, int G) { return G >= 32 && G <= 256 && G % 32 == 0 && K >= G && K % G == 0; }

/* x [M][K] fp32, M a multiple of MR -> codes [M/MR][K/4][MR][4] int8; per row and block: scale, 8 * scale * sum. */
AVX2 static void quantize_rows(const float *x, int M, int K, int G, int8_t *codes, float *scales, float *offsets) {
    const int blocks = K / G;
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int m = 0; m < M; m++) {
        int32_t *tile = (int32_t *)(codes + (size_t)(m / MR) * K * MR) + m % MR;
        for (int b = 0; b < blocks; b++) {
            const float *src = x + (size_t)m * K + (size_t)b * G;
            __m256 mx = _mm256_setzero_ps();
            for (int i = 0; i < G; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + i)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float scale = _mm_cvtss_f32(h) / 127.f;
            const __m256 inv = _mm256_set1_ps(scale > 0 ? 1.f / scale : 0.f);
            __m256i sum = _mm256_setzero_si256();
            for (int i = 0; i < G; i += 8) {
                __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + i), inv));
                sum = _mm256_add_epi32(sum, q);
                __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                __m128i q8 = _mm_packs_epi16(q16, q16);
                const int group = (b * G + i) / 4;
                tile[(size_t)group * MR] = _mm_cvtsi128_si32(q8);
                tile[(size_t)(group + 1) * MR] = _mm_extract_epi32(q8, 1);
            }
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
            scales[(size_t)m * blocks + b] = scale;
            offsets[(size_t)m * blocks + b] = 8.f * scale * (float)_mm_cvtsi128_si32(s);
        }
    }
}

int sc_quantize_rows(const float *x, int M, int K, int G, int8_t *codes, float *scales, float *offsets) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (M <= 0 || M % MR || !groups_fit(K, G)) return SC_BAD_SHAPE;
    if (!aligned(x, 4) || !aligned(codes, 4) || !aligned(scales, 4) || !aligned(offsets, 4)) return SC_MISALIGNED;
    quantize_rows(x, M, K, G, codes, scales, offsets);
    return SC_OK;
}

/* 8 weight columns -> their codes in a panel of NR columns: for k-group g (codes 4g..4g+3), 8 dwords at
 * panel + g * NR * 4; scales [blocks][8] at panel_scales with a row stride of NR. */
AVX2 static void pack_half(const uint8_t *w, const float *ws, int blocks, int G, uint8_t *panel, float *panel_scales) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const int K = blocks * G;
    for (int k = 0; k < K; k += 32) {
        __m256 col[8];
        for (int c = 0; c < 8; c++) {  /* 16 bytes of column c = codes k..k+31 */
            __m128i raw = _mm_loadu_si128((const __m128i *)(w + (size_t)c * blocks * (G / 2) + k / 2));
            __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
            col[c] = _mm256_castsi256_ps(_mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi)));
        }
        /* transpose 8 x 8 dwords: output g holds codes 4g..4g+3 of every column */
        __m256 t0 = _mm256_unpacklo_ps(col[0], col[1]), t1 = _mm256_unpackhi_ps(col[0], col[1]);
        __m256 t2 = _mm256_unpacklo_ps(col[2], col[3]), t3 = _mm256_unpackhi_ps(col[2], col[3]);
        __m256 t4 = _mm256_unpacklo_ps(col[4], col[5]), t5 = _mm256_unpackhi_ps(col[4], col[5]);
        __m256 t6 = _mm256_unpacklo_ps(col[6], col[7]), t7 = _mm256_unpackhi_ps(col[6], col[7]);
        __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        float *out = (float *)(panel + (size_t)k * NR);  /* k / 4 groups of NR * 4 bytes */
        _mm256_store_ps(out + 0 * NR, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_store_ps(out + 1 * NR, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_store_ps(out + 2 * NR, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_store_ps(out + 3 * NR, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_store_ps(out + 4 * NR, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_store_ps(out + 5 * NR, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_store_ps(out + 6 * NR, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_store_ps(out + 7 * NR, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (int b = 0; b < blocks; b++)
        for (int c = 0; c < 8; c++) panel_scales[b * NR + c] = ws[(size_t)c * blocks + b];
}

#define DOT4(h0, h1, codes0, codes1, x)                                          \
    do {                                                                          \
        const __m256i a = _mm256_set1_epi32(x);                                   \
        h0 = _mm256_add_epi16(h0, _mm256_maddubs_epi16(codes0, a));               \
        h1 = _mm256_add_epi16(h1, _mm256_maddubs_epi16(codes1, a));               \
    } while (0)

/* y[MR rows][NR columns] = sum over blocks of ws * (xs * dot(codes, xq) - 8 * xs * sum(xq)) */
AVX2 static void tile(const int8_t *xq, const float *xs, const float *xo, int blocks, int G, const uint8_t *panel,
                      const float *panel_scales, float *y, int ldy) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f[MR][2];
    for (int r = 0; r < MR; r++) f[r][0] = f[r][1] = _mm256_setzero_ps();
    const int32_t *x = (const int32_t *)xq;
    const __m256i *w = (const __m256i *)panel;
    for (int b = 0; b < blocks; b++) {
        __m256i acc[MR][2];
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        for (int s = 0; s < G / 32; s++) {
            /* 8 products of at most 2 * 15 * 127 each stay inside int16 */
            __m256i h00 = _mm256_setzero_si256(), h01 = h00, h10 = h00, h11 = h00, h20 = h00, h21 = h00, h30 = h00,
                    h31 = h00;
            for (int g = 0; g < 8; g++, w += 2, x += MR) {
                const __m256i c0 = _mm256_load_si256(w), c1 = _mm256_load_si256(w + 1);
                DOT4(h00, h01, c0, c1, x[0]);
                DOT4(h10, h11, c0, c1, x[1]);
                DOT4(h20, h21, c0, c1, x[2]);
                DOT4(h30, h31, c0, c1, x[3]);
                /* keeps GCC from computing all 64 products first and spilling them to the stack */
                __asm__("" : "+x"(h00), "+x"(h01), "+x"(h10), "+x"(h11), "+x"(h20), "+x"(h21), "+x"(h30), "+x"(h31));
            }
            const __m256i h[MR][2] = {{h00, h01}, {h10, h11}, {h20, h21}, {h30, h31}};
            for (int r = 0; r < MR; r++)
                for (int c = 0; c < 2; c++) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(h[r][c], ones));
        }
        const __m256 ws[2] = {_mm256_load_ps(panel_scales + b * NR), _mm256_load_ps(panel_scales + b * NR + 8)};
        for (int r = 0; r < MR; r++) {
            const __m256 scale = _mm256_set1_ps(xs[r * blocks + b]), offset = _mm256_set1_ps(xo[r * blocks + b]);
            for (int c = 0; c < 2; c++)
                f[r][c] = _mm256_fmadd_ps(ws[c], _mm256_fmsub_ps(_mm256_cvtepi32_ps(acc[r][c]), scale, offset), f[r][c]);
        }
    }
    for (int r = 0; r < MR; r++) {
        _mm256_storeu_ps(y + (size_t)r * ldy, f[r][0]);
        _mm256_storeu_ps(y + (size_t)r * ldy + 8, f[r][1]);
    }
}

/* Columns n0..n1 (multiples of NR) of y [M][ldy]; scratch: 32-byte aligned, K * NR + 4 * (K / G) * NR bytes. */
AVX2 static void int4_gemm(const int8_t *xq, const float *xs, const float *xo, int M, int K, int G, const uint8_t *w,
                           const float *ws, float *y, int ldy, int n0, int n1, uint8_t *scratch) {
    const int blocks = K / G;
    float *panel_scales = (float *)(scratch + (size_t)K * NR);
    for (int n = n0; n < n1; n += NR) {
        for (int half = 0; half < 2; half++) {
            const int first = n + 8 * half;
            pack_half(w + (size_t)first * blocks * (G / 2), ws + (size_t)first * blocks, blocks, G, scratch + 32 * half,
                      panel_scales + 8 * half);
        }
        for (int m = 0; m < M; m += MR)
            tile(xq + (size_t)m * K, xs + (size_t)m * blocks, xo + (size_t)m * blocks, blocks, G, scratch,
                 panel_scales, y + (size_t)m * ldy + n, ldy);
    }
}

int sc_int4_gemm(const int8_t *xq, const float *xs, const float *xo, int M, int K, int G, const uint8_t *w,
                 const float *ws, float *y, int ldy, int n0, int n1, uint8_t *scratch) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (M <= 0 || M % MR || !groups_fit(K, G) || n0 < 0 || n0 > n1 || n0 % NR || n1 % NR || n1 > ldy)
        return SC_BAD_SHAPE;
    if (w == NULL || !aligned(xq, 4) || !aligned(xs, 4) || !aligned(xo, 4) || !aligned(ws, 4) || !aligned(y, 4)
        || !aligned(scratch, 32))
        return SC_MISALIGNED;
    int4_gemm(xq, xs, xo, M, K, G, w, ws, y, ldy, n0, n1, scratch);
    return SC_OK;
}

/* exp(x) for |x| <= 88: 2^n * e^r with r = x - n ln2 in [-ln2/2, ln2/2], e^r by its Taylor polynomial of degree 6
 * (relative error below 2e-7). */
AVX2 static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* In place: x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), written as x / (1 + exp(-2 * that argument)),
 * in one pass where numpy makes several over temporaries of the MLP's activations. */
AVX2 static void gelu(float *x, size_t n) {
    const __m256 c = _mm256_set1_ps(-2.f * 0.7978845608028654f), c3 = _mm256_set1_ps(0.044715f), one = _mm256_set1_ps(1.f);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256 arg = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(c3, v), _mm256_mul_ps(v, v), v));
        _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, exp256(arg))));
    }
    for (; i < n; i++) {
        const float v = x[i];
        x[i] = v / (1.f + expf(-2.f * 0.7978845608028654f * (v + 0.044715f * v * v * v)));
    }
}

int sc_gelu(float *x, size_t n) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (n && !aligned(x, 4)) return SC_MISALIGNED;
    gelu(x, n);
    return SC_OK;
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_prompt_kernels",
                                    "C kernels loaded through ctypes by appliance.kernels.prompt_kernels", -1, NULL};

PyMODINIT_FUNC PyInit__prompt_kernels(void) { return PyModule_Create(&module); }
