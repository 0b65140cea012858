// Decode-time eviction on the GPU (decode_eviction.h).
//
// One block of 16 warps per (sequence, kv-head) of the decode list; blocks of sequences without a
// policy return at once.
//  - CORM's observation scores the head's keys on the tensor cores (ScoreSegment: 16 rows a warp
//    at a time, each lane loading 16 bytes of two rows per 32 channels; the recent segment's
//    tiles go on to the warps after the thin segment's last), keeping the group's scores in the
//    workspace and each lane's online softmax state; the weights then come from the stored
//    scores, fp32 throughout. Rows find their pages by a multiply (RowsPerPage), not a division.
//  - CORM's cap finds its cut by radix selection over the survivors' keys (CapCut).
//  - Every warp marks evicted slots by ballot, a 32-slot word at a time in shared memory (the
//    observation's state update in the same pass when there is no cap).
//  - The segments close up (warp 0 the thin rows, warp 1 the recent rows): one lane follows
//    KvCache::EvictRow's chain of moves (highest evicted slot first) on row indices in the
//    workspace; then the rows move, every thread of the block a (slot, part) at a time (every
//    source lies at or above the new row count, every destination below it).
// Re-thinning after eviction (LaunchRethinAfterEviction) takes a block of 8 warps per (sequence,
// kv-head): the moving rows are ranked by position in the workspace, copied to the thin segment
// in parallel, and the recent segment is closed up over them as eviction closes it up.
#include <cuda_bf16.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "engine/cuda/bf16_vector.cuh"
#include "engine/cuda/check.h"
#include "engine/cuda/decode_eviction.h"
#include "engine/cuda/tensor_core.cuh"

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
  RowsPerPage key_rows;    // rows of n_kv_heads * key_width a key page holds
  int key_width;           // elements of the head's key in a row
  RowsPerPage value_rows;  // full-width rows a value page (and its states) holds
};

__device__ __forceinline__ int64_t KeyAt(const PagedKv& kv, const Segment& seg, int n_kv_heads,
                                         int kv_head, int slot) {
  const int index = seg.key_rows.PageOf(slot);
  return seg.key_pages[index] * kv.page_elements +
         static_cast<int64_t>(slot - index * seg.key_rows.rows) * n_kv_heads * seg.key_width +
         kv_head * seg.key_width;
}

__device__ __forceinline__ int64_t ValueAt(const PagedKv& kv, const Segment& seg, int head_dim,
                                           int kv_head, int slot) {
  const int index = seg.value_rows.PageOf(slot);
  return seg.value_pages[index] * kv.page_elements +
         static_cast<int64_t>(slot - index * seg.value_rows.rows) * kv.row_elements +
         kv_head * head_dim;
}

// (The states' rows per page are the value pages': LaunchDecodeEviction checks.)
__device__ __forceinline__ KeyState* StateAt(const DecodeStates& st, const Segment& seg,
                                             int n_kv_heads, int kv_head, int slot) {
  const int index = seg.value_rows.PageOf(slot);
  return st.states + DecodeStateIndex(seg.value_pages[index], slot - index * seg.value_rows.rows,
                                      kv_head, n_kv_heads, st.rows_per_page);
}

// pool[to, to + elements) = pool[from, ...), the two ranges apart; 16-byte pieces when `vector`
// (both 16-byte aligned, elements a multiple of 8), a chunk's loads issued before its stores.
__device__ __forceinline__ void CopyRow(__nv_bfloat16* pool, int64_t to, int64_t from, int elements,
                                        bool vector) {
  if (vector) {
    for (int c0 = 0; c0 < elements; c0 += 32) {
      uint4 piece[4];
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        if (c0 + 8 * p < elements)
          piece[p] = *reinterpret_cast<const uint4*>(pool + from + c0 + 8 * p);
      }
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        if (c0 + 8 * p < elements) *reinterpret_cast<uint4*>(pool + to + c0 + 8 * p) = piece[p];
      }
    }
    return;
  }
  for (int c0 = 0; c0 < elements; c0 += 8) {
    __nv_bfloat16 piece[8];
#pragma unroll
    for (int p = 0; p < 8; ++p) {
      if (c0 + p < elements) piece[p] = pool[from + c0 + p];
    }
#pragma unroll
    for (int p = 0; p < 8; ++p) {
      if (c0 + p < elements) pool[to + c0 + p] = piece[p];
    }
  }
}

