//! Split-K partitions of MLA decode (FlashMLA's metadata rules).
