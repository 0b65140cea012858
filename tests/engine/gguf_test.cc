// The GGUF parser: SmolLM2's real header, and small files built in memory, valid and corrupt.
#include "engine/loader/gguf.h"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "tests/engine/gguf_builder.h"
#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

using testing::GgufBuilder;

constexpr uint32_t kF32 = static_cast<uint32_t>(GgmlType::kF32);
constexpr uint32_t kQ8_0 = static_cast<uint32_t>(GgmlType::kQ8_0);
constexpr uint32_t kQ4_0 = static_cast<uint32_t>(GgmlType::kQ4_0);
constexpr uint32_t kArray = static_cast<uint32_t>(GgufValueType::kArray);

// Header (24 bytes), then the first key's length at offset 24.
constexpr size_t kTensorCountOffset = 8;
constexpr size_t kKvCountOffset = 16;
constexpr size_t kFirstKeyOffset = 24;

GgufBuilder SmallBuilder() {
  GgufBuilder b;
  b.String("general.architecture", "llama")
      .Uint32("llama.block_count", 2)
      .Float32("llama.rope.freq_base", 10000.0f)
      .Bool("tokenizer.ggml.add_bos_token", true)
      .Uint64("big", std::numeric_limits<uint64_t>::max())
      .StringArray("tokenizer.ggml.tokens", {"a", "", "bc"})
      .Int32Array("tokenizer.ggml.token_type", {1, 3, -2});
  b.F32Tensor("a", {4, 2}, {0, 1, 2, 3, 4, 5, 6, 7});
  std::string q8_block(34, '\0');
  q8_block[1] = 0x3C;  // d = 1
  q8_block[2] = 5;
  b.Tensor("b", {32}, kQ8_0, q8_block);
  b.F32Tensor("c", {3}, {-1, -2, -3});
  return b;
}

absl::StatusOr<GgufFile> ParseSmall(const std::string& bytes) {
  return GgufFile::Parse(bytes, "small.gguf");
}

template <typename T>
void Poke(std::string* bytes, size_t offset, T value) {
  std::memcpy(bytes->data() + offset, &value, sizeof(T));
}

// The parse fails and its message contains every one of `parts`.
void ExpectError(const std::string& bytes, const std::vector<std::string>& parts) {
  absl::StatusOr<GgufFile> file = ParseSmall(bytes);
  ASSERT_FALSE(file.ok());
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  const std::string message(file.status().message());
  EXPECT_EQ(message.rfind("small.gguf: ", 0), 0u) << message;
  for (const std::string& part : parts) {
    EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
  }
}

TEST(GgufTest, ParsesHeaderMetadataAndTensors) {
  const std::string bytes = SmallBuilder().Build();
  absl::StatusOr<GgufFile> file = ParseSmall(bytes);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->version(), 3u);
  EXPECT_EQ(file->alignment(), 32u);
  EXPECT_EQ(file->data_offset() % 32, 0u);
  ASSERT_EQ(file->keys().size(), 7u);
  EXPECT_EQ(file->keys()[0], "general.architecture");
  EXPECT_EQ(*file->GetString("general.architecture"), "llama");
  EXPECT_EQ(*file->GetInt("llama.block_count"), 2);
  EXPECT_EQ(*file->GetFloat("llama.rope.freq_base"), 10000.0);
  EXPECT_EQ(*file->GetFloat("llama.block_count"), 2.0);  // integers widen to floats
  EXPECT_TRUE(*file->GetBool("tokenizer.ggml.add_bos_token"));
  EXPECT_EQ(*file->GetStringArray("tokenizer.ggml.tokens"),
            (std::vector<std::string_view>{"a", "", "bc"}));
  EXPECT_EQ(*file->GetIntArray("tokenizer.ggml.token_type"), (std::vector<int64_t>{1, 3, -2}));

  ASSERT_EQ(file->tensors().size(), 3u);
  const GgufTensorInfo* a = file->FindTensor("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dims, (std::vector<int64_t>{4, 2}));
  EXPECT_EQ(a->n_elements, 8);
  EXPECT_EQ(a->n_bytes, 32u);
  float a5;
  std::memcpy(&a5, a->data.data() + 5 * sizeof(float), sizeof(float));
  EXPECT_EQ(a5, 5.0f);
  const GgufTensorInfo* b = file->FindTensor("b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->type, GgmlType::kQ8_0);
  EXPECT_EQ(b->offset, 32u);
  EXPECT_EQ(b->data.data(), file->bytes().data() + file->data_offset() + 32);
  EXPECT_EQ(file->FindTensor("nope"), nullptr);
}

TEST(GgufTest, GettersNameTheKeyAndTheTypeFound) {
  absl::StatusOr<GgufFile> file = ParseSmall(SmallBuilder().Build());
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<int64_t> missing = file->GetInt("llama.context_length");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("'llama.context_length' is missing"),
            std::string::npos);
  EXPECT_EQ(*file->GetInt("llama.context_length", 77), 77);
  EXPECT_EQ(*file->GetString("general.name", "dflt"), "dflt");

  absl::StatusOr<int64_t> wrong = file->GetInt("general.architecture");
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.status().message().find("metadata key 'general.architecture' at offset 56"),
            std::string::npos)
      << wrong.status();
  EXPECT_NE(wrong.status().message().find("expected an integer, found string"), std::string::npos);
  // A present key of the wrong type is an error even when a default is given.
  EXPECT_FALSE(file->GetInt("general.architecture", 1).ok());
  EXPECT_NE(file->GetInt("big").status().message().find("found uint64 18446744073709551615"),
            std::string::npos);
  EXPECT_NE(file->GetString("tokenizer.ggml.tokens").status().message().find("array of string"),
            std::string::npos);
  EXPECT_FALSE(file->GetIntArray("tokenizer.ggml.tokens").ok());
  EXPECT_FALSE(file->GetBool("llama.block_count").ok());
  EXPECT_EQ(*file->GetFloatArray("tokenizer.ggml.token_type"), (std::vector<double>{1, 3, -2}));
}

