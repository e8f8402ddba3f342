// Last stage of tile encoding: uint8 NHWC (RGB) -> normalized NCHW, out = (x - 255*mean) / (255*std) in fp32,
// the fused form of the torchvision backend of the HF image processors.
#pragma once
#include <cstdint>

namespace llava_fast {

void normalize_u8_cpu(const uint8_t* src, void* dst, int dtype, int64_t n, int64_t h, int64_t w, const float* mean,
                      const float* std, int num_threads);

#ifdef LLAVA_FAST_WITH_CUDA
void normalize_u8_cuda(const uint8_t* src, void* dst, int dtype, int64_t n, int64_t h, int64_t w, const float* mean,
                       const float* std, uintptr_t stream);
#endif

}  // namespace llava_fast
