"""cffi builder (API mode) of ``kvm_exporter.sources._procscan``: a compiled /proc census.

``kvm_census(dir_fd, rows, cap)`` reads ``PID/stat`` and the owner of ``PID`` for every
process under the procfs root open as ``dir_fd`` and counts them per distinct
(uid, tty_nr, state, threads), creating no Python object per process. It returns the
number of distinct rows (filling at most ``cap`` of them: call again with more room if
the result exceeds ``cap``), -1 with errno set on an I/O error, or -2 for a ``stat`` no
kernel writes. Processes that exit during the scan are skipped. ``kvm_procs(dir_fd, rows,
cap)`` makes the same reads and returns one record per process instead (the same returns:
the number of processes, of which at most ``cap`` were filled), for the named groups.

The extension is optional: ``setup.py`` loads this file by path at build time (it must
therefore import nothing from kvm_exporter) and a host without a compiler gets the
pure-Python path.
"""

from __future__ import annotations

import cffi  # type: ignore[import-untyped]

CDEF = """
struct kvm_census_row {
    uint32_t uid; uint32_t tty_nr; uint32_t threads; uint32_t count; char state;
};
int kvm_census(int dir_fd, struct kvm_census_row *rows, int cap);
struct kvm_proc_row {
    uint32_t pid; uint32_t ppid; uint32_t uid; uint32_t tty_nr; uint32_t threads; char state;
    char comm[64]; uint64_t utime; uint64_t stime; uint64_t starttime; uint64_t vsize;
    uint64_t rss;
};
int kvm_procs(int dir_fd, struct kvm_proc_row *rows, int cap);
"""

