//! The safetensors reader: any bytes are a file or an error, within the budget.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    deepport_core::budget::MemoryBudget::set_global(deepport_core::budget::MemoryBudget::new(
        256 << 20,
    ));
    let _ =
        deepport_core::tensor::parse_safetensors(std::path::Path::new("fuzz.safetensors"), data);
});
