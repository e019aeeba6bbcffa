// Class aggregator: K per-class probability maps -> one uint8 label map.
//   priority: the first channel (in priority order) whose probability >= its threshold
//             wins (the paper's rule: inclusion > pore > material > air).
//   argmax:   among channels at or above their threshold, the most probable wins
//             (the lower channel index on ties); none -> 0.
#include <pybind11/numpy.h>

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.hpp"

namespace py = pybind11;

namespace xctrt {
namespace {

using ProbArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// Both rules run block by block, channel by channel, with branch-free selects in the inner
// loop so the compiler vectorises it; a block of labels stays in L1 while every channel's
// probabilities stream through once.
constexpr int64_t kBlock = 4096;

void aggregate_priority(const float* p, int64_t k, int64_t n, const float* thr,
                        const uint8_t* ids, const int64_t* order, uint8_t* out) {
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(static) if (n > (1 << 18))
#endif
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t len = std::min(kBlock, n - b0);
    uint8_t* o = out + b0;
    for (int64_t i = 0; i < len; ++i) o[i] = 0;
    for (int64_t j = k - 1; j >= 0; --j) {  // lowest priority first; higher ones overwrite
      const int64_t c = order[j];
      const float* pc = p + c * n + b0;
      const float t = thr[c];
      const uint8_t id = ids[c];
      for (int64_t i = 0; i < len; ++i) o[i] = pc[i] >= t ? id : o[i];
    }
  }
}

void aggregate_argmax(const float* p, int64_t k, int64_t n, const float* thr,
                      const uint8_t* ids, uint8_t* out) {
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(static) if (n > (1 << 18))
#endif
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t len = std::min(kBlock, n - b0);
    float best[kBlock];
    uint8_t* o = out + b0;
    for (int64_t i = 0; i < len; ++i) {
      best[i] = -std::numeric_limits<float>::infinity();
      o[i] = 0;
    }
    for (int64_t c = 0; c < k; ++c) {  // strict '>' keeps the lower channel on ties
      const float* pc = p + c * n + b0;
      const float t = thr[c];
      const uint8_t id = ids[c];
      for (int64_t i = 0; i < len; ++i) {
        const float v = pc[i];
        const bool take = (v >= t) & (v > best[i]);
        best[i] = take ? v : best[i];
        o[i] = take ? id : o[i];
      }
    }
  }
}

py::array_t<uint8_t> aggregate(ProbArray probs, py::array_t<float, py::array::forcecast> thresholds,
                               py::array_t<uint8_t, py::array::forcecast> label_ids,
                               py::array_t<int64_t, py::array::forcecast> priority,
                               const std::string& mode, py::object out_obj) {
  if (probs.ndim() < 2) throw std::invalid_argument("probs must be (K, ...) with K classes first");
  const int64_t k = probs.shape(0);
  if (thresholds.size() != k || label_ids.size() != k)
    throw std::invalid_argument("thresholds and label_ids need one entry per class channel");
  std::vector<py::ssize_t> shape(probs.shape() + 1, probs.shape() + probs.ndim());
  // A caller-owned output buffer (reused across slices) saves a page-faulting allocation per call.
  py::array_t<uint8_t> out;
  if (out_obj.is_none()) {
    out = py::array_t<uint8_t>(shape);
  } else {
    out = py::array_t<uint8_t>::ensure(out_obj);
    if (!out || !py::isinstance<py::array_t<uint8_t>>(out_obj) ||
        !(out.flags() & py::array::c_style) ||
        std::vector<py::ssize_t>(out.shape(), out.shape() + out.ndim()) != shape)
      throw std::invalid_argument("out must be a C-contiguous uint8 array shaped like one probability map");
  }
  const int64_t n = out.size();
  const float* p = probs.data();
  const float* thr = thresholds.data();
  const uint8_t* ids = label_ids.data();
  uint8_t* o = out.mutable_data();
  if (mode == "priority") {
    if (priority.size() != k) throw std::invalid_argument("priority must list every channel once");
    std::vector<int64_t> order(priority.data(), priority.data() + k);
    std::vector<bool> seen(k, false);
    for (int64_t c : order) {
      if (c < 0 || c >= k || seen[c]) throw std::invalid_argument("priority must list every channel once");
      seen[c] = true;
    }
    py::gil_scoped_release release;
    aggregate_priority(p, k, n, thr, ids, order.data(), o);
  } else if (mode == "argmax") {
    py::gil_scoped_release release;
    aggregate_argmax(p, k, n, thr, ids, o);
  } else {
    throw std::invalid_argument("mode must be 'priority' or 'argmax'");
  }
  return out;
}

}  // namespace

void bind_aggregate(py::module_& m) {
  m.def("aggregate", &aggregate, py::arg("probs"), py::arg("thresholds"), py::arg("label_ids"),
        py::arg("priority"), py::arg("mode") = "priority", py::arg("out") = py::none(),
        "Per-class probabilities (K, ...) -> uint8 labels (...).\n"
        "priority: channel indices, highest priority first; the first channel with p >= threshold wins.\n"
        "argmax: the most probable channel among those with p >= threshold; none -> 0.\n"
        "out: optional uint8 buffer to fill and return.");
}

}  // namespace xctrt
