#include "engine/loader/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

using ::testing::HasSubstr;

// A .safetensors file: u64 little-endian header length, the header, the data.
std::string MakeFile(const std::string& header, const std::string& data = "") {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return bytes + header + data;
}

std::string U16s(const std::vector<uint16_t>& values) {
  std::string out;
  for (uint16_t v : values) {
    out.push_back(static_cast<char>(v & 0xff));
    out.push_back(static_cast<char>(v >> 8));
  }
  return out;
}

std::string F32s(const std::vector<float>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
}

// Three tensors, one per readable dtype, and metadata.
std::string ThreeDtypes() {
  const std::string header = R"({"__metadata__":{"format":"pt"},)"
                             R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
                             R"("b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]},)"
                             R"("c":{"dtype":"BF16","shape":[2],"data_offsets":[24,28]}}   )";
  return MakeFile(header, F32s({1.0f, 2.0f, 3.0f, -4.5f}) + U16s({0x3C00, 0xC000, 0x3800, 0x0001}) +
                              U16s({0x3F80, 0xC040}));
}

TEST(SafetensorsTest, ParsesAndConvertsF32F16Bf16) {
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(ThreeDtypes(), "t.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ(file->tensors().size(), 3u);
  EXPECT_EQ(file->metadata().at("format"), "pt");
  const SafetensorsTensor* a = file->Find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(a->dtype, "F32");
  EXPECT_EQ(file->Find("missing"), nullptr);

  EXPECT_EQ(*file->ReadFloat32(*a), (std::vector<float>{1.0f, 2.0f, 3.0f, -4.5f}));
  // F16: 1, -2, 0.5 and the smallest subnormal 2^-24.
  EXPECT_EQ(*file->ReadFloat32(*file->Find("b")),
            (std::vector<float>{1.0f, -2.0f, 0.5f, std::ldexp(1.0f, -24)}));
  EXPECT_EQ(*file->ReadFloat32(*file->Find("c")), (std::vector<float>{1.0f, -3.0f}));
}

TEST(SafetensorsTest, OpenFromDiskMatchesParse) {
  const std::string path = ::testing::TempDir() + "/three.safetensors";
  std::ofstream(path, std::ios::binary) << ThreeDtypes();
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->name(), path);
  EXPECT_EQ(*file->ReadFloat32(*file->Find("c")), (std::vector<float>{1.0f, -3.0f}));
  EXPECT_EQ(*file->ReadFloat32(*file->Find("a")), (std::vector<float>{1.0f, 2.0f, 3.0f, -4.5f}));
}

TEST(SafetensorsTest, OtherDtypesParseButDoNotConvert) {
  const std::string bytes =
      MakeFile(R"({"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})", std::string(16, 0));
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(bytes, "t.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  absl::StatusOr<std::vector<float>> values = file->ReadFloat32(*file->Find("ids"));
  EXPECT_EQ(values.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(values.status().message()),
              HasSubstr("t.safetensors: tensor 'ids' has dtype I64"));
}

struct CorruptCase {
  std::string label;
  std::string bytes;
  std::string message;  // part of the error, which also names the file
};

std::string Entry(const std::string& fields) { return R"({"w":{)" + fields + "}}"; }

