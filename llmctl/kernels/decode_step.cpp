// One whole decode step of an fp32 Llama-family model (llmctl.model.Transformer: grouped-query attention, q/k/v
// and output biases, q/k norms, any RoPE table) for rows of a slot KV cache, the same number of new tokens
// per row (one to decode, a prompt's chunk to prefill), up to kMaxRows tokens in all, in one parallel region.
//
// A small model's step is ~25 projections of a few hundred microseconds or less each. Run one at a time, as
// the compiled graph does, each pays a fork and join of the thread pool and the wrapper's dispatch, allocation
// and bookkeeping between them: a third of a 16.8M model's step on 2 cores, where llama.cpp's C loop pays a
// barrier. Here the threads stay in one region for the whole step: each projection's output channels are
// split over them and a barrier follows only where the next stage reads what other threads wrote. The
// products are fp32_tiles.h's, as in few_rows.cpp; the rest (norms, RoPE, attention over each row's own
// cached positions, SwiGLU) is the model's arithmetic in fp32, checked against it in tests/test_decode_step.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "fp32_tiles.h"

namespace {

using namespace llmctl;

struct Layer {
  const float *input_norm, *q, *k, *v, *o, *post_norm, *gate, *up, *down;
  const float *q_bias = nullptr, *k_bias = nullptr, *v_bias = nullptr, *o_bias = nullptr;
  const float *q_norm = nullptr, *k_norm = nullptr;
  float *keys, *values;  // this layer's cache, (slots, kv_heads, max_len, head_dim)
};

struct Shape {
  int64_t rows, width, d, heads, kv_heads, head_dim, ffn, vocab, max_len;
  float eps;
  int64_t tokens() const { return rows * width; }  // token j of row r is row r * width + j of the activations
  int64_t q_width() const { return heads * head_dim; }
  int64_t kv_width() const { return kv_heads * head_dim; }
  int64_t qkv_width() const { return q_width() + 2 * kv_width(); }
};

// Calls f(begin, end) for the blocks of a projection's `out` output channels that this thread takes: each
// thread takes the next block when it is done with its last (four a thread if all went at one speed), so one
// slowed by the memory system takes fewer and the others do not wait for it at the barrier.
template <typename F>
void take_blocks(std::atomic<int64_t>& next, int64_t out, int n, F&& f) {
  const int64_t block = (out + 32 * n - 1) / (32 * n) * 8;  // whole tiles of 8 channels
  for (int64_t begin = next.fetch_add(block); begin < out; begin = next.fetch_add(block))
    f(begin, std::min(out, begin + block));
}

// y[:, begin:end] = x (rows, in) @ w (out, in)^T over those channels, y's rows `stride` apart.
void project(const float* x, int64_t rows, int64_t in, const float* w, int64_t begin, int64_t end, float* y,
             int64_t stride) {
  if (begin >= end) return;
  auto block = fp32_block(x, in, w, stride);
  fill_channels<kFp32Chunk>(rows, begin, end, y, block);
}

// RMSNorm of `rows` rows of width n, as llmctl.model.layers.RMSNorm: weight * (x / sqrt(mean(x^2) + eps)).
void rms_norm(const float* x, int64_t rows, int64_t n, const float* weight, float eps, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    float squares = 0.f;
    for (int64_t i = 0; i < n; ++i) squares += x[r * n + i] * x[r * n + i];
    const float inverse = 1.f / std::sqrt(squares / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) y[r * n + i] = weight[i] * (x[r * n + i] * inverse);
  }
}