// Closing up a segment whose slots marked in `gone` leave, `length` of its rows staying, as
// KvCache::EvictRow leaves it (evicted slots from the highest down, each filled by the
// segment's last row at that point), in two parts with a barrier between them.
//
// CloseUpChain (one warp): src[p] = the row slot p holds once the segment is closed up, for every
// evicted slot p below `length` (src: `rows` int32 of workspace). A row that survives below the
// final count stays put, so every row moved comes from at or above it.
__device__ void CloseUpChain(const uint32_t* gone, int rows, int length, int32_t* src) {
  const int lane = threadIdx.x % 32, n_words = (rows + 31) / 32;
  for (int slot = length + lane; slot < rows; slot += 32) src[slot] = slot;
  __syncwarp();
  if (lane == 0) {
    int end = rows;
    for (int w = n_words - 1; w >= 0; --w) {
      for (uint32_t bits = gone[w]; bits != 0;) {
        const int bit = 31 - __clz(bits);  // the highest slot first
        bits &= ~(1u << bit);
        const int r = w * 32 + bit;
        if (r < end - 1) src[r] = src[end - 1];
        --end;
      }
    }
  }
  __syncwarp();
}

// CloseUpMove (threads first, first + stride, ...): every evicted slot below `length` takes row
// src[slot]'s key (on the segment's width), value and state, a (slot, part) per thread at a time.
// Every source lies at or above `length`, every destination below it.
__device__ void CloseUpMove(const PagedKv& kv, const Segment& seg, const DecodeStates& states,
                            int n_kv_heads, int kv_head, int head_dim, const uint32_t* gone,
                            int length, const int32_t* src, int first, int stride) {
  for (int e = first; e < 3 * length; e += stride) {
    const int to = e / 3, part = e % 3;
    if (!(gone[to / 32] >> (to % 32) & 1u)) continue;
    const int from = src[to];
    if (part == 0) {
      CopyRow(kv.pool, KeyAt(kv, seg, n_kv_heads, kv_head, to),
              KeyAt(kv, seg, n_kv_heads, kv_head, from), seg.key_width, seg.key_width % 8 == 0);
    } else if (part == 1) {
      CopyRow(kv.pool, ValueAt(kv, seg, head_dim, kv_head, to),
              ValueAt(kv, seg, head_dim, kv_head, from), head_dim, true);
    } else {
      *StateAt(states, seg, n_kv_heads, kv_head, to) =
          *StateAt(states, seg, n_kv_heads, kv_head, from);
    }
  }
}

// (m, l) <- the online-softmax state of both (natural log domain; empty: (-inf, 0)).
__device__ __forceinline__ void Merge(float& m, float& l, float m_other, float l_other) {
  const float m_new = fmaxf(m, m_other);
  if (m_new == -INFINITY) return;
  l = l * expf(m - m_new) + l_other * expf(m_other - m_new);
  m = m_new;
}

