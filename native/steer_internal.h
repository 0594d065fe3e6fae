/*
 * steer_internal.h -- private state shared by the host hook (steer.c) and its CUDA launch
 * path (steer_cuda.c). Not part of the C API.
 */
#ifndef LLAMA_STEER_INTERNAL_H
#define LLAMA_STEER_INTERNAL_H

#include <stdatomic.h>
#include <stdint.h>

#include "ggml_mirror.h"
#include "llama_steer.h"

typedef struct steer_cuda steer_cuda; /* steer_cuda.c */

/* Observer sums. They belong to the configs, not to the hook: a config holds a reference to
 * the accumulator its evals add into, so a writer publishing a config with another number of
 * regions never frees memory a pinned eval may still be writing. A config republished with
 * the same shape (or one that does not observe) takes over the current accumulator, so an
 * observation that spans a republish (update() from another thread) is not split. `refs`
 * counts the slots holding it and changes only in steer_hook_set_config under `writing` (and
 * in steer_hook_free): it drops to 0 only when the slot of the last config holding it is
 * overwritten, which happens after that slot's readers drained. */
typedef struct steer_acc {
    float *sums;     /* [n_layer * n_head * n_regions] (layer, head, region) */
    uint64_t *rows;  /* [n_layer] query rows accumulated per layer */
    int32_t n_layer, n_head, n_regions;
    int refs;
} steer_acc;

/* one published config; immutable while any reader has it pinned */
typedef struct steer_cfg {
    uint8_t *heads;     /* [n_layer * n_head] */
    uint8_t *layer_any; /* [n_layer] some head of the layer is steered */
    float *bias;        /* [n_cells] */
    int32_t n_cells;
    float tail;
    int32_t lo, hi; /* non-zero range of bias */
    int32_t phases;
    int keep_share; /* STEER_EDIT_KEEP_SHARE: rows keep the edited cells' attention share */
    int edits; /* any edit can change a value */
    int16_t *region;
    int32_t n_region_cells;
    int32_t n_regions;
    uint8_t *obs_layers; /* [n_layer] */
    int32_t obs_rows;
    int observes;        /* then acc != NULL and acc->n_regions == n_regions */
    steer_acc *acc;      /* the observer sums (shared, counted); NULL until a config observes */
    uint64_t version; /* set at publish; the CUDA path re-uploads tables when it changes */
    uint64_t key;     /* the caller's id of the edit (steer_stats.eval_key) */
} steer_cfg;

struct steer_hook {
    int32_t n_layer, n_head;
    int bound;
    sg_get_name_fn get_name;
    sg_buffer_is_host_fn buffer_is_host;

    steer_cfg slot[2];
    atomic_int active;
    atomic_int readers[2];
    atomic_flag writing;

    /* eval-thread state */
    int pinned; /* slot pinned by begin_eval, or -1 */
    int32_t phase;
    int eval_edits;          /* the config pinned by begin_eval edits in its phase */
    uint64_t asked_at_begin; /* stats.n_asked at begin_eval: did a graph run since? */
    float *scale; /* [n_layer] softmax scale per layer (0 = unknown) */
    steer_stats stats;
    uint64_t next_version;
    steer_cuda *cuda; /* NULL until steer_hook_set_cuda */
};


/* CUDA path: 0 = done, else a STEER_F_* flag to report */
int steer_cuda_edit(steer_hook *h, const steer_cfg *c, int32_t il, void *data,
                    const int64_t ne[4], const int64_t nb[4]);
int steer_cuda_observe(steer_hook *h, const steer_cfg *c, int32_t il, const void *data,
                       const int64_t ne[4], const int64_t nb[4]);
void steer_cuda_free(steer_cuda *cu);

#endif /* LLAMA_STEER_INTERNAL_H */
