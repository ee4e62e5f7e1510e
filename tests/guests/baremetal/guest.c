/*
 * Bare-metal SDEI test guest for qmp-sdei.
 *
 * It drives every SDEI call through the one hvc in start.S and prints one line per step on the
 * PL011, so a test can check each result:
 *
 *     STEP <name> key=value ...        a step and what the guest observed (values in hex)
 *     WAIT <what> <event>              the guest now spins until the host raises <event>
 *     DONE                             all steps ran
 *
 * The guest does not judge SDEI results itself (the test owns the expectations); it only
 * computes facts the host cannot see, such as "the interrupted pc was inside the spin loop".
 *
 * Printing is never concurrent: vCPU 1 prints only while vCPU 0 waits for it, and handlers
 * print only while their vCPU's main flow is parked in a spin loop, so no lock is needed.
 */

#include "../common/guest.h"

#define EV_SIGNAL 0
#define EV_PRIVATE 1000
#define EV_CRITICAL 1001
#define EV_SHARED 2000

/* From start.S */
extern uint64_t sdei_call(uint64_t fid, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5);
extern char sdei_hvc_insn[], sdei_entry[], car_resume[], secondary_entry[];
extern char spin_marked_loop[], spin_marked_end[];
extern void spin_marked(volatile uint32_t *flag, volatile uint32_t *uart_dr);

/* ---- console ------------------------------------------------------------------------------ */

static void begin(const char *kind, const char *name)
{
    put(kind);
    uart_putc(' ');
    put(name);
}

/* One call, one line: "STEP <name> x0=<result>". */
static uint64_t step(const char *name, uint64_t fid, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
                     uint64_t a5)
{
    uint64_t r = sdei_call(fid, a1, a2, a3, a4, a5);
    begin("STEP", name);
    kv("x0", r);
    end();
    return r;
}

#define STEP0(name, fid) step(name, fid, 0, 0, 0, 0, 0)
#define STEP1(name, fid, a) step(name, fid, a, 0, 0, 0, 0)
#define STEP2(name, fid, a, b) step(name, fid, a, b, 0, 0, 0)

static void wait_for_host(const char *what, uint64_t event)
{
    begin("WAIT", what);
    uart_putc(' ');
    put_dec(event);
    end();
}

/* ---- CPU state ------------------------------------------------------------------------------ */

static inline unsigned cpu_id(void) { return (unsigned)(read_mpidr() & 0xff); }

/* ---- handler ----------------------------------------------------------------------------------- */

enum mode { MODE_PLAIN, MODE_CONTEXT, MODE_NESTED, MODE_CAR, MODE_UNREGISTER };

/* What the last handler on each vCPU saw; written by handlers, read by the main flows. */
struct record {
    volatile uint64_t count, event, arg, pc, pstate, daif, spsel, el;
    volatile uint64_t ctx[4], ctx17, ctx18;
    volatile uint64_t unregister_result, status_inside;
};

static struct record rec[2];
static struct record critical_rec;
static volatile uint32_t handler_mode; /* enum mode; vCPU 0 only, vCPU 1 is always MODE_PLAIN */
static volatile uint32_t spin_flag;    /* set by handlers; ends a spin_marked() wait */
static volatile uint32_t cpu1_ready;
volatile uint64_t car_seen[3]; /* elr, spsr, count: written by car_resume in start.S */

static void record(struct record *r, uint64_t ev, uint64_t arg, uint64_t pc, uint64_t pstate)
{
    r->event = ev;
    r->arg = arg;
    r->pc = pc;
    r->pstate = pstate;
    r->daif = read_daif();
    r->spsel = read_spsel();
    r->el = read_current_el();
    r->count = r->count + 1;
}

static uint64_t critical_handler(uint64_t ev, uint64_t arg, uint64_t pc, uint64_t pstate)
{
    /* Runs on top of the normal handler: its view of the world while both are active. */
    critical_rec.ctx[0] = sdei_call(SDEI_EVENT_STATUS, EV_PRIVATE, 0, 0, 0, 0);
    critical_rec.ctx[1] = sdei_call(SDEI_EVENT_STATUS, EV_CRITICAL, 0, 0, 0, 0);
    record(&critical_rec, ev, arg, pc, pstate);
    return 0;
}

