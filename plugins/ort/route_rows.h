// What the ORT kernel's row loop needs, shared by its builds: route_rows.cc is compiled once
// portable and, on x86-64, once more with AVX2 (route_rows_avx2.cc); the kernel picks one at
// session creation. The conversions are static and the core sits in an ISA-named namespace,
// so the linker never merges one build's code into the other.
#pragma once

#include <stdint.h>
#include <string.h>

#include "../core/router_core.h"

// IEEE half and bfloat16 <-> float, bit-exact and portable (no F16C requirement).
static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);
  else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
  else if (man == 0) bits = sign;
  else {  // subnormal: renormalize
    int e = -1;
    do { ++e; man <<= 1; } while (!(man & 0x400));
    bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
  }
  return moe::bits_to_float(bits);
}
static inline uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  // overflow to inf
  if (ax < 0x38800000u) {                                    // subnormal or zero
    if (ax < 0x33000000u) return (uint16_t)sign;
    uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000, shift = 126 - e;
    uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ax + 0xc8000fffu + ((ax >> 13) & 1);  // rebias exponent and round
  return (uint16_t)(sign | (r >> 13));
}
static inline float bf16_to_float(uint16_t b) { return moe::bits_to_float((uint32_t)b << 16); }
static inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);  // quiet NaN
  return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

enum class DType { kF32, kF16, kBF16 };

struct RowsTask {
  const moe::Params* p;
  DType dtype;
  const void* logits;
  const float* bias;
  const void* sizes;  // laid out like the logits; read by policy probe only
  void* weights;
  int64_t* indices;
  int64_t rows;
  int64_t rows_per_batch;
};


// Scratch one thread needs (route_rows allocates nothing, so its AVX2 build instantiates no
// library templates that the linker could share with the portable build).
struct RowScratch {
  float* work;             // scratch_floats(p) + 8 * num_experts (a block of converted rows)
  int32_t* order;          // 2 * num_experts
  unsigned char* valid;    // num_experts
};

// Routes rows [begin, end) of the task.
void route_rows_portable(const RowsTask& t, int64_t begin, int64_t end, const RowScratch& s);
void route_rows_avx2(const RowsTask& t, int64_t begin, int64_t end, const RowScratch& s);
