#include "server/inference_service.h"

#include <gtest/gtest.h>

namespace kvtrim::server {
namespace {

// A Generate stream that passed Admit just before a stuck device's streams were ended, and is
// tracked only afterwards, ends with the same status at once: the engine would never finish it.
TEST(InferenceServiceTest, AStreamTrackedAfterEndStreamsIsRefusedWithItsStatus) {
  InferenceService service({}, nullptr, nullptr, {});
  EXPECT_TRUE(service.TrackStream({}).ok());
  EXPECT_EQ(service.EndStreams(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the device is gone")),
            0);  // the stream tracked above has no sink left
  const grpc::Status late = service.TrackStream({});
  EXPECT_EQ(late.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(late.error_message(), "the device is gone");
}

}  // namespace
}  // namespace kvtrim::server
