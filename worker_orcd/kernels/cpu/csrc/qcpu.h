/* Quantized matmul on the CPU: y = x W^T with W kept in its GGUF blocks.
 *
 * x [M, K] float32 is rounded once per call, per 32-element block, to int8 (`xprep`): xq = round-
 * half-even(x * (127 / amax)) and dx = amax / 127, as the GPU int8 kernels and the torch reference
 * `int8_x_reference` round it. Each weight block is then dotted with xq in integers and scaled in
 * float32:
 *
 *     w_i = s_g * (u_i - zp) - m_g      u_i >= 0 the block's unsigned quant, g its scale group
 *     sum_i w_i x_i ~= sum_g dx * (s_g * sum_i (u_i - zp) xq_i - m_g * sum_i xq_i)
 *
 * The vector kernels work on "lanes" of 4 consecutive elements (one int32 of a u8 x s8 dot):
 * xcz[lane] = -zp * (xq sum over the lane) starts each lane's integer sum, so the sum over u alone
 * gives sum (u - zp) xq exactly; dxl[lane] is the lane's dx. Mins (Q4_K, Q5_K) use xs[block] =
 * dx * (xq sum over the 32-element block).
 */
#ifndef WORKER_ORCD_QCPU_H
#define WORKER_ORCD_QCPU_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* GGML type ids (gguf.GGMLQuantizationType). */
enum {
    QT_Q4_0 = 2,
    QT_Q5_0 = 6,
    QT_Q8_0 = 8,
    QT_Q4_K = 12,
    QT_Q5_K = 13,
    QT_Q6_K = 14,
};

