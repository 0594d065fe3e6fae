/*
 * steer.c -- the llama-steer native hook: a ggml eval callback that edits raw attention
 * scores (kq-<il>) of chosen heads for chosen KV cells, and sums post-softmax attention
 * (kq_soft_max-<il>) per region.
 *
 *   config publishing ...... steer_hook_set_config, pin/unpin (two slots, reader counts)
 *   binding + ABI check .... steer_hook_bind
 *   the callback ........... steer_cb_eval -> ask_node / edit_node / observe_node
 *   buffer entry points .... steer_hook_edit_buffer / steer_hook_observe_buffer (tests)
 *
 * No Python runs per graph node: the callback reads only C data.
 */
#define _POSIX_C_SOURCE 200809L

#include "llama_steer.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml_mirror.h"
#include "steer_internal.h"
#include "steer_math.h"

static void acc_unref(steer_acc *a) {
    if (!a || --a->refs > 0) return;
    free(a->sums);
    free(a->rows);
    free(a);
}

static steer_acc *acc_new(int32_t L, int32_t H, int32_t R) {
    steer_acc *a = (steer_acc *)calloc(1, sizeof(steer_acc));
    if (!a) return NULL;
    a->sums = (float *)calloc((size_t)L * H * R, sizeof(float));
    a->rows = (uint64_t *)calloc((size_t)L, sizeof(uint64_t));
    if (!a->sums || !a->rows) {
        free(a->sums);
        free(a->rows);
        free(a);
        return NULL;
    }
    a->n_layer = L, a->n_head = H, a->n_regions = R;
    a->refs = 1;
    return a;
}

/* frees the config's tables and drops its reference to the observer sums: call it on a slot
 * only under `writing` after the slot's readers drained (or in steer_hook_free) */
static void cfg_clear(steer_cfg *c) {
    acc_unref(c->acc);
    free(c->heads);
    free(c->layer_any);
    free(c->bias);
    free(c->region);
    free(c->obs_layers);
    memset(c, 0, sizeof(*c));
}

int steer_hook_new(steer_hook **out) {
    if (!out) return STEER_E_ARG;
    steer_hook *h = (steer_hook *)calloc(1, sizeof(steer_hook));
    if (!h) return STEER_E_NOMEM;
    atomic_init(&h->active, 0);
    atomic_init(&h->readers[0], 0);
    atomic_init(&h->readers[1], 0);
    atomic_flag_clear(&h->writing);
    h->pinned = -1;
    *out = h;
    return STEER_OK;
}

void steer_hook_free(steer_hook *h) {
    if (!h) return;
    cfg_clear(&h->slot[0]);
    cfg_clear(&h->slot[1]);
    free(h->scale);
    steer_cuda_free(h->cuda);
    free(h);
}

/* ---- ABI check ------------------------------------------------------------------------ */

