// KvCache over compressed sequences: ReserveCompressed, per-head rows, EvictRow, TrimPages,
// the byte accounting, and a 10 000-operation stress test of the pool invariants.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <map>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "memory/kv_cache.h"

namespace kvtrim::memory {
namespace {

constexpr KvShape kShape{.n_layers = 3, .n_kv_heads = 2, .head_dim = 8, .element_bytes = 4};

// Segment 0 is the full-width lists (an uncompressed sequence's whole cache, a compressed one's
// recent segment), segment 1 a compressed layer's prompt segment. The tests write a distinct byte
// pattern per (sequence, layer, segment, key/value, kv-head, row id) and keep, per kv-head, the
// row id each slot must hold: the model every EvictRow / TrimPages must follow.

// 3 kv-heads so that "the other heads" are more than one; a 48-byte row, 5 rows per 256-byte page.
constexpr KvShape kHeadsShape{.n_layers = 3, .n_kv_heads = 3, .head_dim = 4, .element_bytes = 4};

std::byte Pattern(int tag, int layer, int segment, int kind, int head, int id, size_t byte) {
  uint64_t x = ((((static_cast<uint64_t>(tag) * 8 + layer) * 2 + segment) * 2 + kind) * 16 + head);
  x = (x << 40) ^ (static_cast<uint64_t>(id) << 16) ^ byte;
  x ^= x >> 33;  // murmur3 finalizer: changing any input changes each byte w.p. 255/256
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return static_cast<std::byte>(x & 0xff);
}

// The decode state the test stores with row `id`: every field tells the rows apart.
compress::CormKeyState StateOf(int id) { return {id, 2 * id + 1, 0.5f * static_cast<float>(id)}; }

// A sequence and what the test wrote to it.
struct ModelSeq {
  SequenceKv kv;
  int tag = 0;
  // (n_layers, 2 segments, n_kv_heads): the row id in each slot, slot order.
  std::vector<std::array<std::vector<std::vector<int32_t>>, 2>> ids;
  // (n_layers, 2 segments): the rows the segment's lists were last reserved or trimmed for; its
  // pages are exactly pages_for(reserved) and rows <= reserved.
  std::vector<std::array<int32_t, 2>> reserved;
  int32_t next_id = 0;  // id of the next appended token
};

ModelSeq NewModel(const KvCache& cache, int tag) {
  const KvShape& s = cache.shape();
  ModelSeq m;
  m.kv = cache.NewSequence();
  m.tag = tag;
  m.ids.resize(s.n_layers);
  for (auto& layer : m.ids) layer.fill(std::vector<std::vector<int32_t>>(s.n_kv_heads));
  m.reserved.assign(s.n_layers, {0, 0});
  return m;
}

int Segments(const SequenceKv& seq) { return seq.is_compressed() ? 2 : 1; }
PageList& List(SequenceKv& seq, int layer, int segment, int kind) {
  if (segment == 1) return kind == 0 ? seq.compressed[layer].keys : seq.compressed[layer].values;
  return kind == 0 ? seq.keys[layer] : seq.values[layer];
}
// Bytes of one kv-head's part of a row: thin keys in the prompt segment, head_dim otherwise.
size_t HeadBytes(const KvCache& cache, const SequenceKv& seq, int layer, int segment, int kind) {
  const KvShape& s = cache.shape();
  const int width = segment == 1 && kind == 0 ? seq.compressed[layer].key_width : s.head_dim;
  return static_cast<size_t>(width) * s.element_bytes;
}

void WriteHeadRow(KvCache& cache, ModelSeq& m, int layer, int segment, int head, int slot, int id) {
  for (int kind = 0; kind < 2; ++kind) {
    const size_t bytes = HeadBytes(cache, m.kv, layer, segment, kind);
    std::byte* dst = cache.Row(List(m.kv, layer, segment, kind), slot) + head * bytes;
    for (size_t b = 0; b < bytes; ++b) dst[b] = Pattern(m.tag, layer, segment, kind, head, id, b);
  }
}

// Per head: rows in use, decode states and every byte of every row in use match the model; each
// list's rows is the most any head uses (at least that between EvictRow and TrimPages).
void CheckModel(KvCache& cache, ModelSeq& m, bool trimmed = true) {
  for (int layer = 0; layer < cache.shape().n_layers; ++layer) {
    for (int segment = 0; segment < Segments(m.kv); ++segment) {
      int32_t most = 0;
      for (int head = 0; head < cache.shape().n_kv_heads; ++head) {
        const std::vector<int32_t>& ids = m.ids[layer][segment][head];
        most = std::max(most, static_cast<int32_t>(ids.size()));
        if (m.kv.is_compressed()) {
          const CompressedLayer& c = m.kv.compressed[layer];
          ASSERT_EQ((segment == 1 ? c.prompt_rows : c.recent_rows)[head], ids.size());
          const auto& states = segment == 1 ? c.prompt_states : c.recent_states;
          for (size_t slot = 0; !states.empty() && slot < ids.size(); ++slot) {
            ASSERT_EQ(states[head].size(), ids.size());
            const compress::CormKeyState want = StateOf(ids[slot]);
            ASSERT_EQ(states[head][slot].position, want.position) << "slot " << slot;
            ASSERT_EQ(states[head][slot].last_important, want.last_important);
            ASSERT_EQ(states[head][slot].recent_attention, want.recent_attention);
          }
        }
        for (size_t slot = 0; slot < ids.size(); ++slot) {
          for (int kind = 0; kind < 2; ++kind) {
            const size_t bytes = HeadBytes(cache, m.kv, layer, segment, kind);
            const std::byte* row = cache.Row(List(m.kv, layer, segment, kind), slot) + head * bytes;
            for (size_t b = 0; b < bytes; ++b) {
              ASSERT_EQ(row[b], Pattern(m.tag, layer, segment, kind, head, ids[slot], b))
                  << "layer " << layer << " segment " << segment << " kind " << kind << " head "
                  << head << " slot " << slot << " byte " << b;
            }
          }
        }
      }
      for (int kind = 0; kind < 2; ++kind) {
        const int32_t rows = List(m.kv, layer, segment, kind).rows;
        ASSERT_TRUE(trimmed ? rows == most : rows >= most)
            << "layer " << layer << " segment " << segment << " rows " << rows << " most " << most;
      }
    }
  }
}

// What prefill does after ReserveCompressed (engine/cpu/compressed.cc CompressPrompt): per head
// the kept tokens 0..kept-1, the first thin_rows in the prompt segment, the rest in the recent
// segment; channel sets for thin keys; one decode state per row when `states`.
void WritePrompt(KvCache& cache, ModelSeq& m, std::span<const compress::LayerPlan> plan,
                 int32_t extra_rows, int32_t prompt_tokens, bool states) {
  const KvShape& s = cache.shape();
  for (int layer = 0; layer < s.n_layers; ++layer) {
    const compress::LayerPlan& p = plan[layer];
    CompressedLayer& c = m.kv.compressed[layer];
    if (p.key_width < s.head_dim && p.thin_rows > 0) {
      c.channels.resize(static_cast<size_t>(s.n_kv_heads) * p.key_width);
      for (size_t i = 0; i < c.channels.size(); ++i) c.channels[i] = i % p.key_width;
    }
    c.prompt_states.assign(states ? s.n_kv_heads : 0, {});
    c.recent_states.assign(states ? s.n_kv_heads : 0, {});
    for (int head = 0; head < s.n_kv_heads; ++head) {
      for (int j = 0; j < p.thin_rows + p.full_rows; ++j) {
        const int segment = j < p.thin_rows ? 1 : 0;
        WriteHeadRow(cache, m, layer, segment, head, segment == 1 ? j : j - p.thin_rows, j);
        m.ids[layer][segment][head].push_back(j);
        if (states) (segment == 1 ? c.prompt_states : c.recent_states)[head].push_back(StateOf(j));
      }
      c.prompt_rows[head] = p.thin_rows;
      c.recent_rows[head] = p.full_rows;
    }
    c.keys.rows = c.values.rows = p.thin_rows;
    m.kv.keys[layer].rows = m.kv.values[layer].rows = p.full_rows;
    m.reserved[layer] = {p.full_rows + extra_rows, p.thin_rows};
  }
  m.kv.tokens = m.next_id = prompt_tokens;
}

// One generated token into the recent segment after Reserve(seq, 1), as StoreCompressed does.
void AppendCompressed(KvCache& cache, ModelSeq& m) {
  const int id = m.next_id++;
  for (int layer = 0; layer < cache.shape().n_layers; ++layer) {
    CompressedLayer& c = m.kv.compressed[layer];
    int32_t most = 0;
    for (int head = 0; head < cache.shape().n_kv_heads; ++head) {
      const int slot = c.recent_rows[head]++;
      WriteHeadRow(cache, m, layer, 0, head, slot, id);
      m.ids[layer][0][head].push_back(id);
      if (!c.recent_states.empty()) c.recent_states[head].push_back(StateOf(id));
      most = std::max(most, c.recent_rows[head]);
    }
    m.kv.keys[layer].rows = m.kv.values[layer].rows = most;
  }
  ++m.kv.tokens;
}

// EvictRow on the cache and on the model.
void Evict(KvCache& cache, ModelSeq& m, int layer, int segment, int head, int slot) {
  cache.EvictRow(m.kv, layer, segment == 1, head, slot);
  std::vector<int32_t>& ids = m.ids[layer][segment][head];
  ids[slot] = ids.back();
  ids.pop_back();
}

// TrimPages on the cache; in the model every list is now reserved for its rows.
void Trim(KvCache& cache, ModelSeq& m) {
  cache.TrimPages(m.kv);
  for (int layer = 0; layer < cache.shape().n_layers; ++layer) {
    for (int segment = 0; segment < 2; ++segment) {
      m.reserved[layer][segment] = 0;
      for (const auto& ids : m.ids[layer][segment]) {
        m.reserved[layer][segment] =
            std::max(m.reserved[layer][segment], static_cast<int32_t>(ids.size()));
      }
    }
  }
}

// kShape, 4 full rows per 256-byte page. Layer 0 thins keys to 3 channels (24-byte rows, 10 per
// page); layer 1 keeps everything full width; layer 2 has no recent rows.
const std::vector<compress::LayerPlan> kPlan = {
    {.kept_tokens = 14, .thin_rows = 11, .full_rows = 3, .key_width = 3},
    {.kept_tokens = 5, .thin_rows = 0, .full_rows = 5, .key_width = 8},
    {.kept_tokens = 8, .thin_rows = 8, .full_rows = 0, .key_width = 8}};
// With 2 extra rows: layer 0: 2 thin key + 3 value pages + 2 x pages_for(5) = 9; layer 1:
// 2 x pages_for(7) = 4; layer 2: 2 + 2 + 2 x pages_for(2) = 6.
constexpr int32_t kPlanPages = 19;

TEST(KvCacheCompressedTest, ReserveCompressedIsAllOrNothingAndTakesPagesFor) {
  PagePool pool = *PagePool::Create(256, kPlanPages - 1);
  KvCache cache = *KvCache::Create(&pool, kShape);
  EXPECT_EQ(cache.PagesFor(kPlan, 2), kPlanPages);
  SequenceKv seq = cache.NewSequence();
  EXPECT_FALSE(cache.ReserveCompressed(seq, kPlan, 2));
  EXPECT_EQ(pool.used_pages(), 0);
  EXPECT_FALSE(seq.is_compressed());

  PagePool exact = *PagePool::Create(256, kPlanPages);
  KvCache fits = *KvCache::Create(&exact, kShape);
  ASSERT_TRUE(fits.ReserveCompressed(seq, kPlan, 2));
  EXPECT_EQ(exact.used_pages(), kPlanPages);
  ASSERT_TRUE(seq.is_compressed());
  const int32_t want[3][4] = {
      {2, 3, 2, 2}, {0, 0, 2, 2}, {2, 2, 1, 1}};  // prompt K, V, recent K, V
  for (int layer = 0; layer < 3; ++layer) {
    EXPECT_EQ(seq.compressed[layer].key_width, kPlan[layer].key_width);
    EXPECT_EQ(seq.compressed[layer].keys.row_bytes, 2 * kPlan[layer].key_width * 4);
    for (int list = 0; list < 4; ++list) {
      EXPECT_EQ(List(seq, layer, list < 2 ? 1 : 0, list % 2).pages.size(), want[layer][list])
          << "layer " << layer << " list " << list;
    }
  }
  fits.Release(seq);
  EXPECT_EQ(exact.used_pages(), 0);
  EXPECT_FALSE(seq.is_compressed());
  EXPECT_EQ(seq.tokens, 0);
}

// Every EvictRow changes exactly the evicted head's key and value bytes of the slot, to what that
// head's last row held; every other byte of every page of the sequence stays as it was.
TEST(KvCacheCompressedTest, EvictRowMovesOnlyTheHeadsLastRow) {
  PagePool pool = *PagePool::Create(256, 64);
  KvCache cache = *KvCache::Create(&pool, kHeadsShape);
  const std::vector<compress::LayerPlan> plan = {{13, 9, 4, 3}, {13, 9, 4, 4}, {13, 9, 4, 1}};
  ModelSeq m = NewModel(cache, 1);
  ASSERT_TRUE(cache.ReserveCompressed(m.kv, plan, 0));
  WritePrompt(cache, m, plan, 0, 13, /*states=*/true);
  ASSERT_NO_FATAL_FAILURE(CheckModel(cache, m));

  // (layer, segment, head, slot): a middle slot, the last slot, slot 0, each segment and layer.
  std::vector<std::array<int, 4>> evictions = {{0, 1, 1, 2}, {0, 1, 1, 7}, {0, 0, 0, 0},
                                               {1, 1, 2, 0}, {2, 0, 2, 3}, {0, 1, 0, 8}};
  std::mt19937 rng(5);
  for (int i = 0; i < 40; ++i) {
    evictions.push_back({static_cast<int>(rng() % 3), static_cast<int>(rng() % 2),
                         static_cast<int>(rng() % 3), -1});
  }
  for (std::array<int, 4> e : evictions) {
    auto& [layer, segment, head, slot] = e;
    const int rows = static_cast<int>(m.ids[layer][segment][head].size());
    if (rows == 0) continue;
    if (slot < 0) slot = static_cast<int>(rng() % rows);
    ASSERT_LT(slot, rows);
    std::map<PageId, std::vector<std::byte>> want;
    for (int l = 0; l < 3; ++l) {
      for (int s = 0; s < 2; ++s) {
        for (int kind = 0; kind < 2; ++kind) {
          for (PageId page : List(m.kv, l, s, kind).pages) {
            want[page].assign(pool.data(page), pool.data(page) + pool.page_bytes());
          }
        }
      }
    }
    for (int kind = 0; kind < 2; ++kind) {
      const PageList& list = List(m.kv, layer, segment, kind);
      const size_t bytes = HeadBytes(cache, m.kv, layer, segment, kind);
      auto at = [&](int row) {
        return want[list.pages[row / list.rows_per_page]].data() +
               static_cast<size_t>(row % list.rows_per_page) * list.row_bytes + head * bytes;
      };
      std::memcpy(at(slot), at(rows - 1), bytes);
    }
    Evict(cache, m, layer, segment, head, slot);
    for (const auto& [page, bytes] : want) {
      ASSERT_EQ(std::memcmp(pool.data(page), bytes.data(), bytes.size()), 0)
          << "page " << page << " after evicting layer " << layer << " segment " << segment
          << " head " << head << " slot " << slot;
    }
    ASSERT_NO_FATAL_FAILURE(CheckModel(cache, m, /*trimmed=*/false));
  }
  cache.Release(m.kv);
  EXPECT_EQ(pool.used_pages(), 0);
}

// Pages of (prompt keys, prompt values, recent keys, recent values) of each layer.
std::vector<std::array<size_t, 4>> PagesPerList(SequenceKv& seq) {
  std::vector<std::array<size_t, 4>> pages;
  for (int layer = 0; layer < static_cast<int>(seq.keys.size()); ++layer) {
    pages.push_back({List(seq, layer, 1, 0).pages.size(), List(seq, layer, 1, 1).pages.size(),
                     seq.keys[layer].pages.size(), seq.values[layer].pages.size()});
  }
  return pages;
}

TEST(KvCacheCompressedTest, TrimPagesFreesPastTheMostRowsAnyHeadUses) {
  PagePool pool = *PagePool::Create(256, 64);
  KvCache cache = *KvCache::Create(&pool, kShape);
  // Thin keys at 4 channels: 32-byte rows, 8 per page. Full rows: 4 per page.
  const std::vector<compress::LayerPlan> plan(3, {13, 10, 3, 4});
  ModelSeq m = NewModel(cache, 2);
  ASSERT_TRUE(cache.ReserveCompressed(m.kv, plan, 5));
  WritePrompt(cache, m, plan, 5, 13, /*states=*/false);
  using Pages = std::vector<std::array<size_t, 4>>;
  EXPECT_EQ(PagesPerList(m.kv), Pages(3, {2, 3, 2, 2}));  // recent: 3 rows + 5 reserved
  EXPECT_EQ(pool.used_pages(), 27);

  // Head 0 of layer 0 drops 3 prompt rows; head 1 still uses 10. Only the recent segments' unused
  // reserved pages go.
  for (int i = 0; i < 3; ++i) Evict(cache, m, 0, 1, 0, 0);
  Trim(cache, m);
  EXPECT_EQ(PagesPerList(m.kv), Pages(3, {2, 3, 1, 1}));
  EXPECT_EQ(pool.used_pages(), 21);
  ASSERT_NO_FATAL_FAILURE(CheckModel(cache, m));

  // Now both heads use 7 prompt rows: 1 thin key page, 2 value pages.
  for (int i = 0; i < 3; ++i) Evict(cache, m, 0, 1, 1, 9 - i);
  Trim(cache, m);
  EXPECT_EQ(m.kv.compressed[0].keys.rows, 7);
  EXPECT_EQ(PagesPerList(m.kv), Pages({{1, 2, 1, 1}, {2, 3, 1, 1}, {2, 3, 1, 1}}));
  EXPECT_EQ(pool.used_pages(), 19);

  // Layer 2's recent segment empties; in layer 1 only head 0's does, head 1 keeps its page.
  for (int head = 0; head < 2; ++head) {
    for (int i = 0; i < 3; ++i) Evict(cache, m, 2, 0, head, 0);
  }
  for (int i = 0; i < 3; ++i) Evict(cache, m, 1, 0, 0, 2 - i);
  Trim(cache, m);
  EXPECT_EQ(m.kv.keys[2].rows, 0);
  EXPECT_EQ(m.kv.keys[1].rows, 3);
  EXPECT_EQ(PagesPerList(m.kv), Pages({{1, 2, 1, 1}, {2, 3, 1, 1}, {2, 3, 0, 0}}));
  EXPECT_EQ(pool.used_pages(), 17);
  ASSERT_NO_FATAL_FAILURE(CheckModel(cache, m));
  cache.Release(m.kv);
  EXPECT_EQ(pool.used_pages(), 0);
}

TEST(KvCacheCompressedTest, BytesAndLayoutOfACompressedSequence) {
  PagePool pool = *PagePool::Create(256, 64);
  KvCache cache = *KvCache::Create(&pool, kShape);
  ModelSeq m = NewModel(cache, 3);
  ASSERT_TRUE(cache.ReserveCompressed(m.kv, kPlan, 2));
  WritePrompt(cache, m, kPlan, 2, 29, /*states=*/true);
  Evict(cache, m, 0, 1, 1, 4);
  Evict(cache, m, 0, 1, 1, 0);
  ASSERT_TRUE(cache.Reserve(m.kv, 1));  // fits the 2 reserved rows: no new page
  AppendCompressed(cache, m);
  ASSERT_EQ(pool.used_pages(), kPlanPages);
  // Rows per head (prompt, recent): layer 0 (11, 4) and (9, 4); layer 1 (0, 6); layer 2 (8, 1).
  const KvBytes bytes = cache.Bytes(m.kv);
  EXPECT_EQ(bytes.full, 30 * 3 * 2 * 64);
  // Prompt rows take (key_width + head_dim) * 4 bytes per head, recent rows 2 * 8 * 4:
  // layer 0: 20 * 44 + 8 * 64; layer 1: 12 * 64; layer 2: 16 * 64 + 2 * 64.
  EXPECT_EQ(bytes.rows, 880 + 512 + 768 + 1024 + 128);
  EXPECT_EQ(bytes.pages, kPlanPages * 256);
  // Layer 0's channel sets (2 heads x 3 channels) and one state per row in use: 28 + 12 + 18.
  EXPECT_EQ(bytes.metadata, 6 * 2 + 58 * static_cast<int64_t>(sizeof(compress::CormKeyState)));
  EXPECT_EQ(bytes.stored, bytes.pages + bytes.metadata);
  EXPECT_DOUBLE_EQ(bytes.saved_ratio(), 1.0 - static_cast<double>(bytes.stored) / bytes.full);
  const KvLayout layout = cache.Layout(m.kv);
  EXPECT_EQ(layout.layer_tokens, (std::vector<int32_t>{15, 6, 9}));
  EXPECT_EQ(layout.key_channels, 3);

  // Trimmed: layer 0 keeps 2 + 3 prompt pages and 1 + 1 recent ones, layer 1 2 + 2, layer 2
  // 2 + 2 + 1 + 1. The payload does not change.
  Trim(cache, m);
  EXPECT_EQ(cache.Bytes(m.kv).pages, 17 * 256);
  EXPECT_EQ(cache.Bytes(m.kv).rows, bytes.rows);
  ASSERT_NO_FATAL_FAILURE(CheckModel(cache, m));
  // The same rows with their decode state kept by the backend (the CUDA backend's device array)
  // instead of the host vectors: the same bytes.
  for (CompressedLayer& c : m.kv.compressed) {
    c.prompt_states.clear();
    c.recent_states.clear();
    c.device_states = true;
  }
  EXPECT_EQ(cache.Bytes(m.kv).metadata, bytes.metadata);
  m.kv.compressed[1].device_states = false;  // layer 1: 6 recent rows per head, 2 heads
  EXPECT_EQ(cache.Bytes(m.kv).metadata,
            bytes.metadata - 12 * static_cast<int64_t>(sizeof(compress::CormKeyState)));
  cache.Release(m.kv);

  // Uncompressed: every layer holds its rows at full width.
  SequenceKv plain = cache.NewSequence();
  ASSERT_TRUE(cache.Reserve(plain, 5));
  for (PageList& list : plain.keys) list.rows = 5;
  for (PageList& list : plain.values) list.rows = 5;
  EXPECT_EQ(cache.Layout(plain).layer_tokens, (std::vector<int32_t>{5, 5, 5}));
  EXPECT_EQ(cache.Layout(plain).key_channels, 8);
  cache.Release(plain);
  EXPECT_EQ(pool.used_pages(), 0);
}

// The pool invariants under 10 000 random operations over many sequences, uncompressed and
// compressed with random plans: new sequences, appends, per-head evictions with trims, releases.
class KvCacheStressTest : public ::testing::Test {
 protected:
  static constexpr int kPages = 400;

