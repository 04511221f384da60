/* CPU kernels on onnxruntime's MatMulNBits layouts: prompt GEMM (AVX2, AVX-512 VNNI), decode GEMV (AVX2, AVX-512
 * VNNI), the logits (4- or 8-bit lm_head, fp32), LayerNorm, tanh GELU, fp16 cache writes, a decode step's attention
 * over the fp16 cache, the thread team that runs a decode step's parallel parts, and the CPUID checks that choose
 * among the paths at run time.
 *
 * Why: a prompt is arithmetic-bound and a decode step is bound by the bytes of weights it reads; both run on the
 * bundle's own INT4 codes, unpacked to int8 on the fly (no second copy of the weights). docs/performance.md has the
 * measured rates and where each path is used.
 *
 * W [N][K/G][G/2] uint8: codes 0..15, low nibble first, zero point 8; scales [N][K/G] fp32 (appliance/model/weights.py).
 * X is quantized per row and per block of G to int8 (scale = max|x| / 127), as MatMulNBits' accuracy level 4 does.
 * Every product is a code (unsigned, 0..15) times an activation (signed int8), and sum((c - 8) * x) = sum(c * x) - 8 * sum(x): the
 * zero point is one precomputed term per row and block ("offsets" below).
 *
 * Each entry point (sc_*) checks the CPU, its shapes and its pointers before any vector code runs and returns SC_OK or
 * why it refused (SC_NO_AVX2 / SC_NO_AVX512_VNNI, SC_BAD_SHAPE, SC_MISALIGNED, SC_NO_MEMORY): a wrong call is an error
 * code, not a crash or SIGILL. The team's own functions (sc_team_create, _destroy, _threads) handle a team instead:
 * NULL, or its size. The library is also a (empty) Python extension module, so installers and freezers ship it like any
 * other; appliance/kernels/native.py loads it through ctypes and chooses the path.
 */
#ifndef SC_STANDALONE /* tests/kernel_harness.c builds the kernels without Python, under the sanitizers */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <cpuid.h>
#include <errno.h>
#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MR 4 /* prompt rows per tile (both paths: one activation layout) */
#define NR 16 /* weight columns per AVX2 panel: two vectors of 8 */
#define NR512 32 /* weight columns per AVX-512 panel: two vectors of 16 */
#define PREFETCH 1024 /* bytes ahead of the logits GEMV's weight stream */
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define VNNI512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

enum { SC_OK = 0, SC_BAD_SHAPE = 1, SC_MISALIGNED = 2, SC_NO_AVX2 = 3, SC_NO_AVX512_VNNI = 4, SC_NO_MEMORY = 5 };

/* -- which instructions this CPU and OS offer ------------------------------------------------------------------- */

enum { SC_CPU_AVX2 = 1, SC_CPU_AVX512_VNNI = 2, SC_CPU_AVX_VNNI = 4, SC_CPU_AMX_INT8 = 8 };

static uint64_t xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* SC_CPU_* bits: the instructions, and the OS saving their registers (XCR0: ymm 0x6, zmm 0xE6, AMX tiles 0x60000). */
static int detect(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(1, 0, &a, &b, &c, &d) || !(c & bit_OSXSAVE)) return 0;
    const int fma = (c & bit_FMA) != 0 && (c & bit_F16C) != 0; /* every AVX2 CPU has both; the cache writes use F16C */
    const uint64_t os = xcr0();
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    const unsigned leaf7_b = b, leaf7_c = c, leaf7_d = d;
    int found = 0;
    if ((os & 0x6) == 0x6 && (leaf7_b & bit_AVX2) && fma) found |= SC_CPU_AVX2;
    if ((found & SC_CPU_AVX2) && (os & 0xE6) == 0xE6 && (leaf7_b & bit_AVX512F) && (leaf7_b & bit_AVX512BW)
        && (leaf7_b & bit_AVX512VL) && (leaf7_c & bit_AVX512VNNI))
        found |= SC_CPU_AVX512_VNNI;
    if ((found & SC_CPU_AVX2) && __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 4))) found |= SC_CPU_AVX_VNNI;
    if ((os & 0x60000) == 0x60000 && (leaf7_d & (1u << 24)) && (leaf7_d & (1u << 25))) found |= SC_CPU_AMX_INT8;
    return found;
}

int sc_cpu_features(void) {
    static _Atomic int features = -1; /* CPUID traps to the hypervisor in a VM: once per process (racing threads agree) */
    int known = atomic_load_explicit(&features, memory_order_relaxed);
    if (known < 0) atomic_store_explicit(&features, known = detect(), memory_order_relaxed);
    return known;
}

/* Linux gives a process AMX tile data state only on request: 0 when granted, else the errno. */
int sc_request_amx(void) {
    if (!(sc_cpu_features() & SC_CPU_AMX_INT8)) return ENODEV;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) ? errno : 0;
}

int sc_kernels_supported(void) { return (sc_cpu_features() & SC_CPU_AVX2) != 0; }

static int aligned(const void *p, size_t to) { return p != NULL && (uintptr_t)p % to == 0; }

/* The blocking the prompt kernels share: K in whole groups, groups of whole 32-code runs of at most 256 codes. */
static int groups_fit(int K, int G) { return G >= 32 && G <= 256 && G % 32 == 0 && K >= G && K % G == 0; }

/* -- activation quantization ------------------------------------------------------------------------------------ */

/* the largest of 8 lanes */
AVX2 static float hmax(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

/* max |src[0..G)| / 127 */
AVX2 static float block_scale(const float *src, int G) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < G; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + i)));
    return hmax(mx) / 127.f;
}

/* 8 values times inv, rounded to nearest even, as int8 in the low 8 bytes; their sum added to *sum */
AVX2 static inline __m128i quantize8(const float *src, __m256 inv, __m256i *sum) {
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src), inv));
    *sum = _mm256_add_epi32(*sum, q);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    return _mm_packs_epi16(q16, q16);
}

AVX2 static float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

