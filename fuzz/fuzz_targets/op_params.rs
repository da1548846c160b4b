//! `deepport op NAME --param k=v ...`: the first byte picks the op, the
//! rest are `k=v` lines.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let ops: &[_] = &deepport_conformance::opspec::OPS;
    let spec = &ops[pick as usize % ops.len()];
    if let Ok(text) = std::str::from_utf8(rest) {
        let args: Vec<String> = text.lines().map(str::to_string).collect();
        let _ = deepport_conformance::opspec::Params::parse(spec, &args);
    }
});
