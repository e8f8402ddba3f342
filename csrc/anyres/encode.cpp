#include "anyres/encode.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
#include <immintrin.h>  // SSSE3 / AVX2 intrinsics, used only in functions built with target("ssse3"/"avx2")
#include <tmmintrin.h>  // behind a run-time CPU check (the build itself targets plain x86-64)
#endif

#include "anyres/anyres_plan.h"
#include "anyres/encode_detail.h"
#include "common/checks.h"
#include "common/float_convert.h"

namespace llava_fast {
namespace detail {

// ---------------------------------------------------------------------------------------------------- weights
inline double cubic_aa_filter(double x) {
  const double a = -0.5;
  x = std::abs(x);
  if (x < 1.0) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2.0) return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a;
  return 0.0;
}

AxisPlan make_axis_plan(int64_t in, int64_t out) {
  AxisPlan p;
  p.in = in;
  p.out = out;
  if (in == out) return p;
  const double scale = static_cast<double>(in) / static_cast<double>(out);
  const double support = (scale >= 1.0) ? (4 * 0.5) * scale : 4 * 0.5;
  p.taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  p.xmin.resize(out);
  p.xsize.resize(out);
  std::vector<double> wd(static_cast<size_t>(out) * p.taps, 0.0);
  const double invscale = (scale >= 1.0) ? 1.0 / scale : 1.0;
  double wt_max = 0.0;
  for (int64_t i = 0; i < out; ++i) {
    const double center = scale * (static_cast<double>(i) + 0.5);
    int64_t xmin = std::max(static_cast<int64_t>(center - support + 0.5), static_cast<int64_t>(0));
    int64_t xsize = std::min(static_cast<int64_t>(center + support + 0.5), in) - xmin;
    xsize = std::clamp(xsize, static_cast<int64_t>(0), static_cast<int64_t>(p.taps));
    double* wt = wd.data() + i * p.taps;
    double total = 0.0;
    for (int64_t j = 0; j < xsize; ++j) {
      const double v = cubic_aa_filter((static_cast<double>(j + xmin) - center + 0.5) * invscale);
      wt[j] = v;
      total += v;
    }
    double m = 0.0;
    if (total != 0.0) {
      for (int64_t j = 0; j < xsize; ++j) {
        wt[j] /= total;
        m = std::max(m, wt[j]);
      }
    }
    wt_max = std::max(wt_max, m);
    p.xmin[i] = xmin;
    p.xsize[i] = xsize;
  }
  unsigned prec = 0;
  for (prec = 0; prec < 22; ++prec) {
    const int next = static_cast<int>(0.5 + wt_max * (1 << (prec + 1)));
    if (next >= (1 << 15)) break;
  }
  p.precision = prec;
  p.w.resize(wd.size());
  for (size_t k = 0; k < wd.size(); ++k) {
    const double v = wd[k] * (1 << prec);
    p.w[k] = static_cast<int16_t>((v < 0) ? static_cast<int>(-0.5 + v) : static_cast<int>(0.5 + v));
  }
  return p;
}

// Plans depend on (in, out) only: shared by the tasks of one image (base tile, each grid band) and across calls
// (datasets repeat sizes). At most 512 entries (~10 MB at the sizes tiles need), then the cache starts over.
std::shared_ptr<const AxisPlan> cached_axis_plan(int64_t in, int64_t out) {
  static std::mutex mu;
  static std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const AxisPlan>> cache;
  const auto key = std::make_pair(in, out);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto p = std::make_shared<const AxisPlan>(make_axis_plan(in, out));
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() >= 512) cache.clear();
  cache.emplace(key, p);
  return p;
}

}  // namespace detail