uint64_t sdei_handler_c(uint64_t ev, uint64_t arg, uint64_t pc, uint64_t pstate)
{
    unsigned cpu = cpu_id();
    struct record *r = &rec[cpu & 1];
    enum mode mode = cpu == 0 ? (enum mode)handler_mode : MODE_PLAIN;

    if (ev == EV_CRITICAL)
        return critical_handler(ev, arg, pc, pstate);

    switch (mode) {
    case MODE_CONTEXT:
        for (int i = 0; i < 4; i++)
            r->ctx[i] = sdei_call(SDEI_EVENT_CONTEXT, (uint64_t)i, 0, 0, 0, 0);
        r->ctx17 = sdei_call(SDEI_EVENT_CONTEXT, 17, 0, 0, 0, 0);
        r->ctx18 = sdei_call(SDEI_EVENT_CONTEXT, 18, 0, 0, 0, 0);
        break;
    case MODE_NESTED: {
        uint64_t before = critical_rec.count;
        begin("STEP", "nested-normal-enter");
        kv("ev", ev);
        end();
        wait_for_host("host-critical", EV_CRITICAL);
        while (critical_rec.count == before)
            cpu_relax();
        break;
    }
    case MODE_UNREGISTER:
        r->unregister_result = sdei_call(SDEI_EVENT_UNREGISTER, ev, 0, 0, 0, 0);
        r->status_inside = sdei_call(SDEI_EVENT_STATUS, ev, 0, 0, 0, 0);
        break;
    default:
        break;
    }
    record(r, ev, arg, pc, pstate);
    if (cpu == 0)
        spin_flag = 1;
    return mode == MODE_CAR ? (uint64_t)car_resume : 0;
}

void unexpected_exception(uint64_t vector)
{
    uint64_t esr, elr;
    __asm__ volatile("mrs %0, esr_el1" : "=r"(esr));
    __asm__ volatile("mrs %0, elr_el1" : "=r"(elr));
    begin("FATAL", "exception");
    kv("vector", vector);
    kv("esr", esr);
    kv("elr", elr);
    kv("cpu", cpu_id());
    end();
    for (;;)
        __asm__ volatile("wfe");
}

/* ---- vCPU 1 ------------------------------------------------------------------------------------ */

void secondary_main(uint64_t context_id)
{
    begin("STEP", "cpu1-up");
    kv("context", context_id);
    kv("el", read_current_el());
    end();
    step("cpu1-register-0", SDEI_EVENT_REGISTER, EV_SIGNAL, (uint64_t)sdei_entry, 0xB0, 0, 0);
    STEP1("cpu1-enable-0", SDEI_EVENT_ENABLE, EV_SIGNAL);
    step("cpu1-register-1000", SDEI_EVENT_REGISTER, EV_PRIVATE, (uint64_t)sdei_entry, 0xB1, 0, 0);
    STEP1("cpu1-enable-1000", SDEI_EVENT_ENABLE, EV_PRIVATE);
    STEP1("cpu1-status-1000", SDEI_EVENT_STATUS, EV_PRIVATE);
    STEP0("cpu1-unmask", SDEI_PE_UNMASK);
    cpu1_ready = 1;
    /* From here on vCPU 1 only takes events: spin with interrupts unmasked, never print. */
    __asm__ volatile("msr daifclr, #0xf" ::: "memory");
    for (;;)
        cpu_relax();
}

/* ---- vCPU 0 ------------------------------------------------------------------------------------ */

static void wait_count(volatile uint64_t *count, uint64_t before)
{
    while (*count == before)
        cpu_relax();
}

static void report_handler(const char *name, const struct record *r)
{
    begin("STEP", name);
    kv("count", r->count);
    kv("ev", r->event);
    kv("arg", r->arg);
    kv("daif", r->daif);
    kv("spsel", r->spsel);
    kv("el", r->el);
    end();
}

static void discovery(void)
{
    STEP0("version", SDEI_VERSION);
    STEP0("shared-reset", SDEI_SHARED_RESET);
    STEP0("private-reset", SDEI_PRIVATE_RESET);
    STEP1("features-0", SDEI_FEATURES, 0);
    STEP1("features-1", SDEI_FEATURES, 1);
    STEP1("features-2", SDEI_FEATURES, 2);

    static const uint64_t events[] = {EV_SIGNAL, EV_PRIVATE, EV_CRITICAL, EV_SHARED};
    static const char *const names[4][3] = {
        {"info-0-type", "info-0-signaled", "info-0-priority"},
        {"info-1000-type", "info-1000-signaled", "info-1000-priority"},
        {"info-1001-type", "info-1001-signaled", "info-1001-priority"},
        {"info-2000-type", "info-2000-signaled", "info-2000-priority"},
    };
    for (int e = 0; e < 4; e++)
        for (int info = 0; info < 3; info++)
            STEP2(names[e][info], SDEI_EVENT_GET_INFO, events[e], (uint64_t)info);
    STEP2("info-2000-mode-unregistered", SDEI_EVENT_GET_INFO, EV_SHARED, 3);
    STEP2("info-1000-mode", SDEI_EVENT_GET_INFO, EV_PRIVATE, 3);
    STEP2("info-1000-bad", SDEI_EVENT_GET_INFO, EV_PRIVATE, 5);
}

