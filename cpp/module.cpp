#include "bindings.hpp"

#ifdef XCTRT_OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(_core, m) {
  m.doc() = "xctrt C++ kernels: slice tiling/stitching, class aggregation, streamed 3D components";
#ifdef XCTRT_OPENMP
  m.attr("openmp") = true;
  m.def("set_num_threads", [](int n) { omp_set_num_threads(n > 0 ? n : 1); },
        "Threads used by the OpenMP kernels.");
#else
  m.attr("openmp") = false;
  m.def("set_num_threads", [](int) {}, "No-op: built without OpenMP.");
#endif
  xctrt::bind_tiling(m);
  xctrt::bind_aggregate(m);
  xctrt::bind_components(m);
}
