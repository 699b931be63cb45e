import subprocess
import sys

CHECK = (
    "import megatron_gad.algos, sys; "
    "bad = [m for m in sys.modules if m.startswith(('megatron.core', 'ray'))]; "
    "assert not bad, bad"
)


def test_algos_import_no_megatron_no_ray():
    # a fresh interpreter: the test process may already have megatron/ray loaded
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
