// Slice tiling for the fixed-size-tile model: intensity windowing, tile extraction with
// padding, weighted stitching back to slice size, and bilinear resizing.
// Every formula fixes its float32 operation order so the NumPy references in
// tests/test_tiling.py agree bit for bit (the build uses -ffp-contract=off).
#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "bindings.hpp"

namespace py = pybind11;

namespace xctrt {
namespace {

using Starts = std::vector<int64_t>;

Starts starts_of(int64_t length, int64_t tile, int64_t overlap) {
  if (tile < 1) throw std::invalid_argument("tile must be >= 1");
  if (overlap < 0 || overlap >= tile) throw std::invalid_argument("overlap must satisfy 0 <= overlap < tile");
  if (length < 1) throw std::invalid_argument("length must be >= 1");
  if (length <= tile) return {0};
  const int64_t stride = tile - overlap;
  const int64_t n = (length - tile + stride - 1) / stride + 1;
  Starts s(n);
  // The last tile is pulled back to end at the border instead of running off it.
  for (int64_t i = 0; i < n; ++i) s[i] = std::min(i * stride, length - tile);
  return s;
}

py::array_t<int64_t> to_array(const Starts& s) {
  py::array_t<int64_t> a(static_cast<py::ssize_t>(s.size()));
  std::copy(s.begin(), s.end(), a.mutable_data());
  return a;
}

// A 2-D slice in its own dtype; rows may be strided (a volume[:, y, :] view), columns must be
// contiguous for the vector loops, otherwise a compact copy is made.
struct Slice {
  py::array keep;  // owns the buffer we point into
  const char* data = nullptr;
  int64_t h = 0, w = 0, row_bytes = 0;
  int kind = 0;  // 0 uint8, 1 uint16, 2 float32
};

template <typename T>
bool take_slice(const py::array& a, int kind, Slice& s) {
  if (!py::isinstance<py::array_t<T>>(a)) return false;
  py::array arr = a;
  if (arr.strides(1) != static_cast<py::ssize_t>(sizeof(T)) || arr.strides(0) % sizeof(T) != 0)
    arr = py::array_t<T, py::array::c_style>::ensure(a);
  s.keep = arr;
  s.data = static_cast<const char*>(arr.data());
  s.h = arr.shape(0);
  s.w = arr.shape(1);
  s.row_bytes = arr.strides(0);
  s.kind = kind;
  return true;
}

Slice get_slice(const py::array& a) {
  if (a.ndim() != 2) throw std::invalid_argument("slice must be a 2-D array");
  if (a.shape(0) < 1 || a.shape(1) < 1) throw std::invalid_argument("slice must not be empty");
  Slice s;
  if (!take_slice<uint8_t>(a, 0, s) && !take_slice<uint16_t>(a, 1, s) && !take_slice<float>(a, 2, s))
    throw std::invalid_argument("slice dtype must be uint8, uint16 or float32");
  return s;
}

template <typename F>
void with_rows(const Slice& s, F&& f) {
  switch (s.kind) {
    case 0: f(static_cast<const uint8_t*>(nullptr)); break;
    case 1: f(static_cast<const uint16_t*>(nullptr)); break;
    default: f(static_cast<const float*>(nullptr)); break;
  }
}

struct Window {
  float lo, scale;
};

Window make_window(double lo_d, double hi_d) {
  const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d);
  if (!(hi > lo)) throw std::invalid_argument("window needs hi > lo");
  return {lo, hi - lo};
}

// v = clip((float(x) - lo) / scale, 0, 1). A true division, not a reciprocal multiply, so
// the result matches NumPy exactly; the ternaries compile to maxps/minps and keep NaN.
template <typename T>
inline void window_row(const T* __restrict s, float* __restrict d, int64_t n, Window win) {
  const float lo = win.lo, scale = win.scale;
  for (int64_t i = 0; i < n; ++i) {
    float v = (static_cast<float>(s[i]) - lo) / scale;
    v = v < 0.0f ? 0.0f : v;
    v = v > 1.0f ? 1.0f : v;
    d[i] = v;
  }
}

py::array_t<float> window(const py::array& slice, double lo, double hi) {
  const Slice s = get_slice(slice);
  const Window win = make_window(lo, hi);
  py::array_t<float> out({s.h, s.w});
  float* o = out.mutable_data();
  with_rows(s, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    py::gil_scoped_release release;
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(static) if (s.h * s.w > (1 << 18))
#endif
    for (int64_t y = 0; y < s.h; ++y)
      window_row(reinterpret_cast<const T*>(s.data + y * s.row_bytes), o + y * s.w, s.w, win);
  });
  return out;
}

