// RadixCache: a radix tree over token ids whose nodes own KV blocks of a BlockPool
// (after SGLang / mini-sglang). Tokens are cached in whole blocks only: every node key is a
// non-empty multiple of block_size tokens, and children are keyed by their first block's tokens.
// Nodes are named by integer handles (root = 0) so that a stale handle raises instead of crashing.
// Rules: block ids from match_prefix stay valid only while the node is locked; evict frees whole
// leaves and may free more than asked; insert returns the already-cached length and the caller
// frees its own duplicate blocks for that part.
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "block_pool.h"

namespace cai {

struct BlockKeyHash {
  size_t operator()(const std::vector<int32_t>& key) const;
};

struct Node {
  int64_t id = 0;
  Node* parent = nullptr;
  std::vector<int32_t> key;     // token ids, a multiple of block_size
  std::vector<int32_t> blocks;  // key.size() / block_size block ids
  std::unordered_map<std::vector<int32_t>, Node*, BlockKeyHash> children;  // by first block
  int64_t lock_ref = 0;
  int64_t last_access = 0;
};

struct MatchResult {
  int64_t length = 0;           // matched tokens, a multiple of block_size
  std::vector<int32_t> blocks;  // length / block_size block ids
  int64_t node = 0;             // handle of the node where the match ends
};

class RadixCache {
 public:
  explicit RadixCache(std::shared_ptr<BlockPool> pool);

  MatchResult match_prefix(const std::vector<int32_t>& tokens);
  int64_t insert(const std::vector<int32_t>& tokens, const std::vector<int64_t>& blocks);
  std::vector<int32_t> evict(int64_t num_tokens);
  void lock(int64_t node);
  void unlock(int64_t node);
  void check_integrity() const;
  void debug_set_lock_ref(int64_t node, int64_t value);  // test hook: breaks invariants on purpose

  int64_t evictable_size() const { return evictable_size_; }
  int64_t protected_size() const { return protected_size_; }
  int64_t total_size() const { return evictable_size_ + protected_size_; }
  int64_t block_size() const { return block_size_; }
  const std::shared_ptr<BlockPool>& pool() const { return pool_; }
  const Node* root() const { return root_; }
  const Node* find(int64_t node, const char* caller) const;

 private:
  Node* find_mut(int64_t node, const char* caller);
  int64_t common_blocks_len(const Node& node, const std::vector<int32_t>& tokens, int64_t pos) const;
  Node* child_at(const Node& node, const std::vector<int32_t>& tokens, int64_t pos) const;
  Node* descend(const std::vector<int32_t>& tokens, int64_t n, bool mutate, int64_t* matched,
                std::vector<int32_t>* blocks);
  Node* split(Node* child, int64_t len);
  Node* new_node(Node* parent, std::vector<int32_t> key, std::vector<int32_t> blocks);
  void check_new_blocks(const std::vector<int64_t>& blocks, int64_t first) const;
  void remove_leaf(Node* leaf, std::vector<int32_t>* freed);
  std::vector<Node*> evictable_leaves() const;
  int64_t check_node(const Node& node, std::vector<bool>* seen, int64_t* evictable,
                     int64_t* protected_) const;

  std::shared_ptr<BlockPool> pool_;
  int64_t block_size_;
  std::unordered_map<int64_t, std::unique_ptr<Node>> nodes_;
  Node* root_;
  int64_t next_id_ = 0;
  int64_t clock_ = 0;
  int64_t evictable_size_ = 0;
  int64_t protected_size_ = 0;
};

}  // namespace cai
