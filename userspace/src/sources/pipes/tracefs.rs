//! Tracepoint field offsets, read from the tracepoints' `format` files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs directory, mounted at /sys/kernel/tracing if no mount is found.
pub fn root() -> anyhow::Result<PathBuf> {
    for c in CANDIDATES {
        if Path::new(c).join("events").is_dir() {
            return Ok(c.into());
        }
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: valid C strings; mount(2) with no data.
    let rc = unsafe { libc::mount(c"tracefs".as_ptr(), target.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!("tracefs is not mounted and mounting it failed: {}", std::io::Error::last_os_error());
    }
    Ok(CANDIDATES[0].into())
}

/// Offset of `field` in the record of tracepoint `category/name`.
pub fn field_offset(root: &Path, category: &str, name: &str, field: &str) -> anyhow::Result<u32> {
    let path = root.join("events").join(category).join(name).join("format");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_offset(&text, field).with_context(|| format!("{}: no field {field}", path.display()))
}

fn parse_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut decl = None;
        let mut offset = None;
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                // "const char * buf", "char comm[16]", "__data_loc char[] name"
                let last = d.split_whitespace().last()?;
                decl = Some(last.split('[').next()?.trim_start_matches('*').to_string());
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.parse().ok();
            }
        }
        (decl.as_deref() == Some(field)).then_some(offset).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_format_files() {
        let f = "name: sys_enter_write\nID: 1\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                 \tfield:unsigned int fd;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:const char * buf;\toffset:24;\tsize:8;\tsigned:0;\n\
                 \tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;\n";
        assert_eq!(parse_offset(f, "fd"), Some(16));
        assert_eq!(parse_offset(f, "buf"), Some(24));
        assert_eq!(parse_offset(f, "child_pid"), Some(20));
        assert_eq!(parse_offset(f, "parent_comm"), Some(8));
        assert_eq!(parse_offset(f, "nope"), None);
    }
}