static void error_paths(void)
{
    STEP1("enable-unregistered", SDEI_EVENT_ENABLE, EV_PRIVATE);
    STEP1("disable-unregistered", SDEI_EVENT_DISABLE, EV_PRIVATE);
    STEP1("unregister-unregistered", SDEI_EVENT_UNREGISTER, EV_PRIVATE);
    step("register-unknown", SDEI_EVENT_REGISTER, 1234, (uint64_t)sdei_entry, 0, 0, 0);
    step("register-entry-0", SDEI_EVENT_REGISTER, EV_PRIVATE, 0, 0, 0, 0);
    step("register-bad-flags", SDEI_EVENT_REGISTER, EV_PRIVATE, (uint64_t)sdei_entry, 0, 2, 0);
    STEP1("status-unknown", SDEI_EVENT_STATUS, 9999);
    STEP1("context-outside", SDEI_EVENT_CONTEXT, 0);
    STEP1("context-18-outside", SDEI_EVENT_CONTEXT, 18);
    STEP1("complete-outside", SDEI_EVENT_COMPLETE, 0);
    STEP1("complete-resume-outside", SDEI_EVENT_COMPLETE_AND_RESUME, (uint64_t)car_resume);
    STEP2("signal-event-1", SDEI_EVENT_SIGNAL, 1, 0);
    STEP2("signal-unregistered", SDEI_EVENT_SIGNAL, EV_SIGNAL, 0);
    step("routing-set-private", SDEI_EVENT_ROUTING_SET, EV_PRIVATE, RM_ANY, 0, 0, 0);
    STEP1("release-static", SDEI_INTERRUPT_RELEASE, EV_PRIVATE);
    STEP0("unknown-fid", 0xC4000033UL);
    STEP0("smc32-version", 0x84000020UL);
}

static void start_cpu1(void)
{
    STEP0("psci-version", PSCI_VERSION);
    STEP1("psci-features-cpu-on", PSCI_FEATURES, PSCI_CPU_ON_64);
    /* vCPU 1 prints as soon as it runs: report CPU_ON only once it is done, so lines never mix. */
    uint64_t r = sdei_call(PSCI_CPU_ON_64, 1, (uint64_t)secondary_entry, 0x77, 0, 0);
    while (r == 0 && !cpu1_ready)
        cpu_relax();
    begin("STEP", "psci-cpu-on");
    kv("x0", r);
    end();
    STEP2("psci-affinity-info", PSCI_AFFINITY_INFO_64, 1, 0);
}

static void register_cpu0(void)
{
    step("register-0", SDEI_EVENT_REGISTER, EV_SIGNAL, (uint64_t)sdei_entry, 0xA0, 0, 0);
    STEP1("enable-0", SDEI_EVENT_ENABLE, EV_SIGNAL);
    step("register-1000", SDEI_EVENT_REGISTER, EV_PRIVATE, (uint64_t)sdei_entry, 0xA1, 0, 0);
    step("register-1000-again", SDEI_EVENT_REGISTER, EV_PRIVATE, (uint64_t)sdei_entry, 0xA1, 0, 0);
    STEP1("status-1000-registered", SDEI_EVENT_STATUS, EV_PRIVATE);
    STEP1("enable-1000", SDEI_EVENT_ENABLE, EV_PRIVATE);
    STEP1("enable-1000-again", SDEI_EVENT_ENABLE, EV_PRIVATE);
    step("register-1001", SDEI_EVENT_REGISTER, EV_CRITICAL, (uint64_t)sdei_entry, 0xA2, 0, 0);
    STEP1("enable-1001", SDEI_EVENT_ENABLE, EV_CRITICAL);
    STEP1("status-1000", SDEI_EVENT_STATUS, EV_PRIVATE);
    STEP1("status-1001", SDEI_EVENT_STATUS, EV_CRITICAL);
    STEP0("pe-unmask", SDEI_PE_UNMASK);
}

