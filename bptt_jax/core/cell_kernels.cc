// The cells' forward step loops and reverse recursions (bptt_jax/core/cells/elman.py, lstm.py, gru.py) as
// XLA FFI handlers for the CPU: one call runs all C steps of one layer, with a register-tiled matmul
// for the recurrent matmul of each step and the gate arithmetic fused into one pass over the batch rows.
//
// LSTM forward, per step t (row vectors, gates i | f | g | o):
//     Q(t) = A(t) + bh + h(t-1) Wh                   A(t) = X(t) Wx + bx, formed outside
//     i, f, o = sigmoid(Q_i, Q_f, Q_o);  g = tanh(Q_g)
//     c(t) = f c(t-1) + i g;  h(t) = o tanh(c(t))    held at s(t-1) where valid[t] is false
// LSTM reverse, for t = C-1 .. 0 (the notes' BPTT of this cell; lstm.reverse states the same loop):
//     dh = dH_above(t) + dh_carry;  dc_total = dc + dh o (1 - tanh(c)^2)
//     dG(t) = [dc_total g i(1-i), dc_total c(t-1) f(1-f), dc_total i(1-g^2), dh tanh(c) o(1-o)]
//     dh_carry = dG(t) Wh^T;  dc = dc_total f        (dG = 0 and the carry passed on where not valid)
//
// Elman forward, per step t (the notes' Z1(t) = X(t) W1 + h(t-1) W11 + b1, h(t) = f1(Z1(t))):
//     h(t) = f1(u(t) + h(t-1) W11)                    u(t) = X(t) W1 + b1, formed outside; held where not valid
// Elman reverse (cells.elman.reverse_recurrence's loop, f1' from h as activations.py writes it):
//     dh = dH_above(t) + carry;  dZ1(t) = dh f1'(h(t));  carry = dZ1(t) W11^T   (dZ1 = 0, carry = dh where not valid)
//
// GRU forward, per step t (gates r | z | n):
//     V(t) = h(t-1) Wh + bh;  r = sigmoid(A_r + V_r);  z = sigmoid(A_z + V_z);  n = tanh(A_n + r V_n)
//     h(t) = (1 - z) n + z h(t-1)                    held at h(t-1) where valid[t] is false
// GRU reverse (gru.reverse's loop):
//     dh = dH_above(t) + dh_carry;  dA_n = dh (1 - z)(1 - n^2);  dA_r = dA_n V_n r(1 - r)
//     dA_z = dh (h(t-1) - n) z(1 - z);  dV = [dA_r, dA_z, dA_n r]
//     dh_carry = dh z + dV(t) Wh^T                   (dA = dV = 0, dh_carry = dh where not valid)
//     dWh += h(t-1)^T dV(t);  dbh += dV(t)           (the gru.weight_grads sums, here as dV(t) is made)
//
// The recurrent matmul of each step is this file's own (gemm below: the recurrent weights packed once
// per call for all C steps, register-tiled, vectorized by the compiler for the machine it is compiled
// on). bptt_jax.core.native compiles the file there with g++; it needs only the XLA FFI headers that
// ship with jaxlib.
#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;


