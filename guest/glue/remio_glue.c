// SPDX-License-Identifier: GPL-2.0
/*
 * remio_glue: makes the virtio-mmio register windows that remio serves through QEMU's
 * x-pci-proxy-dev visible to the stock virtio_mmio driver.
 *
 * Debian kernels lack CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, and the proxy's INTx raises nothing
 * under TCG, so this module binds two PCI devices:
 *   - the proxy (REMIO_PROXY_VENDOR_ID:REMIO_PROXY_DEVICE_ID), whose BAR0 holds N windows of
 *     REMIO_WINDOW_SIZE bytes, N being the PCI subsystem id the remote reports;
 *   - the ivshmem-doorbell device, whose MSI-X vector i is window i's interrupt.
 * Once both are bound it registers one "virtio-mmio" platform device per window, with the
 * window as its memory resource and vector i's Linux IRQ as its interrupt.
 *
 * It deliberately does not request the proxy BAR (virtio_mmio requests each window itself) and
 * does not request the IRQs (virtio_mmio requests them, IRQF_SHARED).
 * See guest/README.md for the contract with the remote.
 */
#include <linux/dma-mapping.h>
#include <linux/ioport.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/platform_device.h>

#include "remio-ids.h"

static DEFINE_MUTEX(glue_lock);

/* Protected by glue_lock. */
static struct {
	struct pci_dev *proxy;
	struct pci_dev *ivshmem;
	int vectors; /* MSI-X vectors allocated on ivshmem */
	int count; /* registered platform devices */
	struct platform_device *windows[REMIO_MAX_WINDOWS];
} glue;

static unsigned int max_windows = REMIO_MAX_WINDOWS;
module_param(max_windows, uint, 0444);
MODULE_PARM_DESC(max_windows, "Register at most this many windows (default and cap: 32)");

static unsigned int proxy_window_count(struct pci_dev *proxy)
{
	resource_size_t len = pci_resource_len(proxy, 0);
	unsigned int n = proxy->subsystem_device;
	unsigned int fit = len / REMIO_WINDOW_SIZE;

	if (n > fit) {
		pci_warn(proxy, "remio: %u windows announced but BAR0 holds %u\n", n, fit);
		n = fit;
	}
	return min3(n, max_windows, (unsigned int)REMIO_MAX_WINDOWS);
}

/* Called with glue_lock held, once both devices are bound. */
static void glue_register_windows(void)
{
	struct pci_dev *proxy = glue.proxy;
	resource_size_t base = pci_resource_start(proxy, 0);
	unsigned int n = proxy_window_count(proxy);
	unsigned int i;

	if (n > glue.vectors) {
		pci_warn(proxy, "remio: %u windows but only %d ivshmem vectors\n", n, glue.vectors);
		n = glue.vectors;
	}
	for (i = 0; i < n; i++) {
		struct resource res[2] = {
			DEFINE_RES_MEM(base + i * REMIO_WINDOW_SIZE, REMIO_WINDOW_SIZE),
			DEFINE_RES_IRQ(pci_irq_vector(glue.ivshmem, i)),
		};
		struct platform_device_info info = {
			.parent = &proxy->dev,
			.name = "virtio-mmio",
			.id = PLATFORM_DEVID_AUTO,
			.res = res,
			.num_res = ARRAY_SIZE(res),
			.dma_mask = DMA_BIT_MASK(64),
		};
		struct platform_device *pdev = platform_device_register_full(&info);

		if (IS_ERR(pdev)) {
			pci_err(proxy, "remio: window %u: register failed: %ld\n", i, PTR_ERR(pdev));
			break;
		}
		glue.windows[glue.count++] = pdev;
		pr_info("remio_glue: window %u at %pa irq %lld -> %s\n", i, &res[0].start,
			(long long)res[1].start, dev_name(&pdev->dev));
	}
	pr_info("remio_glue: %d virtio-mmio windows registered\n", glue.count);
}

/* Called with glue_lock held, before either device goes away. */
static void glue_unregister_windows(void)
{
	while (glue.count > 0)
		platform_device_unregister(glue.windows[--glue.count]);
}

static int glue_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	bool is_proxy = pdev->vendor == REMIO_PROXY_VENDOR_ID;
	int ret;

	mutex_lock(&glue_lock);
	if (is_proxy ? glue.proxy != NULL : glue.ivshmem != NULL) {
		pci_info(pdev, "remio: a second %s is ignored\n", is_proxy ? "proxy" : "ivshmem");
		ret = -EBUSY;
		goto out;
	}
	/* Turns on memory decoding (and bus mastering below for ivshmem's MSI writes). */
	ret = pci_enable_device_mem(pdev);
	if (ret)
		goto out;
	if (is_proxy) {
		if (!(pci_resource_flags(pdev, 0) & IORESOURCE_MEM) ||
		    pci_resource_len(pdev, 0) < REMIO_WINDOW_SIZE) {
			pci_err(pdev, "remio: BAR0 is not a memory BAR of at least 0x%x bytes\n",
				REMIO_WINDOW_SIZE);
			pci_disable_device(pdev);
			ret = -ENODEV;
			goto out;
		}
		glue.proxy = pdev;
		pci_info(pdev, "remio: proxy BAR0 %pR, %u windows\n", &pdev->resource[0],
			 proxy_window_count(pdev));
	} else {
		int want = pci_msix_vec_count(pdev);

		if (want <= 0) {
			pci_err(pdev, "remio: ivshmem has no MSI-X (use vectors=K)\n");
			pci_disable_device(pdev);
			ret = -ENODEV;
			goto out;
		}
		pci_set_master(pdev);
		ret = pci_alloc_irq_vectors(pdev, 1, min(want, REMIO_MAX_WINDOWS), PCI_IRQ_MSIX);
		if (ret < 0) {
			pci_err(pdev, "remio: MSI-X allocation failed: %d\n", ret);
			pci_disable_device(pdev);
			goto out;
		}
		glue.vectors = ret;
		glue.ivshmem = pdev;
		pci_info(pdev, "remio: ivshmem with %d MSI-X vectors\n", ret);
	}
	ret = 0;
	if (glue.proxy && glue.ivshmem)
		glue_register_windows();
out:
	mutex_unlock(&glue_lock);
	return ret;
}

static void glue_remove(struct pci_dev *pdev)
{
	mutex_lock(&glue_lock);
	glue_unregister_windows();
	if (pdev == glue.ivshmem) {
		pci_free_irq_vectors(pdev);
		glue.vectors = 0;
		glue.ivshmem = NULL;
	} else if (pdev == glue.proxy) {
		glue.proxy = NULL;
	}
	pci_disable_device(pdev);
	mutex_unlock(&glue_lock);
}

static const struct pci_device_id glue_ids[] = {
	{ PCI_DEVICE_SUB(REMIO_PROXY_VENDOR_ID, REMIO_PROXY_DEVICE_ID, REMIO_PROXY_SUBSYS_VENDOR,
			 PCI_ANY_ID) },
	{ PCI_DEVICE(REMIO_IVSHMEM_VENDOR_ID, REMIO_IVSHMEM_DEVICE_ID) },
	{}
};
MODULE_DEVICE_TABLE(pci, glue_ids);

static struct pci_driver glue_driver = {
	.name = "remio_glue",
	.id_table = glue_ids,
	.probe = glue_probe,
	.remove = glue_remove,
};
module_pci_driver(glue_driver);

MODULE_DESCRIPTION("remio: virtio-mmio windows behind QEMU's x-pci-proxy-dev, IRQs from ivshmem");
MODULE_LICENSE("GPL");
