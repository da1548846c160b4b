//! The expert-parallel ops through `deepport op --ranks N`: dispatch,
//! combine, low-latency dispatch and low-latency combine on 2 in-process
//! ranks of `cpu`, judged against what the routing implies (computed here
//! by hand: every token row arrives exactly at the ranks owning its
//! experts, combines sum or weight them back), plus the usage errors.

// Every test needs the CPU backends.
#![cfg(feature = "cpu")]
// The expectations index ranks and tokens of ROUTING side by side.
#![allow(clippy::needless_range_loop)]

use deepport_core::tensor::{read_safetensors, write_safetensors};
use deepport_core::{DType, HostTensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_deepport");

const R: usize = 2;
const E: usize = 4;
const E_LOCAL: usize = E / R;
const N: usize = 3;
const K: usize = 2;
const HIDDEN: usize = 8;

/// Expert ids per rank, `[N, K]`: rank 0 owns experts 0 and 1, rank 1
/// experts 2 and 3. Rank 0's token 2 goes nowhere.
const ROUTING: [[[i64; K]; N]; R] = [[[0, 3], [1, -1], [-1, -1]], [[2, 3], [1, 2], [0, -1]]];

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deepport-op-ep-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn deepport(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run deepport")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(path: &Path, tensors: Vec<(String, HostTensor)>) {
    let m: BTreeMap<String, HostTensor> = tensors.into_iter().collect();
    write_safetensors(path, &m, &BTreeMap::new()).unwrap();
}

/// Row `t` of rank `r`: small integers (≤ 15), exact in bf16 also after
/// the combines' sums and power-of-two weights.
fn row(r: usize, t: usize) -> Vec<f32> {
    (0..HIDDEN)
        .map(|c| ((r * 5 + t * 3 + c) % 15 + 1) as f32)
        .collect()
}

/// 0.5 for the first routed expert of a token, 0.25 for the second, 0
/// where none.
fn weights(r: usize) -> Vec<f32> {
    ROUTING[r]
        .iter()
        .flat_map(|e| {
            [
                if e[0] >= 0 { 0.5 } else { 0.0 },
                if e[1] >= 0 { 0.25 } else { 0.0 },
            ]
        })
        .collect()
}

fn owner(e: i64) -> usize {
    e as usize / E_LOCAL
}

/// The per-rank inputs of a dispatch: `r{rank}.x` (bf16),
/// `r{rank}.topk_idx`, `r{rank}.topk_weights`.
fn dispatch_inputs() -> Vec<(String, HostTensor)> {
    let mut v = Vec::new();
    for r in 0..R {
        let x: Vec<f32> = (0..N).flat_map(|t| row(r, t)).collect();
        let idx: Vec<i64> = ROUTING[r].iter().flatten().copied().collect();
        v.push((
            format!("r{r}.x"),
            HostTensor::from_f32(DType::BF16, &[N, HIDDEN], &x),
        ));
        v.push((
            format!("r{r}.topk_idx"),
            HostTensor::from_i64(&[N, K], &idx),
        ));
        v.push((
            format!("r{r}.topk_weights"),
            HostTensor::from_f32(DType::F32, &[N, K], &weights(r)),
        ));
    }
    v
}

fn run_op(op: &str, inp: &Path, out: &Path, params: &[&str]) -> BTreeMap<String, HostTensor> {
    let mut args = vec![
        "op",
        op,
        "--backend",
        "cpu",
        "--ranks",
        "2",
        "-i",
        inp.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    for p in params {
        args.extend(["-p", p]);
    }
    let o = deepport(&args);
    assert!(o.status.success(), "{op}: {}", stderr(&o));
    let f = read_safetensors(out).unwrap();
    assert_eq!(f.metadata["op"], op);
    assert_eq!(f.metadata["ranks"], "2");
    f.tensors
}

#[test]
fn dispatch_and_combine_conserve_every_row() {
    let dir = scratch("normal");
    let (inp, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    write(&inp, dispatch_inputs());
    let got = run_op("dispatch", &inp, &out, &["num_experts=4"]);

    for q in 0..R {
        // What rank q must receive: (source rank, token) pairs in source
        // rank order, token order, for tokens with an expert on q.
        let mut src = Vec::new();
        let mut rows = Vec::new();
        let mut local_idx = Vec::new();
        let mut local_w = Vec::new();
        let mut per_expert = [0i64; E_LOCAL];
        for r in 0..R {
            let w = weights(r);
            for t in 0..N {
                let mine: Vec<bool> = ROUTING[r][t]
                    .iter()
                    .map(|&e| e >= 0 && owner(e) == q)
                    .collect();
                if !mine.contains(&true) {
                    continue;
                }
                src.extend([r as i64, t as i64]);
                rows.extend(row(r, t));
                for j in 0..K {
                    let e = ROUTING[r][t][j];
                    if mine[j] {
                        let l = e as usize - q * E_LOCAL;
                        local_idx.push(l as i64);
                        local_w.push(w[t * K + j]);
                        per_expert[l] += 1;
                    } else {
                        local_idx.push(-1);
                        local_w.push(0.0);
                    }
                }
            }
        }
        let n = src.len() / 2;
        let t = |name: &str| &got[&format!("r{q}.{name}")];
        assert_eq!(t("recv_src").to_i64_vec(), src, "rank {q}");
        assert_eq!(t("recv_x").dtype(), DType::BF16);
        assert_eq!(t("recv_x").shape(), &[n, HIDDEN]);
        assert_eq!(t("recv_x").to_f32_vec(), rows, "rank {q}");
        assert_eq!(t("recv_topk_idx").to_i64_vec(), local_idx, "rank {q}");
        assert_eq!(t("recv_topk_weights").to_f32_vec(), local_w, "rank {q}");
        assert_eq!(
            t("num_recv_tokens_per_expert").to_i64_vec(),
            per_expert.to_vec(),
            "rank {q}"
        );
        assert!(!got.contains_key(&format!("r{q}.recv_scales")));
    }

    // Combine the received rows as they are (an identity expert): each
    // token comes back as its row times the number of ranks that got it.
    let mut cin = Vec::new();
    for q in 0..R {
        cin.push((format!("r{q}.x"), got[&format!("r{q}.recv_x")].clone()));
        let idx: Vec<i64> = ROUTING[q].iter().flatten().copied().collect();
        cin.push((
            format!("r{q}.topk_idx"),
            HostTensor::from_i64(&[N, K], &idx),
        ));
    }
    let cinp = dir.join("combine_in.safetensors");
    write(&cinp, cin);
    let back = run_op("combine", &cinp, &out, &["num_experts=4"]);
    for r in 0..R {
        let mut want = Vec::new();
        for t in 0..N {
            let mut ranks: Vec<usize> = ROUTING[r][t]
                .iter()
                .filter(|&&e| e >= 0)
                .map(|&e| owner(e))
                .collect();
            ranks.dedup();
            want.extend(row(r, t).iter().map(|v| v * ranks.len() as f32));
        }
        let o = &back[&format!("r{r}.out")];
        assert_eq!((o.dtype(), o.shape()), (DType::BF16, &[N, HIDDEN][..]));
        assert_eq!(o.to_f32_vec(), want, "rank {r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn low_latency_dispatch_and_combine_conserve_every_pair() {
    let dir = scratch("low_latency");
    let (inp, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    write(&inp, dispatch_inputs());
    let max_tokens = 4;
    let slots = max_tokens * R;
    let got = run_op(
        "low-latency-dispatch",
        &inp,
        &out,
        &["num_experts=4", "max_tokens_per_rank=4"],
    );
    for q in 0..R {
        let x = &got[&format!("r{q}.recv_x")];
        assert_eq!(x.shape(), &[E_LOCAL, slots, HIDDEN]);
        let xv = x.to_f32_vec();
        let counts = got[&format!("r{q}.recv_count")].to_i64_vec();
        for l in 0..E_LOCAL {
            let e = (q * E_LOCAL + l) as i64;
            // Every (token, expert) pair for this expert, as rows; slot
            // order is not defined, so compare sorted.
            let mut want: Vec<Vec<f32>> = Vec::new();
            for r in 0..R {
                for t in 0..N {
                    if ROUTING[r][t].contains(&e) {
                        want.push(row(r, t));
                    }
                }
            }
            assert_eq!(counts[l], want.len() as i64, "rank {q}, expert {l}");
            let mut have: Vec<Vec<f32>> = (0..want.len())
                .map(|j| xv[(l * slots + j) * HIDDEN..(l * slots + j + 1) * HIDDEN].to_vec())
                .collect();
            let key = |v: &Vec<f32>| v.iter().map(|x| *x as i64).collect::<Vec<_>>();
            want.sort_by_key(key);
            have.sort_by_key(key);
            assert_eq!(have, want, "rank {q}, expert {l}");
        }
    }

    // Combine the slots as they are (identity experts): token t comes back
    // as its row times the sum of its weights.
    let mut cin = Vec::new();
    for q in 0..R {
        cin.push((format!("r{q}.x"), got[&format!("r{q}.recv_x")].clone()));
        let idx: Vec<i64> = ROUTING[q].iter().flatten().copied().collect();
        cin.push((
            format!("r{q}.topk_idx"),
            HostTensor::from_i64(&[N, K], &idx),
        ));
        cin.push((
            format!("r{q}.topk_weights"),
            HostTensor::from_f32(DType::F32, &[N, K], &weights(q)),
        ));
    }
    let cinp = dir.join("combine_in.safetensors");
    write(&cinp, cin);
    let back = run_op("low-latency-combine", &cinp, &out, &[]);
    for r in 0..R {
        let w = weights(r);
        let want: Vec<f32> = (0..N)
            .flat_map(|t| {
                let s = w[t * K] + w[t * K + 1];
                row(r, t).into_iter().map(move |v| v * s)
            })
            .collect();
        let o = &back[&format!("r{r}.out")];
        assert_eq!(o.shape(), &[N, HIDDEN]);
        assert_eq!(o.to_f32_vec(), want, "rank {r}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ep_usage_errors_exit_2_and_name_the_problem() {
    let dir = scratch("usage");
    let (inp, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let (i, o_) = (inp.to_str().unwrap(), out.to_str().unwrap());
    write(&inp, dispatch_inputs());

    // Three ranks: the file has no r2.* tensors.
    let o = deepport(&[
        "op",
        "dispatch",
        "--ranks",
        "3",
        "-i",
        i,
        "-o",
        o_,
        "-p",
        "num_experts=6",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("`r2.x`"), "{}", stderr(&o));

    // Experts that do not divide over the ranks.
    let o = deepport(&[
        "op",
        "dispatch",
        "--ranks",
        "2",
        "-i",
        i,
        "-o",
        o_,
        "-p",
        "num_experts=5",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("num_experts"), "{}", stderr(&o));

    // A local op on several ranks.
    let o = deepport(&["op", "add", "--ranks", "2", "-i", i, "-o", o_]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--ranks"), "{}", stderr(&o));

    // A shape the op rejects, on rank 1: the error names the rank.
    let mut bad = dispatch_inputs();
    for (n, t) in bad.iter_mut() {
        if n == "r1.topk_weights" {
            *t = HostTensor::from_f32(DType::F32, &[N, 1], &[0.5; N]);
        }
    }
    write(&inp, bad);
    let o = deepport(&[
        "op",
        "dispatch",
        "--ranks",
        "2",
        "-i",
        i,
        "-o",
        o_,
        "-p",
        "num_experts=4",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("rank 1") && e.contains("topk_weights"), "{e}");

    // An expert id out of range is the op failing on that rank: exit 1.
    let mut bad = dispatch_inputs();
    for (n, t) in bad.iter_mut() {
        if n == "r0.topk_idx" {
            *t = HostTensor::from_i64(&[N, K], &[0, 9, 1, -1, -1, -1]);
        }
    }
    write(&inp, bad);
    let o = deepport(&[
        "op",
        "dispatch",
        "--ranks",
        "2",
        "-i",
        i,
        "-o",
        o_,
        "-p",
        "num_experts=4",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("rank 0"), "{}", stderr(&o));
    assert!(!out.exists(), "no output on error");
    let _ = std::fs::remove_dir_all(&dir);
}
