/* A fake libnvidia-ml.so for tests (no GPU exists on CI machines). It implements the NVML entry
 * points pipeprobe calls, with values read from the script file named by PIPEPROBE_FAKE_NVML:
 *
 *   driver 550.54.15
 *   init_error 9                       (optional: nvmlInit returns this NVML error code)
 *   gpu name=NVIDIA-H100 uuid=GPU-1 util=37 memutil=20 mem_total=85899345920 mem_used=1073741824
 *       power_mw=250000 power_limit_mw=700000 temp=61 energy_mj=123456 sm_mhz=1755 mem_mhz=2619
 *       throttle=4 lost_after=3    (optional: throttle-reason bits; GPU_IS_LOST after 3 rounds)
 *       ecc_corrected=5 ecc_uncorrected=1 (optional: without them ECC is "not supported")
 *   proc gpu=0 pid=1234 mem=536870912 sm=40   (or in PIPEPROBE_FAKE_NVML_PROCS, see reload_procs)
 *   xid gpu=0 code=79 after=2          (a critical Xid event once the GPU has been sampled twice)
 *
 * (one gpu/proc per line). Built by the tests with `cc -shared -fPIC`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
enum { OK = 0, INVALID_ARG = 2, NOT_SUPPORTED = 3, INSUFFICIENT_SIZE = 7, UNINITIALIZED = 1 };

struct gpu {
    char name[96], uuid[96];
    unsigned util, memutil, power_mw, power_limit_mw, temp, sm_mhz, mem_mhz;
    unsigned long long mem_total, mem_used, energy_mj, throttle;
    unsigned lost_after, rounds, lost, has_ecc;
    unsigned long long ecc_corrected, ecc_uncorrected;
};
struct xid { unsigned gpu, code, after, delivered; };
typedef struct { void *device; unsigned long long eventType, eventData; unsigned gpuInstanceId, computeInstanceId; } nvmlEventData_t;
static struct xid xids[32];
static unsigned nxids;
struct proc { unsigned gpu, pid, sm; unsigned long long mem; };
typedef struct { unsigned pid; unsigned long long timeStamp; unsigned smUtil, memUtil, encUtil, decUtil; } nvmlProcessUtilizationSample_t;
typedef struct { unsigned gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
typedef struct { unsigned pid; unsigned long long usedGpuMemory; unsigned gpuInstanceId, computeInstanceId; } nvmlProcessInfo_t;

static struct gpu gpus[16];
static struct proc procs[64];
static unsigned ngpus, nprocs, initialized;
static int init_error;
static char driver[64] = "0.0";

static unsigned long long num(const char *line, const char *key) {
    const char *p = strstr(line, key);
    return p ? strtoull(p + strlen(key), NULL, 10) : 0;
}

static void str(const char *line, const char *key, char *out, size_t n) {
    const char *p = strstr(line, key);
    if (!p) return;
    p += strlen(key);
    size_t i = 0;
    while (p[i] && p[i] != ' ' && p[i] != '\n' && i + 1 < n) { out[i] = p[i]; i++; }
    out[i] = 0;
}

static void load(void) {
    ngpus = nprocs = nxids = 0; init_error = 0;
    const char *path = getenv("PIPEPROBE_FAKE_NVML");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) { init_error = 9; return; }   /* no script: behave like a node without a driver */
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "driver ", 7)) { str(line, "driver ", driver, sizeof driver); }
        else if (!strncmp(line, "init_error ", 11)) { init_error = atoi(line + 11); }
        else if (!strncmp(line, "gpu ", 4) && ngpus < 16) {
            struct gpu *g = &gpus[ngpus++];
            memset(g, 0, sizeof *g);
            str(line, "name=", g->name, sizeof g->name);
            str(line, "uuid=", g->uuid, sizeof g->uuid);
            g->util = num(line, "util="); g->memutil = num(line, "memutil=");
            g->mem_total = num(line, "mem_total="); g->mem_used = num(line, "mem_used=");
            g->power_mw = num(line, "power_mw="); g->power_limit_mw = num(line, "power_limit_mw=");
            g->temp = num(line, "temp="); g->energy_mj = num(line, "energy_mj=");
            g->sm_mhz = num(line, "sm_mhz="); g->mem_mhz = num(line, "mem_mhz=");
            g->throttle = num(line, "throttle="); g->lost_after = num(line, "lost_after=");
            g->has_ecc = strstr(line, "ecc_") != NULL;
            g->ecc_corrected = num(line, "ecc_corrected="); g->ecc_uncorrected = num(line, "ecc_uncorrected=");
        } else if (!strncmp(line, "xid ", 4) && nxids < 32) {
            struct xid *x = &xids[nxids++];
            x->gpu = num(line, "gpu="); x->code = num(line, "code="); x->after = num(line, "after="); x->delivered = 0;
        } else if (!strncmp(line, "proc ", 5) && nprocs < 64) {
            struct proc *p = &procs[nprocs++];
            p->gpu = num(line, "gpu="); p->pid = num(line, "pid="); p->mem = num(line, "mem="); p->sm = num(line, "sm=");
        }
    }
    fclose(f);
}

