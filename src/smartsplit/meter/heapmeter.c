/* Live-heap meter, preloaded into the meter's child process: every malloc-family call counted by its usable size.
   Read through ctypes: heapmeter_live() (bytes allocated now), heapmeter_peak() (highest since the last
   heapmeter_reset_peak()). Built by smartsplit.memory.meter with the system C compiler. */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stddef.h>
#include <stdint.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static int64_t live_bytes;
static int64_t peak_bytes;

static void grow(void *p) {
    if (!p) return;
    int64_t now = __atomic_add_fetch(&live_bytes, (int64_t)malloc_usable_size(p), __ATOMIC_RELAXED);
    int64_t peak = __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED);
    while (now > peak && !__atomic_compare_exchange_n(&peak_bytes, &peak, now, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
}

static void shrink(void *p) {
    if (p) __atomic_sub_fetch(&live_bytes, (int64_t)malloc_usable_size(p), __ATOMIC_RELAXED);
}

void *malloc(size_t n) { void *p = __libc_malloc(n); grow(p); return p; }
void *calloc(size_t k, size_t n) { void *p = __libc_calloc(k, n); grow(p); return p; }
void free(void *p) { shrink(p); __libc_free(p); }
void *realloc(void *old, size_t n) {
    size_t before = old ? malloc_usable_size(old) : 0;
    void *p = __libc_realloc(old, n);
    if (p || n == 0) {
        __atomic_sub_fetch(&live_bytes, (int64_t)before, __ATOMIC_RELAXED);
        grow(p);
    }
    return p;
}
void *memalign(size_t a, size_t n) { void *p = __libc_memalign(a, n); grow(p); return p; }
void *aligned_alloc(size_t a, size_t n) { return memalign(a, n); }
void *valloc(size_t n) { return memalign(4096, n); }
void *pvalloc(size_t n) { return memalign(4096, (n + 4095) & ~(size_t)4095); }
int posix_memalign(void **out, size_t a, size_t n) {
    void *p = memalign(a, n);
    if (!p && n) return ENOMEM;
    *out = p;
    return 0;
}

int64_t heapmeter_live(void) { return __atomic_load_n(&live_bytes, __ATOMIC_RELAXED); }
int64_t heapmeter_peak(void) { return __atomic_load_n(&peak_bytes, __ATOMIC_RELAXED); }
void heapmeter_reset_peak(void) { __atomic_store_n(&peak_bytes, heapmeter_live(), __ATOMIC_RELAXED); }
