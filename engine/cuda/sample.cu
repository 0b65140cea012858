// Temperature sampling, one cluster of blocks per row: engine::SampleTempered's twin,
// token for token (the weights, cuts and draw are sampling_rule.h's integer arithmetic on both
// sides).
//
//   1. each block takes a slice of the row: the repetition penalty of the ids in it, in place; its
//      largest logit, then the row's, shared across the cluster (the row's argmax is the token
//      for temperature 0 or a row without a logit above -inf)
//   2. each block compacts its slice's candidates of non-zero weight into its part of the
//      workspace as order keys (the logit and the id in one 64-bit key whose order is the
//      candidate order)
//   3. top-k, top-p and the draw are each a selection: the candidate at which a running count
//      (top-k) or weight (top-p, the draw) in key order first exceeds a point. It is found one
//      byte of the key at a time, from the top: each block histograms the next byte over its
//      candidates that share the bytes chosen so far, every block sums the cluster's histograms
//      (distributed shared memory) in the same order and so chooses the same bucket, where the
//      running sum crosses the point. A bucket holding one candidate ends the search early; once
//      the chosen bytes leave at most kLocalKeys candidates, each block moves its own into shared
//      memory and the later passes read them there. Weights are recomputed from the keys (the
//      logit is in them), so the workspace holds 8 bytes a candidate.
// A block's passes keep several loads in flight per thread (kUnroll). Histogram additions collect
// in a few per-thread slots before the shared atomics: the candidates crowd into few buckets of
// the top bytes, where bare atomics would serialise.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "engine/cuda/check.h"
#include "engine/cuda/row_best.cuh"
#include "engine/cuda/sample.h"
#include "engine/sampling_rule.h"

namespace kvtrim::engine::cuda {
namespace {

namespace cg = cooperative_groups;
namespace rule = sampling;

// Blocks per row: eight while every block of the launch gets a multiprocessor of its own, else
// four, so that twice the rows run at once (an H200 holds 30 clusters of eight, 62 of four).
constexpr int kWideCluster = 8, kNarrowCluster = 4;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kBuckets = 256;
constexpr int kSlots = 4;   // per-thread histogram slots, by the bucket's low bits
constexpr int kUnroll = 4;  // loads in flight per thread in the passes over a row or its keys
// A selection moves its candidates into shared memory once the bytes chosen so far leave at most
// this many: the remaining passes then read them there.
constexpr int kLocalKeys = 4096;

// The logits (and workspace keys) of a row each block of its cluster takes.
__host__ __device__ constexpr int SliceOf(int vocab, int blocks) {
  return (vocab + blocks - 1) / blocks;
}

struct Shared {
  // A pass's histogram, two of them: the next pass fills one while other blocks may still read
  // the last.
  uint32_t count[2][kBuckets];
  unsigned long long weight[2][kBuckets];
  Best warp_best[kWarps];
  unsigned long long warp_sum[kWarps];
  Best best;                   // this block's share of a cluster-wide maximum
  unsigned long long partial;  // and of a cluster-wide sum
  int candidates;              // keys this block compacted
  // A selection's state: the key bytes chosen so far, and the running count or weight (and the
  // weight) of the candidates before them.
  unsigned long long prefix, before, weight_before, found;
  int unique;        // the bucket just chosen holds one candidate
  int chosen_count;  // how many it holds
  int local_count;
  uint64_t local[kLocalKeys];  // the candidates left, once few enough
};

// visit(key) for keys[0, n), kUnroll loads in flight per thread.
template <class Visit>
__device__ __forceinline__ void ForEachKey(const uint64_t* keys, int n, Visit visit) {
  ForEachStrided<kUnroll>(keys, n, kThreads, [&](int, uint64_t key) { visit(key); });
}

__device__ __forceinline__ float LogitOfKey(uint64_t key) {
  const uint32_t ordered = static_cast<uint32_t>(key >> 32);
  return __uint_as_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}

__device__ uint64_t BlockSum(uint64_t value, Shared& sh) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  if (threadIdx.x % 32 == 0) sh.warp_sum[threadIdx.x / 32] = value;
  __syncthreads();
  uint64_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += sh.warp_sum[w];
  __syncthreads();
  return total;
}

// The sum of every thread's `value` over the whole cluster, in every thread.
__device__ uint64_t ClusterSum(uint64_t value, Shared& sh, const cg::cluster_group& cluster) {
  value = BlockSum(value, sh);
  if (threadIdx.x == 0) sh.partial = value;
  cluster.sync();
  uint64_t total = 0;
  for (int r = 0; r < static_cast<int>(cluster.num_blocks()); ++r) {
    total += *cluster.map_shared_rank(&sh.partial, r);
  }
  cluster.sync();  // every block has read the partials before they are written again
  return total;
}

// A thread's share of a histogram, added to the shared one when a slot changes bucket.
class Tally {
 public:
  __device__ explicit Tally(int parity) : parity_(parity) {}
  __device__ void Add(int bucket, uint64_t weight, Shared& sh) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      if ((bucket & (kSlots - 1)) != s) continue;
      if (bucket_[s] != bucket) {
        Flush(s, sh);
        bucket_[s] = bucket;
      }
      ++count_[s];
      weight_[s] += weight;
    }
  }
  __device__ void FlushAll(Shared& sh) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) Flush(s, sh);
  }

 private:
  __device__ void Flush(int s, Shared& sh) {
    if (count_[s] == 0) return;
    atomicAdd(&sh.count[parity_][bucket_[s]], count_[s]);
    atomicAdd(&sh.weight[parity_][bucket_[s]], weight_[s]);
    count_[s] = 0;
    weight_[s] = 0;
  }

  int parity_;
  int bucket_[kSlots] = {-1, -1, -1, -1};
  uint32_t count_[kSlots] = {};
  unsigned long long weight_[kSlots] = {};
};

