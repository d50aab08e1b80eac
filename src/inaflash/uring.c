/* Reads into registered buffers through io_uring (raw system calls: no liburing needed), one ring per reader thread.
 *
 * Why: an O_DIRECT preadv pins the destination's pages for every request; in this VM that cost ~0.09 ms of CPU per
 * MB read (~65 ms per token for naive mode's 722 MB on Qwen2.5-1.5B, on the two cores that also compute). Buffers
 * registered once with a ring stay pinned, and IORING_OP_READ_FIXED skips the pinning: fio on a store's file, 4 MiB
 * O_DIRECT reads, ~0.011 ms of system CPU per MB with fixed buffers against ~0.085 without; in naive mode the
 * process's system CPU fell from 54-55 to 16-22 ms per token (docs/measurements.md).
 *
 * The caller (reader.py) keeps preadv as its fallback: any failure here (no io_uring in the kernel or the container,
 * a locked-memory limit refusing the registration, a failed read) returns a negative errno, and that thread reads
 * the old way from then on (a failed wait may leave a completion due: the ring is never used again).
 */
#define _GNU_SOURCE  /* syscall(), MAP_POPULATE under -std=c11 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>

#if defined(__linux__) && __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

typedef struct {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ptr, *cq_ptr;
    size_t sq_len, cq_len, sqes_len;
} ring;

void inaflash_uring_close(void *p) {
    ring *r = p;
    if (!r) return;
    if (r->sqes) munmap(r->sqes, r->sqes_len);
    if (r->cq_ptr && r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_len);
    if (r->sq_ptr) munmap(r->sq_ptr, r->sq_len);
    if (r->fd >= 0) close(r->fd);
    free(r);
}

/* a ring of a few entries (one read at a time per thread), or NULL with errno set */
void *inaflash_uring_open(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    ring *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->fd = (int)syscall(__NR_io_uring_setup, 4, &p);
    if (r->fd < 0) { free(r); return NULL; }
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) r->sq_len = r->cq_len = r->sq_len > r->cq_len ? r->sq_len : r->cq_len;
    r->sq_ptr = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
    if (r->sq_ptr == MAP_FAILED) { r->sq_ptr = NULL; inaflash_uring_close(r); return NULL; }
    r->cq_ptr = (p.features & IORING_FEAT_SINGLE_MMAP) ? r->sq_ptr
              : mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
    if (r->cq_ptr == MAP_FAILED) { r->cq_ptr = NULL; inaflash_uring_close(r); return NULL; }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) { r->sqes = NULL; inaflash_uring_close(r); return NULL; }
    char *sq = r->sq_ptr, *cq = r->cq_ptr;
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return r;
}

/* the ring's fixed buffers become these n (address, length) pairs, replacing any before: 0 or -errno */
int inaflash_uring_register(void *p, const uint64_t *addrs, const uint64_t *lens, int n) {
    ring *r = p;
    syscall(__NR_io_uring_register, r->fd, IORING_UNREGISTER_BUFFERS, NULL, 0);  /* none yet: EINVAL, harmless */
    if (n == 0) return 0;
    struct iovec *iov = calloc((size_t)n, sizeof *iov);
    if (!iov) return -ENOMEM;
    for (int i = 0; i < n; i++) { iov[i].iov_base = (void *)(uintptr_t)addrs[i]; iov[i].iov_len = lens[i]; }
    long rc = syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_BUFFERS, iov, n);
    free(iov);
    return rc < 0 ? -errno : 0;
}

/* read len bytes of fd at offset into addr, which lies inside fixed buffer buf: the bytes read (one request, as
   pread: the caller loops on a short read) or -errno */
int64_t inaflash_uring_read(void *p, int fd, int buf, void *addr, uint64_t len, uint64_t offset) {
    ring *r = p;
    unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_READ_FIXED;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)addr;
    sqe->len = (uint32_t)len;
    sqe->off = offset;
    sqe->buf_index = (uint16_t)buf;
    r->sq_array[idx] = idx;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    long rc;
    do rc = syscall(__NR_io_uring_enter, r->fd, 1, 0, 0, NULL, 0); while (rc < 0 && errno == EINTR);
    if (rc != 1) {  /* not taken: withdrawn (this thread is the ring's only producer) */
        int err = rc < 0 ? errno : EAGAIN;
        __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
        return -err;
    }
    while (__atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) == *r->cq_head) {  /* wait for its completion */
        rc = syscall(__NR_io_uring_enter, r->fd, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        if (rc < 0 && errno != EINTR) return -errno;
    }
    unsigned head = *r->cq_head;
    int64_t res = r->cqes[head & *r->cq_mask].res;
    __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
    return res;
}

#else  /* no io_uring here: reader.py reads with preadv */
void *inaflash_uring_open(void) { return NULL; }
int inaflash_uring_register(void *p, const uint64_t *addrs, const uint64_t *lens, int n) {
    (void)p; (void)addrs; (void)lens; (void)n;
    return -ENOSYS;
}
int64_t inaflash_uring_read(void *p, int fd, int buf, void *addr, uint64_t len, uint64_t offset) {
    (void)p; (void)fd; (void)buf; (void)addr; (void)len; (void)offset;
    return -ENOSYS;
}
void inaflash_uring_close(void *p) { (void)p; }
#endif
