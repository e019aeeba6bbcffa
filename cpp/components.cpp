// Streamed 3D connected components with per-defect statistics.
//
// The volume arrives slab by slab in z order and is never held whole: each z-plane is turned
// into runs (maximal x-intervals of one defect label value), and each run is linked by
// union-find to the runs it touches in the row above and in up to three rows of the previous
// plane. Planes go in chunks of 16: what each run adds to its component (crossings, exposed
// sides, grey values) needs no ids, so the chunk's planes work that out side by side on all
// cores; the union-find then runs in z order (Labeller::add). Only the previous plane's runs are
// kept beyond a chunk, so memory is O(a chunk of slices)
// plus O(provisional components) for the statistics. Statistics are accumulated per provisional
// id and merged through the union-find in finish(), so there is no second pass over voxels.
// Union is by smaller id, so every root is the component's first provisional id, which is
// created at its first voxel in raster order.
//
// Multi-label semantics match cc3d on a volume with non-defect values zeroed: a voxel takes part
// if its label is in `classes`, and neighbours join only if their label values are equal.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#include <unistd.h>

#include "bindings.hpp"
#include "crofton.hpp"
#include "surface_distance.hpp"
#include "labeller_kernels.h"

namespace py = pybind11;

namespace xctrt {
namespace {

constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();
constexpr double kPi = 3.14159265358979323846;

struct Run {
  int32_t x0, x1;  // inclusive
  uint32_t id;     // provisional id (a root when it was assigned)
  uint8_t label;
};

// Runs of one plane; row y owns runs[row_start[y] .. row_start[y+1]).
struct PlaneRuns {
  std::vector<Run> runs;
  std::vector<uint32_t> row_start;
};

struct Stat {
  int64_t voxels = 0;
  int64_t sz = 0, sy = 0, sx = 0;  // coordinate sums, exact in int64
  std::array<int64_t, kDirs> cross{};  // line crossings per Crofton direction (crofton.hpp)
  double gsum = 0.0;
  double gmin = std::numeric_limits<double>::infinity();
  double gmax = -std::numeric_limits<double>::infinity();
  int32_t z0 = std::numeric_limits<int32_t>::max(), y0 = std::numeric_limits<int32_t>::max(),
          x0 = std::numeric_limits<int32_t>::max();
  int32_t z1 = -1, y1 = -1, x1 = -1;
  uint8_t cls = 0;
  bool edge = false;

  void merge(const Stat& o) {
    voxels += o.voxels;
    sz += o.sz, sy += o.sy, sx += o.sx;
    for (int k = 0; k < kDirs; ++k) cross[k] += o.cross[k];
    gsum += o.gsum;
    gmin = std::min(gmin, o.gmin), gmax = std::max(gmax, o.gmax);
    z0 = std::min(z0, o.z0), y0 = std::min(y0, o.y0), x0 = std::min(x0, o.x0);
    z1 = std::max(z1, o.z1), y1 = std::max(y1, o.y1), x1 = std::max(x1, o.x1);
    edge = edge || o.edge;
  }
};

// One neighbour row's defect runs, for counting crossings (Labeller::process_plane): for the
// voxels a..b of a row, how many have their neighbour in this row at x - 1, x and x + 1 not of
// label L (out[0..2]). Positions of label L are exactly its runs; beyond the row's ends there are
// none, and a row outside the volume (!exists) has none at all. Calls must come in increasing a:
// the cursor p only moves forward.
struct RowRuns {
  const Run* list = nullptr;
  uint32_t p = 0, end = 0;
  bool exists = false;

  std::array<int64_t, 3> not_L(int32_t a, int32_t b, uint8_t L) {
    const int64_t len = int64_t{b} - a + 1;
    int64_t m[3] = {0, 0, 0};
    if (exists) {
      while (p < end && list[p].x1 < a - 1) ++p;
      for (uint32_t q = p; q < end && list[q].x0 <= b + 1; ++q) {
        if (list[q].label != L) continue;
        for (int s = -1; s <= 1; ++s) {
          const int32_t lo = std::max(a + s, list[q].x0), hi = std::min(b + s, list[q].x1);
          if (hi >= lo) m[s + 1] += hi - lo + 1;
        }
      }
    }
    return {len - m[0], len - m[1], len - m[2]};
  }
};

// Image element types the grey statistics are templated on; NoImage skips them (label_volume).
struct NoImage {};

// What a run adds to its component's statistics, known before the union-find (Labeller phase 1):
// its crossings (all but the +z ones, which the next plane adds through RunUp), exposed sides and
// grey sum, minimum and maximum.
struct RunLocal {
  std::array<int64_t, kDirs> cross;
  double gsum, gmin, gmax;
  uint8_t exposed;
};

// The +z crossings of a run of the previous plane, counted against this plane's rows, and whether
// its +z side is exposed.
struct RunUp {
  std::array<int64_t, 9> cross;
  bool exposed_pz;
};

class Labeller {
 public:
  // surface: also collect what distance_to_surface() needs: every run of these classes (with
  // its exposed sides) and every air run, to find the air outside the part (add_air()).
  Labeller(std::array<int64_t, 3> shape, const std::vector<int64_t>& classes, int connectivity,
           std::array<double, 3> voxel_size, bool surface = true)
      : surface_(surface) {
    for (int64_t s : shape)
      if (s <= 0 || s > std::numeric_limits<int32_t>::max())
        throw std::invalid_argument("shape entries must be positive and below 2**31");
    if (connectivity != 6 && connectivity != 18 && connectivity != 26)
      throw std::invalid_argument("connectivity must be 6, 18 or 26, got " +
                                  std::to_string(connectivity));
    check_voxel_size(voxel_size);
    lut_.fill(0);
    for (int64_t c : classes) {
      if (c < 0 || c > 255)
        throw std::invalid_argument("classes must be label values in 0..255, got " +
                                    std::to_string(c));
      if (!lut_[c]) cls_.push_back(static_cast<uint8_t>(c));
      lut_[c] = 1;
    }
    Z_ = shape[0], Y_ = shape[1], X_ = shape[2];
    plane_ = Y_ * X_;
    conn_ = connectivity;
    dz_ = voxel_size[0], dy_ = voxel_size[1], dx_ = voxel_size[2];
    prev_.row_start.assign(Y_ + 1, 0);
    chunk_.resize(kChunk);
    for (PlaneRuns& pl : chunk_) pl.row_start.assign(Y_ + 1, 0);
    loc_.resize(kChunk);
    up_.resize(kChunk);
    air_row_prev_.assign(Y_ + 1, 0);
    air_row_cur_.assign(Y_ + 1, 0);
  }

  int64_t Z() const { return Z_; }
  int64_t Y() const { return Y_; }
  int64_t X() const { return X_; }
  int64_t slices_received() const { return z_; }
  int64_t n_provisional() const { return static_cast<int64_t>(parent_.size()); }

  // nz consecutive planes; img may be null only for T = NoImage. ids (optional, label_volume)
  // receives provisional id + 1 for every defect voxel.
  template <class T>
  void add(const uint8_t* lab, const T* img, int64_t nz, int32_t* ids) {
    // Only runs are carried from plane to plane (prev_): joins and crossings need no labels.
    // Chunks of planes: first each plane's runs and their own statistics, the planes side by side
    // on all cores (phase 1); then, in z order, the union-find and the air (phase 2).
    for (int64_t k0 = 0; k0 < nz; k0 += kChunk) {
      const int64_t n = std::min(kChunk, nz - k0);
      const uint8_t* l0 = lab + k0 * plane_;
      const T* i0 = img ? img + k0 * plane_ : nullptr;
      on_planes(n, [&](int64_t k) { extract_runs(l0 + k * plane_, chunk_[k]); });
      on_planes(n, [&](int64_t k) {
        local_stats<T>(chunk_[k], k ? chunk_[k - 1] : prev_, static_cast<int32_t>(z_ + k),
                       i0 ? i0 + k * plane_ : nullptr, loc_[k], up_[k]);
      });
      // Phase 2: the defects' union-find and the air's share nothing, so they run side by side.
      std::exception_ptr defects_error, air_error;
      auto defects = [&] {
        try {
          for (int64_t k = 0; k < n; ++k)
            link_plane<T>(chunk_[k], k ? chunk_[k - 1] : prev_, loc_[k], up_[k], z_ + k,
                          ids ? ids + (k0 + k) * plane_ : nullptr);
        } catch (...) {
          defects_error = std::current_exception();
        }
      };
      auto air = [&] {
        try {
          if (surface_)
            for (int64_t k = 0; k < n; ++k) add_air(l0 + k * plane_, z_ + k);
        } catch (...) {
          air_error = std::current_exception();
        }
      };
#ifdef XCTRT_OPENMP
#pragma omp parallel sections num_threads(2) if (surface_ && omp_get_max_threads() > 1)
      {
#pragma omp section
        defects();
#pragma omp section
        air();
      }
#else
      defects();
      air();
#endif
      if (defects_error) std::rethrow_exception(defects_error);
      if (air_error) std::rethrow_exception(air_error);
      z_ += n;
      std::swap(prev_, chunk_[n - 1]);  // the runs of the chunk's last plane, with their ids
    }
  }

  // Provisional id -> final id (1..N in raster order of first voxel, 0 if dropped), plus the
  // merged statistics of every kept component.
  void resolve(int64_t min_voxels, std::vector<uint32_t>& final_id, std::vector<Stat>& out) {
    const size_t n = parent_.size();
    // Merged in place of the roots' slots of `out`, then the kept ones moved forward: no second
    // table of statistics (~190 bytes per component; for a random network's ~500k components
    // the fresh pages of a copy and of the vector's growth took about as long as the merge).
    out.clear();
    out.reserve(n);   // address space only: pages are touched as the roots are written
    std::vector<uint32_t> slot(n);
    for (size_t i = 0; i < n; ++i) {
      const uint32_t r = find(static_cast<uint32_t>(i));
      if (r == i) {
        slot[i] = static_cast<uint32_t>(out.size());
        out.push_back(stats_[i]);
      } else {
        slot[i] = slot[r];  // r < i, already assigned
        out[slot[r]].merge(stats_[i]);
      }
    }
    std::vector<uint32_t> keep_id(out.size(), 0);
    size_t kept = 0;
    for (size_t k = 0; k < out.size(); ++k) {
      if (out[k].voxels >= min_voxels) {
        if (kept != k) out[kept] = out[k];
        keep_id[k] = static_cast<uint32_t>(++kept);
      }
    }
    out.resize(kept);
    final_id.resize(n);
    for (size_t i = 0; i < n; ++i) final_id[i] = keep_id[slot[i]];
  }

  // Distance of each kept component (final id - 1) to the part surface; see surface_distance.hpp.
  // Also counts the voxels of the air outside the part (outside_air_voxels()).
  std::vector<double> distance_to_surface(const std::vector<uint32_t>& final_id, size_t n_kept) {
    // Runs of dropped components (final id 0) are left out.
    auto comp_of = [&](const DefectRun& r) { return int64_t{final_id[r.comp]} - 1; };
    const RunsByComponent g = group_by_component(runs_, comp_of, n_kept);
    return surface_distance(std::vector<AirRun>(counted_outside_air()), g, {dz_, dy_, dx_});
  }

  // What distance_to_surface() searches, for a search elsewhere (the GPU path's kernel): the air
  // outside the part, and every run of a kept component as a (6, n) row-major block of z, y, x0,
  // x1, component (final id - 1), exposed sides, in comp_out too (-1: a dropped component's run).
  // Also counts the outside air's voxels (outside_air_voxels()).
  const std::vector<AirRun>& surface_inputs(const std::vector<uint32_t>& final_id, std::vector<int32_t>& runs_out,
                                            std::vector<int32_t>& comp_out) {
    const size_t n = runs_.size();
    runs_out.resize(6 * n);
    comp_out.resize(n);
    int32_t* o = runs_out.data();
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(static) if (n > 65536)
#endif
    for (size_t i = 0; i < n; ++i) {
      const DefectRun& r = runs_[i];
      const int32_t c = static_cast<int32_t>(final_id[r.comp]) - 1;
      o[i] = r.z, o[n + i] = r.y, o[2 * n + i] = r.x0, o[3 * n + i] = r.x1, o[4 * n + i] = c;
      o[5 * n + i] = r.exposed;
      comp_out[i] = c;
    }
    return counted_outside_air();
  }