AVX2 static int hsum8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* x [M][K] fp32, M a multiple of MR -> codes [M/MR][K/4][MR][4] int8; per row and block: scale, 8 * scale * sum. */
AVX2 static void quantize_rows(const float *x, int M, int K, int G, int8_t *codes, float *scales, float *offsets) {
    const int blocks = K / G;
    for (int m = 0; m < M; m++) {
        int32_t *tile = (int32_t *)(codes + (size_t)(m / MR) * K * MR) + m % MR;
        for (int b = 0; b < blocks; b++) {
            const float *src = x + (size_t)m * K + (size_t)b * G;
            const float scale = block_scale(src, G);
            const __m256 inv = _mm256_set1_ps(scale > 0 ? 1.f / scale : 0.f);
            __m256i sum = _mm256_setzero_si256();
            for (int i = 0; i < G; i += 8) {
                const __m128i q8 = quantize8(src + i, inv, &sum);
                const int group = (b * G + i) / 4;
                tile[(size_t)group * MR] = _mm_cvtsi128_si32(q8);
                tile[(size_t)(group + 1) * MR] = _mm_extract_epi32(q8, 1);
            }
            scales[(size_t)m * blocks + b] = scale;
            offsets[(size_t)m * blocks + b] = 8.f * scale * (float)hsum8(sum);
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

/* -- prompt GEMM ------------------------------------------------------------------------------------------------ */

/* 8 weight columns, codes k0..K -> their codes in a panel of nr columns: for k-group g (codes 4g..4g+3), 8 dwords at
 * panel + g * nr * 4. */
AVX2 static void pack_eight(const uint8_t *w, int blocks, int G, int nr, uint8_t *panel, int k0) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const int K = blocks * G;
    for (int k = k0; k < K; k += 32) {
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
        float *out = (float *)(panel + (size_t)k * nr);  /* k / 4 groups of nr * 4 bytes */
        _mm256_store_ps(out + 0 * nr, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_store_ps(out + 1 * nr, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_store_ps(out + 2 * nr, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_store_ps(out + 3 * nr, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_store_ps(out + 4 * nr, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_store_ps(out + 5 * nr, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_store_ps(out + 6 * nr, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_store_ps(out + 7 * nr, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
}

/* The panel's codes on the AVX2 path: nr / 8 runs of 8 columns. */
AVX2 static void pack_panel_avx2(const uint8_t *w, int blocks, int G, int nr, uint8_t *panel) {
    for (int part = 0; part < nr / 8; part++)
        pack_eight(w + (size_t)8 * part * blocks * (G / 2), blocks, G, nr, panel + 32 * part, 0);
}

/* As pack_eight for 16 columns, 64 codes at a time, in fewer instructions: the columns' bytes are transposed as 16-bit
 * words (4 codes each; ymm unpacks, which CPUs that split 512-bit operations run at twice the rate of zmm shuffles),
 * and only then is each word widened to its 4 codes: (z | z << 4) & 0x0F0F on the zero-extended bytes. A last run of
 * 32 codes (K an odd multiple of 32) goes through pack_eight. */
VNNI512 static void pack_sixteen(const uint8_t *w, int blocks, int G, int nr, uint8_t *panel) {
    const int K = blocks * G;
    const __m512i nibbles = _mm512_set1_epi16(0x0F0F);
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        __m256i r[16], p[16], q[16];  /* r[c]: column c's words 0-7 (lane 0) and 8-15 (lane 1) */
        for (int c = 0; c < 16; c++) r[c] = _mm256_loadu_si256((const __m256i *)(w + (size_t)c * blocks * (G / 2) + k / 2));
        for (int i = 0; i < 8; i++) {  /* column pairs 2i, 2i+1: p[i] their words 0-3 of each lane, p[8 + i] words 4-7 */
            p[i] = _mm256_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
            p[8 + i] = _mm256_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
        }
        for (int a = 0; a < 4; a++)  /* column quads 4a..4a+3: q[4a + t] their words 2t and 2t + 1 */
            for (int h = 0; h < 2; h++) {
                q[4 * a + 2 * h] = _mm256_unpacklo_epi32(p[8 * h + 2 * a], p[8 * h + 2 * a + 1]);
                q[4 * a + 2 * h + 1] = _mm256_unpackhi_epi32(p[8 * h + 2 * a], p[8 * h + 2 * a + 1]);
            }
        for (int o = 0; o < 2; o++)  /* column octets 8o..8o+7: r[8o + v] their word v (lane 0) and v + 8 (lane 1) */
            for (int t = 0; t < 4; t++) {
                r[8 * o + 2 * t] = _mm256_unpacklo_epi64(q[8 * o + t], q[8 * o + 4 + t]);
                r[8 * o + 2 * t + 1] = _mm256_unpackhi_epi64(q[8 * o + t], q[8 * o + 4 + t]);
            }
        uint8_t *out = panel + (size_t)k * nr;  /* k / 4 groups of nr * 4 bytes */
        for (int v = 0; v < 8; v++) {  /* word v of all 16 columns, then word v + 8 */
            const __m512i low = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(r[v], r[8 + v], 0x20));
            const __m512i high = _mm512_cvtepu8_epi16(_mm256_permute2x128_si256(r[v], r[8 + v], 0x31));
            _mm512_store_si512(out + (size_t)v * nr * 4,
                               _mm512_ternarylogic_epi32(low, _mm512_slli_epi16(low, 4), nibbles, 0xA8));
            _mm512_store_si512(out + (size_t)(v + 8) * nr * 4,
                               _mm512_ternarylogic_epi32(high, _mm512_slli_epi16(high, 4), nibbles, 0xA8));
        }
    }
    if (k < K) {
        pack_eight(w, blocks, G, nr, panel, k);
        pack_eight(w + (size_t)8 * blocks * (G / 2), blocks, G, nr, panel + 32, k);
    }
}

/* The panel's codes on the AVX-512 path: nr / 16 runs of 16 columns. */
VNNI512 static void pack_panel_avx512(const uint8_t *w, int blocks, int G, int nr, uint8_t *panel) {
    for (int part = 0; part < nr / 16; part++)
        pack_sixteen(w + (size_t)16 * part * blocks * (G / 2), blocks, G, nr, panel + 64 * part);
}

#define DOT4(h0, h1, codes0, codes1, x)                                          \
    do {                                                                          \
        const __m256i a = _mm256_set1_epi32(x);                                   \
        h0 = _mm256_add_epi16(h0, _mm256_maddubs_epi16(codes0, a));               \
        h1 = _mm256_add_epi16(h1, _mm256_maddubs_epi16(codes1, a));               \
    } while (0)

/* y[MR rows][NR columns] = bias + sum over blocks of ws * (xs * dot(codes, xq) - 8 * xs * sum(xq)); bias may be NULL */
AVX2 static void tile_avx2(const int8_t *xq, const float *xs, const float *xo, int blocks, int G, const uint8_t *panel,
                           const float *panel_scales, const float *bias, float *y, int ldy) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f[MR][2];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < 2; c++) f[r][c] = bias ? _mm256_loadu_ps(bias + 8 * c) : _mm256_setzero_ps();
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

/* The same tile over NR512 columns: one vpdpbusd multiplies 4 codes of 16 columns by 4 broadcast activation bytes and
 * adds the 4 products into int32 (no int16 stage). 8 int32 and 8 fp32 accumulators stay in registers. */
VNNI512 static void tile_avx512vnni(const int8_t *xq, const float *xs, const float *xo, int blocks, int G,
                                    const uint8_t *panel, const float *panel_scales, const float *bias, float *y,
                                    int ldy) {
    __m512 f[MR][2];
    for (int r = 0; r < MR; r++)
        for (int c = 0; c < 2; c++) f[r][c] = bias ? _mm512_loadu_ps(bias + 16 * c) : _mm512_setzero_ps();
    const int32_t *x = (const int32_t *)xq;
    const __m512i *w = (const __m512i *)panel;
    for (int b = 0; b < blocks; b++) {
        __m512i acc[MR][2];
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
        for (int g = 0; g < G / 4; g++, w += 2, x += MR) {
            const __m512i c0 = _mm512_load_si512(w), c1 = _mm512_load_si512(w + 1);
            for (int r = 0; r < MR; r++) {
                const __m512i a = _mm512_set1_epi32(x[r]);
                acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], c0, a);
                acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], c1, a);
            }
        }
        const __m512 ws[2] = {_mm512_load_ps(panel_scales + b * NR512), _mm512_load_ps(panel_scales + b * NR512 + 16)};
        for (int r = 0; r < MR; r++) {
            const __m512 scale = _mm512_set1_ps(xs[r * blocks + b]), offset = _mm512_set1_ps(xo[r * blocks + b]);
            for (int c = 0; c < 2; c++)
                f[r][c] = _mm512_fmadd_ps(ws[c], _mm512_fmsub_ps(_mm512_cvtepi32_ps(acc[r][c]), scale, offset), f[r][c]);
        }
    }
    for (int r = 0; r < MR; r++) {
        _mm512_storeu_ps(y + (size_t)r * ldy, f[r][0]);
        _mm512_storeu_ps(y + (size_t)r * ldy + 16, f[r][1]);
    }
}

typedef void (*tile_fn)(const int8_t *, const float *, const float *, int, int, const uint8_t *, const float *,
                        const float *, float *, int);
typedef void (*pack_fn)(const uint8_t *, int, int, int, uint8_t *);

/* Columns n0..n1 (multiples of nr) of y [M][ldy] (plus bias [N], if not NULL): each panel of nr columns unpacked once
 * into scratch (64-byte aligned, K * nr + 4 * (K / G) * nr bytes), then every MR-row tile of the prompt runs over it. */
AVX2 static void int4_gemm(const int8_t *xq, const float *xs, const float *xo, int M, int K, int G, const uint8_t *w,
                           const float *ws, const float *bias, float *y, int ldy, int n0, int n1, uint8_t *scratch,
                           int nr, pack_fn pack, tile_fn tile) {
    const int blocks = K / G;
    float *panel_scales = (float *)(scratch + (size_t)K * nr);  /* [blocks][nr] */
    const size_t panel_lines = (size_t)nr * (K / 2) / 64, lines_per_tile = panel_lines / (M / MR) + 1;
    for (int n = n0; n < n1; n += nr) {
        pack(w + (size_t)n * blocks * (G / 2), blocks, G, nr, scratch);
        for (int b = 0; b < blocks; b++)
            for (int c = 0; c < nr; c++) panel_scales[b * nr + c] = ws[(size_t)(n + c) * blocks + b];
        /* the next panel's bytes into L2 while this one's tiles run, a share before each tile: its 16-32 column
         * streams are more than the hardware prefetcher follows */
        const char *next = (const char *)(w + (size_t)(n + nr) * blocks * (G / 2));
        size_t fetched = n + nr < n1 ? 0 : panel_lines;
        for (int m = 0; m < M; m += MR) {
            for (size_t end = fetched + lines_per_tile; fetched < end && fetched < panel_lines; fetched++)
                _mm_prefetch(next + 64 * fetched, _MM_HINT_T1);
            tile(xq + (size_t)m * K, xs + (size_t)m * blocks, xo + (size_t)m * blocks, blocks, G, scratch,
                 panel_scales, bias ? bias + n : NULL, y + (size_t)m * ldy + n, ldy);
        }
    }
}

static int gemm_refusal(const int8_t *xq, const float *xs, const float *xo, int M, int K, int G, const uint8_t *w,
                        const float *ws, const float *bias, const float *y, int ldy, int n0, int n1,
                        const uint8_t *scratch, int nr) {
    if (M <= 0 || M % MR || !groups_fit(K, G) || n0 < 0 || n0 > n1 || n0 % nr || n1 % nr || n1 > ldy)
        return SC_BAD_SHAPE;
    if (w == NULL || !aligned(xq, 4) || !aligned(xs, 4) || !aligned(xo, 4) || !aligned(ws, 4) || !aligned(y, 4)
        || (bias && !aligned(bias, 4)) || !aligned(scratch, 64))
        return SC_MISALIGNED;
    return SC_OK;
}

int sc_int4_gemm(const int8_t *xq, const float *xs, const float *xo, int M, int K, int G, const uint8_t *w,
                 const float *ws, const float *bias, float *y, int ldy, int n0, int n1, uint8_t *scratch) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    const int refused = gemm_refusal(xq, xs, xo, M, K, G, w, ws, bias, y, ldy, n0, n1, scratch, NR);
    if (!refused) int4_gemm(xq, xs, xo, M, K, G, w, ws, bias, y, ldy, n0, n1, scratch, NR, pack_panel_avx2, tile_avx2);
    return refused;
}

/* As sc_int4_gemm, in panels of NR512 columns (scratch K * 32 + 4 * (K / G) * 32 bytes, 64-byte aligned). */
int sc_int4_gemm_avx512vnni(const int8_t *xq, const float *xs, const float *xo, int M, int K, int G, const uint8_t *w,
                            const float *ws, const float *bias, float *y, int ldy, int n0, int n1, uint8_t *scratch) {
    if (!(sc_cpu_features() & SC_CPU_AVX512_VNNI)) return SC_NO_AVX512_VNNI;
    const int refused = gemm_refusal(xq, xs, xo, M, K, G, w, ws, bias, y, ldy, n0, n1, scratch, NR512);
    if (!refused)
        int4_gemm(xq, xs, xo, M, K, G, w, ws, bias, y, ldy, n0, n1, scratch, NR512, pack_panel_avx512, tile_avx512vnni);
    return refused;
}

/* -- one activation row quantized for a decode step ------------------------------------------------------------- */

/* x [K] -> int8 codes per block of G (a multiple of 8), scales (max|x| / 127) and offsets (zero * scale * sum(codes),
 * the share of a code's zero point) per block. With x_hi, the codes are split for INT4 bytes: x_lo [K/2] meets each
 * byte's low nibble (x[2j]), x_hi its high one (x[2j+1]); without, x_lo [K] holds them in order (8-bit codes). */
AVX2 static void quantize_vector(const float *x, int K, int G, float zero, int8_t *x_lo, int8_t *x_hi, float *scales,
                                 float *offsets) {
    const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
    for (int b = 0; b < K / G; b++) {
        const float *src = x + (size_t)b * G;
        const float scale = block_scale(src, G);
        const __m256 inv = _mm256_set1_ps(scale > 0 ? 1.f / scale : 0.f);
        __m256i sum = _mm256_setzero_si256();
        for (int i = 0; i < G; i += 8) {
            const __m128i q = quantize8(src + i, inv, &sum);
            const size_t at = (size_t)b * G + i;
            if (x_hi) {
                const __m128i halves = _mm_shuffle_epi8(q, split);
                const int32_t even = _mm_cvtsi128_si32(halves), odd = _mm_extract_epi32(halves, 1);
                memcpy(x_lo + at / 2, &even, 4);
                memcpy(x_hi + at / 2, &odd, 4);
            } else {
                _mm_storel_epi64((__m128i *)(x_lo + at), q);
            }
        }
        scales[b] = scale;
        offsets[b] = zero * scale * (float)hsum8(sum);
    }
}

/* sum over blocks of ws[b] * offsets[b]: the zero point's share of one column */
AVX2 static float zero_point_term(const float *ws, const float *offsets, int blocks) {
    __m256 acc = _mm256_setzero_ps();
    int b = 0;
    for (; b + 8 <= blocks; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(ws + b), _mm256_loadu_ps(offsets + b), acc);
    float total = hsum(acc);
    for (; b < blocks; b++) total += ws[b] * offsets[b];
    return total;
}

/* -- the prompt's logits ---------------------------------------------------------------------------------------- */

/* 32 codes of one column from 8-bit (32 bytes) or 4-bit (16 bytes, low nibble first) storage, zero point taken off:
 * code - 128 is the byte with its top bit flipped, read as signed; code - 8 is the nibble minus 8. */
AVX2 static inline void signed_codes(const uint8_t *at, int bits, __m128i *first, __m128i *second) {
    if (bits == 8) {
        const __m128i flip = _mm_set1_epi8((char)0x80);
        *first = _mm_xor_si128(_mm_loadu_si128((const __m128i *)at), flip);
        *second = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(at + 16)), flip);
    } else {
        const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
        const __m128i raw = _mm_loadu_si128((const __m128i *)at);
        const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
        *first = _mm_sub_epi8(_mm_unpacklo_epi8(lo, hi), eight);
        *second = _mm_sub_epi8(_mm_unpackhi_epi8(lo, hi), eight);
    }
}

/* y[n] = sum over blocks of ws[n][b] * sum over the block of (code - zero point) * x, in fp32: the lm_head of a
 * prompt's last row. One row is read once, so this is bound by the bytes of the table (0.53 GB at INT8 for
 * ChatGLM-6B), not by arithmetic; exact float products keep it closer to the model than int8 activations would. */
AVX2 static void nbits_gemv(const float *x, int K, int G, int bits, const uint8_t *w, const float *ws, float *y,
                            int n0, int n1) {
    const int blocks = K / G, row_bytes = K / 8 * bits;
    for (int n = n0; n < n1; n++) {
        const uint8_t *row = w + (size_t)n * row_bytes;
        __m256 total = _mm256_setzero_ps();
        for (int b = 0; b < blocks; b++) {
            __m256 a0 = _mm256_setzero_ps(), a1 = a0;
            for (int k = b * G; k < (b + 1) * G; k += 32) {
                _mm_prefetch((const char *)row + k / 8 * bits + PREFETCH, _MM_HINT_T0);
                __m128i c[2];
                signed_codes(row + k / 8 * bits, bits, &c[0], &c[1]);
                for (int h = 0; h < 2; h++) {
                    const __m256 low = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c[h]));
                    const __m256 high = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(c[h], c[h])));
                    a0 = _mm256_fmadd_ps(low, _mm256_loadu_ps(x + k + 16 * h), a0);
                    a1 = _mm256_fmadd_ps(high, _mm256_loadu_ps(x + k + 16 * h + 8), a1);
                }
            }
            total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(ws[(size_t)n * blocks + b]), total);
        }
        y[n] = hsum(total);
    }
}