py::object extract_tiles(const py::array& slice, int64_t tile, int64_t overlap, double lo, double hi,
                         const std::string& pad, py::object out) {
  const Slice s = get_slice(slice);
  const Starts ys = starts_of(s.h, tile, overlap), xs = starts_of(s.w, tile, overlap);
  const Window win = make_window(lo, hi);
  bool constant;
  if (pad == "edge") constant = false;
  else if (pad == "constant") constant = true;
  else throw std::invalid_argument("pad must be 'edge' or 'constant'");
  const int64_t ny = ys.size(), nx = xs.size(), nt = ny * nx;

  if (out.is_none()) {
    out = py::array_t<float>({nt, tile, tile});
  } else {
    if (!py::isinstance<py::array_t<float>>(out))
      throw std::invalid_argument("out must be a float32 array");
    auto a = py::reinterpret_borrow<py::array>(out);
    if (a.ndim() != 3 || a.shape(0) != nt || a.shape(1) != tile || a.shape(2) != tile)
      throw std::invalid_argument("out must have shape (" + std::to_string(nt) + ", " + std::to_string(tile) +
                                  ", " + std::to_string(tile) + ")");
    if (!(a.flags() & py::array::c_style) || !a.writeable())
      throw std::invalid_argument("out must be C-contiguous and writeable");
  }
  float* o = static_cast<float*>(py::reinterpret_borrow<py::array>(out).mutable_data());

  with_rows(s, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    py::gil_scoped_release release;
    const int64_t rows = nt * tile;
    // One work item per tile row: balanced even when there are only a few tiles.
#ifdef XCTRT_OPENMP
#pragma omp parallel for schedule(static) if (rows * tile > (1 << 16))
#endif
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = r / tile, ty = r % tile;
      const int64_t x0 = xs[t % nx];
      float* d = o + r * tile;
      int64_t sy = ys[t / nx] + ty;
      if (sy >= s.h) {  // below a slice shorter than the tile
        if (constant) {
          std::fill(d, d + tile, 0.0f);
          continue;
        }
        sy = s.h - 1;
      }
      const int64_t nv = std::min(tile, s.w - x0);
      window_row(reinterpret_cast<const T*>(s.data + sy * s.row_bytes) + x0, d, nv, win);
      std::fill(d + nv, d + tile, constant ? 0.0f : d[nv - 1]);
    }
  });
  return out;
}

// Strict float32: a silent cast of model outputs would hide a full copy.
py::array_t<float, py::array::c_style> float_input(const py::array& a, const char* name) {
  if (!py::isinstance<py::array_t<float>>(a)) throw std::invalid_argument(std::string(name) + " must be float32");
  return py::array_t<float, py::array::c_style>::ensure(a);
}

template <bool Ramp>
void stitch_rows(const float* tiles, float* out, int64_t k, int64_t h, int64_t w, int64_t tile, const Starts& ys,
                 const Starts& xs, const float* w1d) {
  const int64_t ny = ys.size(), nx = xs.size();
#ifdef XCTRT_OPENMP
#pragma omp parallel if (k * h * w > (1 << 16))
#endif
  {
    std::vector<float> wsum(w);
#ifdef XCTRT_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t y = 0; y < h; ++y) {
      // Tiles are visited in tile order (i outer, j inner), so each pixel sums its
      // contributions in the same order as the reference.
      std::fill(wsum.begin(), wsum.end(), 0.0f);
      for (int64_t i = 0; i < ny; ++i) {
        const int64_t ty = y - ys[i];
        if (ty < 0 || ty >= tile) continue;
        const float wy = w1d[ty];
        for (int64_t j = 0; j < nx; ++j) {
          float* __restrict ws = wsum.data() + xs[j];
          const int64_t n = std::min(tile, w - xs[j]);
          for (int64_t c = 0; c < n; ++c) ws[c] += Ramp ? wy * w1d[c] : 1.0f;
        }
      }
      for (int64_t kk = 0; kk < k; ++kk) {
        float* orow = out + (kk * h + y) * w;
        std::fill(orow, orow + w, 0.0f);
        for (int64_t i = 0; i < ny; ++i) {
          const int64_t ty = y - ys[i];
          if (ty < 0 || ty >= tile) continue;
          const float wy = w1d[ty];
          for (int64_t j = 0; j < nx; ++j) {
            const float* __restrict p = tiles + (((i * nx + j) * k + kk) * tile + ty) * tile;
            float* __restrict acc = orow + xs[j];
            const int64_t n = std::min(tile, w - xs[j]);
            // w2d = wy * w1d[c] (float32), then acc += w2d * p; with w = 1 the product is exact.
            if (Ramp)
              for (int64_t c = 0; c < n; ++c) acc[c] += (wy * w1d[c]) * p[c];
            else
              for (int64_t c = 0; c < n; ++c) acc[c] += p[c];
          }
        }
        for (int64_t x = 0; x < w; ++x) orow[x] /= wsum[x];
      }
    }
  }
}

