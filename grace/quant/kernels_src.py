"""C source of the CPU kernels behind grace/quant/kernels.py (compiled there at first use).

Kept in a .py file so it ships inside the package with no package-data configuration.
"""

# bumped whenever a kernel's signature or behaviour changes; kernels.py loads only a library that reports it
VERSION = 24

SOURCE = f"#define GRACE_KERNELS_VERSION {VERSION}\n" + r"""
// GRACE CPU kernels (compiled at first use by grace/quant/kernels.py; AVX-512 with BF16 dot products).
// All GEMVs take bf16 activations x [M, K] and write y [M, N] in fp32 or bf16 (flag yb); accumulation is fp32 throughout.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

// fp32 -> bf16, round to nearest even (NaN stays a quiet NaN), as torch converts
static inline uint16_t f_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
// the GEMVs write fp32, or bf16 (the same fp32 value rounded) where the caller wants its output dtype directly
static inline void put(void *y, int yb, int64_t i, float v) {
    if (yb) ((uint16_t *)y)[i] = f_to_bf16(v); else ((float *)y)[i] = v;
}
static inline float bf16_to_f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

#define ALWAYS static inline __attribute__((always_inline))
#define MANY_MAX 8           // weights per *_many call (kernels.MANY_MAX)
#define ATTN_MAX_D 256       // decode attention: head dim and query heads per key/value head (kernels.ATTENTION_MAX_*)
#define ATTN_MAX_GROUP 16
#define FOR_M(MM, CALL) do { if ((MM) == 4) CALL(4); else if ((MM) == 3) CALL(3); else if ((MM) == 2) CALL(2); else CALL(1); } while (0)

// a *_many call's batches of `per` tiles (a weight's last batch may be short): weight w's batches follow weight
// w-1's; first[w] is weight w's first batch; returns the number of batches
static inline int64_t batch_table(const int64_t *Ns, int count, int64_t per, int64_t *first) {
    first[0] = 0;
    for (int w = 0; w < count; w++) first[w + 1] = first[w] + (Ns[w] / 8 + per - 1) / per;
    return first[count];
}
// ... of single tiles: weight w's N[w] / 8 tiles follow weight w-1's
static inline int64_t tile_table(const int64_t *Ns, int count, int64_t *first) { return batch_table(Ns, count, 1, first); }
static inline int weight_of(const int64_t *first, int64_t t) {
    int w = 0;
    while (t >= first[w + 1]) w++;
    return w;
}
// the quantized *_many GEMVs: every tile b of every weight (codes / params / ys / Ns[w]) in one parallel loop,
// its M activation rows in passes of up to four (CALL(MM) sees codes, params, y, N, b and m0)
#define EACH_TILE_IN_PASSES_OF_4(CODES, PARAMS, CALL)                                                        \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                                            \
    for (int64_t t = 0; t < tiles; t++) {                                                                   \
        int w = weight_of(first, t);                                                                        \
        const void *codes = (CODES)[w];                                                                     \
        const uint16_t *params = (PARAMS)[w];                                                               \
        void *y = ys[w];                                                                                    \
        int64_t N = Ns[w], b = t - first[w];                                                                \
        for (int64_t m0 = 0; m0 < M; m0 += 4) {                                                             \
            int64_t mm = M - m0 < 4 ? M - m0 : 4;                                                           \
            FOR_M(mm, CALL);                                                                                \
        }                                                                                                   \
    }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define GRACE_KERNELS 1
#include <immintrin.h>
int grace_kernels_isa(void) { return 512; }      // kernels.isa(): which branch of this file was built
#define PREFETCH_TILES 2     // how far ahead (in tiles' worth of one group, or of one 128-column chunk) to prefetch
// ... into L1; the GEMVs also keep a longer stream into L2: 2 KB ahead is about one DRAM latency at their rate,
// too few lines in flight. 16 KB ahead as well (cold weights, paired rounds against the L1 stream alone): bf16 GEMV
// 9-17 % faster at one row, INT8 GEMV 5-25 % at 1-4 rows and its tile GEMM 11-22 % at 8-16, INT4 0-12 % at one and
// two rows (from four rows on, bound by compute, the extra prefetches cost it 1-3 %, so it skips them there); the
// dequantizers, bound by their writes, stay level.
#define L2_AHEAD_BYTES 16384

// 16 bf16 -> fp32 (exact)
static inline __m512 bf16x16_to_ps(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

// the sum of 16 lanes in a fixed order (halves, then quarters, then (l0 + l2) + (l1 + l3)), whatever the compiler's
// _mm512_reduce_add_ps does: bf16_tile's 4x4 blocks reproduce it, so every row gets the same bits at any M
static inline float hsum(__m512 v) {
    __m256 h = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)), _mm512_castps512_ps256(v));
    __m128 q = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
    __m128 p = _mm_add_ps(q, _mm_permute_ps(q, 0x4E));
    return _mm_cvtss_f32(p) + _mm_cvtss_f32(_mm_permute_ps(p, 0x55));
}

// ---- dequantize rows n0 .. n0+rows-1 into bf16 [rows, K], as the modules' dequantize(): one rounding to
// nearest even of the exact fp32 value; the hardware conversion flushes results below 2^-126 to zero
// (torch keeps those denormals) and keeps NaN payloads: no weight of a finite-scale model is either.
static inline void store_bf16_x32(uint16_t *o, __m512 lo, __m512 hi) {
    _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}
// The dequantizers write their buffer with non-temporal stores where it is 64-byte aligned: the buffer was
// evicted by the GEMM that read it last time, and ordinary stores would first read every line back from DRAM
// (measured: dequantizing 2M weights right after a 256-row GEMM took 0.28 ms instead of 0.08 ms).
static inline void put_x32(uint16_t *o, __m512i v, int stream) {
    if (stream) _mm512_stream_si512((__m512i *)o, v); else _mm512_storeu_si512(o, v);
}
static inline void put_bf16_x32(uint16_t *o, __m512 lo, __m512 hi, int stream) {
    put_x32(o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo), stream);
}

// Tiled layouts (see quant/int8.py and quant/int4.py): the weights of 8 output rows are one contiguous
// stream, so the GEMVs read DRAM sequentially (row-major storage made every row of a tile its own stream,
// and reached under half the bandwidth); the scales of a tile are contiguous too.
//   int8: q [N/8][G][8][gs] int8, s [N/8][G][8] bf16          W[n, k] = q * s
//   int4: p [N/8][K/128][8][64] bytes (nibble t of 16-bit lane j of a row's 64 bytes = column 4j + t of that
//         128-column chunk), sz [N/8][G][8][2] bf16          W[n, k] = (c - 8) * s + z
// 32 consecutive codes of one row times their scale, rounded to bf16 (32 weights in column order)
static inline __m512i int8_x32(const int8_t *q, __m512 sv) {
    __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
    __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(w1, sv), _mm512_mul_ps(w0, sv));
}
// One tile b, rows n0 .. n0+rows-1 of the weight only, into out (row n at out + (n - n0) * ostride).
ALWAYS void int8_tile_to_bf16(const int8_t *q, const uint16_t *s, uint16_t *out, int64_t ostride, int64_t K,
                              int64_t gs, int64_t b, int64_t n0, int64_t rows, int stream) {
    int64_t G = K / gs;
    for (int64_t g = 0; g < G; g++) {
        const int8_t *blk = q + (b * G + g) * 8 * gs;
        for (int64_t o = 0; o < 8 * gs; o += 64) _mm_prefetch((const char *)(blk + PREFETCH_TILES * 8 * gs + o), _MM_HINT_T0);
        for (int64_t o = 0; o < 8 * gs; o += 64) _mm_prefetch((const char *)(blk + L2_AHEAD_BYTES + o), _MM_HINT_T1);
        for (int r = 0; r < 8; r++) {
            int64_t n = b * 8 + r;
            if (n < n0 || n >= n0 + rows) continue;
            __m512 sv = _mm512_set1_ps(bf16_to_f(s[(b * G + g) * 8 + r]));
            const int8_t *qg = blk + r * gs;
            uint16_t *o = out + (n - n0) * ostride + g * gs;
            for (int64_t j = 0; j < gs; j += 32) put_x32(o + j, int8_x32(qg + j, sv), stream);
        }
    }
}

// columns 2i and 2i+1 of 32 come from one byte: its low and high nibble. A byte's two codes go through a
// 16-entry table of c - 8 (vpermps reads only an index's low 4 bits, so no masking), one fma each with the
// group's scale and offset ((c - 8) * s is exact, so the fma rounds once, like fp32 torch), then both halves
// are rounded to bf16 together and interleaved back into column order.
static const int16_t INTERLEAVE_32[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                          8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// columns 32h .. 32h+31 of a row's 128-column chunk, from its 16 bytes at q = row + 16h
static inline __m512i int4_x32(const uint8_t *q, __m512 sv, __m512 zv, __m512 table, __m512i inter) {
    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    __m512 lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(d, table), sv, zv);
    __m512 hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table), sv, zv);
    return _mm512_permutexvar_epi16(inter, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

ALWAYS void int4_tile_to_bf16(const uint8_t *p, const uint16_t *sz, uint16_t *out, int64_t ostride, int64_t K,
                              int64_t gs, int64_t b, int64_t n0, int64_t rows, int stream) {
    int64_t G = K / gs, C = K / 128;
    const __m512 table = _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
    const __m512i inter = _mm512_loadu_si512(INTERLEAVE_32);
    for (int64_t c = 0; c < C; c++) {
        const uint8_t *blk = p + (b * C + c) * 512;                           // 8 rows x 128 columns
        for (int o = 0; o < 512; o += 64) _mm_prefetch((const char *)(blk + PREFETCH_TILES * 2 * 512 + o), _MM_HINT_T0);
        const uint16_t *sg = sz + (b * G + c * 128 / gs) * 16;
        for (int r = 0; r < 8; r++) {
            int64_t n = b * 8 + r;
            if (n < n0 || n >= n0 + rows) continue;
            __m512 sv = _mm512_set1_ps(bf16_to_f(sg[2 * r])), zv = _mm512_set1_ps(bf16_to_f(sg[2 * r + 1]));
            uint16_t *o = out + (n - n0) * ostride + c * 128;
            for (int h = 0; h < 4; h++) put_x32(o + 32 * h, int4_x32(blk + 64 * r + 16 * h, sv, zv, table, inter), stream);
        }
    }
}

// ---- bf16: y[m, n] = sum_k x[m, k] w[n, k]; tiles of R output rows x MM activation rows -------------
ALWAYS void bf16_tile(const uint16_t *x, const uint16_t *wt, void *y, int yb, int64_t N, int64_t K,
                      int64_t n0, int64_t m0, const int MM, const int R) {      // wt: row n0's weights, rows K apart
    __m512 acc[4][8];
    for (int i = 0; i < MM; i++) for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh xv[4];
        for (int i = 0; i < MM; i++) xv[i] = (__m512bh)_mm512_loadu_si512(x + (m0 + i) * K + k);
        for (int r = 0; r < R; r++) {
            if (MM == 1 && R == 8) {      // one row (decode): each weight row L2_AHEAD_BYTES / 8 ahead, on into the next tile's
                int64_t a = k + L2_AHEAD_BYTES / 16;
                _mm_prefetch((const char *)(a < K ? wt + r * K + a : wt + (8 + r) * K + a - K), _MM_HINT_T1);
            }
            __m512bh wv = (__m512bh)_mm512_loadu_si512(wt + r * K + k);
            for (int i = 0; i < MM; i++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv[i], wv);
        }
    }
    if (MM == 4 && R == 4) {
        // 16 sums at once (~50 shuffles and adds where 16 separate reductions take ~130), each in hsum's order, so
        // a row's result does not depend on how many rows share the call
        __m512 c[8], e[4];
        for (int p = 0; p < 8; p++) {        // lanes j < 8 of a vector: v[j] + v[j + 8], two vectors per register
            __m512 a = acc[p / 2][(2 * p) % 4], b = acc[p / 2][(2 * p) % 4 + 1];
            c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
        }
        for (int q = 0; q < 4; q++)          // then lanes j < 4: + lane j + 4; 128-bit block k = vector 4q + k
            e[q] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0x88),
                                 _mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0xDD));
        for (int q = 0; q < 4; q++) {        // then (l0 + l2) + (l1 + l3) within each block
            __m512 f = _mm512_add_ps(e[q], _mm512_permute_ps(e[q], 0x4E));
            float sums[16];
            _mm512_storeu_ps(sums, _mm512_add_ps(f, _mm512_permute_ps(f, 0xB1)));
            for (int r = 0; r < 4; r++) put(y, yb, (m0 + q) * N + n0 + r, sums[4 * r]);
        }
        return;
    }
    for (int i = 0; i < MM; i++) for (int r = 0; r < R; r++) put(y, yb, (m0 + i) * N + n0 + r, hsum(acc[i][r]));
}

// one row, several weights of whole 8-row tiles (N % 8 == 0) reading the same x, as for the quantized GEMVs
void grace_gemv_bf16_many(const uint16_t *x, const uint16_t *const *ws, void *const *ys, const int64_t *Ns, int count,
                          int64_t K, int nt, int yb) {
    int64_t first[MANY_MAX + 1], tiles = tile_table(Ns, count, first);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int w = weight_of(first, t);
        int64_t n0 = (t - first[w]) * 8;
        bf16_tile(x, ws[w] + n0 * K, ys[w], yb, Ns[w], K, n0, 0, 1, 8);
    }
}
void grace_gemv_bf16(const uint16_t *x, const uint16_t *w, void *y, int64_t M, int64_t N, int64_t K, int nt, int yb) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < (N + 3) / 4; b++) {
        int64_t n0 = b * 4;
        if (M == 1 && (b & 1) && n0 + 4 <= N) continue;      // one row: 8-row tiles, as for int4 below
        if (M == 1 && n0 + 8 <= N) { bf16_tile(x, w + n0 * K, y, yb, N, K, n0, 0, 1, 8); continue; }
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int64_t mm = M - m0 < 4 ? M - m0 : 4;
            if (n0 + 4 <= N) {
#define BF16_CALL(T) bf16_tile(x, w + n0 * K, y, yb, N, K, n0, m0, T, 4)
                FOR_M(mm, BF16_CALL);
            } else {
                for (int64_t n = n0; n < N; n++) for (int64_t m = m0; m < m0 + mm; m++) bf16_tile(x, w + n * K, y, yb, N, K, n, m, 1, 1);
            }
        }
    }
}

// ---- int8 tiles: per tile, group and row, the codes (exact in bf16) are converted 32 at a time and met with
// one bf16 dot product per activation row; each group's sum is scaled in fp32. MM activation rows per pass.
ALWAYS void int8_tile(const uint16_t *x, const int8_t *q, const uint16_t *s, void *y, int yb, int64_t N, int64_t K,
                      int64_t gs, int64_t b, int64_t m0, const int MM) {
    __m512 tot[4][8];       // registers at MM = 1; more rows spill to L1, which their reuse of the codes repays
    for (int i = 0; i < MM; i++) for (int r = 0; r < 8; r++) tot[i][r] = _mm512_setzero_ps();
    int64_t G = K / gs;
    for (int64_t g = 0; g < G; g++) {
        const int8_t *blk = q + (b * G + g) * 8 * gs;
        for (int64_t o = 0; o < 8 * gs; o += 64) _mm_prefetch((const char *)(blk + PREFETCH_TILES * 8 * gs + o), _MM_HINT_T0);
        if (m0 == 0) for (int64_t o = 0; o < 8 * gs; o += 64) _mm_prefetch((const char *)(blk + L2_AHEAD_BYTES + o), _MM_HINT_T1);
        const uint16_t *sg = s + (b * G + g) * 8;
        for (int r = 0; r < 8; r++) {
            const int8_t *qr = blk + r * gs;
            __m512 a[4][2];
            for (int i = 0; i < MM; i++) { a[i][0] = _mm512_setzero_ps(); a[i][1] = _mm512_setzero_ps(); }
            for (int64_t j = 0; j < gs; j += 64) {
                __m512 c0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + j))));
                __m512 c1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + j + 16))));
                __m512 c2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + j + 32))));
                __m512 c3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + j + 48))));
                __m512bh w0 = _mm512_cvtne2ps_pbh(c1, c0), w1 = _mm512_cvtne2ps_pbh(c3, c2);
                for (int i = 0; i < MM; i++) {
                    const uint16_t *xg = x + (m0 + i) * K + g * gs + j;
                    a[i][0] = _mm512_dpbf16_ps(a[i][0], (__m512bh)_mm512_loadu_si512(xg), w0);
                    a[i][1] = _mm512_dpbf16_ps(a[i][1], (__m512bh)_mm512_loadu_si512(xg + 32), w1);
                }
            }
            __m512 sv = _mm512_set1_ps(bf16_to_f(sg[r]));
            for (int i = 0; i < MM; i++) tot[i][r] = _mm512_fmadd_ps(_mm512_add_ps(a[i][0], a[i][1]), sv, tot[i][r]);
        }
    }
    for (int i = 0; i < MM; i++) for (int r = 0; r < 8; r++) put(y, yb, (m0 + i) * N + b * 8 + r, _mm512_reduce_add_ps(tot[i][r]));
}

void grace_gemv_int8_many(const uint16_t *x, const int8_t *const *qs, const uint16_t *const *ss, void *const *ys,
                          const int64_t *Ns, int count, int64_t M, int64_t K, int64_t gs, int nt, int yb) {
    int64_t first[MANY_MAX + 1], tiles = tile_table(Ns, count, first);
#define I8_CALL(T) int8_tile(x, (const int8_t *)codes, params, y, yb, N, K, gs, b, m0, T)
    EACH_TILE_IN_PASSES_OF_4(qs, ss, I8_CALL);
}
void grace_gemv_int8(const uint16_t *x, const int8_t *q, const uint16_t *s, void *y, int64_t M, int64_t N, int64_t K,
                     int64_t gs, int nt, int yb) {
    grace_gemv_int8_many(x, &q, &s, &y, &N, 1, M, K, gs, nt, yb);
}

// ---- int4 tiles: a nibble or'ed into 0x4300 is the bf16 number 128 + c, so each nibble vector is a bf16
// vector without conversion: sum_k W x = s * sum (128 + c) x - (136 s - z) * sum x   (x pre-permuted to the
// nibble order; sx holds the sums of x over each 128-column chunk). MM activation rows (1-4) per pass over a
// tile: each 64-byte row chunk is unpacked once for all of them. Per chunk and row, the MM chunk sums start
// from zero and are scaled into running sums kept in an L1 array (32 of them at MM = 4: registers hold the
// 16 x vectors and the codes; passes of two rows that kept the sums in registers unpacked every byte twice
// at four rows and were 10-25 % slower at three and four rows, and no faster at one or two).
#define NIB(v, sh) ((__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, sh), low, magic, 0xEA))  // (v>>sh & 15) | magic
ALWAYS void int4_tile(const uint16_t *xp, const float *sx, const uint8_t *p, const uint16_t *sz, void *y, int yb, int64_t N,
                      int64_t K, int64_t gs, int64_t b, int64_t m0, const int MM) {
    const __m512i low = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
    __attribute__((aligned(64))) float tot[4][8][16];
    __attribute__((aligned(64))) float par[16];      // this chunk's (scale, zero) of the 8 rows, in fp32
    __m512 off[4];                                    // lane 2r + 1: row r's sum of (z - 136 s) * sum x
    const __m512 k136 = _mm512_set1_ps(136.f);
    for (int i = 0; i < MM; i++) {
        off[i] = _mm512_setzero_ps();
        for (int r = 0; r < 8; r++) _mm512_store_ps(tot[i][r], _mm512_setzero_ps());
    }
    int64_t C = K / 128, G = K / gs;
    const uint8_t *tile = p + b * C * 512;
    for (int64_t c = 0; c < C; c++) {
        const uint8_t *blk = tile + c * 512;                                  // 8 rows x 128 columns
        for (int o = 0; o < 512; o += 64) _mm_prefetch((const char *)(blk + PREFETCH_TILES * 2 * 512 + o), _MM_HINT_T0);
        if (MM <= 2) for (int o = 0; o < 512; o += 64) _mm_prefetch((const char *)(blk + L2_AHEAD_BYTES + o), _MM_HINT_T1);
        __m512bh xv[4][4];
        float sxc[4];
        for (int i = 0; i < MM; i++) {
            for (int t = 0; t < 4; t++) xv[i][t] = (__m512bh)_mm512_loadu_si512(xp + (m0 + i) * K + c * 128 + 32 * t);
            sxc[i] = sx[(m0 + i) * C + c];
        }
        // the 8 rows' scales and zeros converted at once, and their offsets in one vector op per activation row
        // (one by one as scalars, each a conversion and a move into the vector unit, they cost the GEMV 7-10 % at
        // one row and 8-15 % at 2-4, warm weights, AMD Zen 4; the same bits either way)
        __m512 ps = bf16x16_to_ps(sz + (b * G + c * 128 / gs) * 16);
        _mm512_store_ps(par, ps);
        __m512 zs = _mm512_fnmadd_ps(k136, _mm512_permute_ps(ps, 0xA0), ps);       // lane 2r + 1: z - 136 s
        for (int i = 0; i < MM; i++) off[i] = _mm512_fmadd_ps(zs, _mm512_set1_ps(sxc[i]), off[i]);
        for (int r = 0; r < 8; r++) {
            __m512i v = _mm512_loadu_si512(blk + 64 * r);
            __m512bh w0 = (__m512bh)_mm512_ternarylogic_epi32(v, low, magic, 0xEA), w1 = NIB(v, 4), w2 = NIB(v, 8);
            __m512bh w3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), magic);
            __m512 sv = _mm512_set1_ps(par[2 * r]);
            for (int i = 0; i < MM; i++) {
                __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), xv[i][0], w0);
                a = _mm512_dpbf16_ps(a, xv[i][1], w1);
                a = _mm512_dpbf16_ps(a, xv[i][2], w2);
                a = _mm512_dpbf16_ps(a, xv[i][3], w3);
                _mm512_store_ps(tot[i][r], _mm512_fmadd_ps(a, sv, _mm512_load_ps(tot[i][r])));
            }
        }
    }
    for (int i = 0; i < MM; i++) {
        float offs[16];
        _mm512_storeu_ps(offs, off[i]);
        for (int r = 0; r < 8; r++)
            put(y, yb, (m0 + i) * N + b * 8 + r, _mm512_reduce_add_ps(_mm512_load_ps(tot[i][r])) + offs[2 * r + 1]);
    }
}

// Several weights that read the same x (a layer's q / k / v or gate / up projections) in one call: one prologue,
// one parallel region over all their tiles (weight w's tiles follow weight w-1's), one output each.
void grace_gemv_int4_many(const uint16_t *x, const uint8_t *const *ps, const uint16_t *const *szs, void *const *ys,
                          const int64_t *Ns, int count, int64_t M, int64_t K, int64_t gs, int nt, int yb) {
    int64_t C = K / 128, first[MANY_MAX + 1], tiles = tile_table(Ns, count, first);
    uint16_t *xp = (uint16_t *)malloc(sizeof(uint16_t) * M * K);
    float *sx = (float *)malloc(sizeof(float) * M * C);
    // x in the nibble order (each 128-chunk de-interleaved by 4) and its chunk sums, vectorized: done by one
    // thread before the parallel part, as scalar loops they cost 6-16 % of a small GEMV
    __m512i idx[4];
    for (int t = 0; t < 4; t++) {
        int16_t v[32];
        for (int j = 0; j < 32; j++) v[j] = (int16_t)(4 * (j % 16) + t);     // word 4j+t of (a, b): bit 5 picks b
        idx[t] = _mm512_loadu_si512(v);
    }
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xm = x + m * K;
        uint16_t *xpm = xp + m * K;
        for (int64_t c = 0; c < K; c += 128) {
            __m512i z0 = _mm512_loadu_si512(xm + c), z1 = _mm512_loadu_si512(xm + c + 32);
            __m512i z2 = _mm512_loadu_si512(xm + c + 64), z3 = _mm512_loadu_si512(xm + c + 96);
            for (int t = 0; t < 4; t++) {
                __m512i lo = _mm512_permutex2var_epi16(z0, idx[t], z1), hi = _mm512_permutex2var_epi16(z2, idx[t], z3);
                _mm512_storeu_si512(xpm + c + 32 * t, _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1));
            }
        }
        for (int64_t c = 0; c < C; c++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t k = c * 128; k < (c + 1) * 128; k += 16) acc = _mm512_add_ps(acc, bf16x16_to_ps(xm + k));
            sx[m * C + c] = _mm512_reduce_add_ps(acc);
        }
    }
#define I4_CALL(T) int4_tile(xp, sx, (const uint8_t *)codes, params, y, yb, N, K, gs, b, m0, T)
    EACH_TILE_IN_PASSES_OF_4(ps, szs, I4_CALL);
    free(xp);
    free(sx);
}
void grace_gemv_int4(const uint16_t *x, const uint8_t *p, const uint16_t *sz, void *y, int64_t M, int64_t N, int64_t K,
                     int64_t gs, int nt, int yb) {
    grace_gemv_int4_many(x, &p, &sz, &y, &N, 1, M, K, gs, nt, yb);
}
// ---- INT8, a few more activation rows (INT8_GEMV_MAX_ROWS < M <= INT8_TILE_MAX_ROWS in kernels.py): each thread
// dequantizes one 8-row tile at a time into a bf16 buffer of 8 x K (L1 / L2), bit-identical to the dequantizers,
// and meets it with every activation row through the bf16 tile kernel, so the codes are unpacked once per call
// (the GEMVs unpack them again for every four rows) and no dequantized copy goes through DRAM.
void grace_tile_gemm_int8(const uint16_t *x, const int8_t *q, const uint16_t *s, void *y, int64_t M, int64_t N,
                          int64_t K, int64_t gs, int nt, int yb) {
#pragma omp parallel num_threads(nt)
    {
        uint16_t *wt = (uint16_t *)aligned_alloc(64, (size_t)(16 * K));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < N / 8; b++) {
            int8_tile_to_bf16(q, s, wt, K, K, gs, b, b * 8, 8, 0);
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                int64_t mm = M - m0 < 4 ? M - m0 : 4;
                for (int r0 = 0; r0 < 8; r0 += 4) {
                    const uint16_t *w4 = wt + r0 * K;
                    int64_t n0 = b * 8 + r0;
#define TILE_ROWS_CALL(T) bf16_tile(x, w4, y, yb, N, K, n0, m0, T, 4)
                    FOR_M(mm, TILE_ROWS_CALL);
                }
            }
        }
        free(wt);
    }
}


// ---- many rows, at the bf16 dot product's peak: x is packed once per call into blocks of GEMM_MR rows,
// [K/2][rows] bf16 pairs (one 32-bit broadcast per row and k-pair; unpacked, the rows 4 KB apart thrashed L1).
// Each thread dequantizes 32 output rows at a time, each weight as the dequantizers round it, into the dot
// product's pair layout wv [K/2][32] (k-pair, row; in L2), and meets every block of x with it: per k-pair two
// weight vectors, one broadcast per row and 2 x GEMM_MR dot products into sums held in registers, so no
// horizontal sums and 24 products per 14 loads (the 4 x 4 tile kernel above: 16 per 8, and its 8 row streams
// missed L1). Every output is one fp32 sum over the k-pairs in order, the same at any M.
#define GEMM_MR 12
#define FOR_MR(MR, CALL) do { switch (MR) { case 12: CALL(12); break; case 11: CALL(11); break; case 10: CALL(10); break; \
    case 9: CALL(9); break; case 8: CALL(8); break; case 7: CALL(7); break; case 6: CALL(6); break; case 5: CALL(5); break;    \
    case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break; default: CALL(1); } } while (0)

// r[j] (16 32-bit elements each) := column j of the 16 x 16 matrix whose rows were r[0..15]
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], v[16];
    for (int j = 0; j < 16; j += 2) { t[j] = _mm512_unpacklo_epi32(r[j], r[j + 1]); t[j + 1] = _mm512_unpackhi_epi32(r[j], r[j + 1]); }
    for (int j = 0; j < 16; j += 4) {
        v[j] = _mm512_unpacklo_epi64(t[j], t[j + 2]); v[j + 1] = _mm512_unpackhi_epi64(t[j], t[j + 2]);
        v[j + 2] = _mm512_unpacklo_epi64(t[j + 1], t[j + 3]); v[j + 3] = _mm512_unpackhi_epi64(t[j + 1], t[j + 3]);
    }
    // v[4a + c], 128-bit lane l: rows 4a .. 4a+3 of column 4l + c; a 4 x 4 transpose of lanes for each c
    for (int c = 0; c < 4; c++) {
        __m512i x0 = _mm512_shuffle_i32x4(v[c], v[4 + c], 0x44), x1 = _mm512_shuffle_i32x4(v[c], v[4 + c], 0xEE);
        __m512i x2 = _mm512_shuffle_i32x4(v[8 + c], v[12 + c], 0x44), x3 = _mm512_shuffle_i32x4(v[8 + c], v[12 + c], 0xEE);
        r[c] = _mm512_shuffle_i32x4(x0, x2, 0x88); r[4 + c] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(x1, x3, 0x88); r[12 + c] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
    }
}

// a row's 16 possible weights in one group, bf16 (as int4_x32 rounds them), twice: vpermw reads 5 index bits
static inline __m512i int4_lut(__m512 sv, __m512 zv, __m512 table) {
    __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(table, sv, zv));
    return _mm512_inserti64x4(_mm512_castsi256_si512(h), h, 1);
}
// the 32 weights of 16 bytes as 16 column pairs (low nibble first), through the row's table
static inline __m512i int4_pairs_lut(const uint8_t *q, __m512i lut) {
    __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    return _mm512_permutexvar_epi16(_mm512_or_si512(d, _mm512_slli_epi32(d, 12)), lut);
}
// rows n0 .. n0+31 (zero from N on) of an int4 / int8 tiled weight into wv [K/2][32] pairs
ALWAYS void int4_block_to_pairs(const uint8_t *p, const uint16_t *sz, uint32_t *wv, int64_t N, int64_t K, int64_t gs, int64_t n0) {
    int64_t G = K / gs, C = K / 128;
    const __m512 table = _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
    for (int64_t c = 0; c < C; c++)
        for (int half = 0; half < 2; half++) {
            __m512i lut[16];
            const uint8_t *rows[16];
            for (int j = 0; j < 16; j++) {
                int64_t n = n0 + 16 * half + j, b = n / 8;
                rows[j] = NULL;
                if (n >= N) continue;
                const uint16_t *sg = sz + (b * G + c * 128 / gs) * 16 + 2 * (n % 8);
                lut[j] = int4_lut(_mm512_set1_ps(bf16_to_f(sg[0])), _mm512_set1_ps(bf16_to_f(sg[1])), table);
                rows[j] = p + (b * C + c) * 512 + 64 * (n % 8);
            }
            for (int h = 0; h < 4; h++) {
                __m512i r[16];
                for (int j = 0; j < 16; j++)
                    r[j] = rows[j] ? int4_pairs_lut(rows[j] + 16 * h, lut[j]) : _mm512_setzero_si512();
                transpose16(r);
                uint32_t *o = wv + (c * 64 + 16 * h) * 32 + 16 * half;
                for (int q = 0; q < 16; q++) _mm512_store_si512(o + q * 32, r[q]);
            }
        }
}
ALWAYS void int8_block_to_pairs(const int8_t *q, const uint16_t *s, uint32_t *wv, int64_t N, int64_t K, int64_t gs, int64_t n0) {
    int64_t G = K / gs;
    for (int64_t g = 0; g < G; g++)
        for (int half = 0; half < 2; half++) {
            __m512 sv[16];
            const int8_t *rows[16];
            for (int j = 0; j < 16; j++) {
                int64_t n = n0 + 16 * half + j, b = n / 8;
                rows[j] = NULL;
                if (n >= N) continue;
                sv[j] = _mm512_set1_ps(bf16_to_f(s[(b * G + g) * 8 + n % 8]));
                rows[j] = q + ((b * G + g) * 8 + n % 8) * gs;
            }
            for (int64_t j0 = 0; j0 < gs; j0 += 32) {
                __m512i r[16];
                for (int j = 0; j < 16; j++) r[j] = rows[j] ? int8_x32(rows[j] + j0, sv[j]) : _mm512_setzero_si512();
                transpose16(r);
                uint32_t *o = wv + ((g * gs + j0) / 2) * 32 + 16 * half;
                for (int j = 0; j < 16; j++) _mm512_store_si512(o + j * 32, r[j]);
            }
        }
}

// y[m0 .. m0+MR-1, n0 .. n0+31] (columns from N on dropped) from x's packed block xb [K/2][MR] and wv
// pf: the next block's codes (pf_lines cache lines), prefetched into L2 while this block computes, so that its
// dequantizing does not wait on DRAM
ALWAYS void gemm_micro(const uint32_t *xb, const uint32_t *wv, int64_t K, void *y, int yb, int64_t N, int64_t m0,
                       int64_t n0, const char *pf, int64_t pf_lines, const int MR) {
    __m512 acc[GEMM_MR][2];
    for (int i = 0; i < MR; i++) { acc[i][0] = _mm512_setzero_ps(); acc[i][1] = _mm512_setzero_ps(); }
    for (int64_t k = 0; k < K / 2; k++) {
        __m512bh w0 = (__m512bh)_mm512_load_si512(wv + k * 32), w1 = (__m512bh)_mm512_load_si512(wv + k * 32 + 16);
        _mm_prefetch((const char *)(wv + k * 32 + 512), _MM_HINT_T0);
        _mm_prefetch((const char *)(wv + k * 32 + 528), _MM_HINT_T0);
        if (k < pf_lines) _mm_prefetch(pf + 64 * k, _MM_HINT_T1);
        for (int i = 0; i < MR; i++) {
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)xb[k * MR + i]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, w0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, w1);
        }
    }
    int64_t cols = N - n0 < 32 ? N - n0 : 32;
    for (int i = 0; i < MR; i++) {
        float out[32];
        _mm512_storeu_ps(out, acc[i][0]);
        _mm512_storeu_ps(out + 16, acc[i][1]);
        for (int64_t j = 0; j < cols; j++) put(y, yb, (m0 + i) * N + n0 + j, out[j]);
    }
}

// rows of x (P pairs each) -> [P][stride] (rows <= 16): 16 pairs of every row at a time, transposed in registers;
// lanes rows .. min(stride, 16) - 1 of each k-pair are written as zeros (stride = rows: none)
static inline void pack_x_block(const uint32_t *xr, uint32_t *o, int64_t P, int64_t rows, int64_t stride) {
    int64_t lanes = stride < 16 ? stride : 16;
    __mmask16 keep = (__mmask16)((1u << lanes) - 1);
    int64_t k = 0;
    for (; k + 16 <= P; k += 16) {
        __m512i r[16];
        for (int i = 0; i < 16; i++) r[i] = i < rows ? _mm512_loadu_si512(xr + i * P + k) : _mm512_setzero_si512();
        transpose16(r);
        for (int q = 0; q < 16; q++) _mm512_mask_storeu_epi32(o + (k + q) * stride, keep, r[q]);
    }
    for (; k < P; k++) for (int64_t i = 0; i < lanes; i++) o[k * stride + i] = i < rows ? xr[i * P + k] : 0;
}

#define GEMM_CALL(T) gemm_micro(xb + m0 * P, wv, K, y, yb, N, m0, nb * 32, pf, m0 == 0 ? pf_lines : 0, T)
#define PAIR_GEMM(BLOCK_FN, W, S, BITS)                                                                           \
    int64_t P = K / 2;                                                                                      \
    uint32_t *xb = (uint32_t *)aligned_alloc(64, (size_t)((M * P * 4 + 63) / 64 * 64));                     \
    _Pragma("omp parallel num_threads(nt)")                                                                 \
    {                                                                                                       \
        _Pragma("omp for schedule(static)")                                                                 \
        for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {                                                        \
            int64_t mr = M - m0 < GEMM_MR ? M - m0 : GEMM_MR;                                               \
            pack_x_block((const uint32_t *)(x + m0 * K), xb + m0 * P, P, mr, mr);                           \
        }                                                                                                   \
        uint32_t *wv = (uint32_t *)aligned_alloc(64, (size_t)(P * 32 * 4));                                 \
        _Pragma("omp for schedule(static)")                                                                 \
        for (int64_t nb = 0; nb < (N + 31) / 32; nb++) {                                                    \
            BLOCK_FN(W, S, wv, N, K, gs, nb * 32);                                                          \
            int64_t rest = N - (nb + 1) * 32, rows = rest < 0 ? 0 : rest < 32 ? rest : 32;                    \
            const char *pf = rows ? (const char *)(W) + (nb + 1) * 32 * K * BITS / 8 : NULL;                \
            int64_t pf_lines = rows * K * BITS / 8 / 64;                                                    \
            for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {                                                   \
                int64_t mr = M - m0 < GEMM_MR ? M - m0 : GEMM_MR;                                           \
                FOR_MR(mr, GEMM_CALL);                                                                      \
            }                                                                                               \
        }                                                                                                   \
        free(wv);                                                                                           \
    }                                                                                                       \
    free(xb);

void grace_pair_gemm_int8(const uint16_t *x, const int8_t *q, const uint16_t *s, void *y, int64_t M, int64_t N,
                          int64_t K, int64_t gs, int nt, int yb) {
    PAIR_GEMM(int8_block_to_pairs, q, s, 8)
}
void grace_pair_gemm_int4(const uint16_t *x, const uint8_t *p, const uint16_t *sz, void *y, int64_t M, int64_t N,
                          int64_t K, int64_t gs, int nt, int yb) {
    PAIR_GEMM(int4_block_to_pairs, p, sz, 4)
}

// ---- many rows on AMX (Intel's tile unit, where the CPU has it and Linux grants it). Each thread dequantizes 32
// output rows at a time, as the dequantizers round them, into a row-major bf16 block (L2): that block is the tile
// unit's "A" operand as it stands (16 rows x 32 k a tile), so unlike the pair GEMM no transpose; x, packed once per
// call into k-pairs (the "B" layout: [K/2][32 rows] per block of 32 rows), is the other operand, and each 32 x 32
// block of sums comes out transposed (output row n, activation row m) and is transposed back in registers. Every
// output is one fp32 sum over the k-pairs in order; no row depends on another. Measured on a 2-core AMX guest: the
// AVX-512 pair GEMM ran at 1/8 of oneDNN's AMX bf16 GEMM at 256 rows, dequantize + oneDNN at 0.7-0.8x.
// GRACE_NO_AMX compiles this out (a compiler or assembler without AMX; kernels.py retries with it).
#ifndef GRACE_NO_AMX
#include <sys/syscall.h>
#include <unistd.h>
#define AMX __attribute__((target("amx-tile,amx-bf16")))
typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } amx_config;

// asks Linux for the tile state (once per process suffices; oneDNN asks the same); 1 when granted
int grace_amx_ready(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0; }

// tiles 0-3: sums of weight rows 16a .. 16a+15 and x rows 16b .. 16b+15 in tile 2a + b; 4-5: weights; 6-7: x
AMX static void amx_begin(void) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.rows[t] = 16; c.colsb[t] = 64; }
    _tile_loadconfig(&c);
}
AMX static void amx_end(void) { _tile_release(); }

// c [32 weight rows][32 x rows] fp32 := wa (32 rows, stride ws elements) times 16 * halves rows of a packed x block
AMX static void amx_block(const uint16_t *wa, int64_t ws, const uint32_t *xb, int64_t K, int halves, float *c) {
    long wstride = (long)(ws * 2);
    _tile_zero(0); _tile_zero(2);
    if (halves == 2) {
        _tile_zero(1); _tile_zero(3);
        for (int64_t k = 0; k < K; k += 32) {
            _tile_loadd(4, wa + k, wstride); _tile_loadd(5, wa + 16 * ws + k, wstride);
            _tile_loadd(6, xb + k * 16, 128); _tile_loadd(7, xb + k * 16 + 16, 128);
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(1, c + 16, 128); _tile_stored(3, c + 528, 128);
    } else {
        for (int64_t k = 0; k < K; k += 32) {
            _tile_loadd(4, wa + k, wstride); _tile_loadd(5, wa + 16 * ws + k, wstride);
            _tile_loadd(6, xb + k * 16, 128);
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(2, 5, 6);
        }
    }
    _tile_stored(0, c, 128); _tile_stored(2, c + 512, 128);
}

// 16 fp32 sums into y (fp32, or bf16 rounded as f_to_bf16: nearest even, NaN quiet), lanes in `keep` only
static inline void put16(void *y, int yb, int64_t i, __m512 v, __mmask16 keep) {
    if (!yb) { _mm512_mask_storeu_ps((float *)y + i, keep, v); return; }
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                  _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_mask_storeu_epi16((uint16_t *)y + i, keep, _mm512_cvtepi32_epi16(r));
}

// y[m0 .. m0+rows-1, n0 .. n0+cols-1] from c [32 weight rows][32 x rows], transposed back 16 x 16 at a time
static inline void amx_put_block(const float *c, void *y, int yb, int64_t N, int64_t m0, int64_t rows, int64_t n0,
                                 int64_t cols) {
    for (int a = 0; a * 16 < cols; a++) {
        __mmask16 keep = cols - 16 * a >= 16 ? 0xffff : (__mmask16)((1u << (cols - 16 * a)) - 1);
        for (int b = 0; b * 16 < rows; b++) {
            __m512i r[16];
            for (int j = 0; j < 16; j++) r[j] = _mm512_load_si512(c + (16 * a + j) * 32 + 16 * b);
            transpose16(r);
            for (int i = 0; i < 16 && 16 * b + i < rows; i++)
                put16(y, yb, (m0 + 16 * b + i) * N + n0 + 16 * a, _mm512_castsi512_ps(r[i]), keep);
        }
    }
}

// Each thread dequantizes WB = 32-128 output rows at a time (about 1 MB of bf16; fewer where there would be fewer
// blocks than threads) and meets every 32-row block of x with
// them, 32 rows at a time, while that block of x stays in L2: 32-row weight blocks re-read all of x from L3 for
// every 32 output rows (K = 6144 at 256 rows: 0.85x oneDNN). A's rows are K + 32 elements apart: at K = 2048 the 16
// rows of a tile 4 KB apart fell into one L1 set. Rows of a last, partial block beyond N hold whatever the buffer
// held (the tile unit raises no floating-point exceptions); their sums are dropped.
#define AMX_GEMM(TILE_FN, W, S)                                                                                  \
    int64_t MB = (M + 31) / 32, P = K / 2, ws = K + 32;                                                     \
    int64_t WB = (1 << 20) / (K * 2) / 32 * 32, per_thread = (N + nt - 1) / nt;                              \
    WB = WB > 128 ? 128 : WB;                                                                               \
    if (WB > per_thread) WB = (per_thread + 31) / 32 * 32;   /* at least a block per thread, on many cores */ \
    if (WB < 32) WB = 32;                                                                                   \
    uint32_t *xb = (uint32_t *)aligned_alloc(64, (size_t)(MB * P * 32 * 4));                                \
    _Pragma("omp parallel num_threads(nt)")                                                                 \
    {                                                                                                       \
        _Pragma("omp for schedule(static)")                                                                 \
        for (int64_t mb = 0; mb < MB; mb++)                     /* x's 32-row blocks, both halves, zero from M on */ \
            for (int64_t h = 0; h < 32; h += 16) {                                                          \
                int64_t rows = M - mb * 32 - h;                                                             \
                pack_x_block((const uint32_t *)(rows > 0 ? x + (mb * 32 + h) * K : x), xb + mb * P * 32 + h, P, \
                             rows < 0 ? 0 : rows > 16 ? 16 : rows, 32);                                     \
            }                                                                                               \
        uint16_t *wa = (uint16_t *)aligned_alloc(64, (size_t)(WB * ws * 2));                                \
        float *c = (float *)aligned_alloc(64, 32 * 32 * 4);                                                 \
        amx_begin();                                                                                        \
        _Pragma("omp for schedule(static)")                                                                 \
        for (int64_t nb = 0; nb < (N + WB - 1) / WB; nb++) {                                                \
            int64_t nw = N - nb * WB < WB ? N - nb * WB : WB;                                               \
            for (int64_t b = nb * WB / 8; b < (nb * WB + nw) / 8; b++) TILE_FN(W, S, wa, ws, K, gs, b, nb * WB, nw, 0); \
            for (int64_t mb = 0; mb < MB; mb++)                                                             \
                for (int64_t sub = 0; sub * 32 < nw; sub++) {                                               \
                    int64_t rows = M - mb * 32 < 32 ? M - mb * 32 : 32;                                     \
                    amx_block(wa + sub * 32 * ws, ws, xb + mb * P * 32, K, rows > 16 ? 2 : 1, c);            \
                    amx_put_block(c, y, yb, N, mb * 32, rows, nb * WB + sub * 32,                            \
                                  nw - sub * 32 < 32 ? nw - sub * 32 : 32);                                  \
                }                                                                                           \
        }                                                                                                   \
        amx_end();                                                                                          \
        free(c);                                                                                            \
        free(wa);                                                                                           \
    }                                                                                                       \
    free(xb);

void grace_amx_gemm_int8(const uint16_t *x, const int8_t *q, const uint16_t *s, void *y, int64_t M, int64_t N,
                         int64_t K, int64_t gs, int nt, int yb) {
    AMX_GEMM(int8_tile_to_bf16, q, s)
}
void grace_amx_gemm_int4(const uint16_t *x, const uint8_t *p, const uint16_t *sz, void *y, int64_t M, int64_t N,
                         int64_t K, int64_t gs, int nt, int yb) {
    AMX_GEMM(int4_tile_to_bf16, p, sz)
}

// ---- INT8, a few rows (decode) on AMX's integer unit, the codes read as they are stored. Each activation row
// becomes integers X = x * 2^(30 - E) (E: the exponent just above the row's largest |x|, so |X| < 2^30; every x
// within 2^-22 of that largest is exact, smaller ones are rounded at 2^-31 of it) written as four signed 8-bit
// digits, X = d0 + 2^8 d1 + 2^16 d2 + 2^24 d3. The tile unit sums code x digit products exactly in int32; each
// group's digit sums are scaled by 2^8i (exact) and by the group's scale in one fp32 fma, so the error is of the
// fp32 kind (~1e-7 relative, below the AVX-512 GEMV's), not bf16's. On a 2-core AMX guest whose bf16 dot products
// run at 0.4 a cycle the AVX-512 INT8 GEMV was bound by its int8 -> bf16 conversions (12-13 GB/s with DRAM at 18+);
// this one moved 16-28 GB/s on the 2B shapes (warm; cold, see amx_int8_tiles). x with an infinity or NaN takes the
// AVX-512 GEMV, whose result is NaN / inf as torch's would be (so does the AMX INT4 GEMV below).
#define AMXI __attribute__((target("amx-tile,amx-int8")))
#define AMX_GEMV_MAX_ROWS 4     // kernels.AMX_INT8_GEMV_MAX_ROWS at most: 4 rows x 4 digits fill a tile's 16 columns

// digit rows of the B operand for 16 columns of one row: per 64 columns ("a k-tile") 16 rows, row q holding at
// bytes 4 i .. 4 i + 3 digit i of columns 4q .. 4q+3 (row0: this row's first byte in the k-tile's first B row)
static inline void digits_x16(__m512 f, int shift, int8_t *row0, int64_t rowbytes) {
    __m512i X = _mm512_cvtps_epi32(_mm512_scalef_ps(f, _mm512_set1_ps((float)shift)));   // exact scaling, then RNE
    __m512i d[4], r = X;
    for (int i = 0; i < 3; i++) {
        d[i] = _mm512_srai_epi32(_mm512_slli_epi32(r, 24), 24);
        r = _mm512_srai_epi32(_mm512_sub_epi32(r, d[i]), 8);
    }
    d[3] = r;
    __m128i b0 = _mm512_cvtepi32_epi8(d[0]), b1 = _mm512_cvtepi32_epi8(d[1]);
    __m128i b2 = _mm512_cvtepi32_epi8(d[2]), b3 = _mm512_cvtepi32_epi8(d[3]);
    __m128i t0 = _mm_unpacklo_epi32(b0, b1), t1 = _mm_unpackhi_epi32(b0, b1);
    __m128i t2 = _mm_unpacklo_epi32(b2, b3), t3 = _mm_unpackhi_epi32(b2, b3);
    _mm_storeu_si128((__m128i *)row0, _mm_unpacklo_epi64(t0, t2));
    _mm_storeu_si128((__m128i *)(row0 + rowbytes), _mm_unpackhi_epi64(t0, t2));
    _mm_storeu_si128((__m128i *)(row0 + 2 * rowbytes), _mm_unpacklo_epi64(t1, t3));
    _mm_storeu_si128((__m128i *)(row0 + 3 * rowbytes), _mm_unpackhi_epi64(t1, t3));
}

// the exponent shift of each row (30 - E) into shift; returns 0 (shifts unset) where a row holds an infinity or NaN
static int amx_shifts(const uint16_t *x, int64_t M, int64_t K, int *shift) {
    for (int64_t m = 0; m < M; m++) {
        __m512i mx = _mm512_setzero_si512();
        for (int64_t k = 0; k < K; k += 32)
            mx = _mm512_max_epu16(mx, _mm512_and_si512(_mm512_loadu_si512(x + m * K + k), _mm512_set1_epi16(0x7fff)));
        uint16_t w[32], top = 0;
        _mm512_storeu_si512(w, mx);
        for (int j = 0; j < 32; j++) top = w[j] > top ? w[j] : top;
        if (top >= 0x7f80) return 0;
        shift[m] = 30 - ((int)(top >> 7) - 126);         // |x| < 2^(biased exponent - 126), denormals included
    }
    return 1;
}

// k-tile t (64 columns) of every row into xd: 16 rows of 16 M bytes, row m's digits at bytes 16 m .. 16 m + 15
static inline void amx_digit_tile(const uint16_t *x, const int *shift, int64_t M, int64_t K, int64_t t, int8_t *xd) {
    int64_t rowbytes = 16 * M;
    for (int64_t m = 0; m < M; m++)
        for (int u = 0; u < 4; u++)
            digits_x16(bf16x16_to_ps(x + m * K + t * 64 + 16 * u), shift[m], xd + (t * 16 + 4 * u) * rowbytes + 16 * m,
                       rowbytes);
}

AMXI static void amx_gemv_begin(int64_t M) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) {        // 0-1: sums [8 weight rows][M rows][4 digits]; 2-3: codes; 4-5: digits
        c.rows[t] = t < 4 ? 8 : 16;
        c.colsb[t] = t == 2 || t == 3 ? 64 : (uint16_t)(16 * M);
    }
    _tile_loadconfig(&c);
}

// row[v] := each lane's weight row in vector v of sums laid out [weight rows][4 M] (4 digits of each of M rows)
ALWAYS void amx_lane_rows(__m512i *row, int vectors, const int MM) {
    for (int v = 0; v < vectors; v++) {
        int32_t l[16];
        for (int j = 0; j < 16; j++) l[j] = (16 * v + j) / (4 * MM);
        row[v] = _mm512_loadu_si512(l);
    }
}

// one group's sums cb [weight rows][4 M] int32 (`vectors` of them: 2 M for 8 rows, 4 M for 16) into tot (the same
// layout in fp32): tot += (cb * 2^(8 digit)) * the scale of its weight row; sc: the rows' scales in lanes 0, 1, ...,
// row: amx_lane_rows
ALWAYS void amx_combine(const int32_t *cb, __m512 sc, __m512 *tot, const __m512i *row, const int vectors) {
    const __m512 dw = _mm512_setr_ps(1.f, 256.f, 65536.f, 16777216.f, 1.f, 256.f, 65536.f, 16777216.f,
                                     1.f, 256.f, 65536.f, 16777216.f, 1.f, 256.f, 65536.f, 16777216.f);
    for (int v = 0; v < vectors; v++) {
        __m512 c = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(cb + 16 * v)), dw);
        tot[v] = _mm512_fmadd_ps(c, _mm512_permutexvar_ps(row[v], sc), tot[v]);
    }
}

// S neighbouring 8-row tiles b0 .. b0 + S - 1 at once, group by group ("units": one group of one tile), so that
// the S units of a group share its digit tiles, loaded once (for groups of up to 128 columns, whose k-tiles fit in
// tiles 4 and 5). On the 2-core AMX guest a tile load costs about a cycle per row, and the digits' 16-row loads
// were two thirds of the rows loaded; sharing them across 8 tiles made the GEMV 10-25 % faster on cold weights.
// Each unit's sums go to tile 0 or 1 by its parity and are stored and combined one unit late, so the vector unit
// does not wait for the dot products it just issued; codes and digits alternate between tiles 2 / 4 and 3 / 5 by
// k-tile (spare tiles 6 / 7 for the codes were slower there). Tile numbers are immediates: the parities are
// branches. Each tile's groups are combined in order and every activation row's lanes see the same operations in
// the same order at any M and S, so a row gets the same bits alone or beside others, at any S.
#define AMX_STREAMS 8
#define AMX_PARITY(PAR, BODY) do { if (PAR) { BODY(1); } else { BODY(0); } } while (0)
#define I8_STORE(T) _tile_stored(T, cbs[h & 1], rowbytes)
#define AMX_ZERO(T) _tile_zero(T)
#define I8_KTILE(T) do {                                                                                    \
        if (t & 1) { _tile_loadd(3, codes + j, gs); if (fresh) _tile_loadd(5, xd + t * 16 * rowbytes, rowbytes); _tile_dpbssd(T, 3, 5); } \
        else { _tile_loadd(2, codes + j, gs); if (fresh) _tile_loadd(4, xd + t * 16 * rowbytes, rowbytes); _tile_dpbssd(T, 2, 4); } \
    } while (0)

AMXI ALWAYS void amx_int8_tiles(const int8_t *xd, const int *shift, const int8_t *q, const uint16_t *s, void *y,
                                int yb, int64_t N, int64_t K, int64_t gs, int64_t b0, int S, const int MM) {
    __attribute__((aligned(64))) int32_t cbs[2][8 * 16];
    __attribute__((aligned(64))) float out[8 * 16];
    __m512 tot[AMX_STREAMS][8];
    __m512i row[8];                   // lane -> weight row, once per call (amx_combine runs once per unit)
    amx_lane_rows(row, 2 * MM, MM);
    for (int v = 0; v < 2 * MM; v++)
        for (int i = 0; i < S; i++) tot[i][v] = _mm512_setzero_ps();
    int64_t G = K / gs, rowbytes = 16 * MM, units = G * S;
#define I8_COMBINE(H) amx_combine(cbs[(H) & 1], _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(             \
        _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(s + ((b0 + (H) % S) * G + (H) / S) * 8)))), 16)), \
        tot[(H) % S], row, 2 * MM)
    for (int64_t u = 0; u <= units; u++) {
        if (u < units) {
            int64_t g = u / S;
            const int8_t *codes = q + ((b0 + u % S) * G + g) * 8 * gs;
            // into L1 four units ahead (a tile load whose rows miss L1 waits on them); none into L2: the hardware's
            // streams do that, and L2_AHEAD_BYTES / S ahead in software was 4-16 % slower on the AMX guest
            if (u + 4 < units) {
                const int8_t *next = q + ((b0 + (u + 4) % S) * G + (u + 4) / S) * 8 * gs;
                for (int64_t o = 0; o < 8 * gs; o += 64) _mm_prefetch((const char *)(next + o), _MM_HINT_T0);
            }
            AMX_PARITY(u & 1, AMX_ZERO);
            int fresh = gs > 128 || u % S == 0;
            for (int64_t j = 0; j < gs; j += 64) {
                int64_t t = (g * gs + j) / 64;
                AMX_PARITY(u & 1, I8_KTILE);
            }
        }
        // unit u issued: store unit u - 1 and combine unit u - 2, stored one unit ago (read back at once, the
        // vector loads waited on the tile store); after the last unit, store it and combine the last two
        if (u > 0) {
            int64_t h = u - 1;
            AMX_PARITY(h & 1, I8_STORE);
            if (h > 0) I8_COMBINE(h - 1);
            if (u == units) I8_COMBINE(h);
        }
    }
#undef I8_COMBINE
    // y[m, n] = (row m's four digit sums, highest first) * 2^-shift
    for (int i = 0; i < S; i++) {
        for (int v = 0; v < 2 * MM; v++) _mm512_store_ps(out + 16 * v, tot[i][v]);
        for (int m = 0; m < MM; m++)
            for (int r = 0; r < 8; r++) {
                const float *d = out + r * 4 * MM + 4 * m;
                put(y, yb, m * N + (b0 + i) * 8 + r, ldexpf(((d[3] + d[2]) + d[1]) + d[0], -shift[m]));
            }
    }
}

// how many of `units` (tiles, or pairs of tiles) one batch of the AMX GEMVs takes: AMX_STREAMS, fewer where that
// would leave threads without two batches each
static inline int64_t amx_batch(int64_t units, int nt) {
    int64_t S = units / (2 * (int64_t)nt);
    return S < 1 ? 1 : S > AMX_STREAMS ? AMX_STREAMS : S;
}

// as grace_gemv_int8_many (M <= AMX_GEMV_MAX_ROWS): x's digits once per call (their k-tiles split between the
// threads), then every 8-row tile of every weight
AMXI void grace_amx_gemv_int8_many(const uint16_t *x, const int8_t *const *qs, const uint16_t *const *ss,
                                   void *const *ys, const int64_t *Ns, int count, int64_t M, int64_t K, int64_t gs,
                                   int nt, int yb) {
    int shift[AMX_GEMV_MAX_ROWS];
    if (M > AMX_GEMV_MAX_ROWS || !amx_shifts(x, M, K, shift)) {
        grace_gemv_int8_many(x, qs, ss, ys, Ns, count, M, K, gs, nt, yb);
        return;
    }
    int64_t firstb[MANY_MAX + 1], ktiles = K / 64, S = amx_batch(tile_table(Ns, count, firstb), nt);
    int64_t batches = batch_table(Ns, count, S, firstb);
    int8_t *xd = (int8_t *)aligned_alloc(64, (size_t)(ktiles * 16 * 16 * M));
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < ktiles; t++) amx_digit_tile(x, shift, M, K, t, xd);
        amx_gemv_begin(M);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batches; i++) {
            int w = weight_of(firstb, i);
            int64_t N = Ns[w], b = (i - firstb[w]) * S, left = N / 8 - b;
#define AMX_I8_CALL(T) amx_int8_tiles(xd, shift, qs[w], ss[w], ys[w], yb, N, K, gs, b, (int)(left < S ? left : S), T)
            FOR_M(M, AMX_I8_CALL);
        }
        amx_end();
    }
    free(xd);
}
void grace_amx_gemv_int8(const uint16_t *x, const int8_t *q, const uint16_t *s, void *y, int64_t M, int64_t N,
                         int64_t K, int64_t gs, int nt, int yb) {
    grace_amx_gemv_int8_many(x, &q, &s, &y, &N, 1, M, K, gs, nt, yb);
}

// ---- INT4, a few rows (decode) on AMX's integer unit: the INT8 GEMV's scheme above (x as four exact 8-bit digits,
// code x digit sums exact in int32), the nibbles unpacked to bytes in L1 first. A 64-byte row chunk's low nibbles
// are its even columns in order and its high nibbles its odd ones, so one and (and a shift) make each of the two
// A-operand rows, met by the digits of x's even and of its odd columns. W = (c - 8) s + z, so per group
// sum W x = s sum c x + (z - 8 s) sum x, with sum x summed exactly from the same integers X; the error is again of
// the fp32 kind, ~1e-7 of the two terms' size (of y where x's groups have no large mean; the AVX-512 INT4 GEMV's
// 128 + c trick: 3e-6, up to 1e-3 with denormal x). On the 2-core AMX guest a tile
// load or dot product costs about the same for 1 as for 16 A rows (~8-11 ns and ~17 ns), so an A tile holds 16
// weight rows: two neighbouring 8-row tiles ("a pair"). Against the AVX-512 INT4 GEMV there (cold weights,
// 2 threads): 1.0-1.2x at one row, 1.1x at two, 1.9x at four.
#define I4_LEAD 2             // steps between a step's unpacking and its dot products (4 buffers)
#define I4_BUFS 4
#define I4_L1_AHEAD 4         // codes prefetched into L1 this many steps before they are unpacked; none into L2:
                              // the hardware's streams do that, and 16 KB ahead in software was 2-15 % slower

AMXI static void amx_gemv4_begin(int64_t M) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) {        // 0-1: sums [16 weight rows][M rows][4 digits]; 2-3: codes; 4-5: digits
        c.rows[t] = 16;
        c.colsb[t] = t == 2 || t == 3 ? 64 : (uint16_t)(16 * M);
    }
    _tile_loadconfig(&c);
}

// chunk c (128 columns) of every row into xd (amx_digit_tile's layout): its even columns are k-tile 2c, its odd
// ones k-tile 2c + 1; sxt[t * M + m] := the sum of row m's integers X over k-tile t (below 2^37: exact in double)
static inline void amx_digit_chunk_int4(const uint16_t *x, const int *shift, int64_t M, int64_t K, int64_t c,
                                        int8_t *xd, double *sxt) {
    int64_t rowbytes = 16 * M;
    for (int64_t m = 0; m < M; m++) {
        __m512d sum[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
        for (int u = 0; u < 4; u++) {
            __m512i v = _mm512_loadu_si512(x + m * K + c * 128 + 32 * u);       // 16 (even, odd) column pairs
            __m512 f[2] = {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
                           _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)))};
            for (int h = 0; h < 2; h++) {
                digits_x16(f[h], shift[m], xd + ((2 * c + h) * 16 + 4 * u) * rowbytes + 16 * m, rowbytes);
                __m512i X = _mm512_cvtps_epi32(_mm512_scalef_ps(f[h], _mm512_set1_ps((float)shift[m])));
                sum[h] = _mm512_add_pd(sum[h], _mm512_add_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(X)),
                                                             _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(X, 1))));
            }
        }
        for (int h = 0; h < 2; h++) sxt[(2 * c + h) * M + m] = _mm512_reduce_add_pd(sum[h]);
    }
}

// one 128-column chunk of the 8-row tiles at t0 and t1 (NULL: rows 8-15 keep what they held, zeros from the start
// of the call; their sums are dropped) as bytes: ab[0] its even columns, ab[1] its odd ones, 16 rows of 64. With
// GFNI (every AMX CPU has it) the high nibbles come down in one affine op (bits 4-7 to 0-3, the rest cleared)
// where a shift and an and take two: on the AMX guest 512-bit shifts issue once a cycle.
static inline __m512i high_nibbles(__m512i v) {
#ifdef __GFNI__
    return _mm512_gf2p8affine_epi64_epi8(v, _mm512_set1_epi64(0x1020408000000000LL), 0);
#else
    return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
#endif
}
static inline void int4_unpack_pair(const uint8_t *t0, const uint8_t *t1, uint8_t (*ab)[16][64]) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int h = 0; h < 2 && (h == 0 || t1); h++)
        for (int r = 0; r < 8; r++) {
            __m512i v = _mm512_loadu_si512((h ? t1 : t0) + 64 * r);
            _mm512_store_si512(ab[0][8 * h + r], _mm512_and_si512(v, low));
            _mm512_store_si512(ab[1][8 * h + r], high_nibbles(v));
        }
}

// where one step of a batch is: pair `pair` (of S), chunk `cc` (of cpg) of group `group`; steps run pair by pair
// within a group, chunk by chunk within a pair. Stepped by counting: the divisions it replaces (a dozen 64-bit ones a
// step, S and cpg known only at run time) cost the GEMV 3-7 %.
typedef struct { int64_t group, pair, cc; } i4_step;
static inline void i4_advance(i4_step *q, int64_t cpg, int64_t S) {
    if (++q->cc < cpg) return;
    q->cc = 0;
    if (++q->pair < S) return;
    q->pair = 0;
    q->group++;
}
static inline const uint8_t *i4_codes(const uint8_t *p, const i4_step *q, int64_t b0, int64_t C, int64_t cpg) {
    return p + (b0 + 2 * q->pair) * C * 512 + (q->group * cpg + q->cc) * 512;
}

#define I4_KTILES(T) do {                                                                                   \
        _tile_loadd(2, ab[0], 64); if (fresh) _tile_loadd(4, xd + 2 * c * 16 * rowbytes, rowbytes); _tile_dpbssd(T, 2, 4); \
        _tile_loadd(3, ab[1], 64); if (fresh) _tile_loadd(5, xd + (2 * c + 1) * 16 * rowbytes, rowbytes); _tile_dpbssd(T, 3, 5); \
    } while (0)
#define I4_STORE(T) _tile_stored(T, cbs[h & 1], rowbytes)

// unit h's sums (stored in cbs[h & 1] one unit before) into the totals of its pair, with the offset term of its
// group; sxg[g * M + m]: row m's sum of X over group g
ALWAYS void amx_int4_combine(const int32_t *cb, const float *sxg, const uint16_t *sz, __m512 *tot, __m512 *off,
                             const __m512i *row, int64_t b, int64_t g, int64_t G, int has_t1, const int MM) {
    // the 16 rows' (scale, zero) bf16 pairs, one per 32-bit lane (tile b's 8 rows, then tile b + 1's): a pair's
    // scale is its low half, its zero the high one, each an fp32 once in place
    __m256i q0 = _mm256_loadu_si256((const __m256i *)(sz + (b * G + g) * 16));
    __m256i q1 = has_t1 ? _mm256_loadu_si256((const __m256i *)(sz + ((b + 1) * G + g) * 16)) : _mm256_setzero_si256();
    __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
    __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    __m512 zc = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000)));
    __m512 zs = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), sc, zc);                      // z - 8 s
    amx_combine(cb, sc, tot, row, 4 * MM);
    for (int m = 0; m < MM; m++) off[m] = _mm512_fmadd_ps(zs, _mm512_set1_ps(sxg[g * MM + m]), off[m]);
}

// the 8-row tiles b0 .. b0 + tiles - 1 in pairs, group by group ("units": one group of one pair), the pairs of a
// group sharing its digit tiles (groups of 128 columns), as amx_int8_tiles. A unit is one "step" per chunk of its
// group; a step's codes are unpacked I4_LEAD steps before its dot products (a tile load waits until the stores to
// its lines complete: unpacked just before, the two ran one after the other, 1.2x slower). A unit's sums are
// stored one unit late and combined two units late: read back at once, the vector loads waited on the tile store
// (5-10 % of the GEMV). Each pair's groups are combined in order and every activation row's lanes see the same
// operations in the same order at any M and batch, so a row gets the same bits alone or beside others.
AMXI ALWAYS void amx_int4_tiles(const int8_t *xd, const float *sxg, const int *shift, const uint8_t *p,
                                const uint16_t *sz, void *y, int yb, int64_t N, int64_t K, int64_t gs, int64_t b0,
                                int tiles, const int MM) {
    __attribute__((aligned(64))) int32_t cbs[2][16 * 16];
    __attribute__((aligned(64))) float out[16 * 16], offs[4][16];
    __attribute__((aligned(64))) uint8_t abuf[I4_BUFS][2][16][64];
    memset(abuf, 0, sizeof abuf);
    __m512 tot[AMX_STREAMS][16], off[AMX_STREAMS][4];   // digit sums [16 rows][M][4]; offset terms [M][16 rows]
    __m512i row[16];
    int64_t S = (tiles + 1) / 2;
    amx_lane_rows(row, 4 * MM, MM);
    for (int v = 0; v < 4 * MM; v++)
        for (int i = 0; i < S; i++) tot[i][v] = _mm512_setzero_ps();
    for (int i = 0; i < S; i++)
        for (int m = 0; m < MM; m++) off[i][m] = _mm512_setzero_ps();
    int64_t C = K / 128, G = K / gs, cpg = gs / 128, rowbytes = 16 * MM, steps = G * S * cpg, units = G * S;
    i4_step unpack = {0, 0, 0}, ahead = {0, 0, 0}, dots = {0, 0, 0};
    for (int64_t s = 0; s < I4_L1_AHEAD; s++) i4_advance(&ahead, cpg, S);
#define I4_COMBINE(H) amx_int4_combine(cbs[(H) & 1], sxg, sz, tot[(H) % S], off[(H) % S], row, b0 + 2 * ((H) % S), \
                                       (H) / S, G, 2 * ((H) % S) + 1 < tiles, MM)
    for (int64_t s = 0; s < steps + I4_LEAD; s++) {
        if (s < steps) {                                     // unpack step s
            const uint8_t *t0 = i4_codes(p, &unpack, b0, C, cpg);
            const uint8_t *t1 = 2 * unpack.pair + 1 < tiles ? t0 + C * 512 : NULL;
            if (s + I4_L1_AHEAD < steps) {
                const uint8_t *n0 = i4_codes(p, &ahead, b0, C, cpg);
                int n1 = 2 * ahead.pair + 1 < tiles;
                for (int o = 0; o < 512; o += 64) {
                    _mm_prefetch((const char *)(n0 + o), _MM_HINT_T0);
                    if (n1) _mm_prefetch((const char *)(n0 + C * 512 + o), _MM_HINT_T0);
                }
                i4_advance(&ahead, cpg, S);
            }
            int4_unpack_pair(t0, t1, abuf[s % I4_BUFS]);
            i4_advance(&unpack, cpg, S);
        }
        int64_t st = s - I4_LEAD;                            // the dot products of step st (of unit u)
        if (st < 0) continue;
        int64_t u = dots.group * S + dots.pair, c = dots.group * cpg + dots.cc;
        uint8_t (*ab)[16][64] = abuf[st % I4_BUFS];
        int fresh = gs > 128 || dots.pair == 0, complete = dots.cc == cpg - 1;
        if (dots.cc == 0) AMX_PARITY(u & 1, AMX_ZERO);
        AMX_PARITY(u & 1, I4_KTILES);
        i4_advance(&dots, cpg, S);
        if (!complete) continue;
        if (u > 0) {                 // unit u is issued: store unit u - 1, combine unit u - 2 (stored one unit ago)
            int64_t h = u - 1;
            AMX_PARITY(h & 1, I4_STORE);
            if (h > 0) I4_COMBINE(h - 1);
        }
    }
    {                                                        // the last unit: store it, combine the last two
        int64_t h = units - 1;
        AMX_PARITY(h & 1, I4_STORE);
        if (h > 0) I4_COMBINE(h - 1);
        I4_COMBINE(h);
    }
#undef I4_COMBINE
    // y[m, n] = ((row m's four digit sums, highest first) + its offset term) * 2^-shift
    for (int i = 0; i < S; i++) {
        for (int v = 0; v < 4 * MM; v++) _mm512_store_ps(out + 16 * v, tot[i][v]);
        for (int m = 0; m < MM; m++) _mm512_store_ps(offs[m], off[i][m]);
        for (int m = 0; m < MM; m++)
            for (int r = 0; r < (2 * i + 1 < tiles ? 16 : 8); r++) {
                const float *d = out + r * 4 * MM + 4 * m;
                put(y, yb, m * N + (b0 + 2 * i) * 8 + r,
                    ldexpf((((d[3] + d[2]) + d[1]) + d[0]) + offs[m][r], -shift[m]));
            }
    }
}
// as grace_gemv_int4_many (M <= AMX_GEMV_MAX_ROWS): x's digits once per call (its chunks split between the
// threads), then every pair of 8-row tiles of every weight, up to AMX_STREAMS pairs a batch
AMXI void grace_amx_gemv_int4_many(const uint16_t *x, const uint8_t *const *ps, const uint16_t *const *szs,
                                   void *const *ys, const int64_t *Ns, int count, int64_t M, int64_t K, int64_t gs,
                                   int nt, int yb) {
    int shift[AMX_GEMV_MAX_ROWS];
    if (M > AMX_GEMV_MAX_ROWS || !amx_shifts(x, M, K, shift)) {
        grace_gemv_int4_many(x, ps, szs, ys, Ns, count, M, K, gs, nt, yb);
        return;
    }
    int64_t firstb[MANY_MAX + 1], C = K / 128, S = amx_batch(tile_table(Ns, count, firstb) / 2, nt);
    int64_t batches = batch_table(Ns, count, 2 * S, firstb);
    int8_t *xd = (int8_t *)aligned_alloc(64, (size_t)(C * 2 * 16 * 16 * M));
    double *sxt = (double *)malloc(sizeof(double) * C * 2 * M);
    float *sxg = (float *)malloc(sizeof(float) * (K / gs) * M);
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t c = 0; c < C; c++) amx_digit_chunk_int4(x, shift, M, K, c, xd, sxt);
#pragma omp for schedule(static)
        for (int64_t gm = 0; gm < K / gs * M; gm++) {     // each group's sum of X, exact in double, then rounded
            int64_t g = gm / M, m = gm % M;
            double sum = 0;
            for (int64_t t = g * gs / 64; t < (g + 1) * gs / 64; t++) sum += sxt[t * M + m];
            sxg[gm] = (float)sum;
        }
        amx_gemv4_begin(M);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < batches; i++) {
            int w = weight_of(firstb, i);
            int64_t N = Ns[w], b = (i - firstb[w]) * 2 * S, left = N / 8 - b;
#define AMX_I4_CALL(T) amx_int4_tiles(xd, sxg, shift, ps[w], szs[w], ys[w], yb, N, K, gs, b, (int)(left < 2 * S ? left : 2 * S), T)
            FOR_M(M, AMX_I4_CALL);
        }
        amx_end();
    }
    free(xd);
    free(sxt);
    free(sxg);
}
void grace_amx_gemv_int4(const uint16_t *x, const uint8_t *p, const uint16_t *sz, void *y, int64_t M, int64_t N,
                         int64_t K, int64_t gs, int nt, int yb) {
    grace_amx_gemv_int4_many(x, &p, &sz, &y, &N, 1, M, K, gs, nt, yb);
}
#else
int grace_amx_ready(void) { return 0; }
#endif

// ---- attention for one query token per head (a decode step), grouped-query heads sharing a key/value head:
// q [B, Hq, D] bf16, k / v [B, Hkv, L, D] bf16 with any batch / head / position strides (a cache that grows in
// place hands out views), out [B, Hq, D] bf16. Query head h reads key/value head h / (Hq / Hkv). Scores, the
// softmax and the weighted sum of values are fp32 (the scores from bf16 products, like torch's bf16 matmul),
// and the output is rounded once to bf16. Each (batch, key/value head) reads its keys and values once.
static inline __m512 exp_ps(__m512 x) {      // e^x for x <= 0, a few ulp: 2^n * e^r, |r| <= ln2 / 2
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);          // Cody-Waite: ln2 in two parts
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 e = _mm512_set1_ps(1.f / 5040.f);
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 720.f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 120.f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 24.f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f / 6.f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(e, n);
}


void grace_attention_decode(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B, int64_t Hq,
                            int64_t Hkv, int64_t L, int64_t D, int64_t ksb, int64_t ksh, int64_t ksl, int64_t vsb,
                            int64_t vsh, int64_t vsl, float scale, int nt) {
    int64_t G = Hq / Hkv, Lp = (L + 15) / 16 * 16;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t u = 0; u < B * Hkv; u++) {
        int64_t b = u / Hkv, hk = u % Hkv;
        const uint16_t *kb = k + b * ksb + hk * ksh, *vb = v + b * vsb + hk * vsh;
        const uint16_t *qg = q + (b * Hq + hk * G) * D;
        float *p = (float *)malloc(sizeof(float) * G * Lp);
        float inv[ATTN_MAX_GROUP];
        for (int64_t l = 0; l < L; l++) {
            const uint16_t *kl = kb + l * ksl;
            for (int64_t g = 0; g < G; g++) {
                __m512 a = _mm512_setzero_ps();
                for (int64_t d = 0; d < D; d += 32)
                    a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qg + g * D + d), (__m512bh)_mm512_loadu_si512(kl + d));
                p[g * Lp + l] = _mm512_reduce_add_ps(a) * scale;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *pg = p + g * Lp;
            for (int64_t l = L; l < Lp; l++) pg[l] = -INFINITY;
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int64_t l = 0; l < Lp; l += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(pg + l));
            __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx)), sum = _mm512_setzero_ps();
            for (int64_t l = 0; l < Lp; l += 16) {
                __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(pg + l), m));
                e = _mm512_mask_mov_ps(_mm512_setzero_ps(), _mm512_cmp_ps_mask(_mm512_loadu_ps(pg + l), _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), e);
                _mm512_storeu_ps(pg + l, e);
                sum = _mm512_add_ps(sum, e);
            }
            inv[g] = 1.f / _mm512_reduce_add_ps(sum);
        }
        __m512 acc[ATTN_MAX_GROUP][ATTN_MAX_D / 16];
        for (int64_t g = 0; g < G; g++) for (int64_t d = 0; d < D / 16; d++) acc[g][d] = _mm512_setzero_ps();
        for (int64_t l = 0; l < L; l++) {
            const uint16_t *vl = vb + l * vsl;
            for (int64_t d = 0; d < D / 16; d++) {
                __m512 vv = bf16x16_to_ps(vl + 16 * d);
                for (int64_t g = 0; g < G; g++) acc[g][d] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * Lp + l]), vv, acc[g][d]);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            uint16_t *o = out + (b * Hq + hk * G + g) * D;
            __m512 iv = _mm512_set1_ps(inv[g]);
            for (int64_t d = 0; d < D / 16; d += 2)
                store_bf16_x32(o + 16 * d, _mm512_mul_ps(acc[g][d], iv), _mm512_mul_ps(acc[g][d + 1], iv));
        }
        free(p);
    }
}
// the fp32 sum of squares of H bf16 values (rms_norm_row below)
static float sum_of_squares(const uint16_t *x, int64_t H) {
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= H; j += 16) { __m512 v = bf16x16_to_ps(x + j); acc = _mm512_fmadd_ps(v, v, acc); }
    float ss = _mm512_reduce_add_ps(acc);
    for (; j < H; j++) { float v = bf16_to_f(x[j]); ss += v * v; }
    return ss;
}
#elif defined(__AVX2__) && defined(__FMA__)
// ---- AVX2 + FMA: CPUs without AVX-512 BF16 (AMD Zen 2 / 3, Intel before Cooper Lake / Sapphire Rapids). The same
// GEMVs, dequantizers and decode kernels with fp32 FMAs: a product of two bf16 values (or of an exact code and a bf16
// value) is exact in fp32, so each sum is again exact products summed in fp32. No tile, pair or AMX GEMM here: from
// a few rows on the modules dequantize into a bf16 buffer and take torch's GEMM (kernels.gemm_path).
#define GRACE_KERNELS 1
#include <immintrin.h>
int grace_kernels_isa(void) { return 2; }
int grace_amx_ready(void) { return 0; }
#define L2_AHEAD_BYTES 16384     // prefetch into L2 this far ahead (cold weights: 2-19 % faster at 1-2 rows)

// 8 bf16 -> fp32 (exact)
static inline __m256 bf16x8_to_ps(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
// the sum of 8 lanes in a fixed order: (l0 + l4) + (l2 + l6) + ((l1 + l5) + (l3 + l7))
static inline float hsum8(__m256 v) {
    __m128 q = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
}
static inline float hmax8(__m256 v) {
    __m128 q = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    __m128 p = _mm_max_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_max_ss(p, _mm_movehdup_ps(p)));
}
// 8 fp32 -> 8 bf16 in the low 16 bits of each lane, rounded to nearest even as f_to_bf16 does for finite values
// (no weight of a finite-scale model, and no softmax output, is NaN); denormals kept, as torch keeps them
static inline __m256i round_bf16x8(__m256 f) {
    __m256i u = _mm256_castps_si256(f);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
}
// 16 fp32 (lo: elements 0-7, hi: 8-15) -> 16 bf16 in order
static inline __m256i ps_to_bf16x16(__m256 lo, __m256 hi) {
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(round_bf16x8(lo), round_bf16x8(hi)), 0xD8);
}
static inline void put_x16(uint16_t *o, __m256i v, int stream) {
    if (stream) _mm256_stream_si256((__m256i *)o, v); else _mm256_storeu_si256((__m256i *)o, v);
}
static inline void store_bf16_x16(uint16_t *o, __m256 lo, __m256 hi) { put_x16(o, ps_to_bf16x16(lo, hi), 0); }
// r[j] := column j of the 8 x 8 matrix whose rows were r[0..7]
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int j = 0; j < 8; j += 2) { t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]); t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]); }
    for (int j = 0; j < 8; j += 4) {
        u[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44); u[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
        u[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44); u[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
        r[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
    }
}
// the int4 tiled layout read 32 bytes (a row's 64 columns) at a time as eight 32-bit lanes i: the nibble at bits
// 4u .. 4u+3 of lane i is column 8i + u of those 64 (the 16-bit lane's nibble t is column 4j + t, and lane i holds
// 16-bit lanes 2i and 2i + 1). codes_u(v, u): those eight codes as fp32, lane i = column 8i + u.
static inline __m256 int4_codes(__m256i v, int u) {
    __m256i c = u == 7 ? _mm256_srli_epi32(v, 28) : _mm256_and_si256(_mm256_srli_epi32(v, 4 * u), _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(c);
}

// ---- dequantize (as the AVX-512 branch's int8_tile_to_bf16 / int4_tile_to_bf16: tile b's rows in [n0, n0 + rows))
ALWAYS void int8_tile_to_bf16(const int8_t *q, const uint16_t *s, uint16_t *out, int64_t ostride, int64_t K,
                              int64_t gs, int64_t b, int64_t n0, int64_t rows, int stream) {
    int64_t G = K / gs;
    for (int64_t g = 0; g < G; g++) {
        const int8_t *blk = q + (b * G + g) * 8 * gs;
        for (int r = 0; r < 8; r++) {
            int64_t n = b * 8 + r;
            if (n < n0 || n >= n0 + rows) continue;
            __m256 sv = _mm256_set1_ps(bf16_to_f(s[(b * G + g) * 8 + r]));
            const int8_t *qg = blk + r * gs;
            uint16_t *o = out + (n - n0) * ostride + g * gs;
            for (int64_t j = 0; j < gs; j += 16) {
                __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qg + j))));
                __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qg + j + 8))));
                put_x16(o + j, ps_to_bf16x16(_mm256_mul_ps(c0, sv), _mm256_mul_ps(c1, sv)), stream);
            }
        }
    }
}
ALWAYS void int4_tile_to_bf16(const uint8_t *p, const uint16_t *sz, uint16_t *out, int64_t ostride, int64_t K,
                              int64_t gs, int64_t b, int64_t n0, int64_t rows, int stream) {
    int64_t G = K / gs, C = K / 128;
    const __m256 eight = _mm256_set1_ps(8.f);
    for (int64_t c = 0; c < C; c++) {
        const uint8_t *blk = p + (b * C + c) * 512;
        const uint16_t *sg = sz + (b * G + c * 128 / gs) * 16;
        for (int r = 0; r < 8; r++) {
            int64_t n = b * 8 + r;
            if (n < n0 || n >= n0 + rows) continue;
            __m256 sv = _mm256_set1_ps(bf16_to_f(sg[2 * r])), zv = _mm256_set1_ps(bf16_to_f(sg[2 * r + 1]));
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 64 * r + 32 * h));
                __m256 t[8];
                for (int u = 0; u < 8; u++) t[u] = _mm256_sub_ps(int4_codes(v, u), eight);    // c - 8, exact
                transpose8(t);                                                                  // t[i]: columns 8i ..
                uint16_t *o = out + (n - n0) * ostride + c * 128 + 64 * h;
                for (int i = 0; i < 8; i += 2)      // (c - 8) * s is exact: the fma rounds once, like fp32 torch
                    put_x16(o + 8 * i, ps_to_bf16x16(_mm256_fmadd_ps(t[i], sv, zv), _mm256_fmadd_ps(t[i + 1], sv, zv)), stream);
            }
        }
    }
}

// ---- the GEMVs. x is converted to fp32 once per call (one thread; M x K floats stay in L1 / L2); each output is
// one fp32 sum per row in the same order at any M, so a row's bits do not depend on the rows that share the call.
// RR weight rows at a time, so that RR x MM independent FMA chains hide the FMA latency.
static float *x_to_fp32(const uint16_t *x, int64_t M, int64_t K, int split) {
    // split: each 16 elements as [8 even, 8 odd] (the bf16 GEMV's order), else in order
    float *xf = (float *)aligned_alloc(32, (size_t)((M * K * 4 + 31) / 32 * 32));
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t k = 0; k < M * K; k += 16) {
        if (split) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(x + k));
            _mm256_store_ps(xf + k, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
            _mm256_store_ps(xf + k + 8, _mm256_castsi256_ps(_mm256_and_si256(v, high)));
        } else {
            _mm256_store_ps(xf + k, bf16x8_to_ps(x + k));
            _mm256_store_ps(xf + k + 8, bf16x8_to_ps(x + k + 8));
        }
    }
    return xf;
}

// bf16: rows n0 .. n0+RR-1 of w; a 256-bit load holds 16 weights, its even ones are the low halves of the 32-bit lanes
ALWAYS void bf16_rows(const float *xf, const uint16_t *w, void *y, int yb, int64_t N, int64_t K, int64_t n0, int64_t m0,
                      const int MM, const int RR) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 ae[4][4], ao[4][4];
    for (int r = 0; r < RR; r++) for (int i = 0; i < MM; i++) { ae[r][i] = _mm256_setzero_ps(); ao[r][i] = _mm256_setzero_ps(); }
    for (int64_t k = 0; k < K; k += 16) {
        if (MM == 1 && (k & 31) == 0) for (int r = 0; r < RR; r++) _mm_prefetch((const char *)(w + (n0 + r) * K + k + L2_AHEAD_BYTES / 2), _MM_HINT_T1);
        for (int r = 0; r < RR; r++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + (n0 + r) * K + k));
            __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            for (int i = 0; i < MM; i++) {
                const float *xk = xf + (m0 + i) * K + k;
                ae[r][i] = _mm256_fmadd_ps(we, _mm256_load_ps(xk), ae[r][i]);
                ao[r][i] = _mm256_fmadd_ps(wo, _mm256_load_ps(xk + 8), ao[r][i]);
            }
        }
    }
    for (int r = 0; r < RR; r++)
        for (int i = 0; i < MM; i++) put(y, yb, (m0 + i) * N + n0 + r, hsum8(_mm256_add_ps(ae[r][i], ao[r][i])));
}
// rows n0 .. n1-1 against all M rows: 4 weight rows at a time for one activation row, 2 for two, 1 for more
static void bf16_span(const float *xf, const uint16_t *w, void *y, int yb, int64_t M, int64_t N, int64_t K, int64_t n0,
                      int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        int64_t mm = M - m0 < 4 ? M - m0 : 4, rr = mm == 1 ? 4 : mm == 2 ? 2 : 1, n = n0;
        for (; n + rr <= n1; n += rr) {
            if (mm == 1) bf16_rows(xf, w, y, yb, N, K, n, m0, 1, 4);
            else if (mm == 2) bf16_rows(xf, w, y, yb, N, K, n, m0, 2, 2);
            else if (mm == 3) bf16_rows(xf, w, y, yb, N, K, n, m0, 3, 1);
            else bf16_rows(xf, w, y, yb, N, K, n, m0, 4, 1);
        }
        for (; n < n1; n++) {
#define BF16_ONE(T) bf16_rows(xf, w, y, yb, N, K, n, m0, T, 1)
            FOR_M(mm, BF16_ONE);
        }
    }
}
void grace_gemv_bf16(const uint16_t *x, const uint16_t *w, void *y, int64_t M, int64_t N, int64_t K, int nt, int yb) {
    float *xf = x_to_fp32(x, M, K, 1);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < (N + 7) / 8; b++) bf16_span(xf, w, y, yb, M, N, K, b * 8, b * 8 + 8 < N ? b * 8 + 8 : N);
    free(xf);
}
void grace_gemv_bf16_many(const uint16_t *x, const uint16_t *const *ws, void *const *ys, const int64_t *Ns, int count,
                          int64_t K, int nt, int yb) {
    int64_t first[MANY_MAX + 1], tiles = tile_table(Ns, count, first);
    float *xf = x_to_fp32(x, 1, K, 1);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        int w = weight_of(first, t);
        int64_t n0 = (t - first[w]) * 8;
        bf16_span(xf, ws[w], ys[w], yb, 1, Ns[w], K, n0, n0 + 8);
    }
    free(xf);
}

// int8 tile b: per group and row, the sum of code x x over the group (exact codes, one FMA chain), scaled into the
// row's running sum (fp32, L1)
ALWAYS void int8_rows(const float *xf, const int8_t *blk, int64_t gs, int64_t xoff, int r0, __m256 sv[8],
                      __m256 tot[4][8], int64_t K, int64_t m0, const int MM, const int RR) {
    __m256 a[8][4];
    for (int r = 0; r < RR; r++) for (int i = 0; i < MM; i++) a[r][i] = _mm256_setzero_ps();
    for (int64_t j = 0; j < gs; j += 8) {
        for (int r = 0; r < RR; r++) {
            __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + (r0 + r) * gs + j))));
            for (int i = 0; i < MM; i++) a[r][i] = _mm256_fmadd_ps(c, _mm256_load_ps(xf + (m0 + i) * K + xoff + j), a[r][i]);
        }
    }
    for (int r = 0; r < RR; r++) for (int i = 0; i < MM; i++) tot[i][r0 + r] = _mm256_fmadd_ps(a[r][i], sv[r0 + r], tot[i][r0 + r]);
}
ALWAYS void int8_tile(const float *xf, const int8_t *q, const uint16_t *s, void *y, int yb, int64_t N, int64_t K,
                      int64_t gs, int64_t b, int64_t m0, const int MM) {
    const int RR = MM == 1 ? 8 : MM == 2 ? 4 : 2;
    __m256 tot[4][8];
    for (int i = 0; i < MM; i++) for (int r = 0; r < 8; r++) tot[i][r] = _mm256_setzero_ps();
    int64_t G = K / gs;
    for (int64_t g = 0; g < G; g++) {
        const int8_t *blk = q + (b * G + g) * 8 * gs;
        if (m0 == 0) for (int64_t o = 0; o < 8 * gs; o += 64) _mm_prefetch((const char *)(blk + L2_AHEAD_BYTES + o), _MM_HINT_T1);
        __m256 sv[8];
        for (int r = 0; r < 8; r++) sv[r] = _mm256_set1_ps(bf16_to_f(s[(b * G + g) * 8 + r]));
        for (int r0 = 0; r0 < 8; r0 += RR) int8_rows(xf, blk, gs, g * gs, r0, sv, tot, K, m0, MM, RR);
    }
    for (int i = 0; i < MM; i++) for (int r = 0; r < 8; r++) put(y, yb, (m0 + i) * N + b * 8 + r, hsum8(tot[i][r]));
}
void grace_gemv_int8_many(const uint16_t *x, const int8_t *const *qs, const uint16_t *const *ss, void *const *ys,
                          const int64_t *Ns, int count, int64_t M, int64_t K, int64_t gs, int nt, int yb) {
    int64_t first[MANY_MAX + 1], tiles = tile_table(Ns, count, first);
    float *xf = x_to_fp32(x, M, K, 0);
#define I8_CALL(T) int8_tile(xf, (const int8_t *)codes, params, y, yb, N, K, gs, b, m0, T)
    EACH_TILE_IN_PASSES_OF_4(qs, ss, I8_CALL);
    free(xf);
}
void grace_gemv_int8(const uint16_t *x, const int8_t *q, const uint16_t *s, void *y, int64_t M, int64_t N, int64_t K,
                     int64_t gs, int nt, int yb) {
    grace_gemv_int8_many(x, &q, &s, &y, &N, 1, M, K, gs, nt, yb);
}

// int4 tile b: sum_k W x = s * sum c x + (z - 8 s) * sum x per 128-column chunk, with x permuted to the nibble order
// (xp: per chunk and half, [u][i] = x[64 h + 8 i + u]) and sx the chunk sums of x
ALWAYS void int4_rows(const float *xp, const uint8_t *blk, int r0, __m256 a[8][4], int64_t K, int64_t xoff, int64_t m0,
                      const int MM, const int RR) {
    for (int r = 0; r < RR; r++) for (int i = 0; i < MM; i++) a[r][i] = _mm256_setzero_ps();
    for (int h = 0; h < 2; h++)
        for (int r = 0; r < RR; r++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 64 * (r0 + r) + 32 * h));
            for (int u = 0; u < 8; u++) {
                __m256 c = int4_codes(v, u);
                for (int i = 0; i < MM; i++)
                    a[r][i] = _mm256_fmadd_ps(c, _mm256_load_ps(xp + (m0 + i) * K + xoff + 64 * h + 8 * u), a[r][i]);
            }
        }
}
ALWAYS void int4_tile(const float *xp, const float *sx, const uint8_t *p, const uint16_t *sz, void *y, int yb, int64_t N,
                      int64_t K, int64_t gs, int64_t b, int64_t m0, const int MM) {
    const int RR = MM == 1 ? 4 : 2;
    __m256 tot[4][8];
    float off[4][8];
    for (int i = 0; i < MM; i++) for (int r = 0; r < 8; r++) { tot[i][r] = _mm256_setzero_ps(); off[i][r] = 0.f; }
    int64_t C = K / 128, G = K / gs;
    for (int64_t c = 0; c < C; c++) {
        const uint8_t *blk = p + (b * C + c) * 512;
        if (MM <= 2) for (int o = 0; o < 512; o += 64) _mm_prefetch((const char *)(blk + L2_AHEAD_BYTES + o), _MM_HINT_T1);
        const uint16_t *sg = sz + (b * G + c * 128 / gs) * 16;
        for (int r0 = 0; r0 < 8; r0 += RR) {
            __m256 a[8][4];
            int4_rows(xp, blk, r0, a, K, c * 128, m0, MM, RR);
            for (int r = 0; r < RR; r++) {
                float sc = bf16_to_f(sg[2 * (r0 + r)]), zo = bf16_to_f(sg[2 * (r0 + r) + 1]);
                __m256 sv = _mm256_set1_ps(sc);
                for (int i = 0; i < MM; i++) {
                    tot[i][r0 + r] = _mm256_fmadd_ps(a[r][i], sv, tot[i][r0 + r]);
                    off[i][r0 + r] += (zo - 8.f * sc) * sx[(m0 + i) * C + c];
                }
            }
        }
    }
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < 8; r++) put(y, yb, (m0 + i) * N + b * 8 + r, hsum8(tot[i][r]) + off[i][r]);
}
void grace_gemv_int4_many(const uint16_t *x, const uint8_t *const *ps, const uint16_t *const *szs, void *const *ys,
                          const int64_t *Ns, int count, int64_t M, int64_t K, int64_t gs, int nt, int yb) {
    int64_t C = K / 128, first[MANY_MAX + 1], tiles = tile_table(Ns, count, first);
    float *xp = (float *)aligned_alloc(32, (size_t)((M * K * 4 + 31) / 32 * 32));
    float *sx = (float *)malloc(sizeof(float) * M * C);
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < C; c++) {
            __m256 acc = _mm256_setzero_ps();
            for (int h = 0; h < 2; h++) {
                const uint16_t *xm = x + m * K + c * 128 + 64 * h;
                __m256 t[8];
                for (int i = 0; i < 8; i++) { t[i] = bf16x8_to_ps(xm + 8 * i); acc = _mm256_add_ps(acc, t[i]); }
                transpose8(t);                                       // t[u], lane i = x[64 h + 8 i + u]
                for (int u = 0; u < 8; u++) _mm256_store_ps(xp + m * K + c * 128 + 64 * h + 8 * u, t[u]);
            }
            sx[m * C + c] = hsum8(acc);
        }
#define I4_CALL(T) int4_tile(xp, sx, (const uint8_t *)codes, params, y, yb, N, K, gs, b, m0, T)
    EACH_TILE_IN_PASSES_OF_4(ps, szs, I4_CALL);
    free(xp);
    free(sx);
}
void grace_gemv_int4(const uint16_t *x, const uint8_t *p, const uint16_t *sz, void *y, int64_t M, int64_t N, int64_t K,
                     int64_t gs, int nt, int yb) {
    grace_gemv_int4_many(x, &p, &sz, &y, &N, 1, M, K, gs, nt, yb);
}

// ---- attention of one query token (as the AVX-512 branch's, eight lanes at a time)
static inline __m256 exp_ps(__m256 x) {      // e^x for x <= 0, a few ulp: 2^n * e^r, |r| <= ln2 / 2
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));         // 2^n stays a normal number (e^-87 ~ 1.6e-38)
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 e = _mm256_set1_ps(1.f / 5040.f);
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 720.f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 120.f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 24.f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f / 6.f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(0.5f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.f));
    __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(e, _mm256_castsi256_ps(pow2));
}

void grace_attention_decode(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, int64_t B, int64_t Hq,
                            int64_t Hkv, int64_t L, int64_t D, int64_t ksb, int64_t ksh, int64_t ksl, int64_t vsb,
                            int64_t vsh, int64_t vsl, float scale, int nt) {
    int64_t G = Hq / Hkv, Lp = (L + 7) / 8 * 8;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t u = 0; u < B * Hkv; u++) {
        int64_t b = u / Hkv, hk = u % Hkv;
        const uint16_t *kb = k + b * ksb + hk * ksh, *vb = v + b * vsb + hk * vsh;
        const uint16_t *qg = q + (b * Hq + hk * G) * D;
        float *p = (float *)malloc(sizeof(float) * G * Lp);
        float *qf = (float *)aligned_alloc(32, sizeof(float) * G * D);
        float inv[ATTN_MAX_GROUP];
        for (int64_t j = 0; j < G * D; j += 8) _mm256_store_ps(qf + j, bf16x8_to_ps(qg + j));
        for (int64_t l = 0; l < L; l++) {
            const uint16_t *kl = kb + l * ksl;
            for (int64_t g = 0; g < G; g++) {
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                for (int64_t d = 0; d < D; d += 16) {
                    a0 = _mm256_fmadd_ps(_mm256_load_ps(qf + g * D + d), bf16x8_to_ps(kl + d), a0);
                    a1 = _mm256_fmadd_ps(_mm256_load_ps(qf + g * D + d + 8), bf16x8_to_ps(kl + d + 8), a1);
                }
                p[g * Lp + l] = hsum8(_mm256_add_ps(a0, a1)) * scale;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *pg = p + g * Lp;
            for (int64_t l = L; l < Lp; l++) pg[l] = -INFINITY;
            __m256 mx = _mm256_set1_ps(-INFINITY);
            for (int64_t l = 0; l < Lp; l += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(pg + l));
            __m256 m = _mm256_set1_ps(hmax8(mx)), sum = _mm256_setzero_ps();
            for (int64_t l = 0; l < Lp; l += 8) {
                __m256 s = _mm256_loadu_ps(pg + l);
                __m256 e = _mm256_and_ps(exp_ps(_mm256_sub_ps(s, m)), _mm256_cmp_ps(s, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
                _mm256_storeu_ps(pg + l, e);
                sum = _mm256_add_ps(sum, e);
            }
            inv[g] = 1.f / hsum8(sum);
        }
        __m256 acc[ATTN_MAX_GROUP][ATTN_MAX_D / 8];
        for (int64_t g = 0; g < G; g++) for (int64_t d = 0; d < D / 8; d++) acc[g][d] = _mm256_setzero_ps();
        for (int64_t l = 0; l < L; l++) {
            const uint16_t *vl = vb + l * vsl;
            for (int64_t d = 0; d < D / 8; d++) {
                __m256 vv = bf16x8_to_ps(vl + 8 * d);
                for (int64_t g = 0; g < G; g++) acc[g][d] = _mm256_fmadd_ps(_mm256_set1_ps(p[g * Lp + l]), vv, acc[g][d]);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            uint16_t *o = out + (b * Hq + hk * G + g) * D;
            __m256 iv = _mm256_set1_ps(inv[g]);
            for (int64_t d = 0; d < D / 8; d += 2)
                store_bf16_x16(o + 8 * d, _mm256_mul_ps(acc[g][d], iv), _mm256_mul_ps(acc[g][d + 1], iv));
        }
        free(qf);
        free(p);
    }
}
static float sum_of_squares(const uint16_t *x, int64_t H) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= H; j += 16) {
        __m256 v0 = bf16x8_to_ps(x + j), v1 = bf16x8_to_ps(x + j + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    float ss = hsum8(_mm256_add_ps(a0, a1));
    for (; j < H; j++) { float v = bf16_to_f(x[j]); ss += v * v; }
    return ss;
}
#else
int grace_kernels_version(void) { return 0; }  // neither AVX-512 BF16 nor AVX2 + FMA: the modules use torch's kernels
#endif

#ifdef GRACE_KERNELS
// ---- what both branches share, on their tile converters and sum of squares
int grace_kernels_version(void) { return GRACE_KERNELS_VERSION; }
// Both dequantizers walk the weights in storage order (tile by tile, the 8 rows of a tile within each group or
// chunk), so cold weights stream from DRAM as the GEMVs read them; rows outside [n0, n0 + rows) are skipped.
#define DEQUANT_BODY(TILE_FN, W, S)                                                                         \
    stream = stream && ((uintptr_t)out & 63) == 0;                                                          \
    _Pragma("omp parallel num_threads(nt)")                                                                 \
    {                                                                                                       \
        _Pragma("omp for schedule(static) nowait")                                                          \
        for (int64_t b = n0 / 8; b < (n0 + rows + 7) / 8; b++) TILE_FN(W, S, out, K, K, gs, b, n0, rows, stream); \
        _mm_sfence();                                                                                       \
    }

void grace_dequant_int8(const int8_t *q, const uint16_t *s, uint16_t *out, int64_t N, int64_t K, int64_t gs,
                        int64_t n0, int64_t rows, int nt, int stream) {
    DEQUANT_BODY(int8_tile_to_bf16, q, s)
}

void grace_dequant_int4(const uint8_t *p, const uint16_t *sz, uint16_t *out, int64_t N, int64_t K, int64_t gs,
                        int64_t n0, int64_t rows, int nt, int stream) {
    DEQUANT_BODY(int4_tile_to_bf16, p, sz)
}

// ---- RMSNorm of a few bf16 rows, as transformers' Llama / Qwen3 RMSNorm computes it: the mean of squares in
// fp32, x * rsqrt(mean + eps) rounded to bf16, then times the bf16 weight, rounded again. Only the order of the
// fp32 sum differs from torch's (it can move the result by one bf16 unit, rarely).
static void rms_norm_row(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t H, float eps) {
    float inv = 1.0f / sqrtf(sum_of_squares(x, H) / (float)H + eps);
    for (int64_t j = 0; j < H; j++) {            // every element read before it is written: out may be x
        float normed = bf16_to_f(f_to_bf16(bf16_to_f(x[j]) * inv));
        out[j] = f_to_bf16(bf16_to_f(w[j]) * normed);
    }
}
void grace_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t H, float eps) {
    for (int64_t r = 0; r < rows; r++) rms_norm_row(x + r * H, w, out + r * H, H, eps);
}
// ---- a decode step's query and key heads after their projections: Qwen3's per-head RMSNorm (q_norm, k_norm;
// none where the weight is NULL, as in Llama), then the rotary embedding as transformers applies it,
// x * cos + rotate_half(x) * sin with each product and the sum rounded to bf16 (bf16 products of bf16 values
// are exact in fp32, so this is torch's result bit for bit). x [B, H*D] -> out (may be x); cos, sin [B, D].
static void norm_rope_heads(const uint16_t *x, uint16_t *out, const uint16_t *w, float eps, const uint16_t *cs,
                            const uint16_t *sn, int64_t H, int64_t D) {
    uint16_t t[256];                     // D <= 256 (kernels.qk_norm_rope_usable)
    int64_t half = D / 2;
    for (int64_t h = 0; h < H; h++) {
        const uint16_t *xh = x + h * D;
        if (w) rms_norm_row(xh, w, t, D, eps); else memcpy(t, xh, (size_t)D * 2);
        for (int64_t j = 0; j < D; j++) {
            float rot = j < half ? -bf16_to_f(t[j + half]) : bf16_to_f(t[j - half]);
            float a = bf16_to_f(f_to_bf16(bf16_to_f(t[j]) * bf16_to_f(cs[j])));
            float b = bf16_to_f(f_to_bf16(rot * bf16_to_f(sn[j])));
            out[h * D + j] = f_to_bf16(a + b);
        }
    }
}
void grace_qk_norm_rope(const uint16_t *q, const uint16_t *k, uint16_t *q_out, uint16_t *k_out, const uint16_t *qw,
                        const uint16_t *kw, float q_eps, float k_eps, const uint16_t *cs, const uint16_t *sn, int64_t B,
                        int64_t Hq, int64_t Hkv, int64_t D) {
    for (int64_t b = 0; b < B; b++) {
        norm_rope_heads(q + b * Hq * D, q_out + b * Hq * D, qw, q_eps, cs + b * D, sn + b * D, Hq, D);
        norm_rope_heads(k + b * Hkv * D, k_out + b * Hkv * D, kw, k_eps, cs + b * D, sn + b * D, Hkv, D);
    }
}
#endif
"""
