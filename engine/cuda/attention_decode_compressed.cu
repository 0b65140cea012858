// Paged decode attention over compressed sequences on the tensor cores: one query per sequence,
// each kv-head reading its thin rows (keys on its kept channels, values at full width) and then
// its full-width recent rows, straight from the pages.
//
// One block per (sequence, kv-head [, group chunk], split) serves up to 16 query heads of the
// GQA group, so each row is read once for the group; 4 warps, or 6 where a launch's blocks are
// few (TakesWideBlocks, decode_splits.h). The group's queries are the 16 rows of an mma.sync
// m16n8k16 tile (heads past the group are zero rows), so a tile of T key rows costs
// (key width / 16) x (T / 8) products for the scores and (T / 16) x (head_dim / 8) for the
// values, with no per-row shuffles: the kernel's arithmetic is far below its bytes.
//  - The block's rows are one stream of tiles of T = 16 rows (32 when head_dim <= 32): the thin
//    segment's, then the recent one's; tile i goes to warp i % warps, which copies it into its own
//    cp.async pipeline in shared memory (2 to 4 tiles, Geometry) while it adds earlier ones. The
//    first tiles are asked for before the query tiles are filled. 2 to 4 blocks fit a
//    multiprocessor; CompressedDecodeAttentionSplits weighs the waves of them that each split
//    count makes (ChooseDecodeSplits, decode_splits.h). On an H200 this reads an uncompressed
//    Llama-3-8B batch at 96-98% of the device-to-device copy rate
//    (tests/bench/cuda_decode_attention_bench.cu).
//  - Scores S = Q Kᵀ (fp32, bf16 inputs) come out of the products in the register layout the
//    value product takes as its left operand, so the probabilities P (rounded to bf16) never
//    leave the registers; online softmax in the log2 domain, one rescale per tile.
//  - The thin segment: a thin key row of the kv-head is key_width contiguous bf16 at
//    kv_head * key_width in a row of n_kv_heads * key_width; its tile is key_width rounded up to
//    16 columns wide (zero past key_width), and its query tile is gathered to match: column i
//    holds q[channels[i]]. Keys whose width is not a multiple of 8 are read element by element.
//  - The recent segment: full-width rows against the whole query.
//  - split-K: a kv-head's rows are thin_rows[s, h] + recent_rows[s, h] (heads of one sequence may
//    hold different counts); split z covers a contiguous part of that concatenation and writes
//    the uncompressed kernel's (acc, m, l) records, merged by its MergeSplitsKernel.
// The block's warps' states are merged through shared memory at the end (WriteMerged).
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "engine/cuda/attention_decode_common.cuh"
#include "engine/cuda/attention_decode_compressed.h"
#include "engine/cuda/check.h"
#include "engine/cuda/decode_splits.h"
#include "engine/cuda/dependent_launch.cuh"
#include "engine/cuda/tensor_core.cuh"

namespace kvtrim::engine::cuda {
namespace {

using decode_attention::kLog2e;
using decode_attention::WriteMerged;

constexpr int kHeadRows = 16;  // query heads per block: the mma tile's rows

// A block's shared memory for head dimension D: two query tiles (gathered for the thin
// segment, whole for the recent one), then each warp's pipeline of K and V tiles; at the end the
// warps' states for the merge, over the tiles.
//
// A tile row is D bf16 in 16-byte pieces. From D = 64 up piece c of row r is stored at c ^ (r % 8)
// (rows then start on the same bank, and the swizzle spreads the 8 rows an ldmatrix reads over
// all banks); below, rows are padded by 16 bytes instead, which does the same.
//
// kWarps: the block's warps, 4 by default. A launch whose blocks all fit the GPU at once with
// more warps to a block can take 6 (Launch): at batch 32 a compressed Llama-3-8B launch has 256
// blocks, two to a multiprocessor, 8 warps where 12 would fit.
template <int kHeadDim, int kWarps = decode_attention::kWarps>
struct Geometry {
  static constexpr int kTileRows = kHeadDim >= 64 ? 16 : 32;
  // Tiles in each warp's pipeline: 2 at D >= 128, where a third would leave room for two
  // blocks per multiprocessor instead of three (an H200 read an uncompressed Llama-3-8B batch in
  // 0.358 against 0.281 ms with three); 4 at D = 64, still three blocks (SmolLM2's batch in 0.067
  // against 0.073 ms with three stages); 3 below.
  static constexpr int kStages = kHeadDim >= 128 ? 2 : kHeadDim == 64 ? 4 : 3;
  static constexpr bool kSwizzled = kHeadDim >= 64;
  static constexpr int kStride = kSwizzled ? kHeadDim : kHeadDim + 8;  // bf16 per row
  static constexpr int kTileElements = kTileRows * kStride;
  static constexpr int kQueryElements = kHeadRows * kStride;
  static constexpr int kWarpElements = kStages * 2 * kTileElements;  // K and V per stage
  static constexpr size_t kTileBytes = sizeof(__nv_bfloat16) * kWarps * kWarpElements;
  static constexpr size_t kBytes = sizeof(__nv_bfloat16) * 2 * kQueryElements + kTileBytes;
  struct Merge {
    float acc[kWarps][kHeadRows][kHeadDim];
    float m[kWarps][kHeadRows];
    float l[kWarps][kHeadRows];
  };
  static_assert(sizeof(Merge) <= kTileBytes);
  static_assert(kHeadDim % 16 == 0 && kTileRows % 16 == 0);

