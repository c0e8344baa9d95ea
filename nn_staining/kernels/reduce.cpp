// Fused chunk reductions for nn_staining's Moments (nn_staining/stats.py), CPU float32 rows.
//
// fold_chunk reads every buffered value once: per neuron the sums of (x - shift) per class (the
// total is their sum), of its squares, the min and max (NaN propagating, as amin/amax do), the
// active (> 0) and non-finite counts (the latter read again only in a tile whose sums show a NaN
// or infinity). Columns are cut into tiles spread over torch's intra-op
// threads; each tile keeps float32 partial sums that are folded into float64 every FOLD rows (a
// class slot within FOLD + 3: rows are summed four at a time).
// A tile whose chunk strays more than 2^30 from the shift is summed again divided by a power of
// two (the same scale as stats._chunk_scale), so its float32 squares cannot overflow.
//
// With the chunk's batch runs it also gives the per-batch (count, mean, std, min, max) rows in
// float64: the tile reads the rows batch by batch, and a second pass over a batch's rows (still in
// cache) takes its squared deviations.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr int64_t TILE = 128;  // columns per tile (512 bytes of each row)
constexpr int FOLD = 64;       // rows summed in float32 before a fold into float64
constexpr int64_t AHEAD = 24;  // rows a tile's reads are prefetched ahead
constexpr int64_t WARM_BYTES = 256 * 1024;  // accumulators read ahead of the tiles up to this size (warm)

struct Outputs {
  double* sum;
  double* sum_sq;
  float* minimum;
  float* maximum;
  double* active;
  double* nonfinite;
  double* class_count;  // may be null (no classes)
  double* class_sum;    // (classes, f), may be null
};

inline float nan_min(float m, float v) { return (v < m || v != v) ? v : m; }
inline float nan_max(float m, float v) { return (v > m || v != v) ? v : m; }

// The float64 power of two that brings the chunk's x - shift within 2^30 (1 for ordinary values,
// NaN, infinities or no observation); stats._chunk_scale, per neuron.
inline double chunk_scale(float low, float high, float shift) {
  double s = shift;
  double reach = std::max(static_cast<double>(high) - s, s - static_cast<double>(low));
  if (!(reach > 1073741824.0)) return 1.0;  // within 2^30, NaN or no observation: the common case, no log2
  double exponent = std::ceil(std::log2(reach)) - 30.0;
  if (!std::isfinite(exponent) || exponent < 0.0) return 1.0;
  return std::exp2(exponent);
}

// One tile's sums: slots (classes + 1) × width per-class sums of x - shift (the last slot: rows
// without a class), and per column the square sums and active counts. float32 partials (the
// counts exact below 2^24) are folded into float64 every FOLD rows of a slot. A thread's tiles
// reuse one TileSums (per-batch folds call the kernel thousands of times), and a tile leaves its
// float32 partials zero (drain), so the next tile starts without clearing them; a slot's float64
// sums are used only once it was folded (``folded``), so they need no clearing either.
struct TileSums {
  int64_t width = 0, slots = 0;
  std::vector<float> part, part_sq, part_act;  // all zero between tiles
  std::vector<double> sums, sq, act;
  std::vector<char> folded;  // whether sums holds slot l (a slot of more than FOLD rows)
  std::vector<int> pending;
  std::vector<int64_t> counts;
  int pending_rows = 0;

  // Sums for a tile of ``w`` columns and ``l`` slots (the partials are zero already).
  void reset(int64_t w, int64_t l) {
    if (static_cast<size_t>(w * l) > part.size()) {
      part.resize(w * l, 0.0f);
      sums.resize(w * l);
    }
    if (static_cast<size_t>(w) > part_sq.size()) {
      part_sq.resize(w, 0.0f);
      part_act.resize(w, 0.0f);
    }
    width = w;
    slots = l;
    sq.assign(w, 0.0);
    act.assign(w, 0.0);
    folded.assign(l, 0);
    pending.assign(l, 0);
    counts.assign(l, 0);
    pending_rows = 0;
  }

