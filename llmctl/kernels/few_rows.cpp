// Products of a few activation rows (decode) with fp32, int8 or int4 weights on the CPU, compiled on first use.
//
// At decode a projection reads its whole weight for one or a few rows: the time is the weight's bytes over
// the memory bandwidth. torch's fp32 sgemv streams weights at well under the machine's read bandwidth, and its
// few-row sgemm at a fraction of that (benchmarks/decode.py); its `_weight_int8pack_mm` and
// `_weight_int4pack_mm_for_cpu` are slower than the fp32 product on AVX2 machines (benchmarks/quant_kernels.py).
// These loops stream each weight once per call: fp32 with FMAs, int8 / int4 in integers against the rows
// rounded to int16. Blocks of output channels are spread over ATen's thread pool; within a block every chunk
// of rows is served while the block's weights are still in cache.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "fp32_tiles.h"

namespace {

using namespace llmctl;

// Activations are rounded to int16 per row (scale = the row's largest magnitude / 32767: an error of
// 1/65534 of that value, far below the weights' own) so that one vpmaddwd multiplies 16 weights at once.
constexpr int64_t kFlushColumns = 1024;  // int32 lanes hold 64 vpmaddwd sums (< 2^31) before going to fp32

float int16_scale(const float* x, int64_t in) {
  float largest = 0.f;
  for (int64_t k = 0; k < in; ++k) largest = std::max(largest, std::abs(x[k]));
  return largest > 0.f ? largest / 32767.f : 1.f;
}

// R dot products of one int8 weight row against R int16 activation rows (without their scales); R is a
// compile-time constant so that the accumulators stay in registers.
template <int R>
void int8_dots(const int16_t* x, int64_t in, const int8_t* row, float* dots) {
  int64_t k = 0;
#ifdef LLMCTL_AVX2
  __m256 totals[R];
  for (int m = 0; m < R; ++m) totals[m] = _mm256_setzero_ps();
  while (k + 16 <= in) {
    __m256i acc[R];
    for (int m = 0; m < R; ++m) acc[m] = _mm256_setzero_si256();
    const int64_t stop = std::min(in - 15, k + kFlushColumns);
    for (; k < stop; k += 16) {
      __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k)));
      for (int m = 0; m < R; ++m)
        acc[m] = _mm256_add_epi32(
            acc[m], _mm256_madd_epi16(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * in + k))));
    }
    for (int m = 0; m < R; ++m) totals[m] = _mm256_add_ps(totals[m], _mm256_cvtepi32_ps(acc[m]));
  }
  for (int m = 0; m < R; ++m) dots[m] = horizontal_sum(totals[m]);
#else
  for (int m = 0; m < R; ++m) dots[m] = 0.f;
#endif
  for (; k < in; ++k)
    for (int m = 0; m < R; ++m) dots[m] += static_cast<float>(x[m * in + k]) * static_cast<float>(row[k]);
}

// R dot products of one int4 weight row (all its groups) against R int16 activation rows (scaled per row by
// `row_scales`), split into even and odd columns (stride `half`) so that the nibbles never need reordering;
// the group offsets use the exact fp32 sums per group.
template <int R>
void int4_dots(const int16_t* even, const int16_t* odd, const float* row_scales, const float* group_sums,
               int64_t half, int64_t groups, const uint8_t* bytes, int64_t half_group, const float* scales,
               const float* offsets, float* dots) {
  float offset_terms[R] = {0.f};
  for (int64_t g = 0; g < groups; ++g)
    for (int m = 0; m < R; ++m) offset_terms[m] += offsets[g] * group_sums[m * groups + g];
#ifdef LLMCTL_AVX2
  __m256 totals[R];
  const __m256i mask = _mm256_set1_epi16(0x0F);
  for (int m = 0; m < R; ++m) totals[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[R];
    for (int m = 0; m < R; ++m) acc[m] = _mm256_setzero_si256();
    for (int64_t j = g * half_group; j < (g + 1) * half_group; j += 16) {
      __m256i packed = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + j)));
      __m256i low = _mm256_and_si256(packed, mask), high = _mm256_srli_epi16(packed, 4);
      for (int m = 0; m < R; ++m) {
        __m256i x_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + m * half + j));
        __m256i x_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(odd + m * half + j));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(low, x_even));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(high, x_odd));
      }
    }
    const __m256 scale = _mm256_set1_ps(scales[g]);
    for (int m = 0; m < R; ++m) totals[m] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(acc[m]), totals[m]);
  }
  for (int m = 0; m < R; ++m) dots[m] = horizontal_sum(totals[m]) * row_scales[m] + offset_terms[m];
