import sys

from .cli import main

code = main()
ranks = sys.modules.get("eva_utils.ranks")  # loaded where the command may have joined ranks
if ranks is not None:
    ranks.exit_process(code)
sys.exit(code)
