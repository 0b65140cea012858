// End to end through the Scheduler (no gRPC): `--requests` concurrent requests of
// `--prompt_tokens` random prompt tokens and `--new_tokens` tokens each (greedy, or sampled as
// --temperature, --top_k, --top_p and --repetition_penalty say, seeded per request), once per
// compression spec, on a model file or a dummy shape (`--load-format dummy --arch llama3.1-8b`;
// llama3-8b's context of 8192 tokens holds no 8192-token prompt and its new tokens).
// Prints one row per spec:
//
//   prefill tok/s   all prompt tokens / the time until every request has its first token
//   decode ms/step  the time after that / (new_tokens - 1): every running request decodes one
//                   token per step
//   forward ms      of a decode step, the time inside Backend::Launch and Collect (the rest of
//                   the step is the scheduler's: sampling, stop rules, streaming the tokens out,
//                   which overlap the next step's device work unless --overlap=false)
// and, where the backend profiles its steps (Backend::LastStepProfile: the CUDA one), a second
// table splitting the decode step's Forward into its host phases and the device's span (and
// counting the steps replayed from a CUDA graph; --cuda_graphs=false queues every step), and a
// third for the prefill phase: its steps, the time inside Forward and the device spans summed.
//   roofline ms     (weight bytes + KV bytes read per step) / --copy_gbs, at the middle of the
//                   decode (KV bytes from each request's final kv_bytes.rows, less half the
//                   generated rows); omitted without --copy_gbs
//   prefill ×none   the spec's prefill time over the uncompressed one's (the cost of the prompt
//                   compression steps when the first spec is "none")
//
// A benchmark prints; it never asserts on time. It exits 1 without a table when --prompt_tokens +
// --new_tokens exceed the model's context, or when a request generates fewer than --new_tokens
// (the rates would divide by tokens never made).
//
//   serve_bench --load_format dummy --arch llama3.1-8b --device cuda --requests 32
//     --prompt_tokens 8192 --new_tokens 256 --pool_gib 60 --copy_gbs 3024
//     --specs 'none;policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5'
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/backend_choice.h"
#include "engine/cpu/forward.h"
#include "engine/dummy_model.h"
#include "engine/generator.h"
#include "engine/model_source.h"
#include "memory/compress/compression.h"

ABSL_FLAG(std::string, model, "", "a GGUF file or Hugging Face directory");
ABSL_FLAG(std::string, load_format, "auto", "auto, gguf, hf or dummy");
ABSL_FLAG(std::string, arch, "",
          "with --load-format dummy: llama3-8b, llama3.1-8b, mistral-7b, smollm2-135m");
ABSL_FLAG(std::string, device, "auto", "cpu, cuda or auto");
ABSL_FLAG(std::string, dtype, "auto", "on cuda: auto (the model's), bfloat16 or float16");
ABSL_FLAG(int, requests, 32, "concurrent requests");
ABSL_FLAG(int, prompt_tokens, 8192, "prompt tokens per request");
ABSL_FLAG(int, new_tokens, 256, "generated tokens per request");
ABSL_FLAG(double, pool_gib, 40.0, "KV pool, GiB");
ABSL_FLAG(int, page_kib, 0, "KV page size, KiB; 0 = the model's default (SchedulerOptions)");
ABSL_FLAG(int, step_tokens, 8192, "most tokens in one scheduler step");
ABSL_FLAG(bool, cuda_graphs, true,
          "replay decode steps whose launches repeat from a captured CUDA graph (--device cuda)");
ABSL_FLAG(double, temperature, 0.0, "every request's sampling temperature (0 = greedy)");
ABSL_FLAG(int, top_k, 0, "every request's top-k (0 = off)");
ABSL_FLAG(double, top_p, 1.0, "every request's top-p (1 = off)");
ABSL_FLAG(double, repetition_penalty, 1.0, "every request's repetition penalty (1 = off)");
ABSL_FLAG(bool, sample_on_device, true,
          "sample on the device and copy back only the tokens; false copies the sampled rows "
          "back and samples them on the host (--device cuda)");
ABSL_FLAG(bool, dependent_launch, true,
          "let the step's own kernels start while the kernel before them drains (programmatic "
          "dependent launch, --device cuda)");
