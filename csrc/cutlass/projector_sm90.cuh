// Shared part of the projector GEMMs on CUTLASS (csrc/cutlass/projector_sm90*.cu): one translation unit per
// (GEMM, dtype) includes this, so a many-core machine compiles the four in parallel; projector_sm90.cu has
// the C entry points.
//
// Projector GEMMs for Hopper (sm_90a) on CUTLASS 3.x warp-specialized TMA kernels with fused epilogues.
//
// Why: issue 4 asks the projector forward to beat eager (cuBLAS addmm + GELU + cuBLAS addmm) by 1.05x and to reach
// the cuBLASLt GELU epilogue. The Triton GEMM with the GELU epilogue measured 0.88x eager on the H100 and H200: on
// triton 3.6 its epilogue is not overlapped with the next tile's main loop (docs/perf-notes.md, "Projector").
// CUTLASS's ping-pong schedule runs one consumer warp group's epilogue while the other's main loop runs, so the
// first GEMM (K = 1024 or 1152: short, epilogue-heavy) can run at the GEMM's own speed with GELU and the saved
// pre-activation written for free.
//
// What is here (all row-major, bf16 or fp16 in and out, fp32 accumulation and epilogue math):
//   gelu_fwd:   D = gelu_erf(A @ B^T + bias), Aux = A @ B^T + bias (Aux optional: nullptr = inference)
//               A = x (M, K), B = w1 (N, K) as nn.Linear stores it, bias (N) or nullptr.
//   dgelu_bwd:  D = (A @ B) * gelu_erf'(Aux) and, optionally, Act = gelu_erf(Aux)
//               A = dy (M, K), B = w2 (K, N) as nn.Linear stores it (out, in), Aux = h (M, N), Act (M, N).
// Exact erf GELU only (the projector's); the tanh option stays on the Triton kernel.
//
// The library has a C ABI and no torch or Python dependency: llava_fast/_ext.py (cutlass_lib) loads it with ctypes
// and passes pointers, sizes and the CUDA stream, so one build serves every torch version (it is built on the CPU
// machine and carried to the GPU box, or built there from carried headers: docs/gpu-runbook.md). Every entry point
// returns 0 on success or a nonzero code with a message in `err`; Python falls back to the Triton kernel on any
// error.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "common.cuh"

using namespace cute;

namespace llava_fast_cutlass {

// gelu_erf'(z) * d = d * (Phi(z) + z * phi(z)), with Phi the normal CDF and phi its density: the derivative of the
// exact GELU (CUTLASS's dGELU is the tanh approximation's).
template <class T>
struct DGeluErf {
  CUTLASS_HOST_DEVICE T operator()(T const& d, T const& z) const {
    float zf = float(z);
    float cdf = 0.5f * (1.0f + erff(zf * 0.70710678118654752f));
    float pdf = 0.39894228040143268f * expf(-0.5f * zf * zf);
    return T(float(d) * (cdf + zf * pdf));
  }
};

template <class T, int N>
struct DGeluErf<cutlass::Array<T, N>> {
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& d,
                                                      cutlass::Array<T, N> const& z) const {
    cutlass::Array<T, N> y;
    DGeluErf<T> op;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = op(d[i], z[i]);
    return y;
  }
};

// Schedules (tile, cluster, kernel and epilogue policy). Ping-pong: two consumer warp groups on alternate tiles,
// one's epilogue under the other's main loop (the first GEMM: short K, a GELU and two stores per element).
// Cooperative: both warp groups on one tile (the dgrad GEMM: K = 4096, the epilogue reads h once).
// Codes 0 and 1 exist for bf16 and fp16; 2 and 3 (bf16 only) are alternatives for a GPU config sweep
// (bench_projector.py --cutlass-sweep): candidates are built ahead, not on the GPU box (docs/gpu-runbook.md).
template <class Tile_, class Cluster_, bool kPingPong>
struct Schedule {
  using Tile = Tile_;
  using Cluster = Cluster_;
  using Mainloop = cute::conditional_t<kPingPong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                       cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  using Epilogue = cute::conditional_t<kPingPong, cutlass::epilogue::TmaWarpSpecialized,
                                       cutlass::epilogue::TmaWarpSpecializedCooperative>;
};
using PingPong = Schedule<Shape<_128, _128, _64>, Shape<_2, _1, _1>, true>;            // 0
using Cooperative = Schedule<Shape<_128, _256, _64>, Shape<_2, _1, _1>, false>;        // 1
using PingPongC12 = Schedule<Shape<_128, _128, _64>, Shape<_1, _2, _1>, true>;         // 2: A multicast instead of B
using Cooperative256 = Schedule<Shape<_256, _128, _64>, Shape<_1, _2, _1>, false>;     // 3: 128x128 per warp group

template <class Element_, class LayoutB, class Fusion, class Sched>
struct GemmFor {
  using Element = Element_;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 16 / sizeof(Element);

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Sched::Tile, typename Sched::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutD, kAlign,  // no C operand
      Element, LayoutD, kAlign, typename Sched::Epilogue, Fusion>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      typename Sched::Tile, typename Sched::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Sched::Mainloop>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideD = typename Kernel::StrideD;
};