enum { ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

#define MAX_ZP 4 /* distinct zero points one call may need */

/* x rounded to int8, with the per-lane and per-block sums the kernels read. Row r of each array
 * starts at r * (its per-row length); K is a multiple of 32. */
typedef struct {
    int64_t m, k;
    int8_t *xq;   /* [m][k] */
    float *dxl;   /* [m][k/4] dx of the lane's block */
    int32_t *xc;  /* [m][k/4] sum of the lane's 4 xq */
    float *xs;    /* [m][k/32] dx * sum of the block's 32 xq */
    int n_zp;
    int zp[MAX_ZP];
    int32_t *xcz[MAX_ZP]; /* [m][k/4] -zp * xc */
} xprep_t;

/* One weight: n rows of row_bytes GGUF bytes; its outputs go to columns col .. col + n - 1. */
typedef struct {
    int qtype;
    const uint8_t *w;
    int64_t n, row_bytes, col;
} part_t;

/* y[m, col + r] = x[m] . W[r] (+ bias[col + r]) for rows r0 <= r < r1, x rows m0 <= m < m1. */
typedef void (*tile_fn)(const xprep_t *xp, const part_t *p, int64_t r0, int64_t r1, int64_t m0,
                        int64_t m1, float *y, int64_t ldy, const float *bias);

void tile_scalar(const xprep_t *, const part_t *, int64_t, int64_t, int64_t, int64_t, float *,
                 int64_t, const float *);
void tile_avx2(const xprep_t *, const part_t *, int64_t, int64_t, int64_t, int64_t, float *,
               int64_t, const float *);
void tile_avx512(const xprep_t *, const part_t *, int64_t, int64_t, int64_t, int64_t, float *,
                 int64_t, const float *);

/* Row `row` (k elements of type qtype) dequantized into `out`: the float32 values gguf-py computes
 * (same products in the same order), as float32 (f32 = 1) or rounded to bfloat16 (nearest even). */
void dequant_row_scalar(int qtype, const uint8_t *row, int64_t k, void *out, int f32);
void dequant_row_avx512(int qtype, const uint8_t *row, int64_t k, void *out, int f32);

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* qcpu_layer.c: the float32 operations between the matmuls of a decode step. */
void rms_norm_rows(const float *x, const float *res, const float *w, float eps, int64_t rows,
                   int64_t d, float *normed, float *summed);
void rope_store_rows(const float *q, int64_t q_rs, int64_t n_heads, const float *k, int64_t k_rs,
                     const float *v, int64_t v_rs, int64_t n_kv, int64_t d, int64_t rows,
                     const int64_t *pos, const float *cs, int64_t cs_rs, int64_t half, float *kc,
                     float *vc, const int64_t *slots, float *q_out);

/* Attention of one query row (q, heads h0 .. h1 - 1 of KV head g, rows of d floats) over context
 * positions lo .. hi of one sequence, whose slots are slot0 + j or slots[j]; out like q. */
typedef struct {
    const float *q;
    float *out;
    const float *kc, *vc;
    int64_t d, n_kv, g, h0, h1, lo, hi;
    int64_t slot0;
    const int64_t *slots;
    float scale;
} attn_task_t;

static inline int64_t attn_slot(const attn_task_t *a, int64_t j) {
    return a->slots ? a->slots[j] : a->slot0 + j;
}

/* out [rows, n] = silu(gate) * up of x [rows, 2n] (gate then up); AVX-512 only. */
void silu_mul_avx512(const float *x, int64_t rows, int64_t n, float *out);

/* `scores`: room for hi - lo + 1 floats. */
void attention_scalar(const attn_task_t *a, float *scores);
void attention_avx512(const attn_task_t *a, float *scores);

/* Runs fn(ctx, 0 .. n - 1) on the calling thread and up to threads - 1 pool helpers. */
typedef void (*pool_fn)(void *ctx, int64_t task);
void pool_run(int threads, int64_t n, pool_fn fn, void *ctx);

/* x rows m0 <= m < m1 rounded into xp (its arrays allocated, zp list filled). */
void prep_scalar(xprep_t *xp, const float *x, int64_t ldx, int64_t m0, int64_t m1);
void prep_avx2(xprep_t *xp, const float *x, int64_t ldx, int64_t m0, int64_t m1);
void prep_avx512(xprep_t *xp, const float *x, int64_t ldx, int64_t m0, int64_t m1);

/* Zero point the kernels of `isa` use for `qtype` (the AVX2 Q8_0 dot takes signed quants). */
static inline int zero_point(int isa, int qtype) {
    switch (qtype) {
    case QT_Q4_0: return 8;
    case QT_Q5_0: return 16;
    case QT_Q8_0: return isa == ISA_AVX2 ? 0 : 128;
    case QT_Q6_K: return 32;
    default: return 0;
    }
}

static inline int block_size(int qtype) {
    return (qtype == QT_Q4_K || qtype == QT_Q5_K || qtype == QT_Q6_K) ? 256 : 32;
}

static inline int type_size(int qtype) {
    switch (qtype) {
    case QT_Q4_0: return 18;
    case QT_Q5_0: return 22;
    case QT_Q8_0: return 34;
    case QT_Q4_K: return 144;
    case QT_Q5_K: return 176;
    case QT_Q6_K: return 210;
    default: return 0;
    }
}

static inline const int32_t *xcz_for(const xprep_t *xp, int zp) {
    for (int i = 0; i < xp->n_zp; i++)
        if (xp->zp[i] == zp) return xp->xcz[i];
    return NULL;
}

/* IEEE half -> float without F16C (exact for every half, subnormals included). */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            mant <<= 1;
            e++;
        } while (!(mant & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint32_t load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Q4_K / Q5_K: the 8 six-bit scales and mins of a super-block (`scales` = its 12 bytes). */
static inline void kquant_scales(const uint8_t *q, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = q[j] & 63;
        mn[j] = q[j + 4] & 63;
        sc[j + 4] = (q[j + 8] & 0x0F) | ((q[j] >> 6) << 4);
        mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
    }
}

/* kquant_scales on 32-bit words: the 8 scales (bytes of *sc) and 8 mins (bytes of *mn). In the
 * words w0, w1, w2 of the 12 bytes, scale j < 4 is byte j of w0 & 0x3f.., min j < 4 byte j of
 * w1 & 0x3f..; scale 4 + j is the low nibble of byte j of w2 with w0's top 2 bits of byte j above
 * it, min 4 + j the high nibble with w1's top bits. */
static inline void kquant_scale_words(const uint8_t *q, uint64_t *sc, uint64_t *mn) {
    const uint32_t w0 = load_u32(q), w1 = load_u32(q + 4), w2 = load_u32(q + 8);
    const uint32_t six = 0x3F3F3F3Fu, nib = 0x0F0F0F0Fu, two = 0x03030303u;
    const uint32_t sc_hi = (w2 & nib) | (((w0 >> 6) & two) << 4);
    const uint32_t mn_hi = ((w2 >> 4) & nib) | (((w1 >> 6) & two) << 4);
    *sc = (uint64_t)(w0 & six) | (uint64_t)sc_hi << 32;
    *mn = (uint64_t)(w1 & six) | (uint64_t)mn_hi << 32;
}

/* The rounding of x shared by every ISA (each compiles it with its own vector width). One row:
 * xq, dxl, xc, xs of row `r` from x (k floats). The product x * inv is rounded in double, half to
 * even, by the 1.5 * 2^52 trick (exact for |v| < 2^51; here |v| <= 127). */
static inline void prep_row(xprep_t *xp, const float *x, int64_t r) {
    const int64_t k = xp->k;
    int8_t *xq = xp->xq + r * k;
    float *dxl = xp->dxl + r * (k / 4);
    int32_t *xc = xp->xc + r * (k / 4);
    float *xs = xp->xs + r * (k / 32);
    const double magic = 6755399441055744.0;
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            float a = xb[i] < 0 ? -xb[i] : xb[i];
            amax = a > amax ? a : amax;
        }
        const float inv = 127.0f / (amax > 1e-30f ? amax : 1e-30f);
        const float dx = amax * (float)(1.0 / 127.0);
        const double invd = (double)inv;
        int32_t q[32];
        for (int i = 0; i < 32; i++) {
            double v = (double)xb[i] * invd;
            q[i] = (int32_t)((v + magic) - magic);
        }
        int32_t total = 0;
        for (int l = 0; l < 8; l++) {
            int32_t s = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
            xc[8 * b + l] = s;
            dxl[8 * b + l] = dx;
            total += s;
        }
        for (int i = 0; i < 32; i++) xq[32 * b + i] = (int8_t)q[i];
        xs[b] = dx * (float)total;
    }
    for (int z = 0; z < xp->n_zp; z++) {
        int32_t *xcz = xp->xcz[z] + r * (k / 4);
        const int32_t zp = xp->zp[z];
        for (int64_t l = 0; l < k / 4; l++) xcz[l] = -zp * xc[l];
    }
}

#define DEFINE_PREP(NAME)                                                                          \
    void NAME(xprep_t *xp, const float *x, int64_t ldx, int64_t m0, int64_t m1) {                  \
        for (int64_t r = m0; r < m1; r++) prep_row(xp, x + r * ldx, r);                            \
    }

#endif
