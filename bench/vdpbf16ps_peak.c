/* The bf16 dot-product peak of this CPU's cores: how many floating-point operations per second a
 * loop of independent AVX-512 `vdpbf16ps` instructions reaches (each: 16 lanes x 2 products, an
 * add each), one loop per OpenMP thread. It bounds any bf16 GEMM built on that instruction
 * (oneDNN's, llama.cpp's), so a GEMM's GFLOP/s can be read as a share of it. It measures the
 * instruction only: no memory is read in the loop.
 *
 *   gcc -O3 -mavx512f -mavx512bf16 -fopenmp bench/vdpbf16ps_peak.c -o /tmp/peak
 *   OMP_NUM_THREADS=2 /tmp/peak
 *
 * Run it on an otherwise idle machine (it reports what the threads get, not what they could). */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

enum { kChains = 12 };          /* independent accumulators: enough to hide the latency (6 cycles on Zen 4) */
static const long kRounds = 200000000L;  /* kChains instructions each, per thread */

int main(void) {
  float sink = 0.0f;
  double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
  {
    __m512 acc[kChains];
    for (int i = 0; i < kChains; i++) acc[i] = _mm512_setzero_ps();
    __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80);  /* bf16 1.0 in every lane */
    __m512bh y = x;
    for (long r = 0; r < kRounds; r++) {
      for (int i = 0; i < kChains; i++) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
      __asm__ volatile("" : "+v"(x));  /* keeps the compiler from folding the loop */
    }
    for (int i = 0; i < kChains; i++) sink += _mm512_reduce_add_ps(acc[i]);
  }
  double seconds = omp_get_wtime() - t0;
  int threads = omp_get_max_threads();
  double flops = (double)kRounds * kChains * 64.0 * threads;  /* 64 = 16 lanes x 2 products x 2 */
  printf("%d threads: %.1f GFLOP/s of vdpbf16ps (%.2f s; checksum %.0f)\n", threads, flops / seconds / 1e9,
         seconds, sink);
  return 0;
}