/* y[n0..n1) = W x for one fp32 row x [K] and a 4- or 8-bit MatMulNBits matrix W (groups of whole 32-code runs). */
int sc_nbits_gemv(const float *x, int K, int G, int bits, const uint8_t *w, const float *ws, float *y, int n0, int n1) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if ((bits != 4 && bits != 8) || !groups_fit(K, G) || n0 < 0 || n0 > n1) return SC_BAD_SHAPE;
    if (!aligned(x, 4) || !w || !aligned(ws, 4) || !aligned(y, 4)) return SC_MISALIGNED;
    nbits_gemv(x, K, G, bits, w, ws, y, n0, n1);
    return SC_OK;
}

/* -- LayerNorm -------------------------------------------------------------------------------------------------- */

/* out[r] = (x[r] - mean) / sqrt(var + eps) * weight + bias over rows of K (a multiple of 8): the mean first, then
 * the variance as the mean square of the deviations (two passes, as numpy's reference computes it). */
AVX2 static void layer_norm(const float *x, int rows, int K, const float *weight, const float *bias, float eps,
                            float *out) {
    for (int r = 0; r < rows; r++) {
        const float *row = x + (size_t)r * K;
        float *dst = out + (size_t)r * K;
        __m256 sum = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 8) sum = _mm256_add_ps(sum, _mm256_loadu_ps(row + k));
        const __m256 mean = _mm256_set1_ps(hsum(sum) / (float)K);
        __m256 squares = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 8) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(row + k), mean);
            squares = _mm256_fmadd_ps(d, d, squares);
        }
        const __m256 inv = _mm256_set1_ps(1.f / sqrtf(hsum(squares) / (float)K + eps));
        for (int k = 0; k < K; k += 8) {
            const __m256 scaled = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(row + k), mean), inv),
                                                _mm256_loadu_ps(weight + k));
            _mm256_storeu_ps(dst + k, _mm256_add_ps(scaled, _mm256_loadu_ps(bias + k)));
        }
    }
}

