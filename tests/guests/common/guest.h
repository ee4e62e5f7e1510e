/*
 * What every bare-metal test guest needs: the PL011 console of QEMU's -M virt (polled, no
 * interrupts; with the MMU off it works from EL0 too) and the SMCCC function ids the guests call.
 *
 * Functions are static inline so a guest that does not use one is not warned about it under
 * -Wall -Werror. The builder (tests/support/guests.py) hashes this directory into its cache key.
 */
#ifndef QMP_SDEI_TEST_GUEST_H
#define QMP_SDEI_TEST_GUEST_H

#include <stdint.h>

#define UART_BASE 0x09000000UL
#define UART_DR 0x00
#define UART_FR 0x18
#define UART_FR_TXFF (1u << 5)

#define PSCI_VERSION 0x84000000UL
#define PSCI_FEATURES 0x8400000AUL
#define PSCI_SYSTEM_OFF 0x84000008UL
#define PSCI_CPU_ON_64 0xC4000003UL
#define PSCI_AFFINITY_INFO_64 0xC4000004UL

#define SDEI_VERSION 0xC4000020UL
#define SDEI_EVENT_REGISTER 0xC4000021UL
#define SDEI_EVENT_ENABLE 0xC4000022UL
#define SDEI_EVENT_DISABLE 0xC4000023UL
#define SDEI_EVENT_CONTEXT 0xC4000024UL
#define SDEI_EVENT_COMPLETE 0xC4000025UL
#define SDEI_EVENT_COMPLETE_AND_RESUME 0xC4000026UL
#define SDEI_EVENT_UNREGISTER 0xC4000027UL
#define SDEI_EVENT_STATUS 0xC4000028UL
#define SDEI_EVENT_GET_INFO 0xC4000029UL
#define SDEI_EVENT_ROUTING_SET 0xC400002AUL
#define SDEI_PE_MASK 0xC400002BUL
#define SDEI_PE_UNMASK 0xC400002CUL
#define SDEI_INTERRUPT_BIND 0xC400002DUL
#define SDEI_INTERRUPT_RELEASE 0xC400002EUL
#define SDEI_EVENT_SIGNAL 0xC400002FUL
#define SDEI_FEATURES 0xC4000030UL
#define SDEI_PRIVATE_RESET 0xC4000031UL
#define SDEI_SHARED_RESET 0xC4000032UL

#define RM_ANY 0
#define RM_PE 1

static inline void uart_putc(char c)
{
    volatile uint32_t *fr = (volatile uint32_t *)(UART_BASE + UART_FR);
    volatile uint32_t *dr = (volatile uint32_t *)(UART_BASE + UART_DR);
    while (*fr & UART_FR_TXFF) {
    }
    *dr = (uint32_t)c;
}

static inline void put(const char *s)
{
    while (*s)
        uart_putc(*s++);
}

static inline void put_hex(uint64_t v)
{
    put("0x");
    for (int shift = 60; shift >= 0; shift -= 4)
        uart_putc("0123456789abcdef"[(v >> shift) & 0xf]);
}

static inline void put_dec(uint64_t v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    put(&buf[i]);
}

/* " key=0x..." : the parseable fields of a guest's output line */
static inline void kv(const char *key, uint64_t value)
{
    uart_putc(' ');
    put(key);
    uart_putc('=');
    put_hex(value);
}

static inline void end(void) { put("\r\n"); }

/* ---- system registers (EL1) ---------------------------------------------------------------- */

static inline uint64_t read_daif(void)
{
    uint64_t v;
    __asm__ volatile("mrs %0, daif" : "=r"(v));
    return v;
}

static inline uint64_t read_spsel(void)
{
    uint64_t v;
    __asm__ volatile("mrs %0, spsel" : "=r"(v));
    return v;
}

static inline uint64_t read_current_el(void)
{
    uint64_t v;
    __asm__ volatile("mrs %0, CurrentEL" : "=r"(v));
    return (v >> 2) & 3;
}

static inline uint64_t read_mpidr(void)
{
    uint64_t v;
    __asm__ volatile("mrs %0, mpidr_el1" : "=r"(v));
    return v;
}

static inline void cpu_relax(void) { __asm__ volatile("yield" ::: "memory"); }

/* The virtual counter (isb first: not read early) and its frequency. */
static inline uint64_t cntvct(void)
{
    uint64_t v;
    __asm__ volatile("isb; mrs %0, cntvct_el0" : "=r"(v)::"memory");
    return v;
}

static inline uint64_t cntfrq(void)
{
    uint64_t v;
    __asm__ volatile("mrs %0, cntfrq_el0" : "=r"(v));
    return v;
}

/* For guests built with sdei_entry_completing and a call site named smccc (boot.inc). */
extern uint64_t smccc(uint64_t fid, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5);
extern char sdei_entry[];

#endif
