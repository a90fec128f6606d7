// AVX2 forms of the routing core's hot parts, included by router_core.h in translation units
// built with -mavx2: softmax(), max_below() and select_top() compute exactly what the portable
// forms compute (exp32 in the same operation order, sums in the same lane order, the same
// selection and tie order), and route8() routes eight rows at once (see route_block()). On this
// code lane permutes cost more than broadcasts from memory, hence the latter.
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

// The lanes' sum in lane order, as lane_sum() adds its partial sums.
inline float lane_total(__m256 v) {
  alignas(32) float a[8];
  _mm256_store_ps(a, v);
  float s = 0.f;
  for (int l = 0; l < 8; ++l) s += a[l];
  return s;
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
  const __m256 inv = _mm256_set1_ps(1.0f / lane_total(acc));
  for (int i = 0; i < full; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(out + i), inv));
  if (rem) _mm256_maskstore_ps(out + full, first_lanes(rem), _mm256_mul_ps(tail, inv));
}

// max_below() on 8 lanes.
inline float max_below(const float* x, int n, float t) {
  const int full = n & ~7, rem = n - full;
  const __m256 tv = _mm256_set1_ps(t), ninf = _mm256_set1_ps(-INFINITY);
  __m256 m = ninf;
  auto below = [&](__m256 v) { return _mm256_blendv_ps(ninf, v, _mm256_cmp_ps(v, tv, _CMP_LT_OQ)); };
  for (int i = 0; i < full; i += 8) m = _mm256_max_ps(m, below(_mm256_loadu_ps(x + i)));
  if (rem) m = _mm256_max_ps(m, below(load_part(x + full, rem, -INFINITY)));
  return hmax(m);
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

// --- Eight rows at once: route_block() for ungrouped, unbiased softmax gates ---
// Row-by-row selection is mostly shuffling within a row; with the eight rows' logits transposed
// so that each lane is a row, a sorting network needs nothing but lane-wise max and min. For
// that the logits become integer keys that order as the floats do, with the expert's index in
// the low bits (ties go to the lower index, as in ONNX TopK). Those bits are the float's last
// mantissa bits, so two logits that differ only there can come out misordered: choose8() checks
// that the chosen ones and the first one left out are ordered by the bits they keep (or are
// equal). Softmax scores rank as logits do (see logit_gate()) unless rounding ties two of them,
// which route8() and score8() check. Rows failing a check are left to route_row().

inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Compare-exchange: the larger key to a.
inline void cx(__m256i& a, __m256i& b) {
  const __m256i hi = _mm256_max_epi32(a, b);
  b = _mm256_min_epi32(a, b);
  a = hi;
}

// Sorts 8 keys per lane, largest first (Knuth's 19-comparator network).
inline void sort8(__m256i* k) {
  cx(k[0], k[2]), cx(k[1], k[3]), cx(k[4], k[6]), cx(k[5], k[7]);
  cx(k[0], k[4]), cx(k[1], k[5]), cx(k[2], k[6]), cx(k[3], k[7]);
  cx(k[0], k[1]), cx(k[2], k[3]), cx(k[4], k[5]), cx(k[6], k[7]);
  cx(k[2], k[4]), cx(k[3], k[5]);
  cx(k[1], k[4]), cx(k[3], k[6]);
  cx(k[1], k[2]), cx(k[3], k[4]), cx(k[5], k[6]);
}

// Float bits <-> integers in the floats' order (negative floats have their magnitude bits
// flipped); the map is its own inverse.
inline __m256i flip_negative(__m256i b) { return _mm256_xor_si256(b, _mm256_srli_epi32(_mm256_srai_epi32(b, 31), 1)); }

// A row's W output slots from its first 8 (weights w, indices i; slots past 8 are dropped ones):
// one by one through `store`, or, for 8 or more float slots, with vector stores (masked
// stores cost more than the scalar loop on AMD cores).
template <typename OutT, typename Store>
inline void store_row(OutT* w_out, int64_t* i_out, int W, __m256 w, __m256i i, int E, Store store) {
  if (std::is_same<OutT, float>::value && W >= 8) {  // `store` is a plain copy then
    float* wf = reinterpret_cast<float*>(w_out);
    _mm256_storeu_ps(wf, w);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(i_out), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(i_out + 4), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(i, 1)));
    for (int j = 8; j < W; ++j) wf[j] = 0.f, i_out[j] = E;
    return;
  }
  alignas(32) float wt[8];
  alignas(32) int32_t it[8];
  _mm256_store_ps(wt, w);
  _mm256_store_si256(reinterpret_cast<__m256i*>(it), i);
  for (int j = 0; j < W; ++j) {
    store(w_out + j, j < 8 ? wt[j] : 0.f);
    i_out[j] = j < 8 ? (int64_t)it[j] : (int64_t)E;
  }
}

