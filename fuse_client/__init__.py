"""fuse_client: the command line, the launcher, and the thin pyfuse3 shim that forwards to grid_server."""