  // Air voxels outside the part once distance_to_surface() or surface_inputs() has run (either
  // makes the outside air, once); -1 before that or without surface.
  int64_t outside_air_voxels() const { return surface_ ? outside_air_voxels_ : -1; }
  // Their runs (z, y, x0, x1), e.g. to draw the air the part encloses; empty before either of those.
  const std::vector<AirRun>& outside_air() const { return outside_; }

  double dz() const { return dz_; }
  double dy() const { return dy_; }
  double dx() const { return dx_; }

 private:
  uint32_t find(uint32_t x) {
    while (parent_[x] != x) {
      parent_[x] = parent_[parent_[x]];  // path halving
      x = parent_[x];
    }
    return x;
  }

  // Join every run in list[p..end) that overlaps [lo, hi] and has label L into id (a root).
  // p only moves past runs that end before lo, which later runs of the row start after too.
  inline void link(const Run* list, uint32_t end, uint32_t& p, int32_t lo, int32_t hi, uint8_t L,
                   uint32_t& id) {
    while (p < end && list[p].x1 < lo) ++p;
    for (uint32_t q = p; q < end && list[q].x0 <= hi; ++q) {
      if (list[q].label != L) continue;
      const uint32_t r = find(list[q].id);
      if (id == kNone) {
        id = r;
      } else if (r != id) {
        if (r < id) {
          parent_[id] = r;
          id = r;
        } else {
          parent_[r] = id;
        }
      }
    }
  }

