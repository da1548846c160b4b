//! Tile schedules of the GEMM family and TMA descriptor parameters.
