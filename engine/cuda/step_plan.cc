#include "engine/cuda/step_plan.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/cuda/compressed_kv.h"

namespace kvtrim::engine::cuda {
namespace {

namespace mc = memory::compress;

absl::Status CheckLayers(const memory::SequenceKv& kv, int n_layers) {
  if (static_cast<int>(kv.keys.size()) != n_layers ||
      static_cast<int>(kv.values.size()) != n_layers) {
    return absl::InternalError(absl::StrCat("Forward: a sequence has ", kv.keys.size(), " / ",
                                            kv.values.size(), " layers, the model ", n_layers));
  }
  return absl::OkStatus();
}

absl::Status CheckSequence(const SequenceStep& step, int n_layers) {
  const memory::SequenceKv& kv = *step.kv;
  if (absl::Status status = CheckLayers(kv, n_layers); !status.ok()) return status;
  if (kv.is_compressed()) {
    return absl::InternalError("Forward: a compressed sequence was fed without its compression");
  }
  const int rows = kv.cached_tokens() + static_cast<int>(step.tokens.size());
  const size_t pages = kv.keys[0].pages.size();
  for (int layer = 0; layer < n_layers; ++layer) {
    for (const memory::PageList* list : {&kv.keys[layer], &kv.values[layer]}) {
      if (list->rows != kv.cached_tokens() || list->pages.size() != pages ||
          list->rows_per_page != kv.keys[0].rows_per_page) {
        return absl::InternalError("Forward: the layers of a sequence disagree on rows or pages");
      }
      if (list->capacity() < rows) {
        return absl::InternalError("Forward: page capacity was not reserved for the new tokens");
      }
    }
  }
  return absl::OkStatus();
}

// A compressed prompt goes into the empty layout of its plan; a compressed sequence then decodes
// one token at a time into its recent segment.
absl::Status CheckCompressed(const SequenceStep& step, std::span<const mc::LayerPlan> plan,
                             int n_layers, int n_kv_heads) {
  const memory::SequenceKv& kv = *step.kv;
  if (absl::Status status = CheckLayers(kv, n_layers); !status.ok()) return status;
  if (static_cast<int>(kv.compressed.size()) != n_layers) {
    return absl::InternalError("Forward: compressed step on a sequence without its layout");
  }
  for (int layer = 0; layer < n_layers; ++layer) {
    const memory::CompressedLayer& c = kv.compressed[layer];
    if (static_cast<int>(c.prompt_rows.size()) != n_kv_heads ||
        static_cast<int>(c.recent_rows.size()) != n_kv_heads) {
      return absl::InternalError("Forward: a compressed layer lacks its per-head row counts");
    }
    if (kv.tokens == 0) {
      const mc::LayerPlan& p = plan[layer];
      if (c.key_width != p.key_width || c.keys.capacity() < p.thin_rows ||
          c.values.capacity() < p.thin_rows || kv.keys[layer].capacity() < p.full_rows ||
          kv.values[layer].capacity() < p.full_rows) {
        return absl::InternalError("Forward: a compressed prompt's layout does not match its plan");
      }
    } else if (kv.keys[layer].capacity() < kv.keys[layer].rows + 1 ||
               kv.values[layer].capacity() < kv.values[layer].rows + 1) {
      return absl::InternalError("Forward: page capacity was not reserved for the new token");
    }
  }
  if (kv.tokens > 0 && step.tokens.size() != 1) {
    return absl::InternalError("Forward: a compressed sequence decodes one token per step");
  }
  return absl::OkStatus();
}

// Entries a list of pages takes in a layer-major table: the most pages any layer holds.
int32_t MostPages(const memory::SequenceKv& kv, bool thin) {
  size_t most = 0;
  for (size_t layer = 0; layer < kv.keys.size(); ++layer) {
    const memory::PageList& keys = thin ? kv.compressed[layer].keys : kv.keys[layer];
    const memory::PageList& values = thin ? kv.compressed[layer].values : kv.values[layer];
    most = std::max({most, keys.pages.size(), values.pages.size()});
  }
  return static_cast<int32_t>(most);
}

// Copies `list`'s pages to `out`, up to `entries` of them, and pads to `room` with -1. Returns
// the page ids copied.
int32_t CopyPages(const memory::PageList& list, int32_t entries, int32_t room, int32_t* out) {
  const int32_t n = std::min<int32_t>(entries, static_cast<int32_t>(list.pages.size()));
  std::copy_n(list.pages.begin(), n, out);
  std::fill(out + n, out + room, -1);
  return n;
}

// Entries of room a sequence's part of the full-width page lists gets past its `pages`: an
// eighth more, and at least 4, so that its decodes go on for a while in the same part.
int32_t PartRoom(int32_t pages) { return pages + pages / 8 + 4; }

// A kept plan's full-width page lists (StepPlan::pages_kept): writes, in plan.data, the entries
// each list gained or lost since `previous_written` (the previous plan's StepPlan::written), or
// changed (decode-time eviction), and lists them in plan.page_patches; sets plan.written.
void PatchPageLists(std::span<const SequenceStep> steps, size_t n_layers,
                    std::span<const int32_t> previous_written, StepPlan& plan) {
  const StepPlan::Offsets& at = plan.at;
  const size_t L = n_layers;
  int32_t* d = plan.data.data();
  for (size_t s = 0; s < static_cast<size_t>(plan.seqs); ++s) {
    const SequenceStep& step = steps[plan.step_of_seq[s]];
    const memory::SequenceKv& kv = *step.kv;
    // Lists that lose rows on the device: under decode-time eviction or ThinK re-thinning.
    const bool shrinking = step.compressed() &&
                           (step.compression->eviction != mc::EvictionPolicy::kNone ||
                            (step.compression->think.enabled() && step.compression->think.rethin));
    for (size_t layer = 0; layer < L; ++layer) {
      for (int v = 0; v < 2; ++v) {
        const memory::PageList& list = v == 0 ? kv.keys[layer] : kv.values[layer];
        const size_t first = (v == 0 ? at.key_pages : at.value_pages) + layer * plan.page_stride +
                             plan.part_starts[s];
        const size_t slot = (s * L + layer) * 2 + v;
        const int32_t before = previous_written[slot];
        const int32_t now =
            std::min<int32_t>(plan.seq_pages[s], static_cast<int32_t>(list.pages.size()));
        // Under decode-time eviction or re-thinning a list may have lost pages at its end and
        // gained others since: every entry is compared with the previous plan's (a compressed
        // sequence's lists are short). Elsewhere lists only grow, and the entries past `before`
        // are the new ones.
        const int32_t from = shrinking ? 0 : std::min(before, now);
        for (int32_t j = from; j < std::max(before, now); ++j) {
          const int32_t page = j < now ? list.pages[j] : -1;
          if (j < std::min(before, now) && d[first + j] == page) continue;
          d[first + j] = page;
          plan.page_patches.push_back(static_cast<int32_t>(first + j));
          plan.page_patches.push_back(page);
        }
        plan.written[slot] = now;
      }
    }
  }
}

// A compressed decode's decode-time policy as the eviction kernel reads it (compressed_kv.h).
void WriteEviction(const mc::CompressionConfig& config, int32_t* params) {
  switch (config.eviction) {
    case mc::EvictionPolicy::kNone:
      params[0] = kEvictNone;
      return;
    case mc::EvictionPolicy::kCorm: {
      params[0] = kEvictCorm;
      params[1] = config.corm.window;
      params[2] = config.corm.recent;
      uint64_t alpha;
      static_assert(sizeof(alpha) == sizeof(config.corm.alpha));
      std::memcpy(&alpha, &config.corm.alpha, sizeof(alpha));
      params[3] = static_cast<int32_t>(static_cast<uint32_t>(alpha));
      params[4] = static_cast<int32_t>(static_cast<uint32_t>(alpha >> 32));
      params[5] = config.corm.max_tokens;
      return;
    }
    case mc::EvictionPolicy::kWindow:
      params[0] = kEvictWindow;
      params[1] = config.window.sinks;
      params[2] = config.window.recent;
      return;
  }
}

}  // namespace

StepPlan::Upload StepPlan::UploadOver(bool device_holds_previous) const {
  Upload upload;
  const size_t elements = data.size();
  const auto add = [&](size_t from, size_t to) {
    if (from < to) {
      upload.ranges[upload.n_ranges][0] = from;
      upload.ranges[upload.n_ranges][1] = to;
      ++upload.n_ranges;
    }
  };
  // The kept channel sets end the plan; kept thin lists come before the scratch ids and them.
  const size_t end = device_holds_previous && channels_kept ? at.channels : elements;
  const size_t tail = device_holds_previous && thin_kept ? at.thin_key_pages : end;
  if (device_holds_previous && pages_kept) {
    add(0, at.key_pages);
    // Thin page lists rewritten (eviction emptied pages at their end, re-thinning added some) go
    // up whole.
    if (!thin_kept) add(at.thin_key_pages, end);
    upload.patches = !page_patches.empty();
  } else {
    add(0, tail);
  }
  return upload;
}

void PlanCapacity::Fit(const StepPlan& plan) {
  const auto fit = [](int32_t used, int32_t& capacity) {
    const int32_t fresh = used + used / 4 + 16;
    if (used > capacity || fresh < capacity / 2) capacity = fresh;
  };
  fit(plan.pages, pages);
  fit(plan.thin_pages, thin_pages);
}

int32_t RethinRows(const memory::CompressedLayer& c, const mc::CompressionConfig& config,
                   int n_new) {
  const mc::ThinkConfig& think = config.think;
  if (!think.enabled() || !think.rethin || config.eviction != mc::EvictionPolicy::kNone ||
      c.channels.empty() || c.recent_rows.empty()) {
    return 0;
  }
  const int32_t rows = c.recent_rows[0] + n_new;
  return rows >= 2 * std::max(think.recent, 1) ? rows - think.recent : 0;
}

int32_t RethinAfterEvictionRows(const memory::CompressedLayer& c,
                                const mc::CompressionConfig& config, int n_new) {
  const mc::ThinkConfig& think = config.think;
  if (!think.enabled() || !think.rethin || config.eviction == mc::EvictionPolicy::kNone ||
      c.channels.empty()) {
    return 0;
  }
  int32_t most = 0;
  for (size_t h = 0; h < c.recent_rows.size() && h < c.prompt_rows.size(); ++h) {
    const int32_t rows = c.recent_rows[h] + n_new;
    if (rows >= 2 * std::max(think.recent, 1)) {
      most = std::max(most, c.prompt_rows[h] + rows - think.recent);
    }
  }
  return most;
}

absl::Status BuildStepPlan(std::span<const SequenceStep> steps, const StepShape& shape,
                           StepPlan& plan, const PlanStorage& storage, PlanCapacity capacity) {
  const int n_layers = shape.n_layers, H = shape.n_kv_heads;
  // What the previous plan left in its memory, for the thin lists and channel sets it may keep.
  const StepPlan::Offsets previous_at = plan.at;
  const int32_t* const previous_data = plan.data.data();
  const size_t previous_size = plan.data.size();
  const bool previous_decodes = plan.decodes_only();
  std::vector<uint64_t> previous_ids = std::move(plan.seq_ids);
  std::vector<int32_t> previous_thin = std::move(plan.seq_thin_pages);
  std::vector<int32_t> previous_starts = std::move(plan.part_starts);
  std::vector<int32_t> previous_written = std::move(plan.written);
  std::vector<int32_t> patches = std::move(plan.page_patches);
  patches.clear();
  // A fresh plan that keeps the vectors' capacity.
  std::vector<int32_t> own = std::move(plan.own), step_of_seq = std::move(plan.step_of_seq);
  std::vector<PromptJob> jobs = std::move(plan.prompts);
  std::vector<int32_t> layer_rows = std::move(plan.max_layer_rows);
  step_of_seq.clear();
  jobs.clear();
  layer_rows.assign(n_layers, 0);
  plan = StepPlan{};
  plan.own = std::move(own);
  plan.max_layer_rows = std::move(layer_rows);
  plan.step_of_seq = std::move(step_of_seq);
  plan.prompts = std::move(jobs);
  plan.page_patches = std::move(patches);

  // Sizes first, so that the arrays can be laid out back to back.
  std::vector<int32_t>& seq_pages = plan.seq_pages;
  std::vector<int32_t>& seq_thin_pages = plan.seq_thin_pages;
  size_t channel_elements = 0;  // uint16 channel sets of the compressed decodes
  bool thin_grows = false;      // some thin list may have gained pages since the last plan
  for (size_t i = 0; i < steps.size(); ++i) {
    const SequenceStep& step = steps[i];
    if (step.tokens.empty()) continue;
    for (int32_t id : step.tokens) {
      if (id >= 0 && id < shape.vocab_size) continue;
      if (id < 0 && PreviousRow(id) < shape.previous_tokens && step.tokens.size() == 1) continue;
      if (id < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "token id ", id, " names row ", PreviousRow(id), " of the step in flight, which has ",
            shape.previous_tokens, " (only a decode's one token can be one)"));
      }
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is outside [0, ", shape.vocab_size, ")"));
    }
    const memory::SequenceKv& kv = *step.kv;
    const int n_new = static_cast<int>(step.tokens.size());
    const int32_t s = static_cast<int32_t>(plan.step_of_seq.size());
    plan.step_of_seq.push_back(static_cast<int32_t>(i));
    plan.seq_ids.push_back(kv.id);
    if (step.compressed()) {
      const bool prompt = kv.tokens == 0;
      std::vector<mc::LayerPlan> layers;
      if (prompt) layers = mc::PlanPrompt(*step.compression, n_new, n_layers, shape.head_dim);
      if (absl::Status status = CheckCompressed(step, layers, n_layers, H); !status.ok()) {
        return status;
      }
      seq_pages.push_back(MostPages(kv, false));
      seq_thin_pages.push_back(MostPages(kv, true));
      if (prompt) {
        PromptJob job{s, plan.tokens, n_new, step.compression, std::move(layers), {}, 0};
        for (const mc::LayerPlan& p : job.layers) {
          const bool thinned = p.key_width < shape.head_dim && p.thin_rows > 0;
          job.channels_at.push_back(thinned ? static_cast<int64_t>(plan.channel_out) : -1);
          if (thinned) {
            job.channel_count += H * p.key_width;
            plan.channel_out += H * p.key_width;
          }
        }
        plan.scratch_rows += n_new;
        plan.scratch_items += (n_new + shape.query_tile - 1) / shape.query_tile;
        plan.prompts.push_back(std::move(job));
      } else {
        ++plan.decode_seqs;
        ++plan.compressed_decode;
        if (step.compression->eviction != mc::EvictionPolicy::kNone) ++plan.evicting;
        if (step.compression->think.enabled() && step.compression->think.rethin) {
          ++plan.rethinning;
        }
        for (int layer = 0; layer < n_layers; ++layer) {
          const memory::CompressedLayer& c = kv.compressed[layer];
          // Rows moved to a thin segment this step may have given its lists a page that a
          // shorter list's padding hid from the sequence's page count.
          thin_grows = thin_grows || RethinRows(c, *step.compression, n_new) > 0 ||
                       RethinAfterEvictionRows(c, *step.compression, n_new) > 0;
          channel_elements += c.channels.size();
          int32_t& most = plan.max_layer_rows[layer];
          for (int h = 0; h < H; ++h) {
            most = std::max(most, c.prompt_rows[h] + c.recent_rows[h] + 1);
          }
          plan.max_decode_rows = std::max(plan.max_decode_rows, most);
        }
      }
    } else {
      if (absl::Status status = CheckSequence(step, n_layers); !status.ok()) return status;
      const int rows = kv.cached_tokens() + n_new;
      seq_pages.push_back(kv.keys[0].pages_for(rows));
      seq_thin_pages.push_back(0);
      if (n_new == 1) {
        ++plan.decode_seqs;
        const int32_t seen = shape.window > 0 ? std::min(rows, shape.window) : rows;
        plan.max_decode_rows = std::max(plan.max_decode_rows, seen);
        for (int32_t& most : plan.max_layer_rows) most = std::max(most, seen);
      } else {
        plan.prefill_items += (n_new + shape.query_tile - 1) / shape.query_tile;
      }
    }
    plan.tokens += n_new;
    plan.thin_pages += seq_thin_pages.back();
    if (step.want_logits) ++plan.logit_rows;
  }
  plan.seqs = static_cast<int32_t>(plan.step_of_seq.size());
  // Each sequence's part of the full-width page lists: where the previous plan put it when this
  // step decodes the same sequences and every part still holds its pages, else afresh.
  std::vector<int32_t>& starts = plan.part_starts;
  // This step decodes the sequences the previous one decoded, in the same order.
  const bool same_decodes = previous_decodes && plan.decodes_only() && plan.seq_ids == previous_ids;
  bool same_parts = same_decodes && previous_starts.size() == seq_pages.size() + 1;
  for (size_t s = 0; same_parts && s < seq_pages.size(); ++s) {
    same_parts = seq_pages[s] <= previous_starts[s + 1] - previous_starts[s];
  }
  if (same_parts) {
    starts = std::move(previous_starts);
  } else {
    starts.assign(seq_pages.size() + 1, 0);
    for (size_t s = 0; s < seq_pages.size(); ++s) {
      starts[s + 1] = starts[s] + PartRoom(seq_pages[s]);
    }
  }
  plan.pages = starts.back();
  const size_t T = plan.tokens, S = plan.seqs, P = plan.pages, L = n_layers;
  // Decodes run the compressed decode kernel (uncompressed sequences are its special case) unless
  // the model has a sliding window, which that kernel does not take.
  const bool compressed = plan.decode_seqs > 0 && shape.window == 0;
  const bool prompts = !plan.prompts.empty();
  // Thin page lists: read by compressed decodes, written by compressed prompts.
  const bool thin = compressed || prompts;
  const size_t PT = thin ? plan.thin_pages : 0;
  const size_t PS = std::max<size_t>(P, capacity.pages);
  const size_t PTS = thin ? std::max<size_t>(PT, capacity.thin_pages) : 0;
  plan.page_stride = static_cast<int32_t>(PS);
  plan.thin_page_stride = static_cast<int32_t>(PTS);
  const size_t NS = plan.scratch_rows;
  StepPlan::Offsets& at = plan.at;
  at.token_ids = 0;
  at.positions = at.token_ids + T;
  at.token_seq = at.positions + T;
  at.token_indptr = at.token_seq + T;
  at.kv_rows = at.token_indptr + S + 1;
  at.page_indptr = at.kv_rows + L * S;
  at.decode = at.page_indptr + S + 1;
  at.prefill = at.decode + plan.decode_seqs;
  at.logits = at.prefill + 2 * static_cast<size_t>(plan.prefill_items);
  at.thin_indptr = at.logits + plan.logit_rows;
  at.thin_rows = at.thin_indptr + (thin ? S + 1 : 0);
  at.recent_rows = at.thin_rows + (compressed ? L * S * H : 0);
  at.key_width = at.recent_rows + (compressed ? L * S * H : 0);
  at.channel_offset = at.key_width + (compressed ? L * S : 0);
  at.eviction = at.channel_offset + (compressed ? L * S : 0);
  at.rethin = at.eviction + (plan.evicting > 0 ? S * kEvictionParams : 0);
  at.scratch_indptr = at.rethin + (plan.rethinning > 0 ? L * S : 0);
  at.scratch_rows = at.scratch_indptr + (prompts ? S + 1 : 0);
  at.scratch_items = at.scratch_rows + (prompts ? S : 0);
  at.key_pages = at.scratch_items + 2 * static_cast<size_t>(plan.scratch_items);
  at.value_pages = at.key_pages + L * PS;
  at.thin_key_pages = at.value_pages + L * PS;
  at.thin_value_pages = at.thin_key_pages + L * PTS;
  at.scratch_keys = at.thin_value_pages + L * PTS;
  at.scratch_values = at.scratch_keys + NS;
  at.channels = at.scratch_values + NS;
  const size_t elements = at.channels + (channel_elements + 1) / 2;
  if (storage) {
    absl::StatusOr<int32_t*> memory = storage(elements);
    if (!memory.ok()) return memory.status();
    plan.data = std::span<int32_t>(*memory, elements);
  } else {
    plan.own.resize(elements);
    plan.data = std::span<int32_t>(plan.own);
  }
  // The decodes of the sequences the previous plan decoded, into the same memory: their thin page
  // lists and channel sets are there already.
  const bool same_memory =
      plan.data.data() == previous_data && plan.data.size() == previous_size && at == previous_at;
  plan.channels_kept = thin && same_decodes && same_memory;
  plan.thin_kept = plan.channels_kept && !thin_grows && plan.seq_thin_pages == previous_thin;
  // Likewise the full-width page lists, but for the entries the sequences gained.
  plan.pages_kept = same_parts && same_memory && previous_written.size() == S * L * 2;
  // Zeros in the arrays before the page lists, where the loop below may leave entries unwritten.
  // It fills each layer's first P (PT) page list entries, the scratch page ids and the channel
  // sets but for the half word that may pad them to an int32: up to 1 MB a step at the
  // Llama-3-8B shape, not cleared first. Entries of the page lists past P are never read.
  std::fill(plan.data.begin(), plan.data.begin() + at.key_pages, 0);
  if (at.channels < elements && !plan.channels_kept) plan.data[elements - 1] = 0;

  int32_t* d = plan.data.data();
  auto* channels = reinterpret_cast<uint16_t*>(d + at.channels);
  int token = 0, thin_page = 0, decode = 0, prefill = 0, logit = 0;
  int scratch = 0, scratch_item = 0;
  size_t channel = 0;
  for (int s = 0; s < plan.seqs; ++s) {
    const SequenceStep& step = steps[plan.step_of_seq[s]];
    const memory::SequenceKv& kv = *step.kv;
    const int n_new = static_cast<int>(step.tokens.size());
    const int cached = kv.cached_tokens();
    const bool is_compressed = step.compressed();
    const bool prompt = is_compressed && kv.tokens == 0;
    const int32_t n_thin = seq_thin_pages[s];
    d[at.token_indptr + s] = token;
    d[at.page_indptr + s] = starts[s];
    if (thin) d[at.thin_indptr + s] = thin_page;
    if (prompts) d[at.scratch_indptr + s] = scratch;
    for (size_t layer = 0; layer < L; ++layer) {
      const int32_t rows = prompt ? 0 : kv.keys[layer].rows + n_new;
      d[at.kv_rows + layer * S + s] = rows;
      if (!compressed) continue;
      int32_t* thin_rows = d + at.thin_rows + (layer * S + s) * H;
      int32_t* recent_rows = d + at.recent_rows + (layer * S + s) * H;
      d[at.key_width + layer * S + s] = shape.head_dim;
      if (!is_compressed) {
        std::fill(recent_rows, recent_rows + H, rows);
        continue;
      }
      if (prompt) continue;  // not read: the prompt is not decoded in this step
      if (layer == 0 && plan.evicting > 0)
        WriteEviction(*step.compression, d + at.eviction + s * kEvictionParams);
      const memory::CompressedLayer& c = kv.compressed[layer];
      if (plan.rethinning > 0) {
        const int32_t capacity = std::min(c.keys.capacity(), c.values.capacity());
        if (step.compression->eviction == mc::EvictionPolicy::kNone) {
          const int32_t moved = RethinRows(c, *step.compression, n_new);
          d[at.rethin + layer * S + s] = moved <= capacity - c.prompt_rows[0] ? moved : 0;
        } else {
          const int32_t rows = RethinAfterEvictionRows(c, *step.compression, n_new);
          d[at.rethin + layer * S + s] =
              rows > 0 && rows <= capacity ? -(step.compression->think.recent + 1) : 0;
        }
      }
      for (int h = 0; h < H; ++h) {
        thin_rows[h] = c.prompt_rows[h];
        recent_rows[h] = c.recent_rows[h] + n_new;
      }
      d[at.key_width + layer * S + s] = c.key_width;
      d[at.channel_offset + layer * S + s] = static_cast<int32_t>(channel);
      if (!plan.channels_kept) {
        std::copy(c.channels.begin(), c.channels.end(), channels + channel);
      }
      channel += c.channels.size();
    }
    for (int i = 0; i < n_new; ++i, ++token) {
      d[at.token_ids + token] = step.tokens[i];
      d[at.positions + token] = cached + i;
      d[at.token_seq + token] = prompt ? -1 : s;
    }
    if (prompt) {
      // A q|k|v row is group + 2 pages of the scratch: the query heads, then keys, then values.
      const int group = shape.n_kv_heads > 0 ? shape.n_heads / shape.n_kv_heads : 0;
      const int row_pages = group + 2;
      const int first = d[at.token_indptr + s];
      for (int i = 0; i < n_new; ++i, ++scratch) {
        d[at.scratch_keys + scratch] = (first + i) * row_pages + group;
        d[at.scratch_values + scratch] = (first + i) * row_pages + group + 1;
      }
      d[at.scratch_rows + s] = n_new;
      for (int tile = 0; tile < n_new; tile += shape.query_tile, ++scratch_item) {
        d[at.scratch_items + 2 * scratch_item] = s;
        d[at.scratch_items + 2 * scratch_item + 1] = tile;
      }
    } else if (n_new == 1) {
      d[at.decode + decode++] = s;
    } else {
      for (int first = 0; first < n_new; first += shape.query_tile, ++prefill) {
        d[at.prefill + 2 * prefill] = s;
        d[at.prefill + 2 * prefill + 1] = first;
      }
    }
    if (step.want_logits) d[at.logits + logit++] = token - 1;
    thin_page += n_thin;
  }
  // The page lists, most of the plan (32 sequences of 8k tokens at 16 rows a page: 4 MB), copied
  // on every core; or, where the previous plan's are kept, only the entries the sequences gained.
  plan.written.resize(S * L * 2);
  if (plan.pages_kept) PatchPageLists(steps, L, previous_written, plan);
  // Only a fresh copy of the full-width lists is worth the threads: waking them costs more than
  // the rest of a kept plan.
  const bool copy_thin = thin && !plan.thin_kept;