// Experts [g, g + 8) of the 8 rows, transposed: v[c] holds expert g + c of every row. Experts
// past E (a last, partial group) read as -inf, and nothing past a row's end is read.
inline void load_group(const float* x, int64_t stride, int g, int E, __m256* v) {
  if (E - g >= 8)
    for (int t = 0; t < 8; ++t) v[t] = _mm256_loadu_ps(x + t * stride + g);
  else
    for (int t = 0; t < 8; ++t) v[t] = load_part(x + t * stride + g, E - g, -INFINITY);
  transpose8(v);
}

// Each row's K best experts by logit: their indices idx[0..K) and exact logits l[0..K) (gathered,
// sanitized), and in `next`, where K < E, an upper bound on the best logit left out (the top of
// its key's bucket; -inf where K == E). Returns the rows whose choice is certain (all bits set).
inline __m256i choose8(const float* x, int64_t stride, int E, int K, __m256i* idx, __m256* l, __m256& next) {
  int bits = 0;  // index bits
  while ((1 << bits) < E) ++bits;
  const __m256i low = _mm256_set1_epi32((1 << bits) - 1);
  const __m256 ninf = _mm256_set1_ps(-INFINITY), zero = _mm256_setzero_ps();
  // below every key (-inf keys have the top bit set, not all of them): experts past E, and the
  // best of the rest before there is a rest
  const __m256i none = _mm256_set1_epi32(INT32_MIN);
  // S[0..8): each row's best 8 keys so far, in order; S[8]: the best of the rest
  __m256i S[9];
  S[8] = none;
  for (int g = 0; g < E; g += 8) {
    __m256 v[8];
    load_group(x, stride, g, E, v);
    const __m256i code = _mm256_set1_epi32((1 << bits) - 1 - g);  // expert g's low bits; g + c's: code - c
    __m256i k[8];
    for (int c = 0; c < 8; ++c) {
      // + 0 makes -0 a +0 (they tie in ONNX TopK); max(NaN, -inf) is -inf, as sanitize() has it
      const __m256 f = _mm256_max_ps(_mm256_add_ps(v[c], zero), ninf);
      k[c] = _mm256_or_si256(_mm256_andnot_si256(low, flip_negative(_mm256_castps_si256(f))),
                             _mm256_sub_epi32(code, _mm256_set1_epi32(c)));
    }
    for (int c = E - g; c < 8; ++c) k[c] = none;  // past E
    sort8(k);
    if (g == 0) {
      for (int i = 0; i < 8; ++i) S[i] = k[i];
      continue;
    }
    // merge: the pairwise larger of S and k reversed are the best 8 of both, in bitonic order
    for (int i = 0; i < 8; ++i) {
      S[8] = _mm256_max_epi32(S[8], _mm256_min_epi32(S[i], k[7 - i]));
      S[i] = _mm256_max_epi32(S[i], k[7 - i]);
    }
    for (int d = 4; d; d >>= 1)
      for (int i = 0; i < 8; ++i)
        if (!(i & d)) cx(S[i], S[i + d]);
  }
  const __m256i row_at = _mm256_mullo_epi32(iota(), _mm256_set1_epi32((int32_t)stride));
  for (int j = 0; j < K; ++j) {
    idx[j] = _mm256_sub_epi32(low, _mm256_and_si256(S[j], low));
    l[j] = _mm256_max_ps(_mm256_i32gather_ps(x, _mm256_add_epi32(row_at, idx[j]), 4), ninf);
  }
  auto above = [&](int j) { return _mm256_cmpgt_epi32(_mm256_srai_epi32(S[j], bits), _mm256_srai_epi32(S[j + 1], bits)); };
  __m256i ok = _mm256_set1_epi32(-1);
  for (int j = 0; j + 1 < K; ++j)
    ok = _mm256_and_si256(ok, _mm256_or_si256(above(j), _mm256_castps_si256(_mm256_cmp_ps(l[j], l[j + 1], _CMP_EQ_OQ))));
  next = ninf;
  if (K < E) {
    ok = _mm256_and_si256(ok, above(K - 1));
    next = _mm256_castsi256_ps(flip_negative(_mm256_or_si256(S[K], low)));
  }
  return ok;
}

// exp32(x - m) as softmax() computes it, x == m giving exp32(0).
inline __m256 shifted_exp(__m256 x, __m256 m) {
  return exp32(_mm256_andnot_ps(_mm256_cmp_ps(x, m, _CMP_EQ_OQ), _mm256_sub_ps(x, m)));
}

inline unsigned rows_left(__m256i ok) { return ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(ok)) & 0xffu; }

