// SPDX-License-Identifier: GPL-2.0
/*
 * remio_backend: gives the posted Bao I/O dispatcher driver, in remio's backend VM, what a
 * device tree gives it on Bao hardware: a platform device "bao-io-dispatcher" whose memory
 * resource i and IRQ i describe DM i. It binds three PCI devices (guest/README.md, "The backend
 * VM"):
 *   - the hypercall proxy (REMIO_HC_VENDOR_ID:REMIO_HC_DEVICE_ID), an x-pci-proxy-dev whose
 *     BAR0 is the hypercall window (remio-hc.h); it maps the BAR, checks MAGIC and VERSION,
 *     reads DM_COUNT and BANK_COUNT and exports the mapping (remio_hc_base, remio_hc_banks) to
 *     the x86 <asm/bao.h> stand-in compiled into the driver;
 *   - the ivshmem-doorbell (0x1af4:0x1110 with an MSI-X capability): MSI-X vector i is DM i's
 *     backend interrupt; it allocates exactly DM_COUNT vectors and does not request them (the
 *     driver does);
 *   - the ivshmem-plain (0x1af4:0x1110 without MSI-X): BAR2 is the frontend's whole RAM, every
 *     DM's shared memory; it is neither requested nor mapped here (the driver remaps it for
 *     the device model's mmap).
 * Once all three are bound (any order) it registers the platform device; unbinding any of them
 * unregisters it. Every log line starts with "remio-backend: ".
 */
#include <linux/io.h>
#include <linux/ioport.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/platform_device.h>

#include "remio-hc.h"

#define GLUE "remio-backend: "

/* Read by the <asm/bao.h> stand-in on every hypercall; written under backend_lock. */
void __iomem *remio_hc_base;
EXPORT_SYMBOL_GPL(remio_hc_base);
unsigned int remio_hc_banks;
EXPORT_SYMBOL_GPL(remio_hc_banks);

static DEFINE_MUTEX(backend_lock);

/* Protected by backend_lock. */
static struct {
	struct pci_dev *proxy;
	void __iomem *window; /* BAR0 of the proxy */
	unsigned int dm_count;
	struct pci_dev *doorbell;
	int vectors; /* MSI-X vectors allocated on the doorbell (0: none) */
	struct pci_dev *shmem;
	struct platform_device *dispatcher;
	/* Scratch for the platform device's resources (copied when it is registered). */
	struct resource res[2 * REMIO_HC_MAX_DMS];
} backend;

static const char *present(const void *p)
{
	return p ? "bound" : "MISSING";
}

/* Called with backend_lock held whenever a device was bound. */
static void backend_try_register(void)
{
	struct resource *res = backend.res;
	struct platform_device_info info = {
		.name = "bao-io-dispatcher",
		.id = PLATFORM_DEVID_NONE,
		.res = res,
	};
	resource_size_t start, len;
	struct platform_device *pdev;
	unsigned int i, n = backend.dm_count;
	int ret;

	if (!backend.proxy || !backend.doorbell || !backend.shmem || backend.dispatcher)
		return;
	if (n == 0) {
		pr_err(GLUE "the hypercall window reports DM_COUNT 0: nothing to dispatch\n");
		return;
	}
	ret = pci_alloc_irq_vectors(backend.doorbell, n, n, PCI_IRQ_MSIX);
	if (ret < 0) {
		pr_err(GLUE "cannot allocate %u MSI-X vectors on the doorbell %s (it has %d): %d\n", n,
		       pci_name(backend.doorbell), pci_msix_vec_count(backend.doorbell), ret);
		return;
	}
	backend.vectors = ret;
	start = pci_resource_start(backend.shmem, REMIO_IVSHMEM_SHMEM_BAR);
	len = pci_resource_len(backend.shmem, REMIO_IVSHMEM_SHMEM_BAR);
	/* DM i: MEM resource i, IRQ resource i (platform_get_resource/irq count per type). */
	for (i = 0; i < n; i++) {
		res[i] = (struct resource)DEFINE_RES_MEM_NAMED(start, len, "remio-shmem");
		res[n + i] = (struct resource)DEFINE_RES_IRQ(pci_irq_vector(backend.doorbell, i));
	}
	info.num_res = 2 * n;
	info.parent = &backend.proxy->dev;
	pdev = platform_device_register_full(&info);
	if (IS_ERR(pdev)) {
		pr_err(GLUE "registering the bao-io-dispatcher platform device failed: %ld\n",
		       PTR_ERR(pdev));
		pci_free_irq_vectors(backend.doorbell);
		backend.vectors = 0;
		return;
	}
	backend.dispatcher = pdev;
	for (i = 0; i < n; i++)
		pr_info(GLUE "DM %u: shmem %pa size %pa irq %d\n", i, &start, &len,
			pci_irq_vector(backend.doorbell, i));
	pr_info(GLUE "bao-io-dispatcher platform device registered with %u DMs\n", n);
}