int sc_layer_norm(const float *x, int rows, int K, const float *weight, const float *bias, float eps, float *out) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (rows < 0 || K <= 0 || K % 8 || !(eps > 0)) return SC_BAD_SHAPE;
    if (!aligned(x, 4) || !aligned(weight, 4) || !aligned(bias, 4) || !aligned(out, 4)) return SC_MISALIGNED;
    layer_norm(x, rows, K, weight, bias, eps, out);
    return SC_OK;
}

/* -- keys and values into an fp16 cache ------------------------------------------------------------------------- */

/* dst[h * dst_head + r * dst_row + d] = fp16(src[r * src_row + h * src_head + d]) for rows x heads x hd (a multiple of
 * 8), strides in elements: a prompt's keys or values [rows, heads, hd] (a view inside the QKV projection) into the
 * cache's [heads, capacity, hd] layout, rounded to nearest even as numpy's astype rounds, in one pass where numpy's
 * transposing cast is ten times slower. */
AVX2 static void heads_to_fp16(const float *src, int rows, int heads, int hd, long src_row, long src_head,
                               uint16_t *dst, long dst_head, long dst_row) {
    for (int h = 0; h < heads; h++)
        for (int r = 0; r < rows; r++) {
            const float *from = src + r * src_row + h * src_head;
            uint16_t *to = dst + h * dst_head + r * dst_row;
            for (int d = 0; d < hd; d += 8)
                _mm_storeu_si128((__m128i *)(to + d), _mm256_cvtps_ph(_mm256_loadu_ps(from + d), _MM_FROUND_TO_NEAREST_INT));
        }
}

int sc_heads_to_fp16(const float *src, int rows, int heads, int hd, long src_row, long src_head, uint16_t *dst,
                     long dst_head, long dst_row) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (rows < 0 || heads < 0 || hd <= 0 || hd % 8) return SC_BAD_SHAPE;
    if (!aligned(src, 4) || !aligned(dst, 2)) return SC_MISALIGNED;
    heads_to_fp16(src, rows, heads, hd, src_row, src_head, dst, dst_head, dst_row);
    return SC_OK;
}

/* -- GELU ------------------------------------------------------------------------------------------------------- */

/* exp(x): 2^n * e^r with r = x - n ln2 in [-ln2/2, ln2/2], e^r by its Taylor polynomial of degree 6 (relative error
 * below 2e-7) for -87 <= x <= 88; 0 below (where float32's exp is 0 or subnormal, so masked scores weigh exactly
 * nothing), +inf above (as float32's overflows, so GELU of -inf is NaN and of -3e38 is -0 in every lane, as in the
 * scalar tail), NaN for NaN (the clamps take x as their second operand, which max and min return when it is NaN). */
AVX2 static inline __m256 exp256(__m256 x) {
    const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
    const __m256 overflow = _mm256_cmp_ps(x, _mm256_set1_ps(88.f), _CMP_GT_OQ);
    x = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-87.f), x));
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
    const __m256 e = _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
    return _mm256_blendv_ps(e, _mm256_set1_ps(INFINITY), overflow);
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

/* -- a decode step's attention over the fp16 cache -------------------------------------------------------------- */

/* q . k for one query row (fp32) and one cached key (fp16), hd a multiple of 8 */
AVX2 static inline float dot_fp16(const float *q, const uint16_t *k, int hd) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int d = 0;
    for (; d + 16 <= hd; d += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + d))), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + d + 8))), a1);
    }
    if (d < hd) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + d))), a0);
    return hsum(_mm256_add_ps(a0, a1));
}

/* out[d0..d0 + 8 * width) = sum over j < T of p[j] * v[j][d0..], width 1..4 vectors held in registers over the j loop */
AVX2 static inline void weighted_rows(const float *p, const uint16_t *v, int hd, int T, int d0, int width, float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int j = 0; j < T; j++) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const uint16_t *row = v + (size_t)j * hd + d0;
        for (int i = 0; i < 4; i++)
            if (i < width) acc[i] = _mm256_fmadd_ps(pj, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 8 * i))), acc[i]);
    }
    for (int i = 0; i < width; i++) _mm256_storeu_ps(out + d0 + 8 * i, acc[i]);
}

/* The same sum with 16-wide vectors, 128 columns per pass over v: for a head of 128 one pass over the values, which
 * the AVX2 loop's four passes made the slower half of a long context's attention (docs/performance.md). */
VNNI512 static void weighted_rows512(const float *p, const uint16_t *v, int hd, int T, float *out) {
    for (int d0 = 0; d0 < hd; d0 += 128) {
        const int width = (hd - d0 >= 128 ? 128 : hd - d0) / 16;
        __m512 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_ps();
        for (int j = 0; j < T; j++) {
            const __m512 pj = _mm512_set1_ps(p[j]);
            const uint16_t *row = v + (size_t)j * hd + d0;
            for (int i = 0; i < 8; i++)
                if (i < width)
                    acc[i] = _mm512_fmadd_ps(pj, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 16 * i))), acc[i]);
        }
        for (int i = 0; i < width; i++) _mm512_storeu_ps(out + d0 + 16 * i, acc[i]);
    }
}

/* x[0..n) = exp(x - top) / their sum, in place; top is the row's largest value */
AVX2 static void softmax_from(float *x, int n, float top) {
    const __m256 shift = _mm256_set1_ps(top);
    __m256 sums = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + j), shift));
        _mm256_storeu_ps(x + j, e);
        sums = _mm256_add_ps(sums, e);
    }
    float total = hsum(sums);
    for (; j < n; j++) total += x[j] = expf(x[j] - top);
    const __m256 inv = _mm256_set1_ps(1.f / total);
    for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), inv));
    for (; j < n; j++) x[j] /= total;
}

/* Heads h0..h1 of one query row: q [heads][hd] fp32 (scaled), the cache's keys and values fp16 [heads][.. T ..][hd]
 * (rows of hd, heads head_stride elements apart) -> out [heads][hd] = softmax(q . K) V over the first T positions.
 * scratch holds T scores; wide (the avx512vnni path) sums the values 16 columns to a vector where hd allows. */