#pragma omp parallel for schedule(static) if (!plan.pages_kept && P * L > (1 << 16))
  for (int s = 0; s < (plan.pages_kept && !copy_thin ? 0 : plan.seqs); ++s) {
    const memory::SequenceKv& kv = *steps[plan.step_of_seq[s]].kv;
    const int32_t n_pages = seq_pages[s], room = starts[s + 1] - starts[s];
    const int32_t thin_page = thin ? d[at.thin_indptr + s] : 0, n_thin = seq_thin_pages[s];
    for (size_t layer = 0; layer < L; ++layer) {
      if (!plan.pages_kept) {
        int32_t* written = plan.written.data() + (s * L + layer) * 2;
        written[0] =
            CopyPages(kv.keys[layer], n_pages, room, d + at.key_pages + layer * PS + starts[s]);
        written[1] =
            CopyPages(kv.values[layer], n_pages, room, d + at.value_pages + layer * PS + starts[s]);
      }
      if (copy_thin && n_thin > 0) {
        const memory::CompressedLayer& c = kv.compressed[layer];
        CopyPages(c.keys, n_thin, n_thin, d + at.thin_key_pages + layer * PTS + thin_page);
        CopyPages(c.values, n_thin, n_thin, d + at.thin_value_pages + layer * PTS + thin_page);
      }
    }
  }
  d[at.token_indptr + plan.seqs] = token;
  d[at.page_indptr + plan.seqs] = starts[S];
  if (thin) d[at.thin_indptr + plan.seqs] = thin_page;
  if (prompts) d[at.scratch_indptr + plan.seqs] = scratch;
  return absl::OkStatus();
}

}  // namespace kvtrim::engine::cuda
