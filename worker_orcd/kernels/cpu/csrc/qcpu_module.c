/* worker_orcd.kernels.cpu._qcpu: the Python entry points of the CPU quantized matmul.
 *
 *   linear(x_ptr, m, k, ldx, parts, y_ptr, ldy, bias_ptr, threads, isa, rows, mrows)
 *       y[:, col:col + n] = x @ W^T (+ bias) for every part (qtype, w_ptr, n, row_bytes, col);
 *       x float32 [m, k] (row stride ldx), y float32 (row stride ldy), bias float32 or 0.
 *   dequant(qtype, w_ptr, row_bytes, k, r0, r1, out_ptr, ldo, f32, threads, isa)
 *       rows r0 .. r1 - 1 of a weight as float32 (f32) or bfloat16 (uint16) rows of out (row
 *       stride ldo elements)
 *   round_x(x_ptr, m, k, ldx, xq_ptr, dx_ptr)   x rounded as `linear` rounds it (for tests)
 *   rms_norm(x, res, w, eps, rows, d, normed, summed)       (qcpu_layer.c; res, summed may be 0)
 *   rope_store(q, q_rs, H, k, k_rs, v, v_rs, Hk, D, T, pos, cs, cs_rs, half, kc, vc, slots, qout)
 *   silu_mul(x, rows, n, out)                   silu(gate) * up (AVX-512 CPUs only)
 *   attention(q, H, D, kc, vc, Hk, seqs, scale, window, out, threads, isa)
 *       q, out [T, H, D]; caches [S, Hk, D]; seqs: (first row, end row, context length, first
 *       slot, slot index address or 0) per sequence; window 0 for none
 *   isas()                                       ISA levels this CPU runs, best last
 *
 * Pointers come from torch tensors that the Python side has checked (dtype, shape, contiguity);
 * the GIL is released while the kernels run. Work goes to the thread pool (qcpu_pool.c): the rows
 * of x are rounded (in parallel when there are many), then tasks of (part, weight rows, x rows) are
 * claimed one by one. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdlib.h>

#include "qcpu.h"

#define MAX_PARTS 16

static int cpu_isa_max(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
    return ISA_SCALAR;
}

/* Scratch for the rounded x: one grow-only buffer, taken under a lock; a caller that finds it
 * busy (another thread in a matmul) gets its own for the call. */
static pthread_mutex_t scratch_lock = PTHREAD_MUTEX_INITIALIZER;
static void *scratch;
static size_t scratch_size;

static int64_t align64(int64_t n) { return (n + 63) & ~(int64_t)63; }

static size_t prep_bytes(int64_t m, int64_t k, int n_zp) {
    return (size_t)(align64(m * k) + align64(m * k) + align64(m * k) + align64(m * (k / 8)) +
                    n_zp * align64(m * k));
}

static void prep_layout(xprep_t *xp, char *base) {
    const int64_t m = xp->m, k = xp->k;
    xp->xq = (int8_t *)base;
    base += align64(m * k);
    xp->dxl = (float *)base;
    base += align64(m * k);
    xp->xc = (int32_t *)base;
    base += align64(m * k);
    xp->xs = (float *)base;
    base += align64(m * (k / 8));
    for (int z = 0; z < xp->n_zp; z++) {
        xp->xcz[z] = (int32_t *)base;
        base += align64(m * k);
    }
}

typedef void (*prep_fn)(xprep_t *, const float *, int64_t, int64_t, int64_t);

static void pick(int isa, tile_fn *tile, prep_fn *prep) {
    if (isa == ISA_AVX512) {
        *tile = tile_avx512;
        *prep = prep_avx512;
    } else if (isa == ISA_AVX2) {
        *tile = tile_avx2;
        *prep = prep_avx2;
    } else {
        *tile = tile_scalar;
        *prep = prep_scalar;
    }
}

typedef struct {
    int64_t first_task, row_tasks;
} split_t;

typedef struct {
    xprep_t *xp;
    const float *x;
    int64_t ldx;
    const part_t *parts;
    int n_parts;
    split_t sp[MAX_PARTS];
    float *y;
    int64_t ldy;
    const float *bias;
    tile_fn tile;
    prep_fn prep;
    int64_t rows, mrows, m_tasks, prep_rows;
} job_t;

static void prep_task(void *ctx, int64_t t) {
    job_t *j = ctx;
    const int64_t m0 = t * j->prep_rows, m1 = m0 + j->prep_rows;
    j->prep(j->xp, j->x, j->ldx, m0, m1 < j->xp->m ? m1 : j->xp->m);
}