  // Where piece `piece` (8 bf16) of `row` starts in a tile.
  static __device__ __forceinline__ int At(int row, int piece) {
    return row * kStride + (kSwizzled ? piece ^ (row % 8) : piece) * 8;
  }
};

// This thread's `count` (<= 8) key elements at `key`, zero-padded to 8, read element by element.
__device__ __forceinline__ uint4 LoadKeyElements(const __nv_bfloat16* key, int count) {
  if (count <= 0) return make_uint4(0, 0, 0, 0);
  const uint16_t* elements = reinterpret_cast<const uint16_t*>(key);
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t low = 2 * i < count ? elements[2 * i] : 0u;
    const uint32_t high = 2 * i + 1 < count ? elements[2 * i + 1] : 0u;
    words[i] = low | high << 16;
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

template <int kTileRows>
struct TilePages;  // below RowList

// One list of rows in the pages (a sequence's keys or values of one segment) as one kv-head
// reads it: `width` elements at `offset` in rows of `row_elements`, `rows_per_page` to a page.
struct RowList {
  const int32_t* pages;  // the sequence's first page of the list
  int row_elements;
  int rows_per_page;
  int offset;           // kv_head * width
  int width;            // elements of the kv-head's piece of a row
  uint32_t page_magic;  // ceil(2^32 / rows_per_page), 0 for one row per page (PageMagic)

  // The page a row is on, by a multiply: exact for row * rows_per_page < 2^32.
  __device__ __forceinline__ int PageOf(int row) const {
    return page_magic == 0 ? row : static_cast<int>(__umulhi(row, page_magic));
  }

  // Starts copying rows [first, first + kTileRows) (those below `end`; the rest, and columns
  // from width up to `columns`, zero) into `tile` (laid out as Tile::At says), with the rows'
  // page ids from `ids` (this list is list kList of the two it holds). Each row is split into
  // 16-byte pieces over kLanesPerRow adjacent lanes (those past `columns` idle). Every lane of
  // the warp calls it.
  template <int kLanesPerRow, class Tile, int kList>
  __device__ __forceinline__ void Fetch(const __nv_bfloat16* pool, int64_t page_elements, int first,
                                        int end, int columns, bool vector,
                                        const TilePages<Tile::kTileRows>& ids,
                                        __nv_bfloat16* tile) const {
    constexpr int kRowsPerPass = 32 / kLanesPerRow;
    constexpr int kPasses = Tile::kTileRows / kRowsPerPass;
    const int lane = threadIdx.x % 32, piece = lane % kLanesPerRow, first_row = lane / kLanesPerRow;
    // The lane's pieces in the pool (null past `end`). Where the tile's rows lie on one page (the
    // common case: a page holds a multiple of 16 rows and tiles start on a multiple of 16) they
    // are a base and a stride; otherwise each row has its own page id.
    const __nv_bfloat16* from[kPasses];
    const int in_row = offset + piece * 8;
    const int first_page = PageOf(first);
    if (first_page == PageOf(min(first + Tile::kTileRows, end) - 1)) {  // the same on every lane
      const __nv_bfloat16* base =
          pool + ids.template Get<kList>(0) * page_elements +
          ((first - first_page * rows_per_page + first_row) * row_elements + in_row);
      if (first + Tile::kTileRows <= end && vector && columns == width) {
        // Every row there, every piece a whole 16-byte copy (most tiles): no per-row checks.
        if (piece * 8 >= columns) return;
#pragma unroll
        for (int i = 0; i < kPasses; ++i) {
          CopyAsync(reinterpret_cast<uint4*>(tile + Tile::At(first_row + i * kRowsPerPass, piece)),
                    base + i * kRowsPerPass * row_elements, true);
        }
        return;
      }
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int row = first + first_row + i * kRowsPerPass;
        from[i] = row < end ? base + i * kRowsPerPass * row_elements : nullptr;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPasses; ++i) {
        const int row = first + first_row + i * kRowsPerPass;
        const int page_id = ids.template Get<kList>(first_row + i * kRowsPerPass);
        from[i] = row < end ? pool + page_id * page_elements +
                                  ((row - PageOf(row) * rows_per_page) * row_elements + in_row)
                            : nullptr;
      }
    }
    if (piece * 8 >= columns) return;
    const int count = width - piece * 8;  // elements of this piece in the row (<= 0: none)
#pragma unroll
    for (int i = 0; i < kPasses; ++i) {
      uint4* to = reinterpret_cast<uint4*>(tile + Tile::At(first_row + i * kRowsPerPass, piece));
      if (vector || from[i] == nullptr) {
        // Zeros past `end` (masked rows still enter the products) and past the key width.
        const bool copy = from[i] != nullptr && count > 0;
        CopyAsync(to, copy ? from[i] : pool, copy);
      } else {
        *to = LoadKeyElements(from[i], count);
      }
    }
  }
};

// The page ids of a tile's rows in its two lists (keys, values), one or two per lane: slot
// s = lane + 32 j of the warp holds the id of row s % kTileRows of list s / kTileRows. They are
// loaded a tile ahead of the copies that use them (AddTiles), so that a copy never waits on its
// page id, and reach the lanes that copy those rows by shuffles.
template <int kTileRows>
struct TilePages {
  static constexpr int kPerLane = 2 * kTileRows / 32;
  int id[kPerLane];

