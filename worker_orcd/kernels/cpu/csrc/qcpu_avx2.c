/* AVX2 + FMA kernels: 32 weights per step (one block, Q4_K/Q5_K sub-block or Q6_K group of 32),
 * unpacked to unsigned bytes and dotted with up to 8 rows of xq by vpmaddubsw + vpmaddwd. The
 * 16-bit pair sums cannot saturate for quants below 64; Q8_0 (signed quants, zero point 0) takes
 * |w| x sign(x, w) instead, as vpmaddubsw wants an unsigned operand. Lanes and scales as in the
 * AVX-512 kernels (qcpu.h). */
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "qcpu.h"

#define INLINE static inline __attribute__((always_inline))

DEFINE_PREP(prep_avx2)

INLINE float f16(const uint8_t *p) { return _cvtsh_ss(load_u16(p)); }

/* Byte i = 0xFF where bit i of `bits` is set. */
INLINE __m256i bytes_from_bits(uint32_t bits) {
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0x0000000000000000LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

INLINE __m256i low_high_nibbles(__m128i q) {
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
}

/* 32-element block b of a row: quants (signed for Q8_0) and lane scales; *mn its min (K-quants). */
INLINE void unpack(const int qt, const uint8_t *row, int64_t b, __m256i *u, __m256 *s, float *mn) {
    switch (qt) {
    case QT_Q4_0:
    case QT_Q5_0: {
        const uint8_t *blk = row + b * type_size(qt);
        __m256i v = low_high_nibbles(_mm_loadu_si128((const __m128i *)(blk + (qt == QT_Q5_0 ? 6 : 2))));
        if (qt == QT_Q5_0)
            v = _mm256_or_si256(v, _mm256_and_si256(bytes_from_bits(load_u32(blk + 2)),
                                                    _mm256_set1_epi8(16)));
        *u = v;
        *s = _mm256_set1_ps(f16(blk));
        return;
    }
    case QT_Q8_0: {
        const uint8_t *blk = row + b * 34;
        *u = _mm256_loadu_si256((const __m256i *)(blk + 2));
        *s = _mm256_set1_ps(f16(blk));
        return;
    }
    case QT_Q4_K:
    case QT_Q5_K: {
        const uint8_t *blk = row + (b / 8) * type_size(qt);
        const int j = (int)(b % 8);
        __m256i v = _mm256_loadu_si256(
            (const __m256i *)(blk + (qt == QT_Q5_K ? 48 : 16) + 32 * (j / 2)));
        if (j & 1) v = _mm256_srli_epi16(v, 4);
        v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
        if (qt == QT_Q5_K) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(blk + 16));
            h = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128(j)), _mm256_set1_epi8(1));
            v = _mm256_or_si256(v, _mm256_slli_epi16(h, 4));
        }
        uint8_t sc[8], m[8];
        kquant_scales(blk + 4, sc, m);
        *u = v;
        *s = _mm256_set1_ps(f16(blk) * (float)sc[j]);
        *mn = f16(blk + 2) * (float)m[j];
        return;
    }
    default: { /* Q6_K */
        const uint8_t *blk = row + (b / 8) * 210;
        const int g = (int)(b % 8), h = g / 4, q = g % 4;
        __m256i lo = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (q % 2)));
        if (q >= 2) lo = _mm256_srli_epi16(lo, 4);
        lo = _mm256_and_si256(lo, _mm256_set1_epi8(0x0F));
        __m256i hi = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
        hi = _mm256_and_si256(_mm256_srl_epi16(hi, _mm_cvtsi32_si128(2 * q)), _mm256_set1_epi8(3));
        *u = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
        const float d = f16(blk + 208);
        const int8_t *sc = (const int8_t *)(blk + 192);
        *s = _mm256_set_m128(_mm_set1_ps(d * (float)sc[2 * g + 1]), _mm_set1_ps(d * (float)sc[2 * g]));
        return;
    }
    }
}