py::array_t<float> stitch_tiles(const py::array& tiles_in, int64_t height, int64_t width, int64_t overlap,
                                const std::string& blend) {
  if (tiles_in.ndim() != 4 || tiles_in.shape(2) != tiles_in.shape(3))
    throw std::invalid_argument("tiles must be (T, K, tile, tile)");
  const auto tiles = float_input(tiles_in, "tiles");
  const int64_t nt = tiles.shape(0), k = tiles.shape(1), tile = tiles.shape(2);
  if (k < 1) throw std::invalid_argument("tiles need at least one channel");
  if (height < 1 || width < 1) throw std::invalid_argument("height and width must be >= 1");
  const Starts ys = starts_of(height, tile, overlap), xs = starts_of(width, tile, overlap);
  if (nt != static_cast<int64_t>(ys.size() * xs.size()))
    throw std::invalid_argument("got " + std::to_string(nt) + " tiles, a " + std::to_string(height) + "x" +
                                std::to_string(width) + " slice has " + std::to_string(ys.size() * xs.size()));
  bool ramp;
  if (blend == "constant") ramp = false;
  else if (blend == "ramp") ramp = true;
  else throw std::invalid_argument("blend must be 'constant' or 'ramp'");

  // Ramp: weight rises linearly over the overlap from each tile edge, 1 in the interior.
  std::vector<float> w1d(tile, 1.0f);
  if (ramp)
    for (int64_t i = 0; i < tile; ++i)
      w1d[i] = static_cast<float>(
          std::min(1.0, static_cast<double>(std::min(i, tile - 1 - i) + 1) / static_cast<double>(overlap + 1)));

  py::array_t<float> out({k, height, width});
  const float* t = tiles.data();
  float* o = out.mutable_data();
  py::gil_scoped_release release;
  if (ramp) stitch_rows<true>(t, o, k, height, width, tile, ys, xs, w1d.data());
  else stitch_rows<false>(t, o, k, height, width, tile, ys, xs, w1d.data());
  return out;
}

// Half-pixel source coordinates along one axis (torch align_corners=False, no antialias).
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<float> l, h;  // weight of i1 and of i0
};

Axis make_axis(int64_t in, int64_t out) {
  Axis a;
  a.i0.resize(out);
  a.i1.resize(out);
  a.l.resize(out);
  a.h.resize(out);
  const double scale = static_cast<double>(in) / static_cast<double>(out);
  for (int64_t o = 0; o < out; ++o) {
    double src = (static_cast<double>(o) + 0.5) * scale - 0.5;
    if (src < 0.0) src = 0.0;
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    a.i0[o] = i0;
    a.i1[o] = std::min(i0 + 1, in - 1);
    a.l[o] = static_cast<float>(src - static_cast<double>(i0));
    a.h[o] = 1.0f - a.l[o];
  }
  return a;
}

