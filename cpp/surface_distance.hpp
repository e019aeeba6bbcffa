// Exact distance from each defect to the part surface, in physical units.
//
// The part surface is seen from the air side: the air outside the part, given as x-runs (the
// labeller takes air connected, 6-neighbours, to the volume's sides: Labeller::add_air
// in components.cpp). A defect is given as x-runs of its voxels too; its distance is the
// smallest centre-to-centre distance between one of its voxels and one of those air voxels, so
// a defect that touches that air has distance one voxel step (the voxel size on that axis).
// Only air in the volume counts: where the field of view cuts the part, the true surface
// beyond it is not seen.
//
// A run also says on which sides (-z, +z, -y, +y) it has a voxel whose neighbour is outside the
// defect (or the volume). Among a defect's nearest pairs (voxel v, air voxel a), take one with the
// smallest integer gaps: v is exposed towards a on every axis where they differ (one step from
// v towards a along that axis is no farther in double and has a smaller gap, so it is not in
// the defect). A run without a voxel exposed towards +y, say, therefore never needs an air voxel of
// larger y: that air and those tree nodes are skipped for it. Any flags that include every truly
// exposed side give the same result (all set is valid and only slower); a flag missing on an
// exposed side can give a wrong distance.
//
// The air runs go into a kd-tree (median splits on the widest axis, bounding box per node). Runs
// are axis-aligned boxes, so the distance between two runs and a node's lower bound are both
// per-axis gaps. Both are summed z + y + x in double from integer gaps: rounding is monotone,
// so a node's bound never exceeds the distance of an air run inside it, the pruning is exact,
// and any caller that passes the same air and defect voxels (in any order, in runs split or
// merged) gets the same bits. The search itself is in air_search.h, shared with the GPU kernel.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "air_search.h"

#ifdef XCTRT_OPENMP
#include <omp.h>
#if defined(__GLIBCXX__)   // libstdc++'s parallel mode: nth_element on all cores, for the tree's top levels
#include <parallel/algorithm>
#define XCTRT_PARALLEL_NTH_ELEMENT 1
#endif
#endif

namespace xctrt {

static_assert(sizeof(AirRun) == 4 * sizeof(int32_t), "AirRun is copied from (m, 4) int32 arrays");
static_assert(sizeof(AirNode) == 40, "AirNode is handed to the GPU as 40-byte records");

class AirTree {
 public:
  AirTree(std::vector<AirRun>&& air, std::array<double, 3> voxel_size)
      : s_(std::move(air)), w_(voxel_size) {
    const int64_t n = static_cast<int64_t>(s_.size());
    if (n == 0) return;
    // Halving splits: every range at one depth has the same size up to one, so the tree is
    // complete down to the depth where ranges fit a leaf, and heap numbering (children of i at
    // 2i+1, 2i+2) gives every node its slot before the subtrees are built in parallel.
    int64_t slots = 1, depth = 1;
    while ((n + slots - 1) / slots > kLeaf) slots *= 2, ++depth;
    if (depth >= kAirMaxDepth) throw std::length_error("too many air runs for the surface-distance tree");
    nodes_.resize(static_cast<size_t>(2 * slots));
    // The top levels, while they hold fewer large nodes than there are cores: each node's box and
    // partition on all cores. Then every subtree below is one task.
    std::vector<Range> level{{0, 0, n}};
#ifdef XCTRT_OPENMP
    const size_t cores = static_cast<size_t>(omp_get_max_threads());
    while (!level.empty() && level.size() < cores && level.front().hi - level.front().lo > kWholeCores) {
      std::vector<Range> next;
      for (const Range& r : level) {
        const int64_t mid = split(r, true);
        if (mid >= 0) next.push_back({2 * r.id + 1, r.lo, mid}), next.push_back({2 * r.id + 2, mid, r.hi});
      }
      level.swap(next);
    }
// A tree of fewer runs is built on the calling thread alone: the GPU labeller builds one such tree
// per slab on a host thread while the pipeline's other threads (reading, writing, launching the model)
// want the cores. Alone it is slower, not slow: 166k random runs 0.038 s, against 0.024 s with a team
// of 2 threads (idle 2-core VM, 2026-11-28).
#pragma omp parallel if (n > kWholeCores)
#pragma omp single
#endif
    for (const Range& r : level) {
#ifdef XCTRT_OPENMP
#pragma omp task
#endif
      build(r);
    }
  }

  // Squared distance from the run to its nearest air voxel, if below `best` (else `best`).
  double nearest2(const DefectRun& r, double best) const {
    return nodes_.empty() ? best : nearest_air2(nodes_.data(), s_.data(), w_.data(), r, best);
  }