std::vector<CorruptCase> CorruptCases() {
  const std::string f32x3 = R"("dtype":"F32","shape":[3],)";
  return {
      {"empty", "", "file is 0 bytes, shorter than the 8-byte header length"},
      {"length prefix only", std::string("\x05\0\0\0\0\0\0", 7), "shorter than the 8-byte"},
      {"header past end", MakeFile("{}").substr(0, 8) + "{", "header length 2 runs past the end"},
      {"absurd header length", std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) + "{}",
       "exceeds the 100000000-byte limit"},
      {"not json", MakeFile("{\"w\":"), "header is not valid JSON"},
      {"json array", MakeFile("[1,2]"), "header is not a JSON object"},
      {"entry not object", MakeFile(R"({"w":3})"), "tensor 'w': entry is not an object"},
      {"missing dtype", MakeFile(Entry(R"("shape":[1],"data_offsets":[0,4])")),
       "tensor 'w': missing or non-string \"dtype\""},
      {"unknown dtype", MakeFile(Entry(R"("dtype":"F17","shape":[1],"data_offsets":[0,4])")),
       "tensor 'w': unknown dtype 'F17'"},
      {"missing shape", MakeFile(Entry(R"("dtype":"F32","data_offsets":[0,4])")),
       "tensor 'w': missing or non-array \"shape\""},
      {"negative dim", MakeFile(Entry(R"("dtype":"F32","shape":[-1],"data_offsets":[0,4])")),
       "tensor 'w': shape has an entry that is not a non-negative integer"},
      {"float dim", MakeFile(Entry(R"("dtype":"F32","shape":[1.5],"data_offsets":[0,4])")),
       "not a non-negative integer"},
      {"three offsets", MakeFile(Entry(f32x3 + R"("data_offsets":[0,4,8])"), std::string(12, 0)),
       "tensor 'w': \"data_offsets\" is not two non-negative integers"},
      {"backwards offsets", MakeFile(Entry(f32x3 + R"("data_offsets":[12,0])"), std::string(12, 0)),
       "tensor 'w': data_offsets [12, 0) run backwards"},
      {"end past data", MakeFile(Entry(f32x3 + R"("data_offsets":[0,12])"), std::string(8, 0)),
       "tensor 'w': data_offsets end 12 is past the end of the data (8 bytes)"},
      {"size mismatch", MakeFile(Entry(f32x3 + R"("data_offsets":[0,8])"), std::string(12, 0)),
       "tensor 'w': data_offsets [0, 8) hold 8 bytes but shape [3] of F32 needs 12"},
      {"shape overflow",
       MakeFile(Entry(R"("dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4])"),
                std::string(4, 0)),
       "tensor 'w': shape [4294967296, 4294967296]... overflows"},
      {"overlap",
       MakeFile(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                R"("y":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}})",
                std::string(8, 0)),
       "tensor 'y': data_offsets [4, 8) overlap tensor 'x' at [0, 8)"},
      {"metadata not string", MakeFile(R"({"__metadata__":{"k":1}})"),
       "__metadata__ value 'k' is not a string"},
  };
}

TEST(SafetensorsTest, CorruptInputsAreErrorsNamingFileAndTensor) {
  for (const CorruptCase& c : CorruptCases()) {
    absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(c.bytes, "t.safetensors");
    ASSERT_FALSE(file.ok()) << c.label;
    EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument) << c.label;
    const std::string message(file.status().message());
    EXPECT_THAT(message, HasSubstr("t.safetensors: ")) << c.label;
    EXPECT_THAT(message, HasSubstr(c.message)) << c.label;
  }
}