ABSL_FLAG(bool, small_gemm, true,
          "run a decode step's small matrices (at most 8 MB) on the engine's own GEMM kernel; "
          "false: cuBLAS for every shape (--device cuda)");
ABSL_FLAG(bool, eviction_stream, true,
          "run decode-time eviction beside the layers after it, on a second stream; false: in "
          "line (--device cuda)");
ABSL_FLAG(std::string, specs, "none;policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5",
          "compression specs separated by ';' (\"none\" = uncompressed)");
ABSL_FLAG(bool, overlap, true,
          "plan and queue each step while the device runs the one before (SchedulerOptions)");
ABSL_FLAG(double, copy_gbs, 0.0, "device copy bandwidth, GB/s, for the roofline (0 = omit)");

namespace kvtrim::engine {
namespace {

using Clock = std::chrono::steady_clock;

// The engine's backend, recording when each step was launched and collected (seconds since
// *origin) and how long its Launch and Collect took.
class TimedBackend : public Backend {
 public:
  struct Span {
    double begin = 0.0, end = 0.0;
    double inside = 0.0;  // seconds inside Launch and Collect (or Forward)
    std::optional<StepProfile> profile;
  };
  TimedBackend(std::unique_ptr<Backend> inner, const Clock::time_point* origin,
               std::vector<Span>* spans)
      : inner_(std::move(inner)), origin_(*origin), spans_(*spans) {}

  absl::Status Forward(std::span<const SequenceStep> steps, StepOutput& out) override {
    const double begin = Since(origin_);
    absl::Status status = inner_->Forward(steps, out);
    const double end = Since(origin_);
    spans_.push_back({begin, end, end - begin, inner_->LastStepProfile()});
    return status;
  }
  absl::StatusOr<bool> Launch(std::span<const SequenceStep> steps,
                              bool may_stay_in_flight) override {
    const double begin = Since(origin_);
    absl::StatusOr<bool> launched = inner_->Launch(steps, may_stay_in_flight);
    const double end = Since(origin_);
    if (launched.ok()) {
      launched_.push_back({begin, end, end - begin, std::nullopt});
    } else {
      spans_.push_back({begin, end, end - begin, std::nullopt});
    }
    return launched;
  }
  absl::Status Collect(StepOutput& out) override {
    const double begin = Since(origin_);
    absl::Status status = inner_->Collect(out);
    Span span = launched_.front();
    launched_.pop_front();
    span.end = Since(origin_);
    span.inside += span.end - begin;
    span.profile = inner_->LastStepProfile();
    spans_.push_back(span);
    return status;
  }
  absl::Status SupportsCompression(
      const memory::compress::CompressionConfig& compression) const override {
    return inner_->SupportsCompression(compression);
  }

