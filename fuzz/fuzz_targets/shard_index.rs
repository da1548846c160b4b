//! A sharded checkpoint's `model.safetensors.index.json`: parsed without
//! touching any file, or an error (never a shard name outside the directory).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let index = Path::new("model.safetensors.index.json");
        if let Ok(ix) = deepport_model::checkpoint::ShardIndex::parse(text, index) {
            for name in &ix.shard_names {
                assert_eq!(
                    Path::new(name).file_name().map(|f| f.to_str()),
                    Some(Some(name.as_str()))
                );
            }
            for (_, i) in &ix.wanted {
                assert!(*i < ix.shard_names.len());
            }
        }
    }
});
