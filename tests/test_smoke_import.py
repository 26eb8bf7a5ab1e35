import subprocess
import sys


def test_import_has_no_side_effects(tmp_path):
    """Importing eva_utils creates no files and does not initialise CUDA."""
    code = "import eva_utils, torch, sys; sys.exit(int(torch.cuda.is_initialized()))"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert list(tmp_path.iterdir()) == []
