// Input checks shared by every op's CPU and CUDA entry points. They run before
// any kernel and raise ValueError (Python) with the op and argument named, so a
// caller from another engine gets the same clear errors as our own driver.
//
// Messages are assembled with std::to_string, never by streaming numbers: on the
// GPU machine (torch 2.11 wheel, system GCC 13) streaming an integer into the
// ostringstream behind TORCH_CHECK's message crashed the process (seen there;
// cause inside the C++ runtime not established), while strings stream fine.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <utility>

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

// A tensor argument and its name in the schema.
using Named = std::pair<const at::Tensor*, const char*>;

// Every tensor on the device of the first.
inline void check_same_device(const char* op, c10::ArrayRef<Named> tensors) {
  const Named& first = tensors.front();
  for (const auto& [t, name] : tensors) check_device(op, *t, name, *first.first, first.second);
}

// The byte offsets [first, last] in its storage that a tensor's elements span (numel > 0; torch strides
// are non-negative).
inline std::pair<int64_t, int64_t> byte_span(const at::Tensor& t) {
  int64_t extent = 0;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  const int64_t first = t.storage_offset() * t.element_size();
  return {first, first + (extent + 1) * t.element_size() - 1};
}

inline int64_t floor_div(int64_t a, int64_t b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0))); }

// Whether two tensors may share memory: not if their storages differ; else ATen's answer where it has one
// (dense tensors); for two 2-D views with the same row stride (e.g. column blocks of one buffer), whether
// any row of one meets a row of the other; else whether their byte spans intersect (conservative).
inline bool may_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      !a.storage().is_alias_of(b.storage()))
    return false;
  const auto status = at::get_overlap_status(a, b);
  if (status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial) return true;
  if (status == at::MemOverlapStatus::No) return false;
  const auto [a0, a1] = byte_span(a);
  const auto [b0, b1] = byte_span(b);
  if (a1 < b0 || b1 < a0) return false;
  if (a.dim() == 2 && b.dim() == 2 && a.stride(0) == b.stride(0) && a.stride(0) > 0 &&
      a.element_size() == b.element_size()) {
    // Row i of a spans [a0 + i s, a0 + i s + la), row j of b [b0 + j s, b0 + j s + lb): they meet iff
    // k = j - i has -lb < d + k s < la, d = b0 - a0.
    const int64_t s = a.stride(0) * a.element_size();
    const int64_t la = ((a.size(1) - 1) * a.stride(1) + 1) * a.element_size();
    const int64_t lb = ((b.size(1) - 1) * b.stride(1) + 1) * b.element_size();
    const int64_t d = b0 - a0;
    int64_t k_min = floor_div(-lb - d, s) + 1, k_max = -floor_div(-(la - d), s) - 1;  // ceil(x) = -floor(-x)
    k_min = k_min > -(a.size(0) - 1) ? k_min : -(a.size(0) - 1);
    k_max = k_max < b.size(0) - 1 ? k_max : b.size(0) - 1;
    return k_min <= k_max;
  }
  return true;
}

// No output shares memory with another argument or overlaps itself (an expanded tensor): a kernel would
// read what it has already written, or write one element from several threads (and the CPU kernels,
// which validate their index inputs before using them, would use entries changed after the check).
inline void check_no_overlap(const char* op, c10::ArrayRef<Named> outputs, c10::ArrayRef<Named> all) {
  for (const auto& [out, out_name] : outputs) {
    TORCH_CHECK_VALUE(at::has_internal_overlap(*out) != at::MemOverlap::Yes,
                      message(op, "output '", out_name, "' overlaps itself (e.g. an expanded tensor)"));
    for (const auto& [t, name] : all)
      TORCH_CHECK_VALUE(out == t || !may_overlap(*out, *t),
                        message(op, "output '", out_name, "' shares memory with '", name, "'"));
  }
}

// Whether the product of non-negative factors is at most limit (without overflowing on the way).
inline bool product_at_most(std::initializer_list<int64_t> factors, int64_t limit) {
  int64_t product = 1;
  for (int64_t f : factors) {
    if (f == 0) return true;
    if (product > limit / f) return false;
    product *= f;
  }
  return true;
}

// The trees of a CPU acceptance walk, every row before the caller writes any output: parents and
// num_nodes as contiguous int64 [batch, nodes] and [batch]; node 0 is the root (parent -1) and every
// other node in use has an earlier parent.
inline void check_trees(const char* op, const int64_t* parents, const int64_t* num_nodes, int64_t batch,
                        int64_t nodes) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t* p = parents + b * nodes;
    const int64_t n = num_nodes[b];
    TORCH_CHECK_VALUE(1 <= n && n <= nodes, message(op, "num_nodes[", b, "] = ", n, " is outside [1, ", nodes, "]"));
    TORCH_CHECK_VALUE(p[0] == -1, message(op, "parents[", b, ", 0] must be -1 (the root), got ", p[0]));
    for (int64_t i = 1; i < n; ++i)
      TORCH_CHECK_VALUE(0 <= p[i] && p[i] < i,
                        message(op, "parents[", b, ", ", i, "] = ", p[i], " must be in [0, ", i, ")"));
  }
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

// The dispatcher runs the kernel of the highest-priority device among a call's tensors: a meta tensor
// beside CPU ones selects the fake impl, a CPU tensor beside CUDA ones the CUDA kernel, and either would
// then run without the check that all tensors share a device (the fake impl returning with the other
// outputs unwritten). Registered for every op under BackendSelect, a key every call passes through before
// a backend is chosen, this rejects such a call first, naming the tensor against the first one, and hands
// any other call on to the backend. The backends' own checks still compare devices: a caller can
// redispatch to one directly.
inline void same_device_guard(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& schema = op.schema();
  const std::string& qualified = schema.name();
  const std::string name = qualified.substr(qualified.find("::") + 2);
  const auto& args = schema.arguments();
  const auto values = torch::jit::last(*stack, args.size());
  int64_t first = -1;
  for (size_t i = 0; i < args.size(); ++i) {
    if (!values[i].isTensor()) continue;
    if (first < 0) {
      first = static_cast<int64_t>(i);
      continue;
    }
    check_device(name.c_str(), values[i].toTensor(), args[i].name().c_str(), values[first].toTensor(),
                 args[first].name().c_str());
  }
  op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect),
                     stack);
}

inline torch::CppFunction same_device_kernel() {
  return torch::CppFunction::makeFromBoxedFunction<&same_device_guard>();
}

}  // namespace jetspec
