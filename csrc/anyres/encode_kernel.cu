// GPU tile encoder: every tile of every image of a batch in two launches (horizontal pass, then vertical pass fused
// with padding, cropping, normalization, the dtype cast and the optional patch-major layout), driven by the host
// plan of encode_cuda_plan.cpp. The element code lives in encode_gpu.h and is shared with the CPU emulation.
#include <cuda_runtime.h>

#include <algorithm>

#include "anyres/encode_cuda.h"
#include "anyres/encode_gpu.h"
#include "common/checks.h"

namespace llava_fast {
namespace {
using namespace gpu_encode;

template <int R>
__global__ void __launch_bounds__(kThreads) encode_hpass_kernel(const uint8_t* __restrict__ plan, void* scratch) {
  __shared__ int s_job;
  for (int64_t b = blockIdx.x; b < header(plan).pass1_blocks; b += gridDim.x) {
    if (threadIdx.x == 0) s_job = find_job(plan, b);
    __syncthreads();
    const JobRec& jb = jobs(plan)[s_job];
    const int64_t e = (b - jb.block0) * kThreads + threadIdx.x;
    if (e < 3 * static_cast<int64_t>(jb.nr) * jb.wc) hpass_element<R>(plan, jb, static_cast<uint32_t>(e), scratch);
    __syncthreads();  // s_job is rewritten by the next iteration
  }
}

template <int R, int D>
__global__ void __launch_bounds__(kThreads)
    encode_vpass_kernel(const uint8_t* __restrict__ plan, const void* scratch, void* out) {
  const PlanHeader& H = header(plan);
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= H.tile_elems) return;
  for (int64_t t = blockIdx.y; t < H.num_tiles; t += gridDim.y)
    vpass_element<R, D>(plan, t, static_cast<uint32_t>(e), scratch, out);
}

// v2 pass 1: a block per (job, source row), the row staged in shared memory (encode_gpu.h).
template <int R>
__global__ void __launch_bounds__(kThreads) encode_hpass_rows_kernel(const uint8_t* __restrict__ plan, void* scratch) {
  extern __shared__ uint8_t sm[];
  __shared__ int s_job;
  const PlanHeader& H = header(plan);
  for (int64_t b = blockIdx.x; b < H.rows; b += gridDim.x) {
    if (threadIdx.x == 0) s_job = find_job_row(plan, b);
    __syncthreads();
    const JobRec& jb = jobs(plan)[s_job];
    const int r = static_cast<int>(b - jb.row0);
    hpass_v2_stage(plan, jb, r, sm, H.max_span, threadIdx.x, blockDim.x);
    __syncthreads();
    hpass_v2_row<R>(plan, jb, r, sm, H.max_span, scratch, threadIdx.x, blockDim.x);
    __syncthreads();  // sm and s_job are rewritten by the next iteration
  }
}

// v3 pass 1: a block per kV3Rows source rows of one job, the rows staged in shared memory (encode_gpu.h).
template <int R>
__global__ void __launch_bounds__(kThreads)
    encode_hpass_rowblk_kernel(const uint8_t* __restrict__ plan, void* scratch) {
  extern __shared__ uint8_t sm[];
  __shared__ int s_job;
  const PlanHeader& H = header(plan);
  const int ms = H.max_span;
  for (int64_t b = blockIdx.x; b < H.rowblocks; b += gridDim.x) {
    if (threadIdx.x == 0) s_job = find_job_rowblk(plan, b);
    __syncthreads();
    const JobRec& jb = jobs(plan)[s_job];
    const int r0 = static_cast<int>(b - jb.rowblk0) * kV3Rows;
    const int nr = min(kV3Rows, jb.nr - r0);
    for (int i = 0; i < nr; ++i) hpass_v2_stage(plan, jb, r0 + i, sm + i * 3 * ms, ms, threadIdx.x, blockDim.x);
    __syncthreads();
    hpass_v3_rows<R>(plan, jb, r0, nr, sm, ms, scratch, threadIdx.x, blockDim.x);
    __syncthreads();  // sm and s_job are rewritten by the next iteration
  }
}

// v2 pass 2 (tile layout): threadIdx.y picks the (channel, row) of the block's rows, threadIdx.x four columns.
// v2 launches one (channel, row) per thread (3T / blockDim.y blocks per tile: ~320k blocks of a few microseconds
// for 128 photos); v3 launches kV3Pass2Rows times fewer blocks, each thread walking that many rows (grid stride),
// so that block launch and retirement are not the cost. The element code is v2's either way.
template <int R, int D>
__global__ void encode_vpass_quad_kernel(const uint8_t* __restrict__ plan, const void* scratch, void* out) {
  const PlanHeader& H = header(plan);
  const int T = H.tile;
  for (int crow = blockIdx.x * blockDim.y + threadIdx.y; crow < 3 * T; crow += gridDim.x * blockDim.y) {
    const int c = crow / T, y = crow - c * T;
    for (int64_t t = blockIdx.y; t < H.num_tiles; t += gridDim.y)
      for (int x0 = threadIdx.x * 4; x0 < T; x0 += blockDim.x * 4)
        vpass_v2_quad<R, D>(plan, t, c, y, x0, scratch, out);
  }
}

// v4: one launch, a block per (tile, band of bh output rows) (grid x: bands, y: tiles, both grid-strided); per
// channel the band's intermediate is staged in shared memory, then filtered vertically into the output
// (encode_gpu.h). No scratch in global memory. Bands are uniform over the block, so the barriers are too.
template <int R, int D>
__global__ void __launch_bounds__(kThreads)
    encode_fused_kernel(const uint8_t* __restrict__ plan, void* out, int bh) {
  extern __shared__ uint8_t sm[];
  const PlanHeader& H = header(plan);
  const int T = H.tile;
  const int bands = (T + bh - 1) / bh;
  for (int64_t t = blockIdx.y; t < H.num_tiles; t += gridDim.y) {
    const TileRec& tr = tiles(plan)[t];
    const JobRec& jb = jobs(plan)[tr.job];
    for (int band = blockIdx.x; band < bands; band += gridDim.x) {
      const int y0 = band * bh, y1 = min(y0 + bh, T);
      const V4Band b = v4_band(plan, tr, jb, y0, y1);
      for (int c = 0; c < 3; ++c) {
        if (b.nr > 0) v4_stage<R>(plan, jb, b, c, sm, threadIdx.x, blockDim.x);
        __syncthreads();
        v4_emit<R, D>(plan, t, tr, jb, b, c, y0, y1, sm, out, threadIdx.x, blockDim.x);
        __syncthreads();  // sm is rewritten by the next channel / band
      }
    }
  }
}

template <int R, int D>
void launch_fused(const CudaEncodePlan& plan, const uint8_t* P, void* out, cudaStream_t s, int bh) {
  int level = -1;
  for (int k = 0; k < kV4Levels; ++k)
    if (bh == 1 << k) level = k;
  LF_CHECK(level >= 0, "encode_tiles_cuda: v4 band_rows must be a power of two in [1, 32], got " << bh);
  const size_t smem = static_cast<size_t>(std::max<int64_t>(
      static_cast<int64_t>(plan.band_need[level]) * plan.tile * (R == kU8 ? 1 : 4), 16));
  if (smem > 48 * 1024) {  // opt in to more dynamic shared memory (per device, once per size that grows it)
    static size_t granted[64] = {};
    int dev = 0;
    LF_CHECK(cudaGetDevice(&dev) == cudaSuccess, "encode_tiles_cuda: cudaGetDevice failed");
    if (dev >= 64 || smem > granted[dev]) {
      const cudaError_t e = cudaFuncSetAttribute(encode_fused_kernel<R, D>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      LF_CHECK(e == cudaSuccess, "encode_tiles_cuda: v4 needs " << smem << " bytes of shared memory per block: "
                                     << cudaGetErrorString(e) << " (lower LLAVA_FAST_GPU_ENCODER_SMEM_KB)");
      if (dev < 64) granted[dev] = smem;
    }
  }
  const int64_t bands = (plan.tile + bh - 1) / bh;
  const dim3 grid(static_cast<unsigned>(bands), static_cast<unsigned>(std::min<int64_t>(plan.total_tiles, 65535)));
  encode_fused_kernel<R, D><<<grid, kThreads, smem, s>>>(P, out, bh);
}

template <int R, int D>
void launch(const CudaEncodePlan& plan, const uint8_t* P, void* scratch, void* out, cudaStream_t s, int passes,
            int version, int band_rows) {
  if (version == 4) {
    launch_fused<R, D>(plan, P, out, s, band_rows);
    return;
  }
  if (passes & 1) {
    if (version == 3 && plan.max_span <= kV3MaxSpan) {
      const unsigned b1 = static_cast<unsigned>(std::min<int64_t>(plan.pass1_rowblocks, 1 << 30));
      const size_t smem = static_cast<size_t>(kV3Rows * 3 * std::max<int64_t>(plan.max_span, 1));
      if (b1 > 0) encode_hpass_rowblk_kernel<R><<<b1, kThreads, smem, s>>>(P, scratch);
    } else if (version >= 2 && plan.max_span <= kV2MaxSpan) {
      const unsigned b1 = static_cast<unsigned>(std::min<int64_t>(plan.pass1_rows, 1 << 30));
      const size_t smem = static_cast<size_t>(3 * std::max<int64_t>(plan.max_span, 1));
      if (b1 > 0) encode_hpass_rows_kernel<R><<<b1, kThreads, smem, s>>>(P, scratch);
    } else {
      const unsigned b1 = static_cast<unsigned>(std::min<int64_t>(plan.pass1_blocks, 1 << 30));
      if (b1 > 0) encode_hpass_kernel<R><<<b1, kThreads, 0, s>>>(P, scratch);
    }
  }
  if (!(passes & 2)) return;
  const unsigned tiles = static_cast<unsigned>(std::min<int64_t>(plan.total_tiles, 65535));
  if (version >= 2 && plan.patch == 0) {
    const int64_t T = plan.tile;
    const int64_t quads = (T + 3) / 4;
    const unsigned bx = static_cast<unsigned>(std::min<int64_t>((quads + 31) / 32 * 32, kThreads));
    const unsigned by = std::max(1u, static_cast<unsigned>(kThreads) / bx);
    const int64_t rows_per_block = static_cast<int64_t>(by) * (version == 3 ? kV3Pass2Rows : 1);
    const dim3 grid2(static_cast<unsigned>((3 * T + rows_per_block - 1) / rows_per_block), tiles);
    encode_vpass_quad_kernel<R, D><<<grid2, dim3(bx, by), 0, s>>>(P, scratch, out);
  } else {
    const dim3 grid2(static_cast<unsigned>((plan.tile_elems + kThreads - 1) / kThreads), tiles);
    encode_vpass_kernel<R, D><<<grid2, kThreads, 0, s>>>(P, scratch, out);
  }
}

}  // namespace

void encode_tiles_cuda(const CudaEncodePlan& plan, const void* plan_dev, void* scratch, void* out, int dtype,
                       int64_t capacity_tiles, uintptr_t stream, int passes, int version, int band_rows) {
  LF_CHECK(version >= 1 && version <= 4, "encode_tiles_cuda: version must be 1, 2, 3 or 4, got " << version);
  LF_CHECK(version != 4 || passes == 3, "encode_tiles_cuda: v4 is one fused launch: passes must be 3");
  LF_CHECK(passes >= 1 && passes <= 3, "encode_tiles_cuda: passes must be 1 (horizontal only), 2 (vertical only) or "
                                       "3 (both; the others are for timing)");
  LF_CHECK(dtype >= 0 && dtype <= 2, "encode_tiles: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " << dtype);
  LF_CHECK(capacity_tiles >= plan.total_tiles, "encode_tiles: output holds " << capacity_tiles
                                                   << " tiles but the images need " << plan.total_tiles);
  LF_CHECK(plan_dev != nullptr && out != nullptr, "encode_tiles_cuda: null plan or output pointer");
  LF_CHECK(scratch != nullptr || plan.scratch_elems == 0 || version == 4, "encode_tiles_cuda: null scratch pointer");
  if (plan.total_tiles == 0) return;
  const uint8_t* P = static_cast<const uint8_t*>(plan_dev);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (plan.resample == kU8) {
    if (dtype == 0) launch<kU8, 0>(plan, P, scratch, out, s, passes, version, band_rows);
    if (dtype == 1) launch<kU8, 1>(plan, P, scratch, out, s, passes, version, band_rows);
    if (dtype == 2) launch<kU8, 2>(plan, P, scratch, out, s, passes, version, band_rows);
  } else {
    if (dtype == 0) launch<kF32, 0>(plan, P, scratch, out, s, passes, version, band_rows);
    if (dtype == 1) launch<kF32, 1>(plan, P, scratch, out, s, passes, version, band_rows);
    if (dtype == 2) launch<kF32, 2>(plan, P, scratch, out, s, passes, version, band_rows);
  }
  const cudaError_t err = cudaGetLastError();
  LF_CHECK(err == cudaSuccess, "encode_tiles_cuda: launch failed: " << cudaGetErrorString(err));
}

}  // namespace llava_fast
