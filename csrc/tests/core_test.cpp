// C++ test of the core without Python: block pool, radix cache and scheduler through their plain
// C++ API (the Python suite covers the same behaviour through the bindings). Built when CMake is
// run with -DCAI_FAST_BUILD_TESTS=ON and registered with CTest; exits non-zero on the first failure.
#include "../block_pool.h"
#include "../radix_cache.h"
#include "../scheduler.h"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using cai::BatchScheduler;
using cai::BlockPool;
using cai::RadixCache;
using Ids = std::vector<int32_t>;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                        \
    }                                                                      \
  } while (0)

template <typename F>
bool throws(F&& f) {
  try {
    f();
  } catch (const std::exception&) {
    return true;
  }
  return false;
}

std::vector<int64_t> wide(const Ids& ids) { return {ids.begin(), ids.end()}; }

Ids range(int32_t from, int32_t to) {
  Ids out;
  for (int32_t t = from; t < to; ++t) out.push_back(t);
  return out;
}

void test_pool() {
  BlockPool pool(7, 3);
  CHECK((pool.alloc(3) == Ids{0, 1, 2}));
  pool.free({1, 0});
  CHECK(pool.num_free() == 6);
  CHECK((pool.alloc(3) == Ids{0, 1, 3}));
  CHECK(throws([&] { pool.free({2, 2}); }));
  CHECK(throws([&] { pool.alloc(100); }));
  CHECK(pool.check_integrity() == 0);
}

void test_radix_match_insert_evict() {
  auto pool = std::make_shared<BlockPool>(16, 2);
  RadixCache cache(pool);
  Ids a = range(0, 8);  // 4 blocks
  Ids blocks = pool->alloc(4);
  CHECK(cache.insert(a, wide(blocks)) == 0);
  Ids b = range(0, 5);  // shares 4 tokens (2 whole blocks) with a, then splits the node
  cai::MatchResult m = cache.match_prefix(b);
  CHECK(m.length == 4 && (m.blocks == Ids{blocks[0], blocks[1]}));
  Ids dup = pool->alloc(4);
  CHECK(cache.insert(a, wide(dup)) == 8);  // all cached: the caller frees its duplicates
  pool->free(wide(dup));
  cache.lock(m.node);
  CHECK(cache.protected_size() == 4 && cache.evictable_size() == 4);
  CHECK(cache.evict(100).size() == 2);  // only the unlocked leaf goes
  cache.unlock(m.node);
  CHECK(throws([&] { cache.unlock(m.node); }));
  CHECK(cache.evict(100).size() == 2);
  CHECK(cache.total_size() == 0 && pool->num_free() == 16);
  cache.check_integrity();
}

void test_scheduler_shares_a_cached_prefix() {
  auto pool = std::make_shared<BlockPool>(64, 4);
  auto cache = std::make_shared<RadixCache>(pool);
  BatchScheduler scheduler(cache, "lpm", 1000, 32, 128);
  Ids prompt = range(30, 43);  // 13 tokens
  scheduler.add(1, prompt, 7, std::nullopt);
  cai::ScheduleOutput out = scheduler.schedule(std::nullopt);
  CHECK(out.scheduled.size() == 1 && out.scheduled[0].block_table.size() == 5);
  Ids first_table = out.scheduled[0].block_table;
  Ids computed = prompt;
  for (int32_t t : {1, 2, 3, 4, 5, 6}) computed.push_back(t);  // 19 tokens: 4 whole blocks cached
  scheduler.finish(1, computed);
  CHECK(cache->total_size() == 16 && pool->num_free() == 60);
  computed.push_back(7);
  scheduler.add(2, computed, 0, std::nullopt);
  out = scheduler.schedule(std::nullopt);
  CHECK(out.scheduled.size() == 1 && out.scheduled[0].cached_len == 16);
  CHECK((Ids(out.scheduled[0].block_table.begin(), out.scheduled[0].block_table.begin() + 4) ==
         Ids(first_table.begin(), first_table.begin() + 4)));
  scheduler.abort(2);
  CHECK(cache->protected_size() == 0 && scheduler.num_running() == 0);
  CHECK(throws([&] { scheduler.finish(42, {1}); }));
  cache->check_integrity();
}

void test_scheduler_respects_the_budget() {
  auto cache = std::make_shared<RadixCache>(std::make_shared<BlockPool>(4096, 4));
  BatchScheduler scheduler(cache, "fcfs", 100, 0, 128);
  for (int64_t id = 0; id < 20; ++id) scheduler.add(id, range(id * 100, id * 100 + 7 + 3 * id), 2, std::nullopt);
  int64_t next = 0;
  while (scheduler.num_waiting() > 0) {
    cai::ScheduleOutput out = scheduler.schedule(std::nullopt);
    size_t tokens = 0;
    for (const auto& r : out.scheduled) {
      CHECK(r.request_id == next++);  // FCFS, nothing lost
      tokens += r.tokens_to_compute.size();
      scheduler.finish(r.request_id, r.tokens_to_compute);
    }
    CHECK(tokens <= 100);
    cache->check_integrity();
  }
  CHECK(next == 20);
}

}  // namespace

int main() {
  test_pool();
  test_radix_match_insert_evict();
  test_scheduler_shares_a_cached_prefix();
  test_scheduler_respects_the_budget();
  std::puts("core_test: all passed");
  return 0;
}
