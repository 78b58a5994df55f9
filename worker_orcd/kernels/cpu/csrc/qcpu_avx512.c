/* AVX-512 VNNI kernels: 64 weights per step (two 32-element blocks, or one Q4_K/Q5_K chunk, or a
 * quarter of a Q6_K super-block), unpacked to unsigned bytes in a register and dotted with up to 16
 * rows of xq by vpdpbusd (u8 x s8 -> int32 per 4-element lane). Each lane's sum starts at -zp times
 * the lane's xq sum (xcz), so it comes out as sum (u - zp) xq exactly; it is then scaled by the
 * lane's weight scale times its dx and accumulated in float32. */
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")
#include <immintrin.h>
#include <math.h>

#include "qcpu.h"

#define INLINE static inline __attribute__((always_inline))

DEFINE_PREP(prep_avx512)

#define PREFETCH_ROWS 2

INLINE float f16(const uint8_t *p) { return _cvtsh_ss(load_u16(p)); }

/* Nibbles of 16 bytes per 128-bit lane: lanes 0, 2 low, 1, 3 high (shifts per 16-bit word). */
INLINE __m512i nibbles_q4_0(__m512i v) {
    const __m512i sh = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0, 0,
                                        0x0004000400040004LL, 0x0004000400040004LL, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(v, sh), _mm512_set1_epi8(0x0F));
}

/* Low nibbles in bytes 0..31, high nibbles of the same 32 bytes in 32..63. */
INLINE __m512i nibbles_32(const uint8_t *q) {
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)q));
    const __m512i sh = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL,
                                        0x0004000400040004LL, 0x0004000400040004LL, 0, 0, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(v, sh), _mm512_set1_epi8(0x0F));
}

/* Blocks 2t and 2t + 1 of a 32-element format (only 2t when `half`): quants and lane scales. The
 * two fp16 scales are broadcast to 8 halves each and converted once (fewer port 0/5 operations
 * than two scalar conversions and a float insert). */
INLINE void unpack_legacy(const int qt, const uint8_t *row, int64_t t, const int half, __m512i *u,
                          __m512 *s) {
    const int ts = type_size(qt);
    const uint8_t *b0 = row + 2 * t * ts, *b1 = b0 + ts;
    __m256i h = _mm256_set1_epi16((short)load_u16(b0));
    h = _mm256_mask_set1_epi16(h, 0xFF00, half ? 0 : (short)load_u16(b1));
    *s = _mm512_cvtph_ps(h);
    if (qt == QT_Q8_0) {
        __m512i v = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(b0 + 2)));
        if (!half) v = _mm512_inserti64x4(v, _mm256_loadu_si256((const __m256i *)(b1 + 2)), 1);
        *u = _mm512_xor_si512(v, _mm512_set1_epi8((char)0x80));
        return;
    }
    const int off = qt == QT_Q5_0 ? 6 : 2;
    __m512i v = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(b0 + off)));
    if (!half)
        v = _mm512_mask_broadcast_i32x4(v, 0xFF00, _mm_loadu_si128((const __m128i *)(b1 + off)));
    v = nibbles_q4_0(v);
    if (qt == QT_Q5_0) {
        uint64_t bits = load_u32(b0 + 2);
        if (!half) bits |= (uint64_t)load_u32(b1 + 2) << 32;
        v = _mm512_mask_add_epi8(v, _cvtu64_mask64(bits), v, _mm512_set1_epi8(16));
    }
    *u = v;
}

/* Q4_K / Q5_K chunk j (sub-blocks 2j, 2j + 1) of super-block `blk`: 64 unsigned quants. */
INLINE __m512i unpack_kquant(const int qt, const uint8_t *blk, int j) {
    __m512i u = nibbles_32(blk + (qt == QT_Q5_K ? 48 : 16) + 32 * j);
    if (qt == QT_Q5_K) {
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 16)));
        const __m512i sel = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (2 * j))),
                                               _mm256_set1_epi8((char)(1 << (2 * j + 1))), 1);
        u = _mm512_mask_add_epi8(u, _mm512_test_epi8_mask(qh, sel), u, _mm512_set1_epi8(16));
    }
    return u;
}