static void tile_task(void *ctx, int64_t t) {
    job_t *j = ctx;
    int i = j->n_parts - 1;
    while (j->sp[i].first_task > t) i--;
    const int64_t local = t - j->sp[i].first_task;
    const int64_t rt = local / j->m_tasks, mt = local % j->m_tasks;
    const int64_t n = j->parts[i].n, m = j->xp->m;
    const int64_t r0 = rt * j->rows, r1 = r0 + j->rows < n ? r0 + j->rows : n;
    const int64_t m0 = mt * j->mrows, m1 = m0 + j->mrows < m ? m0 + j->mrows : m;
    j->tile(j->xp, &j->parts[i], r0, r1, m0, m1, j->y, j->ldy, j->bias);
}

static void run(xprep_t *xp, const float *x, int64_t ldx, const part_t *parts, int n_parts,
                float *y, int64_t ldy, const float *bias, int threads, int isa, int64_t rows,
                int64_t mrows) {
    job_t j = {.xp = xp, .x = x, .ldx = ldx, .parts = parts, .n_parts = n_parts, .y = y,
               .ldy = ldy, .bias = bias};
    pick(isa, &j.tile, &j.prep);
    const int64_t m = xp->m;
    int64_t n_total = 0;
    for (int i = 0; i < n_parts; i++) n_total += parts[i].n;
    /* x rows per task: all of them for a few (decode), else tiles that the kernels' 16-row
     * (8 for AVX2) register blocks divide. Weight rows per task: enough tasks to balance the
     * threads (8 per thread), at least 8 rows, at most 64 when x is tiled. */
    if (mrows <= 0) mrows = m <= 16 ? m : 64;
    j.mrows = mrows;
    j.m_tasks = (m + mrows - 1) / mrows;
    if (rows <= 0) {
        rows = n_total * j.m_tasks / (8 * (int64_t)threads) + 1;
        if (j.m_tasks > 1 && rows > 64) rows = 64;
        if (rows < 8) rows = 8;
    }
    j.rows = rows;
    int64_t n_tasks = 0;
    for (int i = 0; i < n_parts; i++) {
        j.sp[i].first_task = n_tasks;
        j.sp[i].row_tasks = (parts[i].n + rows - 1) / rows;
        n_tasks += j.sp[i].row_tasks * j.m_tasks;
    }
    j.prep_rows = 16;
    const int64_t prep_tasks = (m + j.prep_rows - 1) / j.prep_rows;
    pool_run(m * xp->k >= 65536 ? threads : 1, prep_tasks, prep_task, &j);
    pool_run(threads, n_tasks, tile_task, &j);
}

static int parse_parts(PyObject *seq, int64_t k, part_t *parts, int *n_parts) {
    PyObject *fast = PySequence_Fast(seq, "parts must be a sequence");
    if (!fast) return -1;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n < 1 || n > MAX_PARTS) {
        PyErr_Format(PyExc_ValueError, "between 1 and %d parts, got %zd", MAX_PARTS, n);
        Py_DECREF(fast);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long ptr;
        long long nrows, row_bytes, col;
        int qt;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "iKLLL", &qt, &ptr, &nrows,
                              &row_bytes, &col)) {
            Py_DECREF(fast);
            return -1;
        }
        const int ts = type_size(qt);
        if (ts == 0) {
            PyErr_Format(PyExc_ValueError, "part %zd: no CPU kernel for GGML type %d", i, qt);
            Py_DECREF(fast);
            return -1;
        }
        if (k % block_size(qt) || row_bytes != k / block_size(qt) * ts || nrows < 1 || col < 0) {
            PyErr_Format(PyExc_ValueError,
                         "part %zd: rows of %lld bytes, %lld rows do not fit type %d with k=%lld",
                         i, row_bytes, nrows, qt, (long long)k);
            Py_DECREF(fast);
            return -1;
        }
        parts[i] = (part_t){qt, (const uint8_t *)(uintptr_t)ptr, nrows, row_bytes, col};
    }
    *n_parts = (int)n;
    Py_DECREF(fast);
    return 0;
}

static int resolve_isa(int isa) {
    const int best = cpu_isa_max();
    if (isa <= 0) return best;
    if (isa > best) {
        PyErr_Format(PyExc_ValueError, "ISA level %d is not supported by this CPU (best %d)", isa,
                     best);
        return -1;
    }
    return isa;
}