AVX2 static void attend_fp16(const float *q, int h0, int h1, int hd, const uint16_t *k, const uint16_t *v,
                             long head_stride, int T, float *scratch, int wide, float *out) {
    for (int h = h0; h < h1; h++) {
        const float *qh = q + (size_t)h * hd;
        const uint16_t *kh = k + (size_t)h * head_stride, *vh = v + (size_t)h * head_stride;
        float top = -INFINITY;
        for (int j = 0; j < T; j++) {
            scratch[j] = dot_fp16(qh, kh + (size_t)j * hd, hd);
            top = fmaxf(top, scratch[j]);
        }
        softmax_from(scratch, T, top);
        if (wide && hd % 16 == 0) {
            weighted_rows512(scratch, vh, hd, T, out + (size_t)h * hd);
            continue;
        }
        for (int d = 0; d < hd; d += 32)
            weighted_rows(scratch, vh, hd, T, d, hd - d >= 32 ? 4 : (hd - d) / 8, out + (size_t)h * hd);
    }
}

/* -- a prompt's attention: keys and values widened, scores masked and softmaxed ------------------------------- */

/* dst[h][r][d] = float(src[h * src_head + r * src_row + d]) for heads x rows x hd (a multiple of 8), dst contiguous:
 * a group of heads' cached keys or values, widened for the attention's fp32 matmuls in one pass where numpy's cast
 * takes ten times longer. */
AVX2 static void heads_to_fp32(const uint16_t *src, int heads, int rows, int hd, long src_head, long src_row,
                               float *dst) {
    for (int h = 0; h < heads; h++)
        for (int r = 0; r < rows; r++) {
            const uint16_t *from = src + h * src_head + r * src_row;
            float *to = dst + ((size_t)h * rows + r) * hd;
            for (int d = 0; d < hd; d += 8)
                _mm256_storeu_ps(to + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(from + d))));
        }
}

int sc_heads_to_fp32(const uint16_t *src, int heads, int rows, int hd, long src_head, long src_row, float *dst) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (heads < 0 || rows < 0 || hd <= 0 || hd % 8) return SC_BAD_SHAPE;
    if (!aligned(src, 2) || !aligned(dst, 4)) return SC_MISALIGNED;
    heads_to_fp32(src, heads, rows, hd, src_head, src_row, dst);
    return SC_OK;
}

/* One row of n scores in place: those whose mask byte is nonzero become `fill`, then the row becomes its softmax,
 * exp(x - max) / sum (the definition's order: masked scores take part in the max and the sum, as numpy's do). */
AVX2 static void masked_softmax_row(float *x, int n, const uint8_t *mask, float fill) {
    const __m256 filled = _mm256_set1_ps(fill);
    __m256 top = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i m = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mask + i)));
        const __m256 masked = _mm256_castsi256_ps(_mm256_cmpgt_epi32(m, _mm256_setzero_si256()));
        const __m256 v = _mm256_blendv_ps(_mm256_loadu_ps(x + i), filled, masked);
        _mm256_storeu_ps(x + i, v);
        top = _mm256_max_ps(top, v);
    }
    float most = hmax(top);
    for (int j = i; j < n; j++) {
        if (mask[j]) x[j] = fill;
        most = x[j] > most ? x[j] : most;
    }
    softmax_from(x, n, most);
}

/* scores [heads][rows][cols] (contiguous), mask [rows] rows of `mask_row` bytes (nonzero = masked, shared by the
 * heads): each row masked with `fill` and softmaxed in place, in one C pass per step where numpy's copyto and softmax
 * make six over the scores. */
int sc_masked_softmax(float *scores, int heads, int rows, int cols, const uint8_t *mask, long mask_row, float fill) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (heads < 0 || rows < 0 || cols <= 0 || mask_row < cols) return SC_BAD_SHAPE;
    if (!aligned(scores, 4) || mask == NULL) return SC_MISALIGNED;
    for (int h = 0; h < heads; h++)
        for (int r = 0; r < rows; r++)
            masked_softmax_row(scores + ((size_t)h * rows + r) * cols, cols, mask + r * mask_row, fill);
    return SC_OK;
}

/* -- a thread team for a decode step ---------------------------------------------------------------------------- */

/* A decode step is a chain of small parallel jobs (four GEMVs and the attention per layer, then the logits), each a
 * fraction of a millisecond; handing each to Python threads cost more than the job's imbalance (docs/performance.md).
 * The team's threads wait for the next job spinning briefly (the calls of one step come back to back), then asleep
 * on a futex; the calling thread works too, and every thread takes the job's units one at a time from a shared
 * counter, so a thread slowed by another process does less of the job instead of holding it up. */

#define TEAM_SPIN 4000 /* pause loops before a waiting thread sleeps or yields: about 0.1 ms on Zen 4 (25 ns a pause) */

typedef void (*team_task)(const void *job, int first, int end, int worker);

typedef struct team {
    int threads;
    pid_t pid; /* the process whose threads these are: a forked child has the memory but not the threads */
    pthread_t *workers;
    _Atomic unsigned generation; /* one more per job, and once more to stop */
    _Atomic int sleepers;        /* workers in futex_wait, or about to be */
    _Atomic int next;            /* the job's next unit */
    _Atomic int finished;        /* workers done with the job */
    _Atomic int stopping;
    team_task task;
    const void *job;
    int total, unit;
} team;

typedef struct { team *t; int worker; } team_seat;

static void team_work(team *t, int worker) {
    const int units = t->total / t->unit + (t->total % t->unit != 0); /* no sum that could pass INT_MAX */
    for (int i; (i = atomic_fetch_add(&t->next, 1)) < units;) {
        const int first = i * t->unit; /* at most total - 1 */
        t->task(t->job, first, t->total - first > t->unit ? first + t->unit : t->total, worker);
    }
}

