// Shared by the CUTLASS translation units of llava_fast/_cutlass_sm90.so.
#pragma once

#include <cuda_runtime.h>

#include "cutlass/kernel_hardware_info.h"

namespace llava_fast_cutlass {

// The current device and its SM count (cached per device: the persistent tile scheduler sizes its grid with it).
inline cutlass::KernelHardwareInfo hw_info() {
  static int cached[64] = {0};
  cutlass::KernelHardwareInfo hw{};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return hw;
  if (!cached[dev]) cached[dev] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(dev);
  hw.device_id = dev;
  hw.sm_count = cached[dev];
  return hw;
}

}  // namespace llava_fast_cutlass
