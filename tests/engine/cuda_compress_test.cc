// The prompt compression kernels (engine/cuda/compress_prompt.cu) against their CPU twins in
// memory/compress, on fresh random data each run (the seed is printed):
//   scores      vs SnapKvScores(ObservationAttention(...)) by relative error;
//   top-k       vs SelectTopWithWindow on the same uploaded scores, exactly (ties included);
//   ranges      vs SelectStreamingLlm / KeepAll, exactly;
//   channels    vs SelectChannels(ThinkChannelScores(...)), exactly but for near-ties;
//   kept rows   vs a host model of the pages, bit for bit, every other pool byte still poison.
// Q/K/V rows live on the device with NaN padding past their heads (a read outside a head's
// channels poisons the result); some cases pad rows by 3 elements, which takes the kernels'
// unaligned (scalar) paths. Every output buffer is NaN / -1 poisoned before the launch.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <iterator>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/cuda/compress_prompt.h"
#include "memory/compress/channel_pruning.h"
#include "memory/compress/decode_eviction.h"
#include "memory/compress/observation.h"
#include "memory/compress/token_selection.h"
#include "tests/engine/cuda_test_util.h"

namespace kvtrim::engine::cuda {
namespace {

namespace mc = memory::compress;
using testing::Download;
using testing::ExpectClose;
using testing::Poisoned;
using testing::Upload;

struct Heads {
  const char* name;
  AttentionShape shape;
};
const Heads kHeads[] = {{"smollm2", {9, 3, 64, 0}},
                        {"llama3", {32, 8, 128, 0}},
                        {"tiny", {4, 2, 16, 0}},
                        {"group12", {12, 1, 32, 0}}};
const int kLengths[] = {40, 300, 1000, 4109};
const int kWindows[] = {1, 8, 32};
const int kPads[] = {0, 8, 3};  // row padding in elements: aligned, strided, unaligned

std::string ShapeName(const Heads& heads) {
  const AttentionShape& s = heads.shape;
  return absl::StrCat(heads.name, " ", s.n_heads, "/", s.n_kv_heads, "x", s.head_dim);
}

// (rows, width) packed floats as device rows of `width + pad` bf16, the padding NaN.
DeviceBuffer UploadRows(const std::vector<float>& packed, int width, int pad) {
  const size_t rows = packed.size() / width, stride = width + pad;
  std::vector<uint16_t> bits(rows * stride, 0xFFFF);
  for (size_t r = 0; r < rows; ++r) {
    for (int c = 0; c < width; ++c) bits[r * stride + c] = FloatToBf16Bits(packed[r * width + c]);
  }
  return Upload(bits);
}

// One layer of a prompt: rotated Q, K and V rounded to bf16, packed for the CPU and padded rows
// on the device. With `tied_channels`, q is ±1 and k is ±(1 + channel % 3): ThinK scores then
// tie exactly in three groups of channels, in fp32 and in double alike.
class Prompt {
 public:
  Prompt(const AttentionShape& shape, int n, int pad, std::mt19937& rng, bool tied_channels = false)
      : shape_(shape),
        q_width_(shape.n_heads * shape.head_dim),
        kv_width_(shape.n_kv_heads * shape.head_dim),
        pad_(pad) {
    // Queries sharper than unit scores, so that the softmax is not flat.
    q = testing::RandomBf16(rng, size_t{1} * n * q_width_, 2.0f);
    k = testing::RandomBf16(rng, size_t{1} * n * kv_width_);
    v = testing::RandomBf16(rng, size_t{1} * n * kv_width_);
    if (tied_channels) {
      std::bernoulli_distribution sign(0.5);
      for (float& x : q) x = sign(rng) ? 1.0f : -1.0f;
      for (size_t i = 0; i < k.size(); ++i) {
        k[i] = (sign(rng) ? 1.0f : -1.0f) * static_cast<float>(1 + i % shape.head_dim % 3);
      }
    }
    d_q_ = UploadRows(q, q_width_, pad);
    d_k_ = UploadRows(k, kv_width_, pad);
    d_v_ = UploadRows(v, kv_width_, pad);
  }

