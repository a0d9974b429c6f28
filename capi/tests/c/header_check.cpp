// tprun.h from C++ with -Wall -Wextra -Werror: NCCL-style calls on std::vector, one all-reduce,
// one grouped ring. Run under `tprun -n 2`.
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "tprun.h"

static void check(tprunResult_t r, const char* what) {
  if (r != tprunSuccess)
    throw std::runtime_error(std::string(what) + ": " + tprunGetErrorString(r) + ": " +
                             tprunGetLastError(nullptr));
}

int main() {
  try {
    tprunComm_t comm = nullptr;
    check(tprunCommInitFromEnv(&comm), "init");
    int n = 0, me = 0;
    check(tprunCommCount(comm, &n), "count");
    check(tprunCommUserRank(comm, &me), "rank");
    std::vector<double> v(1000, me + 1.0), sum(v.size());
    check(tprunAllReduce(v.data(), sum.data(), v.size(), tprunDouble, tprunSum, comm), "all-reduce");
    std::vector<int> out(4, me), in(4, -1);
    check(tprunGroupStart(), "group start");
    check(tprunSend(out.data(), out.size(), tprunInt, (me + 1) % n, comm), "send");
    check(tprunRecv(in.data(), in.size(), tprunInt, (me + n - 1) % n, comm), "recv");
    check(tprunGroupEnd(), "group end");
    check(tprunCommDestroy(comm), "destroy");
    const double want = n * (n + 1) / 2.0;
    if (sum[999] != want || in[3] != (me + n - 1) % n) {
      std::fprintf(stderr, "rank %d: sum %g (want %g), ring %d\n", me, sum[999], want, in[3]);
      return 1;
    }
    std::printf("rank %d: C++ ok\n", me);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
