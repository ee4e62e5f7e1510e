/*
 * Entry points, the single SMCCC call site, the SDEI entry, the EL1t/EL0 trampolines and the
 * exception vectors of the deferred-delivery test guest.
 *
 * sdei_hvc_insn is the only hvc in the image. The vectors matter here: the conduit cannot enter
 * an SDEI handler while vCPU 0 runs in EL1t or EL0, so it arms breakpoints on these vectors and
 * enters the handler at the next exception entry. The only exceptions the guest takes are its
 * own `svc #0` (vector 0: current EL with SP_EL0, and vector 8: lower EL AArch64); both go to
 * svc_entry, which calls svc_handler_c and erets (or, for the EL0 "exit" call, returns from
 * run_el0 at EL1h).
 */

#include "../common/boot.inc"

    boot_primary __stack_top0

    boot_secondary __stack_top1

    smccc_call_site sdei_call, sdei_hvc_insn

    sdei_entry_completing sdei_handler_c, sdei_call

/*
 * void run_el1t(void (*fn)(void), void *sp_el0): call fn in EL1t (SPSel = 0) on the given
 * stack, then switch back to SP_EL1. SP_EL1 keeps our frame while fn runs on SP_EL0.
 */
    .global run_el1t
    .type   run_el1t, %function
run_el1t:
    stp     x29, x30, [sp, #-16]!
    msr     sp_el0, x1
    msr     spsel, #0
    blr     x0
    msr     spsel, #1
    ldp     x29, x30, [sp], #16
    ret
    .size   run_el1t, . - run_el1t

/*
 * void run_el0(void (*fn)(void), void *sp_el0): eret into fn at EL0t (DAIF clear) on the given
 * stack. fn never returns; it leaves with `svc #0` and x8 = 1, which lands in el0_exit below
 * and returns from run_el0 at EL1h (DAIF masked, as the exception left it).
 */
    .global run_el0
    .type   run_el0, %function
run_el0:
    stp     x29, x30, [sp, #-96]!
    stp     x19, x20, [sp, #16]
    stp     x21, x22, [sp, #32]
    stp     x23, x24, [sp, #48]
    stp     x25, x26, [sp, #64]
    stp     x27, x28, [sp, #80]
    mov     x9, sp
    ldr     x10, =el0_kernel_sp
    str     x9, [x10]
    msr     sp_el0, x1
    msr     elr_el1, x0
    msr     spsr_el1, xzr           /* EL0t, DAIF clear */
    isb
    eret
el0_exit:
    ldr     x10, =el0_kernel_sp
    ldr     x9, [x10]
    mov     sp, x9
    ldp     x19, x20, [sp, #16]
    ldp     x21, x22, [sp, #32]
    ldp     x23, x24, [sp, #48]
    ldp     x25, x26, [sp, #64]
    ldp     x27, x28, [sp, #80]
    ldp     x29, x30, [sp], #96
    ret
    .size   run_el0, . - run_el0

/* void do_svc(uint64_t call): `svc #0` with x8 = call (0: note it, 1: leave EL0), x2 = 0x5eed0002. */
    .global do_svc
    .global svc_insn
    .type   do_svc, %function
do_svc:
    mov     x8, x0
    movz    x2, #0x5eed, lsl #16    /* a mark the deferred handler reads with EVENT_CONTEXT(2) */
    add     x2, x2, #2
svc_insn:
    svc     #0
    ret
    .size   do_svc, . - do_svc

/* Synchronous exception from EL1t or EL0 (EL1h, SP_EL1): save everything, ask C, eret. */
svc_entry:
    sub     sp, sp, #256
    stp     x0, x1, [sp, #0]
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x29, x30, [sp, #160]
    mrs     x0, esr_el1
    mrs     x1, elr_el1
    mrs     x2, spsr_el1
    mov     x3, x8
    bl      svc_handler_c
    cbnz    x0, 1f
    ldp     x0, x1, [sp, #0]
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x29, x30, [sp, #160]
    add     sp, sp, #256
    eret
1:  b       el0_exit

/* Unexpected exceptions: report the vector and stop. */
unexpected:
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    b       unexpected_exception

    .macro  vector n
    .balign 128
    mov     x0, #\n
    b       unexpected
    .endm

    .macro  svc_vector
    .balign 128
    b       svc_entry
    .endm

    .balign 2048
    .global vectors
vectors:
    svc_vector                      /* 0x000: sync, current EL with SP_EL0 (EL1t) */
    vector 1
    vector 2
    vector 3
    vector 4                        /* 0x200: current EL with SP_ELx: never expected */
    vector 5
    vector 6
    vector 7
    svc_vector                      /* 0x400: sync, lower EL AArch64 (EL0) */
    vector 9
    vector 10
    vector 11
    vector 12
    vector 13
    vector 14
    vector 15
