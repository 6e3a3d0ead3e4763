// GPCL CUDA kernel: float32 math (gpcl_math.h), memory-bound (one read and one write of the
// tensor). Three paths, picked per call from the pointers' alignment:
//   - fast path (x and y 16-byte aligned): one 16-byte load per vector, a vector being one
//     float32 group or two float16/bfloat16 groups (an odd last 16-bit group is done by one
//     thread with an 8-byte access); kUnroll vectors in flight per thread, one chunk of them per
//     block (no grid cap, see GPCL_GRID_WAVES); the mode and the tau kind (one tau for all
//     groups, or per group) are template parameters, so no per-group branch on them and no
//     per-group tau modulo unless tau really varies;
//   - 16-bit types 8-byte aligned (a view starting on an odd group): one 8-byte group load,
//     runtime mode (gpclVector8);
//   - anything else: scalar loads (gpclScalar).
// clamp has an exact inside-the-ball fast path: when the sum of squares is below t*t by a margin
// that covers its rounding, the reference multiplies by exactly 1 (t / max(r, t) == t / t), so the
// group is stored unchanged without the square root and the divide (see insideBallBound).
#include "gpcl_kernel.h"
#include "gpcl_math.h"

#include <cuda_runtime.h>

#include <string.h>

// Resident 256-thread blocks per SM the register budget is set for: a full SM (2048 threads)
// on sm_80/90, 1536 threads on sm_86/87/89/120.
#ifndef GPCL_MIN_BLOCKS
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890 || __CUDA_ARCH__ >= 1200)
#define GPCL_MIN_BLOCKS 6
#else
#define GPCL_MIN_BLOCKS 8
#endif
#endif

// Fast path tuning (overridable with -D for benchmarking): 16-byte vectors per thread (all loads
// issued before any math), and the grid cap in waves of 8 blocks per SM, 0 meaning no cap: one
// chunk of GPCL_UNROLL * 256 vectors per block, the block scheduler balancing the tail. Measured
// on an H200 (device time, fraction of a device-to-device copy, 16384 x 4096-8192 tokens):
// uncapped 0.96 (clamp, every dtype) against 0.82-0.88 for a one-wave persistent grid;
// 4 vectors per thread (40 registers, 6 blocks/SM) and streaming cache hints gave nothing more.
#ifndef GPCL_UNROLL
#define GPCL_UNROLL 2
#endif
#ifndef GPCL_GRID_WAVES
#define GPCL_GRID_WAVES 0
#endif

