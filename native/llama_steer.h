/*
 * llama_steer.h -- the C API of the llama-steer native hook.
 *
 * One opaque handle (steer_hook) holds a steering + observation config and is installed as
 * llama.cpp's cb_eval (steer_cb_eval, user data = the handle). Every function returns
 * STEER_OK (0) or a negative STEER_E_* code; the Python layer (_native.py) turns codes into
 * exceptions. The block between CDEF-BEGIN and CDEF-END is read verbatim by the cffi build
 * (native/build_ffi.py), so it holds plain declarations only: no #include, no macros with
 * expressions, no preprocessor conditionals.
 *
 * Units: biases are in logit units (the scale applied by softmax, i.e. after 1/sqrt(d));
 * the hook divides by each layer's kq scale, read from the graph, before adding to the raw
 * QK^T node kq-<il>.
 */
#ifndef LLAMA_STEER_H
#define LLAMA_STEER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* CDEF-BEGIN */
#define STEER_OK 0
#define STEER_E_ARG -1
#define STEER_E_NOMEM -2
#define STEER_E_LAYOUT -3
#define STEER_E_UNBOUND -4
#define STEER_E_SCALE -5
#define STEER_E_CUDA -6

/* conditions the callback met while running (bitmask in steer_stats.flags) */
#define STEER_F_DEVICE_TENSOR 1
#define STEER_F_NOT_F32 2
#define STEER_F_SHAPE 4
#define STEER_F_NO_SCALE 8
#define STEER_F_SOFTCAP 16
#define STEER_F_BAD_NAME 32
#define STEER_F_CUDA 64
#define STEER_F_NOT_HOOKED 128

/* phases (bitmask in a config; one value in steer_hook_begin_eval) */
#define STEER_PHASE_PREFILL 1
#define STEER_PHASE_DECODE 2
/* a config's phases may add this flag: each edited row gets, besides the bias, one constant
 * over the cells of non-zero bias that keeps their total attention share in that row as it
 * was (mode "reroute": attention moves inside the image; the text keeps its share). Needs
 * tail == 0. */
#define STEER_EDIT_KEEP_SHARE 4

/* which query rows the observer reads */
#define STEER_ROWS_LAST 0
#define STEER_ROWS_ALL 1

typedef struct steer_hook steer_hook;

typedef struct steer_stats {
    uint64_t n_asked;       /* graph nodes seen in the ask phase */
    uint64_t n_kq_edited;   /* kq-<il> nodes edited */
    uint64_t n_rows_edited; /* (query row, head) pairs edited */
    uint64_t n_obs_nodes;   /* kq_soft_max-<il> nodes observed */
    uint32_t flags;         /* STEER_F_* met since the last reset */
    int32_t last_n_kv;      /* ne[0] of the last hooked node */
    int32_t last_n_tokens;  /* ne[1] of the last hooked node */
    uint64_t n_kq_edited_eval; /* kq-<il> nodes edited since the last steer_hook_begin_eval */
    uint64_t eval_key; /* key of the config pinned by begin_eval when it edits in that phase,
                          else 0: the config the new cells' K/V were computed under */
} steer_stats;

/* lifecycle */
int steer_hook_new(steer_hook **out);
void steer_hook_free(steer_hook *h);

/* The probe of steer_hook_bind's ABI check, made by the loaded libggml (_native.ggml_probe):
 *   src:    a = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 5, 7, 3, 2)
 *   tensor: ggml_soft_max_ext(ctx, a, NULL, scale, 0.0f), named "llama-steer-probe"
 *   buffer: the host (CPU) backend buffer ggml allocated both in
 *           (ggml_backend_alloc_ctx_tensors_from_buft with ggml_backend_cpu_buffer_type())
 *   scale:  the scale passed to ggml_soft_max_ext
 *   fn_*:   ggml's own ggml_get_name, ggml_get_data, ggml_nbytes, ggml_backend_buffer_is_host,
 *           ggml_op_desc */
typedef struct steer_probe {
    void *tensor;
    void *src;
    void *buffer;
    float scale;
    void *fn_get_name;
    void *fn_get_data;
    void *fn_nbytes;
    void *fn_buffer_is_host;
    void *fn_op_desc;
} steer_probe;

/* Bind to a model's shape and check this build's mirror of struct ggml_tensor against the
 * loaded libggml on the probe: every field the callback reads (name, data, type, ne, nb, op,
 * op_params, buffer; src and view for the offsets between them) must agree with what ggml
 * put there. On a mismatch returns STEER_E_LAYOUT and the hook stays unbound: the callback
 * then asks for nothing and never touches memory. */