int steer_hook_bind(steer_hook *h, int32_t n_layer, int32_t n_head, const steer_probe *probe) {
    if (!h || n_layer <= 0 || n_head <= 0 || n_layer > 4096 || n_head > 4096) return STEER_E_ARG;
    if (!probe || !probe->tensor || !probe->src || !probe->buffer || !probe->fn_get_name ||
        !probe->fn_get_data || !probe->fn_nbytes || !probe->fn_buffer_is_host ||
        !probe->fn_op_desc)
        return STEER_E_ARG;
    h->bound = 0;
    const struct sg_tensor *t = (const struct sg_tensor *)probe->tensor;
    sg_get_name_fn get_name = (sg_get_name_fn)probe->fn_get_name;
    sg_get_data_fn get_data = (sg_get_data_fn)probe->fn_get_data;
    sg_nbytes_fn nbytes = (sg_nbytes_fn)probe->fn_nbytes;
    sg_buffer_is_host_fn buffer_is_host = (sg_buffer_is_host_fn)probe->fn_buffer_is_host;
    sg_op_desc_fn op_desc = (sg_op_desc_fn)probe->fn_op_desc;
    /* The accessors are ggml's own code: they read the real struct. Every field we use must
     * agree with what they return or with what ggml was given, else our mirror is wrong and
     * we must not write memory. Pointers read through the mirror are compared before any is
     * followed: a wrong offset yields garbage, which must not be dereferenced. */
    static const int64_t ne[4] = {5, 7, 3, 2};
    if (get_name(t) != t->name) return STEER_E_LAYOUT;
    if (strncmp(t->name, "llama-steer-probe", SG_MAX_NAME) != 0) return STEER_E_LAYOUT;
    if (get_data(t) != t->data || t->data == NULL) return STEER_E_LAYOUT;
    if (t->type != SG_TYPE_F32) return STEER_E_LAYOUT;
    size_t stride = sizeof(float);
    for (int d = 0; d < 4; d++) {
        if (t->ne[d] != ne[d] || t->nb[d] != stride) return STEER_E_LAYOUT;
        stride *= (size_t)ne[d];
    }
    if (nbytes(t) != stride) return STEER_E_LAYOUT;
    if (t->view_src != NULL || t->view_offs != 0) return STEER_E_LAYOUT;
    /* ggml_soft_max_ext: src[0] = a, src[1] = the mask (none here), the rest unset */
    if (t->src[0] != (const struct sg_tensor *)probe->src) return STEER_E_LAYOUT;
    for (int s = 1; s < SG_MAX_SRC; s++)
        if (t->src[s] != NULL) return STEER_E_LAYOUT;
    /* the callback reads a kq_soft_max-<il> node's scale from op_params[0]: ggml says the
     * probe is a SOFT_MAX node, our mirror must read the same op and the scale it was given
     * (bit for bit), then max_bias (0) in op_params[1] */
    const char *desc = op_desc(t);
    if (desc == NULL || strcmp(desc, "SOFT_MAX") != 0 || t->op != SG_OP_SOFT_MAX)
        return STEER_E_LAYOUT;
    float params[2];
    memcpy(params, t->op_params, sizeof(params));
    if (memcmp(&params[0], &probe->scale, sizeof(float)) != 0 || params[1] != 0.0f)
        return STEER_E_LAYOUT;
    /* the callback tells host from device memory by ggml_backend_buffer_is_host(buffer) */
    if (t->buffer != probe->buffer || !buffer_is_host(t->buffer)) return STEER_E_LAYOUT;

    float *scale = (float *)calloc((size_t)n_layer, sizeof(float));
    if (!scale) return STEER_E_NOMEM;
    free(h->scale);
    h->scale = scale;
    h->n_layer = n_layer;
    h->n_head = n_head;
    h->get_name = get_name;
    h->buffer_is_host = buffer_is_host;
    h->bound = 1;
    return STEER_OK;
}

/* ---- config publishing ------------------------------------------------------------------ */

static int pin(steer_hook *h) {
    for (;;) {
        int s = atomic_load(&h->active);
        atomic_fetch_add(&h->readers[s], 1);
        if (atomic_load(&h->active) == s) return s;
        atomic_fetch_sub(&h->readers[s], 1);
    }
}

static void unpin(steer_hook *h, int s) { atomic_fetch_sub(&h->readers[s], 1); }

static void nap(void) {
    struct timespec ts = {0, 50000};
    nanosleep(&ts, NULL);
}

