// BlockPool: a fixed set of KV block ids [0, num_blocks), each Free, Private (handed out by
// alloc, held by a request) or Cached (owned by a RadixCache node; only evict frees it).
// Allocation is deterministic: free ids form a stack (initially 0 on top), alloc pops, free pushes.
#pragma once

#include <cstdint>
#include <vector>

namespace cai {

enum class BlockState : uint8_t { Free, Private, Cached };

class BlockPool {
 public:
  BlockPool(int64_t num_blocks, int64_t block_size);

  // n ids from the top of the free stack; throws std::runtime_error if fewer than n are free.
  std::vector<int32_t> alloc(int64_t n);
  // Returns Private blocks to the pool; throws std::invalid_argument (and frees nothing) on an
  // id out of range, a Free block (double free), a Cached block, or an id repeated in `ids`.
  void free(const std::vector<int64_t>& ids);

  int64_t num_free() const { return static_cast<int64_t>(free_stack_.size()); }
  int64_t num_blocks() const { return static_cast<int64_t>(state_.size()); }
  int64_t block_size() const { return block_size_; }
  BlockState state(int32_t id) const { return state_[id]; }
  bool in_range(int64_t id) const { return id >= 0 && id < num_blocks(); }

  // For RadixCache: Private -> Cached on insert, Cached -> Free on evict.
  void mark_cached(int32_t id) { state_[id] = BlockState::Cached; }
  void release_cached(int32_t id);
  // Throws std::runtime_error naming the broken invariant; returns the number of Cached blocks.
  int64_t check_integrity() const;

 private:
  void check_freeable(const std::vector<int64_t>& ids) const;

  int64_t block_size_;
  std::vector<BlockState> state_;
  std::vector<int32_t> free_stack_;
};

}  // namespace cai
