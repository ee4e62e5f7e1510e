/*
 * qmp-sdei EL2 stub: makes every SMCCC call of an EL1 guest arrive at one fixed physical address.
 *
 * QEMU (-M virt,virtualization=on, TCG) enters this ELF at EL2. The stub sets up EL2 so that the
 * guest runs at EL1 untouched, except that its `hvc` and `smc` (and, with TWI, `wfi`) trap here.
 * Every call then passes `stub_trap_site`, a `nop` where the sidecar keeps a gdbstub breakpoint,
 * with the guest's x0..x30 untouched; the store to the vCPU's doorbell just before it is where the
 * sidecar's watchpoint stops the call first (cheaper for QEMU than a breakpoint stop). The sidecar answers by writing registers and jumping to
 * `stub_resume`; it passes a call on by jumping to `stub_trap_site + 4`. Without a sidecar the
 * stub forwards every call to QEMU's PSCI with `smc #0` from EL2: the guest boots normally and
 * finds no SDEI.
 *
 * The code is position independent: el2stub.elf runs at its link address (direct boot), the raw
 * el2stub.bin wherever it is loaded (firmware boot: the top of RAM, hidden from the firmware).
 *
 * The stub needs no kernel symbols and survives KASLR, KPTI and kernel updates inside the guest.
 * It keeps per-CPU areas (TPIDR_EL2 points at the vCPU's) whose layout is fixed by the header
 * below; the sidecar reads and writes them in guest physical memory. See docs/el2-stub.md.
 */

	.equ	HEADER_VERSION, 1		/* additions come as tagged extensions (below), which older sidecars skip */
	.equ	PERCPU_SHIFT, 10		/* 1 KiB per vCPU: the fields below, then the EL2 stack */
	.equ	PERCPU_SIZE, (1 << PERCPU_SHIFT)
	.equ	MAX_CPUS, 64

	/* per-CPU area: written by the sidecar, consumed (and cleared) by stub_resume */
	.equ	A_RESUME_FLAGS, 0x00		/* bit 0: ELR/SPSR_EL2, bit 1: ELR/SPSR_EL1 */
	.equ	A_RESUME_ELR2, 0x08
	.equ	A_RESUME_SPSR2, 0x10
	.equ	A_RESUME_ELR1, 0x18
	.equ	A_RESUME_SPSR1, 0x20
	/* per-CPU area: written by the stub at every trap, read by the sidecar */
	.equ	A_TRAP_ELR2, 0x30		/* where the guest goes on (past its hvc/smc) */
	.equ	A_TRAP_SPSR2, 0x38		/* the guest's PSTATE at the call */
	.equ	A_TRAP_ESR2, 0x40
	.equ	A_TRAP_COUNT, 0x48
	/* per-CPU area: idle (trapped WFI) */
	.equ	A_KICK, 0x50			/* the sidecar sets it: an idle vCPU leaves the idle loop (below) */
	.equ	KICK_ENTER, 2			/* ... straight to stub_resume: the sidecar already entered a handler */
	.equ	A_IDLE_CTL, 0x58		/* the guest's virtual timer while the stub borrows it */
	.equ	A_IDLE_CVAL, 0x60
	.equ	A_NO_HALT, 0x68			/* the sidecar sets it while a migration runs: idle without halting */
	/* per-CPU area: the stub's own */
	.equ	A_GUEST_ENTRY, 0x70		/* PSCI CPU_ON: the guest's entry point and context id */
	.equ	A_GUEST_CTX, 0x78
	/* per-CPU area: the running SDEI handler's interrupted x0..x17, written by the sidecar when it
	 * enters a handler and invalidated (A_CTX_VALID = 0) at the next trapped call other than
	 * SDEI_EVENT_CONTEXT; while valid, the stub answers SDEI_EVENT_CONTEXT(0..17) itself */
	.equ	A_CTX_VALID, 0x80
	.equ	A_CTX_X, 0x88			/* 18 x 8 bytes */
	.equ	A_CTX_ANSWERED, 0x118		/* how many EVENT_CONTEXT calls the stub answered */
	.equ	CTX_REGS, 18
	/* per-CPU area: the GIC redistributor register (GICR_ICPENDR0) through which the stub takes
	 * back the sidecar's wake-up interrupt (the virtual timer's PPI) when a kick ends its idle */
	.equ	A_UNPEND, 0x120
	.equ	VTIMER_PPI_BIT, (1 << 27)
	/* per-CPU area: the mailbox. When the guest's RAM is shared with the sidecar (a shared memory
	 * backend), the sidecar watches it from a thread and answers a call there without stopping
	 * the VM. It leases the mailbox for a while after each call it served: until A_FAST_UNTIL (a
	 * CNTVCT value) a trapped call is posted here (x0..x17 to A_MAIL_X, then its trap count to
	 * A_POST with release semantics) and the stub spins until the sidecar writes that count to
	 * A_DONE (the answer's x0..x17 in A_MAIL_X, what to do in A_VERDICT), or for at most
	 * fast_spin_us. Then, or with no lease, the call stops at the doorbell as before; the sidecar
	 * sees its post there and serves it exactly once, from the stop or from the mailbox. */
	.equ	A_FAST_UNTIL, 0x128		/* the sidecar's lease: CNTVCT until which it watches */
	.equ	A_TRAP_TIME, 0x130		/* CNTVCT at the last trapped call (the sidecar's clock) */
	.equ	A_POST, 0x138			/* the trap count of the call posted in A_MAIL_X */
	.equ	A_DONE, 0x140			/* the sidecar: the trap count of the call it answered */
	.equ	A_VERDICT, 0x148		/* the sidecar: VERDICT_* for the answered call */
	.equ	A_MAIL_X, 0x150			/* x0..x17: the call's, then the answer's (18 x 8 bytes) */
	.equ	VERDICT_PASS, 1			/* 0: answered (stub_resume); 1: forward it; 2: stop for it */
	/* per-CPU area: the doorbell, deep in the stack's part, which the stub never uses more than
	 * 48 bytes of. Every trapped call stores to it right before stub_trap_site, with the guest's
	 * registers already back: the sidecar keeps a gdbstub write watchpoint on it. A watchpoint
	 * stop costs QEMU no translation-cache flush, where a breakpoint stop flushes it all. */
	.equ	A_DOORBELL, 0x300

	.equ	HCR_RW, (1 << 31)
	.equ	HCR_TSC, (1 << 19)
	.equ	HCR_TWI, (1 << 13)
	.equ	HCR_APK, (1 << 40)
	.equ	HCR_API, (1 << 41)
	.equ	HCR_VALUE, (HCR_RW | HCR_TSC | HCR_TWI | HCR_APK | HCR_API)
	.equ	SPSR_EL1H_DAIF, 0x3c5
	/* HCRX_EL2: MSCEn (11), TCR2En (14), SCTLR2En (15); QEMU ignores bits of absent features */
	.equ	HCRX_VALUE, ((1 << 11) | (1 << 14) | (1 << 15))
	/* HFGRTR/HFGWTR_EL2 bits of negative polarity (nACCDATA_EL1 50, nGCS_EL0/EL1 52-53, nSMPRI_EL1
	 * 54, nTPIDR2_EL0 55, nRCWMASK_EL1 56, nPIRE0/nPIR_EL1 57-58, nPOR_EL0/EL1 59-60,
	 * nS2POR_EL1 61, nMAIR2_EL1 62, nAMAIR2_EL1 63): 0 would trap those registers to EL2 */
	.equ	HFGXTR_NEGATIVE_BITS, 0xfff4000000000000
	.equ	SCTLR_EL1_RES1, 0x30d00800
	.equ	CPTR_EL2_VALUE, 0x22ff		/* RES1 bits only: no FP, SVE, SME or trace traps */

	.equ	EC_WFX, 0x01
	.equ	EC_HVC64, 0x16
	.equ	EC_SMC64, 0x17

	.equ	RAM_BASE, 0x40000000		/* virt's RAM: the firmware reads its DTB here */
	.equ	FW_DTB_OFFSET, 0x100000		/* firmware boot: the DTB for the firmware, in our slot */
	.equ	FW_DTB_MAX, 0x100000
	.equ	FDT_MAGIC_LE, 0xedfe0dd0	/* 0xd00dfeed, big-endian in memory */

	.equ	PSCI_CPU_ON_MASKED, 0x84000003	/* CPU_ON with the SMC64 bit cleared */
	.equ	SDEI_EVENT_CONTEXT, 0xc4000024

	.section .text.head, "ax"
	.global	_start