/* With PIPEPROBE_FAKE_NVML_PROCS set, the `proc` lines come from that file, re-read on every
 * process query: a test can put a process it started on a GPU while the agent runs. An `xid gpu=N
 * code=C` line there is an Xid event the test raises when it chooses (not after a round count,
 * which races with whoever watches for it); each (gpu, code) is delivered once. */
static void reload_procs(void) {
    const char *path = getenv("PIPEPROBE_FAKE_NVML_PROCS");
    if (!path) return;
    FILE *f = fopen(path, "r");
    nprocs = 0;
    if (!f) return;
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "proc ", 5) && nprocs < 64) {
            struct proc *p = &procs[nprocs++];
            p->gpu = num(line, "gpu="); p->pid = num(line, "pid="); p->mem = num(line, "mem="); p->sm = num(line, "sm=");
        } else if (!strncmp(line, "xid ", 4)) {
            unsigned gpu = num(line, "gpu="), code = num(line, "code="), i;
            for (i = 0; i < nxids && !(xids[i].gpu == gpu && xids[i].code == code); i++) {}
            if (i == nxids && nxids < 32) {
                struct xid *x = &xids[nxids++];
                x->gpu = gpu; x->code = code; x->after = 0; x->delivered = 0;
            }
        }
    }
    fclose(f);
}

#define GPU_IS_LOST 15
#define DEV(d) struct gpu *g = (struct gpu *)(d); if (!initialized) return UNINITIALIZED; if (!g) return INVALID_ARG; \
    if (g->lost) return GPU_IS_LOST

