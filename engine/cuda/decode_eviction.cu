// Decode-time eviction on the GPU (decode_eviction.h).
//
// One block of 16 warps per (sequence, kv-head) of the decode list; blocks of sequences without a
// policy return at once. CORM's observation reads the head's keys once (ScoreSegment: each key
// row split into 8-element pieces over adjacent lanes, so that loads are contiguous), keeping
// the group's scores in the workspace and each thread's online softmax state; the weights then
// come from the stored scores, fp32 throughout. Eviction runs one warp per segment (warp 0 the
// thin rows, warp 1 the recent rows): the evicted slots are found by ballots, highest first, and
// one lane follows KvCache::EvictRow's chain of moves on row indices in the workspace; then the
// rows move, one per lane (every source lies at or above the new row count, every destination
// below it).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "engine/cuda/bf16_vector.cuh"
#include "engine/cuda/check.h"
#include "engine/cuda/decode_eviction.h"

namespace kvtrim::engine::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = kMaxEvictionGroup;
constexpr int kMaxHeadDim = 256;

// One segment of one kv-head of one sequence: where its rows are.
struct Segment {
  const int32_t* key_pages;
  const int32_t* value_pages;
  int rows;
  int key_rows_per_page;  // rows of n_kv_heads * key_width
  int key_width;          // elements of the head's key in a row
};

__device__ __forceinline__ int64_t KeyAt(const PagedKv& kv, const Segment& seg, int n_kv_heads,
                                         int kv_head, int slot) {
  const int page = seg.key_pages[slot / seg.key_rows_per_page];
  return page * kv.page_elements +
         static_cast<int64_t>(slot % seg.key_rows_per_page) * n_kv_heads * seg.key_width +
         kv_head * seg.key_width;
}

__device__ __forceinline__ int64_t ValueAt(const PagedKv& kv, const Segment& seg, int head_dim,
                                           int kv_head, int slot) {
  const int page = seg.value_pages[slot / kv.rows_per_page];
  return page * kv.page_elements + static_cast<int64_t>(slot % kv.rows_per_page) * kv.row_elements +
         kv_head * head_dim;
}

__device__ __forceinline__ KeyState* StateAt(const DecodeStates& st, const Segment& seg,
                                             int n_kv_heads, int kv_head, int slot) {
  const int page = seg.value_pages[slot / st.rows_per_page];
  return st.states +
         (static_cast<int64_t>(page) * st.rows_per_page + slot % st.rows_per_page) * n_kv_heads +
         kv_head;
}

// (m, l) <- the online-softmax state of both (natural log domain; empty: (-inf, 0)).
__device__ __forceinline__ void Merge(float& m, float& l, float m_other, float l_other) {
  const float m_new = fmaxf(m, m_other);
  if (m_new == -INFINITY) return;
  l = l * expf(m - m_new) + l_other * expf(m_other - m_new);
  m = m_new;
}

struct Policy {
  int32_t kind, window_or_sinks, recent;
  double alpha;
  int32_t max_tokens;  // CORM's cap, 0 none
};

__device__ __forceinline__ bool Survives(const Policy& policy, const KeyState& s, int position) {
  const bool recent = s.position > position - policy.recent;
  if (policy.kind == kEvictCorm) {
    return recent ||
           (s.last_important >= 0 && s.last_important > position - policy.window_or_sinks);
  }
  return recent || s.position < policy.window_or_sinks;
}

// Where the scores start in the workspace, in int32 elements: after the eviction's row indices.
__host__ __device__ __forceinline__ int64_t ScoresAt(int n_seqs, int n_kv_heads, int max_rows) {
  return static_cast<int64_t>(n_seqs) * n_kv_heads * 2 * max_rows;
}

