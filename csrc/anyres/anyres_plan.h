// AnyRes geometry on the host: which grid of tiles an image gets. Same arithmetic as
// transformers.image_processing_utils.select_best_resolution (IEEE doubles, int() truncation, first wins ties).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

namespace llava_fast {

// original (height, width); pinpoints as (height, width) pairs in config order. Returns (height, width).
std::pair<int64_t, int64_t> select_best_resolution(int64_t height, int64_t width,
                                                   const std::vector<std::pair<int64_t, int64_t>>& pinpoints);

}  // namespace llava_fast
