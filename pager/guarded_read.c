/*
 * Reading a memory file's mapping without dying of a truncation.
 *
 * A page of a shared file mapping that lies past the file's end (someone truncated the memory
 * file) raises SIGBUS when read. The pager reads its mappings from user space in one place: the
 * zero test, which looks at each data page once per memory file. That read runs here, in C,
 * with a SIGBUS handler armed for the calling thread: a fault jumps back (siglongjmp) into the
 * function that read, which returns how far it got. No Rust frame is skipped by the jump: it
 * starts and lands inside `uffdpager_classify_pages`. A SIGBUS on a thread that is not reading
 * here goes to the handler that was installed before (Rust's runtime, or the default action).
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define PAGE 4096u
#define PREFETCH_AHEAD 8u

static struct sigaction previous;
static __thread sigjmp_buf landing;
static __thread volatile sig_atomic_t armed;

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    if (armed) {
        armed = 0;
        siglongjmp(landing, 1);
    }
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, context);
            return;
        }
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* The default action: returning re-runs the faulting access, which now ends the process. */
    signal(sig, SIG_DFL);
}

/* Installs the handler. Call once per process (the Rust side guards it with a Once). */
int uffdpager_guard_install(void)
{
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    return sigaction(SIGBUS, &action, &previous);
}

/* True when the `len` bytes at `p` are all zero. A page of data usually says so in its first
 * word. (Words are loaded with memcpy: `p` need not be aligned; the compiler makes plain loads.) */
static uint64_t word_at(const uint8_t *p)
{
    uint64_t w;
    memcpy(&w, p, sizeof w);
    return w;
}

static int is_zero(const uint8_t *p, size_t len)
{
    size_t words = len / 8;
    if (words > 0 && word_at(p) != 0)
        return 0;
    uint64_t any = 0;
    for (size_t i = 0; i < words; i++)
        any |= word_at(p + i * 8);
    for (size_t i = words * 8; i < len; i++)
        any |= p[i];
    return any == 0;
}

/*
 * For each i < n: zero[i] = 1 if 4 KiB page pages[i] of the `len`-byte mapping at `base` holds
 * only zeros (the last page may be short), else 0. Every page must start inside the mapping.
 * Returns n, or the index of the first page whose read raised SIGBUS (zero[] is filled up to it).
 */
size_t uffdpager_classify_pages(const uint8_t *base, size_t len, const uint64_t *pages, size_t n,
                                uint8_t *zero)
{
    /* volatile: its value must survive the jump back. */
    volatile size_t done = 0;
    if (sigsetjmp(landing, 1) != 0)
        return done;
    armed = 1;
    for (size_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) /* a hint: never faults, not even past a truncated end */
            __builtin_prefetch(base + pages[i + PREFETCH_AHEAD] * PAGE);
        size_t at = pages[i] * PAGE;
        size_t page_len = len - at < PAGE ? len - at : PAGE;
        zero[i] = (uint8_t)is_zero(base + at, page_len);
        done = i + 1;
    }
    armed = 0;
    return n;
}
