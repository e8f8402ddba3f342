// The GELU forward GEMMs in bf16 (csrc/cutlass/projector_sm90.cuh).
#include "projector_sm90.cuh"

namespace llava_fast_cutlass {

int gelu_fwd_bf16(LLAVA_FAST_GELU_FWD_ARGS) {
  return with_schedule<cutlass::bfloat16_t>(sched, err, errlen, "gelu_fwd", [&](auto sc) {
    return gelu_fwd<cutlass::bfloat16_t, decltype(sc)>(M, N, K, a, b, bias, d, aux, workspace, workspace_bytes,
                                                                 stream, err, errlen);
  });
}

}  // namespace llava_fast_cutlass