/* Q6_K quarter g of super-block `blk` (elements 64g .. 64g + 63): 64 unsigned quants. Half
 * h = g / 2; q = g % 2 picks the low or high nibbles of ql and qh's bits 0-3 or 4-7. */
INLINE __m512i unpack_q6_k(const uint8_t *blk, int g) {
    const int h = g / 2, q = g % 2;
    __m512i lo = _mm512_loadu_si512((const void *)(blk + 64 * h));
    if (q) lo = _mm512_srli_epi16(lo, 4);
    lo = _mm512_and_si512(lo, _mm512_set1_epi8(0x0F));
    const __m512i qh =
        _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h)));
    /* bits 4q, 4q + 1 (bytes 0..31) and 4q + 2, 4q + 3 (32..63) to bits 4, 5 */
    const long long two = 0x0002000200020002LL, four = 0x0004000400040004LL;
    const __m512i hi = q == 0 ? _mm512_sllv_epi16(qh, _mm512_set_epi64(two, two, two, two, four,
                                                                       four, four, four))
                              : _mm512_srlv_epi16(qh, _mm512_set_epi64(two, two, two, two, 0, 0,
                                                                       0, 0));
    return _mm512_or_si512(lo, _mm512_and_si512(hi, _mm512_set1_epi8(0x30)));
}

/* One row of weights against C rows of x (rows m0 .. m0 + C - 1 of xp): out[c] = dot. */
INLINE void row_dot(const int qt, const int C, const uint8_t *row, const xprep_t *xp,
                    const int32_t *xcz, int64_t m0, float *out) {
    const int64_t k = xp->k, k4 = k / 4, k32 = k / 32;
    const int8_t *xq = xp->xq + m0 * k;
    const float *dxl = xp->dxl + m0 * k4;
    if (xcz) xcz += m0 * k4;
    __m512 acc[16];
#pragma GCC unroll 16
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();

#define PAIRS(U, S, E, L, MASK8, MASK32)                                                           \
    _Pragma("GCC unroll 16") for (int c = 0; c < C; c++) {                                         \
        __m512i p = xcz ? _mm512_maskz_loadu_epi32(MASK32, xcz + c * k4 + (L))                     \
                        : _mm512_setzero_si512();                                                  \
        p = _mm512_dpbusd_epi32(p, U, _mm512_maskz_loadu_epi8(MASK8, xq + c * k + (E)));           \
        const __m512 comb = _mm512_mul_ps(S, _mm512_maskz_loadu_ps(MASK32, dxl + c * k4 + (L)));   \
        acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), comb, acc[c]);                             \
    }

    const __mmask64 all8 = ~(__mmask64)0;
    const __mmask16 all32 = 0xFFFF;
    __m512i u;
    __m512 s;
    if (qt == QT_Q4_0 || qt == QT_Q5_0 || qt == QT_Q8_0) {
        const int64_t steps = k / 64;
        for (int64_t t = 0; t < steps; t++) {
            unpack_legacy(qt, row, t, 0, &u, &s);
            PAIRS(u, s, 64 * t, 16 * t, all8, all32)
        }
        if (k32 & 1) {
            unpack_legacy(qt, row, steps, 1, &u, &s);
            PAIRS(u, s, 64 * steps, 16 * steps, (__mmask64)0xFFFFFFFFu, (__mmask16)0x00FF)
        }
    } else if (qt == QT_Q4_K || qt == QT_Q5_K) {
        const float *xs = xp->xs + m0 * k32;
        const int ts = type_size(qt);
        for (int64_t sb = 0; sb < k / 256; sb++) {
            const uint8_t *blk = row + sb * ts;
            uint64_t scw, mnw;
            kquant_scale_words(blk + 4, &scw, &mnw);
            const __m256 scales = _mm256_mul_ps(
                _mm256_set1_ps(f16(blk)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)scw))));
            const __m512 mins = _mm512_castps256_ps512(_mm256_mul_ps(
                _mm256_set1_ps(f16(blk + 2)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mnw)))));