  // Loads the ids of rows [first, first + kTileRows) of `keys` and `values` (0 from `end` on).
  __device__ __forceinline__ void Load(const RowList& keys, const RowList& values, int first,
                                       int end) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int slot = lane + 32 * j, row = first + slot % kTileRows;
      // Field by field: a reference to either list would move both to local memory.
      const bool key = slot < kTileRows;
      const uint32_t magic = key ? keys.page_magic : values.page_magic;
      const int page = magic == 0 ? row : static_cast<int>(__umulhi(row, magic));
      id[j] = row < end ? (key ? keys.pages : values.pages)[page] : 0;
    }
  }

  // The id of row `row` (of the tile) in list kList; every lane of the warp calls it.
  template <int kList>
  __device__ __forceinline__ int Get(int row) const {
    const int slot = kList * kTileRows + row;
    static_assert(kList * kTileRows % 32 + kTileRows <= 32);  // slot / 32 is kList's alone
    return __shfl_sync(0xffffffffu, id[kList * kTileRows / 32], slot % 32);
  }
};

// RowList::page_magic for `rows_per_page` (>= 1).
__device__ __forceinline__ uint32_t PageMagic(int rows_per_page) {
  return rows_per_page == 1 ? 0u : 0xffffffffu / static_cast<uint32_t>(rows_per_page) + 1u;
}

// A warp's online-softmax state: per thread, query heads g = lane / 4 and g + 8, the output
// columns 8 n + 2 (lane % 4) and + 1 of each n-tile (the mma accumulator layout); m and l in
// the log2 domain, l this thread's part of the row sum.
template <int kHeadDim>
struct WarpState {
  float o[kHeadDim / 8][4];
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  __device__ __forceinline__ WarpState() {
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  }
};

// Adds one tile (rows first .. first + kTileRows, those below `end`) from `keys` / `values`
// (shared, Geometry::At) against `query` (a query tile, `key_steps` x 16 columns); `upper`:
// the block has query heads in rows 8-15.
template <int kHeadDim>
__device__ __forceinline__ void AddTile(const __nv_bfloat16* query, const __nv_bfloat16* keys,
                                        const __nv_bfloat16* values, int key_steps, int first,
                                        int end, float scale_log2, bool upper,
                                        WarpState<kHeadDim>& state) {
  using G = Geometry<kHeadDim>;
  constexpr int kRows = G::kTileRows;
  const int lane = threadIdx.x % 32, quad = lane % 4;
  // S (16 heads x kRows rows) = Q Kᵀ, kRows / 8 n-tiles.
  float s[kRows / 8][4] = {};
#pragma unroll
  for (int k = 0; k < kHeadDim / 16; ++k) {
    if (k >= key_steps) break;
    uint32_t a[4];
    LoadMatrices(a, query + G::At((lane / 8) % 2 * 8 + lane % 8, k * 2 + lane / 16));
#pragma unroll
    for (int n = 0; n < kRows / 8; n += 2) {
      uint32_t b[4];  // n-tiles n and n + 1, both halves of the 16 columns
      LoadMatrices(b, keys + G::At((n + lane / 16) * 8 + lane % 8, k * 2 + (lane / 8) % 2));
      Mma(s[n], a, b[0], b[1]);
      Mma(s[n + 1], a, b[2], b[3]);
    }
  }
  // Online softmax over the tile, rows past `end` masked (only the segment's last tile has any).
  // Query rows 8-15 (the thread's second row, h = 1) only where the block has more than 8 heads
  // (`upper`): otherwise their P is zero and their O, never written, is left as it is.
  const bool partial = first + kRows > end;
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int n = 0; n < kRows / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[n][e] *= scale_log2;
      if (partial && first + n * 8 + 2 * quad + e % 2 >= end) s[n][e] = -INFINITY;
      tile_max[e / 2] = fmaxf(tile_max[e / 2], s[n][e]);
    }
  }
  float correction[2] = {1.0f, 1.0f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (h == 1 && !upper) break;
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
    // The tile has a valid row, so the new maximum is finite.
    const float m_new = fmaxf(state.m[h], tile_max[h]);
    correction[h] = Exp2(state.m[h] - m_new);
    state.m[h] = m_new;
    state.l[h] *= correction[h];
  }
