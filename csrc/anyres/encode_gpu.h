// The GPU tile encoder's plan layout and per-element code, shared by the CUDA kernels (encode_kernel.cu) and a host
// emulation (encode_cuda_plan.cpp, `_C.encode_tiles_emulate`) that runs the very same element functions on the CPU,
// so the indexing and arithmetic of the kernels are tested on machines without a GPU.
//
// The plan is one byte buffer, computed on the host from the image sizes alone and uploaded once:
//   PlanHeader | ImageRec[num_images] | JobRec[num_jobs] | TileRec[num_tiles] | AxisRec[num_axes] | axis tables
// A job is one antialiased bicubic resize of one (virtual, possibly padded) source image to (out_h, out_w), of
// which only a window of rows [o0, o0+wr) x cols [c0, c0+wc) is kept and placed at (wy, wx) on a tile canvas.
// Pass 1 (horizontal): for every job, the source rows [r0, r0+nr) the window needs, filtered horizontally to the
//   window's wc columns, written planar (3, nr, wc) into scratch (uint8 or fp32).
// Pass 2 (vertical + pad + crop + normalize): one thread per output element (tile, c, y, x) or, in the patch-major
//   layout, (tile, patch, c, dy, dx); canvas pixels outside the job's window are 0 (black) before normalization.
//
// Two arithmetics (`resample`):
//   kU8  = torch's CPU uint8 kernel (int16 weights, one precision per axis, uint8 intermediate clamped and rounded
//          half up): bit-identical to the C++ CPU encoder and to transformers' torchvision backend on CPU.
//   kF32 = torch's CUDA fp32 kernel (float weights computed as upsample_gen2d_aa_out_frame does, fp32 intermediate,
//          no intermediate clamp), then clamp to [0, 255] and round half to even: transformers' torchvision backend
//          with device="cuda".
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/float_convert.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define LF_HD __host__ __device__ __forceinline__
#define LF_UNROLL _Pragma("unroll")
#else
#define LF_HD inline
#define LF_UNROLL
#endif