/* Called with backend_lock held before any of the three devices goes away. */
static void backend_unregister(void)
{
	if (backend.dispatcher) {
		platform_device_unregister(backend.dispatcher);
		backend.dispatcher = NULL;
		pr_info(GLUE "bao-io-dispatcher platform device unregistered\n");
	}
	if (backend.vectors) {
		pci_free_irq_vectors(backend.doorbell);
		backend.vectors = 0;
	}
}

static int backend_probe_proxy(struct pci_dev *pdev)
{
	void __iomem *window;
	u64 magic, version, dm_count, banks;
	int ret;

	if (backend.proxy) {
		pci_info(pdev, GLUE "a second hypercall proxy is ignored\n");
		return -EBUSY;
	}
	ret = pci_enable_device_mem(pdev);
	if (ret)
		return ret;
	if (!(pci_resource_flags(pdev, 0) & IORESOURCE_MEM) ||
	    pci_resource_len(pdev, 0) < REMIO_HC_BAR_SIZE) {
		pci_err(pdev, GLUE "BAR0 is not a memory BAR of at least 0x%x bytes\n",
			REMIO_HC_BAR_SIZE);
		ret = -ENODEV;
		goto disable;
	}
	ret = pci_request_region(pdev, 0, "remio-hypercall-window");
	if (ret)
		goto disable;
	window = pci_iomap(pdev, 0, REMIO_HC_BAR_SIZE);
	if (!window) {
		ret = -ENOMEM;
		goto release;
	}
	magic = readq(window + REMIO_HC_MAGIC);
	version = readq(window + REMIO_HC_VERSION);
	if (magic != REMIO_HC_MAGIC_VALUE || version != REMIO_HC_VERSION_VALUE) {
		pci_err(pdev, GLUE "not a remio hypercall window: magic %#llx version %llu (want %#llx version %u)\n",
			magic, version, REMIO_HC_MAGIC_VALUE, REMIO_HC_VERSION_VALUE);
		ret = -ENODEV;
		goto unmap;
	}
	dm_count = readq(window + REMIO_HC_DM_COUNT);
	banks = readq(window + REMIO_HC_BANK_COUNT);
	if (dm_count > REMIO_HC_MAX_DMS || banks == 0 || banks > REMIO_HC_MAX_BANKS ||
	    REMIO_HC_BANK(banks) > pci_resource_len(pdev, 0)) {
		pci_err(pdev, GLUE "bad hypercall window: DM_COUNT %llu (max %u), BANK_COUNT %llu (1..%u)\n",
			dm_count, REMIO_HC_MAX_DMS, banks, REMIO_HC_MAX_BANKS);
		ret = -ENODEV;
		goto unmap;
	}
	if (num_possible_cpus() > banks)
		pci_warn(pdev, GLUE "%u possible CPUs but %llu banks: hypercalls from CPU >= %llu fail\n",
			 num_possible_cpus(), banks, banks);
	backend.proxy = pdev;
	backend.window = window;
	backend.dm_count = dm_count;
	WRITE_ONCE(remio_hc_banks, banks);
	WRITE_ONCE(remio_hc_base, window);
	pci_info(pdev, GLUE "hypercall window at %pR: version %llu, %llu DMs, %llu banks\n",
		 &pdev->resource[0], version, dm_count, banks);
	return 0;
unmap:
	pci_iounmap(pdev, window);
release:
	pci_release_region(pdev, 0);
disable:
	pci_disable_device(pdev);
	return ret;
}

