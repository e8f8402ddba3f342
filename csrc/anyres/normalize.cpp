#include "anyres/normalize.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <vector>

#include "common/checks.h"
#include "common/float_convert.h"

namespace llava_fast {

void normalize_u8_cpu(const uint8_t* src, void* dst, int dtype, int64_t n, int64_t h, int64_t w, const float* mean,
                      const float* std, int num_threads) {
  LF_CHECK(dtype >= 0 && dtype <= 2, "normalize_u8: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " << dtype);
  LF_CHECK(n >= 0 && h >= 0 && w >= 0, "normalize_u8: negative size");
  float scale[3], shift[3];
  for (int c = 0; c < 3; ++c) {
    LF_CHECK(std[c] != 0.f, "normalize_u8: std[" << c << "] is zero");
    // (x - 255*mean) / (255*std), kept as a division to match the reference bit for bit
    shift[c] = 255.f * mean[c];
    scale[c] = 255.f * std[c];
  }
  const int64_t hw = h * w;
  const int64_t rows = n * h;
  auto work = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t img = r / h, y = r % h;
      const uint8_t* s = src + (img * hw + y * w) * 3;
      for (int c = 0; c < 3; ++c) {
        const int64_t o = (img * 3 + c) * hw + y * w;
        for (int64_t x = 0; x < w; ++x) {
          const float v = (static_cast<float>(s[x * 3 + c]) - shift[c]) / scale[c];
          if (dtype == 0) {
            static_cast<float*>(dst)[o + x] = v;
          } else if (dtype == 1) {
            static_cast<uint16_t*>(dst)[o + x] = float_to_half_bits(v);
          } else {
            static_cast<uint16_t*>(dst)[o + x] = float_to_bf16_bits(v);
          }
        }
      }
    }
  };
  int threads = std::max(1, num_threads);
  threads = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, rows / 64)));
  if (threads <= 1) {
    work(0, rows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t chunk = (rows + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t r0 = t * chunk, r1 = std::min(rows, r0 + chunk);
    if (r0 < r1) pool.emplace_back(work, r0, r1);
  }
  for (auto& th : pool) th.join();
}

}  // namespace llava_fast
