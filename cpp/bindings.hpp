// One pybind11 module, xctrt._core; each kernel file registers its own functions.
#pragma once
#include <pybind11/pybind11.h>

namespace xctrt {
void bind_tiling(pybind11::module_& m);
void bind_aggregate(pybind11::module_& m);
void bind_components(pybind11::module_& m);
}  // namespace xctrt
