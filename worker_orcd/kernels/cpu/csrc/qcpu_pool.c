/* A small thread pool for the kernels, made for a CPU shared with other processes.
 *
 * pool_run(threads, n, fn, ctx) runs fn(ctx, 0 .. n-1) on the calling thread and up to threads - 1
 * helpers. Tasks are claimed one at a time from a shared counter; the caller works through them
 * too and then waits only for tasks a helper has claimed and not finished. A helper that wakes up
 * late (its core was busy) finds nothing left and goes back to waiting: unlike a fork/join
 * barrier, no call waits for a thread to be scheduled merely so that it can report it had nothing
 * to do. Between calls helpers poll briefly (the matmuls of one forward pass come back to back),
 * yielding the CPU at every poll so that other threads there (torch's own OpenMP workers run the
 * small ops between the matmuls) are not held up, then sleep on a condition variable.
 *
 * The claim word packs (generation << 32 | next task). A new job first marks the word busy, then
 * writes its function, context and size, then publishes (generation + 1, 0); a claim is a
 * compare-and-swap on the whole word, so a helper holding a stale view of an older job never
 * takes a task of a newer one, and a job's parameters cannot change while one of its tasks is
 * claimed (the caller returns only when every claimed task is done). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include "qcpu.h"

#define BUSY 0xFFFFFFFFu
#define MAX_HELPERS 63
#define SPIN_NS 100000 /* how long an idle helper polls before sleeping */

static _Atomic uint64_t claim_word = BUSY; /* generation 0, busy */
static _Atomic int64_t done_count;
/* the job's parameters: written only while the claim word is busy */
static _Atomic int64_t job_n;
static _Atomic(pool_fn) job_fn;
static _Atomic(void *) job_ctx;

static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static _Atomic int sleepers;
static int n_helpers;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim and run tasks of the job whose claim word was last seen as `seen`, until none are left. */
static void work(uint64_t seen) {
    for (;;) {
        const uint32_t idx = (uint32_t)seen;
        if (idx == BUSY) return;
        const int64_t n = atomic_load_explicit(&job_n, memory_order_relaxed);
        if ((int64_t)idx >= n) return;
        if (atomic_compare_exchange_weak(&claim_word, &seen, seen + 1)) {
            atomic_load_explicit(&job_fn, memory_order_relaxed)(
                atomic_load_explicit(&job_ctx, memory_order_relaxed), idx);
            atomic_fetch_add_explicit(&done_count, 1, memory_order_release);
            seen = atomic_load_explicit(&claim_word, memory_order_acquire);
        }
        /* on failure `seen` holds the current word: retry (same job) or stop (next/busy) */
    }
}

static void *helper_main(void *arg) {
    (void)arg;
    uint32_t last_gen = 0;
    for (;;) {
        uint64_t seen = atomic_load_explicit(&claim_word, memory_order_acquire);
        if ((uint32_t)(seen >> 32) != last_gen && (uint32_t)seen != BUSY) {
            last_gen = (uint32_t)(seen >> 32);
            work(seen);
            continue;
        }
        const int64_t until = now_ns() + SPIN_NS;
        int found = 0;
        while (!found && now_ns() < until) {
            sched_yield();
            seen = atomic_load_explicit(&claim_word, memory_order_acquire);
            found = (uint32_t)(seen >> 32) != last_gen;
        }
        if (found) continue;
        pthread_mutex_lock(&sleep_lock);
        atomic_fetch_add(&sleepers, 1);
        while ((uint32_t)(atomic_load(&claim_word) >> 32) == last_gen)
            pthread_cond_wait(&wake, &sleep_lock);
        atomic_fetch_sub(&sleepers, 1);
        pthread_mutex_unlock(&sleep_lock);
    }
    return NULL;
}

static void reset_after_fork(void) {
    /* the child has none of the parent's threads */
    n_helpers = 0;
    atomic_store(&sleepers, 0);
    pthread_mutex_init(&run_lock, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&wake, NULL);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, reset_after_fork); }

static void grow(int want) {
    pthread_once(&fork_once, install_fork_handler);
    while (n_helpers < want && n_helpers < MAX_HELPERS) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&t, &attr, helper_main, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        n_helpers++;
    }
}

void pool_run(int threads, int64_t n, pool_fn fn, void *ctx) {
    if (n <= 0) return;
    if (threads <= 1 || n == 1 || pthread_mutex_trylock(&run_lock) != 0) {
        for (int64_t i = 0; i < n; i++) fn(ctx, i); /* busy pool (another caller) or serial */
        return;
    }
    grow(threads - 1);
    const uint64_t old = atomic_load(&claim_word);
    const uint64_t gen = ((old >> 32) + 1) & 0xFFFFFFFFu;
    atomic_store(&claim_word, (gen << 32) | BUSY);
    atomic_store_explicit(&job_n, n, memory_order_relaxed);
    atomic_store_explicit(&job_fn, fn, memory_order_relaxed);
    atomic_store_explicit(&job_ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&done_count, 0, memory_order_relaxed);
    atomic_store(&claim_word, gen << 32); /* seq_cst: published before `sleepers` is read */
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&sleep_lock);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&sleep_lock);
    }
    work(atomic_load_explicit(&claim_word, memory_order_acquire));
    /* tasks still running on helpers; yield now and then, in case one shares this core */
    for (int spins = 0; atomic_load_explicit(&done_count, memory_order_acquire) < n; spins++) {
        cpu_relax();
        if (spins % 256 == 255) sched_yield();
    }
    pthread_mutex_unlock(&run_lock);
}
