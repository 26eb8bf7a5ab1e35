import subprocess
import sys


def test_import_has_no_side_effects(tmp_path):
    """Importing eva_utils creates no files and does not initialise CUDA."""
    code = "import eva_utils, torch, sys; sys.exit(int(torch.cuda.is_initialized()))"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    assert list(tmp_path.iterdir()) == []


def test_the_library_and_its_environment_record_load_no_torchvision(tmp_path):
    """torchvision (whose ops load torch._dynamo: 3 CPU-seconds at every start of a command on
    a 2-core EPYC) is for its loader and its CIFAR-10 download only; the version a run records
    comes from the package metadata."""
    code = (
        "import sys, torch, eva_utils.cli, eva_utils.training\n"
        "from eva_utils.devices import environment\n"
        "assert environment(torch.device('cpu'))['torchvision']\n"
        "loaded = [name for name in ('torchvision', 'torch._dynamo') if name in sys.modules]\n"
        "sys.exit(f'loaded {loaded}' if loaded else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
