//! Windows over the device's storage binding limit (Vulkan's
//! `maxStorageBufferRange`, WebGPU's `max_storage_buffer_binding_size`):
//! how to split work so that every bound range fits one binding and starts
//! at an aligned offset. Pure arithmetic; the backends turn `None` into
//! `NotSupported` naming the op.

/// Splits `rows` rows into chunks `[r0, r1)` such that, for every operand
/// with `row_bytes[i]` bytes per row, the rows of a chunk fit one binding of
/// `limit` bytes (less 4 bytes of padding for 16-bit tails) and start at a
/// multiple of `align` (a power of two). One chunk when everything fits;
/// `None` when one row alone (times the alignment granule) is too large.
pub fn plan_rows(
    rows: usize,
    row_bytes: &[u64],
    limit: u64,
    align: u64,
) -> Option<Vec<(usize, usize)>> {
    if rows == 0 {
        return Some(Vec::new());
    }
    let max_rb = row_bytes.iter().copied().max().unwrap_or(0).max(1);
    let usable = limit.saturating_sub(4);
    if rows as u64 * max_rb <= usable {
        return Some(vec![(0, rows)]);
    }
    // Chunk starts r0 must make r0·rb a multiple of `align` for every
    // operand: a multiple of align / gcd(align, rb) (powers of two).
    let granule = row_bytes
        .iter()
        .map(|&rb| {
            let tz = rb.trailing_zeros().min(align.trailing_zeros());
            align >> tz
        })
        .max()
        .unwrap_or(1)
        .max(1);
    let per = (usable / max_rb) / granule * granule;
    if per == 0 {
        return None;
    }
    let per = per as usize;
    Some(
        (0..rows.div_ceil(per))
            .map(|c| (c * per, ((c + 1) * per).min(rows)))
            .collect(),
    )
}

/// How many whole groups of `unit` bytes (the largest per-group share of
/// any windowed operand) one binding of `limit` bytes holds, out of
/// `groups`: all of them when they fit, `None` when not even one does.
pub fn groups_per_window(groups: usize, unit: u64, limit: u64) -> Option<usize> {
    if unit.saturating_mul(groups as u64) <= limit {
        return Some(groups);
    }
    match (limit / unit.max(1)) as usize {
        0 => None,
        per => Some(per.min(groups)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_that_fit_are_one_chunk() {
        assert_eq!(plan_rows(0, &[16], 1024, 256), Some(vec![]));
        assert_eq!(plan_rows(10, &[16, 4], 1024, 256), Some(vec![(0, 10)]));
    }

    #[test]
    fn chunks_fit_the_limit_and_start_aligned() {
        let (limit, align) = (1 << 16, 256u64);
        for rb in [[12u64, 6], [100, 2], [256, 256], [4, 1]] {
            let rows = 5000;
            let chunks = plan_rows(rows, &rb, limit, align).unwrap();
            assert_eq!(chunks.first().unwrap().0, 0);
            assert_eq!(chunks.last().unwrap().1, rows);
            for w in chunks.windows(2) {
                assert_eq!(w[0].1, w[1].0, "contiguous");
            }
            for &(r0, r1) in &chunks {
                for &b in &rb {
                    assert_eq!(r0 as u64 * b % align, 0, "{rb:?}: {r0} aligned");
                    assert!((r1 - r0) as u64 * b <= limit - 4, "{rb:?}: fits");
                }
            }
        }
    }

    #[test]
    fn a_row_beyond_the_limit_has_no_plan() {
        assert_eq!(plan_rows(2, &[5000], 4096, 256), None);
        // A row fits, but not the rows between two aligned starts.
        assert_eq!(plan_rows(100, &[100, 2], 4096, 256), None);
    }

    #[test]
    fn whole_groups_per_window() {
        assert_eq!(groups_per_window(8, 100, 1000), Some(8));
        assert_eq!(groups_per_window(8, 300, 1000), Some(3));
        assert_eq!(groups_per_window(2, 300, 1000), Some(2));
        assert_eq!(groups_per_window(8, 2000, 1000), None);
        assert_eq!(groups_per_window(3, 0, 1000), Some(3));
    }
}
