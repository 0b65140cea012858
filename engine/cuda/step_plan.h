// The host half of a CUDA forward step: what every sequence of the step reads and writes, as
// int32 arrays packed back to back in one vector so that a single copy uploads them all. Built
// before any device work is queued; the device run (CudaBackend::Forward) only reads it. Plain
// host code, no CUDA.
//
// Compressed sequences (SequenceStep::compression) add two kinds of work:
//  - a compressed prompt is fed whole; its K/V rows are not written to pages but attended in the
//    step's scratch (the packed q|k|v rows, seen as pages of a kv-head row's width: with
//    `group` query heads per kv-head a row is group + 2 of them, so the keys of token row t are
//    page t (group + 2) + group and its values the next), then each layer's prompt compression
//    writes only the kept rows (PromptJob);
//  - a compressed decode reads a thin segment and a recent segment per layer (CompressedKv): the
//    plan carries, for every sequence of the step, the thin page lists, the per-kv-head row
//    counts, the key width and the channel sets. Every decode of a model without a sliding window
//    goes through that kernel (an uncompressed sequence has no thin rows).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "memory/compress/compression.h"

namespace kvtrim::engine::cuda {

// What the plan needs of the model and the kernels.
struct StepShape {
  int n_layers = 0;
  int n_heads = 0;  // query heads, a multiple of n_kv_heads
  int n_kv_heads = 0;
  int head_dim = 0;
  int vocab_size = 0;
  int window = 0;      // the model's sliding window (0 = none)
  int query_tile = 0;  // the prefill kernel's tile (kPrefillQueryTile)
  // Rows of the tokens the step still in flight writes: a PreviousToken id (backend.h) below it
  // names one of them; 0, none.
  int previous_tokens = 0;
};

// One compressed prompt of the step: the layers' compression runs on the device.
struct PromptJob {
  int32_t seq = 0;          // index in the step's CSR
  int32_t first_token = 0;  // its first row in the step's packed buffers
  int32_t n = 0;            // prompt tokens
  const memory::compress::CompressionConfig* config = nullptr;
  std::vector<memory::compress::LayerPlan> layers;  // (n_layers) PlanPrompt
  // Where each layer's channel set, (n_kv_heads, key_width) uint16, goes in the step's channel
  // output; -1 for a layer whose thin keys keep every channel (or that has no thin rows).
  std::vector<int64_t> channels_at;  // (n_layers)
  int32_t channel_count = 0;         // uint16 elements it writes there
};

struct StepPlan {
  int32_t tokens = 0;             // T: new tokens of the step, packed in step order
  int32_t seqs = 0;               // S: sequences with at least one new token
  int32_t pages = 0;              // P: entries per layer of the page lists (page_indptr[S])
  int32_t decode_seqs = 0;        // sequences with exactly one new token: the decode kernel's
  int32_t compressed_decode = 0;  // of them, compressed
  int32_t evicting = 0;           // of them, with a decode-time policy (corm, window)
  int32_t rethinning = 0;         // of them, with ThinK re-thinning (think.rethin)
  int32_t prefill_items = 0;      // query tiles of the other sequences: the prefill kernel's
  int32_t logit_rows = 0;         // tokens whose logits the step returns
  int32_t max_decode_rows = 0;    // most rows a decode query sees (split-K heuristic)
  int32_t thin_pages = 0;         // PT: entries per layer of the thin page lists
  // The page lists as laid out, per layer: P (PT) entries, then room up to the PlanCapacity
  // asked for (never read). In the full-width lists each sequence's part is its pages, then -1
  // over room for more (PartRoom): the decodes of the same sequences keep their parts where they
  // are while they gain pages.
  int32_t page_stride = 0;       // PS >= P
  int32_t thin_page_stride = 0;  // PTS >= PT (0 without thin page lists)
  int32_t scratch_rows = 0;      // NS: scratch entries (the compressed prompts' tokens)
  int32_t scratch_items = 0;     // query tiles of the compressed prompts
  std::vector<PromptJob> prompts;
  // (n_layers) most rows a decode query sees in each layer: under PyramidKV the bottom layers
  // keep more than the top ones, and each layer's decode attention splits its rows by its own.
  std::vector<int32_t> max_layer_rows;
  size_t channel_out = 0;  // uint16 elements of channel sets the prompts write

