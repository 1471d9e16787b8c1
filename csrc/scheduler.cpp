// BatchScheduler implementation (plain C++; the Python binding is python/register_scheduler.cpp).
#include "scheduler.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <utility>

namespace cai {

namespace {

std::string str(int64_t v) { return std::to_string(v); }

Policy parse_policy(const std::string& name) {
  if (name == "lpm") return Policy::LPM;
  if (name == "dfs-weight") return Policy::DFS_WEIGHT;
  if (name == "fcfs") return Policy::FCFS;
  throw std::invalid_argument("BatchScheduler: unknown policy '" + name + "'; use lpm, dfs-weight or fcfs");
}

int64_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t n = std::min(a.size(), b.size());
  return std::mismatch(a.begin(), a.begin() + n, b.begin()).first - a.begin();
}

std::vector<int64_t> ids_of(const std::vector<int32_t>& table, int64_t first, int64_t last) {
  return std::vector<int64_t>(table.begin() + first, table.begin() + last);
}

}  // namespace

BatchScheduler::BatchScheduler(std::shared_ptr<RadixCache> cache, const std::string& policy,
                               int64_t token_budget, int64_t dedup_min_tokens, int64_t lpm_max_queue)
    : cache_(std::move(cache)), policy_(parse_policy(policy)), token_budget_(token_budget),
      dedup_min_tokens_(dedup_min_tokens), lpm_max_queue_(lpm_max_queue) {
  if (!cache_) throw std::invalid_argument("BatchScheduler: cache is None; pass a RadixCache");
  if (token_budget < 1) {
    throw std::invalid_argument("BatchScheduler: token_budget=" + str(token_budget) + " must be at least 1");
  }
  if (dedup_min_tokens < 0 || lpm_max_queue < 0) {
    throw std::invalid_argument("BatchScheduler: dedup_min_tokens and lpm_max_queue must be >= 0");
  }
}

void BatchScheduler::add(int64_t request_id, std::vector<int32_t> tokens, int64_t max_new_tokens,
                         std::optional<int64_t> logits_from) {
  std::string name = "add: request " + str(request_id);
  if (waiting_ids_.count(request_id) || running_.count(request_id)) {
    throw std::invalid_argument(name + " is already waiting or running; use a new id");
  }
  int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) throw std::invalid_argument(name + " has no tokens");
  if (max_new_tokens < 0) throw std::invalid_argument(name + " has max_new_tokens=" + str(max_new_tokens) + " < 0");
  int64_t from = logits_from.value_or(n - 1);
  if (from < 0 || from >= n) {
    throw std::invalid_argument(name + " has logits_from=" + str(from) + " outside [0, " + str(n) + ")");
  }
  waiting_.push_back(WaitingRequest{request_id, std::move(tokens), max_new_tokens, from});
  waiting_ids_.insert(request_id);
}

std::vector<int32_t> BatchScheduler::match_key(const WaitingRequest& req) const {
  return std::vector<int32_t>(req.tokens.begin(), req.tokens.begin() + req.logits_from);
}

int64_t BatchScheduler::blocks_needed(const WaitingRequest& req) const {
  int64_t bs = cache_->block_size();
  return (static_cast<int64_t>(req.tokens.size()) + req.max_new_tokens + bs - 1) / bs;
}

void BatchScheduler::fail_oversized(std::vector<FailedRequest>* failed) {
  int64_t pool_blocks = cache_->pool()->num_blocks();
  std::vector<bool> drop(waiting_.size(), false);
  for (size_t i = 0; i < waiting_.size(); ++i) {
    const WaitingRequest& req = waiting_[i];
    int64_t need = blocks_needed(req);
    if (need <= pool_blocks) continue;
    failed->push_back({req.id, "request " + str(req.id) + " needs " + str(need) + " blocks (" +
                                   str(req.tokens.size()) + " prompt tokens + " + str(req.max_new_tokens) +
                                   " new tokens, " + str(cache_->block_size()) + " tokens per block) but the"
                                   " whole pool has " + str(pool_blocks) +
                                   "; raise the pool size or shorten the request"});
    drop[i] = true;
  }
  keep_waiting(drop);
}

// Longest cached prefix first; ties keep arrival order. Past lpm_max_queue waiting: FCFS.
std::vector<size_t> BatchScheduler::sort_lpm() {
  std::vector<size_t> order(waiting_.size());
  std::iota(order.begin(), order.end(), 0);
  if (static_cast<int64_t>(waiting_.size()) > lpm_max_queue_) return order;
  std::vector<int64_t> cached(waiting_.size());
  for (size_t i = 0; i < waiting_.size(); ++i) cached[i] = cache_->match_prefix(match_key(waiting_[i])).length;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cached[a] > cached[b]; });
  return order;
}