_start:
	b	primary_entry			/* direct boot: -kernel el2stub.elf */
	b	firmware_entry			/* firmware boot: -device loader,addr=_start+4,cpu-num=0 */
	/* The header: the sidecar finds everything through it (stub base + offset). */
header:
	.ascii	"QSDEIEL2"			/* 0x08 magic */
	.word	HEADER_VERSION			/* 0x10 */
	.word	PERCPU_SIZE			/* 0x14 */
	.quad	stub_trap_site - _start		/* 0x18 */
	.quad	stub_resume - _start		/* 0x20 */
	.quad	stub_unexpected - _start	/* 0x28 */
	.quad	percpu - _start			/* 0x30 */
	.word	MAX_CPUS			/* 0x38 */
idle_poll_us:
	.word	1000				/* 0x3c: how often an idle vCPU looks for a kick */
	/* Boot parameters: where the kernel and its DTB were loaded (-device loader). */
boot_kernel:
	.quad	0x40200000			/* 0x40 */
boot_dtb:
	.quad	0x48000000			/* 0x48 */
	.quad	stub_wake_site - _start		/* 0x50 */
	.quad	stub_idle - _start		/* 0x58: the idle loop is [stub_idle, stub_idle_end) */
	.quad	stub_idle_end - _start		/* 0x60 */
