// The one pybind11 module, llava_fast._C. Functions take raw pointers (as Python ints), sizes and the CUDA
// stream handle; llava_fast/_ext.py and the ops wrap them with checks on torch tensors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <iterator>
#include <tuple>
#include <cstring>

#include "common/checks.h"

#include "anyres/anyres_plan.h"
#include "anyres/encode.h"
#include "anyres/encode_cuda.h"
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

  // ---- tile encoder (csrc/anyres/encode.cpp)
  m.def("encoder_isa", &encoder_isa,
        "Widest instruction set the CPU tile encoder uses here: avx2, ssse3, sse2 or scalar (LLAVA_FAST_NO_AVX2=1 "
        "turns AVX2 off; every path gives the same bits).");
  auto make_cfg = [](int64_t tile, int64_t shortest_edge, bool llava_pad,
                     const std::vector<std::pair<int64_t, int64_t>>& pinpoints, std::array<int, 3> fill,
                     std::array<float, 3> mean, std::array<float, 3> std) {
    EncodeConfig cfg;
    cfg.tile = tile;
    cfg.shortest_edge = shortest_edge;
    cfg.llava_pad = llava_pad;
    cfg.pinpoints = pinpoints;
    for (int c = 0; c < 3; ++c) {
      LF_CHECK(fill[c] >= 0 && fill[c] <= 255, "encode_tiles: fill colour must be in [0, 255]");
      cfg.fill[c] = static_cast<uint8_t>(fill[c]);
      cfg.mean[c] = mean[c];
      cfg.std[c] = std[c];
    }
    return cfg;
  };
  m.def(
      "encode_tile_counts",
      [make_cfg](const std::vector<int64_t>& heights, const std::vector<int64_t>& widths, const std::vector<int>& modes,
                 int64_t tile, const std::vector<std::pair<int64_t, int64_t>>& pinpoints) {
        return encode_tile_counts(heights, widths, modes,
                                  make_cfg(tile, tile, false, pinpoints, {0, 0, 0}, {0, 0, 0}, {1, 1, 1}));
      },
      py::arg("heights"), py::arg("widths"), py::arg("modes"), py::arg("tile"), py::arg("pinpoints"),
      "Host plan: tiles per image (modes: 0 AnyRes, 1 pad-to-square, 2 shortest-edge + centre crop, 3 direct).");
  m.def(
      "encode_tiles_cpu",
      [make_cfg](const std::vector<uintptr_t>& ptrs, const std::vector<int64_t>& heights,
                 const std::vector<int64_t>& widths, const std::vector<int64_t>& row_strides,
                 const std::vector<int>& modes, uintptr_t dst, int dtype, int64_t capacity_tiles, int64_t tile,
                 int64_t shortest_edge, bool llava_pad, const std::vector<std::pair<int64_t, int64_t>>& pinpoints,
                 std::array<int, 3> fill, std::array<float, 3> mean, std::array<float, 3> std, int num_threads,
                 const std::vector<int64_t>& col_strides, const std::vector<int64_t>& chan_strides) {
        EncodeConfig cfg = make_cfg(tile, shortest_edge, llava_pad, pinpoints, fill, mean, std);
        std::vector<const uint8_t*> imgs(ptrs.size());
        for (size_t i = 0; i < ptrs.size(); ++i) imgs[i] = reinterpret_cast<const uint8_t*>(ptrs[i]);
        py::gil_scoped_release release;
        encode_tiles_cpu(imgs, heights, widths, row_strides, modes, cfg, reinterpret_cast<void*>(dst), dtype,
                         capacity_tiles, num_threads, col_strides, chan_strides);
      },
      py::arg("ptrs"), py::arg("heights"), py::arg("widths"), py::arg("row_strides"), py::arg("modes"),
      py::arg("dst"), py::arg("dtype"), py::arg("capacity_tiles"), py::arg("tile"), py::arg("shortest_edge"),
      py::arg("llava_pad"), py::arg("pinpoints"), py::arg("fill"), py::arg("mean"), py::arg("std"),
      py::arg("num_threads") = 1, py::arg("col_strides") = std::vector<int64_t>{},
      py::arg("chan_strides") = std::vector<int64_t>{},
      "uint8 images -> normalized (tiles, 3, T, T) in dst; see csrc/anyres/encode.h. Pixel (y, x, c) at\n"
      "ptr + y * row_stride + x * col_stride + c * chan_stride (bytes); without col/chan strides: HWC (3, 1).");
  m.def(
      "resize_bicubic_aa_u8_cpu",
      [](uintptr_t src, int64_t h, int64_t w, uintptr_t dst, int64_t oh, int64_t ow) {
        py::gil_scoped_release release;
        resize_bicubic_aa_u8_cpu(reinterpret_cast<const uint8_t*>(src), h, w, reinterpret_cast<uint8_t*>(dst), oh, ow);
      },
      py::arg("src"), py::arg("h"), py::arg("w"), py::arg("dst"), py::arg("oh"), py::arg("ow"));

  // ---- GPU tile encoder plan (csrc/anyres/encode_cuda_plan.cpp), its CPU emulation and CUDA launch
  py::class_<CudaEncodePlan>(m, "CudaEncodePlan",
                             "Host plan of the GPU tile encoder: upload `nbytes` bytes (copy_to) to the device.")
      .def_property_readonly("nbytes", &CudaEncodePlan::nbytes)
      .def_property_readonly("scratch_bytes", &CudaEncodePlan::scratch_bytes)
      .def_readonly("num_tiles", &CudaEncodePlan::num_tiles)
      .def_readonly("best_h", &CudaEncodePlan::best_h, "per image: AnyRes best resolution height (0: single tile)")
      .def_readonly("best_w", &CudaEncodePlan::best_w, "per image: AnyRes best resolution width (0: single tile)")
      .def_readonly("total_tiles", &CudaEncodePlan::total_tiles)
      .def_readonly("tile_elems", &CudaEncodePlan::tile_elems)
      .def_readonly("pass1_blocks", &CudaEncodePlan::pass1_blocks)
      .def_readonly("pass1_rows", &CudaEncodePlan::pass1_rows)
      .def_readonly("max_span", &CudaEncodePlan::max_span)
      .def_property_readonly("band_need",
                             [](const CudaEncodePlan& p) { return std::vector<int>(std::begin(p.band_need), std::end(p.band_need)); })
      .def("v4_band_rows", &v4_band_rows, py::arg("smem_bytes"),
           "v4: the tallest band (1 .. 32 output rows) whose staged intermediate fits in smem_bytes; 0 if none")
      .def_readonly("resample", &CudaEncodePlan::resample)
      .def_readonly("patch", &CudaEncodePlan::patch)
      .def(
          "copy_to",
          [](const CudaEncodePlan& p, uintptr_t dst) {
            p.write_to(reinterpret_cast<uint8_t*>(dst));
          },
          py::arg("dst"), "Copy the plan bytes to host memory at dst (e.g. a pinned tensor).")
      .def_property_readonly("head_bytes", &CudaEncodePlan::head_bytes)
      .def_property_readonly(
          "table_keys",
          [](const CudaEncodePlan& p) {
            std::vector<int64_t> out;
            out.reserve(p.tables.size());
            for (const auto& t : p.tables) out.push_back((t.in << 32) | (t.out << 1) | t.resample);
            return out;
          },
          "Per weight table: one int naming it, (in << 32) | (out << 1) | resample (sizes < 2^30)")
      .def_property_readonly(
          "table_bytes",
          [](const CudaEncodePlan& p) {
            std::vector<int64_t> out;
            out.reserve(p.tables.size());
            for (const auto& t : p.tables) out.push_back(t.bytes);
            return out;
          },
          "Per weight table: its bytes (a multiple of 8); write_table(i, dst) writes table i")
      .def(
          "write_table",
          [](const CudaEncodePlan& p, size_t i, uintptr_t dst) { p.write_table(i, reinterpret_cast<uint8_t*>(dst)); },
          py::arg("i"), py::arg("dst"), "Table i's bytes (table_refs[i][3] of them) to host memory at dst.")
      .def(
          "write_head",
          [](const CudaEncodePlan& p, uintptr_t dst, const std::vector<uint64_t>& addrs, uint64_t head_addr) {
            std::vector<int64_t> bases(addrs.size());
            for (size_t i = 0; i < addrs.size(); ++i) bases[i] = static_cast<int64_t>(addrs[i] - head_addr);
            p.write_head(reinterpret_cast<uint8_t*>(dst), bases);
          },
          py::arg("dst"), py::arg("addrs"), py::arg("head_addr"),
          "The plan's head (head_bytes) to dst, its records pointing at table i at address addrs[i] when the head "
          "is read at head_addr (offsets addrs[i] - head_addr, two's complement).");
  m.def(
      "encode_plan",
      [make_cfg](const std::vector<uint64_t>& ptrs, const std::vector<int64_t>& heights,
                 const std::vector<int64_t>& widths, const std::vector<int64_t>& sy, const std::vector<int64_t>& sx,
                 const std::vector<int64_t>& sc, const std::vector<int>& modes, int64_t tile, int64_t shortest_edge,
                 bool llava_pad, const std::vector<std::pair<int64_t, int64_t>>& pinpoints, std::array<int, 3> fill,
                 std::array<float, 3> mean, std::array<float, 3> std, int resample, int patch) {
        EncodeConfig cfg = make_cfg(tile, shortest_edge, llava_pad, pinpoints, fill, mean, std);
        py::gil_scoped_release release;
        return build_cuda_encode_plan(ptrs, heights, widths, sy, sx, sc, modes, cfg, resample, patch);
      },
      py::arg("ptrs"), py::arg("heights"), py::arg("widths"), py::arg("sy"), py::arg("sx"), py::arg("sc"),
      py::arg("modes"), py::arg("tile"), py::arg("shortest_edge"), py::arg("llava_pad"), py::arg("pinpoints"),
      py::arg("fill"), py::arg("mean"), py::arg("std"), py::arg("resample") = 0, py::arg("patch") = 0,
      "Plan of the GPU tile encoder from image pointers, sizes and byte strides (y, x, c); see encode_gpu.h.");
  m.def(
      "encode_tiles_emulate",
      [](const CudaEncodePlan& plan, uintptr_t scratch, uintptr_t out, int dtype, int64_t capacity_tiles,
         int version, int band_rows, uintptr_t plan_bytes) {
        py::gil_scoped_release release;
        encode_tiles_emulate(plan, reinterpret_cast<void*>(scratch), reinterpret_cast<void*>(out), dtype,
                             capacity_tiles, version, band_rows, reinterpret_cast<const uint8_t*>(plan_bytes));
      },
      py::arg("plan"), py::arg("scratch"), py::arg("out"), py::arg("dtype"), py::arg("capacity_tiles"),
      py::arg("version") = 1, py::arg("band_rows") = 32, py::arg("plan_bytes") = 0,
      "Run the GPU encoder's element code on the CPU (host pointers in the plan); for tests.");

#ifdef LLAVA_FAST_WITH_CUDA
  m.def(
      "encode_tiles_cuda",
      [](const CudaEncodePlan& plan, uintptr_t plan_dev, uintptr_t scratch, uintptr_t out, int dtype,
         int64_t capacity_tiles, uintptr_t stream, int passes, int version, int band_rows) {
        encode_tiles_cuda(plan, reinterpret_cast<const void*>(plan_dev), reinterpret_cast<void*>(scratch),
                          reinterpret_cast<void*>(out), dtype, capacity_tiles, stream, passes, version, band_rows);
      },
      py::arg("plan"), py::arg("plan_dev"), py::arg("scratch"), py::arg("out"), py::arg("dtype"),
      py::arg("capacity_tiles"), py::arg("stream"), py::arg("passes") = 3, py::arg("version") = 1,
      py::arg("band_rows") = 0,
      "Launch the two encoder passes on `stream` (no synchronization). plan_dev: device copy of the plan bytes.");
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