  void NewPlain() {
    ModelSeq m = NewModel(cache_, next_tag_++);
    const int32_t extra = 1 + rng_() % 16;
    const int before = pool_.used_pages();
    if (!cache_.Reserve(m.kv, extra)) {
      ++stats_.failed_reserves;
      ASSERT_EQ(pool_.used_pages(), before);
      return;
    }
    for (auto& reserved : m.reserved) reserved[0] = extra;
    live_.push_back(std::move(m));
    AppendPlain(live_.back(), rng_() % (extra + 1));
  }

  void NewCompressed() {
    ModelSeq m = NewModel(cache_, next_tag_++);
    std::vector<compress::LayerPlan> plan(cache_.shape().n_layers);
    int32_t prompt = 0;
    for (compress::LayerPlan& p : plan) {
      p.thin_rows = rng_() % 25;
      p.full_rows = rng_() % 9;
      p.kept_tokens = p.thin_rows + p.full_rows;
      p.key_width = 1 + rng_() % cache_.shape().head_dim;
      prompt = std::max(prompt, p.kept_tokens);
    }
    const int32_t extra = rng_() % 5;
    const int before = pool_.used_pages();
    if (!cache_.ReserveCompressed(m.kv, plan, extra)) {
      ++stats_.failed_reserves;
      ASSERT_EQ(pool_.used_pages(), before);
      ASSERT_FALSE(m.kv.is_compressed());
      return;
    }
    ASSERT_EQ(pool_.used_pages() - before, cache_.PagesFor(plan, extra));
    WritePrompt(cache_, m, plan, extra, prompt + rng_() % 8, rng_() % 2 == 0);
    live_.push_back(std::move(m));
    ++stats_.compressed;
  }