// RoPE in the half-split layout: x * cos + (-x[half:], x[:half]) * sin, in place.
void rotate(float* x, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

// One query head against its cached keys 0..position: softmax(q.k / sqrt(dim)) @ v into out.
void attend(const float* q, const float* keys, const float* values, int64_t position, int64_t dim, float* scores,
            float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  float largest = -INFINITY;
  for (int64_t s = 0; s <= position; ++s) {
    float score = 0.f;
    for (int64_t i = 0; i < dim; ++i) score += q[i] * keys[s * dim + i];
    scores[s] = score * scale;
    largest = std::max(largest, scores[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s <= position; ++s) total += scores[s] = std::exp(scores[s] - largest);
  std::fill(out, out + dim, 0.f);
  for (int64_t s = 0; s <= position; ++s) {
    const float p = scores[s] / total;
    for (int64_t i = 0; i < dim; ++i) out[i] += p * values[s * dim + i];
  }
}

#ifdef LLMCTL_AVX2
// `attend` for a head of V vectors, the query and the output held in registers over every position (at long
// contexts attention is a third of a step, and the scalar loop's loads and stores of `out` dominate it).
template <int V>
void attend_in_registers(const float* q, const float* keys, const float* values, int64_t position,
                         float* scores, float* out) {
  constexpr int64_t dim = V * Lanes::kWidth;
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  Lanes::T query[V], sums[V];
  for (int v = 0; v < V; ++v) query[v] = Lanes::load(q + v * Lanes::kWidth);
  float largest = -INFINITY;
  for (int64_t s = 0; s <= position; ++s) {
    const float* key = keys + s * dim;
    Lanes::T score = Lanes::mul(query[0], Lanes::load(key));
    for (int v = 1; v < V; ++v) score = Lanes::fma(query[v], Lanes::load(key + v * Lanes::kWidth), score);
    scores[s] = Lanes::sum(score) * scale;
    largest = std::max(largest, scores[s]);
  }
  float total = 0.f;
  for (int64_t s = 0; s <= position; ++s) total += scores[s] = std::exp(scores[s] - largest);
  for (int v = 0; v < V; ++v) sums[v] = Lanes::zero();
  for (int64_t s = 0; s <= position; ++s) {
    const Lanes::T p = Lanes::all(scores[s]);
    const float* value = values + s * dim;
    for (int v = 0; v < V; ++v) sums[v] = Lanes::fma(p, Lanes::load(value + v * Lanes::kWidth), sums[v]);
  }
  const Lanes::T inverse = Lanes::all(1.f / total);
  for (int v = 0; v < V; ++v) Lanes::store(out + v * Lanes::kWidth, Lanes::mul(sums[v], inverse));
}
#endif

// `attend` in registers where the head's width is a common one, else in scalar loops.
void attend_head(const float* q, const float* keys, const float* values, int64_t position, int64_t dim,
                 float* scores, float* out) {
#ifdef LLMCTL_AVX2
  switch (dim == Lanes::kWidth * (dim / Lanes::kWidth) ? dim / Lanes::kWidth : 0) {
    case 2: return attend_in_registers<2>(q, keys, values, position, scores, out);
    case 4: return attend_in_registers<4>(q, keys, values, position, scores, out);
    case 8: return attend_in_registers<8>(q, keys, values, position, scores, out);
    case 16: return attend_in_registers<16>(q, keys, values, position, scores, out);
  }
#endif
  attend(q, keys, values, position, dim, scores, out);
}

// Kv head g of row r: its new keys (after their norm and RoPE) and values written into the cache at their
// positions, before any query reads them.
void store_keys(const Shape& s, const Layer& layer, float* qkv, const int64_t* positions, const float* cos,
                const float* sin, int64_t r, int64_t g) {
  const int64_t dim = s.head_dim, cached = (r * s.kv_heads + g) * s.max_len * dim;
  for (int64_t j = 0; j < s.width; ++j) {
    const int64_t position = positions[r] + j;
    float* key = qkv + (r * s.width + j) * s.qkv_width() + s.q_width() + g * dim;
    if (layer.k_norm) rms_norm(key, 1, dim, layer.k_norm, s.eps, key);
    rotate(key, cos + position * dim, sin + position * dim, dim);
    std::memcpy(layer.keys + cached + position * dim, key, dim * sizeof(float));
    std::memcpy(layer.values + cached + position * dim, key + s.kv_width(), dim * sizeof(float));
  }
}

// Query head h of row r, for each new token: its norm and RoPE, then attention over the row's cache up to the
// token's own position.
void attend_query(const Shape& s, const Layer& layer, float* qkv, const int64_t* positions, const float* cos,
                  const float* sin, int64_t r, int64_t h, float* scores, float* out) {
  const int64_t dim = s.head_dim, g = h / (s.heads / s.kv_heads);
  const int64_t cached = (r * s.kv_heads + g) * s.max_len * dim;
  for (int64_t j = 0; j < s.width; ++j) {
    const int64_t position = positions[r] + j, token = r * s.width + j;
    float* query = qkv + token * s.qkv_width() + h * dim;
    if (layer.q_norm) rms_norm(query, 1, dim, layer.q_norm, s.eps, query);
    rotate(query, cos + position * dim, sin + position * dim, dim);
    attend_head(query, layer.keys + cached, layer.values + cached, position, dim, scores,
                out + token * s.q_width() + h * dim);
  }
}

// y[:, begin:end] += bias[begin:end] (nothing without a bias).
void add_bias(float* y, int64_t rows, int64_t stride, const float* bias, int64_t begin, int64_t end) {
  if (!bias) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = begin; c < end; ++c) y[r * stride + c] += bias[c];
}

// Scratch of the step, shared by the threads; `normed` and `scores` are per thread.
struct Scratch {
  float *x, *normed, *qkv, *attention, *projected, *gate, *up, *scores;
};

constexpr int kProjections = 4;  // what a layer hands out in blocks: q/k/v, o, gate/up, down

// Thread t's part of one layer; the barriers are the only points where threads wait for each other.
void layer_step(const Shape& s, const Layer& layer, const Scratch& w, std::atomic<int64_t>* next,
                const int64_t* positions, const float* cos, const float* sin, int t, int n) {
  const int64_t rows = s.tokens(), d = s.d;
  float* normed = w.normed + t * rows * std::max(d, s.ffn);
  rms_norm(w.x, rows, d, layer.input_norm, s.eps, normed);
  const int64_t widths[3] = {s.q_width(), s.kv_width(), s.kv_width()};
  const float* weights[3] = {layer.q, layer.k, layer.v};
  const float* biases[3] = {layer.q_bias, layer.k_bias, layer.v_bias};
  take_blocks(next[0], s.qkv_width(), n, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0, offset = 0; i < 3; offset += widths[i++]) {
      const int64_t low = std::max(begin, offset), high = std::min(end, offset + widths[i]);
      if (low >= high) continue;
      project(normed, rows, d, weights[i], low - offset, high - offset, w.qkv + offset, s.qkv_width());
      add_bias(w.qkv + offset, rows, s.qkv_width(), biases[i], low - offset, high - offset);
    }
  });
#pragma omp barrier
  for (int64_t unit = t; unit < s.rows * s.kv_heads; unit += n)
    store_keys(s, layer, w.qkv, positions, cos, sin, unit / s.kv_heads, unit % s.kv_heads);
#pragma omp barrier
  // by query head, so that 9 heads over 3 kv heads split 5:4, each thread's in one run: the heads of a group
  // follow each other and read its keys and values from the core's cache after the first
  const int64_t units = s.rows * s.heads;
  for (int64_t unit = t; unit < units; unit += n)
    attend_query(s, layer, w.qkv, positions, cos, sin, unit / s.heads, unit % s.heads, w.scores + t * s.max_len,
                 w.attention);
#pragma omp barrier
  take_blocks(next[1], d, n, [&](int64_t begin, int64_t end) {
    project(w.attention, rows, s.q_width(), layer.o, begin, end, w.projected, d);
    add_bias(w.projected, rows, d, layer.o_bias, begin, end);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = begin; c < end; ++c) w.x[r * d + c] += w.projected[r * d + c];
  });