// route_block() for a logit_gate with k <= 8 (W is width(p)): the weights are a softmax over
// the chosen logits; for Softmax -> TopK -> renormalize, rows that logit_order_is_exact() would
// reject are left.
template <typename OutT, typename Store>
inline unsigned route8(const Params& p, int W, const float* x, int64_t stride, OutT* w_out, int64_t* i_out,
                       Store store) {
  const int E = p.num_experts, K = p.k;
  const __m256 zero = _mm256_setzero_ps();
  __m256i idx[8];
  __m256 l[8], w[8], next;
  __m256i ok = choose8(x, stride, E, K, idx, l, next);
  for (int j = K; j < 8; ++j) idx[j] = _mm256_set1_epi32(E), w[j] = zero;  // dropped slots

  // softmax over the chosen, as softmax() computes it for n <= 8 (l[0] is the max)
  __m256 sum = zero;
  for (int j = 0; j < K; ++j) sum = _mm256_add_ps(sum, w[j] = shifted_exp(l[j], l[0]));
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);
  for (int j = 0; j < K; ++j) w[j] = _mm256_mul_ps(w[j], inv);

  if (p.select == kAfterScore) {  // logit_order_is_exact(), with the bound for the next logit
    const __m256 margin = _mm256_set1_ps(1.0f + 0x1p-20f);
    const __m256 w_next = K < E ? _mm256_mul_ps(exp32(_mm256_sub_ps(next, l[0])), w[0]) : zero;
    __m256 exact = _mm256_and_ps(_mm256_cmp_ps(w[K - 1], _mm256_set1_ps(0x1p-99f), _CMP_GE_OQ),
                                 _mm256_cmp_ps(w[K - 1], _mm256_mul_ps(w_next, margin), _CMP_GT_OQ));
    for (int j = 0; j + 1 < K; ++j)
      exact = _mm256_and_ps(exact, _mm256_or_ps(_mm256_cmp_ps(l[j], l[j + 1], _CMP_EQ_OQ),
                                                _mm256_cmp_ps(w[j], _mm256_mul_ps(w[j + 1], margin), _CMP_GT_OQ)));
    ok = _mm256_and_si256(ok, _mm256_castps_si256(exact));
  }

  transpose8(w);
  transpose8(reinterpret_cast<__m256*>(idx));
  for (int t = 0; t < 8; ++t)
    store_row(w_out + t * W, i_out + t * W, W, _mm256_mul_ps(w[t], _mm256_set1_ps(p.scale)), idx[t], E, store);
  return rows_left(ok);
}

// What score8() hands back per row: the chosen experts in order, the routing distribution at
// each (q) and the values write_slots() takes (the logits for select=before_score, else q).
struct Rows8 {
  alignas(32) int32_t order[8][8];
  alignas(32) float q[8][8];
  alignas(32) float w[8][8];
};

// For route_block() on the other softmax gates (W = width(p) <= 8): the full softmax, summed as
// softmax() sums (expert i of a row into partial sum i % 8), read at each row's W best experts.
// Ranking on scores (select=after_score), rows where two chosen scores, or the last chosen and
// the bound for the next, tie are left, as are rows choose8() is unsure of.
inline unsigned score8(const Params& p, int W, const float* x, int64_t stride, Rows8& out) {
  const int E = p.num_experts;
  const __m256 zero = _mm256_setzero_ps(), ninf = _mm256_set1_ps(-INFINITY);
  __m256i idx[8];
  __m256 l[8], q[8] = {}, next;
  __m256i ok = choose8(x, stride, E, W, idx, l, next);
  const __m256 m = l[0];
  __m256 acc[8] = {zero, zero, zero, zero, zero, zero, zero, zero};
  for (int g = 0; g < E; g += 8) {
    __m256 v[8];
    load_group(x, stride, g, E, v);
    for (int c = 0; c < 8 && g + c < E; ++c) acc[c] = _mm256_add_ps(acc[c], shifted_exp(_mm256_max_ps(v[c], ninf), m));
  }
  __m256 sum = zero;
  for (int c = 0; c < 8; ++c) sum = _mm256_add_ps(sum, acc[c]);
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);
  for (int j = 0; j < W; ++j) q[j] = _mm256_mul_ps(shifted_exp(l[j], m), inv);
  if (p.select == kAfterScore) {
    const __m256 q_next = W < E ? _mm256_mul_ps(shifted_exp(next, m), inv) : zero;
    __m256 strict = _mm256_cmp_ps(q[W - 1], q_next, _CMP_GT_OQ);
    for (int j = 0; j + 1 < W; ++j)
      strict = _mm256_and_ps(strict, _mm256_or_ps(_mm256_cmp_ps(l[j], l[j + 1], _CMP_EQ_OQ),
                                                  _mm256_cmp_ps(q[j], q[j + 1], _CMP_GT_OQ)));
    ok = _mm256_and_si256(ok, _mm256_castps_si256(strict));
  }
  for (int j = W; j < 8; ++j) idx[j] = _mm256_setzero_si256(), l[j] = zero;
  transpose8(reinterpret_cast<__m256*>(idx));
  transpose8(q);
  transpose8(l);
  const bool before = p.select == kBeforeScore;
  for (int t = 0; t < 8; ++t) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(out.order[t]), idx[t]);
    _mm256_store_ps(out.q[t], q[t]);
    _mm256_store_ps(out.w[t], before ? l[t] : q[t]);
  }
  return rows_left(ok);
}

}  // namespace avx2
