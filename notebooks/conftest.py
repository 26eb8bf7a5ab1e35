"""nbval runs the notebooks in smoke mode and then kills their kernels, so a smoke run folder's
exit handler never runs: remove the folders of the dead kernels once the session is over."""


def pytest_sessionfinish(session, exitstatus):
    from eva_utils.notebook import remove_stale_smoke_folders

    remove_stale_smoke_folders()