#pragma omp barrier
  rms_norm(w.x, rows, d, layer.post_norm, s.eps, normed);
  take_blocks(next[2], s.ffn, n, [&](int64_t begin, int64_t end) {
    project(normed, rows, d, layer.gate, begin, end, w.gate, s.ffn);
    project(normed, rows, d, layer.up, begin, end, w.up, s.ffn);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = begin; c < end; ++c) {
        const float g = w.gate[r * s.ffn + c];
        w.gate[r * s.ffn + c] = g / (1.f + std::exp(-g)) * w.up[r * s.ffn + c];
      }
  });
#pragma omp barrier
  take_blocks(next[3], d, n, [&](int64_t begin, int64_t end) {
    project(w.gate, rows, s.ffn, layer.down, begin, end, w.projected, d);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = begin; c < end; ++c) w.x[r * d + c] += w.projected[r * d + c];
  });
#pragma omp barrier
}

const float* fp32(const at::Tensor& t, at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.sizes() == shape, what,
              ": contiguous fp32 of shape ", shape, ", got ", t.sizes());
  return t.data_ptr<float>();
}

std::vector<Layer> read_layers(const Shape& s, at::TensorList weights, at::TensorList keys, at::TensorList values,
                               bool attention_bias, bool output_bias, bool qk_norm) {
  const int64_t per_layer = 9 + 3 * attention_bias + output_bias + 2 * qk_norm;
  const int64_t n_layer = static_cast<int64_t>(keys.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == n_layer * per_layer && values.size() == keys.size(),
              "weights: ", per_layer, " tensors per layer");
  const int64_t d = s.d, q = s.q_width(), kv = s.kv_width(), slots = keys[0].size(0);
  TORCH_CHECK(slots >= s.rows, "the cache has fewer slots than rows");
  std::vector<Layer> layers(n_layer);
  for (int64_t l = 0; l < n_layer; ++l) {
    const at::Tensor* w = weights.data() + l * per_layer;
    Layer& layer = layers[l];
    layer.input_norm = fp32(w[0], {d}, "input norm");
    layer.q = fp32(w[1], {q, d}, "q");
    layer.k = fp32(w[2], {kv, d}, "k");
    layer.v = fp32(w[3], {kv, d}, "v");
    layer.o = fp32(w[4], {d, q}, "o");
    layer.post_norm = fp32(w[5], {d}, "post-attention norm");
    layer.gate = fp32(w[6], {s.ffn, d}, "gate");
    layer.up = fp32(w[7], {s.ffn, d}, "up");
    layer.down = fp32(w[8], {d, s.ffn}, "down");
    int64_t next = 9;
    if (attention_bias) {
      layer.q_bias = fp32(w[next++], {q}, "q bias");
      layer.k_bias = fp32(w[next++], {kv}, "k bias");
      layer.v_bias = fp32(w[next++], {kv}, "v bias");
    }
    if (output_bias) layer.o_bias = fp32(w[next++], {d}, "o bias");
    if (qk_norm) {
      layer.q_norm = fp32(w[next++], {s.head_dim}, "q norm");
      layer.k_norm = fp32(w[next++], {s.head_dim}, "k norm");
    }
    layer.keys = const_cast<float*>(fp32(keys[l], {slots, s.kv_heads, s.max_len, s.head_dim}, "keys"));
    layer.values = const_cast<float*>(fp32(values[l], {slots, s.kv_heads, s.max_len, s.head_dim}, "values"));
  }
  return layers;
}

