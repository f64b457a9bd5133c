/* SPDX-License-Identifier: GPL-2.0 */
/*
 * x86 stand-in for <asm/bao.h> (the posted driver has arm, arm64 and riscv versions only):
 * performs Bao's Remote I/O hypercall through remio's hypercall window (remio-hc.h), the BAR of
 * a PCI proxy device that the backend glue module (remio_backend.ko) binds and exports.
 *
 * Same semantics as the arm64 version: inputs dm_id, addr, op, value, request_id; outputs addr,
 * op, value, access_width, request_id written back into @request; remio_hyp_ret = Bao's status
 * (as a u64 holding the signed value), pending_requests = the has_pending flag, hyp_ret = 0.
 *
 * Added to the include path before the kernel's by the driver's Kbuild (remio guest build).
 */
#ifndef __ASM_X86_REMIO_BAO_H
#define __ASM_X86_REMIO_BAO_H

#include <linux/bao.h>
#include <linux/bug.h>
#include <linux/compiler.h>
#include <linux/io.h>
#include <linux/irqflags.h>
#include <linux/smp.h>
#include <linux/types.h>

#include <remio-hc.h>

/* Set by remio_backend.ko while the proxy is bound (NULL otherwise). */
extern void __iomem *remio_hc_base;
/* Number of register banks of the window (0 while unbound). */
extern unsigned int remio_hc_banks;

/**
 * asm_bao_hypercall_remio - Perform a Bao Remote I/O hypercall through the hypercall window
 * @request: Bao VirtIO request (inputs; on return, the outputs)
 *
 * Uses the bank of the current CPU with local interrupts disabled, so process context, the
 * driver's interrupt handler and other vCPUs never share a bank.
 *
 * Return: hyp_ret 0, remio_hyp_ret the Remote I/O status, pending_requests the has_pending flag.
 */
static inline struct remio_hypercall_ret
asm_bao_hypercall_remio(struct bao_virtio_request *request)
{
	struct remio_hypercall_ret ret = {
		.hyp_ret = 0,
		.remio_hyp_ret = (u64)REMIO_HC_STATUS_FAILURE,
		.pending_requests = 0,
	};
	void __iomem *base = READ_ONCE(remio_hc_base);
	unsigned int banks = READ_ONCE(remio_hc_banks);
	void __iomem *bank;
	unsigned long flags;
	unsigned int cpu;

	local_irq_save(flags);
	cpu = smp_processor_id();
	if (unlikely(!base || cpu >= banks)) {
		local_irq_restore(flags);
		WARN_ONCE(1, "remio-backend: no hypercall window bank for CPU %u (%u banks%s)\n", cpu,
			  banks, base ? "" : ", window not bound");
		return ret;
	}
	bank = base + REMIO_HC_BANK(cpu);
	writeq(request->dm_id, bank + REMIO_HC_B_DM_ID);
	writeq(request->addr, bank + REMIO_HC_B_ADDR);
	writeq(request->op, bank + REMIO_HC_B_OP);
	writeq(request->value, bank + REMIO_HC_B_VALUE);
	writeq(request->request_id, bank + REMIO_HC_B_REQUEST_ID);
	/* Executes the hypercall: the vCPU is blocked until the platform has answered. */
	writeq(1, bank + REMIO_HC_B_CALL);
	ret.remio_hyp_ret = readq(bank + REMIO_HC_B_CALL);
	request->addr = readq(bank + REMIO_HC_B_ADDR);
	request->op = readq(bank + REMIO_HC_B_OP);
	request->value = readq(bank + REMIO_HC_B_VALUE);
	request->access_width = readq(bank + REMIO_HC_B_ACCESS_WIDTH);
	request->request_id = readq(bank + REMIO_HC_B_REQUEST_ID);
	ret.pending_requests = readq(bank + REMIO_HC_B_HAS_PENDING);
	local_irq_restore(flags);
	return ret;
}

#endif /* __ASM_X86_REMIO_BAO_H */
