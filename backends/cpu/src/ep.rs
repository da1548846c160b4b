//! Expert-parallel reference ops (placeholder until written).
use deepport_core::backend::Backend;
use deepport_core::comm::Communicator;
use deepport_core::ops::*;
use deepport_core::Result;

pub(crate) fn get_dispatch_layout(_op: &mut Checked<GetDispatchLayout<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "get_dispatch_layout",
        "being written",
    ))
}
pub(crate) fn dispatch(
    _b: &dyn Backend,
    _c: &dyn Communicator,
    _op: &Checked<Dispatch<'_>>,
) -> Result<DispatchOutput> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "dispatch",
        "being written",
    ))
}
pub(crate) fn combine(_c: &dyn Communicator, _op: &mut Checked<Combine<'_>>) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "combine",
        "being written",
    ))
}
pub(crate) fn low_latency_dispatch(
    _b: &dyn Backend,
    _c: &dyn Communicator,
    _op: &Checked<LowLatencyDispatch<'_>>,
) -> Result<LowLatencyDispatchOutput> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "low_latency_dispatch",
        "being written",
    ))
}
pub(crate) fn low_latency_combine(
    _c: &dyn Communicator,
    _op: &mut Checked<LowLatencyCombine<'_>>,
) -> Result<()> {
    Err(deepport_core::Error::not_supported(
        "cpu-ref",
        "low_latency_combine",
        "being written",
    ))
}