namespace {
using detail::AxisPlan;
using detail::ImageGeom;
using detail::image_geometry;
using detail::make_axis_plan;

inline uint8_t clip8(int32_t acc, unsigned prec) {
  const int32_t v = acc >> prec;
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// ---------------------------------------------------------------------------------------------------- sources
// A virtual source: the image (h, w) placed at (oy, ox) on a (vh, vw) canvas of colour `fill` (pad to square).
// Pixel (y, x) channel c is data[y * stride + x * sx + c * sc] (bytes): HWC has (sx, sc) = (3, 1), CHW (1, H * W).
struct Source {
  const uint8_t* data;
  int64_t h, w, stride;  // stride in bytes between rows
  int64_t vh, vw, oy, ox;
  uint8_t fill[3];
  int64_t sx = 3, sc = 1;
  bool interleaved() const { return sx == 3 && sc == 1; }
  // row y of the virtual canvas is a row of the image with no padding on either side
  bool direct_row(int64_t y) const { return vw == w && y - oy >= 0 && y - oy < h; }
};

// Row y of the virtual source as a pointer to vw*3 interleaved bytes (into `scratch` when padding or a non-HWC
// layout is involved).
const uint8_t* source_row(const Source& s, int64_t y, std::vector<uint8_t>& scratch) {
  const int64_t sy = y - s.oy;
  if (s.interleaved() && s.direct_row(y)) return s.data + sy * s.stride;
  scratch.resize(static_cast<size_t>(s.vw) * 3);
  uint8_t* r = scratch.data();
  const bool inside = sy >= 0 && sy < s.h;
  const int64_t x0 = inside ? s.ox : s.vw, x1 = inside ? s.ox + s.w : s.vw;  // image columns [x0, x1)
  for (int64_t x = 0; x < s.vw; ++x) {
    if (x == x0) {
      const uint8_t* row = s.data + sy * s.stride;
      if (s.interleaved()) {
        std::memcpy(r + x0 * 3, row, static_cast<size_t>(s.w) * 3);
      } else {
        for (int64_t i = 0; i < s.w; ++i)
          for (int c = 0; c < 3; ++c) r[(x0 + i) * 3 + c] = row[i * s.sx + c * s.sc];
      }
      x = x1 - 1;
      continue;
    }
    r[x * 3] = s.fill[0];
    r[x * 3 + 1] = s.fill[1];
    r[x * 3 + 2] = s.fill[2];
  }
  return r;
}

struct Scratch {
  std::vector<uint8_t> row, hbuf, win;
  std::vector<int16_t> planes, wpad;  // horizontal pass: the source span as 3 int16 planes, padded weights
};

// Horizontal pass with a fixed tap count NT (8, 16 or 32 >= the axis' taps): the weights are copied into rows of NT
// (zeros past each output's xsize) and the source span of the row into three int16 planes with NT zeros of padding,
// so that every output is three fixed-length int16 dot products, which the compiler turns into pmaddwd. Integer
// sums do not depend on their order: the result is bit-identical to the tap loop below (and to torchvision's).
struct HPlan {
  int nt = 0;        // 0: use the generic tap loop
  int64_t s0 = 0;    // first source column of the span
  int64_t span = 0;  // source columns in the span
};

HPlan make_hplan(const AxisPlan& pw, int64_t c0, int64_t c1, Scratch& sc) {
  HPlan hp;
  if (c1 <= c0) return hp;
  hp.nt = pw.taps <= 8 ? 8 : pw.taps <= 16 ? 16 : pw.taps <= 32 ? 32 : 0;
  if (hp.nt == 0) return hp;
  hp.s0 = pw.xmin[c0];
  int64_t s1 = hp.s0;
  for (int64_t x = c0; x < c1; ++x) {
    hp.s0 = std::min(hp.s0, pw.xmin[x]);
    s1 = std::max(s1, pw.xmin[x] + pw.xsize[x]);
  }
  hp.span = s1 - hp.s0;
  sc.wpad.assign(static_cast<size_t>((c1 - c0) * hp.nt), 0);
  for (int64_t x = c0; x < c1; ++x)
    for (int64_t j = 0; j < pw.xsize[x]; ++j) sc.wpad[(x - c0) * hp.nt + j] = pw.w[x * pw.taps + j];
  sc.planes.assign(static_cast<size_t>(3 * (hp.span + hp.nt)), 0);  // the padding stays 0
  return hp;
}


#if defined(__SSE2__)
// Vertical pass of one output row over its n taps (rows of `rowlen` bytes, `rowlen` apart), 16 bytes at a time:
// two taps per pmaddwd (the bytes of rows j and j+1 as int16 pairs against (k[j], k[j+1])), int32 sums kept in
// registers, then >> prec and saturating packs (= clip to 0..255). Integer sums: bit-identical to the scalar loop.
// Starts at byte q (a wider version may have done the first ones); returns where it stopped (the caller
// finishes the tail).
inline int64_t vpass_row_sse2(const uint8_t* rows, int64_t rowlen, const int16_t* k, int64_t n, int32_t bias,
                              unsigned prec, uint8_t* d, int64_t q = 0) {
  const __m128i zero = _mm_setzero_si128();
  const __m128i vbias = _mm_set1_epi32(bias);
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(prec));
  for (; q + 16 <= rowlen; q += 16) {
    __m128i a0 = vbias, a1 = vbias, a2 = vbias, a3 = vbias;
    for (int64_t j = 0; j < n; j += 2) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + j * rowlen + q));
      const bool pair = j + 1 < n;
      const __m128i y = pair ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + (j + 1) * rowlen + q)) : zero;
      const int32_t kk = static_cast<uint16_t>(k[j]) | (static_cast<int32_t>(pair ? k[j + 1] : 0) << 16);
      const __m128i w = _mm_set1_epi32(kk);                       // (k[j], k[j+1]) in every int32 lane
      const __m128i xl = _mm_unpacklo_epi8(x, zero), xh = _mm_unpackhi_epi8(x, zero);
      const __m128i yl = _mm_unpacklo_epi8(y, zero), yh = _mm_unpackhi_epi8(y, zero);
      a0 = _mm_add_epi32(a0, _mm_madd_epi16(_mm_unpacklo_epi16(xl, yl), w));
      a1 = _mm_add_epi32(a1, _mm_madd_epi16(_mm_unpackhi_epi16(xl, yl), w));
      a2 = _mm_add_epi32(a2, _mm_madd_epi16(_mm_unpacklo_epi16(xh, yh), w));
      a3 = _mm_add_epi32(a3, _mm_madd_epi16(_mm_unpackhi_epi16(xh, yh), w));
    }
    a0 = _mm_sra_epi32(a0, shift);
    a1 = _mm_sra_epi32(a1, shift);
    a2 = _mm_sra_epi32(a2, shift);
    a3 = _mm_sra_epi32(a3, shift);
    const __m128i out = _mm_packus_epi16(_mm_packs_epi32(a0, a1), _mm_packs_epi32(a2, a3));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + q), out);
  }
  return q;
}
#endif

#if defined(__SSE2__)
// [sum(v0), sum(v1), sum(v2), sum(v3)] of four int32x4 vectors
inline __m128i reduce4_epi32(__m128i v0, __m128i v1, __m128i v2, __m128i v3) {
  const __m128i s01 = _mm_add_epi32(_mm_unpacklo_epi32(v0, v1), _mm_unpackhi_epi32(v0, v1));
  const __m128i s23 = _mm_add_epi32(_mm_unpacklo_epi32(v2, v3), _mm_unpackhi_epi32(v2, v3));
  return _mm_add_epi32(_mm_unpacklo_epi64(s01, s23), _mm_unpackhi_epi64(s01, s23));
}

template <int NT>
inline __m128i dot_nt(const int16_t* p, const int16_t* k) {  // 4 int32 partial sums of sum_j p[j] * k[j]
  __m128i v = _mm_madd_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)),
                             _mm_loadu_si128(reinterpret_cast<const __m128i*>(k)));
  for (int j = 8; j < NT; j += 8)
    v = _mm_add_epi32(v, _mm_madd_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + j)),
                                        _mm_loadu_si128(reinterpret_cast<const __m128i*>(k + j))));
  return v;
}
#endif

