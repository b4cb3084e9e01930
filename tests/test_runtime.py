"""rdrop.runtime's reading of /proc/cpuinfo, which picks MKL's kernels and names the CPU-kernel builds."""

import os
import re

from rdrop import runtime

import pytest

pytestmark = pytest.mark.skipif(not os.path.isfile("/proc/cpuinfo"), reason="needs Linux's /proc/cpuinfo")


def test_cpu_info_reads_the_first_cpus_fields():
    text = open("/proc/cpuinfo", encoding="utf-8").read()
    for field in ("processor", "vendor_id", "model name"):
        match = re.search(rf"^{field}\s*:\s*(.*?)\s*$", text, re.MULTILINE)
        if match:
            assert runtime.cpu_info(field) == match.group(1), field
    assert runtime.cpu_info("processor") == "0"
    assert runtime.cpu_info("no such field") == ""