  // Rows written to an uncompressed sequence within its reserved capacity.
  void AppendPlain(ModelSeq& m, int32_t rows) {
    for (int32_t i = 0; i < rows; ++i) {
      const int id = m.next_id++;
      for (int layer = 0; layer < cache_.shape().n_layers; ++layer) {
        for (int head = 0; head < cache_.shape().n_kv_heads; ++head) {
          WriteHeadRow(cache_, m, layer, 0, head, m.kv.keys[layer].rows, id);
          m.ids[layer][0][head].push_back(id);
        }
        ++m.kv.keys[layer].rows;
        ++m.kv.values[layer].rows;
      }
      ++m.kv.tokens;
    }
  }

  // Reserve and write: one token into a compressed sequence's recent segment; into an uncompressed
  // one up to `extra` rows, leaving the rest reserved.
  void Append(ModelSeq& m) {
    const int32_t extra = m.kv.is_compressed() ? 1 : 1 + rng_() % 6;
    const int before = pool_.used_pages();
    if (!cache_.Reserve(m.kv, extra)) {
      ++stats_.failed_reserves;
      ASSERT_EQ(pool_.used_pages(), before);
      return;
    }
    for (int layer = 0; layer < cache_.shape().n_layers; ++layer) {
      m.reserved[layer][0] = std::max(m.reserved[layer][0], m.kv.keys[layer].rows + extra);
    }
    if (m.kv.is_compressed()) {
      AppendCompressed(cache_, m);
    } else {
      AppendPlain(m, rng_() % (extra + 1));
    }
  }

