//! A catalogue case file (YAML): expanded into cases, or an error naming a
//! line; no grid may expand beyond what a catalogue can hold. The first
//! byte picks the family the file claims to be (the file stem must match).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let families = deepport_conformance::cases::FAMILIES;
    let fam = families[pick as usize % families.len()];
    if let Ok(text) = std::str::from_utf8(rest) {
        let path = std::path::PathBuf::from(format!("{}.yaml", fam.name));
        if let Ok(specs) = deepport_conformance::suite::catalogue::parse_file(&path, text) {
            // Size estimates of whatever the file declares never overflow.
            for (s, _, _) in &specs {
                let _ = deepport_conformance::suite::catalogue::size::estimate(s);
            }
        }
    }
});