int steer_hook_set_config(steer_hook *h, const uint8_t *heads, const float *bias,
                          int32_t n_cells, float tail, int32_t phases,
                          const int16_t *region, int32_t n_region_cells, int32_t n_regions,
                          const uint8_t *obs_layers, int32_t obs_rows, uint64_t key) {
    if (!h) return STEER_E_ARG;
    if (!h->bound) return STEER_E_UNBOUND;
    if (n_cells < 0 || (n_cells > 0 && !bias) || !isfinite(tail)) return STEER_E_ARG;
    if (phases & ~(STEER_PHASE_PREFILL | STEER_PHASE_DECODE | STEER_EDIT_KEEP_SHARE))
        return STEER_E_ARG;
    if ((phases & STEER_EDIT_KEEP_SHARE) && tail != 0.0f) return STEER_E_ARG;
    if (n_region_cells < 0 || n_regions < 0 || n_regions > 32767) return STEER_E_ARG;
    if (region && n_regions == 0) return STEER_E_ARG;
    if (obs_rows != STEER_ROWS_LAST && obs_rows != STEER_ROWS_ALL) return STEER_E_ARG;
    for (int32_t j = 0; j < n_cells; j++)
        if (!isfinite(bias[j])) return STEER_E_ARG;
    for (int32_t j = 0; region && j < n_region_cells; j++)
        if (region[j] < -1 || region[j] >= n_regions) return STEER_E_ARG;

    const int32_t L = h->n_layer, H = h->n_head;
    steer_cfg c;
    memset(&c, 0, sizeof(c));
    c.heads = (uint8_t *)calloc((size_t)L * H, 1);
    c.layer_any = (uint8_t *)calloc((size_t)L, 1);
    c.obs_layers = (uint8_t *)calloc((size_t)L, 1);
    c.bias = (float *)malloc(sizeof(float) * (size_t)(n_cells > 0 ? n_cells : 1));
    c.region = (int16_t *)malloc(sizeof(int16_t) * (size_t)(n_region_cells > 0 ? n_region_cells : 1));
    if (!c.heads || !c.layer_any || !c.obs_layers || !c.bias || !c.region) {
        cfg_clear(&c);
        return STEER_E_NOMEM;
    }
    int any_head = 0;
    for (int32_t l = 0; heads && l < L; l++)
        for (int32_t k = 0; k < H; k++)
            if (heads[(size_t)l * H + k]) {
                c.heads[(size_t)l * H + k] = 1;
                c.layer_any[l] = 1;
                any_head = 1;
            }
    if (n_cells > 0) memcpy(c.bias, bias, sizeof(float) * (size_t)n_cells);
    c.n_cells = n_cells;
    c.lo = n_cells;
    c.hi = 0;
    for (int32_t j = 0; j < n_cells; j++)
        if (bias[j] != 0.0f) {
            if (j < c.lo) c.lo = j;
            c.hi = j + 1;
        }
    if (c.hi == 0) c.lo = 0;
    c.tail = tail;
    c.keep_share = (phases & STEER_EDIT_KEEP_SHARE) != 0;
    c.phases = phases & (STEER_PHASE_PREFILL | STEER_PHASE_DECODE);
    c.edits = any_head && c.phases != 0 && (c.hi > c.lo || tail != 0.0f);
    if (region && n_region_cells > 0)
        memcpy(c.region, region, sizeof(int16_t) * (size_t)n_region_cells);
    c.n_region_cells = region ? n_region_cells : 0;
    c.n_regions = region ? n_regions : 0;
    int any_obs = 0;
    for (int32_t l = 0; obs_layers && l < L; l++)
        if (obs_layers[l]) {
            c.obs_layers[l] = 1;
            any_obs = 1;
        }
    c.obs_rows = obs_rows;
    c.observes = any_obs && c.n_regions > 0;
    c.version = ++h->next_version;
    c.key = key;

    while (atomic_flag_test_and_set(&h->writing)) nap();
    int w = 1 - atomic_load(&h->active);
    /* The observer sums travel with the configs (steer_acc): keep accumulating into the
     * active config's sums when their shape fits (or when this config does not observe, so
     * read_obs still finds the last observation), else start new ones. The old sums are freed
     * by cfg_clear only once no slot holds them, never while a pinned eval can write them. */
    steer_acc *cur = h->slot[1 - w].acc;
    if (c.observes && !(cur && cur->n_regions == c.n_regions && cur->n_layer == L &&
                        cur->n_head == H)) {
        c.acc = acc_new(L, H, c.n_regions);
        if (!c.acc) {
            atomic_flag_clear(&h->writing);
            cfg_clear(&c);
            return STEER_E_NOMEM;
        }
    } else if (cur) {
        c.acc = cur;
        cur->refs++;
    }
    while (atomic_load(&h->readers[w]) > 0) nap();
    cfg_clear(&h->slot[w]);
    h->slot[w] = c;
    atomic_store(&h->active, w);
    atomic_flag_clear(&h->writing);
    return STEER_OK;
}

int steer_hook_begin_eval(steer_hook *h, int32_t phase) {
    if (!h) return STEER_E_ARG;
    if (phase != STEER_PHASE_PREFILL && phase != STEER_PHASE_DECODE) return STEER_E_ARG;
    if (h->pinned >= 0) unpin(h, h->pinned);
    h->pinned = pin(h);
    h->phase = phase;
    const steer_cfg *c = &h->slot[h->pinned];
    h->eval_edits = c->edits && (c->phases & phase);
    h->stats.n_kq_edited_eval = 0;
    h->stats.eval_key = h->eval_edits ? c->key : 0;
    h->asked_at_begin = h->stats.n_asked;
    return STEER_OK;
}

int steer_hook_end_eval(steer_hook *h, steer_stats *out) {
    if (!h) return STEER_E_ARG;
    if (h->pinned >= 0) {
        if (h->eval_edits && h->stats.n_kq_edited_eval == 0 &&
            h->stats.n_asked > h->asked_at_begin)
            h->stats.flags |= STEER_F_NOT_HOOKED;
        unpin(h, h->pinned);
    }
    h->eval_edits = 0;
    h->pinned = -1;
    h->phase = 0;
    if (out) *out = h->stats;
    return STEER_OK;
}

