"""grid_server: filesystem semantics over a grid (inodes, cache, upload queue) and the RPC daemon."""