#pragma unroll
  for (int n = 0; n < kRows / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (e < 2 || upper) {
        s[n][e] = Exp2(s[n][e] - state.m[e / 2]);
        state.l[e / 2] += s[n][e];
      } else {
        s[n][e] = 0.0f;
      }
    }
  }
  // O rescaled only when a row's maximum moved (past the first tiles, rarely).
  if (__any_sync(0xffffffffu, correction[0] != 1.0f || correction[1] != 1.0f)) {
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      state.o[n][0] *= correction[0];
      state.o[n][1] *= correction[0];
      state.o[n][2] *= correction[1];
      state.o[n][3] *= correction[1];
    }
  }
  // O += P V: P's 16-row steps are pairs of score n-tiles, already in the left operand's layout.
  // P is rounded to bf16 for the product (l sums it in fp32), as flash attention does: on
  // SmolLM2 the logits stay within 1e-2 of the CPU engine's (cuda_forward_test), and carrying
  // P's rounding error as a second product (hi + lo) cost 3.5% and changed nothing measurable.
#pragma unroll
  for (int k = 0; k < kRows / 16; ++k) {
    const uint32_t a[4] = {PackBf16(s[2 * k][0], s[2 * k][1]), PackBf16(s[2 * k][2], s[2 * k][3]),
                           PackBf16(s[2 * k + 1][0], s[2 * k + 1][1]),
                           PackBf16(s[2 * k + 1][2], s[2 * k + 1][3])};
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; n += 2) {
      uint32_t b[4];  // rows 0-7 and 8-15 of the step, columns of n-tiles n and n + 1
      LoadMatricesTransposed(b,
                             values + G::At(k * 16 + (lane / 8) % 2 * 8 + lane % 8, n + lane / 16));
      Mma(state.o[n], a, b[0], b[1]);
      Mma(state.o[n + 1], a, b[2], b[3]);
    }
  }
}

// One segment of a kv-head's rows in this split: rows [begin, end) of its lists, keys
// `key_columns` wide in the tile (16-byte copies when vector_keys), scored against `query`.
struct Segment {
  RowList keys, values;
  int key_columns;
  bool vector_keys;
  int begin, end;
  const __nv_bfloat16* query;

  __device__ __forceinline__ int Tiles(int tile_rows) const {
    return begin < end ? (end - begin + tile_rows - 1) / tile_rows : 0;
  }
};

