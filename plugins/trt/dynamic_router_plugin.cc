// TensorRT IPluginV3 for moe_export::DynamicRouter. The plugin is named like the ONNX node, so
// TensorRT's ONNX parser maps each DynamicRouter node to it and its attributes to plugin fields.
// The kernel is the CUDA entry point in plugins/cuda (the same routing core as the CPU kernel).
#include <NvInferRuntime.h>

#include <cstring>
#include <string>
#include <vector>

#include "../cuda/dynamic_router_cuda.h"

using namespace nvinfer1;

namespace {

constexpr char const* kName = "DynamicRouter";
constexpr char const* kVersion = "1";

// Field order of serialization and of getFieldNames(): the ONNX attribute names.
enum Field { kNumExperts, kK, kPolicy, kThreshold, kMinExperts, kMaxExperts, kScoreFunc, kSelect, kNormalize,
             kScale, kNGroup, kTopkGroup, kGroupScoreTopk, kNumFields };
char const* const kFieldNames[kNumFields] = {"num_experts", "k", "policy", "threshold", "min_experts",
                                             "max_experts", "score_func", "select", "normalize", "scale",
                                             "n_group", "topk_group", "group_score_topk"};
char const* const kPolicies[] = {"static", "top-p", "ratio", "entropy"};
char const* const kScoreFuncs[] = {"softmax", "sigmoid"};
char const* const kSelects[] = {"after_score", "before_score"};

int lookup(char const* s, int len, char const* const* names, int n) {
  std::string v(s, len > 0 && s[len - 1] == '\0' ? len - 1 : len);
  for (int i = 0; i < n; ++i)
    if (v == names[i]) return i;
  return -1;
}

moe::Params default_params() {
  moe::Params p{};
  p.num_experts = -1; p.k = -1; p.policy = moe::kStatic; p.threshold = 0.f; p.min_experts = 1;
  p.max_experts = 0; p.score_func = moe::kSoftmax; p.select = moe::kAfterScore; p.normalize = 0;
  p.scale = 1.f; p.n_group = 1; p.topk_group = 0; p.group_score_topk = 2;
  return p;
}

int64_t as_int(PluginField const& f) {
  switch (f.type) {
    case PluginFieldType::kINT32: return *static_cast<int32_t const*>(f.data);
    case PluginFieldType::kINT64: return *static_cast<int64_t const*>(f.data);
    case PluginFieldType::kINT8: return *static_cast<int8_t const*>(f.data);
    case PluginFieldType::kFLOAT32: return (int64_t)*static_cast<float const*>(f.data);
    default: return -1;
  }
}
float as_float(PluginField const& f) {
  switch (f.type) {
    case PluginFieldType::kFLOAT32: return *static_cast<float const*>(f.data);
    case PluginFieldType::kFLOAT64: return (float)*static_cast<double const*>(f.data);
    case PluginFieldType::kINT32: return (float)*static_cast<int32_t const*>(f.data);
    case PluginFieldType::kINT64: return (float)*static_cast<int64_t const*>(f.data);
    default: return NAN;
  }
}

// Returns false when a field is unusable; validate() then names the bad attribute.
bool parse_fields(PluginFieldCollection const* fc, moe::Params& p) {
  for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (!f.name || !f.data) continue;
    int idx = -1;
    for (int j = 0; j < kNumFields; ++j)
      if (!std::strcmp(f.name, kFieldNames[j])) idx = j;
    char const* s = static_cast<char const*>(f.data);
    switch (idx) {
      case kNumExperts: p.num_experts = (int32_t)as_int(f); break;
      case kK: p.k = (int32_t)as_int(f); break;
      case kPolicy: p.policy = f.type == PluginFieldType::kCHAR ? lookup(s, f.length, kPolicies, 4) : (int32_t)as_int(f); break;
      case kThreshold: p.threshold = as_float(f); break;
      case kMinExperts: p.min_experts = (int32_t)as_int(f); break;
      case kMaxExperts: p.max_experts = (int32_t)as_int(f); break;
      case kScoreFunc: p.score_func = f.type == PluginFieldType::kCHAR ? lookup(s, f.length, kScoreFuncs, 2) : (int32_t)as_int(f); break;
      case kSelect: p.select = f.type == PluginFieldType::kCHAR ? lookup(s, f.length, kSelects, 2) : (int32_t)as_int(f); break;
      case kNormalize: p.normalize = (int32_t)as_int(f); break;
      case kScale: p.scale = as_float(f); break;
      case kNGroup: p.n_group = (int32_t)as_int(f); break;
      case kTopkGroup: p.topk_group = (int32_t)as_int(f); break;
      case kGroupScoreTopk: p.group_score_topk = (int32_t)as_int(f); break;
      default: break;  // unknown fields (plugin_version, ...) are ignored
    }
  }
  if (p.max_experts == 0) p.max_experts = p.k;
  if (p.topk_group == 0) p.topk_group = p.n_group;
  return moe::validate(p) == nullptr && p.num_experts <= MOE_CUDA_MAX_EXPERTS;
}

class DynamicRouterPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild,
                            public IPluginV3OneRuntime {
 public:
  explicit DynamicRouterPlugin(moe::Params const& p) : p_(p) { make_fields(); }
  DynamicRouterPlugin(DynamicRouterPlugin const& o) : p_(o.p_), ns_(o.ns_), has_bias_(o.has_bias_) { make_fields(); }

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override {
    try { return new DynamicRouterPlugin(*this); } catch (...) { return nullptr; }
  }

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return kName; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return ns_.c_str(); }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return 2; }
  int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t nbInputs) const noexcept override {
    if (nbOutputs != 2 || nbInputs < 1) return -1;
    out[0] = in[0];
    out[1] = DataType::kINT64;
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out,
                          int32_t nbOutputs, IExprBuilder& eb) noexcept override {
    if (nbInputs < 1 || nbOutputs != 2 || in[0].nbDims < 1) return -1;
    for (int o = 0; o < 2; ++o) {
      out[o] = in[0];
      out[o].d[in[0].nbDims - 1] = eb.constant(moe::width(p_));
    }
    return 0;
  }
  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (pos == nbInputs + 1) return d.type == DataType::kINT64;  // indices
    bool float_type = d.type == DataType::kFLOAT || d.type == DataType::kHALF || d.type == DataType::kBF16;
    return pos == 0 ? float_type : d.type == io[0].desc.type;  // bias and weights follow the logits
  }
  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t) noexcept override {
    if (nbInputs < 1 || nbInputs > 2) return -1;
    has_bias_ = nbInputs == 2;
    int64_t last = in[0].desc.dims.d[in[0].desc.dims.nbDims - 1];
    return (last == -1 || last == p_.num_experts) ? 0 : -1;
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept override {
    has_bias_ = nbInputs == 2;  // the optional correction bias is the second input
    return in[0].dims.d[in[0].dims.nbDims - 1] == p_.num_experts ? 0 : -1;
  }
  int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    int64_t rows = 1;
    for (int i = 0; i + 1 < inDesc[0].dims.nbDims; ++i) rows *= inDesc[0].dims.d[i];
    int dtype = inDesc[0].type == DataType::kFLOAT ? MOE_DTYPE_F32
              : inDesc[0].type == DataType::kHALF ? MOE_DTYPE_F16 : MOE_DTYPE_BF16;
    void const* bias = has_bias_ ? inputs[1] : nullptr;
    return moe_dynamic_router_cuda(&p_, dtype, inputs[0], bias, outputs[0], static_cast<int64_t*>(outputs[1]),
                                   rows, stream) == 0 ? 0 : -1;
  }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &fc_; }

  void set_namespace(char const* ns) { ns_ = ns ? ns : ""; }

 private:
  void make_fields() {
    // Strings serialize as their names so engines stay readable across plugin versions.
    fields_.clear();
    auto i32 = [&](Field f, int32_t const* v) { fields_.emplace_back(kFieldNames[f], v, PluginFieldType::kINT32, 1); };
    auto f32 = [&](Field f, float const* v) { fields_.emplace_back(kFieldNames[f], v, PluginFieldType::kFLOAT32, 1); };
    auto str = [&](Field f, char const* s) {
      fields_.emplace_back(kFieldNames[f], s, PluginFieldType::kCHAR, (int32_t)std::strlen(s) + 1);
    };
    i32(kNumExperts, &p_.num_experts); i32(kK, &p_.k); str(kPolicy, kPolicies[p_.policy]);
    f32(kThreshold, &p_.threshold); i32(kMinExperts, &p_.min_experts); i32(kMaxExperts, &p_.max_experts);
    str(kScoreFunc, kScoreFuncs[p_.score_func]); str(kSelect, kSelects[p_.select]);
    i32(kNormalize, &p_.normalize); f32(kScale, &p_.scale); i32(kNGroup, &p_.n_group);
    i32(kTopkGroup, &p_.topk_group); i32(kGroupScoreTopk, &p_.group_score_topk);
    fc_.nbFields = (int32_t)fields_.size();
    fc_.fields = fields_.data();
  }

  moe::Params p_;
  std::string ns_;
  bool has_bias_ = false;
  std::vector<PluginField> fields_;
  PluginFieldCollection fc_{};
};

class DynamicRouterCreator : public IPluginCreatorV3One {
 public:
  DynamicRouterCreator() {
    for (int i = 0; i < kNumFields; ++i) names_.emplace_back(kFieldNames[i], nullptr, PluginFieldType::kUNKNOWN, 1);
    fc_.nbFields = (int32_t)names_.size();
    fc_.fields = names_.data();
  }
  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    try {
      moe::Params p = default_params();
      if (!parse_fields(fc, p)) return nullptr;  // TensorRT reports the node it could not create
      auto* plugin = new DynamicRouterPlugin(p);
      plugin->set_namespace(ns_.c_str());
      return plugin;
    } catch (...) {
      return nullptr;
    }
  }
  PluginFieldCollection const* getFieldNames() noexcept override { return &fc_; }
  char const* getPluginName() const noexcept override { return kName; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return ns_.c_str(); }

 private:
  std::string ns_;
  std::vector<PluginField> names_;
  PluginFieldCollection fc_{};
};

}  // namespace

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static DynamicRouterCreator creator;
  static IPluginCreatorInterface* const creators[] = {&creator};
  nbCreators = 1;
  return creators;
}
