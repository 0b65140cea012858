// Paged decode attention, uncompressed against compressed, as bytes read per second.
//
//   1. Device-to-device copy bandwidth through cudaMemcpyAsync (bytes read + bytes written).
//   2. One decode step of --batch sequences of --tokens cached tokens each (the new token
//      included), at Llama-3-8B's (32 / 8 x 128) and SmolLM2's (9 / 3 x 64) heads, pages of
//      --page_kib (default: the shape's default, as the server's) in shuffled order:
//        LaunchCompressedDecodeAttention  every model's kernel but for sliding windows (the
//                                         tensor-core one), every row at full width: the
//                                         baseline of the last column;
//        LaunchDecodeAttention            the sliding-window models' kernel, the same layout;
//        12% kept                         per kv-head round(0.12 * tokens) prompt rows kept (983
//                                         of 8192): all but the last 32 thin (ThinK keys at
//                                         head_dim / 2), the last 32 and the new token full width;
//        12%, no ThinK                    the same rows, thin keys at full width (selection);
//        12%, 8x batch                    8 x --batch sequences of the first 12% layout, about as
//                                         many bytes as the uncompressed batch: a launch with as
//                                         much work as the baseline's.
//      KV bytes are the rows each layout holds (keys at their width, values at full width), which
//      the kernel reads once; time per byte is set against LaunchCompressedDecodeAttention's on
//      the uncompressed layout. Splits are each kernel's heuristic for the device
//      (DecodeAttentionSplits, CompressedDecodeAttentionSplits), or --splits; the compressed
//      kernel's block size its own choice, or --block_warps.
//
// Every input is random (a hash of the index; zeros run faster and hide unwritten outputs). A
// layout smaller than 4 x L2 is laid out several times over, and successive runs read successive
// copies, so that no run finds its rows in L2. Each row is the median of --repeats timed runs
// (CUDA events around each) after --warmup runs. Prints tables; never fails on time. Every CUDA
// call is checked: an error ends the program.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "engine/cuda/attention_decode.h"
#include "engine/cuda/attention_decode_compressed.h"
#include "engine/cuda/compressed_kv.h"
#include "engine/cuda/device_weights.h"
#include "engine/cuda/paged_kv.h"
#include "memory/kv_cache.h"
#include "tests/bench/cuda_bench_util.h"

ABSL_FLAG(int, repeats, 20, "timed runs per row (the median is printed)");
ABSL_FLAG(int, warmup, 3, "untimed runs before each row");
ABSL_FLAG(int64_t, copy_mib, 2048, "size of the copied buffer, MiB");
ABSL_FLAG(int, batch, 32, "sequences decoding in the step");
ABSL_FLAG(int, tokens, 8192, "cached tokens per sequence, the new one included");
ABSL_FLAG(int, page_kib, 0,
          "page size, KiB; 0 = the shape's default (KvShape::default_page_bytes)");
ABSL_FLAG(int, splits, 0, "split-K parts of every launch (0: each kernel's heuristic)");
ABSL_FLAG(int, block_warps, 0,
          "warps per block of the compressed kernel: 4 or 6 (0: the kernel's choice)");