// Children of `node` that hold waiting requests, heaviest first (ties: smaller first block).
static std::vector<const Node*> heaviest_first(const Node& node,
                                               const std::unordered_map<const Node*, int64_t>& weight) {
  std::vector<std::pair<int64_t, const Node*>> kids;
  for (const auto& entry : node.children) {
    auto w = weight.find(entry.second);
    if (w != weight.end()) kids.push_back({-w->second, entry.second});
  }
  std::sort(kids.begin(), kids.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first < b.first : a.second->key < b.second->key;
  });
  std::vector<const Node*> out;
  for (const auto& kid : kids) out.push_back(kid.second);
  return out;
}

// SGLang's DFS-weight: a node's weight is the number of waiting requests whose match ends in its
// subtree; walk the tree heaviest child first, emitting each node's requests after its children's.
std::vector<size_t> BatchScheduler::sort_dfs_weight() {
  std::vector<int64_t> ends;
  for (const WaitingRequest& req : waiting_) ends.push_back(cache_->match_prefix(match_key(req)).node);
  std::unordered_map<int64_t, std::vector<size_t>> at_node;
  std::unordered_map<const Node*, int64_t> weight;
  for (size_t i = 0; i < ends.size(); ++i) {
    at_node[ends[i]].push_back(i);
    for (const Node* n = cache_->find(ends[i], "schedule"); n != nullptr; n = n->parent) ++weight[n];
  }
  std::vector<size_t> order;
  std::vector<std::pair<const Node*, bool>> stack{{cache_->root(), false}};
  while (!stack.empty()) {
    auto [node, expanded] = stack.back();
    stack.pop_back();
    if (expanded) {
      const auto& here = at_node[node->id];
      order.insert(order.end(), here.begin(), here.end());
      continue;
    }
    stack.push_back({node, true});
    std::vector<const Node*> kids = heaviest_first(*node, weight);
    for (auto it = kids.rbegin(); it != kids.rend(); ++it) stack.push_back({*it, false});
  }
  return order;
}

std::vector<size_t> BatchScheduler::order_waiting() {
  if (policy_ == Policy::LPM) return sort_lpm();
  if (policy_ == Policy::DFS_WEIGHT) return sort_dfs_weight();
  std::vector<size_t> order(waiting_.size());
  std::iota(order.begin(), order.end(), 0);
  return order;
}

// In-batch prefix dedup: hold back a request that shares at least dedup_min_tokens uncached
// tokens (whole blocks) with a request already admitted to this batch.
bool BatchScheduler::held_back(const WaitingRequest& req, int64_t cached, const std::vector<size_t>& batch) const {
  if (dedup_min_tokens_ == 0) return false;
  int64_t bs = cache_->block_size();
  std::vector<int32_t> key = match_key(req);
  for (size_t other : batch) {
    int64_t shared = common_prefix(key, waiting_[other].tokens) / bs * bs - cached;
    if (shared >= dedup_min_tokens_) return true;
  }
  return false;
}

bool BatchScheduler::ensure_free(int64_t blocks) {
  const auto& pool = cache_->pool();
  if (pool->num_free() < blocks) cache_->evict((blocks - pool->num_free()) * cache_->block_size());
  return pool->num_free() >= blocks;
}

bool BatchScheduler::admit(const WaitingRequest& req, const MatchResult& match, ScheduleOutput* out) {
  cache_->lock(match.node);
  int64_t fresh = blocks_needed(req) - static_cast<int64_t>(match.blocks.size());
  if (!ensure_free(fresh)) {
    cache_->unlock(match.node);
    return false;
  }
  RunningRequest run{req.tokens, match.blocks, match.length, match.node};
  std::vector<int32_t> ids = cache_->pool()->alloc(fresh);
  run.block_table.insert(run.block_table.end(), ids.begin(), ids.end());
  out->scheduled.push_back({req.id, match.length, run.block_table,
                            std::vector<int32_t>(req.tokens.begin() + match.length, req.tokens.end())});
  running_[req.id] = std::move(run);
  return true;
}

void BatchScheduler::keep_waiting(const std::vector<bool>& drop) {
  std::vector<WaitingRequest> rest;
  for (size_t i = 0; i < waiting_.size(); ++i) {
    if (drop[i]) waiting_ids_.erase(waiting_[i].id);
    else rest.push_back(std::move(waiting_[i]));
  }
  waiting_ = std::move(rest);
}

