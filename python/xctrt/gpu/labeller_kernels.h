// The GPU slab labeller's kernels, written once for the host and the GPU.
//
// xctrt.gpu.post.ComponentLabeller labels a slab from the compact list of its defect voxels. Per
// voxel it needs: which earlier neighbours (in raster order) have the same label value (the edges
// of the union-find), the line crossings along the 13 Crofton directions (the surface area, see
// cpp/crofton.hpp), the exposed sides (the surface-distance search, air_search.h), whether its
// x-run starts or ends there, and whether it lies on the volume's edge; then the defect x-runs, and
// for the part's outside the air's x-runs, its components on the volume's sides and those meeting
// across slab boundaries. Written as array operations that was some 700 small kernels per slab;
// on the GPU, beside the encoder's long GEMM kernels, each of them waits for SMs to free, so the
// labeller's time there grows with its kernel count, not its bytes. Here each is one thread per
// voxel, run or plane position. _core runs the same functions on the host (defect_voxels,
// plane_crossings, defect_runs, air_*: the NumPy path, the tests) and NVRTC compiles this file for
// the GPU; integers, and float64 sums of integers (exact in any order), so both give the same values.
#pragma once

namespace xctrt {

using i32 = int;
using i64 = long long;
using u8 = unsigned char;

#ifndef XCTRT_HD
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define XCTRT_HD __host__ __device__
#else
#define XCTRT_HD
#endif
#endif

// A voxel's statistics row, summed per component: 1, z, y, x, the 13 directions' crossings, edge.
constexpr int kStatCols = 18;
constexpr int kStatCross = 4;   // the first crossing column
constexpr int kStatEdge = 17;
// flags: the exposed sides (air_search.h's kExp* bits: -z, +z, -y, +y), then the x-run's ends
enum : u8 { kFlagRunStart = 16, kFlagRunEnd = 32 };

// Crofton direction k (0..12) as crofton.hpp orders them: in-plane (0,0,1) (0,1,-1) (0,1,0)
// (0,1,1), then (1, dy, dx) at 4 + 3 (dy + 1) + (dx + 1).
XCTRT_HD inline void crofton_dir(int k, int& dz, int& dy, int& dx) {
  if (k < 4) {
    dz = 0, dy = k == 0 ? 0 : 1, dx = k == 0 ? 1 : k - 2;
  } else {
    dz = 1, dy = (k - 4) / 3 - 1, dx = (k - 4) % 3 - 1;
  }
}

// The slab as the labeller holds it: ext is the previous slab's last plane (when there is one,
// goff = plane values) followed by the slab's planes, ext_len values in all; the slab's first
// plane is plane z0 of a volume of Z planes of Y x X; last: the slab ends the volume. rank: 1, 2
// or 3 for 6-, 18- or 26-connectivity.
struct Slab {
  i64 plane, ext_len, goff;
  i32 Y, X, Z, z0, last, rank;
};

// Does the line from the voxel at ext index e (label L, plane coordinates y, x) cross the
// defect's surface one step along (dz, dy, dx)? Outside the volume counts as crossing. +z from the
// slab's last plane is not known yet: counted when the next slab comes (plane_crossings), or here
// at the volume's end.
XCTRT_HD inline bool crosses(const u8* ext, i64 e, u8 L, i32 y, i32 x, int dz, int dy, int dx, const Slab& s) {
  if (dz > 0 && e + s.plane >= s.ext_len) return s.last != 0;
  const i32 yy = y + dy, xx = x + dx;
  if (yy < 0 || yy >= s.Y || xx < 0 || xx >= s.X || (dz < 0 && e < s.plane)) return true;
  return ext[e + dz * s.plane + static_cast<i64>(dy) * s.X + dx] != L;
}

// Defect voxel i of n, at ext index e[i]. Writes:
//   nbr[k * n + i]  the ext index of its k-th earlier neighbour if that has the same label value, else
//                   -1: the neighbours (dz, dy, dx) before (0, 0, 0) in raster order, at most `rank`
//                   steps non-zero, in the loops' order below (k < 3, 9 or 13)
//   stats[i * kStatCols + c]  its statistics row (kStatCols)
//   zyx[3 i ..]     its volume coordinates z, y, x
//   flags[i]        exposed sides (the slab's last plane: +z set, always allowed) and run ends
XCTRT_HD inline void defect_voxel(i64 i, i64 n, const u8* ext, const i64* e_of, const Slab& s, i64* nbr,
                                  double* stats, i32* zyx, u8* flags) {
  const i64 e = e_of[i];
  const u8 L = ext[e];
  const i64 g = e - s.goff;
  const i64 zl = g / s.plane, r = g - zl * s.plane;
  const i32 z = static_cast<i32>(zl) + s.z0, y = static_cast<i32>(r / s.X), x = static_cast<i32>(r % s.X);
  int k = 0;
  for (int dz = -1; dz <= 1; ++dz)
    for (int dy = -1; dy <= 1; ++dy)
      for (int dx = -1; dx <= 1; ++dx) {
        const bool earlier = dz < 0 || (dz == 0 && (dy < 0 || (dy == 0 && dx < 0)));
        const int steps = (dz != 0) + (dy != 0) + (dx != 0);
        if (!earlier || steps > s.rank) continue;
        const i32 yy = y + dy, xx = x + dx;
        const i64 nb = e + dz * s.plane + static_cast<i64>(dy) * s.X + dx;
        const bool ok = yy >= 0 && yy < s.Y && xx >= 0 && xx < s.X && (dz == 0 || e >= s.plane);
        nbr[k * n + i] = ok && ext[nb] == L ? nb : -1;
        ++k;
      }
  double* row = stats + i * kStatCols;
  row[0] = 1, row[1] = z, row[2] = y, row[3] = x;
  for (int d = 0; d < 13; ++d) {
    int dz, dy, dx;
    crofton_dir(d, dz, dy, dx);
    row[kStatCross + d] = static_cast<int>(crosses(ext, e, L, y, x, dz, dy, dx, s)) +
                          static_cast<int>(crosses(ext, e, L, y, x, -dz, -dy, -dx, s));
  }
  row[kStatEdge] = z == 0 || z == s.Z - 1 || y == 0 || y == s.Y - 1 || x == 0 || x == s.X - 1;
  zyx[3 * i] = z, zyx[3 * i + 1] = y, zyx[3 * i + 2] = x;
  const bool up = e + s.plane < s.ext_len;
  u8 f = static_cast<u8>(crosses(ext, e, L, y, x, -1, 0, 0, s)) |
         static_cast<u8>((up ? crosses(ext, e, L, y, x, 1, 0, 0, s) : true) << 1) |
         static_cast<u8>(crosses(ext, e, L, y, x, 0, -1, 0, s) << 2) |
         static_cast<u8>(crosses(ext, e, L, y, x, 0, 1, 0, s) << 3);
  if (x == 0 || ext[e - 1] != L) f |= kFlagRunStart;
  if (x == s.X - 1 || ext[e + 1] != L) f |= kFlagRunEnd;
  flags[i] = f;
}

// Voxel j of the previous slab's last plane (p_lab its labels, p_idx[j] the voxel's index in it):
// its crossings along the directions with dz = 1, now that the next plane (lab, this slab's
// first) has come. Row j of out (kStatCols) gets them in the crossing columns, zeros elsewhere.
XCTRT_HD inline void plane_crossings(i64 j, const u8* p_lab, const i64* p_idx, const u8* lab, i32 Y, i32 X,
                                     double* out) {
  const i64 p = p_idx[j];
  const u8 L = p_lab[p];
  const i32 y = static_cast<i32>(p / X), x = static_cast<i32>(p % X);
  double* row = out + j * kStatCols;
  for (int c = 0; c < kStatCols; ++c) row[c] = 0;
  for (int d = 0; d < 13; ++d) {
    int dz, dy, dx;
    crofton_dir(d, dz, dy, dx);
    if (!dz) continue;
    const i32 yy = y + dy, xx = x + dx;
    row[kStatCross + d] = yy < 0 || yy >= Y || xx < 0 || xx >= X || lab[p + static_cast<i64>(dy) * X + dx] != L;
  }
}

// Defect x-run r of nr, from its first voxel s[r] in the slab's defect list to the next voxel
// flagged kFlagRunEnd: the labeller's run record (6, nr) int32 z, y, x0, x1, provisional component,
// exposed sides (any of its voxels').
XCTRT_HD inline void defect_run(i64 r, i64 nr, const i64* s, const i32* zyx, const i32* pid, const u8* flags,
                                i32* runs) {
  const i64 a = s[r];
  i64 b = a;
  i32 exposed = flags[a] & 15;
  while (!(flags[b] & kFlagRunEnd)) exposed |= flags[++b] & 15;
  runs[r] = zyx[3 * a], runs[nr + r] = zyx[3 * a + 1], runs[2 * nr + r] = zyx[3 * a + 2];
  runs[3 * nr + r] = zyx[3 * b + 2], runs[4 * nr + r] = pid[a], runs[5 * nr + r] = exposed;
}

// Air: comp holds a slab's 6-connected air components (1.., 0 elsewhere), nz planes of Y x X.
// Voxel v starts an air x-run?
XCTRT_HD inline u8 air_run_start(i64 v, const i32* comp, i32 X) {
  return comp[v] > 0 && (v % X == 0 || comp[v - 1] == 0);
}

// Air x-run r starting at voxel s[r]: its row of runs (nr, 5) int32 z (+ z0), y, x0, x1 (the
// layout the kd-tree over the outside air takes), and 1 if its component is on the volume's sides
// (edge, as air_side marks them: outside air for good), else 0; and its air component's id (comp +
// base: numbered across the volume).
XCTRT_HD inline void air_run(i64 r, const i64* s, const i32* comp, const u8* edge, i32 Y, i32 X, i32 z0, i64 base,
                             i32* runs, i64* id) {
  const i64 v = s[r], row = v / X;
  const i32 x0 = static_cast<i32>(v - row * X);
  i32 x1 = x0;
  while (x1 + 1 < X && comp[v + (x1 - x0) + 1] > 0) ++x1;
  i32* out = runs + 5 * r;
  out[0] = static_cast<i32>(row / Y) + z0, out[1] = static_cast<i32>(row % Y), out[2] = x0, out[3] = x1;
  out[4] = edge[comp[v]] != 0;
  id[r] = comp[v] + base;
}

// Side position j of the slab's planes (per plane: rows y = 0 and Y - 1, columns x = 0 and X - 1,
// 2 X + 2 Y positions): marks its air component, if any, as on the volume's y/x sides (edge[c] = 1).
XCTRT_HD inline void air_side(i64 j, const i32* comp, i32 Y, i32 X, u8* edge) {
  const i64 per = 2 * static_cast<i64>(X) + 2 * static_cast<i64>(Y);
  const i64 z = j / per;
  i64 k = j - z * per, y, x;
  if (k < X) y = 0, x = k;
  else if ((k -= X) < X) y = Y - 1, x = k;
  else if ((k -= X) < Y) y = k, x = 0;
  else y = k - Y, x = X - 1;
  const i32 c = comp[(z * Y + y) * X + x];
  if (c > 0) edge[c] = 1;
}

// Plane position p: the pair of air components meeting across a slab boundary, as one key
// a * 2**31 + b (a: the previous slab's last plane, b: this slab's first, both numbered across the
// volume), or 0 where either is not air (0 is no component: the pair (0, 0) joins nothing).
XCTRT_HD inline i64 air_pair(i64 p, const i32* last, i64 last_base, const i32* first, i64 first_base) {
  const i32 a = last[p], b = first[p];
  return a > 0 && b > 0 ? (a + last_base) * 2147483648LL + (b + first_base) : 0;
}

// The air's 6-connected components in a slab (z, Y, X) of n voxels, on one int32 per voxel p: air_label_init
// makes each air voxel its own root (-1 elsewhere); air_label_merge joins each air voxel to its air
// neighbours at x - 1, y - 1 and z - 1 (union-find); air_label_flatten finds each one's root (into an
// array of its own: other threads' path halving may still rewrite p[v] with an ancestor meanwhile) and
// marks the roots; air_label_number numbers the components 1.. in the raster order of their roots from the
// roots' running count. A union hooks the larger root under the smaller, so every p[v] <= v and a root is
// its component's smallest voxel index, whatever order the threads ran in: the numbers are those of
// scipy.ndimage.label. (CuPy's own label walks every voxel to its root without shortening the path.)

XCTRT_HD inline i32 atomic_min_i32(volatile i32* a, i32 v) {
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
  return atomicMin(const_cast<i32*>(a), v);
#else
  const i32 old = *a;   // the host twins run one voxel at a time
  if (v < old) *a = v;
  return old;
#endif
}

// The union-find of the air labelling below and of post._connect: a forest p with every p[v] <= v.
// v's root, halving the path on the way: each step points v at its grandparent, an ancestor (any thread
// may write that), so the trees stay shallow.
XCTRT_HD inline i32 forest_find(volatile i32* p, i32 v) {
  for (i32 u = p[v]; u != v; u = p[v]) {
    const i32 w = p[u];
    p[v] = w;
    v = w;
  }
  return v;
}

// Joins a's and b's trees: the larger root under the smaller (atomicMin), retried where a's root was hooked
// elsewhere meanwhile. Whatever order the threads run in, each root stays its tree's smallest index.
XCTRT_HD inline void forest_union(volatile i32* p, i32 a, i32 b) {
  while (true) {
    a = forest_find(p, a), b = forest_find(p, b);
    if (a == b) return;
    if (a < b) {
      const i32 t = a;
      a = b, b = t;
    }
    const i32 old = atomic_min_i32(p + a, b);
    if (old == a) return;
    a = old;   // a was no longer a root, and may have left its parent old: join old and b instead
  }
}

XCTRT_HD inline i32 air_label_init(i64 v, const u8* lab) { return lab[v] == 0 ? static_cast<i32>(v) : -1; }

// A join to y - 1 (z - 1) is left out where the voxels at x - 1 of both are air too: the row's join
// further left already connects them (by induction along the row; at x = 0 it is always made). In
// open air that leaves about one join per run and row instead of one per voxel.
XCTRT_HD inline void air_label_merge(i64 v, volatile i32* p, i32 Y, i32 X) {
  if (p[v] < 0) return;
  const i64 plane = static_cast<i64>(Y) * X;
  const i32 me = static_cast<i32>(v);
  const bool left = v % X > 0 && p[v - 1] >= 0;
  if (left) forest_union(p, me, me - 1);
  if ((v / X) % Y > 0 && p[v - X] >= 0 && !(left && p[v - X - 1] >= 0)) forest_union(p, me, static_cast<i32>(v - X));
  if (v >= plane && p[v - plane] >= 0 && !(left && p[v - plane - 1] >= 0))
    forest_union(p, me, static_cast<i32>(v - plane));
}

XCTRT_HD inline i32 air_label_flatten(i64 v, volatile i32* p, u8* root) {
  if (p[v] < 0) {
    root[v] = 0;
    return -1;
  }
  const i32 r = forest_find(p, static_cast<i32>(v));
  root[v] = r == v;
  return r;
}

// q: each voxel's root (air_label_flatten), -1 outside the air; the kernel may write its number over it.
XCTRT_HD inline i32 air_label_number(i64 v, const i32* q, const i32* rank) { return q[v] < 0 ? 0 : rank[q[v]]; }

// A slab's components' statistics (post.component_stats), from its n defect voxels: voxel i of component
// pid[i] adds its statistics row stats[i] to sums[pid] (kStatCols float64, exact: integers), its coordinates
// zyx[i] to the int32 minimum mn and maximum mx of pid's (3 each), and, with grey values g (has_g), g[i] to
// gsum (float64), gmin and gmax (float32; NaN left out of both, as the C++ labeller's comparisons leave it).
// The host twin adds voxel by voxel; the kernel first adds up runs of one component within a warp, so a
// component of millions of voxels takes ~32x fewer atomics on its few addresses (they serialise there).
XCTRT_HD inline void component_stats_add(i64 i, const i32* pid, const double* stats, const i32* zyx, const float* g,
                                         int has_g, double* sums, i32* mn, i32* mx, double* gsum, float* gmin,
                                         float* gmax) {
  const i64 c = pid[i];
  for (int k = 0; k < kStatCols; ++k) sums[c * kStatCols + k] += stats[i * kStatCols + k];
  for (int a = 0; a < 3; ++a) {
    const i32 v = zyx[3 * i + a];
    if (v < mn[3 * c + a]) mn[3 * c + a] = v;
    if (v > mx[3 * c + a]) mx[3 * c + a] = v;
  }
  if (!has_g) return;
  const float v = g[i];
  gsum[c] += static_cast<double>(v);
  if (v < gmin[c]) gmin[c] = v;
  if (v > gmax[c]) gmax[c] = v;
}

// post._connect: nodes 0..n-1 joined by edges (a[i], b[i]), p starting as 0..n-1. union_edge joins edge i's
// ends; find_root then gives node v its root (into an array of its own, as air_label_flatten does), its
// component's smallest node, in one pass each instead of rounds of pointer jumping that each end in a host sync.
XCTRT_HD inline void union_edge(i64 i, volatile i32* p, const i32* a, const i32* b) { forest_union(p, a[i], b[i]); }
XCTRT_HD inline i32 find_root(i64 v, volatile i32* p) { return forest_find(p, static_cast<i32>(v)); }

// A slab's defect voxels joined to their earlier neighbours of the same label: entry t of nbr (k, n), as
// defect_voxel writes it, is voxel t % n's neighbour's ext index, or -1; one in the slab (index >= goff; those
// in the previous slab's last plane join across slabs instead) is joined to it through local, the slab's
// voxel indices' places in the defect list. The edges straight from nbr: no list of them made first.
XCTRT_HD inline void union_neighbour(i64 t, i64 n, volatile i32* p, const i64* nbr, i64 goff, const i32* local) {
  const i64 nb = nbr[t];
  if (nb >= goff) forest_union(p, static_cast<i32>(t % n), local[nb - goff]);
}

}  // namespace xctrt

