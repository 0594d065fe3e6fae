/*
 * obs_race.c -- stress the observer against a concurrent publish (tests/test_native.py
 * builds it with -fsanitize=address against native/steer.c and native/steer_cuda.c).
 *
 * The eval thread brackets evals (begin_eval / observe_buffer / end_eval), as llama.cpp's
 * cb_eval does for kq_soft_max-<il>; the writer thread publishes configs whose number of
 * regions flips between 2 and 3, and a reader thread reads (and resets) the observer sums.
 * A hook that frees the observer sums a pinned eval is writing, or that read_obs is reading,
 * shows up as an ASan heap-use-after-free. The program also checks that an observation
 * spanning republishes of the same shape is not split: with ROWS_ALL, every row observed
 * between two resets is counted in one accumulator.
 *
 * usage: obs_race SECONDS   (exit 0 = no error found; ASan aborts with its report otherwise)
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml_mirror.h"
#include "llama_steer.h"

enum { L = 2, H = 4, N_KV = 4096, N_ROWS = 8 };

static steer_hook *hook;
static atomic_int stop;
static float probs[N_ROWS * H * N_KV];

/* a probe laid out as the mirror says, with accessors that read it the same way: the
 * stress is about the config protocol, not the ABI check */
static const char *fake_name(const struct sg_tensor *t) { return t->name; }
static void *fake_data(const struct sg_tensor *t) { return t->data; }
static size_t fake_nbytes(const struct sg_tensor *t) { return t->nb[3] * (size_t)t->ne[3]; }
static _Bool fake_is_host(void *buffer) { return buffer != NULL; }
static const char *fake_op_desc(const struct sg_tensor *t) {
    return t->op == SG_OP_SOFT_MAX ? "SOFT_MAX" : "?";
}

static int bind_fake(void) {
    static struct sg_tensor t, src;
    static float data[5 * 7 * 3 * 2];
    static char buffer[1];
    static const int64_t ne[4] = {5, 7, 3, 2};
    const float scale = 0.25f;
    memset(&t, 0, sizeof(t));
    t.type = SG_TYPE_F32;
    t.buffer = buffer;
    size_t stride = sizeof(float);
    for (int d = 0; d < 4; d++) {
        t.ne[d] = ne[d];
        t.nb[d] = stride;
        stride *= (size_t)ne[d];
    }
    t.op = SG_OP_SOFT_MAX;
    memcpy(&t.op_params[0], &scale, sizeof(float));
    t.src[0] = &src;
    t.data = data;
    strcpy(t.name, "llama-steer-probe");
    steer_probe p = {&t, &src, buffer, scale, (void *)fake_name, (void *)fake_data,
                     (void *)fake_nbytes, (void *)fake_is_host, (void *)fake_op_desc};
    return steer_hook_bind(hook, L, H, &p);
}

static int publish(int32_t n_regions) {
    static int16_t region[N_KV];
    static const uint8_t obs_layers[L] = {1, 1};
    for (int j = 0; j < N_KV; j++) region[j] = (int16_t)(j % n_regions);
    return steer_hook_set_config(hook, NULL, NULL, 0, 0.0f, 0, region, N_KV, n_regions,
                                 obs_layers, STEER_ROWS_ALL, 0);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *eval_thread(void *arg) {
    (void)arg;
    while (!atomic_load(&stop)) {
        steer_hook_begin_eval(hook, STEER_PHASE_PREFILL);
        for (int il = 0; il < L; il++)
            steer_hook_observe_buffer(hook, il, probs, N_KV, N_ROWS, H, 1, N_KV * 4,
                                      (int64_t)N_KV * 4 * N_ROWS, (int64_t)N_KV * 4 * N_ROWS * H);
        steer_hook_end_eval(hook, NULL);
    }
    return NULL;
}

static void *writer_thread(void *arg) {
    long *n = (long *)arg;
    while (!atomic_load(&stop)) {
        if (publish(2 + (int32_t)(*n % 2)) != STEER_OK) {
            fprintf(stderr, "set_config failed\n");
            exit(2);
        }
        ++*n;
    }
    return NULL;
}

static void *reader_thread(void *arg) {
    (void)arg;
    static float out[L * H * 3];
    uint64_t rows[L];
    while (!atomic_load(&stop))
        for (int r = 2; r <= 3; r++) /* whichever shape is active; the other one is refused */
            steer_hook_read_obs(hook, out, L * H * r, rows, 1);
    return NULL;
}

/* same-shape republishes while observing: the rows of every eval land in one accumulator */
static int check_not_split(void) {
    static float out[L * H * 2];
    uint64_t rows[L];
    if (publish(2) != STEER_OK || steer_hook_read_obs(hook, out, L * H * 2, rows, 1) != 0)
        return 1;
    const int n_evals = 50;
    for (int e = 0; e < n_evals; e++) {
        steer_hook_begin_eval(hook, STEER_PHASE_PREFILL);
        steer_hook_observe_buffer(hook, 0, probs, N_KV, N_ROWS, H, 1, N_KV * 4,
                                  (int64_t)N_KV * 4 * N_ROWS, (int64_t)N_KV * 4 * N_ROWS * H);
        if (publish(2) != STEER_OK) return 1; /* republished mid-eval, same shape */
        steer_hook_observe_buffer(hook, 1, probs, N_KV, N_ROWS, H, 1, N_KV * 4,
                                  (int64_t)N_KV * 4 * N_ROWS, (int64_t)N_KV * 4 * N_ROWS * H);
        steer_hook_end_eval(hook, NULL);
    }
    if (steer_hook_read_obs(hook, out, L * H * 2, rows, 1) != 0) return 1;
    for (int il = 0; il < L; il++)
        if (rows[il] != (uint64_t)n_evals * N_ROWS) {
            fprintf(stderr, "layer %d: %llu rows observed, expected %d\n", il,
                    (unsigned long long)rows[il], n_evals * N_ROWS);
            return 1;
        }
    return 0;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 2.0;
    for (size_t i = 0; i < sizeof(probs) / sizeof(probs[0]); i++) probs[i] = 1.0f / N_KV;
    if (steer_hook_new(&hook) != STEER_OK || bind_fake() != STEER_OK || publish(2) != STEER_OK) {
        fprintf(stderr, "setup failed\n");
        return 2;
    }
    if (check_not_split()) return 1;
    long n_published = 0;
    pthread_t te, tw, tr;
    pthread_create(&te, NULL, eval_thread, NULL);
    pthread_create(&tw, NULL, writer_thread, &n_published);
    pthread_create(&tr, NULL, reader_thread, NULL);
    double t0 = now();
    while (now() - t0 < seconds) {
        struct timespec ts = {0, 10000000};
        nanosleep(&ts, NULL);
    }
    atomic_store(&stop, 1);
    pthread_join(te, NULL);
    pthread_join(tw, NULL);
    pthread_join(tr, NULL);
    steer_hook_free(hook);
    printf("ok: %ld configs published\n", n_published);
    return 0;
}