namespace kvtrim::engine::cuda {
namespace {

using bench::Empty;
using bench::RandomBf16;
using bench::Timing;
using bench::Upload;

// `run(i)` enqueues repetition i on `stream`; --warmup, then --repeats timed runs.
Timing Time(cudaStream_t stream, const std::function<void(int)>& run) {
  return bench::TimeRuns(stream, absl::GetFlag(FLAGS_warmup), absl::GetFlag(FLAGS_repeats), run);
}

// ---- 1. copy ----

double CopyBandwidth(cudaStream_t stream) {
  const size_t bytes = static_cast<size_t>(absl::GetFlag(FLAGS_copy_mib)) << 20;
  DeviceBuffer src = RandomBf16(bytes / sizeof(__nv_bfloat16));
  DeviceBuffer dst = Empty(bytes);
  const Timing t = Time(stream, [&](int) {
    CHECK_CUDA(
        cudaMemcpyAsync(dst.as<void>(), src.as<void>(), bytes, cudaMemcpyDeviceToDevice, stream));
  });
  return bench::PrintCopyTable(bytes, {{"cudaMemcpyAsync D2D", t}});
}

// ---- 2. decode attention ----

// Rows per kv-head of every sequence of a layout.
struct Rows {
  int thin = 0;       // thin segment rows
  int recent = 0;     // full-width rows, the new token included
  int key_width = 0;  // channels per kv-head of the thin keys
};

// One step of `batch` sequences laid out `copies` times over (sequence c * batch + i is copy c of
// sequence i), every page id shuffled over one pool.
class Step {
 public:
  Step(const AttentionShape& shape, int batch, int page_bytes, const Rows& rows, size_t l2_bytes,
       std::mt19937& rng)
      : shape_(shape), batch_(batch) {
    const int D = shape.head_dim, H = shape.n_kv_heads;
    const int64_t page_elements = page_bytes / 2;
    const int rows_per_page = page_bytes / (H * D * 2);
    const int key_rows_per_page = static_cast<int>(page_elements / (H * rows.key_width));
    auto pages = [](int n, int per_page) { return (n + per_page - 1) / per_page; };
    const int thin_key_pages = pages(rows.thin, key_rows_per_page);
    const int thin_value_pages = pages(rows.thin, rows_per_page);
    const int thin_pages = std::max(thin_key_pages, thin_value_pages);
    const int recent_pages = pages(rows.recent, rows_per_page);
    bytes_read_ = static_cast<int64_t>(batch) * H * 2 *
                  (static_cast<int64_t>(rows.thin) * (rows.key_width + D) +
                   static_cast<int64_t>(rows.recent) * 2 * D);
    copies_ = static_cast<int>(std::clamp<int64_t>(
        (4 * static_cast<int64_t>(l2_bytes) + bytes_read_ - 1) / bytes_read_, 1, 32));
    const int n = batch * copies_;

    const int total_pages = n * (thin_key_pages + thin_value_pages + 2 * recent_pages);
    std::vector<int32_t> order(total_pages);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    int next = 0;
    auto take = [&](int count, int padded, std::vector<int32_t>& list) {
      for (int p = 0; p < padded; ++p) list.push_back(p < count ? order[next++] : -1);
    };
    std::vector<int32_t> page_indptr{0}, key_pages, value_pages, thin_indptr{0}, thin_keys,
        thin_values, kv_rows, thin_rows, recent_rows, key_width, channel_offset;
    std::vector<uint16_t> channels;
    std::vector<int> all_channels(D);
    std::iota(all_channels.begin(), all_channels.end(), 0);
    for (int s = 0; s < n; ++s) {
      take(recent_pages, recent_pages, key_pages);
      take(recent_pages, recent_pages, value_pages);
      page_indptr.push_back(page_indptr.back() + recent_pages);
      take(thin_key_pages, thin_pages, thin_keys);
      take(thin_value_pages, thin_pages, thin_values);
      thin_indptr.push_back(thin_indptr.back() + thin_pages);
      kv_rows.push_back(rows.recent);
      key_width.push_back(rows.key_width);
      channel_offset.push_back(static_cast<int32_t>(channels.size()));
      for (int h = 0; h < H; ++h) {
        thin_rows.push_back(rows.thin);
        recent_rows.push_back(rows.recent);
        if (rows.key_width == D) continue;
        std::shuffle(all_channels.begin(), all_channels.end(), rng);
        std::vector<int> kept(all_channels.begin(), all_channels.begin() + rows.key_width);
        std::sort(kept.begin(), kept.end());
        for (int c : kept) channels.push_back(static_cast<uint16_t>(c));
      }
    }
    auto nonempty = [](std::vector<int32_t> v) { return v.empty() ? std::vector<int32_t>{-1} : v; };
    std::vector<int32_t> token_indptr(n + 1), seqs(n);
    std::iota(token_indptr.begin(), token_indptr.end(), 0);
    std::iota(seqs.begin(), seqs.end(), 0);

    pool_ = RandomBf16(static_cast<size_t>(total_pages) * page_elements);
    q_ = RandomBf16(static_cast<size_t>(n) * shape.n_heads * D, 2.0f);
    out_ = Empty(static_cast<size_t>(n) * shape.n_heads * D * sizeof(__nv_bfloat16));
    buffers_.push_back(Upload(page_indptr));
    buffers_.push_back(Upload(nonempty(key_pages)));
    buffers_.push_back(Upload(nonempty(value_pages)));
    buffers_.push_back(Upload(kv_rows));
    kv_ = PagedKv{.pool = pool_.as<__nv_bfloat16>(),
                  .page_elements = page_elements,
                  .row_elements = H * D,
                  .rows_per_page = rows_per_page,
                  .page_indptr = buffers_[0].as<int32_t>(),
                  .key_pages = buffers_[1].as<int32_t>(),
                  .value_pages = buffers_[2].as<int32_t>(),
                  .kv_rows = buffers_[3].as<int32_t>()};
    buffers_.push_back(Upload(thin_indptr));
    buffers_.push_back(Upload(nonempty(thin_keys)));
    buffers_.push_back(Upload(nonempty(thin_values)));
    buffers_.push_back(Upload(thin_rows));
    buffers_.push_back(Upload(recent_rows));
    buffers_.push_back(Upload(key_width));
    buffers_.push_back(Upload(channel_offset));
    buffers_.push_back(Upload(channels.empty() ? std::vector<uint16_t>{0} : channels));
    ckv_ = CompressedKv{.thin_indptr = buffers_[4].as<int32_t>(),
                        .thin_key_pages = buffers_[5].as<int32_t>(),
                        .thin_value_pages = buffers_[6].as<int32_t>(),
                        .thin_rows = buffers_[7].as<int32_t>(),
                        .recent_rows = buffers_[8].as<int32_t>(),
                        .key_width = buffers_[9].as<int32_t>(),
                        .channel_offset = buffers_[10].as<int32_t>(),
                        .channels = buffers_[11].as<uint16_t>()};
    buffers_.push_back(Upload(token_indptr));
    buffers_.push_back(Upload(seqs));
    token_indptr_ = buffers_[12].as<int32_t>();
    seqs_ = buffers_[13].as<int32_t>();
    most_rows_ = rows.thin + rows.recent;
  }