namespace
{

constexpr int kThreads = 256;
constexpr int kUnroll = GPCL_UNROLL;

enum TauKind : int
{
    kTauUniform = 0,  // tau_scalar, or tau_ptr[0] when groups_per_row == 1: read once per thread
    kTauPerGroup = 1, // tau_ptr[g % groups_per_row]
};

// One 16-byte vector of T: a float32 group, or two 16-bit groups.
template <typename T>
struct Vec16
{
    using type = uint4;
    static constexpr int kGroups = 2;
};
template <>
struct Vec16<float>
{
    using type = float4;
    static constexpr int kGroups = 1;
};

// clamp's inside-the-ball bound for tau t: a group whose float32 sum of squares ss (same
// operation order as the reference) satisfies ss <= bound has r = sqrtf(ss) <= t, so the
// reference computes t / max(r, t) = t / t = 1 exactly and y = q * 1 = q (bit for bit, also
// after the 16-bit round trip). Proof: tt = RN(t*t) is normal (the guard), so
// bound = RN(tt * 0.9999f) <= t^2 (1 + 2^-24)^2 0.9999 < t^2; ss <= bound < t^2 gives
// sqrt(ss) < t, hence the correctly rounded sqrtf(ss) <= t. A finite bound also means ss is
// finite, so no NaN/Inf/overflow group takes this path. t <= 0, NaN, Inf or tiny: bound -1,
// nothing takes the fast path (ss >= 0 or NaN).
__device__ __forceinline__ float insideBallBound(float t)
{
    float const tt = t * t;
    return (t > 0.0f && tt >= 1e-30f && tt <= 1e38f) ? tt * 0.9999f : -1.0f;
}

// One group in place in storage type T, mode known at compile time. `bound` is
// insideBallBound(t) (clamp only).
template <int Mode, typename T>
__device__ __forceinline__ void groupInPlace(T* e, float t, float bound, float eps)
{
    float q[4] = {gpcl::toFloat(e[0]), gpcl::toFloat(e[1]), gpcl::toFloat(e[2]), gpcl::toFloat(e[3])};
    if (Mode == gpcl::kClamp && gpcl::sumSquares(q[0], q[1], q[2], q[3]) <= bound)
        return; // exactly the reference's y = q * 1: the stored bits are the result
    gpcl::group(q, t, eps, Mode);
    e[0] = gpcl::fromFloat<T>(q[0]), e[1] = gpcl::fromFloat<T>(q[1]);
    e[2] = gpcl::fromFloat<T>(q[2]), e[3] = gpcl::fromFloat<T>(q[3]);
}

template <int Mode, int Tau, typename I>
__device__ __forceinline__ void groupTauAndBound(
    float const* __restrict__ tau, I m, float tUniform, float boundUniform, float& t, float& bound)
{
    if (Tau == kTauUniform)
    {
        t = tUniform, bound = boundUniform;
    }
    else
    {
        t = __ldg(tau + m);
        bound = Mode == gpcl::kClamp ? insideBallBound(t) : -1.0f;
    }
}

// Fast path. Vector i holds groups G*i .. G*i+G-1 (G = Vec16<T>::kGroups). Blocks walk chunks
// of kUnroll * kThreads vectors (grid-stride over chunks); inside a chunk, thread j handles
// vectors j, j + kThreads, ... (coalesced), all loads issued before any math. I is the index
// type: 32-bit when every index fits (64-bit division is many instructions). x and y are not
// __restrict__: in-place calls (x == y) are allowed (each vector is read before it is written,
// by the same thread). nv vectors, plus `tail` (0 or 1) 16-bit group after them.
template <typename T, int Mode, int Tau, typename I>
__global__ void __launch_bounds__(kThreads, GPCL_MIN_BLOCKS) gpclFast(typename Vec16<T>::type const* x,
    typename Vec16<T>::type* y, I nv, int tail, I gpr, float const* __restrict__ tau, float tauScalar, float eps)
{
    using V = typename Vec16<T>::type;
    constexpr int G = Vec16<T>::kGroups;
    constexpr int kElems = sizeof(V) / sizeof(T);
    float tU = 0.0f, boundU = -1.0f;
    if (Tau == kTauUniform)
    {
        tU = tau ? __ldg(tau) : tauScalar;
        boundU = Mode == gpcl::kClamp ? insideBallBound(tU) : -1.0f;
    }
    constexpr I kChunk = static_cast<I>(kUnroll) * kThreads;
    for (I start = static_cast<I>(blockIdx.x) * kChunk; start < nv; start += static_cast<I>(gridDim.x) * kChunk)
    {
        I const first = start + threadIdx.x;
        V v[kUnroll];
#pragma unroll
        for (int k = 0; k < kUnroll; ++k)
        {
            I const i = first + k * kThreads;
            if (i < nv)
                v[k] = x[i];
        }
#pragma unroll
        for (int k = 0; k < kUnroll; ++k)
        {
            I const i = first + k * kThreads;
            if (i < nv)
            {
                T e[kElems];
                memcpy(e, &v[k], sizeof(V)); // register reinterpretation; compiles to nothing
                I m = 0;
                if (Tau == kTauPerGroup)
                    m = (static_cast<I>(G) * i) % gpr;
#pragma unroll
                for (int j = 0; j < G; ++j)
                {
                    float t, bound;
                    groupTauAndBound<Mode, Tau, I>(tau, m, tU, boundU, t, bound);
                    groupInPlace<Mode, T>(e + 4 * j, t, bound, eps);
                    if (Tau == kTauPerGroup && j + 1 < G)
                        m = m + 1 == gpr ? 0 : m + 1;
                }
                memcpy(&v[k], e, sizeof(V));
                y[i] = v[k];
            }
        }
    }
    if (G > 1 && tail && blockIdx.x == 0 && threadIdx.x == 0)
    {
        // The odd last 16-bit group: 8 bytes at byte offset 16 * nv (8-byte aligned).
        I const g = static_cast<I>(G) * nv;
        uint2 const* x8 = reinterpret_cast<uint2 const*>(x) + g;
        uint2* y8 = reinterpret_cast<uint2*>(y) + g;
        uint2 w = *x8;
        T e[4];
        memcpy(e, &w, sizeof(w));
        float t, bound;
        groupTauAndBound<Mode, Tau, I>(tau, Tau == kTauPerGroup ? g % gpr : I(0), tU, boundU, t, bound);
        groupInPlace<Mode, T>(e, t, bound, eps);
        memcpy(&w, e, sizeof(w));
        *y8 = w;
    }
}

// Fallbacks (rare alignments): runtime mode, one group per thread and iteration, grid-stride.
template <typename I>
__device__ __forceinline__ float groupTau(float const* __restrict__ tau, float tauScalar, I g, I gpr)
{
    return tau ? __ldg(tau + g % gpr) : tauScalar;
}

constexpr int kUnrollFallback = 4;

// 16-bit types, x and y 8-byte aligned but not both 16-byte aligned: one group per 8-byte load.
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads, GPCL_MIN_BLOCKS) gpclVector8(uint2 const* x, uint2* y, I n, I gpr,
    float const* __restrict__ tau, float tauScalar, float eps, int mode)
{
    I const stride = static_cast<I>(gridDim.x) * blockDim.x;
    for (I base = static_cast<I>(blockIdx.x) * blockDim.x + threadIdx.x; base < n;
         base += kUnrollFallback * stride)
    {
        uint2 v[kUnrollFallback];
#pragma unroll
        for (int k = 0; k < kUnrollFallback; ++k)
        {
            I const g = base + k * stride;
            if (g < n)
                v[k] = x[g];
        }
#pragma unroll
        for (int k = 0; k < kUnrollFallback; ++k)
        {
            I const g = base + k * stride;
            if (g < n)
            {
                T e[4];
                memcpy(e, &v[k], sizeof(uint2));
                gpcl::applyGroup<T>(e, e, groupTau<I>(tau, tauScalar, g, gpr), eps, mode);
                memcpy(&v[k], e, sizeof(uint2));
                y[g] = v[k];
            }
        }
    }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads, GPCL_MIN_BLOCKS) gpclScalar(
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

// SM count of the current device, cached per device (an attribute query, no synchronisation).
int smCount()
{
    static int cache[64] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64)
        return 132;
    if (cache[dev] == 0)
    {
        int sms = 0;
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
        cache[dev] = sms > 0 ? sms : 132;
    }
    return cache[dev];
}

