"""cffi builder (API mode) of ``kvm_exporter.sources._procscan``: a compiled /proc census and
the gather of the FreeBSD source's kinfo_proc records.

``kvm_census(dir_fd, rows, cap)`` reads ``PID/stat`` and the owner of ``PID`` for every
process under the procfs root open as ``dir_fd`` and counts them per distinct
(uid, tty_nr, state, threads), creating no Python object per process. It returns the
number of distinct rows (filling at most ``cap`` of them: call again with more room if
the result exceeds ``cap``), -1 with errno set on an I/O error, or -2 for a ``stat`` no
kernel writes. Processes that exit during the scan are skipped.

``kvm_survey(dir_fd, rows, cap, procs, pcap, nprocs)`` does the same read as the census and
also fills one ``kvm_usage_row`` per process (pid, uid, and of ``PID/stat`` starttime, rss,
vsize, ppid, num_threads, state, comm, utime, stime, minflt, majflt and the same of its reaped
children: cutime, cstime, cminflt, cmajflt; at most ``pcap`` of them,
their number in ``*nprocs``: call again with more room if it exceeds ``pcap``): one walk for
the census, the resource accounting and the named groups.

``kvm_gather(records, count, size, fields, nfields, states, rows, rowsize)`` copies chosen
fields of ``count`` records of ``size`` bytes into rows of ``rowsize`` bytes, one pass over
the records: each ``kvm_field`` names a source offset and width, a destination offset and
what to do (copy the bytes, widen a signed or unsigned integer to 64 bits, or write the
record's state, an index that ``states``' translation tables give). It knows no kernel
header: the offsets come from the caller, so it compiles on Linux and FreeBSD alike.
``kvm_count(rows, count, rowsize, keyoff, keysize, keys, counts)`` then counts equal keys
(``keysize`` bytes at ``keyoff`` of each row): each distinct key once in ``keys``, in the
order first seen, its number of rows in ``counts``; it returns how many (-1 if out of memory).

``kvm_digest`` gives each usage record a keyed 64-bit digest, ``kvm_index_new`` puts one
poll's digests in a hash set and ``kvm_index_diff`` sets it against the last poll's: which
records are new or changed, which digests are gone, with no Python object per process.

The extension is optional: ``setup.py`` loads this file by path at build time (it must
therefore import nothing from kvm_exporter) and a host without a compiler gets the
pure-Python path.
"""

from __future__ import annotations

import cffi  # type: ignore[import-untyped]

ROWS = """
struct kvm_census_row {
    uint32_t uid; uint32_t tty_nr; uint32_t threads; uint32_t count; char state;
};
/* The layout of kvm_exporter.records' usage rows (USAGE_*): 64-bit numbers and comm as
   the kernel prints it, at most 63 bytes (do_task_stat's tcomm[64] in fs/proc/array.c). */
struct kvm_usage_row {
    int64_t pid; uint64_t start; uint64_t start_fraction; int64_t uid; int64_t jid;
    int64_t rss; uint64_t vsize; int64_t ppid; int64_t threads; int64_t state; char comm[64];
    uint64_t utime; uint64_t stime; uint64_t minflt; uint64_t majflt;
    uint64_t cutime; uint64_t cstime; uint64_t cminflt; uint64_t cmajflt;
};
/* kvm_gather: what a field does; the source is a native-endian integer of width bytes.
   KVM_SINCE_SEC and KVM_SINCE_USEC write a timeval less the states' boot time (seconds, then
   microseconds that borrow from the 8-byte seconds just before them in the row). */
enum kvm_field_kind { KVM_COPY, KVM_SIGNED, KVM_UNSIGNED, KVM_STATE, KVM_SINCE_SEC,
                      KVM_SINCE_USEC };
struct kvm_field { int32_t src; int32_t dst; int32_t width; int32_t kind; };
/* A FreeBSD state: word_of[stat_code[ki_stat] | sintr[low byte of ki_tdflags]
   | (ki_slptime >= maxslp)]; offsets in a record. */
struct kvm_states {
    int32_t stat; int32_t tdflags_low; int32_t slptime; uint32_t maxslp;
    uint8_t stat_code[256]; uint8_t sintr[256]; uint8_t word_of[256];
    int64_t boot_sec; int64_t boot_usec;
};
"""
"""The row and field structs, declared once for cffi and the C source alike."""