boot_firmware:
	.quad	0x0				/* 0x68: where firmware_entry enters (virt's flash) */
	/* The mailbox extension: its tag tells a sidecar that knows it that the stub has one (an
	 * older stub has code here); a sidecar that does not know it reads the header only to 0x70
	 * and never gives a lease, so the stub never posts. */
	.ascii	"QSDEIMB1"			/* 0x70 */
fast_spin_us:
	.word	1000				/* 0x78: the longest a posted call waits for the sidecar */
counter_hz:
	.word	0				/* 0x7c: CNTFRQ_EL0, written at boot (leases are CNTVCT values) */
	.quad	mailbox_wait - _start		/* 0x80: a vCPU in [mailbox_wait, mailbox_wait_end) */
	.quad	mailbox_wait_end - _start	/* 0x88: waits for the sidecar's answer */

	.text
/* x0 = MPIDR -> x0 = this vCPU's per-CPU area. Clobbers x1. (The CPU_ON path inlines it.) */
area_of:
	and	x1, x0, #0xff			/* Aff0 */
	ubfx	x0, x0, #8, #8			/* Aff1 */
	add	x0, x1, x0, lsl #4
	and	x0, x0, #(MAX_CPUS - 1)
	adr	x1, percpu
	add	x0, x1, x0, lsl #PERCPU_SHIFT
	ret