  // The tree as the GPU search reads it: nodes (heap order; slots below a leaf unused) and the
  // air runs in the order the nodes' ranges refer to.
  const std::vector<AirNode>& nodes() const { return nodes_; }
  const std::vector<AirRun>& runs() const { return s_; }

 private:
  static constexpr int64_t kLeaf = kAirLeaf;

  struct Range {
    int32_t id;
    int64_t lo, hi;
  };

  // Bounding box of runs, and the range of their doubled x centres.
  struct Box {
    int32_t mn[3] = {kI32Max, kI32Max, kI32Max}, mx[3] = {kI32Min, kI32Min, kI32Min};
    int64_t cmin = std::numeric_limits<int64_t>::max(), cmax = std::numeric_limits<int64_t>::min();
    void add(const AirRun& s) {
      mn[0] = std::min(mn[0], s.z), mx[0] = std::max(mx[0], s.z);
      mn[1] = std::min(mn[1], s.y), mx[1] = std::max(mx[1], s.y);
      mn[2] = std::min(mn[2], s.x0), mx[2] = std::max(mx[2], s.x1);
      cmin = std::min(cmin, int64_t{s.x0} + s.x1), cmax = std::max(cmax, int64_t{s.x0} + s.x1);
    }
    void merge(const Box& o) {
      for (int a = 0; a < 3; ++a) mn[a] = std::min(mn[a], o.mn[a]), mx[a] = std::max(mx[a], o.mx[a]);
      cmin = std::min(cmin, o.cmin), cmax = std::max(cmax, o.cmax);
    }
  };
  static constexpr int32_t kI32Max = std::numeric_limits<int32_t>::max();
  static constexpr int32_t kI32Min = std::numeric_limits<int32_t>::min();

  // A parallel region only for whole_cores: the million small nodes below must not open one each.
  Box box_of(int64_t lo, int64_t hi, bool whole_cores) const {
    Box box;
    if (!whole_cores) {
      for (int64_t i = lo; i < hi; ++i) box.add(s_[i]);
      return box;
    }
#ifdef XCTRT_OPENMP
#pragma omp parallel
#endif
    {
      Box part;
#ifdef XCTRT_OPENMP
#pragma omp for nowait
#endif
      for (int64_t i = lo; i < hi; ++i) part.add(s_[i]);
#ifdef XCTRT_OPENMP
#pragma omp critical
#endif
      box.merge(part);
    }
    return box;
  }
  static constexpr int64_t kWholeCores = 1 << 18;   // runs in a node worth all cores for its split

  // Node r: its box, and for an inner node the split of its runs at the middle (returned; -1 for a
  // leaf). whole_cores: the box and the partition on all cores (libstdc++'s parallel nth_element),
  // for the few large nodes at the top; either way the same tree up to ties in the partition.
  int64_t split(const Range& r, bool whole_cores) {
    const int64_t lo = r.lo, hi = r.hi;
    const Box b = box_of(lo, hi, whole_cores);
    nodes_[r.id] = AirNode{lo, hi, {b.mn[0], b.mn[1], b.mn[2]}, {b.mx[0], b.mx[1], b.mx[2]}};
    if (hi - lo <= kLeaf) return -1;
    // Split the widest axis of the box, x included: the runs along x split by their centres,
    // which groups runs that end alike (the part's outline). Unless every centre is the same,
    // as in rows of full-width air above or below a part: those split along x into two children
    // with the parent's box, which prune nothing, so they split along z or y.
    const double extent[3] = {(static_cast<double>(b.mx[0]) - b.mn[0]) * w_[0],
                              (static_cast<double>(b.mx[1]) - b.mn[1]) * w_[1],
                              b.cmax > b.cmin ? (static_cast<double>(b.mx[2]) - b.mn[2]) * w_[2] : -1.0};
    int axis = 0;
    for (int a = 1; a < 3; ++a)
      if (extent[a] > extent[axis]) axis = a;
    const int64_t mid = lo + (hi - lo) / 2;
    auto key = [axis](const AirRun& s) {  // x: the centre, doubled to stay in integers
      return axis == 0 ? 2 * int64_t{s.z} : (axis == 1 ? 2 * int64_t{s.y} : int64_t{s.x0} + s.x1);
    };
    auto less = [&](const AirRun& a, const AirRun& b) { return key(a) < key(b); };
#ifdef XCTRT_PARALLEL_NTH_ELEMENT
    if (whole_cores) {
      __gnu_parallel::nth_element(s_.begin() + lo, s_.begin() + mid, s_.begin() + hi, less);
      return mid;
    }
#endif
    std::nth_element(s_.begin() + lo, s_.begin() + mid, s_.begin() + hi, less);
    return mid;
  }