  // fn(k) for the planes k = 0..n-1 of a chunk, on all cores; the first exception is rethrown
  // here (none may leave an OpenMP region).
  template <class Fn>
  static void on_planes(int64_t n, Fn fn) {
    std::exception_ptr error;
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (n > 1)
#endif
    for (int64_t k = 0; k < n; ++k) {
      try {
        fn(k);
      } catch (...) {
#ifdef XCTRT_OPENMP
#pragma omp critical(xctrt_on_planes)
#endif
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
  }

  void extract_runs(const uint8_t* lab, PlaneRuns& pr) const {
    pr.runs.clear();
    const int64_t X = X_;
    std::vector<uint8_t> mask(static_cast<size_t>(X));  // per call: planes are extracted side by side
    uint8_t* m = mask.data();
    const size_t ncls = cls_.size();
    for (int64_t y = 0; y < Y_; ++y) {
      pr.row_start[y] = static_cast<uint32_t>(pr.runs.size());
      if (ncls == 0) continue;
      const uint8_t* row = lab + y * X;
      // Membership mask: a few compare passes vectorise; many classes fall back to the table.
      if (ncls <= 4) {
        const uint8_t c0 = cls_[0];
        for (int64_t x = 0; x < X; ++x) m[x] = row[x] == c0;
        for (size_t c = 1; c < ncls; ++c) {
          const uint8_t cc = cls_[c];
          for (int64_t x = 0; x < X; ++x) m[x] |= row[x] == cc;
        }
      } else {
        for (int64_t x = 0; x < X; ++x) m[x] = lut_[row[x]];
      }
      int64_t x = 0;
      for (;;) {
        // Most voxels are not defects: skip them eight at a time.
        while (x + 8 <= X) {
          uint64_t w;
          std::memcpy(&w, m + x, 8);
          if (w) break;
          x += 8;
        }
        while (x < X && !m[x]) ++x;
        if (x >= X) break;
        const uint8_t L = row[x];
        const int64_t s = x++;
        while (x < X && row[x] == L) ++x;
        pr.runs.push_back(Run{static_cast<int32_t>(s), static_cast<int32_t>(x - 1), kNone, L});
      }
    }
    pr.row_start[Y_] = static_cast<uint32_t>(pr.runs.size());
    if (pr.runs.size() >= kNone)
      throw std::invalid_argument("too many defect runs in one plane");
  }

  // Phase 1 of a plane, on its own (all of a chunk's planes side by side): what each run adds to
  // its component, whatever that component turns out to be. z: the plane's index in the volume;
  // pp: the previous plane's runs (ignored at z = 0).
  template <class T>
  void local_stats(const PlaneRuns& cur, const PlaneRuns& pp, int32_t z, const T* img,
                   std::vector<RunLocal>& loc, std::vector<RunUp>& up) const {
    const int64_t X = X_, Y = Y_;
    const bool prev = z > 0, last = z == Z_ - 1;
    loc.resize(cur.runs.size());
    up.resize(prev ? pp.runs.size() : 0);
    const uint32_t* cs = cur.row_start.data();
    const uint32_t* ps = pp.row_start.data();
    // A neighbour row's runs, for the crossings (none where the plane or row is outside the volume).
    auto rows_of = [&](const PlaneRuns& pl, int64_t yy, bool plane_exists) {
      RowRuns rr;
      rr.exists = plane_exists && yy >= 0 && yy < Y;
      if (rr.exists) rr.list = pl.runs.data(), rr.p = pl.row_start[yy], rr.end = pl.row_start[yy + 1];
      return rr;
    };
    for (int64_t y = 0; y < Y; ++y) {
      if (cs[y] != cs[y + 1]) {
        // This plane's rows y -+ 1, the previous plane's rows y - 1, y, y + 1.
        RowRuns above = rows_of(cur, y - 1, true), below = rows_of(cur, y + 1, true);
        RowRuns prev_rows[3] = {rows_of(pp, y - 1, prev), rows_of(pp, y, prev), rows_of(pp, y + 1, prev)};
        for (uint32_t i = cs[y]; i < cs[y + 1]; ++i) {
          const Run& r = cur.runs[i];
          const int32_t a = r.x0, b = r.x1;
          const uint8_t L = r.label;
          const int64_t len = b - a + 1;
          RunLocal& o = loc[i];
          o.cross.fill(0);
          // Crossings (crofton.hpp): a voxel whose neighbour one step along -v_k is not in
          // the defect counts for direction k, and one whose neighbour along +v_k is not.
          // A run is maximal for its label, so both x ends cross along x.
          o.cross[0] = 2;
          // In-plane diagonals and y: +v = (0, 1, dx) reaches the row below at x + dx, -v the
          // row above at x - dx.
          const auto upr = above.not_L(a, b, L), down = below.not_L(a, b, L);
          for (int dx = -1; dx <= 1; ++dx) o.cross[2 + dx] += down[1 + dx] + upr[1 - dx];
          // -v = (-1, -dy, -dx) reaches row y - dy of the previous plane at x - dx; +v is
          // counted when the next plane arrives (RunUp), or here for the last plane.
          const std::array<int64_t, 3> pr3[3] = {prev_rows[2].not_L(a, b, L), prev_rows[1].not_L(a, b, L),
                                                 prev_rows[0].not_L(a, b, L)};  // dy = -1, 0, 1
          for (int dy = -1; dy <= 1; ++dy)
            for (int dx = -1; dx <= 1; ++dx)
              o.cross[4 + 3 * (dy + 1) + (dx + 1)] += pr3[dy + 1][1 - dx] + (last ? len : 0);
          // Exposed sides; +z is known when the next plane arrives (RunUp), or here at the last.
          o.exposed = (pr3[1][1] ? kExpMz : 0) | (last ? kExpPz : 0) | (upr[1] ? kExpMy : 0) |
                      (down[1] ? kExpPy : 0);
          if constexpr (!std::is_same_v<T, NoImage>) {
            const T* g = img + y * X + a;
            double sum = 0.0, mn = std::numeric_limits<double>::infinity(), mx = -mn;
            for (int64_t k = 0; k < len; ++k) {
              const double v = static_cast<double>(g[k]);
              sum += v;
              mn = v < mn ? v : mn;
              mx = v > mx ? v : mx;
            }
            o.gsum = sum, o.gmin = mn, o.gmax = mx;
          }
        }
      }
      // Crossings along +v = (1, dy, dx) of the previous plane's runs in this row: row y + dy
      // of this plane at x + dx.
      if (prev) {
        RowRuns rows[3] = {rows_of(cur, y - 1, true), rows_of(cur, y, true), rows_of(cur, y + 1, true)};
        for (uint32_t j = ps[y]; j < ps[y + 1]; ++j) {
          const Run& r = pp.runs[j];
          const std::array<int64_t, 3> c3[3] = {rows[0].not_L(r.x0, r.x1, r.label),
                                                rows[1].not_L(r.x0, r.x1, r.label),
                                                rows[2].not_L(r.x0, r.x1, r.label)};
          RunUp& u = up[j];
          for (int dy = -1; dy <= 1; ++dy)
            for (int dx = -1; dx <= 1; ++dx) u.cross[3 * (dy + 1) + (dx + 1)] = c3[dy + 1][1 + dx];
          u.exposed_pz = c3[1][1] != 0;
        }
      }
    }
  }

  // Phase 2 of a plane, in z order: each run joins (union-find) the runs it touches in the row
  // above and in up to three rows of the previous plane, and adds its phase-1 statistics to its
  // provisional component; the previous plane's runs get their +z crossings.
  template <class T>
  void link_plane(PlaneRuns& cur, PlaneRuns& pp, const std::vector<RunLocal>& loc,
                  const std::vector<RunUp>& up, int64_t plane_z, int32_t* ids) {
    const size_t cur_runs_base = runs_.size();  // this plane's runs are runs_[base + i]
    const int64_t X = X_, Y = Y_;
    const int32_t z = static_cast<int32_t>(plane_z);
    const bool prev = plane_z > 0;
    const bool zedge = plane_z == 0 || plane_z == Z_ - 1;
    // Reach of the neighbour rows along x: same-plane row y-1 and previous-plane row y use
    // x-1..x+1 beyond 6-conn; previous-plane rows y+-1 are out for 6, x only for 18.
    const int32_t d1 = conn_ == 6 ? 0 : 1;
    const int32_t d2 = conn_ == 26 ? 1 : 0;
    const bool diag_rows = conn_ != 6;
    const Run* cr = cur.runs.data();
    const Run* pr = pp.runs.data();
    const uint32_t* cs = cur.row_start.data();
    const uint32_t* ps = pp.row_start.data();
    for (int64_t y = 0; y < Y; ++y) {
      const uint32_t rb = cs[y], re = cs[y + 1];
      if (rb != re) {
        // Cursors into the neighbour rows' run lists.
        uint32_t pu = y > 0 ? cs[y - 1] : 0, pu_end = y > 0 ? cs[y] : 0;
        uint32_t q0 = 0, q0_end = 0, qm = 0, qm_end = 0, qp = 0, qp_end = 0;
        if (prev) {
          q0 = ps[y], q0_end = ps[y + 1];
          if (diag_rows && y > 0) qm = ps[y - 1], qm_end = ps[y];
          if (diag_rows && y + 1 < Y) qp = ps[y + 1], qp_end = ps[y + 2];
        }
        const bool yedge = y == 0 || y == Y - 1;
        for (uint32_t i = rb; i < re; ++i) {
          Run& r = cur.runs[i];
          const int32_t a = r.x0, b = r.x1;
          const uint8_t L = r.label;
          uint32_t id = kNone;
          link(cr, pu_end, pu, a - d1, b + d1, L, id);
          if (prev) {
            link(pr, q0_end, q0, a - d1, b + d1, L, id);
            link(pr, qm_end, qm, a - d2, b + d2, L, id);
            link(pr, qp_end, qp, a - d2, b + d2, L, id);
          }
          if (id == kNone) {
            if (parent_.size() >= kNone - 1)
              throw std::invalid_argument("too many provisional components for 32-bit ids");
            id = static_cast<uint32_t>(parent_.size());
            parent_.push_back(id);
            stats_.emplace_back();
            stats_.back().cls = L;
          }
          r.id = id;

          const RunLocal& o = loc[i];
          const int64_t len = b - a + 1;
          Stat& s = stats_[id];
          s.voxels += len;
          s.sz += static_cast<int64_t>(z) * len;
          s.sy += y * len;
          s.sx += (static_cast<int64_t>(a) + b) * len / 2;
          s.z0 = std::min(s.z0, z), s.z1 = std::max(s.z1, z);
          s.y0 = std::min(s.y0, static_cast<int32_t>(y)), s.y1 = std::max(s.y1, static_cast<int32_t>(y));
          s.x0 = std::min(s.x0, a), s.x1 = std::max(s.x1, b);
          if (zedge || yedge || a == 0 || b == X - 1) s.edge = true;
          for (int k = 0; k < kDirs; ++k) s.cross[k] += o.cross[k];
          if (surface_) runs_.push_back(DefectRun{z, static_cast<int32_t>(y), a, b, id, o.exposed});
          if constexpr (!std::is_same_v<T, NoImage>) {
            s.gsum += o.gsum;
            s.gmin = o.gmin < s.gmin ? o.gmin : s.gmin;
            s.gmax = o.gmax > s.gmax ? o.gmax : s.gmax;
          }
          if (ids) {
            const int32_t v = static_cast<int32_t>(id) + 1;
            int32_t* out = ids + y * X;
            for (int32_t x = a; x <= b; ++x) out[x] = v;
          }
        }
      }
      if (prev) {
        for (uint32_t j = ps[y]; j < ps[y + 1]; ++j) {
          const RunUp& u = up[j];
          Stat& s = stats_[pr[j].id];
          for (int k = 0; k < 9; ++k) s.cross[4 + k] += u.cross[k];
          if (surface_ && u.exposed_pz) runs_[prev_runs_base_ + j].exposed |= kExpPz;
        }
      }
    }
    prev_runs_base_ = cur_runs_base;
  }

  // The part's outside: air (label 0) connected (6-neighbours) to the volume's sides (y or x at
  // its edge). What the part encloses is not outside: a closed cavity, or the dark rim a model
  // may draw round a pore; a channel that leaves the part into the air round it is. The first
  // and last planes are not edges here: a part usually runs through them, and what it encloses
  // there (a rim, a cavity cut by the field of view) would otherwise all read as outside. Air
  // runs are linked as they stream to the air runs they overlap in the row above and in the
  // same row of the previous plane: union by smaller index, so a parent always comes before
  // its child, with the edge flags merged at the roots. outside_air_runs() keeps the runs
  // whose root has the flag.
  void add_air(const uint8_t* lab, int64_t plane_z) {
    const int64_t X = X_, Y = Y_;
    const int32_t z = static_cast<int32_t>(plane_z);
    const uint32_t base = static_cast<uint32_t>(air_.size());  // this plane's first air run
    auto find = [this](uint32_t a) {
      while (air_parent_[a] != a) a = air_parent_[a] = air_parent_[air_parent_[a]];
      return a;
    };
    auto unite = [&](uint32_t a, uint32_t b) {
      a = find(a), b = find(b);
      if (a == b) return;
      const uint32_t lo = std::min(a, b), hi = std::max(a, b);
      air_parent_[hi] = lo;
      air_edge_[lo] |= air_edge_[hi];
    };
    // Cursor k into [k, end) of earlier air runs: link id to those overlapping [s, e]; k only
    // passes runs ending before s, which later runs of the row start after too.
    auto link = [&](uint32_t& k, uint32_t end, int64_t s, int64_t e, uint32_t id) {
      while (k < end && air_[k].x1 < s) ++k;
      for (uint32_t j = k; j < end && air_[j].x0 <= e; ++j) unite(j, id);
    };
    for (int64_t y = 0; y < Y; ++y) {
      const uint8_t* row = lab + y * X;
      air_row_cur_[y] = static_cast<uint32_t>(air_.size()) - base;
      uint32_t ka = y > 0 ? base + air_row_cur_[y - 1] : 0, ka_end = y > 0 ? base + air_row_cur_[y] : 0;
      uint32_t kp = 0, kp_end = 0;
      if (plane_z > 0) kp = air_prev_base_ + air_row_prev_[y], kp_end = air_prev_base_ + air_row_prev_[y + 1];
      for (int64_t x = 0; x < X;) {
        const void* p = std::memchr(row + x, 0, static_cast<size_t>(X - x));
        if (!p) break;
        const int64_t s = static_cast<const uint8_t*>(p) - row;
        int64_t e = s;
        while (e + 1 < X && row[e + 1] == 0) ++e;
        if (air_.size() >= kNone - 1) throw std::invalid_argument("too many air runs for 32-bit ids");
        const uint32_t id = static_cast<uint32_t>(air_.size());
        air_.push_back(AirRun{z, static_cast<int32_t>(y), static_cast<int32_t>(s), static_cast<int32_t>(e)});
        air_parent_.push_back(id);
        air_edge_.push_back(y == 0 || y == Y - 1 || s == 0 || e == X - 1);
        link(ka, ka_end, s, e, id);
        link(kp, kp_end, s, e, id);
        x = e + 1;
      }
    }
    air_row_cur_[Y] = static_cast<uint32_t>(air_.size()) - base;
    std::swap(air_row_prev_, air_row_cur_);
    air_prev_base_ = base;
  }

  // outside_air_runs(), their voxels counted for outside_air_voxels(): made once, since every slice
  // is in by then (a search, its inputs and the preview's enclosed air all ask; each pass over the
  // air took ~0.1 s for a 1000x1200x1200 part on 2 cores).
  const std::vector<AirRun>& counted_outside_air() {
    if (outside_air_voxels_ < 0) {
      outside_ = outside_air_runs();
      int64_t voxels = 0;
      for (const AirRun& r : outside_) voxels += int64_t{r.x1} - r.x0 + 1;
      outside_air_voxels_ = voxels;
    }
    return outside_;
  }

  // The air runs outside the part (add_air()): those whose root has the edge flag.
  std::vector<AirRun> outside_air_runs() const {
    std::vector<uint32_t> root(air_.size());
    std::vector<AirRun> out;
    out.reserve(air_.size());   // usually nearly all of them: no copies as it grows
    for (size_t i = 0; i < air_.size(); ++i) {
      root[i] = air_parent_[i] == i ? static_cast<uint32_t>(i) : root[air_parent_[i]];  // parent < i
      if (air_edge_[root[i]]) out.push_back(air_[i]);
    }
    return out;
  }

  int64_t Z_ = 0, Y_ = 0, X_ = 0, plane_ = 0, z_ = 0;
  int conn_ = 26;
  double dz_ = 1.0, dy_ = 1.0, dx_ = 1.0;
  std::array<uint8_t, 256> lut_{};
  std::vector<uint8_t> cls_;
  static constexpr int64_t kChunk = 16;  // planes whose phase 1 runs side by side
  PlaneRuns prev_;                        // the last plane's runs, ids assigned
  std::vector<PlaneRuns> chunk_;          // a chunk's planes
  std::vector<std::vector<RunLocal>> loc_;  // their runs' own statistics (phase 1)
  std::vector<std::vector<RunUp>> up_;      // ... and the +z crossings of the plane before each
  std::vector<uint32_t> parent_;
  std::vector<Stat> stats_;
  bool surface_ = true;
  int64_t outside_air_voxels_ = -1;
  std::vector<AirRun> outside_;   // counted_outside_air()
  std::vector<DefectRun> runs_;    // every defect run, comp = provisional id
  size_t prev_runs_base_ = 0;      // the previous plane's runs start here in runs_
  // add_air(): every air run, its union-find parent and edge flag (merged at roots), and where
  // each row's runs start in the previous and this plane (relative to the plane's first run).
  std::vector<AirRun> air_;
  std::vector<uint32_t> air_parent_;
  std::vector<uint8_t> air_edge_;
  std::vector<uint32_t> air_row_prev_, air_row_cur_;
  uint32_t air_prev_base_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Python side.

using LabelArray = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

LabelArray as_labels(const py::array& a) {
  if (!py::isinstance<py::array_t<uint8_t>>(a))
    throw std::invalid_argument("labels must be a uint8 array, got dtype " +
                                py::str(a.dtype()).cast<std::string>());
  return LabelArray::ensure(a);  // same dtype: only makes it C-contiguous if needed
}

enum class ImageType { U8, U16, F32 };

ImageType image_type(const py::array& a) {
  if (py::isinstance<py::array_t<uint8_t>>(a)) return ImageType::U8;
  if (py::isinstance<py::array_t<uint16_t>>(a)) return ImageType::U16;
  if (py::isinstance<py::array_t<float>>(a)) return ImageType::F32;
  throw std::invalid_argument("image must be a native uint8, uint16 or float32 array, got dtype " +
                              py::str(a.dtype()).cast<std::string>());
}

// Adds how many of n bytes take each value to counts: all cores in blocks, each block counted
// into four tables in turn (consecutive equal bytes, as in a label volume's long runs, would
// otherwise wait on one counter's previous increment).
void count_values(const uint8_t* p, int64_t n, std::array<int64_t, 256>& counts) {
  constexpr int64_t kBlock = int64_t{1} << 20;  // < 2**32 / 4: a block's counts fit uint32
  const int64_t nb = (n + kBlock - 1) / kBlock;
#ifdef XCTRT_OPENMP
#pragma omp parallel if (nb > 1)
#endif
  {
    std::array<int64_t, 256> local{};
    std::array<uint32_t, 4 * 256> t;
#ifdef XCTRT_OPENMP
#pragma omp for schedule(static) nowait
#endif
    for (int64_t b = 0; b < nb; ++b) {
      t.fill(0);
      const uint8_t* q = p + b * kBlock;
      const int64_t m = std::min(kBlock, n - b * kBlock);
      int64_t i = 0;
      for (; i + 4 <= m; i += 4) {
        ++t[q[i]], ++t[256 + q[i + 1]], ++t[512 + q[i + 2]], ++t[768 + q[i + 3]];
      }
      for (; i < m; ++i) ++t[q[i]];
      for (int v = 0; v < 256; ++v) local[v] += int64_t{t[v]} + t[256 + v] + t[512 + v] + t[768 + v];
    }
#ifdef XCTRT_OPENMP
#pragma omp critical(xctrt_count_values)
#endif
    for (int v = 0; v < 256; ++v) counts[v] += local[v];
  }
}

class PyLabeller {
 public:
  PyLabeller(std::array<int64_t, 3> shape, std::vector<int64_t> classes, int connectivity,
             std::array<double, 3> voxel_size)
      : lab_(shape, classes, connectivity, voxel_size) {}

  void add_slab(const py::array& labels, const py::array& image) {
    if (busy_) throw std::runtime_error("ComponentLabeller is busy in another thread");
    if (labels.ndim() != 3 || labels.shape(1) != lab_.Y() || labels.shape(2) != lab_.X())
      throw std::invalid_argument("labels must be (z, " + std::to_string(lab_.Y()) + ", " +
                                  std::to_string(lab_.X()) + ")");
    if (image.ndim() != 3 || image.shape(0) != labels.shape(0) ||
        image.shape(1) != labels.shape(1) || image.shape(2) != labels.shape(2))
      throw std::invalid_argument("image must have the same shape as labels");
    const int64_t nz = labels.shape(0);
    if (lab_.slices_received() + nz > lab_.Z())
      throw std::invalid_argument("too many slices: " + std::to_string(lab_.slices_received()) +
                                  " received, this slab has " + std::to_string(nz) +
                                  ", the volume has " + std::to_string(lab_.Z()));
    LabelArray l = as_labels(labels);
    switch (image_type(image)) {
      case ImageType::U8: run<uint8_t>(l, image, nz); break;
      case ImageType::U16: run<uint16_t>(l, image, nz); break;
      case ImageType::F32: run<float>(l, image, nz); break;
    }
  }

  // surface_distance false: the table's distances are NaN, for a search elsewhere from
  // surface_search_inputs().
  py::dict finish(int64_t min_voxels, bool surface_distance) {
    if (lab_.slices_received() != lab_.Z())
      throw std::invalid_argument("finish() before all slices arrived: " +
                                  std::to_string(lab_.slices_received()) + " of " +
                                  std::to_string(lab_.Z()));
    if (min_voxels < 0) throw std::invalid_argument("min_voxels must be >= 0");
    std::vector<uint32_t> final_id;
    std::vector<Stat> st;
    std::vector<double> dist;
    // resolve() compresses union-find paths, so it must not overlap another call either.
    exclusive([&] {
      lab_.resolve(min_voxels, final_id, st);
      if (surface_distance)
        dist = lab_.distance_to_surface(final_id, st.size());
      else
        dist.assign(st.size(), std::numeric_limits<double>::quiet_NaN());
    });
    final_id_ = std::move(final_id);
    n_kept_ = static_cast<int64_t>(st.size());
    return make_table(st, dist, lab_.dz(), lab_.dy(), lab_.dx());
  }

  // After finish(): (air (m, 4), runs (6, n), comp (n,)) int32 as search_air_runs takes them, for
  // the components the last finish() kept.
  py::tuple surface_search_inputs() {
    if (n_kept_ < 0) throw std::runtime_error("surface_search_inputs() comes after finish()");
    std::vector<int32_t> runs, comp;
    const std::vector<AirRun>* air_runs = nullptr;
    exclusive([&] { air_runs = &lab_.surface_inputs(final_id_, runs, comp); });
    const std::vector<AirRun>& air = *air_runs;
    const py::ssize_t n = static_cast<py::ssize_t>(comp.size()), m = static_cast<py::ssize_t>(air.size());
    py::array_t<int32_t> a({m, py::ssize_t{4}}), r({py::ssize_t{6}, n}), c(n);
    if (m) std::memcpy(a.mutable_data(), air.data(), air.size() * sizeof(AirRun));
    if (n) {
      std::memcpy(r.mutable_data(), runs.data(), runs.size() * sizeof(int32_t));
      std::memcpy(c.mutable_data(), comp.data(), comp.size() * sizeof(int32_t));
    }
    return py::make_tuple(a, r, c);
  }

  int64_t n_provisional() const { return lab_.n_provisional(); }
  py::array_t<int32_t> outside_air_runs() const {
    if (lab_.outside_air_voxels() < 0) throw std::runtime_error("outside_air_runs() comes after finish()");
    const std::vector<AirRun>& runs = lab_.outside_air();
    py::array_t<int32_t> out({static_cast<py::ssize_t>(runs.size()), py::ssize_t{4}});
    if (!runs.empty()) std::memcpy(out.mutable_data(), runs.data(), runs.size() * sizeof(AirRun));
    return out;
  }
  py::object outside_air_voxels() const {
    const int64_t n = lab_.outside_air_voxels();
    return n < 0 ? py::none() : py::object(py::int_(n));
  }
  int64_t slices_received() const { return lab_.slices_received(); }
  py::array_t<int64_t> value_counts() const {
    py::array_t<int64_t> out(256);
    std::memcpy(out.mutable_data(), value_counts_.data(), sizeof(value_counts_));
    return out;
  }
  py::tuple shape() const { return py::make_tuple(lab_.Z(), lab_.Y(), lab_.X()); }

  static py::dict make_table(const std::vector<Stat>& st, const std::vector<double>& dist, double dz,
                             double dy, double dx) {
    const py::ssize_t n = static_cast<py::ssize_t>(st.size());
    py::array_t<int64_t> id(n), voxels(n), z0(n), y0(n), x0(n), z1(n), y1(n), x1(n);
    py::array_t<uint8_t> cls(n);
    py::array_t<double> volume(n), eqd(n), cz(n), cy(n), cx(n), area(n), spher(n), gmean(n),
        gmin(n), gmax(n), surf(n);
    py::array_t<bool> edge(n);
    auto I = [](py::array_t<int64_t>& a) { return a.mutable_data(); };
    auto D = [](py::array_t<double>& a) { return a.mutable_data(); };
    int64_t *pid = I(id), *pv = I(voxels), *pz0 = I(z0), *py0 = I(y0), *px0 = I(x0), *pz1 = I(z1),
            *py1 = I(y1), *px1 = I(x1);
    double *pvol = D(volume), *peq = D(eqd), *pcz = D(cz), *pcy = D(cy), *pcx = D(cx),
           *parea = D(area), *psph = D(spher), *pgm = D(gmean), *pgmin = D(gmin), *pgmax = D(gmax),
           *psurf = D(surf);
    uint8_t* pcls = cls.mutable_data();
    bool* pedge = edge.mutable_data();
    const std::array<double, kDirs> per_crossing = crofton_factors({dz, dy, dx});
    const double cbrt_pi = std::cbrt(kPi);
    {
      py::gil_scoped_release release;   // rows on their own: all cores for the random network's ~500k
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(static) if (n > 16384)
#endif
      for (py::ssize_t i = 0; i < n; ++i) {
        const Stat& s = st[i];
        const double v = static_cast<double>(s.voxels);
        pid[i] = i + 1;
        pcls[i] = s.cls;
        pv[i] = s.voxels;
        const double vol = v * dz * dy * dx;
        pvol[i] = vol;
        peq[i] = std::cbrt(6.0 * vol / kPi);
        pz0[i] = s.z0, py0[i] = s.y0, px0[i] = s.x0, pz1[i] = s.z1, py1[i] = s.y1, px1[i] = s.x1;
        pcz[i] = static_cast<double>(s.sz) / v;
        pcy[i] = static_cast<double>(s.sy) / v;
        pcx[i] = static_cast<double>(s.sx) / v;
        double a = 0.0;  // Crofton estimate (crofton.hpp)
        for (int k = 0; k < kDirs; ++k) a += static_cast<double>(s.cross[k]) * per_crossing[k];
        parea[i] = a;
        psph[i] = cbrt_pi * std::pow(6.0 * vol, 2.0 / 3.0) / a;
        pgm[i] = s.gsum / v;
        pgmin[i] = s.gmin, pgmax[i] = s.gmax;
        pedge[i] = s.edge;
        psurf[i] = dist[i];
      }
    }
    py::dict t;
    t["id"] = id, t["class"] = cls, t["voxels"] = voxels, t["volume"] = volume;
    t["equivalent_diameter"] = eqd;
    t["bbox_z0"] = z0, t["bbox_y0"] = y0, t["bbox_x0"] = x0;
    t["bbox_z1"] = z1, t["bbox_y1"] = y1, t["bbox_x1"] = x1;
    t["centroid_z"] = cz, t["centroid_y"] = cy, t["centroid_x"] = cx;
    t["surface_area"] = area, t["sphericity"] = spher;
    t["grey_mean"] = gmean, t["grey_min"] = gmin, t["grey_max"] = gmax;
    t["touches_edge"] = edge;
    t["surface_distance"] = surf;
    return t;
  }

  Labeller& core() { return lab_; }

 private:
  template <class T>
  void run(const LabelArray& l, const py::array& image, int64_t nz) {
    auto img = py::array_t<T, py::array::c_style | py::array::forcecast>::ensure(image);
    const uint8_t* lp = l.data();
    const T* ip = img.data();
    exclusive([&] {
      count_values(lp, nz * lab_.Y() * lab_.X(), value_counts_);
      lab_.add<T>(lp, ip, nz, nullptr);
    });
  }

  // fn() without the GIL. Another Python thread could call in meanwhile: refused rather than raced.
  template <class Fn>
  void exclusive(Fn fn) {
    if (busy_) throw std::runtime_error("ComponentLabeller is busy in another thread");
    busy_ = true;
    try {
      py::gil_scoped_release release;
      fn();
    } catch (...) {
      busy_ = false;
      throw;
    }
    busy_ = false;
  }

  Labeller lab_;
  std::array<int64_t, 256> value_counts_{};  // voxels per label value in the slabs added so far
  std::vector<uint32_t> final_id_;           // the last finish()'s final id of each provisional one
  int64_t n_kept_ = -1;                      // and how many components it kept (-1: none yet)
  bool busy_ = false;
};

py::dict label_components(const py::array& labels, const py::array& image,
                          std::vector<int64_t> classes, int connectivity,
                          std::array<double, 3> voxel_size, int64_t min_voxels, int64_t slab) {
  if (labels.ndim() != 3) throw std::invalid_argument("labels must be a 3-D (Z, Y, X) array");
  if (slab < 1) throw std::invalid_argument("slab must be >= 1");
  PyLabeller lab({labels.shape(0), labels.shape(1), labels.shape(2)}, std::move(classes),
                 connectivity, voxel_size);
  const int64_t Z = labels.shape(0);
  // Stream views of the whole volume; add_slab validates dtype and shape.
  for (int64_t z = 0; z < Z; z += slab) {
    const int64_t e = std::min(Z, z + slab);
    py::slice sl(z, e, 1);
    lab.add_slab(labels[sl].cast<py::array>(), image[sl].cast<py::array>());
  }
  return lab.finish(min_voxels, true);
}

py::array_t<int32_t> label_volume(const py::array& labels, std::vector<int64_t> classes,
                                  int connectivity) {
  if (labels.ndim() != 3) throw std::invalid_argument("labels must be a 3-D (Z, Y, X) array");
  LabelArray l = as_labels(labels);
  const int64_t Z = l.shape(0), Y = l.shape(1), X = l.shape(2);
  Labeller lab({Z, Y, X}, classes, connectivity, {1.0, 1.0, 1.0}, false);
  py::array_t<int32_t> out({Z, Y, X});
  int32_t* o = out.mutable_data();
  const uint8_t* lp = l.data();
  {
    py::gil_scoped_release release;
    std::fill(o, o + Z * Y * X, 0);
    // Provisional ids + 1 go straight into the output, then get renumbered.
    lab.add<NoImage>(lp, nullptr, Z, o);
    if (lab.n_provisional() >= std::numeric_limits<int32_t>::max())
      throw std::invalid_argument("too many components for int32 ids");
    std::vector<uint32_t> final_id;
    std::vector<Stat> st;
    lab.resolve(0, final_id, st);
    const int64_t n = Z * Y * X;
    for (int64_t i = 0; i < n; ++i)
      if (o[i]) o[i] = static_cast<int32_t>(final_id[o[i] - 1]);
  }
  return out;
}

// The per-component table from already merged statistics (one row per component, in id
// order): lets the array (NumPy/CuPy) labeller share make_table with the C++ one, so the
// derived columns agree bit for bit.
py::dict component_table(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> voxels,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> sz,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> sy,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> sx,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> crossings,
    py::array_t<double, py::array::c_style | py::array::forcecast> gsum,
    py::array_t<double, py::array::c_style | py::array::forcecast> gmin,
    py::array_t<double, py::array::c_style | py::array::forcecast> gmax,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> z0,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> y0,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> x0,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> z1,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> y1,
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> x1,
    py::array_t<uint8_t, py::array::c_style | py::array::forcecast> cls,
    py::array_t<bool, py::array::c_style | py::array::forcecast> edge,
    py::array_t<double, py::array::c_style | py::array::forcecast> surface_distance,
    std::array<double, 3> voxel_size) {
  check_voxel_size(voxel_size);
  const py::ssize_t n = voxels.size();
  const py::array* cols[] = {&voxels, &sz, &sy, &sx, &gsum, &gmin, &gmax, &z0, &y0,
                             &x0, &z1, &y1, &x1, &cls, &edge, &surface_distance};
  for (const py::array* c : cols)
    if (c->ndim() != 1 || c->size() != n)
      throw std::invalid_argument("component_table needs 1-D columns of one length");
  if (crossings.ndim() != 2 || crossings.shape(0) != n || crossings.shape(1) != kDirs)
    throw std::invalid_argument("crossings must be an (n, 13) array, one row per component");
  const int64_t* cr = crossings.data();
  std::vector<Stat> st(static_cast<size_t>(n));
  const auto *pv = voxels.data(), *psz = sz.data(), *psy = sy.data(), *psx = sx.data();
  const auto *pgs = gsum.data(), *pgmin = gmin.data(), *pgmax = gmax.data();
  const auto *pz0 = z0.data(), *py0 = y0.data(), *px0 = x0.data(), *pz1 = z1.data(), *py1 = y1.data(),
             *px1 = x1.data();
  const auto* pcls = cls.data();
  const auto* pedge = edge.data();
  {
    py::gil_scoped_release release;
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(static) if (n > 16384)
#endif
    for (py::ssize_t i = 0; i < n; ++i) {
      Stat& s = st[i];
      s.voxels = pv[i], s.sz = psz[i], s.sy = psy[i], s.sx = psx[i];
      std::copy(cr + i * kDirs, cr + (i + 1) * kDirs, s.cross.begin());
      s.gsum = pgs[i], s.gmin = pgmin[i], s.gmax = pgmax[i];
      s.z0 = pz0[i], s.y0 = py0[i], s.x0 = px0[i];
      s.z1 = pz1[i], s.y1 = py1[i], s.x1 = px1[i];
      s.cls = pcls[i], s.edge = pedge[i];
    }
  }
  const double* d = surface_distance.data();
  return PyLabeller::make_table(st, std::vector<double>(d, d + n), voxel_size[0], voxel_size[1],
                                voxel_size[2]);
}

using RunArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// Air runs from Python, an (m, 4) array of z, y, x0, x1: voxel coordinates (>= 0, so every
// int32 gap in the search fits) and x0 <= x1. Checked on all cores (millions of runs from the
// GPU path).
std::vector<AirRun> checked_air(const RunArray& air) {
  if (air.ndim() != 2 || air.shape(1) != 4)
    throw std::invalid_argument("air must be an (m, 4) array of (z, y, x0, x1)");
  std::vector<AirRun> s(static_cast<size_t>(air.shape(0)));
  if (!s.empty()) std::memcpy(s.data(), air.data(), s.size() * sizeof(AirRun));
  int bad = 0;
  const int64_t m = static_cast<int64_t>(s.size());
#ifdef XCTRT_OPENMP
#pragma omp parallel for reduction(max : bad) if (m > 65536)
#endif
  for (int64_t i = 0; i < m; ++i) {
    const AirRun& v = s[i];
    bad = std::max(bad, (v.z < 0 || v.y < 0 || v.x0 < 0) ? 1 : (v.x0 > v.x1 ? 2 : 0));
  }
  if (bad) throw std::invalid_argument(bad == 1 ? "air must be voxel coordinates >= 0" : "air runs need x0 <= x1");
  return s;
}

// Distance of each component to the part surface from already collected air and defect runs: the
// host's chunked search of ComponentLabeller.finish for arrays (the reference the GPU path's
// per-run search is tested and timed against).
py::array_t<double> distance_to_surface(
    RunArray air, RunArray runs,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> comp, int64_t n_comp,
    std::optional<py::array> exposed, std::array<double, 3> voxel_size) {
  check_voxel_size(voxel_size);
  std::vector<AirRun> s = checked_air(air);
  if (runs.ndim() != 2 || runs.shape(1) != 4)
    throw std::invalid_argument("runs must be an (n, 4) array of (z, y, x0, x1)");
  if (comp.ndim() != 1 || comp.shape(0) != runs.shape(0))
    throw std::invalid_argument("comp must give one component per run");
  // Wrong flags give wrong distances, so no silent casts: uint8 bit sets only.
  py::array_t<uint8_t, py::array::c_style> flags;
  if (exposed) {
    if (!py::isinstance<py::array_t<uint8_t>>(*exposed))
      throw std::invalid_argument("exposed must be a uint8 array of kExp bit sets");
    flags = py::array_t<uint8_t, py::array::c_style>::ensure(*exposed);
    if (flags.ndim() != 1 || flags.shape(0) != runs.shape(0))
      throw std::invalid_argument("exposed must give one flag set per run");
  }
  const uint8_t* ex = exposed ? flags.data() : nullptr;
  if (n_comp < 0 || n_comp >= static_cast<int64_t>(kNone))
    throw std::invalid_argument("n_comp out of range");
  // The error kind with the highest number wins.
  static const char* const kBad[] = {"", "comp entries must be in 0..n_comp-1", "runs need x0 <= x1",
                                     "runs must be voxel coordinates >= 0"};
  int bad = 0;
  const int32_t* r = runs.data();
  const int64_t* c = comp.data();
  const int64_t n = runs.shape(0);
  std::vector<DefectRun> q(static_cast<size_t>(n));
#ifdef XCTRT_OPENMP
#pragma omp parallel for reduction(max : bad) if (n > 65536)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const int32_t* ri = r + 4 * i;
    const int e = (c[i] < 0 || c[i] >= n_comp) ? 1 : (ri[2] > ri[3] ? 2 : ((ri[0] < 0 || ri[1] < 0 || ri[2] < 0) ? 3 : 0));
    bad = std::max(bad, e);
    if (!e)
      q[i] = DefectRun{ri[0], ri[1], ri[2], ri[3], static_cast<uint32_t>(c[i]),
                       static_cast<uint8_t>(ex ? ex[i] & kExpAll : kExpAll)};
  }
  if (bad) throw std::invalid_argument(kBad[bad]);
  std::vector<double> d;
  {
    py::gil_scoped_release release;
    d = surface_distance(std::move(s), group_by_component(std::move(q), static_cast<size_t>(n_comp)), voxel_size);
  }
  py::array_t<double> out(static_cast<py::ssize_t>(d.size()));
  std::copy(d.begin(), d.end(), out.mutable_data());
  return out;
}

// The surface-distance tree over the outside air, as the GPU search reads it: (nodes, runs),
// nodes a (k, 40) uint8 array of AirNode records, runs the air runs (m, 4) in the tree's order.
py::tuple air_tree(RunArray air, std::array<double, 3> voxel_size) {
  check_voxel_size(voxel_size);
  std::vector<AirRun> s = checked_air(air);
  std::optional<AirTree> built;
  {
    py::gil_scoped_release release;
    built.emplace(std::move(s), voxel_size);
  }
  const std::vector<AirNode>& nodes = built->nodes();
  const std::vector<AirRun>& runs = built->runs();
  py::array_t<uint8_t> n_out({static_cast<py::ssize_t>(nodes.size()), static_cast<py::ssize_t>(sizeof(AirNode))});
  py::array_t<int32_t> r_out({static_cast<py::ssize_t>(runs.size()), py::ssize_t{4}});
  if (!nodes.empty()) std::memcpy(n_out.mutable_data(), nodes.data(), nodes.size() * sizeof(AirNode));
  if (!runs.empty()) std::memcpy(r_out.mutable_data(), runs.data(), runs.size() * sizeof(AirRun));
  return py::make_tuple(n_out, r_out);
}

// Array types of the GPU kernels' host twins (their int64 data as the kernels' i64).
using I64Vec = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using I32Arr = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using U8Arr = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
static const i64* as_i64(const I64Vec& a) { return reinterpret_cast<const i64*>(a.data()); }

// The GPU kernel's search (air_search.h: search_run, one per defect run) on the host, for
// NumPy arrays: lowers best2 (n_comp,) uint64, the bits of each component's smallest squared
// distance, in place. runs is (6, n) int32 (z, y, x0, x1, -, exposed bits), comp (n,) int32
// (-1: left out); nodes and air as air_tree returns them, or a forest of such trees one after the
// other: tree t is nodes[node_start[t]:node_start[t + 1]] over air[air_start[t]:air_start[t + 1]]
// (node_start, air_start: (T + 1,) int64; None: one tree).
void search_air_runs(py::array_t<uint8_t, py::array::c_style> nodes, RunArray air, RunArray runs,
                     py::array_t<int32_t, py::array::c_style> comp, py::array best2_in,
                     std::array<double, 3> voxel_size, std::optional<I64Vec> node_start_in,
                     std::optional<I64Vec> air_start_in) {
  check_voxel_size(voxel_size);
  // Written in place, so never a converted copy.
  if (!py::isinstance<py::array_t<uint64_t>>(best2_in) || !(best2_in.flags() & py::array::c_style) ||
      !best2_in.writeable())
    throw std::invalid_argument("best2 must be a writeable contiguous uint64 array");
  auto best2 = py::array_t<uint64_t, py::array::c_style>::ensure(best2_in);
  if (runs.ndim() != 2 || runs.shape(0) != 6)
    throw std::invalid_argument("runs must be a (6, n) array of z, y, x0, x1, -, exposed");
  const int64_t n = runs.shape(1), n_comp = best2.size();
  if (comp.ndim() != 1 || comp.shape(0) != n) throw std::invalid_argument("comp must give one component per run");
  if (best2.ndim() != 1) throw std::invalid_argument("best2 must be a 1-D uint64 array, one per component");
  std::vector<AirRun> s = checked_air(air);
  const int64_t m = static_cast<int64_t>(s.size());
  if (nodes.ndim() != 2 || nodes.shape(1) != static_cast<py::ssize_t>(sizeof(AirNode)))
    throw std::invalid_argument("nodes must be a (k, 40) uint8 array of tree nodes (air_tree)");
  const int64_t k = nodes.shape(0);
  if (node_start_in.has_value() != air_start_in.has_value())
    throw std::invalid_argument("a forest needs both node_start and air_start");
  std::vector<i64> ns{0, k}, as{0, m};
  if (node_start_in) {
    const I64Vec &a = *node_start_in, &b = *air_start_in;
    if (a.ndim() != 1 || b.ndim() != 1 || a.shape(0) != b.shape(0) || a.shape(0) < 1)
      throw std::invalid_argument("node_start and air_start must be (T + 1,) int64");
    ns.assign(a.data(), a.data() + a.shape(0)), as.assign(b.data(), b.data() + b.shape(0));
  }
  const int64_t trees = static_cast<int64_t>(ns.size()) - 1;
  if (ns.front() != 0 || as.front() != 0 || ns.back() != k || as.back() != m)
    throw std::invalid_argument("node_start and air_start must run from 0 to the nodes' and runs' counts");
  std::vector<AirNode> tree(static_cast<size_t>(k));
  if (k) std::memcpy(tree.data(), nodes.data(), tree.size() * sizeof(AirNode));
  // Nodes from elsewhere than air_tree must not send the search out of bounds.
  for (int64_t t = 0; t < trees; ++t) {
    const int64_t k0 = ns[t], kt = ns[t + 1] - ns[t], mt = as[t + 1] - as[t];
    if (kt < 0 || mt < 0 || (kt == 0) != (mt == 0))
      throw std::invalid_argument("nodes do not describe a tree over these air runs (air_tree)");
    for (int64_t i = 0; i < kt; ++i) {
      const AirNode& nd = tree[k0 + i];
      const bool leaf = nd.hi - nd.lo <= kAirLeaf;
      if (nd.lo < 0 || nd.lo > nd.hi || nd.hi > mt || (!leaf && 2 * i + 2 >= kt))
        throw std::invalid_argument("nodes do not describe a tree over these air runs (air_tree)");
    }
  }
  const int32_t* r = runs.data();
  const int32_t* c = comp.data();
  int bad = 0;
#ifdef XCTRT_OPENMP
#pragma omp parallel for reduction(max : bad) if (n > 65536)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ci = c[i];
    const bool coords = r[i] >= 0 && r[n + i] >= 0 && r[2 * n + i] >= 0 && r[2 * n + i] <= r[3 * n + i];
    bad = std::max(bad, (ci < -1 || ci >= n_comp) ? 2 : (ci >= 0 && !coords ? 1 : 0));
  }
  if (bad == 2) throw std::invalid_argument("comp entries must be in -1..n_comp-1");
  if (bad == 1) throw std::invalid_argument("runs must be voxel coordinates >= 0 with x0 <= x1");
  if (k == 0 || n == 0) return;
  uint64_t* b = best2.mutable_data();
  {
    py::gil_scoped_release release;
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(dynamic, 256)
#endif
    for (int64_t i = 0; i < n; ++i)
      search_run(i, n, r, c, tree.data(), ns.data(), s.data(), as.data(), static_cast<i32>(trees),
                 voxel_size.data(), reinterpret_cast<u64*>(b));
  }
}


// The GPU labeller's per-voxel kernels (labeller_kernels.h) on the host, for NumPy arrays: what
// xctrt.gpu.post.ComponentLabeller needs of each defect voxel of a slab (see defect_voxel()).
// ext: the previous slab's last plane (goff = plane values, or none: goff = 0) and the slab's
// planes; e: the defect voxels' indices in ext. Returns nbr (k, n) int64, stats (n, 18) float64,
// zyx (n, 3) int32, flags (n,) uint8.
py::tuple defect_voxels_host(U8Arr ext, I64Vec e, int64_t goff,
                        int Y, int X, int Z, int z0, bool last, int connectivity) {
  if (connectivity != 6 && connectivity != 18 && connectivity != 26)
    throw std::invalid_argument("connectivity must be 6, 18 or 26");
  if (Y <= 0 || X <= 0 || Z <= 0 || z0 < 0 || z0 >= Z) throw std::invalid_argument("bad volume shape or slab start");
  const int64_t plane = int64_t{Y} * X;
  if (ext.ndim() != 1 || e.ndim() != 1) throw std::invalid_argument("ext and e must be 1-D");
  const int64_t len = ext.shape(0), n = e.shape(0);
  if ((goff != 0 && goff != plane) || len % plane != 0 || len <= goff ||
      z0 + (len - goff) / plane > Z)
    throw std::invalid_argument("ext must hold whole planes of the volume: the previous one (goff) and the slab's");
  const int64_t* ei = e.data();
  for (int64_t i = 0; i < n; ++i)
    if (ei[i] < goff || ei[i] >= len) throw std::invalid_argument("e must index the slab's voxels in ext");
  const int rank = connectivity == 6 ? 1 : connectivity == 18 ? 2 : 3;
  const int k = rank == 1 ? 3 : rank == 2 ? 9 : 13;
  py::array_t<int64_t> nbr({static_cast<py::ssize_t>(k), static_cast<py::ssize_t>(n)});
  py::array_t<double> stats({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(kStatCols)});
  py::array_t<int32_t> zyx({static_cast<py::ssize_t>(n), py::ssize_t{3}});
  py::array_t<uint8_t> flags(static_cast<py::ssize_t>(n));
  const Slab s{plane, len, goff, Y, X, Z, z0, last ? 1 : 0, rank};
  const uint8_t* lab = ext.data();
  int64_t* nb = nbr.mutable_data();
  double* st = stats.mutable_data();
  int32_t* c = zyx.mutable_data();
  uint8_t* f = flags.mutable_data();
  {
    py::gil_scoped_release release;
#ifdef XCTRT_OPENMP
#pragma omp parallel for if (n > 65536)
#endif
    for (int64_t i = 0; i < n; ++i)
      defect_voxel(i, n, lab, as_i64(e), s, reinterpret_cast<i64*>(nb), st, c, f);
  }
  return py::make_tuple(nbr, stats, zyx, flags);
}

// ... and the deferred crossings of the previous slab's last plane (p_lab, Y x X) once the next
// plane (lab's first) has come, for its defect voxels p_idx: (m, 18) float64 rows.
py::array_t<double> plane_crossings_host(U8Arr p_lab, I64Vec p_idx, U8Arr lab, int Y, int X) {
  if (Y <= 0 || X <= 0) throw std::invalid_argument("bad plane shape");
  const int64_t plane = int64_t{Y} * X;
  if (p_lab.ndim() != 1 || p_lab.shape(0) != plane || lab.ndim() != 1 || lab.shape(0) < plane || p_idx.ndim() != 1)
    throw std::invalid_argument("p_lab must be one plane and lab at least one");
  const int64_t m = p_idx.shape(0);
  const int64_t* pi = p_idx.data();
  for (int64_t j = 0; j < m; ++j)
    if (pi[j] < 0 || pi[j] >= plane) throw std::invalid_argument("p_idx must index the plane");
  py::array_t<double> out({static_cast<py::ssize_t>(m), static_cast<py::ssize_t>(kStatCols)});
  double* o = out.mutable_data();
  const uint8_t *pl = p_lab.data(), *l = lab.data();
  {
    py::gil_scoped_release release;
    for (int64_t j = 0; j < m; ++j) plane_crossings(j, pl, as_i64(p_idx), l, Y, X, o);
  }
  return out;
}

// The labeller's run kernels (labeller_kernels.h) on the host, one call per kernel, checked.

static void check_indices(const I64Vec& a, int64_t n, const char* what) {
  if (a.ndim() != 1) throw std::invalid_argument(std::string(what) + " must be 1-D");
  for (int64_t i = 0; i < a.shape(0); ++i)
    if (a.data()[i] < 0 || a.data()[i] >= n) throw std::invalid_argument(std::string(what) + " out of range");
}

// Defect x-runs from their first voxels s in a slab's defect list: (6, nr) int32.
I32Arr defect_runs_host(I64Vec s, I32Arr zyx, I32Arr pid, U8Arr flags) {
  const int64_t n = flags.ndim() == 1 ? flags.shape(0) : -1;
  if (n < 0 || zyx.ndim() != 2 || zyx.shape(0) != n || zyx.shape(1) != 3 || pid.ndim() != 1 || pid.shape(0) != n)
    throw std::invalid_argument("zyx (n, 3), pid (n,) and flags (n,) must describe the same voxels");
  check_indices(s, n, "s");
  const int64_t nr = s.shape(0);
  // every run must end (a voxel flagged kFlagRunEnd at or after its start) inside the list
  int64_t last_end = -1;
  for (int64_t i = n - 1; i >= 0 && last_end < 0; --i)
    if (flags.data()[i] & kFlagRunEnd) last_end = i;
  for (int64_t r = 0; r < nr; ++r)
    if (s.data()[r] > last_end) throw std::invalid_argument("a run must end inside the defect list");
  I32Arr runs({py::ssize_t{6}, static_cast<py::ssize_t>(nr)});
  for (int64_t r = 0; r < nr; ++r)
    defect_run(r, nr, as_i64(s), zyx.data(), pid.data(), flags.data(), runs.mutable_data());
  return runs;
}

static void check_comp(const I32Arr& comp) {
  if (comp.ndim() != 3 || comp.shape(1) <= 0 || comp.shape(2) <= 0)
    throw std::invalid_argument("comp must be a (z, Y, X) array of air components");
}

U8Arr air_run_starts_host(I32Arr comp) {
  check_comp(comp);
  const int64_t n = comp.size();
  U8Arr out(static_cast<py::ssize_t>(n));
  for (int64_t v = 0; v < n; ++v) out.mutable_data()[v] = air_run_start(v, comp.data(), static_cast<i32>(comp.shape(2)));
  return out;
}

py::tuple air_runs_host(I64Vec s, I32Arr comp, U8Arr edge, int z0, int64_t base) {
  check_comp(comp);
  check_indices(s, comp.size(), "s");
  if (edge.ndim() != 1) throw std::invalid_argument("edge must be 1-D, one flag per air component and 0");
  for (int64_t r = 0; r < s.shape(0); ++r) {
    const int32_t c = comp.data()[s.data()[r]];
    if (c <= 0) throw std::invalid_argument("s must start air runs");
    if (c >= edge.shape(0)) throw std::invalid_argument("edge must flag every air component of comp");
  }
  const int64_t nr = s.shape(0);
  I32Arr runs({static_cast<py::ssize_t>(nr), py::ssize_t{5}});
  I64Vec id(static_cast<py::ssize_t>(nr));
  for (int64_t r = 0; r < nr; ++r)
    air_run(r, as_i64(s), comp.data(), edge.data(), static_cast<i32>(comp.shape(1)), static_cast<i32>(comp.shape(2)),
            z0, base, runs.mutable_data(), reinterpret_cast<i64*>(id.mutable_data()));
  return py::make_tuple(runs, id);
}

U8Arr air_sides_host(I32Arr comp, int64_t n_comp) {
  check_comp(comp);
  for (int64_t v = 0; v < comp.size(); ++v)
    if (comp.data()[v] < 0 || comp.data()[v] > n_comp) throw std::invalid_argument("comp must be in 0..n_comp");
  U8Arr edge(static_cast<py::ssize_t>(n_comp + 1));
  std::fill(edge.mutable_data(), edge.mutable_data() + n_comp + 1, uint8_t{0});
  const i32 Y = static_cast<i32>(comp.shape(1)), X = static_cast<i32>(comp.shape(2));
  const int64_t n_sides = comp.shape(0) * (2 * int64_t{X} + 2 * int64_t{Y});
  for (int64_t j = 0; j < n_sides; ++j) air_side(j, comp.data(), Y, X, edge.mutable_data());
  return edge;
}

I64Vec air_pairs_host(I32Arr last, int64_t last_base, I32Arr first, int64_t first_base) {
  if (last.size() != first.size()) throw std::invalid_argument("last and first must be planes of one size");
  const int64_t plane = last.size();
  I64Vec key(static_cast<py::ssize_t>(plane));
  for (int64_t p = 0; p < plane; ++p)
    key.mutable_data()[p] = air_pair(p, last.data(), last_base, first.data(), first_base);
  return key;
}

// The air labelling kernels (labeller_kernels.h) on the host, one call per kernel: p is the slab's flat
// int32 forest, each value -1 (not air) or an index at or below its own, as the kernels keep it.
static void check_forest(const I32Arr& p) {
  if (p.ndim() != 1) throw std::invalid_argument("p must be a flat int32 array, one value per voxel");
  for (int64_t v = 0; v < p.size(); ++v)
    if (p.data()[v] < -1 || p.data()[v] > v) throw std::invalid_argument("p must hold -1 or an index <= its own");
}

I32Arr air_label_init_host(U8Arr lab) {
  const int64_t n = lab.size();
  if (n > std::numeric_limits<int32_t>::max()) throw std::invalid_argument("a slab must have fewer than 2**31 voxels");
  I32Arr p(static_cast<py::ssize_t>(n));
  for (int64_t v = 0; v < n; ++v) p.mutable_data()[v] = air_label_init(v, lab.data());
  return p;
}

I32Arr air_label_merge_host(I32Arr p, int Y, int X) {
  check_forest(p);
  if (Y <= 0 || X <= 0 || p.size() % (int64_t{Y} * X) != 0) throw std::invalid_argument("p must hold whole planes of Y x X");
  I32Arr out(p.size());
  std::copy(p.data(), p.data() + p.size(), out.mutable_data());
  for (int64_t v = 0; v < p.size(); ++v) air_label_merge(v, out.mutable_data(), Y, X);
  return out;
}

py::tuple air_label_flatten_host(I32Arr p) {
  check_forest(p);
  I32Arr out(p.size()), q(p.size());
  U8Arr root(p.size());
  std::copy(p.data(), p.data() + p.size(), out.mutable_data());
  for (int64_t v = 0; v < p.size(); ++v) q.mutable_data()[v] = air_label_flatten(v, out.mutable_data(), root.mutable_data());
  return py::make_tuple(out, root, q);
}

I32Arr air_label_number_host(I32Arr q, I32Arr rank) {
  check_forest(q);
  if (rank.ndim() != 1 || rank.size() != q.size()) throw std::invalid_argument("rank must have one value per voxel");
  I32Arr comp(q.size());
  for (int64_t v = 0; v < q.size(); ++v) comp.mutable_data()[v] = air_label_number(v, q.data(), rank.data());
  return comp;
}

// The components' statistics kernel (component_stats_add) on the host, voxel by voxel: pid (n,) int32 in
// 0..nloc-1, stats (n, kStatCols) float64, zyx (n, 3) int32, g (n,) float32 or None. Returns (sums (nloc,
// kStatCols) float64, min and max (nloc, 3) int32 (INT32_MAX and -1 where none), gsum (nloc,) float64, gmin and
// gmax (nloc,) float32 (+inf and -inf where none); without g, the last three all zero, +inf and -inf).
py::tuple component_stats_host(I32Arr pid, py::array_t<double, py::array::c_style | py::array::forcecast> stats,
                               I32Arr zyx, std::optional<py::array_t<float, py::array::c_style | py::array::forcecast>> g,
                               int64_t nloc) {
  const int64_t n = pid.size();
  if (pid.ndim() != 1 || nloc < 0) throw std::invalid_argument("pid must be a flat int32 array, nloc >= 0");
  if (stats.ndim() != 2 || stats.shape(0) != n || stats.shape(1) != kStatCols)
    throw std::invalid_argument("stats must be (n, 18) float64, one row per voxel");
  if (zyx.ndim() != 2 || zyx.shape(0) != n || zyx.shape(1) != 3) throw std::invalid_argument("zyx must be (n, 3) int32");
  if (g && (g->ndim() != 1 || g->size() != n)) throw std::invalid_argument("g must hold one value per voxel");
  for (int64_t i = 0; i < n; ++i)
    if (pid.data()[i] < 0 || pid.data()[i] >= nloc) throw std::invalid_argument("a component id out of range");
  py::array_t<double> sums({static_cast<py::ssize_t>(nloc), static_cast<py::ssize_t>(kStatCols)});
  I32Arr mn({static_cast<py::ssize_t>(nloc), py::ssize_t{3}}), mx({static_cast<py::ssize_t>(nloc), py::ssize_t{3}});
  py::array_t<double> gsum(nloc);
  py::array_t<float> gmin(nloc), gmax(nloc);
  std::fill_n(sums.mutable_data(), nloc * kStatCols, 0.0);
  std::fill_n(mn.mutable_data(), nloc * 3, std::numeric_limits<int32_t>::max());
  std::fill_n(mx.mutable_data(), nloc * 3, -1);
  std::fill_n(gsum.mutable_data(), nloc, 0.0);
  std::fill_n(gmin.mutable_data(), nloc, std::numeric_limits<float>::infinity());
  std::fill_n(gmax.mutable_data(), nloc, -std::numeric_limits<float>::infinity());
  const float* gd = g ? g->data() : nullptr;
  for (int64_t i = 0; i < n; ++i)
    component_stats_add(i, pid.data(), stats.data(), zyx.data(), gd, gd != nullptr, sums.mutable_data(),
                        mn.mutable_data(), mx.mutable_data(), gsum.mutable_data(), gmin.mutable_data(),
                        gmax.mutable_data());
  return py::make_tuple(sums, mn, mx, gsum, gmin, gmax);
}

// post._connect's kernels (union_edge, find_root) on the host: p a forest of nodes 0..n-1 (every p[v] in
// 0..v), edges (a[i], b[i]) between nodes. One edge at a time, the roots they give are the kernels'.
static void check_nodes(const I32Arr& p) {
  if (p.ndim() != 1) throw std::invalid_argument("p must be a flat int32 array, one value per node");
  for (int64_t v = 0; v < p.size(); ++v)
    if (p.data()[v] < 0 || p.data()[v] > v) throw std::invalid_argument("p must hold a node at or below each node");
}

I32Arr union_edges_host(I32Arr p, I32Arr a, I32Arr b) {
  check_nodes(p);
  if (a.ndim() != 1 || b.ndim() != 1 || a.size() != b.size()) throw std::invalid_argument("a and b must be edges: two flat arrays of one length");
  for (int64_t i = 0; i < a.size(); ++i)
    if (a.data()[i] < 0 || a.data()[i] >= p.size() || b.data()[i] < 0 || b.data()[i] >= p.size())
      throw std::invalid_argument("an edge joins a node out of range");
  I32Arr out(p.size());
  std::copy(p.data(), p.data() + p.size(), out.mutable_data());
  for (int64_t i = 0; i < a.size(); ++i) union_edge(i, out.mutable_data(), a.data(), b.data());
  return out;
}

I32Arr union_neighbours_host(I32Arr p, I64Vec nbr, int64_t goff, I32Arr local) {
  check_nodes(p);
  const int64_t n = p.size();
  if (nbr.ndim() != 2 || nbr.shape(1) != n) throw std::invalid_argument("nbr must be (k, n) int64, n the nodes in p");
  if (goff < 0 || local.ndim() != 1) throw std::invalid_argument("goff must be >= 0 and local a flat int32 array");
  const i64* nb = as_i64(nbr);
  for (int64_t t = 0; t < nbr.size(); ++t)
    if (nb[t] >= goff && (nb[t] - goff >= local.size() || local.data()[nb[t] - goff] < 0 || local.data()[nb[t] - goff] >= n))
      throw std::invalid_argument("a neighbour outside the slab, or not in the defect list");
  I32Arr out(n);
  std::copy(p.data(), p.data() + n, out.mutable_data());
  for (int64_t t = 0; t < nbr.size(); ++t) union_neighbour(t, n, out.mutable_data(), nb, goff, local.data());
  return out;
}

py::tuple find_roots_host(I32Arr p) {
  check_nodes(p);
  I32Arr out(p.size()), q(p.size());
  std::copy(p.data(), p.data() + p.size(), out.mutable_data());
  for (int64_t v = 0; v < p.size(); ++v) q.mutable_data()[v] = find_root(v, out.mutable_data());
  return py::make_tuple(out, q);
}

// defects.csv (UTF-8): `header`, then one row per component, one column per kind character:
// 'd' int64, 'g' float64 as %.6g, 'f' float64 as %.3f, 'G' %.6g or empty where not finite (no
// surface in view), 's' strings by code: a pair (int64 codes, list of strings), each row the string
// its code picks (class names). The same text as Python's %-format (defects.table_to_csv's
// reference): std::to_chars writes what printf would, correctly rounded as Python's digits are; only
// NaN is spelt here, since it may write "-nan".
class CsvTable {
 public:
  static constexpr py::ssize_t kRows = 2048;   // rows per block: the unit of work of one core