#else
  for (int m = 0; m < R; ++m) dots[m] = offset_terms[m];
  for (int64_t g = 0; g < groups; ++g)
    for (int m = 0; m < R; ++m) {
      int32_t dot = 0;
      for (int64_t j = g * half_group; j < (g + 1) * half_group; ++j)
        dot += even[m * half + j] * (bytes[j] & 0x0F) + odd[m * half + j] * (bytes[j] >> 4);
      dots[m] += scales[g] * static_cast<float>(dot) * row_scales[m];
    }
#endif
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous fp32 (rows, in)");
  TORCH_CHECK(x.size(0) <= kMaxRows, "too many rows for the decode kernel");
}

// y (rows, out), its output channels spread over threads.
template <int Chunk, typename Block>
at::Tensor by_channel_block(const at::Tensor& x, int64_t out, Block&& block) {
  const int64_t rows = x.size(0);
  auto y = at::empty({rows, out}, x.options());
  float* ys = y.data_ptr<float>();
  at::parallel_for(0, out, kBlock / 2,
                   [&](int64_t begin, int64_t end) { fill_channels<Chunk>(rows, begin, end, ys, block); });
  return y;
}

// The same for kernels that compute one output channel at a time: `dots_for.template operator()<R>(first, n,
// dots)` writes the R values of channel n for rows first..first+R-1.
template <typename DotsFor>
at::Tensor by_output_channel(const at::Tensor& x, int64_t out, DotsFor&& dots_for) {
  const int64_t out_stride = out;
  return by_channel_block<4>(x, out, [&]<int R>(int64_t first, int64_t begin, int64_t end, float* ys) {
    float dots[R];
    for (int64_t n = begin; n < end; ++n) {
      dots_for.template operator()<R>(first, n, dots);
      for (int m = 0; m < R; ++m) ys[(first + m) * out_stride + n] = dots[m];
    }
  });
}

void check_fp32_weight(const at::Tensor& w, int64_t in) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2, "w: contiguous fp32 (out, in)");
  TORCH_CHECK(w.size(1) == in, "w does not match x");
}

at::Tensor fp32_linear(const at::Tensor& x, const at::Tensor& w) {
  check_x(x);
  check_fp32_weight(w, x.size(1));
  const int64_t in = x.size(1), out = w.size(0);
  return by_channel_block<kFp32Chunk>(x, out, fp32_block(x.data_ptr<float>(), in, w.data_ptr<float>(), out));
}

// The products of x with several weights that read it (q, k and v; gate and up) side by side in one y (rows,
// sum of outs), in one parallel region: their output channels are spread over the threads as one range, so
// the group pays one fork and join, not one each.
at::Tensor fp32_linear_group(const at::Tensor& x, at::TensorList ws) {
  check_x(x);
  const int64_t rows = x.size(0), in = x.size(1);
  std::vector<int64_t> offsets{0};
  for (const auto& w : ws) {
    check_fp32_weight(w, in);
    offsets.push_back(offsets.back() + w.size(0));
  }
  const int64_t total = offsets.back();
  auto y = at::empty({rows, total}, x.options());
  float* ys = y.data_ptr<float>();
  const float* xs = x.data_ptr<float>();
  at::parallel_for(0, total, kBlock / 2, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < ws.size(); ++i) {
      const int64_t low = std::max(begin, offsets[i]), high = std::min(end, offsets[i + 1]);
      if (low >= high) continue;
      auto block = fp32_block(xs, in, ws[i].data_ptr<float>(), total);
      fill_channels<kFp32Chunk>(rows, low - offsets[i], high - offsets[i], ys + offsets[i], block);
    }
  });
  return y;
}