  int copies() const { return copies_; }
  int64_t bytes_read() const { return bytes_read_; }

  // Splits for `sm_count` multiprocessors (the chosen kernel's heuristic), unless --splits names
  // them; sizes the workspace.
  int Plan(int sm_count, bool compressed_kernel) {
    splits_ = absl::GetFlag(FLAGS_splits) > 0 ? absl::GetFlag(FLAGS_splits)
              : compressed_kernel
                  ? CompressedDecodeAttentionSplits(batch_, most_rows_, shape_, sm_count)
                  : DecodeAttentionSplits(batch_, most_rows_, shape_, sm_count);
    workspace_ = Empty(DecodeAttentionWorkspaceBytes(batch_, splits_, shape_));
    return splits_;
  }

  // One step over copy `run % copies`.
  void Run(bool compressed_kernel, int run, cudaStream_t stream) {
    const int32_t* seqs = seqs_ + (run % copies_) * batch_;
    if (compressed_kernel) {
      CHECK_CUDA(LaunchCompressedDecodeAttention(
          kv_, ckv_, token_indptr_, seqs, batch_, q_.as<__nv_bfloat16>(),
          shape_.n_heads * shape_.head_dim, shape_, splits_, workspace_.as<float>(),
          out_.as<__nv_bfloat16>(), stream, absl::GetFlag(FLAGS_block_warps)));
    } else {
      CHECK_CUDA(LaunchDecodeAttention(kv_, token_indptr_, seqs, batch_, q_.as<__nv_bfloat16>(),
                                       shape_.n_heads * shape_.head_dim, shape_, splits_,
                                       workspace_.as<float>(), out_.as<__nv_bfloat16>(), stream));
    }
  }

