//! A waiver file (YAML): waivers, or an error naming a line.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = deepport_conformance::suite::waivers::Waivers::parse(
            text,
            std::path::Path::new("waivers.yaml"),
        );
    }
});
