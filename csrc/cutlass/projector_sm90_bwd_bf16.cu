// The dGELU dgrad GEMMs in bf16 (csrc/cutlass/projector_sm90.cuh).
#include "projector_sm90.cuh"

namespace llava_fast_cutlass {

int dgelu_bwd_bf16(LLAVA_FAST_DGELU_BWD_ARGS) {
  return with_schedule<cutlass::bfloat16_t>(sched, err, errlen, "dgelu_bwd", [&](auto sc) {
    return dgelu_bwd<cutlass::bfloat16_t, decltype(sc)>(M, N, K, a, b, aux, d, act, workspace, workspace_bytes,
                                                                 stream, err, errlen);
  });
}

}  // namespace llava_fast_cutlass
