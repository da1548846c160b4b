//! Reading an AMD GPU code object (what hiprtc returns: an ELF64 shared
//! object for `amdgcn-amd-amdhsa`): its target architecture and its kernels
//! (a kernel `k` has a kernel descriptor symbol `k.kd`). Plain, bounds-
//! checked byte parsing; a malformed file is an error, never a panic.

use crate::hip::dev_err;
use deepport_core::Result;

/// `EM_AMDGPU`.
pub const EM_AMDGPU: u16 = 0xe0;

/// What a code object says of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeObject {
    /// `EF_AMDGPU_MACH` (the low byte of `e_flags`).
    pub mach: u8,
    /// The architecture of `mach`, when known (`gfx90a`, …).
    pub gfx: Option<&'static str>,
    /// The kernels (names of the `*.kd` symbols, without the suffix), sorted.
    pub kernels: Vec<String>,
    /// The `.wavefront_size` of every kernel in the code object metadata
    /// (the msgpack note), in metadata order.
    pub wavefront_sizes: Vec<u32>,
}

/// The values following each `.wavefront_size` key in the metadata note:
/// msgpack encodes 32 and 64 as one positive-fixint byte after the key
/// string. A value in another encoding is reported as 0.
fn wavefront_sizes(code: &[u8]) -> Vec<u32> {
    const KEY: &[u8] = b".wavefront_size";
    code.windows(KEY.len())
        .enumerate()
        .filter(|(_, w)| *w == KEY)
        .map(|(i, _)| match code.get(i + KEY.len()) {
            Some(&b) if b < 0x80 => u32::from(b),
            _ => 0,
        })
        .collect()
}

/// `EF_AMDGPU_MACH` values (LLVM's `ELF.h`) of the architectures deepport
/// names.
const MACHS: &[(u8, &str)] = &[
    (0x2c, "gfx900"),
    (0x2f, "gfx906"),
    (0x30, "gfx908"),
    (0x3f, "gfx90a"),
    (0x36, "gfx1030"),
    (0x40, "gfx940"),
    (0x4b, "gfx941"),
    (0x4c, "gfx942"),
    (0x41, "gfx1100"),
];

fn rd<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N]> {
    at.checked_add(N)
        .and_then(|end| b.get(at..end))
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| dev_err(format!("code object: truncated at byte {at}")))
}
fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(rd(b, at)?))
}
fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(rd(b, at)?))
}
fn u64_at(b: &[u8], at: usize) -> Result<usize> {
    usize::try_from(u64::from_le_bytes(rd(b, at)?))
        .map_err(|_| dev_err("code object: offset out of range"))
}

/// Parses `code` (an ELF64 little-endian AMDGPU object).
pub fn parse(code: &[u8]) -> Result<CodeObject> {
    if code.len() < 64 || &code[..4] != b"\x7fELF" || code[4] != 2 || code[5] != 1 {
        return Err(dev_err("code object: not a 64-bit little-endian ELF"));
    }
    let machine = u16_at(code, 18)?;
    if machine != EM_AMDGPU {
        return Err(dev_err(format!(
            "code object: machine {machine:#x}, not AMDGPU ({EM_AMDGPU:#x})"
        )));
    }
    let mach = (u32_at(code, 48)? & 0xff) as u8;
    let shoff = u64_at(code, 40)?;
    let shentsize = usize::from(u16_at(code, 58)?);
    let shnum = usize::from(u16_at(code, 60)?);
    if shentsize < 64 {
        return Err(dev_err("code object: bad section header size"));
    }
    let section = |i: usize| -> Result<(u32, usize, usize, u32, usize)> {
        let h = i
            .checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or_else(|| dev_err("code object: section header out of range"))?;
        // (type, offset, size, link, entsize)
        Ok((
            u32_at(code, h + 4)?,
            u64_at(code, h + 24)?,
            u64_at(code, h + 32)?,
            u32_at(code, h + 40)?,
            u64_at(code, h + 56)?,
        ))
    };
    let mut kernels = Vec::new();
    for i in 0..shnum {
        let (ty, off, size, link, entsize) = section(i)?;
        // SHT_SYMTAB (2) or SHT_DYNSYM (11).
        if ty != 2 && ty != 11 {
            continue;
        }
        if entsize < 24 {
            return Err(dev_err("code object: bad symbol entry size"));
        }
        let (_, stroff, strsize, _, _) = section(link as usize)?;
        let strtab = stroff
            .checked_add(strsize)
            .and_then(|end| code.get(stroff..end))
            .ok_or_else(|| dev_err("code object: string table out of range"))?;
        for k in 0..size / entsize {
            let at = off + k * entsize;
            let name_off = u32_at(code, at)? as usize;
            let name = strtab
                .get(name_off..)
                .map(|s| &s[..s.iter().position(|&c| c == 0).unwrap_or(s.len())])
                .ok_or_else(|| dev_err("code object: symbol name out of range"))?;
            if let Some(k) = std::str::from_utf8(name)
                .ok()
                .and_then(|n| n.strip_suffix(".kd"))
            {
                kernels.push(k.to_string());
            }
        }
    }
    kernels.sort();
    kernels.dedup();
    Ok(CodeObject {
        wavefront_sizes: wavefront_sizes(code),
        mach,
        gfx: MACHS.iter().find(|(m, _)| *m == mach).map(|(_, g)| *g),
        kernels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse(b"").is_err());
        assert!(parse(b"\x7fELF").is_err());
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[18] = 0x3e; // x86-64
        assert!(parse(&h).is_err());
        h[18] = 0xe0;
        h[19] = 0;
        h[48] = 0x3f;
        h[58] = 64; // shentsize
        h[60] = 3; // three sections past the end
        h[40] = 64; // shoff
        assert!(parse(&h).is_err());
        h[60] = 0;
        let co = parse(&h).expect("a header without sections");
        assert_eq!(co.gfx, Some("gfx90a"));
        assert!(co.kernels.is_empty());
        assert!(co.wavefront_sizes.is_empty());
        let mut m = h.clone();
        m.extend_from_slice(b"\xae.wavefront_size\x40\xae.wavefront_size\x20");
        assert_eq!(parse(&m).expect("parses").wavefront_sizes, vec![64, 32]);
    }
}
