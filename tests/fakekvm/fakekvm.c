/*
 * A fake FreeBSD libkvm for tests on Linux: the symbols and semantics of
 * kvm_openfiles(3), kvm_getprocs(3), kvm_getargv(3), kvm_getloadavg(3), kvm_getswapinfo(3),
 * kvm_nlist2(3), kvm_read2(3), kvm_geterr(3), kvm_close(3), devname_r(3),
 * sysctlbyname(3), sysctlnametomib(3) and sysctl(3) (kern.proc.pid and kern.proc.nfds of
 * the caller, sysctl.oidfmt of a scenario sysctl), libjail's
 * jail_getname(3), with the
 * FreeBSD LP64 (amd64/arm64) record layouts, fed by a scenario file.
 *
 * Build: cc -O2 -Wall -Werror -shared -fPIC -o libfakekvm.so fakekvm.c
 *
 * Which scenario: a live open (core "/dev/null") reads the file named by the
 * environment variable FAKE_KVM_SCENARIO; a crash-dump open reads the core
 * file itself as the scenario. The kernel argument is not read.
 * sysctlbyname() and devname_r() answer from the scenario of the newest handle
 * still open, or with none open from FAKE_KVM_SCENARIO, read afresh. A live handle
 * reads its scenario again when the file changed.
 * A crash dump's kernel variables are its scenario's sysctls: kvm_nlist2()
 * knows _mp_ncpus (hw.ncpu), _maxproc (kern.maxproc) and _maxthread
 * (kern.maxthread), and kvm_read2() reads them as ints; on a live handle
 * kvm_read2() is the useless /dev/null read of real libkvm ("short read").
 *
 * Scenario format: one directive per line, '#' starts a comment line.
 *
 *   sysctl NAME VALUE        integer sysctl (hw.ncpu, hw.pagesize, kern.maxproc, ...)
 *   loadavg L1 L5 L15        kvm_getloadavg()
 *   swap NAME USED TOTAL     one swap device; NAME as devname gives it (ada0p3),
 *                            USED and TOTAL in pages
 *   tty DEV NAME             devname_r(DEV, S_IFCHR) gives NAME (DEV decimal or 0x hex)
 *   proc KEY=VALUE ...       one process; keys (default 0 unless said):
 *                              pid ppid pgid(=pid) sid(=pid) uid ruid(=uid)
 *                              tdev (device number, or "none" = NODEV, the default)
 *                              stat (SIDL SRUN SSLEEP SSTOP SZOMB SWAIT SLOCK or 1..7)
 *                              tdflags slptime threads(=1) rss (pages) size (bytes)
 *                              runtime (microseconds) start (seconds, fraction allowed)
 *                              comm (no spaces; at most 19 bytes)
 *                              argv (kvm_getargv's answer: arguments split by '|', %XX a
 *                              byte, e.g. %20 a space; none: NULL, like a kernel process)
 *                              jid (its jail; 0 = none) utime stime (microseconds; without
 *                              either, utime = runtime) minflt majflt nvcsw nivcsw inblock
 *                              oublock (ki_rusage counts), each also as ch_X (reaped
 *                              children's: p_cru) and exited_X (of X, what exited threads
 *                              used: in no thread row)
 *   sysctl NAME VALUE        hw.physmem, hw.realmem, hw.usermem are unsigned longs (8 bytes)
 *   sysctl_text NAME TEXT    a string sysctl (CTLTYPE_STRING): the rest of the line
 *   counter NAME VALUE       a 64-bit vm_cnt counter (vm.stats.vm.v_forks, ...)
 *   boottime SECONDS         kern.boottime (default 0)
 *   cp_time U N S I IDLE     kern.cp_time (long[5])
 *   clockrate HZ TICK STATHZ PROFHZ  kern.clockrate (struct clockinfo)
 *   jail JID NAME            a jail that jail_getname(3) names (libjail)
 *   reader_jail JID          the exporter runs inside jail JID: a live read lists only that
 *                            jail's processes, each with ki_jid 0; it can name no jail
 *   structsize N             ki_structsize written into every live record (default 1088)
 *   symbol NAME VALUE        an int kernel variable of a crash dump (e.g. _dmmax)
 *   fail CALL N MESSAGE      call number N (1-based, or '*' for every call) of CALL fails
 *                            with MESSAGE as its kvm_geterr()/errbuf text. CALL is one of
 *                            open, getprocs, swapinfo, loadavg. Calls are counted per
 *                            handle, opens per process. A failing kvm_getloadavg sets
 *                            errno EINVAL and no text, as the live libkvm does.
 *   delay CALL SECONDS       every call of CALL (getprocs, swapinfo, loadavg) first sleeps
 *                            SECONDS (fraction allowed): a library call that hangs.
 *
 * Semantics copied from libkvm: the kvm_getprocs() array belongs to the
 * library and is freed by the next call and by kvm_close(); on failure it
 * returns NULL, sets the error text and leaves *cnt alone; KERN_PROC_PID with
 * no such process fails with errno ESRCH. kvm_getswapinfo() fills at most
 * swap_max - 1 devices, puts the grand total (empty name) at the index it
 * returns, and returns -1 without a message for swap_max < 1.
 */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* ---- FreeBSD LP64 ABI, transcribed for this fake ---- */

typedef int32_t fb_pid_t;
typedef uint32_t fb_uid_t;
typedef uint64_t fb_dev_t;

struct fb_timeval {
	int64_t tv_sec;
	long tv_usec;
};

struct fb_rusage {
	struct fb_timeval ru_utime;
	struct fb_timeval ru_stime;
	long ru_counters[14];
};

struct kinfo_proc {
	int ki_structsize;
	int ki_layout;
	void *ki_args;
	void *ki_paddr;
	void *ki_addr;
	void *ki_tracep;
	void *ki_textvp;
	void *ki_fd;
	void *ki_vmspace;
	const void *ki_wchan;
	fb_pid_t ki_pid;
	fb_pid_t ki_ppid;
	fb_pid_t ki_pgid;
	fb_pid_t ki_tpgid;
	fb_pid_t ki_sid;
	fb_pid_t ki_tsid;
	short ki_jobc;
	short ki_spare_short1;
	uint32_t ki_tdev_freebsd11;
	uint32_t ki_sigsets[4][4];
	fb_uid_t ki_uid;
	fb_uid_t ki_ruid;
	fb_uid_t ki_svuid;
	uint32_t ki_rgid;
	uint32_t ki_svgid;
	short ki_ngroups;
	short ki_spare_short2;
	uint32_t ki_groups[16];
	unsigned long ki_size;
	long ki_rssize;
	long ki_swrss;
	long ki_tsize;
	long ki_dsize;
	long ki_ssize;
	unsigned short ki_xstat;
	unsigned short ki_acflag;
	uint32_t ki_pctcpu;
	unsigned int ki_estcpu;
	unsigned int ki_slptime;
	unsigned int ki_swtime;
	unsigned int ki_cow;
	uint64_t ki_runtime;
	struct fb_timeval ki_start;
	struct fb_timeval ki_childtime;
	long ki_flag;
	long ki_kiflag;
	int ki_traceflag;
	char ki_stat;
	signed char ki_nice;
	char ki_lock;
	char ki_rqindex;
	unsigned char ki_oncpu_old;
	unsigned char ki_lastcpu_old;
	char ki_tdname[17];
	char ki_wmesg[9];
	char ki_login[18];
	char ki_lockname[9];
	char ki_comm[20];
	char ki_emul[17];
	char ki_loginclass[18];
	char ki_moretdname[4];
	char ki_sparestrings[46];
	int ki_spareints[2];
	fb_dev_t ki_tdev;
	int ki_oncpu;
	int ki_lastcpu;
	int ki_tracer;
	int ki_flag2;
	int ki_fibnum;
	unsigned int ki_cr_flags;
	int ki_jid;
	int ki_numthreads;
	int32_t ki_tid;
	unsigned char ki_pri[4];
	struct fb_rusage ki_rusage;
	struct fb_rusage ki_rusage_ch;
	void *ki_pcb;
	void *ki_kstack;
	void *ki_udata;
	void *ki_tdaddr;
	void *ki_pd;
	void *ki_spareptrs[5];
	long ki_sparelongs[12];
	long ki_sflag;
	long ki_tdflags;
};

