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

template <int R, int D>
void launch(const CudaEncodePlan& plan, const uint8_t* P, void* scratch, void* out, cudaStream_t s, int passes) {
  const unsigned b1 = static_cast<unsigned>(std::min<int64_t>(plan.pass1_blocks, 1 << 30));
  if (b1 > 0 && (passes & 1)) encode_hpass_kernel<R><<<b1, kThreads, 0, s>>>(P, scratch);
  const dim3 grid2(static_cast<unsigned>((plan.tile_elems + kThreads - 1) / kThreads),
                   static_cast<unsigned>(std::min<int64_t>(plan.total_tiles, 65535)));
  if (passes & 2) encode_vpass_kernel<R, D><<<grid2, kThreads, 0, s>>>(P, scratch, out);
}

}  // namespace

void encode_tiles_cuda(const CudaEncodePlan& plan, const void* plan_dev, void* scratch, void* out, int dtype,
                       int64_t capacity_tiles, uintptr_t stream, int passes) {
  LF_CHECK(passes >= 1 && passes <= 3, "encode_tiles_cuda: passes must be 1 (horizontal only), 2 (vertical only) or "
                                       "3 (both; the others are for timing)");
  LF_CHECK(dtype >= 0 && dtype <= 2, "encode_tiles: dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " << dtype);
  LF_CHECK(capacity_tiles >= plan.total_tiles, "encode_tiles: output holds " << capacity_tiles
                                                   << " tiles but the images need " << plan.total_tiles);
  LF_CHECK(plan_dev != nullptr && out != nullptr, "encode_tiles_cuda: null plan or output pointer");
  LF_CHECK(scratch != nullptr || plan.scratch_elems == 0, "encode_tiles_cuda: null scratch pointer");
  if (plan.total_tiles == 0) return;
  const uint8_t* P = static_cast<const uint8_t*>(plan_dev);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (plan.resample == kU8) {
    if (dtype == 0) launch<kU8, 0>(plan, P, scratch, out, s, passes);
    if (dtype == 1) launch<kU8, 1>(plan, P, scratch, out, s, passes);
    if (dtype == 2) launch<kU8, 2>(plan, P, scratch, out, s, passes);
  } else {
    if (dtype == 0) launch<kF32, 0>(plan, P, scratch, out, s, passes);
    if (dtype == 1) launch<kF32, 1>(plan, P, scratch, out, s, passes);
    if (dtype == 2) launch<kF32, 2>(plan, P, scratch, out, s, passes);
  }
  const cudaError_t err = cudaGetLastError();
  LF_CHECK(err == cudaSuccess, "encode_tiles_cuda: launch failed: " << cudaGetErrorString(err));
}

}  // namespace llava_fast
