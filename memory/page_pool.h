// One allocation of fixed-size byte pages. Pages are handed out by id; running out is a value
// (std::nullopt) the caller acts on, never an exception.
//
// The pool owns the geometry (page_bytes, page count) and the accounting. Where the bytes live is
// the backend's business: the CPU reference keeps them here (PageStorage::kHost); a GPU backend
// asks for PageStorage::kNone and holds one device allocation of total_pages() * page_bytes()
// with page p at device_base + p * page_bytes, so page ids and row offsets mean the same on both.
#pragma once

#include <cassert>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"

namespace kvtrim::memory {

using PageId = int32_t;

enum class PageStorage {
  kHost,  // the pool allocates the page bytes in host memory; data() points into them
  kNone,  // accounting only: another owner (a device backend) holds the bytes; no data()
};

class PagePool {
 public:
  // page_bytes must be a positive multiple of 64 (rows stay cache-line aligned at page start).
  static absl::StatusOr<PagePool> Create(size_t page_bytes, int32_t num_pages,
                                         PageStorage storage = PageStorage::kHost);

  std::optional<PageId> Allocate();
  // Returns a page to the pool. Freeing a page that is not allocated is a bug (asserted).
  void Free(PageId page);

  // Host bytes of a page; only with PageStorage::kHost (asserted).
  std::byte* data(PageId page) {
    assert(base_ != nullptr);
    return base_.get() + static_cast<size_t>(page) * page_bytes_;
  }
  const std::byte* data(PageId page) const {
    assert(base_ != nullptr);
    return base_.get() + static_cast<size_t>(page) * page_bytes_;
  }
  bool has_host_storage() const { return base_ != nullptr; }

  size_t page_bytes() const { return page_bytes_; }
  int32_t total_pages() const { return static_cast<int32_t>(allocated_.size()); }
  int32_t free_pages() const { return static_cast<int32_t>(free_list_.size()); }
  int32_t used_pages() const { return total_pages() - free_pages(); }
  bool is_allocated(PageId page) const { return allocated_[page]; }

 private:
  struct AlignedFree {
    void operator()(std::byte* p) const;
  };
  PagePool(size_t page_bytes, int32_t num_pages, PageStorage storage);

  size_t page_bytes_;
  std::unique_ptr<std::byte[], AlignedFree> base_;  // (num_pages, page_bytes); null: kNone
  std::vector<PageId> free_list_;                   // LIFO: recently freed pages are warm
  std::vector<bool> allocated_;                     // (num_pages)
};

}  // namespace kvtrim::memory
