//! Mutation check of the AMX GEMMs (its own test binary: the hook is
//! process-wide). With the VNNI pairs swapped — a deliberately wrong layout
//! — the comparison with `cpu-ref` must fail on both AMX paths (B packed in
//! panels for more than 128 rows, A packed for `Dᵀ = B·Aᵀ` below), and pass
//! again once the hook is off.

use deepport_core::backend::Backend;
use deepport_core::ops::{self, Fp8Gemm};
use deepport_core::{DType, HostTensor};
use deepport_cpu::fast::{amx, with_amx_kernels};
use deepport_cpu::{Cpu, CpuRef};

fn run(be: &dyn Backend, ops_in: &[HostTensor; 4], m: usize, n: usize, use_amx: bool) -> Vec<f32> {
    let t = ops_in.each_ref().map(|h| be.upload(h).unwrap());
    let mut d = be.alloc(DType::F32, &[m, n]).unwrap();
    let mut go = || {
        ops::run(
            be,
            Fp8Gemm {
                a: &t[0],
                sa: &t[1],
                b: &t[2],
                sb: &t[3],
                d: &mut d,
            },
        )
    };
    if use_amx {
        with_amx_kernels(go).unwrap().unwrap();
    } else {
        go().unwrap();
    }
    be.download(&d).unwrap().to_f32_vec()
}

/// Whether every element is within SPEC §3's f32 bound.
fn close(d: &[f32], r: &[f32]) -> bool {
    let rms = (r.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / r.len() as f64).sqrt();
    d.iter()
        .zip(r)
        .all(|(&x, &y)| ((x - y) as f64).abs() <= 1e-5 * (y as f64).abs() + 1e-5 * rms)
}

#[test]
fn swapped_vnni_pairs_are_caught() {
    if let Some(why) = amx::unavailable_reason() {
        eprintln!("swapped_vnni_pairs_are_caught: skipped, AMX not usable here ({why})");
        return;
    }
    let mut s = 12345u64;
    let mut code = || loop {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let c = (s >> 56) as u8;
        if c & 0x7f != 0x7f {
            break c;
        }
    };
    for &(m, n, k) in &[(20usize, 70usize, 256usize), (150, 70, 256)] {
        let kb = k / 128;
        let inputs = [
            HostTensor::from_bytes(DType::F8E4M3, &[m, k], (0..m * k).map(|_| code()).collect())
                .unwrap(),
            HostTensor::from_f32(DType::F32, &[m, kb], &vec![0.01; m * kb]),
            HostTensor::from_bytes(DType::F8E4M3, &[n, k], (0..n * k).map(|_| code()).collect())
                .unwrap(),
            HostTensor::from_f32(DType::F32, &[1, kb], &vec![0.02; kb]),
        ];
        let r = run(&CpuRef, &inputs, m, n, false);
        assert!(
            close(&run(&Cpu, &inputs, m, n, true), &r),
            "{m} rows: AMX path wrong without the mutant"
        );
        amx::set_vnni_mutant(true);
        let bad = run(&Cpu, &inputs, m, n, true);
        amx::set_vnni_mutant(false);
        assert!(
            !close(&bad, &r),
            "{m} rows: swapped VNNI pairs went unnoticed"
        );
        assert!(
            close(&run(&Cpu, &inputs, m, n, true), &r),
            "{m} rows: hook not reset"
        );
    }
}