  CsvTable(const py::list& columns, const std::string& kinds) : kinds_(kinds) {
    const size_t k = kinds.size();
    if (columns.size() != k) throw std::invalid_argument("table_csv needs one kind per column");
    ints_.resize(k);
    reals_.resize(k);
    strings_.resize(k);
    for (size_t c = 0; c < k; ++c) {
      py::ssize_t len;
      switch (kinds[c]) {
        case 'd': ints_[c] = Ints::ensure(columns[c]);
                  if (!ints_[c] || ints_[c].ndim() != 1) throw std::invalid_argument("table_csv: 1-D columns only");
                  len = ints_[c].shape(0); break;
        case 'g': case 'f': case 'G':
                  reals_[c] = Reals::ensure(columns[c]);
                  if (!reals_[c] || reals_[c].ndim() != 1) throw std::invalid_argument("table_csv: 1-D columns only");
                  len = reals_[c].shape(0); break;
        case 's': {
          const auto pair = columns[c].cast<py::tuple>();
          if (pair.size() != 2) throw std::invalid_argument("table_csv: a string column is (codes, strings)");
          ints_[c] = Ints::ensure(pair[0]);
          if (!ints_[c] || ints_[c].ndim() != 1) throw std::invalid_argument("table_csv: 1-D columns only");
          strings_[c] = pair[1].cast<std::vector<std::string>>();
          len = ints_[c].shape(0);
          const int64_t* code = ints_[c].data();
          for (py::ssize_t i = 0; i < len; ++i)
            if (code[i] < 0 || code[i] >= static_cast<int64_t>(strings_[c].size()))
              throw std::invalid_argument("table_csv: a string code out of range");
          break;
        }
        default: throw std::invalid_argument(std::string("table_csv: unknown column kind '") + kinds[c] + "'");
      }
      if (rows_ >= 0 && len != rows_) throw std::invalid_argument("table_csv needs columns of one length");
      rows_ = len;
    }
  }

