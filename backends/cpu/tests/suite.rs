//! The generic backend suite (`deepport-testkit`) for `cpu`: every op
//! against `cpu-ref` on small adversarial inputs, index errors, poisoned
//! slots, expert parallelism on 2 and 4 ranks. (`cpu-ref` is the oracle;
//! running the suite on it would compare it with itself.)

use deepport_core::backend::Backend;

deepport_testkit::backend_suite!("cpu", |_rank| Ok(
    Box::new(deepport_cpu::Cpu) as Box<dyn Backend>
));