namespace llava_fast {
namespace gpu_encode {

enum Resample : int32_t { kU8 = 0, kF32 = 1 };

constexpr int kThreads = 256;  // threads per block in both passes (one element each)
// Shared memory per block without the opt-in attribute: 48 KB, dynamic + static (ptxas: 16 bytes for the kernels'
// s_job): hence the 192 bytes below the round numbers (a 16384-column span asked 49152 + 16 bytes: no launch).
constexpr int kV2MaxSpan = 16320;  // v2 pass 1 stages 3 x span bytes in shared memory
constexpr int kV3Rows = 4;         // v3 pass 1: source rows per block
constexpr int kV3MaxSpan = 4080;   // v3 pass 1 stages kV3Rows x 3 x span bytes; wider rows run v2's pass 1
constexpr int kV3Pass2Rows = 8;    // v3 pass 2: (channel, row)s per thread (v2's element code, fewer blocks)
constexpr int kV4Levels = 6;       // v4: band heights 1 << k output rows, k < kV4Levels (1 .. 32)

struct PlanHeader {
  int32_t num_images, num_jobs, num_tiles, num_axes;
  int32_t tile, patch, resample, tile_elems;  // patch 0: (3, T, T) tiles; else (G*G, 3*p*p) per tile, G = T / p
  int64_t off_images, off_jobs, off_tiles, off_axes;
  int64_t pass1_blocks, scratch_elems;
  float shift[3], scale[3];  // out = (v - shift[c]) / scale[c], shift = 255*mean, scale = 255*std
  int32_t rows;              // v2 pass 1: one block per (job, source row); sum of the jobs' nr
  int32_t max_span;          // v2 pass 1: the most source columns one job's row needs (shared memory: 3 x this)
  int32_t rowblocks;         // v3 pass 1: one block per kV3Rows source rows of one job; sum of ceil(nr / kV3Rows)
  int32_t pad_h_;
  // v4: the most intermediate rows one band of 1 << k output rows of any tile needs (its shared memory is
  // band_need[k] x tile x element size); a bound over every run of 1 << k consecutive resized rows of the jobs' axes
  int32_t band_need[kV4Levels];
  int32_t pad_v4_[2];
};

struct ImageRec {
  uint64_t ptr;            // uint8 pixels
  int64_t sy, sx, sc;      // strides in bytes (rows, columns, channels): CHW, HWC or any view
  int32_t h, w;
};

struct AxisRec {
  int32_t in, out, taps, prec;        // taps == 0: identity (in == out)
  int64_t xmin_off, xsize_off, w_off;  // byte offsets into the plan: int32[out], int32[out], int16|float[out*taps]
};

struct JobRec {
  int32_t image, ax_h, ax_w, nr;
  int32_t vh, vw, oy, ox;     // virtual source (vh, vw) with the image at (oy, ox); the rest is `fill`
  int32_t fill[3], r0;        // source rows [r0, r0 + nr) in virtual coordinates
  int32_t c0, wc, o0, wr;     // window: resized cols [c0, c0 + wc), rows [o0, o0 + wr)
  int32_t wy, wx, pad_[2];    // window position on the tile canvas
  int64_t scratch_off;        // element offset of this job's (3, nr, wc) intermediate
  int64_t block0;             // first pass-1 block of this job (v1)
  int32_t row0;               // first pass-1 block of this job (v2: one block per source row)
  int32_t s0, span;           // v2: virtual source columns [s0, s0 + span) that the window's columns read
  int32_t rowblk0;            // first pass-1 block of this job (v3: kV3Rows source rows per block)
};

struct TileRec {
  int32_t job, cy0, cx0, pad_;  // canvas position of the tile's top-left pixel
};

LF_HD const PlanHeader& header(const uint8_t* plan) { return *reinterpret_cast<const PlanHeader*>(plan); }
LF_HD const ImageRec* images(const uint8_t* plan) {
  return reinterpret_cast<const ImageRec*>(plan + header(plan).off_images);
}
LF_HD const JobRec* jobs(const uint8_t* plan) { return reinterpret_cast<const JobRec*>(plan + header(plan).off_jobs); }
LF_HD const TileRec* tiles(const uint8_t* plan) {
  return reinterpret_cast<const TileRec*>(plan + header(plan).off_tiles);
}
LF_HD const AxisRec* axes(const uint8_t* plan) { return reinterpret_cast<const AxisRec*>(plan + header(plan).off_axes); }

// One source byte through the read-only data path on the GPU (the pointer comes from the plan as an integer, so
// the compiler would otherwise emit generic loads).
LF_HD int load_u8(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// The aligned 32-bit word at p (p % 4 == 0) on the GPU: it holds a byte the caller needs, so it lies in mapped
// memory (pages are multiples of 4 bytes). On the host (emulation) only its bytes inside [lo, hi) are read, the others
// are 0: the callers multiply bytes outside their tap window by weight 0, so both give the same sums.
LF_HD uint32_t load_word(const uint8_t* p, const uint8_t* lo, const uint8_t* hi) {
#if defined(__CUDA_ARCH__)
  (void)lo;
  (void)hi;
  return __ldg(reinterpret_cast<const unsigned int*>(p));
#else
  uint32_t w = 0;
  for (int i = 0; i < 4; ++i)
    if (p + i >= lo && p + i < hi) w |= static_cast<uint32_t>(p[i]) << (8 * i);
  return w;
#endif
}

// The 4 bytes starting at bit sh (0, 8, 16 or 24) of the little-endian pair (w0, w1).
LF_HD uint32_t funnel_bytes(uint32_t w0, uint32_t w1, int sh) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(w0, w1, static_cast<unsigned>(sh));
#else
  return sh == 0 ? w0 : (w0 >> sh) | (w1 << (32 - sh));
#endif
}

// c + w.lo16 * b.byte0 + w.hi16 * b.byte1 (HI: bytes 2 and 3), the 16-bit halves of w signed, the bytes of b
// unsigned: PTX dp2a (one instruction, exact integer arithmetic) on the GPU.
template <bool HI>
LF_HD int32_t dp2(uint32_t w, uint32_t b, int32_t c) {
#if defined(__CUDA_ARCH__)
  int32_t d;
  if (HI)
    asm("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(w), "r"(b), "r"(c));
  else
    asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(w), "r"(b), "r"(c));
  return d;
#else
  const int32_t w0 = static_cast<int16_t>(w & 0xffffu), w1 = static_cast<int16_t>(w >> 16);
  const int s = HI ? 16 : 0;
  return c + w0 * static_cast<int32_t>((b >> s) & 0xffu) + w1 * static_cast<int32_t>((b >> (s + 8)) & 0xffu);
#endif
}


// Pixel (vy, vx) channel c of a job's virtual source.
LF_HD int source_pixel(const ImageRec& im, const JobRec& jb, int vy, int vx, int c) {
  const int sy = vy - jb.oy, sx = vx - jb.ox;
  if (sy < 0 || sy >= im.h || sx < 0 || sx >= im.w) return jb.fill[c];
  const uint8_t* p = reinterpret_cast<const uint8_t*>(im.ptr);
  return p[sy * im.sy + sx * im.sx + c * im.sc];
}

LF_HD int clip8_shift(int32_t acc, int prec) {
  const int32_t v = acc >> prec;
  return v < 0 ? 0 : (v > 255 ? 255 : v);
}

// Pass 1 value: virtual row vy, resized column ox, channel c of job jb, filtered horizontally, stored at dst[idx]
// (uint8 for kU8, float for kF32). v1's element, v4's band staging.
template <int R>
LF_HD void hpass_value(const uint8_t* plan, const JobRec& jb, int vy, int ox, int c, void* dst, int64_t idx) {
  const ImageRec& im = images(plan)[jb.image];
  const AxisRec& ax = axes(plan)[jb.ax_w];
  if (ax.taps == 0) {
    const int v = source_pixel(im, jb, vy, ox, c);
    if (R == kU8)
      static_cast<uint8_t*>(dst)[idx] = static_cast<uint8_t>(v);
    else
      static_cast<float*>(dst)[idx] = static_cast<float>(v);
    return;
  }
  const int xmin = reinterpret_cast<const int32_t*>(plan + ax.xmin_off)[ox];
  const int xs = reinterpret_cast<const int32_t*>(plan + ax.xsize_off)[ox];
  // fast path: the whole span inside the real image (no padding involved)
  const int sy = vy - jb.oy, sx0 = xmin - jb.ox;
  const bool inside = sy >= 0 && sy < im.h && sx0 >= 0 && sx0 + xs <= im.w;
  const uint8_t* row = reinterpret_cast<const uint8_t*>(im.ptr) + (inside ? sy * im.sy + sx0 * im.sx + c * im.sc : 0);
  if (R == kU8) {
    const int16_t* k = reinterpret_cast<const int16_t*>(plan + ax.w_off) + static_cast<int64_t>(ox) * ax.taps;
    int32_t acc = 1 << (ax.prec - 1);
    if (inside) {
      for (int j = 0; j < xs; ++j) acc += static_cast<int32_t>(row[j * im.sx]) * k[j];
    } else {
      for (int j = 0; j < xs; ++j) acc += source_pixel(im, jb, vy, xmin + j, c) * k[j];
    }
    static_cast<uint8_t*>(dst)[idx] = static_cast<uint8_t>(clip8_shift(acc, ax.prec));
  } else {
    // torch's interpolate_aa_single_dim: output = t0 * w0; output += t * w
    const float* k = reinterpret_cast<const float*>(plan + ax.w_off) + static_cast<int64_t>(ox) * ax.taps;
    float acc;
    if (inside) {
      acc = static_cast<float>(row[0]) * k[0];
      for (int j = 1; j < xs; ++j) acc += static_cast<float>(row[j * im.sx]) * k[j];
    } else {
      acc = static_cast<float>(source_pixel(im, jb, vy, xmin, c)) * k[0];
      for (int j = 1; j < xs; ++j) acc += static_cast<float>(source_pixel(im, jb, vy, xmin + j, c)) * k[j];
    }
    static_cast<float*>(dst)[idx] = acc;
  }
}

// Pass 1: element e in [0, 3 * nr * wc) of job jb -> scratch.
template <int R>
LF_HD void hpass_element(const uint8_t* plan, const JobRec& jb, uint32_t e, void* scratch) {
  const uint32_t wc = static_cast<uint32_t>(jb.wc);
  const uint32_t plane = static_cast<uint32_t>(jb.nr) * wc;
  const int c = static_cast<int>(e / plane);
  const uint32_t rem = e - static_cast<uint32_t>(c) * plane;
  const int r = static_cast<int>(rem / wc);
  const int x = static_cast<int>(rem - static_cast<uint32_t>(r) * wc);
  hpass_value<R>(plan, jb, jb.r0 + r, jb.c0 + x, c, scratch, jb.scratch_off + e);
}

LF_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);  // IEEE division even under --use_fast_math: equals the CPU path bit for bit
#else
  return a / b;
#endif
}

LF_HD float round_half_even(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);  // default rounding mode: to nearest, ties to even (torch.round)
#endif
}

