/* A stand-in libcurand.so.10 for a GPU machine whose CUDA libraries come from torch's wheels,
 * which ship no cuRAND (torch 2.15's cu13 set). candle creates a cuRAND generator with every CUDA
 * device; the server never draws random numbers on the device (the sampler's host RNG is the
 * one source of noise, so a seed draws the same noise on every device). Creating, seeding and
 * destroying succeed; any generation fails with CURAND_STATUS_NOT_INITIALIZED, so a device-side
 * draw is an error, never silent garbage. scripts/gpu-check.sh uses it only when no real
 * libcurand.so.10 is found. Built by scripts/gpu-bundle.sh:
 *   gcc -shared -fPIC -Wl,-soname,libcurand.so.10 -o libcurand.so.10 curand_shim.c */
#include <stddef.h>

typedef int curandStatus_t;
typedef void *curandGenerator_t;
enum { SUCCESS = 0, NOT_INITIALIZED = 101 };
static int generator;

curandStatus_t curandCreateGenerator(curandGenerator_t *g, int type) {
    (void)type;
    *g = &generator;
    return SUCCESS;
}
curandStatus_t curandDestroyGenerator(curandGenerator_t g) { (void)g; return SUCCESS; }
curandStatus_t curandSetStream(curandGenerator_t g, void *s) { (void)g; (void)s; return SUCCESS; }
curandStatus_t curandSetPseudoRandomGeneratorSeed(curandGenerator_t g, unsigned long long s) {
    (void)g; (void)s;
    return SUCCESS;
}
curandStatus_t curandGenerateUniform(curandGenerator_t g, float *o, size_t n) {
    (void)g; (void)o; (void)n;
    return NOT_INITIALIZED;
}
curandStatus_t curandGenerateUniformDouble(curandGenerator_t g, double *o, size_t n) {
    (void)g; (void)o; (void)n;
    return NOT_INITIALIZED;
}
curandStatus_t curandGenerateNormal(curandGenerator_t g, float *o, size_t n, float m, float s) {
    (void)g; (void)o; (void)n; (void)m; (void)s;
    return NOT_INITIALIZED;
}
curandStatus_t curandGenerateNormalDouble(curandGenerator_t g, double *o, size_t n, double m,
                                          double s) {
    (void)g; (void)o; (void)n; (void)m; (void)s;
    return NOT_INITIALIZED;
}
