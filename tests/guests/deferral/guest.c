/*
 * Deferred SDEI delivery test guest for qmp-sdei.
 *
 * The gdbstub conduit can only enter a handler on a vCPU in EL1h. This guest parks vCPU 0 in
 * EL1t and then in EL0, where the conduit must defer the event and catch the next exception
 * entry on the VBAR_EL1 vectors. The host decides when that entry happens: vCPU 0 spins without
 * taking any exception until its "go" count rises, and the count is raised by an SDEI handler
 * on vCPU 1 (which sits in EL1h, so the host's event there is entered at once). So the event
 * on vCPU 0 is always raised while vCPU 0 cannot take it, whatever the timing.
 *
 * Lines (values in hex):
 *     STEP <name> key=value ...   a call result or an observation
 *     WAIT <where> <event>        vCPU 0 now spins in <where> (el1t or el0) until released
 *     HANDLER key=value ...       vCPU 0's handler ran (printed from inside the handler)
 *     DONE <where> key=value ...  the case finished and vCPU 0 is back in its main flow
 *     QUIET key=value ...         exceptions taken after both cases, with no event pending
 *     FATAL ...                   something the guest cannot go on from
 *
 * vCPU 1 never prints after it is up, so the UART needs no lock.
 */

#include "../common/guest.h"

#define EV_PRIVATE 1000
#define ARG_CPU0 0xA0
#define ARG_CPU1 0xB0

#define SVC_NOTE 0
#define SVC_EXIT 1
#define QUIET_SVCS 100

extern uint64_t sdei_call(uint64_t fid, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5);
extern char sdei_hvc_insn[], sdei_entry[], secondary_entry[], vectors[], svc_insn[];
extern char __stack_top_el1t[], __stack_top_el0[];
extern void run_el1t(void (*fn)(void), void *sp_el0);
extern void run_el0(void (*fn)(void), void *sp_el0);
extern void do_svc(uint64_t call);

volatile uint64_t el0_kernel_sp; /* run_el0's SP_EL1 frame, for the EL0 exit call */

/* ---- CPU state (EL1 only) ------------------------------------------------------------------ */

/* ---- shared state ------------------------------------------------------------------------------- */

/* What vCPU 0's SDEI handler saw, per case. */
struct seen {
    volatile uint64_t count, event, arg, pc, pstate, daif, spsel, el, ctx2;
};

/* What the svc handler saw: the first `svc` of each case is the exception the event waits for. */
struct svc_seen {
    volatile uint64_t count, esr, elr, spsr;
};

static struct seen handler_seen;
static struct svc_seen svc_seen;
static volatile uint32_t go;          /* raised by vCPU 1's handler: how far vCPU 0 may go */
static volatile uint32_t cpu1_ready;
static volatile uint64_t cpu1_handled;
static volatile uint64_t cpu1_laps; /* vCPU 1's main loop, outside any handler */
static volatile uint64_t resumed_marks; /* callee-saved marks survived the whole detour */

__attribute__((noreturn)) void unexpected_exception(uint64_t vector, uint64_t esr, uint64_t elr)
{
    put("FATAL unexpected-exception");
    kv("vector", vector);
    kv("esr", esr);
    kv("elr", elr);
    end();
    for (;;)
        __asm__ volatile("wfe");
}

/* ---- handlers --------------------------------------------------------------------------------- */

/* The SDEI handler for event 1000 on both vCPUs (start.S sdei_entry). */
void sdei_handler_c(uint64_t ev, uint64_t arg, uint64_t pc, uint64_t pstate)
{
    if (arg == ARG_CPU1) {
        /* vCPU 1: the host's way of releasing vCPU 0. No printing: vCPU 0 may be printing. */
        cpu1_handled++;
        go++;
        return;
    }
    struct seen *s = &handler_seen;
    s->event = ev;
    s->arg = arg;
    s->pc = pc;
    s->pstate = pstate;
    s->daif = read_daif();
    s->spsel = read_spsel();
    s->el = read_current_el();
    s->ctx2 = sdei_call(SDEI_EVENT_CONTEXT, 2, 0, 0, 0, 0);
    s->count++;
    put("HANDLER");
    kv("ev", ev);
    kv("arg", arg);
    kv("daif", s->daif);
    kv("spsel", s->spsel);
    kv("el", s->el);
    kv("pc", pc);
    kv("pstate", pstate);
    end();
}

/* Synchronous exceptions from EL1t/EL0 (start.S svc_entry). Returns 1 to leave EL0. */
uint64_t svc_handler_c(uint64_t esr, uint64_t elr, uint64_t spsr, uint64_t call)
{
    if (esr >> 26 != 0x15) /* EC: SVC from AArch64 */
        unexpected_exception(0x100, esr, elr);
    if (call == SVC_EXIT)
        return (spsr & 0xf) == 0 ? 1 : 0; /* only EL0 may leave this way */
    svc_seen.count++;
    svc_seen.esr = esr;
    svc_seen.elr = elr;
    svc_seen.spsr = spsr;
    return 0;
}

/* ---- the cases ---------------------------------------------------------------------------------- */

/*
 * Spin until go reaches `level`, taking no exception, then take one with `svc #0`. Callee-saved
 * registers hold marks across the whole detour (deferred handler at the vector, svc handler,
 * eret) to show the interrupted context came back intact.
 */
static void wait_then_svc(uint32_t level)
{
    register uint64_t m19 __asm__("x19") = 0x19191919;
    register uint64_t m28 __asm__("x28") = 0x28282828;
    __asm__ volatile("" : "+r"(m19), "+r"(m28));
    while (go < level)
        cpu_relax();
    do_svc(SVC_NOTE);
    __asm__ volatile("" : "+r"(m19), "+r"(m28));
    resumed_marks = (m19 == 0x19191919 && m28 == 0x28282828) ? 1 : 0;
}

