"""The storage-server side: Tahoe's on-disk share containers, the share store, and the GBS HTTP server."""