  py::ssize_t blocks() const { return (std::max<py::ssize_t>(rows_, 0) + kRows - 1) / kRows; }

  // Block b's rows into `text` (cleared first). Reads only: any number of threads, without the GIL.
  void format(py::ssize_t b, std::string& text) const {
    const size_t k = kinds_.size();
    text.clear();
    text.reserve(static_cast<size_t>(kRows) * k * 10);
    char buf[512];   // %.3f of the largest double: 309 digits, sign and 4 more
    // std::to_chars with a format and precision writes what printf would, several times faster
    auto real = [&](double v, std::chars_format fmt, int precision) {
      if (std::isnan(v)) { text += "nan"; return; }
      const auto r = std::to_chars(buf, buf + sizeof buf, v, fmt, precision);
      text.append(buf, static_cast<size_t>(r.ptr - buf));
    };
    for (py::ssize_t i = b * kRows; i < std::min(rows_, (b + 1) * kRows); ++i) {
      for (size_t c = 0; c < k; ++c) {
        if (c) text += ',';
        switch (kinds_[c]) {
          case 'd': { const auto r = std::to_chars(buf, buf + sizeof buf, ints_[c].data()[i]);
                      text.append(buf, static_cast<size_t>(r.ptr - buf)); break; }
          case 'g': real(reals_[c].data()[i], std::chars_format::general, 6); break;
          case 'f': real(reals_[c].data()[i], std::chars_format::fixed, 3); break;
          case 'G': if (std::isfinite(reals_[c].data()[i])) real(reals_[c].data()[i], std::chars_format::general, 6); break;
          default: text += strings_[c][static_cast<size_t>(ints_[c].data()[i])];
        }
      }
      text += '\n';
    }
  }