static void *team_worker(void *arg) {
    team_seat *seat = arg;
    team *t = seat->t;
    const int worker = seat->worker;
    free(seat);
    for (unsigned seen = 0;;) {
        unsigned now;
        for (int spins = 0; (now = atomic_load(&t->generation)) == seen;) {
            if (spins < TEAM_SPIN) {
                spins++, _mm_pause();
                continue;
            }
            atomic_fetch_add(&t->sleepers, 1); /* before the futex checks the generation: the waker sees one or the other */
            syscall(SYS_futex, &t->generation, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            atomic_fetch_sub(&t->sleepers, 1);
        }
        seen = now;
        if (atomic_load(&t->stopping)) return NULL;
        team_work(t, worker);
        atomic_fetch_add(&t->finished, 1);
    }
}

static void team_wake(team *t) {
    atomic_fetch_add(&t->generation, 1);
    if (atomic_load(&t->sleepers)) syscall(SYS_futex, &t->generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* task over 0..total in units, on every thread of the team; returns when all of it is done */
static void team_run(team *t, team_task task, const void *job, int total, int unit) {
    if (t->threads == 1 || total <= unit || getpid() != t->pid) {
        task(job, 0, total, 0);
        return;
    }
    t->task = task, t->job = job, t->total = total, t->unit = unit;
    atomic_store(&t->next, 0);
    atomic_store(&t->finished, 0);
    team_wake(t);
    team_work(t, 0);
    for (int spins = 0; atomic_load(&t->finished) < t->threads - 1;)
        if (spins < TEAM_SPIN) spins++, _mm_pause();
        else sched_yield();
}

void sc_team_destroy(void *handle);

/* A team of `threads` (the caller and threads - 1 workers), or NULL when the CPU has no AVX2 or a thread cannot start. */
void *sc_team_create(int threads) {
    if (!sc_kernels_supported() || threads < 1 || threads > 256) return NULL;
    team *t = calloc(1, sizeof *t);
    if (!t || !(t->workers = calloc((size_t)threads, sizeof *t->workers))) return free(t), NULL;
    t->threads = 1;
    t->pid = getpid();
    for (int w = 1; w < threads; w++, t->threads++) {
        team_seat *seat = malloc(sizeof *seat);
        if (seat) *seat = (team_seat){t, w};
        if (!seat || pthread_create(&t->workers[w], NULL, team_worker, seat)) {
            free(seat);
            sc_team_destroy(t);
            return NULL;
        }
    }
    return t;
}

void sc_team_destroy(void *handle) {
    team *t = handle;
    if (!t || getpid() != t->pid) return; /* a forked child leaves its parent's team alone */
    atomic_store(&t->stopping, 1);
    team_wake(t);
    for (int w = 1; w < t->threads; w++) pthread_join(t->workers[w], NULL);
    free(t->workers);
    free(t);
}

int sc_team_threads(const void *handle) { return handle ? ((const team *)handle)->threads : 0; }

/* attend_fp16 over heads, one at a time from the team's counter; scratch holds `scratch_stride` floats per thread. */
typedef struct {
    const float *q;
    int hd, T, wide;
    const uint16_t *k, *v;
    long head_stride, scratch_stride;
    float *scratch, *out;
} attend_job;

static void attend_task(const void *p, int first, int end, int worker) {
    const attend_job *j = p;
    attend_fp16(j->q, first, end, j->hd, j->k, j->v, j->head_stride, j->T, j->scratch + worker * j->scratch_stride,
                j->wide, j->out);
}

/* attend_fp16 for `heads` on the team, path 0 avx2 or 1 avx512vnni */
int sc_team_attend(void *handle, int path, const float *q, int heads, int hd, const uint16_t *k, const uint16_t *v,
                   long head_stride, int T, float *scratch, long scratch_stride, float *out) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (path == 1 && !(sc_cpu_features() & SC_CPU_AVX512_VNNI)) return SC_NO_AVX512_VNNI;
    if (!handle || (path != 0 && path != 1) || heads < 0 || hd <= 0 || hd % 8 || T <= 0 ||
        head_stride < (long)T * hd || scratch_stride < T)
        return SC_BAD_SHAPE;
    if (!aligned(q, 4) || !aligned(k, 2) || !aligned(v, 2) || !aligned(scratch, 4) || !aligned(out, 4))
        return SC_MISALIGNED;
    const attend_job job = {q, hd, T, path, k, v, head_stride, scratch_stride, scratch, out};
    team_run(handle, attend_task, &job, heads, 1);
    return SC_OK;
}

/* sc_nbits_gemv over rows 64 at a time: a decode step's logits */
typedef struct {
    const float *x;
    int K, G, bits;
    const uint8_t *w;
    const float *ws;
    float *y;
} logits_job;

static void logits_task(const void *p, int first, int end, int worker) {
    const logits_job *j = p;
    (void)worker;
    nbits_gemv(j->x, j->K, j->G, j->bits, j->w, j->ws, j->y, first, end);
}

int sc_team_logits(void *handle, const float *x, int K, int G, int bits, const uint8_t *w, const float *ws, float *y,
                   int N) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (!handle || (bits != 4 && bits != 8) || !groups_fit(K, G) || N < 0) return SC_BAD_SHAPE;
    if (!aligned(x, 4) || !w || !aligned(ws, 4) || !aligned(y, 4)) return SC_MISALIGNED;
    const logits_job job = {x, K, G, bits, w, ws, y};
    team_run(handle, logits_task, &job, N, 64);
    return SC_OK;
}

/* -- the decode GEMV on repacked weights ------------------------------------------------------------------------ */

/* The decode engine's copy of an INT4 matrix with groups of 128: four columns' 64-byte blocks side by side,
 * [N/4][K/128][4][64], so one stream feeds four columns whose activations are loaded once (the layout onnxruntime
 * repacks MatMulNBits weights into). Side by side with the same loop on the bundle's layout, one column per stream,
 * it read 92.5% of the memory's bandwidth against 86-87% (docs/performance.md). */
int sc_repack_int4(const uint8_t *w, int N, int K, uint8_t *out) {
    if (N <= 0 || N % 4 || K <= 0 || K % 128) return SC_BAD_SHAPE;
    if (!w || !out) return SC_MISALIGNED;
    const size_t blocks = (size_t)K / 128;
    for (size_t n = 0; n < (size_t)N; n++)
        for (size_t b = 0; b < blocks; b++)
            memcpy(out + ((n / 4 * blocks + b) * 4 + n % 4) * 64, w + (n * blocks + b) * 64, 64);
    return SC_OK;
}

#define PACKED_MAX_BLOCKS 256 /* K up to 32768 on repacked weights: one column's combined scales on the stack */

/* y[n] = W x + bias over repacked columns first..end (multiples of 4): x quantized per block of 128 (x_lo, x_hi,
 * x_scales and offsets as quantize_vector writes them). */
typedef struct {
    const int8_t *x_lo, *x_hi;
    const float *x_scales, *offsets;
    int K;
    const uint8_t *w;
    const float *ws, *bias;
    float *y;
} packed_job;

/* ws[n, b] * x_scales[b] for the four columns of one stream */
AVX2 static void packed_scales(const packed_job *j, int n, int blocks, float scale[4][PACKED_MAX_BLOCKS]) {
    for (int c = 0; c < 4; c++)
        for (int b = 0; b < blocks; b++) scale[c][b] = j->ws[(size_t)(n + c) * blocks + b] * j->x_scales[b];
}

AVX2 static void packed_finish(const packed_job *j, int n, int blocks, const float sums[4]) {
    for (int c = 0; c < 4; c++) {
        const float *ws = j->ws + (size_t)(n + c) * blocks;
        j->y[n + c] = sums[c] - zero_point_term(ws, j->offsets, blocks) + (j->bias ? j->bias[n + c] : 0.f);
    }
}

AVX2 static void packed_avx2_task(const void *p, int first, int end, int worker) {
    const packed_job *j = p;
    const int blocks = j->K / 128;
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    float scale[4][PACKED_MAX_BLOCKS];
    (void)worker;
    for (int n = first; n < end; n += 4) {
        const uint8_t *stream = j->w + (size_t)n * (j->K / 2);
        packed_scales(j, n, blocks, scale);
        __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int b = 0; b < blocks; b++) {
            const __m256i lo0 = _mm256_load_si256((const __m256i *)(j->x_lo + b * 64)),
                          lo1 = _mm256_load_si256((const __m256i *)(j->x_lo + b * 64 + 32)),
                          hi0 = _mm256_load_si256((const __m256i *)(j->x_hi + b * 64)),
                          hi1 = _mm256_load_si256((const __m256i *)(j->x_hi + b * 64 + 32));
            for (int c = 0; c < 4; c++) {
                const uint8_t *block = stream + (size_t)b * 256 + 64 * c;
                const __m256i r0 = _mm256_load_si256((const __m256i *)block),
                              r1 = _mm256_load_si256((const __m256i *)(block + 32));
                /* four u8 x s8 pair sums of at most 2 * 15 * 127 each: 15240 fits int16 */
                const __m256i s = _mm256_add_epi16(
                    _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(r0, low4), lo0),
                                     _mm256_maddubs_epi16(_mm256_and_si256(r1, low4), lo1)),
                    _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(r0, 4), low4), hi0),
                                     _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(r1, 4), low4), hi1)));
                f[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)), _mm256_set1_ps(scale[c][b]), f[c]);
            }
        }
        const float sums[4] = {hsum(f[0]), hsum(f[1]), hsum(f[2]), hsum(f[3])};
        packed_finish(j, n, blocks, sums);
    }
}

VNNI512 static void packed_vnni_task(const void *p, int first, int end, int worker) {
    const packed_job *j = p;
    const int blocks = j->K / 128;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    float scale[4][PACKED_MAX_BLOCKS];
    (void)worker;
    for (int n = first; n < end; n += 4) {
        const uint8_t *stream = j->w + (size_t)n * (j->K / 2);
        packed_scales(j, n, blocks, scale);
        __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int b = 0; b < blocks; b++) {
            const __m512i lo = _mm512_load_si512(j->x_lo + b * 64), hi = _mm512_load_si512(j->x_hi + b * 64);
            for (int c = 0; c < 4; c++) {
                const __m512i raw = _mm512_load_si512(stream + (size_t)b * 256 + 64 * c);
                const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(raw, low4), lo);
                const __m512i e = _mm512_dpbusd_epi32(d, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4), hi);
                f[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(scale[c][b]), f[c]);
            }
        }
        const float sums[4] = {_mm512_reduce_add_ps(f[0]), _mm512_reduce_add_ps(f[1]), _mm512_reduce_add_ps(f[2]),
                               _mm512_reduce_add_ps(f[3])};
        packed_finish(j, n, blocks, sums);
    }
}

/* -- the decode step's logits: an 8-bit table against int8 activations ------------------------------------------ */