// The logits of new tokens, ids (rows, width), row r's after its cached positions[r] ones, each token's key
// and value written into the cache at its position: every token's (rows * width, vocab), or with `last_only`
// each row's last one's (rows, vocab).
at::Tensor fp32_decode_step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& embed,
                            at::TensorList weights, const at::Tensor& final_norm, const at::Tensor& head,
                            at::TensorList keys, at::TensorList values, const at::Tensor& cos,
                            const at::Tensor& sin, int64_t heads, int64_t kv_heads, double eps,
                            bool attention_bias, bool output_bias, bool qk_norm, bool last_only) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                  ids.is_contiguous() && positions.is_contiguous() && ids.size(0) == positions.numel(),
              "ids: contiguous int64 (rows, width); positions: contiguous int64 (rows,)");
  TORCH_CHECK(!keys.empty(), "no layers");
  Shape s{ids.size(0), ids.size(1), embed.size(1), heads, kv_heads, keys[0].size(3), weights[6].size(0),
          head.size(0), keys[0].size(2), static_cast<float>(eps)};
  TORCH_CHECK(s.tokens() >= 1 && s.tokens() <= kMaxRows, "1 to ", kMaxRows, " new tokens in all");
  TORCH_CHECK(heads % kv_heads == 0 && keys[0].size(1) == kv_heads, "heads do not match the cache");
  const std::vector<Layer> layers = read_layers(s, weights, keys, values, attention_bias, output_bias, qk_norm);
  const float* embedding = fp32(embed, {embed.size(0), s.d}, "embedding");
  const float* norm = fp32(final_norm, {s.d}, "final norm");
  const float* lm_head = fp32(head, {s.vocab, s.d}, "head");
  const float* cos_table = fp32(cos, {cos.size(0), s.head_dim}, "cos");
  const float* sin_table = fp32(sin, {cos.size(0), s.head_dim}, "sin");
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.tokens(); ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < embed.size(0), "token id out of range");
  for (int64_t r = 0; r < s.rows; ++r)
    TORCH_CHECK(position[r] >= 0 && position[r] + s.width <= std::min(s.max_len, cos.size(0)),
                "positions past the cache");
  const int n = std::max(1, at::get_num_threads());
  const int64_t widest = std::max(s.d, s.ffn);
  const int64_t tokens = s.tokens();
  auto scratch = at::empty({tokens * (s.d + n * widest + s.qkv_width() + s.q_width() + s.d + 2 * s.ffn) +
                            n * s.max_len},
                           embed.options());
  float* next = scratch.data_ptr<float>();
  auto carve = [&](int64_t size) { return std::exchange(next, next + size); };
  Scratch w;
  w.x = carve(tokens * s.d), w.normed = carve(n * tokens * widest), w.qkv = carve(tokens * s.qkv_width());
  w.attention = carve(tokens * s.q_width()), w.projected = carve(tokens * s.d);
  w.gate = carve(tokens * s.ffn), w.up = carve(tokens * s.ffn), w.scores = carve(n * s.max_len);
  for (int64_t i = 0; i < tokens; ++i) std::memcpy(w.x + i * s.d, embedding + id[i] * s.d, s.d * sizeof(float));
  const int64_t outputs = last_only ? s.rows : tokens;
  auto logits = at::empty({outputs, s.vocab}, embed.options());
  float* out = logits.data_ptr<float>();
  std::vector<std::atomic<int64_t>> taken(kProjections * layers.size() + 1);  // zeroed: no block taken yet