TEST(GgufTest, OpenMapsTheFile) {
  const std::string path = ::testing::TempDir() + "/gguf_test_small.gguf";
  const std::string bytes = SmallBuilder().Build();
  std::ofstream(path, std::ios::binary).write(bytes.data(), bytes.size());
  absl::StatusOr<GgufFile> file = GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->bytes(), bytes);
  EXPECT_EQ(file->name(), path);
  GgufFile moved = *std::move(file);
  EXPECT_EQ(*moved.GetString("general.architecture"), "llama");

  absl::StatusOr<GgufFile> missing = GgufFile::Open(path + ".missing");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find(".missing"), std::string::npos);
}

TEST(GgufTest, EveryTruncationIsAnErrorWithAnOffset) {
  const std::string bytes = SmallBuilder().Build();
  for (size_t size = 0; size < bytes.size(); ++size) {
    absl::StatusOr<GgufFile> file = ParseSmall(bytes.substr(0, size));
    ASSERT_FALSE(file.ok()) << "prefix of " << size << " bytes parsed";
    const std::string message(file.status().message());
    EXPECT_EQ(message.rfind("small.gguf: ", 0), 0u) << message;
    EXPECT_NE(message.find(" at offset "), std::string::npos) << message;
  }
  ExpectError(bytes.substr(0, 10), {"header at offset 8", "file ends inside the tensor count"});
  ExpectError(bytes.substr(0, bytes.size() - 1),
              {"tensor 'c' at offset", "data extends past end of file"});
}

TEST(GgufTest, RejectsBadMagicAndVersion) {
  std::string bytes = SmallBuilder().Build();
  bytes[3] = 'X';
  ExpectError(bytes, {"header at offset 0", "bad magic 'GGUX'"});
  ExpectError(SmallBuilder().Version(1).Build(), {"offset 4", "unsupported version 1"});
  ExpectError(SmallBuilder().Version(0x03000000).Build(), {"big-endian"});
  EXPECT_TRUE(ParseSmall(SmallBuilder().Version(2).Build()).ok());
}

TEST(GgufTest, RejectsCountsAndLengthsLargerThanTheFile) {
  std::string bytes = SmallBuilder().Build();
  Poke<uint64_t>(&bytes, kFirstKeyOffset, uint64_t{1} << 62);
  ExpectError(bytes, {"metadata key #0 at offset 24", "key length 4611686018427387904 exceeds"});

  bytes = SmallBuilder().Build();
  Poke<uint64_t>(&bytes, kTensorCountOffset, uint64_t{1} << 40);
  ExpectError(bytes, {"offset 8", "tensor count 1099511627776 cannot fit"});

  bytes = SmallBuilder().Build();
  Poke<uint64_t>(&bytes, kKvCountOffset, ~uint64_t{0});
  ExpectError(bytes, {"offset 16", "metadata count"});

  const std::string huge_array = GgufBuilder::Pod<uint32_t>(kF32) + GgufBuilder::Pod(~uint64_t{0});
  ExpectError(GgufBuilder().RawValue("arr", kArray, huge_array).Build(),
              {"metadata key 'arr'", "cannot fit"});
  const std::string huge_string = GgufBuilder::Pod<uint64_t>(1000) + "abc";
  ExpectError(GgufBuilder().RawValue("s", 8, huge_string).Build(),
              {"metadata key 's' at offset 37", "string value length 1000 exceeds"});
}

