// The exact nearest-air search of one defect run, written once for the host and the GPU.
//
// cpp/surface_distance.hpp builds a kd-tree over the x-runs of the air outside the part and searches
// it on the host. xctrt.gpu.post compiles this same file with NVRTC and runs search_run() on the
// device, one thread per defect run, over the tree that _core.air_tree() built on the host. So
// it is C++ that both compilers take: no standard library (NVRTC has none), no recursion (a
// fixed stack: the tree has at most 32 levels, 2**31 runs take 28), no infinity literal.
//
// Arithmetic: per-axis integer gaps, each times its voxel size in double, squares summed
// z + y + x. The host is built with -ffp-contract=off and the GPU module with --fmad=false, so
// both round every step alike and a search gives the same bits on either. The search is exact:
// visiting order and pruning only change which nodes are read, never the minimum.
// See surface_distance.hpp for the tree and for why the exposure flags are allowed to prune.
#pragma once

namespace xctrt {

using i32 = int;
using u32 = unsigned int;
using i64 = long long;
using u64 = unsigned long long;
using u8 = unsigned char;

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define XCTRT_HD __host__ __device__
#else
#define XCTRT_HD
#endif

enum : u8 { kExpMz = 1, kExpPz = 2, kExpMy = 4, kExpPy = 8, kExpAll = 15 };

struct AirRun {
  i32 z, y, x0, x1;  // x0..x1 inclusive
};

struct DefectRun {
  i32 z, y, x0, x1;  // x0..x1 inclusive
  u32 comp;          // 0-based component (table row)
  u8 exposed;        // kExp* bits: sides with a voxel whose neighbour is not in the defect
};

// Node i of the tree has children 2i+1 and 2i+2; a node of at most kAirLeaf runs is a leaf.
struct AirNode {
  i64 lo, hi;        // air runs [lo, hi)
  i32 mn[3], mx[3];  // bounding box (z, y, x)
};
constexpr i64 kAirLeaf = 16;
constexpr int kAirMaxDepth = 32;  // levels at most: 2**31 runs in leaves of 16 need 28

XCTRT_HD inline i32 run_gap(i32 a0, i32 a1, i32 b0, i32 b1) {
  // Integer gap between the intervals [a0, a1] and [b0, b1] (0 if they overlap).
  return a1 < b0 ? b0 - a1 : (b1 < a0 ? a0 - b1 : 0);
}

XCTRT_HD inline double gap_dist2(i32 gz, i32 gy, i32 gx, const double* w) {
  const double z = gz * w[0], y = gy * w[1], x = gx * w[2];
  return z * z + y * y + x * x;
}

// Can air with z in [z0, z1] and y in [y0, y1] pair with run r (see surface_distance.hpp)?
XCTRT_HD inline bool air_faces(i32 z0, i32 z1, i32 y0, i32 y1, const DefectRun& r) {
  return !((z0 > r.z && !(r.exposed & kExpPz)) || (z1 < r.z && !(r.exposed & kExpMz)) ||
           (y0 > r.y && !(r.exposed & kExpPy)) || (y1 < r.y && !(r.exposed & kExpMy)));
}

// Squared distance bound of node n for run r; `none` where no air in it can pair with r.
XCTRT_HD inline double node_bound2(const AirNode& n, const DefectRun& r, const double* w, double none) {
  if (!air_faces(n.mn[0], n.mx[0], n.mn[1], n.mx[1], r)) return none;
  return gap_dist2(run_gap(n.mn[0], n.mx[0], r.z, r.z), run_gap(n.mn[1], n.mx[1], r.y, r.y),
                   run_gap(n.mn[2], n.mx[2], r.x0, r.x1), w);
}

XCTRT_HD inline u64 double_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<u64>(__double_as_longlong(d));
#else
  u64 b;
  __builtin_memcpy(&b, &d, sizeof b);
  return b;
#endif
}

XCTRT_HD inline double bits_double(u64 b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double d;
  __builtin_memcpy(&d, &b, sizeof d);
  return d;
#endif
}

// The component's shared best (bits of a non-negative double; they order as the doubles do).
XCTRT_HD inline double load_best(const u64* slot) {
#if defined(__CUDA_ARCH__)
  return bits_double(*reinterpret_cast<const volatile u64*>(slot));
#else
  return bits_double(__atomic_load_n(slot, __ATOMIC_RELAXED));
#endif
}