#ifdef XCTRT_LABELLER_KERNELS
// The GPU kernels (xctrt.gpu.post.defect_voxels, plane_crossings, defect_runs, air_*): one thread per item.
extern "C" __global__ void xctrt_defect_voxels(const unsigned char* ext, const long long* e, long long n,
                                               long long plane, long long ext_len, long long goff, int Y, int X,
                                               int Z, int z0, int last, int rank, long long* nbr, double* stats,
                                               int* zyx, unsigned char* flags) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const xctrt::Slab s{plane, ext_len, goff, Y, X, Z, z0, last, rank};
  xctrt::defect_voxel(i, n, ext, e, s, nbr, stats, zyx, flags);
}

extern "C" __global__ void xctrt_plane_crossings(const unsigned char* p_lab, const long long* p_idx, long long m,
                                                 const unsigned char* lab, int Y, int X, double* out) {
  const long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= m) return;
  xctrt::plane_crossings(j, p_lab, p_idx, lab, Y, X, out);
}

extern "C" __global__ void xctrt_defect_runs(const long long* s, long long nr, const int* zyx, const int* pid,
                                             const unsigned char* flags, int* runs) {
  const long long r = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < nr) xctrt::defect_run(r, nr, s, zyx, pid, flags, runs);
}

extern "C" __global__ void xctrt_air_run_starts(const int* comp, long long n, int X, unsigned char* start) {
  const long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v < n) start[v] = xctrt::air_run_start(v, comp, X);
}

