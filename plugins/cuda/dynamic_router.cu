// CUDA kernel for DynamicRouter on plugins/core/router_core.h, with a plain C entry point over
// device pointers so the TensorRT plugin, ctypes and any other host can call it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../core/router_core.h"
#include "dynamic_router_cuda.h"

namespace {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> struct StoreAs {
  __device__ void operator()(T* d, float v) const;
};
template <> __device__ void StoreAs<float>::operator()(float* d, float v) const { *d = v; }
template <> __device__ void StoreAs<__half>::operator()(__half* d, float v) const { *d = __float2half_rn(v); }
template <> __device__ void StoreAs<__nv_bfloat16>::operator()(__nv_bfloat16* d, float v) const { *d = __float2bfloat16_rn(v); }

// One thread routes one token. Per-thread scratch lives in local memory, which the hardware
// interleaves across a warp's threads, so scratch traffic is coalesced and mostly L1-resident.
// MAXE buckets keep that scratch small for the common expert counts.
template <typename T, int MAXE>
__global__ void __launch_bounds__(128) route_kernel(moe::Params p, const T* __restrict__ logits,
                                                    const T* __restrict__ bias, const T* __restrict__ sizes,
                                                    T* __restrict__ weights, int64_t* __restrict__ indices,
                                                    int64_t rows) {
  float x[MAXE];
  float b[MAXE];
  float sz[MAXE];
  float work[6 * MAXE + 2 * MAXE + 8];
  int32_t order[2 * MAXE];
  unsigned char valid[MAXE];
  const int E = p.num_experts, K = moe::width(p);
  if (bias)
    for (int i = 0; i < E; ++i) b[i] = to_f(bias[i]);
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
    const T* row = logits + r * E;
    for (int i = 0; i < E; ++i) x[i] = to_f(row[i]);
    if (sizes)
      for (int i = 0; i < E; ++i) sz[i] = to_f(sizes[r * E + i]);
    moe::route_row(p, x, bias ? b : nullptr, sizes ? sz : nullptr, work, order, valid, weights + r * K,
                   indices + r * K, StoreAs<T>());
  }
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One warp routes one token: lane l holds experts l, l+32, ... in registers, so nothing per
// expert touches memory beyond one coalesced read of the logits. Reductions are warp shuffles
// (their summation order differs from the CPU's lane sums by rounding only); the selection is
// width(p) rounds of a warp-wide arg-best under moe::before; the policy decision and the output
// slots are the core's policy_count and write_slots, run by lane 0 on the gathered values.
// Ungrouped routing only, and not policy probe: DeepSeek-V3 group limiting and probe take route_kernel.
template <typename T, int PL>
__global__ void __launch_bounds__(128) route_warp_kernel(moe::Params p, const T* __restrict__ logits,
                                                         const T* __restrict__ bias, T* __restrict__ weights,
                                                         int64_t* __restrict__ indices, int64_t rows) {
  extern __shared__ float smem[];
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int E = p.num_experts, W = moe::width(p);
  float* qs = smem + (threadIdx.x >> 5) * 3 * W;  // policy distribution at each selected expert
  float* chosen = qs + W;                          // its logit (softmax before_score) or score
  int32_t* order = reinterpret_cast<int32_t*>(chosen + W);
  const bool before_score = p.select == moe::kBeforeScore;
  float b[PL];
#pragma unroll
  for (int j = 0; j < PL; ++j) {
    const int e = lane + 32 * j;
    b[j] = bias && e < E ? moe::sanitize(to_f(bias[e])) : 0.f;
  }
  for (int64_t r = blockIdx.x * (int64_t)warps + (threadIdx.x >> 5); r < rows; r += (int64_t)gridDim.x * warps) {
    const T* row = logits + r * E;
    float x[PL], s[PL], key[PL], q[PL];
    bool live[PL];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < PL; ++j) {
      const int e = lane + 32 * j;
      live[j] = e < E;
      x[j] = live[j] ? moe::sanitize(to_f(row[e])) : -INFINITY;
      m = fmaxf(m, x[j]);
    }
    if (p.score_func == moe::kSoftmax) {
      m = warp_max(m);
      float tot = 0.f;
#pragma unroll
      for (int j = 0; j < PL; ++j) {
        s[j] = live[j] ? moe::exp32(x[j] == m ? 0.f : x[j] - m) : 0.f;
        tot += s[j];
      }
      const float inv = 1.0f / warp_sum(tot);
#pragma unroll
      for (int j = 0; j < PL; ++j) s[j] *= inv;
    } else {
#pragma unroll
      for (int j = 0; j < PL; ++j) s[j] = live[j] ? 1.0f / (1.0f + moe::exp32(-x[j])) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < PL; ++j) {
      key[j] = before_score ? x[j] : s[j];
      if (bias) key[j] = moe::sanitize(key[j] + b[j]);
      q[j] = s[j];
    }
    float H = 0.f;
    if (p.policy != moe::kStatic) {
      if (p.score_func == moe::kSigmoid) {
        float tot = 0.f;
#pragma unroll
        for (int j = 0; j < PL; ++j) tot += q[j];
        tot = warp_sum(tot);
        const float inv = 1.0f / tot;
#pragma unroll
        for (int j = 0; j < PL; ++j) q[j] = live[j] ? (tot > 0.f ? q[j] * inv : 1.0f / (float)E) : 0.f;
      }
      if (p.policy == moe::kEntropy) {
        float acc = 0.f;
#pragma unroll
        for (int j = 0; j < PL; ++j) acc += q[j] > 0.f ? q[j] * logf(q[j]) : 0.f;
        H = -warp_sum(acc);
      }
    }
    for (int slot = 0; slot < W; ++slot) {
      float bk = -INFINITY;
      int bi = 0x7fffffff;
#pragma unroll
      for (int j = 0; j < PL; ++j)
        if (live[j] && moe::before(key[j], lane + 32 * j, bk, bi)) { bk = key[j]; bi = lane + 32 * j; }
      for (int o = 16; o; o >>= 1) {
        const float ok = __shfl_xor_sync(0xffffffffu, bk, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (moe::before(ok, oi, bk, bi)) { bk = ok; bi = oi; }
      }
      if ((bi & 31) == lane) {
#pragma unroll
        for (int j = 0; j < PL; ++j)
          if (j == (bi >> 5)) {
            live[j] = false;
            qs[slot] = q[j];
            chosen[slot] = before_score && p.score_func == moe::kSoftmax ? x[j] : s[j];
          }
        order[slot] = bi;
      }
    }
    __syncwarp();
    if (lane == 0) {
      const int count = p.policy == moe::kStatic ? p.k : moe::policy_count(p, qs, H, E);
      moe::write_slots(p, count, chosen, order, weights + r * W, indices + r * W, StoreAs<T>());
    }
    __syncwarp();
  }
}

template <typename T, int PL>
cudaError_t launch_warp(const moe::Params& p, const void* logits, const void* bias, void* weights, int64_t* indices,
                        int64_t rows, cudaStream_t stream) {
  const int threads = 128, warps = threads / 32;
  int64_t blocks = (rows + warps - 1) / warps;
  if (blocks > 65535) blocks = 65535;  // grid-stride beyond this
  const size_t smem = (size_t)warps * 3 * moe::width(p) * sizeof(float);
  route_warp_kernel<T, PL><<<(unsigned)blocks, threads, smem, stream>>>(p, static_cast<const T*>(logits),
      static_cast<const T*>(bias), static_cast<T*>(weights), indices, rows);
  return cudaGetLastError();
}

template <typename T, int MAXE>
cudaError_t launch(const moe::Params& p, const void* logits, const void* bias, const void* sizes, void* weights,
                   int64_t* indices, int64_t rows, cudaStream_t stream) {
  const int threads = 128;
  int64_t blocks = (rows + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;  // grid-stride beyond this
  route_kernel<T, MAXE><<<(unsigned)blocks, threads, 0, stream>>>(p, static_cast<const T*>(logits),
      static_cast<const T*>(bias), static_cast<const T*>(sizes), static_cast<T*>(weights), indices, rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const moe::Params& p, const void* logits, const void* bias, const void* sizes, void* weights,
                     int64_t* indices, int64_t rows, cudaStream_t stream) {
  const int E = p.num_experts;
  if (p.n_group == 1 && E > 16 && p.policy != moe::kProbe) {
    if (E <= 64) return launch_warp<T, 2>(p, logits, bias, weights, indices, rows, stream);
    if (E <= 128) return launch_warp<T, 4>(p, logits, bias, weights, indices, rows, stream);
    if (E <= 256) return launch_warp<T, 8>(p, logits, bias, weights, indices, rows, stream);
    return launch_warp<T, 16>(p, logits, bias, weights, indices, rows, stream);
  }
  if (E <= 16) return launch<T, 16>(p, logits, bias, sizes, weights, indices, rows, stream);
  if (E <= 64) return launch<T, 64>(p, logits, bias, sizes, weights, indices, rows, stream);
  if (E <= 128) return launch<T, 128>(p, logits, bias, sizes, weights, indices, rows, stream);
  if (E <= 256) return launch<T, 256>(p, logits, bias, sizes, weights, indices, rows, stream);
  return launch<T, MOE_CUDA_MAX_EXPERTS>(p, logits, bias, sizes, weights, indices, rows, stream);
}

}  // namespace

extern "C" int moe_dynamic_router_cuda(const moe::Params* p, int dtype, const void* logits, const void* bias,
                                       const void* sizes, void* weights, int64_t* indices, int64_t rows,
                                       cudaStream_t stream) {
  if (!p || moe::validate(*p) || (p->policy == moe::kProbe && !sizes)) return MOE_CUDA_BAD_PARAMS;
  if (p->policy != moe::kProbe) sizes = nullptr;  // unread: no row of it to convert
  if (p->num_experts > MOE_CUDA_MAX_EXPERTS) return MOE_CUDA_TOO_MANY_EXPERTS;
  if (rows < 0) return MOE_CUDA_BAD_PARAMS;
  if (rows == 0) return 0;
  cudaError_t err;
  switch (dtype) {
    case MOE_DTYPE_F32: err = dispatch<float>(*p, logits, bias, sizes, weights, indices, rows, stream); break;
    case MOE_DTYPE_F16: err = dispatch<__half>(*p, logits, bias, sizes, weights, indices, rows, stream); break;
    case MOE_DTYPE_BF16: err = dispatch<__nv_bfloat16>(*p, logits, bias, sizes, weights, indices, rows, stream); break;
    default: return MOE_CUDA_BAD_PARAMS;
  }
  return (int)err;
}

