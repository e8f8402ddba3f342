// C entry points of the CUTLASS projector library (llava_fast/_cutlass_sm90.so); the kernels are in
// projector_sm90_{fwd,bwd}_{bf16,f16}.cu, the shared templates in projector_sm90.cuh.
#include "projector_sm90.cuh"

namespace lfc = llava_fast_cutlass;

// dtype codes: 0 = bfloat16, 1 = float16. sched codes: see `Schedule` in projector_sm90.cuh (0 ping-pong 128x128,
// 1 cooperative 128x256; bf16 also 2 and 3).
extern "C" {

int llava_fast_cutlass_abi_version() { return 5; }  // 5: non-causal attention masks keys past S

// Workspace bytes that every entry point below fits in (the persistent tile scheduler's counters; CUTLASS asks
// for far less at these tile shapes, and `run` checks the actual need).
size_t llava_fast_cutlass_workspace_bytes() { return size_t(1) << 20; }

int llava_fast_cutlass_gelu_fwd(int dtype, int sched, int M, int N, int K, const void* a, const void* b,
                                const void* bias, void* d, void* aux, void* workspace, size_t workspace_bytes,
                                void* stream, char* err, int errlen) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return lfc::gelu_fwd_bf16(sched, M, N, K, a, b, bias, d, aux, workspace, workspace_bytes, s, err, errlen);
  if (dtype == 1)
    return lfc::gelu_fwd_f16(sched, M, N, K, a, b, bias, d, aux, workspace, workspace_bytes, s, err, errlen);
  if (err && errlen > 0) snprintf(err, errlen, "gelu_fwd: unknown dtype code %d", dtype);
  return 1;
}

// act: nullptr, or where to write gelu(h) as well (the DAG epilogue of projector_sm90.cuh).
int llava_fast_cutlass_dgelu_bwd(int dtype, int sched, int M, int N, int K, const void* a, const void* b,
                                 const void* aux, void* d, void* act, void* workspace, size_t workspace_bytes,
                                 void* stream, char* err, int errlen) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == 0)
    return lfc::dgelu_bwd_bf16(sched, M, N, K, a, b, aux, d, act, workspace, workspace_bytes, s, err, errlen);
  if (dtype == 1)
    return lfc::dgelu_bwd_f16(sched, M, N, K, a, b, aux, d, act, workspace, workspace_bytes, s, err, errlen);
  if (err && errlen > 0) snprintf(err, errlen, "dgelu_bwd: unknown dtype code %d", dtype);
  return 1;
}

}  // extern "C"
