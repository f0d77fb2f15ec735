"""The walk deep-check and lease renewal use: every object reachable from a directory, each once."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from lafs_core.caps import Cap, DirectoryCap
from lafs_core.grid.directory import create_directory, linker, modify_directory
from lafs_core.grid.traverse import walk
from lafs_core.grid.upload import bytes_chunks, upload_immutable

from .grid_helpers import local_grid


def test_walk_yields_each_object_once_even_in_a_loop(tmp_path: Path) -> None:
    grid = local_grid(tmp_path)

    async def build() -> tuple[DirectoryCap, list[Cap]]:
        root = await create_directory(grid)
        sub = await create_directory(grid)
        big = await upload_immutable(grid, 5000, bytes_chunks(os.urandom(5000)))
        small = await upload_immutable(grid, 3, bytes_chunks(b"abc"))
        for name, cap in [("sub", sub), ("big", big), ("small", small), ("big-again", big)]:
            await modify_directory(grid, root, linker(name, cap, replace_files=False))
        await modify_directory(grid, sub, linker("up", root, replace_files=False))  # a loop: sub/up is the root
        await modify_directory(grid, sub, linker("root-readonly", root.readonly(), replace_files=False))
        return root, [root, sub, big, small]

    root, objects = trio.run(build)

    async def collect() -> list[tuple[tuple[str, ...], Cap]]:
        return [item async for item in walk(grid, root)]

    walked = trio.run(collect)
    assert sorted(str(cap) for _path, cap in walked) == sorted(str(cap) for cap in objects)
    assert walked[0] == ((), root)
    assert {path for path, _cap in walked} == {(), ("sub",), ("big",), ("small",)}