// Horizontal pass of one row into planar output: dst[c * wc + (x - c0)] for channel c.
// Columns [x0, c1) of the window [c0, c1) (x0 > c0 when a wider-vector version did the first ones).
template <int NT>
void hpass_row_nt(const HPlan& hp, const AxisPlan& pw, int64_t c0, int64_t x0, int64_t c1, uint8_t* dst,
                  const Scratch& sc) {
  const int64_t stride = hp.span + NT;
  const int64_t wc = c1 - c0;
  const int16_t* P[3] = {sc.planes.data(), sc.planes.data() + stride, sc.planes.data() + 2 * stride};
  const int32_t bias = 1 << (pw.precision - 1);
  int64_t x = x0;
#if defined(__SSE2__)
  // four outputs per step: 12 dot products, reduced four at a time, then >> prec and saturating packs (= clip8)
  const __m128i vbias = _mm_set1_epi32(bias);
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(pw.precision));
  for (; x + 4 <= c1; x += 4) {
    const int16_t* k = sc.wpad.data() + (x - c0) * NT;
    const int64_t b0 = pw.xmin[x] - hp.s0, b1 = pw.xmin[x + 1] - hp.s0, b2 = pw.xmin[x + 2] - hp.s0,
                  b3 = pw.xmin[x + 3] - hp.s0;
    __m128i ch[3];
    for (int c = 0; c < 3; ++c) {
      const int16_t* p = P[c];
      const __m128i sum = reduce4_epi32(dot_nt<NT>(p + b0, k), dot_nt<NT>(p + b1, k + NT),
                                        dot_nt<NT>(p + b2, k + 2 * NT), dot_nt<NT>(p + b3, k + 3 * NT));
      ch[c] = _mm_sra_epi32(_mm_add_epi32(sum, vbias), shift);
    }
    // [R0..R3 G0..G3 B0..B3 0..0] as bytes, clipped to 0..255 by the saturating packs
    const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(ch[0], ch[1]), _mm_packs_epi32(ch[2], _mm_setzero_si128()));
    const int64_t o = x - c0;
    const uint32_t r = static_cast<uint32_t>(_mm_cvtsi128_si32(bytes));
    const uint32_t g = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_srli_si128(bytes, 4)));
    const uint32_t bl = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm_srli_si128(bytes, 8)));
    std::memcpy(dst + o, &r, 4);
    std::memcpy(dst + wc + o, &g, 4);
    std::memcpy(dst + 2 * wc + o, &bl, 4);
  }
#endif
  for (; x < c1; ++x) {
    const int16_t* k = sc.wpad.data() + (x - c0) * NT;
    const int64_t b = pw.xmin[x] - hp.s0;
    for (int c = 0; c < 3; ++c) {
      int32_t a = bias;
      for (int j = 0; j < NT; ++j) a += static_cast<int32_t>(P[c][b + j]) * k[j];
      dst[c * wc + (x - c0)] = clip8(a, pw.precision);
    }
  }
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__) && (defined(__GNUC__) || defined(__clang__))
#define LF_HAVE_SSSE3_DISPATCH 1
// pshufb masks of the RGB deinterleave: for channel c, byte i of the 16 outputs comes from byte 3 i + c of 48 input
// bytes; kRgbMask[c][j] selects the bytes that fall in the j-th 16-byte input block (-1 zeroes the rest).
alignas(16) const int8_t kRgbMask[3][3][16] = {
    {{0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
     {-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1},
     {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13}},
    {{1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
     {-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1},
     {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14}},
    {{2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
     {-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1},
     {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15}}};

// Interleaved RGB bytes -> three int16 planes, 16 pixels (48 bytes) per step with pshufb (SSSE3, checked at run
// time: the build targets plain x86-64). Returns how many pixels it converted; the caller does the tail.
__attribute__((target("ssse3"))) int64_t deinterleave_rgb_ssse3(const uint8_t* p, int64_t n, int16_t* R,
                                                                 int16_t* G, int16_t* B) {
  const auto& m = kRgbMask;
  int16_t* out[3] = {R, G, B};
  const __m128i zero = _mm_setzero_si128();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 3 * i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 3 * i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 3 * i + 32));
    for (int ch = 0; ch < 3; ++ch) {
      const __m128i v = _mm_or_si128(
          _mm_or_si128(_mm_shuffle_epi8(a, _mm_load_si128(reinterpret_cast<const __m128i*>(m[ch][0]))),
                       _mm_shuffle_epi8(b, _mm_load_si128(reinterpret_cast<const __m128i*>(m[ch][1])))),
          _mm_shuffle_epi8(c, _mm_load_si128(reinterpret_cast<const __m128i*>(m[ch][2]))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out[ch] + i), _mm_unpacklo_epi8(v, zero));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out[ch] + i + 8), _mm_unpackhi_epi8(v, zero));
    }
  }
  return i;
}

bool has_ssse3() {
  static const bool yes = __builtin_cpu_supports("ssse3");
  return yes;
}

// ----------------------------------------------------------------------------------------- AVX2 (run-time check)
// The same integer arithmetic as the SSE2 paths, 256 bits wide: bit-identical results (integer sums do not depend
// on their order). LLAVA_FAST_NO_AVX2=1 in the environment turns them off (for A/B timing and tests).
bool use_avx2() {
  static const bool yes = [] {
    const char* e = std::getenv("LLAVA_FAST_NO_AVX2");
    return __builtin_cpu_supports("avx2") && !(e && e[0] == '1');
  }();
  return yes;
}

// 8 int32x8 vectors -> [sum(v0), ..., sum(v7)]
__attribute__((target("avx2"))) inline __m256i reduce8_epi32(__m256i v0, __m256i v1, __m256i v2, __m256i v3,
                                                             __m256i v4, __m256i v5, __m256i v6, __m256i v7) {
  const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));  // lane halves of 0-3
  const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v4, v5), _mm256_hadd_epi32(v6, v7));  // lane halves of 4-7
  return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

// o[i] = (float(w[i]) - shift) / scale for i < n, 8 at a time (IEEE subtraction and division: the scalar loop's
// bits). Returns how many it wrote (a multiple of 8).
__attribute__((target("avx2"))) int64_t normalize_span_f32_avx2(const uint8_t* w, int64_t n, float shift, float scale,
                                                               float* o) {
  const __m256 sh = _mm256_set1_ps(shift), sc = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i));
    const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    _mm256_storeu_ps(o + i, _mm256_div_ps(_mm256_sub_ps(v, sh), sc));
  }
  return i;
}

// The same for 16-bit outputs: the fp32 value above rounded to nearest-even, as float_to_bf16_bits /
// float_to_half_bits (and torch's .to(dtype)) do, 16 at a time. bf16: integer rounding on the fp32 bits (the values
// are finite: no NaN case); fp16: F16C's vcvtps2ph with round-to-nearest (IEEE, subnormals included), run only where
// the CPU has F16C. Same bits as the lookup table of the scalar loop (tests/data/test_anyres_cpu.py compares them).
__attribute__((target("avx2"))) inline __m256 normalize8_avx2(const uint8_t* w, __m256 sh, __m256 sc) {
  const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
  return _mm256_div_ps(_mm256_sub_ps(v, sh), sc);
}

