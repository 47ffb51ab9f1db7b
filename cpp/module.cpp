// The extension module jetspec._C. Importing it runs the TORCH_LIBRARY
// registrations of the other files in cpp/; it exposes no Python functions, only
// WITH_CUDA (so Python can tell a CPU-only build apart) and LIMITS, the ops' size
// limits as {op: {device type: {name: value}}} (plus the size where build_tree's CUDA
// kernel changes path, for its benchmark), which jetspec.ops.supports() reads instead
// of copying them.
#include <Python.h>

#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <utility>

#include "op_limits.h"
#ifdef JETSPEC_WITH_CUDA
#include "accept_greedy.cuh"
#include "build_tree.cuh"
#include "draft_topk.cuh"
#include "rms_norm.cuh"
#include "skinny_gemm.cuh"
#endif

namespace {

using Entry = std::pair<const char*, PyObject*>;

// A dict of the entries (taking their references); nullptr if any is nullptr or on failure.
PyObject* dict_of(std::initializer_list<Entry> entries) {
  PyObject* dict = PyDict_New();
  bool ok = dict != nullptr;
  for (const auto& [name, value] : entries) {
    ok = ok && value != nullptr && PyDict_SetItemString(dict, name, value) == 0;
    Py_XDECREF(value);
  }
  if (!ok) Py_XDECREF(dict);
  return ok ? dict : nullptr;
}

PyObject* integer(int64_t v) { return PyLong_FromLongLong(v); }

PyObject* limits() {
  using namespace jetspec;
  PyObject* head_dims = PyTuple_New(std::size(limits::kTreeAttentionHeadDims));
  for (size_t i = 0; head_dims != nullptr && i < std::size(limits::kTreeAttentionHeadDims); ++i)
    PyTuple_SetItem(head_dims, i, integer(limits::kTreeAttentionHeadDims[i]));  // steals the reference
  PyObject* tree_attention = dict_of({{"nodes", integer(limits::kTreeAttentionMaxNodes)}, {"head_dims", head_dims}});
  return dict_of({
      {"tree_attention", dict_of({{"cpu", tree_attention}, {"cuda", (Py_XINCREF(tree_attention), tree_attention)}})},
#ifdef JETSPEC_WITH_CUDA
      {"build_tree", dict_of({{"cuda", dict_of({{"depth", integer(cuda::kTreeMaxDepth)},
                                                {"width", integer(cuda::kTreeMaxWidth)},
                                                {"nodes", integer(cuda::kTreeMaxNodes)},
                                                {"threshold_expansions", integer(cuda::kThresholdMinExpansions)}})}})},
      {"draft_topk", dict_of({{"cuda", dict_of({{"k", integer(cuda::kDraftTopkMaxK)}})}})},
      {"accept_greedy", dict_of({{"cuda", dict_of({{"nodes", integer(cuda::kAcceptMaxNodes)}})}})},
      {"rms_norm", dict_of({{"cuda", dict_of({{"hidden", integer(cuda::kRmsNormMaxHidden)}})}})},
      {"skinny_gemm", dict_of({{"cuda", dict_of({{"rows", integer(cuda::kSkinnyGemmMaxRows)}})}})},
#endif
  });
}

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "jetspec torch custom ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef JETSPEC_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  PyObject* op_limits = limits();
  if (op_limits == nullptr || PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0 ||
      PyModule_AddObject(module, "LIMITS", op_limits) != 0) {
    Py_XDECREF(op_limits);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
