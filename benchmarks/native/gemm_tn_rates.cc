// The kernel's matmul of the weight-gradient sums, timed alone: gemm_tn (C += A^T B, what the helper
// thread sums dWx = X^T dA and dWh = h^T dA with) at the cells' shapes, beside the packed per-step
// gemm (gemm_rates.cc beside this file times that one against OpenBLAS). Built and run by
// benchmarks/gemm_tn_rates.py (cell_kernels.cc included whole, or the file CELL_KERNELS names:
// another revision's).
#include <chrono>
#include <cstdio>

#ifndef CELL_KERNELS
#define CELL_KERNELS "../../bptt_jax/core/cell_kernels.cc"
#endif
#include CELL_KERNELS

namespace {
using Clock = std::chrono::steady_clock;

template <class F>
double best_seconds(F f, int reps) {
  for (int i = 0; i < 3; ++i) f();
  double best = 1e9;
  for (int r = 0; r < 7; ++r) {
    const auto t0 = Clock::now();
    for (int i = 0; i < reps; ++i) f();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count() / reps);
  }
  return best;
}
}  // namespace

int main() {
  // (m, n, k): C [m, n] += A^T B over k rows, B's rows 2 n floats apart (a half of dA's columns)
  const long shapes[][3] = {{256, 512, 256}, {103, 512, 256}, {64, 64, 256}, {128, 64, 256}, {256, 384, 256},
                            {64, 256, 256}, {512, 1024, 128}};
  std::printf("| matmul | m, n, k | us | GFLOP/s |\n|---|---|---|---|\n");
  for (const auto& s : shapes) {
    const long m = s[0], n = s[1], k = s[2];
    std::vector<float> a(k * m, 0.01f), b(k * 2 * n, 0.02f), c(m * 2 * n, 0.0f);
    const double t = best_seconds([&] { gemm_tn(m, n, k, a.data(), m, b.data(), 2 * n, c.data(), 2 * n); }, 30);
    std::printf("| gemm_tn | %ld, %ld, %ld | %.1f | %.1f |\n", m, n, k, t * 1e6, 2.0 * m * n * k / t / 1e9);
  }
  {  // the LSTM's gate arithmetic per step, B 32 rows of N 256: forward_row and reverse_row
    const long B = 32, n = 256;
    std::vector<float> q(B * 4 * n), cp(B * n, 0.1f), h(B * n), c(B * n, 0.2f), dh(B * n, 0.1f);
    std::vector<float> carry(B * 2 * n, 0.05f), keep(B * n), nrm(B * 2);
    const double tf = best_seconds(
        [&] {
          for (long b = 0; b < B; ++b) {
            float* qb = q.data() + b * 4 * n;
            for (long j = 0; j < 4 * n; ++j) qb[j] = 0.001f * static_cast<float>(j) - 0.5f;
            forward_row(qb, qb + n, qb + 2 * n, qb + 3 * n, cp.data() + b * n, h.data() + b * n, c.data() + b * n, n);
          }
        },
        200);
    const double tr = best_seconds(
        [&] {
          for (long b = 0; b < B; ++b) {
            float* g = q.data() + b * 4 * n;
            float* cb = carry.data() + b * 2 * n;
            reverse_row(g, g + n, g + 2 * n, g + 3 * n, c.data() + b * n, cp.data() + b * n, dh.data() + b * n, cb,
                        cb + n, g, g + n, g + 2 * n, g + 3 * n, keep.data() + b * n, nrm.data() + 2 * b, n);
          }
        },
        200);
    std::printf("| lstm forward_row, B rows (us) | 32, 256 | %.2f | - |\n", tf * 1e6);
    std::printf("| lstm reverse_row, B rows (us) | 32, 256 | %.2f | - |\n", tr * 1e6);
  }
  const long rows[] = {32, 256};
  for (long r : rows) {  // the packed gemm: [r, 256] x [256, 1024]
    std::vector<float> x(r * 256, 0.01f), w(256 * 1024, 0.02f), c(r * 1024, 0.0f);
    const Packed p = pack(w.data(), 256, 1024, false);
    const double t = best_seconds([&] { gemm(r, x.data(), 256, p, c.data(), 1024, false, 0, p.panels); }, 30);
    std::printf("| packed gemm | %ld, 1024, 256 | %.1f | %.1f |\n", r, t * 1e6, 2.0 * r * 1024 * 256 / t / 1e9);
  }
  return 0;
}
