/*
 * Benchmark guest for bench/conduit.py: entry, the single SMCCC call site, the SDEI entry point.
 * One vCPU; QEMU starts _start in EL1h with DAIF masked and the MMU off.
 */

#define SDEI_EVENT_COMPLETE 0xC4000025

    .section .text.boot, "ax"
    .global _start
_start:
    ldr     x0, =__stack_top
    mov     sp, x0
    adr     x0, vectors
    msr     vbar_el1, x0
    isb
    ldr     x0, =__bss_start
    ldr     x1, =__bss_end
1:  cmp     x0, x1
    b.hs    2f
    str     xzr, [x0], #8
    b       1b
2:  bl      main
3:  wfe
    b       3b

    .text
/* uint64_t smccc(fid, a1, a2, a3, a4, a5): the only hvc in the image (the host breakpoints it). */
    .global smccc
    .global smccc_hvc_insn
    .type   smccc, %function
smccc:
smccc_hvc_insn:
    hvc     #0
    ret
    .size   smccc, . - smccc

/* The SDEI entry point: call the C handler, then SDEI_EVENT_COMPLETE with the interrupted x18/x30. */
    .global sdei_entry
    .type   sdei_entry, %function
sdei_entry:
    stp     x18, x30, [sp, #-16]!
    bl      handler_c
    ldp     x18, x30, [sp], #16
    mov     x1, #0
    ldr     x0, =SDEI_EVENT_COMPLETE
    b       smccc
    .size   sdei_entry, . - sdei_entry

/* Unexpected exceptions: report the vector and stop. */
    .macro  vector n
    .balign 128
    mov     x0, #\n
    b       unexpected_exception
    .endm

    .balign 2048
vectors:
    .irp n, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
    vector \n
    .endr
