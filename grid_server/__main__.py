"""`python -m grid_server -d NODEDIR`: run a node directory's grid server in the foreground, for debugging.

`blackmatch mount` starts the server by itself, as a daemon; this runs the same server attached to the terminal,
logging to stderr.
"""

import argparse
import logging
import sys

from lafs_core.grid.nodedir import NodeDirectory

from .filesystem import FilesystemOptions
from .service import run_grid_server


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m grid_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--node-directory", required=True)
    parser.add_argument("--cache-size", type=int, default=FilesystemOptions.cache_size, metavar="BYTES")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_grid_server(NodeDirectory(args.node_directory), args.cache_size, lambda word: print(word, flush=True))


if __name__ == "__main__":
    sys.exit(main())
