"""nbval runs the notebooks in smoke mode and then kills their kernels, so a smoke run folder's
exit handler never runs: remove the folders of the dead kernels once the session is over.

Under pytest-xdist (``make test``, ``--dist loadgroup``) a notebook's cells run in one kernel, in
order: each notebook is a group, which one worker runs from its first cell to its last."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.xdist_group(f"notebook-{item.path.name}"))


def pytest_sessionfinish(session, exitstatus):
    from eva_utils.notebook import remove_stale_smoke_folders

    remove_stale_smoke_folders()