static void el1t_case(void)
{
    __asm__ volatile("msr daifclr, #0xf" ::: "memory");
    put("STEP el1t-entered");
    kv("spsel", read_spsel());
    kv("daif", read_daif());
    end();
    put("WAIT el1t 1000\r\n");
    wait_then_svc(1);
    __asm__ volatile("msr daifset, #0xf" ::: "memory");
}

__attribute__((noreturn)) static void el0_case(void)
{
    /* EL0t, DAIF clear (from SPSR_EL1 = 0). mrs of DAIF/SPSel/CurrentEL would trap here. */
    put("WAIT el0 1000\r\n");
    wait_then_svc(2);
    do_svc(SVC_EXIT);
    for (;;) {
    }
}

static void quiet_el1t(void)
{
    __asm__ volatile("msr daifclr, #0xf" ::: "memory");
    for (int i = 0; i < QUIET_SVCS; i++)
        do_svc(SVC_NOTE);
    __asm__ volatile("msr daifset, #0xf" ::: "memory");
}

__attribute__((noreturn)) static void quiet_el0(void)
{
    for (int i = 0; i < QUIET_SVCS; i++)
        do_svc(SVC_NOTE);
    do_svc(SVC_EXIT);
    for (;;) {
    }
}

static void report(const char *where, uint64_t vector_offset, uint64_t count_before)
{
    struct seen *s = &handler_seen;
    put("DONE ");
    put(where);
    kv("handled", s->count);
    kv("ev", s->event);
    kv("arg", s->arg);
    kv("daif", s->daif);
    kv("spsel", s->spsel);
    kv("el", s->el);
    /* The handler interrupted the first instruction of the vector the svc entered... */
    kv("pc", s->pc);
    kv("pc_is_vector", s->pc == (uint64_t)vectors + vector_offset);
    kv("pstate", s->pstate);
    kv("ctx2", s->ctx2);
    /* ...and once it completed, that vector handled the svc exactly as if nothing happened. */
    kv("svcs", svc_seen.count - count_before);
    kv("svc_elr_ok", svc_seen.elr == (uint64_t)svc_insn + 4);
    kv("svc_spsr_mode", svc_seen.spsr & 0xf);
    kv("marks", resumed_marks);
    kv("el_now", read_current_el());
    kv("spsel_now", read_spsel());
    end();
}

void secondary_main(void)
{
    sdei_call(SDEI_EVENT_REGISTER, EV_PRIVATE, (uint64_t)sdei_entry, ARG_CPU1, 0, 0);
    sdei_call(SDEI_EVENT_ENABLE, EV_PRIVATE, 0, 0, 0, 0);
    sdei_call(SDEI_PE_UNMASK, 0, 0, 0, 0, 0);
    __asm__ volatile("msr daifclr, #0xf" ::: "memory");
    cpu1_ready = 1;
    for (;;) {
        cpu1_laps++;
        cpu_relax(); /* EL1h: the host's events here are entered at once */
    }
}

void main(void)
{
    put("STEP boot");
    kv("el", read_current_el());
    kv("spsel", read_spsel());
    kv("hvc", (uint64_t)sdei_hvc_insn);
    kv("vbar", (uint64_t)vectors);
    kv("mpidr", read_mpidr() & 0xff);
    end();

    put("STEP setup");
    kv("version", sdei_call(SDEI_VERSION, 0, 0, 0, 0, 0));
    kv("register", sdei_call(SDEI_EVENT_REGISTER, EV_PRIVATE, (uint64_t)sdei_entry, ARG_CPU0, 0, 0));
    kv("enable", sdei_call(SDEI_EVENT_ENABLE, EV_PRIVATE, 0, 0, 0, 0));
    kv("unmask", sdei_call(SDEI_PE_UNMASK, 0, 0, 0, 0, 0));
    kv("cpu_on", sdei_call(PSCI_CPU_ON_64, 1, (uint64_t)secondary_entry, 0, 0, 0));
    end();
    while (!cpu1_ready)
        cpu_relax();
    put("STEP cpu1-up\r\n");

    /* (a) EL1t */
    uint64_t before = svc_seen.count;
    run_el1t(el1t_case, __stack_top_el1t);
    report("el1t", 0x000, before);

    /* (b) EL0 */
    before = svc_seen.count;
    run_el0(el0_case, __stack_top_el0);
    report("el0", 0x400, before);

    /* No event pending any more: the vectors must not stop the VM. The two PSCI_VERSION calls
     * are markers the host counts stops between. vCPU 1's releasing handler may not have made
     * its COMPLETE yet (a vCPU that the stops of another keep interrupting hardly runs): wait
     * until it loops in its main flow again, or its COMPLETE would be a stop between them. */
    uint64_t laps = cpu1_laps;
    while (cpu1_laps < laps + 2)
        cpu_relax();
    uint64_t a = sdei_call(PSCI_VERSION, 0, 0, 0, 0, 0);
    before = svc_seen.count;
    run_el1t(quiet_el1t, __stack_top_el1t);
    run_el0(quiet_el0, __stack_top_el0);
    uint64_t svcs = svc_seen.count - before;
    uint64_t b = sdei_call(PSCI_VERSION, 0, 0, 0, 0, 0);
    put("QUIET");
    kv("svcs", svcs);
    kv("psci_a", a);
    kv("psci_b", b);
    kv("handled", handler_seen.count);
    end();
    sdei_call(PSCI_SYSTEM_OFF, 0, 0, 0, 0, 0);
}