nvmlReturn_t nvmlInit_v2(void) { load(); if (init_error) return init_error; initialized = 1; return OK; }
nvmlReturn_t nvmlInitWithFlags(unsigned flags) { (void)flags; return nvmlInit_v2(); }
nvmlReturn_t nvmlShutdown(void) { initialized = 0; return OK; }
const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) { case 9: return "Driver Not Loaded"; case 15: return "GPU is lost"; default: return "Unknown Error"; }
}
nvmlReturn_t nvmlSystemGetDriverVersion(char *v, unsigned n) { snprintf(v, n, "%s", driver); return OK; }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned *n) { if (!initialized) return UNINITIALIZED; *n = ngpus; return OK; }
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned i, void **d) {
    if (!initialized) return UNINITIALIZED; if (i >= ngpus) return INVALID_ARG; *d = &gpus[i]; return OK;
}
nvmlReturn_t nvmlDeviceGetIndex(void *d, unsigned *i) { DEV(d); *i = (unsigned)(g - gpus); return OK; }
nvmlReturn_t nvmlDeviceGetName(void *d, char *s, unsigned n) { DEV(d); snprintf(s, n, "%s", g->name); return OK; }
nvmlReturn_t nvmlDeviceGetUUID(void *d, char *s, unsigned n) { DEV(d); snprintf(s, n, "%s", g->uuid); return OK; }
/* Each sampling round reads utilization once: it counts rounds for lost_after. */
nvmlReturn_t nvmlDeviceGetUtilizationRates(void *d, nvmlUtilization_t *u) {
    DEV(d);
    g->rounds++;
    if (g->lost_after && g->rounds > g->lost_after) { g->lost = 1; return GPU_IS_LOST; }
    u->gpu = g->util; u->memory = g->memutil; return OK;
}
nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(void *d, unsigned long long *r) { DEV(d); *r = g->throttle; return OK; }
nvmlReturn_t nvmlDeviceGetProcessUtilization(void *d, nvmlProcessUtilizationSample_t *u, unsigned *count, unsigned long long last) {
    DEV(d); (void)last; reload_procs();
    unsigned n = 0, idx = (unsigned)(g - gpus);
    for (unsigned i = 0; i < nprocs; i++) if (procs[i].gpu == idx && procs[i].sm) n++;
    if (!u || *count < n) { *count = n; return n ? INSUFFICIENT_SIZE : OK; }
    unsigned k = 0;
    for (unsigned i = 0; i < nprocs; i++) {
        if (procs[i].gpu != idx || !procs[i].sm) continue;
        memset(&u[k], 0, sizeof u[k]);
        u[k].pid = procs[i].pid; u[k].timeStamp = 1; u[k].smUtil = procs[i].sm; k++;
    }
    *count = k;
    return OK;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(void *d, nvmlMemory_v2_t *m) {
    DEV(d); m->total = g->mem_total; m->used = g->mem_used; m->free = g->mem_total - g->mem_used; m->reserved = 0; return OK;
}
nvmlReturn_t nvmlDeviceGetPowerUsage(void *d, unsigned *mw) { DEV(d); *mw = g->power_mw; return OK; }
nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(void *d, unsigned *mw) { DEV(d); *mw = g->power_limit_mw; return OK; }
nvmlReturn_t nvmlDeviceGetTemperature(void *d, int sensor, unsigned *t) { DEV(d); (void)sensor; *t = g->temp; return OK; }
nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(void *d, unsigned long long *mj) {
    DEV(d); if (!g->energy_mj) return NOT_SUPPORTED; *mj = g->energy_mj; return OK;
}
nvmlReturn_t nvmlDeviceGetClockInfo(void *d, int type, unsigned *mhz) {
    DEV(d); if (type == 1) *mhz = g->sm_mhz; else if (type == 2) *mhz = g->mem_mhz; else return NOT_SUPPORTED; return OK;
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(void *d, unsigned *count, nvmlProcessInfo_t *infos) {
    DEV(d); reload_procs();
    unsigned n = 0, idx = (unsigned)(g - gpus);
    for (unsigned i = 0; i < nprocs; i++) if (procs[i].gpu == idx) n++;
    if (!infos || *count < n) { *count = n; return n ? INSUFFICIENT_SIZE : OK; }
    unsigned k = 0;
    for (unsigned i = 0; i < nprocs; i++) {
        if (procs[i].gpu != idx) continue;
        infos[k].pid = procs[i].pid; infos[k].usedGpuMemory = procs[i].mem;
        infos[k].gpuInstanceId = infos[k].computeInstanceId = 0xFFFFFFFF; k++;
    }
    *count = k;
    return OK;
}

/* Memory error type 0 = corrected, 1 = uncorrected. */
nvmlReturn_t nvmlDeviceGetTotalEccErrors(void *d, int type, int counter, unsigned long long *n) {
    DEV(d); (void)counter;
    if (!g->has_ecc) return NOT_SUPPORTED;
    *n = type == 0 ? g->ecc_corrected : g->ecc_uncorrected;
    return OK;
}

/* Events: one set; critical Xid (0x8) is the only type. */
#define XID_CRITICAL 0x8ULL
#define TIMEOUT 10
static int event_set_token;
nvmlReturn_t nvmlEventSetCreate(void **set) { if (!initialized) return UNINITIALIZED; *set = &event_set_token; return OK; }
nvmlReturn_t nvmlEventSetFree(void *set) { (void)set; return OK; }
nvmlReturn_t nvmlDeviceGetSupportedEventTypes(void *d, unsigned long long *types) { DEV(d); *types = XID_CRITICAL; return OK; }
nvmlReturn_t nvmlDeviceRegisterEvents(void *d, unsigned long long types, void *set) { DEV(d); (void)types; (void)set; return OK; }
nvmlReturn_t nvmlEventSetWait_v2(void *set, nvmlEventData_t *data, unsigned timeout_ms) {
    (void)set; (void)timeout_ms;
    for (unsigned i = 0; i < nxids; i++) {
        struct xid *x = &xids[i];
        if (x->delivered || x->gpu >= ngpus || gpus[x->gpu].rounds < x->after) continue;
        x->delivered = 1;
        memset(data, 0, sizeof *data);
        data->device = &gpus[x->gpu]; data->eventType = XID_CRITICAL; data->eventData = x->code;
        return OK;
    }
    return TIMEOUT;
}
