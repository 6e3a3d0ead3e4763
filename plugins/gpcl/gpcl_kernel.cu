// GPCL CUDA kernel: one quaternion group per thread, float32 math (gpcl_math.h), grid-stride,
// 16-byte (float32) / 8-byte (float16, bfloat16) vector loads when x and y are aligned to a
// whole group, scalar loads otherwise. Memory-bound: one read and one write of the tensor.
#include "gpcl_kernel.h"
#include "gpcl_math.h"

#include <cuda_runtime.h>

#include <string.h>

// Resident 256-thread blocks per SM the register budget is set for: a full SM (2048 threads)
// on sm_80/90, 1536 threads on sm_86/87/89/120.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890 || __CUDA_ARCH__ >= 1200)
#define GPCL_MIN_BLOCKS 6
#else
#define GPCL_MIN_BLOCKS 8
#endif

namespace
{

// A whole group in one load: float4 for float32, uint2 (4 x 16 bit) for float16/bfloat16.
template <typename T>
struct GroupVec
{
    using type = uint2;
};
template <>
struct GroupVec<float>
{
    using type = float4;
};

template <typename I>
__device__ __forceinline__ float groupTau(float const* __restrict__ tau, float tauScalar, I g, I gpr)
{
    return tau ? __ldg(tau + g % gpr) : tauScalar;
}

// Independent group loads in flight per thread (memory-level parallelism): 32 bytes either way,
// which also keeps the 32-bit-index kernels inside 32 registers without spilling.
template <typename T>
constexpr int kUnroll = sizeof(typename GroupVec<T>::type) == 16 ? 2 : 4;

// I is the index type: 32-bit when every element index fits (64-bit division/modulo is many
// instructions). Each thread handles groups g, g + stride, g + 2*stride, ... (coalesced), with
// kUnroll<T> loads issued before any math.
template <typename T, typename I>
// x and y are not __restrict__: in-place calls (x == y) are allowed.
__global__ void __launch_bounds__(256, GPCL_MIN_BLOCKS) gpclVector(typename GroupVec<T>::type const* x,
    typename GroupVec<T>::type* y, I n, I gpr, float const* __restrict__ tau, float tauScalar,
    float eps, int mode)
{
    using V = typename GroupVec<T>::type;
    I const stride = static_cast<I>(gridDim.x) * blockDim.x;
    for (I base = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; base < n; base += kUnroll<T> * stride)
    {
        V v[kUnroll<T>];
#pragma unroll
        for (int k = 0; k < kUnroll<T>; ++k)
        {
            I const g = base + k * stride;
            if (g < n)
                v[k] = x[g];
        }
#pragma unroll
        for (int k = 0; k < kUnroll<T>; ++k)
        {
            I const g = base + k * stride;
            if (g < n)
            {
                T e[4];
                memcpy(e, &v[k], sizeof(V)); // register reinterpretation; compiles to nothing
                gpcl::applyGroup<T>(e, e, groupTau<I>(tau, tauScalar, g, gpr), eps, mode);
                memcpy(&v[k], e, sizeof(V));
                y[g] = v[k];
            }
        }
    }
}

template <typename T, typename I>
__global__ void __launch_bounds__(256, GPCL_MIN_BLOCKS) gpclScalar(
    T const* x, T* y, I n, I gpr, float const* __restrict__ tau, float tauScalar, float eps, int mode)
{
    for (I g = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; g < n;
         g += static_cast<I>(gridDim.x) * blockDim.x)
    {
        T e[4] = {x[4 * g], x[4 * g + 1], x[4 * g + 2], x[4 * g + 3]}; // read all before writing (x == y)
        gpcl::applyGroup<T>(e, e, groupTau<I>(tau, tauScalar, g, gpr), eps, mode);
        y[4 * g] = e[0], y[4 * g + 1] = e[1], y[4 * g + 2] = e[2], y[4 * g + 3] = e[3];
    }
}

constexpr int kThreads = 256;

// Enough resident blocks to fill the device; the grid-stride loop covers the rest. The SM
// count is cached per device (an attribute query, no synchronisation).
unsigned gridFor(int64_t n)
{
    static int smCount[64] = {};
    int dev = 0;
    int sms = 132;
    if (cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < 64)
    {
        if (smCount[dev] == 0)
            cudaDeviceGetAttribute(&smCount[dev], cudaDevAttrMultiProcessorCount, dev);
        if (smCount[dev] > 0)
            sms = smCount[dev];
    }
    int64_t const needed = (n + kThreads - 1) / kThreads;
    int64_t const cap = static_cast<int64_t>(sms) * 8; // up to a full SM of 256-thread blocks
    return static_cast<unsigned>(needed < cap ? needed : cap);
}

template <typename T, typename I>
void launch(void const* x, void* y, I n, I gpr, float const* tau, float tauScalar, float eps, int mode,
    cudaStream_t stream)
{
    using V = typename GroupVec<T>::type;
    unsigned const grid = gridFor(static_cast<int64_t>(n));
    bool const aligned
        = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) % sizeof(V)) == 0;
    if (aligned)
        gpclVector<T, I><<<grid, kThreads, 0, stream>>>(
            static_cast<V const*>(x), static_cast<V*>(y), n, gpr, tau, tauScalar, eps, mode);
    else
        gpclScalar<T, I><<<grid, kThreads, 0, stream>>>(
            static_cast<T const*>(x), static_cast<T*>(y), n, gpr, tau, tauScalar, eps, mode);
}

