#include "engine/cuda/step_plan.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace kvtrim::engine::cuda {
namespace {

absl::Status CheckSequence(const SequenceStep& step, int n_layers) {
  const memory::SequenceKv& kv = *step.kv;
  if (static_cast<int>(kv.keys.size()) != n_layers ||
      static_cast<int>(kv.values.size()) != n_layers) {
    return absl::InternalError(absl::StrCat("Forward: a sequence has ", kv.keys.size(), " / ",
                                            kv.values.size(), " layers, the model ", n_layers));
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

}  // namespace

absl::Status BuildStepPlan(std::span<const SequenceStep> steps, int n_layers, int vocab_size,
                           int window, int query_tile, StepPlan& plan) {
  // A fresh plan that keeps the vectors' capacity.
  std::vector<int32_t> data = std::move(plan.data), step_of_seq = std::move(plan.step_of_seq);
  data.clear();
  step_of_seq.clear();
  plan = StepPlan{};
  plan.data = std::move(data);
  plan.step_of_seq = std::move(step_of_seq);
  // Sizes first, so that the arrays can be laid out back to back.
  for (size_t i = 0; i < steps.size(); ++i) {
    const SequenceStep& step = steps[i];
    if (step.tokens.empty()) continue;
    if (absl::Status status = CheckSequence(step, n_layers); !status.ok()) return status;
    for (int32_t id : step.tokens) {
      if (id < 0 || id >= vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " is outside [0, ", vocab_size, ")"));
      }
    }
    const int n_new = static_cast<int>(step.tokens.size());
    const int rows = step.kv->cached_tokens() + n_new;
    plan.step_of_seq.push_back(static_cast<int32_t>(i));
    plan.tokens += n_new;
    plan.pages += step.kv->keys[0].pages_for(rows);
    if (n_new == 1) {
      ++plan.decode_seqs;
      plan.max_decode_rows =
          std::max(plan.max_decode_rows, window > 0 ? std::min(rows, window) : rows);
    } else {
      plan.prefill_items += (n_new + query_tile - 1) / query_tile;
    }
    if (step.want_logits) ++plan.logit_rows;
  }
  plan.seqs = static_cast<int32_t>(plan.step_of_seq.size());
  const size_t T = plan.tokens, S = plan.seqs, P = plan.pages;
  StepPlan::Offsets& at = plan.at;
  at.token_ids = 0;
  at.positions = at.token_ids + T;
  at.token_seq = at.positions + T;
  at.token_indptr = at.token_seq + T;
  at.kv_rows = at.token_indptr + S + 1;
  at.page_indptr = at.kv_rows + S;
  at.key_pages = at.page_indptr + S + 1;
  at.value_pages = at.key_pages + n_layers * P;
  at.decode = at.value_pages + n_layers * P;
  at.prefill = at.decode + plan.decode_seqs;
  at.logits = at.prefill + 2 * static_cast<size_t>(plan.prefill_items);
  plan.data.assign(at.logits + plan.logit_rows, 0);

  int32_t* d = plan.data.data();
  int token = 0, page = 0, decode = 0, prefill = 0, logit = 0;
  for (int s = 0; s < plan.seqs; ++s) {
    const SequenceStep& step = steps[plan.step_of_seq[s]];
    const memory::SequenceKv& kv = *step.kv;
    const int n_new = static_cast<int>(step.tokens.size());
    const int cached = kv.cached_tokens();
    const int n_pages = kv.keys[0].pages_for(cached + n_new);
    d[at.token_indptr + s] = token;
    d[at.kv_rows + s] = cached + n_new;
    d[at.page_indptr + s] = page;
    for (int layer = 0; layer < n_layers; ++layer) {
      std::copy_n(kv.keys[layer].pages.begin(), n_pages, d + at.key_pages + layer * P + page);
      std::copy_n(kv.values[layer].pages.begin(), n_pages, d + at.value_pages + layer * P + page);
    }
    for (int i = 0; i < n_new; ++i, ++token) {
      d[at.token_ids + token] = step.tokens[i];
      d[at.positions + token] = cached + i;
      d[at.token_seq + token] = s;
    }
    if (n_new == 1) {
      d[at.decode + decode++] = s;
    } else {
      for (int first = 0; first < n_new; first += query_tile, ++prefill) {
        d[at.prefill + 2 * prefill] = s;
        d[at.prefill + 2 * prefill + 1] = first;
      }
    }
    if (step.want_logits) d[at.logits + logit++] = token - 1;
    page += n_pages;
  }
  d[at.token_indptr + plan.seqs] = token;
  d[at.page_indptr + plan.seqs] = page;
  return absl::OkStatus();
}

}  // namespace kvtrim::engine::cuda