__attribute__((target("avx2"))) inline __m256i bf16_bits8_avx2(__m256 f) {  // 8 x uint32 holding the bf16 bits
  const __m256i x = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7fff)), lsb), 16);
}

__attribute__((target("avx2"))) int64_t normalize_span_bf16_avx2(const uint8_t* w, int64_t n, float shift, float scale,
                                                                uint16_t* o) {
  const __m256 sh = _mm256_set1_ps(shift), sc = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i a = bf16_bits8_avx2(normalize8_avx2(w + i, sh, sc));
    const __m256i b = bf16_bits8_avx2(normalize8_avx2(w + i + 8, sh, sc));
    // packus works per 128-bit lane: [a0-3 b0-3 | a4-7 b4-7] -> reorder the 64-bit quarters to a0-7 b0-7
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i), p);
  }
  return i;
}

bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("f16c");
  return yes;
}

__attribute__((target("avx2,f16c"))) int64_t normalize_span_f16_avx2(const uint8_t* w, int64_t n, float shift,
                                                                     float scale, uint16_t* o) {
  const __m256 sh = _mm256_set1_ps(shift), sc = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(normalize8_avx2(w + i, sh, sc), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), h);
  }
  return i;
}

// [16 bytes at lo | 16 bytes at hi]
__attribute__((target("avx2"))) inline __m256i load2_128(const void* lo, const void* hi) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 1);
}

// 3 channels x 8 int32 sums (+ bias already added) -> >> prec, clip to 0..255, 8 bytes per channel plane
__attribute__((target("avx2"))) inline void store_rgb8(__m256i r, __m256i g, __m256i b, __m128i shift, uint8_t* dst,
                                                       int64_t wc) {
  r = _mm256_sra_epi32(r, shift);
  g = _mm256_sra_epi32(g, shift);
  b = _mm256_sra_epi32(b, shift);
  // per 128-bit lane: [R G B 0] x 4 bytes (lane 0: outputs 0-3, lane 1: outputs 4-7)
  const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(r, g), _mm256_packs_epi32(b, _mm256_setzero_si256()));
  const __m256i ord = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  const __m128i lo = _mm256_castsi256_si128(ord), hi = _mm256_extracti128_si256(ord, 1);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), lo);                          // R0..R7
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + wc), _mm_unpackhi_epi64(lo, lo));  // G0..G7
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + 2 * wc), hi);                 // B0..B7
}

// Horizontal pass, 8 outputs per step, NT = 8: two outputs' 8 taps per 256-bit pmaddwd (their padded weights are
// adjacent in wpad). Returns the first column it did not do.
__attribute__((target("avx2"))) int64_t hpass_row_avx2_nt8(const HPlan& hp, const AxisPlan& pw, int64_t c0, int64_t c1,
                                                          uint8_t* dst, const Scratch& sc) {
  const int64_t stride = hp.span + 8, wc = c1 - c0;
  const int16_t* P[3] = {sc.planes.data(), sc.planes.data() + stride, sc.planes.data() + 2 * stride};
  const __m256i vbias = _mm256_set1_epi32(1 << (pw.precision - 1));
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(pw.precision));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t x = c0;
  for (; x + 8 <= c1; x += 8) {
    const int16_t* k = sc.wpad.data() + (x - c0) * 8;
    int64_t b[8];
    for (int o = 0; o < 8; ++o) b[o] = pw.xmin[x + o] - hp.s0;
    __m256i ch[3];
    for (int c = 0; c < 3; ++c) {
      const int16_t* p = P[c];
      __m256i m[4];
      for (int q = 0; q < 4; ++q) {
        const __m256i src = load2_128(p + b[2 * q], p + b[2 * q + 1]);
        m[q] = _mm256_madd_epi16(src, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + 16 * q)));
      }
      // lane 0 holds outputs 0,2,4,6 and lane 1 outputs 1,3,5,7 after two rounds of hadd
      const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(m[0], m[1]), _mm256_hadd_epi32(m[2], m[3]));
      ch[c] = _mm256_add_epi32(_mm256_permutevar8x32_epi32(h, order), vbias);
    }
    store_rgb8(ch[0], ch[1], ch[2], shift, dst + (x - c0), wc);
  }
  return x;
}

// NT = 16 or 32: one output's taps fill one (two) 256-bit pmaddwd.
template <int NT>
__attribute__((target("avx2"))) int64_t hpass_row_avx2_wide(const HPlan& hp, const AxisPlan& pw, int64_t c0,
                                                           int64_t c1, uint8_t* dst, const Scratch& sc) {
  const int64_t stride = hp.span + NT, wc = c1 - c0;
  const int16_t* P[3] = {sc.planes.data(), sc.planes.data() + stride, sc.planes.data() + 2 * stride};
  const __m256i vbias = _mm256_set1_epi32(1 << (pw.precision - 1));
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(pw.precision));
  int64_t x = c0;
  for (; x + 8 <= c1; x += 8) {
    const int16_t* k = sc.wpad.data() + (x - c0) * NT;
    int64_t b[8];
    for (int o = 0; o < 8; ++o) b[o] = pw.xmin[x + o] - hp.s0;
    __m256i ch[3];
    for (int c = 0; c < 3; ++c) {
      const int16_t* p = P[c];
      __m256i v[8];
      for (int o = 0; o < 8; ++o) {
        v[o] = _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b[o])),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + o * NT)));
        for (int j = 16; j < NT; j += 16)
          v[o] = _mm256_add_epi32(
              v[o], _mm256_madd_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + b[o] + j)),
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + o * NT + j))));
      }
      ch[c] = _mm256_add_epi32(reduce8_epi32(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]), vbias);
    }
    store_rgb8(ch[0], ch[1], ch[2], shift, dst + (x - c0), wc);
  }
  return x;
}

