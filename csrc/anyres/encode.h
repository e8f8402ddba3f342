// C++ CPU tile encoder: uint8 HWC RGB images -> every normalized tile of every image in one preallocated
// (total_tiles, 3, T, T) fp32/fp16/bf16 buffer. The work plan is computed from the image sizes alone.
//
// Resampling reproduces torch's CPU uint8 antialiased bicubic kernel (what torchvision's resize, and so the
// transformers torchvision backend, runs on CPU): PIL-style separable filter (a = -0.5, support 2*scale when
// downscaling), double weights normalized per output pixel, quantized to int16 with one precision per axis,
// horizontal pass first, uint8 intermediate, integer accumulation with round-half-up and clamp.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace llava_fast {

// How one image becomes tiles.
enum EncodeMode : int {
  kAnyRes = 0,      // [base T x T, grid tiles row-major] (LLaVA-NeXT / OneVision single image)
  kPadSquare = 1,   // pad to square with `fill`, resize to T x T: one tile (OneVision multi-image)
  kShortCrop = 2,   // [pad to square with `fill` if llava_pad] resize shortest edge, centre crop T (LLaVA-1.5)
  kDirect = 3,      // resize to T x T: one tile (base image alone, OneVision video frames)
};

struct EncodeConfig {
  int64_t tile = 336;
  int64_t shortest_edge = 336;
  bool llava_pad = false;
  std::vector<std::pair<int64_t, int64_t>> pinpoints;  // (height, width)
  uint8_t fill[3] = {0, 0, 0};
  float mean[3] = {0.f, 0.f, 0.f};
  float std[3] = {1.f, 1.f, 1.f};
};

// Tiles each image produces (the host plan's first output; the caller allocates sum(...) tiles).
std::vector<int64_t> encode_tile_counts(const std::vector<int64_t>& heights, const std::vector<int64_t>& widths,
                                        const std::vector<int>& modes, const EncodeConfig& cfg);

// images[i]: uint8 HWC (3 channels), rows `row_stride[i]` bytes apart. dst holds capacity_tiles tiles.
void encode_tiles_cpu(const std::vector<const uint8_t*>& images, const std::vector<int64_t>& heights,
                      const std::vector<int64_t>& widths, const std::vector<int64_t>& row_strides,
                      const std::vector<int>& modes, const EncodeConfig& cfg, void* dst, int dtype,
                      int64_t capacity_tiles, int num_threads, const std::vector<int64_t>& col_strides = {},
                      const std::vector<int64_t>& chan_strides = {});

// One antialiased bicubic uint8 resize (HWC, 3 channels), for tests: same arithmetic as the encoder.
// The widest instruction set the CPU encoder's resampler uses on this machine ("avx2", "ssse3", "sse2" or "scalar");
// LLAVA_FAST_NO_AVX2=1 in the environment (read once) turns the AVX2 paths off. Every path gives the same bits.
const char* encoder_isa();

void resize_bicubic_aa_u8_cpu(const uint8_t* src, int64_t h, int64_t w, uint8_t* dst, int64_t oh, int64_t ow);

}  // namespace llava_fast