// (m, l) <- the online-softmax state with one more score of weight 1 (as Merge(m, l, score, 1)).
__device__ __forceinline__ void Add(float& m, float& l, float score) {
  if (score > m) {
    l = l * expf(m - score) + 1.0f;
    m = score;
  } else if (m != -INFINITY) {
    l += expf(score - m);
  }
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

// Where the scores start in the workspace, in int32 elements: after the eviction's row indices,
// on 16 bytes (a block's rows of scores are then too where the group is a multiple of 4).
__host__ __device__ __forceinline__ int64_t ScoresAt(int n_seqs, int n_kv_heads, int max_rows) {
  return (static_cast<int64_t>(n_seqs) * n_kv_heads * 2 * max_rows + 3) / 4 * 4;
}

// Up to 8 bf16 of a key row from element `first` on, zeros past `width`, read element by element
// (a row whose width is not a multiple of 8 is not 16-byte aligned).
__device__ __forceinline__ uint4 KeyPiece(const __nv_bfloat16* row, int first, int width) {
  if (first + 8 <= width) return Load8(row + first, false);
  const unsigned short* bits = reinterpret_cast<const unsigned short*>(row + first);
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t low = first + 2 * i < width ? bits[2 * i] : 0u;
    const uint32_t high = first + 2 * i + 1 < width ? bits[2 * i + 1] : 0u;
    words[i] = low | (high << 16);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// 32-channel blocks of the widest key.
constexpr int kMaxBlocks = kMaxHeadDim / 32;

// The query heads of one kv-head as the B operand of mma.sync m16n8k16 (k: channels, n: the
// group's heads) in shared memory: lane l's register pair of 32-channel block j, half u is
// fragments[(2 j + u) * 32 + l]. Channels are permuted within each block so that a lane's part of
// a key row is 8 adjacent elements: logical k of a 16-step maps to block channel
// 8 (k % 8 / 2) + 4 u + 2 (k / 8) + k % 2, which for lane l (l % 4 = i) is channels
// 8 i + 4 u + {0, 1} (k = 2i, 2i + 1) and + {2, 3} (k = 2i + 8, 2i + 9). Element c of the key is
// the query's channel channels[c] (identity when null); past `width` zero. One warp fills it.
__device__ __forceinline__ void StoreQueryFragments(uint2* fragments, const __nv_bfloat16* q_heads,
                                                    int head_dim, int group, int width,
                                                    const uint16_t* channels) {
  const int lane = threadIdx.x % 32, n = lane / 4, i = lane % 4;
  const __nv_bfloat16* head = q_heads + static_cast<int64_t>(n) * head_dim;
  for (int j = 0; j < (width + 31) / 32; ++j) {
    for (int u = 0; u < 2; ++u) {
      float v[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = 32 * j + 8 * i + 4 * u + e;
        v[e] = n < group && c < width
                   ? __bfloat162float(head[channels != nullptr ? channels[c] : c])
                   : 0.0f;
      }
      fragments[(2 * j + u) * 32 + lane] = make_uint2(PackBf16(v[0], v[1]), PackBf16(v[2], v[3]));
    }
  }
}

// The scores of one segment's rows, slot_base + row of `scores` (rows of `group`), scaled, with
// this lane's online softmax state (m, l) of heads 2 (lane % 4) and 2 (lane % 4) + 1. A warp
// scores 16 rows at a time on the tensor cores: lane l loads 8 adjacent elements of rows l / 4
// and l / 4 + 8 per 32-channel block (16-byte loads), the A operand in the query's permuted
// channel order (StoreQueryFragments). Tile i goes to warp (first_warp + i) % kWarps, so that a
// segment's tiles carry on where the one before it left off. kTiles of the warp's tiles are
// loaded before the first of their products, kBlocks 32-channel blocks of each at a time, so that
// a warp waits on memory once per kTiles tiles. kVector: the key width is a multiple of 8 (every
// piece one 16-byte load).
template <int kTiles, int kBlocks, bool kVector>
__device__ __forceinline__ void ScoreTiles(const PagedKv& kv, const Segment& seg, int n_kv_heads,
                                           int kv_head, int group, const uint2* query, float scale,
                                           int slot_base, int first_warp, float* scores,
                                           float (&m)[2], float (&l)[2]) {
  const int width = seg.key_width, blocks = (width + 31) / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, r = lane / 4, i = lane % 4;
  const int tiles = (seg.rows + 15) / 16;
  for (int tile0 = (warp - first_warp + kWarps) % kWarps; tile0 < tiles; tile0 += kWarps * kTiles) {
    const __nv_bfloat16* key[kTiles][2];
#pragma unroll
    for (int u = 0; u < kTiles; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = (tile0 + u * kWarps) * 16 + r + 8 * h;
        key[u][h] = row < seg.rows ? kv.pool + KeyAt(kv, seg, n_kv_heads, kv_head, row) : nullptr;
      }
    }
    float c[kTiles][4] = {};
#pragma unroll
    for (int j0 = 0; j0 < kMaxBlocks; j0 += kBlocks) {
      if (j0 >= blocks) continue;
      uint4 k[kTiles][2][kBlocks];
#pragma unroll
      for (int u = 0; u < kTiles; ++u) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
          for (int j = 0; j < kBlocks; ++j) {
            const int first = 32 * (j0 + j) + 8 * i;
            k[u][h][j] =
                j0 + j < blocks && first < width && key[u][h] != nullptr
                    ? (kVector ? Load8(key[u][h] + first, true) : KeyPiece(key[u][h], first, width))
                    : make_uint4(0, 0, 0, 0);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kTiles; ++u) {
#pragma unroll
        for (int j = 0; j < kBlocks; ++j) {
          if (j0 + j >= blocks) continue;
          const uint32_t a0[4] = {k[u][0][j].x, k[u][1][j].x, k[u][0][j].y, k[u][1][j].y};
          const uint32_t a1[4] = {k[u][0][j].z, k[u][1][j].z, k[u][0][j].w, k[u][1][j].w};
          const uint2 b0 = query[(2 * (j0 + j)) * 32 + lane],
                      b1 = query[(2 * (j0 + j) + 1) * 32 + lane];
          Mma(c[u], a0, b0.x, b0.y);
          Mma(c[u], a1, b1.x, b1.y);
        }
      }
    }
    // c[u]: rows row0 (c[u][0], c[u][1]) and row0 + 8 (c[u][2], c[u][3]), heads 2i and 2i + 1.
#pragma unroll
    for (int u = 0; u < kTiles; ++u) {
      const int row0 = (tile0 + u * kWarps) * 16 + r;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = e < 2 ? row0 : row0 + 8, g = 2 * i + e % 2;
        if (row >= seg.rows || g >= group) continue;
        const float score = c[u][e] * scale;
        scores[static_cast<int64_t>(slot_base + row) * group + g] = score;
        Add(m[e % 2], l[e % 2], score);
      }
    }
  }
}

