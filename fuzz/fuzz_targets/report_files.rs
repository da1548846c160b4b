//! What `report merge`, `verify` and `run --resume` read: results.jsonl
//! lines and run.json.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for line in text.lines() {
            let _ = deepport_conformance::suite::report::result_from_json_line(line);
        }
        let _ = serde_json::from_str::<deepport_conformance::suite::RunInfo>(text);
        let _ = serde_json::from_str::<deepport_conformance::suite::exec::resume::RunPlan>(text);
    }
});