// Walks the waiting requests in policy order and admits them until the token budget, the pool
// or max_requests runs out. A request bigger than the budget is admitted alone (no chunking).
ScheduleOutput BatchScheduler::schedule(std::optional<int64_t> max_requests) {
  ScheduleOutput out;
  fail_oversized(&out.failed);
  std::vector<bool> taken(waiting_.size(), false);
  std::vector<size_t> batch;
  int64_t budget = token_budget_;
  for (size_t i : order_waiting()) {
    if (max_requests && static_cast<int64_t>(batch.size()) >= *max_requests) break;
    const WaitingRequest& req = waiting_[i];
    MatchResult match = cache_->match_prefix(match_key(req));
    int64_t to_compute = static_cast<int64_t>(req.tokens.size()) - match.length;
    if (held_back(req, match.length, batch)) continue;  // stays waiting, hits the cache later
    if (!batch.empty() && to_compute > budget) break;
    if (!admit(req, match, &out)) break;
    batch.push_back(i);
    taken[i] = true;
    budget -= to_compute;
    if (budget <= 0) break;
  }
  keep_waiting(taken);
  return out;
}

RunningRequest& BatchScheduler::running(int64_t request_id, const char* caller) {
  auto it = running_.find(request_id);
  if (it == running_.end()) {
    throw std::invalid_argument(std::string(caller) + ": request " + str(request_id) +
                                " is not running (unknown, still waiting, or already finished)");
  }
  return it->second;
}

void BatchScheduler::check_tokens(int64_t request_id, const RunningRequest& run,
                                  const std::vector<int32_t>& tokens, const char* caller) const {
  std::string name = std::string(caller) + ": request " + str(request_id);
  int64_t same = common_prefix(run.tokens, tokens);
  if (same < static_cast<int64_t>(run.tokens.size())) {
    throw std::invalid_argument(name + "'s tokens do not extend its known tokens (first difference at position " +
                                str(same) + "); pass the prompt followed by the generated tokens");
  }
  int64_t capacity = static_cast<int64_t>(run.block_table.size()) * cache_->block_size();
  if (static_cast<int64_t>(tokens.size()) > capacity) {
    throw std::invalid_argument(name + " has " + str(tokens.size()) + " tokens but its blocks hold " +
                                str(capacity) + " (prompt + max_new_tokens)");
  }
}

// Inserts the whole blocks of `tokens` into the tree and frees this request's private blocks
// that duplicate what another request cached meanwhile. Returns the number of tokens inserted.
int64_t BatchScheduler::publish(RunningRequest& run, const std::vector<int32_t>& tokens) {
  int64_t bs = cache_->block_size();
  int64_t n = static_cast<int64_t>(tokens.size()) / bs * bs;
  std::vector<int32_t> whole(tokens.begin(), tokens.begin() + n);
  int64_t already = cache_->insert(whole, ids_of(run.block_table, 0, n / bs));
  cache_->pool()->free(ids_of(run.block_table, run.cached_len / bs, already / bs));
  return n;
}

std::vector<int32_t> BatchScheduler::cache_computed(int64_t request_id, const std::vector<int32_t>& tokens) {
  RunningRequest& run = running(request_id, "cache_computed");
  check_tokens(request_id, run, tokens, "cache_computed");
  int64_t n = publish(run, tokens);
  MatchResult match = cache_->match_prefix(std::vector<int32_t>(tokens.begin(), tokens.begin() + n));
  cache_->lock(match.node);
  cache_->unlock(run.node);
  std::copy(match.blocks.begin(), match.blocks.end(), run.block_table.begin());
  run.cached_len = n;
  run.node = match.node;
  run.tokens = tokens;
  return run.block_table;
}

void BatchScheduler::finish(int64_t request_id, const std::vector<int32_t>& tokens) {
  RunningRequest& run = running(request_id, "finish");
  check_tokens(request_id, run, tokens, "finish");
  int64_t n = publish(run, tokens);
  int64_t bs = cache_->block_size();
  cache_->pool()->free(ids_of(run.block_table, n / bs, static_cast<int64_t>(run.block_table.size())));
  cache_->unlock(run.node);
  running_.erase(request_id);
}

void BatchScheduler::abort(int64_t request_id) {
  if (waiting_ids_.count(request_id)) {
    std::vector<bool> drop(waiting_.size());
    for (size_t i = 0; i < waiting_.size(); ++i) drop[i] = waiting_[i].id == request_id;
    keep_waiting(drop);
    return;
  }
  RunningRequest& run = running(request_id, "abort");
  int64_t first = run.cached_len / cache_->block_size();
  cache_->pool()->free(ids_of(run.block_table, first, static_cast<int64_t>(run.block_table.size())));
  cache_->unlock(run.node);
  running_.erase(request_id);
}

}  // namespace cai