// Warp 0 of every block: the bucket (of the byte at `shift`) where the running count or weight
// of the cluster's histograms `parity` crosses `point`. Lane L holds buckets 255 - 8L down to
// 248 - 8L, so lanes run in key order; every block sums the blocks in the same order and so
// reaches the same state.
__device__ void ChooseBucket(int shift, bool by_count, uint64_t point, int parity, Shared& sh,
                             const cg::cluster_group& cluster) {
  const int lane = threadIdx.x;
  const uint64_t before = sh.before, weight_before = sh.weight_before;
  __syncwarp();  // every lane has read the state before one of them writes it
  uint64_t counted[8] = {}, weighed[8] = {}, lane_counted = 0, lane_weighed = 0;
  uint32_t held[8] = {};
  for (int r = 0; r < static_cast<int>(cluster.num_blocks()); ++r) {
    const Shared& other = *cluster.map_shared_rank(&sh, r);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int bucket = kBuckets - 1 - 8 * lane - i;
      held[i] += other.count[parity][bucket];
      weighed[i] += other.weight[parity][bucket];
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    counted[i] = by_count ? held[i] : weighed[i];
    lane_counted += counted[i];
    lane_weighed += weighed[i];
  }
  uint64_t through = lane_counted, through_weight = lane_weighed;
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint64_t c = __shfl_up_sync(0xffffffffu, through, offset);
    const uint64_t w = __shfl_up_sync(0xffffffffu, through_weight, offset);
    if (lane >= offset) {
      through += c;
      through_weight += w;
    }
  }
  const uint64_t level_total = __shfl_sync(0xffffffffu, through, 31);
  if (level_total == 0) return;  // no candidate: cannot happen (the largest logit always is one)
  if (point >= before + level_total) point = before + level_total - 1;
  uint64_t running = before + through - lane_counted;
  if (point < running || point >= before + through) return;
  uint64_t running_weight = weight_before + through_weight - lane_weighed;
  for (int i = 0; i < 8; ++i) {
    if (point < running + counted[i]) {
      const int bucket = kBuckets - 1 - 8 * lane - i;
      sh.prefix |= static_cast<uint64_t>(bucket) << shift;
      sh.before = running;
      sh.weight_before = running_weight;
      sh.unique = held[i] == 1;
      sh.chosen_count = static_cast<int>(held[i]);
      return;
    }
    running += counted[i];
    running_weight += weighed[i];
  }
}

