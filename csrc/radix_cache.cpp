// RadixCache implementation (plain C++; the Python binding is python/register_radix_cache.cpp).
#include "radix_cache.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <tuple>

namespace cai {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

std::runtime_error broken(const std::string& what) {
  return std::runtime_error("radix cache integrity: " + what);
}

}  // namespace

size_t BlockKeyHash::operator()(const std::vector<int32_t>& key) const {
  uint64_t h = 1469598103934665603ULL;  // FNV-1a over the 32-bit token ids
  for (int32_t t : key) h = (h ^ static_cast<uint32_t>(t)) * 1099511628211ULL;
  return static_cast<size_t>(h);
}

RadixCache::RadixCache(std::shared_ptr<BlockPool> pool) : pool_(std::move(pool)) {
  if (!pool_) throw std::invalid_argument("RadixCache: pool is None; pass a BlockPool");
  block_size_ = pool_->block_size();
  auto root = std::make_unique<Node>();
  root->id = next_id_++;
  root_ = root.get();
  nodes_[root_->id] = std::move(root);
}

const Node* RadixCache::find(int64_t node, const char* caller) const {
  auto it = nodes_.find(node);
  if (it == nodes_.end()) {
    throw std::invalid_argument(std::string(caller) + ": node " + str(node) +
                                " is not in the cache (evicted, or never returned by match_prefix);"
                                " lock a node right after match_prefix");
  }
  return it->second.get();
}

Node* RadixCache::find_mut(int64_t node, const char* caller) {
  return const_cast<Node*>(find(node, caller));
}

int64_t RadixCache::common_blocks_len(const Node& node, const std::vector<int32_t>& tokens,
                                      int64_t pos) const {
  int64_t limit = std::min<int64_t>(node.key.size(), static_cast<int64_t>(tokens.size()) - pos);
  auto first = node.key.begin();
  auto diff = std::mismatch(first, first + limit, tokens.begin() + pos).first;
  return (diff - first) / block_size_ * block_size_;
}

Node* RadixCache::child_at(const Node& node, const std::vector<int32_t>& tokens, int64_t pos) const {
  std::vector<int32_t> first_block(tokens.begin() + pos, tokens.begin() + pos + block_size_);
  auto it = node.children.find(first_block);
  return it == node.children.end() ? nullptr : it->second;
}

// Follows the whole blocks of `tokens` down from the root. With `mutate`, stamps each node
// passed with the current clock and splits the node where the match ends mid-edge; returns the
// deepest node matched in full. `tokens` holds only the whole blocks the caller wants matched.
Node* RadixCache::descend(const std::vector<int32_t>& tokens, int64_t n, bool mutate,
                          int64_t* matched, std::vector<int32_t>* blocks) {
  Node* node = root_;
  int64_t pos = 0;
  while (pos + block_size_ <= n) {
    Node* child = child_at(*node, tokens, pos);
    if (child == nullptr) break;
    int64_t len = common_blocks_len(*child, tokens, pos);
    if (blocks) blocks->insert(blocks->end(), child->blocks.begin(), child->blocks.begin() + len / block_size_);
    pos += len;
    bool partial = len < static_cast<int64_t>(child->key.size());
    if (mutate) child->last_access = clock_;
    if (partial && mutate) node = split(child, len);
    if (partial) break;
    node = child;
  }
  *matched = pos;
  return node;
}

Node* RadixCache::new_node(Node* parent, std::vector<int32_t> key, std::vector<int32_t> blocks) {
  auto owned = std::make_unique<Node>();
  Node* node = owned.get();
  node->id = next_id_++;
  node->parent = parent;
  node->key = std::move(key);
  node->blocks = std::move(blocks);
  node->last_access = clock_;
  std::vector<int32_t> first(node->key.begin(), node->key.begin() + block_size_);
  parent->children[first] = node;
  nodes_[node->id] = std::move(owned);
  return node;
}

// Cuts `child` after `len` tokens: a new node takes the upper part (and child's place under
// its parent); `child` keeps the lower part and its handle. Locks and sizes are unchanged.
Node* RadixCache::split(Node* child, int64_t len) {
  int64_t nblocks = len / block_size_;
  Node* upper = new_node(child->parent, std::vector<int32_t>(child->key.begin(), child->key.begin() + len),
                         std::vector<int32_t>(child->blocks.begin(), child->blocks.begin() + nblocks));
  upper->lock_ref = child->lock_ref;
  upper->last_access = child->last_access;
  child->key.erase(child->key.begin(), child->key.begin() + len);
  child->blocks.erase(child->blocks.begin(), child->blocks.begin() + nblocks);
  child->parent = upper;
  upper->children[std::vector<int32_t>(child->key.begin(), child->key.begin() + block_size_)] = child;
  return upper;
}

