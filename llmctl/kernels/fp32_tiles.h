// The fp32 tiles every few-row product is made of (few_rows.cpp's projections, decode_step.cpp's whole step):
// R activation rows against C weight rows at a time, all in registers, over blocks of output channels whose
// weights stay in cache while every chunk of rows uses them.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMCTL_AVX2 1
#endif

namespace llmctl {

constexpr int64_t kMaxRows = 16;  // rows a few-row kernel takes (MAX_ROWS in llmctl/kernels/__init__.py)

#ifdef LLMCTL_AVX2
inline float horizontal_sum(__m256 v) {
  __m128 low = _mm256_castps256_ps128(v), high = _mm256_extractf128_ps(v, 1);
  __m128 sum = _mm_add_ps(low, high);
  sum = _mm_hadd_ps(sum, sum);
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(sum);
}
#endif

// Calls f.template operator()<R>() with R = rows (1..Chunk, Chunk <= 4) known at compile time.
template <int Chunk, typename F>
void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f.template operator()<1>(); break;
    case 2: if constexpr (Chunk >= 2) f.template operator()<2>(); break;
    case 3: if constexpr (Chunk >= 3) f.template operator()<3>(); break;
    default: if constexpr (Chunk >= 4) f.template operator()<4>(); break;
  }
}

constexpr int64_t kBlock = 64;  // output channels whose weights stay in cache while every row chunk uses them

// Output channels [begin, end) of y for every row, filled by `block.template operator()<R>(first, begin, end,
// ys)`, which writes those channels of rows first..first+R-1: blocks of kBlock channels, each served to every
// chunk of Chunk rows while its weights are still in cache.
template <int Chunk, typename Block>
void fill_channels(int64_t rows, int64_t begin, int64_t end, float* ys, Block& block) {
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t stop = std::min(end, start + kBlock);
    for (int64_t first = 0; first < rows; first += Chunk)
      with_rows<Chunk>(std::min<int64_t>(Chunk, rows - first),
                       [&]<int R>() { block.template operator()<R>(first, start, stop, ys); });
  }
}

// The fp32 vectors: 512 bits where the CPU has AVX-512 (twice the FMA width and 32 registers), else AVX2's 256.
#if defined(__AVX512F__)
struct Lanes {
  using T = __m512;
  static constexpr int kWidth = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(T v) { return _mm512_reduce_add_ps(v); }
  static T all(float x) { return _mm512_set1_ps(x); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
};
#elif defined(LLMCTL_AVX2)
struct Lanes {
  using T = __m256;
  static constexpr int kWidth = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(T v) { return horizontal_sum(v); }
  static T all(float x) { return _mm256_set1_ps(x); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
};
#endif

// Rows per chunk and weight rows per tile: R * C accumulators + R rows + 1 weight vector fit the registers.
#if defined(__AVX512F__)
constexpr int kFp32Chunk = 4, kFp32Channels = 6;
#else
constexpr int kFp32Chunk = 3, kFp32Channels = 4;
#endif

// R x C dot products: rows x (R, in) against C consecutive weight rows w (C, in), into dots[m * C + c]:
// R * C accumulators, R activation vectors and one weight vector, all in registers.
template <int R, int C>
void fp32_dots(const float* x, int64_t in, const float* w, float* dots) {
  int64_t k = 0;
#ifdef LLMCTL_AVX2
  typename Lanes::T acc[R][C];
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = Lanes::zero();
  for (; k + Lanes::kWidth <= in; k += Lanes::kWidth) {
    typename Lanes::T xs[R];
    for (int m = 0; m < R; ++m) xs[m] = Lanes::load(x + m * in + k);
    for (int c = 0; c < C; ++c) {
      const typename Lanes::T wv = Lanes::load(w + c * in + k);
      for (int m = 0; m < R; ++m) acc[m][c] = Lanes::fma(wv, xs[m], acc[m][c]);
    }
  }
  for (int m = 0; m < R; ++m)
    for (int c = 0; c < C; ++c) dots[m * C + c] = Lanes::sum(acc[m][c]);
#else
  for (int m = 0; m < R * C; ++m) dots[m] = 0.f;
#endif
  for (; k < in; ++k)
    for (int m = 0; m < R; ++m)
      for (int c = 0; c < C; ++c) dots[m * C + c] += x[m * in + k] * w[c * in + k];
}

// Fills channels of y = x (rows, in) @ w (out, in)^T, y's rows `stride` floats apart: one row reads 8 weight
// rows at a time, more rows kFp32Channels.
inline auto fp32_block(const float* xs, int64_t in, const float* ws, int64_t stride) {
  return [=]<int R>(int64_t first, int64_t begin, int64_t end, float* ys) {
    constexpr int C = R == 1 ? 8 : kFp32Channels;
    float dots[R * C];
    int64_t n = begin;
    for (; n + C <= end; n += C) {
      fp32_dots<R, C>(xs + first * in, in, ws + n * in, dots);
      for (int m = 0; m < R; ++m)
        for (int c = 0; c < C; ++c) ys[(first + m) * stride + n + c] = dots[m * C + c];
    }
    for (; n < end; ++n) {
      fp32_dots<R, 1>(xs + first * in, in, ws + n * in, dots);
      for (int m = 0; m < R; ++m) ys[(first + m) * stride + n] = dots[m];
    }
  };
}

}  // namespace llmctl