// Adds the tiles of `thin` then of `recent` to this warp's state: tile i of the two goes to warp
// i % kWarps, through the warp's pipeline. A tile's page ids are loaded one tile before its
// copies start, so that they arrive while the warp waits for and adds earlier tiles. Copies
// start before the query tiles are filled: the block fills them and waits for one another
// (`fill_queries`) once the first tiles are asked for.
template <int kHeadDim, int kWarps, class FillQueries>
__device__ __forceinline__ void AddTiles(const PagedKv& kv, const Segment& thin,
                                         const Segment& recent, __nv_bfloat16* pipeline,
                                         float scale_log2, bool upper,
                                         const FillQueries& fill_queries,
                                         WarpState<kHeadDim>& state) {
  using G = Geometry<kHeadDim, kWarps>;
  const int warp = threadIdx.x / 32;
  const int thin_tiles = thin.Tiles(G::kTileRows);
  const int tiles = thin_tiles + recent.Tiles(G::kTileRows);
  const int mine = tiles > warp ? (tiles - warp + kWarps - 1) / kWarps : 0;
  // Calls f(segment, first row) for this warp's tile i (i < mine): tile warp + i * kWarps of the
  // thin segment's, then the recent one's. (Two calls, not a reference to either segment: that
  // would move them to local memory.)
  const auto with_tile = [&](int i, const auto& f) {
    const int tile = warp + i * kWarps;
    if (tile < thin_tiles) {
      f(thin, thin.begin + tile * G::kTileRows);
    } else {
      f(recent, recent.begin + (tile - thin_tiles) * G::kTileRows);
    }
  };
  TilePages<G::kTileRows> ids;  // of the next tile to fetch
  const auto load_ids = [&](int i) {
    if (i < mine) {
      with_tile(i, [&](const Segment& segment, int first) {
        ids.Load(segment.keys, segment.values, first, segment.end);
      });
    }
  };
  // Starts tile i's copies, with its ids in `ids`.
  const auto fetch = [&](int i) {
    if (i < mine) {
      with_tile(i, [&](const Segment& segment, int first) {
        constexpr int kLanes = kHeadDim / 8;
        __nv_bfloat16* stage = pipeline + (i % G::kStages) * 2 * G::kTileElements;
        // Keys at most half as wide (ThinK's usual cut) take half the lanes per row, twice the
        // rows per pass: no lane idles.
        static_assert(kLanes >= 2);  // head_dim >= 16
        if (segment.key_columns <= kHeadDim / 2) {
          segment.keys.template Fetch<kLanes / 2, G, 0>(kv.pool, kv.page_elements, first,
                                                        segment.end, segment.key_columns,
                                                        segment.vector_keys, ids, stage);
        } else {
          segment.keys.template Fetch<kLanes, G, 0>(kv.pool, kv.page_elements, first, segment.end,
                                                    segment.key_columns, segment.vector_keys, ids,
                                                    stage);
        }
        segment.values.template Fetch<kLanes, G, 1>(kv.pool, kv.page_elements, first, segment.end,
                                                    kHeadDim, true, ids, stage + G::kTileElements);
      });
    }
    CommitCopies();  // an empty group past the end keeps the count the wait relies on
  };
#pragma unroll
  for (int i = 0; i < G::kStages - 1; ++i) {
    load_ids(i);
    fetch(i);
  }
  load_ids(G::kStages - 1);
  fill_queries();  // block-wide: every warp gets here
  for (int i = 0; i < mine; ++i) {
    __syncwarp();  // every lane is done with tile i - 1, whose stage tile i + kStages - 1 takes
    fetch(i + G::kStages - 1);  // so that kStages - 1 tiles are in flight while i is added
    load_ids(i + G::kStages);
    WaitCopies<G::kStages - 1>();  // tile i has landed (this lane's pieces)
    __syncwarp();                  // ... and every lane's
    const __nv_bfloat16* stage = pipeline + (i % G::kStages) * 2 * G::kTileElements;
    with_tile(i, [&](const Segment& segment, int first) {
      AddTile<kHeadDim>(segment.query, stage, stage + G::kTileElements, segment.key_columns / 16,
                        first, segment.end, scale_log2, upper, state);
    });
  }
  WaitCopies<0>();
}

// Fills the block's query tiles (16 rows each): row g < n_heads of `full` is query head
// first_head + g of `token` (q: rows of q_stride), and of `thin` (when `thin_columns` > 0, that
// wide) the same head at channels[i] in column i (at channel i when `channels` is null) for i <
// `width`; zero elsewhere. Thread t of the kThreads fills column t (and t + kThreads) of every
// row of both: it reads the column's channel once and then the heads' values, all loads issued
// before any store.
template <int kHeadDim, int kThreads>
__device__ __forceinline__ void FillQueries(const __nv_bfloat16* __restrict__ q, int token,
                                            int q_stride, int first_head, int n_heads,
                                            const uint16_t* channels, int width, int thin_columns,
                                            bool full_wanted, __nv_bfloat16* thin,
                                            __nv_bfloat16* full) {
  using G = Geometry<kHeadDim>;
  const __nv_bfloat16* heads = q + static_cast<int64_t>(token) * q_stride + first_head * kHeadDim;
  const __nv_bfloat16 zero = __float2bfloat16(0.0f);
#pragma unroll
  for (int i = threadIdx.x; i < kHeadDim; i += kThreads) {
    const bool in_thin = i < thin_columns;
    const int channel = in_thin && i < width ? (channels != nullptr ? channels[i] : i) : -1;
    __nv_bfloat16 thin_values[kHeadRows], full_values[kHeadRows];
#pragma unroll
    for (int g = 0; g < kHeadRows; ++g) {
      full_values[g] = full_wanted && g < n_heads ? heads[g * kHeadDim + i] : zero;
      thin_values[g] = channel >= 0 && g < n_heads ? heads[g * kHeadDim + channel] : zero;
    }
#pragma unroll
    for (int g = 0; g < kHeadRows; ++g) {
      if (full_wanted) full[G::At(g, i / 8) + i % 8] = full_values[g];
      if (in_thin) thin[G::At(g, i / 8) + i % 8] = thin_values[g];
    }
  }
}

