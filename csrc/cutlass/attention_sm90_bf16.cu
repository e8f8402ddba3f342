// The dense attention forward in bf16 (csrc/cutlass/attention_sm90.cuh).
#include "attention_sm90.cuh"

namespace llava_fast_cutlass {

int attn_fwd_bf16(LLAVA_FAST_ATTN_FWD_ARGS) { LLAVA_FAST_ATTN_FWD_DISPATCH(cutlass::bfloat16_t) }

}  // namespace llava_fast_cutlass
