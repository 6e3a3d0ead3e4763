// TensorRT IPluginV3 glue around the GPCL kernel (gpcl_kernel.h). The plugin only validates
// shapes/types and forwards to gpcl_forward on TensorRT's stream; the math lives in
// gpcl_math.h. Library entry points: getCreators + setLoggerFinder (IPluginRegistry::loadLibrary,
// trtexec --dynamicPlugins, --setPluginsToSerialize); with GPCL_TRT_REGISTER_ON_LOAD=1 the
// library also registers itself when loaded (LD_PRELOAD, Triton's plugin loading), which
// stays opt-in because loadLibrary refuses a library whose plugins are already registered.
#include "gpcl_plugin.h"

#include "gpcl_kernel.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>

using namespace nvinfer1;

namespace
{

ILoggerFinder* gLoggerFinder{nullptr};
std::mutex gLoggerMutex;

void logError(std::string const& msg) noexcept
{
    std::string const line = std::string("GPCL plugin: ") + msg;
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    if (logger)
        logger->log(ILogger::Severity::kERROR, line.c_str());
    else
        std::fprintf(stderr, "%s\n", line.c_str());
}

char const* const kModeNames[] = {"clamp", "soft", "hopf"};

int dtypeCode(DataType t) noexcept
{
    switch (t)
    {
    case DataType::kFLOAT: return 0;
    case DataType::kHALF: return 1;
    case DataType::kBF16: return 2;
    default: return -1;
    }
}

int64_t volume(Dims const& d) noexcept
{
    int64_t v = 1;
    for (int32_t i = 0; i < d.nbDims; ++i)
        v *= d.d[i];
    return v;
}

// Shapes TensorRT reports (-1 = not known yet) against the op contract; "" when valid.
std::string checkShapes(Dims const& x, Dims const* tau) noexcept
{
    if (x.nbDims < 1)
        return "input X must have rank >= 1";
    int64_t const d = x.d[x.nbDims - 1];
    if (d >= 0 && d % 4 != 0)
        return "the last axis of X must be a multiple of 4, got " + std::to_string(d);
    if (tau && d >= 0)
    {
        int64_t const n = volume(*tau);
        bool const known = n >= 0 && tau->nbDims <= 1;
        if (known && n != 1 && n != d / 4)
            return "tau must be a scalar or have D/4 = " + std::to_string(d / 4) + " elements, got "
                + std::to_string(n);
        if (tau->nbDims > 1)
            return "tau must have rank 0 or 1";
    }
    return "";
}

} // namespace

namespace gpcl
{

bool parseFields(PluginFieldCollection const* fc, GpclParams& params, std::string& error)
{
    for (int32_t i = 0; fc && i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        if (!f.name || !f.data)
            continue;
        std::string const name(f.name);
        if (name == "mode" && f.type == PluginFieldType::kCHAR)
        {
            std::string mode(static_cast<char const*>(f.data), static_cast<size_t>(f.length));
            mode = mode.substr(0, mode.find('\0')); // length may or may not count the NUL
            int found = -1;
            for (int m = 0; m < 3; ++m)
                if (mode == kModeNames[m])
                    found = m;
            if (found < 0)
            {
                error = "mode must be clamp, soft or hopf, got '" + mode + "'";
                return false;
            }
            params.mode = found;
        }
        else if ((name == "tau" || name == "eps") && f.type == PluginFieldType::kFLOAT32 && f.length >= 1)
            (name == "tau" ? params.tau : params.eps) = *static_cast<float const*>(f.data);
        else if ((name == "tau" || name == "eps") && f.type == PluginFieldType::kFLOAT64 && f.length >= 1)
            (name == "tau" ? params.tau : params.eps) = static_cast<float>(*static_cast<double const*>(f.data));
    }
    if (!(params.tau > 0.0f) || !(params.eps > 0.0f))
    {
        error = "tau and eps must be > 0";
        return false;
    }
    return true;
}

GpclPlugin::GpclPlugin(GpclParams const& params)
    : mParams(params)
    , mModeName(kModeNames[params.mode])
{
    mFields = {PluginField("mode", mModeName.c_str(), PluginFieldType::kCHAR, static_cast<int32_t>(mModeName.size() + 1)),
        PluginField("tau", &mParams.tau, PluginFieldType::kFLOAT32, 1),
        PluginField("eps", &mParams.eps, PluginFieldType::kFLOAT32, 1)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginCapability* GpclPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* GpclPlugin::clone() noexcept
{
    try
    {
        auto* plugin = new GpclPlugin(mParams);
        plugin->mHasTau = mHasTau;
        plugin->mTauCount = mTauCount;
        return plugin;
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return nullptr;
    }
}

int32_t GpclPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs < 1 || nbInputs > 2 || nbOutputs != 1)
    {
        logError("expects 1 or 2 inputs (X[, tau]) and 1 output");
        return -1;
    }
    std::string const error = checkShapes(in[0].desc.dims, nbInputs == 2 ? &in[1].desc.dims : nullptr);
    if (!error.empty())
    {
        logError(error);
        return -1;
    }
    mHasTau = nbInputs == 2;
    mTauCount = mHasTau ? volume(in[1].desc.dims) : 0;
    return out[0].desc.type == in[0].desc.type ? 0 : -1;
}

int32_t GpclPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 1 || nbInputs < 1)
        return -1;
    outputTypes[0] = inputTypes[0]; // Y has X's type
    return 0;
}

