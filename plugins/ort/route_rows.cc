// The ORT kernel's row loop over the routing core, compiled once per instruction set (see
// route_rows.h); MOE_ROUTE_ROWS names this build's entry point.
#include "route_rows.h"

#ifndef MOE_ROUTE_ROWS
#define MOE_ROUTE_ROWS route_rows_portable
#endif

void MOE_ROUTE_ROWS(const RowsTask& t, int64_t begin, int64_t end, const RowScratch& s) {
  const moe::Params& p = *t.p;
  const int E = p.num_experts, K = moe::width(p);
  float* work = s.work;
  int32_t* order = s.order;
  unsigned char* valid = s.valid;
  float* row = work + moe::scratch_floats(p);
  for (int64_t r = begin; r < end; ++r) {
    const float* x;
    int64_t* iout = t.indices + r * K;
    switch (t.dtype) {
      case DType::kF32: {
        x = static_cast<const float*>(t.logits) + r * E;
        float* wout = static_cast<float*>(t.weights) + r * K;
        moe::route_row(p, x, t.bias, work, order, valid, wout, iout,
                       [](float* d, float v) { *d = v; });
        break;
      }
      case DType::kF16: {
        const uint16_t* src = static_cast<const uint16_t*>(t.logits) + r * E;
        for (int i = 0; i < E; ++i) row[i] = half_to_float(src[i]);
        uint16_t* wout = static_cast<uint16_t*>(t.weights) + r * K;
        moe::route_row(p, row, t.bias, work, order, valid, wout, iout,
                       [](uint16_t* d, float v) { *d = float_to_half(v); });
        break;
      }
      case DType::kBF16: {
        const uint16_t* src = static_cast<const uint16_t*>(t.logits) + r * E;
        for (int i = 0; i < E; ++i) row[i] = bf16_to_float(src[i]);
        uint16_t* wout = static_cast<uint16_t*>(t.weights) + r * K;
        moe::route_row(p, row, t.bias, work, order, valid, wout, iout,
                       [](uint16_t* d, float v) { *d = float_to_bf16(v); });
        break;
      }
    }
  }
}