// ScoreTiles for the segment's key width: two tiles in flight where a key is one 32-channel
// block, wider keys one tile at a time (two tiles of 64-channel keys take more registers than two
// blocks per multiprocessor leave, and spill). kAnyWidth: widths not a multiple of 8 may come
// (thin keys); full-width keys are always a multiple of 8.
template <bool kAnyWidth>
__device__ __forceinline__ void ScoreSegment(const PagedKv& kv, const Segment& seg, int n_kv_heads,
                                             int kv_head, int group, const uint2* query,
                                             float scale, int slot_base, int first_warp,
                                             float* scores, float (&m)[2], float (&l)[2]) {
  const auto score = [&]<bool kVector>() {
    const int blocks = (seg.key_width + 31) / 32;
    if (blocks == 1) {
      ScoreTiles<2, 1, kVector>(kv, seg, n_kv_heads, kv_head, group, query, scale, slot_base,
                                first_warp, scores, m, l);
    } else if (blocks == 2) {
      ScoreTiles<1, 2, kVector>(kv, seg, n_kv_heads, kv_head, group, query, scale, slot_base,
                                first_warp, scores, m, l);
    } else {
      ScoreTiles<1, 4, kVector>(kv, seg, n_kv_heads, kv_head, group, query, scale, slot_base,
                                first_warp, scores, m, l);
    }
  };
  if (!kAnyWidth || seg.key_width % 8 == 0) {
    score.template operator()<true>();
  } else {
    score.template operator()<false>();
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

// CORM's cap (memory::compress's ApplyCap) orders survivors outside the recent rows by
// (recent_attention, last_important, position), weakest first; compared as unsigned, each part
// orders as its bits (recent_attention >= 0, last_important >= -1). Position is unique to a row,
// so the key is too.
struct CapKey {
  uint32_t part[3];
};

__device__ __forceinline__ CapKey CapKeyOf(const KeyState& s) {
  return CapKey{{__float_as_uint(s.recent_attention), static_cast<uint32_t>(s.last_important + 1),
                 static_cast<uint32_t>(s.position)}};
}

__device__ __forceinline__ bool AtMost(const CapKey& a, const CapKey& b) {
  for (int k = 0; k < 3; ++k) {
    if (a.part[k] != b.part[k]) return a.part[k] < b.part[k];
  }
  return true;
}

// Slots of the head whose cap keys a thread keeps in registers: heads of up to this many times
// kThreads rows read their states once for the whole selection.
constexpr int kCachedSlots = 4;

// CORM's cap over the head's t slots (thin rows first), every thread of the block: where more
// than max_tokens rows survive, the weakest survivors outside the recent rows go too, as many as
// the excess. Returns the cut: a candidate goes when its key is AtMost the cut; *capping says
// whether any does. The cut is found by radix selection, 8 bits of the 96-bit key a pass, with
// a block-wide histogram in shared memory.
template <class StateOf>
__device__ CapKey CapCut(const Policy& policy, int position, int t, const StateOf& state_of,
                         int* partial, bool* capping) {
  __shared__ int histogram[256];
  __shared__ int chosen[2];  // the pass's digit and the candidates below it
  const auto candidate = [&](const KeyState& s) {
    return Survives(policy, s, position) && s.position <= position - policy.recent;
  };
  CapKey cached[kCachedSlots];
  unsigned cached_candidates = 0;
  int kept = 0, candidates = 0;
#pragma unroll
  for (int k = 0; k < kCachedSlots; ++k) {
    const int slot = threadIdx.x + k * kThreads;
    if (slot >= t) continue;
    const KeyState s = state_of(slot);
    kept += Survives(policy, s, position);
    if (candidate(s)) {
      cached[k] = CapKeyOf(s);
      cached_candidates |= 1u << k;
      ++candidates;
    }
  }
  for (int slot = threadIdx.x + kCachedSlots * kThreads; slot < t; slot += kThreads) {
    const KeyState s = state_of(slot);
    kept += Survives(policy, s, position);
    candidates += candidate(s);
  }
  kept = BlockSum(kept, partial);
  candidates = BlockSum(candidates, partial);
  int remaining = min(kept - policy.max_tokens, candidates);  // rank of the cut, from 1
  *capping = remaining > 0;
  CapKey cut{{0, 0, 0}};
  if (remaining <= 0) return cut;
  const auto for_each_candidate = [&](auto&& visit) {
#pragma unroll
    for (int k = 0; k < kCachedSlots; ++k) {
      if (cached_candidates & (1u << k)) visit(cached[k]);
    }
    for (int slot = threadIdx.x + kCachedSlots * kThreads; slot < t; slot += kThreads) {
      const KeyState s = state_of(slot);
      if (candidate(s)) visit(CapKeyOf(s));
    }
  };
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int pass = 0; pass < 12; ++pass) {
    const int part = pass / 4, shift = 24 - 8 * (pass % 4);
    const uint32_t high = shift == 24 ? 0u : 0xffffffffu << (shift + 8);  // bits chosen so far
    for (int i = threadIdx.x; i < 256; i += kThreads) histogram[i] = 0;
    __syncthreads();
    for_each_candidate([&](const CapKey& key) {
      bool match = (key.part[part] & high) == cut.part[part];
      for (int k = 0; k < part; ++k) match = match && key.part[k] == cut.part[k];
      if (match) atomicAdd(&histogram[(key.part[part] >> shift) & 255], 1);
    });
    __syncthreads();
    if (warp == 0) {
      // Lane l sums bins 8 l .. 8 l + 7; the first bin where the running count reaches
      // `remaining` is the digit.
      int bins[8], sum = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        bins[i] = histogram[8 * lane + i];
        sum += bins[i];
      }
      int before = sum;  // inclusive scan over the lanes, then made exclusive
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const int other = __shfl_up_sync(0xffffffffu, before, offset);
        if (lane >= offset) before += other;
      }
      before -= sum;
      const unsigned reaches =
          __ballot_sync(0xffffffffu, before < remaining && before + sum >= remaining);
      if (lane == __ffs(reaches) - 1) {
        int i = 0;
        while (before + bins[i] < remaining) before += bins[i++];
        chosen[0] = 8 * lane + i;
        chosen[1] = before;
      }
    }
    __syncthreads();
    cut.part[part] |= static_cast<uint32_t>(chosen[0]) << shift;
    remaining -= chosen[1];
  }
  return cut;
}