  void EvictSome(ModelSeq& m) {
    for (int i = 1 + rng_() % 8; i > 0; --i) {
      const int layer = rng_() % cache_.shape().n_layers, segment = rng_() % 2;
      const int head = rng_() % cache_.shape().n_kv_heads;
      const int rows = static_cast<int>(m.ids[layer][segment][head].size());
      if (rows == 0) continue;
      Evict(cache_, m, layer, segment, head, rng_() % rows);
      ++stats_.evictions;
    }
    const int before = pool_.used_pages();
    Trim(cache_, m);
    if (pool_.used_pages() < before) ++stats_.trims_that_freed;
  }

  void ReleaseAt(size_t i) {
    int held = 0;
    for (int layer = 0; layer < cache_.shape().n_layers; ++layer) {
      for (int segment = 0; segment < Segments(live_[i].kv); ++segment) {
        held += List(live_[i].kv, layer, segment, 0).pages.size();
        held += List(live_[i].kv, layer, segment, 1).pages.size();
      }
    }
    const int before = pool_.used_pages();
    cache_.Release(live_[i].kv);
    ASSERT_EQ(before - pool_.used_pages(), held);
    ASSERT_FALSE(live_[i].kv.is_compressed());
    for (const auto* lists : {&live_[i].kv.keys, &live_[i].kv.values}) {
      for (const PageList& list : *lists) ASSERT_TRUE(list.pages.empty() && list.rows == 0);
    }
    live_.erase(live_.begin() + i);
  }

