// SPDX-License-Identifier: GPL-2.0
/*
 * sdei_test: register and enable one SDEI event through Linux's own SDEI driver and log each
 * delivery, so the host can check that an event raised by qmp-sdei reaches a real Linux handler.
 *
 * Linux 6.1 does not export sdei_event_register()/sdei_event_enable(), so /init passes their
 * addresses (from the image's kallsyms; valid because the kernel boots with nokaslr) as module
 * parameters. Both act on every CPU for a private event (the driver cross-calls), and the driver
 * unmasks each CPU when it comes online.
 *
 * The callback runs in NMI context (the arm64 SDEI entry does nmi_enter()): printk is safe there;
 * the console output is deferred to irq_work after the event completes.
 */
#include <linux/arm_sdei.h>
#include <linux/atomic.h>
#include <linux/kernel.h>
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
MODULE_PARM_DESC(register_addr, "address of sdei_event_register (nokaslr kallsyms)");

static unsigned long enable_addr;
module_param(enable_addr, ulong, 0444);
MODULE_PARM_DESC(enable_addr, "address of sdei_event_enable (nokaslr kallsyms)");

static atomic_t deliveries = ATOMIC_INIT(0);
static void *cookie = &deliveries;

static int sdei_test_callback(u32 num, struct pt_regs *regs, void *arg)
{
	int n = atomic_inc_return(&deliveries);

	pr_info("sdei_test: event %u #%d on CPU %d arg_ok=%d pc=%pS pstate=%llx\n", num, n,
		smp_processor_id(), arg == cookie, (void *)instruction_pointer(regs), regs->pstate);
	return 0;
}

static int __init sdei_test_init(void)
{
	register_fn do_register = (register_fn)register_addr;
	enable_fn do_enable = (enable_fn)enable_addr;
	int err;

	if (!register_addr || !enable_addr) {
		pr_err("sdei_test: error: register_addr and enable_addr are required\n");
		return -EINVAL;
	}
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
