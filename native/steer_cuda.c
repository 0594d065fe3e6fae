/*
 * steer_cuda.c -- launch the steering kernels on attention tensors in GPU memory.
 *
 *   steer_hook_set_cuda ... open libcuda (dlopen, at this call only), make our stream and
 *                           keep the caller's kernels (compiled by NVRTC in _cuda.py)
 *   upload ................ config tables (heads, bias, regions) to the device when the
 *                           published config changed; they stay there between tokens
 *   steer_cuda_edit ....... one launch per kq-<il>, then a stream synchronize
 *   steer_cuda_observe .... per-region sums into a device buffer, copied back and added
 *
 * ggml's scheduler synchronizes its backend before the eval callback runs, so the tensor is
 * complete; we work on our own stream and synchronize it before returning, so ggml's next
 * kernels see our writes. Driver types are spelled as plain C types: no CUDA headers needed.
 */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include "steer_internal.h"

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

struct steer_cuda {
    void *lib;
    void *ctx, *f_edit, *f_observe, *stream;
    CUresult (*ctx_set_current)(void *);
    CUresult (*stream_create)(void **, unsigned);
    CUresult (*stream_destroy)(void *);
    CUresult (*stream_sync)(void *);
    CUresult (*mem_alloc)(CUdeviceptr *, size_t);
    CUresult (*mem_free)(CUdeviceptr);
    CUresult (*htod)(CUdeviceptr, const void *, size_t, void *);
    CUresult (*dtoh)(void *, CUdeviceptr, size_t, void *);
    CUresult (*memset32)(CUdeviceptr, unsigned, size_t, void *);
    CUresult (*launch)(void *, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                       unsigned, void *, void **, void **);
    /* device copies of the config that was uploaded last */
    uint64_t version;
    CUdeviceptr d_heads, d_bias, d_region, d_acc;
    size_t cap_heads, cap_bias, cap_region, cap_acc;
    float *h_acc;
    size_t cap_h_acc;
};

static void *sym(void *lib, const char *name) { return dlsym(lib, name); }

void steer_cuda_free(steer_cuda *cu) {
    if (!cu) return;
    if (cu->ctx_set_current) cu->ctx_set_current(cu->ctx);
    if (cu->mem_free) {
        if (cu->d_heads) cu->mem_free(cu->d_heads);
        if (cu->d_bias) cu->mem_free(cu->d_bias);
        if (cu->d_region) cu->mem_free(cu->d_region);
        if (cu->d_acc) cu->mem_free(cu->d_acc);
    }
    if (cu->stream && cu->stream_destroy) cu->stream_destroy(cu->stream);
    if (cu->lib) dlclose(cu->lib);
    free(cu->h_acc);
    free(cu);
}

int steer_hook_set_cuda(steer_hook *h, void *cu_context, void *fn_edit, void *fn_observe) {
    if (!h || !cu_context || !fn_edit || !fn_observe) return STEER_E_ARG;
    steer_cuda *cu = (steer_cuda *)calloc(1, sizeof(steer_cuda));
    if (!cu) return STEER_E_NOMEM;
    cu->lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!cu->lib) {
        free(cu);
        return STEER_E_CUDA;
    }
    *(void **)&cu->ctx_set_current = sym(cu->lib, "cuCtxSetCurrent");
    *(void **)&cu->stream_create = sym(cu->lib, "cuStreamCreate");
    *(void **)&cu->stream_destroy = sym(cu->lib, "cuStreamDestroy_v2");
    *(void **)&cu->stream_sync = sym(cu->lib, "cuStreamSynchronize");
    *(void **)&cu->mem_alloc = sym(cu->lib, "cuMemAlloc_v2");
    *(void **)&cu->mem_free = sym(cu->lib, "cuMemFree_v2");
    *(void **)&cu->htod = sym(cu->lib, "cuMemcpyHtoDAsync_v2");
    *(void **)&cu->dtoh = sym(cu->lib, "cuMemcpyDtoHAsync_v2");
    *(void **)&cu->memset32 = sym(cu->lib, "cuMemsetD32Async");
    *(void **)&cu->launch = sym(cu->lib, "cuLaunchKernel");
    if (!cu->ctx_set_current || !cu->stream_create || !cu->stream_destroy || !cu->stream_sync ||
        !cu->mem_alloc || !cu->mem_free || !cu->htod || !cu->dtoh || !cu->memset32 ||
        !cu->launch) {
        steer_cuda_free(cu);
        return STEER_E_CUDA;
    }
    cu->ctx = cu_context;
    cu->f_edit = fn_edit;
    cu->f_observe = fn_observe;
    if (cu->ctx_set_current(cu->ctx) != 0 || cu->stream_create(&cu->stream, 1) != 0) {
        steer_cuda_free(cu);
        return STEER_E_CUDA;
    }
    steer_cuda_free(h->cuda);
    h->cuda = cu;
    return STEER_OK;
}

/* grow a device buffer to at least `need` bytes */
static int reserve(steer_cuda *cu, CUdeviceptr *p, size_t *cap, size_t need) {
    if (need == 0) need = 4;
    if (*cap >= need) return 0;
    if (*p) cu->mem_free(*p);
    *p = 0;
    *cap = 0;
    if (cu->mem_alloc(p, need) != 0) return -1;
    *cap = need;
    return 0;
}