  // No page in two lists; every held page allocated; used_pages = pages held by live sequences;
  // each list holds exactly pages_for(reserved) pages, where `reserved` is the most rows asked of
  // it since it was created or last trimmed (so more pages than pages_for(rows) only where
  // Reserve/ReserveCompressed made room not yet written), and rows <= reserved <= capacity; every
  // kv-head's rows fit the list's capacity.
  void CheckPool() {
    std::set<PageId> seen;
    int held = 0;
    for (ModelSeq& m : live_) {
      for (int layer = 0; layer < cache_.shape().n_layers; ++layer) {
        for (int segment = 0; segment < Segments(m.kv); ++segment) {
          for (int kind = 0; kind < 2; ++kind) {
            const PageList& list = List(m.kv, layer, segment, kind);
            const int32_t reserved = m.reserved[layer][segment];
            ASSERT_EQ(list.pages.size(), list.pages_for(reserved))
                << "sequence " << m.tag << " layer " << layer << " segment " << segment;
            ASSERT_LE(list.rows, reserved);
            ASSERT_LE(reserved, list.capacity());
            for (const auto& ids : m.ids[layer][segment]) ASSERT_LE(ids.size(), list.capacity());
            for (PageId page : list.pages) {
              ASSERT_TRUE(seen.insert(page).second) << "page " << page << " in two lists";
              ASSERT_TRUE(pool_.is_allocated(page)) << "page " << page;
              ++held;
            }
          }
        }
      }
    }
    ASSERT_EQ(held, pool_.used_pages());
  }

