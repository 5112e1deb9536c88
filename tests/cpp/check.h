// A minimal check macro for the C++ unit tests: prints the failing expression and counts failures.
#pragma once
#include <cstdio>

inline int& check_failures() {
  static int n = 0;
  return n;
}

#define CHECK(cond, ...)                                                  \
  do {                                                                    \
    if (!(cond)) {                                                        \
      if (++check_failures() <= 20) {                                     \
        std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                                \
        std::fprintf(stderr, "\n");                                       \
      }                                                                   \
    }                                                                     \
  } while (0)

#define CHECK_REPORT()                                                    \
  (check_failures() ? (std::fprintf(stderr, "%d checks failed\n", check_failures()), 1) \
                    : (std::printf("all checks passed\n"), 0))