CDEF = (
    ROWS
    + """
void kvm_gather(const char *records, int count, int size, const struct kvm_field *fields,
                int nfields, const struct kvm_states *states, char *rows, int rowsize);
int kvm_count(const char *rows, int count, int rowsize, int keyoff, int keysize, char *keys,
              uint32_t *counts);
int kvm_census(int dir_fd, struct kvm_census_row *rows, int cap);
void kvm_digest(const char *rows, int count, int stride, int size, uint64_t key, uint64_t *out);
struct kvm_index;
struct kvm_index *kvm_index_new(const uint64_t *digests, int count);
void kvm_index_free(struct kvm_index *index);
int kvm_index_diff(const struct kvm_index *last, const struct kvm_index *index, int *fresh,
                   uint64_t *stale, int *nstale);
int kvm_survey(int dir_fd, struct kvm_census_row *rows, int cap,
               struct kvm_usage_row *procs, int pcap, int *nprocs);
"""
)

C_SOURCE = (
    r"""
#ifndef _GNU_SOURCE /* Python.h, included first, defines it already */
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

"""
    + ROWS
    + r"""
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

/* A decimal field of up to 64 bits ending at a space or newline (two's complement if
   negative); *p moves past that separator. */
static int census_number64(const char **p, const char *end, int sign_ok, uint64_t *out)
{
    const char *q = *p;
    int neg = sign_ok && q < end && *q == '-';
    uint64_t v = 0;
    q += neg;
    const char *digits = q;
    for (; q < end && *q >= '0' && *q <= '9'; q++) {
        if (v > (UINT64_MAX - 9) / 10)
            return -1;
        v = v * 10 + (uint64_t)(*q - '0');
    }
    if (q == digits || q == end || (*q != ' ' && *q != '\n'))
        return -1;
    *out = neg ? 0u - v : v;
    *p = q + 1;
    return 0;
}

/* A decimal field ending at a space or newline, at most 2^32 - 1 in magnitude; *p moves
   past that separator. tty_nr is an int in the kernel (a u32 device encoding), so it may
   read negative. */
static int census_number(const char **p, const char *end, int sign_ok, uint32_t *out)
{
    int neg = sign_ok && *p < end && **p == '-';
    uint64_t v;
    if (census_number64(p, end, sign_ok, &v) != 0 || (neg ? 0u - v : v) > 0xFFFFFFFFull)
        return -1;
    *out = (uint32_t)v;
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

/* The usage fields after tty_nr: tpgid flags minflt cminflt majflt cmajflt utime stime
   cutime cstime priority nice num_threads itrealvalue starttime vsize rss. */
static int census_usage(const char *p, const char *end, uint32_t *threads,
                        struct kvm_usage_row *u)
{
    uint64_t v[17];
    for (int i = 0; i < 17; i++)
        if (census_number64(&p, end, 1, &v[i]) != 0)
            return -1;
    if (v[12] > 0xFFFFFFFFull)
        return -1;
    *threads = (uint32_t)v[12];
    u->threads = v[12]; u->minflt = v[2]; u->majflt = v[4]; u->utime = v[6]; u->stime = v[7];
    u->cminflt = v[3]; u->cmajflt = v[5]; u->cutime = v[8]; u->cstime = v[9];
    u->start = v[14]; u->vsize = v[15]; u->rss = (int64_t)v[16];
    return 0;
}

/* Parse one PID/stat: "pid (comm) S ppid pgrp session tty_nr ... num_threads ...";
   with u, comm, ppid, the state and the usage fields too. */
static int census_parse(const char *buf, size_t n, char *state, uint32_t *tty, uint32_t *threads,
                        struct kvm_usage_row *u)
{
    const char *end = buf + n, *rp = memrchr(buf, ')', n), *lp;
    uint32_t ppid, ignored;
    if (rp == NULL || (lp = memchr(buf, '(', (size_t)(rp - buf))) == NULL || end - rp < 4
        || rp[1] != ' ' || rp[3] != ' ')
        return -1;
    *state = rp[2];
    const char *p = rp + 4;
    if (census_number(&p, end, 0, &ppid) != 0)
        return -1;
    for (int i = 0; i < 2; i++) /* pgrp session */
        if (census_number(&p, end, 0, &ignored) != 0)
            return -1;
    if (census_number(&p, end, 1, tty) != 0)
        return -1;
    if (u != NULL) {
        size_t len = (size_t)(rp - lp - 1);
        if (len > sizeof u->comm - 1)
            len = sizeof u->comm - 1;
        memset(u->comm, 0, sizeof u->comm); /* equal processes, equal bytes */
        memcpy(u->comm, lp + 1, len);
        u->ppid = ppid;
        u->state = (unsigned char)*state;
        return census_usage(p, end, threads, u);
    }
    if (census_skip(&p, end, 12) != 0 || census_number(&p, end, 0, threads) != 0)
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

struct survey_out {
    int dir_fd;
    struct census_table t;
    struct kvm_usage_row *procs;
    size_t pcap, np;
};

/* A process whose first thread exited while others run (pthread_exit in main): its PID/stat
   is that thread's, a zombie with no memory. Take state, vsize and rss from the first live
   thread of PID/task; the counters of PID/stat are the whole group's already. */
static void live_thread(int dir_fd, const char *pid, char *state, struct kvm_usage_row *u)
{
    char path[NAME_MAX + 32], buf[4097];
    snprintf(path, sizeof path, "%s/task", pid);
    int fd = openat(dir_fd, path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd < 0 ? NULL : fdopendir(fd);
    struct dirent *e;
    if (d == NULL) {
        if (fd >= 0)
            close(fd);
        return; /* gone, or not ours to read: the zombie row stands */
    }
    while ((e = readdir(d)) != NULL) {
        if (strspn(e->d_name, "0123456789") == 0 || !strcmp(e->d_name, pid))
            continue;
        snprintf(path, sizeof path, "%s/task/%s/stat", pid, e->d_name);
        int sfd = openat(dir_fd, path, O_RDONLY | O_CLOEXEC);
        if (sfd < 0)
            continue;
        ssize_t n = read(sfd, buf, sizeof buf - 1);
        close(sfd);
        struct kvm_usage_row t;
        char s;
        uint32_t tty, threads;
        if (n <= 0 || (buf[n] = '\0', census_parse(buf, (size_t)n, &s, &tty, &threads, &t)) != 0
            || s == 'Z' || s == 'X')
            continue;
        *state = s;
        if (u != NULL) {
            u->state = (unsigned char)s; u->vsize = t.vsize; u->rss = t.rss;
        }
        break;
    }
    closedir(d);
}

static int survey_each(void *ctx, const char *pid, uint32_t uid, const char *stat, size_t n)
{
    struct survey_out *out = ctx;
    struct kvm_usage_row scratch, *u = out->procs == NULL ? NULL : &scratch;
    char state;
    uint32_t tty, threads;
    if (census_parse(stat, n, &state, &tty, &threads, u) != 0)
        return -2;
    if (state == 'Z' && threads > 1)
        live_thread(out->dir_fd, pid, &state, u);
    if (u != NULL) {
        if (out->np < out->pcap) {
            scratch.pid = strtol(pid, NULL, 10);
            scratch.start_fraction = 0;
            scratch.uid = uid;
            scratch.jid = 0;
            out->procs[out->np] = scratch;
        }
        out->np++;
    }
    if (census_add(&out->t, uid, tty, threads, state) != 0) {
        errno = ENOMEM;
        return -1;
    }
    return 0;
}

int kvm_survey(int dir_fd, struct kvm_census_row *rows, int cap,
               struct kvm_usage_row *procs, int pcap, int *nprocs)
{
    struct survey_out out = {
        dir_fd, { calloc(64, sizeof *out.t.slots), 63, 0 }, procs, (size_t)(pcap > 0 ? pcap : 0), 0
    };
    int ret, saved;

    if (out.t.slots == NULL) {
        errno = ENOMEM;
        return -1;
    }
    ret = walk_procs(dir_fd, survey_each, &out);
    saved = errno;
    if (ret == 0) {
        size_t k = 0;
        for (size_t i = 0; i <= out.t.mask; i++)
            if (out.t.slots[i].count && k < (size_t)(cap > 0 ? cap : 0))
                rows[k++] = out.t.slots[i];
        ret = out.t.used > 0x7FFFFFFF ? 0x7FFFFFFF : (int)out.t.used;
        if (nprocs != NULL)
            *nprocs = out.np > 0x7FFFFFFF ? 0x7FFFFFFF : (int)out.np;
    }
    free(out.t.slots);
    errno = saved;
    return ret;
}

int kvm_census(int dir_fd, struct kvm_census_row *rows, int cap)
{
    return kvm_survey(dir_fd, rows, cap, NULL, 0, NULL);
}


/* A keyed 64-bit digest of each of count records (size bytes, stride apart): equal records
   give equal digests, and a process cannot pick its record's digest without the key. */
void kvm_digest(const char *rows, int count, int stride, int size, uint64_t key, uint64_t *out)
{
    for (int i = 0; i < count; i++) {
        const char *p = rows + (size_t)i * (size_t)stride;
        uint64_t h = key ^ (uint64_t)size, w;
        int at = 0;
        for (; at + 8 <= size; at += 8) {
            memcpy(&w, p + at, 8);
#ifdef __SIZEOF_INT128__
            /* The key in both factors: a word no one can pick to zero the product (a
               record's own bytes, a comm, would otherwise erase the key and all before). */
            __uint128_t m = (__uint128_t)(w ^ key ^ 0xa0761d6478bd642full) *
                            (h ^ 0xe7037ed1a0b428dbull);
            h = (uint64_t)m ^ (uint64_t)(m >> 64);
#else
            h = (h ^ w) * 0xff51afd7ed558ccdull;
            h ^= h >> 33;
#endif
        }
        for (; at < size; at++)
            h = (h ^ (unsigned char)p[at]) * 0x100000001b3ull;
        h ^= h >> 32;
        h *= 0xd6e8feb86659fd93ull;
        h ^= h >> 32;
        out[i] = h ? h : 1; /* 0 marks a free slot of a kvm_index */
    }
}

/* One poll's digests (not copied: the caller keeps them while the index lives) in a set:
   open addressing, linear probing, at most half full; a slot of 0 is free. The digests are
   keyed, so their low bits spread the slots whatever the records. */
struct kvm_index { const uint64_t *order; int count; size_t mask; uint64_t *slots; };

/* NULL with errno ENOMEM if out of memory, EEXIST if a digest is there twice (two records
   with one digest: the caller compares that poll some other way) or EINVAL for a 0. */
struct kvm_index *kvm_index_new(const uint64_t *digests, int count)
{
    size_t cap = 16;
    while (cap < 2 * (size_t)(count > 0 ? count : 0))
        cap *= 2;
    struct kvm_index *x = malloc(sizeof *x);
    uint64_t *slots = calloc(cap, sizeof *slots);
    if (x == NULL || slots == NULL) {
        free(x);
        free(slots);
        errno = ENOMEM;
        return NULL;
    }
    *x = (struct kvm_index){digests, count, cap - 1, slots};
    for (int i = 0; i < count; i++) {
        uint64_t d = digests[i];
        size_t j = (size_t)d & x->mask;
        while (slots[j] != 0 && slots[j] != d)
            j = (j + 1) & x->mask;
        if (d == 0 || slots[j] == d) {
            kvm_index_free(x);
            errno = d == 0 ? EINVAL : EEXIST;
            return NULL;
        }
        slots[j] = d;
    }
    return x;
}

void kvm_index_free(struct kvm_index *index)
{
    if (index != NULL)
        free(index->slots);
    free(index);
}

static int index_has(const struct kvm_index *x, uint64_t d)
{
    size_t j = (size_t)d & x->mask;
    for (; x->slots[j] != 0; j = (j + 1) & x->mask)
        if (x->slots[j] == d)
            return 1;
    return 0;
}

/* What changed since the last poll: the positions in index of its digests not in last (all,
   if last is NULL), returned as their number, and the digests of last not in index, in
   stale (*nstale of them). fresh has room for index's count, stale for last's. */
int kvm_index_diff(const struct kvm_index *last, const struct kvm_index *index, int *fresh,
                   uint64_t *stale, int *nstale)
{
    int n = 0, m = 0;
    for (int i = 0; i < index->count; i++)
        if (last == NULL || !index_has(last, index->order[i]))
            fresh[n++] = i;
    for (int i = 0; last != NULL && i < last->count; i++)
        if (!index_has(index, last->order[i]))
            stale[m++] = last->order[i];
    *nstale = m;
    return n;
}

static int64_t gather_signed(const char *p, int width)
{
    int64_t i64;
    int32_t i32;
    int16_t i16;
    switch (width) {
    case 1: return (int8_t)*p;
    case 2: memcpy(&i16, p, 2); return i16;
    case 8: memcpy(&i64, p, 8); return i64;
    default: memcpy(&i32, p, 4); return i32;
    }
}

static uint64_t gather_unsigned(const char *p, int width)
{
    uint32_t u32;
    uint16_t u16;
    switch (width) {
    case 1: return (unsigned char)*p;
    case 2: memcpy(&u16, p, 2); return u16;
    default: memcpy(&u32, p, 4); return u32;
    }
}

static uint8_t gather_state(const char *r, const struct kvm_states *s)
{
    uint32_t slptime;
    memcpy(&slptime, r + s->slptime, sizeof slptime);
    return s->word_of[s->stat_code[(unsigned char)r[s->stat]]
                      | s->sintr[(unsigned char)r[s->tdflags_low]] | (slptime >= s->maxslp)];
}

void kvm_gather(const char *records, int count, int size, const struct kvm_field *fields,
                int nfields, const struct kvm_states *states, char *rows, int rowsize)
{
    for (int i = 0; i < count; i++) {
        const char *r = records + (size_t)i * (size_t)size;
        char *row = rows + (size_t)i * (size_t)rowsize;
        int state = -1; /* computed once per record, for however many fields want it */
        for (int f = 0; f < nfields; f++) {
            const struct kvm_field *d = &fields[f];
            char *to = row + d->dst;
            int64_t s;
            uint64_t u;
            switch (d->kind) {
            case KVM_COPY:
                if (d->width == 8)
                    memcpy(to, r + d->src, 8);
                else if (d->width == 4)
                    memcpy(to, r + d->src, 4);
                else
                    memcpy(to, r + d->src, (size_t)d->width);
                break;
            case KVM_SIGNED:
                s = gather_signed(r + d->src, d->width);
                memcpy(to, &s, sizeof s);
                break;
            case KVM_UNSIGNED:
                u = gather_unsigned(r + d->src, d->width);
                memcpy(to, &u, sizeof u);
                break;
            case KVM_SINCE_SEC: /* wrapping, as the Python gather does */
                s = (int64_t)((uint64_t)gather_signed(r + d->src, d->width)
                              - (uint64_t)states->boot_sec);
                memcpy(to, &s, sizeof s);
                break;
            case KVM_SINCE_USEC:
                u = (uint64_t)gather_signed(r + d->src, d->width);
                s = (int64_t)(u - (uint64_t)states->boot_usec);
                if ((int64_t)u >= 0 && s < 0) { /* borrow a second: stay in [0, 1000000) */
                    uint64_t sec;
                    memcpy(&sec, to - 8, sizeof sec);
                    sec -= 1;
                    memcpy(to - 8, &sec, sizeof sec);
                    s += 1000000;
                }
                memcpy(to, &s, sizeof s);
                break;
            case KVM_STATE:
                if (state < 0)
                    state = gather_state(r, states);
                *to = (char)state;
                break;
            }
        }
    }
}

/* Keys of up to any size, compared whole; a hash of their 8-byte words (and any rest). */
static uint64_t count_hash(const char *key, int keysize)
{
    uint64_t h = 0x9E3779B97F4A7C15ull, w;
    int i = 0;
    for (; i + 8 <= keysize; i += 8) {
        memcpy(&w, key + i, 8);
        h = (h ^ w) * 0xC2B2AE3D27D4EB4Full;
        h ^= h >> 31;
    }
    for (; i < keysize; i++)
        h = (h ^ (unsigned char)key[i]) * 0x165667B19E3779F9ull;
    return h ^ (h >> 29);
}

int kvm_count(const char *rows, int count, int rowsize, int keyoff, int keysize, char *keys,
              uint32_t *counts)
{
    size_t cap = 16, n = 0;
    while (cap < 2 * (size_t)(count > 0 ? count : 0))
        cap *= 2;
    uint32_t *slots = calloc(cap, sizeof *slots); /* 0 free, else the key's index + 1 */
    if (slots == NULL)
        return -1;
    for (int i = 0; i < count; i++) {
        const char *key = rows + (size_t)i * (size_t)rowsize + keyoff;
        for (size_t j = count_hash(key, keysize) & (cap - 1);; j = (j + 1) & (cap - 1)) {
            uint32_t s = slots[j];
            if (s == 0) {
                memcpy(keys + n * (size_t)keysize, key, (size_t)keysize);
                counts[n++] = 1;
                slots[j] = (uint32_t)n;
                break;
            }
            if (memcmp(keys + (size_t)(s - 1) * (size_t)keysize, key, (size_t)keysize) == 0) {
                counts[s - 1]++;
                break;
            }
        }
    }
    free(slots);
    return (int)n;
}
"""
)

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvm_exporter.sources._procscan", C_SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
