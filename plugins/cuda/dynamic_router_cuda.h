// C entry point of the CUDA DynamicRouter kernel (device pointers, caller's stream).
#pragma once
#include <stdint.h>
#include <cuda_runtime_api.h>

#include "../core/router_core.h"

#define MOE_DTYPE_F32 0
#define MOE_DTYPE_F16 1
#define MOE_DTYPE_BF16 2
#define MOE_CUDA_MAX_EXPERTS 512
#define MOE_CUDA_BAD_PARAMS (-1)
#define MOE_CUDA_TOO_MANY_EXPERTS (-2)

#ifdef __cplusplus
extern "C" {
#endif

// Routes `rows` tokens: logits [rows, E], optional bias [E] and sizes [rows, E] (required by
// policy probe, else ignored) of `dtype`; writes weights [rows, width] of `dtype` and indices
// [rows, width] int64. Returns 0, a cudaError_t from the launch, or one of the negative codes
// above. Asynchronous on `stream`.
__attribute__((visibility("default"))) int moe_dynamic_router_cuda(
    const moe::Params* params, int dtype, const void* logits, const void* bias, const void* sizes,
    void* weights, int64_t* indices, int64_t rows, cudaStream_t stream);


#ifdef __cplusplus
}
#endif
