// Host plan pieces shared by the CPU tile encoder (encode.cpp) and the CUDA plan (encode_cuda_plan.cpp).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "anyres/encode.h"

namespace llava_fast {
namespace detail {

// One axis of an antialiased bicubic resize, as torch's _compute_index_ranges_int16_weights (UpSampleKernel.cpp).
struct AxisPlan {
  int64_t in = 0, out = 0;
  int taps = 0;                 // max_interp_size
  unsigned precision = 0;       // int16 weight scale 2^precision
  std::vector<int64_t> xmin, xsize;
  std::vector<int16_t> w;       // out * taps
  bool identity() const { return in == out; }
};

AxisPlan make_axis_plan(int64_t in, int64_t out);
std::shared_ptr<const AxisPlan> cached_axis_plan(int64_t in, int64_t out);  // thread-safe, bounded

struct ImageGeom {
  int64_t ntiles = 1;
  int64_t bh = 0, bw = 0, nh = 0, nw = 0;  // AnyRes: best resolution, resized size
};

ImageGeom image_geometry(int64_t h, int64_t w, int mode, const EncodeConfig& cfg);

}  // namespace detail
}  // namespace llava_fast