static int upload(steer_hook *h, const steer_cfg *c) {
    steer_cuda *cu = h->cuda;
    if (cu->version == c->version) return 0;
    size_t n_heads = (size_t)h->n_layer * h->n_head;
    size_t n_bias = sizeof(float) * (size_t)c->n_cells;
    size_t n_region = sizeof(short) * (size_t)c->n_region_cells;
    if (reserve(cu, &cu->d_heads, &cu->cap_heads, n_heads) ||
        reserve(cu, &cu->d_bias, &cu->cap_bias, n_bias) ||
        reserve(cu, &cu->d_region, &cu->cap_region, n_region))
        return -1;
    if (c->heads && cu->htod(cu->d_heads, c->heads, n_heads, cu->stream)) return -1;
    if (n_bias && cu->htod(cu->d_bias, c->bias, n_bias, cu->stream)) return -1;
    if (n_region && cu->htod(cu->d_region, c->region, n_region, cu->stream)) return -1;
    if (cu->stream_sync(cu->stream)) return -1;
    cu->version = c->version;
    return 0;
}

int steer_cuda_edit(steer_hook *h, const steer_cfg *c, int32_t il, void *data,
                    const int64_t ne[4], const int64_t nb[4]) {
    steer_cuda *cu = h->cuda;
    if (!(h->scale[il] > 0.0f)) return STEER_F_NO_SCALE;
    float inv_scale = 1.0f / h->scale[il];
    if (cu->ctx_set_current(cu->ctx) || upload(h, c)) return STEER_F_CUDA;
    int64_t n_head = ne[2] < h->n_head ? ne[2] : h->n_head;
    CUdeviceptr heads = cu->d_heads + (CUdeviceptr)((size_t)il * h->n_head);
    long long a_ne0 = ne[0], a_nb1 = nb[1], a_nb2 = nb[2], a_nb3 = nb[3];
    int n_cells = c->n_cells, lo = c->lo, hi = c->hi;
    float tail = c->tail;
    int keep_share = c->keep_share;
    void *args[] = {&data, &a_ne0, &a_nb1, &a_nb2, &a_nb3, &heads, &cu->d_bias,
                    &n_cells, &tail, &lo, &hi, &inv_scale, &keep_share};
    if (cu->launch(cu->f_edit, (unsigned)ne[1], (unsigned)n_head, (unsigned)ne[3], 128, 1, 1, 0,
                   cu->stream, args, NULL) ||
        cu->stream_sync(cu->stream))
        return STEER_F_CUDA;
    const uint8_t *sel = c->heads + (size_t)il * h->n_head;
    for (int64_t k = 0; k < n_head; k++)
        if (sel[k]) h->stats.n_rows_edited += (uint64_t)(ne[1] * ne[3]);
    h->stats.n_kq_edited++;
    h->stats.n_kq_edited_eval++;
    h->stats.last_n_kv = (int32_t)ne[0];
    h->stats.last_n_tokens = (int32_t)ne[1];
    return 0;
}

int steer_cuda_observe(steer_hook *h, const steer_cfg *c, int32_t il, const void *data,
                       const int64_t ne[4], const int64_t nb[4]) {
    steer_cuda *cu = h->cuda;
    const int32_t R = c->n_regions;
    int64_t n_head = ne[2] < h->n_head ? ne[2] : h->n_head;
    size_t n_acc = (size_t)h->n_head * R;
    if (cu->ctx_set_current(cu->ctx) || upload(h, c) ||
        reserve(cu, &cu->d_acc, &cu->cap_acc, n_acc * sizeof(float)))
        return STEER_F_CUDA;
    if (cu->cap_h_acc < n_acc) {
        float *p = (float *)realloc(cu->h_acc, n_acc * sizeof(float));
        if (!p) return STEER_F_CUDA;
        cu->h_acc = p;
        cu->cap_h_acc = n_acc;
    }
    long long i0 = c->obs_rows == STEER_ROWS_LAST ? ne[1] - 1 : 0;
    long long a_ne0 = ne[0], a_nb1 = nb[1], a_nb2 = nb[2], a_nb3 = nb[3];
    int n_region_cells = c->n_region_cells, n_regions = R;
    void *args[] = {(void *)&data, &a_ne0, &i0, &a_nb1, &a_nb2, &a_nb3, &cu->d_region,
                    &n_region_cells, &n_regions, &cu->d_acc};
    if (cu->memset32(cu->d_acc, 0, n_acc, cu->stream) ||
        cu->launch(cu->f_observe, (unsigned)(ne[1] - i0), (unsigned)n_head, (unsigned)ne[3], 128,
                   1, 1, (unsigned)(sizeof(float) * R), cu->stream, args, NULL) ||
        cu->dtoh(cu->h_acc, cu->d_acc, n_acc * sizeof(float), cu->stream) ||
        cu->stream_sync(cu->stream))
        return STEER_F_CUDA;
    /* the pinned config's own sums (steer_acc): a concurrent publish cannot free them */
    float *acc = c->acc->sums + (size_t)il * n_acc;
    if (c->obs_rows == STEER_ROWS_LAST) {
        memcpy(acc, cu->h_acc, n_acc * sizeof(float));
        c->acc->rows[il] = (uint64_t)ne[3];
    } else {
        for (size_t q = 0; q < n_acc; q++) acc[q] += cu->h_acc[q];
        c->acc->rows[il] += (uint64_t)((ne[1] - i0) * ne[3]);
    }
    h->stats.n_obs_nodes++;
    return 0;
}