static PyObject *py_linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long xptr, yptr, bptr;
    long long m, k, ldx, ldy, rows, mrows;
    int threads, isa;
    PyObject *seq;
    if (!PyArg_ParseTuple(args, "KLLLOKLKiiLL", &xptr, &m, &k, &ldx, &seq, &yptr, &ldy, &bptr,
                          &threads, &isa, &rows, &mrows))
        return NULL;
    if (m < 1 || k < 32 || k % 32 || ldx < k || threads < 1) {
        PyErr_Format(PyExc_ValueError, "bad shape: m=%lld k=%lld ldx=%lld threads=%d", m, k, ldx,
                     threads);
        return NULL;
    }
    part_t parts[MAX_PARTS];
    int n_parts;
    if (parse_parts(seq, k, parts, &n_parts) < 0) return NULL;
    for (int i = 0; i < n_parts; i++)
        if (parts[i].col + parts[i].n > ldy) {
            PyErr_Format(PyExc_ValueError, "part %d: columns up to %lld past the row stride %lld",
                         i, (long long)(parts[i].col + parts[i].n), ldy);
            return NULL;
        }
    if ((isa = resolve_isa(isa)) < 0) return NULL;

    xprep_t xp = {.m = m, .k = k};
    for (int i = 0; i < n_parts; i++) {
        const int zp = zero_point(isa, parts[i].qtype);
        if (zp == 0 || isa == ISA_SCALAR || xcz_for(&xp, zp)) continue;
        xp.zp[xp.n_zp++] = zp; /* at most 4 distinct non-zero zero points exist */
    }
    const size_t need = prep_bytes(m, k, xp.n_zp);
    void *own = NULL, *buf;
    int locked = pthread_mutex_trylock(&scratch_lock) == 0;
    if (locked && scratch_size < need) {
        free(scratch);
        scratch = aligned_alloc(64, (need + 63) & ~(size_t)63);
        scratch_size = scratch ? need : 0;
    }
    if (locked && scratch) {
        buf = scratch;
    } else {
        if (locked) pthread_mutex_unlock(&scratch_lock);
        locked = 0;
        buf = own = aligned_alloc(64, (need + 63) & ~(size_t)63);
        if (!own) return PyErr_NoMemory();
    }
    prep_layout(&xp, (char *)buf);
    Py_BEGIN_ALLOW_THREADS
    run(&xp, (const float *)(uintptr_t)xptr, ldx, parts, n_parts, (float *)(uintptr_t)yptr, ldy,
        (const float *)(uintptr_t)bptr, threads, isa, rows, mrows);
    Py_END_ALLOW_THREADS
    if (locked) pthread_mutex_unlock(&scratch_lock);
    free(own);
    Py_RETURN_NONE;
}

typedef struct {
    int qtype, isa, f32;
    const uint8_t *w;
    int64_t row_bytes, k, r0, r1, ldo, rows;
    char *out;
} dq_job_t;

static void dequant_task(void *ctx, int64_t t) {
    const dq_job_t *j = ctx;
    const int64_t a = j->r0 + t * j->rows, b = a + j->rows < j->r1 ? a + j->rows : j->r1;
    for (int64_t r = a; r < b; r++) {
        const uint8_t *row = j->w + r * j->row_bytes;
        char *o = j->out + (r - j->r0) * j->ldo * (j->f32 ? 4 : 2);
        if (j->isa == ISA_AVX512)
            dequant_row_avx512(j->qtype, row, j->k, o, j->f32);
        else
            dequant_row_scalar(j->qtype, row, j->k, o, j->f32);
    }
}