/* EL2 set-up shared by every vCPU: x19 = its per-CPU area. Clobbers x0, x1. */
el2_setup:
	msr	tpidr_el2, x19
	str	xzr, [x19, #A_RESUME_FLAGS]	/* RAM survives a guest reset: nothing stale */
	str	xzr, [x19, #A_KICK]
	str	xzr, [x19, #A_CTX_VALID]
	str	xzr, [x19, #A_UNPEND]
	str	xzr, [x19, #A_FAST_UNTIL]	/* no lease until the sidecar gives one */
	add	x0, x19, #PERCPU_SIZE
	mov	sp, x0
	adr	x0, el2_vectors
	msr	vbar_el2, x0
	ldr	x0, =HCR_VALUE
	msr	hcr_el2, x0
	mrs	x0, midr_el1
	msr	vpidr_el2, x0
	mrs	x0, mpidr_el1
	msr	vmpidr_el2, x0
	mov	x0, #3				/* EL1PCTEN | EL1PCEN: EL1 owns the physical timer */
	msr	cnthctl_el2, x0
	msr	cntvoff_el2, xzr
	mov	x0, #CPTR_EL2_VALUE
	msr	cptr_el2, x0
	msr	hstr_el2, xzr
	mrs	x0, pmcr_el0			/* give EL1 every PMU counter */
	ubfx	x0, x0, #11, #5
	msr	mdcr_el2, x0
	ldr	x0, =SCTLR_EL1_RES1
	msr	sctlr_el1, x0
	mrs	x0, cntfrq_el0			/* idle poll period in counter ticks */
	adr	x1, idle_poll_us
	ldr	w1, [x1]
	mul	x0, x0, x1
	ldr	x1, =1000000
	udiv	x0, x0, x1
	adr	x1, idle_poll_ticks
	str	x0, [x1]
	mrs	x0, cntfrq_el0			/* the mailbox's spin limit in counter ticks */
	adr	x1, counter_hz
	str	w0, [x1]
	adr	x1, fast_spin_us
	ldr	w1, [x1]
	mul	x0, x0, x1
	ldr	x1, =1000000
	udiv	x0, x0, x1
	adr	x1, fast_spin_ticks
	str	x0, [x1]
	mrs	x0, id_aa64pfr0_el1
	ubfx	x1, x0, #24, #4			/* GIC system registers present */
	cbz	x1, 1f
	mrs	x1, S3_4_C12_C9_5		/* ICC_SRE_EL2 */
	orr	x1, x1, #0x1			/* SRE */
	orr	x1, x1, #0x8			/* Enable: EL1 may use them */
	msr	S3_4_C12_C9_5, x1
	isb
1:	ubfx	x1, x0, #32, #4			/* SVE: let EL1 use the longest vector */
	cbz	x1, 2f
	mov	x1, #0x1ff
	msr	S3_4_C1_C2_0, x1		/* ZCR_EL2 */
2:	mrs	x0, id_aa64pfr1_el1
	ubfx	x0, x0, #24, #4			/* SME: the longest streaming vector, full A64 */
	cbz	x0, 4f
	mov	x1, #0xf			/* SMCR_EL2.LEN */
	cmp	x0, #2
	b.lo	3f
	orr	x1, x1, #(1 << 30)		/* SME2: EZT0 */
3:	mrs	x0, S3_0_C0_C4_5		/* ID_AA64SMFR0_EL1 */
	tbz	x0, #63, 31f
	orr	x1, x1, #(1 << 31)		/* FA64 */
31:	msr	S3_4_C1_C2_6, x1		/* SMCR_EL2 */
4:	mrs	x0, id_aa64mmfr1_el1
	ubfx	x0, x0, #40, #4			/* FEAT_HCX: no traps of MOPS, TCR2_EL1, SCTLR2_EL1 */
	cbz	x0, 5f
	ldr	x1, =HCRX_VALUE
	msr	S3_4_C1_C2_2, x1		/* HCRX_EL2 */
5:	mrs	x0, id_aa64mmfr0_el1
	ubfx	x0, x0, #56, #4			/* FEAT_FGT: the "n" (trap when 0) bits set, nothing trapped */
	cbz	x0, 6f
	ldr	x1, =HFGXTR_NEGATIVE_BITS
	msr	S3_4_C1_C1_4, x1		/* HFGRTR_EL2 */
	msr	S3_4_C1_C1_5, x1		/* HFGWTR_EL2 */
6:	isb
	ret

primary_entry:
	mrs	x0, mpidr_el1
	bl	area_of
	mov	x19, x0
	bl	el2_setup
	adr	x0, boot_kernel
	ldr	x1, [x0]
	ldr	x0, [x0, #(boot_dtb - boot_kernel)]
	b	enter_el1

/* Firmware boot (UEFI in flash): the firmware runs at EL1 as it would under KVM. It reads its
 * DTB at the base of RAM, where QEMU puts it, but QEMU rewrites that tree's /memory to all of RAM,
 * our slot included, and newer edk2 builds (2025.02) put their page tables at the top of it. So
 * when a DTB was loaded at FW_DTB_OFFSET in our slot (one whose /memory ends below the slot), it
 * replaces QEMU's before the firmware starts: the firmware, and the OS after it, then never see
 * the slot as RAM. */
firmware_entry:
	mrs	x0, mpidr_el1
	bl	area_of
	mov	x19, x0
	bl	el2_setup
	adr	x0, _start
	add	x0, x0, #FW_DTB_OFFSET
	ldr	w2, [x0]
	ldr	w3, =FDT_MAGIC_LE
	cmp	w2, w3
	b.ne	2f
	ldr	w2, [x0, #4]			/* totalsize, big-endian */
	rev	w2, w2
	cmp	x2, #FW_DTB_MAX
	b.hi	2f
	add	x2, x2, #7
	lsr	x2, x2, #3			/* 8-byte words */
	cbz	x2, 2f
	ldr	x1, =RAM_BASE
1:	ldr	x3, [x0], #8
	str	x3, [x1], #8
	subs	x2, x2, #1
	b.ne	1b
	dsb	sy
2:	adr	x0, boot_firmware
	ldr	x1, [x0]
	mov	x0, xzr
	b	enter_el1

/* PSCI CPU_ON lands here at EL2 with x0 = the target's per-CPU area (see the call path). */
secondary_entry:
	mov	x19, x0
	bl	el2_setup
	ldr	x1, [x19, #A_GUEST_ENTRY]
	ldr	x0, [x19, #A_GUEST_CTX]
	/* fall through */

/* Enter the guest at x1 in EL1h with DAIF masked, x0 as given, x1..x3 zero. */
enter_el1:
	msr	elr_el2, x1
	mov	x1, #SPSR_EL1H_DAIF
	msr	spsr_el2, x1
	mov	x1, xzr
	mov	x2, xzr
	mov	x3, xzr
	mov	x19, xzr
	isb
	eret

/* ---- exception vectors ------------------------------------------------------------------- */

	.macro	unexpected_vector
	.balign	0x80
	b	stub_unexpected
	.endm

	.balign	0x800
el2_vectors:
	unexpected_vector			/* current EL, SP_EL0 */
	unexpected_vector
	unexpected_vector
	unexpected_vector
	unexpected_vector			/* current EL, SP_ELx */
	unexpected_vector
	unexpected_vector
	unexpected_vector
	.balign	0x80				/* lower EL, AArch64: synchronous */
	b	lower_sync
	unexpected_vector			/* IRQ, FIQ, SError: routed to EL1, never here */
	unexpected_vector
	unexpected_vector
	unexpected_vector			/* lower EL, AArch32 */
	unexpected_vector
	unexpected_vector
	unexpected_vector

/* x0..x15 to (stp) or from (ldp) the vCPU's mailbox; x18 = its per-CPU area */
	.macro	mail_x0_x15 op
	\op	x0, x1, [x18, #(A_MAIL_X + 0 * 8)]
	\op	x2, x3, [x18, #(A_MAIL_X + 2 * 8)]
	\op	x4, x5, [x18, #(A_MAIL_X + 4 * 8)]
	\op	x6, x7, [x18, #(A_MAIL_X + 6 * 8)]
	\op	x8, x9, [x18, #(A_MAIL_X + 8 * 8)]
	\op	x10, x11, [x18, #(A_MAIL_X + 10 * 8)]
	\op	x12, x13, [x18, #(A_MAIL_X + 12 * 8)]
	\op	x14, x15, [x18, #(A_MAIL_X + 14 * 8)]
	.endm

lower_sync:
	stp	x18, x19, [sp, #-16]!
	mrs	x18, tpidr_el2
	mrs	x19, esr_el2
	str	x19, [x18, #A_TRAP_ESR2]
	lsr	x19, x19, #26
	cmp	x19, #EC_HVC64
	b.eq	1f
	cmp	x19, #EC_WFX
	b.eq	wfx
	cmp	x19, #EC_SMC64
	b.ne	stub_unexpected
	mrs	x19, elr_el2			/* a trapped smc returns to itself: step past it */
	add	x19, x19, #4
	msr	elr_el2, x19
1:	ldr	x19, [x18, #A_CTX_VALID]
	cbnz	x19, event_context
trap_call:
	mrs	x19, elr_el2
	str	x19, [x18, #A_TRAP_ELR2]
	mrs	x19, spsr_el2
	str	x19, [x18, #A_TRAP_SPSR2]
	mrs	x19, cntvct_el0
	str	x19, [x18, #A_TRAP_TIME]
	ldr	x19, [x18, #A_TRAP_COUNT]
	add	x19, x19, #1
	str	x19, [x18, #A_TRAP_COUNT]
	/* The mailbox, while the sidecar's lease runs (see A_FAST_UNTIL). x19 = this call's count. */
	stp	x16, x17, [x18, #(A_MAIL_X + 16 * 8)]
	ldr	x16, [x18, #A_FAST_UNTIL]
	ldr	x17, [x18, #A_TRAP_TIME]
	cmp	x17, x16
	b.hs	call_stops			/* no lease: stop at the doorbell */
	mail_x0_x15 stp
	add	x16, x18, #A_POST
	stlr	x19, [x16]			/* posted: the arguments are visible before the count */
	adr	x16, fast_spin_ticks
	ldr	x16, [x16]
	add	x17, x17, x16			/* the wait's deadline */
	add	x16, x18, #A_DONE
	.global	mailbox_wait
mailbox_wait:
	ldar	x0, [x16]			/* acquire: the answer is read after its count */
	cmp	x0, x19
	b.eq	1f
	mrs	x0, cntvct_el0
	cmp	x0, x17
	b.lo	mailbox_wait
mailbox_wait_end:
	/* No answer in time: the call stops at the doorbell with the guest's registers (x0 back from
	 * the mailbox; x1..x15 were never touched); the sidecar finds the post there, answered by then
	 * or not, and serves the call exactly once. */
	ldr	x0, [x18, #(A_MAIL_X + 0 * 8)]
	b	call_stops
1:	ldr	x19, [x18, #A_VERDICT]
	cmp	x19, #VERDICT_PASS		/* lo: answered, eq: forward, hi: stop for it */
	mail_x0_x15 ldp
	ldp	x16, x17, [x18, #(A_MAIL_X + 16 * 8)]
	ldp	x18, x19, [sp], #16		/* the flags survive the loads */
	b.lo	stub_resume
	b.eq	call_forward
	b	call_doorbell
call_stops:
	ldp	x16, x17, [x18, #(A_MAIL_X + 16 * 8)]
	ldp	x18, x19, [sp], #16
call_doorbell:
	stur	xzr, [sp, #(A_DOORBELL - PERCPU_SIZE)]	/* the sidecar's watchpoint: stops at stub_trap_site */
	.global	stub_trap_site
stub_trap_site:
	nop					/* the sidecar's breakpoint: x0..x30 are the guest's */
call_forward:
	/* Nobody answered: QEMU's firmware serves the call. */
	stp	x18, x19, [sp, #-16]!
	stp	x2, x3, [sp, #-16]!
	mov	w0, w0				/* a function id is 32 bits */
	tbz	w0, #31, 2f
	bic	w0, w0, #(1 << 16)		/* SMCCC v1.3 SVE hint: QEMU does not know it */
2:	and	w18, w0, #~(1 << 30)
	ldr	w19, =PSCI_CPU_ON_MASKED
	cmp	w18, w19
	b.ne	3f
	/* CPU_ON: QEMU starts the target at our EL, so start it in the stub, which then enters
	 * the guest's entry point (x2) at EL1 with the guest's context id (x3). */
	and	x18, x1, #0xff			/* the target's area, as area_of computes it */
	ubfx	x19, x1, #8, #8
	add	x18, x18, x19, lsl #4
	and	x18, x18, #(MAX_CPUS - 1)
	adr	x19, percpu
	add	x18, x19, x18, lsl #PERCPU_SHIFT
	str	x2, [x18, #A_GUEST_ENTRY]
	str	x3, [x18, #A_GUEST_CTX]
	adr	x2, secondary_entry
	mov	x3, x18
3:	smc	#0
	ldp	x2, x3, [sp], #16
	ldp	x18, x19, [sp], #16
	/* fall through */

/* Return to the guest. The sidecar may have asked for a new ELR/SPSR (event entry, COMPLETE). */
	.global	stub_resume
stub_resume:
	stp	x18, x19, [sp, #-16]!
	stp	x16, x17, [sp, #-16]!
	mrs	x18, tpidr_el2
	ldr	x19, [x18, #A_RESUME_FLAGS]
	cbz	x19, 9f
	str	xzr, [x18, #A_RESUME_FLAGS]
	tbz	x19, #0, 8f
	ldp	x16, x17, [x18, #A_RESUME_ELR2]
	msr	elr_el2, x16
	msr	spsr_el2, x17
8:	tbz	x19, #1, 9f
	ldp	x16, x17, [x18, #A_RESUME_ELR1]
	msr	elr_el1, x16
	msr	spsr_el1, x17
9:	ldp	x16, x17, [sp], #16
	ldp	x18, x19, [sp], #16
	eret

/* SDEI_EVENT_CONTEXT(n) inside a handler whose context the sidecar left in the area: answer it
 * here, without a stop (the dispatcher's answer is the same saved register, read-only). Any other
 * call, or n out of range, goes to the trap site as usual. x18 = area; x18/x19 on the stack. */
event_context:
	ldr	w19, =SDEI_EVENT_CONTEXT
	cmp	w0, w19
	b.ne	trap_call
	cmp	x1, #(CTX_REGS - 1)
	b.hi	trap_call
	add	x19, x18, #A_CTX_X
	ldr	x0, [x19, x1, lsl #3]
	ldr	x19, [x18, #A_CTX_ANSWERED]
	add	x19, x19, #1
	str	x19, [x18, #A_CTX_ANSWERED]
	ldp	x18, x19, [sp], #16
	eret

/*
 * A trapped WFI/WFE (HCR_EL2.TWI). WFE returns at once. WFI idles here instead of in the guest:
 * the stub borrows the guest's virtual timer (the one interrupt Linux keeps enabled) to wake at
 * least every idle_poll_us, puts the guest's timer back, and returns to the guest when an
 * interrupt is pending for it. When the sidecar has set the area's kick flag it leaves instead:
 * kick 1 stops at stub_wake_site, where the sidecar can enter an event handler; kick 2
 * (KICK_ENTER) goes straight to stub_resume, where the sidecar left a handler entry when it found
 * the vCPU halted here. Either way an idle vCPU gets an event within about one poll period, where
 * a halted vCPU would wait for its next interrupt, and at once when the sidecar also wakes it
 * through the interrupt controller (it makes the virtual timer's interrupt pending, and leaves in
 * A_UNPEND where the stub takes that back before the guest runs).
 * While a migration runs the sidecar sets A_NO_HALT and the loop polls with wfe, which QEMU's TCG
 * treats as a yield: no vCPU is halted when the guest switches over. QEMU (7.2 and 10) recomputes
 * the virtual timer while it loads a vCPU's registers, before it loads the interrupt controller,
 * whose older state then hides the timer's interrupt: a vCPU halted there with its poll deadline
 * just passed would never wake on the destination. A vCPU that runs rewrites its timer and wakes.
 * Entered with x18 = area, x19 = scratch, both saved on the stack.
 */
wfx:
	mrs	x19, elr_el2			/* a trapped WFx returns to itself: step past it */
	add	x19, x19, #4
	msr	elr_el2, x19
	str	x19, [x18, #A_TRAP_ELR2]
	mrs	x19, spsr_el2
	str	x19, [x18, #A_TRAP_SPSR2]
	mrs	x19, esr_el2
	tbnz	x19, #0, idle_done		/* WFE: nothing to wait for */
	stp	x16, x17, [sp, #-16]!
	mrs	x16, cntv_ctl_el0
	str	x16, [x18, #A_IDLE_CTL]
	mrs	x16, cntv_cval_el0
	str	x16, [x18, #A_IDLE_CVAL]
stub_idle:
	/* The no-halt flag is read before the timer is written: a vCPU that the switchover catches
	 * anywhere between here and the wfi writes its timer again on the destination before it can
	 * halt (the flag is cleared there when the sidecar attaches). */
	ldr	x17, [x18, #A_NO_HALT]
	mrs	x19, cntvct_el0
	adr	x16, idle_poll_ticks
	ldr	x16, [x16]
	add	x19, x19, x16			/* our deadline */
	ldr	x16, [x18, #A_IDLE_CTL]
	and	x16, x16, #3			/* ENABLE, not IMASK: the guest waits for its timer */
	cmp	x16, #1
	b.ne	2f
	ldr	x16, [x18, #A_IDLE_CVAL]
	cmp	x16, x19
	csel	x19, x16, x19, lo		/* the earlier of the two */
2:	msr	cntv_cval_el0, x19
	mov	x16, #1
	msr	cntv_ctl_el0, x16
	isb
	cbnz	x17, 4f
	wfi
	b	5f
4:	wfe					/* TCG yields here and never halts (see stub_idle's comment) */
5:	ldr	x16, [x18, #A_IDLE_CVAL]	/* the guest's timer back before anything else */
	msr	cntv_cval_el0, x16
	ldr	x16, [x18, #A_IDLE_CTL]
	msr	cntv_ctl_el0, x16
	isb
	/* The kick first: the sidecar may wake a kicked vCPU with an interrupt of its own (it makes
	 * the guest's virtual timer interrupt pending), which must not send it back to the guest. */
	ldr	x16, [x18, #A_KICK]
	cbnz	x16, 6f
	mrs	x16, isr_el1
	cbnz	x16, 3f				/* an interrupt for the guest: go back to it */
	b	stub_idle
6:	str	xzr, [x18, #A_KICK]
	ldr	x17, [x18, #A_UNPEND]		/* the sidecar's wake-up interrupt: not for the guest */
	cbz	x17, 7f
	str	xzr, [x18, #A_UNPEND]
	mov	w19, #VTIMER_PPI_BIT
	str	w19, [x17]
	dsb	sy
7:	cmp	x16, #KICK_ENTER		/* the flags survive the loads below */
	ldp	x16, x17, [sp], #16
	ldp	x18, x19, [sp], #16
	b.eq	stub_resume			/* a handler entry is waiting in the area: no stop */
	stur	xzr, [sp, #(A_DOORBELL - PERCPU_SIZE)]	/* the doorbell again: the watchpoint stops here */
	.global	stub_wake_site
stub_wake_site:
	nop					/* the sidecar's breakpoint: as at stub_trap_site, no call */
	b	stub_resume
3:	ldp	x16, x17, [sp], #16
stub_idle_end:
idle_done:
	ldp	x18, x19, [sp], #16
	b	stub_resume

/* Something the stub does not handle reached EL2: stop here, where the sidecar keeps a
 * breakpoint and reports it (ESR in the per-CPU area). Never returns. */
	.global	stub_unexpected
stub_unexpected:
	wfe
	b	stub_unexpected

	.ltorg

	.balign	8
idle_poll_ticks:
	.quad	0
fast_spin_ticks:
	.quad	0

	.bss
	.balign	4096
percpu:
	.space	PERCPU_SIZE * MAX_CPUS
