/*
 * steer_kernel.cu -- the CUDA side of the hook: the same edit and observation as the host
 * path, on kq-<il> / kq_soft_max-<il> tensors that live in device memory.
 *
 *   steer_edit_kernel     grid (n_tokens, n_head, n_stream), one block per (query, head)
 *                         row; threads stride over key cells adding steer_delta (or, with
 *                         keep_share, the bias plus the row's steer_keep_shift)
 *   steer_observe_kernel  grid (n_rows, n_head, n_stream); per-region sums of a row in
 *                         shared memory, then one atomicAdd per region into acc[head][region]
 *
 * Compiled at run time with NVRTC for the present GPU (llama_steer/_cuda.py), and with nvcc
 * for sm_90 and sm_120 as a compile check (setup.py, tests). The arithmetic lives in
 * steer_math.h, shared with the host path; NVRTC receives both files' text concatenated.
 */
#include "steer_math.h"

extern "C" __global__ void steer_edit_kernel(char *data, long long ne0, long long nb1,
                                             long long nb2, long long nb3,
                                             const unsigned char *heads, const float *bias,
                                             int n_cells, float tail, int lo, int hi,
                                             float inv_scale, int keep_share) {
    const long long i = blockIdx.x, k = blockIdx.y, s = blockIdx.z;
    if (!heads[k]) return;
    float *row = (float *)(data + i * nb1 + k * nb2 + s * nb3);
    const long long end = (long long)hi < ne0 ? (long long)hi : ne0;
    if (keep_share) {
        /* one thread computes the row's keep-share constant with the host's own function
         * (rows are a few thousand cells; the edit is a small part of a decode step), then
         * all threads add bias + constant to the cells of non-zero bias */
        __shared__ float shift;
        if (threadIdx.x == 0) shift = steer_keep_shift(row, ne0, bias, lo, hi, 1.0f / inv_scale);
        __syncthreads();
        for (long long j = lo + threadIdx.x; j < end; j += blockDim.x) {
            if (bias[j] != 0.0f) row[j] += (bias[j] + shift) * inv_scale;
        }
        return;
    }
    for (long long j = lo + threadIdx.x; j < end; j += blockDim.x) {
        row[j] += steer_delta(j, bias, n_cells, tail, lo, hi, inv_scale);
    }
    if (tail != 0.0f) {
        for (long long j = n_cells + threadIdx.x; j < ne0; j += blockDim.x) {
            row[j] += steer_delta(j, bias, n_cells, tail, lo, hi, inv_scale);
        }
    }
}

extern "C" __global__ void steer_observe_kernel(const char *data, long long ne0, long long i0,
                                                long long nb1, long long nb2, long long nb3,
                                                const short *region, int n_region_cells,
                                                int n_regions, float *acc) {
    extern __shared__ float sums[];
    const long long i = i0 + blockIdx.x, k = blockIdx.y, s = blockIdx.z;
    for (int r = threadIdx.x; r < n_regions; r += blockDim.x) sums[r] = 0.0f;
    __syncthreads();
    const float *p = (const float *)(data + i * nb1 + k * nb2 + s * nb3);
    const long long end = (long long)n_region_cells < ne0 ? (long long)n_region_cells : ne0;
    for (long long j = threadIdx.x; j < end; j += blockDim.x) {
        short r = steer_region(j, region, n_region_cells);
        if (r >= 0) atomicAdd(&sums[r], p[j]);
    }
    __syncthreads();
    for (int r = threadIdx.x; r < n_regions; r += blockDim.x) {
        atomicAdd(&acc[k * n_regions + r], sums[r]);
    }
}