  PagePool pool_ = *PagePool::Create(256, kPages);
  KvCache cache_ = *KvCache::Create(&pool_, kHeadsShape);
  std::mt19937 rng_{23};
  std::vector<ModelSeq> live_;
  int next_tag_ = 0;
  struct {
    int failed_reserves = 0, compressed = 0, evictions = 0, trims_that_freed = 0;
  } stats_;
};

TEST_F(KvCacheStressTest, RandomOperationsKeepThePoolInvariants) {
  for (int op = 0; op < 10000; ++op) {
    SCOPED_TRACE(::testing::Message() << "operation " << op);
    const int kind = rng_() % 20;
    size_t touched = live_.size();  // none
    if (kind < 2 || live_.empty()) {
      ASSERT_NO_FATAL_FAILURE(NewPlain());
      touched = live_.size() - 1;  // when refused, the last older one: checking it is harmless
    } else if (kind < 5) {
      ASSERT_NO_FATAL_FAILURE(NewCompressed());
      touched = live_.size() - 1;
    } else if (kind < 12) {
      touched = rng_() % live_.size();
      ASSERT_NO_FATAL_FAILURE(Append(live_[touched]));
    } else if (kind < 17) {
      touched = rng_() % live_.size();
      if (live_[touched].kv.is_compressed()) {
        ASSERT_NO_FATAL_FAILURE(EvictSome(live_[touched]));
      }
    } else {
      ASSERT_NO_FATAL_FAILURE(ReleaseAt(rng_() % live_.size()));
      touched = live_.size();
    }
    ASSERT_NO_FATAL_FAILURE(CheckPool());
    if (touched < live_.size()) {
      ASSERT_NO_FATAL_FAILURE(CheckModel(cache_, live_[touched]));
    }
    if (op % 500 == 0) {
      for (ModelSeq& m : live_) ASSERT_NO_FATAL_FAILURE(CheckModel(cache_, m));
    }
  }
  // Every path ran: refusals with a full pool, compressed sequences, evictions that freed pages.
  EXPECT_GT(stats_.failed_reserves, 100);
  EXPECT_GT(stats_.compressed, 300);
  EXPECT_GT(stats_.evictions, 2000);
  EXPECT_GT(stats_.trims_that_freed, 100);
  for (ModelSeq& m : live_) ASSERT_NO_FATAL_FAILURE(CheckModel(cache_, m));
  while (!live_.empty()) ASSERT_NO_FATAL_FAILURE(ReleaseAt(live_.size() - 1));
  EXPECT_EQ(pool_.used_pages(), 0);
}
}  // namespace
}  // namespace kvtrim::memory
