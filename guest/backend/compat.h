/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Force-included (-include) into every file of the posted Bao I/O dispatcher driver when
 * `remio guest build` builds it out of tree against Debian bookworm's 6.1 kernel headers. The
 * driver targets a newer kernel; these shims give it the four newer APIs it uses.
 */
#ifndef REMIO_BAO_COMPAT_H
#define REMIO_BAO_COMPAT_H

#include <linux/device.h>
#include <linux/eventfd.h>
#include <linux/file.h>
#include <linux/platform_device.h>
#include <linux/version.h>

/* 6.8 dropped eventfd_signal()'s count argument (always 1 in practice). */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 8, 0)
#define eventfd_signal(ctx) eventfd_signal((ctx), 1)
#endif

/* 6.12 added fd_file(); before it, struct fd's file pointer was the field `file`. */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 12, 0)
#define fd_file(f) ((f).file)
#endif

/* 6.4 dropped class_create()'s owner argument. */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 4, 0)
#undef class_create
#define class_create(name)                                                                       \
	({                                                                                        \
		static struct lock_class_key __key;                                               \
		__class_create(THIS_MODULE, (name), &__key);                                      \
	})
#endif

/*
 * 6.11 made platform_driver.remove return void; 6.1 expects int. driver.c (the Kbuild defines
 * REMIO_COMPAT_DRIVER_C for it alone) defines its void remove function and names it in the
 * driver's .remove. The function-like macro below renames the definition (the name is followed
 * by '(' there) but not the initializer (no '(' after the name), which so names the int wrapper
 * defined here, before the macro exists.
 */
#if LINUX_VERSION_CODE < KERNEL_VERSION(6, 11, 0) && defined(REMIO_COMPAT_DRIVER_C)
static void remio_compat_driver_unregister(struct platform_device *pdev);
static int __maybe_unused bao_io_dispatcher_driver_unregister(struct platform_device *pdev)
{
	remio_compat_driver_unregister(pdev);
	return 0;
}
#define bao_io_dispatcher_driver_unregister(pdev) remio_compat_driver_unregister(pdev)
#endif

#endif /* REMIO_BAO_COMPAT_H */
