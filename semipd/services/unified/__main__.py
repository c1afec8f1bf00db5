from semipd.services.unified.worker import run
from semipd.services.worker import worker_main

worker_main("unified", run)
