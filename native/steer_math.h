/*
 * steer_math.h -- the arithmetic of one steering edit and one observation, shared by the
 * host path (steer.c) and the CUDA kernel, so that the two cannot drift.
 *
 *   steer_edit_row:    row[j] += bias_j * inv_scale  for every key cell j of one (query, head)
 *                      row, bias_j = bias[j] for j < n_cells, tail beyond (PASTA's "rest").
 *   steer_observe_row: acc[region[j]] += p[j]        summed attention mass per region.
 *
 * Biases are finite (checked when a config is published) and bounded, so an edited row
 * stays finite; llama.cpp's -inf mask is applied after this edit, inside softmax, so cells
 * a query cannot see stay invisible whatever we add.
 */
#ifndef LLAMA_STEER_MATH_H
#define LLAMA_STEER_MATH_H

#include <stdint.h>

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#define STEER_HD __host__ __device__ __forceinline__
#else
#define STEER_HD static inline
#endif

/* bias of key cell j */
STEER_HD float steer_bias_at(const float *bias, int32_t n_cells, float tail, int64_t j) {
    return j < (int64_t)n_cells ? bias[j] : tail;
}

/* Edit one row of raw QK^T (n_kv keys). [lo, hi) bounds the non-zero part of bias. */
STEER_HD void steer_edit_row(float *row, int64_t n_kv, const float *bias, int32_t n_cells,
                             float tail, int32_t lo, int32_t hi, float inv_scale) {
    int64_t end = (int64_t)hi < n_kv ? (int64_t)hi : n_kv;
    for (int64_t j = lo; j < end; j++) {
        row[j] += bias[j] * inv_scale;
    }
    if (tail != 0.0f) {
        float t = tail * inv_scale;
        for (int64_t j = n_cells; j < n_kv; j++) {
            row[j] += t;
        }
    }
}

/* Add one row of post-softmax attention to per-region sums acc[n_regions]. */
STEER_HD void steer_observe_row(const float *p, int64_t n_kv, const int16_t *region,
                                int32_t n_region_cells, float *acc) {
    int64_t end = (int64_t)n_region_cells < n_kv ? (int64_t)n_region_cells : n_kv;
    for (int64_t j = 0; j < end; j++) {
        int16_t r = region[j];
        if (r >= 0) {
            acc[r] += p[j];
        }
    }
}

#endif /* LLAMA_STEER_MATH_H */
