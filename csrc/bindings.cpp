// The one pybind11 module, llava_fast._C. Functions take raw pointers (as Python ints), sizes and the CUDA
// stream handle; llava_fast/_ext.py and the ops wrap them with checks on torch tensors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>

#include "anyres/anyres_plan.h"
#include "anyres/normalize.h"

namespace py = pybind11;
using namespace llava_fast;

PYBIND11_MODULE(_C, m) {
  m.doc() = "llava_fast native kernels (C++ CPU path, and CUDA when built with nvcc). Does not link libtorch.";
#ifdef LLAVA_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif

  m.def(
      "select_best_resolution",
      [](int64_t height, int64_t width, const std::vector<std::pair<int64_t, int64_t>>& pinpoints) -> py::object {
        auto best = select_best_resolution(height, width, pinpoints);
        if (best.first < 0) return py::none();  // no candidate keeps any pixel (as in transformers: None)
        return py::make_tuple(best.first, best.second);
      },
      py::arg("height"), py::arg("width"), py::arg("pinpoints"),
      "Best (height, width) among pinpoints for an image of (height, width); first candidate wins ties.");

  m.def(
      "normalize_u8_cpu",
      [](uintptr_t src, uintptr_t dst, int dtype, int64_t n, int64_t h, int64_t w, std::array<float, 3> mean,
         std::array<float, 3> std, int num_threads) {
        py::gil_scoped_release release;
        normalize_u8_cpu(reinterpret_cast<const uint8_t*>(src), reinterpret_cast<void*>(dst), dtype, n, h, w,
                         mean.data(), std.data(), num_threads);
      },
      py::arg("src"), py::arg("dst"), py::arg("dtype"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("mean"),
      py::arg("std"), py::arg("num_threads") = 1);

#ifdef LLAVA_FAST_WITH_CUDA
  m.def(
      "normalize_u8_cuda",
      [](uintptr_t src, uintptr_t dst, int dtype, int64_t n, int64_t h, int64_t w, std::array<float, 3> mean,
         std::array<float, 3> std, uintptr_t stream) {
        normalize_u8_cuda(reinterpret_cast<const uint8_t*>(src), reinterpret_cast<void*>(dst), dtype, n, h, w,
                          mean.data(), std.data(), stream);
      },
      py::arg("src"), py::arg("dst"), py::arg("dtype"), py::arg("n"), py::arg("h"), py::arg("w"), py::arg("mean"),
      py::arg("std"), py::arg("stream"));
#endif
}
