// The GPU tile encoder: a host plan (image sizes, strides and device pointers -> one byte buffer, see encode_gpu.h)
// and the launcher of its two CUDA passes. The plan and a host emulation of the kernels are built without CUDA.
#pragma once
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <vector>

#include "anyres/encode.h"
#include "anyres/encode_gpu.h"

namespace llava_fast {

struct CudaEncodePlan {
  // The plan bytes (see encode_gpu.h) = `head` (header, image, job, tile and axis records) followed by the weight
  // tables, which stay in the shared table cache (`keep`) and are copied once, by write_to, straight into the
  // caller's (pinned) buffer: at 128 photos they are ~3.8 MB, and assembling them here first cost a zero-fill and a
  // copy of all of it on fresh pages.
  struct Segment {
    const void* src;
    int64_t off, bytes;
  };
  std::vector<uint64_t> head;
  std::vector<Segment> segments;  // increasing offsets, past the head
  std::vector<std::shared_ptr<const void>> keep;
  int64_t total_bytes = 0;
  std::vector<int64_t> num_tiles;
  std::vector<int64_t> best_h, best_w;  // per image: the AnyRes best resolution (0 for the single-tile modes)
  int64_t total_tiles = 0, tile_elems = 0, scratch_elems = 0, pass1_blocks = 0;
  int64_t pass1_rows = 0, max_span = 0;  // v2 pass 1: blocks (one per job row), widest staged source row
  int64_t pass1_rowblocks = 0;           // v3 pass 1: blocks (one per kV3Rows rows of a job)
  int32_t band_need[gpu_encode::kV4Levels] = {};  // v4: intermediate rows per band of 1 << k output rows (encode_gpu.h)
  int resample = 0, patch = 0;
  int64_t tile = 0;  // T
  int64_t nbytes() const { return total_bytes; }
  // All nbytes() plan bytes to dst (padding between segments zeroed).
  void write_to(uint8_t* dst) const {
    const int64_t hb = static_cast<int64_t>(head.size() * sizeof(uint64_t));
    std::memcpy(dst, head.data(), static_cast<size_t>(hb));
    int64_t end = hb;
    for (const Segment& g : segments) {
      if (g.off > end) std::memset(dst + end, 0, static_cast<size_t>(g.off - end));
      std::memcpy(dst + g.off, g.src, static_cast<size_t>(g.bytes));
      end = g.off + g.bytes;
    }
    if (total_bytes > end) std::memset(dst + end, 0, static_cast<size_t>(total_bytes - end));
  }
  // The plan bytes in host memory (assembled on first use: the CPU emulation reads them).
  const uint8_t* bytes() const {
    if (blob_.empty()) {
      blob_.resize(static_cast<size_t>((total_bytes + 7) / 8));
      write_to(reinterpret_cast<uint8_t*>(blob_.data()));
    }
    return reinterpret_cast<const uint8_t*>(blob_.data());
  }
  int64_t scratch_bytes() const { return scratch_elems * (resample == 0 ? 1 : 4); }

  // Device-resident weight tables (anyres._TableCache): the plan as its head (header and records, head_bytes())
  // plus each table from wherever the caller keeps it. Table i (tables[i]) is the region of write_to's layout that
  // starts at `off` (its xmin, xsize and weight arrays at +0, +xsize_rel, +w_rel, zero padding between them).
  struct TableRef {
    int64_t in, out;
    int resample;
    int64_t rec, off, bytes, xsize_rel, w_rel;  // rec: index of its AxisRec
    size_t seg;                                  // its first of three segments
  };
  std::vector<TableRef> tables;
  int64_t head_bytes() const { return static_cast<int64_t>(head.size() * sizeof(uint64_t)); }
  // Table i's bytes (bytes of them) to dst.
  void write_table(size_t i, uint8_t* dst) const {
    const TableRef& t = tables.at(i);
    std::memset(dst, 0, static_cast<size_t>(t.bytes));
    for (size_t s = t.seg; s < t.seg + 3; ++s)
      std::memcpy(dst + (segments[s].off - t.off), segments[s].src, static_cast<size_t>(segments[s].bytes));
  }
  // The head to dst with table i's records pointing at plan + bases[i] (a byte offset from where the head will
  // be read, negative when the table lies below it; the kernels read `plan + offset` as 64-bit addresses).
  void write_head(uint8_t* dst, const std::vector<int64_t>& bases) const {
    if (bases.size() != tables.size()) throw std::invalid_argument("write_head: one base per table is needed");
    std::memcpy(dst, head.data(), static_cast<size_t>(head_bytes()));
    const int64_t off_axes = reinterpret_cast<const gpu_encode::PlanHeader*>(head.data())->off_axes;
    auto* recs = reinterpret_cast<gpu_encode::AxisRec*>(dst + off_axes);
    for (size_t i = 0; i < tables.size(); ++i) {
      gpu_encode::AxisRec& r = recs[tables[i].rec];
      r.xmin_off = bases[i];
      r.xsize_off = bases[i] + tables[i].xsize_rel;
      r.w_off = bases[i] + tables[i].w_rel;
    }
  }