  // Where each array starts in `data`, in int32 elements. Layer-major arrays hold layer l's part
  // at offset l * (the per-layer size). In `data` the arrays whose sizes depend only on the
  // step's sequences and tokens come first, in this order, then the page lists, the scratch
  // page ids and the channel sets: with the page lists laid out at a fixed stride
  // (PlanCapacity), consecutive decode steps of the same sequences have the same offsets.
  struct Offsets {
    size_t token_ids = 0;     // (T) the model's input ids
    size_t positions = 0;     // (T) position of each token (= its row in its sequence's cache)
    size_t token_seq = 0;     // (T) sequence whose pages take each token's K/V row; -1: none
                              // (a compressed prompt's rows stay in the scratch)
    size_t token_indptr = 0;  // (S + 1) sequence s's tokens: [token_indptr[s], token_indptr[s+1])
    size_t kv_rows = 0;       // (n_layers, S) rows of the full-width lists once this step's are
                              // written (0 for a compressed prompt)
    size_t page_indptr = 0;   // (S + 1) sequence s's part of the page lists: its pages from
                              // page_indptr[s] on, then -1 up to page_indptr[s + 1]
    size_t decode = 0;        // (decode_seqs) sequence indices for the decode kernel
    size_t prefill = 0;       // (prefill_items, 2) (sequence, first new token) query tiles
    size_t logits = 0;        // (logit_rows) token rows whose logits are returned, in step order
    // With compressed decodes or prompts (sized 0 otherwise):
    size_t thin_indptr = 0;  // (S + 1)
    // With decodes and no sliding window (CompressedKv, sized 0 otherwise):
    size_t thin_rows = 0;       // (n_layers, S, n_kv_heads)
    size_t recent_rows = 0;     // (n_layers, S, n_kv_heads)
    size_t key_width = 0;       // (n_layers, S)
    size_t channel_offset = 0;  // (n_layers, S) in uint16 elements from `channels`
    // With evicting decodes (sized 0 otherwise): each sequence's policy, zeros for none.
    size_t eviction = 0;  // (S, kEvictionParams) compressed_kv.h
    // With re-thinning decodes (sized 0 otherwise): the rows each sequence's layer moves from its
    // recent segment to its thin one after the step's attention (RethinRows; 0 none); for a
    // sequence that also evicts, -(think.recent + 1) where the layer may re-thin after its
    // eviction (RethinAfterEvictionRows; LaunchRethinAfterEviction decides on the device).
    size_t rethin = 0;  // (n_layers, S)
    // With prompts (sized 0 otherwise): the scratch as pages of one row.
    size_t scratch_indptr = 0;  // (S + 1)
    size_t scratch_rows = 0;    // (S) rows each sequence holds there
    size_t scratch_items = 0;   // (scratch_items, 2) query tiles over the scratch
    // The page lists, (n_layers, page_stride) each; a sequence's part holds its pages (the most
    // of any layer's, -1 past a shorter list's), then -1 over its room.
    size_t key_pages = 0;    // page ids of the keys, layer-major
    size_t value_pages = 0;  // page ids of the values
    // With compressed decodes or prompts: (n_layers, thin_page_stride) each.
    size_t thin_key_pages = 0;
    size_t thin_value_pages = 0;
    size_t scratch_keys = 0;    // (NS) page ids of the compressed prompts' key rows
    size_t scratch_values = 0;  // (NS) page ids of their value rows
    size_t channels = 0;        // uint16 channel sets of the compressed decodes, two per int32

    bool operator==(const Offsets&) const = default;
  } at;
  std::span<int32_t> data;              // the arrays: in `own` or in the caller's PlanStorage
  std::vector<int32_t> own;             // storage of `data` when BuildStepPlan got no PlanStorage
  std::vector<int32_t> step_of_seq;     // (S) index in `steps` of each planned sequence
  std::vector<uint64_t> seq_ids;        // (S) SequenceKv::id of each planned sequence
  std::vector<int32_t> seq_thin_pages;  // (S) thin page list entries of each
  // The channel sets were not written: the previous plan, built into the same memory with the
  // same offsets, holds them for the same decoding sequences (they change only when a prompt is
  // compressed).
  bool channels_kept = false;
  // The thin page lists were not written either, on the same terms (with channels_kept). They
  // change when a prompt is compressed, lose pages at their end to decode-time eviction (entries
  // past a list's rows are never read) and gain pages under ThinK re-thinning, which rewrites
  // them.
  bool thin_kept = false;
  // The full-width page lists were not rewritten: the previous plan, built into the same memory
  // with the same offsets for decodes of the same sequences, holds them but for the entries in
  // page_patches, which this plan wrote over (entries gained or lost, and under decode-time
  // eviction entries whose page changed: a list that lost its last page to eviction and gained
  // another back). Each sequence's part starts where it did.
  bool pages_kept = false;
  // With pages_kept: (offset into data, value) of every page list entry written, flat.
  std::vector<int32_t> page_patches;
  std::vector<int32_t> seq_pages;    // (S) page list entries each sequence uses
  std::vector<int32_t> part_starts;  // (S + 1) page_indptr
  // (S, n_layers, 2) page ids written from each key (0) and value (1) list: the rest of the
  // sequence's entries are -1.
  std::vector<int32_t> written;