  // Zero every partial float32 sum the vectors hold: after an exception left a tile half done.
  void scrub() {
    std::fill(part.begin(), part.end(), 0.0f);
    std::fill(part_sq.begin(), part_sq.end(), 0.0f);
    std::fill(part_act.begin(), part_act.end(), 0.0f);
  }

  // Zero every partial and start the tile again (before it is summed again, scaled: rare).
  void clear() {
    scrub();
    reset(width, slots);
  }

  static void fold(float* __restrict p, double* __restrict s, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      s[j] += p[j];
      p[j] = 0.0f;
    }
  }

  void fold_slot(int64_t l) {
    float* __restrict p = part.data() + l * width;
    double* __restrict s = sums.data() + l * width;
    if (folded[l]) {
      fold(p, s, width);
    } else {
      for (int64_t j = 0; j < width; ++j) {
        s[j] = p[j];
        p[j] = 0.0f;
      }
      folded[l] = 1;
    }
    pending[l] = 0;
  }

  void fold_rows() {
    fold(part_sq.data(), sq.data(), width);
    fold(part_act.data(), act.data(), width);
    pending_rows = 0;
  }

  // Slot l's sums into ``into`` (may be null; times ``scale`` when ``scaled``) and ``total`` (may be
  // null), leaving its partials zero.
  void drain(int64_t l, const double* __restrict scale, bool scaled, double* __restrict into,
             double* __restrict total) {
    fold_slot(l);  // the slot's whole sums in float64, its partials zero: simple loops that vectorise
    const double* __restrict v = sums.data() + l * width;
    if (total)
      for (int64_t j = 0; j < width; ++j) total[j] += v[j];
    if (into && scaled)
      for (int64_t j = 0; j < width; ++j) into[j] += v[j] * scale[j];
    else if (into)
      for (int64_t j = 0; j < width; ++j) into[j] += v[j];
  }
};

// A chunk's batches, for per-batch rows: batch g owns the row runs [starts[s], starts[s] + lengths[s])
// for s in [offsets[g], offsets[g + 1]); its count, mean, std, min and max (float64, every row,
// masked or not, as the torch path) go to out[k * groups * f + g * f + column] for k = 0..4.
struct Batches {
  const int64_t* starts;
  const int64_t* lengths;
  const int64_t* offsets;
  int64_t groups;
  double* out;
};

// One batch's (count, mean, std, min, max) over one tile's columns: a float64 pass that runs beside
// the sums (add) and a second pass over its rows, still in cache (finish).
struct BatchTile {
  std::vector<double> total, dev;
  std::vector<float> mn, mx;
  explicit BatchTile(int64_t w) : total(w), dev(w), mn(w), mx(w) {}

  void start() {
    std::fill(total.begin(), total.end(), 0.0);
    std::fill(dev.begin(), dev.end(), 0.0);
    std::fill(mn.begin(), mn.end(), std::numeric_limits<float>::infinity());
    std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
  }

  void add(const float* __restrict x, int64_t w) {
    double* __restrict s = total.data();
    float* __restrict lo = mn.data();
    float* __restrict hi = mx.data();
    for (int64_t j = 0; j < w; ++j) {
      const float v = x[j];
      s[j] += v;
      lo[j] = v < lo[j] ? v : lo[j];  // NaN ignored here: a NaN total sends finish looking for it
      hi[j] = v > hi[j] ? v : hi[j];
    }
  }

  // Whether batch g holds a NaN in column k (its total is NaN: a NaN, or +Inf beside -Inf).
  static bool has_nan(const float* rows, int64_t f, int64_t k, const Batches& b, int64_t g) {
    for (int64_t s = b.offsets[g]; s < b.offsets[g + 1]; ++s)
      for (int64_t r = b.starts[s]; r < b.starts[s] + b.lengths[s]; ++r)
        if (std::isnan(rows[r * f + k])) return true;
    return false;
  }