int steer_hook_get_stats(steer_hook *h, steer_stats *out, int32_t reset) {
    if (!h || !out) return STEER_E_ARG;
    *out = h->stats;
    if (reset) memset(&h->stats, 0, sizeof(h->stats));
    return STEER_OK;
}

int steer_hook_get_scales(steer_hook *h, float *out, int32_t n) {
    if (!h || !out) return STEER_E_ARG;
    if (!h->bound) return STEER_E_UNBOUND;
    if (n != h->n_layer) return STEER_E_ARG;
    memcpy(out, h->scale, sizeof(float) * (size_t)n);
    return STEER_OK;
}

int steer_hook_set_scale(steer_hook *h, int32_t layer, float scale) {
    if (!h) return STEER_E_ARG;
    if (!h->bound) return STEER_E_UNBOUND;
    if (layer < 0 || layer >= h->n_layer || !(scale > 0.0f) || !isfinite(scale))
        return STEER_E_ARG;
    h->scale[layer] = scale;
    return STEER_OK;
}

int steer_hook_read_obs(steer_hook *h, float *out, int32_t n, uint64_t *rows_out,
                        int32_t reset) {
    if (!h || !out || !rows_out) return STEER_E_ARG;
    if (!h->bound) return STEER_E_UNBOUND;
    /* the sums of the active config, pinned so a concurrent publish cannot free them */
    int s = pin(h);
    const steer_acc *a = h->slot[s].acc;
    size_t want = a ? (size_t)a->n_layer * a->n_head * a->n_regions : 0;
    int rc = STEER_OK;
    if ((size_t)n != want) {
        rc = STEER_E_ARG;
    } else if (want > 0) {
        memcpy(out, a->sums, sizeof(float) * want);
        memcpy(rows_out, a->rows, sizeof(uint64_t) * (size_t)a->n_layer);
        if (reset) {
            memset(a->sums, 0, sizeof(float) * want);
            memset(a->rows, 0, sizeof(uint64_t) * (size_t)a->n_layer);
        }
    }
    unpin(h, s);
    return rc;
}

/* ---- edit and observe ------------------------------------------------------------------- */

static int edit(steer_hook *h, const steer_cfg *c, int32_t il, int32_t phase, float *data,
                const int64_t ne[4], const int64_t nb[4]) {
    if (!c->edits || !(c->phases & phase) || !c->layer_any[il]) return STEER_OK;
    float sc = h->scale[il];
    if (!(sc > 0.0f)) {
        h->stats.flags |= STEER_F_NO_SCALE;
        return STEER_E_SCALE;
    }
    float inv_scale = 1.0f / sc;
    int64_t n_head = ne[2] < h->n_head ? ne[2] : h->n_head;
    const uint8_t *sel = c->heads + (size_t)il * h->n_head;
    for (int64_t s = 0; s < ne[3]; s++)
        for (int64_t k = 0; k < n_head; k++) {
            if (!sel[k]) continue;
            for (int64_t i = 0; i < ne[1]; i++) {
                float *row = (float *)((char *)data + i * nb[1] + k * nb[2] + s * nb[3]);
                if (c->keep_share)
                    steer_edit_row_keep(row, ne[0], c->bias, c->lo, c->hi, sc);
                else
                    steer_edit_row(row, ne[0], c->bias, c->n_cells, c->tail, c->lo, c->hi,
                                   inv_scale);
                h->stats.n_rows_edited++;
            }
        }
    h->stats.n_kq_edited++;
    h->stats.n_kq_edited_eval++;
    h->stats.last_n_kv = (int32_t)ne[0];
    h->stats.last_n_tokens = (int32_t)ne[1];
    return STEER_OK;
}