int steer_hook_bind(steer_hook *h, int32_t n_layer, int32_t n_head, const steer_probe *probe);

/* Publish a new config (copied; double-buffered, safe while another thread evaluates).
 * heads:   [n_layer * n_head] 0/1, row-major (layer, head); NULL = no head steered
 * bias:    [n_cells] additive bias per KV cell in logit units, strength already applied
 * tail:    bias for cells >= n_cells (PASTA's "everything else"), logit units
 * phases:  STEER_PHASE_* bitmask of the phases whose rows are edited, | STEER_EDIT_KEEP_SHARE
 * region:  [n_region_cells] region id per KV cell for the observer, -1 = none; NULL = off
 * obs_layers: [n_layer] 0/1 layers whose kq_soft_max is observed; NULL = none
 * obs_rows:   STEER_ROWS_LAST (overwrite with the last row) or STEER_ROWS_ALL (accumulate)
 * key:     the caller's id of this edit (heads, bias, tail, phases), reported back as
 *          steer_stats.eval_key by the evals it is pinned for */
int steer_hook_set_config(steer_hook *h, const uint8_t *heads, const float *bias,
                          int32_t n_cells, float tail, int32_t phases,
                          const int16_t *region, int32_t n_region_cells, int32_t n_regions,
                          const uint8_t *obs_layers, int32_t obs_rows, uint64_t key);

/* Bracket one llama_decode: the config is pinned for the whole call (every layer of a token
 * sees the same config) and rows are edited only if `phase` is in the config's phases.
 * end_eval sets STEER_F_NOT_HOOKED when the pinned config edits in `phase` and a graph ran
 * but no kq-<il> node was edited (a silent no-op), and copies the counters to `out` when it
 * is not NULL (one call per decode step: everything the caller checks is in `out`). */
int steer_hook_begin_eval(steer_hook *h, int32_t phase);
int steer_hook_end_eval(steer_hook *h, steer_stats *out);

int steer_hook_get_stats(steer_hook *h, steer_stats *out, int32_t reset);
/* per-layer softmax scale read from the graph (0 = not seen yet); out: [n_layer] */
int steer_hook_get_scales(steer_hook *h, float *out, int32_t n);
int steer_hook_set_scale(steer_hook *h, int32_t layer, float scale);
/* observer sums: out [n_layer * n_head * n_regions] (layer, head, region); rows_out: [n_layer]
 * query rows accumulated per layer. The sums are those of the active config: the last config
 * that observed with this n_regions, kept by configs published after it with the same
 * n_regions or without observation; a config observing with another n_regions starts new
 * sums (zeros). Safe while another thread evaluates or publishes. n = 0 before any config
 * observed. */
int steer_hook_read_obs(steer_hook *h, float *out, int32_t n, uint64_t *rows_out,
                        int32_t reset);

/* CUDA path (optional): attention tensors in device memory are edited by the kernels of
 * steer_kernel.cu, compiled by the caller (NVRTC) and loaded into `cu_context`; libcuda is
 * opened here, at this call, never at import. fn_edit/fn_observe are CUfunction handles. */
int steer_hook_set_cuda(steer_hook *h, void *cu_context, void *fn_edit, void *fn_observe);
/* the CUDA path on a caller's device buffer (GPU tests): data is a CUdeviceptr, layout as
 * steer_hook_edit_buffer; returns STEER_E_CUDA when the CUDA path is not set or fails */
int steer_hook_edit_device(steer_hook *h, int32_t layer, int32_t phase, void *data,
                           int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                           int64_t nb1, int64_t nb2, int64_t nb3);
int steer_hook_observe_device(steer_hook *h, int32_t layer, void *data,
                              int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                              int64_t nb1, int64_t nb2, int64_t nb3);
/* the kernel source (steer_math.h + steer_kernel.cu) this library was built with */
const char *steer_cuda_source(void);

/* The llama.cpp eval callback (ggml_backend_sched_eval_callback); user_data = the hook. */
bool steer_cb_eval(void *t, bool ask, void *user_data);

/* The callback's own edit/observe routines on a caller's buffer (tests, references).
 * Layout as kq-<il>: element (j, i, h, s) at byte offset j*4 + i*nb1 + h*nb2 + s*nb3. */
int steer_hook_edit_buffer(steer_hook *h, int32_t layer, int32_t phase, float *data,
                           int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                           int64_t nb1, int64_t nb2, int64_t nb3);
int steer_hook_observe_buffer(steer_hook *h, int32_t layer, const float *data,
                              int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3,
                              int64_t nb1, int64_t nb2, int64_t nb3);

/* CDEF-END */

#ifdef __cplusplus
}
#endif

#endif /* LLAMA_STEER_H */