int32_t GpclPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const* /*shapeInputs*/,
    int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs < 1 || nbOutputs != 1 || inputs[0].nbDims < 1)
        return -1;
    IDimensionExpr const* last = inputs[0].d[inputs[0].nbDims - 1];
    if (last->isConstant() && last->getConstantValue() % 4 != 0)
    {
        logError("the last axis of X must be a multiple of 4, got " + std::to_string(last->getConstantValue()));
        return -1;
    }
    outputs[0] = inputs[0]; // shape-preserving
    return 0;
}

bool GpclPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t /*nbOutputs*/) noexcept
{
    PluginTensorDesc const& d = inOut[pos].desc;
    if (d.format != TensorFormat::kLINEAR)
        return false;
    if (pos == 0)
        return dtypeCode(d.type) >= 0;
    if (pos < nbInputs) // tau
        return d.type == DataType::kFLOAT;
    return d.type == inOut[0].desc.type; // Y
}

int32_t GpclPlugin::getNbOutputs() const noexcept
{
    return 1;
}

int32_t GpclPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* /*out*/, int32_t nbOutputs) noexcept
{
    if (nbInputs < 1 || nbInputs > 2 || nbOutputs != 1)
        return -1;
    std::string const error = checkShapes(in[0].dims, nbInputs == 2 ? &in[1].dims : nullptr);
    if (!error.empty())
    {
        logError(error);
        return -1;
    }
    mHasTau = nbInputs == 2;
    mTauCount = mHasTau ? volume(in[1].dims) : 0;
    return 0;
}

int32_t GpclPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* /*workspace*/, cudaStream_t stream) noexcept
{
    Dims const& dims = inputDesc[0].dims;
    int64_t const d = dims.d[dims.nbDims - 1];
    int64_t const nGroups = volume(dims) / 4;
    float const* tau = mHasTau ? static_cast<float const*>(inputs[1]) : nullptr;
    int64_t const groupsPerRow = mHasTau && mTauCount > 1 ? d / 4 : 1;
    int const rc = gpcl_forward(inputs[0], outputs[0], nGroups, groupsPerRow, tau, mParams.tau, mParams.eps,
        mParams.mode, dtypeCode(inputDesc[0].type), reinterpret_cast<gpcl_stream_t>(stream));
    if (rc != GPCL_OK)
    {
        logError(gpcl_error_string(rc));
        return -1;
    }
    return 0;
}

IPluginV3* GpclPlugin::attachToContext(IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

PluginFieldCollection const* GpclPlugin::getFieldsToSerialize() noexcept
{
    return &mFieldCollection;
}

GpclPluginCreator::GpclPluginCreator()
{
    mFieldNames = {PluginField("mode", nullptr, PluginFieldType::kCHAR, 0),
        PluginField("tau", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("eps", nullptr, PluginFieldType::kFLOAT32, 1)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
    mFieldCollection.fields = mFieldNames.data();
}

PluginFieldCollection const* GpclPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* GpclPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, TensorRTPhase /*phase*/) noexcept
{
    try
    {
        GpclParams params;
        std::string error;
        if (!parseFields(fc, params, error))
        {
            logError(error);
            return nullptr;
        }
        return new GpclPlugin(params);
    }
    catch (std::exception const& e)
    {
        logError(e.what());
        return nullptr;
    }
}

} // namespace gpcl

namespace
{

gpcl::GpclPluginCreator gCreator;
IPluginCreatorInterface* const gCreators[] = {&gCreator};

// Opt-in self-registration at load time (see the file comment).
struct RegisterOnLoad
{
    RegisterOnLoad()
    {
        char const* env = std::getenv("GPCL_TRT_REGISTER_ON_LOAD");
        if (env && std::strcmp(env, "1") == 0 && !getPluginRegistry()->registerCreator(gCreator, gpcl::kPluginNamespace))
            logError("could not register the GPCL creator (already registered?)");
    }
} gRegisterOnLoad;

} // namespace

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    nbCreators = 1;
    return gCreators;
}