static void signals(void)
{
    uint64_t before = rec[0].count;
    handler_mode = MODE_PLAIN;
    STEP2("signal-self", SDEI_EVENT_SIGNAL, EV_SIGNAL, 0);
    /* Delivered as the SIGNAL call returns: the interrupted pc is the instruction after the hvc. */
    report_handler("signal-self-handled", &rec[0]);
    begin("STEP", "signal-self-context");
    kv("delivered", rec[0].count - before);
    kv("pc_is_after_hvc", rec[0].pc == (uint64_t)sdei_hvc_insn + 4);
    kv("pstate", rec[0].pstate);
    end();

    before = rec[1].count;
    STEP2("signal-other", SDEI_EVENT_SIGNAL, EV_SIGNAL, 1);
    wait_count(&rec[1].count, before);
    report_handler("signal-other-handled", &rec[1]);

    STEP2("signal-bad-mpidr", SDEI_EVENT_SIGNAL, EV_SIGNAL, 5);
}

static void host_private(void)
{
    handler_mode = MODE_CONTEXT;
    spin_flag = 0;
    /* The WAIT line's last character comes from inside spin_marked, once it is ready for the event. */
    begin("WAIT", "host-private");
    uart_putc(' ');
    put_dec(EV_PRIVATE);
    uart_putc('\r');
    spin_marked(&spin_flag, (volatile uint32_t *)(UART_BASE + UART_DR));
    report_handler("host-private-handled", &rec[0]);
    begin("STEP", "host-private-context");
    kv("pc_in_spin", rec[0].pc >= (uint64_t)spin_marked_loop && rec[0].pc < (uint64_t)spin_marked_end);
    kv("pstate", rec[0].pstate);
    kv("ctx0", rec[0].ctx[0]);
    kv("ctx1", rec[0].ctx[1]);
    kv("ctx2", rec[0].ctx[2]);
    kv("ctx3", rec[0].ctx[3]);
    kv("ctx17", rec[0].ctx17);
    kv("ctx18", rec[0].ctx18);
    end();
    handler_mode = MODE_PLAIN;

    uint64_t before = rec[1].count;
    wait_for_host("host-private-cpu1", EV_PRIVATE);
    wait_count(&rec[1].count, before);
    report_handler("host-private-cpu1-handled", &rec[1]);
}

static void host_shared(void)
{
    step("register-2000", SDEI_EVENT_REGISTER, EV_SHARED, (uint64_t)sdei_entry, 0xA3, RM_ANY, 0);
    STEP2("info-2000-mode-any", SDEI_EVENT_GET_INFO, EV_SHARED, 3);
    STEP2("info-2000-aff-any", SDEI_EVENT_GET_INFO, EV_SHARED, 4);
    step("routing-set-2000", SDEI_EVENT_ROUTING_SET, EV_SHARED, RM_PE, 1, 0, 0);
    STEP2("info-2000-mode-pe", SDEI_EVENT_GET_INFO, EV_SHARED, 3);
    STEP2("info-2000-aff-pe", SDEI_EVENT_GET_INFO, EV_SHARED, 4);
    STEP1("enable-2000", SDEI_EVENT_ENABLE, EV_SHARED);
    step("routing-set-2000-enabled", SDEI_EVENT_ROUTING_SET, EV_SHARED, RM_ANY, 0, 0, 0);
    STEP1("status-2000", SDEI_EVENT_STATUS, EV_SHARED);

    uint64_t before = rec[1].count;
    wait_for_host("host-shared", EV_SHARED); /* routed to vCPU 1 (RM_PE, affinity 1) */
    wait_count(&rec[1].count, before);
    report_handler("host-shared-handled", &rec[1]);
}

static void nested(void)
{
    uint64_t normal_before = rec[0].count, critical_before = critical_rec.count;
    handler_mode = MODE_NESTED;
    spin_flag = 0;
    wait_for_host("host-nested", EV_PRIVATE);
    spin_marked(&spin_flag, 0); /* the 1000 handler announces itself and waits for 1001 */
    handler_mode = MODE_PLAIN;
    report_handler("nested-critical-handled", &critical_rec);
    begin("STEP", "nested-done");
    kv("normal", rec[0].count - normal_before);
    kv("critical", critical_rec.count - critical_before);
    kv("critical_saw_status_1000", critical_rec.ctx[0]);
    kv("critical_saw_status_1001", critical_rec.ctx[1]);
    /* It preempted the normal handler, not the main flow parked in spin_marked(). */
    kv("critical_pc_outside_spin",
       critical_rec.pc < (uint64_t)spin_marked_loop || critical_rec.pc >= (uint64_t)spin_marked_end);
    kv("critical_interrupted_daif", critical_rec.pstate & 0x3c0);
    end();
}

