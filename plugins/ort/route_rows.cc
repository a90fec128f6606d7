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
  static void load(const float*, int, float*) {}  // not called: float rows are read in place
  static float store(float v) { return v; }
};
struct F16 {
  using T = uint16_t;
  static constexpr bool kConverts = true;
  static void load(const uint16_t* s, int n, float* d) {
    int i = 0;
#ifdef __F16C__  // exact, like half_to_float (NaNs, which route as -inf anyway, come out quiet)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
#endif
    for (; i < n; ++i) d[i] = half_to_float(s[i]);
  }
  static uint16_t store(float v) { return float_to_half(v); }
};
struct BF16 {
  using T = uint16_t;
  static constexpr bool kConverts = true;
  static void load(const uint16_t* s, int n, float* d) {
    for (int i = 0; i < n; ++i) d[i] = bf16_to_float(s[i]);
  }
  static uint16_t store(float v) { return float_to_bf16(v); }
};

template <class D>
void route_rows_as(const RowsTask& t, int64_t begin, int64_t end, const RowScratch& s) {
  using T = typename D::T;
  const moe::Params& p = *t.p;
  const int E = p.num_experts, K = moe::width(p);
  const auto store = [](T* d, float v) { *d = D::store(v); };
  float* rows = s.work + moe::scratch_floats(p);  // 16-bit rows converted to float
  // rows [r, r + n) of `in` as float: in place, or converted into `to`
  auto as_float = [&](const void* in, int64_t r, int n, float* to) {
    const T* src = static_cast<const T*>(in) + r * E;
    if (!D::kConverts) return reinterpret_cast<const float*>(src);
    D::load(src, n * E, to);
    return static_cast<const float*>(to);
  };
  auto route_one = [&](int64_t r, const float* x) {
    // sizes converted beside the row of logits: probe routes one row at a time (block_rows)
    const float* sz = p.policy == moe::kProbe ? as_float(t.sizes, r, 1, rows + E) : nullptr;
    moe::route_row(p, x, t.bias, sz, s.work, s.order, s.valid, static_cast<T*>(t.weights) + r * K,
                   t.indices + r * K, store);
  };
  int64_t r = begin;
  const int B = moe::block_rows(p, t.bias);
  if (B > 1)
    for (; r + B <= end; r += B) {
      const float* x = as_float(t.logits, r, B, rows);
      unsigned left = moe::route_block(p, x, E, static_cast<T*>(t.weights) + r * K, t.indices + r * K, store);
      for (; left; left &= left - 1) route_one(r + __builtin_ctz(left), x + __builtin_ctz(left) * E);
    }
  for (; r < end; ++r) route_one(r, as_float(t.logits, r, 1, rows));
}

}  // namespace

void MOE_ROUTE_ROWS(const RowsTask& t, int64_t begin, int64_t end, const RowScratch& s) {
  switch (t.dtype) {
    case DType::kF32: return route_rows_as<F32>(t, begin, end, s);
    case DType::kF16: return route_rows_as<F16>(t, begin, end, s);
    case DType::kBF16: return route_rows_as<BF16>(t, begin, end, s);
  }
}
