// kvtrim: the command-line tool.
//
//   kvtrim generate --model PATH (--prompt TEXT | --chat TEXT) [--max-tokens N]
//                   [--temperature T] [--top-p P] [--top-k K] [--min-p P]
//                   [--repetition-penalty R] [--seed S] [--ignore-eos]
//
// `generate` loads the model (a GGUF file or a Hugging Face directory), runs the CPU reference
// engine in-process and streams the generated text to stdout; a summary goes to stderr.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/detokenizer.h"
#include "engine/tokenizer/tokenizer.h"

ABSL_FLAG(std::string, model, "", "model: a GGUF file or a Hugging Face model directory");
ABSL_FLAG(std::string, prompt, "", "raw prompt text, tokenized as is");
ABSL_FLAG(std::string, chat, "", "a user message, rendered with the model's chat template");
ABSL_FLAG(int, max_tokens, 256, "most tokens to generate");
ABSL_FLAG(double, temperature, 0.0, "sampling temperature; 0 = greedy");
ABSL_FLAG(double, top_p, 1.0, "nucleus sampling mass; 1 = off");
ABSL_FLAG(int, top_k, 0, "keep the k most likely tokens; 0 = off");
ABSL_FLAG(double, min_p, 0.0, "drop tokens below min_p times the top probability; 0 = off");
ABSL_FLAG(double, repetition_penalty, 1.0, "penalty on tokens already seen; 1 = off");
ABSL_FLAG(uint64_t, seed, 0, "sampling seed: the same seed gives the same text");
ABSL_FLAG(bool, ignore_eos, false, "keep generating past the end-of-sequence token");
ABSL_FLAG(int64_t, kv_pool_mib, 1024, "KV cache pool size in MiB");

namespace kvtrim {
namespace {

using Clock = std::chrono::steady_clock;

absl::StatusOr<std::vector<int32_t>> PromptIds(const engine::Model& model,
                                               const engine::Tokenizer& tokenizer) {
  const std::string prompt = absl::GetFlag(FLAGS_prompt);
  const std::string chat = absl::GetFlag(FLAGS_chat);
  if (prompt.empty() == chat.empty()) {
    return absl::InvalidArgumentError("give exactly one of --prompt and --chat");
  }
  if (!prompt.empty()) return tokenizer.Encode(prompt, tokenizer.add_bos_by_default());
  absl::StatusOr<engine::ChatTemplate> chat_template =
      engine::ChatTemplate::FromSpec(model.tokenizer);
  if (!chat_template.ok()) return chat_template.status();
  const engine::ChatMessage message{"user", chat};
  // The rendered text carries the template's own BOS where it wants one.
  return tokenizer.Encode(chat_template->Render({&message, 1}, /*add_generation_prompt=*/true));
}

absl::Status Generate() {
  const std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) return absl::InvalidArgumentError("--model is required");
  absl::StatusOr<engine::Model> model = engine::LoadModel(path);
  if (!model.ok()) return model.status();
  absl::StatusOr<engine::Tokenizer> tokenizer = engine::Tokenizer::Create(model->tokenizer);
  if (!tokenizer.ok()) return tokenizer.status();
  absl::StatusOr<std::vector<int32_t>> prompt = PromptIds(*model, *tokenizer);
  if (!prompt.ok()) return prompt.status();
  if (prompt->empty()) return absl::InvalidArgumentError("the prompt has no tokens");

  engine::GenerationRequest request;
  request.prompt = *std::move(prompt);
  request.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  if (request.max_tokens < 0) return absl::InvalidArgumentError("--max-tokens is negative");
  request.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  request.sampling.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  request.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  request.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  request.sampling.min_p = static_cast<float>(absl::GetFlag(FLAGS_min_p));
  request.sampling.repetition_penalty = static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty));
  request.sampling.seed = absl::GetFlag(FLAGS_seed);

  const int64_t pool_mib = absl::GetFlag(FLAGS_kv_pool_mib);
  if (pool_mib <= 0) return absl::InvalidArgumentError("--kv-pool-mib must be positive");
  absl::StatusOr<std::unique_ptr<engine::Generator>> generator =
      engine::Generator::Create(&*model, {.pool_bytes = static_cast<size_t>(pool_mib) << 20});
  if (!generator.ok()) return generator.status();

  engine::Detokenizer detokenizer(&*tokenizer, /*skip_special=*/true);
  const Clock::time_point start = Clock::now();
  Clock::time_point first_token;
  absl::StatusOr<std::vector<engine::GenerationResult>> results =
      (*generator)->Run({&request, 1}, [&](int, int32_t id) {
        if (first_token == Clock::time_point{}) first_token = Clock::now();
        const std::string text = detokenizer.Add(id);
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
      });
  if (!results.ok()) return results.status();
  const std::string tail = detokenizer.Finish();
  std::fwrite(tail.data(), 1, tail.size(), stdout);
  std::fputc('\n', stdout);

  const engine::GenerationResult& result = results->front();
  const double total = std::chrono::duration<double>(Clock::now() - start).count();
  const double prefill = std::chrono::duration<double>(first_token - start).count();
  const char* reason = result.finish_reason == engine::FinishReason::kEos    ? "eos"
                       : result.finish_reason == engine::FinishReason::kStop ? "stop"
                                                                             : "length";
  std::fprintf(stderr,
               "[%zu prompt tokens in %.2f s, %zu generated in %.2f s (%.1f tokens/s), finish: "
               "%s, KV cache %.2f MiB]\n",
               request.prompt.size(), prefill, result.tokens.size(), total - prefill,
               result.tokens.size() > 1 ? (result.tokens.size() - 1) / (total - prefill) : 0.0,
               reason, result.kv_bytes.pages / 1048576.0);
  return absl::OkStatus();
}

// Lets flags be spelled with dashes (--max-tokens) as well as abseil's underscores: an argument
// "--a-b[=v]" becomes "--a_b[=v]" when a_b is a defined flag, so values are never rewritten.
std::vector<std::string> DashedFlagsToUnderscores(int argc, char** argv) {
  std::vector<std::string> args(argv, argv + argc);
  for (std::string& arg : args) {
    if (!arg.starts_with("--")) continue;
    const size_t end = std::min(arg.find('='), arg.size());
    std::string name = arg.substr(2, end - 2);
    std::replace(name.begin(), name.end(), '-', '_');
    const bool negated = name.starts_with("no") && absl::FindCommandLineFlag(name.substr(2));
    if (absl::FindCommandLineFlag(name) || negated) arg = "--" + name + arg.substr(end);
  }
  return args;
}

}  // namespace
}  // namespace kvtrim

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvtrim generate --model PATH (--prompt TEXT | --chat TEXT) [--max-tokens N] "
      "[--temperature T] [--top-p P] [--seed S]");
  std::vector<std::string> spelled = kvtrim::DashedFlagsToUnderscores(argc, argv);
  std::vector<char*> argv_spelled;
  for (std::string& arg : spelled) argv_spelled.push_back(arg.data());
  std::vector<char*> args =
      absl::ParseCommandLine(static_cast<int>(argv_spelled.size()), argv_spelled.data());
  if (args.size() != 2 || std::string(args[1]) != "generate") {
    std::fprintf(stderr, "usage: %s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  if (absl::Status status = kvtrim::Generate(); !status.ok()) {
    std::fprintf(stderr, "kvtrim: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
