/* Portable kernels: one 32-element block at a time, integer dot, float scale. Also the readable
 * statement of what the vector kernels compute (see qcpu.h for the sums). */
#include "qcpu.h"

DEFINE_PREP(prep_scalar)

/* Unsigned quants u[32] of 32-element block `b` of a row, and its scales: s[0] for elements
 * 0..15, s[1] for 16..31, and the min m (w = s * (u - zp) - m). */
static void unpack_block(int qtype, const uint8_t *row, int64_t b, uint8_t u[32], float s[2],
                         float *m) {
    *m = 0.0f;
    switch (qtype) {
    case QT_Q4_0:
    case QT_Q5_0: {
        const uint8_t *blk = row + b * type_size(qtype);
        const uint8_t *qs = blk + (qtype == QT_Q5_0 ? 6 : 2);
        uint32_t qh = qtype == QT_Q5_0 ? load_u32(blk + 2) : 0;
        for (int i = 0; i < 16; i++) {
            u[i] = (qs[i] & 0x0F) | (((qh >> i) & 1) << 4);
            u[i + 16] = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
        }
        s[0] = s[1] = half_to_float(load_u16(blk));
        return;
    }
    case QT_Q8_0: {
        const uint8_t *blk = row + b * 34;
        for (int i = 0; i < 32; i++) u[i] = blk[2 + i] ^ 0x80;
        s[0] = s[1] = half_to_float(load_u16(blk));
        return;
    }
    case QT_Q4_K:
    case QT_Q5_K: {
        const uint8_t *blk = row + (b / 8) * type_size(qtype);
        const int j = (int)(b % 8);
        const uint8_t *qs = blk + (qtype == QT_Q5_K ? 48 : 16) + 32 * (j / 2);
        for (int i = 0; i < 32; i++) {
            u[i] = (j & 1) ? qs[i] >> 4 : qs[i] & 0x0F;
            if (qtype == QT_Q5_K) u[i] |= ((blk[16 + i] >> j) & 1) << 4;
        }
        uint8_t sc[8], mn[8];
        kquant_scales(blk + 4, sc, mn);
        s[0] = s[1] = half_to_float(load_u16(blk)) * (float)sc[j];
        *m = half_to_float(load_u16(blk + 2)) * (float)mn[j];
        return;
    }
    case QT_Q6_K: {
        const uint8_t *blk = row + (b / 8) * 210;
        const int g = (int)(b % 8), h = g / 4, q = g % 4; /* group of 32 in half h */
        const uint8_t *ql = blk + 64 * h + 32 * (q % 2), *qh = blk + 128 + 32 * h;
        for (int i = 0; i < 32; i++) {
            uint8_t lo = q < 2 ? ql[i] & 0x0F : ql[i] >> 4;
            u[i] = lo | (((qh[i] >> (2 * q)) & 3) << 4);
        }
        const float d = half_to_float(load_u16(blk + 208));
        const int8_t *sc = (const int8_t *)(blk + 192);
        s[0] = d * (float)sc[2 * g];
        s[1] = d * (float)sc[2 * g + 1];
        return;
    }
    }
}

void tile_scalar(const xprep_t *xp, const part_t *p, int64_t r0, int64_t r1, int64_t m0,
                 int64_t m1, float *y, int64_t ldy, const float *bias) {
    const int64_t k = xp->k, nb = k / 32;
    const int zp = zero_point(ISA_SCALAR, p->qtype);
    uint8_t u[32];
    float s[2], mn;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = p->w + r * p->row_bytes;
        for (int64_t m = m0; m < m1; m++) {
            const int8_t *xq = xp->xq + m * k;
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                unpack_block(p->qtype, row, b, u, s, &mn);
                const float dx = xp->dxl[m * (k / 4) + 8 * b];
                for (int h = 0; h < 2; h++) {
                    int32_t isum = 0;
                    for (int i = 16 * h; i < 16 * h + 16; i++)
                        isum += ((int32_t)u[i] - zp) * (int32_t)xq[32 * b + i];
                    acc += (float)isum * (s[h] * dx);
                }
                acc -= mn * xp->xs[m * nb + b];
            }
            y[m * ldy + p->col + r] = acc + (bias ? bias[p->col + r] : 0.0f);
        }
    }
}

void dequant_row_scalar(int qtype, const uint8_t *row, int64_t k, void *out, int f32) {
    const int zp = zero_point(ISA_SCALAR, qtype);
    uint8_t u[32];
    float s[2], mn;
    for (int64_t b = 0; b < k / 32; b++) {
        unpack_block(qtype, row, b, u, s, &mn);
        for (int i = 0; i < 32; i++) {
            const float q = (float)((int32_t)u[i] - zp);
            /* gguf-py: d * (q - zp), or (d * sc) * q - dmin * m for Q4_K / Q5_K (no fused
             * multiply-add: the build turns contraction off) */
            const float w = (qtype == QT_Q4_K || qtype == QT_Q5_K) ? s[i / 16] * q - mn
                                                                   : s[i / 16] * q;
            if (f32)
                ((float *)out)[32 * b + i] = w;
            else
                ((uint16_t *)out)[32 * b + i] = float_to_bf16(w);
        }
    }
}
