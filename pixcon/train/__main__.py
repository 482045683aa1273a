import os
import sys

from .. import distributed as pdist
from .cli import main

rc = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    pdist.exit_now(rc)       # under torchrun: no interpreter teardown for gloo's threads
sys.exit(rc)