#define KP_OFF(field, value) \
	_Static_assert(offsetof(struct kinfo_proc, field) == (value), #field " offset")
_Static_assert(sizeof(struct kinfo_proc) == 1088, "KINFO_PROC_SIZE (LP64)");
KP_OFF(ki_structsize, 0);
KP_OFF(ki_pid, 72);
KP_OFF(ki_ppid, 76);
KP_OFF(ki_pgid, 80);
KP_OFF(ki_sid, 88);
KP_OFF(ki_uid, 168);
KP_OFF(ki_ruid, 172);
KP_OFF(ki_size, 256);
KP_OFF(ki_rssize, 264);
KP_OFF(ki_slptime, 316);
KP_OFF(ki_runtime, 328);
KP_OFF(ki_start, 336);
KP_OFF(ki_stat, 388);
KP_OFF(ki_comm, 447);
KP_OFF(ki_tdev, 560);
KP_OFF(ki_jid, 592);
KP_OFF(ki_numthreads, 596);
KP_OFF(ki_rusage, 608);
KP_OFF(ki_tdflags, 1080);

struct kvm_swap {
	char ksw_devname[32];
	unsigned int ksw_used;
	unsigned int ksw_total;
	int ksw_flags;
	unsigned int ksw_reserved1;
	unsigned int ksw_reserved2;
};
_Static_assert(sizeof(struct kvm_swap) == 52, "struct kvm_swap size");
_Static_assert(offsetof(struct kvm_swap, ksw_used) == 32, "ksw_used offset");
_Static_assert(offsetof(struct kvm_swap, ksw_total) == 36, "ksw_total offset");
_Static_assert(offsetof(struct kvm_swap, ksw_flags) == 40, "ksw_flags offset");

#define KERN_PROC_ALL 0
#define KERN_PROC_PID 1
#define KERN_PROC_PGRP 2
#define KERN_PROC_SESSION 3
#define KERN_PROC_TTY 4
#define KERN_PROC_UID 5
#define KERN_PROC_RUID 6
#define KERN_PROC_PROC 8
#define KERN_PROC_INC_THREAD 0x10
#define KERN_PROC_RGID 10
#define KERN_PROC_GID 11
#define KERN_PROC_NFDS 43
#define CTL_KERN 1
#define CTL_SYSCTL 0 /* sys/sysctl.h: the sysctl tree's own nodes */
#define CTL_SYSCTL_OIDFMT 4
#define FAKE_NODE 0x7fff /* the first OID component name2oid gives a scenario sysctl */
#define CTLTYPE_INT 2
#define CTLTYPE_STRING 3
#define CTLTYPE_ULONG 8
#define CTLTYPE_U64 9
#define KERN_PROC 14
#define SIDL 1
#define SRUN 2
#define SZOMB 5
#define P_CONTROLT 0x00002
#define MAXCOMLEN 19
#define NODEV ((fb_dev_t)-1)
#define FB_S_IFCHR 0020000
#define FB_O_RDWR 0x0002
#define ERRBUF_SIZE 2048 /* _POSIX2_LINE_MAX */

/* ---- scenario ---- */

enum call { CALL_OPEN, CALL_GETPROCS, CALL_SWAPINFO, CALL_LOADAVG, NCALLS };
static const char *const call_names[NCALLS] = {"open", "getprocs", "swapinfo", "loadavg"};

#define MAXPROCS 131072
#define MAXSWAP 16
#define MAXTTY 64
#define MAXSYSCTL 32
#define MAXFAIL 16
#define MAXSYMBOL 16
#define MAXJAIL 16

/* The ki_rusage members a scenario sets, in this order, with or without a prefix. */
enum { RU_UTIME, RU_STIME, NRU = 8 };
static const char *const ru_keys[NRU] = {"utime", "stime", "minflt", "majflt",
					 "nvcsw", "nivcsw", "inblock", "oublock"};
/* Their place among rusage's 14 longs after the two timevals (sys/sys/resource.h). */
static const int ru_long_at[NRU] = {-1, -1, 4, 5, 12, 13, 7, 8};

struct fake_proc {
	fb_pid_t pid, ppid, pgid, sid;
	fb_uid_t uid, ruid;
	fb_dev_t tdev;
	int stat, threads;
	long tdflags, rss;
	unsigned int slptime;
	unsigned long size;
	uint64_t runtime;
	double start;
	char comm[20];
	char *args; /* p_args: NUL-separated, NUL-terminated; NULL when the scenario gives none */
	size_t argslen;
	int jid, have_times;
	/* ki_rusage's times (microseconds) and counts, in the order of ru_keys: the process's
	   own (own), its reaped children's (ch: p_cru and p_crux) and, of own, what its exited
	   threads used (exited: folded into p_ru by thread_exit, in no thread row) */
	uint64_t own[NRU], ch[NRU], exited[NRU];
};

struct failure {
	enum call call;
	int nth; /* 0: every call */
	char message[256];
};

struct scenario {
	struct fake_proc procs[MAXPROCS];
	int nprocs;
	struct kvm_swap swap[MAXSWAP];
	int nswap;
	struct {
		fb_dev_t dev;
		char name[64];
	} ttys[MAXTTY];
	int nttys;
	struct {
		char name[64];
		long long value;
		int u64; /* a vm_cnt counter (sysctl_handle_vmstat), not an int */
		int is_text;    /* a string node (sysctl_text): CTLTYPE_STRING, value unused */
		char text[256]; /* its text */
	} sysctls[MAXSYSCTL], symbols[MAXSYMBOL];
	double boottime;      /* kern.boottime, seconds since the epoch */
	long cp_time[5];      /* kern.cp_time */
	int clockrate[5];     /* kern.clockrate: hz, tick, spare, stathz, profhz */
	int have_cp_time, have_clockrate;
	struct {
		int jid;
		char name[256];
	} jails[MAXJAIL];
	int njails, reader_jail;
	int nsysctls, nsymbols;
	double loadavg[3];
	int structsize;
	struct failure fails[MAXFAIL];
	double delay[NCALLS]; /* seconds each call of that kind sleeps first */
	int nfails;
};

struct __kvm {
	struct scenario sc;
	char path[4096];           /* a live handle's scenario, read again when it changes */
	struct timespec mtime;
	off_t size;
	char errbuf[ERRBUF_SIZE];
	struct kinfo_proc *procbase;
	int nprocbase;
	int calls[NCALLS];
	int live;
};
typedef struct __kvm kvm_t;

#define MAXOPEN 64
static kvm_t *open_handles[MAXOPEN]; /* oldest first; sysctlbyname() asks the newest */
static int nopen;
static int open_calls;

static int parse_stat(const char *s)
{
	static const char *const names[] = {"SIDL", "SRUN", "SSLEEP", "SSTOP", "SZOMB", "SWAIT",
					    "SLOCK"};
	for (int i = 0; i < 7; i++)
		if (strcmp(s, names[i]) == 0)
			return i + 1;
	return (int)strtol(s, NULL, 0);
}

/* argv=A|B|C: '|' ends an argument, %XX is the byte XX (%7C a '|', %25 a '%', %20 a space). */
static int parse_argv(struct fake_proc *p, const char *v)
{
	size_t n = strlen(v);
	char *out = malloc(n + 1), *o = out;

	if (out == NULL)
		return -1;
	for (const char *c = v; *c; c++) {
		unsigned int byte;
		if (*c == '|') {
			*o++ = '\0';
		} else if (*c == '%' && sscanf(c + 1, "%2x", &byte) == 1 && c[1] && c[2]) {
			*o++ = (char)byte;
			c += 2;
		} else {
			*o++ = *c;
		}
	}
	*o++ = '\0';
	free(p->args);
	p->args = out;
	p->argslen = (size_t)(o - out);
	return 0;
}

/* A usage key: utime, ch_utime, exited_utime, ... (ru_keys with no prefix, ch_ or exited_). */
static int parse_ru(struct fake_proc *p, const char *k, const char *v)
{
	uint64_t *into = p->own;

	if (!strncmp(k, "ch_", 3))
		into = p->ch, k += 3;
	else if (!strncmp(k, "exited_", 7))
		into = p->exited, k += 7;
	for (int i = 0; i < NRU; i++) {
		if (strcmp(k, ru_keys[i]) != 0)
			continue;
		into[i] = strtoull(v, NULL, 0);
		p->have_times |= into == p->own && i <= RU_STIME;
		return 0;
	}
	return -1;
}

static int parse_proc(struct fake_proc *p, char *rest)
{
	char *save = NULL;
	int have_pgid = 0, have_sid = 0, have_ruid = 0;

	memset(p, 0, sizeof(*p));
	p->tdev = NODEV;
	p->threads = 1;
	for (char *tok = strtok_r(rest, " \t", &save); tok; tok = strtok_r(NULL, " \t", &save)) {
		char *eq = strchr(tok, '=');
		if (!eq)
			return -1;
		*eq = '\0';
		const char *k = tok, *v = eq + 1;
		if (!strcmp(k, "pid"))
			p->pid = (fb_pid_t)strtol(v, NULL, 0);
		else if (!strcmp(k, "ppid"))
			p->ppid = (fb_pid_t)strtol(v, NULL, 0);
		else if (!strcmp(k, "pgid"))
			p->pgid = (fb_pid_t)strtol(v, NULL, 0), have_pgid = 1;
		else if (!strcmp(k, "sid"))
			p->sid = (fb_pid_t)strtol(v, NULL, 0), have_sid = 1;
		else if (!strcmp(k, "uid"))
			p->uid = (fb_uid_t)strtoul(v, NULL, 0);
		else if (!strcmp(k, "ruid"))
			p->ruid = (fb_uid_t)strtoul(v, NULL, 0), have_ruid = 1;
		else if (!strcmp(k, "tdev"))
			p->tdev = strcmp(v, "none") ? strtoull(v, NULL, 0) : NODEV;
		else if (!strcmp(k, "stat"))
			p->stat = parse_stat(v);
		else if (!strcmp(k, "tdflags"))
			p->tdflags = strtol(v, NULL, 0);
		else if (!strcmp(k, "slptime"))
			p->slptime = (unsigned int)strtoul(v, NULL, 0);
		else if (!strcmp(k, "threads"))
			p->threads = (int)strtol(v, NULL, 0);
		else if (!strcmp(k, "rss"))
			p->rss = strtol(v, NULL, 0);
		else if (!strcmp(k, "size"))
			p->size = strtoul(v, NULL, 0);
		else if (!strcmp(k, "runtime"))
			p->runtime = strtoull(v, NULL, 0);
		else if (!strcmp(k, "start"))
			p->start = strtod(v, NULL);
		else if (!strcmp(k, "comm"))
			snprintf(p->comm, sizeof(p->comm), "%s", v);
		else if (!strcmp(k, "argv")) {
			if (parse_argv(p, v) != 0)
				return -1;
		} else if (!strcmp(k, "jid"))
			p->jid = (int)strtol(v, NULL, 0);
		else if (parse_ru(p, k, v) != 0)
			return -1;
	}
	if (!have_pgid)
		p->pgid = p->pid;
	if (!have_sid)
		p->sid = p->pid;
	if (!have_ruid)
		p->ruid = p->uid;
	return 0;
}

static int parse_failure(struct failure *f, char *rest)
{
	char *save = NULL;
	char *call = strtok_r(rest, " \t", &save);
	char *nth = strtok_r(NULL, " \t", &save);
	char *message = strtok_r(NULL, "", &save);

	if (!call || !nth || !message)
		return -1;
	for (f->call = 0; f->call < NCALLS; f->call++)
		if (!strcmp(call, call_names[f->call]))
			break;
	if (f->call == NCALLS)
		return -1;
	f->nth = strcmp(nth, "*") ? atoi(nth) : 0;
	message += strspn(message, " \t");
	snprintf(f->message, sizeof(f->message), "%s", message);
	return 0;
}

static int parse_delay(struct scenario *sc, char *rest)
{
	char call[16];
	double seconds;

	if (sscanf(rest, "%15s %lf", call, &seconds) != 2 || seconds < 0)
		return -1;
	for (int c = 0; c < NCALLS; c++)
		if (c != CALL_OPEN && !strcmp(call, call_names[c])) {
			sc->delay[c] = seconds;
			return 0;
		}
	return -1;
}

/* Reads a scenario; on error writes a message to err and returns -1. */
static int load_scenario(struct scenario *sc, const char *path, char *err)
{
	static char line[65536]; /* an argv= of a long command line */
	int lineno = 0, bad = 0;
	FILE *f = fopen(path, "r");

	if (!f) {
		snprintf(err, ERRBUF_SIZE, "%s: %s", path, strerror(errno));
		return -1;
	}
	for (int i = 0; i < sc->nprocs; i++)
		free(sc->procs[i].args); /* a scenario read again (current_scenario) */
	memset(sc, 0, sizeof(*sc));
	sc->structsize = (int)sizeof(struct kinfo_proc);
	while (!bad && fgets(line, sizeof(line), f)) {
		char *save = NULL, *kw, *rest;
		lineno++;
		line[strcspn(line, "\r\n")] = '\0';
		kw = strtok_r(line, " \t", &save);
		if (!kw || kw[0] == '#')
			continue;
		rest = strtok_r(NULL, "", &save);
		if (!rest)
			rest = "";
		if (!strcmp(kw, "proc") && sc->nprocs < MAXPROCS) {
			bad = parse_proc(&sc->procs[sc->nprocs++], rest);
		} else if (!strcmp(kw, "swap") && sc->nswap < MAXSWAP) {
			struct kvm_swap *s = &sc->swap[sc->nswap++];
			bad = sscanf(rest, "%31s %u %u", s->ksw_devname, &s->ksw_used,
				     &s->ksw_total) != 3;
		} else if (!strcmp(kw, "tty") && sc->nttys < MAXTTY) {
			char dev[32];
			bad = sscanf(rest, "%31s %63s", dev, sc->ttys[sc->nttys].name) != 2;
			sc->ttys[sc->nttys++].dev = strtoull(dev, NULL, 0);
		} else if (!strcmp(kw, "sysctl") && sc->nsysctls < MAXSYSCTL) {
			bad = sscanf(rest, "%63s %lld", sc->sysctls[sc->nsysctls].name,
				     &sc->sysctls[sc->nsysctls].value) != 2;
			sc->nsysctls++;
		} else if (!strcmp(kw, "sysctl_text") && sc->nsysctls < MAXSYSCTL) {
			/* NAME, then the text: the rest of the line, spaces included */
			int at = 0;
			bad = sscanf(rest, "%63s %n", sc->sysctls[sc->nsysctls].name, &at) != 1 ||
			      at == 0 || strlen(rest + at) >= sizeof(sc->sysctls[0].text);
			if (!bad)
				strcpy(sc->sysctls[sc->nsysctls].text, rest + at);
			sc->sysctls[sc->nsysctls++].is_text = 1;
		} else if (!strcmp(kw, "counter") && sc->nsysctls < MAXSYSCTL) {
			bad = sscanf(rest, "%63s %lld", sc->sysctls[sc->nsysctls].name,
				     &sc->sysctls[sc->nsysctls].value) != 2;
			sc->sysctls[sc->nsysctls++].u64 = 1;
		} else if (!strcmp(kw, "boottime")) {
			bad = sscanf(rest, "%lf", &sc->boottime) != 1;
		} else if (!strcmp(kw, "cp_time")) {
			bad = sscanf(rest, "%ld %ld %ld %ld %ld", &sc->cp_time[0], &sc->cp_time[1],
				     &sc->cp_time[2], &sc->cp_time[3], &sc->cp_time[4]) != 5;
			sc->have_cp_time = 1;
		} else if (!strcmp(kw, "clockrate")) {
			/* HZ TICK STATHZ PROFHZ; the spare int stays 0 */
			bad = sscanf(rest, "%d %d %d %d", &sc->clockrate[0], &sc->clockrate[1],
				     &sc->clockrate[3], &sc->clockrate[4]) != 4;
			sc->have_clockrate = 1;
		} else if (!strcmp(kw, "symbol") && sc->nsymbols < MAXSYMBOL) {
			bad = sscanf(rest, "%63s %lld", sc->symbols[sc->nsymbols].name,
				     &sc->symbols[sc->nsymbols].value) != 2;
			sc->nsymbols++;
		} else if (!strcmp(kw, "loadavg")) {
			bad = sscanf(rest, "%lf %lf %lf", &sc->loadavg[0], &sc->loadavg[1],
				     &sc->loadavg[2]) != 3;
		} else if (!strcmp(kw, "jail") && sc->njails < MAXJAIL) {
			bad = sscanf(rest, "%d %255s", &sc->jails[sc->njails].jid,
				     sc->jails[sc->njails].name) != 2;
			sc->njails++;
		} else if (!strcmp(kw, "reader_jail")) {
			bad = sscanf(rest, "%d", &sc->reader_jail) != 1;
		} else if (!strcmp(kw, "structsize")) {
			bad = sscanf(rest, "%d", &sc->structsize) != 1;
		} else if (!strcmp(kw, "fail") && sc->nfails < MAXFAIL) {
			bad = parse_failure(&sc->fails[sc->nfails++], rest);
		} else if (!strcmp(kw, "delay")) {
			bad = parse_delay(sc, rest);
		} else {
			bad = 1;
		}
	}
	fclose(f);
	if (bad) {
		snprintf(err, ERRBUF_SIZE, "%s:%d: bad scenario line", path, lineno);
		return -1;
	}
	return 0;
}

/* The injected failure message for call number n of c, or NULL. */
static const char *failure(const struct scenario *sc, enum call c, int n)
{
	for (int i = 0; i < sc->nfails; i++)
		if (sc->fails[i].call == c && (sc->fails[i].nth == 0 || sc->fails[i].nth == n))
			return sc->fails[i].message;
	return NULL;
}

/* Counts call c and sleeps its scenario delay; returns the injected failure, or NULL. */
static const char *enter(kvm_t *kd, enum call c)
{
	struct timespec pause = { (time_t)kd->sc.delay[c],
				  (long)((kd->sc.delay[c] - (double)(time_t)kd->sc.delay[c]) * 1e9) };

	if (kd->sc.delay[c] > 0)
		while (nanosleep(&pause, &pause) != 0 && errno == EINTR)
			;
	return failure(&kd->sc, c, ++kd->calls[c]);
}

/* Poisons the old array before freeing it, so a caller that kept a pointer sees garbage. */
static void free_procbase(kvm_t *kd)
{
	if (kd->procbase != NULL)
		memset(kd->procbase, 0xa5, (size_t)kd->nprocbase * sizeof(struct kinfo_proc));
	free(kd->procbase);
	kd->procbase = NULL;
}

static void set_err(kvm_t *kd, const char *message)
{
	snprintf(kd->errbuf, sizeof(kd->errbuf), "%s", message);
}

/* ---- the libkvm API ---- */

kvm_t *kvm_openfiles(const char *kernel, const char *core, const char *swapfile, int flags,
		     char *errout)
{
	const char *path = core;
	const char *message;
	kvm_t *kd;
	int live = core == NULL || strcmp(core, "/dev/null") == 0;

	(void)kernel;
	(void)swapfile;
	if (flags & ~FB_O_RDWR) {
		snprintf(errout, ERRBUF_SIZE, "kvm_openfiles: bad flags arg");
		return NULL;
	}
	if (live) {
		path = getenv("FAKE_KVM_SCENARIO");
		if (path == NULL) {
			snprintf(errout, ERRBUF_SIZE, "fakekvm: FAKE_KVM_SCENARIO is not set");
			return NULL;
		}
	}
	kd = calloc(1, sizeof(*kd));
	if (kd == NULL) {
		snprintf(errout, ERRBUF_SIZE, "fakekvm: %s", strerror(errno));
		return NULL;
	}
	if (load_scenario(&kd->sc, path, errout) != 0) {
		free(kd);
		return NULL;
	}
	message = failure(&kd->sc, CALL_OPEN, ++open_calls);
	if (message != NULL) {
		snprintf(errout, ERRBUF_SIZE, "%s", message);
		free(kd);
		return NULL;
	}
	kd->live = live;
	if (live) {
		struct stat st;
		snprintf(kd->path, sizeof(kd->path), "%s", path);
		if (stat(path, &st) == 0)
			kd->mtime = st.st_mtim, kd->size = st.st_size;
	}
	if (nopen < MAXOPEN)
		open_handles[nopen++] = kd;
	return kd;
}

int kvm_close(kvm_t *kd)
{
	if (kd == NULL) {
		errno = EINVAL;
		return -1;
	}
	for (int i = 0; i < nopen; i++) {
		if (open_handles[i] == kd) {
			memmove(&open_handles[i], &open_handles[i + 1],
				(size_t)(nopen - i - 1) * sizeof(open_handles[0]));
			nopen--;
			break;
		}
	}
	free_procbase(kd);
	for (int i = 0; i < kd->sc.nprocs; i++)
		free(kd->sc.procs[i].args);
	free(kd);
	return 0;
}

char *kvm_geterr(kvm_t *kd)
{
	static char empty[] = "";
	return kd == NULL ? empty : kd->errbuf;
}

/*
 * Which ops have a node: sysctl_kern_proc() serves kern.proc.{all,pid,pgrp,sid,tty,uid,ruid,
 * proc,gid,rgid} and the KERN_PROC_INC_THREAD ("_td") variants of all but "all"
 * (SYSCTL_NODE registrations in sys/kern/kern_proc.c). A live kvm_getprocs() of any other
 * op is a sysctl of a name that does not exist: ENOENT.
 */
static int has_node(int op)
{
	int what = op & ~KERN_PROC_INC_THREAD;

	if (op == KERN_PROC_ALL)
		return 1;
	return what != KERN_PROC_ALL &&
	       (what <= KERN_PROC_RUID || what == KERN_PROC_PROC || what == KERN_PROC_RGID ||
		what == KERN_PROC_GID);
}

/*
 * The ki_tdev a record of p carries: the live kernel's tty_udev() of a controlling
 * terminal, NODEV without one; a crash dump's kvm_proclist() has "#if 0" around
 * t_cdev.si_udev and stores NODEV for every process.
 */
static fb_dev_t record_tdev(int live, const struct fake_proc *p)
{
	return live ? p->tdev : NODEV;
}

static int selected(const kvm_t *kd, const struct fake_proc *p, int what, int arg)
{
	/* PRS_NEW processes are skipped by proc_iterate() and by kvm_proclist(). */
	if (p->stat == SIDL)
		return 0;
	/* p_cansee() -> prison_check(): a jailed reader sees its own jail's processes only
	   (this fake has no nested jails). */
	if (kd->live && kd->sc.reader_jail != 0 && p->jid != kd->sc.reader_jail)
		return 0;
	switch (what) {
	case KERN_PROC_PID:
		return p->pid == arg;
	case KERN_PROC_PGRP:
		return p->pgid == arg;
	case KERN_PROC_SESSION:
		return p->sid == arg;
	case KERN_PROC_TTY:
		/* P_CONTROLT, then (dev_t)name[0]: the int argument sign-extends. */
		return p->tdev != NODEV && record_tdev(kd->live, p) == (fb_dev_t)arg;
	case KERN_PROC_UID:
		return p->uid == (fb_uid_t)arg;
	case KERN_PROC_RUID:
		return p->ruid == (fb_uid_t)arg;
	default: /* all, proc; a crash dump's kvm_proclist() does not filter others either */
		return 1;
	}
}

/* Reads the calling process from Linux's /proc/self into p (pid, uids, sizes, times). */
static int read_self(const struct scenario *sc, struct fake_proc *p, struct fb_rusage *ru)
{
	char buf[4096], *end;
	unsigned long long start_ticks = 0, vsize = 0, btime = 0;
	long rss = 0, threads = 1, pagesize = 0;
	struct rusage self;
	FILE *f;
	size_t n;

	f = fopen("/proc/self/stat", "r");
	if (f == NULL)
		return -1;
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	end = strrchr(buf, ')');
	/* fields after comm: state ppid ... num_threads(20) ... starttime(22) vsize rss */
	if (end == NULL || sscanf(end + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u"
				  " %*d %*d %*d %*d %ld %*d %llu %llu %ld",
				  &threads, &start_ticks, &vsize, &rss) != 4)
		return -1;
	f = fopen("/proc/stat", "r");
	while (f != NULL && fgets(buf, sizeof(buf), f))
		if (sscanf(buf, "btime %llu", &btime) == 1)
			break;
	if (f != NULL)
		fclose(f);
	for (int i = 0; i < sc->nsysctls; i++)
		if (!strcmp(sc->sysctls[i].name, "hw.pagesize"))
			pagesize = sc->sysctls[i].value;
	if (pagesize <= 0)
		pagesize = sysconf(_SC_PAGESIZE);
	getrusage(RUSAGE_SELF, &self);
	memset(p, 0, sizeof(*p));
	p->pid = p->pgid = p->sid = getpid();
	p->ppid = getppid();
	p->uid = geteuid();
	p->ruid = getuid();
	p->tdev = NODEV;
	p->stat = SRUN;
	p->threads = (int)threads;
	p->rss = rss * sysconf(_SC_PAGESIZE) / pagesize;
	p->size = vsize;
	p->runtime = (uint64_t)(self.ru_utime.tv_sec + self.ru_stime.tv_sec) * 1000000 +
		     (uint64_t)(self.ru_utime.tv_usec + self.ru_stime.tv_usec);
	p->start = (double)btime + (double)start_ticks / (double)sysconf(_SC_CLK_TCK);
	snprintf(p->comm, sizeof(p->comm), "python");
	ru->ru_utime.tv_sec = self.ru_utime.tv_sec;
	ru->ru_utime.tv_usec = self.ru_utime.tv_usec;
	ru->ru_stime.tv_sec = self.ru_stime.tv_sec;
	ru->ru_stime.tv_usec = self.ru_stime.tv_usec;
	return 0;
}

/*
 * Row t of the rows of p: what fill_kinfo_proc()/fill_kinfo_thread() write on a live
 * system, or what kvm_proclist() writes from a crash dump (tests/fakekvm/README.md has
 * the table). rows is 1 for a process row.
 */
/* Thread t's share of a process total v over rows rows: the rows add up to v. */
static uint64_t share(uint64_t v, int t, int rows)
{
	return v / (uint64_t)rows + (t == 0 ? v % (uint64_t)rows : 0);
}

/* Sets a struct timeval from microseconds. */
static void set_timeval(struct fb_timeval *tv, uint64_t usec)
{
	tv->tv_sec = (int64_t)(usec / 1000000);
	tv->tv_usec = (long)(usec % 1000000);
}

/* ki_rusage from v (ru_keys order, times in microseconds): row t's share of rows rows. */
static void fill_rusage(struct fb_rusage *ru, const uint64_t v[NRU], int t, int rows)
{
	set_timeval(&ru->ru_utime, share(v[RU_UTIME], t, rows));
	set_timeval(&ru->ru_stime, share(v[RU_STIME], t, rows));
	for (int i = RU_STIME + 1; i < NRU; i++)
		ru->ru_counters[ru_long_at[i]] = (long)share(v[i], t, rows);
}

/* What a live record of p says it used; rows 0 for a process row, else its thread rows:
 * - a process row: rufetch() + calcru(), process-wide (p_ru, which holds what exited threads
 *   used, plus each live thread's); a zombie's also holds its reaped children's, as exit1()
 *   runs ruadd(&p->p_ru, &p->p_rux, &p->p_stats->p_cru, &p->p_crux) once it is PRS_ZOMBIE;
 * - thread rows: fill_kinfo_thread(preferthread) -> rufetchtd(), each live thread's own, so
 *   they add up to the process's less what its exited threads used (thread_exit). */
static void usage_of(const struct fake_proc *p, int rows, uint64_t v[NRU], uint64_t *runtime)
{
	*runtime = p->runtime;
	for (int i = 0; i < NRU; i++) {
		v[i] = p->own[i];
		if (rows == 0 && p->stat == SZOMB)
			v[i] += p->ch[i];
		else if (rows > 0)
			v[i] = v[i] > p->exited[i] ? v[i] - p->exited[i] : 0;
	}
	if (!p->have_times)
		v[RU_UTIME] = rows > 0 ? v[RU_UTIME] : p->runtime;
	if (rows == 0 && p->stat == SZOMB)
		*runtime += p->ch[RU_UTIME] + p->ch[RU_STIME]; /* ruadd adds rux_runtime too */
	if (rows > 0) {
		uint64_t gone = p->exited[RU_UTIME] + p->exited[RU_STIME];
		*runtime = *runtime > gone ? *runtime - gone : 0;
		if (!p->have_times)
			v[RU_UTIME] = *runtime;
	}
}

/* rows: 0 for a process row, else the number of thread rows of p (t is this one). */
static void fill(const struct scenario *sc, int live, struct kinfo_proc *kp,
		 const struct fake_proc *p, int t, int rows)
{
	uint64_t v[NRU], runtime;

	memset(kp, 0, sizeof(*kp));
	kp->ki_pid = p->pid;
	kp->ki_ppid = p->ppid;
	kp->ki_pgid = p->pgid;
	kp->ki_sid = p->sid;
	kp->ki_uid = p->uid;
	kp->ki_ruid = p->ruid;
	kp->ki_svuid = p->uid;
	kp->ki_tdev = record_tdev(live, p);
	kp->ki_tdev_freebsd11 = (uint32_t)kp->ki_tdev; /* truncated, as both do */
	kp->ki_stat = (char)p->stat;
	kp->ki_numthreads = p->threads;
	kp->ki_rssize = p->rss;
	kp->ki_size = p->size;
	kp->ki_tid = 100000 + p->pid * 16 + t;
	kp->ki_oncpu = -1;
	kp->ki_lastcpu = -1;
	if (live) {
		kp->ki_structsize = sc->structsize;
		kp->ki_flag = p->tdev != NODEV ? P_CONTROLT : 0;
		kp->ki_tdflags = p->tdflags;
		kp->ki_slptime = p->slptime;
		/* In thread rows ki_runtime is the thread's (preferthread): the rows add up. */
		usage_of(p, rows, v, &runtime);
		kp->ki_runtime = share(runtime, t, rows > 0 ? rows : 1);
		/* p_start + getboottime(): the scenario's start is since the epoch, boottime too */
		kp->ki_start.tv_sec = (int64_t)p->start;
		kp->ki_start.tv_usec = (long)((p->start - (double)(int64_t)p->start) * 1e6 + 0.5);
		fill_rusage(&kp->ki_rusage, v, t, rows > 0 ? rows : 1);
		/* fill_kinfo_proc_only(): calccru() writes ki_childutime and ki_childstime, which are
		   ki_rusage_ch.ru_utime and ru_stime (sys/sys/user.h); nothing copies p_cru's counts,
		   so they stay 0 (bzero in fill_kinfo_proc); thread rows keep them as they are */
		set_timeval(&kp->ki_rusage_ch.ru_utime, p->ch[RU_UTIME]);
		set_timeval(&kp->ki_rusage_ch.ru_stime, p->ch[RU_STIME]);
		set_timeval(&kp->ki_childtime, p->ch[RU_UTIME] + p->ch[RU_STIME]);
		/* fill_kinfo_proc_only(): the prison's id, but 0 for the reader's own jail. */
		kp->ki_jid = p->jid == sc->reader_jail ? 0 : p->jid;
		memcpy(kp->ki_comm, p->comm, sizeof(kp->ki_comm));
	} else {
		/*
		 * kvm_proclist(): memset to 0 after ki_structsize was set, so it stays 0;
		 * ki_flag only for a process that is not a zombie; no ki_tdflags, ki_slptime,
		 * ki_start or ki_rusage; ki_runtime is p_rux's, the whole process's, in every
		 * row; ki_comm copied with strlcpy(.., MAXCOMLEN): at most 18 bytes.
		 */
		kp->ki_flag = p->tdev != NODEV && p->stat != SZOMB ? P_CONTROLT : 0;
		kp->ki_runtime = p->runtime;
		kp->ki_jid = p->jid; /* pr.pr_id: absolute, whoever reads the dump */
		memcpy(kp->ki_comm, p->comm, MAXCOMLEN - 1); /* 18 bytes and the NUL of memset */
	}
	memcpy(kp->ki_tdname, p->comm, sizeof(kp->ki_tdname) - 1);
}

/* A live handle reads its scenario again when the file changed: the host moved on. */
static void refresh(kvm_t *kd)
{
	struct stat st;
	char err[ERRBUF_SIZE];

	if (!kd->live || stat(kd->path, &st) != 0)
		return;
	if (st.st_size == kd->size && st.st_mtim.tv_sec == kd->mtime.tv_sec &&
	    st.st_mtim.tv_nsec == kd->mtime.tv_nsec)
		return;
	if (load_scenario(&kd->sc, kd->path, err) == 0)
		kd->mtime = st.st_mtim, kd->size = st.st_size;
}

void *kvm_getprocs(kvm_t *kd, int op, int arg, int *cnt)
{
	int what = op & ~KERN_PROC_INC_THREAD;
	/* KERN_PROC_ALL already means one row per thread (kernel and kvm_proclist alike). */
	int per_thread = what == KERN_PROC_ALL || (op & KERN_PROC_INC_THREAD);
	const char *message = (refresh(kd), enter(kd, CALL_GETPROCS));
	struct fake_proc self;
	struct fb_rusage self_ru;
	const struct fake_proc *procs = kd->sc.procs;
	int nprocs = kd->sc.nprocs;
	int n = 0;

	free_procbase(kd);
	if (message != NULL) {
		errno = ENOMEM;
		set_err(kd, message);
		return NULL;
	}
	if (kd->live && !has_node(op)) {
		errno = ENOENT;
		set_err(kd, "kvm_getprocs: No such file or directory");
		return NULL;
	}
	if (kd->live && (what == KERN_PROC_GID || what == KERN_PROC_RGID)) {
		errno = EINVAL;
		set_err(kd, "fakekvm: gid and rgid selection is not emulated");
		return NULL;
	}
	/* The kernel knows the calling process; the scenario is another host. */
	memset(&self_ru, 0, sizeof(self_ru));
	if (kd->live && what == KERN_PROC_PID && arg == getpid()) {
		int in_scenario = 0;
		for (int i = 0; i < nprocs; i++)
			in_scenario |= procs[i].pid == arg;
		if (!in_scenario && read_self(&kd->sc, &self, &self_ru) == 0) {
			procs = &self;
			nprocs = 1;
		}
	}
	for (int i = 0; i < nprocs; i++)
		if (selected(kd, &procs[i], what, arg))
			n += per_thread && procs[i].threads > 0 ? procs[i].threads : 1;
	if (n == 0 && kd->live && what == KERN_PROC_PID) {
		errno = ESRCH;
		set_err(kd, "kvm_getprocs: No such process");
		return NULL;
	}
	if (n == 0 && !kd->live) {
		/* kvm_getprocs() frees an empty dead-kernel array: NULL, *cnt 0, no error. */
		*cnt = 0;
		return NULL;
	}
	/* Like libkvm, never return NULL for an empty live success. */
	kd->procbase = calloc((size_t)n + 1, sizeof(struct kinfo_proc));
	if (kd->procbase == NULL) {
		set_err(kd, "kvm_getprocs: Cannot allocate memory");
		return NULL;
	}
	kd->nprocbase = n + 1;
	n = 0;
	for (int i = 0; i < nprocs; i++) {
		const struct fake_proc *p = &procs[i];
		int rows = per_thread && p->threads > 0 ? p->threads : 1;
		if (!selected(kd, p, what, arg))
			continue;
		for (int t = 0; t < rows; t++) {
			fill(&kd->sc, kd->live, &kd->procbase[n], p, t, per_thread ? rows : 0);
			if (procs == &self)
				kd->procbase[n].ki_rusage = self_ru;
			n++;
		}
	}
	*cnt = n;
	return kd->procbase;
}

/*
 * kvm_getargv(3) as lib/libkvm/kvm_proc.c kvm_argv() does it: one buffer and one vector
 * for the whole process (not per handle), reused by every call and overwritten by the
 * next; nchr 0 or above ARG_MAX means ARG_MAX; the buffer only grows, so nchr is the size
 * of the first call's buffer and of none after a larger one; kern.proc.args.<pid> with a
 * buffer too small copies what fits (the last byte becomes a NUL); NULL, without an error
 * text, for a pid that is gone and for 0 bytes (a zombie, or no p_args: kernel processes);
 * NULL with "cannot read user space from dead kernel" on a crash dump. Only ki_pid is read.
 */
#define FB_ARG_MAX (2 * 256 * 1024)
char **kvm_getargv(kvm_t *kd, const struct kinfo_proc *kp, int nchr)
{
	static int buflen, argc;
	static char *buf, **bufp;
	const struct fake_proc *p = NULL;
	size_t bufsz;
	int i = 0;

	if (!kd->live) {
		set_err(kd, "cannot read user space from dead kernel");
		return NULL;
	}
	if (nchr == 0 || nchr > FB_ARG_MAX)
		nchr = FB_ARG_MAX;
	if (buflen == 0) {
		buf = malloc((size_t)nchr);
		argc = 32;
		bufp = malloc(sizeof(char *) * (size_t)argc);
		if (buf == NULL || bufp == NULL)
			return NULL;
		buflen = nchr;
	} else if (nchr > buflen) {
		char *grown = realloc(buf, (size_t)nchr);
		if (grown != NULL) {
			buf = grown;
			buflen = nchr;
		}
	}
	for (int j = 0; j < kd->sc.nprocs && p == NULL; j++)
		if (kd->sc.procs[j].pid == kp->ki_pid)
			p = &kd->sc.procs[j];
	/* Gone, or in another jail than the reader's: p_cansee hides it, the sysctl fails. */
	if (p == NULL || (kd->sc.reader_jail != 0 && p->jid != kd->sc.reader_jail)) {
		errno = ESRCH;
		return NULL;
	}
	/* sysctl_kern_proc_args: p_args if the process has them, a zombie too (they are freed
	 * in proc_reap); nothing for one without them that is exiting or a system process. */
	if (p->args == NULL)
		return NULL;
	bufsz = p->argslen < (size_t)buflen ? p->argslen : (size_t)buflen;
	memcpy(buf, p->args, bufsz);
	if (p->argslen > (size_t)buflen) {
		buf[bufsz - 1] = '\0'; /* ENOMEM with a truncated copy, accepted */
		errno = 0;
	}
	for (char *c = buf; c < buf + bufsz; c += strlen(c) + 1) {
		bufp[i++] = c;
		if (i >= argc) {
			char **grown = realloc(bufp, sizeof(char *) * (size_t)(argc * 2));
			if (grown == NULL)
				return NULL;
			bufp = grown;
			argc *= 2;
		}
	}
	bufp[i] = NULL;
	return bufp;
}

int kvm_getloadavg(kvm_t *kd, double loadavg[], int nelem)
{
	const char *message = enter(kd, CALL_LOADAVG);

	if (message != NULL) {
		/* The live path is getloadavg(3): -1 and errno, errbuf untouched. */
		errno = EINVAL;
		return -1;
	}
	if (nelem > 3)
		nelem = 3;
	for (int i = 0; i < nelem; i++)
		loadavg[i] = kd->sc.loadavg[i];
	return nelem < 0 ? -1 : nelem;
}

/* The kernel variable symbol of a crash dump, or -1 (defined after the nlist code). */
static int kernel_var(const struct scenario *sc, const char *symbol);

int kvm_getswapinfo(kvm_t *kd, struct kvm_swap *swap_ary, int swap_max, int flags)
{
	const char *message = enter(kd, CALL_SWAPINFO);
	struct kvm_swap total;
	int filled = 0;

	(void)flags;
	if (message != NULL) {
		set_err(kd, message);
		return -1;
	}
	/*
	 * kvm_getswapinfo_kvm() -> nlist_init(): a dead kernel must have the symbol _dmmax,
	 * which current kernels no longer have (vm.dmmax reads nsw_cluster_max).
	 */
	if (!kd->live && kernel_var(&kd->sc, "_dmmax") < 0) {
		set_err(kd, "unable to find dmmax");
		return -1;
	}
	if (swap_max < 1)
		return -1;
	memset(&total, 0, sizeof(total));
	for (int i = 0; i < kd->sc.nswap; i++) {
		const struct kvm_swap *s = &kd->sc.swap[i];
		if (i < swap_max - 1)
			swap_ary[filled++] = *s;
		total.ksw_used += s->ksw_used;
		total.ksw_total += s->ksw_total;
	}
	swap_ary[filled] = total;
	return filled;
}

struct kvm_nlist {
	const char *n_name;
	unsigned char n_type;
	uint64_t n_value;
};

#define KVA_BASE 0xffffffff81000000ULL /* where the fake "links" its variables */
static const char *const kernel_vars[][2] = {
	{"_mp_ncpus", "hw.ncpu"},
	{"_maxproc", "kern.maxproc"},
	{"_maxthread", "kern.maxthread"},
};
#define NKERNEL_VARS (int)(sizeof(kernel_vars) / sizeof(kernel_vars[0]))

/*
 * The slot of a crash dump's kernel variable: a "symbol" line (slot MAXSYSCTL + i), else
 * the scenario sysctl the variable stands behind (slot i); -1 if the kernel has none.
 */
static int kernel_var(const struct scenario *sc, const char *symbol)
{
	for (int i = 0; i < sc->nsymbols; i++)
		if (strcmp(sc->symbols[i].name, symbol) == 0)
			return MAXSYSCTL + i;
	for (int v = 0; v < NKERNEL_VARS; v++) {
		if (strcmp(symbol, kernel_vars[v][0]) != 0)
			continue;
		for (int i = 0; i < sc->nsysctls; i++)
			if (strcmp(sc->sysctls[i].name, kernel_vars[v][1]) == 0)
				return i;
	}
	return -1;
}

int kvm_nlist2(kvm_t *kd, struct kvm_nlist *nl)
{
	int missing = 0;

	for (; nl->n_name != NULL && nl->n_name[0] != '\0'; nl++) {
		int slot = kernel_var(&kd->sc, nl->n_name);
		nl->n_type = slot < 0 ? 0 : 0x07; /* N_UNDF, or N_DATA | N_EXT */
		nl->n_value = slot < 0 ? 0 : KVA_BASE + (uint64_t)slot * sizeof(int);
		missing += slot < 0;
	}
	return missing;
}

ssize_t kvm_read2(kvm_t *kd, uint64_t kva, void *buf, size_t len)
{
	uint64_t slot = (kva - KVA_BASE) / sizeof(int);

	if (kd->live) {
		set_err(kd, "short read");
		return 0;
	}
	if (kva < KVA_BASE || (kva - KVA_BASE) % sizeof(int) != 0 || len != sizeof(int) ||
	    (slot >= (uint64_t)kd->sc.nsysctls &&
	     (slot < MAXSYSCTL || slot >= (uint64_t)(MAXSYSCTL + kd->sc.nsymbols)))) {
		snprintf(kd->errbuf, sizeof(kd->errbuf), "invalid address (0x%jx)", (uintmax_t)kva);
		return -1;
	}
	int value = (int)(slot < MAXSYSCTL ? kd->sc.sysctls[slot].value
					   : kd->sc.symbols[slot - MAXSYSCTL].value);
	memcpy(buf, &value, sizeof(int));
	return (ssize_t)len;
}

char *devname_r(fb_dev_t dev, uint16_t type, char *buf, int len)
{
	const struct scenario *sc = nopen > 0 ? &open_handles[nopen - 1]->sc : NULL;

	if (dev == NODEV || (type & 0170000) != FB_S_IFCHR) {
		snprintf(buf, (size_t)len, "#NODEV");
		return buf;
	}
	for (int i = 0; sc != NULL && i < sc->nttys; i++) {
		if (sc->ttys[i].dev == dev) {
			snprintf(buf, (size_t)len, "%s", sc->ttys[i].name);
			return buf;
		}
	}
	snprintf(buf, (size_t)len, "#C:%#jx", (uintmax_t)dev);
	return buf;
}

/* The scenario of the newest open handle, else FAKE_KVM_SCENARIO read afresh, else NULL. */
static const struct scenario *current_scenario(void)
{
	static struct scenario env_scenario;
	char err[ERRBUF_SIZE];
	const char *path = getenv("FAKE_KVM_SCENARIO");

	if (nopen > 0) {
		refresh(open_handles[nopen - 1]);
		return &open_handles[nopen - 1]->sc;
	}
	if (path != NULL && load_scenario(&env_scenario, path, err) == 0)
		return &env_scenario;
	return NULL;
}

static int is_ulong_sysctl(const char *name)
{
	return !strcmp(name, "hw.physmem") || !strcmp(name, "hw.realmem")
	       || !strcmp(name, "hw.usermem");
}

/* libjail's error text (lib/libjail/jail.c: char jail_errmsg[JAIL_ERRMSGLEN]). */
char jail_errmsg[1024];

/*
 * jail_getname(3) (lib/libjail/jail_getid.c): jail_get(2) by "jid" for "name", which needs
 * no privilege (kern_jail_get() looks the jid up with prison_find_child() of the caller's
 * prison: the jails below the caller's). A strdup()ed name the caller frees, or NULL and
 * jail_errmsg "jail N not found" (ENOENT). A jailed reader sees no jail here (no nesting).
 */
char *jail_getname(int jid)
{
	const struct scenario *sc = current_scenario();

	for (int i = 0; sc != NULL && sc->reader_jail == 0 && i < sc->njails; i++)
		if (sc->jails[i].jid == jid && jid > 0)
			return strdup(sc->jails[i].name);
	snprintf(jail_errmsg, sizeof(jail_errmsg), "jail %d not found", jid);
	errno = ENOENT;
	return NULL;
}

/* Copies an int or a record out the way SYSCTL_OUT does: ENOMEM if it does not fit. */
static int sysctl_out(void *oldp, size_t *oldlenp, const void *value, size_t len)
{
	if (oldp != NULL) {
		if (*oldlenp < len) {
			errno = ENOMEM;
			return -1;
		}
		memcpy(oldp, value, len);
	}
	*oldlenp = len;
	return 0;
}

/*
 * A string node as kern_sysctl.c sysctl_handle_string() answers a read: the text and its
 * NUL; into a buffer too small, what fits and ENOMEM (sysctl_old_user() copies up to the
 * buffer's end and fails; userland_sysctl() reports the bytes copied).
 */
static int text_out(void *oldp, size_t *oldlenp, const char *text)
{
	size_t len = strlen(text) + 1;

	if (oldp != NULL && *oldlenp < len) {
		memcpy(oldp, text, *oldlenp);
		errno = ENOMEM;
		return -1;
	}
	return sysctl_out(oldp, oldlenp, text, len);
}

/* The scenario's sysctl named name, or -1. */
static int sysctl_index(const struct scenario *sc, const char *name)
{
	for (int i = 0; sc != NULL && i < sc->nsysctls; i++)
		if (!strcmp(sc->sysctls[i].name, name))
			return i;
	return -1;
}

/*
 * sysctlnametomib(3) (lib/libc/gen/sysctlnametomib.c): the name2oid node
 * (CTL_SYSCTL.CTL_SYSCTL_NAME2OID, kern_sysctl.c sysctl_sysctl_name2oid()) turns a name into
 * its OID, ENOENT for no such node and ENOMEM for a MIB buffer too small. A scenario
 * sysctl's OID here is {FAKE_NODE, its index}: only sysctl.oidfmt (below) reads it.
 */
int sysctlnametomib(const char *name, int *mibp, size_t *sizep)
{
	int i = sysctl_index(current_scenario(), name);

	if (i < 0) {
		errno = ENOENT;
		return -1;
	}
	if (*sizep < 2) {
		errno = ENOMEM;
		return -1;
	}
	mibp[0] = FAKE_NODE;
	mibp[1] = i;
	*sizep = 2;
	return 0;
}

/*
 * sysctl.oidfmt of a scenario sysctl (kern_sysctl.c sysctl_sysctl_oidfmt()): its u_int
 * oid_kind, then its format string and NUL, as sysctl(8) reads them to print a node. The
 * kinds are those of the kernel's nodes: a SYSCTL_INT "I", hw.physmem and its kin
 * CTLTYPE_ULONG "LU" (sysctl_hw_physmem), a vm_cnt counter CTLTYPE_U64 "QU"
 * (VM_STATS_VM), a string CTLTYPE_STRING "A".
 */
static int oidfmt_out(const struct scenario *sc, int i, void *oldp, size_t *oldlenp)
{
	unsigned char out[sizeof(unsigned int) + 4];
	unsigned int kind = CTLTYPE_INT;
	const char *fmt = "I";

	if (sc->sysctls[i].is_text)
		kind = CTLTYPE_STRING, fmt = "A";
	else if (sc->sysctls[i].u64)
		kind = CTLTYPE_U64, fmt = "QU";
	else if (is_ulong_sysctl(sc->sysctls[i].name))
		kind = CTLTYPE_ULONG, fmt = "LU";
	memcpy(out, &kind, sizeof(kind));
	memcpy(out + sizeof(kind), fmt, strlen(fmt) + 1);
	return sysctl_out(oldp, oldlenp, out, sizeof(kind) + strlen(fmt) + 1);
}

int sysctlbyname(const char *name, void *oldp, size_t *oldlenp, const void *newp, size_t newlen)
{
	const struct scenario *sc = current_scenario();

	if (newp != NULL || newlen != 0) {
		errno = EPERM;
		return -1;
	}
	if (sc != NULL && !strcmp(name, "kern.boottime")) {
		/* sysctl_kern_boottime (kern_tc.c): getboottime(), SYSCTL_OUT of a struct timeval */
		struct fb_timeval tv;
		set_timeval(&tv, (uint64_t)(sc->boottime * 1e6 + 0.5));
		return sysctl_out(oldp, oldlenp, &tv, sizeof(tv));
	}
	if (sc != NULL && sc->have_cp_time && !strcmp(name, "kern.cp_time"))
		/* sysctl_kern_cp_time (kern_clock.c): SYSCTL_OUT of long[CPUSTATES] */
		return sysctl_out(oldp, oldlenp, sc->cp_time, sizeof(sc->cp_time));
	if (sc != NULL && sc->have_clockrate && !strcmp(name, "kern.clockrate"))
		/* sysctl_kern_clockrate (kern_clock.c): sysctl_handle_opaque of a struct clockinfo */
		return sysctl_out(oldp, oldlenp, sc->clockrate, sizeof(sc->clockrate));
	for (int i = 0; sc != NULL && i < sc->nsysctls; i++) {
		if (strcmp(sc->sysctls[i].name, name) != 0)
			continue;
		if (sc->sysctls[i].is_text)
			return text_out(oldp, oldlenp, sc->sysctls[i].text);
		/* hw.physmem and its kin are CTLTYPE_ULONG (sysctl_hw_physmem ...): 8 bytes on
		   LP64, and SYSCTL_OUT of 8 into a smaller buffer is ENOMEM. */
		unsigned long ul = (unsigned long)sc->sysctls[i].value;
		uint64_t u64 = (uint64_t)sc->sysctls[i].value;
		uint32_t u32 = (uint32_t)u64;
		int in = (int)sc->sysctls[i].value;
		if (sc->sysctls[i].u64)
			/* sysctl_handle_vmstat (vm_meter.c): a uint64_t, truncated to 4 bytes for a
			   4-byte buffer (COMPAT_FREEBSD11), else ENOMEM below 8 */
			return oldp != NULL && *oldlenp == sizeof(u32)
				       ? sysctl_out(oldp, oldlenp, &u32, sizeof(u32))
				       : sysctl_out(oldp, oldlenp, &u64, sizeof(u64));
		if (is_ulong_sysctl(name))
			return sysctl_out(oldp, oldlenp, &ul, sizeof(ul));
		return sysctl_out(oldp, oldlenp, &in, sizeof(in));
	}
	errno = ENOENT;
	return -1;
}

/* The open descriptors of this Linux process, counted in /proc/self/fd. */
static int open_fds(void)
{
	struct dirent *entry;
	DIR *dir = opendir("/proc/self/fd");
	int count = -1; /* the directory's own descriptor is listed too */

	if (dir == NULL)
		return -1;
	while ((entry = readdir(dir)) != NULL)
		count += entry->d_name[0] != '.';
	closedir(dir);
	return count;
}

/*
 * sysctl(3) by MIB, for the calling process only:
 * - kern.proc.nfds (CTL_KERN, KERN_PROC, KERN_PROC_NFDS, 0): its open descriptors, which
 *   sysctl_kern_proc_nfds() counts for curproc alone (an argument other than 0 is EINVAL);
 * - kern.proc.pid.<getpid()>: its kinfo_proc as sysctl_kern_proc() fills it, read from
 *   Linux's /proc/self (read_self); any other pid is not emulated (ESRCH);
 * - sysctl.oidfmt of a scenario sysctl's OID (sysctlnametomib): oidfmt_out().
 */
int sysctl(const int *name, unsigned int namelen, void *oldp, size_t *oldlenp, const void *newp,
	   size_t newlen)
{
	const struct scenario *sc = current_scenario();
	struct kinfo_proc kp;
	struct fake_proc self;
	struct fb_rusage ru;
	int count;

	if (namelen == 4 && name[0] == CTL_SYSCTL && name[1] == CTL_SYSCTL_OIDFMT &&
	    name[2] == FAKE_NODE && sc != NULL && name[3] >= 0 && name[3] < sc->nsysctls &&
	    newp == NULL && newlen == 0)
		return oidfmt_out(sc, name[3], oldp, oldlenp);
	if (namelen < 3 || name[0] != CTL_KERN || name[1] != KERN_PROC ||
	    (name[2] != KERN_PROC_NFDS && name[2] != KERN_PROC_PID)) {
		errno = ENOENT;
		return -1;
	}
	if (namelen != 4 || newp != NULL || newlen != 0) {
		errno = EINVAL;
		return -1;
	}
	if (name[2] == KERN_PROC_NFDS) {
		if (name[3] != 0) {
			errno = EINVAL;
			return -1;
		}
		count = open_fds();
		return count < 0 ? -1 : sysctl_out(oldp, oldlenp, &count, sizeof(count));
	}
	if (sc == NULL || name[3] != getpid() || read_self(sc, &self, &ru) != 0) {
		errno = ESRCH;
		return -1;
	}
	fill(sc, 1, &kp, &self, 0, 0);
	kp.ki_rusage = ru;
	return sysctl_out(oldp, oldlenp, &kp, sizeof(kp));
}
