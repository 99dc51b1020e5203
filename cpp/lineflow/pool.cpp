#include "pool.h"

#include <algorithm>
#include <sched.h>

namespace lineflow {

Pool::Pool(int n) { start(n); }
Pool::~Pool() { stop(); }

void Pool::start(int n) {
  done_ = false;
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
    active_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  cv_.notify_all();
  work();
  std::unique_lock<std::mutex> lk(m_);
  finished_.wait(lk, [this] { return active_ == 0; });
  fn_ = nullptr;
}

void Pool::work() {
  for (int64_t t = next_.fetch_add(1); t < tasks_; t = next_.fetch_add(1)) (*fn_)(t);
}

void Pool::loop() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(m_);
      cv_.wait(lk, [&] { return done_ || generation_ != seen; });
      if (done_) return;
      seen = generation_;
    }
    work();
    std::lock_guard<std::mutex> lk(m_);
    if (--active_ == 0) finished_.notify_all();
  }
}

void Pool::stop() {
  {
    std::lock_guard<std::mutex> lk(m_);
    done_ = true;
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
