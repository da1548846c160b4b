//! A checkpoint's config.json: parsed and validated, or an error.
//! (The model code may move to its own crate: then change the path below.)
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = deepport_model::config::ModelConfig::from_json(text) {
            let _ = c.validate();
        }
    }
});
