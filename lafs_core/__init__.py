"""lafs_core: Tahoe-LAFS 1.20 formats (pure, bytes in, bytes out) and, in subpackages, the grid I/O on top."""