INLINE void row_dot(const int qt, const int C, const uint8_t *row, const xprep_t *xp,
                    const int32_t *xcz, int64_t m0, float *out) {
    const int64_t k = xp->k, k4 = k / 4, k32 = k / 32;
    const int8_t *xq = xp->xq + m0 * k;
    const float *dxl = xp->dxl + m0 * k4;
    const float *xs = xp->xs + m0 * k32;
    if (xcz) xcz += m0 * k4;
    const int has_min = qt == QT_Q4_K || qt == QT_Q5_K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[8];
    float corr[8];
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
        acc[c] = _mm256_setzero_ps();
        corr[c] = 0.0f;
    }
    for (int64_t b = 0; b < k32; b++) {
        __m256i u;
        __m256 s;
        float mn = 0.0f;
        unpack(qt, row, b, &u, &s, &mn);
        const __m256i ua = qt == QT_Q8_0 ? _mm256_sign_epi8(u, u) : u;
#pragma GCC unroll 8
        for (int c = 0; c < C; c++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + c * k + 32 * b));
            if (qt == QT_Q8_0) xv = _mm256_sign_epi8(xv, u);
            __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ua, xv), ones);
            if (xcz) p = _mm256_add_epi32(p, _mm256_loadu_si256((const __m256i *)(xcz + c * k4 + 8 * b)));
            const __m256 comb = _mm256_mul_ps(s, _mm256_loadu_ps(dxl + c * k4 + 8 * b));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), comb, acc[c]);
            if (has_min) corr[c] += mn * xs[c * k32 + b];
        }
    }
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[c]), _mm256_extractf128_ps(acc[c], 1));
        v = _mm_add_ps(v, _mm_movehl_ps(v, v));
        v = _mm_add_ss(v, _mm_movehdup_ps(v));
        out[c] = _mm_cvtss_f32(v) - corr[c];
    }
}

INLINE void tile_fmt(const int qt, const xprep_t *xp, const part_t *p, int64_t r0, int64_t r1,
                     int64_t m0, int64_t m1, float *y, int64_t ldy, const float *bias) {
    const int32_t *xcz = xcz_for(xp, zero_point(ISA_AVX2, qt));
    float out[8];
    for (int64_t m = m0; m < m1;) {
        const int64_t left = m1 - m;
        const int C = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *row = p->w + r * p->row_bytes;
            switch (C) {
            case 8: row_dot(qt, 8, row, xp, xcz, m, out); break;
            case 4: row_dot(qt, 4, row, xp, xcz, m, out); break;
            case 2: row_dot(qt, 2, row, xp, xcz, m, out); break;
            default: row_dot(qt, 1, row, xp, xcz, m, out); break;
            }
            const float bb = bias ? bias[p->col + r] : 0.0f;
            for (int c = 0; c < C; c++) y[(m + c) * ldy + p->col + r] = out[c] + bb;
        }
        m += C;
    }
}

#define TILE(NAME, QT)                                                                             \
    static void NAME(const xprep_t *xp, const part_t *p, int64_t r0, int64_t r1, int64_t m0,       \
                     int64_t m1, float *y, int64_t ldy, const float *bias) {                       \
        tile_fmt(QT, xp, p, r0, r1, m0, m1, y, ldy, bias);                                         \
    }
TILE(tile_q4_0, QT_Q4_0)
TILE(tile_q5_0, QT_Q5_0)
TILE(tile_q8_0, QT_Q8_0)
TILE(tile_q4_k, QT_Q4_K)
TILE(tile_q5_k, QT_Q5_K)
TILE(tile_q6_k, QT_Q6_K)

void tile_avx2(const xprep_t *xp, const part_t *p, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
               float *y, int64_t ldy, const float *bias) {
    switch (p->qtype) {
    case QT_Q4_0: tile_q4_0(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    case QT_Q5_0: tile_q5_0(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    case QT_Q8_0: tile_q8_0(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    case QT_Q4_K: tile_q4_k(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    case QT_Q5_K: tile_q5_k(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    case QT_Q6_K: tile_q6_k(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    }
}
