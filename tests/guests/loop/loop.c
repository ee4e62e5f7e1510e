/*
 * Benchmark guest for bench/conduit.py.
 *
 *   1. ROUNDS rounds of CALLS back-to-back SDEI_VERSION calls, each round timed with CNTVCT
 *      ("ROUND <r> calls=<n> ticks=<t> freq=<f>"; the guest's clock stops while QEMU is stopped,
 *      so this is the guest-visible share only).
 *   2. Registers private events 1000 (arg 0: plain handler) and 1001 (arg 1: the handler first
 *      makes one SDEI_EVENT_CONTEXT call, so the host sees the moment it runs), unmasks, prints
 *      "WAIT events" and spins with interrupts unmasked until EVENTS handlers have run.
 *   3. Prints "EVENTS <n>" and powers off with PSCI SYSTEM_OFF.
 */

#include "../common/guest.h"

#define ROUNDS 10
#define CALLS 200
#define EVENTS 100


static volatile uint64_t handled;

uint64_t handler_c(uint64_t ev, uint64_t arg, uint64_t pc, uint64_t pstate)
{
    (void)ev, (void)pc, (void)pstate;
    if (arg)
        smccc(SDEI_EVENT_CONTEXT, 0, 0, 0, 0, 0);
    handled = handled + 1;
    return 0;
}

void unexpected_exception(uint64_t vector)
{
    put("FATAL exception vector ");
    put_dec(vector);
    put("\r\n");
    for (;;)
        __asm__ volatile("wfe");
}

void main(void)
{
    put("LOOP start\r\n");
    for (int r = 0; r < ROUNDS; r++) {
        uint64_t t0 = cntvct();
        for (int i = 0; i < CALLS; i++)
            smccc(SDEI_VERSION, 0, 0, 0, 0, 0);
        uint64_t t1 = cntvct();
        put("ROUND ");
        put_dec((uint64_t)r);
        put(" calls=");
        put_dec(CALLS);
        put(" ticks=");
        put_dec(t1 - t0);
        put(" freq=");
        put_dec(cntfrq());
        put("\r\n");
    }
    smccc(SDEI_EVENT_REGISTER, 1000, (uint64_t)sdei_entry, 0, 0, 0);
    smccc(SDEI_EVENT_ENABLE, 1000, 0, 0, 0, 0);
    smccc(SDEI_EVENT_REGISTER, 1001, (uint64_t)sdei_entry, 1, 0, 0);
    smccc(SDEI_EVENT_ENABLE, 1001, 0, 0, 0, 0);
    smccc(SDEI_PE_UNMASK, 0, 0, 0, 0, 0);
    put("WAIT events\r\n");
    __asm__ volatile("msr daifclr, #0xf" ::: "memory");
    while (handled < EVENTS)
        __asm__ volatile("yield" ::: "memory");
    __asm__ volatile("msr daifset, #0xf" ::: "memory");
    put("EVENTS ");
    put_dec(handled);
    put("\r\n");
    smccc(PSCI_SYSTEM_OFF, 0, 0, 0, 0, 0);
}
