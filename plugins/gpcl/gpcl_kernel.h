// C ABI of the GPCL CUDA kernel (libgpcl_kernel.so): what the TensorRT plugin and the GPU
// tests (ctypes) call. Operator contract: docs/gpcl-spec.md.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct CUstream_st* gpcl_stream_t; // == cudaStream_t; NULL is the legacy default stream

enum
{
    GPCL_OK = 0,
    GPCL_ERR_ARGUMENT = 1, // bad mode/dtype/size/pointer: nothing was launched
    GPCL_ERR_LAUNCH = 2,   // the CUDA launch failed (cudaGetLastError)
};

// y = GPCL(x), asynchronously on `stream` (no host synchronisation).
//   x, y            device pointers to n_groups * 4 elements of `dtype`; x == y is allowed
//                   (each thread reads its group before writing it); any alignment (8/16-byte
//                   vector loads when both are aligned to a whole group, scalar otherwise)
//   n_groups        number of quaternion groups (= elements / 4) over all leading axes
//   groups_per_row  length of the per-group tau vector (= D / 4); group g uses
//                   tau_ptr[g % groups_per_row]. Pass 1 for a one-element tau tensor.
//   tau_ptr         device float32 pointer, or NULL to use tau_scalar for every group
//   eps             soft/hopf small-radius guard (spec default 1e-6)
//   mode            0 clamp, 1 soft, 2 hopf;  dtype 0 float32, 1 float16, 2 bfloat16
int gpcl_forward(void const* x, void* y, int64_t n_groups, int64_t groups_per_row, float const* tau_ptr,
    float tau_scalar, float eps, int mode, int dtype, gpcl_stream_t stream);

char const* gpcl_error_string(int code);

int gpcl_abi_version(void); // bumped when gpcl_forward's signature or meaning changes

#ifdef __cplusplus
}
#endif
