// The compiled kernel's own per-step matmul (bptt_jax/core/cell_kernels.cc: Wh packed once, register
// tiles) against OpenBLAS's sgemm on one thread (where built with -DWITH_OPENBLAS), at the shapes
// given on the command line as m k n triples: C [m, n] = A [m, k] W [k, n]. Prints one line per
// shape: m k n, the kernel's GFLOP/s on one thread and on two (its Team; the two results are checked
// equal bit for bit), OpenBLAS's (0 without it), and the largest difference from OpenBLAS's.
// benchmarks/matmul_rates.py compiles and runs it.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

#include "cell_kernels.cc"

#ifdef WITH_OPENBLAS
extern "C" void scipy_cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                                  const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc);
extern "C" void scipy_openblas_set_num_threads(int);
#endif

template <typename F>
double rate(F f, long m, long k, long n) {
  const long reps = std::max(20L, 400000000L / (2 * m * k * n));
  f();
  double rates[5];  // the median of five timings of reps calls each
  for (double& r : rates) {
    const auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < reps; ++i) f();
    r = 2.0 * m * k * n * reps / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9;
  }
  std::sort(rates, rates + 5);
  return rates[2];
}

int main(int argc, char** argv) {
#ifdef WITH_OPENBLAS
  scipy_openblas_set_num_threads(1);
#endif
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  for (int i = 1; i + 2 < argc; i += 3) {
    const long m = std::atol(argv[i]), k = std::atol(argv[i + 1]), n = std::atol(argv[i + 2]);
    std::vector<float> a(m * k), w(k * n), c1(m * n, 0.0f), c2(m * n, 0.0f);
    for (float& x : a) x = normal(gen);
    for (float& x : w) x = normal(gen);
    const Packed wp = pack(w.data(), k, n, false);
    const double ours = rate([&] { gemm(m, a.data(), k, wp, c1.data(), n, false, 0, wp.panels); }, m, k, n);
    Team team;  // the kernel's second thread
    std::vector<float> c3(m * n, 0.0f);
    const double two = rate([&] { team.gemm2(m, a.data(), k, wp, c3.data(), n, false); }, m, k, n);
    for (long j = 0; j < m * n; ++j)
      if (c3[j] != c1[j]) return std::printf("two threads differ from one at %ld\n", j), 1;
    double blas = 0, diff = 0;
#ifdef WITH_OPENBLAS
    blas = rate([&] { scipy_cblas_sgemm(101, 111, 111, m, n, k, 1.0f, a.data(), k, w.data(), n, 0.0f, c2.data(), n); },
                m, k, n);
    for (long j = 0; j < m * n; ++j) diff = std::max(diff, static_cast<double>(std::fabs(c1[j] - c2[j])));
#endif
    std::printf("%ld %ld %ld %.1f %.1f %.1f %.2e\n", m, k, n, ours, two, blas, diff);
  }
  return 0;
}