  void finish(const float* rows, int64_t f, int64_t j0, int64_t w, const Batches& b, int64_t g) {
    int64_t count = 0;
    for (int64_t s = b.offsets[g]; s < b.offsets[g + 1]; ++s) count += b.lengths[s];
    const double c = static_cast<double>(count);
    for (int64_t j = 0; j < w; ++j) {
      if (std::isnan(total[j]) && has_nan(rows, f, j0 + j, b, g)) mn[j] = mx[j] = total[j];
      total[j] /= c;  // the mean
    }
    double* __restrict d = dev.data();
    const double* __restrict mean = total.data();
    for (int64_t s = b.offsets[g]; s < b.offsets[g + 1]; ++s) {
      for (int64_t r = b.starts[s]; r < b.starts[s] + b.lengths[s]; ++r) {
        const float* __restrict x = rows + r * f + j0;
        for (int64_t j = 0; j < w; ++j) {
          const double e = static_cast<double>(x[j]) - mean[j];
          d[j] += e * e;
        }
      }
    }
    const int64_t plane = b.groups * f, base = g * f + j0;
    for (int64_t j = 0; j < w; ++j) {
      b.out[base + j] = c;
      b.out[plane + base + j] = mean[j];
      b.out[2 * plane + base + j] = std::sqrt(d[j] / c);
      b.out[3 * plane + base + j] = mn[j];
      b.out[4 * plane + base + j] = mx[j];
    }
  }
};

// The row's class slot: its label, or ``none`` (the last slot) for rows without a valid one.
inline int64_t slot_of(const int64_t* labels, int64_t r, int64_t none) {
  const int64_t l = labels ? labels[r] : none;
  return (l < 0 || l > none) ? none : l;
}

// sum_tile's sums for four kept rows at once (see below): each column's square sum, min, max and
// active count are read and written once for the four, the class slots once per row. A slot is
// folded into float64 after the four rows that brought it to FOLD, so a float32 partial sums at
// most FOLD + 3 rows. Two of the rows may share a slot: their updates stay in row order.
template <bool Scaled, bool Full>
void sum_four(const float* rows, int64_t f, int64_t j0, int64_t w, const int64_t* labels, int64_t none,
              const int64_t* quad, const float* __restrict shift, const float* __restrict inv, TileSums& t,
              float* __restrict mn, float* __restrict mx) {
  const float* __restrict x0 = rows + quad[0] * f + j0;
  const float* __restrict x1 = rows + quad[1] * f + j0;
  const float* __restrict x2 = rows + quad[2] * f + j0;
  const float* __restrict x3 = rows + quad[3] * f + j0;
  const int64_t l[4] = {slot_of(labels, quad[0], none), slot_of(labels, quad[1], none),
                        slot_of(labels, quad[2], none), slot_of(labels, quad[3], none)};
  float* p0 = t.part.data() + l[0] * w;
  float* p1 = t.part.data() + l[1] * w;
  float* p2 = t.part.data() + l[2] * w;
  float* p3 = t.part.data() + l[3] * w;
  float* __restrict q = t.part_sq.data();
  float* __restrict act = t.part_act.data();
#pragma GCC ivdep
  for (int64_t j = 0; j < w; ++j) {
    const float a = x0[j], b = x1[j], c = x2[j], d = x3[j];
    const float ca = Scaled ? a * inv[j] - shift[j] * inv[j] : a - shift[j];
    const float cb = Scaled ? b * inv[j] - shift[j] * inv[j] : b - shift[j];
    const float cc = Scaled ? c * inv[j] - shift[j] * inv[j] : c - shift[j];
    const float cd = Scaled ? d * inv[j] - shift[j] * inv[j] : d - shift[j];
    p0[j] += ca;
    p1[j] += cb;
    p2[j] += cc;
    p3[j] += cd;
    if (Full) {
      q[j] += (ca * ca + cb * cb) + (cc * cc + cd * cd);
      float lo = mn[j], hi = mx[j];
      lo = a < lo ? a : lo;
      lo = b < lo ? b : lo;
      lo = c < lo ? c : lo;
      lo = d < lo ? d : lo;
      hi = a > hi ? a : hi;
      hi = b > hi ? b : hi;
      hi = c > hi ? c : hi;
      hi = d > hi ? d : hi;
      mn[j] = lo;
      mx[j] = hi;
      act[j] += ((a > 0.0f ? 1.0f : 0.0f) + (b > 0.0f ? 1.0f : 0.0f)) +
                ((c > 0.0f ? 1.0f : 0.0f) + (d > 0.0f ? 1.0f : 0.0f));
    }
  }
  for (int i = 0; i < 4; ++i) {
    t.counts[l[i]] += 1;
    t.pending[l[i]] += 1;
  }
  for (int i = 0; i < 4; ++i)
    if (t.pending[l[i]] >= FOLD) t.fold_slot(l[i]);
  if (Full && (t.pending_rows += 4) >= FOLD) t.fold_rows();
}