// The scores of one segment's rows, slot_base + row of `scores` (rows of `group`), scaled, with
// each thread's online softmax state (m, l) of those it writes. A key row is split into 8-element
// pieces over `lanes` adjacent lanes (the least power of two that covers it), 32 / lanes keys a
// warp at a time: loads are contiguous across the lanes of a key, the query pieces stay in
// registers, and each key's partial products meet by shuffles.
//   query: (group, head_dim) fp32 in shared memory, its first seg.key_width columns the key's
__device__ void ScoreSegment(const PagedKv& kv, const Segment& seg, int n_kv_heads, int kv_head,
                             int head_dim, int group, const float* query, float scale,
                             int slot_base, float* scores, float (&m)[kMaxGroup],
                             float (&l)[kMaxGroup]) {
  const int width = seg.key_width, pieces = (width + 7) / 8;
  int lanes = 1;
  while (lanes < pieces) lanes *= 2;
  const int keys_per_warp = 32 / lanes;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int piece = lane % lanes, sub = lane / lanes, first = piece * 8;
  const bool vector = width % 8 == 0;
  float qr[kMaxGroup][8];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      qr[g][e] = g < group && first + e < width ? query[g * head_dim + first + e] : 0.0f;
    }
  }
  for (int base = warp * keys_per_warp; base < seg.rows; base += kWarps * keys_per_warp) {
    const int row = base + sub;
    float k[8] = {};
    if (row < seg.rows && first < width) {
      const __nv_bfloat16* key = kv.pool + KeyAt(kv, seg, n_kv_heads, kv_head, row) + first;
      if (vector) {
        Unpack8(*reinterpret_cast<const uint4*>(key), k);
      } else {
        for (int e = 0; e < 8 && first + e < width; ++e) k[e] = __bfloat162float(key[e]);
      }
    }
    float dot[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      dot[g] = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) dot[g] += qr[g][e] * k[e];
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g < group) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], offset);
      }
    }
    if (piece == 0 && row < seg.rows) {
#pragma unroll
      for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= group) continue;
        const float score = dot[g] * scale;
        scores[static_cast<int64_t>(slot_base + row) * group + g] = score;
        Merge(m[g], l[g], score, 1.0f);
      }
    }
  }
}

// The sum of every thread's `value` over the block, to every thread. `partial`: kWarps ints of
// shared memory, free on entry and on return.
__device__ int BlockSum(int value, int* partial) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = value;
  __syncthreads();
  int sum = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) sum += partial[w];
  __syncthreads();
  return sum;
}

// CORM's cap (memory::compress's ApplyCap) over the head's t slots, thin rows first, every thread
// of the block: where more than max_tokens rows survive, the weakest survivors outside the recent
// rows (lowest recent_attention, then last_important, then position: a key unique per row) go
// too, as many as the excess. capped[slot] becomes 1 for those, else 0. The cut is found part by
// part of the key, each by bisection over its 32 bits with a block-wide count per step.
template <class StateOf>
__device__ void CapSurvivors(const Policy& policy, int position, int t, const StateOf& state_of,
                             int32_t* capped, int* partial) {
  // capped[slot] = 2 marks a candidate: a survivor outside the recent rows.
  int kept = 0, candidates = 0;
  for (int slot = threadIdx.x; slot < t; slot += kThreads) {
    const KeyState s = state_of(slot);
    const bool survives = Survives(policy, s, position);
    const bool candidate = survives && s.position <= position - policy.recent;
    capped[slot] = candidate ? 2 : 0;
    kept += survives;
    candidates += candidate;
  }
  kept = BlockSum(kept, partial);
  candidates = BlockSum(candidates, partial);
  int remaining = min(kept - policy.max_tokens, candidates);
  // The key's parts, compared as unsigned: recent_attention >= 0 orders as its bits.
  const auto part = [](const KeyState& s, int k) -> uint32_t {
    return k == 0   ? __float_as_uint(s.recent_attention)
           : k == 1 ? static_cast<uint32_t>(s.last_important + 1)
                    : static_cast<uint32_t>(s.position);
  };
  uint32_t prefix[2] = {0, 0};
  for (int k = 0; k < 3 && remaining > 0; ++k) {
    // Candidates matching the cut's parts so far, with part k at most `bound`.
    const auto count = [&](uint32_t bound, bool inclusive) {
      int n = 0;
      for (int slot = threadIdx.x; slot < t; slot += kThreads) {
        if (capped[slot] != 2) continue;
        const KeyState s = state_of(slot);
        bool match = true;
        for (int j = 0; j < k; ++j) match = match && part(s, j) == prefix[j];
        const uint32_t v = part(s, k);
        n += match && (inclusive ? v <= bound : v < bound);
      }
      return BlockSum(n, partial);
    };
    uint32_t lo = 0, hi = 0xffffffffu;
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (count(mid, true) >= remaining) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    // Everything below the cut's part k goes; at it, the next part decides (the position, unique,
    // decides at last: all of those up to it go).
    const bool last = k == 2;
    const int below = last ? remaining : count(lo, false);
    for (int slot = threadIdx.x; slot < t; slot += kThreads) {
      if (capped[slot] != 2) continue;
      const KeyState s = state_of(slot);
      bool match = true;
      for (int j = 0; j < k; ++j) match = match && part(s, j) == prefix[j];
      const uint32_t v = part(s, k);
      if (match && (last ? v <= lo : v < lo)) capped[slot] = 1;
    }
    __syncthreads();
    remaining -= below;
    if (k < 2) prefix[k] = lo;
  }
  for (int slot = threadIdx.x; slot < t; slot += kThreads) {
    if (capped[slot] == 2) capped[slot] = 0;
  }
}