template <int D>
LF_HD void store_out(void* out, int64_t i, float f) {
#if defined(__CUDA_ARCH__)
  if (D == 0)
    static_cast<float*>(out)[i] = f;
  else if (D == 1)
    static_cast<__half*>(out)[i] = __float2half_rn(f);
  else
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(f);
#else
  if (D == 0)
    static_cast<float*>(out)[i] = f;
  else if (D == 1)
    static_cast<uint16_t*>(out)[i] = float_to_half_bits(f);
  else
    static_cast<uint16_t*>(out)[i] = float_to_bf16_bits(f);
#endif
}

// Pass 2: element e in [0, tile_elems) of output tile `t` (a TileRec) -> out.
template <int R, int D>
LF_HD void vpass_element(const uint8_t* plan, int64_t t, uint32_t e, const void* scratch, void* out) {
  const PlanHeader& H = header(plan);
  const uint32_t T = static_cast<uint32_t>(H.tile);
  uint32_t c, y, x;
  if (H.patch == 0) {
    const uint32_t tt = T * T;
    c = e / tt;
    const uint32_t rem = e - c * tt;
    y = rem / T;
    x = rem - y * T;
  } else {  // patch-major: (patch row-major, then c, dy, dx): the order of conv2d / unfold over a 3 x p x p window
    const uint32_t p = static_cast<uint32_t>(H.patch), pp = p * p, per = 3 * pp, G = T / p;
    const uint32_t patch = e / per;
    uint32_t rem = e - patch * per;
    c = rem / pp;
    rem -= c * pp;
    const uint32_t dy = rem / p, dx = rem - dy * p;
    const uint32_t py = patch / G, px = patch - py * G;
    y = py * p + dy;
    x = px * p + dx;
  }
  const TileRec& tr = tiles(plan)[t];
  const JobRec& jb = jobs(plan)[tr.job];
  const int cy = tr.cy0 + static_cast<int>(y), cx = tr.cx0 + static_cast<int>(x);
  int v = 0;  // canvas padding: black
  if (cy >= jb.wy && cy < jb.wy + jb.wr && cx >= jb.wx && cx < jb.wx + jb.wc) {
    const int o = jb.o0 + (cy - jb.wy);
    const int col = cx - jb.wx;
    const int64_t base = jb.scratch_off + static_cast<int64_t>(c) * jb.nr * jb.wc + col;
    const AxisRec& ax = axes(plan)[jb.ax_h];
    if (R == kU8) {
      const uint8_t* S = static_cast<const uint8_t*>(scratch) + base;
      if (ax.taps == 0) {
        v = S[static_cast<int64_t>(o - jb.r0) * jb.wc];
      } else {
        const int ymin = reinterpret_cast<const int32_t*>(plan + ax.xmin_off)[o];
        const int ys = reinterpret_cast<const int32_t*>(plan + ax.xsize_off)[o];
        const int16_t* k = reinterpret_cast<const int16_t*>(plan + ax.w_off) + static_cast<int64_t>(o) * ax.taps;
        const uint8_t* s = S + static_cast<int64_t>(ymin - jb.r0) * jb.wc;
        int32_t acc = 1 << (ax.prec - 1);
        for (int j = 0; j < ys; ++j) acc += static_cast<int32_t>(s[static_cast<int64_t>(j) * jb.wc]) * k[j];
        v = clip8_shift(acc, ax.prec);
      }
    } else {
      const float* S = static_cast<const float*>(scratch) + base;
      float acc;
      if (ax.taps == 0) {
        acc = S[static_cast<int64_t>(o - jb.r0) * jb.wc];
      } else {
        const int ymin = reinterpret_cast<const int32_t*>(plan + ax.xmin_off)[o];
        const int ys = reinterpret_cast<const int32_t*>(plan + ax.xsize_off)[o];
        const float* k = reinterpret_cast<const float*>(plan + ax.w_off) + static_cast<int64_t>(o) * ax.taps;
        const float* s = S + static_cast<int64_t>(ymin - jb.r0) * jb.wc;
        acc = s[0] * k[0];
        for (int j = 1; j < ys; ++j) acc += s[static_cast<int64_t>(j) * jb.wc] * k[j];
      }
      // torchvision on CUDA: clamp_(0, 255).round_().to(uint8)
      acc = acc < 0.f ? 0.f : (acc > 255.f ? 255.f : acc);
      v = static_cast<int>(round_half_even(acc));
    }
  }
  const float f = div_rn(static_cast<float>(v) - H.shift[c], H.scale[c]);
  store_out<D>(out, t * static_cast<int64_t>(H.tile_elems) + e, f);
}

