// The team algorithm of csrc/common/lsa_team.h run on the CPU by a team of several std::threads on one
// problem: the multi-lane logic of the CUDA kernels (column striding, cross-lane reductions, lane-0
// updates between barriers, lanes without columns, double-buffered slots) tested without a GPU.
// A lane that parts from the others (a bug) makes the run throw instead of hang. Test-only and slow: one
// condition-variable barrier per reduction.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <future>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/lsa_team.h"

namespace merging_kernels {
namespace lsa {
namespace team {

constexpr int kMaxLanes = 1024;  // a CUDA block's thread limit

// Thrown to a lane whose team can no longer meet at a barrier (see Barrier::leave).
struct TeamDiverged {};

// Blocks until `count` threads have arrived. A sleeping barrier, not a spin one: the team has far more
// threads than the machine has cores. The mutex orders every thread's writes before its arrival ahead
// of every thread's reads after its release.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (left_ > 0) throw TeamDiverged{};
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
      return;
    }
    released_.wait(lock, [&] { return generation_ != generation || left_ > 0; });
    if (generation_ == generation) throw TeamDiverged{};
  }

  // A lane is done with the team. Lanes pass the same barriers, so any lane waiting at (or later
  // arriving at) a barrier now has diverged from the others: it throws instead of waiting forever,
  // and a bug in the team algorithm fails a test instead of hanging it.
  void leave() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++left_;
    released_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const int count_;
  int arrived_ = 0, left_ = 0;
  uint64_t generation_ = 0;  // counts releases, so a thread woken late still sees its own release
};

// What the lanes of one team share: the barrier and double-buffered slots, one per lane (the CPU has no
// warps, so a lane's slot plays the part of a warp's slot in BlockTeam).
template <class T>
struct ThreadTeamShared {
  explicit ThreadTeamShared(int lanes) : barrier(lanes) {
    for (int p = 0; p < 2; ++p) {
      val[p].resize(lanes);
      pay[p].resize(lanes);
      val2[p].resize(lanes);
      idx[p].resize(lanes);
      idx2[p].resize(lanes);
    }
  }
  Barrier barrier;
  std::vector<T> val[2], pay[2], val2[2];
  std::vector<int> idx[2], idx2[2];
};

// One lane of a thread team, with BlockTeam's protocol: write the own slot in buffer `parity`, one
// barrier, combine all slots in lane order (so every lane holds the same result), flip parity. The
// alternating buffers keep a fast lane's next write away from slots a slow lane still reads.
template <class T>
class ThreadTeam {
 public:
  ThreadTeam(ThreadTeamShared<T>& shared, int lane, int size) : s_(shared), lane_(lane), size_(size) {}

  int lane() const { return lane_; }
  int size() const { return size_; }
  void sync() { s_.barrier.arrive_and_wait(); }

  bool any(bool b) {
    s_.idx[parity_][lane_] = b ? 1 : 0;
    sync();
    bool r = false;
    for (int l = 0; l < size_; ++l) r |= s_.idx[parity_][l] != 0;
    parity_ ^= 1;
    return r;
  }

  int broadcast0(int x) {
    if (lane_ == 0) s_.idx[parity_][0] = x;
    sync();
    x = s_.idx[parity_][0];
    parity_ ^= 1;
    return x;
  }

  T min(T x) {
    s_.val[parity_][lane_] = x;
    sync();
    x = s_.val[parity_][0];
    for (int l = 1; l < size_; ++l) {
      const T o = s_.val[parity_][l];
      x = o < x ? o : x;
    }
    parity_ ^= 1;
    return x;
  }

  void argmin(T& val, int& idx, T& pay) {
    s_.val[parity_][lane_] = val;
    s_.idx[parity_][lane_] = idx;
    s_.pay[parity_][lane_] = pay;
    sync();
    val = s_.val[parity_][0];
    idx = s_.idx[parity_][0];
    pay = s_.pay[parity_][0];
    for (int l = 1; l < size_; ++l) {
      if (lex_less(s_.val[parity_][l], s_.idx[parity_][l], val, idx)) {
        val = s_.val[parity_][l];
        idx = s_.idx[parity_][l];
        pay = s_.pay[parity_][l];
      }
    }
    parity_ ^= 1;
  }

  void top2(T& a1, int& i1, T& a2, int& i2) {
    s_.val[parity_][lane_] = a1;
    s_.idx[parity_][lane_] = i1;
    s_.val2[parity_][lane_] = a2;
    s_.idx2[parity_][lane_] = i2;
    sync();
    a1 = s_.val[parity_][0];
    i1 = s_.idx[parity_][0];
    a2 = s_.val2[parity_][0];
    i2 = s_.idx2[parity_][0];
    for (int l = 1; l < size_; ++l)
      merge_top2(a1, i1, a2, i2, s_.val[parity_][l], s_.idx[parity_][l], s_.val2[parity_][l], s_.idx2[parity_][l]);
    parity_ ^= 1;
  }

 private:
  ThreadTeamShared<T>& s_;
  const int lane_, size_;
  int parity_ = 0;
};

inline void check_lanes(int lanes) {
  if (lanes < 1 || lanes > kMaxLanes)
    throw std::invalid_argument("lanes must be in 1.." + std::to_string(kMaxLanes) +
                                " (a CUDA block's thread limit), got " + std::to_string(lanes));
}

// Solves p with a team of `lanes` threads (checked by check_lanes; lane 0 is the calling thread) and
// returns the status. Throws std::logic_error when the lanes disagree (different statuses, or different
// barriers): a bug.
template <class T>
int32_t solve_with_threads(const Problem<T>& p, int lanes) {
  ThreadTeamShared<T> shared(lanes);
  constexpr int32_t kDiverged = -1;
  std::vector<int32_t> statuses(lanes, kDiverged);
  auto run_lane = [&shared, &p, &statuses, lanes](int lane) {
    ThreadTeam<T> tm(shared, lane, lanes);
    try {
      statuses[lane] = solve(tm, p);
    } catch (const TeamDiverged&) {  // the lane keeps kDiverged
    }
    shared.barrier.leave();
  };
  // Lanes start only once the whole team exists: a team left short by a failed thread creation would
  // wait at its first barrier forever.
  std::promise<bool> start;
  std::shared_future<bool> started = start.get_future().share();
  std::vector<std::thread> threads;
  threads.reserve(lanes - 1);
  try {
    for (int l = 1; l < lanes; ++l)
      threads.emplace_back([&run_lane, started, l] {
        if (started.get()) run_lane(l);
      });
  } catch (...) {
    start.set_value(false);
    for (std::thread& t : threads) t.join();
    throw;
  }
  start.set_value(true);
  run_lane(0);
  for (std::thread& t : threads) t.join();
  for (int l = 0; l < lanes; ++l)
    if (statuses[l] != statuses[0] || statuses[l] == kDiverged)
      throw std::logic_error("the " + std::to_string(lanes) + " lanes of a thread team diverged (lane " +
                             std::to_string(l) + "): a bug in the team algorithm (csrc/common/lsa_team.h)");
  return statuses[0];
}

}  // namespace team
}  // namespace lsa
}  // namespace merging_kernels