template <class Element>
using FwdAux = cutlass::epilogue::fusion::LinCombPerColBiasEltActAux<
    cutlass::layout::RowMajor, cutlass::epilogue::thread::GELU, Element, float, Element, Element>;
template <class Element>
using Fwd = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<cutlass::epilogue::thread::GELU, Element, float,
                                                               Element>;
template <class Element>
using Dgelu = cutlass::epilogue::fusion::LinCombDeEltAct<cutlass::layout::RowMajor, DGeluErf, Element, float,
                                                         Element>;

// The dgrad epilogue with two outputs, as a DAG (a tree would load h twice):
//   node 0  acc                  (dA = dY @ W2, fp32)
//   node 1  h   = AuxLoad        (the saved pre-activation, TMA into shared memory)
//   node 2  g   = gelu_erf(h)
//   node 3  AuxStore(g) -> act   (a = gelu(h) for dW2 = dY^T a: no separate recompute pass)
//   node 4  D   = acc * gelu_erf'(h)  -> dH (the kernel's D)
// Every node runs in topological order; the last one's value is D. The AuxLoad/AuxStore template arguments are the
// ones CUTLASS's builder derives for its own one-aux fusions (EpilogueDescriptor with C = void, as our builder call).
template <class Element, class Sched>
struct DgeluActEvt {
  using EpiDesc = cutlass::epilogue::collective::detail::EpilogueDescriptor<
      typename Sched::Tile, cutlass::epilogue::collective::EpilogueTileAuto, void, Element, typename Sched::Epilogue>;
  using LoadDesc = cutlass::epilogue::collective::detail::AuxLoadDescriptor<EpiDesc, cutlass::layout::RowMajor,
                                                                            Element>;
  using StoreDesc = cutlass::epilogue::collective::detail::AuxStoreDescriptor<EpiDesc, cutlass::layout::RowMajor,
                                                                              Element>;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
  using HLoad = cutlass::epilogue::fusion::Sm90AuxLoad<LoadDesc::Stages, typename EpiDesc::EpilogueTile, Element,
                                                       typename LoadDesc::Stride, typename LoadDesc::SmemLayoutAtom,
                                                       typename LoadDesc::CopyOpS2R>;
  using Gelu = cutlass::epilogue::fusion::Sm90Compute<cutlass::epilogue::thread::GELU, float, float, kRound>;
  using ActStore = cutlass::epilogue::fusion::Sm90AuxStore<StoreDesc::Stages, typename EpiDesc::EpilogueTile, Element,
                                                           kRound, typename StoreDesc::Stride,
                                                           typename StoreDesc::SmemLayoutAtom,
                                                           typename StoreDesc::CopyOpR2S>;
  using Dgelu = cutlass::epilogue::fusion::Sm90Compute<DGeluErf, Element, float, kRound>;
  using Evt = cutlass::epilogue::fusion::Sm90TopologicalVisitor<
      float, cute::tuple<cute::seq<>, cute::seq<>, cute::seq<1>, cute::seq<2>, cute::seq<0, 1>>,
      cutlass::epilogue::fusion::Sm90AccFetch, HLoad, Gelu, ActStore, Dgelu>;
};

// Packed stride of a (rows, cols, 1) operand for the stride type CUTLASS derived from its layout tag: the mode
// with a static unit stride is the contiguous one (what cutlass/util/packed_stride.hpp does, without tools/util).
template <class Stride>
Stride packed(int rows, int cols) {
  Stride s{};
  if constexpr (cute::is_static<cute::remove_cvref_t<decltype(cute::get<1>(s))>>::value) {
    cute::get<0>(s) = cols;
  } else {
    cute::get<1>(s) = rows;
  }
  cute::get<2>(s) = int64_t(rows) * cols;
  return s;
}

inline int fail(char* err, int errlen, int code, const char* what, cutlass::Status status) {
  if (err && errlen > 0) {
    snprintf(err, errlen, "%s: %s (last CUDA error: %s)", what, cutlass::cutlassGetStatusString(status),
             cudaGetErrorString(cudaGetLastError()));
  }
  return code;
}

// Runs one configured GEMM: the shared part of every entry point (arguments -> can_implement -> initialize -> run).
template <class G>
int run(typename G::Gemm::Arguments& args, void* workspace, size_t workspace_bytes, cudaStream_t stream, char* err,
        int errlen, const char* name) {
  typename G::Gemm gemm;
  cutlass::Status s = gemm.can_implement(args);
  if (s != cutlass::Status::kSuccess) return fail(err, errlen, 2, name, s);
  size_t need = G::Gemm::get_workspace_size(args);
  if (need > workspace_bytes) {
    if (err && errlen > 0) snprintf(err, errlen, "%s: workspace of %zu bytes needed, %zu given", name, need,
                                    workspace_bytes);
    return 3;
  }
  s = gemm.initialize(args, workspace, stream);
  if (s != cutlass::Status::kSuccess) return fail(err, errlen, 4, name, s);
  s = gemm.run(stream);
  if (s != cutlass::Status::kSuccess) return fail(err, errlen, 5, name, s);
  return 0;
}

