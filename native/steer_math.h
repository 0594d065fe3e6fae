/*
 * steer_math.h -- the arithmetic of one steering edit and one observation, shared by the
 * host path (steer.c) and the CUDA kernels (steer_kernel.cu), so that the two cannot drift.
 *
 *   steer_delta(j)   what is added to the raw QK^T logit of key cell j:
 *                    bias[j] * inv_scale inside [lo, hi), 0 elsewhere below n_cells,
 *                    tail * inv_scale from n_cells on (PASTA's "everything else")
 *   steer_edit_row   a whole (query, head) row on the host, visiting only cells where
 *                    steer_delta can be non-zero
 *   steer_keep_shift the constant (logit units) that keeps a row's softmax mass on the
 *                    cells of non-zero bias unchanged under the edit (STEER_EDIT_KEEP_SHARE):
 *                    log sum exp(z_j) - log sum exp(z_j + b_j) over those cells, z = scale*x
 *   steer_edit_row_keep  steer_edit_row with that constant added to the same cells
 *   steer_region     region id of key cell j for the observer (-1 = none)
 *   steer_observe_row  per-region sums of one post-softmax row on the host
 *
 * Plain C types only: NVRTC compiles this file without a C library. Biases are finite
 * (checked when a config is published) and bounded, so an edited row stays finite;
 * llama.cpp's -inf mask is applied after this edit, inside softmax, so cells a query cannot
 * see stay invisible whatever is added.
 */
#ifndef LLAMA_STEER_MATH_H
#define LLAMA_STEER_MATH_H

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define STEER_HD __host__ __device__ __forceinline__
#define STEER_RESTRICT __restrict__
#else
#define STEER_HD static inline
#define STEER_RESTRICT restrict
#endif

STEER_HD float steer_delta(long long j, const float *bias, int n_cells, float tail, int lo,
                           int hi, float inv_scale) {
    if (j >= (long long)n_cells) return tail * inv_scale;
    if (j < (long long)lo || j >= (long long)hi) return 0.0f;
    return bias[j] * inv_scale;
}

STEER_HD short steer_region(long long j, const short *region, int n_region_cells) {
    return j < (long long)n_region_cells ? region[j] : (short)-1;
}

/* host: edit one row of raw QK^T (n_kv keys). steer_delta split by range, branch-free
 * inside each so the compiler vectorizes it: [lo, hi) lies below n_cells (bias[j] *
 * inv_scale), [n_cells, n_kv) is the tail (tail * inv_scale). */
STEER_HD void steer_edit_row(float *STEER_RESTRICT row, long long n_kv, const float *STEER_RESTRICT bias,
                             int n_cells, float tail, int lo, int hi, float inv_scale) {
    long long end = (long long)hi < n_kv ? (long long)hi : n_kv;
    for (long long j = lo; j < end; j++) {
        row[j] += bias[j] * inv_scale;
    }
    if (tail != 0.0f) {
        const float t = tail * inv_scale;
        for (long long j = n_cells; j < n_kv; j++) {
            row[j] += t;
        }
    }
}

/* host: the keep-share constant of one row (see the top); 0 when no cell has a bias */
STEER_HD float steer_keep_shift(const float *STEER_RESTRICT row, long long n_kv,
                                const float *STEER_RESTRICT bias, int lo, int hi, float scale) {
    long long end = (long long)hi < n_kv ? (long long)hi : n_kv;
    float m = -3.0e38f, mb = -3.0e38f; /* maxima of z and z + b: each sum has a term 1 */
    for (long long j = lo; j < end; j++) {
        if (bias[j] == 0.0f) continue;
        float z = row[j] * scale;
        if (z > m) m = z;
        if (z + bias[j] > mb) mb = z + bias[j];
    }
    if (m == -3.0e38f) return 0.0f;
    float a = 0.0f, b = 0.0f;
    for (long long j = lo; j < end; j++) {
        if (bias[j] == 0.0f) continue;
        float z = row[j] * scale;
        a += expf(z - m);
        b += expf(z + bias[j] - mb);
    }
    return (m + logf(a)) - (mb + logf(b));
}

STEER_HD void steer_edit_row_keep(float *STEER_RESTRICT row, long long n_kv,
                                  const float *STEER_RESTRICT bias, int lo, int hi, float scale) {
    const float c = steer_keep_shift(row, n_kv, bias, lo, hi, scale);
    const float inv_scale = 1.0f / scale;
    long long end = (long long)hi < n_kv ? (long long)hi : n_kv;
    for (long long j = lo; j < end; j++) {
        if (bias[j] != 0.0f) row[j] += (bias[j] + c) * inv_scale;
    }
}

/* host: add one row of post-softmax attention to per-region sums acc[n_regions] */
STEER_HD void steer_observe_row(const float *p, long long n_kv, const short *region,
                                int n_region_cells, float *acc) {
    long long end = (long long)n_region_cells < n_kv ? (long long)n_region_cells : n_kv;
    for (long long j = 0; j < end; j++) {
        short r = steer_region(j, region, n_region_cells);
        if (r >= 0) {
            acc[r] += p[j];
        }
    }
}

#endif /* LLAMA_STEER_MATH_H */
