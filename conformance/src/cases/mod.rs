//! The built-in cases of `deepport run`: small, deterministic inputs (from
//! [`crate::rng::Rng`]) with the adversarial features of DeepSeek's own tests
//! — partial 128-blocks, NaN in cache slots that must not be read, permuted
//! block tables, padding rows, near-zero and saturating values — run on the
//! backend under test and on `cpu-ref`, and judged with the metrics of
//! SPEC.md ([`crate::judge`]).
//!
//! Until the conformance suite's YAML catalogue replaces them, these cases are
//! the catalogue. Case ids are canonical (`op(key=value,…)`).

mod ep;
mod local;

use crate::judge::Check;
use crate::opspec::{CliResult, Outputs};
use deepport_core::backend::Backend;
use deepport_core::ops::OpKind;

/// Runs a case on one backend and returns its named outputs.
pub type RunFn = Box<dyn Fn(&dyn Backend) -> CliResult<Outputs> + Send + Sync>;
/// Judges the outputs of the backend under test (first) against the
/// reference's (second).
pub type JudgeFn = Box<dyn Fn(&Outputs, &Outputs) -> Vec<Check> + Send + Sync>;

/// One built-in case.
pub struct Case {
    /// Canonical id, e.g. `fp8_gemm(m=37,n=576,k=256,out=bf16)`.
    pub id: String,
    /// The ops the case runs (the first names the case).
    pub ops: Vec<OpKind>,
    pub run: RunFn,
    pub judge: JudgeFn,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Case({})", self.id)
    }
}

/// Every built-in case, in a stable order.
pub fn builtin() -> Vec<Case> {
    let mut v = local::cases();
    v.extend(ep::cases());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_every_op_is_covered() {
        let cases = builtin();
        let mut ids = std::collections::BTreeSet::new();
        for c in &cases {
            assert!(ids.insert(c.id.clone()), "duplicate case id {}", c.id);
            assert!(c.id.starts_with(c.ops[0].name()), "{} vs {:?}", c.id, c.ops);
        }
        for k in OpKind::ALL {
            assert!(
                cases.iter().any(|c| c.ops.contains(&k)),
                "no case covers {}",
                k.name()
            );
        }
    }
}
