// ONNX Runtime CPU kernel for moe_export::DynamicRouter (opset 1), over plugins/core/router_core.h.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../core/router_core.h"

namespace {

constexpr const char* kDomain = "moe_export";
constexpr const char* kOpName = "DynamicRouter";

// IEEE half and bfloat16 <-> float, bit-exact and portable (no F16C requirement).
inline float half_to_float(uint16_t h) {
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
inline uint16_t float_to_half(float f) {  // round to nearest even
  uint32_t x;
  std::memcpy(&x, &f, 4);
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
inline float bf16_to_float(uint16_t b) { return moe::bits_to_float((uint32_t)b << 16); }
inline uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);  // quiet NaN
  return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

enum class DType { kF32, kF16, kBF16 };

struct RowsTask {
  const moe::Params* p;
  DType dtype;
  const void* logits;
  const float* bias;
  void* weights;
  int64_t* indices;
  int64_t rows;
  int64_t rows_per_batch;
};

// One block of tokens. target_clones lets the same binary use AVX-512/AVX2 where the CPU has
// them; flatten inlines the whole core into each clone, so each is compiled for its target
// (the core's loops are written so GCC vectorizes them; no FMA, so all clones round alike).
__attribute__((target_clones("avx512f", "avx2", "default"), flatten))
void route_rows(const RowsTask& t, int64_t begin, int64_t end) {
  const moe::Params& p = *t.p;
  const int E = p.num_experts, K = moe::width(p);
  std::vector<float> work((size_t)moe::scratch_floats(p) + E);
  std::vector<int32_t> order(2 * (size_t)E);
  std::vector<unsigned char> valid(E);
  float* row = work.data() + moe::scratch_floats(p);
  for (int64_t r = begin; r < end; ++r) {
    const float* x;
    int64_t* iout = t.indices + r * K;
    switch (t.dtype) {
      case DType::kF32: {
        x = static_cast<const float*>(t.logits) + r * E;
        float* wout = static_cast<float*>(t.weights) + r * K;
        moe::route_row(p, x, t.bias, work.data(), order.data(), valid.data(), wout, iout,
                       [](float* d, float v) { *d = v; });
        break;
      }
      case DType::kF16: {
        const uint16_t* src = static_cast<const uint16_t*>(t.logits) + r * E;
        for (int i = 0; i < E; ++i) row[i] = half_to_float(src[i]);
        uint16_t* wout = static_cast<uint16_t*>(t.weights) + r * K;
        moe::route_row(p, row, t.bias, work.data(), order.data(), valid.data(), wout, iout,
                       [](uint16_t* d, float v) { *d = float_to_half(v); });
        break;
      }
      case DType::kBF16: {
        const uint16_t* src = static_cast<const uint16_t*>(t.logits) + r * E;
        for (int i = 0; i < E; ++i) row[i] = bf16_to_float(src[i]);
        uint16_t* wout = static_cast<uint16_t*>(t.weights) + r * K;
        moe::route_row(p, row, t.bias, work.data(), order.data(), valid.data(), wout, iout,
                       [](uint16_t* d, float v) { *d = float_to_bf16(v); });
        break;
      }
    }
  }
}

void route_batch(void* data, size_t batch) {
  const RowsTask& t = *static_cast<const RowsTask*>(data);
  int64_t begin = (int64_t)batch * t.rows_per_batch;
  route_rows(t, begin, std::min(t.rows, begin + t.rows_per_batch));
}

// Attribute readers: absent attributes take the documented defaults.
int64_t attr_int(const OrtApi& api, const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = dflt;
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v);
  if (st) { api.ReleaseStatus(st); return dflt; }
  return v;
}
float attr_float(const OrtApi& api, const OrtKernelInfo* info, const char* name, float dflt) {
  float v = dflt;
  OrtStatus* st = api.KernelInfoGetAttribute_float(info, name, &v);
  if (st) { api.ReleaseStatus(st); return dflt; }
  return v;
}
std::string attr_string(const OrtApi& api, const OrtKernelInfo* info, const char* name, const char* dflt) {
  size_t n = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &n);
  if (st) { api.ReleaseStatus(st); return dflt; }
  std::string s(n, '\0');
  st = api.KernelInfoGetAttribute_string(info, name, &s[0], &n);
  if (st) { api.ReleaseStatus(st); return dflt; }
  s.resize(n ? n - 1 : 0);
  return s;
}

int code_of(const std::string& v, std::initializer_list<const char*> names) {
  int i = 0;
  for (const char* n : names) { if (v == n) return i; ++i; }
  return -1;
}

// Narrowing guard: attributes are int64 in ONNX, int32 in the core.
int32_t narrow(int64_t v) { return (v < -(1ll << 30) || v > (1ll << 30)) ? -1 : (int32_t)v; }

struct DynamicRouterKernel {
  moe::Params p{};
  DType dtype;