// Among the cluster's keys (this block's: keys[0, n)) with key >= floor and weight >=
// min_weight: the key at which the running count (by_count) or weight, in key order, first
// exceeds `point` (less than their total). *through: the weight of the candidates up to it,
// itself included. Every block of the cluster calls it alike and gets the same answer.
__device__ uint64_t Select(const uint64_t* keys, int n, float max, float scale, uint64_t floor,
                           uint64_t min_weight, bool by_count, uint64_t point, uint64_t* through,
                           Shared& sh, const cg::cluster_group& cluster) {
  if (threadIdx.x == 0) {
    sh.prefix = sh.before = sh.weight_before = sh.found = 0;
    sh.unique = 0;
  }
  // Whether `key` is a candidate whose bits from `from` up are the prefix's.
  auto under = [&](uint64_t key, uint64_t prefix, int from) {
    return key >= floor && (from >= 64 || (key >> from) == (prefix >> from)) &&
           rule::WeightOf(LogitOfKey(key), max, scale) >= min_weight;
  };
  const uint64_t* list = keys;
  int size = n;
  int shift = 56, parity = 0;
  for (;; shift -= 8, parity ^= 1) {
    for (int b = threadIdx.x; b < kBuckets; b += kThreads) {
      sh.count[parity][b] = 0;
      sh.weight[parity][b] = 0;
    }
    __syncthreads();
    const uint64_t prefix = sh.prefix;
    Tally tally(parity);
    ForEachKey(list, size, [&](uint64_t key) {
      if (key < floor || (shift < 56 && (key >> (shift + 8)) != (prefix >> (shift + 8)))) return;
      const uint64_t weight = rule::WeightOf(LogitOfKey(key), max, scale);
      if (weight >= min_weight) tally.Add(static_cast<int>((key >> shift) & 0xff), weight, sh);
    });
    tally.FlushAll(sh);
    cluster.sync();  // every block's histogram is whole
    if (threadIdx.x < 32) ChooseBucket(shift, by_count, point, parity, sh, cluster);
    __syncthreads();
    if (sh.unique || shift == 0) break;
    if (list == keys && sh.chosen_count <= kLocalKeys) {
      if (threadIdx.x == 0) sh.local_count = 0;
      __syncthreads();
      const uint64_t chosen = sh.prefix;
      ForEachKey(list, size, [&](uint64_t key) {
        if (under(key, chosen, shift)) sh.local[atomicAdd(&sh.local_count, 1)] = key;
      });
      __syncthreads();
      list = sh.local;
      size = sh.local_count;
    }
  }
  if (sh.unique && shift > 0) {
    // The one candidate under the chosen bytes, in one block.
    const uint64_t chosen = sh.prefix;
    ForEachKey(list, size, [&](uint64_t key) {
      if (under(key, chosen, shift)) sh.found = key;
    });
  } else if (threadIdx.x == 0) {
    sh.found = sh.prefix;
  }
  cluster.sync();
  uint64_t found = 0;
  for (int r = 0; r < static_cast<int>(cluster.num_blocks()); ++r) {
    const uint64_t theirs = cluster.map_shared_rank(&sh, r)->found;
    found = theirs > found ? theirs : found;  // keys are never 0; blocks without it hold 0
  }
  if (through != nullptr) {
    *through = sh.weight_before + rule::WeightOf(LogitOfKey(found), max, scale);
  }
  cluster.sync();  // every block has read the state before the next selection resets it
  return found;
}