 private:
  mutable std::vector<uint64_t> blob_;
};

// ptrs[i]: uint8 pixels of image i (device pointers for the CUDA launch, host pointers for the emulation), read as
// pixel (y, x) channel c at ptr + y*sy + x*sx + c*sc. resample: 0 uint8 arithmetic (== CPU encoder), 1 fp32 (== torch
// on CUDA). patch: 0 for (tiles, 3, T, T) output, p for the patch-major (tiles, (T/p)^2, 3*p*p) layout.
CudaEncodePlan build_cuda_encode_plan(const std::vector<uint64_t>& ptrs, const std::vector<int64_t>& heights,
                                      const std::vector<int64_t>& widths, const std::vector<int64_t>& sy,
                                      const std::vector<int64_t>& sx, const std::vector<int64_t>& sc,
                                      const std::vector<int>& modes, const EncodeConfig& cfg, int resample, int patch);

// v4 (one fused launch, encode_gpu.h): the tallest band of 1 << k output rows (k < 6: 1 .. 32) whose staged
// intermediate (band_need[k] rows x tile columns, one channel) fits in smem_bytes of shared memory; 0 if none does
// (the launcher then runs v3).
inline int v4_band_rows(const CudaEncodePlan& plan, int64_t smem_bytes) {
  const int64_t esize = plan.resample == gpu_encode::kU8 ? 1 : 4;
  for (int k = gpu_encode::kV4Levels - 1; k >= 0; --k)
    if (static_cast<int64_t>(plan.band_need[k]) * plan.tile * esize <= smem_bytes) return 1 << k;
  return 0;
}

// Runs the kernels' element functions on the CPU (tests): scratch holds plan.scratch_bytes() (unused by v4), out
// capacity tiles. version: 1, 2, 3 or 4, the kernels of encode_gpu.h to emulate; band_rows: v4's band height (any
// value >= 1; a power of two <= 32 is also checked against the plan's shared-memory bound).
// plan_bytes: where the element code reads the plan (nullptr: plan.bytes(); else a head written by write_head).
void encode_tiles_emulate(const CudaEncodePlan& plan, void* scratch, void* out, int dtype, int64_t capacity_tiles,
                          int version = 1, int band_rows = 32, const uint8_t* plan_bytes = nullptr);

#ifdef LLAVA_FAST_WITH_CUDA
// plan_dev: a device copy of plan.bytes(); scratch: plan.scratch_bytes() of device memory; out: capacity tiles.
// Two kernel launches on `stream`, no synchronization.
// passes: 3 = both (the encoder); 1 = horizontal pass only, 2 = vertical pass only (over whatever scratch holds):
// for timing each pass on a GPU (benchmarks/bench_anyres.py). version: 1, 2 or 3 (encode_gpu.h); v2's pass 1 needs
// 3 x max_span bytes of shared memory and falls back to v1's pass 1 above kV2MaxSpan source columns; v3's needs
// kV3Rows x 3 x max_span and falls back to v2's above kV3MaxSpan. v3's pass 2 is v2's. version 4: one launch
// (passes must be 3, scratch unused) with bands of band_rows output rows; band_need x tile x element size bytes
// of shared memory (opted in above 48 KB); see v4_band_rows.
void encode_tiles_cuda(const CudaEncodePlan& plan, const void* plan_dev, void* scratch, void* out, int dtype,
                       int64_t capacity_tiles, uintptr_t stream, int passes = 3, int version = 1, int band_rows = 0);
#endif

}  // namespace llava_fast
