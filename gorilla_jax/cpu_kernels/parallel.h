// Shared by the CPU kernels (kernels.cc, attention.cc): running chunks of work on the calling
// XLA thread and XLA's intra-op pool.
//
// The chunks are claimed from a shared counter. The caller waits only for chunks another
// thread has already claimed (and so is running), never for a task still queued: no deadlock
// when every pool thread is itself inside such a call.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace gorilla {

// Runs body(chunk) for chunk in [0, n) on the calling thread and up to pool.num_threads() - 1
// pool threads; returns when every chunk is done.
template <typename Body>
void ParallelChunks(xla::ffi::ThreadPool& pool, int64_t n, Body body) {
  struct Shared {
    explicit Shared(Body b, int64_t n) : body(std::move(b)), n(n) {}
    Body body;
    int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Run() {
      for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
        body(c);
        done.fetch_add(1, std::memory_order_acq_rel);
      }
    }
  };
  auto shared = std::make_shared<Shared>(std::move(body), n);
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([shared] { shared->Run(); });
  shared->Run();
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace gorilla
