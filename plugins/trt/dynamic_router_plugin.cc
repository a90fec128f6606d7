// TensorRT IPluginV3 for moe_export::DynamicRouter. The plugin is named like the ONNX node, so
// TensorRT's ONNX parser maps each DynamicRouter node to it and its attributes to plugin fields.
// The kernel is the CUDA entry point in plugins/cuda (the same routing core as the CPU kernel).
#include <NvInferRuntime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "../cuda/dynamic_router_cuda.h"

using namespace nvinfer1;

namespace {

constexpr char const* kName = "DynamicRouter";
constexpr char const* kVersion = "1";

// Plugin fields are the ONNX attributes (MOE_ROUTER_ATTRS, generated from moe_export/schema.py),
// in that order for serialization and getFieldNames().
#define MOE_FIELD_NAME(name, type, dflt, names, n) #name,
char const* const kFieldNames[] = {MOE_ROUTER_ATTRS(MOE_FIELD_NAME)};
#undef MOE_FIELD_NAME
constexpr int kNumFields = sizeof(kFieldNames) / sizeof(kFieldNames[0]);

int64_t as_int(PluginField const& f) {
  switch (f.type) {
    case PluginFieldType::kINT32: return *static_cast<int32_t const*>(f.data);
    case PluginFieldType::kINT64: return *static_cast<int64_t const*>(f.data);
    case PluginFieldType::kINT8: return *static_cast<int8_t const*>(f.data);
    case PluginFieldType::kFLOAT32: return (int64_t)*static_cast<float const*>(f.data);
    default: return -1;
  }
}

// One reader per C type of MOE_ROUTER_ATTRS. A string attribute arrives as its name (kCHAR, how
// the ONNX parser passes strings) or as its code.
void read_field(PluginField const& f, int32_t& out, char const* const* names, int n) {
  if (names && f.type == PluginFieldType::kCHAR) {
    char const* s = static_cast<char const*>(f.data);
    std::string v(s, f.length > 0 && s[f.length - 1] == '\0' ? f.length - 1 : f.length);
    out = -1;
    for (int i = 0; i < n; ++i)
      if (v == names[i]) out = i;
    return;
  }
  out = (int32_t)as_int(f);
}
void read_field(PluginField const& f, float& out, char const* const*, int) {
  switch (f.type) {
    case PluginFieldType::kFLOAT32: out = *static_cast<float const*>(f.data); break;
    case PluginFieldType::kFLOAT64: out = (float)*static_cast<double const*>(f.data); break;
    case PluginFieldType::kINT32: out = (float)*static_cast<int32_t const*>(f.data); break;
    case PluginFieldType::kINT64: out = (float)*static_cast<int64_t const*>(f.data); break;
    default: out = NAN;
  }
}

// Returns nullptr, or why the fields do not describe a router this plugin can run.
char const* parse_fields(PluginFieldCollection const* fc, moe::Params& p) {
  for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (!f.name || !f.data) continue;  // unknown fields (plugin_version, ...) match nothing below
#define MOE_PARSE_FIELD(attr, type, dflt, names, n) \
    if (!std::strcmp(f.name, #attr)) read_field(f, p.attr, names, n);
    MOE_ROUTER_ATTRS(MOE_PARSE_FIELD)
#undef MOE_PARSE_FIELD
  }
  moe::resolve_zero_defaults(p);
  if (char const* err = moe::validate(p)) return err;
  if (p.num_experts > MOE_CUDA_MAX_EXPERTS) return "num_experts exceeds what the CUDA kernel supports (512)";
  return nullptr;
}

class DynamicRouterPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild,
                            public IPluginV3OneRuntime {
 public:
  explicit DynamicRouterPlugin(moe::Params const& p) : p_(p) { make_fields(); }
  DynamicRouterPlugin(DynamicRouterPlugin const& o) : p_(o.p_), ns_(o.ns_), nb_inputs_(o.nb_inputs_) { make_fields(); }

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
    return pos == 0 ? float_type : d.type == io[0].desc.type;  // bias, sizes and weights follow the logits
  }
  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t) noexcept override {
    // (logits[, bias[, sizes]]); policy probe reads sizes
    if (nbInputs < (p_.policy == moe::kProbe ? 3 : 1) || nbInputs > 3) return -1;
    nb_inputs_ = nbInputs;
    int64_t last = in[0].desc.dims.d[in[0].desc.dims.nbDims - 1];
    return (last == -1 || last == p_.num_experts) ? 0 : -1;
  }

  // IPluginV3OneRuntime
  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept override {
    nb_inputs_ = nbInputs;
    if (nbInputs == 3) {
      Dims const &x = in[0].dims, &sz = in[2].dims;
      if (sz.nbDims != x.nbDims || !std::equal(x.d, x.d + x.nbDims, sz.d)) return -1;  // sizes: the logits' shape
    }
    return in[0].dims.d[in[0].dims.nbDims - 1] == p_.num_experts ? 0 : -1;
  }
  int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void*, cudaStream_t stream) noexcept override {
    int64_t rows = 1;
    for (int i = 0; i + 1 < inDesc[0].dims.nbDims; ++i) rows *= inDesc[0].dims.d[i];
    int dtype = inDesc[0].type == DataType::kFLOAT ? MOE_DTYPE_F32
              : inDesc[0].type == DataType::kHALF ? MOE_DTYPE_F16 : MOE_DTYPE_BF16;
    void const* bias = nb_inputs_ > 1 ? inputs[1] : nullptr;
    void const* sizes = nb_inputs_ > 2 ? inputs[2] : nullptr;
    return moe_dynamic_router_cuda(&p_, dtype, inputs[0], bias, sizes, outputs[0],
                                   static_cast<int64_t*>(outputs[1]), rows, stream) == 0 ? 0 : -1;
  }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &fc_; }

  void set_namespace(char const* ns) { ns_ = ns ? ns : ""; }

 private:
  void make_fields() {
    // Strings serialize as their names so engines stay readable across plugin versions.
    fields_.clear();
#define MOE_MAKE_FIELD(name, type, dflt, names, n) add_field(#name, p_.name, names);
    MOE_ROUTER_ATTRS(MOE_MAKE_FIELD)
#undef MOE_MAKE_FIELD
    fc_.nbFields = (int32_t)fields_.size();
    fc_.fields = fields_.data();
  }
  void add_field(char const* name, int32_t const& v, char const* const* names) {
    if (names) {
      fields_.emplace_back(name, names[v], PluginFieldType::kCHAR, (int32_t)std::strlen(names[v]) + 1);
    } else {
      fields_.emplace_back(name, &v, PluginFieldType::kINT32, 1);
    }
  }
  void add_field(char const* name, float const& v, char const* const*) {
    fields_.emplace_back(name, &v, PluginFieldType::kFLOAT32, 1);
  }

  moe::Params p_;
  std::string ns_;
  int32_t nb_inputs_ = 1;  // logits[, bias[, sizes]]
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
      moe::Params p = moe::default_params();
      if (char const* err = parse_fields(fc, p)) {
        // TensorRT then reports the node it could not create; this says why.
        std::fprintf(stderr, "[E] [moe_export] DynamicRouter plugin: %s\n", err);
        return nullptr;
      }
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
