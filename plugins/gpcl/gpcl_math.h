// GPCL per-group math, shared by the CUDA kernel (gpcl_kernel.cu) and the host check
// program (gpcl_host_check.cpp), so the code CI tests on the host is the code the GPU runs.
//
// It repeats the canonical float32 operation order of plugins/reference.py (the oracle):
//   ss(v) = ((v0*v0 + v1*v1) + v2*v2) + v3*v3
//   r = sqrt(ss(q)); where that is +Inf: rho = sqrt(ss(q * 2^-66)), which cannot overflow,
//       is not finite -> the group has a NaN/Inf channel -> all NaN; else r = rho * 2^66
//   (a NaN r also means a NaN channel -> all NaN)
//   clamp: y = q * (t / max(r, t))
//   soft:  y = q                     (r < eps)   else a = max(r / t, FLT_MIN), y = q * (tanh(a) / a)
//   hopf:  y = 0                     (r < eps)   else u = q / r (IEEE quotients; divideBy shares
//          one reciprocal and stays bit-identical), k = min(r, t) * (1/sqrt 2),
//          y = k * (2(u0u2 + u1u3), 2(u1u2 - u0u3), (u0u0 + u1u1) - (u2u2 + u3u3), 1)
// The rescaled radius is only computed on the rare overflow branch: the hot path is unchanged.
// Build with contraction off (nvcc --fmad=false, g++ -ffp-contract=off): an FMA would round
// the sums differently from the reference and break clamp's bit-exact identity.
#pragma once

#include <math.h>
#include <stdint.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#define GPCL_HD __host__ __device__ __forceinline__
#else
#define GPCL_HD inline
#endif

namespace gpcl
{

enum Mode : int
{
    kClamp = 0,
    kSoft = 1,
    kHopf = 2,
};

enum DType : int
{
    kFloat32 = 0,
    kFloat16 = 1,
    kBFloat16 = 2,
};

constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kFloatMax = 3.402823466e+38f;
constexpr float kFloatMin = 1.175494351e-38f; // smallest normal float32
constexpr float kRescale = 0x1p-66f;          // 4 * (FLT_MAX * 2^-66)^2 < FLT_MAX
constexpr float kUnscale = 0x1p66f;

GPCL_HD float sumSquares(float v0, float v1, float v2, float v3)
{
    return ((v0 * v0 + v1 * v1) + v2 * v2) + v3 * v3;
}

// RN(1 / r) (IEEE, correctly rounded).
GPCL_HD float reciprocal(float r)
{
#if defined(__CUDA_ARCH__)
    return __frcp_rn(r);
#else
    return 1.0f / r;
#endif
}

// x / r, bit-identical to the IEEE division, from rcp = reciprocal(r) shared by hopf's four
// channels (one reciprocal instead of four full divides). Markstein: with rcp = RN(1/r) and
// q0 = RN(x * rcp) within one ulp of x/r, the residual x - r*q0 is exact in one fma and
// RN(q0 + residual * rcp) is the correctly rounded quotient, provided nothing under- or
// overflows: guaranteed for |x| and r in [2^-60, 2^60]. Anything else (zeros, tiny or huge
// values, Inf) takes the plain division. -DGPCL_HOPF_PLAIN_DIV builds four plain divides (same
// bits): on an H200 both measured alike with a one-wave grid; the uncapped grid the kernel now
// uses was measured, tested and benchmarked with this shared-reciprocal form.
GPCL_HD float divideBy(float x, float r, float rcp)
{
#if defined(GPCL_HOPF_PLAIN_DIV)
    (void)rcp;
    return x / r;
#else
    float const ax = fabsf(x);
    if (ax >= 0x1p-60f && ax <= 0x1p60f && r >= 0x1p-60f && r <= 0x1p60f)
    {
        float const q0 = x * rcp;
        return fmaf(fmaf(-r, q0, x), rcp, q0);
    }
    return x / r;
#endif
}

// In place on one group. `t` > 0 is the group's tau; `mode` one of Mode.
GPCL_HD void group(float q[4], float t, float eps, int mode)
{
    float r = sqrtf(sumSquares(q[0], q[1], q[2], q[3]));
    if (!(r <= kFloatMax)) // NaN or Inf channel, or the float32 sum of squares overflowed
    {
        float const rho = sqrtf(sumSquares(q[0] * kRescale, q[1] * kRescale, q[2] * kRescale, q[3] * kRescale));
        if (!(rho <= kFloatMax)) // a non-finite channel: corruption is propagated to the whole group
        {
            q[0] = q[1] = q[2] = q[3] = NAN;
            return;
        }
        r = rho * kUnscale; // +Inf only when the true radius exceeds FLT_MAX
    }
    if (mode == kClamp)
    {
        float const s = t / fmaxf(r, t); // exactly 1 inside the ball
        q[0] *= s, q[1] *= s, q[2] *= s, q[3] *= s;
    }
    else if (mode == kSoft)
    {
        if (r < eps)
            return;
        float const a = fmaxf(r / t, kFloatMin); // r / t may underflow: tanh(a) / a is 1 there, not 0/0
        float const s = tanhf(a) / a;
        q[0] *= s, q[1] *= s, q[2] *= s, q[3] *= s;
    }
    else
    {
        if (r < eps)
        {
            q[0] = q[1] = q[2] = q[3] = 0.0f;
            return;
        }
        float const rcp = reciprocal(r);
        float const u0 = divideBy(q[0], r, rcp), u1 = divideBy(q[1], r, rcp);
        float const u2 = divideBy(q[2], r, rcp), u3 = divideBy(q[3], r, rcp);
        float const k = fminf(r, t) * kInvSqrt2;
        q[0] = k * (2.0f * (u0 * u2 + u1 * u3));
        q[1] = k * (2.0f * (u1 * u2 - u0 * u3));
        q[2] = k * ((u0 * u0 + u1 * u1) - (u2 * u2 + u3 * u3));
        q[3] = k;
    }
}

// Element conversions: float32 math, one rounding to the storage type at the end.
GPCL_HD float toFloat(float v) { return v; }
GPCL_HD float toFloat(__half v) { return __half2float(v); }
GPCL_HD float toFloat(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
GPCL_HD T fromFloat(float v);
template <>
GPCL_HD float fromFloat<float>(float v) { return v; }
template <>
GPCL_HD __half fromFloat<__half>(float v) { return __float2half_rn(v); }
template <>
GPCL_HD __nv_bfloat16 fromFloat<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One group from/to storage of type T (the kernel's scalar path and the host check).
template <typename T>
GPCL_HD void applyGroup(T const* x, T* y, float t, float eps, int mode)
{
    float q[4] = {toFloat(x[0]), toFloat(x[1]), toFloat(x[2]), toFloat(x[3])};
    group(q, t, eps, mode);
    y[0] = fromFloat<T>(q[0]), y[1] = fromFloat<T>(q[1]), y[2] = fromFloat<T>(q[2]), y[3] = fromFloat<T>(q[3]);
}

} // namespace gpcl