// y (rows, out) = x (rows, in) @ (q (out, in) int8 * scale (out))^T
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  check_x(x);
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(), "q: contiguous int8 (out, in)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale: contiguous fp32 (out)");
  const int64_t rows = x.size(0), in = x.size(1);
  TORCH_CHECK(q.size(1) == in, "q does not match x");
  const float* xs = x.data_ptr<float>();
  std::vector<int16_t> x16(rows * in);
  std::vector<float> row_scales(rows);
  for (int64_t m = 0; m < rows; ++m) {
    row_scales[m] = int16_scale(xs + m * in, in);
    const float inverse = 1.f / row_scales[m];
    for (int64_t k = 0; k < in; ++k) x16[m * in + k] = static_cast<int16_t>(std::lrintf(xs[m * in + k] * inverse));
  }
  const int8_t* qs = q.data_ptr<int8_t>();
  const float* scales = scale.data_ptr<float>();
  return by_output_channel(x, q.size(0), [&]<int R>(int64_t first, int64_t n, float* dots) {
    int8_dots<R>(x16.data() + first * in, in, qs + n * in, dots);
    for (int m = 0; m < R; ++m) dots[m] *= scales[n] * row_scales[first + m];
  });
}

// y = x @ W^T with W[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k / group; q packed two per byte,
// column 2j in the low nibble of byte j. The sum splits into scale * (x . q) + offset * sum(x) per group,
// and x . q into x_even . low + x_odd . high, so the nibbles never need reordering.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const at::Tensor& offset, int64_t group) {
  check_x(x);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed: contiguous uint8 (out, in/2)");
  const int64_t rows = x.size(0), in = x.size(1), groups = in / group;
  TORCH_CHECK(packed.size(1) * 2 == in && in % group == 0 && group % 16 == 0,
              "packed does not match x, or the group size is not a multiple of 16");
  TORCH_CHECK(scale.is_contiguous() && offset.is_contiguous() && scale.size(1) == groups, "scale/offset shape");
  const float* xs = x.data_ptr<float>();
  const int64_t half = in / 2, half_group = group / 2;
  // once per call: each row as int16 even / odd columns with its scale, and its fp32 sum over each group
  std::vector<int16_t> even(rows * half), odd(rows * half);
  std::vector<float> row_scales(rows), group_sums(rows * groups, 0.f);
  for (int64_t m = 0; m < rows; ++m) {
    row_scales[m] = int16_scale(xs + m * in, in);
    const float inverse = 1.f / row_scales[m];
    for (int64_t j = 0; j < half; ++j) {
      even[m * half + j] = static_cast<int16_t>(std::lrintf(xs[m * in + 2 * j] * inverse));
      odd[m * half + j] = static_cast<int16_t>(std::lrintf(xs[m * in + 2 * j + 1] * inverse));
      group_sums[m * groups + j / half_group] += xs[m * in + 2 * j] + xs[m * in + 2 * j + 1];
    }
  }
  const uint8_t* ps = packed.data_ptr<uint8_t>();
  const float* scales = scale.data_ptr<float>();
  const float* offsets = offset.data_ptr<float>();
  return by_output_channel(x, packed.size(0), [&]<int R>(int64_t first, int64_t n, float* dots) {
    int4_dots<R>(even.data() + first * half, odd.data() + first * half, row_scales.data() + first,
                 group_sums.data() + first * groups, half, groups, ps + n * half, half_group, scales + n * groups,
                 offsets + n * groups, dots);
  });
}

}  // namespace

TORCH_LIBRARY(llmctl_decode, m) {
  m.def("fp32_linear(Tensor x, Tensor w) -> Tensor");
  m.def("fp32_linear_group(Tensor x, Tensor[] ws) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale, Tensor offset, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmctl_decode, CPU, m) {
  m.impl("fp32_linear", fp32_linear);
  m.impl("fp32_linear_group", fp32_linear_group);
  m.impl("int8_linear", int8_linear);
  m.impl("int4_linear", int4_linear);
}