// Vertical pass of one output row, 32 bytes at a time (see vpass_row_sse2; in-lane unpacks and packs keep the byte
// order). Returns how many bytes it wrote (a multiple of 32).
__attribute__((target("avx2"))) int64_t vpass_row_avx2(const uint8_t* rows, int64_t rowlen, const int16_t* k,
                                                      int64_t n, int32_t bias, unsigned prec, uint8_t* d) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256i vbias = _mm256_set1_epi32(bias);
  const __m128i shift = _mm_cvtsi32_si128(static_cast<int>(prec));
  int64_t q = 0;
  for (; q + 32 <= rowlen; q += 32) {
    __m256i a0 = vbias, a1 = vbias, a2 = vbias, a3 = vbias;
    for (int64_t j = 0; j < n; j += 2) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + j * rowlen + q));
      const bool pair = j + 1 < n;
      const __m256i y =
          pair ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + (j + 1) * rowlen + q)) : zero;
      const int32_t kk = static_cast<uint16_t>(k[j]) | (static_cast<int32_t>(pair ? k[j + 1] : 0) << 16);
      const __m256i w = _mm256_set1_epi32(kk);
      const __m256i xl = _mm256_unpacklo_epi8(x, zero), xh = _mm256_unpackhi_epi8(x, zero);
      const __m256i yl = _mm256_unpacklo_epi8(y, zero), yh = _mm256_unpackhi_epi8(y, zero);
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_unpacklo_epi16(xl, yl), w));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_unpackhi_epi16(xl, yl), w));
      a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(_mm256_unpacklo_epi16(xh, yh), w));
      a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(_mm256_unpackhi_epi16(xh, yh), w));
    }
    a0 = _mm256_sra_epi32(a0, shift);
    a1 = _mm256_sra_epi32(a1, shift);
    a2 = _mm256_sra_epi32(a2, shift);
    a3 = _mm256_sra_epi32(a3, shift);
    const __m256i out = _mm256_packus_epi16(_mm256_packs_epi32(a0, a1), _mm256_packs_epi32(a2, a3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + q), out);
  }
  return q;
}

// Interleaved RGB -> three int16 planes, 32 pixels per step: each 128-bit lane takes 16 pixels (48 bytes) with the
// SSSE3 masks, then widens. Returns how many pixels it converted.
__attribute__((target("avx2"))) int64_t deinterleave_rgb_avx2(const uint8_t* p, int64_t n, int16_t* R, int16_t* G,
                                                             int16_t* B) {
  int16_t* out[3] = {R, G, B};
  __m256i mask[3][3];
  for (int c = 0; c < 3; ++c)
    for (int j = 0; j < 3; ++j)
      mask[c][j] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(kRgbMask[c][j])));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const uint8_t* q = p + 3 * i;
    const __m256i a = load2_128(q, q + 48), b = load2_128(q + 16, q + 64), c = load2_128(q + 32, q + 80);
    for (int ch = 0; ch < 3; ++ch) {
      const __m256i v = _mm256_or_si256(
          _mm256_or_si256(_mm256_shuffle_epi8(a, mask[ch][0]), _mm256_shuffle_epi8(b, mask[ch][1])),
          _mm256_shuffle_epi8(c, mask[ch][2]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[ch] + i), _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[ch] + i + 16),
                          _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1)));
    }
  }
  return i;
}
#else
#define LF_HAVE_SSSE3_DISPATCH 0
#endif

// Pixels p[i * px + c * pc] -> planes R, G, B (int16), i < n. Kept out of line: inlined into hpass_row it slowed
// the planar (CHW) path by 8% (gcc 12, measured).
__attribute__((noinline)) void deinterleave(const uint8_t* p, int64_t n, int64_t px, int64_t pc, int16_t* R,
                                            int16_t* G, int16_t* B) {
  int64_t i = 0;
#if LF_HAVE_SSSE3_DISPATCH
  if (px == 3 && pc == 1) {
    if (use_avx2()) i = deinterleave_rgb_avx2(p, n, R, G, B);
    if (has_ssse3()) i += deinterleave_rgb_ssse3(p + 3 * i, n - i, R + i, G + i, B + i);
  }
#endif
  for (; i < n; ++i) {
    R[i] = p[px * i];
    G[i] = p[px * i + pc];
    B[i] = p[px * i + 2 * pc];
  }
}

// src: row pixel 0 of the image row; pixel x channel c at src[x * px + c * pc].
void hpass_row(const HPlan& hp, const AxisPlan& pw, const uint8_t* src, int64_t px, int64_t pc, int64_t c0,
               int64_t c1, uint8_t* dst, Scratch& sc) {
  const int64_t stride = hp.span + hp.nt;
  int16_t* R = sc.planes.data();
  int16_t* G = R + stride;
  int16_t* B = G + stride;
  if (px == 1) {  // planar (CHW): three contiguous widening copies
    const uint8_t* p0 = src + hp.s0;
    for (int64_t i = 0; i < hp.span; ++i) R[i] = p0[i];
    for (int64_t i = 0; i < hp.span; ++i) G[i] = p0[pc + i];
    for (int64_t i = 0; i < hp.span; ++i) B[i] = p0[2 * pc + i];
  } else {
    deinterleave(src + hp.s0 * px, hp.span, px, pc, R, G, B);
  }
  int64_t x0 = c0;
#if LF_HAVE_SSSE3_DISPATCH
  if (use_avx2()) {
    if (hp.nt == 8) x0 = hpass_row_avx2_nt8(hp, pw, c0, c1, dst, sc);
    else if (hp.nt == 16) x0 = hpass_row_avx2_wide<16>(hp, pw, c0, c1, dst, sc);
    else x0 = hpass_row_avx2_wide<32>(hp, pw, c0, c1, dst, sc);
  }
#endif
  if (hp.nt == 8) hpass_row_nt<8>(hp, pw, c0, x0, c1, dst, sc);
  else if (hp.nt == 16) hpass_row_nt<16>(hp, pw, c0, x0, c1, dst, sc);
  else hpass_row_nt<32>(hp, pw, c0, x0, c1, dst, sc);
}

