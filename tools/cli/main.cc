// kvtrim: the command-line tool.
//
//   kvtrim generate (--model PATH [--load-format auto|gguf|hf] | --load-format dummy --arch NAME)
//                   [--device cuda|cpu|auto]
//                   (--prompt TEXT | --chat TEXT) [--max-tokens N] [--temperature T]
//                   [--top-p P] [--top-k K] [--min-p P] [--repetition-penalty R] [--seed S]
//                   [--ignore-eos] [--compression SPEC]
//   kvtrim generate --server HOST:PORT (--prompt TEXT | --chat TEXT) [sampling flags as above]
//   kvtrim tokenize --server HOST:PORT (--prompt TEXT | --chat TEXT)
//   kvtrim info     --server HOST:PORT
//   kvtrim health   --server HOST:PORT
//
// With --model, `generate` loads the model (a GGUF file or a Hugging Face directory), runs the
// engine in-process (on the GPU when --device allows it and one is visible, else on the CPU)
// and streams the text to stdout; with --server it asks a running kvtrim-server. With
// --load-format dummy --arch NAME (llama3-8b, llama3.1-8b, mistral-7b, smollm2-135m) the in-process
// model is that shape with random weights and a byte tokenizer (engine/dummy_model.h): meaningless
// text at the real model's cost, for benchmarks. A summary goes to stderr, with the KV cache's
// saved ratio, bytes and tokens kept per layer. --compression takes a spec as kvtrim-server
// --kv-compression does ("policy=snapkv,budget_ratio=0.25"); unset, an in-process generation is
// uncompressed and a server applies its default. Exit code 0 on success, 1 on an error, 2 on
// misuse.
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/usage.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "engine/backend_choice.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/model_source.h"
#include "engine/request.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "memory/compress/compression.h"
#include "server/flag_spelling.h"
#include "tools/cli/client.h"

ABSL_FLAG(std::string, model, "", "model: a GGUF file or a Hugging Face model directory");
ABSL_FLAG(std::string, load_format, "auto",
          "how --model is read: auto (a file is GGUF, a directory Hugging Face), gguf, hf; or "
          "dummy: no --model, random weights in the shape --arch names (for benchmarks)");
ABSL_FLAG(std::string, arch, "",
          "with --load-format dummy: llama3-8b, llama3.1-8b, mistral-7b or smollm2-135m");
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
ABSL_FLAG(std::string, compression, "",
          "KV compression spec, e.g. \"policy=pyramidkv,budget_ratio=0.12,think.lambda=0.5\" or "
          "\"none\"; unset = uncompressed in-process, the server's default with --server");
ABSL_FLAG(int64_t, kv_pool_mib, 1024,
          "KV cache pool size in MiB (in-process); 0 = on cuda, what --gpu-memory-utilization "
          "leaves after the weights and step buffers; on cpu, 1024");
ABSL_FLAG(double, gpu_memory_utilization, 0.9,
          "with --kv-pool-mib 0 on cuda: the share of the GPU's memory the process may hold");
ABSL_FLAG(std::string, device, "auto",
          "in-process engine backend: cuda, cpu, or auto (cuda when this binary has CUDA and a "
          "GPU is visible)");
ABSL_FLAG(
    std::string, dtype, "auto",
    "on cuda, the 16-bit type of the weights and of the activations the GEMMs read and write: "
    "auto (the model's own: float16 where its config.json or GGUF says so, else bfloat16), "
    "bfloat16 or float16; the CPU engine computes in fp32 either way");
ABSL_FLAG(std::string, server, "", "HOST:PORT of a kvtrim-server (client mode)");
ABSL_FLAG(std::string, api_key, "",
          "API key sent as \"authorization: Bearer <key>\"; KVTRIM_API_KEY when unset");
ABSL_FLAG(std::string, tls_ca, "", "PEM file of the CA that signed the server's certificate");
ABSL_FLAG(double, timeout, 0, "client mode: seconds before a call is abandoned; 0 = none");