TEST(GgufTest, RejectsBadValues) {
  ExpectError(GgufBuilder().RawValue("k", 77, "").Build(),
              {"metadata key 'k' at offset", "unknown value type 77"});
  const std::string nested = GgufBuilder::Pod(kArray) + GgufBuilder::Pod<uint64_t>(1);
  ExpectError(GgufBuilder().RawValue("n", kArray, nested).Build(), {"arrays of arrays"});
  ExpectError(GgufBuilder().RawValue("flag", 7, std::string(1, '\2')).Build(),
              {"bool value 2 is not 0 or 1"});
  ExpectError(GgufBuilder().Uint32("k", 1).Uint32("k", 2).Build(), {"'k'", "duplicate key"});
  ExpectError(GgufBuilder().RawValue("", 4, GgufBuilder::Pod<uint32_t>(1)).Build(), {"empty key"});
  ExpectError(GgufBuilder().Uint32("general.alignment", 48).Build(), {"power of two"});
  ExpectError(GgufBuilder().String("general.alignment", "32").Build(), {"power of two"});
}

TEST(GgufTest, RejectsBadTensorInfos) {
  const std::string f32x4(16, '\0');
  ExpectError(GgufBuilder().Tensor("t", {4}, 99, f32x4).Build(),
              {"tensor 't' at offset", "unknown ggml type 99"});
  ExpectError(GgufBuilder().Tensor("t", {1, 1, 1, 1, 4}, kF32, f32x4).Build(),
              {"tensor 't'", "n_dims 5 exceeds 4"});
  ExpectError(GgufBuilder().Tensor("t", {uint64_t{1} << 32, uint64_t{1} << 32}, kF32, "").Build(),
              {"tensor 't'", "element count overflows"});
  ExpectError(GgufBuilder().Tensor("t", {~uint64_t{0}}, kF32, "").Build(), {"exceeds int64"});
  // 4 * (2^62 + 256) bytes wraps around to 1024 in 64 bits.
  ExpectError(GgufBuilder().Tensor("t", {(uint64_t{1} << 62) + 256}, kF32, "").Build(),
              {"tensor 't'", "F32 values take more bytes than the file has"});
  ExpectError(GgufBuilder().Tensor("t", {33}, kQ4_0, std::string(18, '\0')).Build(),
              {"row of 33 values is not a whole number of Q4_0 blocks of 32"});
  ExpectError(GgufBuilder().Tensor("t", {4}, kF32, f32x4).Tensor("t", {4}, kF32, f32x4).Build(),
              {"duplicate tensor name"});
}

TEST(GgufTest, RejectsBadTensorPlacement) {
  const std::string f32x4(16, '\0');
  ExpectError(GgufBuilder().Tensor("t", {4}, kF32, f32x4, 8).Build(),
              {"tensor 't'", "data offset 8 is not a multiple of the alignment 32"});
  ExpectError(GgufBuilder().Tensor("t", {4}, kF32, f32x4).Tensor("u", {8}, kF32, f32x4).Build(),
              {"tensor 'u' at offset", "data extends past end of file (32 bytes needed, 16 left)"});
  ExpectError(GgufBuilder().Tensor("t", {4}, kF32, f32x4).Tensor("u", {4}, kF32, "", 4096).Build(),
              {"tensor 'u'", "data starts past end of file"});
  ExpectError(GgufBuilder()
                  .Tensor("t", {8}, kF32, std::string(32, '\0'), 0)
                  .Tensor("u", {4}, kF32, f32x4, 0)
                  .Build(),
              {"data overlaps tensor"});
  // Alignment other than 32 moves the data section and the tensor offsets with it.
  absl::StatusOr<GgufFile> aligned =
      ParseSmall(GgufBuilder().Alignment(256).Tensor("t", {4}, kF32, f32x4).Build());
  ASSERT_TRUE(aligned.ok()) << aligned.status();
  EXPECT_EQ(aligned->alignment(), 256u);
  EXPECT_EQ(aligned->data_offset(), 256u);
}

