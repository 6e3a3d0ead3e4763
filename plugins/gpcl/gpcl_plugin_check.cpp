// Host check of the GPCL TensorRT plugin's build-time logic, without TensorRT's library or a
// GPU: creates plugins through the creator, round-trips the serialised fields, and asks the
// build capability about types, formats and shapes the way the builder does. Prints one line
// per check and exits non-zero on the first failure.
//
//   g++ -std=c++17 -isystem $TENSORRT_INCLUDE -I$CUDA/include gpcl_plugin_check.cpp gpcl_plugin.cpp
//       gpcl_kernel.o -L$CUDA/lib64 -lcudart       (gpcl_trt.plugins.native.build_plugin_check)
#include "gpcl_plugin.h"

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>

using namespace nvinfer1;

// The plugin only calls getPluginRegistry() when GPCL_TRT_REGISTER_ON_LOAD=1, which this
// program never sets; define it so the check links without libnvinfer.
extern "C" IPluginRegistry* getPluginRegistry() noexcept
{
    return nullptr;
}

namespace
{

int gFailures = 0;

void check(bool ok, char const* what)
{
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what);
    gFailures += ok ? 0 : 1;
}

std::unique_ptr<IPluginV3> make(gpcl::GpclPluginCreator& creator, char const* mode, float tau, float eps)
{
    PluginField fields[] = {PluginField("mode", mode, PluginFieldType::kCHAR, static_cast<int32_t>(std::strlen(mode))),
        PluginField("tau", &tau, PluginFieldType::kFLOAT32, 1), PluginField("eps", &eps, PluginFieldType::kFLOAT32, 1)};
    PluginFieldCollection fc{3, fields};
    return std::unique_ptr<IPluginV3>(creator.createPlugin("gpcl/check", &fc, TensorRTPhase::kBUILD));
}

DynamicPluginTensorDesc desc(DataType type, Dims dims, TensorFormat format = TensorFormat::kLINEAR)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = format;
    d.desc.dims = dims;
    d.min = d.opt = d.max = dims;
    return d;
}

Dims dims2(int64_t a, int64_t b)
{
    Dims d{};
    d.nbDims = 2;
    d.d[0] = a;
    d.d[1] = b;
    return d;
}

Dims dims1(int64_t a)
{
    Dims d{};
    d.nbDims = 1;
    d.d[0] = a;
    return d;
}

} // namespace

