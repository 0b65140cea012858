// Dequantization against the values gguf-py gives for the same blocks
// (tests/data/dequant/, made by tools/reference/make_dequant_goldens.py).
#include "engine/loader/dequant.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace kvtrim::engine {
namespace {

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

struct Golden {
  std::string blocks;
  std::vector<float> values;
};

Golden LoadGolden(const std::string& type) {
  const std::string stem = testing::SourcePath("tests/data/dequant/" + type);
  Golden golden;
  golden.blocks = ReadFile(stem + ".bin");
  const std::string values = ReadFile(stem + ".f32");
  golden.values.resize(values.size() / sizeof(float));
  std::memcpy(golden.values.data(), values.data(), values.size());
  return golden;
}

class DequantGoldenTest : public ::testing::TestWithParam<GgmlType> {};

TEST_P(DequantGoldenTest, MatchesGgufPy) {
  const GgmlType type = GetParam();
  const std::string name = FindGgmlType(static_cast<uint32_t>(type))->name;
  const Golden golden = LoadGolden(name);
  ASSERT_FALSE(golden.values.empty());
  std::vector<float> out(golden.values.size(), std::nanf(""));
  ASSERT_TRUE(Dequantize(type, golden.blocks, out.size(), out.data()).ok());
  for (size_t i = 0; i < out.size(); ++i) {
    // Same operations in the same order as ggml, so equal up to FMA contraction.
    ASSERT_FLOAT_EQ(out[i], golden.values[i]) << name << " value " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(AllTypes, DequantGoldenTest,
                         ::testing::Values(GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16,
                                           GgmlType::kQ4_0, GgmlType::kQ4_1, GgmlType::kQ8_0,
                                           GgmlType::kQ4_K, GgmlType::kQ6_K),
                         [](const auto& info) {
                           return std::string(
                               FindGgmlType(static_cast<uint32_t>(info.param))->name);
                         });

TEST(DequantTest, LargeTensorsSplitOverThreadsGiveTheSameValues) {
  // 5 blocks x 16384 = 2.6M values: above the threshold where the work is split.
  const Golden golden = LoadGolden("Q8_0");
  std::string blocks;
  for (int i = 0; i < 16384; ++i) blocks += golden.blocks;
  std::vector<float> out(golden.values.size() * 16384);
  ASSERT_TRUE(Dequantize(GgmlType::kQ8_0, blocks, out.size(), out.data()).ok());
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_FLOAT_EQ(out[i], golden.values[i % golden.values.size()]) << i;
  }
}

TEST(DequantTest, HalfConversionEdgeCases) {
  EXPECT_EQ(HalfToFloat(0x3C00), 1.0f);
  EXPECT_EQ(HalfToFloat(0xC000), -2.0f);
  EXPECT_EQ(HalfToFloat(0x7BFF), 65504.0f);
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(HalfToFloat(0x03FF), std::ldexp(1023.0f, -24));
  EXPECT_EQ(HalfToFloat(0x7C00), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::signbit(HalfToFloat(0x8000)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7E00)));
  EXPECT_EQ(Bf16ToFloat(0x3F80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(0xC0A0), -5.0f);
}

TEST(DequantTest, Q4_1BlockByHand) {
  // d = 0.5 (0x3800), m = -1 (0xBC00); byte j = (j + 16 values) << 4 | j values.
  std::string block = {0x00, 0x38, 0x00, static_cast<char>(0xBC)};
  for (int j = 0; j < 16; ++j) block.push_back(static_cast<char>(((15 - j) << 4) | j));
  std::vector<float> out(32);
  ASSERT_TRUE(Dequantize(GgmlType::kQ4_1, block, 32, out.data()).ok());
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 0.5f * j - 1.0f);
    EXPECT_EQ(out[j + 16], 0.5f * (15 - j) - 1.0f);
  }
}

TEST(DequantTest, Q4_KUpperSubBlocksTakeTheHighScaleBits) {
  // d = 1, dmin = 1; sub-block 4 has scale (byte 8 low nibble) | (byte 0 top bits << 4) = 1 | 16
  // and min (byte 8 high nibble) | (byte 4 top bits << 4) = 2 | 32; all quants 3.
  std::string block(144, '\0');
  block[1] = 0x3C;  // d = 1.0
  block[3] = 0x3C;  // dmin = 1.0
  block[4 + 0] = static_cast<char>(0x40);
  block[4 + 4] = static_cast<char>(0x80);
  block[4 + 8] = 0x21;
  for (int i = 16; i < 144; ++i) block[i] = 0x33;
  std::vector<float> out(256);
  ASSERT_TRUE(Dequantize(GgmlType::kQ4_K, block, 256, out.data()).ok());
  EXPECT_EQ(out[0], 0.0f);                    // sub-block 0: scale 0, min 0
  EXPECT_EQ(out[4 * 32], 17.0f * 3 - 34.0f);  // sub-block 4
  EXPECT_EQ(out[5 * 32], 0.0f);               // sub-block 5: scale 0, min 0
}

TEST(DequantTest, RejectsWrongSizesAndUnsupportedTypes) {
  std::vector<float> out(64);
  const std::string two_blocks(36, '\0');
  absl::Status status = Dequantize(GgmlType::kQ4_0, two_blocks, 64, out.data());
  EXPECT_EQ(status.code(), absl::StatusCode::kOk);
  status = Dequantize(GgmlType::kQ4_0, two_blocks, 32, out.data());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("36 were given"), std::string::npos) << status;
  status = Dequantize(GgmlType::kQ4_0, two_blocks, 48, out.data());
  EXPECT_NE(status.message().find("not whole Q4_0 blocks"), std::string::npos) << status;
  status = Dequantize(GgmlType::kQ5_K, std::string(176, '\0'), 256, out.data());
  EXPECT_EQ(status.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(status.message().find("Q5_K"), std::string::npos) << status;
  EXPECT_FALSE(CanDequantize(GgmlType::kIQ2_XXS));
  EXPECT_TRUE(CanDequantize(GgmlType::kQ6_K));
}

TEST(DequantTest, TypeTable) {
  EXPECT_EQ(FindGgmlType(5), nullptr);  // retired Q4_2
  EXPECT_EQ(FindGgmlType(12)->block_bytes, 144);
  EXPECT_EQ(FindGgmlType(14)->block_bytes, 210);
  EXPECT_EQ(FormatGgmlType(3), "Q4_1");
  EXPECT_EQ(FormatGgmlType(99), "type 99");
}

}  // namespace
}  // namespace kvtrim::engine