// Resize the virtual source to (ph.out rows, pw.out cols) and keep the window rows [o0, o1) x cols [c0, c1),
// written into sc.win as rows of three planes (R[wc], G[wc], B[wc]: row-planar uint8). Horizontal pass first (only
// the source rows the window needs), then vertical (which does not care about the order inside a row).
void resize_window(const Source& s, const AxisPlan& ph, const AxisPlan& pw, int64_t o0, int64_t o1, int64_t c0,
                   int64_t c1, Scratch& sc) {
  const int64_t wc = c1 - c0, wr = o1 - o0;
  sc.win.resize(static_cast<size_t>(std::max<int64_t>(wr * wc * 3, 1)));
  if (wr <= 0 || wc <= 0) return;
  // source rows needed by the vertical pass
  int64_t r0, r1;
  if (ph.identity()) {
    r0 = o0;
    r1 = o1;
  } else {
    r0 = ph.xmin[o0];
    r1 = r0;
    for (int64_t o = o0; o < o1; ++o) {
      r0 = std::min(r0, ph.xmin[o]);
      r1 = std::max(r1, ph.xmin[o] + ph.xsize[o]);
    }
  }
  const int64_t nr = r1 - r0;
  sc.hbuf.resize(static_cast<size_t>(std::max<int64_t>(nr * wc * 3, 1)));
  const HPlan hp = pw.identity() ? HPlan{} : make_hplan(pw, c0, c1, sc);
  // horizontal pass -> hbuf (nr rows of wc pixels)
  for (int64_t y = r0; y < r1; ++y) {
    uint8_t* dst = sc.hbuf.data() + (y - r0) * wc * 3;
    if (hp.nt > 0 && s.direct_row(y)) {  // straight from the image, whatever its layout
      hpass_row(hp, pw, s.data + (y - s.oy) * s.stride, s.sx, s.sc, c0, c1, dst, sc);
      continue;
    }
    const uint8_t* src = source_row(s, y, sc.row);
    if (pw.identity()) {
      for (int c = 0; c < 3; ++c)
        for (int64_t x = 0; x < wc; ++x) dst[c * wc + x] = src[(c0 + x) * 3 + c];
      continue;
    }
    if (hp.nt > 0) {
      hpass_row(hp, pw, src, 3, 1, c0, c1, dst, sc);
      continue;
    }
    const int32_t bias = 1 << (pw.precision - 1);
    for (int64_t x = c0; x < c1; ++x) {
      const int16_t* k = pw.w.data() + x * pw.taps;
      const uint8_t* p = src + pw.xmin[x] * 3;
      int32_t a0 = bias, a1 = bias, a2 = bias;
      const int64_t n = pw.xsize[x];
      for (int64_t j = 0; j < n; ++j) {
        const int32_t kj = k[j];
        a0 += p[j * 3] * kj;
        a1 += p[j * 3 + 1] * kj;
        a2 += p[j * 3 + 2] * kj;
      }
      dst[x - c0] = clip8(a0, pw.precision);
      dst[wc + x - c0] = clip8(a1, pw.precision);
      dst[2 * wc + x - c0] = clip8(a2, pw.precision);
    }
  }
  // vertical pass -> win
  const int64_t rowlen = wc * 3;
  if (ph.identity()) {
    std::memcpy(sc.win.data(), sc.hbuf.data(), static_cast<size_t>(wr * rowlen));
    return;
  }
  const int32_t bias = 1 << (ph.precision - 1);
  std::vector<int32_t> acc(static_cast<size_t>(rowlen));
  for (int64_t o = o0; o < o1; ++o) {
    const int16_t* k = ph.w.data() + o * ph.taps;
    const int64_t n = ph.xsize[o];
    const uint8_t* rows = sc.hbuf.data() + (ph.xmin[o] - r0) * rowlen;  // tap j's row: rows + j * rowlen
    uint8_t* d = sc.win.data() + (o - o0) * rowlen;
    int64_t q0 = 0;
#if LF_HAVE_SSSE3_DISPATCH
    if (use_avx2()) q0 = vpass_row_avx2(rows, rowlen, k, n, bias, ph.precision, d);
#endif
#if defined(__SSE2__)
    q0 = vpass_row_sse2(rows, rowlen, k, n, bias, ph.precision, d, q0);
#endif
    if (q0 == rowlen) continue;
    std::fill(acc.begin() + q0, acc.end(), bias);
    for (int64_t j = 0; j < n; ++j) {
      const uint8_t* p = rows + j * rowlen;
      const int32_t kj = k[j];
      for (int64_t q = q0; q < rowlen; ++q) acc[q] += p[q] * kj;
    }
    for (int64_t q = q0; q < rowlen; ++q) d[q] = clip8(acc[q], ph.precision);
  }
}

// ---------------------------------------------------------------------------------------------------- emit
struct Luts {
  int dtype;
  uint16_t h[3][256];        // fp16 / bf16 bits of (v - shift[c]) / scale[c]
  float shift[3], scale[3];  // fp32 output computes (v - shift[c]) / scale[c] directly (vectorized, same bits)
};

template <typename OutT>
void emit_rows_t(const Scratch& sc, int64_t wy, int64_t wx, int64_t wr, int64_t wc, int64_t y0, int64_t y1, int64_t gw,
                 int64_t T, int64_t t0, int dtype, const uint16_t (&lut)[3][256], const float* shift,
                 const float* scale, OutT* dst) {
  const int64_t tt = T * T;
  for (int64_t y = y0; y < y1; ++y) {
    const int64_t tr = y / T, ty = y % T;
    const bool row_in = y >= wy && y < wy + wr;
    const uint8_t* wrow = row_in ? sc.win.data() + (y - wy) * wc * 3 : nullptr;  // R[wc] G[wc] B[wc]
    // canvas columns [a, b) of this row come from the window; the rest is black (0 before normalization)
    const int64_t a = row_in ? wx : 0, b = row_in ? wx + wc : 0;
    for (int64_t tc = 0; tc < gw; ++tc) {
      const int64_t tile = t0 + tr * gw + tc;
      const int64_t x0 = tc * T;
      const int64_t lo = std::clamp(a - x0, int64_t(0), T), hi = std::clamp(b - x0, lo, T);
      for (int c = 0; c < 3; ++c) {
        OutT* o = dst + tile * 3 * tt + c * tt + ty * T;
        const uint8_t* w = wrow ? wrow + c * wc + (x0 - wx) : nullptr;  // w[tx] = window pixel at column x0 + tx
        OutT zero;
        if constexpr (std::is_same_v<OutT, float>) {
          // fp32: the normalization's own expression, vectorizable (IEEE subtraction and division: the same bits)
          const float sh = shift[c], sc = scale[c];
          zero = (0.f - sh) / sc;
          int64_t tx = lo;
#if LF_HAVE_SSSE3_DISPATCH
          if (use_avx2()) tx += normalize_span_f32_avx2(w + lo, hi - lo, sh, sc, o + lo);
#endif
          for (; tx < hi; ++tx) o[tx] = (static_cast<float>(w[tx]) - sh) / sc;
        } else {
          const uint16_t* L = lut[c];
          zero = L[0];
          int64_t tx = lo;
#if LF_HAVE_SSSE3_DISPATCH
          if (use_avx2() && dtype == 2) tx += normalize_span_bf16_avx2(w + lo, hi - lo, shift[c], scale[c], o + lo);
          if (use_avx2() && dtype == 1 && has_f16c())
            tx += normalize_span_f16_avx2(w + lo, hi - lo, shift[c], scale[c], o + lo);
#endif
          for (; tx < hi; ++tx) o[tx] = L[w[tx]];
        }
        for (int64_t tx = 0; tx < lo; ++tx) o[tx] = zero;
        for (int64_t tx = hi; tx < T; ++tx) o[tx] = zero;
      }
    }
  }
}