 private:
  static double Since(Clock::time_point origin) {
    return std::chrono::duration<double>(Clock::now() - origin).count();
  }
  std::unique_ptr<Backend> inner_;
  const Clock::time_point& origin_;
  std::vector<Span>& spans_;
  std::deque<Span> launched_;  // not collected yet
};

struct Row {
  std::string spec;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;
  double decode_forward_seconds = 0.0;  // inside Launch + Collect, the steps after prefill_seconds
  int prefill_forwards = 0;             // the steps before it
  double prefill_forward_seconds = 0.0;
  double prefill_device_seconds = 0.0;  // their device spans (where profiled)
  int decode_forwards = 0;
  StepProfile profile;  // summed over the decode steps that have one
  int profiled = 0;
  int graph_steps = 0;        // of them, replayed from a CUDA graph
  int64_t kv_rows_bytes = 0;  // at the middle of the decode, all requests
  int64_t kv_stored_bytes = 0;
  int64_t kv_full_bytes = 0;
};

// Bytes a decode step reads of the weights: every matrix but the token embedding (a step reads
// only its rows), which the lm_head reads whole when tied.
int64_t WeightBytes(const ModelConfig& c, int element_bytes) {
  const int64_t q = static_cast<int64_t>(c.n_heads) * c.head_dim;
  const int64_t kv = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
  const int64_t per_layer = c.hidden * (q + 2 * kv) + q * c.hidden + 3LL * c.hidden * c.ffn_hidden;
  return (c.n_layers * per_layer + static_cast<int64_t>(c.vocab_size) * c.hidden) * element_bytes;
}

// "" when --prompt_tokens + --new_tokens fit the model's context, else the error: the scheduler
// ends a request at max_context tokens, so a longer one generates fewer tokens than asked (none
// for a prompt of the whole context) and the table's rates would divide by tokens never made.
std::string ContextProblem(const ModelConfig& c, const std::string& arch, int prompt_tokens,
                           int new_tokens) {
  if (static_cast<int64_t>(prompt_tokens) + new_tokens <= c.max_context) return "";
  std::string problem = absl::StrCat(
      "--prompt_tokens ", prompt_tokens, " + --new_tokens ", new_tokens, " = ",
      static_cast<int64_t>(prompt_tokens) + new_tokens, " tokens exceed the context of ",
      arch.empty() ? c.name : absl::StrCat("--arch ", arch), ", ", c.max_context, " tokens");
  if (arch == "llama3-8b") {
    absl::StrAppend(&problem, "; --arch llama3.1-8b is the same shape with a context of ",
                    DummyConfig("llama3.1-8b")->max_context);
  }
  return problem;
}

// "" when every request generated `new_tokens`, else how many fell short and why: their finish
// reasons and the first engine error.
std::string Shortfall(const std::vector<GenerationResult>& results, int new_tokens,
                      int max_context) {
  int short_requests = 0, fewest = new_tokens;
  std::map<std::string, int> reasons;
  std::string first_error;
  for (const GenerationResult& result : results) {
    if (result.finish.completion_tokens >= new_tokens) continue;
    ++short_requests;
    fewest = std::min(fewest, result.finish.completion_tokens);
    ++reasons[FinishReasonName(result.finish.reason)];
    if (first_error.empty()) first_error = result.finish.error;
  }
  if (short_requests == 0) return "";
  std::string shortfall =
      absl::StrCat(short_requests, " of ", results.size(), " requests generated fewer than ",
                   new_tokens, " tokens (fewest ", fewest,
                   "), by finish reason: ", absl::StrJoin(reasons, ", ", absl::PairFormatter(" ")));
  if (reasons.contains("length")) {
    absl::StrAppend(&shortfall, "; \"length\" before --new_tokens is the model's context of ",
                    max_context, " tokens, prompt included");
  }
  if (!first_error.empty()) absl::StrAppend(&shortfall, "; first error: ", first_error);
  return shortfall;
}

int Run() {
  ModelSource source{.load_format = absl::GetFlag(FLAGS_load_format),
                     .path = absl::GetFlag(FLAGS_model),
                     .arch = absl::GetFlag(FLAGS_arch)};
  absl::StatusOr<Model> model = LoadModel(source);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 2;
  }
  absl::StatusOr<BackendChoice> backend =
      ChooseBackend(absl::GetFlag(FLAGS_device), "serve_bench",
                    {.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs),
                     .sample_on_device = absl::GetFlag(FLAGS_sample_on_device),
                     .dependent_launch = absl::GetFlag(FLAGS_dependent_launch),
                     .small_gemm = absl::GetFlag(FLAGS_small_gemm),
                     .eviction_stream = absl::GetFlag(FLAGS_eviction_stream),
                     .dtype = absl::GetFlag(FLAGS_dtype)});
  if (!backend.ok()) {
    std::fprintf(stderr, "%s\n", std::string(backend.status().message()).c_str());
    return 2;
  }
  const int requests = absl::GetFlag(FLAGS_requests);
  const int prompt_tokens = absl::GetFlag(FLAGS_prompt_tokens);
  const int new_tokens = absl::GetFlag(FLAGS_new_tokens);
  const ModelConfig& c = model->config;
  if (const std::string problem =
          ContextProblem(c, absl::GetFlag(FLAGS_arch), prompt_tokens, new_tokens);
      !problem.empty()) {
    std::fprintf(stderr, "serve_bench: %s\n", problem.c_str());
    return 1;
  }
  // Every Forward's time, through a TimedBackend around the chosen one.
  Clock::time_point origin;
  std::vector<TimedBackend::Span> spans;
  Scheduler::BackendFactory make_timed =
      [&, make = backend->make_backend](
          const Model* m, memory::KvCache* cache) -> absl::StatusOr<std::unique_ptr<Backend>> {
    absl::StatusOr<std::unique_ptr<Backend>> inner =
        make ? make(m, cache)
             : absl::StatusOr<std::unique_ptr<Backend>>(CpuBackend::Create(m, cache));
    if (!inner.ok()) return inner.status();
    return std::make_unique<TimedBackend>(*std::move(inner), &origin, &spans);
  };
  GeneratorOptions options{
      .pool_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_pool_gib) * (1 << 30)),
      .page_bytes = static_cast<size_t>(absl::GetFlag(FLAGS_page_kib)) << 10,
      .step_tokens = absl::GetFlag(FLAGS_step_tokens),
      .max_running = requests,
      .make_backend = make_timed,
      .kv_element_bytes = backend->kv_element_bytes,
      .kv_storage = backend->kv_storage,
      .overlap = absl::GetFlag(FLAGS_overlap)};
  absl::StatusOr<std::unique_ptr<Generator>> generator = Generator::Create(&*model, options);
  if (!generator.ok()) {
    std::fprintf(stderr, "%s\n", std::string(generator.status().message()).c_str());
    return 2;
  }
  std::printf(
      "serve_bench: %s on %s (--dtype %s), %d requests x (%d prompt + %d new) tokens, pool %.1f "
      "GiB\n",
      c.name.c_str(), backend->name.c_str(), absl::GetFlag(FLAGS_dtype).c_str(), requests,
      prompt_tokens, new_tokens, absl::GetFlag(FLAGS_pool_gib));

  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> token(0, c.vocab_size - 1);
  std::vector<Row> rows;
  const std::vector<std::string> specs =
      absl::StrSplit(absl::GetFlag(FLAGS_specs), ';', absl::SkipWhitespace());
  const SamplingParams sampling{
      .temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature)),
      .top_k = absl::GetFlag(FLAGS_top_k),
      .top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p)),
      .repetition_penalty = static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty))};
  if (absl::Status s = ValidateSamplingParams(sampling); !s.ok()) {
    std::fprintf(stderr, "serve_bench: %s\n", std::string(s.message()).c_str());
    return 2;
  }
  for (const std::string& spec : specs) {
    absl::StatusOr<memory::compress::CompressionConfig> config =
        memory::compress::ParseCompressionSpec(spec == "none" ? "" : spec);
    if (!config.ok()) {
      std::fprintf(stderr, "%s: %s\n", spec.c_str(),
                   std::string(config.status().message()).c_str());
      return 2;
    }
    std::vector<GenerationRequest> batch(requests);
    for (size_t i = 0; i < batch.size(); ++i) {
      GenerationRequest& request = batch[i];
      request.prompt.resize(prompt_tokens);
      for (int32_t& id : request.prompt) id = token(rng);
      request.max_tokens = new_tokens;
      request.ignore_eos = true;
      request.compression = *config;
      request.sampling = sampling;
      request.sampling.seed = i + 1;
    }
    // Wall time of each request's first token and of the last token of all.
    std::vector<double> first(requests, -1.0);
    double last = 0.0;
    const Clock::time_point start = origin = Clock::now();
    spans.clear();
    absl::StatusOr<std::vector<GenerationResult>> results =
        (*generator)->Run(batch, [&](int index, const TokenOutput&) {
          const double now = std::chrono::duration<double>(Clock::now() - start).count();
          if (first[index] < 0.0) first[index] = now;
          last = now;
        });
    if (!results.ok()) {
      std::fprintf(stderr, "%s: %s\n", spec.c_str(),
                   std::string(results.status().message()).c_str());
      return 1;
    }
    if (const std::string shortfall = Shortfall(*results, new_tokens, c.max_context);
        !shortfall.empty()) {
      std::fprintf(stderr, "serve_bench: %s: %s\n", spec.c_str(), shortfall.c_str());
      return 1;
    }
    Row row;
    row.spec = spec;
    row.prefill_seconds = *std::max_element(first.begin(), first.end());
    row.decode_seconds = last - row.prefill_seconds;
    for (const TimedBackend::Span& span : spans) {
      if (span.begin < row.prefill_seconds) {
        ++row.prefill_forwards;
        row.prefill_forward_seconds += span.inside;
        if (span.profile) row.prefill_device_seconds += 1e-3 * span.profile->device_ms;
        continue;
      }
      row.decode_forward_seconds += span.inside;
      ++row.decode_forwards;
      if (!span.profile) continue;
      row.profile.plan_ms += span.profile->plan_ms;
      row.profile.queue_ms += span.profile->queue_ms;
      row.profile.wait_ms += span.profile->wait_ms;
      row.profile.finish_ms += span.profile->finish_ms;
      row.profile.device_ms += span.profile->device_ms;
      row.graph_steps += span.profile->graph ? 1 : 0;
      ++row.profiled;
    }
    const int64_t generated_row_bytes =
        2LL * c.n_layers * c.n_kv_heads * c.head_dim * backend->kv_element_bytes * (new_tokens / 2);
    for (const GenerationResult& result : *results) {
      row.kv_rows_bytes += result.finish.kv_bytes.rows - generated_row_bytes;
      row.kv_stored_bytes += result.finish.kv_bytes.stored;
      row.kv_full_bytes += result.finish.kv_bytes.full;
    }
    rows.push_back(row);
  }

  const double copy_gbs = absl::GetFlag(FLAGS_copy_gbs);
  const int64_t weight_bytes = WeightBytes(c, backend->kv_element_bytes);
  std::printf(
      "\n| spec | prefill tok/s | decode ms/step | forward ms | decode tok/s |"
      " KV stored / uncompressed | prefill x none |%s\n",
      copy_gbs > 0 ? " roofline ms/step | step / roofline |" : "");
  std::printf("|---|--:|--:|--:|--:|--:|--:|%s\n", copy_gbs > 0 ? "--:|--:|" : "");
  const int steps = std::max(1, new_tokens - 1);
  for (const Row& row : rows) {
    const double step_ms = 1e3 * row.decode_seconds / steps;
    std::printf("| %s | %.0f | %.2f | %.2f | %.0f | %.2f%% | %.2f |", row.spec.c_str(),
                static_cast<double>(requests) * prompt_tokens / row.prefill_seconds, step_ms,
                1e3 * row.decode_forward_seconds / std::max(1, row.decode_forwards),
                static_cast<double>(requests) * steps / row.decode_seconds,
                100.0 * row.kv_stored_bytes / std::max<int64_t>(1, row.kv_full_bytes),
                row.prefill_seconds / rows.front().prefill_seconds);
    if (copy_gbs > 0) {
      const double roofline_ms = 1e3 * (weight_bytes + row.kv_rows_bytes) / (copy_gbs * 1e9);
      std::printf(" %.2f | %.2f |", roofline_ms, step_ms / roofline_ms);
    }
    std::printf("\n");
  }
  if (std::any_of(rows.begin(), rows.end(), [](const Row& r) { return r.profiled > 0; })) {
    std::printf(
        "\nInside Forward, per decode step (ms): host plan | host queue | host wait | host finish"
        " | device span | steps replayed from a CUDA graph\n\n"
        "| spec | plan | queue | wait | finish | device | graph |\n"
        "|---|--:|--:|--:|--:|--:|--:|\n");
    for (const Row& row : rows) {
      const double n = std::max(1, row.profiled);
      std::printf("| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %d of %d |\n", row.spec.c_str(),
                  row.profile.plan_ms / n, row.profile.queue_ms / n, row.profile.wait_ms / n,
                  row.profile.finish_ms / n, row.profile.device_ms / n, row.graph_steps,
                  row.profiled);
    }
  }
  std::printf(
      "\nUntil every request has its first token (s): wall | steps | inside Forward | device "
      "span\n\n"
      "| spec | wall | steps | forward | device |\n|---|--:|--:|--:|--:|\n");
  for (const Row& row : rows) {
    std::printf("| %s | %.3f | %d | %.3f | %.3f |\n", row.spec.c_str(), row.prefill_seconds,
                row.prefill_forwards, row.prefill_forward_seconds, row.prefill_device_seconds);
  }
  std::printf("\nweights read per step: %.2f GB (%d-byte elements)\n", weight_bytes / 1e9,
              backend->kv_element_bytes);
  return 0;
}

}  // namespace
}  // namespace kvtrim::engine

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return kvtrim::engine::Run();
}