namespace {

// The recurrent matmul of every step, C (+)= A op(W), with op(W) packed once per call: W is the same
// for all C steps, so its columns are laid out once in panels of kPanel columns (each panel K rows of
// kPanel contiguous floats, zero-padded) and every step's matmul streams them without repacking, as
// the vendors' RNN primitives keep their weights. A tile of R rows x kPanel columns holds its sums
// in 2R vector registers (the compiler's vector extension: AVX-512 where -march=native has it).
// Rows per tile: 2 kRows accumulators, two panel vectors and a broadcast must fit the vector
// registers, 32 with AVX-512 (8 rows), 16 with AVX2 (6 rows). Built for AVX2 (-march=haswell) on a
// Xeon, 8-row tiles spilled and ran 0.85-0.90x of 6 rows' GFLOP/s at the per-step shapes with B >= 16
// up to [64, 256] x [256, 1024], 1.03-1.07x at [64, 512] x [512, 2048]
// (benchmarks/matmul_rates.py --march haswell; results/matmul_rates_avx2_build*_spr.md).
#if defined(__AVX512F__)
constexpr long kLanes = 16;
constexpr int kRows = 8;
#else
constexpr long kLanes = 8;
constexpr int kRows = 6;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
constexpr long kPanel = 2 * kLanes;
constexpr long kDepth = 256;  // gemm's block of the reduction: 256 x kPanel floats (32 KiB with AVX-512)

struct Packed {
  long k = 0, n = 0, panels = 0;
  std::vector<float> data;  // [panels][k][kPanel]
};

// op(W) for W [rows, cols] row-major: W itself (K = rows, N = cols) or, with trans, W^T.
Packed pack(const float* w, long rows, long cols, bool trans) {
  Packed p;
  p.k = trans ? cols : rows;
  p.n = trans ? rows : cols;
  p.panels = (p.n + kPanel - 1) / kPanel;
  p.data.assign(static_cast<size_t>(p.panels * p.k * kPanel), 0.0f);
  for (long q = 0; q < p.panels; ++q)
    for (long kk = 0; kk < p.k; ++kk) {
      float* dst = p.data.data() + (q * p.k + kk) * kPanel;
      for (long j = 0; j < kPanel && q * kPanel + j < p.n; ++j) {
        const long col = q * kPanel + j;
        dst[j] = trans ? w[col * cols + kk] : w[kk * cols + col];
      }
    }
  return p;
}

inline Vec load(const float* x) {
  Vec v;
  std::memcpy(&v, x, sizeof(Vec));
  return v;
}

// R rows x NP panels (2 NP vectors of sums): NP = 1 for row blocks, more for a few rows (B = 1), where
// one panel's two sums would leave the FMA units waiting on their latency.
template <int R, int NP>
void tile(const float* a, long lda, const float* panel, long k, long stride, float* c, long ldc, long cols,
          bool accumulate) {
  constexpr int V = 2 * NP;
  Vec s[R][V] = {};  // stride: from one panel to the next
  for (long kk = 0; kk < k; ++kk) {
    Vec b[V];
    for (int v = 0; v < V; ++v) b[v] = load(panel + (v / 2) * stride + kk * kPanel + (v % 2) * kLanes);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * lda + kk];
      for (int v = 0; v < V; ++v) s[r][v] += x * b[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    for (int v = 0; v < V; ++v) {
      const long left = cols - v * kLanes;  // valid columns from this vector's first on
      if (left >= kLanes) {
        Vec out = s[r][v];
        if (accumulate) out += load(cr + v * kLanes);
        std::memcpy(cr + v * kLanes, &out, sizeof(Vec));
      } else if (left > 0) {  // the last panel's valid columns
        float sum[kLanes];
        std::memcpy(sum, &s[r][v], sizeof(Vec));
        for (long j = 0; j < left; ++j) cr[v * kLanes + j] = (accumulate ? cr[v * kLanes + j] : 0.0f) + sum[j];
      }
    }
  }
}

template <int R, int NP>
void rows_tile(const float* a, long lda, const Packed& b, long k, float* c, long ldc, bool accumulate, long q0,
               long q1) {
  const long stride = b.k * kPanel;
  long q = q0;
  for (; q + NP <= q1; q += NP)
    tile<R, NP>(a, lda, b.data.data() + q * stride, k, stride, c + q * kPanel, ldc, b.n - q * kPanel, accumulate);
  for (; q < q1; ++q)
    tile<R, 1>(a, lda, b.data.data() + q * stride, k, stride, c + q * kPanel, ldc, b.n - q * kPanel, accumulate);
}

// C [m, N] (+)= A [m, k] op(W)[:k] with op(W) packed (k <= its K rows; -1: all), the columns of panels
// q0 .. q1-1 only; accumulate: add to C, else overwrite. Panels outside, row blocks inside: each
// panel (k x kPanel floats) comes from memory once per call and from cache for every further block
// of rows, where rows outside would stream all of op(W) once per block of kRows rows (at
// [64, 2048] x [2048, 512], 8 passes over 4 MiB a step). A remainder of 1-3 rows goes last, over
// several panels at once (its own, wider tiles).
void gemm(long m, const float* a, long lda, const Packed& b, float* c, long ldc, bool accumulate, long q0, long q1,
          long k = -1) {
  if (k < 0) k = b.k;
  const long stride = b.k * kPanel;
  const long rem = m % kRows, full = m - rem;
  const float* ar = a + full * lda;
  float* cr = c + full * ldc;
  if (full > 0 || rem >= 4) {
    for (long k0 = 0; k0 < k; k0 += kDepth) {  // depth blocks: a panel's block stays in L1 for all rows
      const long kb = std::min(kDepth, k - k0);
      const bool acc = accumulate || k0 > 0;
      for (long q = q0; q < q1; ++q) {
        const float* panel = b.data.data() + q * stride + k0 * kPanel;
        const long cols = b.n - q * kPanel;
        float* cq = c + q * kPanel;
        for (long r = 0; r < full; r += kRows)
          tile<kRows, 1>(a + r * lda + k0, lda, panel, kb, stride, cq + r * ldc, ldc, cols, acc);
        switch (rem) {  // 4 .. kRows - 1 rows left: with the row blocks
#if defined(__AVX512F__)
          case 7: tile<7, 1>(ar + k0, lda, panel, kb, stride, cr + q * kPanel, ldc, cols, acc); break;
          case 6: tile<6, 1>(ar + k0, lda, panel, kb, stride, cr + q * kPanel, ldc, cols, acc); break;
#endif
          case 5: tile<5, 1>(ar + k0, lda, panel, kb, stride, cr + q * kPanel, ldc, cols, acc); break;
          case 4: tile<4, 1>(ar + k0, lda, panel, kb, stride, cr + q * kPanel, ldc, cols, acc); break;
          default: break;
        }
      }
    }
  }
  switch (rem) {  // 1 .. 3 rows left: several panels per tile
    case 3: rows_tile<3, 2>(ar, lda, b, k, cr, ldc, accumulate, q0, q1); break;
    case 2: rows_tile<2, 2>(ar, lda, b, k, cr, ldc, accumulate, q0, q1); break;
    case 1: rows_tile<1, 4>(ar, lda, b, k, cr, ldc, accumulate, q0, q1); break;
    default: break;
  }
}

// A second thread for the matmuls of one call: the panels split in two halves, one per thread,
// each column computed by the same code as on one thread (the results do not depend on it). The
// helper waits for each step's matmul spinning briefly, then yielding the core; made per call
// where the per-step matmul has at least kParallelMacs multiply-adds and the process may use two
// cores. Measured on a 2-core Xeon (benchmarks/native_kernel.py): from 2^24 multiply-adds the split
// made the whole bptt call 1.1-1.5x faster; at 2^20-2^21 it made it 2x slower, the helper competing
// with XLA's own thread for the second core (XLA runs independent work beside the kernel's call).
constexpr long kParallelMacs = 1L << 23;

inline void relax() {  // a spinning thread's hint to the core
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class Team {
 public:
  // sleepy: between jobs the helper sleeps on a condition variable after its brief spin (for jobs
  // far apart, as the reverse call's weight-gradient chunks), where the per-step team keeps
  // yielding the core to stay quick to wake.
  explicit Team(bool sleepy = false) : sleepy_(sleepy), helper_([this] { loop(); }) {}
  ~Team() {
    quit_.store(true, std::memory_order_release);
    post();
    helper_.join();
  }
  Team(const Team&) = delete;
  Team& operator=(const Team&) = delete;

  void gemm2(long m, const float* a, long lda, const Packed& b, float* c, long ldc, bool accumulate, long k = -1) {
    const long half = (b.panels + 1) / 2;
    job_ = {m, a, lda, &b, c, ldc, accumulate, half, k};
    const long ticket = post();
    gemm(m, a, lda, b, c, ldc, accumulate, 0, half, k);
    wait([&] { return done_.load(std::memory_order_acquire) == ticket; });
  }

 private:
  struct Job {
    long m;
    const float* a;
    long lda;
    const Packed* b;
    float* c;
    long ldc;
    bool accumulate;
    long half;
    long k;
  };

  // A new job (or quitting) for the helper: its ticket.
  long post() {
    if (!sleepy_) return go_.fetch_add(1, std::memory_order_acq_rel) + 1;
    long ticket;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ticket = go_.fetch_add(1, std::memory_order_acq_rel) + 1;
    }
    wake_.notify_one();
    return ticket;
  }

  template <typename Ready>
  static void wait(Ready ready) {
    for (long spins = 0; !ready(); ++spins) {
      if (spins < 4000) {
        relax();
      } else {
        std::this_thread::yield();
      }
    }
  }

  void idle(long seen) {
    auto posted = [&] { return go_.load(std::memory_order_acquire) != seen; };
    if (!sleepy_) return wait(posted);
    for (long spins = 0; spins < 4000; ++spins) {
      if (posted()) return;
      relax();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    wake_.wait(lock, posted);
  }

  void loop() {
    long seen = 0;
    for (;;) {
      idle(seen);
      seen = go_.load(std::memory_order_acquire);
      if (quit_.load(std::memory_order_acquire)) return;
      const Job j = job_;
      gemm(j.m, j.a, j.lda, *j.b, j.c, j.ldc, j.accumulate, j.half, j.b->panels, j.k);
      done_.store(seen, std::memory_order_release);
    }
  }

  Job job_{};
  std::atomic<long> go_{0}, done_{0};
  std::atomic<bool> quit_{false};
  const bool sleepy_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::thread helper_;  // last: started once the members above are made
};

bool two_cores() {
  cpu_set_t set;
  return sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) >= 2;
}

// The per-step matmul C (+)= A op(W), on two threads where ``team`` is given.
void step_gemm(Team* team, long m, const float* a, long lda, const Packed& b, float* c, long ldc, bool accumulate,
               long k = -1) {
  if (team != nullptr) {
    team->gemm2(m, a, lda, b, c, ldc, accumulate, k);
  } else {
    gemm(m, a, lda, b, c, ldc, accumulate, 0, b.panels, k);
  }
}

// A Team for a call whose per-step matmul is m x k x n, or none (also where no thread can be made:
// the call then runs on one thread, never fails for it). ``beside``: the call has work for a helper
// beside its steps (Beside, below), which keeps the second core from kParallelMacs itself: a
// Flax LSTM model of two layers of 256, B 32 (B 4 N1 N1 = 2^23), trained 1.71x Flax's steps/s at
// 0.53x its temp memory that way against 1.54x at 0.64x with the team (benchmarks/nnx_speed.py,
// one run each); its short blocks (gates="recompute") ran faster with the team.
std::unique_ptr<Team> team_for(long m, long k, long n, bool sleepy = false, bool beside = false) {
  static const bool can = two_cores();
  if (!can || m * k * n < kParallelMacs + (beside ? 1 : 0)) return nullptr;
  try {
    return std::make_unique<Team>(sleepy);
  } catch (const std::exception&) {
    return nullptr;
  }
}

// exp(x) = 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2, p the Taylor polynomial of degree 6 (relative
// error below 2e-7). Written without branches or calls so that the compiler vectorizes the row loops.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = x - n * 0.693359375f;                                           // ln2 in two parts
  r = r + n * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

// tanh(x) = (e - 1) / (e + 1), e = exp(2x), and its odd Taylor series near 0 (where e - 1 cancels).
inline float fast_tanh(float x) {
  const float e = fast_exp(2.0f * x);
  const float far = (e - 1.0f) / (e + 1.0f);
  const float x2 = x * x;
  const float near = x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  return std::fabs(x) < 0.0625f ? near : far;
}

// One row of the forward step: Q (the pre-activations, overwritten by the gates), c(t-1) -> h, c.
void forward_row(float* __restrict qi, float* __restrict qf, float* __restrict qg, float* __restrict qo,
                 const float* __restrict c_prev, float* __restrict h, float* __restrict c, long n) {
  for (long j = 0; j < n; ++j) {
    const float i = sigmoid(qi[j]), f = sigmoid(qf[j]), g = fast_tanh(qg[j]), o = sigmoid(qo[j]);
    const float c_new = f * c_prev[j] + i * g;
    qi[j] = i;
    qf[j] = f;
    qg[j] = g;
    qo[j] = o;
    c[j] = c_new;
    h[j] = o * fast_tanh(c_new);
  }
}

// One row of the reverse step: dh = above + dh_carry; writes dG(t) and the new dc carry in place,
// and (||dh(t)||, ||dc_total(t)||) -- the norms cells.lstm.reverse returns -- into norm[0], norm[1].
// di .. dout may be gi .. go themselves (the caller's gates buffer overwritten by dG(t): element j of
// each is read before it is written, and the simd loop has no dependence across j).
void reverse_row(const float* gi, const float* gf, const float* gg, const float* go, const float* __restrict c,
                 const float* __restrict c_prev, const float* __restrict above, const float* __restrict dh_carry,
                 float* __restrict dc, float* di, float* df, float* dgg, float* dout, float* __restrict dh_keep,
                 float* __restrict norm, long n) {
  float sh = 0.0f, sc = 0.0f;
#pragma omp simd reduction(+ : sh, sc)
  for (long j = 0; j < n; ++j) {
    const float i = gi[j], f = gf[j], g = gg[j], o = go[j];
    const float tc = fast_tanh(c[j]);
    const float dh = above[j] + dh_carry[j];
    const float dct = dc[j] + dh * o * (1.0f - tc * tc);
    di[j] = dct * g * i * (1.0f - i);
    df[j] = dct * c_prev[j] * f * (1.0f - f);
    dgg[j] = dct * i * (1.0f - g * g);
    dout[j] = dh * tc * o * (1.0f - o);
    dc[j] = dct * f;
    dh_keep[j] = dh;
    sh += dh * dh;
    sc += dct * dct;
  }
  norm[0] = std::sqrt(sh);
  norm[1] = std::sqrt(sc);
}

// Large output buffers arrive as fresh pages on most calls (glibc returns big blocks to the system
// when they are freed): asking for transparent huge pages before the first write makes one page
// fault per 2 MiB instead of one per 4 KiB where the system's setting is "madvise" (a hint only:
// the 2 MiB-aligned inside of the buffer, nothing where it is smaller; failures are ignored).
// On a 2-core Xeon with THP "madvise" the default bptt call ran 0.99-1.29x (LSTM) and 0.92-1.24x
// (GRU) as fast at three gated shapes (two A/B runs in separate processes; benchmarks/README.md).
void advise_huge(void* p, size_t bytes) {
  constexpr uintptr_t kHuge = 2u << 20;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1), hi = (a + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
}

ffi::Error check_dims(bool ok, const char* what) {
  return ok ? ffi::Error::Success() : ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

// The reverse call's dWh = sum_t h(t-1)^T dV(t) [N, G N], summed as the steps are walked: each step's
// rows are gathered into a chunk of about kChunkRows rows (h(t-1) transposed, dV(t) packed in
// panels as the per-step matmul's weights), and each full chunk is one matmul dWh += h^T dV with
// the per-step matmul's tiles and team. The rows come while they are in cache, and neither a
// shifted copy of the states nor the [C, B, G N] dV array is made for XLA's dot.
constexpr long kChunkRows = 256;

class OuterSums {
 public:
  OuterSums(long n, long width, long batch, float* dw)
      : n_(n), width_(width), cap_(std::max(1L, kChunkRows / batch) * batch), dw_(dw) {
    packed_.k = cap_;
    packed_.n = width;
    packed_.panels = (width + kPanel - 1) / kPanel;
    packed_.data.assign(static_cast<size_t>(packed_.panels * cap_ * kPanel), 0.0f);
    ht_.assign(static_cast<size_t>(n * cap_), 0.0f);
    std::fill(dw, dw + n * width, 0.0f);
  }

  // Adds one step's rows: h(t-1) [rows, N] (row stride ldh) and dV(t) [rows, G N] (row stride ldv).
  void add(Team* team, long rows, const float* h, long ldh, const float* dv, long ldv) {
    for (long b = 0; b < rows; ++b) {
      const long kk = filled_ + b;
      for (long r = 0; r < n_; ++r) ht_[r * cap_ + kk] = h[b * ldh + r];
      const float* src = dv + b * ldv;
      for (long q = 0; q < packed_.panels; ++q) {
        const long cols = std::min(kPanel, width_ - q * kPanel);
        std::memcpy(packed_.data.data() + (q * cap_ + kk) * kPanel, src + q * kPanel, sizeof(float) * cols);
      }
    }
    filled_ += rows;
    if (filled_ + rows > cap_) flush(team);
  }

  // Adds the rows gathered so far to dWh (call once after the last step).
  void flush(Team* team) {
    if (filled_ == 0) return;
    step_gemm(team, n_, ht_.data(), cap_, packed_, dw_, width_, true, filled_);
    filled_ = 0;
  }

 private:
  long n_, width_, cap_, filled_ = 0;
  float* dw_;
  Packed packed_;          // dV rows of the chunk, [panels][cap][kPanel]
  std::vector<float> ht_;  // h(t-1) of the chunk, transposed: [N, cap]
};

// C [R, cols] += A^T B over k rows, A [k, R] with row stride lda (A^T's rows are A's columns: the
// weight-gradient sums X^T dA of a chunk of rows) and B [k, kPanel] with row stride ldb, neither
// packed (a chunk is read once per sum, while it is still in cache); only C's first cols columns.
template <int R>
void tile_tn(const float* a, long lda, const float* b, long ldb, long k, float* c, long ldc, long cols) {
  Vec s[R][2] = {};
  for (long kk = 0; kk < k; ++kk) {
    const Vec b0 = load(b + kk * ldb), b1 = load(b + kk * ldb + kLanes);
    for (int r = 0; r < R; ++r) {
      const float x = a[kk * lda + r];
      s[r][0] += x * b0;
      s[r][1] += x * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    float sum[kPanel];
    std::memcpy(sum, &s[r][0], sizeof(Vec));
    std::memcpy(sum + kLanes, &s[r][1], sizeof(Vec));
    float* cr = c + r * ldc;
    for (long j = 0; j < cols; ++j) cr[j] += sum[j];
  }
}

// C [m, n] += A^T B, A [k, m] (row stride lda), B [k, n] (row stride ldb): panels of kPanel columns
// outside, blocks of kRows rows of C inside, the k rows in blocks of kDepth. Where C has enough rows
// and panels, a panel's block of B is copied into a contiguous block first, which then stays in L1
// for every block of rows, and A's block is laid out tile by tile: read in place, rows ldb floats
// apart (4 KiB for the LSTM's dA at N1 = 256) fall into a few of L1's sets and leave it at every
// block, and the sums ran at 0.6x the packed gemm's rate (a C++ microbenchmark on a Xeon, not
// committed: 256 x 1024 x 256, 104 GFLOP/s against 175; with the copies 150). A last, partial
// panel is always copied, zero-padded (no reads past B's rows).
void gemm_tn(long m, long n, long k, const float* a, long lda, const float* b, long ldb, float* c, long ldc) {
  const long tiles = (m + kRows - 1) / kRows;
  // The copies where they paid in that microbenchmark (m >= 96 rows of C, n >= 4 panels: 1.1-1.35x);
  // for fewer rows they cost more than they save (m = 64: 0.7-0.85x).
  const bool copy_a = m >= 96 && n >= 4 * kPanel, copy_b = copy_a;
  std::vector<float> pad(copy_b || n % kPanel != 0 ? static_cast<size_t>(std::min(kDepth, k) * kPanel) : 0);
  std::vector<float> at(copy_a ? static_cast<size_t>(tiles * std::min(kDepth, k) * kRows) : 0);
  for (long k0 = 0; k0 < k; k0 += kDepth) {
    const long kb = std::min(kDepth, k - k0);
    // A's block [kb, m] as [tiles][kb][kRows] (zero past m): each tile's rows of A^T read in order
    for (long i = 0; copy_a && i < tiles; ++i) {
      const long r0 = i * kRows, rs = std::min<long>(kRows, m - r0);
      float* dst = at.data() + i * kb * kRows;
      for (long kk = 0; kk < kb; ++kk) {
        const float* src = a + (k0 + kk) * lda + r0;
        for (long rr = 0; rr < kRows; ++rr) dst[kk * kRows + rr] = rr < rs ? src[rr] : 0.0f;
      }
    }
    for (long q = 0; q < n; q += kPanel) {
      const long cols = std::min(kPanel, n - q);
      const float* bq = b + k0 * ldb + q;
      long ldq = ldb;
      if (copy_b || cols < kPanel) {
        for (long kk = 0; kk < kb; ++kk) {
          float* dst = pad.data() + kk * kPanel;
          std::memcpy(dst, bq + kk * ldb, sizeof(float) * cols);
          if (cols < kPanel) std::memset(dst + cols, 0, sizeof(float) * (kPanel - cols));
        }
        bq = pad.data();
        ldq = kPanel;
      }
      for (long i = 0; i < tiles; ++i) {
        const long r = i * kRows;
        const float* ar = copy_a ? at.data() + i * kb * kRows : a + k0 * lda + r;
        const long la = copy_a ? kRows : lda;
        float* cr = c + r * ldc + q;
        switch (std::min<long>(kRows, m - r)) {
          case 8: tile_tn<8>(ar, la, bq, ldq, kb, cr, ldc, cols); break;
          case 7: tile_tn<7>(ar, la, bq, ldq, kb, cr, ldc, cols); break;
          case 6: tile_tn<6>(ar, la, bq, ldq, kb, cr, ldc, cols); break;
          case 5: tile_tn<5>(ar, la, bq, ldq, kb, cr, ldc, cols); break;
          case 4: tile_tn<4>(ar, la, bq, ldq, kb, cr, ldc, cols); break;
          case 3: tile_tn<3>(ar, la, bq, ldq, kb, cr, ldc, cols); break;
          case 2: tile_tn<2>(ar, la, bq, ldq, kb, cr, ldc, cols); break;
          default: tile_tn<1>(ar, la, bq, ldq, kb, cr, ldc, cols); break;
        }
      }
    }
  }
}

// Work beside a call's step loop, on a helper thread (the second core): the reverse call's
// weight-gradient sums, the forward call's projection X Wx. The work comes in chunks of steps, in
// the loop's order, and in chains (a sum, or a part of its columns) that take their chunks strictly
// in that order, each chunk one job run by whichever thread claims it. The reverse loop hands its
// rows over as it finishes them (ready) and joins in once its steps are done (finish); the forward
// loop awaits each chunk of projections before its steps, running it itself where the helper has
// not claimed it. Each chain is one serial sequence of the same jobs, so the results do not depend
// on which thread ran which chunk, nor on whether a helper ran at all.
class Beside {
 public:
  static constexpr int kMaxChains = 5;
  using Job = void (*)(void* context, int chain, long chunk);

  Beside(int chains, long chunks, Job job, void* context) : chains_(chains), chunks_(chunks), job_(job), context_(context) {}
  ~Beside() { finish(); }

  // Starts the helper where the process may use two cores (once; no thread: the loop's thread does
  // every job in finish).
  void start() {
    static const bool can = two_cores();
    if (!can || helper_.joinable()) return;
    try {
      helper_ = std::thread([this] { help(); });
    } catch (const std::exception&) {
    }
  }
  Beside(const Beside&) = delete;
  Beside& operator=(const Beside&) = delete;

  void ready(long chunks) { ready_.store(chunks, std::memory_order_release); }

  // Returns once chunk ``chunk`` of chain ``chain`` is done, running jobs meanwhile where there are.
  void await(int chain, long chunk) {
    while ((state_[chain].load(std::memory_order_acquire) >> 1) <= chunk)
      if (work() != kDid) relax();
  }

  // Runs the jobs left (all chunks ready), then waits for the helper's last job.
  void finish() {
    ready(chunks_);
    for (Got got; (got = work()) != kDone;)
      if (got == kNone) relax();
    if (helper_.joinable()) helper_.join();
  }

 private:
  enum Got { kDid, kNone, kDone };

  // Claims and runs the next ready chunk of one chain: kDid, kNone (nothing to claim now), kDone.
  Got work() {
    bool left = false;
    const long ready = ready_.load(std::memory_order_acquire);
    int pick = -1;
    long pick_s = 0;
    for (int i = 0; i < chains_; ++i) {  // the free chain furthest behind
      const long s = state_[i].load(std::memory_order_acquire);  // 2 next + (a job running)
      const long next = s >> 1;
      if (next >= chunks_) continue;
      left = true;
      if ((s & 1) == 0 && next < ready && (pick < 0 || s < pick_s)) {
        pick = i;
        pick_s = s;
      }
    }
    if (pick >= 0 && state_[pick].compare_exchange_strong(pick_s, pick_s | 1, std::memory_order_acq_rel)) {
      const int i = pick;
      const long next = pick_s >> 1;
      job_(context_, i, next);
      state_[i].store((next + 1) << 1, std::memory_order_release);
      return kDid;
    }
    return left ? kNone : kDone;
  }

  // The helper spins briefly for the next chunk, then sleeps 50 us at a time: yielding instead kept it
  // runnable beside the step loop and XLA's own threads on two cores, and in a process that had run
  // many XLA programs (benchmarks/tune_speed.py) the GRU's default call at (1000, 16, 64, 128, 64)
  // took 132 ms against 53 ms with the sleep (the same process, 2026-12-05).
  void help() {
    long idle = 0;
    for (Got got; (got = work()) != kDone;) {
      if (got == kDid) {
        idle = 0;
      } else if (++idle < 4000) {
        relax();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
  }

  const int chains_;
  const long chunks_;
  const Job job_;
  void* const context_;
  std::atomic<long> ready_{0};
  std::atomic<long> state_[kMaxChains] = {};
  std::thread helper_;  // last: started once the members above are made
};

// The forward call's X(t) Wx in chunks of ``per`` steps (one chain, chunk k = steps [k per, (k + 1)
// per)), into c (row stride ldc), made beside the steps where the per-step matmul has one thread.
struct Projection {
  const float* x;
  long n_in;
  const Packed* wx;
  float* c;
  long ldc, batch, steps, per;

  static void run(void* self, int, long chunk) {
    const auto& p = *static_cast<const Projection*>(self);
    const long t0 = chunk * p.per, t1 = std::min(p.steps, t0 + p.per);
    gemm((t1 - t0) * p.batch, p.x + t0 * p.batch * p.n_in, p.n_in, *p.wx, p.c + t0 * p.batch * p.ldc, p.ldc, false, 0,
         p.wx->panels);
  }

  long chunks() const { return (steps + per - 1) / per; }
};

// Whether a forward call with kept gates forms X Wx beside its steps: where the per-step matmul has
// no team (the second core is free), the steps make at least two chunks and the projection at
// least kBesideMacs multiply-adds (a thread's start costs tens of microseconds; below, one call's
// matmul on the team or this thread). Measured on a 2-core Xeon (benchmarks/native_parts.py), the
// LSTM's forward call at (100, 32, 64, 128): 4.3 ms against 5.9-6.9 ms with the projection first.
constexpr long kBesideMacs = 1L << 22;

bool projection_beside(const Team* team, const Projection& p) {
  return team == nullptr && p.chunks() >= 2 && p.steps * p.batch * p.n_in * p.wx->n >= kBesideMacs;
}

// X(t) Wx for every step of the call, [C B, N_in] x [N_in, G N] in one matmul into c (row stride
// ldc), on two threads where the per-step matmul already has a team or this one is large enough.
void project_all(Team* team, long rows, const float* x, long n_in, const Packed& wx, float* c, long ldc) {
  std::unique_ptr<Team> own;
  if (team == nullptr) own = team_for(rows, n_in, wx.n);
  step_gemm(team != nullptr ? team : own.get(), rows, x, n_in, wx, c, ldc, false);
}

// The weight gradients of a reverse call whose dA(t) rows are all kept (the LSTM's dG over its gate
// cache, the Elman cell's dZ1), summed chunk by chunk beside its steps (Beside): chunk k holds steps
// [C - (k + 1) per, C - k per) (the last chunk fewer), the loop's order. Four chains, each a half of
// the columns (so that two threads share what is left when the steps are done) of dWx += X^T dA with
// dbx (= dbh) += the column sums of dA (chains 0, 1) and of dWh += h(t-1)^T dA (chains 2, 3), with
// h(t-1) read from the states (s0 for step 0; h is the first N of each state row, sw floats apart:
// the LSTM's [h | c], the Elman cell's h); where dX is asked for, chain 4: dX(t) = dA(t) Wx^T, the
// chunk's rows. The LSTM's width is 4 N, the Elman cell's N.
struct RowSums {
  static constexpr int kChains = 4;
  const float *x, *s0, *ss, *dg;  // ss: h(t) in rows of hw floats (s0's rows: sw)
  long batch, n_in, n, width, sw, hw, steps, per;
  float *dwx = nullptr, *dwh = nullptr, *db = nullptr;
  const Packed* wxt = nullptr;  // Wx^T [4N, N_in], where dX is made here
  float* dx = nullptr;

  static void run(void* self, int chain, long chunk) {
    const auto& m = *static_cast<const RowSums*>(self);
    const long t1 = m.steps - chunk * m.per, t0 = std::max(0L, t1 - m.per);
    const long width = m.width, sw = m.sw, hw = m.hw, rows = (t1 - t0) * m.batch;
    if (chain == kChains) {
      gemm(rows, m.dg + t0 * m.batch * width, width, *m.wxt, m.dx + t0 * m.batch * m.n_in, m.n_in, false, 0,
           m.wxt->panels);
      return;
    }
    const long half = std::min(width, (width / 2 + kPanel - 1) / kPanel * kPanel);  // whole panels
    const long q0 = chain % 2 == 0 ? 0 : half, q1 = chain % 2 == 0 ? half : width;  // this chain's columns
    if (q1 <= q0) return;
    const float* dg = m.dg + t0 * m.batch * width + q0;
    if (chain < 2) {
      gemm_tn(m.n_in, q1 - q0, rows, m.x + t0 * m.batch * m.n_in, m.n_in, dg, width, m.dwx + q0, width);
      float* db = m.db + q0;
      for (long r = 0; r < rows; ++r)
        for (long j = 0; j < q1 - q0; ++j) db[j] += dg[r * width + j];
      return;
    }
    long skip = 0;  // rows of step 0, whose h(t-1) is s0
    if (t0 == 0) {
      skip = m.batch;
      gemm_tn(m.n, q1 - q0, m.batch, m.s0, sw, dg, width, m.dwh + q0, width);
    }
    if (rows > skip)
      gemm_tn(m.n, q1 - q0, rows - skip, m.ss + ((t0 > 0 ? t0 - 1 : 0) * m.batch) * hw, hw, dg + skip * width,
              width, m.dwh + q0, width);
  }
};

// A reverse call's sums beside its steps: zeroes dWx, dWh and db, packs Wx^T where dX is asked for
// (dx not null; into *wxt), and makes the helper's chains, started now unless the per-step matmul's
// team has the second core (then at the end, when the team is gone).
std::unique_ptr<Beside> begin_sums(RowSums& sums, float* dwx, float* dwh, float* db, const float* wx, float* dx,
                                   size_t dx_bytes, Packed* wxt, bool team) {
  sums.dwx = dwx;
  sums.dwh = dwh;
  sums.db = db;
  std::fill(dwx, dwx + sums.n_in * sums.width, 0.0f);
  std::fill(dwh, dwh + sums.n * sums.width, 0.0f);
  std::fill(db, db + sums.width, 0.0f);
  if (dx != nullptr) {  // dX = dA Wx^T too, a fifth chain
    *wxt = pack(wx, sums.n_in, sums.width, true);
    sums.wxt = wxt;
    sums.dx = dx;
    advise_huge(dx, dx_bytes);
  }
  const int chains = RowSums::kChains + (dx != nullptr ? 1 : 0);
  auto beside = std::make_unique<Beside>(chains, (sums.steps + sums.per - 1) / sums.per, &RowSums::run, &sums);
  if (!team) beside->start();
  return beside;
}

// The forward step loop split by batch rows: the rows of a call are independent sequences, so two
// threads can each run the whole loop for their half of the rows with no step-by-step handshake
// (the per-step team above splits each step's matmul and meets the other thread twice a step).
// Each half is a chain of jobs, one step each, in Beside's order: a thread takes the chain that is
// furthest behind, so where the helper does not run, this thread runs both halves. Each row's
// arithmetic is the one-thread loop's (a row's matmul sums do not depend on the rows beside it),
// so the results do not change. Made where the process may use two cores, the call has at least
// kSplitRows rows, its recurrence at least kBesideMacs multiply-adds, and the packed Wh fits in
// kSplitWeightBytes (each thread streams all of Wh every step: it should stay in the core's own
// cache; the per-step team reads half of it per thread). X Wx is formed first, on both threads.
// Measured on a 2-core Xeon: the LSTM config's layers (64, 32, 103 | 256, 256) 9.0 -> 5.5 ms and
// 9.3 -> 8.0 ms a forward call (native.py's SPLIT_ROWS has the rest); bptt_jax.core.native mirrors
// this rule (split_rows).
constexpr long kSplitRows = 16;
constexpr long kSplitWeightBytes = 1L << 20;

bool split_rows(long steps, long batch, long n, long width) {
  static const bool can = two_cores();
  return can && batch >= kSplitRows && steps * batch * n * width >= kBesideMacs &&
         n * width * static_cast<long>(sizeof(float)) <= kSplitWeightBytes;
}

// Rows [r0, r1) of a call's batch: the rows of chain g of ``groups``.
inline long group_row(long g, long groups, long batch) { return g * batch / groups; }

// Runs a split step loop (LstmSteps, GruSteps): one chain per group of rows, one job per step, every
// step ready at once; returns when all are done.
template <typename Steps>
void run_halves(Steps& loop, long steps) {
  Beside halves(static_cast<int>(loop.groups), steps, &Steps::run, &loop);
  halves.ready(steps);
  halves.start();
  halves.finish();
}

// One step of the LSTM's forward loop for rows [r0, r1): Q (+)= X(t) Wx where not kept, + bias,
// += h(t-1) Wh, then the gate arithmetic row by row (padding rows hold their state). The states go
// to h(t) at hs + row hw and c(t) at cs + row cw: [h | c] rows of one buffer (hw = cw = 2N, cs = hs + N)
// or h and c apart (hw = cw = N).
struct LstmSteps {
  const float *x, *bias, *s0;
  const bool* valid;
  float *hs, *cs, *q;
  const Packed *xp, *wp;
  long steps, batch, n_in, n, groups, hw, cw;
  bool keep;

  void step(long t, long r0, long r1, Team* team) const {
    const long width = 4 * n, sw = 2 * n, rows = r1 - r0;
    const float* h_prev = t == 0 ? s0 + r0 * sw : hs + ((t - 1) * batch + r0) * hw;
    const float* c_prev = t == 0 ? s0 + r0 * sw + n : cs + ((t - 1) * batch + r0) * cw;
    const long hp = t == 0 ? sw : hw, cp = t == 0 ? sw : cw;  // the rows' strides of h(t-1), c(t-1)
    float* qt = q + ((keep ? t * batch : 0) + r0) * width;
    float* h = hs + (t * batch + r0) * hw;
    float* c = cs + (t * batch + r0) * cw;
    if (!keep) step_gemm(team, rows, x + (t * batch + r0) * n_in, n_in, *xp, qt, width, false);  // X(t) Wx
    for (long b = 0; b < rows; ++b)
      for (long j = 0; j < width; ++j) qt[b * width + j] += bias[j];
    step_gemm(team, rows, h_prev, hp, *wp, qt, width, true);  // Q += h(t-1) Wh
    for (long b = 0; b < rows; ++b) {
      float* qb = qt + b * width;
      if (valid[t * batch + r0 + b]) {
        forward_row(qb, qb + n, qb + 2 * n, qb + 3 * n, c_prev + b * cp, h + b * hw, c + b * cw, n);
      } else {  // padding holds the state
        std::memcpy(h + b * hw, h_prev + b * hp, sizeof(float) * n);
        std::memcpy(c + b * cw, c_prev + b * cp, sizeof(float) * n);
      }
    }
  }

  static void run(void* self, int g, long t) {
    const auto& m = *static_cast<const LstmSteps*>(self);
    m.step(t, group_row(g, m.groups, m.batch), group_row(g + 1, m.groups, m.batch), nullptr);
  }
};

// xs [C, B, N_in] (the layer's input), wx [N_in, 4N], wh [N, 4N], bias [4N] (bx + bh), s0 [B, 2N] =
// [h | c], valid [C, B]
//   -> ss [C, B, 2N] the states [h(t) | c(t)] with cs empty, or ss [C, B, N] h(t) and cs [C, B, N]
//      c(t) apart; gates [C or 1, B, 4N] (i | f | g | o; one step's
//      scratch when the caller does not keep them). Q(t) = X(t) Wx + bias + h(t-1) Wh, overwritten
//      by the gates: kept, X Wx is formed for all C steps first, in one matmul into the gates' own
//      buffer (no [C, B, 4N] array of pre-activations beside them); otherwise step by step.
ffi::Error LstmForwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> wx, ffi::Buffer<ffi::F32> wh,
                           ffi::Buffer<ffi::F32> bh, ffi::Buffer<ffi::F32> s0, ffi::Buffer<ffi::PRED> valid,
                           ffi::ResultBuffer<ffi::F32> ss, ffi::ResultBuffer<ffi::F32> cs,
                           ffi::ResultBuffer<ffi::F32> gates) {
  const auto d = xs.dimensions();
  const auto wd = wh.dimensions();
  if (d.size() != 3 || wd.size() != 2 || wd[1] != 4 * wd[0])
    return check_dims(false, "lstm forward: xs must be [C, B, N_in], wh [N, 4 N]");
  const long steps = d[0], batch = d[1], n_in = d[2], n = wd[0], width = 4 * n;
  const auto gd = gates->dimensions();
  const bool keep = gd[0] == steps;
  const bool apart = cs->element_count() != 0;
  const size_t states = static_cast<size_t>(steps * batch * n);
  if (auto e = check_dims(wx.dimensions().size() == 2 && wx.dimensions()[0] == n_in && wx.dimensions()[1] == width &&
                              bh.element_count() == static_cast<size_t>(width) &&
                              s0.element_count() == static_cast<size_t>(batch * 2 * n) &&
                              valid.element_count() == static_cast<size_t>(steps * batch) &&
                              ss->element_count() == (apart ? states : 2 * states) &&
                              (!apart || cs->element_count() == states) &&
                              gates->element_count() == static_cast<size_t>((keep ? steps : 1) * batch * width),
                          "lstm forward: inconsistent shapes");
      e.failure())
    return e;
  const float* X = xs.typed_data();
  const float* bias = bh.typed_data();
  const bool* V = valid.typed_data();
  float* S = ss->typed_data();
  float* C = apart ? cs->typed_data() : S + n;
  float* Q = gates->typed_data();
  advise_huge(S, ss->size_bytes());
  if (apart) advise_huge(C, cs->size_bytes());
  advise_huge(Q, gates->size_bytes());
  const Packed xp = pack(wx.typed_data(), n_in, width, false);  // Wx [N_in, 4N]
  const Packed wp = pack(wh.typed_data(), n, width, false);     // Wh [N, 4N]
  const long stride = apart ? n : 2 * n;
  LstmSteps loop{X, bias, s0.typed_data(), V, S, C, Q, &xp, &wp, steps, batch, n_in, n, 2, stride, stride, keep};
  if (split_rows(steps, batch, n, width)) {  // X Wx on both threads first, then a half of the rows each
    if (keep) project_all(nullptr, steps * batch, X, n_in, xp, Q, width);
    run_halves(loop, steps);
    return ffi::Error::Success();
  }
  Projection proj{X, n_in, &xp, Q, width, batch, steps, std::max(1L, kChunkRows / batch)};
  const auto team = team_for(batch, n, width, false, keep && projection_beside(nullptr, proj));
  std::unique_ptr<Beside> ahead;  // X Wx chunk by chunk beside the steps (projection_beside)
  const bool beside = keep && projection_beside(team.get(), proj);
  if (keep && !beside) project_all(team.get(), steps * batch, X, n_in, xp, Q, width);
  if (beside) {
    ahead = std::make_unique<Beside>(1, proj.chunks(), &Projection::run, &proj);
    ahead->ready(proj.chunks());
    ahead->start();
  }
  for (long t = 0; t < steps; ++t) {
    if (ahead && t % proj.per == 0) ahead->await(0, t / proj.per);
    loop.step(t, 0, batch, team.get());
  }
  return ffi::Error::Success();
}

// dhs [C, B, N] (the gradient reaching h(t) from outside), gates [C, B, 4N], s0 [B, 2N] (the state
// entering the first step; s(t-1) is read from ss for t > 0), ss [C, B, 2N] (s(t)), or [C, B, N]
// c(t) alone (the recursion reads c, not h; the sums read h(t-1) from hs [C, B, N] where it is not
// empty, so where the call makes sums with ss c(t) alone, hs is h(t)), wh [N, 4N],
// valid [C, B], ds_init [B, 2N], xs [C, B, N_in], wx [N_in, 4N]
//   -> dgs [C, B, 4N] (dG(t) = dA(t)), ds_m1 [B, 2N] (dDIV/dh(-1) | dDIV/dc(-1)), norms [C, B, 2]
//      (||dDIV/dh(t)||, ||dDIV/dc(t)||: c(t)'s total gradient, the carry's where a step is padding),
//      and where dwx, dwh, db are not empty the weight gradients (RowSums, beside the steps), with
//      dxs [C, B, N_in] not empty also dX = dG Wx^T.
//      dgs may be the gates' own buffer (native.py aliases them): a row's gates are read before its
//      dG is written, and no later step reads them.
ffi::Error LstmReverseImpl(ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> gates, ffi::Buffer<ffi::F32> s0,
                           ffi::Buffer<ffi::F32> ss, ffi::Buffer<ffi::F32> wh, ffi::Buffer<ffi::PRED> valid,
                           ffi::Buffer<ffi::F32> ds_init, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> wx,
                           ffi::Buffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> dgs, ffi::ResultBuffer<ffi::F32> ds_m1,
                           ffi::ResultBuffer<ffi::F32> norms, ffi::ResultBuffer<ffi::F32> dwx,
                           ffi::ResultBuffer<ffi::F32> dwh, ffi::ResultBuffer<ffi::F32> db,
                           ffi::ResultBuffer<ffi::F32> dxs, int32_t batch_major) {
  const auto d = gates.dimensions();
  if (d.size() != 3 || d[2] % 4 != 0) return check_dims(false, "lstm reverse: gates must be [C, B, 4 N]");
  const long steps = d[0], batch = d[1], width = d[2], n = width / 4, sw = 2 * n;
  const long n_in = xs.dimensions().size() == 3 ? xs.dimensions()[2] : 0;
  const bool sum_here = dwh->element_count() != 0;
  const size_t states = static_cast<size_t>(steps * batch * sw);
  const bool c_only = ss.element_count() == states / 2;  // c(t) apart from h(t): [C, B, N]
  const bool apart = hs.element_count() != 0;            // and h(t) in hs [C, B, N] (read by the sums)
  const long cw = c_only ? n : sw;                       // c(t)'s row stride in ss
  if (auto e = check_dims(dhs.element_count() == static_cast<size_t>(steps * batch * n) &&
                              s0.element_count() == static_cast<size_t>(batch * sw) &&
                              (ss.element_count() == states || (c_only && (apart || !sum_here))) &&
                              (!apart || (c_only && hs.element_count() == states / 2)) &&
                              wh.element_count() == static_cast<size_t>(n * width) &&
                              valid.element_count() == static_cast<size_t>(steps * batch) &&
                              ds_init.element_count() == static_cast<size_t>(batch * sw) &&
                              norms->element_count() == static_cast<size_t>(steps * batch * 2) &&
                              xs.dimensions().size() == 3 && xs.dimensions()[0] == steps &&
                              xs.dimensions()[1] == batch &&
                              (sum_here ? dwx->element_count() == static_cast<size_t>(n_in * width) &&
                                              dwh->element_count() == static_cast<size_t>(n * width) &&
                                              db->element_count() == static_cast<size_t>(width)
                                        : dwx->element_count() == 0 && db->element_count() == 0) &&
                              (dxs->element_count() == 0 ||
                               (sum_here && dxs->element_count() == static_cast<size_t>(steps * batch * n_in) &&
                                wx.element_count() == static_cast<size_t>(n_in * width))) &&
                              (!batch_major || (!sum_here && dgs->element_count() == states * 2)),
                          "lstm reverse: inconsistent shapes");
      e.failure())
    return e;
  const float* DH = dhs.typed_data();
  const float* G = gates.typed_data();
  const float* S0 = s0.typed_data();
  const float* S = ss.typed_data();
  const float* HS = hs.typed_data();
  const float* W = wh.typed_data();
  const bool* V = valid.typed_data();
  float* DG = dgs->typed_data();
  float* NRM = norms->typed_data();
  float* carry = ds_m1->typed_data();  // [dh_carry | dc] per row, updated step by step
  std::memcpy(carry, ds_init.typed_data(), sizeof(float) * batch * sw);
  std::vector<float> dh_keep(batch * n);
  const Packed wt = pack(W, n, width, true);  // Wh^T [4N, N]
  auto team = team_for(batch, width, n, false, sum_here);
  // The weight-gradient sums, beside the steps: chunks of about kChunkRows rows, in the loop's order
  RowSums sums{xs.typed_data(), S0,    apart ? HS : S, DG, batch, n_in, n, width, sw, apart ? n : sw, steps,
               std::max(1L, kChunkRows / batch)};
  Packed wxt;  // Wx^T, where dX is made here
  std::unique_ptr<Beside> beside;
  if (sum_here)
    beside = begin_sums(sums, dwx->typed_data(), dwh->typed_data(), db->typed_data(), wx.typed_data(),
                        dxs->element_count() != 0 ? dxs->typed_data() : nullptr, dxs->size_bytes(), &wxt,
                        team != nullptr);
  // batch_major: dG written row by row to [B, C, 4N] (not over the gates), the step's rows first
  // into a contiguous scratch for the matmul
  std::vector<float> dg_step(batch_major ? batch * width : 0);
  for (long t = steps - 1; t >= 0; --t) {
    const long row0 = t * batch;
    float* dg = batch_major ? dg_step.data() : DG + row0 * width;
    for (long b = 0; b < batch; ++b) {
      const float* gb = G + (row0 + b) * width;
      const float* c_t = S + (row0 + b) * cw + (c_only ? 0 : n);
      const float* c_tm1 = t == 0 ? S0 + b * sw + n : c_t - batch * cw;  // c(t-1)
      float* cb = carry + b * sw;
      float* db = dg + b * width;
      float* keep = dh_keep.data() + b * n;
      if (V[row0 + b]) {
        reverse_row(gb, gb + n, gb + 2 * n, gb + 3 * n, c_t, c_tm1, DH + (row0 + b) * n, cb, cb + n, db, db + n,
                    db + 2 * n, db + 3 * n, keep, NRM + (row0 + b) * 2, n);
      } else {  // padding: dG = 0, the carry passes on with dH_above added to dh
        const float* above = DH + (row0 + b) * n;
        float sh = 0.0f, sc = 0.0f;
        for (long j = 0; j < n; ++j) {
          keep[j] = above[j] + cb[j];
          sh += keep[j] * keep[j];
          sc += cb[n + j] * cb[n + j];
        }
        NRM[(row0 + b) * 2] = std::sqrt(sh);
        NRM[(row0 + b) * 2 + 1] = std::sqrt(sc);
        std::memset(db, 0, sizeof(float) * width);
      }
    }
    if (batch_major)
      for (long b = 0; b < batch; ++b) std::memcpy(DG + (b * steps + t) * width, dg + b * width, sizeof(float) * width);
    // dh_carry = dG(t) Wh^T, [B, 4N] x [N, 4N]^T, into the carry's h half (leading dimension 2N).
    step_gemm(team.get(), batch, dg, width, wt, carry, sw, false);
    for (long b = 0; b < batch; ++b)
      if (!V[row0 + b]) std::memcpy(carry + b * sw, dh_keep.data() + b * n, sizeof(float) * n);
    if (beside && (steps - t) % sums.per == 0) beside->ready((steps - t) / sums.per);
  }
  if (beside) {
    team.reset();
    beside->start();
    beside->finish();
  }
  return ffi::Error::Success();
}


// One row of the GRU's forward step: from X(t) Wx, bx, V(t) and h(t-1) -> h(t) and the gate cache
// [r | z | n] (kVn: [r | z | n | V_n], gru.recur_cache's). xw may be the cache row itself (X(t) Wx
// formed in its first 3N columns): element j of each part is read before it is written, and no j
// reads another's.
template <bool kVn>
void gru_forward_row(const float* xw, const float* __restrict bx, const float* __restrict v,
                     const float* __restrict h_prev, float* __restrict h, float* cache, long n) {
#pragma omp simd
  for (long j = 0; j < n; ++j) {
    const float ar = xw[j] + bx[j], az = xw[n + j] + bx[n + j], an = xw[2 * n + j] + bx[2 * n + j];
    const float r = sigmoid(ar + v[j]), z = sigmoid(az + v[n + j]);
    const float nn = fast_tanh(an + r * v[2 * n + j]);
    h[j] = (1.0f - z) * nn + z * h_prev[j];
    cache[j] = r;
    cache[n + j] = z;
    cache[2 * n + j] = nn;
    if (kVn) cache[3 * n + j] = v[2 * n + j];
  }
}

// One row of the GRU's reverse step: from the cache row's [r | z | n] and V_n(t) = h(t-1) W_hn + b_hn
// (vn), dh = above + carry; writes dA(t), dV(t), carry = dh z (the recurrent matmul's part is added
// after the row loop) and returns ||dh(t)||.
float gru_reverse_row(const float* __restrict cache, const float* __restrict vn, const float* __restrict h_prev,
                      const float* __restrict above, float* __restrict carry, float* __restrict da,
                      float* __restrict dv, long n) {
  float sh = 0.0f;
#pragma omp simd reduction(+ : sh)
  for (long j = 0; j < n; ++j) {
    const float r = cache[j], z = cache[n + j], nn = cache[2 * n + j];
    const float dh = above[j] + carry[j];
    const float dan = dh * (1.0f - z) * (1.0f - nn * nn);
    const float dar = dan * vn[j] * r * (1.0f - r);
    const float daz = dh * (h_prev[j] - nn) * z * (1.0f - z);
    da[j] = dar;
    da[n + j] = daz;
    da[2 * n + j] = dan;
    dv[j] = dar;
    dv[n + j] = daz;
    dv[2 * n + j] = dan * r;
    carry[j] = dh * z;
    sh += dh * dh;
  }
  return std::sqrt(sh);
}

// One step of the GRU's forward loop for rows [r0, r1) (split_rows): X(t) Wx where not kept,
// V(t) = h(t-1) Wh + bh, then the gate arithmetic row by row (padding rows hold h). v and xw: one
// step's scratch rows of the whole batch (a chain writes only its own rows).
struct GruSteps {
  const float *x, *bias_x, *bias, *h0;
  const bool* valid;
  float *hs, *cache, *v, *xw;
  const Packed *xp, *wp;
  long steps, batch, n_in, n, groups;
  bool keep;
  long cw;  // a cache row's width: 3N ([r | z | n]) or 4N (with V_n)

  void step(long t, long r0, long r1, Team* team) const {
    const long width = 3 * n, rows = r1 - r0;
    const float* prev = t == 0 ? h0 + r0 * n : hs + ((t - 1) * batch + r0) * n;
    float* h = hs + (t * batch + r0) * n;
    float* k = cache + ((keep ? t * batch : 0) + r0) * cw;
    float* vt = v + r0 * width;
    if (!keep) step_gemm(team, rows, x + (t * batch + r0) * n_in, n_in, *xp, xw + r0 * width, width, false);
    for (long b = 0; b < rows; ++b) std::memcpy(vt + b * width, bias, sizeof(float) * width);
    step_gemm(team, rows, prev, n, *wp, vt, width, true);
    for (long b = 0; b < rows; ++b) {
      const float* xwb = keep ? k + b * cw : xw + (r0 + b) * width;
      if (cw == 4 * n) {
        gru_forward_row<true>(xwb, bias_x, vt + b * width, prev + b * n, h + b * n, k + b * cw, n);
      } else {
        gru_forward_row<false>(xwb, bias_x, vt + b * width, prev + b * n, h + b * n, k + b * cw, n);
      }
      if (!valid[t * batch + r0 + b]) std::memcpy(h + b * n, prev + b * n, sizeof(float) * n);  // padding holds h
    }
  }

  static void run(void* self, int g, long t) {
    const auto& m = *static_cast<const GruSteps*>(self);
    m.step(t, group_row(g, m.groups, m.batch), group_row(g + 1, m.groups, m.batch), nullptr);
  }
};

// xs [C, B, N_in] (the layer's input), wx [N_in, 3N], bx [3N], wh [N, 3N], bh [3N], h0 [B, N], valid [C, B]
//   -> hs [C, B, N], cache [C or 1, B, 3N or 4N] ([r | z | n], or [r | z | n | V_n] where 4N wide;
//      one step's scratch when not kept). A(t) = X(t) Wx + bx: kept, X Wx is formed for all C steps
//      first, in one matmul into the first 3N columns of each cache row (no [C, B, 3N] array beside
//      the cache); otherwise step by step. Without V_n the cache is a quarter smaller: the reverse
//      call forms V_n(t) = h(t-1) W_hn + b_hn again from the states, a chunk of steps at a time.
ffi::Error GruForwardImpl(ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> wx, ffi::Buffer<ffi::F32> bx,
                          ffi::Buffer<ffi::F32> wh, ffi::Buffer<ffi::F32> bh, ffi::Buffer<ffi::F32> h0,
                          ffi::Buffer<ffi::PRED> valid, ffi::ResultBuffer<ffi::F32> hs,
                          ffi::ResultBuffer<ffi::F32> cache) {
  const auto d = xs.dimensions();
  const auto wd = wh.dimensions();
  if (d.size() != 3 || wd.size() != 2 || wd[1] != 3 * wd[0])
    return check_dims(false, "gru forward: xs must be [C, B, N_in], wh [N, 3 N]");
  const long steps = d[0], batch = d[1], n_in = d[2], n = wd[0], width = 3 * n;
  const bool keep = cache->dimensions()[0] == steps;
  const long cw = cache->dimensions().size() == 3 ? cache->dimensions()[2] : 0;
  if (auto e = check_dims(wx.dimensions().size() == 2 && wx.dimensions()[0] == n_in && wx.dimensions()[1] == width &&
                              bx.element_count() == static_cast<size_t>(width) &&
                              bh.element_count() == static_cast<size_t>(width) &&
                              h0.element_count() == static_cast<size_t>(batch * n) &&
                              valid.element_count() == static_cast<size_t>(steps * batch) &&
                              hs->element_count() == static_cast<size_t>(steps * batch * n) &&
                              (cw == 3 * n || cw == 4 * n) &&
                              cache->element_count() == static_cast<size_t>((keep ? steps : 1) * batch * cw),
                          "gru forward: inconsistent shapes");
      e.failure())
    return e;
  const float* X = xs.typed_data();
  const float* bias_x = bx.typed_data();
  const float* bias = bh.typed_data();
  const bool* V = valid.typed_data();
  float* H = hs->typed_data();
  float* K = cache->typed_data();
  advise_huge(H, hs->size_bytes());
  advise_huge(K, cache->size_bytes());
  std::vector<float> v(batch * width);                          // V(t) = h(t-1) Wh + bh
  std::vector<float> xw(keep ? 0 : batch * width);              // X(t) Wx, step by step when not kept
  const Packed xp = pack(wx.typed_data(), n_in, width, false);  // Wx [N_in, 3N]
  const Packed wp = pack(wh.typed_data(), n, width, false);     // Wh [N, 3N]
  GruSteps loop{X, bias_x, bias, h0.typed_data(), V, H, K, v.data(), xw.data(), &xp, &wp, steps, batch, n_in, n,
                2, keep, cw};
  if (split_rows(steps, batch, n, width)) {  // X Wx on both threads first, then a half of the rows each
    if (keep) project_all(nullptr, steps * batch, X, n_in, xp, K, cw);
    run_halves(loop, steps);
    return ffi::Error::Success();
  }
  Projection proj{X, n_in, &xp, K, cw, batch, steps, std::max(1L, kChunkRows / batch)};
  const auto team = team_for(batch, n, width, false, keep && projection_beside(nullptr, proj));
  std::unique_ptr<Beside> ahead;  // X Wx chunk by chunk beside the steps (projection_beside)
  const bool beside = keep && projection_beside(team.get(), proj);
  if (keep && !beside) project_all(team.get(), steps * batch, X, n_in, xp, K, cw);
  if (beside) {
    ahead = std::make_unique<Beside>(1, proj.chunks(), &Projection::run, &proj);
    ahead->ready(proj.chunks());
    ahead->start();
  }
  for (long t = 0; t < steps; ++t) {
    if (ahead && t % proj.per == 0) ahead->await(0, t / proj.per);
    loop.step(t, 0, batch, team.get());
  }
  return ffi::Error::Success();
}

// The GRU reverse call's weight gradients, summed chunk by chunk beside its steps (Beside), chunks
// as RowSums's. Chains 0, 1 (column halves): dWx += X^T dA and dbx += the column sums of dA;
// chains 2, 3: dWh += h(t-1)^T dV and dbh += the column sums of dV, with dV read from a ring of
// kRing chunk slots (the loop writes chunk k's dV into slot k mod kRing once chunk k - kRing's
// chains 2 and 3 are done): no [C, B, 3N] dV array.
struct GruSums {
  static constexpr int kChains = 4;
  static constexpr long kRing = 4;
  const float *x, *h0, *hs;
  float* da;    // dA [C, B, 3N], or (where dX is made here) a ring as dV's
  float* ring;  // dV: [kRing][per B][3N]
  long batch, n_in, n, steps, per;
  float *dwx, *dbx, *dwh, *dbh;
  const Packed* wxt = nullptr;  // Wx^T [3N, N_in], where dX is made here (chain 4)
  float* dx = nullptr;

  float* slot(long chunk) const { return ring + (chunk % kRing) * per * batch * 3 * n; }
  // chunk k's dA rows (steps t0 .. in time order)
  float* da_rows(long chunk, long t0) const {
    return dx != nullptr ? da + (chunk % kRing) * per * batch * 3 * n : da + t0 * batch * 3 * n;
  }

  static void run(void* self, int chain, long chunk) {
    const auto& m = *static_cast<const GruSums*>(self);
    const long t1 = m.steps - chunk * m.per, t0 = std::max(0L, t1 - m.per);
    const long width = 3 * m.n, rows = (t1 - t0) * m.batch;
    if (chain == kChains) {
      gemm(rows, m.da_rows(chunk, t0), width, *m.wxt, m.dx + t0 * m.batch * m.n_in, m.n_in, false, 0, m.wxt->panels);
      return;
    }
    const long half = std::min(width, (width / 2 + kPanel - 1) / kPanel * kPanel);  // whole panels
    const long q0 = chain % 2 == 0 ? 0 : half, q1 = chain % 2 == 0 ? half : width;  // this chain's columns
    if (q1 <= q0) return;
    const float* src;
    float* db;
    if (chain < 2) {
      src = m.da_rows(chunk, t0) + q0;
      db = m.dbx + q0;
      gemm_tn(m.n_in, q1 - q0, rows, m.x + t0 * m.batch * m.n_in, m.n_in, src, width, m.dwx + q0, width);
    } else {
      src = m.slot(chunk) + q0;  // rows of steps t0 .. t1 - 1, in time order
      db = m.dbh + q0;
      long skip = 0;  // rows of step 0, whose h(t-1) is h0
      if (t0 == 0) {
        skip = m.batch;
        gemm_tn(m.n, q1 - q0, m.batch, m.h0, m.n, src, width, m.dwh + q0, width);
      }
      if (rows > skip)
        gemm_tn(m.n, q1 - q0, rows - skip, m.hs + (t0 > 0 ? t0 - 1 : 0) * m.batch * m.n, m.n, src + skip * width,
                width, m.dwh + q0, width);
    }
    for (long r = 0; r < rows; ++r)
      for (long j = 0; j < q1 - q0; ++j) db[j] += src[r * width + j];
  }
};

// dhs [C, B, N], cache [C, B, 3N or 4N] ([r | z | n], or with V_n), h0 [B, N] (the state entering the
// first step; h(t-1) is read from hs for t > 0), hs [C, B, N] (h(t)), wh [N, 3N], valid [C, B],
// dh_init [B, N], bh [3N] (read where the cache has no V_n: V_n(t) = h(t-1) W_hn + b_hn is then formed
// again from the states, one chunk of steps in one matmul as the loop enters it)
//   -> das [C, B, 3N] (dA(t)), and either dvs [C, B, 3N] (dV(t); dwh, dbh, dwx, dbx empty) or, with
//      dvs empty, dwh [N, 3N] (sum_t h(t-1)^T dV(t)) and dbh [3N] (sum_t dV(t)): dV(t) then lives
//      one step in a scratch (or a chunk in GruSums's ring), no [C, B, 3N] array; with dwx [N_in,
//      3N] and dbx [3N] not empty also those sums (X^T dA), all four beside the steps (GruSums, xs
//      [C, B, N_in] read; no per-step team), and with dxs [C, B, N_in] not empty dX = dA Wx^T (wx
//      [N_in, 3N] read), das then empty (dA in a ring as dV); dh_m1 [B, N] (dDIV/dh(-1)), norms
//      [C, B] (||dh(t)||).
ffi::Error GruReverseImpl(ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> cache, ffi::Buffer<ffi::F32> h0,
                          ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> wh, ffi::Buffer<ffi::PRED> valid,
                          ffi::Buffer<ffi::F32> dh_init, ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> wx,
                          ffi::Buffer<ffi::F32> bh, ffi::ResultBuffer<ffi::F32> das, ffi::ResultBuffer<ffi::F32> dvs,
                          ffi::ResultBuffer<ffi::F32> dwh, ffi::ResultBuffer<ffi::F32> dbh,
                          ffi::ResultBuffer<ffi::F32> dh_m1, ffi::ResultBuffer<ffi::F32> norms,
                          ffi::ResultBuffer<ffi::F32> dwx, ffi::ResultBuffer<ffi::F32> dbx,
                          ffi::ResultBuffer<ffi::F32> dxs, int32_t batch_major) {
  const auto d = cache.dimensions();
  const auto wd = wh.dimensions();
  if (d.size() != 3 || wd.size() != 2 || wd[1] != 3 * wd[0] || (d[2] != 3 * wd[0] && d[2] != 4 * wd[0]))
    return check_dims(false, "gru reverse: cache must be [C, B, 3 N or 4 N], wh [N, 3 N]");
  const long steps = d[0], batch = d[1], n = wd[0], width = 3 * n, cw = d[2];
  const bool lean = cw == width;  // no V_n in the cache: formed again here
  const size_t rows = static_cast<size_t>(steps * batch);
  const bool sum_here = dvs->element_count() == 0;
  const bool beside = sum_here && dwx->element_count() != 0;  // all four sums, beside the steps
  const bool make_dx = beside && dxs->element_count() != 0;    // dX too: dA then in a ring, no array
  const long n_in = xs.dimensions().size() == 3 ? xs.dimensions()[2] : 0;
  const size_t w_size = sum_here ? static_cast<size_t>(n * width) : 0;
  if (auto e = check_dims(dhs.element_count() == rows * n && hs.element_count() == rows * n &&
                              h0.element_count() == static_cast<size_t>(batch * n) &&
                              wh.element_count() == static_cast<size_t>(n * width) &&
                              valid.element_count() == rows &&
                              dh_init.element_count() == static_cast<size_t>(batch * n) &&
                              das->element_count() == (make_dx ? 0 : rows * width) &&
                              (dxs->element_count() == 0 ||
                               (make_dx && dxs->element_count() == rows * static_cast<size_t>(n_in) &&
                                wx.element_count() == static_cast<size_t>(n_in * width))) &&
                              (sum_here || dvs->element_count() == rows * width) &&
                              dwh->element_count() == w_size &&
                              dbh->element_count() == (sum_here ? static_cast<size_t>(width) : 0) &&
                              norms->element_count() == rows && xs.dimensions().size() == 3 &&
                              xs.dimensions()[0] == steps && xs.dimensions()[1] == batch &&
                              dwx->element_count() == (beside ? static_cast<size_t>(n_in * width) : 0) &&
                              dbx->element_count() == (beside ? static_cast<size_t>(width) : 0) &&
                              (!lean || bh.element_count() == static_cast<size_t>(width)) &&
                              (!batch_major || !sum_here),
                          "gru reverse: inconsistent shapes");
      e.failure())
    return e;
  const float* DH = dhs.typed_data();
  const float* K = cache.typed_data();
  const float* H0 = h0.typed_data();
  const float* H = hs.typed_data();
  const float* W = wh.typed_data();
  const bool* V = valid.typed_data();
  float* DA = das->typed_data();
  advise_huge(DA, das->size_bytes());
  if (!sum_here) advise_huge(dvs->typed_data(), dvs->size_bytes());
  float* DB = dbh->typed_data();
  float* NRM = norms->typed_data();
  float* carry = dh_m1->typed_data();  // dh(t-1), updated step by step
  std::memcpy(carry, dh_init.typed_data(), sizeof(float) * batch * n);
  const long per = std::max(1L, kChunkRows / batch);
  // dV's scratch: the ring (beside), one step's rows (summed here, or batch_major: dA and dV written
  // row by row to [B, C, 3N], dV through this contiguous step for the matmul)
  std::vector<float> scratch(sum_here || batch_major ? (beside ? GruSums::kRing * per : 1) * batch * width : 0);
  std::vector<float> da_ring(make_dx ? GruSums::kRing * per * batch * width : 0);              // dA
  const Packed wt = pack(W, n, width, true);  // Wh^T [3N, N]
  const Packed wxt = make_dx ? pack(wx.typed_data(), n_in, width, true) : Packed{};  // Wx^T [3N, N_in]
  const auto team = beside ? nullptr : team_for(batch, width, n);
  // dWh = sum_t h(t-1)^T dV(t), in chunks: beside the steps (GruSums), or on the per-step team, else
  // on a team of its own where a chunk's matmul is large enough (its helper sleeps between chunks)
  const auto own = team || !sum_here || beside ? nullptr : team_for(n, kChunkRows, width, true);
  Team* const sums_team = team ? team.get() : own.get();
  std::unique_ptr<OuterSums> sums;
  GruSums gsums{xs.typed_data(), H0, H, make_dx ? da_ring.data() : DA, scratch.data(), batch, n_in, n, steps, per,
                dwx->typed_data(), dbx->typed_data(), dwh->typed_data(), DB};
  std::unique_ptr<Beside> aside;
  if (sum_here) std::fill(DB, DB + width, 0.0f);
  const int chains = GruSums::kChains + (make_dx ? 1 : 0);
  if (make_dx) {
    gsums.wxt = &wxt;
    gsums.dx = dxs->typed_data();
    advise_huge(gsums.dx, dxs->size_bytes());
  }
  if (beside) {
    std::fill(gsums.dwx, gsums.dwx + n_in * width, 0.0f);
    std::fill(gsums.dbx, gsums.dbx + width, 0.0f);
    std::fill(gsums.dwh, gsums.dwh + n * width, 0.0f);
    aside = std::make_unique<Beside>(chains, (steps + per - 1) / per, &GruSums::run, &gsums);
    aside->start();
  } else if (sum_here) {
    sums = std::make_unique<OuterSums>(n, width, batch, dwh->typed_data());
  }
  // V_n(t) = h(t-1) W_hn + b_hn where the cache has no V_n: a chunk's rows (steps t0 .. t1 - 1, in
  // time order) at a time, as the loop enters the chunk
  std::vector<float> vn_rows(lean ? per * batch * n : 0);
  Packed whn;
  if (lean) {
    std::vector<float> w(n * n);  // W_hn, the last N columns of Wh
    for (long i = 0; i < n; ++i) std::memcpy(w.data() + i * n, W + i * width + 2 * n, sizeof(float) * n);
    whn = pack(w.data(), n, n, false);
  }
  const float* B_HN = lean ? bh.typed_data() + 2 * n : nullptr;
  for (long t = steps - 1; t >= 0; --t) {
    const long row0 = t * batch;
    const float* prev = t == 0 ? H0 : H + (row0 - batch) * n;  // h(t-1)
    const long chunk = (steps - 1 - t) / per, t0 = std::max(0L, steps - (chunk + 1) * per);
    if (lean && t == steps - 1 - chunk * per) {  // entering the chunk: its V_n rows
      const long chunk_rows = (t + 1 - t0) * batch;
      for (long r = 0; r < chunk_rows; ++r) std::memcpy(vn_rows.data() + r * n, B_HN, sizeof(float) * n);
      long skip = 0;  // step 0's rows: h(-1) = h0
      if (t0 == 0) {
        skip = batch;
        step_gemm(team.get(), batch, H0, n, whn, vn_rows.data(), n, true);
      }
      if (chunk_rows > skip)
        step_gemm(team.get(), chunk_rows - skip, H + (t0 > 0 ? t0 - 1 : 0) * batch * n, n, whn,
                  vn_rows.data() + skip * n, n, true);
    }
    if (beside && t == steps - 1 - chunk * per && chunk >= GruSums::kRing)  // the slots' last readers done
      for (int c = 0; c < chains; ++c) aside->await(c, chunk - GruSums::kRing);
    float* dv = beside                  ? gsums.slot(chunk) + (t - t0) * batch * width
                : sum_here || batch_major ? scratch.data()
                                          : dvs->typed_data() + row0 * width;
    float* da = make_dx ? gsums.da_rows(chunk, t0) + (t - t0) * batch * width : DA + row0 * width;  // dA(t)
    for (long b = 0; b < batch; ++b) {
      const long row = row0 + b;
      float* cb = carry + b * n;
      float* dvb = dv + b * width;
      float* dab = batch_major ? DA + (b * steps + t) * width : da + b * width;
      if (V[row]) {
        const float* vn = lean ? vn_rows.data() + ((t - t0) * batch + b) * n : K + row * cw + 3 * n;
        NRM[row] = gru_reverse_row(K + row * cw, vn, prev + b * n, DH + row * n, cb, dab, dvb, n);
        if (sum_here && !beside)
          for (long j = 0; j < width; ++j) DB[j] += dvb[j];
      } else {  // padding: dA = dV = 0, the carry passes on with dH_above added
        const float* above = DH + row * n;
        float sh = 0.0f;
        for (long j = 0; j < n; ++j) {
          cb[j] += above[j];
          sh += cb[j] * cb[j];
        }
        NRM[row] = std::sqrt(sh);
        std::memset(dab, 0, sizeof(float) * width);
        std::memset(dvb, 0, sizeof(float) * width);
      }
      if (batch_major) std::memcpy(dvs->typed_data() + (b * steps + t) * width, dvb, sizeof(float) * width);
    }
    // dh_carry += dV(t) Wh^T, [B, 3N] x [N, 3N]^T (zero rows where a step is padding)
    step_gemm(team.get(), batch, dv, width, wt, carry, n, true);
    if (sums) sums->add(sums_team, batch, prev, n, dv, width);
    if (beside && t == t0) aside->ready(chunk + 1);
  }
  if (sums) sums->flush(sums_team);
  if (aside) aside->finish();
  return ffi::Error::Success();
}

// f1 and f1' from h = f1(z), as bptt_jax/core/activations.py (the codes native.ACTIVATIONS gives).
enum Activation : int32_t { kTanh = 0, kRelu = 1, kSigmoid = 2, kIdentity = 3 };

void activate_row(float* __restrict h, long n, int32_t f) {
  switch (f) {
    case kTanh:
      for (long j = 0; j < n; ++j) h[j] = fast_tanh(h[j]);
      break;
    case kRelu:
      for (long j = 0; j < n; ++j) h[j] = std::max(h[j], 0.0f);
      break;
    case kSigmoid:
      for (long j = 0; j < n; ++j) h[j] = sigmoid(h[j]);
      break;
    default:
      break;
  }
}

// dz = dh f1'(h) for one row; returns ||dh||.
float elman_reverse_row(const float* __restrict h, const float* __restrict above, const float* __restrict carry,
                        float* __restrict dz, long n, int32_t f) {
  float sh = 0.0f;
#pragma omp simd reduction(+ : sh)
  for (long j = 0; j < n; ++j) {
    const float dh = above[j] + carry[j];
    const float hj = h[j];
    const float df = f == kTanh ? 1.0f - hj * hj
                     : f == kRelu ? (hj > 0.0f ? 1.0f : 0.0f)
                     : f == kSigmoid ? hj * (1.0f - hj)
                                     : 1.0f;
    dz[j] = dh * df;
    sh += dh * dh;
  }
  return std::sqrt(sh);
}

ffi::Error check_activation(int32_t f) {
  return check_dims(f >= kTanh && f <= kIdentity, "elman: unknown activation code");
}

// us [C, B, N] (u(t) = X(t) W1 + b1), w11 [N, N], h0 [B, N], valid [C, B]; or, where w1 [N_in, N] is
// not empty, us is X [C, B, N_in] and the call forms X(t) W1 + b1 itself, into hs's own rows ahead
// of the steps (on a helper thread where the per-step matmul has one thread: projection_beside, as
// the gated cells' forward calls; else all C steps first) -> hs [C, B, N] (h(t); held where not valid).
ffi::Error ElmanForwardImpl(ffi::Buffer<ffi::F32> us, ffi::Buffer<ffi::F32> w11, ffi::Buffer<ffi::F32> h0,
                            ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::F32> w1, ffi::Buffer<ffi::F32> b1,
                            ffi::ResultBuffer<ffi::F32> hs, int32_t f) {
  const auto d = us.dimensions();
  if (d.size() != 3) return check_dims(false, "elman forward: us (or xs) must be [C, B, N]");
  const bool project = w1.element_count() != 0;
  const long steps = d[0], batch = d[1], n = w11.dimensions().size() == 2 ? w11.dimensions()[0] : 0;
  const long n_in = d[2];
  if (auto e = check_dims(w11.dimensions().size() == 2 && w11.dimensions()[1] == n &&
                              (project ? w1.dimensions().size() == 2 && w1.dimensions()[0] == n_in &&
                                             w1.dimensions()[1] == n && b1.element_count() == static_cast<size_t>(n)
                                       : n_in == n) &&
                              h0.element_count() == static_cast<size_t>(batch * n) &&
                              valid.element_count() == static_cast<size_t>(steps * batch) &&
                              hs->element_count() == static_cast<size_t>(steps * batch * n),
                          "elman forward: inconsistent shapes");
      e.failure())
    return e;
  if (auto e = check_activation(f); e.failure()) return e;
  const float* U = us.typed_data();
  const bool* V = valid.typed_data();
  float* H = hs->typed_data();
  advise_huge(H, hs->size_bytes());
  const Packed wp = pack(w11.typed_data(), n, n, false);  // W11 [N, N]
  const Packed xp = project ? pack(w1.typed_data(), n_in, n, false) : Packed{};  // W1 [N_in, N]
  Projection proj{U, n_in, &xp, H, n, batch, steps, std::max(1L, kChunkRows / batch)};
  const bool ahead_ok = project && projection_beside(nullptr, proj);
  const auto team = team_for(batch, n, n, false, ahead_ok);
  std::unique_ptr<Beside> ahead;  // X W1 chunk by chunk beside the steps
  if (project && projection_beside(team.get(), proj)) {
    ahead = std::make_unique<Beside>(1, proj.chunks(), &Projection::run, &proj);
    ahead->ready(proj.chunks());
    ahead->start();
  } else if (project) {
    project_all(team.get(), steps * batch, U, n_in, xp, H, n);
  }
  const float* bias = project ? b1.typed_data() : nullptr;
  for (long t = 0; t < steps; ++t) {
    if (ahead && t % proj.per == 0) ahead->await(0, t / proj.per);
    const float* prev = t == 0 ? h0.typed_data() : H + (t - 1) * batch * n;
    float* h = H + t * batch * n;
    if (project) {  // h holds X(t) W1: + b1
      for (long b = 0; b < batch; ++b)
        for (long j = 0; j < n; ++j) h[b * n + j] += bias[j];
    } else {
      std::memcpy(h, U + t * batch * n, sizeof(float) * batch * n);
    }
    step_gemm(team.get(), batch, prev, n, wp, h, n, true);  // Z1(t) = u(t) + h(t-1) W11
    for (long b = 0; b < batch; ++b) {
      if (V[t * batch + b]) {
        activate_row(h + b * n, n, f);
      } else {
        std::memcpy(h + b * n, prev + b * n, sizeof(float) * n);  // padding holds h
      }
    }
  }
  return ffi::Error::Success();
}

// hs [C, B, N], dhs [C, B, N] (dH_above), w11 [N, N], valid [C, B], dh_init [B, N], h0 [B, N] (the
// state entering the first step), xs [C, B, N_in], w1 [N_in, N]
//   -> dzs [C, B, N] (dZ1(t)), dh_m1 [B, N] (dDIV/dh(-1)), norms [C, B] (||dh(t)||), and where dw1,
//      dw11, db are not empty the weight gradients dW1 = sum_t X(t)^T dZ1(t), dW11 = sum_t
//      h(t-1)^T dZ1(t), db1 = sum_t dZ1(t) (RowSums, on a helper thread beside the steps; h0, xs
//      and w1 are read only then, else they may be empty), with dxs [C, B, N_in] not empty also
//      dX = dZ1 W1^T. dxs may be dhs's buffer (native.py aliases them): a chunk of dX is written
//      after the steps that read its rows of dhs.
ffi::Error ElmanReverseImpl(ffi::Buffer<ffi::F32> hs, ffi::Buffer<ffi::F32> dhs, ffi::Buffer<ffi::F32> w11,
                            ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::F32> dh_init, ffi::Buffer<ffi::F32> h0,
                            ffi::Buffer<ffi::F32> xs, ffi::Buffer<ffi::F32> w1, ffi::ResultBuffer<ffi::F32> dzs,
                            ffi::ResultBuffer<ffi::F32> dh_m1, ffi::ResultBuffer<ffi::F32> norms,
                            ffi::ResultBuffer<ffi::F32> dw1, ffi::ResultBuffer<ffi::F32> dw11,
                            ffi::ResultBuffer<ffi::F32> db, ffi::ResultBuffer<ffi::F32> dxs, int32_t f,
                            int32_t batch_major) {
  const auto d = hs.dimensions();
  if (d.size() != 3) return check_dims(false, "elman reverse: hs must be [C, B, N]");
  const long steps = d[0], batch = d[1], n = d[2];
  const size_t rows = static_cast<size_t>(steps * batch);
  const bool sum_here = dw11->element_count() != 0;
  const long n_in = sum_here && xs.dimensions().size() == 3 ? xs.dimensions()[2] : 0;
  if (auto e = check_dims(dhs.element_count() == rows * n && w11.element_count() == static_cast<size_t>(n * n) &&
                              valid.element_count() == rows &&
                              dh_init.element_count() == static_cast<size_t>(batch * n) &&
                              dzs->element_count() == rows * n && norms->element_count() == rows &&
                              (sum_here ? xs.dimensions().size() == 3 && xs.dimensions()[0] == steps &&
                                              xs.dimensions()[1] == batch &&
                                              h0.element_count() == static_cast<size_t>(batch * n) &&
                                              dw1->element_count() == static_cast<size_t>(n_in * n) &&
                                              dw11->element_count() == static_cast<size_t>(n * n) &&
                                              db->element_count() == static_cast<size_t>(n)
                                        : dw1->element_count() == 0 && db->element_count() == 0) &&
                              (dxs->element_count() == 0 ||
                               (sum_here && dxs->element_count() == rows * n_in &&
                                w1.element_count() == static_cast<size_t>(n_in * n))) &&
                              (!batch_major || !sum_here),
                          "elman reverse: inconsistent shapes");
      e.failure())
    return e;
  if (auto e = check_activation(f); e.failure()) return e;
  const float* H = hs.typed_data();
  const float* DH = dhs.typed_data();
  const bool* V = valid.typed_data();
  float* DZ = dzs->typed_data();
  advise_huge(DZ, dzs->size_bytes());
  float* NRM = norms->typed_data();
  float* carry = dh_m1->typed_data();  // dh(t-1), updated step by step
  std::memcpy(carry, dh_init.typed_data(), sizeof(float) * batch * n);
  std::vector<float> dh_keep(batch * n);  // dh(t) of the padded rows, their carry on
  const Packed wt = pack(w11.typed_data(), n, n, true);  // W11^T
  auto team = team_for(batch, n, n, false, sum_here);
  // The weight-gradient sums (and dX), beside the steps: chunks of about kChunkRows rows
  RowSums sums{xs.typed_data(), h0.typed_data(), H, DZ, batch, n_in, n, n, n, n, steps, std::max(1L, kChunkRows / batch)};
  Packed w1t;  // W1^T, where dX is made here
  std::unique_ptr<Beside> beside;
  if (sum_here)
    beside = begin_sums(sums, dw1->typed_data(), dw11->typed_data(), db->typed_data(), w1.typed_data(),
                        dxs->element_count() != 0 ? dxs->typed_data() : nullptr, dxs->size_bytes(), &w1t,
                        team != nullptr);
  // batch_major: dZ1 written row by row to [B, C, N], the step's rows first into a contiguous
  // scratch for the matmul
  std::vector<float> dz_step(batch_major ? batch * n : 0);
  for (long t = steps - 1; t >= 0; --t) {
    const long row0 = t * batch;
    float* dz = batch_major ? dz_step.data() : DZ + row0 * n;  // dZ1(t) [B, N]
    for (long b = 0; b < batch; ++b) {
      const long row = row0 + b;
      float* cb = carry + b * n;
      NRM[row] = elman_reverse_row(H + row * n, DH + row * n, cb, dz + b * n, n, f);
      if (!V[row]) {  // padding: dZ1 = 0, the carry passes on with dH_above added
        for (long j = 0; j < n; ++j) dh_keep[b * n + j] = DH[row * n + j] + cb[j];
        std::memset(dz + b * n, 0, sizeof(float) * n);
      }
      if (batch_major) std::memcpy(DZ + (b * steps + t) * n, dz + b * n, sizeof(float) * n);
    }
    step_gemm(team.get(), batch, dz, n, wt, carry, n, false);  // carry = dZ1(t) W11^T
    for (long b = 0; b < batch; ++b)
      if (!V[row0 + b]) std::memcpy(carry + b * n, dh_keep.data() + b * n, sizeof(float) * n);
    if (beside && (steps - t) % sums.per == 0) beside->ready((steps - t) / sums.per);
  }
  if (beside) {
    team.reset();
    beside->start();
    beside->finish();
  }
  return ffi::Error::Success();
}

// The gated cells' reverse calls' arguments: dhs, the gate cache, the entering state, the states,
// wh, valid, the entering carry, xs, wx (their results follow at each handler).
auto reverse_args() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::PRED>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttElmanForward, ElmanForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("activation"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttElmanReverse, ElmanReverseImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("activation")
                                  .Attr<int32_t>("batch_major"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttLstmForward, LstmForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttLstmReverse, LstmReverseImpl,
                              reverse_args()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // hs: h(t) apart, or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("batch_major"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttGruForward, GruForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BpttGruReverse, GruReverseImpl,
                              reverse_args()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bh
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("batch_major"));