/* y[n] = sum over blocks of ws[n][b] * xs[b] * sum((code - 128) * xq) for an 8-bit MatMulNBits table (codes
 * [N][K], groups of G) and one row quantized per group (xq in order, offsets[b] = 128 * xs[b] * sum(xq)): the logits
 * as the graph's accuracy level 4 computes them. The fp32 products of nbits_gemv kept the table's stream at 29 GB/s
 * against the GEMV's 36 on the AVX-512 machine (docs/performance.md); these are one instruction per 32 codes. */
typedef struct {
    const int8_t *xq;
    const float *xs, *offsets;
    int K, G;
    const uint8_t *w;
    const float *ws;
    float *y;
} logits8_job;

/* One group's sum(code * xq) in 8 int32 lanes. AVX2 has no u8 x s8 product that cannot saturate at 255 x 127, so
 * both sides are widened to int16 first; vpdpbusd takes 32 codes at once. */
AVX2 static inline __m256i group8_avx2(const uint8_t *codes, const int8_t *xq, int G) {
    __m256i acc = _mm256_setzero_si256();
    for (int k = 0; k < G; k += 16) {
        const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(codes + k)));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(c, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(xq + k)))));
    }
    return acc;
}

VNNI512 static inline __m256i group8_vnni(const uint8_t *codes, const int8_t *xq, int G) {
    __m256i acc = _mm256_setzero_si256();
    for (int k = 0; k < G; k += 32)
        acc = _mm256_dpbusd_epi32(acc, _mm256_loadu_si256((const __m256i *)(codes + k)),
                                  _mm256_loadu_si256((const __m256i *)(xq + k)));
    return acc;
}

/* The rows first..end of a logits8_job, each group's sum from `group8` (one of the two above, inlined into a task
 * compiled for its instruction set). */
#define LOGITS8_TASK(name, target, group8)                                                                          \
    target static void name(const void *p, int first, int end, int worker) {                                        \
        const logits8_job *j = p;                                                                                   \
        const int blocks = j->K / j->G;                                                                             \
        (void)worker;                                                                                               \
        for (int n = first; n < end; n++) {                                                                         \
            const uint8_t *row = j->w + (size_t)n * j->K;                                                           \
            const float *row_scales = j->ws + (size_t)n * blocks;                                                   \
            __m256 total = _mm256_setzero_ps();                                                                     \
            for (int b = 0; b < blocks; b++)                                                                        \
                total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(group8(row + (size_t)b * j->G, j->xq + (size_t)b * j->G, \
                                                                  j->G)),                                           \
                                        _mm256_set1_ps(row_scales[b] * j->xs[b]), total);                           \
            j->y[n] = hsum(total) - zero_point_term(row_scales, j->offsets, blocks);                                \
        }                                                                                                           \
    }

LOGITS8_TASK(logits8_avx2_task, AVX2, group8_avx2)
LOGITS8_TASK(logits8_vnni_task, VNNI512, group8_vnni)

static int packed_fits(int64_t K, int64_t N) {
    return K > 0 && K % 128 == 0 && K / 128 <= PACKED_MAX_BLOCKS && N > 0 && N % 4 == 0 && N <= INT_MAX;
}

/* y = W x + bias on repacked weights, the columns 64 at a time across the team; codes [K] and scales [2 * K/128] are
 * the quantized activations' room (64-byte aligned). */
static void packed_linear(team *t, int vnni, const float *x, int K, const uint8_t *w, const float *ws, const float *bias,
                          float *y, int N, int8_t *codes, float *scales) {
    quantize_vector(x, K, 128, 8.f, codes, codes + K / 2, scales, scales + K / 128);
    const packed_job job = {codes, codes + K / 2, scales, scales + K / 128, K, w, ws, bias, y};
    team_run(t, vnni ? packed_vnni_task : packed_avx2_task, &job, N, 64);
}

/* y = W x + bias for one activation row x [K] (fp32, quantized per block of 128 to int8 as MatMulNBits' accuracy
 * level 4 does) and a matrix sc_repack_int4 laid out, on the team: the GEMV of `path` (0 avx2, 1 avx512vnni). */
int sc_team_linear(void *handle, int path, const float *x, int K, const uint8_t *w, const float *ws, const float *bias,
                   float *y, int N) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (path == 1 && !(sc_cpu_features() & SC_CPU_AVX512_VNNI)) return SC_NO_AVX512_VNNI;
    if (!handle || (path != 0 && path != 1) || !packed_fits(K, N)) return SC_BAD_SHAPE;
    if (!aligned(x, 4) || !aligned(w, 64) || !aligned(ws, 4) || (bias && !aligned(bias, 4)) || !aligned(y, 4))
        return SC_MISALIGNED;
    int8_t *codes = aligned_alloc(64, (size_t)K);
    float *scales = malloc(sizeof(float) * 2 * ((size_t)K / 128));
    if (!codes || !scales) return free(codes), free(scales), SC_NO_MEMORY;
    packed_linear(handle, path, x, K, w, ws, bias, y, N, codes, scales);
    free(codes), free(scales);
    return SC_OK;
}

/* -- a decode step as a program --------------------------------------------------------------------------------- */

/* appliance/kernels/step_program.py records a decode step once from the model definition (appliance/model) as a list
 * of instructions over one float arena, and sc_step_run runs it per token: the sequence of the step is the
 * definition's, C only executes it, with the GEMV, attention and logits on the team. Each instruction is STEP_FIELDS
 * int64 values: its op, then operands (arena offsets in floats, sizes, and pointers to the engine's own weights and
 * cache, never to bundle bytes); a float constant is its bit pattern. Every arena range is checked before anything
 * runs; the pointers are the engine's arrays, which the recorder sized. */
enum { STEP_COPY, STEP_ADD, STEP_MUL, STEP_LAYER_NORM, STEP_LINEAR, STEP_GELU, STEP_ATTEND, STEP_LOGITS };
#define STEP_FIELDS 24
#define STEP_DIMS 4