TEST(SafetensorsTest, ZeroSizedTensorsAndHolesAreAccepted) {
  const std::string bytes = MakeFile(R"({"e":{"dtype":"F32","shape":[0,5],"data_offsets":[4,4]},)"
                                     R"("s":{"dtype":"F32","shape":[],"data_offsets":[8,12]}})",
                                     std::string(12, 0));
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(bytes, "t.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->Find("e")->n_elements, 0);
  EXPECT_TRUE(file->ReadFloat32(*file->Find("e"))->empty());
  EXPECT_EQ(file->Find("s")->n_elements, 1);  // a scalar
}

TEST(SafetensorsTest, TruncatedRealFileIsAnError) {
  const std::string path = testing::SourcePath("tests/data/tiny/llama3_tied/model.safetensors");
  std::ifstream in(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_GT(bytes.size(), 1000u);
  ASSERT_TRUE(SafetensorsFile::Parse(bytes, "full").ok());
  for (size_t size : {bytes.size() - 1, bytes.size() / 2, size_t{100}, size_t{7}}) {
    absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Parse(bytes.substr(0, size), "cut");
    EXPECT_FALSE(file.ok()) << size;
    EXPECT_THAT(std::string(file.status().message()), HasSubstr("cut: ")) << size;
  }
}

TEST(SafetensorsTest, OpensSingleFileModel) {
  absl::StatusOr<SafetensorsModel> model =
      SafetensorsModel::Open(testing::SourcePath("tests/data/tiny/llama3_tied"));
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->shard_count(), 1u);
  const SafetensorsTensor* embed = model->Find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->dtype, "BF16");
  EXPECT_EQ(embed->shape, (std::vector<int64_t>{384, 64}));
  absl::StatusOr<std::vector<float>> values = model->ReadFloat32("model.embed_tokens.weight");
  ASSERT_TRUE(values.ok()) << values.status();
  EXPECT_EQ(values->size(), 384u * 64u);
  EXPECT_EQ(model->ReadFloat32("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, OpensShardedModelThroughIndex) {
  const std::string dir = testing::SourcePath("tests/data/tiny/llama_gqa");
  absl::StatusOr<SafetensorsModel> model = SafetensorsModel::Open(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_GT(model->shard_count(), 1u);
  // 3 layers × 9 tensors + embeddings, final norm, lm_head.
  EXPECT_EQ(model->TensorNames().size(), 30u);
  for (const std::string& name : model->TensorNames()) {
    absl::StatusOr<std::vector<float>> values = model->ReadFloat32(name);
    ASSERT_TRUE(values.ok()) << values.status();
    EXPECT_EQ(static_cast<int64_t>(values->size()), model->Find(name)->n_elements) << name;
    for (float v : *values) ASSERT_TRUE(std::isfinite(v)) << name;
  }
}

class ShardedIndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/index_test";
    std::filesystem::create_directories(dir_);
    std::ofstream(dir_ + "/a.safetensors", std::ios::binary) << ThreeDtypes();
  }
  absl::Status OpenIndex(const std::string& index) {
    return SafetensorsModel::OpenIndex(dir_, index).status();
  }
  std::string dir_;
};

TEST_F(ShardedIndexTest, ReadsTheMappedTensors) {
  absl::StatusOr<SafetensorsModel> model = SafetensorsModel::OpenIndex(
      dir_, R"({"weight_map":{"a":"a.safetensors","c":"a.safetensors"}})");
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(model->TensorNames(), (std::vector<std::string>{"a", "c"}));
  EXPECT_EQ(*model->ReadFloat32("c"), (std::vector<float>{1.0f, -3.0f}));
  EXPECT_EQ(model->Find("b"), nullptr);  // in the shard but not in the index
}

TEST_F(ShardedIndexTest, BadIndexesAreErrors) {
  EXPECT_THAT(std::string(OpenIndex("{").message()),
              HasSubstr("model.safetensors.index.json: not a JSON"));
  EXPECT_THAT(std::string(OpenIndex(R"({"weight_map":{}})").message()),
              HasSubstr("\"weight_map\" is missing"));
  const absl::Status escape = OpenIndex(R"({"weight_map":{"a":"../a.safetensors"}})");
  EXPECT_EQ(escape.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(escape.message()), HasSubstr("tensor 'a' is not a file name"));
  const absl::Status missing_tensor = OpenIndex(R"({"weight_map":{"zz":"a.safetensors"}})");
  EXPECT_EQ(missing_tensor.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing_tensor.message()),
              HasSubstr("a.safetensors: tensor 'zz', which the index"));
  const absl::Status missing_shard = OpenIndex(R"({"weight_map":{"a":"b.safetensors"}})");
  EXPECT_EQ(missing_shard.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing_shard.message()), HasSubstr("shard 'b.safetensors'"));
}

TEST(SafetensorsTest, MissingFilesAreNotFound) {
  EXPECT_EQ(SafetensorsFile::Open("/nonexistent/x.safetensors").status().code(),
            absl::StatusCode::kNotFound);
  const absl::Status empty_dir = SafetensorsModel::Open(::testing::TempDir()).status();
  EXPECT_EQ(empty_dir.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(empty_dir.message()), HasSubstr("has neither model.safetensors"));
}

}  // namespace
}  // namespace kvtrim::engine
