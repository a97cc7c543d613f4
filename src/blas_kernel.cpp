// attn chooses the OpenBLAS kernel itself (policy in attn/runtime.h).
//
// How: Debian's OpenBLAS is a DYNAMIC_ARCH build, which carries every x86-64 kernel and picks
// one in gotoblas_dynamic_init() when it loads (reading OPENBLAS_CORETYPE, else the CPU model).
// Both that function and gotoblas_dynamic_quit() are exported; calling quit and then init with
// OPENBLAS_CORETYPE naming the kernel we want makes OpenBLAS redo its own choice, through its own
// code, before attn makes any BLAS call. They are looked up with dlsym, so an OpenBLAS built for
// one CPU (no DYNAMIC_ARCH) or another BLAS is simply left alone.
#include "blas_kernel.h"

#include <cblas.h>
#include <dlfcn.h>
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <mutex>
#include <sstream>

#include "attn/runtime.h"
#include "kernels/flash/flash_attention_bf16.h"
#include "kernels/common/simd_target.h"

namespace attn::detail {

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

std::string current_kernel() {
  const char* name = openblas_get_corename();
  return name ? name : "";
}

struct KernelChoice {
  std::mutex mutex;
  bool done = false;
  std::string by = "OpenBLAS";
};

KernelChoice& choice() {
  static KernelChoice c;
  return c;
}

// Redoes OpenBLAS's load-time kernel choice with OPENBLAS_CORETYPE=name, then restores the
// environment as it was (so child processes see what the user set, not attn's choice).
std::string redo_openblas_choice(const std::string& name) {
  using Fn = void (*)();
  const auto quit = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "gotoblas_dynamic_quit"));
  const auto init = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "gotoblas_dynamic_init"));
  if (quit == nullptr || init == nullptr) return current_kernel();
  const char* old = std::getenv("OPENBLAS_CORETYPE");
  const std::string saved = old ? old : "";
  setenv("OPENBLAS_CORETYPE", name.c_str(), 1);
  quit();
  init();
  if (old) {
    setenv("OPENBLAS_CORETYPE", saved.c_str(), 1);
  } else {
    unsetenv("OPENBLAS_CORETYPE");
  }
  return current_kernel();
}

void apply_policy_locked(KernelChoice& c) {
  const std::string picked = current_kernel();
  const std::string better = better_blas_kernel(picked, cpu_blas_tier());
  if (better.empty()) return;
  const std::string now = redo_openblas_choice(better);
  if (lower(now) == lower(better)) c.by = "attn (OpenBLAS chose " + picked + ")";
}

// When the library loads, before main and before any BLAS call of the program.
[[maybe_unused]] const bool kChosenAtLoad = (choose_blas_kernel(), true);

}  // namespace

std::atomic<bool> blas_kernel_chosen{false};

BlasTier blas_tier_of_kernel(const std::string& name) {
  const std::string n = lower(name);
  if (n == "skylakex" || n == "cooperlake" || n == "sapphirerapids") return BlasTier::avx512;
  if (n == "haswell" || n == "zen") return BlasTier::avx2;
  if (n == "sandybridge" || n == "bulldozer" || n == "piledriver" || n == "steamroller" ||
      n == "excavator")
    return BlasTier::avx;
  return BlasTier::generic;
}

BlasTier cpu_blas_tier() {
  __builtin_cpu_init();
  // OpenBLAS's SkylakeX kernels use AVX-512 F, BW, DQ and VL; __builtin_cpu_supports also checks
  // that the operating system saves the wide registers.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return BlasTier::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return BlasTier::avx2;
  if (__builtin_cpu_supports("avx")) return BlasTier::avx;
  return BlasTier::generic;
}

std::string better_blas_kernel(const std::string& current, BlasTier cpu) {
  if (blas_tier_of_kernel(current) >= cpu) return "";
  switch (cpu) {
    case BlasTier::avx512: return "SkylakeX";
    case BlasTier::avx2: return "Haswell";
    case BlasTier::avx: return "Sandybridge";
    case BlasTier::generic: return "";
  }
  return "";
}

void choose_blas_kernel() {
  KernelChoice& c = choice();
  const std::lock_guard<std::mutex> lock(c.mutex);
  if (c.done) return;
  c.done = true;
  const char* forced = std::getenv("OPENBLAS_CORETYPE");
  if (forced != nullptr && *forced != '\0') {
    c.by = "OPENBLAS_CORETYPE";
  } else {
    apply_policy_locked(c);
  }
  blas_kernel_chosen.store(true, std::memory_order_release);
}

std::string switch_blas_kernel(const std::string& name) {
  ensure_blas_kernel();
  KernelChoice& c = choice();
  const std::lock_guard<std::mutex> lock(c.mutex);
  const std::string now = redo_openblas_choice(name);
  c.by = "switch_blas_kernel";
  return now;
}

void reapply_blas_kernel_policy() {
  ensure_blas_kernel();
  KernelChoice& c = choice();
  const std::lock_guard<std::mutex> lock(c.mutex);
  c.by = "OpenBLAS";
  apply_policy_locked(c);
}

}  // namespace attn::detail

namespace attn {

RuntimeInfo runtime_info() {
  detail::ensure_blas_kernel();
  RuntimeInfo info;
  info.simd_target = kernels::dispatched_simd_target();
  const char* config = openblas_get_config();
  info.blas_library = config ? config : "";
  info.blas_kernel = detail::current_kernel();
  {
    auto& c = detail::choice();
    const std::lock_guard<std::mutex> lock(c.mutex);
    info.blas_kernel_by = c.by;
  }
  const kernels::Bf16KernelChoice bf16 = kernels::bf16_kernel_choice();
  info.bf16_kernel = bf16.dot ? "dot" : "widen";
  info.bf16_kernel_by = bf16.by;
  info.blas_threads = openblas_get_num_threads();
  info.openmp_threads = omp_get_max_threads();
  cpu_set_t set;
  info.cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  return info;
}

std::string runtime_summary() {
  const RuntimeInfo r = runtime_info();
  std::ostringstream out;
  out << "SIMD target: " << r.simd_target << "\n"
      << "BLAS: " << r.blas_library << "\n"
      << "BLAS kernel: " << r.blas_kernel << " (chosen by " << r.blas_kernel_by << ")\n"
      << "bf16 attention kernel: " << r.bf16_kernel << " (" << r.bf16_kernel_by << ")\n"
      << "threads: " << r.openmp_threads << " OpenMP, " << r.blas_threads << " BLAS, "
      << r.cores << " cores available\n";
  return out.str();
}

}  // namespace attn