py::array_t<float> resize_bilinear(const py::array& img_in, int64_t out_h, int64_t out_w) {
  if (img_in.ndim() != 2 && img_in.ndim() != 3) throw std::invalid_argument("img must be (H, W) or (C, H, W)");
  const auto img = float_input(img_in, "img");
  const bool chw = img.ndim() == 3;
  const int64_t c = chw ? img.shape(0) : 1, h = img.shape(chw ? 1 : 0), w = img.shape(chw ? 2 : 1);
  if (h < 1 || w < 1) throw std::invalid_argument("img must not be empty");
  if (out_h < 1 || out_w < 1) throw std::invalid_argument("out_h and out_w must be >= 1");
  const Axis ay = make_axis(h, out_h), ax = make_axis(w, out_w);
  py::array_t<float> out = chw ? py::array_t<float>({c, out_h, out_w}) : py::array_t<float>({out_h, out_w});
  const float* src = img.data();
  float* dst = out.mutable_data();
  py::gil_scoped_release release;
  const int64_t rows = c * out_h;
  // Separable and exact: hy*(hx*a + lx*b) + ly*(hx*c + lx*d) is hy*t(y0) + ly*t(y1) with
  // t the horizontally interpolated source row, so each t is computed once per thread and
  // reused by every output row that needs it (the common case when enlarging).
#ifdef XCTRT_OPENMP
#pragma omp parallel if (rows * out_w > (1 << 16))
#endif
  {
    std::vector<float> buf[2] = {std::vector<float>(out_w), std::vector<float>(out_w)};
    int64_t key[2] = {-1, -1};
    auto horizontal = [&](int64_t row_key, int avoid) -> int {
      for (int s = 0; s < 2; ++s)
        if (key[s] == row_key) return s;
      const int s = (avoid == 0) ? 1 : (avoid == 1 ? 0 : (key[0] == -1 ? 0 : 1));
      const float* __restrict r = src + row_key * w;
      float* __restrict t = buf[s].data();
      for (int64_t x = 0; x < out_w; ++x) t[x] = ax.h[x] * r[ax.i0[x]] + ax.l[x] * r[ax.i1[x]];
      key[s] = row_key;
      return s;
    };
#ifdef XCTRT_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t ch = r / out_h, y = r % out_h;
      const int64_t k0 = ch * h + ay.i0[y], k1 = ch * h + ay.i1[y];
      // Fetch the second row first only to choose a slot that does not evict the first.
      int s0 = -1;
      for (int s = 0; s < 2; ++s)
        if (key[s] == k0) s0 = s;
      const int s1 = horizontal(k1, s0);
      if (s0 < 0) s0 = horizontal(k0, s1);
      const float* __restrict t0 = buf[s0].data();
      const float* __restrict t1 = buf[s1].data();
      const float hy = ay.h[y], ly = ay.l[y];
      float* __restrict o = dst + r * out_w;
      for (int64_t x = 0; x < out_w; ++x) o[x] = hy * t0[x] + ly * t1[x];
    }
  }
  return out;
}

}  // namespace

void bind_tiling(py::module_& m) {
  m.def(
      "tile_starts", [](int64_t length, int64_t tile, int64_t overlap) { return to_array(starts_of(length, tile, overlap)); },
      py::arg("length"), py::arg("tile"), py::arg("overlap"),
      "Tile start offsets (int64) along one axis: stride = tile - overlap, last tile ends at the border;\n"
      "[0] when length <= tile.");
  m.def("window", &window, py::arg("slice"), py::arg("lo"), py::arg("hi"),
        "2-D uint8/uint16/float32 slice -> float32 clip((x - lo) / (hi - lo), 0, 1), all in float32.");
  m.def("extract_tiles", &extract_tiles, py::arg("slice"), py::arg("tile"), py::arg("overlap"), py::arg("lo"),
        py::arg("hi"), py::arg("pad") = "edge", py::arg("out") = py::none(),
        "Windowed tiles (T, tile, tile) float32 at tile_starts(H) x tile_starts(W), row-major.\n"
        "pad ('edge' or 'constant' 0.0) fills tiles where the slice is smaller than the tile.\n"
        "out: optional float32 C-contiguous buffer of that shape, filled and returned.");
  m.def("stitch_tiles", &stitch_tiles, py::arg("tiles"), py::arg("height"), py::arg("width"), py::arg("overlap"),
        py::arg("blend") = "constant",
        "float32 tiles (T, K, tile, tile) in extract_tiles order -> (K, height, width) weighted mean.\n"
        "blend: 'constant' (w = 1) or 'ramp' (linear over the overlap from each tile edge).");
  m.def("resize_bilinear", &resize_bilinear, py::arg("img"), py::arg("out_h"), py::arg("out_w"),
        "Bilinear resize of float32 (H, W) or (C, H, W), half-pixel centres (torch align_corners=False,\n"
        "no antialias).");
}

}  // namespace xctrt