  // The subtree of node r, its large nodes' halves as tasks.
  void build(const Range& r) {
    const int64_t mid = split(r, false);
    if (mid < 0) return;
#ifdef XCTRT_OPENMP
#pragma omp task if (r.hi - r.lo > 65536)
#endif
    build({2 * r.id + 1, r.lo, mid});
    build({2 * r.id + 2, mid, r.hi});
#ifdef XCTRT_OPENMP
#pragma omp taskwait
#endif
  }

  std::vector<AirRun> s_;
  std::array<double, 3> w_;
  std::vector<AirNode> nodes_;
};

// Runs grouped by component: component c's runs are runs[start[c] .. start[c + 1]).
struct RunsByComponent {
  std::vector<DefectRun> runs;
  std::vector<int64_t> start;
};

// Groups runs by comp_of(run) (0..n_comp-1, or -1 to leave the run out), each keeping its
// order (a counting sort); the result's runs carry their component in comp.
template <class CompOf>
inline RunsByComponent group_by_component(const std::vector<DefectRun>& runs, CompOf comp_of, size_t n_comp) {
  RunsByComponent g;
  g.start.assign(n_comp + 1, 0);
  for (const DefectRun& r : runs) {
    const int64_t c = comp_of(r);
    if (c >= 0) ++g.start[c + 1];
  }
  for (size_t c = 0; c < n_comp; ++c) g.start[c + 1] += g.start[c];
  g.runs.resize(static_cast<size_t>(g.start[n_comp]));
  std::vector<int64_t> next(g.start.begin(), g.start.end() - 1);
  for (const DefectRun& r : runs) {
    const int64_t c = comp_of(r);
    if (c < 0) continue;
    DefectRun& o = g.runs[next[c]++];
    o = r;
    o.comp = static_cast<uint32_t>(c);
  }
  return g;
}

// The same for runs whose comp is their component; runs that come grouped (comp ascending, as
// the array labeller sends them) are taken as they are.
inline RunsByComponent group_by_component(std::vector<DefectRun>&& runs, size_t n_comp) {
  const bool grouped = std::is_sorted(runs.begin(), runs.end(),
                                      [](const DefectRun& a, const DefectRun& b) { return a.comp < b.comp; });
  if (!grouped) return group_by_component(runs, [](const DefectRun& r) { return int64_t{r.comp}; }, n_comp);
  RunsByComponent g;
  g.start.assign(n_comp + 1, 0);
  for (const DefectRun& r : runs) ++g.start[r.comp + 1];
  for (size_t c = 0; c < n_comp; ++c) g.start[c + 1] += g.start[c];
  g.runs = std::move(runs);
  return g;
}

// Distance of every component (0..n_comp-1) to its nearest air voxel; NaN where there is no
// air outside the part or the component has no runs.
inline std::vector<double> surface_distance(std::vector<AirRun>&& air, const RunsByComponent& g,
                                            std::array<double, 3> voxel_size) {
  const size_t n_comp = g.start.size() - 1;
  std::vector<double> out(n_comp, std::numeric_limits<double>::quiet_NaN());
  if (air.empty() || g.runs.empty() || n_comp == 0) return out;
  const AirTree tree(std::move(air), voxel_size);
  const std::vector<int64_t>& start = g.start;
  const std::vector<DefectRun>& by_comp = g.runs;
  // Work items: a component's runs, in chunks so one large defect does not hold the others up.
  // Within a chunk each search starts from the chunk's best so far; a minimum does not depend
  // on how the runs are split, so the result does not either. The tree is read-only.
  constexpr int64_t kChunk = 512;
  std::vector<int64_t> item_comp, item_begin;
  for (size_t c = 0; c < n_comp; ++c)
    for (int64_t b = start[c]; b < start[c + 1]; b += kChunk)
      item_comp.push_back(static_cast<int64_t>(c)), item_begin.push_back(b);
  const int64_t n_items = static_cast<int64_t>(item_comp.size());
  std::vector<double> item_best(item_comp.size());
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(dynamic, 4)
#endif
  for (int64_t k = 0; k < n_items; ++k) {
    const int64_t end = std::min(item_begin[k] + kChunk, start[item_comp[k] + 1]);
    double best = std::numeric_limits<double>::infinity();
    for (int64_t i = item_begin[k]; i < end; ++i) best = tree.nearest2(by_comp[i], best);
    item_best[k] = best;
  }
  for (int64_t k = 0; k < n_items; ++k) {
    double& o = out[item_comp[k]];
    const double d = std::sqrt(item_best[k]);
    if (!(o <= d)) o = d;  // o starts as NaN
  }
  return out;
}

}  // namespace xctrt
