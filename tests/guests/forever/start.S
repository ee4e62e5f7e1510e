/*
 * The call-forever guest (migration tests and bench/migration.py): entry, the single SMCCC call
 * site, the SDEI entry point. One vCPU; QEMU starts _start in EL1h with DAIF masked, MMU off.
 */

#include "../common/boot.inc"

#define SDEI_EVENT_COMPLETE 0xC4000025

    boot_primary __stack_top

    smccc_call_site smccc, smccc_hvc_insn

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
    unexpected_vectors
