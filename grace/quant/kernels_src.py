"""C source of the CPU kernels behind grace/quant/kernels.py (compiled there at first use).

Kept in a .py file so it ships inside the package with no package-data configuration.
"""

SOURCE = r"""
// GRACE CPU kernels (compiled at first use by grace/quant/kernels.py; AVX-512 with BF16 dot products).
// All GEMVs take bf16 activations x [M, K] and write fp32 y [M, N]; accumulation is fp32 throughout.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
int grace_kernels_version(void) { return 2; }
#define ALWAYS static inline __attribute__((always_inline))
#define FOR_M(MM, CALL) do { if ((MM) == 4) CALL(4); else if ((MM) == 3) CALL(3); else if ((MM) == 2) CALL(2); else CALL(1); } while (0)

// ---- dequantize rows n0 .. n0+rows-1 into bf16 [rows, K], as the modules' dequantize(): one rounding to
// nearest even of the exact fp32 value; the hardware conversion flushes results below 2^-126 to zero
// (torch keeps those denormals) and keeps NaN payloads: no weight of a finite-scale model is either.
static inline void store_bf16_x32(uint16_t *o, __m512 lo, __m512 hi) {
    _mm512_storeu_si512(o, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// Tiled layouts (see quant/int8.py and quant/int4.py): the weights of 8 output rows are one contiguous
// stream, so the GEMVs read DRAM sequentially (row-major storage made every row of a tile its own stream,
// and reached under half the bandwidth); the scales of a tile are contiguous too.
//   int8: q [N/8][G][8][gs] int8, s [N/8][G][8] bf16          W[n, k] = q * s
//   int4: p [N/8][K/128][8][64] bytes (nibble t of 16-bit lane j of a row's 64 bytes = column 4j + t of that
//         128-column chunk), sz [N/8][G][8][2] bf16          W[n, k] = (c - 8) * s + z
void grace_dequant_int8(const int8_t *q, const uint16_t *s, uint16_t *out, int64_t N, int64_t K, int64_t gs,
                        int64_t n0, int64_t rows, int nt) {
    int64_t G = K / gs;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = n0; n < n0 + rows; n++)
        for (int64_t g = 0; g < G; g++) {
            int64_t tile = ((n / 8) * G + g) * 8 + n % 8;
            __m512 sv = _mm512_set1_ps(bf16_to_f(s[tile]));
            const int8_t *qg = q + tile * gs;
            uint16_t *o = out + (n - n0) * K + g * gs;
            for (int64_t j = 0; j < gs; j += 32) {
                __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qg + j))));
                __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qg + j + 16))));
                store_bf16_x32(o + j, _mm512_mul_ps(w0, sv), _mm512_mul_ps(w1, sv));
            }
        }
}

void grace_dequant_int4(const uint8_t *p, const uint16_t *sz, uint16_t *out, int64_t N, int64_t K, int64_t gs,
                        int64_t n0, int64_t rows, int nt) {
    int64_t G = K / gs, C = K / 128;
    const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    // 8 bytes hold columns 16c .. 16c+15: even columns in the low nibbles, odd ones in the high nibbles
    const __m512i even = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = n0; n < n0 + rows; n++)
        for (int64_t g = 0; g < G; g++) {
            const uint16_t *sg = sz + (((n / 8) * G + g) * 8 + n % 8) * 2;
            __m512 sv = _mm512_set1_ps(bf16_to_f(sg[0])), zv = _mm512_set1_ps(bf16_to_f(sg[1]));
            uint16_t *o = out + (n - n0) * K + g * gs;
            for (int64_t j = 0; j < gs; j += 32) {
                int64_t col = g * gs + j;
                const uint8_t *pc = p + (((n / 8) * C + col / 128) * 8 + n % 8) * 64 + (col % 128) / 2;
                __m512 w[2];
                for (int h = 0; h < 2; h++) {
                    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(pc + 8 * h)));
                    __m512i c = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(even, bytes), shift), low);
                    // (c - 8) * s is exact, so mul + add rounds once, like fp32 torch (and like an fma)
                    w[h] = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c, eight)), sv), zv);
                }
                store_bf16_x32(o + j, w[0], w[1]);
            }
        }
}

// ---- bf16: y[m, n] = sum_k x[m, k] w[n, k]; tiles of R output rows x MM activation rows -------------
ALWAYS void bf16_tile(const uint16_t *x, const uint16_t *w, float *y, int64_t N, int64_t K,
                      int64_t n0, int64_t m0, const int MM, const int R) {
    __m512 acc[4][8];
    for (int i = 0; i < MM; i++) for (int r = 0; r < R; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512bh xv[4];
        for (int i = 0; i < MM; i++) xv[i] = (__m512bh)_mm512_loadu_si512(x + (m0 + i) * K + k);
        for (int r = 0; r < R; r++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (n0 + r) * K + k);
            for (int i = 0; i < MM; i++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv[i], wv);
        }
    }
    for (int i = 0; i < MM; i++) for (int r = 0; r < R; r++) y[(m0 + i) * N + n0 + r] = _mm512_reduce_add_ps(acc[i][r]);
}

void grace_gemv_bf16(const uint16_t *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < (N + 3) / 4; b++) {
        int64_t n0 = b * 4;
        if (M == 1 && (b & 1) && n0 + 4 <= N) continue;      // one row: 8-row tiles, as for int4 below
        if (M == 1 && n0 + 8 <= N) { bf16_tile(x, w, y, N, K, n0, 0, 1, 8); continue; }
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int64_t mm = M - m0 < 4 ? M - m0 : 4;
            if (n0 + 4 <= N) {
#define BF16_CALL(T) bf16_tile(x, w, y, N, K, n0, m0, T, 4)
                FOR_M(mm, BF16_CALL);
            } else {
                for (int64_t n = n0; n < N; n++) for (int64_t m = m0; m < m0 + mm; m++) bf16_tile(x, w, y, N, K, n, m, 1, 1);
            }
        }
    }
}

// ---- int8 tiles: per tile, group and row, the codes (exact in bf16) are converted 32 at a time and met with
// one bf16 dot product per activation row; each group's sum is scaled in fp32. MM activation rows per pass.
#define PREFETCH_TILES 2     // how far ahead (in tiles' worth of one group, or of one 128-column chunk) to prefetch
ALWAYS void int8_tile(const uint16_t *x, const int8_t *q, const uint16_t *s, float *y, int64_t N, int64_t K,
                      int64_t gs, int64_t b, int64_t m0, const int MM) {
    __m512 tot[4][8];       // registers at MM = 1; more rows spill to L1, which their reuse of the codes repays
    for (int i = 0; i < MM; i++) for (int r = 0; r < 8; r++) tot[i][r] = _mm512_setzero_ps();
    int64_t G = K / gs;
    for (int64_t g = 0; g < G; g++) {
        const int8_t *blk = q + (b * G + g) * 8 * gs;
        for (int64_t o = 0; o < 8 * gs; o += 64) _mm_prefetch((const char *)(blk + PREFETCH_TILES * 8 * gs + o), _MM_HINT_T0);
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
    for (int i = 0; i < MM; i++) for (int r = 0; r < 8; r++) y[(m0 + i) * N + b * 8 + r] = _mm512_reduce_add_ps(tot[i][r]);
}

void grace_gemv_int8(const uint16_t *x, const int8_t *q, const uint16_t *s, float *y, int64_t M, int64_t N, int64_t K,
                     int64_t gs, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < N / 8; b++)
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int64_t mm = M - m0 < 4 ? M - m0 : 4;
#define I8_CALL(T) int8_tile(x, q, s, y, N, K, gs, b, m0, T)
            FOR_M(mm, I8_CALL);
        }
}

// ---- int4 tiles: a nibble or'ed into 0x4300 is the bf16 number 128 + c, so each nibble vector is a bf16
// vector without conversion: sum_k W x = s * sum (128 + c) x - (136 s - z) * sum x   (x pre-permuted to the
// nibble order). R rows of the tile (from r0) x MM activation rows per pass keep the sums in registers.
#define NIB(v, sh) ((__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(v, sh), low, magic, 0xEA))  // (v>>sh & 15) | magic
ALWAYS void int4_tile(const uint16_t *xp, const float *sx, const uint8_t *p, const uint16_t *sz, float *y, int64_t N,
                      int64_t K, int64_t gs, int64_t b, int64_t m0, const int MM, const int R, const int r0) {
    const __m512i low = _mm512_set1_epi16(0x000F), magic = _mm512_set1_epi16(0x4300);
    __m512 tot[2][8];
    float off[2][8];
    for (int i = 0; i < MM; i++) for (int r = 0; r < R; r++) { tot[i][r] = _mm512_setzero_ps(); off[i][r] = 0.f; }
    int64_t G = K / gs, C = K / 128;
    const uint8_t *tile = p + b * C * 512;
    for (int64_t g = 0; g < G; g++) {
        __m512 a[2][8];
        for (int i = 0; i < MM; i++) for (int r = 0; r < R; r++) a[i][r] = _mm512_setzero_ps();
        for (int64_t c = g * gs; c < (g + 1) * gs; c += 128) {
            const uint8_t *blk = tile + (c / 128) * 512;
            if (r0 == 0)
                for (int o = 0; o < 512; o += 64) _mm_prefetch((const char *)(blk + PREFETCH_TILES * 2 * 512 + o), _MM_HINT_T0);
            __m512bh xv[2][4];
            for (int i = 0; i < MM; i++)
                for (int t = 0; t < 4; t++) xv[i][t] = (__m512bh)_mm512_loadu_si512(xp + (m0 + i) * K + c + 32 * t);
            for (int r = 0; r < R; r++) {
                __m512i v = _mm512_loadu_si512(blk + 64 * (r0 + r));
                __m512bh w0 = (__m512bh)_mm512_ternarylogic_epi32(v, low, magic, 0xEA), w1 = NIB(v, 4), w2 = NIB(v, 8);
                __m512bh w3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(v, 12), magic);
                for (int i = 0; i < MM; i++) {
                    a[i][r] = _mm512_dpbf16_ps(a[i][r], xv[i][0], w0);
                    a[i][r] = _mm512_dpbf16_ps(a[i][r], xv[i][1], w1);
                    a[i][r] = _mm512_dpbf16_ps(a[i][r], xv[i][2], w2);
                    a[i][r] = _mm512_dpbf16_ps(a[i][r], xv[i][3], w3);
                }
            }
        }
        const uint16_t *sg = sz + (b * G + g) * 16;
        for (int r = 0; r < R; r++) {
            float sc = bf16_to_f(sg[2 * (r0 + r)]), zo = bf16_to_f(sg[2 * (r0 + r) + 1]);
            __m512 sv = _mm512_set1_ps(sc);
            for (int i = 0; i < MM; i++) {
                tot[i][r] = _mm512_fmadd_ps(a[i][r], sv, tot[i][r]);
                off[i][r] += (zo - 136.f * sc) * sx[(m0 + i) * G + g];
            }
        }
    }
    for (int i = 0; i < MM; i++)
        for (int r = 0; r < R; r++) y[(m0 + i) * N + b * 8 + r0 + r] = _mm512_reduce_add_ps(tot[i][r]) + off[i][r];
}

void grace_gemv_int4(const uint16_t *x, const uint8_t *p, const uint16_t *sz, float *y, int64_t M, int64_t N, int64_t K,
                     int64_t gs, int nt) {
    int64_t G = K / gs;
    uint16_t *xp = (uint16_t *)malloc(sizeof(uint16_t) * M * K);
    float *sx = (float *)malloc(sizeof(float) * M * G);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t c = 0; c < K; c += 128)
            for (int t = 0; t < 4; t++)
                for (int j = 0; j < 32; j++) xp[m * K + c + 32 * t + j] = x[m * K + c + 4 * j + t];
        for (int64_t g = 0; g < G; g++) {
            float acc = 0.f;
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) acc += bf16_to_f(x[m * K + k]);
            sx[m * G + g] = acc;
        }
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < N / 8; b++) {
        if (M == 1) { int4_tile(xp, sx, p, sz, y, N, K, gs, b, 0, 1, 8, 0); continue; }
        for (int64_t m0 = 0; m0 < M; m0 += 2) {      // two activation rows x half a tile per pass
            for (int r0 = 0; r0 < 8; r0 += 4) {
                if (M - m0 >= 2) int4_tile(xp, sx, p, sz, y, N, K, gs, b, m0, 2, 4, r0);
                else int4_tile(xp, sx, p, sz, y, N, K, gs, b, m0, 1, 4, r0);
            }
        }
    }
    free(xp);
    free(sx);
}
#else
int grace_kernels_version(void) { return 0; }  // this CPU lacks AVX-512 BF16: the modules use torch's kernels
#endif
"""
