// ONNX Runtime CPU kernel for moe_export::DynamicRouter (opset 1), over plugins/core/router_core.h.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "route_rows.h"

namespace {

constexpr const char* kDomain = "moe_export";
constexpr const char* kOpName = "DynamicRouter";
constexpr const char* kNeedsSizes = "DynamicRouter: policy probe needs the sizes input";

using RouteRows = void (*)(const RowsTask&, int64_t, int64_t, const RowScratch&);

// The row loop for this CPU: the AVX2 build where the CPU has AVX2, unless MOE_EXPORT_CPU_ISA
// (auto, avx2, portable) says otherwise; tests run both builds against the spec this way.
// Returns nullptr with a message in err when the request cannot be met.
RouteRows pick_route_rows(std::string& err) {
  const char* env = std::getenv("MOE_EXPORT_CPU_ISA");
  const std::string want = env && *env ? env : "auto";
#if MOE_EXPORT_HAVE_AVX2_BUILD
  const RouteRows avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("f16c")
          ? route_rows_avx2 : nullptr;
#else
  const RouteRows avx2 = nullptr;
#endif
  if (want == "portable") return route_rows_portable;
  if (want == "auto") return avx2 ? avx2 : route_rows_portable;
  if (want == "avx2") {
    if (avx2) return avx2;
    err = "MOE_EXPORT_CPU_ISA=avx2, but this CPU or build has no AVX2 (with F16C)";
    return nullptr;
  }
  err = "MOE_EXPORT_CPU_ISA must be auto, avx2 or portable, not '" + want + "'";
  return nullptr;
}

struct Job {
  RowsTask t;
  RouteRows route;
};

void run_rows(const Job& j, int64_t begin, int64_t end) {
  const moe::Params& p = *j.t.p;
  std::vector<float> work((size_t)moe::scratch_floats(p) + 8 * (size_t)p.num_experts);
  std::vector<int32_t> order(2 * (size_t)p.num_experts);
  std::vector<unsigned char> valid(p.num_experts);
  j.route(j.t, begin, end, RowScratch{work.data(), order.data(), valid.data()});
}

void run_batch(void* data, size_t batch) {
  const Job& j = *static_cast<const Job*>(data);
  int64_t begin = (int64_t)batch * j.t.rows_per_batch;
  run_rows(j, begin, std::min(j.t.rows, begin + j.t.rows_per_batch));
}

// Attribute readers, one per C type of MOE_ROUTER_ATTRS: an absent attribute keeps the default
// already in `out`. A string attribute is stored as the index of its value among `names`; an
// unknown value stores -1 and is kept in `bad` for the error message.
void read_attr(const OrtApi& api, const OrtKernelInfo* info, const char* name, int32_t& out,
               const char* const* names, int n, std::string& bad) {
  if (names) {
    size_t len = 0;
    OrtStatus* st = api.KernelInfoGetAttribute_string(info, name, nullptr, &len);
    if (st) { api.ReleaseStatus(st); return; }
    std::string s(len, '\0');
    st = api.KernelInfoGetAttribute_string(info, name, &s[0], &len);
    if (st) { api.ReleaseStatus(st); return; }
    s.resize(len ? len - 1 : 0);
    out = -1;
    for (int i = 0; i < n; ++i)
      if (s == names[i]) out = i;
    if (out < 0) bad = s;
    return;
  }
  int64_t v = 0;
  OrtStatus* st = api.KernelInfoGetAttribute_int64(info, name, &v);
  if (st) { api.ReleaseStatus(st); return; }
  out = (v < -(1ll << 30) || v > (1ll << 30)) ? -1 : (int32_t)v;  // int64 in ONNX, int32 in the core
}
void read_attr(const OrtApi& api, const OrtKernelInfo* info, const char* name, float& out,
               const char* const*, int, std::string&) {
  OrtStatus* st = api.KernelInfoGetAttribute_float(info, name, &out);
  if (st) api.ReleaseStatus(st);
}

// Whether the node gives input i (an omitted optional input has an empty name, or is left off).
bool has_input(const OrtApi& api, const OrtKernelInfo* info, size_t i) {
  size_t n = 0, len = 0;
  if (OrtStatus* st = api.KernelInfo_GetInputCount(info, &n)) { api.ReleaseStatus(st); return true; }
  if (i >= n) return false;
  if (OrtStatus* st = api.KernelInfo_GetInputName(info, i, nullptr, &len)) { api.ReleaseStatus(st); return true; }
  return len > 1;  // len counts the terminating '\0'
}

struct DynamicRouterKernel {
  moe::Params p{};
  DType dtype;
  RouteRows route;

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
      const void* sizes = nullptr;
      if (p.policy == moe::kProbe) {
        Ort::ConstValue sz = ctx.GetInputCount() > 2 ? ctx.GetInput(2) : Ort::ConstValue{nullptr};
        if (sz == nullptr)
          return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, kNeedsSizes);
        if (sz.GetTensorTypeAndShapeInfo().GetShape() != info.GetShape())
          return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, "DynamicRouter: sizes must have the logits' shape");
        sizes = sz.GetTensorRawData();
      }
      shape.back() = moe::width(p);
      Ort::UnownedValue w = ctx.GetOutput(0, shape);
      Ort::UnownedValue idx = ctx.GetOutput(1, shape);
      if (rows == 0) return nullptr;
      Job j{RowsTask{&p, dtype, logits.GetTensorRawData(), bias.empty() ? nullptr : bias.data(), sizes,
                     w.GetTensorMutableRawData(), idx.GetTensorMutableData<int64_t>(), rows, 0},
            route};
      // ~128 rows of E=64 is ~5 us of work: enough to amortize a thread-pool task. Whole
      // blocks of 8 rows (see moe::block_rows).
      j.t.rows_per_batch = std::max<int64_t>(16, ((1 << 13) / std::max(1, p.num_experts)) & ~7);
      const int64_t batches = (rows + j.t.rows_per_batch - 1) / j.t.rows_per_batch;
      if (batches == 1) run_rows(j, 0, rows);
      else ctx.ParallelFor(run_batch, (size_t)batches, 1, &j);
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
    p = moe::default_params();
    std::string bad;
#define MOE_READ_ATTR(name, type, dflt, names, n) read_attr(api, info, #name, p.name, names, n, bad);
    MOE_ROUTER_ATTRS(MOE_READ_ATTR)
#undef MOE_READ_ATTR
    moe::resolve_zero_defaults(p);
    if (const char* err = moe::validate(p))
      return api.CreateStatus(ORT_INVALID_ARGUMENT, (std::string("DynamicRouter: ") + err +
                                                     (bad.empty() ? "" : " '" + bad + "'")).c_str());
    if (p.policy == moe::kProbe && !has_input(api, info, 2))
      return api.CreateStatus(ORT_INVALID_ARGUMENT, kNeedsSizes);
    k->dtype = dtype;
    std::string err;
    k->route = pick_route_rows(err);
    if (!k->route) return api.CreateStatus(ORT_INVALID_ARGUMENT, ("DynamicRouter: " + err).c_str());
    *kernel = k.release();
    return nullptr;
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }  // logits, bias, sizes
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