// The arguments every entry point shares: problem (M, N, K, 1), packed row-major A (M, K), B (N, K) in G's layout,
// no C, D (M, N) row-major; the caller fills the epilogue's thread arguments.
template <class G>
typename G::Gemm::Arguments gemm_args(int M, int N, int K, const void* a, const void* b, void* d) {
  using E = typename G::Element;
  auto sd = packed<typename G::StrideD>(M, N);
  return {cutlass::gemm::GemmUniversalMode::kGemm,
          cute::make_shape(M, N, K, 1),
          {static_cast<const E*>(a), packed<typename G::StrideA>(M, K), static_cast<const E*>(b),
           packed<typename G::StrideB>(N, K)},
          {{}, nullptr, sd, static_cast<E*>(d), sd},
          hw_info()};
}

template <class Element, class Sched>
int gelu_fwd(int M, int N, int K, const void* a, const void* b, const void* bias, void* d, void* aux,
             void* workspace, size_t workspace_bytes, cudaStream_t stream, char* err, int errlen) {
  if (aux) {
    using G = GemmFor<Element, cutlass::layout::ColumnMajor, FwdAux<Element>, Sched>;
    auto args = gemm_args<G>(M, N, K, a, b, d);
    args.epilogue.thread.bias_ptr = static_cast<const Element*>(bias);
    args.epilogue.thread.aux_ptr = static_cast<Element*>(aux);
    args.epilogue.thread.dAux = args.epilogue.dD;
    return run<G>(args, workspace, workspace_bytes, stream, err, errlen, "gelu_fwd (aux)");
  }
  using G = GemmFor<Element, cutlass::layout::ColumnMajor, Fwd<Element>, Sched>;
  auto args = gemm_args<G>(M, N, K, a, b, d);
  args.epilogue.thread.bias_ptr = static_cast<const Element*>(bias);
  return run<G>(args, workspace, workspace_bytes, stream, err, errlen, "gelu_fwd");
}

template <class Element, class Sched>
int dgelu_bwd(int M, int N, int K, const void* a, const void* b, const void* aux, void* d, void* act,
              void* workspace, size_t workspace_bytes, cudaStream_t stream, char* err, int errlen) {
  if (act) {
    using G = GemmFor<Element, cutlass::layout::RowMajor, typename DgeluActEvt<Element, Sched>::Evt, Sched>;
    auto args = gemm_args<G>(M, N, K, a, b, d);
    auto sd = args.epilogue.dD;  // h and act: (M, N) row-major, like D
    // one argument struct per DAG node, in node order: acc, h load, gelu, act store, dgelu
    args.epilogue.thread = {{}, {static_cast<const Element*>(aux), Element(0), sd}, {},
                            {static_cast<Element*>(act), sd}, {}};
    return run<G>(args, workspace, workspace_bytes, stream, err, errlen, "dgelu_bwd (act)");
  }
  using G = GemmFor<Element, cutlass::layout::RowMajor, Dgelu<Element>, Sched>;
  auto args = gemm_args<G>(M, N, K, a, b, d);
  args.epilogue.thread.aux_ptr = static_cast<const Element*>(aux);
  args.epilogue.thread.dAux = args.epilogue.dD;
  return run<G>(args, workspace, workspace_bytes, stream, err, errlen, "dgelu_bwd");
}

// Runs f(Schedule{}) for a schedule code built for Element (0 and 1 always, 2 and 3 for bf16); 1 with a message
// otherwise.
template <class Element, class F>
int with_schedule(int sched, char* err, int errlen, const char* name, F&& f) {
  switch (sched) {
    case 0: return f(PingPong{});
    case 1: return f(Cooperative{});
  }
  if constexpr (cute::is_same_v<Element, cutlass::bfloat16_t>) {
    switch (sched) {
      case 2: return f(PingPongC12{});
      case 3: return f(Cooperative256{});
    }
  }
  if (err && errlen > 0) snprintf(err, errlen, "%s: schedule %d is not built for this dtype", name, sched);
  return 1;
}

// One per translation unit (projector_sm90_{fwd,bwd}_{bf16,f16}.cu).
#define LLAVA_FAST_GELU_FWD_ARGS                                                                                   \
  int sched, int M, int N, int K, const void *a, const void *b, const void *bias, void *d, void *aux,            \
      void *workspace, size_t workspace_bytes, cudaStream_t stream, char *err, int errlen
#define LLAVA_FAST_DGELU_BWD_ARGS                                                                                  \
  int sched, int M, int N, int K, const void *a, const void *b, const void *aux, void *d, void *act,             \
      void *workspace, size_t workspace_bytes, cudaStream_t stream, char *err, int errlen
int gelu_fwd_bf16(LLAVA_FAST_GELU_FWD_ARGS);
int gelu_fwd_f16(LLAVA_FAST_GELU_FWD_ARGS);
int dgelu_bwd_bf16(LLAVA_FAST_DGELU_BWD_ARGS);
int dgelu_bwd_f16(LLAVA_FAST_DGELU_BWD_ARGS);

}  // namespace llava_fast_cutlass
