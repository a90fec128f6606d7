// The one routing core of moe-export: shared by the ONNX Runtime CPU kernel, the CUDA kernel
// and (through the same arithmetic) the numpy spec in moe_export/spec.py. Header-only and free of
// ORT, TensorRT and CUDA types so every backend compiles exactly this code.
#pragma once

#include <stdint.h>
#include <string.h>
#include <math.h>

// moe::Params, the attribute codes and MOE_ROUTER_ATTRS, generated from moe_export/schema.py.
#include "router_attrs.h"

#if defined(__CUDACC__)
#define MOE_HD __host__ __device__ __forceinline__
#else
#define MOE_HD inline
#endif

// A host build may compile the core twice, with and without -mavx2, into one library; an
// inline namespace named after the instruction set keeps the two builds' functions apart, so
// the linker cannot merge an AVX2 copy into the portable build.
#if defined(__AVX2__) && !defined(__CUDACC__)
#define MOE_AVX2 1
#define MOE_ISA isa_avx2
#include <immintrin.h>
#include <type_traits>
#else
#define MOE_ISA isa_portable
#endif

namespace moe {

constexpr int kLanes = 8;  // independent partial sums, so the compiler can use one SIMD register

// Functions live in an ISA-named inline namespace (see MOE_ISA above); data types do not, so
// both builds share them.
inline namespace MOE_ISA {

// Returns nullptr when valid, else a message naming the first bad attribute. Mirrors
// RouterAttrs.validate() in spec.py.
inline const char* validate(const Params& p) {
  const int E = p.num_experts;
  if (E < 1 || E > kMaxExperts) return "num_experts must be in [1, 4096]";
  if (p.k < 1 || p.k > E) return "k must be in [1, num_experts]";
  if (p.policy < kStatic || p.policy > kProbe) return "unknown policy";
  if (p.score_func != kSoftmax && p.score_func != kSigmoid) return "unknown score_func";
  if (p.select != kAfterScore && p.select != kBeforeScore) return "unknown select";
  if (!(p.threshold == p.threshold) || isinf(p.threshold)) return "threshold must be finite";
  if ((p.policy == kTopP || p.policy == kRatio) && (p.threshold < 0.f || p.threshold > 1.f))
    return "threshold must be in [0, 1] for top-p and ratio";
  if (p.policy == kEntropy && (p.threshold < 0.f || p.threshold >= 1.f))
    return "threshold must be in [0, 1) for entropy";
  if (p.policy == kProbe && p.threshold < 0.f) return "threshold must be >= 0 for probe";
  if (p.max_experts < 1 || p.max_experts > E) return "max_experts must be in [1, num_experts]";
  if (p.policy == kProbe && p.max_experts > p.k) return "max_experts must be <= k for probe";
  if (p.min_experts < 1 || p.min_experts > p.max_experts) return "min_experts must be in [1, max_experts]";
  if (!(p.renormalize >= 0.f && p.renormalize <= 1.f)) return "renormalize must be in [0, 1]";
  if (!(p.scale == p.scale) || isinf(p.scale)) return "scale must be finite";
  if (p.n_group < 1 || E % p.n_group != 0) return "n_group must divide num_experts";
  if (p.topk_group < 1 || p.topk_group > p.n_group) return "topk_group must be in [1, n_group]";
  if (p.n_group > 1 && (p.group_score_topk < 1 || p.group_score_topk > E / p.n_group))
    return "group_score_topk must be in [1, experts per group]";
  return nullptr;
}

MOE_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// Cephes expf, in the exact operation order of spec.exp32 (build with -ffp-contract=off so no
// FMA changes the rounding). Branch-free so loops over it vectorize.
MOE_HD float exp32(float x) {
  float xc = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  float fx = floorf(xc * 1.44269504088896341f + 0.5f);
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  y = y * bits_to_float((uint32_t)((int32_t)fx + 127) << 23);
  y = x < -87.f ? 0.f : y;
  return x > 88.f ? INFINITY : y;
}

MOE_HD float sanitize(float v) { return v != v ? -INFINITY : v; }

// Ranks experts: higher key first, ties to the lower index (ONNX TopK's order). Bitwise, not
// short-circuit, so loops over it vectorize.
MOE_HD bool before(float ka, int ia, float kb, int ib) { return (ka > kb) | ((ka == kb) & (ia < ib)); }

// Adds v[0..n) into kLanes partial sums, element i into lane i % kLanes. Whole blocks first, so
// the partial sums stay in one SIMD register; the lane assignment (and so the result) is the
// same as a plain i % kLanes loop.
MOE_HD void lane_accumulate(const float* v, int n, float* acc) {
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += v[i + l];
  for (; i < n; ++i) acc[i - (n / kLanes) * kLanes] += v[i];
}

MOE_HD float lane_sum(const float* v, int n) {
  if (n <= kLanes) {  // one element per lane: the lanes' sum in lane order, minus the + 0s
    float s = 0.f;
    for (int i = 0; i < n; ++i) s += v[i];
    return s;
  }
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  lane_accumulate(v, n, acc);
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

#if MOE_AVX2
#include "router_core_avx2.h"
#endif

// Softmax over n values (entries with mask==0 excluded when mask is given), written to out.
// Entries equal to the max contribute exp(0): +inf logits share the mass, an all -inf row is
// uniform. Sums with lane_sum(), as spec.py does.
MOE_HD void softmax(const float* x, const unsigned char* mask, int n, float* out) {
#if MOE_AVX2
  if (!mask) return avx2::softmax(x, n, out);
#endif
  float m = -INFINITY;
  if (mask) {
    for (int i = 0; i < n; ++i) {
      float v = mask[i] ? x[i] : -INFINITY;
      m = v > m ? v : m;
    }
    for (int i = 0; i < n; ++i) {
      float v = mask[i] ? x[i] : -INFINITY;
      out[i] = mask[i] ? exp32(v == m ? 0.f : v - m) : 0.f;
    }
  } else {  // the common case: branch-free loops the compiler vectorizes
    // lane-wise partial maxima: a max is exact in any order, and this order vectorizes
    float lm[kLanes] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) lm[l] = x[i + l] > lm[l] ? x[i + l] : lm[l];
    for (; i < n; ++i) m = x[i] > m ? x[i] : m;
    for (int l = 0; l < kLanes; ++l) m = lm[l] > m ? lm[l] : m;
    for (int i = 0; i < n; ++i) out[i] = exp32(x[i] == m ? 0.f : x[i] - m);
  }
  const float inv = 1.0f / lane_sum(out, n);
  for (int i = 0; i < n; ++i) out[i] *= inv;
}

MOE_HD void insert_sorted(float v, int i, int K, int& filled, int32_t* order, float* okey) {
  if (filled == K && !before(v, i, okey[K - 1], order[K - 1])) return;
  int j = filled < K ? filled++ : K - 1;
  while (j > 0 && before(v, i, okey[j - 1], order[j - 1])) {
    okey[j] = okey[j - 1];
    order[j] = order[j - 1];
    --j;
  }
  okey[j] = v;
  order[j] = i;
}

// Keeps the K best of n keys in order[0..K) (their keys in okey), sorted by before().
// fscratch and iscratch hold n floats and n ints.
// For K <= kLanes it is branch-free: the kLanes strided lane maxima are distinct elements, so
// the K-th best key is at least the K-th best of them (`bound`); the few keys >= bound are
// compacted, and each one's rank among them (unique, as before() is a total order) is its slot.
// Larger K insert one by one.
MOE_HD void select_top(const float* key, int n, int K, int32_t* order, float* okey, float* fscratch,
                       int32_t* iscratch) {
#if MOE_AVX2
  if (K <= kLanes && avx2::select_top(key, n, K, order, okey)) return;
#endif
  if (K > kLanes || n < kLanes) {
    int filled = 0;
    for (int i = 0; i < n; ++i) insert_sorted(key[i], i, K, filled, order, okey);
    return;
  }
  float lmax[kLanes];
  for (int l = 0; l < kLanes; ++l) lmax[l] = key[l];
  const int full = (n / kLanes) * kLanes;
  for (int i = kLanes; i < full; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lmax[l] = key[i + l] > lmax[l] ? key[i + l] : lmax[l];
  float bound = -INFINITY;
  for (int a = 0; a < kLanes; ++a) {
    int r = 0;
    for (int b = 0; b < kLanes; ++b) r += before(lmax[b], b, lmax[a], a);
    bound = r == K - 1 ? lmax[a] : bound;
  }
  int nc = 0;
  for (int i = 0; i < n; ++i) {
    iscratch[nc] = i;
    fscratch[nc] = key[i];
    nc += key[i] >= bound;
  }
  for (int a = 0; a < nc; ++a) {
    const float ka = fscratch[a];
    const int ia = iscratch[a];
    int r = 0;
    for (int b = 0; b < nc; ++b) r += before(fscratch[b], iscratch[b], ka, ia);
    if (r < K) {
      order[r] = ia;
      okey[r] = ka;
    }
  }
}

// Scratch a row needs, in floats: logits, scores, keys, policy distribution, sorted keys and
// selection scratch, plus group scores; callers size it with scratch_floats().
MOE_HD int scratch_floats(const Params& p) { return 6 * p.num_experts + p.n_group * 2 + 8; }

// Output slots per token: max(k, max_experts), so capping below k keeps the graph's k-wide shapes.
MOE_HD int width(const Params& p) { return p.k > p.max_experts ? p.k : p.max_experts; }

// Entropy of a distribution q[0..n), summed in kLanes partial sums.
MOE_HD float entropy(const float* q, int n) {
  float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; ++i) acc[i % kLanes] += q[i] > 0.f ? q[i] * logf(q[i]) : 0.f;
  float H = 0.f;
  for (int l = 0; l < kLanes; ++l) H -= acc[l];
  return H;
}

// How many experts a dynamic policy keeps. qs[j] is the policy distribution at the j-th selected
// expert (j < max_experts), H its entropy over the n_valid candidates (entropy policy only).
// Backends gather these however suits them (a CPU loop, a GPU warp); the decision is made here.
MOE_HD int policy_count(const Params& p, const float* qs, float H, int n_valid) {
  const float t = p.threshold;
  int count = 1;
  if (p.policy == kTopP) {
    float cum = 0.f;
    for (int j = 0; j < p.max_experts - 1; ++j) {
      cum += qs[j];
      if (cum < t) ++count; else break;
    }
  } else if (p.policy == kRatio) {
    const float ref = qs[0] * t;
    for (int j = 1; j < p.max_experts; ++j) count += qs[j] >= ref;
  } else {
    float hn = n_valid > 1 ? H / (float)log((double)n_valid) : 0.f;
    float frac = (hn - t) / (1.0f - t);
    frac = frac < 0.f ? 0.f : (frac > 1.f ? 1.f : frac);
    count = p.min_experts + (int)floorf(frac * (float)(p.max_experts - p.min_experts) + 0.5f);
  }
  count = count < p.min_experts ? p.min_experts : (count > p.max_experts ? p.max_experts : count);
  return count > n_valid ? n_valid : count;
}

// Policy probe (spec._probe): slot j < k is kept when j < min_experts, or j < max_experts and its
// signal, the static weight of its value w[j] times exp(sizes[order[j]]), reaches the threshold.
// The first k slots of w and order are partitioned stably, the kept first (a dropped slot may
// precede a kept one); returns how many are kept. ws and io hold k floats and ints.
MOE_HD int probe_partition(const Params& p, const float* sizes, float* w, int32_t* order, float* ws, int32_t* io) {
  const int k = p.k;
  if (p.select == kBeforeScore && p.score_func == kSoftmax) {
    softmax(w, nullptr, k, ws);
  } else if (p.normalize) {
    const float tot = lane_sum(w, k), inv = tot > 0.f ? 1.0f / tot : 0.f;
    for (int j = 0; j < k; ++j) ws[j] = tot > 0.f ? w[j] * inv : 0.f;
  } else {
    for (int j = 0; j < k; ++j) ws[j] = w[j];
  }
  // Kept slots move down in place (c <= j); dropped ones wait in ws and io, whose entries below
  // j are already read.
  int c = 0, nd = 0;
  for (int j = 0; j < k; ++j) {
    const float v = w[j], signal = ws[j] * exp32(sanitize(sizes[order[j]]));
    const int32_t e = order[j];
    if (j < p.min_experts || (j < p.max_experts && signal >= p.threshold)) {
      w[c] = v;
      order[c++] = e;
    } else {
      ws[nd] = v;
      io[nd++] = e;
    }
  }
  for (int j = 0; j < nd; ++j) {
    w[c + j] = ws[j];
    order[c + j] = io[j];
  }
  return c;
}

// Stores a token's width(p) output slots from the kept experts' final weights w[0..count):
// dropped slots get (index=E, weight=0).
template <typename OutT, typename Store>
MOE_HD void store_slots(const Params& p, int count, const float* w, const int32_t* order, OutT* w_out,
                        int64_t* i_out, Store store) {
  for (int j = 0; j < width(p); ++j) {
    store(w_out + j, j < count ? w[j] * p.scale : 0.f);
    i_out[j] = j < count ? (int64_t)order[j] : (int64_t)p.num_experts;
  }
}

// Writes a token's width(p) output slots. w[0..width(p)) holds the chosen experts' logits
// (softmax gates with select=before_score) or scores, in selection order, and is overwritten.
template <typename OutT, typename Store>
MOE_HD void write_slots(const Params& p, int count, float* w, const int32_t* order, OutT* w_out, int64_t* i_out,
                        Store store) {
  const bool softmax_kept = p.select == kBeforeScore && p.score_func == kSoftmax;
  if (count != p.k && p.renormalize != 1.0f && (softmax_kept || p.normalize)) {
    // The kept take part of the dropped experts' weight: their static weights (over the k)
    // times (static total / kept total)^renormalize, as spec._part_factor.
    if (softmax_kept) softmax(w, nullptr, count > p.k ? count : p.k, w);
    const float sk = lane_sum(w, p.k), sc = lane_sum(w, count);
    const float f = sk > 0.f && sc > 0.f ? powf(sk / sc, p.renormalize) / sk : 0.f;
    for (int j = 0; j < count; ++j) w[j] *= f;
  } else if (softmax_kept) {
    softmax(w, nullptr, count, w);
  } else if (p.normalize) {
    float tot = lane_sum(w, count);
    const float inv = tot > 0.f ? 1.0f / tot : 0.f;
    for (int j = 0; j < count; ++j) w[j] = tot > 0.f ? w[j] * inv : 0.f;
  }
  store_slots(p, count, w, order, w_out, i_out, store);
}

// The largest of x[0..n) below t (-inf if none); lane-wise partial maxima so it vectorizes.
MOE_HD float max_below(const float* x, int n, float t) {
#if MOE_AVX2
  return avx2::max_below(x, n, t);
#else
  float lm[kLanes] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = x[i + l] < t ? x[i + l] : -INFINITY;
      lm[l] = v > lm[l] ? v : lm[l];
    }
  float m = -INFINITY;
  for (; i < n; ++i) m = x[i] < t && x[i] > m ? x[i] : m;
  for (int l = 0; l < kLanes; ++l) m = lm[l] > m ? lm[l] : m;
  return m;
#endif
}

// Whether a gate ranks experts on their logits: the static softmax gate without bias or groups,
// TopK -> Softmax (select=before_score) or Softmax -> TopK renormalized over its k. The latter
// is a softmax over the k best logits: the full softmax's denominator cancels, and exp32 and
// the shift by the max are monotone (tests/test_exp32.py checks every float in [-88, 0]), so
// scores rank as their logits do, except where rounding ties two scores whose logits differ:
// ONNX TopK and spec.py order those by index. logit_order_is_exact() tells such rows apart.
MOE_HD bool logit_gate(const Params& p, const float* bias) {
  return p.score_func == kSoftmax && p.policy == kStatic && !bias && p.n_group == 1 &&
         (p.select == kBeforeScore || p.normalize);
}

// For a renormalized logit_gate: whether ranking by logit chose what ranking by score does.
// l[0..K) are the chosen logits (l[0] the row's max), w[0..K) their softmax (so w[0] = 1 / sum),
// next the best logit below l[K-1], or anything at least that large. Scores are the same exp32
// values times another common factor, and each rounding moves a ratio by at most 2^-23 in the
// normal range (w >= 2^-99 keeps them there), so a ratio above 1 + 2^-20 here is above 1 there.
MOE_HD bool logit_order_is_exact(const float* l, const float* w, int K, float next) {
  const float margin = 1.0f + 0x1p-20f;
  if (!(w[K - 1] >= 0x1p-99f)) return false;
  const float w_next = next == -INFINITY ? 0.f : exp32(next - l[0]) * w[0];
  bool ok = w[K - 1] > w_next * margin;
  for (int j = 0; j + 1 < K; ++j) ok &= (l[j] == l[j + 1]) | (w[j] > w[j + 1] * margin);
  return ok;
}

// How many rows route_block() takes at once: 8 in the AVX2 build for an ungrouped, unbiased
// softmax gate with at most 8 experts to choose (not the entropy policy, whose logarithms stay
// per row, nor probe, which reads sizes), else 1 (route_row alone).
MOE_HD int block_rows(const Params& p, const float* bias) {
#if MOE_AVX2
  if (p.score_func == kSoftmax && !bias && p.n_group == 1 && p.policy != kEntropy && p.policy != kProbe &&
      (logit_gate(p, bias) ? p.k : width(p)) <= 8)
    return 8;
#endif
  return 1;
}

// Routes block_rows() rows (call it only where that is above 1), row t's float logits at
// x + t * stride, as route_row() would. Returns a bit mask of the rows it left to route_row().
template <typename OutT, typename Store>
MOE_HD unsigned route_block(const Params& p, const float* x, int64_t stride, OutT* w_out, int64_t* i_out,
                            Store store) {
#if MOE_AVX2
  const int W = width(p);
  if (logit_gate(p, nullptr)) return avx2::route8(p, W, x, stride, w_out, i_out, store);  // no bias here
  avx2::Rows8 r;
  const unsigned left = avx2::score8(p, W, x, stride, r);
  for (int t = 0; t < 8; ++t) {
    if (left >> t & 1) continue;
    const int count = p.policy == kStatic ? p.k : policy_count(p, r.q[t], 0.f, p.num_experts);
    write_slots(p, count, r.w[t], r.order[t], w_out + t * W, i_out + t * W, store);
  }
  return left;
#else
  return 1u;
#endif
}

// Routes one token. x: E logits (already float), bias: E or nullptr, sizes: the row's E
// predicted log output sizes (read by policy probe only), work: scratch_floats() floats, order:
// 2E ints, valid: E bytes. Writes width(p) weights and indices. Returns the number of experts kept.
template <typename OutT, typename Store>
MOE_HD int route_row(const Params& p, const float* x_in, const float* bias, const float* sizes, float* work,
                     int32_t* order, unsigned char* valid, OutT* w_out, int64_t* i_out, Store store) {
  const int E = p.num_experts;
  float* x = work;          // sanitized logits
  float* s = x + E;         // scores
  float* key = s + E;       // ranking key
  float* q = key + E;       // policy distribution
  float* okey = q + E;      // keys of the selected, in order
  float* sel = okey + E;    // select_top's scratch
  float* gscore = sel + E;  // group scores
  float* gtmp = gscore + p.n_group;
  int32_t* isel = order + E;

  for (int i = 0; i < E; ++i) x[i] = sanitize(x_in[i]);
  const bool before = p.select == kBeforeScore;  // ranking the logits (+ bias), scoring the kept
  const bool grouped = p.n_group > 1;
  if (logit_gate(p, bias)) {
    select_top(x, E, p.k, order, okey, sel, isel);
    softmax(okey, nullptr, p.k, q);
    if (before || logit_order_is_exact(okey, q, p.k, max_below(x, E, okey[p.k - 1]))) {
      store_slots(p, p.k, q, order, w_out, i_out, store);
      return p.k;
    }
  }
  if (p.score_func == kSoftmax) {
    // selecting on logits, the scores only feed a dynamic policy
    if (!before || p.policy != kStatic) softmax(x, nullptr, E, s);
  } else {
    for (int i = 0; i < E; ++i) s[i] = 1.0f / (1.0f + exp32(-x[i]));
  }
  const float* rkey = before ? x : s;
  if (bias || grouped) {  // a key of its own: biased, or masked by group below
    for (int i = 0; i < E; ++i) key[i] = bias ? sanitize(rkey[i] + sanitize(bias[i])) : rkey[i];
    rkey = key;
  }

  // Group-limited choice (DeepSeek-V3): score each group by the sum of its best
  // group_score_topk keys, keep the best topk_group groups.
  int n_valid = E;
  if (grouped) {
    const int G = p.n_group, gs = E / G, t = p.group_score_topk;
    int32_t* gorder = order;  // borrowed; the final selection overwrites it later
    for (int g = 0; g < G; ++g) {
      select_top(key + g * gs, gs, t, gorder, gtmp, sel, isel);
      gscore[g] = sanitize(lane_sum(gtmp, t));
    }
    select_top(gscore, G, p.topk_group, gorder, gtmp, sel, isel);
    for (int i = 0; i < E; ++i) valid[i] = 0;
    for (int j = 0; j < p.topk_group; ++j)
      for (int i = gorder[j] * gs; i < (gorder[j] + 1) * gs; ++i) valid[i] = 1;
    for (int i = 0; i < E; ++i) key[i] = valid[i] ? key[i] : -INFINITY;
    n_valid = p.topk_group * gs;
  }
  select_top(rkey, E, width(p), order, okey, sel, isel);

  float* w = okey;  // holds the chosen values already unless the key was biased, masked or not them
  const float* chosen = before && p.score_func == kSoftmax ? x : s;
  if (rkey != chosen)
    for (int j = 0; j < width(p); ++j) w[j] = chosen[order[j]];

  int count = p.k;
  if (p.policy == kProbe) {
    count = probe_partition(p, sizes, w, order, sel, isel);  // select_top is done with its scratch
  } else if (p.policy != kStatic) {
    const float* qv = q;
    if (p.score_func == kSoftmax) {
      if (grouped) softmax(x, valid, E, q);
      else qv = s;
    } else {
      for (int i = 0; i < E; ++i) q[i] = (!grouped || valid[i]) ? s[i] : 0.f;
      float tot = lane_sum(q, E);
      if (tot > 0.f) {
        const float inv = 1.0f / tot;
        for (int i = 0; i < E; ++i) q[i] *= inv;
      } else {
        for (int i = 0; i < E; ++i) q[i] = (!grouped || valid[i]) ? 1.0f / (float)n_valid : 0.f;
      }
    }
    float* qs = sel;  // select_top is done with its scratch
    for (int j = 0; j < p.max_experts; ++j) qs[j] = qv[order[j]];
    count = policy_count(p, qs, p.policy == kEntropy ? entropy(qv, E) : 0.f, n_valid);
  }
  write_slots(p, count, w, order, w_out, i_out, store);
  return count;
}

}  // namespace MOE_ISA
}  // namespace moe
