// The ORT kernel's row loop over the routing core, compiled once per instruction set (see
// route_rows.h); MOE_ROUTE_ROWS names this build's entry point.
#include "route_rows.h"

#ifndef MOE_ROUTE_ROWS
#define MOE_ROUTE_ROWS route_rows_portable
#endif

namespace {

// Element formats: the stored type and its conversions; the core works in float.
struct F32 {
  using T = float;
  static constexpr bool kConverts = false;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static constexpr bool kConverts = true;
  static float load(uint16_t v) { return half_to_float(v); }
  static uint16_t store(float v) { return float_to_half(v); }
};
struct BF16 {
  using T = uint16_t;
  static constexpr bool kConverts = true;
  static float load(uint16_t v) { return bf16_to_float(v); }
  static uint16_t store(float v) { return float_to_bf16(v); }
};

template <class D>
void route_rows_as(const RowsTask& t, int64_t begin, int64_t end, const RowScratch& s) {
  using T = typename D::T;
  const moe::Params& p = *t.p;
  const int E = p.num_experts, K = moe::width(p);
  float* row = s.work + moe::scratch_floats(p);  // the converted logits of 16-bit rows
  for (int64_t r = begin; r < end; ++r) {
    const T* src = static_cast<const T*>(t.logits) + r * E;
    const float* x = reinterpret_cast<const float*>(src);
    if (D::kConverts) {
      for (int i = 0; i < E; ++i) row[i] = D::load(src[i]);
      x = row;
    }
    moe::route_row(p, x, t.bias, s.work, s.order, s.valid, static_cast<T*>(t.weights) + r * K,
                   t.indices + r * K, [](T* d, float v) { *d = D::store(v); });
  }
}

}  // namespace

void MOE_ROUTE_ROWS(const RowsTask& t, int64_t begin, int64_t end, const RowScratch& s) {
  switch (t.dtype) {
    case DType::kF32: return route_rows_as<F32>(t, begin, end, s);
    case DType::kF16: return route_rows_as<F16>(t, begin, end, s);
    case DType::kBF16: return route_rows_as<BF16>(t, begin, end, s);
  }
}
