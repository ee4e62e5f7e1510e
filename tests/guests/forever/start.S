/*
 * The call-forever guest (migration tests and bench/migration.py): entry, the single SMCCC call
 * site, the SDEI entry point. One vCPU; QEMU starts _start in EL1h with DAIF masked, MMU off.
 */

#include "../common/boot.inc"

    boot_primary __stack_top
    smccc_call_site smccc, smccc_hvc_insn
    sdei_entry_completing handler_c, smccc
    unexpected_vectors