// Per-class sums of one tile's columns [j0, j0 + w) over every kept row, c = (x - shift) / scale
// (as x * inv - shift * inv when Scaled). With Full also the squares, min and max (NaN ignored:
// a NaN or infinite value shows as a non-finite square sum, and count_nonfinite counts them) and
// the active counts. With ``batches`` the rows are read batch by batch, each batch's rows also
// giving its per-batch row.
template <bool Scaled, bool Full>
void sum_tile(const float* rows, int64_t n, int64_t f, int64_t j0, int64_t w, const int64_t* labels,
              const bool* dropped, int64_t slots, const float* __restrict shift, const float* __restrict inv,
              TileSums& t, float* __restrict mn, float* __restrict mx, const Batches* batches) {
  const int64_t none = slots - 1;
  float* __restrict q = t.part_sq.data();
  float* __restrict act = t.part_act.data();
  auto row = [&](int64_t r, int64_t end) {
    const float* __restrict x = rows + r * f + j0;
    if (r + AHEAD < end) {  // rows f apart cross pages, which the hardware prefetchers do not follow
      const float* next = x + AHEAD * f;
      for (int64_t j = 0; j < w; j += 16) __builtin_prefetch(next + j);
    }
    if (dropped && dropped[r]) return;
    int64_t l = labels ? labels[r] : none;
    if (l < 0 || l > none) l = none;
    float* __restrict p = t.part.data() + l * w;
#pragma GCC ivdep
    for (int64_t j = 0; j < w; ++j) {
      const float v = x[j];
      const float c = Scaled ? v * inv[j] - shift[j] * inv[j] : v - shift[j];
      p[j] += c;
      if (Full) {
        q[j] += c * c;
        mn[j] = v < mn[j] ? v : mn[j];
        mx[j] = v > mx[j] ? v : mx[j];
        act[j] += v > 0.0f ? 1.0f : 0.0f;
      }
    }
    t.counts[l] += 1;
    if (++t.pending[l] >= FOLD) t.fold_slot(l);
    if (Full && ++t.pending_rows >= FOLD) t.fold_rows();
  };
  if (batches == nullptr) {  // kept rows four at a time: q, mn, mx and act loaded and stored once per four
    int64_t quad[4];
    int kept = 0;
    for (int64_t r = 0; r < n; ++r) {
      if (r + AHEAD < n) {
        const float* next = rows + (r + AHEAD) * f + j0;
        for (int64_t j = 0; j < w; j += 16) __builtin_prefetch(next + j);
      }
      if (dropped && dropped[r]) continue;
      quad[kept++] = r;
      if (kept == 4) {
        sum_four<Scaled, Full>(rows, f, j0, w, labels, none, quad, shift, inv, t, mn, mx);
        kept = 0;
      }
    }
    for (int i = 0; i < kept; ++i) row(quad[i], quad[i]);  // end == r: no prefetch
  } else {
    BatchTile batch(w);
    for (int64_t g = 0; g < batches->groups; ++g) {
      batch.start();
      for (int64_t s = batches->offsets[g]; s < batches->offsets[g + 1]; ++s) {
        const int64_t end = batches->starts[s] + batches->lengths[s];
        for (int64_t r = batches->starts[s]; r < end; ++r) {
          row(r, end);
          batch.add(rows + r * f + j0, w);
        }
      }
      batch.finish(rows, f, j0, w, *batches, g);
    }
  }
  if (t.pending_rows) t.fold_rows();
}