static PyObject *py_dequant(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long wptr, optr;
    long long row_bytes, k, r0, r1, ldo;
    int qt, f32, threads, isa;
    if (!PyArg_ParseTuple(args, "iKLLLLKLpii", &qt, &wptr, &row_bytes, &k, &r0, &r1, &optr, &ldo,
                          &f32, &threads, &isa))
        return NULL;
    const int ts = type_size(qt);
    if (ts == 0 || k < 32 || k % block_size(qt) || row_bytes != k / block_size(qt) * ts ||
        r0 < 0 || r1 < r0 || ldo < k || threads < 1) {
        PyErr_Format(PyExc_ValueError, "bad dequant arguments: type %d k=%lld rows %lld..%lld",
                     qt, k, r0, r1);
        return NULL;
    }
    if ((isa = resolve_isa(isa)) < 0) return NULL;
    dq_job_t j = {qt, isa, f32, (const uint8_t *)(uintptr_t)wptr, row_bytes, k, r0, r1, ldo, 16,
                  (char *)(uintptr_t)optr};
    Py_BEGIN_ALLOW_THREADS
    pool_run(threads, (r1 - r0 + j.rows - 1) / j.rows, dequant_task, &j);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_round_x(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long xptr, qptr, dptr;
    long long m, k, ldx;
    int isa = 0;
    if (!PyArg_ParseTuple(args, "KLLLKK|i", &xptr, &m, &k, &ldx, &qptr, &dptr, &isa)) return NULL;
    if (m < 1 || k < 32 || k % 32 || ldx < k) {
        PyErr_Format(PyExc_ValueError, "bad shape: m=%lld k=%lld ldx=%lld", m, k, ldx);
        return NULL;
    }
    if ((isa = resolve_isa(isa)) < 0) return NULL;
    xprep_t xp = {.m = m, .k = k};
    void *buf = aligned_alloc(64, (prep_bytes(m, k, 0) + 63) & ~(size_t)63);
    if (!buf) return PyErr_NoMemory();
    prep_layout(&xp, (char *)buf);
    tile_fn tile;
    prep_fn prep;
    pick(isa, &tile, &prep);
    prep(&xp, (const float *)(uintptr_t)xptr, ldx, 0, m);
    memcpy((void *)(uintptr_t)qptr, xp.xq, (size_t)(m * k));
    float *dx = (float *)(uintptr_t)dptr;
    for (int64_t i = 0; i < m * (k / 32); i++) dx[i] = xp.dxl[8 * i];
    free(buf);
    Py_RETURN_NONE;
}

#define P(v) ((void *)(uintptr_t)(v))

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, res, w, normed, summed;
    float eps;
    long long rows, d;
    if (!PyArg_ParseTuple(args, "KKKfLLKK", &x, &res, &w, &eps, &rows, &d, &normed, &summed))
        return NULL;
    if (rows < 0 || d < 1 || (res && !summed)) {
        PyErr_SetString(PyExc_ValueError, "bad rms_norm arguments");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rms_norm_rows(P(x), P(res), P(w), eps, rows, d, P(normed), P(summed));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_rope_store(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q, k, v, pos, cs, kc, vc, slots, qout;
    long long q_rs, h, k_rs, v_rs, hk, d, t, cs_rs, half;
    if (!PyArg_ParseTuple(args, "KLLKLKLLLLKKLLKKKK", &q, &q_rs, &h, &k, &k_rs, &v, &v_rs, &hk,
                          &d, &t, &pos, &cs, &cs_rs, &half, &kc, &vc, &slots, &qout))
        return NULL;
    if (t < 0 || h < 1 || hk < 1 || d < 2 || half < 1 || 2 * half > d || cs_rs < 2 * half) {
        PyErr_SetString(PyExc_ValueError, "bad rope_store arguments");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rope_store_rows(P(q), q_rs, h, P(k), k_rs, P(v), v_rs, hk, d, t, P(pos), P(cs), cs_rs, half,
                    P(kc), P(vc), P(slots), P(qout));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_silu_mul(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long x, out;
    long long rows, n;
    if (!PyArg_ParseTuple(args, "KLLK", &x, &rows, &n, &out)) return NULL;
    if (rows < 0 || n < 1 || cpu_isa_max() < ISA_AVX512) {
        PyErr_SetString(PyExc_ValueError, "silu_mul needs rows >= 0, n >= 1 and an AVX-512 CPU");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    silu_mul_avx512(P(x), rows, n, P(out));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

typedef struct {
    attn_task_t *tasks;
    int isa;
    int64_t scores_len;
} attn_job_t;

static void attention_task(void *ctx, int64_t i) {
    attn_job_t *j = ctx;
    float *scores = malloc((size_t)j->scores_len * sizeof(float));
    if (!scores) return; /* out of memory: the caller checks the task's mark below */
    if (j->isa == ISA_AVX512)
        attention_avx512(&j->tasks[i], scores);
    else
        attention_scalar(&j->tasks[i], scores);
    free(scores);
    j->tasks[i].d = -j->tasks[i].d; /* done */
}

static PyObject *py_attention(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long q, kc, vc, out;
    long long h, d, hk, window;
    float scale;
    int threads, isa;
    PyObject *seqs;
    if (!PyArg_ParseTuple(args, "KLLKKLOfLKii", &q, &h, &d, &kc, &vc, &hk, &seqs, &scale, &window,
                          &out, &threads, &isa))
        return NULL;
    if (h < 1 || hk < 1 || h % hk || d < 1 || d > 128 || window < 0 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "bad attention arguments (head_dim up to 128)");
        return NULL;
    }
    if ((isa = resolve_isa(isa)) < 0) return NULL;
    PyObject *fast = PySequence_Fast(seqs, "seqs must be a sequence");
    if (!fast) return NULL;
    const Py_ssize_t n_seqs = PySequence_Fast_GET_SIZE(fast);
    int64_t n_tasks = 0, longest = 1;
    long long (*spec)[5] = malloc((size_t)(n_seqs > 0 ? n_seqs : 1) * sizeof *spec);
    if (!spec) {
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t b = 0; b < n_seqs; b++) {
        unsigned long long slots;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, b), "LLLLK", &spec[b][0], &spec[b][1],
                              &spec[b][2], &spec[b][3], &slots)) {
            free(spec);
            Py_DECREF(fast);
            return NULL;
        }
        spec[b][4] = (long long)slots;
        const long long rows = spec[b][1] - spec[b][0];
        if (rows < 0 || spec[b][2] < rows) {
            PyErr_Format(PyExc_ValueError, "sequence %zd: %lld rows over a context of %lld", b,
                         rows, spec[b][2]);
            free(spec);
            Py_DECREF(fast);
            return NULL;
        }
        n_tasks += rows * hk;
        if (spec[b][2] > longest) longest = spec[b][2];
    }
    Py_DECREF(fast);
    attn_task_t *tasks = malloc((size_t)(n_tasks > 0 ? n_tasks : 1) * sizeof *tasks);
    if (!tasks) {
        free(spec);
        return PyErr_NoMemory();
    }
    const int64_t group = h / hk;
    int64_t i = 0, work = 0;
    for (Py_ssize_t b = 0; b < n_seqs; b++) {
        const int64_t first_pos = spec[b][2] - (spec[b][1] - spec[b][0]);
        for (int64_t t = spec[b][0]; t < spec[b][1]; t++) {
            const int64_t p = first_pos + (t - spec[b][0]);
            const int64_t lo = window && p - window + 1 > 0 ? p - window + 1 : 0;
            for (int64_t g = 0; g < hk; g++) {
                tasks[i++] = (attn_task_t){
                    .q = (const float *)P(q) + t * h * d, .out = (float *)P(out) + t * h * d,
                    .kc = P(kc), .vc = P(vc), .d = d, .n_kv = hk, .g = g, .h0 = g * group,
                    .h1 = (g + 1) * group, .lo = lo, .hi = p, .slot0 = spec[b][3],
                    .slots = (const int64_t *)P(spec[b][4]), .scale = scale};
                work += (p - lo + 1) * group * d;
            }
        }
    }
    free(spec);
    attn_job_t job = {tasks, isa, longest};
    Py_BEGIN_ALLOW_THREADS
    pool_run(work >= (1 << 16) ? threads : 1, n_tasks, attention_task, &job);
    Py_END_ALLOW_THREADS
    int failed = 0;
    for (int64_t t = 0; t < n_tasks; t++) failed |= tasks[t].d > 0;
    free(tasks);
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_isas(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    const int best = cpu_isa_max();
    PyObject *out = PyList_New(0);
    const char *names[] = {"", "scalar", "avx2", "avx512"};
    for (int i = ISA_SCALAR; i <= best; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        PyList_Append(out, s);
        Py_DECREF(s);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"linear", py_linear, METH_VARARGS, "y[:, parts] = x @ W^T for GGUF-block weights"},
    {"dequant", py_dequant, METH_VARARGS, "weight rows as float32 or bfloat16, gguf-py exact"},
    {"round_x", py_round_x, METH_VARARGS, "x rounded to int8 per 32 elements, as linear does"},
    {"isas", py_isas, METH_NOARGS, "ISA levels this CPU runs, best last"},
    {"rms_norm", py_rms_norm, METH_VARARGS, "RMSNorm of rows, with the residual add"},
    {"rope_store", py_rope_store, METH_VARARGS, "rotary embedding of q, k and the KV cache write"},
    {"attention", py_attention, METH_VARARGS, "causal attention over the KV cache"},
    {"silu_mul", py_silu_mul, METH_VARARGS, "silu(gate) * up"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qcpu", NULL, -1, methods};

PyMODINIT_FUNC PyInit__qcpu(void) { return PyModule_Create(&module); }
