// The Python module object of eagle_kernels._C. Importing it loads this shared library, whose
// static initialisers register the ops (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the per-op
// sources) under torch.ops.eagle_C. No pybind11: the module itself exposes nothing.
#include <Python.h>

static struct PyModuleDef eagle_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "eagle_kernels C++/CUDA ops, registered as torch.ops.eagle_C.*",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&eagle_c_module); }