// The NaN and infinite values of one tile's kept rows, per column (only for a tile where they show).
void count_nonfinite(const float* rows, int64_t n, int64_t f, int64_t j0, int64_t w, const bool* dropped,
                     std::vector<int64_t>& nan, std::vector<int64_t>& inf) {
  for (int64_t r = 0; r < n; ++r) {
    if (dropped && dropped[r]) continue;
    const float* x = rows + r * f + j0;
    for (int64_t j = 0; j < w; ++j) {
      nan[j] += std::isnan(x[j]);
      inf[j] += std::isinf(x[j]);
    }
  }
}

void fold_tile(const float* rows, int64_t n, int64_t f, int64_t j0, int64_t w, const int64_t* labels,
               const bool* dropped, int64_t classes, const float* shift_all, bool class_only, bool count_classes,
               const Outputs& out, const Batches* batches, TileSums& t) {
  const int64_t slots = classes + 1;
  const float* shift = shift_all + j0;
  thread_local std::vector<double> scale;
  t.reset(w, slots);
  scale.assign(w, 1.0);
  if (class_only) {
    sum_tile<false, false>(rows, n, f, j0, w, labels, dropped, slots, shift, nullptr, t, nullptr, nullptr,
                           nullptr);
    for (int64_t l = 0; l < slots; ++l)
      t.drain(l, scale.data(), false, l < classes ? out.class_sum + l * f + j0 : nullptr, nullptr);
  } else {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    thread_local std::vector<float> mn, mx;
    mn.assign(w, std::numeric_limits<float>::infinity());
    mx.assign(w, -std::numeric_limits<float>::infinity());
    sum_tile<false, true>(rows, n, f, j0, w, labels, dropped, slots, shift, nullptr, t, mn.data(), mx.data(),
                          batches);
    thread_local std::vector<int64_t> nans, infs;
    nans.assign(w, 0);
    infs.assign(w, 0);
    bool seen = false;
    for (int64_t j = 0; j < w; ++j) seen |= !std::isfinite(t.sq[j]);
    if (seen) count_nonfinite(rows, n, f, j0, w, dropped, nans, infs);
    bool scaled = false;
    for (int64_t j = 0; j < w; ++j) {
      if (nans[j]) mn[j] = mx[j] = nan;  // as amin / amax: NaN wins
      scale[j] = chunk_scale(mn[j], mx[j], shift[j]);
      scaled |= scale[j] != 1.0;
    }
    if (scaled) {  // rare: values beyond 2^30 of the shift; sum the tile again, divided by scale
      std::vector<float> inv(w), ignored_mn(w), ignored_mx(w);
      for (int64_t j = 0; j < w; ++j) inv[j] = static_cast<float>(1.0 / scale[j]);
      t.clear();
      sum_tile<true, true>(rows, n, f, j0, w, labels, dropped, slots, shift, inv.data(), t, ignored_mn.data(),
                           ignored_mx.data(), nullptr);
    }
    thread_local std::vector<double> total;
    total.assign(w, 0.0);
    for (int64_t l = 0; l < slots; ++l)
      t.drain(l, scale.data(), scaled, l < classes ? out.class_sum + l * f + j0 : nullptr, total.data());
    for (int64_t j = 0; j < w; ++j) {
      const int64_t k = j0 + j;
      out.sum[k] += total[j] * scale[j];
      out.sum_sq[k] += t.sq[j] * (scale[j] * scale[j]);
      out.minimum[k] = nan_min(out.minimum[k], mn[j]);
      out.maximum[k] = nan_max(out.maximum[k], mx[j]);
      out.active[k] += t.act[j];
      out.nonfinite[k] += static_cast<double>(nans[j] + infs[j]);
    }
  }
  if (count_classes)
    for (int64_t l = 0; l < classes; ++l) out.class_count[l] += static_cast<double>(t.counts[l]);
}

