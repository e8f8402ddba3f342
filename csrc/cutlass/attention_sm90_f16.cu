// The dense attention forward in f16 (csrc/cutlass/attention_sm90.cuh).
#include "attention_sm90.cuh"

namespace llava_fast_cutlass {

int attn_fwd_f16(LLAVA_FAST_ATTN_FWD_ARGS) { LLAVA_FAST_ATTN_FWD_DISPATCH(cutlass::half_t) }

}  // namespace llava_fast_cutlass