__global__ void __launch_bounds__(kThreads, 2)
    DecodeEvictionKernel(PagedKv kv, CompressedKv ckv, const int32_t* __restrict__ token_indptr,
                         const int32_t* __restrict__ positions, const int32_t* __restrict__ seqs,
                         const int32_t* __restrict__ params, const __nv_bfloat16* __restrict__ q,
                         int q_stride, int n_kv_heads, int group, int head_dim, DecodeStates states,
                         int n_seqs, int max_rows, int32_t* __restrict__ workspace,
                         int32_t* __restrict__ counts) {
  __shared__ uint2 thin_query[2 * kMaxBlocks * 32], full_query[2 * kMaxBlocks * 32];
  __shared__ float reduce_m[kWarps][kMaxGroup], reduce_l[kWarps][kMaxGroup];
  __shared__ float softmax_m[kMaxGroup], softmax_l[kMaxGroup];
  extern __shared__ uint32_t evicted[];  // 2 ((max_rows + 31) / 32) words

  // The sequence's metadata, all of it asked for before the policy is tested: one wait.
  const int seq = seqs[blockIdx.x], kv_head = blockIdx.y;
  const int head_at = seq * n_kv_heads + kv_head;
  const int32_t* p = params + static_cast<int64_t>(seq) * kEvictionParams;
  const int kind = p[0];
  const int token = token_indptr[seq];
  const int key_width = ckv.key_width[seq];
  const int thin_first = ckv.thin_indptr[seq], recent_first = kv.page_indptr[seq];
  const int n_thin = ckv.thin_rows[head_at], n_recent = ckv.recent_rows[head_at];
  const int channel_offset = ckv.channel_offset != nullptr ? ckv.channel_offset[seq] : 0;
  if (kind == kEvictNone) return;
  const Policy policy{kind, p[1], p[2], __hiloint2double(p[4], p[3]), p[5]};
  const int position = positions[token];
  const int key_rows_per_page = static_cast<int>(kv.page_elements / (n_kv_heads * key_width));
  const RowsPerPage value_rows(kv.rows_per_page);
  const Segment segments[2] = {
      Segment{ckv.thin_key_pages + thin_first, ckv.thin_value_pages + thin_first, n_thin,
              RowsPerPage(key_rows_per_page), key_width, value_rows},
      Segment{kv.key_pages + recent_first, kv.value_pages + recent_first, n_recent, value_rows,
              head_dim, value_rows},
  };
  const int t = n_thin + n_recent;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const KeyState fresh{position, -1, 0.0f};  // the new row's state

  // CORM's query fragments (warps 0 and 1).
  const uint16_t* channels = nullptr;
  const __nv_bfloat16* q_heads = nullptr;
  if (policy.kind == kEvictCorm) {
    // A layer whose kept rows are all recent may have a key width and no channel set.
    if (key_width < head_dim && n_thin > 0)
      channels = ckv.channels + channel_offset + kv_head * key_width;
    q_heads = q + static_cast<int64_t>(token) * q_stride +
              static_cast<int64_t>(kv_head) * group * head_dim;
    if (warp == 0) StoreQueryFragments(thin_query, q_heads, head_dim, group, key_width, channels);
    if (warp == 1) StoreQueryFragments(full_query, q_heads, head_dim, group, head_dim, nullptr);
  }
  __syncthreads();

  const auto state_at = [&](int slot) {  // the head's slot: thin rows first
    // (Both segments' value pages hold the states; no segment picked by index, which would put
    // them in local memory.)
    const bool thin = slot < n_thin;
    const int row = thin ? slot : slot - n_thin;
    const int index = value_rows.PageOf(row);
    const int32_t* pages = thin ? segments[0].value_pages : segments[1].value_pages;
    return states.states + DecodeStateIndex(pages[index], row - index * value_rows.rows, kv_head,
                                            n_kv_heads, states.rows_per_page);
  };
  const auto state_of = [&](int slot) { return slot == t - 1 ? fresh : *state_at(slot); };

  // The evicted slots: bit b of evicted[word] is slot 32 word + b of its segment, the thin
  // segment's words first, every warp a word at a time; `visit` says whether the slot goes.
  const int thin_words = (n_thin + 31) / 32, words = thin_words + (n_recent + 31) / 32;
  const auto for_each_word = [&](auto&& visit) {
    for (int word = warp; word < words; word += kWarps) {
      const bool thin = word < thin_words;
      const int slot = (thin ? word * 32 : n_thin + (word - thin_words) * 32) + lane;
      const bool in = slot < (thin ? n_thin : t);
      const bool gone = visit(slot, in);
      const unsigned bits = __ballot_sync(0xffffffffu, in && gone);
      if (lane == 0) evicted[word] = bits;
    }
  };

  const float* scores = nullptr;
  if (policy.kind == kEvictCorm) {
    // Pass 1: every slot's scores into the block's (t, group) part of the workspace, and each
    // lane's online softmax state of the ones it wrote.
    float* written = reinterpret_cast<float*>(workspace + ScoresAt(n_seqs, n_kv_heads, max_rows)) +
                     static_cast<int64_t>(blockIdx.x * n_kv_heads + kv_head) * 2 * max_rows * group;
    const float scale = rsqrtf(static_cast<float>(head_dim));
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    ScoreSegment<true>(kv, segments[0], n_kv_heads, kv_head, group, thin_query, scale, 0, 0,
                       written, m, l);
    ScoreSegment<false>(kv, segments[1], n_kv_heads, kv_head, group, full_query, scale, n_thin,
                        (n_thin + 15) / 16 % kWarps, written, m, l);
    // Lanes i, i + 4, ... hold heads 2i and 2i + 1.
#pragma unroll
    for (int e = 0; e < 2; ++e) {
#pragma unroll
      for (int offset = 4; offset < 32; offset *= 2) {
        const float m_other = __shfl_xor_sync(0xffffffffu, m[e], offset);
        const float l_other = __shfl_xor_sync(0xffffffffu, l[e], offset);
        Merge(m[e], l[e], m_other, l_other);
      }
      const int g = 2 * lane + e;
      if (lane < 4 && g < group) {
        reduce_m[warp][g] = m[e];
        reduce_l[warp][g] = l[e];
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
    scores = written;
  }

  const bool cap = policy.kind == kEvictCorm && policy.max_tokens > 0;
  const double threshold = policy.alpha / static_cast<double>(t);
  // The slot's state with CORM's observation (the group's largest weight) taken in, stored.
  const auto observe = [&](int slot) {
    KeyState s = state_of(slot);
    float weight = 0.0f;
    const float* row = scores + static_cast<int64_t>(slot) * group;
    const auto take = [&](int g, float score) {
      weight = fmaxf(weight, expf(score - softmax_m[g]) / softmax_l[g]);
    };
    if (group % 4 == 0) {  // the row in 16-byte loads
      for (int g = 0; g < group; g += 4) {
        const float4 four = *reinterpret_cast<const float4*>(row + g);
        take(g, four.x);
        take(g + 1, four.y);
        take(g + 2, four.z);
        take(g + 3, four.w);
      }
    } else {
      for (int g = 0; g < group; ++g) take(g, row[g]);
    }
    s.recent_attention = weight;
    if (static_cast<double>(weight) >= threshold) s.last_important = position;
    *state_at(slot) = s;
    return s;
  };
  if (scores != nullptr && !cap) {
    for_each_word(
        [&](int slot, bool in) { return in && !Survives(policy, observe(slot), position); });
  } else {
    if (scores != nullptr) {
      for_each_word([&](int slot, bool in) {
        if (in) observe(slot);
        return false;
      });
    } else if (threadIdx.x == 0) {
      *state_at(t - 1) = fresh;
    }
    __syncthreads();  // every state of the head is written (and the weights' scores read)
    CapKey cut{{0, 0, 0}};
    bool capping = false;
    if (cap) {
      __shared__ int partial[kWarps];
      cut = CapCut(
          policy, position, t, [&](int slot) { return *state_at(slot); }, partial, &capping);
    }
    for_each_word([&](int slot, bool in) {
      if (!in) return false;
      const KeyState s = *state_at(slot);
      if (!Survives(policy, s, position)) return true;
      return capping && s.position <= position - policy.recent && AtMost(CapKeyOf(s), cut);
    });
  }
  __syncthreads();
  // Warp w counts segment w's rows and follows its chain of moves; then every thread moves rows.
  __shared__ int lengths[2];
  const auto src_of = [&](int segment) {
    return workspace +
           (static_cast<int64_t>(blockIdx.x * n_kv_heads + kv_head) * 2 + segment) * max_rows;
  };
  const auto gone_of = [&](int segment) { return evicted + (segment == 0 ? 0 : thin_words); };
  if (warp < 2) {
    const int rows = warp == 0 ? n_thin : n_recent;
    const uint32_t* gone = gone_of(warp);
    const int n_words = (rows + 31) / 32;
    int n_gone = 0;
    for (int w = lane; w < n_words; w += 32) n_gone += __popc(gone[w]);
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      n_gone += __shfl_xor_sync(0xffffffffu, n_gone, offset);
    const int length = rows - n_gone;
    if (lane == 0) {
      counts[head_at * 2 + warp] = length;
      lengths[warp] = length;
    }
    if (n_gone > 0) CloseUpChain(gone, rows, length, src_of(warp));
  }
  __syncthreads();
  for (int segment = 0; segment < 2; ++segment) {
    CloseUpMove(kv, segments[segment], states, n_kv_heads, kv_head, head_dim, gone_of(segment),
                lengths[segment], src_of(segment), threadIdx.x, kThreads);
  }
}

constexpr int kRethinThreads = 256;
constexpr int kRethinWarps = kRethinThreads / 32;

__global__ void __launch_bounds__(kRethinThreads)
    RethinAfterEvictionKernel(PagedKv kv, CompressedKv ckv, const int32_t* __restrict__ seqs,
                              const int32_t* __restrict__ rethin, int n_kv_heads, int head_dim,
                              DecodeStates states, int max_rows, int32_t* __restrict__ workspace,
                              int32_t* __restrict__ counts) {
  extern __shared__ uint32_t moving[];  // (max_rows + 31) / 32 words: the recent slots that move
  const int seq = seqs[blockIdx.x], kv_head = blockIdx.y;
  const int code = rethin[seq];
  if (code >= 0) return;
  const int keep = -code - 1;
  const int head_at = seq * n_kv_heads + kv_head;
  const int thin_rows = counts[head_at * 2], rows = counts[head_at * 2 + 1];
  if (rows < 2 * max(keep, 1)) return;
  const int n = rows - keep;
  const int key_width = ckv.key_width[seq];
  const RowsPerPage value_rows(kv.rows_per_page);
  const Segment thin{ckv.thin_key_pages + ckv.thin_indptr[seq],
                     ckv.thin_value_pages + ckv.thin_indptr[seq],
                     thin_rows + n,
                     RowsPerPage(static_cast<int>(kv.page_elements / (n_kv_heads * key_width))),
                     key_width,
                     value_rows};
  const Segment recent{kv.key_pages + kv.page_indptr[seq],
                       kv.value_pages + kv.page_indptr[seq],
                       rows,
                       value_rows,
                       head_dim,
                       value_rows};
  int32_t* positions = workspace + static_cast<int64_t>(blockIdx.x * n_kv_heads + kv_head) * 2 *
                                       max_rows;  // then the moving slots in order
  int32_t* src = positions + max_rows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, words = (rows + 31) / 32;
  for (int slot = threadIdx.x; slot < rows; slot += kRethinThreads) {
    positions[slot] = StateAt(states, recent, n_kv_heads, kv_head, slot)->position;
  }
  __syncthreads();
  // The n lowest positions move (a head's positions are distinct, so these are the ones
  // RethinCompressed's nth_element picks).
  for (int word = warp; word < words; word += kRethinWarps) {
    const int slot = word * 32 + lane;
    bool moves = false;
    if (slot < rows) {
      const int position = positions[slot];
      int lower = 0;
      for (int other = 0; other < rows; ++other) lower += positions[other] < position;
      moves = lower < n;
    }
    const unsigned bits = __ballot_sync(0xffffffffu, moves);
    if (lane == 0) moving[word] = bits;
  }
  __syncthreads();
  // The i-th moving slot from the highest down becomes thin row thin_rows + i: positions[i].
  int32_t* order = positions;
  for (int slot = threadIdx.x; slot < rows; slot += kRethinThreads) {
    const int word = slot / 32, bit = slot % 32;
    if (!(moving[word] >> bit & 1u)) continue;
    int above = bit == 31 ? 0 : __popc(moving[word] >> (bit + 1));
    for (int w = word + 1; w < words; ++w) above += __popc(moving[w]);
    order[above] = slot;
  }
  __syncthreads();
  __nv_bfloat16* pool = kv.pool;
  const uint16_t* channels = ckv.channels + ckv.channel_offset[seq] + kv_head * key_width;
  for (int e = threadIdx.x; e < n * key_width; e += kRethinThreads) {
    const int i = e / key_width, c = e % key_width;
    pool[KeyAt(kv, thin, n_kv_heads, kv_head, thin_rows + i) + c] =
        pool[KeyAt(kv, recent, n_kv_heads, kv_head, order[i]) +
             (key_width < head_dim ? channels[c] : c)];
  }
  const int pieces = head_dim / 8;  // 16-byte pieces of a value row
  for (int e = threadIdx.x; e < n * pieces; e += kRethinThreads) {
    const int i = e / pieces, piece = e % pieces;
    *reinterpret_cast<uint4*>(pool + ValueAt(kv, thin, head_dim, kv_head, thin_rows + i) +
                              8 * piece) =
        *reinterpret_cast<const uint4*>(pool + ValueAt(kv, recent, head_dim, kv_head, order[i]) +
                                        8 * piece);
  }
  for (int i = threadIdx.x; i < n; i += kRethinThreads) {
    *StateAt(states, thin, n_kv_heads, kv_head, thin_rows + i) =
        *StateAt(states, recent, n_kv_heads, kv_head, order[i]);
  }
  if (warp == 0) CloseUpChain(moving, rows, keep, src);
  __syncthreads();  // the moved rows are read before the recent segment closes up over them
  CloseUpMove(kv, recent, states, n_kv_heads, kv_head, head_dim, moving, keep, src, threadIdx.x,
              kRethinThreads);
  if (threadIdx.x == 0) {
    counts[head_at * 2] = thin_rows + n;
    counts[head_at * 2 + 1] = keep;
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
  states.states[DecodeStateIndex(page, slot % states.rows_per_page, kv_head, n_kv_heads,
                                 states.rows_per_page)] =
      prompt_states != nullptr ? prompt_states[static_cast<int64_t>(kv_head) * n + token]
                               : KeyState{token, -1, 0.0f};
}

// Lets `kernel` take `shared` bytes of dynamic shared memory: past 16 KB it is set once for the
// most asked for so far (`opted`, one per kernel).
template <class Kernel>
cudaError_t AllowSharedMemory(Kernel kernel, size_t shared, std::atomic<size_t>& opted) {
  if (shared <= 16 * 1024 || shared <= opted.load()) return cudaSuccess;
  const cudaError_t error = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
  if (error == cudaSuccess) opted.store(shared);
  return error;
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
      kv.rows_per_page < 1 || states.states == nullptr ||
      states.rows_per_page != kv.rows_per_page || workspace == nullptr || counts == nullptr ||
      params == nullptr || seqs == nullptr || reinterpret_cast<uintptr_t>(kv.pool) % 16 != 0 ||
      kv.page_elements % 8 != 0 || kv.row_elements % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  // The evicted-slot words of both segments, in dynamic shared memory.
  const size_t shared = static_cast<size_t>(2 * ((max_rows + 31) / 32)) * sizeof(uint32_t);
  static std::atomic<size_t> opted{0};
  if (const cudaError_t error = AllowSharedMemory(DecodeEvictionKernel, shared, opted);
      error != cudaSuccess) {
    return error;
  }
  DecodeEvictionKernel<<<dim3(n_seqs, shape.n_kv_heads), kThreads, shared, stream>>>(
      kv, ckv, token_indptr, positions, seqs, params, q, q_stride, shape.n_kv_heads, group,
      shape.head_dim, states, n_seqs, max_rows, workspace, counts);
  return LaunchError();
}

cudaError_t LaunchRethinAfterEviction(const PagedKv& kv, const CompressedKv& ckv,
                                      const int32_t* seqs, int n_seqs, const int32_t* rethin,
                                      const AttentionShape& shape, const DecodeStates& states,
                                      int max_rows, int32_t* workspace, int32_t* counts,
                                      cudaStream_t stream) {
  if (n_seqs == 0) return cudaSuccess;
  if (shape.n_kv_heads <= 0 || shape.head_dim < 16 || shape.head_dim > kMaxHeadDim ||
      shape.head_dim % 8 != 0 || max_rows < 1 || states.states == nullptr ||
      states.rows_per_page != kv.rows_per_page || workspace == nullptr || counts == nullptr ||
      rethin == nullptr || seqs == nullptr || reinterpret_cast<uintptr_t>(kv.pool) % 16 != 0 ||
      kv.page_elements % 8 != 0 || kv.row_elements % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  const size_t shared = static_cast<size_t>((max_rows + 31) / 32) * sizeof(uint32_t);
  static std::atomic<size_t> opted{0};
  if (const cudaError_t error = AllowSharedMemory(RethinAfterEvictionKernel, shared, opted);
      error != cudaSuccess) {
    return error;
  }
  RethinAfterEvictionKernel<<<dim3(n_seqs, shape.n_kv_heads), kRethinThreads, shared, stream>>>(
      kv, ckv, seqs, rethin, shape.n_kv_heads, shape.head_dim, states, max_rows, workspace, counts);
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