#pragma GCC unroll 16
            for (int c = 0; c < C; c++)
                acc[c] = _mm512_fnmadd_ps(
                    mins, _mm512_maskz_loadu_ps(0x00FF, xs + c * k32 + 8 * sb), acc[c]);
            const __m512 scales512 = _mm512_castps256_ps512(scales);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const __m512i idx = _mm512_set_epi32(
                    2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1,
                    2 * j + 1, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j, 2 * j);
                s = _mm512_permutexvar_ps(idx, scales512);
                u = unpack_kquant(qt, blk, j);
                const int64_t e = 256 * sb + 64 * j;
                PAIRS(u, s, e, e / 4, all8, all32)
            }
        }
    } else { /* Q6_K */
        for (int64_t sb = 0; sb < k / 256; sb++) {
            const uint8_t *blk = row + sb * 210;
            const __m512 sc16 = _mm512_mul_ps(
                _mm512_set1_ps(f16(blk + 208)),
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192)))));
#pragma GCC unroll 4
            for (int g = 0; g < 4; g++) {
                const __m512i idx = _mm512_set_epi32(
                    4 * g + 3, 4 * g + 3, 4 * g + 3, 4 * g + 3, 4 * g + 2, 4 * g + 2, 4 * g + 2,
                    4 * g + 2, 4 * g + 1, 4 * g + 1, 4 * g + 1, 4 * g + 1, 4 * g, 4 * g, 4 * g, 4 * g);
                s = _mm512_permutexvar_ps(idx, sc16);
                u = unpack_q6_k(blk, g);
                const int64_t e = 256 * sb + 64 * g;
                PAIRS(u, s, e, e / 4, all8, all32)
            }
        }
    }
#undef PAIRS
#pragma GCC unroll 16
    for (int c = 0; c < C; c++) out[c] = _mm512_reduce_add_ps(acc[c]);
}