MatchResult RadixCache::match_prefix(const std::vector<int32_t>& tokens) {
  MatchResult result;
  ++clock_;
  int64_t n = static_cast<int64_t>(tokens.size()) / block_size_ * block_size_;
  result.node = descend(tokens, n, true, &result.length, &result.blocks)->id;
  return result;
}

void RadixCache::check_new_blocks(const std::vector<int64_t>& blocks, int64_t first) const {
  auto fail = [](int64_t id, const std::string& why) {
    throw std::invalid_argument("insert: block " + str(id) + " " + why);
  };
  std::vector<bool> seen(pool_->num_blocks(), false);
  for (size_t i = first; i < blocks.size(); ++i) {
    int64_t id = blocks[i];
    if (!pool_->in_range(id)) fail(id, "is out of range [0, " + str(pool_->num_blocks()) + ")");
    if (pool_->state(id) == BlockState::Free) fail(id, "is free; insert blocks from alloc that hold these tokens' KV");
    if (pool_->state(id) == BlockState::Cached) fail(id, "is already owned by the prefix cache");
    if (seen[id]) fail(id, "appears twice in the ids to insert");
    seen[id] = true;
  }
}

int64_t RadixCache::insert(const std::vector<int32_t>& tokens, const std::vector<int64_t>& blocks) {
  int64_t nblocks = static_cast<int64_t>(tokens.size()) / block_size_;
  int64_t n = nblocks * block_size_;
  if (static_cast<int64_t>(blocks.size()) != nblocks) {
    throw std::invalid_argument("insert: " + str(tokens.size()) + " tokens make " + str(nblocks) +
                                " whole blocks of " + str(block_size_) + " but " + str(blocks.size()) +
                                " block ids were given; pass one id per whole block (a trailing"
                                " partial block is not cached)");
  }
  int64_t cached = 0;
  descend(tokens, n, false, &cached, nullptr);
  check_new_blocks(blocks, cached / block_size_);
  ++clock_;
  Node* node = descend(tokens, n, true, &cached, nullptr);
  if (cached < n) {
    std::vector<int32_t> new_blocks(blocks.begin() + cached / block_size_, blocks.end());
    for (int32_t id : new_blocks) pool_->mark_cached(id);
    new_node(node, std::vector<int32_t>(tokens.begin() + cached, tokens.begin() + n), std::move(new_blocks));
    evictable_size_ += n - cached;
  }
  return cached;
}

std::vector<Node*> RadixCache::evictable_leaves() const {
  std::vector<Node*> leaves;
  for (const auto& entry : nodes_) {
    Node* node = entry.second.get();
    if (node != root_ && node->children.empty() && node->lock_ref == 0) leaves.push_back(node);
  }
  return leaves;
}

void RadixCache::remove_leaf(Node* leaf, std::vector<int32_t>* freed) {
  for (int32_t id : leaf->blocks) {
    pool_->release_cached(id);
    freed->push_back(id);
  }
  evictable_size_ -= static_cast<int64_t>(leaf->key.size());
  leaf->parent->children.erase(std::vector<int32_t>(leaf->key.begin(), leaf->key.begin() + block_size_));
  nodes_.erase(leaf->id);
}

std::vector<int32_t> RadixCache::evict(int64_t num_tokens) {
  if (num_tokens < 0) throw std::invalid_argument("evict: num_tokens=" + str(num_tokens) + " must be >= 0");
  std::vector<int32_t> freed;
  std::vector<Node*> heap = evictable_leaves();
  auto later = [](const Node* a, const Node* b) {
    return std::tie(a->last_access, a->id) > std::tie(b->last_access, b->id);
  };
  std::make_heap(heap.begin(), heap.end(), later);
  int64_t freed_tokens = 0;
  while (freed_tokens < num_tokens && !heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    Node* leaf = heap.back();
    heap.pop_back();
    Node* parent = leaf->parent;
    freed_tokens += static_cast<int64_t>(leaf->key.size());
    remove_leaf(leaf, &freed);
    if (parent != root_ && parent->children.empty() && parent->lock_ref == 0) {
      heap.push_back(parent);
      std::push_heap(heap.begin(), heap.end(), later);
    }
  }
  return freed;
}

