// Argument checks for the host launchers. The module does not link libtorch, so errors are raised as
// std::invalid_argument, which pybind11 turns into Python's ValueError with the same message.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

#define LF_CHECK(cond, msg)                                         \
  do {                                                              \
    if (!(cond)) {                                                  \
      std::ostringstream _lf_os;                                    \
      _lf_os << msg;                                                \
      throw std::invalid_argument(_lf_os.str());                    \
    }                                                               \
  } while (0)

namespace llava_fast {
// dtype codes shared with llava_fast/_ext.py
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
}  // namespace llava_fast