extern "C" __global__ void xctrt_air_runs(const long long* s, long long nr, const int* comp,
                                          const unsigned char* edge, int Y, int X, int z0, long long base, int* runs,
                                          long long* id) {
  const long long r = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < nr) xctrt::air_run(r, s, comp, edge, Y, X, z0, base, runs, id);
}

extern "C" __global__ void xctrt_air_sides(const int* comp, long long n_sides, int Y, int X, unsigned char* edge) {
  const long long j = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < n_sides) xctrt::air_side(j, comp, Y, X, edge);
}

extern "C" __global__ void xctrt_air_pairs(const int* last, long long last_base, const int* first,
                                           long long first_base, long long plane, long long* key) {
  const long long p = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p < plane) key[p] = xctrt::air_pair(p, last, last_base, first, first_base);
}

extern "C" __global__ void xctrt_air_label_init(const unsigned char* lab, long long n, int* p) {
  const long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v < n) p[v] = xctrt::air_label_init(v, lab);
}

extern "C" __global__ void xctrt_air_label_merge(int* p, long long n, int Y, int X) {
  const long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v < n) xctrt::air_label_merge(v, p, Y, X);
}

extern "C" __global__ void xctrt_air_label_flatten(int* p, long long n, unsigned char* root, int* q) {
  const long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v < n) q[v] = xctrt::air_label_flatten(v, p, root);
}