  size_t bytes() const { return data.size_bytes(); }
  // What to copy of `data` to a device copy, [from, to) element ranges: everything, unless the
  // device holds the previous plan whole (`device_holds_previous`); then not the kept thin lists
  // and channel sets, and of kept full-width page lists only page_patches (`patches`), which go
  // up separately and are written into the device copy.
  struct Upload {
    size_t ranges[2][2] = {};
    int n_ranges = 0;
    bool patches = false;
  };
  Upload UploadOver(bool device_holds_previous) const;
  // Every sequence of the step decodes one token: no prompt, compressed or not, and no chunk of
  // one (a compressed prompt is never counted in decode_seqs).
  bool decodes_only() const { return seqs > 0 && decode_seqs == seqs; }
};

// Rows ThinK re-thinning (ThinkConfig::rethin) moves in a decode step of `n_new` tokens of a
// sequence compressed as `config`, from layer `c`'s recent segment to its thin one: once the
// recent rows (the new ones counted) reach 2 max(think.recent, 1), all but the think.recent
// newest; else 0, and 0 for a layer without a channel set, or under a decode-time policy
// (RethinAfterEvictionRows). Without one every kv-head holds the same rows, so head 0 speaks for
// all. The plan moves them only where the thin lists have the pages for them
// (KvCache::ReservePromptRows).
int32_t RethinRows(const memory::CompressedLayer& c,
                   const memory::compress::CompressionConfig& config, int n_new);

// Under re-thinning together with a decode-time policy, the thin rows layer `c`'s lists must hold
// for whatever the step's eviction leaves to move: the most over kv-heads of thin rows + recent
// rows (the new ones counted) - think.recent, among the heads whose recent rows reach
// 2 max(think.recent, 1) before eviction (eviction only lowers them); 0 where no head can move
// or the layer has no channel set.
int32_t RethinAfterEvictionRows(const memory::CompressedLayer& c,
                                const memory::compress::CompressionConfig& config, int n_new);

// Memory for the plan's arrays: `elements` int32 that stay valid and untouched until the next
// BuildStepPlan (the CUDA backend's pinned upload buffer, so that the plan is built where the
// copy to the device reads it).
using PlanStorage = std::function<absl::StatusOr<int32_t*>(size_t elements)>;

// The least room to lay the page lists out with, per layer (StepPlan::page_stride).
struct PlanCapacity {
  int32_t pages = 0;
  int32_t thin_pages = 0;

  // Room for the next plan after `plan`: a quarter more than it holds and 16, so that decode
  // steps of the same sequences keep their offsets (and replay their graph) while the sequences
  // gain pages; renewed once outgrown, or once under half what it would be renewed to.
  void Fit(const StepPlan& plan);
};

// Plans `steps` (steps without new tokens are skipped). INVALID_ARGUMENT for a token id outside
// [0, vocab_size); INTERNAL when a sequence's pages were not reserved for its new rows, its
// layers disagree, or a compressed sequence is fed what its layout cannot take (bugs of the
// caller). The arrays go to `storage` when given, else to plan.own (reused from call to call); an
// error of `storage` is returned as it is.
// The page lists take max(P, capacity.pages) entries per layer (likewise the thin ones).
absl::Status BuildStepPlan(std::span<const SequenceStep> steps, const StepShape& shape,
                           StepPlan& plan, const PlanStorage& storage = {},
                           PlanCapacity capacity = {});

}  // namespace kvtrim::engine::cuda