__global__ void __launch_bounds__(kThreads)
    DecodeEvictionKernel(PagedKv kv, CompressedKv ckv, const int32_t* __restrict__ token_indptr,
                         const int32_t* __restrict__ positions, const int32_t* __restrict__ seqs,
                         const int32_t* __restrict__ params, const __nv_bfloat16* __restrict__ q,
                         int q_stride, int n_kv_heads, int group, int head_dim, DecodeStates states,
                         int n_seqs, int max_rows, int32_t* __restrict__ workspace,
                         int32_t* __restrict__ counts) {
  __shared__ float query[kMaxGroup * kMaxHeadDim];  // (group, head_dim): thin columns gathered
  __shared__ float full_query[kMaxGroup * kMaxHeadDim];
  __shared__ float reduce_m[kWarps][kMaxGroup], reduce_l[kWarps][kMaxGroup];
  __shared__ float softmax_m[kMaxGroup], softmax_l[kMaxGroup];

  const int seq = seqs[blockIdx.x], kv_head = blockIdx.y;
  const int32_t* p = params + static_cast<int64_t>(seq) * kEvictionParams;
  if (p[0] == kEvictNone) return;
  const Policy policy{p[0], p[1], p[2], __hiloint2double(p[4], p[3]), p[5]};
  const int token = token_indptr[seq];
  const int position = positions[token];
  const int head_at = seq * n_kv_heads + kv_head;
  const int key_width = ckv.key_width[seq];
  const Segment segments[2] = {
      Segment{ckv.thin_key_pages + ckv.thin_indptr[seq],
              ckv.thin_value_pages + ckv.thin_indptr[seq], ckv.thin_rows[head_at],
              static_cast<int>(kv.page_elements / (n_kv_heads * key_width)), key_width},
      Segment{kv.key_pages + kv.page_indptr[seq], kv.value_pages + kv.page_indptr[seq],
              ckv.recent_rows[head_at], kv.rows_per_page, head_dim},
  };
  const int n_thin = segments[0].rows, n_recent = segments[1].rows, t = n_thin + n_recent;

  if (threadIdx.x == 0) {
    *StateAt(states, segments[1], n_kv_heads, kv_head, n_recent - 1) = KeyState{position, -1, 0.0f};
  }

  if (policy.kind == kEvictCorm) {
    // A layer whose kept rows are all recent may have a key width and no channel set.
    const uint16_t* channels = key_width < head_dim && n_thin > 0
                                   ? ckv.channels + ckv.channel_offset[seq] + kv_head * key_width
                                   : nullptr;
    const __nv_bfloat16* q_token = q + static_cast<int64_t>(token) * q_stride;
    for (int i = threadIdx.x; i < group * head_dim; i += kThreads) {
      const int g = i / head_dim, c = i % head_dim;
      const __nv_bfloat16* q_head = q_token + static_cast<int64_t>(kv_head * group + g) * head_dim;
      full_query[i] = __bfloat162float(q_head[c]);
      if (c < key_width) query[i] = __bfloat162float(q_head[channels != nullptr ? channels[c] : c]);
    }
    __syncthreads();
    // Pass 1: every slot's scores into the block's (t, group) part of the workspace, and each
    // thread's online softmax state of the ones it wrote.
    float* scores = reinterpret_cast<float*>(workspace + ScoresAt(n_seqs, n_kv_heads, max_rows)) +
                    static_cast<int64_t>(blockIdx.x * n_kv_heads + kv_head) * 2 * max_rows * group;
    const float scale = rsqrtf(static_cast<float>(head_dim));
    float m[kMaxGroup], l[kMaxGroup];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      m[g] = -INFINITY;
      l[g] = 0.0f;
    }
    ScoreSegment(kv, segments[0], n_kv_heads, kv_head, head_dim, group, query, scale, 0, scores, m,
                 l);
    ScoreSegment(kv, segments[1], n_kv_heads, kv_head, head_dim, group, full_query, scale, n_thin,
                 scores, m, l);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        const float m_other = __shfl_xor_sync(0xffffffffu, m[g], offset);
        const float l_other = __shfl_xor_sync(0xffffffffu, l[g], offset);
        Merge(m[g], l[g], m_other, l_other);
      }
      if (lane == 0) {
        reduce_m[warp][g] = m[g];
        reduce_l[warp][g] = l[g];
      }
    }
    __syncthreads();
    if (threadIdx.x < group) {
      float mm = -INFINITY, ll = 0.0f;
      for (int w = 0; w < kWarps; ++w)
        Merge(mm, ll, reduce_m[w][threadIdx.x], reduce_l[w][threadIdx.x]);
      softmax_m[threadIdx.x] = mm;
      softmax_l[threadIdx.x] = ll;
    }
    __syncthreads();
    const double threshold = policy.alpha / static_cast<double>(t);
    for (int slot = threadIdx.x; slot < t; slot += kThreads) {
      float weight = 0.0f;
      for (int g = 0; g < group; ++g) {
        weight = fmaxf(weight, expf(scores[slot * group + g] - softmax_m[g]) / softmax_l[g]);
      }
      const bool thin = slot < n_thin;
      KeyState* state =
          StateAt(states, segments[thin ? 0 : 1], n_kv_heads, kv_head, thin ? slot : slot - n_thin);
      state->recent_attention = weight;
      if (static_cast<double>(weight) >= threshold) state->last_important = position;
    }
  }
  __syncthreads();  // every state of the head is written

  // CORM's cap, flagged per slot in the block's part of the workspace past the row indices (the
  // scores' place, free again).
  int32_t* capped = workspace + ScoresAt(n_seqs, n_kv_heads, max_rows) +
                    static_cast<int64_t>(blockIdx.x * n_kv_heads + kv_head) * 2 * max_rows * group;
  const bool cap = policy.kind == kEvictCorm && policy.max_tokens > 0;
  if (cap) {
    __shared__ int partial[kWarps];
    CapSurvivors(
        policy, position, t,
        [&](int slot) {
          const bool thin = slot < n_thin;
          return *StateAt(states, segments[thin ? 0 : 1], n_kv_heads, kv_head,
                          thin ? slot : slot - n_thin);
        },
        capped, partial);
    __syncthreads();
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp >= 2) return;
  const Segment& seg = segments[warp];
  const int rows = seg.rows;
  // src[p]: the row slot p holds once the segment is closed up, as KvCache::EvictRow leaves
  // it (evicted slots from the highest down, each filled by the segment's current last row).
  int32_t* src =
      workspace + (static_cast<int64_t>(blockIdx.x * n_kv_heads + kv_head) * 2 + warp) * max_rows;
  const int first_slot = warp == 0 ? 0 : n_thin;  // the segment's first in the head's slots
  const auto survives = [&](int slot) {
    return Survives(policy, *StateAt(states, seg, n_kv_heads, kv_head, slot), position) &&
           !(cap && capped[first_slot + slot] == 1);
  };
  for (int slot = lane; slot < rows; slot += 32) src[slot] = slot;
  __syncwarp();
  // The evicted slots, highest first, 32 at a time by ballot; the chain of moves in lane 0 (in
  // a steady decode one or two a step). A row that survives below the final count stays put, so
  // every row moved comes from at or above it and is read before anything is written there.
  int length = rows;
  for (int top = rows - 1; top >= 0; top -= 32) {
    const int slot = top - lane;
    const unsigned evicted = __ballot_sync(0xffffffffu, slot >= 0 && !survives(slot));
    if (lane == 0) {
      for (unsigned bits = evicted; bits != 0; bits &= bits - 1) {
        const int r = top - (__ffs(bits) - 1);  // lowest lane first: the highest slot
        if (r < length - 1) src[r] = src[length - 1];
        --length;
      }
    }
    length = __shfl_sync(0xffffffffu, length, 0);
  }
  __syncwarp();
  if (lane == 0) counts[head_at * 2 + warp] = length;
  __nv_bfloat16* pool = kv.pool;
  for (int to = lane; to < length; to += 32) {
    const int from = src[to];
    if (from == to) continue;
    const int64_t key_from = KeyAt(kv, seg, n_kv_heads, kv_head, from);
    const int64_t key_to = KeyAt(kv, seg, n_kv_heads, kv_head, to);
    for (int c = 0; c < seg.key_width; ++c) pool[key_to + c] = pool[key_from + c];
    const int64_t value_from = ValueAt(kv, seg, head_dim, kv_head, from);
    const int64_t value_to = ValueAt(kv, seg, head_dim, kv_head, to);
    for (int c = 0; c < head_dim; c += 8) {
      *reinterpret_cast<uint4*>(pool + value_to + c) =
          *reinterpret_cast<const uint4*>(pool + value_from + c);
    }
    *StateAt(states, seg, n_kv_heads, kv_head, to) =
        *StateAt(states, seg, n_kv_heads, kv_head, from);
  }
}

