// The extension module jetspec._C. Importing it runs the TORCH_LIBRARY
// registrations of the other files in cpp/; it exposes no Python functions,
// only WITH_CUDA so Python can tell a CPU-only build apart.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "jetspec torch custom ops", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef JETSPEC_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
