// BlockPool implementation (plain C++; the Python binding is python/register_block_pool.cpp).
#include "block_pool.h"

#include <stdexcept>
#include <string>

namespace cai {

BlockPool::BlockPool(int64_t num_blocks, int64_t block_size) : block_size_(block_size) {
  if (num_blocks < 1 || num_blocks > INT32_MAX) {
    throw std::invalid_argument("BlockPool: num_blocks=" + std::to_string(num_blocks) +
                                " must be in [1, 2**31 - 1]");
  }
  if (block_size < 1) {
    throw std::invalid_argument("BlockPool: block_size=" + std::to_string(block_size) +
                                " must be at least 1 token");
  }
  state_.assign(num_blocks, BlockState::Free);
  free_stack_.reserve(num_blocks);
  for (int64_t id = num_blocks - 1; id >= 0; --id) free_stack_.push_back(static_cast<int32_t>(id));
}

std::vector<int32_t> BlockPool::alloc(int64_t n) {
  if (n < 0) throw std::invalid_argument("alloc: asked for " + std::to_string(n) + " blocks");
  if (n > num_free()) {
    throw std::runtime_error("alloc: asked for " + std::to_string(n) + " blocks, " +
                             std::to_string(num_free()) + " free of " +
                             std::to_string(num_blocks()) + "; evict or raise the pool size");
  }
  std::vector<int32_t> ids;
  ids.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    ids.push_back(free_stack_.back());
    free_stack_.pop_back();
    state_[ids.back()] = BlockState::Private;
  }
  return ids;
}

void BlockPool::check_freeable(const std::vector<int64_t>& ids) const {
  auto fail = [](int64_t id, const std::string& why) {
    throw std::invalid_argument("free: block " + std::to_string(id) + " " + why);
  };
  std::vector<bool> seen(state_.size(), false);
  for (int64_t id : ids) {
    if (!in_range(id)) fail(id, "is out of range [0, " + std::to_string(num_blocks()) + ")");
    if (state_[id] == BlockState::Free) fail(id, "is already free (double free)");
    if (state_[id] == BlockState::Cached) fail(id, "is owned by the prefix cache; only evict frees it");
    if (seen[id]) fail(id, "appears twice in the ids to free");
    seen[id] = true;
  }
}

void BlockPool::free(const std::vector<int64_t>& ids) {
  check_freeable(ids);
  for (int64_t id : ids) {
    state_[id] = BlockState::Free;
    free_stack_.push_back(static_cast<int32_t>(id));
  }
}

void BlockPool::release_cached(int32_t id) {
  state_[id] = BlockState::Free;
  free_stack_.push_back(id);
}

int64_t BlockPool::check_integrity() const {
  std::vector<bool> on_stack(state_.size(), false);
  for (int32_t id : free_stack_) {
    if (!in_range(id) || state_[id] != BlockState::Free || on_stack[id]) {
      throw std::runtime_error("block pool integrity: free list entry " + std::to_string(id) +
                               " is out of range, not free, or listed twice");
    }
    on_stack[id] = true;
  }
  int64_t cached = 0, free_count = 0;
  for (BlockState s : state_) {
    cached += s == BlockState::Cached;
    free_count += s == BlockState::Free;
  }
  if (free_count != num_free()) {
    throw std::runtime_error("block pool integrity: " + std::to_string(free_count) +
                             " blocks are free but the free list holds " + std::to_string(num_free()));
  }
  return cached;
}

}  // namespace cai