__global__ void WriteKeptStatesKernel(const int32_t* __restrict__ kept, int kept_tokens,
                                      int thin_rows, int n, int n_kv_heads,
                                      const KeyState* __restrict__ prompt_states,
                                      const int32_t* __restrict__ thin_value_pages,
                                      const int32_t* __restrict__ recent_value_pages,
                                      DecodeStates states) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x, kv_head = blockIdx.y;
  if (j >= kept_tokens) return;
  const int token = kept[static_cast<int64_t>(kv_head) * kept_tokens + j];
  const bool thin = j < thin_rows;
  const int slot = thin ? j : j - thin_rows;
  const int page = (thin ? thin_value_pages : recent_value_pages)[slot / states.rows_per_page];
  states.states[(static_cast<int64_t>(page) * states.rows_per_page + slot % states.rows_per_page) *
                    n_kv_heads +
                kv_head] = prompt_states != nullptr
                               ? prompt_states[static_cast<int64_t>(kv_head) * n + token]
                               : KeyState{token, -1, 0.0f};
}

}  // namespace

size_t DecodeEvictionWorkspaceBytes(int n_seqs, int max_rows, const AttentionShape& shape) {
  // Row indices of both segments, then CORM's scores: (2 max_rows, group) fp32 per block.
  const int group = shape.n_kv_heads > 0 ? shape.n_heads / shape.n_kv_heads : 0;
  return (static_cast<size_t>(ScoresAt(n_seqs, shape.n_kv_heads, max_rows)) +
          static_cast<size_t>(n_seqs) * shape.n_kv_heads * 2 * max_rows * group) *
         sizeof(int32_t);
}