  const __nv_bfloat16* d_q() const { return d_q_.as<__nv_bfloat16>(); }
  const __nv_bfloat16* d_k() const { return d_k_.as<__nv_bfloat16>(); }
  const __nv_bfloat16* d_v() const { return d_v_.as<__nv_bfloat16>(); }
  int q_stride() const { return q_width_ + pad_; }
  int kv_stride() const { return kv_width_ + pad_; }
  mc::HeadShape heads() const { return {shape_.n_heads, shape_.n_kv_heads, shape_.head_dim}; }
  // (w, n_heads * head_dim): the last w query rows.
  std::vector<float> Queries(int w) const {
    return std::vector<float>(q.end() - static_cast<ptrdiff_t>(w) * q_width_, q.end());
  }

  std::vector<float> q, k, v;  // (n, n_heads * head_dim), (n, n_kv_heads * head_dim) x 2

 private:
  AttentionShape shape_;
  int q_width_, kv_width_, pad_;
  DeviceBuffer d_q_, d_k_, d_v_;
};

class CudaCompressTest : public testing::CudaTest {
 protected:
  CudaCompressTest() : CudaTest("CUDA tests", /*print_seed=*/true) {}

  // The kernels' kept lists for a host-side launch, downloaded: (n_kv_heads, kept_tokens).
  std::vector<int32_t> RunTop(const std::vector<float>& scores, int n, int w, int n_kv_heads,
                              int kept_tokens) {
    DeviceBuffer d_scores = Upload(scores.empty() ? std::vector<float>{0.0f} : scores);
    const size_t count = static_cast<size_t>(n_kv_heads) * kept_tokens;
    DeviceBuffer d_kept = Poisoned<int32_t>(std::max<size_t>(count, 1));
    EXPECT_EQ(LaunchTopWithWindow(d_scores.as<float>(), n, w, n_kv_heads, kept_tokens,
                                  d_kept.as<int32_t>(), stream_),
              cudaSuccess);
    EXPECT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
    return Download<int32_t>(d_kept, count);
  }
};

// ---- SnapKV scores ----

// The CPU reference sums probabilities in double from fp32 logits made by a sequential fp32 dot
// product; the kernel's logits come from bf16 tensor-core products (exact) with fp32 accumulation
// in another order. With |logit| < ~10 the logits differ by ~1e-6, i.e. ~1e-6 relative in every
// probability, and the window sums and the pooling add fp32 roundings (~1e-7): expected errors
// are ~1e-6. 1e-4 leaves that 100x room while a wrong mask (one key too many or too few), a wrong
// pooling neighbour or a wrong group average costs >= 1 / n ≈ 2e-4 on the longest prompts and
// far more on the short ones.
constexpr double kScoresBound = 1e-4;

TEST_F(CudaCompressTest, SnapKvScoresMatchCpu) {
  struct Case {
    Heads heads;
    int n, w, pad;
  };
  std::vector<Case> cases;
  int index = 0;
  for (const Heads& heads : kHeads) {
    for (int n : kLengths) {
      for (int w : kWindows) cases.push_back({heads, n, w, kPads[index++ % 3]});
    }
  }
  cases.push_back({kHeads[0], 9000, 32, 0});  // more key tiles than chunks: several per chunk
  cases.push_back({kHeads[0], 9000, 8, 3});
  cases.push_back({kHeads[0], 1000, 300, 3});  // long windows: several query tiles per head
  cases.push_back({kHeads[3], 4109, 100, 0});
  for (const Case& c : cases) {
    const Prompt prompt(c.heads.shape, c.n, c.pad, rng_);
    const mc::HeadShape heads = prompt.heads();
    std::vector<float> probs(static_cast<size_t>(heads.n_heads) * c.w * c.n);
    mc::ObservationAttention(prompt.Queries(c.w), prompt.k, c.n, c.w, heads, probs);
    const size_t workspace_bytes = SnapKvWorkspaceBytes(c.n, c.w, c.heads.shape);
    ASSERT_GT(workspace_bytes, 0u);
    DeviceBuffer d_workspace = Poisoned<float>(workspace_bytes / sizeof(float));
    const size_t count = static_cast<size_t>(heads.n_kv_heads) * (c.n - c.w);
    for (int kernel_size : {5, 7}) {
      for (mc::Pooling pooling : {mc::Pooling::kAvg, mc::Pooling::kMax}) {
        const std::vector<float> ref =
            mc::SnapKvScores(probs, c.n, c.w, heads, kernel_size, pooling);
        DeviceBuffer d_scores = Poisoned<float>(count);
        ASSERT_CUDA(LaunchSnapKvScores(prompt.d_q(), prompt.q_stride(), prompt.d_k(),
                                       prompt.kv_stride(), c.n, c.w, c.heads.shape, kernel_size,
                                       pooling == mc::Pooling::kAvg, d_workspace.as<float>(),
                                       d_scores.as<float>(), stream_));
        Sync();
        ExpectClose(
            "snapkv scores",
            absl::StrCat(ShapeName(c.heads), " n ", c.n, " w ", c.w, " ",
                         pooling == mc::Pooling::kAvg ? "avg" : "max", kernel_size, " pad ", c.pad),
            Download<float>(d_scores, count), ref, kScoresBound);
      }
    }
  }
}

// ---- CORM prompt states ----

// recent_attention is one probability per key, made as the SnapKV sums' terms are: kScoresBound.
// last_important compares each window query's weight with alpha / t; where a weight lies within
// rounding of that line the engines may decide either way, so the kernel's answer must lie
// between the reference's with alpha 0.1% higher (fewer important, an earlier or no position)
// and 0.1% lower (more, a later one); for every other key the two agree and so must the kernel.
TEST_F(CudaCompressTest, CormPromptStatesMatchCpu) {
  struct Case {
    Heads heads;
    int n, w, pad;
    double alpha;
  };
  std::vector<Case> cases;
  const double alphas[] = {1.0, 0.5, 2.0};
  int index = 0;
  for (const Heads& heads : kHeads) {
    for (int n : {40, 300, 1000}) {
      for (int w : kWindows) {
        cases.push_back({heads, n, w, kPads[index % 3], alphas[index % 3]});
        ++index;
      }
    }
  }
  cases.push_back({kHeads[2], 40, 40, 3, 1.0});  // the whole prompt observed
  cases.push_back({kHeads[0], 4109, 32, 0, 1.0});
  cases.push_back({kHeads[1], 1000, 100, 8, 1.0});  // several query tiles per head
  int ambiguous = 0, total = 0;
  for (const Case& c : cases) {
    const Prompt prompt(c.heads.shape, c.n, c.pad, rng_);
    const mc::HeadShape heads = prompt.heads();
    std::vector<float> probs(static_cast<size_t>(heads.n_heads) * c.w * c.n);
    mc::ObservationAttention(prompt.Queries(c.w), prompt.k, c.n, c.w, heads, probs);
    auto reference = [&](double alpha) {
      mc::CormConfig config;
      config.alpha = alpha;
      return mc::CormPromptStates(config, probs, c.n, c.w, heads);
    };
    const std::vector<mc::CormKeyState> ref = reference(c.alpha);
    const std::vector<mc::CormKeyState> strict = reference(c.alpha * 1.001);
    const std::vector<mc::CormKeyState> loose = reference(c.alpha * 0.999);
    const size_t count = static_cast<size_t>(heads.n_kv_heads) * c.n;
    DeviceBuffer d_workspace =
        Poisoned<float>(CormPromptWorkspaceBytes(c.n, c.w, c.heads.shape) / sizeof(float));
    DeviceBuffer d_states = Poisoned<KeyState>(count);
    ASSERT_CUDA(LaunchCormPromptStates(prompt.d_q(), prompt.q_stride(), prompt.d_k(),
                                       prompt.kv_stride(), c.n, c.w, c.heads.shape, c.alpha,
                                       d_workspace.as<float>(), d_states.as<KeyState>(), stream_));
    Sync();
    const std::vector<KeyState> out = Download<KeyState>(d_states, count);
    const std::string name = absl::StrCat(ShapeName(c.heads), " n ", c.n, " w ", c.w, " alpha ",
                                          c.alpha, " pad ", c.pad);
    std::vector<float> got_attention, want_attention;
    int wrong = 0;
    for (size_t i = 0; i < count; ++i) {
      EXPECT_EQ(out[i].position, ref[i].position) << name << " key " << i;
      got_attention.push_back(out[i].recent_attention);
      want_attention.push_back(ref[i].recent_attention);
      const int got = out[i].last_important;
      if (got < strict[i].last_important || got > loose[i].last_important) ++wrong;
      if (strict[i].last_important != loose[i].last_important) ++ambiguous;
    }
    total += static_cast<int>(count);
    EXPECT_EQ(wrong, 0) << name << ": last_important outside the reference's rounding band";
    ExpectClose("corm recent attention", name, got_attention, want_attention, kScoresBound);
  }
  std::printf("[parity] corm last_important: %d of %d keys within rounding of a threshold\n",
              ambiguous, total);
}

// ---- top-k with the window ----

enum class ScoreKind { kContinuous, kTied, kSigned };

// (n_kv_heads, prefix) scores: continuous in [0, 1); quantized to five values, +0 and -0
// among them (they tie, as the CPU's == has it); or signed normals.
std::vector<float> MakeScores(ScoreKind kind, size_t count, std::mt19937& rng) {
  std::vector<float> scores(count);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::uniform_int_distribution<int> level(0, 4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float levels[] = {-0.0f, 0.0f, 0.25f, 0.5f, 1.0f};
  for (float& s : scores) {
    s = kind == ScoreKind::kContinuous ? uniform(rng)
        : kind == ScoreKind::kTied     ? levels[level(rng)]
                                       : normal(rng);
  }
  return scores;
}

TEST_F(CudaCompressTest, TopWithWindowMatchesCpuExactly) {
  struct Case {
    int n, w, n_kv_heads;
  };
  std::vector<Case> cases;
  for (int n : {40, 300, 1000, 4109, 9000}) {
    for (int w : kWindows) cases.push_back({n, w, n == 300 ? 8 : 3});
  }
  int mismatches = 0;
  for (const Case& c : cases) {
    const int prefix = c.n - c.w;
    std::uniform_int_distribution<int> middle(c.w + 1, c.n - 2);
    // kept_tokens - w = 0 and 1, somewhere in the middle, all but one, all.
    for (int kept_tokens : {c.w, c.w + 1, middle(rng_), c.n - 1, c.n}) {
      for (ScoreKind kind : {ScoreKind::kContinuous, ScoreKind::kTied, ScoreKind::kSigned}) {
        const std::vector<float> scores =
            MakeScores(kind, static_cast<size_t>(c.n_kv_heads) * prefix, rng_);
        const mc::LayerSelection ref =
            mc::SelectTopWithWindow(scores, c.n, c.w, c.n_kv_heads, kept_tokens);
        const std::vector<int32_t> out = RunTop(scores, c.n, c.w, c.n_kv_heads, kept_tokens);
        EXPECT_EQ(out, ref.tokens) << "n " << c.n << " w " << c.w << " kept " << kept_tokens
                                   << " kind " << static_cast<int>(kind);
        mismatches += out != ref.tokens;
      }
    }
  }
  // The longest prompts the server takes: O(n) per head, not O(n log n) nor n in shared memory.
  for (ScoreKind kind : {ScoreKind::kContinuous, ScoreKind::kTied}) {
    const int n = 131072, w = 32, n_kv_heads = 2, kept_tokens = 13107;
    const std::vector<float> scores = MakeScores(kind, size_t{1} * n_kv_heads * (n - w), rng_);
    const mc::LayerSelection ref = mc::SelectTopWithWindow(scores, n, w, n_kv_heads, kept_tokens);
    const std::vector<int32_t> out = RunTop(scores, n, w, n_kv_heads, kept_tokens);
    EXPECT_EQ(out, ref.tokens) << "n " << n << " kind " << static_cast<int>(kind);
    mismatches += out != ref.tokens;
  }
  std::printf("[parity] %-26s %-58s mismatching cases %d (exact)\n", "top-k + window",
              "n 40..131072, w 1/8/32, ties", mismatches);
}

// ---- fixed ranges ----

TEST_F(CudaCompressTest, RangeKeptMatchesCpuExactly) {
  struct Case {
    int n, n_kv_heads, kept_tokens, sinks;
  };
  const Case cases[] = {{40, 3, 40, 4},       {40, 3, 10, 4},     {300, 8, 100, 0},
                        {300, 8, 3, 4},       {1000, 1, 999, 4},  {4109, 8, 1, 0},
                        {4109, 2, 4109, 0},   {9000, 3, 2048, 4}, {1, 1, 1, 4},
                        {131072, 8, 13107, 4}};
  for (const Case& c : cases) {
    const size_t count = static_cast<size_t>(c.n_kv_heads) * c.kept_tokens;
    DeviceBuffer d_kept = Poisoned<int32_t>(count);
    ASSERT_CUDA(
        LaunchRangeKept(c.n, c.n_kv_heads, c.kept_tokens, c.sinks, d_kept.as<int32_t>(), stream_));
    Sync();
    const mc::LayerSelection ref =
        c.kept_tokens == c.n ? mc::KeepAll(c.n, c.n_kv_heads)
                             : mc::SelectStreamingLlm(c.n, c.n_kv_heads, c.kept_tokens, c.sinks);
    EXPECT_EQ(Download<int32_t>(d_kept, count), ref.tokens)
        << "n " << c.n << " kept " << c.kept_tokens << " sinks " << c.sinks;
  }
}

// ---- ThinK channels ----

// GPU channels against the CPU's: the same set, or one that differs only in channels whose CPU
// scores are within 1e-5 (relative) of the CPU's threshold (the key_width-th best score). The
// kernel sums in fp32, the reference in double; near-ties may swap, nothing else. Returns the
// swapped channels.
int CompareChannels(const std::vector<uint16_t>& out, const mc::ChannelSelection& ref,
                    const std::vector<float>& ref_scores, int head_dim, const std::string& what) {
  int swaps = 0;
  for (int h = 0; h < ref.n_kv_heads; ++h) {
    const std::span<const uint16_t> want = ref.head(h);
    const std::vector<uint16_t> got(out.begin() + static_cast<size_t>(h) * ref.kept_channels,
                                    out.begin() + static_cast<size_t>(h + 1) * ref.kept_channels);
    EXPECT_TRUE(std::adjacent_find(got.begin(), got.end(), std::greater_equal<>()) == got.end())
        << what << " head " << h << ": not strictly ascending";
    if (std::equal(got.begin(), got.end(), want.begin(), want.end())) continue;
    const float* scores = &ref_scores[static_cast<size_t>(h) * head_dim];
    float threshold = INFINITY;
    for (uint16_t c : want) threshold = std::min(threshold, scores[c]);
    std::vector<uint16_t> only_gpu, only_cpu;
    std::set_difference(got.begin(), got.end(), want.begin(), want.end(),
                        std::back_inserter(only_gpu));
    std::set_difference(want.begin(), want.end(), got.begin(), got.end(),
                        std::back_inserter(only_cpu));
    EXPECT_EQ(only_gpu.size(), only_cpu.size()) << what << " head " << h;
    for (const std::vector<uint16_t>* side : {&only_gpu, &only_cpu}) {
      for (uint16_t c : *side) {
        EXPECT_TRUE(c < head_dim && std::abs(scores[c] - threshold) <= 1e-5f * threshold)
            << what << " head " << h << " channel " << c << " score " << scores[c] << " threshold "
            << threshold;
      }
    }
    swaps += static_cast<int>(only_gpu.size());
  }
  return swaps;
}

TEST_F(CudaCompressTest, ThinkChannelsMatchCpu) {
  int swaps = 0, cases = 0;
  int index = 0;
  for (const Heads& heads : kHeads) {
    const int d = heads.shape.head_dim, n_kv_heads = heads.shape.n_kv_heads;
    for (int n : kLengths) {
      for (bool tied : {false, true}) {
        const int pad = kPads[index % 3], w_q = std::min(n, kWindows[index % 3]);
        ++index;
        const Prompt prompt(heads.shape, n, pad, rng_, tied);
        // Kept lists: every token, or SnapKV-like picks (a third of the prefix, then a window).
        const int w = 8, kept_tokens = w + (n - w) / 3;
        const std::vector<float> picks =
            MakeScores(ScoreKind::kContinuous, static_cast<size_t>(n_kv_heads) * (n - w), rng_);
        for (const mc::LayerSelection& selection :
             {mc::KeepAll(n, n_kv_heads),
              mc::SelectTopWithWindow(picks, n, w, n_kv_heads, kept_tokens)}) {
          const std::vector<float> ref_scores = mc::ThinkChannelScores(
              prompt.Queries(w_q), w_q, prompt.k, n, &selection, prompt.heads());
          DeviceBuffer d_kept = Upload(selection.tokens);
          DeviceBuffer d_workspace = Poisoned<float>(ThinkWorkspaceBytes(heads.shape) / 4);
          for (int key_width : {1, d / 2, d - 1, d}) {
            const mc::ChannelSelection ref =
                mc::SelectChannels(ref_scores, n_kv_heads, d, key_width);
            const size_t count = static_cast<size_t>(n_kv_heads) * key_width;
            DeviceBuffer d_channels = Poisoned<uint16_t>(count);
            ASSERT_CUDA(LaunchThinkChannels(
                prompt.d_q(), prompt.q_stride(), prompt.d_k(), prompt.kv_stride(), n, w_q,
                d_kept.as<int32_t>(), selection.kept_per_head, heads.shape, key_width,
                d_workspace.as<float>(), d_channels.as<uint16_t>(), stream_));
            Sync();
            const std::string what =
                absl::StrCat(ShapeName(heads), " n ", n, " w_q ", w_q, " kept ",
                             selection.kept_per_head, " width ", key_width, tied ? " tied" : "");
            const std::vector<uint16_t> out = Download<uint16_t>(d_channels, count);
            const int case_swaps = CompareChannels(out, ref, ref_scores, d, what);
            // Exact ties are exact on both sides: the lower channel must win.
            if (tied) {
              EXPECT_EQ(case_swaps, 0) << what;
            }
            swaps += case_swaps;
            ++cases;
          }
        }
      }
    }
  }
  std::printf("[parity] %-26s %-58s near-tie swaps %d in %d cases\n", "think channels",
              "4 shapes, n 40..4109, widths 1, d/2, d-1, d", swaps, cases);
}

// ---- kept rows to their pages ----

struct WriteCase {
  Heads heads;
  int n, kept_tokens, thin_rows, key_width;
  bool with_channels;
  int extra_page_elements;  // past the rows of a page (never written); odd: unaligned pages
  int pad;
};

TEST_F(CudaCompressTest, WriteKeptRowsMatchesHostModel) {
  const Heads smol = kHeads[0], llama = kHeads[1];
  const WriteCase cases[] = {
      {smol, 300, 100, 60, 32, true, 8, 0},
      {smol, 300, 100, 0, 32, true, 8, 0},
      {smol, 300, 100, 100, 32, true, 8, 8},
      {smol, 300, 100, 60, 27, true, 8, 0},
      {smol, 300, 100, 100, 27, true, 5, 3},
      {smol, 300, 100, 60, 64, false, 8, 0},
      {smol, 40, 40, 33, 64, false, 5, 0},
      {smol, 40, 1, 1, 27, true, 8, 0},
      // Thinned keys but every kept row recent (a short prompt under ThinK's recent rows): no
      // channel set exists for the layer.
      {smol, 300, 20, 0, 32, false, 8, 0},
      {llama, 1000, 300, 250, 64, true, 8, 0},
      {llama, 1000, 300, 300, 40, true, 0, 3},
  };
  for (const WriteCase& c : cases) {
    const AttentionShape& shape = c.heads.shape;
    const int d = shape.head_dim, n_kv_heads = shape.n_kv_heads;
    const int full_row = n_kv_heads * d, thin_row = n_kv_heads * c.key_width;
    const int64_t page_elements = 3 * full_row + c.extra_page_elements;
    const int rows_per_page = 3, thin_rows_per_page = static_cast<int>(page_elements / thin_row);
    const int recent = c.kept_tokens - c.thin_rows;
    auto pages_for = [](int rows, int per_page) { return (rows + per_page - 1) / per_page; };
    const int lists[4] = {pages_for(c.thin_rows, thin_rows_per_page),
                          pages_for(c.thin_rows, rows_per_page), pages_for(recent, rows_per_page),
                          pages_for(recent, rows_per_page)};
    const int total_pages = lists[0] + lists[1] + lists[2] + lists[3] + 3;  // 3 never used
    const std::vector<int32_t> order = testing::ShuffledPages(total_pages, rng_);
    std::vector<int32_t> page_ids[4];
    for (int list = 0, next = 0; list < 4; ++list) {
      page_ids[list].assign(order.begin() + next, order.begin() + next + lists[list]);
      next += lists[list];
      if (page_ids[list].empty()) page_ids[list].push_back(-1);  // never read
    }

    const Prompt prompt(shape, c.n, c.pad, rng_);
    const std::vector<float> picks =
        MakeScores(ScoreKind::kContinuous, static_cast<size_t>(n_kv_heads) * c.n, rng_);
    const mc::LayerSelection kept =
        c.kept_tokens == c.n ? mc::KeepAll(c.n, n_kv_heads)
                             : mc::SelectTopWithWindow(picks, c.n, 0, n_kv_heads, c.kept_tokens);
    std::vector<uint16_t> channels;  // (n_kv_heads, key_width): a random ascending set per head
    for (int h = 0; c.with_channels && h < n_kv_heads; ++h) {
      std::vector<uint16_t> all(d);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng_);
      std::sort(all.begin(), all.begin() + c.key_width);
      channels.insert(channels.end(), all.begin(), all.begin() + c.key_width);
    }

    // The host model: the CPU's CompressPrompt placement over the same page ids.
    std::vector<uint16_t> expected(static_cast<size_t>(total_pages) * page_elements, 0xFFFF);
    auto at = [&](int list, int slot, int per_page, int row) {
      return page_ids[list][slot / per_page] * page_elements +
             static_cast<int64_t>(slot % per_page) * row;
    };
    for (int h = 0; h < n_kv_heads; ++h) {
      for (int j = 0; j < c.kept_tokens; ++j) {
        const size_t source = static_cast<size_t>(kept.head(h)[j]) * full_row + h * d;
        const bool thin = j < c.thin_rows;
        const int slot = thin ? j : j - c.thin_rows;
        const int width = thin ? c.key_width : d;
        const int64_t key_at = thin ? at(0, slot, thin_rows_per_page, thin_row) + h * c.key_width
                                    : at(2, slot, rows_per_page, full_row) + h * d;
        const int64_t value_at = at(thin ? 1 : 3, slot, rows_per_page, full_row) + h * d;
        for (int i = 0; i < width; ++i) {
          const int channel = thin && c.with_channels ? channels[h * c.key_width + i] : i;
          expected[key_at + i] = FloatToBf16Bits(prompt.k[source + channel]);
        }
        for (int i = 0; i < d; ++i) expected[value_at + i] = FloatToBf16Bits(prompt.v[source + i]);
      }
    }

    DeviceBuffer d_pool = Poisoned<uint16_t>(expected.size());
    DeviceBuffer d_kept = Upload(kept.tokens);
    DeviceBuffer d_channels = Upload(channels.empty() ? std::vector<uint16_t>{0} : channels);
    DeviceBuffer d_lists[4] = {Upload(page_ids[0]), Upload(page_ids[1]), Upload(page_ids[2]),
                               Upload(page_ids[3])};
    const PagedKv kv{.pool = d_pool.as<__nv_bfloat16>(), .page_elements = page_elements};
    const KeptRowPages pages{d_lists[0].as<int32_t>(), d_lists[1].as<int32_t>(),
                             d_lists[2].as<int32_t>(), d_lists[3].as<int32_t>()};
    ASSERT_CUDA(LaunchWriteKeptRows(prompt.d_k(), prompt.d_v(), prompt.kv_stride(),
                                    d_kept.as<int32_t>(), c.kept_tokens, c.thin_rows, c.key_width,
                                    c.with_channels ? d_channels.as<uint16_t>() : nullptr, shape,
                                    kv, pages, stream_));
    Sync();
    const std::vector<uint16_t> pool = Download<uint16_t>(d_pool, expected.size());
    size_t wrong_rows = 0, wrong_poison = 0, first_wrong = expected.size();
    for (size_t i = 0; i < expected.size(); ++i) {
      if (pool[i] == expected[i]) continue;
      (expected[i] == 0xFFFF ? wrong_poison : wrong_rows) += 1;
      first_wrong = std::min(first_wrong, i);
    }
    const std::string what =
        absl::StrCat(ShapeName(c.heads), " kept ", c.kept_tokens, " thin ", c.thin_rows, " width ",
                     c.key_width, " page ", page_elements, " pad ", c.pad);
    EXPECT_EQ(wrong_rows, 0u) << what << ": elements of written rows differ (first at "
                              << first_wrong << ")";
    EXPECT_EQ(wrong_poison, 0u) << what << ": elements outside the rows were written (first at "
                                << first_wrong << ")";
  }
}

// ---- argument checks ----

TEST_F(CudaCompressTest, BadArgumentsAreInvalidValue) {
  const AttentionShape shape{4, 2, 16, 0};
  const Prompt prompt(shape, 40, 0, rng_);
  DeviceBuffer d_scratch = Poisoned<float>(1 << 16);
  DeviceBuffer d_kept = Upload(mc::KeepAll(40, 2).tokens);
  float* scratch = d_scratch.as<float>();
  int32_t* kept = d_kept.as<int32_t>();
  auto snapkv = [&](int n, int w, const AttentionShape& s, int kernel_size) {
    return LaunchSnapKvScores(prompt.d_q(), prompt.q_stride(), prompt.d_k(), prompt.kv_stride(), n,
                              w, s, kernel_size, true, scratch, scratch, stream_);
  };
  EXPECT_EQ(snapkv(40, 0, shape, 5), cudaErrorInvalidValue);
  EXPECT_EQ(snapkv(40, 40, shape, 5), cudaErrorInvalidValue);
  EXPECT_EQ(snapkv(40, 8, shape, 0), cudaErrorInvalidValue);
  EXPECT_EQ(snapkv(40, 8, AttentionShape{5, 2, 16, 0}, 5), cudaErrorInvalidValue);
  EXPECT_EQ(snapkv(40, 8, AttentionShape{4, 2, 24, 0}, 5), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchTopWithWindow(scratch, 40, 8, 2, 7, kept, stream_), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchTopWithWindow(scratch, 40, 8, 2, 41, kept, stream_), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchTopWithWindow(scratch, 40, 8, 0, 10, kept, stream_), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchRangeKept(40, 2, 41, 4, kept, stream_), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchRangeKept(40, 2, 10, -1, kept, stream_), cudaErrorInvalidValue);
  auto think = [&](int w_q, int kept_tokens, int key_width) {
    return LaunchThinkChannels(prompt.d_q(), prompt.q_stride(), prompt.d_k(), prompt.kv_stride(),
                               40, w_q, kept, kept_tokens, shape, key_width, scratch,
                               reinterpret_cast<uint16_t*>(scratch), stream_);
  };
  EXPECT_EQ(think(0, 40, 8), cudaErrorInvalidValue);
  EXPECT_EQ(think(41, 40, 8), cudaErrorInvalidValue);
  EXPECT_EQ(think(8, 0, 8), cudaErrorInvalidValue);
  EXPECT_EQ(think(8, 40, 0), cudaErrorInvalidValue);
  EXPECT_EQ(think(8, 40, 17), cudaErrorInvalidValue);
  const int32_t* page = kept;  // any device ints: nothing is launched
  const KeptRowPages pages{page, page, page, page};
  const PagedKv kv{.pool = reinterpret_cast<__nv_bfloat16*>(scratch), .page_elements = 1024};
  auto write = [&](int kept_tokens, int thin_rows, int key_width, const uint16_t* channels,
                   const PagedKv& paged) {
    return LaunchWriteKeptRows(prompt.d_k(), prompt.d_v(), prompt.kv_stride(), kept, kept_tokens,
                               thin_rows, key_width, channels, shape, paged, pages, stream_);
  };
  const uint16_t* channels = reinterpret_cast<const uint16_t*>(scratch);
  EXPECT_EQ(write(10, 11, 8, channels, kv), cudaErrorInvalidValue);
  EXPECT_EQ(write(10, 5, 8, nullptr, kv), cudaErrorInvalidValue);  // thin keys need channels
  EXPECT_EQ(write(10, 5, 17, channels, kv), cudaErrorInvalidValue);
  EXPECT_EQ(write(10, 5, 8, channels, PagedKv{.pool = kv.pool, .page_elements = 31}),
            cudaErrorInvalidValue);  // a page smaller than a row
  EXPECT_EQ(write(10, 5, 8, channels, PagedKv{}), cudaErrorInvalidValue);
  EXPECT_EQ(LaunchWriteKeptRows(prompt.d_k(), prompt.d_v(), prompt.kv_stride(), kept, 10, 5, 8,
                                channels, shape, kv, KeptRowPages{}, stream_),
            cudaErrorInvalidValue);
  Sync();
}

}  // namespace
}  // namespace kvtrim::engine::cuda
