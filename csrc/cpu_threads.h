// The CPU kernels' threads (paged_attention.cpp, linear.cpp): the OpenMP runtime already in the
// process (torch's libgomp, found by its soname without loading anything), so a kernel's threads
// are torch's own intra-op threads: no second pool competing for the cores, no link-time
// dependency. Absent (no libgomp loaded): one thread.
#pragma once

#include <algorithm>
#include <cstdint>
#ifdef __linux__
#include <dlfcn.h>
#endif

namespace cai {

struct Gomp {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;
  int (*thread_num)() = nullptr;
  int (*num_threads)() = nullptr;
  int (*max_threads)() = nullptr;

  // torch's intra-op thread count (1 without the runtime)
  int64_t threads() const { return parallel ? std::max(1, max_threads()) : 1; }
};

inline const Gomp& gomp() {
  static const Gomp found = [] {
    Gomp g;
#ifdef __linux__
    if (void* lib = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD)) {
      g.parallel = reinterpret_cast<decltype(g.parallel)>(dlsym(lib, "GOMP_parallel"));
      g.thread_num = reinterpret_cast<decltype(g.thread_num)>(dlsym(lib, "omp_get_thread_num"));
      g.num_threads = reinterpret_cast<decltype(g.num_threads)>(dlsym(lib, "omp_get_num_threads"));
      g.max_threads = reinterpret_cast<decltype(g.max_threads)>(dlsym(lib, "omp_get_max_threads"));
      if (!g.thread_num || !g.num_threads || !g.max_threads) g.parallel = nullptr;
    }
#endif
    return g;
  }();
  return found;
}

// task(t) for every t in [0, count), spread over at most `count` of torch's threads (thread i
// takes i, i + threads, ...); inline where there is one thread or one task.
template <typename Task>
void parallel_tasks(int64_t count, const Task& task) {
  const Gomp& omp = gomp();
  const int64_t threads = std::min(omp.threads(), count);
  if (threads <= 1) {
    for (int64_t t = 0; t < count; ++t) task(t);
    return;
  }
  struct Shared {
    const Task* task;
    int64_t count;
  } shared{&task, count};
  omp.parallel(
      [](void* data) {
        const Shared& s = *static_cast<const Shared*>(data);
        const int64_t step = gomp().num_threads();
        for (int64_t t = gomp().thread_num(); t < s.count; t += step) (*s.task)(t);
      },
      &shared, static_cast<unsigned>(threads), 0);
}

}  // namespace cai