XCTRT_HD inline void lower_best(u64* slot, double d) {
  const u64 v = double_bits(d);
#if defined(__CUDA_ARCH__)
  atomicMin(slot, v);
#else
  u64 cur = __atomic_load_n(slot, __ATOMIC_RELAXED);
  while (v < cur && !__atomic_compare_exchange_n(slot, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
#endif
}

// Squared distance from run r to its nearest air voxel, if below `best` (else `best`). Nearer
// child first; a deferred child is dropped when its bound is no longer below the best.
// With `shared`, the best is its component's, shared with the searches of the component's other runs
// running beside this one (GPU threads, host threads): every better distance found is published to it
// at once, and it is read again before each deferred child, so each search prunes with what all have
// found. Exact all the same: a node is dropped only when no air in it can beat a distance of the
// component, which is what the component's minimum needs.
XCTRT_HD inline double nearest_air2(const AirNode* nodes, const AirRun* air, const double* w,
                                    const DefectRun& r, double best, u64* shared = nullptr) {
  i32 stack_id[kAirMaxDepth];
  double stack_bound[kAirMaxDepth];
  int top = 0;
  i32 id = 0;
  for (;;) {
    const AirNode& n = nodes[id];
    bool descend = false;
    if (n.hi - n.lo <= kAirLeaf) {
      for (i64 i = n.lo; i < n.hi; ++i) {
        const AirRun& s = air[i];
        if (!air_faces(s.z, s.z, s.y, s.y, r)) continue;
        const double d = gap_dist2(s.z > r.z ? s.z - r.z : r.z - s.z, s.y > r.y ? s.y - r.y : r.y - s.y,
                                   run_gap(s.x0, s.x1, r.x0, r.x1), w);
        if (d < best) {
          best = d;
          if (shared) lower_best(shared, d);
        }
      }
    } else {
      // A child that cannot pair gets the bound `best`: never below the best, now or later.
      const i32 left = 2 * id + 1, right = left + 1;
      const double bl = node_bound2(nodes[left], r, w, best), br = node_bound2(nodes[right], r, w, best);
      const bool left_first = bl <= br;
      const double b1 = left_first ? bl : br, b2 = left_first ? br : bl;
      if (b2 < best) stack_id[top] = left_first ? right : left, stack_bound[top++] = b2;
      if (b1 < best) id = left_first ? left : right, descend = true;
    }
    if (descend) continue;
    if (shared) {
      const double now = load_best(shared);
      if (now < best) best = now;
    }
    while (top > 0 && !(stack_bound[top - 1] < best)) --top;
    if (top == 0) return best;
    id = stack_id[--top];
  }
}

// Defect run i of n: runs is a (6, n) int32 array (z, y, x0, x1, -, exposed bits) and comp[i]
// its component (-1: left out). best2 holds each component's smallest squared distance so far,
// as the bits of a non-negative double, +inf at the start; the search starts from it, lowers it
// atomically and prunes with what the component's other runs have found (nearest_air2's `shared`).
// The air may be a forest: tree t is nodes[node_start[t] .. node_start[t + 1]) over the runs
// air[air_start[t] .. air_start[t + 1]) (each as air_tree builds it; an empty tree has no nodes),
// the GPU labeller's trees of the air it knew to be outside slab by slab, and of the rest at the end.
// The tree whose root box is nearest is searched first, then each other whose box could still beat
// the best: the minimum over the same air, so the same bits as one tree over all of it.
// The GPU kernel calls this per thread, _core.search_air_runs per run on the host.
XCTRT_HD inline void search_run(i64 i, i64 n, const i32* runs, const i32* comp, const AirNode* nodes,
                                const i64* node_start, const AirRun* air, const i64* air_start, i32 trees,
                                const double* w, u64* best2) {
  const i32 c = comp[i];
  if (c < 0) return;
  const DefectRun r{runs[i], runs[n + i], runs[2 * n + i], runs[3 * n + i], static_cast<u32>(c),
                    static_cast<u8>(runs[5 * n + i] & kExpAll)};
  u64* slot = best2 + c;
  const double inf = bits_double(0x7ff0000000000000ULL);
  i32 first = -1;
  double first_bound = inf;
  for (i32 t = 0; t < trees; ++t) {
    if (node_start[t + 1] == node_start[t]) continue;
    const double b = node_bound2(nodes[node_start[t]], r, w, inf);
    if (b < first_bound) first_bound = b, first = t;
  }
  if (first < 0) return;   // no air this run could pair with
  double best = load_best(slot);
  if (first_bound < best)
    best = nearest_air2(nodes + node_start[first], air + air_start[first], w, r, best, slot);
  for (i32 t = 0; t < trees; ++t) {
    if (t == first || node_start[t + 1] == node_start[t]) continue;
    const double now = load_best(slot);
    if (now < best) best = now;
    if (node_bound2(nodes[node_start[t]], r, w, best) < best)
      best = nearest_air2(nodes + node_start[t], air + air_start[t], w, r, best, slot);
  }
}

}  // namespace xctrt

#ifdef XCTRT_AIR_SEARCH_KERNEL
// The GPU kernel (xctrt.gpu.post.search_air_runs): one thread per defect run.
extern "C" __global__ void xctrt_search_air_runs(const int* runs, long long n, const int* comp,
                                                 const xctrt::AirNode* nodes, const long long* node_start,
                                                 const xctrt::AirRun* air, const long long* air_start, int trees,
                                                 double wz, double wy, double wx, unsigned long long* best2) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const double w[3] = {wz, wy, wx};
  xctrt::search_run(i, n, runs, comp, nodes, node_start, air, air_start, trees, w, best2);
}
#endif
