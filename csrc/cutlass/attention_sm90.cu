// C entry point of the dense attention forward (attention_sm90.cuh). Without CUTLASS's FMHA example headers at
// build time (LLAVA_FAST_WITH_FMHA undefined) it is a stub that says so, and Python keeps the Triton forward.
#include <cuda_runtime.h>

#include <cstdio>

#ifdef LLAVA_FAST_WITH_FMHA
namespace llava_fast_cutlass {
int attn_fwd_bf16(int causal, int B, int H, int S, int D, const void* q, const void* k, const void* v, void* o,
                  float* lse, cudaStream_t stream, char* err, int errlen);
int attn_fwd_f16(int causal, int B, int H, int S, int D, const void* q, const void* k, const void* v, void* o,
                 float* lse, cudaStream_t stream, char* err, int errlen);
}  // namespace llava_fast_cutlass
#endif

extern "C" {

// 1 when the dense attention forward is built (CUTLASS's FMHA example headers were found), else 0.
int llava_fast_cutlass_has_attn_fwd() {
#ifdef LLAVA_FAST_WITH_FMHA
  return 1;
#else
  return 0;
#endif
}

// dtype: 0 = bfloat16, 1 = float16. q, k, v, o: (B*S, H, D) contiguous; lse: (H, B*S) fp32 contiguous.
int llava_fast_cutlass_attn_fwd(int dtype, int causal, int B, int H, int S, int D, const void* q, const void* k,
                                const void* v, void* o, float* lse, void* stream, char* err, int errlen) {
#ifdef LLAVA_FAST_WITH_FMHA
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == 0) return llava_fast_cutlass::attn_fwd_bf16(causal, B, H, S, D, q, k, v, o, lse, s, err, errlen);
  if (dtype == 1) return llava_fast_cutlass::attn_fwd_f16(causal, B, H, S, D, q, k, v, o, lse, s, err, errlen);
  if (err && errlen > 0) snprintf(err, errlen, "attn_fwd: unknown dtype code %d", dtype);
  return 1;
#else
  if (err && errlen > 0)
    snprintf(err, errlen, "attn_fwd: built without CUTLASS's examples/88_hopper_fmha headers");
  return 1;
#endif
}

}  // extern "C"