// One tile of columns [j0, j0 + w) folded into the accumulators, with this thread's TileSums. An
// exception (an allocation failing) leaves them zeroed again, so later folds on this thread are right.
void reduce_tile(const float* rows, int64_t n, int64_t f, int64_t j0, int64_t w, const int64_t* labels,
                 const bool* dropped, int64_t classes, const float* shift_all, bool class_only,
                 bool count_classes, const Outputs& out, const Batches* batches) {
  thread_local TileSums t;
  try {
    fold_tile(rows, n, f, j0, w, labels, dropped, classes, shift_all, class_only, count_classes, out, batches, t);
  } catch (...) {
    t.scrub();
    throw;
  }
}

// Read one value of each cache line of the accumulators before the tiles run, when they fit in
// WARM_BYTES. They were last touched a whole forward pass ago, and the tiles read them only at their
// end, line by line across class rows f apart: waiting there for each line costs more than this
// sequential read, which the hardware prefetchers follow. Larger accumulators would leave the
// cache again before the tiles reach them, so the read would only add memory traffic.
void warm(const Outputs& out, int64_t f, int64_t classes, bool class_only) {
  constexpr int64_t LINE = 64 / sizeof(double);
  if ((classes + (class_only ? 0 : 4)) * f * static_cast<int64_t>(sizeof(double)) > WARM_BYTES) return;
  double sink = 0.0;
  auto read = [&](const double* p, int64_t n) {
    for (int64_t i = 0; i < n; i += LINE) sink += p[i];
  };
  read(out.class_sum, classes * f);
  if (!class_only)
    for (const double* column : {out.sum, out.sum_sq, out.active, out.nonfinite}) read(column, f);
  volatile double kept = sink;  // the reads are not optimised away
  (void)kept;
}

void check_accumulator(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
              "fold_chunk: ", name, " must be a contiguous CPU ", c10::toString(dtype), " tensor of ", numel,
              " elements");
}

// Checked per-batch runs (see Batches) and their (5, groups, f) float64 result, or none.
std::optional<Batches> batch_runs(const std::optional<at::Tensor>& starts, const std::optional<at::Tensor>& lengths,
                                  const std::optional<at::Tensor>& offsets, int64_t n, int64_t f, at::Tensor& result) {
  TORCH_CHECK(starts.has_value() == lengths.has_value() && starts.has_value() == offsets.has_value(),
              "fold_chunk: starts, lengths and offsets go together");
  if (!starts.has_value()) return std::nullopt;
  for (const at::Tensor* t : {&*starts, &*lengths, &*offsets})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1,
                "fold_chunk: batch runs must be 1-D contiguous CPU int64 tensors");
  const int64_t groups = offsets->numel() - 1;
  TORCH_CHECK(groups >= 0 && starts->numel() == lengths->numel(), "fold_chunk: malformed batch runs");
  const int64_t* st = starts->data_ptr<int64_t>();
  const int64_t* len = lengths->data_ptr<int64_t>();
  const int64_t* off = offsets->data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[groups] == starts->numel(), "fold_chunk: malformed batch offsets");
  int64_t covered = 0;
  for (int64_t s = 0; s < starts->numel(); ++s) {
    TORCH_CHECK(st[s] >= 0 && len[s] > 0 && st[s] + len[s] <= n, "fold_chunk: batch run out of range");
    covered += len[s];
  }
  TORCH_CHECK(covered == n, "fold_chunk: the batch runs must cover every row once");
  for (int64_t g = 0; g < groups; ++g)
    TORCH_CHECK(off[g] < off[g + 1], "fold_chunk: a batch without rows");
  result = at::empty({5, groups, f}, at::TensorOptions().dtype(at::kDouble));
  return Batches{st, len, off, groups, result.data_ptr<double>()};
}