// comp may be q itself: each thread reads and writes its own voxel only.
extern "C" __global__ void xctrt_air_label_number(const int* q, const int* rank, long long n, int* comp) {
  const long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v < n) comp[v] = xctrt::air_label_number(v, q, rank);
}

// Lane `lane`'s value combined (op) with those of the lanes from `head` (where its run of one component
// begins in the warp) up to it: a segmented inclusive scan, all 32 lanes taking part.
template <class T, class Op>
__device__ inline T warp_run_scan(T v, int lane, int head, Op op) {
  for (int d = 1; d < 32; d <<= 1) {
    const T o = __shfl_up_sync(0xffffffffu, v, d);
    if (lane - d >= head) v = op(v, o);
  }
  return v;
}

// *a = v where better(v, *a) (float min or max: CUDA has no float atomicMin/Max). A stale first read
// only makes the exchange fail and read the current value.
template <class Better>
__device__ inline void atomic_better_f32(float* a, float v, Better better) {
  int* ai = reinterpret_cast<int*>(a);
  int old = *ai;
  while (better(v, __int_as_float(old))) {
    const int seen = atomicCAS(ai, old, __float_as_int(v));
    if (seen == old) return;
    old = seen;
  }
}

// One thread per defect voxel, in blocks of whole warps: the lanes of a run of one component (consecutive
// voxels of the list, mostly an x-run) add up first, and the run's last lane does the atomics.
extern "C" __global__ void xctrt_component_stats(const int* pid, const double* stats, const int* zyx, const float* g,
                                                 int has_g, long long n, double* sums, int* mn, int* mx,
                                                 double* gsum, float* gmin, float* gmax) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31;
  const bool on = i < n;
  const int c = on ? pid[i] : -1;   // lanes past the end: runs of their own that add nothing
  const int before = __shfl_up_sync(0xffffffffu, c, 1), after = __shfl_down_sync(0xffffffffu, c, 1);
  const unsigned heads = __ballot_sync(0xffffffffu, lane == 0 || before != c);
  const int head = 31 - __clz(heads & (0xffffffffu >> (31 - lane)));
  const bool tail = on && (lane == 31 || after != c);
  const long long cc = c;
  auto add = [](double a, double b) { return a + b; };
  for (int k = 0; k < xctrt::kStatCols; ++k) {
    const double v = warp_run_scan(on ? stats[i * xctrt::kStatCols + k] : 0.0, lane, head, add);
    if (tail) atomicAdd(sums + cc * xctrt::kStatCols + k, v);
  }
  for (int a = 0; a < 3; ++a) {
    const int v = on ? zyx[3 * i + a] : 0;
    const int lo = warp_run_scan(v, lane, head, [](int x, int y) { return min(x, y); });
    const int hi = warp_run_scan(v, lane, head, [](int x, int y) { return max(x, y); });
    if (tail) atomicMin(mn + 3 * cc + a, lo), atomicMax(mx + 3 * cc + a, hi);
  }
  if (!has_g) return;   // the same for every thread: no lane leaves the shuffles below
  const float v = on ? g[i] : 0.0f;
  const double s = warp_run_scan(static_cast<double>(v), lane, head, add);
  const float lo = warp_run_scan(v != v ? __int_as_float(0x7f800000) : v, lane, head,
                                 [](float x, float y) { return x < y ? x : y; });
  const float hi = warp_run_scan(v != v ? __int_as_float(static_cast<int>(0xff800000u)) : v, lane, head,
                                 [](float x, float y) { return x > y ? x : y; });
  if (tail) {
    atomicAdd(gsum + cc, s);
    atomic_better_f32(gmin + cc, lo, [](float x, float y) { return x < y; });
    atomic_better_f32(gmax + cc, hi, [](float x, float y) { return x > y; });
  }
}

extern "C" __global__ void xctrt_union_edges(int* p, const int* a, const int* b, long long m) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < m) xctrt::union_edge(i, p, a, b);
}

extern "C" __global__ void xctrt_union_neighbours(int* p, const long long* nbr, long long m, long long n,
                                                  long long goff, const int* local) {
  const long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < m) xctrt::union_neighbour(t, n, p, nbr, goff, local);
}

extern "C" __global__ void xctrt_find_roots(int* p, long long n, int* q) {
  const long long v = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v < n) q[v] = xctrt::find_root(v, p);
}
#endif
