"""Encoding streams: a 1 GiB file goes through with peak RSS far below its size."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import hashlib, re
from lafs_core.immutable.encode import ChkEncoder, convergent_key
from lafs_core.immutable.params import ChkParameters

SIZE = 1024 ** 3
CHUNK = 256 * 1024

def chunks():
    # Cheap, non-repeating pseudo-random data: a SHA-256 counter stream expanded to the chunk size.
    for i in range(SIZE // CHUNK):
        seed = hashlib.sha256(b"%d" % i).digest()
        yield seed * (CHUNK // 32)

params = ChkParameters.for_size(SIZE)
encoder = ChkEncoder(convergent_key(chunks(), b"secret", params), params)
written = 0
for chunk in chunks():
    for write in encoder.write(chunk):
        written += sum(len(d) for d in write.data)
for write in encoder.finish():
    written += sum(len(d) for d in write.data)
assert written == 10 * encoder.share_size, (written, encoder.share_size)
# VmHWM is this process's own peak; ru_maxrss would include the parent's RSS inherited across fork + exec.
peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read())[1])
print(peak_kb // 1024, str(encoder.cap))
"""


@pytest.mark.slow
def test_encoding_one_gib_stays_under_200_mb():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    peak_mb, cap = result.stdout.split()
    assert cap.startswith("URI:CHK:") and cap.endswith(f":3:10:{1024**3}")
    assert int(peak_mb) < 200, f"peak RSS {peak_mb} MB"
