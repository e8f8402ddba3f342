// Host side of the GPU tile encoder: the plan (see encode_gpu.h) and a CPU emulation of the two kernels.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "anyres/encode_cuda.h"
#include "anyres/encode_detail.h"
#include "anyres/encode_gpu.h"
#include "common/checks.h"

namespace llava_fast {
using namespace gpu_encode;
namespace {

// One resize axis in the form the kernels read.
struct AxisTable {
  int32_t in = 0, out = 0, taps = 0, prec = 0;
  int64_t full_lo = 0, full_hi = 0;  // input positions all outputs read (input_range over [0, out)), kept for reuse
  // v4: the most input positions any run of 1 << k consecutive outputs reads (the band bound of encode_gpu.h)
  int32_t band_need[kV4Levels] = {};
  std::vector<int32_t> xmin, xsize;
  std::vector<int16_t> w16;  // kU8
  std::vector<float> wf;     // kF32
};

// torch's BicubicFilterFunctor (a = -0.5) in float, as the CUDA antialias kernel evaluates it.
float cubic_torch_f32(float x) {
  const float a = -0.5f;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

AxisTable build_table(int64_t in, int64_t out, int resample) {
  AxisTable t;
  t.in = static_cast<int32_t>(in);
  t.out = static_cast<int32_t>(out);
  if (in == out) return t;  // identity: both arithmetics copy (torch's weights there are exactly [0, 1, 0])
  t.xmin.resize(out);
  t.xsize.resize(out);
  if (resample == kU8) {
    const detail::AxisPlan p = detail::make_axis_plan(in, out);
    t.taps = p.taps;
    t.prec = static_cast<int32_t>(p.precision);
    for (int64_t i = 0; i < out; ++i) {
      t.xmin[i] = static_cast<int32_t>(p.xmin[i]);
      t.xsize[i] = static_cast<int32_t>(p.xsize[i]);
    }
    t.w16 = p.w;
    return t;
  }
  // upsample_gen2d_aa_out_frame / _compute_weights_span / _compute_weights (aten/src/ATen/native/cuda/UpSample.cuh)
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  const float half = 0.5f;
  const float support = (scale >= 1.0) ? (4 * half) * scale : 4 * half;
  t.taps = static_cast<int32_t>(std::ceil(support)) * 2 + 1;
  const float invscale = (scale >= 1.0) ? static_cast<float>(1.0 / static_cast<double>(scale)) : 1.0f;
  t.wf.assign(static_cast<size_t>(out) * t.taps, 0.f);
  for (int64_t i = 0; i < out; ++i) {
    const float center = scale * (static_cast<float>(i) + 0.5f);
    const int xmin = std::max(static_cast<int>(center - support + 0.5f), 0);
    int xsize = std::min(static_cast<int>(center + support + 0.5f), static_cast<int>(in)) - xmin;
    xsize = std::max(0, std::min(xsize, t.taps));
    const float xmin_m_center = static_cast<float>(xmin) - center;
    float* w = t.wf.data() + i * t.taps;
    float total = 0.f;
    for (int j = 0; j < xsize; ++j) {
      const float v = cubic_torch_f32((static_cast<float>(j) + xmin_m_center + 0.5f) * invscale);
      w[j] = v;
      total += v;
    }
    if (total != 0.f)
      for (int j = 0; j < xsize; ++j) w[j] /= total;
    t.xmin[i] = xmin;
    t.xsize[i] = xsize;
  }
  return t;
}

// Input positions [lo, hi) that the outputs [o0, o0 + n) of an axis read, scanning the table.
std::pair<int64_t, int64_t> scan_range(const AxisTable& t, int64_t o0, int64_t n) {
  int64_t lo = t.xmin[o0], hi = lo;
  for (int64_t o = o0; o < o0 + n; ++o) {
    lo = std::min<int64_t>(lo, t.xmin[o]);
    hi = std::max<int64_t>(hi, static_cast<int64_t>(t.xmin[o]) + t.xsize[o]);
  }
  return {lo, hi};
}

// band_need[k] = max over o of (max end - min start) over the outputs [o, min(o + 2^k, out)): min / max over runs
// of doubling length (a run of 2^k is two runs of 2^(k-1), clamped at the end of the axis).
void band_bounds(AxisTable& t) {
  const int64_t n = t.out;
  if (t.taps == 0) {
    for (int k = 0; k < kV4Levels; ++k) t.band_need[k] = static_cast<int32_t>(std::min<int64_t>(int64_t{1} << k, n));
    return;
  }
  std::vector<int32_t> lo(t.xmin), hi(static_cast<size_t>(n));
  for (int64_t o = 0; o < n; ++o) hi[o] = t.xmin[o] + t.xsize[o];
  for (int k = 0; k < kV4Levels; ++k) {
    if (k > 0) {
      const int64_t half = int64_t{1} << (k - 1);
      for (int64_t o = 0; o < n; ++o) {  // in place: reads o + half >= o before it is rewritten
        const int64_t p = std::min(o + half, n - 1);
        lo[o] = std::min(lo[o], lo[p]);
        hi[o] = std::max(hi[o], hi[p]);
      }
    }
    int32_t m = 0;
    for (int64_t o = 0; o < n; ++o) m = std::max(m, hi[o] - lo[o]);
    t.band_need[k] = m;
  }
}

AxisTable build_table_with_range(int64_t in, int64_t out, int resample) {
  AxisTable t = build_table(in, out, resample);
  if (t.taps > 0 && out > 0) std::tie(t.full_lo, t.full_hi) = scan_range(t, 0, out);
  band_bounds(t);
  return t;
}

// Weight tables depend on (in, out, arithmetic) only: cached across calls (datasets repeat sizes).
std::shared_ptr<const AxisTable> get_table(int64_t in, int64_t out, int resample) {
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, int>, std::shared_ptr<const AxisTable>> cache;
  const auto key = std::make_tuple(in, out, resample);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto t = std::make_shared<const AxisTable>(build_table_with_range(in, out, resample));
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() >= 4096) cache.clear();
  cache.emplace(key, t);
  return t;
}

// Input positions [lo, hi) that the outputs [o0, o0 + n) of an axis read (the outputs themselves on an identity axis);
// the whole axis (every base tile and AnyRes grid) comes from the table, a crop window is scanned.
std::pair<int64_t, int64_t> input_range(const AxisTable& t, int64_t o0, int64_t n) {
  if (t.taps == 0 || n <= 0) return {o0, o0 + std::max<int64_t>(n, 0)};
  if (o0 == 0 && n == t.out) return {t.full_lo, t.full_hi};
  return scan_range(t, o0, n);
}

int64_t align8(int64_t n) { return (n + 7) & ~static_cast<int64_t>(7); }

}  // namespace

CudaEncodePlan build_cuda_encode_plan(const std::vector<uint64_t>& ptrs, const std::vector<int64_t>& heights,
                                      const std::vector<int64_t>& widths, const std::vector<int64_t>& sy,
                                      const std::vector<int64_t>& sx, const std::vector<int64_t>& sc,
                                      const std::vector<int>& modes, const EncodeConfig& cfg, int resample,
                                      int patch) {
  const size_t n = ptrs.size();
  LF_CHECK(n > 0, "encode_tiles_cuda: no images");
  LF_CHECK(heights.size() == n && widths.size() == n && sy.size() == n && sx.size() == n && sc.size() == n &&
               modes.size() == n,
           "encode_tiles_cuda: one pointer, height, width, stride triple and mode per image");
  LF_CHECK(resample == kU8 || resample == kF32, "encode_tiles_cuda: resample must be 0 (uint8) or 1 (fp32)");
  const int64_t T = cfg.tile;
  LF_CHECK(T > 0 && T < 32768, "encode_tiles_cuda: tile must be in [1, 32767], got " << T);
  LF_CHECK(patch >= 0 && patch <= T, "encode_tiles_cuda: patch must be 0 (tile layout) or in [1, tile]");
  for (const auto& p : cfg.pinpoints)
    LF_CHECK(p.first % T == 0 && p.second % T == 0,
             "encode_tiles: pinpoint (" << p.first << ", " << p.second << ") is not a multiple of tile " << T);
  for (int c = 0; c < 3; ++c) LF_CHECK(cfg.std[c] != 0.f, "encode_tiles: std[" << c << "] is zero");

  CudaEncodePlan plan;
  plan.resample = resample;
  plan.patch = patch;
  plan.tile = T;
  const int64_t G = patch ? T / patch : 0;
  plan.tile_elems = patch ? G * G * 3 * patch * patch : 3 * T * T;

  std::vector<ImageRec> imgs(n);
  std::vector<JobRec> jobs;
  std::vector<TileRec> tiles;
  std::vector<std::shared_ptr<const AxisTable>> tables;
  std::map<std::pair<int64_t, int64_t>, int32_t> table_index;
  auto axis = [&](int64_t in, int64_t out) -> int32_t {
    auto it = table_index.find({in, out});
    if (it != table_index.end()) return it->second;
    const int32_t k = static_cast<int32_t>(tables.size());
    tables.push_back(get_table(in, out, resample));
    table_index.emplace(std::make_pair(in, out), k);
    return k;
  };
  // one resize job: virtual source -> (oh, ow), window rows [o0, o0+wr) x cols [c0, c0+wc), placed at (wy, wx)
  auto add_job = [&](int64_t i, int64_t vh, int64_t vw, int64_t oy, int64_t ox, bool pad, int64_t oh, int64_t ow,
                     int64_t o0, int64_t wr, int64_t c0, int64_t wc, int64_t wy, int64_t wx) -> int32_t {
    JobRec j{};
    j.image = static_cast<int32_t>(i);
    j.ax_h = axis(vh, oh);
    j.ax_w = axis(vw, ow);
    j.vh = static_cast<int32_t>(vh);
    j.vw = static_cast<int32_t>(vw);
    j.oy = static_cast<int32_t>(oy);
    j.ox = static_cast<int32_t>(ox);
    for (int c = 0; c < 3; ++c) j.fill[c] = pad ? cfg.fill[c] : 0;
    j.c0 = static_cast<int32_t>(c0);
    j.wc = static_cast<int32_t>(wc);
    j.o0 = static_cast<int32_t>(o0);
    j.wr = static_cast<int32_t>(wr);
    j.wy = static_cast<int32_t>(wy);
    j.wx = static_cast<int32_t>(wx);
    const auto rows = input_range(*tables[j.ax_h], o0, wr);  // the source rows the window's rows read
    j.r0 = static_cast<int32_t>(rows.first);
    j.nr = static_cast<int32_t>(rows.second - rows.first);
    const auto cols = input_range(*tables[j.ax_w], c0, wc);  // v2: the source columns its columns read
    j.s0 = static_cast<int32_t>(cols.first);
    j.span = static_cast<int32_t>(cols.second - cols.first);
    LF_CHECK(3 * static_cast<int64_t>(j.nr) * wc < (static_cast<int64_t>(1) << 31),
             "encode_tiles_cuda: images[" << i << "] needs an intermediate of more than 2^31 values");
    jobs.push_back(j);
    return static_cast<int32_t>(jobs.size() - 1);
  };

  for (size_t i = 0; i < n; ++i) {
    const int64_t h = heights[i], w = widths[i];
    LF_CHECK(h > 0 && w > 0, "encode_tiles: images[" << i << "] has zero size");
    LF_CHECK(h < (1 << 30) && w < (1 << 30), "encode_tiles: images[" << i << "] is too large");
    LF_CHECK(ptrs[i] != 0, "encode_tiles: images[" << i << "] is a null pointer");
    LF_CHECK(sy[i] >= 0 && sx[i] >= 0 && sc[i] >= 0, "encode_tiles: images[" << i << "] has negative strides");
    LF_CHECK(modes[i] >= 0 && modes[i] <= 3, "encode_tiles: images[" << i << "] has unknown mode " << modes[i]);
    imgs[i] = ImageRec{ptrs[i], sy[i], sx[i], sc[i], static_cast<int32_t>(h), static_cast<int32_t>(w)};
    const int mode = modes[i];
    const detail::ImageGeom g = detail::image_geometry(h, w, mode, cfg);
    plan.num_tiles.push_back(g.ntiles);
    plan.best_h.push_back(mode == kAnyRes ? g.bh : 0);
    plan.best_w.push_back(mode == kAnyRes ? g.bw : 0);
    int64_t vh = h, vw = w, oy = 0, ox = 0;
    const bool pad = mode == kPadSquare || (mode == kShortCrop && cfg.llava_pad);
    if (pad) {
      const int64_t m = std::max(h, w);
      vh = vw = m;
      oy = (m - h) / 2;
      ox = (m - w) / 2;
    }
    if (mode == kShortCrop) {
      LF_CHECK(cfg.shortest_edge >= T, "encode_tiles: shortest_edge < tile is unsupported");
      const int64_t se = cfg.shortest_edge;
      int64_t oh, ow;
      if (vw <= vh) {
        ow = se;
        oh = static_cast<int64_t>(static_cast<double>(se) * static_cast<double>(vh) / static_cast<double>(vw));
      } else {
        oh = se;
        ow = static_cast<int64_t>(static_cast<double>(se) * static_cast<double>(vw) / static_cast<double>(vh));
      }
      const int64_t top = static_cast<int64_t>((oh - T) / 2.0), left = static_cast<int64_t>((ow - T) / 2.0);
      const int32_t j = add_job(static_cast<int64_t>(i), vh, vw, oy, ox, pad, oh, ow, top, T, left, T, 0, 0);
      tiles.push_back(TileRec{j, 0, 0, 0});
      continue;
    }
    // base / pad-square / direct: the whole (virtual) image resized to T x T
    const int32_t jb = add_job(static_cast<int64_t>(i), vh, vw, oy, ox, pad, T, T, 0, T, 0, T, 0, 0);
    tiles.push_back(TileRec{jb, 0, 0, 0});
    if (mode == kAnyRes) {
      const int64_t top = (g.bh - g.nh) / 2, left = (g.bw - g.nw) / 2;
      const int32_t jg = add_job(static_cast<int64_t>(i), h, w, 0, 0, false, g.nh, g.nw, 0, g.nh, 0, g.nw, top, left);
      const int64_t gh = g.bh / T, gw = g.bw / T;
      for (int64_t k = 0; k < gh * gw; ++k)
        tiles.push_back(TileRec{jg, static_cast<int32_t>((k / gw) * T), static_cast<int32_t>((k % gw) * T), 0});
    }
  }
  plan.total_tiles = static_cast<int64_t>(tiles.size());
  LF_CHECK(plan.total_tiles < (static_cast<int64_t>(1) << 31), "encode_tiles_cuda: too many tiles");

  // scratch and pass-1 blocks
  int64_t scratch = 0, blocks = 0, rows = 0, max_span = 0, rowblocks = 0;
  for (auto& j : jobs) {
    j.scratch_off = scratch;
    j.block0 = blocks;
    j.row0 = static_cast<int32_t>(rows);
    j.rowblk0 = static_cast<int32_t>(rowblocks);
    rowblocks += (j.nr + kV3Rows - 1) / kV3Rows;
    const int64_t elems = 3 * static_cast<int64_t>(j.nr) * j.wc;
    scratch += (elems + 15) & ~static_cast<int64_t>(15);
    blocks += (elems + kThreads - 1) / kThreads;
    rows += j.nr;
    max_span = std::max<int64_t>(max_span, j.span);
    LF_CHECK(rows < (static_cast<int64_t>(1) << 31), "encode_tiles_cuda: too many source rows in one batch");
  }
  int32_t band_need[kV4Levels] = {};
  for (const auto& j : jobs)
    for (int k = 0; k < kV4Levels; ++k) band_need[k] = std::max(band_need[k], tables[j.ax_h]->band_need[k]);
  std::copy(band_need, band_need + kV4Levels, plan.band_need);
  plan.scratch_elems = scratch;
  plan.pass1_blocks = blocks;
  plan.pass1_rows = rows;
  plan.pass1_rowblocks = rowblocks;
  plan.max_span = max_span;

  // serialize
  PlanHeader H{};
  H.num_images = static_cast<int32_t>(n);
  H.num_jobs = static_cast<int32_t>(jobs.size());
  H.num_tiles = static_cast<int32_t>(tiles.size());
  H.num_axes = static_cast<int32_t>(tables.size());
  H.tile = static_cast<int32_t>(T);
  H.patch = patch;
  H.resample = resample;
  H.tile_elems = static_cast<int32_t>(plan.tile_elems);
  H.pass1_blocks = blocks;
  H.scratch_elems = scratch;
  H.rows = static_cast<int32_t>(rows);
  H.max_span = static_cast<int32_t>(max_span);
  H.rowblocks = static_cast<int32_t>(rowblocks);
  std::copy(band_need, band_need + kV4Levels, H.band_need);
  for (int c = 0; c < 3; ++c) {
    H.shift[c] = 255.f * cfg.mean[c];  // same expressions as the CPU encoder's LUT and normalize_u8
    H.scale[c] = 255.f * cfg.std[c];
  }
  int64_t off = align8(sizeof(PlanHeader));
  H.off_images = off;
  off = align8(off + static_cast<int64_t>(n * sizeof(ImageRec)));
  H.off_jobs = off;
  off = align8(off + static_cast<int64_t>(jobs.size() * sizeof(JobRec)));
  H.off_tiles = off;
  off = align8(off + static_cast<int64_t>(tiles.size() * sizeof(TileRec)));
  H.off_axes = off;
  off = align8(off + static_cast<int64_t>(tables.size() * sizeof(AxisRec)));
  std::vector<AxisRec> recs(tables.size());
  for (size_t k = 0; k < tables.size(); ++k) {
    const AxisTable& t = *tables[k];
    AxisRec& r = recs[k];
    r.in = t.in;
    r.out = t.out;
    r.taps = t.taps;
    r.prec = t.prec;
    if (t.taps == 0) continue;
    r.xmin_off = off;
    off = align8(off + 4 * static_cast<int64_t>(t.out));
    r.xsize_off = off;
    off = align8(off + 4 * static_cast<int64_t>(t.out));
    r.w_off = off;
    off = align8(off + static_cast<int64_t>(t.out) * t.taps * (resample == kU8 ? 2 : 4));
  }
  plan.total_bytes = off;
  const int64_t head_bytes = align8(H.off_axes + static_cast<int64_t>(tables.size() * sizeof(AxisRec)));
  plan.head.assign(static_cast<size_t>(head_bytes / 8), 0);
  uint8_t* P = reinterpret_cast<uint8_t*>(plan.head.data());
  std::memcpy(P, &H, sizeof(H));
  std::memcpy(P + H.off_images, imgs.data(), n * sizeof(ImageRec));
  std::memcpy(P + H.off_jobs, jobs.data(), jobs.size() * sizeof(JobRec));
  std::memcpy(P + H.off_tiles, tiles.data(), tiles.size() * sizeof(TileRec));
  std::memcpy(P + H.off_axes, recs.data(), recs.size() * sizeof(AxisRec));
  for (size_t k = 0; k < tables.size(); ++k) {  // the tables themselves: copied by write_to, from the cache
    const AxisTable& t = *tables[k];
    plan.keep.push_back(tables[k]);
    if (t.taps == 0) continue;
    const int64_t w_bytes = static_cast<int64_t>(t.out) * t.taps * (resample == kU8 ? 2 : 4);
    plan.tables.push_back({t.in, t.out, resample, static_cast<int64_t>(k), recs[k].xmin_off,
                           align8(recs[k].w_off + w_bytes) - recs[k].xmin_off, recs[k].xsize_off - recs[k].xmin_off,
                           recs[k].w_off - recs[k].xmin_off, plan.segments.size()});
    plan.segments.push_back({t.xmin.data(), recs[k].xmin_off, 4 * static_cast<int64_t>(t.xmin.size())});
    plan.segments.push_back({t.xsize.data(), recs[k].xsize_off, 4 * static_cast<int64_t>(t.xsize.size())});
    if (resample == kU8)
      plan.segments.push_back({t.w16.data(), recs[k].w_off, 2 * static_cast<int64_t>(t.w16.size())});
    else
      plan.segments.push_back({t.wf.data(), recs[k].w_off, 4 * static_cast<int64_t>(t.wf.size())});
  }
  return plan;
}

namespace {
// The kernels' code on one CPU thread: v1 element by element; v2 block by block (pass 1: the row staged into a
// host buffer standing in for shared memory, then the row filter; pass 2: four outputs at a time), in the order
// of the blocks' indices (the blocks write disjoint outputs, so the order does not matter).
template <int R, int D>
void emulate(const CudaEncodePlan& plan, void* scratch, void* out, int version, int band_rows,
             const uint8_t* plan_bytes) {
  const uint8_t* P = plan_bytes ? plan_bytes : plan.bytes();
  const PlanHeader& H = header(P);
  const JobRec* J = jobs(P);
  if (version == 4) {  // a block per (tile, band): stage each channel of the band, then emit it
    const int bh = band_rows, T = H.tile;
    int level = -1;
    for (int k = 0; k < kV4Levels; ++k)
      if (bh == 1 << k) level = k;
    std::vector<float> sm;  // float-sized elements: room for either arithmetic
    for (int64_t t = 0; t < H.num_tiles; ++t) {
      const TileRec& tr = tiles(P)[t];
      const JobRec& jb = J[tr.job];
      for (int y0 = 0; y0 < T; y0 += bh) {
        const int y1 = std::min(y0 + bh, T);
        const V4Band b = v4_band(P, tr, jb, y0, y1);
        LF_CHECK(level < 0 || b.nr <= H.band_need[level],
                 "encode_tiles_emulate: a band of " << bh << " rows needs " << b.nr << " intermediate rows, over the "
                                                    << "plan's bound " << H.band_need[level]);
        LF_CHECK(b.ncol <= T, "encode_tiles_emulate: a band covers " << b.ncol << " columns of a tile of " << T);
        sm.assign(static_cast<size_t>(std::max(1, b.nr * T)), 0.f);  // rows of T values (tile columns)
        for (int c = 0; c < 3; ++c) {
          if (b.nr > 0) v4_stage<R>(P, jb, b, c, sm.data(), 0, 1);
          v4_emit<R, D>(P, t, tr, jb, b, c, y0, y1, sm.data(), out, 0, 1);
        }
      }
    }
    return;
  }
  if (version == 3) {  // a block per kV3Rows rows of one job
    const int ms = std::max(H.max_span, 1);
    std::vector<uint8_t> sm(static_cast<size_t>(kV3Rows * 3 * ms));
    for (int64_t b = 0; b < H.rowblocks; ++b) {
      const JobRec& jb = J[find_job_rowblk(P, b)];
      const int r0 = static_cast<int>(b - jb.rowblk0) * kV3Rows;
      const int nr = std::min(kV3Rows, jb.nr - r0);
      for (int i = 0; i < nr; ++i) hpass_v2_stage(P, jb, r0 + i, sm.data() + i * 3 * ms, ms, 0, 1);
      hpass_v3_rows<R>(P, jb, r0, nr, sm.data(), ms, scratch, 0, 1);
    }
  } else if (version == 2) {
    std::vector<uint8_t> sm(static_cast<size_t>(3 * std::max(H.max_span, 1)));
    for (int64_t b = 0; b < H.rows; ++b) {
      const JobRec& jb = J[find_job_row(P, b)];
      const int r = static_cast<int>(b - jb.row0);
      hpass_v2_stage(P, jb, r, sm.data(), H.max_span, 0, 1);
      hpass_v2_row<R>(P, jb, r, sm.data(), H.max_span, scratch, 0, 1);
    }
  } else {
    for (int j = 0; j < H.num_jobs; ++j) {
      const uint32_t elems = 3u * static_cast<uint32_t>(J[j].nr) * static_cast<uint32_t>(J[j].wc);
      for (uint32_t e = 0; e < elems; ++e) hpass_element<R>(P, J[j], e, scratch);
    }
  }
  if (version >= 2 && H.patch == 0) {
    for (int64_t t = 0; t < H.num_tiles; ++t)
      for (int crow = 0; crow < 3 * H.tile; ++crow)
        for (int x0 = 0; x0 < H.tile; x0 += 4)
          vpass_v2_quad<R, D>(P, t, crow / H.tile, crow % H.tile, x0, scratch, out);
    return;
  }
  for (int64_t t = 0; t < H.num_tiles; ++t)
    for (uint32_t e = 0; e < static_cast<uint32_t>(H.tile_elems); ++e) vpass_element<R, D>(P, t, e, scratch, out);
}
}  // namespace

void encode_tiles_emulate(const CudaEncodePlan& plan, void* scratch, void* out, int dtype, int64_t capacity_tiles,
                          int version, int band_rows, const uint8_t* plan_bytes) {
  LF_CHECK(dtype >= 0 && dtype <= 2, "encode_tiles: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " << dtype);
  LF_CHECK(version >= 1 && version <= 4, "encode_tiles: GPU encoder version must be 1, 2, 3 or 4, got " << version);
  LF_CHECK(version != 4 || band_rows >= 1, "encode_tiles_emulate: band_rows must be >= 1, got " << band_rows);
  LF_CHECK(capacity_tiles >= plan.total_tiles, "encode_tiles: output holds " << capacity_tiles
                                                   << " tiles but the images need " << plan.total_tiles);
  if (plan.resample == kU8) {
    if (dtype == 0) emulate<kU8, 0>(plan, scratch, out, version, band_rows, plan_bytes);
    if (dtype == 1) emulate<kU8, 1>(plan, scratch, out, version, band_rows, plan_bytes);
    if (dtype == 2) emulate<kU8, 2>(plan, scratch, out, version, band_rows, plan_bytes);
  } else {
    if (dtype == 0) emulate<kF32, 0>(plan, scratch, out, version, band_rows, plan_bytes);
    if (dtype == 1) emulate<kF32, 1>(plan, scratch, out, version, band_rows, plan_bytes);
    if (dtype == 2) emulate<kF32, 2>(plan, scratch, out, version, band_rows, plan_bytes);
  }
}

}  // namespace llava_fast