template <int kHeadDim, int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    CompressedDecodeAttentionKernel(PagedKv kv, CompressedKv ckv,
                                    const int32_t* __restrict__ token_indptr,
                                    const int32_t* __restrict__ seqs,
                                    const __nv_bfloat16* __restrict__ q, int q_stride, int n_heads,
                                    int n_kv_heads, int group, int heads_per_block, int chunks,
                                    float scale_log2, int splits, __nv_bfloat16* __restrict__ out,
                                    float* __restrict__ workspace) {
  using G = Geometry<kHeadDim, kWarps>;
  extern __shared__ __align__(128) unsigned char shared[];
  __nv_bfloat16* thin_query = reinterpret_cast<__nv_bfloat16*>(shared);
  __nv_bfloat16* full_query = thin_query + G::kQueryElements;
  __nv_bfloat16* tiles = full_query + G::kQueryElements;
  __nv_bfloat16* pipeline = tiles + (threadIdx.x / 32) * G::kWarpElements;

  const int kv_head = blockIdx.y / chunks, chunk = blockIdx.y % chunks;
  const int first_head = kv_head * group + chunk * heads_per_block;
  const int block_heads = min(heads_per_block, group - chunk * heads_per_block);
  // The sequence's metadata (every array has an entry for every sequence, compressed or not).
  const int seq = seqs[blockIdx.x];
  const int token = token_indptr[seq];
  const int thin_rows = ckv.thin_rows[seq * n_kv_heads + kv_head];
  const int recent_rows = ckv.recent_rows[seq * n_kv_heads + kv_head];
  const int key_width = ckv.key_width[seq];
  const int first_thin_page = ckv.thin_indptr[seq];
  const int first_recent_page = kv.page_indptr[seq];
  // Read with the rest rather than when the queries are filled (a null array: no thin keys).
  const int channel_offset =
      ckv.channel_offset != nullptr ? ckv.channel_offset[seq] + kv_head * key_width : 0;

  // This split's part of the kv-head's rows: thin rows [0, thin_rows), then recent rows.
  const int rows = thin_rows + recent_rows;
  // Whole tiles, so that the thin segment's tiles start on multiples of the tile's rows (and
  // mostly lie on one page, RowList::Fetch).
  const int per_split =
      ((rows + splits - 1) / splits + G::kTileRows - 1) / G::kTileRows * G::kTileRows;
  const int begin = min(rows, static_cast<int>(blockIdx.z) * per_split);
  const int end = min(rows, begin + per_split);

  const RowList full{.row_elements = kv.row_elements,
                     .rows_per_page = kv.rows_per_page,
                     .offset = kv_head * kHeadDim,
                     .width = kHeadDim,
                     .page_magic = PageMagic(kv.rows_per_page)};
  const int key_row_elements = n_kv_heads * key_width;
  const int key_rows_per_page = static_cast<int>(kv.page_elements / key_row_elements);
  Segment thin{.keys = {.pages = ckv.thin_key_pages + first_thin_page,
                        .row_elements = key_row_elements,
                        .rows_per_page = key_rows_per_page,
                        .offset = kv_head * key_width,
                        .width = key_width,
                        .page_magic = PageMagic(key_rows_per_page)},
               .values = full,
               .key_columns = (key_width + 15) / 16 * 16,
               .vector_keys = key_width % 8 == 0,
               .begin = begin,
               .end = min(end, thin_rows),
               .query = thin_query};
  thin.values.pages = ckv.thin_value_pages + first_thin_page;
  Segment recent{.keys = full,
                 .values = full,
                 .key_columns = kHeadDim,
                 .vector_keys = true,
                 .begin = max(begin, thin_rows) - thin_rows,
                 .end = end - thin_rows,
                 .query = full_query};
  recent.keys.pages = kv.key_pages + first_recent_page;
  recent.values.pages = kv.value_pages + first_recent_page;

  // The exception to dependent_launch.cuh's rule: the plan (uploaded before the step's first
  // kernel) and the thin rows (written in earlier steps) are read before waiting for the kernels
  // before this one, and so are the first tiles when every warp's first tiles are thin ones. The
  // queries and the recent rows, the new one RoPE appends among them, only after.
  const bool thin_first = thin.Tiles(G::kTileRows) >= kWarps * (G::kStages - 1);
  if (!thin_first) WaitForPrerequisites();
  const auto fill_queries = [&] {
    if (thin_first) WaitForPrerequisites();
    FillQueries<kHeadDim, kWarps * 32>(
        q, token, q_stride, first_head, block_heads,
        key_width != kHeadDim ? ckv.channels + channel_offset : nullptr, key_width,
        thin.begin < thin.end ? thin.key_columns : 0, recent.begin < recent.end, thin_query,
        full_query);
    __syncthreads();
  };
  WarpState<kHeadDim> state;
  AddTiles<kHeadDim, kWarps>(kv, thin, recent, pipeline, scale_log2, /*upper=*/block_heads > 8,
                             fill_queries, state);

  // The warps' states to shared memory (over the tiles, which every warp is done with), merged.
  __syncthreads();
  auto& merge = *reinterpret_cast<typename G::Merge*>(tiles);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, quad = lane % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = state.l[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (quad == 0) {
      merge.m[warp][g + 8 * h] = state.m[h];
      merge.l[warp][g + 8 * h] = l;
    }
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      merge.acc[warp][g + 8 * h][n * 8 + 2 * quad] = state.o[n][2 * h];
      merge.acc[warp][g + 8 * h][n * 8 + 2 * quad + 1] = state.o[n][2 * h + 1];
    }
  }
  __syncthreads();
  WriteMerged<kHeadDim, kHeadRows, kWarps>(merge.acc, merge.m, merge.l, first_head, block_heads,
                                           token, n_heads, splits, out, workspace);
}

