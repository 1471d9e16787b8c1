// BatchScheduler: chooses which waiting requests (generation or scoring) form the next prefill
// batch over a RadixCache, under a token budget, and tracks the blocks of running requests.
// A request's block table covers its prompt plus max_new_tokens from admission on: the cached
// prefix's blocks (locked in the tree) followed by private blocks from the pool.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "radix_cache.h"

namespace cai {

enum class Policy { LPM, DFS_WEIGHT, FCFS };

struct ScheduledRequest {
  int64_t request_id = 0;
  int64_t cached_len = 0;                 // tokens served from the cache (multiple of block_size)
  std::vector<int32_t> block_table;       // cached blocks, then fresh ones for the rest
  std::vector<int32_t> tokens_to_compute; // tokens[cached_len:]
};

struct FailedRequest {
  int64_t request_id = 0;
  std::string reason;
};

struct ScheduleOutput {
  std::vector<ScheduledRequest> scheduled;
  std::vector<FailedRequest> failed;
};

struct WaitingRequest {
  int64_t id = 0;
  std::vector<int32_t> tokens;
  int64_t max_new_tokens = 0;
  int64_t logits_from = 0;  // the cache serves at most tokens[:logits_from]
};

struct RunningRequest {
  std::vector<int32_t> tokens;       // the longest token list known (prompt, then computed)
  std::vector<int32_t> block_table;
  int64_t cached_len = 0;            // block_table[:cached_len / block_size] belongs to the tree
  int64_t node = 0;                  // locked tree node covering that prefix
};

class BatchScheduler {
 public:
  BatchScheduler(std::shared_ptr<RadixCache> cache, const std::string& policy, int64_t token_budget,
                 int64_t dedup_min_tokens, int64_t lpm_max_queue);

  void add(int64_t request_id, std::vector<int32_t> tokens, int64_t max_new_tokens,
           std::optional<int64_t> logits_from);
  ScheduleOutput schedule(std::optional<int64_t> max_requests);
  std::vector<int32_t> cache_computed(int64_t request_id, const std::vector<int32_t>& tokens);
  void finish(int64_t request_id, const std::vector<int32_t>& tokens);
  void abort(int64_t request_id);

  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  const std::shared_ptr<RadixCache>& cache() const { return cache_; }

 private:
  std::vector<int32_t> match_key(const WaitingRequest& req) const;
  int64_t blocks_needed(const WaitingRequest& req) const;
  void fail_oversized(std::vector<FailedRequest>* failed);
  std::vector<size_t> order_waiting();
  std::vector<size_t> sort_lpm();
  std::vector<size_t> sort_dfs_weight();
  bool held_back(const WaitingRequest& req, int64_t cached, const std::vector<size_t>& batch) const;
  bool ensure_free(int64_t blocks);
  bool admit(const WaitingRequest& req, const MatchResult& match, ScheduleOutput* out);
  void keep_waiting(const std::vector<bool>& drop);
  RunningRequest& running(int64_t request_id, const char* caller);
  void check_tokens(int64_t request_id, const RunningRequest& run, const std::vector<int32_t>& tokens,
                    const char* caller) const;
  int64_t publish(RunningRequest& run, const std::vector<int32_t>& tokens);

  std::shared_ptr<RadixCache> cache_;
  Policy policy_;
  int64_t token_budget_;
  int64_t dedup_min_tokens_;
  int64_t lpm_max_queue_;
  std::vector<WaitingRequest> waiting_;
  std::unordered_set<int64_t> waiting_ids_;
  std::unordered_map<int64_t, RunningRequest> running_;
};

}  // namespace cai
