// AVX2 forms of the routing core's two hot primitives, softmax() and select_top(), included by
// router_core.h in translation units built with -mavx2. They compute what the portable forms
// compute: exp32 in the same operation order (so identical scores), the same selection and
// tie order; only the max and the sum are reduced as trees, which is exact for the max and,
// for the sum, a rounding-level difference like the lane sums (spec.py's DECISION_EPS covers
// it). On this code lane permutes cost more than broadcasts from memory, hence the latter.
// Included inside router_core.h's namespace, after <immintrin.h>.
#pragma once

namespace avx2 {

// moe::exp32 on 8 lanes, operation for operation (test_kernel.py's test_builds_agree holds them
// to the same indices).
inline __m256 exp32(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f), hi = _mm256_set1_ps(88.f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 fx = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                                  _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_sub_ps(xc, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
  r = _mm256_sub_ps(r, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, _mm256_mul_ps(r, r)), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
}

inline __m256i iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

// Lanes [0, n) of a vector, n in [0, 8].
inline __m256i first_lanes(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota()); }

// The n < 8 values at p, the other lanes set to fill; reads only p[0..n).
inline __m256 load_part(const float* p, int n, float fill) {
  const __m256i m = first_lanes(n);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}

inline float hmax(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// softmax() without a mask.
inline void softmax(const float* x, int n, float* out) {
  const int full = n & ~7, rem = n - full;
  __m256 mv = _mm256_set1_ps(-INFINITY);
  for (int i = 0; i < full; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
  if (rem) mv = _mm256_max_ps(mv, load_part(x + full, rem, -INFINITY));
  const __m256 m = _mm256_set1_ps(hmax(mv));
  // x == m contributes exp(0): keeps inf - inf out when the max is infinite
  auto shifted_exp = [&](__m256 v) {
    return exp32(_mm256_andnot_ps(_mm256_cmp_ps(v, m, _CMP_EQ_OQ), _mm256_sub_ps(v, m)));
  };
  __m256 acc = _mm256_setzero_ps();
  for (int i = 0; i < full; i += 8) {
    const __m256 e = shifted_exp(_mm256_loadu_ps(x + i));
    _mm256_storeu_ps(out + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  __m256 tail = _mm256_setzero_ps();
  if (rem) {
    tail = _mm256_and_ps(shifted_exp(load_part(x + full, rem, 0.f)), _mm256_castsi256_ps(first_lanes(rem)));
    acc = _mm256_add_ps(acc, tail);
  }
  const __m256 inv = _mm256_set1_ps(1.0f / hsum(acc));
  for (int i = 0; i < full; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(out + i), inv));
  if (rem) _mm256_maskstore_ps(out + full, first_lanes(rem), _mm256_mul_ps(tail, inv));
}

// Permutations that pack the set lanes of an 8-bit mask to the front, one lane index per byte.
struct PackTable {
  uint64_t perm[256];
  constexpr PackTable() : perm() {
    for (int m = 0; m < 256; ++m) {
      uint64_t v = 0;
      int k = 0;
      for (int l = 0; l < 8; ++l)
        if (m & (1 << l)) v |= (uint64_t)l << (8 * k++);
      perm[m] = v;
    }
  }
};
inline constexpr PackTable kPack{};

// Ranks the nc candidates packed at ck/ci (in index order, 8 * NB slots, padded with -inf) and
// puts the K best in order/okey; a candidate's rank is its slot. Without kTies a rank counts
// the strictly greater keys, which is cheaper and exact unless keys tie; a tie shows as a slot
// taken twice or left empty, and it returns false. With kTies a tie counts for the candidate
// earlier in index order, as before() does.
template <int NB, bool kTies>
inline bool place_ranked(const float* ck, const int32_t* ci, int nc, int K, int32_t* order, float* okey) {
  __m256 kb[NB];
  __m256i r[NB];
  for (int b = 0; b < NB; ++b) {
    kb[b] = _mm256_load_ps(ck + 8 * b);
    r[b] = _mm256_setzero_si256();
  }
  for (int a = 0; a < 8 * NB; ++a) {
    const __m256 ka = _mm256_broadcast_ss(ck + a);
    for (int b = 0; b < NB; ++b) {
      __m256 before = _mm256_cmp_ps(ka, kb[b], _CMP_GT_OQ);
      if (kTies) {
        const __m256i later = _mm256_cmpgt_epi32(_mm256_add_epi32(iota(), _mm256_set1_epi32(8 * b)), _mm256_set1_epi32(a));
        before = _mm256_or_ps(before, _mm256_and_ps(_mm256_cmp_ps(ka, kb[b], _CMP_EQ_OQ), _mm256_castsi256_ps(later)));
      }
      r[b] = _mm256_sub_epi32(r[b], _mm256_castps_si256(before));
    }
  }
  // slot j takes the candidate whose rank is j: exactly one, unless keys tie
  const __m256i last = _mm256_set1_epi32(nc - 1);
  for (int b = 0; b < NB; ++b)  // padding (position >= nc) gets an impossible rank
    r[b] = _mm256_or_si256(r[b], _mm256_cmpgt_epi32(_mm256_add_epi32(iota(), _mm256_set1_epi32(8 * b)), last));
  for (int j = 0; j < K; ++j) {
    uint64_t m = 0;
    for (int b = 0; b < NB; ++b)
      m |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(r[b], _mm256_set1_epi32(j))))
           << (8 * b);
    if (__builtin_popcountll(m) != 1) return false;
    const int a = __builtin_ctzll(m);
    order[j] = ci[a];
    okey[j] = ck[a];
  }
  return true;
}

constexpr int kMaxCandidates = 64;

// place_ranked() for nc <= kMaxCandidates, trying the tie-free ranking first.
template <int NB>
inline bool place_blocks(const float* ck, const int32_t* ci, int nc, int K, int32_t* order, float* okey) {
  return place_ranked<NB, false>(ck, ci, nc, K, order, okey) || place_ranked<NB, true>(ck, ci, nc, K, order, okey);
}

inline bool place(const float* ck, const int32_t* ci, int nc, int K, int32_t* order, float* okey) {
  switch ((nc + 7) / 8) {
    case 1: return place_blocks<1>(ck, ci, nc, K, order, okey);
    case 2: return place_blocks<2>(ck, ci, nc, K, order, okey);
    case 3: return place_blocks<3>(ck, ci, nc, K, order, okey);
    case 4: return place_blocks<4>(ck, ci, nc, K, order, okey);
    case 5: case 6: return place_blocks<6>(ck, ci, nc, K, order, okey);
    default: return place_blocks<8>(ck, ci, nc, K, order, okey);
  }
}

// select_top() for K <= 8; false for the rare rows it leaves to the portable form (more than
// kMaxCandidates keys at or above the bound). Up to 16 keys are all ranked; beyond, the keys at or
// above a bound are packed with their indices (in index order, so ties keep ONNX TopK's order)
// and ranked.
inline bool select_top(const float* key, int n, int K, int32_t* order, float* okey) {
  alignas(32) float ck[kMaxCandidates + 16];
  alignas(32) int32_t ci[kMaxCandidates + 16];
  if (n <= 16) {  // few enough to rank them all
    for (int i = 0; i < 16; i += 8) {
      _mm256_store_ps(ck + i, n - i >= 8 ? _mm256_loadu_ps(key + i) : load_part(key + i, n - i > 0 ? n - i : 0, -INFINITY));
      _mm256_store_si256((__m256i*)(ci + i), _mm256_add_epi32(iota(), _mm256_set1_epi32(i)));
    }
    return place(ck, ci, n, K, order, okey);
  }
  // The two best keys of each lane (16 distinct elements, n > 16); the K-th best of them bounds
  // the K-th best key from below, far more tightly than the K-th best lane maximum would.
  const int full = n & ~7;
  __m256 m1 = _mm256_loadu_ps(key), m2 = _mm256_set1_ps(-INFINITY);
  for (int i = 8; i < full; i += 8) {
    const __m256 v = _mm256_loadu_ps(key + i);
    m2 = _mm256_max_ps(m2, _mm256_min_ps(m1, v));
    m1 = _mm256_max_ps(m1, v);
  }
  alignas(32) float top2[16];
  _mm256_store_ps(top2, m1);
  _mm256_store_ps(top2 + 8, m2);
  __m256i ge1 = _mm256_setzero_si256(), ge2 = _mm256_setzero_si256();
  for (int a = 0; a < 16; ++a) {  // how many of the 16 are >= each
    const __m256 o = _mm256_broadcast_ss(top2 + a);
    ge1 = _mm256_sub_epi32(ge1, _mm256_castps_si256(_mm256_cmp_ps(o, m1, _CMP_GE_OQ)));
    ge2 = _mm256_sub_epi32(ge2, _mm256_castps_si256(_mm256_cmp_ps(o, m2, _CMP_GE_OQ)));
  }
  // the largest value with at least K of the 16 at or above it
  const __m256i kk = _mm256_set1_epi32(K - 1);
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  const __m256 bound = _mm256_set1_ps(hmax(_mm256_max_ps(
      _mm256_blendv_ps(ninf, m1, _mm256_castsi256_ps(_mm256_cmpgt_epi32(ge1, kk))),
      _mm256_blendv_ps(ninf, m2, _mm256_castsi256_ps(_mm256_cmpgt_epi32(ge2, kk))))));

  int nc = 0;
  for (int i = 0; i < n; i += 8) {
    const int len = n - i < 8 ? n - i : 8;
    const __m256 v = len == 8 ? _mm256_loadu_ps(key + i) : load_part(key + i, len, -INFINITY);
    const unsigned m = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, bound, _CMP_GE_OQ)) & ((1u << len) - 1);
    const int c = __builtin_popcount(m);
    if (nc + c > kMaxCandidates) return false;
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(kPack.perm + m)));
    _mm256_storeu_ps(ck + nc, _mm256_permutevar8x32_ps(v, perm));
    _mm256_storeu_si256((__m256i*)(ci + nc), _mm256_add_epi32(perm, _mm256_set1_epi32(i)));
    nc += c;
  }
  // padding outranks no candidate; place() rounds nc up to at most 16 more
  _mm256_storeu_ps(ck + nc, _mm256_set1_ps(-INFINITY));
  _mm256_storeu_ps(ck + nc + 8, _mm256_set1_ps(-INFINITY));
  return place(ck, ci, nc, K, order, okey);
}

}  // namespace avx2