template <typename T>
void dispatchIndex(void const* x, void* y, int64_t n, int64_t gpr, float const* tau, float tauScalar, float eps,
    int mode, cudaStream_t stream)
{
    // Element indices (4 * group) and the unrolled grid-stride index, which may run
    // kUnroll strides past n, must all stay inside 32 bits for the 32-bit path.
    int64_t const stride = static_cast<int64_t>(gridFor(n)) * kThreads;
    if (4 * (n + kUnroll<T> * stride) < (int64_t{1} << 32))
        launch<T, uint32_t>(x, y, static_cast<uint32_t>(n), static_cast<uint32_t>(gpr), tau, tauScalar, eps, mode,
            stream);
    else
        launch<T, uint64_t>(x, y, static_cast<uint64_t>(n), static_cast<uint64_t>(gpr), tau, tauScalar, eps, mode,
            stream);
}

} // namespace

extern "C" int gpcl_forward(void const* x, void* y, int64_t n_groups, int64_t groups_per_row,
    float const* tau_ptr, float tau_scalar, float eps, int mode, int dtype, gpcl_stream_t stream)
{
    if (n_groups < 0 || mode < gpcl::kClamp || mode > gpcl::kHopf || !(eps > 0.0f))
        return GPCL_ERR_ARGUMENT;
    if (tau_ptr ? groups_per_row < 1 : !(tau_scalar > 0.0f))
        return GPCL_ERR_ARGUMENT;
    if (n_groups == 0)
        return GPCL_OK;
    if (!x || !y)
        return GPCL_ERR_ARGUMENT;
    int64_t const gpr = tau_ptr ? groups_per_row : 1;
    cudaStream_t const s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype)
    {
    case gpcl::kFloat32: dispatchIndex<float>(x, y, n_groups, gpr, tau_ptr, tau_scalar, eps, mode, s); break;
    case gpcl::kFloat16: dispatchIndex<__half>(x, y, n_groups, gpr, tau_ptr, tau_scalar, eps, mode, s); break;
    case gpcl::kBFloat16: dispatchIndex<__nv_bfloat16>(x, y, n_groups, gpr, tau_ptr, tau_scalar, eps, mode, s); break;
    default: return GPCL_ERR_ARGUMENT;
    }
    return cudaGetLastError() == cudaSuccess ? GPCL_OK : GPCL_ERR_LAUNCH;
}

extern "C" char const* gpcl_error_string(int code)
{
    switch (code)
    {
    case GPCL_OK: return "ok";
    case GPCL_ERR_ARGUMENT: return "invalid argument (mode, dtype, size, tau, eps or null pointer)";
    case GPCL_ERR_LAUNCH: return "CUDA kernel launch failed";
    default: return "unknown GPCL error code";
    }
}

extern "C" int gpcl_abi_version(void)
{
    return 1;
}
