/*
 * ggml_mirror.h -- the part of ggml's public ABI the hook reads: struct ggml_tensor as laid
 * out by the ggml that llama-cpp-python 0.3.36 vendors (ggml/include/ggml.h). We mirror it
 * instead of including ggml.h so the package builds without llama.cpp's sources; the mirror
 * is checked against the loaded libggml at start-up (steer_hook_bind) and the hook refuses
 * to run on a mismatch. Moving to a newer llama-cpp-python: diff ggml.h's struct ggml_tensor,
 * the GGML_MAX_* constants and the position of GGML_OP_SOFT_MAX in enum ggml_op against this
 * file.
 */
#ifndef LLAMA_STEER_GGML_MIRROR_H
#define LLAMA_STEER_GGML_MIRROR_H

#include <stddef.h>
#include <stdint.h>

#define SG_MAX_DIMS 4
#define SG_MAX_OP_PARAMS 64
#define SG_MAX_SRC 10
#define SG_MAX_NAME 64
#define SG_TYPE_F32 0
#define SG_OP_SOFT_MAX 46 /* enum ggml_op: GGML_OP_SOFT_MAX */

struct sg_tensor {
    int type; /* enum ggml_type */
    void *buffer;
    int64_t ne[SG_MAX_DIMS];
    size_t nb[SG_MAX_DIMS];
    int op; /* enum ggml_op */
    int32_t op_params[SG_MAX_OP_PARAMS / sizeof(int32_t)];
    int32_t flags;
    struct sg_tensor *src[SG_MAX_SRC];
    struct sg_tensor *view_src;
    size_t view_offs;
    void *data;
    char name[SG_MAX_NAME];
    void *extra;
    char padding[8];
};

typedef const char *(*sg_get_name_fn)(const struct sg_tensor *);
typedef void *(*sg_get_data_fn)(const struct sg_tensor *);
typedef size_t (*sg_nbytes_fn)(const struct sg_tensor *);
typedef _Bool (*sg_buffer_is_host_fn)(void *);
typedef const char *(*sg_op_desc_fn)(const struct sg_tensor *);

#endif /* LLAMA_STEER_GGML_MIRROR_H */
