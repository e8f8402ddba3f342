// The GELU forward GEMMs in f16 (csrc/cutlass/projector_sm90.cuh).
#include "projector_sm90.cuh"

namespace llava_fast_cutlass {

int gelu_fwd_f16(LLAVA_FAST_GELU_FWD_ARGS) {
  return with_schedule<cutlass::half_t>(sched, err, errlen, "gelu_fwd", [&](auto sc) {
    return gelu_fwd<cutlass::half_t, decltype(sc)>(M, N, K, a, b, bias, d, aux, workspace, workspace_bytes, stream, err,
                                          errlen);
  });
}

}  // namespace llava_fast_cutlass