cudaError_t LaunchDecodeEviction(const PagedKv& kv, const CompressedKv& ckv,
                                 const int32_t* token_indptr, const int32_t* positions,
                                 const int32_t* seqs, int n_seqs, const int32_t* params,
                                 const __nv_bfloat16* q, int q_stride, const AttentionShape& shape,
                                 const DecodeStates& states, int max_rows, int32_t* workspace,
                                 int32_t* counts, cudaStream_t stream) {
  if (n_seqs == 0) return cudaSuccess;
  const int group = shape.n_kv_heads > 0 ? shape.n_heads / shape.n_kv_heads : 0;
  if (shape.n_kv_heads <= 0 || group < 1 || group > kMaxGroup ||
      shape.n_heads % shape.n_kv_heads != 0 || shape.head_dim < 16 ||
      shape.head_dim > kMaxHeadDim || shape.head_dim % 8 != 0 || max_rows < 1 ||
      states.states == nullptr || states.rows_per_page != kv.rows_per_page ||
      workspace == nullptr || counts == nullptr || params == nullptr || seqs == nullptr ||
      reinterpret_cast<uintptr_t>(kv.pool) % 16 != 0 || kv.page_elements % 8 != 0 ||
      kv.row_elements % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  DecodeEvictionKernel<<<dim3(n_seqs, shape.n_kv_heads), kThreads, 0, stream>>>(
      kv, ckv, token_indptr, positions, seqs, params, q, q_stride, shape.n_kv_heads, group,
      shape.head_dim, states, n_seqs, max_rows, workspace, counts);
  return LaunchError();
}

cudaError_t LaunchWriteKeptStates(const int32_t* kept, int kept_tokens, int thin_rows, int n,
                                  int n_kv_heads, const KeyState* prompt_states,
                                  const int32_t* thin_value_pages,
                                  const int32_t* recent_value_pages, const DecodeStates& states,
                                  cudaStream_t stream) {
  if (kept_tokens <= 0) return cudaSuccess;
  if (states.states == nullptr || states.rows_per_page < 1 || n_kv_heads < 1 || kept == nullptr) {
    return cudaErrorInvalidValue;
  }
  constexpr int kBlock = 256;
  WriteKeptStatesKernel<<<dim3((kept_tokens + kBlock - 1) / kBlock, n_kv_heads), kBlock, 0,
                          stream>>>(kept, kept_tokens, thin_rows, n, n_kv_heads, prompt_states,
                                    thin_value_pages, recent_value_pages, states);
  return LaunchError();
}

}  // namespace kvtrim::engine::cuda
