/*
 * A guest that makes SDEI calls for ever, for live-migration tests and bench/migration.py.
 *
 *   1. Reads its call period in microseconds from PERIOD_ADDR (0: back to back), which the host
 *      sets with "-device loader,addr=0x4ff00000,data=<us>,data-len=4" (RAM is zero otherwise).
 *   2. Registers private event 1000 and enables it, registers 1001 and leaves it disabled (a host
 *      raise of 1001 then stays pending: state the migration must carry), unmasks, prints
 *      "READY version=<x0 of SDEI_VERSION>".
 *   3. Calls SDEI_VERSION for ever, once per period; prints "TICK <calls>" every 1024 calls and
 *      "BAD version=<x0>" if the answer ever changes (a destination with other versions).
 *      Each handler run of event 1000 prints "HANDLED <n>".
 */

#include "../common/guest.h"

#define PERIOD_ADDR 0x4ff00000UL


static volatile uint64_t handled;

uint64_t handler_c(uint64_t ev, uint64_t arg, uint64_t pc, uint64_t pstate)
{
    (void)ev, (void)arg, (void)pc, (void)pstate;
    handled = handled + 1;
    put("HANDLED ");
    put_dec(handled);
    put("\r\n");
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
    uint64_t period_us = *(volatile uint32_t *)PERIOD_ADDR;
    uint64_t period_ticks = period_us * cntfrq() / 1000000;
    smccc(SDEI_EVENT_REGISTER, 1000, (uint64_t)sdei_entry, 0, 0, 0);
    smccc(SDEI_EVENT_ENABLE, 1000, 0, 0, 0, 0);
    smccc(SDEI_EVENT_REGISTER, 1001, (uint64_t)sdei_entry, 1, 0, 0);
    smccc(SDEI_PE_UNMASK, 0, 0, 0, 0, 0);
    uint64_t version = smccc(SDEI_VERSION, 0, 0, 0, 0, 0);
    put("READY version=");
    put_hex(version);
    put("\r\n");
    __asm__ volatile("msr daifclr, #0xf" ::: "memory");
    uint64_t next = cntvct();
    for (uint64_t calls = 1;; calls++) {
        uint64_t v = smccc(SDEI_VERSION, 0, 0, 0, 0, 0);
        if (v != version) {
            put("BAD version=");
            put_hex(v);
            put("\r\n");
        }
        if ((calls & 1023) == 0) {
            put("TICK ");
            put_dec(calls);
            put("\r\n");
        }
        if (period_ticks) {
            uint64_t now = cntvct();
            if ((int64_t)(now - next) > (int64_t)period_ticks)
                next = now; /* fell behind (the host held the VM): no burst to catch up */
            next += period_ticks;
            while ((int64_t)(cntvct() - next) < 0)
                __asm__ volatile("yield" ::: "memory");
        }
    }
}