// Write canvas rows [y0, y1) of a (gh*T, gw*T) canvas whose non-zero part is sc.win placed at (wy, wx) with size
// (wr, wc); canvas pixels outside the window are 0 (black, before normalization). Tiles start at tile index t0.
void emit_rows(const Scratch& sc, int64_t wy, int64_t wx, int64_t wr, int64_t wc, int64_t y0, int64_t y1, int64_t gw,
               int64_t T, int64_t t0, const Luts& L, void* dst) {
  if (L.dtype == 0)
    emit_rows_t<float>(sc, wy, wx, wr, wc, y0, y1, gw, T, t0, L.dtype, L.h, L.shift, L.scale,
                       static_cast<float*>(dst));
  else
    emit_rows_t<uint16_t>(sc, wy, wx, wr, wc, y0, y1, gw, T, t0, L.dtype, L.h, L.shift, L.scale,
                          static_cast<uint16_t*>(dst));
}

// A fresh output buffer (torch.empty: not yet touched) of ~100 MB takes one page fault per 4 KB page when first
// written: a fifth of a 1-thread run's time (perf, 2026-11-26). Where transparent huge pages are in "madvise" mode,
// asking for them turns that into one fault per 2 MB (15.2 -> 11 ms per NeXT image measured with the other changes
// of that day). Advisory only: nothing changes if the kernel refuses.
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(huge - 1);
  if (bytes >= static_cast<int64_t>(4 * huge) && b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// ---------------------------------------------------------------------------------------------------- plan
struct Task {
  int64_t image;
  int kind;        // 0 base/direct/pad-square (T x T), 1 AnyRes grid band, 2 short-edge + crop
  int64_t band;    // grid row for kind 1
  int64_t tile0;   // first output tile of this task's image part
  double cost;
};

}  // namespace

namespace detail {
ImageGeom image_geometry(int64_t h, int64_t w, int mode, const EncodeConfig& cfg) {
  ImageGeom g;
  if (mode == kAnyRes) {
    auto best = select_best_resolution(h, w, cfg.pinpoints);
    LF_CHECK(best.first > 0, "encode_tiles: no AnyRes candidate for image (" << h << ", " << w << ")");
    g.bh = best.first;
    g.bw = best.second;
    const double sw = static_cast<double>(g.bw) / static_cast<double>(w);
    const double sh = static_cast<double>(g.bh) / static_cast<double>(h);
    if (sw < sh) {
      g.nw = g.bw;
      g.nh = std::min(static_cast<int64_t>(std::ceil(static_cast<double>(h) * sw)), g.bh);
    } else {
      g.nh = g.bh;
      g.nw = std::min(static_cast<int64_t>(std::ceil(static_cast<double>(w) * sh)), g.bw);
    }
    g.ntiles = 1 + (g.bh / cfg.tile) * (g.bw / cfg.tile);
  }
  return g;
}
}  // namespace detail

std::vector<int64_t> encode_tile_counts(const std::vector<int64_t>& heights, const std::vector<int64_t>& widths,
                                        const std::vector<int>& modes, const EncodeConfig& cfg) {
  LF_CHECK(heights.size() == widths.size() && heights.size() == modes.size(),
           "encode_tiles: heights, widths and modes must have the same length");
  std::vector<int64_t> out(heights.size());
  for (size_t i = 0; i < heights.size(); ++i) {
    LF_CHECK(heights[i] > 0 && widths[i] > 0, "encode_tiles: images[" << i << "] has zero size");
    LF_CHECK(modes[i] >= 0 && modes[i] <= 3, "encode_tiles: images[" << i << "] has unknown mode " << modes[i]);
    out[i] = image_geometry(heights[i], widths[i], modes[i], cfg).ntiles;
  }
  return out;
}