INLINE void tile_fmt(const int qt, const xprep_t *xp, const part_t *p, int64_t r0, int64_t r1,
                     int64_t m0, int64_t m1, float *y, int64_t ldy, const float *bias) {
    const int32_t *xcz = xcz_for(xp, zero_point(ISA_AVX512, qt));
    float out[16];
    for (int64_t m = m0; m < m1;) {
        const int64_t left = m1 - m;
        const int C = left >= 16 ? 16 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *row = p->w + r * p->row_bytes;
            if (r + PREFETCH_ROWS < r1) { /* rows ahead, so that loads from memory overlap */
                const char *next = (const char *)row + PREFETCH_ROWS * p->row_bytes;
                for (int64_t b = 0; b < p->row_bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
            }
            switch (C) {
            case 16: row_dot(qt, 16, row, xp, xcz, m, out); break;
            case 8: row_dot(qt, 8, row, xp, xcz, m, out); break;
            case 4: row_dot(qt, 4, row, xp, xcz, m, out); break;
            case 2: row_dot(qt, 2, row, xp, xcz, m, out); break;
            default: row_dot(qt, 1, row, xp, xcz, m, out); break;
            }
            const float b = bias ? bias[p->col + r] : 0.0f;
            for (int c = 0; c < C; c++) y[(m + c) * ldy + p->col + r] = out[c] + b;
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

void tile_avx512(const xprep_t *xp, const part_t *p, int64_t r0, int64_t r1, int64_t m0,
                 int64_t m1, float *y, int64_t ldy, const float *bias) {
    switch (p->qtype) {
    case QT_Q4_0: tile_q4_0(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    case QT_Q5_0: tile_q5_0(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    case QT_Q8_0: tile_q8_0(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    case QT_Q4_K: tile_q4_k(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    case QT_Q5_K: tile_q5_k(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    case QT_Q6_K: tile_q6_k(xp, p, r0, r1, m0, m1, y, ldy, bias); break;
    }
}

/* 64 weights s * (u - zp) - m (as gguf-py computes them: no fused multiply-add, the build turns
 * contraction off), stored as float32 (f32) or rounded to bfloat16; s[i], m[i] are the scale and
 * min of elements 16i..16i+15, `n` the number of elements to store (64, or 32 for a final single
 * block). */
INLINE void store_w(__m512i u, int zp, const float s[4], const float m[4], int has_min, int n,
                    void *out, int f32) {
    uint8_t q8[64];
    _mm512_storeu_si512((void *)q8, u);
    for (int i = 0; i < n / 16; i++) {
        const __m512 q = _mm512_cvtepi32_ps(_mm512_sub_epi32(
            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q8 + 16 * i))),
            _mm512_set1_epi32(zp)));
        __m512 w = _mm512_mul_ps(_mm512_set1_ps(s[i]), q);
        if (has_min) w = _mm512_sub_ps(w, _mm512_set1_ps(m[i]));
        if (f32) {
            _mm512_storeu_ps((float *)out + 16 * i, w);
            continue;
        }
        const __m512i bits = _mm512_castps_si512(w);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_srli_epi32(
            _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd), 16);
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + 16 * i), _mm512_cvtepi32_epi16(r));
    }
}

void dequant_row_avx512(int qt, const uint8_t *row, int64_t k, void *out_, int f32) {
    char *out = out_;
    const int es = f32 ? 4 : 2; /* bytes per element stored */
    const int zp = zero_point(ISA_AVX512, qt);
    const float none[4] = {0, 0, 0, 0};
    __m512i u;
    __m512 s;
    if (qt == QT_Q4_0 || qt == QT_Q5_0 || qt == QT_Q8_0) {
        const int ts = type_size(qt);
        const int64_t nb = k / 32;
        for (int64_t t = 0; 2 * t < nb; t++) {
            const int half = 2 * t + 1 >= nb;
            unpack_legacy(qt, row, t, half, &u, &s);
            const float d0 = f16(row + 2 * t * ts), d1 = half ? 0.0f : f16(row + (2 * t + 1) * ts);
            const float sc[4] = {d0, d0, d1, d1};
            store_w(u, zp, sc, none, 0, half ? 32 : 64, out + es * 64 * t, f32);
        }
        return;
    }
    for (int64_t sb = 0; sb < k / 256; sb++) {
        const uint8_t *blk = row + sb * type_size(qt);
        char *o = out + es * 256 * sb;
        if (qt == QT_Q6_K) {
            const float d = f16(blk + 208);
            const int8_t *sc = (const int8_t *)(blk + 192);
            for (int g = 0; g < 4; g++) {
                float s4[4];
                for (int i = 0; i < 4; i++) s4[i] = d * (float)sc[4 * g + i];
                store_w(unpack_q6_k(blk, g), zp, s4, none, 0, 64, o + es * 64 * g, f32);
            }
            continue;
        }
        uint8_t sc[8], mn[8]; /* Q4_K, Q5_K */
        kquant_scales(blk + 4, sc, mn);
        const float d = f16(blk), dmin = f16(blk + 2);
        for (int j = 0; j < 4; j++) {
            const float s4[4] = {d * (float)sc[2 * j], d * (float)sc[2 * j],
                                 d * (float)sc[2 * j + 1], d * (float)sc[2 * j + 1]};
            const float m4[4] = {dmin * (float)mn[2 * j], dmin * (float)mn[2 * j],
                                 dmin * (float)mn[2 * j + 1], dmin * (float)mn[2 * j + 1]};
            store_w(unpack_kquant(qt, blk, j), 0, s4, m4, 1, 64, o + es * 64 * j, f32);
        }
    }
}

/* e^x, relative error ~2e-7 (0 below -87, inf above 88): 2^n * e^f with n = round(x log2 e),
 * f = x - n ln 2 (in two parts), e^f by a degree-6 Taylor polynomial, 2^n by vscalefps. */
INLINE __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(89.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln 2 = c1 + c2 */
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

void attention_avx512(const attn_task_t *a, float *scores) {
    const int64_t d = a->d, stride = a->n_kv * d, n = a->hi - a->lo + 1;
    const int64_t nv = (d + 15) / 16;
    const __mmask16 tail = (d % 16) ? (__mmask16)((1u << (d % 16)) - 1) : 0xFFFF;
    for (int64_t h = a->h0; h < a->h1; h++) {
        const float *qh = a->q + h * d;
        __m512 qv[8];
        for (int64_t i = 0; i < nv && i < 8; i++)
            qv[i] = _mm512_maskz_loadu_ps(i == nv - 1 ? tail : 0xFFFF, qh + 16 * i);
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j++) {
            const float *kj = a->kc + attn_slot(a, a->lo + j) * stride + a->g * d;
            __m512 acc = _mm512_setzero_ps();
            if (nv <= 8) {
                for (int64_t i = 0; i < nv; i++)
                    acc = _mm512_fmadd_ps(
                        qv[i], _mm512_maskz_loadu_ps(i == nv - 1 ? tail : 0xFFFF, kj + 16 * i), acc);
            } else {
                for (int64_t i = 0; i < nv; i++)
                    acc = _mm512_fmadd_ps(
                        _mm512_maskz_loadu_ps(i == nv - 1 ? tail : 0xFFFF, qh + 16 * i),
                        _mm512_maskz_loadu_ps(i == nv - 1 ? tail : 0xFFFF, kj + 16 * i), acc);
            }
            scores[j] = _mm512_reduce_add_ps(acc) * a->scale;
            mx = _mm512_max_ps(mx, _mm512_set1_ps(scores[j]));
        }
        const float m = _mm512_reduce_max_ps(mx);
        __m512 sumv = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
            const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(m)));
            _mm512_storeu_ps(scores + j, e);
            sumv = _mm512_add_ps(sumv, e);
        }
        if (j < n) {
            const __mmask16 k = (__mmask16)((1u << (n - j)) - 1);
            const __m512 e = _mm512_maskz_mov_ps(
                k, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, scores + j), _mm512_set1_ps(m))));
            _mm512_mask_storeu_ps(scores + j, k, e);
            sumv = _mm512_add_ps(sumv, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(sumv);
        float *o = a->out + h * d;
        for (int64_t i0 = 0; i0 < nv; i0 += 4) { /* 4 vectors (64 floats) of the output at a time */
            const int64_t c = nv - i0 < 4 ? nv - i0 : 4;
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                             _mm512_setzero_ps()};
            for (int64_t jj = 0; jj < n; jj++) {
                const float *vj = a->vc + attn_slot(a, a->lo + jj) * stride + a->g * d + 16 * i0;
                const __m512 p = _mm512_set1_ps(scores[jj]);
                for (int64_t i = 0; i < c; i++)
                    acc[i] = _mm512_fmadd_ps(
                        p, _mm512_maskz_loadu_ps(i0 + i == nv - 1 ? tail : 0xFFFF, vj + 16 * i),
                        acc[i]);
            }
            for (int64_t i = 0; i < c; i++)
                _mm512_mask_storeu_ps(o + 16 * (i0 + i), i0 + i == nv - 1 ? tail : 0xFFFF,
                                      _mm512_mul_ps(acc[i], _mm512_set1_ps(inv)));
        }
    }
}

/* out[r, i] = silu(gate) * up for rows of [gate (n), up (n)]: g / (1 + e^-g) * u. */
void silu_mul_avx512(const float *x, int64_t rows, int64_t n, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = x + r * 2 * n, *u = g + n;
        float *o = out + r * n;
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
            const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_mask_storeu_ps(o + i, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, u + i)));
        }
    }
}
