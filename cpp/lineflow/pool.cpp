#include "pool.h"

#include <algorithm>
#include <chrono>
#include <sched.h>

namespace lineflow {

namespace {
// true once pred() holds, false if it did not within the spin budget
template <typename Pred>
bool spin_until(Pred pred) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
  for (int i = 0;; ++i) {
    if (pred()) return true;
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) return false;
    __builtin_ia32_pause();
  }
}
}  // namespace

Pool::Pool(int n) { start(n); }
Pool::~Pool() { stop(); }

void Pool::start(int n) {
  done_.store(false);
  for (int i = 0; i < n - 1; ++i) workers_.emplace_back([this] { loop(); });
}

void Pool::resize(int n) {
  std::lock_guard<std::mutex> call(call_mutex_);  // never while a parallel region runs
  stop();
  start(n);
}

void Pool::run(int64_t tasks, const std::function<void(int64_t)>& fn) {
  if (tasks <= 0) return;
  std::unique_lock<std::mutex> call(call_mutex_);  // one parallel region at a time
  if (workers_.empty() || tasks == 1) {
    for (int64_t t = 0; t < tasks; ++t) fn(t);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(m_);
    fn_ = &fn;
    tasks_ = tasks;
    next_.store(0);
    active_.store(static_cast<int>(workers_.size()));
    generation_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  work();
  if (!spin_until([this] { return active_.load(std::memory_order_acquire) == 0; })) {
    std::unique_lock<std::mutex> lk(m_);
    finished_.wait(lk, [this] { return active_.load() == 0; });
  }
  fn_ = nullptr;
}

void Pool::work() {
  for (int64_t t = next_.fetch_add(1); t < tasks_; t = next_.fetch_add(1)) (*fn_)(t);
}

void Pool::loop() {
  uint64_t seen = 0;
  for (;;) {
    auto ready = [&] { return done_.load() || generation_.load(std::memory_order_acquire) != seen; };
    if (!spin_until(ready)) {
      std::unique_lock<std::mutex> lk(m_);
      cv_.wait(lk, ready);
    }
    if (done_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    work();
    if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lk(m_);  // the caller may be asleep on finished_
      finished_.notify_all();
    }
  }
}

void Pool::stop() {
  {
    std::lock_guard<std::mutex> lk(m_);
    done_.store(true);
  }
  cv_.notify_all();
  for (auto& w : workers_) w.join();
  workers_.clear();
}

int machine_threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

Pool& pool() {
  static Pool p(machine_threads());
  return p;
}

}  // namespace lineflow