#pragma omp parallel num_threads(n)
  {
    const int t = omp_get_thread_num(), threads = omp_get_num_threads();
    for (size_t l = 0; l < layers.size(); ++l)
      layer_step(s, layers[l], w, taken.data() + kProjections * l, position, cos_table, sin_table, t, threads);
    float* normed = w.normed + t * tokens * widest;
    for (int64_t i = 0; i < outputs; ++i) {  // the last token of each row, or every token
      const int64_t token = last_only ? i * s.width + s.width - 1 : i;
      rms_norm(w.x + token * s.d, 1, s.d, norm, s.eps, normed + i * s.d);
    }
    take_blocks(taken.back(), s.vocab, threads, [&](int64_t begin, int64_t end) {
      project(normed, outputs, s.d, lm_head, begin, end, out, s.vocab);
    });
  }
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmctl_decode, m) {
  m.def(
      "fp32_decode_step(Tensor ids, Tensor positions, Tensor embed, Tensor[] weights, Tensor final_norm, "
      "Tensor head, Tensor(a!)[] keys, Tensor(b!)[] values, Tensor cos, Tensor sin, int heads, int kv_heads, "
      "float eps, bool attention_bias, bool output_bias, bool qk_norm, bool last_only) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmctl_decode, CPU, m) { m.impl("fp32_decode_step", fp32_decode_step); }
