//! Extracting the Bao I/O dispatcher driver from the posted patch text, at build time.
//!
//! The driver is foreign code: it is never copied into this repository (conventions, 17). `remio
//! guest build` reads the patch (`--c-driver-patch`, `$REMIO_C_DRIVER_PATCH`, or
//! `../shared/spec/bao-io-dispatcher-patch.txt` beside the workspace), takes every `new file
//! mode` section's single hunk (`@@ -0,0 +1,N @@`, then N lines each starting with `+`) and
//! keeps the driver's files: everything under `drivers/virt/bao/io-dispatcher/` but its
//! Kconfig and Makefile, and `include/uapi/linux/bao.h`. The patch text is a mail archive page,
//! so text around the diff (headers, a `--` signature) is ignored, and indentation may have been
//! flattened to one space (C does not mind).

use std::fmt;

/// The directory of the driver's sources in the patch.
pub const DRIVER_DIR: &str = "drivers/virt/bao/io-dispatcher/";
/// The driver's UAPI header in the patch; the driver includes it as `<linux/bao.h>`.
pub const UAPI_HEADER: &str = "include/uapi/linux/bao.h";

/// Why a patch text did not yield the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchError {
    /// A new file's hunk header is not `@@ -0,0 +1[,N] @@`.
    BadHunkHeader { path: String, line: usize },
    /// A line inside a new file's hunk does not start with `+`.
    NotAnAddedLine { path: String, line: usize },
    /// The text ends before a new file's hunk has its announced number of lines.
    Truncated {
        path: String,
        wanted: usize,
        got: usize,
    },
    /// The patch creates no file the driver needs (which one is named).
    Missing(&'static str),
}

impl fmt::Display for PatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadHunkHeader { path, line } => {
                write!(
                    f,
                    "line {line}: {path}: the new file's hunk header is not `@@ -0,0 +1,N @@`"
                )
            }
            Self::NotAnAddedLine { path, line } => {
                write!(
                    f,
                    "line {line}: {path}: a line of a new file's hunk does not start with `+`"
                )
            }
            Self::Truncated { path, wanted, got } => {
                write!(
                    f,
                    "{path}: the patch ends after {got} of its {wanted} lines"
                )
            }
            Self::Missing(what) => write!(f, "the patch creates no {what}"),
        }
    }
}

impl std::error::Error for PatchError {}

/// A file the patch creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFile {
    /// Path in the kernel tree (from the `+++ b/<path>` line).
    pub path: String,
    /// The file's text: the hunk's lines without their `+`, each ending with a newline.
    pub text: String,
}

/// The files of the driver, ready to be written into an out-of-tree build directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverSources {
    /// `(file name, text)` of every file under [`DRIVER_DIR`] but Kconfig and Makefile, sorted
    /// by name (the directory is flat).
    pub files: Vec<(String, String)>,
    /// The text of [`UAPI_HEADER`].
    pub uapi_header: String,
}

impl DriverSources {
    /// The object files of the module: one per `.c` file.
    pub fn objects(&self) -> Vec<String> {
        self.files
            .iter()
            .filter_map(|(name, _)| name.strip_suffix(".c"))
            .map(|stem| format!("{stem}.o"))
            .collect()
    }
}

/// Every file the patch creates, in patch order.
pub fn new_files(patch: &str) -> Result<Vec<NewFile>, PatchError> {
    let lines: Vec<&str> = patch.lines().collect();
    let mut files = Vec::new();
    // The file of the current `diff --git` section and whether it is created by the patch.
    let mut path: Option<String> = None;
    let mut created = false;
    let mut i = 0;
    while let Some(&line) = lines.get(i) {
        i += 1;
        if let Some(rest) = line.strip_prefix("diff --git ") {
            path = rest
                .split_once(" b/")
                .map(|(_, b)| b.to_owned())
                .or_else(|| Some(rest.to_owned()));
            created = false;
        } else if line.starts_with("new file mode ") {
            created = path.is_some();
        } else if let Some(p) = line.strip_prefix("+++ b/") {
            if path.is_some() {
                path = Some(p.to_owned());
            }
        } else if created && line.starts_with("@@ ") {
            let name = path.clone().unwrap_or_default();
            let count = new_file_hunk_len(line).ok_or_else(|| PatchError::BadHunkHeader {
                path: name.clone(),
                line: i,
            })?;
            let mut text = String::new();
            for n in 0..count {
                let Some(&body) = lines.get(i) else {
                    return Err(PatchError::Truncated {
                        path: name,
                        wanted: count,
                        got: n,
                    });
                };
                i += 1;
                let added = body
                    .strip_prefix('+')
                    .ok_or_else(|| PatchError::NotAnAddedLine {
                        path: name.clone(),
                        line: i,
                    })?;
                text.push_str(added);
                text.push('\n');
            }
            files.push(NewFile { path: name, text });
            created = false;
        }
    }
    Ok(files)
}