// Blocks for `items` work items of `perBlock` each, capped at `waves` full SMs (8 blocks of 256
// threads) when waves > 0; the grid-stride loops cover the rest.
unsigned gridFor(int64_t items, int64_t perBlock, int waves)
{
    int64_t needed = (items + perBlock - 1) / perBlock;
    if (needed < 1)
        needed = 1;
    int64_t const cap = waves > 0 ? static_cast<int64_t>(smCount()) * 8 * waves : int64_t{0x7fffffff};
    return static_cast<unsigned>(needed < cap ? needed : cap);
}

struct Call
{
    void const* x;
    void* y;
    int64_t n;   // groups
    int64_t gpr; // tau period (1 for a uniform tau)
    float const* tau;
    float tauScalar;
    float eps;
    int mode;
    cudaStream_t stream;
};

template <typename T, int Mode, int Tau, typename I>
void launchFast(Call const& c, unsigned grid)
{
    using V = typename Vec16<T>::type;
    constexpr int G = Vec16<T>::kGroups;
    gpclFast<T, Mode, Tau, I><<<grid, kThreads, 0, c.stream>>>(static_cast<V const*>(c.x), static_cast<V*>(c.y),
        static_cast<I>(c.n / G), static_cast<int>(c.n % G), static_cast<I>(c.gpr), c.tau, c.tauScalar, c.eps);
}

