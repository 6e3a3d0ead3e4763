// TensorRT IPluginV3 for GPCL: name "GPCL", version "1", namespace "gpcl" (TensorRT's ONNX
// parser takes the plugin namespace from the node domain, so gpcl::GPCL nodes map onto it).
// Fields: mode (string: clamp|soft|hopf), tau (float32), eps (float32); optional second input
// tau (float32 [] or [D/4]); linear float32/float16/bfloat16, output type = input type.
#pragma once

#include "NvInferRuntime.h"

#include <string>
#include <vector>

namespace gpcl
{

constexpr char const* kPluginName = "GPCL";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "gpcl";

// The identity getters shared by the plugin (IPluginV3OneCore) and its creator.
template <typename Base>
class WithGpclIdentity : public Base
{
public:
    char const* getPluginName() const noexcept override { return kPluginName; }
    char const* getPluginVersion() const noexcept override { return kPluginVersion; }
    char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
};

struct GpclParams
{
    int mode{0}; // gpcl::Mode
    float tau{1.0f};
    float eps{1e-6f};
};

class GpclPlugin : public nvinfer1::IPluginV3,
                   public WithGpclIdentity<nvinfer1::IPluginV3OneCore>,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit GpclPlugin(GpclParams const& params);
    ~GpclPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
        nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs,
        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    GpclParams mParams;
    bool mHasTau{false};   // second input present (set by configurePlugin/onShapeChange)
    int64_t mTauCount{0};  // its element count: 1 (scalar) or D/4
    std::string mModeName; // kept alive for getFieldsToSerialize
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class GpclPluginCreator : public WithGpclIdentity<nvinfer1::IPluginCreatorV3One>
{
public:
    GpclPluginCreator();
    ~GpclPluginCreator() override = default;

    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFieldNames;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

// Parses the plugin fields (as written by the ONNX parser or getFieldsToSerialize); returns
// false with a message for an unknown mode, tau <= 0 or eps <= 0.
bool parseFields(nvinfer1::PluginFieldCollection const* fc, GpclParams& params, std::string& error);

} // namespace gpcl