C_SOURCE = r"""
#ifndef _GNU_SOURCE /* Python.h, included first, defines it already */
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct kvm_census_row {
    uint32_t uid; uint32_t tty_nr; uint32_t threads; uint32_t count; char state;
};

struct kvm_proc_row {
    uint32_t pid; uint32_t ppid; uint32_t uid; uint32_t tty_nr; uint32_t threads; char state;
    char comm[64]; uint64_t utime; uint64_t stime; uint64_t starttime; uint64_t vsize;
    uint64_t rss;
};

/* Open addressing, linear probing; a slot with count 0 is free. */
struct census_table { struct kvm_census_row *slots; size_t mask, used; };

static size_t census_hash(uint32_t uid, uint32_t tty, uint32_t threads, char state)
{
    uint64_t h = (uint64_t)uid * 0x9E3779B97F4A7C15ull;
    h ^= (uint64_t)tty * 0xC2B2AE3D27D4EB4Full;
    h ^= (uint64_t)threads * 0x165667B19E3779F9ull;
    h ^= (unsigned char)state;
    h ^= h >> 29;
    return (size_t)h;
}

static struct kvm_census_row *census_slot(const struct census_table *t, uint32_t uid,
                                          uint32_t tty, uint32_t threads, char state)
{
    size_t i = census_hash(uid, tty, threads, state) & t->mask;
    for (;; i = (i + 1) & t->mask) {
        struct kvm_census_row *s = &t->slots[i];
        if (s->count == 0 || (s->uid == uid && s->tty_nr == tty && s->threads == threads
                              && s->state == state))
            return s;
    }
}

static int census_grow(struct census_table *t)
{
    size_t size = 2 * (t->mask + 1);
    struct census_table n = { calloc(size, sizeof *n.slots), size - 1, t->used };
    if (n.slots == NULL)
        return -1;
    for (size_t i = 0; i <= t->mask; i++)
        if (t->slots[i].count)
            *census_slot(&n, t->slots[i].uid, t->slots[i].tty_nr, t->slots[i].threads,
                         t->slots[i].state) = t->slots[i];
    free(t->slots);
    *t = n;
    return 0;
}

static int census_add(struct census_table *t, uint32_t uid, uint32_t tty, uint32_t threads,
                      char state)
{
    struct kvm_census_row *s = census_slot(t, uid, tty, threads, state);
    if (s->count) {
        s->count++;
        return 0;
    }
    if (2 * (t->used + 1) > t->mask + 1) { /* keep the load at most 1/2 */
        if (census_grow(t) != 0)
            return -1;
        s = census_slot(t, uid, tty, threads, state);
    }
    s->uid = uid; s->tty_nr = tty; s->threads = threads; s->state = state; s->count = 1;
    t->used++;
    return 0;
}

/* A decimal field ending at a space or newline; *p moves past that separator.
   tty_nr is an int in the kernel (a u32 device encoding), so it may read negative. */
static int census_number(const char **p, const char *end, int sign_ok, uint32_t *out)
{
    const char *q = *p;
    int neg = sign_ok && q < end && *q == '-';
    uint64_t v = 0;
    q += neg;
    const char *digits = q;
    for (; q < end && *q >= '0' && *q <= '9'; q++) {
        v = v * 10 + (uint64_t)(*q - '0');
        if (v > 0xFFFFFFFFull)
            return -1;
    }
    if (q == digits || q == end || (*q != ' ' && *q != '\n'))
        return -1;
    *out = neg ? (uint32_t)(0u - (uint32_t)v) : (uint32_t)v;
    *p = q + 1;
    return 0;
}

/* Fields 8..19 are not needed: skip twelve non-empty space-terminated fields. */
static int census_skip(const char **p, const char *end, int n)
{
    const char *q = *p;
    while (n--) {
        const char *start = q;
        while (q < end && *q != ' ')
            q++;
        if (q == start || q == end)
            return -1;
        q++;
    }
    *p = q;
    return 0;
}

/* Parse one PID/stat: "pid (comm) S ppid pgrp session tty_nr ... num_threads ..." */
static int census_parse(const char *buf, size_t n, char *state, uint32_t *tty, uint32_t *threads)
{
    const char *end = buf + n, *rp = memrchr(buf, ')', n);
    uint32_t ignored;
    if (rp == NULL || memchr(buf, '(', (size_t)(rp - buf)) == NULL || end - rp < 4
        || rp[1] != ' ' || rp[3] != ' ')
        return -1;
    *state = rp[2];
    const char *p = rp + 4;
    for (int i = 0; i < 3; i++) /* ppid pgrp session */
        if (census_number(&p, end, 0, &ignored) != 0)
            return -1;
    if (census_number(&p, end, 1, tty) != 0 || census_skip(&p, end, 12) != 0
        || census_number(&p, end, 0, threads) != 0)
        return -1;
    return 0;
}

static int census_gone(int err) { return err == ENOENT || err == ESRCH; }

/* Called with each process's name (its pid), the owner of PID, and PID/stat (NUL-ended, n
   bytes); returns 0 to go on, or the value walk_procs returns. */
typedef int (*proc_fn)(void *ctx, const char *pid, uint32_t uid, const char *stat, size_t n);

/* Every process under dir_fd: 0, -1 with errno set on an I/O error, or what each returned.
   Processes that exit during the walk are skipped. */
static int walk_procs(int dir_fd, proc_fn each, void *ctx)
{
    int fd = fcntl(dir_fd, F_DUPFD_CLOEXEC, 0), ret = 0, saved;
    DIR *d = fd < 0 ? NULL : fdopendir(fd);
    char path[NAME_MAX + 8], buf[4097];
    struct dirent *e;
    struct stat st;

    if (d == NULL) {
        saved = errno;
        if (fd >= 0)
            close(fd);
        errno = saved;
        return -1;
    }
    rewinddir(d); /* the duplicate shares dir_fd's offset, maybe left at the end */
    for (;;) {
        errno = 0;
        if ((e = readdir(d)) == NULL) {
            if (errno)
                ret = -1;
            break;
        }
        const char *name = e->d_name;
        size_t len = strspn(name, "0123456789");
        if (len == 0 || name[len] != '\0')
            continue;
        memcpy(path, name, len);
        memcpy(path + len, "/stat", 6);
        int sfd = openat(dir_fd, path, O_RDONLY | O_CLOEXEC);
        if (sfd < 0) {
            if (census_gone(errno))
                continue;
            ret = -1;
            break;
        }
        ssize_t n = read(sfd, buf, sizeof buf - 1);
        saved = errno;
        close(sfd);
        if (n < 0) {
            if (census_gone(saved))
                continue;
            errno = saved;
            ret = -1;
            break;
        }
        if (n == 0)
            continue; /* a pid being reaped can read as empty */
        buf[n] = '\0';
        if (fstatat(dir_fd, name, &st, 0) != 0) {
            if (census_gone(errno))
                continue;
            ret = -1;
            break;
        }
        if ((ret = each(ctx, name, (uint32_t)st.st_uid, buf, (size_t)n)) != 0)
            break;
    }
    saved = errno;
    closedir(d);
    errno = saved;
    return ret;
}

static int census_each(void *ctx, const char *pid, uint32_t uid, const char *stat, size_t n)
{
    char state;
    uint32_t tty, threads;
    (void)pid;
    if (census_parse(stat, n, &state, &tty, &threads) != 0)
        return -2;
    if (census_add(ctx, uid, tty, threads, state) != 0) {
        errno = ENOMEM;
        return -1;
    }
    return 0;
}

int kvm_census(int dir_fd, struct kvm_census_row *rows, int cap)
{
    struct census_table t = { calloc(64, sizeof *t.slots), 63, 0 };
    int ret, saved;

    if (t.slots == NULL) {
        errno = ENOMEM;
        return -1;
    }
    ret = walk_procs(dir_fd, census_each, &t);
    saved = errno;
    if (ret == 0) {
        size_t k = 0;
        for (size_t i = 0; i <= t.mask; i++)
            if (t.slots[i].count && k < (size_t)(cap > 0 ? cap : 0))
                rows[k++] = t.slots[i];
        ret = t.used > 0x7FFFFFFF ? 0x7FFFFFFF : (int)t.used;
    }
    free(t.slots);
    errno = saved;
    return ret;
}

/* A decimal u64 field ending at a space or newline; *p moves past that separator. */
static int procs_u64(const char **p, const char *end, uint64_t *out)
{
    const char *q = *p, *digits = q;
    uint64_t v = 0;
    for (; q < end && *q >= '0' && *q <= '9'; q++) {
        if (v > (UINT64_MAX - 9) / 10)
            return -1;
        v = v * 10 + (uint64_t)(*q - '0');
    }
    if (q == digits || q == end || (*q != ' ' && *q != '\n'))
        return -1;
    *out = v;
    *p = q + 1;
    return 0;
}

/* One PID/stat into a record: comm, state, ppid, tty_nr, utime, stime, threads, starttime,
   vsize and rss (fields 2-4, 7, 14, 15, 20, 22-24 of proc(5)). comm fits: the kernel prints
   at most 63 bytes of it (do_task_stat's tcomm[64] in fs/proc/array.c). */
static int procs_parse(const char *buf, size_t n, struct kvm_proc_row *r)
{
    const char *end = buf + n, *rp = memrchr(buf, ')', n), *lp = memchr(buf, '(', n);
    uint32_t ignored;
    if (rp == NULL || lp == NULL || lp > rp || end - rp < 4 || rp[1] != ' ' || rp[3] != ' ')
        return -1;
    size_t len = (size_t)(rp - lp - 1);
    if (len > sizeof r->comm - 1)
        len = sizeof r->comm - 1;
    memcpy(r->comm, lp + 1, len);
    r->comm[len] = '\0';
    r->state = rp[2];
    const char *p = rp + 4;
    if (census_number(&p, end, 0, &r->ppid) != 0 || census_number(&p, end, 0, &ignored) != 0
        || census_number(&p, end, 0, &ignored) != 0 || census_number(&p, end, 1, &r->tty_nr) != 0
        || census_skip(&p, end, 6) != 0 || procs_u64(&p, end, &r->utime) != 0
        || procs_u64(&p, end, &r->stime) != 0 || census_skip(&p, end, 4) != 0
        || census_number(&p, end, 0, &r->threads) != 0 || census_skip(&p, end, 1) != 0
        || procs_u64(&p, end, &r->starttime) != 0 || procs_u64(&p, end, &r->vsize) != 0
        || procs_u64(&p, end, &r->rss) != 0)
        return -1;
    return 0;
}

struct procs_out { struct kvm_proc_row *rows; int cap, n; };

static int procs_each(void *ctx, const char *pid, uint32_t uid, const char *stat, size_t n)
{
    struct procs_out *out = ctx;
    if (out->n < out->cap) {
        struct kvm_proc_row *r = &out->rows[out->n];
        if (procs_parse(stat, n, r) != 0)
            return -2;
        r->pid = (uint32_t)strtoul(pid, NULL, 10);
        r->uid = uid;
    }
    if (out->n == 0x7FFFFFFF)
        return 0;
    out->n++;
    return 0;
}

int kvm_procs(int dir_fd, struct kvm_proc_row *rows, int cap)
{
    struct procs_out out = { rows, cap, 0 };
    int ret = walk_procs(dir_fd, procs_each, &out);
    return ret != 0 ? ret : out.n;
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvm_exporter.sources._procscan", C_SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
