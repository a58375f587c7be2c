//! Paged keys and values (vLLM's and flash-attn's block tables): a cache of fixed-size blocks
//! shared by every sequence, and per sequence a row of the table listing its blocks in order.
//!
//! A paged view ([`Strided::paged`](crate::Strided::paged)) keeps the strides of the physical
//! cache `(blocks, H, block_size, D)` and answers for logical rows `(b, h, n)`: row `n` of
//! batch entry `b` lives in block `table[b · per_batch + n / block_size]`, at row
//! `n % block_size`. So the kernels read every key where it is stored, with no gather copy;
//! what walks several rows from one pointer stops at a block's end ([`Pages::run`]).
//!
//! Table entries past a sequence's last block may hold anything (`-1` as vLLM pads them):
//! only the entries of the keys a call reads are checked ([`Pages::check_keys`]), before any
//! kernel runs, so an address is never made from an unchecked one.

use crate::error::{ensure_shape, Error, Result};

/// The block table of a paged view.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pages<'a> {
    /// Physical block ids, `per_row` per table row, the rows of one batch entry after another.
    table: &'a [i32],
    /// Entries per table row (for messages: the caller's `max_blocks_per_seq`).
    per_row: usize,
    /// Entries per batch entry of the logical view (several rows when one batch entry holds
    /// several sequences one after another, as packed queries do).
    per_batch: usize,
    /// Tokens per block.
    pub block: usize,
    /// Physical blocks in the cache.
    pub blocks: usize,
}

impl<'a> Pages<'a> {
    /// The table `table` of rows of `per_row` entries over `blocks` blocks of `block` tokens,
    /// its rows split evenly among `batch` batch entries. Returns it with the logical number
    /// of tokens per batch entry.
    pub(crate) fn new(
        name: &str,
        table: &'a [i32],
        per_row: usize,
        batch: usize,
        block: usize,
        blocks: usize,
    ) -> Result<(Pages<'a>, usize)> {
        ensure_shape!(block >= 1, "{name}: the block size must be at least 1");
        let rows = table.len().checked_div(per_row).unwrap_or(0);
        ensure_shape!(
            rows * per_row == table.len(),
            "block_table: {} entries do not make rows of {per_row}",
            table.len()
        );
        ensure_shape!(
            (batch == 0 && rows == 0) || (batch >= 1 && rows.is_multiple_of(batch)),
            "block_table: {rows} rows do not split evenly among a batch of {batch}"
        );
        let per_batch = rows.checked_div(batch).map_or(per_row, |r| r * per_row);
        let tokens = per_batch.checked_mul(block).filter(|&n| n <= isize::MAX as usize).ok_or_else(|| {
            Error::Shape(format!("{name}: {per_batch} blocks of {block} tokens are too many to count"))
        })?;
        Ok((Pages { table, per_row, per_batch, block, blocks }, tokens))
    }

    /// The physical block and the row inside it of logical row `n` of batch entry `b`.
    ///
    /// The entry must have been checked ([`Pages::check_keys`]); an unchecked one gives a
    /// meaningless (but not undefined) block.
    #[inline(always)]
    pub(crate) fn locate(&self, b: usize, n: usize) -> (usize, usize) {
        let entry = self.table.get(b * self.per_batch + n / self.block).copied().unwrap_or(-1);
        (entry as usize, n % self.block)
    }

    /// How many rows from logical row `n` on lie one after another in memory: up to the end
    /// of `n`'s block.
    #[inline(always)]
    pub(crate) fn run(&self, n: usize) -> usize {
        self.block - n % self.block
    }

    /// Checks that the blocks holding rows `n0..n1` of batch entry `b` are blocks of the
    /// cache; refuses naming `block_table` and the entry otherwise.
    pub(crate) fn check_keys(&self, b: usize, n0: usize, n1: usize) -> Result<()> {
        if n0 >= n1 {
            return Ok(());
        }
        let first = b * self.per_batch + n0 / self.block;
        let last = b * self.per_batch + (n1 - 1) / self.block;
        ensure_shape!(
            last < self.table.len() && n1 <= self.per_batch * self.block,
            "block_table: rows {n0}..{n1} of batch entry {b} lie past its {} blocks",
            self.per_batch
        );
        for (i, &id) in self.table[first..=last].iter().enumerate() {
            if id < 0 || id as usize >= self.blocks {
                let at = first + i;
                return Err(Error::Value(format!(
                    "block_table[{}, {}] = {id} is not a block of the cache (0 <= id < {})",
                    at / self.per_row.max(1),
                    at % self.per_row.max(1),
                    self.blocks
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_map_through_the_table() {
        let table = [3, 0, -1, 1, 2, 7];
        let (p, n) = Pages::new("k", &table, 3, 2, 4, 4).unwrap();
        assert_eq!(n, 12);
        assert_eq!(p.locate(0, 0), (3, 0));
        assert_eq!(p.locate(0, 5), (0, 1));
        assert_eq!(p.locate(1, 7), (2, 3));
        assert_eq!((p.run(5), p.run(8)), (3, 4));
        p.check_keys(0, 0, 8).unwrap();
        assert!(p.check_keys(0, 0, 9).unwrap_err().to_string().contains("block_table[0, 2] = -1"));
        assert!(p.check_keys(1, 4, 12).unwrap_err().to_string().contains("block_table[1, 2] = 7"));
        assert!(p.check_keys(1, 0, 13).is_err());
        p.check_keys(1, 3, 3).unwrap();
    }

    #[test]
    fn one_batch_entry_holds_every_row() {
        let table = [0, 1, 2, 3];
        let (p, n) = Pages::new("k", &table, 2, 1, 16, 4).unwrap();
        assert_eq!(n, 64);
        assert_eq!(p.locate(0, 33), (2, 1));
        assert!(Pages::new("k", &table, 3, 1, 16, 4).is_err());
        assert!(Pages::new("k", &table, 2, 3, 16, 4).is_err());
        assert!(Pages::new("k", &table, 2, 1, 0, 4).is_err());
    }
}