at::Tensor fold_chunk(const at::Tensor& rows, const at::Tensor& shift, const std::optional<at::Tensor>& labels,
                      const std::optional<at::Tensor>& dropped, int64_t classes, bool class_only,
                      const at::Tensor& sum, const at::Tensor& sum_sq, const at::Tensor& minimum,
                      const at::Tensor& maximum, const at::Tensor& active, const at::Tensor& nonfinite,
                      const at::Tensor& class_count, const at::Tensor& class_sum,
                      const std::optional<at::Tensor>& starts, const std::optional<at::Tensor>& lengths,
                      const std::optional<at::Tensor>& offsets) {
  TORCH_CHECK(rows.dim() == 2 && rows.device().is_cpu() && rows.scalar_type() == at::kFloat &&
                  rows.is_contiguous(),
              "fold_chunk: rows must be a contiguous 2-D CPU float32 tensor");
  const int64_t n = rows.size(0), f = rows.size(1);
  check_accumulator(shift, at::kFloat, f, "shift");
  check_accumulator(class_count, at::kDouble, classes, "class_count");
  check_accumulator(class_sum, at::kDouble, classes * f, "class_sum");
  if (!class_only) {
    check_accumulator(sum, at::kDouble, f, "sum");
    check_accumulator(sum_sq, at::kDouble, f, "sum_sq");
    check_accumulator(minimum, at::kFloat, f, "minimum");
    check_accumulator(maximum, at::kFloat, f, "maximum");
    check_accumulator(active, at::kDouble, f, "active");
    check_accumulator(nonfinite, at::kDouble, f, "nonfinite");
  }
  const int64_t* label_ptr = nullptr;
  if (labels.has_value()) {
    TORCH_CHECK(labels->device().is_cpu() && labels->scalar_type() == at::kLong && labels->is_contiguous() &&
                    labels->numel() == n,
                "fold_chunk: labels must be a contiguous CPU int64 tensor of one label per row");
    label_ptr = labels->data_ptr<int64_t>();
  }
  const bool* drop_ptr = nullptr;
  if (dropped.has_value()) {
    TORCH_CHECK(dropped->device().is_cpu() && dropped->scalar_type() == at::kBool &&
                    dropped->is_contiguous() && dropped->numel() == n,
                "fold_chunk: dropped must be a contiguous CPU bool tensor of one flag per row");
    drop_ptr = dropped->data_ptr<bool>();
  }
  at::Tensor per_batch = at::empty({5, 0, f}, at::TensorOptions().dtype(at::kDouble));
  const std::optional<Batches> batches = batch_runs(starts, lengths, offsets, n, f, per_batch);
  TORCH_CHECK(!(batches && class_only), "fold_chunk: no per-batch rows for class-only sums");
  if (n == 0 || f == 0) return per_batch;
  Outputs out{class_only ? nullptr : sum.data_ptr<double>(),
              class_only ? nullptr : sum_sq.data_ptr<double>(),
              class_only ? nullptr : minimum.data_ptr<float>(),
              class_only ? nullptr : maximum.data_ptr<float>(),
              class_only ? nullptr : active.data_ptr<double>(),
              class_only ? nullptr : nonfinite.data_ptr<double>(),
              class_count.data_ptr<double>(),
              class_sum.data_ptr<double>()};
  const float* data = rows.data_ptr<float>();
  const float* shift_ptr = shift.data_ptr<float>();
  warm(out, f, classes, class_only);
  const int64_t tiles = (f + TILE - 1) / TILE;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t j0 = tile * TILE;
      reduce_tile(data, n, f, j0, std::min(TILE, f - j0), label_ptr, drop_ptr, classes, shift_ptr,
                  class_only, tile == 0, out, batches ? &*batches : nullptr);
    }
  });
  return per_batch;
}

}  // namespace

TORCH_LIBRARY(nn_staining, m) {
  m.def(
      "fold_chunk(Tensor rows, Tensor shift, Tensor? labels, Tensor? dropped, int classes, bool class_only, "
      "Tensor(a!) sum, Tensor(b!) sum_sq, Tensor(c!) minimum, Tensor(d!) maximum, Tensor(e!) active, "
      "Tensor(f!) nonfinite, Tensor(g!) class_count, Tensor(h!) class_sum, Tensor? starts, Tensor? lengths, "
      "Tensor? offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(nn_staining, CPU, m) {
  m.impl("fold_chunk", &fold_chunk);
}
