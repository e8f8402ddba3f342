// uint8 NHWC -> normalized NCHW on the GPU. One thread per output pixel (all three channels), coalesced on x.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "anyres/normalize.h"
#include "common/checks.h"

namespace llava_fast {
namespace {

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

struct NormParams {
  float shift[3];
  float scale[3];
};

template <typename T>
__global__ void normalize_u8_kernel(const uint8_t* __restrict__ src, T* __restrict__ dst, int64_t n, int64_t hw,
                                    NormParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // pixel index over n*hw
  if (i >= n * hw) return;
  const int64_t img = i / hw, pix = i % hw;
  const uint8_t* s = src + i * 3;
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    // IEEE division (not __fdividef) so the result equals the CPU path bit for bit
    const float v = __fdiv_rn(static_cast<float>(s[c]) - p.shift[c], p.scale[c]);
    dst[(img * 3 + c) * hw + pix] = from_float<T>(v);
  }
}

}  // namespace

void normalize_u8_cuda(const uint8_t* src, void* dst, int dtype, int64_t n, int64_t h, int64_t w, const float* mean,
                       const float* std, uintptr_t stream) {
  LF_CHECK(dtype >= 0 && dtype <= 2, "normalize_u8: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " << dtype);
  NormParams p;
  for (int c = 0; c < 3; ++c) {
    LF_CHECK(std[c] != 0.f, "normalize_u8: std[" << c << "] is zero");
    p.shift[c] = 255.f * mean[c];
    p.scale[c] = 255.f * std[c];
  }
  const int64_t total = n * h * w;
  if (total == 0) return;
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 0) {
    normalize_u8_kernel<float><<<blocks, threads, 0, s>>>(src, static_cast<float*>(dst), n, h * w, p);
  } else if (dtype == 1) {
    normalize_u8_kernel<__half><<<blocks, threads, 0, s>>>(src, static_cast<__half*>(dst), n, h * w, p);
  } else {
    normalize_u8_kernel<__nv_bfloat16><<<blocks, threads, 0, s>>>(src, static_cast<__nv_bfloat16*>(dst), n, h * w, p);
  }
  const cudaError_t err = cudaGetLastError();
  LF_CHECK(err == cudaSuccess, "normalize_u8_cuda: launch failed: " << cudaGetErrorString(err));
}

}  // namespace llava_fast