static void observe(steer_hook *h, const steer_cfg *c, int32_t il, const float *data,
                    const int64_t ne[4], const int64_t nb[4]) {
    if (!c->observes || !c->obs_layers[il]) return;
    const int32_t R = c->n_regions;
    int64_t n_head = ne[2] < h->n_head ? ne[2] : h->n_head;
    float *acc = c->acc->sums + (size_t)il * h->n_head * R;
    uint64_t *rows = c->acc->rows;
    int64_t i0 = 0;
    if (c->obs_rows == STEER_ROWS_LAST) {
        memset(acc, 0, sizeof(float) * (size_t)h->n_head * R);
        rows[il] = 0;
        i0 = ne[1] - 1;
    }
    for (int64_t s = 0; s < ne[3]; s++)
        for (int64_t i = i0; i < ne[1]; i++) {
            for (int64_t k = 0; k < n_head; k++) {
                const float *p = (const float *)((const char *)data + i * nb[1] + k * nb[2] + s * nb[3]);
                steer_observe_row(p, ne[0], c->region, c->n_region_cells, acc + k * R);
            }
            rows[il]++;
        }
    h->stats.n_obs_nodes++;
}

/* ---- the callback ----------------------------------------------------------------------- */

enum { NODE_OTHER = 0, NODE_KQ = 1, NODE_SOFTMAX = 2, NODE_SOFTCAP = 3 };

/* kq-<il>, kq_soft_max-<il>, kq_scaled_1-<il> (soft-capping); sets *il */
static int classify(const char *name, int32_t *il) {
    if (name[0] != 'k' || name[1] != 'q') return NODE_OTHER;
    const char *p;
    int kind;
    if (name[2] == '-') {
        p = name + 3;
        kind = NODE_KQ;
    } else if (strncmp(name + 2, "_soft_max-", 10) == 0) {
        p = name + 12;
        kind = NODE_SOFTMAX;
    } else if (strncmp(name + 2, "_scaled_1-", 10) == 0) {
        p = name + 12;
        kind = NODE_SOFTCAP;
    } else {
        return NODE_OTHER;
    }
    if (*p < '0' || *p > '9') return NODE_OTHER;
    long v = 0;
    for (; *p >= '0' && *p <= '9'; p++) {
        v = v * 10 + (*p - '0');
        if (v > 1000000) return NODE_OTHER;
    }
    if (*p != '\0') return NODE_OTHER;
    *il = (int32_t)v;
    return kind;
}

/* 1 = host F32 rows, 2 = device F32 rows (CUDA path), 0 = refuse (flag set) */
static int where(steer_hook *h, const struct sg_tensor *t) {
    if (t->type != SG_TYPE_F32) {
        h->stats.flags |= STEER_F_NOT_F32;
        return 0;
    }
    if (t->nb[0] != sizeof(float) || t->data == NULL || t->buffer == NULL) {
        h->stats.flags |= STEER_F_SHAPE;
        return 0;
    }
    if (h->buffer_is_host(t->buffer)) return 1;
    if (h->cuda == NULL) {
        h->stats.flags |= STEER_F_DEVICE_TENSOR;
        return 0;
    }
    return 2;
}

bool steer_cb_eval(void *tensor, bool ask, void *user_data) {
    steer_hook *h = (steer_hook *)user_data;
    if (!h || !h->bound || !tensor) return ask ? false : true;
    struct sg_tensor *t = (struct sg_tensor *)tensor;
    int32_t il = -1;
    int kind = classify(t->name, &il);
    if (ask) h->stats.n_asked++;
    if (kind == NODE_OTHER) return ask ? false : true;
    if (il < 0 || il >= h->n_layer) {
        h->stats.flags |= STEER_F_BAD_NAME;
        return ask ? false : true;
    }
    if (kind == NODE_SOFTCAP) {
        h->stats.flags |= STEER_F_SOFTCAP;
        return ask ? false : true;
    }
    if (kind == NODE_SOFTMAX && ask) {
        /* ggml_soft_max_ext keeps its scale in op_params[0]: read it while asking, even when
         * we do not need the node, so kq edits can be given in logit units */
        float sc;
        memcpy(&sc, &t->op_params[0], sizeof(float));
        h->scale[il] = sc;
    }

    int s = h->pinned >= 0 ? h->pinned : pin(h);
    const steer_cfg *c = &h->slot[s];
    int32_t phase = h->phase ? h->phase : STEER_PHASE_PREFILL;
    bool want = false;
    if (kind == NODE_KQ)
        want = c->edits && (c->phases & phase) && c->layer_any[il];
    else
        want = c->observes && c->obs_layers[il];

    int at = (!ask && want) ? where(h, t) : 0;
    if (at) {
        int64_t ne[4], nb[4];
        for (int d = 0; d < 4; d++) {
            ne[d] = t->ne[d];
            nb[d] = (int64_t)t->nb[d];
        }
        if (at == 1 && kind == NODE_KQ) {
            edit(h, c, il, phase, (float *)t->data, ne, nb);
        } else if (at == 1) {
            observe(h, c, il, (const float *)t->data, ne, nb);
        } else if (kind == NODE_KQ) {
            h->stats.flags |= (uint32_t)steer_cuda_edit(h, c, il, t->data, ne, nb);
        } else {
            h->stats.flags |= (uint32_t)steer_cuda_observe(h, c, il, t->data, ne, nb);
        }
    }
    if (h->pinned < 0) unpin(h, s);
    return ask ? want : true;
}