template <typename T, typename I>
void launchFastMode(Call const& c, unsigned grid)
{
    bool const perGroup = c.tau && c.gpr > 1;
    switch (c.mode)
    {
    case gpcl::kClamp:
        perGroup ? launchFast<T, gpcl::kClamp, kTauPerGroup, I>(c, grid)
                 : launchFast<T, gpcl::kClamp, kTauUniform, I>(c, grid);
        break;
    case gpcl::kSoft:
        perGroup ? launchFast<T, gpcl::kSoft, kTauPerGroup, I>(c, grid)
                 : launchFast<T, gpcl::kSoft, kTauUniform, I>(c, grid);
        break;
    default:
        perGroup ? launchFast<T, gpcl::kHopf, kTauPerGroup, I>(c, grid)
                 : launchFast<T, gpcl::kHopf, kTauUniform, I>(c, grid);
        break;
    }
}

template <typename T>
void dispatch(Call const& c)
{
    uintptr_t const addr = reinterpret_cast<uintptr_t>(c.x) | reinterpret_cast<uintptr_t>(c.y);
    constexpr int G = Vec16<T>::kGroups;
    if (addr % 16 == 0)
    {
        unsigned const grid = gridFor(c.n / G, int64_t{kUnroll} * kThreads, GPCL_GRID_WAVES);
        // Every index the loop forms (element, vector, group, chunk start past the end) in 32 bits.
        int64_t const reach = c.n + static_cast<int64_t>(grid + 2) * kUnroll * kThreads * G;
        if (4 * reach < (int64_t{1} << 32))
            launchFastMode<T, uint32_t>(c, grid);
        else
            launchFastMode<T, uint64_t>(c, grid);
        return;
    }
    unsigned const grid = gridFor(c.n, kThreads, 1);
    int64_t const reach = c.n + static_cast<int64_t>(grid) * kThreads * kUnrollFallback;
    bool const small = 4 * reach < (int64_t{1} << 32);
    if constexpr (sizeof(T) == 2)
    {
        if (addr % 8 == 0)
        {
            if (small)
                gpclVector8<T, uint32_t><<<grid, kThreads, 0, c.stream>>>(static_cast<uint2 const*>(c.x),
                    static_cast<uint2*>(c.y), static_cast<uint32_t>(c.n), static_cast<uint32_t>(c.gpr), c.tau,
                    c.tauScalar, c.eps, c.mode);
            else
                gpclVector8<T, uint64_t><<<grid, kThreads, 0, c.stream>>>(static_cast<uint2 const*>(c.x),
                    static_cast<uint2*>(c.y), static_cast<uint64_t>(c.n), static_cast<uint64_t>(c.gpr), c.tau,
                    c.tauScalar, c.eps, c.mode);
            return;
        }
    }
    if (small)
        gpclScalar<T, uint32_t><<<grid, kThreads, 0, c.stream>>>(static_cast<T const*>(c.x), static_cast<T*>(c.y),
            static_cast<uint32_t>(c.n), static_cast<uint32_t>(c.gpr), c.tau, c.tauScalar, c.eps, c.mode);
    else
        gpclScalar<T, uint64_t><<<grid, kThreads, 0, c.stream>>>(static_cast<T const*>(c.x), static_cast<T*>(c.y),
            static_cast<uint64_t>(c.n), static_cast<uint64_t>(c.gpr), c.tau, c.tauScalar, c.eps, c.mode);
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
    Call const c{x, y, n_groups, tau_ptr ? groups_per_row : 1, tau_ptr, tau_scalar, eps, mode,
        reinterpret_cast<cudaStream_t>(stream)};
    switch (dtype)
    {
    case gpcl::kFloat32: dispatch<float>(c); break;
    case gpcl::kFloat16: dispatch<__half>(c); break;
    case gpcl::kBFloat16: dispatch<__nv_bfloat16>(c); break;
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
