"""mount(8) and umount(8): the `fuse.blackmatch` helpers' reading of what mount(8) and umount(8) hand them."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuse_client.mount_helper import (
    HelperError,
    Source,
    parse_mount_helper_args,
    parse_source,
    parse_umount_helper_args,
    sort_options,
)


# --- SOURCE and options ----------------------------------------------------------------------------------------
def test_sources():
    assert parse_source("/srv/node") == Source(Path("/srv/node"))
    assert parse_source("/srv/node:backup") == Source(Path("/srv/node"), alias="backup")
    cap = "URI:DIR2:aaaa:bbbb"
    assert parse_source(f"/srv/no:de:{cap}") == Source(Path("/srv/no:de"), root_cap=cap)
    for bad in ("node:tahoe", "~/.blackmatch", "/srv/node:", "/srv/node:a/b"):
        with pytest.raises(HelperError):
            parse_source(bad)


@given(
    st.lists(st.text(st.characters(blacklist_characters=":/\0", blacklist_categories=["Cs"]), min_size=1), max_size=4),
    st.text(st.characters(blacklist_characters=":/\0", blacklist_categories=["Cs"]), min_size=1),
)
def test_any_node_directory_and_alias_come_back(parts, alias):
    node = Path("/", *parts)
    assert parse_source(f"{node}:{alias}") == Source(node, alias=alias)


def test_options_are_sorted_into_blackmatch_fuse_and_mounts_own():
    fstab_user_line = "rw,noexec,nosuid,nodev,no_split,cache_size=1G,cache_timeout=2.5,allow_other,user,_netdev,nofail"
    options = sort_options([*fstab_user_line.split(","), "x-systemd.automount", "comment=x", "defaults", "noauto"])
    assert options.arguments == ["--no-split", "--cache-size", "1G", "--cache-timeout", "2.5"]
    assert options.fuse == ["noexec", "nosuid", "nodev", "allow_other"]
    assert sort_options(["ro", "default_permissions"]).fuse == ["ro", "default_permissions"]
    assert sort_options(["frob", "ro"], sloppy=True).fuse == ["ro"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("frob", "unknown mount option 'frob'"),
        ("no_split=yes", "unknown mount option"),
        ("cache_size", "-o cache_size needs a value"),
        ("cache_size=lots", "not a size in bytes"),
        ("cache_timeout=-1", "must be a finite number"),
    ],
)
def test_bad_options_are_refused(item, message):
    with pytest.raises(HelperError, match=message):
        sort_options([item])
    if message.startswith("unknown"):  # a sloppy mount (-s) ignores what it does not know, but no bad value
        assert sort_options([item], sloppy=True) == sort_options([])
    else:
        with pytest.raises(HelperError, match=message):
            sort_options([item], sloppy=True)


def test_mount_helper_arguments_as_mount_passes_them():
    request = parse_mount_helper_args(["/n:photos", "/mnt/p", "-n", "-o", "rw,allow_other", "-o", "cache_size=8M"])
    expected = ["mount", "/mnt/p", "-d", "/n", "--alias", "photos", "--cache-size", "8M", "-o", "allow_other"]
    assert request.command == expected
    assert not request.fake
    cap = "URI:DIR2-RO:aaaa:bbbb"
    request = parse_mount_helper_args(["-f", "-v", "-t", "fuse.blackmatch", f"/n:{cap}", "/m", "-o", "no_split"])
    assert request.command == ["mount", "/m", "-d", "/n", "--root-cap", cap, "--no-split"]
    assert request.fake
    assert parse_mount_helper_args(["/n", "/m"]).command == ["mount", "/m", "-d", "/n"]
    for bad in (["/n"], ["/n", "/m", "/x"], ["/n", "/m", "-N", "4"], ["/n", "/m", "-q"]):
        with pytest.raises(HelperError):
            parse_mount_helper_args(bad)


def test_umount_helper_arguments():
    assert parse_umount_helper_args(["/m", "-t", "fuse.blackmatch"]) == ["unmount", "/m"]
    assert parse_umount_helper_args(["-l", "/m", "-v"]) == ["unmount", "/m", "--lazy"]
    with pytest.raises(HelperError):
        parse_umount_helper_args(["/m", "/n"])
