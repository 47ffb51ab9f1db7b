// Input checks shared by every op's CPU and CUDA entry points. They run before
// any kernel and raise ValueError (Python) with the op and argument named, so a
// caller from another engine gets the same clear errors as our own driver.
//
// Messages are assembled with std::to_string, never by streaming numbers: on the
// GPU machine (torch 2.11 wheel, system GCC 13) streaming an integer into the
// ostringstream behind TORCH_CHECK's message crashed the process (seen there;
// cause inside the C++ runtime not established), while strings stream fine.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace jetspec {

namespace detail {
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(int64_t v) { return std::to_string(v); }
inline std::string piece(int v) { return std::to_string(v); }
inline std::string piece(at::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(at::IntArrayRef dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}
}  // namespace detail

// "jetspec.<op>: " followed by the pieces, numbers and shapes formatted without iostreams.
template <typename... Pieces>
std::string message(const char* op, const Pieces&... pieces) {
  return std::string("jetspec.") + op + ": " + (std::string() + ... + detail::piece(pieces));
}

inline void check_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_VALUE(t.scalar_type() == want,
                    message(op, "'", name, "' must have dtype ", want, ", got ", t.scalar_type()));
}

inline void check_dim(const char* op, const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, message(op, "'", name, "' must be ", dim, "-D, got shape ", t.sizes()));
}

inline void check_size(const char* op, const at::Tensor& t, const char* name, int64_t dim, int64_t want) {
  TORCH_CHECK_VALUE(t.size(dim) == want, message(op, "'", name, "' must have size ", want, " in dim ", dim,
                                                 ", got shape ", t.sizes()));
}

inline void check_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                         const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(),
                    message(op, "'", name, "' is on ", t.device(), " but '", ref_name, "' is on ", ref.device()));
}

// True when dims [first, dim) are laid out densely, innermost last.
inline bool dense_from(const at::Tensor& t, int64_t first) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= first; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

}  // namespace jetspec
