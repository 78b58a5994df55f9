/* The small float32 operations between the matmuls of a decode step, compiled: one call each
 * instead of a dozen torch operations (each of which, on a 2-core machine, may also wake a sleeping
 * OpenMP worker). Portable C; attention has an AVX-512 twin in qcpu_avx512.c.
 *
 *   rms_norm       normed = w * (s * rsqrt(mean(s^2) + eps)), s = x (+ residual, also stored)
 *   rope_store     q, k rotated (NEOX pairs i, i + R/2; as kernels/rope.py, same products in the
 *                  same order), q stored contiguous, k and v written to their cache slots
 *   attention      causal (and sliding-window) attention of query rows over cached keys/values
 */
#include <math.h>

#include "qcpu.h"

void rms_norm_rows(const float *x, const float *res, const float *w, float eps, int64_t rows,
                   int64_t d, float *normed, float *summed) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *s = res ? summed + r * d : (float *)xr;
        if (res)
            for (int64_t i = 0; i < d; i++) s[i] = xr[i] + res[r * d + i];
        float part[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= d; i += 16)
            for (int j = 0; j < 16; j++) part[j] += s[i + j] * s[i + j];
        float sq = 0.0f;
        for (int j = 0; j < 16; j++) sq += part[j];
        for (; i < d; i++) sq += s[i] * s[i];
        const float inv = 1.0f / sqrtf(sq / (float)d + eps);
        for (i = 0; i < d; i++) normed[r * d + i] = w[i] * (s[i] * inv);
    }
}

static void rotate(const float *x, const float *cs, int64_t half, int64_t d, float *out) {
    const float *cosv = cs, *sinv = cs + half;
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[half + i];
        out[i] = x1 * cosv[i] - x2 * sinv[i];
        out[half + i] = x2 * cosv[i] + x1 * sinv[i];
    }
    for (int64_t i = 2 * half; i < d; i++) out[i] = x[i];
}

void rope_store_rows(const float *q, int64_t q_rs, int64_t n_heads, const float *k, int64_t k_rs,
                     const float *v, int64_t v_rs, int64_t n_kv, int64_t d, int64_t rows,
                     const int64_t *pos, const float *cs, int64_t cs_rs, int64_t half, float *kc,
                     float *vc, const int64_t *slots, float *q_out) {
    for (int64_t t = 0; t < rows; t++) {
        const float *c = cs + pos[t] * cs_rs;
        for (int64_t h = 0; h < n_heads; h++)
            rotate(q + t * q_rs + h * d, c, half, d, q_out + (t * n_heads + h) * d);
        float *kd = kc + slots[t] * n_kv * d, *vd = vc + slots[t] * n_kv * d;
        for (int64_t h = 0; h < n_kv; h++) {
            rotate(k + t * k_rs + h * d, c, half, d, kd + h * d);
            memcpy(vd + h * d, v + t * v_rs + h * d, (size_t)d * sizeof(float));
        }
    }
}

void attention_scalar(const attn_task_t *a, float *scores) {
    const int64_t d = a->d, stride = a->n_kv * d;
    for (int64_t h = a->h0; h < a->h1; h++) {
        const float *qh = a->q + h * d;
        float m = -INFINITY;
        for (int64_t j = a->lo; j <= a->hi; j++) {
            const float *kj = a->kc + attn_slot(a, j) * stride + a->g * d;
            float s = 0.0f;
            for (int64_t i = 0; i < d; i++) s += qh[i] * kj[i];
            s *= a->scale;
            scores[j - a->lo] = s;
            m = s > m ? s : m;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j <= a->hi - a->lo; j++) {
            scores[j] = expf(scores[j] - m);
            sum += scores[j];
        }
        float *o = a->out + h * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
        for (int64_t j = a->lo; j <= a->hi; j++) {
            const float *vj = a->vc + attn_slot(a, j) * stride + a->g * d;
            const float p = scores[j - a->lo];
            for (int64_t i = 0; i < d; i++) o[i] += p * vj[i];
        }
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < d; i++) o[i] *= inv;
    }
}
