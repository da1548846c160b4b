//! `deepport forward --tokens`: inline lists (`1,2,3`) and token files (a
//! JSON list). First byte picks which; either parses or is an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = if pick & 1 == 0 {
            deepport_conformance::forward_cmd::parse_token_list(text)
        } else {
            deepport_conformance::forward_cmd::parse_token_json(text)
        };
    }
});