void RadixCache::lock(int64_t node) {
  for (Node* n = find_mut(node, "lock"); n != root_; n = n->parent) {
    if (n->lock_ref == 0) {
      evictable_size_ -= static_cast<int64_t>(n->key.size());
      protected_size_ += static_cast<int64_t>(n->key.size());
    }
    ++n->lock_ref;
  }
}

void RadixCache::unlock(int64_t node) {
  Node* n = find_mut(node, "unlock");
  if (n != root_ && n->lock_ref == 0) {
    throw std::invalid_argument("unlock: node " + str(node) +
                                " is not locked (its lock count would go below zero)");
  }
  for (; n != root_; n = n->parent) {
    --n->lock_ref;
    if (n->lock_ref == 0) {
      protected_size_ -= static_cast<int64_t>(n->key.size());
      evictable_size_ += static_cast<int64_t>(n->key.size());
    }
  }
}

void RadixCache::debug_set_lock_ref(int64_t node, int64_t value) {
  find_mut(node, "_debug_set_lock_ref")->lock_ref = value;
}

// Checks one node and its links to its children; adds its tokens to the size it belongs to.
int64_t RadixCache::check_node(const Node& node, std::vector<bool>* seen, int64_t* evictable,
                               int64_t* protected_) const {
  std::string name = "node " + str(node.id);
  int64_t len = static_cast<int64_t>(node.key.size());
  if (&node != root_ && (len == 0 || len % block_size_ != 0)) {
    throw broken(name + " key has " + str(len) + " tokens, not a positive multiple of block_size " + str(block_size_));
  }
  if (static_cast<int64_t>(node.blocks.size()) * block_size_ != len) {
    throw broken(name + " has " + str(node.blocks.size()) + " blocks for " + str(len) + " tokens");
  }
  if (node.lock_ref < 0) throw broken(name + " has a negative lock count " + str(node.lock_ref));
  (node.lock_ref > 0 ? *protected_ : *evictable) += len;
  for (int32_t id : node.blocks) {
    if (!pool_->in_range(id) || pool_->state(id) != BlockState::Cached || (*seen)[id]) {
      throw broken("block " + str(id) + " of " + name + " is out of range, not marked cached, or owned twice");
    }
    (*seen)[id] = true;
  }
  int64_t child_locks = 0;
  for (const auto& entry : node.children) {
    const Node* child = entry.second;
    auto first_end = child->key.begin() + std::min<int64_t>(block_size_, child->key.size());
    std::vector<int32_t> first(child->key.begin(), first_end);
    if (child->parent != &node || entry.first != first) {
      throw broken("node " + str(child->id) + " is filed under the wrong parent or first block");
    }
    child_locks += child->lock_ref;
  }
  if (&node != root_ && child_locks > node.lock_ref) {
    throw broken(name + " has lock count " + str(node.lock_ref) + " below its children's total " + str(child_locks));
  }
  return static_cast<int64_t>(node.blocks.size());
}

void RadixCache::check_integrity() const {
  int64_t cached_in_pool = pool_->check_integrity();
  std::vector<bool> seen(pool_->num_blocks(), false);
  int64_t evictable = 0, protected_ = 0, blocks = 0, count = 0;
  std::vector<const Node*> stack{root_};
  while (!stack.empty()) {
    const Node* node = stack.back();
    stack.pop_back();
    auto it = nodes_.find(node->id);
    if (it == nodes_.end() || it->second.get() != node) throw broken("node " + str(node->id) + " has no valid handle");
    blocks += check_node(*node, &seen, &evictable, &protected_);
    ++count;
    for (const auto& entry : node->children) stack.push_back(entry.second);
  }
  if (count != static_cast<int64_t>(nodes_.size())) {
    throw broken(str(nodes_.size()) + " handles but " + str(count) + " nodes reachable from the root");
  }
  if (evictable != evictable_size_ || protected_ != protected_size_) {
    throw broken("evictable/protected sizes are " + str(evictable_size_) + "/" + str(protected_size_) +
                 " but the nodes add up to " + str(evictable) + "/" + str(protected_));
  }
  if (blocks != cached_in_pool) {
    throw broken(str(cached_in_pool) + " blocks are marked cached in the pool but the tree owns " + str(blocks));
  }
}

}  // namespace cai