static float bits_to_float(int64_t v) {
    const int32_t bits = (int32_t)v;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* whether a view (offset, shape, strides of STEP_DIMS) lies inside the arena; strides >= 0, sizes >= 1, and no sum
 * or product on the way that overflows */
static int view_fits(const int64_t *offset, const int64_t *shape, const int64_t *strides, int64_t arena) {
    int64_t last = offset[0], span;
    if (last < 0) return 0;
    for (int d = 0; d < STEP_DIMS; d++) {
        if (shape[d] < 1 || shape[d] > arena || strides[d] < 0 || strides[d] > arena ||
            __builtin_mul_overflow(shape[d] - 1, strides[d], &span) || __builtin_add_overflow(last, span, &last))
            return 0;
    }
    return last < arena;
}

static int range_fits(int64_t offset, int64_t length, int64_t arena) {
    return offset >= 0 && length >= 0 && length <= arena && offset <= arena - length;
}

static int aligned_range(int64_t offset, int64_t length, int64_t arena) {
    return range_fits(offset, length, arena) && offset % 16 == 0; /* 64-byte loads of the GEMV's codes */
}

/* one instruction's operands against the arena and the step's shape rules; threads sizes the attention's scratch */
static int step_instruction_fits(const int64_t *f, int64_t arena, int threads) {
    switch (f[0]) {
    case STEP_COPY:
    case STEP_ADD:
    case STEP_MUL: /* out, a, b (-1: the constant f[4]; always for a copy), shape f[5..9), strides of out, a, b */
        return view_fits(f + 1, f + 5, f + 9, arena) && view_fits(f + 2, f + 5, f + 13, arena) &&
               (f[3] == -1 || (f[0] != STEP_COPY && view_fits(f + 3, f + 5, f + 17, arena)));
    case STEP_LAYER_NORM: /* out, in, K, weight, bias, eps */
        return f[3] > 0 && f[3] % 8 == 0 && range_fits(f[1], f[3], arena) && range_fits(f[2], f[3], arena) && f[4] &&
               f[5] && bits_to_float(f[6]) > 0;
    case STEP_LINEAR: /* out, in, K, N, codes (repacked, 64-byte aligned), scales, bias (0: none), scratch */
        return packed_fits(f[3], f[4]) && range_fits(f[1], f[4], arena) && range_fits(f[2], f[3], arena) &&
               aligned((const void *)(intptr_t)f[5], 64) && f[6] && aligned_range(f[8], f[3] / 4 + 2 * (f[3] / 128), arena);
    case STEP_GELU: /* out, in, n */
        return range_fits(f[1], f[3], arena) && range_fits(f[2], f[3], arena);
    case STEP_ATTEND: /* out, q, k, v, heads, hd, q/k/v head strides, keys, values, capacity, scale, scratch */
        return f[5] > 0 && f[5] <= 4096 && f[6] > 0 && f[6] % 8 == 0 && f[6] <= 4096 && f[12] > 0 &&
               f[12] <= INT_MAX && f[10] && f[11] && f[7] <= arena && f[8] <= arena && f[9] <= arena &&
               range_fits(f[1], f[5] * f[6], arena) &&
               range_fits(f[2], (f[5] - 1) * f[7] + f[6], arena) && range_fits(f[3], (f[5] - 1) * f[8] + f[6], arena) &&
               range_fits(f[4], (f[5] - 1) * f[9] + f[6], arena) && f[7] >= f[6] && f[8] >= f[6] && f[9] >= f[6] &&
               range_fits(f[14], f[5] * f[6] + (int64_t)threads * f[12], arena);
    case STEP_LOGITS: /* out, in, K, G, bits, N, codes, scales, scratch (8 bits: the row's int8 codes and scales) */
        return (f[5] == 4 || f[5] == 8) && f[3] > 0 && f[3] <= INT_MAX && f[4] >= 32 && f[4] <= 256 &&
               groups_fit((int)f[3], (int)f[4]) &&
               f[6] >= 0 && f[6] <= INT_MAX && range_fits(f[1], f[6], arena) && range_fits(f[2], f[3], arena) && f[7] &&
               f[8] && aligned_range(f[9], f[3] / 4 + 2 * (f[3] / f[4]), arena);
    default:
        return 0;
    }
}

/* out = a (copy), a + b or a * b elementwise over a 4-dimensional shape, each operand through its own strides */
static void step_elementwise(const int64_t *f, float *arena) {
    const int64_t *n = f + 5, *so = f + 9, *sa = f + 13, *sb = f + 17;
    const float constant = bits_to_float(f[4]);
    float *out = arena + f[1];
    const float *a = arena + f[2], *b = f[3] == -1 ? &constant : arena + f[3];
    const int64_t b3 = f[3] == -1 ? 0 : sb[3];
    for (int64_t i0 = 0; i0 < n[0]; i0++)
        for (int64_t i1 = 0; i1 < n[1]; i1++)
            for (int64_t i2 = 0; i2 < n[2]; i2++) {
                float *o = out + i0 * so[0] + i1 * so[1] + i2 * so[2];
                const float *x = a + i0 * sa[0] + i1 * sa[1] + i2 * sa[2];
                const float *y = f[3] == -1 ? b : b + i0 * sb[0] + i1 * sb[1] + i2 * sb[2];
                for (int64_t i = 0; i < n[3]; i++) {
                    const float u = x[i * sa[3]], v = y[i * b3];
                    o[i * so[3]] = f[0] == STEP_COPY ? u : f[0] == STEP_ADD ? u + v : u * v;
                }
            }
}

static void step_linear(team *t, int vnni, const int64_t *f, float *arena) {
    float *scratch = arena + f[8];
    packed_linear(t, vnni, arena + f[2], (int)f[3], (const uint8_t *)(intptr_t)f[5], (const float *)(intptr_t)f[6],
                  (const float *)(intptr_t)f[7], arena + f[1], (int)f[4], (int8_t *)scratch, scratch + f[3] / 4);
}

/* the logits: an 8-bit table against the row quantized to int8 (logits8_*), a 4-bit one in fp32 (nbits_gemv) */
static void step_logits(team *t, int vnni, const int64_t *f, float *arena) {
    const int K = (int)f[3], G = (int)f[4];
    const uint8_t *w = (const uint8_t *)(intptr_t)f[7];
    const float *ws = (const float *)(intptr_t)f[8];
    if (f[5] == 8) {
        int8_t *xq = (int8_t *)(arena + f[9]);
        float *xs = arena + f[9] + K / 4;
        quantize_vector(arena + f[2], K, G, 128.f, xq, NULL, xs, xs + K / G);
        const logits8_job job = {xq, xs, xs + K / G, K, G, w, ws, arena + f[1]};
        team_run(t, vnni ? logits8_vnni_task : logits8_avx2_task, &job, (int)f[6], 64);
    } else {
        const logits_job job = {arena + f[2], K, G, 4, w, ws, arena + f[1]};
        team_run(t, logits_task, &job, (int)f[6], 64);
    }
}

/* this step's key and value into the fp16 cache at position `past`, then the query (scaled) against positions
 * 0..past */
static void step_attend(team *t, int vnni, const int64_t *f, float *arena, int past) {
    const int heads = (int)f[5], hd = (int)f[6];
    const long capacity = (long)f[12];
    float *q = arena + f[14], *scratch = q + (size_t)heads * hd;
    const float scale = bits_to_float(f[13]);
    for (int h = 0; h < heads; h++)
        for (int d = 0; d < hd; d++) q[h * hd + d] = arena[f[2] + h * f[7] + d] * scale;
    uint16_t *keys = (uint16_t *)(intptr_t)f[10], *values = (uint16_t *)(intptr_t)f[11];
    heads_to_fp16(arena + f[3], 1, heads, hd, 0, (long)f[8], keys + (size_t)past * hd, capacity * hd, 0);
    heads_to_fp16(arena + f[4], 1, heads, hd, 0, (long)f[9], values + (size_t)past * hd, capacity * hd, 0);
    const attend_job job = {q, hd, past + 1, vnni, keys, values, capacity * hd, capacity, scratch, arena + f[1]};
    team_run(t, attend_task, &job, heads, 1);
}

/* Run `count` instructions of STEP_FIELDS on the arena for the token after `past` cached positions; path 0 avx2,
 * 1 avx512vnni for the GEMV. Nothing runs unless every instruction fits. */
int sc_step_run(void *handle, int path, const int64_t *code, int count, float *arena, int64_t arena_floats, int past) {
    if (!sc_kernels_supported()) return SC_NO_AVX2;
    if (path == 1 && !(sc_cpu_features() & SC_CPU_AVX512_VNNI)) return SC_NO_AVX512_VNNI;
    team *t = handle;
    if (!t || (path != 0 && path != 1) || count < 0 || past < 0 || arena_floats < 0 || arena_floats > INT_MAX)
        return SC_BAD_SHAPE;
    if (!code || !aligned(arena, 64)) return SC_MISALIGNED;
    for (int i = 0; i < count; i++) {
        const int64_t *f = code + (size_t)i * STEP_FIELDS;
        if (!step_instruction_fits(f, arena_floats, t->threads) || (f[0] == STEP_ATTEND && past >= f[12]))
            return SC_BAD_SHAPE;
    }
    for (int i = 0; i < count; i++) {
        const int64_t *f = code + (size_t)i * STEP_FIELDS;
        switch (f[0]) {
        case STEP_LAYER_NORM:
            layer_norm(arena + f[2], 1, (int)f[3], (const float *)(intptr_t)f[4], (const float *)(intptr_t)f[5],
                       bits_to_float(f[6]), arena + f[1]);
            break;
        case STEP_LINEAR:
            step_linear(t, path, f, arena);
            break;
        case STEP_GELU:
            memmove(arena + f[1], arena + f[2], sizeof(float) * (size_t)f[3]);
            gelu(arena + f[1], (size_t)f[3]);
            break;
        case STEP_ATTEND:
            step_attend(t, path, f, arena, past);
            break;
        case STEP_LOGITS:
            step_logits(t, path, f, arena);
            break;
        default:
            step_elementwise(f, arena);
        }
    }
    return SC_OK;
}

#ifndef SC_STANDALONE
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_prompt_kernels",
                                    "C kernels loaded through ctypes by appliance.kernels.native", -1, NULL};

PyMODINIT_FUNC PyInit__prompt_kernels(void) { return PyModule_Create(&module); }
#endif