 private:
  using Ints = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  using Reals = py::array_t<double, py::array::c_style | py::array::forcecast>;
  std::string kinds_;
  std::vector<Ints> ints_;
  std::vector<Reals> reals_;
  std::vector<std::vector<std::string>> strings_;
  py::ssize_t rows_ = -1;
};

// defects.csv's bytes. Blocks of rows formatted on all cores, each into its own string, then copied in
// order into the bytes object itself: no joined string, and no text object that a file would encode again.
py::bytes table_csv(const py::list& columns, const std::string& kinds, const std::string& header) {
  const CsvTable table(columns, kinds);
  const py::ssize_t n_blocks = table.blocks();
  std::vector<std::string> blocks(static_cast<size_t>(n_blocks));
  {
    py::gil_scoped_release release;
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (n_blocks > 1)
#endif
    for (py::ssize_t b = 0; b < n_blocks; ++b) table.format(b, blocks[static_cast<size_t>(b)]);
  }
  size_t total = header.size();
  for (const std::string& t : blocks) total += t.size();
  PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<py::ssize_t>(total));
  if (!raw) throw py::error_already_set();
  py::bytes out = py::reinterpret_steal<py::bytes>(raw);
  char* dst = PyBytes_AS_STRING(raw);
  std::memcpy(dst, header.data(), header.size());
  dst += header.size();
  for (const std::string& t : blocks) {
    std::memcpy(dst, t.data(), t.size());
    dst += t.size();
  }
  return out;
}

// All of n bytes to the file descriptor: 0, or the errno of the write that failed (ENOSPC: a full disk).
static int write_all(int fd, const char* p, size_t n) {
  while (n) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return 0;
}

// defects.csv written to an open file descriptor as its blocks are formatted: each core formats a block,
// then writes it in its turn (the blocks in order), so the disk writes overlap the formatting of later
// blocks instead of following all of it, and no block is kept once written. Returns (bytes written, errno
// of the first failed write or 0, seconds inside the writes); after a failed write nothing more is
// written, and the caller must not keep the file.
py::tuple table_csv_write(int fd, const py::list& columns, const std::string& kinds, const std::string& header) {
  const CsvTable table(columns, kinds);
  const py::ssize_t n_blocks = table.blocks();
  int64_t written = 0;
  std::atomic<int> err{0};   // read by the formatting cores, set in a write's turn
  double write_s = 0.0;
  {
    py::gil_scoped_release release;
    auto put = [&](const std::string& text) {   // called in block order, one call at a time
      if (err.load() || text.empty()) return;
      const auto t0 = std::chrono::steady_clock::now();
      const int e = write_all(fd, text.data(), text.size());
      write_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (e) err.store(e);
      else written += static_cast<int64_t>(text.size());
    };
    put(header);
#ifdef XCTRT_OPENMP
#pragma omp parallel for ordered schedule(dynamic, 1) if (n_blocks > 1)
#endif
    for (py::ssize_t b = 0; b < n_blocks; ++b) {
      std::string text;
      if (!err.load()) table.format(b, text);   // after a failed write, the rest are not formatted either
#ifdef XCTRT_OPENMP
#pragma omp ordered
#endif
      put(text);
    }
  }
  return py::make_tuple(written, err.load(), write_s);
}

}  // namespace

void bind_components(py::module_& m) {
  py::class_<PyLabeller>(m, "ComponentLabeller",
                         "Streamed 3D connected components with per-component statistics.\n"
                         "Feed (z, Y, X) slabs in z order with add_slab(labels, image), then\n"
                         "finish(min_voxels) returns a dict of 1-D column arrays.")
      .def(py::init<std::array<int64_t, 3>, std::vector<int64_t>, int, std::array<double, 3>>(),
           py::arg("shape"), py::arg("classes") = std::vector<int64_t>{2, 3},
           py::arg("connectivity") = 26,
           py::arg("voxel_size") = std::array<double, 3>{1.0, 1.0, 1.0})
      .def("add_slab", &PyLabeller::add_slab, py::arg("labels"), py::arg("image"),
           "labels: uint8 (z, Y, X); image: same shape, uint8, uint16 or float32.")
      .def("finish", &PyLabeller::finish, py::arg("min_voxels") = 0, py::arg("surface_distance") = true,
           "Merge and return the table (dict of columns); components with fewer than\n"
           "min_voxels voxels are dropped before ids 1..N are assigned in raster order.\n"
           "surface_distance=False leaves that column NaN, for a search elsewhere\n"
           "(surface_search_inputs).")
      .def("surface_search_inputs", &PyLabeller::surface_search_inputs,
           "After finish(): (air, runs, comp) int32 as search_air_runs takes them: the (m, 4) air\n"
           "runs outside the part, the (6, n) defect runs (z, y, x0, x1, component, exposed sides)\n"
           "and their components (table row, -1 where finish() dropped it).")
      .def_property_readonly("n_provisional", &PyLabeller::n_provisional)
      .def("outside_air_runs", &PyLabeller::outside_air_runs,
           "After finish(): (m, 4) int32 x-runs z, y, x0, x1 (x1 inclusive) of the air outside the part.")
      .def_property_readonly("outside_air_voxels", &PyLabeller::outside_air_voxels,
                             "Voxels of air (label 0) outside the part: connected (6-neighbours) to\n"
                             "the volume's y or x sides. None before finish().")
      .def_property_readonly("slices_received", &PyLabeller::slices_received)
      .def_property_readonly("value_counts", &PyLabeller::value_counts,
                             "(256,) int64: voxels per label value (0..255) in the slabs added so far.")
      .def_property_readonly("shape", &PyLabeller::shape);

  m.def("label_components", &label_components, py::arg("labels"), py::arg("image"),
        py::arg("classes") = std::vector<int64_t>{2, 3}, py::arg("connectivity") = 26,
        py::arg("voxel_size") = std::array<double, 3>{1.0, 1.0, 1.0}, py::arg("min_voxels") = 0,
        py::arg("slab") = 32,
        "Stream an in-memory (Z, Y, X) volume through a ComponentLabeller; returns the table.");
  m.def("label_volume", &label_volume, py::arg("labels"),
        py::arg("classes") = std::vector<int64_t>{2, 3}, py::arg("connectivity") = 26,
        "int32 component ids per voxel (0 = background), numbered like the table's id with\n"
        "min_voxels=0. Holds the whole volume (for tests and comparisons).");
  m.def("air_tree", &air_tree, py::arg("air"), py::arg("voxel_size") = std::array<double, 3>{1.0, 1.0, 1.0},
        "The surface-distance kd-tree over air runs (m, 4) as the GPU search reads it:\n"
        "(nodes (k, 40) uint8 records, air runs (m, 4) int32 in the tree's order).");
  m.def("search_air_runs", &search_air_runs, py::arg("nodes"), py::arg("air"), py::arg("runs"),
        py::arg("comp"), py::arg("best2"), py::arg("voxel_size") = std::array<double, 3>{1.0, 1.0, 1.0},
        py::arg("node_start") = py::none(), py::arg("air_start") = py::none(),
        "The GPU kernel's nearest-air search on the host: lowers best2 (uint64 bits of each\n"
        "component's smallest squared distance) in place for runs (6, n) int32 and comp (n,) int32,\n"
        "over one air_tree, or a forest of them (node_start, air_start: (T + 1,) int64 offsets).");
  m.def("defect_voxels", &defect_voxels_host, py::arg("ext"), py::arg("e"), py::arg("goff"), py::arg("Y"),
        py::arg("X"), py::arg("Z"), py::arg("z0"), py::arg("last"), py::arg("connectivity") = 26,
        "The GPU labeller's per-voxel kernel on the host (labeller_kernels.h): for the defect voxels e of\n"
        "a slab in ext, (nbr (k, n) int64, stats (n, 18) float64, zyx (n, 3) int32, flags (n,) uint8).");
  m.def("plane_crossings", &plane_crossings_host, py::arg("p_lab"), py::arg("p_idx"), py::arg("lab"), py::arg("Y"),
        py::arg("X"),
        "The deferred +z crossings of a slab's last plane's defect voxels, once the next plane came: (m, 18).");
  m.def("defect_runs", &defect_runs_host, py::arg("s"), py::arg("zyx"), py::arg("pid"), py::arg("flags"),
        "The GPU labeller's defect-run kernel on the host: (6, nr) int32 z, y, x0, x1, component, exposed.");
  m.def("air_run_starts", &air_run_starts_host, py::arg("comp"),
        "The GPU labeller's kernel on the host: 1 where an air x-run starts in comp (z, Y, X), flat uint8.");
  m.def("air_runs", &air_runs_host, py::arg("s"), py::arg("comp"), py::arg("edge"), py::arg("z0"), py::arg("base"),
        "The GPU labeller's kernel on the host: air x-runs from their starts s, ((nr, 5) int32 z, y, x0, x1,\n"
        "on the sides (edge[comp]), (nr,) int64 ids).");
  m.def("air_sides", &air_sides_host, py::arg("comp"), py::arg("n_comp"),
        "The GPU labeller's kernel on the host: (n_comp + 1,) uint8, 1 for air components on the y/x sides.");
  m.def("air_pairs", &air_pairs_host, py::arg("last"), py::arg("last_base"), py::arg("first"), py::arg("first_base"),
        "The GPU labeller's kernel on the host: int64 keys a * 2**31 + b of air meeting across a slab boundary (0: none).");
  m.def("air_label_init", &air_label_init_host, py::arg("lab"),
        "The GPU labeller's air labelling kernels on the host (labeller_kernels.h), one call each: the flat int32\n"
        "forest of a slab's labels, each air voxel (label 0) its own root, -1 elsewhere.");
  m.def("air_label_merge", &air_label_merge_host, py::arg("p"), py::arg("Y"), py::arg("X"),
        "... each air voxel joined to its air neighbours at x - 1, y - 1, z - 1 (a new forest).");
  m.def("air_label_flatten", &air_label_flatten_host, py::arg("p"),
        "... each voxel's root found: (forest, uint8 1 at the roots, int32 root per voxel or -1).");
  m.def("air_label_number", &air_label_number_host, py::arg("q"), py::arg("rank"),
        "... the components numbered 1.. from their roots q and the roots' running count rank (int32 per\n"
        "voxel): 0 outside the air.");
  m.def("component_stats", &component_stats_host, py::arg("pid"), py::arg("stats"), py::arg("zyx"), py::arg("g"),
        py::arg("nloc"),
        "The GPU labeller's xctrt_component_stats on the host: per component (pid 0..nloc-1) the sums of its voxels'\n"
        "statistics rows, min/max of their coordinates, and the sum/min/max of their grey values g (NaN left out of\n"
        "min/max; g None: no grey values).");
  m.def("union_edges", &union_edges_host, py::arg("p"), py::arg("a"), py::arg("b"),
        "The GPU union-find's xctrt_union_edges on the host: forest p (int32, p[v] in 0..v) with each edge\n"
        "(a[i], b[i]) joined, the larger root under the smaller.");
  m.def("union_neighbours", &union_neighbours_host, py::arg("p"), py::arg("nbr"), py::arg("goff"), py::arg("local"),
        "... xctrt_union_neighbours: forest p of a slab's n defect voxels with each joined to its earlier neighbours\n"
        "in the slab (nbr (k, n) int64 ext indices as defect_voxels gives them, those >= goff; local: their places).");
  m.def("find_roots", &find_roots_host, py::arg("p"),
        "... then xctrt_find_roots: (p with its paths halved, each node's root: its component's smallest node).");
  m.def("component_table", &component_table, py::arg("voxels"), py::arg("sz"), py::arg("sy"),
        py::arg("sx"), py::arg("crossings"), py::arg("gsum"),
        py::arg("gmin"), py::arg("gmax"), py::arg("z0"), py::arg("y0"), py::arg("x0"),
        py::arg("z1"), py::arg("y1"), py::arg("x1"), py::arg("cls"), py::arg("edge"),
        py::arg("surface_distance"), py::arg("voxel_size") = std::array<double, 3>{1.0, 1.0, 1.0},
        "ComponentLabeller's table from merged per-component sums (voxels, coordinate sums,\n"
        "crossings (n, 13): line crossings per Crofton direction, see crofton_directions;\n"
        "grey sum/min/max, bbox, class, edge flag) and distances to the part surface, one row\n"
        "per id.");
  m.def("table_csv", &table_csv, py::arg("columns"), py::arg("kinds"), py::arg("header") = std::string(),
        "defects.csv's bytes: header, then the rows of the table's columns; kinds: one of d (int64), g (%.6g),\n"
        "f (%.3f), G (%.6g, empty where not finite), s (strings: a pair of int64 codes and the strings they pick) per column.");
  m.def("table_csv_write", &table_csv_write, py::arg("fd"), py::arg("columns"), py::arg("kinds"),
        py::arg("header") = std::string(),
        "table_csv's text written to the open file descriptor fd as its blocks are formatted (in order, on all\n"
        "cores): (bytes written, errno of the first failed write or 0, seconds inside the writes).");
  m.def("crofton_directions", [] {
        py::array_t<int32_t> d({kDirs, 3});
        for (int k = 0; k < kDirs; ++k)
          for (int a = 0; a < 3; ++a) d.mutable_at(k, a) = kCroftonDirs[k][a];
        return d;
      },
      "The 13 lattice directions (dz, dy, dx) the surface area counts line crossings along.");
  m.def("check_voxel_size", [](std::array<double, 3> voxel_size) { check_voxel_size(voxel_size); },
        py::arg("voxel_size"),
        "Raise ValueError unless the voxel size (dz, dy, dx) is one the table supports: positive,\n"
        "finite, sides within a factor 1000 of each other.");
  m.def("crofton_factors", [](std::array<double, 3> voxel_size) {
        const auto f = crofton_factors(voxel_size);
        py::array_t<double> out(kDirs);
        std::copy(f.begin(), f.end(), out.mutable_data());
        return out;
      },
      py::arg("voxel_size"),
      "Surface area per line crossing along each Crofton direction for this voxel size:\n"
      "2 w V / |v| (w: the direction's share of the sphere, its spherical Voronoi cells).");
  m.def("distance_to_surface", &distance_to_surface, py::arg("air"), py::arg("runs"),
        py::arg("comp"), py::arg("n_comp"), py::kw_only(), py::arg("exposed") = py::none(),
        py::arg("voxel_size") = std::array<double, 3>{1.0, 1.0, 1.0},
        "Per component (0..n_comp-1): the smallest centre-to-centre distance between one of its\n"
        "runs' voxels (runs: (n, 4) int32 z, y, x0, x1; comp: (n,) component) and a voxel of the\n"
        "air runs ((m, 4) int32 z, y, x0, x1: the air outside the part); NaN\n"
        "without air or runs. Exact (kd-tree).\n"
        "exposed (keyword, optional, (n,) uint8): bits 1 -z, 2 +z, 4 -y, 8 +y, set at least\n"
        "where the run has a voxel whose neighbour on that side is not in the defect; unset\n"
        "bits let the search skip air on that side (a bit unset on a truly exposed side\n"
        "gives wrong distances, inf where nothing is left); none given = all set.");
}

}  // namespace xctrt