static int backend_probe_ivshmem(struct pci_dev *pdev)
{
	bool doorbell = pdev->msix_cap != 0;
	struct pci_dev **slot = doorbell ? &backend.doorbell : &backend.shmem;
	int ret;

	if (*slot) {
		pci_info(pdev, GLUE "a second ivshmem %s is ignored\n",
			 doorbell ? "doorbell" : "shared memory");
		return -EBUSY;
	}
	ret = pci_enable_device_mem(pdev);
	if (ret)
		return ret;
	if (doorbell) {
		/* QEMU drops the MSI writes of a device that is not bus master. */
		pci_set_master(pdev);
		pci_info(pdev, GLUE "ivshmem doorbell with %d MSI-X vectors\n",
			 pci_msix_vec_count(pdev));
	} else {
		if (!(pci_resource_flags(pdev, REMIO_IVSHMEM_SHMEM_BAR) & IORESOURCE_MEM) ||
		    pci_resource_len(pdev, REMIO_IVSHMEM_SHMEM_BAR) == 0) {
			pci_err(pdev, GLUE "ivshmem shared memory has no BAR%d\n",
				REMIO_IVSHMEM_SHMEM_BAR);
			pci_disable_device(pdev);
			return -ENODEV;
		}
		pci_info(pdev, GLUE "ivshmem shared memory (the frontend's RAM) at %pR\n",
			 &pdev->resource[REMIO_IVSHMEM_SHMEM_BAR]);
	}
	*slot = pdev;
	return 0;
}

static int backend_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	int ret;

	mutex_lock(&backend_lock);
	if (pdev->vendor == REMIO_HC_VENDOR_ID)
		ret = backend_probe_proxy(pdev);
	else
		ret = backend_probe_ivshmem(pdev);
	if (ret == 0)
		backend_try_register();
	mutex_unlock(&backend_lock);
	return ret;
}

static void backend_remove(struct pci_dev *pdev)
{
	mutex_lock(&backend_lock);
	backend_unregister();
	if (pdev == backend.proxy) {
		WRITE_ONCE(remio_hc_base, NULL);
		WRITE_ONCE(remio_hc_banks, 0);
		pci_iounmap(pdev, backend.window);
		pci_release_region(pdev, 0);
		backend.window = NULL;
		backend.dm_count = 0;
		backend.proxy = NULL;
	} else if (pdev == backend.doorbell) {
		backend.doorbell = NULL;
	} else if (pdev == backend.shmem) {
		backend.shmem = NULL;
	}
	pci_disable_device(pdev);
	/* The other devices may still be bound: nothing is registered until this one returns. */
	mutex_unlock(&backend_lock);
}

static const struct pci_device_id backend_ids[] = {
	{ PCI_DEVICE(REMIO_HC_VENDOR_ID, REMIO_HC_DEVICE_ID) },
	{ PCI_DEVICE(REMIO_IVSHMEM_VENDOR_ID, REMIO_IVSHMEM_DEVICE_ID) },
	{}
};
MODULE_DEVICE_TABLE(pci, backend_ids);

static struct pci_driver backend_driver = {
	.name = "remio_backend",
	.id_table = backend_ids,
	.probe = backend_probe,
	.remove = backend_remove,
};

static int __init backend_init(void)
{
	int ret = pci_register_driver(&backend_driver);

	if (ret)
		return ret;
	/* Probing existing devices is synchronous: the state below is final for this boot. */
	mutex_lock(&backend_lock);
	pr_info(GLUE "hypercall proxy %04x:%04x %s, ivshmem doorbell %s, ivshmem shared memory %s\n",
		REMIO_HC_VENDOR_ID, REMIO_HC_DEVICE_ID, present(backend.proxy),
		present(backend.doorbell), present(backend.shmem));
	if (!backend.proxy)
		pr_warn(GLUE "no hypercall proxy PCI device %04x:%04x: the bao-io-dispatcher device will not be registered\n",
			REMIO_HC_VENDOR_ID, REMIO_HC_DEVICE_ID);
	else if (!backend.dispatcher)
		pr_warn(GLUE "the bao-io-dispatcher device is not registered (see the messages above)\n");
	mutex_unlock(&backend_lock);
	return 0;
}

static void __exit backend_exit(void)
{
	pci_unregister_driver(&backend_driver);
}

module_init(backend_init);
module_exit(backend_exit);

MODULE_DESCRIPTION("remio: the bao-io-dispatcher platform device from a hypercall proxy and two ivshmem devices");
MODULE_LICENSE("GPL");