/* ---- buffer entry points ---------------------------------------------------------------- */

static int check_buffer(steer_hook *h, int32_t layer, const void *data, int64_t ne0,
                        int64_t ne1, int64_t ne2, int64_t ne3, int64_t nb1, int64_t nb2,
                        int64_t nb3, int64_t ne[4], int64_t nb[4]) {
    if (!h || !data) return STEER_E_ARG;
    if (!h->bound) return STEER_E_UNBOUND;
    if (layer < 0 || layer >= h->n_layer) return STEER_E_ARG;
    if (ne0 <= 0 || ne1 <= 0 || ne2 <= 0 || ne3 <= 0) return STEER_E_ARG;
    if (nb1 < ne0 * 4 || nb2 < nb1 * ne1 || nb3 < nb2 * ne2) return STEER_E_ARG;
    ne[0] = ne0, ne[1] = ne1, ne[2] = ne2, ne[3] = ne3;
    nb[0] = 4, nb[1] = nb1, nb[2] = nb2, nb[3] = nb3;
    return STEER_OK;
}

int steer_hook_edit_buffer(steer_hook *h, int32_t layer, int32_t phase, float *data,
                           int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                           int64_t nb1, int64_t nb2, int64_t nb3) {
    int64_t ne[4], nb[4];
    int rc = check_buffer(h, layer, data, ne0, ne1, ne2, ne3, nb1, nb2, nb3, ne, nb);
    if (rc != STEER_OK) return rc;
    if (phase != STEER_PHASE_PREFILL && phase != STEER_PHASE_DECODE) return STEER_E_ARG;
    int s = pin(h);
    rc = edit(h, &h->slot[s], layer, phase, data, ne, nb);
    unpin(h, s);
    return rc;
}

int steer_hook_observe_buffer(steer_hook *h, int32_t layer, const float *data,
                              int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                              int64_t nb1, int64_t nb2, int64_t nb3) {
    int64_t ne[4], nb[4];
    int rc = check_buffer(h, layer, data, ne0, ne1, ne2, ne3, nb1, nb2, nb3, ne, nb);
    if (rc != STEER_OK) return rc;
    int s = pin(h);
    observe(h, &h->slot[s], layer, data, ne, nb);
    unpin(h, s);
    return STEER_OK;
}

int steer_hook_edit_device(steer_hook *h, int32_t layer, int32_t phase, void *data,
                           int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                           int64_t nb1, int64_t nb2, int64_t nb3) {
    int64_t ne[4], nb[4];
    int rc = check_buffer(h, layer, data, ne0, ne1, ne2, ne3, nb1, nb2, nb3, ne, nb);
    if (rc != STEER_OK) return rc;
    if (phase != STEER_PHASE_PREFILL && phase != STEER_PHASE_DECODE) return STEER_E_ARG;
    if (!h->cuda) return STEER_E_CUDA;
    int s = pin(h);
    const steer_cfg *c = &h->slot[s];
    if (c->edits && (c->phases & phase) && c->layer_any[layer]) {
        int fl = steer_cuda_edit(h, c, layer, data, ne, nb);
        rc = fl == STEER_F_NO_SCALE ? STEER_E_SCALE : fl ? STEER_E_CUDA : STEER_OK;
    }
    unpin(h, s);
    return rc;
}

int steer_hook_observe_device(steer_hook *h, int32_t layer, void *data,
                              int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                              int64_t nb1, int64_t nb2, int64_t nb3) {
    int64_t ne[4], nb[4];
    int rc = check_buffer(h, layer, data, ne0, ne1, ne2, ne3, nb1, nb2, nb3, ne, nb);
    if (rc != STEER_OK) return rc;
    if (!h->cuda) return STEER_E_CUDA;
    int s = pin(h);
    const steer_cfg *c = &h->slot[s];
    if (c->observes && c->obs_layers[layer] && steer_cuda_observe(h, c, layer, data, ne, nb))
        rc = STEER_E_CUDA;
    unpin(h, s);
    return rc;
}