// Launched in clusters of kWideCluster or kNarrowCluster blocks, one cluster a row.
__global__ void __launch_bounds__(kThreads, 2)
    SampleRowsKernel(float* __restrict__ logits, int vocab, const SampleJob* __restrict__ jobs,
                     const int32_t* __restrict__ penalized, int32_t* __restrict__ tokens,
                     uint64_t* __restrict__ workspace) {
  __shared__ Shared sh;
  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int blocks = static_cast<int>(cluster.num_blocks());
  const SampleJob job = jobs[blockIdx.x / blocks];
  float* row = logits + static_cast<int64_t>(job.row) * vocab;
  // This block's slice of the row, and its part of the workspace.
  const int slice = SliceOf(vocab, blocks);
  const int begin = min(vocab, rank * slice), end = min(vocab, begin + slice);
  uint64_t* keys = workspace + static_cast<int64_t>(blockIdx.x) * slice;
  const float penalty = job.repetition_penalty;
  for (int j = job.penalized_begin + threadIdx.x; j < job.penalized_end; j += kThreads) {
    const int32_t id = penalized[j];
    if (id < begin || id >= end) continue;
    const float l = row[id];
    row[id] = l > 0 ? l / penalty : l * penalty;
  }
  if (threadIdx.x == 0) sh.candidates = 0;
  __syncthreads();
  Best mine = BlockBest(row + begin, end - begin, sh.warp_best);
  if (mine.index != kNoIndex) mine.index += begin;
  if (threadIdx.x == 0) sh.best = mine;
  cluster.sync();
  Best best = cluster.map_shared_rank(&sh, 0)->best;
  for (int r = 1; r < blocks; ++r) best = Better(best, cluster.map_shared_rank(&sh, r)->best);
  cluster.sync();  // every block has read the others' maxima
  if (job.temperature == 0.0f || !(best.value > -CUDART_INF_F)) {
    if (rank == 0 && threadIdx.x == 0) tokens[job.row] = ArgmaxIndex(best);
    return;
  }

  const float max = best.value, scale = rule::ExponentScale(job.temperature);
  const int lane = threadIdx.x % 32;
  uint64_t total = 0;
  for (int base = begin; base < end; base += kUnroll * kThreads) {
    float logit[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + threadIdx.x;
      logit[u] = i < end ? row[i] : -CUDART_INF_F;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + threadIdx.x;
      const uint64_t weight = rule::WeightOf(logit[u], max, scale);
      total += weight;
      const unsigned holders = __ballot_sync(0xffffffffu, weight > 0);
      int slot = 0;
      if (lane == 0 && holders != 0) slot = atomicAdd(&sh.candidates, __popc(holders));
      slot = __shfl_sync(0xffffffffu, slot, 0);
      if (weight > 0) {
        keys[slot + __popc(holders & ((1u << lane) - 1))] = rule::OrderKey(logit[u], i);
      }
    }
  }
  total = ClusterSum(total, sh, cluster);  // its barriers also publish sh.candidates and the keys
  const int n = sh.candidates;
  const uint64_t candidates = ClusterSum(threadIdx.x == 0 ? n : 0, sh, cluster);

  uint64_t floor = 0, kept = total;
  if (job.top_k > 0 && static_cast<uint64_t>(job.top_k) < candidates) {
    floor = Select(keys, n, max, scale, 0, 0, /*by_count=*/true, job.top_k - 1, &kept, sh, cluster);
  }
  if (job.top_p < 1.0f) {
    floor = Select(keys, n, max, scale, floor, 0, /*by_count=*/false,
                   rule::NucleusWeight(job.top_p, kept) - 1, &kept, sh, cluster);
  }
  const uint64_t min_weight = job.min_p > 0.0f ? rule::MinWeight(job.min_p) : 0;
  if (min_weight > 0) {
    uint64_t sum = 0;
    ForEachKey(keys, n, [&](uint64_t key) {
      const uint64_t weight = rule::WeightOf(LogitOfKey(key), max, scale);
      if (key >= floor && weight >= min_weight) sum += weight;
    });
    kept = ClusterSum(sum, sh, cluster);
  }
  const uint64_t picked = Select(keys, n, max, scale, floor, min_weight, /*by_count=*/false,
                                 rule::DrawPoint(job.draw, kept), nullptr, sh, cluster);
  if (rank == 0 && threadIdx.x == 0) {
    const int32_t id = rule::IdOfKey(picked);
    tokens[job.row] = id >= 0 && id < vocab ? id : ArgmaxIndex(best);
  }
}

// The launch of n_jobs rows in clusters of `blocks`.
cudaLaunchConfig_t ClusterLaunch(int n_jobs, int blocks, cudaStream_t stream,
                                 cudaLaunchAttribute& cluster) {
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = blocks;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(n_jobs * blocks);
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return config;
}

}  // namespace

size_t SampleWorkspaceBytes(int jobs, int vocab) {
  const size_t keys = std::max(kWideCluster * SliceOf(vocab, kWideCluster),
                               kNarrowCluster * SliceOf(vocab, kNarrowCluster));
  return static_cast<size_t>(jobs) * keys * sizeof(uint64_t);
}

cudaError_t SampleRowsActiveClusters(int blocks_per_row, int* clusters) {
  if (blocks_per_row != kWideCluster && blocks_per_row != kNarrowCluster) {
    return cudaErrorInvalidValue;
  }
  cudaLaunchAttribute cluster{};
  const cudaLaunchConfig_t config = ClusterLaunch(1, blocks_per_row, nullptr, cluster);
  return cudaOccupancyMaxActiveClusters(clusters, SampleRowsKernel, &config);
}

cudaError_t LaunchSampleRows(float* logits, int vocab, const SampleJob* jobs, int n_jobs,
                             const int32_t* penalized, int32_t* tokens, void* workspace,
                             cudaStream_t stream, int blocks_per_row) {
  if (n_jobs < 0 || vocab <= 0 ||
      (blocks_per_row != 0 && blocks_per_row != kWideCluster && blocks_per_row != kNarrowCluster)) {
    return cudaErrorInvalidValue;
  }
  if (n_jobs == 0) return cudaSuccess;
  if (blocks_per_row == 0) {
    int device = 0, sms = 0;
    KVTRIM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
    KVTRIM_CUDA_RETURN_IF_ERROR(
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    blocks_per_row = int64_t{n_jobs} * kWideCluster <= sms ? kWideCluster : kNarrowCluster;
  }
  cudaLaunchAttribute cluster{};
  const cudaLaunchConfig_t config = ClusterLaunch(n_jobs, blocks_per_row, stream, cluster);
  return cudaLaunchKernelEx(&config, SampleRowsKernel, logits, vocab, jobs, penalized, tokens,
                            static_cast<uint64_t*>(workspace));
}

}  // namespace kvtrim::engine::cuda