TEST(GgufTest, EmptyTensorsNeedNoDataSection) {
  // The header and one zero-element tensor's info end at byte 57; the data section would start
  // at 64. A file cut inside that padding has no data section at all, and the empty tensor needs
  // none: it parses, its data an empty view inside the file.
  const std::string full = GgufBuilder().Tensor("e", {0}, kF32, "").Build();
  ASSERT_EQ(full.size(), 64u);
  for (const size_t size : {size_t{57}, size_t{60}, size_t{64}}) {
    const std::string bytes = full.substr(0, size);
    absl::StatusOr<GgufFile> file = ParseSmall(bytes);
    ASSERT_TRUE(file.ok()) << size << ": " << file.status();
    ASSERT_EQ(file->tensors().size(), 1u);
    const GgufTensorInfo& e = file->tensors()[0];
    EXPECT_EQ(e.n_elements, 0);
    EXPECT_TRUE(e.data.empty());
    EXPECT_GE(e.data.data(), file->bytes().data());
    EXPECT_LE(e.data.data(), file->bytes().data() + file->bytes().size());
  }
  // A tensor with bytes in such a file is still refused.
  const std::string with_data = GgufBuilder().Tensor("t", {4}, kF32, std::string(16, '\0')).Build();
  ExpectError(with_data.substr(0, 60), {"tensor 't'", "more bytes than the file has"});
}

TEST(GgufTest, CorruptBytesNeverEscapeTheBuffer) {
  // Not a fuzzer, a deterministic sweep: every byte of the header and metadata set to a few
  // values; whatever parses must keep every view inside the file.
  const std::string original = SmallBuilder().Build();
  for (size_t i = 0; i < original.size(); ++i) {
    for (int value : {0x00, 0x01, 0x7F, 0x80, 0xFF}) {
      std::string bytes = original;
      bytes[i] = static_cast<char>(value);
      absl::StatusOr<GgufFile> file = ParseSmall(bytes);
      if (!file.ok()) continue;
      const char* begin = file->bytes().data();
      const char* end = begin + file->bytes().size();
      for (const GgufTensorInfo& t : file->tensors()) {
        ASSERT_GE(t.data.data(), begin);
        ASSERT_LE(t.data.data() + t.data.size(), end);
      }
    }
  }
}

TEST(GgufTest, SmolLm2Header) {
  absl::StatusOr<GgufFile> file = GgufFile::Open(testing::SmolLm2Path());
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->version(), 3u);
  EXPECT_EQ(file->keys().size(), 33u);
  EXPECT_EQ(file->tensors().size(), 272u);
  EXPECT_EQ(*file->GetString("general.architecture"), "llama");
  EXPECT_EQ(*file->GetString("general.name"), "Smollm2 135M 8k Lc100K Mix1 Ep2");
  EXPECT_EQ(*file->GetInt("llama.block_count"), 30);
  EXPECT_EQ(*file->GetInt("llama.context_length"), 8192);
  EXPECT_EQ(*file->GetInt("llama.embedding_length"), 576);
  EXPECT_EQ(*file->GetInt("llama.feed_forward_length"), 1536);
  EXPECT_EQ(*file->GetInt("llama.attention.head_count"), 9);
  EXPECT_EQ(*file->GetInt("llama.attention.head_count_kv"), 3);
  EXPECT_EQ(*file->GetInt("llama.rope.dimension_count"), 64);
  EXPECT_EQ(*file->GetInt("llama.vocab_size"), 49152);
  EXPECT_FLOAT_EQ(*file->GetFloat("llama.rope.freq_base"), 100000.0f);
  EXPECT_FLOAT_EQ(*file->GetFloat("llama.attention.layer_norm_rms_epsilon"), 1e-5f);
  EXPECT_EQ(*file->GetString("tokenizer.ggml.pre"), "smollm");
  EXPECT_EQ(file->GetStringArray("tokenizer.ggml.tokens")->size(), 49152u);
  EXPECT_EQ(file->GetStringArray("tokenizer.ggml.merges")->size(), 48900u);

  const GgufTensorInfo* embedding = file->FindTensor("token_embd.weight");
  ASSERT_NE(embedding, nullptr);
  EXPECT_EQ(embedding->dims, (std::vector<int64_t>{576, 49152}));
  EXPECT_EQ(embedding->type, GgmlType::kQ8_0);
  EXPECT_EQ(embedding->n_bytes, 49152u * 576 / 32 * 34);
  EXPECT_EQ(file->data_offset() + embedding->offset, 1785664u);  // as gguf-py reports it
  const GgufTensorInfo* k = file->FindTensor("blk.0.attn_k.weight");
  ASSERT_NE(k, nullptr);
  EXPECT_EQ(k->dims, (std::vector<int64_t>{576, 192}));
  EXPECT_EQ(k->type, GgmlType::kQ4_1);
  EXPECT_EQ(file->data_offset() + k->offset, 33530176u);
  EXPECT_EQ(file->FindTensor("output.weight"), nullptr);
}

}  // namespace
}  // namespace kvtrim::engine