struct LaunchArgs {
  dim3 grid;
  PagedKv kv;
  CompressedKv ckv;
  const int32_t* token_indptr;
  const int32_t* seqs;
  const __nv_bfloat16* q;
  int q_stride;
  AttentionShape shape;
  int heads_per_block;
  int chunks;
  float scale_log2;
  int splits;
  __nv_bfloat16* out;
  float* workspace;
  cudaStream_t stream;
  int block_warps;
};

// Lets the kernel for kHeadDim and kWarps use its shared memory (above 48 KiB a kernel must opt
// in, once) and returns how many of its blocks fit a multiprocessor (0 on an error).
template <int kHeadDim, int kWarps = decode_attention::kWarps>
int BlocksPerMultiprocessor() {
  static const int blocks = [] {
    constexpr size_t kBytes = Geometry<kHeadDim, kWarps>::kBytes;
    int fit = 0;
    if (cudaFuncSetAttribute(CompressedDecodeAttentionKernel<kHeadDim, kWarps>,
                             cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kBytes)) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &fit, CompressedDecodeAttentionKernel<kHeadDim, kWarps>, kWarps * 32, kBytes) !=
            cudaSuccess) {
      return 0;
    }
    return fit;
  }();
  return blocks;
}

// 6 warps to a block, for the real models' head dimensions: shared memory still takes two such
// blocks to a multiprocessor at D = 64 and 128. (An H200 read a batch-32 compressed Llama-3-8B
// launch in 0.034 ms against 0.036 with 4 warps, and in 0.043 with 12: one block of 12 warps.)
constexpr bool HasWideBlocks(int head_dim) { return head_dim == 64 || head_dim == 128; }
constexpr int kWideWarps = kDecodeWideWarps;
static_assert(decode_attention::kWarps == kDecodeNarrowWarps);

// How the kernel's blocks at `head_dim` fit a GPU of `sms` multiprocessors (decode_splits.h).
DecodeBlockFit FitOf(int head_dim, int sms) {
  DecodeBlockFit fit{.sms = sms};
  switch (head_dim) {
    case 16:
      fit.narrow = BlocksPerMultiprocessor<16>();
      break;
    case 32:
      fit.narrow = BlocksPerMultiprocessor<32>();
      break;
    case 64:
      fit.narrow = BlocksPerMultiprocessor<64>();
      fit.wide = BlocksPerMultiprocessor<64, kWideWarps>();
      break;
    case 128:
      fit.narrow = BlocksPerMultiprocessor<128>();
      fit.wide = BlocksPerMultiprocessor<128, kWideWarps>();
      break;
    default:
      fit.narrow = BlocksPerMultiprocessor<256>();
      break;
  }
  return fit;
}

template <int kHeadDim, int kWarps>
cudaError_t LaunchWarps(const LaunchArgs& a) {
  // No block fits (or the opt-in failed): the launch would fail the same way.
  if (BlocksPerMultiprocessor<kHeadDim, kWarps>() == 0) return cudaErrorLaunchOutOfResources;
  return LaunchDependent(CompressedDecodeAttentionKernel<kHeadDim, kWarps>, a.grid, kWarps * 32,
                         Geometry<kHeadDim, kWarps>::kBytes, a.stream, a.kv, a.ckv, a.token_indptr,
                         a.seqs, a.q, a.q_stride, a.shape.n_heads, a.shape.n_kv_heads,
                         a.shape.n_heads / a.shape.n_kv_heads, a.heads_per_block, a.chunks,
                         a.scale_log2, a.splits, a.out, a.workspace);
}

