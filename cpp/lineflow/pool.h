// A persistent thread pool sized to the machine: the native module's parallel loops run on it.
// Workers and the caller spin for a few tens of microseconds before sleeping on a condition variable:
// waking a sleeping thread costs more than a whole preprocessing call (benchmarks/NOTES.md, "Native pre/post-processing", v5).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace lineflow {

class Pool {
 public:
  explicit Pool(int n);
  ~Pool();
  int size() const { return static_cast<int>(workers_.size()) + 1; }  // the caller works too
  void resize(int n);  // waits for a running parallel region to end first
  // fn(task) for task in [0, tasks), spread over the pool; returns when all are done
  void run(int64_t tasks, const std::function<void(int64_t)>& fn);

 private:
  void start(int n);
  void work();
  void loop();
  void stop();

  std::vector<std::thread> workers_;
  std::mutex m_, call_mutex_;
  std::condition_variable cv_, finished_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<int> active_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> done_{false};
};

int machine_threads();  // CPUs this process may run on (its affinity mask)
Pool& pool();           // the module's pool, created on first use with machine_threads() threads

}  // namespace lineflow
