//! Every op declared in core (`deepport_core::for_each_local_op!` and
//! `for_each_ep_op!`) is reachable everywhere it must be: `cpu-ref` runs it
//! (never `NotSupported`), the catalogue exercises it, and `deepport op`
//! has an entry for it whose tensors and parameters are the declaration's
//! (the expert-parallel ops on `--ranks N`), and the expert-parallel ones
//! run there on 2 ranks.

use deepport_conformance::cases;
use deepport_conformance::opspec;
use deepport_conformance::suite::catalogue;
use deepport_core::ops::OpKind;
use deepport_core::Backend;
use deepport_cpu::CpuRef;

#[test]
fn every_declared_op_is_in_the_op_command() {
    for k in OpKind::ALL {
        let spec =
            opspec::find(k.name()).unwrap_or_else(|| panic!("`deepport op` has no entry for {k}"));
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
        assert_eq!(
            spec.params.iter().map(|p| p.name).collect::<Vec<_>>(),
            d.params.iter().map(|p| p.name).collect::<Vec<_>>()
        );
        // The expert-parallel ops run on ranks; only a combine reads more
        // than its declaration (the routing that rebuilds its dispatch's
        // handle), and no extra name shadows a declared one.
        assert_eq!(spec.on_ranks(), !k.is_local(), "{k}");
        if k != OpKind::Combine {
            assert!(
                spec.handle_inputs.is_empty() && spec.handle_params.is_empty(),
                "{k}"
            );
        }
        for t in spec.handle_inputs {
            assert!(!d.inputs().any(|i| i.name == t.name), "{k}.{}", t.name);
        }
        for p in spec.handle_params {
            assert!(!d.params.iter().any(|q| q.name == p.name), "{k}.{}", p.name);
        }
        assert!(
            opspec::help_table().contains(&format!("\n  {}  ", k.cli_name())),
            "{k} is missing from `deepport op --help`"
        );
    }
}

/// Every expert-parallel op runs through `deepport op`'s path on 2 ranks
/// of `cpu-ref` and gives each declared required output on every rank.
#[test]
fn every_ep_op_runs_on_two_ranks() {
    use deepport_conformance::opspec::{rank_name, Inputs, Params};
    use deepport_core::{DType, HostTensor};
    use std::collections::BTreeMap;
    // Rank r's tokens go to experts 0 and 3 (one on each rank).
    let mut t = BTreeMap::new();
    for r in 0..2 {
        t.insert(
            rank_name(r, "x"),
            HostTensor::from_f32(DType::BF16, &[2, 4], &[1.0; 8]),
        );
        t.insert(
            rank_name(r, "topk_idx"),
            HostTensor::from_i64(&[2, 2], &[0, 3, 3, 0]),
        );
        t.insert(
            rank_name(r, "topk_weights"),
            HostTensor::from_f32(DType::F32, &[2, 2], &[0.5; 4]),
        );
    }
    for k in OpKind::ALL.into_iter().filter(|k| !k.is_local()) {
        let spec = opspec::find(k.name()).unwrap();
        let mut tensors = t.clone();
        if k == OpKind::Combine {
            // Each rank receives both tokens of both ranks: 4 rows.
            for r in 0..2 {
                tensors.insert(
                    rank_name(r, "x"),
                    HostTensor::from_f32(DType::BF16, &[4, 4], &[1.0; 16]),
                );
            }
        }
        if k == OpKind::LowLatencyCombine {
            // [E_local = 2, max_tokens·R = 4, hidden = 4].
            for r in 0..2 {
                tensors.insert(
                    rank_name(r, "x"),
                    HostTensor::from_f32(DType::BF16, &[2, 4, 4], &[1.0; 32]),
                );
            }
        }
        let inputs = Inputs::new("test", spec.name, tensors);
        inputs.check_present(spec, 2).unwrap();
        let mut params = Params::parse(
            spec,
            &match k {
                OpKind::LowLatencyCombine => vec![],
                OpKind::LowLatencyDispatch => {
                    vec!["num_experts=4".into(), "max_tokens_per_rank=2".into()]
                }
                _ => vec!["num_experts=4".into()],
            },
        )
        .unwrap();
        let out = opspec::run_on_ranks(spec, &CpuRef, &inputs, &mut params, 2)
            .unwrap_or_else(|e| panic!("{k}: {e}"));
        for r in 0..2 {
            for name in k.decl().required_output_names() {
                assert!(
                    out.contains_key(&rank_name(r, name)),
                    "{k}: no {} in {:?}",
                    rank_name(r, name),
                    out.keys().collect::<Vec<_>>()
                );
            }
        }
        // A local op's runner refuses ranks, an EP op's refuses zero.
        assert!(opspec::run_on_ranks(spec, &CpuRef, &inputs, &mut params, 0).is_err());
    }
    let add = opspec::find("add").unwrap();
    let mut p = Params::parse(add, &[]).unwrap();
    let e = opspec::run_on_ranks(add, &CpuRef, &Inputs::new("t", "add", t), &mut p, 2).unwrap_err();
    assert_eq!(e.exit_code(), 2);
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
