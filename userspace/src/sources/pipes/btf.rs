//! Just enough of BTF to find where a member sits in a kernel struct, so that the eBPF
//! programs get this kernel's offsets at load time instead of compiled-in ones.

use anyhow::{bail, Context};

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

pub struct Btf {
    data: Vec<u8>,
    strings: usize,
    /// Byte position of each type's record; index 0 is the void type.
    types: Vec<usize>,
}

fn u32_at(d: &[u8], at: usize) -> anyhow::Result<u32> {
    d.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).context("BTF data ends early")
}

impl Btf {
    pub fn from_file(path: &str) -> anyhow::Result<Self> {
        let data = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> anyhow::Result<Self> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            bail!("not little-endian BTF");
        }
        let hdr = u32_at(&data, 4)? as usize;
        let type_off = hdr + u32_at(&data, 8)? as usize;
        let type_len = u32_at(&data, 12)? as usize;
        let strings = hdr + u32_at(&data, 16)? as usize;
        let mut types = vec![0];
        let mut at = type_off;
        while at < type_off + type_len {
            types.push(at);
            let info = u32_at(&data, at + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            at += 12
                + match kind {
                    1 | 14 | 17 => 4,          // int, var, decl_tag
                    3 => 12,                   // array
                    4 | 5 => 12 * vlen,        // struct, union members
                    6 | 13 => 8 * vlen,        // enum, func_proto
                    15 | 19 => 12 * vlen,      // datasec, enum64
                    2 | 7..=12 | 16 | 18 => 0, // ptr, fwd, typedef, modifiers, func, float, type_tag
                    other => bail!("unknown BTF kind {other}"),
                };
        }
        Ok(Self { data, strings, types })
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.strings + off as usize;
        let rest = self.data.get(start..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn header(&self, id: u32) -> anyhow::Result<(usize, u32, u32, u32)> {
        let at = *self.types.get(id as usize).context("BTF type id out of range")?;
        let info = u32_at(&self.data, at + 4)?;
        Ok((at, (info >> 24) & 0x1f, info, u32_at(&self.data, at + 8)?))
    }

    /// Byte offset of `member` in `struct name`, looking into anonymous structs and unions.
    pub fn member_offset(&self, name: &str, member: &str) -> anyhow::Result<u32> {
        for id in 1..self.types.len() as u32 {
            let (at, kind, info, _) = self.header(id)?;
            if kind == KIND_STRUCT && info & 0xffff != 0 && self.name(u32_at(&self.data, at)?) == name.as_bytes() {
                if let Some(bits) = self.find(id, member)? {
                    return Ok(bits / 8);
                }
            }
        }
        bail!("struct {name} has no member {member} in this kernel's BTF")
    }

    fn find(&self, id: u32, member: &str) -> anyhow::Result<Option<u32>> {
        let (at, _, info, _) = self.header(id)?;
        let kflag = info >> 31 == 1;
        for i in 0..(info & 0xffff) as usize {
            let m = at + 12 + 12 * i;
            let (name_off, ty, off) = (u32_at(&self.data, m)?, u32_at(&self.data, m + 4)?, u32_at(&self.data, m + 8)?);
            let bits = if kflag { off & 0xff_ffff } else { off };
            let name = self.name(name_off);
            if name == member.as_bytes() {
                return Ok(Some(bits));
            }
            if name.is_empty() {
                let inner = self.skip_modifiers(ty)?;
                let (_, kind, _, _) = self.header(inner)?;
                if kind == KIND_STRUCT || kind == KIND_UNION {
                    if let Some(b) = self.find(inner, member)? {
                        return Ok(Some(bits + b));
                    }
                }
            }
        }
        Ok(None)
    }

    fn skip_modifiers(&self, mut id: u32) -> anyhow::Result<u32> {
        for _ in 0..32 {
            let (_, kind, _, next) = self.header(id)?;
            if !matches!(kind, KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) {
                return Ok(id);
            }
            id = next;
        }
        bail!("BTF modifier chain too long")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF for: struct inner { int a; int b; }; struct outer { long x; union { int y; struct inner in; }; };
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0outer\0x\0y\0in\0".to_vec();
        let s = |name: &str| {
            let needle = format!("\0{name}\0");
            strings.windows(needle.len()).position(|w| w == needle.as_bytes()).unwrap() as u32 + 1
        };
        let mut t = Vec::new();
        let mut push = |v: &[u32]| t.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        push(&[s("int"), 1 << 24, 4, 32]); // 1: int
        push(&[s("inner"), 4 << 24 | 2, 8, s("a"), 1, 0, s("b"), 1, 32]); // 2: struct inner
        push(&[0, 5 << 24 | 2, 8, s("y"), 1, 0, s("in"), 2, 0]); // 3: anonymous union
        push(&[s("outer"), 4 << 24 | 2, 16, s("x"), 1, 0, 0, 3, 64]); // 4: struct outer
        let mut d = Vec::new();
        d.extend(MAGIC.to_le_bytes());
        d.extend([1, 0]);
        for v in [24u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            d.extend(v.to_le_bytes());
        }
        d.extend(t);
        d.extend(strings);
        d
    }

    #[test]
    fn finds_members_also_inside_anonymous_unions() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.member_offset("inner", "b").unwrap(), 4);
        assert_eq!(btf.member_offset("outer", "x").unwrap(), 0);
        assert_eq!(btf.member_offset("outer", "y").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", "in").unwrap(), 8);
        assert!(btf.member_offset("outer", "zz").is_err());
    }

    #[test]
    fn this_kernels_btf_has_what_the_pipe_check_needs() {
        let Ok(btf) = Btf::from_file("/sys/kernel/btf/vmlinux") else {
            panic!("/sys/kernel/btf/vmlinux is required (kernel BTF)");
        };
        for (s, m) in [
            ("task_struct", "files"),
            ("files_struct", "fdt"),
            ("fdtable", "fd"),
            ("file", "f_inode"),
            ("inode", "i_mode"),
        ] {
            btf.member_offset(s, m).unwrap();
        }
    }
}
