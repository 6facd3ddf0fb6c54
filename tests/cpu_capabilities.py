"""The ATEN_CPU_CAPABILITY values this host can really run, for tests and scripts/test.sh.

torch honours a requested capability without checking the CPU: on an AVX2-only machine
ATEN_CPU_CAPABILITY=avx512 makes `get_cpu_capability()` report AVX512 and the first AVX-512
kernel then dies with an illegal instruction. So a capability counts only when torch dispatches
to it *and* the CPU has the instructions. Run as a script it prints them, one per line.
"""

from __future__ import annotations

import os
import subprocess
import sys

CANDIDATES = ("default", "avx2", "avx512")

_PROBE = """
import torch
cap = torch.backends.cpu.get_cpu_capability().lower()
has = {"default": True, "avx2": torch.cpu._is_avx2_supported(), "avx512": torch.cpu._is_avx512_supported()}
print(cap if has.get(cap, False) else "unsupported:" + cap)
"""


def offered() -> tuple[str, ...]:
    got = []
    for cap in CANDIDATES:
        r = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, "ATEN_CPU_CAPABILITY": cap},
                           capture_output=True, text=True, timeout=300)
        if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [cap]:
            got.append(cap)
    return tuple(got)


if __name__ == "__main__":
    print("\n".join(offered()))