  OrtStatusPtr ComputeV2(OrtKernelContext* raw) {
    try {
      Ort::KernelContext ctx(raw);
      Ort::ConstValue logits = ctx.GetInput(0);
      auto info = logits.GetTensorTypeAndShapeInfo();
      std::vector<int64_t> shape = info.GetShape();
      if (shape.empty() || shape.back() != p.num_experts)
        return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT,
            ("DynamicRouter: logits must have last dimension num_experts=" + std::to_string(p.num_experts)).c_str());
      const int64_t rows = (int64_t)info.GetElementCount() / p.num_experts;
      std::vector<float> bias;
      if (ctx.GetInputCount() > 1) {
        Ort::ConstValue b = ctx.GetInput(1);
        if (b != nullptr) {
          auto binfo = b.GetTensorTypeAndShapeInfo();
          if ((int64_t)binfo.GetElementCount() != p.num_experts)
            return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, "DynamicRouter: bias must have num_experts elements");
          bias.resize(p.num_experts);
          const void* bp = b.GetTensorRawData();
          for (int i = 0; i < p.num_experts; ++i)
            bias[i] = dtype == DType::kF32 ? static_cast<const float*>(bp)[i]
                    : dtype == DType::kF16 ? half_to_float(static_cast<const uint16_t*>(bp)[i])
                                           : bf16_to_float(static_cast<const uint16_t*>(bp)[i]);
        }
      }
      shape.back() = moe::width(p);
      Ort::UnownedValue w = ctx.GetOutput(0, shape);
      Ort::UnownedValue idx = ctx.GetOutput(1, shape);
      if (rows == 0) return nullptr;
      RowsTask t{&p, dtype, logits.GetTensorRawData(), bias.empty() ? nullptr : bias.data(),
                 w.GetTensorMutableRawData(), idx.GetTensorMutableData<int64_t>(), rows, 0};
      // ~128 rows of E=64 is ~10 us of work: enough to amortize a thread-pool task.
      t.rows_per_batch = std::max<int64_t>(16, (1 << 13) / std::max(1, p.num_experts));
      const int64_t batches = (rows + t.rows_per_batch - 1) / t.rows_per_batch;
      if (batches == 1) route_rows(t, 0, rows);
      else ctx.ParallelFor(route_batch, (size_t)batches, 1, &t);
      return nullptr;
    } catch (const Ort::Exception& e) {
      return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
    }
  }
};

struct DynamicRouterOp : Ort::CustomOpBase<DynamicRouterOp, DynamicRouterKernel, true> {
  ONNXTensorElementDataType type;
  DType dtype;
  DynamicRouterOp(ONNXTensorElementDataType t, DType d) : type(t), dtype(d) {}

  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    auto k = std::make_unique<DynamicRouterKernel>();
    moe::Params& p = k->p;
    p.num_experts = narrow(attr_int(api, info, "num_experts", -1));
    p.k = narrow(attr_int(api, info, "k", -1));
    std::string policy = attr_string(api, info, "policy", "static");
    p.policy = code_of(policy, {"static", "top-p", "ratio", "entropy"});
    p.threshold = attr_float(api, info, "threshold", 0.f);
    p.min_experts = narrow(attr_int(api, info, "min_experts", 1));
    p.max_experts = narrow(attr_int(api, info, "max_experts", 0));
    if (p.max_experts == 0) p.max_experts = p.k;
    p.score_func = code_of(attr_string(api, info, "score_func", "softmax"), {"softmax", "sigmoid"});
    p.select = code_of(attr_string(api, info, "select", "after_score"), {"after_score", "before_score"});
    p.normalize = narrow(attr_int(api, info, "normalize", 0));
    p.scale = attr_float(api, info, "scale", 1.f);
    p.n_group = narrow(attr_int(api, info, "n_group", 1));
    p.topk_group = narrow(attr_int(api, info, "topk_group", 0));
    if (p.topk_group == 0) p.topk_group = p.n_group;
    p.group_score_topk = narrow(attr_int(api, info, "group_score_topk", 2));
    if (const char* err = moe::validate(p))
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string("DynamicRouter: ") + err +
                                                     (p.policy < 0 ? " '" + policy + "'" : "")).c_str());
    k->dtype = dtype;
    *kernel = k.release();
    return nullptr;
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return type; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == 0 ? type : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
};

DynamicRouterOp& op_f32() { static DynamicRouterOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, DType::kF32); return op; }
DynamicRouterOp& op_f16() { static DynamicRouterOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, DType::kF16); return op; }
DynamicRouterOp& op_bf16() { static DynamicRouterOp op(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, DType::kBF16); return op; }

}  // namespace

extern "C" __attribute__((visibility("default")))
OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  // An onnxruntime older than the headers cannot run this library; the session then reports
  // DynamicRouter as an unknown op, which names the op rather than crashing here.
  if (!api) return nullptr;
  Ort::InitApi(api);
  try {
    // One domain object per registration: ORT keeps a pointer to it for the session's life,
    // and sessions may be created from many threads at once.
    static std::mutex mu;
    static std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;
    std::lock_guard<std::mutex> lock(mu);
    auto domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    domain->Add(&op_f32());
    domain->Add(&op_f16());
    domain->Add(&op_bf16());
    Ort::UnownedSessionOptions(options).Add(*domain);
    domains.push_back(std::move(domain));
    return nullptr;
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  }
}
