"""Pure bytes <-> records for every on-disk structure of qcow2 and qcow v1. No I/O, no state."""
