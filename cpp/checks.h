// Input checks shared by every op's CPU and CUDA entry points. They run before
// any kernel and raise ValueError (Python) with the op and argument named, so a
// caller from another engine gets the same clear errors as our own driver.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace jetspec {

inline void check_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_VALUE(t.scalar_type() == want, "jetspec.", op, ": '", name, "' must have dtype ", want,
                    ", got ", t.scalar_type());
}

inline void check_dim(const char* op, const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "jetspec.", op, ": '", name, "' must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_size(const char* op, const at::Tensor& t, const char* name, int64_t dim, int64_t want) {
  TORCH_CHECK_VALUE(t.size(dim) == want, "jetspec.", op, ": '", name, "' must have size ", want, " in dim ", dim,
                    ", got shape ", t.sizes());
}

inline void check_device(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                         const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "jetspec.", op, ": '", name, "' is on ", t.device(), " but '",
                    ref_name, "' is on ", ref.device());
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
