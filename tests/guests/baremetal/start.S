/*
 * Entry points, the single SMCCC call site, and the assembly pieces of the SDEI test guest.
 *
 * Everything the host must find lives here: sdei_hvc_insn is the only hvc in the image, so one
 * breakpoint catches every SDEI and PSCI call, including SDEI_EVENT_COMPLETE from handlers.
 * QEMU starts _start in EL1h with DAIF masked and the MMU off; secondaries arrive at
 * secondary_entry through PSCI CPU_ON (passed through to QEMU by the sidecar).
 */

#include "../common/boot.inc"

#define SDEI_EVENT_COMPLETE             0xC4000025
#define SDEI_EVENT_COMPLETE_AND_RESUME  0xC4000026

    boot_primary __stack_top0

    boot_secondary __stack_top1

    smccc_call_site sdei_call, sdei_hvc_insn

/*
 * The registered SDEI entry point for every event. The C handler returns 0 to finish with
 * SDEI_EVENT_COMPLETE or a resume address for SDEI_EVENT_COMPLETE_AND_RESUME.
 *
 * COMPLETE restores only x0-x17, pc and pstate and never returns here, so x18-x30 and sp must
 * already hold the interrupted values when the hvc executes: x19-x29 are callee-saved in C,
 * x18 and x30 are saved around the call, and the call itself is a tail branch so that x30 is
 * the interrupted one.
 */
    .global sdei_entry
    .type   sdei_entry, %function
sdei_entry:
    stp     x18, x30, [sp, #-16]!
    bl      sdei_handler_c
    ldp     x18, x30, [sp], #16
    cbnz    x0, 1f
    mov     x1, #0                  /* SDEI_EV_HANDLED */
    ldr     x0, =SDEI_EVENT_COMPLETE
    b       sdei_call
1:  mov     x1, x0
    ldr     x0, =SDEI_EVENT_COMPLETE_AND_RESUME
    b       sdei_call
    .size   sdei_entry, . - sdei_entry

/*
 * COMPLETE_AND_RESUME target. The dispatcher makes it look like an exception taken at the
 * interrupted point: every GPR is the interrupted one, ELR_EL1/SPSR_EL1 hold the interrupted
 * pc/pstate. Record both, then eret; landing anywhere but the interrupted pc would derail the
 * guest, so a correct ERET is itself part of the check.
 */
    .global car_resume
    .type   car_resume, %function
car_resume:
    stp     x0, x1, [sp, #-32]!
    str     x2, [sp, #16]
    ldr     x2, =car_seen           /* struct { u64 elr, spsr, count; } */
    mrs     x0, elr_el1
    mrs     x1, spsr_el1
    stp     x0, x1, [x2]
    ldr     x0, [x2, #16]
    add     x0, x0, #1
    str     x0, [x2, #16]
    ldr     x2, [sp, #16]
    ldp     x0, x1, [sp], #32
    eret
    .size   car_resume, . - car_resume

/*
 * void spin_marked(volatile uint32_t *flag, volatile uint32_t *uart_dr): wait with interrupts
 * unmasked until *flag != 0, with x0-x3 and x17 holding known marks, so a handler that interrupts
 * the loop can check what SDEI_EVENT_CONTEXT returns and that x2 (interrupted pc) lies inside the
 * loop. The '\n' that ends the host's WAIT line is written here, once the marks are in place: the
 * host raises the event when it reads that line, so the event can only interrupt the loop (a busy
 * host used to be fast enough to raise it before the marks were set). QEMU's PL011 never fills its
 * transmit FIFO, so this store does not wait for room. uart_dr NULL: nothing to announce.
 */
    .global spin_marked
    .global spin_marked_loop
    .global spin_marked_end
    .type   spin_marked, %function
spin_marked:
    mov     x9, x0
    mov     x11, x1
    movz    x0, #0x5eed, lsl #16
    add     x1, x0, #1
    add     x2, x0, #2
    add     x3, x0, #3
    add     x17, x0, #0x11
    msr     daifclr, #0xf
    cbz     x11, spin_marked_loop
    mov     w12, #'\n'
    str     w12, [x11]
spin_marked_loop:
    ldr     w10, [x9]
    cbz     w10, spin_marked_loop
spin_marked_end:
    msr     daifset, #0xf
    ret
    .size   spin_marked, . - spin_marked

/* Unexpected exceptions: report the vector and stop. */
    unexpected_vectors