void encode_tiles_cpu(const std::vector<const uint8_t*>& images, const std::vector<int64_t>& heights,
                      const std::vector<int64_t>& widths, const std::vector<int64_t>& row_strides,
                      const std::vector<int>& modes, const EncodeConfig& cfg, void* dst, int dtype,
                      int64_t capacity_tiles, int num_threads, const std::vector<int64_t>& col_strides,
                      const std::vector<int64_t>& chan_strides) {
  LF_CHECK(col_strides.size() == chan_strides.size() && (col_strides.empty() || col_strides.size() == images.size()),
           "encode_tiles: col_strides and chan_strides: one per image, or both empty (HWC)");
  LF_CHECK(dtype >= 0 && dtype <= 2, "encode_tiles: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " << dtype);
  LF_CHECK(cfg.tile > 0, "encode_tiles: tile must be positive");
  LF_CHECK(images.size() == heights.size() && row_strides.size() == heights.size(),
           "encode_tiles: one pointer, height, width and row stride per image");
  for (const auto& p : cfg.pinpoints)
    LF_CHECK(p.first % cfg.tile == 0 && p.second % cfg.tile == 0,
             "encode_tiles: pinpoint (" << p.first << ", " << p.second << ") is not a multiple of tile " << cfg.tile);
  const int64_t T = cfg.tile;
  const size_t n = images.size();
  std::vector<ImageGeom> geo(n);
  std::vector<Task> tasks;
  int64_t t = 0;
  for (size_t i = 0; i < n; ++i) {
    LF_CHECK(heights[i] > 0 && widths[i] > 0, "encode_tiles: images[" << i << "] has zero size");
    LF_CHECK(images[i] != nullptr, "encode_tiles: images[" << i << "] is a null pointer");
    LF_CHECK(row_strides[i] >= 0 && (col_strides.empty() || col_strides[i] >= 0) &&
                 (chan_strides.empty() || chan_strides[i] >= 0),
             "encode_tiles: images[" << i << "] has negative strides");
    if (col_strides.empty())
      LF_CHECK(row_strides[i] >= widths[i] * 3, "encode_tiles: images[" << i << "] row stride too small");
    if (modes[i] == kShortCrop) LF_CHECK(cfg.shortest_edge >= T, "encode_tiles: shortest_edge < tile is unsupported");
    geo[i] = image_geometry(heights[i], widths[i], modes[i], cfg);
    const double px = static_cast<double>(heights[i]) * widths[i];
    if (modes[i] == kAnyRes) {
      tasks.push_back({static_cast<int64_t>(i), 0, 0, t, px * 0.5 + T * T});
      const int64_t gh = geo[i].bh / T;
      for (int64_t r = 0; r < gh; ++r) tasks.push_back({static_cast<int64_t>(i), 1, r, t + 1, px / gh + T * geo[i].bw});
    } else {
      tasks.push_back({static_cast<int64_t>(i), modes[i] == kShortCrop ? 2 : 0, 0, t, px + T * T});
    }
    t += geo[i].ntiles;
  }
  LF_CHECK(t <= capacity_tiles, "encode_tiles: output holds " << capacity_tiles << " tiles but the images need " << t);
  std::sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });

  advise_huge_pages(dst, t * 3 * T * T * (dtype == 0 ? 4 : 2));
  Luts L;
  L.dtype = dtype;
  for (int c = 0; c < 3; ++c) {
    LF_CHECK(cfg.std[c] != 0.f, "encode_tiles: std[" << c << "] is zero");
    const float shift = 255.f * cfg.mean[c], scale = 255.f * cfg.std[c];
    L.shift[c] = shift;
    L.scale[c] = scale;
    for (int v = 0; v < 256; ++v) {
      const float f = (static_cast<float>(v) - shift) / scale;  // same expression as normalize_u8_cpu
      L.h[c][v] = dtype == 1 ? float_to_half_bits(f) : float_to_bf16_bits(f);
    }
  }

  auto run_task = [&](const Task& tk, Scratch& sc) {
    const int64_t i = tk.image;
    const int64_t h = heights[i], w = widths[i];
    Source s{images[i], h, w, row_strides[i], h, w, 0, 0, {0, 0, 0}};
    if (!col_strides.empty()) {
      s.sx = col_strides[i];
      s.sc = chan_strides[i];
    }
    const int mode = modes[i];
    if (mode == kPadSquare || (mode == kShortCrop && cfg.llava_pad)) {
      const int64_t m = std::max(h, w);
      s.vh = s.vw = m;
      s.oy = (m - h) / 2;
      s.ox = (m - w) / 2;
      std::memcpy(s.fill, cfg.fill, 3);
    }
    if (tk.kind == 0) {  // whole (virtual) image -> T x T
      const auto ph = detail::cached_axis_plan(s.vh, T), pw = detail::cached_axis_plan(s.vw, T);
      resize_window(s, *ph, *pw, 0, T, 0, T, sc);
      emit_rows(sc, 0, 0, T, T, 0, T, 1, T, tk.tile0, L, dst);
    } else if (tk.kind == 2) {  // resize shortest edge, centre crop
      const int64_t vh = s.vh, vw = s.vw, se = cfg.shortest_edge;
      int64_t oh, ow;
      if (vw <= vh) {
        ow = se;
        oh = static_cast<int64_t>(static_cast<double>(se) * static_cast<double>(vh) / static_cast<double>(vw));
      } else {
        oh = se;
        ow = static_cast<int64_t>(static_cast<double>(se) * static_cast<double>(vw) / static_cast<double>(vh));
      }
      const int64_t top = static_cast<int64_t>((oh - T) / 2.0), left = static_cast<int64_t>((ow - T) / 2.0);
      const auto ph = detail::cached_axis_plan(vh, oh), pw = detail::cached_axis_plan(vw, ow);
      resize_window(s, *ph, *pw, top, top + T, left, left + T, sc);
      emit_rows(sc, 0, 0, T, T, 0, T, 1, T, tk.tile0, L, dst);
    } else {  // AnyRes grid band: canvas rows [band*T, band*T + T)
      const ImageGeom& g = geo[i];
      const int64_t top = (g.bh - g.nh) / 2, left = (g.bw - g.nw) / 2;
      const int64_t y0 = tk.band * T, y1 = y0 + T;
      const int64_t o0 = std::clamp(y0 - top, static_cast<int64_t>(0), g.nh);
      const int64_t o1 = std::clamp(y1 - top, static_cast<int64_t>(0), g.nh);
      const auto ph = detail::cached_axis_plan(h, g.nh), pw = detail::cached_axis_plan(w, g.nw);
      resize_window(s, *ph, *pw, o0, o1, 0, g.nw, sc);
      emit_rows(sc, top + o0, left, o1 - o0, g.nw, y0, y1, g.bw / T, T, tk.tile0, L, dst);
    }
  };

  int threads = std::max(1, num_threads);
  threads = static_cast<int>(std::min<size_t>(static_cast<size_t>(threads), tasks.size()));
  std::atomic<size_t> next{0};
  auto worker = [&]() {
    Scratch sc;
    for (size_t k = next++; k < tasks.size(); k = next++) run_task(tasks[k], sc);
  };
  if (threads <= 1) {
    worker();
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  // exceptions cannot escape a std::thread: all argument checks happen above, before any thread starts
  for (int k = 0; k < threads; ++k) pool.emplace_back(worker);
  for (auto& th : pool) th.join();
}

const char* encoder_isa() {
#if LF_HAVE_SSSE3_DISPATCH
  if (use_avx2()) return "avx2";
  if (has_ssse3()) return "ssse3";
#endif
#if defined(__SSE2__)
  return "sse2";
#else
  return "scalar";
#endif
}

void resize_bicubic_aa_u8_cpu(const uint8_t* src, int64_t h, int64_t w, uint8_t* dst, int64_t oh, int64_t ow) {
  LF_CHECK(h > 0 && w > 0 && oh > 0 && ow > 0, "resize_bicubic_aa_u8: sizes must be positive");
  Source s{src, h, w, w * 3, h, w, 0, 0, {0, 0, 0}};
  Scratch sc;
  const AxisPlan ph = make_axis_plan(h, oh), pw = make_axis_plan(w, ow);
  resize_window(s, ph, pw, 0, oh, 0, ow, sc);
  for (int64_t y = 0; y < oh; ++y)  // row-planar window -> HWC
    for (int c = 0; c < 3; ++c)
      for (int64_t x = 0; x < ow; ++x) dst[(y * ow + x) * 3 + c] = sc.win[(y * 3 + c) * ow + x];
}

}  // namespace llava_fast
