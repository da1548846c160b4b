//! Every op declared in core (`deepport_core::for_each_local_op!` and
//! `for_each_ep_op!`) is reachable everywhere it must be: `cpu-ref` runs it
//! (never `NotSupported`), the catalogue exercises it, and `deepport op`
//! has an entry for it whose tensors and parameters are the declaration's.

use deepport_conformance::cases;
use deepport_conformance::opspec;
use deepport_conformance::suite::catalogue;
use deepport_core::ops::OpKind;
use deepport_core::Backend;
use deepport_cpu::CpuRef;

/// Declared ops that `deepport op` does not run yet: the expert-parallel
/// ops need a rank group (they run through the catalogue's `ep` family).
/// Shrink this list; never grow it.
const NOT_IN_OP_COMMAND_YET: &[OpKind] = &[
    OpKind::Dispatch,
    OpKind::Combine,
    OpKind::LowLatencyDispatch,
    OpKind::LowLatencyCombine,
];

#[test]
fn every_declared_op_is_in_the_op_command() {
    for k in OpKind::ALL {
        let found = opspec::find(k.name());
        if NOT_IN_OP_COMMAND_YET.contains(&k) {
            assert!(
                found.is_none(),
                "{k} is in `deepport op` now: take it off NOT_IN_OP_COMMAND_YET"
            );
            continue;
        }
        let spec = found.unwrap_or_else(|| panic!("`deepport op` has no entry for {k}"));
        assert_eq!(spec.kind, k);
        let d = k.decl();
        assert_eq!(spec.summary, d.summary);
        let names = |v: &[opspec::TensorSpec]| v.iter().map(|t| t.name).collect::<Vec<_>>();
        assert_eq!(
            names(spec.inputs),
            d.inputs().map(|t| t.name).collect::<Vec<_>>()
        );
        assert_eq!(
            names(spec.outputs),
            d.outputs().map(|t| t.name).collect::<Vec<_>>()
        );
        assert_eq!(spec.params.len(), d.params.len());
        assert!(
            opspec::help_table().contains(&format!("\n  {}  ", k.cli_name())),
            "{k} is missing from `deepport op --help`"
        );
    }
}

#[test]
fn every_declared_op_is_in_the_catalogue_and_runs_on_cpu_ref() {
    let all = catalogue::load(&catalogue::default_dir()).expect("the catalogue loads");
    let smoke = catalogue::select(&all, "smoke", None);
    for k in OpKind::ALL {
        // The smallest smoke case that exercises the op (golden cases read
        // files; generated ones are cheapest).
        let spec = smoke
            .iter()
            .filter(|s| catalogue::ops(s).contains(&k))
            .min_by_key(|s| (s.family == "golden_ops" || s.family == "model", s.id.len()))
            .unwrap_or_else(|| panic!("no smoke case of the catalogue exercises {k}"));
        let case = cases::build(spec).unwrap_or_else(|e| panic!("{}: {e}", spec.id));
        match (case.run)(&CpuRef) {
            Ok(out) => assert!(!out.is_empty(), "{}: cpu-ref gave no outputs", spec.id),
            Err(e) => {
                let not_supported = matches!(
                    &e,
                    deepport_conformance::CliError::Failed(err) if err.is_not_supported()
                );
                assert!(!not_supported, "cpu-ref does not run {k}: {e}");
                panic!("{}: cpu-ref failed: {e}", spec.id);
            }
        }
        assert!(CpuRef.supports(k, &[]).is_supported());
    }
}

#[test]
fn declarations_are_consistent() {
    for k in OpKind::ALL {
        let d = k.decl();
        assert_eq!(d.kind, k);
        assert_eq!(d.name(), k.name());
        assert!(!d.summary.is_empty(), "{k}: no summary");
        assert!(d.outputs().next().is_some(), "{k} declares no output");
        let mut seen = std::collections::BTreeSet::new();
        for t in d.tensors {
            assert!(!t.dtypes.is_empty(), "{k}.{}: no dtypes", t.name);
            assert!(!t.doc.is_empty(), "{k}.{}: no doc", t.name);
            assert!(
                seen.insert((t.name, t.is_output())),
                "{k}: {} declared twice in one role",
                t.name
            );
        }
        let mut params = std::collections::BTreeSet::new();
        for p in d.params {
            assert!(params.insert(p.name), "{k}: parameter {} twice", p.name);
            assert!(!p.help.is_empty(), "{k}.{}: no help", p.name);
        }
    }
}