int main()
{
    gpcl::GpclPluginCreator creator;
    check(std::string(creator.getPluginName()) == "GPCL" && std::string(creator.getPluginVersion()) == "1"
            && std::string(creator.getPluginNamespace()) == "gpcl",
        "creator identity GPCL/1/gpcl");
    check(creator.getFieldNames()->nbFields == 3, "creator declares mode, tau, eps");

    check(make(creator, "tanh", 1.0f, 1e-6f) == nullptr, "unknown mode refused");
    check(make(creator, "clamp", 0.0f, 1e-6f) == nullptr, "tau <= 0 refused");
    check(make(creator, "clamp", 1.0f, -1.0f) == nullptr, "eps <= 0 refused");

    auto plugin = make(creator, "hopf", 2.5f, 1e-3f);
    check(plugin != nullptr, "hopf plugin created");
    if (!plugin)
        return 1;
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core && build && runtime, "core, build and runtime capabilities");
    check(std::string(core->getPluginName()) == "GPCL" && std::string(core->getPluginNamespace()) == "gpcl",
        "plugin identity");

    // Serialisation round trip: the fields rebuild an identical plugin.
    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    std::unique_ptr<IPluginV3> again(creator.createPlugin("gpcl/again", saved, TensorRTPhase::kRUNTIME));
    check(again != nullptr, "plugin recreated from its serialised fields");
    if (again)
    {
        auto* rt2 = static_cast<IPluginV3OneRuntime*>(again->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        PluginFieldCollection const* saved2 = rt2->getFieldsToSerialize();
        bool same = saved2->nbFields == saved->nbFields;
        for (int32_t i = 0; same && i < saved->nbFields; ++i)
        {
            PluginField const &a = saved->fields[i], &b = saved2->fields[i];
            same = std::strcmp(a.name, b.name) == 0 && a.type == b.type && a.length == b.length
                && std::memcmp(a.data, b.data, static_cast<size_t>(a.length) * (a.type == PluginFieldType::kCHAR ? 1 : 4)) == 0;
        }
        check(same, "round-tripped fields identical (mode hopf, tau 2.5, eps 1e-3)");
        check(std::string(static_cast<char const*>(saved->fields[0].data)) == "hopf"
                && *static_cast<float const*>(saved->fields[1].data) == 2.5f,
            "serialised values");
    }
    std::unique_ptr<IPluginV3> cloned(plugin->clone());
    check(cloned != nullptr, "clone");

    // Types and formats, as the builder asks: X in f32/f16/bf16 linear, tau f32, Y = X's type.
    check(build->getNbOutputs() == 1, "one output");
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16})
    {
        DataType out{};
        check(build->getOutputDataTypes(&out, 1, &t, 1) == 0 && out == t, "output type = input type");
        DynamicPluginTensorDesc io[3] = {desc(t, dims2(-1, 8)), desc(DataType::kFLOAT, dims1(2)), desc(t, dims2(-1, 8))};
        check(build->supportsFormatCombination(0, io, 2, 1) && build->supportsFormatCombination(1, io, 2, 1)
                && build->supportsFormatCombination(2, io, 2, 1),
            "linear X / float32 tau / Y of X's type supported");
        io[2].desc.type = t == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
        check(!build->supportsFormatCombination(2, io, 2, 1), "Y of another type refused");
    }
    DynamicPluginTensorDesc intIn[2] = {desc(DataType::kINT32, dims2(4, 8)), desc(DataType::kINT32, dims2(4, 8))};
    check(!build->supportsFormatCombination(0, intIn, 1, 1), "int32 X refused");
    DynamicPluginTensorDesc chw[2] = {desc(DataType::kHALF, dims2(4, 8), TensorFormat::kCHW2), desc(DataType::kHALF, dims2(4, 8))};
    check(!build->supportsFormatCombination(0, chw, 1, 1), "non-linear format refused");
    DynamicPluginTensorDesc halfTau[3] = {desc(DataType::kHALF, dims2(4, 8)), desc(DataType::kHALF, dims1(2)), desc(DataType::kHALF, dims2(4, 8))};
    check(!build->supportsFormatCombination(1, halfTau, 2, 1), "float16 tau refused");

    // Shapes: D % 4 and the tau length are checked when TensorRT configures the plugin.
    DynamicPluginTensorDesc ok2[2] = {desc(DataType::kFLOAT, dims2(-1, 8)), desc(DataType::kFLOAT, dims1(2))};
    DynamicPluginTensorDesc out1[1] = {desc(DataType::kFLOAT, dims2(-1, 8))};
    check(build->configurePlugin(ok2, 2, out1, 1) == 0, "configure X[-1,8] + tau[2]");
    DynamicPluginTensorDesc scalarTau[2] = {desc(DataType::kFLOAT, dims2(-1, 8)), desc(DataType::kFLOAT, Dims{})};
    check(build->configurePlugin(scalarTau, 2, out1, 1) == 0, "configure X[-1,8] + scalar tau");
    DynamicPluginTensorDesc badTau[2] = {desc(DataType::kFLOAT, dims2(-1, 8)), desc(DataType::kFLOAT, dims1(3))};
    check(build->configurePlugin(badTau, 2, out1, 1) != 0, "tau[3] for D/4 = 2 refused");
    DynamicPluginTensorDesc badD[1] = {desc(DataType::kFLOAT, dims2(-1, 6))};
    check(build->configurePlugin(badD, 1, out1, 1) != 0, "D = 6 refused");
    PluginTensorDesc rtIn[2] = {ok2[0].desc, ok2[1].desc};
    rtIn[0].dims = dims2(3, 8);
    PluginTensorDesc rtOut[1] = {rtIn[0]};
    check(runtime->onShapeChange(rtIn, 2, rtOut, 1) == 0, "onShapeChange X[3,8] + tau[2]");
    rtIn[0].dims = dims2(3, 10);
    check(runtime->onShapeChange(rtIn, 1, rtOut, 1) != 0, "onShapeChange D = 10 refused");

    std::printf("%d failure(s)\n", gFailures);
    return gFailures == 0 ? 0 : 1;
}
