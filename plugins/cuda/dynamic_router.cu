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
                                                    const T* __restrict__ bias, T* __restrict__ weights,
                                                    int64_t* __restrict__ indices, int64_t rows) {
  float x[MAXE];
  float b[MAXE];
  float work[6 * MAXE + 2 * MAXE + 8];
  int32_t order[2 * MAXE];
  unsigned char valid[MAXE];
  const int E = p.num_experts, K = moe::width(p);
  if (bias)
    for (int i = 0; i < E; ++i) b[i] = to_f(bias[i]);
  for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
    const T* row = logits + r * E;
    for (int i = 0; i < E; ++i) x[i] = to_f(row[i]);
    moe::route_row(p, x, bias ? b : nullptr, work, order, valid, weights + r * K, indices + r * K, StoreAs<T>());
  }
}

template <typename T, int MAXE>
cudaError_t launch(const moe::Params& p, const void* logits, const void* bias, void* weights, int64_t* indices,
                   int64_t rows, cudaStream_t stream) {
  const int threads = 128;
  int64_t blocks = (rows + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;  // grid-stride beyond this
  route_kernel<T, MAXE><<<(unsigned)blocks, threads, 0, stream>>>(p, static_cast<const T*>(logits),
      static_cast<const T*>(bias), static_cast<T*>(weights), indices, rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const moe::Params& p, const void* logits, const void* bias, void* weights, int64_t* indices,
                     int64_t rows, cudaStream_t stream) {
  const int E = p.num_experts;
  if (E <= 16) return launch<T, 16>(p, logits, bias, weights, indices, rows, stream);
  if (E <= 64) return launch<T, 64>(p, logits, bias, weights, indices, rows, stream);
  if (E <= 128) return launch<T, 128>(p, logits, bias, weights, indices, rows, stream);
  if (E <= 256) return launch<T, 256>(p, logits, bias, weights, indices, rows, stream);
  return launch<T, MOE_CUDA_MAX_EXPERTS>(p, logits, bias, weights, indices, rows, stream);
}

}  // namespace

extern "C" int moe_dynamic_router_cuda(const moe::Params* p, int dtype, const void* logits, const void* bias,
                                       void* weights, int64_t* indices, int64_t rows, cudaStream_t stream) {
  if (!p || moe::validate(*p)) return MOE_CUDA_BAD_PARAMS;
  if (p->num_experts > MOE_CUDA_MAX_EXPERTS) return MOE_CUDA_TOO_MANY_EXPERTS;
  if (rows < 0) return MOE_CUDA_BAD_PARAMS;
  if (rows == 0) return 0;
  cudaError_t err;
  switch (dtype) {
    case MOE_DTYPE_F32: err = dispatch<float>(*p, logits, bias, weights, indices, rows, stream); break;
    case MOE_DTYPE_F16: err = dispatch<__half>(*p, logits, bias, weights, indices, rows, stream); break;
    case MOE_DTYPE_BF16: err = dispatch<__nv_bfloat16>(*p, logits, bias, weights, indices, rows, stream); break;
    default: return MOE_CUDA_BAD_PARAMS;
  }
  return (int)err;
}

extern "C" const char* moe_dynamic_router_validate(const moe::Params* p) { return moe::validate(*p); }
