// SPDX-License-Identifier: GPL-2.0
/*
 * sdei_test: register and enable one SDEI event through Linux's own SDEI driver and log each
 * delivery, so the host can check that an event raised by qmp-sdei reaches a real Linux handler.
 *
 * Linux 6.1 does not export sdei_event_register()/sdei_event_enable(). Their addresses are found at
 * run time through a kprobe's symbol lookup, so a kernel with KASLR on (a different offset every
 * boot) needs nothing from the host; register_addr/enable_addr may still override them. Both act
 * on every CPU for a private event (the driver cross-calls), and the driver unmasks each CPU when
 * it comes online.
 *
 * The callback runs in NMI context (the arm64 SDEI entry does nmi_enter()): printk is safe there;
 * the console output is deferred to irq_work after the event completes.
 */
#include <linux/arm_sdei.h>
#include <linux/atomic.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/ptrace.h>
#include <linux/smp.h>

typedef int (*register_fn)(u32 event_num, sdei_event_callback *cb, void *arg);
typedef int (*enable_fn)(u32 event_num);

static unsigned int event = 1000;
module_param(event, uint, 0444);
MODULE_PARM_DESC(event, "SDEI event number to register (a private event in the firmware catalogue)");

static unsigned long register_addr;
module_param(register_addr, ulong, 0444);
MODULE_PARM_DESC(register_addr, "address of sdei_event_register (default: looked up at run time)");

static unsigned long enable_addr;
module_param(enable_addr, ulong, 0444);
MODULE_PARM_DESC(enable_addr, "address of sdei_event_enable (default: looked up at run time)");

static atomic_t deliveries = ATOMIC_INIT(0);
static void *cookie = &deliveries;

static int sdei_test_callback(u32 num, struct pt_regs *regs, void *arg)
{
	int n = atomic_inc_return(&deliveries);

	pr_info("sdei_test: event %u #%d on CPU %d arg_ok=%d pc=%pS pstate=%llx\n", num, n,
		smp_processor_id(), arg == cookie, (void *)instruction_pointer(regs), regs->pstate);
	return 0;
}

/* The running kernel's address of a (non-exported) function, KASLR offset included. */
static unsigned long lookup(const char *name)
{
	struct kprobe probe = { .symbol_name = name };
	unsigned long addr;

	if (register_kprobe(&probe) < 0)
		return 0;
	addr = (unsigned long)probe.addr;
	unregister_kprobe(&probe);
	return addr;
}

static int __init sdei_test_init(void)
{
	register_fn do_register;
	enable_fn do_enable;
	int err;

	if (!register_addr)
		register_addr = lookup("sdei_event_register");
	if (!enable_addr)
		enable_addr = lookup("sdei_event_enable");
	if (!register_addr || !enable_addr) {
		pr_err("sdei_test: error: cannot find sdei_event_register/sdei_event_enable\n");
		return -ENOENT;
	}
	do_register = (register_fn)register_addr;
	do_enable = (enable_fn)enable_addr;
	err = do_register(event, sdei_test_callback, cookie);
	if (err) {
		pr_err("sdei_test: error: sdei_event_register(%u) failed: %d\n", event, err);
		return err;
	}
	err = do_enable(event);
	if (err) {
		/* Stay loaded: the driver still holds our callback for the registered event. */
		pr_err("sdei_test: error: sdei_event_enable(%u) failed: %d\n", event, err);
		return 0;
	}
	pr_info("sdei_test: ready event=%u cpus=%u\n", event, num_online_cpus());
	return 0;
}

/* No module_exit: the callback stays registered, so the module must never be unloaded. */
module_init(sdei_test_init);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("qmp-sdei test: log SDEI event deliveries through Linux's SDEI driver");
