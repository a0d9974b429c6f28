//! Per-kernel resource figures read from a CUBIN (an ELF64 file) without cuobjdump: registers
//! from the `EIATTR_REGCOUNT` attribute in `.nv.info`, static shared memory from the size of
//! `.nv.shared.<kernel>`, and the stack frame (local memory, i.e. spills) from
//! `EIATTR_FRAME_SIZE`. The same figures `cuobjdump --dump-resource-usage` prints.

use std::collections::BTreeMap;

/// Resource usage of one kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub registers: u32,
    pub shared_bytes: u64,
    pub frame_bytes: u32,
}

const SHT_SYMTAB: u32 = 2;
/// `.nv.info` attribute formats and the attributes read here (from NVIDIA's ELF notes).
const EIFMT_NVAL: u8 = 1;
const EIFMT_BVAL: u8 = 2;
const EIFMT_HVAL: u8 = 3;
const EIFMT_SVAL: u8 = 4;
const EIATTR_FRAME_SIZE: u8 = 0x11;
const EIATTR_REGCOUNT: u8 = 0x2f;

struct Section {
    name: String,
    kind: u32,
    offset: usize,
    size: usize,
    link: u32,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

fn cstr(b: &[u8], o: usize) -> String {
    let tail = b.get(o..).unwrap_or_default();
    let end = tail.iter().position(|&c| c == 0).unwrap_or(tail.len());
    String::from_utf8_lossy(&tail[..end]).into_owned()
}

fn sections(elf: &[u8]) -> Option<Vec<Section>> {
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let shoff = u64_at(elf, 0x28)? as usize;
    let shentsize = u16_at(elf, 0x3a)? as usize;
    let shnum = u16_at(elf, 0x3c)? as usize;
    let shstrndx = u16_at(elf, 0x3e)? as usize;
    let raw = |i: usize| -> Option<(u32, u32, usize, usize, u32)> {
        let h = shoff + i * shentsize;
        Some((
            u32_at(elf, h)?,
            u32_at(elf, h + 4)?,
            u64_at(elf, h + 24)? as usize,
            u64_at(elf, h + 32)? as usize,
            u32_at(elf, h + 40)?,
        ))
    };
    let strtab = raw(shstrndx)?.2;
    (0..shnum)
        .map(|i| {
            let (name, kind, offset, size, link) = raw(i)?;
            Some(Section {
                name: cstr(elf, strtab + name as usize),
                kind,
                offset,
                size,
                link,
            })
        })
        .collect()
}

/// Symbol names by index, from `.symtab`.
fn symbols(elf: &[u8], secs: &[Section]) -> Option<Vec<String>> {
    let tab = secs.iter().find(|s| s.kind == SHT_SYMTAB)?;
    let names = secs.get(tab.link as usize)?.offset;
    (0..tab.size / 24)
        .map(|i| {
            Some(cstr(
                elf,
                names + u32_at(elf, tab.offset + i * 24)? as usize,
            ))
        })
        .collect()
}

/// Walks `.nv.info` attributes, calling `f(attr, payload)` for each one with a payload.
fn attributes(b: &[u8], mut f: impl FnMut(u8, &[u8])) {
    let mut o = 0;
    while o + 2 <= b.len() {
        let (fmt, attr) = (b[o], b[o + 1]);
        o += 2;
        let len = match fmt {
            EIFMT_NVAL => 0,
            EIFMT_BVAL => 1,
            EIFMT_HVAL => 2,
            EIFMT_SVAL => match u16_at(b, o) {
                Some(n) => {
                    o += 2;
                    n as usize
                }
                None => return,
            },
            _ => return,
        };
        let Some(payload) = b.get(o..o + len) else {
            return;
        };
        f(attr, payload);
        o += len;
    }
}

/// Usage of every kernel (every `.text.<name>` section) in `elf`, by name; `None` if `elf` is
/// not an ELF64 file with a symbol table.
pub fn usage(elf: &[u8]) -> Option<BTreeMap<String, Usage>> {
    let secs = sections(elf)?;
    let syms = symbols(elf, &secs)?;
    let mut out: BTreeMap<String, Usage> = secs
        .iter()
        .filter_map(|s| s.name.strip_prefix(".text."))
        .map(|n| (n.to_string(), Usage::default()))
        .collect();
    for s in &secs {
        if let Some(k) = s.name.strip_prefix(".nv.shared.") {
            if let Some(u) = out.get_mut(k) {
                u.shared_bytes = s.size as u64;
            }
        }
        if s.name == ".nv.info" || s.name.starts_with(".nv.info.") {
            let body = elf.get(s.offset..s.offset + s.size)?;
            attributes(body, |attr, p| {
                if p.len() != 8 || (attr != EIATTR_REGCOUNT && attr != EIATTR_FRAME_SIZE) {
                    return;
                }
                let sym = u32::from_le_bytes(p[..4].try_into().unwrap()) as usize;
                let value = u32::from_le_bytes(p[4..].try_into().unwrap());
                if let Some(u) = syms.get(sym).and_then(|n| out.get_mut(n)) {
                    match attr {
                        EIATTR_REGCOUNT => u.registers = value,
                        _ => u.frame_bytes = value,
                    }
                }
            });
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_an_elf_is_none() {
        assert_eq!(usage(b"PTX"), None);
        assert_eq!(usage(b""), None);
    }

    #[test]
    fn attributes_walk_every_format() {
        // NVAL, BVAL, HVAL, then an SVAL REGCOUNT (sym 3, 40 registers).
        let mut b = vec![
            EIFMT_NVAL, 0x01, EIFMT_BVAL, 0x02, 7, EIFMT_HVAL, 0x03, 1, 0,
        ];
        b.extend([EIFMT_SVAL, EIATTR_REGCOUNT, 8, 0, 3, 0, 0, 0, 40, 0, 0, 0]);
        let mut seen = Vec::new();
        attributes(&b, |a, p| seen.push((a, p.to_vec())));
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[3], (EIATTR_REGCOUNT, vec![3, 0, 0, 0, 40, 0, 0, 0]));
    }
}
