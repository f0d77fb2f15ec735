"""The grid side of lafs_core: node directories, storage clients, server selection, upload and download."""