 private:
  AttentionShape shape_;
  int batch_ = 0, copies_ = 1, splits_ = 1, most_rows_ = 0;
  int64_t bytes_read_ = 0;  // KV row bytes one step reads
  DeviceBuffer pool_, q_, out_, workspace_;
  std::vector<DeviceBuffer> buffers_;  // page tables and row counts
  PagedKv kv_;
  CompressedKv ckv_;
  const int32_t* token_indptr_ = nullptr;
  const int32_t* seqs_ = nullptr;
};

void DecodeAttention(cudaStream_t stream, double copy_gbs, const cudaDeviceProp& device) {
  struct Model {
    const char* name;
    AttentionShape shape;
  };
  const Model models[] = {{"Llama-3-8B", {32, 8, 128, 0}}, {"SmolLM2", {9, 3, 64, 0}}};
  const int batch = absl::GetFlag(FLAGS_batch), tokens = absl::GetFlag(FLAGS_tokens);
  const int kept = static_cast<int>(std::lround(0.12 * tokens));
  const int recent = std::min(32, kept) + 1, thin = kept - std::min(32, kept);
  std::mt19937 rng(1234);
  for (const Model& model : models) {
    const int D = model.shape.head_dim;
    const memory::KvShape kv_shape{
        .n_kv_heads = model.shape.n_kv_heads, .head_dim = D, .element_bytes = 2};
    const int page_bytes = absl::GetFlag(FLAGS_page_kib) > 0
                               ? absl::GetFlag(FLAGS_page_kib) << 10
                               : static_cast<int>(kv_shape.default_page_bytes());
    if (page_bytes < model.shape.n_kv_heads * D * 2) {
      std::fprintf(stderr, "--page_kib=%d: a page must hold a %s row (%d bytes)\n",
                   page_bytes >> 10, model.name, model.shape.n_kv_heads * D * 2);
      std::exit(1);
    }
    std::printf(
        "\n## Decode attention, %s (%d / %d x %d): %d sequences x %d tokens, %d KiB pages in "
        "shuffled order\n\n",
        model.name, model.shape.n_heads, model.shape.n_kv_heads, D, batch, tokens,
        page_bytes >> 10);
    std::printf(
        "| kernel, layout                                | batch | splits | copies |  median ms "
        "|    min ms |    max ms | KV MB read |   GB/s | of copy | time/byte vs uncompressed |\n");
    std::printf(
        "|-----------------------------------------------|------:|-------:|-------:|-----------:"
        "|----------:|----------:|-----------:|-------:|--------:|--------------------------:|\n");
    struct Row {
      const char* name;
      bool compressed_kernel;
      Rows rows;
      int batch_scale = 1;
    };
    const Row rows[] = {
        {"LaunchCompressedDecodeAttention, full", true, {0, tokens, D}},
        {"LaunchDecodeAttention (windows), full", false, {0, tokens, D}},
        {"  12% kept, ThinK keys at D/2", true, {thin, recent, D / 2}},
        {"  12% kept, no ThinK", true, {thin, recent, D}},
        {"  12% kept, ThinK keys at D/2, 8x batch", true, {thin, recent, D / 2}, 8},
    };
    double base_ms_per_byte = 0.0;  // the first row's: the compressed kernel, uncompressed layout
    for (const Row& row : rows) {
      Step step(model.shape, batch * row.batch_scale, page_bytes, row.rows, device.l2CacheSize,
                rng);
      const int splits = step.Plan(device.multiProcessorCount, row.compressed_kernel);
      const Timing t = Time(stream, [&](int run) { step.Run(row.compressed_kernel, run, stream); });
      const double bytes = static_cast<double>(step.bytes_read());
      const double gbs = bytes / (t.median_ms * 1e-3) / 1e9;
      const double ms_per_byte = t.median_ms / bytes;
      if (&row == &rows[0]) base_ms_per_byte = ms_per_byte;
      std::printf(
          "| %-45s | %5d | %6d | %6d | %10.3f | %9.3f | %9.3f | %10.1f | %6.0f | %6.0f%% | %25.3f "
          "|\n",
          row.name, batch * row.batch_scale, splits, step.copies(), t.median_ms, t.min_ms, t.max_ms,
          bytes / 1e6, gbs, 100.0 * gbs / copy_gbs, ms_per_byte / base_ms_per_byte);
    }
    std::printf("\nrows per kv-head: full %d; 12%%: %d thin + %d recent (the new token included)\n",
                tokens, thin, recent);
  }
}

}  // namespace
}  // namespace kvtrim::engine::cuda

int main(int argc, char** argv) {
  using namespace kvtrim::engine::cuda;
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_batch) < 1 || absl::GetFlag(FLAGS_tokens) < 1 ||
      absl::GetFlag(FLAGS_page_kib) < 0 || absl::GetFlag(FLAGS_copy_mib) < 1 ||
      absl::GetFlag(FLAGS_splits) < 0) {
    std::fprintf(
        stderr,
        "--batch, --tokens and --copy_mib must be positive, --page_kib and --splits >= 0\n");
    return 1;
  }
  const cudaDeviceProp device = bench::PrintDevice();
  std::printf("compressed kernel's warps per block: %d (0: its own choice)\n",
              absl::GetFlag(FLAGS_block_warps));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  const double copy_gbs = CopyBandwidth(stream);
  DecodeAttention(stream, copy_gbs, device);
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