namespace kvtrim {
namespace {

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

// --compression, parsed; nullopt when unset.
absl::StatusOr<std::optional<memory::compress::CompressionConfig>> CompressionFlag() {
  const std::string spec = absl::GetFlag(FLAGS_compression);
  if (spec.empty()) return std::nullopt;
  absl::StatusOr<memory::compress::CompressionConfig> config =
      memory::compress::ParseCompressionSpec(spec);
  if (!config.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--compression: ", std::string(config.status().message())));
  }
  return std::optional(*std::move(config));
}

engine::ModelSource Source() {
  return {.load_format = absl::GetFlag(FLAGS_load_format),
          .path = absl::GetFlag(FLAGS_model),
          .arch = absl::GetFlag(FLAGS_arch)};
}

absl::Status Generate() {
  absl::StatusOr<std::optional<memory::compress::CompressionConfig>> compression =
      CompressionFlag();
  if (!compression.ok()) return compression.status();
  absl::StatusOr<engine::Model> model = engine::LoadModel(Source());
  if (!model.ok()) return model.status();
  const int64_t pool_mib = absl::GetFlag(FLAGS_kv_pool_mib);  // >= 0 (Dispatch)
  absl::StatusOr<engine::BackendChoice> backend = engine::ChooseBackend(
      absl::GetFlag(FLAGS_device), "kvtrim", {.dtype = absl::GetFlag(FLAGS_dtype)});
  if (!backend.ok()) return backend.status();
  absl::StatusOr<engine::KvPoolSize> pool =
      engine::ResolveKvPool(*backend, *model, static_cast<size_t>(pool_mib) << 20,
                            /*page_bytes=*/0, absl::GetFlag(FLAGS_gpu_memory_utilization));
  if (!pool.ok()) return pool.status();
  engine::GeneratorOptions options{.pool_bytes = pool->bytes};
  options.make_backend = backend->make_backend;
  options.kv_element_bytes = backend->kv_element_bytes;
  options.kv_storage = backend->kv_storage;
  options.step_tokens = backend->step_tokens;
  absl::StatusOr<std::unique_ptr<engine::Generator>> generator =
      engine::Generator::Create(&*model, options);
  if (!generator.ok()) return generator.status();
  absl::StatusOr<std::vector<int32_t>> prompt = PromptIds(*model, (*generator)->tokenizer());
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
  if (*compression) request.compression = **compression;

  // The engine detokenizes: each streamed token carries its text, the finish the held-back tail.
  absl::StatusOr<std::vector<engine::GenerationResult>> results =
      (*generator)->Run({&request, 1}, [&](int, const engine::TokenOutput& token) {
        std::fwrite(token.text.data(), 1, token.text.size(), stdout);
        std::fflush(stdout);
      });
  if (!results.ok()) return results.status();
  const engine::Finish& finish = results->front().finish;
  std::fwrite(finish.text.data(), 1, finish.text.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);  // the text before the summary on stderr

  const double prefill = finish.timings.first_token_seconds;
  const double decode = finish.timings.total_seconds - prefill;
  std::fprintf(stderr,
               "[%d prompt tokens in %.2f s, %d generated in %.2f s (%.1f tokens/s), finish: "
               "%s, KV cache %.2f MiB, %s]\n",
               finish.prompt_tokens, prefill, finish.completion_tokens, decode,
               finish.completion_tokens > 1 ? (finish.completion_tokens - 1) / decode : 0.0,
               engine::FinishReasonName(finish.reason), finish.kv_bytes.pages / 1048576.0,
               backend->name.c_str());
  std::fprintf(
      stderr, "[%s]\n",
      cli::FormatKvReport(finish.kv_bytes, finish.kv_layout, request.compression.Spec()).c_str());
  return absl::OkStatus();
}

cli::ClientOptions Client() {
  cli::ClientOptions client;
  client.server = absl::GetFlag(FLAGS_server);
  client.api_key = absl::GetFlag(FLAGS_api_key);
  if (client.api_key.empty()) {
    if (const char* env = std::getenv("KVTRIM_API_KEY")) client.api_key = env;
  }
  client.tls_ca = absl::GetFlag(FLAGS_tls_ca);
  client.timeout_seconds = absl::GetFlag(FLAGS_timeout);
  return client;
}

absl::Status RemoteGenerate() {
  cli::GenerateOptions options;
  options.prompt = absl::GetFlag(FLAGS_prompt);
  options.chat = absl::GetFlag(FLAGS_chat);
  if (options.prompt.empty() == options.chat.empty()) {
    return absl::InvalidArgumentError("give exactly one of --prompt and --chat");
  }
  options.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  options.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  options.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  options.top_k = absl::GetFlag(FLAGS_top_k);
  options.min_p = static_cast<float>(absl::GetFlag(FLAGS_min_p));
  options.repetition_penalty = static_cast<float>(absl::GetFlag(FLAGS_repetition_penalty));
  options.seed = absl::GetFlag(FLAGS_seed);
  options.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  absl::StatusOr<std::optional<memory::compress::CompressionConfig>> compression =
      CompressionFlag();
  if (!compression.ok()) return compression.status();
  options.compression = *std::move(compression);
  return cli::ClientGenerate(Client(), options);
}

// Runs one command; 2 for misuse.
int Dispatch(const std::string& command) {
  const bool remote = !absl::GetFlag(FLAGS_server).empty();
  if (remote == Source().given() && command == "generate") {
    std::fprintf(stderr,
                 "kvtrim generate: give exactly one of --model (or --load-format dummy) and "
                 "--server\n");
    return 2;
  }
  if (command == "generate" && !remote) {
    if (const absl::Status s = engine::ValidateModelSource(Source()); !s.ok()) {
      std::fprintf(stderr, "kvtrim generate: %s\n", std::string(s.message()).c_str());
      return 2;
    }
    if (const auto dtype = engine::ParseDtype(absl::GetFlag(FLAGS_dtype)); !dtype.ok()) {
      std::fprintf(stderr, "kvtrim generate: %s\n", std::string(dtype.status().message()).c_str());
      return 2;
    }
    if (absl::GetFlag(FLAGS_kv_pool_mib) < 0) {
      std::fprintf(stderr,
                   "kvtrim generate: --kv-pool-mib must be 0 (sized to the device) or a size\n");
      return 2;
    }
    if (const double u = absl::GetFlag(FLAGS_gpu_memory_utilization); !(u > 0.0 && u <= 1.0)) {
      std::fprintf(stderr, "kvtrim generate: --gpu-memory-utilization must be in (0, 1], got %g\n",
                   u);
      return 2;
    }
  }
  if (!remote && command != "generate") {
    std::fprintf(stderr, "kvtrim %s: --server is required\n", command.c_str());
    return 2;
  }
  absl::Status status;
  if (command == "generate") {
    status = remote ? RemoteGenerate() : Generate();
  } else if (command == "tokenize") {
    status = cli::ClientTokenize(Client(), absl::GetFlag(FLAGS_prompt), absl::GetFlag(FLAGS_chat));
  } else if (command == "info") {
    status = cli::ClientInfo(Client());
  } else if (command == "health") {
    status = cli::ClientHealth(Client());
  } else {
    std::fprintf(stderr, "kvtrim: unknown command \"%s\"\n%s\n", command.c_str(),
                 absl::ProgramUsageMessage().data());
    return 2;
  }
  if (!status.ok()) {
    std::fprintf(stderr, "kvtrim: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace kvtrim

int main(int argc, char** argv) {
  // --help lists this binary's own flags (those defined in this file), with their defaults.
  const std::vector<std::string> args = kvtrim::ParseFlags(
      argc, argv, "tools/cli/main.cc",
      "kvtrim generate (--model PATH | --load-format dummy --arch NAME | --server HOST:PORT) "
      "[--device cuda|cpu|auto] [--dtype auto|bfloat16|float16] "
      "(--prompt TEXT | --chat TEXT) "
      "[--max-tokens N] [--temperature T] [--top-p P] [--seed S] [--compression SPEC]\n"
      "       kvtrim tokenize|info|health --server HOST:PORT");
  if (args.size() != 2) {
    std::fprintf(stderr, "usage: %s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  return kvtrim::Dispatch(args[1]);
}
