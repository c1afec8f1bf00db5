from services.unified.worker import run
from shared.worker import worker_main

worker_main("unified", run)