static void complete_and_resume(void)
{
    uint64_t before = car_seen[2];
    handler_mode = MODE_CAR;
    STEP2("car-signal", SDEI_EVENT_SIGNAL, EV_SIGNAL, 0);
    handler_mode = MODE_PLAIN;
    begin("STEP", "car-resumed");
    kv("resumed", car_seen[2] - before);
    kv("elr_is_interrupted_pc", car_seen[0] == rec[0].pc);
    kv("elr_is_after_hvc", car_seen[0] == (uint64_t)sdei_hvc_insn + 4);
    kv("spsr_is_interrupted_pstate", car_seen[1] == rec[0].pstate);
    kv("elr", car_seen[0]);
    kv("spsr", car_seen[1]);
    end();
}

static void unregister_while_running(void)
{
    handler_mode = MODE_UNREGISTER;
    STEP2("unreg-signal", SDEI_EVENT_SIGNAL, EV_SIGNAL, 0);
    handler_mode = MODE_PLAIN;
    begin("STEP", "unreg-inside");
    kv("unregister", rec[0].unregister_result);
    kv("status", rec[0].status_inside);
    end();
    STEP1("unreg-status-after", SDEI_EVENT_STATUS, EV_SIGNAL);
    STEP1("unreg-again", SDEI_EVENT_UNREGISTER, EV_SIGNAL);
}

static void masking(void)
{
    step("register-0-again", SDEI_EVENT_REGISTER, EV_SIGNAL, (uint64_t)sdei_entry, 0xA0, 0, 0);
    STEP2("signal-disabled", SDEI_EVENT_SIGNAL, EV_SIGNAL, 0);
    STEP1("enable-0-again", SDEI_EVENT_ENABLE, EV_SIGNAL);
    STEP0("pe-mask", SDEI_PE_MASK);
    STEP0("pe-mask-again", SDEI_PE_MASK);
    STEP2("signal-masked", SDEI_EVENT_SIGNAL, EV_SIGNAL, 0);
    STEP0("pe-unmask-again", SDEI_PE_UNMASK);
}

static void binding(void)
{
    STEP1("bind-ppi-20", SDEI_INTERRUPT_BIND, 20);
    STEP1("bind-ppi-20-again", SDEI_INTERRUPT_BIND, 20);
    STEP1("bind-ppi-21", SDEI_INTERRUPT_BIND, 21);
    STEP1("bind-ppi-22", SDEI_INTERRUPT_BIND, 22);
    STEP1("bind-ppi-23", SDEI_INTERRUPT_BIND, 23);
    STEP1("bind-spi-40", SDEI_INTERRUPT_BIND, 40);
    STEP1("bind-sgi-5", SDEI_INTERRUPT_BIND, 5);
    uint64_t ev = sdei_call(SDEI_INTERRUPT_BIND, 20, 0, 0, 0, 0);
    step("register-bound", SDEI_EVENT_REGISTER, ev, (uint64_t)sdei_entry, 0xA4, 0, 0);
    STEP1("release-registered", SDEI_INTERRUPT_RELEASE, ev);
    STEP1("unregister-bound", SDEI_EVENT_UNREGISTER, ev);
    STEP1("release-ppi-20", SDEI_INTERRUPT_RELEASE, ev);
    STEP1("release-ppi-20-again", SDEI_INTERRUPT_RELEASE, ev);
    step("register-unbound", SDEI_EVENT_REGISTER, ev, (uint64_t)sdei_entry, 0xA4, 0, 0);
}

static void cleanup(void)
{
    STEP1("disable-1000", SDEI_EVENT_DISABLE, EV_PRIVATE);
    STEP1("status-1000-disabled", SDEI_EVENT_STATUS, EV_PRIVATE);
    STEP1("unregister-1000", SDEI_EVENT_UNREGISTER, EV_PRIVATE);
    STEP1("unregister-1001", SDEI_EVENT_UNREGISTER, EV_CRITICAL);
    STEP1("unregister-2000", SDEI_EVENT_UNREGISTER, EV_SHARED);
    STEP0("private-reset-end", SDEI_PRIVATE_RESET);
    STEP0("shared-reset-end", SDEI_SHARED_RESET);
    STEP1("status-0-end", SDEI_EVENT_STATUS, EV_SIGNAL);
}

void main(void)
{
    begin("STEP", "boot");
    kv("el", read_current_el());
    kv("daif", read_daif());
    kv("hvc", (uint64_t)sdei_hvc_insn);
    end();
    discovery();
    error_paths();
    start_cpu1();
    register_cpu0();
    signals();
    host_private();
    host_shared();
    nested();
    complete_and_resume();
    unregister_while_running();
    masking();
    binding();
    cleanup();
    put("DONE\r\n");
    sdei_call(PSCI_SYSTEM_OFF, 0, 0, 0, 0, 0);
}