// The block size `a` asks for; 0: the kernel's choice (TakesWideBlocks, decode_splits.h), else 4.
template <int kHeadDim>
cudaError_t Launch(const LaunchArgs& a) {
  if constexpr (HasWideBlocks(kHeadDim)) {
    bool wide = a.block_warps == kWideWarps;
    if (a.block_warps == 0) {
      int device = 0, sms = 0;
      KVTRIM_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
      KVTRIM_CUDA_RETURN_IF_ERROR(
          cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      wide = TakesWideBlocks(int64_t{a.grid.x} * a.grid.y * a.grid.z, FitOf(kHeadDim, sms));
    }
    if (wide) return LaunchWarps<kHeadDim, kWideWarps>(a);
  }
  return LaunchWarps<kHeadDim, decode_attention::kWarps>(a);
}

// The group in near-equal chunks of at most 16 query heads.
int GroupChunks(const AttentionShape& shape) {
  return (shape.n_heads / shape.n_kv_heads + kHeadRows - 1) / kHeadRows;
}

}  // namespace

int CompressedDecodeAttentionSplits(int n_seqs, int max_rows, const AttentionShape& shape,
                                    int sm_count) {
  if (n_seqs <= 0 || shape.n_kv_heads <= 0 || max_rows <= 0 ||
      !AttentionSupportsHeadDim(shape.head_dim)) {
    return 1;
  }
  return ChooseDecodeSplits(int64_t{n_seqs} * shape.n_kv_heads * GroupChunks(shape), max_rows,
                            FitOf(shape.head_dim, sm_count));
}

cudaError_t LaunchCompressedDecodeAttention(const PagedKv& kv, const CompressedKv& ckv,
                                            const int32_t* token_indptr, const int32_t* seqs,
                                            int n_seqs, const __nv_bfloat16* q, int q_stride,
                                            const AttentionShape& shape, int splits,
                                            float* workspace, __nv_bfloat16* out,
                                            cudaStream_t stream, int block_warps) {
  if (n_seqs < 0 || splits < 1 || shape.n_kv_heads <= 0 || shape.n_heads % shape.n_kv_heads != 0 ||
      shape.window != 0 || !AttentionSupportsHeadDim(shape.head_dim) ||
      q_stride < shape.n_heads * shape.head_dim ||
      kv.row_elements != shape.n_kv_heads * shape.head_dim || kv.rows_per_page <= 0 ||
      ckv.thin_rows == nullptr || ckv.recent_rows == nullptr ||
      (splits > 1 && workspace == nullptr) ||
      (block_warps != 0 && block_warps != decode_attention::kWarps && block_warps != kWideWarps)) {
    return cudaErrorInvalidValue;
  }
  if (n_seqs == 0) return cudaSuccess;
  const int group = shape.n_heads / shape.n_kv_heads;
  const int chunks = GroupChunks(shape);
  const LaunchArgs args{.grid = dim3(n_seqs, shape.n_kv_heads * chunks, splits),
                        .kv = kv,
                        .ckv = ckv,
                        .token_indptr = token_indptr,
                        .seqs = seqs,
                        .q = q,
                        .q_stride = q_stride,
                        .shape = shape,
                        .heads_per_block = (group + chunks - 1) / chunks,
                        .chunks = chunks,
                        .scale_log2 = kLog2e / std::sqrt(static_cast<float>(shape.head_dim)),
                        .splits = splits,
                        .out = out,
                        .workspace = workspace,
                        .stream = stream,
                        .block_warps = block_warps};
  cudaError_t launched = cudaSuccess;
  switch (shape.head_dim) {
    case 16:
      launched = Launch<16>(args);
      break;
    case 32:
      launched = Launch<32>(args);
      break;
    case 64:
      launched = Launch<64>(args);
      break;
    case 128:
      launched = Launch<128>(args);
      break;
    default:
      launched = Launch<256>(args);
      break;
  }
  KVTRIM_CUDA_RETURN_IF_ERROR(launched);
  if (splits == 1) return cudaSuccess;
  return decode_attention::LaunchMergeSplits(token_indptr, seqs, n_seqs, workspace, shape.n_heads,
                                             shape.head_dim, splits, out, stream);
}

}  // namespace kvtrim::engine::cuda