/// N of a new file's hunk header `@@ -0,0 +1,N @@` (`+1` alone means one line).
fn new_file_hunk_len(header: &str) -> Option<usize> {
    let rest = header.strip_prefix("@@ -0,0 +")?;
    let (range, _) = rest.split_once(" @@")?;
    match range.split_once(',') {
        None if range == "1" => Some(1),
        None => None,
        Some(("1", n)) => n.parse().ok(),
        Some(_) => None,
    }
}

/// The driver's sources and UAPI header out of the patch text.
pub fn driver_sources(patch: &str) -> Result<DriverSources, PatchError> {
    let mut files = Vec::new();
    let mut uapi_header = None;
    for f in new_files(patch)? {
        if f.path == UAPI_HEADER {
            uapi_header = Some(f.text);
        } else if let Some(name) = f.path.strip_prefix(DRIVER_DIR) {
            // Flat directory; its Kconfig and Makefile are replaced by our own Kbuild.
            if !name.contains('/') && name != "Kconfig" && name != "Makefile" {
                files.push((name.to_owned(), f.text));
            }
        }
    }
    files.sort();
    let sources = DriverSources {
        files,
        uapi_header: uapi_header.ok_or(PatchError::Missing(UAPI_HEADER))?,
    };
    if sources.objects().is_empty() {
        return Err(PatchError::Missing(
            "C file under drivers/virt/bao/io-dispatcher/",
        ));
    }
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small patch in the shape of the posted one: mail headers, a modified file, a new file
    /// the driver does not need, two driver files, the UAPI header, and a signature after it.
    const SYNTHETIC: &str = "\
Subject: [PATCH 4/5] virt: add Bao I/O dispatcher driver
---
 drivers/virt/Makefile | 1 +
diff --git a/drivers/virt/Makefile b/drivers/virt/Makefile
index 623a671f8711..8bffc7ccd29e 100644
--- a/drivers/virt/Makefile
+++ b/drivers/virt/Makefile
@@ -11,3 +11,4 @@ obj-$(CONFIG_NITRO_ENCLAVES) += nitro_enclaves/
 obj-y += coco/
+obj-$(CONFIG_BAO_IO_DISPATCHER) += bao/
diff --git a/arch/arm64/include/asm/bao.h b/arch/arm64/include/asm/bao.h
new file mode 100644
index 000000000000..047b7204edd4
--- /dev/null
+++ b/arch/arm64/include/asm/bao.h
@@ -0,0 +1,2 @@
+#ifndef __ASM_ARM64_BAO_H
+#endif
diff --git a/drivers/virt/bao/io-dispatcher/Makefile b/drivers/virt/bao/io-dispatcher/Makefile
new file mode 100644
--- /dev/null
+++ b/drivers/virt/bao/io-dispatcher/Makefile
@@ -0,0 +1 @@
+bao-objs += dm.o
diff --git a/drivers/virt/bao/io-dispatcher/dm.c b/drivers/virt/bao/io-dispatcher/dm.c
new file mode 100644
--- /dev/null
+++ b/drivers/virt/bao/io-dispatcher/dm.c
@@ -0,0 +1,4 @@
+// SPDX-License-Identifier: GPL-2.0
+
+int x;
+ int y; /* flattened indentation */
diff --git a/drivers/virt/bao/io-dispatcher/bao_drv.h b/drivers/virt/bao/io-dispatcher/bao_drv.h
new file mode 100644
--- /dev/null
+++ b/drivers/virt/bao/io-dispatcher/bao_drv.h
@@ -0,0 +1,1 @@
+#define BAO 1
diff --git a/include/uapi/linux/bao.h b/include/uapi/linux/bao.h
new file mode 100644
--- /dev/null
+++ b/include/uapi/linux/bao.h
@@ -0,0 +1,2 @@
+#define BAO_IOCTL_TYPE 0xA6
+
--
2.43.0
";

    #[test]
    fn new_files_takes_the_added_lines_of_each_created_file_only() {
        let files = new_files(SYNTHETIC).expect("well formed");

        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "arch/arm64/include/asm/bao.h",
                "drivers/virt/bao/io-dispatcher/Makefile",
                "drivers/virt/bao/io-dispatcher/dm.c",
                "drivers/virt/bao/io-dispatcher/bao_drv.h",
                "include/uapi/linux/bao.h",
            ]
        );
        assert_eq!(
            files[2].text,
            "// SPDX-License-Identifier: GPL-2.0\n\nint x;\n int y; /* flattened indentation */\n"
        );
        // The hunk's line count ends the file: the "--" signature is not part of it.
        assert_eq!(files[4].text, "#define BAO_IOCTL_TYPE 0xA6\n\n");
    }

    #[test]
    fn driver_sources_keeps_the_driver_directory_and_the_uapi_header() {
        let src = driver_sources(SYNTHETIC).expect("has the driver");

        let names: Vec<&str> = src.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["bao_drv.h", "dm.c"]);
        assert_eq!(src.objects(), ["dm.o"]);
        assert!(src.uapi_header.starts_with("#define BAO_IOCTL_TYPE"));
    }

    #[test]
    fn a_truncated_new_file_is_an_error_naming_it() {
        let cut = &SYNTHETIC[..SYNTHETIC.find("+int x;").expect("in the text")];

        let err = new_files(cut).expect_err("dm.c is cut short");

        assert_eq!(
            err,
            PatchError::Truncated {
                path: "drivers/virt/bao/io-dispatcher/dm.c".into(),
                wanted: 4,
                got: 2
            }
        );
    }

    #[test]
    fn a_context_line_inside_a_new_file_is_an_error() {
        let bad = SYNTHETIC.replace("+int x;", " int x;");

        let err = new_files(&bad).expect_err("not an added line");

        assert!(
            matches!(&err, PatchError::NotAnAddedLine { path, .. } if path.ends_with("dm.c")),
            "{err}"
        );
    }

    #[test]
    fn a_patch_without_the_uapi_header_is_refused() {
        let cut = &SYNTHETIC[..SYNTHETIC.find("diff --git a/include").expect("in the text")];

        assert_eq!(driver_sources(cut), Err(PatchError::Missing(UAPI_HEADER)));
    }

    #[test]
    fn hunk_headers_of_new_files_give_their_line_count() {
        assert_eq!(new_file_hunk_len("@@ -0,0 +1,386 @@"), Some(386));
        assert_eq!(new_file_hunk_len("@@ -0,0 +1 @@"), Some(1));
        assert_eq!(
            new_file_hunk_len("@@ -0,0 +1,4 @@ trailing context"),
            Some(4)
        );
        assert_eq!(new_file_hunk_len("@@ -1,3 +1,4 @@"), None);
        assert_eq!(new_file_hunk_len("@@ -0,0 +2,4 @@"), None);
    }

    /// The posted patch, when this checkout has it beside the workspace (`../shared/spec`).
    fn real_patch() -> Option<String> {
        let path = super::super::backend::default_patch_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) => {
                eprintln!("\n!!! SKIPPED (real patch): {}: {e}\n", path.display());
                None
            }
        }
    }

    #[test]
    fn the_posted_patch_yields_the_driver_with_each_file_at_its_announced_length() {
        let Some(patch) = real_patch() else { return };

        let src = driver_sources(&patch).expect("the posted patch parses");

        let names: Vec<&str> = src.files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "bao_drv.h",
                "dm.c",
                "driver.c",
                "hypercall.h",
                "intc.c",
                "io_client.c",
                "io_dispatcher.c",
                "ioctls.c",
                "ioeventfd.c",
                "irqfd.c"
            ]
        );
        // The diffstat's line counts.
        let lines = |name: &str| {
            src.files
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.lines().count())
        };
        assert_eq!(lines("bao_drv.h"), Some(386));
        assert_eq!(lines("driver.c"), Some(348));
        assert_eq!(lines("irqfd.c"), Some(341));
        assert_eq!(src.uapi_header.lines().count(), 124);
        assert!(src.uapi_header.contains("struct remio_hypercall_ret {"));
        assert!(src
            .uapi_header
            .trim_end()
            .ends_with("#endif /* _UAPI_BAO_H */"));
        let driver = src
            .files
            .iter()
            .find(|(n, _)| n == "driver.c")
            .map(|(_, t)| t);
        assert!(driver.is_some_and(|t| t.contains(".name = \"bao-io-dispatcher\"")));
    }
}