// The last job whose `field` (a first block index; jobs are sorted by it) is <= b.
template <typename T>
LF_HD int find_job_by(const uint8_t* plan, int64_t b, T JobRec::*field) {
  const JobRec* J = jobs(plan);
  int lo = 0, hi = header(plan).num_jobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (J[mid].*field <= b)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Job owning pass-1 block b of v1 (one block per 256 elements).
LF_HD int find_job(const uint8_t* plan, int64_t b) { return find_job_by(plan, b, &JobRec::block0); }

// ------------------------------------------------------------------------------------------------------------- v2
// Version 2 of both passes (LLAVA_FAST_GPU_ENCODER=v2; same plan, same scratch layout, same arithmetic, so either
// pass of either version can follow the other, and the results are bit-identical to v1's):
// Pass 1: one block per (job, source row). The block stages the row's source span once in shared memory as three
//   uint8 planes (HWC rows: one coalesced byte stream), then each thread filters all three channels of its output
//   columns from shared memory: no per-element integer divisions, no one-byte gathers from global memory.
// Pass 2 (tile layout; the patch layout keeps v1's): four consecutive outputs of one (tile, channel, row) per
//   thread: the row's vertical weights loaded once for the four, one vector store of the four results.

// Job owning v2 pass-1 block b (one block per source row).
LF_HD int find_job_row(const uint8_t* plan, int64_t b) { return find_job_by(plan, b, &JobRec::row0); }

// Stage row r of job jb (virtual row jb.r0 + r, columns [s0, s0 + span)) into sm: plane c at sm + c * ms.
// Threads tid of n (the emulation calls it with 0 of 1).
LF_HD void hpass_v2_stage(const uint8_t* plan, const JobRec& jb, int r, uint8_t* sm, int ms, int tid, int n) {
  const ImageRec& im = images(plan)[jb.image];
  const int vy = jb.r0 + r;
  const int sy = vy - jb.oy, sx0 = jb.s0 - jb.ox;
  const bool inside = sy >= 0 && sy < im.h && sx0 >= 0 && sx0 + jb.span <= im.w;
  const uint8_t* p = reinterpret_cast<const uint8_t*>(im.ptr);
  if (inside && im.sx == 3 && im.sc == 1) {  // HWC row: one contiguous run of 3 * span bytes
    const uint8_t* row = p + sy * im.sy + static_cast<int64_t>(sx0) * 3;
    const int nb = 3 * jb.span;
    for (int i = tid; i < nb; i += n) {
      const int q = i / 3;
      sm[(i - 3 * q) * ms + q] = row[i];
    }
  } else if (inside && im.sx == 1) {  // planar (CHW and views): three contiguous runs
    for (int c = 0; c < 3; ++c) {
      const uint8_t* row = p + sy * im.sy + sx0 + c * im.sc;
      for (int q = tid; q < jb.span; q += n) sm[c * ms + q] = row[q];
    }
  } else {  // padding involved, or another layout
    for (int c = 0; c < 3; ++c)
      for (int q = tid; q < jb.span; q += n)
        sm[c * ms + q] = static_cast<uint8_t>(source_pixel(im, jb, vy, jb.s0 + q, c));
  }
}

// Filter the staged row horizontally: output columns tid, tid + n, ... of the window, all three channels.
template <int R>
LF_HD void hpass_v2_row(const uint8_t* plan, const JobRec& jb, int r, const uint8_t* sm, int ms, void* scratch, int tid,
                        int n) {
  const AxisRec& ax = axes(plan)[jb.ax_w];
  const int64_t plane = static_cast<int64_t>(jb.nr) * jb.wc;
  const int64_t base = jb.scratch_off + static_cast<int64_t>(r) * jb.wc;
  for (int x = tid; x < jb.wc; x += n) {
    const int ox = jb.c0 + x;
    if (ax.taps == 0) {
      for (int c = 0; c < 3; ++c) {
        const uint8_t v = sm[c * ms + ox - jb.s0];
        if (R == kU8)
          static_cast<uint8_t*>(scratch)[base + c * plane + x] = v;
        else
          static_cast<float*>(scratch)[base + c * plane + x] = static_cast<float>(v);
      }
      continue;
    }
    const int xmin = reinterpret_cast<const int32_t*>(plan + ax.xmin_off)[ox];
    const int xs = reinterpret_cast<const int32_t*>(plan + ax.xsize_off)[ox];
    const uint8_t* s = sm + (xmin - jb.s0);
    if (R == kU8) {
      const int16_t* k = reinterpret_cast<const int16_t*>(plan + ax.w_off) + static_cast<int64_t>(ox) * ax.taps;
      int32_t a0 = 1 << (ax.prec - 1), a1 = a0, a2 = a0;
      for (int j = 0; j < xs; ++j) {
        const int32_t kj = k[j];
        a0 += static_cast<int32_t>(s[j]) * kj;
        a1 += static_cast<int32_t>(s[ms + j]) * kj;
        a2 += static_cast<int32_t>(s[2 * ms + j]) * kj;
      }
      uint8_t* d = static_cast<uint8_t*>(scratch) + base + x;
      d[0] = static_cast<uint8_t>(clip8_shift(a0, ax.prec));
      d[plane] = static_cast<uint8_t>(clip8_shift(a1, ax.prec));
      d[2 * plane] = static_cast<uint8_t>(clip8_shift(a2, ax.prec));
    } else {  // the same expression as v1 (first product, then += in tap order): the same bits
      const float* k = reinterpret_cast<const float*>(plan + ax.w_off) + static_cast<int64_t>(ox) * ax.taps;
      float a[3];
      for (int c = 0; c < 3; ++c) {
        const uint8_t* sc = s + c * ms;
        float acc = static_cast<float>(sc[0]) * k[0];
        for (int j = 1; j < xs; ++j) acc += static_cast<float>(sc[j]) * k[j];
        a[c] = acc;
      }
      float* d = static_cast<float*>(scratch) + base + x;
      d[0] = a[0];
      d[plane] = a[1];
      d[2 * plane] = a[2];
    }
  }
}

// ------------------------------------------------------------------------------------------------------------- v3
// Version 3 of pass 1 (LLAVA_FAST_GPU_ENCODER=v3; pass 2 is v2's element code, launched with kV3Pass2Rows rows per
// thread, encode_kernel.cu): a block per kV3Rows consecutive source rows of
// one job instead of one row. Written without a GPU (session 4) after the H100 run measured v2's pass 1 at 3.8 ms
// for 128 photos (~180 GB/s): ~250k blocks, each a chain of dependent loads (a binary search over the jobs, the
// staging, then per output column its xmin / size / weights) around ~80 multiply-adds per thread, i.e. latency-bound.
// Here the job search, the column's xmin, size and weights, and the barriers are paid once per kV3Rows rows, and a
// thread has kV3Rows x 3 independent accumulators. Same expressions per output as v2 (integer taps: exact; float:
// first product, then += in tap order per accumulator), so the same bits.

// Job owning v3 pass-1 block b.
LF_HD int find_job_rowblk(const uint8_t* plan, int64_t b) { return find_job_by(plan, b, &JobRec::rowblk0); }

// Filter rows r0 .. r0 + nr - 1 (nr <= kV3Rows) of job jb, staged at sm + i * 3 * ms (row i, plane c at + c * ms).
template <int R>
LF_HD void hpass_v3_rows(const uint8_t* plan, const JobRec& jb, int r0, int nr, const uint8_t* sm, int ms,
                         void* scratch, int tid, int n) {
  const AxisRec& ax = axes(plan)[jb.ax_w];
  const int64_t plane = static_cast<int64_t>(jb.nr) * jb.wc;
  const int64_t base = jb.scratch_off + static_cast<int64_t>(r0) * jb.wc;
  const int rs = 3 * ms;  // staged row stride
  for (int x = tid; x < jb.wc; x += n) {
    const int ox = jb.c0 + x;
    if (ax.taps == 0) {
      for (int i = 0; i < nr; ++i)
        for (int c = 0; c < 3; ++c) {
          const uint8_t v = sm[i * rs + c * ms + ox - jb.s0];
          const int64_t o = base + static_cast<int64_t>(i) * jb.wc + c * plane + x;
          if (R == kU8)
            static_cast<uint8_t*>(scratch)[o] = v;
          else
            static_cast<float*>(scratch)[o] = static_cast<float>(v);
        }
      continue;
    }
    const int xmin = reinterpret_cast<const int32_t*>(plan + ax.xmin_off)[ox];
    const int xs = reinterpret_cast<const int32_t*>(plan + ax.xsize_off)[ox];
    const uint8_t* s = sm + (xmin - jb.s0);
    if (R == kU8) {
      const int16_t* k = reinterpret_cast<const int16_t*>(plan + ax.w_off) + static_cast<int64_t>(ox) * ax.taps;
      int32_t a[kV3Rows][3];
#pragma unroll
      for (int i = 0; i < kV3Rows; ++i) a[i][0] = a[i][1] = a[i][2] = 1 << (ax.prec - 1);
      for (int j = 0; j < xs; ++j) {
        const int32_t kj = k[j];
#pragma unroll
        for (int i = 0; i < kV3Rows; ++i) {
          if (i < nr) {
            const uint8_t* si = s + i * rs + j;
            a[i][0] += static_cast<int32_t>(si[0]) * kj;
            a[i][1] += static_cast<int32_t>(si[ms]) * kj;
            a[i][2] += static_cast<int32_t>(si[2 * ms]) * kj;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kV3Rows; ++i) {
        if (i < nr) {
          uint8_t* d = static_cast<uint8_t*>(scratch) + base + static_cast<int64_t>(i) * jb.wc + x;
          d[0] = static_cast<uint8_t>(clip8_shift(a[i][0], ax.prec));
          d[plane] = static_cast<uint8_t>(clip8_shift(a[i][1], ax.prec));
          d[2 * plane] = static_cast<uint8_t>(clip8_shift(a[i][2], ax.prec));
        }
      }
    } else {
      const float* k = reinterpret_cast<const float*>(plan + ax.w_off) + static_cast<int64_t>(ox) * ax.taps;
      float a[kV3Rows][3];
      const float k0 = k[0];
#pragma unroll
      for (int i = 0; i < kV3Rows; ++i)
        for (int c = 0; c < 3; ++c) a[i][c] = i < nr ? static_cast<float>(s[i * rs + c * ms]) * k0 : 0.f;
      for (int j = 1; j < xs; ++j) {
        const float kj = k[j];
#pragma unroll
        for (int i = 0; i < kV3Rows; ++i)
          if (i < nr)
            for (int c = 0; c < 3; ++c) a[i][c] += static_cast<float>(s[i * rs + c * ms + j]) * kj;
      }
#pragma unroll
      for (int i = 0; i < kV3Rows; ++i) {
        if (i < nr) {
          float* d = static_cast<float*>(scratch) + base + static_cast<int64_t>(i) * jb.wc + x;
          d[0] = a[i][0];
          d[plane] = a[i][1];
          d[2 * plane] = a[i][2];
        }
      }
    }
  }
}

// Vertical filter of four consecutive intermediate columns q in [lo, hi) for resized row o (axis ax), then the
// clamp / round of the arithmetic: v[q] in [0, 255]. S points at column 0 of the four in the intermediate row whose
// virtual source row is row_base (uint8 for kU8, float for kF32), rows `stride` elements apart. v2 reads the scratch
// of pass 1, v4 the band staged in shared memory; the expressions are v1's, in v1's order.
template <int R>
LF_HD void vfilter_quad(const uint8_t* plan, const AxisRec& ax, int o, const void* S, int64_t stride, int row_base,
                        int lo, int hi, int v[4]) {
  if (R == kU8) {
    const uint8_t* S8 = static_cast<const uint8_t*>(S);
    if (ax.taps == 0) {
      const uint8_t* s = S8 + static_cast<int64_t>(o - row_base) * stride;
      LF_UNROLL for (int q = 0; q < 4; ++q) if (q >= lo && q < hi) v[q] = s[q];
    } else {
      const int ymin = reinterpret_cast<const int32_t*>(plan + ax.xmin_off)[o];
      const int ys = reinterpret_cast<const int32_t*>(plan + ax.xsize_off)[o];
      const int16_t* k = reinterpret_cast<const int16_t*>(plan + ax.w_off) + static_cast<int64_t>(o) * ax.taps;
      const uint8_t* s = S8 + static_cast<int64_t>(ymin - row_base) * stride;
      int32_t acc[4];
      LF_UNROLL for (int q = 0; q < 4; ++q) acc[q] = 1 << (ax.prec - 1);
      for (int j = 0; j < ys; ++j) {
        const int32_t kj = k[j];
        const uint8_t* sj = s + static_cast<int64_t>(j) * stride;
        LF_UNROLL for (int q = 0; q < 4; ++q) if (q >= lo && q < hi) acc[q] += static_cast<int32_t>(sj[q]) * kj;
      }
      LF_UNROLL for (int q = 0; q < 4; ++q) if (q >= lo && q < hi) v[q] = clip8_shift(acc[q], ax.prec);
    }
    return;
  }
  const float* SF = static_cast<const float*>(S);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (ax.taps == 0) {
    const float* s = SF + static_cast<int64_t>(o - row_base) * stride;
    LF_UNROLL for (int q = 0; q < 4; ++q) if (q >= lo && q < hi) acc[q] = s[q];
  } else {
    const int ymin = reinterpret_cast<const int32_t*>(plan + ax.xmin_off)[o];
    const int ys = reinterpret_cast<const int32_t*>(plan + ax.xsize_off)[o];
    const float* k = reinterpret_cast<const float*>(plan + ax.w_off) + static_cast<int64_t>(o) * ax.taps;
    const float* s = SF + static_cast<int64_t>(ymin - row_base) * stride;
    LF_UNROLL for (int q = 0; q < 4; ++q) if (q >= lo && q < hi) acc[q] = s[q] * k[0];
    for (int j = 1; j < ys; ++j) {
      const float kj = k[j];
      const float* sj = s + static_cast<int64_t>(j) * stride;
      LF_UNROLL for (int q = 0; q < 4; ++q) if (q >= lo && q < hi) acc[q] += sj[q] * kj;
    }
  }
  LF_UNROLL for (int q = 0; q < 4; ++q) {  // torchvision on CUDA: clamp_(0, 255).round_().to(uint8)
    if (q >= lo && q < hi) {
      const float a = acc[q] < 0.f ? 0.f : (acc[q] > 255.f ? 255.f : acc[q]);
      v[q] = static_cast<int>(round_half_even(a));
    }
  }
}

// Normalize four grey levels of channel c and store the first nx at out[i0 ..] (one 16-byte / 8-byte store on the
// GPU when aligned).
template <int D>
LF_HD void store_quad(const PlanHeader& H, void* out, int64_t i0, int c, int nx, const int v[4]) {
  float f[4];
  LF_UNROLL for (int q = 0; q < 4; ++q) f[q] = div_rn(static_cast<float>(v[q]) - H.shift[c], H.scale[c]);
#if defined(__CUDA_ARCH__)
  if (nx == 4) {
    if (D == 0) {
      float* p = static_cast<float*>(out) + i0;
      if ((reinterpret_cast<uintptr_t>(p) & 15) == 0) {
        *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
        return;
      }
    } else {
      uint16_t* p = static_cast<uint16_t*>(out) + i0;
      if ((reinterpret_cast<uintptr_t>(p) & 7) == 0) {
        uint16_t b[4];
        LF_UNROLL for (int q = 0; q < 4; ++q) {
          if (D == 1)
            b[q] = __half_as_ushort(__float2half_rn(f[q]));
          else
            b[q] = __bfloat16_as_ushort(__float2bfloat16_rn(f[q]));
        }
        *reinterpret_cast<uint2*>(p) = make_uint2(static_cast<uint32_t>(b[0]) | (static_cast<uint32_t>(b[1]) << 16),
                                                  static_cast<uint32_t>(b[2]) | (static_cast<uint32_t>(b[3]) << 16));
        return;
      }
    }
  }
#endif
  LF_UNROLL for (int q = 0; q < 4; ++q) if (q < nx) store_out<D>(out, i0 + q, f[q]);
}

// Pass 2 v2, tile layout: outputs x0 .. x0 + 3 (those < T) of row y, channel c of tile t.
template <int R, int D>
LF_HD void vpass_v2_quad(const uint8_t* plan, int64_t t, int c, int y, int x0, const void* scratch, void* out) {
  const PlanHeader& H = header(plan);
  const int T = H.tile;
  const int nx = T - x0 < 4 ? T - x0 : 4;
  const TileRec& tr = tiles(plan)[t];
  const JobRec& jb = jobs(plan)[tr.job];
  const int cy = tr.cy0 + y, cx = tr.cx0 + x0;
  int v[4] = {0, 0, 0, 0};  // canvas padding: black
  // window columns of the four outputs: q in [lo, hi)
  int lo = jb.wx - cx, hi = jb.wx + jb.wc - cx;
  lo = lo < 0 ? 0 : lo;
  hi = hi > nx ? nx : hi;
  if (cy >= jb.wy && cy < jb.wy + jb.wr && lo < hi) {
    const int o = jb.o0 + (cy - jb.wy);
    const int col = cx - jb.wx;  // window column of output q: col + q
    const int64_t base = jb.scratch_off + static_cast<int64_t>(c) * jb.nr * jb.wc + col;
    const void* S = R == kU8 ? static_cast<const void*>(static_cast<const uint8_t*>(scratch) + base)
                             : static_cast<const void*>(static_cast<const float*>(scratch) + base);
    vfilter_quad<R>(plan, axes(plan)[jb.ax_h], o, S, jb.wc, jb.r0, lo, hi, v);
  }
  const int64_t i0 = t * static_cast<int64_t>(H.tile_elems) + static_cast<int64_t>(c) * T * T +
                     static_cast<int64_t>(y) * T + x0;
  store_quad<D>(H, out, i0, c, nx, v);
}

// ------------------------------------------------------------------------------------------------------------- v4
// Version 4 (LLAVA_FAST_GPU_ENCODER=v4): one launch, no intermediate in global memory. A block per (tile, band of
// BH output rows): per channel, it filters horizontally the intermediate rows the band's output rows read (and only
// the tile's columns) into shared memory, then filters them vertically, normalizes and stores the band. Written
// without a GPU (session 6) after the H100 run measured v2's two passes at 3.8 + 3.0 ms for 128 photos, ~10x from
// the bandwidth floor: the intermediate's round trip through L2/DRAM goes, and with it pass 1's per-row blocks.
// The cost: the rows around a band's edges are filtered twice (by both neighbouring bands; (taps - 1) / (BH x
// scale) extra, ~20% at BH 32 and 1.5x downscale). The values are v1's expressions in v1's order (hpass_value,
// vfilter_quad), so the same bits.

struct V4Band {
  int ya, nr;        // intermediate rows: virtual source rows [ya, ya + nr) (nr 0: the band is all padding)
  int colA, ncol;    // window columns [colA, colA + ncol) that the tile covers
  int tx0;           // the tile column of window column colA (staged rows are indexed by tile column)
};

// Which intermediate rows and window columns the output rows [y0, y1) of tile tr (on job jb) read.
LF_HD V4Band v4_band(const uint8_t* plan, const TileRec& tr, const JobRec& jb, int y0, int y1) {
  V4Band b{0, 0, 0, 0, 0};
  const int T = header(plan).tile;
  int cya = tr.cy0 + y0, cyb = tr.cy0 + y1;  // canvas rows of the band, clipped to the window
  cya = cya > jb.wy ? cya : jb.wy;
  cyb = cyb < jb.wy + jb.wr ? cyb : jb.wy + jb.wr;
  int ca = tr.cx0 > jb.wx ? tr.cx0 : jb.wx, cb = tr.cx0 + T < jb.wx + jb.wc ? tr.cx0 + T : jb.wx + jb.wc;
  if (cya >= cyb || ca >= cb) return b;
  b.colA = ca - jb.wx;
  b.ncol = cb - ca;
  b.tx0 = ca - tr.cx0;
  const int oa = jb.o0 + (cya - jb.wy), ob = jb.o0 + (cyb - jb.wy);  // resized rows [oa, ob)
  const AxisRec& ax = axes(plan)[jb.ax_h];
  if (ax.taps == 0) {
    b.ya = oa;
    b.nr = ob - oa;
    return b;
  }
  const int32_t* xmin = reinterpret_cast<const int32_t*>(plan + ax.xmin_off);
  const int32_t* xsize = reinterpret_cast<const int32_t*>(plan + ax.xsize_off);
  int lo = xmin[oa], hi = xmin[oa] + xsize[oa];
  for (int o = oa + 1; o < ob; ++o) {
    lo = xmin[o] < lo ? xmin[o] : lo;
    hi = xmin[o] + xsize[o] > hi ? xmin[o] + xsize[o] : hi;
  }
  b.ya = lo;
  b.nr = hi - lo;
  return b;
}

constexpr int kV4StageRows = 4;  // v4 staging: intermediate rows per thread (one column's weights loaded once)

// The uint8 horizontal filter of NR planar rows (rows sy bytes apart, the first tap of row 0 at p0; the image row
// starts x0 bytes before it and holds w bytes), as hpass_value computes it (integer sums: any order, same bits):
// one aligned 32-bit load brings 4 taps, a funnel shift lines them up when the row's first tap is not 4-byte
// aligned. Branch-free: when the next word holds no needed byte the current one is loaded again (its bytes then
// meet zero weights). acc[r] = 1 << (prec - 1) + sum of the taps.
template <int NR>
LF_HD void taps_planar(const uint8_t* p0, int64_t sy, int x0, int w, int xs, const int16_t* k, int prec,
                       int32_t* acc) {
  int sh[NR], al[NR];
  const uint8_t* wp[NR];
  const uint8_t* lo[NR];
  uint32_t cur[NR];
  LF_UNROLL for (int r = 0; r < NR; ++r) {
    const uint8_t* p = p0 + r * sy;
    al[r] = static_cast<int>(reinterpret_cast<uintptr_t>(p) & 3u);
    sh[r] = 8 * al[r];
    wp[r] = p - al[r];
    lo[r] = p - x0;
    cur[r] = load_word(wp[r], lo[r], lo[r] + w);
    acc[r] = 1 << (prec - 1);
  }
  for (int j0 = 0; j0 < xs; j0 += 4) {
    uint32_t kt[4];  // the weights' raw 16-bit patterns (dp2 reads them as signed), 0 past the window
    LF_UNROLL for (int t = 0; t < 4; ++t) kt[t] = j0 + t < xs ? reinterpret_cast<const uint16_t*>(k)[j0 + t] : 0u;
    const uint32_t k01 = kt[0] | (kt[1] << 16), k23 = kt[2] | (kt[3] << 16);
    LF_UNROLL for (int r = 0; r < NR; ++r) {
      const int nw = j0 + 4 < al[r] + xs ? j0 + 4 : j0;  // the next word, if it holds a needed byte
      const uint32_t nxt = load_word(wp[r] + nw, lo[r], lo[r] + w);
      const uint32_t v = funnel_bytes(cur[r], nxt, sh[r]);
      acc[r] = dp2<true>(k23, v, dp2<false>(k01, v, acc[r]));
      cur[r] = nxt;
    }
  }
}

// Intermediate values of virtual rows vy0 .. vy0 + nrr - 1 (nrr <= kV4StageRows), resized column ox, channel c, to
// dst[idx + r * stride]: hpass_value's expressions, with the column's start, size and weights loaded once for the
// rows and nrr independent accumulators; rows that touch padding go through hpass_value itself.
template <int R>
LF_HD void hpass_rows(const uint8_t* plan, const JobRec& jb, int vy0, int nrr, int ox, int c, void* dst, int64_t idx,
                      int64_t stride) {
  const ImageRec& im = images(plan)[jb.image];
  const AxisRec& ax = axes(plan)[jb.ax_w];
  int xmin = 0, xs = 0;
  bool all_inside = ax.taps != 0;
  if (all_inside) {
    xmin = reinterpret_cast<const int32_t*>(plan + ax.xmin_off)[ox];
    xs = reinterpret_cast<const int32_t*>(plan + ax.xsize_off)[ox];
    const int sy0 = vy0 - jb.oy, sx0 = xmin - jb.ox;
    all_inside = sy0 >= 0 && sy0 + nrr <= im.h && sx0 >= 0 && sx0 + xs <= im.w;
  }
  // the taps' byte offsets from the first row's first tap in 32 bits (the 64-bit stride products per load were
  // most of the loop's instructions); a span that does not fit (rows over ~700 MB) takes the generic path
  all_inside = all_inside && im.sy * kV4StageRows + im.sx * xs < (int64_t{1} << 31);
  if (!all_inside) {
    for (int r = 0; r < nrr; ++r) hpass_value<R>(plan, jb, vy0 + r, ox, c, dst, idx + r * stride);
    return;
  }
  const uint8_t* row = reinterpret_cast<const uint8_t*>(im.ptr) + (vy0 - jb.oy) * im.sy + (xmin - jb.ox) * im.sx +
                       c * im.sc;
  const uint32_t sx = static_cast<uint32_t>(im.sx);
  uint32_t ro[kV4StageRows];  // byte offset of each row (unsigned: zero-extended into the 64-bit address for free)
  LF_UNROLL for (int r = 0; r < kV4StageRows; ++r) ro[r] = static_cast<uint32_t>(r * im.sy);
  if (R == kU8 && sx == 1) {  // planar rows: 4 taps per aligned 32-bit load (taps_planar)
    const int16_t* k = reinterpret_cast<const int16_t*>(plan + ax.w_off) + static_cast<int64_t>(ox) * ax.taps;
    int32_t acc[kV4StageRows];
    if (nrr == kV4StageRows) {
      taps_planar<kV4StageRows>(row, im.sy, xmin - jb.ox, im.w, xs, k, ax.prec, acc);
    } else {
      for (int r = 0; r < nrr; ++r)
        taps_planar<1>(row + r * im.sy, im.sy, xmin - jb.ox, im.w, xs, k, ax.prec, acc + r);
    }
    for (int r = 0; r < nrr; ++r)
      static_cast<uint8_t*>(dst)[idx + r * stride] = static_cast<uint8_t>(clip8_shift(acc[r], ax.prec));
  } else if (R == kU8) {
    const int16_t* k = reinterpret_cast<const int16_t*>(plan + ax.w_off) + static_cast<int64_t>(ox) * ax.taps;
    int32_t acc[kV4StageRows];
    LF_UNROLL for (int r = 0; r < kV4StageRows; ++r) acc[r] = 1 << (ax.prec - 1);
    for (int j = 0; j < xs; ++j) {
      const int32_t kj = k[j];
      LF_UNROLL for (int r = 0; r < kV4StageRows; ++r) {
        if (r < nrr) acc[r] += load_u8(row + ro[r]) * kj;
        ro[r] += sx;
      }
    }
    LF_UNROLL for (int r = 0; r < kV4StageRows; ++r) {
      if (r < nrr) static_cast<uint8_t*>(dst)[idx + r * stride] = static_cast<uint8_t>(clip8_shift(acc[r], ax.prec));
    }
  } else {  // per row: first product, then += in tap order (hpass_value's inside path)
    const float* k = reinterpret_cast<const float*>(plan + ax.w_off) + static_cast<int64_t>(ox) * ax.taps;
    float acc[kV4StageRows];
    const float k0 = k[0];
    LF_UNROLL for (int r = 0; r < kV4StageRows; ++r) {
      acc[r] = r < nrr ? static_cast<float>(load_u8(row + ro[r])) * k0 : 0.f;
      ro[r] += sx;
    }
    for (int j = 1; j < xs; ++j) {
      const float kj = k[j];
      LF_UNROLL for (int r = 0; r < kV4StageRows; ++r) {
        if (r < nrr) acc[r] += static_cast<float>(load_u8(row + ro[r])) * kj;
        ro[r] += sx;
      }
    }
    LF_UNROLL for (int r = 0; r < kV4StageRows; ++r) {
      if (r < nrr) static_cast<float*>(dst)[idx + r * stride] = acc[r];
    }
  }
}

// Stage channel c of the band: sm[rr * T + tx0 + x] = intermediate (virtual row ya + rr, window column colA + x),
// i.e. rows of T values indexed by tile column (so that an output quad starts 4-byte aligned: vfilter_quad_dp2).
// Thread item = (column, run of kV4StageRows rows), consecutive threads on consecutive columns.
template <int R>
LF_HD void v4_stage(const uint8_t* plan, const JobRec& jb, const V4Band& b, int c, void* sm, int tid, int n) {
  const int T = header(plan).tile;
  const int runs = (b.nr + kV4StageRows - 1) / kV4StageRows;
  const int items = runs * b.ncol;
  for (int i = tid; i < items; i += n) {
    const int run = i / b.ncol, x = i - run * b.ncol;
    const int rr = run * kV4StageRows;
    const int nrr = b.nr - rr < kV4StageRows ? b.nr - rr : kV4StageRows;
    hpass_rows<R>(plan, jb, b.ya + rr, nrr, jb.c0 + b.colA + x, c, sm, static_cast<int64_t>(rr) * T + b.tx0 + x, T);
  }
}

// A 4-byte-aligned word of shared memory (or of the emulation's buffer).
LF_HD uint32_t sm_word(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
#endif
}

// Bytes (a.b0, b.b0, a.b1, b.b1) (HI: bytes 2 and 3): the same columns of two rows side by side, as dp2 pairs them.
template <bool HI>
LF_HD uint32_t interleave(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, HI ? 0x7362u : 0x5140u);
#else
  const int s = HI ? 16 : 0;
  return ((a >> s) & 0xffu) | (((b >> s) & 0xffu) << 8) | (((a >> (s + 8)) & 0xffu) << 16) |
         (((b >> (s + 8)) & 0xffu) << 24);
#endif
}

// vfilter_quad for the uint8 arithmetic when S (the quad's first column) and the row stride are multiples of 4
// bytes: all four outputs of resized row o, two taps at a time (one word of each row, interleaved, then dp2 per
// output: ~1 instruction per tap and output instead of a byte load and a multiply-add). Integer sums: the bits of
// vfilter_quad<kU8>. Outputs outside the caller's window range get values the caller discards.
LF_HD void vfilter_quad_dp2(const uint8_t* plan, const AxisRec& ax, int o, const uint8_t* S, int64_t stride,
                            int row_base, int v[4]) {
  if (ax.taps == 0) {
    const uint32_t w = sm_word(S + static_cast<int64_t>(o - row_base) * stride);
    LF_UNROLL for (int q = 0; q < 4; ++q) v[q] = static_cast<int>((w >> (8 * q)) & 0xffu);
    return;
  }
  const int ymin = reinterpret_cast<const int32_t*>(plan + ax.xmin_off)[o];
  const int ys = reinterpret_cast<const int32_t*>(plan + ax.xsize_off)[o];
  const uint16_t* k = reinterpret_cast<const uint16_t*>(plan + ax.w_off) + static_cast<int64_t>(o) * ax.taps;
  const uint8_t* s = S + static_cast<int64_t>(ymin - row_base) * stride;
  int32_t acc[4];
  LF_UNROLL for (int q = 0; q < 4; ++q) acc[q] = 1 << (ax.prec - 1);
  for (int j = 0; j < ys; j += 2) {
    const bool two = j + 1 < ys;  // an odd last tap pairs with itself at weight 0
    const uint32_t w0 = sm_word(s + static_cast<int64_t>(j) * stride);
    const uint32_t w1 = two ? sm_word(s + static_cast<int64_t>(j + 1) * stride) : w0;
    const uint32_t kk = static_cast<uint32_t>(k[j]) | (two ? static_cast<uint32_t>(k[j + 1]) << 16 : 0u);
    const uint32_t lo = interleave<false>(w0, w1), hi = interleave<true>(w0, w1);
    acc[0] = dp2<false>(kk, lo, acc[0]);
    acc[1] = dp2<true>(kk, lo, acc[1]);
    acc[2] = dp2<false>(kk, hi, acc[2]);
    acc[3] = dp2<true>(kk, hi, acc[3]);
  }
  LF_UNROLL for (int q = 0; q < 4; ++q) v[q] = clip8_shift(acc[q], ax.prec);
}

// Output rows [y0, y1) of channel c of tile t from the staged band: four outputs per thread in the tile layout,
// one in the patch layout.
template <int R, int D>
LF_HD void v4_emit(const uint8_t* plan, int64_t t, const TileRec& tr, const JobRec& jb, const V4Band& b, int c,
                   int y0, int y1, const void* sm, void* out, int tid, int n) {
  const PlanHeader& H = header(plan);
  const int T = H.tile;
  const AxisRec& ax = axes(plan)[jb.ax_h];
  const int64_t tbase = t * static_cast<int64_t>(H.tile_elems);
  const int wstep = H.patch == 0 ? 4 : 1;  // outputs per thread
  const int per_row = (T + wstep - 1) / wstep;
  const int items = (y1 - y0) * per_row;
  for (int i = tid; i < items; i += n) {
    const int yi = i / per_row;
    const int y = y0 + yi, x0 = (i - yi * per_row) * wstep;
    const int nx = T - x0 < wstep ? T - x0 : wstep;
    const int cy = tr.cy0 + y, cx = tr.cx0 + x0;
    int v[4] = {0, 0, 0, 0};  // canvas padding: black
    int lo = jb.wx - cx, hi = jb.wx + jb.wc - cx;  // window columns of the outputs: q in [lo, hi)
    lo = lo < 0 ? 0 : lo;
    hi = hi > nx ? nx : hi;
    if (b.nr > 0 && cy >= jb.wy && cy < jb.wy + jb.wr && lo < hi) {
      const int o = jb.o0 + (cy - jb.wy);
      if (R == kU8 && H.patch == 0 && (T & 3) == 0) {  // x0 and the row stride T: multiples of 4
        int w4[4];
        vfilter_quad_dp2(plan, ax, o, static_cast<const uint8_t*>(sm) + x0, T, b.ya, w4);
        LF_UNROLL for (int q = 0; q < 4; ++q) v[q] = q >= lo && q < hi ? w4[q] : 0;
      } else {  // staged rows are indexed by tile column: output q reads column x0 + q (q in [lo, hi) only)
        const void* S = R == kU8 ? static_cast<const void*>(static_cast<const uint8_t*>(sm) + x0)
                                 : static_cast<const void*>(static_cast<const float*>(sm) + x0);
        vfilter_quad<R>(plan, ax, o, S, T, b.ya, lo, hi, v);
      }
    }
    if (H.patch == 0) {
      store_quad<D>(H, out, tbase + static_cast<int64_t>(c) * T * T + static_cast<int64_t>(y) * T + x0, c, nx, v);
    } else {  // patch-major: (patch row-major, then c, dy, dx); rows and columns past G * p are not in the layout
      const int p = H.patch, G = T / p;
      if (y >= G * p || x0 >= G * p) continue;
      const int py = y / p, dy = y - py * p, px = x0 / p, dx = x0 - px * p;
      const int64_t e = static_cast<int64_t>(py * G + px) * 3 * p * p + static_cast<int64_t>(c) * p * p + dy * p + dx;
      store_out<D>(out, tbase + e, div_rn(static_cast<float>(v[0]) - H.shift[c], H.scale[c]));
    }
  }
}

}  // namespace gpu_encode
}  // namespace llava_fast
