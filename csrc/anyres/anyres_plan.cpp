#include "anyres/anyres_plan.h"

#include <limits>

#include "common/checks.h"

namespace llava_fast {

std::pair<int64_t, int64_t> select_best_resolution(int64_t height, int64_t width,
                                                   const std::vector<std::pair<int64_t, int64_t>>& pinpoints) {
  LF_CHECK(height > 0 && width > 0, "select_best_resolution: image size must be positive, got (height=" << height
                                        << ", width=" << width << ")");
  LF_CHECK(!pinpoints.empty(), "select_best_resolution: image_grid_pinpoints is empty");
  std::pair<int64_t, int64_t> best{-1, -1};
  int64_t max_effective = 0;
  double min_wasted = std::numeric_limits<double>::infinity();
  for (const auto& p : pinpoints) {
    const int64_t h = p.first, w = p.second;
    LF_CHECK(h > 0 && w > 0, "select_best_resolution: pinpoint (" << h << ", " << w << ") must be positive");
    // Python: scale = min(width / original_width, height / original_height) in doubles.
    const double sw = static_cast<double>(w) / static_cast<double>(width);
    const double sh = static_cast<double>(h) / static_cast<double>(height);
    const double scale = sw < sh ? sw : sh;
    const int64_t dw = static_cast<int64_t>(static_cast<double>(width) * scale);
    const int64_t dh = static_cast<int64_t>(static_cast<double>(height) * scale);
    const int64_t eff = std::min(dw * dh, width * height);
    const double wasted = static_cast<double>(w * h - eff);
    if (eff > max_effective || (eff == max_effective && wasted < min_wasted)) {
      max_effective = eff;
      min_wasted = wasted;
      best = {h, w};
    }
  }
  return best;
}

}  // namespace llava_fast
