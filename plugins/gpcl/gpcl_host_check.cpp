// Host check of the shared GPCL math (gpcl_math.h): the same per-group code the CUDA kernel
// runs, compiled for the CPU so CI (no GPU) can compare it with the Python reference.
//
//   gpcl_host_check MODE DTYPE EPS TAU N_GROUPS GROUPS_PER_ROW X.bin TAU.bin|- Y.bin
//
// X.bin holds N_GROUPS*4 raw elements of DTYPE (0 float32, 1 float16, 2 bfloat16); TAU.bin
// GROUPS_PER_ROW float32 values ("-" for the scalar TAU); Y.bin receives the result.
#include "gpcl_math.h"

#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <vector>

namespace
{

bool readFile(char const* path, void* data, size_t bytes)
{
    FILE* f = std::fopen(path, "rb");
    if (!f)
        return false;
    size_t const got = std::fread(data, 1, bytes, f);
    bool const exact = got == bytes && std::fgetc(f) == EOF;
    std::fclose(f);
    return exact;
}

template <typename T>
int run(long long n, long long gpr, float tau, float eps, int mode, char const* xPath, char const* tauPath,
    char const* yPath)
{
    std::vector<T> x(static_cast<size_t>(n) * 4), y(x.size());
    std::vector<float> taus(static_cast<size_t>(gpr));
    bool const perGroup = std::string_view(tauPath) != "-";
    if (!readFile(xPath, x.data(), x.size() * sizeof(T)) || (perGroup && !readFile(tauPath, taus.data(), taus.size() * sizeof(float))))
    {
        std::fprintf(stderr, "gpcl_host_check: input files do not match the sizes given\n");
        return 2;
    }
    for (long long g = 0; g < n; ++g)
        gpcl::applyGroup<T>(&x[4 * g], &y[4 * g], perGroup ? taus[g % gpr] : tau, eps, mode);
    FILE* f = std::fopen(yPath, "wb");
    if (!f || std::fwrite(y.data(), sizeof(T), y.size(), f) != y.size())
        return 2;
    return std::fclose(f) == 0 ? 0 : 2;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc != 10)
    {
        std::fprintf(stderr, "usage: %s MODE DTYPE EPS TAU N_GROUPS GROUPS_PER_ROW X.bin TAU.bin|- Y.bin\n", argv[0]);
        return 2;
    }
    int const mode = std::atoi(argv[1]), dtype = std::atoi(argv[2]);
    float const eps = std::strtof(argv[3], nullptr), tau = std::strtof(argv[4], nullptr);
    long long const n = std::atoll(argv[5]), gpr = std::atoll(argv[6]);
    if (mode < gpcl::kClamp || mode > gpcl::kHopf || n < 0 || gpr < 1)
    {
        std::fprintf(stderr, "gpcl_host_check: bad mode/size arguments\n");
        return 2;
    }
    switch (dtype)
    {
    case gpcl::kFloat32: return run<float>(n, gpr, tau, eps, mode, argv[7], argv[8], argv[9]);
    case gpcl::kFloat16: return run<__half>(n, gpr, tau, eps, mode, argv[7], argv[8], argv[9]);
    case gpcl::kBFloat16: return run<__nv_bfloat16>(n, gpr, tau, eps, mode, argv[7], argv[8], argv[9]);
    default: std::fprintf(stderr, "gpcl_host_check: bad dtype %d\n", dtype); return 2;
    }
}
